"""What a trained SAE recovered (chapters *Training meets theory*, *WSAE on synthetic data*).

Conventions: ground truth ``x`` ``(batch, n)``; latents ``(batch, n_m)``; W_p ``(n_p, n)``;
the SAE's feature directions ``(n_m, n_p)`` (theory SAE: rows of W_m; practical SAE: decoder rows).
Latents are compared with ground-truth features after :func:`match_latents` pairs each feature
``i`` with one latent ``perm[i]`` (the paper's "~", estimated by a Hungarian assignment).
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
    """``perm[i]``: the latent matched to feature ``i`` ``(n,)``; ``cosines[i]``: their |cosine|;
    ``mean_cosine``: the mean over features (1 = every feature found exactly, up to sign)."""

    perm: np.ndarray
    cosines: np.ndarray
    mean_cosine: float


def match_latents(directions: Any, W_p: Any) -> Matching:
    """Hungarian assignment of latents to ground-truth features maximising total |cosine|.

    ``directions`` ``(n_m, n_p)`` are the SAE's latent directions, ``W_p`` ``(n_p, n)`` the true
    features (columns). With ``n_m >= n`` every feature gets its own latent; with ``n_m < n`` only
    ``n_m`` features are matched and the rest get ``perm = -1`` and cosine 0.
    """
    from scipy.optimize import linear_sum_assignment

    D, W = _np(directions, "directions", 2), _np(W_p, "W_p", 2)
    if D.shape[1] != W.shape[0]:
        raise ValueError(f"directions must be (n_m, n_p = {W.shape[0]}) to match W_p {W.shape}, got {D.shape}")
    Dn = D / np.maximum(np.linalg.norm(D, axis=1, keepdims=True), 1e-12)
    Wn = W / np.maximum(np.linalg.norm(W, axis=0, keepdims=True), 1e-12)
    cos = np.abs(Wn.T @ Dn.T)  # (n, n_m)
    rows, cols = linear_sum_assignment(cos, maximize=True)
    n = W.shape[1]
    perm = np.full(n, -1, dtype=int)
    perm[rows] = cols
    cosines = np.zeros(n)
    cosines[rows] = cos[rows, cols]
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
    """``all``: the paper's L_GT = E||x - x̃||² (sum over the n features, mean over samples).
    ``nonzero``: mean of (x_i - x̃_i)² over the active coordinates (x_i != 0) only, a per-coordinate
    error comparable across S. ``zero``: mean of x̃_i² over the inactive coordinates (false firing)."""

    all: float
    nonzero: float
    zero: float


def ground_truth_error(x: Any, latents: Any, perm: np.ndarray | None = None) -> GroundTruthError:
    """L_GT between ``x`` ``(batch, n)`` and the matched latents ``x̃ = latents[:, perm]``.

    Without ``perm`` the latents must already be aligned with x (``(batch, n)``).
    """
    X = _np(x, "x", 2)
    Xt = _np(latents, "latents", 2) if perm is None else _matched(latents, np.asarray(perm))
    if Xt.shape != X.shape:
        raise ValueError(f"matched latents must have shape {X.shape}, got {Xt.shape}")
    sq = (X - Xt) ** 2
    active = X != 0
    nz = float(sq[active].mean()) if active.any() else 0.0
    z = float(sq[~active].mean()) if (~active).any() else 0.0
    return GroundTruthError(float(sq.sum(1).mean()), nz, z)


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

    Returns a dict: ``mean_cosine`` (matched |cosine| of directions), ``l_gt`` (paper's L_GT),
    ``l_gt_nonzero``, ``l_gt_zero``, ``recon_x_p`` (E||x_p - x̂_p||²), ``fvu``, ``shrinkage`` (mean
    per-feature ratio), ``vanished``, ``l0``, ``dead``, ``dense``. Latents are matched to features
    by direction (:func:`match_latents`).
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
    lat = model.encode(x_p)
    rec = model.decode(lat)
    m = match_latents(model.feature_directions().cpu(), W_p)
    gt = ground_truth_error(x, lat.cpu(), m.perm)
    shrink = feature_shrinkage(x, lat.cpu(), m.perm)
    return {
        "mean_cosine": m.mean_cosine,
        "l_gt": gt.all,
        "l_gt_nonzero": gt.nonzero,
        "l_gt_zero": gt.zero,
        "recon_x_p": reconstruction_error(x_p.cpu(), rec.cpu()),
        "fvu": fvu(x_p.cpu(), rec.cpu()),
        "shrinkage": float(np.nanmean(shrink)),
        "vanished": vanished_fraction(x, lat.cpu(), m.perm),
        "l0": l0(lat.cpu()),
        "dead": dead_fraction(lat.cpu()),
        "dense": dense_fraction(lat.cpu()),
    }
