"""Question classifier and parser: multiple choice vs descriptive, stem and options.

The competition format puts options on the last lines as ``1 text`` .. ``5 text``; other Korean
exams use ``1.``, ``1)``, ``(1)`` or ``①`` markers, sometimes all options on one line. Options
are the LAST run of consecutive markers numbered 1..n (n >= 2) in one marker style, so numbers
inside the stem ("제14조", "1,000명", "3억원", a numbered list followed by the question) are
never taken for options.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

CIRCLED = "①②③④⑤⑥⑦⑧⑨"

# marker styles: (name, regex for a line start, regex for inline splitting)
_LINE_MARKERS = {
    "space": re.compile(r"^\s*([1-9])\s+(?![.)])(\S.*)$"),  # "1 text" (the competition's own)
    "dot": re.compile(r"^\s*([1-9])\.\s*(\S.*)$"),
    "paren": re.compile(r"^\s*([1-9])\)\s*(\S.*)$"),
    "wrapped": re.compile(r"^\s*\(([1-9])\)\s*(\S.*)$"),
    "circled": re.compile(r"^\s*([①-⑨])\s*(\S.*)$"),
}
_INLINE_MARKERS = {
    "circled": re.compile(r"([①-⑨])"),
    "wrapped": re.compile(r"\(([1-9])\)"),
    "paren": re.compile(r"(?:(?<=\s)|^)([1-9])\)"),
}
MIN_OPTIONS = 2
QUESTION_CUES = re.compile(r"(\?|것은|것을|고르|옳|틀린|아닌|무엇|해당하는|적절한)")


@dataclass
class ClassifiedQuestion:
    question_id: str
    original_text: str
    question_type: str  # "multiple_choice" | "descriptive"
    parsed_question: str  # the stem
    choices: dict[str, str] = field(default_factory=dict)
    confidence: float = 1.0

    @property
    def option_texts(self) -> list[str]:
        """The option texts in option-number order ([] for descriptive)."""
        return [self.choices[k] for k in sorted(self.choices, key=int)]

    def to_record(self) -> dict:
        """The `fsku classify` line: {"ID", "question_type", "stem", "choices"}."""
        return {"ID": self.question_id, "question_type": self.question_type, "stem": self.parsed_question,
                "choices": self.choices}

    def to_dict(self) -> dict:
        return asdict(self)


def _number(marker: str) -> int:
    return CIRCLED.index(marker) + 1 if marker in CIRCLED else int(marker)


def _trailing_option_block(lines: list[str]) -> tuple[int, dict[str, str], str] | None:
    """(index where options start, options, style) for the last consecutive 1..n marker run."""
    best = None
    for style, pattern in _LINE_MARKERS.items():
        end = len(lines)
        while end > 0 and not lines[end - 1].strip():
            end -= 1
        options: list[tuple[int, str]] = []
        i = end - 1
        expected = None
        while i >= 0:
            m = pattern.match(lines[i])
            if not m:
                break
            num = _number(m.group(1))
            if expected is not None and num != expected:
                break
            options.insert(0, (num, m.group(2).strip()))
            expected = num - 1
            i -= 1
            if num == 1:
                break
        if options and options[0][0] == 1 and len(options) >= MIN_OPTIONS:
            start = i + 1
            if best is None or start < best[0]:
                best = (start, {str(n): text for n, text in options}, style)
    return best


def _inline_options(line: str) -> tuple[str, dict[str, str]] | None:
    """Options written on one line ('... ① A ② B ③ C ④ D'): (text before them, options)."""
    for pattern in _INLINE_MARKERS.values():
        marks = list(pattern.finditer(line))
        nums = [_number(m.group(1)) for m in marks]
        # the last run 1..n in order
        for start in range(len(nums) - 1, -1, -1):
            if nums[start] == 1 and nums[start:] == list(range(1, len(nums) - start + 1)):
                run = marks[start:]
                if len(run) < MIN_OPTIONS + 1:
                    break
                opts = {}
                for k, m in enumerate(run):
                    end = run[k + 1].start() if k + 1 < len(run) else len(line)
                    opts[str(k + 1)] = line[m.end():end].strip(" ,;")
                if all(opts.values()):
                    return line[:run[0].start()].strip(), opts
                break
    return None


def classify_question(question_id: str, text: str) -> ClassifiedQuestion:
    """Parse one question. Confidence drops when the evidence for options is weak (no question
    cue in the stem, only two options, or options found inline)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"question {question_id!r}: empty question text")
    lines = text.strip().replace("\r\n", "\n").split("\n")
    block = _trailing_option_block(lines)
    if block and block[0] == 0 and len(block[1]) >= 3:
        raise ValueError(f"question {question_id!r}: options ({len(block[1])} lines '1 ...') but no question stem before them")
    if block and block[0] > 0:
        start, options, style = block
        stem = "\n".join(lines[:start]).strip()
        confidence = 1.0 if style == "space" else 0.9
        if not QUESTION_CUES.search(stem):
            confidence -= 0.3
        if len(options) < 3:
            confidence -= 0.3
        if confidence >= 0.5:
            return ClassifiedQuestion(question_id, text, "multiple_choice", stem, options, round(confidence, 2))
    inline = _inline_options(lines[-1])
    if inline:
        before, options = inline
        stem = "\n".join(lines[:-1] + ([before] if before else [])).strip()
        if stem:
            confidence = 0.8 if QUESTION_CUES.search(stem) else 0.5
            return ClassifiedQuestion(question_id, text, "multiple_choice", stem, options, confidence)
    return ClassifiedQuestion(question_id, text, "descriptive", text.strip(), {}, 0.9 if block else 1.0)


def read_questions_csv(path) -> list[tuple[str, str]]:
    """(ID, Question) rows of a competition CSV (UTF-8 with or without BOM); errors name the row."""
    import csv
    from pathlib import Path

    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # documented handling: Korean CSVs saved by Excel are often cp949; accept them, loudly
        try:
            text = raw.decode("cp949")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 (with or without BOM) nor cp949 text") from None
        log.warning("%s: read as cp949 (not UTF-8)", path)
    import io

    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"ID", "Question"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected ID,Question (got {reader.fieldnames})")
        rows = []
        for lineno, row in enumerate(reader, start=2):
            if not (row.get("ID") or "").strip() or not (row.get("Question") or "").strip():
                raise ValueError(f"{path}: row {lineno} has an empty ID or Question")
            rows.append((row["ID"].strip(), row["Question"]))
    ids = [r[0] for r in rows]
    if len(set(ids)) != len(ids):
        seen, dup = set(), []
        for lineno, i in enumerate(ids, start=2):
            if i in seen:
                dup.append(f"{i!r} (row {lineno})")
            seen.add(i)
        raise ValueError(f"{path}: duplicate IDs {', '.join(dup[:5])}; every ID must appear once")
    if not rows:
        raise ValueError(f"{path}: no questions")
    return rows
