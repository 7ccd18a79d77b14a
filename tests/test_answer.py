"""Answering: the relevance gate, the context budget, debiasing paths and self-consistency (tiny model);
a real offline Qwen model when `make llm-models` has prepared it."""
import dataclasses
import math
import re

import pytest

from conftest import ROOT
from fsku.config import InferConfig
from fsku.infer.answer import Answerer, gate_passages
from fsku.infer.classify import classify_question
from fsku.llm import LLMBackend
from fsku.retrieve import Hit

Q = classify_question("Q1", "보안사고를 알게 된 금융회사등은 언제까지 보고하여야 하는가?\n"
                            "1 즉시\n2 24시간 이내\n3 7일 이내\n4 30일 이내")


def _hit(i, dense, bm25=None, text="제5조(보안사고의 보고) 금융회사등은 24시간 이내에 보고하여야 한다. " * 3):
    return Hit(f"c{i}", text, 1.0, "law.pdf", "hybrid", "법 › 제5조", i + 1, dense=dense, bm25=bm25)


def test_gate_keeps_only_relevant_passages():
    hits = [_hit(0, 0.93, 9.0), _hit(1, 0.89, 2.0), _hit(2, None, None)]
    cfg = InferConfig(kb="x", context="gated", gate_threshold=0.9, gate_scope="passage")
    assert [h.chunk_id for h in gate_passages(hits, cfg)] == ["c0"]
    assert gate_passages(hits, dataclasses.replace(cfg, context="always")) == hits
    assert gate_passages(hits, dataclasses.replace(cfg, context="none")) == []
    bm = dataclasses.replace(cfg, gate_signal="bm25", gate_threshold=1.5)
    assert [h.chunk_id for h in gate_passages(hits, bm, query_terms=4)] == ["c0"]  # 9/4 >= 1.5 > 2/4
    assert gate_passages(hits, dataclasses.replace(cfg, gate_threshold=0.99)) == []


def test_question_scope_gate_opens_for_all_passages_or_none():
    cfg = InferConfig(kb="x", context="gated", gate_threshold=0.9, gate_scope="question")
    ranked = [_hit(0, 0.89), _hit(1, 0.93), _hit(2, None)]  # fused rank order, not dense order
    assert gate_passages(ranked, cfg) == ranked  # one passage at 0.93 opens the gate, rank order kept
    assert gate_passages(ranked, dataclasses.replace(cfg, gate_threshold=0.931)) == []
    assert gate_passages(ranked, dataclasses.replace(cfg, gate_threshold=0.93)) == ranked  # >= is inclusive
    with pytest.raises(ValueError, match="gate_scope"):
        InferConfig(gate_scope="document")


def test_context_respects_the_token_budget(tiny_llm):
    cfg = InferConfig(kb="x", context="always", context_tokens=60, passage_tokens=40)
    text, ids = Answerer(tiny_llm, cfg).context_text([_hit(0, 0.95), _hit(1, 0.95), _hit(2, 0.95)])
    assert ids == ["c0", "c1"]  # 40 + the 20 left; a third passage does not fit
    body = text.split("\n\n", 1)[1]
    assert "[자료 1] (출처: law.pdf)" in body and "[자료 3]" not in body


@pytest.mark.parametrize("debias", ["none", "rotate", "calibrate", "rotate+calibrate"])
def test_every_debias_method_gives_a_valid_option(tiny_llm, debias):
    cfg = InferConfig(kb=None, context="none", debias=debias, rotations=2)
    a = Answerer(tiny_llm, cfg).answer(Q, [])
    assert a.answer in {"1", "2", "3", "4"} and 0 < a.confidence <= 1 and len(a.scores) == 4
    assert a.raw_choice in {1, 2, 3, 4} and not a.used_fallback


def test_reverse_orders_scores_the_reversed_rotations_too(tiny_llm, monkeypatch):
    seen = []
    original = Answerer.display_logprobs

    def spy(self, q, context, orders, deadline=None):
        seen.append([list(o) for o in orders])
        return original(self, q, context, orders, deadline)

    monkeypatch.setattr(Answerer, "display_logprobs", spy)
    for reverse in (False, True):
        cfg = InferConfig(kb=None, context="none", debias="rotate", reverse_orders=reverse)
        a = Answerer(tiny_llm, cfg).answer(Q, [])
        assert a.answer in {"1", "2", "3", "4"}
    assert len(seen[0]) == 4 and seen[1][:4] == seen[0] and seen[1][4] == [0, 3, 2, 1]


def test_prompt_styles_share_examples_in_the_prefix_and_score_after_the_prefill(tiny_llm):
    from fsku.infer import prompts
    from fsku.llm import OptionRequest

    assert all(InferConfig(mc_prompt=style).mc_prompt == style for style in prompts.MC_STYLES)
    options = ["즉시", "24시간 이내", "7일", "한 달"]
    plain = prompts.mc_messages("보고 기한은?", options)
    few = prompts.mc_messages("보고 기한은?", options, style="fewshot+prefill")
    # system, then two worked examples (user + assistant each), then the question
    assert len(plain) == 2 and len(few) == 2 + 2 * len(prompts.MC_EXAMPLES)
    assert [m["role"] for m in few[1:5]] == ["user", "assistant", "user", "assistant"]
    assert few[2]["content"] == "정답: 2" and few[4]["content"] == "정답: 4" and few[-1] == plain[-1]
    assert all(prompts.SPLIT not in m["content"] for m in few[:-1])
    assert prompts.mc_messages("보고 기한은?", options, style="bare") == plain[1:]
    prefix, suffix = prompts.mc_prompt_parts(tiny_llm.render_chat(few), "fewshot+prefill")
    assert "전자서명" in prefix and "개인정보처리시스템" in prefix and "24시간 이내" in suffix
    assert suffix.endswith("정답: ")
    assert prompts.mc_prompt_parts(tiny_llm.render_chat(plain), "plain")[1] == prompts.split_rendered(
        tiny_llm.render_chat(plain))[1]
    with pytest.raises(ValueError, match="unknown multiple-choice prompt style"):
        prompts.mc_messages("q", options, style="zero-shot")
    with pytest.raises(ValueError, match="mc_prompt must be one of"):
        InferConfig(mc_prompt="zero-shot")

    # the answerer scores the label right after the prefill, and keeps one content-free prior per style
    for style in prompts.MC_STYLES:
        cfg = InferConfig(kb=None, context="none", debias="rotate+calibrate", mc_prompt=style)
        answerer = Answerer(tiny_llm, cfg)
        a = answerer.answer(Q, [])
        assert a.answer in {"1", "2", "3", "4"} and len(a.scores) == 4
        texts = [Q.choices[k] for k in sorted(Q.choices, key=int)]
        pre, suf = prompts.mc_prompt_parts(tiny_llm.render_chat(
            prompts.mc_messages(Q.parsed_question, texts, style=style)), style)
        want = tiny_llm.option_logprobs(OptionRequest(pre, [suf], ["1", "2", "3", "4"]))[0]
        got = answerer.display_logprobs(Q, "", [[0, 1, 2, 3]])[0]
        assert got == pytest.approx(want, abs=1e-6)
        assert list(answerer._content_free) == [(style, 4)]


@pytest.mark.parametrize("scoring", ["cloze", "cloze-pmi", "label+cloze", "label+cloze-pmi"])
def test_cloze_scoring_uses_the_option_texts_likelihood(tiny_llm, scoring):
    import numpy as np

    from fsku.infer import options as opt
    from fsku.infer import prompts

    cfg = InferConfig(kb=None, context="none", debias="rotate", mc_scoring=scoring)
    answerer = Answerer(tiny_llm, cfg)
    a = answerer.answer(Q, [])
    assert a.answer in {"1", "2", "3", "4"} and len(a.scores) == 4 and 0 < a.confidence <= 1
    texts = [Q.choices[k] for k in sorted(Q.choices, key=int)]
    # by hand: each option text's token log-probs after the cloze prompt (and after the content-free one)
    cond = tiny_llm.continuation_logprobs([tiny_llm.render_chat(prompts.cloze_messages(Q.parsed_question))] * 4, texts)
    cloze = np.array([lp.mean() for lp in cond])
    if scoring.endswith("pmi"):
        free = tiny_llm.continuation_logprobs([tiny_llm.render_chat(prompts.cloze_messages(prompts.CONTENT_FREE))] * 4, texts)
        cloze = np.array([c.sum() - f.sum() for c, f in zip(cond, free)])
    want = opt.normalize_logprobs(cloze)
    if scoring.startswith("label"):
        label, _ = answerer.score_options(Q, "", "rotate", 0)
        want = want + opt.normalize_logprobs(label)
    assert a.scores == pytest.approx(np.round(want, 4).tolist(), abs=2e-4)
    # the fallback scores option numbers once, without the cloze passes
    fast = answerer.answer(Q, [], fast=True)
    assert fast.used_fallback and fast.answer in {"1", "2", "3", "4"}


def test_cloze_scoring_needs_a_backend_that_scores_continuations(tiny_llm):
    from fsku.llm import LLMBackend

    class NoContinuations(LLMBackend):
        name = "no-continuations"

    with pytest.raises(ValueError, match="cannot do; use backend 'transformers'"):
        Answerer(NoContinuations.__new__(NoContinuations), InferConfig(kb=None, context="none", mc_scoring="cloze"))
    with pytest.raises(ValueError, match="mc_scoring must be one of"):
        InferConfig(mc_scoring="mcp")


def test_self_consistency_votes_over_sampled_paths(tiny_llm):
    cfg = InferConfig(kb=None, context="none", self_consistency=3, sc_max_new_tokens=6)
    a = Answerer(tiny_llm, cfg).answer(Q, [])
    assert a.answer in {"1", "2", "3", "4"}
    assert a.confidence in (0.0, 1 / 3, 2 / 3, 1.0)  # a vote share (0: no path named an option)


def test_fallback_asks_the_same_model_without_context(tiny_llm):
    cfg = InferConfig(kb="x", context="always", debias="rotate")
    a = Answerer(tiny_llm, cfg).answer(Q, [_hit(0, 0.95)], fast=True)
    assert a.used_fallback and a.n_context == 0 and a.answer in {"1", "2", "3", "4"}


# ---------------------------------------------------------------- debiasing by hand on a stand-in backend

class PositionBiasedLLM(LLMBackend):
    """A stand-in backend with a known position bias: the logit of label j+1 is the content score of
    the option text shown at display position j plus BIAS[j] (the content-free text "N/A" scores 0);
    the option labels together hold e^-0.7 of the next-token mass, as in a real full-vocabulary softmax."""

    name = "position-biased"
    CONTENT = {"즉시": 0.0, "24시간 이내": 1.0, "7일 이내": 0.8, "30일 이내": -0.3, "N/A": 0.0}
    BIAS = [1.5, 0.0, -0.5, 0.2]

    def __init__(self):
        super().__init__("position-biased")  # no tokenizer: render_chat uses its plain layout
        self.shown: list[list[str]] = []  # the option texts of every scored order, in display order

    def option_logprobs(self, request, deadline=None):
        import numpy as np

        rows = []
        for suffix in request.suffixes:
            lines = re.findall(r"^([1-9]) (.+)$", suffix, flags=re.M)
            assert [n for n, _ in lines] == request.labels == ["1", "2", "3", "4"], (lines, request.labels)
            texts = [t for _, t in lines]
            self.shown.append(texts)
            logits = [self.CONTENT[t] + self.BIAS[j] for j, t in enumerate(texts)]
            lse = math.log(sum(math.exp(x) for x in logits))
            rows.append([x - lse - 0.7 for x in logits])
        return np.array(rows)


def _log_softmax(xs):
    lse = math.log(sum(math.exp(x) for x in xs))
    return [x - lse for x in xs]


def _lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


# Q's options in the original order: 즉시, 24시간 이내, 7일 이내, 30일 이내 -> content c = [0, 1, 0.8, -0.3];
# position bias b = [1.5, 0, -0.5, 0.2]. With rotations=2 the orders are the identity and the shift by 2
# ([2, 3, 0, 1]: display shows options 3, 4, 1, 2).
#   none:      one order, logits c + b = [1.5, 1.0, 0.3, -0.1] -> their log-softmax; the bias wins: option 1
#   rotate:    order 2 shows logits [0.8+1.5, -0.3+0, 0-0.5, 1+0.2] = [2.3, -0.3, -0.5, 1.2]; each option's
#              mean over the two orders is c_i + (mean bias of the two positions it held) - the mean
#              log-normaliser: c + [(1.5-0.5)/2, (0+0.2)/2, (-0.5+1.5)/2, (0.2+0)/2] = [0.5, 1.1, 1.3, -0.2]
#              minus (lse(order 1) + lse(order 2)) / 2: only half the bias cancels, option 3 wins
#   calibrate: the content-free prompt ("N/A" everywhere) gives log-softmax(b); subtracting it and
#              renormalising removes an additive bias exactly: log-softmax(c), option 2
#   rotate+calibrate: every order calibrates to log-softmax(c) in original order; the mean is the same
C, B = [0.0, 1.0, 0.8, -0.3], [1.5, 0.0, -0.5, 0.2]
HAND = {  # debias -> (chosen option, raw choice = argmax of the identity order after calibration, scores)
    "none": (1, 1, _log_softmax([1.5, 1.0, 0.3, -0.1])),
    "rotate": (3, 1, [x - (_lse([1.5, 1.0, 0.3, -0.1]) + _lse([2.3, -0.3, -0.5, 1.2])) / 2
                      for x in (0.5, 1.1, 1.3, -0.2)]),
    "calibrate": (2, 2, _log_softmax(C)),
    "rotate+calibrate": (2, 2, _log_softmax(C)),
}


@pytest.mark.parametrize("debias", sorted(HAND))
def test_debias_methods_by_hand_on_a_position_biased_backend(debias):
    want_choice, want_raw, want_scores = HAND[debias]
    llm = PositionBiasedLLM()
    answerer = Answerer(llm, InferConfig(kb=None, context="none", debias=debias, rotations=2))
    a = answerer.answer(Q, [])
    assert a.answer == str(want_choice) and a.raw_choice == want_raw and not a.used_fallback
    assert a.scores == pytest.approx(want_scores, abs=5.01e-5)  # Answer keeps 4 decimals
    probs = [math.exp(s) / sum(math.exp(x) for x in want_scores) for s in want_scores]
    assert a.confidence == pytest.approx(probs[want_choice - 1], abs=5.01e-5)
    identity, shifted = ["즉시", "24시간 이내", "7일 이내", "30일 이내"], ["7일 이내", "30일 이내", "즉시", "24시간 이내"]
    orders = [identity, shifted] if "rotate" in debias else [identity]
    prior = [["N/A"] * 4] if "calibrate" in debias else []  # the content-free prompt, scored once
    assert llm.shown == orders + prior
    scores, raw = answerer.score_options(Q, "", debias, 2)
    assert scores.tolist() == pytest.approx(want_scores, abs=1e-9) and raw == want_raw
    assert llm.shown[-1] == orders[-1]  # the content-free prior was cached, not asked again


@pytest.mark.parametrize("debias, want", [("none", "none"), ("rotate", "none"), ("calibrate", "calibrate"),
                                          ("rotate+calibrate", "calibrate")])
def test_fallback_keeps_calibration_but_scores_one_order(debias, want):
    llm = PositionBiasedLLM()
    a = Answerer(llm, InferConfig(kb=None, context="none", debias=debias, rotations=2)).answer(Q, [], fast=True)
    want_choice, want_raw, want_scores = HAND[want]
    assert a.used_fallback and a.answer == str(want_choice) and a.raw_choice == want_raw
    assert a.scores == pytest.approx(want_scores, abs=5.01e-5)


REAL = ROOT / "models" / "qwen2.5-coder-0.5b-instruct"


@pytest.mark.skipif(not (REAL / "config.json").exists(), reason="real offline model absent (make llm-models)")
def test_real_offline_qwen_answers_through_the_backend_layer():
    from fsku.llm import load_llm

    llm = load_llm(str(REAL), backend="transformers")
    a = Answerer(llm, InferConfig(kb=None, context="none", max_new_tokens=24)).answer(Q, [])
    assert a.answer in {"1", "2", "3", "4"}
    d = Answerer(llm, InferConfig(kb=None, context="none", max_new_tokens=24)).answer(
        classify_question("D1", "일회용 비밀번호(OTP)를 설명하세요."), [])
    assert d.answer and "<|im_end|>" not in d.answer


def test_best_gate_score_on_each_signal():
    from types import SimpleNamespace

    from fsku.config import InferConfig
    from fsku.infer.answer import best_gate_score

    hits = [SimpleNamespace(dense=0.81, bm25=6.0, rerank=None), SimpleNamespace(dense=0.93, bm25=2.0, rerank=0.4)]
    assert best_gate_score(hits, InferConfig(gate_signal="dense")) == 0.93
    assert best_gate_score(hits, InferConfig(gate_signal="bm25", gate_threshold=1.0), query_terms=3) == 2.0
    assert best_gate_score(hits, InferConfig(gate_signal="rerank", gate_threshold=0.1, reranker="llm")) == 0.4
    assert best_gate_score([], InferConfig()) is None
