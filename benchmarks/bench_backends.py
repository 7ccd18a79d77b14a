"""transformers vs llama.cpp on the same GGUF model, the same questions and the same recipe, in one run.

    python benchmarks/bench_backends.py --model offline:qwen2.5-coder-1.5b-instruct --kb outputs/lawkb

Questions: the 63 statute MCQs of retrieval_dev.jsonl and the first 20 rows of descriptive_dev.csv
(../shared/data/fsku-benchmark), answered by `fsku predict` itself (default recipe: gated context,
option rotations; answer cache off) once per backend, each backend in its own process (its peak RSS
is its own). The transformers backend loads the GGUF dequantised (fp32 on CPU), llama.cpp loads the
GGUF file as it is.

Printed per backend: MC accuracy (Wilson 95 % interval), descriptive score (0.6 cosine + 0.4 keyword
recall), seconds per MC and per descriptive question, prefill and decode tokens/s on one ~800-token
chat prompt with statute context, load time and peak RSS; then the answers' agreement (same MC
choice), an exact McNemar test on MC correctness and a paired bootstrap interval of the descriptive
score difference, and the speed ratios (transformers / llama.cpp). Results per backend are kept under
--out and reused on a rerun (a killed run resumes inside predict's partial file); --json writes the
summary.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DATA = ROOT.parent / "shared" / "data" / "fsku-benchmark"
BACKENDS = ("transformers", "llamacpp")


def gold_rows(n_mcq: int, n_desc: int):
    from fsku.evaluate.fsku_metric import load_gold

    law = [g for g in load_gold(DATA / "retrieval_dev.jsonl") if g.question_type == "multiple_choice"][:n_mcq]
    desc = [g for g in load_gold(DATA / "descriptive_dev.csv") if g.question_type == "descriptive"][:n_desc]
    return law + desc


def speed_prompts(llm, kb, question: str) -> tuple[str, list[str]]:
    """(a ~800-token chat prompt with statute context, three short chat prompts), each led by a fresh
    nonce so that no prefix cache can serve it."""
    from fsku.infer import prompts
    from fsku.infer.classify import classify_question

    q = classify_question("speed", question)
    hits = kb.search([q.parsed_question], top_k=8)[0] if kb is not None else []
    passages = [{"text": h.text, "source": h.source} for h in hits]
    context = llm.truncate_tokens(prompts.format_context(passages), 650)  # ~800 tokens with the question and template

    def system(tag: str) -> dict:
        return {"role": "system", "content": f"[{uuid.uuid4().hex[:8]}{tag}] 금융보안 전문가로서 답하시오."}

    long = llm.render_chat([system("L"), *prompts.mc_messages(q.parsed_question, q.option_texts, context)[1:]])
    ask = {"role": "user", "content": "전자금융거래법의 목적과 주요 내용을 자세히 설명하시오."}
    short = [llm.render_chat([system(tag), ask]) for tag in "abc"]
    return long.replace(prompts.SPLIT, ""), short


def measure_speed(llm, long: str, short: list[str], new_tokens: int = 64) -> dict:
    """Prefill tokens/s: one teacher-forced pass over the long prompt (plus one token). Decode
    tokens/s: greedy generation of 1 and of 1 + `new_tokens` tokens after two short prompts of the same
    shape (fresh nonces: nothing cached); the difference of the times over the difference of the token
    counts. A first short call warms the backend up and is not timed."""
    llm.generate([short[0]], max_new_tokens=2)  # warm-up
    n_long = llm.count_tokens(long)
    t0 = time.perf_counter()
    llm.continuation_logprobs([long], ["1"])
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    one = llm.generate([short[1]], max_new_tokens=1)[0]
    one_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    many = llm.generate([short[2]], max_new_tokens=1 + new_tokens)[0]
    many_s = time.perf_counter() - t0
    extra = many.n_tokens - one.n_tokens
    return {"prompt_tokens": n_long, "prefill_s": prefill_s,
            "prefill_tok_s": (n_long + 1) / prefill_s, "decode_tokens": extra,
            "decode_tok_s": extra / max(1e-6, many_s - one_s), "decode_stopped_early": many.n_tokens < 1 + new_tokens}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(a: argparse.Namespace) -> int:
    """One backend: speed probe, then predict on the test CSV; writes <out>/summary.json."""
    from fsku.config import PredictConfig
    from fsku.infer.predict import predict
    from fsku.kb import KnowledgeBase
    from fsku.llm import load_llm

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.restart:
        (out / "speed.json").unlink(missing_ok=True)
    cfg = PredictConfig(model=a.model, kb=a.kb, backend=a.worker, cache_dir="none", threads=a.threads,
                        input=a.test, out=str(out / "submission.csv"))
    t0 = time.perf_counter()
    llm = load_llm(cfg.model, **cfg.llm_kwargs())
    load_s = time.perf_counter() - t0
    kb = KnowledgeBase.load(cfg.kb)
    speed_file = out / "speed.json"
    if speed_file.exists():
        speed = json.loads(speed_file.read_text())
    else:
        speed = measure_speed(llm, *speed_prompts(llm, kb, gold_rows(1, 0)[0].question))
        speed_file.write_text(json.dumps(speed))
    result = predict(cfg, cfg.input, cfg.out, restart=a.restart, llm=llm, kb=kb, records_out=out / "records.jsonl",
                     progress=True, enforce=False)
    summary = {"backend": llm.name, "fingerprint": llm.fingerprint(), "threads": a.threads, "load_s": load_s, **speed,
               "peak_rss_mb": peak_rss_mb(), "answering_s": result.stats["run_s"], "unanswered": result.stats["unanswered"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


def run_backend(a: argparse.Namespace, backend: str, test: Path) -> dict:
    out = Path(a.out) / backend
    done = out / "summary.json"
    if not done.exists() or a.restart:
        cmd = [sys.executable, __file__, "--worker", backend, "--model", a.model, "--kb", a.kb, "--test", str(test),
               "--out", str(out), "--threads", str(a.threads)] + (["--restart"] if a.restart else [])
        print(f"[{backend}] {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    summary = json.loads(done.read_text())
    summary["records"] = [json.loads(x) for x in (out / "records.jsonl").read_text(encoding="utf-8").splitlines() if x]
    return summary


def compare(gold, results: dict) -> dict:
    from fsku.config import EvaluateConfig
    from fsku.evaluate.fsku_metric import embedding_cosine, fsku_score
    from fsku.evaluate.stats import bootstrap_interval, mcnemar_exact, paired_bootstrap, wilson_interval

    cosine = embedding_cosine(EvaluateConfig.scorer_embedding)  # the default scorer embedder, as `fsku evaluate`
    mc_ids = [g.ID for g in gold if g.question_type == "multiple_choice"]
    desc_ids = [g.ID for g in gold if g.question_type == "descriptive"]
    table: dict = {}
    for name, res in results.items():
        recs = {r["ID"]: r for r in res["records"]}
        score = fsku_score(gold, {i: r["answer"] for i, r in recs.items()}, cosine)
        correct = [bool(score["per_row"][i]["correct"]) for i in mc_ids]
        table[name] = {
            "mc_accuracy": score["mc_accuracy"], "mc_ci95": wilson_interval(sum(correct), len(correct)),
            "descriptive_score": score["descriptive_score"],
            # bootstrap interval of the mean row score over questions
            "descriptive_ci95": bootstrap_interval([score["per_row"][i]["score"] for i in desc_ids]),
            "s_per_mc": float(np.mean([recs[i]["inference_time"] for i in mc_ids])),
            "s_per_desc": float(np.mean([recs[i]["inference_time"] for i in desc_ids])) if desc_ids else None,
            **{k: res[k] for k in ("prefill_tok_s", "decode_tok_s", "prompt_tokens", "load_s", "peak_rss_mb",
                                   "unanswered", "fingerprint")},
            "_correct": correct, "_desc": [score["per_row"][i]["score"] for i in desc_ids],
            "_choices": [recs[i]["answer"] for i in mc_ids]}
    hf, lc = table["transformers"], table["llamacpp"]
    paired = {
        "mc_agreement": float(np.mean([x == y for x, y in zip(hf["_choices"], lc["_choices"], strict=True)])),
        "mcnemar": mcnemar_exact(lc["_correct"], hf["_correct"]),
        "desc_diff_llamacpp_minus_transformers": paired_bootstrap(lc["_desc"], hf["_desc"]),
        "speedup_s_per_mc": hf["s_per_mc"] / lc["s_per_mc"],
        "speedup_s_per_desc": (hf["s_per_desc"] / lc["s_per_desc"]) if desc_ids else None,
        "speedup_prefill": lc["prefill_tok_s"] / hf["prefill_tok_s"],
        "speedup_decode": lc["decode_tok_s"] / hf["decode_tok_s"],
        "n_mc": len(mc_ids), "n_desc": len(desc_ids)}
    for t in table.values():
        for k in [k for k in t if k.startswith("_")]:
            del t[k]
    return {"backends": table, "paired": paired}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="offline:qwen2.5-coder-1.5b-instruct")
    p.add_argument("--kb", default="outputs/lawkb")
    p.add_argument("--mcq", type=int, default=63, help="statute MCQs (retrieval_dev.jsonl)")
    p.add_argument("--desc", type=int, default=20, help="descriptive rows (descriptive_dev.csv)")
    p.add_argument("--threads", type=int, default=0, help="threads for both backends (0: every core this process may use)")
    p.add_argument("--out", default="outputs/bench_backends")
    p.add_argument("--restart", action="store_true", help="recompute backends that have results")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--test", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    if not DATA.exists():
        print(f"needs the FSKU dev sets at {DATA}", file=sys.stderr)
        return 2
    from fsku.evaluate.fsku_metric import write_test_csv
    from fsku.llm.llamacpp import default_threads
    from fsku.llm.resolve import resolve_gguf, resolve_model

    a.threads = a.threads or default_threads()  # the same count for both (torch's own default may differ)
    resolve_model(a.model), resolve_gguf(a.model)  # assembled / converted here, not inside a timed worker
    gold = gold_rows(a.mcq, a.desc)
    test = write_test_csv(gold, Path(a.out) / "test.csv")
    results = {b: run_backend(a, b, test) for b in BACKENDS}
    summary = {"model": a.model, "kb": a.kb, **compare(gold, results)}
    b, pr = summary["backends"], summary["paired"]
    print(f"\n{a.model}: {pr['n_mc']} statute MCQs + {pr['n_desc']} descriptive, one process per backend, "
          f"{a.threads} threads each; s/MC and s/desc: the whole predict recipe (gated context, option rotations), "
          "prefix reuse between calls included")
    print(f"{'backend':<13}{'MC acc (95% CI)':<22}{'desc (95% CI)':>22}{'s/MC':>8}{'s/desc':>8}{'prefill t/s':>12}"
          f"{'decode t/s':>11}{'load s':>8}{'RSS MB':>8}")
    for name, t in b.items():
        ci = f"{t['mc_accuracy']:.3f} [{t['mc_ci95'][0]:.2f}, {t['mc_ci95'][1]:.2f}]"
        dci = f"{t['descriptive_score'] or 0:.3f} [{t['descriptive_ci95'][0]:.2f}, {t['descriptive_ci95'][1]:.2f}]"
        print(f"{name:<13}{ci:<22}{dci:>22}{t['s_per_mc']:>8.2f}{t['s_per_desc'] or 0:>8.2f}"
              f"{t['prefill_tok_s']:>12.1f}{t['decode_tok_s']:>11.1f}{t['load_s']:>8.1f}{t['peak_rss_mb']:>8.0f}")
    mn, dd = pr["mcnemar"], pr["desc_diff_llamacpp_minus_transformers"]
    print(f"MC agreement {pr['mc_agreement']:.3f}; McNemar exact p = {mn['p_value']:.3f} (right only with llama.cpp "
          f"{mn['a_only']}, only with transformers {mn['b_only']}); descriptive llama.cpp - transformers "
          f"{dd['mean_diff']:+.3f} [{dd['low']:+.3f}, {dd['high']:+.3f}]")
    print(f"speed-up (llama.cpp over transformers): s/MC x{pr['speedup_s_per_mc']:.2f}, s/desc "
          f"x{pr['speedup_s_per_desc'] or 0:.2f}, prefill x{pr['speedup_prefill']:.2f}, decode x{pr['speedup_decode']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
