"""main: the whole pipeline as one MLflow run that chains the entry points.

Usage:
    python -m fsku.steps.main [--recipe FILE.yaml] [--corpus DIR --teacher ID --student ID --gold FILE ...]
    fsku main --corpus DIR --teacher ID --student ID --gold FILE ...
    mlflow run . -e main --env-manager local                  # the embedded sample corpus and tiny models

build_kb -> synth_qa -> distill -> quantize -> evaluate -> promote -> package. Like MLflow's
multistep example, a step that already FINISHED with the same parameters and the same git commit
is reused instead of run again (and its output must still be on disk), so running main again after
a failure continues at the step that failed; the steps themselves resume their own partial work
(synth_qa, distill and predict write incrementally). Registry versions are passed explicitly: the
quantize step gets the version the distill run registered, promote the quantized version and the KB
version of the build_kb run, and package the champions promote leaves.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..config import MainConfig
from .args import step_main
from .naming import run_labels

log = logging.getLogger(__name__)


@dataclass
class Step:
    entry_point: str
    params: Callable[[dict], dict]  # results so far -> parameters
    expects: Optional[str] = None  # a file the step leaves; a reused run whose output is gone runs again
    registers: Optional[str] = None  # the registered model the step adds a version to


def plan(cfg: MainConfig) -> list[Step]:
    """The chain. Each step runs with its recipe from `cfg.recipes` (its settings) plus what the
    chain wires: inputs, output folders and the registry versions earlier steps created."""
    def wired(stage: str, **params) -> dict:
        return {"recipe": cfg.recipe_for(stage) or "", **params}

    return [
        Step("build_kb", lambda r: wired("build_kb", corpus=cfg.corpus, out=cfg.kb_out, labels=cfg.labels or "none",
                                         register_as="fsku-kb"), f"{cfg.kb_out}/manifest.json", "fsku-kb"),
        Step("synth_qa", lambda r: wired("synth_qa", kb=cfg.kb_out, teacher=cfg.teacher, out=f"{cfg.out}/synth_qa"),
             f"{cfg.out}/synth_qa/train.jsonl"),
        Step("distill", lambda r: wired("distill", data=f"{cfg.out}/synth_qa", teacher=cfg.teacher, student=cfg.student,
                                        out=f"{cfg.out}/distill", register_as="fsku-student"),
             f"{cfg.out}/distill/merged/config.json", "fsku-student"),
        Step("quantize", lambda r: wired("quantize", model=f"models:/fsku-student/{r['distill']['version']}",
                                         out=f"{cfg.out}/quantize", gold=cfg.gold, register_as="fsku-student"),
             f"{cfg.out}/quantize/model/config.json", "fsku-student"),
        Step("evaluate", lambda r: wired("evaluate", model=f"models:/fsku-student/{r['quantize']['version']}",
                                         kb=cfg.kb_out, gold=cfg.gold, out_dir=f"{cfg.out}/evaluate"),
             f"{cfg.out}/evaluate/submission.csv"),
        Step("promote", lambda r: wired("promote", model_name="fsku-student", candidate=r["quantize"]["version"],
                                        kb_name="fsku-kb", kb_candidate=r["build_kb"]["version"], gold=cfg.gold,
                                        out_dir=f"{cfg.out}/promote")),
        Step("package", lambda r: wired("package", model="models:/fsku-student@champion", kb="models:/fsku-kb@champion",
                                        out=f"{cfg.out}/package"), None),
    ]


def run_chain(steps: list[Step], runner: Callable[[str, dict], str], finder: Callable[[str, dict], Optional[str]],
              version_of: Callable[[str, str], Optional[str]], log_fn: Callable[[str, dict], None] = lambda s, d: None
              ) -> dict:
    """Run (or reuse) each step in order; returns {entry_point: {"run_id", "reused", "version"?}}.
    Pure orchestration: `runner`, `finder` and `version_of` are the MLflow adapters (tests pass fakes)."""
    results: dict = {}
    for step in steps:
        params = step.params(results)
        previous = finder(step.entry_point, params)
        if previous and step.expects and not Path(step.expects).exists():
            log.info("%s: run %s finished with these parameters but %s is gone; running again",
                     step.entry_point, previous, step.expects)
            previous = None
        if previous:
            log.info("%s: reusing finished run %s (same parameters and code version)", step.entry_point, previous)
            run_id, reused = previous, True
        else:
            log.info("%s: running with %s", step.entry_point, params)
            run_id, reused = runner(step.entry_point, params), False
        entry = {"run_id": run_id, "reused": reused, "params": params}
        if step.registers:
            entry["version"] = version_of(step.registers, run_id)
            if entry["version"] is None:
                raise RuntimeError(f"{step.entry_point} run {run_id} registered no version of {step.registers}")
        results[step.entry_point] = entry
        log_fn(step.entry_point, entry)
    return results


def expected_params(params: dict) -> dict:
    """What a finished run of a step must have logged to be reused: the parameters the chain passes
    plus every setting its recipe changes (each step logs its whole config), so a recipe edited since
    that run, even without a commit, runs the step again."""
    from ..config import load_recipe, recipe_values

    recipe = params.get("recipe")
    return {**recipe_values(load_recipe(recipe)), **params} if recipe else dict(params)


def run_step(cfg: MainConfig, progress: bool = True) -> dict:
    """Run the chain (each step `mlflow run -e <step>`, so `progress` does not reach them): {entry point:
    {"run_id", "reused", "params", "version"?}, "run_id": the main run, "bundle": the zip or None}."""
    from .. import tracking

    if cfg.recipes and not Path(cfg.recipes).is_dir():
        raise FileNotFoundError(f"recipes: {cfg.recipes} is not a folder of <stage>.yaml recipes")
    from ..config import STAGE_CONFIGS, load_recipe

    for stage in STAGE_CONFIGS:  # a broken recipe fails here, before the first step runs
        if cfg.recipe_for(stage):
            load_recipe(cfg.recipe_for(stage))
    for path in (cfg.teacher, cfg.student):
        if not (":" in path or Path(path).exists()):
            raise FileNotFoundError(f"{path} not found: for the tiny demo models run `fsku make-tiny-models --out models/tiny "
                                    f"--kb {cfg.kb_out}` (or `make demo`), or pass a hub id / offline:<name>")
    commit = tracking.git_commit()
    with tracking.run("main", dataclasses.asdict(cfg), **run_labels("main", cfg)) as active:
        def log_fn(name: str, entry: dict) -> None:
            tracking.set_tags({f"main.{name}.run_id": entry["run_id"], f"main.{name}.reused": entry["reused"],
                               **({f"main.{name}.version": entry["version"]} if "version" in entry else {})})

        results = run_chain(plan(cfg), tracking.run_entry_point,
                            lambda e, p: tracking.find_finished_run(e, expected_params(p), commit),
                            tracking.registered_version_of_run, log_fn)
        tracking.log_dict(results, "main/steps.json")
        tracking.log_metrics({"steps_reused": sum(v["reused"] for v in results.values()), "steps": len(results)})
        results["run_id"] = active.info.run_id
    zips = sorted(Path(cfg.out, "package").glob("*.zip"))
    results["bundle"] = str(zips[-1]) if zips else None
    return results


def report(cfg: MainConfig, out: dict) -> Iterator[str]:
    for name, entry in out.items():
        if isinstance(entry, dict):
            yield (f"{name:9s} {'reused' if entry['reused'] else 'ran   '} run {entry['run_id']}"
                   + (f"  version {entry['version']}" if entry.get("version") else ""))
    yield f"submission bundle: {out['bundle']}"
    yield f"mlflow run (main): {out['run_id']}"


def main(argv: list[str] | None = None) -> int:
    return step_main(argv, MainConfig, "fsku main", __doc__, run_step, report)


if __name__ == "__main__":
    sys.exit(main())
