"""fsku submission: answer a test.csv into submission.csv with the bundled LLM and knowledge base.

    python inference.py --test test.csv --out submission.csv [--restart]

Offline: only files in this folder are read (HF_HUB_OFFLINE=1). Finished rows are appended to
<out>.partial.jsonl, so the same command after a crash resumes. Settings: settings.json.
"""
# This is fsku/package/inference.py, copied by `fsku package` into every bundle as inference.py. At
# module level it imports only the standard library: fsku comes from the bundle's code/ folder, put
# on sys.path (with the offline environment) by main() before the first fsku import.
import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test", required=True, help="test.csv (ID,Question)")
    ap.add_argument("--out", required=True, help="submission.csv to write (ID,Answer, UTF-8 with BOM)")
    ap.add_argument("--restart", action="store_true", help="discard partial results of an earlier run")
    ap.add_argument("--timing", help="write load/answer timings as JSON here")
    return ap.parse_args(argv)


def offline_environment(bundle: Path) -> None:
    """No hub access, the bundle's embedding models and the bundle's code first on sys.path."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["FSKU_MODELS_DIR"] = str(bundle / "models")
    code = str(bundle / "code")
    if code not in sys.path:
        sys.path.insert(0, code)


def main(argv=None, bundle: Path = HERE) -> int:
    """Answer --test into --out with the model, KB and settings.json of `bundle` (this file's folder).
    A bad test.csv, a missing file or too many unanswered questions: one ``error: ...`` line on stderr
    and exit 2 (the traceback is logged at DEBUG: FSKU_DEBUG=1)."""
    args = parse_args(argv)
    offline_environment(bundle)
    import logging

    from fsku.errors import STEP_ERRORS, log_level, print_error

    logging.basicConfig(level=log_level(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return answer(args, bundle)
    except STEP_ERRORS as exc:
        return print_error(exc)


def answer(args: argparse.Namespace, bundle: Path) -> int:
    test, out = Path(args.test).resolve(), Path(args.out).resolve()
    os.chdir(bundle)  # the KB refers to its embedding model by a bundle-relative path
    from fsku.config import InferConfig
    from fsku.infer.predict import outcome_lines, predict, validate_submission

    settings = json.loads((bundle / "settings.json").read_text(encoding="utf-8"))
    kb = str(bundle / "kb") if (bundle / "kb" / "manifest.json").exists() else None
    cfg = InferConfig(**{**settings, "model": str(bundle / "model"), "kb": kb, "cache_dir": ""})
    t0 = time.perf_counter()
    result = predict(cfg, test, out, restart=args.restart, progress=True, enforce=False)
    problems = [p for p in validate_submission(out, test) if not p.startswith("warning:")]
    if args.timing:
        Path(args.timing).write_text(json.dumps({**{k: v for k, v in result.stats.items() if isinstance(v, (int, float))},
                                                 "wall_s": time.perf_counter() - t0, "questions": len(result.records)}))
    if problems:
        print("invalid submission:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    print(f"wrote {out} ({len(result.records)} answers)")
    for line in outcome_lines(result.stats):
        print(line)
    if result.stats["unanswered_problem"]:
        raise RuntimeError(result.stats["unanswered_problem"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
