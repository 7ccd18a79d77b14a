"""Strict JSON out of a teacher's free text, with a small repair step and a named rejection reason.

The teacher is asked for one JSON object. Small models wrap it in prose or code fences, use curly
quotes, leave trailing commas, write Python literals, or stop mid-object at the token cap. We fix
exactly those, in that order, and parse with ``json.loads`` only: data is never evaluated.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}
_CURLY = str.maketrans({"“": '"', "”": '"', "„": '"', "‘": "'", "’": "'"})


class ParseError(ValueError):
    """The text holds no JSON object we can recover; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Parsed:
    value: dict[str, Any]
    repairs: tuple[str, ...]  # which repairs were needed ('' when the text was clean JSON)


def _structure(text: str) -> list[tuple[int, str]]:
    """(index, char) of every bracket and comma outside JSON strings."""
    out, in_str, esc = [], False, False
    for i, c in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{}[],":
            out.append((i, c))
    return out


def _outer_object(text: str) -> tuple[str, bool]:
    """The first top-level {...} in text (string-aware); (fragment, complete). An object cut off
    by the token cap comes back incomplete, from its '{' to the end."""
    start = text.find("{")
    if start < 0:
        raise ParseError("no_json_object", "no '{' in the output")
    depth = 0
    for i, c in _structure(text[start:]):
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return text[start:start + i + 1], True
    return text[start:], False


def _close_truncated(fragment: str) -> str:
    """Close an object cut off mid-way: drop the dangling key or partial value after the last
    complete one, then close the open brackets in reverse order."""
    last_safe = 0  # end of the last complete value: after a bracket, or before a comma
    for i, c in _structure(fragment):
        last_safe = i if c == "," else i + 1
    body = fragment[:last_safe]  # a value cut mid-way is dropped, never kept half-written
    stack: list[str] = []
    for _, c in _structure(body):
        if c in "{[":
            stack.append("}" if c == "{" else "]")
        elif c in "}]" and stack:
            stack.pop()
    body = re.sub(r"[,:\s]+$", "", body)
    return body + "".join(reversed(stack))


def _single_to_double_quotes(s: str) -> str:
    """{'a': 'b'} -> {"a": "b"} when the text has no double-quoted strings at all."""
    if '"' in s:
        return s
    return re.sub(r"'((?:[^'\\]|\\.)*)'", lambda m: json.dumps(m.group(1), ensure_ascii=False), s)


def parse_json_object(text: str) -> Parsed:
    """The JSON object the teacher wrote, repaired if needed; raises ParseError with a reason
    (no_json_object, truncated_unrecoverable, invalid_json, not_an_object)."""
    if not text or not text.strip():
        raise ParseError("empty_output")
    repairs: list[str] = []
    fenced = _FENCE.search(text)
    if fenced and "{" in fenced.group(1):
        text = fenced.group(1)
        repairs.append("code_fence")
    fragment, complete = _outer_object(text)
    if fragment != text.strip() and "code_fence" not in repairs:
        repairs.append("surrounding_text")
    s = fragment
    if not complete:
        s = _close_truncated(fragment)
        if not s or s == "{}":
            raise ParseError("truncated_unrecoverable", "the object ends before its first value")
        repairs.append("closed_truncated")
    error: Optional[json.JSONDecodeError] = None
    for name, fix in (("none", lambda x: x),
                      ("curly_quotes", lambda x: x.translate(_CURLY)),
                      ("trailing_commas", lambda x: _TRAILING_COMMA.sub(r"\1", x)),
                      ("python_literals", lambda x: re.sub(r"\b(True|False|None)\b", lambda m: _PY_LITERALS[m.group(1)], x)),
                      ("single_quotes", _single_to_double_quotes)):
        fixed = fix(s)
        if fixed != s:
            repairs.append(name)
            s = fixed
        try:
            value = json.loads(s)
        except json.JSONDecodeError as exc:
            error = exc
            continue
        if not isinstance(value, dict):
            raise ParseError("not_an_object", f"got {type(value).__name__}")
        return Parsed(value, tuple(repairs))
    raise ParseError("invalid_json", f"{error.msg} at char {error.pos}")


def first_present(obj: dict, *keys: str) -> Optional[Any]:
    """The value of the first key present (teachers vary between 'answer' and '정답' etc.)."""
    for k in keys:
        if k in obj and obj[k] not in (None, ""):
            return obj[k]
    return None
