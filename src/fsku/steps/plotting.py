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
    # the wheel's TTF files, added by path: importing the package (which sets rcParams itself and imports
    # distutils, gone from Python 3.12) is not needed
    import importlib.util
    from pathlib import Path

    from matplotlib import font_manager

    spec = importlib.util.find_spec("koreanize_matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for ttf in sorted((Path(folder) / "fonts").glob("*.ttf")):
            font_manager.fontManager.addfont(str(ttf))
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
