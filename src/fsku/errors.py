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
    return logging.DEBUG if os.environ.get("FSKU_DEBUG", "").strip().lower() not in ("", "0", "false") else logging.INFO
