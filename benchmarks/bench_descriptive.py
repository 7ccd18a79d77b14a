"""Descriptive strategies on FSKU's descriptive dev questions: keyword recall, proxy cosine, the
descriptive score, length, verbatim-copy rate and seconds per question, next to two calibration rows.

    python benchmarks/bench_descriptive.py --model offline:qwen2.5-coder-0.5b-instruct --half select \
        [--kb outputs/lawkb --contexts none,gated] [--strategies greedy,keywords,consensus] [--limit N]

Protocol (issue 23): descriptive_dev.csv is split in two halves by the fold helper (split_folds, 2
folds, seed 0, keyed by the question text): choose on `--half select`, report once on `--half report`.
Calibration rows, scored like the strategies: `echo the question` (the question as the answer) and
`another row's reference` (each row's reference answer scored against the next row's reference): a
similarity proxy that gives these nearly the scores of real answers cannot rank strategies. Keyword
recall is the competition's own measure (case and spacing ignored); the cosine is a proxy (e5-small
here, not the competition's embedder). Intervals: bootstrap over questions; each strategy is paired
with greedy on the same questions and context (paired bootstrap, sign-flip p). Per-answer records go
to --out (JSONL, resumed after a crash); --json writes the summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402

from fsku.config import DESC_STRATEGY_NAMES, EvaluateConfig, InferConfig  # noqa: E402
from fsku.evaluate.fsku_metric import descriptive_row_score, embedding_cosine, keyword_recall, split_keywords  # noqa: E402
from fsku.evaluate.stats import bootstrap_interval, paired_bootstrap, split_folds  # noqa: E402
from fsku.infer.answer import Answerer  # noqa: E402
from fsku.infer.classify import classify_question  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsku-benchmark" / "descriptive_dev.csv"
CALIBRATION = ("echo the question", "another row's reference")


def half_rows(path: Path, half: str) -> list[dict]:
    """The rows of one half of the descriptive dev set (select = fold 0, report = fold 1)."""
    import pandas as pd

    table = pd.read_csv(path)
    missing = {"Question", "Answer", "Keyword"} - set(table.columns)
    if missing:
        raise SystemExit(f"{path}: columns {sorted(missing)} missing; expected Question, Answer, Keyword")
    rows = [{"ID": f"DESC-{i:03d}", "question": str(r.Question), "reference": str(r.Answer),
             "keywords": split_keywords(str(r.Keyword) if isinstance(r.Keyword, str) else "")}
            for i, r in enumerate(table.itertuples())]
    select, report = split_folds([r["question"] for r in rows], 2, seed=0, holdout=1)
    return [rows[i] for i in sorted(select if half == "select" else report)]


def summarise(name: str, recs: list[dict], cosine: dict[str, float]) -> dict:
    recall = [keyword_recall(r["answer"], r["keywords"]) for r in recs]
    cos = [cosine[r["key"]] for r in recs]
    score = [descriptive_row_score(c, k) for c, k in zip(cos, recall, strict=True)]
    recall = [0.0 if k is None else k for k in recall]
    out = {"name": name, "n": len(recs)}
    for metric, values in (("keyword_recall", recall), ("cosine", cos), ("score", score)):
        lo, hi = bootstrap_interval(values)
        out[metric] = {"value": float(np.mean(values)), "low": lo, "high": hi}
    out["chars"] = float(np.mean([len(r["answer"]) for r in recs]))
    out["copy_rate"] = float(np.mean([bool(r.get("copied")) for r in recs]))
    out["rephrased_rate"] = float(np.mean([bool(r.get("rephrased")) for r in recs]))
    out["s_per_question"] = float(np.mean([r.get("seconds", 0.0) for r in recs]))
    out["per_question"] = {"recall": recall, "cosine": cos, "score": score}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--kb", default="", help="knowledge base for the gated context ('' = no context runs)")
    ap.add_argument("--contexts", default="none", help="comma-separated: none, gated")
    ap.add_argument("--strategies", default=",".join(DESC_STRATEGY_NAMES))
    ap.add_argument("--samples", type=int, default=5, help="consensus: desc_samples")
    ap.add_argument("--half", choices=("select", "report"), default="select")
    ap.add_argument("--limit", type=int, default=0, help="first N rows of the half (0 = all)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--embedder", default="", help="cosine proxy model (default: evaluate's scorer_embedding)")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_descriptive.jsonl"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if not a.data.exists():
        print(f"skipped: {a.data} not found (needs ../shared/data)")
        return 0
    contexts = [c.strip() for c in a.contexts.split(",") if c.strip()]
    strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    for s in strategies:
        if s not in DESC_STRATEGY_NAMES:
            raise SystemExit(f"--strategies: {s!r} is not one of {DESC_STRATEGY_NAMES}")
    if "gated" in contexts and not a.kb:
        raise SystemExit("--contexts gated needs --kb")
    rows = half_rows(a.data, a.half)[: a.limit or None]

    from fsku.kb import KnowledgeBase
    from fsku.llm import load_llm

    base = InferConfig(model=a.model, kb=a.kb or None)
    llm = load_llm(a.model, **base.llm_kwargs(backend=a.backend))
    kb = KnowledgeBase.load(a.kb) if a.kb else None
    done: dict[str, dict] = {}
    if a.out.exists():
        for line in a.out.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec["model"] != a.model:
                sys.exit(f"{a.out} holds answers of {rec['model']}; pass another --out")
            done[rec["key"]] = rec
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("a", encoding="utf-8") as fh:
        for context in contexts:
            for strategy in strategies:
                cfg = InferConfig(model=a.model, kb=a.kb or None, context=context, desc_strategy=strategy,
                                  desc_samples=a.samples)
                answerer = Answerer(llm, cfg, kb if context != "none" else None)
                for i, row in enumerate(rows):
                    key = f"{a.half}|{context}|{strategy}|{row['ID']}"
                    if key in done:
                        continue
                    q = classify_question(row["ID"], row["question"])
                    hits, terms = answerer.retrieve([q.parsed_question])[0]
                    t = time.perf_counter()
                    ans = answerer.answer(q, hits, query_terms=terms)
                    rec = {"key": key, "model": a.model, "ID": row["ID"], "context": context, "strategy": strategy,
                           "answer": ans.answer, "keywords": row["keywords"], "seconds": round(time.perf_counter() - t, 2),
                           "n_context": ans.n_context, "desc_keywords": ans.desc_keywords, "copy_run": ans.copy_run,
                           "copy_overlap": ans.copy_overlap, "copied": ans.copied, "rephrased": ans.rephrased}
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    fh.flush()
                    done[key] = rec
                    print(f"[{context}/{strategy}] {i + 1}/{len(rows)} {row['ID']} {rec['seconds']} s: "
                          f"{ans.answer[:70]!r}", flush=True)

    # calibration rows: the question as the answer; the next row's reference as the answer
    calib = {CALIBRATION[0]: [{"key": f"echo|{r['ID']}", "answer": r["question"], "keywords": r["keywords"]}
                              for r in rows],
             CALIBRATION[1]: [{"key": f"other|{r['ID']}", "answer": rows[(i + 1) % len(rows)]["reference"],
                               "keywords": r["keywords"]} for i, r in enumerate(rows)]}
    systems = {(c, s): [done[f"{a.half}|{c}|{s}|{r['ID']}"] for r in rows] for c in contexts for s in strategies}
    refs = {r["ID"]: r["reference"] for r in rows}
    pairs = [(rec["key"], rec["answer"], refs[rec["key"].split("|")[-1]]) for recs in [*systems.values(), *calib.values()]
             for rec in recs]
    cos_fn = embedding_cosine(a.embedder or EvaluateConfig().scorer_embedding)  # what `fsku evaluate` scores with
    sims = cos_fn([p[1] for p in pairs], [p[2] for p in pairs])
    cosine = {k: float(v) for (k, _, _), v in zip(pairs, sims, strict=True)}
    summary = {"model": a.model, "half": a.half, "n": len(rows), "rows": {}}
    print(f"\n{a.model}, descriptive_dev {a.half} half, n = {len(rows)}; 95 % bootstrap intervals; cosine proxy: "
          f"{a.embedder or EvaluateConfig().scorer_embedding}")
    print(f"{'system':<36} {'keyword recall':>22} {'cosine':>22} {'score':>22} {'chars':>6} {'copied':>7} {'s/q':>6}")
    for name, recs in [*((f"{c}/{s}", v) for (c, s), v in systems.items()), *calib.items()]:
        m = summarise(name, recs, cosine)
        summary["rows"][name] = m

        def cell(k, m=m):
            return f"{m[k]['value']:.3f} [{m[k]['low']:.2f},{m[k]['high']:.2f}]"

        print(f"{name:<36} {cell('keyword_recall'):>22} {cell('cosine'):>22} {cell('score'):>22} {m['chars']:>6.0f} "
              f"{m['copy_rate']:>7.2f} {m['s_per_question']:>6.1f}")
    print("\npaired against greedy (same questions and context; paired bootstrap, sign-flip p):")
    for c in contexts:
        if "greedy" not in strategies:
            break
        g = summary["rows"][f"{c}/greedy"]["per_question"]
        for s in [s for s in strategies if s != "greedy"]:
            m = summary["rows"][f"{c}/{s}"]["per_question"]
            for metric in ("recall", "cosine", "score"):
                res = paired_bootstrap(m[metric], g[metric])
                summary.setdefault("paired", {})[f"{c}/{s}/{metric}"] = res
                print(f"  [{c}] {s:<10} {metric:<7} diff {res['mean_diff']:+.3f} [{res['low']:+.3f}, {res['high']:+.3f}], "
                      f"p = {res['p_value']:.3g}")
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
