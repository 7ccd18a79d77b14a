"""quantize: shrink a (merged) causal LM by method name, and the before/after comparison math.

Methods are a name -> `QuantMethod` registry; each builds a transformers quantization config, so
quantizing is one `from_pretrained(..., quantization_config=...)` followed by `save_pretrained`,
and the saved folder loads back through the ordinary LLM backends (the config travels in
config.json). Backends import lazily; a missing one names the package to install.

    int8      torchao int8 weight-only (CPU default; any device)
    bnb-8bit  bitsandbytes LLM.int8() (CPU since bitsandbytes 0.49, CUDA)
    bnb-nf4   bitsandbytes 4-bit NormalFloat with double quantization (CPU kernels need layer
              widths divisible by 64; CUDA)
    gptq      4-bit GPTQ through gptqmodel (calibration texts required)

A LoRA adapter folder (adapter_config.json) is merged into its base model first.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

QUANT_INFO_FILE = "fsku_quantization.json"


@dataclass(frozen=True)
class QuantMethod:
    name: str
    bits: int
    packages: tuple[str, ...]  # import names that must be present
    install: str  # what to pip install when they are not
    devices: tuple[str, ...]  # "cpu" and/or "cuda"
    needs_calibration: bool
    build: Callable[..., object]  # (compute dtype, calibration texts) -> transformers quantization config
    help: str


def _torchao_int8(dtype, calibration):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _bnb_8bit(dtype, calibration):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def _bnb_nf4(dtype, calibration):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def _gptq(dtype, calibration):
    from transformers import GPTQConfig

    return GPTQConfig(bits=4, group_size=128, dataset=list(calibration), desc_act=False)


METHODS: dict[str, QuantMethod] = {
    "int8": QuantMethod("int8", 8, ("torchao",), "torchao==0.18.0", ("cpu", "cuda"), False, _torchao_int8,
                        "torchao int8 weight-only (the CPU default)"),
    "bnb-8bit": QuantMethod("bnb-8bit", 8, ("bitsandbytes",), "bitsandbytes==0.50.2", ("cpu", "cuda"), False, _bnb_8bit,
                            "bitsandbytes LLM.int8()"),
    "bnb-nf4": QuantMethod("bnb-nf4", 4, ("bitsandbytes",), "bitsandbytes==0.50.2", ("cpu", "cuda"), False, _bnb_nf4,
                           "bitsandbytes 4-bit NF4, double quantization"),
    "gptq": QuantMethod("gptq", 4, ("gptqmodel",), "gptqmodel==7.6.0 (builds C extensions; set GPTQMODEL_CPU_WORKERS)",
                        ("cpu", "cuda"), True, _gptq, "4-bit GPTQ (gptqmodel), calibrated on synth_qa prompts"),
}


def get_method(name: str) -> QuantMethod:
    """The registered method, after checking its backend is importable."""
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}; choose one of {sorted(METHODS)}")
    method = METHODS[name]
    missing = [p for p in method.packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(f"quantization method {name!r} needs {', '.join(missing)}: pip install {method.install}")
    return method


# ---------------------------------------------------------------- quantize

def _merged_source(model_path: Path, work: Path, dtype) -> Path:
    """`model_path` itself, or (a LoRA adapter folder) its base with the adapter merged, saved under `work`."""
    if not (model_path / "adapter_config.json").exists():
        return model_path
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    log.info("merging the LoRA adapter in %s into its base model", model_path)
    model = AutoPeftModelForCausalLM.from_pretrained(model_path, dtype=dtype).merge_and_unload()
    out = work / "merged"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    return out


def quantize_model(model_path: str | Path, method: str, out_dir: str | Path, dtype=None, device: str = "cpu",
                   calibration: Optional[Sequence[str]] = None) -> Path:
    """Quantize the model in `model_path` (a folder; adapters are merged first) with `method` and save
    it, with tokenizer, generation config and `fsku_quantization.json`, to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    spec = get_method(method)
    kind = "cuda" if device.startswith("cuda") else device
    if kind not in spec.devices:
        raise ValueError(f"quantization method {method!r} runs on {', '.join(spec.devices)}, not {device!r}")
    if spec.needs_calibration and not calibration:
        raise ValueError(f"quantization method {method!r} needs calibration texts (e.g. synth_qa prompts)")
    model_path, out_dir = Path(model_path), Path(out_dir)
    if not (model_path / "config.json").exists() and not (model_path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{model_path}: not a model folder (no config.json or adapter_config.json)")
    dtype = dtype or torch.float32
    with tempfile.TemporaryDirectory(prefix="fsku-quantize-") as tmp:
        source = _merged_source(model_path, Path(tmp), dtype)
        qconfig = spec.build(dtype, calibration)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, quantization_config=qconfig,
                                                     device_map=device if kind == "cpu" else {"": 0})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        model.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(source).save_pretrained(out_dir)
        try:
            GenerationConfig.from_pretrained(source).save_pretrained(out_dir)
        except OSError:
            pass  # the source has no generation_config.json
    info = {"method": method, "bits": spec.bits, "source": str(model_path), "compute_dtype": str(dtype).replace("torch.", "")}
    (out_dir / QUANT_INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out_dir


def folder_size_mb(path: str | Path) -> float:
    """Bytes on disk of every file under `path`, in MiB."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


# ---------------------------------------------------------------- before/after math

def perplexity(token_logprobs: Sequence[Sequence[float]]) -> float:
    """exp of the mean negative log-probability over all tokens of all sequences (token-weighted)."""
    total = sum(len(seq) for seq in token_logprobs)
    if total == 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(-sum(sum(seq) for seq in token_logprobs) / total)


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """Mean and 95th percentile (linear interpolation) of per-question latencies."""
    if not len(seconds):
        raise ValueError("no latencies")
    arr = np.asarray(seconds, dtype=np.float64)
    return {"latency_mean_s": float(arr.mean()), "latency_p95_s": float(np.percentile(arr, 95))}


def ratios(before: dict[str, float], after: dict[str, float], keys: Sequence[str]) -> dict[str, float]:
    """after / before for each key present and nonzero in both (``<key>_ratio``)."""
    return {f"{k}_ratio": after[k] / before[k] for k in keys if k in before and k in after and before[k]}


def max_logit_difference(reference: np.ndarray, other: np.ndarray) -> float:
    """Largest absolute difference between two logit arrays of one shape, relative to the reference's
    largest magnitude (a scale-free agreement measure)."""
    reference, other = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if reference.shape != other.shape:
        raise ValueError(f"logit shapes differ: {reference.shape} vs {other.shape}")
    scale = float(np.abs(reference).max()) or 1.0
    return float(np.abs(reference - other).max()) / scale
