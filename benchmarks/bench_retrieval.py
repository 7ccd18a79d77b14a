"""Retrieval quality and build speed on the real statutes (../shared/data), all in one run.

Usage:
    python benchmarks/bench_retrieval.py [--corpus ../shared/data/law-pdf]
        [--labels ../shared/data/fsku-benchmark/retrieval_dev.jsonl] [--baseline-sample 256]

Prints, for the 65 labelled FSKU questions (hit = a chunk from the gold statute's PDF containing
the evidence, ignoring whitespace): hit@1, hit@5, MRR@10, mean hit length for
  - seed-naive: the seed design's recipe (400-character splitter, overlap 20, bm25s default tokenizer, BM25 only)
  - bm25-only / dense-only / hybrid (default): our knowledge base with each retriever
and the speed numbers: build-time breakdown; embedding throughput against a plain
sentence-transformers fp32 `encode` of the same model on the same chunks (ratio); a rebuild with
unchanged chunks against the first build (ratio); retrieval latency p50/p95 per query on queries a
freshly loaded KB has not seen (and, as its own line, the memo-hit latency of the same queries).
Quality numbers come with n and 95 % intervals (Wilson for hit rates, bootstrap for MRR), and each
recipe is compared with the default on the same queries (exact McNemar on hit@1, paired bootstrap on
MRR@10).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fsku.chunk import dense_text  # noqa: E402
from fsku.config import BuildKBConfig, RetrieveConfig  # noqa: E402
from fsku.evaluate.compare import format_paired, paired  # noqa: E402
from fsku.evaluate.retrieval import evaluate_retrieval  # noqa: E402
from fsku.index.dense import get_embedder, resolve_model  # noqa: E402
from fsku.kb import build_knowledge_base  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def quality(kb, labels: str, **overrides) -> dict:
    cfg = dataclasses.replace(RetrieveConfig(kb=str(kb.folder), top_k=10), **overrides)
    metrics, table = evaluate_retrieval(kb, labels, cfg)
    return {**{k: metrics[k] for k in ("hit_at_1", "hit_at_5", "mrr_at_10", "mean_hit_chars", "n_queries")},
            "intervals": metrics["intervals"], "rows": table[["qid", "first_relevant_rank"]].to_dict("records")}


def latency(folder, questions: list[str], **overrides) -> dict:
    """Per-query latency on queries this KB instance has not seen: a freshly loaded KB (empty query
    memo; models warmed up on an unrelated query), each question timed once cold, then the same
    questions again (answered from the query memo, timed as their own line)."""
    from fsku.kb import KnowledgeBase

    kb = KnowledgeBase.load(folder)
    kb.search(["전자서명의 효력은 무엇인가?"], top_k=10, **overrides)  # warm-up: tokenizer, embedder, session load

    def timed() -> list[float]:
        times = []
        for q in questions:
            t = time.perf_counter()
            kb.search([q], top_k=10, **overrides)
            times.append((time.perf_counter() - t) * 1000)
        return sorted(times)

    cold, memo = timed(), timed()
    return {"cold_p50_ms": statistics.median(cold), "cold_p95_ms": cold[int(0.95 * (len(cold) - 1))],
            "memo_p50_ms": statistics.median(memo), "n": len(questions)}


def baseline_encode_rate(model_path: str, texts: list[str]) -> float:
    """texts/s of a plain sentence-transformers fp32 encode (default batch size 32)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device="cpu")
    model.encode(texts[:8])
    t = time.perf_counter()
    model.encode(["passage: " + x for x in texts], normalize_embeddings=True)
    return len(texts) / (time.perf_counter() - t)


def ours_encode_rate(cfg: BuildKBConfig, texts: list[str]) -> float:
    emb = get_embedder(cfg.embedding_backend, cfg.embedding_model, max_tokens=cfg.embedding_max_tokens,
                       batch_tokens=cfg.embedding_batch_tokens)
    emb.embed_passages(texts[:8], progress=False)
    t = time.perf_counter()
    emb.embed_passages(texts, progress=False)
    return len(texts) / (time.perf_counter() - t)


def row(name: str, m: dict) -> str:
    def cell(key: str) -> str:
        iv = m["intervals"][key]
        return f"{iv['value']:.3f} [{iv['low']:.2f},{iv['high']:.2f}]"

    return f"{name:<22} {cell('hit_at_1'):>19} {cell('hit_at_5'):>19} {cell('mrr_at_10'):>19} {m['mean_hit_chars']:>9.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(SHARED / "law-pdf"))
    ap.add_argument("--labels", default=str(SHARED / "fsku-benchmark" / "retrieval_dev.jsonl"))
    ap.add_argument("--baseline-sample", type=int, default=256, help="chunks encoded by both embedders for the ratio")
    ap.add_argument("--json", help="also write all numbers to this JSON file")
    args = ap.parse_args()
    if not Path(args.corpus).exists():
        print(f"corpus {args.corpus} not found (../shared absent?)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="fsku-bench-"))
    out: dict = {}
    try:
        naive_cfg = BuildKBConfig(corpus=args.corpus, out=str(work / "naive"), embedding_model="none", length_unit="chars",
                                  chunk_size=400, chunk_overlap=20, statute_mode="never", bm25_tokenizer="bm25s_default")
        naive, _ = build_knowledge_base(naive_cfg, progress=False)
        out["seed-naive"] = quality(naive, args.labels, w_bm25=1.0, w_law=0.0, w_article=0.0)

        cfg = BuildKBConfig(corpus=args.corpus, out=str(work / "kb"), cache_dir=str(work / "cache"))
        t = time.perf_counter()
        kb, stats = build_knowledge_base(cfg, progress=True)
        first_build = time.perf_counter() - t
        out["bm25-only"] = quality(kb, args.labels, w_bm25=1.0)
        out["dense-only"] = quality(kb, args.labels, w_bm25=0.0)
        out["hybrid (default)"] = quality(kb, args.labels)
        out["hybrid rrf"] = quality(kb, args.labels, fusion="rrf")

        t = time.perf_counter()
        _, stats2 = build_knowledge_base(dataclasses.replace(cfg, out=str(work / "kb2")), progress=False)
        rebuild = time.perf_counter() - t

        questions = [json.loads(line)["question"] for line in Path(args.labels).read_text(encoding="utf-8").splitlines()
                     if line.strip()]
        lat = latency(kb.folder, questions)
        lat_bm25 = latency(kb.folder, questions, w_bm25=1.0)

        texts = kb.chunks["text"].tolist()
        sample = random.Random(0).sample(texts, min(args.baseline_sample, len(texts)))
        base_rate = baseline_encode_rate(resolve_model(cfg.embedding_model), sample)
        ours_rate = ours_encode_rate(cfg, [dense_text(t) for t in sample])  # what build_kb embeds per chunk
        engine_rate = ours_encode_rate(cfg, sample)  # same full texts as the baseline
        tm = stats["timings"]
        parse_to_bm25 = sum(tm.get(k, 0.0) for k in ("extract", "clean", "chunk", "tokenize", "bm25_index"))
        out["speed"] = {"timings": tm, "parse_clean_chunk_bm25_s": parse_to_bm25, "first_build_s": first_build,
                        "rebuild_s": rebuild, "rebuild_ratio": rebuild / first_build,
                        "rebuild_embedded_new": stats2["embedded_new"],
                        "embed_texts_per_s": ours_rate, "baseline_texts_per_s": base_rate, "embed_speedup": ours_rate / base_rate,
                        "embed_same_text_per_s": engine_rate, "embed_same_text_speedup": engine_rate / base_rate,
                        "latency_cold_p50_ms": lat["cold_p50_ms"], "latency_cold_p95_ms": lat["cold_p95_ms"],
                        "latency_memo_p50_ms": lat["memo_p50_ms"], "latency_cold_p50_bm25_ms": lat_bm25["cold_p50_ms"],
                        "latency_cold_p95_bm25_ms": lat_bm25["cold_p95_ms"], "latency_queries": lat["n"],
                        "chunks": stats["chunks"], "documents": stats["documents"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nretrieval on {args.labels} ({Path(args.corpus).name}, {out['speed']['documents']} documents, "
          f"{out['speed']['chunks']} chunks)")
    n = out["hybrid (default)"]["n_queries"]
    print(f"n = {n} labelled queries; 95 % intervals: Wilson (hit@k), bootstrap over queries (MRR)")
    print(f"{'recipe':<22} {'hit@1':>19} {'hit@5':>19} {'MRR@10':>19} {'hit chars':>9}")
    for name in ("seed-naive", "bm25-only", "dense-only", "hybrid rrf", "hybrid (default)"):
        print(row(name, out[name]))
    print("\npaired against the default (same queries; hit@1: exact McNemar, MRR@10: paired bootstrap):")
    for name in ("seed-naive", "bm25-only", "dense-only", "hybrid rrf"):
        for metric in ("hit_at_1", "mrr_at_10"):
            res = paired(out[name]["rows"], out["hybrid (default)"]["rows"], metric)
            out.setdefault("paired_vs_default", {}).setdefault(name, {})[metric] = res
            print(f"  {name:<12} {format_paired(res, name, 'default')}")
    s = out["speed"]
    print("\nbuild breakdown (s): " + ", ".join(f"{k}={v:.1f}" for k, v in s["timings"].items()))
    print(f"parse+clean+chunk+BM25: {s['parse_clean_chunk_bm25_s']:.1f} s")
    print(f"embedding ({min(args.baseline_sample, s['chunks'])} sampled chunks): plain sentence-transformers fp32 encode "
          f"{s['baseline_texts_per_s']:.1f} chunks/s; ours {s['embed_texts_per_s']:.1f} chunks/s -> {s['embed_speedup']:.2f}x "
          f"(engine alone on the identical full texts: {s['embed_same_text_per_s']:.1f}/s "
          f"-> {s['embed_same_text_speedup']:.2f}x)")
    print(f"rebuild with unchanged chunks: {s['rebuild_s']:.1f} s vs first build {s['first_build_s']:.1f} s -> "
          f"{100 * s['rebuild_ratio']:.1f}% (embedded {s['rebuild_embedded_new']} new)")
    print(f"retrieval latency, {s['latency_queries']} queries unseen by a freshly loaded KB (empty query memo): hybrid "
          f"p50 {s['latency_cold_p50_ms']:.1f} ms, p95 {s['latency_cold_p95_ms']:.1f} ms; bm25-only p50 "
          f"{s['latency_cold_p50_bm25_ms']:.1f} ms, p95 {s['latency_cold_p95_bm25_ms']:.1f} ms")
    print(f"the same queries again, answered from the query memo: hybrid p50 {s['latency_memo_p50_ms']:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
