"""Exact partition of a 2-D slice into linear regions: convex cells split site by site, in execution order.

Invariant
---------
Before site k is processed, every cell lies inside one linear region of every earlier site (each unit stays on one
piece over the cell), and the model is affine between its captured sites (checked once, by the paths engine's
``Runner.affinity_probe``), so site k's unit inputs are affine over each cell. They are evaluated once per vertex at
the start of the site (the network is continuous, so a vertex shared by several cells has one value), and every
later vertex of the site is an exact linear interpolation on an edge or chord (``Mesh.add_lerp``). The evaluation
takes the paths engine's affine route when its Jacobian blocks fit (``Runner.extract_affine``): the outputs of the
sites that later sites read are kept per vertex (interpolated at new vertices, exact for the same reason) and site
k's inputs are one product per block; otherwise (graph route) every vertex runs a forward pass through
``capture``. Each cell is then cut by every kink line that crosses it: for elementwise units all lines at once
(``_arrangement.arrange``), or, where lines meet within ``tol`` of each other, one round per unit (all cells that
unit crosses at once, ``_mesh.cut``, which snaps ties); for max pooling one round per window, in which each cell
is clipped into the argmax regions of the window (``{z_a >= z_c for all c}``; the kink of ``max(z_a, z_c) = z_c +
relu(z_a - z_c)`` is relu's kink of the difference), keeping first-maximum ties as ``torch.argmax`` does. After
the last site every cell is one linear region and the model output is affine over it; its map is fitted on the
cell's vertices.

Codes are bookkept, not re-evaluated: an arranged site gives each new cell its side of every line (read at the
cell's vertex centroid for the lines that cut its parent); after a round-based site each cell's unit inputs at its
vertex average (an interior point, by convexity) give its pieces through the registry's ``pieces``; children copy
their parent's codes.

Ties and tolerance
------------------
Values within ``tol * max(1, max |z|)`` of a kink are snapped onto it (``max |z|`` over the site's units that move
over the plane; see ``_mesh``): a kink line through a vertex
adds no vertex and a unit touching its kink on a cell does not cut it; cells thinner than that are not made. Counts
are exact up to that tolerance (stated on the result). The default tol is lowered at a site where the plane is small
against it (``_Partitioner.site_tol``).

Cost and memory
---------------
Per site: one product per Jacobian block (affine route) or one forward pass (graph route) per vertex; arranged: a
fixed number of batched steps, work about (cells x lines that cross them) plus, per cell, (lines crossing it)^2;
round-based: one vectorised round per unit (or window) that cuts any cell, work proportional to the cells it cuts.
Memory is about (vertices x units of the site) values plus (cells x units) candidate flags; it is estimated before
each site and checked as cells grow; over ``memory_budget`` raises with the estimate.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Callable

import torch

from ..capture import default_forward, select_sites
from ..codes import pack_bits, pack_pieces, site_unit_indices
from ..errors import InvalidInputError, NotPiecewiseLinearError, not_finite
from ..kinks import REGISTRY, ScalarKinks, WindowMax
from ..paths.geometry import PathSpec
from ..paths.runner import SRC, Affine, Runner, affine_tol, index_inputs, prepare_model
from . import _mesh
from ._arrangement import Degenerate, arrange
from .neighbours import shared_edges
from ._mesh import take
from .geometry import Plane, cast_inputs, polygon_area

_RELU = REGISTRY["relu"]


class _Model:
    """Forward passes at slice points (plane coordinates), by the paths engine's point evaluation
    (``Runner.eval_point_batches``: batches sized to the memory budget; for a plane at a site, the network before it
    runs once per batch on the real input, where that reproduces the model)."""

    def __init__(self, runner: Runner, plane: Plane):
        self.runner, self.plane = runner, plane

    def _batches(self, u: torch.Tensor, names: list[str], want_output: bool):
        pid = torch.zeros(len(u), dtype=torch.long, device=u.device)
        return self.runner.eval_point_batches(pid, None, names, want_output,
                                              points=lambda rows: self.plane.points(u[rows]))

    def site_values(self, u: torch.Tensor, name: str, cols: torch.Tensor | None) -> torch.Tensor:
        """Unit inputs (vertices x units, or the ``cols``) of site ``name`` at plane points ``u``."""
        return torch.cat([o[name] if cols is None else o[name][:, cols] for _, o in self._batches(u, [name], False)])

    def outputs(self, u: torch.Tensor) -> torch.Tensor:
        """Model scores at plane points ``u``."""
        return torch.cat([o["output"].reshape(len(o["output"]), -1) for _, o in self._batches(u, [], True)])


@contextlib.contextmanager
def _threads(n: int | None):
    """Run the block with ``n`` torch threads (None: leave as is)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 10 << 30 else f"{n / 2**30:,.0f} GiB"


def _budget_error(owner: str, what: str, est: int, budget: int, earlier: str | None = None,
                  last: bool = True, restricted: int | None = None) -> InvalidInputError:
    """The over-budget error; its advice names ``until=`` only when an ``earlier`` site could end the partition, and
    ``units=`` only for the ``last`` cutting site (the one it restricts; ``restricted``: the units it already keeps)."""
    fixes = ["raise the budget (memory_budget=, CLI --memory-mib)", "shrink the domain"]
    if earlier is not None:
        fixes.append(f"stop at an earlier site (until={earlier!r}, CLI --until {earlier})")
    if last and restricted is None:
        fixes.append("cut only some of this site's units (units=, CLI --units)")
    elif last:
        fixes.append(f"cut fewer of this site's units (units= keeps {restricted} now)")
    advice = ", ".join(fixes[:-1]) + " or " + fixes[-1]
    first = "" if earlier is not None else "; it is the first site that cuts, so until= (CLI --until) cannot help"
    return InvalidInputError(f"{owner}: {what} needs about {_mib(est)}, over the memory budget of {_mib(budget)}. "
                             f"{advice[0].upper()}{advice[1:]}{first}.")


class _Partitioner:
    def __init__(self, m: _Model, sites, z_shape: dict, units: torch.Tensor | None, tol: float, budget: int,
                 owner: str, round_threads: int | None = None, affine: Affine | None = None,
                 tol_floor: float | None = None):
        self.m, self.sites, self.z_shape = m, sites, z_shape
        self.units, self.tol, self.budget, self.owner = units, tol, budget, owner
        self.tol_floor = tol_floor  # None: tol as given; else the lowest tol a small plane may lower it to
        self.lowered: dict[str, float] = {}  # site -> the relative tol used there, where lowered (``site_tol``)
        self.coarse: dict[str, float] = {}  # site -> tol over the inputs' move across the plane, where over 1e-3
        self.wide: dict[str, float] = {}  # site -> tol over the inputs' size at the plane's least vertex, over 1e-3
        self.cur_index = 0  # the site being cut (``run``), for the budget error's advice
        self.round_threads = round_threads  # torch threads for unit-by-unit / window-by-window cutting
        self.rounds = 0
        self.fallbacks = 0  # scalar sites cut unit by unit because the all-lines arrangement found them degenerate
        self.site_bytes: list[tuple[str, int, int]] = []  # (name, byte offset, n bytes) in the code buffer
        self.blocks = None if affine is None else self._fold(affine)

    # ------------------------------------------------------------------------------------ site inputs
    def _fold(self, aff: Affine):
        """Per site m: (c, J, {leaf: jt}) with z_m = c + u @ J + sum_leaf a_leaf @ jt over slice coordinates u
        (the plane folded into the source block), and the sites whose outputs later sites read (kept per vertex)."""
        plane = self.m.plane
        origin, basis = plane.origin.reshape(1, -1), plane.basis.reshape(2, -1)
        blocks, self.last_use = {}, {}
        for i, site in enumerate(self.sites):
            m = site.name
            cols = self.units if (i == len(self.sites) - 1 and self.units is not None) else None
            pick = (lambda x: x) if cols is None else (lambda x: x[:, cols])
            c, J = pick(aff.c[m]), None
            leaves = {}
            for leaf in aff.deps[m]:
                jt = pick(aff.jt[m, leaf])
                if leaf == SRC:
                    c, J = c + origin @ jt, basis @ jt
                else:
                    leaves[leaf] = jt
                    self.last_use[leaf] = i
            blocks[m] = (c, J, leaves)
        return blocks

    def _site_z(self, mesh: _mesh.Mesh, site, cols) -> torch.Tensor:
        """Unit inputs of ``site`` at every vertex: from the stored outputs of earlier sites (affine route, one
        product per site) or by a forward pass of every vertex (graph route)."""
        if self.blocks is None:
            return self.m.site_values(mesh.coords[: mesh.nv], site.name, cols)
        c, J, leaves = self.blocks[site.name]
        z = None
        for a, jt in ([(mesh.coords[: mesh.nv], J)] if J is not None else []) + \
                [(mesh.leaves[leaf][: mesh.nv], jt) for leaf, jt in leaves.items()]:
            z = torch.addmm(c, a, jt) if z is None else z.addmm_(a, jt)
        return c.expand(mesh.nv, -1).clone() if z is None else z

    def _keep_output(self, mesh: _mesh.Mesh, i: int, site) -> None:
        """After site i is cut: store its output at every vertex if a later site reads it."""
        if self.blocks is not None and self.last_use.get(site.name, -1) > i:
            z = mesh.vals[: mesh.nv]
            shape = self.z_shape[site.name]
            if site.activation.elementwise:  # output shaped like the input: overwrite the inputs in blocks
                step = max(1, (64 << 20) // max(1, 8 * z.shape[1]))  # (fresh pages are slow to fault in)
                for s in range(0, len(z), step):
                    zz = z[s:s + step]
                    zz.copy_(site.apply(zz.reshape(len(zz), *shape)).reshape(len(zz), -1))
                mesh.leaves[site.name] = z
            else:
                mesh.leaves[site.name] = site.apply(z.reshape(len(z), *shape)).reshape(len(z), -1)
            mesh.vals = mesh.vals[:0]

    def mesh_bytes(self, mesh: _mesh.Mesh, cells: int = 0, vertices: int = 0, width: int = 0,
                   cell_extra: int = 0) -> int:
        """Bytes of the mesh's buffers now, or once they hold ``cells`` more cells and ``vertices`` more vertices
        (buffers double as they grow), rings ``width`` wide and ``cell_extra`` more bytes per cell."""
        rows = sum(r.element_size() * r[0].numel() for r in mesh.rows) if mesh.nc else 0
        leaves = sum(v.shape[1] for v in mesh.leaves.values())
        n_vertex = _mesh.grown(mesh.coords.shape[0], mesh.nv + vertices)
        n_cell = _mesh.grown(mesh.ring.shape[0], mesh.nc + cells)
        return (n_vertex * (16 + 8 * mesh.vals.shape[1] + 8 * leaves)
                + n_cell * (8 * max(width, mesh.ring.shape[1]) + 8 + rows + cell_extra))

    def check(self, mesh, what: str, extra: int = 0, **growth) -> None:
        """Raise the budget error when the mesh (grown by ``growth``, see ``mesh_bytes``) plus ``extra`` bytes is
        over the budget."""
        est = self.mesh_bytes(mesh, **growth) + extra
        if est > self.budget:
            raise _budget_error(self.owner, what, est, self.budget, *self._where())

    def _where(self) -> tuple[str | None, bool, int | None]:
        """(the site before the one being cut, or None for the first; whether it is the last cutting site; how many
        units ``units=`` keeps of it, None when not restricted)."""
        i = self.cur_index
        last = i == len(self.sites) - 1
        return (self.sites[i - 1].name if i else None), last, (len(self.units) if last and self.units is not None
                                                                else None)

    def run(self, mesh: _mesh.Mesh) -> None:
        codes = torch.zeros((mesh.nc, 0), dtype=torch.uint8, device=mesh.coords.device)
        mesh.rows = [codes]
        for i, site in enumerate(self.sites):
            self.cur_index = i
            last = i == len(self.sites) - 1
            cols = self.units if (last and self.units is not None) else None
            d = len(cols) if cols is not None else math.prod(self.z_shape[site.name])
            act = site.activation
            n_lines = d if isinstance(act, ScalarKinks) else len(act.window_index(self.z_shape[site.name]))
            est = mesh.nv * (8 * d) * 3 + mesh.nc * n_lines + self.mesh_bytes(mesh)
            if est > self.budget:
                raise _budget_error(self.owner, f"site {site.name!r} ({d} units, {mesh.nc} cells, {mesh.nv} "
                                    "vertices so far)", est, self.budget, *self._where())
            mesh.vals = mesh.vals[:0]  # the previous site's inputs are no longer needed
            mesh.set_vals(self._site_z(mesh, site, cols))
            for leaf in [k for k in mesh.leaves if self.last_use[k] <= i]:  # read for the last time just now
                del mesh.leaves[leaf]
            top, spread, least, local = 0.0, 0.0, 0.0, 1.0
            if mesh.nv and mesh.vals.shape[1]:
                z = mesh.vals[: mesh.nv]
                # the inputs' size at the vertex where they are smallest: their rounding there is about eps of it,
                # while the snapping tolerance follows the largest (a plane far wider than its central structure)
                local = float(torch.maximum(z.amax(1), -z.amin(1)).min())  # row max of |z|, no (nv, units) copy
                if mesh.nc == 1:  # one cell, the inputs affine on it: their value at its vertex average is exact
                    local = min(local, float(z.mean(0).abs().max()))
                local = max(1.0, local)
                lo_z, hi_z = z.amin(0), z.amax(0)
                big, moves = torch.maximum(lo_z.abs(), hi_z.abs()), hi_z - lo_z
                if not math.isfinite(float(big.max())):  # NaN propagates through max
                    raise not_finite(f"the unit inputs of site {site.name!r}", self.owner, mesh.vals.dtype)
                # the site's scale: its largest unit input among those that move over the plane (one that does not,
                # a unit with a large bias and no weight, says nothing about the others' rounding)
                top, spread = float((big * (moves > 0)).max()), float(moves.max())
                least = spread  # the smallest move of a unit whose kink the plane crosses (scalar kinks)
                if isinstance(act, ScalarKinks):
                    crossing = torch.zeros_like(moves, dtype=torch.bool)
                    for kink in act.kinks:
                        crossing |= (lo_z <= kink) & (kink <= hi_z)
                    crossing &= moves > 0
                    least = float(moves[crossing].min()) if bool(crossing.any()) else spread
                del z, lo_z, hi_z, big, moves
            scale = max(1.0, top)
            tol = self.cur_tol = self.site_tol(scale, spread, least, site.name)
            if tol > 1e-3 * local:
                self.wide[site.name] = tol / local
            if isinstance(act, ScalarKinks):
                self._scalar_site(mesh, act, tol, site.name, keep_vals=self.last_use.get(site.name, -1) > i
                                  if self.blocks is not None else False)
            elif isinstance(act, WindowMax):
                self._window_site(mesh, act, tol, self.z_shape[site.name], site.name)
                self._codes(mesh, act, site.name)
            else:  # pragma: no cover - registry has only these two families
                raise NotPiecewiseLinearError(f"site {site.name!r}: {act.name} has no exact 2-D cutting rule")
            self._keep_output(mesh, i, site)

    def site_tol(self, scale: float, spread: float, least: float, name: str) -> float:
        """The absolute snapping tolerance at a site: ``tol * scale``, or, with a ``tol_floor``, at most a millionth
        of how far the unit inputs move across the plane (``spread``: the largest range of one unit over the
        vertices) and at least ``tol_floor * scale``: on a plane so small that its inputs move by ~tol, a fixed tol
        would snap genuine kink lines away and merge regions. Where even the floor is over a thousandth of the
        smallest move of a unit whose kink the plane crosses (``least``), the plane is near the dtype's resolution
        for that unit and ``coarse`` records by how much."""
        tol = self.tol * scale
        if self.tol_floor is None or spread == 0:  # every unit constant over the plane: nothing says it is small
            return tol
        small = max(self.tol_floor * scale, min(tol, 1e-6 * spread))
        if small < tol:
            self.lowered[name] = small / scale
        if small > 1e-3 * least:
            self.coarse[name] = small / least
        return small

    # ---------------------------------------------------------------------------------------- scalar sites
    def _scalar_site(self, mesh, act: ScalarKinks, tol: float, name: str, keep_vals: bool = False) -> None:
        """All kink lines at once (``_arrangement``); unit by unit where that finds the cells degenerate."""
        kinks = torch.tensor(act.kinks, dtype=mesh.vals.dtype, device=mesh.vals.device)
        try:
            side = arrange(mesh, mesh.vals[: mesh.nv], kinks, tol, self.budget - self.mesh_bytes(mesh), keep_vals)
        except Degenerate as e:
            # the unit-by-unit cut keeps a flag per cell and unit: refuse at once when even the least that the cut
            # makes (counted by ``arrange`` when it does not fit) is over the budget, not after most of the work
            self.check(mesh, f"the partition at site {name!r}", cells=e.cells, vertices=e.vertices,
                       cell_extra=mesh.vals.shape[1])
            self.fallbacks += 1
            with _threads(self.round_threads):
                self._scalar_rounds(mesh, act, kinks, tol, name)
            self._codes(mesh, act, name)
            return
        self.rounds += 1
        self.check(mesh, f"the partition at site {name!r}")
        if act.ordered:  # thermometer bits: bit j of unit u is 'above kink j', exactly the line's side (planar)
            packed = pack_bits(side)
        else:
            pieces = side.view(mesh.nc, len(kinks), -1).long().sum(1)
            packed = pack_pieces(pieces.cpu(), act).to(side.device)
        self._append_codes(mesh, packed, name)

    def _scalar_rounds(self, mesh, act: ScalarKinks, kinks: torch.Tensor, tol: float, name: str) -> None:
        """One vectorised round per unit: every cell that unit's kinks cross is cut at once."""
        d = mesh.vals.shape[1]
        cand = self._scalar_cand(mesh, act, kinks, tol)
        mesh.rows.append(cand)
        try:
            lines = torch.nonzero(cand[: mesh.nc].any(0)).flatten().tolist()
            zero = torch.zeros(1, dtype=torch.long, device=mesh.coords.device)
            for j in lines:
                cand = mesh.rows[-1]
                A = torch.nonzero(cand[: mesh.nc, j]).flatten()
                if not len(A):
                    continue
                R, dg = mesh.cells(A)
                W = int(dg.max())
                R = R[:, :W]
                g = _mesh.snap(mesh.vals[R, j], kinks, tol)
                keep = _mesh.cut_mask(act, g, dg, kinks)
                if not bool(keep.all()):
                    kk = torch.nonzero(keep).flatten()
                    A, R, dg, g = A[kk], take(R, kk), dg[kk], take(g, kk)
                if not len(A):
                    continue
                self.rounds += 1
                # at most: every cut cell in every piece, two new vertices per kink on its ring
                self.check(mesh, f"the partition at site {name!r}", cells=len(A) * (act.n_pieces - 1),
                           vertices=2 * len(kinks) * len(A), width=W + 2 * len(kinks))
                ring, alo, ahi = _mesh.cut(mesh, act, kinks, R, dg, g, zero.expand(len(A)), 1)
                self._write_bands(mesh, A, ring, alo, ahi, act.n_pieces)
            del d
        finally:
            mesh.rows.pop()

    def _scalar_cand(self, mesh, act, kinks, tol) -> torch.Tensor:
        R = _filled_rings(mesh)
        d = mesh.vals.shape[1]
        W = R.shape[1]
        out = torch.zeros((mesh.nc, d), dtype=torch.bool, device=R.device)
        step = max(1, (16 << 20) // max(1, 8 * W * d))
        for s in range(0, mesh.nc, step):
            z = take(mesh.vals, R[s:s + step])  # (c, W, d)
            zmax, zmin = z.amax(1), z.amin(1)
            lo_max, _ = _mesh.piece_range(act, _mesh.snap(zmax, kinks, tol), kinks)
            _, hi_min = _mesh.piece_range(act, _mesh.snap(zmin, kinks, tol), kinks)
            out[s:s + step] = lo_max > hi_min
        return out

    def _write_bands(self, mesh, A, ring, alo, ahi, n_bands: int) -> None:
        kids, degs, oks = [], [], []
        for b in range(n_bands):
            r, dg, ok = _mesh.band(ring, alo, ahi, b)
            kids.append(r)
            degs.append(dg)
            oks.append(ok)
        W = max(k.shape[1] for k in kids)
        kids = [torch.nn.functional.pad(k, (0, W - k.shape[1])) for k in kids]
        ok = torch.stack(oks)  # (bands, n)
        first = ok & (torch.cumsum(ok.long(), 0) == 1)
        sel = torch.nonzero(ok.flatten()).flatten()
        parent = A.repeat(n_bands)[sel]
        mesh.replace_cells(parent, take(torch.cat(kids), sel), torch.cat(degs)[sel], first.flatten()[sel])

    # ----------------------------------------------------------------------------------------- max pooling
    def _window_site(self, mesh, act: WindowMax, tol: float, z_shape: tuple, name: str) -> None:
        self.clip_windows(mesh, act.window_index(z_shape, mesh.vals.device), tol, name)

    def clip_windows(self, mesh, win: torch.Tensor, tol: float, name: str) -> None:
        """Cut every cell into the argmax regions of each window (rows of ``win``: value columns, -1 = padding)."""
        with _threads(self.round_threads):
            self._clip_windows(mesh, win, tol, name)

    def _clip_windows(self, mesh, win: torch.Tensor, tol: float, name: str) -> None:
        n_win, K = win.shape
        zero_k = torch.zeros(1, dtype=mesh.vals.dtype, device=mesh.vals.device)
        cand = self._window_cand(mesh, win, tol)
        mesh.rows.append(cand)
        try:
            for w in torch.nonzero(cand[: mesh.nc].any(0)).flatten().tolist():
                cand = mesh.rows[-1]
                A = torch.nonzero(cand[: mesh.nc, w]).flatten()
                if not len(A):
                    continue
                self.rounds += 1
                ent = win[w]
                ok_ent = torch.nonzero(ent >= 0).flatten().tolist()
                # copies (cell, a): clip by z_a >= z_c (c > a), z_a > z_c (c < a)
                R0, dg0 = mesh.cells(A)
                W0 = int(dg0.max())
                rings, degs, alive, parents, owners = [], [], [], [], []
                for a in ok_ent:
                    rings.append(R0[:, :W0])
                    degs.append(dg0)
                    parents.append(A)
                    owners.append(torch.full_like(A, a))
                R = torch.cat(rings)
                dg = torch.cat(degs)
                par = torch.cat(parents)
                own = torch.cat(owners)
                alive = torch.ones(len(R), dtype=torch.bool, device=R.device)
                for c in ok_ent:
                    idx = torch.nonzero(alive & (own != c)).flatten()
                    if not len(idx):
                        continue
                    Ri, dgi = take(R, idx), dg[idx]
                    Wi = int(dgi.max())
                    Ri = Ri[:, :Wi]
                    col_a = ent[own[idx]]
                    g = mesh.vals[Ri, col_a[:, None].expand_as(Ri)] - mesh.vals[Ri, ent[c]]
                    g = _mesh.snap(g, zero_k, tol)
                    valid = torch.arange(Wi, device=R.device)[None] < dgi[:, None]
                    gpos = ((g > 0) & valid).any(1)
                    gneg = ((g < 0) & valid).any(1)
                    flat = ~gpos & ~gneg
                    # empty interior: nothing strictly on a's side (unless a tie everywhere and a comes first)
                    dead = ~gpos & ~(flat & (own[idx] < c))
                    cutting = gpos & gneg
                    alive[idx[dead]] = False
                    ci = idx[cutting]
                    if len(ci):
                        lo_ab = torch.minimum(own[ci], torch.full_like(ci, c))
                        hi_ab = torch.maximum(own[ci], torch.full_like(ci, c))
                        line = (w * K + lo_ab) * K + hi_ab
                        cw = torch.nonzero(cutting).flatten()
                        ring, alo, ahi = _mesh.cut(mesh, _RELU, zero_k, take(Ri, cw), dgi[cw], take(g, cw),
                                                   line, n_win * K * K)
                        kid, kdg, _ = _mesh.band(ring, alo, ahi, 1)
                        if kid.shape[1] > R.shape[1]:
                            R = torch.nn.functional.pad(R, (0, kid.shape[1] - R.shape[1]))
                        R.index_copy_(0, ci, torch.nn.functional.pad(kid, (0, R.shape[1] - kid.shape[1])))
                        dg[ci] = kdg
                    # the vertices made so far, and the clipped copies that will replace their cells
                    self.check(mesh, f"the partition at site {name!r}", cells=int(alive.sum()) - len(A),
                               width=R.shape[1], extra=R.numel() * 8)
                keep = torch.nonzero(alive).flatten()
                par_k = par[keep]
                order = torch.argsort(par_k, stable=True)
                keep, par_k = keep[order], par_k[order]
                first = torch.ones_like(par_k, dtype=torch.bool)
                first[1:] = par_k[1:] != par_k[:-1]
                W = int(dg[keep].max())
                mesh.replace_cells(par_k, take(R, keep)[:, :W], dg[keep], first)
                self.check(mesh, f"the partition at site {name!r}")
        finally:
            mesh.rows.pop()

    def _window_cand(self, mesh, win, tol) -> torch.Tensor:
        R, dg = mesh.cells()
        W = R.shape[1]
        n_win, K = win.shape
        out = torch.zeros((mesh.nc, n_win), dtype=torch.bool, device=R.device)
        step = max(1, (32 << 20) // max(1, 8 * W * n_win * K))
        safe = win.clamp_min(0)
        pad = win < 0
        valid_all = torch.arange(W, device=R.device)[None] < dg[:, None]
        for s in range(0, mesh.nc, step):
            r, v, d = R[s:s + step], valid_all[s:s + step], dg[s:s + step]
            z = take(mesh.vals, r)[..., safe]  # (c, W, n_win, K)
            z = torch.where(pad, torch.full_like(z, -math.inf), z)
            zc = torch.where(v[..., None, None], z, torch.zeros_like(z)).sum(1) / d[:, None, None]
            zc = torch.where(pad, torch.full_like(zc, -math.inf), zc)
            a = zc.argmax(-1)  # (c, n_win)
            za = z.gather(-1, a[:, None, :, None].expand(-1, W, -1, 1))
            over = ((z - za) > tol) & v[..., None, None]
            out[s:s + step] = over.any(-1).any(1)
        return out

    # ------------------------------------------------------------------------------------------------ codes
    def _codes(self, mesh, act, name: str) -> None:
        # any positive weighting of a convex cell's vertices is an interior point: the filled ring repeats vertex 0
        R = _filled_rings(mesh)
        W = R.shape[1]
        d = mesh.vals.shape[1]
        step = max(1, (16 << 20) // max(1, 8 * W * d))
        kinks = None if isinstance(act, WindowMax) else torch.tensor(act.kinks, dtype=mesh.vals.dtype,
                                                                      device=mesh.vals.device)
        packed = []
        for s in range(0, mesh.nc, step):
            ring = take(mesh.vals, R[s:s + step])
            if isinstance(act, WindowMax):
                # tie policy of the cuts: entries within tol of the window's max tie, and the first of them wins;
                # the cell's entry is the first within tol of the max at every vertex (a thin cell beside a clip
                # has one vertex where the other side's entry is beyond tol: at its centroid the two were tied and
                # the first won, the neighbour's code), else the first maximum at the centroid
                c = len(ring)
                w = act.windows(ring.reshape(c * W, *self.z_shape[name]))
                w = w.reshape(c, W, *w.shape[1:])
                everywhere = (w >= w.amax(-1, keepdim=True) - self.cur_tol).all(1)  # (c, windows, K)
                at_centre = first_max(w.mean(1), self.cur_tol)
                pieces = torch.where(everywhere.any(-1), everywhere.int().argmax(-1), at_centre).reshape(c, -1)
            else:
                # vertices snapped as the cuts saw them, then averaged: a cell's values lie in one piece's closure
                # and its mean is inside that piece unless every vertex is on the kink (then on it: the registry's
                # lower piece). Snapping the mean instead gave a thin cell beside a cut the lower piece whenever its
                # mean was within tol, though a vertex lies beyond tol on the upper side (float32 CNN slices:
                # adjacent regions with equal codes)
                pieces = act.pieces(_mesh.snap(ring, kinks, self.cur_tol).mean(1))
            packed.append(pack_pieces(pieces.cpu(), act).to(R.device))
        packed = torch.cat(packed) if packed else torch.zeros((0, 0), dtype=torch.uint8, device=R.device)
        self._append_codes(mesh, packed, name)

    def _append_codes(self, mesh, packed: torch.Tensor, name: str) -> None:
        codes = mesh.rows[0]
        self.site_bytes.append((name, codes.shape[1], packed.shape[1]))
        new = codes.new_zeros((codes.shape[0], codes.shape[1] + packed.shape[1]))
        new[:, : codes.shape[1]] = codes
        new[: mesh.nc, codes.shape[1]:] = packed
        mesh.rows[0] = new


def first_max(v: torch.Tensor, tol: float) -> torch.Tensor:
    """Index of the first entry within ``tol`` of the maximum along the last axis: ``torch.argmax``'s first-maximum
    ties, with values within ``tol`` tied (the tie policy of the argmax clipping, ``clip_windows``)."""
    top = v.amax(-1, keepdim=True)
    return torch.where(v >= top - tol, top.expand_as(v), v).argmax(-1)


def decision_boundary(part: "_Partitioner", coords, outs, R, dg, tol: float) -> torch.Tensor:
    """Segments (S, 2, 2) where the top class (``first_max``: the first of tied maxima) changes.

    Every region is clipped into the argmax regions of the output (the same clipping as max pooling; only regions
    where some class overtakes another are cut), each piece's class is read at an interior point, and the boundary
    is every edge shared by two pieces of different classes: inside a region, and along a region edge where the top
    class changes exactly on the edge (e.g. a final ReLU clamps two classes to a tie at 0 on one side). Edges with the
    same top class on both sides are never boundary, however close the scores."""
    n_cls = outs.shape[1]
    if n_cls < 2 or not len(R):
        return coords.new_zeros((0, 2, 2))
    scale = max(1.0, float(outs.abs().max()))
    # scores within t tie; never below rounding (float32 vertices on a kink carry ~1e-7 of noise, so a final ReLU's
    # zeros would otherwise break ties at random)
    t = max(tol, 100 * torch.finfo(outs.dtype).eps) * scale
    # only regions that can hold a boundary edge: some class overtakes another inside (to be cut), or a vertex is a
    # tie of the top two scores (an edge where the top class changes has tied ends; ``near_tie`` is far above the
    # rounding of interpolated values, and above the few ``t`` by which a tie decided by ``t`` can miss it)
    Rf = torch.where(torch.arange(R.shape[1], device=R.device)[None] < dg[:, None], R, R[:, :1])
    o = take(outs, Rf)  # (n, W, classes)
    top = o.mean(1).argmax(1)
    mixed = (o.amax(2) - o.gather(2, top[:, None, None].expand(-1, o.shape[1], 1))[..., 0]).amax(1) > t
    near_tie = max(1e-6 * scale, 1e3 * t)
    top2 = outs.topk(2, dim=1).values
    tied = (top2[:, 0] - top2[:, 1]) <= near_tie
    pick = torch.nonzero(mixed | tied[Rf].any(1)).flatten()
    if not len(pick):
        return coords.new_zeros((0, 2, 2))
    used, inv = torch.unique(take(R, pick), return_inverse=True)
    mesh = _mesh.Mesh(take(coords, used), inv, dg[pick])
    mesh.set_vals(take(outs, used))
    mesh.rows = []
    part.clip_windows(mesh, torch.arange(n_cls, device=R.device)[None], t, "output")
    cls = first_max(take(mesh.vals, _filled_rings(mesh)).mean(1), t)
    xy = mesh.coords[: mesh.nv]
    # the argmax pieces are clipped as separate copies, so both sides of a border hold its edge with their own
    # vertices (``same_points``: within rounding of the dtype)
    near = max(1e-9, 64 * torch.finfo(xy.dtype).eps) * max(1.0, float(xy.abs().max()))
    ring, deg = mesh.cells()
    ra, rb, p, q = shared_edges(None, coords=xy, ring=ring, deg=deg, tol=near)
    on = cls[ra] != cls[rb]
    return torch.stack([take(xy, p[on]), take(xy, q[on])], 1)


def _filled_rings(mesh) -> torch.Tensor:
    """Rings (cells, W) with padding replaced by each cell's first vertex (no masks needed for min, max, mean)."""
    R, dg = mesh.cells()
    W = int(dg.max())
    R = R[:, :W]
    valid = torch.arange(W, device=R.device)[None] < dg[:, None]
    return torch.where(valid, R, R[:, :1])


def fit_affine(coords: torch.Tensor, outs: torch.Tensor, R: torch.Tensor, dg: torch.Tensor):
    """Affine map per cell from three of its vertices: slope (n, 2, m), offset (n, m).

    The output is affine on the cell, so any three non-collinear vertices determine it; we take vertex 0, the vertex
    farthest from it and the one farthest from their line (the best-conditioned choice among such triples, up to 2x).
    """
    W = R.shape[1]
    valid = torch.arange(W, device=R.device)[None] < dg[:, None]
    xy = take(coords, R)
    d0 = xy - xy[:, :1]
    dist = torch.where(valid, (d0 * d0).sum(-1), torch.full_like(d0[..., 0], -1.0))
    i = dist.argmax(1)
    e = d0.gather(1, i[:, None, None].expand(-1, 1, 2))[:, 0]
    cr = (e[:, None, 0] * d0[..., 1] - e[:, None, 1] * d0[..., 0]).abs()
    j = torch.where(valid, cr, torch.full_like(cr, -1.0)).argmax(1)
    f = d0.gather(1, j[:, None, None].expand(-1, 1, 2))[:, 0]
    r = torch.arange(len(R), device=R.device)
    o0 = take(outs, R[:, 0])
    oi, oj = take(outs, R[r, i]) - o0, take(outs, R[r, j]) - o0
    det = (e[:, 0] * f[:, 1] - e[:, 1] * f[:, 0])[:, None]
    # [e; f] @ S = [oi; oj]  ->  S = [e; f]^-1 [oi; oj]
    s0 = (f[:, 1, None] * oi - e[:, 1, None] * oj) / det
    s1 = (-f[:, 0, None] * oi + e[:, 0, None] * oj) / det
    slope = torch.stack([s0, s1], 1)
    offset = o0 - (xy[:, 0, :, None] * slope).sum(1)
    return slope, offset


def _check_finite_model(m, owner: str, dtype) -> None:
    """A NaN or infinite parameter or buffer makes every later check fail in its own misleading way (a NaN map is
    not affine): name it instead."""
    for kind, items in (("parameter", m.named_parameters()), ("buffer", m.named_buffers())):
        for name, t in items:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise InvalidInputError(f"{owner}: the model's {kind} {name!r} holds NaN or infinite values (in "
                                        f"{str(dtype).replace('torch.', '')}), so it has no linear regions.")


NEAR_RESOLUTION = "near float resolution"  # how a slice's note that its thinnest regions may be merged begins
WIDE_PLANE = "the plane is wide against its central structure"  # in that note when the plane is too wide, not small


def _until(runner: Runner, sites: list, until: str, at: str | None, owner: str) -> list:
    """The cutting sites up to the last one ``until`` names; for a plane at a site, a clear error when it names only
    sites that run at or before the plane's (those are not partitioned)."""
    try:
        hit = select_sites(sites, until)
    except InvalidInputError:
        if at is None:
            raise
        try:
            early = [s.name for s in select_sites(runner.all_sites, until) if s.name not in runner.names]
        except InvalidInputError:
            early = []
        after = ", ".join(s.name for s in sites[:8]) + (" ..." if len(sites) > 8 else "")
        what = (f"names only sites at or before the plane's site {at!r} ({', '.join(early[:5])})" if early else
                f"matches none of the sites after the plane's site {at!r}")
        raise InvalidInputError(f"The 'until' parameter of {owner} {what}; it must name one of the {len(sites)} "
                                f"sites after it ({after}).") from None
    last = max(s.order for s in hit)
    return [s for s in sites if s.order <= last]


def _hidden_before_output(runner: Runner, sites: list) -> str | None:
    """``Runner.hidden_kink`` for the unit inputs of ``sites`` only, leaving out bends that reach just later sites or
    the model's output (``hidden_kink`` counts the output once ``sites`` run to the model's last site)."""
    last = max(s.order for s in sites)
    view = copy.copy(runner)
    view.hidden = [(b, o) for b, o in runner.hidden if o <= last]
    return view.hidden_kink(sites)


def _output_form(raw) -> tuple[str | None, bool]:
    """(a note when the output maps describe only part of the model's output ``raw``, or none of it; whether the
    scores are one column). The maps are fitted to what ``paths.runner.logits_of`` reads: a tensor (n, classes),
    the ``.logits`` of an output object or the first element of a tuple or list, and of an output with more than two
    axes ``out.reshape(n, -1, classes)[:, -1]`` (a sequence model's last position)."""
    t, part = raw, []
    if hasattr(raw, "logits"):
        t = raw.logits
        part.append("its .logits")
    elif isinstance(raw, (tuple, list)) and raw:
        t = raw[0]
        if len(raw) > 1:
            part.append(f"the first of its {len(raw)} elements")
    if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
        return (f"no output maps: the model's output ({type(raw).__name__}) holds no floating tensor of scores (maps "
                "are fitted to a tensor, the .logits of an output object, or the first element of a tuple or list)",
                False)
    if t.dim() > 2:
        c = t.shape[-1]
        part.append(f"the last row of {c} scores (out.reshape(n, -1, {c})[:, -1]) of an output of shape "
                    f"{tuple(t.shape[1:])}")
    note = ("output maps and decision boundary are of part of the model's output: " + ", then ".join(part)) \
        if part else None
    return note, t.dim() == 1 or t.shape[-1] == 1


def _check_tiling(area: torch.Tensor, plane: Plane, dtype, tol: float) -> None:
    """The regions tile the plane: no area negative or undefined, and their sum the plane's (to the affine checks'
    rounding). The all-lines cut checks each cell (``_arrangement``); this also covers the unit-by-unit and max-pool
    cuts, so a partition that rounding broke is an error, not a result labelled exact."""
    whole = plane.area
    total = float(area.sum())
    bad = int((~(area >= 0)).sum())  # negative or NaN
    if bad or not math.isfinite(total) or abs(total - whole) > affine_tol(dtype) * whole:
        raise NotPiecewiseLinearError(
            f"The regions of this slice do not tile the plane (area {total:.10g} of {whole:.10g}, {bad} regions of "
            f"negative or undefined area): rounding broke the partition at tol={tol:g}. Use float64, or a larger tol.")


def build(model, plane: Plane, *, until, units, dtype, device, tol, memory_budget, forward: Callable | None,
          capture_kwargs: dict, owner: str, want_output: bool, round_threads: int | None = None,
          tol_floor: float | None = None):
    """Run the exact partition; returns a dict of tensors for ``SliceResult``. With ``tol_floor`` (the default
    tol), a small plane lowers tol site by site down to it (``_Partitioner.site_tol``)."""
    t0 = time.perf_counter()
    m = prepare_model(model, dtype, device)
    _check_finite_model(m, owner, dtype)
    fwd = forward(m) if forward is not None else default_forward(m)
    plane = Plane(plane.origin.to(device, dtype), plane.basis.to(device, dtype), plane.domain.to(device, dtype),
                  plane.kind, plane.site, cast_inputs(plane.inputs, dtype, device), plane.anchors)
    if plane.site is None:
        probe = plane.origin[None]
    else:
        probe = index_inputs(plane.inputs, torch.zeros(1, dtype=torch.long, device=device))
    kx = torch.stack([plane.origin, plane.origin + plane.basis[0]])[None]
    spec = PathSpec(torch.tensor([[0.0, 1.0]], dtype=torch.float64), kx, torch.ones(1, dtype=torch.float64),
                    "segment", plane.site, plane.inputs if plane.site is not None else None)
    runner = Runner(m, fwd, spec, dtype=dtype, device=device, memory_budget=memory_budget,
                    capture_kwargs=capture_kwargs, owner=owner, probe_input=probe,
                    probe_name="slice points" if plane.site is None else None)
    want = runner.out_shape.get(plane.site)
    if want is not None and tuple(plane.shape) != tuple(want):
        raise InvalidInputError(f"The points of the plane of {owner} at layer {plane.site!r} must have that site's "
                                f"output shape {tuple(want)} (one example, no batch axis). Got {tuple(plane.shape)}.")
    sites = list(runner.processed)
    if not sites:
        raise InvalidInputError(f"No activation site runs after {plane.site or 'the input'} in this model, so {owner} "
                                "has no regions to find.")
    if until is not None:
        sites = _until(runner, sites, until, plane.site, owner)
    smooth = [s for s in sites if not s.activation.exact]
    if smooth:
        raise NotPiecewiseLinearError(f"not piecewise-linear: site {smooth[0].name!r} applies a smooth activation "
                                      f"({smooth[0].op}); exact slices need piecewise-linear models (use "
                                      "local_complexity for an approximate measure).")
    # the model's output matters only for output maps of the whole model: a partition cut at until= (or at some
    # units=), or made without outputs, is not refused for a bend that reaches only later sites or the output
    whole = until is None and units is None and want_output
    hidden = runner.hidden_kink(sites) if whole else _hidden_before_output(runner, sites)
    if hidden:
        raise runner.bend_error(hidden)
    bad, out_affine = runner.affinity_probe(want_output=want_output)
    bad = [b for b in bad if b in {s.name for s in sites}]
    if bad:
        raise NotPiecewiseLinearError(f"not piecewise-linear: the unit input of site {bad[0]!r} is not an affine "
                                      "function of the earlier sites' outputs (an operation capture does not see, "
                                      "e.g. LayerNorm or softmax, sits before it).")
    full = len(sites) == len(runner.processed) and units is None
    z_shape = {s.name: runner.z_shape[s.name] for s in sites}
    sel = None
    if units is not None:
        last = sites[-1]
        sel = site_unit_indices(last, tuple(z_shape[last.name]), units, owner).to(device)
    mdl = _Model(runner, plane)
    dom = plane.domain
    mesh = _mesh.Mesh(dom, torch.arange(len(dom), device=device)[None], torch.tensor([len(dom)], device=device))
    affine = runner.extract_affine(want_output=False)
    if affine is not None and any(s.apply is None for s in sites):
        affine = None
    part = _Partitioner(mdl, sites, z_shape, sel, tol, memory_budget, owner, round_threads, affine, tol_floor)
    part.run(mesh)
    R, dg = mesh.cells()
    W = int(dg.max())
    R = R[:, :W].contiguous()
    coords = mesh.coords[: mesh.nv]
    xy = take(coords, R)
    area = polygon_area(xy, dg)
    used = min([tol, *part.lowered.values()])  # the smallest relative tol of any site: the output's too
    _check_tiling(area, plane, dtype, used)
    out = {"plane": plane, "sites": sites, "z_shape": z_shape, "site_bytes": part.site_bytes, "ring": R, "deg": dg,
           "coords": coords, "area": area, "codes": mesh.rows[0][: mesh.nc], "rounds": part.rounds,
           "fallbacks": part.fallbacks, "full": full, "slope": None, "offset": None, "outputs": None, "units": sel,
           "boundary": None, "notes": []}
    if full and want_output:
        with torch.no_grad():
            form, single = _output_form(fwd(probe))
        bend = None if whole else runner.hidden_kink(sites)  # until= named the last site: the output still counts
        if form is not None:
            out["notes"].append(form)
        if bend is not None:
            out["notes"].append(f"no output maps: {bend}, a bend after the last site that the kink registry does not "
                                "follow, so the output is not affine over the regions")
        elif not out_affine and (form is None or not form.startswith("no output maps")):
            out["notes"].append("no output maps: the model's output is not an affine function over the regions (an "
                                "operation after the last site that capture does not follow, e.g. softmax or sigmoid)")
        elif out_affine:
            outs = mdl.outputs(coords)
            if not bool(torch.isfinite(outs).all()):
                raise not_finite("the model's scores", owner, dtype)
            slope, offset = fit_affine(coords, outs, R, dg)
            # one score: logits_of made it [0, s] (the binary-logit convention: class 1 where s > 0), which the
            # decision boundary keeps, but the maps are of the model's one output, as predict() should return
            out["slope"], out["offset"] = (slope[..., 1:], offset[:, 1:]) if single else (slope, offset)
            out["outputs"] = outs[:, 1:] if single else outs
            out["boundary"] = decision_boundary(part, coords, outs, R, dg, used)
    out["seconds"] = time.perf_counter() - t0
    out["tol"], out["lowered"], out["coarse"], out["wide"] = tol, part.lowered, part.coarse, part.wide
    return out
