"""Sparse ground truth x and its superposition x_p = W_p x (chapter *Superposition and the sparse model*).

Each coordinate ``x_i`` is zero with probability ``S`` (the sparsity) and otherwise drawn from a
positive value distribution, Uniform[0, 1] by default (the paper does not state it; Uniform[0, 1]
follows Elhage et al., *Toy Models of Superposition*).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Callable, Literal

import numpy as np
import torch

__all__ = ["VALUE_DISTRIBUTIONS", "check_sparsity", "sample_sparse", "superpose"]

ValueDistribution = Literal["uniform", "exponential", "constant"]
VALUE_DISTRIBUTIONS: dict[str, Callable[[int, torch.Generator, torch.dtype, torch.device], torch.Tensor]] = {
    # Draw ``k`` positive values. Uniform[0, 1] is the book's default.
    "uniform": lambda k, g, dt, dev: torch.rand(k, generator=g, dtype=dt, device=dev),
    # Exponential(1): heavier tail, same support (0, inf).
    "exponential": lambda k, g, dt, dev: -torch.log1p(-torch.rand(k, generator=g, dtype=dt, device=dev)),
    # Every active feature equals 1: isolates the effect of *which* features are active.
    "constant": lambda k, g, dt, dev: torch.ones(k, dtype=dt, device=dev),
}


def check_sparsity(S: float, *, allow_one: bool = False) -> float:
    """Validate a sparsity ``S`` (probability that a feature is zero): ``0 <= S < 1``."""
    if isinstance(S, bool) or not isinstance(S, Real) or not math.isfinite(S):
        raise ValueError(f"S must be a finite number in [0, 1), got {S!r}")
    upper_ok = S <= 1 if allow_one else S < 1
    if not (0 <= S and upper_ok):
        raise ValueError(f"S must be in [0, {'1]' if allow_one else '1)'}, got {S}")
    return float(S)


def _positive_int(name: str, v: int) -> int:
    if isinstance(v, bool) or not isinstance(v, Integral) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def sample_sparse(
    batch: int,
    n: int,
    S: float,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    values: ValueDistribution = "uniform",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Draw ``batch`` ground-truth vectors x of shape ``(batch, n)`` with sparsity ``S``.

    Each entry is non-zero independently with probability ``1 - S``. The active entries are drawn
    by index (a Binomial count, then positions), so the cost scales with the number of active
    features, not with ``batch * n`` (see benchmarks for the measured gain).
    Give either ``seed`` (a fresh generator) or ``generator`` (continues its stream).
    """
    batch, n = _positive_int("batch", batch), _positive_int("n", n)
    S = check_sparsity(S)
    if values not in VALUE_DISTRIBUTIONS:
        raise ValueError(f"values must be one of {sorted(VALUE_DISTRIBUTIONS)}, got {values!r}")
    device = torch.device(device)
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]) if seed is None else int(seed))
    draw = VALUE_DISTRIBUTIONS[values]
    total = batch * n
    x = torch.zeros(total, dtype=dtype, device=device)
    p = 1.0 - S
    if p >= 0.25:
        mask = torch.rand(total, generator=generator, device=device) < p
        idx = mask.nonzero().squeeze(1)
    else:
        # Sparse path: the number of active entries, then that many distinct positions.
        k = int(torch.binomial(torch.tensor([float(total)], device=device),
                               torch.tensor([p], device=device), generator=generator).item())
        idx = _distinct_positions(total, k, generator, device)
    x[idx] = draw(idx.numel(), generator, dtype, device)
    return x.view(batch, n)


def _distinct_positions(total: int, k: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """``k`` distinct uniform positions in ``range(total)`` without a length-``total`` permutation."""
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    chosen = torch.empty(0, dtype=torch.long, device=device)
    need = k
    while need > 0:
        # Oversample, drop duplicates, keep the first ``need`` new positions in draw order.
        cand = torch.randint(total, (int(need * 1.1) + 16,), generator=g, device=device)
        merged = torch.cat([chosen, cand])
        uniq, inverse = torch.unique(merged, return_inverse=True)
        first = torch.full((uniq.numel(),), merged.numel(), dtype=torch.long, device=device)
        first.scatter_reduce_(0, inverse, torch.arange(merged.numel(), device=device), reduce="amin")
        order = torch.sort(first).values
        chosen = merged[order[: k]]
        need = k - chosen.numel()
    return chosen


def superpose(x: torch.Tensor | np.ndarray, W_p: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``x_p = W_p x`` for a batch: ``x`` ``(batch, n)``, ``W_p`` ``(n_p, n)`` -> ``(batch, n_p)``."""
    x = torch.as_tensor(x)
    W = torch.as_tensor(W_p, dtype=x.dtype, device=x.device)
    if W.ndim != 2 or x.ndim not in (1, 2) or x.shape[-1] != W.shape[1]:
        raise ValueError(f"x must be (batch, {W.shape[-1]}) to match W_p of shape {tuple(W.shape)}, got {tuple(x.shape)}")
    return x @ W.T
