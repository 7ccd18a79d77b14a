"""The evaluate step on a tiny model: FSKU score parts, latency, plots and the table land in MLflow;
`fsku score` / `fsku validate` from the command line."""
import json

import mlflow

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
    assert m["rouge_l"] is not None and "score_domain/금융보안법률" in m
    assert m["rag_judge_rows"] == 2 and m["rag_context_precision_rows"] == 2  # the sample KB answers every query
    assert 0 <= m["rag_context_recall"] <= 1 and 0 <= m["rag_answer_relevancy"] <= 1
    run = mlflow.get_run(res["run_id"])
    assert run.data.metrics["fsku_score"] == m["fsku_score"]
    assert run.data.params["context"] == "gated"
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(res["run_id"], "plots")}
    assert arts == {"plots/score_by_type.png", "plots/latency_hist.png"}
    table = mlflow.load_table("per_question.json", run_ids=[res["run_id"]])
    assert len(table) == 12 and {"score", "inference_time", "used_fallback"} <= set(table.columns)


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
