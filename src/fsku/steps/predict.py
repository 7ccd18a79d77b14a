"""predict: test.csv -> submission.csv with one LLM (+ gated retrieval), tracked in MLflow.

Usage:
    python -m fsku.steps.predict [--recipe experiments/<name>/predict.yaml] [--input test.csv --out submission.csv ...]
                                 [--records FILE.jsonl] [--no-progress]
    fsku predict --input test.csv --out submission.csv --kb DIR --model ID_OR_PATH [--context gated ...]
    mlflow run . -e predict --env-manager local -P input=test.csv -P model=...

--records FILE.jsonl also writes every answer's record (confidence, time, fallback, path); its folder is
created before answering, so a path that cannot be written fails at once. The summary counts the
placeholders: `unanswered` (path none: no attempt of the model answered; their IDs follow), empty
questions, `truncated` (cut to fit the model) and `duplicates`; past --max-unanswered-share the
command fails (exit 2) after writing the submission and records. predict writes
finished rows to <out>.partial.jsonl as they finish; after a crash or `kill -9` the same command
resumes without recomputing them (--restart starts over). --out, its partial file and --records
must not be --input (nor lie inside --kb or --model): refused before the model loads. `fsku validate`
and `fsku score` check and score a submission.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Iterator

from ..config import PredictConfig
from .args import step_main
from .naming import run_labels
from .preflight import check_inputs

log = logging.getLogger(__name__)


def run_step(cfg: PredictConfig, progress: bool = True, llm=None, kb=None, records: Path | None = None) -> dict:
    """Answer cfg.input into cfg.out (and every record into `records`, JSONL) in one MLflow run (`llm` /
    `kb`: already loaded ones): {"result" (PredictResult), "submission", "stats", "run_id", "tracking_uri"}.
    Too many unanswered rows (cfg.max_unanswered_share) raise RuntimeError once the files, metrics and
    submission artifact are logged."""
    from .. import tracking
    from ..infer.predict import check_outputs, predict

    check_outputs(cfg.input, cfg.out, kb=cfg.kb, model=cfg.model)  # before the MLflow run and the model load
    check_inputs(models={"--model": cfg.model if llm is None else None},
                 kbs={"--kb": cfg.kb if kb is None and cfg.use_context else None}, files={"--input": cfg.input})
    with tracking.run("predict", dataclasses.asdict(cfg), tags={"fsku.model": cfg.model, "fsku.context": cfg.context},
                      **run_labels("predict", cfg)) as active:
        result = predict(tracking.resolve_model_fields(cfg, "model", "kb"), cfg.input, cfg.out, restart=cfg.restart,
                         progress=progress, llm=llm, kb=kb, records_out=records, enforce=False)
        tracking.log_metrics({k: v for k, v in result.stats.items() if isinstance(v, (int, float))})
        tracking.log_artifact(result.submission, "submission")
        if result.stats["unanswered_problem"]:
            raise RuntimeError(result.stats["unanswered_problem"])
        run_id = active.info.run_id
    return {"result": result, "submission": str(result.submission), "stats": result.stats, "run_id": run_id,
            "tracking_uri": tracking.tracking_uri()}


def main(argv: list[str] | None = None) -> int:
    extra = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # the one flag that is not a config field
    extra.add_argument("--records", type=Path)
    known, rest = extra.parse_known_args(argv)

    def run(cfg: PredictConfig, progress: bool = True) -> dict:
        if known.records:  # refused before answering, not after
            from ..infer.predict import partial_path
            from ..outputs import check_not_input

            check_not_input(known.records, {"--input": cfg.input}, "--records")
            check_not_input(known.records, {"--out": cfg.out, "--out's partial file": partial_path(cfg.out)}, "--records",
                            missing_too=True)
            known.records.parent.mkdir(parents=True, exist_ok=True)  # a path that cannot be written fails now
        return run_step(cfg, progress=progress, records=known.records)

    def report(cfg: PredictConfig, out: dict) -> Iterator[str]:
        from ..infer.predict import outcome_lines

        result, s = out["result"], out["stats"]
        yield (f"wrote {result.submission} ({s['questions']} answers; fallback {s['fallback']}, timeouts {s['timeouts']}, "
               f"errors {s['errors']}, cache hits {s['cache_hits']}; model load {s['load_s']:.1f} s, "
               f"answering {s['run_s']:.1f} s)")
        yield from outcome_lines(s)
        yield "validator: OK"

    return step_main(rest, PredictConfig, "fsku predict", __doc__, run, report)


if __name__ == "__main__":
    sys.exit(main())
