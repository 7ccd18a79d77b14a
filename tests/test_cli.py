"""Command-line and MLflow entry points, end to end on the sample corpus."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE_CORPUS, SAMPLE_LABELS
from fsku.cli import main as fsku_main


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


def _tuned_kb(sample_kb, tmp_path) -> Path:
    """The sample KB with non-default fusion settings in its manifest (as `fsku tune` would leave them)."""
    kb, _, _ = sample_kb
    folder = tmp_path / "tuned-kb"
    shutil.copytree(kb.folder, folder)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    manifest["params"].update(fusion="rrf", rrf_k=7, w_bm25=0.9, w_law=0.0, w_article=0.0)
    (folder / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
    return folder


def test_retrieve_uses_the_kbs_fusion_settings_unless_a_flag_overrides_them(sample_kb, tmp_path):
    from fsku.kb import KnowledgeBase

    folder = _tuned_kb(sample_kb, tmp_path)
    questions = ["망분리란?", "OTP 이체 한도", "금융회사등이 보안사고를 알게 된 때 감독기관 보고 기한"]
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"qid": i, "question": q}, ensure_ascii=False) + "\n" for i, q in enumerate(questions)),
                       encoding="utf-8")

    def retrieve(*flags) -> list[list[tuple]]:
        out = tmp_path / "hits.jsonl"
        assert fsku_main(["retrieve", "--kb", str(folder), "--queries", str(queries), "--top-k", "4", "--out", str(out),
                          *flags]) == 0
        return [[(h["chunk_id"], h["score"], h["method"]) for h in json.loads(line)["hits"]]
                for line in out.read_text(encoding="utf-8").splitlines()]

    kb = KnowledgeBase.load(folder)

    def search(**overrides) -> list[list[tuple]]:
        return [[(h.chunk_id, h.score, h.method) for h in hs] for hs in kb.search(questions, top_k=4, **overrides)]

    tuned = retrieve()
    assert kb.retrieve_defaults().fusion == "rrf" and tuned == search()  # rrf with k=7, no priors: the manifest's
    assert {m for hs in tuned for _, _, m in hs} == {"rrf"} and tuned != search(rrf_k=60)
    assert retrieve("--rrf-k", "60") == search(rrf_k=60) != tuned
    minmax = retrieve("--fusion", "minmax")  # the flag wins; w_bm25=0.9 still comes from the KB
    assert minmax == search(fusion="minmax") and {m for hs in minmax for _, _, m in hs} == {"hybrid"}
    assert retrieve("--fusion", "minmax", "--w-bm25", "1.0") == search(fusion="minmax", w_bm25=1.0)


def test_eval_retrieval_uses_the_kbs_fusion_settings_unless_a_flag_overrides_them(sample_kb, tmp_path, capsys):
    import dataclasses

    from fsku.evaluate.retrieval import evaluate_retrieval
    from fsku.kb import KnowledgeBase

    folder = _tuned_kb(sample_kb, tmp_path)
    kb = KnowledgeBase.load(folder)

    def eval_retrieval(*flags) -> tuple[str, dict]:
        assert fsku_main(["eval-retrieval", "--kb", str(folder), "--labels", str(SAMPLE_LABELS), "--top-k", "5", *flags]) == 0
        printed = capsys.readouterr().out
        return printed.splitlines()[0], json.loads(printed[printed.index("{"):printed.index("\n}") + 2])

    def expected(**overrides) -> dict:
        metrics, _ = evaluate_retrieval(kb, SAMPLE_LABELS, dataclasses.replace(kb.retrieve_defaults(), top_k=5, **overrides))
        metrics.pop("curve")
        metrics.pop("intervals")
        return metrics

    rest = (", statute_family=True, family_share=0.5, w_level=0.0, w_link=0.2, link_from=5, group=chunk, sibling_bonus=0.0,"
            " article_chunks=1")
    assert eval_retrieval() == ("fusion=rrf, w_bm25=0.9, rrf_k=7, w_law=0.0, w_article=0.0" + rest, expected())
    assert eval_retrieval("--fusion", "minmax", "--w-bm25", "0.3", "--w-law", "0.1") == (
        "fusion=minmax, w_bm25=0.3, rrf_k=7, w_law=0.1, w_article=0.0" + rest,
        expected(fusion="minmax", w_bm25=0.3, w_law=0.1))
    # every FusionSettings field is a flag (derived from the dataclass), checked by the config
    assert eval_retrieval("--group", "article", "--article-chunks", "2")[0].endswith("group=article, sibling_bonus=0.0, "
                                                                                    "article_chunks=2")
    assert fsku_main(["eval-retrieval", "--kb", str(folder), "--labels", str(SAMPLE_LABELS), "--w-link", "2"]) == 2
    assert "w_link must be in [0, 1]" in capsys.readouterr().err


def test_stage_commands_run_the_step_modules_main(monkeypatch):
    """`fsku <stage>` is `fsku.steps.<stage>.main(argv)`; every step module has the same shape."""
    import importlib
    import inspect

    stages = {"build-kb": "build_kb", "synth-qa": "synth_qa", "distill": "distill", "quantize": "quantize",
              "predict": "predict", "evaluate": "evaluate", "tune": "tune", "promote": "promote", "package": "package",
              "main": "main"}
    for command, module in stages.items():
        mod = importlib.import_module(f"fsku.steps.{module}")
        params = list(inspect.signature(mod.run_step).parameters)
        assert params[:2] == ["cfg", "progress"], (module, params)
        assert f"python -m fsku.steps.{module}" in mod.__doc__, module
        calls = []
        monkeypatch.setattr(mod, "main", lambda argv, calls=calls: calls.append(argv) or 0)
        assert fsku_main([command, "--x", "1"]) == 0 and calls == [["--x", "1"]], command


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
    assert "cost/seconds_embed" in run.data.metrics and "seconds_embed" not in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"retrieval_hit_at_k.png", "retrieval_per_query.json", "kb"} <= artifacts
    curve = client.get_metric_history(run.info.run_id, "retrieval_hit_curve")
    assert [m.step for m in curve] == list(range(1, 11)) and curve[-1].value == 1.0
    model = mlflow.pyfunc.load_model(f"models:/fsku-kb/{version}")
    hits = model.predict(pd.DataFrame({"question": ["보안책임자 겸직 금지"]}), params={"top_k": 2})
    assert len(hits) == 2 and hits.iloc[0]["source"].endswith("표본_전자금융보안법.pdf")
    # lineage: the version names its corpus hash, counts, settings and build run, and says so in words
    mv = client.get_model_version("fsku-kb", str(version))
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert mv.tags["corpus_sha256"] == manifest["corpus_sha256"][:16] and mv.tags["documents"] == "6"
    assert mv.tags["chunk_size"] == "200" and mv.tags["build_run"] == run.info.run_id and len(mv.tags["kb_version"]) == 12
    assert mv.description.startswith("6 documents") and manifest["corpus_sha256"][:16] in mv.description
    assert client.get_registered_model("fsku-kb").description
    # the corpus and the labels are the run's dataset inputs; the run is named after its step and settings
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert {"fsku-corpus-sample_corpus", "fsku-retrieval-labels-sample_retrieval"} <= set(inputs)
    assert run.info.run_name.startswith("build_kb-sample_corpus-200tok-")
    assert run.data.tags["mlflow.note.content"].startswith("build_kb:")


@pytest.mark.slow
def test_mlflow_run_entry_point(tmp_path, e5_model_dir):
    """`mlflow run . -e build_kb --env-manager local` leaves a FINISHED run and a registered version."""
    # a fresh store in the folder the command runs from, as `make demo` has in the project
    store = f"sqlite:///{tmp_path}/mlflow.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_EXPERIMENT", "MLFLOW_RUN_ID"))}  # other stores'
    env.update({"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": store})
    out = tmp_path / "kb"
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e", "build_kb", "--env-manager", "local",
           "-P", f"corpus={SAMPLE_CORPUS}", "-P", f"out={out}", "-P", f"labels={SAMPLE_LABELS}",
           "-P", "register_as=fsku-kb-e2e"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered: models:/fsku-kb-e2e/1" in proc.stdout
    assert (out / "manifest.json").exists()
    # without --experiment-name MLflow filed the run under experiment 0: on a SQLite store it is the project's
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    run = client.get_run(client.get_model_version("fsku-kb-e2e", "1").run_id)
    assert client.get_experiment(run.info.experiment_id).name == "fsku"
    assert run.info.run_name.startswith("build_kb-sample_corpus-")


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
