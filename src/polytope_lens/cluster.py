"""Clustering spline codes and, as the baseline, continuous activations; scores against labels; cluster summaries.

Estimators follow the scikit-learn contract: keyword-only ``__init__`` that only stores its arguments, ``fit(X)``
returns ``self``, learned state ends in ``_`` (``labels_``, ``n_clusters_``, ``noise_fraction_``).

* ``CodeClusterer`` clusters packed uint8 codes (rows of ``SplineCodes.concat()``) under the Hamming or Jaccard
  distance of ``codes.hamming`` / ``codes.jaccard``. ``method="hdbscan"`` (the paper's choice, §4.2) and
  ``"agglomerative"`` (average linkage, a k-medoids-free way to ask for exactly ``n_clusters``) build the dense
  ``rows x rows`` float64 distance matrix chunk by chunk, so they refuse more than ``max_rows`` rows (default 10 000,
  ~0.8 GB); ``"kmeans"`` (Hamming only) runs k-means on the unpacked bits, where squared Euclidean distance equals
  Hamming distance, and scales to any row count.
* ``ActivationClusterer`` clusters float activations with Euclidean or cosine distance (HDBSCAN, k-means or
  agglomerative). Cosine k-means is k-means on L2-normalised rows (spherical k-means, approximately).

Noise policy
------------
HDBSCAN labels unclustered rows ``NOISE`` (-1). Every score here takes ``noise=``:

* ``"cluster"`` (default): noise rows form one more cluster. Conservative: a method cannot look better by
  declaring hard rows noise, and every row is scored.
* ``"exclude"``: rows labelled noise are dropped before scoring (``coverage`` says how many were kept).
* ``"singleton"``: each noise row is its own cluster (inflates purity; reported for completeness).

Label-free consistency
----------------------
``stability`` is subsample stability (Ben-Hur et al., 2002): refit on ``fraction`` of the rows drawn without
replacement (no duplicates, which would give HDBSCAN zero distances) and measure the ARI between the refit labels and
the full-data labels on those rows. 1 = the partition is reproduced exactly; ~0 = no better than chance. Passing the
same ``indices`` to two estimators pairs their rounds.

Length: ~575 lines, past the ~500 guide, because estimators, scores and summaries share one validation layer and
one noise policy; split the summaries out if the module grows further.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .codes import LayerCodes, SplineCodes, hamming, jaccard
from .errors import InvalidInputError, MissingDependencyError, is_int, is_real

try:
    from sklearn.base import BaseEstimator, ClusterMixin, clone
    from sklearn.cluster import HDBSCAN, AgglomerativeClustering, KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
except ImportError:  # pragma: no cover - scikit-learn ships with the models extra
    raise MissingDependencyError(
        "Clustering needs scikit-learn; install it with pip install 'polytope-lens[models]'.") from None

__all__ = [
    "NOISE", "NOISE_POLICIES", "CodeClusterer", "ActivationClusterer", "purity", "clustering_scores",
    "subsample_indices", "stability", "ClusterInfo", "ClusterSummary", "cluster_summary", "bit_names",
]

NOISE = -1
"""Label of rows HDBSCAN leaves unclustered."""

NOISE_POLICIES = ("cluster", "exclude", "singleton")
CODE_METRICS = ("hamming", "jaccard")
ACTIVATION_METRICS = ("euclidean", "cosine")
METHODS = ("hdbscan", "kmeans", "agglomerative")


# ------------------------------------------------------------------------------------------------ validation
def _one_of(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise InvalidInputError(
            f"The {name!r} parameter of {owner} must be one of {', '.join(map(repr, choices))}. Got {value!r} instead.")


def _int_at_least(owner: str, name: str, value, low: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not is_int(value) or value < low:
        raise InvalidInputError(
            f"The {name!r} parameter of {owner} must be an int >= {low}{' or None' if optional else ''}. "
            f"Got {value!r} instead.")


def _epsilon_at_least_zero(owner: str, value) -> None:
    if not is_real(value) or not value >= 0:  # NaN fails >= 0
        raise InvalidInputError(f"The 'cluster_selection_epsilon' parameter of {owner} must be a float >= 0. "
                                f"Got {value!r} instead.")


def _as_packed(X, owner: str) -> np.ndarray:
    """Packed codes (rows, n_bytes) uint8 from a SplineCodes, LayerCodes or array."""
    if isinstance(X, SplineCodes):
        X = X.concat()
    elif isinstance(X, LayerCodes):
        X = X.packed
    X = np.asarray(X)
    if X.dtype != np.uint8 or X.ndim != 2:
        raise InvalidInputError(
            f"{owner} needs packed codes, a 2-D uint8 array (rows, bytes); got dtype {X.dtype} and shape {X.shape}. "
            "Use SplineCodes.concat() or LayerCodes.packed.")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise InvalidInputError(f"{owner} got empty codes of shape {X.shape}; give at least 2 rows of at least 1 byte.")
    return np.ascontiguousarray(X)


def _as_activations(X, owner: str) -> np.ndarray:
    X = np.asarray(X.detach().cpu() if hasattr(X, "detach") else X)
    if X.ndim != 2 or not np.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
        raise InvalidInputError(f"{owner} needs a 2-D real numeric array (rows, units); got dtype {X.dtype} and "
                                f"shape {X.shape}.")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise InvalidInputError(f"{owner} got empty activations of shape {X.shape}; give at least 2 rows.")
    X = X.astype(np.float64)
    if not np.isfinite(X.sum()) and not np.isfinite(X).all():
        raise InvalidInputError(f"{owner} got {int((~np.isfinite(X)).sum())} NaN or infinite activations; remove "
                                "those rows first.")
    return X


def _check_labels(labels_true, labels_pred, what: str) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(labels_true).ravel(), np.asarray(labels_pred).ravel()
    if len(t) != len(p):
        raise InvalidInputError(f"{what} needs as many labels as cluster labels; got {len(t)} labels and {len(p)} "
                                "cluster labels.")
    if len(t) == 0:
        raise InvalidInputError(f"{what} got no rows; give at least one labelled row.")
    return t, p


# ------------------------------------------------------------------------------------------------ estimators
class _Clusterer(ClusterMixin, BaseEstimator):
    """Shared fitting of a precomputed matrix / feature matrix; subclasses choose the metric and the features."""

    _owner = "Clusterer"
    _metrics: tuple = ()
    _methods: tuple = METHODS

    def _validate(self, n: int) -> None:
        owner = self._owner
        _one_of(owner, "metric", self.metric, self._metrics)
        _one_of(owner, "method", self.method, self._methods)
        _int_at_least(owner, "min_cluster_size", self.min_cluster_size, 2)
        _int_at_least(owner, "min_samples", self.min_samples, 1, optional=True)
        _int_at_least(owner, "n_clusters", self.n_clusters, 1, optional=True)
        _int_at_least(owner, "max_rows", self.max_rows, 2)
        _int_at_least(owner, "n_init", self.n_init, 1)
        _epsilon_at_least_zero(owner, self.cluster_selection_epsilon)
        if n < 2:
            raise InvalidInputError(f"{owner} needs at least 2 rows to cluster; got {n}.")
        if self.method not in ("hdbscan", "scalable"):
            if self.n_clusters is None:
                raise InvalidInputError(f"The 'n_clusters' parameter of {owner} is required with method="
                                        f"{self.method!r}; give the number of clusters (e.g. the HDBSCAN count).")
            if self.n_clusters > n:
                raise InvalidInputError(f"The 'n_clusters' parameter of {owner} ({self.n_clusters}) must be at most "
                                        f"the number of rows ({n}).")
        if self.min_samples is not None and self.min_samples > n:
            raise InvalidInputError(f"The 'min_samples' parameter of {owner} ({self.min_samples}) must be at most the "
                                    f"number of rows ({n}).")
        if self.method in ("hdbscan", "scalable") and self.min_samples is None and self.min_cluster_size > n:
            raise InvalidInputError(f"The 'min_cluster_size' parameter of {owner} ({self.min_cluster_size}) must be at "
                                    f"most the number of rows ({n}; HDBSCAN's min_samples defaults to it).")

    def _check_dense(self, n: int, why: str) -> None:
        if n > self.max_rows:
            gb = n * n * 8 / 1e9
            raise InvalidInputError(
                f"{self._owner} with method={self.method!r} and metric={self.metric!r} builds a dense {n} x {n} "
                f"distance matrix ({gb:.1f} GB), above max_rows={self.max_rows}; {why}")

    def _hdbscan(self, data: np.ndarray, metric: str, copy: bool) -> None:
        est = HDBSCAN(min_cluster_size=self.min_cluster_size, min_samples=self.min_samples, metric=metric, copy=copy)
        est.fit(data)
        labels, probabilities = est.labels_, est.probabilities_
        if self.cluster_selection_epsilon > 0:  # sklearn <= 1.9.1 raises on it under NumPy >= 2.4: see _tree_labels
            from .cluster_scale import _tree_labels

            labels, probabilities = _tree_labels(est._single_linkage_tree_, self.min_cluster_size, False,
                                                 float(self.cluster_selection_epsilon))
        self.labels_, self.probabilities_ = np.asarray(labels, dtype=np.int64), np.asarray(probabilities)

    def _fit_precomputed(self, D: np.ndarray) -> None:
        if self.method == "hdbscan":
            self._hdbscan(D, "precomputed", copy=False)
        else:
            est = AgglomerativeClustering(n_clusters=self.n_clusters, metric="precomputed", linkage="average")
            self.labels_ = est.fit(D).labels_.astype(np.int64)
            self.probabilities_ = np.ones(len(D))

    def _fit_features(self, F: np.ndarray, metric: str) -> None:
        if self.method == "hdbscan":
            self._hdbscan(F, metric, copy=True)
        elif self.method == "kmeans":
            est = KMeans(n_clusters=self.n_clusters, n_init=self.n_init, random_state=self.random_state)
            self.labels_ = est.fit(F).labels_.astype(np.int64)
            self.probabilities_ = np.ones(len(F))
        else:
            linkage = "ward" if metric == "euclidean" else "average"
            est = AgglomerativeClustering(n_clusters=self.n_clusters, metric=metric, linkage=linkage)
            self.labels_ = est.fit(F).labels_.astype(np.int64)
            self.probabilities_ = np.ones(len(F))

    def _finish(self) -> "_Clusterer":
        found = np.unique(self.labels_)
        self.n_clusters_ = int((found != NOISE).sum())
        self.noise_fraction_ = float(np.mean(self.labels_ == NOISE))
        return self


class CodeClusterer(_Clusterer):
    """Cluster packed spline codes under the Hamming or Jaccard distance.

    Parameters
    ----------
    metric : {"hamming", "jaccard"}
        Distance between codes (``codes.hamming`` counts kinks separating two codes; ``codes.jaccard`` compares the
        sets of set bits, i.e. active units for ReLU).
    method : {"hdbscan", "kmeans", "agglomerative", "scalable"}
        HDBSCAN over the precomputed distance matrix; k-means on the unpacked bits (Hamming only: squared Euclidean
        distance between 0/1 vectors is the Hamming distance); average-linkage agglomerative clustering over the
        precomputed matrix (both metrics); ``"scalable"``: HDBSCAN through a faiss kNN graph
        (``cluster_scale.ScalableCodeClusterer`` with its defaults, no row cap; for its own options use it
        directly). It is never chosen for you: exact HDBSCAN does not silently turn into the kNN-graph version.
    min_cluster_size, min_samples, cluster_selection_epsilon
        HDBSCAN's parameters. A selected cluster born below distance ``cluster_selection_epsilon`` gives way to its
        nearest ancestor born above it (at most a child of the root), as in sklearn, whose own step raises under
        NumPy >= 2.4 (``cluster_scale._tree_labels`` does it).
    n_clusters : int, optional
        Clusters to find; required by ``kmeans`` and ``agglomerative``.
    max_rows : int
        Most rows for the dense-matrix methods (``hdbscan``, ``agglomerative``); memory is 8 * rows^2 bytes.
    memory_bytes : int
        Working memory per chunk while computing distances.
    n_init, random_state
        k-means restarts and seed.

    Attributes
    ----------
    labels_ : ndarray of int64 (rows,)
        Cluster of each row; ``NOISE`` (-1) for rows HDBSCAN leaves unclustered.
    probabilities_ : ndarray of float (rows,)
        HDBSCAN membership strength (1 for the other methods).
    n_clusters_ : int
        Clusters found, noise not counted.
    noise_fraction_ : float
        Fraction of rows labelled ``NOISE``.

    Examples
    --------
    >>> X = np.repeat(np.array([[0x00, 0x00], [0xFF, 0xFF]], dtype=np.uint8), 10, axis=0)   # (20 rows, 2 bytes)
    >>> CodeClusterer(min_cluster_size=5).fit(X).n_clusters_
    2
    """

    _owner = "CodeClusterer"
    _metrics = CODE_METRICS
    _methods = METHODS + ("scalable",)

    def __init__(self, *, metric: str = "hamming", method: str = "hdbscan", min_cluster_size: int = 5,
                 min_samples: int | None = None, cluster_selection_epsilon: float = 0.0, n_clusters: int | None = None,
                 max_rows: int = 10_000, memory_bytes: int = 256 << 20, n_init: int = 4, random_state: int = 0):
        self.metric = metric
        self.method = method
        self.min_cluster_size = min_cluster_size
        self.min_samples = min_samples
        self.cluster_selection_epsilon = cluster_selection_epsilon
        self.n_clusters = n_clusters
        self.max_rows = max_rows
        self.memory_bytes = memory_bytes
        self.n_init = n_init
        self.random_state = random_state

    def fit(self, X, y=None) -> "CodeClusterer":
        """Cluster the rows of ``X`` (packed uint8 codes (rows, bytes), a ``SplineCodes`` or a ``LayerCodes``)."""
        X = _as_packed(X, self._owner)
        self._validate(len(X))
        if self.method == "kmeans":
            if self.metric != "hamming":
                raise InvalidInputError(
                    f"CodeClusterer's k-means works under the Hamming distance only; got metric={self.metric!r}. Use "
                    "method='agglomerative' or 'hdbscan' for Jaccard.")
            bits = np.unpackbits(X, axis=1).astype(np.float32)
            self._fit_features(bits, "euclidean")
            return self._finish()
        if self.method == "scalable":
            from .cluster_scale import ScalableCodeClusterer

            est = ScalableCodeClusterer(metric=self.metric, min_cluster_size=self.min_cluster_size,
                                        min_samples=self.min_samples,
                                        cluster_selection_epsilon=self.cluster_selection_epsilon,
                                        random_state=self.random_state).fit(X)
            self.labels_, self.probabilities_ = est.labels_, est.probabilities_
            return self._finish()
        self._check_dense(len(X), "subsample the rows, raise max_rows if memory allows, or use method='kmeans' "
                                  "or method='scalable' (HDBSCAN through a kNN graph).")
        distance = hamming if self.metric == "hamming" else jaccard
        self._fit_precomputed(distance(X, memory_bytes=self.memory_bytes))
        return self._finish()


class ActivationClusterer(_Clusterer):
    """Cluster continuous activations (the baseline of prediction 1) with Euclidean or cosine distance.

    Parameters are those of ``CodeClusterer`` except ``metric`` in {"euclidean", "cosine"}. HDBSCAN with Euclidean
    distance uses a tree and has no row cap; with cosine, HDBSCAN and (average-linkage) agglomerative clustering use
    the dense matrix (``max_rows`` applies), where an all-zero row (every ReLU off) is at distance 1 from every other
    row. k-means with cosine runs on L2-normalised rows (an all-zero row stays zero).

    Attributes
    ----------
    labels_, probabilities_, n_clusters_, noise_fraction_
        As in ``CodeClusterer``.
    """

    _owner = "ActivationClusterer"
    _metrics = ACTIVATION_METRICS

    def __init__(self, *, metric: str = "euclidean", method: str = "kmeans", min_cluster_size: int = 5,
                 min_samples: int | None = None, cluster_selection_epsilon: float = 0.0, n_clusters: int | None = None,
                 max_rows: int = 10_000, n_init: int = 4, random_state: int = 0):
        self.metric = metric
        self.method = method
        self.min_cluster_size = min_cluster_size
        self.min_samples = min_samples
        self.cluster_selection_epsilon = cluster_selection_epsilon
        self.n_clusters = n_clusters
        self.max_rows = max_rows
        self.n_init = n_init
        self.random_state = random_state

    def fit(self, X, y=None) -> "ActivationClusterer":
        """Cluster the rows of ``X`` (float activations, (rows, units))."""
        X = _as_activations(X, self._owner)
        self._validate(len(X))
        if self.metric == "cosine":
            if self.method != "kmeans":  # sklearn's cosine distance puts an all-zero row at 1 from every other row
                self._check_dense(len(X), "subsample the rows, raise max_rows, or use metric='euclidean'.")
                from sklearn.metrics import pairwise_distances

                self._fit_precomputed(np.maximum(pairwise_distances(X, metric="cosine"), 0.0))
                return self._finish()
            norm = np.linalg.norm(X, axis=1, keepdims=True)
            X = X / np.where(norm > 0, norm, 1.0)
        self._fit_features(X, self.metric)
        return self._finish()


# ---------------------------------------------------------------------------------------------------- scores
def _apply_noise(t: np.ndarray, p: np.ndarray, noise: str, owner: str) -> tuple[np.ndarray, np.ndarray]:
    _one_of(owner, "noise", noise, NOISE_POLICIES)
    is_noise = p == NOISE
    if noise == "exclude":
        return t[~is_noise], p[~is_noise]
    if noise == "singleton":
        return t, _singletons(p)
    return t, p


def _singletons(p: np.ndarray) -> np.ndarray:
    """Labels with every NOISE row given a cluster of its own."""
    is_noise = p == NOISE
    if not is_noise.any():
        return p
    p = p.copy()
    p[is_noise] = p.max(initial=0) + 1 + np.arange(int(is_noise.sum()))
    return p


def purity(labels_true, labels_pred, *, noise: str = "cluster") -> float:
    """Fraction of rows whose label is their cluster's most common label (1 = every cluster has one label).

    ``noise`` is the noise policy of the module docstring; NaN when ``"exclude"`` leaves no rows.

    Examples
    --------
    >>> purity([0, 0, 1, 1, 1], [0, 0, 0, 1, 1])   # cluster 0 = {0, 0, 1}: 2 of 3; cluster 1: 2 of 2
    0.8
    """
    t, p = _check_labels(labels_true, labels_pred, "purity")
    t, p = _apply_noise(t, p, noise, "purity")
    if len(t) == 0:
        return float("nan")
    _, t_idx = np.unique(t, return_inverse=True)
    _, p_idx = np.unique(p, return_inverse=True)
    table = np.zeros((p_idx.max() + 1, t_idx.max() + 1), dtype=np.int64)
    np.add.at(table, (p_idx, t_idx), 1)
    return float(table.max(axis=1).sum() / len(t))


def clustering_scores(labels_true, labels_pred, *, noise: str = "cluster") -> dict:
    """Purity, NMI and ARI of a clustering against labels, with coverage and cluster count.

    Returns
    -------
    dict
        ``purity``, ``nmi`` (arithmetic normalisation), ``ari``, ``coverage`` (fraction of rows scored: 1 unless
        ``noise="exclude"``), ``n_clusters`` (noise not counted), ``noise_fraction``.
    """
    t, p = _check_labels(labels_true, labels_pred, "clustering_scores")
    n_clusters = int(len(np.setdiff1d(np.unique(p), [NOISE])))
    noise_fraction = float(np.mean(p == NOISE))
    t2, p2 = _apply_noise(t, p, noise, "clustering_scores")
    out = {"purity": float("nan"), "nmi": float("nan"), "ari": float("nan"), "coverage": len(t2) / len(t),
           "n_clusters": n_clusters, "noise_fraction": noise_fraction}
    if len(t2):
        out.update(purity=purity(t2, p2, noise="cluster"), nmi=float(normalized_mutual_info_score(t2, p2)),
                   ari=float(adjusted_rand_score(t2, p2)))
    return out


def subsample_indices(n: int, *, n_rounds: int = 20, fraction: float = 0.8, random_state: int = 0) -> list[np.ndarray]:
    """``n_rounds`` sorted row subsets of size ``round(fraction * n)``, drawn without replacement, seeded."""
    _int_at_least("subsample_indices", "n_rounds", n_rounds, 1)
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"The 'fraction' parameter of subsample_indices must be in (0, 1). Got {fraction!r}.")
    m = max(2, int(round(fraction * n)))
    rng = np.random.default_rng(random_state)
    return [np.sort(rng.choice(n, size=min(m, n), replace=False)) for _ in range(n_rounds)]


def stability(estimator, X, *, indices: list[np.ndarray] | None = None, n_rounds: int = 20, fraction: float = 0.8,
              random_state: int = 0, noise: str = "cluster") -> np.ndarray:
    """Subsample stability: per round, the ARI between a refit on a subsample and the full-data labels there.

    Parameters
    ----------
    estimator : CodeClusterer or ActivationClusterer
        Fitted on ``X`` (its ``labels_`` are the reference) or unfitted (it is fitted on a clone first).
    X : array
        The rows the estimator clusters (those it was fitted on, if fitted).
    indices : list of int arrays, optional
        Subsamples to use (share them between estimators for paired rounds); default ``subsample_indices``.
    noise : {"cluster", "exclude", "singleton"}
        ``"exclude"`` drops rows that are noise in either labelling.

    Returns
    -------
    ndarray of float (rounds,)
    """
    _one_of("stability", "noise", noise, NOISE_POLICIES)
    if isinstance(X, (SplineCodes, LayerCodes)):
        X = _as_packed(X, "stability")
    X = np.asarray(X.detach().cpu() if hasattr(X, "detach") else X)
    if X.ndim == 0:
        raise InvalidInputError(f"stability needs rows to cluster; got a scalar of dtype {X.dtype}.")
    reference = getattr(estimator, "labels_", None)
    if reference is None:
        reference = clone(estimator).fit(X).labels_
    n = len(reference)
    if n != len(X):
        raise InvalidInputError(f"stability got an estimator fitted on {n} rows (its labels_) and X of {len(X)} rows; "
                                "pass the X it was fitted on, or an unfitted estimator.")
    if indices is None:
        indices = subsample_indices(n, n_rounds=n_rounds, fraction=fraction, random_state=random_state)
    indices = [np.asarray(idx) for idx in indices]
    for idx in indices:
        in_range = idx.size == 0 or (np.issubdtype(idx.dtype, np.integer) and 0 <= idx.min() and idx.max() < n)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or not in_range:
            raise InvalidInputError(f"The 'indices' parameter of stability must hold 1-D int arrays of row numbers in "
                                    f"[0, {n}). Got dtype {idx.dtype}, shape {idx.shape}.")
    scores = []
    for idx in indices:
        a, b = reference[idx], clone(estimator).fit(X[idx]).labels_
        if noise == "exclude":
            keep = (a != NOISE) & (b != NOISE)
            a, b = a[keep], b[keep]
        elif noise == "singleton":
            a, b = _singletons(a), _singletons(b)
        scores.append(float(adjusted_rand_score(a, b)) if len(a) else float("nan"))
    return np.asarray(scores)


# -------------------------------------------------------------------------------------------------- summaries
def bit_names(codes: SplineCodes | LayerCodes) -> tuple[np.ndarray, list[dict]]:
    """Columns of the unpacked code that carry information (padding dropped), and what each column means.

    Returns
    -------
    columns : ndarray of int64
        Positions in ``np.unpackbits(packed, bitorder="little")`` of the real bits, in packing order.
    names : list of dict
        Per column: ``site``, ``unit`` (flat index), ``index`` (multi-index in ``unit_shape``), ``bit`` (kink index
        for thermometer codes, bit of the piece index otherwise).
    """
    layers = [codes] if isinstance(codes, LayerCodes) else list(codes.layers.values())
    columns, names, offset = [], [], 0
    for lc in layers:
        bpu = lc.bits_per_unit
        n_bits = lc.n_units * bpu
        columns.append(offset + np.arange(n_bits))
        for j in range(bpu):  # planar: bit j of every unit, then bit j + 1
            for u in range(lc.n_units):
                index = [int(i) for i in np.unravel_index(u, lc.unit_shape)] if lc.unit_shape else [u]
                names.append({"site": lc.site, "unit": u, "index": index, "bit": j})
        offset += lc.packed.shape[1] * 8
    return np.concatenate(columns).astype(np.int64), names


@dataclass(frozen=True)
class ClusterInfo:
    """One cluster: its size, members and the code bits that set it apart.

    ``units`` lists the top-k bits by ``|p_in - p_out|`` (fraction of members with the bit set vs of the other rows);
    ``n_constant`` counts bits that are constant over the members (p_in of 0 or 1).
    """

    cluster: int
    size: int
    members: tuple[int, ...]
    units: tuple[dict, ...]
    n_constant: int
    majority: object = None
    majority_share: float | None = None

    def to_dict(self) -> dict:
        return {"cluster": self.cluster, "size": self.size, "members": list(self.members), "units": list(self.units),
                "n_constant": self.n_constant, "majority": self.majority, "majority_share": self.majority_share}


@dataclass(frozen=True)
class ClusterSummary:
    """Every non-noise cluster, largest first, with the noise count."""

    clusters: tuple[ClusterInfo, ...]
    n_rows: int
    n_noise: int
    n_bits: int
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"n_rows": self.n_rows, "n_noise": self.n_noise, "n_bits": self.n_bits,
                "clusters": [c.to_dict() for c in self.clusters], **self.meta}

    def _repr_html_(self) -> str:
        from .report.html import cluster_table, summary_html

        return summary_html(f"ClusterSummary: {len(self.clusters)} clusters of {self.n_rows} rows",
                            {"noise rows": self.n_noise, "code bits": self.n_bits},
                            cluster_table([c.to_dict() for c in self.clusters], n=20))


def cluster_summary(labels, codes, *, y=None, top_k: int = 10, max_members: int | None = None) -> ClusterSummary:
    """Per cluster: size, member rows and the defining code bits.

    Parameters
    ----------
    labels : array of int (rows,)
        Cluster labels (``NOISE`` rows are counted, not summarised).
    codes : SplineCodes, LayerCodes or uint8 array (rows, bytes)
        The codes of the same rows; with a ``SplineCodes``/``LayerCodes`` each bit is named by site and unit.
    y : array (rows,), optional
        Labels; adds each cluster's majority label and its share.
    top_k : int
        Defining bits kept per cluster.
    max_members : int, optional
        Keep at most this many member rows per cluster (the first ones).

    Returns
    -------
    ClusterSummary
    """
    _int_at_least("cluster_summary", "top_k", top_k, 1)
    _int_at_least("cluster_summary", "max_members", max_members, 1, optional=True)
    packed = _as_packed(codes, "cluster_summary")
    labels = np.asarray(labels).ravel()
    if len(labels) != len(packed):
        raise InvalidInputError(f"cluster_summary got {len(labels)} cluster labels for {len(packed)} code rows; they "
                                "must match.")
    if y is not None:
        _check_labels(y, labels, "cluster_summary")
        y = np.asarray(y).ravel()
    if isinstance(codes, (SplineCodes, LayerCodes)):
        columns, names = bit_names(codes)
    else:
        columns = np.arange(packed.shape[1] * 8)
        names = [{"site": None, "unit": int(c), "index": [int(c)], "bit": 0} for c in columns]
    ids, inverse = np.unique(labels, return_inverse=True)
    counts = _bits_per_label(packed, columns, inverse, len(ids))  # (labels, bits): members with the bit set
    total = counts.sum(0)
    order = np.argsort(inverse, kind="stable")  # rows grouped by label, in row order within each label
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(ids)))])
    sizes = np.diff(bounds)
    keep = np.flatnonzero(ids != NOISE)
    infos = []
    for j in keep[np.argsort(-sizes[keep], kind="stable")]:
        c, members = ids[j], order[bounds[j]:bounds[j + 1]]
        n_in, n_out = len(members), len(labels) - len(members)
        on_in = counts[j]
        p_in = on_in / n_in
        p_out = (total - on_in) / n_out if n_out else p_in
        score = np.abs(p_in - p_out)
        top = np.lexsort((np.arange(len(score)), -score))[:top_k]
        units = tuple({**names[t], "p_in": float(p_in[t]), "p_out": float(p_out[t])} for t in top)
        majority = share = None
        if y is not None:
            vals, cnt = np.unique(y[members], return_counts=True)
            majority, share = vals[np.argmax(cnt)], float(cnt.max() / n_in)
            majority = majority.item() if hasattr(majority, "item") else majority
        infos.append(ClusterInfo(int(c), n_in, tuple(int(i) for i in members[:max_members]), units,
                                 int(((p_in == 0) | (p_in == 1)).sum()), majority, share))
    return ClusterSummary(tuple(infos), len(labels), int((labels == NOISE).sum()), len(columns))


def _bits_per_label(packed: np.ndarray, columns: np.ndarray, inverse: np.ndarray, n_labels: int,
                    chunk_rows: int = 2048) -> np.ndarray:
    """(labels, columns) int64: per label, how many of its rows have each bit set; rows unpacked a chunk at a time."""
    from scipy.sparse import csr_matrix

    counts = np.zeros((n_labels, len(columns)), dtype=np.float64)
    for s in range(0, len(packed), chunk_rows):
        bits = np.unpackbits(packed[s:s + chunk_rows], axis=1, bitorder="little")[:, columns]
        m = len(bits)
        onehot = csr_matrix((np.ones(m), (inverse[s:s + m], np.arange(m))), shape=(n_labels, m))
        counts += onehot @ bits.astype(np.float32)
    return np.rint(counts).astype(np.int64)
