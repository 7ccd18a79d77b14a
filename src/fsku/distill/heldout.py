"""Held-out measurements during distillation: the student against the teacher on prompts it never
trains on (synth_qa's validation split, split by article).

The teacher answers the held-out prompts once (greedy, resumable) and its top-k log-probabilities at
every response position are computed once; during training a callback measures, every `eval_steps`
steps (and at the start and the end of a round):

    heldout/kl_to_teacher   mean per-token KL(teacher ‖ student) on the teacher's responses
    heldout/teacher_nll     mean per-token negative log-likelihood of those responses under the student
    …_mc, …_descriptive     the same per kind of prompt (a label target is one token, a descriptive answer
                            a hundred: the overall mean is mostly the descriptive part)

The same numbers are the distill study's objective (fsku.tune), so a trial and a distill run report
one quantity.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence

import torch
from transformers import TrainerCallback

from . import losses as L
from .trainer import IGNORE, PairCollator, dense_from_topk, response_window, window_logits

log = logging.getLogger(__name__)

KL_KEY, NLL_KEY = "heldout/kl_to_teacher", "heldout/teacher_nll"


def scatter_topk(topk_logp_dense: torch.Tensor, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Top-k rows hold the response positions in order ([batch, n, vocab]); put them on the masked
    positions of a [batch, time, vocab] tensor (zeros elsewhere, never read)."""
    out = torch.zeros_like(like)
    for b in range(like.shape[0]):
        n = int(mask[b].sum())
        out[b, mask[b]] = topk_logp_dense[b, :n].to(like.dtype)
    return out


def token_kl_and_nll(log_p: torch.Tensor, log_q: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
                     ) -> tuple[float, float, int]:
    """Sums over the masked positions of KL(p ‖ q) and of −log q(label), and the number of positions."""
    kl = L.forward_kl(log_p, log_q)
    nll = -L.token_logprobs(log_q, labels)
    return float(kl[mask].sum()), float(nll[mask].sum()), int(mask.sum())


KIND_SUFFIX = {"multiple_choice": "mc", "descriptive": "descriptive"}


def held_out_metrics(model, features: Sequence[dict], vocab_size: int, batch_size: int = 4) -> dict[str, float]:
    """{KL_KEY, NLL_KEY}: per-token means over the teacher's responses to held-out prompts, the teacher
    given as top-k log-probabilities (``chosen_topk_*`` from `precompute_topk`). Features that carry their
    prompt's `kind` also give the means per kind (``…_mc``, ``…_descriptive``): a descriptive answer has
    a hundred tokens, a label target one, so the overall mean is mostly the descriptive part. The
    model's train/eval mode is restored."""
    if not features:
        raise ValueError("no held-out features to measure")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, list[float]] = {}  # group -> [kl, nll, tokens]
    collate = PairCollator(0)
    groups = sorted({f.get("kind", "") for f in features})
    try:
        with torch.no_grad():
            for group in groups:
                part = [f for f in features if f.get("kind", "") == group]
                for start in range(0, len(part), batch_size):
                    batch = collate(list(part[start:start + batch_size]), sides=("chosen",))
                    labels = batch["chosen_labels"]
                    keep = response_window(labels)
                    log_q = L.log_probs(window_logits(model, batch["chosen_input_ids"].to(device),
                                                      batch["chosen_attention_mask"].to(device), keep), vocab_size)
                    labels = labels[:, labels.shape[1] - keep + 1:].to(device)
                    mask = labels != IGNORE
                    dense = dense_from_topk(batch["chosen_topk_idx"].to(device), batch["chosen_topk_logp"].to(device),
                                            vocab_size)
                    kl, nll, n = token_kl_and_nll(scatter_topk(dense, mask, log_q), log_q, labels, mask)
                    acc = sums.setdefault(group, [0.0, 0.0, 0])
                    acc[0], acc[1], acc[2] = acc[0] + kl, acc[1] + nll, acc[2] + n
    finally:
        if was_training:
            model.train()
    total = [sum(v[i] for v in sums.values()) for i in range(3)]
    out = {KL_KEY: total[0] / max(1, total[2]), NLL_KEY: total[1] / max(1, total[2])}
    for group, (kl, nll, n) in sums.items():
        if group in KIND_SUFFIX:
            out[f"{KL_KEY}_{KIND_SUFFIX[group]}"] = kl / max(1, n)
            out[f"{NLL_KEY}_{KIND_SUFFIX[group]}"] = nll / max(1, n)
    return out


class HeldOutCallback(TrainerCallback):
    """Measures `held_out_metrics` at the start of training (when not resumed), every `every` steps and at
    the last step; each measurement goes to `log_fn(metrics, step)` and into `history`."""

    def __init__(self, features: Sequence[dict], vocab_size: int, every: int, batch_size: int = 4,
                 log_fn: Optional[Callable[[dict, int], None]] = None, prefix: str = ""):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.features, self.vocab_size, self.every, self.batch_size = features, vocab_size, every, batch_size
        self.log_fn, self.prefix = log_fn, prefix
        self.history: list[dict] = []
        self.seconds = 0.0  # spent measuring (inside Trainer.train: the caller subtracts it from the training time)
        self._measured: set[int] = set()

    def _measure(self, model, step: int) -> None:
        if model is None or step in self._measured:
            return
        self._measured.add(step)
        t0 = time.perf_counter()
        metrics = {f"{self.prefix}{k}": v for k, v in
                   held_out_metrics(model, self.features, self.vocab_size, self.batch_size).items()}
        self.seconds += time.perf_counter() - t0
        self.history.append({"step": step, **metrics})
        log.info("step %d: held-out KL %.4f, NLL %.4f", step, metrics[f"{self.prefix}{KL_KEY}"],
                 metrics[f"{self.prefix}{NLL_KEY}"])
        if self.log_fn is not None:
            self.log_fn(metrics, step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # a resumed round has its start measured already
            self._measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._measure(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # a round resumed from its last checkpoint runs no step: its end is measured here (never twice)
        self._measure(model, state.global_step)


def build_features(prompt_rows: Sequence[dict], responses: dict[str, dict], tokenizer, teacher, *, vocab_size: int,
                   topk: int, max_length: int, max_prompt_length: int, batch_size: int = 2,
                   progress: Optional[Callable[[int], None]] = None, cache=None, teacher_id: str = "") -> list[dict]:
    """Token features of the teacher's held-out responses with its top-k log-probabilities."""
    from .data import make_pairs
    from .trainer import encode_pairs, precompute_topk

    pairs, _ = make_pairs(prompt_rows, responses, responses)  # both sides the teacher's; only "chosen" is read
    if not pairs:
        return []
    features, _ = encode_pairs(tokenizer, pairs, max_length, max_prompt_length, sides=("chosen",))
    kinds = {p["prompt_id"]: p["kind"] for p in pairs}
    for f in features:
        f["kind"] = kinds[f["prompt_id"]]
    precompute_topk(teacher, features, topk, vocab_size, batch_size=batch_size, progress=progress, sides=("chosen",),
                    cache=cache, teacher_id=teacher_id)
    return features
