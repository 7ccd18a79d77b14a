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


def test_bootstrap_interval_limits():
    from fsku.evaluate.stats import bootstrap_interval

    assert bootstrap_interval([0.25, 0.25, 0.25]) == (0.25, 0.25)
    assert all(math.isnan(v) for v in bootstrap_interval([]))
    low, high = bootstrap_interval([0.0, 1.0] * 20)
    assert low < 0.5 < high and 0.3 < low and high < 0.7  # about 0.5 ± 1.96 * 0.5 / sqrt(40) = ±0.155
    assert bootstrap_interval([0.0, 1.0] * 20, seed=3) == bootstrap_interval([0.0, 1.0] * 20, seed=3)


def test_weighted_total_and_its_stratified_interval_by_hand():
    from fsku.evaluate.stats import stratified_bootstrap_interval, weighted_total

    values, strata = [1, 0, 1, 0.5], ["mc", "mc", "mc", "desc"]
    assert math.isclose(weighted_total(values, strata, {"mc": 0.5, "desc": 0.5}), 0.5 * 2 / 3 + 0.5 * 0.5)
    # one stratum present: its weight becomes 1 (the FSKU total of an MC-only set is its accuracy)
    assert math.isclose(weighted_total([1, 0, 1], ["mc"] * 3, {"mc": 0.5, "desc": 0.5}), 2 / 3)
    # constant within each stratum: every replicate is the point value
    low, high = stratified_bootstrap_interval([1, 1, 0.4, 0.4], ["mc", "mc", "desc", "desc"], {"mc": 0.5, "desc": 0.5})
    assert math.isclose(low, 0.7) and math.isclose(high, 0.7)
    with pytest.raises(ValueError, match="without a weight"):
        stratified_bootstrap_interval([1], ["other"], {"mc": 1.0})


def test_paired_bootstrap_p_value_and_strata():
    same = paired_bootstrap([0.2, 0.9, 0.4], [0.2, 0.9, 0.4])
    assert same["mean_diff"] == 0 and same["p_value"] == 1.0
    # sign-flip test, exact: 3 equal gains -> only the all-plus and all-minus patterns reach it, p = 2 / 8
    assert math.isclose(paired_bootstrap([0.5, 0.7, 0.9], [0.4, 0.6, 0.8])["p_value"], 0.25)
    assert paired_bootstrap([1.0], [0.0])["p_value"] == 1.0  # one question is no evidence
    # 0/1 outcomes: the exact sign test, the same p as McNemar (5 discordant pairs, all one way: 2 / 32)
    half = paired_bootstrap([1] * 5 + [0] * 5, [0] * 10)
    assert half["mean_diff"] == 0.5 and math.isclose(half["p_value"], 2 / 32)
    a, b = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1], [0, 1, 1, 0, 0, 0, 1, 0, 0, 1]
    assert math.isclose(paired_bootstrap(a, b)["p_value"], mcnemar_exact(a, b)["p_value"])
    # beyond 16 non-zero differences: Monte Carlo close to the exact binomial (30 of 40 discordant: 0.00222)
    many = paired_bootstrap([1] * 30 + [0] * 10, [0] * 30 + [1] * 10, n_boot=20000)
    assert abs(many["p_value"] - mcnemar_exact([True] * 30 + [False] * 10, [False] * 30 + [True] * 10)["p_value"]) < 0.002
    noise = paired_bootstrap([1, 0, 1, 0, 0, 1], [0, 1, 0, 1, 1, 0])  # mean 0, symmetric
    assert math.isclose(noise["mean_diff"], 0.0) and noise["p_value"] > 0.5
    strat = paired_bootstrap([1, 1, 0.5], [0, 1, 0.5], strata=["mc", "mc", "desc"], weights={"mc": 0.5, "desc": 0.5})
    assert math.isclose(strat["mean_diff"], 0.5 * 0.5 + 0.5 * 0.0)
    with pytest.raises(ValueError, match="strata"):
        paired_bootstrap([1], [0], strata=["mc", "mc"], weights={"mc": 1})


def test_metric_interval_limits():
    from fsku.evaluate.stats import metric_interval

    one = metric_interval([1], "wilson")  # n = 1, all correct: Wilson (0.2065, 1)
    assert one["n"] == 1 and one["value"] == 1.0 and math.isclose(one["low"], 0.2065, abs_tol=1e-4) and one["high"] == 1.0
    every = metric_interval([1] * 63, "wilson")
    assert math.isclose(every["low"], 0.9426, abs_tol=1e-4)  # 63 / (63 + 3.8415)
    assert metric_interval([0.8], "bootstrap")["low"] == 0.8
    with pytest.raises(ValueError, match="0/1"):
        metric_interval([0.5], "wilson")
    with pytest.raises(ValueError, match="unknown interval"):
        metric_interval([1], "t")


def test_split_folds_is_balanced_disjoint_and_order_free():
    from fsku.evaluate.stats import split_folds

    keys = [f"q{i}" for i in range(65)]
    tune, held = split_folds(keys, 3)
    assert sorted(tune + held) == list(range(65)) and not set(tune) & set(held) and len(held) in (21, 22)
    sizes = [len(split_folds(keys, 3, holdout=h)[1]) for h in range(3)]
    assert sum(sizes) == 65 and max(sizes) - min(sizes) <= 1
    reversed_keys = keys[::-1]
    _, held_rev = split_folds(reversed_keys, 3)
    assert {reversed_keys[i] for i in held_rev} == {keys[i] for i in held}
    assert split_folds(keys, 3, seed=1)[1] != held
    for bad, match in (((keys, 1), "folds"), ((keys, 3, 0, 3), "holdout"), ((["a", "a", "b"], 2), "unique"),
                       ((["a"], 2), "cannot fill")):
        with pytest.raises(ValueError, match=match):
            split_folds(*bad)
