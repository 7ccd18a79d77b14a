"""Retrieval across the statute hierarchy: the family-aware law prior, level cues, linked-article
expansion and article grouping (pure functions, hand-computed), and the same through a KB built
from an act, its decree and a regulation."""
import dataclasses

import pytest

from fsku.retrieve import ReferenceIndex, expand_links, group_by_article, law_match, level_cues


def test_law_match_across_the_family():
    decree_q = "전자금융거래법 시행령에 따르면 자본금은?"
    assert law_match(decree_q, "전자금융거래법 시행령") == 1.0
    assert law_match(decree_q, "전자금융거래법", family=False) == 1.0  # before: the act's name inside the decree's
    assert law_match(decree_q, "전자금융거래법") == 0.5  # family: naming the decree is not naming the act
    both = "전자금융거래법과 같은 법 시행령에 따르면"
    assert law_match(both, "전자금융거래법") == 1.0  # named on its own too
    act_q = "전자금융거래법에 따르면 전산실은?"
    assert law_match(act_q, "전자금융감독규정", parent="전자금융거래법") == 0.5
    assert law_match(act_q, "전자금융감독규정", parent="전자금융거래법", family=False) == 0.0
    assert law_match(act_q, "전자금융거래법 시행령") == 0.5
    assert law_match("개인정보 보호법상 의무", "전자금융감독규정", parent="전자금융거래법") == 0.0
    # family_share: what a family member gets (1 = the family alike, 0 = the named document only)
    assert law_match(act_q, "전자금융거래법 시행령", family_share=1.0) == 1.0
    assert law_match(decree_q, "전자금융거래법", family_share=0.0) == 0.0
    assert law_match(act_q, "전자금융감독규정", parent="전자금융거래법", family_share=0.25) == 0.25
    assert law_match(act_q, "전자금융거래법 시행령", family=False, family_share=0.0) == 0.5  # no family: as before


@pytest.mark.parametrize("question, cues", [
    ("시행령에 따르면 보존기간은?", {"decree"}), ("대통령령으로 정하는 금액은 얼마인가?", {"decree"}),
    ("시행규칙상 신청서 서식은?", {"rule"}), ("행정안전부령으로 정하는 서식", {"rule"}),
    ("감독규정에 따르면 전산실은?", {"regulation"}), ("관련 고시에서 정한 등급은?", {"regulation"}),
    ("금융위원회가 정하는 기준은?", {"regulation"}), ("법률상 금융회사의 의무는?", {"act"}),
    ("법에 따르면 누가 책임지는가?", {"act"}), ("전자금융거래법에 따르면 누가 책임지는가?", set()),
    ("이용자의 권리는 무엇인가?", set()), ("시행령과 감독규정이 정한 내용은?", {"decree", "regulation"}),
])
def test_level_cues(question, cues):
    assert level_cues(question) == cues


def test_level_prior_hand_computed():
    titles = ["전자금융거래법", "전자금융거래법", "전자금융거래법 시행령", "전자금융감독규정"]
    articles = ["제1조", "제2조", "제1조", "제1조"]
    idx = ReferenceIndex(titles, articles, {"전자금융감독규정": "전자금융거래법"}, ["act", "act", "decree", "regulation"])
    assert idx.prior("시행령에 따르면?", 0.1, 0.2, w_level=0.3) == {2: 0.3}
    assert idx.prior("시행령에 따르면?", 0.1, 0.2, w_level=0.0) == {}
    # family: the act named -> act 0.1, its decree and its regulation 0.05; the level cue adds to the regulation
    got = idx.prior("전자금융거래법상 감독규정에 따르면?", 0.1, 0.0, family=True, w_level=0.3)
    assert got == pytest.approx({0: 0.1, 1: 0.1, 2: 0.05, 3: 0.35})
    # without family the regulation is not the act's, and an old KB (no levels) has no level prior
    assert ReferenceIndex(titles, articles).prior("전자금융거래법상 감독규정에 따르면?", 0.1, 0.0, w_level=0.3) == \
        pytest.approx({0: 0.1, 1: 0.1, 2: 0.05})


def test_a_cited_article_enters_the_candidates_whatever_the_other_weights():
    titles = ["전자금융거래법", "전자금융거래법", "전자금융거래법 시행령"]
    idx = ReferenceIndex(titles, ["제1조", "제5조", "제5조"], None, ["act", "act", "decree"])
    prior, cited = idx.prior_and_cited("전자금융거래법 제5조에 따르면?", 0.1, 0.2, w_level=0.3)
    # the decree is named at half strength (family), so its 제5조 is cited at half the article weight
    assert cited == {1, 2} and prior == pytest.approx({0: 0.1, 1: 0.3, 2: 0.05 + 0.2 * 0.5})
    # a level cue alone re-ranks, it never brings a chunk in
    assert idx.prior_and_cited("시행령에 따르면?", 0.1, 0.2, w_level=0.3) == ({2: 0.3}, set())


def test_expand_links_hand_computed():
    fused = {0: 1.0, 1: 0.8, 2: 0.1}
    links = {0: [5, 6], 1: [5], 2: [7]}
    out = expand_links(fused, lambda i: links.get(i, []), w_link=0.5, link_from=2)
    # 5 is lent by 0 (0.5) and 1 (0.4): the larger; 6 by 0; 2 is not among the 2 best, so 7 gets nothing
    assert out == pytest.approx({0: 1.0, 1: 0.8, 2: 0.1, 5: 0.5, 6: 0.5})
    assert expand_links(fused, lambda i: links.get(i, []), w_link=0.0, link_from=2) == fused
    assert expand_links({}, lambda i: [1], 0.5, 3) == {}
    # a candidate lent to keeps its own score plus the loan; a chunk never lends to itself
    assert expand_links({0: 1.0, 1: 0.2}, lambda i: [0, 1], 0.5, 2) == pytest.approx({0: 1.1, 1: 0.7})


def _pairs(ranked):
    return [(i, round(score, 9)) for i, score in ranked]


def test_group_by_article_hand_computed():
    fused = {0: 0.9, 1: 0.5, 2: 0.7, 3: 0.6, 4: 0.8}
    article = {0: ("A", "제1조"), 1: ("A", "제1조"), 2: ("A", "제2조"), 3: ("A", "제1조"), 4: None}
    one = 1.01  # 0.9 + 0.1 x (0.5 + 0.6)
    assert _pairs(group_by_article(fused, article.get, sibling_bonus=0.1)) == [(0, one), (4, 0.8), (2, 0.7)]
    assert _pairs(group_by_article(fused, article.get, 0.0)) == [(0, 0.9), (4, 0.8), (2, 0.7)]
    # two chunks per article: 제1조's best two (0 then 3) in its place, both with its score
    assert _pairs(group_by_article(fused, article.get, 0.1, per_article=2)) == [(0, one), (3, one), (4, 0.8), (2, 0.7)]
    # a bonus can lift an article of several weaker chunks over a single stronger one
    assert group_by_article({0: 0.5, 1: 0.5, 2: 0.6}, {0: ("A", "1"), 1: ("A", "1"), 2: ("B", "1")}.get, 0.5)[0][0] == 0
    # ties: the lower index represents the article and ranks first
    assert group_by_article({3: 0.5, 1: 0.5}, lambda i: ("A", "제1조"), 0.0) == [(1, 0.5)]
    assert group_by_article({}, article.get, 0.1) == []


def _family_kb(tmp_path):
    from fsku.config import BuildKBConfig
    from fsku.kb import build_knowledge_base

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "전자금융거래법.txt").write_text(
        "제1조(목적) 이 법은 전자금융거래의 안전성을 확보함을 목적으로 한다.\n"
        "제3조(자본금) 전자금융업자의 자본금은 대통령령으로 정하는 금액 이상이어야 한다.\n"
        "제5조(전산실) 금융회사는 전산실을 안전하게 운영하여야 한다.\n", encoding="utf-8")
    (corpus / "전자금융거래법 시행령.txt").write_text(
        "제1조(목적) 이 영은 「전자금융거래법」에서 위임된 사항을 정한다.\n"
        "제2조(최저 금액) 법 제3조에 따른 금액은 20억원으로 한다.\n", encoding="utf-8")
    (corpus / "전자금융감독규정.txt").write_text(
        "제1조(목적) 이 규정은 「전자금융거래법」 및 같은 법 시행령에서 위임된 사항을 정한다.\n"
        "제2조(전산실 기준) 금융회사는 전산실에 출입통제 장치를 설치하여야 한다. 전산실의 온도를 관리하여야 한다. "
        "전산실의 출입 기록을 1년간 보존하여야 한다.\n", encoding="utf-8")
    cfg = BuildKBConfig(corpus=str(corpus), out=str(tmp_path / "kb"), embedding_model="none", length_unit="chars",
                        chunk_size=60, chunk_overlap=0, cache_dir="", statute_mode="always")
    kb, _ = build_knowledge_base(cfg, progress=False)
    return kb


def test_kb_search_uses_the_hierarchy(tmp_path):
    kb = _family_kb(tmp_path)
    assert {d["title"]: d.get("parent") for d in kb.manifest["documents"]}["전자금융감독규정"] == "전자금융거래법"
    base = dataclasses.replace(kb.retrieve_defaults(), top_k=10, w_law=0.0, w_article=0.0, w_link=0.0, w_level=0.0)

    def ranked(q, **kw):
        return [(h.path.split(" › ")[0], h.path.split(" › ")[-1][:4]) for h in kb.search([q], base, **kw)[0]]

    # linked-article expansion: the decree article implementing the act's 제3조 enters the two best
    q = "전자금융업자의 자본금"
    assert ranked(q, top_k=2, candidates=2)[0] == ("전자금융거래법", "제3조(")
    assert ("전자금융거래법 시행령", "제2조(") not in ranked(q, top_k=2, candidates=2)
    assert ranked(q, top_k=2, candidates=2, w_link=0.5, link_from=1)[1] == ("전자금융거래법 시행령", "제2조(")
    # the level cue moves the regulation above the act for an otherwise tied question
    q = "감독규정상 금융회사 전산실 운영"
    assert ranked(q)[0] == ("전자금융거래법", "제5조(")
    assert ranked(q, w_level=1.0)[0][0] == "전자금융감독규정"
    # per article: the regulation's three chunks of 제2조 come back as one hit
    chunks = ranked("전산실", group="chunk")
    assert chunks.count(("전자금융감독규정", "제2조(")) > 1
    assert ranked("전산실", group="article").count(("전자금융감독규정", "제2조(")) == 1


def test_an_old_kb_without_links_or_levels_still_searches(tmp_path):
    kb = _family_kb(tmp_path)
    assert kb.linked_chunks(4) == [6]  # the decree's 제2조 implements the act's 제3조
    (kb.folder / "links.parquet").unlink()
    chunks = kb.chunks.drop(columns=["level"])
    chunks.to_parquet(kb.folder / "chunks.parquet", index=False)
    from fsku.kb import KnowledgeBase

    old = KnowledgeBase.load(kb.folder)
    hits = old.search(["전산실"], top_k=3, w_link=0.5, w_level=0.5, statute_family=True, group="article")[0]
    assert old.linked_chunks(4) == []  # no links.parquet: no links
    assert hits


def test_a_cited_article_outside_the_candidates_is_found_with_level_weights(tmp_path):
    kb = _family_kb(tmp_path)
    base = dataclasses.replace(kb.retrieve_defaults(), top_k=1, candidates=1, w_link=0.0)
    q = "전자금융업자의 자본금 금액 이상 대통령령 (전자금융거래법 제5조)"
    assert kb.search([q], base, w_law=0.0, w_article=0.0)[0][0].path.endswith("제3조(자본금)")  # the only candidate
    # the cited 제5조 enters and, with a strong article prior, leads; a level weight larger than the article
    # weight (the question cues no level) must not keep it out
    for w_level in (0.0, 2.0):
        assert kb.search([q], base, w_law=0.1, w_article=1.5, w_level=w_level)[0][0].path.endswith("제5조(전산실)")


def test_addenda_are_articles_of_their_own(tmp_path):
    from fsku.config import BuildKBConfig
    from fsku.kb import build_knowledge_base

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "전자금융거래법.txt").write_text(
        "제1조(목적) 이 법은 전자금융거래의 안전성을 확보함을 목적으로 한다.\n"
        "제2조(전산실) 금융회사는 전산실을 안전하게 운영하여야 한다.\n"
        "부 칙 <제100호, 2020. 1. 1.>\n"
        "제1조(시행일) 이 법은 공포 후 6개월이 경과한 날부터 시행한다. 다만, 제2조의 개정규정은 공포한 날부터 시행한다.\n",
        encoding="utf-8")
    cfg = BuildKBConfig(corpus=str(corpus), out=str(tmp_path / "kb"), embedding_model="none", length_unit="chars",
                        chunk_size=200, chunk_overlap=0, cache_dir="", statute_mode="always")
    kb, _ = build_knowledge_base(cfg, progress=False)
    paths = kb.chunks["path"].tolist()
    body, addendum = paths.index(next(p for p in paths if p.endswith("제1조(목적)"))), \
        paths.index(next(p for p in paths if "부 칙" in p))
    # grouping keeps both 제1조 (one is not a sibling of the other)
    hits = kb.search(["이 법은 시행"], top_k=5, group="article", sibling_bonus=0.5, w_link=0.0)[0]
    assert {h.chunk_id for h in hits} >= {kb.chunks.chunk_id[body], kb.chunks.chunk_id[addendum]}
    # a question citing 제1조 means the body's; the addendum's commencement line is no delegation link
    prior, cited = kb._references.prior_and_cited("전자금융거래법 제1조의 목적은?", 0.1, 0.2)
    assert body in cited and addendum not in cited
    assert not (kb.links()["source_article"] == "제1조").any()
