"""Throughput of `fsku predict` and the projected time for the competition's 515 questions.

    python benchmarks/bench_predict.py [--kb outputs/lawkb] [--real offline:qwen2.5-coder-1.5b-instruct] [--real-rows 30]

1. Writes a 515-row test.csv in the competition format (ID,Question; UTF-8 with BOM) from the FSKU
   dev questions (../shared; mcq_dev, descriptive_dev, retrieval_dev), cycled with fresh IDs, or from
   the project's own sample questions when ../shared is absent.
2. The tiny model (built from config) answers all 515 rows; the validator must accept the file.
3. The real CPU model answers the first --real-rows rows (the same MC/descriptive mix) with the
   default recipe (gated context, option rotations); the 515-question time is projected from its rate.
Caching is off, so repeated questions are really recomputed.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fsku.config import PredictConfig  # noqa: E402
from fsku.infer.predict import predict, validate_submission  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "fsku-benchmark"


def source_questions() -> list[str]:
    if DATA.exists():
        qs = list(pd.read_csv(DATA / "mcq_dev.csv").Question)
        qs += [json.loads(x)["question"] for x in (DATA / "retrieval_dev.jsonl").read_text(encoding="utf-8").splitlines()
               if x.strip()]
        qs += list(pd.read_csv(DATA / "descriptive_dev.csv").Question)
        return qs
    return list(pd.read_csv(ROOT / "evaluation" / "sample_test.csv", encoding="utf-8-sig").Question)


def write_test(path: Path, n: int = 515) -> Path:
    qs = source_questions()
    # interleave so that any prefix has the overall MC/descriptive mix
    mc = [q for q in qs if "\n1 " in q]
    desc = [q for q in qs if "\n1 " not in q]
    order, i, j = [], 0, 0
    while len(order) < n:
        if j * len(mc) <= i * len(desc) or not mc:
            order.append(desc[j % len(desc)]); j += 1  # noqa: E702
        else:
            order.append(mc[i % len(mc)]); i += 1  # noqa: E702
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8-sig", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["ID", "Question"])
        w.writerows([(f"TEST_{k:03d}", q) for k, q in enumerate(order)])
    return path


def run(model: str, kb: str, test: Path, out: Path, **kw) -> dict:
    cfg = PredictConfig(model=model, kb=kb, cache_dir="", **kw)
    t0 = time.perf_counter()
    res = predict(cfg, test, out, restart=True, progress=True)
    wall = time.perf_counter() - t0
    problems = [p for p in validate_submission(out, test) if not p.startswith("warning:")]
    n = res.stats["questions"]
    qps = n / res.stats["run_s"]
    return {"model": model, "rows": n, "load_s": res.stats["load_s"], "answer_s": res.stats["run_s"], "wall_s": wall,
            "q_per_s": qps, "projected_515_min": (res.stats["load_s"] + 515 / qps) / 60, "valid": not problems,
            "fallback": res.stats["fallback"], "context_rate": sum(r["n_context"] > 0 for r in res.records) / n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kb", default=str(ROOT / "outputs" / "lawkb"))
    ap.add_argument("--real", default="offline:qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--real-rows", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_predict")
    a = ap.parse_args()
    if not Path(a.kb, "manifest.json").exists():
        print(f"KB {a.kb} not found: build it first (fsku build-kb --corpus ../shared/data/law-pdf --out {a.kb})")
        return 1
    test = write_test(a.out / "test515.csv")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from fsku.llm.tiny import make_tiny_pair

        tiny = make_tiny_pair(tmp)["teacher"]
        rows.append(run(str(tiny), a.kb, test, a.out / "submission_tiny.csv", max_new_tokens=32))
    real_model_dir = ROOT / "models" / a.real.split(":", 1)[-1]
    if a.real.startswith("offline:") and not (real_model_dir / "config.json").exists():
        print(f"skipping the real model: {real_model_dir} absent (make llm-models)")
    else:
        sub = a.out / f"test{a.real_rows}.csv"
        df = pd.read_csv(test, encoding="utf-8-sig").head(a.real_rows)
        df.to_csv(sub, index=False, encoding="utf-8-sig")
        rows.append(run(a.real, a.kb, sub, a.out / "submission_real.csv"))
    print(f"\npredict throughput (test file {test}, 515 rows; KB {a.kb}; cache off)")
    print(f"{'model':<45}{'rows':>6}{'load s':>9}{'q/s':>9}{'s/q':>8}{'proj. 515 min':>15}{'valid':>7}"
          f"{'ctx rate':>10}{'fallback':>10}")
    for r in rows:
        print(f"{Path(r['model']).name:<45}{r['rows']:>6}{r['load_s']:>9.1f}{r['q_per_s']:>9.3f}{1 / r['q_per_s']:>8.2f}"
              f"{r['projected_515_min']:>15.1f}{str(r['valid']):>7}{r['context_rate']:>10.2f}{r['fallback']:>10}")
    (a.out / "summary.json").write_text(json.dumps(rows, indent=2))
    return 0 if all(r["valid"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
