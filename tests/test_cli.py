"""Command-line and MLflow entry points, end to end on the sample corpus."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsku.cli import main as fsku_main

from conftest import ROOT, SAMPLE_CORPUS, SAMPLE_LABELS


def test_retrieve_command_output_format(sample_kb, tmp_path):
    kb, _, _ = sample_kb
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"qid": 1, "question": "망분리란?"}\n{"qid": "b", "question": "OTP 이체 한도"}\n', encoding="utf-8")
    out = tmp_path / "hits.jsonl"
    assert fsku_main(["retrieve", "--kb", str(kb.folder), "--queries", str(queries), "--top-k", "3",
                      "--out", str(out), "--fusion", "rrf"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["qid"] for r in rows] == [1, "b"]
    hit = rows[0]["hits"][0]
    assert {"chunk_id", "source", "text", "score"} <= set(hit) and len(rows[0]["hits"]) == 3
    assert Path(hit["source"]).name == "보안용어집.json"


def test_retrieve_rejects_bad_query_file(sample_kb, tmp_path, capsys):
    kb, _, _ = sample_kb
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"qid": 1, "question": "ok"}\n{"question": "no id"}\n', encoding="utf-8")
    rc = fsku_main(["retrieve", "--kb", str(kb.folder), "--queries", str(bad), "--top-k", "1", "--out", str(tmp_path / "o")])
    assert rc == 2 and "bad.jsonl:2" in capsys.readouterr().err


def test_build_kb_cli_fails_clearly_on_unusable_corpus(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_bytes(b"")
    rc = fsku_main(["build-kb", "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "kb"), "--embedding-model", "none",
                    "--length-unit", "chars"])
    assert rc == 2 and "no usable document" in capsys.readouterr().err


def test_build_kb_cli_tracks_and_registers(tmp_path, e5_model_dir):
    import mlflow
    import pandas as pd

    out = tmp_path / "kb"
    rc = fsku_main(["build-kb", "--corpus", str(SAMPLE_CORPUS), "--out", str(out), "--chunk-size", "200",
                    "--labels", str(SAMPLE_LABELS), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    client = mlflow.MlflowClient()
    version = max(int(v.version) for v in client.search_model_versions("name='fsku-kb'"))
    run = client.get_run(client.get_model_version("fsku-kb", str(version)).run_id)
    assert run.info.status == "FINISHED" and run.data.params["chunk_size"] == "200"
    assert run.data.metrics["documents"] == 6 and run.data.metrics["retrieval_hit_at_5"] == 1.0
    assert "seconds_embed" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"retrieval_hit_at_k.png", "retrieval_per_query.json", "kb"} <= artifacts
    curve = client.get_metric_history(run.info.run_id, "retrieval_hit_curve")
    assert [m.step for m in curve] == list(range(1, 11)) and curve[-1].value == 1.0
    model = mlflow.pyfunc.load_model(f"models:/fsku-kb/{version}")
    hits = model.predict(pd.DataFrame({"question": ["보안책임자 겸직 금지"]}), params={"top_k": 2})
    assert len(hits) == 2 and hits.iloc[0]["source"].endswith("표본_전자금융보안법.pdf")


@pytest.mark.slow
def test_mlflow_run_entry_point(tmp_path, e5_model_dir):
    """`mlflow run . -e build_kb --env-manager local` leaves a FINISHED run and a registered version."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = tmp_path / "kb"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e", "build_kb", "--env-manager", "local",
           "-P", f"corpus={SAMPLE_CORPUS}", "-P", f"out={out}", "-P", f"labels={SAMPLE_LABELS}",
           "-P", "register_as=fsku-kb-e2e"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered: models:/fsku-kb-e2e/1" in proc.stdout
    assert (out / "manifest.json").exists()


def test_ingest_and_eval_retrieval_commands(sample_kb, tmp_path, capsys):
    kb, _, _ = sample_kb
    out = tmp_path / "docs.jsonl"
    assert fsku_main(["ingest", "--corpus", str(SAMPLE_CORPUS), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 6 and {"doc_id", "source", "title", "sha256", "text", "pages", "license"} <= set(rows[0])
    assert fsku_main(["eval-retrieval", "--kb", str(kb.folder), "--labels", str(SAMPLE_LABELS), "--top-k", "5"]) == 0
    printed = capsys.readouterr().out
    assert '"hit_at_5": 1.0' in printed
    assert fsku_main(["no-such-command"]) == 2
