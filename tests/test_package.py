"""package: rule checks (each refusal with its message), network scan, base-model facts, deterministic
and safe zip, manifest, and a bundle that answers its sample test with only its own files."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE_CORPUS
from fsku.config import BuildKBConfig, PackageConfig
from fsku.package import (
    BundleFacts,
    RulePolicy,
    build_manifest,
    check_rules,
    check_zip,
    project_seconds,
    safe_member,
    scan_network_use,
    sha256_file,
    write_zip,
)
from fsku.package.facts import load_facts, model_facts
from fsku.package.pycompat import check_source
from fsku.package.resources import TimeProjection, memory_projection

TABLES = load_facts()
QWEN = model_facts("offline:qwen2.5-coder-0.5b-instruct", TABLES)
POLICY = RulePolicy(permitted_licenses=TABLES.permitted_licences())


def test_clean_facts_pass_and_each_rule_refuses_with_its_reason():
    ok = BundleFacts(llms=["model"], models=[("base model", QWEN)], projected_s=3600.0, bundle_bytes=10 ** 9)
    assert check_rules(ok, POLICY) == []
    over = memory_projection(14.77e9, "bf16", QWEN.architecture, 4096, 8, 1.5, 24.0)
    cases = {
        "2 LLMs bundled (model, kb/extra): the competition allows exactly one": dict(llms=["model", "kb/extra"]),
        "base model Qwen/Qwen2.5-Coder-0.5B-Instruct was released 2025-09-16, after the competition cutoff 2025-07-31":
            dict(models=[("base model", dataclasses.replace(QWEN, release_date="2025-09-16"))]),
        "base model Qwen/Qwen2.5-Coder-0.5B-Instruct: release date unknown":
            dict(models=[("base model", dataclasses.replace(QWEN, release_date=None))]),
        "base model Qwen/Qwen2.5-Coder-0.5B-Instruct: licence unknown":
            dict(models=[("base model", dataclasses.replace(QWEN, license=None))]),
        "base model Qwen/Qwen2.5-Coder-0.5B-Instruct: licence 'proprietary' is not permitted":
            dict(models=[("base model", dataclasses.replace(QWEN, license="proprietary"))]),
        "synth_qa teacher someone/new-model-7b: no facts known":
            dict(models=[("base model", QWEN), ("synth_qa teacher", model_facts("someone/new-model-7b", TABLES))]),
        "network access in bundled code: code/x.py:1: imports requests":
            dict(network=scan_network_use("import requests\n", "code/x.py")),
        "bundled code needs a newer Python than the target 3.10: code/y.py:1: module tomllib needs Python 3.11":
            dict(compat=check_source("import tomllib\n", "code/y.py")),
        "GPU memory: projected 29.": dict(memory=over),
        "bundle of 41.00 GB exceeds the 40 GB disk": dict(bundle_bytes=41 * 10 ** 9),
        "projected 515-question time on the target GPU 300.0 min exceeds the 270-min budget (speeds":
            dict(time=TimeProjection(18000.0, 270 * 60.0, ["speeds ...", "load 0 s; total 300.0 min"])),
        "projected 515-question time 300.0 min exceeds the 270-min budget": dict(projected_s=18000.0),
    }
    for message, change in cases.items():
        facts = BundleFacts(**{**ok.__dict__, **change})
        problems = check_rules(facts, POLICY)
        assert len(problems) == 1 and message in problems[0], (message, problems)
    # a model trained from scratch has no release date to check, but still needs a permitted licence
    scratch = dataclasses.replace(model_facts("tiny", TABLES), from_scratch=True, license="apache-2.0")
    assert check_rules(BundleFacts(llms=["m"], models=[("base model", scratch)]), POLICY) == []
    bad_date = check_rules(BundleFacts(llms=["m"], models=[("base model", dataclasses.replace(QWEN, release_date="Nov"))]),
                           POLICY)
    assert "not an ISO date" in bad_date[0]


def test_network_scan_finds_imports_and_downloads_and_honours_reviewed_sites():
    src = ("import os\nimport socket\nfrom urllib import request\nfrom http.client import HTTPSConnection\n"
           "import urllib.request as u\nfrom huggingface_hub import snapshot_download\n"
           "p = snapshot_download('x/y')\n"
           "q = snapshot_download('x/y')  # offline: only for hub ids\n")
    found = scan_network_use(src, "m.py")
    assert [(f.line, f.what, f.guarded) for f in found] == [
        (2, "imports socket", False), (3, "imports from urllib", False), (4, "imports from http.client", False),
        (5, "imports urllib.request", False), (7, "calls snapshot_download()", False), (8, "calls snapshot_download()", True)]
    assert found[-1].reason == "only for hub ids"
    assert scan_network_use("import json\nfrom pathlib import Path\nimport urllib.parse\n", "ok.py") == []
    assert "unparsable" in scan_network_use("def (:\n", "bad.py")[0].what
    # the marker may stand as a comment line right above the call (a long line wrapped), not further up
    wrapped = scan_network_use("# offline: hub ids only\np = snapshot_download('x')\n"
                               "# offline: far\n\nq = snapshot_download('y')\n", "w.py")
    assert [(f.line, f.guarded, f.reason) for f in wrapped] == [(2, True, "hub ids only"), (5, False, "")]


def test_the_bundled_code_has_no_unreviewed_network_use(tmp_path):
    """The runtime code a bundle ships, scanned as package scans it: every network call site is reviewed
    (a reformatted line that drops its `# offline:` marker fails here, not only in `make demo`)."""
    from fsku.steps.package import copy_code

    copy_code(tmp_path)
    found = [f for path in sorted((tmp_path / "fsku").rglob("*.py"))
             for f in scan_network_use(path.read_text(encoding="utf-8"), str(path)) if not f.guarded]
    assert found == []


def test_projection():
    assert project_seconds(30.0, 2.0, 515) == 1060.0
    assert project_seconds(30.0, 2.0, 515, speed_factor=4.0) == 265.0
    with pytest.raises(ValueError, match="speed_factor must be > 0"):
        project_seconds(1, 1, 1, 0)


def test_zip_is_deterministic_sorted_and_safe(tmp_path):
    src = tmp_path / "b"
    (src / "sub").mkdir(parents=True)
    (src / "z.txt").write_text("z")
    (src / "sub" / "a.bin").write_bytes(os.urandom(1000))
    (src / "a.txt").write_text("한글")
    first = write_zip(src, tmp_path / "one.zip")
    os.utime(src / "a.txt", (1, 1))  # timestamps must not matter
    second = write_zip(src, tmp_path / "two.zip")
    assert first.read_bytes() == second.read_bytes()
    assert check_zip(first) == ["a.txt", "sub/a.bin", "z.txt"]
    with zipfile.ZipFile(first) as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    for bad in ("../x", "/etc/passwd", "a/../../x", "C:/x", "a\\b", ""):
        with pytest.raises(ValueError, match="unsafe path"):
            safe_member(bad)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(ValueError, match="unsafe path"):
        check_zip(evil)
    (src / "link").symlink_to(src / "z.txt")
    with pytest.raises(ValueError, match="symbolic links"):
        build_manifest(src)


@pytest.fixture(scope="module")
def bm25_kb(tmp_path_factory):
    """The sample corpus as a BM25-only KB (no embedding model to bundle: a small, fast bundle)."""
    from fsku.kb import build_knowledge_base

    out = tmp_path_factory.mktemp("pkg-kb") / "kb"
    build_knowledge_base(BuildKBConfig(corpus=str(SAMPLE_CORPUS), out=str(out), embedding_model="none", length_unit="chars",
                                       chunk_size=600, chunk_overlap=40, cache_dir=""), progress=False)
    return out


def _cfg(tmp_path, model, kb, **kw) -> PackageConfig:
    settings = tmp_path / "predict.yaml"
    settings.write_text("backend: transformers\ndevice: cpu\ndtype: float32\ncontext: gated\ngate_signal: bm25\n"
                        "gate_threshold: 5.0\nmax_new_tokens: 12\n", encoding="utf-8")
    values = dict(model=str(model), kb=str(kb), out=str(tmp_path / "pkg"), settings_recipe=str(settings), verify="none")
    values.update(kw)
    return PackageConfig(**values)


def test_bundle_answers_its_sample_with_only_its_own_files(tiny_models, bm25_kb, tmp_path):
    from fsku.infer.predict import validate_submission
    from fsku.steps.package import run_step

    out = run_step(_cfg(tmp_path, tiny_models["student"], bm25_kb, verify="current"), progress=False)
    bundle = Path(out["bundle"])
    assert out["problems"] == [] and out["llms"] == ["model"] and out["models"][0][1]["from_scratch"]
    v = out["verification"]
    assert v["valid"] and v["questions"] == len(list(csv.reader(open(ROOT / "evaluation/sample_test.csv",
                                                                     encoding="utf-8-sig")))) - 1
    assert v["isolation"] != "none" or shutil.which("unshare") is None
    assert validate_submission(tmp_path / "pkg" / "verify" / "submission.csv", bundle / "sample" / "test.csv") == []
    # code: the runtime package only, and the one reviewed hub call is the only network site
    code = {p.relative_to(bundle / "code" / "fsku").as_posix() for p in (bundle / "code" / "fsku").rglob("*.py")}
    assert "infer/predict.py" in code and not any(c.startswith(("steps/", "distill/", "synth/")) for c in code)
    assert "tracking.py" not in code and not any(c.startswith("package/") for c in code)
    from fsku.package import inference

    assert (bundle / "inference.py").read_bytes() == Path(inference.__file__).read_bytes()
    assert out["network"] == [n for n in out["network"] if "guarded" in n]
    reqs = (bundle / "requirements.txt").read_text().splitlines()
    assert reqs[0].startswith("torch==") and not any(r.startswith(("mlflow", "optuna", "pytest")) for r in reqs)
    card = (bundle / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "trained from scratch" in card and "## resources on the target machine" in card
    manifest = json.loads((bundle / "MANIFEST.json").read_text(encoding="utf-8"))
    assert manifest["rules"]["passed"] and manifest["projected_min"] is not None
    for rel, meta in manifest["files"].items():
        assert sha256_file(bundle / rel) == meta["sha256"], rel
    # verified where it was assembled, then moved: no file names the staging folder, and its sentinel is gone
    assert {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} == {*manifest["files"], "MANIFEST.json"}
    assert not [p for p in bundle.rglob("*") if p.is_file() and b"bundle.partial-" in p.read_bytes()]
    with zipfile.ZipFile(out["zip"]) as zf:
        names = zf.namelist()
    assert names == sorted(names) and "inference.py" in names and "MANIFEST.json" in names
    assert not any(n.startswith("/") or ".." in n for n in names)


@pytest.mark.parametrize("rule", ["two_llms", "release_date", "licence", "network", "time"])
def test_package_step_refuses_with_the_reason(rule, tiny_models, bm25_kb, tmp_path):
    from fsku.steps.package import PackageRefused, run_step

    model, kb, kw = tiny_models["student"], bm25_kb, {}
    if rule == "two_llms":
        kb = tmp_path / "kb"
        shutil.copytree(bm25_kb, kb)
        shutil.copytree(tiny_models["teacher"], kb / "second_llm")
        expect = "2 LLMs bundled (kb/second_llm, model)"
    elif rule == "release_date":
        model = tmp_path / "m"
        shutil.copytree(tiny_models["student"], model)
        (model / "fsku_tiny.json").unlink()
        kw = dict(base_model="Qwen/Qwen3-4B-Instruct-2507", contenders=str(_contenders(
            tmp_path, "Qwen/Qwen3-4B-Instruct-2507", "apache-2.0", "2025-08-06")))
        expect = "base model Qwen/Qwen3-4B-Instruct-2507 was released 2025-08-06, after the competition cutoff 2025-07-31"
    elif rule == "licence":
        model = tmp_path / "m"
        shutil.copytree(tiny_models["student"], model)
        (model / "fsku_tiny.json").unlink()
        kw = dict(base_model="meta-llama/Llama-3.2-1B", contenders=str(_contenders(
            tmp_path, "meta-llama/Llama-3.2-1B", "llama3.2", "2024-09-25")))
        expect = "base model meta-llama/Llama-3.2-1B: licence 'llama3.2' is not permitted"
    elif rule == "network":
        model = tmp_path / "m"
        shutil.copytree(tiny_models["student"], model)
        (model / "modeling_custom.py").write_text("import requests\n\nURL = 'https://example.invalid'\n")
        expect = "network access in bundled code: model/modeling_custom.py:1: imports requests"
    else:
        kw = dict(verify="current", budget_min=0.0001)
        expect = "exceeds the 0.0001-min budget"
    with pytest.raises(PackageRefused) as err:
        run_step(_cfg(tmp_path, model, kb, **kw), progress=False)
    assert any(expect in p for p in err.value.problems), err.value.problems
    assert expect in str(err.value)
    assert not list((tmp_path / "pkg").glob("*.zip"))
    # the refused bundle is kept aside, clearly named, never as the bundle
    assert not (tmp_path / "pkg" / "bundle").exists() and str(tmp_path / "pkg" / "bundle.refused") in str(err.value)
    manifest = json.loads((tmp_path / "pkg" / "bundle.refused" / "MANIFEST.json").read_text(encoding="utf-8"))
    assert manifest["rules"]["passed"] is False
    assert _beside(tmp_path / "pkg" / "bundle") == ["bundle.refused"]


def _contenders(tmp_path: Path, hub_id: str, licence: str, released: str) -> Path:
    """A user's facts file with one model (the layout of fsku/package/contenders.yaml)."""
    path = tmp_path / "my_models.yaml"
    path.write_text(f"sources:\n  card: {{url: https://huggingface.co/{hub_id}, quote: 'License: {licence}'}}\n"
                    f"models:\n  - hub_id: {hub_id}\n    license: {licence}\n    release_date: {released}\n"
                    "    sources: {license: card, release_date: card}\n", encoding="utf-8")
    return path


def _beside(bundle: Path) -> list[str]:
    return sorted(p.name for p in bundle.parent.iterdir() if p.name.startswith(bundle.name) and p.name != bundle.name)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_package_keeps_the_last_good_bundle(tiny_models, bm25_kb, tmp_path):
    from fsku.outputs import SENTINEL
    from fsku.steps.package import PackageRefused, run_step

    good = run_step(_cfg(tmp_path, tiny_models["student"], bm25_kb), progress=False)
    pkg = tmp_path / "pkg"
    bundle, zip_bytes = _snapshot(pkg / "bundle"), Path(good["zip"]).read_bytes()
    assert SENTINEL not in bundle and SENTINEL not in json.loads(bundle["MANIFEST.json"])["files"]
    model = tmp_path / "m"
    shutil.copytree(tiny_models["student"], model)
    (model / "modeling_custom.py").write_text("import requests\n")
    with pytest.raises(PackageRefused, match="network access in bundled code"):
        run_step(_cfg(tmp_path, model, bm25_kb), progress=False)
    assert _snapshot(pkg / "bundle") == bundle and Path(good["zip"]).read_bytes() == zip_bytes
    assert (pkg / "bundle.refused" / "model" / "modeling_custom.py").exists()
    assert not (pkg / "bundle.refused" / SENTINEL).exists() and _beside(pkg / "bundle") == ["bundle.refused"]
    # the next good run replaces the bundle and drops the stale refused one
    again = run_step(_cfg(tmp_path, tiny_models["student"], bm25_kb), progress=False)
    assert _beside(pkg / "bundle") == [] and again["problems"] == [] and again["bundle"] == str(pkg / "bundle")
    assert json.loads((pkg / "bundle" / "MANIFEST.json").read_text(encoding="utf-8"))["rules"]["passed"]


@pytest.mark.parametrize("where", ["resolve_folder", "copy_code", "verify_bundle"])
def test_an_error_while_packaging_leaves_no_staging_and_the_old_bundle(where, tiny_models, bm25_kb, tmp_path, monkeypatch):
    from fsku.steps import package as P

    P.run_step(_cfg(tmp_path, tiny_models["student"], bm25_kb), progress=False)
    pkg = tmp_path / "pkg"
    before = _snapshot(pkg / "bundle")

    def fail(*args, **kwargs):
        raise OSError(f"{where} failed")

    monkeypatch.setattr(P, where, fail)
    with pytest.raises(OSError, match=f"{where} failed"):
        P.run_step(_cfg(tmp_path, tiny_models["student"], bm25_kb, verify="current"), progress=False)
    assert _snapshot(pkg / "bundle") == before and _beside(pkg / "bundle") == []


def test_bundle_inference_arguments():
    from fsku.package import inference

    a = inference.parse_args(["--test", "t.csv", "--out", "s.csv"])
    assert (a.test, a.out, a.restart, a.timing) == ("t.csv", "s.csv", False, None)
    assert inference.parse_args(["--test", "t.csv", "--out", "s.csv", "--restart", "--timing", "x.json"]).restart
    with pytest.raises(SystemExit):
        inference.parse_args(["--out", "s.csv"])  # --test is required


def test_bundle_inference_answers_a_tiny_bundle(tiny_models, tmp_path, monkeypatch):
    """fsku/package/inference.py (the bundle's inference.py) run on a hand-made bundle: model + settings, no KB."""
    import sys

    from fsku.infer.predict import validate_submission
    from fsku.package import inference

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_models["student"], bundle / "model")
    (bundle / "settings.json").write_text(json.dumps({"backend": "transformers", "device": "cpu", "dtype": "float32",
                                                      "context": "none", "max_new_tokens": 4}), encoding="utf-8")
    test = tmp_path / "test.csv"
    with test.open("w", encoding="utf-8-sig", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows([("ID", "Question"), ("Q1", "옳은 것은?\n1 가\n2 나\n3 다\n4 라"),
                                                        ("Q2", "전자금융거래의 정의를 설명하세요.")])
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "FSKU_MODELS_DIR"):  # main() sets them; restored afterwards
        monkeypatch.setenv(key, os.environ.get(key, ""))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "submission.csv"
    rc = inference.main(["--test", "test.csv", "--out", "submission.csv", "--timing", str(tmp_path / "timing.json")],
                        bundle=bundle)
    assert rc == 0 and validate_submission(out, test) == []
    assert json.loads((tmp_path / "timing.json").read_text())["questions"] == 2
    assert os.environ["FSKU_MODELS_DIR"] == str(bundle / "models") and sys.path[0] == str(bundle / "code")
    assert Path.cwd() == bundle.resolve()  # the KB's embedding model path is bundle-relative


def test_package_config_checks():
    for bad, message in (({"verify": "maybe"}, "verify must be fresh, current or none"),
                         ({"speed_factor": 0}, "speed_factor must be > 0"),
                         ({"cutoff": "July 2025"}, "cutoff must be a date YYYY-MM-DD"),
                         ({"target_python": "three"}, "target_python must be MAJOR.MINOR"),
                         ({"engine": "tpu"}, "engine must be auto, optimized or transformers"),
                         ({"n_descriptive": 600}, "n_descriptive must be <= n_questions"),
                         ({"gpu_memory_gib": 0}, "gpu_memory_gib and disk_gb must be > 0")):
        with pytest.raises(ValueError, match=message):
            PackageConfig(**bad)


def test_a_llamacpp_settings_recipe_is_refused_before_packaging(tmp_path):
    from fsku.steps.package import inference_settings

    settings = tmp_path / "predict.yaml"
    settings.write_text("backend: llamacpp\nthreads: 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="backend llamacpp loads GGUF files"):
        inference_settings(PackageConfig(model="m", kb="k", out=str(tmp_path / "pkg"), settings_recipe=str(settings)))
    settings.write_text("backend: transformers\nthreads: 2\n", encoding="utf-8")
    got = inference_settings(PackageConfig(model="m", kb="k", out=str(tmp_path / "pkg"), settings_recipe=str(settings)))
    assert got["backend"] == "transformers" and got["threads"] == 2
