#!/usr/bin/env python
"""Mutation check of the distillation wiring: do the tests notice when the wiring is wrong?

For each deliberately wrong variant below, the project's src/ and tests/ (with pyproject.toml and the
small input folders the tests read) are copied to a temporary directory, the variant is applied there
by a textual replacement of the exact source text it targets, and pytest runs the relevant tests
against the copy (PYTHONPATH=<tmp>/src, so the mutated copy is imported instead of the editable
install; checked from inside the pytest process itself). Each variant is reported as

    CAUGHT    the tests failed (pytest exit status 1)
    SURVIVED  the tests passed: the net has a hole
    ERROR     pytest could not run the tests (collection/usage error): not a clean catch

An unmutated run comes first; it must pass, or nothing else means anything. The exit status is 0 only
when the baseline passes and every variant is CAUGHT.

Each mutation is a small function that finds its target by a regular expression anywhere under src/
(code moves: LOSS_TYPES lives in fsku/choices.py today, in fsku/distill/losses.py before) and fails
loudly, naming the pattern, when it finds none or more than one: a mutation that silently applies to
nothing would report a SURVIVED that means nothing, or worse, a baseline pass as a catch.

    .venv/bin/python tools/mutation_check.py            # baseline + all variants
    .venv/bin/python tools/mutation_check.py --list     # what would be mutated, and where
    .venv/bin/python tools/mutation_check.py kd_reverse_kl --keep   # one variant, keep its tmp copy
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
COPY_DIRS = ("src", "tests", "data", "evaluation")  # copied (small); tests read data/ and evaluation/
LINK_DIRS = ("models",)  # large and read-only: symlinked
COPY_FILES = ("pyproject.toml", "conftest.py", "pytest.ini", "setup.cfg", "tox.ini")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")

# The tests that guard the wiring. Whole test_distill.py is not run: its pipeline tests take long and
# depend on far more than the wiring (and a pipeline failure would read as a catch).
LOSS_TESTS = [
    "tests/test_distill_losses.py",
    "tests/test_distill.py::test_trainer_loss_matches_naive_loops",
    "tests/test_distill.py::test_windowed_loss_equals_the_full_width_loss",
    "tests/test_distill.py::test_topk_teacher_matches_online_when_k_covers_the_mass",
    "tests/test_distill.py::test_baselines_train",
]
ALPHA_TESTS = [
    "tests/test_distill.py::test_trainer_applies_the_adapted_alpha_after_its_reference_steps",
    "tests/test_distill.py::test_adaptive_alpha_sets_a_reference_then_adapts",
]
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}

PROBE = '''"""pytest plugin of tools/mutation_check.py: records which fsku this pytest process imports."""
import os


def pytest_sessionfinish(session, exitstatus):
    import fsku
    import fsku.distill.losses
    import fsku.distill.trainer

    with open(os.environ["FSKU_MUTATION_PROBE"], "w", encoding="utf-8") as fh:
        for mod in (fsku, fsku.distill.losses, fsku.distill.trainer):
            fh.write(mod.__file__ + "\\n")
'''


class MutationError(RuntimeError):
    """A mutation could not find (exactly one of) its target: update the pattern to the moved code."""


# ----------------------------------------------------------------------------- locating source text

def _py_files(src: Path) -> list[Path]:
    return sorted(p for p in src.rglob("*.py") if "__pycache__" not in p.parts)


def _one_match(src: Path, pattern: re.Pattern, what: str, within: Callable[[str], list[tuple[int, int]]] | None = None
               ) -> tuple[Path, re.Match]:
    """The single match of `pattern` in all of src/ (optionally only inside the spans `within` gives)."""
    hits = []
    for path in _py_files(src):
        text = path.read_text(encoding="utf-8")
        spans = within(text) if within else [(0, len(text))]
        for start, end in spans:
            for m in pattern.finditer(text, start, end):
                hits.append((path, m))
    if len(hits) != 1:
        where = ", ".join(f"{p.relative_to(src.parent)}:{p.read_text(encoding='utf-8').count(chr(10), 0, m.start()) + 1}"
                          for p, m in hits) or "nowhere"
        raise MutationError(f"{what}: pattern {pattern.pattern!r} must match exactly once under src/, "
                            f"matched {len(hits)} times ({where}); the code moved: update tools/mutation_check.py")
    return hits[0]


def _replace(path: Path, start: int, end: int, new: str) -> str:
    text = path.read_text(encoding="utf-8")
    old = text[start:end]
    path.write_text(text[:start] + new + text[end:], encoding="utf-8")
    line = text.count("\n", 0, start) + 1
    return f"{path.as_posix().split('/src/', 1)[-1]}:{line}: {old.strip()!r} -> {new.strip()!r}"


def _call_spans(name: str) -> Callable[[str], list[tuple[int, int]]]:
    """Spans of the argument lists of every call `name(...)` (not its def), parentheses balanced."""
    opener = re.compile(rf"(?<!def )\b{re.escape(name)}\(")

    def spans(text: str) -> list[tuple[int, int]]:
        out = []
        for m in opener.finditer(text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            out.append((m.end(), i - 1))
        return out

    return spans


def _loss_table_entry(loss_type: str, side: str, right: str, wrong: str) -> Callable[[Path], str]:
    """In LOSS_TYPES (wherever it lives), the `side` divergence of `loss_type`: `right` -> `wrong`.
    Matches LossSpec("a", "b", ...) and LossSpec(chosen="a", rejected="b", ...)."""
    q = r"""["']"""
    arg = rf"(?:{q}\w+{q}|None)"
    if side == "chosen":
        pat = rf"{q}{loss_type}{q}\s*:\s*\w*LossSpec\(\s*(?:chosen\s*=\s*)?(?P<target>{q}{right}{q})"
    else:
        pat = (rf"{q}{loss_type}{q}\s*:\s*\w*LossSpec\(\s*(?:chosen\s*=\s*)?{arg}\s*,\s*(?:rejected\s*=\s*)?"
               rf"(?P<target>{q}{right}{q})")
    pattern = re.compile(pat)

    def mutate(src: Path) -> str:
        path, m = _one_match(src, pattern, f"LOSS_TYPES[{loss_type!r}].{side}")
        return _replace(path, m.start("target"), m.end("target"), f'"{wrong}"')

    return mutate


def gkd_ignores_jsd_weight(src: Path) -> str:
    """The generalised-JSD dispatch ignores its weight argument and uses the usual 0.5 instead."""
    pattern = re.compile(r"(?<!def )\bgeneralized_jsd\((?P<keep>[^()\n]*?)(?P<drop>,\s*(?:weight\s*=\s*)?\w+(?:\.\w+)*)\s*\)")
    path, m = _one_match(src, pattern, "the generalized_jsd call that passes the JSD weight")
    if m.group("keep").count(",") != 1:  # (log_p, log_q, weight): two kept arguments
        raise MutationError(f"generalized_jsd call {m.group(0)!r} does not look like (log_p, log_q, weight)")
    return _replace(path, m.start("drop"), m.end("drop"), ", 0.5")


def trainer_ignores_adapted_alpha(src: Path) -> str:
    """The trainer computes (and logs) the adapted alpha but passes the base alpha to the loss."""
    q = r"""["']"""
    positional = re.compile(rf"(?P<target>(?P<d>\w*alpha\w*)\[\s*{q}chosen{q}\s*\]\s*,\s*(?P=d)\[\s*{q}rejected{q}\s*\])")
    keyword = re.compile(r"(?P<target>alpha_chosen\s*=\s*[^,()]+(?:\[[^\]]*\])?\s*,\s*alpha_rejected\s*=\s*[^,()]+"
                         r"(?:\[[^\]]*\])?)")
    spans = _call_spans("distillation_loss")
    errors = []
    for pattern, new in ((positional, "self.loss_settings.alpha, self.loss_settings.alpha"),
                         (keyword, "alpha_chosen=self.loss_settings.alpha, alpha_rejected=self.loss_settings.alpha")):
        try:
            path, m = _one_match(src, pattern, "the alphas passed to distillation_loss", within=spans)
        except MutationError as exc:
            errors.append(str(exc))
            continue
        if "trainer" not in path.name and "class DistillTrainer" not in path.read_text(encoding="utf-8"):
            raise MutationError(f"the distillation_loss call with per-side alphas is in {path}, not in the trainer")
        return _replace(path, m.start("target"), m.end("target"), new)
    raise MutationError("; ".join(errors))


@dataclass(frozen=True)
class Variant:
    name: str
    help: str
    mutate: Callable[[Path], str]
    tests: tuple[str, ...]


VARIANTS = [
    Variant("kd_reverse_kl", "kd wired to reverse KL", _loss_table_entry("kd", "chosen", "forward_kl", "reverse_kl"),
            tuple(LOSS_TESTS)),
    Variant("rkl_forward_kl", "rkl wired to forward KL", _loss_table_entry("rkl", "rejected", "reverse_kl", "forward_kl"),
            tuple(LOSS_TESTS)),
    Variant("gkd_no_jsd_weight", "gkd ignores its JSD weight", gkd_ignores_jsd_weight, tuple(LOSS_TESTS)),
    Variant("trainer_base_alpha", "the trainer never applies the adapted alpha", trainer_ignores_adapted_alpha,
            tuple(ALPHA_TESTS)),
]
BASELINE_TESTS = tuple(dict.fromkeys(t for v in VARIANTS for t in v.tests))


# ----------------------------------------------------------------------------- running

def make_copy(base: Path) -> Path:
    work = base / "project"
    work.mkdir()
    for name in COPY_DIRS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, work / name, ignore=IGNORE, symlinks=True)
    for name in LINK_DIRS:
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name, target_is_directory=True)
    for name in COPY_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, work / name)
    probe_dir = base / "probe"
    probe_dir.mkdir()
    (probe_dir / "_fsku_mutation_probe.py").write_text(PROBE, encoding="utf-8")
    return work


def run_env(base: Path, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    env.update(ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(work / "src"), str(base / "probe")])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["FSKU_MUTATION_PROBE"] = str(base / "probe" / "imported.txt")
    return env


def check_import(work: Path, env: dict[str, str]) -> str:
    """fsku as a fresh interpreter with this environment imports it (must be the copy)."""
    out = subprocess.run([sys.executable, "-c", "import fsku; print(fsku.__file__)"], cwd=work, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to((work / "src").resolve()):
        raise RuntimeError(f"PYTHONPATH={env['PYTHONPATH']} still imports fsku from {out}, not the copy")
    return out


@dataclass
class Outcome:
    status: str
    rc: int
    seconds: float
    failed: list[str]
    tail: str


def run_tests(base: Path, work: Path, tests: tuple[str, ...], timeout: int) -> Outcome:
    env = run_env(base, work)
    check_import(work, env)
    probe = Path(env["FSKU_MUTATION_PROBE"])
    probe.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-p", "_fsku_mutation_probe",
           "--basetemp", str(base / "pytest-tmp"), *tests]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Outcome("ERROR", -1, time.monotonic() - t0, [], f"pytest ran past {timeout}s")
    seconds = time.monotonic() - t0
    output = proc.stdout + proc.stderr
    tail = "\n".join(output.strip().splitlines()[-15:])
    if not probe.exists():
        return Outcome("ERROR", proc.returncode, seconds, [], "the import probe did not report\n" + tail)
    for line in probe.read_text(encoding="utf-8").splitlines():
        if not Path(line).resolve().is_relative_to((work / "src").resolve()):
            raise RuntimeError(f"the pytest run imported {line}, not the mutated copy under {work / 'src'}")
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in output.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    status = {0: "PASSED", 1: "CAUGHT"}.get(proc.returncode, "ERROR")
    return Outcome(status, proc.returncode, seconds, failed, tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*", help=f"variants to run (default: all): {', '.join(v.name for v in VARIANTS)}")
    ap.add_argument("--list", action="store_true", help="apply each mutation to a scratch copy and show where; run nothing")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies (their paths are printed)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = ap.parse_args(argv)
    by_name = {v.name: v for v in VARIANTS}
    unknown = [n for n in args.variants if n not in by_name]
    if unknown:
        ap.error(f"unknown variants {unknown}; expected some of {sorted(by_name)}")
    chosen = [by_name[n] for n in args.variants] or VARIANTS

    tmp = Path(tempfile.mkdtemp(prefix="fsku-mutation-"))
    try:
        # locate every target first: a moved pattern fails here, before minutes of test runs
        located = {}
        for v in chosen:
            scratch = tmp / f"locate-{v.name}"
            scratch.mkdir()
            shutil.copytree(ROOT / "src", scratch / "src", ignore=IGNORE)
            located[v.name] = v.mutate(scratch / "src")
            shutil.rmtree(scratch)
        for v in chosen:
            print(f"{v.name:20s} {v.help}\n{'':20s} {located[v.name]}")
        if args.list:
            return 0
        print()

        if not args.no_baseline:
            base = tmp / "baseline"
            base.mkdir()
            work = make_copy(base)
            tests = tuple(dict.fromkeys(t for v in chosen for t in v.tests))
            print(f"baseline: fsku imported from {check_import(work, run_env(base, work))}", flush=True)
            out = run_tests(base, work, tests, args.timeout)
            print(f"{'baseline':20s} {out.status:8s} (pytest rc {out.rc}, {out.seconds:.0f}s, {len(tests)} test selections)",
                  flush=True)
            if out.status != "PASSED":
                print("the unmutated tests must pass before a mutation can be judged:\n" + out.tail)
                return 2

        results = {}
        for v in chosen:
            base = tmp / v.name
            base.mkdir()
            work = make_copy(base)
            change = v.mutate(work / "src")
            out = run_tests(base, work, v.tests, args.timeout)
            status = "SURVIVED" if out.status == "PASSED" else out.status
            results[v.name] = status
            print(f"{v.name:20s} {status:8s} (pytest rc {out.rc}, {out.seconds:.0f}s) {v.help}", flush=True)
            print(f"{'':20s} mutated {change}")
            for name in out.failed:
                print(f"{'':20s}   failed: {name}")
            if status == "ERROR":
                print("\n".join(f"{'':20s}   | {ln}" for ln in out.tail.splitlines()))
    finally:
        if args.keep:
            print(f"\ncopies kept under {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    bad = [n for n, s in results.items() if s != "CAUGHT"]
    print(f"\n{len(results) - len(bad)}/{len(results)} variants caught" + (f"; not caught: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
