"""Pure functions for multiple-choice answering: option orders, debiasing, votes, answer parsing.

Notation: n options labelled 1..n in their original order. An *order* is a permutation ``perm``
where display position j shows original option ``perm[j]``. Scores come back per display
position (the log-probability of the label ``j+1``) and are mapped back to original options.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Optional, Sequence

import numpy as np

from .classify import CIRCLED_CLASS, OPTION_NUMBER, option_number


def cyclic_orders(n: int, k: int = 0) -> list[list[int]]:
    """k cyclic rotations of range(n), evenly spaced (k = 0 or k >= n: all n). The first is the identity."""
    if n < 1:
        raise ValueError("need at least one option")
    k = n if k <= 0 or k >= n else k
    shifts = sorted({round(i * n / k) % n for i in range(k)})
    return [[(j + s) % n for j in range(n)] for s in shifts]


def option_orders(n: int, k: int = 0, reverse: bool = False) -> list[list[int]]:
    """The cyclic orders of `cyclic_orders(n, k)`, followed (reverse=True) by the same rotations of
    the reversed order. Rotations put every option at every position but keep which option follows
    which; adding the reversed rotations also balances that (each option is preceded by each of its
    two neighbours equally often)."""
    orders = cyclic_orders(n, k)
    if reverse:
        orders += [[(s - j) % n for j in range(n)] for s in (o[0] for o in orders)]
    return orders


def normalize_logprobs(logp: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis (restricts a next-token distribution to the option labels)."""
    logp = np.asarray(logp, dtype=np.float64)
    m = logp.max(axis=-1, keepdims=True)
    return logp - (m + np.log(np.exp(logp - m).sum(axis=-1, keepdims=True)))


def to_original_order(display_logp: np.ndarray, orders: Sequence[Sequence[int]]) -> np.ndarray:
    """(R, n) label log-probs per display position -> (R, n) per original option."""
    display_logp = np.asarray(display_logp, dtype=np.float64)
    out = np.empty_like(display_logp)
    for r, perm in enumerate(orders):
        out[r, list(perm)] = display_logp[r]
    return out


def aggregate_orders(display_logp: np.ndarray, orders: Sequence[Sequence[int]]) -> np.ndarray:
    """Mean over option orders of the per-order normalised log-probs, in original option order.

    Averaging over cyclic rotations shows every option at every position equally often, so a
    position preference adds the same amount to every option and cancels in the argmax."""
    return to_original_order(normalize_logprobs(display_logp), orders).mean(axis=0)


def calibrate(logp: np.ndarray, content_free_logp: np.ndarray) -> np.ndarray:
    """Contextual calibration (Zhao et al., 2021): subtract the log-probs the model gives each
    display position for a content-free prompt, then renormalise."""
    return normalize_logprobs(normalize_logprobs(logp) - normalize_logprobs(content_free_logp))


def cloze_scores(option_logps: Sequence[np.ndarray], free_logps: Optional[Sequence[np.ndarray]] = None) -> np.ndarray:
    """Per-option cloze score from the token log-probs of each option's text as the answer.

    Without `free_logps`: the mean token log-prob (length-normalised likelihood). With them (the
    same texts after a content-free question): the pointwise mutual information, the summed
    log-prob minus the summed content-free log-prob, so a text that is likely anywhere (short,
    common words) does not win for that alone (Holtzman et al., 2021)."""
    if not len(option_logps) or any(len(lp) == 0 for lp in option_logps):
        raise ValueError("every option needs at least one scored token")
    if free_logps is None:
        return np.array([float(np.mean(lp)) for lp in option_logps])
    if len(free_logps) != len(option_logps):
        raise ValueError("free_logps must hold one array per option")
    return np.array([float(np.sum(lp) - np.sum(fp)) for lp, fp in zip(option_logps, free_logps)])


def combine_scores(label_scores: Optional[np.ndarray], cloze: Optional[np.ndarray]) -> np.ndarray:
    """Sum of the normalised label and cloze log-distributions (a product of experts); either may be None."""
    parts = [normalize_logprobs(x) for x in (label_scores, cloze) if x is not None]
    if not parts:
        raise ValueError("need label scores, cloze scores or both")
    return np.sum(parts, axis=0)


def choice_confidence(scores: np.ndarray) -> tuple[int, float]:
    """(0-based best option, its softmax probability) for aggregated scores."""
    p = np.exp(normalize_logprobs(scores))
    best = int(np.argmax(p))
    return best, float(p[best])


# option numbers 1..99 (a question may have 10+ options) and circled ①..⑳, never part of a longer number
_ANSWER_NUMBER = rf"(?<!\d)({OPTION_NUMBER}|{CIRCLED_CLASS})(?!\d)"
_ANSWER_PATTERNS = [
    re.compile(r"정답\s*(?:은|는|:|：)?\s*(?:번호\s*)?[\(\[]?\s*" + _ANSWER_NUMBER),
    re.compile(r"(?:answer|Answer|ANSWER)\s*(?:is|:)?\s*[\(\[]?" + _ANSWER_NUMBER),
    re.compile(_ANSWER_NUMBER + r"\s*번(?:이|입니다|이다|\b)"),
]


def parse_choice(text: str, n: int) -> Optional[int]:
    """The option number (1..n) a free-text answer commits to, or None.

    Prefers an explicit "정답: k" / "k번" statement (the last one: reasoning may mention others
    first), then a text that is only a number."""
    if not text:
        return None
    for pattern in _ANSWER_PATTERNS:
        found = [option_number(m.group(1)) for m in pattern.finditer(text)]
        found = [v for v in found if 1 <= v <= n]
        if found:
            return found[-1]
    m = re.fullmatch(rf"\s*[\(\[]?({OPTION_NUMBER})[\)\].]?\s*", text)
    if m and 1 <= int(m.group(1)) <= n:
        return int(m.group(1))
    return None


def majority_vote(votes: Sequence[Optional[int]], tie_break_scores: np.ndarray) -> tuple[int, float]:
    """(1-based winning option, vote share). Ties (and no valid vote) go to the higher option score."""
    valid = [v for v in votes if v is not None]
    if not valid:
        best, _ = choice_confidence(tie_break_scores)
        return best + 1, 0.0
    counts = Counter(valid)
    top = max(counts.values())
    tied = [v for v, c in counts.items() if c == top]
    winner = max(tied, key=lambda v: tie_break_scores[v - 1])
    return winner, top / len(votes)
