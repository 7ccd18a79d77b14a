"""Readers: one function per file type, registered by extension. Each returns
``RawText(text, title, pages)`` or raises ``SkipFile(reason, detail)``."""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)


class SkipFile(Exception):
    """A file that cannot be used; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class RawText:
    text: str
    title: str = ""
    pages: list[tuple[int, int, int]] = field(default_factory=list)  # (page_no, start, end) char spans


READERS: dict[str, Callable[[Path, dict], RawText]] = {}


def reader(*exts: str):
    def register(fn):
        for ext in exts:
            READERS[ext] = fn
        return fn
    return register


# ----------------------------------------------------------------------------- bytes -> str
_ENCODINGS = ("utf-8", "cp949")  # cp949 is a superset of euc-kr


def looks_binary(data: bytes) -> bool:
    """NUL bytes or many control characters in the first 8 KiB mean 'not text'."""
    head = data[:8192]
    if b"\x00" in head:
        return True
    ctrl = sum(1 for b in head if b < 9 or 13 < b < 32)
    return len(head) > 0 and ctrl / len(head) > 0.05


def decode_bytes(data: bytes) -> tuple[str, str]:
    """Detect the encoding (BOM, utf-8, cp949/euc-kr, then charset-normalizer) -> (text, encoding)."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace"), "utf-8-sig"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16"), "utf-16"
    for enc in _ENCODINGS:
        try:
            return data.decode(enc), enc
        except UnicodeDecodeError:
            continue
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        raise SkipFile("decode_error", "no text encoding fits (tried utf-8, cp949, charset detection)")
    return str(best), best.encoding


def read_text_file(path: Path, opts: dict) -> str:
    size = path.stat().st_size
    if size == 0:
        raise SkipFile("empty", "0 bytes")
    if size > opts["max_file_bytes"]:
        raise SkipFile("too_large", f"{size / 2**20:.1f} MiB > {opts['max_file_bytes'] / 2**20:.1f} MiB")
    data = path.read_bytes()
    if looks_binary(data):
        raise SkipFile("binary", "NUL or control bytes in a text file")
    text, enc = decode_bytes(data)
    if enc not in ("utf-8", "utf-8-sig"):
        log.info("%s: decoded as %s", path, enc)
    return text


# ----------------------------------------------------------------------------- PDF
_DIGITS = re.compile(r"\d+")
_HEADER_LINES = 3  # candidate running-header lines at the top/bottom of each page


def _line_key(line: str) -> str:
    return _DIGITS.sub("#", re.sub(r"\s+", " ", line).strip())


def strip_running_lines(pages: list[list[str]], min_share: float = 0.5) -> list[list[str]]:
    """Drop page headers/footers: lines among the first/last few of a page whose
    digit-normalised form recurs there on at least `min_share` of the pages
    (e.g. '법제처 12 국가법령정보센터' and the running law name)."""
    if len(pages) < 2:
        return pages
    counts: Counter = Counter()
    for lines in pages:
        edge = [ln for ln in lines if ln.strip()]
        counts.update({_line_key(ln) for ln in edge[:_HEADER_LINES] + edge[-_HEADER_LINES:]})
    running = {k for k, c in counts.items() if c >= max(2, min_share * len(pages)) and k}
    out = []
    for lines in pages:
        lines = list(lines)
        while lines and (not lines[0].strip() or _line_key(lines[0]) in running):
            lines.pop(0)
        while lines and (not lines[-1].strip() or _line_key(lines[-1]) in running):
            lines.pop()
        out.append(lines)
    return out


# a line that starts one of these begins a new unit even after a full-width line
_BLOCK_START = re.compile(
    r"^\s*(제\d+(조|장|절|관|편)(의\d+)?|[\u2460-\u2473]|\d+(의\d+)?\.|[가-하]\.|부\s*칙|\[|<|※|[-•·□○■▶◦]|#)")
_HANGUL = re.compile(r"[가-힣]")


def reflow(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join PDF lines that were wrapped at the page width. A line continues the previous one
    unless it starts a structural unit or the previous line was short (ended a paragraph).
    Hangul-Hangul joins take no space: law.go.kr wraps inside words ('전' + '자금융')."""
    lengths = sorted(len(t) for _, t in lines if t.strip())
    if not lengths:
        return []
    full = 0.8 * lengths[int(0.9 * (len(lengths) - 1))]
    out: list[tuple[int, str]] = []
    prev_full = False
    for page, text in lines:
        text = text.strip()
        if not text:
            prev_full = False
            out.append((page, ""))
            continue
        if out and prev_full and out[-1][1] and not _BLOCK_START.match(text):
            prev = out[-1][1]
            a, b = prev[-1], text[0]
            tight = (_HANGUL.match(a) and (_HANGUL.match(b) or b.isdigit())) or (a.isdigit() and _HANGUL.match(b))
            glue = "" if tight else " "
            out[-1] = (out[-1][0], prev + glue + text)
        else:
            out.append((page, text))
        prev_full = len(text) >= full
    return out


@reader(".pdf")
def read_pdf(path: Path, opts: dict) -> RawText:
    import pymupdf

    size = path.stat().st_size
    if size == 0:
        raise SkipFile("empty", "0 bytes")
    if opts.get("max_pdf_bytes") and size > opts["max_pdf_bytes"]:
        raise SkipFile("too_large", f"{size / 2**20:.1f} MiB > {opts['max_pdf_bytes'] / 2**20:.1f} MiB (max_pdf_mb)")
    with path.open("rb"):  # no permission -> PermissionError ('unreadable'); PyMuPDF would call it a damaged file
        pass
    try:
        doc = pymupdf.open(path)
    except Exception as exc:  # PyMuPDF raises several types for damaged files
        raise SkipFile("corrupt_pdf", str(exc)[:200]) from None
    with doc:
        if doc.needs_pass:
            raise SkipFile("encrypted", "password-protected PDF")
        max_pages, max_chars = opts.get("max_pages"), opts.get("max_chars")
        if max_pages and doc.page_count > max_pages:
            raise SkipFile("too_many_pages", f"{doc.page_count} pages > max_pages_per_file={max_pages}")
        pages, n_chars = [], 0
        for no in range(doc.page_count):
            try:
                text = doc[no].get_text("text")
            except Exception as exc:
                raise SkipFile("corrupt_pdf", str(exc)[:200]) from None
            n_chars += len(text)
            if max_chars and n_chars > max_chars:  # stop reading: the whole file is skipped anyway
                raise SkipFile("too_many_chars", f"over {max_chars} characters by page {no + 1} of {doc.page_count} "
                                                 f"(max_chars_per_file)")
            pages.append(text.split("\n"))
        title = (doc.metadata or {}).get("title") or ""
    pages = strip_running_lines(pages)
    lines = reflow([(no, ln) for no, page in enumerate(pages, start=1) for ln in page])
    texts, spans, pos = [], [], 0
    for page, line in lines:
        if spans and spans[-1][0] == page:
            spans[-1] = (page, spans[-1][1], pos + len(line))
        else:
            spans.append((page, pos, pos + len(line)))
        texts.append(line)
        pos += len(line) + 1
    text = "\n".join(texts)
    if not text.strip():
        raise SkipFile("no_text", "PDF has no extractable text (scanned image?)")
    return RawText(text=text, title=title.strip(), pages=spans)


# ----------------------------------------------------------------------------- HTML
_DROP_TAGS = ("script", "style", "nav", "noscript", "header", "footer", "aside", "form", "iframe", "svg")


@reader(".html", ".htm")
def read_html(path: Path, opts: dict) -> RawText:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(read_text_file(path, opts), "lxml")
    for tag in soup.find_all(_DROP_TAGS):
        tag.decompose()
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    # headings become markdown headings so the heading-aware chunker can use them
    for level in range(1, 7):
        for h in soup.find_all(f"h{level}"):
            h.replace_with(f"\n\n{'#' * level} {h.get_text(' ', strip=True)}\n\n")
    for li in soup.find_all("li"):
        li.insert_before("\n- ")
    for row in soup.find_all("tr"):
        cells = [c.get_text(" ", strip=True) for c in row.find_all(["td", "th"])]
        row.replace_with("\n" + " | ".join(cells) + "\n")
    body = soup.body or soup
    text = body.get_text("\n")
    text = re.sub(r"\n\s*\n+", "\n\n", text)
    if not text.strip():
        raise SkipFile("no_text", "HTML without visible text")
    return RawText(text=text, title=title)


# ----------------------------------------------------------------------------- TXT / MD
@reader(".txt", ".md", ".markdown")
def read_plain(path: Path, opts: dict) -> RawText:
    text = read_text_file(path, opts)
    if not text.strip():
        raise SkipFile("empty", "only whitespace")
    title = ""
    m = re.search(r"^#\s+(.+)$", text, flags=re.M)
    if m and path.suffix != ".txt":
        title = m.group(1).strip()
    return RawText(text=text, title=title)


# ----------------------------------------------------------------------------- structured -> prose
class Budget:
    """What a structured reader may still produce from one file: rendered characters (`max_chars`)
    and record sections (`max_records`; each section becomes at least one chunk). Checked while
    rendering, so a small file that expands (10,000 tiny records, long key paths repeated on every
    line) is rejected before its text and chunks exist in memory."""

    def __init__(self, opts: dict):
        self.max_chars, self.max_records = opts.get("max_chars"), opts.get("max_records")
        self.chars = self.records = 0

    def line(self, text: str) -> str:
        self.chars += len(text) + 1
        if self.max_chars and self.chars > self.max_chars:
            raise SkipFile("too_many_chars", f"rendered text over {self.max_chars} characters (max_chars_per_file)")
        return text

    def record(self, n_records: int) -> None:
        self.records += 1
        if self.max_records and self.records > self.max_records:
            raise SkipFile("too_many_chunks", f"{n_records} records, each its own chunk > max_chunks_per_file="
                                              f"{self.max_records}")


def render_record(record, prefix: str = "", budget: Optional[Budget] = None) -> list[str]:
    """Render a JSON-like record as readable 'field: value' lines (nested keys joined with ' > ')."""
    budget = budget or Budget({})
    lines: list[str] = []
    if isinstance(record, dict):
        for key, value in record.items():
            label = f"{prefix} > {key}" if prefix else str(key)
            if isinstance(value, (dict, list)):
                lines.extend(render_record(value, label, budget))
            elif value is not None and str(value).strip():
                lines.append(budget.line(f"{label}: {str(value).strip()}"))
    elif isinstance(record, list):
        if all(not isinstance(v, (dict, list)) for v in record):
            vals = [str(v).strip() for v in record if v is not None and str(v).strip()]
            if vals:
                lines.append(budget.line(f"{prefix}: {', '.join(vals)}" if prefix else ", ".join(vals)))
        else:
            for value in record:
                lines.extend(render_record(value, prefix, budget))
    elif record is not None and str(record).strip():
        lines.append(budget.line(f"{prefix}: {record}" if prefix else str(record)))
    return lines


def _title_of(record) -> str:
    if isinstance(record, dict):
        for key in ("title", "제목", "name", "이름", "용어", "term", "subject"):
            if key in record and isinstance(record[key], str):
                return record[key].strip()
    return ""


def render_records(records: list, heading: str, budget: Optional[Budget] = None) -> str:
    """Records -> markdown sections (one per record) so each becomes its own chunk. A list of plain
    values (numbers, strings) is one block of lines instead: a section per value made a chunk per
    value (a 59 KB array of 10,000 numbers became 10,000 chunks)."""
    budget = budget or Budget({})
    if all(not isinstance(rec, (dict, list)) for rec in records):
        return "\n".join(budget.line(str(rec).strip()) for rec in records if rec is not None and str(rec).strip())
    parts = []
    for i, rec in enumerate(records, start=1):
        name = _title_of(rec) or f"{heading} {i}"
        body = "\n".join(render_record(rec, budget=budget))
        if body:
            budget.record(len(records))
            parts.append(budget.line(f"## {name}") + "\n" + body)
    return "\n\n".join(parts)


@reader(".json")
def read_json(path: Path, opts: dict) -> RawText:
    try:
        data = json.loads(read_text_file(path, opts))
    except json.JSONDecodeError as exc:
        raise SkipFile("parse_error", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    title = ""
    budget = Budget(opts)
    if isinstance(data, dict):
        title = _title_of(data)
        lists = [v for v in data.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        records = lists[0] if len(lists) == 1 else [data]
        if len(lists) == 1:
            meta = {k: v for k, v in data.items() if not isinstance(v, list)}
            head = "\n".join(render_record(meta, budget=budget))
            text = (head + "\n\n" if head else "") + render_records(records, path.stem, budget)
        else:
            text = render_records(records, path.stem, budget)
    elif isinstance(data, list):
        text = render_records(data, path.stem, budget)
    else:
        text = str(data)
    if not text.strip():
        raise SkipFile("no_text", "JSON without text values")
    return RawText(text=text, title=title)


@reader(".jsonl")
def read_jsonl(path: Path, opts: dict) -> RawText:
    records, bad = [], []
    for lineno, line in enumerate(read_text_file(path, opts).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            bad.append(f"line {lineno}: {exc.msg}")
    if bad:
        log.warning("%s: skipped %d malformed JSONL line(s): %s", path, len(bad), "; ".join(bad[:5]))
    if not records:
        raise SkipFile("parse_error", "no valid JSON line" + (f" ({bad[0]})" if bad else ""))
    text = render_records(records, path.stem, Budget(opts))
    if not text.strip():
        raise SkipFile("no_text", "JSONL without text values")
    return RawText(text=text)


def _xml_to_obj(elem):
    children = list(elem)
    text = (elem.text or "").strip()
    if not children:
        return text
    obj: dict = {}
    for key, value in elem.attrib.items():
        obj[key] = value
    for child in children:
        tag = child.tag if isinstance(child.tag, str) else "node"
        tag = tag.split("}")[-1]
        value = _xml_to_obj(child)
        if tag in obj:
            if not isinstance(obj[tag], list):
                obj[tag] = [obj[tag]]
            obj[tag].append(value)
        else:
            obj[tag] = value
    if text:
        obj["text"] = text
    return obj


@reader(".xml")
def read_xml(path: Path, opts: dict) -> RawText:
    from lxml import etree

    raw = read_text_file(path, opts)
    try:
        root = etree.fromstring(raw.encode("utf-8"), parser=etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError as exc:
        raise SkipFile("parse_error", f"invalid XML: {exc}") from None
    children = [c for c in root if isinstance(c.tag, str)]
    tags = Counter(c.tag for c in children)
    title = ""
    budget = Budget(opts)
    if children and tags.most_common(1)[0][1] > 1:  # repeated child elements are records
        rec_tag = tags.most_common(1)[0][0]
        records = [_xml_to_obj(c) for c in children if c.tag == rec_tag]
        meta = {c.tag: _xml_to_obj(c) for c in children if c.tag != rec_tag}
        title = meta.get("title", "") if isinstance(meta.get("title"), str) else ""
        head = "\n".join(render_record(meta, budget=budget))
        text = (head + "\n\n" if head else "") + render_records(records, rec_tag, budget)
    else:
        obj = _xml_to_obj(root)
        title = _title_of(obj)
        text = "\n".join(render_record(obj, budget=budget))
    if not text.strip():
        raise SkipFile("no_text", "XML without text")
    return RawText(text=text, title=title)
