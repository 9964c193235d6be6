"""Open a report in a real browser: headless Chromium (Debian's ``chromium`` package) driven by Playwright, which
never downloads a browser of its own here. ``make test-browser`` installs both (``requirements/browser.txt``); the
package itself does not need them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: the browser binary (Debian's chromium); ``SYNTHLEARN_CHROMIUM`` overrides it
CHROMIUM = os.environ.get("SYNTHLEARN_CHROMIUM", "/usr/bin/chromium")
#: flags for a machine without a display or outside network: without the networking ones Chromium dials out at start
FLAGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync")


def render(html: str | Path, screenshot: str | Path, *, full_page: bool = True, width: int = 1280,
           height: int = 900) -> dict[str, Any]:
    """Open ``html`` in headless Chromium and write a PNG ``screenshot`` of it.

    Args:
        html: the page (a file).
        screenshot: the PNG to write.
        full_page: the whole page; False: the first screen (``width`` x ``height``).

    Returns:
        What the page shows: ``{"title", "h1", "images": [{"src", "ok", "w"}], "tables", "errors"}`` (``ok`` False for
        an image that did not load; ``errors``: the page's JavaScript errors).

    Raises:
        FileNotFoundError: no browser at :data:`CHROMIUM`, or no page at ``html``.
        ImportError: Playwright is not installed (``make test-browser`` installs it).
    """
    html = Path(html)
    if not html.is_file():
        raise FileNotFoundError(f"{html}: no such page")
    if not Path(CHROMIUM).is_file():
        raise FileNotFoundError(f"{CHROMIUM}: no Chromium here; `make test-browser` installs Debian's chromium "
                                "(or set SYNTHLEARN_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise ImportError("Playwright is not installed: `make test-browser` installs it (requirements/browser.txt)"
                          ) from exc
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=list(FLAGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(html.resolve().as_uri(), wait_until="load")
            images = page.evaluate("""() => Array.from(document.images).map(i => ({
                src: i.src.slice(0, 40), ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}))""")
            info = {"title": page.title(), "h1": page.inner_text("h1"), "images": images,
                    "tables": page.locator("table").count(), "errors": errors}
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=full_page)
        finally:
            browser.close()
    return info


__all__ = ["CHROMIUM", "FLAGS", "render"]
