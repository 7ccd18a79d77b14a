"""tune: search space (conditional parameters, baseline, recipes), KB retrieval defaults and query
memo, the retrieval objective, studies as nested MLflow runs that resume by name and share storage
across processes, and a distill study with pruning on the tiny pair."""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import optuna
import pytest

from conftest import ROOT, SAMPLE_CORPUS, SAMPLE_LABELS
from fsku.config import BuildKBConfig, DistillConfig, RetrieveConfig, TuneConfig, load_recipe
from fsku.tune import (
    Param,
    baseline_params,
    distill_space,
    kb_key,
    parse_choices,
    recipes_from_params,
    retrieval_space,
    suggest,
    write_recipes,
)

SPACE = retrieval_space((320, 480), (0, 32), ("kiwi", "char_bigram"))


def test_conditional_parameters_are_sampled_only_when_their_condition_holds():
    hierarchy = {"statute_family": True, "family_share": 0.8, "w_level": 0.1, "w_link": 0.0, "group": "chunk"}
    rrf = suggest(optuna.trial.FixedTrial({"chunk_size": 320, "chunk_overlap": 0, "bm25_tokenizer": "kiwi",
                                           "fusion": "rrf", "rrf_k": 10, "w_law": 0.1, "w_article": 0.0, **hierarchy}),
                  SPACE)
    assert rrf == {"chunk_size": 320, "chunk_overlap": 0, "bm25_tokenizer": "kiwi", "fusion": "rrf", "rrf_k": 10,
                   "w_law": 0.1, "w_article": 0.0, **hierarchy}
    mm = suggest(optuna.trial.FixedTrial({"chunk_size": 480, "chunk_overlap": 32, "bm25_tokenizer": "kiwi",
                                          "fusion": "minmax", "w_bm25": 0.7, "w_law": 0.0, "w_article": 0.2,
                                          **hierarchy, "group": "article", "sibling_bonus": 0.2, "article_chunks": 2}),
                 SPACE)
    assert "rrf_k" not in mm and mm["w_bm25"] == 0.7 and mm["sibling_bonus"] == 0.2
    assert "sibling_bonus" not in rrf and "article_chunks" not in rrf  # only per article
    assert mm["article_chunks"] == 2
    # the family's share only with the family prior on
    off = suggest(optuna.trial.FixedTrial({"chunk_size": 320, "chunk_overlap": 0, "bm25_tokenizer": "kiwi",
                                           "fusion": "rrf", "rrf_k": 10, "w_law": 0.1, "w_article": 0.0,
                                           **hierarchy, "statute_family": False}), SPACE)
    assert "family_share" not in off and mm["family_share"] == 0.8
    # a single choice is fixed, not searched
    assert [p.name for p in retrieval_space((480,), (32,), ("kiwi",))] == [
        "fusion", "w_bm25", "rrf_k", "w_law", "w_article", "statute_family", "family_share", "w_level", "w_link", "group",
        "sibling_bonus",
        "article_chunks"]


def test_a_random_study_stays_inside_the_space():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen = []
    study.optimize(lambda t: (seen.append(suggest(t, SPACE)) or 0.0), n_trials=25)
    for p in seen:
        assert p["chunk_size"] in (320, 480) and p["bm25_tokenizer"] in ("kiwi", "char_bigram")
        assert ("w_bm25" in p) == (p["fusion"] == "minmax") and ("rrf_k" in p) == (p["fusion"] == "rrf")
        assert 0 <= p["w_law"] <= 0.5 and 0 <= p["w_article"] <= 0.5
    assert {p["fusion"] for p in seen} == {"minmax", "rrf"}


def test_param_and_choice_validation():
    with pytest.raises(ValueError, match="needs choices"):
        Param("x", "categorical")
    with pytest.raises(ValueError, match="log-scale"):
        Param("lr", "float", 0.0, 1.0, log=True)
    with pytest.raises(ValueError, match="kind"):
        Param("x", "bool")
    assert parse_choices("320, 480,320", int) == (320, 480)
    with pytest.raises(ValueError, match="'abc' is not a valid int"):
        parse_choices("320,abc", int)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_choices(" , ", str)


def test_baseline_is_the_default_configuration_inside_the_space():
    defaults = dataclasses.asdict(BuildKBConfig())
    hierarchy = {k: defaults[k] for k in ("statute_family", "w_level", "w_link", "group")}
    hierarchy.update({"family_share": defaults["family_share"]} if defaults["statute_family"] else {})
    assert baseline_params(SPACE, defaults) == {"chunk_size": 480, "chunk_overlap": 32, "bm25_tokenizer": "kiwi",
                                                "fusion": "minmax", "w_bm25": defaults["w_bm25"], "w_law": 0.1,
                                                "w_article": 0.2, **hierarchy,
                                                **({"sibling_bonus": defaults["sibling_bonus"],
                                                    "article_chunks": defaults["article_chunks"]}
                                                   if defaults["group"] == "article" else {})}
    # a default outside the choices is left to the sampler; inactive conditionals are dropped
    small = retrieval_space((320, 640), (0, 32), ("kiwi",))
    assert "chunk_size" not in baseline_params(small, defaults)
    assert "rrf_k" not in baseline_params(small, {**defaults, "rrf_k": 60})
    d = distill_space(("distillm_v2", "sft"), 1e-4, 3e-3, (4, 16))
    assert baseline_params(d, dataclasses.asdict(DistillConfig())) == {"loss_type": "distillm_v2", "alpha": 0.1, "beta": 1.0,
                                                                        "learning_rate": 2e-4, "lora_r": 16}
    assert [p.name for p in distill_space(("sft",), 1e-4, 1e-3, (8,))] == ["learning_rate"]


def test_recipes_from_the_best_params_load_as_stage_configs(tmp_path):
    assert kb_key({"chunk_size": 320, "chunk_overlap": 0, "bm25_tokenizer": "kiwi"}) == "cs320_ov0_kiwi"
    best = {"chunk_size": 320, "chunk_overlap": 0, "bm25_tokenizer": "char_bigram", "fusion": "rrf", "rrf_k": 12,
            "w_law": 0.3, "w_article": 0.05}
    recipes = recipes_from_params("retrieval", best, build=BuildKBConfig(corpus="docs"))
    # recipes hold only what differs from the defaults
    assert "chunk_overlap" not in recipes["retrieve"] and recipes["retrieve"]["fusion"] == "rrf"
    assert "embedding_model" not in recipes["build_kb"] and recipes["build_kb"]["corpus"] == "docs"
    paths = write_recipes(tmp_path / "tuned", recipes, "best trial 7\nsecond line")
    kb = load_recipe(tmp_path / "tuned" / "build_kb.yaml")
    assert (kb.corpus, kb.chunk_size, kb.chunk_overlap, kb.bm25_tokenizer, kb.fusion, kb.rrf_k, kb.w_law) == \
        ("docs", 320, 0, "char_bigram", "rrf", 12, 0.3)
    ret = load_recipe(tmp_path / "tuned" / "retrieve.yaml")
    assert (ret.fusion, ret.rrf_k, ret.w_article) == ("rrf", 12, 0.05)
    assert paths[0].read_text(encoding="utf-8").startswith("# best trial 7\n# second line\n")
    d = recipes_from_params("distill", {"loss_type": "kd", "learning_rate": 1e-3, "lora_r": 8})["distill"]
    write_recipes(tmp_path / "d", {"distill": d}, "x")
    cfg = load_recipe(tmp_path / "d" / "distill.yaml")
    assert (cfg.loss_type, cfg.learning_rate, cfg.lora_r, cfg.lora_alpha) == ("kd", 1e-3, 8, 16)
    with pytest.raises(ValueError, match="unknown study"):
        recipes_from_params("chunks", {})


def test_tune_config_checks():
    assert TuneConfig(study="distill").study_name == "fsku-distill"
    for bad, message in (({"study": "x"}, "study must be retrieval or distill"),
                         ({"n_trials": 0}, "n_trials must be >= 1"),
                         ({"sampler": "cma"}, "sampler must be tpe or random"),
                         ({"pruner": "asha"}, "pruner must be median, hyperband or none"),
                         ({"storage": "optuna.db"}, "storage must be a database URL"),
                         ({"lr_min": 1e-2, "lr_max": 1e-3}, "need 0 < lr_min <= lr_max"),
                         ({"base_recipe": "experiments/x/distill.yaml"},
                          "base_recipe of a retrieval study must be a build_kb.yaml")):
        with pytest.raises(ValueError, match=message):
            TuneConfig(**bad)


def test_kb_search_uses_the_settings_stored_in_the_kb_and_memoises_the_query_side(sample_kb):
    kb = sample_kb[0]
    q = ["금융회사등이 보안사고를 알게 된 때 감독기관 보고 기한"]
    assert kb.retrieve_defaults().fusion == "minmax" and kb.retrieve_defaults().w_bm25 == RetrieveConfig.w_bm25
    kb.search(q, top_k=3)
    calls = []
    tok = kb.tokenizer()
    kb._tokenizer = lambda texts: (calls.append(list(texts)), tok(texts))[1]
    try:
        kb.search(q, top_k=3, w_bm25=0.2, w_law=0.0)  # other weights, same question: no tokenisation
        kb.search(q, top_k=3, fusion="rrf")
        assert calls == []
        kb.search(["전혀 다른 질문입니다"], top_k=3)
        assert calls == [["전혀 다른 질문입니다"]]
        params = kb.manifest["params"]
        old = dict(params)
        params.update(w_bm25=1.0)  # a KB built (or tuned) BM25-only answers BM25-only by default
        try:
            assert kb.search(q, top_k=3)[0][0].method == "bm25"
        finally:
            params.clear()
            params.update(old)
    finally:
        kb._tokenizer = tok


def test_retrieval_objective_builds_one_kb_per_chunking_and_reuses_it(tmp_path):
    from fsku.tune import RetrievalObjective

    base = BuildKBConfig(corpus=str(SAMPLE_CORPUS), cache_dir=str(tmp_path / "cache"), register_as=None)
    obj = RetrievalObjective(base, str(SAMPLE_LABELS), tmp_path / "kbs")
    default = obj.evaluate({"fusion": "minmax", "w_bm25": 0.5})
    bm25 = obj.evaluate({"fusion": "minmax", "w_bm25": 1.0, "w_law": 0.0, "w_article": 0.0})
    small = obj.evaluate({"chunk_size": 64, "chunk_overlap": 8, "fusion": "rrf", "rrf_k": 30})
    assert sorted(p.name for p in (tmp_path / "kbs").iterdir()) == ["cs480_ov32_kiwi", "cs64_ov8_kiwi"]
    assert small["kb_chunks"] > default["kb_chunks"]
    for m in (default, bm25, small):
        assert 0 < m["mrr_at_10"] <= 1 and m["n_queries"] == len(SAMPLE_LABELS.read_text(encoding="utf-8").splitlines())
    # a second objective (another worker) reuses the finished KB folders instead of building
    again = RetrievalObjective(base, str(SAMPLE_LABELS), tmp_path / "kbs")
    mtime = (tmp_path / "kbs" / "cs480_ov32_kiwi" / "manifest.json").stat().st_mtime
    assert again.evaluate({"fusion": "minmax", "w_bm25": 0.5})["mrr_at_10"] == default["mrr_at_10"]
    assert (tmp_path / "kbs" / "cs480_ov32_kiwi" / "manifest.json").stat().st_mtime == mtime
    with pytest.raises(ValueError, match="metric 'ndcg' is not computed"):
        RetrievalObjective(base, str(SAMPLE_LABELS), tmp_path / "kbs", metric="ndcg")


def _base_recipe(tmp_path) -> str:
    """The build_kb recipe every retrieval trial starts from (the study's stage settings)."""
    (tmp_path / "base").mkdir(exist_ok=True)
    path = tmp_path / "base" / "build_kb.yaml"
    path.write_text(f"corpus: {SAMPLE_CORPUS}\n", encoding="utf-8")
    return str(path)


def _retrieval_cfg(tmp_path, **kw) -> TuneConfig:
    values = dict(study="retrieval", storage=f"sqlite:///{tmp_path}/optuna.db", n_trials=4, sampler="random", seed=0, folds=0,
                  out=str(tmp_path / "tune"), recipe_out=str(tmp_path / "recipes"), base_recipe=_base_recipe(tmp_path),
                  labels=str(SAMPLE_LABELS), chunk_sizes="320,480", chunk_overlaps="32", bm25_tokenizers="kiwi")
    values.update(kw)
    return TuneConfig(**values)


def test_retrieval_study_nested_runs_plots_recipes_and_resume_by_name(tmp_path):
    import mlflow

    from fsku.steps.tune import run_step as tune_step

    out = tune_step(_retrieval_cfg(tmp_path), progress=False)
    m = out["metrics"]
    assert m["trials_complete"] == 4 and m["trials_failed"] == 0
    assert m["best_value"] >= m["baseline_value"] > 0
    client = mlflow.tracking.MlflowClient()
    parent = client.get_run(out["run_id"])
    assert parent.data.tags["optuna.study"] == "fsku-retrieval" and parent.data.metrics["best_value"] == m["best_value"]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{out['run_id']}'")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == [0, 1, 2, 3]
    assert all(r.data.tags["optuna.state"] == "COMPLETE" and "mrr_at_10" in r.data.metrics for r in children)
    assert sum(r.data.tags["optuna.baseline"] == "True" for r in children) == 1
    artifacts = {a.path for a in client.list_artifacts(out["run_id"], "plots")}
    assert {"plots/optimization_history.png", "plots/param_importances.png", "plots/parallel_coordinate.png"} <= artifacts
    # the same plots, interactive (plotly HTML), beside the PNGs
    assert {"plots/optimization_history.html", "plots/param_importances.html", "plots/parallel_coordinate.html"} <= artifacts
    best = load_recipe(tmp_path / "recipes" / "build_kb.yaml")
    assert best.chunk_size == out["best_params"]["chunk_size"] and best.fusion == out["best_params"]["fusion"]
    # the same name joins the stored study: 2 more trials, no second baseline
    again = tune_step(_retrieval_cfg(tmp_path, n_trials=2, seed=1), progress=False)
    assert again["metrics"]["trials_total"] == 6 and again["metrics"]["trials_complete"] == 6
    study = optuna.load_study(study_name="fsku-retrieval", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.trials) == 1
    with pytest.raises(ValueError, match="direction MAXIMIZE"):
        tune_step(TuneConfig(study="distill", study_name="fsku-retrieval", storage=f"sqlite:///{tmp_path}/optuna.db",
                             out=str(tmp_path / "tune")), progress=False)


def test_retrieval_study_selects_on_the_tuning_folds_and_checks_the_held_out_one(tmp_path):
    import mlflow

    from fsku.steps.tune import report
    from fsku.steps.tune import run_step as tune_step
    from fsku.tune import RetrievalObjective

    base = BuildKBConfig(corpus=str(SAMPLE_CORPUS), cache_dir=str(tmp_path / "cache"), register_as=None)
    obj = RetrievalObjective(base, str(SAMPLE_LABELS), tmp_path / "kbs", folds=2, fold_seed=0)
    n = len(SAMPLE_LABELS.read_text(encoding="utf-8").splitlines())
    assert len(obj.parts["tune"]) + len(obj.parts["holdout"]) == n and not set(obj.parts["tune"]) & set(obj.parts["holdout"])
    params = {"fusion": "minmax", "w_bm25": 0.5}
    assert obj.evaluate(params)["n_queries"] == len(obj.parts["tune"])
    assert obj.evaluate(params, "holdout")["n_queries"] == len(obj.parts["holdout"])
    assert obj.evaluate(params, "all")["n_queries"] == n
    same = obj.holdout_check(params, params)
    assert same["paired"]["diff"] == 0 and same["paired"]["p_value"] == 1.0 and same["keep_tuned"]
    with pytest.raises(ValueError, match="cannot fill"):
        RetrievalObjective(base, str(SAMPLE_LABELS), tmp_path / "kbs", folds=n + 1)
    with pytest.raises(ValueError, match="per-query paired test"):
        RetrievalObjective(base, str(SAMPLE_LABELS), tmp_path / "kbs", metric="recall_at_5", folds=2)

    cfg = _retrieval_cfg(tmp_path, folds=2, n_trials=3)
    out = tune_step(cfg, progress=False)
    m, h = out["metrics"], out["holdout"]
    assert m["n_tune"] + m["n_holdout"] == n and m["mrr_at_10_tune_best"] == m["best_value"]
    assert m["mrr_at_10_tune_default"] == m["baseline_value"] and 0 <= m["mrr_at_10_holdout_best"] <= 1
    assert math.isclose(m["holdout_diff"], m["mrr_at_10_holdout_best"] - m["mrr_at_10_holdout_default"], abs_tol=1e-9)
    assert h["keep_tuned"] == (m["holdout_diff"] >= 0) == (tmp_path / "recipes" / "build_kb.yaml").exists()
    parent = mlflow.MlflowClient().get_run(out["run_id"])
    assert parent.data.tags["fsku.tune_decision"] == h["decision"]
    assert any("held-out labels" in line for line in report(cfg, out))
    # the labels are run inputs with their roles; the recipe names the set it was tuned on (lineage for evaluate)
    roles = {d.dataset.name: {t.key: t.value for t in d.tags}["fsku.role"] for d in parent.inputs.dataset_inputs}
    assert roles == {"fsku-labels-sample_retrieval-tune": "tune", "fsku-labels-sample_retrieval-holdout": "select"}
    from fsku.evaluate.compare import question_set_digest
    from fsku.evaluate.retrieval import load_labels

    digest = question_set_digest([q.question for q in load_labels(SAMPLE_LABELS)])
    if h["keep_tuned"]:
        assert load_recipe(tmp_path / "recipes" / "build_kb.yaml").tuned_on == digest


def test_a_best_trial_worse_on_the_held_out_fold_writes_no_recipe(tmp_path, monkeypatch):
    from fsku.steps.tune import run_step as tune_step
    from fsku.tune import RetrievalObjective

    def worse(self, best, default):
        return {"tune_best": 0.9, "tune_default": 0.8, "holdout_best": 0.5, "holdout_default": 0.8, "n_tune": 7,
                "n_holdout": 3, "keep_tuned": False,
                "paired": {"test": "paired bootstrap", "diff": -0.3, "low": -0.5, "high": -0.1, "p_value": 0.01, "n": 3}}

    monkeypatch.setattr(RetrievalObjective, "holdout_check", worse)
    out = tune_step(_retrieval_cfg(tmp_path, folds=3, n_trials=1), progress=False)
    assert "defaults kept" in out["holdout"]["decision"] and not out.get("recipes")
    assert not (tmp_path / "recipes").exists()


def test_two_worker_processes_share_one_study(tmp_path):
    """Two `fsku tune` processes on one storage and study name: every trial of both is kept."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "fsku.steps.tune", "--study", "retrieval", "--storage", f"sqlite:///{tmp_path}/optuna.db",
           "--n-trials", "3", "--sampler", "random", "--out", str(tmp_path / "tune"), "--recipe-out", "none",
           "--base-recipe", _base_recipe(tmp_path), "--labels", str(SAMPLE_LABELS), "--chunk-sizes", "480",
           "--chunk-overlaps", "32", "--bm25-tokenizers", "kiwi", "--no-progress"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = optuna.load_study(study_name="fsku-retrieval", storage=f"sqlite:///{tmp_path}/optuna.db")
    states = [t.state for t in study.trials]
    assert len(states) == 6 and all(s == optuna.trial.TrialState.COMPLETE for s in states)
    assert len({t.user_attrs["mlflow_parent_run_id"] for t in study.trials}) == 2
    assert not (tmp_path / "recipes").exists()


def test_held_out_kl_is_zero_against_itself_and_positive_against_another_model(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fsku.distill.heldout import KL_KEY, NLL_KEY, held_out_metrics
    from fsku.distill.trainer import encode_pairs, precompute_topk

    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_models["student"]).eval()
    vocab = len(tok)
    # prompts and responses of different lengths in one batch: the top-k rows must follow each row's positions
    pairs = [{"prompt_id": str(i), "prompt": [{"role": "user", "content": q}],
              "chosen": [{"role": "assistant", "content": text}], "rejected": [{"role": "assistant", "content": text}]}
             for i, (q, text) in enumerate([("전자금융거래법의 목적은?", "보안 강화"),
                                            ("전자금융거래법에서 이용자를 보호하는 방법을 자세히 설명하세요.",
                                             "이용자 보호와 거래의 안전성 및 신뢰성 확보")])]
    features, _ = encode_pairs(tok, pairs, 256, 200, sides=("chosen",))
    assert "rejected_input_ids" not in features[0]
    precompute_topk(teacher, features, vocab, vocab, sides=("chosen",))  # k = vocab: the exact teacher distribution
    own = held_out_metrics(teacher, features, vocab)
    assert own[KL_KEY] == pytest.approx(0.0, abs=1e-5)
    m = held_out_metrics(student, features, vocab, batch_size=1)
    student.train()
    m2 = held_out_metrics(student, features, vocab, batch_size=2)
    assert m[KL_KEY] > 0.01 and m[KL_KEY] == pytest.approx(m2[KL_KEY], rel=1e-4)
    assert m[NLL_KEY] == pytest.approx(m2[NLL_KEY], rel=1e-4)
    assert student.training is True  # the mode it was in
    student.eval()
    # the NLL by hand: −log q(token) averaged over the response tokens of both responses
    nll, count = 0.0, 0
    for f in features:
        ids = torch.tensor([f["chosen_input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(student(input_ids=ids).logits[0, :-1, :vocab].float(), -1)
        for t, label in enumerate(f["chosen_labels"][1:]):
            if label != -100:
                nll, count = nll - float(logp[t, label]), count + 1
    assert m[NLL_KEY] == pytest.approx(nll / count, rel=1e-4)
    with pytest.raises(ValueError, match="no held-out features"):
        held_out_metrics(student, [], vocab)
    # features that know their kind: the means per kind, which the overall mean weighs by tokens
    for f, kind in zip(features, ("multiple_choice", "descriptive"), strict=True):
        f["kind"] = kind
    per = held_out_metrics(student, features, vocab, batch_size=2)
    n = [sum(x != -100 for x in f["chosen_labels"][1:]) for f in features]
    assert per[KL_KEY] == pytest.approx(m[KL_KEY], rel=1e-4)
    want = (per[KL_KEY + "_mc"] * n[0] + per[KL_KEY + "_descriptive"] * n[1]) / sum(n)
    assert per[KL_KEY] == pytest.approx(want, rel=1e-4) and per[NLL_KEY + "_mc"] > 0


def test_distill_study_reports_intermediate_values_and_prunes(tiny_models, tmp_path, monkeypatch):
    import mlflow

    from fsku.steps.tune import run_step as tune_step
    from fsku.synth.records import write_jsonl
    from test_distill import _records

    data = tmp_path / "synth"
    data.mkdir()
    recs = _records()
    for i, r in enumerate(recs):
        r.split = "validation" if i % 3 == 0 else "train"
    write_jsonl([r for r in recs if r.split == "train"], data / "train.jsonl")
    write_jsonl([r for r in recs if r.split == "validation"], data / "validation.jsonl")
    recipe = tmp_path / "distill.yaml"
    recipe.write_text(f"backend: transformers\ndevice: cpu\ndtype: float32\nbatch_size: 2\nmax_model_len: 640\n"
                      f"max_prompt_length: 560\nmc_max_new_tokens: 3\ncache_dir: {tmp_path / 'cache'}\n"
                      f"data: {data}\nteacher: {tiny_models['teacher']}\nstudent: {tiny_models['student']}\n"
                      f"max_steps: 4\nmax_new_tokens: 8\n", encoding="utf-8")
    cfg = TuneConfig(study="distill", storage=f"sqlite:///{tmp_path}/optuna.db", n_trials=5, sampler="random", seed=0,
                     out=str(tmp_path / "tune"), recipe_out=str(tmp_path / "recipes"), base_recipe=str(recipe),
                     loss_types="distillm_v2,sft", lr_min=1e-5, lr_max=5e-2, lora_ranks="2,4", eval_every=1)
    # a pruner that stops every odd trial at step 3 makes pruning deterministic to assert on
    import fsku.steps.tune as st

    class OddTrialPruner(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number % 2 == 1 and (trial.last_step or 0) >= 3

    real_open = st.open_study

    def open_with_pruner(c):
        study = real_open(c)
        study.pruner = OddTrialPruner()
        return study

    monkeypatch.setattr(st, "open_study", open_with_pruner)
    out = tune_step(cfg, progress=False)
    m = out["metrics"]
    assert (m["trials_total"], m["trials_complete"], m["trials_pruned"], m["trials_failed"]) == (5, 3, 2, 0)
    study = optuna.load_study(study_name="fsku-distill", storage=cfg.storage)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all(max(t.intermediate_values) == 3 for t in pruned)  # measured at steps 1..3, stopped at the first allowed check
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs([client.get_run(out["run_id"]).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{out['run_id']}'")
    by_state = {r.data.tags["optuna.state"]: r for r in runs}
    assert by_state["PRUNED"].info.status == "KILLED"
    hist = client.get_metric_history(by_state["PRUNED"].info.run_id, "validation_kl")
    assert [h.step for h in hist] == [1, 2, 3]
    assert "plots/intermediate_values.png" in {a.path for a in client.list_artifacts(out["run_id"], "plots")}
    assert load_recipe(tmp_path / "recipes" / "distill.yaml").data == str(data)


def test_a_failing_trial_is_marked_failed_and_the_study_goes_on(tmp_path, monkeypatch):
    import mlflow

    from fsku.steps.tune import run_step as tune_step
    from fsku.tune import RetrievalObjective

    real = RetrievalObjective.__call__

    def flaky(self, trial, params, report):
        if trial.number == 1:
            raise ValueError("broken trial")
        return real(self, trial, params, report)

    monkeypatch.setattr(RetrievalObjective, "__call__", flaky)
    out = tune_step(_retrieval_cfg(tmp_path, n_trials=3, recipe_out="none"), progress=False)
    assert (out["metrics"]["trials_complete"], out["metrics"]["trials_failed"]) == (2, 1)
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs([client.get_run(out["run_id"]).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{out['run_id']}'")
    failed = [r for r in runs if r.data.tags["optuna.state"] == "FAIL"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert failed[0].data.tags["optuna.error"] == "ValueError: broken trial"
    assert "recipes" not in out


def test_set_experiment_survives_a_concurrent_creation(monkeypatch):
    """The loser of two workers' race to create the store's experiments asks again instead of failing."""
    import mlflow

    from fsku import tracking

    calls = []
    real_set_experiment = mlflow.set_experiment

    def flaky(name):
        calls.append(name)
        if len(calls) == 1:
            raise mlflow.exceptions.MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: "
                                                    "experiments.workspace, experiments.name")
        return real_set_experiment(name)

    monkeypatch.setattr(mlflow, "set_experiment", flaky)
    tracking.set_experiment("fsku-race")
    assert calls == ["fsku-race"] * 2
    described = mlflow.MlflowClient().get_experiment_by_name("fsku-race")
    assert tracking.NOTE_TAG in described.tags

    def broken(name):
        raise mlflow.exceptions.MlflowException("permission denied")

    monkeypatch.setattr(mlflow, "set_experiment", broken)
    with pytest.raises(mlflow.exceptions.MlflowException, match="permission denied"):
        tracking.set_experiment("fsku-race")


def test_distill_study_needs_steps_in_its_base_recipe(tmp_path):
    from fsku.steps.tune import build_objective

    recipe = tmp_path / "distill.yaml"
    recipe.write_text("max_steps: 0\nepochs: 1.0\n")
    cfg = TuneConfig(study="distill", storage=f"sqlite:///{tmp_path}/o.db", base_recipe=str(recipe))
    with pytest.raises(ValueError, match="needs max_steps >= 1 in its base recipe"):
        build_objective(cfg, progress=False)


def test_workers_racing_to_create_the_schema_retry(tmp_path, monkeypatch):
    """PostgreSQL reports two concurrent CREATE TYPE of the study-direction enum as a ProgrammingError
    ("type ... already exists"): the worker that lost the race retries and joins; other errors end it."""
    import fsku.steps.tune as st

    class ProgrammingError(Exception):
        pass

    real = optuna.storages.RDBStorage
    failures = [ProgrammingError('(psycopg2.errors.DuplicateObject) type "studydirection" already exists')]

    class Racing(real):
        def __init__(self, *a, **kw):
            if failures:
                raise failures.pop()
            super().__init__(*a, **kw)

    monkeypatch.setattr(optuna.storages, "RDBStorage", Racing)
    monkeypatch.setattr(st.time, "sleep", lambda s: None)
    cfg = TuneConfig(study="retrieval", storage=f"sqlite:///{tmp_path}/o.db")
    assert st.open_study(cfg).study_name == "fsku-retrieval" and not failures
    failures.append(ProgrammingError("permission denied for schema public"))
    with pytest.raises(ProgrammingError, match="permission denied"):
        st.open_study(cfg)


def test_a_study_is_joined_only_with_the_split_it_was_scored_on(tmp_path):
    from fsku.steps.tune import check_split, open_study

    cfg = _retrieval_cfg(tmp_path, folds=3, fold_seed=1)
    study = open_study(cfg)
    check_split(study, cfg)
    check_split(study, cfg)  # the same split joins
    assert study.user_attrs["fsku_split"] == {"folds": 3, "fold_seed": 1}
    with pytest.raises(ValueError, match="scored with folds 3 \\(fold_seed 1\\)"):
        check_split(study, _retrieval_cfg(tmp_path, folds=0))
    # a study from before folds existed, with trials: it was scored on every label
    old = open_study(_retrieval_cfg(tmp_path, study_name="old"))
    old.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={}))
    with pytest.raises(ValueError, match="scored with folds 0"):
        check_split(old, _retrieval_cfg(tmp_path, study_name="old", folds=3))
