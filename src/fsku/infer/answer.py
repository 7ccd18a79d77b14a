"""Answer one classified question with one LLM: retrieval with a relevance gate, option scoring
with debiasing for multiple choice, keyword-aware generation for descriptive questions.

Every answer comes from the model. The fallback (`fast=True`) asks the SAME model again with no
context and a single option order / a shorter answer; it is never a fixed string."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..config import InferConfig
from ..llm import LLMBackend, OptionRequest, check_deadline
from . import options as opt
from . import prompts
from .classify import ClassifiedQuestion

log = logging.getLogger(__name__)
FALLBACK_SAMPLES = 2  # sampled retries when the fallback's greedy answer is empty


@dataclass
class Answer:
    """One answered question (the seed's SubmissionRow plus diagnostics)."""

    ID: str
    answer: str
    question_type: str
    confidence: float
    inference_time: float = 0.0
    used_fallback: bool = False
    n_context: int = 0
    context_ids: list[str] = field(default_factory=list)  # chunk ids of the passages in the prompt
    scores: list[float] = field(default_factory=list)  # aggregated option scores (multiple choice)
    raw_choice: Optional[int] = None  # the argmax of the original order alone, before debiasing
    error: str = ""

    def to_record(self) -> dict:
        return dict(self.__dict__)


def gate_signal(hit, cfg: InferConfig, query_terms: int = 1) -> Optional[float]:
    """A hit's relevance on the gate's scale: dense cosine, or BM25 per distinct query term."""
    if cfg.gate_signal == "dense":
        return hit.dense
    return None if hit.bm25 is None else hit.bm25 / max(1, query_terms)


def gate_passages(hits: list, cfg: InferConfig, query_terms: int = 1) -> list:
    """The hits allowed into the prompt: all of them for context='always'; for 'gated', with
    gate_scope='question' all hits once the most relevant one reaches the threshold, with
    'passage' only the hits that reach it themselves."""
    if cfg.context == "none":
        return []
    if cfg.context == "always":
        return list(hits)
    passing = [h for h in hits if (v := gate_signal(h, cfg, query_terms)) is not None and v >= cfg.gate_threshold]
    if cfg.gate_scope == "question":
        return list(hits) if passing else []
    return passing


class Answerer:
    def __init__(self, llm: LLMBackend, cfg: InferConfig, kb=None):
        if cfg.context != "none" and kb is not None and cfg.gate_signal == "dense" and cfg.context == "gated" \
                and not kb.has_dense:
            raise ValueError(f"{kb.folder}: gate_signal 'dense' needs a KB with a dense index; use gate_signal='bm25'")
        if "cloze" in cfg.mc_scoring and type(llm).continuation_logprobs is LLMBackend.continuation_logprobs:
            raise ValueError(f"mc_scoring {cfg.mc_scoring!r} scores option texts, which backend {llm.name!r} "
                             "cannot do; use backend 'transformers' or mc_scoring 'label'")
        self.llm, self.cfg, self.kb = llm, cfg, kb
        self._content_free: dict[tuple[str, int], np.ndarray] = {}

    # -- context
    def retrieve(self, questions: list[str]) -> list[tuple[list, int]]:
        """(hits, distinct query terms) per question; the term count scales the BM25 gate signal."""
        if self.kb is None or not self.cfg.use_context:
            return [([], 1) for _ in questions]
        hits = self.kb.search(questions, top_k=self.cfg.top_k)
        if self.cfg.gate_signal == "bm25":
            terms = [len(set(t)) for t in self.kb.tokenizer()(questions)]
        else:
            terms = [1] * len(questions)
        return list(zip(hits, terms, strict=True))

    def context_text(self, hits: list, query_terms: int = 1) -> tuple[str, list[str]]:
        """The context block for the prompt and the chunk ids it holds ('' and [] when the gate closes)."""
        passages, ids = [], []
        budget = self.cfg.context_tokens
        for h in gate_passages(hits, self.cfg, query_terms):
            text = self.llm.truncate_tokens(h.text, min(self.cfg.passage_tokens, budget))
            used = self.llm.count_tokens(text)
            if used < 16:
                break
            passages.append({"text": text, "source": h.source})
            ids.append(h.chunk_id)
            budget -= used
            if budget < 16:
                break
        return (prompts.format_context(passages) if passages else ""), ids

    # -- multiple choice
    def content_free_logp(self, n: int) -> np.ndarray:
        key = (self.cfg.mc_prompt, n)
        if key not in self._content_free:
            msgs = prompts.mc_messages(prompts.CONTENT_FREE, [prompts.CONTENT_FREE] * n, style=self.cfg.mc_prompt)
            prefix, suffix = prompts.mc_prompt_parts(self.llm.render_chat(msgs), self.cfg.mc_prompt)
            self._content_free[key] = self.llm.option_logprobs(
                OptionRequest(prefix, [suffix], [str(j) for j in range(1, n + 1)]))[0]
        return self._content_free[key]

    def display_logprobs(self, q: ClassifiedQuestion, context: str, orders: list[list[int]],
                         deadline: Optional[float] = None) -> np.ndarray:
        """(len(orders), n) label log-probs per display position, one option order per row."""
        texts = q.option_texts
        suffixes, prefix = [], None
        for perm in orders:
            p, s = prompts.mc_prompt_parts(self.llm.render_chat(
                prompts.mc_messages(q.parsed_question, [texts[i] for i in perm], context, style=self.cfg.mc_prompt)),
                self.cfg.mc_prompt)
            if prefix is not None and p != prefix:
                raise AssertionError("option orders must share the prompt prefix")
            prefix = p
            suffixes.append(s)
        labels = [str(j) for j in range(1, len(texts) + 1)]
        return self.llm.option_logprobs(OptionRequest(prefix, suffixes, labels), deadline)

    def option_text_logprobs(self, q: ClassifiedQuestion, context: str, content_free: bool = False,
                             deadline: Optional[float] = None) -> list[np.ndarray]:
        """Token log-probs of each option's text as the assistant's answer (original option order);
        content_free=True asks a content-free question instead (the PMI baseline), without context."""
        texts = q.option_texts
        stem, ctx = (prompts.CONTENT_FREE, "") if content_free else (q.parsed_question, context)
        prompt = self.llm.render_chat(prompts.cloze_messages(stem, ctx))
        check_deadline(deadline)
        return self.llm.continuation_logprobs([prompt] * len(texts), texts)

    def cloze(self, q: ClassifiedQuestion, context: str, deadline: Optional[float] = None) -> np.ndarray:
        """Cloze scores per original option for the configured mc_scoring."""
        logps = self.option_text_logprobs(q, context, deadline=deadline)
        free = self.option_text_logprobs(q, context, True, deadline) if self.cfg.mc_scoring.endswith("pmi") else None
        return opt.cloze_scores(logps, free)

    def score_options(self, q: ClassifiedQuestion, context: str, debias: str, rotations: int,
                      deadline: Optional[float] = None, reverse: bool = False,
                      scoring: str = "label") -> tuple[np.ndarray, int]:
        """(aggregated scores per original option, raw argmax of the original order, 1-based)."""
        n = len(q.choices)
        if scoring in ("cloze", "cloze-pmi"):
            scores = opt.normalize_logprobs(self.cloze(q, context, deadline))
            return scores, int(np.argmax(scores)) + 1
        orders = opt.option_orders(n, rotations, reverse) if "rotate" in debias else [list(range(n))]
        display = self.display_logprobs(q, context, orders, deadline)
        if "calibrate" in debias:
            cf = self.content_free_logp(n)
            display = np.stack([opt.calibrate(row, cf) for row in display])
        raw_choice = int(np.argmax(display[0])) + 1  # orders[0] is the identity
        scores = opt.aggregate_orders(display, orders)
        if "cloze" in scoring:
            scores = opt.combine_scores(scores, self.cloze(q, context, deadline))
        return scores, raw_choice

    def answer_mc(self, q: ClassifiedQuestion, hits: list, fast: bool = False, deadline: Optional[float] = None,
                  query_terms: int = 1) -> Answer:
        cfg = self.cfg
        context, ctx_ids = ("", []) if fast else self.context_text(hits, query_terms)
        debias = cfg.debias if not fast else ("calibrate" if "calibrate" in cfg.debias else "none")
        # the fallback scores option numbers in one order only (one forward pass)
        scores, raw_choice = self.score_options(q, context, debias, 1 if fast else cfg.rotations, deadline,
                                                reverse=cfg.reverse_orders and not fast,
                                                scoring="label" if fast else cfg.mc_scoring)
        best, conf = opt.choice_confidence(scores)
        choice = best + 1
        if cfg.self_consistency and not fast:
            texts = q.option_texts
            rendered = self.llm.render_chat(prompts.mc_messages(q.parsed_question, texts, context, reasoning=True))
            prompt = rendered.replace(prompts.SPLIT, "")
            votes = []
            for i in range(cfg.self_consistency):
                check_deadline(deadline)
                gen = self.llm.generate([prompt], cfg.sc_max_new_tokens, temperature=cfg.sc_temperature,
                                        seed=cfg.seed + i, max_time=_remaining(deadline))[0]
                votes.append(opt.parse_choice(gen.text, len(texts)))
            choice, conf = opt.majority_vote(votes, scores)
        return Answer(q.question_id, str(choice), q.question_type, round(conf, 4), n_context=len(ctx_ids),
                      context_ids=ctx_ids, scores=[round(float(s), 4) for s in scores], raw_choice=raw_choice, used_fallback=fast)

    # -- descriptive
    def answer_descriptive(self, q: ClassifiedQuestion, hits: list, fast: bool = False,
                           deadline: Optional[float] = None, query_terms: int = 1) -> Answer:
        cfg = self.cfg
        context, ctx_ids = ("", []) if fast else self.context_text(hits, query_terms)
        prompt = self.llm.render_chat(prompts.desc_messages(q.parsed_question, context))
        check_deadline(deadline)
        max_new = cfg.max_new_tokens if not fast else max(32, cfg.max_new_tokens // 2)
        gen = self.llm.generate([prompt], max_new, temperature=cfg.temperature, seed=cfg.seed,
                                max_time=None if fast else _remaining(deadline),
                                repetition_penalty=cfg.repetition_penalty)[0]
        text = prompts.clean_answer(gen.text, q.parsed_question, truncated=gen.truncated)
        if not text and not fast:
            raise ValueError("the model produced an empty descriptive answer")
        for retry in range(FALLBACK_SAMPLES if fast and not text else 0):
            # still the same model: sample instead of greedy decoding
            gen = self.llm.generate([prompt], max_new, temperature=0.7, seed=cfg.seed + 1 + retry,
                                    repetition_penalty=cfg.repetition_penalty)[0]
            text = prompts.clean_answer(gen.text, q.parsed_question, truncated=gen.truncated)
            if text:
                break
        return Answer(q.question_id, text, q.question_type, round(float(np.exp(gen.mean_logprob)), 4),
                      n_context=len(ctx_ids), context_ids=ctx_ids, used_fallback=fast)

    def answer(self, q: ClassifiedQuestion, hits: list, fast: bool = False, deadline: Optional[float] = None,
               query_terms: int = 1) -> Answer:
        t0 = time.perf_counter()
        fn = self.answer_mc if q.question_type == "multiple_choice" else self.answer_descriptive
        a = fn(q, hits, fast=fast, deadline=deadline, query_terms=query_terms)
        a.inference_time = round(time.perf_counter() - t0, 3)
        return a


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.01, deadline - time.monotonic())
