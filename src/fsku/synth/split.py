"""Train/validation/test split by source article: no article contributes to two splits, so a
model is never validated on questions about an article it was trained on."""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Sequence

SPLIT_NAMES = ("train", "validation", "test")


def split_by_group(groups: Sequence[str], ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> list[str]:
    """A split name per item. Groups are visited largest first (ties in a seeded hash order) and
    each goes to the split furthest below its target number of items. Deterministic for a given
    seed and independent of item order."""
    if len(ratios) != len(SPLIT_NAMES) or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(f"ratios must be {len(SPLIT_NAMES)} non-negative numbers with a positive sum, got {list(ratios)}")
    total = float(sum(ratios))
    shares = [r / total for r in ratios]
    sizes = Counter(groups)
    order = sorted(sizes, key=lambda g: hashlib.sha1(f"{seed}|{g}".encode("utf-8")).hexdigest())
    # bigger groups first keeps the shares close; the hash order breaks ties reproducibly
    order.sort(key=lambda g: -sizes[g])
    filled = [0] * len(SPLIT_NAMES)
    assignment: dict[str, str] = {}
    n = len(groups)
    for g in order:
        deficits = [shares[s] * n - filled[s] if shares[s] > 0 else float("-inf") for s in range(len(SPLIT_NAMES))]
        best = max(range(len(SPLIT_NAMES)), key=lambda s: (deficits[s], -s))
        assignment[g] = SPLIT_NAMES[best]
        filled[best] += sizes[g]
    return [assignment[g] for g in groups]
