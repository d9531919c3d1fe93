"""Exact 1-D crossing counts: polytope-lens (float64, CPU) vs Regioncam1D (float32), same paths, same run.

Segments between N(0,1) points through ReLU MLPs with weights N(0, 2/fan_in) and biases N(0, 0.25) (std 0.5).
Regioncam1D covers exactly a -> b with ``through_points([a, b], size=2.0)``; its crossings are ``num_vertices - 2``.
When Regioncam would take too long it runs on a sample of the paths (``--rc-paths``), and the table says so.

The column "products bound" is the most paths/s any exact method of this kind could reach here: every unit input at
every breakpoint is needed, and a breakpoint made at site j reaches the inputs of sites j + 2, j + 3, ... only
through a dense product per site (site j + 1 gets a rank-one update, what our closed-form bends do). From this
run's mean crossings per site it counts those products' float64 FLOPs per path, and divides the FLOP/s of one large
product of the same shape, timed here, by them (docs/benchmarks.md).

    python benchmarks/bench_paths.py                  # 1000 paths per network
    python benchmarks/bench_paths.py --paths 200 --rc-paths 50
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from polytope_lens.paths import path_crossings

NETWORKS = {"784-4x512": (784, [512] * 4), "784-3x2048": (784, [2048] * 3)}


def make_mlp(din: int, widths: list[int], seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers, d = [], din
    for w in widths:
        lin = nn.Linear(d, w)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(w, d, generator=g) * (2.0 / d) ** 0.5)
            lin.bias.copy_(torch.randn(w, generator=g) * 0.5)
        layers += [lin, nn.ReLU()]
        d = w
    return nn.Sequential(*layers)


def regioncam_counts(mlp: nn.Sequential, a: torch.Tensor, b: torch.Tensor) -> tuple[list[int], float]:
    import regioncam

    params = [(np.ascontiguousarray(m.weight.detach().numpy().T.astype(np.float32)),
               np.ascontiguousarray(m.bias.detach().numpy().astype(np.float32)))
              for m in mlp if isinstance(m, nn.Linear)]
    counts = []
    t0 = time.perf_counter()
    for x, y in zip(a, b):
        rc = regioncam.Regioncam1D.through_points(np.stack([x.numpy(), y.numpy()]).astype(np.float32), size=2.0)
        for w, bias in params:
            rc.linear(w, bias)
            rc.relu()
        counts.append(rc.num_vertices - 2)
    return counts, time.perf_counter() - t0


def products_bound(widths: list[int], din: int, per_site_mean: np.ndarray, dtype: torch.dtype) -> float:
    """Paths/s if an exact run did nothing but the matrix products it cannot avoid (see the module docstring):
    site k's inputs by a product at the path's two ends and at the breakpoints of sites 0 .. k - 2."""
    fan_in = [din] + widths[:-1]
    flops = sum(2.0 * d * w * (2.0 + per_site_mean[:max(0, k - 1)].sum())
                for k, (d, w) in enumerate(zip(fan_in, widths)))
    x = torch.randn(4096, widths[1], dtype=dtype)
    m = torch.randn(widths[1], widths[1], dtype=dtype)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x @ m
        best = min(best, time.perf_counter() - t0)
    rate = 2.0 * x.shape[0] * m.shape[0] * m.shape[1] / best
    return rate / flops


def profile_run(mlp: nn.Sequential, a: torch.Tensor, b: torch.Tensor, args) -> None:
    """Where one run's time goes: the top operators by device (or CPU) self time, and the wall time beside it."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        path_crossings(mlp, a, b, trace=False, verify=False, memory_budget=args.memory_budget, device=args.device,
                       dtype=getattr(torch, args.dtype))
        wall = time.perf_counter() - t0
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(f"profile of {len(a)} paths on {args.device}: {wall:.3f} s wall under the profiler", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", type=int, default=1000, help="segments per network")
    ap.add_argument("--rc-paths", type=int, default=None,
                    help="paths given to Regioncam1D (default: all for 4x512, 100 for 3x2048)")
    ap.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated subset of " + ", ".join(NETWORKS))
    ap.add_argument("--memory-budget", type=int, default=1 << 29, help="bytes for polytope-lens chunks")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs of each tool; the best time is kept")
    ap.add_argument("--device", default="cpu", help="device for polytope-lens (Regioncam1D always runs on the CPU)")
    ap.add_argument("--no-regioncam", action="store_true", help="time polytope-lens only (e.g. on a GPU)")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                    help="polytope-lens' dtype (the issue's goal is float64; float32 is Regioncam1D's precision)")
    ap.add_argument("--check-cpu", type=int, default=0, metavar="N",
                    help="also count the first N paths on the CPU in float64 and report the agreement (GPU runs)")
    ap.add_argument("--trace", action="store_true", help="with the semantic trace (the model output in every region)")
    ap.add_argument("--products", choices=["auto", "every-point", "bends"], default="auto",
                    help="affine route: unit inputs by products at every point, or closed-form bends at new points "
                         "(auto: products on a GPU, bends on the CPU; paths.exact.PRODUCTS_AT_EVERY_POINT)")
    ap.add_argument("--layout", choices=["appended", "path-order"], default="appended",
                    help="with products at every point: per-point matrices in the order points were made, or merged "
                         "into path order every stage (paths.exact.APPENDED_LAYOUT)")
    ap.add_argument("--scan", choices=["triton", "torch"], default="triton",
                    help="appended layout: the fused Triton scan where it can run, or torch operations "
                         "(_kink_scan.USE_TRITON)")
    ap.add_argument("--transfer", choices=["background", "wait"], default="background",
                    help="GPU: results copied out of their page-locked buffer on a background thread while the next "
                         "chunk runs, or before it starts (_transfer.BACKGROUND)")
    ap.add_argument("--profile", action="store_true",
                    help="after the timing, profile one run of the first 2000 paths and print the top kernels")
    args = ap.parse_args()
    if args.products != "auto":
        from polytope_lens.paths import exact
        # the --check-cpu counts of a GPU run keep the CPU's bends: an independent route
        exact.PRODUCTS_AT_EVERY_POINT = {torch.device(args.device).type} if args.products == "every-point" else set()
    from polytope_lens import _kink_scan
    from polytope_lens.paths import exact as exact_mod
    exact_mod.APPENDED_LAYOUT = args.layout == "appended"
    _kink_scan.USE_TRITON = args.scan == "triton"
    from polytope_lens import _transfer
    _transfer.BACKGROUND = args.transfer == "background"
    rows = []
    for name in args.networks.split(","):
        din, widths = NETWORKS[name]
        mlp = make_mlp(din, widths)
        g = torch.Generator().manual_seed(1)
        a, b = torch.randn(args.paths, din, generator=g), torch.randn(args.paths, din, generator=g)
        n_rc = args.rc_paths if args.rc_paths is not None else (args.paths if widths[0] <= 512 else 100)
        n_rc = 0 if args.no_regioncam else min(n_rc, args.paths)
        ours_s = rc_s = float("inf")
        if args.device != "cpu":  # warm-up: CUDA context, kernels
            path_crossings(mlp, a[:8], b[:8], trace=False, verify=False, device=args.device,
                           dtype=getattr(torch, args.dtype))
        peak = [0]  # the run's peak device memory: exact.DevicePeak resets the statistics at every piece of a path
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            real_start = exact_mod.DevicePeak.start

            def start(meter, real_start=real_start):
                peak[0] = max(peak[0], torch.cuda.max_memory_allocated(meter.device))
                real_start(meter)
            exact_mod.DevicePeak.start = start
        for _ in range(args.repeat):  # alternate the two tools; keep each one's best run (shared machines are noisy)
            t0 = time.perf_counter()
            res = path_crossings(mlp, a, b, trace=args.trace, verify=False, memory_budget=args.memory_budget,
                                 device=args.device, dtype=getattr(torch, args.dtype))
            ours_s = min(ours_s, time.perf_counter() - t0)  # results come back on the CPU: the device is synced
            assert res.exact and res.dtype == args.dtype, res.notes
            if n_rc:
                rc, s = regioncam_counts(mlp, a[:n_rc], b[:n_rc])
                rc_s = min(rc_s, s)
        if args.device.startswith("cuda"):
            exact_mod.DevicePeak.start = real_start
            peak[0] = max(peak[0], torch.cuda.max_memory_allocated())
            print(f"{name}: peak device memory {peak[0] / 2**30:.1f} GiB under a memory "
                  f"budget of {args.memory_budget / 2**30:.1f} GiB; best run {ours_s:.2f} s", flush=True)
        if args.check_cpu:
            n_cpu = min(args.check_cpu, args.paths)
            ref = path_crossings(mlp, a[:n_cpu], b[:n_cpu], trace=False, verify=False, device="cpu")
            same = float(np.mean(ref.counts == res.counts[:n_cpu])) * 100
            print(f"{name}: counts on {args.device} ({args.dtype}) equal the CPU float64 counts for {same:.1f} % of "
                  f"the first {n_cpu} paths (max diff {int(np.abs(ref.counts - res.counts[:n_cpu]).max())})",
                  flush=True)
        if args.profile:
            profile_run(mlp, a[:2000], b[:2000], args)
        if n_rc:
            ours = res.counts[:n_rc]
            agree = float(np.mean(ours == np.asarray(rc))) * 100
            dmax = int(np.abs(ours - np.asarray(rc)).max())
        else:
            agree, dmax = float("nan"), -1
        bound = products_bound(widths, din, res.paths.per_site.mean(0), getattr(torch, args.dtype)) \
            if args.device == "cpu" else float("nan")
        rows.append((name, args.paths, float(res.counts.mean()), args.paths / ours_s, n_rc,
                     n_rc / rc_s if n_rc else float("nan"), agree, int(sum(p.ties for p in res.paths)), dmax, bound))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ours on {args.device} (products: "
          f"{args.products}, layout: {args.layout}, scan: {args.scan}, transfer: {args.transfer}); ours {args.dtype}"
          f"{', with the trace' if args.trace else ''}, "
          f"Regioncam1D float32; best of {args.repeat} alternating runs\n")
    print("| network | paths | mean crossings | ours paths/s | Regioncam1D paths (sample) | Regioncam1D paths/s "
          "| speed-up | agreement | ties | max count diff | products bound paths/s (x Regioncam1D) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, n, mean, ours_ps, n_rc, rc_ps, agree, ties, dmax, bound in rows:
        print(f"| {name} | {n} | {mean:.1f} | {ours_ps:.1f} | {n_rc} | {rc_ps:.2f} | {ours_ps / rc_ps:.1f}x "
              f"| {agree:.1f} % | {ties} | {dmax} | {bound:.0f} ({bound / rc_ps:.1f}x) |")


if __name__ == "__main__":
    main()
