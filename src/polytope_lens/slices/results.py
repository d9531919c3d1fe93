"""Result objects of 2-D slices: frozen dataclasses with ``to_dict()`` (JSON-safe), ``plot()``, PNG/SVG export.

Invariant relied on: ``SliceResult`` holds the exact partition as built by ``partition.build``; regions are rows of
``ring``/``deg`` (counter-clockwise vertex ids into ``coords``), their codes are the packed pieces of every processed
site (``site_bytes`` locates each site in the byte row), and ``slope``/``offset`` give the output's affine map in slice
coordinates (``y = u @ slope + offset``) when the whole model was partitioned.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import numpy as np
import torch

from ..codes import unpack_pieces
from .geometry import polygon_centroid


@dataclass(frozen=True)
class SliceResult:
    """An exact partition of a 2-D slice into linear regions.

    Attributes
    ----------
    num_regions : int
    exact : bool
        Always True (exact up to ``tol``, the snapping tolerance relative to each site's scale).
    dtype : str
    tol : float
    plane : Plane
    sites : tuple of str
        Sites that cut the slice, in execution order.
    site_info : dict name -> dict
        Per site: ``units`` (columns of its pieces), ``activation``, and under ``units=`` the last site's
        ``unit_ids``: the model's flat unit (or window) index of each column.
    coords : Tensor (V, 2)
        Vertex slice coordinates.
    ring, deg : Tensor (R, W), (R,)
        Region polygons (vertex ids, counter-clockwise; entries past ``deg`` are padding).
    area : Tensor (R,)
    codes : ndarray uint8 (R, bytes)
        Packed pieces of every site (per site: ``site_bytes[name] = (offset, n_bytes)``).
    slope, offset : Tensor (R, 2, out), (R, out) or None
        Output affine map per region in slice coordinates, ``y = u @ slope + offset``, of the model's scores: a
        tensor (n, out) as it is; one score ((n,) or (n, 1)) as one column; ``.logits`` of an output object, the
        first element of a tuple or list, and ``out.reshape(n, -1, out)[:, -1]`` of more than two axes (a note says
        so). None when only part of the model was partitioned, the output is not affine over the regions, or holds
        no score tensor (a dict): ``why_no_maps()``.
    boundary : Tensor (S, 2, 2) or None
        Decision-boundary segments: where the top class (``torch.argmax``'s, the first of tied maxima) changes; for
        one score, where it changes sign (class 1 where it is > 0, the binary-logit convention).
    seconds : float
    notes : tuple of str
        What the numbers depend on: cuts made unit by unit, a partial partition, which part of the output the maps
        describe or why there are none.
    """

    num_regions: int
    exact: bool
    dtype: str
    tol: float
    plane: object
    sites: tuple
    site_info: dict
    coords: torch.Tensor
    ring: torch.Tensor
    deg: torch.Tensor
    area: torch.Tensor
    codes: np.ndarray
    site_bytes: dict
    slope: torch.Tensor | None
    offset: torch.Tensor | None
    boundary: torch.Tensor | None
    seconds: float
    rounds: int
    notes: tuple = ()
    _model: object = field(default=None, repr=False, compare=False)

    # --------------------------------------------------------------------------------------------- queries
    def polygons(self) -> list[np.ndarray]:
        """Region polygons as a list of (deg_i, 2) arrays."""
        xy = self.coords.cpu().numpy()
        ring, deg = self.ring.cpu().numpy(), self.deg.cpu().numpy()
        return [xy[ring[i, : deg[i]]] for i in range(self.num_regions)]

    def centroids(self) -> torch.Tensor:
        """Area centroids (R, 2): interior points of the (convex) regions."""
        return polygon_centroid(self.coords[self.ring], self.deg)

    def pieces(self, site: str) -> np.ndarray:
        """Pieces (R, units) of every region at ``site``."""
        off, nb = self.site_bytes[site]
        info = self.site_info[site]
        return unpack_pieces(self.codes[:, off: off + nb], info["units"], info["activation"])

    def code_hex(self) -> list[str]:
        return [bytes(r).hex() for r in self.codes]

    def predict(self, u: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """Output at slice points ``u`` (n, 2) from the affine maps of ``region`` (n,) (tensors or arrays)."""
        if self.slope is None:
            raise ValueError(f"This slice has no output maps: {self.why_no_maps()}.")
        u = torch.as_tensor(u, dtype=self.slope.dtype, device=self.slope.device)
        region = torch.as_tensor(region, dtype=torch.long, device=self.slope.device)
        if u.dim() != 2 or u.shape[1] != 2 or region.shape != u.shape[:1]:
            raise ValueError(f"predict needs points u (n, 2) and regions (n,). Got {tuple(u.shape)} and "
                             f"{tuple(region.shape)}.")
        return (u[:, :, None] * self.slope[region]).sum(1) + self.offset[region]

    def why_no_maps(self) -> str | None:
        """Why ``slope``, ``offset`` and ``boundary`` are None (from the note that says so), or None when they are
        set."""
        if self.slope is not None:
            return None
        if any(n.startswith("partial") for n in self.notes):
            return "only part of the model was partitioned (until= or units=)"
        head = "no output maps: "
        return next((n[len(head):] for n in self.notes if n.startswith(head)), "the slice was made with outputs=False")

    def slope_norm(self) -> np.ndarray | None:
        return None if self.slope is None else self.slope.flatten(1).norm(dim=1).cpu().numpy()

    def top_class(self) -> np.ndarray | None:
        """Top class at each region's centroid (the decision boundary's convention: first of tied maxima; for one
        score, 1 where it is > 0)."""
        if self.slope is None:
            return None
        y = self.predict(self.centroids().to(self.slope), torch.arange(self.num_regions))
        return ((y[:, 0] > 0).long() if y.shape[1] == 1 else y.argmax(1)).cpu().numpy()

    def colors(self, by: str = "code") -> np.ndarray:
        """RGBA per region: ``code`` (stable hash of the code: same code, same colour, every run), ``slope``
        (norm of the affine map's slope) or ``class`` (top class at the centroid)."""
        from .render import colors_for
        return colors_for(self, by)

    # ---------------------------------------------------------------------------------------------- output
    def to_dict(self, regions: bool = True) -> dict:
        d = {"num_regions": self.num_regions, "exact": self.exact, "dtype": self.dtype, "tol": self.tol,
             "plane": self.plane.describe(), "sites": list(self.sites), "seconds": self.seconds,
             "domain_area": self.plane.area, "total_area": float(self.area.sum()), "notes": list(self.notes),
             "site_bytes": {k: list(v) for k, v in self.site_bytes.items()},
             **({"unit_ids": {k: v["unit_ids"] for k, v in self.site_info.items() if "unit_ids" in v}}
                if any("unit_ids" in v for v in self.site_info.values()) else {}),
             "decision_boundary_segments": None if self.boundary is None else int(len(self.boundary))}
        if regions:
            d["regions"] = [{"area": float(a), "code": h, "n_vertices": int(n)}
                            for a, h, n in zip(self.area.tolist(), self.code_hex(), self.deg.tolist())]
        return d

    def plot(self, ax=None, *, color_by: str = "code", kinks_of: str | None = None, boundary: bool = True,
             edges: bool = True, **kwargs):
        """Draw the regions with matplotlib (``render.plot_slice``); returns the Axes."""
        from .render import plot_slice
        return plot_slice(self, ax=ax, color_by=color_by, kinks_of=kinks_of, boundary=boundary, edges=edges,
                          **kwargs)

    def save_png(self, path, **kwargs) -> None:
        self._save(path, "png", **kwargs)

    def save_svg(self, path, **kwargs) -> None:
        self._save(path, "svg", **kwargs)

    def _save(self, path, fmt, dpi: int = 150, size: float = 6.0, **kwargs):
        from matplotlib.figure import Figure  # outside pyplot: the backend a notebook chose stays as it is
        fig = Figure(figsize=(size, size))
        self.plot(fig.subplots(), **kwargs)
        fig.savefig(path, format=fmt, dpi=dpi, bbox_inches="tight")

    def _repr_html_(self) -> str:
        import base64

        from ..report.html import summary_html

        buf = io.BytesIO()
        self._save(buf, "png", dpi=80, size=4.0)
        picture = base64.b64encode(buf.getvalue()).decode("ascii")
        return summary_html(
            f"SliceResult: {self.num_regions} regions (exact up to tol {self.tol:g}, {self.dtype})",
            {"plane": f"{self.plane.kind} in the space of {self.plane.site or 'the input'}",
             "sites": ", ".join(self.sites), "area covered":
             f"{float(self.area.sum()):.6g} of {self.plane.area:.6g}", "seconds": round(self.seconds, 3)},
            f'<img alt="slice" src="data:image/png;base64,{picture}">', notes=self.notes)



def code_color(code: bytes) -> tuple[float, float, float]:
    """Stable colour of a code: a hash (blake2b), never Python's salted ``hash``."""
    h = hashlib.blake2b(code, digest_size=3).digest()
    return tuple(0.25 + 0.7 * (b / 255.0) for b in h)
