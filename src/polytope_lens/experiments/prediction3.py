"""Prediction 3 (paper §4.4): polytope boundaries bound the range over which a direction keeps its meaning.

``run_prediction3(model, data, layer=..., alphas=(0, 4))`` scales the activation of site ``layer`` by alpha for many
inputs (``paths.ray_crossings``), records the crossings on each ray, the top class along the ray (exact trace) and
the top-class probability on an alpha grid, and finds the **validity interval**: the contiguous alpha range around
alpha = 1 over which the top class equals the class at alpha = 1. Its finite ends (class changes, located on the
model) are compared with boundary density: ``density[near validity ends vs elsewhere]`` = crossings per unit alpha
within ``half_width`` of the ray's own ends vs the same ray's density near the other rays' ends (a null that keeps
the ray's own alpha-dependence of density; paired t interval over rays, ``stats.mean_difference_ci``).

``validity_interval(alpha, top_class)`` and ``ray_statistics(batch, ...)`` work on any trace, for tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InvalidInputError, check_seed, is_int, is_real
from .prediction2 import _entry
from .stats import _check_level, mean_difference_ci

__all__ = ["Prediction3Result", "run_prediction3", "validity_interval", "ray_statistics"]


def validity_interval(alpha: np.ndarray, top_class: np.ndarray, at: float = 1.0, bounds=(None, None)):
    """(lo, hi, cls): the contiguous range of trace positions ``alpha`` (samples, sorted) around ``at`` with the
    class of the position nearest ``at``; the ends are the midpoints between the last same-class and the first
    other-class position, or ``bounds`` (None = open) when the class never changes on that side."""
    alpha, top = np.asarray(alpha, float), np.asarray(top_class)
    i = int(np.argmin(np.abs(alpha - at)))
    c = top[i]
    j = i
    while j > 0 and top[j - 1] == c:
        j -= 1
    k = i
    while k < len(top) - 1 and top[k + 1] == c:
        k += 1
    lo = 0.5 * (alpha[j - 1] + alpha[j]) if j > 0 else bounds[0]
    hi = 0.5 * (alpha[k] + alpha[k + 1]) if k < len(top) - 1 else bounds[1]
    return lo, hi, int(c)


def _ends(path, at_one: int | None = None) -> tuple[float | None, float | None, int]:
    """The validity interval's ends in alpha: the class changes nearest to alpha = 1 on each side (exact positions,
    bisected on the model by the trace), None where the class never changes on that side; and the class at alpha = 1:
    ``at_one`` (the model's own prediction there) or, unless given, that of the trace position nearest 1 between
    those ends (a region's midpoint can lie beyond a change inside the region, on the other class's side)."""
    tr = path.trace
    changes = np.asarray(path.alpha(tr.class_changes), float)
    below, above = changes[changes < 1.0], changes[changes > 1.0]
    lo = float(below.max()) if len(below) else None
    hi = float(above.min()) if len(above) else None
    if at_one is None:
        xa = np.asarray(path.alpha(tr.t), float)
        inside = np.flatnonzero((xa > (-np.inf if lo is None else lo)) & (xa < (np.inf if hi is None else hi)))
        pick = inside if len(inside) else np.arange(len(xa))
        at_one = tr.top_class[pick[int(np.argmin(np.abs(xa[pick] - 1.0)))]]
    return lo, hi, int(at_one)


def _density_near(xa: np.ndarray, ends: list[float], a0: float, a1: float, half_width: float):
    """Crossings per unit alpha within ``half_width`` of any of ``ends`` (None when that window is empty): the
    crossings in the union of the windows, over its exact length within [a0, a1]."""
    mask = np.zeros(len(xa), dtype=bool)
    for e in ends:
        mask |= np.abs(xa - e) <= half_width
    length, reach = 0.0, a0  # the windows' union, swept left to right
    for lo, hi in sorted((max(a0, e - half_width), min(a1, e + half_width)) for e in ends):
        if hi > reach:
            length += hi - max(lo, reach)
            reach = hi
    return None if length <= 0 else mask.sum() / length


def ray_statistics(batch, *, model: str = "model", half_width: float = 0.1, level: float = 0.95,
                   classes_at_one=None) -> dict:
    """Validity intervals and boundary density near their ends, for a batch of rays (``ray_crossings``).

    The statistic is the density of crossings (per unit alpha) within ``half_width`` of a ray's own interval ends;
    the baseline is the same ray's density near the *other* rays' ends. Density along a ray depends on alpha by
    itself (kinks crowd near small alpha), so comparing each ray with itself at the alphas where other rays change
    class isolates what is specific to its own class changes (paired t interval over rays). ``classes_at_one``: each
    ray's class at alpha = 1 (the model's prediction there; default: read from the trace, ``_ends``).
    """
    intervals, own_ends, xas, spans = [], [], [], []
    for i, p in enumerate(batch.paths):
        lo, hi, c = _ends(p, None if classes_at_one is None else int(classes_at_one[i]))
        intervals.append({"lo": lo, "hi": hi, "class": c})
        own_ends.append([e for e in (lo, hi) if e is not None])
        xas.append(np.asarray(p.alpha(p.records["t"]), float))
        spans.append(tuple(p.alphas))
    near, far = [], []
    for i, ends in enumerate(own_ends):
        others = [e for j, es in enumerate(own_ends) if j != i for e in es]
        if not ends or not others:
            continue
        a0, a1 = spans[i]
        own = _density_near(xas[i], ends, a0, a1, half_width)
        base = [d for d in (_density_near(xas[i], [e], a0, a1, half_width) for e in others) if d is not None]
        if own is None or not base:
            continue
        near.append(own)
        far.append(float(np.mean(base)))
    entries = []
    if near:
        a, b = np.array(near), np.array(far)
        entries.append(_entry(model, "density[near validity ends vs elsewhere]", a.mean(), b.mean(),
                              mean_difference_ci(a, b, paired=True, level=level), unit="crossings per unit alpha",
                              n_rays=len(a),
                              half_width=half_width))
    else:
        changing = sum(bool(e) for e in own_ends)
        why = ("no ray changes class within its alphas" if not changing else
               "only one ray changes class: no other rays' ends to compare with" if changing == 1 else
               f"no density near the ends could be measured (half_width {half_width:g})")
        entries.append(_entry(model, "density[near validity ends vs elsewhere]", float("nan"), float("nan"),
                              (float("nan"), float("nan")), n_rays=0, half_width=half_width,
                              degenerate=f"{why}: widen the alphas, scale an earlier site or add items"))
    widths = [(i["hi"] if i["hi"] is not None else np.nan) - (i["lo"] if i["lo"] is not None else np.nan)
              for i in intervals]
    return {"entries": entries, "intervals": intervals, "widths": widths}


@dataclass(frozen=True, eq=False)
class Prediction3Result:
    """Outcome of ``run_prediction3``: ``entries``, ``verdict``, per-ray ``intervals`` and ``plot_data`` (what
    ``plot()`` draws, ``to_dict``'s ``plot``: alpha grid, top class and its probability per ray, crossing positions)."""

    model: str
    data: str
    entries: tuple
    verdict: str
    intervals: tuple
    plot_data: dict
    exact: bool
    method: str
    layer: str
    rays: object = field(repr=False)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "prediction": 3, "verdict": self.verdict,
                "exact": self.exact, "method": self.method, "layer": self.layer,
                "entries": [dict(e) for e in self.entries], "intervals": list(self.intervals),
                "plot": self.plot_data,
                "settings": self.settings}

    def plot(self, n_rays: int = 4):
        """The first ``n_rays`` rays: top-class probability over alpha, the probability of the class at alpha = 1,
        the validity interval and the crossings. Returns the Axes, one per ray."""
        from ..report.figures import scaling_figure

        return scaling_figure({"plot": self.plot_data, "intervals": list(self.intervals), "exact": self.exact}, n_rays)

    def _repr_html_(self) -> str:
        from ..report.html import entries_table, interval_table, summary_html, tolerance_text

        return summary_html(
            f"Prediction 3 on {self.model} / {self.data}: {self.verdict}",
            {"crossings": "exact" if self.exact else "sampled (lower bounds)", "method": self.method,
             "tolerance": tolerance_text(self.settings.get("tolerance")), "scaled site": self.layer,
             "alphas": self.settings.get("alphas"),
             "rays": len(self.intervals)},
            entries_table([dict(e, data=self.data) for e in self.entries], self.settings.get("level", 0.95)),
            interval_table(list(self.intervals)),
            notes=["— : the class does not change on that side within the range."])


def run_prediction3(model, data, *, layer: str, n_items: int = 50, alphas=(0.25, 4.0), seed: int = 0,
                    method: str = "auto", n_samples: int = 512, half_width: float = 0.1, n_grid: int = 81,
                    level: float = 0.95, index=None, units=None,
                    progress=None) -> Prediction3Result:
    """Scale site ``layer``'s activation of ``n_items`` inputs by alpha in ``alphas``; validity intervals and the
    density of boundaries near their ends. ``index``: rows of the data to use (default the first ``n_items``)."""
    from ..data import load_data
    from ..models import as_bundle
    from ..paths import ray_crossings, site_activations
    from ._along import outputs_along

    a0, a1 = (float(v) for v in alphas) if np.size(alphas) == 2 else (np.nan, np.nan)
    if not (np.isfinite(a0) and np.isfinite(a1) and a0 < 1.0 < a1):
        raise InvalidInputError(f"The 'alphas' parameter of run_prediction3 must be (alpha0, alpha1) with alpha0 < 1 < "
                                f"alpha1: the validity interval is the range of alpha around 1 (the input's own "
                                f"activation) with its class. Got {alphas!r}.")
    if not is_real(half_width) or not 0 < half_width < math.inf:
        raise InvalidInputError(f"The 'half_width' parameter of run_prediction3 must be a positive number (the "
                                f"window around each interval end, in alpha). Got {half_width!r}.")
    if not is_int(n_grid) or n_grid < 2:
        raise InvalidInputError(f"The 'n_grid' parameter of run_prediction3 must be an int >= 2 (alphas of the "
                                f"plotted outputs). Got {n_grid!r}.")
    _check_level(level, "run_prediction3")
    seed = check_seed(seed, 'run_prediction3')
    bundle = as_bundle(model, 'run_prediction3')
    if bundle.modality == "text":
        raise InvalidInputError("run_prediction3 needs a classifier (the validity interval is defined by the top "
                                "class); got a text encoder.")
    source = load_data(data, limit=n_items, seed=seed) if isinstance(data, str) else data
    idx = np.arange(min(n_items, len(source))) if index is None else np.asarray(index)
    x = bundle.encode(source, idx)
    say = progress or (lambda msg: None)
    say(f"{bundle.spec}: {len(idx)} scaling rays at {layer}")
    rays = ray_crossings(bundle.module, x.tensors, layer=layer, alphas=tuple(alphas), method=method,
                         n_samples=n_samples, **({} if units is None else {"units": units}))
    a = site_activations(bundle.module, x.tensors, layer=layer).to(torch.float32)
    with torch.no_grad():  # alpha = 1 is the input itself: its class is the model's prediction
        at_one = outputs_along(bundle.module, lambda d: bundle.module(**d), x.tensors, layer, a[:, None])[:, 0]
    st = ray_statistics(rays, model=bundle.spec, half_width=half_width, level=level,
                        classes_at_one=at_one.argmax(-1).tolist())
    grid = np.linspace(alphas[0], alphas[1], n_grid)
    pts = a[:, None] * torch.tensor(grid, dtype=torch.float32).view(1, -1, *[1] * (a.dim() - 1))
    out = outputs_along(bundle.module, lambda d: bundle.module(**d), x.tensors, layer, pts)
    prob = torch.softmax(out, -1)
    top = prob.argmax(-1)
    names = bundle.class_names
    plot = {"alpha": grid.tolist(), "top_class": top.tolist(),
            "top_prob": prob.max(-1).values.tolist(),
            "class_at_1_prob": [prob[i, :, iv["class"]].tolist() for i, iv in enumerate(st["intervals"])],
            "crossings_alpha": [p.alpha(p.records["t"]).tolist() for p in rays.paths],
            "counts": rays.counts.tolist(),
            "class_names": {int(c): (names[c] if names else str(c)) for c in np.unique(top.numpy())}}
    for iv in st["intervals"]:
        iv["class_name"] = names[iv["class"]] if names else str(iv["class"])
    e = st["entries"]
    settings = {"layer": layer, "alphas": list(alphas), "n_items": int(len(idx)), "method": rays.method,
                "dtype": rays.dtype, "tolerance": rays.tolerance, "half_width": half_width,
                "level": level, "seconds": rays.seconds, "sites": list(rays.sites), "notes": list(rays.notes),
                "units": units if units is None or isinstance(units, str) else "selected",
                "closed_intervals": int(np.isfinite(st["widths"]).sum())}
    return Prediction3Result(model=bundle.spec, data=getattr(source, "spec", str(data)), entries=tuple(e),
                             verdict=e[0]["verdict"], intervals=tuple(st["intervals"]), plot_data=plot,
                             exact=rays.exact, method=rays.method, layer=layer, rays=rays, settings=settings)
