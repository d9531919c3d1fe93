"""Figures of the report, drawn from the JSON-safe result dicts, returned as base64 PNG strings."""

from __future__ import annotations

import base64
import io

import numpy as np


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def crossings_histogram(p2: dict) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    counts = p2["plot"]["counts"]
    allc = [c for v in counts.values() for c in v]
    bins = np.linspace(min(allc + [0]), max(allc + [1]), 20)
    for kind, color in (("different", "C3"), ("same", "C0"), ("random", "C7")):
        if counts.get(kind):
            ax.hist(counts[kind], bins=bins, alpha=0.55, color=color, label=f"{kind} (n={len(counts[kind])})")
    ax.set_xlabel("boundary crossings per path")
    ax.set_ylabel("paths")
    ax.set_title(f"{p2['model']}: crossings by pair type", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def density_vs_t(p2: dict) -> str:
    plt = _plt()
    pl = p2["plot"]
    c = np.asarray(pl["window_centres"])
    d = np.asarray(pl["density_windows"])
    fig, ax = plt.subplots(figsize=(5, 3))
    for i, row in enumerate(d[:6]):
        ax.plot(c, row, color=f"C{i}", lw=1, alpha=0.8)
        for f in pl["flips"][i]:
            ax.axvline(f, color=f"C{i}", ls="--", lw=0.8)
    if len(d):
        ax.plot(c, d.mean(0), color="black", lw=2, label="mean over paths")
        ax.legend(fontsize=7)
    ax.set_xlabel("t (path position)")
    ax.set_ylabel("crossings per unit length (windowed)")
    ax.set_title(f"{p2['model']}: density along different-class paths, flips dashed", fontsize=9)
    return _png(fig)


def scaling_figure(p3: dict, n_rays: int = 4) -> str:
    plt = _plt()
    pl = p3["plot"]
    alpha = np.asarray(pl["alpha"])
    k = min(n_rays, len(pl["top_prob"]))
    fig, axes = plt.subplots(k, 1, figsize=(5.5, 1.7 * k + 0.4), squeeze=False, sharex=True)
    for i in range(k):
        ax = axes[i][0]
        ax.plot(alpha, pl["top_prob"][i], color="C0", label="top-class prob.")
        ax.plot(alpha, pl["class_at_1_prob"][i], color="C2", ls=":", label="prob. of class at alpha=1")
        iv = p3["intervals"][i]
        lo = iv["lo"] if iv["lo"] is not None else alpha[0]
        hi = iv["hi"] if iv["hi"] is not None else alpha[-1]
        ax.axvspan(lo, hi, color="C2", alpha=0.12, label="validity interval")
        ca = np.asarray(pl["crossings_alpha"][i])
        ax2 = ax.twinx()
        ax2.hist(ca, bins=40, range=(alpha[0], alpha[-1]), color="C3", alpha=0.35)
        ax2.set_ylabel("crossings", fontsize=7)
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
    axes[-1][0].set_xlabel("alpha (activation scale)")
    return _png(fig)


def entries_figure(entries: list, title: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.35 * max(1, len(entries))))
    for i, e in enumerate(entries):
        d = e["value"] - e["baseline"]
        lo, hi = e["ci"]
        if np.isfinite([d, lo, hi]).all():
            ax.errorbar(d, i, xerr=[[max(0, d - lo)], [max(0, hi - d)]], fmt="o", capsize=3,
                        color={"holds": "C2", "does not hold": "C3"}.get(e["verdict"], "C7"))
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(entries)), [f"{e['model']}: {e['statistic']}" for e in entries], fontsize=7)
    ax.set_xlabel("value - baseline (95% CI)")
    ax.set_title(title, fontsize=9)
    return _png(fig)


def image_grid(images: list, titles: list | None = None, per_row: int = 8) -> str:
    """Grid of (C, H, W) float images in [0, 1]."""
    plt = _plt()
    n = max(1, len(images))
    rows = (n + per_row - 1) // per_row
    fig, axes = plt.subplots(rows, per_row, figsize=(per_row * 0.8, rows * 0.85), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, img in enumerate(images):
        a = np.asarray(img, dtype=np.float32)
        ax = axes.ravel()[i]
        ax.imshow(a[0] if a.shape[0] == 1 else np.clip(np.moveaxis(a, 0, -1), 0, 1), cmap="gray")
        if titles:
            ax.set_title(str(titles[i])[:12], fontsize=6)
    return _png(fig)
