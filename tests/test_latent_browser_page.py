"""The latent browser's page in the built book, in headless Chromium with the network off.

Uses the harness of tests/test_browser.py (its server, browser and page opener, which abort and
report every request that leaves the book, console errors and page errors): search finds a latent
by a word of its explanation, a latent opens with shaded contexts and a histogram, a neighbour link
opens a latent of another SAE. Skipped like those tests where no book is built or Chromium is missing.
"""

from __future__ import annotations

import re

import pytest
from required import missing
from test_browser import SCREENSHOTS, _open, browser, server  # noqa: F401  (fixtures)
from test_built_book import HTML

PAGE = "book/latent_browser.html"


def test_the_page_searches_opens_shades_and_links_offline(browser, server):  # noqa: F811
    if not (HTML / PAGE).exists():
        missing("no latent browser page in this build", env="WSAE_REQUIRE_BROWSER")
    page, problems = _open(browser, server, PAGE)
    try:
        page.wait_for_selector(".wsae-lb-item", timeout=20_000)
        items = page.locator(".wsae-lb-item")
        n_all = items.count()
        assert n_all > 10, f"only {n_all} latents listed"
        # A word of one explanation finds that latent and hides others.
        word = page.evaluate("""() => window.WSAE_LATENT_BROWSER.latents.filter(l => l.explanation)
            .map(l => l.explanation.split(/[^A-Za-z]+/).filter(w => w.length > 5)[0]).filter(Boolean)[0]""")
        page.fill(".wsae-lb-search", word)
        n_found = items.count()
        assert 1 <= n_found < n_all, (word, n_found, n_all)
        texts = [items.nth(i).inner_text().lower() for i in range(n_found)]
        assert any(word.lower() in t for t in texts), (word, texts)
        hit = next(i for i, t in enumerate(texts) if word.lower() in t)
        items.nth(hit).click()
        assert page.locator(".wsae-lb-title").inner_text() == items.nth(hit).locator(".wsae-lb-item-name").inner_text()
        assert word.lower() in page.locator(".wsae-lb-explanation").first.inner_text().lower()
        # Its scores, each named by scorer and explainer (a scoring run's format), as the data give them.
        scores = page.evaluate("""(k) => window.WSAE_LATENT_BROWSER.latents
            .find(l => l.sae + '-' + l.id === k).scores || []""", items.nth(hit).get_attribute("data-key"))
        if scores:
            shown = page.locator(".wsae-lb-scores").first.inner_text()
            for s in scores:
                m = re.search(rf"{s['scorer']} AUROC ([0-9.]+) \({s['explainer']} explainer\)", shown)
                assert m and abs(float(m.group(1)) - s["auroc"]) <= 0.005 + 1e-9, (s, shown)
        # Contexts with shaded tokens and a histogram with bars.
        assert page.locator(".wsae-lb-detail .wsae-lb-context").count() >= 2
        shaded = page.locator(".wsae-lb-detail .wsae-lb-on")
        assert shaded.count() >= 2 and "rgba" in (shaded.first.get_attribute("style") or "")
        assert page.locator(".wsae-lb-hist rect").count() >= 10
        # Follow a neighbour link into another SAE, from a latent whose neighbours are in the sample.
        key = page.evaluate("""() => { const d = window.WSAE_LATENT_BROWSER;
            const have = new Set(d.latents.map(l => l.sae + '-' + l.id));
            const l = d.latents.find(l => Object.entries(l.neighbours).some(([s, ps]) => ps.some(p => have.has(s + '-' + p[0]))));
            return l.sae + '-' + l.id; }""")
        page.fill(".wsae-lb-search", "")
        page.click(f".wsae-lb-item[data-key='{key}']")
        link = page.locator(".wsae-lb-detail .wsae-lb-link").first
        target = link.inner_text().split()[0]
        link.click()
        assert page.locator(".wsae-lb-title").inner_text().endswith(target)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "latent_browser_open.png"), full_page=True)
        assert not problems, "\n".join(problems)
    finally:
        page.context.close()
