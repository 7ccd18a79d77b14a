"""Distillation data: training prompts from synth_qa records, teacher and student responses
(resumable, keyed by prompt id), and {prompt, chosen, rejected} pairs.

Prompts are the inference prompts (`fsku.infer.prompts`), so the student learns exactly the task it
is scored on: for a multiple-choice item the response is the option number, for a descriptive item
a short answer. A prompt may carry retrieved context the way inference adds it.

Files (JSONL, one object per line, validated on read by `read_pairs`):
    prompts.jsonl                 {"prompt_id", "kind", "messages": [{"role", "content"}], "reference"}
                                  + for a label target: "target": "label", "prefill", "n_options", "split_at"
    responses_r<R>_<role>.jsonl   header line, then {"ID": prompt_id, "text", "n_tokens", "truncated", "seconds",
                                  "prompt_digest"} (a row is reused only for the same prompt)
                                  (+ "label_logprobs" for a label target: the model's log-probs of 1..n)
    pairs_r<R>.jsonl              {"prompt_id", "kind", "prompt": messages,
                                   "chosen": [{"role": "assistant", "content": teacher text}],
                                   "rejected": [{"role": "assistant", "content": student text}]}
                                  (+ "prefill" and "split_at" for a label target: scored at the label position,
                                  no end of turn)

Multiple-choice targets (`mc_target`): `generated` trains on a generated response and the end of turn;
`label` on the option number right after the inference prompt's prefill — the one position inference
reads (it scores the labels there, it does not generate) — with the teacher's full next-token
distribution at that position as the soft target. Teacher and student "responses" are then their
most likely label (or one drawn at `temperature`), scored in one forward pass instead of generated.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..config import ResponseSettings, block_view
from ..infer import prompts as P
from ..jsonl import iter_jsonl
from ..stores import AnswerCache, ResultLog, digest
from ..synth.records import SyntheticQA

log = logging.getLogger(__name__)

ROLES = ("teacher", "student")


def _without_split(messages: Sequence[dict]) -> list[dict]:
    return [{**m, "content": m["content"].replace(P.SPLIT, "")} for m in messages]


def _messages_with_split(record: SyntheticQA, context: str, style: str) -> list[dict]:
    """The inference prompt for a synth_qa record, the option-order split sentinel still in."""
    if record.kind == "multiple_choice":
        options = [record.choices[k] for k in sorted(record.choices, key=int)]
        return P.mc_messages(record.stem, options, context=context, style=style)
    return P.desc_messages(record.question, context=context)


MAX_LABEL_OPTIONS = 9  # labels 1..9 are one token each; more options are scored digit by digit at inference


def build_prompts(records: Sequence[SyntheticQA], contexts: Optional[Sequence[str]] = None, style: str = "plain",
                  mc_target: str = "generated") -> list[dict]:
    """One prompt per record, keyed by its qa_id (duplicates are an error: ids key every later file).
    With mc_target "label" a multiple-choice row also carries `target: "label"`, the style's `prefill`,
    `n_options` and `split_at` (where the options start in the last message: the prefix/suffix cut the
    backends' option scoring shares with inference)."""
    seen: set[str] = set()
    out = []
    for i, r in enumerate(records):
        if r.qa_id in seen:
            raise ValueError(f"duplicate qa_id {r.qa_id!r} in the training records")
        seen.add(r.qa_id)
        ctx = contexts[i] if contexts is not None else ""
        raw = _messages_with_split(r, ctx, style)
        row = {"prompt_id": r.qa_id, "kind": r.kind, "messages": _without_split(raw), "reference": r.answer}
        if mc_target == "label" and r.kind == "multiple_choice":
            if len(r.choices) > MAX_LABEL_OPTIONS:
                raise ValueError(f"{r.qa_id}: {len(r.choices)} options; label targets take at most {MAX_LABEL_OPTIONS}")
            row.update(target="label", prefill=P.mc_style(style).prefill, n_options=len(r.choices),
                       split_at=raw[-1]["content"].index(P.SPLIT))
        out.append(row)
    return out


def drop_long_prompts(rows: Sequence[dict], count_tokens: Callable[[str], int], render: Callable[[list[dict]], str],
                      limit: int) -> tuple[list[dict], int]:
    """(rows, how many were dropped): a prompt (with its prefill) over `limit` tokens goes. A label row cut from
    the left would move its context away from what the teacher's label was scored on; a generated one would
    first fail to fit the generation window and then lose its system prompt and examples in training."""
    kept = [r for r in rows if count_tokens(render(r["messages"]) + r.get("prefill", "")) <= limit]
    return kept, len(rows) - len(kept)


def split_prompt(messages: Sequence[dict], split_at: int, prefill: str, render: Callable[[list[dict]], str]
                 ) -> tuple[str, str]:
    """(prefix, suffix ending with the prefill): the sentinel put back where the options start in the last
    message, the chat rendered and cut there, as inference scores option labels."""
    msgs = [dict(m) for m in messages]
    content, cut = msgs[-1]["content"], int(split_at)
    msgs[-1]["content"] = content[:cut] + P.SPLIT + content[cut:]
    prefix, suffix = P.split_rendered(render(msgs))
    return prefix, suffix + prefill


def label_prompt_parts(row: dict, render: Callable[[list[dict]], str]) -> tuple[str, str]:
    """(prefix, suffix ending with the prefill) of a label prompt row."""
    return split_prompt(row["messages"], row["split_at"], row.get("prefill", ""), render)


def pick_label(logprobs: Sequence[float], temperature: float, seed: int) -> int:
    """1-based label: the most likely one (temperature 0) or one drawn from the label distribution
    sharpened or flattened by the temperature."""
    import numpy as np

    lp = np.asarray(logprobs, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(lp)) + 1
    z = (lp - lp.max()) / temperature
    p = np.exp(z) / np.exp(z).sum()
    return int(np.random.default_rng(seed).choice(len(p), p=p)) + 1


def _label_responses(rows: Sequence[dict], llm, settings: ResponseSettings, fingerprint: dict,
                     cache: Optional[AnswerCache]) -> list[dict]:
    """Scored option labels for label rows: {text: the picked label, label_logprobs, n_tokens 1, ...}."""
    from ..llm.base import OptionRequest

    out = []
    for row in rows:
        prefix, suffix = label_prompt_parts(row, llm.render_chat)
        labels = [str(j) for j in range(1, int(row["n_options"]) + 1)]
        key = "distill-label|" + digest({"prefix": prefix, "suffix": suffix, "labels": labels, "model": fingerprint["model"],
                                          "settings": fingerprint["settings"]}, 24)
        hit = cache.get(key) if cache is not None else None
        if hit is None:
            t0 = time.perf_counter()
            logp = [float(x) for x in llm.option_logprobs(OptionRequest(prefix, [suffix], labels))[0]]
            seed = settings.seed + int(digest(row["prompt_id"], 8), 16) % 100_000
            hit = {"text": str(pick_label(logp, settings.temperature, seed)), "n_tokens": 1, "truncated": False,
                   "seconds": round(time.perf_counter() - t0, 3), "label_logprobs": [round(x, 5) for x in logp]}
            if cache is not None:
                cache.set(key, hit)
        out.append(hit)
    return out


def response_fingerprint(settings: ResponseSettings) -> dict:
    """The sampling settings that make a response what it is. Keys as written before the config
    blocks existed (`batch_size` for gen_batch_size), so earlier response logs and caches stay valid."""
    values = asdict(block_view(settings, ResponseSettings))
    return {"max_new_tokens": values["max_new_tokens"], "mc_max_new_tokens": values["mc_max_new_tokens"],
            "temperature": values["temperature"], "top_p": values["top_p"], "batch_size": values["gen_batch_size"],
            "seed": values["seed"]}


def prompt_digest(row: dict) -> str:
    """What makes a prompt row the prompt it is (its id aside)."""
    return digest({k: row.get(k) for k in ("messages", "target", "prefill", "split_at", "n_options")}, 16)


def generate_responses(prompt_rows: Sequence[dict], llm, settings: ResponseSettings, out_path: Path,
                       cache: Optional[AnswerCache] = None, restart: bool = False,
                       progress: Optional[Callable[[int], None]] = None) -> dict[str, dict]:
    """Responses of one model to every prompt, appended to `out_path` as they arrive.

    A run started again with the same model and settings skips prompt ids already there; a changed
    model or setting is refused (delete the file or restart). Multiple-choice prompts get
    `mc_max_new_tokens` (the answer is a number)."""
    fingerprint = {"model": llm.fingerprint(), "settings": response_fingerprint(settings)}
    results = ResultLog(out_path, fingerprint, restart=restart)
    if cache is not None and not cache.enabled:
        cache = None
    # a response is reused only for the same prompt (messages, target, prefill): a prompt rewritten under the
    # same id (another mc_prompt or mc_target, other context) is answered again
    row_digest = {r["prompt_id"]: prompt_digest(r) for r in prompt_rows}
    todo = [r for r in prompt_rows if results.done.get(r["prompt_id"], {}).get("prompt_digest") != row_digest[r["prompt_id"]]]
    if len(todo) < len(prompt_rows):
        log.info("resuming: %d of %d responses already in %s", len(prompt_rows) - len(todo), len(prompt_rows), out_path)
    if progress:
        progress(len(prompt_rows) - len(todo))
    labelled = [r for r in todo if r.get("target") == "label"]
    for start in range(0, len(labelled), settings.gen_batch_size):
        batch = labelled[start:start + settings.gen_batch_size]
        for row, res in zip(batch, _label_responses(batch, llm, settings, fingerprint, cache), strict=True):
            results.append({"ID": row["prompt_id"], **res, "prompt_digest": row_digest[row["prompt_id"]]})
        if progress:
            progress(len(batch))
    todo = [r for r in todo if r.get("target") != "label"]
    # multiple-choice and descriptive prompts in separate batches: they differ in max_new_tokens
    for kind in ("multiple_choice", "descriptive"):
        rows = [r for r in todo if r["kind"] == kind]
        max_new = settings.mc_max_new_tokens if kind == "multiple_choice" else settings.max_new_tokens
        for start in range(0, len(rows), settings.gen_batch_size):
            batch = rows[start:start + settings.gen_batch_size]
            rendered = [llm.render_chat(r["messages"]) for r in batch]
            keys = ["distill|" + digest({"prompt": p, "model": fingerprint["model"], "settings": fingerprint["settings"],
                                         "max_new": max_new}, 24) for p in rendered]
            got = [cache.get(k) if cache is not None else None for k in keys]
            missing = [i for i, g in enumerate(got) if g is None]
            if missing:
                t0 = time.perf_counter()
                gens = llm.generate([rendered[i] for i in missing], max_new, temperature=settings.temperature,
                                    top_p=settings.top_p, seed=settings.seed + start)
                secs = (time.perf_counter() - t0) / len(missing)
                for i, g in zip(missing, gens, strict=True):
                    got[i] = {"text": g.text, "n_tokens": g.n_tokens, "truncated": g.truncated, "seconds": round(secs, 3)}
                    if cache is not None:
                        cache.set(keys[i], got[i])
            for row, res in zip(batch, got, strict=True):
                results.append({"ID": row["prompt_id"], **res, "prompt_digest": row_digest[row["prompt_id"]]})
            if progress:
                progress(len(batch))
    return {r["prompt_id"]: results.done[r["prompt_id"]] for r in prompt_rows}


@dataclass
class PairCounts:
    prompts: int
    pairs: int
    missing_teacher: int
    missing_student: int
    empty_teacher: int
    empty_student: int

    def to_dict(self) -> dict:
        return asdict(self)


def with_reference_labels(prompt_rows: Sequence[dict], teacher: dict[str, dict]) -> dict[str, dict]:
    """The teacher's responses with every label row's text replaced by the row's own answer (its reference):
    the chosen side becomes the gold option; the teacher's label log-probs stay in the record."""
    out = dict(teacher)
    for row in prompt_rows:
        pid = row["prompt_id"]
        if row.get("target") == "label" and pid in out and str(row.get("reference", "")).strip():
            out[pid] = {**out[pid], "text": str(row["reference"]).strip(), "teacher_text": out[pid]["text"]}
    return out


def make_pairs(prompt_rows: Sequence[dict], teacher: dict[str, dict], student: dict[str, dict]
               ) -> tuple[list[dict], PairCounts]:
    """{prompt, chosen: teacher response, rejected: student response} per prompt that has both
    (non-empty) sides; the counts say how many prompts lacked which side."""
    pairs = []
    counts = PairCounts(len(prompt_rows), 0, 0, 0, 0, 0)
    for row in prompt_rows:
        pid = row["prompt_id"]
        t, s = teacher.get(pid), student.get(pid)
        if t is None:
            counts.missing_teacher += 1
        elif not t["text"].strip():
            counts.empty_teacher += 1
        if s is None:
            counts.missing_student += 1
        elif not s["text"].strip():
            counts.empty_student += 1
        if row.get("target") == "label":  # a label row's response must be one of its labels (not '정답: 3')
            labels = {str(j) for j in range(1, int(row["n_options"]) + 1)}
            for side, value in (("teacher", t), ("student", s)):
                if value is not None and value["text"].strip() and value["text"].strip() not in labels:
                    raise ValueError(f"{pid}: the {side}'s response {value['text'][:20]!r} is not an option label "
                                     f"1..{row['n_options']} (responses of another mc_target? start with --restart)")
        if t is None or s is None or not t["text"].strip() or not s["text"].strip():
            continue
        pair = {"prompt_id": pid, "kind": row["kind"], "prompt": row["messages"],
                "chosen": [{"role": "assistant", "content": t["text"].strip()}],
                "rejected": [{"role": "assistant", "content": s["text"].strip()}]}
        if row.get("target") == "label":
            # the prompt text ends with the prefill and the response is the label alone, without end of turn
            pair.update(prefill=row.get("prefill", ""), split_at=row["split_at"])
        pairs.append(pair)
    counts.pairs = len(pairs)
    return pairs, counts


def _check_messages(value, path, lineno, key) -> None:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        raise ValueError(f"{path}:{lineno}: '{key}' must be a non-empty list of {{'role', 'content'}} messages")


def read_pairs(path: str | Path) -> list[dict]:
    """Pairs from a JSONL file, each line checked (fields present, chat-format messages, unique ids)."""
    out, seen = [], set()
    for lineno, row in iter_jsonl(path):
        missing = {"prompt_id", "prompt", "chosen", "rejected"} - set(row)
        if missing:
            raise ValueError(f"{path}:{lineno}: pair lacks {sorted(missing)}")
        for key in ("prompt", "chosen", "rejected"):
            _check_messages(row[key], path, lineno, key)
        if row["chosen"][-1]["role"] != "assistant" or row["rejected"][-1]["role"] != "assistant":
            raise ValueError(f"{path}:{lineno}: chosen/rejected must end with an assistant message")
        if row["prompt_id"] in seen:
            raise ValueError(f"{path}:{lineno}: duplicate prompt_id {row['prompt_id']!r}")
        seen.add(row["prompt_id"])
        out.append(row)
    if not out:
        raise ValueError(f"{path}: no pairs")
    return out


def read_prompts(path: str | Path) -> list[dict]:
    out = []
    for lineno, row in iter_jsonl(path):
        missing = {"prompt_id", "kind", "messages"} - set(row)
        if missing:
            raise ValueError(f"{path}:{lineno}: prompt row lacks {sorted(missing)}")
        _check_messages(row["messages"], path, lineno, "messages")
        out.append(row)
    return out
