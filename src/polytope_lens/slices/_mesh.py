"""Convex cells with shared vertices, and the one cutting primitive the partition uses.

Invariant
---------
Every cell is a convex polygon, stored as a ring of vertex ids (counter-clockwise, padded), and every vertex carries
``vals``: the values of the functions being cut (the unit inputs of the site being processed). Over each cell those
functions are affine, so along every edge a unit's input moves affinely from one end's value to the other's: the
kink positions on an edge are exactly what ``Activation.crossings(z_p, z_q)`` returns, and ``vals`` at a new vertex
is the linear interpolation of the edge's ends at that t (exact up to rounding).

``cut`` splits cells by the kink lines of one function per cell (a unit input, or the difference of two window
entries for max pooling). All cells cut by the same line in one call share the new vertex on a shared edge (vertices
are deduplicated by (edge, line)), so no T-junctions are created and two cells are neighbours exactly when they share
an edge (a pair of vertex ids).

Ties
----
Values within ``tol`` of a kink are snapped onto it before anything is decided. A snapped vertex lies on the kink and
belongs to the closures of the pieces on both sides, so a line through an existing vertex adds no vertex there, and
a unit that only touches its kink on a cell (or lies on it everywhere) does not cut it. A child is kept only when
its piece has interior in the cell (some entry above its lower kink and some below its upper one), so no zero-area
cells are made.

Cost
----
O(cells cut x ring width) per call plus O(new vertices x value columns) for the interpolation; no per-cell Python.
"""

from __future__ import annotations

import torch

from ..kinks import Activation


def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` for row indices ``idx`` of any shape, via ``index_select`` (advanced row indexing of 2-D tensors
    is orders of magnitude slower on multi-threaded CPU torch)."""
    return t.index_select(0, idx.reshape(-1)).reshape(*idx.shape, *t.shape[1:])


def grown(capacity: int, rows: int) -> int:
    """Rows a buffer of ``capacity`` rows has once it holds ``rows`` (``grow`` doubles)."""
    return capacity if rows <= capacity else max(rows, 2 * capacity, 16)


def grow(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with at least ``rows`` rows (doubling), old rows kept."""
    if rows <= t.shape[0]:
        return t
    new = t.new_zeros((grown(t.shape[0], rows), *t.shape[1:]))
    new[: t.shape[0]] = t
    return new


class Mesh:
    """Growable vertex and cell buffers. ``vals`` columns are replaced at each site (``set_vals``)."""

    def __init__(self, coords: torch.Tensor, ring: torch.Tensor, deg: torch.Tensor):
        self.coords = coords.clone()
        self.nv = len(coords)
        self.vals = coords.new_zeros((self.nv, 0))
        self.ring = ring.clone()
        self.deg = deg.clone()
        self.nc = len(ring)
        self.rows: list[torch.Tensor] = []  # per-cell payloads copied from parent to children (cand, codes)
        self.leaves: dict[str, torch.Tensor] = {}  # per-vertex outputs of earlier sites (affine route)

    # --------------------------------------------------------------------------------------------- vertices
    def set_vals(self, vals: torch.Tensor) -> None:
        self.vals = vals
        self.coords = self.coords[: self.nv].clone()

    def add_lerp(self, *stages, vals: bool = True) -> list[torch.Tensor]:
        """New vertices at ``a + t (b - a)`` for each stage ``(a, b, t)`` of vertex ids and fractions, in order (a
        stage may use the vertices of earlier ones): coordinates, ``vals`` (unless ``vals=False``: then stale until
        the next ``set_vals``) and every stored ``leaves`` array are interpolated, exact because all of them are
        affine along such a segment. Buffers grow once per call. Returns the new ids of each stage."""
        n = sum(len(a) for a, _, _ in stages)
        dev = self.coords.device

        def put(arr):
            arr = grow(arr, self.nv + n)
            at = self.nv
            for a, b, t in stages:
                step = max(1, (64 << 20) // max(1, arr[0].numel() * arr.element_size()))  # bounded temporaries
                for s in range(0, len(a), step):
                    x, y = take(arr, a[s:s + step]), take(arr, b[s:s + step])
                    arr[at + s: at + s + len(x)] = y.sub_(x).mul_(t[s:s + step, None].to(x.dtype)).add_(x)
                at += len(a)
            return arr
        self.coords = put(self.coords)
        if vals:
            self.vals = put(self.vals)
        self.leaves = {k: put(v) for k, v in self.leaves.items()}
        ids, at = [], self.nv
        for a, _, _ in stages:
            ids.append(torch.arange(at, at + len(a), device=dev))
            at += len(a)
        self.nv = at
        return ids

    # ------------------------------------------------------------------------------------------------ cells
    def cells(self, idx: torch.Tensor | None = None):
        if idx is None:
            return self.ring[: self.nc], self.deg[: self.nc]
        return take(self.ring, idx), self.deg[idx]

    def replace_cells(self, parent: torch.Tensor, rings: torch.Tensor, deg: torch.Tensor, first: torch.Tensor):
        """Children ``rings`` (m, W) of cells ``parent`` (m,): those with ``first`` take the parent's slot, the
        others are appended; payload rows are copied from the parent."""
        w = rings.shape[1]
        if w > self.ring.shape[1]:
            pad = self.ring.new_zeros((self.ring.shape[0], w - self.ring.shape[1]))
            self.ring = torch.cat([self.ring, pad], 1)
        elif w < self.ring.shape[1]:
            rings = torch.cat([rings, rings.new_zeros((len(rings), self.ring.shape[1] - w))], 1)
        slot = parent.clone()
        extra = ~first
        m = int(extra.sum())
        slot[extra] = torch.arange(self.nc, self.nc + m, device=parent.device)
        if m:
            need = self.nc + m
            self.ring = grow(self.ring, need)
            self.deg = grow(self.deg, need)
            self.rows = [grow(r, need) for r in self.rows]
            src = parent[extra]
            for r in self.rows:
                r[self.nc: need] = take(r, src)
        self.ring.index_copy_(0, slot, rings)
        self.deg[slot] = deg
        self.nc += m
        return slot


def snap(g: torch.Tensor, kinks: torch.Tensor, tol: float) -> torch.Tensor:
    for k in kinks.tolist():
        g = torch.where((g - k).abs() <= tol, torch.full_like(g, k), g)
    return g


def piece_range(act: Activation, g: torch.Tensor, kinks: torch.Tensor):
    """(lo, hi): the pieces whose closure holds each (snapped) value; lo == hi strictly inside a piece."""
    lo = act.pieces(g)
    hi = lo + (g[..., None] == kinks).any(-1)
    return lo, hi


def cut_mask(act: Activation, g: torch.Tensor, deg: torch.Tensor, kinks: torch.Tensor) -> torch.Tensor:
    """Cells (rows of snapped ring values ``g``) that a kink of ``act`` crosses in their interior."""
    lo, hi = piece_range(act, g, kinks)
    valid = torch.arange(g.shape[1], device=g.device)[None] < deg[:, None]
    big = act.n_pieces + 1
    return torch.where(valid, lo, -1).amax(1) > torch.where(valid, hi, big).amin(1)


def cut(mesh: Mesh, act: Activation, kinks: torch.Tensor, R: torch.Tensor, dg: torch.Tensor, g: torch.Tensor,
        line: torch.Tensor, n_lines: int):
    """Split cells (rings ``R`` (n, W), ``dg``) by the kinks of ``act`` applied to one affine function per cell.

    ``g`` (n, W) holds that function's snapped values at the ring vertices; ``line`` (n,) identifies the function
    (cells cut by the same line share new vertices on shared edges). Returns the augmented rings (n, Wa) with the
    new vertices inserted in order, and (lo, hi) piece ranges per entry (-1 / n_pieces past the end).
    """
    n, W = R.shape
    dev = R.device
    ar = torch.arange(W, device=dev)
    valid = ar[None] < dg[:, None]
    lo, hi = piece_range(act, g, kinks)
    nxt = torch.where(ar[None] + 1 < dg[:, None], ar[None] + 1, torch.zeros_like(ar[None]))
    q = R.gather(1, nxt)
    lo_q, hi_q, g_q = lo.gather(1, nxt), hi.gather(1, nxt), g.gather(1, nxt)
    crossing = valid & (torch.maximum(lo, lo_q) > torch.minimum(hi, hi_q))
    ci, ei = torch.nonzero(crossing, as_tuple=True)
    p_, q_ = R[ci, ei], q[ci, ei]
    rev = p_ > q_
    a, b = torch.minimum(p_, q_), torch.maximum(p_, q_)
    ga = torch.where(rev, g_q[ci, ei], g[ci, ei])
    gb = torch.where(rev, g[ci, ei], g_q[ci, ei])
    key = (a * mesh.nv + b) * n_lines + line[ci]
    ukey, inv = torch.unique(key, return_inverse=True)
    U = len(ukey)
    first = torch.full((U,), len(key), dtype=torch.long, device=dev).scatter_reduce(
        0, inv, torch.arange(len(key), device=dev), "amin")
    ua, ub, uga, ugb = a[first], b[first], ga[first], gb[first]
    cr = act.crossings(uga[:, None], ugb[:, None])
    inside = (cr.t > 0) & (cr.t < 1)
    seg, t, piece = cr.segment[inside], cr.t[inside], cr.piece[inside]
    # the new vertex sits on kink k: moving up it enters piece k + 1, moving down piece k
    up = ugb[seg] > uga[seg]
    kidx = torch.where(up, piece - 1, piece)
    ids, = mesh.add_lerp((ua[seg], ub[seg], t))
    cnt_u = torch.bincount(seg, minlength=U)
    start_u = torch.cumsum(cnt_u, 0) - cnt_u
    c_e = torch.zeros((n, W), dtype=torch.long, device=dev)
    c_e[ci, ei] = cnt_u[inv]
    sizes = valid.long() * (1 + c_e)
    off = torch.cumsum(sizes, 1) - sizes
    Wa = int(sizes.sum(1).max()) if n else 0
    big = act.n_pieces + 1
    ring = torch.zeros((n, Wa), dtype=torch.long, device=dev)
    alo = torch.full((n, Wa), big, dtype=torch.long, device=dev)
    ahi = torch.full((n, Wa), -1, dtype=torch.long, device=dev)
    vr, vc = torch.nonzero(valid, as_tuple=True)
    pos = off[vr, vc]
    ring[vr, pos] = R[vr, vc]
    alo[vr, pos] = lo[vr, vc]
    ahi[vr, pos] = hi[vr, vc]
    # crossing entries: occurrence o (cell-edge) holds the crossings of its unique edge, in travel order
    occ_cnt = cnt_u[inv]
    for rank in range(len(kinks)):
        occ = torch.nonzero(occ_cnt > rank).flatten()
        if not len(occ):
            break
        src = start_u[inv[occ]] + torch.where(rev[occ], occ_cnt[occ] - 1 - rank, rank)
        r_, c_ = ci[occ], ei[occ]
        p2 = off[r_, c_] + 1 + rank
        ring[r_, p2] = ids[src]
        alo[r_, p2] = kidx[src]
        ahi[r_, p2] = kidx[src] + 1
    return ring, alo, ahi


def band(ring: torch.Tensor, alo: torch.Tensor, ahi: torch.Tensor, b: int):
    """The child of every cell in piece ``b``: (rings, deg, has_interior)."""
    member = (alo <= b) & (ahi >= b)
    # piece b has interior in the (convex) cell iff some entry lies above its lower kink and some below its upper
    # one (a cell spanning both kinks of a ReLU6 unit has a middle band with no vertex strictly inside it)
    valid = ahi >= 0
    interior = (torch.where(valid, alo, torch.full_like(alo, -1)).amax(1) >= b) & \
        (torch.where(valid, ahi, torch.full_like(ahi, 1 << 30)).amin(1) <= b)
    deg = member.sum(1)
    pos = torch.cumsum(member, 1) - 1
    out = torch.zeros_like(ring)
    r, c = torch.nonzero(member, as_tuple=True)
    out[r, pos[r, c]] = ring[r, c]
    w = int(deg.max()) if len(deg) else 0
    return out[:, :w], deg, interior & (deg >= 3)
