"""Small-sample statistics against hand-computed values and limit cases."""
import math

import pytest

from fsku.evaluate.stats import mcnemar_exact, paired_bootstrap, wilson_interval


def test_wilson_interval_by_hand():
    low, high = wilson_interval(5, 10)  # centre 0.5, half-width 1.96 * sqrt(0.025 + 0.0096) / 1.3841
    assert math.isclose(low, 0.2366, abs_tol=1e-4) and math.isclose(high, 0.7634, abs_tol=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and math.isclose(high, 0.2775, abs_tol=1e-4)
    assert math.isclose(wilson_interval(10, 10)[1], 1.0) and wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_mcnemar_exact_by_hand():
    a = [True, False, False, False, False, False, True, True]
    b = [False, True, True, True, True, True, True, False]  # a only: 2 (rows 0, 7), b only: 5
    got = mcnemar_exact(a, b)
    assert (got["a_only"], got["b_only"]) == (2, 5)
    assert math.isclose(got["p_value"], 2 * (1 + 7 + 21) / 128)  # 2 * P(X <= 2), X ~ Bin(7, 1/2)
    assert math.isclose(mcnemar_exact([False] * 6, [True] * 6)["p_value"], 2 / 64)
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    with pytest.raises(ValueError, match="different lengths"):
        mcnemar_exact([True], [True, False])


def test_paired_bootstrap_limits():
    const = paired_bootstrap([0.5, 0.7, 0.9], [0.4, 0.6, 0.8])
    assert math.isclose(const["mean_diff"], 0.1) and math.isclose(const["low"], 0.1) and math.isclose(const["high"], 0.1)
    spread = paired_bootstrap([1, 0, 1, 0, 1, 0, 1, 0], [0] * 8, seed=1)
    assert spread["low"] < 0.5 < spread["high"] and spread["n"] == 8
    assert paired_bootstrap([], [])["n"] == 0
