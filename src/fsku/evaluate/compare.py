"""Headline metrics with intervals, and paired comparison of two evaluations on the same questions.

Both work on per-question rows (dicts) as the evaluate step logs them (`per_question.json`: ID,
question_type, score, cosine, keyword_recall, inference_time) or as eval-retrieval writes them (qid,
first_relevant_rank). A metric name maps to the rows it averages, the column it reads and the test
that compares two systems on it: exact McNemar for right/wrong outcomes, a paired bootstrap for
scores, a paired bootstrap stratified by question type for the FSKU total (0.5 x MC accuracy + 0.5 x
descriptive score). Used by `fsku evaluate`, `fsku compare`, `promote`'s gate, `tune`'s held-out
check and the benchmarks.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .fsku_metric import MC_WEIGHT
from .stats import mcnemar_exact, metric_interval, paired_bootstrap, stratified_bootstrap_interval, weighted_total

FSKU_WEIGHTS = {"multiple_choice": MC_WEIGHT, "descriptive": 1 - MC_WEIGHT}
# the headline quality metrics of evaluate rows and of retrieval rows (reported with n and an interval)
EVALUATE_METRICS = ("fsku_score", "mc_accuracy", "descriptive_score", "descriptive_cosine", "descriptive_keyword_recall")
RETRIEVAL_METRICS = ("hit_at_1", "hit_at_5", "mrr_at_10")


@dataclass(frozen=True)
class MetricSpec:
    """How a headline metric comes from per-question rows: `value(row)` (None: the row does not count),
    `kind` "binary" (0/1: Wilson interval, McNemar), "score" (bootstrap) or "fsku" (stratified)."""

    value: Callable[[dict], Optional[float]]
    kind: str
    higher_is_better: bool = True


def _of_type(question_type: str, column: str) -> Callable[[dict], Optional[float]]:
    def value(row: dict) -> Optional[float]:
        v = row.get(column)
        return None if row.get("question_type") != question_type or _missing(v) else float(v)
    return value


def _column(column: str) -> Callable[[dict], Optional[float]]:
    def value(row: dict) -> Optional[float]:
        v = row.get(column)
        return None if _missing(v) else float(v)
    return value


def _hit_at(k: int) -> Callable[[dict], Optional[float]]:
    def value(row: dict) -> Optional[float]:
        if "first_relevant_rank" not in row:  # not a retrieval row
            return None
        rank = row["first_relevant_rank"]
        return float(not _missing(rank) and int(rank) <= k)
    return value


def _reciprocal_rank(k: int) -> Callable[[dict], Optional[float]]:
    def value(row: dict) -> Optional[float]:
        if "first_relevant_rank" not in row:
            return None
        rank = row["first_relevant_rank"]
        return 1.0 / int(rank) if not _missing(rank) and int(rank) <= k else 0.0
    return value


def row_key(row: dict):
    """A row's ID, or its qid when it has no ID (None when it has neither)."""
    return next((row[k] for k in ("ID", "qid") if k in row and not _missing(row[k])), None)


def _missing(v) -> bool:
    return v is None or v == "" or (isinstance(v, float) and math.isnan(v))


METRICS: dict[str, MetricSpec] = {
    "mc_accuracy": MetricSpec(_of_type("multiple_choice", "score"), "binary"),
    "descriptive_score": MetricSpec(_of_type("descriptive", "score"), "score"),
    "descriptive_cosine": MetricSpec(_of_type("descriptive", "cosine"), "score"),
    "descriptive_keyword_recall": MetricSpec(_of_type("descriptive", "keyword_recall"), "score"),
    "fsku_score": MetricSpec(_column("score"), "fsku"),
    "latency_mean_s": MetricSpec(_column("inference_time"), "score", higher_is_better=False),
}


def metric_spec(metric: str) -> MetricSpec:
    """The spec of `metric`: one of METRICS, or hit_at_<k> / mrr_at_<k> on retrieval rows."""
    if metric in METRICS:
        return METRICS[metric]
    found = re.fullmatch(r"(hit|mrr)_at_([1-9][0-9]*)", metric)
    if found:
        k = int(found.group(2))
        return MetricSpec(_hit_at(k), "binary") if found.group(1) == "hit" else MetricSpec(_reciprocal_rank(k), "score")
    raise ValueError(f"no per-question form of metric {metric!r}; known: {', '.join(sorted(METRICS))}, "
                     "hit_at_<k>, mrr_at_<k>")


def _values(rows: Sequence[dict], spec: MetricSpec) -> tuple[list[str], list[float], list[str]]:
    ids, vals, types = [], [], []
    for row in rows:
        v = spec.value(row)
        if v is not None:
            ids.append(str(row_key(row)))
            vals.append(v)
            types.append(str(row.get("question_type", "")))
    return ids, vals, types


def interval(rows: Sequence[dict], metric: str, seed: int = 0) -> dict:
    """{"value", "n", "low", "high", "method"} of `metric` over `rows` (95 %, fixed seed)."""
    spec = metric_spec(metric)
    _, vals, types = _values(rows, spec)
    if spec.kind == "fsku":
        low, high = stratified_bootstrap_interval(vals, types, FSKU_WEIGHTS, seed=seed) if vals else (math.nan, math.nan)
        value = weighted_total(vals, types, FSKU_WEIGHTS) if vals else math.nan
        return {"value": value, "n": len(vals), "low": low, "high": high, "method": "stratified bootstrap"}
    return metric_interval(vals, "wilson" if spec.kind == "binary" else "bootstrap", seed=seed)


def intervals(rows: Sequence[dict], metrics: Sequence[str], seed: int = 0) -> dict[str, dict]:
    """`interval` of each metric that has at least one row."""
    out = {}
    for m in metrics:
        got = interval(rows, m, seed=seed)
        if got["n"]:
            out[m] = got
    return out


def interval_metrics(found: dict[str, dict]) -> dict[str, float]:
    """Flat MLflow metrics `<metric>_ci95_low`, `<metric>_ci95_high`, `<metric>_n` of `intervals`."""
    flat = {}
    for m, iv in found.items():
        flat.update({f"{m}_ci95_low": iv["low"], f"{m}_ci95_high": iv["high"], f"{m}_n": iv["n"]})
    return flat


def format_interval(iv: dict, digits: int = 3) -> str:
    return f"{iv['value']:.{digits}f} [{iv['low']:.{digits}f}, {iv['high']:.{digits}f}] (n={iv['n']})"


def paired(a_rows: Sequence[dict], b_rows: Sequence[dict], metric: str, seed: int = 0) -> dict:
    """Compare system A with system B on `metric` over the questions both answered (matched by ID or qid;
    a question only one of them has is an error naming it). {"metric", "test", "n", "a", "b",
    "diff" (A - B, in the metric's direction of improvement: positive = A better), "low", "high"
    (95 % paired bootstrap interval of diff), "p_value", and for McNemar "a_only"/"b_only"}."""
    spec = metric_spec(metric)
    a_ids, a_vals, a_types = _values(a_rows, spec)
    b_ids, b_vals, _ = _values(b_rows, spec)
    if len(set(a_ids)) != len(a_ids) or len(set(b_ids)) != len(b_ids):
        raise ValueError(f"{metric}: question IDs repeat within one side")
    only_a, only_b = sorted(set(a_ids) - set(b_ids)), sorted(set(b_ids) - set(a_ids))
    if only_a or only_b:
        raise ValueError(f"{metric}: the two sides answered different questions (only in A: {only_a[:5]}"
                         f"{'...' if len(only_a) > 5 else ''}; only in B: {only_b[:5]}{'...' if len(only_b) > 5 else ''})")
    if not a_ids:
        raise ValueError(f"{metric}: no question counts towards it on either side")
    b_of = dict(zip(b_ids, b_vals, strict=True))
    bv = [b_of[i] for i in a_ids]
    sign = 1.0 if spec.higher_is_better else -1.0
    if spec.kind == "fsku":
        value_a, value_b = weighted_total(a_vals, a_types, FSKU_WEIGHTS), weighted_total(bv, a_types, FSKU_WEIGHTS)
        boot = paired_bootstrap([sign * v for v in a_vals], [sign * v for v in bv], seed=seed,
                                strata=a_types, weights=FSKU_WEIGHTS)
        test = "paired bootstrap (stratified by question type)"
    else:
        value_a, value_b = sum(a_vals) / len(a_vals), sum(bv) / len(bv)
        boot = paired_bootstrap([sign * v for v in a_vals], [sign * v for v in bv], seed=seed)
        test = "paired bootstrap"
    out = {"metric": metric, "test": test, "n": len(a_ids), "a": value_a, "b": value_b, "diff": boot["mean_diff"],
           "low": boot["low"], "high": boot["high"], "p_value": boot["p_value"]}
    if spec.kind == "binary":
        mc = mcnemar_exact([v > 0.5 for v in a_vals], [v > 0.5 for v in bv])
        out.update(test="exact McNemar", p_value=mc["p_value"], a_only=mc["a_only"], b_only=mc["b_only"])
    return out


def format_paired(res: dict, a_name: str = "A", b_name: str = "B") -> str:
    extra = f", {a_name} only right {res['a_only']}, {b_name} only right {res['b_only']}" if "a_only" in res else ""
    return (f"{res['metric']}: {a_name} {res['a']:.3f} vs {b_name} {res['b']:.3f}, difference {res['diff']:+.3f} "
            f"[{res['low']:+.3f}, {res['high']:+.3f}], {res['test']} p = {res['p_value']:.3g} (n={res['n']}{extra})")


# ----------------------------------------------------------------------------- per-question files

def load_rows(path: str | Path) -> list[dict]:
    """Per-question rows from a file: an MLflow table (`per_question.json`, `retrieval_per_query.json`:
    {"columns", "data"}), a JSON list of objects, JSONL, CSV or parquet. Each row needs an ID (or qid)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and {"columns", "data"} <= set(data):
                frame = pd.DataFrame(data["data"], columns=data["columns"])
            elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
                frame = pd.DataFrame(data)
            else:
                raise ValueError("expected an MLflow table ({columns, data}) or a list of objects")
        elif suffix == ".jsonl":
            frame = pd.DataFrame([json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()])
        elif suffix == ".csv":
            # IDs such as "NA" stay text; empty cells are still missing values
            frame = pd.read_csv(path, dtype={"ID": str, "qid": str}, keep_default_na=False, na_values=[""])
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise ValueError(f"unknown format {suffix!r}: expected .json, .jsonl, .csv or .parquet")
    except (json.JSONDecodeError, UnicodeDecodeError, pd.errors.ParserError, OSError) as e:
        raise ValueError(f"{path}: not readable as {suffix[1:]} ({e})") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return check_rows(frame.to_dict("records"), str(path))


def check_rows(rows: list[dict], source: str) -> list[dict]:
    """Rows with an ID (or qid) each, none repeated; the error names the source and the row."""
    if not rows:
        raise ValueError(f"{source}: no rows")
    seen = set()
    for n, row in enumerate(rows, start=1):
        key = row_key(row)
        if key is None:
            raise ValueError(f"{source}: row {n} has no ID (or qid)")
        if str(key) in seen:
            raise ValueError(f"{source}: row {n} repeats ID {key!r}")
        seen.add(str(key))
    return rows


def applicable_metrics(rows: Sequence[dict]) -> list[str]:
    """The headline metrics these rows support: evaluate rows (question_type, score) or retrieval rows
    (first_relevant_rank)."""
    cols = set().union(*(r.keys() for r in rows)) if rows else set()
    found = []
    if {"question_type", "score"} <= cols:
        found += EVALUATE_METRICS
    if "first_relevant_rank" in cols:
        found += RETRIEVAL_METRICS
    return [m for m in found if any(metric_spec(m).value(r) is not None for r in rows)]


# ----------------------------------------------------------------------------- lineage of labelled sets

def question_set_digest(questions: Sequence[str]) -> str:
    """A content digest of a set of questions (whitespace-normalised, order-free, repeats counted
    once): the same questions in another file or order give the same digest, so a run can tell
    whether it reports on the set a model or KB was tuned or selected on."""
    import hashlib

    norm = sorted({" ".join(str(q).split()) for q in questions})
    return hashlib.sha256("\n".join(norm).encode("utf-8")).hexdigest()[:16]


def contamination(digest: str, used: dict[str, str]) -> list[str]:
    """The lineage entries ({what: comma-separated digests}, e.g. {"KB tuned_on": ..., "model selected on":
    ...}) that name `digest`."""
    return [what for what, digests in used.items() if digest in {d.strip() for d in str(digests).split(",") if d.strip()}]
