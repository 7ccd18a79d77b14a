"""Run names and notes: what the MLflow runs table shows for each step.

A run is named after its step and the few settings that tell two runs of it apart
(``distill-distillm_v2-r16-150steps``, ``evaluate-fsku-student@v3-mcq_dev``), and carries a one-line
note (the stage's summary, the text MLproject shows above its entry point). Pure functions of the
step's config: no MLflow here (`fsku.tracking` applies them).
"""
from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any, Callable, Optional

from ..config import STAGE_CONFIGS

MAX_NAME_CHARS = 120
# folder names that say nothing alone: their parent goes in front (models/tiny/teacher -> tiny-teacher)
GENERIC_FOLDERS = {"merged", "model", "models", "teacher", "student", "final", "adapter", "kb", "bundle"}


def short_model(ref: Optional[str]) -> str:
    """A short, readable name of a model or KB reference.

    models:/fsku-student@champion -> fsku-student@champion; models:/fsku-student/3 -> fsku-student@v3;
    offline:qwen2.5-coder-1.5b-instruct -> qwen2.5-coder-1.5b-instruct; a hub id org/name -> name;
    a folder or file -> its name (with its parent's when the name alone is generic: tiny-teacher);
    a .gguf file -> its stem; None or '' -> 'none'."""
    text = str(ref or "").strip()
    if not text:
        return "none"
    if text.startswith("models:/"):
        body = text[len("models:/"):].strip("/")
        name, _, version = body.partition("/")
        return f"{name}@v{version}" if version.isdigit() else (f"{name}@{version}" if version else name)
    if text.startswith("offline:"):
        return text[len("offline:"):]
    parts = [p for p in PurePosixPath(text.replace("\\", "/")).parts if p not in ("/", ".", "..")]
    if not parts:
        return text
    last = parts[-1]
    if last.lower().endswith(".gguf"):
        last = last[: -len(".gguf")]
    if last.lower() in GENERIC_FOLDERS and len(parts) > 1:
        return f"{parts[-2]}-{last}"
    return last


def file_stem(path: Optional[str]) -> str:
    """The name of a file or folder argument without its extension (comma-separated lists: each, joined by +)."""
    items = [p.strip() for p in str(path or "").split(",") if p.strip()]
    if not items:
        return "none"
    return "+".join(PurePosixPath(p.replace("\\", "/")).stem or p for p in items)


def _steps(cfg) -> str:
    steps = getattr(cfg, "max_steps", 0)
    return f"{steps}steps" if steps else f"{getattr(cfg, 'epochs', 0):g}epochs"


# stage -> the parts of its run name after the stage (each a short string)
_NAME_PARTS: dict[str, Callable[[Any], list[str]]] = {
    "build_kb": lambda c: [file_stem(c.corpus), f"{c.chunk_size}{'tok' if c.length_unit == 'tokens' else 'ch'}",
                           c.bm25_tokenizer, c.fusion],
    "synth_qa": lambda c: [short_model(c.teacher), f"{c.n_chunks}x{c.questions_per_chunk}"],
    "distill": lambda c: [c.loss_type, f"r{c.lora_r}", _steps(c)],
    "quantize": lambda c: [short_model(c.model), c.method],
    "predict": lambda c: [short_model(c.model), file_stem(c.input), c.context],
    "evaluate": lambda c: [short_model(c.model), file_stem(c.gold), c.context],
    "tune": lambda c: [c.study, f"{c.n_trials}trials",
                       c.study_name if c.study_name not in (None, f"fsku-{c.study}") else ""],
    "promote": lambda c: [f"{c.model_name}@{'v' + c.candidate if c.candidate.isdigit() else c.candidate}", c.gate],
    "package": lambda c: [short_model(c.model), short_model(c.kb) if c.kb else "no-kb"],
    "main": lambda c: [file_stem(c.corpus), short_model(c.teacher), short_model(c.student)],
}


def run_name(stage: str, cfg) -> str:
    """`<stage>-<key settings>`, characters MLflow's UI and shells handle (no spaces or slashes), at
    most MAX_NAME_CHARS long."""
    if stage not in _NAME_PARTS:
        raise ValueError(f"no run name rule for stage {stage!r}; known: {sorted(_NAME_PARTS)}")
    parts = [stage, *(p for p in _NAME_PARTS[stage](cfg) if p)]
    name = "-".join(re.sub(r"[\s/\\]+", "_", str(p)) for p in parts)
    return name[:MAX_NAME_CHARS]


def run_note(stage: str) -> str:
    """The stage's one-line summary (its config's docstring, as MLproject shows it)."""
    cls = STAGE_CONFIGS.get(stage)
    if cls is None:
        raise ValueError(f"unknown stage {stage!r}; known: {sorted(STAGE_CONFIGS)}")
    return " ".join((cls.__doc__ or stage).strip().split("\n\n")[0].split())


def run_labels(stage: str, cfg) -> dict[str, str]:
    """`name` and `note` for `tracking.run` (``tracking.run(stage, params, **run_labels(stage, cfg))``)."""
    return {"name": run_name(stage, cfg), "note": run_note(stage)}


# ----------------------------------------------------------------------------- registry cards
KB_MODEL_DESCRIPTION = ("Knowledge bases built by fsku's build_kb: statute-aware chunks, BM25 + dense index, fusion "
                        "settings in the manifest. Each version's tags give its corpus hash, counts and settings.")
STUDENT_MODEL_DESCRIPTION = ("LLM students of fsku: LoRA-distilled from a teacher (distill) or quantized (quantize). "
                             "Each version's tags give base model, teacher, training data digest and the KB the data came from; "
                             "promote's tags say which evaluation made it champion and the KB version it ships with.")
KB_LINEAGE_FIELDS = ("chunk_size", "chunk_overlap", "length_unit", "statute_mode", "bm25_tokenizer", "embedding_model",
                     "fusion", "w_bm25", "statute_family", "w_link", "group")


def kb_lineage(manifest: dict, kb_version: str, run_id: str) -> tuple[dict, str]:
    """(version tags, description) of a registered KB from its manifest: corpus and its hash, counts,
    chunking and fusion settings, the KB version the answer caches key on, the build run."""
    params, stats = manifest.get("params", {}), manifest.get("stats", {})
    levels = {k.removeprefix("documents_"): v for k, v in stats.items() if k.startswith("documents_") and v}
    tags = {"corpus": params.get("corpus", ""), "corpus_sha256": str(manifest.get("corpus_sha256", ""))[:16],
            "documents": stats.get("documents", len(manifest.get("documents", []))), "chunks": stats.get("chunks", ""),
            "kb_version": kb_version, "build_run": run_id,
            **{f: params.get(f, "") for f in KB_LINEAGE_FIELDS if f in params}}
    level_text = f" ({', '.join(f'{k} {v}' for k, v in levels.items())})" if levels else ""
    description = (f"{tags['documents']} documents{level_text} from {tags['corpus']}, {tags['chunks']} chunks of at most "
                   f"{params.get('chunk_size', '?')} {params.get('length_unit', '')}; BM25 ({params.get('bm25_tokenizer', '?')})"
                   f" + dense ({short_model(params.get('embedding_model'))}), fusion {params.get('fusion', '?')} w_bm25 "
                   f"{params.get('w_bm25', '?')}. Corpus sha256 {tags['corpus_sha256']}…, KB version {kb_version}; "
                   f"built by run {run_id}.")
    return tags, description


def student_description(kind: str, tags: dict) -> str:
    """A registered student version's model card in one paragraph, from its lineage tags."""
    if kind == "quantized":
        return (f"{tags.get('source', '?')} quantized with {tags.get('quantization', '?')} ({tags.get('bits', '?')} bits); "
                f"multiple-choice accuracy {tags.get('mc_accuracy_original', '?')} -> {tags.get('mc_accuracy', '?')} on "
                f"the comparison set; base model {tags.get('base_model', '?')}, teacher {tags.get('teacher', '?')}"
                + (f", trained on {tags['training_dataset']}" if tags.get("training_dataset") else "")
                + (f" (distill run {tags['distill_run']})" if tags.get("distill_run") else "") + ".")
    return (f"{short_model(tags.get('base_model'))} student distilled from {short_model(tags.get('teacher'))} with "
            f"{tags.get('loss_type', '?')} (LoRA, {tags.get('steps', '?')} steps) on {tags.get('training_dataset', '?')} "
            f"(synthetic QA from the KB {tags.get('synth_kb') or '?'}, corpus sha256 "
            f"{tags.get('synth_kb_corpus_sha256') or '?'}); "
            f"distill run {tags.get('distill_run', '?')}.")
