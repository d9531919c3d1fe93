"""Figures of results: the report's, from the JSON-safe result dicts, and the result objects' ``plot`` methods.

A function with an ``ax`` parameter draws there when given one. Otherwise it makes a figure: a pyplot figure, which a
notebook shows and ``plt.show`` opens, or, with ``detached=True`` (the report), a ``matplotlib.figure.Figure`` outside
pyplot, drawn without touching the backend the user chose. ``png`` turns a figure into base64 PNG text.
"""

from __future__ import annotations

import base64
import io

import numpy as np

from ..paths.geometry import ray_alpha

__all__ = ["png", "new_figure", "crossings_histogram", "density_vs_t", "scaling_figure", "entries_figure",
           "path_figure", "batch_figure", "cluster_grid"]

_SITE_COLOURS = 8  # sites drawn in their own colour; the rest are summed as "other sites"


def png(fig, dpi: int = 90) -> str:
    """Base64 PNG of ``fig``; a pyplot figure is closed once drawn."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    if getattr(fig, "number", None) is not None:  # pyplot's (a detached figure has no number)
        import matplotlib.pyplot as plt

        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def new_figure(figsize, detached: bool = False):
    """An empty figure: pyplot's, or with ``detached`` a ``matplotlib.figure.Figure`` outside pyplot."""
    if detached:
        from matplotlib.figure import Figure

        return Figure(figsize=figsize)
    import matplotlib.pyplot as plt

    return plt.figure(figsize=figsize)


def _figure(figsize, detached: bool, nrows: int = 1, **kw):
    """(figure, axes) of ``nrows`` rows in one column."""
    fig = new_figure(figsize, detached)
    return fig, fig.subplots(nrows, 1, squeeze=False, **kw)[:, 0]


def _axes(ax, figsize, detached: bool):
    return ax if ax is not None else _figure(figsize, detached)[1][0]


def _counted(result: dict) -> str:
    """' (exact)' or ' (sampled lower bounds)' from a result dict's ``exact``, for a title."""
    return {True: " (exact)", False: " (sampled lower bounds)"}.get(result.get("exact"), "")


def crossings_histogram(p2: dict, ax=None, *, detached: bool = False):
    """Prediction 2: crossings per path, by pair type (different class, same class, random direction). Returns the
    Axes."""
    ax = _axes(ax, (5, 3), detached)
    counts = p2["plot"]["counts"]
    allc = [c for v in counts.values() for c in v]
    bins = np.linspace(min(allc + [0]), max(allc + [1]), 20)
    for kind, color in (("different", "C3"), ("same", "C0"), ("random", "C7")):
        if counts.get(kind):
            ax.hist(counts[kind], bins=bins, alpha=0.55, color=color, label=f"{kind} (n={len(counts[kind])})")
    ax.set_xlabel("boundary crossings per path")
    ax.set_ylabel("paths")
    ax.set_title(f"{p2['model']}: crossings by pair type{_counted(p2)}", fontsize=9)
    ax.legend(fontsize=7)
    return ax


def density_vs_t(p2: dict, ax=None, *, detached: bool = False, n_paths: int = 6):
    """Prediction 2: windowed crossing density along the first ``n_paths`` different-class paths and their mean,
    with each path's class changes dashed. Returns the Axes."""
    ax = _axes(ax, (5, 3), detached)
    pl = p2["plot"]
    c = np.asarray(pl["window_centres"])
    d = np.asarray(pl["density_windows"])
    for i, row in enumerate(d[:n_paths]):
        ax.plot(c, row, color=f"C{i}", lw=1, alpha=0.8)
        for f in pl["flips"][i]:
            ax.axvline(f, color=f"C{i}", ls="--", lw=0.8)
    if len(d):
        ax.plot(c, d.mean(0), color="black", lw=2, label="mean over paths")
        ax.legend(fontsize=7)
    ax.set_xlabel("t (path position)")
    ax.set_ylabel(f"crossings per unit length (windowed){_counted(p2)}")
    ax.set_title(f"{p2['model']}: density along different-class paths, flips dashed", fontsize=9)
    return ax


def scaling_figure(p3: dict, n_rays: int = 4, *, detached: bool = False):
    """Prediction 3: per ray, the top-class probability and the probability of the class at alpha = 1 over the alpha
    grid, the validity interval, and a histogram of the crossings. Returns the Axes, one per ray (their ``figure``
    is the Figure)."""
    pl = p3["plot"]
    alpha = np.asarray(pl["alpha"])
    k = max(1, min(n_rays, len(pl["top_prob"])))
    fig, axes = _figure((5.5, 1.7 * k + 0.4), detached, nrows=k, sharex=True)
    for i in range(min(k, len(pl["top_prob"]))):
        ax = axes[i]
        ax.plot(alpha, pl["top_prob"][i], color="C0", label="top-class prob.")
        ax.plot(alpha, pl["class_at_1_prob"][i], color="C2", ls=":", label="prob. of class at alpha=1")
        iv = p3["intervals"][i]
        lo = iv["lo"] if iv["lo"] is not None else alpha[0]
        hi = iv["hi"] if iv["hi"] is not None else alpha[-1]
        ax.axvspan(lo, hi, color="C2", alpha=0.12, label="validity interval")
        ca = np.asarray(pl["crossings_alpha"][i])
        ax2 = ax.twinx()
        ax2.hist(ca, bins=40, range=(alpha[0], alpha[-1]), color="C3", alpha=0.35)
        ax2.set_ylabel(f"crossings{_counted(p3)}", fontsize=7)
        ax2.set_ylim(bottom=0)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("prob.", fontsize=7)
        top = np.asarray(pl["top_class"][i])
        ch = np.flatnonzero(top[1:] != top[:-1])
        for j in ch[:6]:
            ax.text(alpha[j + 1], 1.0, pl["class_names"].get(str(top[j + 1]), pl["class_names"].get(top[j + 1], "")),
                    fontsize=6, va="top")
        ax.set_title(f"ray {i}: class at 1 = {iv['class_name']}", fontsize=8, loc="left")
        if i == 0:
            ax.legend(fontsize=6, loc="lower right")
    axes[-1].set_xlabel("alpha (activation scale)")
    return axes


def entries_figure(entries: list, title: str, ax=None, *, level: float = 0.95, detached: bool = False):
    """A prediction's statistics: value - baseline with its ``level`` interval, coloured by verdict. Returns the
    Axes."""
    ax = _axes(ax, (6, 0.6 + 0.35 * max(1, len(entries))), detached)
    for i, e in enumerate(entries):
        d = e["value"] - e["baseline"]
        lo, hi = e["ci"]
        if np.isfinite([d, lo, hi]).all():
            ax.errorbar(d, i, xerr=[[max(0, d - lo)], [max(0, hi - d)]], fmt="o", capsize=3,
                        color={"holds": "C2", "does not hold": "C3"}.get(e["verdict"], "C7"))
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(entries)), [f"{e.get('model', '')}: {e['statistic']}" if e.get("model") else
                                        e["statistic"] for e in entries], fontsize=7)
    ax.set_xlabel(f"value - baseline ({level:.0%} interval; stability: spread)")
    ax.set_title(title, fontsize=9)
    return ax


def cluster_grid(clusters: list, items, per_cluster: int = 8, *, detached: bool = False):
    """Images of code clusters, one row per cluster (``clusters``: dashboard dicts with ``items``, row indices into
    ``items``). Returns the Axes, (clusters, per_cluster)."""
    fig = new_figure((per_cluster, len(clusters)), detached)
    axes = fig.subplots(len(clusters), per_cluster, squeeze=False)
    for r, c in enumerate(clusters):
        for j, ax in enumerate(axes[r]):
            ax.axis("off")
            if j < len(c["items"]):
                img = np.asarray(items[c["items"][j]], dtype=np.float32)
                ax.imshow(img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1), cmap="gray")
        axes[r][0].set_title(f"#{c['cluster']} n={c['size']} {c['majority']}", fontsize=7, loc="left")
    fig.tight_layout()
    return axes


def _label(exact: bool, dtype: str, tolerance: dict) -> str:
    """How a count was made, for a title: 'exact, float64' or 'sampled lower bound, tol 1e-06'."""
    if exact:
        return f"exact, {dtype}"
    return f"sampled lower bound, tol {tolerance.get('tol', '?'):g}" if "tol" in tolerance else "sampled lower bound"


def _site_groups(sites: tuple, per_site: np.ndarray) -> list[tuple[str, list[int]]]:
    """The sites drawn in their own colour (most crossings first) and the rest as one group."""
    order = [int(i) for i in np.argsort(-per_site, kind="stable") if per_site[i] > 0]
    groups = [(sites[i], [i]) for i in order[:_SITE_COLOURS]]
    if order[_SITE_COLOURS:]:
        groups.append((f"{len(order) - _SITE_COLOURS} other sites", order[_SITE_COLOURS:]))
    return groups


def _crossing_histogram(ax, x: np.ndarray, site: np.ndarray, sites: tuple, bins: np.ndarray, weight: float) -> None:
    """Stacked histogram of crossing positions ``x`` by site, each crossing counting ``weight``."""
    groups = _site_groups(sites, np.bincount(site, minlength=len(sites)))
    if groups:
        _, _, bars = ax.hist([x[np.isin(site, idx)] for _, idx in groups], bins=bins, stacked=True,
                             weights=[np.full(int(np.isin(site, idx).sum()), weight) for _, idx in groups],
                             color=[f"C{i % 10}" for i in range(len(groups))])
        # labels given to legend() itself: matplotlib drops a label= that starts with "_" (every EfficientNet site)
        ax.legend(bars if len(groups) > 1 else [bars], [name for name, _ in groups], fontsize=6, loc="best")


def path_figure(path, ax=None, *, bins: int = 50, detached: bool = False):
    """One path (``PathResult``): where its crossings lie (a histogram stacked by site; rays in alpha) and, with a
    trace, the top-class probability along it with the class changes dashed. Returns the Axes."""
    ax = _axes(ax, (6, 3), detached)
    ray = path.alphas is not None
    pos = (lambda t: path.alpha(t)) if ray else (lambda t: np.asarray(t, dtype=np.float64))
    lo, hi = (min(path.alphas), max(path.alphas)) if ray else (0.0, 1.0)
    _crossing_histogram(ax, pos(path.records["t"]), path.records["site"], path.sites,
                        np.linspace(lo, hi, bins + 1), 1.0)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("alpha (activation scale)" if ray else "t (path position)")
    ax.set_ylabel(f"crossings per bin (1/{bins} of the {'ray' if ray else 'path'})")
    if path.trace is not None and len(path.trace.t):
        tw = ax.twinx()
        order = np.argsort(path.trace.t)
        tw.plot(pos(path.trace.t[order]), path.trace.top_prob[order], color="black", lw=1, marker=".", ms=3,
                label="top-class prob.")  # at region midpoints (exact) or samples: a one-region path is one dot
        for c in pos(path.trace.class_changes):
            tw.axvline(c, color="black", ls="--", lw=0.8)
        tw.set_ylim(0, 1.05)
        tw.set_ylabel("top-class probability, per region (class changes dashed)", fontsize=7)
    how = {True: " (exact)", False: " (sampled lower bound)"}.get(path.exact, "")
    ax.set_title(f"path {path.index}: {path.crossings} crossings{how}, {path.n_regions} regions", fontsize=9)
    return ax


def batch_figure(batch, ax=None, *, bins: int = 50, detached: bool = False):
    """A batch of paths (``PathBatchResult``): the mean number of crossings per path in each bin of t (a ray batch:
    of alpha, when its rays share their range), stacked by site. Returns the Axes."""
    ax = _axes(ax, (6, 3), detached)
    x, site, alphas = batch.crossing_t, batch.crossing_site, batch.ray_alphas
    ray = alphas is not None
    if ray:
        x, (lo, hi) = ray_alpha(x, alphas), (min(alphas), max(alphas))
    else:
        lo, hi = 0.0, 1.0
    _crossing_histogram(ax, x, site, batch.sites, np.linspace(lo, hi, bins + 1), 1.0 / max(1, len(batch)))
    ax.set_xlim(lo, hi)
    ax.set_xlabel("alpha (activation scale)" if ray else "t (path position)")
    ax.set_ylabel("mean crossings per path and bin")
    ax.set_title(f"{len(batch)} {batch.kind}{'' if len(batch) == 1 else 's'}, {int(batch.counts.sum())} crossings "
                 f"({_label(batch.exact, batch.dtype, batch.tolerance)})", fontsize=9)
    return ax
