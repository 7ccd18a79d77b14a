"""synth_qa end to end: KB chunks -> teacher generations (resumable) -> filtered, split records.

Output folder (schemas in README 'synth_qa'):
    raw.jsonl            header + one line per generation task (the teacher's text), append-only
    accepted.jsonl       SyntheticQA records that passed every check (with their split)
    rejected.jsonl       {"ID", "stage", "reason", ...} per dropped generation
    {train,validation,test}.jsonl / .parquet   the accepted records by split (parquet: choices as JSON text)
    stats.json           counts by kind/type/difficulty/split, rejections by reason, timings
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..config import SynthQAConfig
from ..outputs import check_not_input
from ..stores import AnswerCache, ResultLog, digest
from .generate import GenerationSettings, load_chunks, plan_tasks, run_generation, sample_chunks
from .process import FilterSettings, Outcome, process
from .records import write_jsonl
from .split import SPLIT_NAMES
from .templates import load_templates

log = logging.getLogger(__name__)
PROJECT_EVAL_DIR = Path("evaluation")


@dataclass
class SynthResult:
    out: Path
    outcome: Outcome
    stats: dict
    raw: list[dict] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)


def read_eval_questions(paths: list[Path]) -> list[str]:
    """Question texts of evaluation files: CSV with a Question column, or JSONL with 'question'."""
    from ..jsonl import iter_jsonl

    out: list[str] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"decontamination file {path} not found")
        if path.suffix.lower() == ".csv":
            df = pd.read_csv(path, encoding="utf-8-sig", dtype=str)
            if "Question" not in df.columns:
                raise ValueError(f"{path}: expected a 'Question' column, got {list(df.columns)}")
            out.extend(q for q in df["Question"].dropna())
        elif path.suffix.lower() in (".jsonl", ".json"):
            for lineno, row in iter_jsonl(path):
                if not isinstance(row.get("question"), str):
                    raise ValueError(f"{path}:{lineno}: expected a 'question' string")
                out.append(row["question"])
        else:
            raise ValueError(f"{path}: decontamination files must be .csv or .jsonl")
    return out


def records_frame(items) -> pd.DataFrame:
    """Records as a DataFrame for parquet: `choices` as a JSON object string (option sets differ in
    size and are empty for descriptive items, which parquet structs cannot hold)."""
    from .records import SyntheticQA

    columns = [f.name for f in dataclasses.fields(SyntheticQA)]
    rows = [{**r.to_dict(), "choices": json.dumps(r.choices, ensure_ascii=False)} for r in items]
    return pd.DataFrame(rows, columns=columns)


def eval_files_for(cfg: SynthQAConfig) -> list[Path]:
    files = sorted(p for p in PROJECT_EVAL_DIR.glob("*") if p.suffix.lower() in (".csv", ".jsonl")) \
        if PROJECT_EVAL_DIR.is_dir() else []
    files += [Path(p.strip()) for p in cfg.decontam_files.split(",") if p.strip()]
    return files


def synthesize(cfg: SynthQAConfig, progress: bool = True) -> SynthResult:
    from ..index.sparse import get_tokenizer
    from ..llm import load_llm

    out = Path(cfg.out)
    check_not_input(out, {"--kb": cfg.kb, "--teacher": cfg.teacher}, "--out")
    out.mkdir(parents=True, exist_ok=True)
    chunks = load_chunks(cfg.kb)
    manifest = json.loads((Path(cfg.kb) / "manifest.json").read_text(encoding="utf-8")) \
        if (Path(cfg.kb) / "manifest.json").exists() else {}
    sources = sample_chunks(chunks, cfg.chunks_needed, cfg.seed, cfg.min_chunk_chars)
    if len(sources) < cfg.chunks_needed:
        log.warning("only %d usable chunks (asked for %d)", len(sources), cfg.chunks_needed)
    tasks = plan_tasks(list(sources["chunk_id"]), cfg.questions_per_chunk, cfg.mc_share, cfg.qtype_weights,
                       cfg.n_options, cfg.seed)
    if cfg.n_questions > 0:
        tasks = tasks[:cfg.n_questions]
    templates = load_templates()
    t0 = time.perf_counter()
    llm = load_llm(cfg.teacher, **cfg.llm_kwargs())
    load_s = time.perf_counter() - t0
    settings = GenerationSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size, cfg.max_chunk_tokens)
    fingerprint = {"teacher": llm.fingerprint(), "kb": manifest.get("corpus_sha256", ""),
                   "templates": sorted(t.version for t in templates.values()),
                   "settings": dataclasses.asdict(settings), "tasks": digest([t.task_id for t in tasks], 16)}
    raw_log = ResultLog(out / "raw.jsonl", fingerprint, restart=cfg.restart)
    cache = AnswerCache(cfg.cache_dir) if cfg.cache_dir else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc="teacher", unit="q")
    t1 = time.perf_counter()
    new_before = len(raw_log.done)
    raw = run_generation(tasks, sources, llm, templates, settings, raw_log, cache, progress=bar.update if bar else None)
    gen_s = time.perf_counter() - t1
    if bar:
        bar.close()
    judge = None
    if cfg.judge_model:
        from .judge import LLMJudge

        judge_llm = llm if cfg.judge_model == "teacher" else load_llm(cfg.judge_model, **cfg.llm_kwargs())
        judge = LLMJudge(judge_llm, cfg.max_chunk_tokens, cfg.judge_reading)
    eval_files = eval_files_for(cfg)
    eval_questions = read_eval_questions(eval_files)
    filt = FilterSettings(cfg.min_hangul, cfg.min_grounding, cfg.judge_threshold, cfg.dedup_threshold,
                          cfg.decontam_ngram, cfg.decontam_threshold, cfg.ratios, cfg.seed)
    t2 = time.perf_counter()
    outcome = process(raw, chunks, get_tokenizer("kiwi"), filt, eval_questions, judge)
    filter_s = time.perf_counter() - t2

    write_jsonl(outcome.accepted, out / "accepted.jsonl")
    with (out / "rejected.jsonl").open("w", encoding="utf-8") as fh:
        for r in outcome.rejected:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    for split in SPLIT_NAMES:
        items = [r for r in outcome.accepted if r.split == split]
        write_jsonl(items, out / f"{split}.jsonl")
        records_frame(items).to_parquet(out / f"{split}.parquet", index=False)
    acc = outcome.accepted
    generated_now = len(raw_log.done) - new_before
    teacher_s = sum(r.get("seconds", 0.0) for r in raw)
    stats = {
        "tasks": len(tasks), "source_chunks": len(sources), "generated": len(raw), "generated_this_run": generated_now,
        "accepted": len(acc), "rejected": len(outcome.rejected),
        "acceptance_rate": len(acc) / len(raw) if raw else 0.0,
        "accepted_by_kind": dict(Counter(r.kind for r in acc)), "accepted_by_qtype": dict(Counter(r.qtype for r in acc)),
        "accepted_by_difficulty": {str(k): v for k, v in sorted(Counter(r.difficulty_level for r in acc).items())},
        "accepted_by_split": dict(Counter(r.split for r in acc)),
        "generated_by_kind": dict(Counter(r["kind"] for r in raw)),
        "rejected_by_reason": dict(outcome.rejection_counts()),
        "rejected_by_stage": dict(Counter(r["stage"] for r in outcome.rejected)),
        "json_repairs": dict(outcome.repairs),
        "teacher_tokens": sum(r.get("n_tokens", 0) for r in raw),
        "teacher_seconds": teacher_s, "seconds_per_accepted": teacher_s / len(acc) if acc else None,
        "load_s": load_s, "generation_wall_s": gen_s, "filter_s": filter_s,
        "teacher": cfg.teacher, "judge": cfg.judge_model or "",
        "kb": str(cfg.kb), "kb_corpus_sha256": manifest.get("corpus_sha256", "")[:12],
        "eval_files": [str(p) for p in eval_files], "eval_questions": len(eval_questions),
    }
    (out / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=2), encoding="utf-8")
    return SynthResult(out, outcome, stats, raw, [str(p) for p in eval_files])
