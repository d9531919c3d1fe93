"""1-D paths through a model: exact boundary crossings along segments, polylines and scaling rays.

``path_crossings(model, start, end)`` counts, for every path, where each unit of each nonlinearity changes linear
piece between ``start`` and ``end`` (t = 0 to 1): per site, with positions, units, pieces, ties, polytope density and
a semantic trace of the model's output along the way. Paths may live in the input space or, with ``layer=``, in the
output space of one activation site (the network then runs from that site on, the real ``inputs`` still feeding every
other branch). ``polyline_crossings`` and ``ray_crossings`` (``alpha * a`` or ``a + alpha * d`` with ``a`` a site's
activation) use the same engine.

Methods: ``"exact"`` (layered breakpoint refinement, ``exact.py``; float64 by default, ties reported) for models that
are piecewise linear between their captured sites; ``"sampled"`` (dense samples plus bisection, ``sampled.py``;
counts are lower bounds) for everything else; ``"auto"`` picks exact when every site is piecewise linear and a probe
confirms the model is affine between sites, and the result says which method ran.

Layout: ``geometry`` (path constructors, validation), ``runner`` (running the model at path points, affinity
proofs), ``exact``, ``sampled``, ``results`` (result objects, trace).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from .._heap import keep_freed_memory
from .._transfer import arrays_to_host_async
from ..capture import (StopForward, batched_values, check_capture_kwargs, default_forward, encoded_forward,
                       input_tensors, list_sites, model_errors, run, select_sites)
from ..codes import site_unit_indices
from ..errors import InvalidInputError, NotPiecewiseLinearError, first_line, is_int, is_real
from ..kinks import argmax_changes, counts_below, first_max, lexsort, tie_floor
from . import geometry
from .exact import Refiner, verify_chunk
from . import local
from .frontier import FrontierProgram
from .geometry import PathSpec
from .results import (PathBatchResult, PathBlock, PathList, PathResult, Trace, overflow_note, own_lengths_note,
                      traces_from_outputs)
from .runner import Runner, affine_tol, check_device, check_dtype, index_inputs, prepare_model
from .sampled import sampled_chunk, wide_ray_grid

__all__ = ["path_crossings", "polyline_crossings", "ray_crossings", "site_activations", "PathResult", "PathList",
           "PathBatchResult", "Trace", "PathSpec", "default_memory_budget"]

METHODS = ("auto", "exact", "sampled")
EVALUATORS = ("auto", "affine", "graph", "frontier", "local")


def default_memory_budget(device: torch.device) -> int:
    """The budget when none is given: 1 GiB on the CPU; on a GPU half of its free memory, at least 1 GiB (each
    chunk costs about the same host time whatever its size, so a GPU wants chunks of hundreds of paths: 784->4x512
    ran 6,505 paths/s on an H100 under 16 GiB, 8,132 under 64 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1 << 30, int(free) // 2)
    return 1 << 30


def _folded_note(frontier) -> str:
    norms, pads = frontier.folded
    parts = [f"{norms} batch norm{'s' * (norms > 1)}" if norms else "",
             f"{pads} zero padding{'s' * (pads > 1)}" if pads else ""]
    return "; " + " and ".join(p for p in parts if p) + " folded into convolutions" if norms or pads else ""


def check_choices(owner: str, method, evaluator) -> None:
    """One-line errors for a ``method`` or ``evaluator`` that is not one of ``METHODS`` / ``EVALUATORS``."""
    if method not in METHODS:
        raise InvalidInputError(f"The 'method' parameter of {owner} must be one of {', '.join(METHODS)}. "
                                f"Got {method!r}.")
    if evaluator not in EVALUATORS:
        raise InvalidInputError(f"The 'evaluator' parameter of {owner} must be one of {', '.join(EVALUATORS)}. "
                                f"Got {evaluator!r}.")


def _check_options(owner: str, method, dtype, memory_budget, tie_tol, n_samples, tol, evaluator, progress) -> None:
    if progress is not None and not callable(progress):
        raise InvalidInputError(f"The 'progress' parameter of {owner} must be None or a callable taking the number "
                                f"of paths (or fraction of a path) just finished. Got {progress!r}.")
    check_choices(owner, method, evaluator)
    check_dtype(owner, dtype)
    if memory_budget is not None and (not is_int(memory_budget) or memory_budget < (1 << 20)):
        raise InvalidInputError(f"The 'memory_budget' parameter of {owner} must be None or an int >= 1 MiB (bytes). "
                                f"Got {memory_budget!r}.")
    # a crossing moved onto a breakpoint leaves its kink up to tie_tol inside an interval: no further than the
    # rounding the affine checks allow (1e-9 in float64), or later sites' inputs are no longer affine between points
    top = affine_tol(dtype)
    if not (is_real(tie_tol) and 0 <= tie_tol <= top):
        raise InvalidInputError(f"The 'tie_tol' parameter of {owner} must be a number in [0, {top!r}] (for "
                                f"{str(dtype).replace('torch.', '')}). Got {tie_tol!r}.")
    if not is_int(n_samples) or not 2 <= n_samples <= 2**53:
        raise InvalidInputError(f"The 'n_samples' parameter of {owner} must be an int in [2, 2**53]. Got "
                                f"{n_samples!r}.")
    if not (is_real(tol) and 0 < tol < 1):
        raise InvalidInputError(f"The 'tol' parameter of {owner} must be a number in (0, 1). Got {tol!r}.")


def _n_examples(inputs, owner: str) -> int:
    """The batch size of model inputs (a tensor or a mapping of them), which must hold at least one example."""
    n = batched_values(inputs, owner)[0].shape[0]
    if n == 0:
        raise InvalidInputError(f"The 'inputs' parameter of {owner} must be a tensor (or a mapping of tensors) holding "
                                "at least one example, batch first.")
    return n


def _check_base(inputs, n_paths: int, owner: str):
    if inputs is None:
        raise InvalidInputError(f"{owner} with layer= needs 'inputs': the real model inputs (one per path) that feed "
                                "every branch other than the path site.")
    tensors = input_tensors(inputs)
    for v in batched_values(tensors, owner):
        if v.shape[0] != n_paths:
            raise InvalidInputError(f"The 'inputs' parameter of {owner} needs one row per path ({n_paths}). Got a "
                                    f"tensor of shape {tuple(v.shape)}.")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise InvalidInputError(f"The 'inputs' parameter of {owner} contains NaN or infinite values.")
    return tensors


def _text_lengths(base, owner: str) -> list[tuple[torch.Tensor, int]] | str | None:
    """Rows of right-padded text inputs grouped by content length: ``[(rows, length), ...]`` when an
    ``attention_mask`` (ones, then zeros) pads some row; a note when a mask pads otherwise (on the left, or with
    holes), which is not trimmed; None when nothing is padded.

    A text's paths at a site run at its own length: positions past its mask are not the text's, and counting their
    crossings (and their share of a path's length) made one text's result depend on what it was batched with (32
    padding positions added 10,746 crossings to 16,641 on a MiniLM ray)."""
    mask = base.get("attention_mask") if isinstance(base, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    lengths = (mask != 0).sum(1)
    empty = torch.nonzero(lengths == 0).flatten().tolist()
    if empty:
        raise InvalidInputError(f"Rows {empty[:5]} of the 'inputs' of {owner} have no tokens (their attention_mask is "
                                "all 0).")
    if bool((lengths == mask.shape[1]).all()):
        return None
    if not bool(((mask != 0) == (torch.arange(mask.shape[1], device=mask.device) < lengths[:, None])).all()):
        return ("the attention_mask pads on the left or has holes: rows are not run at their own lengths, so "
                "crossings at padding positions are counted (pad on the right, or run each text alone)")
    return [(torch.nonzero(lengths == n).flatten(), int(n)) for n in torch.unique(lengths).tolist()]


def _text_rows(v, rows: torch.Tensor, length: int, seq: int, axis: int, batched: bool = True):
    """Rows ``rows`` of ``v`` (a tensor, a mapping of model inputs, or None; ``batched=False``: one shared by every
    row) with axis ``axis`` (the positions) cut to ``length`` where it has the padded size ``seq``."""
    if v is None:
        return None
    if isinstance(v, dict):
        return {k: _text_rows(x, rows, length, seq, axis, batched=False) for k, x in index_inputs(v, rows).items()}
    if not isinstance(v, torch.Tensor):
        return v
    v = v[rows.to(v.device)] if batched and v.dim() else v
    return v.narrow(axis, 0, length) if v.dim() > axis and v.shape[axis] == seq else v


def _per_text(run_group, base, site_shape: tuple, owner: str, units=None) -> PathBatchResult | str | None:
    """``run_group(rows, length)`` for each group of equally long texts (``_text_lengths``), joined in row order;
    or a note for the untrimmed run when padding cannot be trimmed (left padding; ``units``, which index the padded
    layout); or None when there is nothing to trim (no padding, or a site whose first axis is not the positions)."""
    groups = _text_lengths(base, owner)
    if groups is None or not site_shape or site_shape[0] != base["attention_mask"].shape[1]:
        return None
    if isinstance(groups, str):
        return groups
    if units is not None:
        return ("units= index the padded layout, so rows are not run at their own lengths: crossings at padding "
                "positions are counted")
    parts = []
    for rows, n in groups:
        try:
            parts.append(run_group(rows, n))
        except InvalidInputError as e:  # the group's path indices are not the batch's: say which rows they are
            raise InvalidInputError(f"{first_line(e).rstrip('.')} (in the rows {rows.tolist()[:8]} of the batch, "
                                    f"texts of {n} positions run together: path indices count within them).") from None
    res = PathBatchResult.concat(parts, rows=[rows.tolist() for rows, _ in groups])
    return _noted(res, own_lengths_note([n for _, n in groups], site_shape[0]))


def _noted(res: PathBatchResult, note) -> PathBatchResult:
    """``res`` with ``note`` added (None: as it is)."""
    return res if note is None else dataclasses.replace(res, notes=res.notes + (note,))


class PreparedModel:
    """A float64 (or ``dtype``) eval-mode copy of a model with its forward call: what paths and slices run."""

    def __init__(self, model, forward, dtype, device):
        self.model = prepare_model(model, dtype, device)
        self.fwd = forward(self.model) if forward is not None else default_forward(self.model)
        self.dtype, self.device = dtype, torch.device(device)

    def cast(self, v):
        """``v`` (a tensor or a mapping of them) in this model's dtype on its device (``geometry.cast``)."""
        return geometry.cast(v, self.dtype, self.device)

    def resolve_site(self, base, layer: str, owner: str, capture_kwargs):
        first = index_inputs(base, torch.zeros(1, dtype=torch.long, device=self.device))
        with model_errors(self.fwd, first, owner, "'inputs'"):
            sites = list_sites(self.model, lambda: self.fwd(first), **capture_kwargs)
        chosen = select_sites(sites, layer)
        if len(chosen) != 1:
            raise InvalidInputError(f"The 'layer' parameter of {owner} must name one site; {layer!r} matches "
                                    f"{len(chosen)} ({', '.join(s.name for s in chosen[:5])}).")
        return chosen[0]

    def site_output(self, base, site, n: int, capture_kwargs) -> torch.Tensor:
        zs = []
        step = 256
        for s in range(0, n, step):
            idx = torch.arange(s, min(n, s + step), device=self.device)

            def handler(st, z):
                if st.name == site.name:
                    zs.append(z.detach())
                    raise StopForward
            run(self.model, lambda: self.fwd(index_inputs(base, idx)), handler, **capture_kwargs)
        z = torch.cat(zs)
        if site.apply is None:
            raise InvalidInputError(f"Site {site.name!r} is a declared site; paths at it are not supported.")
        return site.apply(z)


def _path_site(prep, layer: str | None, inputs, shape, lead: int, what: str, owner: str, capture_kwargs) -> tuple:
    """``(inputs as the model's, site name)`` of paths at site ``layer``, or ``(None, None)`` for paths in input
    space. Their points must have the site output's shape after ``lead`` batch dimensions (P, or P and K)."""
    if layer is None:
        return None, None
    base = prep.cast(_check_base(inputs, shape[0], owner))
    site = prep.resolve_site(base, layer, owner, capture_kwargs)
    want = tuple(prep.site_output(base, site, 1, capture_kwargs).shape[1:])
    if tuple(shape[lead:]) != want:
        lead_dims = "P, " if lead == 1 else "P, K, "
        raise InvalidInputError(f"The {what} of {owner} at layer {site.name!r} must have that site's output shape "
                                f"({lead_dims}{', '.join(map(str, want))}). Got {tuple(shape)}.")
    return base, site.name


def _last_site_units(runner, units, method, owner) -> torch.Tensor | None:
    """Flat unit indices of the last processed site to count crossings of (``units``: indices, or ``"position"``
    for the channel vector at the centre position of a (C, H, W) site, the paper's CNN protocol); None = all."""
    if units is None:
        return None
    site = runner.processed[-1]
    if method == "sampled":
        raise InvalidInputError(f"The 'units' parameter of {owner} needs exact mode (method {method!r}).")
    idx = site_unit_indices(site, tuple(runner.z_shape[site.name]), units, owner)
    return torch.sort(idx).values.to(runner.device)


CPU_CHUNK_BYTES = 512 << 20
MIN_PIECE_POINTS = 4  # a piece of a path holds its two ends and some new breakpoints


def _analyse(prep: PreparedModel, spec: PathSpec, *, owner, layers, method, tie_tol, n_samples, tol, trace, verify,
             memory_budget, evaluator, capture_kwargs, units=None, progress=None) -> PathBatchResult:
    t0 = time.perf_counter()
    keep_freed_memory()
    memory_budget = default_memory_budget(prep.device) if memory_budget is None else memory_budget
    spec = spec.to(prep.dtype, prep.device)
    if spec.site is None:
        probe = spec.knots_x[0:1, 0]
    else:
        probe = index_inputs(spec.base, torch.zeros(1, dtype=torch.long, device=prep.device))
    runner = Runner(prep.model, prep.fwd, spec, dtype=prep.dtype, device=prep.device, memory_budget=memory_budget,
                    capture_kwargs=capture_kwargs, owner=owner, probe_input=probe)
    if not runner.processed:
        raise InvalidInputError(f"No activation site runs after {spec.site or 'the input'} in this model, so {owner} "
                                "has no boundaries to count.")
    reported = [s.name for s in select_sites(runner.processed, layers)] if layers is not None else runner.names
    notes = []
    if trace and not runner.has_output:
        trace = False
        notes.append("no semantic trace: the model's output holds no class scores (a text encoder's hidden states, "
                     "say)")
    if layers is not None:
        # crossings of the reported sites depend only on the sites up to the last of them: stop there
        last = max(runner.names.index(n) for n in reported)
        if last + 1 < len(runner.names):
            runner.processed, runner.names = runner.processed[:last + 1], runner.names[:last + 1]
            notes.append(f"sites after {runner.names[-1]} were not processed (not needed for the reported ones)"
                         + ("; the trace's regions are those of the processed sites, and class changes are placed "
                            "by bisection on the model (to 1e-10 in t)" if trace else ""))
    unit_idx = _last_site_units(runner, units, method, owner)
    if unit_idx is not None:
        notes.append(f"crossings of {runner.names[-1]} counted for {len(unit_idx)} selected units"
                     + ("; the trace's regions are bounded by those and earlier sites' crossings" if trace else ""))
    smooth = [s.name for s in runner.processed if not s.activation.exact]
    # a declared site's activation is applied by the model itself, later, in code capture does not see: exact mode
    # cannot compute the site's output at its new points (sampled mode runs the model)
    declared = [s.name for s in runner.processed if s.apply is None and s.activation.exact]
    if declared and method == "exact":
        raise NotPiecewiseLinearError(f"site {declared[0]!r} is a declared site (declared_sites): the model applies "
                                      "its activation itself, which exact mode cannot follow; use method='sampled' "
                                      "(or 'auto').")
    smooth += declared
    bad, out_affine = runner.affinity_probe(want_output=trace)
    hidden = runner.hidden_kink(runner.processed)
    if method == "exact":
        if hidden:
            raise runner.bend_error(hidden, " or use method='sampled' (or 'auto')")
        if smooth:
            raise NotPiecewiseLinearError(
                f"not piecewise-linear: site {smooth[0]!r} applies a smooth activation "
                f"({runner.processed[runner.names.index(smooth[0])].op}); use method='sampled' (or 'auto').")
        if bad:
            raise NotPiecewiseLinearError(
                f"not piecewise-linear: the unit input of site {bad[0]!r} is not an affine function of the earlier "
                "sites' outputs (an operation capture does not see, e.g. LayerNorm or softmax, sits before it); use "
                "method='sampled' (or 'auto').")
    use_exact = method == "exact" or (method == "auto" and not smooth and not bad and not hidden)
    if use_exact and spec.alphas is not None:
        geometry.check_ray_resolution(spec.alphas, owner)
    if method == "auto" and not use_exact:
        notes.append("auto chose sampled: " + (f"declared site {smooth[0]} (the model applies its activation)"
                                                if smooth and smooth[0] in declared else
                                                f"smooth activation at {smooth[0]}" if smooth else
                                                f"{hidden}, a bend outside the sites" if hidden else
                                                f"not affine between sites before {bad[0]}"))
    floor = 4 * torch.finfo(prep.dtype).eps  # the narrowest bracket the dtype resolves in t (spacing near 1: eps)
    if not use_exact and tol < floor:
        notes.append(f"tol raised from {tol:g} to {floor:g}: {str(prep.dtype).replace('torch.', '')} cannot place a "
                     "crossing more finely in t")
        tol = floor
    if not use_exact and prep.dtype == torch.float32:
        notes.append("float32: the rounding of the unit inputs, not only tol, limits where a crossing is placed (on "
                     "GELU MLPs up to about 4 x tol from the true root); use float64 for positions")
    affine = frontier = None
    why_not = ""
    if use_exact and evaluator in ("auto", "affine"):
        affine = runner.extract_affine(want_output=trace and out_affine and unit_idx is None)
        if affine is None and evaluator == "affine":
            raise InvalidInputError(f"evaluator='affine' in {owner}: the Jacobian blocks between sites do not fit in "
                                    f"half the memory budget ({memory_budget} bytes); raise it or use 'graph'.")
    # auto takes the frontier evaluator, measured faster than the graph route when sites follow sites (on the CPU,
    # and on an H100 through EfficientNet-Lite0: docs/benchmarks.md); a path through one site makes no new points to
    # evaluate, so there the frontier's checks would only add time
    if use_exact and (evaluator in ("frontier", "local") or (evaluator == "auto" and affine is None
                                                             and len(runner.processed) > 1)):
        frontier, why_not = FrontierProgram.build(runner)
        if frontier is None and evaluator in ("frontier", "local"):
            raise InvalidInputError(f"evaluator={evaluator!r} in {owner} cannot follow this model: {why_not}; use "
                                    "'graph' or 'auto'.")
        why_not_local = local.unsupported(frontier, runner) if evaluator == "local" else ""
        if why_not_local:
            raise InvalidInputError(f"evaluator='local' in {owner} cannot follow this model: {why_not_local}; use "
                                    "'frontier' or 'auto'.")
    if use_exact:
        notes.append("evaluator: affine (Jacobian blocks between sites)" if affine is not None
                     else "evaluator: local (each spatial position holds the breakpoints of its own backward cone, "
                     "through the frontier's FX graph" + _folded_note(frontier) + ")" if evaluator == "local"
                     else "evaluator: frontier (every point advances site by site through the model's FX graph"
                     + _folded_note(frontier) + ")" if frontier is not None
                     else "evaluator: graph (forward passes at new breakpoints, from the site that made them where "
                     "the model allows" + (f"; not the frontier evaluator: {why_not}" if why_not else "") + ")")
    ties = geometry.TieTolerance.of(spec, tie_tol)
    refiner = Refiner(runner, affine, ties, trace, unit_idx, output_affine=out_affine,
                      frontier=frontier, local=evaluator == "local") if use_exact else None

    n_paths = spec.n_paths
    zdims = [math.prod(runner.z_shape[n]) for n in runner.names]
    width = max(zdims)
    trace_w = 3 * runner.n_outputs if trace else 0  # outputs at points and midpoints, softmax temporaries
    if use_exact:
        # the appended layout holds fewer arrays (no merges, no bends: ``Refiner.point_widths``)
        # the frontier evaluator holds what is live across one cut (twice while new points are added), not every
        # later site's unit inputs
        held = refiner.point_widths * width if refiner.append else (
            6 * width + (2 * frontier.live_values if frontier is not None else
                         sum(zdims) if affine is None else 2 * width))
        per_point = 8 * (held + trace_w + 64)
        # points held at the last site, if half the units of the others cross (its own breakpoints cost nothing)
        est_pts = spec.knots_t.shape[1] + 0.5 * sum(zdims[:-1])
    else:
        per_point = 8 * (2 * sum(zdims) + trace_w + 64)
        est_pts = n_samples + 1
    # on the CPU a chunk beyond a few hundred MiB only adds cache misses and page faults (784->4x512: 122 paths/s at
    # 128-512 MiB chunks, 107 at 1 GiB, 76 at 2 GiB); on a GPU bigger chunks amortise the launches, so the budget rules
    chunk_bytes = min(memory_budget, CPU_CHUNK_BYTES) if prep.device.type == "cpu" else memory_budget
    results = PathList()
    arriving = []  # what waits for each chunk's results to reach the host
    lengths = spec.length.double().cpu().numpy()  # once: a copy per chunk would wait for the device each time
    start = 0
    guessed = True  # est_pts is a guess until a path has been refined
    while start < n_paths:
        c = int(max(1, min(n_paths - start, chunk_bytes // max(1, int(est_pts * per_point)))))
        gp = torch.arange(start, start + c, device=prep.device)
        in_pieces = False
        if not use_exact:
            out = sampled_chunk(runner, gp, n_samples, tol, trace)
        elif guessed or est_pts * per_point > memory_budget:
            # one path whose breakpoints may not fit the budget at once: refine it in pieces along t
            c, gp, in_pieces = 1, gp[:1], True
            max_pts = memory_budget // per_point
            if max_pts < MIN_PIECE_POINTS:
                raise InvalidInputError(
                    f"The memory budget of {owner} ({memory_budget / 2**20:.0f} MiB) holds fewer than "
                    f"{MIN_PIECE_POINTS} breakpoints of a path through this model (about {per_point / 2**20:.1f} MiB "
                    f"each): raise it to at least {math.ceil(MIN_PIECE_POINTS * per_point / 2**20)} MiB (CLI "
                    "--memory-mib), or follow fewer sites (layers=, CLI --layers; or a path at one --layer).")
            out = refiner.run_path_in_pieces(gp, max_pts, est_pts, progress)
            if guessed:
                est_pts, guessed = 0.0, False  # measured from now on
        else:
            out = refiner.run_chunk(gp)
        if use_exact and verify:
            verify_chunk(runner, gp, out["pid"], out["t"], n_check=32, seed=start, units=unit_idx, ties=ties)
        if use_exact:  # memory scales with the points evaluated at the last site (see Refiner.run_chunk)
            est_pts = max(est_pts, 1.25 * out["n_evaluated"] / c)
        arriving.append(_collect(results, out, gp, spec, lengths, runner, reported, use_exact, trace))
        if progress is not None and not in_pieces:  # a path refined in pieces has reported each piece
            progress(c)
        start += c
    for wait in arriving:
        wait()
    tolerance = (ties.record() | {"value_tol": float(runner.tol)} if use_exact
                 else {"tol": float(tol), "n_samples": int(n_samples)})
    undefined = sum(int((~np.isfinite(tr.top_prob)).sum()) for tr in results.traces())
    if undefined:  # the sites were finite (checked), the outputs overflow: say so rather than show NaN quietly
        notes.append(overflow_note(undefined))
    return PathBatchResult(results, use_exact, "exact" if use_exact else "sampled",
                           str(prep.dtype).replace("torch.", ""), tolerance, spec.kind, spec.site, tuple(reported),
                           tuple(notes), time.perf_counter() - t0)


def _collect(results: PathList, out, gp, spec: PathSpec, lengths: np.ndarray, runner: Runner, reported, exact: bool,
             trace: bool):
    """Append a chunk's paths to ``results`` as one ``PathBlock``: records sorted by path and t, per-site counts and
    ties per path computed for the whole chunk on its device, then moved to the host together. Returns the function
    to call before the block's arrays are read (from a GPU they are filled in the background while the next chunk
    runs: ``_transfer.arrays_to_host_async``)."""
    if exact:
        _drop_ray_knots(out, spec, gp, runner)
    pid, t, tied = out["pid"], out["t"], out["tied"]
    dev, c, ns = t.device, len(gp), len(reported)
    keep_sites = [runner.names.index(n) for n in reported]
    remap = {k: i for i, k in enumerate(keep_sites)}
    parts = [(p, tt, torch.full_like(p, remap[k]), u, pc) for p, tt, k, u, pc in out["records"] if k in remap]
    if parts:
        rp, rt, rs, ru, rpc = (torch.cat(x) for x in zip(*parts))
        o = lexsort(rp, rt)
        rp, rt, rs, ru, rpc = (x[o] for x in (rp, rt, rs, ru, rpc))
    else:
        z = torch.zeros(0, dtype=torch.long, device=dev)
        rp, rt, rs, ru, rpc = z, z.to(t.dtype), z, z, z
    per_site = counts_below(rp * ns + rs, c * ns).reshape(c, ns)
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    rec_off = torch.cat([zero, torch.cumsum(per_site.sum(1), 0)])
    pt_off = torch.cat([zero, torch.cumsum(counts_below(pid, c), 0)])
    tied_cum = torch.cat([zero, torch.cumsum(tied.long(), 0)])
    ties = tied_cum[pt_off[1:]] - tied_cum[pt_off[:-1]]
    # site, unit and piece indices travel and are kept in the narrowest type that holds them (a GPU finds tens of
    # millions of crossings per minute; ``PathBlock.path`` widens a path's own records to int64)
    sites = [runner.processed[k] for k in keep_sites]
    n_units = max((math.prod(runner.z_shape[s.name]) for s in sites), default=1)
    n_pieces = max((s.activation.n_pieces for s in sites), default=1)
    rs = rs.to(torch.int16 if ns < 2**15 else torch.int32)
    rpc = rpc.to(torch.int8 if n_pieces < 2**7 else torch.int16 if n_pieces < 2**15 else torch.int64)
    ru = ru.to(torch.int32 if n_units < 2**31 else torch.int64)
    host, wait = arrays_to_host_async([rt, rs, ru, rpc, per_site, rec_off, pt_off, ties, t])
    rt_np, rs_np, ru_np, rpc_np, per_np, roff_np, poff_np, ties_np, t_np = host
    start = int(gp[0])  # a chunk is a run of consecutive paths
    len_np = lengths[start:start + c]
    output = out.get("output") if trace else None
    at_points = out.get("output_at_points") if trace else None
    traces, bisect = {}, {}
    if output is not None:
        wait()
        pcount = (poff_np[1:] - poff_np[:-1]).tolist()
        traces = _chunk_traces(out["t"], output, at_points, pcount, exact, runner.tol)
        if at_points is None:
            bisect = traces
        traces.update(_refine_flips(bisect, gp, runner))
    knots = None  # sampled polylines: their inner knots are breakpoints, as the exact engine's are
    if not exact and spec.kind == "polyline" and spec.knots_t.shape[1] > 2:
        knots = spec.knots_t[start:start + c, 1:-1].cpu().numpy()
    results.append(PathBlock(start, roff_np, rt_np, rs_np, ru_np, rpc_np, per_np, len_np, tuple(reported), exact,
                             poff_np if exact else None, t_np if exact else None, ties_np if exact else None, traces,
                             spec.alphas, knots))
    return wait


def _drop_ray_knots(out: dict, spec: PathSpec, gp: torch.Tensor, runner: Runner) -> None:
    """Take a ray's knot at alpha = 0 (``geometry.ray``) out of a chunk's exact results where no crossing of any site
    lands on it: it is a breakpoint of the engine, not of the network, and would count a region twice (and give it
    two trace rows). The merged region's output row is the mean of the outputs at its ends where those are known
    (affine on regions), else one more model pass at its midpoint."""
    if spec.kind != "ray" or spec.knots_t.shape[1] != 3:
        return
    pid, t = out["pid"], out["t"]
    t0 = spec.knots_t[gp, 1].to(device=t.device, dtype=t.dtype)
    hit = torch.zeros(len(gp), dtype=torch.bool, device=t.device)
    for p, tt, *_ in out["records"]:
        hit[p[tt == t0[p]]] = True
    idx = torch.nonzero((t == t0[pid]) & ~hit[pid]).flatten()  # never a path's first or last point (0 < t0 < 1)
    if not len(idx):
        return
    keep = torch.ones(len(t), dtype=torch.bool, device=t.device)
    keep[idx] = False
    output, at = out.get("output"), out.get("output_at_points")
    if output is not None:  # row i: the region between points i and i + 1
        if at is not None:
            merged = 0.5 * (at[idx - 1] + at[idx + 1])
        else:
            mid = 0.5 * (t[idx - 1] + t[idx + 1])
            merged = runner.eval_points(gp[pid[idx]], mid.to(runner.dtype), [], want_output=True)["output"]
        output = output.clone()
        output[idx - 1] = merged.to(output.dtype)
        rows = torch.ones(len(output), dtype=torch.bool, device=output.device)
        rows[idx] = False
        out["output"] = output[rows]
        if at is not None:
            out["output_at_points"] = at[keep]
    out["pid"], out["t"], out["tied"] = pid[keep], t[keep], out["tied"][keep]


def _chunk_traces(t: torch.Tensor, output: torch.Tensor, at_points, pcount: list[int], exact: bool,
                  tol: float) -> dict:
    """Traces of a chunk's paths (``pcount[i]`` consecutive points each), in a few passes over the whole chunk.

    Exact: one output per region (rows at the midpoints of consecutive points; the pair from a path's last point
    to the next path's first is dropped), a change reported at the breakpoint between two regions; with outputs at
    the breakpoints (``at_points``, affine on each region) every change of the top class inside a region is placed
    too (``_class_changes``). Sampled: one output per sample, a change reported at the midpoint between two samples
    (to be bisected)."""
    counts = torch.as_tensor(pcount, device=t.device)
    ends = torch.cumsum(counts, 0)
    last = torch.zeros(len(t), dtype=torch.bool, device=t.device)
    last[ends - 1] = True  # a path's last point: no region starts there, no pair reaches past it
    mid = 0.5 * (t[:-1] + t[1:])
    keep = ~last[:-1]
    if exact:
        first = torch.zeros_like(last)
        first[ends - counts] = True
        traces = traces_from_outputs(mid[keep], output[keep], t[~(first | last)], [c - 1 for c in pcount])
    else:
        traces = traces_from_outputs(t, output, mid[keep], pcount)
    traces = dict(enumerate(traces))
    if at_points is not None:
        for i, changes in enumerate(_class_changes(t, at_points, last, pcount, tol)):
            traces[i] = dataclasses.replace(traces[i], class_changes=changes)
    return traces


def _class_changes(t: torch.Tensor, logits: torch.Tensor, last: torch.Tensor, pcount: list[int],
                   tol: float, block: int = 256) -> list[np.ndarray]:
    """Every position where the top class changes along each path of a chunk whose outputs ``logits`` at its
    breakpoints ``t`` are affine on each region between them: the argmax of affine scores along each region
    (``argmax_changes``, max pooling's rule with ties within ``tol``), so several changes inside one region and a
    change back to the same class across a breakpoint are all found. Only regions whose first maximum differs at
    their ends can change (the upper envelope of lines is convex); they are followed ``block`` at a time, which
    bounds the (regions x classes x classes) work arrays."""
    logits = logits.to(torch.float64)
    first = first_max(logits, tol, tie_floor(logits))
    seg = torch.nonzero((first[:-1] != first[1:]) & ~last[:-1]).flatten()
    pos = []
    for s in range(0, len(seg), block):
        j = seg[s:s + block]
        cr = argmax_changes(logits[j], logits[j + 1], tol)
        jj = j[cr.segment]
        pos.append(torch.stack([jj.to(torch.float64), t[jj] + cr.t.to(torch.float64) * (t[jj + 1] - t[jj])]))
    found = torch.cat(pos, 1).cpu().numpy() if pos else np.zeros((2, 0))
    ends = np.cumsum(pcount)
    owner = np.searchsorted(ends, found[0], side="right")  # the path whose points hold the region's first point
    order = np.lexsort((found[1], owner))
    owner, where = owner[order], found[1][order]
    bounds = np.searchsorted(owner, np.arange(len(pcount) + 1))
    return [where[bounds[i]:bounds[i + 1]] for i in range(len(pcount))]


def _refine_flips(traces: dict, gp: torch.Tensor, runner: Runner, tol: float = 1e-10) -> dict:
    """Place the class changes of traces whose outputs are not affine between their positions (sampled mode, or
    regions of only some sites): bisection on the model between two positions whose top classes differ, the path's
    ends included (a change before the first region's midpoint or after the last one is found too).

    Such a trace holds one output per region (or sample), so a change is only known to lie between two of them; the
    model is evaluated along the path (batched over all changes of the chunk) until the bracket is below ``tol``.
    """
    if not traces:
        return traces
    ends = [(i, e) for i, tr in traces.items() for e in (0.0, 1.0) if (tr.t[0] > 0.0 if e == 0.0 else tr.t[-1] < 1.0)]
    end_top = {}
    if ends:
        pid = gp[torch.as_tensor([i for i, _ in ends], device=gp.device)]
        te = torch.tensor([e for _, e in ends], dtype=runner.dtype, device=gp.device)
        top = runner.eval_points(pid, te, [], want_output=True)["output"].argmax(-1).cpu().numpy()
        end_top = {key: int(c) for key, c in zip(ends, top)}
    which, lo, hi, c_lo, counts = [], [], [], [], {}
    for i, tr in traces.items():
        pos, cls = list(tr.t), list(tr.top_class)
        if (i, 0.0) in end_top:
            pos, cls = [0.0] + pos, [end_top[i, 0.0]] + cls
        if (i, 1.0) in end_top:
            pos, cls = pos + [1.0], cls + [end_top[i, 1.0]]
        brackets = [j for j in range(len(cls) - 1) if cls[j] != cls[j + 1]]
        counts[i] = len(brackets)
        for j in brackets:
            which.append(i)
            lo.append(pos[j])
            hi.append(pos[j + 1])
            c_lo.append(cls[j])
    out = {i: dataclasses.replace(tr, class_changes=np.zeros(0)) for i, tr in traces.items()}
    if not which:
        return out
    pid = gp[torch.as_tensor(which, device=gp.device)]
    lo = torch.as_tensor(np.asarray(lo), dtype=torch.float64, device=gp.device)
    hi = torch.as_tensor(np.asarray(hi), dtype=torch.float64, device=gp.device)
    c_lo = torch.as_tensor(np.asarray(c_lo), device=gp.device)
    for _ in range(max(1, int(math.ceil(math.log2(max(float((hi - lo).max()), tol) / tol))))):
        mid = 0.5 * (lo + hi)
        top = runner.eval_points(pid, mid.to(runner.dtype), [], want_output=True)["output"].argmax(-1)
        same = top == c_lo
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    flips = (0.5 * (lo + hi)).cpu().numpy()
    k = 0
    for i in traces:
        out[i] = dataclasses.replace(out[i], class_changes=flips[k:k + counts[i]])
        k += counts[i]
    return out


_COMMON_DOC = """
    layers : str or list of str, optional
        Globs over site names (or TransformerLens aliases) whose crossings are reported; None = every site after the
        path's start. Every site up to the last reported one is used to find the breakpoints; later sites are
        skipped (their kinks cannot move the reported crossings).
    units : array of int or "position", optional
        Count the last reported site's crossings for these of its (flattened) units only; ``"position"`` = the
        channel vector at the centre position of a (C, H, W) site (the paper's CNN protocol). Earlier sites are
        still refined in full, so the counts stay exact; the trace then has far fewer regions. Exact mode only.
    method : {"auto", "exact", "sampled"}
        ``exact`` raises ``NotPiecewiseLinearError`` on smooth activations or on models that are not affine between
        their sites (LayerNorm, softmax); ``auto`` then uses ``sampled``; the result says which ran.
    dtype : torch.dtype
        The model is copied and cast to it (float64 by default), in eval mode.
    device : str or torch.device
    tie_tol : float
        Exact mode: crossings closer than this in t make one breakpoint (counted in ``ties``); on rays, closer than
        ``tie_tol * |alpha|`` in alpha (never more than ``tie_tol`` in t); see ``exact``. At most
        the affine checks' rounding tolerance (1e-9 in float64, 1000 ulps = 1.19e-4 in float32): a crossing moved
        further would leave its kink inside an interval where later sites' inputs must be affine.
        Max-pool entries within the dtype's affine tolerance of a window's maximum count as tied at it (rounding of
        entries equal in exact arithmetic); the result states both as ``tolerance["tie_tol"]``, ``["value_tol"]``.
    n_samples, tol : int, float
        Sampled mode: samples per path and bisection width in t.
    trace : bool
        Compute the semantic trace (model output per region).
    verify : bool
        Exact mode: check the invariant on 32 random final intervals per chunk (raises on failure).
    memory_budget : int or None
        Bytes; paths are processed in chunks that fit it (large batches are chunked, never refused). None: 1 GiB on
        the CPU, half the free memory of a GPU.
    evaluator : {"auto", "affine", "graph", "frontier", "local"}
        Exact mode: evaluate breakpoints through Jacobian blocks between sites (when they fit in half the budget)
        or by forward passes; ``auto`` prefers ``affine``. ``frontier`` (models ``torch.fx`` can trace): all points
        advance together from site to site, a new breakpoint's values are interpolated instead of recomputed before
        its site (see ``paths.frontier``); an error names what stops it. ``auto`` takes it (on any device) for paths
        through two or more sites where Jacobian blocks do not apply and the model allows, else the graph route (the
        result's notes say which, and why not the frontier). ``local`` (convolutional networks on image inputs, paths
        in the input space; an opt-in): the frontier's graph, with each spatial position holding only the
        breakpoints of its own backward cone (see ``paths.local``); the same crossings, less work where a
        crossing's effect stays local; an error names what stops it.
    forward : callable, optional
        ``forward(batch)`` to run instead of ``model(x)`` / ``model(**x)`` (e.g. ``lambda x: m(inputs_embeds=x)``).
    progress : callable, optional
        Called with the number of paths just finished, after every chunk (every block on Ray workers), or with the
        fraction of a path just finished while one long path is refined piece by piece along t; the calls of a batch
        sum to its number of paths. A progress bar's ``advance``, say.
    **capture_kwargs
        Passed to ``capture`` (``activation_modules``, ``declared_sites``, ``suppress``).

    Returns
    -------
    PathBatchResult
"""


def path_crossings(model: nn.Module, start, end, *, layer: str | None = None, inputs=None,
                   layers: str | list[str] | None = None, method: str = "auto", dtype: torch.dtype = torch.float64,
                   device="cpu", tie_tol: float = 1e-12, n_samples: int = 1024, tol: float = 1e-9,
                   trace: bool = True, verify: bool = True, memory_budget: int | None = None, evaluator: str = "auto",
                   units=None,
                   forward: Callable | None = None, ray_address: str | None = None, ray_workers: int | None = None,
                   progress: Callable[[float], None] | None = None, **capture_kwargs) -> PathBatchResult:
    owner = "path_crossings"
    check_capture_kwargs(path_crossings, capture_kwargs)
    if layer is None:  # points in input space: a bundle's one named input goes to the parameter it names
        forward = encoded_forward(forward, start, end)
    _check_options(owner, method, dtype, memory_budget, tie_tol, n_samples, tol, evaluator, progress)
    # checked where the paths will run (a Ray run ships them to its workers from here)
    start, end, length = geometry.segments(start, end, owner=owner,
                                           device=None if ray_address is not None else check_device(device))
    spec = getattr(model, "spec", None) if not isinstance(model, nn.Module) else None
    from ..distributed import check_ray_options

    check_ray_options(ray_address, ray_workers, "paths", owner)
    if ray_address is not None:
        from ..distributed import ray_path_crossings

        if not isinstance(spec, str):
            raise InvalidInputError(f"{owner} with ray_address needs the model as a ModelBundle (models.load_model): "
                                    "each Ray worker reloads it from its spec.")
        if layer is not None:
            inputs = _check_base(inputs, len(start), owner)
        return ray_path_crossings(ray_address, model, start, end, inputs=inputs, workers=ray_workers,
                                  progress=progress, layer=layer,
                                  layers=layers, method=method, dtype=dtype, device=device, tie_tol=tie_tol,
                                  n_samples=n_samples, tol=tol, trace=trace, verify=verify,
                                  memory_budget=memory_budget, evaluator=evaluator, units=units, forward=forward,
                                  **capture_kwargs)
    if spec is not None:
        model = model.module
    prep = PreparedModel(model, forward, dtype, device)
    base, site_name = _path_site(prep, layer, inputs, start.shape, 1, "'start' and 'end'", owner, capture_kwargs)
    if base is not None:
        seq = start.shape[1] if start.dim() > 1 else 0
        res = _per_text(lambda rows, n: path_crossings(
            prep.model, _text_rows(start, rows, n, seq, 1), _text_rows(end, rows, n, seq, 1), layer=site_name,
            inputs=_text_rows(base, rows, n, seq, 1), layers=layers, method=method, dtype=dtype, device=device,
            tie_tol=tie_tol, n_samples=n_samples, tol=tol, trace=trace, verify=verify, memory_budget=memory_budget,
            evaluator=evaluator, units=units, forward=forward, progress=progress, **capture_kwargs),
            base, tuple(start.shape[1:]), owner, units)
        if isinstance(res, PathBatchResult):
            return res
    x = geometry.stacked([start, end], prep.dtype, prep.device)
    kt = torch.tensor([0.0, 1.0], dtype=torch.float64).expand(len(start), 2)
    spec = PathSpec(kt, x, length, "segment", site_name, base)
    return _noted(_analyse(prep, spec, owner=owner, layers=layers, method=method, tie_tol=tie_tol,
                           n_samples=n_samples, tol=tol, trace=trace, verify=verify, memory_budget=memory_budget,
                           evaluator=evaluator, units=units, capture_kwargs=capture_kwargs, progress=progress),
                  res if base is not None else None)


path_crossings.__doc__ = """Exact (or sampled) boundary crossings along straight segments ``start -> end``.

    Parameters
    ----------
    model : nn.Module or ModelBundle
    start, end : Tensor (P, *shape)
        Path endpoints: model inputs, or outputs of site ``layer`` when it is given.
    layer : str, optional
        Site (name or glob matching one site) whose output the paths replace; needs ``inputs``.
    inputs : Tensor or mapping (P, ...), optional
        Real model inputs feeding every other branch of a site path.
    ray_address : str, optional
        Analyse contiguous blocks of pairs on Ray workers (``"local"``, ``"auto"``, ``"HOST:PORT"``; ``pip install
        'polytope-lens[scale]'``); ``model`` must then be a ``ModelBundle``, which each worker reloads from its spec
        (on one GPU each when ``device`` is cuda). The blocks are joined in order: counts equal a single-process
        run's, positions to rounding (see ``distributed``). ``memory_budget`` holds per worker.
    ray_workers : int, optional
        Ray workers (default: one per GPU when ``device`` is cuda, else one per CPU of the cluster).
""" + _COMMON_DOC + """
    Examples
    --------
    >>> mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> res = path_crossings(mlp, torch.randn(5, 2), torch.randn(5, 2))
    >>> res.exact, res.method, len(res.paths)
    (True, 'exact', 5)
"""


def polyline_crossings(model: nn.Module, points, *, layer: str | None = None, inputs=None,
                       layers: str | list[str] | None = None, method: str = "auto",
                       dtype: torch.dtype = torch.float64, device="cpu", tie_tol: float = 1e-12,
                       n_samples: int = 1024, tol: float = 1e-9, trace: bool = True, verify: bool = True,
                       memory_budget: int | None = None, evaluator: str = "auto", units=None,
                       forward: Callable | None = None, progress: Callable[[float], None] | None = None,
                       **capture_kwargs) -> PathBatchResult:
    owner = "polyline_crossings"
    check_capture_kwargs(polyline_crossings, capture_kwargs)
    if layer is None:
        forward = encoded_forward(forward, points)
    _check_options(owner, method, dtype, memory_budget, tie_tol, n_samples, tol, evaluator, progress)
    knots, pts, length = geometry.polyline(points, owner=owner)
    prep = PreparedModel(model, forward, dtype, device)
    base, site_name = _path_site(prep, layer, inputs, pts.shape, 2, "'points'", owner, capture_kwargs)
    if base is not None:
        seq = pts.shape[2] if pts.dim() > 2 else 0
        res = _per_text(lambda rows, n: polyline_crossings(
            prep.model, _text_rows(pts, rows, n, seq, 2), layer=site_name, inputs=_text_rows(base, rows, n, seq, 1),
            layers=layers, method=method, dtype=dtype, device=device, tie_tol=tie_tol, n_samples=n_samples, tol=tol,
            trace=trace, verify=verify, memory_budget=memory_budget, evaluator=evaluator, units=units,
            forward=forward, progress=progress, **capture_kwargs), base, tuple(pts.shape[2:]), owner, units)
        if isinstance(res, PathBatchResult):
            return res
    spec = PathSpec(knots.to(torch.float64), pts, length.to(torch.float64), "polyline", site_name, base)
    return _noted(_analyse(prep, spec, owner=owner, layers=layers, method=method, tie_tol=tie_tol,
                           n_samples=n_samples, tol=tol, trace=trace, verify=verify, memory_budget=memory_budget,
                           evaluator=evaluator, units=units, capture_kwargs=capture_kwargs, progress=progress),
                  res if base is not None else None)


polyline_crossings.__doc__ = """Crossings along polylines through ``points`` (P, K, *shape), t by arc length.

    Parameters
    ----------
    model : nn.Module
    points : Tensor (P, K >= 2, *shape)
    layer, inputs : as in ``path_crossings``.
""" + _COMMON_DOC


def ray_crossings(model: nn.Module, inputs, *, layer: str, alphas=(0.0, 2.0), direction=None,
                  layers: str | list[str] | None = None, method: str = "auto", dtype: torch.dtype = torch.float64,
                  device="cpu", tie_tol: float = 1e-12, n_samples: int = 1024, tol: float = 1e-9,
                  trace: bool = True, verify: bool = True, memory_budget: int | None = None, evaluator: str = "auto",
                  units=None, forward: Callable | None = None, progress: Callable[[float], None] | None = None,
                  **capture_kwargs) -> PathBatchResult:
    owner = "ray_crossings"
    check_capture_kwargs(ray_crossings, capture_kwargs)
    _check_options(owner, method, dtype, memory_budget, tie_tol, n_samples, tol, evaluator, progress)
    if layer is None:
        raise InvalidInputError(f"The 'layer' parameter of {owner} is required: the site whose activation is scaled.")
    tensors = input_tensors(inputs)
    n = _n_examples(tensors, owner)
    prep = PreparedModel(model, forward, dtype, device)
    base = prep.cast(_check_base(tensors, n, owner))
    site = prep.resolve_site(base, layer, owner, capture_kwargs)
    a = prep.site_output(base, site, n, capture_kwargs)

    def group(rows, length):
        seq, d = a.shape[1], direction
        if d is not None:
            d = torch.as_tensor(d)
            d = _text_rows(d, rows, length, seq, 1) if d.dim() == a.dim() else \
                _text_rows(d, rows, length, seq, 0, batched=False)
        return ray_crossings(prep.model, _text_rows(base, rows, length, seq, 1), layer=site.name, alphas=alphas,
                             direction=d, layers=layers, method=method, dtype=dtype, device=device, tie_tol=tie_tol,
                             n_samples=n_samples, tol=tol, trace=trace, verify=verify, memory_budget=memory_budget,
                             evaluator=evaluator, units=units, forward=forward, progress=progress, **capture_kwargs)
    kt, x, length, al, d, offset = geometry.ray(a, direction, alphas, owner=owner)  # checks before any split
    trimmed = _per_text(group, base, tuple(a.shape[1:]), owner, units)
    if isinstance(trimmed, PathBatchResult):  # the groups' own alpha = 0 notes give way to the batch's
        res = dataclasses.replace(trimmed, notes=tuple(n for n in trimmed.notes if _ZERO_ALPHA not in n))
    else:
        spec = PathSpec(kt, x, length.to(torch.float64), "ray", site.name, base, al, d, offset)
        res = _noted(_analyse(prep, spec, owner=owner, layers=layers, method=method, tie_tol=tie_tol,
                              n_samples=n_samples, tol=tol, trace=trace, verify=verify, memory_budget=memory_budget,
                              evaluator=evaluator, units=units, capture_kwargs=capture_kwargs, progress=progress),
                     trimmed)
    res = _note_wide_sampled(res, al, n_samples, tol)
    return res if direction is not None else _note_zero_alpha(res, al)


def _note_wide_sampled(res: PathBatchResult, alphas: tuple, n_samples: int, tol: float) -> PathBatchResult:
    """Sampled rays whose evenly spaced samples would be further apart in alpha than the |alpha| around which the
    kinks crowd (``geometry.crowd_scale``: (1, 1e9), (-1, 1e9)) put half of them evenly in asinh(alpha / that
    scale) (``sampled.wide_ray_grid``): the note says how they were spaced and what that resolves. Evenly spaced,
    the crowded part fell in a sample interval or two (the digits CNN at stem.2.relu over (1, 1e9): 752 of 786
    crossings with 64, 1,024 or 16,384 samples; now 779, 784 and 786)."""
    wide = wide_ray_grid(alphas, n_samples)
    if res.exact or wide is None:
        return res
    a0, a1 = alphas
    s, (lo, hi) = wide.scale, wide.window
    n = len(wide.t(alphas, getattr(torch, res.dtype), "cpu"))  # fewer where the dtype rounds samples together
    nearest = 0.0 if lo < 0.0 < hi else min(abs(lo), abs(hi))  # the window's |alpha| nearest 0
    below = f", and about {s * wide.du:.2g} apart in alpha well below it" if nearest < s else ""
    note = (f"samples evenly spaced in alpha would be {wide.step:.3g} apart, more than the |alpha| around which the "
            f"ray's kinks crowd ({s:g}): {n - wide.n_even:,} of the {n:,} samples were spaced evenly in "
            f"asinh(alpha / {s:g}) over alpha in [{lo:.4g}, {hi:.4g}] (consecutive ones about a factor of "
            f"{math.exp(wide.du):.3g} apart in |alpha| well above {s:g}{below}), the other {wide.n_even:,} evenly in "
            f"alpha, {wide.even_step:.3g} apart; a unit that crosses more than once between two samples is "
            f"undercounted, and positions are known to tol in t ({tol * (a1 - a0):.3g} in alpha) or to the spacing "
            "of the samples around them, whichever is finer; use method='exact', or rays over narrower ranges")
    if note in res.notes:  # per-text groups noted it already
        return res
    return _noted(res, note)


_ZERO_ALPHA = "where the site's output is 0"  # in the alpha = 0 note (``_note_zero_alpha``)


def _note_zero_alpha(res: PathBatchResult, alphas: tuple) -> PathBatchResult:
    """A note counting the crossings at alpha = 0 of rays ``alpha * a`` whose range holds it: the site's output is 0
    there, so later units see their constants alone and many sit on a kink at once (a bias-free unit, a max-pool
    window of equal entries); they can be most of a ray's crossings (a tester's CNN: 89 of 104)."""
    t0 = geometry.zero_t(alphas)
    if not 0.0 <= t0 <= 1.0:
        return res
    t = res.crossing_t
    # sampled mode locates a change at the knot by bisection next to it, within its tolerance in t
    at = int((t == t0).sum()) if res.exact else int((np.abs(t - t0) <= res.tolerance["tol"]).sum())
    if not at:
        return res
    reach = res.tolerance["tol"] * (alphas[1] - alphas[0]) if not res.exact else 0.0
    where = ("lie at alpha = 0" if res.exact else f"were located within tol ({res.tolerance['tol']:g} in t, "
             f"{reach:.3g} in alpha) of alpha = 0, so they may lie at it (bisection cannot tell; a smaller tol "
             "narrows this)")
    note = (f"{at:,} of {len(t):,} crossings {where}, {_ZERO_ALPHA}: later units see their "
            "constants alone, and those on a kink there (a unit without bias, a max-pool window of equal entries) "
            "take the piece the tie rules give; counts and densities include them")
    return _noted(res, note)


ray_crossings.__doc__ = """Crossings along scaling rays at site ``layer``: ``alpha * a`` (or ``a + alpha * d``).

    ``a`` is the site's activation (output) for each of ``inputs``; the network runs from that site on with the real
    input feeding every other branch. t maps to ``alpha = alpha0 + t * (alpha1 - alpha0)`` (``PathResult.alpha``);
    density is per unit of Euclidean length ``(alpha1 - alpha0) * |a|`` (or ``|d|``). The ray's points are
    ``alpha * a`` (``a + alpha * d``) computed at each t, and a ray ``alpha * a`` through alpha = 0 has a knot there
    whose point is exactly 0: in a network without biases every unit there is on its kink and every max-pool window
    tied, which a point interpolated between the ends missed by rounding (spurious crossings). The knot is a
    breakpoint of the result (``PathResult.t``) only where a crossing lands on it.

    Parameters
    ----------
    model : nn.Module
    inputs : Tensor or mapping (P, ...)
    layer : str
        Site name or glob matching one site.
    alphas : (float, float)
        alpha0 < alpha1.
    direction : Tensor (*site_shape) or (P, *site_shape), optional
        ``d`` for rays ``a + alpha * d``.
""" + _COMMON_DOC


def site_activations(model: nn.Module, inputs, *, layer: str, dtype: torch.dtype = torch.float64, device="cpu",
                     forward: Callable | None = None, **capture_kwargs) -> torch.Tensor:
    """Output of the one site matching ``layer`` for each example of ``inputs``: (P, *site_output_shape).

    These are the points a path at ``layer`` runs between (``path_crossings(..., layer=layer, inputs=...)``).
    """
    owner = "site_activations"
    check_capture_kwargs(site_activations, capture_kwargs)
    check_dtype(owner, dtype)
    tensors = input_tensors(inputs)
    n = _n_examples(tensors, owner)
    prep = PreparedModel(model, forward, dtype, device)
    base = prep.cast(_check_base(tensors, n, owner))
    site = prep.resolve_site(base, layer, owner, capture_kwargs)
    return prep.site_output(base, site, n, capture_kwargs)
