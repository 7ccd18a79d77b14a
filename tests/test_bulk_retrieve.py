"""fsku.bulk_retrieve: `fsku retrieve` streamed in batches, appended as it goes, resumable."""
import dataclasses
import json

import pytest

from conftest import SAMPLE_CORPUS
from fsku.bulk_retrieve import hit_record, partial_paths, retrieve_file
from fsku.cli import main as fsku_main
from fsku.config import BuildKBConfig, RetrieveConfig, RetrieveRunSettings
from fsku.kb import KnowledgeBase, build_knowledge_base

QUESTIONS = ["망분리란?", "OTP 이체 한도", "금융회사등이 보안사고를 알게 된 때 감독기관 보고 기한",
             "전자금융거래 접근매체 분실 신고", "침해사고 대응 절차", "비밀번호 변경 주기", "개인정보 암호화 저장",
             "공개용 웹서버 취약점 점검", "이상금융거래 탐지", "전자서명 인증서 발급"]


@pytest.fixture(scope="module")
def bm25_kb_folder(tmp_path_factory):
    """The sample corpus as a cheap BM25-only KB (no embedder)."""
    out = tmp_path_factory.mktemp("bulk-kb") / "kb"
    cfg = BuildKBConfig(corpus=str(SAMPLE_CORPUS), out=str(out), embedding_model="none", length_unit="chars",
                        chunk_size=300, cache_dir=None)
    build_knowledge_base(cfg, progress=False)
    return out


_TOKENIZERS = {}


def fresh_kb(folder):
    """A KB of its own per use: the search memo of one run must not answer for another. The BM25
    tokenizer is shared: its word-analysis cache does not change results, only saves Kiwi's time."""
    kb = KnowledgeBase.load(folder)
    if folder not in _TOKENIZERS:
        _TOKENIZERS[folder] = kb.tokenizer()
    kb._tokenizer = _TOKENIZERS[folder]
    return kb


def write_queries(path, questions=QUESTIONS, qids=None):
    qids = list(range(len(questions))) if qids is None else qids
    path.write_text("".join(json.dumps({"qid": i, "question": q}, ensure_ascii=False) + "\n"
                            for i, q in zip(qids, questions, strict=True)), encoding="utf-8")
    return path


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def expected_lines(folder, cfg, questions=QUESTIONS):
    hits = fresh_kb(folder).search(questions, cfg)
    return [{"qid": i, "hits": [hit_record(h) for h in hs]} for i, hs in enumerate(hits)]


def counting(kb, fail_on_call=None):
    """Wrap kb.search: record each batch's questions; raise on call number `fail_on_call` (a kill)."""
    calls = []
    search = kb.search

    def wrapped(questions, cfg=None, **overrides):
        if fail_on_call is not None and len(calls) + 1 == fail_on_call:
            raise KeyboardInterrupt("killed")
        calls.append(list(questions))
        return search(questions, cfg, **overrides)

    kb.search = wrapped
    return calls


def config(**changes):
    return dataclasses.replace(RetrieveConfig(top_k=3, w_bm25=1.0), **changes)


def batches(n: int, restart: bool = False) -> RetrieveRunSettings:
    return RetrieveRunSettings(query_batch=n, restart=restart)


@pytest.mark.parametrize("batch", [1, 3, 100])
def test_results_equal_kb_search_for_any_batch_size(bm25_kb_folder, tmp_path, batch, capsys):
    queries = write_queries(tmp_path / "q.jsonl")
    out = tmp_path / "hits.jsonl"
    kb = fresh_kb(bm25_kb_folder)
    calls = counting(kb)
    stats = retrieve_file(kb, queries, out, config(), progress=True, run=batches(batch))
    assert read_lines(out) == expected_lines(bm25_kb_folder, config())
    assert [len(c) for c in calls] == [len(QUESTIONS[i:i + batch]) for i in range(0, len(QUESTIONS), batch)]
    assert stats["queries"] == stats["searched"] == len(QUESTIONS) and stats["resumed"] == 0
    assert not any(p.exists() for p in partial_paths(out))  # the final file only, no header line
    assert f"{len(QUESTIONS)}/{len(QUESTIONS)}" in capsys.readouterr().err  # the progress bar counted queries


def test_lines_are_appended_per_batch_and_a_killed_run_resumes_without_recomputing(bm25_kb_folder, tmp_path):
    queries = write_queries(tmp_path / "q.jsonl")
    out = tmp_path / "hits.jsonl"
    partial, run_file = partial_paths(out)
    cfg = config()
    kb = fresh_kb(bm25_kb_folder)
    calls = counting(kb, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        retrieve_file(kb, queries, out, cfg, progress=False, run=batches(3))
    want = expected_lines(bm25_kb_folder, config())
    assert read_lines(partial) == want[:6] and run_file.exists() and not out.exists()  # two batches, on disk
    assert len(calls) == 2

    kb = fresh_kb(bm25_kb_folder)
    calls = counting(kb)
    stats = retrieve_file(kb, queries, out, cfg, progress=False, run=batches(2))  # batch size is free
    assert [q for c in calls for q in c] == QUESTIONS[6:]
    assert (stats["resumed"], stats["searched"]) == (6, 4)
    assert read_lines(out) == want and not partial.exists() and not run_file.exists()


@pytest.mark.parametrize("cut", ["half a line", "the newline only"])
def test_a_truncated_last_line_is_recomputed(bm25_kb_folder, tmp_path, cut):
    queries = write_queries(tmp_path / "q.jsonl")
    out = tmp_path / "hits.jsonl"
    partial, _ = partial_paths(out)
    cfg = config()
    kb = fresh_kb(bm25_kb_folder)
    counting(kb, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        retrieve_file(kb, queries, out, cfg, progress=False, run=batches(3))
    data = partial.read_bytes()
    last = data[:-1].rindex(b"\n") + 1
    partial.write_bytes(data[:last + (len(data) - last) // 2] if cut == "half a line" else data[:-1])

    kb = fresh_kb(bm25_kb_folder)
    calls = counting(kb)
    stats = retrieve_file(kb, queries, out, cfg, progress=False, run=batches(3))
    assert [q for c in calls for q in c] == QUESTIONS[5:] and stats["resumed"] == 5
    assert read_lines(out) == expected_lines(bm25_kb_folder, config())


def test_another_runs_partial_results_are_refused_unless_restart(bm25_kb_folder, tmp_path):
    queries = write_queries(tmp_path / "q.jsonl")
    out = tmp_path / "hits.jsonl"
    partial, run_file = partial_paths(out)
    kb = fresh_kb(bm25_kb_folder)
    counting(kb, fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        retrieve_file(kb, queries, out, config(), progress=False, run=batches(4))
    kept = partial.read_bytes()

    with pytest.raises(ValueError, match=r"hits.jsonl.partial.jsonl: holds results of a different run \(retrieval changed\)"):
        retrieve_file(fresh_kb(bm25_kb_folder), queries, out, config(top_k=2), progress=False)
    edited = write_queries(tmp_path / "q.jsonl", [q + "?" for q in QUESTIONS])
    with pytest.raises(ValueError, match=r"different run \(queries changed\)"):
        retrieve_file(fresh_kb(bm25_kb_folder), edited, out, config(), progress=False)
    assert partial.read_bytes() == kept  # refusing leaves the other run's results alone

    kb = fresh_kb(bm25_kb_folder)
    calls = counting(kb)
    stats = retrieve_file(kb, edited, out, config(top_k=2), progress=False, run=RetrieveRunSettings(restart=True))
    assert stats["resumed"] == 0 and sum(len(c) for c in calls) == len(QUESTIONS)
    assert read_lines(out) == expected_lines(bm25_kb_folder, config(top_k=2), [q + "?" for q in QUESTIONS])

    partial.write_text(kept.decode("utf-8"), encoding="utf-8")  # partial results whose run file is gone
    run_file.unlink(missing_ok=True)
    with pytest.raises(ValueError, match="without a readable hits.jsonl.partial.run.json"):
        retrieve_file(fresh_kb(bm25_kb_folder), edited, out, config(), progress=False)


def test_a_damaged_line_before_the_end_is_an_error_naming_it(bm25_kb_folder, tmp_path):
    queries = write_queries(tmp_path / "q.jsonl")
    out = tmp_path / "hits.jsonl"
    partial, _ = partial_paths(out)
    kb = fresh_kb(bm25_kb_folder)
    counting(kb, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        retrieve_file(kb, queries, out, config(), progress=False, run=batches(2))
    lines = partial.read_text(encoding="utf-8").splitlines(keepends=True)
    partial.write_text(lines[0] + lines[1][:20] + "\n" + "".join(lines[2:]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"hits.jsonl.partial.jsonl:2: not a result line"):
        retrieve_file(fresh_kb(bm25_kb_folder), queries, out, config(), progress=False, run=batches(2))


def test_duplicate_qids_are_an_error_before_any_search(bm25_kb_folder, tmp_path):
    queries = write_queries(tmp_path / "q.jsonl", QUESTIONS[:4], qids=["a", 1, "1", "a"])
    out = tmp_path / "hits.jsonl"
    kb = fresh_kb(bm25_kb_folder)
    calls = counting(kb)
    with pytest.raises(ValueError, match=r"q.jsonl:4: duplicate qid 'a' \(first on line 1\)"):
        retrieve_file(kb, queries, out, config(), progress=False)
    assert calls == [] and not any(p.exists() for p in (out, *partial_paths(out)))
    # 1 and "1" are different qids (they are written back as given)
    write_queries(queries, QUESTIONS[:3], qids=["a", 1, "1"])
    retrieve_file(kb, queries, out, config(), progress=False)
    assert [r["qid"] for r in read_lines(out)] == ["a", 1, "1"]


@pytest.mark.parametrize("text, message", [
    ('{"qid": 1, "question": "망분리"}\n{"qid": 2, "question": "OTP\n', r"q.jsonl:2: invalid JSON"),
    ('{"qid": 1, "question": "망분리"}\n\n{"question": "no id"}\n', r"q.jsonl:3: expected \{\"qid\""),
    ('{"qid": 1, "question": "  "}\n', r"q.jsonl:1: expected"),
    ('{"qid": [1], "question": "망분리"}\n', r"q.jsonl:1: expected"),
    ("\n", r"q.jsonl: no queries"),
])
def test_bad_query_lines_name_the_file_and_line(bm25_kb_folder, tmp_path, text, message):
    queries = tmp_path / "q.jsonl"
    queries.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        retrieve_file(fresh_kb(bm25_kb_folder), queries, tmp_path / "hits.jsonl", config(), progress=False)


def test_search_memo_stays_bounded_over_a_stream_of_batches(bm25_kb_folder):
    """On a small KB each memo entry is mostly its question and candidates, not its score array: a
    bound counted in score floats alone would keep every query of a bulk run."""
    kb = fresh_kb(bm25_kb_folder)
    assert len(kb._ids) < 100
    largest = 0
    for b in range(24):  # 6144 distinct questions in batches of 256; no retriever: only the memo is exercised
        kb._candidates([f"질문 {b}-{i}" for i in range(256)], 10, False, False)
        largest = max(largest, len(kb._memo))
    assert largest <= 5_000


def test_cli_retrieve_resumes_refuses_another_run_and_restarts(bm25_kb_folder, tmp_path, capsys):
    queries = write_queries(tmp_path / "q.jsonl")
    out = tmp_path / "hits.jsonl"

    def killed_run():
        kb = fresh_kb(bm25_kb_folder)
        counting(kb, fail_on_call=3)
        with pytest.raises(KeyboardInterrupt):
            retrieve_file(kb, queries, out, config(), progress=False, run=batches(3))

    def retrieve(*flags):
        return fsku_main(["retrieve", "--kb", str(bm25_kb_folder), "--queries", str(queries), "--w-bm25", "1.0",
                          "--out", str(out), "--no-progress", *flags])

    killed_run()  # the KB's own fusion settings with top_k 3: the same run as the command's below
    assert retrieve("--top-k", "2") == 2 and "different run (retrieval changed)" in capsys.readouterr().err
    assert retrieve("--top-k", "3", "--query-batch", "4") == 0
    printed = capsys.readouterr().out
    assert f"wrote 10 result lines to {out} (6 resumed)" in printed
    assert read_lines(out) == expected_lines(bm25_kb_folder, config())

    killed_run()
    assert retrieve("--top-k", "2", "--restart") == 0 and "(6 resumed)" not in capsys.readouterr().out
    assert read_lines(out) == expected_lines(bm25_kb_folder, config(top_k=2))
    assert not any(p.exists() for p in partial_paths(out))
    assert retrieve("--query-batch", "0") == 2 and "query_batch must be >= 1" in capsys.readouterr().err


def test_the_progress_files_never_overwrite_the_queries(tmp_path):
    """--out x with --queries x.partial.jsonl would append results to the queries file: refused before any work."""
    from fsku.bulk_retrieve import retrieve_file
    from fsku.config import RetrieveConfig

    queries = tmp_path / "hits.jsonl.partial.jsonl"
    queries.write_text('{"qid": 1, "question": "전자금융거래"}\n', encoding="utf-8")
    before = queries.read_bytes()

    class NoKB:
        folder = tmp_path / "kb"

        def search(self, *a, **k):  # pragma: no cover - must never be reached
            raise AssertionError("searched")

    with pytest.raises(ValueError, match="--out .* is .*--queries"):
        retrieve_file(NoKB(), queries, tmp_path / "hits.jsonl", RetrieveConfig(kb=str(tmp_path / "kb")), progress=False)
    assert queries.read_bytes() == before


def test_run_control_is_not_a_retrieval_setting():
    """query_batch/restart steer one `fsku retrieve` run; RetrieveConfig (shared by tune, the pyfunc
    model and the KB's defaults) holds only what the hits depend on."""
    run_fields = {f.name for f in dataclasses.fields(RetrieveRunSettings)}
    assert run_fields == {"query_batch", "restart"}
    assert not run_fields & {f.name for f in dataclasses.fields(RetrieveConfig)}
    assert all(f.metadata.get("help") for f in dataclasses.fields(RetrieveRunSettings))
    with pytest.raises(ValueError, match="query_batch must be >= 1"):
        RetrieveRunSettings(query_batch=0)


def test_an_out_folder_is_refused_before_any_work(bm25_kb_folder, tmp_path):
    from fsku.outputs import OutputRefused

    queries = write_queries(tmp_path / "q.jsonl")
    out = tmp_path / "hits"
    out.mkdir()
    (out / "mine.txt").write_text("keep\n")
    kb = fresh_kb(bm25_kb_folder)
    calls = counting(kb)
    with pytest.raises(OutputRefused, match=r"--out .*hits is a folder: give the result file to write"):
        retrieve_file(kb, queries, out, config(), progress=False)
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["hits", "q.jsonl"]
    assert (out / "mine.txt").read_text() == "keep\n"
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    with pytest.raises(OutputRefused, match="is a folder"):  # a link to a folder too
        retrieve_file(kb, queries, link, config(), progress=False)


def test_a_symlinked_out_keeps_its_link(bm25_kb_folder, tmp_path):
    queries = write_queries(tmp_path / "q.jsonl")
    real = tmp_path / "disk" / "hits.jsonl"
    real.parent.mkdir()
    real.write_text("an older result\n", encoding="utf-8")
    link = tmp_path / "hits.jsonl"
    link.symlink_to(real)
    retrieve_file(fresh_kb(bm25_kb_folder), queries, link, config(), progress=False)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert read_lines(real) == expected_lines(bm25_kb_folder, config())
    assert sorted(p.name for p in real.parent.iterdir()) == ["hits.jsonl"]  # no progress files left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "hits.jsonl", "q.jsonl"]
