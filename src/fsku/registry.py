"""registry: promotion of a candidate version to the `champion` alias, only when it is better.

The decision is a pure function of two scores and a margin; `promote_release` applies it to the
Model Registry (through `fsku.tracking`): the old champion keeps the alias `previous`, and the
decision with both scores is written as tags on the candidate version (and on the KB version of a
joint release). Scores come from a caller-supplied function, so the same code promotes on the
official FSKU score, on MC accuracy, or on retrieval MRR.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

log = logging.getLogger(__name__)

CHAMPION, PREVIOUS = "champion", "previous"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate_score: float
    champion_score: Optional[float]
    margin: float


def decide(candidate_score: float, champion_score: Optional[float], margin: float = 0.0,
           higher_is_better: bool = True) -> Decision:
    """Promote when there is no champion, or when the candidate beats it by MORE than `margin`
    (an equal score never moves the alias: a tie is no evidence of improvement)."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if candidate_score != candidate_score:  # NaN
        raise ValueError("the candidate's score is NaN")
    if champion_score is None:
        return Decision(True, "no current champion", candidate_score, None, margin)
    gain = candidate_score - champion_score if higher_is_better else champion_score - candidate_score
    if gain > margin:
        return Decision(True, f"better by {gain:.4g} (> margin {margin:g})", candidate_score, champion_score, margin)
    if gain == 0:
        return Decision(False, "equal to the champion", candidate_score, champion_score, margin)
    if gain > 0:
        return Decision(False, f"better by only {gain:.4g} (<= margin {margin:g})", candidate_score, champion_score, margin)
    return Decision(False, f"worse by {-gain:.4g}", candidate_score, champion_score, margin)


@dataclass(frozen=True)
class Release:
    """A student version, optionally with the KB version it is evaluated and shipped with."""

    model_version: str
    kb_version: Optional[str] = None


def promote_release(model_name: str, candidate: Release, score: Callable[[Release], float], margin: float = 0.0,
                    kb_name: Optional[str] = None, higher_is_better: bool = True, metric: str = "score") -> dict:
    """Score the candidate and the current champion release with `score`, decide, and move the
    aliases when the candidate wins. Returns the decision and what changed."""
    from . import tracking

    champion_model = tracking.alias_version(model_name, CHAMPION)
    champion_kb = tracking.alias_version(kb_name, CHAMPION) if kb_name else None
    champion = Release(champion_model, champion_kb) if champion_model else None
    if champion == candidate:
        decision = Decision(False, "the candidate is already the champion", float("nan"), None, margin)
        return {"decision": asdict(decision), "champion": asdict(candidate), "previous": None}
    candidate_score = float(score(candidate))
    champion_score = float(score(champion)) if champion else None
    decision = decide(candidate_score, champion_score, margin, higher_is_better)
    log.info("%s: candidate %s scores %.4f, champion %s %s -> %s (%s)", metric, candidate,
             candidate_score, champion, "-" if champion_score is None else f"{champion_score:.4f}",
             "promote" if decision.promote else "keep", decision.reason)
    tags = {"promotion.metric": metric, "promotion.decision": "promoted" if decision.promote else "kept champion",
            "promotion.reason": decision.reason, "promotion.candidate_score": candidate_score,
            "promotion.champion_score": "" if champion_score is None else champion_score,
            "promotion.champion_version": champion.model_version if champion else "",
            "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tracking.set_version_tags(model_name, candidate.model_version, tags)
    if kb_name and candidate.kb_version:
        tracking.set_version_tags(kb_name, candidate.kb_version, tags)
    if decision.promote:
        if champion:
            tracking.set_alias(model_name, PREVIOUS, champion.model_version)
            if kb_name and champion.kb_version:
                tracking.set_alias(kb_name, PREVIOUS, champion.kb_version)
        tracking.set_alias(model_name, CHAMPION, candidate.model_version)
        if kb_name and candidate.kb_version:
            tracking.set_alias(kb_name, CHAMPION, candidate.kb_version)
    return {"decision": asdict(decision), "champion": asdict(candidate if decision.promote else champion),
            "previous": asdict(champion) if decision.promote and champion else None}
