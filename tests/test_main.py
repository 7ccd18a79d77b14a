"""main: the chain runs steps in order, reuses finished runs (same parameters and code version, output
still on disk), reruns a step whose output is gone, and wires registry versions between steps."""
from __future__ import annotations

import os

import pytest

from fsku.config import MainConfig
from fsku.steps.main import Step, plan, run_chain


class FakeMLflow:
    def __init__(self, finished=None):
        self.finished = dict(finished or {})  # entry point -> run id
        self.ran: list[tuple[str, dict]] = []
        self.versions = {"build_kb": "4", "distill": "7", "quantize": "8"}

    def runner(self, entry, params):
        self.ran.append((entry, params))
        return f"run-{entry}"

    def finder(self, entry, params):
        return self.finished.get(entry)

    def version_of(self, name, run_id):
        return self.versions.get(run_id.split("-", 1)[1])


def test_a_fresh_chain_runs_every_step_in_order_and_wires_versions(tmp_path):
    cfg = MainConfig(out=str(tmp_path / "o"), kb_out=str(tmp_path / "kb"))
    fake = FakeMLflow()
    res = run_chain(plan(cfg), fake.runner, fake.finder, fake.version_of)
    assert [e for e, _ in fake.ran] == ["build_kb", "synth_qa", "distill", "quantize", "evaluate", "promote", "package"]
    params = dict(fake.ran)
    assert params["quantize"]["model"] == "models:/fsku-student/7"
    assert params["evaluate"]["model"] == "models:/fsku-student/8"
    assert (params["promote"]["candidate"], params["promote"]["kb_candidate"]) == ("8", "4")
    assert params["distill"]["data"] == params["synth_qa"]["out"] == f"{cfg.out}/synth_qa"
    assert res["distill"] == {"run_id": "run-distill", "reused": False, "params": params["distill"], "version": "7"}
    # each step runs with its recipe from the recipes folder (the demo's by default), or none
    assert params["synth_qa"]["recipe"] == "experiments/demo/synth_qa.yaml"
    assert params["build_kb"]["recipe"] == ""
    assert params["package"]["model"] == "models:/fsku-student@champion"


def test_recipes_folder_gives_each_step_its_settings(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "distill.yaml").write_text("max_steps: 3\n")
    cfg = MainConfig(out=str(tmp_path / "o"), recipes=str(tmp_path / "r"))
    fake = FakeMLflow()
    run_chain(plan(cfg), fake.runner, fake.finder, fake.version_of)
    params = dict(fake.ran)
    assert params["distill"]["recipe"] == str(tmp_path / "r" / "distill.yaml")
    assert all(params[s]["recipe"] == "" for s in params if s != "distill")
    assert plan(MainConfig(recipes=None))[1].params({})["recipe"] == ""


def test_finished_steps_are_reused_and_a_missing_output_runs_again(tmp_path):
    cfg = MainConfig(out=str(tmp_path / "o"), kb_out=str(tmp_path / "kb"))
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "manifest.json").write_text("{}")
    os.makedirs(tmp_path / "o" / "synth_qa")
    (tmp_path / "o" / "synth_qa" / "train.jsonl").write_text("")
    # build_kb and synth_qa finished earlier (outputs present); distill finished but its output is gone
    fake = FakeMLflow({"build_kb": "run-build_kb", "synth_qa": "run-synth_qa", "distill": "run-distill"})
    res = run_chain(plan(cfg), fake.runner, fake.finder, fake.version_of)
    assert res["build_kb"]["reused"] and res["synth_qa"]["reused"] and not res["distill"]["reused"]
    assert [e for e, _ in fake.ran] == ["distill", "quantize", "evaluate", "promote", "package"]
    assert res["build_kb"]["version"] == "4"


def test_a_step_that_should_register_but_did_not_is_an_error():
    fake = FakeMLflow()
    fake.versions = {}
    steps = [Step("distill", lambda r: {}, None, "fsku-student")]
    with pytest.raises(RuntimeError, match="registered no version of fsku-student"):
        run_chain(steps, fake.runner, fake.finder, fake.version_of)


def test_find_finished_run_matches_parameters_status_and_code_version(tmp_path):
    import mlflow

    from fsku import tracking

    mlflow.set_experiment("chain-test")

    def make(entry, params, commit, status="FINISHED"):
        with mlflow.start_run() as r:
            mlflow.set_tags({"mlflow.project.entryPoint": entry, "mlflow.source.git.commit": commit})
            mlflow.log_params(params)
        mlflow.MlflowClient().set_terminated(r.info.run_id, status)
        return r.info.run_id

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = make("build_kb", {"corpus": str(corpus), "out": "outputs/kb"}, "abc")
    make("build_kb", {"corpus": str(corpus), "out": "outputs/kb"}, "abc", status="FAILED")
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("chain-test").experiment_id):
        # a `path` parameter is stored absolute; the chain passes it relative
        rel = os.path.relpath(corpus)
        assert tracking.find_finished_run("build_kb", {"corpus": rel, "out": "outputs/kb"}, "abc") == good
        assert tracking.find_finished_run("build_kb", {"corpus": rel, "out": "outputs/other"}, "abc") is None
        assert tracking.find_finished_run("build_kb", {"corpus": rel, "out": "outputs/kb"}, "def") is None
        assert tracking.find_finished_run("synth_qa", {}, "abc") is None


def test_main_config_and_missing_models():
    from fsku.steps.main import run_step

    with pytest.raises(TypeError, match="verify"):
        MainConfig(verify="fresh")  # a package setting: it lives in experiments/<name>/package.yaml now
    with pytest.raises(FileNotFoundError, match="make-tiny-models"):
        run_step(MainConfig(teacher="no/such/teacher-folder-x"))
    with pytest.raises(FileNotFoundError, match="not a folder of <stage>.yaml recipes"):
        run_step(MainConfig(recipes="no/such/recipes"))


def test_reuse_compares_the_recipe_settings_too(tmp_path):
    from fsku.steps.main import expected_params

    recipe = tmp_path / "distill.yaml"
    recipe.write_text("max_steps: 3\nloss_type: kd\n")
    assert expected_params({"recipe": str(recipe), "out": "o"}) == {"max_steps": 3, "loss_type": "kd",
                                                                    "recipe": str(recipe), "out": "o"}
    assert expected_params({"recipe": "", "out": "o"}) == {"recipe": "", "out": "o"}


def test_mlflow_quoted_parameters_match():
    from fsku.tracking import _same_param

    # MLflow logs entry-point parameters shell-quoted: '' for an empty value, 'a b' for one with spaces
    assert _same_param("''", "") and _same_param("'a b'", "a b") and not _same_param("''", "x")
