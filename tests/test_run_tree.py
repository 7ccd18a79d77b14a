"""A demo-like store, made the way `make demo` makes it (`mlflow run . -e main`, then a retrieval study),
and what a user sees in it: one experiment, runs named after their step, the promote decision with its
evaluation nested under it, trials under their study, and the lineage of the champion versions."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE_CORPUS, SAMPLE_LABELS

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _mlflow_run(entry_point: str, params: dict, env: dict, cwd: Path) -> None:
    cmd = [str(BIN / "mlflow"), "run", str(ROOT), "-e", entry_point, "--env-manager", "local"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"mlflow run -e {entry_point}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _tiny_models(tmp_path: Path, kb_folder: Path, env: dict) -> Path:
    """The demo's tiny pair (the teacher taught synth_qa's JSON format): the project's when `make demo`
    made it, else made here from the sample KB."""
    project = ROOT / "models" / "tiny"
    if (project / "teacher" / "sft.json").is_file():
        return project
    out = tmp_path / "tiny"
    proc = subprocess.run([str(BIN / "fsku"), "make-tiny-models", "--out", str(out), "--kb", str(kb_folder)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# the stages with a cache: under `mlflow run` they run in the project folder, where the default caches live
CACHED_STAGES = ("build_kb", "synth_qa", "distill", "evaluate")


def _demo_recipes(tmp_path: Path) -> Path:
    """experiments/demo, pointing at its own copy, with caches in tmp_path and the bundle verified in this
    Python (no fresh venv)."""
    out = tmp_path / "recipes"
    out.mkdir()
    for recipe in (ROOT / "experiments" / "demo").glob("*.yaml"):
        text = recipe.read_text(encoding="utf-8").replace("experiments/demo/", f"{out}/")
        (out / recipe.name).write_text(text, encoding="utf-8")
    for stage in CACHED_STAGES:
        with open(out / f"{stage}.yaml", "a", encoding="utf-8") as fh:
            fh.write(f"\ncache_dir: {tmp_path / 'cache' / stage}\n")
    with open(out / "package.yaml", "a", encoding="utf-8") as fh:
        fh.write("verify: current\n")
    return out


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory, sample_kb):
    tmp_path = tmp_path_factory.mktemp("demo-store")
    store = f"sqlite:///{tmp_path}/mlflow.db"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_EXPERIMENT", "MLFLOW_RUN_ID", "MLFLOW_REGISTRY_URI", "FSKU_EXPERIMENT"))}
    env.update({"PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": store,
                "FSKU_MODELS_DIR": str(tmp_path / "models")})  # registry downloads stay out of the project
    tiny = _tiny_models(tmp_path, sample_kb[0].folder, env)
    recipes = _demo_recipes(tmp_path)
    _mlflow_run("main", {"corpus": SAMPLE_CORPUS, "labels": SAMPLE_LABELS, "kb_out": tmp_path / "kb",
                         "teacher": tiny / "teacher", "student": tiny / "student",
                         "gold": ROOT / "evaluation" / "sample_qa.csv", "out": tmp_path / "main",
                         "recipes": recipes}, env, tmp_path)
    _mlflow_run("tune", {"study": "retrieval", "n_trials": 2, "chunk_sizes": 480, "chunk_overlaps": 32,
                         "bm25_tokenizers": "kiwi", "out": tmp_path / "tune",
                         "storage": f"sqlite:///{tmp_path}/optuna.db", "recipe_out": tmp_path / "tune" / "recipes",
                         "base_recipe": recipes / "build_kb.yaml"},
                env, tmp_path)
    import mlflow

    return mlflow.MlflowClient(tracking_uri=store, registry_uri=store)


def _runs(client, experiment_id: str) -> list:
    return client.search_runs([experiment_id], max_results=1000)


def test_one_experiment_and_every_run_named_after_its_step(demo_store):
    client = demo_store
    experiments = client.search_experiments()
    assert [e.name for e in experiments] == ["fsku"]
    runs = _runs(client, experiments[0].experiment_id)
    assert all(r.info.status == "FINISHED" for r in runs)
    steps = [r for r in runs if "fsku.step" in r.data.tags]
    trials = [r for r in runs if "fsku.step" not in r.data.tags]
    assert {r.data.tags["fsku.step"] for r in steps} == {"main", "build_kb", "synth_qa", "distill", "quantize",
                                                         "evaluate", "promote", "package", "tune"}
    for r in steps:
        assert r.info.run_name.startswith(r.data.tags["fsku.step"] + "-"), r.info.run_name
        assert r.data.tags["mlflow.note.content"].startswith(r.data.tags["fsku.step"] + ":")
    assert trials and all(r.info.run_name.startswith("trial-") for r in trials)


def test_main_promote_and_tune_runs_hold_their_children(demo_store):
    client = demo_store
    runs = _runs(client, client.get_experiment_by_name("fsku").experiment_id)
    by_id = {r.info.run_id: r for r in runs}
    parent = {r.info.run_id: r.data.tags.get("mlflow.parentRunId") for r in runs}
    (main,) = [r for r in runs if r.data.tags.get("fsku.step") == "main"]
    (promote,) = [r for r in runs if r.data.tags.get("fsku.step") == "promote"]
    (tune,) = [r for r in runs if r.data.tags.get("fsku.step") == "tune"]
    under_main = {by_id[i].data.tags.get("fsku.step") for i, p in parent.items() if p == main.info.run_id}
    assert under_main == {"build_kb", "synth_qa", "distill", "quantize", "evaluate", "promote", "package"}
    # the decision run holds the candidate's evaluation (no champion yet: one), nested under it
    nested = [by_id[i] for i, p in parent.items() if p == promote.info.run_id]
    assert [r.data.tags["fsku.step"] for r in nested] == ["evaluate"]
    assert promote.data.tags["fsku.candidate_evaluation"] == nested[0].info.run_id
    assert promote.data.tags["fsku.promotion"] == "promoted"
    assert promote.info.run_name.startswith("promote-fsku-student@")
    assert "decision.json" in {a.path for a in client.list_artifacts(promote.info.run_id)}
    # the trials are the study's children; the study run keeps its own name
    assert tune.info.run_name.startswith("tune-retrieval-")
    assert sorted(by_id[i].info.run_name for i, p in parent.items() if p == tune.info.run_id) == ["trial-0", "trial-1"]
    # evaluations show the gold set they were scored on
    for r in runs:
        if r.data.tags.get("fsku.step") == "evaluate":
            assert [d.dataset.name for d in r.inputs.dataset_inputs], r.info.run_name


def test_champion_versions_carry_their_lineage_and_a_description(demo_store):
    client = demo_store
    student = client.get_model_version_by_alias("fsku-student", "champion")
    kb = client.get_model_version_by_alias("fsku-kb", "champion")
    tags = student.tags
    assert {"base_model", "teacher", "loss_type", "distill_run", "synth_kb", "quantization", "source"} <= set(tags)
    assert tags["training_dataset"].startswith("fsku-synth-train@")
    distill = client.get_run(tags["distill_run"])
    assert distill.data.tags["fsku.step"] == "distill"
    assert client.get_run(distill.data.tags["mlflow.parentRunId"]).data.tags["fsku.step"] == "main"
    # the evaluation behind the promotion is the one nested under the promote run
    evaluation = client.get_run(tags["promotion.candidate_run"])
    promote = client.get_run(evaluation.data.tags["mlflow.parentRunId"])
    assert promote.data.tags["fsku.step"] == "promote"
    assert float(tags["promotion.candidate_score"]) >= 0
    assert {"corpus_sha256", "documents", "chunks", "chunk_size", "fusion", "kb_version", "build_run"} <= set(kb.tags)
    assert kb.tags["promotion.decision"] == "promoted"
    # the joint release: each names the other, and the data came from the KB it ships with
    assert tags["promotion.kb_model"] == f"models:/fsku-kb/{kb.version}"
    assert kb.tags["promotion.student_model"] == f"models:/fsku-student/{student.version}"
    assert tags["synth_kb_corpus_sha256"] == kb.tags["corpus_sha256"][:12]
    assert student.description.count("Champion since") == 1 and f"Ships with models:/fsku-kb/{kb.version}." in \
        student.description
    assert "trained on fsku-synth-train@" in student.description
    assert f"Ships with models:/fsku-student/{student.version}." in kb.description
    assert client.get_registered_model("fsku-student").description
