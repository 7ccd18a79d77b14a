"""The project home: the one folder that generated models (``models/``), caches (``.cache/``) and the
default MLflow store (``mlflow.db``) belong to, resolved at call time, here only.

    project_home()  $FSKU_HOME when set; else the fsku checkout the working directory is in (the first
                    folder, walking up from the cwd, that holds this project's pyproject.toml or
                    MLproject); else None
    models_dir()    $FSKU_MODELS_DIR when set; else <home>/models; no home: HomeNotFound
    cache_path(p)   None/'' -> None (no cache); an absolute path -> itself; a relative one -> <home>/p,
                    or None (caching off, with a warning) when there is no home
    tracking_uri()  $MLFLOW_TRACKING_URI when set; else sqlite:///<home>/mlflow.db; no home: HomeNotFound
                    (experiments fsku creates in a SQLite store keep their artifacts in mlruns/ beside it)

So a command run from another directory uses the project's prepared models and store when FSKU_HOME
points at the checkout, and otherwise fails naming where it looked, instead of rebuilding models or
creating mlflow.db / .cache in whatever directory it was started from.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional, Union

log = logging.getLogger(__name__)

HOME_ENV = "FSKU_HOME"
MODELS_ENV = "FSKU_MODELS_DIR"
TRACKING_ENV = "MLFLOW_TRACKING_URI"

# how a folder shows it is an fsku checkout: its pyproject.toml names the project, or its MLproject does
_MARKERS = (("pyproject.toml", re.compile(r'(?m)^name\s*=\s*["\']fsku["\']\s*$')),
            ("MLproject", re.compile(r"(?m)^name:\s*['\"]?fsku['\"]?\s*$")))


class HomeNotFound(FileNotFoundError):
    """No project home: FSKU_HOME is unset and the working directory is not inside an fsku checkout."""


def is_project_root(folder: Path) -> bool:
    for name, pattern in _MARKERS:
        marker = folder / name
        try:
            if marker.is_file() and pattern.search(marker.read_text(encoding="utf-8", errors="replace")):
                return True
        except OSError:
            continue
    return False


def find_project_root(start: Union[str, Path]) -> Optional[Path]:
    """The first folder from `start` upwards that is an fsku checkout (None if there is none)."""
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        if is_project_root(folder):
            return folder
    return None


def project_home() -> Optional[Path]:
    """$FSKU_HOME (which must be a folder), else the checkout around the working directory, else None."""
    env = os.environ.get(HOME_ENV)
    if env:
        home = Path(env).expanduser().resolve()
        if not home.is_dir():
            raise HomeNotFound(f"{HOME_ENV}={env} is not a folder; point it at the fsku checkout (the folder "
                               "with pyproject.toml and models/)")
        return home
    return find_project_root(Path.cwd())


def where_looked() -> str:
    return (f"{HOME_ENV} is unset and no folder from {Path.cwd().resolve()} upwards holds fsku's pyproject.toml "
            "or MLproject")


def require_home(what: str, how: str = "") -> Path:
    """The project home, or HomeNotFound saying what needed it, where it looked and how to point elsewhere."""
    home = project_home()
    if home is None:
        raise HomeNotFound(f"{what} needs the project home, but {where_looked()}. Run from inside the checkout, "
                           f"or set {HOME_ENV}=/path/to/fsku" + (f", or {how}" if how else "") + ".")
    return home


def models_dir() -> Path:
    """Where generated and prepared model folders live: $FSKU_MODELS_DIR, else <home>/models."""
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return require_home("the prepared models folder (models/)",
                        f"set {MODELS_ENV}=/path/to/models, or give a model folder by path") / "models"


_warned: set[str] = set()


def cache_path(path: Union[str, Path, None]) -> Optional[Path]:
    """A cache folder: '', 'none' or None -> None (no cache); absolute -> itself; relative -> <home>/path.
    Without a home a relative cache is switched off (warned once) rather than created in the cwd."""
    if path is None or str(path).strip().lower() in ("", "none"):  # 'none' as a recipe/Python value, not a folder
        return None
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    home = project_home()
    if home is None:
        if str(path) not in _warned:
            _warned.add(str(path))
            log.warning("cache %s off: %s (set %s, or give an absolute cache folder)", path, where_looked(), HOME_ENV)
        return None
    return home / path


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the project's own SQLite store <home>/mlflow.db."""
    env = os.environ.get(TRACKING_ENV)
    if env:
        return env
    home = require_home("the MLflow tracking store (mlflow.db)", f"set {TRACKING_ENV}")
    return f"sqlite:///{home / 'mlflow.db'}"


def default_artifact_location(uri: str) -> Optional[str]:
    """Where the artifacts of an experiment fsku creates in a SQLite store go: ``mlruns/`` beside the
    database file (for the default store, <home>/mlruns). MLflow would otherwise use ./mlruns of
    whatever directory created the experiment. None for other stores (their own default applies)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
