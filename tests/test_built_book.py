"""Checks on the built HTML book: every chapter has a page, nothing loads from outside the book,
math is served locally, and no chapter failed to execute.

The build folder comes from ``WSAE_BUILT_HTML`` (``make test`` sets it after its strict build);
without it the tests look at ``_build/html`` and skip when no build exists.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from bs4 import BeautifulSoup
from toc import toc_files

ROOT = Path(__file__).resolve().parents[1]
_env = os.environ.get("WSAE_BUILT_HTML")
HTML = Path(_env) if _env else ROOT / "_build" / "html"
if not HTML.is_absolute():
    HTML = ROOT / HTML

if _env is None and not (HTML / "index.html").exists():
    pytest.skip("no built book: run `make book` or `make test`", allow_module_level=True)

EXTERNAL = re.compile(r"^(https?:)?//", re.I)
# Attributes through which a page loads something (links a reader clicks are not loads).
LOADING = {"script": "src", "img": "src", "iframe": "src", "source": "src", "video": "src",
           "audio": "src", "embed": "src", "object": "data"}
CSS_URL = re.compile(r"url\(\s*['\"]?((?:https?:)?//[^)'\"]+)", re.I)
CSS_IMPORT = re.compile(r"@import\s+['\"]((?:https?:)?//[^'\"]+)", re.I)


def pages() -> list[Path]:
    found = sorted(HTML.rglob("*.html"))
    assert found, f"no HTML pages under {HTML}"
    return found


def test_build_exists():
    assert (HTML / "index.html").exists(), f"{HTML}/index.html missing: the book was not built"


@pytest.mark.parametrize("doc", toc_files())
def test_every_chapter_has_a_page(doc):
    page = HTML / f"{doc}.html"
    assert page.exists(), f"{doc} is in _toc.yml but {page} was not built"
    text = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser").get_text()
    assert len(text) > 500, f"{page} is almost empty"


def test_no_execution_errors_reported():
    reports = sorted((HTML / "reports").glob("*.log")) if (HTML / "reports").exists() else []
    assert not reports, "execution failed for: " + ", ".join(r.name for r in reports)


def test_no_page_loads_anything_from_outside_the_book():
    offenders = []
    for page in pages():
        soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
        for tag, attr in LOADING.items():
            for el in soup.find_all(tag):
                url = el.get(attr)
                if url and EXTERNAL.match(url):
                    offenders.append(f"{page.relative_to(HTML)}: <{tag} {attr}={url}>")
        for el in soup.find_all("link"):
            rel = " ".join(el.get("rel", []))
            if any(k in rel for k in ("stylesheet", "preload", "icon", "modulepreload", "manifest")):
                url = el.get("href", "")
                if EXTERNAL.match(url):
                    offenders.append(f"{page.relative_to(HTML)}: <link rel={rel} href={url}>")
        for el in soup.find_all(style=True):
            offenders += [f"{page.relative_to(HTML)}: style url {u}" for u in CSS_URL.findall(el["style"])]
        for el in soup.find_all("style"):
            css = el.get_text()
            offenders += [f"{page.relative_to(HTML)}: inline css {u}" for u in CSS_URL.findall(css) + CSS_IMPORT.findall(css)]
    for css in HTML.rglob("*.css"):
        text = css.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{css.relative_to(HTML)}: {u}" for u in CSS_URL.findall(text) + CSS_IMPORT.findall(text)]
    assert not offenders, "external resources:\n" + "\n".join(sorted(set(offenders))[:50])


def test_mathjax_is_served_by_the_book():
    page = HTML / "book" / "superposition.html"
    soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
    srcs = [s.get("src", "") for s in soup.find_all("script")]
    mj = [s for s in srcs if "tex-mml-chtml" in s]
    assert mj, f"no MathJax script on {page.name}: {srcs}"
    target = (page.parent / mj[0].split("?")[0]).resolve()
    assert target.is_file() and target.stat().st_size > 500_000, f"MathJax not vendored at {target}"
    fonts = HTML / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2"
    assert len(list(fonts.glob("*.woff"))) >= 20, f"MathJax fonts missing under {fonts}"
    assert "\\sigma" in page.read_text(encoding="utf-8") or "$$" in page.read_text(encoding="utf-8")


def test_figures_are_embedded_images():
    page = HTML / "book" / "superposition.html"
    soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
    imgs = [img.get("src", "") for img in soup.find_all("img")]
    local = [src for src in imgs if src and not EXTERNAL.match(src)]
    assert len(local) >= 2, f"expected the chapter's figures on {page.name}, found {imgs}"
    for src in local:
        if not src.startswith("data:"):
            assert (page.parent / src.split("?")[0]).resolve().is_file(), f"missing figure file {src}"


@pytest.mark.skipif(bool(os.environ.get("WSAE_REPO_URL")), reason="this build has a repository for the launch buttons")
def test_no_launch_buttons_without_a_repository():
    """Without WSAE_REPO_URL the book has no repository to launch: no Binder/Colab button may point
    elsewhere (Jupyter Book's default would be its own repository)."""
    offenders = []
    for page in pages():
        soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
        for a in soup.find_all("a", href=True):
            if any(k in a["href"] for k in ("mybinder.org", "colab.research.google.com", "executablebooks/jupyter-book")):
                offenders.append(f"{page.relative_to(HTML)}: {a['href']}")
    assert not offenders, "launch links without a repository:\n" + "\n".join(offenders[:10])
