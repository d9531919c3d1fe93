"""Path constructors and validation: every path becomes a piecewise-affine map t -> point, t in [0, 1].

A path lives either in the model's input space (``site=None``) or in the output space of one activation site (the
network then runs from that site on: the site's output is replaced by the path point, while the real input still
feeds every other branch). Straight segments, polylines and scaling rays all reduce to *knots*: positions
``knots_t`` (P, K) with 0 = t_0 < ... < t_{K-1} = 1 and points ``knots_x`` (P, K, *shape); between knots the path is
affine. Polylines are parameterised by arc length, so t is the fraction of the path's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ..capture import unwrap_encoded
from ..data.arrays import real_array
from ..errors import InvalidInputError

__all__ = ["PathSpec", "TieTolerance", "segments", "polyline", "ray"]


@dataclass(frozen=True)
class PathSpec:
    """P piecewise-affine paths.

    Attributes
    ----------
    knots_t : Tensor (P, K)
        Knot positions, 0 first and 1 last.
    knots_x : Tensor (P, K, *shape)
        Path points at the knots.
    length : Tensor (P,)
        Euclidean length of each path in the space it is drawn in.
    kind : {"segment", "polyline", "ray"}
    site : str or None
        Canonical name of the site whose output the path replaces; None for the model input.
    base : Tensor or mapping or None
        Real model inputs (P, ...) feeding the other branches of site paths.
    alphas : tuple or None
        (alpha0, alpha1) of a scaling ray: t maps to alpha0 + t * (alpha1 - alpha0).
    direction, offset : Tensor (P, *shape) or None
        A ray's points are ``offset + alpha * direction`` (``alpha * a``: no offset) with alpha from ``ray_alpha``
        (measured from the point of the range nearest 0), computed so rather than interpolated between its ends: at
        alpha = 0 the point is exactly the offset (0 for ``alpha * a``; ``ray`` makes that t a knot, see there); at
        t = 0 and 1 alpha is exactly alpha0 and alpha1.
    """

    knots_t: torch.Tensor
    knots_x: torch.Tensor
    length: torch.Tensor
    kind: str
    site: str | None = None
    base: object = None
    alphas: tuple[float, float] | None = None
    direction: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def n_paths(self) -> int:
        return int(self.knots_t.shape[0])

    @property
    def shape(self) -> tuple:
        return tuple(self.knots_x.shape[2:])

    def points(self, pid: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Path points (n, *shape) at positions ``t`` of paths ``pid``."""
        kt, kx = self.knots_t, self.knots_x
        if self.direction is not None:
            alpha = ray_alpha(t, self.alphas).to(self.direction.dtype).reshape(-1, *([1] * len(self.shape)))
            x = alpha * self.direction[pid]
            return x if self.offset is None else x.add_(self.offset[pid])
        if kt.shape[1] == 2:
            x0, x1 = kx[pid, 0], kx[pid, 1]
            s = t.reshape(-1, *([1] * len(self.shape)))
            return x0 + s * (x1 - x0)
        seg = torch.searchsorted(kt[pid], t[:, None].contiguous(), right=True).squeeze(1) - 1
        seg = seg.clamp_(0, kt.shape[1] - 2)
        t0, t1 = kt[pid, seg], kt[pid, seg + 1]
        s = ((t - t0) / (t1 - t0)).reshape(-1, *([1] * len(self.shape)))
        x0, x1 = kx[pid, seg], kx[pid, seg + 1]
        return x0 + s * (x1 - x0)

    def to(self, dtype: torch.dtype, device) -> "PathSpec":
        return PathSpec(self.knots_t.to(device, dtype), cast(self.knots_x, dtype, device), self.length.to(dtype),
                        self.kind, self.site, cast(self.base, dtype, device), self.alphas,
                        cast(self.direction, dtype, device), cast(self.offset, dtype, device))


@dataclass(frozen=True)
class TieTolerance:
    """How close two crossings (or a crossing and a breakpoint) must be in t to be one breakpoint.

    On paths, ``tie_tol`` in t. On rays, relative to alpha: ``|d alpha| <= tie_tol * |alpha|``, that is
    ``tie_tol * |t - t_0|`` in t, never more than ``tie_tol``; a ray's kinks crowd near small alpha, and on a ray
    over (1, 1e9) a fixed 1e-12 in t is 1e-3 in alpha, which merged distinct crossings there (over (1, 1e200), all
    of them). ``floor`` (in t) keeps it from vanishing near alpha = 0 on rays ``a + alpha * d``, whose points round
    there on the scale of ``a`` (rays ``alpha * a`` have an exact knot at alpha = 0)."""

    tie_tol: float
    origin: float | None = None  # t_0 of a ray; None for other paths
    floor: float = 0.0

    @classmethod
    def of(cls, spec: "PathSpec", tie_tol: float) -> "TieTolerance":
        if spec.alphas is None or tie_tol == 0:
            return cls(float(tie_tol))
        a0, a1 = spec.alphas
        floor = 0.0
        if spec.offset is not None:  # the smallest |a| / |d| of the batch, in t
            flat = len(spec.offset)
            ratio = (_lengths(spec.offset.reshape(flat, -1), "ray") / _lengths(spec.direction.reshape(flat, -1), "ray"))
            floor = float(ratio.min()) / (a1 - a0)
        return cls(float(tie_tol), zero_t((a0, a1)), min(floor, 1.0))

    def at(self, t: torch.Tensor):
        """The tolerance in t at positions ``t`` (a number on paths, a tensor like ``t`` on rays); on rays at least
        16 ulps of t, its own resolution (a ray over (-7e6, -1) crowds its kinks near t = 1, where an ulp of t is
        8e-10 of alpha), but never more than ``tie_tol`` (float32 rays tie as float32 segments do)."""
        if self.origin is None:
            return self.tie_tol
        rel = self.tie_tol * (t - self.origin).abs().clamp_(min=self.floor, max=1.0)
        return torch.maximum(rel, (t.abs() * (16 * torch.finfo(t.dtype).eps)).clamp_(max=self.tie_tol))

    def over(self, tl: torch.Tensor, tr: torch.Tensor):
        """The largest tolerance on intervals ``[tl, tr]`` (the end further from alpha = 0)."""
        return self.at(tl) if self.origin is None else torch.maximum(self.at(tl), self.at(tr))

    def record(self) -> dict:
        """The tolerance as a result states it."""
        return {"tie_tol": self.tie_tol} | ({"tie_tol_in": "alpha, relative"} if self.origin is not None else {})


def cast(v, dtype, device):
    """``v`` (a tensor, or a mapping of them) on ``device``, floating-point tensors in ``dtype``, each moved before
    it is converted: on a GPU the conversion then runs there, and a float32 copy is half a float64 one
    (``Tensor.to(device, dtype)`` converts on the host first). Anything else is returned as it is."""
    if isinstance(v, torch.Tensor):
        return v.to(device).to(dtype) if v.is_floating_point() else v.to(device)
    if isinstance(v, Mapping):
        return {k: cast(x, dtype, device) for k, x in v.items()}
    return v


def _tensor(name: str, owner: str, v, min_dim: int, device=None) -> torch.Tensor:
    """``v`` as a floating-point tensor of finite values with a batch dimension, on ``device`` when given (it is
    moved before it is checked: on a GPU the checks are a few microseconds, on the host tens of milliseconds for tens
    of thousands of 784-dim points, while the GPU waits)."""
    v = unwrap_encoded(v)
    if isinstance(v, Mapping):
        raise InvalidInputError(f"The {name!r} parameter of {owner} must be a tensor of points. Got inputs of "
                                f"several tensors ({', '.join(v)}): token ids cannot be interpolated; draw the path at "
                                "a site with layer= (site_activations gives its points).")
    if not isinstance(v, torch.Tensor):
        try:
            v = torch.as_tensor(v)
        except Exception:
            raise InvalidInputError(f"The {name!r} parameter of {owner} must be a tensor. Got {type(v).__name__}.") \
                from None
    if not v.is_floating_point():
        raise InvalidInputError(f"The {name!r} parameter of {owner} must be a floating-point tensor (paths are "
                                f"continuous). Got dtype {v.dtype}; pass embeddings or use layer=.")
    if v.is_meta:
        raise InvalidInputError(f"The {name!r} parameter of {owner} is on the 'meta' device, which holds shapes but "
                                "no values; give real tensors.")
    if v.dim() < min_dim or v.shape[0] == 0:
        raise InvalidInputError(f"The {name!r} parameter of {owner} must have a batch dimension of paths first "
                                f"(shape (P, ...), P >= 1). Got shape {tuple(v.shape)}.")
    if device is not None:
        v = v.to(device)
    lo, hi = torch.aminmax(v) if v.numel() else (v.new_zeros(()), v.new_zeros(()))  # one pass; NaN, inf reach them
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        bad = int((~torch.isfinite(v)).sum())
        raise InvalidInputError(f"The {name!r} parameter of {owner} contains {bad} NaN or infinite values; "
                                "paths need finite points.")
    return v.detach()


def _lengths(diff: torch.Tensor, owner: str) -> torch.Tensor:
    """Euclidean norms over the last axis of ``diff`` in float64, scaled by each row's largest entry so that a norm
    above float64's range of squares (entries near 1e200) is not infinite; a difference that itself overflows (the
    path's ends span more than float64 holds) is a one-line error."""
    d = diff.to(torch.float64)
    if not bool(torch.isfinite(d).all()):
        raise InvalidInputError(f"The paths of {owner} span more than float64 can hold (a difference of two points "
                                "overflows); scale the inputs (or alphas) down.")
    top = d.abs().amax(-1, keepdim=True)
    return (d / torch.where(top > 0, top, 1.0)).norm(dim=-1) * top.squeeze(-1)


def segments(start, end, *, owner: str = "path_crossings",
             device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated straight segments: start, end of shape (P, *shape), and their lengths (float64); on ``device``
    (in their own dtype) when given."""
    start, end = _tensor("start", owner, start, 1, device), _tensor("end", owner, end, 1, device)
    if start.shape != end.shape:
        raise InvalidInputError(f"The 'start' and 'end' parameters of {owner} must have the same shape. Got "
                                f"{tuple(start.shape)} and {tuple(end.shape)}.")
    length = _lengths((end - start).reshape(len(start), -1), owner)
    same = torch.nonzero(length == 0).flatten().tolist()
    if same:
        hint = (" (1-D start and end are read as one path per entry, of scalar inputs; one path between two vectors "
                "is x[None])") if start.dim() == 1 else ""
        raise InvalidInputError(f"Paths {same[:5]} of {owner} have equal start and end points; a path needs two "
                                f"distinct endpoints{hint}.")
    return start, end, length


def zero_t(alphas: tuple[float, float]) -> float:
    """The position t_0 where a ray's alpha is 0 (outside [0, 1] when its range does not hold 0)."""
    a0, a1 = alphas
    return -a0 / (a1 - a0)


def crowd_scale(alphas: tuple[float, float]) -> float:
    """The |alpha| around which a ray's kinks crowd, at least: a unit's kink lies at alpha = -c / (J a), its constant
    over its slope, of order 1 for typical units; 1 when the range holds 0, else the larger of 1 and its end nearest
    0 (a range far from 0 meets its kinks at its near end)."""
    a0, a1 = alphas
    return 1.0 if a0 <= 0.0 <= a1 else max(1.0, min(abs(a0), abs(a1)))


def check_ray_resolution(alphas: tuple[float, float], owner: str) -> None:
    """Refuse an exact ray that t in [0, 1] cannot resolve where its kinks crowd (``crowd_scale``), at the point of
    the range nearest alpha = 0: near t = 1 (alphas (-1e8, -1)) or t = 1/2 ((-1e9, 1e9)) t's spacing, 1.1e-16 or
    5.6e-17, is that times (alpha1 - alpha0) in alpha; over 1e-9 of the scale (the affine checks' tolerance) the
    crossings cannot be placed to it (a CNN over (-1e8, -1) failed them at 1.7e-9, and (-1e9, 1e9) failed). Near
    t = 0, t is resolved relatively, so (1, 1e9) and (0, 1e300) run. A rough bound: the units' slopes matter too."""
    a0, a1 = alphas
    near = min(max(zero_t(alphas), 0.0), 1.0)  # where the range is nearest alpha = 0
    spacing = (near - float(np.nextafter(near, -1.0)) if near > 0 else float(np.spacing(0.0))) * (a1 - a0)
    scale = crowd_scale(alphas)
    if spacing > 1e-9 * scale:
        widest = 1e-9 / (1.0 - float(np.nextafter(1.0, 0.0)))  # a range (-w, 0): its end nearest 0 at t = 1
        cut = -math.sqrt(abs(a0 * a1)) if a1 < 0 else None
        if cut is not None:
            hint = (f"split it where |alpha| is about the geometric mean of its ends, ({a0:g}, {cut:.3g}) and "
                    f"({cut:.3g}, {a1:g}), and again where a part is still refused")
        elif a1 > 0:
            hint = (f"split it at alpha = 0: ranges from alpha0 = 0 up are resolved relatively ((0, {a1:g}) runs), "
                    f"ranges reaching 0 from below only when at most {widest:.2g} wide")
        else:
            hint = f"ranges reaching 0 from below are resolved only when at most {widest:.2g} wide"
        raise InvalidInputError(f"The 'alphas' of {owner}, {(a0, a1)}, put the point nearest alpha = 0 at t = "
                                f"{near:.9g}, where t in [0, 1] resolves alpha only to {spacing:.2g}, over 1e-9 of "
                                f"{scale:g}: exact crossings crowd there and cannot be placed; {hint}.")


def ray_alpha(t, alphas: tuple[float, float]):
    """A ray's alpha at positions ``t`` (a tensor or an array), measured from the point of the range nearest 0, so
    that relative rounding stays small where a ray's kinks crowd: ``(t - t_0) * (alpha1 - alpha0)`` with ``t_0``
    where alpha is 0 (``zero_t``) when the range holds 0 (alpha is exactly 0 there); else from the end nearer 0,
    ``alpha0 + t * (alpha1 - alpha0)`` or ``alpha1 - (1 - t) * (alpha1 - alpha0)`` (over (-1e9, -1), ``t_0`` is 1 +
    1e-9, rounded, and ``t - t_0`` near t = 1 was off by up to 1e-7 relative: the affine checks failed). Exactly
    alpha0 and alpha1 at t = 0 and 1 (``t_0`` rounds: alphas (-2, -0.5) gave alpha(1) = -0.4999999999999999)."""
    a0, a1 = alphas
    where = torch.where if isinstance(t, torch.Tensor) else np.where
    t0 = zero_t(alphas)
    if t0 < 0.0:
        alpha = a0 + t * (a1 - a0)
    elif t0 > 1.0:
        alpha = a1 - (1 - t) * (a1 - a0)
    else:
        alpha = (t - t0) * (a1 - a0)
    return where(t == 0, a0, where(t == 1, a1, alpha))


def stacked(points: list[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.stack(points, 1)`` made in ``dtype`` on ``device``: each tensor is moved first (on a GPU, a
    float32 copy is half a float64 one) and converted where it lands, in one pass."""
    first = points[0]
    x = torch.empty((len(first), len(points), *first.shape[1:]), dtype=dtype, device=device)
    for i, v in enumerate(points):
        x[:, i].copy_(v.to(device))
    return x


def polyline(points, *, owner: str = "polyline_crossings") -> tuple[torch.Tensor, torch.Tensor]:
    """Knots (P, K) by arc length and points (P, K, *shape) of validated polylines."""
    pts = _tensor("points", owner, points, 2)
    if pts.shape[1] < 2:
        raise InvalidInputError(f"The 'points' parameter of {owner} needs at least 2 points per path (shape "
                                f"(P, K >= 2, ...)). Got shape {tuple(pts.shape)}.")
    seg = _lengths((pts[:, 1:] - pts[:, :-1]).reshape(pts.shape[0], pts.shape[1] - 1, -1), owner)
    zero = torch.nonzero(seg == 0)
    if len(zero):
        p, k = zero[0].tolist()
        raise InvalidInputError(f"Path {p} of {owner} repeats point {k} (a zero-length piece); remove repeated "
                                "consecutive points.")
    cum = torch.cat([torch.zeros_like(seg[:, :1]), seg.cumsum(1)], dim=1)
    knots = cum / cum[:, -1:]
    knots[:, -1] = 1.0
    return knots, pts, cum[:, -1]


def ray(a: torch.Tensor, direction, alphas, *, owner: str = "ray_crossings"):
    """Knot positions (P, K), knot points (P, K, *shape), lengths, (alpha0, alpha1), direction and offset (None for
    alpha * a) of rays alpha * a or a + alpha * d over [alpha0, alpha1].

    A ray alpha * a through alpha = 0 gets a knot there, whose point is exactly 0: in a network without biases every
    unit input is 0 there and every max-pool window tied, and a breakpoint interpolated between the ends instead
    (-a + (1/3) * 3a) held rounding noise of 1e-16 in place of those zeros, whose signs made spurious crossings
    (122 instead of 96 on a tester's CNN)."""
    try:
        a0, a1 = (float(v) for v in alphas)
    except Exception:
        raise InvalidInputError(f"The 'alphas' parameter of {owner} must be two numbers (alpha0, alpha1). Got "
                                f"{alphas!r}.") from None
    if not (math.isfinite(a0) and math.isfinite(a1)) or a0 >= a1:
        raise InvalidInputError(f"The 'alphas' parameter of {owner} must satisfy alpha0 < alpha1 (finite). Got "
                                f"{(a0, a1)}.")
    if direction is None:
        d = a
        x0, x1 = a0 * a, a1 * a
    else:
        if isinstance(direction, np.ndarray):  # native byte order; complex, strings and objects refused
            direction = real_array(direction, f"The 'direction' parameter of {owner}")
        if isinstance(direction, torch.Tensor) and direction.is_complex():
            raise InvalidInputError(f"The 'direction' parameter of {owner} must hold real numbers; it holds "
                                    f"{direction.dtype}.")
        try:
            d = torch.as_tensor(direction).detach().to(device=a.device, dtype=a.dtype)
        except Exception:
            raise InvalidInputError(f"The 'direction' parameter of {owner} must be an array of numbers. Got "
                                    f"{type(direction).__name__}.") from None
        if d.shape == a.shape[1:]:
            d = d.expand_as(a)
        if d.shape != a.shape:
            raise InvalidInputError(f"The 'direction' parameter of {owner} must have the site's activation shape "
                                    f"{tuple(a.shape[1:])} or {tuple(a.shape)}. Got {tuple(d.shape)}.")
        d = _tensor("direction", owner, d, 1)  # NaN and infinities
        x0, x1 = a + a0 * d, a + a1 * d
    if not (math.isfinite(a1 - a0) and bool(torch.isfinite(x0).all()) and bool(torch.isfinite(x1).all())):
        raise InvalidInputError(f"The ends of the rays of {owner} overflow {str(a.dtype).replace('torch.', '')} "
                                f"(alphas {(a0, a1)}); use a smaller range of alpha.")
    length = (a1 - a0) * _lengths(d.reshape(len(a), -1), owner)
    zero = torch.nonzero(length == 0).flatten().tolist()
    if zero:
        what = "activation" if direction is None else "direction"
        raise InvalidInputError(f"Rays {zero[:5]} of {owner} have a zero {what} vector, so the ray is a single point.")
    t0 = zero_t((a0, a1))
    if 0.0 < t0 < 1.0:  # alpha = 0 a knot: the point there is exact (0, or a), not interpolated between the ends
        knots_t = torch.tensor([0.0, t0, 1.0], dtype=torch.float64)
        knots_x = torch.stack([x0, torch.zeros_like(a) if direction is None else a, x1], dim=1)
    else:
        knots_t, knots_x = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.stack([x0, x1], dim=1)
    return knots_t.expand(len(a), -1), knots_x, length, (a0, a1), d, (None if direction is None else a)
