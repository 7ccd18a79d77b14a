"""predict never dies on one row and the classifier never silently misclassifies (issue 19, items 1, 5-7):
over-long questions cut to fit and still asked, a question the model always fails on still recorded,
strict CSV reading, one-line CLI errors, 10+ / empty options, CR line endings, control characters,
and one answer per question text per run."""
import csv
import json
import math
import os
from collections import Counter

import numpy as np
import pytest

from fsku.cli import main as fsku_main
from fsku.config import InferConfig, PredictConfig
from fsku.errors import error_line, log_level
from fsku.infer import prompts
from fsku.infer.answer import Answerer, two_digit_label_logprobs
from fsku.infer.classify import FLAG_NO_STEM, classify_question, field_size_limit_for, read_question_rows, read_questions_csv
from fsku.infer.orchestrate import Orchestrator
from fsku.infer.predict import outcome_counts, outcome_lines, predict, unanswered_problem, validate_submission
from fsku.llm import LLMBackend
from fsku.stores import ResultLog

MC = "다음 중 전자금융거래법상 접근매체에 해당하는 것으로 옳은 것은?\n1 전자식 카드\n2 종이 통장\n3 신분증 사본\n4 도장"
DESC = "망분리의 목적을 설명하세요."


def _write(path, rows, encoding="utf-8-sig"):
    with path.open("w", encoding=encoding, newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["ID", "Question"])
        w.writerows(rows)
    return path


def _cfg(**kw):
    base = dict(model="tiny", kb=None, context="none", max_new_tokens=8, cache_dir="")
    return PredictConfig(**{**base, **kw})


def _submission(path):
    with path.open(encoding="utf-8-sig") as fh:
        return {r["ID"]: r["Answer"] for r in csv.DictReader(fh)}


class Wrapped(LLMBackend):
    """The tiny model behind a thin wrapper: counts the prompts it is sent and raises RuntimeError for
    prompts holding a trip text (a model that always fails on one question), optionally with a smaller window."""

    name = "wrapped"

    def __init__(self, inner, trips=(), max_model_len=None):
        self.inner, self.trips = inner, tuple(trips)
        self.model_id, self.dtype, self.device = inner.model_id, inner.dtype, inner.device
        self.max_model_len = max_model_len or inner.max_model_len
        self.tokenizer = inner.tokenizer
        self.prompts: list[str] = []

    def _check(self, text):
        self.prompts.append(text)
        if (n := len(self.tokenizer(text, add_special_tokens=False)["input_ids"])) > self.max_model_len:
            raise ValueError(f"prompt of {n} tokens exceeds max_model_len {self.max_model_len}")
        for trip in self.trips:
            if trip in text:
                raise RuntimeError(f"simulated model failure on {trip!r}")

    def fingerprint(self):
        return self.inner.fingerprint()  # the same model: the same answer-cache keys

    def option_logprobs(self, request, deadline=None):
        self._check(request.prefix + max(request.suffixes, key=len))
        return self.inner.option_logprobs(request, deadline)

    def generate(self, prompts_, *args, **kw):
        for p in prompts_:
            self._check(p)
        return self.inner.generate(prompts_, *args, **kw)

    def asked(self, text):
        return sum(text in p for p in self.prompts)


@pytest.fixture(scope="module")
def short_llm(tiny_models):
    """The tiny teacher with a 1024-token window (its few-shot template alone takes ~470 tokens): long
    questions must be cut to fit it."""
    from fsku.llm import load_llm

    return load_llm(str(tiny_models["teacher"]), backend="transformers", dtype="float32", batch_size=3, max_model_len=1024)


# ---------------------------------------------------------------- pure functions, by hand

def test_allocate_tokens_cuts_the_stem_first_and_options_only_when_they_alone_do_not_fit():
    assert prompts.allocate_tokens(100, [10, 10], 120) == (100, [10, 10])  # fits exactly: unchanged
    assert prompts.allocate_tokens(1000, [10, 20], 130, min_stem=64) == (100, [10, 20])  # stem cut to 130 - 30
    # options (410) exceed 164 - 64: the stem keeps 64, the options share 100 under one cap: 10 + 45 + 45
    assert prompts.allocate_tokens(1000, [10, 100, 300], 164, min_stem=64) == (64, [10, 45, 45])
    # a short stem keeps all of it (30 < 64); the options share 70: cap 35
    assert prompts.allocate_tokens(30, [100, 100], 100, min_stem=64) == (30, [35, 35])
    # options (90) that fit only without the stem's minimum: the stem keeps 64, the options share 36
    assert prompts.allocate_tokens(500, [60, 30], 100, min_stem=64) == (64, [18, 18])
    assert prompts.allocate_tokens(10_000, [], 300) == (300, [])  # descriptive: the whole budget
    assert prompts.allocate_tokens(5, [1, 1], 2) == (0, [1, 1])  # limit: one token per option, no stem
    with pytest.raises(ValueError, match="cannot hold 3 options"):
        prompts.allocate_tokens(5, [4, 4, 4], 2)
    with pytest.raises(ValueError, match="cannot hold 0 options"):
        prompts.allocate_tokens(5, [], 0)


def test_keep_ends_keeps_a_third_from_the_start_and_the_rest_from_the_end():
    assert prompts.keep_ends("abcdefghij", 6) == ("ab", "ghij")
    assert prompts.keep_ends("abcdefghij", 2) == ("", "ij")  # int(2/3) = 0: the end, nearest the options
    assert prompts.keep_ends("abcdefghij", 0) == ("", "")
    assert prompts.keep_ends("abc", 3) == ("abc", "") and prompts.keep_ends([1, 2, 3, 4], 3) == ([1], [3, 4])
    with pytest.raises(ValueError):
        prompts.keep_ends("abc", -1)


def test_two_digit_labels_are_scored_digit_by_digit():
    p_first = [0.5, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]  # P(first digit = 1..9)
    p_after_1 = [0.2, 0.1] + [0.0] * 8  # P(second digit = 0..9 | "1"): 0.3 goes on, 0.7 stops
    with np.errstate(divide="ignore"):
        first, second = np.log([p_first]), {1: np.log([p_after_1])}
    got = np.exp(two_digit_label_logprobs(first, second, 11))[0]
    # label 1: 0.5 * 0.7; labels 2..9 as they are; 10: 0.5 * 0.2; 11: 0.5 * 0.1
    assert got == pytest.approx([0.35, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.1, 0.05])
    assert got.sum() == pytest.approx(1.0)  # nothing lost: the labels partition the mass of "1"
    sure = np.exp(two_digit_label_logprobs(first, {1: np.log([[0.5, 0.5] + [1e-12] * 8])}, 10))[0]
    assert sure[0] == pytest.approx(0.5 * 1e-6)  # a model sure to go on: label 1 floored, not -inf
    with pytest.raises(ValueError, match="10 <= n <= 99"):
        two_digit_label_logprobs(first, second, 9)


def test_field_size_limit_admits_the_whole_file():
    assert field_size_limit_for(10) == 131072  # never below csv's default
    assert field_size_limit_for(2_000_000) == 2_000_001
    assert field_size_limit_for(2**40, maxsize=2**31 - 1) == 2**31 - 1  # a 32-bit C long


# ---------------------------------------------------------------- the classifier

@pytest.mark.parametrize("n", [10, 12])
@pytest.mark.parametrize("marker", ["{} ", "{}. ", "{}) ", "({}) ", "circled"])
def test_ten_and_more_options(n, marker):
    circled = "①②③④⑤⑥⑦⑧⑨⑩⑪⑫"
    lines = [(circled[j - 1] + " " if marker == "circled" else marker.format(j)) + f"보기 {chr(0xAC00 + j)}"
             for j in range(1, n + 1)]
    q = classify_question("x", "다음 중 옳은 것은?\n" + "\n".join(lines))
    assert q.question_type == "multiple_choice" and q.parsed_question == "다음 중 옳은 것은?"
    assert list(q.choices) == [str(j) for j in range(1, n + 1)]
    assert q.choices[str(n)] == f"보기 {chr(0xAC00 + n)}"


def test_empty_option_text_is_still_multiple_choice():
    for empty in ("2 ", "2"):
        q = classify_question("x", f"다음 중 옳은 것은?\n1 가\n{empty}\n3 다\n4 라")
        assert q.question_type == "multiple_choice"
        assert q.choices == {"1": "가", "2": "", "3": "다", "4": "라"} and q.confidence == 0.9
    # a run of bare numbers is no option block (two options with text needed)
    assert classify_question("x", "다음 중 옳은 것은?\n1\n2\n3 다").question_type == "descriptive"


@pytest.mark.parametrize("newline", ["\r", "\r\n", "mixed"])
def test_cr_only_and_mixed_line_endings(newline):
    parts = ["다음 중 옳은 것은?", "1 가", "2 나", "3 다", "4 라"]
    text = ("\r".join(parts[:2]) + "\r\n" + "\n".join(parts[2:])) if newline == "mixed" else newline.join(parts)
    q = classify_question("x", text)
    assert q.question_type == "multiple_choice" and q.confidence == 1.0
    assert q.parsed_question == "다음 중 옳은 것은?" and q.choices == {"1": "가", "2": "나", "3": "다", "4": "라"}
    d = classify_question("d", "망분리의\r목적을 설명하세요.")
    assert d.question_type == "descriptive" and d.parsed_question == "망분리의\n목적을 설명하세요."


def test_control_characters_never_reach_the_stem_or_options():
    q = classify_question("x", "다음 중\x00 옳은 것은?\x1b\n1 가\x7f\n2 나\x0b\n3 다\n4 라")
    assert q.parsed_question == "다음 중 옳은 것은?" and q.choices == {"1": "가", "2": "나", "3": "다", "4": "라"}
    assert "\x00" in q.original_text  # as given: it keys the cache
    assert classify_question("x", "\x00\x01").flag == "empty question"  # only control characters: flagged, not refused
    assert prompts.clean_answer("답\x00변입니다.") == "답변입니다."


# ---------------------------------------------------------------- reading the CSV

def test_a_two_megabyte_field_is_read(tmp_path):
    big = "가" * 2_000_000
    rows = read_questions_csv(_write(tmp_path / "big.csv", [("A", big + "?"), ("B", DESC)]))
    assert [len(q) for _, q in rows] == [2_000_001, len(DESC)]
    assert csv.field_size_limit() == 131072  # restored: the limit is process-wide


def test_an_unterminated_quote_names_the_file_and_row(tmp_path):
    eof = tmp_path / "eof.csv"
    eof.write_text('ID,Question\nTEST_000,"보안책임자는?\n1 임원\n2 직원"\nTEST_001,"망분리란?\nTEST_002,설명하세요.\n',
                   encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{eof}: row 5: unterminated quoted field.*line 5 is never closed"):
        read_questions_csv(eof)
    merged = tmp_path / "merged.csv"  # the quote opened on row 2 is closed by the one ending row 4
    merged.write_text('ID,Question\nTEST_000,"망분리란?\nTEST_001,설명하세요.\nTEST_002,무엇인가?"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{merged}: row 2: the Question holds a line that starts like a row "
                                         r"\('TEST_001,설명하세요.', line 3\)"):
        read_questions_csv(merged)
    extra = tmp_path / "extra.csv"
    extra.write_text("ID,Question\nA,다음 중, 옳은 것은?\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"row 2: 3 fields but the header has 2"):
        read_questions_csv(extra)


def test_rows_are_numbered_by_their_physical_line(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('ID,Question\n\nA,"보안책임자는?\r\n1 임원\n2 직원\r3 외부인"\nB,설명하세요.\nB,또?\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"duplicate IDs 'B' \(row 8\)"):
        read_question_rows(path)
    path.write_text('ID,Question\n\nA,"보안책임자는?\r\n1 임원\n2 직원\r3 외부인"\nB,설명하세요.\n', encoding="utf-8")
    rows = read_question_rows(path)
    assert [(line, qid) for line, qid, _ in rows] == [(3, "A"), (7, "B")]  # csv counts the CR inside the quotes as a line
    assert classify_question("A", rows[0][2]).choices == {"1": "임원", "2": "직원", "3": "외부인"}


def test_control_characters_in_the_csv(tmp_path, caplog):
    path = _write(tmp_path / "nul.csv", [("A", "다음 중\x00 옳은 것은?\n1 가\n2 나\n3 다"), ("B", DESC)])
    with caplog.at_level("WARNING"):
        rows = read_questions_csv(path)
    assert rows[0] == ("A", "다음 중 옳은 것은?\n1 가\n2 나\n3 다")
    assert "row 2 (ID A): removed 1 control character(s)" in caplog.text
    for bad_id in ("A\x00", "\x1fA"):  # \x1f would vanish in strip(): refused all the same
        with pytest.raises(ValueError, match=r"row 3: ID .* contains 1 control character\(s\)"):
            read_questions_csv(_write(tmp_path / "id.csv", [("X", DESC), (bad_id, DESC)]))
    assert read_questions_csv(_write(tmp_path / "only.csv", [("A", "\x00\x00")])) == [("A", "")]  # content: flagged later


# ---------------------------------------------------------------- one-line CLI errors

def _one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_directory_or_missing_input_is_one_error_line(tmp_path, tiny_models, capsys):
    folder, out = tmp_path / "in", tmp_path / "c.jsonl"
    folder.mkdir()
    assert fsku_main(["classify", "--input", str(folder), "--out", str(out)]) == 2
    assert _one_error_line(capsys) == f"error: {folder}: is a directory; expected a CSV file with columns ID,Question"
    assert fsku_main(["classify", "--input", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2
    assert _one_error_line(capsys) == f"error: {tmp_path / 'nope.csv'}: no such file"
    assert fsku_main(["predict", "--input", str(folder), "--out", str(tmp_path / "s.csv"), "--model",
                      str(tiny_models["teacher"]), "--kb", "none", "--context", "none", "--cache-dir", "none",
                      "--no-progress"]) == 2
    assert "is a directory" in _one_error_line(capsys)


@pytest.mark.parametrize("exc", [PermissionError(13, "Permission denied"), IsADirectoryError(21, "Is a directory"),
                                 csv.Error("field larger than field limit (131072)"), OverflowError("too big"),
                                 UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
                                 RuntimeError("two\nlines"), ValueError()])
def test_every_expected_step_error_is_one_line_and_exit_2(exc, capsys):
    from fsku.steps.args import step_main

    def run_step(cfg, progress=True):
        raise exc

    assert step_main([], InferConfig, "fsku x", None, run_step, lambda cfg, out: []) == 2
    line = _one_error_line(capsys)
    assert line == ("error: two lines" if isinstance(exc, RuntimeError) else "error: ValueError" if str(exc) == ""
                    else f"error: {exc}")


# ---------------------------------------------------------------- over-long questions

def _long_stem(min_bytes=100_000):
    body = "전자금융거래법에 따른 이용자 보호와 접근매체의 관리에 관한 긴 설명이 이어진다. "
    text = "처음 문장: 금융회사의 보안 의무. " + body * (min_bytes // len(body.encode("utf-8")) + 1)
    return text + "마지막 문장: 다음 중 옳은 것은?"


def test_fit_keeps_the_options_and_both_ends_of_the_stem(short_llm):
    stem = _long_stem()
    q = classify_question("L", stem + "\n1 전자식 카드\n2 종이 통장\n3 신분증 사본\n4 도장")
    answerer = Answerer(short_llm, InferConfig(kb=None, context="none"))
    fitted, info = answerer.fit(q)
    assert info["truncated"] and info["question_tokens"] > 20_000 and 0 < info["kept_tokens"] < 1024 - 470
    assert fitted.choices == q.choices  # options always kept
    head, tail = fitted.parsed_question.split(prompts.STEM_GAP)
    assert stem.startswith(head) and stem.endswith(tail) and tail.endswith("마지막 문장: 다음 중 옳은 것은?")
    assert 1.5 < short_llm.count_tokens(tail) / short_llm.count_tokens(head) < 2.5  # a third from the start
    for render, extra in answerer.prompt_forms(fitted, ""):
        assert short_llm.count_tokens(render(fitted.parsed_question, fitted.option_texts)) + extra <= 1024
    # options that alone exceed the window: clipped (the long ones only), the stem keeps its minimum
    long_opt = "접근매체의 분실과 도난에 관한 책임 " * 200
    q2 = classify_question("O", f"다음 중 옳은 것은?\n1 가\n2 {long_opt}\n3 {long_opt}\n4 {long_opt}")
    fitted2, info2 = answerer.fit(q2)
    assert info2["truncated"] and fitted2.parsed_question == "다음 중 옳은 것은?" and fitted2.choices["1"] == "가"
    for k in "234":
        assert 10 < len(fitted2.choices[k]) < len(q2.choices[k].strip()) and long_opt.startswith(fitted2.choices[k])
    small = Answerer(Wrapped(short_llm, max_model_len=40), InferConfig(kb=None, context="none"))
    with pytest.raises(ValueError, match="does not fit max_model_len 40"):
        small.fit(q)  # the template alone is longer than the window


def test_a_100kb_question_is_answered_cut_among_normal_ones(short_llm, tmp_path):
    long_mc = _long_stem() + "\n1 전자식 카드\n2 종이 통장\n3 신분증 사본\n4 도장"
    long_desc = _long_stem().replace("다음 중 옳은 것은?", "이 제도의 목적을 설명하세요.")
    assert len(long_mc.encode("utf-8")) > 100_000
    test_csv = _write(tmp_path / "test.csv", [("N1", MC), ("L1", long_mc), ("N2", DESC), ("L2", long_desc)])
    out = tmp_path / "submission.csv"
    result = predict(_cfg(debias="none"), test_csv, out, progress=False, llm=short_llm)
    assert validate_submission(out, test_csv) == []
    assert list(_submission(out)) == ["N1", "L1", "N2", "L2"]
    by_id = {r["ID"]: r for r in result.records}
    for qid in ("L1", "L2"):
        r = by_id[qid]
        assert r["truncated"] and r["path"] == "primary" and not r["used_fallback"] and not r["error"]
        assert r["question_tokens"] > 20_000 > r["kept_tokens"]
    assert by_id["L1"]["answer"] in {"1", "2", "3", "4"} and len(by_id["L1"]["scores"]) == 4
    assert not by_id["N1"]["truncated"] and by_id["N1"]["question_tokens"] == by_id["N1"]["kept_tokens"] > 0
    assert result.stats["truncated"] == 2


# ---------------------------------------------------------------- failures that must not end the run

def test_a_question_the_model_always_fails_on_still_gets_a_record(short_llm, tmp_path, caplog):
    trip = "폭발하는 질문"
    fail_mc = f"{trip}: 다음 중 옳은 것은?\n1 가\n2 나\n3 다\n4 라"
    rows = [("N1", MC), ("F1", fail_mc), ("F2", f"{trip}을 설명하세요."), ("N2", DESC)]
    test_csv = _write(tmp_path / "test.csv", rows)
    out = tmp_path / "submission.csv"
    llm = Wrapped(short_llm, trips=[trip])
    with caplog.at_level("WARNING"):
        result = predict(_cfg(max_unanswered_share=0.5), test_csv, out, progress=False, llm=llm)  # 2 of 4: accepted
    assert validate_submission(out, test_csv) == ["warning: row 4: F2: empty descriptive answer (valid, but scores 0)"]
    by_id = {r["ID"]: r for r in result.records}
    for qid, answer in (("F1", "1"), ("F2", "")):
        r = by_id[qid]
        assert r["path"] == "none" and r["used_fallback"] and r["answer"] == answer and r["confidence"] == 0.0
        assert r["error"].count("RuntimeError: simulated model failure") == 3  # primary, fallback, shortest prompt
        assert "no model answer" in r["error"]
    assert by_id["N1"]["path"] == by_id["N2"]["path"] == "primary"
    assert "F1: no attempt of the model gave an answer" in caplog.text and "F2: fallback failed" in caplog.text
    assert result.stats["unanswered"] == 2 and result.stats["fallback"] == 2
    assert result.stats["unanswered_ids"] == ["F1", "F2"] and result.stats["empty_questions"] == 0
    assert "2 of 4 answers are placeholders (path none: 2 unanswered by the model, 0 empty questions; IDs ['F1', 'F2'])" \
        in caplog.text  # the WARNING summary


def test_the_shortest_prompt_answers_when_the_fallback_fails_too(short_llm, tmp_path):
    # a model that fails whenever the worked examples are in the prompt: the primary and the fallback
    # both carry them (fewshot style); the last resort drops them and the model answers
    llm = Wrapped(short_llm, trips=[prompts.MC_EXAMPLES[0][0]])
    cfg = _cfg(mc_prompt="fewshot+prefill")
    orch = Orchestrator(Answerer(llm, cfg), cfg)
    records = orch.run([classify_question("Q", MC)], ResultLog(tmp_path / "p.jsonl", {}), progress=False)
    r = records[0]
    assert r["path"] == "minimal" and r["used_fallback"] and r["answer"] in {"1", "2", "3", "4"}
    assert len(r["scores"]) == 4 and r["confidence"] > 0
    assert r["error"].startswith("RuntimeError: simulated") and "; fallback: RuntimeError" in r["error"]
    assert orch.stats["fallback_errors"] == 1 and orch.stats["unanswered"] == 0


def test_ten_plus_options_and_an_empty_option_are_answered_by_the_model(tiny_llm):
    # calibrate: the content-free prompt is scored digit by digit too
    answerer = Answerer(tiny_llm, InferConfig(kb=None, context="none", debias="calibrate", mc_prompt="plain"))
    assert answerer._labels_share_first_tokens(12)  # the tiny tokenizer splits digits, like Qwen's
    q12 = classify_question("Q12", "다음 중 옳은 것은?\n" + "\n".join(f"{j} 보기{j}" for j in range(1, 13)))
    a = answerer.answer(q12, [])
    assert a.answer in q12.choices and len(a.scores) == 12 and not a.used_fallback
    assert sum(math.exp(s) for s in a.scores) == pytest.approx(1.0, abs=1e-3)  # one order: a distribution
    qe = classify_question("QE", "다음 중 옳은 것은?\n1 가\n2\n3 다\n4 라")
    e = answerer.answer(qe, [])
    assert e.answer in {"1", "2", "3", "4"} and len(e.scores) == 4 and not e.used_fallback


# ---------------------------------------------------------------- one answer per question text

def test_identical_texts_are_answered_once_without_the_cache(short_llm, tmp_path):
    llm = Wrapped(short_llm)
    test_csv = _write(tmp_path / "test.csv", [("A", MC), ("C", DESC), ("B", MC)])
    out = tmp_path / "submission.csv"
    result = predict(_cfg(debias="none", cache_dir="none"), test_csv, out, progress=False, llm=llm)
    stem = MC.split("\n")[0]
    assert llm.asked(stem) == 1  # debias none: one option-scoring request for the text, for both IDs
    sub = _submission(out)
    assert list(sub) == ["A", "C", "B"] and sub["A"] == sub["B"] and validate_submission(out, test_csv) == []
    b = {r["ID"]: r for r in result.records}["B"]
    assert b["duplicate_of"] == "A" and b["inference_time"] == 0.0 and result.stats["duplicates"] == 1
    # resumed after A was written: B is copied from the partial results, the model is not asked
    log_path = tmp_path / "again.jsonl"
    first = ResultLog(log_path, {"run": 1})
    first.append({**b, "ID": "A", "duplicate_of": ""})
    cfg = _cfg(debias="none")
    again = Wrapped(short_llm)
    records = Orchestrator(Answerer(again, cfg), cfg).run([classify_question("A", MC), classify_question("B", MC)],
                                                          ResultLog(log_path, {"run": 1}), progress=False)
    assert again.prompts == [] and [r["ID"] for r in records] == ["A", "B"] and records[1]["duplicate_of"] == "A"


def test_a_question_asked_in_an_earlier_file_comes_from_the_cache(short_llm, tmp_path):
    cache = str(tmp_path / "cache")
    first_csv = _write(tmp_path / "first.csv", [("X1", MC)])
    predict(_cfg(cache_dir=cache), first_csv, tmp_path / "first_sub.csv", progress=False, llm=short_llm)
    llm = Wrapped(short_llm)
    second_csv = _write(tmp_path / "second.csv", [("Y1", DESC), ("Y2", MC)])
    out = tmp_path / "second_sub.csv"
    result = predict(_cfg(cache_dir=cache), second_csv, out, progress=False, llm=llm)
    assert llm.asked(MC.split("\n")[0]) == 0 and result.stats["cache_hits"] == 1
    assert validate_submission(out, second_csv) == []
    assert _submission(out)["Y2"] == _submission(tmp_path / "first_sub.csv")["X1"]
    rec = {r["ID"]: r for r in result.records}["Y2"]
    assert rec["ID"] == "Y2" and json.dumps(rec)  # re-labelled with the asking row's ID, plain JSON
    assert Counter(r["path"] for r in result.records) == Counter({"primary": 2})


# ---------------------------------------------------------------- review of issue 19: rows, placeholders, errors

def test_a_row_with_an_empty_question_or_no_stem_does_not_end_the_run(short_llm, tmp_path, caplog):
    no_stem = "1 전자식 카드\n2 종이 통장\n3 신분증 사본\n4 도장"
    rows = [("N1", MC), ("E1", ""), ("S1", no_stem), ("N2", DESC), ("E2", "\x00\x07")]
    test_csv = _write(tmp_path / "test.csv", rows)  # physical lines: N1 2-6, E1 7, S1 8-11, N2 12, E2 13
    out = tmp_path / "submission.csv"
    with caplog.at_level("WARNING"):
        result = predict(_cfg(), test_csv, out, progress=False, llm=Wrapped(short_llm))  # default max_unanswered_share
    assert list(_submission(out)) == ["N1", "E1", "S1", "N2", "E2"]  # every ID written, in order
    assert validate_submission(out, test_csv) == [
        "warning: row 3: E1: empty descriptive answer to an empty question (valid, but scores 0)",
        "warning: row 6: E2: empty descriptive answer to an empty question (valid, but scores 0)"]
    assert f"{test_csv}: row 7 (ID E1): empty question; not asked" in caplog.text
    assert f"{test_csv}: row 8 (ID S1): options but no question stem; read as multiple choice" in caplog.text
    assert f"{test_csv}: row 13 (ID E2): empty question" in caplog.text
    by_id = {r["ID"]: r for r in result.records}
    e1 = by_id["E1"]
    assert e1["path"] == "none" and e1["answer"] == "" and e1["question_flag"] == "empty question"
    assert e1["error"].startswith("empty question: nothing to ask the model; no model answer")
    assert by_id["E2"]["duplicate_of"] == "E1"  # the same (empty) text
    s1 = by_id["S1"]
    assert s1["path"] == "primary" and s1["answer"] in {"1", "2", "3", "4"} and s1["question_flag"] == FLAG_NO_STEM
    s = result.stats
    assert (s["unanswered"], s["empty_questions"], s["none_ids"], s["unanswered_problem"]) == (0, 2, ["E1", "E2"], "")


def test_outcome_counts_and_the_unanswered_share_by_hand():
    records = [{"ID": f"Q{i}", "path": "primary", "error": ""} for i in range(47)]
    records += [{"ID": "F1", "path": "none", "error": "RuntimeError: boom"},
                {"ID": "E1", "path": "none", "error": "empty question: nothing to ask the model"},
                {"ID": "D1", "path": "primary", "error": "", "duplicate_of": "Q1", "truncated": True}]
    questions = [classify_question(r["ID"], "" if r["ID"] == "E1" else DESC) for r in records]
    counts = outcome_counts(records, questions)
    assert counts == {"unanswered": 1, "empty_questions": 1, "truncated": 1, "duplicates": 1, "unanswered_ids": ["F1"],
                      "none_ids": ["F1", "E1"]}
    assert unanswered_problem(records, counts, 0.02) == ""  # 1 of 50 = 0.02: at the limit, accepted
    assert unanswered_problem(records, counts, 0.019, "sub.csv") == (
        "sub.csv: 1 of 50 questions (2.0%) got no model answer (path none), more than max_unanswered_share 0.019; the "
        "submission and records are written, but check the model: F1: RuntimeError: boom")
    assert outcome_lines({**counts}) == ["unanswered 1 (path none: no model answer), empty questions 1, truncated 1, "
                                         "duplicates 1", "path none IDs (first 10): F1, E1"]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="max_unanswered_share must be in"):
            InferConfig(max_unanswered_share=bad)


def test_too_many_unanswered_rows_fail_after_the_files_are_written(short_llm, tmp_path):
    trip = "폭발하는 질문"
    test_csv = _write(tmp_path / "test.csv", [("N1", MC), ("F1", f"{trip}을 설명하세요."), ("N2", DESC)])
    llm = Wrapped(short_llm, trips=[trip])
    ok = predict(_cfg(max_unanswered_share=0.34), test_csv, tmp_path / "ok.csv", progress=False, llm=llm)
    assert ok.stats["unanswered"] == 1 and ok.stats["unanswered_problem"] == ""  # 1 of 3 <= 0.34
    out, records = tmp_path / "sub.csv", tmp_path / "records.jsonl"
    with pytest.raises(RuntimeError) as info:
        predict(_cfg(max_unanswered_share=0.33), test_csv, out, progress=False, llm=llm, records_out=records)
    line = error_line(info.value)
    assert line.startswith(f"error: {out}: 1 of 3 questions (33.3%) got no model answer (path none), more than "
                           "max_unanswered_share 0.33") and "F1: RuntimeError: simulated model failure" in line
    assert "\n" not in line
    assert validate_submission(out, test_csv) == ["warning: row 3: F1: empty descriptive answer (valid, but scores 0)"]
    recs = [json.loads(x) for x in records.read_text(encoding="utf-8").splitlines()]
    assert [r["ID"] for r in recs] == ["N1", "F1", "N2"] and recs[1]["path"] == "none"


def test_records_that_cannot_be_written_are_one_error_line(tmp_path, tiny_models, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder", encoding="utf-8")
    test_csv = _write(tmp_path / "test.csv", [("A", DESC)])
    out = tmp_path / "s.csv"
    base = ["predict", "--input", str(test_csv), "--out", str(out), "--kb", "none", "--context", "none",
            "--cache-dir", "none", "--no-progress", "--model", str(tiny_models["teacher"]), "--max-new-tokens", "4",
            "--dtype", "float32"]
    assert fsku_main(base + ["--records", str(blocker / "sub" / "records.jsonl")]) == 2  # refused before answering
    line = _one_error_line(capsys)
    assert "Not a directory" in line and str(blocker) in line and not out.exists()
    folder = tmp_path / "records_dir"  # only found when it is written, after answering: the error path covers it
    (folder / "inside").mkdir(parents=True)
    assert fsku_main(base + ["--records", str(folder)]) == 2
    assert str(folder) in _one_error_line(capsys) and out.exists()


def test_the_bundle_inference_prints_one_error_line(tmp_path, monkeypatch, capsys, caplog):
    import sys

    from fsku.package import inference

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "settings.json").write_text("{}", encoding="utf-8")
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "FSKU_MODELS_DIR"):  # main() sets them; restored afterwards
        monkeypatch.setenv(key, os.environ.get(key, ""))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    with caplog.at_level("DEBUG", logger="fsku.errors"):
        assert inference.main(["--test", str(folder), "--out", str(tmp_path / "s.csv")], bundle=bundle) == 2
    assert _one_error_line(capsys) == f"error: {folder}: is a directory; expected a CSV file with columns ID,Question"
    assert [r.exc_info[0] for r in caplog.records if r.name == "fsku.errors"] == [ValueError]  # traceback at DEBUG
    bad = tmp_path / "bad.csv"
    bad.write_text('ID,Question\nA,"열린 따옴표\nB,설명하세요.\n', encoding="utf-8")
    assert inference.main(["--test", str(bad), "--out", str(tmp_path / "s.csv")], bundle=bundle) == 2
    assert f"{bad}: row 2: unterminated quoted field" in _one_error_line(capsys)


def test_fsku_debug_sets_the_log_level(monkeypatch):
    import logging

    for value, level in (("1", logging.DEBUG), ("yes", logging.DEBUG), ("0", logging.INFO), ("", logging.INFO)):
        monkeypatch.setenv("FSKU_DEBUG", value)
        assert log_level() == level


def test_quote_placement_is_read_as_before_and_quoted_id_like_lines_are_no_error(tmp_path, caplog):
    legacy = tmp_path / "legacy.csv"
    legacy.write_text('ID,Question\nA,"망분리"란 무엇인가?\nB,"quoted"tail\nC,설명하세요.\n', encoding="utf-8")
    with caplog.at_level("WARNING"):
        rows = read_question_rows(legacy)
    assert rows == [(2, "A", "망분리란 무엇인가?"), (3, "B", "quotedtail"), (4, "C", "설명하세요.")]  # as csv.DictReader
    assert f"{legacy}: row 2: misplaced quote" in caplog.text and f"{legacy}: row 3: misplaced quote" in caplog.text
    assert "row 4" not in caplog.text
    ok = tmp_path / "ok.csv"  # quoted lines like rows: another ID shape (TEST_1 vs TEST_000), or a real ID of the file
    ok.write_text('ID,Question\nTEST_000,"다음 보기를 보고 답하시오.\nTEST_1, TEST_2 항목 중 옳은 것은?\n1 가\n2 나\n3 다"\n'
                  'TEST_001,"앞 문제를 참고하시오.\nTEST_000, 위 항목의 의미를 설명하세요."\n', encoding="utf-8")
    rows = read_question_rows(ok)
    assert [(line, qid) for line, qid, _ in rows] == [(2, "TEST_000"), (7, "TEST_001")]
    assert classify_question("TEST_000", rows[0][2]).choices == {"1": "가", "2": "나", "3": "다"}
    cr = tmp_path / "cr.csv"  # a swallowed row after a CR-only line break is found too
    cr.write_bytes('ID,Question\rTEST_000,"망분리란?\rTEST_001,설명하세요.\rTEST_002,무엇인가?"\r'.encode("utf-8"))
    with pytest.raises(ValueError, match=r"row 2: the Question holds a line that starts like a row \('TEST_001,"):
        read_question_rows(cr)


def test_the_context_gives_way_before_the_question_is_cut(short_llm):
    from fsku.retrieve import Hit

    answerer = Answerer(short_llm, InferConfig(kb=None, context="always", context_tokens=900, passage_tokens=450))
    passage = "제5조(보안사고의 보고) 금융회사등은 보안사고를 알게 된 때 24시간 이내에 보고하여야 한다. " * 40
    hits = [Hit(f"c{i}", passage, 1.0, "law.pdf", "hybrid", "법 › 제5조", i + 1, dense=0.95) for i in range(3)]
    options = "\n1 즉시\n2 24시간 이내\n3 7일 이내\n4 30일 이내"
    q = classify_question("C", "보안사고 보고 절차에 관한 설명이다. " * 20 + "다음 중 옳은 것은?" + options)
    full, full_ids = answerer.context_text(hits)
    fits = [short_llm.count_tokens(render(q.parsed_question, q.option_texts)) + extra <= 1024
            for render, extra in answerer.prompt_forms(q, full)]
    assert full_ids == ["c0", "c1"] and not all(fits)  # the question does not fit beside the whole context
    fitted, info, context, ids = answerer.fit_with_context(q, hits)
    assert not info["truncated"] and fitted.parsed_question == q.parsed_question and fitted.choices == q.choices
    assert ids == ["c0"] and 0 < len(context) < len(full) and "[자료 1]" in context
    for render, extra in answerer.prompt_forms(fitted, context):
        assert short_llm.count_tokens(render(fitted.parsed_question, fitted.option_texts)) + extra <= 1024
    a = Answerer(Wrapped(short_llm), answerer.cfg).answer(q, hits)  # the answer path uses it (Wrapped checks the window)
    assert a.path == "primary" and not a.truncated and a.context_ids == ["c0"]
    # a question longer than the window on its own: no context left, then the stem is cut
    long_q = classify_question("L", _long_stem() + "\n1 가\n2 나\n3 다\n4 라")
    fitted, info, context, ids = answerer.fit_with_context(long_q, hits)
    assert (context, ids) == ("", []) and info["truncated"] and fitted.choices == long_q.choices
