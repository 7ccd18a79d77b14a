"""ragas-definition RAG metrics: pure parts by hand, the yes/no judge on a tiny model, evaluate wiring."""
import pytest

from fsku.evaluate.rag_metrics import (
    YesNoJudge,
    answer_relevancy,
    average_precision,
    context_precision,
    context_recall,
    faithfulness,
    rag_scores,
    share,
    split_statements,
)


def test_split_statements():
    assert split_statements("첫째 문장이다. 둘째 문장이다!\n셋째 줄") == ["첫째 문장이다.", "둘째 문장이다!", "셋째 줄"]
    assert split_statements("") == [] and split_statements("짧.") == []


def test_average_precision_by_hand():
    assert average_precision([True, False, True]) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert average_precision([False, True]) == pytest.approx(0.5)
    assert average_precision([False, False]) == 0.0
    assert share([True, False, False, True]) == 0.5 and share([]) is None


def keyword_judge(prompt: str) -> bool:
    """A stand-in judge: 'supported' when the claim's key term appears in the material."""
    material, claim = prompt.split("\n\n", 1)
    return any(term in material for term in ("24시간", "정지"))  and ("24시간" in claim or "정지" in claim or "유용" in claim)


def test_metric_definitions_with_a_stand_in_judge():
    ctx = "자료: 금융회사등은 24시간 이내에 보고하여야 한다."
    assert faithfulness(keyword_judge, "24시간 이내에 보고한다. 달에 간다.", ctx) == 0.5
    assert faithfulness(keyword_judge, "답이다.", "") is None  # no context used: undefined
    assert context_recall(keyword_judge, "24시간 이내에 보고한다.", ["24시간 이내 보고"]) == 1.0
    assert context_precision(lambda p: "24시간" in p.split("자료:")[-1], "언제?", "24시간", ["무관", "24시간 이내"]) == 0.5
    rel = answer_relevancy(lambda p: "보고 기한은?", lambda a, b: [0.8] * len(a), "보고 기한은 언제인가?", "24시간이다.", n=2)
    assert rel == pytest.approx(0.8)
    assert answer_relevancy(lambda p: "x", lambda a, b: [1.0], "q", "  ") is None


def test_yes_no_judge_on_a_tiny_model_and_aggregation(tiny_llm):
    judge = YesNoJudge(tiny_llm)
    p = judge.p_yes("하늘은 파랗습니까?")
    assert 0.0 < p < 1.0 and isinstance(judge("질문"), bool)
    rows = [{"question": "언제 보고하나?", "answer": "24시간 이내에 보고한다.", "reference": "24시간 이내 보고.",
             "used_context": "24시간 이내에 보고하여야 한다.", "passages": ["24시간 이내에 보고하여야 한다."]},
            {"question": "무엇인가?", "answer": "모른다고 답한다.", "reference": "정답 문장이다.",
             "used_context": "", "passages": []}]
    out = rag_scores(judge, lambda prompt: "언제 보고하나요?", lambda a, b: [0.5] * len(a), rows)
    assert out["rag_faithfulness_rows"] == 1 and out["rag_context_precision_rows"] == 1
    assert out["rag_answer_relevancy"] == pytest.approx(0.5) and out["rag_answer_relevancy_rows"] == 2
    for k in ("rag_faithfulness", "rag_context_precision", "rag_context_recall"):
        assert 0.0 <= out[k] <= 1.0
