"""LLM-as-a-judge for synthetic items (the seed's workflow: score 0-10, keep >= 7.0).

The judge answers with one digit 0-9 (a two-token '10' cannot be read in one pass), rescaled to
0-10; one forward pass per item, no sampling. Two readings of the digit distribution:
- mode: the most probable digit, i.e. what a greedy judge would write (the seed's workflow parses
  that integer and keeps >= 7);
- mean: the probability-weighted mean digit. Continuous, but a small judge spreads its mass, which
  pulls every item toward the middle: measured with Qwen2.5-Coder-1.5B on 42 statute items, means
  ranged 3.6-6.9, so a 7.0 threshold on the mean rejects everything a greedy judge would pass."""
from __future__ import annotations

import numpy as np

from ..infer.options import normalize_logprobs
from .records import SyntheticQA

_SPLIT = "\u2063JUDGE_SPLIT\u2063"
DIGITS = [str(d) for d in range(10)]
JUDGE_SYSTEM = "당신은 금융보안 법령 시험 문제의 품질을 엄격하게 심사하는 검토위원입니다."
RUBRIC = ("다음 기준으로 이 문항을 0~9점으로 평가하세요: 정답이 조문에 근거하는가(가장 중요), "
          "문제가 명확하고 정답이 하나뿐인가, 오답이 그럴듯하지만 틀렸는가, 한국어가 자연스러운가.")


JUDGE_READINGS = ("mode", "mean")


def digit_score(digit_logprobs: np.ndarray, reading: str = "mean") -> float:
    """The judge's digit (mode, lowest digit on ties) or expected digit (mean) under the normalised
    label distribution, scaled from 0-9 to 0-10."""
    if reading not in JUDGE_READINGS:
        raise ValueError(f"judge reading must be one of {JUDGE_READINGS}, got {reading!r}")
    p = np.exp(normalize_logprobs(digit_logprobs))
    digit = float(np.argmax(p)) if reading == "mode" else float((p * np.arange(len(p))).sum())
    return digit * 10.0 / (len(p) - 1)


def judge_prompt(item: SyntheticQA, chunk: str) -> str:
    if item.kind == "multiple_choice":
        body = f"문제:\n{item.question}\n\n출제자가 표시한 정답: {item.answer}번 ({item.answer_text})"
    else:
        body = f"문제: {item.question}\n\n모범답안: {item.answer}\n키워드: {', '.join(item.keywords)}"
    return f"[근거 조문]\n{chunk.strip()}\n\n{body}\n\n{RUBRIC}"


class LLMJudge:
    """Callable (item, chunk) -> score 0-10 on any fsku.llm backend."""

    def __init__(self, llm, max_chunk_tokens: int = 700, reading: str = "mode"):
        if reading not in JUDGE_READINGS:
            raise ValueError(f"judge reading must be one of {JUDGE_READINGS}, got {reading!r}")
        self.llm, self.max_chunk_tokens, self.reading = llm, max_chunk_tokens, reading

    def __call__(self, item: SyntheticQA, chunk: str) -> float:
        from ..llm import OptionRequest

        chunk = self.llm.truncate_tokens(chunk, self.max_chunk_tokens)
        messages = [{"role": "system", "content": JUDGE_SYSTEM},
                    {"role": "user", "content": judge_prompt(item, chunk) + "\n" + _SPLIT + "점수(0~9) 숫자 하나만 답하세요."}]
        prefix, suffix = self.llm.render_chat(messages).split(_SPLIT)
        logp = self.llm.option_logprobs(OptionRequest(prefix, [suffix], DIGITS))[0]
        return digit_score(logp, self.reading)
