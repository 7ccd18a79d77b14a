"""The per-level validation set: clause splitting, reference stripping, paraphrase, stems and
distractors on hand-written statute text, and the set built from a small KB (every level, gold
unique to one article, no article numbers, deterministic) and through `fsku level-set`."""
import json
import random
import re

import pytest

from fsku.config import LevelSetConfig
from fsku.synth.levelset import (
    FORMS,
    as_question,
    build_level_set,
    clauses,
    distractors,
    paraphrase,
    self_contained,
    strip_references,
    write_question,
)


def test_clauses_split_paragraphs_items_and_sentences():
    body = ("① 금융회사는 전자금융거래의 내용을 5년간 보존하여야 한다. 다만, 소액 거래는 그러하지 아니하다.\n"
            "② 금융회사는 다음 각 호의 사항을 이용자에게 알려야 한다. 1. 거래의 종류와 금액에 관한 사항 "
            "2. 삭제 <2020. 1. 1.>\n③ 이 규칙은 2023년 10월 19일부터 시행한다.")
    assert clauses(body) == ["금융회사는 전자금융거래의 내용을 5년간 보존하여야 한다.",
                             "금융회사는 다음 각 호의 사항을 이용자에게 알려야 한다."]
    got = clauses(body, min_chars=10)
    assert got == ["금융회사는 전자금융거래의 내용을 5년간 보존하여야 한다.", "다만, 소액 거래는 그러하지 아니하다.",
                   "금융회사는 다음 각 호의 사항을 이용자에게 알려야 한다.", "거래의 종류와 금액에 관한 사항"]


def test_strip_references_removes_numbers_and_names():
    text = "법 제21조제2항에 따른 금융회사는 「개인정보 보호법」 제29조에 따라 이 조 제1항의 조치를 하여야 한다."
    got = strip_references(text)
    assert not re.search(r"제\s*\d+\s*[조항호]", got) and "「" not in got
    assert got == "관련 규정에 따른 금융회사는 관련 규정에 따른 조치를 하여야 한다."
    assert "전자금융거래법" not in strip_references("전자금융거래법에서 정한 기준", ["전자금융거래법"])
    # no part of a name or a word survives: the law names go first, words end where they end
    names = ["전자금융거래법 시행령", "전자금융거래법"]
    assert strip_references("전자금융거래법 시행령 제3조에 따른 보고", names) == "관련 규정에 따른 보고"
    assert strip_references("시행규칙 제3조제2항에 따른 서류", []) == "관련 규정에 따른 서류"
    assert strip_references("이 조치는 같은 조문에 따라 한다", []) == "이 조치는 같은 조문에 따라 한다"
    assert strip_references("상법 제3조에 따른 회사", []) == "관련 규정에 따른 회사"
    assert clauses("제5조(개인정보(신용정보)의 보존) ① 금융회사는 신용정보를 5년간 보존하여야 한다.") == \
        ["금융회사는 신용정보를 5년간 보존하여야 한다."]


def test_paraphrase_and_question_endings():
    rng = random.Random(0)
    assert paraphrase("금융회사는 지체 없이 통지하여야 한다.", rng, p_synonym=1.0) == "금융기관은 즉시 알려야 한다."
    assert paraphrase("금융회사는 지체 없이 통지하여야 한다.", rng, p_synonym=0.0) == "금융회사는 지체 없이 통지하여야 한다."
    assert as_question("고객에게 알려야 한다.") == "고객에게 알려야 하는가?"
    assert as_question("기간은 5년이다.") == "기간은 5년인가?"
    assert as_question("정정할 수 있다") == "정정할 수 있는가?"


def test_distractors_change_number_modal_and_actor():
    rng = random.Random(0)
    wrong = distractors("금융위원회는 30일 이내에 보고를 받아야 한다. 기록은 해야 한다", rng)
    assert len(wrong) == 3 and len(set(wrong)) == 3
    assert any("60일" in w for w in wrong)
    assert any("할 수 있다" in w for w in wrong)
    assert any("금융위원회" not in w for w in wrong)
    assert distractors("아무 손잡이도 없는 문장", rng) == []


def test_write_question_forms():
    rng = random.Random(1)
    clause = "금융회사는 전자금융거래기록을 5년간 보존하여야 한다."
    q, answer = write_question(clause, "mc", "", [], rng)
    options = q.split("\n")[1:]
    assert 2 <= len(options) <= 4 and options[answer - 1].split(" ", 1)[1].replace("보관해야", "보존하여야").replace(
        "해야 한다", "하여야 한다").replace("금융기관", "금융회사") == clause.rstrip(".")
    q, _ = write_question(clause, "amount", "시행령에 따르면 ", [], rng)
    assert q.startswith("시행령에 따르면 ") and "몇 년" in q and q.endswith("?") and "5년" not in q
    assert write_question("금융회사는 기록을 보존하여야 한다.", "amount", "", [], rng) is None
    with pytest.raises(ValueError, match="unknown form"):
        write_question(clause, "essay", "", [], rng)


TOPICS = ("전산실", "접근매체", "전자서명", "암호키", "백업센터", "보안점검", "침해사고", "내부통제", "취약점분석",
          "모의해킹", "위험평가", "재해복구", "망분리", "인증서", "단말기", "악성코드", "방화벽", "로그분석", "비밀번호",
          "생체정보", "전자지급", "선불전자", "가맹점", "외부주문")


def _chunks():
    def chunk(title, level, article, body, source=None):
        return {"source": source or f"{title}.pdf", "title": title, "level": level, "article": article,
                "path": f"{title} › {article}(x)", "text": f"{title} › {article}(x)\n{body}"}

    shared = "금융회사는 이용자의 정보를 안전하게 관리하는 체계를 갖추어야 한다."
    rows = []
    # one topic per article, so a question's key terms point at one article (self_contained)
    topics = TOPICS
    for n in range(1, 9):
        a, d, r = topics[n - 1], topics[n + 7], topics[n + 15]
        rows.append(chunk("전자금융거래법", "act", f"제{n}조",
                          f"① 전자금융업자는 제{n}항의 {a}에 관한 기록을 {n}년간 보존하여야 한다. {shared}"))
        rows.append(chunk("전자금융거래법 시행령", "decree", f"제{n}조",
                          f"① 법 제{n}조에 따른 금융회사는 {d} 결과를 {n + 10}일 이내에 금융위원회에 보고하여야 한다. {shared}"))
        rows.append(chunk("전자금융감독규정", "regulation", f"제{n}조",
                          f"① 금융회사는 {r} 기록을 {n + 20}개월 동안 관리하여야 한다."))
    rows.append({**chunk("전자금융거래법", "act", "제1조", "① 이 법은 공포한 날부터 시행한다."), "path": "전자금융거래법 › 부칙"})
    return rows, shared


def test_build_level_set_covers_levels_with_unique_gold_and_no_numbers():
    chunks, shared = _chunks()
    rows = build_level_set(chunks, LevelSetConfig(per_level=10, seed=0, max_per_article=2))
    by_level = {lv: [r for r in rows if r["level"] == lv] for lv in ("act", "decree", "regulation")}
    assert {lv: len(v) for lv, v in by_level.items()} == {"act": 8, "decree": 8, "regulation": 8}  # one clause each
    assert "rule" not in {r["level"] for r in rows}  # no rule document: no rule questions
    assert len({r["qid"] for r in rows}) == len(rows)
    for r in rows:
        assert r["evidence"] != shared  # in every article: never a gold
        assert not re.search(r"제\s*\d+\s*[조항호]", r["question"]), r["question"]
        assert r["form"] in FORMS
        home = [c for c in chunks if r["evidence"] in c["text"]]
        assert [(c["title"], c["article"]) for c in home] == [(r["law"], r["article"])]
        if r["mention"] == "none":
            assert "전자금융거래법" not in r["question"] and "감독규정" not in r["question"]
        if r["form"] == "mc":
            assert r["answer"] in {"1", "2", "3", "4"}
    assert build_level_set(chunks, LevelSetConfig(per_level=10, seed=0, max_per_article=2)) == rows  # deterministic
    assert build_level_set(chunks, LevelSetConfig(per_level=10, seed=1, max_per_article=2)) != rows
    assert len(build_level_set(chunks, LevelSetConfig(per_level=3, seed=0))) == 9


def test_level_set_command(tmp_path, capsys):
    from fsku.cli import main
    from fsku.config import BuildKBConfig
    from fsku.kb import build_knowledge_base

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k, (title, body) in enumerate((("전자금융거래법", "전자금융업자는 {t}에 관한 기록을 {n}년간 보존하여야 한다."),
                                       ("전자금융거래법 시행령", "법 제{n}조에 따른 금융회사는 {t} 결과를 {m}일 이내에 "
                                                           "금융위원회에 보고하여야 한다."))):
        (corpus / f"{title}.txt").write_text("".join(f"제{n}조(조문{n}) {body.format(n=n, m=n + 10, t=TOPICS[5 * k + n])}\n"
                                                     for n in range(1, 6)), encoding="utf-8")
    build_knowledge_base(BuildKBConfig(corpus=str(corpus), out=str(tmp_path / "kb"), embedding_model="none",
                                       length_unit="chars", chunk_size=200, chunk_overlap=0, cache_dir="",
                                       statute_mode="always"), progress=False)
    out = tmp_path / "set.jsonl"
    assert main(["level-set", "--kb", str(tmp_path / "kb"), "--out", str(out), "--per-level", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["level"] for r in rows) == ["act"] * 4 + ["decree"] * 4
    assert "8 questions" in capsys.readouterr().out
    # never overwrites; bad values and a folder that is not a KB are one error line
    assert main(["level-set", "--kb", str(tmp_path / "kb"), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["level-set", "--kb", str(tmp_path / "kb"), "--out", str(tmp_path / "b.jsonl"), "--per-level", "0"]) == 2
    assert "per_level must be >= 1" in capsys.readouterr().err
    assert main(["level-set", "--kb", str(corpus), "--out", str(tmp_path / "c.jsonl")]) == 2
    assert "not a knowledge base" in capsys.readouterr().err
    # the labels work with eval-retrieval as they are
    from fsku.evaluate.retrieval import load_labels

    assert len(load_labels(out)) == 8
    # a held-out set: the same rules on the articles the first leaves out; a bad exclude file is one error line
    held = tmp_path / "held.jsonl"
    assert main(["level-set", "--kb", str(tmp_path / "kb"), "--out", str(held), "--seed", "1", "--exclude", str(out)]) == 0
    held_rows = [json.loads(line) for line in held.read_text(encoding="utf-8").splitlines()]
    assert held_rows and not {(r["law"], r["article"]) for r in held_rows} & {(r["law"], r["article"]) for r in rows}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"qid": "x"}\n', encoding="utf-8")
    assert main(["level-set", "--kb", str(tmp_path / "kb"), "--out", str(tmp_path / "d.jsonl"), "--exclude", str(bad)]) == 2
    assert "bad.jsonl:1: expected a level-set row" in capsys.readouterr().err


@pytest.mark.parametrize("clause, ok", [
    ("제1항 또는 제2항에 따른 신고의 경우에는 제10조제2항을 준용한다.", False),  # '또는 신고 ... 을 준용'
    ("제1항 단서 및 제2항 단서에 따른 확약서의 이행이 미흡한 경우", False),
    ("제5항에도 불구하고 국방부장관이 보안관리 수준을 측정한다.", False),
    ("에 따른 정보보호 전문서비스 기업의 지정취소 및 업무정지 처분의 기준", False),  # cut out of its sentence
    ("다음 각 목의 어느 하나에 해당하지 아니할 것", False),  # no key terms
    ("법 제23조제1항제3호에 따른 직불전자지급수단의 이용한도는 1억원의 범위에서 금융위원회가 정하여 고시한다.", True),
])
def test_self_contained_clauses(clause, ok):
    assert self_contained(clause, []) is ok


def test_self_contained_needs_terms_few_articles_share():
    texts = ["감독원장세부사항규정시행"] * 5 + ["전산실출입통제기록"]

    def narrow(terms):
        return sum(all(t in x for t in terms) for x in texts) <= 3

    assert not self_contained("감독원장은 이 규정의 시행에 필요한 세부사항을 정할 수 있다.", [], narrow=narrow)
    assert self_contained("금융회사는 전산실의 출입통제 기록을 보관하여야 한다.", [], narrow=narrow)
