"""Cache-aside store for retrieval results and answers (diskcache).

Keys are readable so that they can be invalidated by pattern::

    answer|kb=<kb version>|model=<model tag>|cfg=<config hash>|q=<question hash>
    retrieval|kb=<kb version>|cfg=<retrieval config hash>|q=<question hash>

``invalidate("answer|*")`` drops every answer, ``invalidate("*|kb=1a2b*")`` everything computed on
one KB version. An empty directory name gives a no-cache store with the same interface.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
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
        self.directory = directory or None
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
