"""One experiment for `mlflow run` and the CLI, named runs with notes, one spelling per param value."""
from __future__ import annotations

import logging

import mlflow
import pytest

from fsku import tracking


@pytest.fixture
def fresh_store(tmp_path, monkeypatch):
    # created from the folder that holds it, as `mlflow run` in the project does: Default's artifacts under ./mlruns
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("FSKU_EXPERIMENT", raising=False)
    mlflow.set_tracking_uri(uri)
    return uri


def test_param_text_one_spelling():
    assert [tracking.param_text(v) for v in (None, True, False, 0, 0.5, "", "x")] == \
        ["none", "true", "false", "0", "0.5", "", "x"]


def test_cli_run_adopts_default_experiment(fresh_store):
    client = mlflow.MlflowClient()
    assert client.get_experiment("0").name == "Default"  # MLflow creates it with the store
    with tracking.run("build_kb", {"restart": False, "labels": None}, name="build_kb-sample", note="build_kb: a note"):
        run_id = mlflow.active_run().info.run_id
    run = mlflow.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.experiment_id == "0" and experiment.name == "fsku"
    assert [e.name for e in client.search_experiments()] == ["fsku"]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"].startswith("fsku:")
    assert run.info.run_name == "build_kb-sample"
    assert run.data.tags["mlflow.note.content"] == "build_kb: a note"
    assert run.data.params == {"restart": "false", "labels": "none"}


def test_entry_point_run_in_default_is_renamed_and_adopted(fresh_store, monkeypatch):
    client = mlflow.MlflowClient()
    # what `mlflow run` does without --experiment-name: a run in experiment 0 with a random name
    entry = client.create_run("0", run_name="painted-bird-786").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", entry)
    with tracking.run("distill", {"lora_r": 16}, name="distill-sft-r16-50steps"):
        pass
    run = mlflow.get_run(entry)
    assert run.info.run_name == "distill-sft-r16-50steps"
    assert client.get_experiment("0").name == "fsku"
    assert run.data.tags["fsku.step"] == "distill"


def test_runs_nested_under_an_entry_point_run_are_new_runs(fresh_store, monkeypatch):
    """Under `mlflow run` (MLFLOW_RUN_ID set), promote's evaluations and tune's trials are children of the
    entry run; MLflow's start_run(nested=True) would otherwise resume MLFLOW_RUN_ID and rename it."""
    client = mlflow.MlflowClient()
    entry = client.create_run("0", run_name="random-name-2").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", entry)
    with tracking.run("promote", {}, name="promote-x"):
        with tracking.run("evaluate", {}, name="evaluate-x") as evaluation:
            pass
        with tracking.child_run("trial-0", {"k": 1}) as trial:
            pass
    assert evaluation.info.run_id != entry and trial.run_id != entry
    for child in (evaluation.info.run_id, trial.run_id):
        assert client.get_run(child).data.tags["mlflow.parentRunId"] == entry
    run = client.get_run(entry)
    assert run.info.run_name == "promote-x" and run.data.tags["fsku.step"] == "promote"
    assert client.get_run(evaluation.info.run_id).info.run_name == "evaluate-x"
    # a second block of the same step attaches to the entry run again, not to a new unparented run
    with tracking.run("promote", {}, name="promote-x") as again:
        pass
    assert again.info.run_id == entry


def test_a_taken_name_is_not_stolen_and_the_user_is_told(fresh_store, monkeypatch, caplog):
    client = mlflow.MlflowClient()
    client.create_experiment("fsku")  # made earlier (an older fsku, or by hand): Default stays Default
    entry = client.create_run("0", run_name="random-name-1").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", entry)
    with caplog.at_level(logging.WARNING, logger="fsku.tracking"):
        with tracking.run("evaluate", {}, name="evaluate-x"):
            pass
    assert client.get_experiment("0").name == "Default"
    assert "--experiment-name fsku" in caplog.text


def test_only_sqlite_stores_are_adopted():
    class Client:  # a tracking server's client: never asked to rename
        def get_experiment_by_name(self, name):
            return None

        def rename_experiment(self, *a):
            raise AssertionError("renamed an experiment on a server")

    assert tracking.adopt_default_experiment(Client(), "fsku", "http://127.0.0.1:5000") is False


def test_experiment_name_follows_the_environment(monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("FSKU_EXPERIMENT", raising=False)
    assert tracking.experiment_name() == "fsku"
    monkeypatch.setenv("FSKU_EXPERIMENT", "mine")
    assert tracking.experiment_name() == "mine"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "theirs")
    assert tracking.experiment_name() == "theirs"


def test_a_default_made_elsewhere_keeps_its_name(tmp_path, monkeypatch):
    """A store whose Default keeps artifacts outside <store folder>/mlruns: the project's experiment is created."""
    store = tmp_path / "store"
    store.mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    uri = f"sqlite:///{store}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("FSKU_EXPERIMENT", raising=False)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    assert tracking.adopt_default_experiment(client, "fsku", uri) is False
    assert client.get_experiment("0").name == "Default"


def test_cost_metrics_are_grouped_under_one_prefix_and_quality_metrics_keep_their_names(fresh_store):
    from fsku.tracking import metric_key

    cost = ["seconds_embed", "s_per_step", "latency_p95_s", "load_s_ratio", "peak_rss_mb", "quantized_tokens_per_s",
            "tokens_per_s_ratio", "projected_minutes", "train_runtime", "train_samples_per_second", "size_mb_ratio",
            "original_size_mb", "teacher_seconds", "r2/train_runtime", "total_flos", "bundle_bytes", "projected_min",
            "seconds"]
    quality = ["fsku_score", "mc_accuracy_ratio", "retrieval_mrr_at_10", "loss/chosen_skew_forward_kl", "heldout/kl_to_teacher",
               "accepted_descriptive", "pairs_pairs", "documents", "teacher_tokens", "skipped_too_many_pages",
               "descriptive_cosine_ci95_low", "epoch", "score_domain/정보보호", "links_cite_resolved"]
    assert [metric_key(n) for n in cost] == [f"cost/{n}" for n in cost]
    assert [metric_key(n) for n in quality] == quality
    assert metric_key("cost/seconds_embed") == "cost/seconds_embed"  # never twice
    with tracking.run("evaluate", {}) as active:
        tracking.log_metrics({"fsku_score": 0.5, "latency_p50_s": 1.2, "flag": True})
    logged = mlflow.get_run(active.info.run_id).data.metrics
    assert logged == {"fsku_score": 0.5, "cost/latency_p50_s": 1.2}
