"""The per-level validation set: clause splitting, reference stripping, paraphrase, stems and
distractors on hand-written statute text, and the set built from a small KB (every level, gold
unique to one article, no article numbers, deterministic) and through `fsku level-set`."""
import json
import random
import re

import pytest

from fsku.synth.levelset import (
    FORMS,
    as_question,
    build_level_set,
    clauses,
    distractors,
    paraphrase,
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


def _chunks():
    def chunk(title, level, article, body, source=None):
        return {"source": source or f"{title}.pdf", "title": title, "level": level, "article": article,
                "path": f"{title} › {article}(x)", "text": f"{title} › {article}(x)\n{body}"}

    shared = "금융회사는 이용자의 정보를 안전하게 관리하는 체계를 갖추어야 한다."
    rows = []
    for n in range(1, 9):
        rows.append(chunk("전자금융거래법", "act", f"제{n}조",
                          f"① 전자금융업자는 제{n}항의 업무에 관한 기록을 {n}년간 보존하여야 한다. {shared}"))
        rows.append(chunk("전자금융거래법 시행령", "decree", f"제{n}조",
                          f"① 법 제{n}조에 따른 금융회사는 {n + 10}일 이내에 금융위원회에 보고하여야 한다. {shared}"))
        rows.append(chunk("전자금융감독규정", "regulation", f"제{n}조",
                          f"① 금융회사는 전산실 출입 기록을 {n + 20}개월 동안 관리하여야 한다."))
    rows.append({**chunk("전자금융거래법", "act", "제1조", "① 이 법은 공포한 날부터 시행한다."), "path": "전자금융거래법 › 부칙"})
    return rows, shared


def test_build_level_set_covers_levels_with_unique_gold_and_no_numbers():
    chunks, shared = _chunks()
    rows = build_level_set(chunks, per_level=10, seed=0, max_per_article=2)
    by_level = {lv: [r for r in rows if r["level"] == lv] for lv in ("act", "decree", "regulation")}
    assert {lv: len(v) for lv, v in by_level.items()} == {"act": 8, "decree": 8, "regulation": 8}  # one clause each
    assert "rule" not in {r["level"] for r in rows}  # no rule document: no rule questions
    assert len({r["qid"] for r in rows}) == len(rows)
    for r in rows:
        assert r["evidence"] != shared  # in every article: never a gold
        assert not re.search(r"제\s*\d+\s*[조항]", r["question"]), r["question"]
        assert r["form"] in FORMS
        home = [c for c in chunks if r["evidence"] in c["text"]]
        assert [(c["title"], c["article"]) for c in home] == [(r["law"], r["article"])]
        if r["mention"] == "none":
            assert "전자금융거래법" not in r["question"] and "감독규정" not in r["question"]
        if r["form"] == "mc":
            assert r["answer"] in {"1", "2", "3", "4"}
    assert build_level_set(chunks, per_level=10, seed=0, max_per_article=2) == rows  # deterministic
    assert build_level_set(chunks, per_level=10, seed=1, max_per_article=2) != rows
    assert len(build_level_set(chunks, per_level=3, seed=0)) == 9


def test_level_set_command(tmp_path, capsys):
    from fsku.cli import main
    from fsku.config import BuildKBConfig
    from fsku.kb import build_knowledge_base

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for title, body in (("전자금융거래법", "전자금융업자는 업무에 관한 기록을 {n}년간 보존하여야 한다."),
                        ("전자금융거래법 시행령", "법 제{n}조에 따른 금융회사는 {m}일 이내에 금융위원회에 보고하여야 한다.")):
        (corpus / f"{title}.txt").write_text("".join(f"제{n}조(조문{n}) {body.format(n=n, m=n + 10)}\n" for n in range(1, 6)),
                                             encoding="utf-8")
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
