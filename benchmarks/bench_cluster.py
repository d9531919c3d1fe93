"""Clustering packed codes at scale: ScalableCodeClusterer (faiss kNN graph + sklearn's HDBSCAN tree).

    python benchmarks/bench_cluster.py                      # 100,000 codes of 3072 bits (goal <= 120 s on 2 cores)
    python benchmarks/bench_cluster.py --n 1000000          # goal <= 30 min
    python benchmarks/bench_cluster.py --data mlp --json out.json

Data (generated here, seeded):

* ``planted`` (default): ``--clusters`` random prototype codes; each row is a prototype with a per-cluster flip rate
  drawn from U(2 %, 16 %) of its bits flipped, plus ``--noise`` (5 %) uniformly random rows, whose truth is NOISE.
* ``mlp``: spline codes of a random ReLU MLP (64 -> 1024 -> 1024 -> 1024, He init) on a mixture of ``--clusters``
  Gaussians in 64-d (truth = mixture component).

Prints a markdown table: rows, bits, index, seconds (kNN graph included; data generation excluded), clusters, noise
fraction, ARI against the planted truth (noise rows form one cluster on both sides).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
from sklearn.metrics import adjusted_rand_score

from polytope_lens.cluster_scale import ScalableCodeClusterer


def planted(n: int, bits: int, n_clusters: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    protos = rng.random((n_clusters, bits)) < 0.5
    flip = rng.uniform(0.02, 0.16, n_clusters)
    y = rng.integers(0, n_clusters, n)
    out = np.empty((n, bits // 8), dtype=np.uint8)
    step = 50_000
    for s in range(0, n, step):
        yy = y[s:s + step]
        b = protos[yy] ^ (rng.random((len(yy), bits), dtype=np.float32) < flip[yy, None])
        out[s:s + step] = np.packbits(b, axis=1, bitorder="little")
    is_noise = rng.random(n) < noise
    out[is_noise] = rng.integers(0, 256, (int(is_noise.sum()), bits // 8), dtype=np.uint8)
    y[is_noise] = -1
    return out, y


def mlp_codes(n: int, bits: int, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    g = torch.Generator().manual_seed(seed)
    width = bits // 3
    ws = [torch.randn(64, width, generator=g) * (2 / 64) ** 0.5] + \
         [torch.randn(width, width, generator=g) * (2 / width) ** 0.5 for _ in range(2)]
    centres = torch.randn(n_clusters, 64, generator=g) * 2
    y = torch.randint(0, n_clusters, (n,), generator=g)
    out = np.empty((n, bits // 8), dtype=np.uint8)
    for s in range(0, n, 20_000):
        h = centres[y[s:s + 20_000]] + torch.randn(len(y[s:s + 20_000]), 64, generator=g)
        parts = []
        for w in ws:
            z = h @ w
            parts.append(z > 0)
            h = torch.relu(z)
        out[s:s + 20_000] = np.packbits(torch.cat(parts, 1).numpy(), axis=1, bitorder="little")
    return out, y.numpy()


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100_000])
    p.add_argument("--bits", type=int, default=3072)
    p.add_argument("--data", choices=["planted", "mlp"], default="planted")
    p.add_argument("--clusters", type=int, default=50)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--min-cluster-size", type=int, default=100)
    p.add_argument("--min-samples", type=int, default=10)
    p.add_argument("--n-neighbors", type=int, default=None)
    p.add_argument("--index", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    results = []
    for n in args.n:
        t0 = time.perf_counter()
        if args.data == "planted":
            X, y = planted(n, args.bits, args.clusters, args.noise, args.seed)
        else:
            X, y = mlp_codes(n, args.bits, args.clusters, args.seed)
        t_gen = time.perf_counter() - t0
        stages: dict[str, float] = {}
        t0 = time.perf_counter()

        def progress(stage, done, total):
            stages[stage] = time.perf_counter() - t0

        est = ScalableCodeClusterer(min_cluster_size=args.min_cluster_size, min_samples=args.min_samples,
                                    n_neighbors=args.n_neighbors, index=args.index).fit(X, progress=progress)
        seconds = time.perf_counter() - t0
        results.append({"n": n, "bits": args.bits, "data": args.data, "index": "flat" if est.knn_exact_ else "hnsw",
                        "seconds": round(seconds, 1), "knn_seconds": round(stages.get("knn", 0.0), 1),
                        "generate_seconds": round(t_gen, 1), "clusters": est.n_clusters_,
                        "noise_fraction": round(est.noise_fraction_, 4), "components": est.n_components_,
                        "ari": round(float(adjusted_rand_score(y, est.labels_)), 4)})
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{platform.processor() or platform.machine()}, Python {platform.python_version()}\n")
    print("| n | bits | data | index | seconds (kNN) | clusters | noise fraction | ARI vs truth |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['n']:,} | {r['bits']} | {r['data']} | {r['index']} | {r['seconds']} ({r['knn_seconds']}) | "
              f"{r['clusters']} | {r['noise_fraction']:.3f} | {r['ari']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
