"""test.csv -> submission.csv: classify, answer (resumably), write ``ID,Answer`` in input order as
UTF-8 with BOM (like the competition files), and validate the result against the input."""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..config import InferConfig
from ..llm.base import TokenMeter
from ..outputs import check_not_input
from .classify import FLAG_EMPTY, FLAG_NO_STEM, ClassifiedQuestion, classify_question, read_question_rows

log = logging.getLogger(__name__)


@dataclass
class PredictResult:
    submission: Path
    records: list[dict]
    questions: list[ClassifiedQuestion]
    stats: dict


_FLAG_OUTCOME = {FLAG_EMPTY: "not asked: recorded with an empty answer (path none; valid, scores 0)",
                 FLAG_NO_STEM: "read as multiple choice with an empty stem (the model still picks an option)"}


def classify_file(path: str | Path, warn: bool = True) -> list[ClassifiedQuestion]:
    """The classified questions of a competition CSV. Its structure is read strictly (a ValueError
    naming the file and row, see `read_question_rows`); a row's CONTENT never ends the run: an empty
    question or options without a stem get a `flag` (see fsku.infer.classify) and, with `warn`, a
    warning naming the file, row and ID."""
    out = []
    for lineno, qid, text in read_question_rows(path):  # lineno: the physical line the row starts on
        q = classify_question(qid, text)
        if q.flag and warn:
            log.warning("%s: row %d (ID %s): %s; %s", path, lineno, qid, q.flag, _FLAG_OUTCOME[q.flag])
        out.append(q)
    return out


def write_submission(path: str | Path, rows: list[tuple[str, str]]) -> Path:
    """Write ID,Answer as UTF-8 with BOM, atomically (a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["ID", "Answer"])
    writer.writerows(rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8-sig", newline="")
    tmp.replace(path)
    return path


def validate_submission(submission: str | Path, test: str | Path) -> list[str]:
    """Problems of a submission against its test.csv (empty list = valid): columns ID,Answer; every
    test ID exactly once and in order; a valid option number for multiple choice (also for options
    without a stem). An empty descriptive answer, the one an empty question gets, is reported as a
    ``warning:`` line (allowed, scores 0)."""
    problems: list[str] = []
    questions = {q.question_id: q for q in classify_file(test, warn=False)}  # predict has warned about flags
    order = list(questions)
    raw = Path(submission).read_bytes()
    if not raw.startswith(b"\xef\xbb\xbf"):
        problems.append("not UTF-8 with BOM (the competition files are)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return problems + ["not valid UTF-8"]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames != ["ID", "Answer"]:
        return problems + [f"header must be ID,Answer, got {reader.fieldnames}"]
    seen: list[str] = []
    for lineno, row in enumerate(reader, start=2):
        qid, ans = row["ID"], (row["Answer"] or "").strip()
        if qid in seen:
            problems.append(f"row {lineno}: duplicate ID {qid!r}")
            continue
        seen.append(qid)
        q = questions.get(qid)
        if q is None:
            problems.append(f"row {lineno}: ID {qid!r} is not in the test file")
        elif q.question_type == "multiple_choice":
            if ans not in q.choices:
                problems.append(f"row {lineno}: {qid}: answer {ans!r} is not one of options {sorted(q.choices, key=int)}")
        elif not ans:
            why = " to an empty question" if q.flag == FLAG_EMPTY else ""
            problems.append(f"warning: row {lineno}: {qid}: empty descriptive answer{why} (valid, but scores 0)")
    missing = [i for i in order if i not in seen]
    if missing:
        problems.append(f"{len(missing)} test IDs missing, e.g. {missing[:5]}")
    elif [i for i in seen if i in questions] != order:
        problems.append("rows are not in the test file's order")
    return problems


def partial_path(out_csv: str | Path) -> Path:
    """Where predict keeps finished rows while it runs: <out>.partial.jsonl."""
    return Path(str(out_csv) + ".partial.jsonl")


def check_outputs(input_csv: str | Path, out_csv: str | Path, partial: Optional[str | Path] = None,
                  kb: Optional[str] = None, model: Optional[str] = None) -> None:
    """Refuse (OutputRefused, a ValueError) a submission or partial file that would overwrite the test
    file, or land inside the KB or model folder; called before anything loads."""
    inputs = {"--input": input_csv, "--kb": kb, "--model": model}
    check_not_input(out_csv, inputs, "--out")
    check_not_input(Path(partial) if partial else partial_path(out_csv), inputs, f"--out's partial file (of {out_csv})")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def outcome_counts(records: list[dict], questions: list[ClassifiedQuestion]) -> dict:
    """What a reader of the submission must know, over all its rows (resumed ones included):
    {"unanswered": rows no attempt of the model answered (path none, the question not empty),
    "empty_questions": empty questions (path none, never asked), "truncated", "duplicates",
    "unanswered_ids": the unanswered IDs in input order, "none_ids": every path-none ID}."""
    empty = {q.question_id for q in questions if q.flag == FLAG_EMPTY}
    none_ids = [r["ID"] for r in records if r.get("path") == "none"]
    unanswered = [i for i in none_ids if i not in empty]
    return {"unanswered": len(unanswered), "empty_questions": len(none_ids) - len(unanswered),
            "truncated": sum(bool(r.get("truncated")) for r in records),
            "duplicates": sum(bool(r.get("duplicate_of")) for r in records),
            "unanswered_ids": unanswered, "none_ids": none_ids}


def outcome_lines(stats: dict) -> list[str]:
    """The placeholder counts of a predict run as printed by `fsku predict` and the bundle's inference.py."""
    lines = [f"unanswered {stats['unanswered']} (path none: no model answer), empty questions {stats['empty_questions']}, "
             f"truncated {stats['truncated']}, duplicates {stats['duplicates']}"]
    if stats["none_ids"]:
        lines.append(f"path none IDs (first 10): {', '.join(stats['none_ids'][:10])}")
    return lines


def unanswered_problem(records: list[dict], counts: dict, max_share: float, where: str = "") -> str:
    """"" when the share of unanswered rows (`counts` of `outcome_counts`) is at most `max_share`, else
    one line naming how many, the first IDs and their errors."""
    n, total = counts["unanswered"], max(1, len(records))
    if n / total <= max_share:
        return ""
    errors = {r["ID"]: r.get("error", "") for r in records}
    first = "; ".join(f"{i}: {errors[i][:160]}" for i in counts["unanswered_ids"][:3])
    return (f"{where + ': ' if where else ''}{n} of {len(records)} questions ({n / total:.1%}) got no model answer "
            f"(path none), more than max_unanswered_share {max_share:g}; the submission and records are written, "
            f"but check the model: {first}" + (" ..." if n > 3 else ""))


def token_profile(records: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean tokens read, generated and decode steps per question, by question type, over the records
    the model answered (copies of an earlier answer and placeholders left out; re-asks and fallbacks are
    part of what a question cost); types with no such record are absent.
    {"multiple_choice": {"questions": n, "read": r, "generated": g, "decode_steps": d}, "descriptive": {...}}."""
    out: dict[str, dict[str, float]] = {}
    for kind in ("multiple_choice", "descriptive"):
        rows = [r for r in records if r.get("question_type") == kind and not r.get("duplicate_of")
                and r.get("path") != "none" and r.get("tokens_read")]
        if rows:
            out[kind] = {"questions": len(rows), "read": sum(r["tokens_read"] for r in rows) / len(rows),
                         "generated": sum(r.get("tokens_generated", 0) for r in rows) / len(rows),
                         "decode_steps": sum(r.get("decode_steps", 0) for r in rows) / len(rows)}
    return out


def predict(cfg: InferConfig, input_csv: str | Path, out_csv: str | Path, restart: bool = False,
            progress: bool = True, llm=None, kb=None, partial: Optional[str | Path] = None,
            records_out: Optional[str | Path] = None, enforce: bool = True) -> PredictResult:
    """Answer every row of `input_csv` into `out_csv` (and every record into `records_out`, JSONL).
    Finished rows go to ``<out>.partial.jsonl`` as they finish, so the same command after a crash or
    kill resumes without recomputing them.

    Placeholders are loud: the stats hold `unanswered`, `empty_questions`, `truncated`, `duplicates`
    and `unanswered_ids` (over the whole submission), a WARNING sums them up, and with `enforce` a
    share of unanswered rows over `cfg.max_unanswered_share` raises RuntimeError (one line: how many,
    the first IDs and errors) AFTER the submission and records are written, so the user can still
    decide; without it the line is in `stats["unanswered_problem"]` for the caller to raise."""
    from ..jsonl import write_jsonl
    from ..kb import KnowledgeBase
    from ..llm import load_llm
    from ..stores import AnswerCache, ResultLog
    from .answer import Answerer
    from .orchestrate import Orchestrator

    check_outputs(input_csv, out_csv, partial, cfg.kb, cfg.model)
    questions = classify_file(input_csv)
    t0 = time.perf_counter()
    if llm is None:
        llm = load_llm(cfg.model, **cfg.llm_kwargs())
    load_s = time.perf_counter() - t0
    meter = llm if isinstance(llm, TokenMeter) else TokenMeter(llm)  # tokens per question: the package projection
    if kb is None and cfg.use_context:
        kb = KnowledgeBase.load(cfg.kb)
    cache = AnswerCache(cfg.cache_dir)
    orch = Orchestrator(Answerer(meter, cfg, kb), cfg, cache)
    partial = Path(partial) if partial else partial_path(out_csv)
    results = ResultLog(partial, orch.fingerprint(file_sha256(input_csv)), restart=restart)
    t1 = time.perf_counter()
    records = orch.run(questions, results, progress=progress)
    run_s = time.perf_counter() - t1
    sub = write_submission(out_csv, [(r["ID"], r["answer"]) for r in records])
    if records_out is not None:
        write_jsonl(records, records_out)
    problems = validate_submission(sub, input_csv)
    for p in problems:
        log.warning("%s: %s", sub, p)
    errors = [p for p in problems if not p.startswith("warning:")]
    if errors:
        raise RuntimeError(f"{sub}: the written submission does not validate: {errors[:5]}")
    cache.close()
    counts = outcome_counts(records, questions)
    stats = {**orch.stats, **counts, "questions": len(questions), "load_s": load_s, "run_s": run_s,
             "breaker_state": orch.breaker.state.value, "cache_entries": len(cache),
             "tokens_read": meter.tokens_read, "tokens_generated": meter.tokens_generated,
             "decode_steps": meter.decode_steps}
    for kind, profile in token_profile(records).items():
        stats.update({f"tokens_{key}_per_{kind}": value for key, value in profile.items()})
    if counts["unanswered"] or counts["empty_questions"] or counts["truncated"]:
        log.warning("%s: %d of %d answers are placeholders (path none: %d unanswered by the model, %d empty "
                    "questions%s), %d questions were cut to fit the model, %d copied from an identical question",
                    sub, len(counts["none_ids"]), len(records), counts["unanswered"], counts["empty_questions"],
                    f"; IDs {counts['none_ids'][:10]}" if counts["none_ids"] else "", counts["truncated"],
                    counts["duplicates"])
    stats["unanswered_problem"] = unanswered_problem(records, counts, cfg.max_unanswered_share, str(sub))
    if enforce and stats["unanswered_problem"]:
        raise RuntimeError(stats["unanswered_problem"])
    return PredictResult(sub, records, questions, stats)
