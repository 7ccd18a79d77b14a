"""Corpus walking is safe and every file not ingested is accounted for: symlinks never leave the
corpus, loops/dangling links/FIFOs/hidden files are skipped with a reason, per-file caps bound
what one file may cost (pages, characters, chunks), and the reasons reach skipped.jsonl and MLflow."""
import json
import os
import threading
from pathlib import Path

import mlflow
import pytest

from conftest import needs_shared
from fsku.cli import main as cli_main
from fsku.config import BuildKBConfig
from fsku.ingest import SKIP_REASONS, NoUsableDocuments, ingest_corpus, iter_corpus_files
from fsku.kb import build_knowledge_base
from fsku.steps.build_kb import run_step

SECRET = "TOP-SECRET-7f3a9c-비밀번호"
BODY = "# 안내\n\n정상 문서의 본문이다. 전자금융거래의 안전성을 확보한다.\n"


def reasons_by_name(skipped, corpus: Path) -> dict[str, str]:
    return {Path(s.source).relative_to(corpus).as_posix(): s.reason for s in skipped}


def all_text(docs) -> str:
    return "\n".join(d.text + d.title for d in docs)


def make_pdf(path: Path, pages: int, line: str = "Electronic financial transactions must be safe.") -> None:
    import pymupdf

    doc = pymupdf.open()
    for i in range(pages):
        doc.new_page().insert_text((72, 72), f"{line} page {i + 1}", fontsize=11)
    doc.save(path)
    doc.close()


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the corpus holding a secret file and a secret folder."""
    out = tmp_path / "outside"
    (out / "dir").mkdir(parents=True)
    (out / "secret.txt").write_text(SECRET, encoding="utf-8")
    (out / "dir" / "secret.md").write_text(f"# x\n\n{SECRET}", encoding="utf-8")
    return out


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "good.md").write_text(BODY, encoding="utf-8")
    return root


def test_links_out_of_the_corpus_are_not_read(corpus, outside):
    (corpus / "leak.txt").symlink_to(outside / "secret.txt")
    (corpus / "relative.txt").symlink_to(Path("..") / "outside" / "secret.txt")
    (corpus / "leakdir").symlink_to(outside / "dir", target_is_directory=True)
    (corpus / "passwd.txt").symlink_to("/etc/passwd")
    docs, skipped = ingest_corpus(corpus, progress=False)
    assert SECRET not in all_text(docs) and "root:" not in all_text(docs)
    assert [Path(d.source).name for d in docs] == ["good.md"]
    assert reasons_by_name(skipped, corpus) == {name: "symlink_outside_corpus"
                                                for name in ("leak.txt", "relative.txt", "leakdir", "passwd.txt")}
    leak = next(s for s in skipped if s.source.endswith("leak.txt"))
    assert str((outside / "secret.txt").resolve()) in leak.detail  # says where the link pointed


def test_links_inside_the_corpus_are_read_once(corpus):
    (corpus / "sub").mkdir()
    (corpus / "sub" / "rule.md").write_text("# 규정\n\n하위 폴더의 규정 본문이다.", encoding="utf-8")
    (corpus / "a_link.md").symlink_to("good.md")  # sorts before its target: still the duplicate
    (corpus / "only_via_link.txt").symlink_to(Path("sub") / "rule.md")
    (corpus / "a_dirlink").symlink_to("sub", target_is_directory=True)
    docs, skipped = ingest_corpus(corpus, progress=False)
    assert sorted(Path(d.source).relative_to(corpus).as_posix() for d in docs) == ["good.md", "sub/rule.md"]
    assert reasons_by_name(skipped, corpus) == {"a_link.md": "duplicate", "only_via_link.txt": "duplicate",
                                                "a_dirlink": "duplicate"}
    detail = {Path(s.source).name: s.detail for s in skipped}
    assert detail["a_link.md"].endswith("good.md") and "sub" in detail["a_dirlink"]


def test_a_link_read_alone_is_a_document(corpus):
    """An in-corpus link whose target is not read on its own (another extension) is read through the link."""
    (corpus / "notes.data").write_text("링크로만 읽히는 본문이다.", encoding="utf-8")
    (corpus / "notes.txt").symlink_to("notes.data")
    docs, skipped = ingest_corpus(corpus, progress=False)
    assert "링크로만 읽히는 본문" in all_text(docs)
    assert reasons_by_name(skipped, corpus) == {"notes.data": "unsupported_extension"}


def test_symlink_loops_and_dangling_links_end_the_walk(corpus):
    (corpus / "a.txt").symlink_to("b.txt")
    (corpus / "b.txt").symlink_to("a.txt")
    (corpus / "self.md").symlink_to("self.md")
    (corpus / "sub" / "deeper").mkdir(parents=True)
    (corpus / "sub" / "deeper" / "up").symlink_to(Path("..") / "..", target_is_directory=True)
    (corpus / "sub" / "parent").symlink_to("..", target_is_directory=True)
    (corpus / "here").symlink_to(".", target_is_directory=True)
    (corpus / "gone.txt").symlink_to("missing.txt")
    (corpus / "gone_dir").symlink_to(corpus / "no_such_folder", target_is_directory=True)
    docs, skipped = ingest_corpus(corpus, progress=False)
    assert [Path(d.source).name for d in docs] == ["good.md"]
    assert reasons_by_name(skipped, corpus) == {
        "a.txt": "symlink_loop", "b.txt": "symlink_loop", "self.md": "symlink_loop", "here": "symlink_loop",
        "sub/deeper/up": "symlink_loop", "sub/parent": "symlink_loop",
        "gone.txt": "dangling_symlink", "gone_dir": "dangling_symlink"}


def test_fifo_is_never_opened(corpus):
    fifo = corpus / "pipe.txt"
    os.mkfifo(fifo)
    os.mkfifo(corpus / "pipe.unknown")
    (corpus / "to_pipe.md").symlink_to("pipe.txt")
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(out=ingest_corpus(corpus, progress=False)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # a reader blocked in open(); a writer end releases it so the session can finish
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the walk blocked on a FIFO")
    docs, skipped = result["out"]
    assert [Path(d.source).name for d in docs] == ["good.md"]
    assert reasons_by_name(skipped, corpus) == {"pipe.txt": "not_regular_file", "pipe.unknown": "not_regular_file",
                                                "to_pipe.md": "not_regular_file"}
    assert all("FIFO" in s.detail for s in skipped)


def test_hidden_files_and_folders_are_listed(corpus):
    (corpus / ".env.txt").write_text(SECRET, encoding="utf-8")
    git = corpus / ".git" / "objects"
    git.mkdir(parents=True)
    for i in range(50):
        (git / f"{i:02d}.txt").write_text(SECRET, encoding="utf-8")
    (corpus / "sub" / ".cache").mkdir(parents=True)
    (corpus / "sub" / ".cache" / "x.md").write_text(SECRET, encoding="utf-8")
    (corpus / "objects").symlink_to(git, target_is_directory=True)  # inside the corpus, but into a hidden folder
    (corpus / "manifest.csv").write_text("file,title\ngood.md,매니페스트 제목\n", encoding="utf-8")  # metadata, not skipped
    docs, skipped = ingest_corpus(corpus, progress=False)
    assert SECRET not in all_text(docs) and docs[0].title == "매니페스트 제목"
    assert reasons_by_name(skipped, corpus) == {".env.txt": "hidden", ".git": "hidden", "sub/.cache": "hidden",
                                                "objects": "hidden"}  # one line per hidden folder


def test_walk_is_sorted_and_deterministic(corpus):
    for rel in ("b/z.md", "b/a.md", "a.md", "a/b.md", "c.txt"):
        (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
        (corpus / rel).write_text(BODY + rel, encoding="utf-8")
    first = list(iter_corpus_files(corpus))
    assert first == sorted(first) == list(iter_corpus_files(corpus))
    assert [p.relative_to(corpus).as_posix() for p in first] == ["a/b.md", "a.md", "b/a.md", "b/z.md", "c.txt", "good.md"]


def test_json_array_of_10000_elements_is_bounded(corpus):
    (corpus / "records.json").write_text(json.dumps([{"v": i} for i in range(10_000)]), encoding="utf-8")
    (corpus / "nested.json").write_text(json.dumps({"title": "t", "items": [{"v": i} for i in range(10_000)]}),
                                        encoding="utf-8")
    (corpus / "lines.jsonl").write_text("".join(json.dumps({"v": i}) + "\n" for i in range(10_000)), encoding="utf-8")
    (corpus / "numbers.json").write_text(json.dumps(list(range(10_000))), encoding="utf-8")
    docs, skipped = ingest_corpus(corpus, progress=False)
    assert reasons_by_name(skipped, corpus) == {"records.json": "too_many_chunks", "nested.json": "too_many_chunks",
                                                "lines.jsonl": "too_many_chunks"}
    assert "10000 records" in skipped[0].detail
    numbers = next(d for d in docs if d.source.endswith("numbers.json"))
    assert "#" not in numbers.text and "9999" in numbers.text  # one block of values, not a section per value

    cfg = BuildKBConfig(corpus=str(corpus), out=str(corpus.parent / "kb"), embedding_model="none", length_unit="chars",
                        chunk_size=1000, bm25_tokenizer="whitespace", cache_dir=None, register_as=None)
    kb, stats = build_knowledge_base(cfg, progress=False)
    assert len(kb.chunks[kb.chunks["source"].str.endswith("numbers.json")]) < 100  # was 10,000


def test_caps_on_characters_and_records(corpus):
    (corpus / "long.txt").write_text("가나다라마바사아자차 " * 2000, encoding="utf-8")
    # 1.5 KB that renders to 12 KB: the 300-character key is repeated on every line below it
    wide = {"items": [{"k" * 300: {f"f{j}": "v" for j in range(20)}} for _ in range(2)]}
    (corpus / "wide.json").write_text(json.dumps(wide), encoding="utf-8")
    (corpus / "few.jsonl").write_text("".join(json.dumps({"v": f"기록 {i}"}) + "\n" for i in range(4)), encoding="utf-8")
    limits = BuildKBConfig(max_chars_per_file=10_000, max_chunks_per_file=3)
    docs, skipped = ingest_corpus(corpus, progress=False, limits=limits)
    assert reasons_by_name(skipped, corpus) == {"long.txt": "too_many_chars", "wide.json": "too_many_chars",
                                                "few.jsonl": "too_many_chunks"}
    assert [Path(d.source).name for d in docs] == ["good.md"]
    docs, skipped = ingest_corpus(corpus, progress=False)  # the defaults let all of them through
    assert skipped == [] and len(docs) == 4


def test_pdf_page_size_and_character_caps(corpus):
    make_pdf(corpus / "three_pages.pdf", 3)
    make_pdf(corpus / "one_page.pdf", 1, "A short notice.")
    docs, skipped = ingest_corpus(corpus, progress=False, limits=BuildKBConfig(max_pages_per_file=2))
    assert reasons_by_name(skipped, corpus) == {"three_pages.pdf": "too_many_pages"}
    assert skipped[0].detail == "3 pages > max_pages_per_file=2"
    assert sorted(Path(d.source).name for d in docs) == ["good.md", "one_page.pdf"]

    _, skipped = ingest_corpus(corpus, progress=False, limits=BuildKBConfig(max_chars_per_file=100))
    too_long = {Path(s.source).name: s.detail for s in skipped if s.reason == "too_many_chars"}
    assert set(too_long) == {"three_pages.pdf"} and "by page 2 of 3" in too_long["three_pages.pdf"]

    size = (corpus / "three_pages.pdf").stat().st_size
    _, skipped = ingest_corpus(corpus, progress=False, limits=BuildKBConfig(max_pdf_mb=(size - 1) / 2**20))
    assert reasons_by_name(skipped, corpus)["three_pages.pdf"] == "too_large"


def test_default_caps_pass_every_shared_statute():
    import pymupdf

    folder = needs_shared("law-pdf")
    cfg = BuildKBConfig()
    pages = {p: pymupdf.open(p).page_count for p in folder.glob("*.pdf")}
    assert pages and max(pages.values()) * 5 <= cfg.max_pages_per_file  # room for statutes 5x the largest
    assert max(p.stat().st_size for p in pages) / 2**20 * 5 <= cfg.max_pdf_mb
    largest = max(pages, key=pages.get)
    with pymupdf.open(largest) as doc:
        assert sum(len(page.get_text("text")) for page in doc) * 5 <= cfg.max_chars_per_file


def test_a_file_that_cannot_be_read_is_unreadable_not_a_reader_error(corpus, monkeypatch):
    """A PermissionError (any OSError) while reading is `unreadable`; other exceptions stay `reader_error`."""
    import errno

    from fsku.ingest import readers

    real_read = readers.READERS[".md"]

    def read(path, opts):
        if path.name == "locked.md":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        if path.name == "buggy.md":
            raise RuntimeError("reader bug")
        return real_read(path, opts)

    monkeypatch.setitem(readers.READERS, ".md", read)
    (corpus / "locked.md").write_text(BODY + "locked", encoding="utf-8")
    (corpus / "buggy.md").write_text(BODY + "buggy", encoding="utf-8")
    docs, skipped = ingest_corpus(corpus, progress=False)
    assert reasons_by_name(skipped, corpus) == {"locked.md": "unreadable", "buggy.md": "reader_error"}
    assert "Permission denied" in next(s.detail for s in skipped if s.reason == "unreadable")
    assert [Path(d.source).name for d in docs] == ["good.md"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads a mode-000 file anyway")
def test_mode_000_files_are_unreadable(corpus):
    (corpus / "locked.md").write_text(BODY + "locked", encoding="utf-8")
    make_pdf(corpus / "locked.pdf", 1)  # PyMuPDF alone would call it a damaged file (corrupt_pdf)
    for name in ("locked.md", "locked.pdf"):
        (corpus / name).chmod(0)
    try:
        docs, skipped = ingest_corpus(corpus, progress=False)
    finally:
        for name in ("locked.md", "locked.pdf"):
            (corpus / name).chmod(0o644)
    assert reasons_by_name(skipped, corpus) == {"locked.md": "unreadable", "locked.pdf": "unreadable"}
    assert [Path(d.source).name for d in docs] == ["good.md"]


def test_chunk_cap_skips_a_whole_document(corpus):
    (corpus / "good.md").unlink()
    sections = "\n\n".join(f"## 항목 {i}\n항목 {i}의 고유한 설명 문장이다." for i in range(40))
    (corpus / "many.md").write_text("# 긴 문서\n\n" + sections, encoding="utf-8")
    (corpus / "other.md").write_text("# 다른 문서\n\n## 항목 1\n항목 1의 고유한 설명 문장이다.\n\n## 별도\n별도 본문이다.",
                                     encoding="utf-8")
    cfg = BuildKBConfig(corpus=str(corpus), out=str(corpus.parent / "kb"), embedding_model="none", length_unit="chars",
                        chunk_size=200, bm25_tokenizer="whitespace", cache_dir=None, register_as=None,
                        max_chunks_per_file=10)
    kb, stats = build_knowledge_base(cfg, progress=False)
    assert not kb.chunks["source"].str.endswith("many.md").any()
    # other.md shares a chunk body with many.md (dropped as its duplicate at first): it keeps it once many.md is gone
    shared = kb.chunks[kb.chunks["text"].str.contains("항목 1의 고유한")]
    assert len(shared) == 1 and shared["source"].iloc[0].endswith("other.md")
    lines = [json.loads(x) for x in (kb.folder / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(Path(x["source"]).name, x["reason"]) for x in lines] == [("many.md", "too_many_chunks")]
    assert "40 chunks > max_chunks_per_file=10" in lines[0]["detail"]
    assert stats["skipped_by_reason"] == {"too_many_chunks": 1}

    cfg1 = BuildKBConfig(**{**cfg.__dict__, "max_chunks_per_file": 1, "out": str(corpus.parent / "kb1")})
    with pytest.raises(NoUsableDocuments, match="max_chunks_per_file"):
        build_knowledge_base(cfg1, progress=False)


def test_skip_reasons_reach_skipped_jsonl_and_mlflow(corpus, outside):
    (corpus / "leak.txt").symlink_to(outside / "secret.txt")
    (corpus / ".hidden.md").write_text(SECRET, encoding="utf-8")
    (corpus / "z_dup.md").write_text(BODY, encoding="utf-8")
    (corpus / "gone.md").symlink_to("missing.md")
    os.mkfifo(corpus / "pipe.md")
    cfg = BuildKBConfig(corpus=str(corpus), out=str(corpus.parent / "kb"), embedding_model="none", length_unit="chars",
                        chunk_size=300, bm25_tokenizer="whitespace", cache_dir=None, register_as=None)
    result = run_step(cfg, progress=False)
    lines = [json.loads(x) for x in (Path(result["kb"]) / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    expected = {".hidden.md": "hidden", "z_dup.md": "duplicate", "gone.md": "dangling_symlink",
                "leak.txt": "symlink_outside_corpus", "pipe.md": "not_regular_file"}
    assert {Path(x["source"]).name: x["reason"] for x in lines} == expected
    metrics = mlflow.get_run(result["run_id"]).data.metrics
    for reason in SKIP_REASONS:
        assert metrics[f"skipped_{reason}"] == (1 if reason in expected.values() else 0), reason
    assert metrics["skipped"] == 5


def test_cli_ingest_takes_the_caps(corpus, tmp_path, capsys):
    (corpus / "few.jsonl").write_text("".join(json.dumps({"v": f"기록 {i}"}) + "\n" for i in range(4)), encoding="utf-8")
    make_pdf(corpus / "two.pdf", 2)
    out = tmp_path / "docs.jsonl"
    rc = cli_main(["ingest", "--corpus", str(corpus), "--out", str(out), "--max-chunks-per-file", "3",
                   "--max-pages-per-file", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "few.jsonl: too_many_chunks" in printed and "two.pdf: too_many_pages" in printed
    assert [json.loads(x)["title"] for x in out.read_text(encoding="utf-8").splitlines()] == ["안내"]
    assert cli_main(["ingest", "--corpus", str(corpus), "--out", str(out), "--max-pages-per-file", "0"]) == 2


def test_config_checks_the_caps():
    for name in ("max_pdf_mb", "max_pages_per_file", "max_chars_per_file", "max_chunks_per_file"):
        with pytest.raises(ValueError, match=name):
            BuildKBConfig(**{name: 0})
