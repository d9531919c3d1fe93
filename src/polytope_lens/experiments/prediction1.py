"""Prediction 1 (paper §4.2): clusters of spline codes are more monosemantic than clusters of activations.

``run_prediction1(model, data, ...)``:

1. loads ``n_items`` items (``load_data(data, limit=n_items, seed=seed)``: class-stratified for digits and
   Fashion-MNIST, the first passages for text);
2. extracts spline codes with ``extract.extract_codes`` and, in a second pass over the same batches with the same
   ``UnitSelection``, the unit inputs ``z`` of the same sites via ``capture.run`` (the activations whose signs the
   ReLU codes record). Row i of both is the same (example, token) pair; this is checked, not assumed;
3. clusters the codes (``CodeClusterer``: HDBSCAN under Hamming distance by default) and the activations
   (``ActivationClusterer``: k-means under Euclidean distance with ``n_clusters`` = the number of code clusters,
   at least 2, by default);
4. scores both against labels (image class; for text, token identity and a lexical category), with purity, NMI and
   ARI under the noise policy ``noise`` (``cluster``: HDBSCAN noise counts as one more cluster; ``exclude``: both
   clusterings are scored on the rows that neither calls noise, ``settings["coverage"]`` says how many), and
   label-free by subsample stability (``cluster.stability``);
5. gives each statistic a CI of the difference (codes - activations) and a verdict (``stats.verdict``).

Intervals. Label scores: percentile bootstrap over rows (``n_boot`` resamples with replacement, both clusterings
fixed, scores paired on the same resample); it measures which rows were evaluated, not clustering randomness. Where
an example gives several rows (a passage's token rows, which are correlated), whole examples are resampled with
all their rows (``stats.paired_bootstrap(groups=...)``), not rows one by one.
Stability: the central ``level`` interval of the paired per-round differences over ``n_stability`` subsamples (a
spread over refits, not an interval of the mean, so it does not shrink as rounds are added).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from ..capture import StopForward, run
from ..cluster import (ACTIVATION_METRICS, CODE_METRICS, METHODS, NOISE, NOISE_POLICIES, ActivationClusterer,
                       CodeClusterer, cluster_summary, clustering_scores, stability, subsample_indices)
from ..errors import InvalidInputError, check_seed, is_int
from ..codes import UnitSelection
from ..extract import default_units, extract_codes
from .stats import find_entry, paired_bootstrap, percentile_ci, resampled_clustering_scores, verdict

__all__ = ["Prediction1Result", "run_prediction1", "row_activations", "lexical_category", "LEXICAL_CATEGORIES",
           "token_context"]

LABEL_STATISTICS = ("purity", "nmi", "ari")
_BOOTSTRAP_CELLS = 1 << 22  # resampled rows scored at once (a block of resamples: tens of MB of counts)
LEXICAL_CATEGORIES = ("special", "subword", "punctuation", "digit", "stopword", "capitalised", "word")


# --------------------------------------------------------------------------------------------------- labels
def lexical_category(token: str) -> str:
    """One of ``LEXICAL_CATEGORIES`` for a token string (WordPiece ``##`` and BPE ``Ġ``/``▁`` prefixes understood).

    Examples
    --------
    >>> [lexical_category(t) for t in ["[CLS]", "##ing", ",", "42", "the", "Paris", "bank"]]
    ['special', 'subword', 'punctuation', 'digit', 'stopword', 'capitalised', 'word']
    """
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    if len(token) > 2 and ((token[0], token[-1]) in (("[", "]"), ("<", ">"))):
        return "special"
    if token.startswith("##"):
        return "subword"
    word = token.lstrip("Ġ▁ ")
    if not word or not any(ch.isalnum() for ch in word):
        return "punctuation"
    if word.isdigit():
        return "digit"
    if word.lower() in ENGLISH_STOP_WORDS:
        return "stopword"
    if word[0].isupper():
        return "capitalised"
    return "word"


def token_context(tokens: list[str], pos: int, *, width: int = 6) -> str:
    """``tokens[pos]`` in context, marked ``[[...]]``, WordPieces joined, ``…`` where the window was cut.

    Examples
    --------
    >>> token_context(["[CLS]", "the", "river", "bank", "was", "mud", "##dy", "[SEP]"], 3, width=2)
    '… the river [[bank]] was mud …'
    """
    lo, hi = max(0, pos - width), min(len(tokens), pos + width + 1)
    words: list[str] = []
    for i in range(lo, hi):
        tok = tokens[i]
        shown = f"[[{tok}]]" if i == pos else tok
        if tok.startswith("##") and words:
            words[-1] += shown.replace("##", "", 1)
        else:  # a word piece that opens the window loses its "##" too
            words.append(shown.replace("##", "", 1).replace("Ġ", "").replace("▁", ""))
    return ("… " if lo > 0 else "") + " ".join(words) + (" …" if hi < len(tokens) else "")


# ---------------------------------------------------------------------------------------------- activations
def row_activations(bundle, source, sites: list[str], selection, *, batch_size: int = 32, max_length: int = 256):
    """Unit inputs of ``sites`` for the rows ``selection`` picks, batch by batch as ``extract_codes`` does.

    Returns
    -------
    activations : ndarray float32 (rows, sum of units)
        Sites side by side, in the order of ``sites``.
    rows : ndarray int64 (rows, 2)
        [example index, token position or -1], as ``SplineCodes.rows``.
    tokens : list of list of str or None
        Token strings of every example (text models).
    """
    from ..models import ModelInputs

    wanted = list(sites)
    parts: list[np.ndarray] = []
    all_rows, tokens = [], ([] if bundle.modality == "text" else None)
    for start in range(0, len(source), batch_size):
        idx = np.arange(start, min(start + batch_size, len(source)))
        inputs = bundle.encode(source, idx, max_length=max_length)
        mask = None if inputs.attention_mask is None else inputs.attention_mask.bool()
        rows = selection.rows(len(idx), mask)
        got: dict[str, torch.Tensor] = {}

        def handler(site, z):
            if site.name in wanted and site.name not in got:
                got[site.name] = selection.apply(site, z, rows).reshape(len(rows), -1).float().cpu()
                if len(got) == len(wanted):
                    raise StopForward
            return None

        run(bundle.module, lambda: bundle.forward(ModelInputs(inputs.tensors)), handler)
        missing = [s for s in wanted if s not in got]
        if missing:
            raise InvalidInputError(f"Sites {missing} did not run on items {start}..{idx[-1]}; their activations "
                                    "cannot be matched to the codes.")
        parts.append(torch.cat([got[s] for s in wanted], dim=1).numpy())
        all_rows.append(rows + np.array([start, 0]))
        if tokens is not None:
            tokens.extend(inputs.tokens)
    return np.concatenate(parts), np.concatenate(all_rows), tokens


# --------------------------------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False)
class Prediction1Result:
    """Outcome of ``run_prediction1``.

    Attributes
    ----------
    model, data : str
        Specs of the model and the data.
    entries : tuple of dict
        ``{model, statistic, value, baseline, ci, verdict}`` per statistic; ``value`` is the code clustering's score,
        ``baseline`` the activation clustering's, ``ci`` the interval of their difference.
    primary : str
        The statistic whose verdict is ``verdict``.
    verdict : {"holds", "does not hold", "inconclusive"}
    code_clusters, baseline_clusters : tuple of dict
        Dashboard data per cluster, largest first: size, majority label and share, defining code bits, member rows,
        and ``items`` (indices into the loaded data, for image grids) or ``contexts`` (tokens marked ``[[...]]``).
    code_labels, baseline_labels : ndarray int64 (rows,)
        Cluster of each row (``NOISE`` = -1).
    labels : dict of str to ndarray (rows,)
        The label sets scored against ("class"; or "token" and "category").
    rows : ndarray int64 (rows, 2)
        [item index, token position or -1].
    settings : dict
        Every parameter that produced this result, JSON-safe.
    """

    model: str
    data: str
    entries: tuple
    primary: str
    verdict: str
    code_clustering: dict
    baseline_clustering: dict
    code_clusters: tuple
    baseline_clusters: tuple
    code_labels: np.ndarray = field(repr=False)
    baseline_labels: np.ndarray = field(repr=False)
    labels: dict = field(repr=False)
    rows: np.ndarray = field(repr=False)
    exact: bool = True
    settings: dict = field(default_factory=dict)

    def entry(self, statistic: str) -> dict:
        """The entry of one statistic (e.g. ``"nmi[class]"``)."""
        return find_entry(self.entries, statistic)

    def to_dict(self) -> dict:
        """JSON-safe: ``entries`` (the report's rows), the verdict, both clusterings and the dashboard data."""
        return {"model": self.model, "data": self.data, "prediction": 1, "primary": self.primary,
                "verdict": self.verdict, "exact": self.exact, "n_rows": int(len(self.rows)),
                "entries": [dict(e) for e in self.entries], "code_clustering": self.code_clustering,
                "baseline_clustering": self.baseline_clustering, "code_clusters": list(self.code_clusters),
                "baseline_clusters": list(self.baseline_clusters), "settings": self.settings}

    def plot(self, source=None, *, which: str = "code", max_clusters: int = 8, per_cluster: int = 8, ax=None,
             detached: bool = False):
        """Without ``source``: the entries with their intervals (on ``ax`` when given). With ``source``, the loaded
        data (``load_data(data, limit=n_items, seed=seed)``): an image grid, one row per cluster (largest first, most
        confident members). ``detached``: drawn outside pyplot (for files and reports).

        Returns the Axes (the grid's: an array, clusters x per_cluster; ``.flat[0].figure`` is the Figure).
        """
        from ..report.figures import cluster_grid, entries_figure

        if which not in ("code", "baseline"):
            raise InvalidInputError(f"The 'which' parameter of plot must be 'code' or 'baseline'. Got {which!r}.")
        if source is None:
            return entries_figure(list(self.entries), f"Prediction 1 on {self.model}: codes - activations", ax,
                                  level=self.settings.get("level", 0.95), detached=detached)
        clusters = [c for c in (self.code_clusters if which == "code" else self.baseline_clusters)
                    if "items" in c][:max_clusters]
        if not clusters:
            why = (self.settings.get("degenerate") or "the clusters hold no image items (a text model?)")
            raise InvalidInputError(f"No image clusters to draw: {why}.")
        return cluster_grid(clusters, source.items, per_cluster, detached=detached)

    def _repr_html_(self) -> str:
        from ..report.html import entries_table, summary_html

        noise = self.code_clustering.get("noise_fraction")
        return summary_html(f"Prediction 1 on {self.model} / {self.data}: {self.verdict} ({self.primary})",
                            {"rows": len(self.rows), "exact codes": self.exact,
                             "code clusters": self.code_clustering.get("n_clusters_found"),
                             "code rows called noise": "—" if noise is None else f"{noise:.0%} (noise policy: "
                                                       f"{self.settings.get('noise', '—')})",
                             "activation clusters": self.baseline_clustering.get("n_clusters_found")},
                            entries_table([dict(e, data=self.data) for e in self.entries],
                                          self.settings.get("level", 0.95)))


# ------------------------------------------------------------------------------------------------------ run
def run_prediction1(model, data, *, layers=None, units: str = "auto", n_items: int = 1000, seed: int = 0,
                    metric: str = "hamming", method: str = "hdbscan", min_cluster_size: int = 10,
                    min_samples: int | None = None, n_clusters: int | None = None, baseline_metric: str = "euclidean",
                    baseline_method: str = "kmeans",
                    noise: str = "cluster", n_boot: int = 1000, level: float = 0.95, n_stability: int = 20,
                    fraction: float = 0.8, primary: str | None = None, k: int = 6, skip: int = 100,
                    position=(0.5, 0.5), batch_size: int = 32, max_length: int = 256, top_k: int = 10,
                    n_examples: int = 16) -> Prediction1Result:
    """Cluster spline codes and activations of the same rows, and test whether the code clusters are more monosemantic.

    Parameters
    ----------
    model : str or ModelBundle
        ``"digits-cnn"``, ``"fashion-cnn"``, ``"efficientnet-lite0"``, ``"minilm"`` ... (see ``models.load_model``).
    data : str or DataSource
        ``"digits"``, ``"fashion-mnist"``, ``"pydoc"`` ... A DataSource is cut to its first ``n_items``.
    layers : str or list of str, optional
        Site globs; the codes (and activations) of all matched sites are concatenated. None = every site fitting
        ``units``.
    units : {"auto", "all", "position", "tokens", "all-tokens"}
        What a row is; ``auto`` = the token protocol (k, skip) for text models, all units otherwise.
    n_items, seed : int
        Items to load and the seed of the stratified sample, of k-means and of the resampling.
    metric, method, min_cluster_size, min_samples, n_clusters
        The code clustering (``CodeClusterer``); ``n_clusters`` only for ``kmeans``/``agglomerative``.
    baseline_metric, baseline_method
        The activation clustering (``ActivationClusterer``); non-HDBSCAN baselines get ``n_clusters`` = the code
        clustering's count (at least 2).
    noise : {"cluster", "exclude", "singleton"}
        Noise policy of every score (see ``cluster``).
    n_boot, level : int, float
        Bootstrap resamples and interval level for the label scores.
    n_stability, fraction : int, float
        Subsample rounds and size for the stability statistic (0 rounds: no stability entry).
    primary : str, optional
        Statistic whose verdict is the overall verdict; default ``nmi`` of the first label set (or ``stability``
        when the data have no labels).
    k, skip, position, batch_size, max_length
        Unit selection and batching, as in ``extract_codes``.
    top_k, n_examples : int
        Defining code bits and examples (image items / text contexts) kept per cluster for the dashboard.

    Returns
    -------
    Prediction1Result

    Raises
    ------
    InvalidInputError
        Bad parameters, too few rows, activation rows that do not line up with the code rows.

    Examples
    --------
    >>> res = run_prediction1("digits-cnn", "digits", layers="head.2.relu", n_items=300)   # doctest: +SKIP
    >>> res.entry("nmi[class]")["verdict"]              # codes 0.17 vs activations 0.83   # doctest: +SKIP
    'does not hold'
    """
    from ..data import load_data
    from ..models import as_bundle

    for pname, value, choices in (("noise", noise, NOISE_POLICIES), ("metric", metric, CODE_METRICS),
                                  ("method", method, METHODS), ("baseline_metric", baseline_metric, ACTIVATION_METRICS),
                                  ("baseline_method", baseline_method, METHODS)):
        if value not in choices:  # checked before the (possibly long) extraction
            raise InvalidInputError(f"The {pname!r} parameter of run_prediction1 must be one of "
                                    f"{', '.join(map(repr, choices))}. Got {value!r} instead.")
    if not is_int(n_items) or n_items < 2:
        raise InvalidInputError(f"The 'n_items' parameter of run_prediction1 must be an int >= 2. Got {n_items!r}.")
    seed = check_seed(seed, 'run_prediction1')
    bundle = as_bundle(model, 'run_prediction1')
    source = load_data(data, limit=n_items, seed=seed) if isinstance(data, str) else data.subset(slice(0, n_items))
    selection = UnitSelection(default_units(bundle) if units in (None, "auto") else units,
                              position=position, k=k, skip=skip)
    codes = extract_codes(bundle, source, layers=layers, units=selection.kind, k=k, skip=skip, position=position,
                          batch_size=batch_size, max_length=max_length)
    sites = list(codes.layers)
    acts, rows, tokens = row_activations(bundle, source, sites, selection, batch_size=batch_size,
                                         max_length=max_length)
    if rows.shape != codes.rows.shape or not np.array_equal(rows, codes.rows):
        raise InvalidInputError("The activation rows do not line up with the code rows; the model's batching or "
                                "padding changed between the two passes.")
    n = len(rows)
    if n < 2:
        raise InvalidInputError(f"Only {n} row was selected; prediction 1 needs at least 2 (raise n_items).")
    labels = _label_sets(source, rows, tokens)

    packed = codes.concat()
    coder = CodeClusterer(metric=metric, method=method, min_cluster_size=min_cluster_size, min_samples=min_samples,
                          n_clusters=n_clusters, random_state=seed)
    coder.fit(packed)
    k_match = max(2, coder.n_clusters_)
    base = ActivationClusterer(metric=baseline_metric, method=baseline_method, min_cluster_size=min_cluster_size,
                               min_samples=min_samples, n_clusters=None if baseline_method == "hdbscan" else k_match,
                               random_state=seed)
    base.fit(acts)
    a, b = coder.labels_, base.labels_
    # a clustering of fewer than 2 clusters (HDBSCAN calling every row noise) separates nothing: its scores are those
    # of a constant labelling (a subsample "stability" of 1), so no verdict is drawn from them
    degenerate = "; ".join(f"the {what} clustering found {est.n_clusters_} cluster{'s' * (est.n_clusters_ != 1)}"
                           for what, est in (("code", coder), ("activation", base)) if est.n_clusters_ < 2) or None
    if degenerate:
        degenerate += " (fewer than 2: lower min_cluster_size or raise n_items); every verdict is inconclusive"

    entries = []
    name = getattr(bundle, "spec", str(model))
    # "exclude" is paired: both clusterings are scored on the rows that neither calls noise
    keep = (a != NOISE) & (b != NOISE) if noise == "exclude" else np.ones(n, dtype=bool)
    ea, eb, policy = a[keep], b[keep], ("cluster" if noise == "exclude" else noise)
    # several rows per example (a passage's token rows, which are correlated): whole examples are resampled
    example = rows[keep, 0]
    grouped = len(np.unique(example)) < len(example)
    boot = "paired percentile bootstrap over " + ("examples (all their rows)" if grouped else "rows")
    if labels and not keep.any():  # "exclude" with every row noise in one clustering or the other: nothing to score
        for key in labels:
            for s in LABEL_STATISTICS:
                entries.append(_entry(name, f"{s}[{key}]", float("nan"), float("nan"), (float("nan"), float("nan")),
                                      0, boot, degenerate))
    elif labels:
        y_int = {key: np.unique(y, return_inverse=True)[1][keep] for key, y in labels.items()}

        def stat(idx):  # a block of resamples (resamples x rows) at once
            out = {}
            for key, y in y_int.items():
                sa = resampled_clustering_scores(y, ea, idx, noise=policy)
                sb = resampled_clustering_scores(y, eb, idx, noise=policy)
                out.update({f"{s}[{key}]": sa[s] - sb[s] for s in LABEL_STATISTICS})
            return out

        diffs = paired_bootstrap(stat, int(keep.sum()), n_boot=n_boot, random_state=seed,
                                 block=max(1, _BOOTSTRAP_CELLS // max(1, int(keep.sum()))),
                                 groups=example if grouped else None)
        for key, y in y_int.items():
            sa, sb = clustering_scores(y, ea, noise=policy), clustering_scores(y, eb, noise=policy)
            for s in LABEL_STATISTICS:
                ci = percentile_ci(diffs[f"{s}[{key}]"], level)
                entries.append(_entry(name, f"{s}[{key}]", sa[s], sb[s], ci, int(keep.sum()), boot, degenerate))
    if n_stability:
        idx = subsample_indices(n, n_rounds=n_stability, fraction=fraction, random_state=seed)
        st_a = stability(coder, packed, indices=idx, noise=noise)
        st_b = stability(base, acts, indices=idx, noise=noise)
        def mean(v):  # NaN where no round could be scored (every row noise under "exclude"), without a warning
            v = np.asarray(v, dtype=float)
            return float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")

        entries.append(_entry(name, "stability", mean(st_a), mean(st_b),
                              percentile_ci(st_a - st_b, level), n_stability,
                              "spread of the paired per-round differences (not an interval of the mean)", degenerate))
    if not entries:
        raise InvalidInputError("The data have no labels and n_stability is 0, so there is nothing to compare.")
    known = [e["statistic"] for e in entries]
    primary = primary or (f"nmi[{next(iter(labels))}]" if labels else "stability")
    if primary not in known:
        raise InvalidInputError(f"The 'primary' parameter of run_prediction1 must be one of {', '.join(known)}. "
                                f"Got {primary!r} instead.")
    overall = next(e["verdict"] for e in entries if e["statistic"] == primary)

    first = next(iter(labels.values())) if labels else None
    dash = dict(rows=rows, tokens=tokens, codes=codes, y=first, probabilities=None, top_k=top_k,
                n_examples=n_examples)
    settings = {"layers": sites, "selection": codes.selection, "n_items": len(source), "seed": seed, "noise": noise,
                "coverage": float(keep.mean()), "n_boot": n_boot, "level": level, "n_stability": n_stability,
                "fraction": fraction,
                "batch_size": batch_size, "max_length": max_length, "activations": "unit inputs (pre-activation)",
                "n_units": int(acts.shape[1]), "n_code_bits": int(sum(lc.n_units * lc.bits_per_unit
                                                                      for lc in codes.layers.values())),
                "label_sets": list(labels), "degenerate": degenerate}
    return Prediction1Result(
        model=name, data=getattr(source, "spec", str(data)), entries=tuple(entries), primary=primary, verdict=overall,
        code_clustering={**_describe(coder), "scores": _scores(labels, a, noise)},
        baseline_clustering={**_describe(base), "scores": _scores(labels, b, noise)},
        code_clusters=_dashboard(a, {**dash, "probabilities": coder.probabilities_}),
        baseline_clusters=_dashboard(b, dash),
        code_labels=a, baseline_labels=b, labels=labels, rows=rows, exact=codes.exact, settings=settings)


# ---------------------------------------------------------------------------------------------------- parts
def _entry(model: str, statistic: str, value: float, baseline: float, ci: tuple, n: int, ci_method: str,
           degenerate: str | None) -> dict:
    """One report row; ``n``: rows scored (label statistics) or rounds (stability); ``degenerate``: why no verdict
    can be drawn (then "inconclusive")."""
    entry = {"model": model, "statistic": statistic, "value": float(value), "baseline": float(baseline),
             "ci": [float(ci[0]), float(ci[1])], "n": int(n), "ci_method": ci_method,
             "verdict": "inconclusive" if degenerate else verdict(value, baseline, ci)}
    return {**entry, "degenerate": degenerate} if degenerate else entry


def _label_sets(source, rows: np.ndarray, tokens) -> dict[str, np.ndarray]:
    if tokens is not None:
        tok = np.array([tokens[i][p] for i, p in rows], dtype=object)
        return {"token": tok.astype(str), "category": np.array([lexical_category(t) for t in tok])}
    if getattr(source, "labels", None) is None:
        return {}
    y = np.asarray(source.labels)[rows[:, 0]]
    names = getattr(source, "label_names", None)
    return {"class": np.array([names[v] for v in y]) if names else y}


def _scores(labels: dict, pred: np.ndarray, noise: str) -> dict:
    return {key: clustering_scores(np.unique(y, return_inverse=True)[1], pred, noise=noise)
            for key, y in labels.items()}


def _describe(est) -> dict:
    params = {k: v for k, v in est.get_params().items() if isinstance(v, (str, int, float, type(None)))}
    return {"estimator": type(est).__name__, **params, "n_clusters_found": est.n_clusters_,
            "noise_fraction": est.noise_fraction_}


def _dashboard(labels: np.ndarray, d: dict) -> tuple:
    rows, tokens, y = d["rows"], d["tokens"], d["y"]
    summary = cluster_summary(labels, d["codes"], y=y, top_k=d["top_k"])
    prob = d["probabilities"]
    out = []
    for info in summary.clusters:
        members = np.asarray(info.members)
        if prob is not None:  # most confident members first
            members = members[np.argsort(-prob[members], kind="stable")]
        shown = members[: d["n_examples"]]
        entry = {"cluster": info.cluster, "size": info.size, "majority": info.majority,
                 "majority_share": info.majority_share, "units": list(info.units), "n_constant": info.n_constant,
                 "members": [int(i) for i in members]}
        if tokens is None:
            entry["items"] = [int(rows[i, 0]) for i in shown]
        else:
            entry["contexts"] = [token_context(tokens[rows[i, 0]], int(rows[i, 1])) for i in shown]
            entry["top_tokens"] = Counter(tokens[rows[i, 0]][rows[i, 1]] for i in members).most_common(10)
        out.append(entry)
    if (labels == NOISE).any():
        out.append({"cluster": NOISE, "size": int((labels == NOISE).sum()), "noise": True})
    return tuple(out)
