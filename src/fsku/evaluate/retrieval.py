"""Retrieval metrics on labelled queries: pure functions over per-query relevance lists, and
``evaluate_retrieval``, which runs a knowledge base's search over a labels file and scores it.

A labelled query is ``{"qid", "question", "source" | "law", "evidence"}``: a hit is relevant
when it comes from the gold document (file path, or file stem for ``law``) and contains the
evidence string, ignoring whitespace.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from ..config import RerankSettings, RetrieveConfig
from ..ingest.clean import clean_text, compact
from ..jsonl import iter_jsonl
from .compare import interval_metrics, intervals


@dataclass
class LabelledQuery:
    qid: str
    question: str
    gold_source: str  # file stem or relative path
    evidence: str


def load_labels(path: str | Path) -> list[LabelledQuery]:
    """Read and validate a labels JSONL file (errors name the file and line)."""
    path = Path(path)
    out = []
    for lineno, row in iter_jsonl(path):
        missing = [k for k in ("qid", "question", "evidence") if not row.get(k)]
        gold = row.get("source") or row.get("law")
        if not gold:
            missing.append("source|law")
        if missing:
            raise ValueError(f"{path}:{lineno}: missing field(s) {missing}; expected qid, question, source (or law), evidence")
        out.append(LabelledQuery(str(row["qid"]), str(row["question"]), str(gold), str(row["evidence"])))
    if not out:
        raise ValueError(f"{path}: no labelled queries")
    return out


def _source_matches(hit_source: str, gold: str) -> bool:
    hit = Path(hit_source)
    g = Path(gold)
    return hit.stem == g.stem if g.suffix == "" else hit.as_posix().endswith(g.as_posix())


def is_relevant(hit_source: str, hit_text: str, query: LabelledQuery) -> bool:
    # the corpus is cleaned at ingest, so the evidence string is cleaned the same way
    return _source_matches(hit_source, query.gold_source) and (
        compact(query.evidence) in compact(hit_text) or compact(clean_text(query.evidence)) in compact(hit_text))


def hit_at_k(relevance: Sequence[Sequence[bool]], k: int) -> float:
    """Share of queries with a relevant hit in the first k."""
    if not relevance:
        return 0.0
    return sum(any(r[:k]) for r in relevance) / len(relevance)


def recall_at_k(relevance: Sequence[Sequence[bool]], n_relevant: Sequence[int], k: int) -> float:
    """Mean over queries of (relevant hits in the first k) / (relevant chunks that exist, capped at k)."""
    vals = []
    for r, n in zip(relevance, n_relevant, strict=False):
        denom = min(max(n, 1), k)
        vals.append(min(sum(r[:k]), denom) / denom)
    return sum(vals) / len(vals) if vals else 0.0


def mrr_at_k(relevance: Sequence[Sequence[bool]], k: int) -> float:
    """Mean reciprocal rank of the first relevant hit within the first k (0 when none)."""
    if not relevance:
        return 0.0
    total = 0.0
    for r in relevance:
        for rank, rel in enumerate(r[:k], start=1):
            if rel:
                total += 1.0 / rank
                break
    return total / len(relevance)


def first_relevant_rank(relevance: Sequence[bool]) -> int | None:
    """1-based rank of the first relevant hit, None when no hit is relevant."""
    return next((rank for rank, ok in enumerate(relevance, start=1) if ok), None)


def evaluate_hits(queries: Sequence[LabelledQuery], hits: Sequence[Sequence[dict]],
                  n_relevant: Sequence[int] | None = None, ks: Sequence[int] = (1, 3, 5, 10)) -> dict:
    """Metrics for ranked hits (each a dict with source, text) against labelled queries."""
    relevance = [[is_relevant(h["source"], h["text"], q) for h in hs] for q, hs in zip(queries, hits, strict=False)]
    n_relevant = list(n_relevant) if n_relevant is not None else [max(1, sum(r)) for r in relevance]
    metrics = {}
    for k in ks:
        metrics[f"hit_at_{k}"] = hit_at_k(relevance, k)
        metrics[f"recall_at_{k}"] = recall_at_k(relevance, n_relevant, k)
    kmax = max(ks)
    metrics[f"mrr_at_{kmax}"] = mrr_at_k(relevance, kmax)
    lengths = [len(h["text"]) for hs in hits for h in hs]
    metrics["mean_hit_chars"] = sum(lengths) / len(lengths) if lengths else 0.0
    metrics["n_queries"] = len(queries)
    return {"metrics": metrics, "relevance": relevance}


def count_relevant_chunks(queries: Sequence[LabelledQuery], chunks: Sequence[dict]) -> list[int]:
    """How many KB chunks are relevant to each query (the recall denominator)."""
    compacted = [(c["source"], compact(c["text"])) for c in chunks]
    out = []
    for q in queries:
        ev = compact(clean_text(q.evidence))
        ev_raw = compact(q.evidence)
        out.append(sum(1 for src, txt in compacted if _source_matches(src, q.gold_source) and (ev in txt or ev_raw in txt)))
    return out


def evaluate_retrieval(kb, labels_path: str | Path, cfg: RetrieveConfig, reranker=None,
                       rerank: Optional[RerankSettings] = None, progress: bool = False) -> tuple[dict, pd.DataFrame]:
    """Retrieval metrics of `kb` (a fsku.kb.KnowledgeBase) searched with `cfg` on a labels file:
    hit/recall@{1,3,5,top_k}, MRR and `curve` (hit@k for k = 1..top_k), plus a per-query table (first
    relevant rank, top-1 path). ``dataclasses.replace(kb.retrieve_defaults(), top_k=...)`` scores the KB
    with the fusion settings it was built (or tuned) with. `reranker` (fsku.rerank): the first
    max(top_k, rerank.rerank_top_n) hits re-scored and fused with weight rerank.rerank_weight
    (RerankSettings' defaults when not given), then cut to top_k."""
    queries = load_labels(labels_path)
    questions = [q.question for q in queries]
    if reranker is None:
        hits = kb.search(questions, cfg)
    else:
        from tqdm.auto import tqdm

        from ..rerank import first_stage, rerank_hits

        rerank = rerank or RerankSettings()
        first = kb.search(questions, first_stage(cfg, rerank.rerank_top_n))
        hits = [rerank_hits(q, hs, reranker, rerank.rerank_top_n, rerank.rerank_weight, cfg.top_k)
                for q, hs in tqdm(list(zip(questions, first, strict=True)), desc="rerank", unit="q", disable=not progress)]
    hit_dicts = [[h.to_dict() for h in hs] for hs in hits]
    n_rel = count_relevant_chunks(queries, kb.chunks[["source", "text"]].to_dict("records"))
    result = evaluate_hits(queries, hit_dicts, n_rel, ks=sorted({1, 3, 5, cfg.top_k}))
    rows = []
    for q, rel, hs in zip(queries, result["relevance"], hits, strict=False):
        first = first_relevant_rank(rel)
        rows.append({"qid": q.qid, "question": q.question, "gold": q.gold_source, "first_relevant_rank": first,
                     "top1_path": hs[0].path if hs else "", "relevant_chunks": n_rel[len(rows)]})
    curve = {k: sum(any(r[:k]) for r in result["relevance"]) / len(queries) for k in range(1, cfg.top_k + 1)}
    # n and 95 % intervals of the headline numbers (Wilson for hit rates, bootstrap for MRR)
    found = intervals(rows, [f"hit_at_{k}" for k in sorted({1, 5, cfg.top_k})] + [f"mrr_at_{max(5, cfg.top_k)}"])
    return {**result["metrics"], **interval_metrics(found), "curve": curve, "intervals": found}, pd.DataFrame(rows)
