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
