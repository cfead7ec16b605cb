"""Small pure statistics for studies: mean, sample std, Student-t 95% intervals, paired differences.

No I/O, no pandas; plain floats in, plain floats out. scipy is not a dependency of aimm, so the
Student-t quantile is computed here (regularised incomplete beta by continued fraction, then
bisection); the tests check it against published table values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

NAN = float("nan")


# ------------------------------------------------------------------------------ Student t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (inverse of :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ------------------------------------------------------------------------------ summaries
@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` values, sample std (ddof=1) and the Student-t interval of the mean."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


def finite(values: Iterable[float | None]) -> list[float]:
    """The finite numbers among ``values`` (None, NaN and inf dropped)."""
    out = []
    for v in values:
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            out.append(v)
    return out


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else NAN


def sample_std(values: Sequence[float]) -> float:
    """Standard deviation with ddof = 1; NaN for fewer than two values."""
    n = len(values)
    if n < 2:
        return NAN
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def estimate(values: Iterable[float | None], confidence: float = 0.95) -> Estimate:
    """Mean, sample std and the two-sided Student-t ``confidence`` interval of the mean.

    Non-finite values are dropped first; std and the interval are NaN when fewer than two remain.
    """
    xs = finite(values)
    n = len(xs)
    m, s = mean(xs), sample_std(xs)
    if n < 2:
        return Estimate(n, m, s, NAN, NAN)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * s / math.sqrt(n)
    return Estimate(n, m, s, m - half, m + half)


@dataclass(frozen=True)
class PairedDifference:
    """``method - reference`` over matched pairs: the estimate of the difference, and how often
    the method was better (wins) or worse (losses) than the reference; ties count as neither."""

    estimate: Estimate
    wins: int
    losses: int


def paired_difference(values: Sequence[float | None], reference: Sequence[float | None],
                      higher_is_better: bool = True) -> PairedDifference:
    """Differences ``values[k] - reference[k]`` of matched pairs (a pair with a non-finite side is
    dropped). ``higher_is_better=False`` (forgetting) counts a negative difference as a win."""
    if len(values) != len(reference):
        raise ValueError(f"paired values differ in length: {len(values)} vs {len(reference)}")
    diffs = [a - b for a, b in zip(values, reference)
             if len(finite([a])) == 1 and len(finite([b])) == 1]
    better = sum(1 for d in diffs if (d > 0 if higher_is_better else d < 0))
    worse = sum(1 for d in diffs if (d < 0 if higher_is_better else d > 0))
    return PairedDifference(estimate(diffs), better, worse)
