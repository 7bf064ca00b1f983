"""Seed-level uncertainty: intervals over seeds and paired tests of two arms (DESIGN.md §3.1).

The permutation tests of :mod:`recbole_popprior.evaluator.energy` hold two trained models
fixed; how much a number moves from one training seed to the next is measured here, from
one value per seed. Pure functions of plain sequences of floats. The reports use
:func:`range_interval`, whose intervals respect the range of the quantity (an NDCG interval
stays in [0, 1]) and are not shown below :data:`MIN_SEEDS` seeds.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats

from recbole_popprior.errors import PopPriorError


@dataclass(frozen=True)
class MeanInterval:
    """Student-t interval of a mean over ``n`` seeds.

    ``defined`` is False for ``n = 1``: one seed gives no interval, and ``sd``,
    ``half_width``, ``low`` and ``high`` are NaN then.
    """

    mean: float
    sd: float
    n: int
    confidence: float
    half_width: float
    low: float
    high: float
    defined: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PairedTest:
    """Paired t-test of ``a - b`` over seeds, with the interval of the mean difference.

    ``defined`` is False for ``n = 1`` (no test, no interval: the other fields are NaN).
    """

    mean_diff: float
    sd_diff: float
    n: int
    confidence: float
    statistic: float
    p_value: float
    half_width: float
    low: float
    high: float
    alternative: str
    defined: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _values(x: Sequence[float], name: str) -> np.ndarray:
    try:
        values = np.asarray(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise PopPriorError(f"{name} must be a sequence of numbers") from None
    if values.size == 0:
        raise PopPriorError(f"{name} is empty: at least one seed is needed")
    if not np.all(np.isfinite(values)):
        raise PopPriorError(f"{name} has non-finite values: {values.tolist()}")
    return values


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise PopPriorError(f"confidence must lie in (0, 1), got {confidence}")
    return confidence


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> MeanInterval:
    """Mean over seeds and its Student-t interval ``mean +- t_{(1+c)/2, n-1} sd / sqrt(n)``.

    ``sd`` is the sample standard deviation (``n - 1`` in the denominator). The interval
    assumes the per-seed values are independent draws of one normal distribution; with
    ``n = 1`` there is none (``defined`` False).
    """
    x = _values(values, "values")
    confidence = _check_confidence(confidence)
    n, mean = x.size, float(x.mean())
    if n == 1:
        nan = math.nan
        return MeanInterval(mean, nan, 1, confidence, nan, nan, nan, False)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n))
    return MeanInterval(mean, sd, n, confidence, half, mean - half, mean + half, True)


def paired_test(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                alternative: str = "two-sided") -> PairedTest:
    """Paired t-test of two arms' per-seed values (seed ``k`` of ``a`` pairs with seed ``k`` of ``b``).

    Tests the mean of ``d = a - b`` against 0 (``scipy.stats.ttest_rel``; ``alternative`` is
    ``two-sided``, ``greater`` (a > b) or ``less``) and gives the two-sided Student-t
    interval of ``mean(d)``. When every difference is the same, ``t`` is undefined: then
    ``p = 1`` if that difference is 0 and ``p = 0`` otherwise (scipy's limit), and the
    interval has zero width.
    """
    x, y = _values(a, "a"), _values(b, "b")
    if x.size != y.size:
        raise PopPriorError(f"paired arms need one value per seed each, got {x.size} and {y.size}")
    if alternative not in ("two-sided", "greater", "less"):
        raise PopPriorError(f"alternative must be two-sided, greater or less, got {alternative!r}")
    interval = mean_interval(x - y, confidence)  # the interval of the mean difference
    mean, sd, n, confidence = interval.mean, interval.sd, interval.n, interval.confidence
    if not interval.defined:
        nan = math.nan
        return PairedTest(mean, nan, 1, confidence, nan, nan, nan, nan, nan, alternative, False)
    if sd == 0.0:  # scipy warns and returns nan for 0/0: state the limit instead
        if mean == 0.0:
            statistic, p_value = 0.0, 1.0
        else:
            statistic = math.copysign(math.inf, mean)
            p_value = 0.0 if alternative == "two-sided" or (alternative == "greater") == (mean > 0) else 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # near-identical arms: scipy's precision note
            result = stats.ttest_rel(x, y, alternative=alternative)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    return PairedTest(mean, sd, n, confidence, statistic, p_value, interval.half_width, interval.low,
                      interval.high, alternative, True)


#: fewer seeds than this: no interval is shown (with 2 seeds the 95% t quantile is 12.7)
MIN_SEEDS = 3

#: the ranges of the reported quantities and the scale their interval is computed on:
#: ``unit`` in [0, 1] (logit), ``positive`` in [0, inf) (log), ``reduction`` R = 1 - E'/E in
#: (-inf, 1] (log of 1 - R, the energy ratio), ``real`` (no transform)
SCALES: dict[str, tuple[float, float, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "unit": (0.0, 1.0, lambda x: np.log(x) - np.log1p(-x), lambda y: 1.0 / (1.0 + np.exp(-y))),
    "positive": (0.0, math.inf, np.log, np.exp),
    "reduction": (-math.inf, 1.0, lambda x: np.log1p(-x), lambda y: -np.expm1(y)),
    "real": (-math.inf, math.inf, lambda x: x, lambda y: y),
}


@dataclass(frozen=True)
class RangeInterval:
    """An interval over seeds that stays inside the range of its quantity (:data:`SCALES`).

    ``mean`` is the plain mean of the seeds. ``low``/``high`` are the Student-t interval of the
    mean on the transformed scale, mapped back (so e.g. an NDCG interval never leaves [0, 1]):
    an interval for the centre of the seeds' distribution. Where a seed sits on a bound of the
    range (a tail recall of 0), the transform is undefined and the raw t interval is cut at the
    bound (``cut`` True). ``None`` bounds with ``note`` saying why: fewer than ``MIN_SEEDS``
    seeds, or no spread at all.
    """

    mean: float
    low: float | None
    high: float | None
    n: int
    confidence: float
    scale: str
    cut: bool = False
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def seeds_note(n: int) -> str:
    return f"n = {n} seed{'s' if n != 1 else ''}: interval not shown"


def range_interval(values: Sequence[float], scale: str = "real", confidence: float = 0.95,
                   min_seeds: int = MIN_SEEDS) -> RangeInterval:
    """The mean of ``values`` (one per seed) and its interval on ``scale`` (:class:`RangeInterval`)."""
    if scale not in SCALES:
        raise PopPriorError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    x = _values(values, "values")
    confidence = _check_confidence(confidence)
    low_bound, high_bound, forward, back = SCALES[scale]
    n, mean = x.size, float(x.mean())
    if np.any(x < low_bound) or np.any(x > high_bound):
        raise PopPriorError(f"values {x.tolist()} leave the range [{low_bound}, {high_bound}] of scale {scale!r}")
    if n < max(int(min_seeds), 2):
        return RangeInterval(mean, None, None, n, confidence, scale, note=seeds_note(n))
    if float(np.ptp(x)) <= 1e-9 * float(np.abs(x).max()):  # equal up to rounding: no spread
        return RangeInterval(mean, None, None, n, confidence, scale, note=f"the same in all {n} seeds")
    inside = bool(np.all((x > low_bound) & (x < high_bound)))
    y = forward(x) if inside else x
    iv = mean_interval(y, confidence)
    if inside:
        low, high = sorted((float(back(np.float64(iv.low))), float(back(np.float64(iv.high)))))  # back may decrease
        return RangeInterval(mean, low, high, n, confidence, scale)
    return RangeInterval(mean, max(iv.low, low_bound), min(iv.high, high_bound), n, confidence, scale, cut=True)


def combined_p_value(p_values: Sequence[float]) -> float:
    """Fisher's combination ``-2 sum log p_k ~ chi^2_{2K}`` of independent per-seed p-values.

    Valid when the seeds' tests are independent and each ``p_k`` is uniform (or
    conservative) under its null; permutation p-values are, so the result is conservative.
    """
    p = _values(p_values, "p_values")
    if np.any((p <= 0) | (p > 1)):
        raise PopPriorError(f"p-values must lie in (0, 1], got {p.tolist()}")
    if p.size == 1:
        return float(p[0])
    return float(stats.combine_pvalues(p, method="fisher").pvalue)


__all__ = ["MeanInterval", "PairedTest", "RangeInterval", "mean_interval", "paired_test", "range_interval",
           "combined_p_value", "seeds_note", "SCALES", "MIN_SEEDS"]
