"""The reranking stage: fusion with the first stage (hand-computed), the registry and its errors, a
tiny cross-encoder and the llm reranker with the tiny LM (built from config), and predict's use of it
(retrieval re-ordered, the gate on the reranker's score)."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fsku.config import InferConfig
from fsku.rerank import LLM_LABELS, LLMReranker, Reranker, fuse_rerank, load_reranker, rerank_hits, rerank_order
from fsku.retrieve import Hit


def test_fuse_rerank_hand_computed():
    first, rr = [3.0, 2.0, 1.0], [0.0, 10.0, 5.0]
    assert fuse_rerank(first, rr, 1.0) == pytest.approx([0.0, 1.0, 0.5])
    assert fuse_rerank(first, rr, 0.0) == pytest.approx([1.0, 0.5, 0.0])
    assert fuse_rerank(first, rr, 0.5) == pytest.approx([0.5, 0.75, 0.25])
    assert rerank_order(first, rr, 1.0) == [1, 2, 0]
    assert rerank_order(first, rr, 0.0) == [0, 1, 2]
    assert rerank_order(first, [1.0, 1.0, 1.0], 1.0) == [0, 1, 2]  # a reranker that cannot tell keeps the order
    with pytest.raises(ValueError, match="3 first-stage scores but 2"):
        fuse_rerank(first, [1.0, 2.0], 1.0)


class ByLength(Reranker):
    """Longer passage = more relevant (a stand-in with a known order)."""

    def __init__(self):
        self.calls = []

    def score(self, question, passages):
        self.calls.append(list(passages))
        return np.array([float(len(p)) for p in passages])


def _hits(texts):
    return [Hit(f"c{i}", t, 1.0 - 0.1 * i, "s.pdf", "hybrid", rank=i + 1) for i, t in enumerate(texts)]


def test_rerank_hits_reorders_the_head_and_keeps_the_tail():
    hits = _hits(["a", "ccc", "bb", "dddd"])
    reranker = ByLength()
    got = rerank_hits("q", hits, reranker, top_n=3, weight=1.0)
    assert [h.chunk_id for h in got] == ["c1", "c2", "c0", "c3"]  # only the first 3 re-scored; c3 stays last
    assert [h.rank for h in got] == [1, 2, 3, 4]
    assert [h.rerank for h in got] == [3.0, 2.0, 1.0, None]
    assert reranker.calls == [["a", "ccc", "bb"]]
    assert [h.chunk_id for h in rerank_hits("q", hits, reranker, top_n=3, weight=1.0, top_k=2)] == ["c1", "c2"]
    assert [h.chunk_id for h in rerank_hits("q", hits, None, top_n=3, weight=1.0, top_k=2)] == ["c0", "c1"]
    assert rerank_hits("q", [], reranker, 3, 1.0) == []
    assert hits[0].rank == 1 and hits[0].rerank is None  # the input hits are not changed


def test_registry_and_config_errors():
    assert load_reranker("none") is None
    with pytest.raises(ValueError, match="unknown reranker 'colbert'"):
        load_reranker("colbert")
    with pytest.raises(ValueError, match="needs reranker_model"):
        load_reranker("cross-encoder")
    with pytest.raises(ValueError, match="needs the answering model"):
        load_reranker("llm")
    with pytest.raises(ValueError, match="reranker must be one of"):
        InferConfig(reranker="bm25")
    with pytest.raises(ValueError, match="needs reranker_model"):
        InferConfig(reranker="cross-encoder")
    with pytest.raises(ValueError, match="gate_signal 'rerank' needs a reranker"):
        InferConfig(gate_signal="rerank")
    with pytest.raises(ValueError, match="rerank_weight"):
        InferConfig(reranker="llm", rerank_weight=1.5)


def test_tiny_cross_encoder_scores_pairs(tiny_models, tmp_path):
    from fsku.llm.tiny import build_tiny_cross_encoder

    folder = build_tiny_cross_encoder(tmp_path / "ce", tiny_models["tokenizer"])
    ce = load_reranker("cross-encoder", str(folder))
    passages = ["전자금융거래의 안전성 확보", "개인정보의 처리", "신용카드 가맹점"]
    scores = ce.score("전자금융 안전성", passages)
    assert scores.shape == (3,) and np.isfinite(scores).all() and len(set(np.round(scores, 6))) > 1
    assert np.allclose(ce.score("전자금융 안전성", passages), scores)  # deterministic (eval mode)
    got = rerank_hits("전자금융 안전성", _hits(passages), ce, top_n=3, weight=1.0)
    assert [h.rerank for h in got] == sorted(scores.tolist(), reverse=True)
    assert ce.score("q", []).shape == (0,)


def test_llm_reranker_is_the_label_logprob_difference(tiny_llm):
    from fsku.llm import OptionRequest

    rr = LLMReranker(tiny_llm, passage_tokens=20)
    prefix, after = rr.request_parts("전자서명의 효력은?")
    assert "전자서명의 효력은?" in prefix and "예 또는 아니오" in after and after.endswith("<|im_start|>assistant\n")
    passages = ["전자서명은 서명으로서의 효력을 가진다. " * 10, "신용카드 가맹점 수수료"]
    scores = rr.score("전자서명의 효력은?", passages)
    manual = tiny_llm.option_logprobs(OptionRequest(prefix, [tiny_llm.truncate_tokens(p, 20) + after for p in passages],
                                                    list(LLM_LABELS)))
    assert scores == pytest.approx(manual[:, 0] - manual[:, 1])
    assert rr.score("q", []).shape == (0,)


def test_predict_reranks_with_its_own_model_and_gates_on_the_score(tiny_llm, sample_kb):
    from fsku.infer.answer import Answerer, gate_passages

    kb = sample_kb[0]
    cfg = InferConfig(kb=str(kb.folder), context="gated", top_k=3, reranker="llm", rerank_top_n=5,
                      gate_signal="rerank", gate_threshold=-1e9)
    answerer = Answerer(tiny_llm, cfg, kb)
    assert answerer.reranker().llm is tiny_llm  # the answering model itself: one LLM
    q = "전자금융거래의 안전성 확보 의무는?"
    hits, _ = answerer.retrieve([q])[0]
    first = kb.search([q], top_k=5)[0]
    scores = LLMReranker(tiny_llm).score(q, [h.text for h in first])
    expected = [first[i].chunk_id for i in rerank_order([h.score for h in first], scores, 1.0)][:3]
    assert [h.chunk_id for h in hits] == expected and all(h.rerank is not None for h in hits)
    assert gate_passages(hits, cfg) == hits
    closed = dataclasses.replace(cfg, gate_threshold=max(h.rerank for h in hits) + 1e-6)
    assert gate_passages(hits, closed) == []


def test_eval_retrieval_with_a_reranker(tiny_models, sample_kb, tmp_path, capsys):
    from fsku.cli import main
    from fsku.llm.tiny import build_tiny_cross_encoder

    folder = build_tiny_cross_encoder(tmp_path / "ce", tiny_models["tokenizer"])
    kb = str(sample_kb[0].folder)
    labels = str(Path(__file__).resolve().parents[1] / "evaluation" / "sample_retrieval.jsonl")
    assert main(["eval-retrieval", "--kb", kb, "--labels", labels, "--reranker", "cross-encoder", "--reranker-model",
                 str(folder), "--rerank-top-n", "5", "--group", "article"]) == 0
    out = capsys.readouterr().out
    assert "reranker cross-encoder" in out and "group=article" in out and '"hit_at_1"' in out
    assert main(["eval-retrieval", "--kb", kb, "--labels", labels, "--reranker", "llm"]) == 2
    assert "needs the answering model" in capsys.readouterr().err
