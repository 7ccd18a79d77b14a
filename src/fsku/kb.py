"""The knowledge base: one versioned folder holding chunks, a BM25 index and a FAISS index,
described by manifest.json. ``build_knowledge_base`` makes it; ``KnowledgeBase.load`` reads
it back (validating the schema) and ``search`` answers questions with ranked hits.

Folder layout (schema version 1):
    manifest.json     parameters, model id + fingerprint, corpus hashes, counts, timings
    chunks.parquet    chunk_id, doc_id, source, title, path, article, text, n_tokens, n_chars, start_char, page
    documents.parquet doc_id, source, title, doc_type, sha256, n_chars, pages (JSON), license, provenance
    skipped.jsonl     {"source", "reason", "detail"} per unusable file
    bm25/             bm25s index + fsku_bm25.json (tokenizer name)
    dense.faiss       FAISS inner-product index over L2-normalised passage vectors (+ dense.json)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .chunk import addendum_part, chunk_documents, dense_text, make_length_fn
from .config import BuildKBConfig, FusionSettings, RetrieveConfig
from .hierarchy import LEVELS, LINK_COLUMNS, OTHER, kb_links, regulation_parents, validate_links
from .home import cache_path
from .index.dense import build_faiss, embed_with_cache, get_embedder, load_faiss, resolve_backend, resolve_model, save_faiss
from .index.sparse import BM25Index, get_tokenizer
from .ingest import NoUsableDocuments, SkippedFile, ingest_corpus
from .ingest.clean import clean_text
from .outputs import Marker, begin_staging, check_not_input, check_replaceable, discard_staging, replace_folder
from .retrieve import FUSIONS, Hit, ReferenceIndex, expand_links, group_by_article, rank_fused, top_candidates

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CHUNK_COLUMNS = {"chunk_id": "object", "doc_id": "object", "source": "object", "title": "object", "path": "object",
                 "article": "object", "text": "object", "n_tokens": "int", "n_chars": "int", "start_char": "int",
                 "page": "int"}


# what proves a folder is a knowledge base this module wrote (so a rebuild may replace it)
KB_MARKERS = (Marker("manifest.json", "schema_version"),)


class KBFormatError(ValueError):
    pass


def validate_chunks(df: pd.DataFrame, where: str) -> None:
    """The CHUNK_COLUMNS with their types; `level` (the document's statute level), where present, is one
    of hierarchy.LEVELS or 'other' (KBs built before it have no such column)."""
    missing = [c for c in CHUNK_COLUMNS if c not in df.columns]
    if missing:
        raise KBFormatError(f"{where}: missing column(s) {missing}; expected {list(CHUNK_COLUMNS)}")
    if df["chunk_id"].duplicated().any():
        dup = df.loc[df["chunk_id"].duplicated(), "chunk_id"].iloc[0]
        raise KBFormatError(f"{where}: duplicate chunk_id {dup!r}")
    for col, kind in CHUNK_COLUMNS.items():
        if kind == "int" and not pd.api.types.is_integer_dtype(df[col]):
            raise KBFormatError(f"{where}: column {col!r} must be integer, got {df[col].dtype}")
    if "level" in df.columns:
        bad = df.loc[~df["level"].isin((*LEVELS, OTHER)), "level"]
        if len(bad):
            raise KBFormatError(f"{where}: level {bad.iloc[0]!r} is not one of {(*LEVELS, OTHER)}")


def build_knowledge_base(cfg: BuildKBConfig, progress: bool = True) -> tuple["KnowledgeBase", dict]:
    """Run ingest -> chunk -> BM25 -> embeddings/FAISS and write the KB folder to cfg.out.
    Returns the loaded KB and build statistics (counts, timings, skipped reasons)."""
    out = Path(cfg.out)
    # refused before the work, not after it: an output that is an input, or a folder that is not a KB
    check_not_input(out, {"--corpus": cfg.corpus, "--manifest": cfg.manifest, "--user-dict": cfg.user_dict,
                          "--labels": cfg.labels}, "--out")
    check_replaceable(out, KB_MARKERS, "--out")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    docs, skipped = ingest_corpus(cfg.corpus, cfg.manifest, progress=progress, timings=timings, limits=cfg)

    dense = cfg.embedding_model.lower() != "none"
    length_tok = cfg.length_tokenizer or (resolve_model(cfg.embedding_model) if dense else None)
    if cfg.length_unit == "tokens" and not length_tok:
        raise ValueError("length_unit='tokens' needs length_tokenizer when embedding_model is 'none'")
    t = time.perf_counter()
    length = make_length_fn(cfg.length_unit, length_tok)
    cap = cfg.max_chunks_per_file
    oversized: list = []  # documents over the cap are skipped whole (one chunking pass; see chunk_documents)
    chunks, n_dupes = chunk_documents(docs, cfg.chunk_size, cfg.chunk_overlap, length, cfg.statute_mode, progress,
                                      max_chunks_per_doc=cap, oversized=oversized)
    if oversized:
        skipped.extend(SkippedFile(d.source, "too_many_chunks", f"{n} chunks > max_chunks_per_file={cap}")
                       for d, n in oversized)
        dropped = {id(d) for d, _ in oversized}
        docs = [d for d in docs if id(d) not in dropped]
        if not docs:
            raise NoUsableDocuments(f"no usable document in {cfg.corpus}: every document makes more than {cap} chunks "
                                    "(max_chunks_per_file)")
    timings["chunk"] = time.perf_counter() - t
    if not chunks:
        raise ValueError(f"{cfg.corpus}: documents were read but produced no chunks")
    texts = [c.text for c in chunks]

    t = time.perf_counter()
    cache_root = cache_path(cfg.cache_dir)  # a relative cache folder lives in the project home
    tokenizer = get_tokenizer(cfg.bm25_tokenizer, user_dict=cfg.user_dict, workers=cfg.workers,
                              cache_dir=str(cache_root / "tokens") if cache_root else None)
    corpus_tokens = tokenizer(texts)
    if hasattr(tokenizer, "save"):
        tokenizer.save()
    timings["tokenize"] = time.perf_counter() - t
    t = time.perf_counter()
    bm25 = BM25Index.build(corpus_tokens, cfg.bm25_tokenizer, cfg.bm25_k1, cfg.bm25_b)
    timings["bm25_index"] = time.perf_counter() - t

    faiss_info: dict = {}
    n_embedded = 0
    backend = None
    fingerprint = ""
    if dense:
        t = time.perf_counter()
        backend = resolve_backend(cfg.embedding_backend)
        embedder = get_embedder(backend, cfg.embedding_model, max_tokens=cfg.embedding_max_tokens,
                                batch_tokens=cfg.embedding_batch_tokens)
        fingerprint = embedder.fingerprint()
        timings["embed_model_load"] = time.perf_counter() - t
        t = time.perf_counter()
        emb_cache = str(cache_root / "embeddings") if cache_root else None
        vectors, n_embedded = embed_with_cache(embedder, [dense_text(t) for t in texts], emb_cache, progress=progress)
        timings["embed"] = time.perf_counter() - t
        t = time.perf_counter()
        index, faiss_info = build_faiss(vectors, cfg.faiss_ivf_threshold, cfg.faiss_nlist, cfg.faiss_nprobe)
        timings["faiss_index"] = time.perf_counter() - t

    # the folder is written beside out and swapped in whole; on any error it goes and out stays as it was
    staging = begin_staging(out, KB_MARKERS, "--out")
    try:
        if dense:
            save_faiss(index, staging / "dense.faiss", faiss_info)
        bm25.save(staging / "bm25")
        chunk_df = pd.DataFrame([c.to_row() for c in chunks])
        # the statute hierarchy: each document's level, and the references between articles (links.parquet)
        t = time.perf_counter()
        heads = {d.title: d.text[:3000] for d in docs}
        # addenda (부칙) cite articles to say when they commence, not what implements them; their numbering restarts
        body = chunk_df[[not addendum_part(p) for p in chunk_df["path"]]]
        levels, link_rows = kb_links(body[["title", "article", "text"]].to_dict("records"), heads)
        parents = regulation_parents(levels, heads)
        chunk_df["level"] = chunk_df["title"].map(levels)
        validate_chunks(chunk_df, "chunks")
        validate_links(link_rows, "links")
        chunk_df.to_parquet(staging / "chunks.parquet", index=False)
        pd.DataFrame(link_rows, columns=list(LINK_COLUMNS)).to_parquet(staging / "links.parquet", index=False)
        timings["links"] = time.perf_counter() - t
        pd.DataFrame([{k: v for k, v in d.to_row().items() if k != "text"} for d in docs]).to_parquet(
            staging / "documents.parquet", index=False)
        with (staging / "skipped.jsonl").open("w", encoding="utf-8") as fh:
            for s in skipped:
                fh.write(json.dumps(dataclasses.asdict(s), ensure_ascii=False) + "\n")
        timings["total"] = time.perf_counter() - t0

        reasons: dict[str, int] = {}
        for s in skipped:
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
        corpus_hash = hashlib.sha256("".join(sorted(d.sha256 for d in docs)).encode()).hexdigest()
        stats = {
            "documents": len(docs), "chunks": len(chunks), "duplicate_chunks": n_dupes,
            "characters": int(sum(d.n_chars for d in docs)), "chunk_chars_mean": float(np.mean([c.n_chars for c in chunks])),
            "chunk_tokens_mean": float(np.mean([c.n_tokens for c in chunks])), "skipped": len(skipped),
            "skipped_by_reason": reasons, "embedded_new": n_embedded, "timings": timings,
            **{f"documents_{lv}": sum(levels.get(d.title) == lv for d in docs) for lv in (*LEVELS, OTHER)},
            "links_cite": sum(r["kind"] == "cite" for r in link_rows),
            "links_cite_resolved": sum(r["resolved"] for r in link_rows),
            "links_delegates": sum(r["kind"] == "delegates" for r in link_rows),
        }
        manifest = {
            "schema_version": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "params": dataclasses.asdict(cfg), "embedding": {
                "model": cfg.embedding_model if dense else None, "backend": backend if dense else None,
                "fingerprint": fingerprint, "max_tokens": cfg.embedding_max_tokens},
            "faiss": faiss_info, "length_tokenizer": length_tok, "corpus_sha256": corpus_hash,
            "documents": [{"source": d.source, "sha256": d.sha256, "title": d.title, "license": d.license,
                           "level": levels.get(d.title, OTHER),
                           **({"parent": parents[d.title]} if d.title in parents else {})} for d in docs],
            "stats": stats,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        replace_folder(staging, out, KB_MARKERS, "--out")  # the KB appears whole or not at all
    except BaseException:
        discard_staging(staging)
        raise
    return KnowledgeBase.load(out), stats


class KnowledgeBase:
    """A loaded knowledge base. The BM25 tokenizer and the embedder load on first use."""

    def __init__(self, folder: Path, manifest: dict, chunks: pd.DataFrame, bm25: BM25Index, faiss_index=None):
        self.folder, self.manifest, self.chunks = folder, manifest, chunks
        self.bm25, self.faiss_index = bm25, faiss_index
        self._tokenizer = None
        self._embedder = None
        self._texts = chunks["text"].tolist()
        self._ids = chunks["chunk_id"].tolist()
        self._sources = chunks["source"].tolist()
        self._paths = chunks["path"].tolist()
        titles, articles = chunks["title"].tolist(), chunks["article"].tolist()
        # an addendum (부칙) restarts the numbering: its 제1조 is not the body's 제1조, and a question citing
        # '제1조' means the body's, so addenda get their own article keys and no citation entries
        addenda = [addendum_part(p) for p in self._paths]
        self._references = ReferenceIndex(titles, [a if not part else "" for a, part in zip(articles, addenda, strict=True)],
                                          self.parents(), chunks["level"].tolist() if "level" in chunks.columns else None)
        self._article_keys = [((t, a) if not part else (t, part, a)) if a else None
                              for t, a, part in zip(titles, articles, addenda, strict=True)]
        self._linked: Optional[dict[tuple, list[int]]] = None
        self._memo: dict[tuple, tuple] = {}

    @classmethod
    def load(cls, folder: str | Path) -> "KnowledgeBase":
        folder = Path(folder)
        mpath = folder / "manifest.json"
        if not mpath.exists():
            raise KBFormatError(f"{folder}: not a knowledge base (manifest.json missing); build one with `fsku build-kb`")
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise KBFormatError(f"{mpath}: schema_version {manifest.get('schema_version')} != {SCHEMA_VERSION}")
        chunks = pd.read_parquet(folder / "chunks.parquet")
        validate_chunks(chunks, str(folder / "chunks.parquet"))
        bm25 = BM25Index.load(folder / "bm25")
        faiss_index = load_faiss(folder / "dense.faiss") if (folder / "dense.faiss").exists() else None
        return cls(folder, manifest, chunks, bm25, faiss_index)

    def links(self) -> pd.DataFrame:
        """The KB's reference table (hierarchy.LINK_COLUMNS; empty for a KB built before it existed)."""
        path = self.folder / "links.parquet"
        if not path.exists():
            return pd.DataFrame(columns=list(LINK_COLUMNS))
        table = pd.read_parquet(path)
        try:
            validate_links(table.to_dict("records"), str(path))
        except ValueError as e:
            raise KBFormatError(str(e)) from None
        return table

    def linked_articles(self, title: str, article: str) -> dict[str, list[tuple[str, str]]]:
        """Articles of this KB linked to (title, article): {"cites": the articles it refers to,
        "cited_by": the articles that refer to it (e.g. the decree article implementing an act's)}."""
        t = self.links()
        t = t[t["resolved"]]
        cites = t[(t["source_title"] == title) & (t["source_article"] == article)]
        cited_by = t[(t["target_title"] == title) & (t["target_article"] == article)]
        return {"cites": sorted(set(zip(cites["target_title"], cites["target_article"], strict=True))),
                "cited_by": sorted(set(zip(cited_by["source_title"], cited_by["source_article"], strict=True)))}

    def parents(self) -> dict[str, str]:
        """{regulation title: the act it implements} from the manifest (empty for a KB built before it)."""
        return {d["title"]: d["parent"] for d in self.manifest.get("documents", []) if d.get("parent")}

    def linked_chunks(self, i: int) -> list[int]:
        """Chunk indices of the articles that chunk i's article cites or is cited by (resolved links of
        links.parquet; none for a KB without it)."""
        if self._linked is None:
            t = self.links()
            t = t[t["resolved"] & (t["kind"] == "cite")]
            by_article = self._references.by_article
            linked: dict[tuple, set] = {}
            for src, dst in zip(zip(t["source_title"], t["source_article"], strict=True),
                                zip(t["target_title"], t["target_article"], strict=True), strict=True):
                if src != dst:
                    linked.setdefault(src, set()).add(dst)
                    linked.setdefault(dst, set()).add(src)
            self._linked = {k: sorted(j for a in v for j in by_article.get(a, ())) for k, v in linked.items()}
        key = self._article_keys[i]
        return self._linked.get(key, []) if key else []

    @property
    def params(self) -> dict:
        return self.manifest["params"]

    @property
    def has_dense(self) -> bool:
        return self.faiss_index is not None

    def tokenizer(self):
        if self._tokenizer is None:
            p = self.params
            self._tokenizer = get_tokenizer(p["bm25_tokenizer"], user_dict=p.get("user_dict"), workers=p.get("workers", 2))
        return self._tokenizer

    def embedder(self):
        if self._embedder is None:
            emb = self.manifest["embedding"]
            self._embedder = get_embedder(emb["backend"], emb["model"], max_tokens=emb["max_tokens"],
                                          batch_tokens=self.params["embedding_batch_tokens"])
            if self._embedder.fingerprint() != emb["fingerprint"]:
                log.warning("embedder fingerprint %s differs from the KB's %s: query vectors may not match",
                            self._embedder.fingerprint(), emb["fingerprint"])
        return self._embedder

    def _candidates(self, questions: list[str], k_cand: int, use_bm25: bool, use_dense: bool) -> list[tuple]:
        """(full BM25 score array or None, {retriever: (ids, scores)}) per question. Memoised: the
        query side does not depend on fusion settings, so re-ranking the same questions with other
        weights (a tuning trial) costs only the fusion. Bounded to ~5 M floats (20 MB), or one call's
        questions if more: each entry counts as its score array plus 1024 floats for its question key
        and candidate arrays (3.6 KB measured for an 800-character question), which dominate on a
        small KB, so a stream of many calls (fsku retrieve) stays bounded too."""
        keys = [(q, k_cand, use_bm25, use_dense) for q in questions]
        todo_q = list(dict.fromkeys(key[0] for key in keys if key not in self._memo))
        if len(self._memo) + len(todo_q) > max(64, 5_000_000 // (len(self._ids) + 1024)):
            self._memo.clear()
            todo_q = list(dict.fromkeys(questions))
        if todo_q:
            q_tokens = self.tokenizer()(todo_q) if use_bm25 else [[] for _ in todo_q]
            q_vecs = self.embedder().embed_queries(todo_q) if use_dense else None
            for qi, q in enumerate(todo_q):
                cands: dict[str, tuple[np.ndarray, np.ndarray]] = {}
                bm25_all = self.bm25.scores(q_tokens[qi]) if use_bm25 else None
                if use_bm25:
                    cands["bm25"] = top_candidates(bm25_all, k_cand)
                if use_dense:
                    sims, ids = self.faiss_index.search(q_vecs[qi:qi + 1], k_cand)
                    keep = ids[0] >= 0
                    cands["dense"] = (ids[0][keep], sims[0][keep])
                self._memo[(q, k_cand, use_bm25, use_dense)] = (bm25_all, cands)
        return [self._memo[key] for key in keys]

    def retrieve_defaults(self) -> RetrieveConfig:
        """The retrieval settings the KB was built (or tuned) with: fusion, weights and priors from its
        manifest, RetrieveConfig's defaults for anything an older manifest lacks."""
        keys = [f.name for f in dataclasses.fields(FusionSettings)]
        return RetrieveConfig(kb=str(self.folder), **{k: self.params[k] for k in keys if k in self.params})

    def search(self, questions: Sequence[str], cfg: Optional[RetrieveConfig] = None, **overrides) -> list[list[Hit]]:
        """Ranked hits per question (settings: `cfg`, else the KB's own defaults, then `overrides`).
        BM25-only when the KB has no dense index or w_bm25 == 1."""
        cfg = dataclasses.replace(cfg or self.retrieve_defaults(), **overrides)
        questions = [clean_text(q) for q in questions]
        use_dense = self.has_dense and not (cfg.fusion == "minmax" and cfg.w_bm25 >= 1.0)
        use_bm25 = not (cfg.fusion == "minmax" and cfg.w_bm25 <= 0.0)
        k_cand = min(cfg.candidates, len(self._ids))
        per_question = self._candidates(questions, k_cand, use_bm25, use_dense)
        results = []
        for qi in range(len(questions)):
            bm25_all, cands = per_question[qi]
            cands = dict(cands)
            if cfg.fusion == "rrf":
                fused = FUSIONS["rrf"]({k: v[0] for k, v in cands.items()}, k=cfg.rrf_k)
                method = "rrf" if len(cands) > 1 else next(iter(cands))
                prior_scale = 1.0 / (cfg.rrf_k + 1)  # the prior in units of a first-rank RRF vote
            else:
                fused = FUSIONS["minmax"](cands, {"bm25": cfg.w_bm25, "dense": 1.0 - cfg.w_bm25})
                method = "hybrid" if len(cands) > 1 else next(iter(cands))
                prior_scale = 1.0
            if cfg.w_law or cfg.w_article or cfg.w_level:
                prior, cited = self._references.prior_and_cited(questions[qi], cfg.w_law, cfg.w_article,
                                                                cfg.statute_family, cfg.w_level, cfg.family_share)
                for i, p in prior.items():
                    # the law and level priors re-rank candidates; a cited article may also enter the candidates
                    if i in fused or i in cited:
                        fused[i] = fused.get(i, 0.0) + prior_scale * p
            if cfg.w_link:
                fused = expand_links(fused, self.linked_chunks, cfg.w_link, cfg.link_from)
            raw = {name: dict(zip(ids.tolist(), scores.tolist(), strict=True)) for name, (ids, scores) in cands.items()}
            dense_floor = float(cands["dense"][1].min()) if use_dense and len(cands["dense"][1]) else None
            hits = []
            if cfg.group == "article":
                ranked = group_by_article(fused, self._article_keys.__getitem__, cfg.sibling_bonus,
                                          cfg.article_chunks)[:cfg.top_k]
            else:
                ranked = rank_fused(fused, cfg.top_k)
            for rank, (i, score) in enumerate(ranked, start=1):
                hits.append(Hit(self._ids[i], self._texts[i], float(score), self._sources[i], method, self._paths[i], rank,
                                dense=raw.get("dense", {}).get(i, dense_floor),
                                bm25=float(bm25_all[i]) if bm25_all is not None else None))
            results.append(hits)
        return results
