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
# the expected errors live on the ground floor (the bundle's inference.py uses them, without fsku.steps)
from ..errors import STEP_ERRORS, error_line, print_error  # noqa: F401  (re-exported)
