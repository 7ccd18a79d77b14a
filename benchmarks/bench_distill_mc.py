"""Does distillation transfer? One teacher, one base student, several losses at the same budget, on
statute multiple-choice prompts (issue 25's comparison).

    python benchmarks/bench_distill_mc.py --bank outputs/mc_bank --kb outputs/lawkb \\
        --teacher offline:qwen2.5-coder-1.5b-instruct --student offline:qwen2.5-coder-0.5b-instruct \\
        --losses sft,kd,gkd,distillm_v2 --max-prompts 2000 --max-steps 300 --out outputs/bench_distill_mc

1. Training data: an mc-bank folder (`fsku mc-bank`, decontaminated against the evaluation sets) or any
   synth_qa folder; `--max-prompts` train records (file order is split order, so a seeded sample is
   taken), the same for every loss.
2. For every loss: `fsku.distill.pipeline.distill` with the same prompts, steps, batch, LoRA rank and
   learning rate (label targets at the answer position, teacher top-k cached in `<out>/cache`, so the
   teacher runs once for all losses; every phase resumes after a kill: responses, top-k, checkpoints).
   Its held-out KL to the teacher (validation split, per token at the answer position) at the start
   (= the base student) and at the end.
3. Every model (base, each student, `--with-teacher` the teacher) answers the evaluation sets through
   `fsku evaluate` (the product's multiple-choice path: `--eval-context` gated retrieval, rotation
   debiasing, the KB's defaults; one MLflow run each, per-question tables kept): the statute MCQs of
   retrieval_dev.jsonl and mcq_dev.csv (`--eval-limit` for a smoke run).
4. The table: accuracy with a Wilson interval per set, exact McNemar p against the base student and
   against sft on the same questions, held-out KL, seconds per question, training seconds per step.
Nothing is chosen on the evaluation sets: the losses' settings are the config defaults (or what a
distill study picked on the validation split) and every model is measured once.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fsku.config import DistillConfig, EvaluateConfig  # noqa: E402
from fsku.evaluate.compare import paired  # noqa: E402
from fsku.evaluate.stats import wilson_interval  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "fsku-benchmark"
KL = "heldout/kl_to_teacher_mc"  # at the answer position of the held-out multiple-choice prompts


def sample_bank(bank: Path, out: Path, max_prompts: int, seed: int) -> Path:
    """A synth_qa folder holding a seeded sample of `max_prompts` train records (all when 0) and the
    whole validation split, written once (an existing sample is reused: the comparison resumes)."""
    from fsku.synth.records import read_jsonl, write_jsonl

    made_by = {"bank": str(bank.resolve()), "max_prompts": max_prompts, "seed": seed,
               "bank_stats": (bank / "stats.json").stat().st_mtime if (bank / "stats.json").is_file() else None}
    if (out / "train.jsonl").is_file():
        if json.loads((out / "sample.json").read_text(encoding="utf-8")) != made_by:
            raise SystemExit(f"{out} holds a sample of another bank, size or seed: use another --out")
        return out
    train = read_jsonl(bank / "train.jsonl")
    if max_prompts and len(train) > max_prompts:
        keep = sorted(random.Random(seed).sample(range(len(train)), max_prompts))
        train = [train[i] for i in keep]
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, out / "train.jsonl")
    if (bank / "validation.jsonl").is_file():
        write_jsonl(read_jsonl(bank / "validation.jsonl"), out / "validation.jsonl")
    stats = bank / "stats.json"
    if stats.is_file():
        (out / "stats.json").write_text(stats.read_text(encoding="utf-8"), encoding="utf-8")
    (out / "sample.json").write_text(json.dumps(made_by), encoding="utf-8")
    return out


def eval_sets(limit: int, out: Path, bank: Optional[Path] = None, bank_rows: int = 0, seed: int = 0) -> dict[str, Path]:
    """{name: gold file}: the statute MCQs of retrieval_dev and mcq_dev, the first `limit` rows of each (0: all);
    with `bank_rows`, also a seeded sample of the bank's validation multiple-choice items ("bank": can the teacher
    answer the training items at all, and by how much more than the base student?)."""
    sets = {}
    if bank is not None and bank_rows:
        rows = [json.loads(x) for x in (bank / "validation.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
        rows = [r for r in rows if r["kind"] == "multiple_choice"]
        rows = random.Random(seed).sample(rows, min(bank_rows, len(rows)))
        out.mkdir(parents=True, exist_ok=True)
        path = out / "bank_validation.jsonl"
        path.write_text("".join(json.dumps({"qid": r["qa_id"], "question": r["question"], "answer": r["answer"]},
                                           ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        sets["bank"] = path
    statute = DATA / "retrieval_dev.jsonl"
    rows = [json.loads(x) for x in statute.read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = [r for r in rows if str(r.get("answer", "")).strip().isdigit()]  # the multiple-choice ones
    if limit:
        rows = rows[:limit]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "statute_mcq.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    sets["statute"] = path
    mcq = DATA / "mcq_dev.csv"
    with mcq.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        header, body = reader.fieldnames, list(reader)
    if limit:
        body = body[:limit]
    path = out / "mcq_dev.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(body)
    sets["mcq_dev"] = path
    return sets


def evaluate_model(name: str, model: str, gold: Path, args, out: Path) -> dict:
    """One `fsku evaluate` run of `model` on `gold` (its per-question rows cached in out/<name>.json)."""
    from fsku.steps.evaluate import run_step
    from fsku.stores import digest

    # the model's weights (a retrained student at the same path is another model), the questions and the settings
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime) for p in Path(model).glob("*.safetensors")) \
        if Path(model).is_dir() else model
    key = digest({"model": str(model), "weights": weights, "gold": hashlib.sha256(gold.read_bytes()).hexdigest(),
                  "kb": args.kb, "context": args.eval_context, "backend": args.backend}, 16)
    cached = out / f"{name}-{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text(encoding="utf-8"))
    cfg = EvaluateConfig(model=model, kb=args.kb, gold=str(gold), context=args.eval_context, backend=args.backend,
                         out_dir=str(out / f"{name}-{key}"), dataset_role="report")
    t0 = time.perf_counter()
    res = run_step(cfg, progress=args.progress)
    rows = res["table"].to_dict("records")
    found = {"rows": rows, "run_id": res["run_id"], "seconds": time.perf_counter() - t0,
             "s_per_question": float(sum(r["inference_time"] for r in rows) / max(1, len(rows)))}
    cached.write_text(json.dumps(found, ensure_ascii=False, default=str), encoding="utf-8")
    return found


def accuracy(rows: list[dict]) -> tuple[float, float, float, int]:
    mc = [r for r in rows if r["question_type"] == "multiple_choice"]
    k = sum(1 for r in mc if float(r["score"] or 0) >= 1.0)
    lo, hi = wilson_interval(k, len(mc))
    return k / max(1, len(mc)), lo, hi, len(mc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bank", type=Path, default=ROOT / "outputs" / "mc_bank")
    ap.add_argument("--kb", default=str(ROOT / "outputs" / "lawkb"))
    ap.add_argument("--teacher", default="offline:qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--student", default="offline:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--losses", default="sft,kd,gkd,distillm_v2",
                    help="loss types; <loss>+gold trains on the items' own answers as the chosen labels (sft+gold)")
    ap.add_argument("--max-prompts", type=int, default=2000)
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=DistillConfig.batch_size)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--learning-rate", type=float, default=DistillConfig.learning_rate)
    ap.add_argument("--lora-r", type=int, default=DistillConfig.lora_r)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations in the backward pass (long context prompts on a CPU: 24 GB ran out "
                         "at batch 2 x 1,600 tokens without it)")
    ap.add_argument("--context", default="gated", help="context of the training prompts (none, gated, always)")
    ap.add_argument("--max-prompt-length", type=int, default=DistillConfig.max_prompt_length)
    ap.add_argument("--max-model-len", type=int, default=DistillConfig.max_model_len)
    ap.add_argument("--eval-prompts", type=int, default=DistillConfig.eval_prompts,
                    help="held-out (validation) prompts for the KL to the teacher")
    ap.add_argument("--eval-context", default="gated")
    ap.add_argument("--eval-limit", type=int, default=0, help="questions per evaluation set (0: all)")
    ap.add_argument("--with-teacher", action="store_true", help="evaluate the teacher too")
    ap.add_argument("--bank-eval", type=int, default=0,
                    help="also evaluate on this many of the bank's validation multiple-choice items")
    ap.add_argument("--sets", default="bank,statute,mcq_dev", help="evaluation sets to report")
    ap.add_argument("--eval-only", action="store_true",
                    help="no training: evaluate the base student (and --with-teacher the teacher) only")
    ap.add_argument("--backend", default="transformers", help="backend of training-side generation and of evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_distill_mc")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    if not (DATA / "retrieval_dev.jsonl").is_file():
        raise SystemExit(f"{DATA} not found: the evaluation sets live in ../shared/data/fsku-benchmark")
    if not (args.bank / "train.jsonl").is_file():
        raise SystemExit(f"{args.bank}/train.jsonl not found: run `fsku mc-bank --kb {args.kb} --out {args.bank} "
                         "--exclude <the evaluation files>` first")
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    data = sample_bank(args.bank, args.out / "data", args.max_prompts, args.seed)
    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "students": {}, "eval": {}}

    from fsku.distill.pipeline import distill

    base_kl = None
    for loss in ([] if args.eval_only else losses):
        # "<loss>+gold": the chosen label is the item's own (rule-made) answer instead of the teacher's
        loss_type, _, source = loss.partition("+")
        if source not in ("", "gold"):
            raise SystemExit(f"--losses {loss!r}: expected <loss> or <loss>+gold")
        cfg = DistillConfig(data=str(data), teacher=args.teacher, student=args.student, loss_type=loss_type,
                            mc_chosen="reference" if source == "gold" else "teacher",
                            max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                            learning_rate=args.learning_rate, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                            context=args.context, kb=args.kb if args.context != "none" else None,
                            max_prompt_length=args.max_prompt_length, max_model_len=args.max_model_len,
                            teacher_logits="topk", backend=args.backend, out=str(args.out / loss), register_as=None,
                            cache_dir=str(args.out / "cache"), seed=args.seed, save_steps=25, logging_steps=5,
                            eval_prompts=args.eval_prompts, eval_steps=max(1, args.max_steps // 10),
                            gradient_checkpointing=args.gradient_checkpointing)
        t0 = time.perf_counter()
        done = Path(cfg.out) / "stats.json"
        if done.is_file() and json.loads(done.read_text(encoding="utf-8")).get("config") == dataclasses.asdict(cfg):
            # finished with these settings: its numbers as measured then (a resumed run would train no step)
            from fsku.distill.pipeline import DistillResult

            res = DistillResult(Path(cfg.out), Path(cfg.out) / "merged", json.loads(done.read_text(encoding="utf-8")))
        else:
            res = distill(cfg, progress=args.progress)
        final = res.stats["rounds"][-1]
        held = final.get("heldout") or {}
        first, last = held.get("first", {}), held.get("final", {})
        if first.get("step") == 0 and base_kl is None:
            base_kl = first.get(KL)
        results["students"][loss] = {"merged": str(res.merged), "s_per_step": final["s_per_step"],
                                     "teacher_label_accuracy": res.stats.get("teacher_label_accuracy"),
                                     "teacher_response_s": res.stats.get("teacher_response_s"),
                                     "teacher_topk_s": final.get("teacher_topk_s"),
                                     "student_response_s": final.get("student_response_s"),
                                     "train_s": final["train_s"], "steps": final["steps"], "pairs": final["pairs"]["pairs"],
                                     "kl_final": last.get(KL), "peak_rss_mb": final["peak_rss_mb"],
                                     "teacher_tail_mass": final.get("teacher_tail_mass"),
                                     "prompts_too_long": res.stats.get("prompts_too_long", 0),
                                     "wall_s": round(time.perf_counter() - t0, 1)}
        print(f"{loss}: {final['steps']} steps, {final['s_per_step']} s/step, held-out KL {first.get(KL)} -> {last.get(KL)}",
              flush=True)

    # base and teacher as given (an offline: name runs on llama.cpp under --backend auto), students as merged folders
    models = {"base": args.student,
              **{loss: results["students"][loss]["merged"] for loss in losses if loss in results["students"]}}
    if args.with_teacher:
        models["teacher"] = args.teacher
    sets = eval_sets(args.eval_limit, args.out / "eval_sets", args.bank, args.bank_eval, args.seed)
    wanted = [x.strip() for x in args.sets.split(",") if x.strip()]
    sets = {k: v for k, v in sets.items() if k in wanted}
    if not sets:
        raise SystemExit(f"--sets {args.sets!r}: none of bank (needs --bank-eval), statute, mcq_dev")
    for set_name, gold in sets.items():
        for name, model in models.items():
            found = evaluate_model(name, model, gold, args, args.out / "eval" / set_name)
            results["eval"].setdefault(set_name, {})[name] = found
            acc = accuracy(found["rows"])
            print(f"{set_name} {name}: {acc[0]:.3f} [{acc[1]:.2f}, {acc[2]:.2f}] n={acc[3]}", flush=True)

    head = ["model"] + [f"{s} acc [95%]" for s in sets] + [f"{s} vs base (p)" for s in sets] + \
           [f"{s} vs sft (p)" for s in sets] + ["held-out KL", "s/question", "s/step"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    table = []
    for name in models:
        cells, row = [name], {"model": name}
        for s in sets:
            a = accuracy(results["eval"][s][name]["rows"])
            cells.append(f"{a[0]:.3f} [{a[1]:.2f}, {a[2]:.2f}]")
            row[f"{s}_accuracy"], row[f"{s}_ci95"] = a[0], [a[1], a[2]]
        for ref in ("base", "sft"):
            for s in sets:
                if name == ref or ref not in models:
                    cells.append("")
                    continue
                test = paired(results["eval"][s][name]["rows"], results["eval"][s][ref]["rows"], "mc_accuracy")
                cells.append(f"{test['diff']:+.3f}, p = {test['p_value']:.3g}")
                row[f"{s}_vs_{ref}"] = {"diff": test["diff"], "p": test["p_value"]}
        student = results["students"].get(name, {})
        kl = base_kl if name == "base" else student.get("kl_final")
        cells.append("" if kl is None else f"{kl:.4f}")
        sq = sum(results["eval"][s][name]["s_per_question"] for s in sets) / len(sets)
        cells.append(f"{sq:.2f}")
        cells.append(str(student.get("s_per_step", "")))
        row.update(kl=kl, s_per_question=sq, s_per_step=student.get("s_per_step"))
        table.append(row)
        print("| " + " | ".join(cells) + " |")
    results["table"] = table
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
