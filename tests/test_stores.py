"""The answer cache stores JSON, never pickles: a crafted or copied cache folder cannot run code."""
from __future__ import annotations

import json
import pickle
import sqlite3
import subprocess
import sys

import pytest

from fsku.stores import AnswerCache


class _Payload:
    """Unpickling this writes a marker file: proof that a store unpickled what it read."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_json_round_trip_and_invalidate(tmp_path):
    cache = AnswerCache(str(tmp_path / "c"))
    cache.set("answer|kb=1|q=a", {"ID": "Q1", "answer": "3", "hits": [1.5, None]})
    cache.set("retrieval|kb=1|q=a", [[{"chunk_id": "c1", "score": 0.5}], 4])
    cache.set("answer|kb=2|q=b", {"answer": "한글"})
    assert cache.get("answer|kb=1|q=a") == {"ID": "Q1", "answer": "3", "hits": [1.5, None]}
    assert cache.get("retrieval|kb=1|q=a") == [[{"chunk_id": "c1", "score": 0.5}], 4]
    assert cache.get("missing") is None and (cache.hits, cache.misses) == (2, 1)
    assert len(cache) == 3
    assert cache.invalidate("answer|*") == 2 and len(cache) == 1
    cache.close()
    again = AnswerCache(str(tmp_path / "c"))  # persisted
    assert again.get("retrieval|kb=1|q=a") == [[{"chunk_id": "c1", "score": 0.5}], 4]


def test_non_json_value_is_refused_not_pickled(tmp_path):
    cache = AnswerCache(str(tmp_path / "c"))
    with pytest.raises(ValueError, match="not JSON"):
        cache.set("k", {"obj": object()})
    with pytest.raises(ValueError, match="not JSON"):
        cache.set("k", float("nan"))
    assert len(cache) == 0


def test_crafted_pickle_entry_is_never_unpickled(tmp_path):
    folder = tmp_path / "c"
    marker = tmp_path / "pwned"
    AnswerCache(str(folder)).close()
    with sqlite3.connect(folder / AnswerCache.FILENAME) as db:  # someone writes a pickle into the store
        db.execute("INSERT INTO entries VALUES (?, ?)", ("answer|q=x", pickle.dumps(_Payload(marker))))
        db.execute("INSERT INTO entries VALUES (?, ?)", ("answer|q=y", "not json {"))
    cache = AnswerCache(str(folder))
    assert cache.get("answer|q=x") is None and cache.get("answer|q=y") is None
    assert cache.invalidate("answer|*") == 2
    assert not marker.exists()


def test_old_diskcache_folder_is_ignored(tmp_path, caplog):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "cache.db").write_bytes(b"SQLite format 3\x00 pretend diskcache")
    with caplog.at_level("INFO"):
        cache = AnswerCache(str(folder))
    assert cache.get("anything") is None and len(cache) == 0
    assert "old pickle-based" in caplog.text
    assert (folder / "cache.db").read_bytes().startswith(b"SQLite format 3")  # left as it was


def test_disabled_cache_has_the_same_interface():
    cache = AnswerCache(None)
    cache.set("k", {"a": 1})
    assert not cache.enabled and cache.get("k") is None and len(cache) == 0 and cache.invalidate("*") == 0


def test_two_processes_share_one_cache(tmp_path):
    folder = tmp_path / "c"
    code = ("import sys; from fsku.stores import AnswerCache; c = AnswerCache(sys.argv[1]); "
            "[c.set(f'{sys.argv[2]}|{i}', {'i': i}) for i in range(200)]; c.close()")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(folder), name]) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    cache = AnswerCache(str(folder))
    assert len(cache) == 400 and cache.get("b|199") == {"i": 199}
    assert json.loads(json.dumps(cache.get("a|0"))) == {"i": 0}
