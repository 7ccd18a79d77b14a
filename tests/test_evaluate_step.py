"""The evaluate step on a tiny model: FSKU score parts, latency, plots and the table land in MLflow;
`fsku score` / `fsku validate` from the command line."""
import dataclasses
import json

import mlflow
import pytest

from conftest import ROOT
from fsku.cli import main
from fsku.config import EvaluateConfig
from fsku.steps.evaluate import run_step

SAMPLE_QA = ROOT / "evaluation" / "sample_qa.csv"


def test_evaluate_logs_score_parts_plots_and_table(tiny_models, tiny_llm, sample_kb, tmp_path, e5_model_dir):
    kb, _, _ = sample_kb
    cfg = EvaluateConfig(model=str(tiny_models["teacher"]), kb=str(kb.folder), gold=str(SAMPLE_QA), out_dir=str(tmp_path / "ev"),
                         max_new_tokens=8, cache_dir="", scorer_embedding=e5_model_dir, context="gated",
                         judge_model="same", judge_rows=2)
    res = run_step(cfg, progress=False, llm=tiny_llm, kb=kb)
    m = res["metrics"]
    assert m["n_multiple_choice"] == 8 and m["n_descriptive"] == 4
    assert 0 <= m["mc_accuracy"] <= 1 and 0 <= m["descriptive_score"] <= 1
    assert abs(m["fsku_score"] - (0.5 * m["mc_accuracy"] + 0.5 * m["descriptive_score"])) < 1e-9
    assert m["latency_p95_s"] >= m["latency_p50_s"] > 0 and m["projected_minutes"] > 0
    # the cosine proxy's calibration rows (the four tiny-model answers are non-empty): both proxies
    from fsku.evaluate.fsku_metric import keyword_recall, load_gold

    desc = [g for g in load_gold(SAMPLE_QA) if g.question_type == "descriptive" and g.keywords]
    assert m["descriptive_keyword_recall_echo_question"] == pytest.approx(
        sum(keyword_recall(g.question, g.keywords) for g in desc) / len(desc))
    assert 0 < m["descriptive_cosine_raw_echo_question"] <= 1 and 0 < m["descriptive_cosine_raw_other_reference"] <= 1
    assert {"descriptive_cosine_centred", "descriptive_cosine_centred_echo_question",
            "descriptive_cosine_centred_other_reference", "descriptive_cosine_raw_auc",
            "descriptive_cosine_centred_auc"} <= set(m)
    assert 0 <= m["descriptive_cosine_raw_auc"] <= 1 and -1 <= m["descriptive_cosine_centred"] <= 1
    assert m["rouge_l"] is not None and "score_domain/금융보안법률" in m
    assert m["rag_judge_rows"] == 2 and m["rag_context_precision_rows"] == 2  # the sample KB answers every query
    assert 0 <= m["rag_context_recall"] <= 1 and 0 <= m["rag_answer_relevancy"] <= 1
    run = mlflow.get_run(res["run_id"])
    assert run.data.metrics["fsku_score"] == m["fsku_score"]
    assert run.data.params["context"] == "gated"
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(res["run_id"], "plots")}
    assert {"plots/score_by_type.png", "plots/latency_hist.png", "plots/gate_scores.png"} <= arts
    table = mlflow.load_table("per_question.json", run_ids=[res["run_id"]])
    assert len(table) == 12 and {"score", "inference_time", "used_fallback"} <= set(table.columns)
    # n and 95 % intervals of the headline numbers, the same as recomputed from the logged table
    from fsku.evaluate.compare import interval

    acc = interval(table.to_dict("records"), "mc_accuracy")
    assert m["mc_accuracy_n"] == 8 and m["mc_accuracy_ci95_low"] == acc["low"] and m["mc_accuracy_ci95_high"] == acc["high"]
    assert m["fsku_score_ci95_low"] <= m["fsku_score"] <= m["fsku_score_ci95_high"] and m["fsku_score_n"] == 12
    assert run.data.metrics["descriptive_score_ci95_high"] == m["descriptive_score_ci95_high"]
    # the gold set is a run input with its role; reporting on it is fine while nothing was chosen on it
    (inp,) = run.inputs.dataset_inputs
    assert {t.key: t.value for t in inp.tags}["fsku.role"] == "report" and "fsku.report_warning" not in run.data.tags
    assert run.data.tags["fsku.gold_digest"] == res["gold_digest"]


def test_a_report_on_the_set_the_kb_was_tuned_on_warns(tiny_models, tiny_llm, sample_kb, tmp_path, monkeypatch, caplog):
    kb, _, _ = sample_kb
    cfg = EvaluateConfig(model=str(tiny_models["teacher"]), kb=str(kb.folder), gold=str(SAMPLE_QA), out_dir=str(tmp_path / "ev"),
                         max_new_tokens=4, cache_dir="", context="always")
    from fsku.evaluate.compare import question_set_digest
    from fsku.evaluate.fsku_metric import load_gold

    digest = question_set_digest([g.question for g in load_gold(SAMPLE_QA)])
    monkeypatch.setitem(kb.manifest["params"], "tuned_on", f"0123456789abcdef,{digest}")
    res = run_step(cfg, progress=False, llm=tiny_llm, kb=kb)
    tags = mlflow.get_run(res["run_id"]).data.tags
    assert "not held out: the KB's settings were tuned on it" in tags["fsku.report_warning"]
    assert "not held out" in caplog.text
    # a select run (promote's) is allowed to look at it
    sel = run_step(dataclasses.replace(cfg, dataset_role="select", out_dir=str(tmp_path / "sel")), progress=False,
                   llm=tiny_llm, kb=kb)
    assert "fsku.report_warning" not in mlflow.get_run(sel["run_id"]).data.tags


def test_score_and_validate_commands(tmp_path, capsys, e5_model_dir):
    sub = tmp_path / "s.csv"
    sub.write_text("ID,Answer\nSAMPLE_001,2\nSAMPLE_002,1\n", encoding="utf-8-sig")
    gold = tmp_path / "g.csv"
    gold.write_text("ID,Question,Answer\nSAMPLE_001,\"언제?\n1 a\n2 b\n3 c\",2\nSAMPLE_002,\"무엇?\n1 a\n2 b\n3 c\",3\n",
                    encoding="utf-8-sig")
    assert main(["score", "--pred", str(sub), "--gold", str(gold)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == 0.5 and out["mc_accuracy"] == 0.5 and out["embedder"] == "none"
    test = tmp_path / "t.csv"
    test.write_text("ID,Question\nSAMPLE_001,\"언제?\n1 a\n2 b\n3 c\"\nSAMPLE_002,\"무엇?\n1 a\n2 b\n3 c\"\n",
                    encoding="utf-8-sig")
    assert main(["validate", "--submission", str(sub), "--test", str(test)]) == 0
    sub.write_text("ID,Answer\nSAMPLE_001,7\n", encoding="utf-8-sig")
    assert main(["validate", "--submission", str(sub), "--test", str(test)]) == 1
