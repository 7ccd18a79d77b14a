"""Korean-aware ROUGE-L and BLEU on token lists (rouge_score's default tokenizer drops Hangul, so
Korean would always score 0 there). Tokens come from the Kiwi morpheme tokenizer by default, or
any callable; the metrics themselves are pure functions."""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Optional, Sequence


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(pred: Sequence[str], ref: Sequence[str]) -> float:
    """ROUGE-L F1 (beta = 1) from the longest common subsequence."""
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


def bleu(pred: Sequence[str], ref: Sequence[str], max_n: int = 4) -> float:
    """Sentence BLEU with add-one smoothing for n > 1 (Lin & Och 2004) and the brevity penalty."""
    if not pred or not ref:
        return 0.0
    log_sum = 0.0
    for n in range(1, max_n + 1):
        p_ngrams = Counter(tuple(pred[i:i + n]) for i in range(len(pred) - n + 1))
        r_ngrams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        match = sum(min(c, r_ngrams[g]) for g, c in p_ngrams.items())
        total = sum(p_ngrams.values())
        if n == 1:
            if match == 0:
                return 0.0
            log_sum += math.log(match / total)
        else:
            log_sum += math.log((match + 1) / (total + 1))
    bp = 1.0 if len(pred) > len(ref) else math.exp(1 - len(ref) / len(pred))
    return bp * math.exp(log_sum / max_n)


def korean_tokenizer(name: str = "kiwi") -> Callable[[list[str]], list[list[str]]]:
    from ..index.sparse import get_tokenizer

    return get_tokenizer(name)


def text_scores(preds: list[str], refs: list[str], tokenize: Optional[Callable[[list[str]], list[list[str]]]] = None) -> dict:
    """Mean ROUGE-L F1 and BLEU over row pairs."""
    if not preds:
        return {"rouge_l": None, "bleu": None}
    tokenize = tokenize or korean_tokenizer()
    p_tok, r_tok = tokenize(list(preds)), tokenize(list(refs))
    rl = [rouge_l(p, r) for p, r in zip(p_tok, r_tok, strict=True)]
    bl = [bleu(p, r) for p, r in zip(p_tok, r_tok, strict=True)]
    return {"rouge_l": sum(rl) / len(rl), "bleu": sum(bl) / len(bl), "per_row_rouge_l": rl, "per_row_bleu": bl}
