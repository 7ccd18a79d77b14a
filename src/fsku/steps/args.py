"""CLI flags for a stage config, derived from its dataclass: one ``--field-name`` per field (also
spelt ``--field_name``, which is how MLflow forwards a ``-P`` parameter the entry point does not
declare), help text and default from the field, plus ``--recipe``.

Values on the command line (and MLflow parameters, which are always strings):
- an empty string means "not given": the recipe's value, else the dataclass default, applies (so
  MLproject's `recipe` parameter defaults to "");
- ``none`` gives None to a field whose type is Optional (for example ``kb=none``: no retrieval);
- integers accept ``10`` or ``10.0`` (MLflow float parameters) but not ``10.5``; booleans accept
  true/false, yes/no, 1/0, and a boolean flag given alone (``--restart``) means true.

Commands that take only some fields of a config (``fsku ingest``: BuildKBConfig's per-file caps)
pass ``only=`` to both ``add_config_args`` and ``config_from_namespace``, and ``recipe=False`` where
a recipe makes no sense.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Iterable, Optional

from ..config import config_from_dict, field_kind, load_recipe
from ..errors import STEP_ERRORS, configure_logging, print_error

NONE_STRINGS = ("none", "None", "null")


def convert(kind: type, optional: bool, value: str) -> Any:
    """A command-line string -> the field's value (None: not given)."""
    if value == "":
        return None
    if optional and value in NONE_STRINGS:
        return dataclasses.MISSING  # an explicit None, told apart from "not given"
    if kind is bool:
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    if kind is int:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}")
        return int(number)
    if kind is float:
        try:
            return float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    return value


def _converter(kind: type, optional: bool):
    def parse(value: str):
        return convert(kind, optional, value)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _selected(cls, only: Optional[Iterable[str]], skip: Iterable[str] = ()) -> list[dataclasses.Field]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if only is None:
        return [f for f in fields.values() if f.name not in skip]
    only = tuple(only)
    unknown = sorted(set(only) - set(fields))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {unknown}")
    return [fields[name] for name in only if name not in skip]


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                    only: Optional[Iterable[str]] = None, recipe: bool = True) -> argparse.ArgumentParser:
    """One flag per field of `cls` (only those named in `only`, if given; none named in `skip`),
    plus ``--recipe`` unless `recipe` is false. Every flag defaults to None: "not given"."""
    if recipe and not any(a.dest == "recipe" for a in parser._actions):
        parser.add_argument("--recipe", default=None,
                            help=f"experiments/<name>/<stage>.yaml for {cls.__name__}; flags override it ('' = none)")
    for f in _selected(cls, only, skip):
        kind, optional = field_kind(cls, f.name)
        flags = ["--" + f.name.replace("_", "-")] + (["--" + f.name] if "_" in f.name else [])
        alone = {"nargs": "?", "const": True} if kind is bool else {}  # `--restart` alone = `--restart true`
        parser.add_argument(*flags, dest=f.name, type=_converter(kind, optional), default=None,
                            metavar=kind.__name__.upper(),
                            help=f.metadata.get("help", "") + f" (default: {f.default})", **alone)
    return parser


def config_from_namespace(args: argparse.Namespace, cls, only: Optional[Iterable[str]] = None) -> Any:
    """The config: dataclass defaults, then the recipe (if any), then the flags that were given
    (of the fields named in `only`, if given: other attributes of `args` are the command's own)."""
    given: dict[str, Optional[Any]] = {}
    for f in _selected(cls, only):
        value = getattr(args, f.name, None)
        if value is dataclasses.MISSING:
            given[f.name] = None
        elif value is not None:
            given[f.name] = value
    recipe = getattr(args, "recipe", None)
    if recipe:
        return load_recipe(recipe, given, expected=cls)
    return config_from_dict(cls, given, "command line")


def parse_step_args(argv: list[str] | None, cls, prog: str, doc: str | None, progress_flag: bool = False
                    ) -> argparse.Namespace:
    """What every step's `main` starts with: one flag per `cls` field (+ --recipe), optionally
    --no-progress, and --verbose, parsed from `argv`; then logging (INFO for fsku, third-party
    libraries quiet unless --verbose)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if progress_flag:
        p.add_argument("--no-progress", "--no_progress", nargs="?", const=True, default=False,
                       type=_converter(bool, False), metavar="BOOL", help="no progress bars (default: shown)")
    p.add_argument("--verbose", nargs="?", const=True, default=False, type=_converter(bool, False), metavar="BOOL",
                   help="also show third-party libraries' log messages and warnings (default: errors only)")
    add_config_args(p, cls)
    args = p.parse_args(argv)
    configure_logging(verbose=bool(args.verbose))
    return args


def step_main(argv: list[str] | None, cls, prog: str, doc: str | None, run_step: Callable[..., dict],
              report: Callable[[Any, dict], Iterable[str]]) -> int:
    """The `main` of every step: flags -> config -> ``run_step(cfg, progress=...)`` -> the lines of
    ``report(cfg, result)`` on stdout, 0; an expected error (bad input, missing file) -> "error: ..."
    on stderr, 2, no traceback (logged at DEBUG)."""
    a = parse_step_args(argv, cls, prog, doc, progress_flag=True)
    try:
        cfg = config_from_namespace(a, cls)
        result = run_step(cfg, progress=not a.no_progress)
    except STEP_ERRORS as exc:
        return print_error(exc)
    for line in report(cfg, result):
        print(line)
    return 0
