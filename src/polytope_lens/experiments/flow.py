"""Representational flow: the sequence of regions each path visits, per layer, and a transition summary.

``region_flow(batch)`` walks the crossing ``records`` of every path of a ``PathBatchResult``: per site, each crossing
moves the path into a new region of that site (the unit's piece changes). A region is the state "unit -> piece for
every unit that has changed since the path's start", combined with the path's start point, so regions are comparable
within a path only, and a unit back on its start piece still counts as changed (a region left and re-entered counts
twice); ``start_codes`` (site -> (P, n_units) piece arrays at t = 0, e.g. ``spline_codes(...)[site].pieces()``)
makes the state the whole code, comparable across paths. Each site's ``region`` says which it was.

States are named by a 64-bit hash kept up to date in O(1) per crossing (the XOR of a mixed 64-bit key per (unit,
piece) entry: a change of unit u from piece a to b XORs key(u, a) and key(u, b)), so a path with tens of thousands of
crossings costs vectorised passes instead of re-hashing the whole state at every crossing.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

__all__ = ["region_flow"]


def _key(unit: np.ndarray, piece: np.ndarray) -> np.ndarray:
    """A well-spread 64-bit key per (unit, piece) (the splitmix64 finaliser)."""
    x = (unit.astype(np.uint64) << np.uint64(16)) + (piece.astype(np.int64) + 1).astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _state_hashes(units: np.ndarray, pieces: np.ndarray, start: np.ndarray | None, base: int) -> np.ndarray:
    """Hash of the state before the first crossing and after each one, (n + 1,) uint64."""
    n = len(units)
    order = np.lexsort((np.arange(n), units))  # by unit, then in path order
    su, sp = units[order], pieces[order]
    again = np.zeros(n, dtype=bool)
    again[1:] = su[1:] == su[:-1]
    prev = np.full(n, -1, dtype=np.int64)  # the unit's piece before this change; -1: not changed yet on this path
    prev[order[again]] = sp[np.flatnonzero(again) - 1]
    new_key = _key(units, pieces)
    if start is not None:
        old_key = _key(units, np.where(prev >= 0, prev, start[units]))
        h0 = np.bitwise_xor.reduce(_key(np.arange(len(start)), start)) if len(start) else np.uint64(0)
    else:
        old_key = np.where(prev >= 0, _key(units, prev), np.uint64(0))
        h0 = np.uint64(base)
    out = np.empty(n + 1, dtype=np.uint64)
    out[0] = h0
    if n:
        out[1:] = h0 ^ np.bitwise_xor.accumulate(old_key ^ new_key)
    return out


def _name(h) -> str:
    return f"{int(h):016x}"


def region_flow(batch, *, start_codes: dict | None = None, top_k: int = 5) -> dict:
    """Per site: regions per path (mean, max), distinct regions over all paths, the most frequent region->region
    transitions (by region hash) and, for path 0, the region sequence with its t positions. A path whose crossings
    name units beyond its ``start_codes`` row is tracked from its own start instead."""
    out = {}
    with np.errstate(over="ignore"):
        for s_i, site in enumerate(batch.sites):
            n_regions, distinct, trans, example, whole = [], set(), Counter(), None, 0
            for p_i, p in enumerate(batch.paths):
                m = p.records["site"] == s_i
                ts, units = p.records["t"][m], p.records["unit"][m].astype(np.int64)
                pieces = p.records["piece"][m].astype(np.int64)
                start = None
                if start_codes is not None and site in start_codes:
                    start = np.asarray(start_codes[site][p_i], dtype=np.int64).ravel()
                    if len(units) and units.max() >= len(start):
                        start = None
                whole += start is not None
                base = int(_key(np.array([p_i + 1]), np.array([-2]))[0])  # the path's own start
                seq = _state_hashes(units, pieces, start, base)
                n_regions.append(len(np.unique(seq)))
                distinct.update(seq.tolist())
                trans.update(zip(seq[:-1].tolist(), seq[1:].tolist()))
                if p_i == 0:
                    example = {"regions": [_name(h) for h in seq[:200]], "t": [0.0] + [float(t) for t in ts[:199]],
                               "truncated": len(seq) > 200}
            out[site] = {"region": "code" if whole == len(batch.paths) else
                         "changed units" if not whole else "mixed",  # what a region is here (see the module)
                         "regions_per_path_mean": float(np.mean(n_regions)) if n_regions else 0.0,
                         "regions_per_path_max": int(max(n_regions)) if n_regions else 0,
                         "distinct_regions": len(distinct),
                         "top_transitions": [{"from": _name(a), "to": _name(b), "count": c}
                                             for (a, b), c in trans.most_common(top_k)],
                         "revisits": int(sum(c for c in trans.values() if c > 1)),
                         "example": example}
    return out
