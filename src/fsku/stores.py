"""Ground-floor stores: a cache-aside key/value cache for retrieval results, answers and teacher
responses (JSON in SQLite), an append-only resumable result log (JSONL), and the `digest` both key on.

Cache keys are readable so that they can be invalidated by pattern::

    answer|kb=<kb version>|model=<model tag>|cfg=<config hash>|q=<question hash>
    retrieval|kb=<kb version>|cfg=<retrieval config hash>|q=<question hash>

``invalidate("answer|*")`` drops every answer, ``invalidate("*|kb=1a2b*")`` everything computed on
one KB version. An empty (or None) directory gives a no-cache store with the same interface; a
relative directory is relative to the project home (`fsku.home.cache_path`).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


def digest(value: Any, n: int = 16) -> str:
    blob = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:n]


def make_key(kind: str, **parts: str) -> str:
    for name, value in parts.items():
        if "|" in str(value):
            raise ValueError(f"cache key part {name}={value!r} must not contain '|'")
    return "|".join([kind] + [f"{k}={v}" for k, v in parts.items()])


class AnswerCache:
    """Cache-aside store of JSON values (retrievals, answers, teacher responses) in one SQLite file,
    ``<directory>/fsku_cache.sqlite``. Values are JSON, never pickles: a cache folder that was
    shared or copied from someone else can hold wrong answers at worst, never code (diskcache, used
    before, unpickled whatever its folder held). Safe for several processes at once (SQLite WAL)."""

    FILENAME = "fsku_cache.sqlite"

    def __init__(self, directory: Optional[str]):
        from .home import cache_path

        resolved = cache_path(directory)
        self.directory = str(resolved) if resolved is not None else None
        self._db: Optional[sqlite3.Connection] = None
        self.hits = self.misses = 0
        if self.directory:
            folder = Path(self.directory)
            folder.mkdir(parents=True, exist_ok=True)
            if (folder / "cache.db").exists():
                log.info("%s: ignoring cache.db (the old pickle-based diskcache format); answers are recomputed", folder)
            self._db = sqlite3.connect(folder / self.FILENAME, timeout=60, isolation_level=None, check_same_thread=False)
            for attempt in range(100):
                # switching a new file to WAL while another process does the same can fail at once with
                # "database is locked" (SQLite does not call the busy handler there): wait and retry
                try:
                    self._db.execute("PRAGMA journal_mode=WAL")
                    self._db.execute("CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or attempt == 99:
                        raise
                    time.sleep(min(0.5, 0.02 * (attempt + 1)))

    @property
    def enabled(self) -> bool:
        return self._db is not None

    def get(self, key: str):
        if self._db is None:
            return None
        row = self._db.execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()
        if row is not None:
            try:  # text only: bytes (a pickle someone wrote here) are never decoded, let alone unpickled
                value = json.loads(row[0]) if isinstance(row[0], str) else None
            except ValueError:
                value = None
            if value is None:
                log.warning("%s: unreadable cache entry %r ignored", self.directory, key[:80])
            else:
                self.hits += 1
                return value
        self.misses += 1
        return None

    def set(self, key: str, value) -> None:
        """Store a JSON-serialisable value (ValueError otherwise: the caller converts its objects)."""
        if self._db is None:
            return
        try:
            blob = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cache value for {key[:80]!r} is not JSON: {exc}") from None
        self._db.execute("INSERT OR REPLACE INTO entries (key, value) VALUES (?, ?)", (key, blob))

    def keys(self) -> list[str]:
        return [] if self._db is None else [k for (k,) in self._db.execute("SELECT key FROM entries")]

    def invalidate(self, pattern: str) -> int:
        """Delete every key matching the shell-style `pattern`; returns how many."""
        if self._db is None:
            return 0
        doomed = [k for k in self.keys() if fnmatch.fnmatchcase(k, pattern)]
        self._db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in doomed])
        log.info("cache: invalidated %d keys matching %r", len(doomed), pattern)
        return len(doomed)

    def __len__(self) -> int:
        return 0 if self._db is None else self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class ResultLog:
    """Append-only JSONL of finished answers with a header naming the run's fingerprint. A run
    started again with the same fingerprint skips the IDs already there."""

    def __init__(self, path: Path, fingerprint: dict, restart: bool = False):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.done: dict[str, dict] = {}
        if restart and self.path.exists():
            self.path.unlink()
        if self.path.exists():
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("w", encoding="utf-8") as fh:
                fh.write(json.dumps({"_header": fingerprint}, ensure_ascii=False) + "\n")

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        if not lines:
            raise ValueError(f"{self.path}: empty partial-results file; delete it to start over")
        header = json.loads(lines[0]).get("_header")
        if header != self.fingerprint:
            raise ValueError(f"{self.path}: holds results of a different run (model/config/input changed); "
                             "delete it or pass --restart")
        for lineno, line in enumerate(lines[1:], start=2):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if lineno == len(lines):  # a line cut by a kill: that row is simply recomputed
                    log.warning("%s: ignoring a truncated last line", self.path)
                    continue
                raise ValueError(f"{self.path}:{lineno}: not valid JSON")
            self.done[rec["ID"]] = rec
        # rewrite without a cut-off tail so appends start on a fresh line
        with self.path.open("w", encoding="utf-8") as fh:
            fh.write(json.dumps({"_header": self.fingerprint}, ensure_ascii=False) + "\n")
            for rec in self.done.values():
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done[record["ID"]] = record
