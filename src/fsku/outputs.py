"""Outputs that never overwrite an input and never destroy a folder they were not asked to write.

    check_not_input(out, inputs, what)      refuse an output path that is, contains or lies inside an input
    check_replaceable(out, markers, what)   refuse to replace an existing folder that is not recognisably ours
    staged_folder(out, markers, what)       write a folder beside `out` and swap it in whole
    begin_staging / replace_folder          the same in two calls, for code that cannot be one `with` block
    discard_staging(staging)                (with those) remove this process' staging folder after an error
    remove_ours(path, markers, what)        delete a folder only when it is recognisably ours

A folder is "ours" when it holds one of the command's marker files (a knowledge base's manifest.json
with schema_version, a quantized model's fsku_quantization.json, ...). An empty or missing folder may
always be written; a file where a folder should go, or a non-empty folder without a marker, is refused
with its files left as they were.

Staging: the replacement is written to ``<out>.partial-<pid>`` beside `out`; the swap renames the old
folder to ``<out>.old-<pid>``, the new one into place, then deletes the old one. Each of these folders
holds a sentinel, ``.fsku-staging`` (JSON: role, target, host, pid namespace, pid, created), written
when the staging folder is made and into the old folder just before it is renamed aside; the sentinel
is removed from the folder that ends up as `out`, so it never reaches a KB, a model or a bundle. A
later run clears such leftovers of a run that stopped only when the sentinel proves them: it names
this role and this target, was written on this host (and pid namespace) by a process that has ended,
and (an old folder) the folder also holds one of the markers. A folder merely named like a leftover
(a user's ``kb.old-1``), or one written on another host or container, is left alone.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import platform
import shutil
import time
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
    except (OverflowError, ValueError):  # no such pid can exist: not ours to judge, so kept
        return True
    return True


# ---------------------------------------------------------------- sentinels of staging and set-aside folders

SENTINEL = ".fsku-staging"  # in every staging (`partial`) and set-aside (`old`) folder; never in a finished one


def _pid_namespace() -> Optional[str]:
    # containers sharing a host name (--network host) still have their own pid numbers
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def sentinel(role: str, target: PathLike, pid: Optional[int] = None) -> dict:
    """The sentinel a `role` ("partial" or "old") folder of `target` gets from this process."""
    return {"role": role, "target": str(target), "host": platform.node(), "pidns": _pid_namespace(),
            "pid": os.getpid() if pid is None else pid, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _write_sentinel(folder: Path, role: str, target: Path) -> None:
    (folder / SENTINEL).write_text(json.dumps(sentinel(role, target)), encoding="utf-8")


def _drop_sentinel(folder: Path) -> None:
    (folder / SENTINEL).unlink(missing_ok=True)


def _read_sentinel(folder: Path) -> Optional[dict]:
    try:
        data = json.loads((folder / SENTINEL).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _why_kept(path: Path, kind: str, target: Path, markers: Sequence[Marker]) -> Optional[str]:
    """Why `path`, named <target>.<kind>-<pid>, is not a leftover of ours that may go (None: it may):
    its sentinel must name this role and target, come from this host and pid namespace and from a
    process that has ended (or this one); an `old` folder must also hold a marker."""
    pid = path.name.rsplit("-", 1)[-1]
    if not pid.isdigit() or path.is_symlink() or not path.is_dir():
        return "not a folder named <out>.<kind>-<pid>"
    info = _read_sentinel(path)
    if info is None or info.get("role") != kind or info.get("target") != str(target) or info.get("pid") != int(pid):
        return f"no {SENTINEL} naming it the {kind} folder of {target}"
    if info.get("host") != platform.node() or info.get("pidns") != _pid_namespace():
        return (f"written by process {info.get('pid')} on host {info.get('host')!r} (pid namespace {info.get('pidns')}), "
                "whose state cannot be seen from here")
    if int(pid) != os.getpid() and _alive(int(pid)):
        return f"process {pid} is still running"
    if kind == "old" and not is_ours(path, markers):
        return f"holds none of {', '.join(map(str, markers))}"
    return None


def _leftovers(out: Path, kind: str, markers: Sequence[Marker]) -> Iterator[Path]:
    """Our staging (`partial`) or set-aside (`old`) folders beside `out` that a run which stopped
    left behind, proved by their sentinel; look-alikes are logged and left alone."""
    for path in sorted(out.parent.glob(f"{glob.escape(out.name)}.{kind}-*")):
        why = _why_kept(path, kind, out, markers)
        if why is None:
            yield path
        elif (path / SENTINEL).exists():
            log.info("leaving %s alone: %s", path, why)
        else:
            log.debug("leaving %s alone: %s", path, why)


def _clear_leftovers(out: Path, markers: Sequence[Marker]) -> None:
    for old in _leftovers(out, "old", markers):
        if not out.exists() and not out.is_symlink():
            # a crash between the two renames of a swap: the previous folder goes back where it was
            log.warning("restoring %s from %s (an earlier run stopped while replacing it)", out, old)
            old.rename(out)
            _drop_sentinel(out)
        else:
            log.info("removing %s, set aside by an earlier run that stopped", old)
            shutil.rmtree(old, ignore_errors=True)
    for partial in _leftovers(out, "partial", markers):
        log.info("removing %s, left by an earlier run that stopped", partial)
        shutil.rmtree(partial, ignore_errors=True)


def staging_path(out: PathLike) -> Path:
    """Where this process builds the replacement of `out`: <out>.partial-<pid>, beside it."""
    out = _target(out)
    return out.with_name(f"{out.name}.partial-{os.getpid()}")


def begin_staging(out: PathLike, markers: Sequence[MarkerLike], what: str = "output folder") -> Path:
    """Check that `out` may be replaced, clear our own leftovers beside it, and return a new staging
    folder (holding only its sentinel) to write the replacement into; then call replace_folder, or
    discard_staging on an error."""
    ms, target = _markers(markers), _target(out)
    check_replaceable(target, ms, what)
    _clear_leftovers(target, ms)
    staging = staging_path(target)
    try:
        staging.mkdir(parents=True)
    except FileExistsError:
        raise OutputRefused(f"{staging} is in the way of the staging folder for {what} {out} and holds no {SENTINEL} of "
                            "this process: move it away") from None
    _write_sentinel(staging, "partial", target)
    return staging


def discard_staging(staging: PathLike) -> None:
    """Delete a staging folder begin_staging made (after an error): only when its sentinel is this
    process' (so a folder that was swapped in meanwhile, or another's, stays)."""
    staging = Path(staging)
    info = _read_sentinel(staging)
    if info and info.get("role") == "partial" and info.get("pid") == os.getpid() \
            and info.get("host") == platform.node() and staging.name.endswith(f".partial-{os.getpid()}"):
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(staging: PathLike, out: PathLike, markers: Sequence[MarkerLike], what: str = "output folder") -> Path:
    """Swap the finished `staging` folder in as `out`: the old folder is renamed aside, the new one
    renamed into place, then the old one deleted, so a crash leaves one of the two (each with a
    sentinel saying what it is, for the next run to clean up). The sentinel does not stay in `out`.
    Refuses (again: it may have changed meanwhile) an `out` check_replaceable refuses. Returns `out`."""
    ms, staging, target = _markers(markers), Path(staging), _target(out)
    if not is_ours(staging, ms):
        # the next run would refuse to replace what this one wrote
        raise ValueError(f"{staging}: holds none of {', '.join(map(str, ms))}; write the marker before replacing {out}")
    check_replaceable(target, ms, what)
    if target.exists():
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        if old.exists() or old.is_symlink():
            why = _why_kept(old, "old", target, ms)
            if why:
                raise OutputRefused(f"{old} is in the way of replacing {what} {out} and is not a folder fsku set aside "
                                    f"({why}): move it away")
            shutil.rmtree(old)  # an earlier swap in this process that failed
        _write_sentinel(target, "old", target)  # so a run after a crash here knows what it is
        try:
            target.rename(old)
        except BaseException:
            _drop_sentinel(target)
            raise
        try:
            staging.rename(target)
        except BaseException:
            old.rename(target)
            _drop_sentinel(target)
            raise
        _drop_sentinel(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
        _drop_sentinel(target)
    return Path(out)


@contextlib.contextmanager
def staged_folder(out: PathLike, markers: Sequence[MarkerLike], what: str = "output folder") -> Iterator[Path]:
    """``with staged_folder(out, markers) as tmp:`` write into `tmp` (including a marker); on success it
    replaces `out` whole, on an error it is removed and `out` stays as it was."""
    staging = begin_staging(out, markers, what)
    try:
        yield staging
        replace_folder(staging, out, markers, what)
    except BaseException:
        discard_staging(staging)
        raise


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
