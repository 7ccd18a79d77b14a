"""promote: move the registry alias `champion` to a candidate only when it evaluates better.

Usage:
    python -m fsku.steps.promote [--recipe experiments/<name>/promote.yaml] [--candidate N --gold FILE ...] [--no-progress]
    fsku promote --model-name fsku-student --candidate latest --gold evaluation/sample_qa.csv --margin 0.005
    fsku promote --kb-name fsku-kb --kb-candidate latest            # a joint student + KB release
    mlflow run . -e promote --env-manager local -P candidate=7 -P metric=mc_accuracy

The candidate and the current champion are evaluated by the `evaluate` step on the same labelled set
(each evaluation an MLflow run nested under the promote run, which holds the decision). Under the
default gate `significant` the candidate must be better AND a paired test on the same questions must
say so (`--significance`, default 0.05: exact McNemar for mc_accuracy, a paired bootstrap for scores,
stratified by question type for fsku_score); gate `margin` compares the two numbers only. The
decision, both scores, the test, p, the gain's interval and both evaluation runs are tags on the
candidate version and on the promote run, and a table (decision.json) in it. The old champion keeps
the alias `previous`.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Iterator

from ..config import EvaluateConfig, PromoteConfig, load_recipe
from .args import step_main
from .naming import run_labels

log = logging.getLogger(__name__)


def evaluation_scorer(cfg: PromoteConfig, progress: bool = False):
    """release -> cfg.metric of the evaluate step on cfg.gold (the student by URI, its KB by URI or cfg.kb)."""
    from .. import tracking
    from ..registry import Evaluation
    from .evaluate import run_step as evaluate_step

    base = load_recipe(cfg.evaluate_recipe) if cfg.evaluate_recipe else EvaluateConfig()
    if cfg.evaluate_recipe and not isinstance(base, EvaluateConfig):
        raise ValueError(f"{cfg.evaluate_recipe}: expected an evaluate recipe")

    def score(release) -> Evaluation:
        kb = cfg.kb
        if cfg.kb_name and release.kb_version:
            kb = tracking.resolve_model_uri(f"models:/{cfg.kb_name}/{release.kb_version}", "manifest.json")
        label = f"{cfg.model_name}-v{release.model_version}" + (f"-kb{release.kb_version}" if release.kb_version else "")
        run_cfg = dataclasses.replace(base, model=f"models:/{cfg.model_name}/{release.model_version}", kb=kb,
                                      gold=cfg.gold, out_dir=str(Path(cfg.out_dir) / label), dataset_role="select")
        res = evaluate_step(run_cfg, progress=progress)
        metrics = res["metrics"]
        if metrics.get(cfg.metric) is None:
            raise ValueError(f"evaluate produced no {cfg.metric!r} on {cfg.gold}; "
                             f"available: {sorted(k for k, v in metrics.items() if v is not None)}")
        return Evaluation(float(metrics[cfg.metric]), tuple(res["table"].to_dict("records")), res["run_id"],
                          res["gold_digest"])

    return score


def run_step(cfg: PromoteConfig, progress: bool = True, score=None) -> dict:
    """Score candidate and champion (`score`: release -> float; default: the evaluate step), move the
    aliases when the candidate wins, and log the decision: registry.promote_release's dict."""
    from .. import tracking
    from ..registry import Release, promote_release

    version = tracking.parse_model_uri(f"models:/{cfg.model_name}/{cfg.candidate}")[1]
    kb_version = tracking.parse_model_uri(f"models:/{cfg.kb_name}/{cfg.kb_candidate}")[1] if cfg.kb_name else None
    # the decision run is opened first: the evaluations of candidate and champion are nested under it
    with tracking.run("promote", dataclasses.asdict(cfg), tags={"fsku.promotion_gate": cfg.gate},
                      **run_labels("promote", cfg)):
        out = promote_release(cfg.model_name, Release(version, kb_version), score or evaluation_scorer(cfg, progress),
                              margin=cfg.margin, kb_name=cfg.kb_name, higher_is_better=cfg.higher_is_better,
                              metric=cfg.metric, gate=cfg.gate, alpha=cfg.significance)
        d = out["decision"]
        ev = d.get("evidence") or {}
        evaluations = out.get("evaluations", {})
        tracking.set_tags({"fsku.promotion": "promoted" if d["promote"] else "kept champion",
                           "fsku.promotion_reason": d["reason"],
                           **{f"fsku.{role}_evaluation": e["run_id"] for role, e in evaluations.items() if e.get("run_id")},
                           **{f"fsku.promotion_{k}": v for k, v in (("test", ev.get("test")), ("p_value", ev.get("p_value")))
                              if v is not None}})
        tracking.log_metrics({k: v for k, v in (("candidate_score", d["candidate_score"]),
                                                ("champion_score", d["champion_score"]),
                                                ("gain", ev.get("diff")), ("gain_ci95_low", ev.get("low")),
                                                ("gain_ci95_high", ev.get("high")), ("p_value", ev.get("p_value")))
                              if v is not None and v == v})
        tracking.log_table(decision_table(out, cfg), "decision.json")
        tracking.log_dict(out, "promotion.json")
    return out


def decision_table(out: dict, cfg: PromoteConfig):
    """One row per evaluated release (role, versions, score, evaluation run) and the decision row."""
    import pandas as pd

    d, ev = out["decision"], out["decision"].get("evidence") or {}
    rows = [{"role": role, "model_version": e["model_version"], "kb_version": e.get("kb_version") or "",
             cfg.metric: e["score"], "evaluation_run": e.get("run_id") or ""}
            for role, e in out.get("evaluations", {}).items()]
    rows.append({"role": "decision", "model_version": out["champion"]["model_version"] if out["champion"] else "",
                 "kb_version": (out["champion"] or {}).get("kb_version") or "", cfg.metric: ev.get("diff"),
                 "evaluation_run": "", "gate": cfg.gate, "test": ev.get("test", ""), "p_value": ev.get("p_value"),
                 "gain_ci95_low": ev.get("low"), "gain_ci95_high": ev.get("high"),
                 "promoted": d["promote"], "reason": d["reason"]})
    return pd.DataFrame(rows)


def report(cfg: PromoteConfig, out: dict) -> Iterator[str]:
    d, champ = out["decision"], out["champion"]
    verdict = "promoted" if d["promote"] else "kept the champion"
    yield (f"{verdict} (gate {cfg.gate}): {d['reason']} ({cfg.metric}: candidate {d['candidate_score']}, "
           f"champion {d['champion_score']})")
    yield (f"champion: models:/{cfg.model_name}/{champ['model_version']}"
           + (f" with models:/{cfg.kb_name}/{champ['kb_version']}" if cfg.kb_name and champ.get("kb_version") else ""))


def main(argv: list[str] | None = None) -> int:
    return step_main(argv, PromoteConfig, "fsku promote", __doc__, run_step, report)


if __name__ == "__main__":
    sys.exit(main())
