from pathlib import Path

import pytest

from conftest import SAMPLE_CORPUS
from fsku.ingest import NoUsableDocuments, ingest_corpus, load_manifest
from fsku.ingest.readers import decode_bytes, looks_binary, reflow, strip_running_lines


def test_sample_corpus_reads_every_format():
    docs, skipped = ingest_corpus(SAMPLE_CORPUS, progress=False)
    assert skipped == []
    by_type = {d.doc_type: d for d in docs}
    assert set(by_type) == {"pdf", "md", "html", "txt", "json", "xml"}
    pdf = by_type["pdf"]
    assert "표본법령센터" not in pdf.text  # running header removed
    assert pdf.text.count("표본 전자금융보안법") == 0 or pdf.title == "표본 전자금융보안법"
    assert "1명 이상 지정하여야" in pdf.text.replace("이상지정", "이상 지정")
    assert pdf.pages and pdf.pages[0][0] == 1
    assert pdf.license == "CC0-1.0" and "fsku authors" in pdf.provenance
    html = by_type["html"]
    assert "색인되면 안 된다" not in html.text  # script, nav and footer dropped
    assert "OTP 생성기 | 5억원" in html.text  # table text kept
    assert "10분 이내" in by_type["txt"].text  # cp949 decoded
    assert "용어: 망분리" in by_type["json"].text
    assert "교훈: 백업은" in by_type["xml"].text
    assert all(len(d.sha256) == 64 and d.doc_id == d.sha256[:16] for d in docs)


def make_bad_corpus(root: Path) -> None:
    (root / "good.md").write_text("# 제목\n\n정상 문서의 본문이다.", encoding="utf-8")
    (root / "corrupt.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf\n%%EOF")
    (root / "empty.txt").write_bytes(b"")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "korean-cp949.txt").write_bytes("접근매체 관리 규정 본문".encode("cp949"))
    (root / "data.xyz").write_text("unknown", encoding="utf-8")
    (root / "huge.txt").write_bytes(b"a" * (20 * 2**20))  # 20 MB on one line


def test_bad_inputs_are_skipped_with_reasons(tmp_path):
    make_bad_corpus(tmp_path)
    docs, skipped = ingest_corpus(tmp_path, progress=False)
    reasons = {Path(s.source).name: s.reason for s in skipped}
    assert reasons == {"corrupt.pdf": "corrupt_pdf", "empty.txt": "empty", "binary.txt": "binary",
                       "data.xyz": "unsupported_extension", "huge.txt": "too_large"}
    assert sorted(Path(d.source).name for d in docs) == ["good.md", "korean-cp949.txt"]
    cp949 = next(d for d in docs if d.source.endswith("cp949.txt"))
    assert "접근매체" in cp949.text


def test_no_usable_document_fails_clearly(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(NoUsableDocuments, match=r"no usable document.*empty"):
        ingest_corpus(tmp_path, progress=False)
    with pytest.raises(NotADirectoryError):
        ingest_corpus(tmp_path / "missing", progress=False)


def test_manifest_rows_need_a_file_field(tmp_path):
    bad = tmp_path / "manifest.csv"
    bad.write_text("title,license\nx,MIT\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"manifest.csv: row 1 has no 'file'"):
        load_manifest(bad)


def test_jsonl_and_malformed_json(tmp_path):
    (tmp_path / "ok.jsonl").write_text('{"title": "A", "body": "첫째 기록"}\nnot json\n{"body": "둘째 기록"}\n', encoding="utf-8")
    (tmp_path / "bad.json").write_text('{"a": 1,,}', encoding="utf-8")
    docs, skipped = ingest_corpus(tmp_path, progress=False)
    assert "첫째 기록" in docs[0].text and "둘째 기록" in docs[0].text
    assert skipped[0].reason == "parse_error" and "line 1" in skipped[0].detail


def test_decode_and_binary_detection():
    assert decode_bytes("한글".encode("utf-8"))[1] == "utf-8"
    assert decode_bytes(b"\xef\xbb\xbf" + "한글".encode("utf-8")) == ("한글", "utf-8-sig")
    assert decode_bytes("한글".encode("euc-kr")) == ("한글", "cp949")
    assert looks_binary(b"abc\x00def") and not looks_binary("평문".encode())


def test_running_lines_and_reflow():
    pages = [["법제처 1 국가법령정보센터", "테스트법", "제1조(목적) 본문"],
             ["법제처 2 국가법령정보센터", "테스트법", "제2조(정의) 본문"],
             ["법제처 3 국가법령정보센터", "테스트법", "제3조(기타) 본문"]]
    stripped = strip_running_lines(pages)
    assert [p[0] for p in stripped] == ["제1조(목적) 본문", "제2조(정의) 본문", "제3조(기타) 본문"]
    full = "가" * 40
    lines = [(1, full), (1, full), (1, "나다 라마"), (1, "① " + full[:38]), (1, "짧은 줄"), (2, "다음 문단"),
             (2, full), (2, full), (2, full)]
    out = reflow(lines)
    assert out[0] == (1, full + full + "나다 라마")  # wrapped lines joined without a space
    assert out[1] == (1, "① " + full[:38] + "짧은 줄")  # a new 항 starts a line; its wrap continues it
    assert out[2] == (2, "다음 문단") and out[3] == (2, full * 3)  # a short line ends its paragraph
