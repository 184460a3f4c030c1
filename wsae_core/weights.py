"""Weights Γ = diag(γ) of the reweighted SAE (WSAE) and its loss (chapter *WSAE on synthetic data*).

The WSAE loss is ``L_WSAE = E||Γ(x_p - x̂_p)||² = E sum_i γ_i² (x_p - x̂_p)_i²`` (Theorem 5): with
``γ`` smaller on polysemantic dimensions the loss stops over-weighting errors that the ground truth
does not care about. Rules for γ (shape ``(n_p,)``):

* ``uniform``: γ = 1, the plain SAE (α = 0);
* ``variance``: ``γ_i ∝ s_i^α`` with ``s_i`` the variance of input dimension ``i`` (the paper's rule;
  α may be negative). Three estimates of ``s_i`` (:func:`dimension_variance`): ``raw`` (the
  paper's), ``winsorised`` (the per-dimension variances clipped at their
  :data:`WINSOR_QUANTILE` quantile, so that a few massive dimensions cannot take all the weight)
  and ``unit_rms`` (the variance after every sample is scaled to unit RMS);
* ``oracle``: :func:`wsae_core.geometry.frobenius_optimal_gamma` (needs the true W_p; the book's
  formalisation of Theorem 5's principle, minimising ``||W_pᵀΓ²W_p - I||_F``);
* ``learned_oracle``: the same Frobenius-optimal Γ for the dictionary a plain SAE learned (its
  decoder rows standing in for the unknown columns of W_p): an oracle estimated from data.

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
    "VarianceEstimate",
    "VARIANCE_ESTIMATES",
    "WINSOR_QUANTILE",
    "dimension_variance",
    "variance_gamma",
    "oracle_gamma",
    "learned_oracle_gamma",
    "make_gamma",
    "wsae_loss",
]

GammaRule = Literal["uniform", "variance", "oracle", "learned_oracle"]
GAMMA_RULES: tuple[str, ...] = ("uniform", "variance", "oracle", "learned_oracle")
VarianceEstimate = Literal["raw", "winsorised", "unit_rms"]
VARIANCE_ESTIMATES: tuple[str, ...] = ("raw", "winsorised", "unit_rms")
#: Quantile of the per-dimension variances at which the ``winsorised`` estimate clips them: with
#: d = 576 the largest 1 % (6 dimensions) are brought down to the 99th percentile.
WINSOR_QUANTILE = 0.99


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


def _sample(x_p: Any) -> Tensor:
    try:
        X = torch.as_tensor(x_p if isinstance(x_p, Tensor) else np.asarray(x_p, dtype=np.float64)).double()
    except (TypeError, ValueError) as err:
        raise ValueError(f"x_p must be a (batch, n_p) array of numbers, got {type(x_p).__name__}") from err
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"x_p must be a (batch, n_p) sample with batch >= 2, got shape {tuple(X.shape)}")
    check_finite(X, "x_p", " (the variance rule needs finite activations)")
    return X


def dimension_variance(x_p: Any, estimate: VarianceEstimate = "raw", quantile: float = WINSOR_QUANTILE) -> Tensor:
    """Per-dimension variance ``(n_p,)`` (float64) of a sample ``x_p`` ``(batch, n_p)``.

    ``raw``: ``Var(x_p[:, i])``. ``winsorised``: the raw variances clipped from above at their
    ``quantile`` quantile across dimensions. ``unit_rms``: the variance after scaling every sample
    to unit root-mean-square, ``x / sqrt(mean_i x_i²)`` (what a dimension carries relative to the
    token's overall size). Chapter *SAEs and WSAEs on a language model*.
    """
    if estimate not in VARIANCE_ESTIMATES:
        raise ValueError(f"estimate must be one of {VARIANCE_ESTIMATES}, got {estimate!r}")
    if isinstance(quantile, bool) or not isinstance(quantile, Real) or not 0 < quantile <= 1:
        raise ValueError(f"quantile must be a number in (0, 1], got {quantile!r}")
    X = _sample(x_p)
    if estimate == "unit_rms":
        rms = X.pow(2).mean(1, keepdim=True).sqrt()
        if not (rms > 0).all():
            i = int((rms <= 0).nonzero()[0, 0])
            raise ValueError(f"x_p[{i}] is all zeros; the unit_rms estimate cannot scale it")
        X = X / rms
    var = X.var(dim=0)
    if not (var > 0).all():
        i = int((var <= 0).nonzero()[0])
        raise ValueError(f"variance of x_p[:, {i}] is {var[i].item()}; the variance rule needs every dimension to vary")
    if estimate == "winsorised":
        var = var.clamp_max(torch.quantile(var, float(quantile)))
    return var


def variance_gamma(x_p: Any, alpha: float, estimate: VarianceEstimate = "raw",
                   quantile: float = WINSOR_QUANTILE) -> Tensor:
    """The paper's rule ``γ_i ∝ s_i^α``, normalised to ``mean(γ²) = 1``.

    ``x_p``: a sample ``(batch, n_p)`` of the SAE's inputs (not standardised: standardising would
    make every variance 1); ``s_i`` from :func:`dimension_variance` with ``estimate``.
    ``alpha = 0`` gives the uniform rule; ``alpha < 0`` favours the low-variance dimensions.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    return normalise_gamma(dimension_variance(x_p, estimate, quantile).pow(float(alpha)))


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


def learned_oracle_gamma(directions: Any, alive: Any = None, floor: float = 1e-3) -> Tensor:
    """Rule (d): the Frobenius-optimal Γ of a *learned* dictionary, normalised to mean(γ²) = 1.

    ``directions`` ``(n_m, n_p)``: the atoms a plain SAE learned (decoder rows; any norm, each is
    scaled to unit length), standing in for the unknown columns of W_p;
    :func:`wsae_core.geometry.frobenius_optimal_gamma` is applied to their transpose ``(n_p, n_m)``.
    ``alive`` ``(n_m,)`` bool: keep only these atoms (a dead latent's decoder row is its random
    initialisation, not something the data taught). Dimensions whose optimal weight is 0 get
    ``floor * max(γ)``.
    """
    D = torch.as_tensor(directions if isinstance(directions, Tensor) else np.asarray(directions, dtype=np.float64))
    D = D.detach().double().cpu()
    if D.ndim != 2 or D.shape[0] < 1:
        raise ValueError(f"directions must be a (n_m, n_p) matrix of atoms, got shape {tuple(D.shape)}")
    check_finite(D, "directions")
    if alive is not None:
        keep = torch.as_tensor(np.asarray(alive, dtype=bool))
        if keep.shape != (D.shape[0],):
            raise ValueError(f"alive must be a boolean mask of shape ({D.shape[0]},), got {tuple(keep.shape)}")
        if not keep.any():
            raise ValueError("alive keeps no atom: the learned dictionary has no live latent")
        D = D[keep]
    norms = D.norm(dim=1, keepdim=True)
    if not (norms > 0).all():
        raise ValueError("directions has a zero row; every atom needs a direction")
    return oracle_gamma((D / norms).T.numpy(), floor=floor)


def make_gamma(rule: GammaRule, *, n_p: int, alpha: float = 1.0, x_p: Any = None, W_p: Any = None,
               estimate: VarianceEstimate = "raw", directions: Any = None, alive: Any = None) -> Tensor:
    """γ ``(n_p,)`` for a rule name: ``uniform``; ``variance`` (needs ``x_p``; ``alpha``,
    ``estimate``); ``oracle`` (needs the true ``W_p``); ``learned_oracle`` (needs a plain SAE's
    ``directions`` ``(n_m, n_p)``, optionally its ``alive`` mask)."""
    if rule == "uniform":
        return uniform_gamma(n_p)
    if rule == "variance":
        if x_p is None:
            raise ValueError("rule 'variance' needs a sample x_p of shape (batch, n_p)")
        return validate_gamma(variance_gamma(x_p, alpha, estimate), n_p)
    if rule == "oracle":
        if W_p is None:
            raise ValueError("rule 'oracle' needs the true W_p of shape (n_p, n)")
        return validate_gamma(oracle_gamma(W_p), n_p)
    if rule == "learned_oracle":
        if directions is None:
            raise ValueError("rule 'learned_oracle' needs the directions (n_m, n_p) of a trained plain SAE")
        return validate_gamma(learned_oracle_gamma(directions, alive), n_p)
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
