"""tune: an Optuna study whose trials are nested MLflow runs; the best trial becomes a recipe.

Usage:
    python -m fsku.steps.tune [--recipe experiments/<name>/tune.yaml] [--study retrieval|distill --n-trials N ...] [--no-progress]
    mlflow run . -e tune --env-manager local -P study=retrieval -P n_trials=30 \\
        -P base_recipe=experiments/<name>/build_kb.yaml -P labels=../shared/data/fsku-benchmark/retrieval_dev.jsonl
    fsku tune --study distill --n-trials 6 --base-recipe experiments/tune_tiny/distill.yaml   # the tiny models
    fsku tune --study retrieval --storage postgresql://user:pw@db/optuna  # workers on many machines

A study is identified by its name in its storage: starting the command again (or on another
machine, against the same RDB storage) joins it, and each process runs `n_trials` more trials.
Trial 0 of a new study is the default configuration, so the study answers "does tuning beat the
default?" by itself. A retrieval study holds one of `folds` folds of its labels out: trials are
scored on the others, then the best trial and the default are re-scored on the held-out fold with a
paired test, and the recipes are written only when the best is not worse than the default there.
Every trial is an MLflow run nested under this process's `tune` run (params,
metrics, tags optuna.trial_number / optuna.state: COMPLETE, PRUNED (run status KILLED) or FAIL).
The parent run logs the optimisation history, parameter importances, parallel coordinates (and, for
distill, the intermediate values) as plots, the trials table, and the best trial's recipes, which are
also written to experiments/tuned-<study>/ (`fsku build-kb --recipe .../build_kb.yaml`).
optuna-dashboard reads the same storage: `optuna-dashboard sqlite:///outputs/tune/optuna.db`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

from ..config import TuneConfig
from ..tune import baseline_params, distill_space, parse_choices, recipes_from_params, retrieval_space, suggest, write_recipes
from .args import step_main
from .naming import run_labels

log = logging.getLogger(__name__)

DIRECTIONS = {"retrieval": "maximize", "distill": "minimize"}


def redact(url: str) -> str:
    """A storage URL without its password (it is logged as a tag)."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_study(cfg: TuneConfig):
    """Create or join the named study (SQLite gets its folder and a generous lock timeout; every RDB
    storage gets heartbeats, so trials of a killed worker are marked FAIL instead of hanging RUNNING)."""
    import optuna

    engine_kwargs = {}
    if cfg.storage.startswith("sqlite:///"):
        path = Path(cfg.storage[len("sqlite:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 120}}
    storage = None
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(cfg.storage, engine_kwargs=engine_kwargs, heartbeat_interval=60,
                                                     grace_period=180)
            break
        except Exception as exc:  # workers starting together on a new database race to create its tables
            name = type(exc).__name__
            # PostgreSQL: a unique violation (IntegrityError) or "type ... already exists" (ProgrammingError,
            # two CREATE TYPE for the direction enum at once); SQLite: a locked database (OperationalError)
            racing = ("IntegrityError" in name or "OperationalError" in name
                      or ("ProgrammingError" in name and "already exists" in str(exc)))
            if not racing or attempt == 4:
                raise
            log.info("storage is being initialised by another worker (%s); retrying", type(exc).__name__)
            time.sleep(1.0 + attempt)
    seed = None if cfg.seed < 0 else cfg.seed
    sampler = (optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=8)
               if cfg.sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed))
    if cfg.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=cfg.eval_every)
    elif cfg.pruner == "hyperband":
        max_steps = cfg.base_config().max_steps if cfg.study == "distill" else 100
        pruner = optuna.pruners.HyperbandPruner(min_resource=cfg.eval_every, max_resource=max(max_steps, cfg.eval_every))
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.create_study(study_name=cfg.study_name, storage=storage, sampler=sampler, pruner=pruner,
                                direction=DIRECTIONS[cfg.study], load_if_exists=True)
    want = optuna.study.StudyDirection.MAXIMIZE if DIRECTIONS[cfg.study] == "maximize" else optuna.study.StudyDirection.MINIMIZE
    if study.direction != want:
        raise ValueError(f"study {cfg.study_name!r} in {redact(cfg.storage)} exists with direction {study.direction.name}; "
                         f"a {cfg.study} study needs {want.name}: choose another --study-name")
    return study


def check_split(study, cfg: TuneConfig) -> None:
    """A retrieval study's trial values are scores on its tuning folds: a study joined with another
    split would mix values measured on different labels. The split is stored with the study (a study
    without it was scored on every label: folds 0)."""
    stored = study.user_attrs.get("fsku_split")
    wanted = {"folds": cfg.folds, "fold_seed": cfg.fold_seed if cfg.folds else 0}
    if stored is None and study.get_trials(deepcopy=False):
        stored = {"folds": 0, "fold_seed": 0}
    if stored is None:
        study.set_user_attr("fsku_split", wanted)
    elif stored != wanted:
        raise ValueError(f"study {cfg.study_name!r} was scored with folds {stored['folds']} (fold_seed "
                         f"{stored['fold_seed']}); join it with the same --folds/--fold-seed or start another "
                         f"--study-name")


def build_objective(cfg: TuneConfig, progress: bool):
    """(objective, search space, baseline params, base stage config) for the study."""
    from ..tune import DistillObjective, RetrievalObjective

    base = cfg.base_config()
    if cfg.study == "retrieval":
        base = dataclasses.replace(base, register_as=None, top_k=cfg.eval_k)
        sizes, overlaps = parse_choices(cfg.chunk_sizes, int), parse_choices(cfg.chunk_overlaps, int)
        space = retrieval_space(sizes, overlaps, parse_choices(cfg.bm25_tokenizers, str))
        for size in sizes:
            for ov in overlaps:
                dataclasses.replace(base, chunk_size=size, chunk_overlap=ov)  # range checks before any trial
        objective = RetrievalObjective(base, cfg.labels, Path(cfg.out) / "kbs", cfg.metric, cfg.eval_k, progress=progress,
                                       folds=cfg.folds, fold_seed=cfg.fold_seed)
        return objective, space, baseline_params(space, dataclasses.asdict(base)), base
    if base.max_steps < 1:
        raise ValueError(f"a distill study needs max_steps >= 1 in its base recipe (trials are compared at equal "
                         f"steps), got {base.max_steps}")
    from .. import tracking

    # registry URIs (models:/...) become local folders once, before the trials load them
    base = tracking.resolve_model_fields(base, "teacher", "student")
    base = dataclasses.replace(base, save_steps=base.max_steps, register_as=None)
    from ..distill.losses import LOSS_TYPES

    losses = parse_choices(cfg.loss_types, str)
    unknown = [x for x in losses if x not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"loss_types: unknown {unknown}; expected some of {sorted(LOSS_TYPES)}")
    space = distill_space(losses, cfg.lr_min, cfg.lr_max, parse_choices(cfg.lora_ranks, int))
    objective = DistillObjective(base, Path(cfg.out) / cfg.study_name, cfg.eval_every, progress=progress)
    return objective, space, baseline_params(space, dataclasses.asdict(base)), base


PLOTS = {"optimization_history": "plot_optimization_history", "param_importances": "plot_param_importances",
         "parallel_coordinate": "plot_parallel_coordinate"}


def _plots(study, distill: bool) -> dict:
    """name -> figure for the plots the study supports now (too few trials -> skipped): a matplotlib PNG
    and, where plotly is installed, the same plot as interactive HTML (zoom, hover on a trial's params)."""
    import optuna.visualization as interactive
    import optuna.visualization.matplotlib as static
    from optuna.exceptions import ExperimentalWarning

    from .plotting import pyplot

    pyplot()  # the Agg backend and a Hangul font (parameter names are ASCII; a trial's values need not be)
    wanted = dict(PLOTS, **({"intermediate_values": "plot_intermediate_values"} if distill else {}))
    html = interactive.is_available()
    if not html:
        log.info("plotly is not installed: the study's plots are logged as PNG only")
    figures = {}
    for name, fn in wanted.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                ax = getattr(static, fn)(study)
                if html:
                    figures[f"{name}.html"] = getattr(interactive, fn)(study)
            ax = ax.flat[0] if hasattr(ax, "flat") else ax
            fig = ax.figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            figures[f"{name}.png"] = fig
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.warning("plot %s skipped: %s", name, exc)
    return figures


def run_step(cfg: TuneConfig, progress: bool = True) -> dict:
    """Run `n_trials` more trials of the study under one parent MLflow run; summarize's dict + run_id."""
    import optuna

    from .. import tracking

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    objective_fn, space, baseline, base = build_objective(cfg, progress)
    study = open_study(cfg)
    if cfg.study == "retrieval":
        check_split(study, cfg)
    if baseline and not any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(baseline, user_attrs={"baseline": True}, skip_if_exists=True)
    started = time.time()

    with tracking.run("tune", dataclasses.asdict(cfg), tags={"optuna.study": cfg.study_name,
                                                            "optuna.storage": redact(cfg.storage)},
                      **run_labels("tune", cfg)) as parent:

        def objective(trial) -> float:
            params = suggest(trial, space)
            trial.set_user_attr("mlflow_parent_run_id", parent.info.run_id)
            tags = {"optuna.study": cfg.study_name, "optuna.trial_number": trial.number,
                    "optuna.baseline": bool(trial.user_attrs.get("baseline"))}
            pruned = None
            with tracking.child_run(f"trial-{trial.number}", params, tags) as child:
                trial.set_user_attr("mlflow_run_id", child.run_id)

                def report(metrics: dict) -> None:
                    step = metrics.pop("step", None)
                    tracking.log_metrics(metrics, step=step)

                try:
                    value = objective_fn(trial, params, report)
                except optuna.TrialPruned as exc:
                    tracking.set_tags({"optuna.state": "PRUNED", "optuna.pruned_reason": str(exc)})
                    child.status, pruned = "KILLED", exc
                except Exception as exc:
                    tracking.set_tags({"optuna.state": "FAIL", "optuna.error": f"{type(exc).__name__}: {exc}"[:4000]})
                    log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
                    raise
                else:
                    tracking.log_metrics({"objective": value})
                    tracking.set_tags({"optuna.state": "COMPLETE"})
            if pruned is not None:
                raise pruned
            return value

        study.optimize(objective, n_trials=cfg.n_trials, timeout=cfg.timeout_s or None, catch=(Exception,),
                       gc_after_trial=cfg.study == "distill", show_progress_bar=progress)
        holdout = (functools.partial(objective_fn.holdout_check, default=baseline)
                   if cfg.study == "retrieval" and cfg.folds else None)
        if cfg.study == "retrieval":
            base = dataclasses.replace(base, tuned_on=log_label_sets(objective_fn, cfg))
        result = summarize(study, cfg, base, started, holdout)
        tracking.log_metrics({k: v for k, v in result["metrics"].items() if v is not None})
        if result.get("holdout"):
            tracking.set_tags({"fsku.tune_decision": result["holdout"]["decision"]})
            tracking.log_dict(result["holdout"], "holdout_check.json")
        tracking.set_tags({"optuna.best_trial": result["best_trial"]})
        tracking.log_table(result["trials"], "tables/trials.json")
        for name, fig in _plots(study, cfg.study == "distill").items():
            tracking.log_figure(fig, f"plots/{name}")
        if result.get("recipes"):
            for path in result["recipes"]:
                tracking.log_artifact(path, "recipes")
        result["run_id"] = parent.info.run_id
        result["tracking_uri"] = tracking.tracking_uri()
    return result


def log_label_sets(objective, cfg: TuneConfig) -> str:
    """Log the labels as MLflow datasets with their roles (the tuning folds: tune; the held-out fold:
    select) and return the labels' question-set digest, which the recipes carry as `tuned_on`."""
    import pandas as pd

    from .. import tracking
    from ..evaluate.compare import question_set_digest

    digest = question_set_digest([q.question for q in objective.queries])
    for part, role in (("tune", "tune"), ("holdout", "select")):
        rows = [dataclasses.asdict(objective.queries[i]) for i in objective.parts[part]]
        if rows:
            tracking.log_dataset(pd.DataFrame(rows), name=f"fsku-labels-{Path(cfg.labels).stem}-{part}", source=cfg.labels,
                                 context=role, tags={"fsku.role": role, "fsku.questions_digest": digest,
                                                     "fsku.folds": str(cfg.folds), "fsku.fold_seed": str(cfg.fold_seed)})
    return digest


def summarize(study, cfg: TuneConfig, base, started: float, holdout=None) -> dict:
    """Counts, best vs baseline, the trials table and the best recipes; `holdout(best_params)`: the
    objective's held-out check (RetrievalObjective.holdout_check), which can veto the recipes."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    states = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                                              TrialState.RUNNING)}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"study {cfg.study_name!r}: no trial completed ({states[TrialState.FAIL]} failed, "
                           f"{states[TrialState.PRUNED]} pruned); see the trials' optuna.error tags in MLflow")
    best = study.best_trial
    baseline = [t for t in complete if t.user_attrs.get("baseline")]
    metrics = {"best_value": best.value, "baseline_value": baseline[0].value if baseline else None,
               "trials_total": len(trials), "trials_complete": states[TrialState.COMPLETE],
               "trials_pruned": states[TrialState.PRUNED], "trials_failed": states[TrialState.FAIL],
               "trials_running": states[TrialState.RUNNING], "seconds": time.time() - started}
    table = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration", "user_attrs"))
    table["duration"] = table["duration"].dt.total_seconds() if "duration" in table else None
    table["state"] = table["state"].astype(str)
    out = {"study": cfg.study_name, "best_trial": best.number, "best_params": best.params, "metrics": metrics,
           "trials": table}
    keep = True
    if holdout is not None:
        check = holdout(best.params)
        keep = check["keep_tuned"]
        t = check["paired"]
        check["decision"] = ("best trial not worse than the default on the held-out fold" if keep
                             else "worse than the default on the held-out fold: defaults kept, no recipe written")
        metrics.update({f"{cfg.metric}_tune_best": check["tune_best"], f"{cfg.metric}_tune_default": check["tune_default"],
                        f"{cfg.metric}_holdout_best": check["holdout_best"],
                        f"{cfg.metric}_holdout_default": check["holdout_default"],
                        "holdout_diff": t["diff"], "holdout_diff_ci95_low": t["low"], "holdout_diff_ci95_high": t["high"],
                        "holdout_p_value": t["p_value"], "n_tune": check["n_tune"], "n_holdout": check["n_holdout"]})
        out["holdout"] = check
        if not keep:
            log.warning("study %s: best trial %d is worse on the held-out fold (%s = %.4f vs default %.4f, difference "
                        "%+.4f [%+.4f, %+.4f]); keeping the defaults", cfg.study_name, best.number,
                        cfg.metric, check["holdout_best"], check["holdout_default"], t["diff"], t["low"], t["high"])
    if keep and cfg.recipe_out not in ("", "none", "None"):
        folder = Path(f"experiments/tuned-{cfg.study}" if cfg.recipe_out == "auto" else cfg.recipe_out)
        header = (f"best trial {best.number} of Optuna study {cfg.study_name!r} ({redact(cfg.storage)}): "
                  f"{cfg.metric if cfg.study == 'retrieval' else 'validation_kl'} = {best.value:.4f}"
                  + (f" (default configuration: {metrics['baseline_value']:.4f})"
                     if metrics["baseline_value"] is not None else "")
                  + f"\nwritten by `fsku tune` on {time.strftime('%Y-%m-%d')}; {len(complete)} completed trials"
                  + (f"\nheld-out fold ({out['holdout']['n_holdout']} labels, fold_seed {cfg.fold_seed}): "
                     f"{cfg.metric} {out['holdout']['holdout_best']:.4f} vs default "
                     f"{out['holdout']['holdout_default']:.4f}, p = {out['holdout']['paired']['p_value']:.3g}"
                     if out.get("holdout") else ""))
        recipes = recipes_from_params(cfg.study, best.params, build=base if cfg.study == "retrieval" else None,
                                      distill=base if cfg.study == "distill" else None)
        out["recipes"] = [str(p) for p in write_recipes(folder, recipes, header)]
    return out


def report(cfg: TuneConfig, out: dict) -> Iterator[str]:
    m = out["metrics"]
    base = f" (default configuration {m['baseline_value']:.4f})" if m["baseline_value"] is not None else ""
    yield (f"study {out['study']}: best trial {out['best_trial']} = {m['best_value']:.4f}{base}; "
           f"{m['trials_complete']} complete, {m['trials_pruned']} pruned, {m['trials_failed']} failed of {m['trials_total']}")
    yield f"best params: {out['best_params']}"
    if out.get("holdout"):
        h, t = out["holdout"], out["holdout"]["paired"]
        yield (f"{cfg.metric} on the {h['n_tune']} tuning labels: best {h['tune_best']:.4f}, default {h['tune_default']:.4f}; "
               f"on the {h['n_holdout']} held-out labels: best {h['holdout_best']:.4f}, default {h['holdout_default']:.4f} "
               f"(difference {t['diff']:+.4f} [{t['low']:+.4f}, {t['high']:+.4f}], {t['test']} p = {t['p_value']:.3g})")
        yield h["decision"]
    if out.get("recipes"):
        yield "recipes: " + ", ".join(out["recipes"])
    yield f"mlflow run: {out['run_id']}  tracking: {out['tracking_uri']}"


def main(argv: list[str] | None = None) -> int:
    return step_main(argv, TuneConfig, "fsku tune", __doc__, run_step, report)


if __name__ == "__main__":
    sys.exit(main())
