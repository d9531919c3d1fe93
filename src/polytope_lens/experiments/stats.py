"""Percentile bootstrap intervals and the verdict rule shared by the prediction experiments.

Verdict rule (``verdict``), on a score where larger is better and a CI of the difference (method - baseline):

* ``"holds"``: the method's score is higher and the whole CI is above 0;
* ``"does not hold"``: the baseline's score is higher and the whole CI is below 0;
* ``"inconclusive"``: anything else, including a CI that touches 0 or any NaN.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..errors import InvalidInputError

__all__ = ["VERDICTS", "verdict", "percentile_ci", "paired_bootstrap"]

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


def paired_bootstrap(statistic: Callable[[np.ndarray], dict], n: int, *, n_boot: int = 1000,
                     random_state: int = 0) -> dict[str, np.ndarray]:
    """Replicates of ``statistic(idx)`` over ``n_boot`` row resamples with replacement (one resample per replicate).

    ``statistic`` gets the resampled row indices and returns ``{name: float}``; computing both the method's and the
    baseline's score on the same ``idx`` pairs them. Returns ``{name: array (n_boot,)}``.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise InvalidInputError(f"The 'n_boot' parameter must be an int >= 1. Got {n_boot!r} instead.")
    if n < 1:
        raise InvalidInputError(f"The bootstrap needs at least 1 row; got {n}.")
    rng = np.random.default_rng(random_state)
    out: dict[str, list[float]] = {}
    for _ in range(n_boot):
        for name, v in statistic(rng.integers(0, n, n)).items():
            out.setdefault(name, []).append(float(v))
    return {k: np.asarray(v) for k, v in out.items()}


def find_entry(entries: list[dict], statistic: str) -> dict:
    """The entry of one statistic (e.g. ``"nmi[class]"``) in a result's ``entries``."""
    for e in entries:
        if e["statistic"] == statistic:
            return e
    raise InvalidInputError(f"No statistic {statistic!r}; known: {', '.join(e['statistic'] for e in entries)}.")
