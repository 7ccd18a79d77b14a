"""Integration tests on the real statutes and FSKU dev labels in ../shared (skipped when absent)."""
import pytest

from conftest import needs_shared
from fsku.config import BuildKBConfig, RetrieveConfig
from fsku.evaluate.retrieval import evaluate_retrieval
from fsku.ingest import ingest_corpus
from fsku.kb import build_knowledge_base


def test_statute_pdf_ingest_and_articles(tmp_path):
    pdf = needs_shared("law-pdf", "전자금융거래법.pdf")
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / pdf.name).write_bytes(pdf.read_bytes())
    docs, _ = ingest_corpus(corpus, progress=False)
    text = docs[0].text
    assert "국가법령정보센터" not in text and "법제처" not in text
    assert "전자금융업의 건전한 발전" in text  # a wrapped line rejoined without a stray space
    from fsku.chunk import char_length, chunk_document

    chunks = chunk_document(docs[0], 700, 0, char_length)
    paths = {c.path for c in chunks}
    assert ("전자금융거래법 › 제3장 전자금융거래의 안전성 확보 및 이용자 보호 › "
            "제21조의3(전자금융기반시설의 취약점 분석ㆍ평가)") in paths
    assert any("부칙" in p for p in paths)


@pytest.mark.slow
def test_bm25_retrieval_on_real_statutes(tmp_path):
    corpus = needs_shared("law-pdf")
    labels = needs_shared("fsku-benchmark", "retrieval_dev.jsonl")
    cfg = BuildKBConfig(corpus=str(corpus), out=str(tmp_path / "kb"), embedding_model="none", length_unit="chars",
                        chunk_size=700)
    kb, stats = build_knowledge_base(cfg, progress=False)
    assert stats["documents"] == 32 and stats["skipped"] == 0
    metrics, _ = evaluate_retrieval(kb, str(labels), RetrieveConfig(top_k=10, w_bm25=1.0))
    # floors well under today's numbers: this guards against regressions in parsing/chunking/BM25
    assert metrics["hit_at_5"] >= 0.9 and metrics["mrr_at_10"] >= 0.8
