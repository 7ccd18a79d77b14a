"""The statute hierarchy: a document's level and the references between levels.

Korean financial law is layered: 법률 (act) → 시행령 (decree, 대통령령) → 시행규칙 (rule, 총리령/부령)
→ 감독규정/고시 (regulation: what 금융위원회 or a ministry sets). Lower levels cite the article they
implement ("법 제21조제2항에 따라", "영 제11조의2"), acts delegate downwards ("대통령령으로 정하는").
Pure functions on strings: `document_level` from a title (and the opening text), `parse_links` for
the references and delegations in one article's text, `resolve_link` against the articles a KB holds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .retrieve import law_base_name

LEVELS = ("act", "decree", "rule", "regulation")
OTHER = "other"

_REGULATION_ENDINGS = ("감독규정", "규정", "고시", "세칙", "지침", "기준", "규칙", "훈령", "예규")
# the promulgation line at the top of a document names its kind
_TEXT_CUES = ((re.compile(r"대통령령\s*제\s*\d+\s*호"), "decree"), (re.compile(r"(?:총리령|부령)\s*제\s*\d+\s*호"), "rule"),
              (re.compile(r"(?:고시|훈령|예규)\s*제\s*[\d-]+\s*호"), "regulation"), (re.compile(r"법률\s*제\s*\d+\s*호"), "act"))


def _compact(text: str) -> str:
    return re.sub(r"\s+", "", text)


def document_level(title: str, text: str = "") -> str:
    """act | decree | rule | regulation | other, from the title's ending ('... 시행령', '... 시행규칙',
    '...규정', '...고시', '...법'); a title that says nothing falls back on the promulgation line in
    the first 2,000 characters of `text` ('대통령령 제12345호', ...)."""
    t = _compact(title)
    if t.endswith("시행령"):
        return "decree"
    if t.endswith("시행규칙"):
        return "rule"
    if t.endswith(_REGULATION_ENDINGS):
        return "regulation"
    if t.endswith(("법", "법률")):
        return "act"
    head = text[:2000]
    found = [(m.start(), level) for pattern, level in _TEXT_CUES for m in [pattern.search(head)] if m]
    return min(found)[1] if found else OTHER


@dataclass(frozen=True)
class Link:
    """One reference in an article's text. kind "cite" (names a target article) or "delegates" (hands
    a matter down to a level, no article). target_law: the document title it points to (None when the
    text does not say which act, e.g. '법 제5조' in a regulation); target_level: that document's level;
    article '제21조의2' (None for a delegation), paragraph/item numbers as written (항/호)."""

    kind: str
    target_level: str
    target_law: Optional[str] = None
    article: Optional[str] = None
    paragraph: Optional[int] = None
    item: Optional[int] = None
    span: tuple[int, int] = (0, 0)


_ARTICLE = r"제\s*(\d+)\s*조(?:\s*의\s*(\d+))?(?:\s*제\s*(\d+)\s*항)?(?:\s*제\s*(\d+)\s*호)?"
# 「전자금융거래법」 제21조 / 「전자금융거래법 시행령」 제5조 / 「전자금융거래법」 시행령 제5조
_NAMED = re.compile(r"「([^」]{2,60})」\s*(시행령|시행규칙)?\s*" + _ARTICLE)
# 이 법 / 이 영 / 같은 법 / 같은 법 시행령 / 법 / 영 / 규칙 + article (the short names a decree or rule uses)
_SHORT = re.compile(r"(?<![가-힣「」])(이\s*|같은\s*)?(법|영|규칙)(\s*시행령|\s*시행규칙)?\s+" + _ARTICLE)
_DELEGATIONS = (
    (re.compile(r"대통령령으로\s*정"), "decree"),
    (re.compile(r"(?:총리령|[가-힣]+부령)으로\s*정"), "rule"),
    (re.compile(r"(?:금융위원회|금융감독원장|장관|위원회)이?가?\s*(?:정하여\s*)?(?:고시|정하는|정한다|정할)"), "regulation"),
)


def _article_parts(m: re.Match, first: int) -> tuple[str, Optional[int], Optional[int]]:
    num, sub, para, item = (m.group(first + i) for i in range(4))
    return (f"제{num}조" + (f"의{sub}" if sub else ""), int(para) if para else None, int(item) if item else None)


def parent_act(purpose_text: str) -> Optional[str]:
    """The act a regulation implements: the first 「...법」 (or 「...법률」) its purpose article names
    ('이 규정은 「전자금융거래법」 및 같은 법 시행령에서 위임된 사항...')."""
    for m in re.finditer(r"「([^」]{2,60})」", purpose_text):
        name = m.group(1).strip()
        if document_level(name) == "act":
            return name
    return None


def parse_links(text: str, own_title: str, parent: Optional[str] = None) -> list[Link]:
    """The references and delegations in `text`, an article of the document `own_title`, in order.
    Short names resolve from the citing document: in '전자금융거래법 시행령', '법' is 전자금융거래법 and
    '이 영' the decree itself; '같은 법' is the act last named with 「」; an act's own '이 법' is itself.
    In a regulation, '법'/'영'/'규칙' are those of `parent` (its act: `parent_act` of its purpose
    article), or unidentified (target_law None) without one."""
    own_level = document_level(own_title)
    base = law_base_name(own_title) if own_level in ("decree", "rule") else parent
    links: list[tuple[int, Link]] = []
    for m in _NAMED.finditer(text):
        law = m.group(1).strip() + (f" {m.group(2)}" if m.group(2) else "")
        article, para, item = _article_parts(m, 3)
        links.append((m.start(), Link("cite", document_level(law), law, article, para, item, m.span())))
    named_spans = [lk.span for _, lk in links]
    named_at = sorted((s, lk.target_law) for s, lk in links)
    for m in _SHORT.finditer(text):
        if any(a <= m.start() < b for a, b in named_spans):
            continue
        prefix, short, sub = _compact(m.group(1) or ""), m.group(2), _compact(m.group(3) or "")
        article, para, item = _article_parts(m, 4)
        if prefix == "같은":
            last_named = next((law for start, law in reversed(named_at) if start < m.start()), None)
            law = (law_base_name(last_named) + (f" {sub}" if sub else "")) if last_named else None
            level = document_level(law) if law else ("decree" if sub == "시행령" else "rule" if sub else "act")
        elif prefix == "이":
            law, level = own_title, own_level
        else:
            level = {"법": "act", "영": "decree", "규칙": "rule"}[short]
            if sub:
                level = "decree" if sub == "시행령" else "rule"
            # a decree, rule or regulation names its parent act '법' and that act's decree '영'
            if own_level in ("decree", "rule", "regulation") and base:
                law = base if level == "act" else f"{base} {'시행령' if level == 'decree' else '시행규칙'}"
            elif own_level == "act" and level == "act":
                law = own_title
            else:
                law = None
        links.append((m.start(), Link("cite", level, law, article, para, item, m.span())))
    for pattern, level in _DELEGATIONS:
        for m in pattern.finditer(text):
            links.append((m.start(), Link("delegates", level, None, None, None, None, m.span())))
    return [lk for _, lk in sorted(links, key=lambda x: x[0])]


def resolve_link(link: Link, articles: dict[str, set[str]]) -> Optional[tuple[str, str]]:
    """(title, article) of the KB document and article a cite points to, or None when the KB does not
    hold it (another law, a missing article, an unnamed act). `articles`: title -> its article ids.
    Titles match ignoring spaces."""
    if link.kind != "cite" or not link.target_law or not link.article:
        return None
    wanted = _compact(link.target_law)
    for title, arts in articles.items():
        if _compact(title) == wanted:
            return (title, link.article) if link.article in arts else None
    return None


# ----------------------------------------------------------------------------- the KB's link table

# links.parquet in a KB folder: one row per distinct reference of an article (sibling chunks of one
# article give one row); the reverse direction (which lower articles implement an act's article) is
# the same table read by target.
LINK_COLUMNS = ("source_title", "source_article", "source_level", "kind", "target_level", "target_title",
                "target_article", "paragraph", "item", "resolved")


def regulation_parents(levels: dict[str, str], document_heads: dict[str, str]) -> dict[str, str]:
    """{regulation title: the act it implements} (`parent_act` of its opening text; regulations
    whose purpose article names no act are left out)."""
    found = {t: parent_act(document_heads.get(t, "")[:3000]) for t, lv in levels.items() if lv == "regulation"}
    return {t: act for t, act in found.items() if act}


def kb_links(chunks: list[dict], document_heads: dict[str, str]) -> tuple[dict[str, str], list[dict]]:
    """({title: level}, link rows with LINK_COLUMNS) for chunks {title, article, text} and each
    document's opening text (its promulgation line and purpose article). `resolved`: the target is an
    article the KB holds (then target_title is that document's title as the KB spells it)."""
    levels = {title: document_level(title, document_heads.get(title, "")) for title in document_heads}
    for c in chunks:
        if c["title"] not in levels:
            levels[c["title"]] = document_level(c["title"])
    parents = regulation_parents(levels, document_heads)
    articles: dict[str, set[str]] = {}
    for c in chunks:
        if c["article"]:
            articles.setdefault(c["title"], set()).add(c["article"])
    rows, seen = [], set()
    for c in chunks:
        for link in parse_links(c["text"], c["title"], parents.get(c["title"])):
            target = resolve_link(link, articles)
            row = {"source_title": c["title"], "source_article": c["article"] or "", "source_level": levels[c["title"]],
                   "kind": link.kind, "target_level": link.target_level,
                   "target_title": target[0] if target else (link.target_law or ""), "target_article": link.article or "",
                   "paragraph": link.paragraph or 0, "item": link.item or 0, "resolved": target is not None}
            key = tuple(row[k] for k in LINK_COLUMNS)
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return levels, rows


def validate_links(rows: list[dict], where: str) -> None:
    """Every row has LINK_COLUMNS with known levels and kinds; the error names the row."""
    for n, row in enumerate(rows, start=1):
        missing = [k for k in LINK_COLUMNS if k not in row]
        if missing:
            raise ValueError(f"{where}: row {n} lacks {missing}; expected {list(LINK_COLUMNS)}")
        for col in ("source_level", "target_level"):
            if row[col] not in (*LEVELS, OTHER):
                raise ValueError(f"{where}: row {n}: {col} {row[col]!r} is not one of {(*LEVELS, OTHER)}")
        if row["kind"] not in ("cite", "delegates"):
            raise ValueError(f"{where}: row {n}: kind {row['kind']!r} is not cite or delegates")
