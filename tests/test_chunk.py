from dataclasses import dataclass

from fsku.chunk import (
    Chunk,
    char_length,
    chunk_document,
    chunk_documents,
    looks_like_statute,
    merge_pieces,
    pack_article,
    parse_statute,
    recursive_split,
    strip_amendment_notes,
)

STATUTE = """[시행 2024. 1. 1.]
제1장 총칙
제1조(목적) 이 법은 목적을 정한다.
제2조(정의) 용어의 뜻은 다음과 같다. <개정 2020. 2. 4.>
1. "가"란 첫째를 말한다.
2. "나"란 둘째를 말한다.
제2장 보호
제1절 일반
제3조(보호) ① 첫째 항이다.
② 둘째 항이다.
제3조의2(특례) 특례를 둔다.
제4조 삭제 <2019. 1. 1.>
제5조(기간) 기간은 1년으로 한다.
제5조(기간) 기간은 2년으로 한다.
[시행일: 2026. 1. 1.] 제5조
부칙 <제1호, 2024. 1. 1.>
제1조(시행일) 이 법은 공포한 날부터 시행한다.
제2조(경과조치) 종전 규정에 따른다.
"""


@dataclass
class Doc:
    doc_id: str = "d1"
    source: str = "/x/테스트법.pdf"
    title: str = "테스트법"
    text: str = STATUTE
    pages: list = None

    def __post_init__(self):
        self.pages = self.pages or [[1, 0, len(self.text)]]


def test_parse_statute_structure():
    preamble, arts = parse_statute(STATUTE)
    assert preamble == ["[시행 2024. 1. 1.]"]
    assert [a.number for a in arts] == ["제1조", "제2조", "제3조", "제3조의2", "제4조", "제5조", "제5조", "제1조", "제2조"]
    assert arts[2].divisions == ["제2장 보호", "제1절 일반"]
    assert arts[0].divisions == ["제1장 총칙"]
    assert arts[6].variant == "시행일: 2026. 1. 1."  # the future-effective duplicate is marked
    assert arts[5].variant == ""
    assert arts[7].part.startswith("부칙") and arts[7].divisions == []  # addenda restart numbering
    assert arts[4].title == ""  # deleted article


def test_statute_chunks_have_paths_and_no_amendment_notes():
    chunks = chunk_document(Doc(), size=200, overlap=0, length=char_length)
    paths = [c.path for c in chunks]
    assert "테스트법 › 제2장 보호 › 제1절 일반 › 제3조(보호)" in paths
    assert "테스트법 › 부칙 <제1호, 2024. 1. 1.> › 제1조(시행일)" in paths
    assert any(p.endswith("제5조(기간) [시행일: 2026. 1. 1.]") for p in paths)
    c2 = next(c for c in chunks if c.article == "제2조" and "부칙" not in c.path)
    assert c2.text.startswith("테스트법 › 제1장 총칙 › 제2조(정의)\n제2조(정의)")
    assert "<개정" not in c2.text and '2. "나"란' in c2.text  # items kept inside the article
    assert len({c.chunk_id for c in chunks}) == len(chunks)


def test_long_article_splits_at_paragraphs_then_items():
    lines = ["제9조(긴 조문) 머리말.", "① " + "가" * 50, "② " + "나" * 50, "1. " + "다" * 30, "2. " + "라" * 30]
    pieces = pack_article(lines, size=70, overlap=0, length=char_length)
    assert pieces[0].startswith("제9조(긴 조문) 머리말.\n① ")
    assert pieces[1].startswith("② ")
    assert all(len(p) <= 70 for p in pieces[:1])
    assert any(p.startswith("1. ") for p in pieces) or any("1. " in p for p in pieces)
    assert "".join(pieces).replace("\n", "") == "".join(lines)


def test_recursive_split_respects_size_and_overlap():
    text = " ".join(f"문장{i}이다." for i in range(100))
    pieces = recursive_split(text, size=60, overlap=15, length=char_length)
    assert all(len(p) <= 60 for p in pieces)
    assert len(pieces) > 5
    assert pieces[0].split()[-1] in pieces[1]  # overlap carries the tail forward
    assert recursive_split("", 10, 0, char_length) == []
    assert recursive_split("짧다", 10, 0, char_length) == ["짧다"]
    assert all(len(p) <= 7 for p in recursive_split("가" * 50, 7, 0, char_length))


def test_merge_pieces_overlap_limits():
    assert merge_pieces(["ab", "cd", "ef"], size=4, overlap=0, length=char_length) == ["abcd", "ef"]
    assert merge_pieces(["ab", "cd", "ef"], size=4, overlap=2, length=char_length) == ["abcd", "cdef"]


def test_markdown_and_plain_documents():
    md = Doc(text="# 가이드\n서론.\n## 비밀번호\n비밀번호는 길게.\n## 피싱\n링크를 누르지 않는다.",
             source="/x/g.md", title="가이드")
    chunks = chunk_document(md, 200, 0, char_length)
    assert [c.path for c in chunks] == ["가이드 › 가이드", "가이드 › 가이드 › 비밀번호", "가이드 › 가이드 › 피싱"]
    assert not looks_like_statute(md.text) and looks_like_statute(STATUTE)


def test_identical_chunks_are_deduplicated():
    a = Doc(text="같은 본문이다.", source="/x/a.txt", title="a", doc_id="a")
    b = Doc(text="같은 본문이다.", source="/x/b.txt", title="b", doc_id="b")
    chunks, dropped = chunk_documents([a, b], 100, 0, char_length, progress=False)
    assert len(chunks) == 1 and dropped == 1
    assert isinstance(chunks[0], Chunk) and chunks[0].n_tokens == len(chunks[0].text)


def test_chunk_cap_leaves_the_other_documents_chunks_as_they_were():
    """The sample corpus: a cap no document exceeds changes nothing (ids, order, dedup count); a cap
    the largest document exceeds drops exactly it, and the rest is what chunking them alone gives."""
    from conftest import SAMPLE_CORPUS
    from fsku.ingest import ingest_corpus

    docs, _ = ingest_corpus(SAMPLE_CORPUS, progress=False)
    uncapped, dupes = chunk_documents(docs, 120, 16, char_length, progress=False)
    sizes = [len(chunk_document(d, 120, 16, char_length)) for d in docs]
    assert len(docs) >= 3 and max(sizes) > sorted(sizes)[-2]  # the largest document stands alone
    oversized: list = []
    at_cap, at_cap_dupes = chunk_documents(docs, 120, 16, char_length, progress=False, max_chunks_per_doc=max(sizes),
                                           oversized=oversized)
    assert [c.chunk_id for c in at_cap] == [c.chunk_id for c in uncapped] and at_cap_dupes == dupes
    assert [c.to_row() for c in at_cap] == [c.to_row() for c in uncapped] and oversized == []

    largest = docs[sizes.index(max(sizes))]
    capped, _ = chunk_documents(docs, 120, 16, char_length, progress=False, max_chunks_per_doc=max(sizes) - 1,
                                oversized=oversized)
    assert oversized == [(largest, max(sizes))]
    rest, _ = chunk_documents([d for d in docs if d is not largest], 120, 16, char_length, progress=False)
    assert [c.chunk_id for c in capped] == [c.chunk_id for c in rest] and largest.doc_id not in {c.doc_id for c in capped}


def test_chunk_cap_counts_a_documents_own_chunks_whatever_the_order():
    """Counted before deduplication: a document over the cap is dropped even when most of its chunks
    repeat another document's, and its chunks never hide the other document's."""
    a = Doc(text="첫째 문단이다.\n\n둘째 문단이다.", source="/x/a.txt", title="a", doc_id="a")
    c = Doc(text="첫째 문단이다.\n\n둘째 문단이다.\n\n셋째 문단만 새롭다.", source="/x/c.txt", title="c", doc_id="c")
    assert len(chunk_document(a, 10, 0, char_length)) == 2 and len(chunk_document(c, 10, 0, char_length)) == 3
    for order in ([a, c], [c, a]):
        oversized: list = []
        chunks, dropped = chunk_documents(order, 10, 0, char_length, progress=False, max_chunks_per_doc=2,
                                          oversized=oversized)
        assert [(d.doc_id, n) for d, n in oversized] == [("c", 3)]
        assert {ch.doc_id for ch in chunks} == {"a"} and len(chunks) == 2 and dropped == 0


def test_strip_amendment_notes():
    assert strip_amendment_notes("본문이다. <개정 2020. 2. 4., 2021. 1. 1.>") == "본문이다."
    assert strip_amendment_notes("[본조신설 2013. 5. 22.]") == ""
    assert strip_amendment_notes("11. 삭제<2017. 4. 18.>") == "11. 삭제<2017. 4. 18.>"


def test_token_length_counts_tokens(e5_model_dir):
    from fsku.chunk import make_length_fn

    length = make_length_fn("tokens", e5_model_dir)
    n = length("전자금융거래법 제14조")
    assert 3 <= n <= 12
    length.warm(["전자금융거래법 제14조", "다른 문장"])
    assert length("전자금융거래법 제14조") == n


def test_split_items_repeat_their_introducing_clause():
    lead = "② 다음 각 호의 자에게는 2천만원 이하의 과태료를 부과한다."
    lines = ["제51조(과태료) ① 첫째 항.", lead] + [f"{i}. " + "가" * 30 + f" 위반{i}" for i in range(1, 7)]
    pieces = pack_article(lines, size=120, overlap=0, length=char_length)
    item_pieces = [p for p in pieces if "위반" in p]
    assert len(item_pieces) >= 2
    assert all(p.startswith(lead) or lead in p.split("\n")[:2] for p in item_pieces)
    assert all(len(p) <= 120 + 2 for p in pieces)


def test_dense_text_drops_redundant_path():
    from fsku.chunk import dense_text

    first = "법 › 제3장 보호 › 제21조의3(분석)\n제21조의3(분석) ① 본문"
    later = "법 › 제3장 보호 › 제21조의3(분석)\n② 둘째 항"
    assert dense_text(first) == "법\n제21조의3(분석) ① 본문"
    assert dense_text(later) == "법 제21조의3(분석)\n② 둘째 항"
    assert dense_text("가이드 › 가이드 › 피싱\n링크") == "가이드 피싱\n링크"
    assert dense_text("한 줄") == "한 줄"
