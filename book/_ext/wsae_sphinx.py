"""Small Sphinx fixes for the book's HTML, loaded through ``_config.yml`` (``local_extensions``).

Jupyter Book 1 registers some extensions' inline scripts twice; the duplicated sphinx-thebe
configuration (``const THEBE_JS_URL = ...``) then throws "Identifier 'THEBE_JS_URL' has already
been declared" in every page. We drop exact duplicates from each page's script list.
"""

from __future__ import annotations


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in scripts:
        # An inline script may carry filename None or "" depending on who added it.
        key = (str(getattr(js, "filename", js) or ""),
               tuple(sorted((k, str(v)) for k, v in getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def setup(app):
    # 'html-page-context' stops at the first handler that returns a template, so run first; the
    # duplicated scripts are registered at start-up, long before any page is written.
    app.connect("html-page-context", _dedupe_scripts, priority=1)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
