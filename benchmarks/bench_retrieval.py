"""Retrieval quality and build speed on the real statutes (../shared/data), all in one run.

Usage:
    python benchmarks/bench_retrieval.py [--corpus ../shared/data/law-pdf]
        [--labels ../shared/data/fsku-benchmark/retrieval_dev.jsonl] [--baseline-sample 256]
        [--level-set-per-level 40 --level-set-seed 0]
        [--llm-rerankers offline:qwen2.5-coder-0.5b-instruct,offline:qwen2.5-coder-1.5b-instruct --rerank-queries 40]

Two question sets: the 65 labelled FSKU dev questions (hit = a chunk from the gold statute's PDF
containing the evidence, ignoring whitespace) and the per-level validation set that `fsku level-set`
writes from the same KB (fsku.synth.levelset: questions on acts, decrees, the rule and regulations,
paraphrased, without article numbers; seed --level-set-seed, the set settings are chosen on), and a
held-out set by the same rules on the articles the first leaves out (seed --held-out-seed: what a
choice made on the first is worth), both reported overall and by level. For each: hit@1, hit@5, MRR@10,
mean hit length, for
  - seed-naive: the seed design's recipe (400-character splitter, overlap 20, bm25s default tokenizer, BM25 only)
  - bm25-only / dense-only / hybrid rrf: our knowledge base with each retriever
  - previous default: the fusion settings before the statute hierarchy (PREVIOUS_DEFAULT)
  - each hierarchy component alone on top of it (family law prior, level cues, linked articles,
    article grouping, the BM25 weight), the llm reranker with each model named (on --rerank-queries
    questions of each set, timed per query), and the new default (RetrieveConfig's defaults)
and the speed numbers: build-time breakdown (with the link parsing); embedding throughput against a
plain sentence-transformers fp32 `encode` of the same model on the same chunks (ratio); a rebuild with
unchanged chunks against the first build (ratio); retrieval latency p50/p95 per query on queries a
freshly loaded KB has not seen (and, as its own line, the memo-hit latency of the same queries).
Quality numbers come with n and 95 % intervals (Wilson for hit rates, bootstrap for MRR), and each
recipe is compared with the previous default on the same queries (exact McNemar on hit@1, paired
bootstrap on MRR@10).
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
from fsku.config import BuildKBConfig, LevelSetConfig, RerankSettings, RetrieveConfig  # noqa: E402
from fsku.evaluate.compare import format_paired, intervals, paired  # noqa: E402
from fsku.evaluate.retrieval import evaluate_retrieval  # noqa: E402
from fsku.index.dense import get_embedder, resolve_model  # noqa: E402
from fsku.kb import build_knowledge_base  # noqa: E402
from fsku.synth.levelset import build_level_set, excluded_articles  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
LEVELS = ("act", "decree", "rule", "regulation")
# the fusion settings before the statute hierarchy (issue 22), and each new component alone on top of them
PREVIOUS_DEFAULT = {"w_bm25": 0.5, "statute_family": False, "w_level": 0.0, "w_link": 0.0, "group": "chunk"}
COMPONENTS = {"+ family prior": {"statute_family": True},
              "+ whole family (family_share 1)": {"statute_family": True, "family_share": 1.0},
              "+ level cues": {"w_level": 0.2},
              "+ linked articles": {"w_link": 0.2}, "+ per article": {"group": "article", "sibling_bonus": 0.1},
              "+ w_bm25 0.7": {"w_bm25": 0.7}}


def quality(kb, labels: str, reranker=None, limit: int = 0, rerank_top_n: int = 10, **overrides) -> dict:
    """Metrics on `labels` (`limit` questions evenly spread over the file when > 0: every level of the
    validation set, which is written level by level) with RetrieveConfig's defaults and `overrides`."""
    cfg = dataclasses.replace(RetrieveConfig(kb=str(kb.folder), top_k=10), **overrides)
    with tempfile.TemporaryDirectory(prefix="fsku-labels-") as tmp:
        if limit:
            lines = [ln for ln in Path(labels).read_text(encoding="utf-8").splitlines() if ln.strip()]
            n = min(limit, len(lines))
            lines = [lines[i * len(lines) // n] for i in range(n)]
            labels = str(Path(tmp) / Path(labels).name)
            Path(labels).write_text("\n".join(lines) + "\n", encoding="utf-8")
        t = time.perf_counter()
        metrics, table = evaluate_retrieval(kb, labels, cfg, reranker=reranker,
                                            rerank=RerankSettings(rerank_top_n=rerank_top_n))
        seconds = time.perf_counter() - t
    return {**{k: metrics[k] for k in ("hit_at_1", "hit_at_5", "mrr_at_10", "mean_hit_chars", "n_queries")},
            "intervals": metrics["intervals"], "rows": table[["qid", "first_relevant_rank"]].to_dict("records"),
            "s_per_query": seconds / max(1, metrics["n_queries"])}


def write_level_set(kb, path: Path, per_level: int, seed: int, exclude: str = "") -> dict[str, str]:
    """The per-level validation set of `kb` (as `fsku level-set` writes it; `exclude`: a level-set file
    whose articles it leaves out) -> {qid: level}."""
    cfg = LevelSetConfig(kb=str(kb.folder), out=str(path), per_level=per_level, seed=seed, exclude=exclude)
    rows = build_level_set(kb.chunks.to_dict("records"), cfg, parents=kb.parents(),
                           exclude=excluded_articles(exclude) if exclude else ())
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {r["qid"]: r["level"] for r in rows}


def by_level(result: dict, levels: dict[str, str]) -> dict[str, dict]:
    """hit@1 / MRR@10 intervals of `result` per statute level."""
    out = {}
    for level in LEVELS:
        rows = [r for r in result["rows"] if levels.get(r["qid"]) == level]
        if rows:
            out[level] = intervals(rows, ["hit_at_1", "mrr_at_10"])
    return out


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

    return (f"{name:<44} {m['n_queries']:>4} {cell('hit_at_1'):>19} {cell('hit_at_5'):>19} {cell('mrr_at_10'):>19} "
            f"{m['mean_hit_chars']:>6.0f} {m['s_per_query']:>6.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(SHARED / "law-pdf"))
    ap.add_argument("--labels", default=str(SHARED / "fsku-benchmark" / "retrieval_dev.jsonl"))
    ap.add_argument("--baseline-sample", type=int, default=256, help="chunks encoded by both embedders for the ratio")
    ap.add_argument("--level-set-per-level", type=int, default=40, help="questions per level of the validation set")
    ap.add_argument("--level-set-seed", type=int, default=0, help="seed of the validation set settings are chosen on")
    ap.add_argument("--held-out-seed", type=int, default=1, help="seed of the held-out set: the same rules on the "
                    "articles the validation set leaves out (what a choice made on the first is worth)")
    ap.add_argument("--llm-rerankers", default="", help="comma-separated LLMs to rerank with (llm reranker), e.g. "
                    "offline:qwen2.5-coder-0.5b-instruct; none by default (minutes per model on a CPU)")
    ap.add_argument("--rerank-queries", type=int, default=40, help="questions of each set the rerankers answer "
                    "(N evenly spread; the new default is re-scored on the same ones for the paired test)")
    ap.add_argument("--rerank-top-n", type=int, default=10, help="candidates each llm reranker re-scores")
    ap.add_argument("--json", help="also write all numbers to this JSON file")
    args = ap.parse_args()
    if not Path(args.corpus).exists():
        print(f"corpus {args.corpus} not found (../shared absent?)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="fsku-bench-"))
    out: dict = {"dev": {}, "levels": {}, "held-out": {}}
    sets = {"dev": args.labels, "levels": str(work / "level_set.jsonl"), "held-out": str(work / "held_out.jsonl")}
    try:
        cfg = BuildKBConfig(corpus=args.corpus, out=str(work / "kb"), cache_dir=str(work / "cache"))
        t = time.perf_counter()
        kb, stats = build_knowledge_base(cfg, progress=True)
        first_build = time.perf_counter() - t
        levels = write_level_set(kb, Path(sets["levels"]), args.level_set_per_level, args.level_set_seed)
        levels.update(write_level_set(kb, Path(sets["held-out"]), args.level_set_per_level, args.held_out_seed,
                                      exclude=sets["levels"]))

        naive_cfg = BuildKBConfig(corpus=args.corpus, out=str(work / "naive"), embedding_model="none", length_unit="chars",
                                  chunk_size=400, chunk_overlap=20, statute_mode="never", bm25_tokenizer="bm25s_default")
        naive, _ = build_knowledge_base(naive_cfg, progress=False)
        recipes = {"bm25-only": {**PREVIOUS_DEFAULT, "w_bm25": 1.0}, "dense-only": {**PREVIOUS_DEFAULT, "w_bm25": 0.0},
                   "hybrid rrf": {**PREVIOUS_DEFAULT, "fusion": "rrf"}, "previous default": PREVIOUS_DEFAULT,
                   **{name: {**PREVIOUS_DEFAULT, **over} for name, over in COMPONENTS.items()}, "new default": {}}
        for set_name, labels in sets.items():
            out[set_name]["seed-naive"] = quality(naive, labels, w_bm25=1.0, w_law=0.0, w_article=0.0)
            for name, over in recipes.items():
                out[set_name][name] = quality(kb, labels, **over)
        for model in [m for m in args.llm_rerankers.split(",") if m.strip()]:
            from fsku.rerank import load_reranker

            reranker = load_reranker("llm", model.strip())
            for set_name, labels in sets.items():
                name = f"new default + llm rerank ({Path(model).name})"
                out[set_name][name] = quality(kb, labels, reranker=reranker, limit=args.rerank_queries,
                                              rerank_top_n=args.rerank_top_n)
                out[set_name][f"new default (same {args.rerank_queries})"] = quality(kb, labels, limit=args.rerank_queries)
            del reranker

        t = time.perf_counter()
        _, stats2 = build_knowledge_base(dataclasses.replace(cfg, out=str(work / "kb2")), progress=False)
        rebuild = time.perf_counter() - t

        questions = [json.loads(line)["question"] for line in Path(args.labels).read_text(encoding="utf-8").splitlines()
                     if line.strip()]
        lat = latency(kb.folder, questions)
        lat_prev = latency(kb.folder, questions, **PREVIOUS_DEFAULT)
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
                        "latency_cold_p50_previous_ms": lat_prev["cold_p50_ms"],
                        "chunks": stats["chunks"], "documents": stats["documents"], "links_s": tm.get("links", 0.0),
                        "links_cite": stats["links_cite"], "links_cite_resolved": stats["links_cite_resolved"]}
        qids = {name: {json.loads(line)["qid"] for line in Path(sets[name]).read_text(encoding="utf-8").splitlines()
                       if line.strip()} for name in ("levels", "held-out")}
        out["level_counts"] = {name: {lv: sum(1 for q in qids[name] if levels[q] == lv) for lv in LEVELS}
                               for name in qids}
        out["by_level"] = {name: {recipe: by_level(res, levels) for recipe, res in out[name].items()} for name in qids}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    s = out["speed"]
    print(f"\nretrieval ({Path(args.corpus).name}, {s['documents']} documents, {s['chunks']} chunks); 95 % intervals: "
          "Wilson (hit@k), bootstrap over queries (MRR)")
    for set_name, title in (("dev", f"dev labels {args.labels}"),
                            ("levels", f"per-level validation set (fsku level-set, seed {args.level_set_seed}: "
                                       + ", ".join(f"{lv} {n}" for lv, n in out["level_counts"]["levels"].items())
                                       + "); settings are chosen on it"),
                            ("held-out", f"held-out per-level set (seed {args.held_out_seed}, the articles the "
                                         "validation set leaves out: " + ", ".join(
                                             f"{lv} {n}" for lv, n in out["level_counts"]["held-out"].items()) + ")")):
        print(f"\n{title}")
        print(f"{'recipe':<44} {'n':>4} {'hit@1':>19} {'hit@5':>19} {'MRR@10':>19} {'chars':>6} {'s/q':>6}")
        for name, m in out[set_name].items():
            print(row(name, m))
    for set_name, per_recipe in out["by_level"].items():
        print(f"\nper level ({set_name}): hit@1 [95 %] / MRR@10")
        print(f"{'recipe':<44} " + " ".join(f"{lv:>24}" for lv in LEVELS))
        for name, per in per_recipe.items():
            cells = []
            for lv in LEVELS:
                iv = per.get(lv)
                cells.append(f"{iv['hit_at_1']['value']:.2f} [{iv['hit_at_1']['low']:.2f},{iv['hit_at_1']['high']:.2f}] "
                             f"/ {iv['mrr_at_10']['value']:.2f}" if iv else "-")
            print(f"{name:<44} " + " ".join(f"{c:>24}" for c in cells))
    print("\npaired against the previous default (same queries; hit@1: exact McNemar, MRR@10: paired bootstrap):")
    for set_name in ("dev", "levels", "held-out"):
        for name, res in out[set_name].items():
            if name == "previous default" or name.startswith("new default (same"):
                continue
            base = out[set_name]["previous default"]
            if "llm rerank" in name:  # a reranker row: against the new default on its questions
                base = out[set_name][f"new default (same {args.rerank_queries})"]
            for metric in ("hit_at_1", "mrr_at_10"):
                res_p = paired(res["rows"], base["rows"], metric)
                out.setdefault("paired", {}).setdefault(set_name, {}).setdefault(name, {})[metric] = res_p
                print(f"  [{set_name}] {name:<40} {format_paired(res_p, 'recipe', 'base')}")
    print("\nbuild breakdown (s): " + ", ".join(f"{k}={v:.1f}" for k, v in s["timings"].items()))
    print(f"parse+clean+chunk+BM25: {s['parse_clean_chunk_bm25_s']:.1f} s; statute links: {s['links_s']:.2f} s "
          f"({s['links_cite']} references, {s['links_cite_resolved']} resolved)")
    print(f"embedding ({min(args.baseline_sample, s['chunks'])} sampled chunks): plain sentence-transformers fp32 encode "
          f"{s['baseline_texts_per_s']:.1f} chunks/s; ours {s['embed_texts_per_s']:.1f} chunks/s -> {s['embed_speedup']:.2f}x "
          f"(engine alone on the identical full texts: {s['embed_same_text_per_s']:.1f}/s "
          f"-> {s['embed_same_text_speedup']:.2f}x)")
    print(f"rebuild with unchanged chunks: {s['rebuild_s']:.1f} s vs first build {s['first_build_s']:.1f} s -> "
          f"{100 * s['rebuild_ratio']:.1f}% (embedded {s['rebuild_embedded_new']} new)")
    print(f"retrieval latency, {s['latency_queries']} queries unseen by a freshly loaded KB (empty query memo): new default "
          f"p50 {s['latency_cold_p50_ms']:.1f} ms, p95 {s['latency_cold_p95_ms']:.1f} ms; previous default p50 "
          f"{s['latency_cold_p50_previous_ms']:.1f} ms; bm25-only p50 {s['latency_cold_p50_bm25_ms']:.1f} ms, "
          f"p95 {s['latency_cold_p95_bm25_ms']:.1f} ms")
    print(f"the same queries again, answered from the query memo: new default p50 {s['latency_memo_p50_ms']:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
