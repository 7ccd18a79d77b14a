"""The steps' plots draw Hangul (domain names and option texts are Korean)."""
from __future__ import annotations

import warnings


def test_korean_labels_render_without_missing_glyphs(tmp_path):
    from fsku.steps.plotting import hangul_family, pyplot

    plt = pyplot()
    assert hangul_family() == "NanumGothic"  # the pinned koreanize-matplotlib wheel's font
    fig, ax = plt.subplots()
    ax.barh(["금융보안법률 (n=3)", "정보보호 (n=2)"], [0.5, 0.7])
    ax.set_title("score by domain −1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph ... missing from font(s)" is a UserWarning
        fig.savefig(tmp_path / "domains.png")
    plt.close(fig)


def test_without_a_hangul_font_it_says_so(monkeypatch, caplog):
    from fsku.steps import plotting

    monkeypatch.setattr(plotting, "_CONFIGURED", [])
    monkeypatch.setattr(plotting, "hangul_family", lambda: "")
    with caplog.at_level("WARNING", logger="fsku.steps.plotting"):
        plotting.pyplot()
    assert "no font with Hangul found" in caplog.text
