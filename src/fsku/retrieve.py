"""Hybrid retrieval: pure fusion functions over score arrays / rankings, and the hit record.

- ``minmax_fusion``: each retriever's candidate scores are min-max normalised to [0, 1]; the
  fused score is ``w_bm25 * bm25 + (1 - w_bm25) * dense`` (a candidate missing from one list
  scores 0 there). The seed architecture used w_bm25 = 0.3; on the FSKU statute labels 0.5 is
  better with our chunks (see benchmarks/bench_retrieval.py), so 0.5 is the default.
- ``rrf_fusion``: reciprocal-rank fusion, ``sum_r w_r / (k + rank_r)`` with 1-based ranks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np


@dataclass
class Hit:
    chunk_id: str
    text: str
    score: float
    source: str
    method: str
    path: str = ""
    rank: int = 0
    # raw retriever scores, comparable across questions (the fused score is not): the dense cosine
    # (for a chunk outside the dense candidates, the lowest candidate cosine, an upper bound) and BM25
    dense: Optional[float] = None
    bm25: Optional[float] = None

    def to_dict(self) -> dict:
        return {"chunk_id": self.chunk_id, "source": self.source, "text": self.text, "score": self.score,
                "path": self.path, "method": self.method, "rank": self.rank, "dense": self.dense, "bm25": self.bm25}


def minmax_normalize(scores: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]. Constant input -> all ones when positive (every candidate equally
    good), zeros otherwise (e.g. BM25 with no matching term)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    lo, hi = scores.min(), scores.max()
    if hi - lo <= 1e-12:
        return np.ones_like(scores) if hi > 0 else np.zeros_like(scores)
    return (scores - lo) / (hi - lo)


def top_candidates(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the k best entries, best first (ties broken by lower index)."""
    scores = np.asarray(scores)
    k = min(k, scores.size)
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    idx = np.argpartition(-scores, k - 1)[:k]
    idx = idx[np.lexsort((idx, -scores[idx]))]
    return idx, scores[idx]


def minmax_fusion(candidates: dict[str, tuple[Sequence[int], Sequence[float]]],
                  weights: dict[str, float]) -> dict[int, float]:
    """Weighted sum of min-max normalised candidate scores per retriever."""
    fused: dict[int, float] = {}
    for name, (ids, scores) in candidates.items():
        w = weights.get(name, 0.0)
        norm = minmax_normalize(np.asarray(scores))
        for i, s in zip(ids, norm, strict=False):
            fused[int(i)] = fused.get(int(i), 0.0) + w * float(s)
        if w == 0.0:
            for i in ids:
                fused.setdefault(int(i), 0.0)
    return fused


def rrf_fusion(rankings: dict[str, Sequence[int]], k: int = 60,
               weights: Optional[dict[str, float]] = None) -> dict[int, float]:
    """Reciprocal-rank fusion of best-first id lists."""
    fused: dict[int, float] = {}
    for name, ids in rankings.items():
        w = 1.0 if weights is None else weights.get(name, 0.0)
        for rank, i in enumerate(ids, start=1):
            fused[int(i)] = fused.get(int(i), 0.0) + w / (k + rank)
    return fused


def rank_fused(fused: dict[int, float], top_k: int) -> list[tuple[int, float]]:
    """Best-first (id, score), ties broken by id for determinism."""
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]


FUSIONS: dict[str, Callable] = {"minmax": minmax_fusion, "rrf": rrf_fusion}


# ----------------------------------------------------------------------------- statute-reference prior
ARTICLE_REF = re.compile(r"제\s*(\d+)\s*조(?:\s*의\s*(\d+))?")
SUBORDINATE_SUFFIXES = ("시행령", "시행규칙", "감독규정", "규정", "고시")


def _compact(text: str) -> str:
    return re.sub(r"\s+", "", text)


def law_base_name(title: str) -> str:
    """'전자금융거래법 시행령' -> '전자금융거래법': the parent statute of a decree/rule."""
    t = title.strip()
    for suffix in SUBORDINATE_SUFFIXES[:2]:
        if t.endswith(suffix) and len(t) > len(suffix) + 1:
            return t[: -len(suffix)].strip()
    return t


def article_refs(question: str) -> set[str]:
    """Article numbers cited in a question, normalised to the chunk form ('제21조의3')."""
    return {f"제{m.group(1)}조" + (f"의{m.group(2)}" if m.group(2) else "") for m in ARTICLE_REF.finditer(question)}


def law_match(question: str, title: str) -> float:
    """1.0 when the question names this document's law exactly (spacing ignored), 0.5 when it
    names its parent statute (a 시행령/시행규칙 of the named law), else 0."""
    return _law_match_compact(_compact(question), _compact(title), _compact(law_base_name(title)))


def _law_match_compact(q: str, title: str, base: str) -> float:
    if len(title) >= 3 and title in q:
        return 1.0
    if base != title and len(base) >= 3 and base in q:
        return 0.5
    return 0.0


class ReferenceIndex:
    """Chunk indices grouped by document title and by (title, article), so the prior for a
    question touches only the chunks it favours (a query costs ~0.1 ms, not a pass over all chunks)."""

    def __init__(self, titles: Sequence[str], articles: Sequence[str]):
        self.by_title: dict[str, list[int]] = {}
        self.compact_names: dict[str, tuple[str, str]] = {}
        self.by_article: dict[tuple[str, str], list[int]] = {}
        for i, (title, art) in enumerate(zip(titles, articles, strict=False)):
            self.by_title.setdefault(title, []).append(i)
            if art:
                self.by_article.setdefault((title, art), []).append(i)
        self.compact_names = {t: (_compact(t), _compact(law_base_name(t))) for t in self.by_title}

    def prior(self, question: str, w_law: float, w_article: float) -> dict[int, float]:
        """w_law * law_match + w_article * [cited article of a named (or, when no law is named,
        any) law]. Empty when the question names no law and cites no article."""
        refs = article_refs(question)
        q = _compact(question)
        title_score = {t: _law_match_compact(q, *names) for t, names in self.compact_names.items()}
        any_law = any(v > 0 for v in title_score.values())
        prior: dict[int, float] = {}
        for title, lm in title_score.items():
            if lm > 0 and w_law > 0:
                for i in self.by_title[title]:
                    prior[i] = prior.get(i, 0.0) + w_law * lm
            if refs and w_article > 0 and (lm > 0 or not any_law):
                for ref in refs:
                    for i in self.by_article.get((title, ref), ()):
                        prior[i] = prior.get(i, 0.0) + w_article * (lm if any_law else 1.0)
        return prior


def reference_prior(question: str, titles: Sequence[str], articles: Sequence[str],
                    w_law: float, w_article: float) -> dict[int, float]:
    """Additive prior per chunk index (see ReferenceIndex.prior)."""
    return ReferenceIndex(titles, articles).prior(question, w_law, w_article)
