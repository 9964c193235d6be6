"""report.html in a real browser (headless Chromium, Debian's `chromium` package, driven by Playwright): the page
renders, every figure loads, and a screenshot is written. `make test-browser` installs the browser when absent and
runs these (`pytest -m browser`); CI runs them after `make test`."""

import shutil
from pathlib import Path

import pytest

from synthlearn.cli import main
from synthlearn.report.browser import CHROMIUM, render

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def chromium():
    """The browser and Playwright are there (`make test-browser` installs both); a missing one fails, never skips."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: `make test-browser` installs Debian's chromium (or set SYNTHLEARN_CHROMIUM)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.fail("playwright is not installed: `make test-browser` installs it (requirements/browser.txt)")
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
