"""Neighbouring regions of an exact slice: which units differ across each shared edge, and by how much the maps do.

Invariant relied on: the partition shares vertices between cells cut in the same round (``_mesh.cut``), so two
regions are neighbours exactly when their rings contain the same edge (unordered pair of vertex ids), once vertices at
the same point are taken as one (max pooling clips a cell's argmax regions as separate copies with their own
vertices). Across an edge the codes differ in the units whose kink the edge lies on (the paper: neighbours usually
differ by one unit, so their affine maps differ by one row of one layer's map).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._mesh import take

__all__ = ["Neighbours", "neighbours", "same_points", "shared_edges"]


def same_points(xy: torch.Tensor, tol: float | None = None) -> torch.Tensor:
    """A label per point (n, 2): points within ``tol`` of each other in both coordinates get the same label
    (transitively); points farther apart than ``2 tol`` in some coordinate never do through one pair. Four grids of
    cell ``2 tol``, offset by half a cell in x and y, put every such close pair in one shared cell; labels are the
    smallest index over shared cells, propagated until stable. ``tol`` defaults to 1e-9 of the coordinates' scale
    (``max(1, max |xy|)``): one point computed along different routes (the copies of a max-pool clip)."""
    labels = torch.arange(len(xy), device=xy.device)
    if len(xy) < 2:
        return labels
    xy = xy.to(torch.float64)
    if tol is None:
        tol = 1e-9 * max(1.0, float(xy.abs().max()))
    groups = []
    for ox in (0.0, tol):
        for oy in (0.0, tol):
            cell = torch.floor((xy + xy.new_tensor([ox, oy])) / (2 * tol)).long()
            cell -= cell.min(0).values
            span = cell.max(0).values + 1
            if float(span[0]) * float(span[1]) < 2.0 ** 62:  # one int64 key per cell: a 1-D unique is far faster
                groups.append(torch.unique(cell[:, 0] * span[1] + cell[:, 1], return_inverse=True)[1])
            else:
                groups.append(torch.unique(cell, dim=0, return_inverse=True)[1])
    while True:
        old = labels
        for gid in groups:
            low = torch.full((int(gid.max()) + 1,), len(xy), dtype=labels.dtype, device=xy.device)
            labels = low.scatter_reduce_(0, gid, labels, "amin")[gid]
        if torch.equal(labels, old):
            return labels


def shared_edges(res, *, coords: torch.Tensor | None = None, ring: torch.Tensor | None = None,
                 deg: torch.Tensor | None = None, tol: float | None = None):
    """(region_a, region_b, vertex_p, vertex_q) for every edge shared by two regions (a border made of several ring
    edges gives several rows for one pair); of a ``SliceResult`` ``res``, or of the cells ``coords``/``ring``/``deg``
    (``res=None``: the decision boundary's argmax pieces).

    Vertices at the same point are one (``same_points``, within ``tol``, default 1e-9 of the slice's coordinate
    scale): cells cut in one round share their vertices, but the argmax regions of a max-pooling window are clipped
    as separate copies of a cell, each with its own vertices along the borders they share."""
    if res is not None:
        coords, ring, deg = res.coords, res.ring, res.deg
    R, dg = ring, deg
    W = R.shape[1]
    dev = R.device
    ar = torch.arange(W, device=dev)
    valid = ar[None] < dg[:, None]
    nxt = torch.where(ar[None] + 1 < dg[:, None], ar[None] + 1, torch.zeros_like(ar[None]))
    lab = same_points(coords, tol)
    p, q = R, R.gather(1, nxt)
    lp, lq = lab[p], lab[q]
    keep = valid & (lp != lq)
    cell = torch.arange(len(R), device=dev)[:, None].expand_as(R)
    a, b = torch.minimum(lp, lq)[keep], torch.maximum(lp, lq)[keep]
    c, pv, qv = cell[keep], p[keep], q[keep]
    nv = len(coords)
    key = a * nv + b
    order = torch.argsort(key, stable=True)
    key, c, pv, qv = key[order], c[order], pv[order], qv[order]
    same = torch.nonzero((key[1:] == key[:-1]) & (c[1:] != c[:-1])).flatten()
    return c[same], c[same + 1], pv[same], qv[same]


@dataclass(frozen=True)
class Neighbours:
    """Adjacent region pairs, each once.

    Attributes
    ----------
    a, b : ndarray (E,)
        Region indices (a < b not guaranteed).
    edge : ndarray (E, 2, 2)
        Endpoints (slice coordinates) of one edge of the pair's shared border.
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
    """All adjacent pairs of ``res`` (a ``SliceResult``), each once, with one edge of their border, the units that
    differ and the map distance."""
    ra, rb, p, q = shared_edges(res)
    pair = torch.minimum(ra, rb) * max(1, res.num_regions) + torch.maximum(ra, rb)
    first = torch.as_tensor(np.sort(np.unique(pair.numpy(), return_index=True)[1]), dtype=torch.long)
    ra, rb, p, q = ra[first], rb[first], p[first], q[first]
    units, counts = [], np.zeros(len(ra), dtype=np.int64)
    per_site = []
    for s in res.sites:
        pa, pb = res.pieces(s)[ra.numpy()], res.pieces(s)[rb.numpy()]
        ids = res.site_info[s].get("unit_ids")  # under units=, column c is the model's unit ids[c]
        per_site.append((s, pa != pb, None if ids is None else np.asarray(ids)))
    for i in range(len(ra)):
        lst = []
        for s, diff, ids in per_site:
            cols = np.nonzero(diff[i])[0]
            lst.extend((s, int(u)) for u in (cols if ids is None else ids[cols]))
        units.append(lst)
        counts[i] = len(lst)
    dist = None
    if res.slope is not None:
        ma = torch.cat([res.slope[ra], res.offset[ra][:, None]], 1)
        mb = torch.cat([res.slope[rb], res.offset[rb][:, None]], 1)
        dist = (ma - mb).flatten(1).norm(dim=1).cpu().numpy()
    edge = torch.stack([take(res.coords, p), take(res.coords, q)], 1).cpu().numpy()
    return Neighbours(ra.numpy(), rb.numpy(), edge, counts, units, dist)
