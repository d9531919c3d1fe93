"""All kink lines of one elementwise site cut every cell at once: the line arrangement inside each convex cell.

Why
---
Cutting unit by unit costs one vectorised round per unit (hundreds of small torch calls per site); here a site is
a fixed number of batched steps however many units it has, which is what makes 2-D slices of MLPs fast.

How (topology from ring order, geometry only for coordinates)
-------------------------------------------------------------
A line is one (kink k, unit u) pair, ``z_u = kinks[k]``, numbered ``k * units + u`` (the planar bit order of codes,
so for ordered activations a cell's sides of all lines are its code bits). Over a cell every unit input is affine, so
a line that crosses the cell's interior (some vertex strictly above it, some strictly below, after snapping values
within ``tol`` onto it) is a chord: it meets the ring at exactly two points, a vertex that lies on it or a point
inside an edge (a new vertex, interpolated on the edge in a canonical orientation so that the neighbour across that
edge computes the same one). A ring point has a *ring position* (vertex index, plus the edge fraction inside an
edge), and every topological decision compares ring positions or parameters along one chord, never a second
evaluation that could disagree with the first:

* two chords cross inside the cell iff their ends interleave around the ring;
* a boundary point's side of a chord is which of the chord's two arcs holds it (0 on the chord);
* the crossing of chords a < b is placed on chord a; its sides are those of a next to a's first end, flipped by
  every chord that crosses a before it (a prefix sum over a's crossings sorted by parameter).

Every vertex belongs to each face obtained by putting it on either side of every chord through it, so grouping
vertex incidences by (cell, side of every chord) gives the faces, ordered by angle around their centroid. Sides
enter the grouping as two independent random sums over the chords on the + side, about 40 bits of each compared
(two faces of one cell merge only if both collide). A new cell's side of each chord that cut its parent is read at
its vertex centroid (interior, by convexity); the other lines keep the parent's side.

Checks and ties
---------------
Each site is checked: the faces of every cut cell must tile it (areas within 1e-9 relative in float64, 1000 ulps in
float32, plus rounding of the coordinates' size). Ties are left to the unit-by-unit cut, which snaps values within
``tol`` onto kinks: where two lines cross one edge, or a third line passes a crossing, within ``tol`` (in value) of
each other, where a line meets a ring in other than two places, or where the work would not fit the memory budget,
``arrange`` raises ``Degenerate`` before touching the mesh and the caller cuts that site unit by unit. In the last
case it first counts what the cut is sure to make (chords, and pairs of chords whose ends interleave), so that the
caller can refuse a slice that cannot fit at once instead of after most of the work.
"""

from __future__ import annotations

import torch

from ..kinks import lexsort
from ..paths.runner import affine_tol
from ._mesh import Mesh, take
from .geometry import polygon_area


_BLOCK = 1 << 22  # (new cell, parent chord) pairs per block when reading sides


class Degenerate(Exception):
    """The cells' arrangement is not in the general position this module assumes (within ``tol``), or does not fit
    the memory budget. ``cells`` and ``vertices``: what cutting the cells is sure to add in the second case (a lower
    bound, ``_cut_size_at_least``), so that the caller can refuse a cut that cannot fit before starting it."""

    def __init__(self, why: str, cells: int = 0, vertices: int = 0):
        super().__init__(why)
        self.cells, self.vertices = cells, vertices


_SIZE_PAIRS = 1 << 26  # chord pairs tested when sizing a cut that does not fit (about a second)


def line_signs(vals: torch.Tensor, kinks: torch.Tensor, tol: float) -> torch.Tensor:
    """(vertices, kinks * units) int8: side of every line at every vertex, 0 within ``tol``."""
    out = torch.empty((len(vals), len(kinks), vals.shape[1]), dtype=torch.int8, device=vals.device)
    for j, k in enumerate(kinks.tolist()):
        torch.sub((vals > k + tol).to(torch.int8), (vals < k - tol).to(torch.int8), out=out[:, j])
    return out.reshape(len(vals), -1)


def _cross2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _side(p1, p2, above, x):
    """Side of chords (ends at ring positions p1 < p2, sign ``above`` on the arc between) at ring positions x."""
    inside = (x > p1) & (x < p2)
    on = (x == p1) | (x == p2)
    return torch.where(on, torch.zeros_like(above), torch.where(inside, above, -above))


def _segments(counts: torch.Tensor):
    """For groups of sizes ``counts``: (group of each item, rank of each item in its group, group starts)."""
    starts = torch.cumsum(counts, 0) - counts
    group = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    rank = torch.arange(len(group), device=counts.device) - starts[group]
    return group, rank, starts


def _cut_size_at_least(vals, kinks, tol: float, R, dg, ci, li, kc) -> tuple[int, int]:
    """(cells, vertices) that cutting each cell by its chords (``ci``, ``li``: cell and line of each, sorted by
    cell) adds at least: every chord adds one cell, and every two chords that cross inside their cell (their ends
    interleave around its ring) add one cell and one vertex; equal in general position. Crossings are counted among
    each cell's first ``m`` chords, ``m`` as large as ``_SIZE_PAIRS`` pair tests allow (all of them on small cuts).
    """
    dev = vals.device
    P, d = len(ci), vals.shape[1]
    if P == 0:
        return 0, 0
    W = R.shape[1]
    ar = torch.arange(W, device=dev)
    dgp = dg[ci]
    valid = ar[None] < dgp[:, None]
    h = vals[take(R, ci), (li % d)[:, None]] - kinks[li // d][:, None]  # (P, W) line value around the ring
    s = torch.where(h.abs() <= tol, 0, torch.sign(h)) * valid
    nxt = torch.where(ar[None] + 1 < dgp[:, None], ar[None] + 1, torch.zeros_like(ar[None]))
    prv = torch.where(ar[None] == 0, dgp[:, None] - 1, ar[None] - 1)
    h_n, s_n, s_p = h.gather(1, nxt), s.gather(1, nxt), s.gather(1, prv)
    edge = valid & (s * s_n < 0)
    vert = valid & (s == 0) & (s_p * s_n < 0)
    pos = torch.where(edge, ar[None] + h / (h - h_n), ar[None].to(h.dtype).expand_as(h))
    pos = torch.where(edge | vert, pos, torch.full_like(pos, float("inf"))).sort(1).values
    ok = (edge | vert).sum(1) == 2  # others (lines along an edge...) are left out of the crossing count
    p1, p2 = pos[:, 0], pos[:, 1]
    # the largest m with sum over cells of min(kc, m)^2 within the pair budget
    lo, hi = 1, int(kc.max())
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if int((kc.clamp(max=mid) ** 2).sum()) <= _SIZE_PAIRS else (lo, mid - 1)
    m = kc.clamp(max=lo)
    start = torch.cumsum(kc, 0) - kc
    cell_m, rank, _ = _segments(m)
    sel = start[cell_m] + rank  # each cell's first m chords
    mc = m[cell_m]
    first = torch.cumsum(m, 0) - m
    crossings = 0
    step = max(1, (1 << 22) // max(1, int(m.max())))
    for a0 in range(0, len(sel), step):
        a = torch.arange(a0, min(a0 + step, len(sel)), device=dev)
        pa, j, _ = _segments(mc[a])
        ia, ib = sel[a[pa]], sel[first[cell_m[a[pa]]] + j]
        a1, a2, b1, b2 = p1[ia], p2[ia], p1[ib], p2[ib]
        meet = ((a1 < b1) & (b1 < a2) & (a2 < b2)) | ((b1 < a1) & (a1 < b2) & (b2 < a2))
        crossings += int((meet & ok[ia] & ok[ib]).sum())
    crossings //= 2  # each pair was tested both ways
    return P + crossings, crossings


def arrange(mesh: Mesh, vals: torch.Tensor, kinks: torch.Tensor, tol: float, budget: int, keep_vals: bool = False):
    """Cut every cell of ``mesh`` by every kink line of the site whose unit inputs at the vertices are ``vals``
    (interpolated at the new vertices too when ``keep_vals``; stored ``mesh.leaves`` always are).

    Returns ``side`` (cells after the cut, lines) bool: the side (+ = above) of every line on every new cell.
    The mesh's cells and vertices are updated in place (children replace their parent as in ``replace_cells``).
    """
    dev = vals.device
    nv, d = vals.shape
    nk = len(kinks)
    L = nk * d
    coords = mesh.coords[:nv]
    S = line_signs(vals, kinks, tol)
    R, dg = mesh.cells()
    nc = mesh.nc
    W = int(dg.max())
    R = R[:, :W]
    ar = torch.arange(W, device=dev)
    valid = ar[None] < dg[:, None]
    Rf = torch.where(valid, R, R[:, :1])
    above = torch.empty((nc, L), dtype=torch.bool, device=dev)
    below = torch.empty((nc, L), dtype=torch.bool, device=dev)
    step = max(1, (32 << 20) // max(1, W * L))
    for s in range(0, nc, step):
        z = take(S, Rf[s:s + step])
        above[s:s + step] = z.amax(1) > 0
        below[s:s + step] = z.amin(1) < 0
    ci, li = torch.nonzero(above & below, as_tuple=True)  # chords, sorted by (cell, line)
    del below
    P = len(ci)
    if P == 0:
        return above
    kc = torch.bincount(ci, minlength=nc)
    _, _, start = _segments(kc)
    # ordered chord pairs and boundary entries (~100 B each), hashed incidences (~4 per pair), new cells' sides
    est = 100 * int((kc * (kc + dg)).sum()) + 64 * _BLOCK + int((kc * kc).sum()) * (L + 1) // 2
    if est > budget:  # caller cuts unit by unit, under the budget, unless even the least the cut makes is over it
        cells, vertices = _cut_size_at_least(vals, kinks, tol, R, dg, ci, li, kc)
        raise Degenerate(f"memory: about {est} bytes", cells, vertices)

    # ---------------------------------------------------------------- chord ends on the ring
    Rp, dgp, vp = take(R, ci), dg[ci], take(valid, ci)
    sp = S.reshape(-1)[take(Rf, ci) * L + li[:, None]]  # (P, W) sides of each chord's line around its cell
    nxt = torch.where(ar[None] + 1 < dgp[:, None], ar[None] + 1, torch.zeros_like(ar[None]))
    prv = torch.where(ar[None] == 0, dgp[:, None] - 1, ar[None] - 1)
    s_next, s_prev = sp.gather(1, nxt), sp.gather(1, prv)
    on_edge = vp & (sp * s_next < 0)
    on_vertex = vp & (sp == 0) & (s_prev * s_next < 0)
    if bool(((on_edge.sum(1) + on_vertex.sum(1)) != 2).any()):
        raise Degenerate("a line meets a cell's ring in other than two places")
    pe, ie = torch.nonzero(on_edge | on_vertex, as_tuple=True)  # two per chord, by ring index
    is_edge = on_edge[pe, ie]
    a_v = Rp[pe, ie]
    pos = ie.to(vals.dtype)
    vid = a_v.clone()
    xy = take(coords, a_v)
    ke = torch.nonzero(is_edge).flatten()
    n_edge_new = 0
    end_lo, end_hi, end_t = a_v.clone(), a_v.clone(), torch.zeros_like(pos)  # each end as lo + t (hi - lo)
    if len(ke):
        b_v = Rp[pe[ke], nxt[pe[ke], ie[ke]]]
        av = a_v[ke]
        lo, hi = torch.minimum(av, b_v), torch.maximum(av, b_v)
        line = li[pe[ke]]
        u, k = line % d, line // d
        h_lo = vals[lo, u] - kinks[k]
        h_hi = vals[hi, u] - kinks[k]
        t = h_lo / (h_lo - h_hi)  # canonical orientation: both cells of a shared edge compute the same point
        c_lo, c_hi = take(coords, lo), take(coords, hi)
        pt = c_lo + t[:, None] * (c_hi - c_lo)
        pos[ke] += torch.where(av == lo, t, 1 - t)
        end_lo[ke], end_hi[ke], end_t[ke] = lo, hi, t
        # two lines crossing one edge within tol of each other's crossing: the unit-by-unit cut would snap them
        # onto one vertex, so leave such sites to it
        eid = lo * nv + hi
        o = lexsort(eid, t)
        same = (eid[o][1:] == eid[o][:-1]) & (line[o][1:] != line[o][:-1])
        gap = (t[o][1:] - t[o][:-1]).abs()
        rise = (h_hi - h_lo).abs()[o]
        if bool((same & ((gap * rise[1:] <= tol) | (gap * rise[:-1] <= tol))).any()):
            raise Degenerate("two lines cross an edge within tol of each other")
        key = (lo * nv + hi) * L + line
        ukey, inv = torch.unique(key, return_inverse=True)
        n_edge_new = len(ukey)
        first = torch.full((n_edge_new,), len(key), dtype=torch.long, device=dev).scatter_reduce(
            0, inv, torch.arange(len(key), device=dev), "amin")
        edge_xy = pt[first]
        edge_lerp = (lo[first], hi[first], t[first])
        vid[ke] = nv + inv
        xy[ke] = pt
    else:
        edge_xy = coords.new_zeros((0, 2))
        edge_lerp = (a_v[:0], a_v[:0], pos[:0])
    p1, p2 = pos.view(P, 2).unbind(1)
    e1, e2 = xy.view(P, 2, 2).unbind(1)
    up = s_next[pe, ie].view(P, 2)[:, 0]  # side on the arc after the first end (a nonzero vertex sign)
    if bool((up == 0).any()):
        raise Degenerate("a line runs along a cell's edge")

    # ---------------------------------------------------------------- chord crossings (ordered pairs per cell)
    pa, j, _ = _segments(kc[ci])
    pb = start[ci[pa]] + j
    a1, a2, b1, b2 = p1[pa], p2[pa], p1[pb], p2[pb]
    meet = ((a1 < b1) & (b1 < a2) & (a2 < b2)) | ((b1 < a1) & (a1 < b2) & (b2 < a2))
    da, db = e2[pa] - e1[pa], e2[pb] - e1[pb]
    den = _cross2(da, db)
    ua = torch.where(meet, _cross2(e1[pb] - e1[pa], db) / torch.where(meet, den, torch.ones_like(den)),
                     torch.zeros_like(den)).clamp(0.0, 1.0)

    # ---------------------------------------------------------------- hashed sides of every vertex of every cut cell
    g = torch.Generator(device="cpu").manual_seed(0x5EED)
    H = torch.randint(0, 1 << 40, (2, P), generator=g, dtype=torch.long).to(dev)
    # boundary incidences (ring vertices of cut cells, new edge vertices): side of every chord of the cell
    cut = torch.nonzero(kc > 0).flatten()
    rr, ri = torch.nonzero(take(valid, cut), as_tuple=True)
    b_cell = torch.cat([cut[rr], ci[pe[ke]]])
    b_vid = torch.cat([R[cut[rr], ri], vid[ke]])
    b_pos = torch.cat([ri.to(vals.dtype), pos[ke]])
    nb = len(b_cell)
    bi, bj, _ = _segments(kc[b_cell])
    bm = start[b_cell[bi]] + bj
    b_sign = _side(p1[bm], p2[bm], up[bm], b_pos[bi])
    plus = b_sign > 0
    b_hash = torch.zeros((2, nb), dtype=torch.long, device=dev).index_add_(1, bi[plus], H[:, bm[plus]])
    zero = torch.nonzero(b_sign == 0).flatten()  # grouped by incidence
    z_inc = bi[zero]
    zc = torch.bincount(z_inc, minlength=nb)
    zmax = int(zc.max()) if nb else 0
    if zmax > 6:
        raise Degenerate("too many lines through one vertex")
    _, zr, _ = _segments(zc)
    Zb = torch.zeros((2, nb, max(zmax, 2)), dtype=torch.long, device=dev)
    Zb[:, z_inc, zr] = H[:, bm[zero]]
    # interior vertex a x b (a < b) lies on chord a: its sides are those of a's interior next to its first end,
    # changed by every chord that crosses a before it (prefix sums over the crossings sorted along a)
    s1 = _side(p1[pb], p2[pb], up[pb], p1[pa])  # side of chord pb at each end of chord pa
    s2 = _side(p1[pb], p2[pb], up[pb], p2[pa])
    start_side = torch.where(s1 != 0, s1, torch.where(pb == pa, s1, s2))
    init = torch.zeros((2, P), dtype=torch.long, device=dev)
    sp_ = start_side > 0
    init.index_add_(1, pa[sp_], H[:, pb[sp_]])
    mv = torch.nonzero(meet).flatten()  # crossings (a, m), grouped by a
    ma, mm, mu = pa[mv], pb[mv], ua[mv]
    o = lexsort(ma, mu)
    mv, ma, mm, mu = mv[o], ma[o], mm[o], mu[o]
    # a third line within tol of a crossing (three lines through one point, up to tol): left to the unit-by-unit
    # cut, which snaps it onto the vertex
    lm = li[mm]
    um, km = lm % d, kinks[lm // d]

    def _at(e):  # value of each line mm at end e of its chord ma
        lo_, hi_, t_ = end_lo[e], end_hi[e], end_t[e]
        return vals[lo_, um] + t_ * (vals[hi_, um] - vals[lo_, um]) - km
    rise = (_at(2 * ma + 1) - _at(2 * ma)).abs()
    gap = mu[1:] - mu[:-1]
    near = (ma[1:] == ma[:-1]) & ((gap * rise[1:] <= tol) | (gap * rise[:-1] <= tol))
    if bool(near.any()):
        raise Degenerate("three lines through one point, within tol")
    delta = H[:, mm] * torch.where(s1[mv] > 0, -1, 1)
    csum = torch.cumsum(delta, 1) - delta  # exclusive, over all chords
    n_meet = torch.bincount(ma, minlength=P)
    first_m = torch.cumsum(n_meet, 0) - n_meet
    before = csum - csum[:, first_m[ma]]  # sum over the crossings of a before this one
    lower = ma < mm
    ia, ib = ma[lower], mm[lower]
    i_hash = init[:, ia] + before[:, lower] - H[:, ib] * (s1[mv[lower]] > 0)
    n_inner = len(ia)
    iu = mu[lower]
    inner_xy = e1[ia] + iu[:, None] * (e2[ia] - e1[ia])
    inner_id = nv + n_edge_new + torch.arange(n_inner, device=dev)

    inc_cell = torch.cat([b_cell, ci[ia]])
    inc_vid = torch.cat([b_vid, inner_id])
    base = torch.cat([b_hash, i_hash], 1)
    zc = torch.cat([zc, torch.full((n_inner,), 2, dtype=torch.long, device=dev)])
    Zi = torch.stack([H[:, ia], H[:, ib]], -1)  # an interior vertex lies on its two chords
    Zh = torch.cat([Zb, torch.nn.functional.pad(Zi, (0, Zb.shape[2] - 2))], 1)
    zmax = max(zmax, 2 if n_inner else 0)

    # ---------------------------------------------------------------- faces: group by (cell, side of every chord)
    rows, keys = [], []
    for mask in range(1 << zmax):
        r = torch.nonzero((mask >> zc) == 0).flatten()
        bits = torch.tensor([(mask >> i) & 1 for i in range(Zh.shape[2])], dtype=torch.long, device=dev)
        keys.append(base[:, r] + (Zh[:, r] * bits).sum(-1))
        rows.append(r)
    rows, keys = torch.cat(rows), torch.cat(keys, 1)
    # exact grouping by cell, hashed grouping by sides: (cell, h1 bits) then (that group, h2 bits) in one int64 each
    b1 = 62 - nc.bit_length()
    _, g1 = torch.unique(inc_cell[rows] * (1 << b1) + (keys[0] & ((1 << b1) - 1)), return_inverse=True)
    b2 = 62 - len(rows).bit_length()
    _, face = torch.unique(g1 * (1 << b2) + (keys[1] & ((1 << b2) - 1)), return_inverse=True)
    size = torch.bincount(face)
    keep = size >= 3  # a vertex put on a side that has no interior next to it forms a group of its own
    remap = torch.cumsum(keep, 0) - 1
    rk = torch.nonzero(keep[face]).flatten()
    rows, face = rows[rk], remap[face[rk]]
    size = size[keep]
    n_face = len(size)
    f_cell = torch.zeros(n_face, dtype=torch.long, device=dev).scatter_(0, face, inc_cell[rows])
    # vertex order: by face, then angle around the face's centroid
    all_xy = torch.cat([coords, edge_xy, inner_xy])
    fxy = take(all_xy, inc_vid[rows])
    cen = torch.zeros((n_face, 2), dtype=fxy.dtype, device=dev).index_add_(0, face, fxy) / size[:, None]
    rel = fxy - cen[face]
    ang = torch.atan2(rel[:, 1], rel[:, 0])
    o = lexsort(face, ang)
    _, rank, _ = _segments(size)
    ring = torch.zeros((n_face, int(size.max())), dtype=torch.long, device=dev)
    ring[face[o], rank] = inc_vid[rows[o]]

    # ---------------------------------------------------------------- check: the faces of each cut cell tile it
    area_f = polygon_area(take(all_xy, ring), size)
    area_c = polygon_area(take(coords, R[cut]), dg[cut])
    tot = torch.zeros(nc, dtype=area_f.dtype, device=dev).index_add_(0, f_cell, area_f)[cut]
    span = float((coords.amax(0) - coords.amin(0)).max()) if nv else 1.0
    rel = affine_tol(area_c.dtype)  # 1e-9 in float64, 1000 ulps in float32
    slack = rel * area_c.abs() + 1e-3 * rel * span * span  # shoelace rounding is relative to the coordinates' size
    if bool((area_f < -1e-3 * rel * span * span).any()) or bool(((tot - area_c).abs() > slack).any()):
        raise Degenerate("the faces of a cell do not tile it")

    # ---------------------------------------------------------------- write back
    chord_ends = vid.view(P, 2)  # interior vertices: the same points as inner_xy, now with values
    mesh.add_lerp(edge_lerp, (chord_ends[ia, 0], chord_ends[ia, 1], iu), vals=keep_vals)
    first = torch.ones_like(f_cell, dtype=torch.bool)
    first[1:] = f_cell[1:] != f_cell[:-1]
    slot = mesh.replace_cells(f_cell, ring, size, first)
    side = torch.zeros((mesh.nc, L), dtype=torch.bool, device=dev)
    side[:nc] = above
    side[slot] = take(above, f_cell)
    # each new cell's side of its parent's chords, read at its centroid (interior, by convexity): the arc from the
    # first end to the second (ring order, counter-clockwise) lies right of the chord
    nrm = torch.stack([e1[:, 1] - e2[:, 1], e2[:, 0] - e1[:, 0]], 1)  # cross(e2 - e1, x - e1) = nrm . (x - e1)
    off = -(nrm * e1).sum(1)
    up_plus = up > 0
    # (new cell, chord of its parent) pairs, in blocks of faces of about _BLOCK entries
    ends = torch.cumsum(kc[f_cell], 0)
    lo_f = 0
    while lo_f < n_face:
        hi_f = int(torch.searchsorted(ends, int(ends[lo_f]) - int(kc[f_cell[lo_f]]) + _BLOCK, right=True))
        hi_f = max(hi_f, lo_f + 1)
        fc = f_cell[lo_f:hi_f]
        fe, fj, _ = _segments(kc[fc])
        fm = start[fc[fe]] + fj
        cen_e = torch.repeat_interleave(cen[lo_f:hi_f], kc[fc], dim=0)
        val = torch.addcmul(take(off, fm), take(nrm[:, 0], fm), cen_e[:, 0])
        val.addcmul_(take(nrm[:, 1], fm), cen_e[:, 1])
        side[slot[lo_f + fe], take(li, fm)] = (val < 0) == take(up_plus, fm)
        lo_f = hi_f
    return side
