"""quantize: shrink a student (by default the registry's champion) and prove what it cost.

Usage:
    python -m fsku.steps.quantize [--recipe experiments/<name>/quantize.yaml] [--model URI_OR_DIR --method M ...] [--no-progress]
    mlflow run . -e quantize --env-manager local -P model=models:/fsku-student@champion -P method=int8
    fsku quantize --model outputs/distill/merged --method bnb-nf4 --gold ../shared/data/fsku-benchmark/mcq_dev.csv

One run measures the original and the quantized model on the same labelled data (each in its own
process by default, so peak memory is per model): option-scoring accuracy, answers lost and gained,
perplexity of the reference answers, mean / p95 latency per question, greedy tokens per second, size
on disk, peak memory and load time. MLflow gets both sides as metrics, quantized/original ratios, a
comparison table, a per-question table and a plot; the quantized model is registered as a new version
(tags: quantization method, bits, source, source version, and the source version's own tags).

<out>/model holds the quantized model; <out>/measure_{original,quantized}.json each model's
measurement. A run started again reuses what matches its settings (--restart redoes everything).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Iterator

import pandas as pd

from ..config import QuantizeConfig
from ..outputs import check_not_input, check_replaceable
from .args import step_main
from .naming import STUDENT_MODEL_DESCRIPTION, run_labels, student_description
from .preflight import check_inputs

log = logging.getLogger(__name__)

MEASURE_KEYS = ("gold", "max_questions", "debias", "rotations", "batch_size", "max_model_len", "gen_prompts",
                "gen_tokens", "dtype", "device")


def resolve_source(model: str) -> tuple[Path, dict[str, str]]:
    """A local folder for `model` and what is known about where it came from (registry name and
    version, and that version's tags, for a models:/ URI)."""
    from ..llm.resolve import resolve_model

    if model.startswith("models:/"):
        from .. import tracking

        folder, name, version = tracking.download_registered_model(model)
        return folder, {"source": model, "source_model": name, "source_version": version,
                        **{f"source.{k}": v for k, v in tracking.model_version_tags(name, version).items()}}
    if (Path(model) / "adapter_config.json").is_file():  # a LoRA adapter: the caller merges it
        return Path(model), {"source": model}
    resolved = resolve_model(model)
    if not Path(resolved).is_dir():  # a hub id: the cached snapshot (offline) or a download
        from huggingface_hub import snapshot_download

        resolved = snapshot_download(resolved)
    return Path(resolved), {"source": model}


def calibration_texts(folder: str, n: int) -> list[str]:
    """gptq calibration: question + answer texts of the first `n` synth_qa training records, or
    (a knowledge-base folder) the first `n` chunk texts."""
    from ..synth.records import read_jsonl, render_mc_question

    path = Path(folder) / "train.jsonl"
    if not path.exists() and (Path(folder) / "chunks.parquet").exists():
        chunks = pd.read_parquet(Path(folder) / "chunks.parquet", columns=["text"])
        return [t for t in chunks["text"].astype(str) if t.strip()][:n]
    if not path.exists():
        raise FileNotFoundError(f"{path}: calibration needs a synth_qa folder (train.jsonl) or a KB folder (chunks.parquet)")
    texts = []
    for r in read_jsonl(path)[:n]:
        question = render_mc_question(r.question, [r.choices[k] for k in sorted(r.choices, key=int)]) \
            if r.choices else r.question
        texts.append(f"{question}\n{r.answer}")
    if not texts:
        raise ValueError(f"{path}: no records for calibration")
    return texts


def _reuse(path: Path, settings: dict, restart: bool):
    if restart or not path.exists():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("settings") != settings:
        log.info("%s was measured with other settings; measuring again", path)
        return None
    log.info("reusing %s", path)
    return saved


def comparison_figure(summary: dict):
    from .plotting import pyplot

    plt = pyplot()

    from ..quantize import ratio_verdict

    keys = [k for k in summary if k.endswith("_ratio")]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    values = [summary[k] for k in keys]
    # coloured by each metric's direction: green where quantization helped, red where it cost
    colours = {"better": "#55a868", "worse": "#c44e52", "same": "#8c8c8c"}
    ax.barh([k.removesuffix("_ratio") for k in keys], values,
            color=[colours[ratio_verdict(k, v)] for k, v in zip(keys, values, strict=True)])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("quantized / original (green: better, red: worse)")
    ax.set_title("what quantization changed")
    fig.tight_layout()
    return fig


def run_step(cfg: QuantizeConfig, progress: bool = True) -> dict:
    """Quantize, measure both models, log and register: {"summary", "table", "model_dir", "version",
    "run_id", "registered_as", "tracking_uri"}."""
    from .. import tracking
    from ..evaluate.fsku_metric import load_gold_sets
    from ..quantize import (
        METHODS,
        QUANT_INFO_FILE,
        QUANT_MARKERS,
        compare,
        comparison_set,
        folder_identity,
        measure_model,
        merged_source,
        quantize_model,
        run_isolated,
    )

    check_inputs(models={"--model": cfg.model}, files={"--gold": cfg.gold, "--calibration": cfg.calibration})
    out = Path(cfg.out)
    check_not_input(out, {"--model": cfg.model, "--gold": [g.strip() for g in cfg.gold.split(",") if g.strip()],
                          "--calibration": cfg.calibration}, "--out")
    check_replaceable(out / "model", QUANT_MARKERS, "quantized model folder")  # refused before the download and merge
    out.mkdir(parents=True, exist_ok=True)
    source, provenance = resolve_source(cfg.model)
    if (source / "adapter_config.json").is_file():
        import torch

        # the original is measured as the merged model that gets quantized; merged once per adapter
        merged = out / "merged" / "config.json"
        newest = max(f.stat().st_mtime for f in source.iterdir() if f.is_file())
        if cfg.restart or not merged.exists() or merged.stat().st_mtime < newest:
            merged_source(source, out, torch.float32 if cfg.dtype in ("auto", "float32") else getattr(torch, cfg.dtype))
        source = merged.parent
    if (source / QUANT_INFO_FILE).exists():
        raise ValueError(f"{cfg.model}: already quantized ({json.loads((source / QUANT_INFO_FILE).read_text())['method']}); "
                         "quantize the unquantized student instead")
    gold = load_gold_sets(cfg.gold)
    if cfg.max_questions:
        gold = gold[:cfg.max_questions]
    data = comparison_set(gold, cfg.gen_prompts)
    log.info("comparing on %d multiple-choice questions, %d reference answers, %d generation prompts",
             len(data.mc), len(data.references), len(data.generation))

    model_dir = out / "model"
    info_path = model_dir / QUANT_INFO_FILE
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    source_identity = folder_identity(source)
    if cfg.restart or info.get("method") != cfg.method or info.get("source") != str(source) \
            or info.get("source_identity") != source_identity:
        calibration = calibration_texts(cfg.calibration, cfg.n_calibration) if METHODS[cfg.method].needs_calibration \
            and cfg.calibration else None
        import time

        from ..llm.hf import pick_device, pick_dtype

        device = pick_device(cfg.device)
        t0 = time.perf_counter()
        quantize_kw = dict(dtype=pick_dtype(cfg.dtype, device), device=device, calibration=calibration)
        if cfg.isolate:  # the full-precision copy loaded for quantizing leaves with its process
            run_isolated(quantize_model, source, cfg.method, model_dir, **quantize_kw)
        else:
            quantize_model(source, cfg.method, model_dir, **quantize_kw)
        info = json.loads(info_path.read_text(encoding="utf-8"))
        info["quantize_s"] = round(time.perf_counter() - t0, 2)
        info["source_identity"] = source_identity
        info_path.write_text(json.dumps(info, indent=2), encoding="utf-8")

    settings = {k: getattr(cfg, k) for k in MEASURE_KEYS}
    def measure(folder: str, data, **kw):
        return run_isolated(measure_model, folder, data, **kw) if cfg.isolate else measure_model(folder, data, **kw)

    kw = dict(dtype=cfg.dtype, device=cfg.device, batch_size=cfg.batch_size, max_model_len=cfg.max_model_len,
              debias=cfg.debias, rotations=cfg.rotations, gen_tokens=cfg.gen_tokens, progress=progress)
    results = {}
    for label, folder in (("original", source), ("quantized", model_dir)):
        path = out / f"measure_{label}.json"
        identity = {**settings, "model": str(folder), "weights": folder_identity(folder)}
        saved = _reuse(path, identity, cfg.restart)
        if saved is None:
            log.info("measuring the %s model (%s)", label, folder)
            saved = {"settings": identity, **measure(str(folder), data, **kw)}
            path.write_text(json.dumps(saved, indent=2), encoding="utf-8")
        results[label] = saved

    gold_options = [g for _, g in data.mc]
    summary = compare(results["original"], results["quantized"], gold_options)
    summary["quantize_s"] = info.get("quantize_s", 0.0)
    rows = [{"metric": k.removeprefix("original_"), "original": v,
             "quantized": summary.get(f"quantized_{k.removeprefix('original_')}"),
             "ratio": summary.get(f"{k.removeprefix('original_')}_ratio")}
            for k, v in summary.items() if k.startswith("original_")]
    table = pd.DataFrame(rows)
    table.to_csv(out / "comparison.csv", index=False)
    questions = pd.DataFrame({"ID": [q.question_id for q, _ in data.mc], "gold": gold_options,
                              "original": results["original"]["choices"], "quantized": results["quantized"]["choices"]})

    params = dataclasses.asdict(cfg)
    tags = {"fsku.model": cfg.model, "fsku.quantization": cfg.method, "fsku.source": provenance.get("source", cfg.model)}
    version = ""
    with tracking.run("quantize", params, tags=tags, **run_labels("quantize", cfg)) as active:
        tracking.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
        tracking.log_table(table, "tables/comparison.json")
        if len(questions):
            tracking.log_table(questions, "tables/questions.json")
        tracking.log_figure(comparison_figure(summary), "plots/quantize_comparison.png")
        tracking.log_dict(info, "fsku_quantization.json")
        if cfg.register_as:
            source_tags = {k.removeprefix("source."): v for k, v in provenance.items() if k.startswith("source.")}
            lineage = {
                **source_tags, "quantization": cfg.method, "bits": METHODS[cfg.method].bits,
                "source": provenance.get("source", cfg.model), "source_version": provenance.get("source_version", ""),
                "compute_dtype": info.get("compute_dtype", ""), "mc_accuracy": summary.get("quantized_mc_accuracy", ""),
                "mc_accuracy_original": summary.get("original_mc_accuracy", ""), "quantize_run": active.info.run_id}
            version = tracking.register_student(model_dir, cfg.register_as, lineage,
                                                description=student_description("quantized", lineage),
                                                model_description=STUDENT_MODEL_DESCRIPTION,
                                                logged_name=f"student-{cfg.method}")
        run_id = active.info.run_id
    return {"summary": summary, "table": table, "model_dir": model_dir, "version": version, "run_id": run_id,
            "registered_as": cfg.register_as, "tracking_uri": tracking.tracking_uri()}


def report(cfg: QuantizeConfig, result: dict) -> Iterator[str]:
    pd.set_option("display.width", 160)
    yield result["table"].to_string(index=False, float_format=lambda v: f"{v:.4g}")
    s = result["summary"]
    if "correct_lost" in s:
        yield (f"multiple choice: {s['original_mc_correct']} -> {s['quantized_mc_correct']} correct of "
               f"{s['original_n_mc']} ({s['correct_lost']} lost, {s['correct_gained']} gained)")
    where = f"models:/{result['registered_as']}/{result['version']}" if result["version"] else "(not registered)"
    yield (f"quantized ({cfg.method}): {result['model_dir']}  registered: {where}  mlflow run: {result['run_id']}  "
           f"tracking: {result['tracking_uri']}")


def main(argv: list[str] | None = None) -> int:
    return step_main(argv, QuantizeConfig, "fsku quantize", __doc__, run_step, report)


if __name__ == "__main__":
    sys.exit(main())
