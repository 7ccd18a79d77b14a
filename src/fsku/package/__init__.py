"""package: the champion student + KB as a verified, self-contained submission bundle.

Pure parts (tested on their own): the competition's rule checks (`check_rules`: one LLM, base model
licence and release date, no network use in the bundled code, projected time within the budget),
the static network scan (`scan_network_use`), base-model facts (`base_model_facts`), the manifest
(sha256 per file) and a deterministic, safe zip (`write_zip`: sorted entries, fixed timestamps and
modes, no absolute paths or `..`). `fsku.package.inference` is the bundle's entry point, copied into
it as inference.py. The step (`fsku.steps.package`) assembles the folder, refuses with the reasons
when a rule fails, and verifies the bundle in a fresh virtualenv without network.
"""
from __future__ import annotations

import ast
import json
import zipfile
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

from ..llm.resolve import sha256_file

COMPETITION_CUTOFF = "2025-07-31"
PERMITTED_LICENSES = ("apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc-by-4.0")
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

# Facts from the models' Hugging Face cards (licence) and release announcements (date).
KNOWN_BASE_MODELS = {
    "qwen2.5-coder-0.5b-instruct": {"hub_id": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "license": "apache-2.0",
                                    "release_date": "2024-11-12"},
    "qwen2.5-coder-1.5b-instruct": {"hub_id": "Qwen/Qwen2.5-Coder-1.5B-Instruct", "license": "apache-2.0",
                                    "release_date": "2024-09-19"},
}

NETWORK_MODULES = ("socket", "requests", "urllib.request", "urllib3", "http.client", "httpx", "aiohttp", "ftplib",
                   "smtplib", "websocket", "websockets", "paramiko")
NETWORK_CALLS = ("snapshot_download", "hf_hub_download", "urlopen", "urlretrieve")
GUARD_MARKER = "# offline:"  # a reviewed call site that cannot reach the network in a bundle (reason after the marker)


def base_model_key(name: str) -> str:
    """'offline:qwen2.5-coder-0.5b-instruct', 'Qwen/Qwen2.5-Coder-0.5B-Instruct', 'models/qwen2.5-…' -> table key."""
    name = name.strip()
    if name.startswith("offline:"):
        name = name[len("offline:"):]
    return PurePosixPath(name.replace("\\", "/")).name.lower()


def base_model_facts(base_model: str, model_dir: Optional[Path] = None) -> dict:
    """{"base_model", "license", "release_date", "from_scratch", "source"}; unknown fields are None.
    A model built from config by fsku (fsku_tiny.json) is trained from scratch: no pretrained base."""
    for folder in [p for p in (model_dir, Path(base_model)) if p is not None]:
        try:
            if (folder / "fsku_tiny.json").exists():
                return {"base_model": base_model, "license": "mit", "release_date": None, "from_scratch": True,
                        "source": "random initialisation from config (fsku make-tiny-models), trained in this project"}
        except OSError:
            pass
    known = KNOWN_BASE_MODELS.get(base_model_key(base_model))
    if known:
        return {"base_model": known["hub_id"], "license": known["license"], "release_date": known["release_date"],
                "from_scratch": False, "source": "fsku.package.KNOWN_BASE_MODELS"}
    return {"base_model": base_model, "license": None, "release_date": None, "from_scratch": False, "source": "unknown"}


@dataclass
class NetworkFinding:
    file: str
    line: int
    what: str
    guarded: bool = False
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}" + (f" (guarded: {self.reason})" if self.guarded else "")


def scan_network_use(source: str, filename: str) -> list[NetworkFinding]:
    """Imports of network libraries and calls of download functions in one Python file. A call
    whose line carries `# offline: <reason>`, or whose line right above is that comment, is reported
    as guarded (reviewed), not as a violation."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        return [NetworkFinding(filename, exc.lineno or 0, f"unparsable Python ({exc.msg}): cannot be checked")]
    lines = source.splitlines()
    found = []

    def add(node, what):
        text = lines[node.lineno - 1] if 0 < node.lineno <= len(lines) else ""
        above = lines[node.lineno - 2].strip() if 1 < node.lineno <= len(lines) + 1 else ""
        if GUARD_MARKER not in text and above.startswith(GUARD_MARKER):
            text = above  # the marker as a comment line right above the call (a long line wrapped)
        guarded = GUARD_MARKER in text
        reason = text.split(GUARD_MARKER, 1)[1].strip() if guarded else ""
        found.append(NetworkFinding(filename, node.lineno, what, guarded, reason))

    def is_network(module: str) -> bool:
        return any(module == m or module.startswith(m + ".") for m in NETWORK_MODULES)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_network(alias.name):
                    add(node, f"imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if is_network(node.module) or (node.module == "urllib" and any(a.name == "request" for a in node.names)):
                add(node, f"imports from {node.module}")
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in NETWORK_CALLS:
                add(node, f"calls {name}()")
    return sorted(found, key=lambda f: (f.file, f.line))


@dataclass
class BundleFacts:
    """What the rules look at, gathered by the step."""

    llms: Sequence[str]
    base: dict
    network: Sequence[NetworkFinding] = ()
    projected_s: Optional[float] = None
    projection: str = ""


@dataclass
class RulePolicy:
    permitted_licenses: Sequence[str] = PERMITTED_LICENSES
    cutoff: str = COMPETITION_CUTOFF
    budget_min: float = 270.0
    n_questions: int = 515
    extra: dict = field(default_factory=dict)


def check_rules(facts: BundleFacts, policy: RulePolicy) -> list[str]:
    """Every reason the bundle may not be submitted (empty list: it may)."""
    problems = []
    if len(facts.llms) != 1:
        problems.append(f"{len(facts.llms)} LLMs bundled ({', '.join(facts.llms) or 'none'}): the competition allows exactly one")
    base = facts.base
    name = base.get("base_model") or "the base model"
    if not base.get("from_scratch"):
        released = base.get("release_date")
        if not released:
            problems.append(f"release date of {name} unknown: check its model card and pass --base-model-release-date "
                            f"(must be on or before {policy.cutoff})")
        else:
            try:
                if date.fromisoformat(str(released)) > date.fromisoformat(policy.cutoff):
                    problems.append(f"{name} was released {released}, after the competition cutoff {policy.cutoff}")
            except ValueError:
                problems.append(f"release date {released!r} of {name} is not an ISO date (YYYY-MM-DD)")
    licence = (base.get("license") or "").strip().lower()
    if not licence:
        problems.append(f"licence of {name} missing: pass --base-model-license after checking its model card")
    elif licence not in [x.lower() for x in policy.permitted_licenses]:
        problems.append(f"licence {licence!r} of {name} is not permitted (permitted: {', '.join(policy.permitted_licenses)})")
    for finding in facts.network:
        if not finding.guarded:
            problems.append(f"network access in bundled code: {finding}")
    if facts.projected_s is not None and facts.projected_s > policy.budget_min * 60:
        problems.append(f"projected {policy.n_questions}-question time {facts.projected_s / 60:.1f} min exceeds the "
                        f"{policy.budget_min:g}-min budget ({facts.projection})")
    return problems


def project_seconds(load_s: float, seconds_per_question: float, n_questions: int, speed_factor: float = 1.0) -> float:
    """Projected wall time of a full test set: model load once plus every question at the measured
    rate, divided by how much faster the target machine is than the measuring one."""
    if speed_factor <= 0:
        raise ValueError("speed_factor must be > 0")
    return (load_s + seconds_per_question * n_questions) / speed_factor


# ----------------------------------------------------------------------------- manifest and zip

def bundle_files(folder: Path) -> list[Path]:
    """Every regular file under `folder`, sorted by POSIX relative path; links are refused."""
    out = []
    for path in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix()):
        if path.is_symlink():
            raise ValueError(f"{path}: symbolic links are not allowed in a bundle")
        if path.is_file():
            out.append(path)
    return out


def safe_member(name: str) -> str:
    """A zip member name that cannot escape the extraction folder."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts or ":" in p.parts[0] \
            or "\\" in name:
        raise ValueError(f"unsafe path in bundle: {name!r}")
    return p.as_posix()


def build_manifest(folder: Path, exclude: Sequence[str] = ("MANIFEST.json",)) -> dict:
    files = {}
    for path in bundle_files(folder):
        rel = safe_member(path.relative_to(folder).as_posix())
        if rel in exclude:
            continue
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return {"files": files, "total_bytes": sum(f["bytes"] for f in files.values())}


def write_zip(folder: Path, out: Path, root: str = "") -> Path:
    """Deterministic zip of `folder`: sorted entries, fixed timestamps, permissions 0644, no extra
    fields; the same folder always gives the same bytes."""
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for path in bundle_files(folder):
            name = safe_member((PurePosixPath(root) / path.relative_to(folder).as_posix()).as_posix() if root
                               else path.relative_to(folder).as_posix())
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            with path.open("rb") as src, zf.open(info, "w") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
    tmp.replace(out)
    return out


def check_zip(path: Path) -> list[str]:
    """Member names of a zip, refusing unsafe ones (what an extractor should run first)."""
    with zipfile.ZipFile(path) as zf:
        return [safe_member(n) for n in zf.namelist()]


def model_card(facts: dict, student_tags: dict, kb_info: dict, settings: dict) -> str:
    lines = ["# fsku submission model card", "",
             f"- base model: {facts.get('base_model')}" + (" (trained from scratch)" if facts.get("from_scratch") else ""),
             f"- base model licence: {facts.get('license') or 'unknown'}",
             f"- base model release date: {facts.get('release_date') or ('n/a' if facts.get('from_scratch') else 'unknown')}",
             f"- facts source: {facts.get('source')}"]
    for key in ("registered_model", "version", "teacher", "loss_type", "alpha", "beta", "data", "data_version",
                "quantization", "bits", "source_version"):
        if student_tags.get(key) not in (None, ""):
            lines.append(f"- {key.replace('_', ' ')}: {student_tags[key]}")
    if kb_info:
        lines.append(f"- knowledge base: {kb_info.get('registered') or kb_info.get('folder')} "
                     f"({kb_info.get('chunks')} chunks from {kb_info.get('documents')} documents; corpus sha256 "
                     f"{str(kb_info.get('corpus_sha256'))[:16]}…)")
    lines += ["", "## inference settings", "", "```json", json.dumps(settings, indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(lines)
