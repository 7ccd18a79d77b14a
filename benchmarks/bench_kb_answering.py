"""Does a retrieval change reach the answers? Two retrieval settings (or two KBs), one LLM, the
product's multiple-choice path (gated context, question scope, rotate), paired on the same questions.

    python benchmarks/bench_kb_answering.py --model offline:qwen2.5-coder-1.5b-instruct \
        --kb-a outputs/lawkb --a 'w_bm25=0.5,statute_family=false,w_link=0' --kb-b outputs/lawkb --b ''

A = the previous retrieval (here: the fusion settings before the statute hierarchy), B = the new one
(empty: the KB's own defaults). Sets: the 63 statute MCQs of retrieval_dev.jsonl (retrieval should help)
and mcq_dev.csv (48 security-guide MCQs; only its gate opening rate is measured: the share of questions
whose context gate opens, which should stay low there). A question whose gated context is the same under
A and B gets the same answer (the path is deterministic), so it is answered once; only questions whose
context differs are answered twice, and the exact McNemar test over the discordant pairs is the same as
over all questions. Per-question records go to --out (JSONL, resumed after a crash).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fsku.config import FusionSettings, InferConfig, field_kind  # noqa: E402
from fsku.evaluate.stats import mcnemar_exact, wilson_interval  # noqa: E402
from fsku.infer.answer import Answerer, gate_passages  # noqa: E402
from fsku.infer.classify import classify_question  # noqa: E402
from fsku.kb import KnowledgeBase  # noqa: E402
from fsku.llm import load_llm  # noqa: E402
from fsku.steps.args import convert  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsku-benchmark"


def fusion_overrides(text: str) -> dict:
    """'w_bm25=0.5,statute_family=false' -> FusionSettings values (names and types checked)."""
    out = {}
    names = {f.name for f in dataclasses.fields(FusionSettings)}
    for part in [p for p in text.split(",") if p.strip()]:
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in names:
            raise SystemExit(f"{name!r} is not a FusionSettings field ({sorted(names)})")
        kind, optional = field_kind(FusionSettings, name)
        out[name] = convert(kind, optional, value.strip())
    return out


class Side:
    """One retrieval setting: its KB, its fusion overrides, and the Answerer that searches with them."""

    def __init__(self, llm, cfg: InferConfig, folder: str, overrides: dict):
        self.kb = KnowledgeBase.load(folder)
        self.overrides = overrides
        self.answerer = Answerer(llm, cfg, self.kb)
        self.retrieve_cfg = dataclasses.replace(self.kb.retrieve_defaults(), top_k=cfg.top_k, **overrides)

    def context(self, question: str) -> tuple[list, str]:
        hits = self.kb.search([question], self.retrieve_cfg)[0]
        text, _ = self.answerer.context_text(hits)
        return hits, text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--kb-a", required=True)
    ap.add_argument("--a", default="", help="fusion overrides of side A: name=value,...")
    ap.add_argument("--kb-b", required=True)
    ap.add_argument("--b", default="", help="fusion overrides of side B (empty: the KB's defaults)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--limit", type=int, default=0, help="first N statute MCQs (0 = all 63)")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench_kb_answering.jsonl"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if not a.data.exists():
        print(f"skipped: {a.data} not found (needs ../shared/data)")
        return 0
    cfg = InferConfig(model=a.model, kb=a.kb_b)  # the product defaults: gated, question scope, rotate
    t0 = time.perf_counter()
    llm = load_llm(a.model, **cfg.llm_kwargs(backend=a.backend))
    load_s = time.perf_counter() - t0
    sides = {"A": Side(llm, cfg, a.kb_a, fusion_overrides(a.a)), "B": Side(llm, cfg, a.kb_b, fusion_overrides(a.b))}

    law = [json.loads(line) for line in (a.data / "retrieval_dev.jsonl").read_text(encoding="utf-8").splitlines()
           if line.strip()]
    rows = [(r["qid"], r["question"], int(r["answer"])) for r in law if str(r.get("answer", "")).isdigit()]
    rows = rows[: a.limit or None]
    done = {}
    key = {"model": a.model, "a": [a.kb_a, sides["A"].overrides], "b": [a.kb_b, sides["B"].overrides]}
    if a.out.exists():
        for line in a.out.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec["key"] != json.loads(json.dumps(key)):
                sys.exit(f"{a.out} holds another comparison ({rec['key']}); pass another --out")
            done[rec["ID"]] = rec
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("a", encoding="utf-8") as fh:
        for i, (qid, text, gold) in enumerate(rows):
            if qid in done:
                continue
            q = classify_question(qid, text)
            rec = {"ID": qid, "key": key, "gold": gold, "answer": {}, "opened": {}, "seconds": {}}
            answered: dict[str, tuple] = {}
            for name, side in sides.items():
                hits, context = side.context(q.parsed_question)
                rec["opened"][name] = bool(context)
                if context not in answered:
                    t = time.perf_counter()
                    ans = side.answerer.answer(q, hits)
                    answered[context] = (ans.answer, time.perf_counter() - t)
                rec["answer"][name], rec["seconds"][name] = answered[context][0], round(answered[context][1], 2)
            rec["same_context"] = len(answered) == 1
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            done[qid] = rec
            print(f"{i + 1}/{len(rows)} {qid} gold {gold} A {rec['answer']['A']} B {rec['answer']['B']}"
                  f"{' (same context)' if rec['same_context'] else ''}", flush=True)
    recs = [done[qid] for qid, _, _ in rows]
    right = {s: [str(r["answer"][s]).strip() == str(r["gold"]) for r in recs] for s in sides}
    mcq = __import__("pandas").read_csv(a.data / "mcq_dev.csv")
    gate = {}
    for name, side in sides.items():
        opened = 0
        for i, text in enumerate(mcq.Question):
            q = classify_question(f"mcq_dev-{i:03d}", text)
            hits = side.kb.search([q.parsed_question], side.retrieve_cfg)[0]
            opened += bool(gate_passages(hits, cfg))
        gate[name] = opened / len(mcq)
    summary = {"model": a.model, "load_s": load_s, "n": len(recs), "key": key, "gate_open_mcq_dev": gate,
               "same_context": sum(r["same_context"] for r in recs),
               "accuracy": {s: sum(v) / len(v) for s, v in right.items()},
               "ci95": {s: wilson_interval(sum(v), len(v)) for s, v in right.items()},
               "mcnemar_b_vs_a": mcnemar_exact(right["B"], right["A"]),
               "statute_gate_open": {s: sum(r["opened"][s] for r in recs) / len(recs) for s in sides}}
    print(f"\n{a.model}, {len(recs)} statute MCQs (gated context, question scope, rotate); contexts identical on "
          f"{summary['same_context']}")
    for s in sides:
        lo, hi = summary["ci95"][s]
        print(f"  {s} ({[a.kb_a, a.kb_b][s == 'B']} {sides[s].overrides or 'KB defaults'}): accuracy "
              f"{summary['accuracy'][s]:.3f} [{lo:.2f}, {hi:.2f}], statute gate open {summary['statute_gate_open'][s]:.2f},"
              f" mcq_dev gate open {gate[s]:.3f}")
    print(f"  B vs A: {summary['mcnemar_b_vs_a']}")
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
