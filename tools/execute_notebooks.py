"""Execute chapters in place so that their committed outputs come from the default (book) run.

    python tools/execute_notebooks.py book/superposition.ipynb [more.ipynb ...]

Runs each notebook top to bottom in a fresh kernel with the profile from ``WSAE_PROFILE``
(default ``book``), from the notebook's own folder, and writes the outputs back. Fails on the
first cell that raises. ``make notebooks`` runs it over every chapter.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def execute(path: Path, timeout: int) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    # Stable metadata: no per-run execution timestamps in the committed file.
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    os.environ.setdefault("WSAE_PROFILE", "book")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for path in args.notebooks:
        if path.suffix != ".ipynb" or not path.is_file():
            print(f"not a notebook file: {path}", file=sys.stderr)
            return 2
        seconds = execute(path, args.timeout)
        print(f"{path}: executed in {seconds:.1f} s (profile {os.environ['WSAE_PROFILE']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
