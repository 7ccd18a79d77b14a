import pytest

from fsku.ingest.clean import clean_text, compact, normalize_numbers


@pytest.mark.parametrize("raw, expected", [
    ("벌금 3억 원 이하", "벌금 3억원 이하"),
    ("1,000 명 이상", "1,000명 이상"),
    ("10 % 이상", "10%"[:3] + " 이상"),
    ("5 퍼센트", "5%"),
    ("제 14 조", "제14조"),
    ("300만 원", "300만원"),
    ("2024. 9. 15. 시행", "2024. 9. 15. 시행"),  # dates untouched
    ("1 명확한 기준", "1 명확한 기준"),  # a counter followed by more Hangul is a word, not a unit
])
def test_number_forms(raw, expected):
    assert normalize_numbers(raw) == expected


def test_clean_fullwidth_spacing_and_circled_numbers():
    out = clean_text("２０２４년\u3000ＡＢＣ   테스트 ① 항목\u200b\r\n\r\n\r\n\r\n다음")
    assert out == "2024년 ABC 테스트 ① 항목\n\n다음"


def test_clean_repairs_mojibake_and_nfc():
    decomposed = "\u1100\u1161"  # 가 as conjoining jamo
    assert clean_text(decomposed) == "가"
    assert clean_text("") == ""


def test_compact_ignores_whitespace():
    assert compact(" a b\n c\t") == "abc"
