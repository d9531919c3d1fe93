"""Prediction 2 (paper §4.3): polytope boundary density tracks semantic boundaries.

``run_prediction2(model, data, ...)`` draws pairs of inputs (different-class, same-class) and a control of random
directions (start + a random direction with the norm of a different-class pair's displacement), interpolates
linearly between their activations at site ``layer`` (or in input space), counts boundary crossings per layer along
each path with ``paths.path_crossings`` (exact for piecewise-linear models), and compares them with the semantic
trace (top class, Jensen-Shannon divergence between consecutive regions).

``path_statistics(different, same, control, ...)`` computes the statistics from ``PathBatchResult`` objects, so
hand-made models can be tested directly. Statistics (larger is better for every one; CI of method - baseline):

* ``density[different vs same]``: mean crossings per unit length, different-class vs same-class paths (Welch's t
  interval: two independent groups; the others are paired t intervals, ``stats.mean_difference_ci``);
* ``crossings[different vs same]`` and ``crossings[different vs random]`` (the latter paired by start point);
* ``alignment[peak vs flip]``: ``1 - |t_peak - t_flip|`` (t_peak = centre of the densest of ``n_windows`` windows,
  t_flip = the prediction flip nearest to it; flips are the trace's class changes: exact on exact paths followed to
  the output, bisected on the model otherwise) vs the null
  of a peak at a uniform random position U, ``1 - E min_j |U - t_flip_j|``; paths without a flip are left out;
* ``spearman[density vs JS]``: per path, Spearman correlation of the crossings per window with the summed JS
  divergence per window, vs the same with the JS windows shuffled within the path (paired over paths).

Without classes (text encoders), ``semantic="embedding"``: the trace is the cosine change of the mean-pooled output
between consecutive samples, and the flip is where that change is largest (approximate: sampled crossings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

_GRID = (np.arange(2000) + 0.5) / 2000  # U(0, 1) quadrature for the alignment null

from ..errors import InvalidInputError, check_seed, is_int
from ..paths.runner import index_inputs
from .stats import find_entry, mean_difference_ci, verdict

__all__ = ["Prediction2Result", "run_prediction2", "path_statistics", "window_counts"]

# what ``path_statistics`` can report (text encoders: the trace's JS is the change of the sentence embedding)
STATISTICS = ("density[different vs same]", "crossings[different vs same]", "crossings[different vs random]",
              "alignment[peak vs flip]", "spearman[density vs JS]")
TEXT_STATISTICS = STATISTICS[:-1] + ("spearman[density vs embedding change]",)


def _entry(model, statistic, value, baseline, ci, **extra) -> dict:
    return {"model": model, "statistic": statistic, "value": float(value), "baseline": float(baseline),
            "ci": [float(ci[0]), float(ci[1])], "verdict": verdict(value, baseline, ci), **extra}


def window_counts(t: np.ndarray, n_windows: int, weights=None) -> np.ndarray:
    """Histogram of positions ``t`` in [0, 1] over ``n_windows`` equal windows (optionally weighted)."""
    return np.histogram(np.clip(np.asarray(t, dtype=np.float64), 0, 1), bins=n_windows, range=(0.0, 1.0),
                        weights=weights)[0].astype(np.float64)


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def path_statistics(different, same=None, control=None, *, model: str = "model", n_windows: int = 20,
                    level: float = 0.95, seed: int = 0, flips=None, js=None) -> dict:
    """Entries and plot data from path batches (``PathBatchResult``) of different-class, same-class and control
    paths. ``flips``/``js`` (lists per different-class path) override the trace's class changes and JS (used for
    text encoders); ``seed`` draws the shuffles of the correlation's null. Each CI is a t interval of the
    difference of means (``stats.mean_difference_ci``: Welch's for different vs same-class paths, paired
    otherwise). Returns ``{"entries": [...], "plot": {...}}``."""
    rng = np.random.default_rng(seed)
    entries = []
    d_counts = different.counts.astype(np.float64)
    d_dens = np.array([p.density for p in different.paths])
    if same is not None and len(same):
        s_counts = same.counts.astype(np.float64)
        s_dens = np.array([p.density for p in same.paths])
        entries.append(_entry(model, "density[different vs same]", d_dens.mean(), s_dens.mean(),
                              mean_difference_ci(d_dens, s_dens, paired=False, level=level),
                              unit="crossings per unit length"))
        entries.append(_entry(model, "crossings[different vs same]", d_counts.mean(), s_counts.mean(),
                              mean_difference_ci(d_counts, s_counts, paired=False, level=level),
                              unit="crossings per path"))
    if control is not None and len(control) == len(different):
        c_counts = control.counts.astype(np.float64)
        entries.append(_entry(model, "crossings[different vs random]", d_counts.mean(), c_counts.mean(),
                              mean_difference_ci(d_counts, c_counts, paired=True, level=level),
                              unit="crossings per path (same start and length)"))
    # windows, alignment, correlation
    centres = (np.arange(n_windows) + 0.5) / n_windows
    dens_w, js_w, peaks, flips_used, align, align_base, rho, rho_sh = [], [], [], [], [], [], [], []
    for i, p in enumerate(different.paths):
        w = window_counts(p.records["t"], n_windows)
        dens_w.append(w * n_windows / max(p.length, 1e-300))
        tr = p.trace
        fl = np.asarray(flips[i] if flips is not None else (tr.class_changes if tr is not None else []), float)
        if js is not None:
            jt, jv = js[i]
        elif tr is not None and len(tr.js):
            # exact: the change between two regions sits at the breakpoint between them (a long region's midpoint
            # can be windows away from it); sampled: between two samples
            jt, jv = (p.t[1:-1] if p.exact else 0.5 * (tr.t[:-1] + tr.t[1:])), tr.js
        else:
            jt, jv = np.zeros(0), np.zeros(0)
        jw = window_counts(jt, n_windows, weights=jv)
        js_w.append(jw)
        if w.sum() > 0:
            t_peak = centres[int(np.argmax(w))]
            peaks.append(t_peak)
            if len(fl):
                f = fl[np.argmin(np.abs(fl - t_peak))]
                flips_used.append(f)
                align.append(1 - abs(t_peak - f))
                # null: the density peak falls anywhere, unrelated to the flips: 1 - E min_j |U - flip_j|
                align_base.append(1 - np.abs(_GRID[:, None] - fl[None, :]).min(1).mean())
        r = _spearman(w, jw)
        if not np.isnan(r):
            rho.append(r)
            rho_sh.append(np.nanmean([_spearman(w, rng.permutation(jw)) for _ in range(20)]))
    if align:
        a, b = np.array(align), np.array(align_base)
        entries.append(_entry(model, "alignment[peak vs flip]", a.mean(), b.mean(),
                              mean_difference_ci(a, b, paired=True, level=level),
                              n_paths=len(a), mean_distance=float(1 - a.mean())))
    else:
        entries.append(_entry(model, "alignment[peak vs flip]", float("nan"), float("nan"),
                              (float("nan"), float("nan")), n_paths=0))
    if rho:
        a, b = np.array(rho), np.array(rho_sh)
        entries.append(_entry(model, "spearman[density vs JS]", a.mean(), b.mean(),
                              mean_difference_ci(a, b, paired=True, level=level),
                              n_paths=len(a)))
    plot = {"counts": {"different": different.counts.tolist(),
                       "same": same.counts.tolist() if same is not None else [],
                       "random": control.counts.tolist() if control is not None else []},
            "per_layer": {"different": different.per_layer,
                          "same": same.per_layer if same is not None else {},
                          "random": control.per_layer if control is not None else {}},
            "window_centres": centres.tolist(),
            "density_windows": np.array(dens_w).tolist(), "js_windows": np.array(js_w).tolist(),
            "flips": [np.asarray(flips[i] if flips is not None else (p.trace.class_changes if p.trace is not None
                                                                      else []), float).tolist()
                      for i, p in enumerate(different.paths)],
            "peaks": peaks}
    return {"entries": entries, "plot": plot}


@dataclass(frozen=True, eq=False)
class Prediction2Result:
    """Outcome of ``run_prediction2``: ``entries`` (one per statistic), the overall ``verdict`` (of ``primary``),
    ``plot_data`` (what ``plot()`` draws, ``to_dict``'s ``plot``), the path batches (``paths``: different / same /
    random) and ``settings``."""

    model: str
    data: str
    entries: tuple
    primary: str
    verdict: str
    plot_data: dict
    exact: bool
    method: str
    layer: str | None
    paths: dict = field(repr=False)
    pairs: dict = field(repr=False)
    settings: dict = field(default_factory=dict)
    start_codes: dict | None = field(default=None, repr=False)  # site -> (P, units) pieces where each different-
    # class path starts (float64; ``region_flow``'s start_codes); None for text, whose paths are sampled

    def entry(self, statistic: str) -> dict:
        """The entry of one statistic (e.g. ``"nmi[class]"``)."""
        return find_entry(self.entries, statistic)

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "prediction": 2, "primary": self.primary,
                "verdict": self.verdict, "exact": self.exact, "method": self.method, "layer": self.layer,
                "entries": [dict(e) for e in self.entries], "plot": self.plot_data,
                "pairs": {k: np.asarray(v).tolist() for k, v in self.pairs.items()}, "settings": self.settings}

    def plot(self, kind: str = "both", ax=None):
        """``"histogram"``: crossings per path by pair type; ``"density"``: windowed crossing density along the
        different-class paths with their class changes; ``"both"`` (a new figure, side by side). Returns the Axes
        (an array of two for ``"both"``)."""
        from ..report.figures import crossings_histogram, density_vs_t, new_figure

        data = {"model": self.model, "plot": self.plot_data, "exact": self.exact}
        if kind == "both" and ax is None:
            fig = new_figure((10, 3))
            axes = fig.subplots(1, 2)
            crossings_histogram(data, axes[0])
            density_vs_t(data, axes[1])
            fig.tight_layout()
            return axes
        draw = {"histogram": crossings_histogram, "density": density_vs_t}.get(kind)
        if draw is None:
            raise InvalidInputError(f"The 'kind' parameter of plot must be 'histogram' or 'density' (or 'both' without "
                                    f"ax). Got {kind!r}.")
        return draw(data, ax)

    def _repr_html_(self) -> str:
        from ..report.html import entries_table, summary_html, tolerance_text

        counts = {k: len(v) for k, v in self.plot_data.get("counts", {}).items()}
        return summary_html(f"Prediction 2 on {self.model} / {self.data}: {self.verdict} ({self.primary})",
                            {"crossings": "exact" if self.exact else "sampled (lower bounds)", "method": self.method,
                             "tolerance": tolerance_text(self.settings.get("tolerance")),
                             "paths at": self.layer or "the input",
                             "paths": ", ".join(f"{n} {k}" for k, n in counts.items())},
                            entries_table([dict(e, data=self.data) for e in self.entries],
                                          self.settings.get("level", 0.95)))


def _draw_pairs(labels: np.ndarray, n_pairs: int, rng) -> tuple[np.ndarray, np.ndarray]:
    n = len(labels)
    diff, same = [], []
    seen = set()  # unordered pairs drawn: a segment and its reverse are one path, counted once
    tries = 0
    while (len(diff) < n_pairs or len(same) < n_pairs) and tries < 100 * n_pairs:
        tries += 1
        i, j = rng.integers(0, n, 2)
        if i == j or (min(i, j), max(i, j)) in seen:
            continue
        seen.add((min(i, j), max(i, j)))
        if labels[i] != labels[j] and len(diff) < n_pairs:
            diff.append((i, j))
        elif labels[i] == labels[j] and len(same) < n_pairs:
            same.append((i, j))
    return np.array(diff, dtype=np.int64).reshape(-1, 2), np.array(same, dtype=np.int64).reshape(-1, 2)


def run_prediction2(model, data, *, layer: str | None = None, n_pairs: int = 50, n_items: int = 200, seed: int = 0,
                    method: str = "auto", n_samples: int = 256, n_windows: int = 20,
                    level: float = 0.95, labels=None, max_length: int = 64, primary: str = "alignment[peak vs flip]",
                    units=None, tol: float = 1e-9, progress=None) -> Prediction2Result:
    """Crossings along different-class, same-class and random-direction paths, against the semantic trace.

    Parameters
    ----------
    model : str or ModelBundle
    data : str or DataSource
    layer : str, optional
        Site whose output space the paths live in (the network runs from there on); None = input space.
    n_pairs : int
        Pairs per kind (different-class, same-class); the control has one random direction per different pair.
    labels : array (n_items,), optional
        Overrides the data's labels (e.g. source photo of augmented images); text without labels uses the
        embedding trace and makes no same-class pairs (pairs are consecutive passages vs random directions).
    method, n_samples, units, tol
        Passed to ``path_crossings`` (``auto``: exact where the model is piecewise linear after ``layer``;
        ``units="position"``: count the last site's crossings for its centre channel vector only).
    n_windows, level, seed
        Windows for the density profile; level of the t intervals (``path_statistics``); seed of pairs, directions
        and the correlation's shuffles (pairs are distinct: a segment and its reverse count once).
    primary : str
        The statistic whose verdict is the overall one: one of ``STATISTICS`` (``TEXT_STATISTICS`` for text
        encoders); anything else is an error before any path is run.

    Returns
    -------
    Prediction2Result
    """
    from ..data import load_data
    from ..models import as_bundle
    from ..paths import path_crossings, site_activations
    from ._along import outputs_along

    if not is_int(n_pairs) or n_pairs < 2:
        raise InvalidInputError(f"The 'n_pairs' parameter of run_prediction2 must be an int >= 2. Got {n_pairs!r}.")
    seed = check_seed(seed, 'run_prediction2')
    bundle = as_bundle(model, 'run_prediction2')
    source = load_data(data, limit=n_items, seed=seed) if isinstance(data, str) else (
        data.subset(slice(0, n_items)) if len(data) > n_items else data)  # a DataSource: its first n_items
    say = progress or (lambda msg: None)
    rng = np.random.default_rng(seed)
    text = bundle.modality == "text"
    known = TEXT_STATISTICS if text else STATISTICS
    if primary not in known:
        raise InvalidInputError(f"The 'primary' parameter of run_prediction2 must be one of {', '.join(known)} "
                                f"(for {'a text' if text else 'this'} model). Got {primary!r} instead.")
    if labels is not None and len(labels) not in {len(source), len(data) if not isinstance(data, str) else -1}:
        raise InvalidInputError(f"The 'labels' parameter of run_prediction2 needs one label per item ({len(source)}"
                                f"{'' if isinstance(data, str) else f' or {len(data)}, those of data'}). Got "
                                f"{len(labels)}.")
    y = np.asarray(labels)[:len(source)] if labels is not None else (
        None if source.labels is None else np.asarray(source.labels))
    if y is None and not text:
        raise InvalidInputError(f"Data {source.spec!r} has no labels; prediction 2 needs classes (or pass labels=).")
    if text:
        if layer is None:
            raise InvalidInputError("Text models need layer= (a site whose activation space the paths live in).")
        k = min(n_pairs, len(source) // 2)
        diff = np.stack([np.arange(0, 2 * k, 2), np.arange(1, 2 * k, 2)], 1)
        same = np.zeros((0, 2), dtype=np.int64)
    else:
        diff, same = _draw_pairs(y, n_pairs, rng)
    enc = lambda idx: bundle.encode(source, idx, max_length=max_length) if text else bundle.encode(source, idx)
    fwd = lambda x: bundle.module(**x)
    kw = dict(method=method, n_samples=n_samples, tol=tol, trace=not text,
              **({} if units is None else {"units": units}))
    name = bundle.spec

    def endpoints(pairs):
        xa, xb = enc(pairs[:, 0]), enc(pairs[:, 1])
        if layer is None:
            key = bundle.input_name
            return xa.tensors[key], xb.tensors[key], None
        a = site_activations(bundle.module, xa.tensors, layer=layer)
        b = site_activations(bundle.module, xb.tensors, layer=layer)
        if text:  # sequences differ in length: b cut or padded to a's positions. The path moves only where both
            # texts have a token: elsewhere b is a, so a pair's path depends on its two texts alone (not on the
            # padding of the other texts in b's batch), and lies in a's positions, where paths at a site run
            m = min(a.shape[1], b.shape[1])
            both = torch.zeros(a.shape[:2], dtype=torch.bool)
            both[:, :m] = (xa.tensors["attention_mask"][:, :m] != 0) & (xb.tensors["attention_mask"][:, :m] != 0)
            bb = a.clone()
            bb[:, :m] = b[:, :m]
            b = torch.where(both[..., None].to(a.device), bb, a)
        return a, b, xa.tensors

    dropped = []

    def distinct(pairs):
        """``pairs`` whose two ends differ (two items can be equal, or meet at ``layer``), and their ends: a path
        needs two."""
        a, b, base = endpoints(pairs)
        keep = (a != b).flatten(1).any(1)
        if bool(keep.all()):
            return pairs, a, b, base
        dropped.append(int((~keep).sum()))
        idx = torch.nonzero(keep).flatten()
        return pairs[idx.numpy()], a[idx], b[idx], None if base is None else index_inputs(base, idx)

    def crossings(a, b, base):
        if layer is None:
            return path_crossings(bundle.module, a, b, **kw)
        return path_crossings(bundle.module, a, b, layer=layer, inputs=base, **kw)

    diff, a, b, base = distinct(diff)
    if len(diff) < 2:
        raise InvalidInputError(f"Only {len(diff)} different-class pairs with distinct ends could be drawn from "
                                f"{len(source)} items.")
    say(f"{name}: {len(diff)} different-class paths")
    res_d = crossings(a, b, base)
    d = (b - a)
    u = torch.randn(d.shape, generator=torch.Generator().manual_seed(seed), dtype=d.dtype)
    if text:
        u = u * base["attention_mask"][..., None].to(u.dtype)  # a's positions only, as the different-class paths
    u = u * (d.flatten(1).norm(dim=1) / u.flatten(1).norm(dim=1).clamp_min(1e-30)).view(-1, *[1] * (d.dim() - 1))
    starts = None if text else _start_codes(bundle.module, a if layer is None else base, res_d.sites)
    say(f"{name}: {len(diff)} random-direction paths")
    res_c = crossings(a, a + u, base)
    res_s = None
    same, sa, sb, sbase = distinct(same) if len(same) >= 2 else (same, None, None, None)
    if len(same) >= 2:
        say(f"{name}: {len(same)} same-class paths")
        res_s = crossings(sa, sb, sbase)
    flips = js = None
    if text:  # embedding trace on a grid: change of the mean-pooled output between consecutive samples
        G = 33
        ts = torch.linspace(0, 1, G, dtype=a.dtype)
        pts = a[:, None] + ts.view(1, G, *[1] * (a.dim() - 1)) * (b - a)[:, None]
        out = outputs_along(bundle.module, fwd, base, layer, pts)  # (P, G, pos, d)
        mask = base["attention_mask"].to(torch.float64)[:, None, :, None]
        emb = (out * mask).sum(2) / mask.sum(2).clamp_min(1)
        cos = torch.nn.functional.cosine_similarity(emb[:, 1:], emb[:, :-1], dim=-1)
        change = (1 - cos).numpy()
        mids = (0.5 * (ts[1:] + ts[:-1])).numpy()
        flips = [[float(mids[int(np.argmax(c))])] for c in change]
        js = [(mids, c) for c in change]
    stats_ = path_statistics(res_d, res_s, res_c, model=name, n_windows=n_windows, level=level,
                             seed=seed, flips=flips, js=js)
    entries = stats_["entries"]
    if text:
        for e in entries:
            e["approximate"] = True
            if e["statistic"] == "spearman[density vs JS]":
                e["statistic"] = "spearman[density vs embedding change]"
    overall = next((e["verdict"] for e in entries if e["statistic"] == primary), "inconclusive")
    settings = {"n_pairs": int(len(diff)), "n_same": int(len(same)), "n_items": len(source), "seed": seed,
                "layer": layer, "method": res_d.method, "n_samples": n_samples, "n_windows": n_windows,
                "level": level, "dtype": res_d.dtype, "tolerance": res_d.tolerance,
                "seconds": float(res_d.seconds + res_c.seconds + (res_s.seconds if res_s else 0.0)),
                "semantic": "embedding change (1 - cosine of mean-pooled output)" if text else "top class / JS",
                "sites": list(res_d.sites), "units": units if units is None or isinstance(units, str) else
                "selected", "notes": list(res_d.notes) + ([
                    f"{sum(dropped)} drawn pairs left out: their two items are equal"
                    + (f" at {layer}" if layer else "") + " (a path needs two distinct ends)"] if dropped else [])}
    return Prediction2Result(model=name, data=getattr(source, "spec", str(data)), entries=tuple(entries),
                             primary=primary, verdict=overall, plot_data=stats_["plot"], exact=res_d.exact,
                             method=res_d.method, layer=layer,
                             paths={"different": res_d, "same": res_s, "random": res_c},
                             pairs={"different": diff, "same": same}, settings=settings, start_codes=starts)


def _start_codes(module, starts, sites) -> dict:
    """Pieces of every unit of ``sites`` at the paths' starts (the inputs, or the inputs that feed ``layer`` and every
    other branch), in float64 as the exact engine runs, so that a crossing's piece follows the start's."""
    from ..codes import spline_codes
    from ..paths.geometry import cast
    from ..paths.runner import prepare_model

    device = (starts if isinstance(starts, torch.Tensor) else next(iter(starts.values()))).device
    codes = spline_codes(prepare_model(module, torch.float64, device), cast(starts, torch.float64, device),
                         layers=list(sites))
    return {s: codes[s].pieces() for s in sites}
