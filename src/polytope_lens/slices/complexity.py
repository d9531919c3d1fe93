"""Local complexity (Humayun, Balestriero & Baraniuk): how many units change piece in a small neighbourhood.

Invariant relied on: a unit's piece is whatever the kink registry's ``pieces`` says at each vertex (captured by call,
so any model works); LC per site is the number of units whose piece is not the same at all 2P vertices of the
cross-polytope ``{x +- r v_p}``, with ``v_1..v_P`` an orthonormal basis of one random P-dim subspace of input space
(shared by all points of a call, as in the authors' code). This is a sampled proxy (``exact=False``): a unit that
changes piece only inside the hull is missed, and for deeper sites the hull is approximated by its vertices' images.
``exact_local_complexity`` instead counts the regions of the exact partition of a square of side ``r`` centred at each
point in a random plane (``exact=True`` for piecewise-linear models).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..capture import (CAPTURE_OPTIONS, check_capture_kwargs, check_kwargs, default_forward, encoded_forward,
                       model_errors, run, select_sites, unwrap_encoded)
from ..errors import InvalidInputError, check_seed, is_int, is_real, not_finite
from ..paths.runner import check_dtype, prepare_model
from .partition import NEAR_RESOLUTION, WIDE_PLANE

__all__ = ["LocalComplexity", "local_complexity", "exact_local_complexity"]


@dataclass(frozen=True)
class LocalComplexity:
    """Per-point local complexity.

    Attributes
    ----------
    per_site : dict name -> ndarray (n_points,)
        Units whose piece differs among the neighbourhood's vertices (sampled) / regions in the square (exact: one
        entry ``"regions"``).
    total : ndarray (n_points,)
        Not the same measure in the two methods: sampled, the units changing piece summed over sites (0 where no
        boundary is near); exact, the number of regions in the square (1 where none is).
    exact : bool
    method : str
    radius : float
    n_dirs : int
        P of the sampled measure; 2 (the plane) for the exact count, whose ``to_dict`` leaves it out.
    dtype : str
    notes : tuple of str
        Exact counts: the points whose square was near float resolution or wide against its central structure
        (their slice's notes), where regions may be merged and the count can be low; the slices' ``partial`` note
        under ``until``/``units``. Sampled: a radius near the points' float resolution.
    """

    per_site: dict
    total: np.ndarray
    exact: bool
    method: str
    radius: float
    n_dirs: int
    dtype: str
    notes: tuple = ()

    def to_dict(self) -> dict:
        return {"exact": self.exact, "method": self.method, "radius": self.radius,
                **({} if self.exact else {"n_dirs": self.n_dirs}), "dtype": self.dtype,
                "mean_total": float(self.total.mean()) if len(self.total) else None,
                "per_site_mean": {k: float(v.mean()) for k, v in self.per_site.items()},
                "total": self.total.tolist(), "notes": list(self.notes)}

    def plot(self, ax=None, *, bins: int = 30):
        """Histogram of ``total`` over the points. Returns the Axes."""
        from ..report.figures import new_figure

        ax = ax if ax is not None else new_figure((5, 3)).subplots()
        ax.hist(self.total, bins=bins, color="C0")
        ax.set_xlabel("regions in the square around the point" if self.exact else
                      "units changing piece near the point, summed over sites")
        ax.set_ylabel("points")
        ax.set_title(f"local complexity, {'square side' if self.exact else 'radius'} {self.radius:g} "
                     f"({'exact' if self.exact else f'sampled, {self.n_dirs} directions'}{self._smooth}, "
                     f"{self.dtype})", fontsize=9)
        ax.figure.tight_layout()
        return ax

    @property
    def _smooth(self) -> str:
        """How a count over smooth activations is qualified ('' where every site is piecewise linear)."""
        return "; smooth sites: threshold codes, approximate" if _SMOOTH in self.method else ""

    def _repr_html_(self) -> str:
        from ..report.html import rows_table, summary_html

        d = self.to_dict()
        facts = {"points": len(self.total), "measure": "exact region count in the square" if self.exact else
                 f"sampled: units changing piece over {self.n_dirs} directions{self._smooth}",
                 "square side" if self.exact else "radius": self.radius,
                 "dtype": self.dtype, "mean total": d["mean_total"]}
        return summary_html("LocalComplexity", facts,
                            rows_table(["site", "mean"], list(d["per_site_mean"].items())), notes=self.notes)


_SMOOTH = "; smooth activations use threshold codes"  # in ``method`` when a site is smooth


def _check_radius(radius, owner) -> None:
    if not (is_real(radius) and 0 < radius < math.inf):
        raise InvalidInputError(f"The 'radius' parameter of {owner} must be a finite number > 0. Got {radius!r}.")


def _points(points, owner):
    points = unwrap_encoded(points)
    if not isinstance(points, torch.Tensor) or not points.is_floating_point() or points.dim() < 2 or not len(points):
        raise InvalidInputError(f"The 'points' parameter of {owner} must be a floating tensor (n, ...) with n >= 1. "
                                f"Got {type(points).__name__} {tuple(getattr(points, 'shape', ()))}.")
    if not bool(torch.isfinite(points).all()):
        raise InvalidInputError(f"The 'points' parameter of {owner} contains NaN or infinite values.")
    return points.detach()


def local_complexity(model: nn.Module, points: torch.Tensor, *, radius: float = 0.005, n_dirs: int = 20,
                     layers: str | list[str] | None = None, seed: int = 0, dtype: torch.dtype = torch.float64,
                     device="cpu", batch_size: int = 64, forward: Callable | None = None,
                     **capture_kwargs) -> LocalComplexity:
    """Humayun et al.'s local complexity at each of ``points`` (n, *input_shape), batched over points.

    Parameters
    ----------
    radius : float
        r, the cross-polytope's radius (their default 0.005); finite and > 0.
    n_dirs : int
        P, the subspace dimension: 2P vertices per point (their default 20, i.e. 40 vertices).
    layers : globs selecting the sites counted (None = all).
    dtype : torch.float64 (default) or torch.float32, as for exact slices.
    batch_size : int >= 1
        Points per forward pass (each runs 2P vertices).

    Examples
    --------
    >>> mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
    >>> lc = local_complexity(mlp, torch.randn(8, 2), radius=0.1, n_dirs=2)
    >>> lc.total.shape
    (8,)
    """
    owner = "local_complexity"
    check_capture_kwargs(local_complexity, capture_kwargs)
    pts = _points(points, owner)
    d = math.prod(pts.shape[1:])
    if not (is_int(n_dirs) and 1 <= n_dirs <= d):
        raise InvalidInputError(f"The 'n_dirs' parameter of {owner} must be an int in [1, {d}]. Got {n_dirs!r}.")
    _check_radius(radius, owner)
    check_dtype(owner, dtype)
    if not (is_int(batch_size) and batch_size >= 1):
        raise InvalidInputError(f"The 'batch_size' parameter of {owner} must be an int >= 1. Got {batch_size!r}.")
    seed = check_seed(seed, owner)
    m = prepare_model(model, dtype, device)
    forward = encoded_forward(forward, points)
    fwd = forward(m) if forward is not None else default_forward(m)
    g = torch.Generator().manual_seed(seed)
    v, _ = torch.linalg.qr(torch.randn(d, n_dirs, generator=g, dtype=torch.float64))
    frame = torch.cat([v.T, -v.T]).to(device, dtype) * radius  # (2P, d)
    counts: dict = {}
    exact = True
    chosen = None
    for s in range(0, len(pts), batch_size):
        x = pts[s:s + batch_size].to(device, dtype)
        n = len(x)
        verts = (x.reshape(n, 1, d) + frame[None]).reshape(n * 2 * n_dirs, *pts.shape[1:])
        got = {}

        def handler(site, z, n=n):
            if not bool(torch.isfinite(z).all()):  # pieces of NaN or inf would be counted as if they were values
                raise not_finite(f"the unit inputs of site {site.name!r}", owner, dtype,
                                  "at some vertices of the cross-polytopes", "radius")
            got[site.name] = (site, site.activation.pieces(z.detach()).reshape(n, 2 * n_dirs, -1))
        with model_errors(fwd, verts[:1], owner, "points"):
            run(m, lambda: fwd(verts), handler, **capture_kwargs)
        if chosen is None:
            chosen = [st.name for st in select_sites([v_[0] for v_ in got.values()], layers)]
        for name in chosen:
            site, pc = got[name]
            exact &= site.activation.exact
            c = (pc != pc[:, :1]).any(1).sum(-1).cpu().numpy()
            counts.setdefault(name, []).append(c)
    per = {k: np.concatenate(v_) for k, v_ in counts.items()}
    total = np.sum(list(per.values()), axis=0) if per else np.zeros(len(pts), dtype=np.int64)
    # the vertices x +- r v round toward x where r is within ~1000 ulps of the points' entries
    resolution = torch.finfo(dtype).eps * float(pts.abs().max())
    notes = () if radius >= 1e3 * resolution else (
        f"{NEAR_RESOLUTION}: the radius {radius:g} is within 1000 ulps of the points' largest entry in "
        f"{str(dtype).replace('torch.', '')} ({resolution:.3g} per ulp): the vertices round toward the points, so "
        "counts can be low (use a larger radius, or float64)",)
    return LocalComplexity(per, total, False, "cross-polytope (sampled vertices)" + ("" if exact else _SMOOTH),
                           float(radius), n_dirs, str(dtype).replace("torch.", ""), notes)


def exact_local_complexity(model: nn.Module, points: torch.Tensor, *, radius: float = 0.05, seed: int = 0,
                           dtype: torch.dtype = torch.float64, device="cpu", memory_budget: int = 1 << 30,
                           **slice_kwargs) -> LocalComplexity:
    """Number of linear regions in the square of side ``radius`` centred at each point, in one random plane
    (orientation drawn from ``seed``, shared by all points of a call, as ``local_complexity``'s subspace: a point's
    count does not depend on the others); exact partitions (``slice_plane``), whose notes are passed on: a square
    near float resolution, or too wide for its central structure, may have merged regions; ``until``/``units`` count
    the regions of the network cut there."""
    from . import slice_plane
    from .geometry import Plane
    owner = "exact_local_complexity"
    own = [p for p in inspect.signature(exact_local_complexity).parameters if p != "slice_kwargs"]
    check_kwargs(owner, slice_kwargs, own + [p for p in inspect.signature(slice_plane).parameters
                                             if p not in own + ["plane", "outputs", "capture_kwargs"]]
                 + list(CAPTURE_OPTIONS))
    pts = _points(points, owner)
    if slice_kwargs.get("layer") is None:  # a bundle's one named input goes to the parameter it names
        slice_kwargs["forward"] = encoded_forward(slice_kwargs.get("forward"), points)
    _check_radius(radius, owner)
    seed = check_seed(seed, owner)
    check_dtype(owner, dtype)
    d = math.prod(pts.shape[1:])
    if d < 2:
        raise InvalidInputError(f"{owner} needs an input space of dimension >= 2. Got {d}.")
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    out, flagged, passed = [], {}, []
    for i, x in enumerate(pts):
        pl = Plane.from_directions(x.to(torch.float64), (q[:, 0] * radius / 2).reshape(x.shape),
                                   (q[:, 1] * radius / 2).reshape(x.shape), extent=1.0)
        r = slice_plane(model, pl, dtype=dtype, device=device, memory_budget=memory_budget, outputs=False,
                        **slice_kwargs)
        out.append(r.num_regions)
        for note in r.notes:
            if note.startswith(NEAR_RESOLUTION):
                flagged.setdefault("wide" if WIDE_PLANE in note else "small", []).append(i)
            elif note.startswith("partial:") and note not in passed:
                passed.append(note)
    tot = np.array(out)

    def where(rows):
        return f"at {len(rows)} of {len(tot)} points ({', '.join(map(str, rows[:8]))}{' ...' if len(rows) > 8 else ''})"
    notes = tuple(passed)
    if "small" in flagged:
        notes += (f"{NEAR_RESOLUTION} {where(flagged['small'])}: their squares are small for float resolution, "
                  "regions thinner than the snapping tolerance may be merged, so those counts can be low (use a larger "
                  "radius)",)
    if "wide" in flagged:
        notes += (f"{NEAR_RESOLUTION} {where(flagged['wide'])}: their squares are wide against the structure at "
                  "their centre (the snapping tolerance follows the largest unit input over the square), regions "
                  "narrower than about tol x the side may be merged, so those counts can be low (use a smaller "
                  "radius)",)
    return LocalComplexity({"regions": tot}, tot, True, "exact regions in a square", float(radius), 2,
                           str(dtype).replace("torch.", ""), notes)
