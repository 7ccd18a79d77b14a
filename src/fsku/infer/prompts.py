"""Korean prompts per question type. The version is part of every cache key: edit a template,
bump PROMPT_VERSION. Multiple-choice prompts split into a shared prefix (system, context, stem)
and a suffix (the options in one order, the instruction) so that option orders share one encoding."""
from __future__ import annotations

import re
from typing import Sequence

from ..choices import MC_STYLES, MCStyle  # noqa: F401  (the table lives on the ground floor)
from .classify import CONTROL_CHARS  # never into submission.csv

# .2: questions with 10+ options, empty options and CR line endings became multiple choice (the
# cache is keyed by question text: an answer cached when they were descriptive must not be served)
PROMPT_VERSION = "2026-12-03.1"  # descriptive strategies (keyword line, consensus) and the copy re-ask
SPLIT = "\u2063FSKU_SPLIT\u2063"  # an invisible sentinel, removed before tokenisation

SYSTEM = ("당신은 한국의 금융보안·정보보호 법령과 가이드라인에 정통한 전문가입니다. "
          "질문에 정확하고 간결하게 답합니다.")
MC_INSTRUCTION = "위 선택지 중 정답의 번호 하나만 숫자로 답하세요."
MC_REASONING_INSTRUCTION = "단계적으로 간단히 생각한 뒤, 마지막 줄에 '정답: 번호' 형식으로 답하세요."
DESC_INSTRUCTION = ("핵심 용어(법령·제도·기술 용어)를 정확히 사용하여 2~4문장의 한국어로 답하세요. "
                    "질문을 반복하지 말고 답만 쓰세요.")
# the keyword-first form of the 1st-place FSKU solution: the topic phrase first, then a short answer that uses it
# no example phrases: small models copy them into every answer
DESC_KEYWORD_INSTRUCTION = ("첫 줄에 '키워드: '로 시작해, 이 질문이 무엇에 관한 것인지 질문에 나온 단어로 된 짧은 명사구 "
                            "1~2개(조사 없이)를 쉼표로 쓰세요. 다음 줄부터 그 명사구를 그대로 넣어 1~2문장의 한국어로 짧게 "
                            "답하세요. 질문을 반복하지 마세요.")
CONTEXT_HEADER = "다음 참고 자료가 질문과 관련이 있으면 활용하세요."
CONTENT_FREE = "N/A"


def format_context(passages: Sequence[dict]) -> str:
    """Passages as numbered blocks; each shows its source file and its heading path/article."""
    blocks = []
    for i, p in enumerate(passages, start=1):
        source = str(p.get("source", "")).rsplit("/", 1)[-1]
        blocks.append(f"[자료 {i}] (출처: {source})\n{p['text'].strip()}")
    return CONTEXT_HEADER + "\n\n" + "\n\n".join(blocks)


def _user_prefix(stem: str, context: str) -> str:
    parts = [context] if context else []
    parts.append(f"문제: {stem.strip()}")
    return "\n\n".join(parts) + "\n\n"


# Worked examples for the few-shot multiple-choice style: written for this project (not taken from
# any dev or test set), one "most appropriate" and one "NOT appropriate" question, 4 and 5 options,
# so a small model sees both the answer format and a negated stem before the real question.
MC_EXAMPLES = (
    ("전자서명에 대한 설명으로 가장 적절한 것은?",
     ("전자서명은 문서 내용을 숨기기 위한 암호화 기법이다",
      "전자서명은 서명자의 개인키로 생성하고 공개키로 검증한다",
      "전자서명은 하나의 대칭키로 생성과 검증을 모두 수행한다",
      "전자서명은 종이 문서에만 효력이 있다"), 2),
    ("개인정보처리시스템의 안전성 확보 조치로 적절하지 않은 것은?",
     ("접근 권한을 업무에 필요한 최소한의 범위로 부여한다",
      "비밀번호는 일방향 암호화하여 저장한다",
      "접속기록을 보관하고 정기적으로 점검한다",
      "여러 직원이 하나의 관리자 계정을 함께 사용한다",
      "외부에서의 불법 접근을 막는 침입차단 기능을 운영한다"), 4),
)


def mc_style(name: str) -> MCStyle:
    if name not in MC_STYLES:
        raise ValueError(f"unknown multiple-choice prompt style {name!r}; expected one of {sorted(MC_STYLES)}")
    return MC_STYLES[name]


# -- fitting a long question into the model's window (token counts in, allowances out)
# Internal constants, not user tunables (the user's knob is max_model_len): they only shape a cut
# that happens when a question alone is longer than the window.
MIN_STEM_TOKENS = 64  # internal: the stem keeps this much (or all of it) before options are clipped, so it still asks
HEAD_SHARE = 1 / 3  # internal: a clipped stem keeps a third from its start, two thirds from its end (nearest the options)
STEM_GAP = " …(중략)… "  # marks where a clipped stem was cut


def allocate_tokens(stem: int, options: Sequence[int], budget: int, min_stem: int = MIN_STEM_TOKENS
                    ) -> tuple[int, list[int]]:
    """(tokens for the stem, tokens per option) so that a question of `stem` + `options` tokens fits
    `budget`. Everything fits: unchanged. Else the stem is cut first: the options stay whole while they
    leave it min(stem, min_stem). Only options that alone exceed that are clipped, by water-filling:
    one cap for all, the largest with sum(min(length, cap)) <= what is left, so short options stay
    whole and only the long ones shrink. ValueError when the budget cannot give each option a token."""
    options = list(options)
    if stem < 0 or min(options, default=0) < 0:
        raise ValueError("token counts must be >= 0")
    if stem + sum(options) <= budget:
        return stem, options
    if budget < len(options) + (0 if options else 1):
        raise ValueError(f"a budget of {budget} tokens cannot hold {len(options)} options and a stem")
    floor = min(stem, min_stem, budget - len(options))
    if sum(options) <= budget - floor:
        return budget - sum(options), options
    room = budget - floor
    lo, hi = 1, max(options)  # sum(min(o, 1)) <= len(options) <= room, so cap 1 always fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(o, mid) for o in options) <= room:
            lo = mid
        else:
            hi = mid - 1
    return floor, [min(o, lo) for o in options]


def keep_ends(seq: Sequence, keep: int, head_share: float = HEAD_SHARE) -> tuple[Sequence, Sequence]:
    """(start, end) of `seq` holding `keep` items together: floor(keep * head_share) from the start, the
    rest from the end; (seq, []) when it is no longer than `keep`."""
    if keep < 0:
        raise ValueError("keep must be >= 0")
    if len(seq) <= keep:
        return seq, seq[:0]
    head = int(keep * head_share)
    tail = keep - head
    return seq[:head], seq[len(seq) - tail:]


def _options_block(options: Sequence[str], instruction: str) -> str:
    lines = "\n".join(f"{j} {text}" for j, text in enumerate(options, start=1))
    return f"선택지:\n{lines}\n\n{instruction}"


def mc_messages(stem: str, options: Sequence[str], context: str = "", reasoning: bool = False,
                style: str = "plain") -> list[dict]:
    """Chat messages for a multiple-choice question; the user turn holds SPLIT before the options.
    The examples of a few-shot style come before it, so every option order shares them in the prefix."""
    instruction = MC_REASONING_INSTRUCTION if reasoning else MC_INSTRUCTION
    st = mc_style(style)
    messages = [{"role": "system", "content": SYSTEM}] if st.system else []
    if st.examples and not reasoning:
        for ex_stem, ex_options, ex_answer in MC_EXAMPLES:
            messages.append({"role": "user", "content": _user_prefix(ex_stem, "") + _options_block(ex_options, instruction)})
            messages.append({"role": "assistant", "content": f"{st.prefill}{ex_answer}"})
    user = _user_prefix(stem, context) + SPLIT + _options_block(options, instruction)
    return messages + [{"role": "user", "content": user}]


def mc_prompt_parts(rendered: str, style: str = "plain") -> tuple[str, str]:
    """(shared prefix, per-order suffix ending where the option label is scored) of a rendered
    multiple-choice chat: the suffix ends with the style's assistant prefill."""
    prefix, suffix = split_rendered(rendered)
    return prefix, suffix + mc_style(style).prefill


CLOZE_INSTRUCTION = "정답의 내용만 간결하게 쓰세요."


def cloze_messages(stem: str, context: str = "") -> list[dict]:
    """Chat messages whose assistant answer is scored as an option's text (cloze scoring)."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": _user_prefix(stem, context) + CLOZE_INSTRUCTION}]


def split_rendered(rendered: str) -> tuple[str, str]:
    if rendered.count(SPLIT) != 1:
        raise ValueError("rendered chat must contain the split sentinel exactly once")
    prefix, suffix = rendered.split(SPLIT)
    return prefix, suffix


def desc_messages(question: str, context: str = "", instruction: str = DESC_INSTRUCTION) -> list[dict]:
    user = (context + "\n\n" if context else "") + f"질문: {question.strip()}\n\n{instruction}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


_LEADS = re.compile(r"^\s*(?:답변|답|정답|응답|A|Answer)\s*[:：]\s*", re.IGNORECASE)
_CHAT_TOKENS = re.compile(r"<\|[^|>]{1,40}\|>|</?s>|\[/?INST\]|###\s*(?:assistant|user|system)", re.IGNORECASE)


_SENTENCE = re.compile(r"(?:[^.!?。\n]|\.(?=\d))*(?:[.!?。]+|\n|$)")  # "3.5" is not a sentence end


def drop_repeated_sentences(text: str, min_chars: int = 8) -> str:
    """Remove sentences that repeat an earlier one (same letters and digits; spacing, punctuation and
    markdown ignored): greedy decoding of small models falls into loops. Short fragments such as
    list numbers are never dropped."""
    out, seen = [], set()
    for m in _SENTENCE.finditer(text):
        segment = m.group(0)
        if not segment:
            continue
        key = re.sub(r"[\W_]+", "", segment)
        if len(key) >= min_chars:
            if key in seen:
                continue
            seen.add(key)
        out.append(segment)
    return "".join(out)


def clean_answer(text: str, question: str = "", truncated: bool = False) -> str:
    """A descriptive answer without chat tokens, control characters, role labels, an echoed question,
    repeated sentences or a cut-off tail."""
    text = CONTROL_CHARS.sub("", _CHAT_TOKENS.sub(" ", text or ""))
    # a model that starts a new turn: keep only the first
    text = re.split(r"\n\s*(?:user|system|assistant|질문)\s*[:：\n]", text, maxsplit=1)[0]
    text = _LEADS.sub("", text.strip())
    q = question.strip()
    if q and text.startswith(q):
        text = _LEADS.sub("", text[len(q):].lstrip(" \n:?"))
    text = drop_repeated_sentences(text)
    # list markers left without an item ('3.\n4.' where greedy decoding ran out of content)
    text = re.sub(r"(?m)^[ \t]*(?:\d{1,2}[.)]|[-*•])[ \t]*$\n?", "", text)
    text = re.sub(r"[:：][ \t]*\d{1,2}[.)]\s*$", "", text)  # ... and a list that never started ('…: 1.')
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n{2,}", "\n", text).strip()
    if truncated:
        # drop an unfinished last sentence when at least one finished sentence precedes it
        ends = [m.end() for m in re.finditer(r"(?:다|요|음|함|임)?[.!?。](?=\s|$)", text)]
        if ends and ends[-1] < len(text):
            text = text[:ends[-1]].strip()
    return text
