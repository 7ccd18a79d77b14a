"""The distillation trainer: a transformers `Trainer` whose loss is one of `losses.LOSS_TYPES`,
a PEFT LoRA student, and the teacher either resident (logits computed on the fly) or replaced by
its precomputed top-k log-probabilities (the teacher need not fit in memory during training).

Batches hold both sides of each pair: ``chosen_*`` (teacher response) and ``rejected_*`` (student
response), each as input_ids / attention_mask / labels (-100 on prompt tokens and padding).
"""
from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from transformers import Trainer, TrainerCallback

from ..config import LoraSettings, LossSettings
from . import losses as L

log = logging.getLogger(__name__)

SIDES = ("chosen", "rejected")
IGNORE = -100


# ---------------------------------------------------------------- vocabulary

def check_shared_vocab(student_tokenizer, teacher_tokenizer) -> int:
    """The shared vocabulary size; raises when the tokenizers map any token to different ids
    (token-level distillation compares distributions id by id)."""
    sv, tv = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if sv != tv:
        only_s, only_t = set(sv) - set(tv), set(tv) - set(sv)
        moved = sum(1 for k in set(sv) & set(tv) if sv[k] != tv[k])
        raise ValueError(f"teacher and student tokenizers differ ({len(sv)} vs {len(tv)} tokens; {len(only_s)} only in the "
                         f"student, {len(only_t)} only in the teacher, {moved} with different ids): token-level "
                         "distillation needs one shared vocabulary (use models of one family, e.g. Qwen2.5 1.5B -> 0.5B)")
    return len(sv)


# ---------------------------------------------------------------- features

def encode_side(tokenizer, prompt_ids: list[int], response: str, max_length: int) -> dict[str, list[int]]:
    """prompt + response + end-of-turn as input_ids, with labels only on the response."""
    eos = tokenizer.eos_token or ""
    resp_ids = tokenizer(response + eos, add_special_tokens=False)["input_ids"]
    resp_ids = resp_ids[:max(1, max_length - len(prompt_ids))]
    return {"input_ids": prompt_ids + resp_ids, "labels": [IGNORE] * len(prompt_ids) + resp_ids}


def encode_pairs(tokenizer, pairs: Sequence[dict], max_length: int = 1024, max_prompt_length: int = 768,
                 sides: Sequence[str] = SIDES) -> tuple[list[dict], int]:
    """Token features per pair (of `sides`) and how many prompts were cut from the left to fit
    max_prompt_length."""
    feats, cut = [], 0
    for pair in pairs:
        if "split_at" in pair:  # a label target: the ids exactly as the backends score the option labels
            feats.append(encode_label_pair(tokenizer, pair, max_length))
            continue
        text = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[-max_prompt_length:]
            cut += 1
        feat = {"prompt_id": pair["prompt_id"]}
        for side in sides:
            enc = encode_side(tokenizer, prompt_ids, pair[side][-1]["content"], max_length)
            feat[f"{side}_input_ids"], feat[f"{side}_labels"] = enc["input_ids"], enc["labels"]
        feats.append(feat)
    return feats, cut


def label_token_id(tokenizer, label: str) -> int:
    """The token that starts `label` after the assistant header, by the option-scoring backends' rule
    (`fsku.llm.base.label_token_id`) on this tokenizer."""
    from ..llm.base import label_token_id as first_label_token

    return first_label_token(lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                             lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True), label)


def encode_label_pair(tokenizer, pair: dict, max_length: int) -> dict:
    """A label pair's features: prefix and suffix (+ prefill) tokenized apart, as `fsku.llm` backends encode
    an option-scoring request, then the one label token of each side (no end of turn). Label prompts are
    never cut (longer ones were left out before): a prompt over max_length is an error."""
    from .data import split_prompt

    prefix, suffix = split_prompt(pair["prompt"], pair["split_at"], pair.get("prefill", ""),
                                  lambda m: tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False))
    prompt_ids = (tokenizer(prefix, add_special_tokens=False)["input_ids"]
                  + tokenizer(suffix, add_special_tokens=False)["input_ids"])
    if len(prompt_ids) + 1 > max_length:
        raise ValueError(f"{pair['prompt_id']}: a label prompt of {len(prompt_ids)} tokens exceeds {max_length}")
    feat = {"prompt_id": pair["prompt_id"]}
    for side in SIDES:
        label = label_token_id(tokenizer, pair[side][-1]["content"].strip())
        feat[f"{side}_input_ids"], feat[f"{side}_labels"] = prompt_ids + [label], [IGNORE] * len(prompt_ids) + [label]
    return feat


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]


@dataclass
class PairCollator:
    pad_token_id: int

    def __call__(self, rows: list[dict], sides: Sequence[str] = SIDES) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for side in sides:
            ids = [r[f"{side}_input_ids"] for r in rows]
            width = max(len(x) for x in ids)
            batch[f"{side}_input_ids"] = torch.tensor([x + [self.pad_token_id] * (width - len(x)) for x in ids])
            batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
            batch[f"{side}_labels"] = torch.tensor([r[f"{side}_labels"] + [IGNORE] * (width - len(r[f"{side}_labels"]))
                                                    for r in rows])
            if f"{side}_topk_idx" in rows[0]:
                # top-k rows cover the response positions in order; pad to the longest
                n = max(len(r[f"{side}_topk_idx"]) for r in rows)
                k = len(rows[0][f"{side}_topk_idx"][0]) if rows[0][f"{side}_topk_idx"] else 1
                idx = torch.zeros(len(rows), n, k, dtype=torch.long)
                lp = torch.full((len(rows), n, k), -math.inf)
                for b, r in enumerate(rows):
                    m = len(r[f"{side}_topk_idx"])
                    if m:
                        idx[b, :m] = torch.as_tensor(r[f"{side}_topk_idx"], dtype=torch.long)
                        lp[b, :m] = torch.as_tensor(r[f"{side}_topk_logp"], dtype=torch.float32)
                batch[f"{side}_topk_idx"], batch[f"{side}_topk_logp"] = idx, lp
        return batch


# ---------------------------------------------------------------- response window

def response_window(labels: torch.Tensor) -> int:
    """How many trailing logits cover every labelled position of a right-padded batch.

    Full-vocabulary logits (151,936 wide for Qwen) dominate training memory; prompts are usually
    longer than responses, so the language-model head runs only on the last `keep` positions
    (`logits_to_keep`). Logits at position t predict token t+1, so the window starts one position
    before the first label: ``logits[:, :-1]`` of the window lines up with ``labels[:, W - keep + 1:]``."""
    labelled = (labels != IGNORE).any(0).nonzero()
    width = labels.shape[1]
    if len(labelled) == 0:
        return width
    return width - max(int(labelled[0]), 1) + 1


def window_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Next-token logits of the last `keep` positions, without the final one ([batch, keep - 1, vocab])."""
    return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits[:, :-1]


# ---------------------------------------------------------------- teacher top-k

def dense_from_topk(topk_idx: torch.Tensor, topk_logp: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full log-distributions from top-k (log-prob, id) pairs: the top-k keep their probabilities and
    the remaining mass is spread evenly over the other ids (every divergence stays finite)."""
    k = topk_idx.shape[-1]
    kept = topk_logp.exp().sum(-1, keepdim=True).clamp(max=1.0)
    rest = ((1.0 - kept).clamp(min=1e-12) / max(1, vocab_size - k)).log()
    dense = rest.expand(*topk_idx.shape[:-1], vocab_size).clone()
    return dense.scatter(-1, topk_idx, topk_logp)


def topk_tail_mass(features: Sequence[dict], sides: Sequence[str] = SIDES) -> Optional[float]:
    """Mean over the response tokens of the teacher probability outside its stored top-k (1 − Σ top-k p):
    what `dense_from_topk` has to spread evenly. None when no feature holds top-k rows."""
    total, count = 0.0, 0
    for f in features:
        for side in sides:
            rows = f.get(f"{side}_topk_logp")
            if rows:
                kept = torch.as_tensor(rows, dtype=torch.float64).exp().sum(-1).clamp(max=1.0)
                total += float((1.0 - kept).sum())
                count += len(rows)
    return total / count if count else None


def same_answer_position(feature: dict) -> bool:
    """Whether both sides of a pair are one label token after the same prompt (label targets): the teacher's
    distribution at that position is then one, computed once for both sides."""
    a, b = feature.get(f"{SIDES[0]}_input_ids"), feature.get(f"{SIDES[1]}_input_ids")
    la, lb = feature.get(f"{SIDES[0]}_labels"), feature.get(f"{SIDES[1]}_labels")
    if not (a and b and la and lb) or len(a) != len(b) or a[:-1] != b[:-1]:
        return False
    return sum(x != IGNORE for x in la) == 1 and sum(x != IGNORE for x in lb) == 1 and la[-1] != IGNORE and lb[-1] != IGNORE


def topk_key(teacher_id: str, k: int, vocab_size: int, input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """Cache key of one sequence's teacher top-k rows: the teacher, k, the vocabulary and the exact tokens
    (and which of them are response positions)."""
    from ..stores import digest

    return "topk|" + digest({"teacher": teacher_id, "k": k, "vocab": vocab_size, "ids": list(input_ids),
                             "labelled": [x != IGNORE for x in labels]}, 32)


@torch.no_grad()
def precompute_topk(teacher, features: list[dict], k: int, vocab_size: int, batch_size: int = 2,
                    progress: Optional[Callable[[int], None]] = None, sides: Sequence[str] = SIDES,
                    cache=None, teacher_id: str = "") -> dict[str, int]:
    """Adds ``<side>_topk_idx`` / ``<side>_topk_logp`` (one row per response token) to each feature.

    With `cache` (get/set of JSON values, e.g. `stores.AnswerCache`) and a `teacher_id` naming the
    teacher's weights, rows computed once are read back (a second distill run on the same prompts, a
    killed run, another loss type of the same comparison): {"computed", "cached"} sequences."""
    device = next(teacher.parameters()).device if teacher is not None else None
    collate = PairCollator(0)
    counts = {"computed": 0, "cached": 0}
    use_cache = cache is not None and getattr(cache, "enabled", True) and bool(teacher_id)
    todo: list[tuple[dict, str, str]] = []  # (feature, side, key) still to compute
    shared: set[int] = set()  # ids of label pairs whose rejected side reads the chosen side's one position
    for r in features:
        share = len(sides) == 2 and same_answer_position(r)
        if share:
            shared.add(id(r))
        for side in sides[:1] if share else sides:
            key = topk_key(teacher_id, k, vocab_size, r[f"{side}_input_ids"], r[f"{side}_labels"]) if use_cache else ""
            hit = cache.get(key) if use_cache else None
            if hit is not None:
                r[f"{side}_topk_idx"], r[f"{side}_topk_logp"] = hit["idx"], hit["logp"]
                if share:
                    r[f"{SIDES[1]}_topk_idx"], r[f"{SIDES[1]}_topk_logp"] = hit["idx"], hit["logp"]
                counts["cached"] += 1
            else:
                todo.append((r, side, key))
    if todo and teacher is None:
        raise ValueError(f"{len(todo)} sequences have no cached teacher top-k and no teacher was given")
    remaining = Counter(id(r) for r, _, _ in todo)  # sides still to compute, per feature
    if progress and len(features) > len(remaining):
        progress(len(features) - len(remaining))
    for side in sides:
        pending = [(r, key) for r, s, key in todo if s == side]
        for start in range(0, len(pending), batch_size):
            part = pending[start:start + batch_size]
            rows = [r for r, _ in part]
            batch = collate([{key: r[key] for key in r if not key.endswith(("topk_idx", "topk_logp"))} for r in rows],
                            (side,))
            ids, attn = batch[f"{side}_input_ids"].to(device), batch[f"{side}_attention_mask"].to(device)
            labels = batch[f"{side}_labels"]
            keep = response_window(labels)
            logp = L.log_probs(window_logits(teacher, ids, attn, keep), vocab_size)
            top = logp.topk(min(k, vocab_size), dim=-1)
            mask = labels[:, labels.shape[1] - keep + 1:] != IGNORE
            for b, (r, key) in enumerate(part):
                m = mask[b].to(device)
                r[f"{side}_topk_idx"] = top.indices[b][m].cpu().tolist()
                r[f"{side}_topk_logp"] = top.values[b][m].cpu().tolist()
                if use_cache:
                    cache.set(key, {"idx": r[f"{side}_topk_idx"], "logp": r[f"{side}_topk_logp"]})
            counts["computed"] += len(part)
            for r in rows:  # the other side of a label pair: the same position, the same distribution
                if id(r) in shared:
                    r[f"{SIDES[1]}_topk_idx"], r[f"{SIDES[1]}_topk_logp"] = r[f"{side}_topk_idx"], r[f"{side}_topk_logp"]
            finished = 0
            for r in rows:
                remaining[id(r)] -= 1
                finished += remaining[id(r)] == 0
            if progress and finished:
                progress(finished)
    return counts


# ---------------------------------------------------------------- trainer

class DistillTrainer(Trainer):
    """`Trainer` with a distillation loss. `teacher` is a model (on-the-fly logits) or None when the
    batches carry precomputed top-k teacher log-probabilities (or the loss needs no teacher)."""

    def __init__(self, *args, teacher=None, loss: LossSettings, vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        if loss.loss_type not in L.LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss.loss_type!r}; choose one of {sorted(L.LOSS_TYPES)}")
        self.teacher, self.loss_settings, self.vocab_size = teacher, loss, vocab_size
        # our loss is a per-batch mean that ignores num_items_in_batch: let Trainer divide it by the
        # gradient-accumulation steps
        self.model_accepts_loss_kwargs = False
        if self.teacher is not None:
            self.teacher.eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self._stored: dict[str, list[float]] = defaultdict(list)
        self._gap_history: dict[str, list[float]] = defaultdict(list)
        self.reference_gap: dict[str, Optional[float]] = {s: None for s in SIDES}

    # -- pieces
    def _teacher_logp(self, inputs: dict, side: str, mask: torch.Tensor, like: torch.Tensor, keep: int) -> torch.Tensor:
        if f"{side}_topk_idx" in inputs:
            dense = dense_from_topk(inputs[f"{side}_topk_idx"], inputs[f"{side}_topk_logp"], self.vocab_size)
            log_p = torch.full_like(like, -math.log(self.vocab_size))
            counts = mask.sum(-1).tolist()
            for b, n in enumerate(counts):
                log_p[b][mask[b]] = dense[b, :n].to(like.device)
            return log_p
        if self.teacher is None:
            raise ValueError("this loss needs the teacher: pass a teacher model or precomputed top-k log-probabilities")
        with torch.no_grad():
            logits = window_logits(self.teacher, inputs[f"{side}_input_ids"], inputs[f"{side}_attention_mask"], keep)
        return L.log_probs(logits, self.vocab_size)

    def _alpha(self, side: str, log_p, log_q, labels, mask):
        s = self.loss_settings
        if not s.adaptive_alpha or log_p is None:
            return s.alpha
        # chosen: how much likelier the teacher finds its own response; rejected: the student its own
        gap = (L.sequence_prob_gap(log_p, log_q, labels, mask) if side == "chosen"
               else L.sequence_prob_gap(log_q, log_p, labels, mask)).detach()
        self._store(f"gap/{side}", gap.mean().item())
        ref = self.reference_gap[side]
        if ref is None:
            self._gap_history[side].append(gap.mean().item())
            if len(self._gap_history[side]) >= s.alpha_reference_steps:
                ref = self.reference_gap[side] = sum(self._gap_history[side]) / len(self._gap_history[side])
                if ref <= 0:
                    log.warning("adaptive alpha (%s responses): the reference gap over the first %d steps is %.4g <= 0 "
                                "(the student is already as likely as the teacher on them); alpha stays at %g",
                                side, s.alpha_reference_steps, ref, s.alpha)
            return s.alpha
        return L.adaptive_alpha(gap, ref, s.alpha)

    def _store(self, key: str, value: float) -> None:
        self._stored[key].append(float(value))

    def current_beta(self) -> float:
        s = self.loss_settings
        return L.scheduled_beta(s.beta, self.state.global_step, self.state.max_steps or 0, gradual=s.gradual_beta,
                                start=s.beta_start, end=s.beta_end, ramp_ratio=s.beta_ramp_ratio)

    # -- Trainer hooks
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        s = self.loss_settings
        spec = L.LOSS_TYPES[s.loss_type]
        beta = self.current_beta()
        w_chosen, w_rejected = L.side_weights(s.loss_type, beta)
        sides: dict[str, Optional[L.Side]] = {"chosen": None, "rejected": None}
        alphas: dict[str, object] = {"chosen": s.alpha, "rejected": s.alpha}
        for side, divergence, weight in (("chosen", spec.chosen, w_chosen), ("rejected", spec.rejected, w_rejected)):
            if divergence is None or weight == 0.0:
                continue
            all_labels = inputs[f"{side}_labels"]
            keep = response_window(all_labels)
            logits = window_logits(model, inputs[f"{side}_input_ids"], inputs[f"{side}_attention_mask"], keep)
            labels = all_labels[:, all_labels.shape[1] - keep + 1:]
            mask = labels != IGNORE
            log_q = L.log_probs(logits, self.vocab_size)
            del logits
            log_p = self._teacher_logp(inputs, side, mask, log_q, keep) if spec.needs_teacher else None
            sides[side] = L.Side(log_q, log_p, labels, mask)
            alphas[side] = self._alpha(side, log_p, log_q, labels, mask)
        loss, terms = L.distillation_loss(s.loss_type, sides["chosen"], sides["rejected"], alphas["chosen"],
                                          alphas["rejected"], beta=beta, jsd_weight=s.jsd_weight)
        for name, value in terms.items():
            self._store(f"loss/{name}", value.item())
        for side in SIDES:
            if sides[side] is not None and s.loss_type == "distillm_v2":
                a = alphas[side]
                self._store(f"alpha/{side}", a.mean().item() if isinstance(a, torch.Tensor) else float(a))
        self._store("beta", beta)
        return loss

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        for key, values in self._stored.items():
            if values:
                logs[key] = sum(values) / len(values)
        self._stored = defaultdict(list)
        super().log(logs, start_time)


class MetricsCallback(TrainerCallback):
    """Forwards every numeric log entry to `log_fn(metrics, step)` (MLflow in the steps layer) and
    keeps the history for plots."""

    def __init__(self, log_fn: Optional[Callable[[dict, int], None]] = None, prefix: str = ""):
        self.log_fn, self.prefix = log_fn, prefix
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {f"{self.prefix}{k}": float(v) for k, v in (logs or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        if not metrics:
            return
        self.history.append({"step": state.global_step, **metrics})
        if self.log_fn is not None:
            self.log_fn(metrics, state.global_step)


# ---------------------------------------------------------------- student model

def load_student(model_id: str, lora: LoraSettings, dtype: torch.dtype, device: str):
    """The student with a fresh LoRA adapter (QLoRA: the base in 4-bit NF4, CUDA only)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if lora.qlora:
        if device != "cuda":
            raise ValueError("qlora needs a CUDA GPU (bitsandbytes 4-bit); use plain LoRA on CPU")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            raise ImportError("qlora needs bitsandbytes: pip install bitsandbytes") from exc
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
    if lora.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=lora.gradient_checkpointing)
    else:
        model = model.to(device)
    targets = [t.strip() for t in lora.lora_target_modules.split(",") if t.strip()]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if targets != ["all-linear"] and not set(targets) & present:
        raise ValueError(f"none of the LoRA target modules {targets} exist in {model_id}")
    config = LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, task_type="CAUSAL_LM",
                        target_modules=targets[0] if targets == ["all-linear"] else [t for t in targets if t in present])
    model = get_peft_model(model, config)
    if lora.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def merge_and_save(peft_model, tokenizer, out_dir: str | Path) -> Path:
    """LoRA merged into the base weights, saved with tokenizer and generation config."""
    out_dir = Path(out_dir)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if getattr(merged, "generation_config", None) is not None:
        merged.generation_config.save_pretrained(out_dir)
    return out_dir
