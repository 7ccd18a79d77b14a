"""Chunking: statute-aware (편/장/절/조, 항/호 kept together when they fit, 부칙 and
future-effective duplicates handled), markdown-heading-aware, and a recursive splitter with
Korean-aware separators as the fallback. Every chunk's ``text`` starts with its path
(law › 장 › 제N조(title)) so both retrievers see where it comes from.

Lengths are measured by a ``LengthFn`` (tokens of a named tokenizer, or characters), so
``chunk_size`` / ``chunk_overlap`` are tunable in the unit the embedder cares about.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import re
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional, Sequence

log = logging.getLogger(__name__)

LengthFn = Callable[[str], int]
PATH_SEP = " › "


# ----------------------------------------------------------------------------- length functions
def char_length(text: str) -> int:
    return len(text)


@functools.lru_cache(maxsize=8)
def load_fast_tokenizer(name_or_path: str):
    """A `tokenizers.Tokenizer` for a local folder/file or hub id. Reading tokenizer.json
    directly is ~10x faster than AutoTokenizer for large unigram vocabularies."""
    from pathlib import Path

    from tokenizers import Tokenizer

    path = Path(name_or_path)
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if (path / "tokenizer.json").exists():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if getattr(tok, "backend_tokenizer", None) is None:
        raise ValueError(f"{name_or_path}: a fast (tokenizers) tokenizer is needed to measure chunk lengths")
    return tok.backend_tokenizer


class TokenLength:
    """Number of tokens of a named tokenizer, memoised (the chunker measures the same pieces
    repeatedly while packing); `warm` measures many texts in one parallel batch call."""

    def __init__(self, tokenizer: str):
        self.tokenizer_name = tokenizer
        self.tok = load_fast_tokenizer(tokenizer)  # shared instance: never mutate its settings
        self.memo: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self.memo.get(text)
        if n is None:
            n = self.memo[text] = len(self.tok.encode(text, add_special_tokens=False).ids)
        return n

    def warm(self, texts: Sequence[str]) -> None:
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        for text, enc in zip(todo, self.tok.encode_batch(todo, add_special_tokens=False), strict=False):
            self.memo[text] = len(enc.ids)


def make_length_fn(unit: str, tokenizer: Optional[str] = None) -> LengthFn:
    """'chars' -> len; 'tokens' -> TokenLength of the named tokenizer (hub id or path)."""
    if unit == "chars":
        return char_length
    if unit != "tokens":
        raise ValueError(f"length unit must be 'tokens' or 'chars', got {unit!r}")
    if not tokenizer:
        raise ValueError("length unit 'tokens' needs a tokenizer (hub id or local path)")
    return TokenLength(tokenizer)


def warm(length: LengthFn, texts: Sequence[str]) -> None:
    if hasattr(length, "warm"):
        length.warm(texts)


# ----------------------------------------------------------------------------- data model
@dataclass
class Chunk:
    chunk_id: str
    doc_id: str
    source: str
    title: str
    path: str
    article: str
    text: str
    n_tokens: int
    n_chars: int
    start_char: int
    page: int

    def to_row(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- recursive splitter
KOREAN_SEPARATORS = ("\n\n", "\n", "다. ", ". ", "? ", "! ", "; ", ", ", " ", "")


def recursive_split(text: str, size: int, overlap: int, length: LengthFn,
                    separators: tuple[str, ...] = KOREAN_SEPARATORS) -> list[str]:
    """Split text into pieces of at most `size` (by `length`), preferring the earliest
    separator in `separators`; consecutive pieces share about `overlap` units."""
    text = text.strip()
    if not text:
        return []
    if length(text) <= size:
        return [text]
    sep = next((s for s in separators if s and s in text), "")
    if sep:
        parts = [p + (sep if i < len(text.split(sep)) - 1 else "") for i, p in enumerate(text.split(sep))]
        parts = [p for p in parts if p.strip()]
    else:  # no separator left: cut by characters, proportional to the unit
        ratio = max(1, int(len(text) * size / max(1, length(text))))
        parts = [text[i:i + ratio] for i in range(0, len(text), ratio)]
    rest = separators[separators.index(sep) + 1:] if sep in separators else ("",)
    pieces: list[str] = []
    for part in parts:
        if length(part) > size:
            pieces.extend(recursive_split(part, size, overlap, length, rest))
        else:
            pieces.append(part)
    return merge_pieces(pieces, size, overlap, length)


def merge_pieces(pieces: list[str], size: int, overlap: int, length: LengthFn, joiner: str = "") -> list[str]:
    """Greedy packing of consecutive pieces into chunks <= size, carrying an overlap tail."""
    out: list[str] = []
    cur: list[str] = []
    cur_len = 0
    for piece in pieces:
        plen = length(piece)
        if cur and cur_len + plen > size:
            out.append(joiner.join(cur).strip())
            tail: list[str] = []
            tail_len = 0
            for prev in reversed(cur):
                plen_prev = length(prev)
                if tail_len + plen_prev > overlap:
                    break
                tail.insert(0, prev)
                tail_len += plen_prev
            cur, cur_len = tail, tail_len
        cur.append(piece)
        cur_len += plen
    if cur:
        out.append(joiner.join(cur).strip())
    return [c for c in out if c]


# ----------------------------------------------------------------------------- statutes
ARTICLE_RE = re.compile(r"^제(\d+)조(?:의(\d+))?\s*(?:\(([^)]*)\)|(?=\s*삭제))")
DIVISION_RE = re.compile(r"^제\d+(?:편|장|절|관)(?:의\d+)?\s+\S")
ADDENDA_RE = re.compile(r"^부\s*칙(?:\s|<|$)")
EFFECTIVE_RE = re.compile(r"\[시행일\s*:?\s*([^\]]*)\]")
PARAGRAPH_RE = re.compile(r"^[\u2460-\u2473]")  # ① .. ⑳
ITEM_RE = re.compile(r"^\d+(?:의\d+)?\.\s")
SUBITEM_RE = re.compile(r"^[가-하]\.\s")
AMENDMENT_NOTE_RE = re.compile(
    r"\s*(?:<(?:개정|신설|전문개정|타법개정|본조신설|제목개정|종전)[^<>]*>|"
    r"\[(?:전문개정|본조신설|제목개정|종전|[^\]]*에서 이동|한정위헌|단순위헌|헌법불합치)[^\]]*\])")
MIN_ARTICLES_FOR_STATUTE = 3


def looks_like_statute(text: str) -> bool:
    return sum(1 for _ in re.finditer(r"^제\d+조(?:의\d+)?\s*\(", text, flags=re.M)) >= MIN_ARTICLES_FOR_STATUTE


def strip_amendment_notes(text: str) -> str:
    """Remove amendment annotations ('<개정 2020. 2. 4.>', '[본조신설 ...]'): dates, not content."""
    return AMENDMENT_NOTE_RE.sub("", text)


@dataclass
class Article:
    number: str  # "제14조" / "제21조의3"
    title: str
    lines: list[str]
    start_char: int
    divisions: list[str]  # current 편/장/절 headings
    part: str  # "" for the main body, "부칙 <...>" for addenda
    variant: str = ""  # e.g. "시행일: 2025. 10. 2." for a future-effective duplicate

    @property
    def heading(self) -> str:
        return f"{self.number}({self.title})" if self.title else self.number


def _article_key(m: re.Match) -> tuple[int, int]:
    return int(m.group(1)), int(m.group(2) or 0)


def parse_statute(text: str) -> tuple[list[str], list[Article]]:
    """Split statute text into (preamble lines, articles). An article line must not go backwards
    in numbering within a part (a wrapped cross-reference such as '제3조(...)' at a line start
    is continuation text); 부칙 restarts numbering."""
    preamble: list[str] = []
    articles: list[Article] = []
    divisions: list[str] = []
    part = ""
    last_key = (0, 0)
    pos = 0
    for line in text.split("\n"):
        start, pos = pos, pos + len(line) + 1
        s = line.strip()
        if not s:
            continue
        if ADDENDA_RE.match(s):
            part, divisions, last_key = re.sub(r"\s+", " ", s), [], (0, 0)
            continue
        if DIVISION_RE.match(s) and len(s) < 60 and not part:
            level = s.split()[0][-1] if not s.split()[0].endswith(")") else "장"
            m = re.match(r"^제\d+(편|장|절|관)", s)
            level = m.group(1) if m else level
            order = "편장절관"
            divisions = [d for d in divisions if order.index(re.match(r"^제\d+(편|장|절|관)", d).group(1)) < order.index(level)]
            divisions.append(s)
            continue
        m = ARTICLE_RE.match(s)
        if m and (_article_key(m) >= last_key or not articles):
            key = _article_key(m)
            number = f"제{m.group(1)}조" + (f"의{m.group(2)}" if m.group(2) else "")
            variant = ""
            if articles and key == last_key and articles[-1].part == part:
                variant = "다른 시행본"
            articles.append(Article(number, (m.group(3) or "").strip(), [s], start, list(divisions), part, variant))
            last_key = key
            continue
        if articles:
            articles[-1].lines.append(s)
        else:
            preamble.append(s)
    for art in articles:  # a '[시행일: ...] 제N조' trailer marks the future-effective version
        eff = next((EFFECTIVE_RE.search(ln) for ln in art.lines if EFFECTIVE_RE.search(ln)), None)
        if eff and art.number in eff.group(0) + "".join(art.lines[-1:]):
            art.variant = f"시행일: {eff.group(1).strip()}"
    return preamble, articles


def split_units(lines: list[str], pattern: re.Pattern) -> list[list[str]]:
    """Group lines into units that start at lines matching `pattern` (the first unit is the lead)."""
    units: list[list[str]] = [[]]
    for ln in lines:
        if pattern.match(ln) and units[-1]:
            units.append([ln])
        else:
            units[-1].append(ln)
    return [u for u in units if u]


def lines_length(lines: list[str], length: LengthFn) -> int:
    """Length of lines joined by newlines, as the sum of per-line lengths (exact for
    characters up to the newlines; for SentencePiece tokens each line starts a word anyway)."""
    return sum(length(ln) for ln in lines) + (len(lines) - 1 if length is char_length else 0)


def pack_article(lines: list[str], size: int, overlap: int, length: LengthFn) -> list[str]:
    """Keep an article whole when it fits; otherwise split at 항, then 호, then 목 boundaries,
    packing consecutive units; the recursive splitter handles any unit still too long.
    When items (호/목) are split apart, each later piece repeats the clause that introduces
    them ('② 다음 각 호의 … 과태료를 부과한다'), so a piece never loses what its list is about."""
    if lines_length(lines, length) <= size:
        return ["\n".join(lines)]
    for pattern in (PARAGRAPH_RE, ITEM_RE, SUBITEM_RE):
        units = split_units(lines, pattern)
        if len(units) <= 1:
            continue
        lead = units[0] if not pattern.match(units[0][0]) else []
        carry = lead if pattern is not PARAGRAPH_RE and lines_length(lead, length) <= size // 3 else []
        budget = size - lines_length(carry, length)
        groups: list[list[str]] = []  # each group: lines of one packed chunk
        cur: list[str] = []
        for unit in units:
            if lines_length(unit, length) > budget:
                if cur:
                    groups.append(cur)
                    cur = []
                groups.extend(piece.split("\n") for piece in pack_article(unit, budget, overlap, length))
            elif cur and lines_length(cur + unit, length) > budget:
                groups.append(cur)
                cur = list(unit)
            else:
                cur = cur + unit
        if cur:
            groups.append(cur)
        return ["\n".join((carry if i > 0 and carry else []) + g) for i, g in enumerate(groups)]
    return recursive_split("\n".join(lines), size, overlap, length)


def addendum_part(path: str) -> str:
    """The 부칙 part a statute chunk's path names ('부칙 <...>'), "" for the main body."""
    parts = path.split(PATH_SEP)
    return parts[1] if len(parts) > 1 and ADDENDA_RE.match(parts[1]) else ""


def statute_sections(title: str, text: str, size: int, overlap: int, length: LengthFn,
                     strip_notes: bool = True) -> Iterable[tuple[str, str, str, int]]:
    """Yield (path, article, body, start_char) for each statute chunk."""
    if strip_notes:
        text = "\n".join(strip_amendment_notes(ln) for ln in text.split("\n"))
    preamble, articles = parse_statute(text)
    if preamble:
        for body in recursive_split("\n".join(preamble), size, overlap, length):
            yield title, "", body, 0
    for art in articles:
        parts = [title] + ([art.part] if art.part else art.divisions) + [art.heading]
        if art.variant:
            parts[-1] += f" [{art.variant}]"
        path = PATH_SEP.join(parts)
        for body in pack_article(art.lines, size, overlap, length):
            yield path, art.number, body, art.start_char


# ----------------------------------------------------------------------------- markdown / headings
HEADING_RE = re.compile(r"^(#{1,6})\s+(.+)$")


def heading_sections(title: str, text: str, size: int, overlap: int, length: LengthFn) -> Iterable[tuple[str, str, str, int]]:
    """Split at markdown headings; the heading trail becomes the path."""
    trail: list[tuple[int, str]] = []
    buf: list[str] = []
    start = pos = 0

    def flush():
        body = "\n".join(buf).strip()
        if body:
            path = PATH_SEP.join([title] + [h for _, h in trail])
            for piece in recursive_split(body, size, overlap, length):
                yield path, "", piece, start

    for line in text.split("\n"):
        m = HEADING_RE.match(line.strip())
        if m:
            yield from flush()
            buf, start = [], pos
            level = len(m.group(1))
            trail = [(lv, h) for lv, h in trail if lv < level] + [(level, m.group(2).strip())]
        else:
            buf.append(line)
        pos += len(line) + 1
    yield from flush()


def has_headings(text: str) -> bool:
    return bool(re.search(r"^#{1,6}\s+\S", text, flags=re.M))


# ----------------------------------------------------------------------------- documents -> chunks
def chunk_document(doc, size: int, overlap: int, length: LengthFn, statute_mode: str = "auto") -> list[Chunk]:
    """One document -> chunks (path-prefixed text, ids stable across rebuilds)."""
    statute = statute_mode == "always" or (statute_mode == "auto" and looks_like_statute(doc.text))
    if statute:
        sections = statute_sections(doc.title, doc.text, size, overlap, length)
    elif has_headings(doc.text):
        sections = heading_sections(doc.title, doc.text, size, overlap, length)
    else:
        sections = ((doc.title, "", body, 0) for body in recursive_split(doc.text, size, overlap, length))
    chunks = []
    warm(length, doc.text.split("\n"))
    for path, article, body, start in sections:
        text = f"{path}\n{body.strip()}"
        digest = hashlib.sha1(f"{doc.doc_id}\x00{text}".encode("utf-8")).hexdigest()[:16]
        chunks.append(Chunk(
            chunk_id=digest, doc_id=doc.doc_id, source=doc.source, title=doc.title, path=path,
            article=article, text=text, n_tokens=0, n_chars=len(text),
            start_char=start, page=page_of(doc.pages, start)))
    return chunks


def dense_text(text: str) -> str:
    """What the embedder reads for a chunk: the document title and the last path element
    (e.g. the article heading) instead of the full path, and no repeat of a heading the body
    already starts with. About a sixth fewer tokens per statute chunk than the full text;
    BM25 still indexes the full path (chapter names are useful terms there)."""
    path, sep, body = text.partition("\n")
    if not sep:
        return text
    parts = path.split(PATH_SEP)
    head = parts[0]
    if len(parts) > 1:
        last = parts[-1]
        article = re.match(r"제\d+조(?:의\d+)?", last)
        if not (article and body.startswith(article.group(0))) and last != head:
            head = f"{head} {last}"
    return f"{head}\n{body}"


def page_of(pages: list, char: int) -> int:
    for page, a, b in pages:
        if a <= char <= b:
            return int(page)
    return 0


def chunk_documents(docs, size: int, overlap: int, length: LengthFn, statute_mode: str = "auto",
                    progress: bool = True, max_chunks_per_doc: Optional[int] = None,
                    oversized: Optional[list] = None) -> tuple[list[Chunk], int]:
    """All documents -> deduplicated chunks; returns (chunks, number of duplicates dropped).

    Each document is chunked once. One that makes more than `max_chunks_per_doc` chunks (counted
    before deduplication, so the verdict depends on the document alone, not on the others or their
    order) is left out whole: its chunks take no part in deduplication, and ``(doc, n_chunks)`` is
    appended to `oversized`. The other documents' chunks are exactly what they would be without it."""
    from tqdm.auto import tqdm

    seen: set[str] = set()
    out: list[Chunk] = []
    dropped = 0
    for doc in tqdm(docs, desc="chunk", unit="doc", disable=not progress):
        chunks = chunk_document(doc, size, overlap, length, statute_mode)
        if max_chunks_per_doc is not None and len(chunks) > max_chunks_per_doc:
            if oversized is not None:
                oversized.append((doc, len(chunks)))
            continue
        for ch in chunks:
            key = re.sub(r"\s+", "", ch.text.split("\n", 1)[-1])
            if key in seen:
                dropped += 1
                continue
            seen.add(key)
            out.append(ch)
    warm(length, [c.text for c in out])
    for ch in out:
        ch.n_tokens = length(ch.text)
    return out, dropped
