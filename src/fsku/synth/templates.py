"""Versioned prompt templates for the teacher (YAML files under ``templates/``; ``$name``
placeholders, so the JSON braces in the instructions need no escaping)."""
from __future__ import annotations

import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from .records import KINDS, QTYPES

TEMPLATE_DIR = Path(__file__).with_name("templates")
PLACEHOLDERS = {"title", "article", "chunk", "n_options"}


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: str
    kind: str
    qtype: str
    system: str
    user: str

    def render(self, *, title: str, article: str, chunk: str, n_options: int) -> list[dict]:
        """Chat messages for one source chunk."""
        values = {"title": title, "article": article, "chunk": chunk.strip(), "n_options": n_options}
        return [{"role": "system", "content": self.system},
                {"role": "user", "content": string.Template(self.user).substitute(values)}]


def _load(path: Path) -> PromptTemplate:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    missing = {"version", "kind", "qtype", "system", "user"} - set(data or {})
    if missing:
        raise ValueError(f"{path}: template lacks {sorted(missing)}")
    if data["kind"] not in KINDS or data["qtype"] not in QTYPES:
        raise ValueError(f"{path}: kind must be one of {KINDS} and qtype one of {QTYPES}")
    names = {m.group("named") or m.group("braced")
             for m in string.Template.pattern.finditer(data["user"]) if m.group("named") or m.group("braced")}
    if names - PLACEHOLDERS:
        raise ValueError(f"{path}: unknown placeholders {sorted(names - PLACEHOLDERS)}; allowed {sorted(PLACEHOLDERS)}")
    return PromptTemplate(path.stem, str(data["version"]), data["kind"], data["qtype"], data["system"].strip(), data["user"])


@lru_cache(maxsize=None)
def load_templates(folder: str = str(TEMPLATE_DIR)) -> dict[tuple[str, str], PromptTemplate]:
    """(kind, qtype) -> template, one file per pair."""
    out: dict[tuple[str, str], PromptTemplate] = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        t = _load(path)
        if (t.kind, t.qtype) in out:
            raise ValueError(f"{path}: a second template for ({t.kind}, {t.qtype})")
        out[(t.kind, t.qtype)] = t
    if not out:
        raise ValueError(f"{folder}: no *.yaml prompt templates")
    return out
