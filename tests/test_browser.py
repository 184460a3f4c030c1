"""The built book in a real browser with the network off.

Headless Chromium (Debian's ``chromium``, driven by Playwright) opens every page of the built book
served from 127.0.0.1. Every request that leaves the local server is aborted and counted as a
failure, so the checks below prove the book reads offline:

* math is typeset by the vendored MathJax (``mjx-container`` elements, no raw ``$$`` left);
* every image (figure) loads;
* widgets saved in a chapter render (the vendored ipywidgets manager draws them);
* no page logs a console error or throws;
* no page shows a Markdown table as raw text (``| a | b |`` lines outside code blocks).

Screenshots of every page go to ``<build>/../screenshots/`` (``_build/test/_build/screenshots``
under ``make test``) as test artifacts.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

from required import missing, require
from test_built_book import HTML, pages

# Under make test (WSAE_REQUIRE_BROWSER) a missing Playwright or Chromium fails instead of skipping.
playwright_api = require("playwright.sync_api", "pip install -r requirements.txt", env="WSAE_REQUIRE_BROWSER")

CHROMIUM = os.environ.get("WSAE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    missing("Chromium not found (make browser installs Debian's chromium)", allow_module_level=True,
            env="WSAE_REQUIRE_BROWSER")

SCREENSHOTS = HTML.parent / "screenshots"
# Flags from a closed-network machine: no background traffic, no sandbox as root, no GPU.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]
# Console noise that is not a page error: the browser's own favicon probe.
BENIGN = ("favicon.ico",)
# Generous waits: on a 2-core machine shared with other jobs a page with many figures can take more
# than Playwright's default 30 s to go idle. Nothing is fetched from outside, so waiting hides nothing.
TIMEOUT_MS = 180_000


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server():
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def _open(browser, server, rel: str):
    """Load one page with outside requests blocked; return (page, problems)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    problems: list[str] = []

    def route(r):
        if r.request.url.startswith(server) or r.request.url.startswith("data:"):
            r.continue_()
        else:
            problems.append(f"blocked outside request: {r.request.url}")
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" and not any(b in m.text for b in BENIGN) else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url}")
            if r.url.startswith(server) and not any(b in r.url for b in BENIGN) else None)
    page.goto(f"{server}/{rel}", wait_until="load")
    page.wait_for_load_state("networkidle")
    return page, problems


def _typeset(page) -> None:
    """Wait until the vendored MathJax has typeset the page (if the page loads it)."""
    if page.locator("script[src*='tex-mml-chtml']").count():
        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                               timeout=TIMEOUT_MS)
        page.evaluate("() => MathJax.startup.promise.then(() => true)")


CHAPTERS = [p for p in pages() if p.parent.name == "book"]

# Text lines that look like a pipe-table row, outside code and printed outputs (pre).
_RAW_TABLE_ROWS = """() => {
  const root = (document.querySelector('article') || document.body).cloneNode(true);
  root.querySelectorAll('pre, code, table, mjx-container, script, style').forEach(e => e.remove());
  return root.textContent.split('\\n').map(l => l.trim()).filter(l => /^\\|.*\\|.*\\|$/.test(l));
}"""


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_renders_offline(browser, server, path: Path):
    rel = path.relative_to(HTML).as_posix()
    page, problems = _open(browser, server, rel)
    try:
        _typeset(page)
        html = path.read_text(encoding="utf-8")
        has_math = "\\(" in html or "\\[" in html or "$$" in html or 'class="math' in html
        if has_math:
            n_math = page.locator("mjx-container").count()
            assert n_math > 0, f"{rel}: math present but not typeset (no mjx-container)"
            raw = page.evaluate("() => document.querySelector('article') ? "
                                "document.querySelector('article').innerText : document.body.innerText")
            assert "$$" not in raw and "\\frac" not in raw, f"{rel}: raw TeX visible after typesetting"
        raw_rows = page.evaluate(_RAW_TABLE_ROWS)
        assert not raw_rows, f"{rel}: Markdown tables shown as raw text: {raw_rows[:3]}"
        broken = page.evaluate("() => Array.from(document.images)"
                               ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
        assert not broken, f"{rel}: images failed to load: {broken}"
        if "application/vnd.jupyter.widget-view+json" in html:
            page.wait_for_selector(".jupyter-widgets", timeout=TIMEOUT_MS)
            n_widgets = page.locator(".jupyter-widgets").count()
            assert n_widgets > 0, f"{rel}: widget outputs present but none rendered"
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{path.stem}.png"), full_page=True)
        assert not problems, f"{rel}:\n" + "\n".join(problems)
    finally:
        page.context.close()


def test_precomputed_explorer_works_without_a_kernel(browser, server):
    """The playground's pre-rendered explorer must change its figure when its controls move."""
    if not (HTML / "book" / "playground.html").exists():
        missing("no playground chapter in this build", env="WSAE_REQUIRE_BROWSER")
    page, problems = _open(browser, server, "book/playground.html")
    try:
        frame = page.locator(".wsae-explorer .wsae-frame").first
        before = frame.get_attribute("src")
        assert before and before.startswith("data:image/png;base64,"), "explorer shows no figure"
        page.evaluate("""() => { const s = document.querySelector('.wsae-explorer .wsae-S');
                                 s.value = s.max; s.dispatchEvent(new Event('input')); }""")
        after_S = frame.get_attribute("src")
        page.select_option(".wsae-explorer .wsae-geom", index=1)
        after_geom = frame.get_attribute("src")
        assert len({before, after_S, after_geom}) == 3, "moving a control did not change the figure"
        assert not problems, "\n".join(problems)
    finally:
        page.context.close()


def test_breaking_the_vendored_mathjax_is_detected(browser, server, tmp_path):
    """The check above must fail when MathJax cannot load: serve a copy without it."""
    copy = tmp_path / "html"
    shutil.copytree(HTML, copy, ignore=shutil.ignore_patterns("*.png", "*.ipynb", "*.zip"))
    (copy / "_static" / "mathjax" / "tex-mml-chtml.js").unlink()
    handler = functools.partial(_QuietHandler, directory=str(copy))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        page, problems = _open(browser, url, "book/superposition.html")
        page.wait_for_timeout(500)
        assert page.locator("mjx-container").count() == 0
        assert any("tex-mml-chtml" in p for p in problems), problems
        page.context.close()
    finally:
        httpd.shutdown()
