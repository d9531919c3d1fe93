"""Sampled crossings for models that are not piecewise linear (GELU, SiLU, LayerNorm, softmax attention...).

Each path is sampled at ``n_samples + 1`` evenly spaced t; wherever a unit's piece (its threshold code for smooth
activations) differs between two consecutive samples, the change is located by bisection until the bracket is
narrower than ``tol`` in t, and reported at the bracket's midpoint with the piece found at its right end. A unit that
changes piece and changes back between two samples is missed, so counts are lower bounds (``exact=False``); one
record is reported per unit and sample interval.
"""

from __future__ import annotations

import torch

from .runner import Runner


def sampled_chunk(runner: Runner, gpids: torch.Tensor, n_samples: int, tol: float, want_output: bool) -> dict:
    dev = runner.device
    c_paths = len(gpids)
    grid = torch.linspace(0.0, 1.0, n_samples + 1, dtype=runner.dtype, device=dev)
    pid = torch.arange(c_paths, device=dev).repeat_interleave(n_samples + 1)
    t = grid.repeat(c_paths)
    vals = runner.eval_points(gpids[pid], t, runner.names, want_output=want_output)
    same = pid[:-1] == pid[1:]
    recs = []
    pending = []  # (k, j, unit, piece_lo)
    for k, site in enumerate(runner.processed):
        act = site.activation
        z = vals[site.name].reshape(len(t), *runner.z_shape[site.name])
        p = act.pieces(z).reshape(len(t), -1)
        j, unit = torch.nonzero((p[:-1] != p[1:]) & same[:, None], as_tuple=True)
        pending.append((k, j, unit, p[j, unit], p[j + 1, unit]))
        del z, p
    lo_all = torch.cat([t[j] for _, j, _, _, _ in pending]) if pending else t.new_zeros(0)
    hi_all = torch.cat([t[j + 1] for _, j, _, _, _ in pending]) if pending else t.new_zeros(0)
    sidx = (torch.cat([torch.full_like(j, k) for k, j, _, _, _ in pending]) if pending
            else t.new_zeros(0, dtype=torch.long))
    unit_all = torch.cat([u for _, _, u, _, _ in pending]) if pending else sidx
    plo = torch.cat([q for _, _, _, q, _ in pending]) if pending else sidx
    ppid = torch.cat([pid[j] for _, j, _, _, _ in pending]) if pending else sidx
    phi = torch.cat([q for _, _, _, _, q in pending]) if pending else sidx  # piece at the bracket's right end
    while len(lo_all) and bool(((hi_all - lo_all) > tol).any()):
        act_rows = torch.nonzero((hi_all - lo_all) > tol).flatten()
        mid = 0.5 * (lo_all[act_rows] + hi_all[act_rows])
        pm = _pieces_at(runner, gpids[ppid[act_rows]], mid, sidx[act_rows], unit_all[act_rows])
        stay = pm == plo[act_rows]
        lo_all[act_rows[stay]] = mid[stay]
        hi_all[act_rows[~stay]] = mid[~stay]
        phi[act_rows[~stay]] = pm[~stay]
    right = phi  # the piece entered: the one at the right end of the final bracket
    for k in range(len(runner.processed)):
        rows = torch.nonzero(sidx == k).flatten()
        recs.append((ppid[rows], 0.5 * (lo_all[rows] + hi_all[rows]), k, unit_all[rows], right[rows]))
    out = {"pid": pid, "t": t, "records": recs, "tied": torch.zeros(len(t), dtype=torch.bool, device=dev)}
    if want_output:
        out["output"] = vals["output"]
    return out


def _pieces_at(runner: Runner, gp, t, sidx, unit) -> torch.Tensor:
    """Piece of unit ``unit[i]`` of site ``sidx[i]`` at point ``t[i]`` of path ``gp[i]``, in blocks of points so that
    only one block's unit inputs are held at a time."""
    res = torch.empty(len(t), dtype=torch.long, device=t.device)
    step = max(1, runner.rows_per_batch())
    for s0 in range(0, len(t), step):
        blk = slice(s0, s0 + step)
        need = sorted(set(sidx[blk].tolist()))
        ev = runner.eval_points(gp[blk], t[blk], [runner.names[k] for k in need])
        for k in need:
            rows = torch.nonzero(sidx[blk] == k).flatten()
            site = runner.processed[k]
            zz = ev[site.name][rows].reshape(len(rows), *runner.z_shape[site.name])
            res[s0 + rows] = site.activation.pieces(zz).reshape(len(rows), -1).gather(
                1, unit[blk][rows][:, None]).squeeze(1)
    return res
