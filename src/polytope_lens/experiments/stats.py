"""Confidence intervals and the verdict rule shared by the prediction experiments.

Predictions 2 and 3 compare means of per-path (per-ray) values: ``mean_difference_ci`` gives Student's t interval of
the paired differences, or Welch's for two independent samples, whose coverage is exact for normal data at any n. A
percentile bootstrap was used before: at the small n of the report's runs (4 photos, 6 quick pairs) its 95 %
intervals were too narrow, and under a true null a tester counted a false verdict on each side in 10 % of samples at
n = 4 and 25 % at n = 2 (nominal 2.5 %). Prediction 1's clustering scores, over hundreds of items, keep the
percentile bootstrap (``paired_bootstrap``, ``percentile_ci``).

Verdict rule (``verdict``), on a score where larger is better and a CI of the difference (method - baseline):

* ``"holds"``: the method's score is higher and the whole CI is above 0;
* ``"does not hold"``: the baseline's score is higher and the whole CI is below 0;
* ``"inconclusive"``: anything else, including a CI that touches 0 or any NaN.

``resampled_clustering_scores`` is ``cluster.clustering_scores``' purity, NMI and ARI for a whole block of bootstrap
resamples at once: each resample's contingency table is a weighted count of the distinct (label, cluster) pairs, so
the scores of a thousand resamples take a few array operations instead of a thousand validated scikit-learn calls
each (the same formulas as scikit-learn's, tested against it resample by resample).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..errors import InvalidInputError, is_int

__all__ = ["VERDICTS", "verdict", "percentile_ci", "mean_difference_ci", "paired_bootstrap",
           "resampled_clustering_scores"]

VERDICTS = ("holds", "does not hold", "inconclusive")


def _check_level(level: float, owner: str) -> None:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise InvalidInputError(f"The 'level' parameter of {owner} must be a float in (0, 1). Got {level!r} instead.")


def verdict(value: float, baseline: float, ci: tuple[float, float]) -> str:
    """``"holds"``, ``"does not hold"`` or ``"inconclusive"`` from a score, its baseline and a CI of the difference.

    Examples
    --------
    >>> verdict(0.8, 0.6, (0.1, 0.3)), verdict(0.5, 0.6, (-0.2, -0.01)), verdict(0.8, 0.6, (-0.1, 0.4))
    ('holds', 'does not hold', 'inconclusive')
    >>> verdict(0.78, 0.75, (1e-16, 0.07))  # a lower bound of 0 up to rounding
    'inconclusive'
    """
    lo, hi = (float(c) for c in ci)
    nums = (float(value), float(baseline), lo, hi)
    if any(math.isnan(x) for x in nums):
        return "inconclusive"
    if lo > hi:
        raise InvalidInputError(f"A confidence interval needs lower <= upper. Got ({lo}, {hi}).")
    # a bound that is 0 up to rounding (a difference of means of equal values) does not exclude 0
    eps = 1e-12 * max(1.0, abs(float(value)), abs(float(baseline)))
    if value > baseline and lo > eps:
        return "holds"
    if value < baseline and hi < -eps:
        return "does not hold"
    return "inconclusive"


def percentile_ci(samples, level: float = 0.95) -> tuple[float, float]:
    """Central ``level`` percentile interval of ``samples`` (NaN samples ignored; (nan, nan) if none are left)."""
    _check_level(level, "percentile_ci")
    s = np.asarray(samples, dtype=np.float64).ravel()
    s = s[~np.isnan(s)]
    if len(s) == 0:
        return (float("nan"), float("nan"))
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(s, [a, 1.0 - a])
    return (float(lo), float(hi))


def mean_difference_ci(a, b, *, paired: bool, level: float = 0.95) -> tuple[float, float]:
    """Central ``level`` interval of ``mean(a) - mean(b)``: Student's t on the differences ``a - b`` (``paired``, equal
    lengths) or Welch's t for independent samples. (nan, nan) with fewer than two values (on either side, unpaired),
    which ``verdict`` reads as inconclusive. Samples without any spread (integer counts can be) give a point
    interval only where the exact sign test (permutation test, unpaired) could reach ``level`` at all: at 95 %, 6
    pairs, or a + b values with 2 / C(a + b, a) <= 5 % (4 + 4, 3 + 5, 2 + 8, ...); fewer give (nan, nan): two paths
    both with 5 more crossings are no evidence at 95 %. "Without spread" allows rounding: a standard deviation (of
    the differences, paired; of each sample, unpaired) of at most 1e-12 * max(1, largest |value| of a and b), since
    ``a - b`` carries the rounding of a and b, not of the difference (``verdict``'s tolerance is the same).

    Examples
    --------
    >>> [round(v, 3) for v in mean_difference_ci([3.0, 4.0, 5.0], [1.0, 1.0, 1.0], paired=True)]
    [0.516, 5.484]
    """
    from scipy.stats import t as student

    _check_level(level, "mean_difference_ci")
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    q = 0.5 + level / 2.0
    tol = 1e-12 * max(1.0, float(np.abs(a).max(initial=0.0)), float(np.abs(b).max(initial=0.0)))  # rounding
    if paired:
        if len(a) != len(b):
            raise InvalidInputError(f"Paired samples need equal lengths. Got {len(a)} and {len(b)}.")
        d = a - b
        if len(d) < 2:
            return (float("nan"), float("nan"))
        sd = float(d.std(ddof=1))
        if sd <= tol:  # a point, where the exact sign test could reject at this level at all
            mid = float(d.mean())
            return (mid, mid) if 2 * 0.5 ** len(d) <= 1 - level else (float("nan"), float("nan"))
        half = float(student.ppf(q, len(d) - 1)) * sd / math.sqrt(len(d))
        return (float(d.mean()) - half, float(d.mean()) + half)
    if len(a) < 2 or len(b) < 2:
        return (float("nan"), float("nan"))
    va, vb = float(a.var(ddof=1)) / len(a), float(b.var(ddof=1)) / len(b)
    mid = float(a.mean() - b.mean())
    # no spread on either side: a point, where the exact permutation test could reject at this level at all
    if max(float(a.std(ddof=1)), float(b.std(ddof=1))) <= tol:
        return (mid, mid) if 2 / math.comb(len(a) + len(b), len(a)) <= 1 - level else (float("nan"), float("nan"))
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    half = float(student.ppf(q, df)) * math.sqrt(va + vb)
    return (mid - half, mid + half)


def paired_bootstrap(statistic: Callable[[np.ndarray], dict], n: int, *, n_boot: int = 1000,
                     random_state: int = 0, block: int | None = None,
                     groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Replicates of ``statistic(idx)`` over ``n_boot`` row resamples with replacement (one resample per replicate).

    ``statistic`` gets the resampled row indices and returns ``{name: float}``; computing both the method's and the
    baseline's score on the same ``idx`` pairs them. Returns ``{name: array (n_boot,)}``. With ``block``, it gets
    up to ``block`` resamples at once, an int array (resamples, n), and returns ``{name: array (resamples,)}``; the
    resamples are the same either way. With ``groups`` (one id per row: the passage of a token row), whole groups
    are resampled (as many draws as there are groups, each taking all its rows), so rows of one group, which are
    correlated, move together; resamples then differ in length, and a block's are padded with -1 (not a row).
    """
    if not is_int(n_boot) or n_boot < 1:
        raise InvalidInputError(f"The 'n_boot' parameter must be an int >= 1. Got {n_boot!r} instead.")
    if block is not None and (not is_int(block) or block < 1):
        raise InvalidInputError(f"The 'block' parameter must be an int >= 1 or None. Got {block!r} instead.")
    if n < 1:
        raise InvalidInputError(f"The bootstrap needs at least 1 row; got {n}.")
    rng = np.random.default_rng(random_state)
    if groups is None:
        def draw():
            return rng.integers(0, n, n)
    else:
        ids, of_row = np.unique(np.asarray(groups).ravel(), return_inverse=True)
        if len(of_row) != n:
            raise InvalidInputError(f"The bootstrap's groups must give one id per row ({n}); got {len(of_row)}.")
        order = np.argsort(of_row, kind="stable")
        ends = np.cumsum(np.bincount(of_row, minlength=len(ids)))
        members = np.split(order, ends[:-1])

        def draw():
            return np.concatenate([members[g] for g in rng.integers(0, len(ids), len(ids))])
    out: dict[str, list] = {}
    if block is None:
        for _ in range(n_boot):
            for name, v in statistic(draw()).items():
                out.setdefault(name, []).append(float(v))
        return {k: np.asarray(v) for k, v in out.items()}
    for start in range(0, n_boot, block):
        drawn = [draw() for _ in range(min(block, n_boot - start))]
        idx = np.full((len(drawn), max(len(d) for d in drawn)), -1, dtype=np.int64)
        for i, d in enumerate(drawn):
            idx[i, :len(d)] = d
        for name, v in statistic(idx).items():
            out.setdefault(name, []).append(np.asarray(v, dtype=np.float64))
    return {k: np.concatenate(v) for k, v in out.items()}


def _codes(x: np.ndarray) -> tuple[np.ndarray, int]:
    uniq, inv = np.unique(x, return_inverse=True)
    return inv.ravel(), len(uniq)


def _weighted_counts(idx: np.ndarray, code_of_row: np.ndarray, n_codes: int) -> np.ndarray:
    """(resamples, n_codes) counts of each code over each resample's rows; rows whose code is ``n_codes`` (or more)
    are not counted."""
    b = len(idx)
    flat = (np.arange(b)[:, None] * (n_codes + 1) + np.minimum(code_of_row[idx], n_codes)).ravel()
    return np.bincount(flat, minlength=b * (n_codes + 1)).reshape(b, n_codes + 1)[:, :n_codes]


def _entropies(sizes: np.ndarray, total: np.ndarray, extra: tuple | None = None) -> np.ndarray:
    """scikit-learn's labelling entropy per row of cluster ``sizes`` (zeros: absent); ``extra`` = (count, rows,
    sum of m log m) of more clusters given by their sizes m alone; 0 for a single cluster."""
    n_extra, rows_extra, mlogm = extra if extra is not None else (0, 0, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_total = np.log(total)[:, None]
        terms = np.where(sizes > 0, (sizes / total[:, None]) * (np.log(np.maximum(sizes, 1)) - log_total), 0.0)
        h = -(terms.sum(axis=1) + (mlogm - rows_extra * np.log(total)) / total)
    single = ((sizes > 0).sum(axis=1) + n_extra) == 1
    return np.where(single, 0.0, h)


def _copies(idx: np.ndarray, rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per resample (row of ``idx``; ``n`` marks a row not counted): how many distinct rows of the mask ``rows`` it
    holds, and the sums of m**2 and m log m over their numbers of copies m."""
    b = len(idx)
    hit = np.append(rows, False)[idx]
    which, row = np.nonzero(hit)
    if not len(which):
        z = np.zeros(b)
        return z.astype(np.int64), z.astype(np.int64), z
    keys, m = np.unique(which.astype(np.int64) * (n + 1) + idx[which, row], return_counts=True)
    owner = keys // (n + 1)
    distinct = np.bincount(owner, minlength=b)
    sq = np.bincount(owner, weights=m.astype(np.float64) ** 2, minlength=b).astype(np.int64)
    mlogm = np.bincount(owner, weights=m * np.log(m), minlength=b)
    return distinct, sq, mlogm


def resampled_clustering_scores(labels_true, labels_pred, indices, *, noise: str = "cluster") -> dict:
    """Purity, NMI (arithmetic) and ARI of ``labels_pred`` against ``labels_true`` on each resample of rows.

    ``indices`` (resamples, m) holds each resample's row indices (repeats allowed; -1 pads a shorter resample and is
    not a row). Under ``"cluster"`` and ``"exclude"``, row ``b`` of each returned array equals
    ``clustering_scores(labels_true[indices[b]], labels_pred[indices[b]], noise=noise)`` (NaN where ``"exclude"``
    leaves no rows), computed from the resample's contingency table: a weighted count of the distinct (label,
    cluster) pairs. Under ``"singleton"`` every noise row is a cluster of its own and a resample's copies of it are
    that one cluster, as if noise were made singletons first and then resampled (each copy a cluster of one, as
    before, biased resampled NMI downwards: an interval could miss its own point estimate).
    """
    from ..cluster import NOISE, NOISE_POLICIES, _one_of

    _one_of("resampled_clustering_scores", "noise", noise, NOISE_POLICIES)
    t, p = np.asarray(labels_true).ravel(), np.asarray(labels_pred).ravel()
    idx = np.asarray(indices)
    if len(t) != len(p) or idx.ndim != 2 or (idx.size and (idx.min() < -1 or idx.max() >= len(t))):
        raise InvalidInputError("resampled_clustering_scores needs labels of equal length and a (resamples, rows) "
                                "array of row indices into them.")
    is_noise = p == NOISE if noise != "cluster" else np.zeros(len(p), dtype=bool)
    t_code, n_cls = _codes(t)
    regular = ~is_noise
    p_code, n_clu = _codes(p)
    pair_code, n_pairs = _codes(t_code.astype(np.int64) * n_clu + p_code)
    cls_of_pair, clu_of_pair = np.zeros(n_pairs, np.int64), np.zeros(n_pairs, np.int64)
    cls_of_pair[pair_code], clu_of_pair[pair_code] = t_code, p_code
    # rows that are not counted in a table get the code past its end; so does padding (-1: the row past the end)
    idx = np.where(idx < 0, len(t), idx)

    def counts(counted_rows, codes, n_codes):
        return _weighted_counts(idx, np.append(np.where(counted_rows, codes, n_codes), n_codes), n_codes)
    cells = counts(regular, pair_code, n_pairs)          # (b, pairs)
    clusters = counts(regular, p_code, n_clu)            # (b, clusters)
    counted = regular | (noise == "singleton")
    classes = counts(counted, t_code, n_cls)             # (b, classes)
    if noise == "singleton":  # noise occurrences per class; each distinct noise row is a cluster (and a cell)
        single_cls = counts(is_noise, t_code, n_cls)
        n_single, single_sq, single_mlogm = _copies(idx, is_noise, len(t))
    else:
        single_cls = np.zeros_like(classes)
        n_single = single_sq = np.zeros(len(idx), dtype=np.int64)
        single_mlogm = np.zeros(len(idx))
    singles = single_cls.sum(axis=1)
    total = classes.sum(axis=1)
    present_cls, present_clu = (classes > 0).sum(axis=1), (clusters > 0).sum(axis=1) + n_single
    ftotal = total.astype(np.float64)

    # purity: the largest cell of each cluster; a noise row's cluster is one cell, all its copies
    by_clu = np.argsort(clu_of_pair, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(clu_of_pair[by_clu]) != 0])
    largest = np.maximum.reduceat(cells[:, by_clu], starts, axis=1).sum(axis=1) if n_pairs else 0
    with np.errstate(divide="ignore", invalid="ignore"):
        purity = (largest + singles) / ftotal

        # mutual information as scikit-learn's mutual_info_score sums it, cell by cell
        log_n = np.log(ftotal)[:, None]
        eps = np.finfo(np.float64).eps
        outer = classes[:, cls_of_pair] * clusters[:, clu_of_pair]
        nm = cells / ftotal[:, None]
        term = nm * (np.log(np.maximum(cells, 1)) - log_n) + nm * ((-np.log(np.maximum(outer, 1)) + log_n) + log_n)
        term = np.where((cells > 0) & (np.abs(term) >= eps), term, 0.0)
        # a noise row's cell (m copies, its cluster's size m): m/N log(N m / (a m)), the same 1/N log(N / a) per copy
        one = 1.0 / ftotal[:, None]
        s_term = one * (0.0 - log_n) + one * ((-np.log(np.maximum(classes, 1)) + log_n) + log_n)
        s_term = np.where((single_cls > 0) & (np.abs(s_term) >= eps), s_term, 0.0)
        mi = np.clip(term.sum(axis=1) + (single_cls * s_term).sum(axis=1), 0.0, None)
        mi = np.where((present_cls == 1) | (present_clu == 1), 0.0, mi)
        h_true = _entropies(classes, ftotal)
        h_pred = _entropies(clusters, ftotal, (n_single, singles, single_mlogm))
        nmi = np.where(mi == 0, 0.0, mi / ((h_true + h_pred) / 2))
    nmi = np.where((present_cls == present_clu) & (present_cls <= 1), 1.0, nmi)

    # adjusted Rand index from the pair confusion matrix, in integers as scikit-learn (Python integers where int64
    # could overflow)
    ints = (lambda a: a.astype(object)) if int(total.max(initial=0)) > 40_000 else (lambda a: a.astype(np.int64))
    sum_sq = ints((cells.astype(np.int64) ** 2).sum(axis=1) + single_sq)
    n = ints(total)
    tp = sum_sq - n
    fp = ints((clusters.astype(np.int64) ** 2).sum(axis=1) + single_sq) - sum_sq
    fn = ints((classes.astype(np.int64) ** 2).sum(axis=1)) - sum_sq
    tn = n * n - fp - fn - sum_sq
    perfect = (fn == 0) & (fp == 0)
    den = np.where(perfect, 1, (tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))
    ari = np.where(perfect, 1.0, 2.0 * (tp * tn - fn * fp).astype(np.float64) / den.astype(np.float64))
    empty = total == 0
    nan = np.float64("nan")
    return {"purity": np.where(empty, nan, purity), "nmi": np.where(empty, nan, nmi),
            "ari": np.where(empty, nan, ari)}


def find_entry(entries: list[dict], statistic: str) -> dict:
    """The entry of one statistic (e.g. ``"nmi[class]"``) in a result's ``entries``."""
    for e in entries:
        if e["statistic"] == statistic:
            return e
    raise InvalidInputError(f"No statistic {statistic!r}; known: {', '.join(e['statistic'] for e in entries)}.")
