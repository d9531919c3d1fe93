"""Exact boundary crossings along piecewise-affine paths: layered breakpoint refinement.

Invariant
---------
Sites are processed in execution order. Let B_k be the breakpoints found at sites before k (plus t = 0, 1 and
polyline knots). Between consecutive points of B_k every earlier site keeps each unit on one linear piece, so every
tensor that feeds site k is affine in t there, and so is site k's unit input z_k (the model is checked to be affine
between sites: ``Runner.affinity_probe``). Hence each unit crosses a kink at most once per kink inside such an
interval, at the t that ``Activation.crossings`` computes from z_k at the two ends, and z_k at a new breakpoint is the
linear interpolation of the ends. Crossings at all sites therefore come out exact up to float rounding (float64 by
default).

Evaluation
----------
Each breakpoint is evaluated once per later site, never by re-running the prefix:

* *affine route* (default when the Jacobian blocks between sites fit in half the memory budget): the runner reads the
  affine maps ``z_m = sum_l J_ml a_l + c_m`` off the model by capture (``Runner.extract_affine``). Points older than
  the previous site get one matrix product per site, batched over all points of a chunk of paths. Points that the
  previous site just created need no product at all: on their interval of B_{k-1} only the previous site's crossed
  units are not affine, so z_k there is the interpolation of the ends plus, per crossing, one Jacobian column times
  the crossed unit's slope jump times a hat function of the position (``_bend``, O(units) per point). Earlier sites'
  outputs at new points are interpolated; an output that only the next site reads is not merged at all.
* *appended layout* (the affine route on a GPU, where every site's unit inputs come from products at every point,
  when every site has one kink: ReLU, LeakyReLU, PReLU): per-point matrices stay in the order the points were made
  and a stage's new points are appended, never merged into path order; one pass per site (``_kink_scan``: a Triton
  kernel where Triton runs, torch operations elsewhere) adds the bias, flags the units that change side between
  consecutive points of a path and writes the activation's output, and a second one writes the output at the new
  points (``Refiner._run_chunk_appended``).
* *graph route* (any graph, any size): each new breakpoint runs one forward pass through ``capture`` that records the
  unit inputs of every later site. The site that made it is not re-evaluated there: its unit inputs are the
  interpolation of the interval's ends (crossed units exactly on their kinks) and replace its output, so the pass
  before that site runs on one row, or at the interval ends when a later part of the model reads it (a residual
  branch), whichever reproduces the unreduced pass on the model (``Refiner._eval_new``). At the ends, earlier sites'
  units within rounding of a kink (1000 ulps of their row's scale) are put on it, as the pass that made the end held
  its crossed units (``ScalarKinks.snapped``): a unit that stays on its kink over the interval stays on it.

Ties
----
``tie_tol`` (default 1e-12; in t on paths, relative to alpha on rays: ``geometry.TieTolerance``): crossings on one
interval closer than that become one breakpoint (at the first crossing's t); a crossing that close to an existing
breakpoint (including a unit exactly on its kink there) is placed at that breakpoint. Each such crossing is still
one record; ``ties`` counts the breakpoints that carry such coincidences. z == kink belongs to the lower piece (the
registry's convention); a unit whose crossings land on one breakpoint from both sides (it touches its kink there, or
a max-pool window ties there) changes piece there once, from the piece before to the piece after, or not at all
(``_net_changes``): one record or none.

Cost
----
Affine route: about one matrix product per breakpoint and later site beyond the next, O(units) for the next, plus
O(points x units) bookkeeping. Graph route: one pass through the part of the model after the site that made each
breakpoint (after the first site that a residual branch does not cross). Memory is chunked over paths to
``memory_budget``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InvalidInputError, NotPiecewiseLinearError, not_finite
from .._kink_scan import interpolated_outputs, scan, triton_ready
from ..kinks import Crossings, ScalarKinks, WindowMax, counts_below, lexsort, sort_crossings
from .geometry import TieTolerance
from .runner import SRC, Affine, Runner, index_inputs, same_values


_JOIN_EVERY = 64  # pieces (or runs of joined pieces) of one path joined at a time
_MIN_PIECE = 1e-10  # shortest piece of a path, in t (tie_tol is 1e-12 by default)
# device types on which the affine route evaluates every site's unit inputs by products at every point, instead of
# one product per earlier point and closed-form bends (``_bend``) at the previous site's new points: a GPU's float64
# matrix units outrun the half-dozen memory-bound passes of a bend (784->4x512 on an H100: see docs/benchmarks.md),
# while on a CPU the products are already half the run time
PRODUCTS_AT_EVERY_POINT = {"cuda"}
# with products at every point and one-kink sites only, keep per-point matrices in the order the points were made
# (``Refiner._run_chunk_appended``); False keeps them in path order (comparisons: bench_paths.py --layout)
APPENDED_LAYOUT = True
FRONTIER_SHARE_MAX_POINTS = 64  # pieces of at most this many points share their ends on the frontier route
# where a device measures its peak memory, a path's pieces are sized so that their measured peak takes at most this
# share of the budget (the rest: room for a piece whose breakpoints are made at wider sites than its predecessors')
MEASURED_PIECE_SHARE = 0.5


def piece_room(max_points: int) -> float:
    """New breakpoints a piece of a path may hold beside its two ends, when it may hold ``max_points`` points."""
    return max(1.0, 0.8 * max_points - 2)


def measured_piece_points(estimated: int, budget: int, peak: int, points: int) -> int:
    """Points the next pieces may hold after one of ``points`` points peaked at ``peak`` bytes: as many as take
    ``MEASURED_PIECE_SHARE`` of ``budget`` at that rate, never fewer than the estimate's ``estimated``."""
    return max(estimated, int(MEASURED_PIECE_SHARE * budget / (max(peak, 1) / max(points, 1))))


class DevicePeak:
    """The peak memory a piece allocates on a CUDA device beyond what was allocated when it started (``start``
    resets the device's peak statistics: a caller that wants a whole run's peak reads it before each piece, as
    ``benchmarks/bench_paths.py`` does)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    @staticmethod
    def of(device: torch.device) -> "DevicePeak | None":
        """A meter for ``device``, or None where torch keeps no allocation statistics (the CPU)."""
        return DevicePeak(device) if device.type == "cuda" else None

    def start(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) - self.base


@dataclass
class _Pending:
    """New points of the previous stage, in the merged arrays."""

    site: str
    new_idx: torch.Tensor  # (n,) positions of new points
    old_idx: torch.Tensor  # positions of the previous stage's points
    left: torch.Tensor  # (n,) index among the previous stage's points of their interval's left end
    u: torch.Tensor  # (n,) relative position in the interval
    grp: torch.Tensor  # (n,) interval id (sorted, contiguous)
    n_grp: int  # an upper bound on the number of intervals (grp < n_grp)
    c_point: torch.Tensor  # (c,) new point of each inner crossing
    c_unit: torch.Tensor
    c_jump: torch.Tensor | None  # slope jump of the crossed unit's output, per unit of u (affine route)


def _net_changes(seg: torch.Tensor, unit: torch.Tensor, piece: torch.Tensor, before: torch.Tensor,
                 snap_l: torch.Tensor, snap_r: torch.Tensor) -> torch.Tensor | None:
    """Which of a site's crossings count (a mask), where a unit's crossings land on one breakpoint from both sides:
    at the end of the segment before it (``snap_r``) and at the start of the one after (``snap_l``). The unit then
    changes piece there once, from the piece it left first to the one it entered last, or not at all where the two
    are equal (it touched a kink, or a max-pool window met a tie there, and turned back): only its last crossing
    there counts, or none. Without this the piece a breakpoint itself is given (the lower piece on a kink, the
    first maximum of a tied window) would count as a detour through that piece, twice. None: every crossing counts.
    Crossings are in (segment, t) order, so a unit's first crossing there is its first on the earlier segment and
    its last is its last on the later one; the engine's own bookkeeping (slope jumps, new points) keeps them all."""
    r, l_ = torch.nonzero(snap_r).flatten(), torch.nonzero(snap_l).flatten()
    if not len(r) or not len(l_):
        return None
    n_units = int(unit.max()) + 1
    key_r, key_l = (seg[r] + 1) * n_units + unit[r], seg[l_] * n_units + unit[l_]  # (breakpoint, unit)
    r, l_ = r[torch.isin(key_r, key_l)], l_[torch.isin(key_l, key_r)]
    if not len(r):
        return None
    keys, at = torch.unique((seg[r] + 1) * n_units + unit[r], return_inverse=True)
    first = torch.full((len(keys),), len(seg), dtype=torch.long, device=seg.device).scatter_reduce_(
        0, at, r, "amin")
    last = torch.full((len(keys),), -1, dtype=torch.long, device=seg.device).scatter_reduce_(
        0, torch.searchsorted(keys, seg[l_] * n_units + unit[l_]), l_, "amax")
    counted = torch.ones(len(seg), dtype=torch.bool, device=seg.device)
    counted[r] = False
    counted[l_] = False
    counted[last[before[first] != piece[last]]] = True
    return counted


def _still_legs(spec) -> torch.Tensor | None:
    """(paths, legs, input coordinates): whether a coordinate of a path's input is 0 at both knots of a leg, so all
    along it (a ray ``alpha * a`` keeps a's zeros; a polyline may rest on 0 for one leg); None where none is."""
    zero = spec.knots_x.reshape(*spec.knots_x.shape[:2], -1) == 0  # points of shape () too (a 1-D batch)
    legs = zero[:, :-1] & zero[:, 1:]
    return legs if bool(legs.any()) else None


def _copies_a_site(affine: Affine | None, site, still: torch.Tensor | None = None) -> bool:
    """Whether some unit input of ``site`` is a linear image of earlier sites' outputs alone that sits on one of its
    kinks when they are 0 (nothing from the path's own input, a constant equal to a kink): an activation applied to
    another's output, directly or through a transpose, pooling, upsampling, a bias-free convolution or a
    concatenation (``F.leaky_relu(F.relu(x))``). Such an input is exactly on its kink wherever the units it reads are
    off; a closed-form bend's rounding would leave it at +-1e-17 at the earlier sites' breakpoints, on either side of
    the kink (crossings counted that are not there), where a product at every point keeps it exact. ``still``
    (``_still_legs``): coordinates of the path's input that stay 0 along a leg, which such a unit may read too."""
    if affine is None or not isinstance(site.activation, ScalarKinks) or site.name not in affine.deps:
        return False
    c = affine.c[site.name]
    kinks = torch.tensor(site.activation.kinks, dtype=c.dtype, device=c.device)
    on_kink = torch.isin(c, kinks)  # (1 or paths, units): the constant is a kink
    cols = on_kink.any(0)
    if not bool(cols.any()):
        return False
    on_kink = on_kink[:, cols]
    if still is None:
        return _any_off(affine, site.name, None, cols, on_kink)
    n_paths, n_legs, width = still.shape
    rows = still.reshape(n_paths * n_legs, width)
    if len(on_kink) == 1:  # one constant for every path: the distinct legs decide
        return _any_off(affine, site.name, torch.unique(rows, dim=0), cols, on_kink)
    pairs = torch.unique(torch.cat([rows, on_kink.repeat_interleave(n_legs, 0)], 1), dim=0)  # each leg's own row
    return _any_off(affine, site.name, pairs[:, :width], cols, pairs[:, width:])


def _any_off(affine: Affine, name: str, still: torch.Tensor | None = None, cols: torch.Tensor | None = None,
             where: torch.Tensor | None = None, cells: int = 1 << 24) -> bool:
    """Whether some unit of site ``name`` (of those in ``cols``; where ``where``, one row or one per row of ``still``)
    reads earlier sites' outputs alone, or also coordinates of the path's input that stay 0 along a leg (a row of
    ``still``), but no coordinate that moves: only such a unit can hold an exact constant over an interval (where the
    units it reads are off). Rows of ``still`` go a block of ``cells`` products at a time, stopping at the first."""
    reads = affine.jt[name, SRC] if SRC in affine.deps[name] else None
    if reads is None:  # nothing from the path's input
        return bool(where.any()) if where is not None else True
    reads = (reads if cols is None else reads[:, cols]).ne(0)  # (input coordinates, units)
    if still is None:  # units that read the path's input move with t
        off = ~reads.any(0, keepdim=True)
        return bool((off & where).any()) if where is not None else bool(off.any())
    reads = reads.to(torch.float32)
    step = max(1, cells // sum(reads.shape))  # a block's moving coordinates and products
    for a in range(0, len(still), step):
        moving = (~still[a:a + step]).to(device=reads.device, dtype=torch.float32)
        off = (moving @ reads) == 0  # no moving coordinate read (0/1 counts, exact in float32 below 2^24)
        if where is not None:
            off &= where if len(where) == 1 else where[a:a + step]
        if bool(off.any()):
            return True
    return False


def _exact_inputs(affine: Affine | None, sites: list, still: torch.Tensor | None = None) -> list[bool]:
    """The sites whose unit inputs must come from products at every point: those that copy a site
    (``_copies_a_site``), and backwards from them every site they read whose units can hold exact constants
    (``_any_off``). A copying site's products are exact only where the outputs they read are: a clamp whose
    0 lies inside a linear piece passes a ReLU's exact zeros on, but a closed-form bend would hand it +-1e-17 at the
    ReLU's breakpoints, and the copying site after it would then sit off its kink. ``still``: as in
    ``_copies_a_site``."""
    exact = [_copies_a_site(affine, s, still) for s in sites]
    if affine is None:
        return exact
    need = [k for k, c in enumerate(exact) if c]
    at = {s.name: k for k, s in enumerate(sites)}
    legs = None if still is None or not need else torch.unique(still.reshape(-1, still.shape[-1]), dim=0)
    while need:
        for leaf in affine.deps[sites[need.pop()].name]:
            j = at.get(leaf)
            if j is not None and not exact[j] and leaf in affine.deps and _any_off(affine, leaf, legs):
                exact[j] = True
                need.append(j)
    return exact


def _records(pid: torch.Tensor, cr: dict, k: int) -> tuple:
    """A site's crossings as records (path, t, site, unit, piece entered): those that count (``_net_changes``)."""
    m = cr["counted"]
    if m is None:
        return pid[cr["seg"]], cr["rec_t"], k, cr["unit"], cr["piece"]
    return pid[cr["seg"][m]], cr["rec_t"][m], k, cr["unit"][m], cr["piece"][m]


def _end_crossings(cr: dict) -> tuple | None:
    """A piece of a path: the units of a site's crossings on its first point and the pieces they enter, and the
    units of those on its last point and the pieces they leave (``_join_pieces`` merges them as ``_net_changes``
    does within a piece); None where the crossings do not say which piece they leave."""
    if cr["before"] is None:
        return None
    first, last = cr["ends"]
    return cr["unit"][first], cr["piece"][first], cr["unit"][last], cr["before"][last]


def _net_changes_at_joint(a: tuple, b: tuple, ends_a: tuple | None, ends_b: tuple | None, t_joint) -> tuple:
    """One site's records of two consecutive pieces of a path, ``a`` then ``b``, with the crossings of a unit that
    land on their shared point from both sides merged by ``_net_changes``, as within a piece: ``a``'s crossings on
    its last point and ``b``'s on its first are one site's crossings along two segments that meet there. Their
    records are those at ``t_joint``, in the same order (each piece's records follow its crossings)."""
    if ends_a is None or ends_b is None:
        return a, b
    units_a, before_a, units_b, entered_b = ends_a[2], ends_a[3], ends_b[0], ends_b[1]
    n_a, n_b = len(units_a), len(units_b)
    if not n_a or not n_b:  # (lengths known on the host: no wait for a device)
        return a, b
    on_a = torch.arange(n_a + n_b, device=units_a.device) < n_a  # segment 0 ends there, segment 1 starts there
    pieces = torch.cat([before_a, entered_b])  # what ``_net_changes`` reads: before a's first, after b's last
    counted = _net_changes(on_a.logical_not().long(), torch.cat([units_a, units_b]), pieces, pieces, ~on_a, on_a)
    if counted is None:
        return a, b

    def kept(rec, counts):
        keep = torch.ones(len(rec[1]), dtype=torch.bool, device=rec[1].device)
        keep[torch.nonzero(rec[1] == t_joint).flatten()] = counts
        return tuple(x[keep] if j != 2 else x for j, x in enumerate(rec))
    return kept(a, counted[:n_a]), kept(b, counted[n_a:])


def _merge(old: torch.Tensor, new: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor) -> torch.Tensor:
    """Rows ``old`` and ``new`` at positions ``old_pos`` and ``new_pos`` of one array."""
    out = old.new_empty((len(old) + len(new), *old.shape[1:]))
    out.index_copy_(0, old_pos, old)  # a row copy: faster than an indexed assignment on the CPU
    out.index_copy_(0, new_pos, new.to(old.dtype))
    return out


def _lerp_rows(x: torch.Tensor, left: torch.Tensor, u: torch.Tensor, order: torch.Tensor | None = None,
               offset: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``left + u`` of ``x``, interpolated between rows ``left`` and ``left + 1``; with ``order``, between rows
    ``order[left]`` and ``order[left + 1]``, and ``offset`` added to both first (``Refiner._run_chunk_appended``)."""
    lo, hi = (left, left + 1) if order is None else (order[left], order[left + 1])
    xl, xr = x.index_select(0, lo), x.index_select(0, hi)
    if offset is not None:
        xl, xr = xl.add_(offset), xr.add_(offset)
    return xl.lerp_(xr, u.reshape(-1, *([1] * (x.dim() - 1))))


class _Rows:
    """Values at every point of a chunk in the order the points were made, as row blocks: a stage's new points
    are appended, nothing is merged (``Refiner._run_chunk_appended``)."""

    def __init__(self, *blocks: torch.Tensor):
        self.blocks = list(blocks)

    def append(self, block: torch.Tensor) -> None:
        self.blocks.append(block)

    def spans(self):
        """``(first row, block)`` of every block."""
        r0 = 0
        for b in self.blocks:
            yield r0, b
            r0 += len(b)

    def joined(self) -> torch.Tensor:
        """All rows as one tensor (the blocks are joined once, and kept joined)."""
        if len(self.blocks) > 1:
            self.blocks = [torch.cat(self.blocks)]
        return self.blocks[0]


def _cumsum_rows(x: torch.Tensor, block: int = 32, seg: torch.Tensor | None = None,
                 reverse: bool = False) -> torch.Tensor:
    """``torch.cumsum(x, 0)`` for a (n, d) tensor, several times faster: a triangular product within blocks of
    rows, then the running block totals, the same way while there are many blocks (torch's cumsum along a
    non-innermost dimension is a strided loop on the CPU and one sequential thread per column on a GPU).

    ``seg`` (n,): labels of contiguous runs of rows (one label per run); the sums then restart at each run, and no
    run's sums pass through another's, so each carries rounding of its own size only (``_bend``: subtracting a
    running sum over all runs left eps times every earlier run's sums, 1e9 times too much at small alpha on a ray
    over (-1, 1e9) when another path's run over alpha up to 1e9 came first). ``reverse``: sums from the last row (of
    each run) back, ``x[i:]`` summed."""
    n, d = x.shape
    if seg is None and not reverse and n <= block:
        return x.cumsum(0)
    nb = -(-n // block)
    pad = nb * block - n
    xp = x if not pad else torch.cat([x, x.new_zeros(pad, d)])
    tri = torch.ones(block, block, dtype=torch.bool, device=x.device)
    tri = tri.triu_() if reverse else tri.tril_()  # row i sums rows j >= i, or j <= i
    if seg is None:
        mask, sp = tri.to(x.dtype), None
    else:
        sp = (seg if not pad else torch.cat([seg, seg[-1:].expand(pad)])).view(nb, block)  # zeros join the last run
        mask = (tri & (sp[:, :, None] == sp[:, None, :])).to(x.dtype)
    within = torch.matmul(mask, xp.view(nb, block, d))
    if nb > 1:
        edge = 0 if reverse else -1  # the row of each block that its neighbour's carry continues
        lab = None if sp is None else sp[:, edge]
        carry = _cumsum_rows(within[:, edge], block, lab, reverse)  # totals over whole blocks (of one run)
        into, frm = (within[:-1], carry[1:]) if reverse else (within[1:], carry[:-1])
        if sp is None:
            into += frm[:, None]
        else:  # only the rows of the run that the neighbouring block ends (or starts) with
            same = (sp[:-1] if reverse else sp[1:]) == (lab[1:] if reverse else lab[:-1])[:, None]
            into.addcmul_(same[:, :, None].to(x.dtype), frm[:, None])  # times 1 or 0: exact, one pass
    return within.view(-1, d)[:n]


_PAIRWISE_MAX = 16  # intervals with at most this many new points sum their point pairs directly


def _bend(line: torch.Tensor, u: torch.Tensor, grp: torch.Tensor, n_grp: int, v: torch.Tensor | None) -> torch.Tensor:
    """Values at the new points of each interval (contiguous groups, sorted by u in (0, 1)) of the function that is
    zl at u = 0, zr at u = 1 and linear except that its slope grows by ``v[i]`` at point i; ``line`` holds
    lerp(zl, zr, u_i) and is overwritten.

    Closed form (the Green's function of d2/du2 on [0, 1] with zero ends): z_i = lerp(zl, zr, u_i) - sum_j
    min(u_i, u_j) (1 - max(u_i, u_j)) v_j over the points j of i's interval. Intervals with few points sum their
    pairs (O(points^2) rows, no running sums); longer ones use prefix sums, z_i = lerp - (1 - u_i) sum_{j<i} u_j v_j -
    u_i sum_{j>i} (1 - u_j) v_j (and the j = i term), taken over all long intervals' rows at once, each sum within its
    own interval only, the first from the interval's start and the second from its end (``_cumsum_rows`` with runs):
    so a value near an end where the path's unit inputs are small (a ray near alpha = 0) is rounded on their scale.
    Before, the sums ran over every long interval and were restarted by subtracting the sum before the
    interval, rounding of order eps times that running sum: on a batch of rays over (-1, 1e9) a unit at alpha
    -0.17 of the second ray was 7e-8 off (the first ray's interval up to alpha 1e9 came first), 2e-7 in alpha, and
    its crossing failed the final check. About seven passes over (points x units), against one matrix product per
    point for a forward evaluation.
    """
    out = line
    if v is None or not len(u):
        return out
    out.addcmul_(v, (u * (u - 1.0))[:, None])  # j = i
    counts = counts_below(grp, n_grp)
    w = counts[grp]
    pairs = torch.nonzero((w > 1) & (w <= _PAIRWISE_MAX)).flatten()
    if len(pairs):
        wi = w[pairs]
        first = (torch.cumsum(counts, 0) - counts)[grp[pairs]]
        i = pairs.repeat_interleave(wi)
        ends = torch.cumsum(wi, 0)
        j = first.repeat_interleave(wi) + torch.arange(len(i), device=u.device) - (ends - wi).repeat_interleave(wi)
        off = j != i
        i, j = i[off], j[off]
        ui, uj = u[i], u[j]
        coef = torch.minimum(ui, uj) * (torch.maximum(ui, uj) - 1.0)
        out.index_add_(0, i, v[j] * coef[:, None])
    long = torch.nonzero(w > _PAIRWISE_MAX).flatten()
    if len(long):
        # prefix sums restarted at each interval (``_cumsum_rows``'s runs), sum_{j<i} from the interval's start and
        # sum_{j>i} from its end: each is rounded on the scale of the terms it sums, which near an end where u_i or
        # 1 - u_i is small (a ray's alpha near 0) are small too
        g = grp[long]
        ul, vl = u[long, None], v[long]
        x = ul * vl
        before = _cumsum_rows(x, seg=g).sub_(x)  # sum_{j<i} u_j v_j
        y = vl.mul_(1.0 - ul)  # (1 - u_j) v_j (not v_j - u_j v_j: eps |v_j| off where u_j is near 1)
        after = _cumsum_rows(y, seg=g, reverse=True).sub_(y)  # sum_{j>i} (1 - u_j) v_j
        before.mul_(1.0 - ul).add_(after.mul_(ul))
        out.index_add_(0, long, before, alpha=-1.0)
    return out


@dataclass
class _Points:
    """The current points of a chunk's paths, in path order: path, position t, tie flag, and id (ids count the
    points in the order they were made)."""

    pid: torch.Tensor
    t: torch.Tensor
    tied: torch.Tensor
    ids: torch.Tensor
    n_ids: int

    @staticmethod
    def start(spec, gpids: torch.Tensor, t_range: tuple[float, float] | None) -> "_Points":
        """The knots of paths ``gpids``, or those of ``[t_range[0], t_range[1]]`` of a single path and its ends."""
        kt = spec.knots_t[gpids]
        if t_range is not None:
            a, b = t_range
            inside = kt[0][(kt[0] > a) & (kt[0] < b)]
            kt = torch.cat([kt.new_tensor([a]), inside, kt.new_tensor([b])])[None]
        c_paths, k0 = kt.shape
        t = kt.reshape(-1).clone()
        dev = t.device
        return _Points(torch.arange(c_paths, device=dev).repeat_interleave(k0), t,
                       torch.zeros(len(t), dtype=torch.bool, device=dev), torch.arange(len(t), device=dev), len(t))

    def insert(self, cr: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Insert a site's new breakpoints (``Refiner._crossings``); returns the old and new points' positions."""
        n, pj = len(self.t), cr["pj"]
        dev = pj.device
        self.tied.index_fill_(0, cr["snapped_to"], True)
        cnt = counts_below(pj, n)
        before = torch.cumsum(cnt, 0) - cnt
        old_pos = torch.arange(n, device=dev) + before
        new_pos = pj + 1 + torch.arange(len(pj), device=dev)
        self.tied = _merge(self.tied, cr["sizes"] >= 2, old_pos, new_pos)
        self.t = _merge(self.t, cr["pt"], old_pos, new_pos)
        self.pid = _merge(self.pid, self.pid[pj], old_pos, new_pos)
        self.ids = _merge(self.ids, torch.arange(self.n_ids, self.n_ids + len(pj), device=dev), old_pos, new_pos)
        self.n_ids += len(pj)
        return old_pos, new_pos


class _PointCache:
    """Graph route: values evaluated at points, kept in the batches they were evaluated in, by point id. A site's
    unit inputs are assembled at every current point once, when the site is processed (no merge per stage)."""

    def __init__(self):
        self.blocks: dict[str, list] = {}  # key -> [(point ids, values)]

    def add(self, ids: torch.Tensor, batches) -> None:
        for rows, values in batches:
            for key, v in values.items():
                self.blocks.setdefault(key, []).append((ids[rows], v))

    def take(self, key: str, ids: torch.Tensor, n_ids: int) -> torch.Tensor:
        """Values of ``key`` at points ``ids`` (in that order), every one of which was evaluated."""
        blocks = self.blocks.pop(key)
        pos = torch.empty(n_ids, dtype=torch.long, device=ids.device)
        pos[ids] = torch.arange(len(ids), device=ids.device)
        out = blocks[0][1].new_empty(len(ids), blocks[0][1].shape[1])
        for bid, v in blocks:
            out.index_copy_(0, pos[bid], v)
        return out


def _inputs_at_new(act, zf: torch.Tensor, cr: dict, rows: slice = slice(None), order: torch.Tensor | None = None,
                   offset: torch.Tensor | None = None) -> torch.Tensor:
    """A site's unit inputs (points x units) at the breakpoints it just made (``rows`` of them): interpolated on
    their interval of the previous stage (every unit is affine there), and a crossed unit exactly on its kink.
    ``order``, ``offset``: the points' rows of ``zf`` and a term added to them (as ``_lerp_rows``)."""
    znew = _lerp_rows(zf, cr["pj"][rows], cr["pu"][rows], order, offset)
    if isinstance(act, ScalarKinks) and len(cr["gid"]):
        c_point = cr["gid"]  # non-decreasing: the crossings of a slice of new points are contiguous
        first, stop, _ = rows.indices(len(cr["pj"]))
        if (first, stop) == (0, len(cr["pj"])):
            lo, hi = 0, len(c_point)
        else:
            lo, hi = torch.searchsorted(c_point, c_point.new_tensor([first, stop])).tolist()
        idx = cr["inner"][lo:hi]
        c_unit = cr["unit"][idx]
        if len(act.kinks) == 1:
            # index_fill_ takes the value as a kernel argument (an index_put_ of a Python number copies it over)
            znew.view(-1).index_fill_(0, (c_point[lo:hi] - first) * znew.shape[1] + c_unit, act.kinks[0])
        else:
            seg_i, piece = cr["seg"][idx], cr["piece"][idx]
            at0, at1 = (seg_i, seg_i + 1) if order is None else (order[seg_i], order[seg_i + 1])
            up = zf[at1, c_unit] > zf[at0, c_unit]  # the same with or without the offset
            kinks = torch.tensor(act.kinks, dtype=zf.dtype, device=zf.device)
            znew[c_point[lo:hi] - first, c_unit] = kinks[torch.where(up, piece - 1, piece)]
    return znew


def piece_lines(site, act: ScalarKinks, zshape: tuple, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Slope and intercept of the site's output on each piece, per unit: two (n_pieces, units) tensors, probed
    through ``site.apply`` (two points inside each piece)."""
    k = list(act.kinks)
    pts = []
    for p in range(act.n_pieces):
        if p == 0:
            pts.append((k[0] - 2.0, k[0] - 1.0))
        elif p == len(k):
            pts.append((k[-1] + 1.0, k[-1] + 2.0))
        else:
            w = k[p] - k[p - 1]
            pts.append((k[p - 1] + 0.25 * w, k[p - 1] + 0.75 * w))
    vals = torch.tensor([v for pr in pts for v in pr], dtype=dtype, device=device)
    z = vals.reshape(-1, *([1] * len(zshape))).expand(len(vals), *zshape).contiguous()
    out = site.apply(z).reshape(len(vals), -1)
    lo, hi = out[0::2], out[1::2]
    zlo, zhi = vals[0::2, None], vals[1::2, None]
    slope = (hi - lo) / (zhi - zlo)
    return slope, hi - slope * zhi


def _kernel_lines(site, act: ScalarKinks, zshape: tuple, dtype, device) -> torch.Tensor | None:
    """``(g0, g1, h0, h1)`` of a one-kink site (``_kink_scan.scan``'s ``lines``), when they reproduce
    ``site.apply`` on random inputs and on the kink to rounding (1e-13 relative); else None (the kernel then leaves
    the output to ``site.apply``)."""
    slope, icept = piece_lines(site, act, zshape, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    z = (4.0 * torch.randn(4, *zshape, generator=g, dtype=dtype)).to(device)
    z[0] = act.kinks[0]
    zf = z.reshape(4, -1)
    want = site.apply(z).reshape(4, -1)
    got = torch.where(zf > act.kinks[0], zf * slope[1] + icept[1], zf * slope[0] + icept[0])
    if not bool(((got - want).abs() <= 1e-13 * want.abs().clamp_min(1.0)).all()):
        return None
    return torch.cat([slope, icept]).contiguous()


class Refiner:
    """Layered breakpoint refinement over one chunk of paths at a time."""

    def __init__(self, runner: Runner, affine: Affine | None, ties: TieTolerance, want_output: bool,
                 units: torch.Tensor | None = None, output_affine: bool = False, frontier=None, local: bool = False):
        self.r = runner
        self.frontier = frontier  # a ``frontier.FrontierProgram``: all points advance site by site (graph models)
        self.local = local  # with ``frontier``'s graph: values held per spatial position (``paths.local``)
        self.units = units  # flat unit indices of the last site whose crossings are wanted (None = all)
        self.aff = affine
        self.ties = ties
        self.want_output = want_output
        self.reduction: dict[str, str] = {}  # graph route: how the pass before each site runs at its new points
        # when the model output is affine on every region the processed sites bound (``output_affine``: no
        # nonlinearity after them, every unit followed), its value at a region's midpoint is the mean of its values
        # at the region's ends, which come with the points; otherwise the midpoints are evaluated
        self.output_at_points = want_output and output_affine and units is None and not local and (
            affine is None or "output" in affine.deps)
        names = runner.names
        self.slopes = {}
        if affine is not None:
            for s in runner.processed:
                if isinstance(s.activation, ScalarKinks):
                    self.slopes[s.name] = piece_lines(s, s.activation, runner.z_shape[s.name], runner.dtype,
                                                      runner.device)[0]
            # last target index using each leaf's stored values
            targets = names + (["output"] if "output" in affine.deps else [])
            self.last_use = {}
            for i, m in enumerate(targets):
                for leaf in affine.deps[m]:
                    self.last_use[leaf] = i
        # max pooling compares window entries that are often exactly equal (clamped ReLU/ReLU6 outputs): its inputs
        # are evaluated by products at every point, so exact ties are not broken by rounding; on a GPU every site's
        # are (PRODUCTS_AT_EVERY_POINT)
        every = runner.device.type in PRODUCTS_AT_EVERY_POINT
        exact = [False] * len(runner.processed) if every or affine is None else _exact_inputs(
            affine, runner.processed, _still_legs(runner.spec))
        self.dense = [every or isinstance(s.activation, WindowMax) or e for s, e in zip(runner.processed, exact)]
        # products at every point and one-kink sites only: unit inputs are kept in the order their points were made
        # (``_run_chunk_appended``), scanned in one pass per site (``_kink_scan``) and never merged into path order
        self.append = APPENDED_LAYOUT and affine is not None and every and all(
            isinstance(s.activation, ScalarKinks) and len(s.activation.kinks) == 1 for s in runner.processed)
        # (points x width) arrays the appended layout holds at once per point: a site's unit inputs and output, the
        # previous site's output, the new points' outputs (a byte per unit for the side changes), and two for each
        # site output read beyond the next site (its rows and their joined copy)
        self.point_widths = 4 + 2 * sum(1 for leaf, last in getattr(self, "last_use", {}).items()
                                        if leaf in names and last > names.index(leaf) + 1)
        self.lines = {}  # site -> the kernel's form of its activation (``_kernel_lines``), when the kernel runs
        if self.append and triton_ready(torch.empty(0, device=runner.device)):
            for s in runner.processed:
                self.lines[s.name] = _kernel_lines(s, s.activation, runner.z_shape[s.name], runner.dtype,
                                                   runner.device)
        # what each site's output is kept for: "all" points (merged stage by stage) when a site after the next one, a
        # dense next site, or the output reads it; "next" (only the next site reads it, at the points it was made
        # at: no merge); None when nothing later reads it
        self.keep: list[str | None] = []
        if affine is not None:
            for k, s in enumerate(runner.processed):
                last = self.last_use.get(s.name, -1)  # len(names) when the output reads it
                nxt = last == k + 1 < len(names)
                if last > k + 1 or (nxt and self.dense[k + 1]) or (want_output and s.name in affine.deps.get(
                        "output", [])):
                    self.keep.append("all")
                else:
                    self.keep.append("next" if nxt else None)

    def _read_after(self, leaf: str, k: int) -> bool:
        """Whether a stored value (affine route) is read after site ``k``: by a later site, or by the output."""
        return self.last_use.get(leaf, -1) > k or (self.want_output and leaf in self.aff.deps.get("output", []))

    # ------------------------------------------------------------------------------------------------ stage
    def _crossings(self, cr, pid, t, within_paths: bool = False):
        """Crossings ``cr`` of a site along the current points (segment i from point i to i + 1) as breakpoints:
        those across paths dropped (none when ``within_paths``), those within ``tie_tol`` of an end snapped to it,
        the others grouped into new points (``pj``: interval, ``pt``: t, ``pu``: position in the interval). The
        common case, no snapped crossing and no two within ``tie_tol`` on one interval, skips the operations that
        only ties need (on a GPU each operation is host time while the device waits)."""
        # masks are turned into index lists once each: on a GPU every boolean-mask read is a wait for the device
        before = cr.before
        if within_paths:
            seg, unit, s, piece = cr.segment, cr.unit, cr.t, cr.piece
        else:
            same = pid[:-1] == pid[1:]
            kept = torch.nonzero(same[cr.segment]).flatten()
            seg, unit, s, piece = (x[kept] for x in (cr.segment, cr.unit, cr.t, cr.piece))
            before = None if before is None else before[kept]
        tl, tr = t[seg], t[seg + 1]
        dt = tr - tl
        off = s * dt
        tc = tl + off
        tie = self.ties.at(tc)
        snap_l = off <= tie
        snap_r = (~snap_l) & ((dt - off) <= tie)
        snapped = snap_l | snap_r
        n_inner = len(seg) - int(snapped.sum())
        counted = None if n_inner == len(seg) or before is None else _net_changes(seg, unit, piece, before, snap_l,
                                                                                  snap_r)
        if n_inner < len(seg):
            by_side = torch.argsort(snapped.to(torch.uint8), stable=True)
            inner, outer = by_side[:n_inner], by_side[n_inner:]  # crossing indices, each in order
            ji, ti, si = seg[inner], tc[inner], s[inner]
        else:
            inner, outer = torch.arange(len(seg), device=t.device), None
            ji, ti, si = seg, tc, s
        newg = torch.ones(len(ji), dtype=torch.bool, device=t.device)
        if len(ji) > 1:
            newg[1:] = (ji[1:] != ji[:-1]) | ((ti[1:] - ti[:-1]) > self.ties.at(ti[1:]))
        first = torch.nonzero(newg).flatten()
        grouped = len(first) < len(ji)  # some crossings share a new point
        if grouped:
            gid = torch.cumsum(newg.long(), 0) - 1
            pj, pt, pu = ji[first], ti[first], si[first]
            sizes = counts_below(gid, len(pj))
        else:
            gid = inner if outer is None else torch.arange(len(ji), device=t.device)
            pj, pt, pu = ji, ti, si
            sizes = torch.ones(len(pj), dtype=torch.long, device=t.device)
        if outer is None:
            rec_t = pt[gid] if grouped else tc
            snapped_to = seg.new_zeros(0)
            ends = (seg.new_zeros(0), seg.new_zeros(0))
        else:
            rec_t = torch.where(snap_l, tl, torch.where(snap_r, tr, tc))
            if grouped:
                rec_t[inner] = pt[gid]
            snapped_to = torch.where(snap_l, seg, seg + 1)[outer]
            ends = (outer[snapped_to == 0], outer[snapped_to == len(t) - 1])
        return dict(seg=seg, unit=unit, piece=piece, inner=inner, rec_t=rec_t, gid=gid, pj=pj, pt=pt, pu=pu,
                    sizes=sizes, snapped_to=snapped_to, counted=counted, before=before, ends=ends)

    def _jumps(self, site, z, cr) -> torch.Tensor:
        """Slope jump (per unit of relative position u) of each crossed unit's output at its crossing."""
        act = site.activation
        seg, unit, piece = cr["seg"], cr["unit"], cr["piece"]
        n = len(seg)
        o = lexsort(seg, unit)
        so, uo = seg[o], unit[o]
        prev_same = torch.zeros(n, dtype=torch.bool, device=z.device)
        if n > 1:
            prev_same[1:] = (so[1:] == so[:-1]) & (uo[1:] == uo[:-1])
        if isinstance(act, ScalarKinks):
            zf = z.reshape(len(z), -1)
            zl, zr = zf[seg, unit], zf[seg + 1, unit]
            first = act.pieces(zl)
            dz = zr - zl
        elif isinstance(act, WindowMax):
            wl, wr = act.unit_windows(z, seg, unit), act.unit_windows(z, seg + 1, unit)
            first = wl.argmax(-1)
            dw = torch.where(torch.isfinite(wl), wr - wl, torch.zeros_like(wl))
        else:  # pragma: no cover - the registry has two exact families
            raise NotPiecewiseLinearError(f"site {site.name!r}: no exact slope rule for {act.name}")
        pb_o = first[o].clone()
        pa_o = piece[o]
        if n > 1:
            pb_o[1:] = torch.where(prev_same[1:], pa_o[:-1], pb_o[1:])
        before = torch.empty_like(pb_o)
        before[o] = pb_o
        if isinstance(act, ScalarKinks):
            g = self.slopes[site.name]
            return (g[piece, unit] - g[before, unit]) * dz
        ar = torch.arange(n, device=z.device)
        return dw[ar, piece] - dw[ar, before]

    # --------------------------------------------------------------------------------------------- values
    def _src(self, gpid, t) -> torch.Tensor:
        return self.r.spec.points(gpid, t).reshape(len(t), -1)

    def _affine_z(self, m: str, pid, t, gpids, store, prev, pend: _Pending | None, dense: bool = False):
        """Unit inputs of site ``m`` at every point: one product per leaf at the previous stage's points, and
        ``_bend`` (no product) at the points the previous site just created."""
        aff = self.aff
        old = None if pend is None or dense else pend.old_idx
        rows_pid = pid if old is None else pid[old]
        c = aff.c[m]
        c = c if c.shape[0] == 1 else c[gpids[rows_pid]]
        zo = None
        for leaf in aff.deps[m]:
            if leaf == SRC:
                a = self._src(gpids[rows_pid], t if old is None else t[old])
            elif old is not None and leaf in prev:
                a = prev[leaf]  # already at the previous stage's points
            else:
                a = store[leaf] if old is None else store[leaf][old]
            zo = torch.addmm(c, a, aff.jt[m, leaf]) if zo is None else zo.addmm_(a, aff.jt[m, leaf])
        if zo is None:
            zo = c.expand(len(rows_pid), -1).clone()
        if old is None:
            return zo
        v = None
        if pend.site in aff.deps[m] and len(pend.c_point):
            jt = aff.jt[m, pend.site]
            if len(pend.c_point) == len(pend.u):  # no ties: one crossing per new point, in point order
                v = jt.index_select(0, pend.c_unit).mul_(pend.c_jump[:, None])
            else:
                v = zo.new_zeros(len(pend.u), zo.shape[1])
                v.index_add_(0, pend.c_point, jt[pend.c_unit] * pend.c_jump[:, None])
        znew = _bend(_lerp_rows(zo, pend.left, pend.u), pend.u, pend.grp, pend.n_grp, v)
        z = zo.new_empty(len(t), zo.shape[1])
        z.index_copy_(0, old, zo)
        z.index_copy_(0, pend.new_idx, znew)
        return z

    # ---------------------------------------------------------------------------------------------- chunk
    def run_chunk(self, gpids: torch.Tensor, t_range: tuple[float, float] | None = None,
                  first: dict | None = None) -> dict:
        """Refine paths ``gpids`` (all of each), or only ``[t_range[0], t_range[1]]`` of a single path.

        Graph and frontier routes, one piece of a path: ``first`` holds the values evaluated at ``t_range[0]`` by the
        piece before (its ``"last"``), so the point two pieces share is evaluated once and both see the same values;
        the piece's own values at ``t_range[1]`` come back as ``"last"``."""
        if self.local:
            return self._run_chunk_local(gpids, t_range)
        if self.frontier is not None:
            return self._run_chunk_frontier(gpids, t_range, first)
        if self.append:
            return self._run_chunk_appended(gpids, t_range)
        r = self.r
        dev = r.device
        pts = _Points.start(r.spec, gpids, t_range)
        pid, t, tied, ids, n_ids = pts.pid, pts.t, pts.tied, pts.ids, pts.n_ids
        store: dict = {}  # leaf -> its values at every current point
        prev: dict = {}  # leaf -> its values at the previous stage's points (used by the next site only)
        cache = _PointCache()  # graph route: evaluated values by point id
        pend: _Pending | None = None
        z_new = None  # graph route: what gives the last site's unit inputs at the breakpoints it made
        z_last = None  # the last site's unit inputs before its breakpoints, when the trace evaluates midpoints
        recs, ends = [], []  # ends: the crossings on the first and last point of each site (a piece of a path)
        names = r.names
        with_output = self.output_at_points and self.aff is None
        last_values = None
        if self.aff is None:
            skip = 0 if first is None else 1
            if skip:
                cache.add(ids[:1], [(slice(0, 1), first)])
            batches = [(slice(rows.start + skip, rows.stop + skip), o) for rows, o in
                       r.eval_point_batches(gpids[pid[skip:]], t[skip:], names, with_output)]
            cache.add(ids, batches)
            if t_range is not None:  # the next piece starts here
                last_values = {key: v[-1:].clone() for key, v in batches[-1][1].items()}
        for k, site in enumerate(r.processed):
            name, act = site.name, site.activation
            zshape = r.z_shape[name]
            if self.aff is None:
                if pend is not None and len(pend.new_idx):
                    cache.add(ids[pend.new_idx], self._eval_new(k - 1, pend, z_new, gpids, pid, t, with_output))
                zf = cache.take(name, ids, n_ids)
            else:
                zf = self._affine_z(name, pid, t, gpids, store, prev, pend, dense=self.dense[k])
            z = zf.reshape(len(t), *zshape)
            last = k == len(r.processed) - 1
            if last and self.units is not None:
                cr = self._crossings(act.crossings_along(zf[:, self.units], self.r.tol), pid, t)
                cr["unit"] = self.units[cr["unit"]]
            else:
                cr = self._crossings(act.crossings_along(z, self.r.tol), pid, t)
            recs.append(_records(pid, cr, k))
            ends.append(_end_crossings(cr))
            n, t_old = len(t), t
            pj, pu = cr["pj"], cr["pu"]
            old_pos, new_pos = pts.insert(cr)
            c_unit, jump = cr["unit"][cr["inner"]], None
            if self.aff is not None:
                if not last and not self.dense[k + 1]:  # only a bend of the next site's inputs needs them
                    jump = self._jumps(site, z, cr)[cr["inner"]] if len(cr["seg"]) else zf.new_zeros(0)
                for leaf in list(store):
                    if not self._read_after(leaf, k):
                        del store[leaf]
                        continue
                    store[leaf] = _merge(store[leaf], _lerp_rows(store[leaf], pj, pu), old_pos, new_pos)
                prev = {}
                if self.keep[k] == "all":
                    zall = _merge(zf, _inputs_at_new(act, zf, cr), old_pos, new_pos)
                    store[name] = site.apply(zall.reshape(len(zall), *zshape)).reshape(len(zall), -1)
                elif self.keep[k] == "next":
                    prev[name] = site.apply(z).reshape(len(zf), -1)
            elif not last or with_output:
                z_new = (act, zf, cr)  # evaluated batch by batch in _eval_new
            grp_change = torch.ones(len(pj), dtype=torch.bool, device=dev)
            if len(pj) > 1:
                grp_change[1:] = pj[1:] != pj[:-1]
            grp = torch.cumsum(grp_change.long(), 0) - 1
            pend = _Pending(name, new_pos, old_pos, pj, pu, grp, len(pj), cr["gid"], c_unit, jump)
            pid, t, tied, ids, n_ids = pts.pid, pts.t, pts.tied, pts.ids, pts.n_ids
            if last:
                if self.want_output and not self.output_at_points:
                    z_last = (zf, t_old, old_pos)
                break
        # points whose unit inputs were held at the last site: what the chunk's memory scales with (the last
        # site's own breakpoints are never evaluated again, they cost a few numbers each)
        out = {"pid": pid, "t": t, "tied": tied, "records": recs, "n_evaluated": n, "ends": ends}
        if last_values is not None:
            out["last"] = last_values
        if self.want_output:
            at_points = None
            if with_output:
                if len(pend.new_idx):  # the last site's breakpoints were not evaluated yet
                    cache.add(ids[pend.new_idx], self._eval_new(len(names) - 1, pend, z_new, gpids, pid, t, True))
                at_points = cache.take("output", ids, n_ids)
            out["output"], out["output_at_points"] = self._outputs(pid, t, gpids, store, at_points, z_last)
        return out

    def _run_chunk_frontier(self, gpids: torch.Tensor, t_range: tuple[float, float] | None = None,
                            first: dict | None = None) -> dict:
        """``run_chunk`` with every point advancing together from site to site (``frontier.FrontierState``): one
        pass per site over all current points, through the network between the two sites only. A piece of a path
        takes its first point's values from the piece before (``first``) and returns its last point's (``"last"``)."""
        r = self.r
        pts = _Points.start(r.spec, gpids, t_range)
        skip = 0 if first is None else 1
        x = r.spec.points(gpids[pts.pid[skip:]], pts.t[skip:])
        keep = t_range is not None  # one row per carried value and cut (run_path_in_pieces decides if it is used)
        if r.spec.site is None:
            state = self.frontier.start(x, first=first, keep_last=keep)
        else:  # the network before the paths' site runs once per path
            uniq, inv = torch.unique(gpids[pts.pid[skip:]], return_inverse=True)
            state = self.frontier.start(x, index_inputs(r.spec.base, uniq), inv, first, keep)
        recs, ends = [], []  # ends: the crossings on the first and last point of each site (a piece of a path)
        n = len(pts.t)
        z_last = None
        append = state.appends  # rows in the order points were made, visited in path order
        state.last_row = len(pts.t) - 1 if append else -1  # the piece's last point is one of the first made
        for k, site in enumerate(r.processed):
            act = site.activation
            order = pts.ids if append else None
            zf = state.run_to(k).reshape(len(pts.t), -1)
            last = k == len(r.processed) - 1
            if last and self.units is not None:
                cr = self._crossings(act.crossings_along(zf[:, self.units], r.tol, order), pts.pid, pts.t)
                cr["unit"] = self.units[cr["unit"]]
            else:
                cr = self._crossings(act.crossings_along(zf.reshape(len(zf), *r.z_shape[site.name]), r.tol, order),
                                     pts.pid, pts.t)
            recs.append(_records(pts.pid, cr, k))
            ends.append(_end_crossings(cr))
            n, t_old = len(pts.t), pts.t
            old_pos, new_pos = pts.insert(cr)
            if last and not self.output_at_points:
                if self.want_output:
                    z_last = (zf if order is None else zf.index_select(0, order), t_old, old_pos)
                break
            z_new = _inputs_at_new(act, zf, cr, order=order)
            if append:
                state.append(k, cr["pj"], cr["pu"], order, z_new)
            else:
                state.insert(k, old_pos, new_pos, cr["pj"], cr["pu"], z_new)
        out = {"pid": pts.pid, "t": pts.t, "tied": pts.tied, "records": recs, "n_evaluated": n, "ends": ends}
        if self.want_output:
            at_points = state.output() if self.output_at_points else None
            if at_points is not None and append:
                at_points = at_points.index_select(0, pts.ids)
            out["output"], out["output_at_points"] = self._outputs(pts.pid, pts.t, gpids, {}, at_points, z_last)
        if keep:
            out["last"] = state.last
        return out

    def _run_chunk_local(self, gpids: torch.Tensor, t_range: tuple[float, float] | None = None) -> dict:
        """``run_chunk`` with every value held per spatial position at the breakpoints of that position's own
        backward cone (``paths.local``): a site's crossings, found along each position's list, are placed on the
        path's points and go through the same bookkeeping as the other routes' (``_crossings``); each then joins
        the list of its own position only, its unit exactly on the kink."""
        from . import local  # it builds on the frontier's graph, which imports this module

        r = self.r
        pts = _Points.start(r.spec, gpids, t_range)
        state = local.LocalState(self.frontier, r.spec.points(gpids[pts.pid], pts.t), pts.ids, len(gpids))
        recs, ends = [], []  # ends: the crossings on the first and last point of each site (a piece of a path)
        n, z_last = len(pts.t), None
        dense_values = []  # unit inputs a dense evaluator would hold at each site (``local_entries``: those held)
        for k, site in enumerate(r.processed):
            act = site.activation
            order = local.PointOrder(pts.ids, pts.t, pts.pid, pts.n_ids, state.base_ids)
            z = state.run_to(k, order)
            dense_values.append(len(pts.t) * z.val.shape[1] * z.area)
            c, where, channel, kink = local.crossings(act, z, order, pts.t)
            last = k == len(r.processed) - 1
            if last and self.units is not None:
                keep = torch.nonzero(torch.isin(c.unit, self.units)).flatten()
                c = Crossings(c.segment[keep], c.unit[keep], c.t[keep], c.piece[keep], c.before[keep])
            cr = self._crossings(c, pts.pid, pts.t)
            recs.append(_records(pts.pid, cr, k))
            ends.append(_end_crossings(cr))
            n, t_old, ids_old, n_ids = len(pts.t), pts.t, pts.ids, pts.n_ids
            old_pos, new_pos = pts.insert(cr)
            if last:
                if self.want_output:
                    z_last = (local.dense(z, order, ids_old), t_old, old_pos)
                break
            # each crossing's point: the new one it made, or the point it was snapped to (its unit near the kink there)
            point = torch.empty(len(c), dtype=torch.long, device=c.unit.device)
            made = torch.zeros(len(c), dtype=torch.bool, device=c.unit.device)
            made[cr["inner"]] = True
            point[cr["inner"]] = n_ids + cr["gid"]
            point[~made] = ids_old[cr["snapped_to"]]
            order = local.PointOrder(pts.ids, pts.t, pts.pid, pts.n_ids, state.base_ids)
            state.set_site_output(k, local.add_breakpoints(act, z, order, where, channel, kink, point, made), order)
        out = {"pid": pts.pid, "t": pts.t, "tied": pts.tied, "records": recs, "n_evaluated": n, "ends": ends,
               "local_entries": state.entries, "dense_values": dense_values}
        if self.want_output:
            out["output"], out["output_at_points"] = self._outputs(pts.pid, pts.t, gpids, {}, None, z_last)
        return out

    def _run_chunk_appended(self, gpids: torch.Tensor, t_range: tuple[float, float] | None = None) -> dict:
        """``run_chunk`` with products at every point and one-kink sites (``self.append``), holding every
        per-point matrix in the order the points were made (``_Rows``): a site's unit inputs are one product per
        block of rows into one buffer, its bias is added in the scan, its output is written by the scan in that same
        order, and a stage's new points are appended, so no (points x units) array is ever merged into path order
        (against about 60 bytes per unit and point of comparisons, merges and activation in path order).
        ``_kink_scan.scan`` (one Triton kernel on a GPU) finds the pairs of consecutive points between which a unit
        changes side; ``ScalarKinks.crossings_of`` places them, and the rest is ``run_chunk``'s."""
        r = self.r
        pts = _Points.start(r.spec, gpids, t_range)
        store: dict[str, _Rows] = {}  # leaf -> its values at every point, in the order the points were made
        recs, ends = [], []  # ends: the crossings on the first and last point of each site (a piece of a path)
        n = len(pts.t)
        for k, site in enumerate(r.processed):
            name, kink = site.name, site.activation.kinks[0]
            last = k == len(r.processed) - 1
            n = len(pts.t)
            z, offset = self._appended_z(name, pts, gpids, store)
            keep = self.keep[k] is not None

            def apply(x, site=site):  # one-kink activations are elementwise: the output has the input's shape
                return site.apply(x.reshape(len(x), *r.z_shape[site.name])).reshape(x.shape)

            if last and self.units is not None:  # only these units are followed (the output still needs all)
                zs, offs = z[:, self.units].contiguous(), None if offset is None else offset[:, self.units]
                changes, _ = scan(zs, pts.ids, pts.pid, kink, offs)
                out = apply(z if offset is None else z + offset) if keep else None
            else:
                zs, offs = z, offset
                changes, out = scan(z, pts.ids, pts.pid, kink, offset, apply if keep else None, self.lines.get(name))
            seg, unit = torch.nonzero(changes, as_tuple=True)  # in segment order, as the one-kink crossings_along
            za, zb = zs[pts.ids[seg], unit], zs[pts.ids[seg + 1], unit]
            if offs is not None:
                za, zb = za + offs[0, unit], zb + offs[0, unit]
            raw = sort_crossings(site.activation.crossings_of(0, seg, unit, za, zb), in_segment_order=True)
            cr = self._crossings(raw, pts.pid, pts.t, within_paths=True)  # the scan flags no segment across paths
            if last and self.units is not None:
                cr["unit"] = self.units[cr["unit"]]
            recs.append(_records(pts.pid, cr, k))
            ends.append(_end_crossings(cr))
            order = pts.ids  # path order -> row, before the new points
            pj, pu = cr["pj"], cr["pu"]
            pts.insert(cr)
            for leaf in list(store):
                if not self._read_after(leaf, k):
                    del store[leaf]
                else:
                    store[leaf].append(_lerp_rows(store[leaf].joined(), pj, pu, order))
            if keep:
                store[name] = _Rows(out, self._outputs_at_new(site, z, offset, cr, order, apply))
        out = {"pid": pts.pid, "t": pts.t, "tied": pts.tied, "records": recs, "n_evaluated": n, "ends": ends}
        if self.want_output:
            path_order = {leaf: rows.joined()[pts.ids] for leaf, rows in store.items()}
            out["output"], out["output_at_points"] = self._outputs(pts.pid, pts.t, gpids, path_order)
        return out

    def _outputs_at_new(self, site, z, offset, cr: dict, order: torch.Tensor, apply) -> torch.Tensor:
        """A one-kink site's output at the breakpoints it just made (``_inputs_at_new`` through the activation),
        in one Triton pass where it can run (the crossed units, exactly on their kink there, set after)."""
        lines, kink = self.lines.get(site.name), site.activation.kinks[0]
        out = None
        if lines is not None and triton_ready(z):  # None also when the kernel failed (warned once)
            out = interpolated_outputs(z, order[cr["pj"]], order[cr["pj"] + 1], cr["pu"], kink, lines, offset)
        if out is None:
            return apply(_inputs_at_new(site.activation, z, cr, order=order, offset=offset))
        c_unit = cr["unit"][cr["inner"]]
        out[cr["gid"], c_unit] = lines[0, c_unit] * kink + lines[2, c_unit]  # the output at the kink
        return out

    def _appended_z(self, m: str, pts: _Points, gpids: torch.Tensor, store: dict) -> tuple:
        """Unit inputs of site ``m`` at every point, rows in the order the points were made, less the bias when it
        is one row (returned apart as the offset, which the scan adds)."""
        aff = self.aff
        c = aff.c[m]
        n = pts.n_ids

        def by_row(x):  # a path-order array in the order the points were made: only the input and a per-path bias
            return x.new_empty(n).index_copy_(0, pts.ids, x)  # need it, so not made at every site

        z = c.new_zeros(n, c.shape[1]) if not aff.deps[m] else c.new_empty(n, c.shape[1])
        for i, leaf in enumerate(aff.deps[m]):
            jt = aff.jt[m, leaf]
            if leaf == SRC:
                spans = [(0, self._src(gpids[by_row(pts.pid)], by_row(pts.t)))]
            else:
                spans = store[leaf].spans()
            for r0, a in spans:
                part = z[r0:r0 + len(a)]
                if i == 0:
                    torch.mm(a, jt, out=part)
                else:
                    part.addmm_(a, jt)
        if c.shape[0] == 1:
            return z, c
        return z.add_(c[gpids[by_row(pts.pid)]]), None

    def run_path_in_pieces(self, gpid: torch.Tensor, max_points: int, est_points: float,
                           on_piece: Callable[[float], None] | None = None) -> dict:
        """Refine one path piece by piece along t, each piece sized to hold about ``max_points`` evaluated
        breakpoints (``n_evaluated``), and join the pieces. The first piece holds a quarter of what ``est_points``
        (the breakpoints expected on the whole path) allows; each later one is sized from the density of new
        breakpoints in the one before or on the path so far, whichever is higher, and at most twice the one before.
        ``on_piece`` gets each finished piece's length in t (they sum to 1): a path through a large network can take
        hours, and its progress is what a user needs to see. Pieces are joined ``_JOIN_EVERY`` at a time, and
        joined runs again ``_JOIN_EVERY`` at a time (``_push_run``), so a path of many thousands of pieces holds a
        few arrays, and each breakpoint is copied once per level, not once per join.

        Pieces share their end points, whose unit inputs are evaluated the same way in both (on the graph route
        once, by the earlier piece), so a unit sitting on a kink there is counted once (``pieces`` decides on which
        side, as within one piece).

        ``max_points`` comes from an estimate of a point's memory that holds wherever its breakpoints were made (for
        EfficientNet-Lite0 several times what a point takes, since most breakpoints are made at narrow late sites).
        Where the device measures its peak memory (``DevicePeak``: CUDA), each piece's peak per point sizes the
        next ones, to ``MEASURED_PIECE_SHARE`` of the budget and never below the estimate's size: fewer, larger
        pieces, each costing the same host time per site whatever its size. A piece that runs out of device memory
        is run again, smaller, with the estimate's size from then on."""
        runs, a, made, done = [], 0.0, 0, 0.0  # (level, joined pieces); new breakpoints made, length of t done
        shared = None  # the values at the point the last piece and the next share
        meter, estimated = DevicePeak.of(self.r.device), max_points
        # a quarter: deep sites' units may cross several times
        step = piece_room(max_points) / (4.0 * max(float(est_points), 1.0))
        while a < 1.0:
            if step < _MIN_PIECE:
                raise InvalidInputError(
                    f"A path has more than {piece_room(max_points) / _MIN_PIECE:.0e} breakpoints per unit of t here, "
                    f"more than pieces of {max_points} points can follow in float64; raise the memory budget.")
            b = 1.0 if a + step >= 1.0 else a + step
            try:
                if meter is not None:
                    meter.start()
                out = self.run_chunk(gpid, (a, b), shared)
            except torch.OutOfMemoryError:
                if meter is None or max_points == estimated:
                    raise
                meter, max_points = None, estimated  # the measured sizes overreached: the estimate's from now on
                step = min(0.5 * (b - a), piece_room(max_points) * done / max(made, 1))
                continue
            if meter is not None:  # the next pieces: as many points as the measured peak per point allows
                max_points = measured_piece_points(estimated, self.r.budget, meter.peak(), out["n_evaluated"])
            # every piece keeps its last point's values; the frontier route pays for sharing them with one copy of
            # every carried value per site, which only pieces of a few points (a large network under a small budget)
            # earn back
            share = self.frontier is None or max_points <= FRONTIER_SHARE_MAX_POINTS
            shared = out.pop("last", None) if share else None
            # the next piece: what the denser of this piece and the path so far allows, at most twice this one
            k = max(out["n_evaluated"] - 2, 0)
            made, done = made + k, done + (b - a)
            step = min(piece_room(max_points) / max(k / (b - a), max(made, 1) / done), 2.0 * (b - a))
            _push_run(runs, 0, out)
            if on_piece is not None:
                on_piece(b - a)
            a = b
        return _join_pieces([out for _, out in runs])

    def _eval_new(self, k: int, pend: _Pending, z_new: tuple, gpids, pid, t, with_output: bool) -> list:
        """Graph route: the later sites' unit inputs (and the output when asked) at the breakpoints site ``k`` just
        made, as ``(rows, values)`` batches; their unit inputs at site k are ``_inputs_at_new(*z_new)`` (taken batch
        by batch, crossed units exactly on their kinks), see ``_eval_at``."""
        new = pend.new_idx
        left, right = pend.old_idx[pend.left], pend.old_idx[pend.left + 1]
        return self._eval_at(k, gpids[pid[new]], t[new], lambda b: _inputs_at_new(*z_new, b), left, right, pend.u,
                             gpids[pid], t, self.r.names[k + 1:], with_output)

    def _eval_at(self, k: int, p, tn, z_at, left, right, u, end_pid, end_t, names: list, with_output: bool) -> list:
        """Values of sites ``names`` (and the output when asked) at points (path ``p``, position ``tn``) inside
        intervals (points ``left``, ``right`` of ``end_pid``, ``end_t``; relative position ``u``) on which every
        tensor before site ``k`` is affine, whose unit inputs at site ``k`` are ``z_at(rows)``: as ``(rows, values)``
        batches. The forward pass before site k need not run once per point (``Runner.eval_point_batches``): on one
        row when nothing after site k reads what was computed before it, else at the ends of the points' intervals
        when they are fewer than half the points. Each reduction is checked once per site against the unreduced pass
        at a few points; models whose code it does not reproduce get that pass."""
        r = self.r
        at = r.names[k]

        def evaluate(way, rows=slice(None)):  # rows: the first points or all
            ends = (left[rows], right[rows], u[rows], end_pid, end_t) if way == "ends" else way
            return list(r.eval_point_batches(p[rows], tn[rows], names, with_output, at, z_at, ends))
        way = self.reduction.get(at)
        if way is None:
            if len(p) < 2:  # a reduction is checked on at least two points (one row must differ from them)
                return evaluate("every point")
            way = self.reduction[at] = self._check_reduction(evaluate)
        if way == "ends" and 2 * len(torch.unique(torch.cat([left, right]))) > len(p):
            way = "every point"
        if way != "every point":
            try:
                return evaluate(way)
            except torch.OutOfMemoryError:  # the device's limit, not the model's: the piece is retried smaller
                raise
            except Exception:  # noqa: BLE001 - the model's code does not allow it after all (batch sizes read early)
                self.reduction[at] = "every point"
        return evaluate("every point")

    def _check_reduction(self, evaluate) -> str:
        """The cheapest reduction of the forward pass before a site that reproduces the unreduced pass at (up to)
        four new points (at least two)."""
        def joined(batches):
            out: dict = {}
            for _, o in batches:
                for key, v in o.items():
                    out.setdefault(key, []).append(v)
            return {key: torch.cat(v) for key, v in out.items()}
        rows = slice(0, 4)
        want = joined(evaluate("every point", rows))
        for way in ("one row", "ends"):
            try:
                got = joined(evaluate(way, rows))
            except torch.OutOfMemoryError:
                raise
            except Exception:  # noqa: BLE001 - any failure of the reduction means: do not use it
                continue
            if all(key in got and same_values(got[key], v, self.r.tol) for key, v in want.items()):
                return way
        return "every point"

    def _outputs(self, pid, t, gpids, store, at_points: torch.Tensor | None = None, z_last: tuple | None = None):
        """Model scores at region midpoints (n_points - 1 rows; rows across paths are junk and dropped later), and
        at the points themselves when the output is affine on every region (``output_at_points``: given as
        ``at_points`` on the graph route, from the stored site outputs on the affine route; the midpoints' are then
        the mean of their ends), else None and one evaluation per midpoint: of the network from the last site on
        when ``z_last`` = (that site's unit inputs at the points before it made its breakpoints, their t, their
        positions now) is given (units= leaves kinks of that site inside regions, but its inputs are affine between
        those points, so a midpoint's are interpolated there), else of the whole network."""
        mids_t = 0.5 * (t[:-1] + t[1:])
        if self.output_at_points:
            o = at_points
            if o is None:
                c = self.aff.c["output"]
                o = (c.expand(len(t), -1) if c.shape[0] == 1 else c[gpids[pid]]).clone()
                for leaf in self.aff.deps["output"]:
                    a = self._src(gpids[pid], t) if leaf == SRC else store[leaf]
                    o.addmm_(a, self.aff.jt["output", leaf])
            return 0.5 * (o[:-1] + o[1:]), o
        same = torch.nonzero(pid[:-1] == pid[1:]).flatten()
        if z_last is None:
            res = self.r.eval_points(gpids[pid[same]], mids_t[same], [], want_output=True)["output"]
        else:
            zf, t_old, old_pos = z_last
            j = torch.searchsorted(old_pos, same, right=True) - 1  # the interval of the old points holding each one
            u_old = (mids_t[same] - t_old[j]) / (t_old[j + 1] - t_old[j])
            half = torch.full((len(same),), 0.5, dtype=t.dtype, device=t.device)
            res = torch.cat([o["output"] for _, o in self._eval_at(
                len(self.r.names) - 1, gpids[pid[same]], mids_t[same], lambda b: _lerp_rows(zf, j[b], u_old[b]),
                same, same + 1, half, gpids[pid], t, [], True)])
        full = res.new_zeros(len(t) - 1, res.shape[1])
        full[same] = res
        return full, None


def _push_run(runs: list, level: int, out: dict) -> None:
    """Append ``out`` (a run of consecutive pieces, joined ``level`` times) to ``runs``; ``_JOIN_EVERY`` runs of one
    level at the end are joined into one of the next level (levels never increase towards the end of the list)."""
    runs.append((level, out))
    group = runs[-_JOIN_EVERY:]
    if len(group) == _JOIN_EVERY and all(lv == level for lv, _ in group):
        del runs[-_JOIN_EVERY:]
        _push_run(runs, level + 1, _join_pieces([o for _, o in group]))


def _join_pieces(pieces: list[dict]) -> dict:
    """One chunk output from consecutive pieces of one path (``Refiner.run_path_in_pieces``): shared end points
    once, joints where no unit changes piece dropped (with their regions' outputs merged)."""
    if len(pieces) == 1:
        return pieces[0]
    per_piece = [list(p["records"]) for p in pieces]
    for i in range(len(pieces) - 1):  # a unit's crossings landing on a shared point from both sides
        if "ends" not in pieces[i] or "ends" not in pieces[i + 1]:
            continue
        for k in range(len(per_piece[i])):
            per_piece[i][k], per_piece[i + 1][k] = _net_changes_at_joint(
                per_piece[i][k], per_piece[i + 1][k], pieces[i]["ends"][k], pieces[i + 1]["ends"][k],
                pieces[i]["t"][-1])
    records = [tuple(torch.cat(parts) if j != 2 else parts[0] for j, parts in enumerate(zip(*recs)))
               for recs in zip(*per_piece)]
    t = torch.cat([p["t"][1 if i else 0:] for i, p in enumerate(pieces)])
    tied = [p["tied"].clone() for p in pieces]
    for i in range(1, len(tied)):
        tied[i - 1][-1] |= tied[i][0]
    tied = torch.cat([x[1 if i else 0:] for i, x in enumerate(tied)])
    # a joint where no unit changes piece is not a region boundary: drop it, and merge the two regions' outputs
    # (affine on the region) into the output at the merged region's midpoint
    ends = torch.tensor([len(p["t"]) for p in pieces[:-1]], device=t.device)
    joints = torch.cumsum(ends - 1, 0)
    crossed = torch.cat([rec[1] for rec in records]) if records else t.new_zeros(0)
    drop = joints[~torch.isin(t[joints], crossed)]
    keep = torch.ones(len(t), dtype=torch.bool, device=t.device)
    keep[drop] = False
    ends = [None if a is None or b is None else (*a[:2], *b[2:])
            for a, b in zip(pieces[0].get("ends", []), pieces[-1].get("ends", []))]
    out = {"pid": pieces[0]["pid"].new_zeros(int(keep.sum())), "t": t[keep], "tied": tied[keep],
           "records": records, "n_evaluated": sum(p["n_evaluated"] for p in pieces), "ends": ends}
    if pieces[0].get("output_at_points") is not None:
        at = torch.cat([p["output_at_points"][1 if i else 0:] for i, p in enumerate(pieces)])
        out["output_at_points"] = at[keep]  # a dropped joint's output is on the line through its neighbours'
    if "output" in pieces[0]:
        o = torch.cat([p["output"] for p in pieces])  # one row per region between consecutive points of t
        m = 0.5 * (t[:-1] + t[1:])
        region = torch.cumsum(keep[:-1].long(), 0) - 1  # merged region of each original region
        counts = torch.bincount(region)
        first = torch.cumsum(counts, 0) - counts
        last = first + counts - 1
        tk = t[keep]
        w = ((0.5 * (tk[:-1] + tk[1:]) - m[first]) / (m[last] - m[first]).where(counts > 1, 1.0))[:, None]
        out["output"] = o[first] + w * (o[last] - o[first])
    return out


def verify_chunk(runner: Runner, gpids: torch.Tensor, pid: torch.Tensor, t: torch.Tensor, n_check: int,
                 seed: int = 0, units: torch.Tensor | None = None, ties: TieTolerance = TieTolerance(0.0)) -> None:
    """Check the invariant on a sample of final intervals: every site's unit input is affine there, and no unit
    changes piece strictly inside (a piece change between the ends needs an end on the kink, or within ``ties``
    of it: a crossing that close to a breakpoint was placed there).

    Raises
    ------
    NotPiecewiseLinearError
    """
    same = torch.nonzero(pid[:-1] == pid[1:]).flatten()
    if not len(same) or not runner.names:
        return
    g = torch.Generator(device="cpu").manual_seed(seed)
    pick = same[torch.randperm(len(same), generator=g)[:n_check].to(same.device)]
    group = max(1, runner.rows_per_batch() // 3)  # intervals checked at once: a batch's rows (3 points each)
    for s in range(0, len(pick), group):
        _verify_intervals(runner, gpids, pid, t, pick[s:s + group], units, ties)


def _verify_intervals(runner: Runner, gpids, pid, t, pick, units, ties: TieTolerance) -> None:
    tl, tr = t[pick], t[pick + 1]
    gp = gpids[pid[pick]]
    tm = 0.5 * (tl + tr)
    # 1/2 but where the midpoint rounds (an interval of a few ulps); an interval of width 0 (a crossing that rounded
    # onto the next breakpoint) is affine at any weight
    w = torch.where(tr > tl, (tm - tl) / torch.where(tr > tl, tr - tl, 1.0), 0.5).unsqueeze(1)
    pts_t = torch.cat([tl, tr, tm])
    vals = runner.eval_points(torch.cat([gp, gp, gp]), pts_t, runner.names)
    n = len(pick)
    tie = ties.over(tl, tr)
    if isinstance(tie, torch.Tensor):
        tie = tie.unsqueeze(1)
    for site in runner.processed:
        z = vals[site.name]
        if units is not None and site is runner.processed[-1]:
            z = z[:, units]  # the other units of the last site are not followed
        zl, zr, zm = z[:n], z[n:2 * n], z[2 * n:]
        scale = torch.maximum(zl.abs(), zr.abs()).amax(1, keepdim=True).clamp_min(1.0)
        err = ((zm - (zl + w.to(z.dtype) * (zr - zl))).abs() / scale).max()
        if not bool(torch.isfinite(err)):  # overflow, not a hidden nonlinearity
            raise not_finite(f"the unit inputs of site {site.name!r}", runner.owner, z.dtype, "on some paths",
                             "range of alpha (or shorter paths)")
        if not bool(err <= runner.tol) and float(scale.max()) > torch.finfo(z.dtype).max * 2.0 ** -20:
            raise InvalidInputError(f"{runner.owner}: the unit inputs of site {site.name!r} reach "
                                    f"{float(scale.max()):.3g}, near the largest {str(z.dtype).replace('torch.', '')}, "
                                    "where sums lose their digits; use a smaller range of alpha (or shorter paths).")
        if not bool(err <= runner.tol):
            raise NotPiecewiseLinearError(
                f"not piecewise-linear: the unit input of site {site.name!r} is not affine between two consecutive "
                f"breakpoints (relative deviation {float(err):.2e}, unit inputs up to {float(scale.max()):.3g}); an "
                "operation capture does not see (LayerNorm, softmax, normalisation by batch statistics...) sits before "
                "it, or, in a model without one, the path's scale outruns the dtype's rounding (use a shorter path or "
                "ray). Use method='sampled' for the first.")
        act = site.activation
        if isinstance(act, ScalarKinks):
            pl, pr = act.pieces(zl), act.pieces(zr)
            diff = pl != pr
            if bool(diff.any()):
                # on the kink to rounding, or as far from it as the unit moves in tie_tol
                reach = runner.tol * scale + tie * (zr - zl).abs() / (tr - tl).unsqueeze(1).to(z.dtype)
                near = torch.zeros_like(diff)
                for kink in act.kinks:
                    near |= ((zl - kink).abs() <= reach) | ((zr - kink).abs() <= reach)
                if bool((diff & ~near).any()):
                    raise NotPiecewiseLinearError(
                        f"internal check failed: a unit of site {site.name!r} changes piece strictly between two "
                        "breakpoints; please report this with the model and path.")
