"""Small-sample statistics for honest numbers: intervals for accuracies (Wilson) and mean scores
(bootstrap over questions, stratified for weighted totals such as the FSKU score), paired tests of two
systems on the same questions (exact McNemar for right/wrong, paired bootstrap for scores), and a
stable fold split for selecting on one part and reporting on another. Pure functions on lists and
arrays; every bootstrap has a fixed seed."""
from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % by default); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exact limits where rounding would leave 0.9999999999999999 (all right) or 1e-17 (all wrong)
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """Exact (binomial) McNemar test of two systems on the same questions: {"a_only", "b_only"
    (questions only one system got right), "p_value" (two-sided; 1.0 when they never differ)}."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired results of different lengths: {len(a_correct)} and {len(b_correct)}")
    a_only = sum(bool(a) and not bool(b) for a, b in zip(a_correct, b_correct))
    b_only = sum(bool(b) and not bool(a) for a, b in zip(a_correct, b_correct))
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_value": 1.0}
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail)}


def _percentile_interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    return float(np.percentile(replicates, tail)), float(np.percentile(replicates, 100 - tail))


def _stratified_means(x: np.ndarray, strata: np.ndarray, weights: dict, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap replicates of sum_s weight_s * mean(x in stratum s), each stratum resampled within
    itself (so every replicate keeps the design's number of questions of each kind)."""
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for name, weight in weights.items():
        part = x[strata == name]
        if len(part):
            total += weight * part[rng.integers(0, len(part), size=(n_boot, len(part)))].mean(axis=1)
    return total


def _present_weights(strata: np.ndarray, weights: dict[str, float], strict: bool = True) -> dict[str, float]:
    """The weights of the strata present, renormalised to sum to 1 ({} when none is present or they
    sum to <= 0); `strict`: a stratum without a weight is an error."""
    if strict:
        unknown = set(strata.tolist()) - set(weights)
        if unknown:
            raise ValueError(f"strata without a weight: {sorted(unknown)}")
    present = {k: w for k, w in weights.items() if (strata == k).any()}
    norm = sum(present.values())
    return {k: w / norm for k, w in present.items()} if present and norm > 0 else {}


def bootstrap_interval(values: Sequence[float], n_boot: int = 10000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` over resampled questions; a constant
    sample gives (value, value); an empty one (nan, nan)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return math.nan, math.nan
    return _percentile_interval(_stratified_means(x, np.zeros(len(x)), {0.0: 1.0}, n_boot, seed), level)


def weighted_total(values: Sequence[float], strata: Sequence[str], weights: dict[str, float]) -> float:
    """sum_s weight_s * mean(values of stratum s) over the strata present; the weights of the
    strata present are renormalised to 1 (the FSKU total is one part alone when the other is absent)."""
    x, s = np.asarray(values, dtype=float), np.asarray(strata)
    present = _present_weights(s, weights, strict=False)
    if not present:
        return math.nan
    return float(sum(w * x[s == k].mean() for k, w in present.items()))


def stratified_bootstrap_interval(values: Sequence[float], strata: Sequence[str], weights: dict[str, float],
                                  n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of `weighted_total`, resampling questions within each stratum (e.g. the FSKU
    total = 0.5 x MC accuracy + 0.5 x mean descriptive score)."""
    x, s = np.asarray(values, dtype=float), np.asarray(strata)
    present = _present_weights(s, weights)
    if not present:
        return math.nan, math.nan
    return _percentile_interval(_stratified_means(x, s, present, n_boot, seed), level)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95, strata: Optional[Sequence[str]] = None,
                     weights: Optional[dict[str, float]] = None) -> dict:
    """Mean of the paired differences a - b with a percentile bootstrap interval over questions and a
    two-sided p-value from the paired sign-flip test (`sign_flip_p`; exact for up to 16 non-zero
    differences): {"mean_diff", "low", "high", "p_value", "n"}. With `strata` and `weights` the
    statistic is the weighted sum of per-stratum mean differences, resampled (and sign-flipped)
    within strata."""
    if len(a) != len(b):
        raise ValueError(f"paired scores of different lengths: {len(a)} and {len(b)}")
    x = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(x) == 0:
        return {"mean_diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0, "n": 0}
    if strata is None:
        s, w = np.zeros(len(x)), {0.0: 1.0}
    else:
        if len(strata) != len(x):
            raise ValueError(f"{len(strata)} strata for {len(x)} paired scores")
        if not weights:
            raise ValueError("strata need weights")
        s = np.asarray(strata)
        w = _present_weights(s, weights)
        if not w:
            raise ValueError(f"the weights of the strata present sum to {sum(weights.get(k, 0) for k in set(s.tolist()))}")
    # the statistic is linear in the differences: sum_i coef_i * x_i, coef_i = weight of i's stratum / its size
    coef = np.zeros(len(x))
    for k, wt in w.items():
        mask = s == k
        coef[mask] = wt / mask.sum()
    low, high = _percentile_interval(_stratified_means(x, s, w, n_boot, seed), level)
    return {"mean_diff": float(coef @ x), "low": low, "high": high, "p_value": sign_flip_p(coef * x, n_boot, seed),
            "n": int(len(x))}


def sign_flip_p(terms: Sequence[float], n_flips: int = 10000, seed: int = 0, exact_up_to: int = 16) -> float:
    """Two-sided p of a paired randomisation (sign-flip) test of sum(terms) = 0: under the null each
    paired difference is as likely with either sign. Exact over all 2^m sign patterns of the m
    non-zero terms when m <= exact_up_to, else Monte Carlo with (hits + 1) / (n_flips + 1). For 0/1
    outcomes it is the exact sign test (McNemar); one non-zero difference gives p = 1."""
    t = np.asarray(terms, dtype=float)
    t = t[np.abs(t) > 1e-15]
    observed = abs(float(t.sum()))
    if len(t) == 0 or observed <= 1e-12:
        return 1.0
    eps = 1e-12 * max(1.0, observed)
    if len(t) <= exact_up_to:
        signs = 1 - 2 * ((np.arange(2 ** len(t))[:, None] >> np.arange(len(t))) & 1)
        return float(np.mean(np.abs(signs @ t) >= observed - eps))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_flips, 2000):  # chunks keep memory at 2000 x m
        signs = rng.choice((-1.0, 1.0), size=(min(2000, n_flips - start), len(t)))
        hits += int(np.sum(np.abs(signs @ t) >= observed - eps))
    return (hits + 1) / (n_flips + 1)


def metric_interval(values: Sequence[float], kind: str = "bootstrap", seed: int = 0, level: float = 0.95) -> dict:
    """A headline metric with its n and 95 % interval: {"value", "n", "low", "high", "method"}.
    kind "wilson" (values are 0/1 outcomes: an accuracy or hit rate) or "bootstrap" (any per-question
    score: MRR, cosine, keyword recall)."""
    x = np.asarray(values, dtype=float)
    if kind == "wilson":
        if not np.isin(x, (0.0, 1.0)).all():
            raise ValueError("a Wilson interval needs 0/1 outcomes")
        z = 1.959964 if math.isclose(level, 0.95) else _normal_quantile(0.5 + level / 2)
        low, high = wilson_interval(int(x.sum()), len(x), z)
    elif kind == "bootstrap":
        low, high = bootstrap_interval(x, seed=seed, level=level)
    else:
        raise ValueError(f"unknown interval kind {kind!r}: expected 'wilson' or 'bootstrap'")
    return {"value": float(x.mean()) if len(x) else math.nan, "n": int(len(x)), "low": low, "high": high, "method": kind}


def _normal_quantile(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


def split_folds(keys: Sequence[str], folds: int, seed: int = 0, holdout: int = 0) -> tuple[list[int], list[int]]:
    """(indices of the tuning folds, indices of the held-out fold `holdout`) for items with `keys`.
    Items are ranked by a hash of seed and key (the same on every machine, whatever the row order)
    and dealt round-robin, so fold sizes differ by at most one."""
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if not 0 <= holdout < folds:
        raise ValueError(f"holdout must be in [0, {folds - 1}], got {holdout}")
    if len(set(keys)) != len(keys):
        raise ValueError("fold keys must be unique")
    if len(keys) < folds:
        raise ValueError(f"{len(keys)} items cannot fill {folds} folds")
    order = sorted(range(len(keys)), key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode("utf-8")).digest())
    fold = [0] * len(keys)
    for rank, i in enumerate(order):
        fold[i] = rank % folds
    held = [i for i in range(len(keys)) if fold[i] == holdout]
    return [i for i in range(len(keys)) if fold[i] != holdout], held
