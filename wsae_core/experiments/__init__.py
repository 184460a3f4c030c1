"""Experiment runners: grids over sparsity, seeds and methods, sized by the profile.

The chapters call these functions; the same runs are available from the command line::

    python -m wsae_core.experiments synthetic --profile book [--out results.json]
    python -m wsae_core.experiments theory --profile ci

``synthetic``  the paper's Figure 3 (chapter *WSAE on synthetic data*)
``theory``     closed form, extreme sparsity and identifiability by gradient descent
               (chapter *Training meets theory*)

Every run is seeded and independent, so a grid can be spread over worker processes
(:func:`run_tasks`) without changing any number.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["run_tasks", "default_workers", "int_at_least", "positive_int", "output_file", "check_spec", "md_table"]


def int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type for integers >= ``low``, described as ``what`` in its error (an option such
    as ``--workers 0`` is refused before any work starts)."""
    import argparse

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


#: argparse type: an integer >= 1.
positive_int = int_at_least(1, "an integer >= 1")


def output_file(text: str) -> str:
    """argparse type: a file path whose folder exists and is writable, checked before a long run
    rather than when its results are written."""
    import argparse
    from pathlib import Path

    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; expected a file path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {str(parent)!r} of {text!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"folder {str(parent)!r} of {text!r} is not writable")
    return text


def check_spec(spec: Any, ints: dict[str, int], sparsities: Sequence[float] = (), seeds: Sequence[Any] = ()) -> None:
    """Validate a run spec's sizes: ``ints`` maps field names to their minimum; ``sparsities`` must be
    in [0, 1) and ``seeds`` non-negative integers. Errors name the field, the value and the range."""
    from numbers import Integral, Real

    for name, low in ints.items():
        v = getattr(spec, name)
        if isinstance(v, bool) or not isinstance(v, Integral) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    for S in sparsities:
        if isinstance(S, bool) or not isinstance(S, Real) or not 0 <= S < 1:
            raise ValueError(f"every S must be a number in [0, 1), got {S!r}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, Integral) or s < 0:
            raise ValueError(f"every seed must be an integer >= 0, got {s!r}")


def default_workers() -> int:
    """Worker processes for a grid: the CPU count (one torch thread each), at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def run_tasks(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int | None = None) -> list[Any]:
    """``[fn(t) for t in tasks]``, in order, spread over ``workers`` spawned processes.

    ``fn`` must be importable (a module-level function). ``workers=1`` runs in this process with one
    torch thread. Tiny SAEs train fastest on one thread each, so workers = cores is best.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be None or an integer >= 1, got {workers!r}")
    workers = default_workers() if workers is None else workers
    if workers == 1 or len(tasks) <= 1:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [fn(t) for t in tasks]
        finally:
            torch.set_num_threads(threads)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker) as ex:
        return list(ex.map(fn, tasks, chunksize=1))


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> str:
    """A Markdown table for a chapter's ``display(Markdown(...))``: floats to ``digits`` decimals,
    None and NaN as "–", and a "|" inside a cell escaped (a KL label's "||" would split its row)."""
    import math

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
