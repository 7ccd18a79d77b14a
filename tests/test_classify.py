import json

import pytest

from conftest import needs_shared
from fsku.cli import main as fsku_main
from fsku.infer.classify import FLAG_EMPTY, FLAG_NO_STEM, classify_question, read_questions_csv


def test_competition_format():
    q = classify_question("T1", "전자금융거래법 제14조에 따라 철회 시기는?\n"
                                "1 임의로 결정\n2 약정에 따라\n3 거래 후\n4 즉시\n5 없음")
    assert q.question_type == "multiple_choice" and q.confidence == 1.0
    assert q.parsed_question == "전자금융거래법 제14조에 따라 철회 시기는?"
    assert q.choices == {"1": "임의로 결정", "2": "약정에 따라", "3": "거래 후", "4": "즉시", "5": "없음"}
    assert q.to_record() == {"ID": "T1", "question_type": "multiple_choice", "stem": q.parsed_question, "choices": q.choices}


@pytest.mark.parametrize("options", [
    "1. 가\n2. 나\n3. 다\n4. 라",
    "1) 가\n2) 나\n3) 다\n4) 라",
    "(1) 가\n(2) 나\n(3) 다\n(4) 라",
    "① 가\n② 나\n③ 다\n④ 라",
    "① 가 ② 나 ③ 다 ④ 라",
    "(1) 가 (2) 나 (3) 다 (4) 라",
])
def test_other_marker_styles(options):
    q = classify_question("x", "다음 중 옳은 것은?\n" + options)
    assert q.question_type == "multiple_choice"
    assert q.choices == {"1": "가", "2": "나", "3": "다", "4": "라"}
    assert q.parsed_question == "다음 중 옳은 것은?"


def test_numbers_inside_the_stem_are_not_options():
    stem = ("다음 보기를 읽고 답하시오.\n1. 제14조에 따른 철회\n2. 1,000명 이상의 이용자\n3. 3억원 이하의 과태료\n"
            "다음 중 옳은 것을 모두 고른 것은?")
    q = classify_question("x", stem + "\n1 1, 2\n2 2, 3\n3 1, 3\n4 1, 2, 3")
    assert q.question_type == "multiple_choice"
    assert q.parsed_question == stem
    assert q.choices["4"] == "1, 2, 3"
    for text in ("제14조의 취지를 설명하세요.", "1,000명 이상 이용자를 보유한 사업자의 의무를 서술하시오.",
                 "3억원 이하 과태료 규정의 목적은?"):
        assert classify_question("d", text).question_type == "descriptive"


def test_a_descriptive_question_ending_in_a_numbered_list_stays_descriptive():
    q = classify_question("d", "아래 두 가지 통제를 비교하여 서술하시오.\n1. 관리적 보호조치\n2. 기술적 보호조치")
    assert q.question_type == "descriptive" and q.choices == {}


def test_an_empty_question_is_flagged_not_refused():
    for text in ("  ", "", "\x00\x01", None):
        q = classify_question("x", text)
        assert (q.question_type, q.parsed_question, q.choices, q.confidence, q.flag) == \
            ("descriptive", "", {}, 0.0, FLAG_EMPTY)
    assert classify_question("x", "").to_record() == {"ID": "x", "question_type": "descriptive", "stem": "",
                                                      "choices": {}, "flag": "empty question"}


def test_options_without_a_stem_are_multiple_choice_with_an_empty_stem():
    for text in ("1 가\n2 나\n3 다\n4 라", "① 가 ② 나 ③ 다"):
        q = classify_question("x", text)
        assert q.question_type == "multiple_choice" and q.parsed_question == "" and q.flag == FLAG_NO_STEM
        assert q.confidence == 0.3 and q.choices["1"] == "가" and q.choices["3"] == "다"
    assert classify_question("x", "다음 중 옳은 것은?\n1 가\n2 나\n3 다").flag == ""


def test_empty_options_only_between_options_with_text():
    # a stray trailing number is no empty fifth option: the run is cut before it
    q = classify_question("x", "다음 중 옳은 것은?\n1 A\n2 B\n3 C\n4 D\n5")
    assert q.question_type == "multiple_choice" and q.choices == {"1": "A", "2": "B", "3": "C", "4": "D"}
    assert q.parsed_question == "다음 중 옳은 것은?" and q.confidence == 1.0  # no empty option left: full confidence
    two = classify_question("x", "다음 중 옳은 것은?\n1 A\n2 B\n3 C\n4\n5 ")  # several trailing ones
    assert two.choices == {"1": "A", "2": "B", "3": "C"}
    mid = classify_question("x", "다음 중 옳은 것은?\n1 A\n2\n3 C\n4 D")  # between: kept
    assert mid.choices == {"1": "A", "2": "", "3": "C", "4": "D"} and mid.confidence == 0.9
    # a run that starts with an empty option is no option block
    assert classify_question("x", "다음 중 옳은 것은?\n1\n2 B\n3 C\n4 D").question_type == "descriptive"


def test_classify_command_and_csv_errors(tmp_path, capsys, caplog):
    csv_path = tmp_path / "test.csv"
    csv_path.write_text('ID,Question\nTEST_000,"보안책임자는?\n1 임원\n2 직원\n3 외부인\n4 없음"\n'
                        'TEST_001,망분리의 목적을 설명하세요.\n',
                        encoding="utf-8-sig")
    out = tmp_path / "c.jsonl"
    assert fsku_main(["classify", "--input", str(csv_path), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["question_type"] for r in rows] == ["multiple_choice", "descriptive"]
    assert rows[0]["choices"]["1"] == "임원" and rows[1]["choices"] == {}
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n1,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['ID', 'Question'\]"):
        read_questions_csv(bad)
    bad.write_text('ID,Question\nA,ok\n,x\n', encoding="utf-8")
    with pytest.raises(ValueError, match=f"{bad}: row 3 has an empty ID"):
        read_questions_csv(bad)
    assert fsku_main(["classify", "--input", str(bad), "--out", str(out)]) == 2  # the file and row, one line
    assert capsys.readouterr().err.strip() == f"error: {bad}: row 3 has an empty ID"
    # row CONTENT is no error: an empty Question and options without a stem are classified and flagged
    flagged = tmp_path / "flagged.csv"
    flagged.write_text('ID,Question\nA,설명하세요.\nB,\nC,"1 가\n2 나\n3 다"\n', encoding="utf-8")
    with caplog.at_level("WARNING"):
        assert fsku_main(["classify", "--input", str(flagged), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r.get("flag", "") for r in rows] == ["", "empty question", "options but no question stem"]
    assert rows[2]["question_type"] == "multiple_choice" and rows[2]["stem"] == ""
    assert f"{flagged}: row 3 (ID B): empty question" in caplog.text
    assert f"{flagged}: row 4 (ID C): options but no question stem" in caplog.text
    assert "flagged (see the warnings): ['B', 'C']" in capsys.readouterr().out


def test_fsku_dev_sets_classify_correctly():
    import pandas as pd

    mcq = pd.read_csv(needs_shared("fsku-benchmark", "mcq_dev.csv"))
    desc = pd.read_csv(needs_shared("fsku-benchmark", "descriptive_dev.csv"))
    parsed = [classify_question(str(i), q) for i, q in enumerate(mcq["Question"])]
    assert all(p.question_type == "multiple_choice" and len(p.choices) in (4, 5) for p in parsed)
    assert all(p.parsed_question and "\n1 " not in p.parsed_question for p in parsed)
    assert all(classify_question(str(i), q).question_type == "descriptive" for i, q in enumerate(desc["Question"]))
    # option splits checked against an independent source: the gold "N text" names option N's text
    checked = 0
    for p, answer in zip(parsed, mcq["Answer"]):
        num, text = str(answer).split(" ", 1)
        if text.strip() in {t.strip() for t in p.choices.values()}:  # one label quotes a text no option has
            assert p.choices[num].strip() == text.strip()
            checked += 1
    assert checked >= 47


def test_retrieval_dev_questions_split_into_63_mcq_and_2_descriptive():
    rows = [json.loads(line)
            for line in needs_shared("fsku-benchmark", "retrieval_dev.jsonl").read_text(encoding="utf-8").splitlines()]
    kinds = [classify_question(r["qid"], r["question"]) for r in rows]
    assert sum(k.question_type == "multiple_choice" for k in kinds) == 63
    assert all((k.question_type == "multiple_choice") == str(r.get("answer", "")).isdigit() for k, r in zip(kinds, rows))


def test_two_digit_numbers_in_the_stem_are_not_options_and_blank_lines_between_options_are_skipped():
    stem = "다음은 10 가지 원칙 중 일부이다.\n12 개 기관이 참여하였다.\n다음 중 옳은 것은?"
    q = classify_question("x", stem + "\n1 가\n\n2 나\n3 다\n\n4 라")
    assert q.question_type == "multiple_choice" and q.parsed_question == stem
    assert q.choices == {"1": "가", "2": "나", "3": "다", "4": "라"}
    # a run must count down to 1 without gaps: 9 then 11 is no run of two-digit options
    broken = classify_question("y", "다음 중 옳은 것은?\n" + "\n".join(f"{j} 보기" for j in (*range(1, 10), 11)))
    assert broken.question_type == "descriptive"
    assert classify_question("d", "2024 년 개정 사항을 설명하시오.\n10 개 조항").question_type == "descriptive"
