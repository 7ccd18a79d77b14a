"""Regenerate data/sample_corpus/표본_전자금융보안법.pdf from data/sample_statute.txt (our own text).

Usage: python data/make_sample_pdf.py

Every page gets a running header ('표본법령센터 N 페이지' + the law name) like real statute
prints, so the ingest tests exercise header removal.
"""
from pathlib import Path

import pymupdf

HERE = Path(__file__).parent
LINES_PER_PAGE = 14
WRAP = 44  # characters per printed line: long lines wrap mid-word like law.go.kr prints


def main() -> None:
    lines = (HERE / "sample_statute.txt").read_text(encoding="utf-8").splitlines()
    title = lines[0]
    printed: list[str] = []
    for line in lines:
        printed.extend(line[i:i + WRAP] for i in range(0, max(len(line), 1), WRAP))
    doc = pymupdf.open()
    font = pymupdf.Font("cjk")
    for pno, start in enumerate(range(0, len(printed), LINES_PER_PAGE), start=1):
        page = doc.new_page(width=595, height=842)
        page.insert_font(fontname="cjk", fontbuffer=font.buffer)
        y = 40
        for text in (f"표본법령센터 {pno} 페이지", title):
            page.insert_text((50, y), text, fontname="cjk", fontsize=9)
            y += 16
        y += 10
        for text in printed[start:start + LINES_PER_PAGE]:
            page.insert_text((50, y), text, fontname="cjk", fontsize=11)
            y += 20
    doc.set_metadata({"title": title, "author": "fsku sample corpus"})
    out = HERE / "sample_corpus" / "표본_전자금융보안법.pdf"
    doc.subset_fonts()
    doc.save(out, garbage=4, deflate=True)
    print(f"wrote {out} ({out.stat().st_size} bytes, {doc.page_count} pages)")


if __name__ == "__main__":
    main()
