"""distill: teacher and student answer the synth_qa prompts; a LoRA student learns from both
(DistiLLM-2 contrastive loss, or a baseline), is merged and registered.

Usage:
    python -m fsku.steps.distill [--recipe experiments/<name>/distill.yaml] [--data DIR --max-steps N ...] [--no-progress]
    fsku distill --data outputs/synth_qa --teacher offline:qwen2.5-coder-1.5b-instruct \\
        --student offline:qwen2.5-coder-0.5b-instruct --loss-type distillm_v2 --alpha 0.1 --beta 1.0 --max-steps 50
    fsku distill --recipe experiments/demo/distill.yaml --teacher models/tiny/teacher --student models/tiny/student
    mlflow run . -e distill --env-manager local -P loss_type=distillm_v2 -P alpha=0.1 -P beta=1.0

Responses are appended to <out>/responses_*.jsonl and training checkpoints to
<out>/round_<R>/checkpoints: a killed run started again continues (--restart starts over).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
from pathlib import Path
from typing import Iterator

import pandas as pd

from ..config import DistillConfig
from .args import step_main
from .naming import STUDENT_MODEL_DESCRIPTION, run_labels, student_description
from .preflight import check_inputs
from .synth_qa import log_split_dataset

log = logging.getLogger(__name__)


def loss_curve_figures(history: list[dict]) -> dict:
    """Loss terms, alpha/beta and learning rate / grad norm against the step."""
    from .plotting import pyplot

    plt = pyplot()

    figs = {}
    df = pd.DataFrame([h for h in history if "loss" in h or any(k.endswith("/loss") for k in h)])
    if df.empty:
        return figs
    df["x"] = range(1, len(df) + 1)
    groups = {
        "loss_terms": [c for c in df.columns if c.endswith("loss") or "loss" in c.split("/")],
        "alpha_beta": [c for c in df.columns if "alpha/" in c or c.endswith("beta")],
        "lr_grad_norm": [c for c in df.columns if c.endswith(("learning_rate", "grad_norm"))],
        "prob_gap": [c for c in df.columns if "gap/" in c],
    }
    for name, cols in groups.items():
        cols = [c for c in cols if c != "x" and pd.api.types.is_numeric_dtype(df[c])]
        if not cols:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.4))
        marker = "." if len(df) < 30 else None
        # a learning rate (~1e-4) drawn on the grad-norm axis is a flat line at 0: it gets its own axis
        right = [c for c in cols if c.endswith("learning_rate")] if len(cols) > 1 else []
        for c in cols:
            if c not in right:
                ax.plot(df["x"], df[c], label=c, marker=marker)
        handles, labels = ax.get_legend_handles_labels()
        if right:
            twin = ax.twinx()
            for c in right:
                twin.plot(df["x"], df[c], label=c, marker=marker, color="#c44e52", ls="--")
            twin.set_ylabel("learning rate")
            twin.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
            more_handles, more_labels = twin.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        ax.set_xlabel("logging step")
        ax.set_title(name.replace("_", " "))
        ax.legend(handles, labels, fontsize=7)
        fig.tight_layout()
        figs[f"plots/{name}.png"] = fig
    return figs


def heldout_figure(history: list[dict]):
    """Held-out KL to the teacher and NLL of its responses against the optimizer step (None when not measured)."""
    rows = [h for h in history if any("heldout/" in k for k in h)]
    if not rows:
        return None
    from .plotting import pyplot

    plt = pyplot()

    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    # with rounds > 1 the names carry the round (r1/heldout/...): one line per column
    for col in sorted(c for c in df.columns if "heldout/" in c):
        part = df.dropna(subset=[col])
        ax.plot(part["step"], part[col], marker="o", label=col)
    ax.set_xlabel("optimizer step")
    ax.set_title("held-out prompts: student vs teacher")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _synth_stats(data: str | Path) -> dict:
    """synth_qa's stats.json in the data folder ({} when the folder was not written by synth_qa)."""
    import json

    path = Path(data) / "stats.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        log.warning("%s is not JSON: the student's lineage tags leave out the synthetic data's KB and teacher", path)
        return {}


def data_version(data: str | Path) -> str:
    path = Path(data) / "train.jsonl"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else ""


def run_step(cfg: DistillConfig, progress: bool = True) -> dict:
    """Distill, log the run and register the merged student: {"result" (DistillResult), "run_id",
    "version" (registered version, "" when not registered), "tracking_uri"}."""
    from .. import tracking
    from ..distill.pipeline import distill

    check_inputs(models={"--teacher": cfg.teacher, "--student": cfg.student},
                 kbs={"--kb": cfg.kb if cfg.context != "none" else None}, files={"--data": cfg.data})
    params = dataclasses.asdict(cfg)
    version = data_version(cfg.data)
    tags = {"fsku.teacher": cfg.teacher, "fsku.student": cfg.student, "fsku.loss_type": cfg.loss_type,
            "fsku.data_version": version}
    with tracking.run("distill", params, tags=tags, **run_labels("distill", cfg)) as active:
        result = distill(tracking.resolve_model_fields(cfg, "teacher", "student"),  # models:/ URIs -> local folders
                         log_fn=lambda metrics, step: tracking.log_metrics(metrics, step=step), progress=progress)
        s = result.stats
        final = s["rounds"][-1]
        summary = {"train_records": s["train_records"], "total_s": s["total_s"], "teacher_response_s": s["teacher_response_s"],
                   "final_train_loss": final["train_loss"], "s_per_step": final["s_per_step"],
                   "trainable_parameters": final["trainable_parameters"], "pairs": final["pairs"]["pairs"]}
        summary["peak_rss_mb"] = final["peak_rss_mb"]
        # the teacher's probability outside the stored top-k (teacher_logits=topk; spread evenly in the loss)
        for key, value in (("teacher_tail_mass", final.get("teacher_tail_mass")),
                           ("heldout_tail_mass", s.get("heldout_tail_mass")),
                           ("teacher_label_accuracy", s.get("teacher_label_accuracy"))):
            if value is not None:
                summary[key] = value
        if "peak_gpu_mb" in final:
            summary["peak_gpu_mb"] = final["peak_gpu_mb"]
        for key, value in final["pairs"].items():
            summary[f"pairs_{key}"] = value
        tracking.log_metrics(summary)
        for name, fig in loss_curve_figures(result.history).items():
            tracking.log_figure(fig, name)
        held = heldout_figure(result.history)
        if held is not None:
            tracking.log_figure(held, "plots/heldout_kl.png")
        pairs = pd.read_json(Path(cfg.out) / f"pairs_r{cfg.rounds}.jsonl", lines=True)
        if not pairs.empty:
            sample = pd.DataFrame({"prompt_id": pairs["prompt_id"], "kind": pairs["kind"],
                                   "prompt": [m[-1]["content"] for m in pairs["prompt"]],
                                   "teacher (chosen)": [m[-1]["content"] for m in pairs["chosen"]],
                                   "student (rejected)": [m[-1]["content"] for m in pairs["rejected"]]})
            tracking.log_table(sample.head(50), "tables/pairs_sample.json")
        tracking.log_dict(s, "stats.json")
        tracking.log_artifact(Path(cfg.out) / f"pairs_r{cfg.rounds}.jsonl", "distill")
        synth_stats = _synth_stats(cfg.data)
        # the same source metadata as synth_qa logged (older stats.json files call the corpus hash kb_version)
        synth_corpus = synth_stats.get("kb_corpus_sha256", synth_stats.get("kb_version", ""))
        datasets = {split: log_split_dataset(cfg.data, split, {"kb": synth_stats.get("kb", ""), "kb_corpus_sha256": synth_corpus,
                                                                "teacher": synth_stats.get("teacher", "")})
                    for split in ("train", "validation")}
        model_version = ""
        if cfg.register_as:
            train = datasets.get("train")
            lineage = {
                "base_model": cfg.student, "teacher": cfg.teacher, "loss_type": cfg.loss_type, "alpha": cfg.alpha,
                "adaptive_alpha": cfg.adaptive_alpha,
                "beta": (f"{cfg.beta_start:g}->{cfg.beta_end:g} over {cfg.beta_ramp_ratio:g} of the steps"
                         if cfg.gradual_beta else cfg.beta), "data": cfg.data, "data_version": version,
                "rounds": cfg.rounds, "steps": final["steps"], "distill_run": active.info.run_id,
                # the MLflow dataset digest: the same as on the synth_qa run that wrote the data
                "training_dataset": f"{train.name}@{train.digest}" if train is not None else "",
                "synth_kb": synth_stats.get("kb", ""), "synth_kb_corpus_sha256": synth_corpus,
                "synth_teacher": synth_stats.get("teacher", ""), "synth_judge": synth_stats.get("judge", "")}
            model_version = tracking.register_student(result.merged, cfg.register_as, lineage,
                                                      description=student_description("distilled", lineage),
                                                      model_description=STUDENT_MODEL_DESCRIPTION)
        run_id = active.info.run_id
    return {"result": result, "run_id": run_id, "version": model_version, "tracking_uri": tracking.tracking_uri()}


def report(cfg: DistillConfig, out: dict) -> Iterator[str]:
    result, final = out["result"], out["result"].stats["rounds"][-1]
    yield (f"distill ({cfg.loss_type}): {final['pairs']['pairs']} pairs, {final['steps']} steps, "
           f"{final['s_per_step']} s/step, final train loss {final['train_loss']:.4f}")
    where = f"models:/{cfg.register_as}/{out['version']}" if out["version"] else "(not registered)"
    yield f"merged student: {result.merged}  registered: {where}  mlflow run: {out['run_id']}  tracking: {out['tracking_uri']}"


def main(argv: list[str] | None = None) -> int:
    return step_main(argv, DistillConfig, "fsku distill", __doc__, run_step, report)


if __name__ == "__main__":
    sys.exit(main())
