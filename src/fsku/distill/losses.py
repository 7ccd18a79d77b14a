"""Distillation losses as pure functions over logits (DistiLLM-2, Ko et al., ICML 2025, and baselines).

Notation: p = teacher, q = student, both next-token distributions over one shared vocabulary at
every response position. Token-level divergences return a [batch, time] tensor; `masked_mean`
averages each sequence over its response tokens, then over the batch (sequence-level average, as
in the reference implementation).

    forward KL        KL(p || q)
    reverse KL        KL(q || p)
    skew forward KL   KL(p || a*p + (1-a)*q)                      (SKL, on teacher responses)
    skew reverse KL   KL(q || (1-a)*p + a*sg(q))                  (SRKL, on student responses)
    generalised JSD   b*KL(p || m) + (1-b)*KL(q || m), m = b*p + (1-b)*q

A loss type combines one divergence on teacher responses ("chosen") and one on student responses
("rejected") with weights; `distillm_v2` uses (2 - beta) * SKL + beta * SRKL. The mixture in SRKL
holds a stop-gradient copy of q: gradients flow only through the outer q.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..choices import LOSS_TYPES, LossSpec  # noqa: F401  (the table lives on the ground floor)
from ..config import BETA_RANGE

Alpha = Union[float, torch.Tensor]


# ---------------------------------------------------------------- helpers

def shared_log_softmax(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       vocab_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q, log p) in float32 over the first `vocab_size` entries.

    Models pad their output layer beyond the tokenizer (Qwen: 151,936 rows for 151,665 tokens);
    the padded rows never hold a real token, so both sides are cut to the tokenizer's size before
    normalising. Without `vocab_size` both must already have the same width."""
    if vocab_size is None:
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ValueError(f"student and teacher logits differ in width ({student_logits.shape[-1]} vs "
                             f"{teacher_logits.shape[-1]}); pass vocab_size = the shared tokenizer's size")
        vocab_size = student_logits.shape[-1]
    if vocab_size > min(student_logits.shape[-1], teacher_logits.shape[-1]):
        raise ValueError(f"vocab_size {vocab_size} exceeds a model's output width "
                         f"({student_logits.shape[-1]}, {teacher_logits.shape[-1]})")
    return log_probs(student_logits, vocab_size), log_probs(teacher_logits, vocab_size)


def log_probs(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 log-softmax over the first `vocab_size` entries (padded output rows dropped)."""
    return torch.log_softmax(logits[..., :vocab_size].float(), dim=-1)


def _as_alpha(alpha: Alpha, like: torch.Tensor) -> torch.Tensor:
    """alpha as a tensor broadcastable to [batch, time, vocab] (a float, or one value per sequence)."""
    a = torch.as_tensor(alpha, dtype=like.dtype, device=like.device)
    if a.ndim == 1:
        a = a.view(-1, 1, 1)
    if torch.any(a <= 0) or torch.any(a >= 1):
        raise ValueError("alpha must lie strictly between 0 and 1")
    return a


def _mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: torch.Tensor) -> torch.Tensor:
    """log(w*a + (1-w)*b), computed stably in log space."""
    return torch.logaddexp(torch.log(weight_a) + log_a, torch.log1p(-weight_a) + log_b)


def _kl(log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """sum_v x (log x - log y) with 0 * log 0 = 0 (x may have zero-probability entries)."""
    x = log_x.exp()
    return torch.where(x > 0, x * (log_x - log_y), torch.zeros_like(x)).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's masked positions, then over sequences that have any (scalar)."""
    mask = mask.to(values.dtype)
    counts = mask.sum(-1)
    per_seq = (values * mask).sum(-1) / counts.clamp(min=1)
    present = counts > 0
    if not torch.any(present):
        return values.sum() * 0.0
    return per_seq[present].mean()


def sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over masked positions ([batch])."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)


# ---------------------------------------------------------------- token-level divergences

def forward_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return _kl(log_p, log_q)


def reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return _kl(log_q, log_p)


def skew_forward_kl(log_p: torch.Tensor, log_q: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    """KL(p || a*p + (1-a)*q); a -> 0 gives KL(p || q)."""
    a = _as_alpha(alpha, log_q)
    return _kl(log_p, _mixture(log_p, log_q, a))


def skew_reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, alpha: Alpha) -> torch.Tensor:
    """KL(q || (1-a)*p + a*sg(q)); a -> 0 gives KL(q || p). The q inside the mixture is detached."""
    a = _as_alpha(alpha, log_q)
    return _kl(log_q, _mixture(log_q.detach(), log_p, a))


def generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, weight: float) -> torch.Tensor:
    """b*KL(p || m) + (1-b)*KL(q || m) with m = b*p + (1-b)*q (GKD's generalised JSD, b = `weight`)."""
    b = _as_alpha(weight, log_q)
    log_m = _mixture(log_p, log_q, b)
    return b.squeeze(-1) * _kl(log_p, log_m) + (1 - b.squeeze(-1)) * _kl(log_q, log_m)


def token_logprobs(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log prob of each label token ([batch, time]); labels outside the mask may hold any valid id."""
    return torch.gather(log_probs, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------- adaptive alpha and beta schedule

def sequence_prob_gap(log_p: torch.Tensor, log_q: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(mean log p(y)) - exp(mean log q(y)) per sequence: how much likelier the response is under
    the teacher than under the student (sentence level, as in DistiLLM-2's adaptive alpha)."""
    lp = sequence_mean(token_logprobs(log_p, labels), mask)
    lq = sequence_mean(token_logprobs(log_q, labels), mask)
    return lp.exp() - lq.exp()


def adaptive_alpha(gap: torch.Tensor, reference_gap: float, base_alpha: float, floor: float = 0.01) -> torch.Tensor:
    """alpha_i = clip(1 - (1 - a0) * g_ref / g_i, floor, a0) per sequence.

    g_ref is the gap measured early in training; sequences whose teacher-student gap is still as large
    as at the start keep the full skew a0, those the student has caught up on get less (DistiLLM-2).
    A reference gap <= 0 (the student already as likely as the teacher on average) would flip the
    formula's direction (a gap further below zero gets less skew): every sequence keeps a0."""
    if not math.isfinite(reference_gap) or reference_gap <= 0:
        return torch.full_like(gap, base_alpha, dtype=torch.float32 if not gap.is_floating_point() else gap.dtype)
    anchor = (1.0 - base_alpha) * reference_gap
    return torch.clamp(1.0 - anchor / (gap.detach() + 1e-5), min=floor, max=base_alpha)


def scheduled_beta(beta: float, step: int, total_steps: int, *, gradual: bool, start: float, end: float,
                   ramp_ratio: float) -> float:
    """beta at optimizer step `step` (0-based) of `total_steps`: `beta` throughout, or with `gradual`
    DistiLLM-2's curriculum, linear from `start` to `end` over the first `ramp_ratio` of the steps and
    `end` after. The authors' trainer has 1.0 + 0.5 * min(1, 2 * global_step / max_steps): start 1.0,
    end 1.5, ratio 0.5. Raising beta shifts weight from the teacher's responses to the student's own."""
    if not gradual:
        return beta
    if total_steps <= 0:
        return end
    progress = min(1.0, step / (ramp_ratio * total_steps))
    return start + (end - start) * progress


# ---------------------------------------------------------------- loss types

@dataclass(frozen=True)
class Side:
    """One side of a pair as the loss sees it: log q and log p at response positions, labels, mask."""
    log_q: torch.Tensor
    log_p: Optional[torch.Tensor]
    labels: torch.Tensor
    mask: torch.Tensor


def side_weights(loss_type: str, beta: float) -> tuple[float, float]:
    """Weights of the chosen and rejected terms."""
    spec = LOSS_TYPES[loss_type]
    if spec.chosen and spec.rejected:
        return 2.0 - beta, beta
    return (1.0, 0.0) if spec.chosen else (0.0, 1.0)


# name -> divergence(side, alpha, jsd_weight) over the side's response positions ([batch, time])
DIVERGENCES = {
    "cross_entropy": lambda side, alpha, w: -token_logprobs(side.log_q, side.labels),
    "forward_kl": lambda side, alpha, w: forward_kl(side.log_p, side.log_q),
    "reverse_kl": lambda side, alpha, w: reverse_kl(side.log_p, side.log_q),
    "skew_forward_kl": lambda side, alpha, w: skew_forward_kl(side.log_p, side.log_q, alpha),
    "skew_reverse_kl": lambda side, alpha, w: skew_reverse_kl(side.log_p, side.log_q, alpha),
    "generalized_jsd": lambda side, alpha, w: generalized_jsd(side.log_p, side.log_q, w),
}


def _divergence(name: str, side: Side, alpha: Alpha, jsd_weight: float) -> torch.Tensor:
    if name != "cross_entropy" and side.log_p is None:
        raise ValueError(f"{name} needs teacher log-probabilities")
    return DIVERGENCES[name](side, alpha, jsd_weight)


def distillation_loss(loss_type: str, chosen: Optional[Side], rejected: Optional[Side], alpha_chosen: Alpha,
                      alpha_rejected: Alpha, *, beta: float, jsd_weight: float
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its terms (detached) for one batch. Terms with weight 0 are not computed. No
    defaults: the values come from the config (config.LossSettings), declared there once."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {sorted(LOSS_TYPES)}")
    if not BETA_RANGE[0] <= beta <= BETA_RANGE[1]:
        raise ValueError(f"beta must be in [0, 2], got {beta}")
    spec = LOSS_TYPES[loss_type]
    w_chosen, w_rejected = side_weights(loss_type, beta)
    total = None
    terms: dict[str, torch.Tensor] = {}
    for name, side, weight, alpha, key in ((spec.chosen, chosen, w_chosen, alpha_chosen, "chosen"),
                                           (spec.rejected, rejected, w_rejected, alpha_rejected, "rejected")):
        if name is None or weight == 0.0:
            continue
        if side is None:
            raise ValueError(f"loss_type {loss_type!r} needs {key} responses in the batch")
        value = masked_mean(_divergence(name, side, alpha, jsd_weight), side.mask)
        terms[f"{key}_{name}"] = value.detach()
        total = weight * value if total is None else total + weight * value
    assert total is not None
    return total, terms
