"""From classified questions to answers under hard limits: batching, a per-question time limit, a
circuit breaker, a whole-run time budget, the cache, and incremental (resumable) result writing.

The fallback always asks the SAME model again (no context, one option order, a shorter answer):
answers must come from the LLM, so there is no fixed fallback string.

One question never ends the run. Each answer records its `path`:
- primary: the configured path (context, every option order, ...). A question too long for the
  model is cut to fit first (`truncated`, see fsku.infer.answer) and still asked.
- fallback: the primary failed (error, time limit, open circuit breaker) or the run is over its
  time budget: the same model without context, one option order (`used_fallback`, `error`).
- minimal: the fallback failed too: the same model once more with the shortest prompt (no worked
  examples, the stem cut hard, options clipped).
- none: even that failed. The record says so (`error` names every failure, confidence 0) and holds
  an empty descriptive answer, or for multiple choice option 1 (`placeholder_answer`): not the
  model's choice, a fixed stated rule, only so that the submission still validates. An empty
  question (`flag` "empty question", see fsku.infer.classify) takes this path at once, without a
  model call (there is nothing to ask), and is counted as `empty_questions`, not `unanswered`;
  predict refuses a run whose `unanswered` share exceeds `max_unanswered_share` (after writing it).
Errors name the question ID in the log. The same question text under several IDs is answered once
per run; the other IDs get a copy (`duplicate_of`).
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import time
from typing import Callable, Optional, Sequence

from ..config import FusionSettings, InferConfig
from ..llm.base import TokenMeter
from ..retrieve import Hit
from ..stores import AnswerCache, ResultLog, digest, make_key
from .answer import Answer, Answerer
from .classify import FLAG_EMPTY, ClassifiedQuestion
from .prompts import PROMPT_VERSION

log = logging.getLogger(__name__)

# the config fields that change an answer (others, e.g. cache_dir or time limits, do not)
# every InferConfig field changes the answer cache key except these (runtime, limits, places);
# a new field is part of the key by default, so it can never serve stale answers
NON_ANSWER_FIELDS = ("backend", "device", "max_model_len", "batch_size", "threads", "token_batch", "gpu_memory_utilization",
                     "kb", "time_limit_s",
                     "breaker_failures", "breaker_cooldown", "time_budget_min", "cache_dir", "max_unanswered_share")
ANSWER_FIELDS = tuple(f.name for f in dataclasses.fields(InferConfig) if f.name not in NON_ANSWER_FIELDS)
RETRIEVAL_FIELDS = ("top_k", "reranker", "reranker_model", "rerank_top_n", "rerank_weight", "rerank_passage_tokens")


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
    # the fusion settings the KB searches with: its manifest's, and today's defaults for fields an older
    # manifest lacks (so a changed default never serves hits cached under the old one)
    fusion = {f.name: getattr(kb.retrieve_defaults(), f.name) for f in dataclasses.fields(FusionSettings)}
    return digest({"corpus": kb.manifest.get("corpus_sha256"), "params": kb.params, "fusion": fusion,
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
        # tokens per question (the package's time projection) when the answering model is metered
        self.meter = answerer.llm if isinstance(answerer.llm, TokenMeter) else None
        self.model_tag = digest(answerer.llm.fingerprint(), 12)
        self.cfg_hash = answer_config_hash(cfg)
        self.stats = {"fallback": 0, "timeouts": 0, "errors": 0, "breaker_opened": 0, "cache_hits": 0, "budget_fast": 0,
                      "fallback_errors": 0, "unanswered": 0, "empty_questions": 0, "truncated": 0, "duplicates": 0,
                      "retrieval_errors": 0}

    def fingerprint(self, input_sha256: str) -> dict:
        return {"input_sha256": input_sha256, "kb": self.kb_version, "model": self.answerer.llm.fingerprint(),
                "config": self.cfg_hash}

    def _retrieve(self, questions: Sequence[ClassifiedQuestion]) -> list[tuple[list, int]]:
        if not self.cfg.use_context or self.answerer.kb is None:
            return [([], 1) for _ in questions]
        # the llm reranker is the answering model: its hits depend on it
        rcfg = digest({f: getattr(self.cfg, f) for f in RETRIEVAL_FIELDS} | {"gate_signal": self.cfg.gate_signal}
                      | ({"reranker_llm": self.model_tag} if self.cfg.reranker == "llm" else {}))
        keys = [make_key("retrieval", kb=self.kb_version, cfg=rcfg, q=digest(q.parsed_question)) for q in questions]
        # cached as JSON ([hit dicts], terms), rebuilt into Hits: a cache holds data, never objects
        out: list = [self.cache.get(k) for k in keys]
        out = [None if v is None else ([Hit(**h) for h in v[0]], int(v[1])) for v in out]
        for i, q in enumerate(questions):
            if out[i] is None and not q.parsed_question.strip():  # an empty stem is no query
                out[i] = ([], 1)
        todo = [i for i, v in enumerate(out) if v is None]
        if todo:
            fresh = self.answerer.retrieve([questions[i].parsed_question for i in todo])
            for i, (hits, terms) in zip(todo, fresh, strict=True):
                out[i] = (hits, terms)
                self.cache.set(keys[i], [[h.to_dict() for h in hits], terms])
        return out

    def _fallback(self, q: ClassifiedQuestion, hits: list, terms: int, errors: list[str]) -> Answer:
        """The fallback, then the last resort, then a recorded failure: an answer for `q` whatever happens."""
        try:
            return self.answerer.answer(q, hits, fast=True, query_terms=terms)
        except Exception as e:  # one question must never end the run
            self.stats["fallback_errors"] += 1
            errors.append(f"fallback: {_describe(e)}")
            log.warning("%s: fallback failed (%s); re-asking the same model with the shortest prompt", q.question_id,
                        _describe(e), exc_info=not isinstance(e, EXPECTED))
        try:
            return self.answerer.answer(q, [], fast=True, minimal=True, query_terms=terms)
        except Exception as e:
            errors.append(f"shortest prompt: {_describe(e)}")
            log.error("%s: no attempt of the model gave an answer (%s); recording the failure with a placeholder "
                      "answer", q.question_id, "; ".join(errors), exc_info=not isinstance(e, EXPECTED))
        self.stats["unanswered"] += 1
        return placeholder_answer(q)

    def answer_one(self, q: ClassifiedQuestion, hits: list, terms: int, fast: bool = False) -> Answer:
        a = self._answer_one(q, hits, terms, fast)
        a.question_flag = q.flag
        return a

    def _answer_one(self, q: ClassifiedQuestion, hits: list, terms: int, fast: bool = False) -> Answer:
        if q.flag == FLAG_EMPTY:
            self.stats["empty_questions"] += 1
            return placeholder_answer(q, "empty question: nothing to ask the model")
        key = make_key("answer", kb=self.kb_version, model=self.model_tag, cfg=self.cfg_hash, q=digest(q.original_text))
        if not fast:
            cached = self.cache.get(key)
            if cached is not None and cached.get("question_type") == q.question_type:
                self.stats["cache_hits"] += 1
                # keyed by the question's text: the same text under another ID gets the answer, not the ID
                return Answer.from_record({**cached, "ID": q.question_id, "inference_time": 0.0})
        t0 = self.clock()
        meter = self.meter
        before = meter.snapshot() if meter else (0, 0, 0)
        a: Optional[Answer] = None
        errors: list[str] = []
        if not fast and self.breaker.allow_primary():
            try:
                a = self.answerer.answer(q, hits, deadline=t0 + self.cfg.time_limit_s, query_terms=terms)
                self.breaker.record_success()
            except TimeoutError as e:
                errors.append(f"time limit {self.cfg.time_limit_s:g}s exceeded ({e})")
                self.stats["timeouts"] += 1
            except Exception as e:  # one question must never end the run
                errors.append(_describe(e))
                self.stats["errors"] += 1
                if not isinstance(e, EXPECTED):
                    log.warning("%s: unexpected error on the primary path", q.question_id, exc_info=True)
            if a is None:
                was_open = self.breaker.state is BreakerState.OPEN
                self.breaker.record_failure()
                if not was_open and self.breaker.state is BreakerState.OPEN:
                    self.stats["breaker_opened"] += 1
                    log.warning("circuit breaker OPEN after %d failures; next %d questions use the fallback",
                                self.cfg.breaker_failures, self.cfg.breaker_cooldown)
                log.warning("%s: primary path failed (%s); re-asking the same model without context", q.question_id,
                            errors[-1])
        elif not fast:
            errors.append("circuit breaker open")
        if a is None:
            a = self._fallback(q, hits, terms, errors)
            a.used_fallback = True
            a.error = "; ".join(errors) if a.path != "none" else "; ".join(errors + [a.error])
            self.stats["fallback"] += 1
        if a.truncated:
            self.stats["truncated"] += 1
        a.inference_time = round(self.clock() - t0, 3)
        if meter:
            a.tokens_read, a.tokens_generated, a.decode_steps = (now - then for now, then in zip(meter.snapshot(), before))
        # a cut question's answer depends on max_model_len, which is not in the key: not cached
        if not a.used_fallback and not a.truncated:
            self.cache.set(key, a.to_record())
        return a

    def _retrieve_safely(self, batch: Sequence[ClassifiedQuestion]) -> list[tuple[list, int]]:
        """`_retrieve`, one question at a time when the batch fails: a question whose retrieval fails is
        answered without context (logged), never the end of the run."""
        try:
            return self._retrieve(batch)
        except Exception as e:
            log.warning("retrieval failed for a batch of %d (%s); retrying one question at a time", len(batch),
                        _describe(e))
        out = []
        for q in batch:
            try:
                out.extend(self._retrieve([q]))
            except Exception as e:
                self.stats["retrieval_errors"] += 1
                log.warning("%s: retrieval failed (%s); answering without context", q.question_id, _describe(e))
                out.append(([], 1))
        return out

    def run(self, questions: Sequence[ClassifiedQuestion], results: ResultLog, progress: bool = True) -> list[dict]:
        """Answer every question not yet in `results`; returns the records in input order. A question
        text asked again (under another ID) is answered once: the later IDs get a copy of the first
        one's record (`duplicate_of`, inference_time 0), with or without the cache."""
        from tqdm.auto import tqdm

        todo = [q for q in questions if q.question_id not in results.done]
        if len(todo) < len(questions):
            log.info("resuming: %d of %d questions already answered in %s", len(questions) - len(todo), len(questions),
                     results.path)
        first: dict[str, str] = {}  # question text -> the ID that asks it first
        for q in questions:
            first.setdefault(q.original_text, q.question_id)
        ask = [q for q in todo if first[q.original_text] == q.question_id]
        twins: dict[str, list[ClassifiedQuestion]] = {}
        for q in todo:
            if first[q.original_text] != q.question_id:
                twins.setdefault(q.original_text, []).append(q)
        bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="answering", unit="q", disable=not progress)

        def write_twins(text: str, record: dict) -> None:
            for t in twins.pop(text, []):
                results.append({**record, "ID": t.question_id, "inference_time": 0.0, "duplicate_of": record["ID"]})
                self.stats["duplicates"] += 1
                bar.update(1)

        for text in list(twins):  # their first ID was answered before a resume
            if first[text] in results.done:
                write_twins(text, results.done[first[text]])
        budget_s = self.cfg.time_budget_min * 60
        start = self.clock()
        answered = 0
        bs = max(1, self.cfg.batch_size)
        meter = self.meter
        for b in range(0, len(ask), bs):
            batch = ask[b:b + bs]
            before = meter.snapshot() if meter else (0, 0, 0)
            retrieved = self._retrieve_safely(batch)
            # an llm reranker reads with the answering model during the batch's retrieval: its tokens are
            # shared out over the batch's questions (the first ones take the remainder)
            shares = [(0, 0, 0)] * len(batch)
            if meter:
                spent = [now - then for now, then in zip(meter.snapshot(), before)]
                shares = [tuple(s // len(batch) + (i < s % len(batch)) for s in spent) for i in range(len(batch))]
            for q, (hits, terms), share in zip(batch, retrieved, shares, strict=True):
                elapsed = self.clock() - start
                remaining = len(ask) - answered
                # project the finish from the mean so far; past the budget, keep answering on the fast path
                fast = answered > 0 and elapsed + remaining * (elapsed / answered) > budget_s
                if fast:
                    self.stats["budget_fast"] += 1
                record = self.answer_one(q, hits, terms, fast=fast).to_record()
                for key, extra in zip(("tokens_read", "tokens_generated", "decode_steps"), share):
                    if extra:
                        record[key] = record.get(key, 0) + extra
                results.append(record)
                answered += 1
                bar.update(1)
                write_twins(q.original_text, record)
                bar.set_postfix(fallback=self.stats["fallback"], breaker=self.breaker.state.value)
        bar.close()
        return [results.done[q.question_id] for q in questions]


EXPECTED = (RuntimeError, ValueError, MemoryError, TimeoutError)  # what a model call is known to raise


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def placeholder_answer(q: ClassifiedQuestion, reason: str = "") -> Answer:
    """The record of a question no attempt of the model answered (path 'none', confidence 0, error set):
    an empty descriptive answer (valid, scores 0), or for multiple choice option 1, the lowest number.
    Not the model's choice and not presented as one: a fixed, stated rule, because a submission must
    hold a valid option for every multiple-choice ID, and any other fixed rule would pretend to know.
    `reason` leads the error when the model was not asked at all (an empty question)."""
    mc = q.question_type == "multiple_choice"
    answer = min(q.choices, key=int) if mc else ""
    note = (f"{reason}; " if reason else "") + "no model answer: " + (
        f"option {answer} written by rule so the submission validates" if mc else "empty answer written")
    return Answer(q.question_id, answer, q.question_type, 0.0, used_fallback=True, path="none", error=note)
