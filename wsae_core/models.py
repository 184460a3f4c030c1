"""Sparse autoencoders: the theory SAE and a practical SAE, with one forward contract.

Chapters *Training meets theory* and *WSAE on synthetic data*.

* :class:`TheorySAE` is the paper's object of study: tied weights, no bias, ReLU,
  ``x_m = relu(W_m x_p)``, reconstruction ``x̂_p = W_mᵀ x_m``, ``W_m`` of shape ``(n_m, n_p)``
  and no sparsity penalty.
* :class:`PracticalSAE` is what is trained on language models: untied encoder/decoder with biases
  and unit-norm decoder rows, ``a = act(W_enc (x_p - b_dec) + b_enc)``, ``x̂_p = W_decᵀ a + b_dec``,
  with ``act`` a ReLU plus an L1 penalty or a Top-k.

Both return a :class:`ForwardOutput`; the training loss is the (W)SAE loss
``E||Γ(x_p - x̂_p)||²`` (:mod:`wsae_core.weights`) plus the sparsity penalty, if any.
Build either from an :class:`SAEConfig` with :func:`build_sae`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Integral, Real
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_finite

__all__ = ["SAEKind", "SAEConfig", "ForwardOutput", "TheorySAE", "PracticalSAE", "build_sae", "dense_latents"]

SAEKind = Literal["theory", "relu", "topk"]

# Top-k backward goes sparse (index_add_ over batch*k rows) only when k < n_m / 16; below that
# ratio the dense scatter + GEMM is faster on these CPUs (n_m = 200 synthetic runs).
_DENSE_TOPK_RATIO = 16


@dataclass
class SAEConfig:
    """Architecture of an SAE (saved as ``cfg.json`` beside the weights)."""

    n_p: int
    """Input dimension (n_p for synthetic data, d_model for a language model)."""

    n_m: int
    """Number of latents."""

    kind: SAEKind = "theory"
    """``"theory"`` (tied, no bias, ReLU), ``"relu"`` (practical, L1 penalty) or ``"topk"`` (practical)."""

    k: int | None = None
    """Active latents per sample for ``"topk"``; must be None for the other kinds."""

    l1_coeff: float = 0.0
    """L1 penalty on the latents for ``"relu"`` (the loss adds ``l1_coeff * E sum_j a_j``)."""

    init_scale: float = 1.0
    """Norm of each encoder row at initialisation (rows are random directions)."""

    seed: int = 0
    """Seed of the random initialisation."""

    def __post_init__(self):
        for name in ("n_p", "n_m"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Integral) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.kind not in ("theory", "relu", "topk"):
            raise ValueError(f"kind must be one of 'theory', 'relu', 'topk', got {self.kind!r}")
        if self.kind == "topk":
            if isinstance(self.k, bool) or not isinstance(self.k, Integral) or not 1 <= self.k <= self.n_m:
                raise ValueError(f"k must be an integer in [1, n_m = {self.n_m}] for kind 'topk', got {self.k!r}")
        elif self.k is not None:
            raise ValueError(f"k is only used by kind 'topk', got k = {self.k!r} for kind {self.kind!r}")
        if isinstance(self.l1_coeff, bool) or not isinstance(self.l1_coeff, Real) or not (
            math.isfinite(self.l1_coeff) and self.l1_coeff >= 0
        ):
            raise ValueError(f"l1_coeff must be a finite number >= 0, got {self.l1_coeff!r}")
        if self.l1_coeff and self.kind != "relu":
            raise ValueError(f"l1_coeff is only used by kind 'relu', got {self.l1_coeff} for kind {self.kind!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if isinstance(self.init_scale, bool) or not (isinstance(self.init_scale, Real) and math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {self.init_scale!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class ForwardOutput(NamedTuple):
    """What every SAE's ``forward(x_p, gamma)`` returns (one contract for all kinds).

    ``latents``: ``(batch, n_m)`` for dense models; for Top-k the ``(batch, k)`` active values, with
    ``latent_indices`` ``(batch, k)`` saying which latents they are (None for dense models; use
    :func:`dense_latents` for a dense view). ``reconstruction``: x̂_p ``(batch, n_p)``.
    ``recon_loss``: ``E||Γ(x_p - x̂_p)||²`` (sum over dimensions, mean over the batch).
    ``sparsity_loss``: the L1 term (0 for theory and Top-k). ``loss = recon_loss + sparsity_loss``.
    ``fvu``: fraction of variance unexplained, ``sum||x_p - x̂_p||² / sum||x_p - mean||²`` (unweighted).
    """

    latents: Tensor
    latent_indices: Tensor | None
    reconstruction: Tensor
    loss: Tensor
    recon_loss: Tensor
    sparsity_loss: Tensor
    fvu: Tensor


def dense_latents(out: ForwardOutput, n_m: int) -> Tensor:
    """The ``(batch, n_m)`` latent matrix from a :class:`ForwardOutput` (scatters Top-k values)."""
    if out.latent_indices is None:
        return out.latents
    dense = out.latents.new_zeros(out.latents.shape[0], n_m)
    return dense.scatter_(1, out.latent_indices, out.latents)


def _weighted_sq_error(x_p: Tensor, x_hat: Tensor, gamma: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(E||Γ(x_p - x̂_p)||², fvu)`` for ``(batch, n_p)`` inputs; Γ = diag(gamma), gamma ``(n_p,)``."""
    err = x_hat - x_p
    sq = err.pow(2)
    total = sq.sum(0)  # (n_p,)
    fvu = total.sum() / (x_p - x_p.mean(0)).pow(2).sum().clamp_min(1e-30)
    weighted = total if gamma is None else total * gamma.pow(2)
    return weighted.sum() / x_p.shape[0], fvu.detach()


def _check_input(model: nn.Module, x_p, gamma=None):
    """``x_p`` as a ``(batch, n_p)`` tensor in the weights' dtype and device, ``gamma`` as ``(n_p,)``.

    NumPy arrays, lists and other real dtypes (float64, ints) are converted, as a user means them;
    a wrong shape, a non-real dtype or a NaN/Inf raises an error naming the value and what was
    expected (before any matrix product).
    """
    n_p = model.cfg.n_p
    w = next(model.parameters())
    if not isinstance(x_p, Tensor):
        try:
            x_p = torch.as_tensor(np.asarray(x_p, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(f"x_p must be a (batch, n_p = {n_p}) tensor or array of numbers, got {type(x_p).__name__}") from err
    if x_p.dtype == torch.bool or x_p.is_complex():
        raise TypeError(f"x_p must hold real numbers, got dtype {x_p.dtype}")
    if x_p.ndim != 2 or x_p.shape[1] != n_p:
        hint = f"; for one sample use x_p[None] (shape (1, {n_p}))" if x_p.ndim == 1 and x_p.shape[0] == n_p else ""
        raise ValueError(f"x_p must have shape (batch, n_p = {n_p}), got {tuple(x_p.shape)}{hint}")
    if x_p.shape[0] == 0:
        raise ValueError(f"x_p must hold at least one sample, got shape {tuple(x_p.shape)}")
    if x_p.dtype != w.dtype or x_p.device != w.device:
        x_p = x_p.to(device=w.device, dtype=w.dtype)
    check_finite(x_p, "x_p")
    if gamma is not None:
        gamma = torch.as_tensor(gamma, device=w.device)
        if gamma.shape != (n_p,):
            raise ValueError(f"gamma must have shape (n_p,) = ({n_p},), got {tuple(gamma.shape)}")
        gamma = gamma.to(w.dtype)
    return x_p, gamma


def _random_rows(n_rows: int, n_cols: int, scale: float, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(int(seed))
    W = torch.randn(n_rows, n_cols, generator=g)
    return W / W.norm(dim=1, keepdim=True) * scale


class TheorySAE(nn.Module):
    """The theory SAE: ``x_m = relu(W_m x_p)``, ``x̂_p = W_mᵀ x_m`` (tied, no bias, no penalty).

    ``W_m``: ``(n_m, n_p)``, rows initialised as random directions of norm ``init_scale``.
    Theorem 1: for polygon/digon W_p and ``n_m >= n`` an optimum is ``W_m* ~ W_pᵀ``.
    """

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.kind != "theory":
            raise ValueError(f"TheorySAE needs cfg.kind == 'theory', got {cfg.kind!r}")
        self.cfg = cfg
        self.W_m = nn.Parameter(_random_rows(cfg.n_m, cfg.n_p, cfg.init_scale, cfg.seed))

    def encode(self, x_p: Tensor) -> Tensor:
        """Dense latents ``relu(x_p W_mᵀ)``: ``(batch, n_p) -> (batch, n_m)``."""
        x_p, _ = _check_input(self, x_p)
        return torch.relu(x_p @ self.W_m.T)

    def decode(self, latents: Tensor) -> Tensor:
        return latents @ self.W_m

    def feature_directions(self) -> Tensor:
        """``(n_m, n_p)`` directions compared with W_p's columns: the rows of ``W_m``."""
        return self.W_m.detach()

    def forward(self, x_p: Tensor, gamma: Tensor | None = None) -> ForwardOutput:
        x_p, gamma = _check_input(self, x_p, gamma)
        lat = torch.relu(x_p @ self.W_m.T)
        rec = self.decode(lat)
        recon, fvu = _weighted_sq_error(x_p, rec, gamma)
        zero = recon.new_zeros(())
        return ForwardOutput(lat, None, rec, recon, recon, zero, fvu)

    @torch.no_grad()
    def after_step(self) -> None:
        """Hook called by the trainer after each optimiser step (nothing for the theory SAE)."""


class _FusedReluSAE(torch.autograd.Function):
    """Forward + hand-written backward of the ReLU+L1 practical SAE with the WSAE loss.

    Same maths as the autograd path of :class:`PracticalSAE`, fewer passes over memory: the input
    centring ``x_p - b_dec`` is folded into the encoder bias (``b_enc - W_enc b_dec``), so its
    gradient is a matrix-vector product instead of a fourth ``(batch, n_m) x (n_m, n_p)`` GEMM,
    and the ReLU mask and the L1 gradient are applied in place. Returns
    ``(latents, reconstruction, recon_loss, sparsity_loss)``.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, w2, l1):
        bias = b_enc - W_enc @ b_dec
        lat = torch.addmm(bias, x, W_enc.T).relu_()
        rec = torch.addmm(b_dec, lat, W_dec)
        err = rec - x
        B = x.shape[0]
        recon = (err.pow(2).sum(0) * w2).sum() / B
        sparse = lat.sum() * (l1 / B) if l1 else recon.new_zeros(())
        ctx.save_for_backward(x, W_enc, W_dec, b_dec, w2, lat, err)
        ctx.l1 = l1
        return lat, rec, recon, sparse

    @staticmethod
    def backward(ctx, g_lat_out, g_rec_out, g_recon, g_sparse):
        x, W_enc, W_dec, b_dec, w2, lat, err = ctx.saved_tensors
        B = x.shape[0]
        # d recon / d rec = 2 w2 err / B; upstream grads of the returned lat/rec are added when used.
        g_rec = err * (w2 * (2.0 * g_recon / B))
        if g_rec_out is not None:
            g_rec = g_rec + g_rec_out
        grad_W_dec = lat.T @ g_rec
        grad_b_dec = g_rec.sum(0)
        g_pre = g_rec @ W_dec.T
        if ctx.l1:
            g_pre.add_(g_sparse * ctx.l1 / B)
        if g_lat_out is not None:
            g_pre.add_(g_lat_out)
        g_pre.masked_fill_(lat <= 0, 0.0)
        gs = g_pre.sum(0)
        grad_W_enc = torch.addmm(torch.outer(gs, b_dec), g_pre.T, x, alpha=1.0, beta=-1.0)
        grad_b_dec = grad_b_dec - gs @ W_enc
        return None, grad_W_enc, gs, grad_W_dec, grad_b_dec, None, None


class _TopKDecode(torch.autograd.Function):
    """Sparse decoder ``x̂ = sum_j a_j W_dec[idx_j]``, ``(batch, k) -> (batch, n_p)``.

    ``F.embedding_bag`` forward; the backward gives the values' gradient by a gather-dot and the
    decoder's gradient by ``index_add_`` over the ``batch * k`` selected rows (no dense
    ``(batch, n_m)`` tensor anywhere).
    """

    @staticmethod
    def forward(ctx, idx, vals, W_dec):
        ctx.save_for_backward(idx, vals, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g):
        idx, vals, W_dec = ctx.saved_tensors
        g_vals = g_W = None
        k = idx.shape[1]
        if k * _DENSE_TOPK_RATIO >= W_dec.shape[0]:
            # Few latents or a large k: dense GEMMs beat gathering (batch, k, n_p) rows.
            if ctx.needs_input_grad[1]:
                g_vals = (g @ W_dec.T).gather(1, idx)
            if ctx.needs_input_grad[2]:
                g_W = vals.new_zeros(vals.shape[0], W_dec.shape[0]).scatter_(1, idx, vals).T @ g
            return None, g_vals, g_W
        if ctx.needs_input_grad[1]:
            g_vals = torch.bmm(W_dec[idx], g.unsqueeze(2)).squeeze(2)
        if ctx.needs_input_grad[2]:
            contrib = (vals.reshape(-1, 1) * g.repeat_interleave(k, dim=0))
            g_W = torch.zeros_like(W_dec).index_add_(0, idx.reshape(-1), contrib)
        return None, g_vals, g_W


class _TopKEncode(torch.autograd.Function):
    """Top-k encoder: dense pre-activations without autograd, then gradients only through the k
    selected latents: ``grad W_enc[idx] += g ⊗ x`` via ``index_add_`` (``batch * k`` rows),
    ``grad b_enc = bincount``. Returns ``(values (batch, k), indices (batch, k))``; values are ReLU'd.
    """

    @staticmethod
    def forward(ctx, x, W_enc, bias, k):
        pre = torch.addmm(bias, x, W_enc.T)
        vals, idx = pre.topk(k, dim=1, sorted=False)
        vals = vals.relu_()
        ctx.save_for_backward(x, idx, vals)
        ctx.n_m = W_enc.shape[0]
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx):
        x, idx, vals = ctx.saved_tensors
        g = g_vals.masked_fill(vals <= 0, 0.0)
        k = idx.shape[1]
        if k * _DENSE_TOPK_RATIO >= ctx.n_m:
            # Few latents or a large k: a dense scatter + GEMM is faster than index_add_.
            g_pre = x.new_zeros(x.shape[0], ctx.n_m).scatter_(1, idx, g)
            return None, g_pre.T @ x, g_pre.sum(0), None
        flat = idx.reshape(-1)
        contrib = g.reshape(-1, 1) * x.repeat_interleave(k, dim=0)
        g_W = torch.zeros(ctx.n_m, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, flat, contrib)
        g_b = torch.zeros(ctx.n_m, dtype=x.dtype, device=x.device).index_add_(0, flat, g.reshape(-1))
        return None, g_W, g_b, None


class PracticalSAE(nn.Module):
    """Practical SAE: ``a = act(W_enc (x_p - b_dec) + b_enc)``, ``x̂_p = W_decᵀ a + b_dec``.

    Shapes: ``W_enc``, ``W_dec`` ``(n_m, n_p)``; ``b_enc`` ``(n_m,)``; ``b_dec`` ``(n_p,)``. Decoder
    rows have unit norm (restored after every optimiser step, and the gradient component along each
    row is removed before it, as in sparsify). ``act`` is a ReLU with loss term
    ``l1_coeff * E sum_j a_j`` (``kind="relu"``) or a Top-k with ReLU on the kept values
    (``kind="topk"``). The Top-k path never builds a dense ``(batch, n_m)`` gradient; the ReLU path
    uses a fused forward/backward (:class:`_FusedReluSAE`) on float32 without autocast.
    Initialisation: ``W_enc`` random rows of norm ``init_scale``, ``W_dec = W_enc`` normalised,
    biases 0.
    """

    def __init__(self, cfg: SAEConfig, fused: bool = True):
        super().__init__()
        if cfg.kind not in ("relu", "topk"):
            raise ValueError(f"PracticalSAE needs cfg.kind 'relu' or 'topk', got {cfg.kind!r}")
        self.cfg, self.fused = cfg, fused
        W = _random_rows(cfg.n_m, cfg.n_p, cfg.init_scale, cfg.seed)
        self.W_enc = nn.Parameter(W.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_m))
        self.W_dec = nn.Parameter(W / W.norm(dim=1, keepdim=True))
        self.b_dec = nn.Parameter(torch.zeros(cfg.n_p))

    def _bias(self) -> Tensor:
        # W_enc (x - b_dec) + b_enc == W_enc x + (b_enc - W_enc b_dec)
        return self.b_enc - self.W_enc @ self.b_dec

    def encode(self, x_p: Tensor) -> Tensor:
        """Dense latents ``(batch, n_m)`` (for metrics; Top-k values scattered into zeros)."""
        x_p, _ = _check_input(self, x_p)
        pre = torch.addmm(self._bias(), x_p, self.W_enc.T)
        if self.cfg.kind == "relu":
            return pre.relu()
        vals, idx = pre.topk(self.cfg.k, dim=1, sorted=False)
        return torch.zeros_like(pre).scatter_(1, idx, vals.relu())

    def decode(self, latents: Tensor) -> Tensor:
        return latents @ self.W_dec + self.b_dec

    def feature_directions(self) -> Tensor:
        """``(n_m, n_p)`` directions compared with W_p's columns: the decoder rows."""
        return self.W_dec.detach()

    def forward(self, x_p: Tensor, gamma: Tensor | None = None) -> ForwardOutput:
        x_p, gamma = _check_input(self, x_p, gamma)
        cfg = self.cfg
        if cfg.kind == "relu":
            use_fused = (self.fused and x_p.dtype == torch.float32 and self.W_enc.dtype == torch.float32
                         and not torch.is_autocast_enabled(x_p.device.type))
            if use_fused:
                w2 = torch.ones_like(self.b_dec) if gamma is None else gamma.pow(2).to(self.b_dec.dtype)
                lat, rec, recon, sparse = _FusedReluSAE.apply(
                    x_p, self.W_enc, self.b_enc, self.W_dec, self.b_dec, w2, float(cfg.l1_coeff))
                fvu = ((rec.detach() - x_p).pow(2).sum() / (x_p - x_p.mean(0)).pow(2).sum().clamp_min(1e-30))
            else:
                lat = torch.relu(F.linear(x_p, self.W_enc, self._bias()))
                rec = F.linear(lat, self.W_dec.T, self.b_dec)
                recon, fvu = _weighted_sq_error(x_p, rec, gamma)
                sparse = lat.sum() * (cfg.l1_coeff / x_p.shape[0]) if cfg.l1_coeff else recon.new_zeros(())
            return ForwardOutput(lat, None, rec, recon + sparse, recon, sparse, fvu)
        if torch.is_autocast_enabled(x_p.device.type):
            # Mixed precision (bf16 on CUDA): plain autograd, the GEMMs in low precision.
            pre = F.linear(x_p, self.W_enc, self._bias())
            vals, idx = pre.topk(cfg.k, dim=1, sorted=False)
            vals = vals.relu()
            rec = F.linear(torch.zeros_like(pre).scatter(1, idx, vals), self.W_dec.T, self.b_dec)
        else:
            vals, idx = _TopKEncode.apply(x_p, self.W_enc, self._bias(), cfg.k)
            rec = _TopKDecode.apply(idx, vals, self.W_dec) + self.b_dec
        recon, fvu = _weighted_sq_error(x_p, rec, gamma)
        return ForwardOutput(vals, idx, rec, recon, recon, recon.new_zeros(()), fvu)

    @torch.no_grad()
    def before_step(self) -> None:
        """Remove the gradient component parallel to each decoder row (keeps steps on the sphere)."""
        g = self.W_dec.grad
        if g is not None:
            g.sub_((g * self.W_dec).sum(1, keepdim=True) * self.W_dec)

    @torch.no_grad()
    def after_step(self) -> None:
        """Restore unit-norm decoder rows after the optimiser step."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


def build_sae(cfg: SAEConfig) -> TheorySAE | PracticalSAE:
    """The model a config describes: :class:`TheorySAE` for ``"theory"``, else :class:`PracticalSAE`."""
    if not isinstance(cfg, SAEConfig):
        raise TypeError(f"cfg must be an SAEConfig, got {type(cfg).__name__}")
    return TheorySAE(cfg) if cfg.kind == "theory" else PracticalSAE(cfg)
