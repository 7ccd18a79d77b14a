"""From raw teacher text to accepted, split SyntheticQA records, with a rejection reason for
everything dropped. Order of checks: parse -> record -> format -> language -> length -> grounding
-> judge (optional) -> near duplicates -> decontamination -> split by article."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import pandas as pd

from . import filters as F
from .parse import ParseError, parse_json_object
from .records import SyntheticQA, from_teacher_json
from .split import split_by_group

Judge = Callable[[SyntheticQA, str], float]  # (item, source chunk) -> score 0-10


@dataclass
class FilterSettings:
    min_hangul: float = 0.5
    min_grounding: float = 0.5
    judge_threshold: float = 7.0
    dedup_threshold: float = 0.7
    decontam_ngram: int = 8
    decontam_threshold: float = 0.5
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0


@dataclass
class Outcome:
    accepted: list[SyntheticQA] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # {"ID", "stage", "reason", "text"/"question"}
    repairs: Counter = field(default_factory=Counter)

    def rejection_counts(self) -> Counter:
        return Counter(r["reason"] for r in self.rejected)


def source_article(row: Mapping) -> str:
    """The split unit: the document title and the article ('전자금융거래법 제21조의2'); chunks
    outside any article fall back to their heading path."""
    article = row.get("article") or ""
    if article:
        return f"{row.get('title') or row.get('doc_id')} {article}"
    return str(row.get("path") or row.get("chunk_id"))


def process(raw: Sequence[dict], chunks: pd.DataFrame, tokenize: F.Tokenizer, settings: FilterSettings,
            eval_questions: Sequence[str] = (), judge: Optional[Judge] = None) -> Outcome:
    by_id = chunks.set_index("chunk_id")
    out = Outcome()
    candidates: list[SyntheticQA] = []
    candidate_ids: list[str] = []
    for rec in raw:
        rid = rec["ID"]
        try:
            parsed = parse_json_object(rec.get("text", ""))
        except ParseError as exc:
            out.rejected.append({"ID": rid, "stage": "parse", "reason": exc.reason, "text": rec.get("text", "")[:500]})
            continue
        out.repairs.update(parsed.repairs)
        row = by_id.loc[rec["chunk_id"]]
        try:
            item = from_teacher_json(parsed.value, kind=rec["kind"], qtype=rec["qtype"], chunk_id=rec["chunk_id"],
                                     source_article=source_article(row.to_dict() | {"chunk_id": rec["chunk_id"]}),
                                     teacher_model=rec.get("teacher", ""), prompt_version=rec.get("template_version", ""))
        except (ValueError, TypeError) as exc:  # TypeError: a field of an unexpected JSON type
            reason = re.split(r"[:;]", str(exc), maxsplit=1)[0].strip().replace(" ", "_") \
                if isinstance(exc, ValueError) else "malformed_fields"
            out.rejected.append({"ID": rid, "stage": "record", "reason": reason, "text": rec.get("text", "")[:500]})
            continue
        if item.kind == "descriptive" and item.keywords:
            kept = F.select_keywords(item.keywords, item.answer, row["text"])
            if kept != item.keywords:
                out.repairs["keywords_selected"] += 1
                item.keywords = kept
        reason = F.check_format(item) or F.check_language(item, settings.min_hangul) or F.check_length(item)
        if reason:
            out.rejected.append({"ID": rid, "stage": "format", "reason": reason, "question": item.question})
            continue
        grounding = F.grounding_score(item, row["text"], tokenize)
        if grounding < settings.min_grounding:
            out.rejected.append({"ID": rid, "stage": "grounding", "reason": "not_grounded",
                                 "question": item.question, "score": round(grounding, 3)})
            continue
        item.overall_quality_score = round(10.0 * grounding, 2)
        if judge is not None:
            score = float(judge(item, row["text"]))
            item.overall_quality_score = round(score, 2)
            if score < settings.judge_threshold:
                out.rejected.append({"ID": rid, "stage": "judge", "reason": "judge_below_threshold",
                                     "question": item.question, "score": round(score, 2)})
                continue
        candidates.append(item)
        candidate_ids.append(rid)
    dup = set(F.near_duplicates([c.question for c in candidates], settings.dedup_threshold))
    # an evaluation question in the pool, or one lightly edited, must never reach training
    dirty = set(F.contaminated([c.question for c in candidates], eval_questions, settings.decontam_ngram,
                               settings.decontam_threshold)) if eval_questions else set()
    kept = []
    for i, (rid, item) in enumerate(zip(candidate_ids, candidates, strict=True)):
        if i in dirty:
            out.rejected.append({"ID": rid, "stage": "decontamination", "reason": "overlaps_evaluation_set",
                                 "question": item.question})
        elif i in dup:
            out.rejected.append({"ID": rid, "stage": "dedup", "reason": "near_duplicate", "question": item.question})
        else:
            kept.append(item)
    for item, split in zip(kept, split_by_group([k.source_article for k in kept], settings.split_ratios, settings.seed),
                           strict=True):
        item.split = split
    out.accepted = kept
    return out
