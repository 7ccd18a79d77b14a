"""The official FSKU score: every part against hand-computed values, plus edge cases."""
import json

import pytest

from fsku.evaluate.fsku_metric import (
    GoldRow,
    descriptive_row_score,
    fsku_score,
    keyword_recall,
    load_gold,
    mc_choice,
    read_submission,
    split_keywords,
)
from fsku.evaluate.text_metrics import bleu, lcs_length, rouge_l, text_scores


def fixed_cosine(values):
    def cosine(preds, refs):
        assert len(preds) == len(refs)
        return [values[p] for p in preds]
    return cosine


def test_keyword_recall_ignores_case_and_spacing():
    assert keyword_recall("전자 금융 거래법을 준수", ["전자금융거래법", "OTP"]) == 0.5
    assert keyword_recall("otp 를 사용한다", ["OTP"]) == 1.0
    assert keyword_recall("아무 말", []) is None
    assert keyword_recall("아무 말", ["  "]) is None
    assert split_keywords("망분리, 내부망,,인터넷망 ") == ["망분리", "내부망", "인터넷망"]


def test_row_score_weights_and_clipping():
    assert descriptive_row_score(0.5, 0.5) == pytest.approx(0.5)
    assert descriptive_row_score(0.8, 0.0) == pytest.approx(0.48)
    assert descriptive_row_score(-0.3, None) == 0.0  # negative cosine counts as 0; no keywords: cosine alone
    assert descriptive_row_score(0.7, None) == pytest.approx(0.7)


def test_mc_choice():
    assert mc_choice("2 파일 암호화") == 2
    assert mc_choice(" 3") == 3
    assert mc_choice("12") is None
    assert mc_choice("") is None and mc_choice(None) is None


def test_total_with_missing_and_extra_ids():
    gold = [GoldRow("m1", "q", "2", "multiple_choice"), GoldRow("m2", "q", "3 text", "multiple_choice"),
            GoldRow("d1", "q", "ref one", "descriptive", ["A", "B"]), GoldRow("d2", "q", "ref two", "descriptive", ["C"])]
    preds = {"m1": "2", "m2": "1", "d1": "A 포함", "x9": "extra"}
    r = fsku_score(gold, preds, fixed_cosine({"A 포함": 0.5}))
    assert r["mc_accuracy"] == 0.5
    assert r["per_row"]["d1"]["score"] == pytest.approx(0.6 * 0.5 + 0.4 * 0.5)
    assert r["per_row"]["d2"]["score"] == 0.0  # missing answer scores 0 on every part
    assert r["descriptive_score"] == pytest.approx(0.25)
    assert r["total"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.25)
    assert r["missing"] == ["d2"] and r["extra"] == ["x9"]
    assert r["descriptive_keyword_recall"] == pytest.approx(0.25)


def test_single_type_sets_and_empty_answers():
    gold = [GoldRow("m1", "q", "1", "multiple_choice"), GoldRow("m2", "q", "4", "multiple_choice")]
    r = fsku_score(gold, {"m1": "1", "m2": "  "}, fixed_cosine({}))
    assert r["total"] == 0.5 and r["descriptive_score"] is None and r["missing"] == ["m2"]
    gold = [GoldRow("d1", "q", "ref", "descriptive")]
    r = fsku_score(gold, {"d1": "답"}, fixed_cosine({"답": 0.9}))
    assert r["total"] == pytest.approx(0.9) and r["mc_accuracy"] is None


def test_load_gold_csv_without_ids_and_jsonl(tmp_path):
    csv_path = tmp_path / "dev.csv"
    csv_path.write_text("Question,Answer,Keyword\n\"무엇이 맞나?\n1 가\n2 나\n3 다\",2 나,\n설명하세요.,답입니다,\"가, 나\"\n",
                        encoding="utf-8-sig")
    rows = load_gold(csv_path)
    assert [r.ID for r in rows] == ["dev-000", "dev-001"]
    assert rows[0].question_type == "multiple_choice" and rows[1].keywords == ["가", "나"]
    jl = tmp_path / "r.jsonl"
    jl.write_text(json.dumps({"qid": "Q1", "question": "옳은 것은?\n1 a\n2 b\n3 c", "answer": "3"}) + "\n"
                  + json.dumps({"qid": "Q2", "question": "설명하라", "reference": "참고", "keywords": ["키"]}) + "\n",
                  encoding="utf-8")
    rows = load_gold(jl)
    assert (rows[0].answer, rows[1].answer, rows[1].keywords) == ("3", "참고", ["키"])
    bad = tmp_path / "bad.csv"
    bad.write_text("Q,A\nx,y\n", encoding="utf-8")
    with pytest.raises(ValueError, match="expected columns Question and Answer"):
        load_gold(bad)


def test_read_submission_rejects_duplicates(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("ID,Answer\na,1\na,2\n", encoding="utf-8-sig")
    with pytest.raises(ValueError, match="row 3: duplicate ID 'a'"):
        read_submission(p)


def test_rouge_and_bleu_by_hand():
    assert lcs_length(list("abcd"), list("acd")) == 3
    assert rouge_l(list("abcd"), list("acd")) == pytest.approx(2 * 0.75 * 1.0 / 1.75)
    assert rouge_l([], ["a"]) == 0.0
    assert bleu(list("abcd"), list("abcd")) == pytest.approx(1.0)
    assert bleu(["x"], ["a"]) == 0.0
    # p1 = 1/2, p2 = (0+1)/(1+1), p3 = p4 = 1 (add-one on empty), no brevity penalty
    assert bleu(["a", "b"], ["a", "c"]) == pytest.approx(0.5 ** 0.5)


def test_korean_text_scores_are_not_zero():
    s = text_scores(["금융회사는 접근수단의 사용을 정지한다"], ["금융회사는 즉시 접근수단의 사용을 정지하여야 한다"])
    assert 0.3 < s["rouge_l"] < 1.0 and s["bleu"] > 0


def test_memoized_encoder_embeds_each_distinct_text_once():
    import numpy as np

    from fsku.evaluate.fsku_metric import memoized

    calls = []

    def encode(texts):
        calls.append(list(texts))
        return np.array([[len(t), 1.0] for t in texts])

    enc = memoized(encode)
    a = enc(["가나", "다", "가나"])
    b = enc(["다", "라마바"])
    assert calls == [["가나", "다"], ["라마바"]]
    assert a.tolist() == [[2, 1], [1, 1], [2, 1]] and b.tolist() == [[1, 1], [3, 1]]
    assert enc([]).shape[0] == 0
