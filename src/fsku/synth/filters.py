"""Quality checks for synthetic QA. Each check is a pure function returning a rejection reason
(a short tag) or None; pool-level checks (near duplicates, decontamination) return the indices
to drop. Tokenisers and thresholds are arguments, so every check is testable on its own.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from ..infer.classify import classify_question
from .records import SyntheticQA

Tokenizer = Callable[[Sequence[str]], list[list[str]]]

_NEGATIVE_STEM = re.compile(r"(옳지\s*않은|틀린|아닌|해당하지\s*않는|않는\s*것|잘못된|부적절한|거리가\s*먼)")
_DENIAL = re.compile(r"(규정(?:하고|되어)?\s*있지\s*않|규정하지\s*않|정하고\s*있지\s*않|명시(?:되어|하고)?\s*있지\s*않|"
                     r"명시하지\s*않|언급(?:되어|하고)?\s*있지\s*않|언급하지\s*않|없(?:다|습니다|음))")


def normalize(text: str) -> str:
    """NFKC, lower case, letters and digits only: the comparison form for duplicates and overlap."""
    return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", text or "").lower())


def is_negative_stem(stem: str) -> bool:
    return bool(_NEGATIVE_STEM.search(stem))


# -- per-item checks ---------------------------------------------------------------------------

def check_format(item: SyntheticQA, min_options: int = 4, max_options: int = 5,
                 min_keywords: int = 1, max_keywords: int = 3) -> Optional[str]:
    """Schema and competition format: option count, answer in range, distinct options, no option
    repeating the stem, MC text parsed back by the inference classifier exactly; descriptive items
    need 1-3 keywords."""
    if item.kind == "multiple_choice":
        n = len(item.choices)
        if not min_options <= n <= max_options:
            return "option_count"
        if item.answer not in item.choices:
            return "answer_out_of_range"
        opts = [normalize(item.choices[k]) for k in sorted(item.choices, key=int)]
        if any(not o for o in opts):
            return "empty_option"
        if len(set(opts)) < n:
            return "duplicate_options"
        stem = normalize(item.stem)
        if any(o == stem or (len(o) >= 10 and o in stem) for o in opts):
            return "option_repeats_stem"
        if item.qtype == "negative" and not is_negative_stem(item.stem):
            return "negative_without_negative_stem"
        parsed = classify_question(item.qa_id, item.question)
        if parsed.flag:  # an empty question, or options without a stem
            return "classifier_rejects"
        if parsed.question_type != "multiple_choice" or parsed.choices != item.choices \
                or normalize(parsed.parsed_question) != stem:
            return "classifier_disagrees"
        return None
    if not item.answer.strip():
        return "empty_answer"
    if not min_keywords <= len(item.keywords) <= max_keywords:
        return "keyword_count"
    if len({normalize(k) for k in item.keywords}) < len(item.keywords) or any(not normalize(k) for k in item.keywords):
        return "bad_keywords"
    return None


def select_keywords(keywords: Sequence[str], answer: str, source: str, max_k: int = 3) -> list[str]:
    """The teacher's keywords that the reference answer or the source actually contains (the metric
    rewards an answer for containing them), without duplicates, at most max_k, in the teacher's order."""
    haystacks = (normalize(answer), normalize(source))
    out, seen = [], set()
    for k in keywords:
        key = normalize(k)
        if key and key not in seen and any(key in h for h in haystacks):
            out.append(k.strip())
            seen.add(key)
    return out[:max_k]


def hangul_ratio(text: str) -> float:
    """Share of Hangul among the letters of text (digits, punctuation and spaces ignored)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum("가" <= c <= "힣" or "ㄱ" <= c <= "ㆎ" for c in letters) / len(letters)


def check_language(item: SyntheticQA, min_hangul: float = 0.5) -> Optional[str]:
    """Korean question and answer (statutes mix in Latin terms such as CISO or API; the bar is a share)."""
    if hangul_ratio(item.question) < min_hangul:
        return "not_korean_question"
    if hangul_ratio(item.answer_text) < min_hangul and item.kind == "descriptive":
        return "not_korean_answer"
    return None


def check_length(item: SyntheticQA, question_chars: tuple[int, int] = (10, 400),
                 answer_chars: tuple[int, int] = (10, 600), option_chars: tuple[int, int] = (1, 200)) -> Optional[str]:
    """Bounds on the stem, the reference answer (descriptive) and each option (multiple choice)."""
    if not question_chars[0] <= len(item.stem.strip()) <= question_chars[1]:
        return "question_length"
    if item.kind == "multiple_choice":
        if any(not option_chars[0] <= len(o.strip()) <= option_chars[1] for o in item.choices.values()):
            return "option_length"
    elif not answer_chars[0] <= len(item.answer.strip()) <= answer_chars[1]:
        return "answer_length"
    return None


def token_overlap(claim_tokens: Sequence[str], source_tokens: Iterable[str]) -> float:
    """Share of the claim's distinct tokens that occur in the source (1.0 for an empty claim)."""
    claim = set(claim_tokens)
    if not claim:
        return 1.0
    return len(claim & set(source_tokens)) / len(claim)


def grounding_score(item: SyntheticQA, chunk_text: str, tokenize: Tokenizer) -> float:
    """Lexical support of the item by its source chunk, in [0, 1]: the overlap of the correct
    option's (or the reference answer's) content tokens with the chunk. For a negative stem the
    correct option is the false one, so the true options (the distractors) must be supported
    instead (their mean). A descriptive 'the rule does not say so' answer is supported by
    stating the denial (1.0) rather than by overlap."""
    if item.kind == "descriptive" and item.qtype == "negative":
        return 1.0 if _DENIAL.search(item.answer) else 0.0
    if item.kind == "multiple_choice" and is_negative_stem(item.stem):
        claims = [t for k, t in item.choices.items() if k != item.answer]
    else:
        claims = [item.answer_text]
    source, *claim_tokens = tokenize([chunk_text] + claims)
    source_set = set(source)
    return float(np.mean([token_overlap(c, source_set) for c in claim_tokens]))


# -- pool-level checks -------------------------------------------------------------------------

def char_ngrams(text: str, n: int) -> set[str]:
    t = normalize(text)
    if len(t) < n:
        return {t} if t else set()
    return {t[i:i + n] for i in range(len(t) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def minhash_signatures(shingle_sets: Sequence[set[str]], num_perm: int = 64, seed: int = 0) -> np.ndarray:
    """(N, num_perm) MinHash signatures of string sets (crc32 of each shingle under random affine maps)."""
    import zlib

    rng = np.random.default_rng(seed)
    prime = np.uint64((1 << 61) - 1)
    # a, b < 2**32 and crc32 < 2**32 keep h * a + b below 2**64: exact, no wrap-around
    a = rng.integers(1, 1 << 32, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64)
    sig = np.full((len(shingle_sets), num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    for i, shingles in enumerate(shingle_sets):
        if not shingles:
            continue
        h = np.array([zlib.crc32(s.encode("utf-8")) for s in shingles], dtype=np.uint64)
        sig[i] = ((h[:, None] * a[None, :] + b[None, :]) % prime).min(axis=0)
    return sig


def near_duplicates(texts: Sequence[str], threshold: float = 0.7, n: int = 5, bands: int = 16,
                    rows: int = 4) -> list[int]:
    """Indices of texts whose character n-gram Jaccard with an EARLIER text is >= threshold
    (the first of each group is kept). MinHash-LSH proposes candidate pairs; exact Jaccard decides."""
    shingles = [char_ngrams(t, n) for t in texts]
    sig = minhash_signatures(shingles, num_perm=bands * rows)
    drop: set[int] = set()
    candidates: set[tuple[int, int]] = set()
    for band in range(bands):
        buckets: dict[bytes, list[int]] = {}
        for i in range(len(texts)):
            buckets.setdefault(sig[i, band * rows:(band + 1) * rows].tobytes(), []).append(i)
        for members in buckets.values():
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    candidates.add((members[x], members[y]))
    for i, j in sorted(candidates, key=lambda p: (p[1], p[0])):
        if i in drop:
            continue
        if jaccard(shingles[i], shingles[j]) >= threshold:
            drop.add(j)
    return sorted(drop)


def contaminated(texts: Sequence[str], eval_texts: Sequence[str], n: int = 8, threshold: float = 0.5) -> list[int]:
    """Indices of texts of which >= threshold of the character n-grams (letters and digits only)
    occur in a single evaluation text: a copied or lightly edited evaluation question."""
    eval_sets = [char_ngrams(t, n) for t in eval_texts]
    index: dict[str, list[int]] = {}
    for e, grams in enumerate(eval_sets):
        for g in grams:
            index.setdefault(g, []).append(e)
    out = []
    for i, t in enumerate(texts):
        grams = char_ngrams(t, n)
        if not grams:
            continue
        hits: dict[int, int] = {}
        for g in grams:
            for e in index.get(g, ()):
                hits[e] = hits.get(e, 0) + 1
        if hits and max(hits.values()) / len(grams) >= threshold:
            out.append(i)
    return out
