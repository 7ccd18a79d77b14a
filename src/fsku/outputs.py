"""Outputs that never overwrite an input and never destroy a folder they were not asked to write.

    check_not_input(out, inputs, what)      refuse an output path that is, contains or lies inside an input
    check_replaceable(out, markers, what)   refuse to replace an existing folder that is not recognisably ours
    staged_folder(out, markers, what)       write a folder beside `out` and swap it in whole
    begin_staging / replace_folder          the same in two calls, for code that cannot be one `with` block
    remove_ours(path, markers, what)        delete a folder only when it is recognisably ours

A folder is "ours" when it holds one of the command's marker files (a knowledge base's manifest.json
with schema_version, a quantized model's fsku_quantization.json, ...). An empty or missing folder may
always be written; a file where a folder should go, or a non-empty folder without a marker, is refused
with its files left as they were.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


class OutputRefused(ValueError):
    """An output that would overwrite an input or replace a folder the command did not write."""


@dataclass(frozen=True)
class Marker:
    """A file (relative to the folder) whose presence proves the folder was written by the command;
    with `key`, the file must also be a JSON object holding that key."""

    name: str
    key: Optional[str] = None

    def found_in(self, folder: Path) -> bool:
        path = folder / self.name
        if not path.is_file():
            return False
        if self.key is None:
            return True
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and self.key in data

    def __str__(self) -> str:
        return self.name if self.key is None else f"{self.name} with {self.key!r}"


MarkerLike = Union[str, Marker]


def _markers(markers: Sequence[MarkerLike]) -> list[Marker]:
    if isinstance(markers, (str, Marker)):
        markers = (markers,)
    out = [m if isinstance(m, Marker) else Marker(str(m)) for m in markers]
    if not out:
        raise ValueError("a folder output needs at least one marker file that proves it is ours")
    return out


# ---------------------------------------------------------------- outputs vs inputs

def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:  # hard links, bind mounts, case-insensitive file systems
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    return any(_same(anc, parent) for anc in child.parents)


def relation(out: PathLike, inp: PathLike) -> Optional[str]:
    """How path `out` relates to path `inp` ("is the same path as", "is inside", "contains"), after
    resolving symlinks; None when they are apart."""
    o, i = Path(out).expanduser().resolve(), Path(inp).expanduser().resolve()
    if _same(o, i):
        return "is the same path as"
    if _inside(o, i):
        return "is inside"
    if _inside(i, o):
        return "contains"
    return None


def _items(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return [v for v in value if v is not None and v != ""]


def check_not_input(out: Optional[PathLike], inputs: Mapping[str, object], what: str = "output",
                    missing_too: bool = False) -> None:
    """Raise OutputRefused when `out` is, contains or lies inside one of `inputs` ({flag: path, list of
    paths or None}). Inputs that do not exist on disk (a hub id, a models:/ URI, an unset option) are
    skipped, there being nothing there to overwrite, unless `missing_too` (the "inputs" are other
    outputs of the same command, written later)."""
    if out is None or str(out) == "":
        return
    for label, value in inputs.items():
        for item in _items(value):
            if not missing_too and not Path(item).expanduser().exists():
                continue
            rel = relation(out, item)
            if rel:
                raise OutputRefused(f"{what} {out} {rel} {label} {item}: an output must not be, contain or lie inside an input")


# ---------------------------------------------------------------- replacing folders we wrote

def is_ours(folder: PathLike, markers: Sequence[MarkerLike]) -> bool:
    """Whether `folder` holds one of `markers`."""
    return any(m.found_in(Path(folder)) for m in _markers(markers))


def check_replaceable(out: PathLike, markers: Sequence[MarkerLike], what: str = "output folder") -> None:
    """Raise OutputRefused unless `out` is missing, an empty folder, or a folder holding a marker."""
    ms, out = _markers(markers), Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputRefused(f"{what} {out} is a file, not a folder: refusing to replace it; move it away or choose "
                            f"another {what}")
    if not any(out.iterdir()) or is_ours(out, ms):
        return
    raise OutputRefused(f"{what} {out} is a non-empty folder without {' or '.join(map(str, ms))}, so this command did "
                        f"not write it: refusing to replace it (its files are left as they were); choose another {what} "
                        "or empty it yourself")


def _target(out: PathLike) -> Path:
    # a symlinked output folder keeps its link: the new folder goes where the link points
    return Path(os.path.realpath(Path(out).expanduser()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _leftovers(out: Path, kind: str) -> Iterator[tuple[Path, int]]:
    """Our staging (`partial`) or set-aside (`old`) folders beside `out`, named <out>.<kind>-<pid>,
    whose process has ended (or is this one)."""
    for path in out.parent.glob(f"{glob.escape(out.name)}.{kind}-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and path.is_dir() and not path.is_symlink() and (int(pid) == os.getpid() or not _alive(int(pid))):
            yield path, int(pid)


def _clear_leftovers(out: Path) -> None:
    for old, _ in sorted(_leftovers(out, "old")):
        if not out.exists() and not out.is_symlink():
            # a crash between the two renames of a swap: the previous folder goes back where it was
            log.warning("restoring %s from %s (an earlier run stopped while replacing it)", out, old)
            old.rename(out)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for partial, _ in _leftovers(out, "partial"):
        log.info("removing %s, left by an earlier run that stopped", partial)
        shutil.rmtree(partial, ignore_errors=True)


def staging_path(out: PathLike) -> Path:
    """Where this process builds the replacement of `out`: <out>.partial-<pid>, beside it."""
    out = _target(out)
    return out.with_name(f"{out.name}.partial-{os.getpid()}")


def begin_staging(out: PathLike, markers: Sequence[MarkerLike], what: str = "output folder") -> Path:
    """Check that `out` may be replaced, clear our own leftovers beside it, and return a new empty
    staging folder to write the replacement into (then call replace_folder)."""
    target = _target(out)
    check_replaceable(target, markers, what)
    _clear_leftovers(target)
    staging = staging_path(target)
    staging.mkdir(parents=True)
    return staging


def replace_folder(staging: PathLike, out: PathLike, markers: Sequence[MarkerLike], what: str = "output folder") -> Path:
    """Swap the finished `staging` folder in as `out`: the old folder is renamed aside, the new one
    renamed into place, then the old one deleted, so a crash leaves one of the two. Refuses (again:
    it may have changed meanwhile) an `out` check_replaceable refuses. Returns `out`."""
    ms, staging, target = _markers(markers), Path(staging), _target(out)
    if not is_ours(staging, ms):
        # the next run would refuse to replace what this one wrote
        raise ValueError(f"{staging}: holds none of {', '.join(map(str, ms))}; write the marker before replacing {out}")
    check_replaceable(target, ms, what)
    if target.exists():
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)  # ours by name and pid: an earlier swap in this process that failed
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
    return Path(out)


@contextlib.contextmanager
def staged_folder(out: PathLike, markers: Sequence[MarkerLike], what: str = "output folder") -> Iterator[Path]:
    """``with staged_folder(out, markers) as tmp:`` write into `tmp` (including a marker); on success it
    replaces `out` whole, on an error it is removed and `out` stays as it was."""
    staging = begin_staging(out, markers, what)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_folder(staging, out, markers, what)


def remove_ours(path: PathLike, markers: Sequence[MarkerLike], what: str = "output folder") -> bool:
    """Delete the folder `path` when check_replaceable allows it (missing: nothing to do; a symlink keeps
    pointing at an emptied folder); True when something was deleted."""
    path = Path(path)
    check_replaceable(path, markers, what)
    if not path.exists():
        return False
    target = _target(path)
    shutil.rmtree(target)
    if path.is_symlink():  # the link stays valid: an empty folder where it points
        target.mkdir()
    return True
