"""Similarity proxies for the descriptive score's cosine part, and how well each one can rank answers.

Why: the competition embedded with a model we cannot run offline, so every cosine here is a proxy.
Raw e5-small cosines of any two Korean sentences of this domain sit between ~0.84 and ~0.89: an
answer, the question echoed back and another row's reference all land in that band, and a strategy
difference of 0.003 means nothing. A proxy is judged by how far it puts the row's own reference
above other rows' references (issue 23):

- `raw`: the cosine of the normalised embeddings (what `fsku evaluate` reports).
- `centred`: the cosine after subtracting a centre, the mean embedding of a background set of texts
  of the domain: the direction every text of the domain shares is removed, so what is left separates
  topics. The background must not hold the references being scored: their own mean pushes every pair
  of them apart by ~1/n and flatters the calibration (the benchmark takes the other half of the dev
  set, evaluate the questions). Needs a background of several texts.

`calibrate` summarises one proxy on one system of answers: mean similarity to the own reference,
mean to the others, their gap in units of the others' spread, and the rank AUC (the share of other
references the own one beats, ties half). Pure numpy; the embedder is passed in as arrays.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

PROXIES = ("raw", "centred")
MIN_BACKGROUND = 4  # a centre from fewer texts is mostly the texts themselves


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def centre_of(background: np.ndarray) -> np.ndarray:
    """The centre for the `centred` proxy: the mean of the unit-normalised background embeddings."""
    background = np.asarray(background, dtype=np.float64)
    if background.ndim != 2 or background.shape[0] < MIN_BACKGROUND:
        raise ValueError(f"the centred proxy needs at least {MIN_BACKGROUND} background embeddings (rows of a 2-D "
                         f"array); got shape {background.shape}")
    return _unit(background).mean(axis=0)


def similarity_matrix(a: np.ndarray, b: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """(len(a), len(b)) cosines of embeddings, after subtracting `centre` from both sides when given
    (inputs need not be normalised; a zero vector has cosine 0 with everything)."""
    a, b = _checked(a, b, centre)
    a, b = _unit(a), _unit(b)
    if centre is not None:
        a, b = _unit(a - centre), _unit(b - centre)
    return a @ b.T


def _checked(a, b, centre) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"similarities need 2-D embedding arrays of one width; got {a.shape} and {b.shape}")
    if centre is not None and np.shape(centre) != (a.shape[1],):
        raise ValueError(f"the centre must be one embedding of width {a.shape[1]}; got shape {np.shape(centre)}")
    return a, b


def rowwise_similarity(a: np.ndarray, b: np.ndarray, centre: np.ndarray | None = None) -> np.ndarray:
    """Cosine of a[i] with b[i] for every i (same rules as `similarity_matrix`)."""
    a, b = _checked(a, b, centre)
    if a.shape != b.shape:
        raise ValueError(f"row-wise similarity needs arrays of one shape; got {a.shape} and {b.shape}")
    a, b = _unit(a), _unit(b)
    if centre is not None:
        a, b = _unit(a - centre), _unit(b - centre)
    return (a * b).sum(axis=1)


@dataclass(frozen=True)
class ProxyCalibration:
    n: int
    own: float  # mean similarity of each answer to its own reference
    other: float  # mean similarity to the other rows' references
    gap: float  # own - other
    gap_sd: float  # gap / standard deviation of the other-reference similarities (±inf when they do not vary)
    rank_auc: float  # mean share of other references the own one beats (ties count half); 0.5 = chance

    def as_dict(self) -> dict:
        return asdict(self)


def calibrate(sim: np.ndarray) -> ProxyCalibration:
    """Calibration of a proxy from an (n, n) matrix: row i = answer i against every reference, its own
    reference on the diagonal. Needs n >= 2."""
    sim = np.asarray(sim, dtype=np.float64)
    n = sim.shape[0] if sim.ndim == 2 else 0
    if sim.ndim != 2 or sim.shape != (n, n) or n < 2:
        raise ValueError(f"calibration needs a square matrix of at least 2 rows (answers x their references); "
                         f"got shape {sim.shape}")
    own = np.diag(sim)
    off = ~np.eye(n, dtype=bool)
    other = sim[off]
    beats = (own[:, None] > sim).astype(float) + 0.5 * (own[:, None] == sim)
    auc = float(np.mean([beats[i, off[i]].mean() for i in range(n)]))
    gap = float(own.mean() - other.mean())
    sd = float(other.std())
    # others that do not vary: a perfect separation (any gap) is infinitely many spreads, none is 0
    gap_sd = gap / sd if sd > 1e-12 else (0.0 if abs(gap) <= 1e-12 else float(np.sign(gap)) * float("inf"))
    return ProxyCalibration(n=n, own=float(own.mean()), other=float(other.mean()), gap=gap, gap_sd=gap_sd,
                            rank_auc=auc)


def descriptive_baselines(answers: np.ndarray, references: np.ndarray, questions: np.ndarray,
                          centre: np.ndarray | None = None, answered=None) -> dict[str, float]:
    """The calibration rows next to a system's answers (row i of each array belongs to descriptive row
    i; n >= 2): mean similarity to the own reference of the answers, of the question echoed as the
    answer, of the next row's reference as the answer, and the answers' rank AUC. Keys: `<proxy>`,
    `<proxy>_echo_question`, `<proxy>_other_reference`, `<proxy>_auc`, for `raw` and, given a `centre`
    (`centre_of` a background that does not hold these references), `centred`.

    `answered` (booleans, default all): rows without an answer score 0 for the answers, as in the
    headline cosine; the baselines use every row, and the AUC the answered ones (at least 2)."""
    answers, references, questions = (np.atleast_2d(np.asarray(x, dtype=np.float64))
                                      for x in (answers, references, questions))
    n = references.shape[0]
    if n < 2 or answers.shape != references.shape or questions.shape != references.shape:
        raise ValueError(f"baselines need at least 2 rows of answers, references and questions of one shape; got "
                         f"{answers.shape}, {references.shape}, {questions.shape}")
    mask = np.ones(n, dtype=bool) if answered is None else np.asarray(answered, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"answered needs one flag per row ({n}); got shape {mask.shape}")
    others = np.roll(references, -1, axis=0)  # row i answered with row i+1's reference
    out: dict[str, float] = {}
    for proxy, c in (("raw", None), ("centred", centre)):
        if proxy == "centred" and centre is None:
            continue
        out[proxy] = float(np.where(mask, rowwise_similarity(answers, references, c), 0.0).mean())
        out[f"{proxy}_echo_question"] = float(rowwise_similarity(questions, references, c).mean())
        out[f"{proxy}_other_reference"] = float(rowwise_similarity(others, references, c).mean())
        if mask.sum() >= 2:
            out[f"{proxy}_auc"] = calibrate(similarity_matrix(answers[mask], references[mask], c)).rank_auc
    return out
