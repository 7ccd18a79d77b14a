"""registry: promotion of a candidate version to the `champion` alias, only when it is better.

The decision is a pure function of two scores, a margin and, under the default gate
"significant", the paired test of both evaluations on the same questions (exact McNemar for
right/wrong metrics, a paired bootstrap for scores: fsku.evaluate.compare): a candidate that is
better by noise does not move the alias. `promote_release` applies it to the Model Registry
(through `fsku.tracking`): the old champion keeps the alias `previous`, and the decision with both
scores, the test, p and interval is written as tags on the candidate version (and on the KB version
of a joint release). Scores come from a caller-supplied function, so the same code promotes on the
official FSKU score, on MC accuracy or on a descriptive score (and, under gate "margin", on any
number the scorer returns).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

log = logging.getLogger(__name__)

CHAMPION, PREVIOUS = "champion", "previous"


GATES = ("margin", "significant")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate_score: float
    champion_score: Optional[float]
    margin: float
    gate: str = "margin"
    # the paired comparison on the same questions (gate "significant"): fsku.evaluate.compare.paired
    evidence: Optional[dict] = None


def decide(candidate_score: float, champion_score: Optional[float], margin: float = 0.0,
           higher_is_better: bool = True, gate: str = "margin", evidence: Optional[dict] = None,
           alpha: float = 0.05) -> Decision:
    """Promote when there is no champion, or when the candidate beats it by MORE than `margin`
    (an equal score never moves the alias: a tie is no evidence of improvement). Gate "significant"
    also needs `evidence`, the paired test of candidate vs champion on the same questions: its p-value
    below `alpha` and, with a margin, the lower bound of its 95 % interval of the gain above the margin."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if candidate_score != candidate_score:  # NaN
        raise ValueError("the candidate's score is NaN")
    if champion_score is not None and champion_score != champion_score:
        raise ValueError("the champion's score is NaN")
    if champion_score is None:
        return Decision(True, "no current champion", candidate_score, None, margin, gate, evidence)
    gain = candidate_score - champion_score if higher_is_better else champion_score - candidate_score

    def out(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, candidate_score, champion_score, margin, gate, evidence)

    if gain == 0:
        return out(False, "equal to the champion")
    if gain < 0:
        return out(False, f"worse by {-gain:.4g}")
    if gain <= margin:
        return out(False, f"better by only {gain:.4g} (<= margin {margin:g})")
    if gate == "margin":
        return out(True, f"better by {gain:.4g} (> margin {margin:g})")
    if evidence is None:
        raise ValueError("gate 'significant' needs the paired comparison of both evaluations (per-question scores)")
    test = f"{evidence['test']} p = {evidence['p_value']:.3g}, gain {evidence['diff']:+.4g} " \
           f"[{evidence['low']:+.4g}, {evidence['high']:+.4g}], n = {evidence['n']}"
    if evidence["p_value"] >= alpha:
        return out(False, f"better by {gain:.4g} but not significantly ({test}; needs p < {alpha:g})")
    if margin > 0 and evidence["low"] <= margin:
        return out(False, f"better by {gain:.4g}, significant, but the interval's lower bound is not above the "
                          f"margin {margin:g} ({test})")
    return out(True, f"better by {gain:.4g}, significant ({test})")


@dataclass(frozen=True)
class Evaluation:
    """What a release scored: the metric, the per-question rows behind it (for the paired test) and
    the MLflow run that produced them."""

    score: float
    rows: tuple = ()
    run_id: Optional[str] = None
    # question-set digest of the labelled set (fsku.evaluate.compare.question_set_digest)
    dataset_digest: Optional[str] = None


@dataclass(frozen=True)
class Release:
    """A student version, optionally with the KB version it is evaluated and shipped with."""

    model_version: str
    kb_version: Optional[str] = None


def promote_release(model_name: str, candidate: Release, score: Callable[[Release], "Evaluation | float"],
                    margin: float = 0.0, kb_name: Optional[str] = None, higher_is_better: bool = True,
                    metric: str = "score", gate: str = "margin", alpha: float = 0.05) -> dict:
    """Score the candidate and the current champion release with `score` (an Evaluation, or a bare
    float under the margin gate), decide, and move the aliases when the candidate wins. Returns the
    decision, both evaluations' run ids and what changed."""
    from . import tracking

    if gate == "significant":  # before two evaluations are spent on a metric the gate cannot test
        from .evaluate.compare import metric_spec

        try:
            spec = metric_spec(metric)
        except ValueError as e:
            raise ValueError(f"gate 'significant': {e}; use gate 'margin' for this metric") from None
        if spec.higher_is_better != higher_is_better:
            raise ValueError(f"higher_is_better={higher_is_better} contradicts metric {metric!r}")
    champion_model = tracking.alias_version(model_name, CHAMPION)
    champion_kb = tracking.alias_version(kb_name, CHAMPION) if kb_name else None
    champion = Release(champion_model, champion_kb) if champion_model else None
    if champion == candidate:
        decision = Decision(False, "the candidate is already the champion", float("nan"), None, margin, gate)
        return {"decision": asdict(decision), "champion": asdict(candidate), "previous": None, "evaluations": {}}
    cand = _as_evaluation(score(candidate))
    champ = _as_evaluation(score(champion)) if champion else None
    evidence = None
    if gate == "significant" and champ is not None:
        if not cand.rows or not champ.rows:
            raise ValueError("gate 'significant' needs per-question scores from both evaluations; use gate 'margin' "
                             "for a scorer that returns only a number")
        from .evaluate.compare import paired

        evidence = paired(list(cand.rows), list(champ.rows), metric)
    decision = decide(cand.score, champ.score if champ else None, margin, higher_is_better, gate, evidence, alpha)
    log.info("%s: candidate %s scores %.4f, champion %s %s -> %s (%s)", metric, candidate,
             cand.score, champion, "-" if champ is None else f"{champ.score:.4f}",
             "promote" if decision.promote else "keep", decision.reason)
    tags = {"promotion.metric": metric, "promotion.decision": "promoted" if decision.promote else "kept champion",
            "promotion.reason": decision.reason, "promotion.candidate_score": cand.score,
            "promotion.champion_score": "" if champ is None else champ.score,
            "promotion.champion_version": champion.model_version if champion else "",
            "promotion.gate": gate, "promotion.candidate_run": cand.run_id or "",

            "promotion.champion_run": (champ.run_id or "") if champ else "",
            "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if evidence is not None:
        tags.update({"promotion.test": evidence["test"], "promotion.p_value": evidence["p_value"],
                     "promotion.gain_ci95": f"[{evidence['low']:.4g}, {evidence['high']:.4g}]",
                     "promotion.n": evidence["n"], "promotion.alpha": alpha})
    if decision.promote and cand.dataset_digest:
        # the set that chose this version: a later report on it is not held out (evaluate warns)
        tags["promotion.gold_digest"] = cand.dataset_digest
    if kb_name and candidate.kb_version:
        # a joint release: each version names its partner, so the student's page links the KB it ships with
        tracking.set_version_tags(model_name, candidate.model_version,
                                  {**tags, "promotion.kb_model": f"models:/{kb_name}/{candidate.kb_version}"})
        tracking.set_version_tags(kb_name, candidate.kb_version,
                                  {**tags, "promotion.student_model": f"models:/{model_name}/{candidate.model_version}"})
    else:
        tracking.set_version_tags(model_name, candidate.model_version, tags)
    card = promotion_card(tags) if decision.promote else ""  # built before any alias moves
    if decision.promote:
        if champion:
            tracking.set_alias(model_name, PREVIOUS, champion.model_version)
            if kb_name and champion.kb_version:
                tracking.set_alias(kb_name, PREVIOUS, champion.kb_version)
        tracking.set_alias(model_name, CHAMPION, candidate.model_version)
        if kb_name and candidate.kb_version:
            tracking.set_alias(kb_name, CHAMPION, candidate.kb_version)
        _describe_champion(model_name, kb_name, candidate, card)
    return {"decision": asdict(decision), "champion": asdict(candidate if decision.promote else champion),
            "previous": asdict(champion) if decision.promote and champion else None,
            "evaluations": {"candidate": {**asdict(candidate), "score": cand.score, "run_id": cand.run_id},
                            **({"champion": {**asdict(champion), "score": champ.score, "run_id": champ.run_id}}
                               if champ else {})}}


def _describe_champion(model_name: str, kb_name: Optional[str], candidate: Release, card: str) -> None:
    """The promotion paragraph on the new champion's description(s); the aliases have moved already, so a
    failure here is a warning, not a failed promotion."""
    from . import tracking

    joint = kb_name and candidate.kb_version
    try:
        tracking.append_version_description(model_name, candidate.model_version, card + (
            f" Ships with models:/{kb_name}/{candidate.kb_version}." if joint else ""))
        if joint:
            tracking.append_version_description(kb_name, candidate.kb_version,
                                                f"{card} Ships with models:/{model_name}/{candidate.model_version}.")
    except Exception as exc:  # the registry refused the update (permissions, a server error)
        log.warning("promoted, but the champion's description was not updated: %s", exc)


def promotion_card(tags: dict) -> str:
    """The paragraph a promotion adds to the champion's description, from the promotion tags."""
    evidence = (f"; {tags['promotion.test']} p = {float(tags['promotion.p_value']):.3g}, gain {tags['promotion.gain_ci95']}"
                if "promotion.test" in tags else "")
    versus = (f" vs {float(tags['promotion.champion_score']):.4f} of version {tags['promotion.champion_version']}"
              if tags.get("promotion.champion_score") not in ("", None) else "")
    return (f"Champion since {tags['promotion.time']} (gate {tags['promotion.gate']}: {tags['promotion.reason']}): "
            f"{tags['promotion.metric']} {float(tags['promotion.candidate_score']):.4f}{versus}{evidence}; "
            f"evaluation run {tags['promotion.candidate_run'] or '?'}.")


def _as_evaluation(value) -> Evaluation:
    return value if isinstance(value, Evaluation) else Evaluation(float(value))
