"""Representational flow: region counts and transitions against a brute-force walk over explicit code states."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from polytope_lens.experiments.flow import region_flow


def _batch(seed: int, n_paths: int = 4, n_units: int = 6, n_cross: int = 60):
    rng = np.random.default_rng(seed)
    paths = []
    for _ in range(n_paths):
        k = rng.integers(0, n_cross)
        site = rng.integers(0, 2, k)
        paths.append(SimpleNamespace(records={"site": site, "unit": rng.integers(0, n_units, k),
                                              "piece": rng.integers(0, 3, k), "t": np.sort(rng.random(k))}))
    return SimpleNamespace(sites=("a", "b"), paths=paths)


def _oracle(batch, start_codes=None):
    """Walk every crossing with the state written out: a dict of changed units, or the whole code row."""
    out = {}
    for s_i, site in enumerate(batch.sites):
        n_regions, distinct, trans, example = [], set(), Counter(), None
        for p_i, p in enumerate(batch.paths):
            m = p.records["site"] == s_i
            if start_codes is not None:
                state = list(start_codes[site][p_i])
                key = lambda: ("code", tuple(state))  # noqa: E731
            else:
                state = {}
                key = lambda: (p_i, tuple(sorted(state.items())))  # noqa: E731
            seq = [key()]
            for u, pc in zip(p.records["unit"][m], p.records["piece"][m]):
                state[int(u)] = int(pc)
                seq.append(key())
            n_regions.append(len(set(seq)))
            distinct.update(seq)
            trans.update(zip(seq[:-1], seq[1:]))
            if p_i == 0:
                example = seq
        out[site] = {"mean": float(np.mean(n_regions)), "max": max(n_regions), "distinct": len(distinct),
                     "revisits": sum(c for c in trans.values() if c > 1),
                     "top": sorted(trans.values(), reverse=True)[:5], "example": example}
    return out


@pytest.mark.parametrize("with_start", [False, True])
def test_region_flow_matches_a_brute_force_walk(with_start):
    batch = _batch(0)
    start = ({s: np.random.default_rng(1).integers(0, 3, (4, 6)) for s in batch.sites} if with_start else None)
    got, want = region_flow(batch, start_codes=start), _oracle(batch, start)
    for site in batch.sites:
        g, w = got[site], want[site]
        assert g["regions_per_path_mean"] == pytest.approx(w["mean"]) and g["regions_per_path_max"] == w["max"]
        assert g["distinct_regions"] == w["distinct"] and g["revisits"] == w["revisits"]
        assert [t["count"] for t in g["top_transitions"]] == w["top"]
        # equal names exactly where the states are equal
        names, states = g["example"]["regions"], w["example"][:200]
        assert len({(n, s) for n, s in zip(names, states)}) == len(set(names)) == len(set(states))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_flow_from_start_codes_counts_the_regions_a_dense_walk_visits(kind):
    """Exact paths through a ReLU MLP (some layer-2 units flip and flip back) and a CNN with max pooling: with the
    start codes that prediction 2 keeps (``_start_codes``), regions per path, distinct regions over all paths and
    revisited transitions equal those of a dense walk of spline codes along each path (the walk fine enough to see
    every crossing). Without start codes a region re-entered counted again (12.15 regions per path against 11.8)."""
    import torch
    from torch import nn

    from polytope_lens.codes import spline_codes
    from polytope_lens.experiments.prediction2 import _start_codes
    from polytope_lens.paths import path_crossings

    torch.manual_seed(3)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
        a, b = torch.randn(20, 2) * 3, torch.randn(20, 2) * 3
    else:
        net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 4), nn.ReLU())
        a, b = torch.randn(6, 1, 6, 6), torch.randn(6, 1, 6, 6)
    net = net.double()
    a, b = a.double(), b.double()
    res = path_crossings(net, a, b, trace=False)
    flow = region_flow(res, start_codes=_start_codes(net, a, res.sites))
    ts = torch.linspace(0, 1, 4001, dtype=torch.float64)
    for site in res.sites:
        per_path, distinct, trans = [], set(), Counter()
        for p in range(len(a)):
            pts = a[p][None] + ts.view(-1, *[1] * (a.dim() - 1)) * (b[p] - a[p])[None]
            rows = [r.tobytes() for r in spline_codes(net, pts, layers=[site])[site].pieces()]
            seq = [r for i, r in enumerate(rows) if i == 0 or r != rows[i - 1]]
            s_i = res.sites.index(site)
            assert len(seq) - 1 == int((res.paths[p].records["site"] == s_i).sum())  # every crossing seen (no ties)
            per_path.append(len(set(seq)))
            distinct.update(seq)
            trans.update(zip(seq[:-1], seq[1:]))
        got = flow[site]
        assert got["region"] == "code"
        assert got["regions_per_path_mean"] == pytest.approx(np.mean(per_path))
        assert got["distinct_regions"] == len(distinct)
        assert got["revisits"] == sum(c for c in trans.values() if c > 1)
    if kind == "mlp":  # the case the start codes fix: a region left and re-entered
        last = res.sites[-1]
        assert region_flow(res)[last]["regions_per_path_mean"] > flow[last]["regions_per_path_mean"]
