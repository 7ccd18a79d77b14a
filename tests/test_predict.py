"""predict end to end on a tiny model: a valid submission, the validator, bad input, kill -9 resume."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from fsku.config import PredictConfig
from fsku.infer.predict import classify_file, predict, validate_submission, write_submission

SAMPLE_TEST = ROOT / "evaluation" / "sample_test.csv"


def _write(path, rows, encoding="utf-8-sig", header=("ID", "Question")):
    with path.open("w", encoding=encoding, newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tiny_prediction(tiny_models, tiny_llm, sample_kb, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred") / "submission.csv"
    kb, _, _ = sample_kb
    cfg = PredictConfig(model=str(tiny_models["teacher"]), kb=str(kb.folder), context="gated", gate_threshold=0.0,
                        max_new_tokens=12, cache_dir="")
    return predict(cfg, SAMPLE_TEST, out, progress=False, llm=tiny_llm, kb=kb), out


def test_predict_writes_a_valid_submission_in_input_order(tiny_prediction):
    result, out = tiny_prediction
    assert out.read_bytes().startswith(b"\xef\xbb\xbf")
    assert validate_submission(out, SAMPLE_TEST) == []
    questions = classify_file(SAMPLE_TEST)
    with out.open(encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["ID"] for r in rows] == [q.question_id for q in questions]
    for q, r, rec in zip(questions, rows, result.records):
        assert set(rec) >= {"answer", "confidence", "inference_time", "used_fallback"}
        if q.question_type == "multiple_choice":
            assert r["Answer"] in q.choices
        else:
            assert r["Answer"].strip()
    # gate threshold 0: every primary answer got context from the KB (the fallback asks without it)
    assert all(rec["n_context"] > 0 for rec in result.records if not rec["used_fallback"])
    assert sum(not rec["used_fallback"] for rec in result.records) >= 8


def test_validator_reports_each_problem(tmp_path):
    questions = classify_file(SAMPLE_TEST)
    good = [(q.question_id, "1" if q.choices else "답") for q in questions]
    sub = write_submission(tmp_path / "ok.csv", good)
    assert validate_submission(sub, SAMPLE_TEST) == []
    bad = [(good[0][0], "9")] + good[2:] + [good[2]]
    problems = validate_submission(write_submission(tmp_path / "bad.csv", bad), SAMPLE_TEST)
    text = "\n".join(problems)
    assert "answer '9' is not one of options" in text and "duplicate ID" in text and "missing" in text
    empty = [(i, "" if a == "답" else a) for i, a in good]
    assert all(p.startswith("warning:") for p in validate_submission(write_submission(tmp_path / "e.csv", empty), SAMPLE_TEST))
    (tmp_path / "nobom.csv").write_text("ID,Answer\n" + "\n".join(f"{i},{a}" for i, a in good) + "\n", encoding="utf-8")
    assert validate_submission(tmp_path / "nobom.csv", SAMPLE_TEST) == ["not UTF-8 with BOM (the competition files are)"]
    swapped = [good[1], good[0]] + good[2:]
    assert "rows are not in the test file's order" in validate_submission(write_submission(tmp_path / "o.csv", swapped),
                                                                          SAMPLE_TEST)


def test_bad_input_files_get_clear_errors(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['Question'\]"):
        classify_file(_write(tmp_path / "a.csv", [("1", "x")], header=("ID", "Text")))
    with pytest.raises(ValueError, match="row 3 has an empty ID"):
        classify_file(_write(tmp_path / "b.csv", [("1", "질문?"), ("  ", "또 질문?")]))
    with pytest.raises(ValueError, match=r"duplicate IDs 'A' \(row 3\)"):
        classify_file(_write(tmp_path / "c.csv", [("A", "질문?"), ("A", "또 질문?")]))
    # row content is no error: flagged, warned about with the file and row
    with caplog.at_level("WARNING"):
        flagged = classify_file(_write(tmp_path / "d.csv", [("X", "1 가\n2 나\n3 다\n4 라"), ("Y", "  ")]))
    assert [(q.question_type, q.flag) for q in flagged] == [("multiple_choice", "options but no question stem"),
                                                           ("descriptive", "empty question")]
    assert "d.csv: row 2 (ID X): options but no question stem" in caplog.text and "row 6 (ID Y): empty question" in caplog.text
    # documented handling: cp949 (Excel) and BOM-less UTF-8 files are read
    cp = classify_file(_write(tmp_path / "e.csv", [("K", "옳은 것은?\n1 가\n2 나\n3 다")], encoding="cp949"))
    assert cp[0].choices == {"1": "가", "2": "나", "3": "다"}
    plain = classify_file(_write(tmp_path / "f.csv", [("K", "설명하세요.")], encoding="utf-8"))
    assert plain[0].question_type == "descriptive"


def test_kill_9_then_rerun_finishes_without_recomputing(tiny_models, tmp_path):
    questions = classify_file(SAMPLE_TEST)
    with SAMPLE_TEST.open(encoding="utf-8-sig") as fh:
        base = list(csv.DictReader(fh))
    rows = [(f"R{k:03d}_{r['ID']}", r["Question"]) for k in range(4) for r in base]  # 48 rows
    test_csv = _write(tmp_path / "test.csv", rows)
    out = tmp_path / "submission.csv"
    partial = tmp_path / "submission.csv.partial.jsonl"
    cmd = [sys.executable, "-m", "fsku.cli", "predict", "--input", str(test_csv), "--out", str(out), "--model",
           str(tiny_models["teacher"]), "--kb", "none", "--context", "none", "--max-new-tokens", "8", "--cache-dir", "none",
           "--no-progress", "--dtype", "float32"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline:
        if partial.exists() and len(partial.read_text(encoding="utf-8").splitlines()) >= 6:
            break
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    before = {json.loads(x)["ID"]: json.loads(x) for x in partial.read_text(encoding="utf-8").splitlines()[1:]
              if x.strip().endswith("}")}
    assert 5 <= len(before) < len(rows)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming: {len(before)} of {len(rows)} questions already answered" in done.stderr
    after = [json.loads(x) for x in partial.read_text(encoding="utf-8").splitlines()[1:]]
    assert sorted(r["ID"] for r in after) == sorted(i for i, _ in rows)  # every ID once
    by_id = {r["ID"]: r for r in after}
    for qid, rec in before.items():
        assert by_id[qid] == rec  # the rows finished before the kill were kept, not recomputed
    assert validate_submission(out, test_csv) == []
    assert len(questions) == len(base)


def test_predict_step_main_writes_records_and_tracks_the_run(tiny_models, tmp_path, capsys):
    """`python -m fsku.steps.predict` (the MLproject entry point): config flags + --records, one MLflow run."""
    import mlflow

    from fsku.steps.predict import main

    out, records = tmp_path / "submission.csv", tmp_path / "records.jsonl"
    assert main(["--input", str(SAMPLE_TEST), "--out", str(out), "--records", str(records), "--model",
                 str(tiny_models["teacher"]), "--kb", "none", "--context", "none", "--max-new-tokens", "4",
                 "--cache-dir", "none", "--dtype", "float32", "--no-progress"]) == 0
    assert validate_submission(out, SAMPLE_TEST) == [] and "validator: OK" in capsys.readouterr().out
    rows = [json.loads(line) for line in records.read_text(encoding="utf-8").splitlines()]
    assert [r["ID"] for r in rows] == [q.question_id for q in classify_file(SAMPLE_TEST)]
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`fsku.step` = 'predict'")
    assert len(runs) >= 1 and (runs["params.model"] == str(tiny_models["teacher"])).any()
