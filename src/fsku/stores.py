"""Ground-floor stores: a cache-aside key/value cache for retrieval results, answers and teacher
responses (diskcache), an append-only resumable result log (JSONL), and the `digest` both key on.

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
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)
_MISSING = object()


def digest(value: Any, n: int = 16) -> str:
    blob = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:n]


def make_key(kind: str, **parts: str) -> str:
    for name, value in parts.items():
        if "|" in str(value):
            raise ValueError(f"cache key part {name}={value!r} must not contain '|'")
    return "|".join([kind] + [f"{k}={v}" for k, v in parts.items()])


class AnswerCache:
    def __init__(self, directory: Optional[str]):
        from .home import cache_path

        resolved = cache_path(directory)
        self.directory = str(resolved) if resolved is not None else None
        self._cache = None
        self.hits = self.misses = 0
        if self.directory:
            import diskcache

            self._cache = diskcache.Cache(self.directory)

    @property
    def enabled(self) -> bool:
        return self._cache is not None

    def get(self, key: str):
        if self._cache is None:
            return None
        value = self._cache.get(key, default=_MISSING)
        if value is _MISSING:
            self.misses += 1
            return None
        self.hits += 1
        return value

    def set(self, key: str, value) -> None:
        if self._cache is not None:
            self._cache.set(key, value)

    def invalidate(self, pattern: str) -> int:
        """Delete every key matching the shell-style `pattern`; returns how many."""
        if self._cache is None:
            return 0
        doomed = [k for k in self._cache.iterkeys() if isinstance(k, str) and fnmatch.fnmatchcase(k, pattern)]
        for k in doomed:
            self._cache.delete(k)
        log.info("cache: invalidated %d keys matching %r", len(doomed), pattern)
        return len(doomed)

    def __len__(self) -> int:
        return 0 if self._cache is None else len(self._cache)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()


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
