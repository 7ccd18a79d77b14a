"""Hybrid retrieval: pure fusion functions over score arrays / rankings, and the hit record.

- ``minmax_fusion``: each retriever's candidate scores are min-max normalised to [0, 1]; the
  fused score is ``w_bm25 * bm25 + (1 - w_bm25) * dense`` (a candidate missing from one list
  scores 0 there). The seed architecture's default is w_bm25 = 0.3.
- ``rrf_fusion``: reciprocal-rank fusion, ``sum_r w_r / (k + rank_r)`` with 1-based ranks.
"""
from __future__ import annotations

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

    def to_dict(self) -> dict:
        return {"chunk_id": self.chunk_id, "source": self.source, "text": self.text, "score": self.score,
                "path": self.path, "method": self.method, "rank": self.rank}


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
        for i, s in zip(ids, norm):
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
