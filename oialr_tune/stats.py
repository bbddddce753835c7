"""Small statistics for comparing two arms' per-seed test accuracies."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as _scipy_stats

__all__ = ["Interval", "verdict", "welch_interval"]


@dataclass(frozen=True)
class Interval:
    """A confidence interval for mean(a) − mean(b)."""

    difference: float
    low: float
    high: float
    dof: float
    confidence: float


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """Welch's t interval for mean(a) − mean(b), without assuming equal variances.

    Needs at least two values per arm. When both arms have zero variance the interval collapses
    to the observed difference (there is no spread to be uncertain about).
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"welch_interval needs >= 2 values per arm, got {len(a)} and {len(b)}")
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    var_a = sum((x - mean_a) ** 2 for x in a) / (len(a) - 1)
    var_b = sum((x - mean_b) ** 2 for x in b) / (len(b) - 1)
    sa, sb = var_a / len(a), var_b / len(b)
    diff = mean_a - mean_b
    se = math.sqrt(sa + sb)
    if se == 0.0:
        return Interval(diff, diff, diff, math.inf, confidence)
    dof = (sa + sb) ** 2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1))
    t = float(_scipy_stats.t.ppf(0.5 + confidence / 2, dof))
    return Interval(diff, diff - t * se, diff + t * se, dof, confidence)


def verdict(interval: Interval) -> str:
    """'better' / 'worse' when the interval excludes 0, else 'no detectable difference'."""
    if interval.low > 0:
        return "better"
    if interval.high < 0:
        return "worse"
    return "no detectable difference"
