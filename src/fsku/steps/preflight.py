"""Checks of a step's inputs before its MLflow run starts and before any model loads: a wrong --kb or
model path fails in a second with one line naming the flag, not after an LLM load with a FAILED run."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from ..llm.resolve import ModelNotFound, check_model_reference


def _registry(value: str, flag: str) -> None:
    from .. import tracking

    try:
        tracking.parse_model_uri(value)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def check_inputs(models: Mapping[str, Optional[str]] = {}, kbs: Mapping[str, Optional[str]] = {},
                 files: Mapping[str, Optional[str]] = {}) -> None:
    """`models`: flag -> LLM reference (None skips it); `kbs`: flag -> knowledge-base folder or registry URI
    (None or '' = no KB); `files`: flag -> a path or comma-separated paths that must exist (None or '' skips).
    Raises ValueError / FileNotFoundError (ModelNotFound) naming the flag and what was expected."""
    for flag, value in models.items():
        if value is None:
            continue
        check_model_reference(value, flag)
        if str(value).startswith("models:/"):
            _registry(str(value), flag)
    for flag, value in kbs.items():
        if not value:
            continue
        if str(value).startswith("models:/"):
            _registry(str(value), flag)
            continue
        folder = Path(value)
        if not folder.is_dir():
            raise FileNotFoundError(f"{flag} {value}: no such knowledge-base folder (build one with `fsku build-kb "
                                    f"--out {value}` or `mlflow run . -e build_kb`)")
        if not (folder / "manifest.json").is_file():
            raise ModelNotFound(f"{flag} {value}: the folder has no manifest.json (not a knowledge base written by "
                                "build_kb)")
    for flag, value in files.items():
        for path in [p.strip() for p in str(value or "").split(",") if p.strip()]:
            if not Path(path).exists():
                raise FileNotFoundError(f"{flag} {path}: no such file")
