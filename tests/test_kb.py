import json

import pandas as pd
import pytest

from conftest import SAMPLE_CORPUS, SAMPLE_LABELS
from fsku.config import BuildKBConfig, RetrieveConfig
from fsku.evaluate.retrieval import evaluate_retrieval
from fsku.kb import KBFormatError, KnowledgeBase, build_knowledge_base


def test_sample_kb_layout_and_manifest(sample_kb):
    kb, stats, cfg = sample_kb
    files = {p.name for p in kb.folder.iterdir()}
    assert {"manifest.json", "chunks.parquet", "documents.parquet", "skipped.jsonl", "bm25", "dense.faiss"} <= files
    m = json.loads((kb.folder / "manifest.json").read_text())
    assert m["params"]["chunk_size"] == cfg.chunk_size and m["stats"]["documents"] == 6
    assert m["embedding"]["fingerprint"] and m["faiss"]["type"] == "flat_ip"
    assert set(stats["timings"]) >= {"extract", "clean", "chunk", "tokenize", "bm25_index", "embed", "faiss_index"}
    assert kb.chunks["n_tokens"].max() <= cfg.chunk_size + 60  # body <= chunk_size, plus the path prefix


def test_sample_retrieval_quality(sample_kb):
    kb, _, _ = sample_kb
    metrics, table = evaluate_retrieval(kb, str(SAMPLE_LABELS), RetrieveConfig(top_k=5))
    assert metrics["hit_at_1"] >= 0.9 and metrics["hit_at_5"] == 1.0
    assert len(table) == 10


@pytest.mark.parametrize("fusion, w", [("minmax", 0.3), ("minmax", 1.0), ("minmax", 0.0), ("rrf", 0.3)])
def test_search_methods(sample_kb, fusion, w):
    kb, _, _ = sample_kb
    hits = kb.search(["금융회사등이 보안사고를 알게 된 때 감독기관 보고 기한"], top_k=3, fusion=fusion, w_bm25=w)[0]
    assert len(hits) == 3 and hits[0].score >= hits[-1].score
    assert {"hybrid": fusion == "minmax" and 0 < w < 1, "bm25": w == 1.0 and fusion == "minmax",
            "dense": w == 0.0 and fusion == "minmax", "rrf": fusion == "rrf"}[hits[0].method]
    assert hits[0].source.endswith(".pdf") and hits[0].rank == 1


def test_rebuild_embeds_nothing_new(sample_kb, tmp_path):
    _, _, cfg = sample_kb
    cfg2 = BuildKBConfig(**{**cfg.__dict__, "out": str(tmp_path / "kb2")})
    kb2, stats = build_knowledge_base(cfg2, progress=False)
    assert stats["embedded_new"] == 0 and stats["chunks"] == len(kb2.chunks)


def test_load_validates_schema(sample_kb, tmp_path):
    kb, _, _ = sample_kb
    with pytest.raises(KBFormatError, match="manifest.json missing"):
        KnowledgeBase.load(tmp_path)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(kb.folder, broken)
    pd.read_parquet(broken / "chunks.parquet").drop(columns=["path"]).to_parquet(broken / "chunks.parquet")
    with pytest.raises(KBFormatError, match=r"chunks.parquet: missing column\(s\) \['path'\]"):
        KnowledgeBase.load(broken)


def test_bm25_only_kb_in_characters(tmp_path):
    cfg = BuildKBConfig(corpus=str(SAMPLE_CORPUS), out=str(tmp_path / "kb"), embedding_model="none",
                        length_unit="chars", chunk_size=300)
    kb, stats = build_knowledge_base(cfg, progress=False)
    assert not kb.has_dense and "embed" not in stats["timings"]
    assert kb.search(["망분리"], top_k=1)[0][0].method == "bm25"
    assert kb.chunks["n_chars"].max() <= 300 + 80


def test_config_range_checks():
    with pytest.raises(ValueError, match="chunk_overlap"):
        BuildKBConfig(chunk_size=100, chunk_overlap=100)
    with pytest.raises(ValueError, match="w_bm25"):
        RetrieveConfig(w_bm25=1.5)
    with pytest.raises(ValueError, match="fusion"):
        RetrieveConfig(fusion="max")


@pytest.mark.parametrize("where", ["embedder", "write"])
def test_a_failed_rebuild_leaves_the_old_kb_and_no_staging(where, tmp_path, monkeypatch):
    import fsku.kb as K

    out = tmp_path / "kb"
    cfg = BuildKBConfig(corpus=str(SAMPLE_CORPUS), out=str(out), embedding_model="none", length_unit="chars",
                        chunk_size=300, cache_dir="")
    build_knowledge_base(cfg, progress=False)
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise RuntimeError(f"{where} failed")

    if where == "embedder":  # a dense rebuild whose embedding model fails to load
        monkeypatch.setattr(K, "resolve_model", lambda name: None)
        monkeypatch.setattr(K, "resolve_backend", lambda name: "torch")
        monkeypatch.setattr(K, "get_embedder", fail)
        cfg = BuildKBConfig(**{**cfg.__dict__, "embedding_model": "some/embedder"})
    else:  # a failure while the staging folder is being written
        monkeypatch.setattr(K.BM25Index, "save", fail)
    with pytest.raises(RuntimeError, match=f"{where} failed"):
        build_knowledge_base(cfg, progress=False)
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kb"]
