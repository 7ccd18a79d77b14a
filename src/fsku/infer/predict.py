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
from typing import Optional

from ..config import InferConfig
from ..outputs import check_not_input
from .classify import ClassifiedQuestion, classify_question, read_question_rows

log = logging.getLogger(__name__)


@dataclass
class PredictResult:
    submission: Path
    records: list[dict]
    questions: list[ClassifiedQuestion]
    stats: dict


def classify_file(path: str | Path) -> list[ClassifiedQuestion]:
    out = []
    for lineno, qid, text in read_question_rows(path):  # lineno: the physical line the row starts on
        try:
            out.append(classify_question(qid, text))
        except ValueError as e:
            raise ValueError(f"{path}: row {lineno}: {e}") from None
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
    test ID exactly once and in order; a valid option number for multiple choice. An empty descriptive
    answer is reported as a ``warning:`` line (allowed, scores 0)."""
    problems: list[str] = []
    questions = {q.question_id: q for q in classify_file(test)}
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
            problems.append(f"warning: row {lineno}: {qid}: empty descriptive answer (valid, but scores 0)")
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


def predict(cfg: InferConfig, input_csv: str | Path, out_csv: str | Path, restart: bool = False,
            progress: bool = True, llm=None, kb=None, partial: Optional[str | Path] = None) -> PredictResult:
    """Answer every row of `input_csv` into `out_csv`. Finished rows go to ``<out>.partial.jsonl`` as
    they finish, so the same command after a crash or kill resumes without recomputing them."""
    from ..kb import KnowledgeBase
    from ..llm import load_llm
    from ..stores import AnswerCache, ResultLog
    from .answer import Answerer
    from .orchestrate import Orchestrator

    check_outputs(input_csv, out_csv, partial, cfg.kb, cfg.model)
    questions = classify_file(input_csv)
    t0 = time.perf_counter()
    if llm is None:
        llm = load_llm(cfg.model, backend=cfg.backend, dtype=cfg.dtype, device=cfg.device,
                       max_model_len=cfg.max_model_len, batch_size=cfg.batch_size)
    load_s = time.perf_counter() - t0
    if kb is None and cfg.use_context:
        kb = KnowledgeBase.load(cfg.kb)
    cache = AnswerCache(cfg.cache_dir)
    orch = Orchestrator(Answerer(llm, cfg, kb), cfg, cache)
    partial = Path(partial) if partial else partial_path(out_csv)
    results = ResultLog(partial, orch.fingerprint(file_sha256(input_csv)), restart=restart)
    t1 = time.perf_counter()
    records = orch.run(questions, results, progress=progress)
    run_s = time.perf_counter() - t1
    sub = write_submission(out_csv, [(r["ID"], r["answer"]) for r in records])
    problems = validate_submission(sub, input_csv)
    for p in problems:
        log.warning("%s: %s", sub, p)
    errors = [p for p in problems if not p.startswith("warning:")]
    if errors:
        raise RuntimeError(f"{sub}: the written submission does not validate: {errors[:5]}")
    cache.close()
    stats = {**orch.stats, "questions": len(questions), "load_s": load_s, "run_s": run_s,
             "breaker_state": orch.breaker.state.value, "cache_entries": len(cache)}
    return PredictResult(sub, records, questions, stats)
