"""Headline metrics with intervals and paired comparison on per-question rows (hand-made), the
per-question file formats, and `fsku compare` over files and over MLflow runs."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from fsku.evaluate.compare import applicable_metrics, interval, intervals, load_rows, paired
from fsku.evaluate.stats import mcnemar_exact


def _eval_rows(mc: list[int], desc: list[float], prefix: str = "") -> list[dict]:
    rows = [{"ID": f"M{i}", "question_type": "multiple_choice", "score": float(c), "inference_time": 1.0 + i}
            for i, c in enumerate(mc)]
    rows += [{"ID": f"D{i}", "question_type": "descriptive", "score": s, "cosine": s, "keyword_recall": None,
              "inference_time": 2.0} for i, s in enumerate(desc)]
    return rows


def test_intervals_of_evaluate_rows_by_hand():
    rows = _eval_rows([1, 1, 0, 1], [0.5, 0.7])
    acc = interval(rows, "mc_accuracy")
    assert acc["value"] == 0.75 and acc["n"] == 4 and acc["method"] == "wilson"
    assert math.isclose(acc["low"], 0.3006, abs_tol=1e-4) and math.isclose(acc["high"], 0.9544, abs_tol=1e-4)
    total = interval(rows, "fsku_score")
    assert math.isclose(total["value"], 0.5 * 0.75 + 0.5 * 0.6) and total["n"] == 6
    assert total["low"] <= total["value"] <= total["high"]
    found = intervals(rows, ["mc_accuracy", "descriptive_keyword_recall"])
    assert list(found) == ["mc_accuracy"]  # no row has a keyword recall: no interval, no zero


def test_paired_mcnemar_and_bootstrap_on_the_same_questions():
    a = _eval_rows([1, 1, 1, 1, 1, 1, 0, 1], [0.8, 0.6])
    b = _eval_rows([0, 0, 0, 0, 0, 1, 0, 1], [0.8, 0.4])
    mc = paired(a, b, "mc_accuracy")
    assert mc["test"] == "exact McNemar" and (mc["a_only"], mc["b_only"]) == (5, 0)
    assert math.isclose(mc["p_value"], mcnemar_exact([True] * 5, [False] * 5)["p_value"]) and math.isclose(mc["p_value"], 2 / 32)
    assert math.isclose(mc["diff"], 5 / 8)
    desc = paired(a, b, "descriptive_score")
    assert math.isclose(desc["diff"], 0.1) and desc["n"] == 2
    total = paired(a, b, "fsku_score")
    assert math.isclose(total["diff"], 0.5 * 5 / 8 + 0.5 * 0.1) and "stratified" in total["test"]
    # lower latency is better: A twice as fast -> a positive difference
    fast = [dict(r, inference_time=r["inference_time"] / 2) for r in a]
    assert paired(fast, a, "latency_mean_s")["diff"] > 0


def test_paired_refuses_different_questions():
    a, b = _eval_rows([1, 0], []), _eval_rows([1, 0, 1], [])
    with pytest.raises(ValueError, match="only in B: \\['M2'\\]"):
        paired(a, b, "mc_accuracy")
    with pytest.raises(ValueError, match="no question counts"):
        paired(a, a, "descriptive_score")
    with pytest.raises(ValueError, match="no per-question form"):
        paired(a, a, "rouge_l")


def test_retrieval_rows_hit_and_mrr():
    rows = [{"qid": "a", "first_relevant_rank": 1}, {"qid": "b", "first_relevant_rank": 3},
            {"qid": "c", "first_relevant_rank": None}, {"qid": "d", "first_relevant_rank": 12}]
    assert interval(rows, "hit_at_1")["value"] == 0.25 and interval(rows, "hit_at_5")["value"] == 0.5
    assert math.isclose(interval(rows, "mrr_at_10")["value"], (1 + 1 / 3) / 4)
    assert math.isclose(interval(rows, "mrr_at_20")["value"], (1 + 1 / 3 + 1 / 12) / 4)
    assert applicable_metrics(rows) == ["hit_at_1", "hit_at_5", "mrr_at_10"]
    better = [dict(r, first_relevant_rank=1) for r in rows]
    res = paired(better, rows, "hit_at_1")
    assert (res["a_only"], res["b_only"]) == (3, 0) and math.isclose(res["p_value"], 0.25)


def test_load_rows_formats_and_errors(tmp_path):
    rows = _eval_rows([1, 0], [0.5])
    frame = pd.DataFrame(rows)
    (tmp_path / "t.json").write_text(json.dumps({"columns": list(frame.columns), "data": frame.values.tolist()}))
    (tmp_path / "l.json").write_text(json.dumps(rows))
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    frame.to_csv(tmp_path / "c.csv", index=False)
    frame.to_parquet(tmp_path / "p.parquet")
    for name in ("t.json", "l.json", "r.jsonl", "c.csv", "p.parquet"):
        got = load_rows(tmp_path / name)
        assert [str(r["ID"]) for r in got] == ["M0", "M1", "D0"], name
        assert interval(got, "mc_accuracy")["value"] == 0.5, name
    (tmp_path / "noid.jsonl").write_text('{"ID": "a", "score": 1}\n{"score": 0}\n')
    (tmp_path / "dup.jsonl").write_text('{"ID": "a"}\n{"ID": "a"}\n')
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "x.txt").write_text("a")
    for name, match in (("noid.jsonl", "row 2 has no ID"), ("dup.jsonl", "row 2 repeats ID 'a'"),
                        ("bad.json", "not readable"), ("x.txt", "unknown format"), ("missing.csv", "no such file")):
        with pytest.raises(ValueError, match=match):
            load_rows(tmp_path / name)


def test_fsku_compare_over_files_and_runs(tmp_path, capsys):
    import mlflow

    from fsku import tracking
    from fsku.cli import main

    a, b = _eval_rows([1] * 6 + [0, 1], [0.8]), _eval_rows([0] * 6 + [0, 1], [0.6])
    pd.DataFrame(a).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(b).to_csv(tmp_path / "b.csv", index=False)
    assert main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    assert "mc_accuracy: A 0.875 [" in out and "exact McNemar p = 0.0312" in out and "A only right 6" in out
    saved = json.loads((tmp_path / "out.json").read_text())
    assert [r["metric"] for r in saved] == ["fsku_score", "mc_accuracy", "descriptive_score", "descriptive_cosine"]
    ids = []
    for rows in (a, b):
        with tracking.run("evaluate", {}) as active:
            tracking.log_table(pd.DataFrame(rows), "per_question.json")
            ids.append(active.info.run_id)
    assert main(["compare", *ids, "--metric", "mc_accuracy"]) == 0
    assert "exact McNemar p = 0.0312" in capsys.readouterr().out
    with tracking.run("distill", {}) as active:
        mlflow.log_dict({}, "x.json")
        empty = active.info.run_id
    assert main(["compare", ids[0], empty]) == 2
    assert "logged none of" in capsys.readouterr().err
    assert main(["compare", ids[0], "no-such-run-or-file"]) == 2
    assert "neither a per-question file nor a run" in capsys.readouterr().err


def test_log_dataset_retries_a_lost_unique_race_and_raises_anything_else(monkeypatch):
    """Two runs logging the same new dataset at once: the store's get-or-create can lose the insert
    race (seen with two tune workers on an MLflow server over PostgreSQL)."""
    import mlflow

    from fsku import tracking

    calls = []
    real = mlflow.log_input

    def racing(dataset, **kw):
        calls.append(dataset.name)
        if len(calls) == 1:
            raise mlflow.exceptions.MlflowException('duplicate key value violates unique constraint "datasets_pk"')
        return real(dataset, **kw)

    monkeypatch.setattr(mlflow, "log_input", racing)
    with tracking.run("evaluate", {}) as active:
        tracking.log_dataset(pd.DataFrame({"ID": ["a"], "question": ["q"]}), name="race", source="x.csv", context="evaluation")
    assert calls == ["race", "race"]
    assert [d.dataset.name for d in mlflow.get_run(active.info.run_id).inputs.dataset_inputs] == ["race"]

    def broken(dataset, **kw):
        raise mlflow.exceptions.MlflowException("permission denied")

    monkeypatch.setattr(mlflow, "log_input", broken)
    with tracking.run("evaluate", {}):
        with pytest.raises(mlflow.exceptions.MlflowException, match="permission denied"):
            tracking.log_dataset(pd.DataFrame({"ID": ["a"]}), name="other", source="x.csv", context="evaluation")
