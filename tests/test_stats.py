import math

import pytest

from oialr_tune.stats import in_words, verdict, welch_interval


def test_welch_interval_matches_hand_computation() -> None:
    a = [0.90, 0.92, 0.94]
    b = [0.85, 0.86, 0.87, 0.88]
    # By hand: means 0.92 and 0.865; variances 0.0004 and 0.000166667;
    # se² = 0.0004/3 + 0.000166667/4 = 0.000133333 + 0.0000416667 = 0.000175
    # dof = 0.000175² / (0.000133333²/2 + 0.0000416667²/3) = 3.0625e-8 / (8.8889e-9 + 5.787e-10) = 3.2349
    # t(0.975, 3.2349) = 3.0556 (t table, interpolated), half-width = 3.0556 × 0.0132288 = 0.040422
    iv = welch_interval(a, b)
    assert iv.difference == pytest.approx(0.055)
    assert iv.dof == pytest.approx(3.2349, abs=1e-3)
    assert iv.high - iv.difference == pytest.approx(0.040422, abs=2e-4)
    assert iv.low == pytest.approx(0.055 - 0.040422, abs=2e-4)
    assert verdict(iv) == "better"
    assert verdict(welch_interval(b, a)) == "worse"


def test_overlapping_arms_have_no_detectable_difference() -> None:
    iv = welch_interval([0.90, 0.95, 0.85], [0.91, 0.89, 0.93])
    assert iv.low < 0 < iv.high
    assert verdict(iv) == "no detectable difference"


def test_zero_variance_and_too_few_values() -> None:
    iv = welch_interval([0.5, 0.5], [0.4, 0.4])
    assert (iv.low, iv.high) == pytest.approx((0.1, 0.1))
    assert math.isinf(iv.dof)
    with pytest.raises(ValueError, match=">= 2 values"):
        welch_interval([0.5], [0.4, 0.3])


def test_a_minimized_metric_is_better_when_lower_in_verdicts_and_words() -> None:
    """MAE 0.40 against 0.50: a negative difference, and better; 0.4990 vs 0.4950 is not '+0.00'."""
    iv = welch_interval([0.40, 0.41, 0.39], [0.50, 0.51, 0.49])
    assert verdict(iv, "min") == "better" and verdict(iv, "max") == "worse"
    assert verdict(welch_interval([0.50, 0.51, 0.49], [0.40, 0.41, 0.39]), "min") == "worse"
    assert in_words(0.4990, 0.4950, "min") == "worse by 0.004"
    assert in_words(0.9740, 0.9703, "max", 100, " points") == "better by 0.37 points"
    assert in_words(0.5, 0.5, "min") == "the same"
