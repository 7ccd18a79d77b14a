"""Run names and notes (fsku.steps.naming): hand-written expectations for every stage."""
from __future__ import annotations

import pytest

from fsku.config import (
    BuildKBConfig,
    DistillConfig,
    EvaluateConfig,
    MainConfig,
    PackageConfig,
    PredictConfig,
    PromoteConfig,
    QuantizeConfig,
    SynthQAConfig,
    TuneConfig,
)
from fsku.steps.mlproject import ENTRY_POINTS
from fsku.steps.naming import MAX_NAME_CHARS, file_stem, run_labels, run_name, run_note, short_model


@pytest.mark.parametrize("ref, expected", [
    ("models:/fsku-student@champion", "fsku-student@champion"),
    ("models:/fsku-student/3", "fsku-student@v3"),
    ("models:/fsku-student/latest", "fsku-student@latest"),
    ("offline:qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-1.5b-instruct"),
    ("K-intelligence/Midm-2.0-Base-Instruct", "Midm-2.0-Base-Instruct"),
    ("models/tiny/teacher", "tiny-teacher"),
    ("outputs/main/distill/merged", "distill-merged"),
    ("/abs/path/qwen2.5-0.5b-q4_k_m.gguf", "qwen2.5-0.5b-q4_k_m"),
    ("outputs/kb", "outputs-kb"),
    ("teacher", "teacher"),
    (None, "none"),
    ("", "none"),
])
def test_short_model(ref, expected):
    assert short_model(ref) == expected


def test_file_stem():
    assert file_stem("evaluation/sample_qa.csv") == "sample_qa"
    assert file_stem("a/mcq_dev.csv, b/retrieval_dev.jsonl") == "mcq_dev+retrieval_dev"
    assert file_stem(None) == "none"


def test_run_names_say_step_and_key_settings():
    assert run_name("distill", DistillConfig(loss_type="distillm_v2", lora_r=16, max_steps=150)) == \
        "distill-distillm_v2-r16-150steps"
    assert run_name("distill", DistillConfig(loss_type="sft", lora_r=8, max_steps=0, epochs=2.0)) == "distill-sft-r8-2epochs"
    assert run_name("evaluate", EvaluateConfig(model="models:/fsku-student/3", gold="data/mcq_dev.csv",
                                               context="gated")) == "evaluate-fsku-student@v3-mcq_dev-gated"
    assert run_name("build_kb", BuildKBConfig(corpus="data/sample_corpus", chunk_size=480, length_unit="tokens",
                                              bm25_tokenizer="kiwi", fusion="minmax")) == \
        "build_kb-sample_corpus-480tok-kiwi-minmax"
    assert run_name("synth_qa", SynthQAConfig(teacher="offline:qwen2.5-coder-1.5b-instruct", n_chunks=40,
                                              questions_per_chunk=2)) == "synth_qa-qwen2.5-coder-1.5b-instruct-40x2"
    assert run_name("quantize", QuantizeConfig(model="models:/fsku-student@champion", method="int8")) == \
        "quantize-fsku-student@champion-int8"
    assert run_name("predict", PredictConfig(model="models/tiny/teacher", input="evaluation/sample_test.csv",
                                             context="none")) == "predict-tiny-teacher-sample_test-none"
    assert run_name("tune", TuneConfig(study="retrieval", n_trials=30)) == "tune-retrieval-30trials"
    assert run_name("tune", TuneConfig(study="retrieval", study_name="law kb")) == "tune-retrieval-20trials-law_kb"
    assert run_name("promote", PromoteConfig(model_name="fsku-student", candidate="4", gate="significant")) == \
        "promote-fsku-student@v4-significant"
    assert run_name("package", PackageConfig(model="models:/fsku-student@champion", kb=None)) == \
        "package-fsku-student@champion-no-kb"
    assert run_name("main", MainConfig()) == "main-sample_corpus-tiny-teacher-tiny-student"


def test_every_entry_point_has_a_name_and_a_note():
    from fsku.config import STAGE_CONFIGS

    for stage in ENTRY_POINTS:
        labels = run_labels(stage, STAGE_CONFIGS[stage]())
        assert labels["name"].startswith(stage + "-") and " " not in labels["name"]
        assert len(labels["name"]) <= MAX_NAME_CHARS
        assert labels["note"].startswith(stage + ":") and "\n" not in labels["note"]


def test_long_names_are_cut_and_unknown_stages_named():
    long = "x" * 300
    assert len(run_name("quantize", QuantizeConfig(model=long))) == MAX_NAME_CHARS
    with pytest.raises(ValueError, match="no run name rule for stage 'retrieve'"):
        run_name("retrieve", object())
    with pytest.raises(ValueError, match="unknown stage"):
        run_note("nope")
