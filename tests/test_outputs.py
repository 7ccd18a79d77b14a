"""Outputs never equal inputs, and no command destroys a folder it was not asked to write: the helpers
of fsku.outputs, then each command refusing with its inputs and the unrelated files left intact."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE_CORPUS
from fsku.cli import main as fsku_main
from fsku.outputs import (
    SENTINEL,
    Marker,
    OutputRefused,
    begin_staging,
    check_not_input,
    check_replaceable,
    discard_staging,
    relation,
    remove_ours,
    replace_folder,
    sentinel,
    staged_folder,
)

SAMPLE_TEST = ROOT / "evaluation" / "sample_test.csv"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_folder(path: Path) -> Path:
    """A folder the user owns: files, a subfolder, no marker of ours."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes\n", encoding="utf-8")
    (path / "sub" / "data.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(folder: Path, role: str, out: Path, pid: int, **override) -> Path:
    """A staging (`partial`) or set-aside (`old`) folder of `out` as a run of process `pid` leaves it."""
    folder.mkdir()
    (folder / "f.txt").write_text(folder.name)
    info = {**sentinel(role, os.path.realpath(out), pid), **override}
    (folder / SENTINEL).write_text(json.dumps(info), encoding="utf-8")
    return folder


def _beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name and p.name.startswith(out.name))


# ---------------------------------------------------------------- check_not_input

def test_an_output_equal_to_an_input_is_refused(tmp_path):
    test = tmp_path / "test.csv"
    test.write_text("ID,Question\n", encoding="utf-8")
    with pytest.raises(OutputRefused, match=r"--out .*test.csv is the same path as --input .*test.csv: an output must "
                                            r"not be, contain or lie inside an input"):
        check_not_input(test, {"--input": test}, "--out")
    # the same file spelt differently
    with pytest.raises(OutputRefused, match="is the same path as --input"):
        check_not_input(tmp_path / "x" / ".." / "test.csv", {"--input": str(test)}, "--out")


def test_an_output_inside_or_containing_an_input_is_refused(tmp_path):
    corpus = _user_folder(tmp_path / "corpus")
    with pytest.raises(OutputRefused, match=r"--out .*corpus.kb is inside --corpus .*corpus: an output"):
        check_not_input(corpus / "kb", {"--corpus": corpus}, "--out")
    with pytest.raises(OutputRefused, match=r"--out .* contains --corpus .*corpus"):
        check_not_input(tmp_path, {"--corpus": corpus}, "--out")
    with pytest.raises(OutputRefused, match="contains --manifest"):  # a file input inside the output folder
        check_not_input(tmp_path, {"--corpus": None, "--manifest": corpus / "notes.txt"}, "--out")
    with pytest.raises(OutputRefused, match="is inside --gold"):  # one of a list of inputs
        check_not_input(corpus / "sub" / "new.csv", {"--gold": [tmp_path / "other.csv", corpus / "sub"]}, "--out")


def test_symlinks_and_hard_links_are_seen_through(tmp_path):
    corpus = _user_folder(tmp_path / "corpus")
    link = tmp_path / "link"
    link.symlink_to(corpus, target_is_directory=True)
    assert relation(link, corpus) == "is the same path as"
    assert relation(link / "kb", corpus) == "is inside"
    with pytest.raises(OutputRefused, match="is the same path as --corpus"):
        check_not_input(link, {"--corpus": corpus}, "--out")
    hard = tmp_path / "hard.txt"
    os.link(corpus / "notes.txt", hard)
    with pytest.raises(OutputRefused, match="is the same path as --input"):
        check_not_input(hard, {"--input": corpus / "notes.txt"}, "--out")


def test_apart_paths_unset_and_missing_inputs_pass(tmp_path):
    corpus = _user_folder(tmp_path / "corpus")
    check_not_input(tmp_path / "kb", {"--corpus": corpus, "--manifest": None, "--labels": ""}, "--out")
    check_not_input(tmp_path / "corpus2", {"--corpus": corpus}, "--out")  # a shared name prefix is not "inside"
    check_not_input(None, {"--corpus": corpus})
    # a hub id or registry URI is no path to protect ...
    check_not_input(tmp_path, {"--model": "models:/fsku-student@champion", "--teacher": str(tmp_path / "Qwen" / "x")}, "--out")
    # ... but another output of the same command, not written yet, is compared when asked
    with pytest.raises(OutputRefused, match="--records .*sub.csv is the same path as --out"):
        check_not_input(tmp_path / "sub.csv", {"--out": tmp_path / "sub.csv"}, "--records", missing_too=True)


# ---------------------------------------------------------------- replacing folders

def test_an_unrelated_non_empty_folder_is_refused_with_its_files_intact(tmp_path):
    out = _user_folder(tmp_path / "out")
    before = _snapshot(out)
    with pytest.raises(OutputRefused, match=r"--out .*out is a non-empty folder without manifest.json with "
                                            r"'schema_version', so this command did not write it"):
        with staged_folder(out, (Marker("manifest.json", "schema_version"),), "--out") as staging:
            (staging / "manifest.json").write_text('{"schema_version": 1}')
    assert _snapshot(out) == before and _beside(out) == []
    # a manifest.json without the key (a corpus' licence manifest) does not make it ours
    (out / "manifest.json").write_text('[{"file": "a.pdf"}]', encoding="utf-8")
    with pytest.raises(OutputRefused):
        check_replaceable(out, (Marker("manifest.json", "schema_version"),), "--out")
    with pytest.raises(OutputRefused, match="non-empty folder without pyvenv.cfg"):
        remove_ours(out, ("pyvenv.cfg",), "venv")
    assert (out / "sub" / "data.csv").exists()


def test_a_file_where_the_folder_goes_is_refused(tmp_path):
    out = tmp_path / "kb"
    out.write_text("not a folder\n", encoding="utf-8")
    with pytest.raises(OutputRefused, match=r"--out .*kb is a file, not a folder: refusing to replace it"):
        begin_staging(out, ("manifest.json",), "--out")
    assert out.read_text(encoding="utf-8") == "not a folder\n" and _beside(out) == []


def test_our_own_folder_is_replaced_whole_and_an_empty_one_is_written(tmp_path):
    out = tmp_path / "q"
    for n in (1, 2):
        with staged_folder(out, ("info.json",)) as staging:
            assert staging.parent == out.parent.resolve() and staging.name == f"q.partial-{os.getpid()}"
            (staging / "info.json").write_text(json.dumps({"n": n}))
            (staging / f"only_in_{n}.bin").write_bytes(b"x")
        assert json.loads((out / "info.json").read_text()) == {"n": n}
        assert sorted(p.name for p in out.iterdir()) == ["info.json", f"only_in_{n}.bin"]  # nothing of the old one
        assert _beside(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_folder(empty, ("info.json",)) as staging:
        (staging / "info.json").write_text("{}")
    assert (empty / "info.json").exists()


def test_a_failure_while_writing_keeps_the_old_folder_and_drops_the_staging(tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "info.json").write_text('{"old": true}')
    with pytest.raises(RuntimeError, match="boom"):
        with staged_folder(out, ("info.json",)) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert json.loads((out / "info.json").read_text()) == {"old": True} and _beside(out) == []
    # a staging folder without the marker would not be recognised next time: it is not swapped in
    staging = begin_staging(out, ("info.json",))
    with pytest.raises(ValueError, match="holds none of info.json"):
        replace_folder(staging, out, ("info.json",))
    assert json.loads((out / "info.json").read_text()) == {"old": True}


def test_a_symlinked_output_keeps_its_link(tmp_path):
    real = tmp_path / "disk" / "kb"
    real.mkdir(parents=True)
    (real / "info.json").write_text('{"n": 1}')
    link = tmp_path / "kb"
    link.symlink_to(real, target_is_directory=True)
    with staged_folder(link, ("info.json",)) as staging:
        (staging / "info.json").write_text('{"n": 2}')
    assert link.is_symlink() and json.loads((real / "info.json").read_text()) == {"n": 2}
    assert remove_ours(link, ("info.json",)) and link.is_symlink() and list(real.iterdir()) == []


def test_stale_staging_is_removed_only_when_it_is_ours(tmp_path):
    out = tmp_path / "kb"
    dead, alive = _dead_pid(), os.getppid()
    for pid in (dead, os.getpid(), alive):
        _leftover(tmp_path / f"kb.partial-{pid}", "partial", out, pid)
    for name in ("kb.partial", "kb.partial-notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_text(name)
    with staged_folder(out, ("m.json",)) as staging:
        assert json.loads((staging / SENTINEL).read_text())["target"] == os.path.realpath(out)
        (staging / "m.json").write_text("{}")
    # a dead run's and this process' leftovers go; a live run's staging and the user's look-alikes stay
    assert _beside(out) == sorted([f"kb.partial-{alive}", "kb.partial", "kb.partial-notes"])
    assert (tmp_path / "kb.partial" / "f.txt").read_text() == "kb.partial"
    assert sorted(p.name for p in out.iterdir()) == ["m.json"]  # the sentinel does not stay in the output


def test_folders_only_named_like_leftovers_are_never_touched(tmp_path):
    out = tmp_path / "kb"
    dead = _dead_pid()
    # the user's own backups, named like ours but without a sentinel: never deleted, never renamed into out
    for name in ("kb.old-1", f"kb.old-{dead}", "kb.partial-1", f"kb.partial-{dead}"):
        _user_folder(tmp_path / name)
        (tmp_path / name / "m.json").write_text('{"theirs": true}')  # even with our marker in it
    # a sentinel naming another target, or another role, proves nothing either
    _leftover(tmp_path / f"kb.partial-{dead + 1}", "partial", tmp_path / "other", dead + 1)
    _leftover(tmp_path / f"kb.old-{dead + 2}", "partial", out, dead + 2)
    _leftover(tmp_path / f"kb.partial-{dead + 3}", "partial", out, dead + 4)  # not the pid in its name
    before = {name: _snapshot(tmp_path / name) for name in _beside(out)}
    with staged_folder(out, ("m.json",)) as staging:
        (staging / "m.json").write_text('{"new": true}')
    assert json.loads((out / "m.json").read_text()) == {"new": True}
    assert {name: _snapshot(tmp_path / name) for name in _beside(out)} == before


def test_leftovers_of_another_host_are_left_alone(tmp_path, caplog):
    out = tmp_path / "kb"
    dead = _dead_pid()
    partial = _leftover(tmp_path / f"kb.partial-{dead}", "partial", out, dead, host="another-machine")
    old = _leftover(tmp_path / f"kb.old-{dead}", "old", out, dead, host="another-machine")
    (old / "m.json").write_text('{"previous": true}')
    other_ns = _leftover(tmp_path / f"kb.partial-{dead + 1}", "partial", out, dead + 1, pidns="pid:[1]")
    with caplog.at_level("INFO", logger="fsku.outputs"):
        staging = begin_staging(out, ("m.json",))
    # the pid says nothing about a process on another machine or in another container: not removed, not restored
    assert partial.exists() and old.exists() and other_ns.exists() and not out.exists()
    assert f"leaving {partial} alone: written by process {dead} on host 'another-machine'" in caplog.text
    discard_staging(staging)
    assert not staging.exists()


def test_a_swap_interrupted_between_its_renames_is_restored(tmp_path):
    out = tmp_path / "kb"
    dead = _dead_pid()
    old = _leftover(tmp_path / f"kb.old-{dead}", "old", out, dead)
    (old / "m.json").write_text('{"previous": true}')
    staging = begin_staging(out, ("m.json",))  # the previous folder is back before anything else happens
    assert json.loads((out / "m.json").read_text()) == {"previous": True} and not old.exists()
    assert not (out / SENTINEL).exists()
    (staging / "m.json").write_text('{"new": true}')
    replace_folder(staging, out, ("m.json",))
    assert json.loads((out / "m.json").read_text()) == {"new": True} and _beside(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["m.json"]


def test_a_set_aside_folder_without_a_marker_is_not_restored(tmp_path):
    out = tmp_path / "kb"
    dead = _dead_pid()
    old = _leftover(tmp_path / f"kb.old-{dead}", "old", out, dead)  # a sentinel, but none of the markers
    staging = begin_staging(out, ("m.json",))
    assert not out.exists() and (old / "f.txt").exists()
    discard_staging(staging)


def test_a_failed_swap_keeps_the_old_folder_without_a_sentinel(tmp_path, monkeypatch):
    out = tmp_path / "kb"
    out.mkdir()
    (out / "m.json").write_text('{"old": true}')
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith("kb.partial-"):
            raise OSError("disk gone")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        with staged_folder(out, ("m.json",)) as staging:
            (staging / "m.json").write_text('{"new": true}')
    assert sorted(p.name for p in out.iterdir()) == ["m.json"] and json.loads((out / "m.json").read_text()) == {"old": True}
    assert _beside(out) == []


def test_discard_staging_removes_only_this_process_staging(tmp_path):
    out = tmp_path / "kb"
    staging = begin_staging(out, ("m.json",))
    mine = _user_folder(tmp_path / f"kb.partial-{os.getpid() + 1}")
    discard_staging(mine)  # no sentinel: stays
    discard_staging(tmp_path / "missing")
    assert (mine / "notes.txt").exists()
    discard_staging(staging)
    assert not staging.exists()


def test_remove_ours(tmp_path):
    venv = tmp_path / "venv"
    assert not remove_ours(venv, ("pyvenv.cfg",))
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr\n")
    assert remove_ours(venv, ("pyvenv.cfg",)) and not venv.exists()


# ---------------------------------------------------------------- the commands

def _build_kb_args(corpus, out, *extra):
    return ["build-kb", "--corpus", str(corpus), "--out", str(out), "--embedding-model", "none", "--length-unit", "chars",
            "--chunk-size", "300", *extra]


def test_build_kb_refuses_an_unrelated_folder_and_the_corpus_itself(tmp_path, capsys):
    out = _user_folder(tmp_path / "mine")
    before = _snapshot(out)
    assert fsku_main(_build_kb_args(SAMPLE_CORPUS, out)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --out")
    assert "is a non-empty folder without manifest.json" in errors[0]
    assert _snapshot(out) == before and _beside(out) == []

    corpus = tmp_path / "corpus"
    shutil.copytree(SAMPLE_CORPUS, corpus)
    before = _snapshot(corpus)
    for target, what in ((corpus, "is the same path as --corpus"), (corpus / "kb", "is inside --corpus"),
                         (tmp_path, "contains --corpus")):
        assert fsku_main(_build_kb_args(corpus, target)) == 2
        assert what in capsys.readouterr().err
    assert _snapshot(corpus) == before


def test_rebuilding_a_kb_into_its_folder_replaces_it(tmp_path):
    from fsku.config import BuildKBConfig
    from fsku.kb import build_knowledge_base

    out = tmp_path / "kb"
    cfg = BuildKBConfig(corpus=str(SAMPLE_CORPUS), out=str(out), embedding_model="none", length_unit="chars",
                        chunk_size=300, cache_dir=str(tmp_path / "cache"))
    build_knowledge_base(cfg, progress=False)
    (out / "stray.txt").write_text("from the first build")
    dead = _dead_pid()
    _leftover(tmp_path / f"kb.partial-{dead}", "partial", out, dead)  # a build killed earlier
    _user_folder(tmp_path / f"kb.old-{dead}")  # the user's backup, named like ours
    kb, stats = build_knowledge_base(cfg, progress=False)
    assert not (out / "stray.txt").exists() and (out / "manifest.json").exists() and len(kb.chunks) == stats["chunks"]
    assert _beside(out) == [f"kb.old-{dead}"] and (tmp_path / f"kb.old-{dead}" / "notes.txt").exists()
    assert not (out / SENTINEL).exists()


def test_predict_refuses_to_overwrite_its_input(tmp_path, capsys):
    test = tmp_path / "test.csv"
    shutil.copyfile(SAMPLE_TEST, test)
    before = test.read_bytes()
    common = ["--model", str(tmp_path / "no-model-loaded"), "--kb", "none", "--context", "none", "--cache-dir", "none",
              "--no-progress"]
    # the refusal comes before the model loads: a model that does not exist is never reached
    assert fsku_main(["predict", "--input", str(test), "--out", str(test), *common]) == 2
    assert "--out " + str(test) + " is the same path as --input" in capsys.readouterr().err
    assert fsku_main(["predict", "--input", str(test), "--out", str(tmp_path / "s.csv"), "--records", str(test), *common]) == 2
    assert "--records " + str(test) + " is the same path as --input" in capsys.readouterr().err
    sub = tmp_path / "s.csv"
    assert fsku_main(["predict", "--input", str(test), "--out", str(sub), "--records", str(sub), *common]) == 2
    assert "is the same path as --out" in capsys.readouterr().err
    assert test.read_bytes() == before and not sub.exists()

    from fsku.infer.predict import check_outputs

    odd = tmp_path / "x.partial.jsonl"
    shutil.copyfile(SAMPLE_TEST, odd)
    with pytest.raises(OutputRefused, match=r"--out's partial file .* is the same path as --input"):
        check_outputs(odd, tmp_path / "x")
    with pytest.raises(OutputRefused, match="is inside --kb"):
        check_outputs(test, tmp_path / "kb" / "s.csv", kb=str(_user_folder(tmp_path / "kb")))


def test_classify_ingest_and_retrieve_refuse_to_overwrite_their_input(tmp_path, capsys):
    test = tmp_path / "test.csv"
    shutil.copyfile(SAMPLE_TEST, test)
    before = test.read_bytes()
    assert fsku_main(["classify", "--input", str(test), "--out", str(test)]) == 2
    assert "is the same path as --input" in capsys.readouterr().err and test.read_bytes() == before

    corpus = tmp_path / "corpus"
    shutil.copytree(SAMPLE_CORPUS, corpus)
    snap = _snapshot(corpus)
    assert fsku_main(["ingest", "--corpus", str(corpus), "--out", str(corpus / "docs.jsonl")]) == 2
    assert "is inside --corpus" in capsys.readouterr().err and _snapshot(corpus) == snap

    queries = tmp_path / "q.jsonl"
    queries.write_text('{"qid": 1, "question": "망분리"}\n', encoding="utf-8")
    assert fsku_main(["retrieve", "--kb", str(tmp_path / "no-kb"), "--queries", str(queries), "--out", str(queries)]) == 2
    assert "is the same path as --queries" in capsys.readouterr().err
    assert queries.read_text(encoding="utf-8") == '{"qid": 1, "question": "망분리"}\n'


def test_evaluate_refuses_an_out_dir_holding_its_gold(tmp_path):
    from fsku.config import EvaluateConfig
    from fsku.steps.evaluate import run_step

    gold = tmp_path / "qa.csv"
    shutil.copyfile(ROOT / "evaluation" / "sample_qa.csv", gold)
    cfg = EvaluateConfig(model=str(tmp_path / "no-model"), kb=None, context="none", gold=str(gold), out_dir=str(tmp_path))
    with pytest.raises(OutputRefused, match="--out-dir .* contains --gold"):
        run_step(cfg, progress=False)
    assert gold.read_bytes() == (ROOT / "evaluation" / "sample_qa.csv").read_bytes()


def test_quantize_refuses_an_unrelated_out_folder_and_replaces_its_own(tiny_models, tmp_path):
    from fsku import quantize as Q

    pytest.importorskip("torchao")  # the int8 method's backend, checked before anything else
    out = _user_folder(tmp_path / "q")
    before = _snapshot(out)
    with pytest.raises(OutputRefused, match=f"non-empty folder without {Q.QUANT_INFO_FILE}"):
        Q.quantize_model(tiny_models["student"], "int8", out)
    assert _snapshot(out) == before
    with pytest.raises(OutputRefused, match="is inside the source model"):
        Q.quantize_model(tiny_models["student"], "int8", Path(tiny_models["student"]) / "q")
    fresh = tmp_path / "fresh"
    for _ in range(2):  # a re-quantization replaces the earlier one in its folder
        Q.quantize_model(tiny_models["student"], "int8", fresh)
        assert json.loads((fresh / Q.QUANT_INFO_FILE).read_text())["method"] == "int8" and _beside(fresh) == []


def test_distill_refuses_an_unrelated_out_folder_and_one_inside_its_data(tmp_path):
    from fsku.config import DistillConfig
    from fsku.distill.pipeline import distill

    data = tmp_path / "synth"
    data.mkdir()
    (data / "train.jsonl").write_text("", encoding="utf-8")
    out = _user_folder(tmp_path / "out")
    before = _snapshot(out)
    kw = dict(data=str(data), teacher=str(tmp_path / "t"), student=str(tmp_path / "s"), register_as=None, restart=True)
    with pytest.raises(OutputRefused, match="non-empty folder without stats.json or prompts.jsonl"):
        distill(DistillConfig(out=str(out), **kw), progress=False)
    assert _snapshot(out) == before
    with pytest.raises(OutputRefused, match="is inside --data"):
        distill(DistillConfig(out=str(data / "distill"), **kw), progress=False)


def test_package_refuses_an_unrelated_bundle_folder_and_repackages_into_its_own(tiny_models, tmp_path):
    from fsku.config import PackageConfig
    from fsku.steps.package import run_step

    out = tmp_path / "pkg"
    _user_folder(out / "bundle")
    before = _snapshot(out)
    cfg = PackageConfig(model=str(tiny_models["student"]), kb=None, out=str(out), verify="none")
    with pytest.raises(OutputRefused, match="--out bundle folder .*bundle is a non-empty folder without MANIFEST.json"):
        run_step(cfg, progress=False)
    assert _snapshot(out) == before
    shutil.rmtree(out / "bundle")
    _user_folder(out / "verify" / "venv")
    with pytest.raises(OutputRefused, match="verification virtualenv .*venv is a non-empty folder without pyvenv.cfg"):
        run_step(cfg, progress=False)
    shutil.rmtree(out / "verify")
    with pytest.raises(OutputRefused, match="--out .* contains --model"):
        run_step(PackageConfig(model=str(tiny_models["student"]), kb=None, out=str(Path(tiny_models["student"]).parent),
                               verify="none"), progress=False)
    first = run_step(cfg, progress=False)
    (out / "bundle" / "stray.txt").write_text("from the first packaging")
    second = run_step(cfg, progress=False)
    assert first["problems"] == second["problems"] == [] and Path(second["zip"]).exists()
    assert not (out / "bundle" / "stray.txt").exists() and (out / "bundle" / "MANIFEST.json").exists()
    assert _beside(out / "bundle") == []
