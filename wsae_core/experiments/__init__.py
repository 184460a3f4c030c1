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

__all__ = ["run_tasks", "default_workers"]


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
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
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
