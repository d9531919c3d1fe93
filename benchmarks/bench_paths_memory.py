"""Time and peak memory of long paths under a memory budget (docs/benchmarks.md and docs/paths.md, stop 15).

    python benchmarks/bench_paths_memory.py                      # every case, one subprocess each
    python benchmarks/bench_paths_memory.py --case effnet --fraction 2e-5 --budget-mib 1024

Cases (each in its own process, since peak RSS is per process; the RSS growth is measured from just before the
timed call):

* ``effnet``: the exact full-network path through EfficientNet-Lite0 over the first ``--fraction`` of the segment
  chelsea -> coffee (every site, no trace, the check of final intervals on), under ``--budget-mib``;
* ``sampled``: a sampled path through a 3->2x4096 GELU MLP with 8,192 samples under 256 MiB.

Peak RSS counts freed memory that the C allocator keeps for reuse: up to 512 MiB by polytope-lens' own setting
(``_heap.keep_freed_memory``), and whatever glibc's adaptive mmap threshold leaves in the heap. ``--live`` runs each
case a second time with that setting off and every allocation of 64 KiB or more mapped and unmapped on its own
(``POLYTOPE_LENS_KEEP_FREED_MEMORY=0 MALLOC_MMAP_THRESHOLD_=65536``), so that the RSS follows the live arrays.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DEFAULT_CASES = [("effnet", 2e-5, 1024), ("effnet", 1e-4, 32768), ("effnet", 1e-4, 1024), ("sampled", 0.0, 256)]


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def run_case(case: str, fraction: float, budget_mib: int) -> None:
    import torch

    from polytope_lens.paths import path_crossings

    if case == "effnet":
        from polytope_lens.data import load_data
        from polytope_lens.models import load_model

        bundle = load_model("efficientnet-lite0")
        src = load_data("skimage")
        names = list(src.label_names)
        rows = [names.index("chelsea"), names.index("coffee")]
        x = next(iter(bundle.encode(src, rows).tensors.values())).to(torch.float64)
        a, b, what = x[:1], x[:1] + fraction * (x[1:] - x[:1]), f"EfficientNet-Lite0, first {fraction:g} of the path"
        kw = dict(trace=False)
        model = bundle.module
    else:
        torch.manual_seed(5)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 4096),
                                    torch.nn.GELU(), torch.nn.Linear(4096, 3)).double()
        a, b = torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
        what, kw = "3->2x4096 GELU MLP, sampled, 8,192 samples", dict(n_samples=8192)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        what += ", freed memory returned at once"
    base = _rss_gb()
    t0 = time.perf_counter()
    res = path_crossings(model, a, b, memory_budget=budget_mib << 20, **kw)
    print(f"| {what} | {budget_mib} MiB | {time.perf_counter() - t0:.1f} | {res.paths[0].crossings} | "
          f"{_rss_gb() - base:.2f} | {_rss_gb():.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["effnet", "sampled"])
    ap.add_argument("--fraction", type=float, default=2e-5, help="effnet: fraction of the segment, from chelsea")
    ap.add_argument("--budget-mib", type=int, default=1024)
    ap.add_argument("--live", action="store_true",
                    help="also run each case with freed memory returned at once (RSS = live arrays; slower)")
    args = ap.parse_args()
    if args.case is not None:
        run_case(args.case, args.fraction, args.budget_mib)
        return
    print("| case | budget | seconds | crossings | RSS growth GB | peak RSS GB |")
    print("|---|---:|---:|---:|---:|---:|", flush=True)
    live = dict(os.environ, POLYTOPE_LENS_KEEP_FREED_MEMORY="0", MALLOC_MMAP_THRESHOLD_="65536")
    for case, frac, mib in DEFAULT_CASES:
        for env in [None, live] if args.live else [None]:
            subprocess.run([sys.executable, __file__, "--case", case, "--fraction", str(frac), "--budget-mib",
                            str(mib)], check=True, env=env)


if __name__ == "__main__":
    main()
