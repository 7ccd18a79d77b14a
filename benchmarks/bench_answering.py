"""Multiple-choice accuracy and seconds per question of a real LLM on the FSKU dev sets, for every
context mode (none / always / gated with question scope / gated with passage scope) and debiasing
method, in one run.

    python benchmarks/bench_answering.py --model offline:qwen2.5-coder-1.5b-instruct --kb outputs/lawkb

Sets: mcq_dev.csv (48 questions from security guides: retrieval must not hurt) and the 63 statute
MCQs of retrieval_dev.jsonl (retrieval should help). The label log-probs of every option order are
computed once per (question, context) and every debiasing method is derived from them: raw = the
original order alone; rotate = mean over the n cyclic orders; calibrate = contextual calibration of
the original order; rotate+calibrate. A gated prompt identical to the always-on or no-context one
reuses that result (a question-scope gate is always one of the two). Seconds per question are measured per computed prompt.
Writes per-question JSONL (resumable) and prints the table; --json writes the summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fsku.config import InferConfig  # noqa: E402
from fsku.evaluate.stats import mcnemar_exact, wilson_interval  # noqa: E402
from fsku.infer import options as opt  # noqa: E402
from fsku.infer.answer import Answerer  # noqa: E402
from fsku.infer.classify import classify_question  # noqa: E402
from fsku.kb import KnowledgeBase  # noqa: E402
from fsku.llm import load_llm  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsku-benchmark"
METHODS = ("raw", "rotate", "calibrate", "rotate+calibrate")
MODES = {"none": {"context": "none"}, "always": {"context": "always"},
         "gated": {"context": "gated", "gate_scope": "question"},
         "gated-passage": {"context": "gated", "gate_scope": "passage"}}


def upgrade_record(rec: dict, gate_threshold: float) -> dict:
    """Records written before the question-scope gate existed hold 'gated' = passage scope; the
    question-scope result is exactly the always-on one when any passage passes, else no-context."""
    if "gated-passage" in rec["choices"]:
        return rec
    opened = any(d is not None and d >= gate_threshold for d in rec["gate_dense"])
    for key in ("choices", "seconds", "n_context"):
        rec[key]["gated-passage"] = rec[key]["gated"]
        rec[key]["gated"] = rec[key]["always" if opened else "none"]
    return rec


def load_sets(data: Path) -> dict[str, list[tuple[str, str, int]]]:
    mcq = pd.read_csv(data / "mcq_dev.csv")
    sets = {"mcq_dev": [(f"mcq_dev-{i:03d}", q, int(str(a).strip()[0]))
                        for i, (q, a) in enumerate(zip(mcq.Question, mcq.Answer))]}
    law = [json.loads(line) for line in (data / "retrieval_dev.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    sets["statute63"] = [(r["qid"], r["question"], int(r["answer"])) for r in law if str(r.get("answer", "")).isdigit()]
    return sets


def derive(display: np.ndarray, orders, cf: np.ndarray, cloze=None, free=None) -> dict[str, int]:
    """1-based choice per debiasing method from the per-order display log-probs. With the reversed
    rotations after the n cyclic ones (--reverse-orders), rotate uses the first n and
    rotate+reverse all 2n."""
    n = display.shape[1]
    fwd, fwd_orders = display[:n], orders[:n]
    out = {"raw": int(np.argmax(display[0])) + 1,
           "rotate": int(np.argmax(opt.aggregate_orders(fwd, fwd_orders))) + 1,
           "calibrate": int(np.argmax(opt.calibrate(display[0], cf))) + 1}
    cal = np.stack([opt.calibrate(row, cf) for row in fwd])
    out["rotate+calibrate"] = int(np.argmax(opt.aggregate_orders(cal, fwd_orders))) + 1
    if len(orders) > n:
        out["rotate+reverse"] = int(np.argmax(opt.aggregate_orders(display, orders))) + 1
    if cloze is not None:
        rot = opt.aggregate_orders(fwd, fwd_orders)
        for name, c in (("cloze", opt.cloze_scores(cloze)), ("cloze-pmi", opt.cloze_scores(cloze, free))):
            out[name] = int(np.argmax(c)) + 1
            out["rotate+" + name] = int(np.argmax(opt.combine_scores(rot, c))) + 1
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--kb", help="KB built from the statutes (fsku build-kb --corpus ../shared/data/law-pdf); "
                    "needed unless --modes none")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--sets", default="mcq_dev,statute63")
    ap.add_argument("--limit", type=int, default=0, help="first N questions per set (0 = all)")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_answering"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--modes", default=",".join(MODES), help="context modes to compute (a subset saves time)")
    ap.add_argument("--mc-prompt", default=InferConfig.mc_prompt, help="multiple-choice prompt style (InferConfig.mc_prompt)")
    ap.add_argument("--cloze", action="store_true",
                    help="also score each option's text as the answer: adds cloze, cloze-pmi, rotate+cloze, rotate+cloze-pmi")
    ap.add_argument("--reverse-orders", action="store_true",
                    help="also score the reversed rotations (twice the passes): adds the method rotate+reverse")
    for f in ("top_k", "gate_threshold", "context_tokens", "passage_tokens"):
        ap.add_argument("--" + f.replace("_", "-"), type=type(getattr(InferConfig, f)), default=getattr(InferConfig, f))
    a = ap.parse_args()
    if not a.data.exists():
        print(f"skipped: {a.data} not found (needs ../shared/data)")
        return 0
    modes = {m: MODES[m] for m in a.modes.split(",")}
    if not a.kb and set(modes) != {"none"}:
        ap.error(f"--modes {a.modes} needs --kb")
    methods = METHODS + (("rotate+reverse",) if a.reverse_orders else ()) \
        + (("cloze", "cloze-pmi", "rotate+cloze", "rotate+cloze-pmi") if a.cloze else ())
    cfg = InferConfig(model=a.model, kb=a.kb, top_k=a.top_k, gate_threshold=a.gate_threshold,
                      context_tokens=a.context_tokens, passage_tokens=a.passage_tokens, dtype=a.dtype,
                      mc_prompt=a.mc_prompt)
    t0 = time.perf_counter()
    llm = load_llm(a.model, backend="transformers", dtype=a.dtype)
    load_s = time.perf_counter() - t0
    kb = KnowledgeBase.load(a.kb) if a.kb else None
    answerer = Answerer(llm, cfg, kb)
    sets = load_sets(a.data)
    a.out.mkdir(parents=True, exist_ok=True)
    tag = Path(a.model).name.replace(":", "_") + ("" if a.mc_prompt == "plain" else "." + a.mc_prompt.replace("+", "-"))
    summary: dict = {"model": a.model, "mc_prompt": a.mc_prompt, "load_s": load_s, "gate_threshold": a.gate_threshold, "sets": {}}
    for set_name in a.sets.split(","):
        rows = sets[set_name][: a.limit or None]
        log_path = a.out / f"{tag}.{set_name}.jsonl"
        done = {}
        if log_path.exists():
            for line in log_path.read_text(encoding="utf-8").splitlines():
                rec = upgrade_record(json.loads(line), a.gate_threshold)
                if rec.get("model", a.model) != a.model:
                    # two models with one folder name (e.g. .../merged) would share a log: never mix them
                    sys.exit(f"{log_path} holds results of {rec['model']!r}, not {a.model!r}: pass another --out")
                done[rec["ID"]] = rec
        with log_path.open("a", encoding="utf-8") as fh:
            for i, (qid, text, gold) in enumerate(rows):
                if qid in done and all(m in done[qid]["choices"] and set(methods) <= set(done[qid]["choices"][m])
                                       for m in modes):
                    continue
                q = classify_question(qid, text)
                n = len(q.choices)
                orders = opt.option_orders(n, reverse=a.reverse_orders)
                cf = answerer.content_free_logp(n)
                (hits, terms), = answerer.retrieve([q.parsed_question])
                rec = {"ID": qid, "model": a.model, "gold": gold, "n_hits": len(hits),
                       "gate_dense": [h.dense for h in hits], "choices": {}, "seconds": {}, "n_context": {}}
                computed: dict[str, tuple] = {}
                free = [lp.tolist() for lp in answerer.option_text_logprobs(q, "", content_free=True)] if a.cloze else None
                if free is not None:
                    rec["cloze_free"] = [np.round(lp, 4).tolist() for lp in free]
                for mode, overrides in modes.items():
                    mcfg = InferConfig(**{**cfg.__dict__, **overrides})
                    answerer.cfg = mcfg
                    context, ctx_ids = answerer.context_text(hits, terms)
                    n_ctx = len(ctx_ids)
                    if context in computed:
                        display, cloze, secs = computed[context]
                    else:
                        t = time.perf_counter()
                        display = answerer.display_logprobs(q, context, orders)
                        secs = time.perf_counter() - t
                        t = time.perf_counter()
                        cloze = [lp.tolist() for lp in answerer.option_text_logprobs(q, context)] if a.cloze else None
                        rec.setdefault("cloze_seconds", {})[mode] = round(time.perf_counter() - t, 3)
                        computed[context] = (display, cloze, secs)
                    rec["choices"][mode] = derive(display, orders, cf, cloze, free)
                    if cloze is not None:
                        rec.setdefault("cloze_logp", {})[mode] = [np.round(lp, 4).tolist() for lp in cloze]
                    rec["seconds"][mode] = round(secs, 3)
                    rec["n_context"][mode] = n_ctx
                    # probability the model puts on any option label (mean over orders): how well the
                    # prompt makes it answer with a number at all
                    rec.setdefault("label_mass", {})[mode] = round(float(np.exp(display).sum(axis=1).mean()), 4)
                    # the raw per-order label log-probs, so other aggregations can be compared offline
                    rec.setdefault("display_logp", {})[mode] = np.round(display, 4).tolist()
                answerer.cfg = cfg
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                fh.flush()
                done[qid] = rec
                print(f"{set_name} {i + 1}/{len(rows)} {qid} gold {gold} "
                      + " ".join(f"{m}:{rec['choices'][m]['rotate']}" for m in rec["choices"]), flush=True)
        recs = [done[qid] for qid, _, _ in rows]
        table = {}
        for mode in modes:
            table[mode] = {m: float(np.mean([r["choices"][mode][m] == r["gold"] for r in recs])) for m in methods}
            table[mode]["s_per_q_all_orders"] = float(np.mean([r["seconds"][mode] for r in recs]))
            table[mode]["context_rate"] = float(np.mean([r["n_context"][mode] > 0 for r in recs]))
            masses = [r["label_mass"][mode] for r in recs if mode in r.get("label_mass", {})]
            table[mode]["label_mass"] = float(np.mean(masses)) if masses else float("nan")
        correct = {mode: {m: [r["choices"][mode][m] == r["gold"] for r in recs] for m in methods} for mode in modes}
        for mode in modes:
            table[mode]["ci95"] = {m: wilson_interval(sum(correct[mode][m]), len(recs)) for m in methods}
        # paired against the named baselines: each method vs raw in its mode, each mode vs the first mode (rotate)
        first = next(iter(modes))
        paired = {f"{mode} {m} vs {mode} raw": mcnemar_exact(correct[mode][m], correct[mode]["raw"])
                  for mode in modes for m in methods if m != "raw"}
        paired.update({f"{mode} rotate vs {first} rotate": mcnemar_exact(correct[mode]["rotate"], correct[first]["rotate"])
                       for mode in modes if mode != first})
        summary["sets"][set_name] = {"n": len(recs), "table": table, "paired": paired}
    print(f"\nmodel {a.model}, mc_prompt {a.mc_prompt} (load {load_s:.1f} s); gate: dense cosine >= {a.gate_threshold}; "
          f"top_k {a.top_k}"
          "\n(gated = question scope, the default: all top_k passages once one passes; gated-passage = each passage must pass)")
    for set_name, s in summary["sets"].items():
        print(f"\n{set_name} (n={s['n']})   " + "  ".join(f"{m:>16}" for m in methods)
              + "   s/q(all orders)  ctx-rate  label-mass")
        for mode, row in s["table"].items():
            print(f"  context={mode:<13}" + "  ".join(f"{row[m]:16.3f}" for m in methods)
                  + f"   {row['s_per_q_all_orders']:12.2f}  {row['context_rate']:8.2f}  {row['label_mass']:10.3f}")
            print(f"  {'95% Wilson':<21}" + "  ".join(f"{'[%.2f, %.2f]' % row['ci95'][m]:>16}" for m in methods))
        print("  paired (exact McNemar; only the first right / only the second right):")
        for name, t in s["paired"].items():
            print(f"    {name:<40} {t['a_only']:3d} / {t['b_only']:3d}   p = {t['p_value']:.3g}")
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
