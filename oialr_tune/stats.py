"""Small statistics for comparing two arms' per-seed test metrics (accuracy, MAE, a user metric)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Interval", "difference", "finite", "in_words", "mean_std", "verdict", "welch_interval"]


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
    from scipy import stats as scipy_stats  # here, not at the top: the sweep's summary line needs no scipy

    dof = (sa + sb) ** 2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1))
    t = float(scipy_stats.t.ppf(0.5 + confidence / 2, dof))
    return Interval(diff, diff - t * se, diff + t * se, dof, confidence)


def verdict(interval: Interval, mode: str = "max") -> str:
    """'better' / 'worse' for the first arm when the interval excludes 0, else 'no detectable difference'.

    `mode` says which way the metric improves: 'max' (accuracy) or 'min' (MAE, loss), so a lower
    MAE is 'better' although its difference is negative.
    """
    sign = 1.0 if mode == "max" else -1.0
    low, high = sorted((sign * interval.low, sign * interval.high))
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no detectable difference"


def in_words(a: float, b: float, mode: str = "max", scale: float = 1.0, unit: str = "") -> str:
    """How `a` compares with `b` for a metric `mode` makes better: 'better by 0.0040', 'worse by ...'.

    Four significant digits of the gap (times `scale`, e.g. 100 for points of accuracy), so a small
    MAE gap does not print as 0.00; 'the same' when they are equal.
    """
    if a == b:
        return "the same"
    better = (a > b) == (mode == "max")
    return f"{'better' if better else 'worse'} by {abs(a - b) * scale:.4g}{unit}"


def finite(values: Iterable[float | None]) -> list[float]:
    """The values that are numbers (not None, NaN or infinite): what a mean or an interval is taken over."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1; None below two values) and the values themselves."""
    numbers = finite(values)
    return {
        "mean": statistics.fmean(numbers) if numbers else None,
        "std": statistics.stdev(numbers) if len(numbers) >= 2 else None,
        "n": len(numbers),
        "values": [None if v is None else float(v) for v in values],
    }


def difference(a: Sequence[float | None], b: Sequence[float | None], metric: str, mode: str) -> dict[str, Any] | None:
    """mean(a) − mean(b) of `metric` over the finite values, with a Welch 95 % interval when both have ≥ 2;
    the verdict (better/worse) follows `mode`, the direction that makes `metric` better. None if one is empty."""
    xs, ys = finite(a), finite(b)
    if not xs or not ys:
        return None
    out: dict[str, Any] = {"metric": metric, "mode": mode, "difference": statistics.fmean(xs) - statistics.fmean(ys)}
    if len(xs) >= 2 and len(ys) >= 2:
        iv = welch_interval(xs, ys)
        out.update(low=iv.low, high=iv.high, confidence=iv.confidence, verdict=verdict(iv, mode))
    return out
