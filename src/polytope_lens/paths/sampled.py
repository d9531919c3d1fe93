"""Sampled crossings for models that are not piecewise linear (GELU, SiLU, LayerNorm, softmax attention...).

Each path is sampled at ``n_samples + 1`` evenly spaced t; wherever a unit's piece (its threshold code for smooth
activations) differs between two consecutive samples, the change is located by bracketing until the bracket is
narrower than ``tol`` in t, and reported at the bracket's midpoint with the piece found at its right end. A unit that
changes piece and changes back between two samples is missed, so counts are lower bounds (``exact=False``); one
record is reported per unit and sample interval.

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

import torch

from .runner import Runner


_SLOW_STEPS = 4  # Illinois steps without halving the bracket before a bisection step
_SHARED_MIN = 8  # brackets in one interval of a path that are narrowed together by sub-samples
_SUB = 16  # sub-intervals per shared round


def sampled_chunk(runner: Runner, gpids: torch.Tensor, n_samples: int, tol: float, want_output: bool) -> dict:
    dev = runner.device
    c_paths = len(gpids)
    grid = torch.linspace(0.0, 1.0, n_samples + 1, dtype=runner.dtype, device=dev)
    pid = torch.arange(c_paths, device=dev).repeat_interleave(n_samples + 1)
    t = grid.repeat(c_paths)
    same = pid[:-1] == pid[1:]
    recs = []
    # (site k, sample interval j, unit, piece at its left end, piece at its right end, unit input at both ends),
    # found batch by batch: the samples' unit inputs are never all held at once (the memory budget), only the last
    # two samples of the batch before and their pieces, for the pair whose right end needs the sample after it
    # (a change is listed once both ends of its sample interval are known)
    pending, outputs, last, last_piece = [], [], None, {}
    for rows, o in runner.eval_point_batches(gpids[pid], t, runner.names, want_output):
        first = rows.start - (0 if last is None else len(last[0]))  # global index of the first row of z below
        ends, ends_piece = {}, {}
        for k, site in enumerate(runner.processed):
            z = o[site.name].reshape(rows.stop - rows.start, -1)
            if last is not None:
                z = torch.cat([last[k], z])
            zs = z.reshape(len(z), *runner.z_shape[site.name])
            p = site.activation.pieces(zs).reshape(len(z), -1)
            if last is not None:
                p[:len(last_piece[k])] = last_piece[k]  # the first of them with its tie resolved in the batch before
            pending.append(_changes(k, z, p, same, first, len(z) - 2))  # the last sample waits for the next one
            ends[k], ends_piece[k] = z[-2:], p[-2:].clone()
            del z, p
        last, last_piece = ends, ends_piece
        if want_output:
            outputs.append(o["output"])
    for k in range(len(runner.processed)):  # the last pair: its right end is the last path's end
        pending.append(_changes(k, last[k], last_piece[k], same, len(t) - len(last[k]), len(last[k]) - 1))
    pending.sort(key=lambda e: e[0])  # site by site (stable: sample order within a site)
    lo_all = torch.cat([t[j] for _, j, *_ in pending]) if pending else t.new_zeros(0)
    hi_all = torch.cat([t[j + 1] for _, j, *_ in pending]) if pending else t.new_zeros(0)
    sidx = (torch.cat([torch.full_like(j, k) for k, j, *_ in pending]) if pending
            else t.new_zeros(0, dtype=torch.long))
    unit_all = torch.cat([e[2] for e in pending]) if pending else sidx
    j_all = torch.cat([e[1] for e in pending]) if pending else sidx  # left sample of each bracket
    plo = torch.cat([e[3] for e in pending]) if pending else sidx
    ppid = torch.cat([pid[e[1]] for e in pending]) if pending else sidx
    phi = torch.cat([e[4] for e in pending]) if pending else sidx  # piece at the bracket's right end
    kink = _kink_between(runner, sidx, plo, phi)
    f_lo, f_hi = ((torch.cat([e[5 + i] for e in pending]) - kink) if pending else lo_all
                  for i in (0, 1))  # unit input minus kink at the bracket's ends
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
    keep = _touches(t, j_all, sidx, unit_all, plo, phi, lo_all, hi_all, tol)
    right = phi  # the piece entered: the one at the right end of the final bracket
    for k in range(len(runner.processed)):
        rows = torch.nonzero((sidx == k) & keep).flatten()
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


def _touches(t, j, sidx, unit, plo, phi, lo, hi, tol: float) -> torch.Tensor:
    """Which brackets become records (a mask; changes ``lo``/``hi`` in place). A unit on its kink at sample i (its
    tie-break piece there) makes two brackets, into that piece on [t_{i-1}, t_i] and out of it on [t_i, t_{i+1}].
    Where bisection moved neither off t_i (the unit is on the kink at t_i alone, or over less than ``tol``), it
    touched the kink there: it changes piece once at t_i, from the piece before to the piece after, or not at all
    where the two are equal (it turned back), as the exact engine counts. Where either bracket moved, the unit
    stays on its kink over a stretch and both changes count, at the stretch's ends (a window of a ReLU's zeros
    shorter than the sample spacing; before stop 31 such a stretch was taken for a touch and its change moved by up
    to a sample interval, or dropped). Only bisected brackets, wider than ``tol`` to start with, are paired: one no
    wider was never narrowed, so its unmoved ends say nothing (samples closer than ``tol`` are the resolution), and
    a bisected bracket has moved one end, so no bracket is paired on both sides."""
    keep = torch.ones(len(j), dtype=torch.bool, device=j.device)
    wide = (t[j + 1] - t[j]) > tol
    into = torch.nonzero(wide & (hi == t[j + 1])).flatten()  # brackets still ending at their right sample
    out_of = torch.nonzero(wide & (lo == t[j])).flatten()  # brackets still starting at their left sample
    if not len(into) or not len(out_of):
        return keep
    n_u, n_t = int(unit.max()) + 1, len(t)
    key_in = (sidx[into] * n_u + unit[into]) * n_t + j[into] + 1  # (site, unit, sample i)
    key_out = (sidx[out_of] * n_u + unit[out_of]) * n_t + j[out_of]
    order = torch.argsort(key_out)
    pos = torch.searchsorted(key_out[order], key_in).clamp_(max=len(order) - 1)
    pair = key_out[order][pos] == key_in
    a, b = into[pair], out_of[order][pos[pair]]  # a: into the tie-break piece at t_i, b: out of it
    pair = phi[a] == plo[b]
    a, b = a[pair], b[pair]
    keep[a] = False
    keep[b] = plo[a] != phi[b]  # a change from the piece before t_i to the one after, or none
    lo[b] = hi[b] = t[j[b]]  # at t_i
    return keep


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
