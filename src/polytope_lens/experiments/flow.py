"""Representational flow: the sequence of regions each path visits, per layer, and a transition summary.

``region_flow(batch)`` walks the crossing ``records`` of every path of a ``PathBatchResult``: per site, each crossing
moves the path into a new region of that site (the unit's piece changes). A region is named by a short hash of the
set of (unit, piece) changes since the path's start combined with the path's start point, so regions are
comparable within a path; ``start_codes`` (site -> (P, n_units) piece arrays at t = 0, e.g. from
``codes.spline_codes(...).layers[site].pieces``) makes them comparable across paths.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

__all__ = ["region_flow"]


def _h(b: bytes) -> str:
    return hashlib.blake2b(b, digest_size=4).hexdigest()


def region_flow(batch, *, start_codes: dict | None = None, top_k: int = 5) -> dict:
    """Per site: regions per path (mean, max), distinct regions over all paths, the most frequent region->region
    transitions (by region hash) and, for path 0, the region sequence with its t positions."""
    out = {}
    for s_i, site in enumerate(batch.sites):
        n_regions, distinct, trans, example = [], set(), Counter(), None
        for p_i, p in enumerate(batch.paths):
            m = p.records["site"] == s_i
            ts, units, pieces = p.records["t"][m], p.records["unit"][m], p.records["piece"][m]
            if start_codes is not None and site in start_codes:
                state = np.array(start_codes[site][p_i], dtype=np.int64).ravel().copy()
                base = b""
            else:
                state, base = {}, f"path{p_i}".encode()
            cur = _h(base + (state.tobytes() if isinstance(state, np.ndarray) else b""))
            seq, seq_t = [cur], [0.0]
            for t, u, pc in zip(ts, units, pieces):
                if isinstance(state, np.ndarray) and u < len(state):
                    state[u] = pc
                    nxt = _h(state.tobytes())
                else:
                    if isinstance(state, np.ndarray):
                        state = {}
                    state[int(u)] = int(pc)
                    nxt = _h(base + repr(sorted(state.items())).encode())
                trans[(cur, nxt)] += 1
                cur = nxt
                seq.append(cur)
                seq_t.append(float(t))
            n_regions.append(len(set(seq)))
            distinct.update(seq)
            if p_i == 0:
                example = {"regions": seq[:200], "t": seq_t[:200], "truncated": len(seq) > 200}
        out[site] = {"regions_per_path_mean": float(np.mean(n_regions)) if n_regions else 0.0,
                     "regions_per_path_max": int(max(n_regions)) if n_regions else 0,
                     "distinct_regions": len(distinct),
                     "top_transitions": [{"from": a, "to": b, "count": c} for (a, b), c in trans.most_common(top_k)],
                     "revisits": int(sum(c for c in trans.values() if c > 1)),
                     "example": example}
    return out
