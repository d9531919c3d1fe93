"""Exact 2-D slices of piecewise-linear models: linear regions, pictures, local complexity, neighbouring regions.

``slice_box(model)`` partitions the box [-1, 1]^2 of a 2-input model; ``slice_through(model, p0, p1, p2)`` the plane
through three points of any input space, or (``layer=``, ``inputs=``) of any site's output space; ``slice_plane`` takes
a ``Plane``. Each returns a ``SliceResult`` (regions with vertices, area, code per site and output affine map; the
decision boundary; ``to_dict``, ``plot``, ``save_png``, ``save_svg``). ``neighbours`` compares adjacent regions,
``local_complexity``/``exact_local_complexity`` measure how many units change piece near points, and
``render.opening_figure`` draws a toy classifier's polytopes per layer.

Layout: ``geometry`` (planes, validation), ``_mesh`` (cells and the cutting primitive), ``partition`` (the site loop),
``results``, ``render``, ``neighbours``, ``complexity``.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from .._heap import keep_freed_memory
from ..capture import check_capture_kwargs, encoded_forward, input_tensors
from ..errors import InvalidInputError, is_int, is_real
from ..paths.runner import check_dtype
from .complexity import LocalComplexity, exact_local_complexity, local_complexity
from .geometry import Plane
from .neighbours import Neighbours, neighbours
from .results import SliceResult

__all__ = ["Plane", "SliceResult", "slice_plane", "slice_box", "slice_through", "neighbours", "Neighbours",
           "local_complexity", "exact_local_complexity", "LocalComplexity"]


def min_tol(dtype: torch.dtype) -> float:
    """The smallest snapping tolerance a slice accepts: 64 ulps of the dtype (1.4e-14 in float64, 7.6e-6 in
    float32). Below the dtype's rounding, values that are exact zeros (a unit on its kink over an area) come out
    +-1e-8 in float32 and are not snapped: kink lines that meet in exact arithmetic miss each other, cells' rings
    overlap or vanish, and the plane is no longer tiled."""
    return 64 * torch.finfo(dtype).eps


def default_tol(dtype: torch.dtype) -> float:
    """The snapping tolerance a slice uses unless told: 1e-10 in float64, ``min_tol`` (7.6e-6) in float32."""
    return max(1e-10, min_tol(dtype))


def _check(owner, dtype, tol, memory_budget):
    check_dtype(owner, dtype)
    low = min_tol(dtype)
    if tol is not None and not (is_real(tol) and low <= tol < 1e-3):
        raise InvalidInputError(f"The 'tol' parameter of {owner} must be None or a number in [{low:.3g}, 1e-3) for "
                                f"{str(dtype).replace('torch.', '')} (64 ulps at least: below the dtype's rounding "
                                f"the plane is not tiled). Got {tol!r}.")
    if not is_int(memory_budget) or memory_budget < (1 << 16):
        raise InvalidInputError(f"The 'memory_budget' parameter of {owner} must be an int >= 64 KiB (bytes). "
                                f"Got {memory_budget!r}.")


def slice_plane(model: nn.Module, plane: Plane, *, layer: str | None = None, inputs=None, until: str | None = None,
                units=None, dtype: torch.dtype = torch.float64, device="cpu", tol: float | None = None,
                memory_budget: int = 1 << 30, outputs: bool = True, single_thread: bool | None = None,
                forward: Callable | None = None, **capture_kwargs) -> SliceResult:
    """Exact partition of ``plane`` into the linear regions of ``model``.

    Parameters
    ----------
    model : nn.Module
        Piecewise linear between its captured sites (Linear, Conv, BatchNorm in eval, pooling, residual adds; ReLU,
        LeakyReLU, ReLU6/Hardtanh, abs, MaxPool).
    plane : Plane
    layer : str, optional
        Site whose output the plane replaces (then ``inputs``: one real example, a batch of 1, feeding every other
        branch; the plane's points must have the site's output shape).
    until : str, optional
        Glob naming the last site that cuts, after the plane's site (the regions of the network truncated there; no
        output maps then, and a bend that capture does not follow after that site is not refused).
    units : sequence of int or "position", optional
        Distinct flat unit indices of the last site that cut, or ``"position"``: the channel vector at the centre
        position of a (C, H, W) site (the paper's CNN protocol, the same units as paths' ``units="position"``).
    dtype, device, tol
        float64 by default; ``tol`` is the snapping tolerance relative to each site's scale (see ``partition``);
        None: ``default_tol(dtype)``, 1e-10 in float64 and 64 ulps (7.6e-6) in float32, lowered (down to 64 ulps,
        with a note) at sites whose unit inputs move by little more than that across a small plane; at least 64
        ulps.
    memory_budget : int
        Bytes; estimated before each site and checked as cells grow; over it raises ``InvalidInputError``.
    outputs : bool
        Fit the output's affine map per region and find the decision boundary (see ``SliceResult.slope`` for which
        part of the output they describe; ``notes`` say when it is part of it, or why there are none).
    single_thread : bool or None
        On CPU, True runs everything on one torch thread and False on all; None (default) uses one thread only for
        the cuts made one unit or window at a time (max pooling, the decision boundary, degenerate sites: many
        small ops, where multi-threaded row gathers are far slower) and all threads elsewhere. Restored after.

    Returns
    -------
    SliceResult

    Raises
    ------
    InvalidInputError, NotPiecewiseLinearError, UnsupportedActivationError

    Examples
    --------
    >>> mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> res = slice_box(mlp)
    >>> res.exact, float(res.area.sum())
    (True, 4.0)
    """
    from .partition import NEAR_RESOLUTION, WIDE_PLANE, build
    owner = "slice_plane"
    check_capture_kwargs(slice_plane, capture_kwargs)
    _check(owner, dtype, tol, memory_budget)
    floor = min_tol(dtype) if tol is None else None  # the default tol adapts to a small plane; a given one does not
    tol = default_tol(dtype) if tol is None else tol
    if not isinstance(plane, Plane):
        raise InvalidInputError(f"The 'plane' parameter of {owner} must be a Plane. Got {type(plane).__name__}.")
    if layer is not None:
        if inputs is None:
            raise InvalidInputError(f"{owner} with layer= needs 'inputs': one real model input (batch of 1) that "
                                    "feeds every other branch.")
        inputs = input_tensors(inputs)  # a bundle's encoded inputs (ModelInputs) as their tensors
        _check_one_example(inputs, owner)
        plane = plane.at(_resolve_site(model, inputs, layer, forward, capture_kwargs, dtype, device), inputs)
    elif plane.site is not None:
        _check_one_example(plane.inputs, owner)
    threads = torch.get_num_threads()
    cpu = torch.device(device).type == "cpu"
    if single_thread and cpu:
        torch.set_num_threads(1)
    keep_freed_memory()
    try:
        out = build(model, plane, until=until, units=units, dtype=dtype, device=device, tol=tol,
                    memory_budget=memory_budget, forward=forward, capture_kwargs=capture_kwargs, owner=owner,
                    want_output=outputs, round_threads=1 if (single_thread is None and cpu) else None,
                    tol_floor=floor)
    finally:
        torch.set_num_threads(threads)
    info = {}
    for s in out["sites"]:
        n = int(np.prod(out["z_shape"][s.name])) if not (out["units"] is not None and s is out["sites"][-1]) \
            else len(out["units"])
        if s.activation.__class__.__name__ == "WindowMax":
            n = len(s.activation.window_index(out["z_shape"][s.name]))
        info[s.name] = {"units": n, "activation": s.activation.describe()}
        if out["units"] is not None and s is out["sites"][-1]:  # the model's unit (or window) of each column
            info[s.name]["unit_ids"] = [int(u) for u in torch.as_tensor(out["units"]).flatten().tolist()]
    notes = []
    if not out["full"]:
        notes.append("partial: only sites up to " + out["sites"][-1].name + (" (selected units)" if
                     out["units"] is not None else "") + "; no output maps or decision boundary")
    notes.extend(out["notes"])
    if out["lowered"]:
        low = out["lowered"]
        notes.append(f"tol lowered from {tol:g} to {min(low.values()):.3g} at {len(low)} site(s) "
                     f"({', '.join(low)}): across this plane their unit inputs move by less than 10^6 x tol (of "
                     "their scale), so tol is kept to a millionth of that move (at least 64 ulps)")
    if out["coarse"]:
        worst = max(out["coarse"], key=out["coarse"].get)
        notes.append(f"{NEAR_RESOLUTION}: at {worst!r} the snapping tolerance is {out['coarse'][worst]:.2g} of how "
                     "far the least-moving unit whose kink the plane crosses moves across it, so regions thinner than "
                     "about that share of the plane may be merged (use a larger plane)")
    if out["wide"]:
        worst = max(out["wide"], key=out["wide"].get)
        notes.append(f"{NEAR_RESOLUTION}: at {worst!r} the snapping tolerance (tol x the largest unit input over the "
                     f"plane) is {out['wide'][worst]:.2g} of the unit inputs' size at the vertex where they are "
                     f"smallest: {WIDE_PLANE}, where regions narrower than about tol x the plane's extent may be "
                     "merged (use a smaller plane)")
    if out["fallbacks"]:
        notes.append(f"{out['fallbacks']} site(s) cut unit by unit: kink lines met within tol (ties), or the all-lines "
                     "arrangement would not fit the memory budget")
    return SliceResult(
        num_regions=int(len(out["deg"])), exact=True, dtype=str(dtype).replace("torch.", ""), tol=float(tol),
        plane=out["plane"], sites=tuple(s.name for s in out["sites"]), site_info=info,
        coords=out["coords"].cpu(), ring=out["ring"].cpu(), deg=out["deg"].cpu(), area=out["area"].cpu(),
        codes=out["codes"].cpu().numpy(), site_bytes={n: (o, b) for n, o, b in out["site_bytes"]},
        slope=None if out["slope"] is None else out["slope"].cpu(),
        offset=None if out["offset"] is None else out["offset"].cpu(),
        boundary=None if out["boundary"] is None else out["boundary"].cpu(), seconds=out["seconds"],
        rounds=out["rounds"], notes=tuple(notes))


def _check_one_example(inputs, owner: str) -> None:
    """The real input that feeds a site plane's other branches: one example (a batch of 1), finite."""
    tensors = list(inputs.values()) if isinstance(inputs, Mapping) else [inputs]
    for t in tensors:
        if isinstance(t, torch.Tensor) and (t.dim() == 0 or len(t) != 1):
            raise InvalidInputError(f"The 'inputs' parameter of {owner} must be one real model input, a batch of 1 "
                                    f"(e.g. x[:1]). Got a tensor of shape {tuple(t.shape)}.")
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidInputError(f"The 'inputs' parameter of {owner} contains NaN or infinite values.")


def _resolve_site(model, inputs, layer, forward, capture_kwargs, dtype, device) -> str:
    from ..paths import PreparedModel
    prep = PreparedModel(model, forward, dtype, device)
    with torch.no_grad():
        return prep.resolve_site(prep.cast(inputs), layer, "slice_plane", capture_kwargs).name


def slice_box(model: nn.Module, lo: float = -1.0, hi: float = 1.0, **kwargs) -> SliceResult:
    """Exact partition of the box ``[lo, hi]^2`` of a 2-input model (see ``slice_plane`` for options)."""
    return slice_plane(model, Plane.box(lo, hi), **kwargs)


def slice_through(model: nn.Module, p0, p1, p2, *, margin: float = 0.25, **kwargs) -> SliceResult:
    """Exact partition of the plane through three points ``p0, p1, p2`` (each one input without a batch axis, or a
    site's output with ``layer=``/``inputs=``): orthonormal coordinates with the origin at their centroid, the domain
    their bounding square widened by ``margin`` of its side (``Plane.through``). Every other option (``layer``,
    ``inputs``, ``until``, ``units``, ``dtype``, ``device``, ``tol``, ``memory_budget``, ``outputs``, ...) is
    ``slice_plane``'s."""
    if kwargs.get("layer") is None:  # points in input space: a bundle's one named input goes to the parameter it names
        kwargs["forward"] = encoded_forward(kwargs.get("forward"), p0, p1, p2)
    return slice_plane(model, Plane.through(p0, p1, p2, margin=margin), **kwargs)
