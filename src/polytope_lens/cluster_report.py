"""Cluster the codes of a store and write the results folder: assignments, per-cluster summary, static dashboard.

``cluster_store(store, out, ...)`` reads a code store (``store.read_codes``), keeps the chosen sites (all of them,
concatenated byte-wise, by default) and the first ``limit`` rows, clusters them with
``cluster_scale.ScalableCodeClusterer`` and writes, atomically (a hidden ``.NAME.partial`` folder renamed into
place, nothing at ``out`` on failure)::

    out/assignments.npy   int64 (rows,): cluster of store row i (NOISE = -1); row i is store rows[i]
    out/rows.npy          int64 (rows, 2): [example index, token position or -1], as in the store
    out/clusters.json     settings, counts, timings and per cluster (largest first): size, member rows (a sample),
                          defining units (``cluster.cluster_summary``)
    out/index.html        a static dashboard: cluster sizes and, per cluster, its members as an image grid (when
                          the store's data set loads with ``data.load_data`` and matches its recorded provenance),
                          as token contexts (text stores, tokenised by the store's model), or as row indices

Two things are exact or approximate: the codes (``exact_codes``: false for threshold codes of smooth activations,
which name no true polytopes; the dashboard, and the CLI's summary line, say which) and the clusterer's kNN search
(``knn_exact``).
"""

from __future__ import annotations

import fnmatch
import html
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ._outputs import canonical, check_destination, json_text, publish
from .codes import SplineCodes
from .errors import InvalidInputError, PolytopeLensError, is_int
from .store import read_codes

__all__ = ["cluster_store", "select_store_sites"]


def select_store_sites(codes: SplineCodes, layers: str | list[str] | None) -> SplineCodes:
    """The store's codes restricted to sites whose name or alias matches one of the comma-separated globs."""
    if layers is None:
        return codes
    pats = [p.strip() for p in (layers.split(",") if isinstance(layers, str) else layers) if p.strip()]
    keep = {name: lc for name, lc in codes.layers.items()
            if any(fnmatch.fnmatchcase(name, p) or (lc.alias and fnmatch.fnmatchcase(lc.alias, p)) for p in pats)}
    if not keep:
        raise InvalidInputError(f"No site of the store matches --layers {layers!r}; its sites are "
                                f"{', '.join(codes.layers)}.")
    return SplineCodes(keep, codes.rows, codes.selection, codes.dtype, codes.meta)


def _head(codes: SplineCodes, limit: int | None) -> SplineCodes:
    if limit is None or limit >= len(codes):
        return codes
    layers = {n: type(lc)(lc.site, lc.alias, lc.activation, lc.n_units, lc.unit_shape, lc.packed[:limit],
                          None if lc.soft is None else lc.soft[:limit]) for n, lc in codes.layers.items()}
    return SplineCodes(layers, codes.rows[:limit], codes.selection, codes.dtype, codes.meta)


def cluster_store(store, out, *, metric: str = "hamming", layers=None, min_cluster_size: int = 20,
                  min_samples: int | None = None, n_neighbors: int | None = None, index: str = "auto",
                  limit: int | None = None, overwrite: bool = False, max_members: int = 50, top_k: int = 10,
                  max_shown: int = 40, progress: Callable[[str, int, int], None] | None = None,
                  ray_address: str | None = None, ray_workers: int | None = None) -> dict:
    """Cluster a code store's rows and write ``assignments.npy``, ``rows.npy``, ``clusters.json``, ``index.html``.

    Parameters
    ----------
    store : str or Path
        A store written by ``polytope-lens codes`` / ``extract_to_store``.
    out : str or Path
        Results folder (published only when complete). ``overwrite`` replaces only an earlier results folder (its
        ``clusters.json`` format), never ``store``, a file, another folder or the current folder.
    metric, min_cluster_size, min_samples, n_neighbors, index
        As in ``ScalableCodeClusterer``.
    layers : str, optional
        Comma-separated globs over site names or aliases (default: every site, concatenated).
    limit : int, optional
        Cluster only the first N rows.
    max_members, top_k, max_shown
        Member rows kept per cluster in ``clusters.json``, defining units per cluster, clusters drawn in the
        dashboard.
    ray_address, ray_workers
        Shard the kNN search over Ray workers, as in ``ScalableCodeClusterer``; the outputs are those of a
        single-process run (``params`` in ``clusters.json`` leaves these two out: they do not change the result).

    Returns
    -------
    dict
        What ``clusters.json`` holds, less the per-cluster entries, plus ``out``.
    """
    from .cluster import cluster_summary, clustering_scores
    from .cluster_scale import ScalableCodeClusterer

    if limit is not None and (not is_int(limit) or limit < 2):
        raise InvalidInputError(f"The 'limit' parameter of cluster_store must be an int >= 2. Got {limit!r} instead.")
    out = canonical(out)
    check_destination(out, "clusters", overwrite=overwrite, inputs=[store])
    if not Path(store).is_dir():
        raise InvalidInputError(f"{str(store)!r} is not a polytope-lens code store (no such folder).")
    codes = _head(select_store_sites(read_codes(store), layers), limit)
    est = ScalableCodeClusterer(metric=metric, min_cluster_size=min_cluster_size, min_samples=min_samples,
                                n_neighbors=n_neighbors, index=index, ray_address=ray_address,
                                ray_workers=ray_workers)
    t0 = time.perf_counter()
    est.fit(codes, progress=progress)
    seconds = time.perf_counter() - t0
    loaded = _load_source(codes.meta)  # the data set, when it reloads as recorded: labels, pictures
    y = _row_labels(loaded[0], codes)
    summary = cluster_summary(est.labels_, codes, y=y, top_k=top_k, max_members=max_members)
    result = {
        "format": "polytope-lens/clusters/1", "store": str(store), "model": codes.meta.get("model"),
        "data": codes.meta.get("data"), "sites": list(codes.layers), "n_rows": len(codes),
        "metric": metric, "params": {k: v for k, v in est.get_params().items() if not k.startswith("ray_")},
        "knn_exact": est.knn_exact_,
        "exact_codes": codes.exact, "n_clusters": est.n_clusters_, "noise_fraction": est.noise_fraction_,
        "knn_components": est.n_components_, "seconds": round(seconds, 3),
        # purity, NMI and ARI against the data set's labels over the clustered rows (coverage: their share), when
        # the data set has labels
        "label_scores": None if y is None else {
            **{k: None if isinstance(v, float) and v != v else v  # NaN: no rows
               for k, v in clustering_scores(y, est.labels_, noise="exclude").items()},
            "n_labels": int(len(np.unique(y)))},  # one label: purity 1 and NMI, ARI 0 say nothing
        "files": {"assignments": "assignments.npy", "rows": "rows.npy", "dashboard": "index.html"},
    }
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        np.save(tmp / "assignments.npy", est.labels_)
        np.save(tmp / "rows.npy", codes.rows)
        (tmp / "clusters.json").write_text(json_text({**result, **summary.to_dict()}))
        (tmp / "index.html").write_text(_dashboard(result, summary, codes, max_shown, loaded), encoding="utf-8")
        publish(tmp, out, "clusters", overwrite=overwrite, inputs=[store])
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PolytopeLensError(f"Writing the results to {str(out)!r} failed: {e.strerror or e}; nothing was "
                                "written.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**result, "out": str(out)}


# ------------------------------------------------------------------------------------------------ dashboard
def _png(fig) -> str:
    from .report.figures import png

    return f'<img src="data:image/png;base64,{png(fig, dpi=80)}">'


def _sizes_chart(sizes: list[int]) -> str:
    from matplotlib.figure import Figure  # outside pyplot: no backend involved

    fig = Figure(figsize=(8, 2.5))
    ax = fig.subplots()
    ax.bar(np.arange(len(sizes)), sizes, color="#4c72b0")
    ax.set_xlabel("cluster (largest first)")
    ax.set_ylabel("rows")
    return _png(fig)


def _image_shaped(items) -> bool:
    """Whether array items look like images: (N, 1 or 3, H, W) or (N, H, W), at least 4 pixels a side."""
    shape = np.shape(items)
    return (len(shape) == 4 and shape[1] in (1, 3) and min(shape[2:]) >= 4) or (len(shape) == 3 and min(shape[1:]) >= 4)


def _image_grid(images: list[np.ndarray], stretch: bool = False) -> str:
    """A PNG grid of images in [0, 1] (``stretch``: each scaled from its own min to max, for arrays of any range)."""
    from matplotlib.figure import Figure

    cols = min(8, len(images))
    rows = -(-len(images) // cols)
    fig = Figure(figsize=(cols * 0.9, rows * 0.9))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, im in zip(axes.ravel(), images):
        im = np.asarray(im, dtype=np.float32)
        if im.ndim == 3 and im.shape[0] in (1, 3):
            im = np.moveaxis(im, 0, -1)
        if stretch:
            im = (im - im.min()) / max(float(np.ptp(im)), 1e-30)
        ax.imshow(np.clip(im.squeeze(), 0, 1), cmap="gray" if im.squeeze().ndim == 2 else None)
    return _png(fig)


def _load_source(meta: dict):
    """The store's data set when it reloads with the recorded provenance; else (None, reason)."""
    from .data import load_data

    spec = meta.get("data")
    if not spec:
        return None, "the store does not name its data set"
    n_items = (meta.get("fingerprint") or {}).get("n_items")
    recorded = json.loads(json.dumps(meta.get("data_provenance") or {}, default=str))
    # a store made without a limit reloads without one: a limit, even of every item, samples digits and
    # fashion-mnist by class, which their provenance records (a full store lost its labels and pictures)
    limits = (n_items,) if "sample" in recorded or n_items is None else (n_items, None)
    for limit in limits:
        try:
            source = load_data(spec, limit=limit)
        except PolytopeLensError as e:
            return None, f"data {spec!r} did not load here: {e}"
        if json.loads(json.dumps(source.provenance, default=str)) == recorded and (
                n_items is None or len(source) == n_items):
            return source, None
    return None, f"data {spec!r} loads here with another provenance than the store records"


def _row_labels(source, codes: SplineCodes):
    """Each code row's label (by name where the data set names them), or None without labels."""
    if source is None or source.labels is None:
        return None
    labels = np.asarray(source.labels)[codes.rows[:, 0]]
    names = list(source.label_names or [])
    return np.array([str(names[i]) for i in labels]) if names and labels.dtype.kind in "iu" else labels


def _examples(codes: SplineCodes, summary, max_shown: int, loaded, per_cluster: int = 16) -> tuple[dict, str | None]:
    """Per shown cluster, HTML of its first members (images or token contexts), or a reason why there are none
    (``loaded``: ``_load_source``'s answer)."""
    source, why = loaded
    if source is None:
        return {}, why
    shown = summary.clusters[:max_shown]
    out = {}
    try:
        if source.modality == "image" or (source.modality == "array" and _image_shaped(source.items)):
            for c in shown:
                out[c.cluster] = _image_grid([source.items[int(codes.rows[i, 0])] for i in c.members[:per_cluster]],
                                             stretch=source.modality == "array")
        elif source.modality == "text":
            from .experiments.prediction1 import token_context
            from .models import load_model

            bundle = load_model(codes.meta["model"])
            max_length = (codes.meta.get("fingerprint") or {}).get("max_length", 256)
            for c in shown:
                rows = [codes.rows[i] for i in c.members[:per_cluster]]
                ex = sorted({int(r[0]) for r in rows})
                tokens = dict(zip(ex, bundle.encode(source, np.asarray(ex), max_length=max_length).tokens))
                out[c.cluster] = "<ul>" + "".join(
                    f"<li><code>{html.escape(token_context(tokens[int(r[0])], int(r[1])))}</code></li>"
                    for r in rows if r[1] >= 0) + "</ul>"
        else:
            return {}, f"data {source.spec!r} is neither images (or image-shaped arrays) nor text"
    except PolytopeLensError as e:
        return {}, f"examples unavailable: {e}"
    return out, None


def codes_kind(exact: bool) -> str:
    """How a summary names the codes clustered (``exact_codes``)."""
    return "exact polytope codes" if exact else "approximate threshold codes of smooth activations"


def _codes_kind(exact: bool) -> str:
    if exact:
        return codes_kind(True)
    return (f"<strong>{codes_kind(False)}</strong> (they do not name true polytopes: rows are grouped by the side "
            "of each unit's threshold they are on)")


def _dashboard(result: dict, summary, codes: SplineCodes, max_shown: int, loaded) -> str:
    e = html.escape
    sizes = [c.size for c in summary.clusters]
    examples, why = _examples(codes, summary, max_shown, loaded) if summary.clusters else ({}, None)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>polytope-lens clusters</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:70em} table{border-collapse:collapse;font-size:90%}"
        "td,th{border:1px solid #ccc;padding:2px 6px} section{margin-top:1.5em} .muted{color:#777}"
        "</style></head><body>",
        f"<h1>{result['n_clusters']} clusters of {result['n_rows']:,} code rows</h1>",
        f"<p>store <code>{e(str(result['store']))}</code> &middot; model <code>{e(str(result['model']))}</code> "
        f"&middot; data <code>{e(str(result['data']))}</code> &middot; metric {e(result['metric'])} &middot; "
        f"noise {100 * result['noise_fraction']:.1f}% &middot; kNN search "
        f"{'exact' if result['knn_exact'] else 'approximate'} &middot; {result['seconds']:.1f} s</p>",
        f"<p class='muted'>sites: {e(', '.join(result['sites']))}</p>",
        f"<p>codes: {_codes_kind(result['exact_codes'])}</p>",
    ]
    sc = result.get("label_scores")
    if sc and sc["purity"] is None:
        parts.append("<p class='muted'>Every row is noise: nothing to score against the data's labels.</p>")
    elif sc and sc["n_labels"] < 2:
        parts.append("<p class='muted'>The rows have a single label (a limit that takes the first items of one "
                     "class or novel?): purity 1 and NMI, ARI 0 say nothing about the clusters.</p>")
    elif sc:
        parts.append(f"<p>against the data's labels, over the {100 * sc['coverage']:.1f}% of rows in clusters: "
                     f"purity {sc['purity']:.3f} &middot; NMI {sc['nmi']:.3f} &middot; ARI {sc['ari']:.3f}</p>")
    if sizes:
        parts.append(_sizes_chart(sizes))
    if why:
        parts.append(f"<p class='muted'>No examples shown: {e(why)}.</p>")
    for c in summary.clusters[:max_shown]:
        units = "".join(f"<tr><td>{e(str(u['site']))}</td><td>{u['unit']}</td><td>{u['bit']}</td>"
                        f"<td>{u['p_in']:.2f}</td><td>{u['p_out']:.2f}</td></tr>" for u in c.units)
        members = ", ".join(f"{i} ({int(codes.rows[i, 0])}" + (f":{int(codes.rows[i, 1])}" if codes.rows[i, 1] >= 0
                                                                  else "") + ")" for i in c.members[:20])
        parts.append(
            f"<section><h2>cluster {c.cluster} &middot; {c.size:,} rows"
            + ("" if c.majority is None else f" &middot; {100 * c.majority_share:.0f}% {e(str(c.majority))}")
            + "</h2>"
            f"<p>members (row (example[:token])): {members}{' …' if c.size > 20 else ''}</p>"
            + examples.get(c.cluster, "")
            + "<details><summary>defining units</summary><table><tr><th>site</th><th>unit</th><th>bit</th>"
              f"<th>p in</th><th>p out</th></tr>{units}</table></details></section>")
    if len(summary.clusters) > max_shown:
        parts.append(f"<p class='muted'>{len(summary.clusters) - max_shown} smaller clusters are in clusters.json."
                     "</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
