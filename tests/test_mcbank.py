"""mc-bank: rule-written training items from statute articles (fsku.synth.mcbank)."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from fsku.config import MCBankConfig
from fsku.synth import mcbank as M
from fsku.synth.records import read_jsonl

ARTICLES = {
    ("가상전자금융법", "제3조", "act"): [
        "금융회사는 전자금융거래기록을 5년간 보존하여야 한다.",
        "금융회사는 이용자의 요청이 있는 경우 거래내용을 14일 이내에 서면으로 제공하여야 한다.",
        "금융위원회는 금융회사의 보안점검 결과를 매년 1회 이상 공개할 수 있다.",
    ],
    ("가상전자금융법", "제4조", "act"): [
        "전자금융업자는 접근매체를 발급할 때 이용자의 신원을 확인하여야 한다.",
        "전자금융업자는 분실신고를 받은 때에는 접근매체의 사용을 즉시 정지하여야 한다.",
        "전자금융업자는 이용자에게 접근매체 재발급 수수료를 3천원 이하로 받을 수 있다.",
    ],
    ("가상전자금융법", "제8조", "act"): [
        "전자금융업자는 전자지급수단의 이용한도를 1일 200만원 이내로 정하여야 한다.",
        "전자금융업자는 거래지시의 철회 요청을 받은 때에는 3일 이내에 처리하여야 한다.",
        "금융위원회는 전자금융업자의 경영지도기준 준수 여부를 분기마다 점검할 수 있다.",
    ],
    ("가상전자금융법", "제9조", "act"): [
        "선불전자지급수단 발행자는 미상환잔액의 50퍼센트 이상을 신탁하여야 한다.",
        "선불전자지급수단 발행자는 고객의 환급 청구를 받은 날부터 5일 이내에 환급하여야 한다.",
        "한국은행은 선불전자지급수단의 발행 통계를 매년 2회 공표할 수 있다.",
    ],
    ("가상전자금융법", "제10조", "act"): [
        "전자금융업자는 보안사고가 발생한 때에는 24시간 이내에 금융위원회에 보고하여야 한다.",
        "전자금융업자는 보안사고 기록을 7년간 보관하여야 한다.",
        "금융위원회는 보안사고 보고를 게을리한 전자금융업자에게 시정을 명할 수 있다.",
    ],
    ("가상전자금융법 시행령", "제5조", "decree"): [
        "금융회사는 정보보호최고책임자를 임원 중에서 1명 이상 지정하여야 한다.",
        "정보보호최고책임자는 침해사고 대응훈련을 매년 2회 이상 실시하여야 한다.",
        "한국은행은 지급결제시스템 운영기관의 장애기록을 10년간 보관할 수 있다.",
    ],
    ("가상전자금융감독규정", "제7조", "regulation"): [
        "금융회사는 외부 주문등록 단말기를 통한 전산실 출입을 30분 이내로 제한하여야 한다.",
        "금융회사는 망분리 예외 승인 내역을 6개월마다 금융감독원장에게 보고하여야 한다.",
        "금융감독원장은 비상대책 훈련 결과를 검사할 때 3년치 자료를 요구할 수 있다.",
    ],
}


def _chunks():
    out = []
    for i, ((title, article, level), clauses) in enumerate(ARTICLES.items()):
        body = " ".join(f"{'①②③'[j]} {c}" for j, c in enumerate(clauses))
        out.append({"chunk_id": f"c{i}", "source": f"{title}.pdf", "title": title, "level": level, "article": article,
                    "path": f"{title} › {article}", "text": f"{title} › {article}\n{article}(목적) {body}"})
    return out


def _bank(**kw):
    return M.build_mc_bank(_chunks(), MCBankConfig(**{"descriptive_share": 0.0, **kw}))


def test_particle_agrees_with_the_last_syllable():
    assert [M.with_and(w) for w in ("책임자", "신고", "보안점검", "")] == ["책임자와", "신고와", "보안점검과", ""]


def test_every_item_has_one_right_answer_in_the_competition_format():
    records, stats = _bank()
    mcs = [r for r in records if r.kind == "multiple_choice"]
    assert len(mcs) >= 8 and stats["records"] == len(records)
    statements = set()
    for clauses in ARTICLES.values():
        statements |= {M.compact(c).rstrip(".") for c in clauses}
    for r in mcs:
        lines = r.question.split("\n")
        assert len(lines) == len(r.choices) + 1 and len(r.choices) in (4, 5)
        assert [ln.split(" ", 1)[0] for ln in lines[1:]] == [str(i) for i in range(1, len(r.choices) + 1)]
        assert "제3조" not in r.question and "제4조" not in r.question  # references stripped
        options = {k: M.compact(v) for k, v in r.choices.items()}
        assert len(set(options.values())) == len(options)  # distinct options
        if r.qtype == "negative":
            assert "않은" in lines[0] or "틀린" in lines[0]
        else:
            assert "않은" not in lines[0] and "틀린" not in lines[0]
        assert r.split in ("train", "validation", "test") and r.teacher_model == M.TEACHER
    # a lookup item's answer is the clause as written (the synonym table off), every other option is not a clause
    records, _ = _bank(p_synonym=0.0)
    for r in records:
        if r.kind == "multiple_choice" and r.qtype == "lookup":
            right = M.compact(r.choices[r.answer])
            wrong = [M.compact(v) for k, v in r.choices.items() if k != r.answer]
            assert right in statements and not any(w in statements for w in wrong), r.question
        if r.kind == "multiple_choice" and r.qtype == "negative":
            assert M.compact(r.choices[r.answer]) not in statements


def test_answer_positions_are_dealt_evenly_and_articles_stay_in_one_split():
    records, stats = _bank(five_option_share=0.0, split_ratios="0.5,0.25,0.25")
    positions = Counter(r.answer for r in records if r.kind == "multiple_choice")
    assert set(positions) == {"1", "2", "3", "4"} and max(positions.values()) - min(positions.values()) <= 1
    assert stats["answer_positions"]["4"] == dict(sorted(positions.items()))
    splits_of = {}
    for r in records:
        splits_of.setdefault(r.source_article, set()).add(r.split)
    assert all(len(s) == 1 for s in splits_of.values()) and len({next(iter(s)) for s in splits_of.values()}) >= 2


def test_seeded_and_deterministic():
    a, _ = _bank(seed=3)
    b, _ = _bank(seed=3)
    c, _ = _bank(seed=4)
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b]
    assert [r.question for r in a] != [r.question for r in c]


def test_descriptive_items_carry_the_clause_as_reference():
    records, _ = _bank(descriptive_share=1.0)
    desc = [r for r in records if r.kind == "descriptive"]
    assert desc and all(r.answer.endswith(".") and r.keywords for r in desc)


def test_evaluation_articles_and_text_are_left_out(tmp_path):
    labels = tmp_path / "retrieval_dev.jsonl"
    labels.write_text(json.dumps({"qid": "q1", "question": "가상전자금융법 제4조에 따르면?", "law": "가상전자금융법",
                                  "article": "제4조", "evidence": "접근매체"}, ensure_ascii=False) + "\n")
    mcq = tmp_path / "mcq_dev.csv"
    # shares a 20-character run (spacing ignored) with one clause of 제5조 of the decree
    mcq.write_text("Question,Answer\n\"정보보호최고책임자는 침해사고 대응훈련을 매년 몇 회 실시하는가?\n1 1회\n2 2회\",2\n",
                   encoding="utf-8")
    ex = M.load_exclusions([str(labels), str(mcq)], 20)
    assert ex.articles == {("가상전자금융법", "제4조")}
    records, stats = M.build_mc_bank(_chunks(), MCBankConfig(descriptive_share=0.0), exclusions=ex)
    assert not any(r.source_article == "가상전자금융법 제4조" for r in records)
    assert stats["excluded_articles"] == 1 and stats["excluded_article_pairs_found"] == 1
    assert stats["clauses_contaminated"] == 1
    assert not any("대응훈련" in "".join(r.choices.values()) for r in records if r.qtype == "lookup")


def test_bad_exclusion_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--exclude .*nope.jsonl: no such file"):
        M.load_exclusions([str(tmp_path / "nope.jsonl")], 20)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"law": "x", "article": "제1조"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected one JSON object per line"):
        M.load_exclusions([str(bad)], 20)


def test_config_checks():
    for bad in ({"items_per_clause": 3}, {"shingle_chars": 4}, {"descriptive_share": 1.5}, {"split_ratios": "a,b,c"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MCBankConfig(**bad)


def test_cli_writes_a_folder_distill_reads_and_replaces_only_its_own(tmp_path, monkeypatch, capsys):
    import pandas as pd

    from fsku.cli import main as cli_main
    from fsku.kb import KnowledgeBase

    class FakeKB:
        chunks = pd.DataFrame(_chunks())
        manifest = {"corpus_sha256": "abc"}

        def parents(self):
            return {"가상전자금융감독규정": "가상전자금융법"}

    monkeypatch.setattr(KnowledgeBase, "load", classmethod(lambda cls, folder: FakeKB()))
    kb = tmp_path / "kb"
    kb.mkdir()
    out = tmp_path / "bank"
    assert cli_main(["mc-bank", "--kb", str(kb), "--out", str(out), "--descriptive-share", "0.5"]) == 0
    train = read_jsonl(out / "train.jsonl")  # validated on read, as distill reads it
    stats = json.loads((out / "stats.json").read_text())
    assert train and stats["teacher"] == M.TEACHER and stats["kb_corpus_sha256"] == "abc"
    assert len(pd.read_parquet(out / "train.parquet")) == len(train)
    assert (out / M.MARKER).is_file()
    assert cli_main(["mc-bank", "--kb", str(kb), "--out", str(out), "--seed", "1"]) == 0  # its own: replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert cli_main(["mc-bank", "--kb", str(kb), "--out", str(foreign)]) != 0
    assert "refusing to replace it" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"] and (foreign / "notes.txt").read_text() == "mine"
    assert cli_main(["mc-bank", "--kb", str(kb), "--out", str(kb / "bank")]) != 0  # never inside its input


def test_only_statements_become_options_and_actor_swaps_agree():
    assert M.is_statement("금융회사는 기록을 5년간 보존하여야 한다.") and M.is_statement("정지할 수 없다")
    assert not M.is_statement("특별법에 따라 설립된 법인") and not M.is_statement("기능을 변경한 경우")
    assert M.agree_particles("금융감독원장가 정한다") == "금융감독원장이 정한다"
    assert M.agree_particles("금융위원회이 정한 금융위원회는") == "금융위원회가 정한 금융위원회는"
    assert M._REVISION.sub("", "초과할 수 없다. <개정 2020. 2. 4.>") == "초과할 수 없다."
    assert M._REVISION.sub("", "초과할 수 없다.<개정") == "초과할 수 없다."
    chunks = _chunks()
    chunks[0]["text"] += " ④ 특별법에 따라 설립된 법인 중 금융위원회가 지정하는 비영리 법인"
    records, stats = M.build_mc_bank(chunks, MCBankConfig(descriptive_share=0.0))
    assert stats["clauses_not_statements"] >= 1
    assert not any("설립된 법인" in "".join(r.choices.values()) for r in records)


def test_a_false_option_that_another_article_states_is_not_used():
    # 제3조②'s period doubled (14일 -> 28일) is what another law says: not a false statement
    chunks = _chunks()
    chunks.append({"chunk_id": "c9", "source": "다른법.pdf", "title": "다른법", "level": "act", "article": "제1조",
                   "path": "다른법 › 제1조", "text": "다른법 › 제1조\n제1조(제공) ① 금융회사는 이용자의 요청이 있는 경우 "
                                                      "거래내용을 28일 이내에 서면으로 제공하여야 한다."})
    records, stats = M.build_mc_bank(chunks, MCBankConfig(descriptive_share=0.0, p_synonym=0.0))
    assert stats["distractors_true_elsewhere"] >= 1
    for r in records:
        wrong = [v for k, v in r.choices.items() if (k != r.answer) == (r.qtype == "lookup")]
        assert not any("28일 이내에 서면으로 제공하여야 한다" in w and r.source_article != "다른법 제1조" for w in wrong)
    assert not M.is_statement('이하 "기부금영수증"이라 한다]을 발급하는 자는 가산세를 납부해야 한다.')
    assert not M.is_statement("기부금 영수증(주요 사항을 적지 아니한 경우를 포함한다")


def _true_forms(chunks=None):
    titles = sorted({t for t, _, _ in ARTICLES}, key=len, reverse=True)
    forms = {}
    for (title, article, _), clauses in ARTICLES.items():
        for c in clauses:
            forms[M.canonical(c, titles)] = f"{title} {article}"
    return titles, forms


def test_one_right_answer_with_the_synonym_rewrites_on():
    titles, forms = _true_forms()
    records, stats = _bank()  # p_synonym 0.8: options are paraphrased
    mcs = [r for r in records if r.kind == "multiple_choice"]
    assert mcs
    for r in mcs:
        true = [k for k, v in r.choices.items() if M.canonical(v, titles) in forms]
        assert (true == [r.answer]) if r.qtype == "lookup" else (r.answer not in true and len(true) == len(r.choices) - 1)
        if r.qtype == "negative":  # the clause a negative item perturbs is not among its options
            false = M.canonical(r.choices[r.answer], titles)
            assert not any(M.compact(v) and M.canonical(v, titles) == false for k, v in r.choices.items() if k != r.answer)


def test_no_option_text_crosses_the_split():
    titles, forms = _true_forms()
    records, _ = _bank(split_ratios="0.5,0.25,0.25", p_synonym=0.0)
    split_of = {r.source_article: r.split for r in records}
    assert len(set(split_of.values())) >= 2
    for r in records:
        if r.kind != "multiple_choice":
            continue
        for v in r.choices.values():
            home = forms.get(M.canonical(v, titles))
            if home is not None and home in split_of:
                assert split_of[home] == r.split, (r.split, home, v)


def test_a_document_of_no_known_level_is_named_in_full():
    chunks = [dict(c, level="other") for c in _chunks()]
    for seed in range(6):  # some clause draws the "level" mention at some seed
        records, _ = M.build_mc_bank(chunks, MCBankConfig(seed=seed))
        assert records


def test_short_evaluation_texts_and_named_articles_are_excluded(tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        json.dumps({"qid": "a", "question": "가상전자금융법 제8조에 따르면 이용한도는?", "law": "다른법", "article": "제1조",
                    "evidence": "7년간 보관하여야"}, ensure_ascii=False) + "\n", encoding="utf-8")
    ex = M.load_exclusions([str(labels)], 20)
    assert "7년간보관하여야" in ex.short and ex.names_article("가상전자금융법", "제8조")
    records, stats = M.build_mc_bank(_chunks(), MCBankConfig(descriptive_share=0.0), exclusions=ex)
    assert stats["excluded_articles_named"] == 1 and not any(r.source_article == "가상전자금융법 제8조" for r in records)
    assert stats["clauses_contaminated"] >= 1
    assert not any("7년간" in "".join(r.choices.values()) for r in records if r.qtype == "lookup")
