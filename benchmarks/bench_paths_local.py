"""The local evaluator (``paths.local``) against the frontier on exact full-network EfficientNet-Lite0 paths.

Runs the first fractions of chelsea -> coffee (the photos of issue 3's GPU goal) through every site with
``evaluator="frontier"`` and ``evaluator="local"``, alternately, and prints per run: seconds, crossings, whether the
two give the same records (site, unit, piece entered; positions in t within 1e-9), and the unit inputs each holds at
the sites: the local evaluator's entries x channels against points x units (what the frontier scans and its passes
write). ``python benchmarks/bench_paths_local.py --fractions 2e-5,5e-5 --repeat 2 [--device cuda]``.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from polytope_lens.data import load_data
from polytope_lens.models import load_model
from polytope_lens.paths import path_crossings
from polytope_lens.paths.exact import Refiner


@contextlib.contextmanager
def held_values():
    """The unit inputs each local piece held at its sites, and a dense evaluator's count at the same points."""
    real, held = Refiner.run_chunk, [0, 0]

    def run_chunk(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        held[0] += sum(out.get("local_entries", []))
        held[1] += sum(out.get("dense_values", []))
        return out

    Refiner.run_chunk = run_chunk
    try:
        yield held
    finally:
        Refiner.run_chunk = real


def records(r) -> list:
    rc = r.paths[0].records
    return sorted(zip(rc["site"].tolist(), rc["unit"].tolist(), rc["piece"].tolist(), rc["t"].tolist()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", default="2e-5,5e-5")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory-gib", type=int, default=32)
    args = ap.parse_args()
    bundle = load_model("efficientnet-lite0")
    photos = load_data("skimage")
    names = list(photos.label_names)
    x = next(iter(bundle.encode(photos, [names.index("chelsea"), names.index("coffee")]).tensors.values())).double()
    model, dev = bundle.module, args.device
    print(f"device {dev}, torch {torch.__version__}, exact float64 paths, no trace, no final-interval check")
    print("| fraction | evaluator | seconds | crossings | same records as the frontier | unit inputs held at sites "
          "(float64) |")
    print("|---|---|---:|---:|---|---:|", flush=True)
    path_crossings(model, x[:1], x[:1] + 1e-7 * (x[1:] - x[:1]), trace=False, device=dev)  # warm-up
    for frac in (float(f) for f in args.fractions.split(",")):
        end = x[:1] + frac * (x[1:] - x[:1])
        ref = None
        for _ in range(args.repeat):
            for ev in ("frontier", "local"):
                with held_values() as held:
                    t0 = time.perf_counter()
                    r = path_crossings(model, x[:1], end, trace=False, verify=False, device=dev, evaluator=ev,
                                       memory_budget=args.memory_gib << 30)
                    if dev != "cpu":
                        torch.cuda.synchronize()
                    sec = time.perf_counter() - t0
                rec = records(r)
                if ev == "frontier":
                    ref, dense = rec, None
                    same = "-"
                else:
                    dt = max((abs(a[3] - b[3]) for a, b in zip(ref, rec)), default=0.0)
                    same = "yes" if [a[:3] for a in ref] == [b[:3] for b in rec] and dt <= 1e-9 else "NO"
                    same += f" (max difference in t {dt:.1e})"
                    dense = held[1]
                gib = (held[0] if ev == "local" else 0) * 8 / 2**30
                note = f"{gib:.3f} GiB; {held[0] / dense:.2f} of a dense evaluator's {dense * 8 / 2**30:.3f} GiB" \
                    if dense else "every unit at every point"
                print(f"| {frac:g} | {ev} | {sec:.1f} | {r.paths[0].crossings} | {same} | {note} |", flush=True)


if __name__ == "__main__":
    main()
