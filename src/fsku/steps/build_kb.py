"""build_kb: corpus folder -> knowledge base (chunks, BM25, FAISS), tracked and registered.

Usage:
    python -m fsku.steps.build_kb [--recipe experiments/<name>/build_kb.yaml] [--corpus DIR --out DIR ...] [--no-progress]
    fsku build-kb --corpus DIR --out DIR [--chunk-size N] [--chunk-overlap N] [--embedding-model ID_OR_PATH]
                  [--bm25-tokenizer NAME]
    mlflow run . -e build_kb --env-manager local -P corpus=data/sample_corpus [-P chunk_size=480 ...]

Output artifact: the KB folder (see fsku.kb), logged under `kb/` and registered as the
pyfunc model `fsku-kb` (predict: questions -> ranked hits). Files not ingested are listed in the
KB's skipped.jsonl and counted in the metrics `skipped_<reason>` (fsku.ingest.SKIP_REASONS).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pandas as pd

from .. import tracking
from ..config import BuildKBConfig
from ..evaluate.compare import format_interval
from ..evaluate.retrieval import evaluate_retrieval
from ..ingest import SKIP_REASONS
from ..kb import build_knowledge_base
from .args import step_main
from .naming import KB_MODEL_DESCRIPTION, kb_lineage, run_labels

log = logging.getLogger(__name__)


def hit_curve_figure(curve: dict[int, float], title: str):
    from .plotting import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ks = sorted(curve)
    ax.plot(ks, [curve[k] for k in ks], marker="o")
    ax.set_xlabel("k")
    ax.set_ylabel("hit@k")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def run_step(cfg: BuildKBConfig, progress: bool = True) -> dict:
    """Build the KB into cfg.out, score it on cfg.labels (if any), log and register it."""
    with tracking.run("build_kb", dataclasses.asdict(cfg), **run_labels("build_kb", cfg)) as active:
        kb, stats = build_knowledge_base(cfg, progress=progress)
        metrics = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        metrics.update({f"seconds_{k}": v for k, v in stats["timings"].items()})
        # every known reason, 0 included: "no link left the corpus" is then a recorded fact that runs can be
        # compared and searched on (metrics.skipped_symlink_outside_corpus > 0), not a missing metric
        metrics.update({f"skipped_{k}": 0 for k in SKIP_REASONS})
        metrics.update({f"skipped_{k}": v for k, v in stats["skipped_by_reason"].items()})
        tracking.log_metrics(metrics)
        documents = pd.DataFrame(kb.manifest.get("documents", []))
        if not documents.empty:  # the corpus as a run input: one row per document (source, sha256, title, level)
            tracking.log_dataset(documents, name=f"fsku-corpus-{Path(cfg.corpus).name}", source=str(cfg.corpus),
                                 context="corpus", tags={"corpus_sha256": str(kb.manifest.get("corpus_sha256", ""))[:16]})
        result = {"run_id": active.info.run_id, "kb": str(Path(cfg.out).resolve()), "stats": stats}
        if cfg.labels:
            from ..jsonl import iter_jsonl

            labels = pd.DataFrame([obj for _, obj in iter_jsonl(cfg.labels)])
            if not labels.empty:
                tracking.log_dataset(labels, name=f"fsku-retrieval-labels-{Path(cfg.labels).stem}", source=str(cfg.labels),
                                     context="evaluation")
            rcfg = dataclasses.replace(kb.retrieve_defaults(), top_k=cfg.top_k, candidates=max(50, cfg.top_k))
            rmetrics, table = evaluate_retrieval(kb, cfg.labels, rcfg)
            curve = rmetrics.pop("curve")
            result["retrieval_intervals"] = rmetrics.pop("intervals")
            tracking.log_metrics({f"retrieval_{k}": v for k, v in rmetrics.items()})
            for k, v in curve.items():
                tracking.log_metrics({"retrieval_hit_curve": v}, step=k)
            tracking.log_figure(hit_curve_figure(curve, f"hit@k ({cfg.fusion}, w_bm25={cfg.w_bm25})"), "retrieval_hit_at_k.png")
            tracking.log_table(table, "retrieval_per_query.json")
            result["retrieval"] = rmetrics
        tracking.log_artifacts(cfg.out, "kb")
        if cfg.register_as:
            from ..infer.orchestrate import kb_version

            tags, description = kb_lineage(kb.manifest, kb_version(kb), active.info.run_id)
            version = tracking.register_knowledge_base(cfg.out, cfg.register_as, tags=tags, description=description,
                                                       model_description=KB_MODEL_DESCRIPTION)
            result["registered"] = f"models:/{cfg.register_as}/{version}"
        result["tracking_uri"] = tracking.tracking_uri()
    return result


def report(cfg: BuildKBConfig, result: dict) -> list[str]:
    s = result["stats"]
    lines = [f"knowledge base: {result['kb']}  ({s['documents']} documents, {s['chunks']} chunks, "
             f"{s['skipped']} skipped {s['skipped_by_reason'] or ''})",
             f"mlflow run: {result['run_id']}  tracking: {result['tracking_uri']}"]
    if "registered" in result:
        lines.append(f"registered: {result['registered']}  (mlflow.pyfunc.load_model('{result['registered']}'))")
    if "retrieval" in result:
        r = result["retrieval"]
        ivs = result.get("retrieval_intervals", {})
        lines.append("retrieval (95 % intervals): " + "; ".join(f"{k} {format_interval(v)}" for k, v in ivs.items())
                     + f"; mean_hit_chars {r['mean_hit_chars']:.0f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    return step_main(argv, BuildKBConfig, "fsku build-kb", __doc__, run_step, report)


if __name__ == "__main__":
    sys.exit(main())
