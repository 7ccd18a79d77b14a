"""From classified questions to answers under hard limits: batching, a per-question time limit, a
circuit breaker, a whole-run time budget, the cache, and incremental (resumable) result writing.

The fallback always asks the SAME model again (no context, one option order, a shorter answer):
answers must come from the LLM, so there is no fixed fallback string.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import time
from typing import Callable, Optional, Sequence

from ..config import InferConfig
from ..retrieve import Hit
from ..stores import AnswerCache, ResultLog, digest, make_key
from .answer import Answer, Answerer
from .classify import ClassifiedQuestion
from .prompts import PROMPT_VERSION

log = logging.getLogger(__name__)

# the config fields that change an answer (others, e.g. cache_dir or time limits, do not)
# every InferConfig field changes the answer cache key except these (runtime, limits, places);
# a new field is part of the key by default, so it can never serve stale answers
NON_ANSWER_FIELDS = ("backend", "device", "max_model_len", "batch_size", "kb", "time_limit_s", "breaker_failures",
                     "breaker_cooldown", "time_budget_min", "cache_dir")
ANSWER_FIELDS = tuple(f.name for f in dataclasses.fields(InferConfig) if f.name not in NON_ANSWER_FIELDS)
RETRIEVAL_FIELDS = ("top_k",)


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """CLOSED: the primary path runs. `failures` consecutive failures OPEN it: the next `cooldown`
    questions go straight to the fallback. Then HALF_OPEN: one primary trial; success closes it,
    failure opens it again."""

    def __init__(self, failures: int = 3, cooldown: int = 10):
        self.failures, self.cooldown = failures, cooldown
        self.state = BreakerState.CLOSED
        self._consecutive = 0
        self._skipped = 0
        self.opened = 0

    def allow_primary(self) -> bool:
        if self.state is BreakerState.OPEN:
            if self._skipped >= self.cooldown:
                self.state = BreakerState.HALF_OPEN
                return True
            self._skipped += 1
            return False
        return True

    def record_success(self) -> None:
        self.state, self._consecutive = BreakerState.CLOSED, 0

    def record_failure(self) -> None:
        self._consecutive += 1
        if self.state is BreakerState.HALF_OPEN or self._consecutive >= self.failures:
            if self.state is not BreakerState.OPEN:
                self.opened += 1
            self.state, self._skipped = BreakerState.OPEN, 0


def kb_version(kb) -> str:
    if kb is None:
        return "none"
    return digest({"corpus": kb.manifest.get("corpus_sha256"), "params": kb.params,
                   "embedding": kb.manifest.get("embedding", {}).get("fingerprint")}, 12)


def answer_config_hash(cfg: InferConfig) -> str:
    return digest({**{f: getattr(cfg, f) for f in ANSWER_FIELDS}, "prompt": PROMPT_VERSION}, 12)


class Orchestrator:
    def __init__(self, answerer: Answerer, cfg: InferConfig, cache: Optional[AnswerCache] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.answerer, self.cfg = answerer, cfg
        self.cache = cache if cache is not None else AnswerCache(None)
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_cooldown)
        self.clock = clock
        self.kb_version = kb_version(answerer.kb if cfg.use_context else None)
        self.model_tag = digest(answerer.llm.fingerprint(), 12)
        self.cfg_hash = answer_config_hash(cfg)
        self.stats = {"fallback": 0, "timeouts": 0, "errors": 0, "breaker_opened": 0, "cache_hits": 0, "budget_fast": 0}

    def fingerprint(self, input_sha256: str) -> dict:
        return {"input_sha256": input_sha256, "kb": self.kb_version, "model": self.answerer.llm.fingerprint(),
                "config": self.cfg_hash}

    def _retrieve(self, questions: Sequence[ClassifiedQuestion]) -> list[tuple[list, int]]:
        if not self.cfg.use_context or self.answerer.kb is None:
            return [([], 1) for _ in questions]
        rcfg = digest({f: getattr(self.cfg, f) for f in RETRIEVAL_FIELDS} | {"gate_signal": self.cfg.gate_signal})
        keys = [make_key("retrieval", kb=self.kb_version, cfg=rcfg, q=digest(q.parsed_question)) for q in questions]
        # cached as JSON ([hit dicts], terms), rebuilt into Hits: a cache holds data, never objects
        out: list = [self.cache.get(k) for k in keys]
        out = [None if v is None else ([Hit(**h) for h in v[0]], int(v[1])) for v in out]
        todo = [i for i, v in enumerate(out) if v is None]
        if todo:
            fresh = self.answerer.retrieve([questions[i].parsed_question for i in todo])
            for i, (hits, terms) in zip(todo, fresh, strict=True):
                out[i] = (hits, terms)
                self.cache.set(keys[i], [[h.to_dict() for h in hits], terms])
        return out

    def answer_one(self, q: ClassifiedQuestion, hits: list, terms: int, fast: bool = False) -> Answer:
        key = make_key("answer", kb=self.kb_version, model=self.model_tag, cfg=self.cfg_hash, q=digest(q.original_text))
        if not fast:
            cached = self.cache.get(key)
            if cached is not None:
                self.stats["cache_hits"] += 1
                # keyed by the question's text: the same text under another ID gets the answer, not the ID
                return Answer(**{**cached, "ID": q.question_id, "inference_time": 0.0})
        t0 = self.clock()
        a: Optional[Answer] = None
        error = ""
        if not fast and self.breaker.allow_primary():
            try:
                a = self.answerer.answer(q, hits, deadline=t0 + self.cfg.time_limit_s, query_terms=terms)
                self.breaker.record_success()
            except TimeoutError as e:
                error = f"time limit {self.cfg.time_limit_s:g}s exceeded ({e})"
                self.stats["timeouts"] += 1
            except (RuntimeError, ValueError, MemoryError) as e:
                error = f"{type(e).__name__}: {e}"
                self.stats["errors"] += 1
            if a is None:
                was_open = self.breaker.state is BreakerState.OPEN
                self.breaker.record_failure()
                if not was_open and self.breaker.state is BreakerState.OPEN:
                    self.stats["breaker_opened"] += 1
                    log.warning("circuit breaker OPEN after %d failures; next %d questions use the fallback",
                                self.cfg.breaker_failures, self.cfg.breaker_cooldown)
                log.warning("%s: primary path failed (%s); re-asking the same model without context", q.question_id, error)
        elif not fast:
            error = "circuit breaker open"
        if a is None:
            a = self.answerer.answer(q, hits, fast=True, query_terms=terms)
            a.error = error
            self.stats["fallback"] += 1
        a.inference_time = round(self.clock() - t0, 3)
        if not a.used_fallback:
            self.cache.set(key, a.to_record())
        return a

    def run(self, questions: Sequence[ClassifiedQuestion], results: ResultLog, progress: bool = True) -> list[dict]:
        """Answer every question not yet in `results`; returns the records in input order."""
        from tqdm.auto import tqdm

        todo = [q for q in questions if q.question_id not in results.done]
        if len(todo) < len(questions):
            log.info("resuming: %d of %d questions already answered in %s", len(questions) - len(todo), len(questions),
                     results.path)
        budget_s = self.cfg.time_budget_min * 60
        start = self.clock()
        answered = 0
        bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="answering", unit="q", disable=not progress)
        bs = max(1, self.cfg.batch_size)
        for b in range(0, len(todo), bs):
            batch = todo[b:b + bs]
            retrieved = self._retrieve(batch)
            for q, (hits, terms) in zip(batch, retrieved, strict=True):
                elapsed = self.clock() - start
                remaining = len(todo) - answered
                # project the finish from the mean so far; past the budget, keep answering on the fast path
                fast = answered > 0 and elapsed + remaining * (elapsed / answered) > budget_s
                if fast:
                    self.stats["budget_fast"] += 1
                a = self.answer_one(q, hits, terms, fast=fast)
                results.append(a.to_record())
                answered += 1
                bar.update(1)
                bar.set_postfix(fallback=self.stats["fallback"], breaker=self.breaker.state.value)
        bar.close()
        return [results.done[q.question_id] for q in questions]
