"""Exact paths on the graph route (forward passes at new breakpoints) through the embedded CNNs.

    python benchmarks/bench_paths_graph.py [--device cuda] [--items 2]

The graph route is what CNNs take when their Jacobian blocks between sites do not fit the memory budget (the
Fashion-MNIST CNN's 16 x 28 x 28 residual block, EfficientNet-Lite0). Each case runs twice in the same process:
as shipped (the forward pass before the site that made a breakpoint runs on one row or at interval ends, see
docs/paths.md) and with that reduction turned off (one pass through the whole model per breakpoint); counts must be
equal. digits-cnn paths (10 per ray) also run on the affine route, for scale.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from polytope_lens.data import load_data
from polytope_lens.models import load_model
from polytope_lens.paths import exact, path_crossings, ray_crossings


def timed(fn, reduce: bool):
    real = exact.Refiner._check_reduction
    if not reduce:
        exact.Refiner._check_reduction = lambda self, evaluate: "every point"
    try:
        t0 = time.perf_counter()
        res = fn()
        return time.perf_counter() - t0, res
    finally:
        exact.Refiner._check_reduction = real


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--items", type=int, default=2, help="rays / paths per case")
    args = ap.parse_args()
    dev, n = args.device, args.items
    rows = []
    fashion = load_model("fashion-cnn")
    x = fashion.encode(load_data("fashion-mnist", limit=n, seed=0), np.arange(n)).tensors
    ray = lambda: ray_crossings(fashion.module, x, layer="stem.2.relu", alphas=(0.25, 16.0), device=dev)  # noqa: E731
    for reduce in (True, False):
        sec, res = timed(ray, reduce)
        rows.append((f"fashion-cnn: {n} scaling rays of stem.2.relu, alpha 0.25..16, with the trace (reproduce's "
                     "prediction 3)", "graph" + ("" if reduce else ", no reduction"), sec, res.counts))
    digits = load_model("digits-cnn")
    m = 10 * n
    d = digits.encode(load_data("digits", limit=2 * m, seed=0), np.arange(2 * m)).tensors["x"]
    for evaluator, reduce in (("graph", True), ("graph", False), ("affine", True)):
        sec, res = timed(lambda: path_crossings(digits.module, d[:m], d[m:], evaluator=evaluator, device=dev), reduce)
        rows.append((f"digits-cnn: {m} input-space paths between digits, with the trace", evaluator
                     + ("" if reduce else ", no reduction"), sec, res.counts))
    print(f"device: {dev}")
    print("| case | evaluator | seconds | crossings per path |")
    print("|---|---|---:|---|")
    for case, ev, sec, counts in rows:
        shown = ", ".join(f"{c:,}" for c in counts[:3]) + (f", ... (mean {np.mean(counts):,.0f})" if len(counts) > 3
                                                          else "")
        print(f"| {case} | {ev} | {sec:.1f} | {shown} |")
    for group in (rows[:2], rows[2:]):
        assert all(list(r[3]) == list(group[0][3]) for r in group), "counts differ between evaluators"


if __name__ == "__main__":
    main()
