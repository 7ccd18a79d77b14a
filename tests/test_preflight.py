"""Inputs are checked before the MLflow run and before any model loads (fsku.steps.preflight)."""
from __future__ import annotations

import json

import pytest

from fsku.llm.resolve import ModelNotFound, check_model_reference
from fsku.steps.preflight import check_inputs


@pytest.fixture
def folders(tmp_path):
    model = tmp_path / "student"
    model.mkdir()
    (model / "config.json").write_text("{}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / "manifest.json").write_text(json.dumps({}))
    empty = tmp_path / "empty"
    empty.mkdir()
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    return {"model": model, "adapter": adapter, "kb": kb, "empty": empty, "gguf": gguf, "root": tmp_path}


def test_model_references_that_can_load_pass(folders, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for ref in (str(folders["model"]), str(folders["adapter"]), str(folders["gguf"]), "offline:qwen2.5-coder-0.5b-instruct",
                "K-intelligence/Midm-2.0-Base-Instruct", "Qwen/Qwen2.5-7B-Instruct-GGUF/qwen2.5-7b-instruct-q4_k_m.gguf",
                "models:/fsku-student@champion"):
        check_model_reference(ref)


@pytest.mark.parametrize("ref, message", [
    ("offline:qwen9-nope", "unknown offline model 'qwen9-nope'"),
    ("./models/tiny/teacherr", "no such file or folder"),
    ("models/tiny/missing/x", "no such file or folder"),
    ("", "no model given"),
])
def test_model_references_that_cannot_load_are_named(ref, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
        check_model_reference(ref, "--teacher")
    assert "--teacher" in str(info.value)


def test_folders_and_files_of_the_wrong_kind(folders, monkeypatch):
    with pytest.raises(ModelNotFound, match="no config.json"):
        check_model_reference(str(folders["empty"]))
    notes = folders["root"] / "notes.txt"
    notes.write_text("x")
    with pytest.raises(ModelNotFound, match="not a .gguf"):
        check_model_reference(str(notes))


def test_offline_hub_ids_must_be_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFound, match="not in the Hugging Face cache"):
        check_model_reference("someone/not-cached-model")


def test_check_inputs_kb_and_files(folders):
    check_inputs(models={"--model": str(folders["model"]), "--judge-model": None},
                 kbs={"--kb": str(folders["kb"]), "--other-kb": None}, files={"--gold": None})
    with pytest.raises(FileNotFoundError, match="--kb .*/nokb: no such knowledge-base folder"):
        check_inputs(kbs={"--kb": str(folders["root"] / "nokb")})
    with pytest.raises(ModelNotFound, match="--kb .*no manifest.json"):
        check_inputs(kbs={"--kb": str(folders["empty"])})
    gold = folders["root"] / "gold.csv"
    gold.write_text("ID\n")
    with pytest.raises(FileNotFoundError, match="--gold .*missing.csv: no such file"):
        check_inputs(files={"--gold": f"{gold}, {folders['root'] / 'missing.csv'}"})


def test_unknown_registry_uri_is_named():
    with pytest.raises(ValueError, match="--model: models:/nobody-registered-this@champion"):
        check_inputs(models={"--model": "models:/nobody-registered-this@champion"})


def test_evaluate_with_a_wrong_kb_fails_before_the_model_loads(folders, monkeypatch, capsys):
    import fsku.llm

    def no_load(*a, **k):
        raise AssertionError("the LLM was loaded before the inputs were checked")

    monkeypatch.setattr(fsku.llm, "load_llm", no_load)
    from fsku.steps import evaluate

    code = evaluate.main(["--model", str(folders["model"]), "--kb", str(folders["root"] / "nokb"),
                          "--out-dir", str(folders["root"] / "ev"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --kb ") and "no such knowledge-base folder" in err
