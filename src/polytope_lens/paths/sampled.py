"""Sampled crossings for models that are not piecewise linear (GELU, SiLU, LayerNorm, softmax attention...).

Each path is sampled at ``n_samples + 1`` evenly spaced t (and at its knots: a polyline's corners, a ray's alpha
= 0), except a ray so wide that evenly spaced samples would be further apart in alpha than the |alpha| around which
its kinks crowd: half of its samples are then spaced evenly in asinh(alpha / that scale) instead
(``wide_ray_grid``); wherever a unit's piece (its threshold code for smooth
activations) differs between two consecutive samples, the change is located by bracketing until the bracket is
narrower than ``tol`` in t, and reported at the bracket's midpoint with the piece found at its right end. A unit that
changes piece and changes back between two samples is missed, so counts are lower bounds (``exact=False``); one
record is reported per unit and sample interval. A unit exactly on its kink at a sample is read at probes either
side of it instead (``_around_kinks``): a pass through the kink there is one record at the sample, a touch none.

The bracket is narrowed at the Illinois point (regula falsi on the unit input minus its kink, the value at an end
kept twice in a row halved) where the unit has a scalar kink, and at the midpoint otherwise or after four steps that
did not halve it: the piece at the new point still decides which end moves, so the bracket always holds the change,
and a smooth unit input converges superlinearly. Each step is a forward pass per bracket: on MiniLM (8 tokens, 16
samples, tol 1e-6) all but a few hundred of 6,278 brackets were placed in 6 steps, where bisection takes 16.

Before those steps, brackets that share their sample interval with at least ``_SHARED_MIN - 1`` others (a
transformer layer's units change by the hundred in one interval) are narrowed together: ``_SUB - 1`` sub-samples of
the interval, one forward pass each for all of them, cut every bracket 16-fold, round after round while enough share
one (``_narrow_shared``). A MiniLM ray (8 tokens, 16 samples, 7,304 crossings): 23.7 s instead of 33.0 s at tol
1e-9, 4.4 s instead of 14.6 s at 1e-3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import not_finite
from .geometry import crowd_scale, zero_t
from .runner import Runner


_SLOW_STEPS = 4  # Illinois steps without halving the bracket before a bisection step
_SHARED_MIN = 8  # brackets in one interval of a path that are narrowed together by sub-samples
_SUB = 16  # sub-intervals per shared round
_NEAR = 64  # samples within this many eps (times t on a wide ray's grid) of each other are one sample


@dataclass(frozen=True)
class WideRayGrid:
    """How a sampled ray too wide for evenly spaced samples is sampled (``wide_ray_grid``)."""

    step: float  # the spacing in alpha of n_samples + 1 evenly spaced samples
    scale: float  # ``geometry.crowd_scale``: the |alpha| around which the ray's kinks crowd
    n_even: int  # samples spaced evenly in alpha over the whole range, its ends included
    n_asinh: int  # samples spaced evenly in u = asinh(alpha / scale), inside ``window``
    even_step: float  # the spacing in alpha of the n_even samples
    du: float  # the spacing in u of the n_asinh samples
    window: tuple[float, float]  # the range of alpha they divide into n_asinh + 1 equal steps in u

    def alphas(self) -> np.ndarray:
        """The alphas of the ``n_asinh`` samples (float64), increasing."""
        lo, hi = (math.asinh(a / self.scale) for a in self.window)
        return self.scale * np.sinh(lo + self.du * np.arange(1, self.n_asinh + 1))

    def t(self, alphas: tuple[float, float], dtype: torch.dtype, device) -> torch.Tensor:
        """Every sample position t of the ray in ``dtype``: the even ones and the asinh ones, sorted, without those
        within ``_NEAR`` * eps * t of the one before (0 and 1 always kept): samples a rounding apart are one point,
        and the probes ``_around_kinks`` places a quarter of the closest spacing away must not round onto one. t
        is measured from the point of the range nearest alpha = 0, as ``geometry.ray_alpha`` measures alpha, so
        that samples near it keep their relative precision."""
        a0, a1 = alphas
        al, t0 = self.alphas(), zero_t(alphas)
        if t0 < 0.0:
            t = (al - a0) / (a1 - a0)
        elif t0 > 1.0:
            t = 1.0 - (a1 - al) / (a1 - a0)
        else:
            t = t0 + al / (a1 - a0)
        t = np.concatenate([np.linspace(0.0, 1.0, self.n_even), np.clip(t, 0.0, 1.0)])
        t = torch.unique(torch.as_tensor(t).to(device).to(dtype))  # sorted
        near = (t[1:] - t[:-1]) <= _NEAR * torch.finfo(dtype).eps * t[1:]
        keep = torch.cat([near.new_ones(1), ~near])
        if bool(near[-1]):  # t = 1 stays, the sample just before it goes
            keep[-1], keep[-2] = True, False
        return t[keep]


def wide_ray_grid(alphas: tuple[float, float], n_samples: int) -> WideRayGrid | None:
    """How to sample a ray over ``alphas`` with ``n_samples + 1`` samples, or None where evenly spaced ones do.

    A ray's kinks crowd around |alpha| of ``crowd_scale`` (a unit's kink is at minus its constant over its slope):
    where evenly spaced samples are further apart than that, the crowded part lies within a sample interval or
    two, and every unit that crosses there more than once was undercounted (the digits CNN at ``stem.2.relu`` over
    (1, 1e9): 752 of its 786 crossings, with 64 samples as with 16,384). Then half the samples (``n_samples // 2 +
    1``, the range's ends included) stay evenly spaced in alpha, and the other half are spaced evenly in u = asinh(alpha
    / s), s the crowd scale: steps of about s * du in alpha where |alpha| < s, and of a constant ratio e^du in |alpha|
    where |alpha| > s, the spacing that keeps a kink's position relative to alpha resolved (kinks spread over
    decades of |alpha|: the CNN's over 1 to 480, half of them below 1.8). Those samples fill the part of the range
    within |alpha| <= G, G where their spacing, about G * du, grows to the even samples' (beyond it the even
    samples are the finer), or the whole range when it ends before that; so no two neighbouring samples are
    further apart than the even ones (about twice the spacing of n_samples + 1 even ones), and where kinks crowd
    they are relatively du apart. The total stays ``n_samples + 1`` (with the path's knots, as before). Rays
    where evenly spaced samples are at most the crowd scale apart keep them (None: bit-identical results)."""
    a0, a1 = alphas
    scale = crowd_scale(alphas)
    step = (a1 - a0) / n_samples
    if not step > scale:
        return None
    n_even = n_samples // 2 + 1
    n_asinh = n_samples + 1 - n_even
    even_step = (a1 - a0) / (n_even - 1)

    def span(g: float) -> float:  # the width in u of the range's part within |alpha| <= g
        return math.asinh(min(a1, g) / scale) - math.asinh(max(a0, -g) / scale)

    def excess(g: float) -> float:  # > 0 where the asinh samples' spacing at |alpha| = g exceeds even_step
        return g * span(g) / (n_asinh + 1) - even_step

    lo, hi = even_step, max(abs(a0), abs(a1))  # even_step > step > scale >= the range's |alpha| nearest 0
    if excess(hi) <= 0:
        g = hi
    elif excess(lo) >= 0:
        g = lo
    else:  # excess grows with g: bisect in log g
        for _ in range(100):
            mid = math.sqrt(lo * hi)
            if excess(mid) > 0:
                hi = mid
            else:
                lo = mid
        g = lo
    window = (max(a0, -g), min(a1, g))
    return WideRayGrid(step, scale, n_even, n_asinh, even_step, span(g) / (n_asinh + 1), window)


def sampled_chunk(runner: Runner, gpids: torch.Tensor, n_samples: int, tol: float, want_output: bool) -> dict:
    dev = runner.device
    c_paths = len(gpids)
    wide = wide_ray_grid(runner.spec.alphas, n_samples) if runner.spec.alphas is not None else None
    if wide is None:
        grid = torch.linspace(0.0, 1.0, n_samples + 1, dtype=runner.dtype, device=dev)
    else:  # a ray too wide for evenly spaced samples: half of them spaced evenly in asinh(alpha / crowd scale)
        grid = wide.t(runner.spec.alphas, runner.dtype, dev)
    n_grid = len(grid)
    inner_knots = runner.spec.knots_t[gpids.to(runner.spec.knots_t.device), 1:-1].to(dev, runner.dtype)
    if inner_knots.shape[1]:  # a path's knots are samples too (a polyline's corners, a ray's alpha = 0), where
        # units meet their kinks exactly more often than anywhere (the exact engine's breakpoints, too)
        tt, order = torch.cat([grid.expand(c_paths, -1), inner_knots], 1).sort(1)
        knot = order >= n_grid  # which of the sorted samples are knots
        # one sample, up to rounding (relative on a wide ray's grid, whose samples crowd near t = 0 or t_0)
        near = (tt[:, 1:] - tt[:, :-1]) <= _NEAR * torch.finfo(runner.dtype).eps * (1.0 if wide is None else tt[:, 1:])
        keep = torch.ones_like(tt, dtype=torch.bool)
        keep[:, 1:] &= ~(near & (knot[:, :-1] | ~knot[:, 1:]))  # of two, the knot stays (its t is exact) ...
        keep[:, :-1] &= ~(near & knot[:, 1:] & ~knot[:, :-1])
        keep[:, 0] = keep[:, -1] = True  # ... but never a path's ends
        keep[:, 1][knot[:, 1] & near[:, 0]] = False
        keep[:, -2][knot[:, -2] & near[:, -1]] = False
        t, pid = tt[keep], torch.arange(c_paths, device=dev).repeat_interleave(keep.sum(1))
    else:
        pid = torch.arange(c_paths, device=dev).repeat_interleave(n_grid)
        t = grid.repeat(c_paths)
    same = pid[:-1] == pid[1:]
    spacing = float((t[1:] - t[:-1])[same].min())  # the closest two samples of a path
    inner_all = torch.zeros(len(t), dtype=torch.bool, device=dev)  # samples with a neighbour on each side
    inner_all[1:-1] = same[:-1] & same[1:]
    recs = []
    # (site k, sample interval j, unit, piece at its left end, piece at its right end, unit input at both ends),
    # found batch by batch: the samples' unit inputs are never all held at once (the memory budget), only the last
    # two samples of the batch before and their pieces, for the pair whose right end needs the sample after it
    # (a change is listed once both ends of its sample interval are known)
    pending, outputs, last, last_piece, on_kink = [], [], None, {}, []
    for rows, o in runner.eval_point_batches(gpids[pid], t, runner.names, want_output):
        first = rows.start - (0 if last is None else len(last[0]))  # global index of the first row of z below
        ends, ends_piece = {}, {}
        for k, site in enumerate(runner.processed):
            z = o[site.name].reshape(rows.stop - rows.start, -1)
            # NaN reads as a piece: its "crossings" would be artefacts (the sum is the cheap test; finite values
            # whose sum overflows go on to the exact one)
            if not bool(torch.isfinite(z.sum())) and not bool(torch.isfinite(z).all()):
                row = rows.start + int(torch.nonzero(~torch.isfinite(z).all(1))[0])
                raise not_finite(f"the unit inputs of site {site.name!r}", runner.owner, z.dtype,
                                 f"on path {int(gpids[pid[row]])} at t = {float(t[row]):.6g}",
                                 "range of alpha (or shorter paths)")
            if last is not None:
                z = torch.cat([last[k], z])
            zs = z.reshape(len(z), *runner.z_shape[site.name])
            p = site.activation.pieces(zs).reshape(len(z), -1)
            on = site.activation.on_kink(zs)
            if on is not None and len(z) >= 3:
                on_kink.extend(_run_ends(k, on.reshape(len(z), -1), z, p, inner_all[first:first + len(z)], first,
                                         site.activation.elementwise))
            pending.append(_changes(k, z, p, same, first, len(z) - 2))  # the last sample waits for the next one
            ends[k], ends_piece[k] = z[-2:], p[-2:].clone()
            del z, p
        last, last_piece = ends, ends_piece
        if want_output:
            outputs.append(o["output"])
    for k in range(len(runner.processed)):  # the last pair: its right end is the last path's end
        pending.append(_changes(k, last[k], last_piece[k], same, len(t) - len(last[k]), len(last[k]) - 1))
    pending.sort(key=lambda e: e[0])  # site by site (stable: sample order within a site)
    empty = t.new_zeros(0, dtype=torch.long)
    sidx = torch.cat([torch.full_like(j, k) for k, j, *_ in pending]) if pending else empty
    j_all = torch.cat([e[1] for e in pending]) if pending else empty  # left sample of each bracket
    cols = [torch.cat([e[i] for e in pending]) if pending else empty for i in (2, 3, 4, 5, 6)]
    unit_all, plo, phi, z_lo, z_hi = cols  # pieces and unit inputs at the bracket's ends
    lo_all, hi_all, ppid = t[j_all], t[j_all + 1], pid[j_all]
    if on_kink:
        sidx, unit_all, plo, phi, z_lo, z_hi, lo_all, hi_all, ppid = _around_kinks(
            runner, gpids, pid, t, min(0.25 * spacing, max(tol / 4, 64 * torch.finfo(runner.dtype).eps)), on_kink,
            (sidx, j_all, unit_all, plo, phi, z_lo, z_hi))
    z_lo, z_hi = z_lo.to(runner.dtype), z_hi.to(runner.dtype)
    kink = _kink_between(runner, sidx, plo, phi)
    f_lo, f_hi = z_lo - kink, z_hi - kink  # unit input minus kink at the bracket's ends
    output = torch.cat(outputs) if want_output else None
    del pending, outputs
    # many units change in the same sample interval (a transformer's layer: hundreds): sub-samples of the interval,
    # each one forward pass shared by all of them, narrow their brackets 16-fold a round while enough share one
    kink = _narrow_shared(runner, gpids, ppid, sidx, unit_all, plo, phi, lo_all, hi_all, f_lo, f_hi, kink, tol)
    moved = torch.zeros(len(lo_all), dtype=torch.int8, device=dev)  # end moved by the last step: -1 lo, +1 hi
    ref_width = hi_all - lo_all  # width when the bracket last halved
    slow = torch.zeros(len(lo_all), dtype=torch.int8, device=dev)  # steps since then
    while len(lo_all) and bool(((hi_all - lo_all) > tol).any()):
        act_rows = torch.nonzero((hi_all - lo_all) > tol).flatten()
        lo, hi, fl, fh = lo_all[act_rows], hi_all[act_rows], f_lo[act_rows], f_hi[act_rows]
        width = hi - lo
        secant = (lo * fh - hi * fl) / (fh - fl)
        edge = width / 1024  # a point at an end would not narrow the bracket
        secant = torch.minimum(torch.maximum(secant, lo + edge), hi - edge)
        use = torch.isfinite(secant) & (fl * fh < 0) & (slow[act_rows] < _SLOW_STEPS)
        mid = torch.where(use, secant, 0.5 * (lo + hi))
        pm, zm = _pieces_at(runner, gpids[ppid[act_rows]], mid, sidx[act_rows], unit_all[act_rows])
        fm = zm - kink[act_rows]
        stay = pm == plo[act_rows]
        last = moved[act_rows]
        # Illinois: an end kept twice in a row has its value halved, so the next point moves towards it
        f_hi[act_rows] = torch.where(stay & (last == -1), 0.5 * fh, torch.where(stay, fh, fm))
        f_lo[act_rows] = torch.where(~stay & (last == 1), 0.5 * fl, torch.where(stay, fm, fl))
        lo_all[act_rows] = torch.where(stay, mid, lo)
        hi_all[act_rows] = torch.where(stay, hi, mid)
        phi[act_rows] = torch.where(stay, phi[act_rows], pm)
        moved[act_rows] = torch.where(stay, -1, 1).to(torch.int8)
        halved = (hi_all[act_rows] - lo_all[act_rows]) <= 0.5 * ref_width[act_rows]
        ref_width[act_rows] = torch.where(halved, hi_all[act_rows] - lo_all[act_rows], ref_width[act_rows])
        slow[act_rows] = torch.where(halved, 0, slow[act_rows] + 1).to(torch.int8)
    right = phi  # the piece entered: the one at the right end of the final bracket
    for k in range(len(runner.processed)):
        rows = torch.nonzero(sidx == k).flatten()
        recs.append((ppid[rows], 0.5 * (lo_all[rows] + hi_all[rows]), k, unit_all[rows], right[rows]))
    out = {"pid": pid, "t": t, "records": recs, "tied": torch.zeros(len(t), dtype=torch.bool, device=dev)}
    if want_output:
        out["output"] = output
    return out


def _changes(k: int, z: torch.Tensor, p: torch.Tensor, same: torch.Tensor, first: int, n_pairs: int) -> tuple:
    """(site k, sample interval, unit, pieces and unit inputs at both ends) of every unit whose piece differs between
    rows i and i + 1 of ``z`` (pieces ``p``; global rows ``first + i``, on one path) for the first ``n_pairs`` i."""
    n_pairs = max(n_pairs, 0)
    j, unit = torch.nonzero((p[:n_pairs] != p[1:n_pairs + 1]) & same[first:first + n_pairs, None], as_tuple=True)
    return k, j + first, unit, p[j, unit], p[j + 1, unit], z[j, unit], z[j + 1, unit]


def _run_ends(k: int, on: torch.Tensor, z: torch.Tensor, p: torch.Tensor, inner: torch.Tensor, first: int,
              elementwise: bool) -> list:
    """The entries ``_around_kinks`` needs from one batch: the samples of rows 1 .. len(z) - 2 (this batch's own;
    rows 0 and len(z) - 1 are their neighbours) where a unit is exactly on a kink and that begin or end a run (the
    neighbour on that side not on the same kink with the same tie-break piece, or not an inner sample), with their
    neighbours' pieces and inputs. Only runs' ends are kept: a window of zeros tied at every sample would otherwise
    keep an entry per sample (11.6 million on a tester's CNN ray, 3.9 GB)."""
    r, u = torch.nonzero(on[1:-1] & inner[1:-1, None], as_tuple=True)
    if not len(r):
        return []
    zero = torch.zeros(len(u), dtype=z.dtype, device=z.device)  # window sites: bisected without unit inputs
    z_prev, z_here, z_next = (z[r, u], z[r + 1, u], z[r + 2, u]) if elementwise else (zero, zero, zero)
    p_prev, p_here, p_next = p[r, u], p[r + 1, u], p[r + 2, u]
    adj_prev, adj_next = on[r, u] & inner[r], on[r + 2, u] & inner[r + 2]
    starts = ~(adj_prev & (p_prev == p_here) & (z_prev == z_here))
    ends = ~(adj_next & (p_next == p_here) & (z_next == z_here))
    m = starts | ends
    return [tuple(x[m] for x in (torch.full_like(r, k), first + r + 1, u, p_prev, z_prev, p_here, z_here, p_next,
                                 z_next, starts, ends, adj_prev & starts, adj_next & ends))]


def _around_kinks(runner: Runner, gpids, pid, t, delta: float, on_kink: list, brackets: tuple) -> tuple:
    """Brackets around samples where a unit is exactly on its kink (a smooth unit on its threshold, a max-pool window
    tied): its piece there is a tie-break, not a side, so the changes into and out of it say nothing by themselves.
    For each run of consecutive such samples of a unit (one sample, or a stretch of them), the unit is read at a
    probe ``delta`` before the run's first sample and one ``delta`` after its last: brackets run from the sample
    before the run to the first probe and from the second probe to the sample after, and the unit changes at the
    run's first sample from the first probe's piece to its tie-break piece, and at the last from that piece to the
    second probe's (at a lone sample: from the first probe's piece to the second's). So a unit that passes through its
    kink at a sample changes once there, one that touches it not at all, and one that stays on it keeps its tie-break
    piece with a change at each end, as the exact engine counts. Returns the new (site, unit, piece and input at both
    ends, lo, hi, path) columns; the brackets between two samples of a run stay as they were (a unit with several
    kinks can go from one to another). Probes are a quarter of the smaller of ``tol`` and the sample spacing away,
    but at least 64 ulps (float32's raised ``tol`` would put them inside its rounding). A unit that leaves its kink
    and comes back exactly between two samples of a run is taken to stay on it (it needs exact arithmetic: integer
    weights at dyadic t).

    Before stop 31 a unit on its kink at one sample but not at its neighbours was taken for a touch (its piece there
    replaced by the one before), which moved the change of a stretch shorter than the sample spacing by up to a
    sample interval or dropped two changes the samples showed; pairing the two brackets after bisection instead
    counted touches twice where ``tol`` was above the sample spacing (53 crossings against the exact 36)."""
    sidx, j, unit, plo, phi, z_lo, z_hi = brackets
    k, g, u, p_prev, z_prev, p_here, z_here, p_next, z_next, first, last, prev_on, next_on = (
        torch.cat(c) for c in zip(*on_kink))
    n_u, n_t = int(torch.cat([unit, u]).max()) + 1, len(t)
    key = (k * n_u + u) * n_t + g
    order = torch.argsort(key)  # a unit's runs in path order, each as its start and its end (one entry if lone)
    key, k, g, u, p_prev, z_prev, p_here, z_here, p_next, z_next, first, last, prev_on, next_on = (
        x[order] for x in (key, k, g, u, p_prev, z_prev, p_here, z_here, p_next, z_next, first, last, prev_on,
                           next_on))
    dt = runner.dtype
    z_prev, z_here, z_next = z_prev.to(dt), z_here.to(dt), z_next.to(dt)
    # the probes: before each run's first sample and after its last
    fi, li = torch.nonzero(first).flatten(), torch.nonzero(last).flatten()
    probe_g = torch.cat([g[fi], g[li]])
    probe_t = torch.cat([t[g[fi]] - delta, t[g[li]] + delta])
    uniq, point = torch.unique(torch.stack([probe_g.double(), probe_t.double()]), dim=1, return_inverse=True)
    pieces, z_pr = _pieces_at(runner, gpids[pid[uniq[0].long()]], uniq[1].to(t.dtype), torch.cat([k[fi], k[li]]),
                              torch.cat([u[fi], u[li]]), point)
    p_l, z_l = torch.zeros_like(p_here), torch.zeros_like(z_here)
    p_r, z_r = torch.zeros_like(p_here), torch.zeros_like(z_here)
    p_l[fi], z_l[fi] = pieces[:len(fi)], z_pr[:len(fi)].to(dt)
    p_r[li], z_r[li] = pieces[len(fi):], z_pr[len(fi):].to(dt)
    # the old brackets into a run and out of it go
    old = (sidx * n_u + unit) * n_t + j
    keep = ~(torch.isin(old, key[fi] - 1) | torch.isin(old, key[li]))
    parts = [(sidx[keep], unit[keep], plo[keep], phi[keep], z_lo[keep].to(dt), z_hi[keep].to(dt), t[j[keep]],
              t[j[keep] + 1], pid[j[keep]])]
    # the brackets and changes that replace them, per run (lone: a run of one sample)
    lone = first & last
    nxt = torch.arange(1, len(key) + 1, device=key.device).clamp_(max=len(key) - 1)  # the entry after each
    end_t = torch.where(next_on, t[(g + 1).clamp(max=n_t - 1)] - delta, t[(g + 1).clamp(max=n_t - 1)])
    end_p = torch.where(next_on, p_l[nxt], p_next)  # the next run's first probe, or the sample after
    end_z = torch.where(next_on, z_l[nxt], z_next)
    for m, lo_t, hi_t, a, b, za, zb in (
            (first & ~prev_on & (p_prev != p_l), t[g - 1], t[g] - delta, p_prev, p_l, z_prev, z_l),  # into the run
            (lone & (p_l != p_r), t[g], t[g], p_l, p_r, z_l, z_r),  # through the kink at a lone sample: not bisected
            (first & ~lone & (p_l != p_here), t[g], t[g], p_l, p_here, z_l, z_here),  # onto it at a run's start
            (last & ~lone & (p_here != p_r), t[g], t[g], p_here, p_r, z_here, z_r),  # off it at a run's end
            (last & (p_r != end_p), t[g] + delta, end_t, p_r, end_p, z_r, end_z)):  # on to what follows the run
        parts.append((k[m], u[m], a[m], b[m], za[m], zb[m], lo_t[m], hi_t[m], pid[g[m]]))
    out = [torch.cat(c) for c in zip(*parts)]
    order = torch.argsort(out[0], stable=True)  # site by site, as the brackets were
    return tuple(c[order] for c in out)


def _narrow_shared(runner: Runner, gpids, ppid, sidx, unit, plo, phi, lo, hi, f_lo, f_hi, kink, tol: float):
    """Narrow the brackets that share their interval with at least ``_SHARED_MIN - 1`` others, in place, by
    ``_SUB - 1`` evenly spaced sub-samples per shared interval (evaluated batch by batch under the budget): each
    bracket moves to the first sub-interval whose right end is on another piece than ``plo`` (its left end is then
    on ``plo``: the bracket still holds a change), with the unit inputs there. Returns the kinks of the new brackets
    (the piece at the right end may change for units with several kinks)."""
    while len(lo):
        act = torch.nonzero((hi - lo) > tol).flatten()
        if len(act) < _SHARED_MIN:
            return kink
        key = torch.stack([ppid[act].to(lo.dtype), lo[act], hi[act]], 1)
        uniq, group, size = torch.unique(key, dim=0, return_inverse=True, return_counts=True)
        shared = size[group] >= _SHARED_MIN
        if not bool(shared.any()):
            return kink
        rows = act[shared]  # brackets narrowed this round
        gsel = torch.unique(group[shared])  # their intervals
        gpos = torch.full((len(uniq),), -1, dtype=torch.long, device=lo.device)
        gpos[gsel] = torch.arange(len(gsel), device=lo.device)
        frac = torch.arange(1, _SUB, dtype=lo.dtype, device=lo.device) / _SUB
        g_lo, g_hi = uniq[gsel, 1], uniq[gsel, 2]
        pts_t = (g_lo[:, None] + frac[None] * (g_hi - g_lo)[:, None]).reshape(-1)  # as t_all below
        pts_pid = uniq[gsel, 0].long().repeat_interleave(_SUB - 1)
        first_row = gpos[group[shared]] * (_SUB - 1)  # each bracket's first sub-sample among the points
        n_b = len(rows)
        point_row = first_row[:, None] + torch.arange(_SUB - 1, device=lo.device)[None]  # (brackets, sub-samples)
        sub_piece, sub_z = _pieces_at(runner, gpids[pts_pid], pts_t, sidx[rows].repeat_interleave(_SUB - 1),
                                      unit[rows].repeat_interleave(_SUB - 1), point_row.reshape(-1))
        sub_piece, sub_z = sub_piece.reshape(n_b, _SUB - 1), sub_z.reshape(n_b, _SUB - 1).to(lo.dtype)
        # pieces and inputs at the bracket's ends and sub-samples, left to right
        p_all = torch.cat([plo[rows, None], sub_piece, phi[rows, None]], 1)
        z_all = torch.cat([(f_lo[rows] + kink[rows])[:, None], sub_z, (f_hi[rows] + kink[rows])[:, None]], 1)
        t_all = torch.cat([lo[rows, None], lo[rows, None] + frac[None] * (hi[rows] - lo[rows])[:, None],
                           hi[rows, None]], 1)  # the sub-samples' positions exactly as evaluated
        k_first = (p_all[:, 1:] != plo[rows, None]).to(torch.uint8).argmax(1)  # sub-interval [k, k + 1]
        ar = torch.arange(n_b, device=lo.device)
        phi[rows] = p_all[ar, k_first + 1]
        kink = _kink_between(runner, sidx, plo, phi)
        f_lo[rows] = z_all[ar, k_first] - kink[rows]
        f_hi[rows] = z_all[ar, k_first + 1] - kink[rows]
        lo[rows], hi[rows] = t_all[ar, k_first], t_all[ar, k_first + 1]
    return kink


def _kink_between(runner: Runner, sidx: torch.Tensor, plo: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """The kink a unit crosses first when its piece goes from ``plo`` towards ``phi`` (ordered scalar kinks), NaN
    for sites without them (window maxima): those brackets are bisected."""
    out = torch.full(plo.shape, float("nan"), dtype=runner.dtype, device=plo.device)
    for k, site in enumerate(runner.processed):
        kinks = getattr(site.activation, "kinks", None)
        if kinks is None or not site.activation.ordered or not site.activation.elementwise:
            continue
        rows = torch.nonzero(sidx == k).flatten()
        table = torch.tensor(kinks, dtype=runner.dtype, device=plo.device)
        up = phi[rows] > plo[rows]
        out[rows] = table[torch.where(up, plo[rows], plo[rows] - 1).clamp(0, len(kinks) - 1)]
    return out


def _pieces_at(runner: Runner, gp, t, sidx, unit, point=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Piece and input of unit ``unit[i]`` of site ``sidx[i]`` at point ``point[i]`` (default: point i) of the
    points ``(gp, t)`` (path, position). Each point is evaluated once however many units are read there, in blocks
    of points so that only one block's unit inputs are held at a time (the input is NaN at sites without scalar
    units)."""
    point = torch.arange(len(sidx), device=t.device) if point is None else point
    res = torch.empty(len(sidx), dtype=torch.long, device=t.device)
    z_unit = torch.full((len(sidx),), float("nan"), dtype=runner.dtype, device=t.device)
    step = max(1, runner.rows_per_batch())
    for s0 in range(0, len(t), step):
        in_block = torch.nonzero((point >= s0) & (point < s0 + step)).flatten()
        if not len(in_block):
            continue
        need = sorted(set(sidx[in_block].tolist()))
        ev = runner.eval_points(gp[s0:s0 + step], t[s0:s0 + step], [runner.names[k] for k in need])
        for k in need:
            q = in_block[sidx[in_block] == k]
            site = runner.processed[k]
            rows, which = torch.unique(point[q] - s0, return_inverse=True)  # the block's points read at site k
            flat = ev[site.name][rows]
            u = unit[q]
            res[q] = site.activation.pieces(flat.reshape(len(rows), *runner.z_shape[site.name])).reshape(
                len(rows), -1)[which, u]
            if site.activation.elementwise:
                z_unit[q] = flat.reshape(len(rows), -1)[which, u].to(runner.dtype)
    return res, z_unit
