"""Ingest: a corpus folder -> cleaned ``Document`` records with metadata, plus a list of
skipped files with reasons. The build continues past bad files; a corpus with no usable
document raises ``NoUsableDocuments``.

    from fsku.ingest import ingest_corpus
    docs, skipped = ingest_corpus("data/sample_corpus")
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from tqdm.auto import tqdm

from .clean import clean_text
from .readers import READERS, SkipFile

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("manifest.csv", "manifest.json", "manifest.yaml", "manifest.yml")


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


def iter_corpus_files(corpus: Path) -> Iterable[Path]:
    for path in sorted(corpus.rglob("*")):
        rel = path.relative_to(corpus)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts) and path.name not in MANIFEST_NAMES:
            yield path


def ingest_file(path: Path, corpus: Path, manifest: dict, max_file_bytes: int,
                timings: Optional[dict] = None) -> Document:
    timings = timings if timings is not None else {}
    ext = path.suffix.lower()
    if ext not in READERS:
        raise SkipFile("unsupported_extension", f"{ext or '(none)'} (supported: {' '.join(sorted(READERS))})")
    t0 = time.perf_counter()
    raw = READERS[ext](path, {"max_file_bytes": max_file_bytes})
    t1 = time.perf_counter()
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


def ingest_corpus(corpus: str | Path, manifest: str | Path | None = None, max_file_mb: float = 16.0,
                  progress: bool = True, timings: Optional[dict] = None) -> tuple[list[Document], list[SkippedFile]]:
    """Read every file under `corpus`; returns (documents, skipped files). `timings` (if given)
    receives seconds spent in 'extract' and 'clean'."""
    corpus = Path(corpus)
    if not corpus.is_dir():
        raise NotADirectoryError(f"corpus folder not found: {corpus}")
    man_path = Path(manifest) if manifest else find_manifest(corpus)
    man = load_manifest(man_path) if man_path else {}
    docs: list[Document] = []
    skipped: list[SkippedFile] = []
    seen: dict[str, str] = {}
    files = list(iter_corpus_files(corpus))
    for path in tqdm(files, desc="ingest", unit="file", disable=not progress):
        try:
            doc = ingest_file(path, corpus, man, int(max_file_mb * 2**20), timings)
        except SkipFile as exc:
            log.warning("skipped %s: %s", path, exc)
            skipped.append(SkippedFile(str(path), exc.reason, exc.detail))
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
