"""Bulk retrieval (`fsku retrieve`): every line of a queries JSONL -> one line of ranked hits, streamed
in batches and resumable.

For ``--out hits.jsonl`` the run keeps its progress beside the output, like predict:

    hits.jsonl.partial.jsonl   result lines of the finished batches, in input order, already in the
                               final format (appended and fsync'd batch by batch)
    hits.jsonl.partial.run.json  the run's fingerprint: KB manifest digest, retrieval settings, the
                               queries file's sha256 and size
    hits.jsonl                 appears only when every query is done (the partial file renamed), so
                               it never holds half a run and has no header line for readers to skip

The same command after a kill checks the fingerprint and continues after the last complete line (a
line cut by the kill is dropped and recomputed); a different run's partial results are refused
unless ``restart``. Memory is bounded by one batch of queries and hits, plus one small entry per qid
(duplicate detection) and the KB's own search memo (bounded in ``KnowledgeBase._candidates``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from .config import FusionSettings, RetrieveConfig, RetrieveRunSettings
from .jsonl import iter_jsonl
from .outputs import OutputRefused, check_not_input
from .stores import digest

log = logging.getLogger(__name__)

FORMAT = 1  # of the result lines and the run file; a change here makes old partial results another run's


def partial_paths(out: str | Path) -> tuple[Path, Path]:
    """(<out>.partial.jsonl, <out>.partial.run.json)."""
    out = Path(out)
    return out.with_name(out.name + ".partial.jsonl"), out.with_name(out.name + ".partial.run.json")


def scan_queries(path: str | Path) -> int:
    """Check every line before any work (streaming; only the qids are kept): returns the number of
    queries. A bad line, or a qid seen before, raises ValueError naming ``<file>:<line>``."""
    path = Path(path)
    seen: dict[tuple, int] = {}
    for lineno, row in iter_jsonl(path):
        qid = row.get("qid")
        if not isinstance(qid, (str, int, float)) or isinstance(qid, bool) or not str(row.get("question", "")).strip():
            raise ValueError(f'{path}:{lineno}: expected {{"qid": <string or number>, "question": "..."}}')
        key = (type(qid), qid)  # 1 and "1" are different qids in the output, so here too
        if key in seen:
            raise ValueError(f"{path}:{lineno}: duplicate qid {qid!r} (first on line {seen[key]}); qids must be unique")
        seen[key] = lineno
    if not seen:
        raise ValueError(f"{path}: no queries")
    return len(seen)


def file_identity(path: Path) -> dict:
    """sha256 and size of a file, read in blocks (a queries file may be larger than memory)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"sha256": h.hexdigest(), "bytes": path.stat().st_size}


def run_fingerprint(kb, queries: Path, cfg: RetrieveConfig) -> dict:
    """What the result lines depend on. Not query_batch: a query's hits do not depend on its batch,
    so a resumed run may use another batch size."""
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(FusionSettings)}
    return {"format": FORMAT, "kb_manifest": digest(kb.manifest),
            "retrieval": {**settings, "top_k": cfg.top_k, "candidates": cfg.candidates},
            "queries": file_identity(queries)}


def _complete_lines(partial: Path) -> tuple[int, object]:
    """(number of complete result lines, qid of the last one). A last line without its newline or
    not valid JSON (cut by a kill) is cut off the file, so appends start on a fresh line; an invalid
    line before the end is an error."""
    size = partial.stat().st_size
    n, end, last_qid = 0, 0, None
    with partial.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                rec = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                rec = None
            if not (isinstance(rec, dict) and "qid" in rec and "hits" in rec):
                if end + len(line) == size:
                    log.warning("%s:%d: ignoring a truncated last line (recomputed)", partial, lineno)
                    break
                raise ValueError(f"{partial}:{lineno}: not a result line; delete the file or pass --restart")
            n, end, last_qid = n + 1, end + len(line), rec["qid"]
    if end < size:
        with partial.open("r+b") as fh:
            fh.truncate(end)
    return n, last_qid


def _resume(partial: Path, run_file: Path, fingerprint: dict, restart: bool) -> tuple[int, object]:
    """(lines already done, last done qid) after checking that the partial results are this run's."""
    if restart:
        partial.unlink(missing_ok=True)
        run_file.unlink(missing_ok=True)
    if partial.exists():
        try:
            saved = json.loads(run_file.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError):
            raise ValueError(f"{partial}: partial results without a readable {run_file.name}; delete them or pass "
                             "--restart") from None
        if saved != fingerprint:
            changed = sorted(k for k in fingerprint if not isinstance(saved, dict) or saved.get(k) != fingerprint[k])
            raise ValueError(f"{partial}: holds results of a different run ({', '.join(changed)} changed); delete it "
                             "or pass --restart")
        return _complete_lines(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    tmp = run_file.with_name(run_file.name + ".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint}, ensure_ascii=False, indent=1), encoding="utf-8")
    tmp.replace(run_file)  # the fingerprint exists before the first result line
    partial.touch()
    return 0, None


def hit_record(h) -> dict:
    return {"chunk_id": h.chunk_id, "source": h.source, "text": h.text, "score": h.score, "path": h.path,
            "method": h.method}


def retrieve_file(kb, queries: str | Path, out: str | Path, cfg: RetrieveConfig, progress: bool = True,
                  run: RetrieveRunSettings | None = None) -> dict:
    """Ranked hits for every line ``{"qid", "question"}`` of `queries` into `out`, one line
    ``{"qid", "hits": [{chunk_id, source, text, score, path, method}]}`` per query in input order.

    The queries file is checked whole first (a bad line or duplicate qid fails before any search,
    naming file:line), then read again lazily: `run.query_batch` queries at a time go through
    ``kb.search(batch, cfg)`` and their lines are appended to ``<out>.partial.jsonl`` (flushed and
    fsync'd) as each batch finishes; a tqdm bar counts queries. When all are done the partial file is
    renamed to `out` (replacing an older one), so `out` is complete or absent. The fingerprint
    (``run_fingerprint``) sits in ``<out>.partial.run.json``; a run started again with the same one
    resumes after the last complete line, another run's partial results are refused unless
    `run.restart` (`run`: RetrieveRunSettings, default its defaults). An `out` that is a folder is
    refused before any work; a symlinked `out` stays a link (the file it points to is written, its
    progress files beside that). Returns counts and timings."""
    from tqdm.auto import tqdm

    queries, out = Path(queries), Path(out)
    if out.is_dir():  # refused now, not by the rename after all the work
        raise OutputRefused(f"--out {out} is a folder: give the result file to write, e.g. {out / 'hits.jsonl'}")
    if out.is_symlink():  # the link stays a link: the result (and its progress files) go where it points
        out = Path(os.path.realpath(out))
    partial, run_file = partial_paths(out)
    for path in (out, partial, run_file):  # neither the result nor its progress files may overwrite an input
        check_not_input(path, {"--queries": queries, "--kb": getattr(kb, "folder", None)}, "--out")
    t0 = time.perf_counter()
    total = scan_queries(queries)
    fingerprint = run_fingerprint(kb, queries, cfg)
    run = run or RetrieveRunSettings()
    done, last_qid = _resume(partial, run_file, fingerprint, run.restart)
    if done > total:
        raise ValueError(f"{partial}: {done} result lines for {total} queries; delete it or pass --restart")
    if done:
        log.info("%s: resuming after %d of %d queries", partial, done, total)
    t1 = time.perf_counter()
    searched = 0
    with partial.open("a", encoding="utf-8") as fh, \
            tqdm(total=total, initial=done, desc="retrieve", unit="q", disable=not progress) as bar:
        batch: list[tuple[object, str]] = []

        def flush() -> None:
            hits = kb.search([q for _, q in batch], cfg)
            fh.write("".join(json.dumps({"qid": qid, "hits": [hit_record(h) for h in hs]}, ensure_ascii=False) + "\n"
                             for (qid, _), hs in zip(batch, hits, strict=True)))
            fh.flush()
            os.fsync(fh.fileno())  # a batch reported done survives a crash of the machine too
            bar.update(len(batch))
            batch.clear()

        for i, (lineno, row) in enumerate(iter_jsonl(queries)):
            if i < done:
                if i == done - 1 and row["qid"] != last_qid:
                    raise ValueError(f"{partial}: line {done} is qid {last_qid!r} but {queries}:{lineno} is "
                                     f"{row['qid']!r}; delete it or pass --restart")
                continue
            batch.append((row["qid"], str(row["question"])))
            searched += 1
            if len(batch) >= run.query_batch:
                flush()
        if batch:
            flush()
    partial.replace(out)
    run_file.unlink(missing_ok=True)
    search_s = time.perf_counter() - t1
    stats = {"queries": total, "resumed": done, "searched": searched, "check_s": t1 - t0, "search_s": search_s,
             "queries_per_s": searched / search_s if search_s > 0 else 0.0}
    log.info("%s: %d result lines (%d resumed, %d searched, %.1f queries/s)", out, total, done, searched,
             stats["queries_per_s"])
    return stats
