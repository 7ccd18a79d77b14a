"""Thin step layer: config + file I/O + MLflow for each pipeline stage (one module per MLproject entry point).

Every module ``fsku.steps.<stage>`` (build_kb, synth_qa, distill, quantize, predict, evaluate, tune,
promote, package, main) has the same shape:

    run_step(cfg: <Stage>Config, progress: bool = True, **injected) -> dict
        the work: the stage's library call, its files and its MLflow run (`injected`: objects a caller
        already holds, e.g. a loaded LLM or KB, so tests and other steps need not load them again)
    main(argv: list[str] | None = None) -> int
        parse_step_args (one --field-name flag per config field, --recipe, --no-progress) and
        config_from_namespace from steps.args, run_step, a printed summary; exit 2 with "error: ..."
        on the errors in STEP_ERRORS

so each runs as ``python -m fsku.steps.<stage> [--recipe FILE.yaml] [--field-name VALUE ...] [--no-progress]``
(the MLproject entry points) and as ``fsku <stage-name> ...`` (fsku.cli dispatches to its main).
"""
import csv

# expected failures of a command (bad input or files, exhausted limits): one "error: ..." line and exit 2.
# OSError covers FileNotFoundError, IsADirectoryError, PermissionError; UnicodeError is a ValueError, named
# for the reader; csv.Error and OverflowError come from malformed or huge inputs
STEP_ERRORS = (ValueError, UnicodeError, OSError, csv.Error, OverflowError, RuntimeError)


def error_line(exc: BaseException) -> str:
    """One line for an expected error: its message (its type when it has none), newlines folded."""
    text = " ".join(str(exc).split("\n")).strip()
    return f"error: {text or type(exc).__name__}"
