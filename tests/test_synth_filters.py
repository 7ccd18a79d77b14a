"""synth_qa pure parts: JSON repair, record construction, every quality filter (positive and
negative cases), near duplicates, decontamination, split by article."""
import json

import pytest

from fsku.synth import filters as F
from fsku.synth.parse import ParseError, parse_json_object
from fsku.synth.records import SyntheticQA, from_teacher_json, read_jsonl, render_mc_question, write_jsonl
from fsku.synth.split import split_by_group

CHUNK = ("전자금융거래법 › 제21조의2(전자금융거래기록의 보존) 금융회사등은 전자금융거래의 내용을 추적·검색하거나 "
         "오류를 확인·정정할 수 있는 기록을 5년 동안 보존하여야 한다. 다만 1만원 이하의 거래기록은 1년 동안 보존한다.")


def ws(texts):
    """A whitespace tokenizer: hand-countable overlaps."""
    return [[F.normalize(w) for w in t.split() if F.normalize(w)] for t in texts]


def mc(stem="전자금융거래기록의 보존기간으로 옳은 것은?", options=("5년", "3년", "1년", "10년"), answer="1", qtype="lookup"):
    obj = {"question": stem, "choices": list(options), "answer": answer, "difficulty": 2}
    return from_teacher_json(obj, kind="multiple_choice", qtype=qtype, chunk_id="c1",
                             source_article="전자금융거래법 제21조의2", teacher_model="t", prompt_version="v1")


def desc(answer="금융회사등은 전자금융거래 기록을 5년 동안 보존하여야 한다.", keywords=("보존기간", "5년"), qtype="procedural"):
    obj = {"question": "전자금융거래기록의 보존 의무를 설명하세요.", "answer": answer, "keywords": list(keywords)}
    return from_teacher_json(obj, kind="descriptive", qtype=qtype, chunk_id="c1",
                             source_article="전자금융거래법 제21조의2", teacher_model="t", prompt_version="v1")


# -- parsing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,value,repairs", [
    ('{"a": 1}', {"a": 1}, ()),
    ('답은 다음과 같습니다.\n```json\n{"q": "x", "c": ["a", "b",],}\n```', {"q": "x", "c": ["a", "b"]},
     ("code_fence", "trailing_commas")),
    ("{'a': '나', 'ok': True, 'n': None}", {"a": "나", "ok": True, "n": None}, ("python_literals", "single_quotes")),
    ('{"q": “스마트”}', {"q": "스마트"}, ("curly_quotes",)),
    ('설명 {"a": {"b": "}"}} 끝', {"a": {"b": "}"}}, ("surrounding_text",)),
    # cut off by the token cap: the half-written value is dropped, brackets closed
    ('{"question": "질문", "choices": ["1년", "2년"], "answer": "2", "why": "중간에 끊',
     {"question": "질문", "choices": ["1년", "2년"], "answer": "2"}, ("closed_truncated",)),
    ('{"q": "x", "choices": ["a", "b', {"q": "x", "choices": ["a"]}, ("closed_truncated",)),
])
def test_parse_json_object_repairs(text, value, repairs):
    got = parse_json_object(text)
    assert got.value == value and got.repairs == repairs


@pytest.mark.parametrize("text,reason", [
    ("", "empty_output"), ("JSON이 없습니다", "no_json_object"), ('{"a": }', "invalid_json"),
    ('{"que', "truncated_unrecoverable"), ("{'a': \"b\" 'c'}", "invalid_json"),
])
def test_parse_json_object_rejects_with_a_reason(text, reason):
    with pytest.raises(ParseError) as err:
        parse_json_object(text)
    assert err.value.reason == reason


def test_parse_never_evaluates():
    with pytest.raises(ParseError):
        parse_json_object("__import__('os').system('echo pwned')")


# -- records -------------------------------------------------------------------------------------

def test_from_teacher_json_builds_competition_format():
    item = mc(options=("1) 5년", "② 3년", "3. 1년", "10년"))
    assert item.question == "전자금융거래기록의 보존기간으로 옳은 것은?\n1 5년\n2 3년\n3 1년\n4 10년"
    assert item.choices == {"1": "5년", "2": "3년", "3": "1년", "4": "10년"} and item.answer_text == "5년"
    # only an option's own number is a prefix: a leading quantity stays
    assert mc(options=("3 영업일", "2 5영업일", "7일", "4 10일")).choices \
        == {"1": "3 영업일", "2": "5영업일", "3": "7일", "4": "10일"}
    assert mc(options=("1년", "(2) 2년", "3.5%", "4)4년")).choices == {"1": "1년", "2": "2년", "3": "3.5%", "4": "4년"}
    assert item.difficulty_level == 2 and item.context_chunk_ids == ["c1"]
    with pytest.raises(ValueError, match="answer_out_of_range"):
        mc(answer="7")
    with pytest.raises(ValueError, match="missing_choices"):
        from_teacher_json({"question": "q?", "answer": "1"}, kind="multiple_choice", qtype="lookup", chunk_id="c",
                          source_article="a", teacher_model="t", prompt_version="v")
    d = from_teacher_json({"질문": "설명하세요.", "정답": "답이다.", "키워드": "보존, 5년"}, kind="descriptive", qtype="lookup",
                          chunk_id="c", source_article="a", teacher_model="t", prompt_version="v")
    assert d.keywords == ["보존", "5년"] and d.difficulty_level == 3
    with pytest.raises(ValueError, match="malformed_keywords"):
        from_teacher_json({"question": "q", "answer": "a", "keywords": 3}, kind="descriptive", qtype="lookup",
                          chunk_id="c", source_article="a", teacher_model="t", prompt_version="v")


def test_jsonl_roundtrip_and_validation(tmp_path):
    items = [mc(), desc()]
    path = tmp_path / "qa.jsonl"
    assert write_jsonl(items, path) == 2
    assert [r.to_dict() for r in read_jsonl(path)] == [r.to_dict() for r in items]
    bad = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    bad["difficulty_level"] = 9
    path.write_text(json.dumps(bad, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"qa.jsonl:1: difficulty_level must be 1-5"):
        read_jsonl(path)
    path.write_text('{"qa_id": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"qa.jsonl:1: not a synth_qa record"):
        read_jsonl(path)


# -- per-item filters ----------------------------------------------------------------------------

def test_check_format_accepts_good_items():
    assert F.check_format(mc()) is None
    assert F.check_format(mc(stem="보존기간에 관한 설명으로 옳지 않은 것은?", qtype="negative")) is None
    assert F.check_format(desc()) is None


@pytest.mark.parametrize("item,reason", [
    (lambda: mc(options=("5년", "3년", "1년")), "option_count"),
    (lambda: mc(options=("5년", "5 년", "1년", "10년")), "duplicate_options"),
    (lambda: mc(options=("전자금융거래기록의 보존기간으로 옳은 것은", "3년", "1년", "10년")), "option_repeats_stem"),
    (lambda: mc(qtype="negative"), "negative_without_negative_stem"),
    (lambda: mc(options=("5년", "", "1년", "10년")), "empty_option"),
    (lambda: desc(keywords=()), "keyword_count"),
    (lambda: desc(keywords=("a", "b", "c", "d")), "keyword_count"),
    (lambda: desc(keywords=("보존", "보 존")), "bad_keywords"),
])
def test_check_format_rejects(item, reason):
    assert F.check_format(item()) == reason


def test_check_format_uses_the_inference_classifier():
    # a stem that itself ends in a numbered line makes the rendered text ambiguous for the parser
    item = mc(stem="다음 중 옳은 것은?\n1 가")
    assert F.check_format(item) in ("classifier_disagrees", "option_count")


def test_select_keywords_keeps_supported_ones():
    answer = "금융회사등은 전자금융거래기록을 5년 동안 보존하여야 한다."
    assert F.select_keywords(["보존", "5 년", "보 존", "클라우드", "금융회사등", "기록"], answer, CHUNK) \
        == ["보존", "5 년", "금융회사등"]
    assert F.select_keywords(["클라우드"], answer, CHUNK) == []
    assert F.select_keywords(["다만"], answer, CHUNK) == ["다만"]  # in the source, not the answer
    assert F.select_keywords([], answer, CHUNK) == []


def test_check_language_and_length():
    assert F.hangul_ratio("CISO는 독립적") == pytest.approx(4 / 8)
    assert F.hangul_ratio("123 !!") == 0.0
    assert F.check_language(mc()) is None
    assert F.check_language(mc(stem="Which retention period is correct?")) == "not_korean_question"
    assert F.check_language(desc(answer="Records are kept for five years.")) == "not_korean_answer"
    assert F.check_length(mc()) is None
    assert F.check_length(mc(stem="옳은 것?")) == "question_length"
    assert F.check_length(mc(options=("가" * 201, "3년", "1년", "10년"))) == "option_length"
    assert F.check_length(desc(answer="짧다")) == "answer_length"


def test_grounding_score_hand_computed():
    assert F.token_overlap(["a", "b", "c", "d"], ["a", "c", "x"]) == 0.5
    assert F.token_overlap([], ["a"]) == 1.0
    # "5년" is in the chunk; "10년" is not
    assert F.grounding_score(mc(), CHUNK, ws) == 1.0
    assert F.grounding_score(mc(options=("10년", "3년", "1년", "5년")), CHUNK, ws) == 0.0
    # negative stem: the three true options (distractors) must be supported: 5년 yes, 1년 yes, 3년 no
    neg = mc(stem="보존기간에 관한 설명으로 옳지 않은 것은?", options=("5년", "3년", "1년", "10년"), answer="4", qtype="negative")
    assert F.grounding_score(neg, CHUNK, ws) == pytest.approx(2 / 3)
    # descriptive negative: supported by stating that the rule does not say so
    assert F.grounding_score(desc(answer="해당 조문은 보존 장소를 규정하고 있지 않습니다.", qtype="negative"), CHUNK, ws) == 1.0
    assert F.grounding_score(desc(answer="보존 장소는 본점 전산실이다.", qtype="negative"), CHUNK, ws) == 0.0


# -- pool-level filters --------------------------------------------------------------------------

def test_near_duplicates_keep_the_first_of_each_group():
    texts = ["전자금융거래기록의 보존기간으로 옳은 것은?", "전자금융거래기록의 보존 기간으로 옳은 것은?!",
             "개인정보 보호책임자의 업무가 아닌 것은?", "전자금융거래기록의 보존기간으로 옳은 것은?", ""]
    assert F.near_duplicates(texts, threshold=0.7) == [1, 3]
    assert F.near_duplicates(texts, threshold=1.01) == []
    assert F.near_duplicates([]) == []
    a, b = F.char_ngrams("abcdef", 3), F.char_ngrams("abcxyz", 3)
    assert F.jaccard(a, b) == pytest.approx(1 / 7)


def test_contaminated_catches_copied_and_lightly_edited_eval_questions():
    eval_qs = ["다음 중 전자금융거래법상 접근매체에 해당하지 않는 것은?\n1 전자식 카드\n2 비밀번호\n3 공인인증서\n4 주민등록증"]
    pool = [eval_qs[0],
            "다음 중 전자금융거래법에서 접근매체에 해당하지 않는 것은?\n1 전자식 카드\n2 비밀번호\n3 공인인증서\n4 주민등록증",
            "전자금융거래기록의 보존기간으로 옳은 것은?"]
    assert F.contaminated(pool, eval_qs) == [0, 1]
    assert F.contaminated(pool, []) == []


# -- split ---------------------------------------------------------------------------------------

def test_split_by_article_never_shares_an_article():
    groups = [f"law {i % 37}" for i in range(400)] + ["big"] * 30
    splits = split_by_group(groups, seed=3)
    by_group = {}
    for g, s in zip(groups, splits):
        by_group.setdefault(g, set()).add(s)
    assert all(len(s) == 1 for s in by_group.values())
    shares = {s: splits.count(s) / len(splits) for s in ("train", "validation", "test")}
    assert shares["train"] == pytest.approx(0.8, abs=0.05) and shares["test"] == pytest.approx(0.1, abs=0.05)
    assert split_by_group(list(reversed(groups)), seed=3) == list(reversed(splits))  # order-independent
    assert split_by_group(groups, seed=4) != splits
    assert split_by_group(["a", "a"], ratios=(1, 0, 0)) == ["train", "train"]
    with pytest.raises(ValueError, match="ratios"):
        split_by_group(["a"], ratios=(1, 1))


def test_render_mc_question_matches_competition_lines():
    assert render_mc_question(" 옳은 것은? ", ["가", "나"]) == "옳은 것은?\n1 가\n2 나"


def test_record_validation_errors_name_the_problem():
    with pytest.raises(ValueError, match="kind must be"):
        SyntheticQA(qa_id="x", kind="essay", qtype="lookup", question="q", answer="a")


# -- templated items (format lessons for the tiny teacher) ----------------------------------------

def test_templated_items_pass_the_filters():
    import random

    from fsku.synth.templated import sentences, templated_item

    path = "전자금융거래법 › 제21조의2(전자금융거래기록의 보존)"
    text = path + "\n" + CHUNK.split(" ", 2)[2] + "\n② 금융회사등은 보존 기록을 안전한 장소에 두어야 한다."
    own = sentences(text, path)
    assert own[0].startswith("금융회사등은 전자금융거래의 내용을") and all(len(s) <= 81 for s in own)
    others = ["이용자는 접근매체를 제3자에게 대여하여서는 아니 된다.", "금융회사등은 보안사고를 24시간 이내에 보고하여야 한다.",
              "전자금융업자는 자본금 요건을 갖추어야 한다.", "정보보호최고책임자는 임원으로 지정하여야 한다."]
    rng = random.Random(0)
    for kind, qtype, n in (("multiple_choice", "lookup", 4), ("multiple_choice", "procedural", 5),
                           ("multiple_choice", "negative", 4), ("descriptive", "lookup", 0), ("descriptive", "negative", 0)):
        obj = templated_item(own, "전자금융거래법", "제21조의2", kind, qtype, n, others, rng)
        if obj is None:
            assert kind == "multiple_choice" and qtype == "negative"  # needs n-1 own sentences
            continue
        item = from_teacher_json(obj, kind=kind, qtype=qtype, chunk_id="c", source_article="a", teacher_model="t",
                                 prompt_version="v")
        assert F.check_format(item) is None and F.check_language(item) is None and F.check_length(item) is None
        assert F.grounding_score(item, text, ws) >= 0.5, obj
    assert templated_item(sentences("짧다"), "법", "제1조", "descriptive", "lookup", 0, others, rng) is None


# -- templates -----------------------------------------------------------------------------------

def test_templates_cover_every_kind_and_type_and_render_completely(tmp_path):
    from fsku.synth.records import KINDS, QTYPES
    from fsku.synth.templates import _load, load_templates

    templates = load_templates()
    assert set(templates) == {(k, q) for k in KINDS for q in QTYPES}
    for (kind, qtype), t in templates.items():
        assert t.version.startswith(t.name) and t.kind == kind and t.qtype == qtype
        msgs = t.render(title="전자금융거래법", article="제21조의2", chunk=CHUNK, n_options=5)
        assert [m["role"] for m in msgs] == ["system", "user"]
        user = msgs[1]["content"]
        assert "$" not in user and CHUNK in user and "전자금융거래법 제21조의2" in user and "JSON" in user
        if kind == "multiple_choice":
            assert "정확히 5개" in user
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: x\nkind: descriptive\nqtype: lookup\nsystem: s\nuser: $chunk $secret\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown placeholders \['secret'\]"):
        _load(bad)
    bad.write_text("version: x\nkind: essay\nqtype: lookup\nsystem: s\nuser: u\n", encoding="utf-8")
    with pytest.raises(ValueError, match="kind must be one of"):
        _load(bad)


def test_judge_threshold_keeps_and_drops():
    import pandas as pd

    from fsku.synth.process import FilterSettings, process

    chunks = pd.DataFrame([{"chunk_id": "c1", "doc_id": "d", "title": "전자금융거래법", "path": "", "article": "제21조의2",
                            "text": CHUNK}])
    good = {"question": "전자금융거래기록의 보존기간으로 옳은 것은?", "choices": ["5년", "3년", "1년", "10년"], "answer": 1}
    other = {"question": "1만원 이하 거래기록의 보존기간으로 옳은 것은?", "choices": ["1년", "3년", "7년", "10년"], "answer": 1}
    raw = [{"ID": f"t{i}", "chunk_id": "c1", "kind": "multiple_choice", "qtype": "lookup",
            "text": json.dumps(o, ensure_ascii=False)}
           for i, o in enumerate((good, other))]
    scores = {"전자금융거래기록의 보존기간으로 옳은 것은?": 8.5}
    out = process(raw, chunks, ws, FilterSettings(), judge=lambda item, chunk: scores.get(item.stem, 3.0))
    assert [a.stem for a in out.accepted] == [good["question"]] and out.accepted[0].overall_quality_score == 8.5
    assert [(r["ID"], r["reason"], r["score"]) for r in out.rejected] == [("t1", "judge_below_threshold", 3.0)]
