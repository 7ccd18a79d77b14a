"""package: the champion student + KB as a verified, self-contained submission bundle.

Pure parts (tested on their own): the competition's rule checks (`check_rules`: one LLM; every model
that touched the submission released by the cutoff under a permitted licence (`fsku.package.facts`,
facts from `contenders.yaml`); no network use and no post-3.10 Python in the bundled code
(`scan_network_use`, `fsku.package.pycompat`); GPU memory, disk and time within the target machine
(`fsku.package.resources`)), the manifest
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
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

from ..llm.resolve import sha256_file
from .facts import ModelFacts, eligibility_problems, licence_permitted
from .pycompat import CompatFinding
from .resources import MemoryProjection, TimeProjection

COMPETITION_CUTOFF = "2025-07-31"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

NETWORK_MODULES = ("socket", "requests", "urllib.request", "urllib3", "http.client", "httpx", "aiohttp", "ftplib",
                   "smtplib", "websocket", "websockets", "paramiko")
NETWORK_CALLS = ("snapshot_download", "hf_hub_download", "urlopen", "urlretrieve")
GUARD_MARKER = "# offline:"  # a reviewed call site that cannot reach the network in a bundle (reason after the marker)


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
    """What the rules look at, gathered by the step: the LLMs in the bundle, every model that touched
    the submission with its role, the code scans and the projections."""

    llms: Sequence[str]
    models: Sequence[tuple[str, ModelFacts]] = ()
    data: Sequence[dict] = ()  # {"role", "name", "license"}: the KB corpus, the training data written from it
    network: Sequence[NetworkFinding] = ()
    compat: Sequence[CompatFinding] = ()
    memory: Optional[MemoryProjection] = None
    time: Optional[TimeProjection] = None  # from the measured tokens and the target GPU's throughput table
    bundle_bytes: Optional[int] = None
    projected_s: Optional[float] = None  # from the verification run's wall time on this machine
    projection: str = ""


@dataclass
class RulePolicy:
    permitted_licenses: Sequence[str] = ()
    cutoff: str = COMPETITION_CUTOFF
    budget_min: float = 270.0
    n_questions: int = 515
    disk_gb: float = 40.0
    target_python: str = "3.10"
    extra: dict = field(default_factory=dict)


def check_rules(facts: BundleFacts, policy: RulePolicy) -> list[str]:
    """Every reason the bundle may not be submitted (empty list: it may)."""
    problems = []
    if len(facts.llms) != 1:
        problems.append(f"{len(facts.llms)} LLMs bundled ({', '.join(facts.llms) or 'none'}): the competition allows exactly one")
    for role, model in facts.models:
        problems += eligibility_problems(model, role, policy.permitted_licenses, policy.cutoff)
    for d in facts.data:
        if not licence_permitted(d.get("license"), policy.permitted_licenses):
            problems.append(f"{d['role']}: licence {d.get('license')!r} is not permitted (permitted: "
                            f"{', '.join(policy.permitted_licenses)}); set --corpus-license to the corpus's licence id")
    for finding in facts.network:
        if not finding.guarded:
            problems.append(f"network access in bundled code: {finding}")
    for finding in facts.compat:
        if not finding.guarded:
            problems.append(f"bundled code needs a newer Python than the target {policy.target_python}: {finding}")
    if facts.memory is not None and not facts.memory.fits:
        problems.append(f"GPU memory: projected {facts.memory.total_gib:.2f} GiB exceeds {facts.memory.limit_gib:g} GiB ("
                        + "; ".join(facts.memory.lines[:-1]) + ")")
    if facts.bundle_bytes is not None and facts.bundle_bytes > policy.disk_gb * 1e9:
        problems.append(f"bundle of {facts.bundle_bytes / 1e9:.2f} GB exceeds the {policy.disk_gb:g} GB disk")
    if facts.time is not None and not facts.time.fits:
        problems.append(f"projected {policy.n_questions}-question time on the target GPU {facts.time.seconds / 60:.1f} min "
                        f"exceeds the {policy.budget_min:g}-min budget (" + "; ".join(facts.time.lines) + ")")
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


def model_card(models: Sequence[tuple[str, ModelFacts]], student_tags: dict, kb_info: dict, settings: dict,
               data_sources: Sequence[dict] = (), resources: Sequence[str] = ()) -> str:
    """MODEL_CARD.md: every model that touched the submission with its facts, the training data and
    its licences, the lineage tags, the KB, the resource arithmetic and the inference settings."""
    lines = ["# fsku submission model card", "", "## models that touched this submission", ""]
    for role, m in models:
        what = "trained from scratch in this project" if m.from_scratch else (
            f"{m.hub_id}, licence {m.license or 'unknown'}, released {m.release_date or 'unknown'}"
            if m.known else "facts unknown")
        lines.append(f"- {role}: {m.name} ({what}; facts from {m.source})")
    if data_sources:
        lines += ["", "## data", ""]
        lines += [f"- {d['role']}: {d['name']} (licence: {d.get('license') or 'unknown'})"
                  + (f": {d['note']}" if d.get("note") else "") for d in data_sources]
    lines += ["", "## lineage", ""]
    for key in ("registered_model", "version", "teacher", "loss_type", "alpha", "beta", "data", "data_version",
                "quantization", "bits", "source_version"):
        if student_tags.get(key) not in (None, ""):
            lines.append(f"- {key.replace('_', ' ')}: {student_tags[key]}")
    if kb_info:
        lines.append(f"- knowledge base: {kb_info.get('registered') or kb_info.get('folder')} "
                     f"({kb_info.get('chunks')} chunks from {kb_info.get('documents')} documents; corpus sha256 "
                     f"{str(kb_info.get('corpus_sha256'))[:16]}…)")
    if resources:
        lines += ["", "## resources on the target machine", ""] + [f"- {r}" for r in resources]
    lines += ["", "## inference settings", "", "```json", json.dumps(settings, indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(lines)
