"""The synthetic QA record (the seed's SyntheticQAPair plus kind/type/keywords/choices), its
construction from a teacher's JSON, and validated JSONL I/O.

``question`` is stored in the competition's own format: for multiple choice the stem followed by
one ``k text`` line per option, so training prompts look exactly like test.csv rows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..jsonl import iter_jsonl
from ..jsonl import write_jsonl as _write_rows
from .parse import first_present
from .split import SPLIT_NAMES

KINDS = ("multiple_choice", "descriptive")
QTYPES = ("lookup", "procedural", "negative")
SPLITS = ("",) + SPLIT_NAMES  # "" until split_by_group assigns one


@dataclass
class SyntheticQA:
    qa_id: str
    kind: str
    qtype: str
    question: str
    answer: str  # multiple choice: the correct option's number; descriptive: the reference answer
    choices: dict[str, str] = field(default_factory=dict)
    keywords: list[str] = field(default_factory=list)
    context_chunk_ids: list[str] = field(default_factory=list)
    source_article: str = ""  # "<document title> <article>": the unit of the train/val/test split
    teacher_model: str = ""
    overall_quality_score: float = 0.0  # 0-10 (judge score when a judge ran, else grounding x 10)
    difficulty_level: int = 3  # 1 (lookup of one stated fact) .. 5 (combines several provisions)
    prompt_version: str = ""
    split: str = ""

    def __post_init__(self):
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.qtype not in QTYPES:
            problems.append(f"qtype must be one of {QTYPES}, got {self.qtype!r}")
        if not isinstance(self.question, str) or not self.question.strip():
            problems.append("question is empty")
        if self.kind == "multiple_choice" and self.answer not in self.choices:
            problems.append(f"answer {self.answer!r} is not one of the option numbers {sorted(self.choices)}")
        if not 1 <= int(self.difficulty_level) <= 5:
            problems.append(f"difficulty_level must be 1-5, got {self.difficulty_level}")
        if not 0.0 <= float(self.overall_quality_score) <= 10.0:
            problems.append(f"overall_quality_score must be in [0, 10], got {self.overall_quality_score}")
        if self.split not in SPLITS:
            problems.append(f"split must be one of {SPLITS}, got {self.split!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def stem(self) -> str:
        return self.question.split("\n", 1)[0] if self.kind == "multiple_choice" else self.question

    @property
    def answer_text(self) -> str:
        """What the answer says: the correct option's text, or the reference answer."""
        return self.choices.get(self.answer, "") if self.kind == "multiple_choice" else self.answer

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def render_mc_question(stem: str, options: list[str]) -> str:
    """The competition format: the stem, then ``k text`` lines."""
    return "\n".join([stem.strip()] + [f"{k} {o.strip()}" for k, o in enumerate(options, start=1)])


def qa_id_for(chunk_id: str, kind: str, question: str) -> str:
    return hashlib.sha1(f"{chunk_id}|{kind}|{question}".encode("utf-8")).hexdigest()[:16]


_OPTION_PREFIX = re.compile(r"^\s*(?:\(([1-9])\)\s*|([1-9])(?:[.)]\s+|\)|\s+)|([①-⑨])\s*)")


def strip_option_number(option: str, position: int) -> str:
    """'2) 3년' at position 2 -> '3년'. Only the option's own number followed by a separator is
    removed, so an option that starts with a quantity ('1년', '1.5%', '3 영업일' at position 1) stays whole."""
    m = _OPTION_PREFIX.match(option)
    if m:
        number = m.group(1) or m.group(2) or str("①②③④⑤⑥⑦⑧⑨".index(m.group(3)) + 1)
        if int(number) == position and option[m.end():].strip():
            return option[m.end():].strip()
    return option.strip()


def _difficulty(value: Any) -> int:
    try:
        return min(5, max(1, int(round(float(value)))))
    except (TypeError, ValueError):
        return 3


def from_teacher_json(obj: dict[str, Any], *, kind: str, qtype: str, chunk_id: str, source_article: str,
                      teacher_model: str, prompt_version: str) -> SyntheticQA:
    """A record from the teacher's JSON; raises ValueError naming what is missing or malformed."""
    question = first_present(obj, "question", "질문", "stem")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("missing_question")
    difficulty = _difficulty(first_present(obj, "difficulty", "difficulty_level", "난이도"))
    common = dict(kind=kind, qtype=qtype, context_chunk_ids=[chunk_id], source_article=source_article,
                  teacher_model=teacher_model, difficulty_level=difficulty, prompt_version=prompt_version)
    if kind == "multiple_choice":
        options = first_present(obj, "choices", "options", "선택지")
        if isinstance(options, dict):
            options = [options[k] for k in sorted(options, key=lambda k: str(k))]
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise ValueError("missing_choices")
        options = [strip_option_number(o, k) for k, o in enumerate(options, start=1)]
        answer = first_present(obj, "answer", "정답", "answer_index")
        m = re.search(r"[1-9]", str(answer)) if answer is not None else None
        if m is None:
            raise ValueError("missing_answer")
        choices = {str(k): o for k, o in enumerate(options, start=1)}
        if m.group(0) not in choices:
            raise ValueError(f"answer_out_of_range: answer {m.group(0)} with {len(options)} options")
        text = render_mc_question(question, options)
        return SyntheticQA(qa_id=qa_id_for(chunk_id, kind, text), question=text, answer=m.group(0),
                           choices=choices, **common)
    answer = first_present(obj, "answer", "정답", "reference_answer")
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("missing_answer")
    keywords = first_present(obj, "keywords", "키워드") or []
    if isinstance(keywords, str):
        keywords = [k for k in re.split(r"[,，、]", keywords)]
    if not isinstance(keywords, list) or not all(isinstance(k, (str, int, float)) for k in keywords):
        raise ValueError("malformed_keywords")
    keywords = [str(k).strip() for k in keywords if str(k).strip()]
    q = question.strip()
    return SyntheticQA(qa_id=qa_id_for(chunk_id, kind, q), question=q, answer=answer.strip(),
                       keywords=keywords, **common)


def write_jsonl(records: Iterable[SyntheticQA], path: str | Path) -> int:
    return _write_rows((r.to_dict() for r in records), path)


def read_jsonl(path: str | Path) -> list[SyntheticQA]:
    """Records from a synth_qa JSONL; a line with unknown/missing fields or invalid values raises
    ValueError naming the file and line."""
    names = {f.name for f in dataclasses.fields(SyntheticQA)}
    required = {f.name for f in dataclasses.fields(SyntheticQA)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    out = []
    for lineno, row in iter_jsonl(path):
        unknown, missing = set(row) - names, required - set(row)
        if unknown or missing:
            raise ValueError(f"{path}:{lineno}: not a synth_qa record (unknown fields {sorted(unknown)}, "
                             f"missing {sorted(missing)})")
        try:
            out.append(SyntheticQA(**row))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from None
    return out
