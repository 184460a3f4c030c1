"""Write a chapter notebook from a plain-text cell list (a convenience for authors).

    python tools/new_notebook.py book/chapter.py book/chapter.ipynb

The source file holds cells separated by lines ``# %% [markdown]`` or ``# %%`` (the "percent"
format). Markdown cells have each line prefixed by ``# ``, which is removed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat


def parse(text: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    kind, lines = None, []

    def flush():
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in body.splitlines())
            nb.cells.append(nbformat.v4.new_markdown_cell(body))
        else:
            tags = []
            first = body.splitlines()[0] if body else ""
            if first.startswith("# tags:"):
                tags = [t.strip() for t in first[len("# tags:"):].split(",") if t.strip()]
                body = "\n".join(body.splitlines()[1:])
            cell = nbformat.v4.new_code_cell(body)
            if tags:
                cell.metadata["tags"] = tags
            nb.cells.append(cell)

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return nb


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    nbformat.write(parse(src.read_text()), dst)
    print(f"wrote {dst} ({len(parse(src.read_text()).cells)} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
