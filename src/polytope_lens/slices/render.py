"""Pictures of exact slices with matplotlib (PolyCollection): regions, kink lines of one site, decision boundary.

Invariant relied on: a region's colour depends only on its packed code (``results.code_color``: blake2b of the bytes),
so the same code gets the same colour in every run and every picture; kink lines of a site are exactly the shared edges
across which that site's code differs (``neighbours.shared_edges``).
"""

from __future__ import annotations

import numpy as np
import torch

from .geometry import polygon_area
from .results import code_color

__all__ = ["plot_slice", "colors_for", "class_pieces", "opening_figure", "toy_classifier"]


def colors_for(res, by: str = "code") -> np.ndarray:
    import matplotlib
    if by == "code":
        rgb = np.array([code_color(bytes(r)) for r in res.codes]) if res.num_regions else np.zeros((0, 3))
        return np.concatenate([rgb, np.ones((len(rgb), 1))], 1)
    if by == "slope":
        v = res.slope_norm()
        if v is None:
            raise ValueError(f"color_by='slope' needs output maps, which this slice lacks: {res.why_no_maps()}.")
        v = (v - v.min()) / max(1e-300, float(np.ptp(v)))
        return matplotlib.colormaps["viridis"](v)
    if by == "class":
        c = res.top_class()
        if c is None:
            raise ValueError(f"color_by='class' needs output maps, which this slice lacks: {res.why_no_maps()}.")
        return _class_colors(res, c, np.arange(len(c)))
    raise ValueError(f"The 'color_by' parameter must be one of code, slope, class. Got {by!r}.")


def _class_colors(res, classes: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """RGBA of pieces of ``regions`` whose top class is ``classes``: the class's tab10 colour, shaded by the region's
    code (so regions of one class stay apart)."""
    import matplotlib
    base = matplotlib.colormaps["tab10"](classes % 10)
    shade = np.array([code_color(bytes(r))[0] for r in res.codes]).reshape(-1)[regions, None]
    return np.concatenate([base[:, :3] * (0.75 + 0.25 * shade), np.ones((len(classes), 1))], 1)


def _clip(poly: np.ndarray, w: np.ndarray, c: float) -> np.ndarray:
    """The part of convex polygon ``poly`` (k, 2) where ``u @ w + c >= 0`` (one Sutherland-Hodgman pass)."""
    f = poly @ w + c
    out = []
    for i in range(len(poly)):
        j = (i + 1) % len(poly)
        if f[i] >= 0:
            out.append(poly[i])
        if (f[i] >= 0) != (f[j] >= 0):
            out.append(poly[i] + (f[i] / (f[i] - f[j])) * (poly[j] - poly[i]))
    return np.array(out).reshape(-1, 2)


def class_pieces(res) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The slice cut along its decision boundary: (polygons, top class of each, region of each). A region where one
    class can lead stays whole; in the others the output is affine, so the part where class k leads is
    the region clipped by the half-planes where k's score is at least every other's (one score: > 0 is class 1).
    Only a class that beats each other class at some vertex can lead anywhere (a difference of affine scores peaks at
    a vertex)."""
    if res.slope is None:
        raise ValueError(f"color_by='class' needs output maps, which this slice lacks: {res.why_no_maps()}.")
    slope, offset = res.slope.cpu().numpy(), res.offset.cpu().numpy()
    if slope.shape[2] == 1:  # one score: class 1 where it is > 0, as scores (-s, s) of two classes
        slope, offset = np.concatenate([-slope, slope], 2), np.concatenate([-offset, offset], 1)
    area = res.area.abs().tolist()
    polys, classes, regions = [], [], []
    for r, poly in enumerate(res.polygons()):
        scores = poly @ slope[r] + offset[r]
        leaders = np.flatnonzero(((scores[:, :, None] - scores[:, None, :]).max(0) >= 0).all(1))
        if len(leaders) == 1:
            polys.append(poly), classes.append(int(leaders[0])), regions.append(r)
            continue
        tol = 1e-12 * max(1.0, float(np.abs(scores).max()))  # equal scores: the maps are fitted on the vertices
        for k in leaders:
            # a class of lower index with equal scores over the whole region (at every vertex: affine) wins it
            # (torch.argmax's first maximum; one score: 0 is class 0): k would otherwise keep the whole region too
            tied = {int(j) for j in leaders if j != k and np.abs(scores[:, j] - scores[:, k]).max() <= tol}
            if any(j < k for j in tied):
                continue
            piece = poly
            for j in range(slope.shape[2]):
                if j != k and j not in tied and len(piece) >= 3:
                    piece = _clip(piece, slope[r][:, k] - slope[r][:, j], float(offset[r, k] - offset[r, j]))
            if len(piece) < 3:
                continue
            size = abs(float(polygon_area(torch.from_numpy(piece)[None], torch.tensor([len(piece)]))[0]))
            if size > 1e-9 * area[r]:  # not a sliver where k only ties
                polys.append(piece), classes.append(int(k)), regions.append(r)
    return polys, np.array(classes, dtype=np.int64), np.array(regions, dtype=np.int64)


def plot_slice(res, ax=None, *, color_by: str = "code", kinks_of: str | None = None, boundary: bool = True,
               edges: bool = True, title: str | None = None, linewidth: float = 0.3):
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection, PolyCollection
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    polys = res.polygons()
    if color_by == "class":  # regions cut along the decision boundary: each side in its own class's colour
        pieces, cls, region = class_pieces(res)
        ax.add_collection(PolyCollection(pieces, facecolors=_class_colors(res, cls, region), edgecolors="none",
                                         linewidths=0))
        pc = PolyCollection(polys, facecolors="none", edgecolors="k" if edges else "none",
                            linewidths=linewidth if edges else 0)
    else:
        pc = PolyCollection(polys, facecolors=colors_for(res, color_by), edgecolors="k" if edges else "none",
                            linewidths=linewidth if edges else 0)
    ax.add_collection(pc)
    if kinks_of is not None:
        from .neighbours import shared_edges
        if kinks_of not in res.site_bytes:
            raise ValueError(f"kinks_of={kinks_of!r} is not a site of this slice ({', '.join(res.sites)}).")
        ra, rb, p, q = shared_edges(res)
        off, nb = res.site_bytes[kinks_of]
        diff = (res.codes[ra.numpy(), off:off + nb] != res.codes[rb.numpy(), off:off + nb]).any(1)
        xy = res.coords.cpu().numpy()
        segs = np.stack([xy[p.numpy()[diff]], xy[q.numpy()[diff]]], 1)
        ax.add_collection(LineCollection(segs, colors="white", linewidths=1.2 * linewidth + 0.6))
    if boundary and res.boundary is not None and len(res.boundary):
        ax.add_collection(LineCollection(res.boundary.cpu().numpy(), colors="red", linewidths=1.5))
    dom = res.plane.domain.cpu().numpy()
    ax.set_xlim(dom[:, 0].min(), dom[:, 0].max())
    ax.set_ylim(dom[:, 1].min(), dom[:, 1].max())
    ax.set_aspect("equal")
    if res.plane.anchors is not None and res.plane.kind == "through":
        a = res.plane.anchors.cpu().numpy()
        ax.scatter(a[:, 0], a[:, 1], c="k", s=12, zorder=3)
    if color_by == "class":  # which colour is which class (regions are shaded by their code within it)
        import matplotlib
        from matplotlib.patches import Patch
        shown = np.unique(cls)
        ax.legend([Patch(color=matplotlib.colormaps["tab10"](int(c) % 10)) for c in shown],
                  [f"class {int(c)}" for c in shown], fontsize=6, loc="upper right")
    ax.set_xlabel("plane coordinate 1", fontsize=7)
    ax.set_ylabel("plane coordinate 2", fontsize=7)
    kinks = f"; white: kinks of {kinks_of}" if kinks_of is not None else ""
    ax.set_title(title or f"{res.num_regions} regions (exact, {res.dtype}){kinks}", fontsize=9)
    return ax


def toy_classifier(dataset: str = "moons", width: int = 32, depth: int = 3, steps: int = 600, seed: int = 0):
    """A 2 -> depth x width ReLU MLP -> n_classes trained in place (Adam, full batch) on sklearn ``make_moons``
    (2 classes) or a 3-arm spiral; returns (model, X, y)."""
    from torch import nn
    g = torch.Generator().manual_seed(seed)
    if dataset == "moons":
        from sklearn.datasets import make_moons
        X, y = make_moons(n_samples=512, noise=0.1, random_state=seed)
        X = (X - X.mean(0)) / X.std(0) * 0.5
        n_cls = 2
    elif dataset == "spirals":
        n, n_cls = 600, 3
        t = torch.rand(n, generator=g) * 3.0 + 0.3
        k = torch.arange(n) % n_cls
        ang = t * 2.2 + k * (2 * np.pi / n_cls)
        X = (torch.stack([t * torch.cos(ang), t * torch.sin(ang)], 1) / 3.5).numpy()
        X = X + 0.02 * np.random.default_rng(seed).standard_normal(X.shape)
        y = k.numpy()
    else:
        raise ValueError(f"The 'dataset' parameter must be 'moons' or 'spirals'. Got {dataset!r}.")
    torch.manual_seed(seed)
    layers, d = [], 2
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    model = nn.Sequential(*layers, nn.Linear(d, n_cls))
    Xt, yt = torch.tensor(X, dtype=torch.float32), torch.tensor(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(Xt), yt)
        loss.backward()
        opt.step()
    return model.eval(), X, y


def opening_figure(path=None, *, dataset: str = "moons", width: int = 32, depth: int = 3, seed: int = 0,
                   lo: float = -1.0, hi: float = 1.0, detached: bool = False):
    """The paper's opening picture: a toy 2-D classifier's polytopes after each layer and its decision boundary.

    Returns (figure, list of SliceResult); writes ``path`` (PNG or SVG by suffix) when given. ``detached``: a
    ``matplotlib.figure.Figure`` outside pyplot (for files and reports; no backend involved)."""
    from . import slice_box
    from ..capture import list_sites
    model, X, y = toy_classifier(dataset, width, depth, seed=seed)
    sites = [s.name for s in list_sites(model, lambda: model(torch.zeros(1, 2)))]
    results = [slice_box(model, lo, hi, until=s) for s in sites[:-1]] + [slice_box(model, lo, hi)]
    from ..report.figures import new_figure
    fig = new_figure((4 * len(results), 4.2), detached)
    axes = fig.subplots(1, len(results))
    for i, (ax, r) in enumerate(zip(np.atleast_1d(axes), results)):
        last = i == len(results) - 1
        r.plot(ax, color_by="class" if last else "code", kinks_of=sites[i], boundary=last,
               title=f"after {sites[i]}: {r.num_regions} regions")
        ax.scatter(X[:, 0], X[:, 1], c=y, s=2, cmap="coolwarm", alpha=0.5)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return fig, results
