"""Hybrid retrieval: pure fusion functions over score arrays / rankings, and the hit record.

- ``minmax_fusion``: each retriever's candidate scores are min-max normalised to [0, 1]; the
  fused score is ``w_bm25 * bm25 + (1 - w_bm25) * dense`` (a candidate missing from one list
  scores 0 there). The seed architecture used w_bm25 = 0.3; on the 65 FSKU dev labels 0.5-0.7 tie,
  and on the per-level validation set (fsku level-set) BM25 carries more: 0.7 is the default (see
  benchmarks/bench_retrieval.py and the README).
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
    rerank: Optional[float] = None  # the reranker's raw score (fsku.rerank), when one re-scored this hit

    def to_dict(self) -> dict:
        return {"chunk_id": self.chunk_id, "source": self.source, "text": self.text, "score": self.score,
                "path": self.path, "method": self.method, "rank": self.rank, "dense": self.dense, "bm25": self.bm25,
                "rerank": self.rerank}


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


def law_match(question: str, title: str, parent: Optional[str] = None, family: bool = True,
              family_share: float = 0.5) -> float:
    """1.0 when the question names this document's law exactly (spacing ignored), 0.5 when it
    names its parent statute (the act of a 시행령/시행규칙, or `parent`: the act a regulation
    implements), else 0. With `family`, naming a decree ('전자금융거래법 시행령') is not naming its
    act: the act then scores 0.5, as a family member (without it, the act's name inside the
    decree's counts as an exact match, the behaviour before the statute hierarchy). With `family`, a
    family member scores `family_share` instead of 0.5."""
    base = parent if parent and family else law_base_name(title)
    return _law_match_compact(_compact(question), _compact(title), _compact(base), family, family_share)


_LOWER_SUFFIXES = ("시행령", "시행규칙")


def _law_match_compact(q: str, title: str, base: str, family: bool = False, family_share: float = 0.5) -> float:
    share = family_share if family else 0.5
    if len(title) >= 3 and title in q:
        if not family or any(not q.startswith(_LOWER_SUFFIXES, m.end()) for m in re.finditer(re.escape(title), q)):
            return 1.0
        return share  # only ever named as '<title> 시행령/시행규칙': the question is about a lower level
    if base != title and len(base) >= 3 and base in q:
        return share
    return 0.0


# words that point a question at one level of the statute hierarchy (compact forms: spacing ignored)
LEVEL_CUES: dict[str, tuple[str, ...]] = {
    "decree": ("시행령", "대통령령"),
    "rule": ("시행규칙", "총리령", "부령으로", "부령에"),
    "regulation": ("감독규정", "규정에따르면", "규정상", "규정에서", "고시에따르면", "고시에서", "고시상", "세칙",
                   "금융위원회가정하", "금융위원회가정한"),
}
_ACT_CUE = re.compile(r"(?:^|[\s,])법(?:률)?\s*(?:상|에\s*따르면|에서|에\s*의하면)")


def level_cues(question: str) -> set[str]:
    """The statute levels the question's wording points at ('시행령에 따르면' → decree, '감독규정상' →
    regulation, a bare '법에 따르면' → act); empty when it names none. A law's name ('전자금융거래법에')
    is not a level cue: the law prior handles names."""
    q = _compact(question)
    found = {level for level, cues in LEVEL_CUES.items() if any(c in q for c in cues)}
    if _ACT_CUE.search(question):
        found.add("act")
    return found


class ReferenceIndex:
    """Chunk indices grouped by document title and by (title, article), so the prior for a
    question touches only the chunks it favours (a query costs ~0.1 ms, not a pass over all chunks).
    `parents`: the act each regulation implements (its family for the law prior); `levels`: each
    chunk's statute level (for the level prior)."""

    def __init__(self, titles: Sequence[str], articles: Sequence[str], parents: Optional[dict[str, str]] = None,
                 levels: Optional[Sequence[str]] = None):
        self.by_title: dict[str, list[int]] = {}
        self.by_article: dict[tuple[str, str], list[int]] = {}
        self.by_level: dict[str, list[int]] = {}
        for i, (title, art) in enumerate(zip(titles, articles, strict=False)):
            self.by_title.setdefault(title, []).append(i)
            if art:
                self.by_article.setdefault((title, art), []).append(i)
        for i, level in enumerate(levels or ()):
            self.by_level.setdefault(level, []).append(i)
        parents = parents or {}
        # (title, base without family, base with family) compact
        self.compact_names = {t: (_compact(t), _compact(law_base_name(t)), _compact(parents.get(t) or law_base_name(t)))
                              for t in self.by_title}

    def prior(self, question: str, w_law: float, w_article: float, family: bool = True,
              w_level: float = 0.0, family_share: float = 0.5) -> dict[int, float]:
        """w_law * law_match + w_article * [cited article of a named (or, when no law is named,
        any) law] + w_level * [the chunk's level is one the question's wording cues]. `family`:
        law_match's family rules (regulations under their act; a decree's name is not its act's).
        Empty when the question names no law, cites no article and cues no level."""
        return self.prior_and_cited(question, w_law, w_article, family, w_level, family_share)[0]

    def prior_and_cited(self, question: str, w_law: float, w_article: float, family: bool = True,
                        w_level: float = 0.0, family_share: float = 0.5) -> tuple[dict[int, float], set[int]]:
        """(prior, the chunks of the articles the question cites): a cited article may enter the
        candidates; the law and level parts only re-rank them."""
        refs = article_refs(question)
        q = _compact(question)
        title_score = {t: _law_match_compact(q, name, fam if family else base, family, family_share)
                       for t, (name, base, fam) in self.compact_names.items()}
        any_law = any(v > 0 for v in title_score.values())
        prior: dict[int, float] = {}
        cited: set[int] = set()
        for title, lm in title_score.items():
            if lm > 0 and w_law > 0:
                for i in self.by_title[title]:
                    prior[i] = prior.get(i, 0.0) + w_law * lm
            if refs and w_article > 0 and (lm > 0 or not any_law):
                for ref in refs:
                    for i in self.by_article.get((title, ref), ()):
                        prior[i] = prior.get(i, 0.0) + w_article * (lm if any_law else 1.0)
                        cited.add(i)
        if w_level > 0:
            for level in level_cues(question):
                for i in self.by_level.get(level, ()):
                    prior[i] = prior.get(i, 0.0) + w_level
        return prior, cited


def reference_prior(question: str, titles: Sequence[str], articles: Sequence[str],
                    w_law: float, w_article: float, parents: Optional[dict[str, str]] = None,
                    levels: Optional[Sequence[str]] = None, family: bool = True,
                    w_level: float = 0.0) -> dict[int, float]:
    """Additive prior per chunk index (see ReferenceIndex.prior)."""
    return ReferenceIndex(titles, articles, parents, levels).prior(question, w_law, w_article, family, w_level)


# ----------------------------------------------------------------------------- the hierarchy's links and articles

def expand_links(fused: dict[int, float], linked: Callable[[int], Sequence[int]], w_link: float,
                 link_from: int) -> dict[int, float]:
    """Scores after pulling in linked articles: each of the `link_from` best chunks lends
    w_link x its score to the chunks `linked(i)` returns (the articles its article cites or is cited
    by); a chunk lent by several keeps the largest loan, added to its own score (0 when it was not a
    candidate, so a decree article implementing the top act article can enter the list)."""
    if w_link <= 0 or link_from <= 0 or not fused:
        return dict(fused)
    loans: dict[int, float] = {}
    for i, score in rank_fused(fused, link_from):
        for j in linked(i):
            if j != i:
                loans[j] = max(loans.get(j, 0.0), w_link * score)
    out = dict(fused)
    for j, loan in loans.items():
        out[j] = out.get(j, 0.0) + loan
    return out


def group_by_article(fused: dict[int, float], article_of: Callable[[int], Optional[tuple]], sibling_bonus: float,
                     per_article: int = 1) -> list[tuple[int, float]]:
    """Ranked (chunk, score) by article: an article scores max + sibling_bonus x (the sum of its other
    chunks' scores), so its sibling chunks stop crowding its neighbours out of the top k and an article
    with several matching chunks gains a little; each article then contributes its `per_article` best
    chunks (best first, all with the article's score) in its place. Chunks outside articles
    (article_of None) are ranked by their own score. Ties: the lower chunk index first."""
    groups: dict[tuple, list[tuple[int, float]]] = {}
    for i, score in fused.items():
        key = article_of(i)
        groups.setdefault(("chunk", i) if key is None else ("article", key), []).append((i, score))
    ranked_groups = []
    for members in groups.values():
        members.sort(key=lambda m: (-m[1], m[0]))
        best = members[0][1]
        total = best + sibling_bonus * (sum(sc for _, sc in members) - best)
        ranked_groups.append((total, members[0][0], members[:per_article]))
    ranked_groups.sort(key=lambda g: (-g[0], g[1]))
    return [(i, total) for total, _, members in ranked_groups for i, _ in members]
