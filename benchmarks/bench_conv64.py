"""Float64 convolutions on the CPU: ``polytope_lens._conv64`` against ATen's fallback as it comes (docs/benchmarks.md,
stop 17). Each case alternates the two ways in one process (``--repeat`` times) and prints every time.

    python benchmarks/bench_conv64.py

Cases:

* one EfficientNet-Lite0 image, float64 forward pass under ``capture`` (depthwise layers: one ATen call per channel);
* a Fashion-MNIST CNN scaling ray of ``stem.2.relu``, alpha in [0.25, 16] with the trace (reproduce's prediction 3;
  batches of about 90 points through 3 x 3 convolutions: ATen unfolds the whole batch);
* what ``_conv64`` costs where it has nothing to do: a one-row float64 pass of a 50-layer MLP under ``capture``,
  plain, and with ``FastConv64`` entered as a second mode around it (every torch call then goes through two modes,
  the arrangement stop 17 first had and dropped).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
from torch import nn

import polytope_lens._conv64 as conv64
from polytope_lens.capture import run

WAYS = {"ATen": (0, 1 << 62), "_conv64": (conv64.MAX_IMAGE, conv64.COLUMN_BYTES)}


def timed(fn, repeat: int, ways=WAYS) -> dict:
    out = {w: [] for w in ways}
    for _ in range(repeat):
        for way, setting in ways.items():
            if setting is not None:
                conv64.MAX_IMAGE, conv64.COLUMN_BYTES = setting
            t0 = time.perf_counter()
            fn(way)
            out[way].append(time.perf_counter() - t0)
    conv64.MAX_IMAGE, conv64.COLUMN_BYTES = WAYS["_conv64"]
    return out


def show(case: str, times: dict, unit: float = 1.0, label: str = "s") -> None:
    cells = "; ".join(f"{w}: " + ", ".join(f"{t * unit:.2f}" for t in ts) + f" {label}" for w, ts in times.items())
    print(f"| {case} | {cells} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from polytope_lens.data import load_data
    from polytope_lens.models import load_model
    from polytope_lens.paths import ray_crossings

    print("| case | times, alternately |\n|---|---|")
    effnet = load_model("efficientnet-lite0").module.double().eval()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    run(effnet, lambda: effnet(x), lambda s, z: None)  # warm-up

    def one_pass(_):
        for _ in range(5):
            run(effnet, lambda: effnet(x), lambda s, z: None)
    show("EfficientNet-Lite0, one float64 image under capture (per pass)", timed(one_pass, args.repeat), 1e3 / 5, "ms")

    fashion = load_model("fashion-cnn")
    img = fashion.encode(load_data("fashion-mnist", limit=1, seed=0), np.arange(1)).tensors
    counts = set()

    def ray(_):
        counts.add(tuple(int(c) for c in ray_crossings(fashion.module, img, layer="stem.2.relu",
                                                             alphas=(0.25, 16.0)).counts))
    ray(None)
    show("fashion-cnn ray of stem.2.relu, alpha 0.25..16, with the trace", timed(ray, args.repeat))
    assert len(counts) == 1, counts
    print(f"(the ray's crossings, every run: {counts.pop()})")

    mlp = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(50)]).double()
    row = torch.randn(1, 16, dtype=torch.float64)

    def mlp_pass(way):
        if way == "second mode":
            with conv64.FastConv64():
                for _ in range(200):
                    run(mlp, lambda: mlp(row), lambda s, z: None)
        else:
            for _ in range(200):
                run(mlp, lambda: mlp(row), lambda s, z: None)
    show("50-layer 16-wide MLP, one float64 row under capture (per pass)",
         timed(mlp_pass, args.repeat, {"capture": None, "second mode": None}), 1e3 / 200, "ms")


if __name__ == "__main__":
    main()
