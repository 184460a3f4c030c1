"""Sparse ground truth x and its superposition x_p = W_p x (chapter *Superposition and the sparse model*).

Each coordinate ``x_i`` is zero with probability ``S`` (the sparsity) and otherwise drawn from a
positive value distribution, Uniform[0, 1] by default (the paper does not state it; Uniform[0, 1]
follows Elhage et al., *Toy Models of Superposition*).
"""

from __future__ import annotations

import math
from functools import lru_cache
from numbers import Integral, Real
from typing import Callable, Literal

import numpy as np
import torch

from .checks import check_finite

__all__ = [
    "VALUE_DISTRIBUTIONS",
    "check_sparsity",
    "sample_sparse",
    "superpose",
    "SUPERPOSITION_KINDS",
    "DEFAULT_SUPERPOSITION",
    "polygon_layout",
    "random_superposition",
    "toy_model_superposition",
    "synthetic_superposition",
    "SparseSource",
    "TensorSource",
]

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

    Each entry is non-zero independently with probability ``1 - S``. For ``S > 0.75`` the active
    entries are drawn by index (geometric gaps between successive active positions), so the cost
    scales with the number of active features, not with ``batch * n`` (``benchmarks/bench_sampler.py``:
    S = 0.8-0.9 about 9x faster than the previous distinct-positions draw on one thread); for
    ``S <= 0.75`` a dense Bernoulli mask, as before (same seeded outputs).
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
        # Dense path (unchanged, so that chapters' seeded outputs stay the same): a Bernoulli mask.
        mask = torch.rand(total, generator=generator, device=device) < p
        idx = mask.nonzero().squeeze(1)
    else:
        # Sparse path: positions of a Bernoulli(p) process from Geometric(p) gaps, O(#active).
        idx = _bernoulli_positions(total, p, generator, device)
    x[idx] = draw(idx.numel(), generator, dtype, device)
    return x.view(batch, n)


def _check_generator(g) -> None:
    if not isinstance(g, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(g).__name__}")


def _bernoulli_positions(total: int, p: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """Sorted positions in ``range(total)`` of the successes of ``total`` Bernoulli(p) trials.

    The gaps between successive successes are i.i.d. Geometric(p) on {1, 2, ...}, so the cumulative
    sum of geometric draws gives exactly the Bernoulli process, at a cost proportional to the number
    of successes instead of ``total``.
    """
    if p <= 0.0:
        return torch.empty(0, dtype=torch.long, device=device)
    parts, last = [], -1.0
    while last < total - 1:
        mean = (total - 1 - last) * p
        chunk = int(mean + 4.0 * math.sqrt(mean) + 16)
        gaps = torch.empty(chunk, dtype=torch.float64, device=device).geometric_(p, generator=g)
        pos = gaps.cumsum(0) + last
        parts.append(pos)
        last = float(pos[-1])
    pos = torch.cat(parts)
    return pos[pos < total].long()


def superpose(x: torch.Tensor | np.ndarray, W_p: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``x_p = W_p x`` for a batch: ``x`` ``(batch, n)``, ``W_p`` ``(n_p, n)`` -> ``(batch, n_p)``."""
    x = torch.as_tensor(x)
    if not x.is_floating_point():  # integer or boolean ground truth: W_p must not be rounded to its dtype
        x = x.to(torch.float32)
    W = torch.as_tensor(W_p, dtype=x.dtype, device=x.device)
    if W.ndim != 2 or x.ndim not in (1, 2) or x.shape[-1] != W.shape[1]:
        raise ValueError(f"x must be (batch, {W.shape[-1]}) to match W_p of shape {tuple(W.shape)}, got {tuple(x.shape)}")
    check_finite(W, "W_p")
    check_finite(x, "x")
    return x @ W.T


# ---------------------------------------------------------------------------------------------
# The paper's synthetic setting (chapter *WSAE on synthetic data*): n = 200 features in n_p = 20
# dimensions. The paper does not say how its W_p was made; three constructions are offered.
# n = 200 > 2 n_p = 40, and at most 2 n_p unit vectors in R^{n_p} have pairwise non-positive
# inner products, so every W_p here necessarily has positive interference somewhere.
# ---------------------------------------------------------------------------------------------

SuperpositionKind = Literal["random", "polygons", "toy_model"]
SUPERPOSITION_KINDS: tuple[str, ...] = ("random", "polygons", "toy_model")
#: The book's default for the n = 200, n_p = 20 experiments (see :func:`synthetic_superposition`).
DEFAULT_SUPERPOSITION: SuperpositionKind = "polygons"


def polygon_layout(n: int, n_p: int, n_mono: int | None = None, n_digons: int | None = None) -> list[int]:
    """Group sizes (for :func:`wsae_core.geometry.superposition_matrix`) packing n features in n_p dims.

    ``n_mono`` monosemantic dimensions (default ``n_p // 5``) and ``n_digons`` digons (default
    ``n_p // 10``) take one dimension each; the remaining dimensions are paired into 2-D planes that
    share the remaining features as equally as possible, as regular polygons. For the paper's
    n = 200, n_p = 20 that is 4 monosemantic dims, 2 digons and 7 planes holding 27- or 28-gons.
    An odd number of remaining dimensions gets one more monosemantic dimension.
    """
    n, n_p = _positive_int("n", n), _positive_int("n_p", n_p)
    n_mono = n_p // 5 if n_mono is None else n_mono
    n_digons = n_p // 10 if n_digons is None else n_digons
    for name, v in (("n_mono", n_mono), ("n_digons", n_digons)):
        if isinstance(v, bool) or not isinstance(v, Integral) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    planes_dims = n_p - n_mono - n_digons
    if planes_dims < 0:
        raise ValueError(f"n_mono + n_digons must be <= n_p = {n_p}, got {n_mono} + {n_digons}")
    if planes_dims % 2:
        n_mono, planes_dims = n_mono + 1, planes_dims - 1
    planes = planes_dims // 2
    rest = n - n_mono - 2 * n_digons
    if planes == 0:
        if rest != 0:
            raise ValueError(f"no planes left for the remaining {rest} features (n = {n}, n_p = {n_p})")
        return [1] * n_mono + [2] * n_digons
    if rest < 3 * planes:
        raise ValueError(f"n = {n} leaves {rest} features for {planes} planes; each polygon needs >= 3")
    base, extra = divmod(rest, planes)
    return [1] * n_mono + [2] * n_digons + [base + 1] * extra + [base] * (planes - extra)


def random_superposition(n: int, n_p: int, seed: int | None = 0) -> np.ndarray:
    """W_p ``(n_p, n)`` with i.i.d. Gaussian columns scaled to unit norm (uniform on the sphere)."""
    n, n_p = _positive_int("n", n), _positive_int("n_p", n_p)
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_p, n))
    return W / np.linalg.norm(W, axis=0, keepdims=True)


def toy_model_superposition(
    n: int,
    n_p: int,
    *,
    S: float = 0.99,
    steps: int = 3000,
    batch: int = 1024,
    lr: float = 1e-2,
    seed: int = 0,
    normalise: bool = True,
) -> np.ndarray:
    """W_p ``(n_p, n)`` learned by the toy model of Elhage et al. (2022), *Toy Models of Superposition*.

    Trains ``x' = ReLU(WᵀW x + b)`` to reconstruct sparse ``x`` (sparsity ``S``, Uniform[0, 1]
    values, equal importance) with loss ``E||x - x'||²``, Adam, ``steps`` steps of ``batch`` samples,
    on the CPU with one thread (fast and deterministic). ``normalise=True`` rescales the columns to
    unit norm, as the synthetic setup assumes; a feature the toy model did not learn (column norm
    near 0) then keeps the direction it reached, close to a random one. Cached per arguments.
    """
    return _toy_model_cached(int(n), int(n_p), float(S), int(steps), int(batch), float(lr), int(seed), bool(normalise)).copy()


@lru_cache(maxsize=16)
def _toy_model_cached(n, n_p, S, steps, batch, lr, seed, normalise) -> np.ndarray:
    _positive_int("n", n), _positive_int("n_p", n_p), _positive_int("steps", steps), _positive_int("batch", batch)
    check_sparsity(S)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(seed)
        W = torch.nn.Parameter(torch.randn(n_p, n, generator=g) * (2.0 / (n + n_p)) ** 0.5)
        b = torch.nn.Parameter(torch.zeros(n))
        opt = torch.optim.Adam([W, b], lr=lr)
        for _ in range(steps):
            x = sample_sparse(batch, n, S, generator=g)
            out = torch.relu((x @ W.T) @ W + b)
            loss = ((x - out) ** 2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    Wn = W.detach().double().numpy()
    if normalise:
        Wn = Wn / np.maximum(np.linalg.norm(Wn, axis=0, keepdims=True), 1e-12)
    return Wn


def synthetic_superposition(
    kind: SuperpositionKind = DEFAULT_SUPERPOSITION, n: int = 200, n_p: int = 20, seed: int = 0
) -> np.ndarray:
    """The W_p ``(n_p, n)`` of the synthetic WSAE experiment, unit-norm columns.

    * ``"polygons"`` (the book's default): :func:`polygon_layout` blocks (monosemantic dimensions,
      digons, crowded polygons), the geometry of Theorems 1-2 pushed to n = 10 n_p; columns are
      permuted by ``seed``. The only one of the three whose dimensions differ in how many features
      they carry, which is what the WSAE weights act on.
    * ``"random"``: columns uniform on the sphere; every dimension carries about ``n / n_p``
      features, so all weight rules stay close to uniform.
    * ``"toy_model"``: directions learned by Elhage et al.'s toy model (:func:`toy_model_superposition`).

    With n > 2 n_p all three have positive interference (see the note above this function).
    """
    if kind == "random":
        return random_superposition(n, n_p, seed)
    if kind == "polygons":
        from .geometry import superposition_matrix

        W = superposition_matrix(polygon_layout(n, n_p))
        return W[:, np.random.default_rng(seed).permutation(W.shape[1])]
    if kind == "toy_model":
        return toy_model_superposition(n, n_p, seed=seed)
    raise ValueError(f"kind must be one of {SUPERPOSITION_KINDS}, got {kind!r}")


# ---------------------------------------------------------------------------------------------
# Data sources for the trainer: ``sample(batch, generator)`` returns a (batch, n_p) tensor.
# ---------------------------------------------------------------------------------------------


class SparseSource:
    """Sparse ground truth pushed through W_p: ``sample`` gives x_p ``(batch, n_p)``.

    ``W_p``: ``(n_p, n)``; ``S``: sparsity; ``values``: the distribution of active values.
    :meth:`sample_pair` also returns x ``(batch, n)`` for the ground-truth metrics.
    """

    def __init__(self, W_p, S: float, values: ValueDistribution = "uniform", dtype: torch.dtype = torch.float32):
        W = torch.as_tensor(np.asarray(W_p, dtype=np.float64), dtype=dtype)
        if W.ndim != 2 or not torch.isfinite(W).all():
            raise ValueError(f"W_p must be a finite 2-D matrix (n_p, n), got shape {tuple(W.shape)}")
        self.W_p, self.S, self.values = W, check_sparsity(S), values
        if values not in VALUE_DISTRIBUTIONS:
            raise ValueError(f"values must be one of {sorted(VALUE_DISTRIBUTIONS)}, got {values!r}")
        self.n_p, self.n = W.shape

    def sample_pair(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, x_p)`` with shapes ``(batch, n)`` and ``(batch, n_p)``."""
        _check_generator(generator)
        x = sample_sparse(batch, self.n, self.S, generator=generator, values=self.values, dtype=self.W_p.dtype)
        return x, x @ self.W_p.T

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return self.sample_pair(batch, generator)[1]


class TensorSource:
    """Stored activations ``(N, d)`` (e.g. a language model's residual stream): ``sample`` draws
    ``batch`` rows uniformly with replacement, so a run is fixed by its generator's state."""

    def __init__(self, acts: torch.Tensor):
        acts = torch.as_tensor(acts)
        if acts.ndim != 2 or acts.shape[0] == 0 or acts.shape[1] == 0:
            raise ValueError(f"acts must be a non-empty (N, d) matrix, got shape {tuple(acts.shape)}")
        if not acts.is_floating_point():
            raise TypeError(f"acts must hold floating-point activations, got dtype {acts.dtype}")
        check_finite(acts, "acts", " (row = sample, column = dimension)")
        self.acts = acts
        self.n_p = acts.shape[1]

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        batch = _positive_int("batch", batch)
        _check_generator(generator)
        idx = torch.randint(self.acts.shape[0], (batch,), generator=generator)
        return self.acts[idx]
