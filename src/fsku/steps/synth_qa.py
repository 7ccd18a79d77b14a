"""synth_qa: a teacher LLM writes FSKU-style questions from KB chunks; filters keep the good ones.

Usage:
    python -m fsku.steps.synth_qa [--recipe experiments/<name>/synth_qa.yaml] [--kb DIR --n-chunks N ...] [--no-progress]
    fsku synth-qa --kb outputs/kb --teacher offline:qwen2.5-coder-1.5b-instruct --n-chunks 40 --out outputs/synth_qa
    fsku synth-qa --recipe experiments/demo/synth_qa.yaml --n-chunks 10
    mlflow run . -e synth_qa --env-manager local -P kb=outputs/kb -P teacher=... -P n_chunks=40

Teacher responses are appended to <out>/raw.jsonl as they arrive and cached in .cache/synth; a
killed run started again continues where it stopped (--restart starts over).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import pandas as pd

from ..config import SynthQAConfig
from .args import step_main
from .naming import run_labels
from .preflight import check_inputs

log = logging.getLogger(__name__)


def _plots(stats: dict, accepted: pd.DataFrame) -> dict:
    from .plotting import pyplot

    plt = pyplot()

    figs = {}

    def bars(counts: dict, title: str, name: str, horizontal: bool = False):
        fig, ax = plt.subplots(figsize=(5.5, 3.2 if not horizontal else max(2.5, 0.35 * len(counts) + 1)))
        keys = list(counts)
        if horizontal:
            ax.barh(keys, [counts[k] for k in keys], color="#c44e52")
            ax.invert_yaxis()
        else:
            ax.bar(keys, [counts[k] for k in keys], color="#4c72b0")
        ax.set_title(title)
        fig.tight_layout()
        figs[f"plots/{name}.png"] = fig

    mix = Counter()
    if not accepted.empty:
        mix = Counter(f"{k}/{t}" for k, t in zip(accepted["kind"].str.replace("multiple_choice", "mc")
                                                 .str.replace("descriptive", "desc"), accepted["qtype"], strict=True))
    bars(dict(sorted(mix.items())), "accepted by kind/type", "accepted_by_kind_type")
    bars({f"level {k}": v for k, v in stats["accepted_by_difficulty"].items()}, "accepted by difficulty (1-5)",
         "accepted_by_difficulty")
    reasons = dict(sorted(stats["rejected_by_reason"].items(), key=lambda kv: -kv[1]))
    bars(reasons or {"(none)": 0}, "rejections by reason", "rejections_by_reason", horizontal=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    if not accepted.empty:
        for kind, color in (("multiple_choice", "#4c72b0"), ("descriptive", "#dd8452")):
            lengths = accepted.loc[accepted["kind"] == kind, "question"].str.len()
            if len(lengths):
                ax.hist(lengths, bins=20, alpha=0.6, label=kind, color=color)
        ax.legend()
    ax.set_xlabel("question characters")
    ax.set_title("question length")
    fig.tight_layout()
    figs["plots/question_length_hist.png"] = fig
    return figs


def log_split_dataset(folder: str | Path, split: str, tags: dict, context: str | None = None):
    """One split of a synth_qa folder (its parquet file, read as written) as an MLflow dataset input of the
    active run; None when the split is empty. synth_qa (the producer) and distill (the consumer) both log
    it this way, so the two runs carry the same digest."""
    from .. import tracking

    path = Path(folder) / f"{split}.parquet"
    if not path.is_file():
        return None
    frame = pd.read_parquet(path)
    if frame.empty:
        return None
    return tracking.log_dataset(frame, name=f"fsku-synth-{split}", source=str(path),
                                context=context or ("training" if split == "train" else split), targets="answer",
                                tags={k: str(v) for k, v in tags.items()})


def teacher_sft_figure(teacher: str):
    """The loss curve of a teacher fine-tuned here (`fsku make-tiny-models --kb`: its folder's sft.json), None
    for any other teacher (a hub id, a GGUF, a folder without a readable loss history)."""
    import json

    path = Path(teacher) / "sft.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        log.warning("%s is not JSON: no teacher SFT loss plot", path)
        return None
    losses = info.get("losses") if isinstance(info, dict) else None
    if not isinstance(losses, list) or not losses:
        return None
    from .plotting import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(range(1, len(losses) + 1), losses, lw=1, label="batch loss")
    window = max(1, len(losses) // 20)
    smooth = pd.Series(losses).rolling(window, min_periods=1).mean()
    ax.plot(range(1, len(losses) + 1), smooth, lw=2, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (response tokens)")
    ax.set_title(f"teacher SFT on {info.get('examples', '?')} templated examples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run_step(cfg: SynthQAConfig, progress: bool = True) -> dict:
    """Synthesize, filter and split QA items, logged to one MLflow run: {"result" (SynthResult), "run_id",
    "tracking_uri"}."""
    from .. import tracking
    from ..synth.pipeline import synthesize
    from ..synth.split import SPLIT_NAMES

    check_inputs(models={"--teacher": cfg.teacher, "--judge-model": cfg.judge_model}, kbs={"--kb": cfg.kb})
    params = dataclasses.asdict(cfg)
    with tracking.run("synth_qa", params, tags={"fsku.teacher": cfg.teacher}, **run_labels("synth_qa", cfg)) as active:
        resolved = tracking.resolve_model_fields(cfg, "teacher", "judge_model")
        result = synthesize(resolved, progress=progress)
        s = result.stats
        sft = teacher_sft_figure(resolved.teacher)
        if sft is not None:
            tracking.log_figure(sft, "plots/teacher_sft_loss.png")
        tracking.log_metrics({k: v for k, v in s.items() if isinstance(v, (int, float)) and v is not None})
        tracking.log_metrics({f"rejected_{k}": v for k, v in s["rejected_by_reason"].items()})
        tracking.log_metrics({f"accepted_{k}": v for k, v in {**s["accepted_by_kind"], **s["accepted_by_qtype"],
                                                               **s["accepted_by_split"]}.items()})
        accepted = pd.DataFrame([r.to_dict() for r in result.outcome.accepted])
        if not accepted.empty:
            for split in SPLIT_NAMES:
                log_split_dataset(cfg.out, split, {"kb": str(cfg.kb), "kb_corpus_sha256": s["kb_corpus_sha256"],
                                                         "teacher": cfg.teacher})
            sample = accepted.groupby(["kind", "qtype"], group_keys=False).head(5)
            tracking.log_table(sample[["qa_id", "kind", "qtype", "question", "answer", "keywords", "difficulty_level",
                                       "overall_quality_score", "split"]].astype(str), "tables/sample_items.json")
        rejected = pd.DataFrame(result.outcome.rejected)
        if not rejected.empty:
            tracking.log_table(rejected.head(200).astype(str), "tables/rejections.json")
        for name, fig in _plots(s, accepted).items():
            tracking.log_figure(fig, name)
        tracking.log_dict(s, "stats.json")
        for name in ["accepted.jsonl", "rejected.jsonl"] + [f"{split}.parquet" for split in SPLIT_NAMES]:
            tracking.log_artifact(Path(cfg.out) / name, "synth_qa")
        run_id = active.info.run_id
    return {"result": result, "run_id": run_id, "tracking_uri": tracking.tracking_uri()}


def report(cfg: SynthQAConfig, out: dict) -> Iterator[str]:
    result = out["result"]
    s = result.stats
    yield (f"synth_qa: {s['accepted']} accepted of {s['generated']} generated ({s['acceptance_rate']:.0%}); "
           f"by split {s['accepted_by_split']}; rejections {s['rejected_by_reason']}")
    yield f"outputs: {result.out}  mlflow run: {out['run_id']}  tracking: {out['tracking_uri']}"


def main(argv: list[str] | None = None) -> int:
    return step_main(argv, SynthQAConfig, "fsku synth-qa", __doc__, run_step, report)


if __name__ == "__main__":
    sys.exit(main())
