"""matplotlib for the steps' MLflow plots: the Agg backend and a font with Hangul (domain names, option
texts and stems are Korean; matplotlib's default DejaVu Sans has no Hangul and draws empty boxes)."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)
# families with Hangul, in order of preference: the pinned koreanize-matplotlib wheel's NanumGothic first, then
# fonts a system may have (Debian's fonts-nanum, fonts-noto-cjk)
HANGUL_FAMILIES = ("NanumGothic", "Noto Sans CJK KR", "Noto Sans KR", "UnDotum", "Baekmuk Gulim")
_CONFIGURED: list[str] = []


def hangul_family() -> str:
    """The first Hangul-capable font family matplotlib can use ('' when none is installed)."""
    from matplotlib import font_manager

    try:  # the wheel ships its TTF files without registering them until imported: add them by path
        from importlib.resources import files

        for ttf in (files("koreanize_matplotlib") / "fonts").iterdir():
            if str(ttf).endswith(".ttf"):
                font_manager.fontManager.addfont(str(ttf))
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    names = {f.name for f in font_manager.fontManager.ttflist}
    return next((family for family in HANGUL_FAMILIES if family in names), "")


def pyplot():
    """matplotlib.pyplot on the Agg backend with a Hangul font first in the family list (DejaVu Sans after
    it for any glyph it lacks); configured once per process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not _CONFIGURED:
        family = hangul_family()
        _CONFIGURED.append(family)
        if family:
            matplotlib.rcParams["font.family"] = [family, "DejaVu Sans"]
            matplotlib.rcParams["axes.unicode_minus"] = False  # NanumGothic has no U+2212
        else:
            log.warning("no font with Hangul found (pip install koreanize-matplotlib, or fonts-nanum): Korean "
                        "labels in the plots show as boxes")
    return plt
