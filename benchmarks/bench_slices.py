"""Exact 2-D slices: regions/s against Regioncam (same weights, same run), and a slice of EfficientNet-Lite0.

Run: python benchmarks/bench_slices.py [--skip-effnet] [--repeats N]. Prints a markdown table; times are medians of
N runs after a warm-up, for both tools.
"""

import argparse
import time

import numpy as np
import torch
from torch import nn


def mlp(width, depth, seed):
    g = torch.Generator().manual_seed(seed)
    layers, d = [], 2
    for _ in range(depth):
        lin = nn.Linear(d, width)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(width, d, generator=g) * np.sqrt(2 / d))
            lin.bias.copy_(torch.randn(width, generator=g) * 0.5)  # N(0, 0.25)
        layers += [lin, nn.ReLU()]
        d = width
    return nn.Sequential(*layers)


def _median_time(fn, repeats):
    """Median wall time of ``repeats`` calls after one warm-up call (both tools get the same treatment)."""
    out = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-effnet", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--large", type=int, default=0,
                    help="also slice a 2->3xLARGE MLP (680 gives about 1e6 regions) on --device, ours only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--large-only", action="store_true", help="skip the Regioncam table (no regioncam needed)")
    ap.add_argument("--routes", action="store_true",
                    help="also time 6-layer MLPs with site inputs from the affine route vs a forward pass per vertex")
    ap.add_argument("--memory-budget", type=int, default=16 << 30)
    args = ap.parse_args()
    from polytope_lens.slices import slice_box, slice_through
    rows = []
    for width in () if args.large_only else (128, 256):
        import regioncam

        m = mlp(width, 3, 0)

        def regioncam_run():
            rc = regioncam.Regioncam(size=1)
            rc.add(m)
            return rc

        t_rc, rc = _median_time(regioncam_run, args.repeats)
        t_ours, res = _median_time(lambda: slice_box(m, outputs=False), args.repeats)
        t_o, _ = _median_time(lambda: slice_box(m, outputs=True), 1)
        rows.append((f"2→3×{width}, box [-1,1]²", rc.num_faces, t_rc, res.num_regions, t_ours, t_o))
    if rows:
        print("| slice | Regioncam regions | Regioncam s | ours regions | ours s (partition) | ours s (+maps, DB) | "
              "ratio regions/s (partition) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n_rc, t_rc, n, t, t_o in rows:
        print(f"| {name} | {n_rc} | {t_rc:.2f} | {n} | {t:.2f} | {t_o:.2f} | {(n / t) / (n_rc / t_rc):.2f}× |")
    if args.routes:
        from polytope_lens.paths.runner import Runner
        affine = Runner.extract_affine
        print("\n| slice (box [-1,1]²) | regions | affine route s | forward pass per vertex s |\n|---|---:|---:|---:|")
        for width in (128, 256):
            m = mlp(width, 6, 0)
            t_aff, res = _median_time(lambda: slice_box(m, outputs=False, memory_budget=args.memory_budget), 3)
            Runner.extract_affine = lambda self, want_output: None  # graph route
            try:
                t_graph, res_g = _median_time(lambda: slice_box(m, outputs=False, memory_budget=args.memory_budget),
                                              3)
            finally:
                Runner.extract_affine = affine
            assert res.num_regions == res_g.num_regions
            print(f"| 2→6×{width} | {res.num_regions} | {t_aff:.2f} | {t_graph:.2f} |")
    if args.large:
        import resource
        m = mlp(args.large, 3, 0)
        if args.device != "cpu":
            slice_box(mlp(64, 3, 0), device=args.device, outputs=False)  # warm-up (kernels, context)
        t = time.perf_counter()
        res = slice_box(m, device=args.device, outputs=False, memory_budget=args.memory_budget)
        el = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"\n| 2→3×{args.large}, box [-1,1]², {args.device} | {res.num_regions} regions | {el:.1f} s | "
              f"peak RSS {rss:.1f} GB | notes: {'; '.join(res.notes) or 'none'} |")
    if not args.skip_effnet:
        from polytope_lens.data import load_data
        from polytope_lens.models import load_model
        bundle = load_model("efficientnet-lite0")
        data = load_data("skimage")
        x = bundle.encode(data, [0, 1, 2])
        x = next(iter(x.tensors.values())) if hasattr(x, "tensors") else x
        model = bundle.module
        from polytope_lens.capture import list_sites
        sites = list_sites(model, lambda: model(x[:1]))
        first = sites[0]
        c = first.shape[1]
        t = time.perf_counter()
        res = slice_through(model, x[0], x[1], x[2], until=first.name, units="position", outputs=False)
        el = time.perf_counter() - t
        print(f"\n| EfficientNet-Lite0, plane through 3 photos, site {first.name} (channel vector at centre, {c} "
              f"units) | {res.num_regions} regions | {el:.1f} s |")


if __name__ == "__main__":
    main()
