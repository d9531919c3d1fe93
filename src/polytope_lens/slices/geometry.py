"""2-D domains: a convex polygon in slice coordinates ``u`` and the affine map ``u -> x = origin + u @ basis``.

Invariant
---------
The map from slice coordinates to the space the slice lives in (model input, or the output of one activation site)
is affine and injective (the two basis rows are linearly independent), and the domain is a convex polygon with
positive area given counter-clockwise. Every exact statement of the partition is made in slice coordinates; areas are
areas in ``u`` (for ``Plane.through`` the basis is orthonormal, so they are also areas in the model's space).

Constructors
------------
``Plane.box(lo, hi)``: the box ``[lo, hi]^2`` of a model with 2 inputs (``x = u``).
``Plane.through(p0, p1, p2, margin=0.25)``: the plane through three points (orthonormal basis from Gram-Schmidt, origin
at their centroid), domain the bounding square of the three points widened by ``margin`` of its side.
``Plane.from_directions(point, d1, d2, extent=1.0)``: ``x = point + u1 d1 + u2 d2`` on ``[-extent, extent]^2``.
Any of them may live at a site (``site=``, with one real ``inputs`` example feeding the other branches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping

import torch

from ..capture import unwrap_encoded
from ..errors import InvalidInputError, is_real

__all__ = ["Plane"]


def _finite(v) -> bool:
    """A finite real number (NumPy scalars included; not a bool)."""
    return is_real(v) and math.isfinite(v)


def _tensor(name: str, owner: str, v) -> torch.Tensor:
    """``v`` as a float64 tensor; lists and arrays go straight to float64 (``torch.as_tensor`` of a Python list
    would round it to float32 first)."""
    v = unwrap_encoded(v)
    try:
        t = v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=torch.float64)
    except Exception:
        raise InvalidInputError(f"The {name!r} parameter of {owner} must be a tensor. Got {type(v).__name__}.") \
            from None
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise InvalidInputError(f"The {name!r} parameter of {owner} contains NaN or infinite values.")
    return t.detach().to(torch.float64)


@dataclass(frozen=True)
class Plane:
    """A 2-D slice: polygon ``domain`` (V, 2) in slice coordinates, mapped by ``x = origin + u @ basis``.

    Attributes
    ----------
    origin : Tensor (*shape)
    basis : Tensor (2, *shape)
    domain : Tensor (V, 2)
        Convex polygon, counter-clockwise.
    kind : {"box", "through", "directions"}
    site : str or None
        Site (name or glob matching one site) whose output the plane replaces; None = model input.
    inputs : Tensor or mapping or None
        One real model input (batch of 1) feeding every other branch of a site plane.
    anchors : Tensor (k, 2) or None
        Slice coordinates of the points the plane was built from (drawn as markers).
    """

    origin: torch.Tensor
    basis: torch.Tensor
    domain: torch.Tensor
    kind: str
    site: str | None = None
    inputs: object = None
    anchors: torch.Tensor | None = None

    @property
    def shape(self) -> tuple:
        return tuple(self.origin.shape)

    @property
    def area(self) -> float:
        return float(polygon_area(self.domain[None], torch.tensor([len(self.domain)]))[0])

    def points(self, u: torch.Tensor) -> torch.Tensor:
        """Points (n, *shape) of the model's space at slice coordinates ``u`` (n, 2)."""
        b = self.basis.reshape(2, -1).to(u)
        return (self.origin.reshape(1, -1).to(u) + u @ b).reshape(len(u), *self.shape)

    def at(self, site: str | None, inputs=None) -> "Plane":
        """This plane placed in the output space of call site ``site`` (a name; None: the model's input), with the
        real ``inputs`` that feed the other branches. Points at slice coordinates are ``points(u)``."""
        if site is not None and not isinstance(site, str):
            raise InvalidInputError(f"Plane.at takes a site name (or None for the input space). Got "
                                    f"{type(site).__name__}; for points at slice coordinates use Plane.points(u).")
        return replace(self, site=site, inputs=inputs)

    # ------------------------------------------------------------------------------------------ constructors
    @staticmethod
    def box(lo: float = -1.0, hi: float = 1.0, *, ylo: float | None = None, yhi: float | None = None) -> "Plane":
        """The box ``[lo, hi] x [ylo, yhi]`` (default square) of a 2-input model; ``x = u``."""
        ylo = lo if ylo is None else ylo
        yhi = hi if yhi is None else yhi
        vals = [lo, hi, ylo, yhi]
        if not all(_finite(v) for v in vals):
            raise InvalidInputError(f"The bounds of Plane.box must be finite numbers. Got {vals}.")
        lo, hi, ylo, yhi = (float(v) for v in vals)
        if not (hi > lo and yhi > ylo):
            raise InvalidInputError(f"Plane.box needs lo < hi in both axes (a box of positive area). Got "
                                    f"x in [{lo}, {hi}], y in [{ylo}, {yhi}].")
        if not math.isfinite((hi - lo) * (yhi - ylo)):
            raise InvalidInputError(f"The box of Plane.box spans more than float64 holds (its area overflows). Got x "
                                    f"in [{lo}, {hi}], y in [{ylo}, {yhi}]; use a smaller box.")
        dom = torch.tensor([[lo, ylo], [hi, ylo], [hi, yhi], [lo, yhi]], dtype=torch.float64)
        return Plane(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), dom, "box")

    @staticmethod
    def through(p0, p1, p2, *, margin: float = 0.25) -> "Plane":
        """The plane through three points (same shape), orthonormal coordinates, origin at their centroid."""
        owner = "Plane.through"
        given = [unwrap_encoded(p) for p in (p0, p1, p2)]
        pts = [_tensor(n, owner, p) for n, p in zip(("p0", "p1", "p2"), given)]
        # points given in a lower precision are collinear up to their own rounding (a float32 midpoint is off the
        # line by ~1e-7 of its size), not float64's
        eps = max(torch.finfo(p.dtype).eps if isinstance(p, torch.Tensor) and p.is_floating_point()
                  else torch.finfo(torch.float64).eps for p in given)
        if not (pts[0].shape == pts[1].shape == pts[2].shape):
            raise InvalidInputError(f"The three points of {owner} must have the same shape. Got "
                                    f"{[tuple(p.shape) for p in pts]}.")
        if not (_finite(margin) and margin >= 0):
            raise InvalidInputError(f"The 'margin' parameter of {owner} must be a finite number >= 0. Got {margin!r}.")
        flat = torch.stack([p.reshape(-1) for p in pts])
        origin = flat.mean(0)
        e1 = flat[1] - flat[0]
        n1 = e1.norm()
        v = flat[2] - flat[0]
        scale = max(float(n1), float(v.norm()), 1e-300)
        if float(n1) <= 1e-12 * max(1.0, float(flat.abs().max())):
            raise InvalidInputError(f"The points of {owner} are collinear (p0 and p1 coincide); three points "
                                    "spanning a plane are needed.")
        e1 = e1 / n1
        e2 = v - (v @ e1) * e1
        if float(e2.norm()) <= max(1e-9 * scale, 4 * eps * float(flat.norm(dim=1).max())):
            raise InvalidInputError(f"The points of {owner} are collinear (p2 lies on the line through p0 and p1, "
                                    f"distance {float(e2.norm()):.3g}); three points spanning a plane are needed.")
        e2 = e2 / e2.norm()
        basis = torch.stack([e1, e2])
        anchors = (flat - origin) @ basis.T
        lo, hi = anchors.min(0).values, anchors.max(0).values
        side = float((hi - lo).max())
        mid = 0.5 * (lo + hi)
        h = 0.5 * side * (1 + 2 * margin)
        h += 4 * torch.finfo(torch.float64).eps * (float(mid.abs().max()) + h)  # rounding never leaves an anchor out
        # float64 corners (a square: one x per vertical edge, one y per horizontal edge)
        dom = mid + h * torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
        shape = pts[0].shape
        return Plane(origin.reshape(shape), basis.reshape(2, *shape), dom, "through", anchors=anchors)

    @staticmethod
    def from_directions(point, d1, d2, *, extent: float = 1.0) -> "Plane":
        """``x = point + u1 d1 + u2 d2`` for u in ``[-extent, extent]^2``."""
        owner = "Plane.from_directions"
        p, a, b = (_tensor(n, owner, v) for n, v in (("point", point), ("d1", d1), ("d2", d2)))
        if not (p.shape == a.shape == b.shape):
            raise InvalidInputError(f"point, d1 and d2 of {owner} must have the same shape. Got "
                                    f"{tuple(p.shape)}, {tuple(a.shape)}, {tuple(b.shape)}.")
        if not (_finite(extent) and extent > 0):
            raise InvalidInputError(f"The 'extent' parameter of {owner} must be a finite number > 0. Got {extent!r}.")
        fa, fb = a.reshape(-1), b.reshape(-1)
        na, nb = float(fa.norm()), float(fb.norm())
        if na == 0 or nb == 0:
            raise InvalidInputError(f"The directions of {owner} must be non-zero. Got norms {na:.3g}, {nb:.3g}.")
        sin = float((fb - (fb @ fa) / na**2 * fa).norm()) / nb
        if sin <= 1e-9:
            raise InvalidInputError(f"The directions of {owner} are parallel (sin of their angle {sin:.3g}); two "
                                    "independent directions are needed.")
        e = float(extent)
        dom = torch.tensor([[-e, -e], [e, -e], [e, e], [-e, e]], dtype=torch.float64)
        return Plane(p, torch.stack([a, b]), dom, "directions", anchors=torch.zeros(1, 2, dtype=torch.float64))

    def describe(self) -> dict:
        return {"kind": self.kind, "site": self.site, "shape": list(self.shape),
                "domain": self.domain.tolist(), "area": self.area}


def _shoelace(xy: torch.Tensor, deg: torch.Tensor):
    """Each padded polygon's vertices relative to its first one, their successors, and the cross products of
    consecutive pairs (0 on padding). Relative coordinates keep small polygons far from the origin accurate: the
    absolute shoelace cancels terms of size |x|^2 down to the area (a 1e-11 region at distance 4 lost 4 digits)."""
    n, w, _ = xy.shape
    ar = torch.arange(w, device=xy.device)
    nxt = torch.where(ar[None] + 1 < deg[:, None], ar[None] + 1, torch.zeros_like(ar[None]))
    valid = ar[None] < deg[:, None]
    rel = xy - xy[:, :1]
    rn = rel.gather(1, nxt[..., None].expand(-1, -1, 2))
    cross = torch.where(valid, rel[..., 0] * rn[..., 1] - rn[..., 0] * rel[..., 1], torch.zeros_like(rel[..., 0]))
    return rel, rn, cross


def polygon_area(xy: torch.Tensor, deg: torch.Tensor) -> torch.Tensor:
    """Signed shoelace areas of padded polygons ``xy`` (n, W, 2) with ``deg`` (n,) valid vertices each."""
    return 0.5 * _shoelace(xy, deg)[2].sum(1)


def polygon_centroid(xy: torch.Tensor, deg: torch.Tensor) -> torch.Tensor:
    """Area centroids (n, 2) of padded polygons ``xy`` (n, W, 2) with ``deg`` (n,) valid vertices each."""
    rel, rn, cross = _shoelace(xy, deg)
    a = 0.5 * cross.sum(1)
    return ((rel + rn) * cross[..., None]).sum(1) / (6 * a[:, None]) + xy[:, 0]


def cast_inputs(v, dtype, device):
    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)
    if isinstance(v, Mapping):
        return {k: cast_inputs(x, dtype, device) for k, x in v.items()}
    return v
