"""promote: the pure decision (hand cases and limits) and the alias moves in a real (temporary)
MLflow registry: better / worse / equal / no current champion, and a joint student + KB release."""
import math

import mlflow
import pytest

from fsku import tracking
from fsku.registry import Decision, Evaluation, Release, decide, promote_release


def test_decide_by_hand():
    assert decide(0.7, None) == Decision(True, "no current champion", 0.7, None, 0.0)
    assert decide(0.7, None, gate="significant").promote  # nothing to compare with
    assert decide(0.71, 0.70, margin=0.005).promote
    assert not decide(0.704, 0.70, margin=0.005).promote  # better, but not by more than the margin
    assert decide(0.70, 0.70).reason == "equal to the champion" and not decide(0.70, 0.70).promote
    assert decide(0.5, 0.7).reason.startswith("worse by 0.2")
    # lower is better (e.g. perplexity, latency)
    assert decide(7.0, 8.0, higher_is_better=False).promote and not decide(8.0, 7.0, higher_is_better=False).promote
    with pytest.raises(ValueError, match="margin"):
        decide(0.7, 0.6, margin=-0.1)
    with pytest.raises(ValueError, match="NaN"):
        decide(math.nan, 0.6)


def _evidence(p, low=0.01, high=0.2, diff=0.1):
    return {"test": "exact McNemar", "p_value": p, "diff": diff, "low": low, "high": high, "n": 63}


def test_significant_gate_by_hand():
    # better but not significant -> kept; significant -> promoted; worse -> kept whatever the test
    kept = decide(0.80, 0.75, gate="significant", evidence=_evidence(0.30, low=-0.05))
    assert not kept.promote and "not significantly" in kept.reason and "p = 0.3" in kept.reason
    won = decide(0.80, 0.70, gate="significant", evidence=_evidence(0.01))
    assert won.promote and "significant (exact McNemar p = 0.01" in won.reason and won.evidence["n"] == 63
    assert not decide(0.70, 0.80, gate="significant", evidence=_evidence(0.01, diff=-0.1)).promote
    assert not decide(0.80, 0.80, gate="significant", evidence=_evidence(1.0, diff=0)).promote
    # a margin: the gain's lower bound must clear it too
    assert not decide(0.80, 0.70, margin=0.05, gate="significant", evidence=_evidence(0.01, low=0.02)).promote
    assert decide(0.80, 0.70, margin=0.05, gate="significant", evidence=_evidence(0.01, low=0.06)).promote
    # the margin gate ignores the test (the old behaviour)
    assert decide(0.80, 0.75, gate="margin", evidence=_evidence(0.30)).promote
    assert decide(0.80, 0.75, gate="significant", evidence=_evidence(0.04), alpha=0.05).promote
    assert not decide(0.80, 0.75, gate="significant", evidence=_evidence(0.04), alpha=0.01).promote
    with pytest.raises(ValueError, match="needs the paired comparison"):
        decide(0.8, 0.7, gate="significant")
    with pytest.raises(ValueError, match="gate"):
        decide(0.8, 0.7, gate="vote")
    with pytest.raises(ValueError, match="alpha"):
        decide(0.8, 0.7, alpha=1.5)


def _rows(correct):
    return tuple({"ID": f"q{i}", "question_type": "multiple_choice", "score": float(c)} for i, c in enumerate(correct))


@pytest.mark.parametrize("cand, champ, promoted, reason", [
    ([1] * 20, [1] * 10 + [0] * 10, True, "significant"),                   # 10 only-candidate wins: p = 0.002
    ([1] * 12 + [0] * 8, [1] * 10 + [0] * 10, False, "not significantly"),  # 2 wins: p = 0.5
    ([1] * 8 + [0] * 12, [1] * 10 + [0] * 10, False, "worse"),
])
def test_promote_release_gate_on_per_question_evidence(registered, cand, champ, promoted, reason):
    name, (v1, v2, _) = registered
    tracking.set_alias(name, "champion", v1)
    evals = {v1: Evaluation(sum(champ) / 20, _rows(champ), "run-champ"), v2: Evaluation(sum(cand) / 20, _rows(cand), "run-cand")}
    out = promote_release(name, Release(v2), lambda r: evals[r.model_version], metric="mc_accuracy", gate="significant")
    d = out["decision"]
    assert d["promote"] is promoted and reason in d["reason"]
    assert tracking.alias_version(name, "champion") == (v2 if promoted else v1)
    tags = mlflow.MlflowClient().get_model_version(name, v2).tags
    assert tags["promotion.gate"] == "significant" and tags["promotion.test"] == "exact McNemar"
    assert tags["promotion.candidate_run"] == "run-cand" and tags["promotion.champion_run"] == "run-champ"
    assert math.isclose(float(tags["promotion.p_value"]), d["evidence"]["p_value"])
    assert out["evaluations"]["champion"]["run_id"] == "run-champ"


def test_significant_gate_needs_per_question_rows(registered):
    name, (v1, v2, _) = registered
    tracking.set_alias(name, "champion", v1)
    with pytest.raises(ValueError, match="per-question scores"):
        promote_release(name, Release(v2), _scores({v1: 0.5, v2: 0.9}), metric="mc_accuracy", gate="significant")


def _register(name, tmp_path, n):
    versions = []
    for i in range(n):
        d = tmp_path / f"{name}-{i}"
        d.mkdir()
        (d / "config.json").write_text("{}")
        with tracking.run("distill", {}):
            versions.append(tracking.register_student(d, name, {"i": i}))
    return versions


@pytest.fixture
def registered(tmp_path, request):
    name = f"promote-{request.node.name[-40:].replace('[', '-').replace(']', '')}"
    return name, _register(name, tmp_path, 3)


def _scores(table):
    return lambda release: table[release.model_version]


def test_no_champion_promotes(registered):
    name, (v1, _, _) = registered
    out = promote_release(name, Release(v1), _scores({v1: 0.3}))
    assert out["decision"]["promote"] and out["decision"]["reason"] == "no current champion"
    assert tracking.alias_version(name, "champion") == v1 and tracking.alias_version(name, "previous") is None
    tags = mlflow.MlflowClient().get_model_version(name, v1).tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.champion_score"] == ""


def test_better_candidate_moves_champion_and_keeps_previous(registered):
    name, (v1, v2, _) = registered
    tracking.set_alias(name, "champion", v1)
    out = promote_release(name, Release(v2), _scores({v1: 0.50, v2: 0.60}), margin=0.05, metric="fsku_score")
    assert out["decision"]["promote"]
    assert tracking.alias_version(name, "champion") == v2 and tracking.alias_version(name, "previous") == v1
    tags = mlflow.MlflowClient().get_model_version(name, v2).tags
    assert float(tags["promotion.candidate_score"]) == 0.6 and float(tags["promotion.champion_score"]) == 0.5
    assert tags["promotion.metric"] == "fsku_score" and tags["promotion.champion_version"] == v1
    # the champion's model card says when, why and by how much
    card = mlflow.MlflowClient().get_model_version(name, v2).description
    assert f"fsku_score 0.6000 vs 0.5000 of version {v1}" in card and "(gate margin: " in card


@pytest.mark.parametrize("candidate_score, reason", [(0.40, "worse by 0.1"), (0.50, "equal to the champion"),
                                                     (0.52, "better by only 0.02")])
def test_worse_equal_or_within_margin_keeps_the_champion(registered, candidate_score, reason):
    name, (v1, v2, _) = registered
    tracking.set_alias(name, "champion", v1)
    out = promote_release(name, Release(v2), _scores({v1: 0.50, v2: candidate_score}), margin=0.05)
    assert not out["decision"]["promote"] and out["decision"]["reason"].startswith(reason)
    assert tracking.alias_version(name, "champion") == v1 and tracking.alias_version(name, "previous") is None
    assert mlflow.MlflowClient().get_model_version(name, v2).tags["promotion.decision"] == "kept champion"


def test_the_champion_itself_is_not_rescored(registered):
    name, (v1, _, _) = registered
    tracking.set_alias(name, "champion", v1)
    out = promote_release(name, Release(v1), lambda r: pytest.fail("scored"))
    assert not out["decision"]["promote"] and "already the champion" in out["decision"]["reason"]


def test_joint_release_moves_student_and_kb_together(registered, tmp_path):
    name, (v1, v2, _) = registered
    kb = name + "-kb"
    k1, k2 = _register(kb, tmp_path, 2)
    tracking.set_alias(name, "champion", v1)
    tracking.set_alias(kb, "champion", k1)
    seen = []

    def score(release):
        seen.append(release)
        return {(v1, k1): 0.5, (v2, k2): 0.7}[(release.model_version, release.kb_version)]

    out = promote_release(name, Release(v2, k2), score, kb_name=kb)
    assert out["decision"]["promote"] and set(seen) == {Release(v1, k1), Release(v2, k2)}
    assert tracking.alias_version(kb, "champion") == k2 and tracking.alias_version(kb, "previous") == k1
    client = mlflow.MlflowClient()
    assert client.get_model_version(kb, k2).tags["promotion.decision"] == "promoted"
    # each version of the joint release names the other, in its tags and in its description
    assert client.get_model_version(name, v2).tags["promotion.kb_model"] == f"models:/{kb}/{k2}"
    assert client.get_model_version(kb, k2).tags["promotion.student_model"] == f"models:/{name}/{v2}"
    assert f"Ships with models:/{kb}/{k2}." in client.get_model_version(name, v2).description
    assert f"Ships with models:/{name}/{v2}." in client.get_model_version(kb, k2).description
    assert "Champion since" not in (client.get_model_version(name, v1).description or "")


@pytest.mark.slow
def test_promote_step_evaluates_both_students_on_the_same_set(tiny_models, tmp_path, monkeypatch):
    """The real scorer: the evaluate step on the sample set, each student loaded by its models:/ URI."""
    from fsku.config import PromoteConfig
    from fsku.steps.promote import run_step

    monkeypatch.setenv("FSKU_MODELS_DIR", str(tmp_path / "models"))
    name = "promote-step-student"
    with tracking.run("distill", {}):
        v1 = tracking.register_student(tiny_models["student"], name, {})
        v2 = tracking.register_student(tiny_models["teacher"], name, {})
    tracking.set_alias(name, "champion", v1)
    cfg = PromoteConfig(model_name=name, candidate="latest", kb=None, gold="evaluation/sample_qa.csv",
                        metric="mc_accuracy", out_dir=str(tmp_path / "promote"))
    out = run_step(cfg)
    d = out["decision"]
    assert d["champion_score"] is not None and 0 <= d["candidate_score"] <= 1
    assert (tmp_path / "promote" / f"{name}-v{v1}" / "submission.csv").exists()
    assert (tmp_path / "promote" / f"{name}-v{v2}" / "submission.csv").exists()
    # the default gate: promoted only when better AND the exact McNemar test on the same questions says so
    ev = d["evidence"]
    assert d["gate"] == "significant" and ev["test"] == "exact McNemar" and 0 < ev["p_value"] <= 1 and ev["n"] > 0
    assert d["promote"] == (d["candidate_score"] > d["champion_score"] and ev["p_value"] < cfg.significance)
    assert tracking.alias_version(name, "champion") == (v2 if d["promote"] else v1)
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`fsku.step` = 'promote'")
    assert len(runs) >= 1
    client = mlflow.MlflowClient()
    promote_run = runs.iloc[0]["run_id"]
    table = mlflow.load_table("decision.json", run_ids=[promote_run])
    assert list(table["role"]) == ["candidate", "champion", "decision"]
    evaluations = out["evaluations"]
    assert set(table["evaluation_run"][:2]) == {evaluations["candidate"]["run_id"], evaluations["champion"]["run_id"]}
    for role in ("candidate", "champion"):
        evaluation = client.get_run(out["evaluations"][role]["run_id"])
        assert evaluation.data.tags["fsku.step"] == "evaluate"
        # nested under the decision run, which names both
        assert evaluation.data.tags["mlflow.parentRunId"] == promote_run
        assert client.get_run(promote_run).data.tags[f"fsku.{role}_evaluation"] == evaluation.info.run_id
    promote_tags = client.get_run(promote_run).data.tags
    assert promote_tags["fsku.promotion"] in ("promoted", "kept champion")
    assert promote_tags["fsku.promotion_test"] == "exact McNemar"
    assert client.get_run(promote_run).info.run_name == f"promote-{name}@latest-significant"
    # the evaluations' headline scores are on the registered models' pages, with the gold set they came from
    for version in (v1, v2):
        logged = client.get_logged_model(tracking.logged_model_id(f"models:/{name}/{version}"))
        scores = [m for m in logged.metrics or [] if m.key == "mc_accuracy"]
        assert scores and scores[0].dataset_name == "fsku-gold-sample_qa"


def test_significant_gate_refuses_an_untestable_metric_before_evaluating(registered):
    name, (v1, v2, _) = registered
    tracking.set_alias(name, "champion", v1)
    with pytest.raises(ValueError, match="no per-question form of metric 'rouge_l'.*use gate 'margin'"):
        promote_release(name, Release(v2), lambda r: pytest.fail("scored"), metric="rouge_l", gate="significant")
    with pytest.raises(ValueError, match="contradicts"):
        promote_release(name, Release(v2), lambda r: pytest.fail("scored"), metric="mc_accuracy", gate="significant",
                        higher_is_better=False)


def test_a_nan_champion_score_is_refused():
    with pytest.raises(ValueError, match="champion's score is NaN"):
        decide(0.5, math.nan)
