"""Exact paths through EfficientNet-Lite0 on the CPU between two real photos (the issue's 60 s goal).

    python benchmarks/bench_paths_efficientnet.py [--device cuda] [--full]

Full-network exact paths cost about one float64 evaluation of every later site per breakpoint (tens of thousands of
breakpoints x millions of units), which is out of reach on 2 CPU cores. The goal is stated for a path restricted to
one layer's codes: the crossings of the first ReLU6 site (32 x 112 x 112 units, two kinks each) along the straight
path chelsea -> coffee in input space; later sites are not needed for them and are skipped. Also timed: the exact
scaling ray alpha * a, alpha in [0, 3], of the last block's ReLU6 site for chelsea (every later site processed).
With --full (a GPU): the full-network path over the first 1/2000 and 1/100 of the segment, then all of it, each run
only if its time extrapolated from the previous fraction fits --full-seconds (other fractions: --fractions).
--aten-convolutions runs float64 convolutions through ATen's fallback as it comes (one call per channel of a
depthwise layer, a whole batch unfolded at once) instead of the ways of ``polytope_lens._conv64`` (the before/after
of stop 17).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from polytope_lens.data import load_data
from polytope_lens.models import load_model
from polytope_lens.paths import path_crossings, ray_crossings


def profile_full(bundle, x, dev, frac=1 / 2000):
    """Where the full-network path's time goes: the top operators by CPU and by device time."""
    from torch.profiler import ProfilerActivity, profile

    end = x[:1] + frac * (x[1:] - x[:1])
    path_crossings(bundle.module, x[:1], end, trace=False, device=dev, layers="_swish.relu6")  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        r = path_crossings(bundle.module, x[:1], end, trace=False, device=dev, memory_budget=32 << 30)
        wall = time.perf_counter() - t0
    print(f"full-network path, first {frac:g} of chelsea -> coffee on {dev}: {r.paths[0].crossings} crossings, "
          f"{wall:.1f} s under the profiler", flush=True)
    keys = ["self_cpu_time_total"] + (["self_cuda_time_total"] if dev.startswith("cuda") else [])
    for key in keys:
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true", help="also the full-network path (every site; the GPU case)")
    ap.add_argument("--full-seconds", type=float, default=240.0,
                    help="time for the full-network fractions: a longer fraction runs only if its extrapolation fits")
    ap.add_argument("--profile", action="store_true",
                    help="only profile the full-network path over the first 1/2000 of the segment (top operators)")
    ap.add_argument("--fractions", default="5e-4,1e-2,1",
                    help="with --full: comma-separated fractions of the segment, in increasing order")
    ap.add_argument("--aten-convolutions", action="store_true",
                    help="ATen's float64 convolutions as they come instead of polytope_lens._conv64's ways")
    args = ap.parse_args()
    if args.aten_convolutions:
        import polytope_lens._conv64 as conv64

        conv64.MAX_IMAGE, conv64.COLUMN_BYTES = 0, 1 << 62
    dev = args.device
    bundle = load_model("efficientnet-lite0")
    photos = load_data("skimage")
    names = list(photos.label_names)
    x = next(iter(bundle.encode(photos, [names.index("chelsea"), names.index("coffee")]).tensors.values())).double()
    if args.profile:
        profile_full(bundle, x, dev)
        return
    print(f"device: {dev}; float64 convolutions: {'ATen' if args.aten_convolutions else 'polytope_lens._conv64'}")
    print("| case | seconds | crossings | exact | evaluator |")
    print("|---|---:|---:|---|---|", flush=True)

    def row(case, t0, r):  # one row as soon as it is known: a step killed at its time limit keeps the rows before
        print(f"| {case} | {time.perf_counter() - t0:.1f} | {r.paths[0].crossings} | {r.exact} | {r.notes[-1]} |",
              flush=True)

    if dev != "cpu":  # warm-up: CUDA context, kernels
        path_crossings(bundle.module, x[:1], x[1:], layers="_swish.relu6", trace=False, device=dev)
    t0 = time.perf_counter()
    r = path_crossings(bundle.module, x[:1], x[1:], layers="_swish.relu6", trace=False, device=dev)
    row("path chelsea -> coffee, crossings of the first ReLU6 site (401,408 units)", t0, r)
    t0 = time.perf_counter()
    r = ray_crossings(bundle.module, x[:1], layer="_blocks.15._swish.relu6#1", alphas=(0.0, 3.0), trace=False,
                      device=dev)
    row("scaling ray of _blocks.15._swish.relu6#1 (chelsea), alpha 0..3, all later sites", t0, r)
    t0 = time.perf_counter()
    r = ray_crossings(bundle.module, x[:1], layer="_blocks.15._swish.relu6#1", alphas=(0.25, 4.0), units="position",
                      device=dev)
    row("prediction-3 ray of _blocks.15._swish.relu6#1 (chelsea), alpha 0.25..4, head centre channel vector, "
        "with the trace", t0, r)
    if args.full:  # the first 1/2000, 1/100 of the path (CPU, stop 11: 1/2000 crosses 1,087 in 131 s), then all
        start, spent, last = time.perf_counter(), 0.0, None
        for frac in (float(f) for f in args.fractions.split(",")):
            if last is not None:
                guess = last[1] * frac / last[0]  # time grows about linearly with the breakpoints, so the length
                if spent + guess > args.full_seconds:
                    print(f"| path chelsea -> coffee, every site, first {frac:g} of the segment: not run; about "
                          f"{guess:.0f} s by extrapolation from the first {last[0]:g} ({last[1]:.1f} s) | | | | |",
                          flush=True)
                    break
            t0 = time.perf_counter()
            r = path_crossings(bundle.module, x[:1], x[:1] + frac * (x[1:] - x[:1]), trace=False, device=dev,
                               memory_budget=32 << 30)
            row(f"path chelsea -> coffee, every site (full network), first {frac:g} of the segment", t0, r)
            last, spent = (frac, time.perf_counter() - t0), time.perf_counter() - start

if __name__ == "__main__":
    main()
