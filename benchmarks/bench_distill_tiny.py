"""Miniature distillation experiment: a tiny teacher (~4 M parameters) -> a tiny student (~0.5 M),
same step budget, 3 seeds, for the loss types sft, kd, gkd and distillm_v2 (and rkl with --all).

    python benchmarks/bench_distill_tiny.py [--steps 300] [--seeds 0,1,2] [--json results.json]

Task (synthetic multiple-choice QA in the competition's prompt format, built from words of the
project's own sample corpus): "which category does term X belong to?", the four categories are the
options. Every term has a hidden answer distribution (its true category 0.7, a confusable one 0.2,
the other two 0.05 each), so the teacher's soft labels carry knowledge that a single sampled
answer does not. Held-out items ask about the same terms with stem phrasings never used in
training, so they measure what the student learned about the terms, not the wording.

1. The teacher is trained by SFT on labels sampled from those distributions, for two disjoint sets
   of terms: the base terms and the distillation terms. The base student is trained the same way
   on the base terms only: it knows the task (attend to the term, answer with a digit) but nothing
   about the distillation terms, like a small general model before domain distillation. (A base
   student trained on the answer format alone, with uniform labels, never left the uniform
   answer in 300 LoRA steps at any learning rate tried: its attention had nothing to build on.)
2. For every seed and loss type, `fsku.distill.pipeline.distill` trains a LoRA on that base
   student with the same number of steps (teacher responses, then student responses, then pairs).
3. Held-out metrics of each merged student: answer accuracy against the true category (argmax over
   the option-number logits, as inference scores options) and the token-level forward
   KL(teacher || student) on the teacher's greedy held-out responses, on the distillation terms
   only. The base student is the reference.
Prints a table; ratios are against the sft baseline in the same run.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from fsku.config import DistillConfig  # noqa: E402
from fsku.distill import losses as L  # noqa: E402
from fsku.distill.data import build_prompts  # noqa: E402
from fsku.distill.pipeline import distill  # noqa: E402
from fsku.evaluate.stats import wilson_interval  # noqa: E402
from fsku.llm.tiny import _default_texts, build_tiny_model, train_on_examples, train_tokenizer  # noqa: E402
from fsku.synth.records import SyntheticQA, write_jsonl  # noqa: E402

CATEGORIES = ["전자금융", "개인정보", "신용정보", "정보보호"]
TRAIN_STEMS = ["다음 중 '{t}'이(가) 속하는 분류는 무엇인가?", "'{t}'은(는) 어느 분야의 용어인가?",
               "'{t}'에 관한 규정은 어느 분야에 해당하는가?", "다음 중 '{t}'와 가장 관련이 깊은 분야는?"]
HELDOUT_STEMS = ["'{t}'을(를) 다루는 분야로 옳은 것은?", "다음 중 '{t}'의 소관 분야를 고르시오."]


def corpus_words(limit: int = 48) -> list[str]:
    """`limit` distinct Korean words of the sample corpus (never category names), in a fixed order."""
    text = "\n".join(_default_texts())
    words = sorted(set(re.findall(r"[가-힣]{2,5}", text)) - set(CATEGORIES))
    random.Random(0).shuffle(words)
    return words[:limit]


def answer_distributions(terms: list[str]) -> dict[str, list[float]]:
    """Each term: its true category 0.7, a confusable one 0.2, the other two 0.05 each."""
    rng = random.Random(7)
    dists = {}
    for term in terms:
        true, confusable = rng.sample(range(len(CATEGORIES)), 2)
        probs = [0.05] * len(CATEGORIES)
        probs[true], probs[confusable] = 0.7, 0.2
        dists[term] = probs
    return dists


def make_items(terms: list[str], dists: dict[str, list[float]], stems: list[str], n: int, seed: int,
               prefix: str) -> list[SyntheticQA]:
    """n items over `terms` and `stems`; the answer is sampled from the term's distribution
    (held-out accuracy uses `true_answer`)."""
    rng = random.Random(seed)
    choices = {str(k + 1): c for k, c in enumerate(CATEGORIES)}
    items = []
    for i in range(n):
        term, stem = rng.choice(terms), rng.choice(stems)
        answer = rng.choices(range(len(CATEGORIES)), weights=dists[term])[0] + 1
        question = "\n".join([stem.format(t=term)] + [f"{k} {o}" for k, o in choices.items()])
        items.append(SyntheticQA(qa_id=f"{prefix}{i}", kind="multiple_choice", qtype="lookup", question=question,
                                 answer=str(answer), choices=choices, source_article=term, split="train"))
    return items


def true_answer(dists: dict[str, list[float]], term: str) -> str:
    probs = dists[term]
    return str(probs.index(max(probs)) + 1)


@torch.no_grad()
def heldout_metrics(model_dir: Path, teacher, tok, prompts: list[dict], gold: list[str]) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    digit_ids = [tok.convert_tokens_to_ids(str(k)) for k in range(1, 5)]
    correct, kls = 0, []
    for row, g in zip(prompts, gold, strict=True):
        text = tok.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        t_logits = teacher(input_ids=torch.tensor([ids])).logits[0, -1]
        # the teacher's greedy response (its answer token, then end of turn) is the KL target
        answer = int(t_logits[digit_ids].argmax())
        full = ids + [digit_ids[answer], tok.eos_token_id]
        s_all = model(input_ids=torch.tensor([full])).logits[0, len(ids) - 1:-1]
        t_all = teacher(input_ids=torch.tensor([full])).logits[0, len(ids) - 1:-1]
        log_q, log_p = L.shared_log_softmax(s_all, t_all, vocab_size=len(tok))
        kls.append(L.forward_kl(log_p, log_q).mean().item())
        correct += int(int(s_all[0][digit_ids].argmax()) + 1 == int(g))
    return {"accuracy": correct / len(gold), "correct": correct, "n": len(gold), "kl": statistics.mean(kls)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="distillation steps per run (the same for every loss)")
    ap.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate of every distillation run")
    ap.add_argument("--teacher-steps", type=int, default=800)
    # measured: at 2e-3 the 4-layer teacher stays on the answer marginal (loss 0.69 after 400
    # steps); at 1e-3 it learns the terms (loss 0.50 after 300 steps; optimum ~0.43)
    ap.add_argument("--teacher-lr", type=float, default=1e-3)
    ap.add_argument("--student-steps", type=int, default=500, help="training of the base student on the base terms")
    ap.add_argument("--student-lr", type=float, default=2e-3)
    ap.add_argument("--n-terms", type=int, default=16, help="distillation terms (the base terms are as many others)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--losses", default="sft,kd,gkd,distillm_v2")
    ap.add_argument("--n-train", type=int, default=400, help="distillation prompts")
    ap.add_argument("--n-teacher", type=int, default=6000,
                    help="items the teacher (and, on the base terms, the base student) see")
    ap.add_argument("--n-heldout", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="fsku-distill-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    words = corpus_words(2 * args.n_terms)
    terms, base_terms = words[:args.n_terms], words[args.n_terms:]
    dists = answer_distributions(words)
    train_items = make_items(terms, dists, TRAIN_STEMS, args.n_train, seed=1, prefix="tr")
    held_items = make_items(terms, dists, HELDOUT_STEMS, args.n_heldout, seed=2, prefix="ho")
    held_prompts = build_prompts(held_items)
    gold = [true_answer(dists, r.source_article) for r in held_items]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(_default_texts(), tok_dir, vocab_size=2000)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    teacher_dir, student_dir = work / "teacher", work / "student"

    def pretrain(model_dir: Path, items: list[SyntheticQA], steps: int, lr: float, **arch) -> None:
        if (model_dir / "sft_done.json").exists():
            return
        build_tiny_model(model_dir, tok_dir, **arch)
        t0 = time.perf_counter()
        examples = [(p["messages"], r.answer) for p, r in zip(build_prompts(items), items, strict=True)]
        info = train_on_examples(model_dir, examples, steps=steps, lr=lr, batch_size=16)
        info["seconds"] = round(time.perf_counter() - t0, 1)
        (model_dir / "sft_done.json").write_text(json.dumps(info))
        print(f"{model_dir.name} SFT: {info}", flush=True)

    # the teacher learns all terms from its own, larger sample of noisy labels
    pretrain(teacher_dir, make_items(words, dists, TRAIN_STEMS, args.n_teacher, seed=3, prefix="te"),
             args.teacher_steps, args.teacher_lr, hidden=256, layers=4, heads=8, seed=1)
    # the base student learns the task on the base terms only
    pretrain(student_dir, make_items(base_terms, dists, TRAIN_STEMS, args.n_teacher, seed=4, prefix="bs"),
             args.student_steps, args.student_lr, hidden=96, layers=2, heads=4, seed=2)
    count = lambda d: sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(d).parameters())  # noqa: E731
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    sizes = {"teacher_params": count(teacher_dir), "student_params": count(student_dir)}
    base_held = make_items(base_terms, dists, HELDOUT_STEMS, args.n_heldout, seed=5, prefix="hb")
    ref = {"teacher": heldout_metrics(teacher_dir, teacher, tok, held_prompts, gold),
           "base_student": heldout_metrics(student_dir, teacher, tok, held_prompts, gold),
           "base_student_on_base_terms": heldout_metrics(student_dir, teacher, tok, build_prompts(base_held),
                                                         [true_answer(dists, r.source_article) for r in base_held])}
    print(f"teacher {sizes['teacher_params'] / 1e6:.2f} M params: held-out accuracy {ref['teacher']['accuracy']:.3f}; "
          f"student {sizes['student_params'] / 1e6:.2f} M params, base: accuracy {ref['base_student']['accuracy']:.3f}, "
          f"KL {ref['base_student']['kl']:.3f} (on its own base terms: accuracy "
          f"{ref['base_student_on_base_terms']['accuracy']:.3f})", flush=True)

    synth = work / "synth"
    write_jsonl(train_items, synth / "train.jsonl")
    results: dict[str, list[dict]] = {}
    for loss in args.losses.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            out = work / f"{loss}_s{seed}"
            cfg = DistillConfig(data=str(synth), teacher=str(teacher_dir), student=str(student_dir), backend="transformers",
                                device="cpu", dtype="float32", out=str(out), loss_type=loss, max_steps=args.steps,
                                batch_size=8, learning_rate=args.lr, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                                max_model_len=512, max_prompt_length=448, mc_max_new_tokens=3, temperature=1.0,
                                gen_batch_size=32, seed=seed, register_as=None, cache_dir=str(work / "cache"),
                                logging_steps=10, save_steps=10**6, restart=True,
                                # as the tiny models were trained and are measured here: plain prompt, generated
                                # answer; the held-out metrics below are this benchmark's own
                                mc_prompt="plain", mc_target="generated", eval_prompts=0)
            t0 = time.perf_counter()
            res = distill(cfg, progress=False)
            m = heldout_metrics(res.merged, teacher, tok, held_prompts, gold)
            m.update(seconds=round(time.perf_counter() - t0, 1), s_per_step=res.stats["rounds"][-1]["s_per_step"])
            results.setdefault(loss, []).append(m)
            low, high = wilson_interval(m["correct"], m["n"])
            m["accuracy_ci95"] = [low, high]
            print(f"{loss:12s} seed {seed}: accuracy {m['accuracy']:.3f} [{low:.2f}, {high:.2f}] (n={m['n']}, 95% Wilson)"
                  f"  KL {m['kl']:.4f}  ({m['seconds']} s)", flush=True)

    summary = {}
    for loss, runs in results.items():
        acc = [r["accuracy"] for r in runs]
        kl = [r["kl"] for r in runs]
        summary[loss] = {"accuracy_mean": statistics.mean(acc), "accuracy_sd": statistics.pstdev(acc),
                         "kl_mean": statistics.mean(kl), "kl_sd": statistics.pstdev(kl)}
    base = summary.get("sft")
    print(f"\nheld-out ({args.n_heldout} items), {args.steps} steps, seeds {args.seeds}; "
          f"teacher accuracy {ref['teacher']['accuracy']:.3f}; base student accuracy {ref['base_student']['accuracy']:.3f}, "
          f"KL {ref['base_student']['kl']:.4f}")
    print(f"{'loss':12s} {'accuracy':>16s} {'KL(teacher||student)':>24s} {'KL / sft KL':>12s}")
    for loss, s in summary.items():
        ratio = s["kl_mean"] / base["kl_mean"] if base else float("nan")
        print(f"{loss:12s} {s['accuracy_mean']:.3f} ± {s['accuracy_sd']:.3f}    {s['kl_mean']:.4f} ± {s['kl_sd']:.4f}"
              f"        {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": sizes, "reference": ref, "runs": results, "summary": summary,
                                               "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
