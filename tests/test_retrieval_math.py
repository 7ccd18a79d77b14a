import numpy as np
import pytest

from fsku.evaluate.retrieval import LabelledQuery, evaluate_hits, hit_at_k, is_relevant, mrr_at_k, recall_at_k
from fsku.index.dense import token_budget_batches
from fsku.retrieve import minmax_fusion, minmax_normalize, rank_fused, rrf_fusion, top_candidates


def test_minmax_normalize_values_and_limits():
    assert np.allclose(minmax_normalize(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])
    assert np.allclose(minmax_normalize(np.array([5.0, 5.0])), [1.0, 1.0])
    assert np.allclose(minmax_normalize(np.array([0.0, 0.0])), [0.0, 0.0])
    assert minmax_normalize(np.array([])).size == 0


def test_minmax_fusion_hand_computed():
    cands = {"bm25": ([0, 1, 2], [10.0, 5.0, 0.0]), "dense": ([2, 3], [0.9, 0.7])}
    fused = minmax_fusion(cands, {"bm25": 0.3, "dense": 0.7})
    # bm25 norm: 0->1, 1->0.5, 2->0 ; dense norm: 2->1, 3->0
    assert fused == pytest.approx({0: 0.3, 1: 0.15, 2: 0.7, 3: 0.0})
    assert rank_fused(fused, 2) == [(2, pytest.approx(0.7)), (0, pytest.approx(0.3))]
    only_bm25 = minmax_fusion(cands, {"bm25": 1.0, "dense": 0.0})
    assert rank_fused(only_bm25, 1)[0][0] == 0


def test_rrf_hand_computed():
    fused = rrf_fusion({"a": [1, 2], "b": [2, 3]}, k=60)
    assert fused[2] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[1] == pytest.approx(1 / 61) and fused[3] == pytest.approx(1 / 62)
    assert rank_fused(fused, 1)[0][0] == 2
    assert rrf_fusion({}, k=60) == {}


def test_top_candidates_orders_and_breaks_ties():
    idx, sc = top_candidates(np.array([0.1, 0.9, 0.9, 0.5]), 3)
    assert idx.tolist() == [1, 2, 3] and sc.tolist() == [0.9, 0.9, 0.5]
    assert top_candidates(np.array([1.0]), 5)[0].tolist() == [0]


def test_metrics_hand_computed():
    rel = [[False, True, False], [True, False, False], [False, False, False]]
    assert hit_at_k(rel, 1) == pytest.approx(1 / 3)
    assert hit_at_k(rel, 2) == pytest.approx(2 / 3)
    assert mrr_at_k(rel, 3) == pytest.approx((0.5 + 1 + 0) / 3)
    assert recall_at_k([[True, True, False]], [4], 2) == 1.0
    assert recall_at_k([[True, False, False]], [2], 3) == 0.5
    assert hit_at_k([], 1) == 0.0


def test_relevance_needs_gold_source_and_evidence_ignoring_whitespace():
    q = LabelledQuery("q", "?", "전자금융거래법", "미리 정한 약정에 따라")
    assert is_relevant("/d/전자금융거래법.pdf", "…미리 정한약정에\n따라 …", q)
    assert not is_relevant("/d/전자금융거래법 시행령.pdf", "미리 정한 약정에 따라", q)
    assert not is_relevant("/d/전자금융거래법.pdf", "다른 내용", q)
    out = evaluate_hits([q], [[{"source": "/d/x.pdf", "text": "abc"},
                               {"source": "/d/전자금융거래법.pdf", "text": "미리 정한 약정에 따라"}]])
    assert out["metrics"]["hit_at_1"] == 0.0 and out["metrics"]["hit_at_3"] == 1.0
    assert out["metrics"]["mrr_at_10"] == 0.5 and out["metrics"]["mean_hit_chars"] == pytest.approx((3 + 12) / 2)


def test_token_budget_batches():
    batches = token_budget_batches([10, 300, 20, 300, 5], budget=600)
    assert batches[0] == [1, 3]  # the two longest share a batch of 2 x 300
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    assert all(max([10, 300, 20, 300, 5][i] for i in b) * len(b) <= 600 for b in batches)


def test_reference_prior_hand_computed():
    from fsku.retrieve import article_refs, law_base_name, law_match, reference_prior

    assert article_refs("전자금융거래법 제 21 조의 3 및 제7조에 따라") == {"제21조의3", "제7조"}
    assert law_base_name("전자금융거래법 시행령") == "전자금융거래법"
    q = "전자금융거래법 제7조에 따르면?"
    assert law_match(q, "전자금융거래법") == 1.0
    assert law_match(q, "전자금융거래법 시행령") == 0.5
    assert law_match("개인정보보호법상 의무는?", "개인정보 보호법") == 1.0  # spacing ignored
    titles = ["전자금융거래법", "전자금융거래법", "전자금융거래법 시행령", "전자서명법"]
    articles = ["제7조", "제8조", "제7조", "제7조"]
    prior = reference_prior(q, titles, articles, w_law=0.1, w_article=0.2)
    assert prior == pytest.approx({0: 0.3, 1: 0.1, 2: 0.05 + 0.1})
    assert reference_prior("제7조의 내용은?", titles, articles, 0.1, 0.2) == pytest.approx({0: 0.2, 2: 0.2, 3: 0.2})
    assert reference_prior("아무 인용 없음", titles, articles, 0.1, 0.2) == {}


def test_load_labels_errors_name_file_and_line(tmp_path):
    from fsku.evaluate.retrieval import load_labels

    p = tmp_path / "labels.jsonl"
    p.write_text('{"qid": "a", "question": "q", "law": "법", "evidence": "e"}\n\n{"qid": "b", "question": "q"}\n',
                 encoding="utf-8")
    with pytest.raises(ValueError, match=r"labels.jsonl:3: missing field\(s\) \['evidence', 'source\|law'\]"):
        load_labels(p)
    p.write_text('[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"labels.jsonl:1: expected a JSON object"):
        load_labels(p)
    p.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="no labelled queries"):
        load_labels(p)
