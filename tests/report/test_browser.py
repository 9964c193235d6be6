"""report.html in a real browser (headless Chromium, Debian's `chromium` package, driven by Playwright): the page
renders, every figure loads, and a screenshot is written. `make test-browser` installs the browser when absent and
runs these (`pytest -m browser`); CI runs them after `make test`."""

import os
import shutil
from pathlib import Path

import pytest

from synthlearn.cli import main

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("SYNTHLEARN_CHROMIUM", "/usr/bin/chromium")
#: flags for a sandbox without a display or network (ENVIRONMENT.md: without them Chromium dials out at start)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def render(html: Path, screenshot: Path) -> dict:
    """Open ``html`` in headless Chromium; return what the page shows and write a full-page ``screenshot``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(html.resolve().as_uri(), wait_until="load")
            images = page.evaluate("""() => Array.from(document.images).map(i => ({
                src: i.src.slice(0, 40), ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}))""")
            info = {"title": page.title(), "h1": page.inner_text("h1"), "images": images,
                    "tables": page.locator("table").count(), "errors": errors}
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return info


@pytest.fixture(scope="module")
def chromium():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: `make test-browser` installs Debian's chromium (or set SYNTHLEARN_CHROMIUM)")
    pytest.importorskip("playwright", reason="`make test-browser` installs playwright")
    return CHROMIUM


def test_the_report_renders_with_every_figure_in_a_real_browser(chromium, tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    assert main(["study", "report", str(run)]) == 0
    shot = tmp_path / "report.png"
    info = render(run / "report.html", shot)
    assert not info["errors"], info["errors"]
    assert "synthlearn" in info["title"].lower() or "report" in info["title"].lower(), info["title"]
    assert info["tables"] >= 2 and info["images"], info
    broken = [i for i in info["images"] if not i["ok"]]
    assert not broken, broken
    assert shot.is_file() and shot.stat().st_size > 20_000
    from PIL import Image

    with Image.open(shot) as img:
        assert img.width == 1280 and img.height > 900  # the full page, not just the first screen
