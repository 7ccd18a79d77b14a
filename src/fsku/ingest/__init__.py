"""Ingest: a corpus folder -> cleaned ``Document`` records with metadata, plus a list of
skipped files with reasons. The build continues past bad files; a corpus with no usable
document raises ``NoUsableDocuments``.

    from fsku.ingest import ingest_corpus
    docs, skipped = ingest_corpus("data/sample_corpus")

Every file under the corpus that does not become a document is listed in `skipped` with one of
``SKIP_REASONS`` (a hidden folder is one entry, not one per file inside it); only the manifest
files are left out, as metadata. The walk never follows a link out of the corpus: a symlink is
read only when its resolved target lies inside the corpus root (a link to a file that is also
read is then a ``duplicate``), and special files (FIFOs, sockets, devices) are never opened.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import os
import stat
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from tqdm.auto import tqdm

from .clean import clean_text
from .readers import READERS, SkipFile

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("manifest.csv", "manifest.json", "manifest.yaml", "manifest.yml")
SKIP_REASONS = {
    "hidden": "name starts with '.' (a hidden folder is listed once and not walked)",
    "symlink_outside_corpus": "symlink whose resolved target lies outside the corpus root",
    "symlink_loop": "symlink that loops (a -> b -> a) or points at a folder that contains it",
    "dangling_symlink": "symlink whose target does not exist",
    "not_regular_file": "FIFO, socket or device (never opened: reading a FIFO blocks)",
    "unreadable": "no permission to list or read (or another OS error while reading it)",
    "unsupported_extension": "no reader for the extension",
    "empty": "0 bytes or only whitespace",
    "too_large": "file larger than max_file_mb (PDF: max_pdf_mb)",
    "too_many_pages": "PDF with more than max_pages_per_file pages",
    "too_many_chars": "extracted text longer than max_chars_per_file",
    "too_many_chunks": "more than max_chunks_per_file chunks (or JSON/JSONL/XML records)",
    "binary": "NUL or control bytes in a text file",
    "decode_error": "no text encoding fits",
    "parse_error": "invalid JSON/JSONL/XML",
    "corrupt_pdf": "PDF that PyMuPDF cannot read",
    "encrypted": "password-protected PDF",
    "no_text": "nothing left after extraction or cleaning",
    "duplicate": "same bytes as a file read earlier (or a folder already walked through a link)",
    "reader_error": "unexpected reader failure",
}
# BuildKBConfig fields that bound what one file may cost (help, defaults and checks live there)
LIMIT_FIELDS = ("max_file_mb", "max_pdf_mb", "max_pages_per_file", "max_chars_per_file", "max_chunks_per_file")


class NoUsableDocuments(RuntimeError):
    pass


@dataclass
class Document:
    doc_id: str
    source: str
    title: str
    doc_type: str
    sha256: str
    text: str
    pages: list = field(default_factory=list)  # [page_no, start_char, end_char]
    license: str = ""
    provenance: str = ""

    @property
    def n_chars(self) -> int:
        return len(self.text)

    def to_row(self) -> dict:
        row = asdict(self)
        row["pages"] = json.dumps(self.pages)
        row["n_chars"] = self.n_chars
        return row


@dataclass
class SkippedFile:
    source: str
    reason: str
    detail: str = ""


def load_manifest(path: Path) -> dict[str, dict]:
    """Manifest rows keyed by relative file path. Columns: file (required), title, license, provenance."""
    if path.suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as fh:
            rows = list(csv.DictReader(fh))
    elif path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
    else:
        import yaml

        rows = yaml.safe_load(path.read_text(encoding="utf-8"))
    if isinstance(rows, dict):
        rows = rows.get("documents", rows.get("files", []))
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of rows with a 'file' field")
    out = {}
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("file"):
            raise ValueError(f"{path}: row {i} has no 'file' field (expected file, title, license, provenance)")
        out[str(row["file"]).strip()] = row
    return out


def find_manifest(corpus: Path) -> Optional[Path]:
    for name in MANIFEST_NAMES:
        if (corpus / name).exists():
            return corpus / name
    return None


def _inside(real: str, root: str) -> bool:
    """`real` is `root` or under it; both already realpath'd (a string test: the walk calls it per entry,
    where fsku.outputs' samefile checks would stat every ancestor)."""
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _special_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return f"special file (mode {oct(mode)})"


def iter_corpus_files(corpus: Path, skipped: Optional[list] = None) -> Iterator[Path]:
    """Regular files under `corpus` (names sorted at every level, so the order is deterministic),
    manifest files excluded. What is not yielded is appended to `skipped` as a SkippedFile.
    Symlinks are not followed blindly: one resolving outside the corpus root, a loop, a dangling
    link and special files are skipped with their reason; links inside the root are taken after
    the plain files, so a link to a file that is read anyway is reported as its duplicate."""
    def skip(path, reason: str, detail: str = "") -> None:
        log.warning("skipped %s: %s %s", path, reason, detail)
        if skipped is not None:
            skipped.append(SkippedFile(str(path), reason, detail))

    def listing(folder: Path) -> Iterator[os.DirEntry]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skip(folder, "unreadable", f"cannot list folder: {exc.strerror or exc}")
            entries = []
        return iter(entries)

    root = os.path.realpath(corpus)
    walked = {root: str(corpus)}  # real folder -> the corpus path it was walked as
    # folders being walked: (corpus path, real path, remaining entries); links wait in `links`
    stack = [(Path(corpus), root, listing(Path(corpus)))]
    links: list[tuple[Path, str]] = []  # (link path, real path of the folder holding it)
    while stack or links:
        if not stack:
            path, parent_real = links.pop(0)
            real = os.path.realpath(path)
            try:
                st = os.stat(path)  # follows the link: the target's type
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    skip(path, "symlink_loop", f"-> {os.readlink(path)}")
                elif exc.errno == errno.ENOENT:
                    skip(path, "dangling_symlink", f"-> {os.readlink(path)} (missing)")
                else:
                    skip(path, "unreadable", exc.strerror or str(exc))
                continue
            if not _inside(real, root):
                skip(path, "symlink_outside_corpus", f"-> {real}")
            elif any(part.startswith(".") for part in Path(os.path.relpath(real, root)).parts):
                skip(path, "hidden", f"link into a hidden path -> {real}")
            elif stat.S_ISREG(st.st_mode):
                yield path
            elif not stat.S_ISDIR(st.st_mode):
                skip(path, "not_regular_file", f"link to a {_special_kind(st.st_mode)}")
            elif _inside(parent_real, real):  # the target holds the link: walking it would never end
                skip(path, "symlink_loop", f"-> {real}, a folder that contains the link")
            elif real in walked:
                skip(path, "duplicate", f"link to a folder already walked as {walked[real]}")
            else:
                walked[real] = str(path)
                stack.append((path, real, listing(path)))
            continue
        folder, folder_real, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        path = Path(entry.path)
        if entry.name.startswith("."):
            is_dir = entry.is_dir(follow_symlinks=False)
            skip(path, "hidden", "hidden folder, not walked" if is_dir else "hidden file")
            continue
        if entry.is_symlink():
            if entry.name not in MANIFEST_NAMES:
                links.append((path, folder_real))
            continue
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except OSError as exc:
            skip(path, "unreadable", exc.strerror or str(exc))
            continue
        if stat.S_ISDIR(mode):
            real = os.path.join(folder_real, entry.name)  # not a link: its real path is its parent's plus its name
            walked[real] = str(path)
            stack.append((path, real, listing(path)))
        elif not stat.S_ISREG(mode):
            skip(path, "not_regular_file", _special_kind(mode))
        elif entry.name not in MANIFEST_NAMES:
            yield path


def limits_options(limits: Any = None) -> dict:
    """The readers' per-file limits from a BuildKBConfig (or anything with the LIMIT_FIELDS
    attributes; default: BuildKBConfig's defaults)."""
    if limits is None:
        from ..config import BuildKBConfig

        limits = BuildKBConfig()
    return {"max_file_bytes": int(limits.max_file_mb * 2**20),
            "max_pdf_bytes": int(limits.max_pdf_mb * 2**20), "max_pages": int(limits.max_pages_per_file),
            "max_chars": int(limits.max_chars_per_file), "max_records": int(limits.max_chunks_per_file)}


def _check_regular_inside(path: Path, corpus: Path) -> None:
    """Re-checked just before reading: the walk saw a regular file inside the corpus, but a path
    swapped for a FIFO since would block the read, and a retargeted link would leak its target."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise SkipFile("unreadable", exc.strerror or str(exc)) from None
    if not stat.S_ISREG(mode):
        raise SkipFile("not_regular_file", _special_kind(mode))
    real = os.path.realpath(path)
    if not _inside(real, os.path.realpath(corpus)):
        raise SkipFile("symlink_outside_corpus", f"-> {real}")


def ingest_file(path: Path, corpus: Path, manifest: dict, opts: dict, timings: Optional[dict] = None) -> Document:
    """One corpus file -> a Document, or SkipFile. `opts`: the readers' limits (`limits_options`)."""
    timings = timings if timings is not None else {}
    ext = path.suffix.lower()
    if ext not in READERS:
        raise SkipFile("unsupported_extension", f"{ext or '(none)'} (supported: {' '.join(sorted(READERS))})")
    _check_regular_inside(path, corpus)
    t0 = time.perf_counter()
    raw = READERS[ext](path, opts)
    t1 = time.perf_counter()
    if opts.get("max_chars") and len(raw.text) > opts["max_chars"]:
        raise SkipFile("too_many_chars", f"{len(raw.text)} characters > max_chars_per_file={opts['max_chars']}")
    text = clean_text(raw.text)
    timings["extract"] = timings.get("extract", 0.0) + t1 - t0
    timings["clean"] = timings.get("clean", 0.0) + time.perf_counter() - t1
    if not text:
        raise SkipFile("no_text", "nothing left after cleaning")
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    rel = path.relative_to(corpus).as_posix()
    meta = manifest.get(rel, {})
    # page spans refer to the raw text; cleaning only shortens lines, so rescale proportionally
    scale = len(text) / max(1, len(raw.text))
    pages = [[p, int(a * scale), int(b * scale)] for p, a, b in raw.pages]
    return Document(
        doc_id=sha[:16], source=str(path), title=str(meta.get("title") or raw.title or path.stem),
        doc_type=ext.lstrip("."), sha256=sha, text=text, pages=pages,
        license=str(meta.get("license", "")), provenance=str(meta.get("provenance", meta.get("source_url", ""))),
    )


def ingest_corpus(corpus: str | Path, manifest: str | Path | None = None, progress: bool = True,
                  timings: Optional[dict] = None, limits: Any = None) -> tuple[list[Document], list[SkippedFile]]:
    """Read every file under `corpus`; returns (documents, skipped files). `limits`: per-file caps
    (a BuildKBConfig or anything with its LIMIT_FIELDS; default BuildKBConfig's). `timings` (if
    given) receives seconds spent in 'extract' and 'clean'."""
    corpus = Path(corpus)
    if not corpus.is_dir():
        raise NotADirectoryError(f"corpus folder not found: {corpus}")
    man_path = Path(manifest) if manifest else find_manifest(corpus)
    man = load_manifest(man_path) if man_path else {}
    opts = limits_options(limits)
    docs: list[Document] = []
    skipped: list[SkippedFile] = []
    seen: dict[str, str] = {}
    files = list(iter_corpus_files(corpus, skipped))
    for path in tqdm(files, desc="ingest", unit="file", disable=not progress):
        try:
            doc = ingest_file(path, corpus, man, opts, timings)
        except SkipFile as exc:
            log.warning("skipped %s: %s", path, exc)
            skipped.append(SkippedFile(str(path), exc.reason, exc.detail))
            continue
        except OSError as exc:  # no permission to read it (or an I/O error): not a reader bug
            detail = f"{type(exc).__name__}: {exc.strerror or exc}"[:300]
            log.warning("skipped %s: unreadable %s", path, detail)
            skipped.append(SkippedFile(str(path), "unreadable", detail))
            continue
        except Exception as exc:  # a reader bug must not lose the rest of the build
            log.exception("skipped %s: unexpected %s", path, type(exc).__name__)
            skipped.append(SkippedFile(str(path), "reader_error", f"{type(exc).__name__}: {exc}"[:300]))
            continue
        if doc.sha256 in seen:
            skipped.append(SkippedFile(str(path), "duplicate", f"same bytes as {seen[doc.sha256]}"))
            continue
        seen[doc.sha256] = str(path)
        docs.append(doc)
    if not docs:
        reasons = Counter(s.reason for s in skipped)
        raise NoUsableDocuments(
            f"no usable document in {corpus} ({len(files)} file(s); skipped: {dict(reasons) or 'none found'}). "
            f"Supported extensions: {' '.join(sorted(READERS))}")
    return docs, skipped
