"""quantize: shrink a (merged) causal LM by method name, and the before/after comparison math.

Methods are named in `fsku.choices.QUANT_METHODS` (what they are: bits, packages, devices) and
implemented here (`IMPLEMENTATIONS`, the same names); each builds a transformers quantization
config, so quantizing is one `from_pretrained(..., quantization_config=...)` followed by `save_pretrained`,
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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .choices import QUANT_METHODS, QuantSpec
from .outputs import check_not_input, check_replaceable, staged_folder

log = logging.getLogger(__name__)

QUANT_INFO_FILE = "fsku_quantization.json"
QUANT_MARKERS = (QUANT_INFO_FILE,)  # what proves a folder is a quantized model written here (so it may be replaced)
MERGED_MARKERS = ("config.json",)  # a merged adapter's folder is a model folder


@dataclass(frozen=True)
class QuantImpl:
    """How a method of `fsku.choices.QUANT_METHODS` runs: `build` (compute dtype, calibration texts) ->
    a transformers quantization config, or `run` (source, out_dir, dtype, device, calibration), which
    quantizes and saves by itself."""
    build: Optional[Callable[..., object]] = None
    run: Optional[Callable[..., None]] = None


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


def _gptq_quantize(source: Path, out_dir: Path, dtype, device: str, calibration) -> None:
    # transformers' own GPTQ integration needs optimum; gptqmodel's API quantizes and saves directly
    from .llm.hf import gptq_environment

    gptq_environment()
    from gptqmodel import GPTQModel
    from gptqmodel import QuantizeConfig as GPTQQuantizeConfig

    model = GPTQModel.load(str(source), GPTQQuantizeConfig(bits=4, group_size=128, desc_act=False), device=device)
    model.quantize(list(calibration), batch_size=1)
    model.save(str(out_dir))


# the method specs (bits, packages, devices, ...) are ground-floor data; the functions are here
METHODS: dict[str, QuantSpec] = QUANT_METHODS
IMPLEMENTATIONS: dict[str, QuantImpl] = {
    "int8": QuantImpl(build=_torchao_int8),
    "bnb-8bit": QuantImpl(build=_bnb_8bit),
    "bnb-nf4": QuantImpl(build=_bnb_nf4),
    "gptq": QuantImpl(run=_gptq_quantize),
}
if set(IMPLEMENTATIONS) != set(METHODS):
    raise ImportError(f"fsku.quantize implements {sorted(IMPLEMENTATIONS)} but fsku.choices.QUANT_METHODS names "
                      f"{sorted(METHODS)}; keep the two tables in step")


def get_method(name: str) -> QuantSpec:
    """The registered method's spec, after checking its backend is importable."""
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}; choose one of {sorted(METHODS)}")
    method = METHODS[name]
    missing = [p for p in method.packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(f"quantization method {name!r} needs {', '.join(missing)}: pip install {method.install}")
    return method


# ---------------------------------------------------------------- quantize

def merged_source(model_path: Path, work: Path, dtype) -> Path:
    """`model_path` itself, or (a LoRA adapter folder) its base with the adapter merged, saved to `work`/merged:
    written beside it and swapped in whole (no shard of an earlier merge survives); an existing `work`/merged
    is replaced only when it is a model folder (config.json)."""
    if not (model_path / "adapter_config.json").exists():
        return model_path
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    out = work / "merged"
    check_replaceable(out, MERGED_MARKERS, "merged model folder")  # before loading the model
    log.info("merging the LoRA adapter in %s into its base model", model_path)
    model = AutoPeftModelForCausalLM.from_pretrained(model_path, dtype=dtype).merge_and_unload()
    with staged_folder(out, MERGED_MARKERS, "merged model folder") as staging:
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(model_path).save_pretrained(staging)
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
    check_not_input(out_dir, {"the source model": model_path}, "quantized model folder")
    dtype = dtype or torch.float32
    # written beside out_dir and swapped in whole; an existing out_dir is replaced only when it is a quantized model
    with tempfile.TemporaryDirectory(prefix="fsku-quantize-") as tmp, \
            staged_folder(out_dir, QUANT_MARKERS, "quantized model folder") as staging:
        source = merged_source(model_path, Path(tmp), dtype)
        impl = IMPLEMENTATIONS[method]
        if impl.run is not None:
            impl.run(source, staging, dtype, device, calibration)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, quantization_config=impl.build(dtype, calibration),
                                                         device_map=device if kind == "cpu" else {"": 0})
            model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(source).save_pretrained(staging)
        try:
            GenerationConfig.from_pretrained(source).save_pretrained(staging)
        except OSError:
            pass  # the source has no generation_config.json
        info = {"method": method, "bits": spec.bits, "source": str(model_path), "compute_dtype": str(dtype).replace("torch.", "")}
        (staging / QUANT_INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out_dir


def folder_size_mb(path: str | Path) -> float:
    """Bytes on disk of every file under `path`, in MiB."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def folder_identity(path: str | Path) -> list:
    """(name, size, mtime) of a model folder's weight and config files: notices a model rebuilt in place."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + [folder / "config.json"]
    return [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files if f.exists()]


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


# ---------------------------------------------------------------- before/after measurement

@dataclass
class ComparisonSet:
    """The same data for every model measured: multiple-choice questions with their gold option,
    (chat messages, reference answer) pairs for perplexity, and chats for the generation speed."""

    mc: list  # [(ClassifiedQuestion, gold option 1-based)]
    references: list  # [(messages, reference answer text)]
    generation: list  # [messages]


def comparison_set(gold_rows: Sequence, gen_prompts: int = 4) -> ComparisonSet:
    """Build the comparison data from labelled rows (`fsku.evaluate.fsku_metric.GoldRow`): a
    multiple-choice row whose answer is an option number gives an accuracy item, and its prompt with
    the options in their original order plus the answer digit a perplexity item; a descriptive row
    gives a perplexity item (its reference answer) and a generation prompt."""
    from .evaluate.fsku_metric import mc_choice
    from .infer import prompts
    from .infer.classify import classify_question

    mc, refs, gen = [], [], []
    for g in gold_rows:
        q = classify_question(g.ID, g.question)
        answer = str(g.answer).strip()
        if q.question_type == "multiple_choice":
            choice = mc_choice(answer)  # FSKU dev files write the answer as "2 <option text>"
            if choice is None or str(choice) not in q.choices:
                raise ValueError(f"labelled row {g.ID}: answer {answer!r} is not one of its options {sorted(q.choices, key=int)}")
            answer = str(choice)
            texts = q.option_texts
            mc.append((q, int(answer)))
            msgs = prompts.mc_messages(q.parsed_question, texts)
            msgs[-1] = {**msgs[-1], "content": msgs[-1]["content"].replace(prompts.SPLIT, "")}
            refs.append((msgs, answer))
        elif answer:
            msgs = prompts.desc_messages(q.parsed_question)
            refs.append((msgs, answer))
            gen.append(msgs)
    # generation speed also needs prompts when the set is all multiple choice: ask for an explanation
    for q, _ in mc:
        if len(gen) >= gen_prompts:
            break
        gen.append(prompts.desc_messages(q.parsed_question))
    if not mc and not refs:
        raise ValueError("the labelled rows give no multiple-choice item and no reference answer to compare on")
    return ComparisonSet(mc, refs, gen[:gen_prompts])


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA memory when a GPU was used), in MiB.

    Linux: VmHWM of /proc/self/status, which starts afresh in a spawned process; getrusage's
    ru_maxrss survives exec and would report the parent's peak in a child."""
    import resource

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak_kb = int(line.split()[1])
    except OSError:
        pass
    out = {"peak_rss_mb": peak_kb / 1024}
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    return out


def measure_model(model: str, data: ComparisonSet, dtype: str = "auto", device: str = "auto", batch_size: int = 8,
                  max_model_len: int = 4096, debias: str = "rotate", rotations: int = 0, gen_tokens: int = 64,
                  progress: bool = False) -> dict:
    """Load `model` with the transformers backend and measure it on `data`: option-scoring accuracy
    and per-question latency, perplexity of the reference answers, greedy generation speed, load
    time, size on disk and peak memory. Returns {"metrics": {...}, "choices": [...]}."""
    import time

    from tqdm.auto import tqdm

    from .config import InferConfig
    from .infer.answer import Answerer
    from .llm import load_llm

    t0 = time.perf_counter()
    llm = load_llm(model, backend="transformers", dtype=dtype, device=device, max_model_len=max_model_len,
                   batch_size=batch_size)
    metrics: dict[str, float] = {"load_s": time.perf_counter() - t0, "size_mb": folder_size_mb(llm.model_id)}
    cfg = InferConfig(model=model, kb=None, context="none", debias=debias, rotations=rotations,
                      batch_size=batch_size, cache_dir="")
    answerer = Answerer(llm, cfg)
    choices, latencies = [], []
    for q, _ in tqdm(data.mc, desc=f"options {Path(model).name}", disable=not progress):
        t = time.perf_counter()
        scores, _ = answerer.score_options(q, "", debias, rotations)
        latencies.append(time.perf_counter() - t)
        choices.append(int(np.argmax(scores)) + 1)
    if data.mc:
        correct = [c == gold for c, (_, gold) in zip(choices, data.mc, strict=True)]
        metrics.update({"mc_accuracy": float(np.mean(correct)), "mc_correct": int(sum(correct)), "n_mc": len(correct)})
        metrics.update(latency_summary(latencies))
    if data.references:
        rendered = [llm.render_chat(m) for m, _ in data.references]
        logps = llm.continuation_logprobs(rendered, [a for _, a in data.references])
        metrics.update({"perplexity": perplexity(logps), "reference_tokens": sum(len(x) for x in logps)})
    if data.generation:
        n_tokens, seconds = 0, 0.0
        for msgs in data.generation:  # one at a time: the latency a single question sees
            t = time.perf_counter()
            gen = llm.generate([llm.render_chat(msgs)], max_new_tokens=gen_tokens)[0]
            seconds += time.perf_counter() - t
            n_tokens += gen.n_tokens
        metrics.update({"tokens_per_s": n_tokens / seconds if seconds else 0.0, "generated_tokens": n_tokens})
    metrics.update(peak_memory_mb())
    return {"metrics": metrics, "choices": choices, "dtype": llm.dtype, "device": str(llm.device)}


def run_isolated(fn: Callable, *args, **kw):
    """`fn(*args, **kw)` in a fresh process (spawn): peak memory then belongs to that call alone (one
    model measured), and its memory returns to the system when it ends."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kw).result()


COMPARED = ("mc_accuracy", "perplexity", "latency_mean_s", "latency_p95_s", "tokens_per_s", "size_mb",
            "peak_rss_mb", "peak_cuda_mb", "load_s")
# the compared metrics where more is better; for the others (perplexity, latency, size, memory, load time) less is
HIGHER_IS_BETTER = frozenset({"mc_accuracy", "tokens_per_s"})


def ratio_verdict(key: str, ratio: float) -> str:
    """'better', 'worse' or 'same' for a quantized/original ratio of metric `key` (``<metric>_ratio`` or
    the metric's name), by the metric's direction: x1.09 tokens/s is better, x1.09 latency worse."""
    metric = key.removesuffix("_ratio")
    if ratio == 1.0:
        return "same"
    return "better" if (ratio > 1.0) == (metric in HIGHER_IS_BETTER) else "worse"


def compare(original: dict, quantized: dict, gold: Sequence[int] = ()) -> dict:
    """The before/after summary: both models' metrics (prefixed), quantized/original ratios, and,
    when per-question choices and gold options are given, the correct answers lost and gained."""
    before, after = original["metrics"], quantized["metrics"]
    out = {f"original_{k}": v for k, v in before.items()}
    out.update({f"quantized_{k}": v for k, v in after.items()})
    out.update(ratios(before, after, COMPARED))
    if gold:
        a, b = original["choices"], quantized["choices"]
        if not (len(a) == len(b) == len(gold)):
            raise ValueError(f"choices for {len(a)} and {len(b)} questions but {len(gold)} gold options")
        out["correct_lost"] = sum(x == g != y for x, y, g in zip(a, b, gold))
        out["correct_gained"] = sum(y == g != x for x, y, g in zip(a, b, gold))
        out["answers_changed"] = sum(x != y for x, y in zip(a, b))
    return out
