"""Small Sphinx fixes for the book's HTML, loaded through ``_config.yml`` (``local_extensions``).

* Jupyter Book 1 registers some extensions' inline scripts twice; the duplicated sphinx-thebe
  configuration (``const THEBE_JS_URL = ...``) then throws "Identifier 'THEBE_JS_URL' has already
  been declared" in every page. We drop exact duplicates from each page's script list.
* The vendored ipywidgets manager (``widgets/embed-amd.js``) is an AMD module that finds its own
  assets (fonts) relative to its module path, which RequireJS resolves against the page; we map
  that path to ``_static/widgets``. It also typesets labels through MathJax 2's ``MathJax.Hub``,
  which MathJax 3 no longer has; a two-line adapter forwards those calls to MathJax 3.
* Launch buttons (Binder, Colab) need the public repository that holds the book. It is read from
  the environment at build time, ``WSAE_REPO_URL=https://github.com/OWNER/REPO`` (optionally
  ``WSAE_REPO_BRANCH``), so a fork builds a book whose buttons open its own notebooks. Without it
  the buttons are hidden: Jupyter Book would otherwise point them at its own repository.
"""

from __future__ import annotations

import os

from sphinx.builders.html._assets import _JavaScript


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


def _widgets_shim(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files") or []
    for i, js in enumerate(scripts):
        if str(getattr(js, "filename", "") or "").endswith("widgets/embed-amd.js"):
            scripts.insert(i, _JavaScript(None, body=_WIDGETS_SHIM, priority=getattr(js, "priority", 500)))
            return


_WIDGETS_SHIM = """
require.config({paths: {"@jupyter-widgets/html-manager/dist":
  (document.documentElement.dataset.content_root || "./") + "_static/widgets"}});
window.addEventListener("load", function () {
  var mj = window.MathJax;
  if (mj && !mj.Hub) {
    mj.Hub = {Queue: function (cmd) {
      var el = cmd && cmd[2], ready = (mj.startup && mj.startup.promise) || Promise.resolve();
      return ready.then(function () { return mj.typesetPromise ? mj.typesetPromise(el ? [el] : undefined) : null; });
    }};
  }
});
"""


def _repository_from_env(app, config):
    url = os.environ.get("WSAE_REPO_URL", "").strip()
    options = dict(config.html_theme_options or {})
    if not url:
        options["launch_buttons"] = {}
        config.html_theme_options = options
        return
    if not url.startswith("https://"):
        raise ValueError(f"WSAE_REPO_URL must be an https:// repository URL, got {url!r}")
    options["repository_url"] = url.rstrip("/")
    options["repository_branch"] = os.environ.get("WSAE_REPO_BRANCH", "main")
    options["path_to_docs"] = ""
    config.html_theme_options = options


def setup(app):
    app.connect("config-inited", _repository_from_env)
    # 'html-page-context' stops at the first handler that returns a template, so run first; the
    # duplicated scripts are registered at start-up, long before any page is written.
    app.connect("html-page-context", _dedupe_scripts, priority=1)
    # myst-nb adds the widget scripts in its own page-context handler, only on pages with widgets.
    app.connect("html-page-context", _widgets_shim, priority=990)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
