"""distill end to end: synth_qa records -> prompts -> teacher and student responses (resumable) ->
pairs -> LoRA training with the chosen loss (resumable from checkpoints) -> merged student, for
one or more rounds. MLflow stays in the steps layer: progress and metrics leave through `log_fn`.

Output folder:
    prompts.jsonl, responses_r<R>_{teacher,student}.jsonl, pairs_r<R>.jsonl   (schemas in data.py)
    responses_validation_teacher.jsonl   the teacher's greedy answers to the held-out prompts (heldout.py)
    round_<R>/checkpoints/   Trainer checkpoints (adapter + optimizer), resumed when present
    round_<R>/merged/        the student with that round's LoRA merged in
    merged/                  the final student (= last round's merged), tokenizer, generation config
    stats.json               counts, timings, final metrics
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..config import DistillConfig, InferConfig, LLMSettings
from ..jsonl import write_jsonl
from ..outputs import check_not_input, check_replaceable, remove_ours, staged_folder
from ..stores import AnswerCache
from ..synth.records import read_jsonl
from .data import build_prompts, generate_responses, make_pairs, with_reference_labels
from .heldout import HeldOutCallback, build_features
from .losses import LOSS_TYPES
from .trainer import (
    DistillTrainer,
    MetricsCallback,
    PairCollator,
    PairDataset,
    check_shared_vocab,
    encode_pairs,
    load_student,
    merge_and_save,
    precompute_topk,
    topk_tail_mass,
)

log = logging.getLogger(__name__)
# what proves a folder is a distill output written here (prompts.jsonl comes first, stats.json last), and
# that merged/ is a model: only such folders are resumed into, restarted or replaced
OUT_MARKERS = ("stats.json", "prompts.jsonl")
MODEL_MARKERS = ("config.json",)
LogFn = Callable[[dict, int], None]


@dataclass
class DistillResult:
    out: Path
    merged: Path
    stats: dict
    history: list[dict] = field(default_factory=list)


def pick_device_dtype(device: str, dtype: str):
    import torch

    from ..llm.hf import pick_device

    dev = pick_device(device)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if dev.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    return dev, torch_dtype


def load_records(data: str | Path, split: str, max_rows: int = 0) -> list:
    path = Path(data) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run synth_qa first (its output folder holds train/validation/test.jsonl)")
    records = read_jsonl(path)
    return records[:max_rows] if max_rows else records


def retrieve_contexts(records, cfg: DistillConfig, llm) -> list[str]:
    """Context blocks exactly as inference builds them (same retrieval, gate and token budget)."""
    from ..infer.answer import Answerer
    from ..kb import KnowledgeBase

    kb = KnowledgeBase.load(cfg.kb)
    answerer = Answerer(llm, InferConfig(context=cfg.context), kb)
    hits = answerer.retrieve([r.question for r in records])
    return [answerer.context_text(h, terms)[0] for h, terms in hits]


def scorer_id(teacher_id: str, model) -> str:
    """The top-k cache's name for the teacher as this model computes it: weights, dtype, device."""
    p = next(model.parameters())
    return f"{teacher_id}|{p.dtype}|{p.device}"


def mc_style(cfg: DistillConfig) -> str:
    """The multiple-choice prompt style of the training prompts: predict's for label targets (the position it
    reads), the plain prompt for generated answers (a prefill would have to be generated too)."""
    return cfg.mc_prompt if cfg.mc_target == "label" else "plain"


def _fit_prompts(rows: list[dict], tok, cfg: DistillConfig, what: str, stats: Optional[dict] = None) -> list[dict]:
    """Prompts longer than max_prompt_length tokens (the student's tokenizer `tok`) dropped, with a warning
    and a count."""
    from .data import drop_long_prompts

    def render(messages):
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    kept, dropped = drop_long_prompts(rows, lambda t: len(tok(t, add_special_tokens=False)["input_ids"]), render,
                                      cfg.max_prompt_length)
    if dropped:
        log.warning("%d of the %d %s prompts are longer than max_prompt_length %d tokens and are left out (raise "
                    "max_prompt_length and max_model_len, or give the context fewer tokens)", dropped, len(rows), what,
                    cfg.max_prompt_length)
    if stats is not None:
        stats["prompts_too_long"] = dropped
    return kept


def heldout_prompts(cfg: DistillConfig, teacher_llm, tok, out: Path, cache, progress: bool
                    ) -> Optional[tuple[list[dict], dict[str, dict]]]:
    """(prompt rows, teacher responses) of up to `eval_prompts` validation records, with the context
    inference would give them (prompts over max_prompt_length in `tok`, the student's tokenizer, left out);
    None when off or when the data has no validation split (a warning)."""
    from tqdm.auto import tqdm

    from ..config import ResponseSettings, block_view

    if cfg.eval_prompts == 0:
        return None
    if not (Path(cfg.data) / "validation.jsonl").is_file():
        log.warning("%s has no validation.jsonl: no held-out KL during training (eval_prompts 0 silences this)", cfg.data)
        return None
    records = load_records(cfg.data, "validation")
    if not records:
        log.warning("%s/validation.jsonl holds no records: no held-out KL during training", cfg.data)
        return None
    if len(records) > cfg.eval_prompts:  # a seeded sample: the file is in chunk order, its head is a few articles
        import random

        keep = sorted(random.Random(cfg.seed).sample(range(len(records)), cfg.eval_prompts))
        records = [records[i] for i in keep]
    contexts = retrieve_contexts(records, cfg, teacher_llm) if cfg.context != "none" else None
    rows = _fit_prompts(build_prompts(records, contexts, mc_style(cfg), cfg.mc_target), tok, cfg, "held-out")
    settings = block_view(cfg, ResponseSettings, temperature=0.0, top_p=1.0)  # greedy: one reference per prompt
    with tqdm(total=len(rows), desc="teacher responses (held out)", unit="prompt", disable=not progress) as bar:
        responses = generate_responses(rows, teacher_llm, settings, out / "responses_validation_teacher.jsonl", cache,
                                       progress=bar.update)
    return rows, responses


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _release_memory() -> None:
    """Collect what the caller just dropped (and return cached CUDA blocks)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def distill(cfg: DistillConfig, log_fn: Optional[LogFn] = None, progress: bool = True,
            callbacks: Sequence = ()) -> DistillResult:
    """Responses -> pairs -> LoRA training (per round) -> merged student in `<out>/merged`.
    `callbacks` are extra transformers TrainerCallbacks (the tune step's pruning callback)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from ..llm import load_llm
    from ..llm.resolve import resolve_model

    out = Path(cfg.out)
    check_not_input(out, {"--data": cfg.data, "--teacher": cfg.teacher, "--student": cfg.student, "--kb": cfg.kb}, "--out")
    check_replaceable(out, OUT_MARKERS, "--out")
    check_replaceable(out / "merged", MODEL_MARKERS, "--out merged folder")
    if cfg.restart:
        remove_ours(out, OUT_MARKERS, "--out")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    device, torch_dtype = pick_device_dtype(cfg.device, cfg.dtype)
    teacher_path, student_path = resolve_model(cfg.teacher), resolve_model(cfg.student)

    def load_teacher():
        """A transformers copy of the teacher for logits (when the generation backend has none, or was released)."""
        return AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch_dtype).to(device).eval()

    teacher_tok, student_tok = AutoTokenizer.from_pretrained(teacher_path), AutoTokenizer.from_pretrained(student_path)
    vocab_size = check_shared_vocab(student_tok, teacher_tok)
    if student_tok.pad_token_id is None:
        student_tok.pad_token = student_tok.eos_token

    records = load_records(cfg.data, "train", cfg.max_prompts)
    if not records:
        raise ValueError(f"{cfg.data}/train.jsonl holds no records")
    cache = AnswerCache(cfg.cache_dir)
    # batch_size is distill's training batch; generation keeps the LLM layer's default batch
    gen_kw = cfg.llm_kwargs(max_model_len=cfg.max_model_len + cfg.max_new_tokens, batch_size=LLMSettings.batch_size)
    stats: dict = {"train_records": len(records), "vocab_size": vocab_size, "device": device,
                   "dtype": str(torch_dtype).replace("torch.", ""), "rounds": []}

    # teacher responses (once: the teacher does not change between rounds)
    teacher_llm = load_llm(cfg.teacher, **gen_kw)
    # names the teacher's weights in the top-k cache (the generation backend's fingerprint: path, size, mtime);
    # `scorer_id` adds how the model computing the top-k runs (the backend's own HF model or a transformers copy)
    teacher_id = f"{teacher_llm.fingerprint()}|{teacher_path}"
    contexts = retrieve_contexts(records, cfg, teacher_llm) if cfg.context != "none" else None
    prompt_rows = _fit_prompts(build_prompts(records, contexts, mc_style(cfg), cfg.mc_target), student_tok, cfg,
                               "training", stats)
    if not prompt_rows:
        raise ValueError(f"every training prompt is longer than max_prompt_length {cfg.max_prompt_length} tokens")
    write_jsonl(prompt_rows, out / "prompts.jsonl")
    t0 = time.perf_counter()
    with tqdm(total=len(prompt_rows), desc="teacher responses", unit="prompt", disable=not progress) as bar:
        teacher_resp = generate_responses(prompt_rows, teacher_llm, cfg, out / "responses_r1_teacher.jsonl", cache,
                                          progress=bar.update)
    stats["teacher_response_s"] = round(time.perf_counter() - t0, 1)
    # how often the teacher's label is the record's own answer (its accuracy on the training items)
    label_rows = [r for r in prompt_rows if r.get("target") == "label" and r["prompt_id"] in teacher_resp]
    if label_rows:
        stats["teacher_label_accuracy"] = sum(teacher_resp[r["prompt_id"]]["text"].strip() == str(r["reference"]).strip()
                                              for r in label_rows) / len(label_rows)
    if cfg.mc_chosen == "reference":
        teacher_resp = with_reference_labels(prompt_rows, teacher_resp)
    heldout_rows = heldout_prompts(cfg, teacher_llm, student_tok, out, cache, progress)
    needs_teacher = LOSS_TYPES[cfg.loss_type].needs_teacher
    # the backend's own HF model serves the teacher logits when it has one
    teacher_model = getattr(teacher_llm, "model", None) if needs_teacher else None
    if not hasattr(teacher_model, "forward"):
        # nothing to reuse (the loss reads only teacher responses, e.g. sft; or a vLLM engine): release the
        # generation backend; online logits then come from a transformers copy
        teacher_model = teacher_llm = None
        _release_memory()
        if needs_teacher and cfg.teacher_logits == "online":
            teacher_model = load_teacher()
    heldout_features: list[dict] = []
    if heldout_rows:
        # the teacher's top-k on the held-out responses, once for every round (a transformers copy when the
        # generation backend has none: it leaves memory again before the student loads)
        scorer = teacher_model if hasattr(teacher_model, "forward") else load_teacher()
        t0 = time.perf_counter()
        with tqdm(total=len(heldout_rows[0]), desc=f"held-out teacher top-{cfg.topk}", unit="prompt",
                  disable=not progress) as bar:
            heldout_features = build_features(*heldout_rows, student_tok, scorer, vocab_size=vocab_size, topk=cfg.topk,
                                              max_length=cfg.max_model_len, max_prompt_length=cfg.max_prompt_length,
                                              batch_size=cfg.batch_size, progress=bar.update, cache=cache,
                                              teacher_id=scorer_id(teacher_id, scorer))
        if not heldout_features:
            log.warning("the teacher gave no usable answer to the %d held-out prompts: no held-out KL during training",
                        len(heldout_rows[0]))
        stats["heldout_prompts"] = len(heldout_features)
        stats["heldout_tail_mass"] = topk_tail_mass(heldout_features, ("chosen",))
        stats["heldout_topk_s"] = round(time.perf_counter() - t0, 1)
        if scorer is not teacher_model:
            del scorer
            _release_memory()

    history: list[dict] = []
    current_student = student_path
    merged = out / "merged"
    for rnd in range(1, cfg.rounds + 1):
        rstats: dict = {"round": rnd}
        rdir = out / f"round_{rnd}"
        # student responses from the student as it stands at the start of the round
        t0 = time.perf_counter()
        student_llm = load_llm(str(current_student), **gen_kw)
        with tqdm(total=len(prompt_rows), desc=f"student responses (round {rnd})", unit="prompt",
                  disable=not progress) as bar:
            student_resp = generate_responses(prompt_rows, student_llm, cfg,
                                              out / f"responses_r{rnd}_student.jsonl", cache, progress=bar.update)
        del student_llm
        _release_memory()
        rstats["student_response_s"] = round(time.perf_counter() - t0, 1)
        pairs, counts = make_pairs(prompt_rows, teacher_resp, student_resp)
        rstats["pairs"] = counts.to_dict()
        log.info("round %d: %d pairs (%s)", rnd, len(pairs), counts.to_dict())
        if not pairs:
            raise ValueError(f"round {rnd}: no prompt has both a teacher and a student response ({counts.to_dict()})")
        write_jsonl(pairs, out / f"pairs_r{rnd}.jsonl")
        features, cut = encode_pairs(student_tok, pairs, cfg.max_model_len, cfg.max_prompt_length)
        rstats["prompts_cut"] = cut

        teacher_for_training = None
        if needs_teacher:
            if cfg.teacher_logits == "topk":
                if not hasattr(teacher_model, "forward"):
                    teacher_model = load_teacher()
                t0 = time.perf_counter()
                with tqdm(total=len(features), desc=f"teacher top-{cfg.topk}", unit="pair", disable=not progress) as bar:
                    got = precompute_topk(teacher_model, features, cfg.topk, vocab_size, batch_size=cfg.batch_size,
                                          progress=bar.update, cache=cache,
                                          teacher_id=scorer_id(teacher_id, teacher_model))
                rstats["teacher_topk_cached"] = got["cached"]
                rstats["teacher_topk_s"] = round(time.perf_counter() - t0, 1)
                rstats["teacher_tail_mass"] = topk_tail_mass(features)
                # the point of top-k: the teacher leaves memory before the student trains (reloaded next round)
                teacher_model = teacher_llm = None
                _release_memory()
            else:
                teacher_for_training = teacher_model

        torch.manual_seed(cfg.seed)
        student = load_student(str(current_student), cfg, torch_dtype, device)
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        rstats["trainable_parameters"] = trainable
        steps = cfg.max_steps
        args = TrainingArguments(
            output_dir=str(rdir / "checkpoints"), max_steps=steps if steps > 0 else -1, num_train_epochs=cfg.epochs,
            per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
            learning_rate=cfg.learning_rate, lr_scheduler_type="cosine",
            warmup_steps=int(round(cfg.warmup_ratio * steps)) if steps > 0 else 0, logging_steps=cfg.logging_steps,
            save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2, report_to="none",
            remove_unused_columns=False, seed=cfg.seed, data_seed=cfg.seed, use_cpu=device == "cpu",
            bf16=torch_dtype == torch.bfloat16, gradient_checkpointing=cfg.gradient_checkpointing,
            disable_tqdm=not progress, dataloader_num_workers=0, max_grad_norm=1.0)
        prefix = f"r{rnd}/" if cfg.rounds > 1 else ""
        callback = MetricsCallback(log_fn, prefix=prefix)
        measures = [HeldOutCallback(heldout_features, vocab_size, cfg.eval_steps, cfg.batch_size, log_fn, prefix)
                    ] if heldout_features else []
        trainer = DistillTrainer(
            model=student, args=args, train_dataset=PairDataset(features), data_collator=PairCollator(student_tok.pad_token_id),
            teacher=teacher_for_training, callbacks=[callback, *measures, *callbacks],
            loss=cfg,
            vocab_size=vocab_size)
        ckpt_dir = rdir / "checkpoints"
        resume = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
        if resume:
            log.info("round %d: resuming from %s", rnd, resume)
        t0 = time.perf_counter()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        result = trainer.train(resume_from_checkpoint=resume)
        measured_s = sum(m.seconds for m in measures)
        rstats["train_s"] = round(time.perf_counter() - t0 - measured_s, 1)  # the held-out measurements apart
        if measures:
            rstats["heldout_s"] = round(measured_s, 1)
        rstats["steps"] = trainer.state.global_step
        done = trainer.state.global_step - (int(resume.rsplit("-", 1)[-1]) if resume else 0)
        rstats["s_per_step"] = round(rstats["train_s"] / max(1, done), 3)
        rstats["train_loss"] = float(result.training_loss)
        rstats["resumed_from"] = resume or ""
        if device.startswith("cuda"):
            rstats["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        rstats["peak_rss_mb"] = peak_rss_mb()
        history.extend({"round": rnd, **h} for h in callback.history)
        for measure in measures:
            history.extend({"round": rnd, **h} for h in measure.history)
            if measure.history:  # first: step 0, or the first step after a resume
                rstats["heldout"] = {"first": measure.history[0], "final": measure.history[-1]}
        merge_and_save(trainer.model, student_tok, rdir / "merged")
        current_student = rdir / "merged"
        stats["rounds"].append(rstats)
        del trainer, student, teacher_for_training
        _release_memory()

    with staged_folder(merged, MODEL_MARKERS, "--out merged folder") as staging:
        shutil.copytree(current_student, staging, dirs_exist_ok=True)
    del teacher_model, teacher_llm
    _release_memory()
    stats["total_s"] = round(time.perf_counter() - t_start, 1)
    stats["config"] = dataclasses.asdict(cfg)
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    return DistillResult(out, merged, stats, history)
