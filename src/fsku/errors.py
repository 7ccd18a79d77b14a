"""The expected failures of a command and how they are shown: one ``error: ...`` line on stderr and
exit status 2, never a traceback. Ground floor and standard library only, so that every entry point
uses it: the CLI, the pipeline steps and the submission bundle's inference.py (whose code folder
carries no fsku.steps).

The traceback is still there for whoever needs it: it is logged at DEBUG level (``FSKU_DEBUG=1``
sets the entry points' logging to DEBUG: `log_level`)."""
from __future__ import annotations

import csv
import logging
import os
import sys
import warnings

log = logging.getLogger(__name__)

# expected failures of a command (bad input or files, exhausted limits): one "error: ..." line and exit 2.
# OSError covers FileNotFoundError, IsADirectoryError, PermissionError; UnicodeError is a ValueError, named
# for the reader; csv.Error and OverflowError come from malformed or huge inputs
STEP_ERRORS = (ValueError, UnicodeError, OSError, csv.Error, OverflowError, RuntimeError)
EXIT_ERROR = 2


def error_line(exc: BaseException) -> str:
    """One line for an expected error: its message (its type when it has none), newlines folded."""
    text = " ".join(str(exc).split("\n")).strip()
    return f"error: {text or type(exc).__name__}"


def print_error(exc: BaseException, file=None) -> int:
    """Print `error_line(exc)` (stderr by default), log the traceback at DEBUG, and return the exit status 2."""
    log.debug("traceback of the error below", exc_info=exc)
    print(error_line(exc), file=file or sys.stderr)
    return EXIT_ERROR


def log_level() -> int:
    """The entry points' logging level: DEBUG when the environment sets FSKU_DEBUG (to anything but
    '', '0' or 'false'), else INFO."""
    return logging.DEBUG if _env_flag("FSKU_DEBUG") else logging.INFO


def _env_flag(name: str) -> bool:
    """An environment switch: set to anything but '', '0' or 'false'."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false")


# libraries whose INFO/WARNING chatter (kernel probes, deprecations, tokenizer notices) buries a step's own
# messages; their errors still show. A child is named where its parent's level is reset on import (torch)
THIRD_PARTY_LOGGERS = ("torch", "torch.utils._pytree", "torchao", "bitsandbytes", "transformers", "sentence_transformers",
                       "huggingface_hub", "accelerate", "peft", "faiss", "bm25s", "kiwipiepy", "llama_cpp", "httpx",
                       "urllib3", "numexpr", "onnxruntime", "optimum")
VERBOSE_ENV = "FSKU_VERBOSE"


def verbose_requested() -> bool:
    """FSKU_VERBOSE (anything but '', '0' or 'false') or FSKU_DEBUG: third-party logs are shown."""
    return _env_flag(VERBOSE_ENV) or _env_flag("FSKU_DEBUG")


def configure_logging(verbose: bool = False) -> None:
    """The entry points' logging: fsku's own messages at INFO (DEBUG with FSKU_DEBUG), third-party
    loggers and warnings only from ERROR unless `verbose` (the --verbose flag) or `verbose_requested()`."""
    logging.basicConfig(level=log_level(), format="%(levelname)s %(name)s: %(message)s")
    if verbose or verbose_requested():
        return
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        # warnings raised inside third-party code; fsku's own (module fsku.*) still show
        warnings.filterwarnings("ignore", category=category, module=r"^(?!fsku)")
