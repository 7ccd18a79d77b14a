"""A second retrieval stage: re-score the first stage's best candidates, chosen by name.

- ``none``: the first stage's order.
- ``cross-encoder``: a sentence-transformers CrossEncoder (any hub id or local folder, e.g.
  dragonkue/bge-reranker-v2-m3-ko or BAAI/bge-reranker-v2-m3 on a GPU) reads each (question,
  passage) pair; its logit is the score.
- ``llm``: the answering model judges each passage: the score is log p("예") - log p("아니오") as the
  first answer token after a relevance question, every passage of one question in one batched
  option-scoring call (the question and instruction are the shared prefix, evaluated once by
  backends that cache it). It is the same LLM that answers, so the one-model rule holds.

`fuse_rerank` (pure) combines the two stages: w x minmax(reranker) + (1 - w) x minmax(first stage)
over the re-scored candidates, which then lead the list in that order; `rerank_hits` applies it to
`Hit`s and records the reranker's raw score on each (`Hit.rerank`: comparable across questions, so
predict's context gate can use it).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
from typing import Callable, Optional, Sequence

import numpy as np

from .retrieve import Hit, minmax_normalize

log = logging.getLogger(__name__)

LLM_RELEVANCE_SYSTEM = ("당신은 금융보안 법령 검색 결과를 평가합니다. "
                        "문서가 질문에 답하는 데 필요한 내용을 담고 있는지 판단하세요.")
LLM_RELEVANCE_QUESTION = "질문: {question}\n\n문서:\n"
LLM_RELEVANCE_ASK = "\n\n이 문서가 질문에 답하는 데 필요한 내용을 담고 있습니까? 예 또는 아니오로만 답하세요."
LLM_LABELS = ("예", "아니오")


class Reranker:
    """Scores passages for one question; higher is more relevant."""

    name = "base"

    def score(self, question: str, passages: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


class CrossEncoderReranker(Reranker):
    name = "cross-encoder"

    def __init__(self, model: str, device: Optional[str] = None, batch_size: int = 16, max_length: int = 512):
        from sentence_transformers import CrossEncoder

        self.model_id, self.batch_size = model, batch_size
        self.model = CrossEncoder(model, device=device, max_length=max_length)

    def score(self, question: str, passages: Sequence[str]) -> np.ndarray:
        if not passages:
            return np.zeros(0)
        # the raw logit (no sigmoid): a one-label model's sigmoid saturates near 1 for close candidates
        out = self.model.predict([(question, p) for p in passages], batch_size=self.batch_size,
                                 activation_fn=_identity, show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(out, dtype=np.float64).reshape(len(passages), -1)[:, -1]


def _identity(x):
    return x


class LLMReranker(Reranker):
    """Relevance judged by an fsku.llm backend: log p(예) - log p(아니오) per passage."""

    name = "llm"

    def __init__(self, llm, passage_tokens: int = 400):
        self.llm, self.passage_tokens = llm, passage_tokens

    def request_parts(self, question: str) -> tuple[str, str]:
        """(shared prefix up to the passage, the text after it) of the chat the model reads."""
        marker = "\x00PASSAGE\x00"
        chat = self.llm.render_chat([{"role": "system", "content": LLM_RELEVANCE_SYSTEM},
                                     {"role": "user", "content": LLM_RELEVANCE_QUESTION.format(question=question) + marker
                                      + LLM_RELEVANCE_ASK}])
        prefix, found, after = chat.partition(marker)
        if not found:  # a template that rewrites the user turn: the passage would be appended blindly
            raise ValueError("the llm reranker's chat template dropped the passage position of the user message; "
                             "use a model whose chat template keeps the user text as given")
        return prefix, after

    def score(self, question: str, passages: Sequence[str]) -> np.ndarray:
        from .llm import OptionRequest

        if not passages:
            return np.zeros(0)
        prefix, after = self.request_parts(question)
        suffixes = [self.llm.truncate_tokens(p, self.passage_tokens) + after for p in passages]
        logprobs = np.asarray(self.llm.option_logprobs(OptionRequest(prefix, suffixes, list(LLM_LABELS))))
        return logprobs[:, 0] - logprobs[:, 1]


def _cross_encoder(model: str = "", llm=None, batch_size: int = 16, device: Optional[str] = None, **_) -> Reranker:
    if not model:
        raise ValueError("reranker 'cross-encoder' needs reranker_model: a hub id (e.g. BAAI/bge-reranker-v2-m3) "
                         "or a local folder")
    if importlib.util.find_spec("sentence_transformers") is None:
        raise ImportError("reranker 'cross-encoder' needs sentence-transformers: pip install sentence-transformers")
    return CrossEncoderReranker(model, device=None if device in (None, "auto") else device, batch_size=batch_size)


def _llm(model: str = "", llm=None, passage_tokens: int = 400, **kw) -> Reranker:
    if llm is None:
        if not model:
            raise ValueError("reranker 'llm' needs the answering model (predict passes its own) or reranker_model")
        from .llm import load_llm

        llm = load_llm(model, **{k: v for k, v in kw.items() if k in ("backend", "dtype", "device", "max_model_len",
                                                                       "batch_size", "threads", "token_batch")})
    return LLMReranker(llm, passage_tokens=passage_tokens)


RERANKERS: dict[str, Optional[Callable[..., Reranker]]] = {"none": None, "cross-encoder": _cross_encoder, "llm": _llm}


def load_reranker(name: str, model: str = "", llm=None, **kw) -> Optional[Reranker]:
    """The named reranker (None for 'none'). `llm`: an already loaded fsku.llm backend for 'llm'."""
    if name not in RERANKERS:
        raise ValueError(f"unknown reranker {name!r}; expected one of {sorted(RERANKERS)}")
    factory = RERANKERS[name]
    return None if factory is None else factory(model=model, llm=llm, **kw)


def first_stage(cfg, top_n: int):
    """The first stage's retrieval settings (a RetrieveConfig) for a reranker of the best `top_n`: at
    least top_n hits and candidates, the rest as `cfg` says."""
    return dataclasses.replace(cfg, top_k=max(cfg.top_k, top_n), candidates=max(cfg.candidates, top_n))


def fuse_rerank(first: Sequence[float], reranked: Sequence[float], weight: float) -> np.ndarray:
    """w x minmax(reranked) + (1 - w) x minmax(first), per candidate (w = 1: the reranker's order alone)."""
    first, reranked = np.asarray(first, dtype=np.float64), np.asarray(reranked, dtype=np.float64)
    if first.shape != reranked.shape:
        raise ValueError(f"{first.shape[0]} first-stage scores but {reranked.shape[0]} reranker scores")
    return weight * minmax_normalize(reranked) + (1.0 - weight) * minmax_normalize(first)


def rerank_order(first: Sequence[float], reranked: Sequence[float], weight: float) -> list[int]:
    """Indices of the candidates best first by `fuse_rerank` (ties: the first stage's order)."""
    fused = fuse_rerank(first, reranked, weight)
    return sorted(range(len(fused)), key=lambda i: (-fused[i], i))


def rerank_hits(question: str, hits: Sequence[Hit], reranker: Optional[Reranker], top_n: int, weight: float,
                top_k: Optional[int] = None) -> list[Hit]:
    """The first `top_n` hits re-ordered by the reranker (fused with their first-stage scores), the
    rest after them as they were; each re-scored hit carries its raw reranker score; ranks renumbered;
    cut to top_k when given."""
    hits = list(hits)
    if reranker is not None and hits:
        head, tail = hits[:top_n], hits[top_n:]
        scores = reranker.score(question, [h.text for h in head])
        order = rerank_order([h.score for h in head], scores, weight)
        head = [dataclasses.replace(head[i], rerank=float(scores[i])) for i in order]
        hits = head + tail
    hits = hits[:top_k] if top_k is not None else hits
    return [dataclasses.replace(h, rank=r) for r, h in enumerate(hits, start=1)]
