"""Neighbouring regions of an exact slice: which units differ across each shared edge, and by how much the maps do.

Invariant relied on: the partition shares vertices between cells cut in the same round (``_mesh.cut``), so two
regions are neighbours exactly when their rings contain the same edge (unordered pair of vertex ids). Across an edge
the codes differ in the units whose kink the edge lies on (the paper: neighbours usually differ by one unit, so their
affine maps differ by one row of one layer's map). Limitation: inside a max-pooling round, argmax regions meeting at an
interior triple point may hold separate copies of that vertex, so a few max-pool neighbour pairs can be missed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._mesh import take

__all__ = ["Neighbours", "neighbours", "shared_edges"]


def shared_edges(res) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(region_a, region_b, vertex_p, vertex_q) for every edge shared by two regions."""
    R, dg = res.ring, res.deg
    W = R.shape[1]
    ar = torch.arange(W)
    valid = ar[None] < dg[:, None]
    nxt = torch.where(ar[None] + 1 < dg[:, None], ar[None] + 1, torch.zeros_like(ar[None]))
    p, q = R, R.gather(1, nxt)
    cell = torch.arange(len(R))[:, None].expand_as(R)
    a, b, c = torch.minimum(p, q)[valid], torch.maximum(p, q)[valid], cell[valid]
    nv = len(res.coords)
    key = a * nv + b
    order = torch.argsort(key, stable=True)
    key, c, a, b = key[order], c[order], a[order], b[order]
    same = torch.nonzero(key[1:] == key[:-1]).flatten()
    return c[same], c[same + 1], a[same], b[same]


@dataclass(frozen=True)
class Neighbours:
    """Adjacent region pairs.

    Attributes
    ----------
    a, b : ndarray (E,)
        Region indices (a < b not guaranteed).
    edge : ndarray (E, 2, 2)
        The shared edge's endpoints in slice coordinates.
    n_units : ndarray (E,)
        Number of units (over all sites) whose piece differs between the two regions.
    units : list of list of (site, unit)
    map_distance : ndarray (E,) or None
        Frobenius norm of the difference of the two regions' output maps ([slope; offset], 3 x out).
    """

    a: np.ndarray
    b: np.ndarray
    edge: np.ndarray
    n_units: np.ndarray
    units: list
    map_distance: np.ndarray | None

    def to_dict(self) -> dict:
        hist = np.bincount(self.n_units) if len(self.n_units) else np.zeros(0, int)
        return {"pairs": int(len(self.a)), "units_differing_histogram": hist.tolist(),
                "fraction_one_unit": float((self.n_units == 1).mean()) if len(self.n_units) else None,
                "map_distance_mean": None if self.map_distance is None or not len(self.map_distance)
                else float(self.map_distance.mean())}


def neighbours(res) -> Neighbours:
    """All adjacent pairs of ``res`` (a ``SliceResult``), the units that differ and the map distance."""
    ra, rb, p, q = shared_edges(res)
    units, counts = [], np.zeros(len(ra), dtype=np.int64)
    per_site = []
    for s in res.sites:
        pa, pb = res.pieces(s)[ra.numpy()], res.pieces(s)[rb.numpy()]
        per_site.append((s, pa != pb))
    for i in range(len(ra)):
        lst = []
        for s, diff in per_site:
            lst.extend((s, int(u)) for u in np.nonzero(diff[i])[0])
        units.append(lst)
        counts[i] = len(lst)
    dist = None
    if res.slope is not None:
        ma = torch.cat([res.slope[ra], res.offset[ra][:, None]], 1)
        mb = torch.cat([res.slope[rb], res.offset[rb][:, None]], 1)
        dist = (ma - mb).flatten(1).norm(dim=1).cpu().numpy()
    edge = torch.stack([take(res.coords, p), take(res.coords, q)], 1).cpu().numpy()
    return Neighbours(ra.numpy(), rb.numpy(), edge, counts, units, dist)
