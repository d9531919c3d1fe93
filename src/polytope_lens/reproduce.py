"""One command that reproduces the paper's three predictions on the embedded real models and writes a report.

``reproduce(out_dir, quick=False)`` runs, per model job (``JOBS``; ``models=`` picks a subset, ``config=`` overrides
sizes), prediction 1 (``run_prediction1``), prediction 2 (``run_prediction2``), prediction 3 (``run_prediction3``)
and the representational flow of prediction 2's paths, then writes ``index.html`` and ``results.json`` into a
temporary folder beside ``out_dir`` and renames it into place on success (nothing is left half-written).

Jobs: digits-cnn on digits (always); fashion-cnn on Fashion-MNIST, EfficientNet-Lite0 on the scikit-image photos
(flips and crops, labelled by source photo), MiniLM on pydoc and MiniLM on Jane Austen's novels when they load. A job
names its model (``"model"``, default: the job's key) and data; every result entry carries both. A job whose model or
data is missing is skipped and the report's Methods section says why.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ._outputs import REPORT_FORMAT, canonical, check_destination, json_text, publish
from .errors import InvalidInputError, PolytopeLensError

__all__ = ["reproduce", "JOBS", "QUICK", "FULL", "QUICK_MODELS", "estimate_seconds"]

JOBS = {
    # prediction 3 scales the first site's activation up to 16x: scaling a late site of these small ReLU CNNs
    # almost never changes the class (the head is nearly positively homogeneous), so no validity interval has ends.
    # "cost": seconds on 2 CPU cores to load, per prediction-1 item, per prediction-2 pair (three kinds of path) and
    # per prediction-3 ray, measured in full runs, and to train a small CNN that is not cached (stop 31: 7 and 16 s);
    # the printed estimate is built from them. MiniLM's prediction 2 has a fixed part ("p2_fixed", stop 33: 10.4 s
    # for 3 pairs in a quick run, 11.3 s for 12 in a full one), which a per-pair cost alone put at 2 s in quick runs.
    "digits-cnn": {"data": "digits", "p1_layers": "head.2.relu", "p1_units": "all", "layer": "pool1.max_pool2d",
                   "p3_layer": "stem.2.relu", "p3_alphas": (0.25, 16.0),
                   "cost": {"load": 2, "p1": 0.002, "p2": 0.02, "p3": 0.09, "train": 7}},
    "fashion-cnn": {"data": "fashion-mnist", "p1_layers": "head.2.relu", "p1_units": "all",
                    "layer": "pool2.max_pool2d", "p3_layer": "stem.2.relu", "p3_alphas": (0.25, 16.0),
                    "p3_in_quick": False, "p3_max_items": 10,  # ~4 s per ray (22,000-27,000 crossings): full run only
                    "cost": {"load": 2, "p1": 0.002, "p2": 0.15, "p3": 4.2, "train": 16}},
    "efficientnet-lite0": {"data": "skimage-augmented", "p1_layers": "_blocks.15._swish.relu6#1",
                           "p1_units": "position", "layer": "_blocks.15._swish.relu6#1",
                           "p3_layer": "_blocks.15._swish.relu6#1",
                           # crossings of the head's centre channel vector (the paper's CNN protocol): following all
                           # 62,720 head units needs ~30,000 forward passes (of the network after the site) per path
                           "units": "position",
                           "cost": {"load": 5, "p1": 0.1, "p2": 1.6, "p3": 1.3}},
    "minilm": {"data": "pydoc", "p1_layers": "encoder.layer.3.intermediate.intermediate_act_fn.gelu",
               "p1_units": "tokens", "layer": "encoder.layer.4.intermediate.intermediate_act_fn.gelu",
               "p3_layer": None, "cost": {"load": 5, "p1": 0.12, "p2_fixed": 8, "p2": 0.3, "p3": 0.0}},
    "minilm-austen": {"model": "minilm", "data": "austen",
                      "p1_layers": "encoder.layer.3.intermediate.intermediate_act_fn.gelu", "p1_units": "tokens",
                      "layer": "encoder.layer.4.intermediate.intermediate_act_fn.gelu", "p3_layer": None,
                      "cost": {"load": 5, "p1": 0.1, "p2_fixed": 8, "p2": 0.4, "p3": 0.0}},
}
QUICK = {"p1_items": 200, "p2_pairs": 6, "p2_items": 120, "p3_items": 6, "n_boot": 200, "n_stability": 0,
         "text_items": 12, "text_pairs": 3, "n_samples": 48, "photo_pairs": 4, "photo_rays": 3}
FULL = {"p1_items": 1000, "p2_pairs": 40, "p2_items": 400, "p3_items": 30, "n_boot": 1000, "n_stability": 10,
        "text_items": 60, "text_pairs": 12, "n_samples": 128, "photo_pairs": 6, "photo_rays": 4}
QUICK_MODELS = ["digits-cnn", "fashion-cnn"]
OPENING_PICTURE_S = 5  # the report's opening picture: a toy classifier trained and sliced (stop 33, 2 cores)
_AUGMENTATIONS = ("identity", "hflip", "crop80 top-left", "crop80 bottom-right", "crop80 centre")


def _n_photos() -> int:
    """Items of the augmented photo set: every bundled photo in every augmentation (35 with matplotlib's photo)."""
    from .data.images import skimage_photo_paths
    from .errors import MissingDependencyError

    try:
        return len(skimage_photo_paths()) * len(_AUGMENTATIONS)
    except MissingDependencyError:  # the run itself will say what is missing
        return 0


def _sizes(job: dict, config: dict, quick: bool) -> tuple[int, int, int]:
    """(prediction-1 items, prediction-2 pairs, prediction-3 rays) of one job under ``config``."""
    text = job.get("model", "") == "minilm" or job["data"] in ("pydoc", "austen")
    if text:
        return config["text_items"], config["text_pairs"], 0
    if job["data"] == "skimage-augmented":
        n1, n2, n3 = _n_photos(), config["photo_pairs"], config["photo_rays"]
    else:
        n1, n2, n3 = config["p1_items"], config["p2_pairs"], min(config["p3_items"], job.get("p3_max_items", 1 << 30))
    if not job["p3_layer"] or (quick and not job.get("p3_in_quick", True)):
        n3 = 0
    return n1, n2, n3


def estimate_seconds(config: dict, models: list[str], quick: bool = False) -> float:
    """Rough duration of a run on 2 CPU cores from the jobs' measured per-item costs, with the training of a small
    CNN whose weights are not cached yet and the opening picture (imports, a few seconds, are not counted)."""
    from .models.embedded import RECIPES, cached_weights

    total = OPENING_PICTURE_S
    for m in models:
        c = JOBS[m]["cost"]
        n1, n2, n3 = _sizes(JOBS[m], config, quick)
        total += c["load"] + n1 * c["p1"] + (c.get("p2_fixed", 0) if n2 else 0) + n2 * c["p2"] + n3 * c["p3"]
        if m in RECIPES and not cached_weights(m).is_file():
            total += c.get("train", 0)
    return total


def _augmented_photos():
    """The scikit-image photos with flips and crops, labelled by source photo."""
    from .data import load_data
    from .data._source import DataSource

    src = load_data("skimage")
    names = list(src.label_names) if src.label_names else [f"photo{i}" for i in range(len(src))]
    items, labels = [], []
    for i, img in enumerate(src.items):
        a = np.asarray(img, dtype=np.float32)
        h, w = a.shape[-2:]
        ch, cw = int(0.8 * h), int(0.8 * w)
        variants = [a, a[..., ::-1], a[:, :ch, :cw], a[:, h - ch:, w - cw:], a[:, (h - ch) // 2:(h + ch) // 2,
                                                                               (w - cw) // 2:(w + cw) // 2]]
        for v in variants:
            items.append(np.ascontiguousarray(v))
            labels.append(int(src.labels[i]) if src.labels is not None else i)
    return DataSource("skimage-augmented", "image", items, np.asarray(labels, dtype=np.int64), names,
                      {"source": "skimage photos", "augmentations": list(_AUGMENTATIONS), "n_items": len(items)})


def default_models(quick: bool) -> list[str]:
    """The jobs run when none are named: all of them, or ``QUICK_MODELS`` for a quick run."""
    # quick runs default to the two small CNNs: EfficientNet-Lite0's exact head paths take minutes each (measured)
    return list(QUICK_MODELS if quick else JOBS)


def check_models(models) -> list[str]:
    """``models`` as a list of known job names, or a one-line error naming the first unknown one."""
    models = [models] if isinstance(models, str) else list(models)
    if not models:
        raise InvalidInputError(f"No model job named; known: {', '.join(JOBS)}.")
    for m in models:
        if m not in JOBS:
            raise InvalidInputError(f"Unknown model job {m!r}; known: {', '.join(JOBS)}.")
    return models


def counts_kind(entry: dict) -> str | None:
    """How the crossings a results entry rests on were counted, as a summary says it: exact, or approximate
    (sampled: counts are lower bounds); None for an entry that rests on no crossings (prediction 1's scores)."""
    if "exact" not in entry:
        return None
    if entry["exact"]:
        return "exact crossings"
    return f"approximate: {entry.get('method') or 'sampled'} crossings, counts are lower bounds"


def check_out_dir(out, *, overwrite: bool = False) -> None:
    """Raise unless ``out`` is free, or is a report that ``overwrite`` may replace (``_outputs``)."""
    check_destination(out, "report", overwrite=overwrite)


def _available(models: list[str]) -> tuple[list[str], dict]:
    from .data import list_data
    from .models import list_models

    have_m = {name: ok for name, ok, _ in list_models()}
    have_d = {name: ok for name, ok, _ in list_data()}
    keep, skipped = [], {}
    for m in models:
        if m not in JOBS:
            raise InvalidInputError(f"Unknown model job {m!r}; known: {', '.join(JOBS)}.")
        d = JOBS[m]["data"]
        dkey = "skimage" if d == "skimage-augmented" else d
        if not have_m.get(JOBS[m].get("model", m), False):
            skipped[m] = "model not available here"
        elif not have_d.get(dkey, False):
            skipped[m] = f"data {dkey!r} not available here"
        else:
            keep.append(m)
    return keep, skipped


def reproduce(out_dir, quick: bool = False, *, models: list[str] | None = None, config: dict | None = None,
              overwrite: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """Run the predictions on the embedded models and write ``index.html`` and ``results.json`` to ``out_dir``.

    Parameters
    ----------
    out_dir : path
    quick : bool
        Small sizes and fewer bootstrap resamples for prediction 1 (``QUICK``), under 5 minutes on 2 CPU cores.
    models : list of str, optional
        Jobs to run (keys of ``JOBS``); default all of them, or ``QUICK_MODELS`` with ``quick`` (a job whose
        model or data is not installed is skipped).
    config : dict, optional
        Overrides of ``QUICK``/``FULL`` sizes.
    overwrite : bool
        Replace an existing ``out_dir``.
    progress : callable(str), optional
        Called with one line per stage.

    Returns
    -------
    dict
        ``results`` (what results.json holds), ``seconds``, ``timings``, ``skipped``, ``out_dir``.
    """
    from .experiments.flow import region_flow
    from .experiments.prediction1 import run_prediction1
    from .experiments.prediction2 import run_prediction2
    from .experiments.prediction3 import run_prediction3
    from .models import load_model
    from .data import load_data
    from .report.html import render_report

    out = canonical(out_dir)
    check_out_dir(out, overwrite=overwrite)
    say = progress or (lambda msg: None)
    cfg = {**(QUICK if quick else FULL), **(config or {})}
    wanted = default_models(quick) if models is None else check_models(models)
    run_models, skipped = _available(wanted)
    t_start = time.perf_counter()
    timings: dict = {}
    state: dict = {"p1": [], "p2": [], "p3": [], "flow": {}, "grids": {}, "methods": {}}
    results = {"prediction_1": [], "prediction_2": [], "prediction_3": []}
    nb = cfg["n_boot"]
    for m in run_models:
        job = JOBS[m]
        t0 = time.perf_counter()
        try:
            bundle = load_model(job.get("model", m))
            photos = job["data"] == "skimage-augmented"
            text = bundle.modality == "text"
            data = _augmented_photos() if photos else job["data"]
            # ---- prediction 1
            say(f"{m}: prediction 1")
            n1, n2, n3 = _sizes(job, cfg, quick)
            n1 = len(data) if photos else n1
            r1 = run_prediction1(bundle, data, layers=job["p1_layers"], units=job["p1_units"], n_items=n1,
                                 n_boot=nb, n_stability=cfg["n_stability"], min_cluster_size=3 if photos else 5,
                                 k=6, skip=100)  # the paper's token protocol: 6 tokens from token 100 on
            d1 = r1.to_dict()
            state["p1"].append(d1)
            results["prediction_1"] += [dict(e, data=d1["data"]) for e in d1["entries"]]
            if bundle.modality == "image":
                src = data if photos else load_data(job["data"], limit=n1, seed=0)
                try:
                    from .report.figures import png
                    grid = r1.plot(src, max_clusters=6, per_cluster=8, detached=True)
                    state["grids"][_label(d1)] = png(grid.flat[0].figure)
                except PolytopeLensError:
                    pass
            timings[f"{m}/prediction_1"] = round(time.perf_counter() - t0, 2)
            # ---- prediction 2 (+ flow)
            t1 = time.perf_counter()
            say(f"{m}: prediction 2")
            if text:
                r2 = run_prediction2(bundle, data, layer=job["layer"], n_pairs=n2,
                                     n_items=2 * n2, method="sampled", n_samples=cfg["n_samples"],
                                     tol=1.0 / cfg["n_samples"],  # crossings located to the sample spacing
                                     max_length=32, progress=say)
            elif photos:
                r2 = run_prediction2(bundle, data, layer=job["layer"], n_pairs=n2,
                                     units=job.get("units"), progress=say)
            else:
                r2 = run_prediction2(bundle, data, layer=job["layer"], n_pairs=n2,
                                     n_items=cfg["p2_items"], progress=say)
            d2 = r2.to_dict()
            state["p2"].append(d2)
            results["prediction_2"] += [dict(e, data=d2["data"], exact=r2.exact, method=r2.method)
                                        for e in d2["entries"]]
            state["flow"][_label(d2)] = region_flow(r2.paths["different"], start_codes=r2.start_codes)
            timings[f"{m}/prediction_2"] = round(time.perf_counter() - t1, 2)
            # ---- prediction 3
            d3 = None
            if n3:
                t2 = time.perf_counter()
                say(f"{m}: prediction 3")
                index = np.arange(0, len(data), 5)[:n3] if photos else None
                r3 = run_prediction3(bundle, data, layer=job["p3_layer"], n_items=n3, index=index,
                                     alphas=job.get("p3_alphas", (0.25, 4.0)), units=job.get("units"),
                                     progress=say)
                d3 = r3.to_dict()
                state["p3"].append(d3)
                results["prediction_3"] += [dict(e, data=d3["data"], exact=r3.exact, method=r3.method)
                                            for e in d3["entries"]]
                timings[f"{m}/prediction_3"] = round(time.perf_counter() - t2, 2)
            state["methods"][f"job: {m}"] = {"model": bundle.spec, "provenance": bundle.provenance,
                                            "data": getattr(data, "provenance", job["data"]),
                                            "prediction_2": d2["settings"],
                                            "prediction_3": d3["settings"] if d3 else None}
        except PolytopeLensError as e:
            skipped[m] = f"failed: {e}"
            say(f"{m}: skipped ({e})")
    seconds = time.perf_counter() - t_start
    state["methods"]["exact vs approximate"] = (
        "Crossing counts of ReLU/ReLU6/max-pool models (digits-cnn, fashion-cnn, EfficientNet-Lite0 after the path "
        "site) are exact: layered breakpoint refinement in float64 (tie tolerance 1e-12 in t; max-pool entries "
        "within 1e-9 x max(min(1, largest |entry|), |maximum|) of a window's maximum count as tied), verified on "
        "random intervals. MiniLM "
        "(GELU, LayerNorm) uses sampled crossings (threshold-code changes between dense samples, located to the "
        "sample spacing; counts are lower bounds) and the embedding-change trace (1 - cosine of mean-pooled output, "
        "33 points): approximate. "
        "Top-class probabilities along scaling rays are float32 forward passes on an alpha grid. Prediction-1 "
        "codes are exact signs of the unit inputs. Bootstrap: percentile intervals, "
        f"{nb} resamples, level 0.95.")
    state["methods"]["run"] = {"quick": quick, "config": cfg, "models": run_models, "skipped": skipped,
                               "timings_s": timings, "total_s": round(seconds, 1), "python": platform.python_version(),
                               "cpus": os.cpu_count()}
    state["subtitle"] = (f"{'quick' if quick else 'full'} run, {len(run_models)} model(s), "
                         f"{seconds:.0f} s; generated {time.strftime('%Y-%m-%d %H:%M:%S')}")
    say("opening picture: exact 2-D slices of a toy classifier")
    state["slice"] = _opening_picture()
    page = render_report(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "index.html").write_text(page, encoding="utf-8")
        payload = {"format": REPORT_FORMAT, **results,
                   "details": {"prediction_2": state["p2"], "prediction_3": state["p3"], "flow": state["flow"],
                               "methods": state["methods"]}}
        (tmp / "results.json").write_text(json_text(payload, default=_json_default), encoding="utf-8")
        publish(tmp, out, "report", overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"results": results, "seconds": seconds, "timings": timings, "skipped": skipped, "out_dir": str(out)}


def _opening_picture() -> str:
    """The paper's opening picture (a 2-D classifier trained here, its exact regions after each layer) as PNG."""
    from .report.figures import png
    from .slices.render import opening_figure

    fig, _ = opening_figure(detached=True)
    return png(fig)


def _label(result: dict) -> str:
    """``"MODEL on DATA"``: how the report names one job's results."""
    return f"{result['model']} on {result['data']}"


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
