"""Where the time of exact paths goes on a GPU: kernel time and GPU idle time, attributed to the engine's functions.

    python benchmarks/trace_paths_gpu.py --paths 2400 --budget-gib 64 [--layout appended|path-order]

Runs ``path_crossings`` on the 784->4x512 MLP of ``bench_paths.py`` once to warm up, once timed and once under
torch's profiler with every engine function of interest wrapped in ``record_function``. From the profiler's trace it
paints a 1-microsecond timeline of the run: the GPU is busy where a kernel, copy or memset runs, idle elsewhere. It
prints the kernel time per path; each function's kernel time (kernels are attributed to the innermost function that
launched them; Triton's launches bypass the runtime API the trace correlates, so they appear as "(outside)"); the
GPU's idle time while each function was the innermost one running on the host; and the host operations running
while the GPU waited. Stop 18's kernel-time and idle figures in docs/benchmarks.md were taken with an earlier draft
of this script (the same method; this version wraps a few more functions). Works on the CPU too (``--device cpu``),
where everything is "idle".
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import json
import os
import tempfile
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from bench_paths import make_mlp

paths = importlib.import_module("polytope_lens.paths")
exact = importlib.import_module("polytope_lens.paths.exact")
kinks = importlib.import_module("polytope_lens.kinks")
capture = importlib.import_module("polytope_lens.capture")

WRAPPED = [(exact.Refiner, "_affine_z"), (exact.Refiner, "_crossings"), (exact, "_inputs_at_new"), (exact, "_merge"),
           (exact, "_lerp_rows"), (kinks.ScalarKinks, "crossings_along"), (exact, "sort_crossings"),
           (paths, "_collect"), (exact.Refiner, "run_chunk"), (exact.Refiner, "run_path_in_pieces"),
           (exact.Refiner, "_outputs"), (exact, "counts_below"), (paths, "lexsort"), (paths, "arrays_to_host_async"),
           (paths, "PathBlock"), (exact.Refiner, "_appended_z"), (exact, "scan"),
           (exact.Refiner, "_outputs_at_new"), (exact._Points, "insert"), (paths, "path_crossings"),
           (paths, "_analyse"), (paths.Runner, "__init__"), (paths.Runner, "extract_affine"),
           (paths.geometry, "segments"), (paths.geometry, "stacked"), (capture._CallApply, "__call__")]


def wrap(owner, name: str) -> None:
    f = getattr(owner, name)
    label = "## " + ("site.apply" if name == "__call__" else name)

    @functools.wraps(f)
    def labelled(*args, **kwargs):
        with record_function(label):
            return f(*args, **kwargs)
    setattr(owner, name, labelled)


def paint(events: list, t0: float, n: int, names: dict) -> np.ndarray:
    """Label of the innermost event at each microsecond (-1: none); nested events are shorter and painted last."""
    out = np.full(n, -1, dtype=np.int32)
    for e in sorted(events, key=lambda e: -e["dur"]):
        s, f = int(e["ts"] - t0), int(e["ts"] + e["dur"] - t0)
        if f > 0 and s < n:
            out[max(s, 0):min(f, n)] = names.setdefault(e["name"], len(names))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", type=int, default=2400)
    ap.add_argument("--budget-gib", type=float, default=64.0)
    ap.add_argument("--layout", choices=["appended", "path-order"], default="appended")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    exact.APPENDED_LAYOUT = args.layout == "appended"
    for owner, name in WRAPPED:
        wrap(owner, name)
    mlp = make_mlp(784, [512] * 4)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(args.paths, 784, generator=g), torch.randn(args.paths, 784, generator=g)

    def run():
        return paths.path_crossings(mlp, a, b, trace=False, verify=False, device=args.device,
                                    memory_budget=int(args.budget_gib * 2**30))
    run()
    t = time.perf_counter()
    run()
    print(f"{args.layout}, {args.paths} paths, budget {args.budget_gib:g} GiB: {time.perf_counter() - t:.3f} s "
          "unprofiled", flush=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        fn = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(fn)
        with open(fn) as f:
            ev = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    ann = [e for e in ev if e.get("cat") == "user_annotation" and e["name"].startswith("## ")]
    whole = [e for e in ann if e["name"] == "## path_crossings"]
    t0, n = whole[0]["ts"], int(whole[0]["dur"]) + 1
    gpu = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    busy = np.zeros(n, dtype=bool)
    for e in gpu:
        s = int(e["ts"] - t0)
        busy[max(s, 0):min(max(int(np.ceil(e["ts"] + e["dur"] - t0)), s + 1), n)] = True
    kernel_us = sum(e["dur"] for e in gpu)
    print(f"window {n / 1e3:.1f} ms: GPU busy {busy.sum() / 1e3:.1f} ms, idle {(~busy).sum() / 1e3:.1f} ms; "
          f"kernels {kernel_us / 1e3:.1f} ms = {kernel_us / args.paths:.1f} us per path")
    labels: dict = {}
    lab = paint(ann, t0, n, labels)
    names = {v: k[3:] for k, v in labels.items()}
    names[-1] = "(none)"
    launch = {e["args"].get("correlation"): e["ts"] for e in ev if e.get("cat") == "cuda_runtime" and "args" in e}
    kernels = collections.Counter()
    for e in gpu:
        ts = launch.get(e.get("args", {}).get("correlation"))
        i = -1 if ts is None else int(ts - t0)
        kernels[names[int(lab[i])] if 0 <= i < n else "(outside)"] += e["dur"]
    idle = collections.Counter()
    for i, c in zip(*np.unique(lab[~busy], return_counts=True)):
        idle[names[int(i)]] += int(c)
    print("function: GPU idle while innermost on the host | kernels it launched (ms)")
    for name in sorted(set(idle) | set(kernels), key=lambda k: -(idle[k] + kernels[k])):
        print(f"  {name:24s} idle {idle[name] / 1e3:8.1f}   kernels {kernels[name] / 1e3:8.1f}")
    ops: dict = {}
    op = paint([e for e in ev if e.get("cat") == "cpu_op"], t0, n, ops)
    op_names = {v: k for k, v in ops.items()}
    op_names[-1] = "(Python, no torch operation)"
    waiting = collections.Counter()
    for i, c in zip(*np.unique(op[~busy], return_counts=True)):
        waiting[op_names[int(i)]] += int(c)
    print("host operation running while the GPU is idle (ms):")
    for name, c in waiting.most_common(15):
        print(f"  {name:48s} {c / 1e3:8.1f}")


if __name__ == "__main__":
    main()
