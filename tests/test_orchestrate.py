"""Orchestrator: circuit breaker, time limit -> same-model fallback, resumable result log, cache."""
import json

import pytest

from fsku.config import InferConfig
from fsku.infer.answer import Answer, Answerer
from fsku.infer.classify import classify_question
from fsku.infer.orchestrate import BreakerState, CircuitBreaker, Orchestrator
from fsku.stores import AnswerCache, ResultLog, make_key


def test_circuit_breaker_transitions():
    b = CircuitBreaker(failures=2, cooldown=2)
    assert b.allow_primary()
    b.record_failure()
    assert b.state is BreakerState.CLOSED
    b.record_failure()
    assert b.state is BreakerState.OPEN and b.opened == 1
    assert [b.allow_primary(), b.allow_primary()] == [False, False]  # cooldown: fallback only
    assert b.allow_primary() and b.state is BreakerState.HALF_OPEN  # one trial
    b.record_failure()
    assert b.state is BreakerState.OPEN and b.opened == 2  # the trial failed: open again
    b.allow_primary(), b.allow_primary()
    assert b.allow_primary() and b.state is BreakerState.HALF_OPEN
    b.record_success()
    assert b.state is BreakerState.CLOSED


def test_result_log_resumes_and_tolerates_a_cut_last_line(tmp_path):
    path = tmp_path / "p.jsonl"
    log = ResultLog(path, {"config": "a"})
    log.append({"ID": "q1", "answer": "1"})
    log.append({"ID": "q2", "answer": "2"})
    with path.open("a") as fh:
        fh.write('{"ID": "q3", "ans')  # killed mid-write
    again = ResultLog(path, {"config": "a"})
    assert set(again.done) == {"q1", "q2"}
    again.append({"ID": "q3", "answer": "3"})
    lines = path.read_text().splitlines()
    assert [json.loads(x).get("ID") for x in lines[1:]] == ["q1", "q2", "q3"]
    with pytest.raises(ValueError, match="different run"):
        ResultLog(path, {"config": "b"})
    assert ResultLog(path, {"config": "b"}, restart=True).done == {}


def _questions(n=4):
    return [classify_question(f"Q{i}", f"금융보안 문제 {i}는 무엇인가?\n1 가\n2 나\n3 다\n4 라") for i in range(n)]


def test_time_limit_gives_a_flagged_answer_from_the_same_model(tiny_llm, tmp_path):
    cfg = InferConfig(model="tiny", kb=None, context="none", time_limit_s=1e-9, cache_dir="")
    orch = Orchestrator(Answerer(tiny_llm, cfg), cfg)
    records = orch.run(_questions(2), ResultLog(tmp_path / "p.jsonl", {"x": 1}), progress=False)
    for r in records:
        assert r["used_fallback"] and "time limit" in r["error"]
        assert r["answer"] in {"1", "2", "3", "4"} and len(r["scores"]) == 4  # option scores: the model answered
    assert orch.stats["timeouts"] == 2


class FlakyAnswerer(Answerer):
    """The primary path always fails; the fallback works."""

    def __init__(self, llm, cfg):
        super().__init__(llm, cfg)
        self.primary_calls = 0

    def answer(self, q, hits, fast=False, deadline=None, query_terms=1):
        if not fast:
            self.primary_calls += 1
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().answer(q, hits, fast=True)


def test_breaker_opens_after_repeated_failures(tiny_llm, tmp_path):
    cfg = InferConfig(model="tiny", kb=None, context="none", breaker_failures=2, breaker_cooldown=3, cache_dir="")
    answerer = FlakyAnswerer(tiny_llm, cfg)
    orch = Orchestrator(answerer, cfg)
    records = orch.run(_questions(6), ResultLog(tmp_path / "p.jsonl", {"x": 1}), progress=False)
    assert all(r["used_fallback"] for r in records)
    # Q0, Q1 fail -> OPEN; Q2..Q4 skip the primary; Q5 is the half-open trial
    assert answerer.primary_calls == 3
    assert [r["error"] for r in records[2:5]] == ["circuit breaker open"] * 3
    assert orch.stats["breaker_opened"] == 2  # opened by Q1, reopened by the failed trial Q5


def test_answers_are_cached_by_question_kb_model_and_config(tiny_llm, tmp_path):
    cfg = InferConfig(model="tiny", kb=None, context="none", cache_dir=str(tmp_path / "cache"))
    cache = AnswerCache(cfg.cache_dir)
    first = Orchestrator(Answerer(tiny_llm, cfg), cfg, cache).run(_questions(3), ResultLog(tmp_path / "a.jsonl", {}),
                                                                  progress=False)
    orch = Orchestrator(Answerer(tiny_llm, cfg), cfg, cache)
    second = orch.run(_questions(3), ResultLog(tmp_path / "b.jsonl", {}), progress=False)
    assert orch.stats["cache_hits"] == 3
    assert [r["answer"] for r in first] == [r["answer"] for r in second]
    other = InferConfig(model="tiny", kb=None, context="none", cache_dir=cfg.cache_dir, debias="none")
    orch2 = Orchestrator(Answerer(tiny_llm, other), other, cache)
    orch2.run(_questions(3), ResultLog(tmp_path / "c.jsonl", {}), progress=False)
    assert orch2.stats["cache_hits"] == 0  # another config is another key
    assert cache.invalidate(f"answer|*cfg={orch.cfg_hash}*") == 3
    assert cache.invalidate("answer|*") == 3
    assert len(cache) == 0
    nocache = AnswerCache("")
    nocache.set("k", 1)
    assert nocache.get("k") is None and not nocache.enabled


def test_cache_keys_reject_separators():
    assert make_key("answer", kb="a", q="b") == "answer|kb=a|q=b"
    with pytest.raises(ValueError, match=r"cache key part kb='a\|b' must not contain '\|'"):
        make_key("answer", kb="a|b")


def test_answer_record_round_trip():
    a = Answer("Q1", "2", "multiple_choice", 0.7, scores=[-1.0, -0.5])
    assert Answer(**a.to_record()) == a


def test_every_answer_affecting_field_is_in_the_cache_key():
    import dataclasses

    from fsku.config import InferConfig
    from fsku.infer.orchestrate import ANSWER_FIELDS, NON_ANSWER_FIELDS, answer_config_hash

    names = {f.name for f in dataclasses.fields(InferConfig)}
    assert set(NON_ANSWER_FIELDS) <= names and set(ANSWER_FIELDS) == names - set(NON_ANSWER_FIELDS)
    base = InferConfig()
    for change in ({"gate_scope": "passage"}, {"repetition_penalty": 1.1}, {"gate_threshold": 0.8}, {"debias": "none"}):
        assert answer_config_hash(dataclasses.replace(base, **change)) != answer_config_hash(base), change
    assert answer_config_hash(dataclasses.replace(base, time_limit_s=5.0, batch_size=2)) == answer_config_hash(base)


def test_cached_retrievals_come_back_as_the_same_hits(tiny_llm, sample_kb, tmp_path):
    """Retrievals are cached as JSON and rebuilt into Hits: the second run answers from identical context."""
    kb = sample_kb[0]
    cfg = InferConfig(model="tiny", kb=str(kb.folder), context="always", cache_dir=str(tmp_path / "cache"))
    cache = AnswerCache(cfg.cache_dir)
    qs = [classify_question("R1", "전자금융거래법상 접근매체의 정의로 옳은 것은?\n1 가\n2 나\n3 다\n4 라")]
    first = Orchestrator(Answerer(tiny_llm, cfg, kb), cfg, cache)._retrieve(qs)
    again = Orchestrator(Answerer(tiny_llm, cfg, kb), cfg, cache)._retrieve(qs)
    assert cache.hits >= 1 and first[0][0] and type(again[0][0][0]) is type(first[0][0][0])
    assert [h.to_dict() for h in again[0][0]] == [h.to_dict() for h in first[0][0]] and again[0][1] == first[0][1]


class RerankingAnswerer(Answerer):
    """Retrieval that reads with the answering model (as the llm reranker does): 7 prompts of known
    length for the whole batch, whatever its size."""

    PROMPTS = [f"가나다라 {i}" for i in range(7)]

    def retrieve(self, queries):
        self.llm.generate(self.PROMPTS, max_new_tokens=1)
        return [([], 1) for _ in queries]


def test_tokens_spent_during_a_batch_retrieval_are_shared_out_over_its_questions(tiny_llm, tmp_path):
    from fsku.config import FusionSettings
    from fsku.llm.base import TokenMeter

    class UnreadKB:  # retrieval runs only with a KB; this one is never searched
        manifest, params, has_dense, folder = {}, {}, False, "kb"

        def retrieve_defaults(self):
            return FusionSettings()

    meter = TokenMeter(tiny_llm)
    cfg = InferConfig(model="tiny", kb="kb", context="always", cache_dir="", batch_size=3)
    orch = Orchestrator(RerankingAnswerer(meter, cfg, UnreadKB()), cfg)
    spent_per_batch = sum(tiny_llm.count_tokens(p) for p in RerankingAnswerer.PROMPTS)
    records = orch.run(_questions(3), ResultLog(tmp_path / "p.jsonl", {"x": 1}), progress=False)
    answered = Orchestrator(Answerer(TokenMeter(tiny_llm), InferConfig(model="tiny", kb=None, context="none",
                                                                       cache_dir="")), cfg)
    plain = answered.run(_questions(3), ResultLog(tmp_path / "q.jsonl", {"x": 2}), progress=False)
    extra = [r["tokens_read"] - p["tokens_read"] for r, p in zip(records, plain)]
    assert sum(extra) == spent_per_batch and max(extra) - min(extra) <= 1  # the remainder goes to the first ones
    assert sum(r["tokens_read"] for r in records) == meter.tokens_read
