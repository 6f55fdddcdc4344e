"""Statistics of a multi-seed study: mean, spread and 95% intervals, paired differences, ranks.

A variant's top-1 over its seeds is summarised by :func:`summarize`: mean, sample standard
deviation (``n - 1``) and the two-sided 95% Student-t interval ``mean +- t(0.975, n-1) s / sqrt(n)``.
Its change against the baseline is :func:`paired_difference`: the per-seed differences
``variant(seed) - baseline(seed)`` over the seeds both have (the same seed gives the same data
order and, where shapes agree, correlated initialisation), summarised the same way. An interval
excludes zero when both ends have the same sign.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

__all__ = ["Summary", "paired_difference", "spearman", "summarize", "t_quantile"]


def _t_central(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with integer ``df`` (closed form, Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2.4/3.5 cos^4 + ...))
        term, total = 1.0, 0.0
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * j) / (2 * j + 1)
        return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    term, total = 1.0, 0.0  # even: sin (1 + 1/2 cos^2 + 1.3/2.4 cos^4 + ...)
    for j in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * j - 1) / (2 * j)
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (``p > 0.5``) of Student's t with integer ``df >= 1`` (bisection on the exact CDF)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    central = 2 * p - 1
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < central:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_central(mid, df) < central else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Summary:
    """``n`` values: ``mean``, sample ``std`` and the 95% t-interval ``[low, high]`` (None for n < 2)."""

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None

    @property
    def excludes_zero(self) -> bool:
        """The interval lies entirely above or below zero."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean, sample standard deviation and two-sided Student-t interval of ``values``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarise")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return Summary(n, mean, None, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def paired_difference(variant: Mapping[int, float], baseline: Mapping[int, float]) -> Summary | None:
    """Per-seed ``variant[seed] - baseline[seed]`` over the seeds both have, summarised; None if none."""
    seeds = sorted(set(variant) & set(baseline))
    if not seeds:
        return None
    return summarize([variant[s] - baseline[s] for s in seeds])


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation of paired values (Pearson's of the ranks, ties sharing their mean
    rank); None for fewer than 3 pairs or a constant side."""
    if len(a) != len(b):
        raise ValueError(f"need paired values, got {len(a)} and {len(b)}")
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = math.fsum(ra) / len(ra), math.fsum(rb) / len(rb)
    cov = math.fsum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(math.fsum((x - ma) ** 2 for x in ra) * math.fsum((y - mb) ** 2 for y in rb))
    return None if var == 0 else cov / var


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
