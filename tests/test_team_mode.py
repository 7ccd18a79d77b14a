"""Team mode, end to end: PostgreSQL (Debian's packages) backs an `mlflow server` on 127.0.0.1 with
proxied artifacts and an Optuna storage; build_kb registers the sample KB through the server and two
worker processes run one 4-trial retrieval study against both. Nothing assumes a local store.

Skipped, with the reason, only where PostgreSQL is neither installed nor installable (apt-get as root).
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE_CORPUS, SAMPLE_LABELS

FSKU = [sys.executable, "-m", "fsku.cli"]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


def _ensure_postgres() -> Path:
    bin_dir = _pg_bin()
    if bin_dir is None and os.geteuid() == 0 and shutil.which("apt-get"):
        proc = subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if proc.returncode:
            pytest.skip(f"PostgreSQL is not installed and `apt-get install postgresql` failed: {proc.stderr[-300:]}")
        bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb) and cannot be installed "
                    "here (apt-get as root is needed)")
    return bin_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb and the server refuse to run as root
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def team_services():
    bin_dir = _ensure_postgres()
    work = Path(tempfile.mkdtemp(prefix="fsku-team-"))
    data = work / "pgdata"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(work, "postgres")
        shutil.chown(data, "postgres")
    os.chmod(work, 0o755)
    pg_port, ml_port = _free_port(), _free_port()
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"]),
                   check=True, capture_output=True)
    subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w", "-o",
                                 f"-p {pg_port} -k {data} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, capture_output=True)
    server = None
    try:
        for db in ("mlflow", "optuna"):
            subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", db],
                           check=True, capture_output=True)
        pg = f"postgresql://postgres@127.0.0.1:{pg_port}"
        artifacts = work / "artifacts"
        artifacts.mkdir()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(work / "mlflow-server.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{pg}/mlflow",
                                   "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port",
                                   str(ml_port), "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, cwd=work)
        url = f"http://127.0.0.1:{ml_port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
            if server.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(work / 'mlflow-server.log').read_text()[-2000:]}")
        else:
            raise RuntimeError("mlflow server did not answer /health within 180 s")
        yield {"tracking": url, "optuna": f"{pg}/optuna", "work": work}
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def test_build_kb_and_a_two_worker_study_against_postgres_and_an_mlflow_server(team_services, tmp_path, monkeypatch):
    import mlflow

    # this process reads the server too (the registry resolves logged models through the global URI);
    # the URI the other tests use is restored afterwards (read before the environment changes)
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_services["tracking"])
    mlflow.set_tracking_uri(team_services["tracking"])
    try:
        _run_team_checks(team_services, tmp_path)
    finally:
        mlflow.set_tracking_uri(previous)


def _run_team_checks(team_services, tmp_path):
    import mlflow
    import optuna

    env = {**os.environ, "MLFLOW_TRACKING_URI": team_services["tracking"], "TQDM_DISABLE": "1"}
    kb = tmp_path / "kb"
    proc = subprocess.run([*FSKU, "build-kb", "--corpus", str(SAMPLE_CORPUS), "--out", str(kb), "--labels", str(SAMPLE_LABELS)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=team_services["tracking"], registry_uri=team_services["tracking"])
    versions = client.search_model_versions("name = 'fsku-kb'")
    assert len(versions) == 1
    # the KB artifacts went through the server's artifact proxy, not to a local folder
    run_id = versions[0].run_id
    assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    assert {a.path for a in client.list_artifacts(run_id, "kb")} >= {"kb/manifest.json", "kb/chunks.parquet"}

    base = tmp_path / "base" / "build_kb.yaml"
    base.parent.mkdir()
    base.write_text(f"corpus: {SAMPLE_CORPUS}\n", encoding="utf-8")
    cmd = [*FSKU, "tune", "--study", "retrieval", "--study-name", "team-study", "--storage", team_services["optuna"],
           "--n-trials", "2", "--sampler", "random", "--out", str(tmp_path / "tune"), "--recipe-out", "none",
           "--base-recipe", str(base), "--labels", str(SAMPLE_LABELS), "--chunk-sizes", "480", "--chunk-overlaps", "32",
           "--bm25-tokenizers", "kiwi", "--no-progress"]
    workers = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[-3000:] for o in outputs]
    study = optuna.load_study(study_name="team-study", storage=team_services["optuna"])
    assert len(study.trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    parents = {t.user_attrs["mlflow_parent_run_id"] for t in study.trials}
    assert len(parents) == 2
    experiment = client.get_experiment_by_name("fsku")
    trials = client.search_runs([experiment.experiment_id],
                                "tags.`optuna.study` = 'team-study' and tags.`optuna.state` = 'COMPLETE'")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in trials) == [0, 1, 2, 3]
    for parent in parents:
        assert any(a.path.startswith("plots/") for a in client.list_artifacts(parent, "plots"))
