"""Code-extraction throughput against a plain forward pass of the same model, in the same run.

    python benchmarks/bench_codes.py [--repeats 5] [--json out.json]

CPU cases: EfficientNet-Lite0 on scikit-image photos (every ReLU6 site, all units and the paper's CNN protocol) and
MiniLM on pydoc text (every GELU site, the paper's token protocol and every token). On a GPU, when one is
present, a GPT-2-small-shaped model with random weights (nothing is downloaded) in float32 and bfloat16: one batch
of 32 sequences, and 8 batches whose codes are held together as in a real run.
Throughput ratio = plain forward time / extraction time (1.0 = no overhead); the goal is >= 0.90.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from polytope_lens.codes import CodeExtractor, UnitSelection
from polytope_lens.data import load_data
from polytope_lens.models import ModelInputs, load_model


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, repeats, device):
    """Median time of ``repeats`` calls after a warm-up call, and the warm-up call's own time."""
    t0 = time.perf_counter()
    fn()  # warm-up
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def case(name, module, forward, inputs, n_examples, repeats, device, batch_size=None, plain_forward=None,
         **extractor_kwargs):
    """Extraction against ``plain_forward`` (default ``forward``) of the same inputs; ``first_ratio``: the first
    extraction (warm-up) against the plain forward's median."""
    extractor = CodeExtractor(module, forward=forward, batch_size=batch_size or n_examples, **extractor_kwargs)
    extractor.resolve_sites(inputs)
    plain_forward = plain_forward or forward
    with torch.no_grad():
        t_plain, _ = timed(lambda: plain_forward(inputs.tensors if hasattr(inputs, "tensors") else inputs), repeats,
                           device)
    t_codes, t_first = timed(lambda: extractor(inputs), repeats, device)
    codes = extractor(inputs)
    units = sum(lc.n_units for lc in codes.layers.values())
    return {"case": name, "device": str(device), "examples": n_examples, "rows": len(codes),
            "sites": len(codes.layers), "units_per_row": units,
            "plain_per_s": n_examples / t_plain, "codes_per_s": n_examples / t_codes, "ratio": t_plain / t_codes,
            "first_ratio": t_plain / t_first}


def cpu_cases(repeats):
    out = []
    eff = load_model("efficientnet-lite0")
    photos = load_data("skimage")
    x = eff.encode(photos)
    x = ModelInputs({k: v.repeat(3, 1, 1, 1)[:16] for k, v in x.tensors.items()})
    fwd = lambda t: eff.forward(ModelInputs(t))
    out.append(case("efficientnet-lite0, 33 ReLU6 sites, all units (6.2M/img)", eff.module, fwd, x, 16, repeats,
                    "cpu", units="all"))
    out.append(case("efficientnet-lite0, 32 sites with a spatial grid, CNN protocol", eff.module, fwd, x, 16,
                    repeats, "cpu", units=UnitSelection("position")))
    mini = load_model("minilm")
    text = load_data("pydoc", limit=16)
    t = mini.encode(text, max_length=256)
    fwd = lambda tt: mini.forward(ModelInputs(tt))
    out.append(case("minilm, 6 GELU sites, token protocol (k=6, skip=100)", mini.module, fwd, t, 16, repeats, "cpu",
                    units=UnitSelection("tokens")))
    out.append(case("minilm, 6 GELU sites, every token", mini.module, fwd, t, 16, repeats, "cpu",
                    units="all-tokens"))
    return out


def profile_codes(model, forward, inputs, **extractor_kwargs):
    """Where one extraction's time goes on the GPU: the top operators by CPU and by CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    extractor = CodeExtractor(model, forward=forward, batch_size=len(inputs), **extractor_kwargs)
    extractor(inputs)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        extractor(inputs)
        torch.cuda.synchronize()
    for key in ("self_cpu_time_total", "self_cuda_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=50), flush=True)


def gpu_cases(repeats, profile=False, multi_batch=True):
    from transformers import GPT2Config, GPT2Model

    out = []
    for dtype in (torch.float32, torch.bfloat16):
        model = GPT2Model(GPT2Config()).to("cuda", dtype).eval()
        ids = torch.randint(0, 50257, (32, 1024), device="cuda")
        fwd = lambda x: model(input_ids=x)
        out.append(case(f"gpt2-small-shaped (random), 12 GELU sites, every token, {dtype}", model, fwd, ids, 32,
                        repeats, "cuda", units="all-tokens"))
        if multi_batch:  # the codes of 8 batches held together, as in a real run (1.2 GB on the host)
            many = torch.randint(0, 50257, (256, 1024), device="cuda")

            def plain(x):
                for i in range(0, len(x), 32):
                    model(input_ids=x[i:i + 32])
            out.append(case(f"as above, 8 batches of 32 held together, {dtype}", model, fwd, many, 256, repeats,
                            "cuda", batch_size=32, units="all-tokens", plain_forward=plain))
        if profile:
            profile_codes(model, fwd, ids, units="all-tokens")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile one GPU extraction per dtype (top operators)")
    args = ap.parse_args()
    rows = [] if args.gpu_only else cpu_cases(args.repeats)
    if torch.cuda.is_available():
        rows += gpu_cases(args.repeats, args.profile)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}")
    print("| case | device | plain fwd ex/s | codes ex/s | ratio | first extraction's ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        cells = [r["case"], r["device"], f"{r['plain_per_s']:.1f}", f"{r['codes_per_s']:.1f}", f"{r['ratio']:.2f}",
                 f"{r['first_ratio']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
