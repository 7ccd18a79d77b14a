"""Text cleaning shared by documents and questions (so BM25 sees the same forms on both sides)."""
from __future__ import annotations

import re
import unicodedata

import ftfy

# Full-width ASCII block (U+FF01..U+FF5E) maps to ASCII by a fixed offset; circled numbers
# (①..⑳) are NOT touched because statutes use them as paragraph (항) markers.
_FULLWIDTH = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)}
_FULLWIDTH.update({0x3000: 0x20, 0x00A0: 0x20, 0x2007: 0x20, 0x202F: 0x20})
_ZERO_WIDTH = dict.fromkeys([0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x00AD])

_NUM = r"\d[\d,]*(?:\.\d+)?"
# counters and currency units written after a number: "1,000 명" -> "1,000명", "3억 원" -> "3억원"
_UNITS = "원|명|개|건|회|년|개월|월|일|시간|분|초|세|배|곳|종|호|항|조|장|절|억|만|천|백"
_NUM_UNIT = re.compile(rf"({_NUM})[ \t]+({_UNITS})(?![가-힣])")
_BIG_UNIT_WON = re.compile(r"(\d(?:[\d,]*)(?:억|만|천|백))[ \t]+(원)")
_PERCENT = re.compile(rf"({_NUM})[ \t]*(?:%|퍼센트|프로(?![가-힣]))")
_ARTICLE = re.compile(r"제[ \t]+(\d+)[ \t]*(조|항|호|장|절)")
_SPACES = re.compile(r"[ \t\f\v]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalize_numbers(text: str) -> str:
    """Consistent number/currency/percent forms: '3억 원'->'3억원', '1,000 명'->'1,000명',
    '10 %'/'10 퍼센트'->'10%', '제 14 조'->'제14조'. Dates such as '2024. 9. 15.' are left alone."""
    text = _ARTICLE.sub(r"제\1\2", text)
    text = _BIG_UNIT_WON.sub(r"\1\2", text)
    text = _NUM_UNIT.sub(r"\1\2", text)
    text = _PERCENT.sub(r"\1%", text)
    return text


def clean_text(text: str) -> str:
    """ftfy repair, NFC, full-width -> ASCII, zero-width removal, number forms, spacing."""
    if not text:
        return ""
    text = ftfy.fix_text(text, normalization="NFC")
    text = unicodedata.normalize("NFC", text)
    text = text.translate(_FULLWIDTH).translate(_ZERO_WIDTH)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = normalize_numbers(text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def compact(text: str) -> str:
    """Text with all whitespace removed (used to match evidence strings 'ignoring whitespace')."""
    return re.sub(r"\s+", "", text)
