"""Answer one classified question with one LLM: retrieval with a relevance gate, option scoring
with debiasing for multiple choice, keyword-aware generation for descriptive questions.

Every answer comes from the model. The fallback (`fast=True`) asks the SAME model again with no
context and a single option order / a shorter answer; it is never a fixed string. The last resort
(`minimal=True`) asks it once more with the shortest prompt: no worked examples, one order, the stem
cut to LAST_RESORT_STEM_TOKENS and each option to LAST_RESORT_OPTION_TOKENS.

Questions longer than the model's window (`max_model_len`) are fitted, never refused: every prompt
a path sends (with its context, worked examples and the tokens it generates) is measured with an
empty stem and empty options, and what is left is the budget for the question. On the context path
the retrieved context gives way first: it is rebuilt with a smaller token budget (`context_text`),
down to no context at all, so that the question fits whole (`fit_with_context`). Only a question
that does not fit even without context is cut: the stem first; the options stay whole unless they
alone exceed the budget less the stem's minimum (MIN_STEM_TOKENS, or the whole stem if shorter),
and then only the long ones are clipped, to one common cap (`prompts.allocate_tokens`). A cut stem
keeps its start and, twice as long, its end, the part nearest the options where the question is
asked (`prompts.keep_ends`). The answer says so: `truncated`, with `question_tokens` as written and
`kept_tokens` as asked. Such an answer is not cached: it depends on max_model_len, which is not part
of the cache key.

Ten or more options are scored digit by digit where the tokenizer splits "10" into "1", "0"
(`two_digit_label_logprobs`); self-consistency votes parse the option numbers 1-99 and ①-⑳
(`options.parse_choice`)."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..config import InferConfig
from ..llm import LLMBackend, OptionRequest, check_deadline
from ..llm.base import scores_continuations
from . import options as opt
from . import prompts
from .classify import ClassifiedQuestion
from .descriptive import (
    DescInstructions,
    DescRequest,
    DescResult,
    char_bigram_similarity,
    copy_check,
    fit_length,
    keep_phrases,
    rephrase_request,
    run_strategy,
    uses_keyword_prompt,
)

log = logging.getLogger(__name__)
# Internal constants, not user tunables: they shape the fallback paths and the fitting arithmetic,
# which only run when the configured path failed or a question overflows max_model_len (the knobs a
# user has are max_new_tokens, context_tokens and max_model_len).
FALLBACK_SAMPLES = 2  # internal: sampled retries when the fallback's greedy answer is empty
LAST_RESORT_STEM_TOKENS = 96  # internal: the last resort is the shortest prompt that still asks the question
LAST_RESORT_OPTION_TOKENS = 24  # internal: ... and names every option
LAST_RESORT_NEW_TOKENS = 32  # internal: ... and a short answer (a descriptive one of a sentence or two)
FIT_MARGIN = 8  # internal: tokens for merges where the question meets the template, plus 2 per option
FIT_ATTEMPTS = 4  # internal: re-measure after cutting: tokenisation at the cuts is not exactly additive
MIN_PASSAGE_TOKENS = 16  # internal: a passage cut shorter than this says nothing; context_text stops there


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
    truncated: bool = False  # the stem (and, only if they alone did not fit, the options) cut to fit the model
    question_tokens: int = 0  # stem + option tokens as written
    kept_tokens: int = 0  # stem + option tokens in the prompt (< question_tokens when truncated)
    path: str = "primary"  # primary | fallback | minimal | none (no model answer: see fsku.infer.orchestrate)
    duplicate_of: str = ""  # the ID whose answer this copies (the same question text earlier in the run)
    question_flag: str = ""  # the classifier's flag of the question (a row content problem, fsku.infer.classify)
    desc_keywords: list[str] = field(default_factory=list)  # the key phrases a keyword-first answer named
    desc_candidates: int = 0  # descriptive answers the strategy chose from (consensus: its samples)
    copy_run: int = 0  # longest run of characters the answer shares with its context (spacing ignored)
    copy_overlap: float = 0.0  # share of its 8-character grams found in the context
    copied: bool = False  # over a copy limit after the re-ask (or with no re-ask possible)
    rephrased: bool = False  # the answer copied its context and the model was asked to rephrase it
    gate_score: Optional[float] = None  # the best retrieved passage on the gate's scale (None: no retrieval)
    tokens_read: int = 0  # prompt tokens the model read for this question (every call: option orders, re-asks)
    tokens_generated: int = 0  # tokens it generated (0 for a multiple-choice answer scored, not written)
    decode_steps: int = 0  # sequential decode steps (k samples of one call decode together: the longest counts)

    def to_record(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_record(cls, record: dict) -> "Answer":
        """An Answer from a record (a cached one may come from an older or newer version: unknown keys
        are ignored, missing ones take their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def gate_signal(hit, cfg: InferConfig, query_terms: int = 1) -> Optional[float]:
    """A hit's relevance on the gate's scale: dense cosine, BM25 per distinct query term, or the
    reranker's score (None for a hit the reranker did not re-score)."""
    if cfg.gate_signal == "dense":
        return hit.dense
    if cfg.gate_signal == "rerank":
        return getattr(hit, "rerank", None)
    return None if hit.bm25 is None else hit.bm25 / max(1, query_terms)


def best_gate_score(hits: list, cfg: InferConfig, query_terms: int = 1) -> Optional[float]:
    """The highest gate signal among `hits` (what the gate compares with its threshold); None without any."""
    values = [v for h in hits if (v := gate_signal(h, cfg, query_terms)) is not None]
    return float(max(values)) if values else None


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
        if "cloze" in cfg.mc_scoring and not scores_continuations(llm):
            raise ValueError(f"mc_scoring {cfg.mc_scoring!r} scores option texts, which backend {llm.name!r} "
                             "cannot do; use backend 'transformers' or mc_scoring 'label'")
        self.llm, self.cfg, self.kb = llm, cfg, kb
        self._content_free: dict[tuple[str, int], np.ndarray] = {}
        self._reranker = None

    def reranker(self):
        """The configured reranker (None for 'none'), loaded on first use; 'llm' without a reranker_model
        is this answering model itself."""
        if self._reranker is None and self.cfg.reranker != "none":
            from ..rerank import load_reranker

            own = self.llm if self.cfg.reranker == "llm" and not self.cfg.reranker_model else None
            self._reranker = load_reranker(self.cfg.reranker, self.cfg.reranker_model, llm=own,
                                           passage_tokens=self.cfg.rerank_passage_tokens,
                                           **self.cfg.llm_kwargs())
        return self._reranker

    # -- context
    def retrieve(self, questions: list[str]) -> list[tuple[list, int]]:
        """(hits, distinct query terms) per question; the term count scales the BM25 gate signal."""
        if self.kb is None or not self.cfg.use_context:
            return [([], 1) for _ in questions]
        if self.cfg.reranker == "none":
            hits = self.kb.search(questions, top_k=self.cfg.top_k)
        else:
            from ..rerank import first_stage, rerank_hits

            own = dataclasses.replace(self.kb.retrieve_defaults(), top_k=self.cfg.top_k)
            first = self.kb.search(questions, first_stage(own, self.cfg.rerank_top_n))
            hits = [rerank_hits(q, hs, self.reranker(), self.cfg.rerank_top_n, self.cfg.rerank_weight, self.cfg.top_k)
                    for q, hs in zip(questions, first, strict=True)]
        if self.cfg.gate_signal == "bm25":
            terms = [len(set(t)) for t in self.kb.tokenizer()(questions)]
        else:
            terms = [1] * len(questions)
        return list(zip(hits, terms, strict=True))

    def context_text(self, hits: list, query_terms: int = 1, budget: Optional[int] = None) -> tuple[str, list[str]]:
        """The context block for the prompt and the chunk ids it holds ('' and [] when the gate closes);
        its passages hold at most `budget` tokens together (default: cfg.context_tokens)."""
        text, ids, _ = self._context(hits, query_terms, self.cfg.context_tokens if budget is None else budget)
        return text, ids

    def _context(self, hits: list, query_terms: int, budget: int) -> tuple[str, list[str], int]:
        """(context block, chunk ids, passage tokens used) within `budget` passage tokens."""
        passages, ids, total = [], [], 0
        for h in gate_passages(hits, self.cfg, query_terms):
            if budget < MIN_PASSAGE_TOKENS:
                break
            text = self.llm.truncate_tokens(h.text, min(self.cfg.passage_tokens, budget))
            used = self.llm.count_tokens(text)
            if used < MIN_PASSAGE_TOKENS:
                break
            passages.append({"text": text, "source": h.source})
            ids.append(h.chunk_id)
            budget -= used
            total += used
        return (prompts.format_context(passages) if passages else ""), ids, total

    # -- fitting a question into the model's window
    def _encode(self, text: str) -> list:
        tok = getattr(self.llm, "tokenizer", None)
        # a backend without a tokenizer (test stand-ins) is measured in characters
        return list(text) if tok is None else tok(text, add_special_tokens=False)["input_ids"]

    def _decode(self, ids: list) -> str:
        tok = getattr(self.llm, "tokenizer", None)
        text = "".join(ids) if tok is None else tok.decode(ids, skip_special_tokens=True)
        return text.replace("\ufffd", "")  # a cut inside a multi-byte character

    def _count(self, text: str) -> int:
        return len(self._encode(text))

    def _mc_style(self, mode: str) -> str:
        """The multiple-choice prompt style of a path: the last resort drops the worked examples."""
        style = self.cfg.mc_prompt
        if mode == "minimal" and prompts.mc_style(style).examples:
            return "prefill" if prompts.mc_style(style).prefill else "plain"
        return style

    def _max_new(self, mode: str) -> int:
        cfg = self.cfg
        if mode == "full":
            return cfg.max_new_tokens
        fast = max(32, cfg.max_new_tokens // 2)
        return min(fast, LAST_RESORT_NEW_TOKENS) if mode == "minimal" else fast

    def prompt_forms(self, q: ClassifiedQuestion, context: str, mode: str = "full"
                     ) -> list[tuple[Callable[[str, list[str]], str], int]]:
        """(render(stem, option texts) -> the prompt as tokenised, tokens added after it) for every
        prompt the path `mode` (full | fast | minimal) sends for `q`."""
        cfg, llm = self.cfg, self.llm
        if q.question_type != "multiple_choice":
            instruction = self._desc_instructions().keywords if (
                mode == "full" and uses_keyword_prompt(cfg.desc_strategy)) else prompts.DESC_INSTRUCTION
            return [(lambda s, o: llm.render_chat(prompts.desc_messages(s, context, instruction)), self._max_new(mode))]
        style = self._mc_style(mode)

        def label(s: str, o: list[str]) -> str:
            prefix, suffix = prompts.mc_prompt_parts(llm.render_chat(prompts.mc_messages(s, o, context, style=style)), style)
            return prefix + suffix

        forms: list[tuple[Callable[[str, list[str]], str], int]] = [(label, 1)]  # 1: a two-digit label's second digit
        if mode == "full" and "cloze" in cfg.mc_scoring:
            # the option text follows this prompt; the budget counts all options, so the longest fits
            forms.append((lambda s, o: llm.render_chat(prompts.cloze_messages(s, context)), 0))
        if mode == "full" and cfg.self_consistency:
            forms.append((lambda s, o: llm.render_chat(prompts.mc_messages(s, o, context, reasoning=True))
                          .replace(prompts.SPLIT, ""), cfg.sc_max_new_tokens))
        return forms

    def _clip_stem(self, text: str, ids: list, budget: int) -> str:
        if len(ids) <= budget:
            return text
        gap = self._count(prompts.STEM_GAP)
        if budget <= 2 * gap:  # too little for both ends: the end, nearest the options
            return self._decode(ids[len(ids) - budget:] if budget > 0 else []).strip()
        head, tail = prompts.keep_ends(ids, budget - gap)
        return self._decode(head).strip() + prompts.STEM_GAP + self._decode(tail).strip()

    def _room(self, q: ClassifiedQuestion, forms) -> tuple[int, int]:
        """(tokens of the longest prompt of `forms` with an empty question, tokens left for the question)."""
        n = len(q.choices)
        fixed = max(self._count(render("", [""] * n)) + extra for render, extra in forms)
        return fixed, self.llm.max_model_len - fixed - FIT_MARGIN - 2 * n

    def _question_tokens(self, q: ClassifiedQuestion) -> int:
        return self._count(q.parsed_question.strip()) + sum(self._count(t) for t in q.option_texts)

    def fit_with_context(self, q: ClassifiedQuestion, hits: list, query_terms: int = 1, mode: str = "full"
                         ) -> tuple[ClassifiedQuestion, dict, str, list[str]]:
        """(`q` fitted, the `fit` fields, context block, its chunk ids) for the path `mode`. The fast paths
        have no context. On the full path the context gives way first: when the whole question does not
        fit beside it, the context is rebuilt with its passage budget cut by the overflow, down to none;
        only a question that does not fit even without context is cut (`fit`)."""
        if mode != "full":
            return (*self.fit(q, "", mode), "", [])
        context, ids, used = self._context(hits, query_terms, self.cfg.context_tokens)
        if context:
            total = self._question_tokens(q)
            for attempt in range(FIT_ATTEMPTS + 1):
                over = total - self._room(q, self.prompt_forms(q, context, mode))[1]
                if over <= 0:
                    break
                if attempt == FIT_ATTEMPTS:  # still over: no context rather than a cut question
                    context, ids = "", []
                    break
                context, ids, new_used = self._context(hits, query_terms, used - over)  # shrinks by >= the overflow
                log.info("%s: context cut from %d to %d passage tokens so the question (%d tokens) fits max_model_len "
                         "%d", q.question_id, used, new_used, total, self.llm.max_model_len)
                used = new_used
                if not context:
                    break
        return (*self.fit(q, context, mode), context, ids)

    def fit(self, q: ClassifiedQuestion, context: str = "", mode: str = "full") -> tuple[ClassifiedQuestion, dict]:
        """(`q` cut so that every prompt of the path fits `max_model_len`, the Answer fields truncated /
        question_tokens / kept_tokens). ValueError when not even an empty question fits (the context or
        the template alone fill the window: the fallback, without context, may still fit)."""
        limit = self.llm.max_model_len
        forms = self.prompt_forms(q, context, mode)
        texts = q.option_texts
        stem = q.parsed_question.strip()
        stem_ids, opt_ids = self._encode(stem), [self._encode(t) for t in texts]
        total = len(stem_ids) + sum(len(o) for o in opt_ids)
        fixed, budget = self._room(q, forms)
        minimal = mode == "minimal"
        if total <= budget and not minimal:
            return q, {"truncated": False, "question_tokens": total, "kept_tokens": total}
        for _ in range(FIT_ATTEMPTS):
            if budget < 1 + len(texts):
                break
            stem_budget, opt_budgets = prompts.allocate_tokens(len(stem_ids), [len(o) for o in opt_ids], budget)
            if minimal:
                stem_budget = min(stem_budget, LAST_RESORT_STEM_TOKENS)
                opt_budgets = [min(b, LAST_RESORT_OPTION_TOKENS) for b in opt_budgets]
            new_stem = self._clip_stem(stem, stem_ids, stem_budget)
            new_texts = [t if len(ids) <= b else self._decode(ids[:b]).strip()
                         for t, ids, b in zip(texts, opt_ids, opt_budgets, strict=True)]
            over = max(self._count(render(new_stem, new_texts)) + extra for render, extra in forms) - limit
            if over <= 0:
                truncated = new_stem != stem or new_texts != texts
                kept = self._count(new_stem) + sum(self._count(t) for t in new_texts) if truncated else total
                if truncated:
                    log.info("%s: question of %d tokens cut to %d to fit max_model_len %d (%s path)",
                             q.question_id, total, kept, limit, mode)
                keys = sorted(q.choices, key=int)
                fitted = dataclasses.replace(q, parsed_question=new_stem, choices=dict(zip(keys, new_texts, strict=True)))
                return fitted, {"truncated": truncated, "question_tokens": total, "kept_tokens": kept}
            budget -= over + FIT_MARGIN
        raise ValueError(f"question {q.question_id!r}: the prompt does not fit max_model_len {limit} even with the "
                         f"question cut ({fixed} tokens of template, context and answer)")

    # -- multiple choice
    def _labels_share_first_tokens(self, n: int) -> bool:
        try:
            self.llm.label_token_ids([str(j) for j in range(1, n + 1)])
        except ValueError:
            return True
        except (AttributeError, TypeError):  # no tokenizer: the backend scores labels its own way
            return False
        return False

    def label_logprobs(self, prefix: str, suffixes: list[str], n: int, deadline: Optional[float] = None) -> np.ndarray:
        """(len(suffixes), n) log-probs of the labels 1..n after prefix + each suffix. On a tokenizer that
        splits digits (Qwen's) "10" starts with the token of "1", so 10+ options are scored digit by
        digit (`two_digit_label_logprobs`): one more pass per leading digit."""
        labels = [str(j) for j in range(1, n + 1)]
        if n < 10 or not self._labels_share_first_tokens(n):
            return self.llm.option_logprobs(OptionRequest(prefix, suffixes, labels), deadline)
        if n > 99:
            raise ValueError(f"{n} options: labels beyond 99 are not scored")
        digits = [str(d) for d in range(10)]
        first = self.llm.option_logprobs(OptionRequest(prefix, suffixes, digits[1:]), deadline)
        second = {h: self.llm.option_logprobs(OptionRequest(prefix, [s + str(h) for s in suffixes], digits), deadline)
                  for h in range(1, n // 10 + 1)}
        return two_digit_label_logprobs(first, second, n)

    def content_free_logp(self, n: int, style: Optional[str] = None) -> np.ndarray:
        style = style or self.cfg.mc_prompt
        key = (style, n)
        if key not in self._content_free:
            msgs = prompts.mc_messages(prompts.CONTENT_FREE, [prompts.CONTENT_FREE] * n, style=style)
            prefix, suffix = prompts.mc_prompt_parts(self.llm.render_chat(msgs), style)
            self._content_free[key] = self.label_logprobs(prefix, [suffix], n)[0]
        return self._content_free[key]

    def display_logprobs(self, q: ClassifiedQuestion, context: str, orders: list[list[int]],
                         deadline: Optional[float] = None, style: Optional[str] = None) -> np.ndarray:
        """(len(orders), n) label log-probs per display position, one option order per row."""
        style = style or self.cfg.mc_prompt
        texts = q.option_texts
        suffixes, prefix = [], None
        for perm in orders:
            p, s = prompts.mc_prompt_parts(self.llm.render_chat(
                prompts.mc_messages(q.parsed_question, [texts[i] for i in perm], context, style=style)), style)
            if prefix is not None and p != prefix:
                raise AssertionError("option orders must share the prompt prefix")
            prefix = p
            suffixes.append(s)
        return self.label_logprobs(prefix, suffixes, len(texts), deadline)

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
                      scoring: str = "label", style: Optional[str] = None) -> tuple[np.ndarray, int]:
        """(aggregated scores per original option, raw argmax of the original order, 1-based)."""
        n = len(q.choices)
        if "cloze" in scoring and not all(q.option_texts):
            log.warning("%s: an empty option has no text to score; option labels only", q.question_id)
            scoring = "label"
        if scoring in ("cloze", "cloze-pmi"):
            scores = opt.normalize_logprobs(self.cloze(q, context, deadline))
            return scores, int(np.argmax(scores)) + 1
        orders = opt.option_orders(n, rotations, reverse) if "rotate" in debias else [list(range(n))]
        display = self.display_logprobs(q, context, orders, deadline, **({"style": style} if style else {}))
        if "calibrate" in debias:
            cf = self.content_free_logp(n, style)
            display = np.stack([opt.calibrate(row, cf) for row in display])
        raw_choice = int(np.argmax(display[0])) + 1  # orders[0] is the identity
        scores = opt.aggregate_orders(display, orders)
        if "cloze" in scoring:
            scores = opt.combine_scores(scores, self.cloze(q, context, deadline))
        return scores, raw_choice

    def answer_mc(self, q: ClassifiedQuestion, hits: list, fast: bool = False, deadline: Optional[float] = None,
                  query_terms: int = 1, minimal: bool = False) -> Answer:
        cfg = self.cfg
        mode = _mode(fast, minimal)
        fast = fast or minimal
        q, fitted, context, ctx_ids = self.fit_with_context(q, hits, query_terms, mode)
        debias = cfg.debias if not fast else ("calibrate" if "calibrate" in cfg.debias and not minimal else "none")
        # the fallback scores option numbers in one order only (one forward pass)
        scores, raw_choice = self.score_options(q, context, debias, 1 if fast else cfg.rotations, deadline,
                                                reverse=cfg.reverse_orders and not fast,
                                                scoring="label" if fast else cfg.mc_scoring,
                                                style=self._mc_style(mode) if minimal else None)
        best, conf = opt.choice_confidence(scores)
        choice = best + 1
        if cfg.self_consistency and not fast:
            texts = q.option_texts
            rendered = self.llm.render_chat(prompts.mc_messages(q.parsed_question, texts, context, reasoning=True))
            prompt = rendered.replace(prompts.SPLIT, "")
            check_deadline(deadline)
            # the k samples in one call: backends decode identical prompts together (llama.cpp: one prompt pass)
            gens = self.llm.generate([prompt] * cfg.self_consistency, cfg.sc_max_new_tokens,
                                     temperature=cfg.sc_temperature, seed=cfg.seed, max_time=_remaining(deadline))
            votes = [opt.parse_choice(gen.text, len(texts)) for gen in gens]
            choice, conf = opt.majority_vote(votes, scores)
        return Answer(q.question_id, str(choice), q.question_type, round(conf, 4), n_context=len(ctx_ids),
                      context_ids=ctx_ids, scores=[round(float(s), 4) for s in scores], raw_choice=raw_choice,
                      used_fallback=fast, path=_PATHS[mode], **fitted)

    # -- descriptive
    @staticmethod
    def _desc_instructions() -> DescInstructions:
        return DescInstructions(prompts.DESC_INSTRUCTION, prompts.DESC_KEYWORD_INSTRUCTION)

    def answer_similarity(self, texts: Sequence[str]) -> np.ndarray:
        """(n, n) similarity of answers for consensus: cosine of the KB's embedder when it has one, else
        character-bigram overlap."""
        if self.kb is not None and getattr(self.kb, "has_dense", False):
            vecs = np.asarray(self.kb.embedder().embed_passages(list(texts), progress=False), dtype=np.float64)
            vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
            return vecs @ vecs.T
        return char_bigram_similarity(texts)

    def answer_descriptive(self, q: ClassifiedQuestion, hits: list, fast: bool = False,
                           deadline: Optional[float] = None, query_terms: int = 1, minimal: bool = False) -> Answer:
        cfg = self.cfg
        mode = _mode(fast, minimal)
        fast = fast or minimal
        q, fitted, context, ctx_ids = self.fit_with_context(q, hits, query_terms, mode)
        check_deadline(deadline)
        max_new = self._max_new(mode)
        question = q.parsed_question

        def generate(batch: list[str], temperature: float, seed: int) -> list:
            return self.llm.generate(batch, max_new, temperature=temperature, seed=seed,
                                     max_time=None if fast else _remaining(deadline),
                                     repetition_penalty=cfg.repetition_penalty)

        def render(instruction: str) -> str:
            return self.llm.render_chat(prompts.desc_messages(question, context, instruction))

        req = DescRequest(prompt=render, generate=generate,
                          clean=lambda text, truncated: prompts.clean_answer(text, question, truncated=truncated),
                          similarity=self.answer_similarity, samples=cfg.desc_samples, temperature=cfg.desc_temperature,
                          w_keywords=cfg.desc_keyword_weight, seed=cfg.seed, greedy_temperature=cfg.temperature)
        # the fallback paths answer once and greedily: they run when time or the model has failed
        result = run_strategy(cfg.desc_strategy if mode == "full" else "greedy", req, self._desc_instructions())
        text = fit_length(result.text, cfg.desc_target_chars, cfg.desc_max_chars)
        if not text and not fast:
            raise ValueError("the model produced an empty descriptive answer")
        for retry in range(FALLBACK_SAMPLES if fast and not text else 0):
            # still the same model: sample instead of greedy decoding
            gen = generate([render(prompts.DESC_INSTRUCTION)], 0.7, cfg.seed + 1 + retry)[0]
            text = fit_length(prompts.clean_answer(gen.text, question, truncated=gen.truncated), cfg.desc_target_chars,
                              cfg.desc_max_chars)
            if text:
                result = DescResult(text, [], 1, gen.mean_logprob)
                break
        copy = copy_check(text, context, cfg.copy_max_run, cfg.copy_max_overlap)
        rephrased = False
        if copy.copied and mode == "full":
            # the rules want the model's answer, not a returned passage: the same model says it again
            ask = [{"role": "system", "content": prompts.SYSTEM}, {"role": "user", "content": rephrase_request(text)}]
            gen = generate([self.llm.render_chat(ask)], cfg.temperature, cfg.seed)[0]
            again = fit_length(keep_phrases(prompts.clean_answer(gen.text, question, truncated=gen.truncated),
                                            result.keywords), cfg.desc_target_chars, cfg.desc_max_chars)
            if again:
                text, rephrased = again, True
                copy = copy_check(text, context, cfg.copy_max_run, cfg.copy_max_overlap)
        return Answer(q.question_id, text, q.question_type, round(float(np.exp(result.mean_logprob)), 4),
                      n_context=len(ctx_ids), context_ids=ctx_ids, used_fallback=fast, path=_PATHS[mode],
                      desc_keywords=result.keywords, desc_candidates=result.candidates, copy_run=copy.longest_run,
                      copy_overlap=copy.overlap, copied=copy.copied, rephrased=rephrased, **fitted)

    def answer(self, q: ClassifiedQuestion, hits: list, fast: bool = False, deadline: Optional[float] = None,
               query_terms: int = 1, minimal: bool = False) -> Answer:
        """The model's answer on the full path, the fallback (`fast`) or the last resort (`minimal`:
        the shortest prompt, see the module docstring)."""
        t0 = time.perf_counter()
        fn = self.answer_mc if q.question_type == "multiple_choice" else self.answer_descriptive
        a = fn(q, hits, fast=fast, deadline=deadline, query_terms=query_terms, minimal=minimal)
        a.inference_time = round(time.perf_counter() - t0, 3)
        a.gate_score = best_gate_score(hits, self.cfg, query_terms) if hits else None
        return a


_PATHS = {"full": "primary", "fast": "fallback", "minimal": "minimal"}


def _mode(fast: bool, minimal: bool) -> str:
    return "minimal" if minimal else "fast" if fast else "full"


def two_digit_label_logprobs(first: np.ndarray, second: dict[int, np.ndarray], n: int) -> np.ndarray:
    """(R, n) log-probs of the labels 1..n (10 <= n <= 99) scored digit by digit: `first` (R, 9) holds
    log P(d) of the first digit d = 1..9, `second[h]` (R, 10) log P(k | h) of a second digit k = 0..9
    after h, for every h that starts a two-digit label. Label "hk" gets log P(h) + log P(k | h); a
    one-digit label h that starts two-digit ones must also stop after h: log P(h) + log(1 - sum_k
    P(k | h)) (floored at 1e-6: a model sure to go on still leaves h a finite score)."""
    if not 10 <= n <= 99:
        raise ValueError(f"two-digit labels need 10 <= n <= 99, got {n}")
    first = np.asarray(first, dtype=np.float64)
    out = np.empty((first.shape[0], n), dtype=np.float64)
    for j in range(1, n + 1):
        if j < 10:
            out[:, j - 1] = first[:, j - 1]
            if j in second:
                stop = 1.0 - np.exp(np.asarray(second[j], dtype=np.float64)).sum(axis=1)
                out[:, j - 1] += np.log(np.clip(stop, 1e-6, 1.0))
        else:
            h, k = divmod(j, 10)
            out[:, j - 1] = first[:, h - 1] + np.asarray(second[h], dtype=np.float64)[:, k]
    return out


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.01, deadline - time.monotonic())
