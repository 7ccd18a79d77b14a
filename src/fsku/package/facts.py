"""Facts about models and licences that the package rules check, loaded from data files.

`contenders.yaml` beside this module is the project's table (every fact with its source); a user adds
or replaces entries with files of their own in the same layout (`load_facts(extra=[...])`). A model is
found by its hub id, an alias, or the last part of a path/URI ("offline:qwen2.5-coder-0.5b-instruct",
"models/qwen2.5-coder-1.5b-instruct", "….gguf"); a folder holding `fsku_tiny.json` is a model this
project built from config (no pretrained base, so no release date to check). Unknown models get empty
facts, and the rules refuse them until the facts are given.
"""
from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Optional, Sequence

import yaml

DEFAULT_FACTS = Path(__file__).with_name("contenders.yaml")
SCHEMA = "fsku-contenders/1"
PRECISIONS = ("fp32", "bf16", "int8", "4bit")
ENGINES = ("optimized", "transformers")
THROUGHPUT_KINDS = ("measured", "measured-a100", "estimate")
FACT_FIELDS = ("parameters_b", "license", "release_date", "tokenizer", "dtype", "architecture")
RULE_GENERATOR_PREFIX = "rules:"  # synth_qa-format data written by rules (fsku mc-bank): no model involved


class FactsError(ValueError):
    """A contenders file that does not follow the schema (names the file, the entry and the field)."""


@dataclass(frozen=True)
class Architecture:
    layers: int
    kv_heads: int
    head_dim: int
    max_position_embeddings: Optional[int] = None

    def kv_bytes_per_token(self, bytes_per_value: float) -> float:
        """Keys and values of one token over every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_value


@dataclass
class ModelFacts:
    """What the rules know of one model; None where nothing is known."""

    name: str  # as the pipeline named it (hub id, folder, offline:<name>, .gguf)
    hub_id: Optional[str] = None
    parameters_b: Optional[float] = None
    license: Optional[str] = None
    release_date: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: Optional[str] = None
    architecture: Optional[Architecture] = None
    from_scratch: bool = False
    source: str = "unknown"  # where the facts came from: a contenders file, a folder, a flag
    sources: dict = field(default_factory=dict)  # fact -> source key
    unverified: list = field(default_factory=list)
    note: str = ""

    @property
    def known(self) -> bool:
        return self.from_scratch or self.hub_id is not None

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "architecture"}
        out["architecture"] = self.architecture.__dict__ if self.architecture else None
        return out


@dataclass(frozen=True)
class LicenceFacts:
    id: str
    name: str
    non_commercial_use: bool
    commercial_use: bool
    source: str


@dataclass(frozen=True)
class ThroughputRow:
    engine: str
    precision: str
    parameters_b: float
    prefill_tps: float
    decode_tps: float
    kind: str  # of decode_tps (and of prefill_tps unless prefill_kind says otherwise)
    source: str
    note: str = ""
    prefill_kind: str = ""


@dataclass
class FactTables:
    models: dict  # lowercased hub id -> model entry (dict as in the file, checked)
    aliases: dict  # bare name (offline:<name>, a GGUF or folder name) -> hub id
    licences: dict  # id -> LicenceFacts
    sources: dict  # key -> {"url", "quote"}
    throughput: list  # ThroughputRow
    gpu: dict  # gpu, gpu_bandwidth_gb_s, gpu_source
    files: list  # the files read, in order
    torch_cuda: dict = field(default_factory=dict)  # torch major.minor -> {"cuda": [...], "source": key}

    def permitted_licences(self) -> list[str]:
        """Licences of the table that allow at least non-commercial use (the competition's rule)."""
        return sorted(k for k, v in self.licences.items() if v.non_commercial_use)


def model_key(name: str) -> str:
    """The lookup key of a model name: a hub id 'owner/name' (lowercased, owner included: a look-alike
    under another owner is another model), or, for a local path, a .gguf file or an offline:<name>, the
    bare name ('qwen2.5-coder-1.5b-instruct', quantization suffix of a GGUF dropped), which only a
    table entry's `aliases` match."""
    name = name.strip().replace("\\", "/")
    bare_prefix = name.startswith("offline:")
    for prefix in ("offline:", "hf:", "hub:"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    parts = [p for p in name.split("/") if p]
    is_path = (bare_prefix or name.endswith(("/", ".gguf")) or name.startswith((".", "/", "~")) or len(parts) != 2
               or re.match(r"^[A-Za-z]:/", name) is not None or Path(name).exists())
    if not is_path:
        return "/".join(parts).lower()
    key = PurePosixPath(name.rstrip("/")).name.lower()
    if key.endswith(".gguf"):
        key = key[:-5]
        key = re.sub(r"[-.](q\d[a-z0-9_]*|iq\d[a-z0-9_]*|f16|bf16|fp16|f32)$", "", key)
    return key


def _date(value, where: str) -> Optional[str]:
    if value in (None, ""):
        return None
    if isinstance(value, datetime.date):
        return value.isoformat()
    try:
        return datetime.date.fromisoformat(str(value)).isoformat()
    except ValueError:
        raise FactsError(f"{where}: release_date {value!r} is not a date YYYY-MM-DD") from None


def _number(value, where: str, name: str, positive: bool = True, required: bool = False) -> Optional[float]:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
        raise FactsError(f"{where}: {name} must be a positive number, got {value!r}")
    return float(value)


def _check_model(entry, where: str, sources: dict) -> dict:
    if not isinstance(entry, dict) or not isinstance(entry.get("hub_id"), str) or "/" not in entry["hub_id"]:
        raise FactsError(f"{where}: every model needs hub_id 'owner/name', got {entry!r:.120}")
    known = {"hub_id", "aliases", "parameters_b", "license", "release_date", "tokenizer", "dtype", "architecture",
             "sources", "unverified", "note"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise FactsError(f"{where} ({entry['hub_id']}): unknown field(s) {unknown}; expected some of {sorted(known)}")
    out = dict(entry)
    aliases = entry.get("aliases") or []
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise FactsError(f"{where} ({entry['hub_id']}): aliases must be a list of names, got {aliases!r}")
    out["aliases"] = aliases
    unverified = entry.get("unverified") or []
    if not isinstance(unverified, list) or not set(unverified) <= set(FACT_FIELDS):
        raise FactsError(f"{where} ({entry['hub_id']}): unverified must list fact names among {list(FACT_FIELDS)}, "
                         f"got {unverified!r} (explanations go in `note`)")
    out["parameters_b"] = _number(entry.get("parameters_b"), where, "parameters_b")
    out["release_date"] = _date(entry.get("release_date"), where)
    if entry.get("license") is not None and not isinstance(entry["license"], str):
        raise FactsError(f"{where} ({entry['hub_id']}): license must be a licence id string")
    out["license"] = entry["license"].strip().lower() if entry.get("license") else None
    arch = entry.get("architecture")
    if arch is not None:
        if not isinstance(arch, dict) or not {"layers", "kv_heads", "head_dim"} <= set(arch):
            raise FactsError(f"{where} ({entry['hub_id']}): architecture needs layers, kv_heads and head_dim, got {arch!r}")
        values = {k: _number(arch.get(k), where, f"architecture.{k}", required=True) for k in ("layers", "kv_heads",
                                                                                                 "head_dim")}
        mpe = _number(arch.get("max_position_embeddings"), where, "architecture.max_position_embeddings")
        out["architecture"] = Architecture(int(values["layers"]), int(values["kv_heads"]), int(values["head_dim"]),
                                           int(mpe) if mpe else None)
    cited = entry.get("sources") or {}
    if not isinstance(cited, dict):
        raise FactsError(f"{where} ({entry['hub_id']}): sources must map a fact to a source key")
    for fact, key in cited.items():
        if key not in sources:
            raise FactsError(f"{where} ({entry['hub_id']}): the source {key!r} of {fact} is not under `sources`")
    for fact in FACT_FIELDS:
        if out.get(fact) is not None and fact not in cited:
            raise FactsError(f"{where} ({entry['hub_id']}): {fact} {out[fact]!r} has no source (add sources: "
                             f"{{{fact}: <key>}})")
    return out


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FactsError(f"{path}: cannot read the contenders file ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise FactsError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise FactsError(f"{path}: expected a mapping with models/licenses/sources, got {type(data).__name__}")
    if data.get("schema", SCHEMA) != SCHEMA:
        raise FactsError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
    unknown = sorted(set(data) - {"schema", "sources", "licenses", "models", "throughput", "torch_cuda"})
    if unknown:
        raise FactsError(f"{path}: unknown section(s) {unknown}")
    return data


def load_facts(extra: Sequence[str | Path] = (), base: Optional[Path] = DEFAULT_FACTS) -> FactTables:
    """The project's table, then each `extra` file: an entry with the same hub id (model) or id
    (licence) replaces the earlier one; sources and throughput rows are added."""
    tables = FactTables({}, {}, {}, {}, [], {}, [])
    for path in ([base] if base else []) + [Path(p) for p in extra]:
        data = _read(path)
        tables.files.append(str(path))
        sources = data.get("sources") or {}
        if not isinstance(sources, dict):
            raise FactsError(f"{path}: sources must map a key to {{url, quote}}")
        for key, src in sources.items():
            if not isinstance(src, dict) or not src.get("url"):
                raise FactsError(f"{path}: source {key!r} needs a url (and a quote of the text that states the fact)")
        tables.sources.update(sources)
        for i, lic in enumerate(data.get("licenses") or []):
            where = f"{path}: licenses[{i}]"
            if not isinstance(lic, dict) or not isinstance(lic.get("id"), str):
                raise FactsError(f"{where}: every licence needs an id")
            if not isinstance(lic.get("non_commercial_use"), bool):
                raise FactsError(f"{where} ({lic['id']}): non_commercial_use must be true or false")
            if lic.get("source") not in tables.sources:
                raise FactsError(f"{where} ({lic['id']}): source {lic.get('source')!r} is not under `sources`")
            tables.licences[lic["id"].lower()] = LicenceFacts(lic["id"].lower(), str(lic.get("name", lic["id"])),
                                                              lic["non_commercial_use"], bool(lic.get("commercial_use")),
                                                              lic["source"])
        for i, entry in enumerate(data.get("models") or []):
            model = _check_model(entry, f"{path}: models[{i}]", tables.sources)
            tables.models[model["hub_id"].lower()] = {**model, "file": str(path)}
            for alias in model["aliases"]:
                tables.aliases[model_key("offline:" + alias)] = model["hub_id"].lower()
        for i, row in enumerate(data.get("torch_cuda") or []):
            where = f"{path}: torch_cuda[{i}]"
            if not isinstance(row, dict) or not isinstance(row.get("torch"), str) or not isinstance(row.get("cuda"), list):
                raise FactsError(f"{where}: expected {{torch: 'MAJOR.MINOR', cuda: [versions], source: key}}")
            if row.get("source") not in tables.sources:
                raise FactsError(f"{where}: source {row.get('source')!r} is not under `sources`")
            tables.torch_cuda[row["torch"]] = {"cuda": [str(c) for c in row["cuda"]], "source": row["source"]}
        tp = data.get("throughput")
        if tp:
            if not isinstance(tp, dict) or not isinstance(tp.get("rows"), list):
                raise FactsError(f"{path}: throughput needs rows: [...]")
            tables.gpu.update({k: v for k, v in tp.items() if k != "rows"})
            for i, row in enumerate(tp["rows"]):
                where = f"{path}: throughput.rows[{i}]"
                if not isinstance(row, dict):
                    raise FactsError(f"{where}: expected a mapping")
                if row.get("engine") not in ENGINES or row.get("precision") not in PRECISIONS \
                        or row.get("kind") not in THROUGHPUT_KINDS:
                    raise FactsError(f"{where}: engine must be one of {ENGINES}, precision one of {PRECISIONS}, kind one "
                                     f"of {THROUGHPUT_KINDS}; got {row.get('engine')!r}/{row.get('precision')!r}/"
                                     f"{row.get('kind')!r}")
                if row.get("source") not in tables.sources:
                    raise FactsError(f"{where}: source {row.get('source')!r} is not under `sources`")
                prefill_kind = row.get("prefill_kind", row["kind"])
                if prefill_kind not in THROUGHPUT_KINDS:
                    raise FactsError(f"{where}: prefill_kind must be one of {THROUGHPUT_KINDS}, got {prefill_kind!r}")
                tables.throughput.append(ThroughputRow(
                    row["engine"], row["precision"], _number(row.get("parameters_b"), where, "parameters_b", required=True),
                    _number(row.get("prefill_tps"), where, "prefill_tps", required=True),
                    _number(row.get("decode_tps"), where, "decode_tps", required=True),
                    row["kind"], row["source"], str(row.get("note", "")), prefill_kind))
    return tables


def is_rule_generator(name: str) -> bool:
    return name.startswith(RULE_GENERATOR_PREFIX)


def model_facts(name: str, tables: FactTables, folder: Optional[Path] = None) -> ModelFacts:
    """The facts of one model named `name` (a folder may be given where it was resolved to one)."""
    for candidate in [p for p in (folder, Path(name)) if p is not None]:
        try:
            if (candidate / "fsku_tiny.json").exists():
                return ModelFacts(name=name, license="apache-2.0", from_scratch=True, parameters_b=None,
                                  source=f"{candidate}/fsku_tiny.json: random initialisation from config, this project's licence "
                                         "(fsku make-tiny-models), trained in this project")
        except OSError:
            pass
    key = model_key(name)
    entry = tables.models.get(key if "/" in key else tables.aliases.get(key, ""))
    if entry is None:
        return ModelFacts(name=name)
    return ModelFacts(name=name, hub_id=entry["hub_id"], parameters_b=entry.get("parameters_b"), license=entry.get("license"),
                      release_date=entry.get("release_date"), tokenizer=entry.get("tokenizer"), dtype=entry.get("dtype"),
                      architecture=entry.get("architecture"), source=entry["file"], sources=dict(entry.get("sources") or {}),
                      unverified=list(entry.get("unverified") or []), note=str(entry.get("note") or ""))


def licence_permitted(licence: Optional[str], permitted: Sequence[str]) -> bool:
    """Whether a licence id is among the permitted ones (case and surrounding spaces ignored)."""
    return (licence or "").strip().lower() in [p.strip().lower() for p in permitted]


def eligibility_problems(facts: ModelFacts, role: str, permitted: Sequence[str], cutoff: str) -> list[str]:
    """Why one model may not have touched the submission (empty: it may): release date on or before
    `cutoff`, licence in `permitted`. A model trained from scratch here has no release date."""
    name = facts.hub_id or facts.name
    who = f"{role} {name}"
    hint = "add it to a contenders file (--contenders FILE, the layout of fsku/package/contenders.yaml) after checking " \
           "its model card"
    problems = []
    if not facts.known:
        return [f"{who}: no facts known (licence, release date): {hint}"]
    unverified = [word for f, word in (("license", "licence"), ("release_date", "release date")) if f in facts.unverified]
    if unverified:  # a fact no stored source confirmed does not pass, whatever value the table holds
        return [f"{who}: {' and '.join(unverified)} unverified in {facts.source}: {hint} (or confirm it there)"]
    if not facts.from_scratch:
        if not facts.release_date:
            problems.append(f"{who}: release date unknown: {hint} (must be on or before {cutoff})")
        else:
            try:
                if datetime.date.fromisoformat(facts.release_date) > datetime.date.fromisoformat(cutoff):
                    problems.append(f"{who} was released {facts.release_date}, after the competition cutoff {cutoff}")
            except ValueError:
                problems.append(f"{who}: release date {facts.release_date!r} is not an ISO date (YYYY-MM-DD)")
    licence = (facts.license or "").strip().lower()
    if not licence:
        problems.append(f"{who}: licence unknown: {hint}")
    elif not licence_permitted(licence, permitted):
        problems.append(f"{who}: licence {licence!r} is not permitted (permitted: {', '.join(permitted)})")
    return problems


def provenance_from_tags(tags: dict, model: str) -> list[tuple[str, str]]:
    """(role, model name) of every model that touched a registered student, from its lineage tags
    (fsku.steps.distill/quantize write them): the base it was trained from, distill's teacher,
    synth_qa's teacher and judge. A model with no lineage is its own base."""
    out: list[tuple[str, str]] = []
    base = tags.get("base_model") or model
    out.append(("base model", base))
    if tags.get("teacher"):
        out.append(("distill teacher", tags["teacher"]))
    synth_teacher = tags.get("synth_teacher")
    if synth_teacher:
        out.append(("synth_qa teacher", synth_teacher))
    judge = tags.get("synth_judge")
    if judge:
        out.append(("synth_qa judge", synth_teacher if judge == "teacher" and synth_teacher else judge))
    return out
