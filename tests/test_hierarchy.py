"""The statute hierarchy on hand-written snippets: document levels, references between an act, its
decree, its rule and a regulation (조의N, 항/호, 「」, 같은 법, 이 영, 부칙), delegations, resolution
against the articles a KB holds."""
import pytest

from fsku.hierarchy import Link, document_level, parent_act, parse_links, resolve_link


@pytest.mark.parametrize("title, level", [
    ("전자금융거래법", "act"), ("신용정보의 이용 및 보호에 관한 법률", "act"), ("전자금융거래법 시행령", "decree"),
    ("정보보호산업의 진흥에 관한 법률 시행규칙", "rule"), ("전자금융감독규정", "regulation"),
    ("정보보호 관리등급 부여에 관한 고시", "regulation"), ("금융기관검사및제재에관한규정", "regulation"),
    ("사이버안보 업무규정", "regulation"), ("금융보안 안내서", "other"),
])
def test_document_level_from_the_title(title, level):
    assert document_level(title) == level


def test_document_level_falls_back_on_the_promulgation_line():
    head = "[시행 2024. 1. 1.] [대통령령 제34000호, 2023. 12. 26., 일부개정]"
    assert document_level("전자금융 시행 세부사항", head) == "decree"
    assert document_level("문서", "[시행 2024. 1. 1.] [금융위원회고시 제2024-1호]") == "regulation"
    assert document_level("문서", "내용 없음") == "other"


def test_a_decree_cites_its_act_itself_and_other_laws():
    text = ("① 법 제21조제2항에 따라 금융회사는 이 영 제11조의2제1항제3호의 기준을 따른다. "
            "「개인정보 보호법」 제29조 및 같은 법 시행령 제30조를 준용한다.")
    links = parse_links(text, "전자금융거래법 시행령")
    assert [(lk.target_law, lk.target_level, lk.article, lk.paragraph, lk.item) for lk in links] == [
        ("전자금융거래법", "act", "제21조", 2, None),
        ("전자금융거래법 시행령", "decree", "제11조의2", 1, 3),
        ("개인정보 보호법", "act", "제29조", None, None),
        ("개인정보 보호법 시행령", "decree", "제30조", None, None)]
    assert text[slice(*links[1].span)].startswith("이 영 제11조의2")


def test_an_act_cites_itself_and_delegates_downwards():
    links = parse_links("이 법 제5조에 따른 금액은 대통령령으로 정한다. 세부 기준은 금융위원회가 정하여 고시한다. "
                        "과학기술정보통신부령으로 정하는 서식", "전자금융거래법")
    assert links[0] == Link("cite", "act", "전자금융거래법", "제5조", span=links[0].span)
    assert [(lk.kind, lk.target_level) for lk in links[1:]] == [("delegates", "decree"), ("delegates", "regulation"),
                                                                 ("delegates", "rule")]


def test_a_rule_names_its_act_and_decree():
    links = parse_links("영 제7조제1항에 따른 신청서는 별지 서식에 따른다. 법 제10조", "정보보호산업의 진흥에 관한 법률 시행규칙")
    assert [(lk.target_law, lk.article) for lk in links] == [("정보보호산업의 진흥에 관한 법률 시행령", "제7조"),
                                                            ("정보보호산업의 진흥에 관한 법률", "제10조")]


def test_a_regulation_resolves_its_short_names_through_its_parent_act():
    purpose = "제1조(목적) 이 규정은 「전자금융거래법」 및 같은 법 시행령에서 금융위원회에 위임된 사항을 정한다."
    parent = parent_act(purpose)
    assert parent == "전자금융거래법"
    text = "법 제21조제2항 및 영 제11조의2에 따라 금융회사는 다음 각 호의 기준을 준수하여야 한다."
    assert [(lk.target_law, lk.article) for lk in parse_links(text, "전자금융감독규정", parent)] == [
        ("전자금융거래법", "제21조"), ("전자금융거래법 시행령", "제11조의2")]
    # without its parent the act is not identified
    assert [lk.target_law for lk in parse_links(text, "전자금융감독규정")] == [None, None]
    assert parent_act("이 고시는 정보보호 관리등급에 관하여 정한다.") is None


def test_supplementary_provisions_and_plain_article_numbers_are_not_links():
    text = "부칙 <대통령령 제31000호, 2020. 8. 4.> 제1조(시행일) 이 영은 공포한 날부터 시행한다. 제2조에 따른 경과조치"
    assert parse_links(text, "전자금융거래법 시행령") == []
    # a word ending in 법 is not the short name 법
    assert parse_links("방법 제3조", "전자금융거래법") == []


def test_resolve_link_against_the_kb_articles():
    articles = {"전자금융거래법": {"제21조", "제21조의2"}, "전자금융거래법 시행령": {"제11조의2"}}
    decree, missing, other, unnamed = (
        Link("cite", "decree", "전자금융거래법  시행령", "제11조의2"), Link("cite", "act", "전자금융거래법", "제99조"),
        Link("cite", "act", "형법", "제1조"), Link("cite", "act", None, "제21조"))
    assert resolve_link(decree, articles) == ("전자금융거래법 시행령", "제11조의2")
    assert resolve_link(missing, articles) is None  # a link to a missing article
    assert resolve_link(other, articles) is None and resolve_link(unnamed, articles) is None
    assert resolve_link(Link("delegates", "decree"), articles) is None


def test_the_kb_stores_levels_and_links_both_ways(tmp_path):
    import pandas as pd

    from fsku.config import BuildKBConfig
    from fsku.kb import KBFormatError, build_knowledge_base

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "전자금융거래법.txt").write_text(
        "제1조(목적) 이 법은 전자금융거래의 안전성을 확보함을 목적으로 한다.\n"
        "제3조(정의) 전자금융업자의 자본금은 대통령령으로 정하는 금액 이상이어야 한다.\n", encoding="utf-8")
    (corpus / "전자금융거래법 시행령.txt").write_text(
        "제1조(목적) 이 영은 「전자금융거래법」에서 위임된 사항을 정한다.\n"
        "제2조(자본금) 법 제3조에 따른 금액은 20억원으로 한다. 「형법」 제5조를 준용한다.\n", encoding="utf-8")
    cfg = BuildKBConfig(corpus=str(corpus), out=str(tmp_path / "kb"), embedding_model="none", length_unit="chars",
                        chunk_size=200, chunk_overlap=0, cache_dir="", statute_mode="always")
    kb, stats = build_knowledge_base(cfg, progress=False)
    assert (stats["documents_act"], stats["documents_decree"]) == (1, 1)
    assert set(kb.chunks["level"]) == {"act", "decree"}
    assert {d["title"]: d["level"] for d in kb.manifest["documents"]} == {"전자금융거래법": "act",
                                                                         "전자금융거래법 시행령": "decree"}
    links = kb.links()
    cite = links[(links["kind"] == "cite") & links["resolved"]]
    assert list(zip(cite["source_title"], cite["source_article"], cite["target_title"], cite["target_article"])) == [
        ("전자금융거래법 시행령", "제2조", "전자금융거래법", "제3조")]
    assert stats["links_cite"] == 2 and stats["links_cite_resolved"] == 1  # 「형법」 is not in the KB
    assert stats["links_delegates"] == 1
    assert kb.linked_articles("전자금융거래법", "제3조") == {"cites": [], "cited_by": [("전자금융거래법 시행령", "제2조")]}
    assert kb.linked_articles("전자금융거래법 시행령", "제2조")["cites"] == [("전자금융거래법", "제3조")]
    broken = links.copy()
    broken.loc[0, "target_level"] = "constitution"
    broken.to_parquet(tmp_path / "kb" / "links.parquet", index=False)
    with pytest.raises(KBFormatError, match="row 1: target_level 'constitution'"):
        kb.links()
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "kb" / "links.parquet", index=False)
    with pytest.raises(KBFormatError, match="lacks"):
        kb.links()
