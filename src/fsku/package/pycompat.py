"""Does a bundle's code run on the organisers' Python? (pure: source text in, findings out)

Two checks, because the parser alone misses half of what breaks: the grammar (``ast.parse`` with
``feature_version``: ``except*``, ``type`` aliases, generic ``def f[T]``; PEP 701 f-strings, which a
3.12+ parser accepts whatever the feature version, by their tokens: `pep701_findings`) and names
the standard library gained after the target version (``tomllib``, ``typing.Self``, ``datetime.UTC``,
``enum.StrEnum``, …; from Python's "What's New" pages). A line carrying ``# py-compat: <reason>``
(a guarded import with a fallback) is reported as guarded, not as a problem.
"""
from __future__ import annotations

import ast
import io
import sys
import tokenize
from dataclasses import dataclass

GUARD_MARKER = "# py-compat:"
# module or module.name -> the Python version that added it (docs.python.org/3/whatsnew/3.11.html, 3.12, 3.13)
ADDED_IN = {
    "tomllib": (3, 11), "wsgiref.types": (3, 11),
    "typing.Self": (3, 11), "typing.LiteralString": (3, 11), "typing.Never": (3, 11), "typing.assert_never": (3, 11),
    "typing.assert_type": (3, 11), "typing.reveal_type": (3, 11), "typing.Required": (3, 11),
    "typing.NotRequired": (3, 11), "typing.TypeVarTuple": (3, 11), "typing.Unpack": (3, 11),
    "typing.dataclass_transform": (3, 11), "datetime.UTC": (3, 11), "enum.StrEnum": (3, 11),
    "enum.verify": (3, 11), "enum.ReprEnum": (3, 11), "asyncio.TaskGroup": (3, 11), "asyncio.timeout": (3, 11),
    "contextlib.chdir": (3, 11), "hashlib.file_digest": (3, 11), "operator.call": (3, 11),
    "builtins.ExceptionGroup": (3, 11), "builtins.BaseExceptionGroup": (3, 11),
    "typing.override": (3, 12), "typing.TypeAliasType": (3, 12), "itertools.batched": (3, 12),
    "calendar.Month": (3, 12), "calendar.Day": (3, 12),
    "warnings.deprecated": (3, 13), "typing.ReadOnly": (3, 13), "typing.TypeIs": (3, 13), "copy.replace": (3, 13),
}
BUILTIN_ADDED = {"ExceptionGroup": (3, 11), "BaseExceptionGroup": (3, 11), "aiter": (3, 10), "anext": (3, 10)}


@dataclass
class CompatFinding:
    file: str
    line: int
    what: str
    guarded: bool = False

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}" + (" (guarded)" if self.guarded else "")


def _version(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def check_source(source: str, filename: str, target: tuple[int, int] = (3, 10)) -> list[CompatFinding]:
    """Every construct in `source` that Python `target` cannot run, with its line."""
    try:
        tree = ast.parse(source, filename=filename, feature_version=target)
    except SyntaxError as exc:
        return [CompatFinding(filename, exc.lineno or 0, f"does not parse as Python {_version(target)}: {exc.msg}")]
    lines = source.splitlines()
    found: list[CompatFinding] = []
    if target < (3, 12) and sys.version_info >= (3, 12):
        found += pep701_findings(source, filename)

    def add(node, name: str, version: tuple[int, int]) -> None:
        if version <= target:
            return
        text = lines[node.lineno - 1] if 0 < node.lineno <= len(lines) else ""
        found.append(CompatFinding(filename, node.lineno, f"{name} needs Python {_version(version)}",
                                   GUARD_MARKER in text))

    aliases: dict[str, str] = {}  # local name -> module it names
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
                if alias.name in ADDED_IN:
                    add(node, f"module {alias.name}", ADDED_IN[alias.name])
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module in ADDED_IN:
                add(node, f"module {node.module}", ADDED_IN[node.module])
            for alias in node.names:
                qual = f"{node.module}.{alias.name}"
                if qual in ADDED_IN:
                    add(node, qual, ADDED_IN[qual])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            qual = f"{aliases[node.value.id]}.{node.attr}"
            if qual in ADDED_IN:
                add(node, qual, ADDED_IN[qual])
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in BUILTIN_ADDED:
            add(node, f"builtin {node.id}", BUILTIN_ADDED[node.id])
    return sorted({(f.file, f.line, f.what): f for f in found}.values(), key=lambda f: (f.line, f.what))


def _quote(token_text: str) -> str:
    """The quote an (f-)string token opens with: one of the four Python quotes."""
    body = token_text.lstrip("rRbBuUfF")
    return body[:3] if body[:3] in ('"' * 3, "'" * 3) else body[:1]


def pep701_findings(source: str, filename: str) -> list[CompatFinding]:
    """f-strings that only Python 3.12+ reads (PEP 701), from the tokens of a 3.12+ tokenizer: a string
    inside a replacement field whose quote would end an enclosing f-string, a backslash or a comment
    inside a replacement field, a single-quoted f-string spanning lines. Empty before 3.12 (whose parser
    rejects such f-strings itself)."""
    fstring_start = getattr(tokenize, "FSTRING_START", None)
    if fstring_start is None:
        return []
    found: list[CompatFinding] = []
    stack: list[str] = []  # quotes of the enclosing f-strings

    def add(tok, what: str) -> None:
        found.append(CompatFinding(filename, tok.start[0], f"f-string {what} needs Python 3.12"))

    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == fstring_start:
                quote = _quote(tok.string)
                if any(quote.startswith(outer) for outer in stack):  # it would end the outer one before 3.12
                    add(tok, "nested in the same quotes")
                stack.append(quote)
            elif tok.type == tokenize.FSTRING_END:
                stack.pop()
            elif not stack:
                continue
            elif tok.type == tokenize.FSTRING_MIDDLE and len(stack) > 1:  # a nested f-string's literal part
                if "\\" in tok.string:
                    add(tok, "with a backslash inside a replacement field")
                if "\n" in tok.string and any(len(q) == 1 for q in stack[:-1]):
                    add(tok, "spanning lines inside single quotes")
            elif tok.type == tokenize.STRING:
                if any(_quote(tok.string).startswith(outer) for outer in stack):
                    add(tok, "with a string in its own quotes inside a replacement field")
                if "\\" in tok.string:
                    add(tok, "with a backslash inside a replacement field")
                if "\n" in tok.string and any(len(q) == 1 for q in stack):
                    add(tok, "spanning lines inside single quotes")
            elif tok.type == tokenize.COMMENT:
                add(tok, "with a comment inside a replacement field")
            elif tok.type == tokenize.NL and any(len(q) == 1 for q in stack):
                add(tok, "spanning lines inside single quotes")
    except (tokenize.TokenError, SyntaxError):
        pass
    return found
