"""Descriptive strategies: the key-phrase line, length fitting, consensus picking, the copy check
(pure, hand-computed), the strategies on a scripted backend and the re-ask path with the tiny model."""
import dataclasses

import numpy as np
import pytest

from fsku.config import DESC_STRATEGY_NAMES, InferConfig
from fsku.infer import descriptive as d
from fsku.infer.answer import Answerer
from fsku.infer.classify import classify_question
from fsku.llm import LLMBackend
from fsku.llm.base import Generation
from fsku.retrieve import Hit

QUESTION = "전자금융업자의 자본금 요건이 업무별로 차등화된 이유를 설명하세요."
DQ = classify_question("D1", QUESTION)
PASSAGE = ("전자금융업자는 업무의 종류별로 대통령령으로 정하는 금액 이상의 자본금을 갖추어야 하며 "
           "그 금액은 업무의 위험에 따라 다르다.")


@pytest.mark.parametrize("text, phrases, answer", [
    ("키워드: 자본금 차등화, 결제 리스크\n업무별 리스크가 다르기 때문입니다.", ["자본금 차등화", "결제 리스크"],
     "업무별 리스크가 다르기 때문입니다."),
    ("**핵심 키워드**: \"CISO 독립성\"\n\n답변: 겸직을 금지합니다.", ["CISO 독립성"], "겸직을 금지합니다."),
    ("Keywords: 망분리 / 망분리, 내부통제; 접근통제, 로그\n설명: 분리합니다.", ["망분리", "내부통제", "접근통제"], "분리합니다."),
    ("키워드: DB 커널 암호화(TDE), (파일 암호화\n차이입니다.", ["DB 커널 암호화(TDE)", "파일 암호화"], "차이입니다."),
    ("답: 키워드 줄 없이 답합니다.", [], "키워드 줄 없이 답합니다."),
    ("", [], ""),
])
def test_parse_keyword_answer(text, phrases, answer):
    assert d.parse_keyword_answer(text) == (phrases, answer)


def test_a_phrase_longer_than_the_cap_is_not_a_key_phrase():
    long = "가" * (d.MAX_PHRASE_CHARS + 1)
    assert d.parse_keyword_answer(f"키워드: {long}, 자본금\n답.")[0] == ["자본금"]


def test_keep_phrases_puts_the_missing_ones_in_front():
    assert d.keep_phrases("업무별 리스크가 다릅니다.", ["자본금 차등화", "리스크"]) == "자본금 차등화: 업무별 리스크가 다릅니다."
    assert d.keep_phrases("자본금 차등화는 리스크 때문입니다.", ["자본금차등화"]) == "자본금 차등화는 리스크 때문입니다."
    assert d.keep_phrases("", ["자본금", "리스크"]) == "자본금, 리스크"
    assert d.keep_phrases("답입니다.", []) == "답입니다."


def test_fit_length_keeps_whole_sentences_then_caps():
    text = "첫 문장입니다. 둘째 문장입니다. 셋째 문장입니다."
    assert d.fit_length(text) == text
    assert d.fit_length(text, target_chars=18) == "첫 문장입니다. 둘째 문장입니다."  # 18 characters exactly
    assert d.fit_length(text, target_chars=17) == "첫 문장입니다."
    assert d.fit_length(text, target_chars=3) == "첫 문장입니다."  # always the first sentence
    assert d.fit_length(text, max_chars=12) == "첫 문장입니다."  # the sentence end before 12
    assert d.fit_length("하나 둘 셋 넷 다섯 여섯", max_chars=9) == "하나 둘 셋 넷"  # no sentence end: the last space
    assert d.fit_length("가" * 20, max_chars=5) == "가" * 5  # no space: a hard cut


def test_char_bigram_similarity_by_hand():
    sim = d.char_bigram_similarity(["가나다", "나다라", "마바"])
    # {가나, 나다} vs {나다, 다라}: 1 / 3; nothing shared with {마바}
    assert sim[0, 1] == pytest.approx(1 / 3) and sim[0, 2] == 0 and sim[1, 1] == 1 and np.allclose(sim, sim.T)


def test_medoid_on_hand_made_vectors():
    v = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    sim = v @ v.T  # mean similarity to the others: 0.467, 0.733, 0.733, 0.467
    kw = [set(), set(), set(), set()]
    assert d.medoid(sim, kw, 0.5) == 1  # a tie between 1 and 2 goes to the lower index
    # key-phrase agreement breaks it: 2 shares its phrase with 3
    assert d.medoid(sim, [{"a"}, {"b"}, {"c"}, {"c"}], 0.5) == 2
    assert d.medoid(np.ones((1, 1)), [{"a"}]) == 0
    with pytest.raises(ValueError, match="n keyword sets"):
        d.medoid(sim, kw[:3])


def test_copy_check_on_hand_made_strings():
    answer = "자본금을 갖추어야 하며 그 금액은 업무의 위험에 따라 다르다."
    c = d.copy_check(answer, PASSAGE, max_run=20, max_overlap=1.0)
    assert c.longest_run == len("자본금을갖추어야하며그금액은업무의위험에따라다르다.") and c.copied
    assert c.overlap == 1.0  # every 8-gram of the answer is in the passage
    assert not d.copy_check(answer, PASSAGE, max_run=0, max_overlap=1.0).copied  # both limits off
    own = "업무마다 위험이 달라 필요한 자본 규모도 다릅니다."
    c = d.copy_check(own, PASSAGE, max_run=20, max_overlap=0.5)
    assert not c.copied and c.longest_run < 20 and c.overlap == 0.0
    assert d.copy_check(answer, "", 1, 0.0) == d.CopyCheck(0, 0.0, False)  # no context, no copy
    # 1 of its 3 8-grams
    assert d.copy_check("abcdefghij", "xxabcdefgh", max_run=0, max_overlap=0.5).overlap == pytest.approx(1 / 3, abs=1e-4)


class Scripted(LLMBackend):
    """A backend that answers from a script, one text per generated sequence, and records the calls."""

    name = "scripted"

    def __init__(self, texts):
        super().__init__("scripted")
        self.texts, self.calls = list(texts), []

    def option_logprobs(self, request, deadline=None):
        raise NotImplementedError

    def truncate_tokens(self, text, max_tokens):  # characters stand for tokens
        return text[:max_tokens]

    def count_tokens(self, text):
        return len(text)

    def generate(self, prompts, max_new_tokens=256, temperature=0.0, seed=0, max_time=None, repetition_penalty=1.0):
        self.calls.append((list(prompts), temperature))
        return [Generation(self.texts.pop(0), 10, -0.1, False) for _ in prompts]


def test_strategies_on_a_scripted_backend():
    kw = "키워드: 자본금 차등화\n업무별 결제 리스크가 다르기 때문입니다."
    cfg = InferConfig(kb=None, context="none", desc_strategy="keywords")
    llm = Scripted([kw])
    a = Answerer(llm, cfg).answer(DQ, [])
    assert a.answer == "자본금 차등화: 업무별 결제 리스크가 다르기 때문입니다." and a.desc_keywords == ["자본금 차등화"]
    assert "키워드: " in llm.calls[0][0][0] and llm.calls[0][1] == 0.0  # the keyword instruction, greedy
    # consensus: 3 samples in one call at desc_temperature; the one closest to the others wins (0 and 2 agree)
    agree = "키워드: 자본금 차등화\n업무별 결제 리스크가 달라 자본금을 다르게 정합니다."
    llm = Scripted([agree, "키워드: 날씨\n오늘은 맑습니다.", agree])
    a = Answerer(llm, dataclasses.replace(cfg, desc_strategy="consensus", desc_samples=3)).answer(DQ, [])
    assert len(llm.calls) == 1 and len(llm.calls[0][0]) == 3 and llm.calls[0][1] == 0.7
    assert a.answer == "자본금 차등화: 업무별 결제 리스크가 달라 자본금을 다르게 정합니다."
    assert a.desc_candidates == 3 and a.desc_keywords == ["자본금 차등화"]
    # a sample with key phrases and no answer is no candidate; a keyword answer without one asks the plain prompt
    llm = Scripted(["키워드: 자본금", "키워드: 자본금 차등화\n리스크가 다릅니다.", "키워드: 자본금"])
    a = Answerer(llm, dataclasses.replace(cfg, desc_strategy="consensus", desc_samples=3)).answer(DQ, [])
    assert a.answer == "자본금 차등화: 리스크가 다릅니다."
    llm = Scripted(["키워드: 자본금 차등화", "업무별 위험이 다릅니다."])
    a = Answerer(llm, cfg).answer(DQ, [])
    assert a.answer == "자본금 차등화: 업무별 위험이 다릅니다." and "키워드" not in llm.calls[1][0][0]
    # greedy: the plain instruction, the text as written
    llm = Scripted(["업무별 위험이 다르기 때문입니다."])
    a = Answerer(llm, dataclasses.replace(cfg, desc_strategy="greedy")).answer(DQ, [])
    assert a.answer == "업무별 위험이 다르기 때문입니다." and "키워드" not in llm.calls[0][0][0] and a.desc_keywords == []


def test_a_copied_answer_is_rephrased_once_and_flagged():
    hit = Hit("c0", PASSAGE, 1.0, "law.pdf", "hybrid", "법 › 제3조", 1, dense=0.95)
    cfg = InferConfig(kb="x", context="always", desc_strategy="greedy", copy_max_run=20)
    copied = "자본금을 갖추어야 하며 그 금액은 업무의 위험에 따라 다르다."
    llm = Scripted([copied, "업무마다 위험이 달라 필요한 자본 규모도 다릅니다."])
    a = Answerer(llm, cfg).answer(DQ, [hit])
    assert a.rephrased and not a.copied and a.answer == "업무마다 위험이 달라 필요한 자본 규모도 다릅니다."
    assert "그대로" in llm.calls[1][0][0] and copied in llm.calls[1][0][0]  # the re-ask shows the answer
    # still copied after the re-ask: kept, flagged
    llm = Scripted([copied, copied])
    a = Answerer(llm, cfg).answer(DQ, [hit])
    assert a.rephrased and a.copied and a.copy_run > 20
    # without context nothing is checked, nothing re-asked
    llm = Scripted([copied])
    a = Answerer(llm, dataclasses.replace(cfg, context="none")).answer(DQ, [hit])
    assert not a.rephrased and not a.copied and len(llm.calls) == 1


def test_the_re_ask_runs_through_the_tiny_model(tiny_llm, monkeypatch):
    import fsku.infer.answer as answer_module

    checks = []

    def always_copied_first(text, context, max_run, max_overlap, n=8):
        checks.append(text)
        return d.CopyCheck(99, 1.0, len(checks) == 1)

    monkeypatch.setattr(answer_module, "copy_check", always_copied_first)
    hit = Hit("c0", PASSAGE, 1.0, "law.pdf", "hybrid", "법 › 제3조", 1, dense=0.95)
    cfg = InferConfig(kb="x", context="always", desc_strategy="keywords", max_new_tokens=12)
    a = Answerer(tiny_llm, cfg).answer(DQ, [hit])
    assert len(checks) == 2  # checked, re-asked, checked again
    assert a.rephrased and not a.copied and a.answer == checks[1]


def test_consensus_with_the_tiny_model_draws_k_samples_in_one_call(tiny_llm, monkeypatch):
    calls = []
    real = tiny_llm.generate

    def counting(prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(prompts, *args, **kwargs)

    monkeypatch.setattr(tiny_llm, "generate", counting)
    cfg = InferConfig(kb=None, context="none", desc_strategy="consensus", desc_samples=3, max_new_tokens=8)
    a = Answerer(tiny_llm, cfg).answer(DQ, [])
    assert calls[0] == 3 and a.desc_candidates == 3


def test_strategy_registry_errors():
    with pytest.raises(ValueError, match="desc_strategy must be one of greedy|keywords|consensus"):
        InferConfig(desc_strategy="essay")
    with pytest.raises(ValueError, match="unknown descriptive strategy 'essay'"):
        d.run_strategy("essay", None, None)
    assert set(d.DESC_STRATEGIES) == set(DESC_STRATEGY_NAMES)  # the config's names are the registry's
    with pytest.raises(ValueError, match="copy_max_overlap"):
        InferConfig(copy_max_overlap=1.5)
    with pytest.raises(ValueError, match="desc_samples"):
        InferConfig(desc_samples=0)
