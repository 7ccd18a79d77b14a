"""Screenshots of the MLflow UI after `make demo`, for the README (docs/img/*.png).

    apt-get install chromium fonts-noto-cjk          # Debian's Chromium and a font with Hangul
    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright   # drives the system Chromium: no browser download
    make ui &                                         # the UI on 127.0.0.1:5000 over the demo's mlflow.db
    /tmp/pw/bin/python docs/screenshots.py [--ui http://127.0.0.1:5000] [--out docs/img]

The runs, the promote run and the champion are looked up through the tracking server's REST API, so the
pages shown are the current store's: the runs table (child runs expanded), the promote decision run,
the champion student version, the experiment's Models tab (logged models and their scores) and
the registered models.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

VIEWPORT = {"width": 1680, "height": 1000}


def api(ui: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{ui}/api/2.0/mlflow/{path}", method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def lookup(ui: str, experiment: str, model: str) -> dict:
    try:
        exp = api(ui, "experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": experiment}))["experiment"]
    except urllib.error.URLError as exc:
        sys.exit(f"{ui}: no MLflow UI with experiment {experiment!r} ({exc}); start it with `make ui`")
    runs = api(ui, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 500,
                                   "filter": "tags.`fsku.step` = 'promote'", "order_by": ["attributes.start_time DESC"]})
    if not runs.get("runs"):
        sys.exit(f"no promote run in experiment {experiment!r}: run `make demo` first")
    try:
        champion = api(ui, "registered-models/alias?" + urllib.parse.urlencode({"name": model, "alias": "champion"}))
    except urllib.error.HTTPError as exc:
        sys.exit(f"{model} has no champion version ({exc}): run `make demo` first")
    champion = champion["model_version"]
    return {"experiment_id": exp["experiment_id"], "promote_run": runs["runs"][0]["info"]["run_id"],
            "champion_version": champion["version"]}


def close_assistant(page) -> None:
    """The MLflow Assistant side panel opens by default and covers a third of the page."""
    for label in ("Close", "close"):
        button = page.locator(f"button[aria-label='{label}']")
        if button.count():
            try:
                button.first.click(timeout=2000)
            except Exception:  # not visible on this page
                pass
            return


def shoot(page, url: str, out: Path, wait_for: str, setup=None, height: int = VIEWPORT["height"]) -> None:
    """`height`: the viewport's (the UI scrolls inside its own panel, so a full-page capture shows no more)."""
    page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
    page.goto(url)
    page.get_by_text(wait_for, exact=False).first.wait_for(timeout=30000)
    page.wait_for_timeout(1500)
    close_assistant(page)
    if setup:
        setup(page)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(out))
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ui", default="http://127.0.0.1:5000")
    p.add_argument("--out", default="docs/img", type=Path)
    p.add_argument("--experiment", default="fsku")
    p.add_argument("--model", default="fsku-student")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    a = p.parse_args(argv)
    if not a.chromium:
        sys.exit("no chromium on PATH: apt-get install chromium (or pass --chromium PATH)")
    from playwright.sync_api import sync_playwright

    ids = lookup(a.ui, a.experiment, a.model)
    a.out.mkdir(parents=True, exist_ok=True)
    base = f"{a.ui}/#"

    def expand_tree(page) -> None:
        """Open main's and promote's child runs and widen the run-name column so names read whole."""
        for parent in ("main-", "promote-"):
            row = page.locator("[role=row]", has_text=parent).first
            row.locator("button[data-component-id$='runnamecellrenderer.tsx_46']").first.click()
            page.wait_for_timeout(800)
        # ag-grid resizes a column by a drag from its header's right edge (the resize handle is 8 px wide there)
        header = page.locator("[role=columnheader][col-id='attributes.`Run Name`']").first
        box = header.bounding_box()
        if box:
            x, y = box["x"] + box["width"] - 2, box["y"] + box["height"] / 2
            page.mouse.move(x, y)
            page.wait_for_timeout(200)
            page.mouse.down()
            page.mouse.move(x + 100, y, steps=5)
            page.mouse.move(x + 200, y, steps=10)
            page.mouse.up()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport=VIEWPORT, device_scale_factor=1)
        shoot(page, f"{base}/experiments/{ids['experiment_id']}/runs", a.out / "runs-table.png", "main-", expand_tree)
        shoot(page, f"{base}/experiments/{ids['experiment_id']}/runs/{ids['promote_run']}", a.out / "promote-run.png",
              "promote-")
        shoot(page, f"{base}/models/{a.model}/versions/{ids['champion_version']}", a.out / "champion-version.png",
              f"Version {ids['champion_version']}", height=1000)
        # the experiment's Models tab: logged models with the evaluation scores linked to them
        shoot(page, f"{base}/experiments/{ids['experiment_id']}/models", a.out / "models-tab.png", "student-int8")
        shoot(page, f"{base}/models", a.out / "registered-models.png", a.model)
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
