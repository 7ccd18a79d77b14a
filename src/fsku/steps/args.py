"""CLI flags for a stage config: one ``--field-name`` per dataclass field (help text from the
field's metadata), plus ``--recipe``. MLflow passes every parameter as a string ('320.0' for
floats, 'none' for unset), so conversions are lenient."""
from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any, Optional

from ..config import config_from_dict, load_recipe

NONE_STRINGS = ("", "none", "None")


def _kind(f: dataclasses.Field):
    if isinstance(f.default, bool):
        return bool
    if isinstance(f.default, int):
        return int
    if isinstance(f.default, float):
        return float
    return str


def lenient(kind):
    def convert(value: str):
        if value in NONE_STRINGS and kind is not str:
            return None
        if kind is bool:
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")
        if kind is int:
            return int(float(value))
        return kind(value)
    convert.__name__ = kind.__name__
    return convert


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    if not any(a.dest == "recipe" for a in parser._actions):
        parser.add_argument("--recipe", help=f"experiments/<name>/<stage>.yaml for {cls.__name__}; flags override it")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=lenient(_kind(f)), default=None,
                            help=f.metadata.get("help", "") + f" (default: {f.default})")
    return parser


def config_from_namespace(args: argparse.Namespace, cls, optional_str: tuple[str, ...] = ()) -> Any:
    values: dict[str, Optional[Any]] = {}
    for f in dataclasses.fields(cls):
        if not hasattr(args, f.name):
            continue
        v = getattr(args, f.name)
        if f.name in optional_str and v in NONE_STRINGS:
            v = ""
        values[f.name] = v
    given = {k: v for k, v in values.items() if v is not None}
    if getattr(args, "recipe", None):
        return load_recipe(args.recipe, given)
    return config_from_dict(cls, given, "command line")


def parse_step_args(argv: list[str] | None, cls, prog: str, doc: str | None, progress_flag: bool = False
                    ) -> argparse.Namespace:
    """What every step's `main` starts with: INFO logging, one flag per `cls` field (+ --recipe),
    optionally --no-progress (MLflow entry points pass it), parsed from `argv`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if progress_flag:
        p.add_argument("--no-progress", action="store_true", help="no progress bars (MLflow entry points)")
    add_config_args(p, cls)
    return p.parse_args(argv)
