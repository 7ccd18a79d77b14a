"""evaluate: predict on labelled sets, score with the official FSKU metric, and track everything.

Usage:
    python -m fsku.steps.evaluate [--recipe experiments/<name>/evaluate.yaml] [--gold FILE[,FILE]] [--model ...] [--no-progress]
    fsku evaluate --gold ../shared/data/fsku-benchmark/mcq_dev.csv --kb outputs/lawkb --model offline:qwen2.5-coder-1.5b-instruct
    mlflow run . -e evaluate --env-manager local -P gold=evaluation/sample_qa.csv -P model=... -P context=gated

Logged to MLflow: the FSKU score and its parts, accuracy per domain / sub-domain, Korean ROUGE-L and
BLEU of descriptive answers, retrieval hit@k when labels exist, how often the gate let context in,
latency p50/p95 and the projected time for 515 questions, n and a 95 % interval of each headline
score (`<metric>_ci95_low/_high`, `<metric>_n`: Wilson for MC accuracy, bootstrap over questions
for the others, stratified by question type for the FSKU total), the gold set as an MLflow dataset
with its role (`dataset_role`: report / select / tune) and question-set digest; a report run warns
(and tags `fsku.report_warning`) when the model or KB was tuned or promoted on the same questions,
peak memory, a per-question table, plots
(accuracy by type, latency histogram) and the submission. No-context and with-context runs differ in
one parameter (`context`), so the MLflow UI compares them side by side.
"""
from __future__ import annotations

import dataclasses
import logging
import resource
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pandas as pd

from .. import tracking
from ..config import EvaluateConfig
from ..evaluate.compare import (
    EVALUATE_METRICS,
    contamination,
    format_interval,
    interval_metrics,
    intervals,
    question_set_digest,
)
from ..evaluate.fsku_metric import load_gold_sets, write_test_csv
from ..jsonl import write_jsonl
from .args import step_main
from .naming import run_labels
from .preflight import check_inputs

log = logging.getLogger(__name__)


def peak_memory_mb() -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        import torch

        if torch.cuda.is_available():
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    return out


def option_positions(table: pd.DataFrame) -> tuple[list[int], list[int]]:
    """(gold option, predicted option) of every multiple-choice row whose both are option numbers."""
    from ..evaluate.fsku_metric import mc_choice

    gold, pred = [], []
    for _, row in table[table["question_type"] == "multiple_choice"].iterrows():
        g, p = mc_choice(row["gold"]), mc_choice(row["answer"])
        if g is not None and p is not None:
            gold.append(g)
            pred.append(p)
    return gold, pred


def confusion(gold: list[int], pred: list[int]) -> np.ndarray:
    """counts[g - 1, p - 1]: rows gold option, columns predicted option, sized by the largest seen."""
    size = max(gold + pred, default=0)
    counts = np.zeros((size, size), dtype=int)
    for g, p in zip(gold, pred, strict=True):
        counts[g - 1, p - 1] += 1
    return counts


def _plots(table: pd.DataFrame, gate_threshold: Optional[float] = None):
    from .plotting import pyplot

    plt = pyplot()

    figs = {}
    fig, ax = plt.subplots(figsize=(5, 3.2))
    parts = table.groupby("question_type")["score"].mean()
    ax.bar(parts.index, parts.values, color=["#4c72b0", "#dd8452"][: len(parts)])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy / descriptive score")
    ax.set_title("score by question type")
    fig.tight_layout()
    figs["plots/score_by_type.png"] = fig
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(table["inference_time"], bins=min(30, max(5, len(table) // 3)), color="#55a868")
    ax.set_xlabel("seconds per question")
    ax.set_ylabel("questions")
    ax.set_title("latency")
    fig.tight_layout()
    figs["plots/latency_hist.png"] = fig
    gold, pred = option_positions(table)
    if gold:
        # position bias shows as a predicted-position histogram unlike the gold one, and as a column in the matrix
        counts = confusion(gold, pred)
        options = np.arange(1, counts.shape[0] + 1)
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
        width = 0.4
        left.bar(options - width / 2, counts.sum(axis=1), width, label="gold", color="#4c72b0")
        left.bar(options + width / 2, counts.sum(axis=0), width, label="predicted", color="#dd8452")
        left.set_xticks(options)
        left.set_xlabel("option")
        left.set_ylabel("questions")
        left.set_title("answer positions")
        left.legend(fontsize=8)
        right.imshow(counts, cmap="Blues")
        for (g, p), n in np.ndenumerate(counts):
            right.text(p, g, str(n), ha="center", va="center", fontsize=8)
        right.set_xticks(options - 1, options)
        right.set_yticks(options - 1, options)
        right.set_xlabel("predicted option")
        right.set_ylabel("gold option")
        right.set_title("confusion (multiple choice)")
        fig.tight_layout()
        figs["plots/mc_positions.png"] = fig
    domains = table[table["domain"].astype(str) != ""]
    if len(domains):
        parts = domains.groupby("domain")["score"].agg(["mean", "size"]).sort_values("mean")
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(parts) + 1.2))
        ax.barh([f"{d} (n={n})" for d, n in zip(parts.index, parts["size"], strict=True)], parts["mean"], color="#4c72b0")
        ax.set_xlim(0, 1)
        ax.set_xlabel("score")
        ax.set_title("score by domain")
        fig.tight_layout()
        figs["plots/score_by_domain.png"] = fig
    scores = pd.to_numeric(table.get("gate_score", pd.Series(dtype=float)), errors="coerce").dropna()
    if len(scores):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.hist(scores, bins=min(30, max(5, len(scores) // 3)), color="#8172b2")
        if gate_threshold is not None:
            ax.axvline(gate_threshold, color="#c44e52", lw=1.2, ls="--", label=f"gate threshold {gate_threshold:g}")
            opened = float((scores >= gate_threshold).mean())
            ax.set_title(f"best passage relevance (gate opens for {opened:.0%})")
            ax.legend(fontsize=8)
        else:
            ax.set_title("best passage relevance")
        ax.set_xlabel("gate signal")
        ax.set_ylabel("questions")
        fig.tight_layout()
        figs["plots/gate_scores.png"] = fig
    return figs


def judge_rag(cfg: EvaluateConfig, gold, records: dict, llm, kb, cosine) -> dict:
    """ragas-style RAG metrics on up to `judge_rows` descriptive rows, judged by a local LLM."""
    from ..evaluate.rag_metrics import YesNoJudge, rag_scores
    from ..infer import prompts
    from ..llm import load_llm

    judge_llm = llm if cfg.judge_model in ("same", cfg.model) else load_llm(tracking.resolve_model_uri(cfg.judge_model),
                                                                             **cfg.llm_kwargs())
    rows_gold = [g for g in gold if g.question_type == "descriptive"][: cfg.judge_rows]
    if not rows_gold:
        return {}
    texts = dict(zip(kb.chunks["chunk_id"], kb.chunks["text"], strict=True)) if kb is not None else {}
    retrieved = kb.search([g.question for g in rows_gold], top_k=cfg.top_k) if kb is not None and cfg.use_context \
        else [[] for _ in rows_gold]
    rows = []
    for g, hits in zip(rows_gold, retrieved, strict=True):
        rec = records[g.ID]
        rows.append({"question": g.question, "answer": rec["answer"], "reference": g.answer,
                     "used_context": "\n\n".join(texts[i] for i in rec.get("context_ids", []) if i in texts),
                     "passages": [h.text for h in hits]})

    def generate(prompt: str) -> str:
        chat = judge_llm.render_chat([{"role": "user", "content": prompt}])
        gen = judge_llm.generate([chat], max_new_tokens=48)[0]
        return prompts.clean_answer(gen.text, truncated=gen.truncated)

    log.info("judging %d descriptive rows with %s", len(rows), cfg.judge_model)
    out = rag_scores(YesNoJudge(judge_llm), generate, cosine, rows)
    out["rag_judge_rows"] = len(rows)
    return out


def lineage(cfg: EvaluateConfig, kb) -> dict[str, str]:
    """{what: comma-separated question-set digests} this run's model and KB were tuned or selected on:
    the KB manifest's tuned_on (recipes written by tune) and the promotion.gold_digest tag of a
    registered student or KB version (the set promote chose it on)."""
    used = {}
    if kb is not None and cfg.use_context and kb.params.get("tuned_on"):
        used["the KB's settings were tuned on it"] = kb.params["tuned_on"]
    for what, uri in (("the model was promoted on it", cfg.model),
                      ("the KB was promoted on it", cfg.kb if cfg.use_context else None)):
        if uri and str(uri).startswith("models:/"):
            name, version = tracking.parse_model_uri(uri)
            tags = tracking.model_version_tags(name, version)
            if tags.get("promotion.gold_digest"):
                used[what] = tags["promotion.gold_digest"]
    return used


def warn_if_selected_on(digest: str, cfg: EvaluateConfig, kb) -> None:
    """A report run on the questions its model or KB was tuned/selected on: a warning and a run tag."""
    found = contamination(digest, lineage(cfg, kb))
    if found:
        note = (f"this report set ({cfg.gold}, questions digest {digest}) is not held out: " + "; ".join(found)
                + ". Its score is optimistic; report on questions nothing was chosen on.")
        log.warning(note)
        tracking.set_tags({"fsku.report_warning": note})


MODEL_PAGE_METRICS = ("fsku_score", "mc_accuracy", "descriptive_score", "descriptive_cosine", "descriptive_keyword_recall")


def run_step(cfg: EvaluateConfig, progress: bool = True, llm=None, kb=None) -> dict:
    """Predict on cfg.gold, score, log everything to one MLflow run; `llm` / `kb`: already loaded ones."""
    from ..evaluate.fsku_metric import embedding_cosine, embedding_encoder, fsku_score, keyword_recall, memoized
    from ..evaluate.proxy import MIN_BACKGROUND, centre_of, descriptive_baselines
    from ..evaluate.text_metrics import text_scores
    from ..infer.predict import predict
    from ..outputs import check_not_input

    out = Path(cfg.out_dir)
    # out_dir receives test.csv, submission.csv and records.jsonl: it must not hold (or be inside) what is read
    check_not_input(out, {"--gold": [p.strip() for p in cfg.gold.split(",")],
                          "--retrieval-labels": [p.strip() for p in (cfg.retrieval_labels or "").split(",")],
                          "--kb": cfg.kb, "--model": cfg.model, "--judge-model": cfg.judge_model}, "--out-dir")
    check_inputs(models={"--model": cfg.model if llm is None else None,
                         "--judge-model": None if cfg.judge_model in (None, "", "same") else cfg.judge_model},
                 kbs={"--kb": cfg.kb if kb is None and cfg.use_context else None},
                 files={"--gold": cfg.gold, "--retrieval-labels": cfg.retrieval_labels})  # before anything loads
    gold = load_gold_sets(cfg.gold)
    load_s = None
    if llm is None:
        import time

        from ..llm import load_llm

        t0 = time.perf_counter()
        llm = load_llm(tracking.resolve_model_uri(cfg.model), **cfg.llm_kwargs())
        load_s = time.perf_counter() - t0
    if kb is None and cfg.use_context:
        from ..kb import KnowledgeBase

        kb = KnowledgeBase.load(tracking.resolve_model_uri(cfg.kb, "manifest.json"))
    test_csv = write_test_csv(gold, out / "test.csv")
    params = {k: v for k, v in dataclasses.asdict(cfg).items()}
    digest = question_set_digest([g.question for g in gold])
    with tracking.run("evaluate", params, tags={"fsku.model": cfg.model, "fsku.context": cfg.context,
                                                "fsku.dataset_role": cfg.dataset_role, "fsku.gold_digest": digest},
                      **run_labels("evaluate", cfg)) as active:
        gold_frame = pd.DataFrame([{"ID": g.ID, "question": g.question, "answer": g.answer, "question_type": g.question_type,
                                    "keywords": g.keywords} for g in gold])
        gold_name = "fsku-gold-" + "+".join(Path(p.strip()).stem for p in cfg.gold.split(","))
        gold_dataset = tracking.log_dataset(gold_frame, name=gold_name, source=cfg.gold, context="evaluation",
                                            targets="answer",
                                            tags={"fsku.role": cfg.dataset_role, "fsku.questions_digest": digest})
        if cfg.dataset_role == "report":
            warn_if_selected_on(digest, cfg, kb)
        result = predict(cfg, test_csv, out / "submission.csv", restart=cfg.restart, progress=progress, llm=llm, kb=kb)
        if load_s is not None:
            result.stats["load_s"] = load_s
        records = {r["ID"]: r for r in result.records}
        preds = {i: r["answer"] for i, r in records.items()}
        needs_cosine = any(g.question_type == "descriptive" for g in gold)
        encode = memoized(embedding_encoder(cfg.scorer_embedding)) if needs_cosine else None
        cosine = embedding_cosine(cfg.scorer_embedding, encode) if needs_cosine else (lambda a, b: [])
        score = fsku_score(gold, preds, cosine)
        rows = []
        for g in gold:
            r, s = records[g.ID], score["per_row"][g.ID]
            rows.append({"ID": g.ID, "question_type": g.question_type, "domain": g.domain, "sub_domain": g.sub_domain,
                         "question": g.question[:300], "gold": g.answer[:300], "answer": r["answer"][:500],
                         "score": s.get("correct", s.get("score")), "cosine": s.get("cosine"),
                         "keyword_recall": s.get("keyword_recall"), "confidence": r["confidence"],
                         "raw_choice": r.get("raw_choice"), "n_context": r["n_context"],
                         "inference_time": r["inference_time"], "used_fallback": r["used_fallback"], "error": r.get("error", ""),
                         "gate_score": r.get("gate_score")})
        table = pd.DataFrame(rows)
        desc = [g for g in gold if g.question_type == "descriptive"]
        text = text_scores([preds[g.ID] for g in desc], [g.answer for g in desc]) if desc else {}
        times = table["inference_time"].to_numpy(dtype=float)
        metrics = {
            "fsku_score": score["total"], "mc_accuracy": score["mc_accuracy"], "descriptive_score": score["descriptive_score"],
            "descriptive_cosine": score["descriptive_cosine"], "descriptive_keyword_recall": score["descriptive_keyword_recall"],
            "rouge_l": text.get("rouge_l"), "bleu": text.get("bleu"),
            "n_questions": len(gold), "n_multiple_choice": score["n_multiple_choice"], "n_descriptive": score["n_descriptive"],
            "missing": len(score["missing"]), "context_rate": float((table["n_context"] > 0).mean()),
            "fallback_rate": float(table["used_fallback"].mean()),
            "latency_p50_s": float(np.percentile(times, 50)), "latency_p95_s": float(np.percentile(times, 95)),
            "latency_mean_s": float(times.mean()), "model_load_s": result.stats["load_s"],
            "projected_minutes": (result.stats["load_s"] + cfg.projected_questions * float(times.mean())) / 60,
            "timeouts": result.stats["timeouts"], "errors": result.stats["errors"], "cache_hits": result.stats["cache_hits"],
            **peak_memory_mb(),
        }
        answered = [bool(str(preds.get(g.ID, "") or "").strip()) for g in desc]
        if encode is not None and len(desc) >= 2 and sum(answered) >= 1:
            # the cosine is a proxy (the organisers' embedder is not ours): the calibration rows say what
            # echoing the question and another row's reference score on it, raw and centred (issue 23); over
            # every descriptive row (an unanswered one scores 0, as in the headline); the centre from the
            # questions, not from the references being scored
            questions = encode([g.question for g in desc])
            centre = centre_of(questions) if len(desc) >= MIN_BACKGROUND else None
            base = descriptive_baselines(encode([preds.get(g.ID) or " " for g in desc]), encode([g.answer for g in desc]),
                                         questions, centre=centre, answered=answered)
            metrics.update({f"descriptive_cosine_{k}": v for k, v in base.items() if k != "raw"})
            echo_recall = [keyword_recall(g.question, g.keywords) for g in desc if g.keywords]
            metrics["descriptive_keyword_recall_echo_question"] = float(np.mean(echo_recall)) if echo_recall else None
        # n and a 95 % interval for each headline quality metric (Wilson / bootstrap over questions)
        found = intervals(rows, EVALUATE_METRICS)
        metrics.update(interval_metrics(found))
        mc = table[table["question_type"] == "multiple_choice"]
        if len(mc) and mc["raw_choice"].notna().any():
            gold_choice = {g.ID: g.answer.strip()[:1] for g in gold if g.question_type == "multiple_choice"}
            metrics["mc_accuracy_raw_order"] = float(np.mean([str(int(rc)) == gold_choice[i]
                                                              for i, rc in zip(mc["ID"], mc["raw_choice"], strict=True)]))
        for level in ("domain", "sub_domain"):
            for name, grp in table[table[level] != ""].groupby(level):
                metrics[f"score_{level}/{name}"] = float(grp["score"].mean())
        labels = cfg.retrieval_labels or ",".join(p for p in cfg.gold.split(",") if p.strip().endswith(".jsonl"))
        if labels and result.stats and cfg.use_context:
            from ..evaluate.retrieval import evaluate_retrieval
            from ..kb import KnowledgeBase

            kb_obj = kb or KnowledgeBase.load(tracking.resolve_model_uri(cfg.kb, "manifest.json"))
            # the KB's own fusion settings, as the predictions above searched it
            rcfg = dataclasses.replace(kb_obj.retrieve_defaults(), top_k=max(5, cfg.top_k))
            for part in labels.split(","):
                try:
                    rmetrics, _ = evaluate_retrieval(kb_obj, part.strip(), rcfg)
                except ValueError as e:  # a gold JSONL without retrieval labels
                    log.info("no retrieval metrics for %s: %s", part, e)
                    continue
                rmetrics.pop("curve", None)
                metrics.update({f"retrieval_{k}": v for k, v in rmetrics.items() if isinstance(v, (int, float))})
        if cfg.judge_model:
            metrics.update(judge_rag(cfg, gold, records, llm, kb,
                                     cosine if needs_cosine else embedding_cosine(cfg.scorer_embedding)))
        # the headline scores are linked to the registered model and the gold set: the model's page shows them
        headline = {k: v for k, v in metrics.items() if k in MODEL_PAGE_METRICS and v is not None}
        tracking.log_metrics(headline, model_uri=cfg.model, dataset=gold_dataset)
        tracking.log_metrics({k: v for k, v in metrics.items() if v is not None and k not in headline})
        tracking.log_table(table, "per_question.json")
        for name, fig in _plots(table, cfg.gate_threshold if cfg.context == "gated" else None).items():
            tracking.log_figure(fig, name)
        tracking.log_artifact(result.submission, "submission")
        records_path = out / "records.jsonl"
        write_jsonl(result.records, records_path)
        tracking.log_artifact(records_path, "submission")
        summary = {k: v for k, v in score.items() if k != "per_row"}
        summary["intervals"] = found
        summary["scorer_embedding"] = cfg.scorer_embedding if needs_cosine else "none"
        tracking.log_dict(summary, "fsku_score.json")
        return {"run_id": active.info.run_id, "metrics": metrics, "intervals": found, "table": table, "gold_digest": digest,
                "submission": str(result.submission),
                "tracking_uri": tracking.tracking_uri()}


def report(cfg: EvaluateConfig, res: dict) -> Iterator[str]:
    m = res["metrics"]

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    ivs = res.get("intervals", {})

    def fmt_iv(name):
        return format_interval(ivs[name]) if name in ivs else fmt(m.get(name))

    yield (f"FSKU score {fmt_iv('fsku_score')}; MC accuracy {fmt_iv('mc_accuracy')}; descriptive "
           f"{fmt_iv('descriptive_score')} (95 % intervals)")
    yield (f"p50 {m['latency_p50_s']:.2f} s/question, projected {m['projected_minutes']:.1f} min for "
           f"{cfg.projected_questions} questions")
    yield f"submission: {res['submission']}\nmlflow run: {res['run_id']}  tracking: {res['tracking_uri']}"


def main(argv: list[str] | None = None) -> int:
    return step_main(argv, EvaluateConfig, "fsku evaluate", __doc__, run_step, report)


if __name__ == "__main__":
    sys.exit(main())
