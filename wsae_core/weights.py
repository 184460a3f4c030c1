"""Weights Γ = diag(γ) of the reweighted SAE (WSAE) and its loss (chapter *WSAE on synthetic data*).

The WSAE loss is ``L_WSAE = E||Γ(x_p - x̂_p)||² = E sum_i γ_i² (x_p - x̂_p)_i²`` (Theorem 5): with
``γ`` smaller on polysemantic dimensions the loss stops over-weighting errors that the ground truth
does not care about. Rules for γ (shape ``(n_p,)``):

* ``uniform``: γ = 1, the plain SAE (α = 0);
* ``variance``: ``γ_i ∝ s_i^α`` with ``s_i`` the variance of input dimension ``i`` (the paper's rule);
* ``oracle``: :func:`wsae_core.geometry.frobenius_optimal_gamma` (needs the true W_p; the book's
  formalisation of Theorem 5's principle, minimising ``||W_pᵀΓ²W_p - I||_F``).

Normalisation (the paper leaves it open): every rule is rescaled so that ``mean(γ²) = 1``. The loss
is then a weighted average of the per-dimension errors with weights averaging 1, so α changes which
dimensions count, not the overall scale of the loss (and the learning rate means the same for
every rule).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .checks import check_finite

__all__ = [
    "GammaRule",
    "GAMMA_RULES",
    "validate_gamma",
    "normalise_gamma",
    "uniform_gamma",
    "variance_gamma",
    "oracle_gamma",
    "make_gamma",
    "wsae_loss",
]

GammaRule = Literal["uniform", "variance", "oracle"]
GAMMA_RULES: tuple[str, ...] = ("uniform", "variance", "oracle")


def validate_gamma(gamma: Any, n_p: int | None = None) -> Tensor:
    """Check γ and return it as a float32 1-D tensor: finite, > 0, of length ``n_p`` if given."""
    try:
        g = torch.as_tensor(np.asarray(gamma, dtype=np.float64) if not isinstance(gamma, Tensor) else gamma)
    except (TypeError, ValueError) as e:
        raise ValueError(f"gamma must be a 1-D array of positive numbers, got {gamma!r}") from e
    if g.ndim != 1:
        raise ValueError(f"gamma must be 1-D (one weight per input dimension), got shape {tuple(g.shape)}")
    if n_p is not None and g.shape[0] != n_p:
        raise ValueError(f"gamma must have length n_p = {n_p}, got length {g.shape[0]}")
    g = g.to(torch.float64)
    bad = ~torch.isfinite(g)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"gamma must be finite, got gamma[{i}] = {g[i].item()}")
    nonpos = g <= 0
    if nonpos.any():
        i = int(nonpos.nonzero()[0])
        raise ValueError(f"gamma must be > 0 in every dimension, got gamma[{i}] = {g[i].item()}")
    return g.to(torch.float32)


def normalise_gamma(gamma: Any) -> Tensor:
    """Rescale γ so that ``mean(γ²) = 1`` (the book's normalisation for every rule)."""
    g = validate_gamma(gamma).double()
    return (g / g.pow(2).mean().sqrt()).float()


def uniform_gamma(n_p: int) -> Tensor:
    """γ = 1: the plain SAE loss."""
    if isinstance(n_p, bool) or not isinstance(n_p, Integral) or n_p <= 0:
        raise ValueError(f"n_p must be a positive integer, got {n_p!r}")
    return torch.ones(int(n_p))


def variance_gamma(x_p: Any, alpha: float) -> Tensor:
    """The paper's rule ``γ_i ∝ Var(x_p[:, i])^α``, normalised to ``mean(γ²) = 1``.

    ``x_p``: a sample ``(batch, n_p)`` of the SAE's inputs (raw, not standardised: standardising
    would make every variance 1). ``alpha = 0`` gives the uniform rule.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    try:
        X = torch.as_tensor(x_p if isinstance(x_p, Tensor) else np.asarray(x_p, dtype=np.float64)).double()
    except (TypeError, ValueError) as err:
        raise ValueError(f"x_p must be a (batch, n_p) array of numbers, got {type(x_p).__name__}") from err
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"x_p must be a (batch, n_p) sample with batch >= 2, got shape {tuple(X.shape)}")
    check_finite(X, "x_p", " (the variance rule needs finite activations)")
    var = X.var(dim=0)
    if not (var > 0).all():
        i = int((var <= 0).nonzero()[0])
        raise ValueError(f"variance of x_p[:, {i}] is {var[i].item()}; the variance rule needs every dimension to vary")
    return normalise_gamma(var.pow(float(alpha)))


def oracle_gamma(W_p: Any, floor: float = 1e-3) -> Tensor:
    """γ from the true W_p (:func:`wsae_core.geometry.frobenius_optimal_gamma`), normalised.

    Dimensions whose optimal weight is 0 get ``floor * max(γ)`` so that Γ stays positive.
    """
    from .geometry import frobenius_optimal_gamma

    g = np.asarray(frobenius_optimal_gamma(W_p), dtype=np.float64)
    if not np.any(g > 0):
        raise ValueError("frobenius_optimal_gamma returned all zeros for this W_p")
    g = np.maximum(g, floor * g.max())
    return normalise_gamma(g)


def make_gamma(rule: GammaRule, *, n_p: int, alpha: float = 1.0, x_p: Any = None, W_p: Any = None) -> Tensor:
    """γ ``(n_p,)`` for a rule name: ``uniform``, ``variance`` (needs ``x_p``, ``alpha``) or ``oracle`` (needs ``W_p``)."""
    if rule == "uniform":
        return uniform_gamma(n_p)
    if rule == "variance":
        if x_p is None:
            raise ValueError("rule 'variance' needs a sample x_p of shape (batch, n_p)")
        return validate_gamma(variance_gamma(x_p, alpha), n_p)
    if rule == "oracle":
        if W_p is None:
            raise ValueError("rule 'oracle' needs the true W_p of shape (n_p, n)")
        return validate_gamma(oracle_gamma(W_p), n_p)
    raise ValueError(f"rule must be one of {GAMMA_RULES}, got {rule!r}")


def wsae_loss(x_p: Tensor, x_hat: Tensor, gamma: Tensor | None = None) -> Tensor:
    """``E||Γ(x_p - x̂_p)||²``: sum over the ``n_p`` dimensions, mean over the batch; γ None = plain SAE.

    ``x_p``, ``x_hat``: ``(batch, n_p)`` tensors or arrays."""
    x_p, x_hat = torch.as_tensor(x_p), torch.as_tensor(x_hat)
    if x_p.ndim != 2 or x_p.shape != x_hat.shape:
        raise ValueError(f"x_p and x_hat must have the same shape (batch, n_p), got {tuple(x_p.shape)} and {tuple(x_hat.shape)}")
    sq = (x_p - x_hat).pow(2)
    if gamma is not None:
        sq = sq * validate_gamma(gamma, x_p.shape[-1]).to(sq.device, sq.dtype).pow(2)
    return sq.sum(-1).mean()
