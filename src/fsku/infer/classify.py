"""Question classifier and parser: multiple choice vs descriptive, stem and options.

The competition format puts options on the last lines as ``1 text`` .. ``5 text``; other Korean
exams use ``1.``, ``1)``, ``(1)`` or ``①`` markers, sometimes all options on one line. Options
are the LAST run of consecutive markers numbered 1..n (n >= 2, up to 99; circled up to ⑳) in one
marker style, so numbers inside the stem ("제14조", "1,000명", "3억원", a numbered list followed
by the question) are never taken for options. An option line may be empty (``2`` alone: the model
can still pick it) only BETWEEN options with text, and two options in the run need text: a run that
ends in empty options is cut before them (a stray trailing ``5`` is no fifth option) and a run that
starts with one is no option block. Line endings (CRLF, CR alone, mixed) are normalised first.

Row CONTENT never ends a run: `classify_question` returns a question for any text, and a problem
sets `flag` (`classify_file` in fsku.infer.predict logs it as a warning naming the file and row):
- FLAG_EMPTY: an empty Question, or one of only control characters: descriptive with an empty
  stem, confidence 0. predict does not ask the model; the row gets the recorded placeholder (path
  ``none``, empty answer, valid but scoring 0) and is counted apart from the model's failures.
- FLAG_NO_STEM: three or more options and nothing before them: multiple choice with an empty stem
  at confidence 0.3; the model still picks an option.

`read_question_rows` reads the competition CSV strictly for its STRUCTURE: an unterminated quote
(which would swallow the rows after it), extra fields, an empty, duplicate or control-character ID
and unreadable paths are ValueErrors naming the file and the physical line a row starts on. Quote
placement is read as csv.reader always read it (``A,"망분리"란 무엇인가?`` -> ``망분리란 무엇인가?``),
with a warning naming the row. Control characters (C0 except tab and newlines, DEL, C1) are removed
from a Question with a warning naming the row (the line-separator ones, VT FF FS GS RS NEL, become
newlines); an ID holding one is refused, since a cleaned ID would no longer be the one the grader
expects.
"""
from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

# the one definition of option numbers and control characters in fsku.infer (options.py and
# prompts.py import them): 1..99 in digits (two for 10+ options; never three: years, amounts), ①..⑳
CIRCLED = "①②③④⑤⑥⑦⑧⑨⑩⑪⑫⑬⑭⑮⑯⑰⑱⑲⑳"
OPTION_NUMBER = r"[1-9][0-9]?"
CIRCLED_CLASS = f"[{CIRCLED[0]}-{CIRCLED[-1]}]"

# marker styles: (name, regex for a line start, regex for inline splitting); group 2 is the option
# text, absent for an empty option ("2" alone on its line)
_LINE_MARKERS = {
    "space": re.compile(rf"^\s*({OPTION_NUMBER})(?:\s+(?![.)])(\S.*?))?\s*$"),  # "1 text" (the competition's own)
    "dot": re.compile(rf"^\s*({OPTION_NUMBER})\.(?:\s*(\S.*?))?\s*$"),
    "paren": re.compile(rf"^\s*({OPTION_NUMBER})\)(?:\s*(\S.*?))?\s*$"),
    "wrapped": re.compile(rf"^\s*\(({OPTION_NUMBER})\)(?:\s*(\S.*?))?\s*$"),
    "circled": re.compile(rf"^\s*({CIRCLED_CLASS})(?:\s*(\S.*?))?\s*$"),
}
_INLINE_MARKERS = {
    "circled": re.compile(rf"({CIRCLED_CLASS})"),
    "wrapped": re.compile(rf"\(({OPTION_NUMBER})\)"),
    "paren": re.compile(rf"(?:(?<=\s)|^)({OPTION_NUMBER})\)"),
}
MIN_OPTIONS = 2  # options in a run, and options with text in it
# C0 controls except tab/LF/CR, DEL and C1; the line-separator ones among them become newlines
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_LINE_CONTROLS = "\x0b\x0c\x1c\x1d\x1e\x85"
FLAG_EMPTY = "empty question"  # ClassifiedQuestion.flag values (row content problems, see the module docstring)
FLAG_NO_STEM = "options but no question stem"
NO_STEM_CONFIDENCE = 0.3
QUESTION_CUES = re.compile(r"(\?|것은|것을|고르|옳|틀린|아닌|무엇|해당하는|적절한)")


@dataclass
class ClassifiedQuestion:
    question_id: str
    original_text: str
    question_type: str  # "multiple_choice" | "descriptive"
    parsed_question: str  # the stem
    choices: dict[str, str] = field(default_factory=dict)
    confidence: float = 1.0
    flag: str = ""  # a row content problem (FLAG_EMPTY, FLAG_NO_STEM); "" for a normal question

    @property
    def option_texts(self) -> list[str]:
        """The option texts in option-number order ([] for descriptive)."""
        return [self.choices[k] for k in sorted(self.choices, key=int)]

    def to_record(self) -> dict:
        """The `fsku classify` line: {"ID", "question_type", "stem", "choices"} (+ "flag" when set)."""
        record = {"ID": self.question_id, "question_type": self.question_type, "stem": self.parsed_question,
                  "choices": self.choices}
        return {**record, "flag": self.flag} if self.flag else record

    def to_dict(self) -> dict:
        return asdict(self)


def option_number(marker: str) -> int:
    """"7" -> 7, "⑦" -> 7."""
    return CIRCLED.index(marker) + 1 if marker in CIRCLED else int(marker)


def _trailing_option_block(lines: list[str]) -> tuple[int, dict[str, str], str] | None:
    """(index where options start, options, style) for the last consecutive 1..n marker run (blank lines
    between options allowed) with at least MIN_OPTIONS options, MIN_OPTIONS of them with text (a run of
    bare numbers is no question). Empty options only between options with text: trailing ones are
    dropped (their lines belong to neither stem nor options), and a run whose option 1 is empty is none."""
    best = None
    for style, pattern in _LINE_MARKERS.items():
        end = len(lines)
        while end > 0 and not lines[end - 1].strip():
            end -= 1
        options: list[tuple[int, str]] = []
        i = end - 1
        expected = None
        while i >= 0:
            if options and not lines[i].strip():  # a blank line between two options
                i -= 1
                continue
            m = pattern.match(lines[i])
            if not m:
                break
            num = option_number(m.group(1))
            if expected is not None and num != expected:
                break
            options.insert(0, (num, (m.group(2) or "").strip()))
            expected = num - 1
            i -= 1
            if num == 1:
                break
        while options and not options[-1][1]:  # "…\n4 D\n5": a stray number is no empty fifth option
            options.pop()
        if options and options[0][0] == 1 and options[0][1] and len(options) >= MIN_OPTIONS \
                and sum(bool(text) for _, text in options) >= MIN_OPTIONS:
            start = i + 1
            if best is None or start < best[0]:
                best = (start, {str(n): text for n, text in options}, style)
    return best


def _inline_options(line: str) -> tuple[str, dict[str, str]] | None:
    """Options written on one line ('... ① A ② B ③ C ④ D'): (text before them, options)."""
    for pattern in _INLINE_MARKERS.values():
        marks = list(pattern.finditer(line))
        nums = [option_number(m.group(1)) for m in marks]
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


def split_lines(text: str) -> list[str]:
    """The lines of `text` with CRLF, CR alone, LF and the other Unicode line breaks all ending a line."""
    return text.splitlines()


def strip_control(text: str) -> tuple[str, int]:
    """(text without control characters, how many there were); the line-separator controls become
    newlines, the rest (NUL, ESC, DEL, C1, ...) are removed. Tab, LF and CR stay."""
    found = len(CONTROL_CHARS.findall(text))
    if not found:
        return text, 0
    return CONTROL_CHARS.sub(lambda m: "\n" if m.group(0) in _LINE_CONTROLS else "", text), found


def classify_question(question_id: str, text: str) -> ClassifiedQuestion:
    """Parse one question; never raises on its content. Confidence drops when the evidence for options
    is weak (no question cue in the stem, only two options, an empty option, or options found inline).
    An empty (or control-only) text is descriptive with `flag` FLAG_EMPTY and confidence 0; options with
    nothing before them are multiple choice with an empty stem, `flag` FLAG_NO_STEM, confidence 0.3.
    The stem and options never hold control characters (`original_text` stays as given: it keys the cache)."""
    text = text if isinstance(text, str) else ""  # a missing cell (None, pandas NaN) is an empty question
    cleaned, _ = strip_control(text)
    lines = split_lines(cleaned.strip())
    if not "".join(lines).strip():
        return ClassifiedQuestion(question_id, text, "descriptive", "", {}, 0.0, flag=FLAG_EMPTY)
    block = _trailing_option_block(lines)
    if block and block[0] == 0 and len(block[1]) >= 3:
        return ClassifiedQuestion(question_id, text, "multiple_choice", "", block[1], NO_STEM_CONFIDENCE, flag=FLAG_NO_STEM)
    if block and block[0] > 0:
        start, options, style = block
        stem = "\n".join(lines[:start]).strip()
        confidence = 1.0 if style == "space" else 0.9
        if not QUESTION_CUES.search(stem):
            confidence -= 0.3
        if len(options) < 3:
            confidence -= 0.3
        if not all(options.values()):
            confidence -= 0.1
        if confidence >= 0.5:
            return ClassifiedQuestion(question_id, text, "multiple_choice", stem, options, round(confidence, 2))
    inline = _inline_options(lines[-1])
    if inline:
        before, options = inline
        stem = "\n".join(lines[:-1] + ([before] if before else [])).strip()
        if not stem:  # "① A ② B ③ C" and nothing else
            return ClassifiedQuestion(question_id, text, "multiple_choice", "", options, NO_STEM_CONFIDENCE,
                                      flag=FLAG_NO_STEM)
        confidence = 0.8 if QUESTION_CUES.search(stem) else 0.5
        return ClassifiedQuestion(question_id, text, "multiple_choice", stem, options, confidence)
    return ClassifiedQuestion(question_id, text, "descriptive", "\n".join(lines).strip(), {}, 0.9 if block else 1.0)


def field_size_limit_for(chars: int, maxsize: int | None = None) -> int:
    """The csv field-size limit that admits every field of a text of `chars` characters (no field is
    longer than the whole text), never below csv's default 131072 and capped at `maxsize`."""
    import sys

    return min(max(chars + 1, 131072), sys.maxsize if maxsize is None else maxsize)


def _set_field_size_limit(limit: int) -> None:
    import csv

    try:
        csv.field_size_limit(limit)
    except OverflowError:  # a 32-bit C long (Windows): the largest it takes
        csv.field_size_limit(field_size_limit_for(limit, 2**31 - 1))


def _id_shape(qid: str) -> str | None:
    """`qid` with every digit as 0 (TEST_003 -> TEST_000: same prefix, same digit count); None when it
    has no letter or no digit (plain numbers such as "1,000" start too many lines to mean a row)."""
    if not re.search(r"[^\W\d_]", qid) or not re.search(r"\d", qid):
        return None
    return re.sub(r"\d", "0", qid)


_PHYSICAL_LINE = re.compile(r"\r\n|\r|\n")  # the line breaks csv counts in reader.line_num
_END_MARK = "\ue000fsku-end-of-file\ue000"  # a last line no CSV holds: swallowed only by a quote left open


def _csv_records(path, text: str) -> list[tuple[int, list[str]]]:
    """(physical line the record starts on, fields) for every non-blank record of `text`, read as
    csv.reader (and csv.DictReader) always read it, not strict about quote placement: a field such as
    ``"망분리"란 무엇인가?`` reads ``망분리란 무엇인가?``, with a warning naming the row. A quote left open to
    the end of the file is a ValueError (found by a mark line appended after the text: only an open
    quote swallows it)."""
    import csv
    import io

    old_limit = csv.field_size_limit()
    _set_field_size_limit(field_size_limit_for(len(text) + len(_END_MARK) + 2))  # csv's default stops at 128 K
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.reader(io.StringIO(text + "\n" + _END_MARK + "\n", newline=""))
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for row in reader:
            if row == [_END_MARK]:
                break
            if any(_END_MARK in f for f in row):
                raise ValueError(f"{path}: row {start}: unterminated quoted field: a '\"' opened in the row starting "
                                 f"on line {start} is never closed (it runs to the end of the file, line {len(lines)})")
            if row:  # blank lines are no rows (as csv.DictReader has it)
                raw = "".join(lines[start - 1:reader.line_num])
                if '"' in raw:
                    try:
                        list(csv.reader(io.StringIO(raw, newline=""), strict=True))
                    except csv.Error as e:
                        log.warning("%s: row %d: misplaced quote (%s); read as csv.reader reads it: %r", path, start,
                                    e, ",".join(row)[:80])
                records.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise ValueError(f"{path}: row {start}: malformed CSV ({e}; at line {reader.line_num}); quote a Question that "
                         "holds commas, quotes or newlines, doubling the quotes inside it") from None
    finally:
        csv.field_size_limit(old_limit)
    return records


def read_question_rows(path) -> list[tuple[int, str, str]]:
    """(line, ID, Question) rows of a competition CSV (UTF-8 with or without BOM, or cp949 with a
    warning), `line` being the physical line the row starts on (a quoted Question spans several).

    Strict about STRUCTURE: an unterminated quote, a row with more fields than the header, a quoted
    field holding a line that starts like a row that is missing (``TEST_004,``, shaped exactly like the
    file's IDs, same prefix and digit count, and no ID of the file: an unterminated quote closed by a
    later one swallowed it), an empty, duplicate or control-character ID, and a directory or unreadable
    path are ValueErrors naming the file and row. Quote placement is read leniently (see
    `_csv_records`). Row CONTENT is no error: an empty Question is returned as "" (the classifier flags
    it). Fields may be as long as the file."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; expected a CSV file with columns ID,Question")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # documented handling: Korean CSVs saved by Excel are often cp949; accept them, loudly
        try:
            text = raw.decode("cp949")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 (with or without BOM) nor cp949 text") from None
        log.warning("%s: read as cp949 (not UTF-8)", path)

    records = _csv_records(path, text)
    if not records:
        raise ValueError(f"{path}: no questions (empty file)")
    header = records[0][1]
    missing = {"ID", "Question"} - set(header)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected ID,Question (got {header})")
    id_col, q_col = header.index("ID"), header.index("Question")
    rows: list[tuple[int, str, str]] = []
    for lineno, row in records[1:]:
        if len(row) > len(header):
            raise ValueError(f"{path}: row {lineno}: {len(row)} fields but the header has {len(header)} (an unquoted comma"
                             " in the Question?); quote the field")
        raw_id = row[id_col] if id_col < len(row) else ""
        question = row[q_col] if q_col < len(row) else ""
        _, bad = strip_control(raw_id)  # before strip(), which would drop some of them (FS, GS, RS) silently
        if bad:
            raise ValueError(f"{path}: row {lineno}: ID {raw_id!r} contains {bad} control character(s); an ID must be "
                             "exactly what the grader expects, so it is not cleaned")
        qid = raw_id.strip()
        if not qid:
            raise ValueError(f"{path}: row {lineno} has an empty ID")
        question, bad = strip_control(question)
        if bad:
            log.warning("%s: row %d (ID %s): removed %d control character(s) from the Question", path, lineno, qid, bad)
        rows.append((lineno, qid, question))
    seen: set[str] = set()
    dup = []
    for lineno, qid, _ in rows:
        if qid in seen:
            dup.append(f"{qid!r} (row {lineno})")
        seen.add(qid)
    if dup:
        raise ValueError(f"{path}: duplicate IDs {', '.join(dup[:5])}; every ID must appear once")
    if not rows:
        raise ValueError(f"{path}: no questions")
    _check_swallowed_rows(path, rows, seen)
    return rows


def _check_swallowed_rows(path, rows: list[tuple[int, str, str]], ids: set[str]) -> None:
    """ValueError when a Question holds a line that starts like a row of this file that is not there:
    ``<ID>,`` with the ID shaped exactly like the file's IDs (`_id_shape`) and no ID of the file.
    A Question quoting a real ID (``TEST_001, TEST_002 항목``) or another shape (``TEST_1,`` in a file of
    TEST_000 IDs) is never an error."""
    shapes = {shape for qid in ids if (shape := _id_shape(qid)) is not None}
    if not shapes:
        return
    for lineno, _, question in rows:
        for k, line in enumerate(_PHYSICAL_LINE.split(question)[1:], start=1):
            head, comma, _ = line.partition(",")
            if comma and head not in ids and _id_shape(head) in shapes:
                raise ValueError(f"{path}: row {lineno}: the Question holds a line that starts like a row "
                                 f"({line[:30]!r}, line {lineno + k}) whose ID is nowhere else in the file: an "
                                 "unterminated quote probably merged the rows after it")


def read_questions_csv(path) -> list[tuple[str, str]]:
    """(ID, Question) rows of a competition CSV; see `read_question_rows`."""
    return [(qid, question) for _, qid, question in read_question_rows(path)]
