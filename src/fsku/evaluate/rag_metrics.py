"""RAG metrics with the definitions of ragas (faithfulness, answer relevancy, context precision,
context recall), judged by a local LLM through our backend layer.

ragas itself (0.4) needs LangChain/OpenAI pins and a judge that emits valid JSON, which small local
models do not do reliably. Here every verdict is a yes/no question read from the judge's next-token
probabilities of "예" vs "아니오" (the same option scoring as multiple choice), so any local model can
judge, and a verdict never fails to parse.

- faithfulness: share of the answer's statements that the used context supports;
- context recall: share of the reference answer's statements that the retrieved context supports;
- context precision: average precision of the retrieved passages' usefulness verdicts, in rank order;
- answer relevancy: mean cosine between the question and questions the judge writes back from the answer.
"""
from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import numpy as np

YES, NO = "예", "아니오"
JUDGE_SYSTEM = "당신은 엄격한 평가자입니다. 주어진 기준에 따라 예 또는 아니오로만 답합니다."
_SPLIT = "\u2063JUDGE\u2063"


def split_statements(text: str, min_chars: int = 4) -> list[str]:
    """Sentences of an answer (Korean and English end marks, line breaks)."""
    parts = re.split(r"(?<=[.!?。])\s+|\n+", text or "")
    return [p.strip() for p in parts if len(p.strip()) >= min_chars]


def average_precision(relevant: Sequence[bool]) -> float:
    """AP over a ranked list: mean of precision@k at each relevant rank (0 when none is relevant)."""
    hits, total = 0, 0.0
    for k, rel in enumerate(relevant, start=1):
        if rel:
            hits += 1
            total += hits / k
    return total / hits if hits else 0.0


def share(verdicts: Sequence[bool]) -> Optional[float]:
    return sum(verdicts) / len(verdicts) if verdicts else None


class YesNoJudge:
    """P(yes) for a yes/no question from a local LLM backend (fsku.llm.LLMBackend)."""

    def __init__(self, llm, threshold: float = 0.5):
        self.llm, self.threshold = llm, threshold

    def p_yes(self, prompt: str) -> float:
        from ..infer.options import normalize_logprobs
        from ..llm import OptionRequest

        messages = [{"role": "system", "content": JUDGE_SYSTEM},
                    {"role": "user", "content": prompt + "\n" + _SPLIT + f"{YES} 또는 {NO}로만 답하세요."}]
        rendered = self.llm.render_chat(messages)
        prefix, suffix = rendered.split(_SPLIT)
        logp = self.llm.option_logprobs(OptionRequest(prefix, [suffix], [YES, NO]))[0]
        return float(np.exp(normalize_logprobs(logp))[0])

    def __call__(self, prompt: str) -> bool:
        return self.p_yes(prompt) >= self.threshold


def faithfulness(judge: Callable[[str], bool], answer: str, context: str) -> Optional[float]:
    statements = split_statements(answer)
    if not statements or not context.strip():
        return None
    return share([judge(f"자료:\n{context}\n\n주장: {s}\n\n이 주장은 위 자료로 뒷받침됩니까?") for s in statements])


def context_recall(judge: Callable[[str], bool], reference: str, passages: Sequence[str]) -> Optional[float]:
    statements = split_statements(reference)
    if not statements or not passages:
        return None
    context = "\n\n".join(passages)
    return share([judge(f"자료:\n{context}\n\n문장: {s}\n\n이 문장의 내용을 위 자료에서 찾을 수 있습니까?") for s in statements])


def context_precision(judge: Callable[[str], bool], question: str, reference: str, passages: Sequence[str]) -> Optional[float]:
    if not passages:
        return None
    verdicts = [judge(f"질문: {question}\n참조 답: {reference}\n\n자료:\n{p}\n\n이 자료는 참조 답에 이르는 데 유용합니까?")
                for p in passages]
    return average_precision(verdicts)


def answer_relevancy(generate: Callable[[str], str], cosine: Callable[[list[str], list[str]], Sequence[float]],
                     question: str, answer: str, n: int = 2) -> Optional[float]:
    """ragas' answer relevancy: questions written back from the answer, compared with the real one."""
    if not answer.strip():
        return None
    back = [q for q in (generate(f"다음 답변이 대답하는 질문을 한 문장으로 쓰세요.\n답변: {answer}") for _ in range(n))
            if q.strip()]
    if not back:
        return 0.0
    return float(np.mean(np.clip(cosine(back, [question] * len(back)), 0.0, 1.0)))


def rag_scores(judge: YesNoJudge, generate: Callable[[str], str], cosine, rows: Sequence[dict], n_back: int = 1) -> dict:
    """Mean of each metric over `rows` ({question, answer, reference, used_context, passages});
    rows where a metric is undefined (no context, no statements) are left out of that mean."""
    per = {"faithfulness": [], "answer_relevancy": [], "context_precision": [], "context_recall": []}
    for r in rows:
        values = {
            "faithfulness": faithfulness(judge, r["answer"], r.get("used_context", "")),
            "answer_relevancy": answer_relevancy(generate, cosine, r["question"], r["answer"], n_back),
            "context_precision": context_precision(judge, r["question"], r["reference"], r.get("passages", [])),
            "context_recall": context_recall(judge, r["reference"], r.get("passages", [])),
        }
        for k, v in values.items():
            if v is not None:
                per[k].append(v)
    out = {f"rag_{k}": (float(np.mean(v)) if v else None) for k, v in per.items()}
    out.update({f"rag_{k}_rows": len(v) for k, v in per.items()})
    return out
