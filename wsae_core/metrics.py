"""What a trained SAE recovered (chapters *Training meets theory*, *WSAE on synthetic data*).

Conventions: ground truth ``x`` ``(batch, n)``; latents ``(batch, n_m)``; W_p ``(n_p, n)``;
the SAE's feature directions ``(n_m, n_p)``. Latents are compared with ground-truth features after
:func:`match_latents` pairs each feature ``i`` with at most one latent ``perm[i]`` (the paper's
"~": a permutation plus zero padding).

Which direction stands for a latent. A latent is non-negative (ReLU or Top-k), so it can only
*add* its direction to the reconstruction and it only *fires* for inputs on its positive side:

* theory SAE (tied, no bias): the row ``W_m[j]`` is both the encoder and the decoder of latent j;
  ``relu(W_m[j] @ W_p x)`` fires for feature i only when ``W_m[j] @ w_i > 0``;
* practical SAE: the decoder row ``W_dec[j]`` is what latent j writes into ``x_p``; a latent
  whose decoder row points along ``-w_i`` can only reconstruct ``-w_i``.

So a latent can stand for feature i only if its direction points *along* ``w_i`` (positive
cosine). Matching by ``|cosine|`` cannot tell a feature ``w`` from its digon partner ``-w`` (every
latent has the same ``|cos|`` with both); the assignment between them is then an arbitrary
tie-break, and L_GT, shrinkage and vanishing computed on it can be wrong on any machine, for
digons, squares and every even polygon.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from .checks import check_finite

__all__ = [
    "Matching",
    "match_latents",
    "GroundTruthError",
    "ground_truth_error",
    "reconstruction_error",
    "feature_shrinkage",
    "vanished_fraction",
    "fvu",
    "l0",
    "dead_fraction",
    "dense_fraction",
    "evaluate_recovery",
]


def _np(a: Any, name: str, ndim: int) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    try:
        A = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a {ndim}-D array of real numbers, got {type(a).__name__}") from err
    if A.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {A.shape}")
    if A.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {A.shape}")
    check_finite(A, name)
    return A


class Matching(NamedTuple):
    """Result of :func:`match_latents`."""

    perm: np.ndarray
    """``(n,)``: the latent matched to feature i, or -1 when no latent points along ``w_i``."""
    cosines: np.ndarray
    """``(n,)``: cosine between feature i and its latent's direction, in (0, 1]; 0 if unmatched."""
    mean_cosine: float
    """Mean of ``cosines`` over the features (1 = every feature found exactly, with its sign)."""


def match_latents(directions: Any, W_p: Any) -> Matching:
    """Assign latents to ground-truth features by *signed* alignment (Hungarian algorithm).

    ``directions`` ``(n_m, n_p)`` are the SAE's latent directions (theory SAE: rows of ``W_m``;
    practical SAE: decoder rows; any norm), ``W_p`` ``(n_p, n)`` the features (columns). Maximises
    the total ``max(cos(d_j, w_i), 0)``: a latent pointing away from a feature (cosine <= 0) can
    never stand for it, so ``w`` and ``-w`` are told apart by construction. A feature left with no
    latent of positive cosine gets ``perm = -1`` (it is recovered as 0), as do features beyond
    ``n_m``. Near-ties resolve alike on every CPU (:func:`wsae_core.geometry.stable_assignment`).
    """
    from .geometry import stable_assignment

    D, W = _np(directions, "directions", 2), _np(W_p, "W_p", 2)
    if D.shape[1] != W.shape[0]:
        raise ValueError(f"directions must be (n_m, n_p = {W.shape[0]}) to match W_p {W.shape}, got {D.shape}")
    Dn = D / np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-12)
    Wn = W / np.maximum(np.linalg.norm(W, axis=0, keepdims=True), 1e-12)
    score = np.maximum(Wn.T @ Dn.T, 0.0)  # (n, n_m): signed alignment, pointing away counts 0
    rows, cols = stable_assignment(score, maximize=True)
    n = W.shape[1]
    perm = np.full(n, -1, dtype=int)
    cosines = np.zeros(n)
    along = score[rows, cols] > 0
    perm[rows[along]] = cols[along]
    cosines[rows[along]] = score[rows[along], cols[along]]
    return Matching(perm, cosines, float(cosines.mean()))


def _matched(latents: Any, perm: Any) -> np.ndarray:
    L = _np(latents, "latents", 2)
    perm = np.asarray(perm)
    if perm.ndim != 1 or not (np.issubdtype(perm.dtype, np.integer) or perm.size == 0) or np.any(perm < -1):
        raise ValueError(f"perm must be a 1-D integer array of latent indices (-1 = unmatched), got {perm!r}")
    out = np.zeros((L.shape[0], perm.size))
    ok = perm >= 0
    if np.any(perm >= L.shape[1]):
        raise ValueError(f"perm refers to latent {perm.max()} but latents have only {L.shape[1]} columns")
    out[:, ok] = L[:, perm[ok]]
    return out


class GroundTruthError(NamedTuple):
    """Result of :func:`ground_truth_error`."""

    all: float
    """The paper's L_GT = E||pad(x) - P x_m||² for the matching P (sum over features and the
    latents matched to none, mean over samples)."""
    nonzero: float
    """Mean of (x_i - x̃_i)² over the active coordinates (x_i != 0) only: a per-coordinate error
    comparable across S."""
    zero: float
    """Mean of x̃_i² over the inactive coordinates (a feature's latent firing while it is absent)."""
    unmatched: float
    """E[sum of squared activations of the latents matched to no feature] (the zero padding of "~":
    those latents should stay silent). Part of ``all``."""


def ground_truth_error(x: Any, latents: Any, perm: np.ndarray | None = None) -> GroundTruthError:
    """L_GT between ``x`` ``(batch, n)`` and the matched latents ``x̃ = latents[:, perm]``.

    ``latents`` ``(batch, n_m)``; ``perm`` ``(n,)`` from :func:`match_latents` (-1 = no latent).
    Latents not in ``perm`` are compared with 0, as the zero padding of the paper's "~" asks.
    Without ``perm`` the latents must already be aligned with x (``(batch, n)``).
    """
    X = _np(x, "x", 2)
    L = _np(latents, "latents", 2)
    if perm is None:
        Xt, rest = L, np.zeros((L.shape[0], 0))
    else:
        p = np.asarray(perm)
        Xt = _matched(L, p)
        rest = L[:, np.setdiff1d(np.arange(L.shape[1]), p[p >= 0])]
    if Xt.shape != X.shape:
        raise ValueError(f"matched latents must have shape {X.shape}, got {Xt.shape}")
    sq = (X - Xt) ** 2
    active = X != 0
    nz = float(sq[active].mean()) if active.any() else 0.0
    z = float(sq[~active].mean()) if (~active).any() else 0.0
    extra = float((rest**2).sum(1).mean())
    return GroundTruthError(float(sq.sum(1).mean()) + extra, nz, z, extra)


def reconstruction_error(x_p: Any, x_hat: Any) -> float:
    """``E||x_p - x̂_p||²`` (sum over the n_p dimensions, mean over samples)."""
    A, B = _np(x_p, "x_p", 2), _np(x_hat, "x_hat", 2)
    if A.shape != B.shape:
        raise ValueError(f"x_p and x_hat must have the same shape, got {A.shape} and {B.shape}")
    return float(((A - B) ** 2).sum(1).mean())


def feature_shrinkage(x: Any, latents: Any, perm: np.ndarray | None = None) -> np.ndarray:
    """Per-feature shrinkage ratio ``(n,)``: ``sum_b x̃_bi / sum_b x_bi`` over samples where
    ``x_bi != 0``. 1 = recovered at full size, < 1 shrunk, 0 = vanished; NaN if never active."""
    X = _np(x, "x", 2)
    Xt = _np(latents, "latents", 2) if perm is None else _matched(latents, np.asarray(perm))
    if Xt.shape != X.shape:
        raise ValueError(f"matched latents must have shape {X.shape}, got {Xt.shape}")
    active = X != 0
    num = np.where(active, Xt, 0.0).sum(0)
    den = np.where(active, X, 0.0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(active.any(0), num / np.where(den == 0, 1.0, den), np.nan)


def vanished_fraction(x: Any, latents: Any, perm: np.ndarray | None = None, tol: float = 1e-6) -> float:
    """Fraction of active coordinates (``x_bi != 0``) whose matched latent is ``<= tol``: the
    feature was present but the SAE reported nothing (the paper's *vanishing*)."""
    X = _np(x, "x", 2)
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)) or not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    Xt = _np(latents, "latents", 2) if perm is None else _matched(latents, np.asarray(perm))
    if Xt.shape != X.shape:
        raise ValueError(f"matched latents must have shape {X.shape}, got {Xt.shape}")
    active = X != 0
    return float((Xt[active] <= tol).mean()) if active.any() else 0.0


def fvu(x_p: Any, x_hat: Any) -> float:
    """Fraction of variance unexplained ``sum||x_p - x̂_p||² / sum||x_p - mean(x_p)||²``, both ``(batch, n_p)``.

    Undefined for a constant batch (no variance to explain): that raises instead of returning NaN."""
    A, B = _np(x_p, "x_p", 2), _np(x_hat, "x_hat", 2)
    if A.shape != B.shape:
        raise ValueError(f"x_p and x_hat must have the same shape, got {A.shape} and {B.shape}")
    den = ((A - A.mean(0)) ** 2).sum()
    if not den > 0:
        raise ValueError(f"x_p is constant over its {A.shape[0]} samples (zero variance): FVU is undefined; "
                         "use a batch whose rows differ")
    return float(((A - B) ** 2).sum() / den)


def l0(latents: Any) -> float:
    """Mean number of non-zero latents per sample."""
    return float((_np(latents, "latents", 2) != 0).sum(1).mean())


def dead_fraction(latents: Any) -> float:
    """Fraction of latents that never fire on this batch ``(batch, n_m)``."""
    return float(((_np(latents, "latents", 2) != 0).sum(0) == 0).mean())


def dense_fraction(latents: Any, threshold: float = 0.5) -> float:
    """Fraction of latents that fire on more than ``threshold`` of the samples."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return float(((_np(latents, "latents", 2) != 0).mean(0) > threshold).mean())


@torch.no_grad()
def evaluate_recovery(model: torch.nn.Module, x: torch.Tensor, W_p: Any) -> dict[str, float]:
    """All recovery metrics of a trained SAE on a held-out ground-truth batch ``x`` ``(batch, n)``.

    Returns a dict: ``mean_cosine`` (matched signed cosine of directions, unmatched = 0),
    ``matched`` (fraction of features with a latent pointing along them), ``l_gt`` (the paper's
    L_GT, padding included), ``l_gt_nonzero``, ``l_gt_zero``, ``l_gt_unmatched``, ``recon_x_p``
    (E||x_p - x̂_p||²), ``fvu``, ``shrinkage`` (mean per-feature ratio), ``vanished``, ``l0``,
    ``dead``, ``dense``. Latents are matched to features by the direction of
    ``model.feature_directions()`` (:func:`match_latents`).
    """
    Wd, xd = _np(W_p, "W_p", 2), _np(x, "x", 2)
    cfg = getattr(model, "cfg", None)
    if cfg is None or not all(hasattr(model, f) for f in ("encode", "decode", "feature_directions")):
        raise TypeError(f"model must be an SAE built by wsae_core.models.build_sae, got {type(model).__name__}")
    if Wd.shape[0] != cfg.n_p:
        raise ValueError(f"W_p must have n_p = {cfg.n_p} rows (the model's input width), got shape {Wd.shape}")
    if xd.shape[1] != Wd.shape[1]:
        raise ValueError(f"x must have shape (batch, n = {Wd.shape[1]}) to match W_p {Wd.shape}, got {xd.shape}")
    if xd.shape[0] < 2 or not np.ptp(xd @ Wd.T, axis=0).any():
        raise ValueError(f"x must hold at least 2 samples whose x_p = W_p x differ (FVU needs variance), "
                         f"got {xd.shape[0]} sample(s) with constant x_p")
    W = torch.as_tensor(Wd, dtype=torch.float32)
    dev = next(model.parameters()).device
    x = torch.as_tensor(xd, dtype=torch.float32)
    x_p = (x @ W.T).to(dev)
    lat = model.encode(x_p).cpu()
    rec = model.decode(lat.to(dev)).cpu()
    x_p = x_p.cpu()
    m = match_latents(model.feature_directions().cpu(), W_p)
    gt = ground_truth_error(x, lat, m.perm)
    shrink = feature_shrinkage(x, lat, m.perm)
    return {
        "mean_cosine": m.mean_cosine,
        "matched": float((m.perm >= 0).mean()),
        "l_gt": gt.all,
        "l_gt_nonzero": gt.nonzero,
        "l_gt_zero": gt.zero,
        "l_gt_unmatched": gt.unmatched,
        "recon_x_p": reconstruction_error(x_p, rec),
        "fvu": fvu(x_p, rec),
        "shrinkage": float(np.nanmean(shrink)),
        "vanished": vanished_fraction(x, lat, m.perm),
        "l0": l0(lat),
        "dead": dead_fraction(lat),
        "dense": dense_fraction(lat),
    }
