"""Mechanical QA from statute chunks, in the teacher's JSON format, without an LLM.

Used to teach the tiny offline teacher the output format (so the demo exercises generation ->
parse -> filter -> split with a non-zero acceptance rate). The items are deliberately plain:
the correct option or reference answer is a sentence of the chunk, distractors are sentences of
other chunks of the same document (other clauses of the same statute), and a negative stem's
correct option is a sentence from elsewhere."""
from __future__ import annotations

import random
import re
from collections import Counter
from typing import Optional, Sequence

_SENTENCE_END = re.compile(r"(?<=[다함음])\.\s+|\n+")
_HANGUL_WORD = re.compile(r"[가-힣]{2,}")
_STOPWORDS = {"다음", "경우", "각호", "해당", "사항", "이하", "또는", "및", "관한", "따른", "하여야", "한다", "있다", "없다"}
UNREGULATED_TOPICS = ("위반 시 포상금 지급", "해외 지점의 세부 운영 방식", "담당 직원의 개인 연봉", "민간 자격증 취득 비용")


def sentences(chunk_text: str, path: str = "", min_chars: int = 12, max_chars: int = 80) -> list[str]:
    """Statement sentences of a chunk body (heading path removed), each cut to max_chars."""
    body = chunk_text[len(path):] if path and chunk_text.startswith(path) else chunk_text
    out = []
    for s in _SENTENCE_END.split(body):
        s = re.sub(r"^\s*(?:제\d+조(?:의\d+)?\([^)]*\)|[①-⑳]|\d+\.)\s*", "", s.strip()).strip()
        if len(s) >= min_chars:
            out.append(s[:max_chars].rstrip(" ,") + ("" if s.endswith(".") or len(s) > max_chars else "."))
    return out


def keywords_of(text: str, k: int = 2) -> list[str]:
    counts = Counter(w for w in _HANGUL_WORD.findall(text) if w not in _STOPWORDS)
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], -len(kv[0]), kv[0]))[:k]]


def templated_item(own: Sequence[str], title: str, article: str, kind: str, qtype: str, n_options: int,
                   other_sentences: Sequence[str], rng: random.Random) -> Optional[dict]:
    """One item as the teacher should write it from the chunk's own `sentences()`, or None when the
    chunk has too little material."""
    own = list(own)
    others = [s for s in other_sentences if s not in own]
    name = f"{title} {article}".strip()
    if not own:
        return None
    if kind == "multiple_choice":
        if qtype == "negative":
            if len(own) < n_options - 1 or not others:
                return None
            true = rng.sample(own, n_options - 1)
            options = true + [rng.choice(others)]
            stem = f"{name}에 관한 설명으로 옳지 않은 것은?"
        else:
            if len(others) < n_options - 1:
                return None
            options = [rng.choice(own)] + rng.sample(others, n_options - 1)
            stem = f"{name}에서 정한 {'절차로' if qtype == 'procedural' else '내용으로'} 옳은 것은?"
        correct = options[-1] if qtype == "negative" else options[0]
        rng.shuffle(options)
        return {"question": stem, "choices": options, "answer": options.index(correct) + 1, "difficulty": 2}
    if qtype == "negative":
        topic = rng.choice(UNREGULATED_TOPICS)
        return {"question": f"{name}에서는 {topic}에 대해 어떻게 정하고 있는가?",
                "answer": f"해당 조문은 {topic}을 규정하고 있지 않습니다. {own[0]}",
                "keywords": keywords_of(own[0], 1) or [title], "difficulty": 2}
    answer = " ".join(own[:2])
    return {"question": f"{name}의 {'절차를' if qtype == 'procedural' else '주요 내용을'} 설명하세요.",
            "answer": answer, "keywords": keywords_of(answer, 2) or [title], "difficulty": 1}


def teacher_sft_examples(chunks, templates: dict, seed: int = 0, min_chars: int = 40) -> list[tuple[list[dict], str]]:
    """(teacher prompt, templated JSON answer) for every chunk x template x option count that has
    enough material; the prompts are rendered exactly as synth_qa renders them."""
    import json

    rng = random.Random(seed)
    rows = [r for r in chunks.to_dict("records") if len(r["text"]) - len(r.get("path") or "") >= min_chars]
    own_by_row = [sentences(r["text"], r.get("path") or "") for r in rows]
    by_doc: dict[str, list[str]] = {}
    for r, own in zip(rows, own_by_row, strict=True):
        by_doc.setdefault(r["doc_id"], []).extend(own)
    everything = [s for ss in by_doc.values() for s in ss]
    out = []
    for r, own in zip(rows, own_by_row, strict=True):
        same_doc = [s for s in by_doc[r["doc_id"]] if s not in own]
        pool = same_doc if len(same_doc) >= 4 else [s for s in everything if s not in own]
        for (kind, qtype), template in sorted(templates.items()):
            for n in ((4, 5) if kind == "multiple_choice" else (0,)):
                item = templated_item(own, r.get("title") or "", r.get("article") or "", kind, qtype, n, pool, rng)
                if item is None:
                    continue
                messages = template.render(title=r.get("title") or "", article=r.get("article") or "",
                                           chunk=r["text"], n_options=n or 4)
                out.append((messages, json.dumps(item, ensure_ascii=False)))
    return out
