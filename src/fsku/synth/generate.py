"""Teacher generation: sample source chunks evenly, plan (chunk, kind, type) tasks, and ask the
teacher in batches. Every response is cached (prompt x model x sampling) and appended to a raw
log as it arrives, so a killed run started again continues without duplicates or loss."""
from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd

from ..stores import AnswerCache, ResultLog, digest
from .templates import PromptTemplate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    task_id: str
    chunk_id: str
    kind: str
    qtype: str
    n_options: int  # 0 for descriptive
    seed: int


def sample_chunks(chunks: pd.DataFrame, n: int, seed: int = 0, min_chars: int = 120) -> pd.DataFrame:
    """n chunks spread evenly: documents take turns (round robin in a seeded order), and within a
    document one chunk per article comes before a second chunk of any article. Chunks shorter
    than min_chars (headings, stubs) are skipped."""
    body_chars = chunks["text"].str.len() - chunks["path"].fillna("").str.len()
    pool = chunks[body_chars >= min_chars]
    if pool.empty:
        raise ValueError(f"no chunk has {min_chars} characters or more of text")
    rng = random.Random(seed)
    queues: dict[str, list[int]] = {}
    for doc_id, group in pool.groupby("doc_id", sort=True):
        by_article: dict[str, list[int]] = {}
        for idx, article in zip(group.index, group["article"].fillna(""), strict=True):
            by_article.setdefault(article or f"_{idx}", []).append(idx)
        rounds: list[int] = []
        lists = list(by_article.values())
        for lst in lists:
            rng.shuffle(lst)
        rng.shuffle(lists)
        depth = 0
        while any(depth < len(lst) for lst in lists):
            rounds.extend(lst[depth] for lst in lists if depth < len(lst))
            depth += 1
        queues[doc_id] = rounds
    docs = sorted(queues)
    rng.shuffle(docs)
    picked: list[int] = []
    while len(picked) < n and any(queues[d] for d in docs):
        for d in docs:
            if queues[d] and len(picked) < n:
                picked.append(queues[d].pop(0))
    return pool.loc[picked]


def _quota(total: int, weights: dict[str, float]) -> list[str]:
    """total labels in proportion to weights (largest remainder), in a fixed order."""
    s = sum(weights.values())
    exact = {k: total * w / s for k, w in weights.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: -(exact[k] - counts[k]))[: total - sum(counts.values())]:
        counts[k] += 1
    return [k for k in weights for _ in range(counts[k])]


def plan_tasks(chunk_ids: Sequence[str], per_chunk: int, mc_share: float, qtype_weights: dict[str, float],
               n_options: int = 0, seed: int = 0) -> list[Task]:
    """per_chunk tasks per chunk; kinds and question types in the requested proportions over the
    whole plan (exact up to rounding), shuffled with the seed. n_options 0 = 4 or 5 at random."""
    rng = random.Random(seed)
    total = len(chunk_ids) * per_chunk
    kinds = _quota(total, {"multiple_choice": mc_share, "descriptive": 1.0 - mc_share})
    qtypes = _quota(total, qtype_weights)
    rng.shuffle(kinds)
    rng.shuffle(qtypes)
    tasks = []
    for i in range(total):
        chunk_id = chunk_ids[i // per_chunk]
        kind, qtype = kinds[i], qtypes[i]
        n = 0 if kind == "descriptive" else (n_options or rng.choice((4, 5)))
        task_seed = rng.randrange(2**31)
        tid = digest({"chunk": chunk_id, "i": i % per_chunk, "kind": kind, "qtype": qtype, "n": n, "seed": task_seed}, 16)
        tasks.append(Task(tid, chunk_id, kind, qtype, n, task_seed))
    return tasks


@dataclass
class GenerationSettings:
    max_new_tokens: int = 384
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 4
    max_chunk_tokens: int = 700


def run_generation(tasks: Sequence[Task], chunks: pd.DataFrame, llm, templates: dict, settings: GenerationSettings,
                   raw_log: ResultLog, cache: Optional[AnswerCache] = None,
                   progress: Optional[Callable[[int], None]] = None) -> list[dict]:
    """Ask the teacher for every task not yet in raw_log; returns all raw records (old and new)
    in task order. A raw record holds the task, the template version and the teacher's text."""
    by_id = chunks.set_index("chunk_id")
    if cache is not None and not cache.enabled:
        cache = None
    todo = [t for t in tasks if t.task_id not in raw_log.done]
    if len(todo) < len(tasks):
        log.info("resuming: %d of %d generations already in %s", len(tasks) - len(todo), len(tasks), raw_log.path)
    if progress:
        progress(len(tasks) - len(todo))
    for start in range(0, len(todo), settings.batch_size):
        batch = todo[start:start + settings.batch_size]
        prompts, keys, templs = [], [], []
        for t in batch:
            row = by_id.loc[t.chunk_id]
            template: PromptTemplate = templates[(t.kind, t.qtype)]
            body = llm.truncate_tokens(row["text"], settings.max_chunk_tokens)
            prompt = llm.render_chat(template.render(title=row.get("title", "") or "", article=row.get("article", "") or "",
                                                     chunk=body, n_options=t.n_options or 4))
            prompts.append(prompt)
            templs.append(template)
            keys.append("synth|" + digest({"prompt": prompt, "model": llm.fingerprint(), "seed": t.seed,
                                           "settings": asdict(settings)}, 24))
        results: list[Optional[dict]] = [cache.get(k) if cache is not None else None for k in keys]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            t0 = time.perf_counter()
            # one seed per batch: sampling differs between tasks because their prompts differ
            gens = llm.generate([prompts[i] for i in missing], settings.max_new_tokens, temperature=settings.temperature,
                                top_p=settings.top_p, seed=batch[missing[0]].seed)
            secs = (time.perf_counter() - t0) / len(missing)
            for i, g in zip(missing, gens, strict=True):
                results[i] = {"text": g.text, "n_tokens": g.n_tokens, "truncated": g.truncated, "seconds": round(secs, 3)}
                if cache is not None:
                    cache.set(keys[i], results[i])
        for t, template, res in zip(batch, templs, results, strict=True):
            raw_log.append({"ID": t.task_id, **asdict(t), "template_version": template.version,
                            "teacher": llm.model_id, **res})
        if progress:
            progress(len(batch))
    return [raw_log.done[t.task_id] for t in tasks]


def load_chunks(kb_folder: str | Path) -> pd.DataFrame:
    path = Path(kb_folder) / "chunks.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build the knowledge base first (fsku build-kb)")
    df = pd.read_parquet(path)
    missing = {"chunk_id", "doc_id", "title", "path", "article", "text"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    return df
