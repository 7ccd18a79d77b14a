"""build_kb: corpus folder -> knowledge base (chunks, BM25, FAISS), tracked and registered.

Usage:
    mlflow run . -e build_kb --env-manager local -P corpus=data/sample_corpus [-P chunk_size=480 ...]
    fsku build-kb --corpus DIR --out DIR [--chunk-size N] [--chunk-overlap N] [--embedding-model ID_OR_PATH] [--bm25-tokenizer NAME]

Output artifact: the KB folder (see fsku.kb), logged under `kb/` and registered as the
pyfunc model `fsku-kb` (predict: questions -> ranked hits).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import pandas as pd

from .. import tracking
from ..config import BuildKBConfig, RetrieveConfig, load_recipe
from ..evaluate.retrieval import count_relevant_chunks, evaluate_hits, load_labels
from ..kb import KnowledgeBase, build_knowledge_base

log = logging.getLogger(__name__)


def evaluate_retrieval(kb: KnowledgeBase, labels_path: str, cfg: RetrieveConfig) -> tuple[dict, pd.DataFrame]:
    """Retrieval metrics of `kb` on a labels file, plus a per-query table."""
    queries = load_labels(labels_path)
    hits = kb.search([q.question for q in queries], cfg)
    hit_dicts = [[h.to_dict() for h in hs] for hs in hits]
    n_rel = count_relevant_chunks(queries, kb.chunks[["source", "text"]].to_dict("records"))
    result = evaluate_hits(queries, hit_dicts, n_rel, ks=sorted({1, 3, 5, cfg.top_k}))
    rows = []
    for q, rel, hs in zip(queries, result["relevance"], hits, strict=False):
        first = next((i + 1 for i, r in enumerate(rel) if r), None)
        rows.append({"qid": q.qid, "question": q.question, "gold": q.gold_source, "first_relevant_rank": first,
                     "top1_path": hs[0].path if hs else "", "relevant_chunks": n_rel[len(rows)]})
    curve = {k: sum(any(r[:k]) for r in result["relevance"]) / len(queries) for k in range(1, cfg.top_k + 1)}
    return {**result["metrics"], "curve": curve}, pd.DataFrame(rows)


def hit_curve_figure(curve: dict[int, float], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def main(cfg: BuildKBConfig) -> dict:
    with tracking.run("build_kb", dataclasses.asdict(cfg)) as active:
        kb, stats = build_knowledge_base(cfg)
        metrics = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        metrics.update({f"seconds_{k}": v for k, v in stats["timings"].items()})
        metrics.update({f"skipped_{k}": v for k, v in stats["skipped_by_reason"].items()})
        tracking.log_metrics(metrics)
        result = {"run_id": active.info.run_id, "kb": str(Path(cfg.out).resolve()), "stats": stats}
        if cfg.labels:
            rcfg = dataclasses.replace(kb.retrieve_defaults(), top_k=cfg.top_k, candidates=max(50, cfg.top_k))
            rmetrics, table = evaluate_retrieval(kb, cfg.labels, rcfg)
            curve = rmetrics.pop("curve")
            tracking.log_metrics({f"retrieval_{k}": v for k, v in rmetrics.items()})
            for k, v in curve.items():
                tracking.log_metrics({"retrieval_hit_curve": v}, step=k)
            tracking.log_figure(hit_curve_figure(curve, f"hit@k ({cfg.fusion}, w_bm25={cfg.w_bm25})"), "retrieval_hit_at_k.png")
            tracking.log_table(table, "retrieval_per_query.json")
            result["retrieval"] = rmetrics
        tracking.log_artifacts(cfg.out, "kb")
        if cfg.register_as:
            result["registered"] = f"models:/{cfg.register_as}/{tracking.register_knowledge_base(cfg.out, cfg.register_as)}"
        result["tracking_uri"] = tracking.tracking_uri()
    return result


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """CLI flags for every BuildKBConfig field (--chunk-size, ...) plus --recipe."""
    parser = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="experiments/<name>/build_kb.yaml; flags override it")
    for f in dataclasses.fields(BuildKBConfig):
        kind = {int: int, float: float}.get(type(f.default), str) if f.default is not None else str
        if f.name in ("faiss_nlist", "faiss_nprobe"):
            kind = int
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_lenient(kind), default=None,
                            help=f.metadata.get("help", "") + f" (default: {f.default})")
    return parser


def _lenient(kind):
    """MLflow passes every parameter as a string ('320.0' for floats, '' for unset)."""
    def convert(value: str):
        if value in ("", "None", "none") and kind is not str:
            return None
        if kind is int:
            return int(float(value))
        return kind(value)
    convert.__name__ = kind.__name__
    return convert


def config_from_args(args: argparse.Namespace) -> BuildKBConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(BuildKBConfig)}
    for key in ("manifest", "labels", "length_tokenizer", "user_dict", "register_as"):
        if values.get(key) in ("", "none", "None"):
            values[key] = None if key != "register_as" else ""
    if args.recipe:
        return load_recipe(args.recipe, values)
    return BuildKBConfig(**{k: v for k, v in values.items() if v is not None})


def summary(result: dict) -> str:
    s = result["stats"]
    lines = [f"knowledge base: {result['kb']}  ({s['documents']} documents, {s['chunks']} chunks, "
             f"{s['skipped']} skipped {s['skipped_by_reason'] or ''})",
             f"mlflow run: {result['run_id']}  tracking: {result['tracking_uri']}"]
    if "registered" in result:
        lines.append(f"registered: {result['registered']}  (mlflow.pyfunc.load_model('{result['registered']}'))")
    if "retrieval" in result:
        r = result["retrieval"]
        lines.append("retrieval: " + ", ".join(f"{k}={v:.3f}" for k, v in r.items() if k.startswith(("hit", "mrr", "mean"))))
    return "\n".join(lines)


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        result = main(cfg)
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError) as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
