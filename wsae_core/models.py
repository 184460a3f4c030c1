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

import functools
import math
import time
import warnings
from dataclasses import asdict, dataclass
from numbers import Integral, Real
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_finite

__all__ = ["SAEKind", "SAEConfig", "ForwardOutput", "TheorySAE", "PracticalSAE", "build_sae", "dense_latents",
           "PrecisionChoice", "choose_precision", "compute_dtype", "cpu_capabilities", "bf16_matmul_speedup"]

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
    :func:`dense_latents` for a dense view). A row with fewer than k positive pre-activations has
    value-0 slots, whose indices name latents with pre-activations ``<= 0``, not necessarily the
    largest of those (the fused CPU selection is exact on positive values only).
    ``reconstruction``: x̂_p ``(batch, n_p)``.
    ``recon_loss``: ``E||Γ(x_p - x̂_p)||²`` (sum over dimensions, mean over the batch).
    ``sparsity_loss``: the L1 term (0 for theory and Top-k). ``loss = recon_loss + sparsity_loss``.
    ``fvu``: fraction of variance unexplained, ``sum||x_p - x̂_p||² / sum||x_p - mean||²`` (unweighted).
    ``auxk_loss``: Top-k only, the AuxK loss on dead latents (0 when none is dead; not in ``loss``:
    the trainer adds it with its coefficient); None for the other kinds.
    """

    latents: Tensor
    latent_indices: Tensor | None
    reconstruction: Tensor
    loss: Tensor
    recon_loss: Tensor
    sparsity_loss: Tensor
    fvu: Tensor
    auxk_loss: Tensor | None = None


def dense_latents(out: ForwardOutput, n_m: int) -> Tensor:
    """The ``(batch, n_m)`` latent matrix from a :class:`ForwardOutput` (scatters Top-k values)."""
    if out.latent_indices is None:
        return out.latents
    dense = out.latents.new_zeros(out.latents.shape[0], n_m)
    return dense.scatter_(1, out.latent_indices, out.latents)


def _weighted_sq_error(x_p: Tensor, x_hat: Tensor, gamma: Tensor | None) -> Tensor:
    """``E||Γ(x_p - x̂_p)||²`` (fp32) for ``(batch, n_p)`` inputs; Γ = diag(gamma), gamma ``(n_p,)``."""
    total = (x_hat.float() - x_p.float()).pow(2).sum(0)  # (n_p,)
    weighted = total if gamma is None else total * gamma.pow(2)
    return weighted.sum() / x_p.shape[0]


def _fvu(x_p: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained ``sum||x_p - x̂_p||² / sum||x_p - mean||²`` (unweighted, no gradient)."""
    x_p = x_p.detach().float()
    return (x_hat.detach().float() - x_p).pow(2).sum() / (x_p - x_p.mean(0)).pow(2).sum().clamp_min(1e-30)


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
    # bf16 input to a practical SAE stays bf16: it selects the bf16 kernels (see compute_dtype)
    keep = x_p.dtype == torch.bfloat16 and model.cfg.kind != "theory"
    if x_p.device != w.device or (x_p.dtype != w.dtype and not keep):
        x_p = x_p.to(device=w.device, dtype=x_p.dtype if keep else w.dtype)
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
        recon = _weighted_sq_error(x_p, rec, gamma)
        return ForwardOutput(lat, None, rec, recon, recon, recon.new_zeros(()), _fvu(x_p, rec))

    @torch.no_grad()
    def after_step(self) -> None:
        """Hook called by the trainer after each optimiser step (nothing for the theory SAE)."""


# ----------------------------------------------------------------------------- precision


class PrecisionChoice(NamedTuple):
    """What :func:`choose_precision` decided: the compute dtype of the matrix products and why."""

    dtype: torch.dtype
    """``torch.bfloat16`` (bf16 autocast: fp32 master weights and optimiser state) or ``torch.float32``."""
    reason: str
    """One sentence for the log."""


def cpu_capabilities() -> dict:
    """The CPU's instruction-set flags as torch sees them (``amx_bf16``, ``avx512_bf16``, ``cpu_name``...)."""
    return torch.cpu.get_capabilities()


@functools.lru_cache(maxsize=1)
def bf16_matmul_speedup(n: int = 1024, reps: int = 3) -> float:
    """Measured speed of a bf16 over an fp32 ``(n, n) x (n, n)`` CPU matmul (best of ``reps``; > 1 = bf16 faster).

    Taken once per process: a quarter of a second where bf16 runs on matrix units, a few seconds where
    it is emulated (it is only asked where the CPU reports AVX-512-BF16 without AMX).
    """
    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


# bf16 must beat fp32 by this factor to be worth its rounding (AMX reaches about 6x, see TOOLCHAIN).
_BF16_MIN_SPEEDUP = 1.2


def choose_precision(precision: str, device: str | torch.device = "cpu") -> PrecisionChoice:
    """The compute precision for ``precision`` in ``"auto"``, ``"fp32"``, ``"bf16"`` on ``device``.

    ``"auto"``: bf16 on CUDA devices that support it; on a CPU, bf16 where it has matrix units for
    it (AMX-BF16), or AVX-512-BF16 and a quick matmul measurement (:func:`bf16_matmul_speedup`)
    finds bf16 at least 1.2x faster; fp32 otherwise (AVX2-only CPUs emulate bf16 about 40x slower
    than fp32). ``"fp32"`` / ``"bf16"`` force the choice.
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    device = torch.device(device)
    if precision == "fp32":
        return PrecisionChoice(torch.float32, "fp32 requested")
    if precision == "bf16":
        return PrecisionChoice(torch.bfloat16, "bf16 requested")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return PrecisionChoice(torch.bfloat16, f"CUDA device {torch.cuda.get_device_name(device)} supports bf16")
        return PrecisionChoice(torch.float32, "CUDA device without bf16 support")
    if device.type != "cpu":
        return PrecisionChoice(torch.float32, f"no bf16 rule for device type {device.type!r}")
    caps = cpu_capabilities()
    name = caps.get("cpu_name", "this CPU")
    if caps.get("amx_bf16"):
        return PrecisionChoice(torch.bfloat16, f"{name} has AMX-BF16 matrix units")
    if caps.get("avx512_bf16"):
        s = bf16_matmul_speedup()
        if s >= _BF16_MIN_SPEEDUP:
            return PrecisionChoice(torch.bfloat16, f"{name} has AVX-512-BF16; bf16 matmul measured {s:.2f}x fp32")
        return PrecisionChoice(torch.float32, f"{name} has AVX-512-BF16 but bf16 matmul measured only {s:.2f}x fp32")
    return PrecisionChoice(torch.float32, f"{name} has no bf16 matrix instructions (no AMX-BF16 or AVX-512-BF16): "
                                          "bf16 would be emulated and slower than fp32")


def compute_dtype(x: Tensor) -> torch.dtype:
    """The matmul dtype of an SAE forward on ``x``: bf16 under bf16 autocast or for bf16 input, else fp32."""
    dev = x.device.type
    if x.dtype == torch.bfloat16 or (torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16):
        return torch.bfloat16
    return torch.float32


# ----------------------------------------------------------------------------- kernels


class _FusedReluSAE(torch.autograd.Function):
    """Forward + hand-written backward of the ReLU+L1 practical SAE with the WSAE loss.

    Same maths as the autograd path of :class:`PracticalSAE`, fewer passes over memory: the input
    centring ``x_p - b_dec`` is folded into the encoder bias (``b_enc - W_enc b_dec``), so its
    gradient is a matrix-vector product instead of a fourth ``(batch, n_m) x (n_m, n_p)`` GEMM,
    and the ReLU mask and the L1 gradient are applied in place. The four GEMMs run in ``dtype``
    (fp32, or bf16 with fp32 losses and fp32 gradients for the fp32 master weights). Returns
    ``(latents, reconstruction, recon_loss, sparsity_loss)``; latents are in ``dtype``.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, w2, l1, dtype):
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            Wd = W_dec.to(dtype)
            lat = _encode(x, W_enc, b_enc - W_enc @ b_dec, dtype).relu_()
            rec = torch.addmm(b_dec.to(dtype), lat, Wd).float()
            err = rec - x
            B = x.shape[0]
            recon = (err.pow(2).sum(0) * w2).sum() / B
            # Column sums in the latents' dtype (accumulated in fp32 inside the reduction; a bf16
            # tensor summed with dtype=float32 would first be copied whole to fp32), then in fp32.
            sparse = lat.sum(0).float().sum() * (l1 / B) if l1 else recon.new_zeros(())
        ctx.save_for_backward(x, W_enc, Wd, b_dec, w2, lat, err)
        ctx.l1, ctx.dtype = l1, dtype
        # Outputs the loss does not use (the latents, usually) get None, not a (batch, n_m) tensor of
        # zeros that the backward would have to add.
        ctx.set_materialize_grads(False)
        return lat, rec, recon, sparse

    @staticmethod
    def backward(ctx, g_lat_out, g_rec_out, g_recon, g_sparse):
        x, W_enc, Wd, b_dec, w2, lat, err = ctx.saved_tensors
        dtype = ctx.dtype
        B = x.shape[0]
        # d recon / d rec = 2 w2 err / B; upstream grads of the returned lat/rec are added when used.
        g_err = None if g_recon is None else err * (w2 * (2.0 * g_recon / B))
        g_rec = g_err if g_rec_out is None else g_rec_out if g_err is None else g_err + g_rec_out
        if g_rec is None:
            g_rec = torch.zeros_like(err)
        g_rec_c = g_rec.to(dtype)
        grad_W_dec = (lat.T @ g_rec_c).float()
        grad_b_dec = g_rec.sum(0)
        if ctx.l1 and g_sparse is not None:  # the L1 gradient, a constant per entry, added by the GEMM
            shift = (g_sparse * (ctx.l1 / B)).to(dtype).expand(lat.shape[1])
            g_pre = torch.addmm(shift, g_rec_c, Wd.T)
        else:
            g_pre = g_rec_c @ Wd.T
        if g_lat_out is not None:
            g_pre.add_(g_lat_out.to(dtype))
        # ReLU's backward in place and in one pass (zero where the latent is 0), not a mask and a fill
        torch.ops.aten.threshold_backward.grad_input(g_pre, lat, 0, grad_input=g_pre)
        gs = g_pre.sum(0).float()  # as in the forward: no fp32 copy of the (batch, n_m) tensor
        if dtype == torch.float32:
            grad_W_enc = torch.addmm(torch.outer(gs, b_dec), g_pre.T, x, alpha=1.0, beta=-1.0)
        else:
            grad_W_enc = (g_pre.T @ x.to(dtype)).float().sub_(torch.outer(gs, b_dec))
        grad_b_dec = grad_b_dec - gs @ W_enc
        grad_x = None
        if ctx.needs_input_grad[0]:  # x enters through the pre-activations and, in recon only, through err
            grad_x = g_pre.float() @ W_enc
            if g_err is not None:
                grad_x = grad_x - g_err
        return grad_x, grad_W_enc, gs, grad_W_dec, grad_b_dec, None, None, None


def _auxk_factor(x: Tensor, e: Tensor, w2: Tensor, dead_scale: float, sync: bool = False) -> float:
    """The constant ``c`` of the AuxK loss ``c * E||Γ(ê - e)||²`` (Gao et al. 2024, Appendix A.2).

    Gao et al. divide the auxiliary error by the variance of its target, the residual ``e``, so the
    dead latents' task keeps its weight as the reconstruction improves (sparsify divides by the
    data's variance instead). Here the ratio is put in the units of ``recon_loss`` (times the
    data's variance per sample): with coefficient α the objective is, up to that constant,
    ``FVU + α * dead_scale * NMSE_aux``, as in both. ``dead_scale = min(n_dead / k_aux, 1)``
    (sparsify) lowers the weight while few latents are dead. Variances are Γ-weighted.

    ``sync``: ``x`` and ``e`` are this rank's slice of a global batch split over the default process
    group (data-parallel training): both variances are then those of the global batch, so every
    rank uses the constant that one process with the whole batch uses.
    """
    if sync:  # global means first, then squares about them: sum(x²) - N·mean² would cancel catastrophically
        n_p = x.shape[1]
        sums = torch.cat([x.sum(0), e.sum(0), x.new_full((1,), x.shape[0])])
        dist.all_reduce(sums)
        mean_x, mean_e = sums[:n_p] / sums[-1], sums[n_p:-1] / sums[-1]
    else:
        mean_x, mean_e = x.mean(0), e.mean(0)
    sq = torch.stack([((x - mean_x).pow(2).sum(0) * w2).sum(), ((e - mean_e).pow(2).sum(0) * w2).sum()])
    if sync:
        dist.all_reduce(sq)
    return dead_scale * float(sq[0] / sq[1].clamp_min(1e-30))


@functools.lru_cache(maxsize=1)
def _fold_depth() -> int:
    """Multiple that :func:`_encode` pads the bf16 encoder's inner dimension to: 32 on CPUs with
    AMX-BF16 (a tile's depth), else 2. Without AMX a padding to 32 only adds work: at 768 -> 24,576,
    batch 4096, an inner dimension of 770 runs 3.8 % faster than 800 (AMD EPYC family 26, 16
    interleaved rounds)."""
    return 32 if cpu_capabilities().get("amx_bf16") else 2


def _encode(x: Tensor, W: Tensor, bias: Tensor, dtype: torch.dtype) -> Tensor:
    """``x Wᵀ + bias`` ``(batch, n_m)`` computed in ``dtype`` (``x`` ``(batch, d)``, ``W`` ``(n_m, d)``).

    bf16 on the CPU: the bias is folded into the product, ``[x, 1, 0...] [W, bias, 0...]ᵀ`` with the
    inner dimension padded to a multiple of :func:`_fold_depth` (32, the depth of an AMX tile, on
    CPUs with AMX; else 2, one bf16 pair of the AVX-512-BF16 dot product), so that no copy of the
    bias is broadcast into the ``(batch, n_m)`` output before the GEMM (a third of the GEMM's time
    at 768 -> 24,576 on the Xeon type); the bf16 copy of ``W`` is made either way. Else ``addmm``.
    """
    if dtype != torch.bfloat16 or x.device.type != "cpu":
        return torch.addmm(bias.to(dtype), x.to(dtype), W.to(dtype).T)
    d = x.shape[1]
    depth = _fold_depth()
    K = -(-(d + 1) // depth) * depth
    Wa = W.new_empty((W.shape[0], K), dtype=dtype)
    Wa[:, :d].copy_(W)
    Wa[:, d].copy_(bias)
    Wa[:, d + 1:].zero_()
    xa = x.new_zeros((x.shape[0], K), dtype=dtype)
    xa[:, :d].copy_(x)
    xa[:, d] = 1.0
    return xa @ Wa.T


#: Decoder rows per block in :meth:`PracticalSAE.before_step` (3 MB of fp32 rows at d = 768).
_ROW_BLOCK = 1024

#: Slices of :func:`_topk_rows`: each row of pre-activations is viewed as this many contiguous slices.
_TOPK_SLICES = 8


#: Signed integers of each float width: for floats >= 0 their bit patterns order as the values do.
_SAME_WIDTH_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
                   torch.float64: torch.int64}


def _topk_rows(pre: Tensor, k: int, relu: bool = False) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``pre`` ``(batch, n_m)`` (unsorted), as ``torch.topk``.

    On the CPU ``torch.topk`` over tens of thousands of latents costs more than the encoder GEMM
    does in bf16; here it runs on a small candidate set instead, with the same result. Each row is
    viewed as :data:`_TOPK_SLICES` slices of ``C = n_m / slices`` latents; column ``j`` holds latents
    ``j, j + C, j + 2C, ...``, and the column maxima are an elementwise max of contiguous slices
    (one vectorised pass). The k columns with the largest maxima hold the row's k largest entries
    (an entry of any other column is below k column maxima, k distinct entries), so the top-k of
    their ``slices * k`` entries is the row's top-k. The k columns are found the same way, from
    the column maxima's own slices, while there are enough of them (at 24,576 latents: 3,072
    maxima, then 384; 15 % faster than ``torch.topk`` on the 3,072). Among equal values the
    positions chosen may differ from ``torch.topk``'s. Elsewhere (CUDA, or too few latents for the
    candidates to be fewer) plain ``torch.topk``.

    ``relu=True`` is for a caller that keeps only the positive part of what is selected (the
    Top-k SAE's ReLU): the selection is then exact for the entries ``> 0`` only. Each row's
    ``min(k, P)`` largest positive entries are selected (``P`` of them in the row), as by
    ``torch.topk``, and any other slots hold some of the row's entries ``<= 0``, not necessarily its
    largest. On the candidate path the comparisons then run on the floats' bit patterns read as
    signed integers of the same width, which order as the values do for every float ``>= 0``
    (``+inf`` and positive NaN included) and put every negative float below them: the maxima, the
    top-ks and the gathers run on integers (batch 4096, 24,576 latents, AMD EPYC family 26: bf16
    50 -> 33 ms, fp32 44 -> 39 ms), and the selected values are read back from the same bits. A
    NaN with its sign bit set (the one x86 arithmetic makes) counts as negative here, where
    ``torch.topk`` would select it; the trainer stops on a non-finite batch, loss or gradient
    before the weights can hold one.
    """
    B, n_m = pre.shape
    C = n_m // _TOPK_SLICES
    if pre.device.type != "cpu" or n_m % _TOPK_SLICES or C < 2 * k:
        return pre.topk(k, dim=1, sorted=False)
    if relu and pre.dtype in _SAME_WIDTH_INT:
        vals, idx = _topk_rows(pre.view(_SAME_WIDTH_INT[pre.dtype]), k)
        return vals.view(pre.dtype), idx
    view = pre.view(B, _TOPK_SLICES, C)
    cols = _topk_rows(view.amax(1), k)[1]  # (batch, k): columns with the largest maxima (the same way)
    cand = view.gather(2, cols.unsqueeze(1).expand(B, _TOPK_SLICES, k)).reshape(B, _TOPK_SLICES * k)
    vals, pos = cand.topk(k, dim=1, sorted=False)
    idx = torch.div(pos, k, rounding_mode="floor") * C + cols.gather(1, pos % k)
    return vals, idx


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    # The invariants hold by construction; without the flag torch warns on every call, and it warns
    # once that CSR support is "beta" (stderr noise in notebooks).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _stable_argsort(keys: Tensor, bound: int | None = None) -> Tensor:
    """Stable argsort of a 1-D tensor of nonnegative integers (below ``bound`` where given).

    On the CPU numpy's single-threaded sort (torch's parallel sort of ~10^5 keys costs 20-30x more
    on 2 busy cores, measured); keys below 2^16 are sorted as ``uint16``, for which numpy's stable
    sort is a radix sort: 1 ms instead of 11 ms for 131,072 keys (one Top-k step's pairs at batch
    4096, k = 32). The permutation is the same either way.
    """
    if keys.device.type == "cpu":
        a = keys.numpy()
        if bound is not None and bound <= 1 << 16:
            a = a.astype(np.uint16)
        return torch.from_numpy(np.argsort(a, kind="stable"))
    return keys.argsort(stable=True)


class _LatentMajor:
    """The (sample, latent) pairs of one or more Top-k selections grouped by latent, computed once and
    shared by every product ``Sᵀ D`` a backward needs (encoder and decoder gradients, main and AuxK
    terms). ``Sᵀ D`` is then an ``embedding_bag`` with one bag per latent: rows of the dense
    operand gathered and summed with the pairs' values as weights (no ``(pairs, d)`` tensor).

    ``idx_list``: index tensors ``(batch, kk_t)``; term ``t``'s pairs point at rows
    ``t * batch + b`` of the stacked dense operand.
    """

    def __init__(self, idx_list: list[Tensor], n_m: int):
        B = idx_list[0].shape[0]
        dev = idx_list[0].device
        flat = torch.cat([i.reshape(-1) for i in idx_list]) if len(idx_list) > 1 else idx_list[0].reshape(-1)
        rows = torch.cat([torch.arange(B, device=dev).repeat_interleave(i.shape[1]) + t * B
                          for t, i in enumerate(idx_list)])
        self.flat, self.n_m = flat, n_m
        self.perm = _stable_argsort(flat, n_m)  # stable: a fixed summation order, bitwise reproducible
        self.rows = rows[self.perm]
        self.sizes = [i.numel() for i in idx_list]
        counts = torch.bincount(flat, minlength=n_m)
        self.crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])  # latent j: pairs crow[j]:crow[j + 1]
        self.offsets = self.crow[:-1]  # start of each latent's bag

    def rows_dot(self, W: Tensor, dense: Tensor) -> list[Tensor]:
        """``out_t[b, j] = W[idx_t[b, j]] · dense[t * batch + b]``: ``(batch, kk_t)`` per term.

        A sampled dense-dense product over the (latent, row) pairs in latent order: each row of
        ``W`` ``(n_m, d)`` is read once for all the samples that selected it, and the rows of
        ``dense`` are what is gathered (a ``(batch, d)`` operand that stays in cache), with no
        ``(pairs, d)`` tensor in memory. 2.5x faster than the same dots in sample order at
        768 -> 24,576, batch 4096, k = 32 (each dot is the same sum, so the values are the same).
        """
        pattern = _csr(self.crow, self.rows, dense.new_zeros(self.rows.numel()), (self.n_m, dense.shape[0]))
        sorted_dots = torch.sparse.sampled_addmm(pattern, W, dense.T, beta=0.0).values()
        out = torch.empty_like(sorted_dots)
        out[self.perm] = sorted_dots
        B = dense.shape[0] // len(self.sizes)
        return [o.view(B, -1) for o in out.split(self.sizes)]

    def _values(self, values: list[Tensor]) -> Tensor:
        return torch.cat([x.reshape(-1) for x in values]) if len(values) > 1 else values[0].reshape(-1)

    def matmul(self, values: list[Tensor], dense: Tensor) -> Tensor:
        """``Sᵀ D``: ``sum_{b, t} values_t[b, j] dense[t * batch + b]`` into row ``idx_t[b, j]``: ``(n_m, d)``."""
        return F.embedding_bag(self.rows, dense, self.offsets, per_sample_weights=self._values(values)[self.perm],
                               mode="sum")

    def bincount(self, values: list[Tensor]) -> Tensor:
        """``sum_{b, t} values_t[b, j]`` per latent: ``(n_m,)``."""
        return torch.bincount(self.flat, weights=self._values(values), minlength=self.n_m)


class _FusedTopKSAE(torch.autograd.Function):
    """One Top-k SAE step with the WSAE loss and the AuxK loss, forward and hand-written backward.

    Forward: ``pre = (x - b_dec) W_encᵀ + b_enc`` is the only dense ``(batch, n_m)`` tensor (one GEMM
    in ``dtype``); the k largest per row are kept and ReLU'd; ``x̂ = sum_j a_j W_dec[idx_j] + b_dec``
    by ``embedding_bag`` (fp32). With dead latents ``dead`` (ids), AuxK (:func:`_auxk_factor`): the
    ``k_aux`` largest pre-activations among them, ReLU'd, decode ``ê = sum_j a'_j W_dec[idx'_j]``
    (no bias) and ``aux = c * E||Γ(ê - e)||²`` with the residual ``e = x - x̂`` held constant
    (``c`` from the global batch when ``sync``, see :attr:`PracticalSAE.sync_batch_stats`).

    Backward: every product involves only the ``batch * (k + k_aux)`` selected pairs: value
    gradients by sampled dot products and weight gradients by one sparse-dense product each, all
    over the pairs sorted by latent once (:class:`_LatentMajor`), ``b_enc`` by a weighted bincount and
    ``b_dec`` by a matrix-vector product. Cost grows with k, not with n_m. Where ``k`` is a large
    fraction of ``n_m`` (``16 k >= n_m``), dense scatter + GEMM is faster and is used instead.

    Returns ``(values (batch, k) fp32, indices (batch, k), reconstruction (batch, n_p) fp32,
    recon_loss, auxk_loss)``.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, w2, k, dead, k_aux, aux_scale, dtype, sync=False):
        B = x.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            xc = x - b_dec
            pre = _encode(xc, W_enc, b_enc, dtype)
            vals, idx = _topk_rows(pre, k, relu=True)  # exact where it matters: the kept values are ReLU'd
            vals = vals.float().relu_()
            aux = dead is not None
            if aux:
                a_vals, a_local = pre.index_select(1, dead).topk(k_aux, dim=1, sorted=False)
                a_idx = dead[a_local]
                a_vals = a_vals.float().relu_()
            del pre
            rec = F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum").add_(b_dec)
            err = rec - x
            recon = (err.pow(2).sum(0) * w2).sum() / B
            if aux:
                # ê - e with e = x - x̂ = -err
                a_err = F.embedding_bag(a_idx, W_dec, per_sample_weights=a_vals, mode="sum").add_(err)
                aux_scale = _auxk_factor(x, err, w2, aux_scale, sync)
                aux_loss = (a_err.pow(2).sum(0) * w2).sum() * (aux_scale / B)
            else:
                a_idx = a_vals = a_err = None
                aux_loss = recon.new_zeros(())
        ctx.save_for_backward(xc, W_enc, W_dec, w2, idx, vals, err, a_idx, a_vals, a_err)
        ctx.aux, ctx.aux_scale = aux, aux_scale
        ctx.mark_non_differentiable(idx)
        return vals, idx, rec, recon, aux_loss

    @staticmethod
    def backward(ctx, g_vals_out, _g_idx, g_rec_out, g_recon, g_aux):
        xc, W_enc, W_dec, w2, idx, vals, err, a_idx, a_vals, a_err = ctx.saved_tensors
        B, k = idx.shape
        n_m = W_enc.shape[0]
        g_err = err * (w2 * (2.0 * g_recon / B))
        g_rec = g_err if g_rec_out is None else g_err + g_rec_out
        idx_l, val_l, g_out_l = [idx], [vals], [g_rec]  # selections, their values, their output grads
        if ctx.aux:
            g_e = a_err * (w2 * (2.0 * ctx.aux_scale * g_aux / B))
            idx_l.append(a_idx)
            val_l.append(a_vals)
            g_out_l.append(g_e)
        dense = k * _DENSE_TOPK_RATIO >= n_m
        if dense:
            # Few latents or a large k: dense scatter + GEMMs beat the sparse products.
            S = [v.new_zeros(B, n_m).scatter_(1, i, v) for i, v in zip(idx_l, val_l)]
            g_full = [g @ W_dec.T for g in g_out_l]
            g_sel = [gf.gather(1, i) for gf, i in zip(g_full, idx_l)]
        else:
            plan = _LatentMajor(idx_l, n_m)
            g_out = torch.cat(g_out_l) if len(g_out_l) > 1 else g_out_l[0]
            g_sel = plan.rows_dot(W_dec, g_out)
        if g_vals_out is not None:
            g_sel[0] = g_sel[0] + g_vals_out
        for g, v in zip(g_sel, val_l):
            g.masked_fill_(v <= 0, 0.0)  # ReLU on the kept values
        if dense:
            G = torch.zeros_like(S[0])
            for i, g in zip(idx_l, g_sel):
                G.scatter_add_(1, i, g)
            grad_W_dec = sum(s.T @ g for s, g in zip(S, g_out_l))
            grad_W_enc = G.T @ xc
            grad_b_enc = G.sum(0)
        else:
            grad_W_dec = plan.matmul(val_l, g_out)
            grad_W_enc = plan.matmul(g_sel, xc if len(idx_l) == 1 else torch.cat([xc] * len(idx_l)))
            grad_b_enc = plan.bincount(g_sel)
        grad_b_dec = g_rec.sum(0) - grad_b_enc @ W_enc
        grad_x = None
        if ctx.needs_input_grad[0]:
            # only recon sees x directly (err = x̂ - x); the returned x̂ depends on x through the latents alone
            grad_x = -g_err + sum(F.embedding_bag(i, W_enc, per_sample_weights=g, mode="sum")
                                  for i, g in zip(idx_l, g_sel))
        return grad_x, grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, None, None, None, None, None, None, None


class PracticalSAE(nn.Module):
    """Practical SAE: ``a = act(W_enc (x_p - b_dec) + b_enc)``, ``x̂_p = W_decᵀ a + b_dec``.

    Shapes: ``W_enc``, ``W_dec`` ``(n_m, n_p)``; ``b_enc`` ``(n_m,)``; ``b_dec`` ``(n_p,)``. Decoder
    rows have unit norm (restored after every optimiser step, and the gradient component along each
    row is removed before it, as in sparsify). ``act`` is a ReLU with loss term
    ``l1_coeff * E sum_j a_j`` (``kind="relu"``) or a Top-k with ReLU on the kept values
    (``kind="topk"``). Both kinds run a fused forward with a hand-written backward
    (:class:`_FusedReluSAE`, :class:`_FusedTopKSAE`) in fp32, or with bf16 matrix products under
    bf16 autocast or for bf16 input (fp32 weights, losses and gradients); ``fused=False`` gives the
    plain autograd computation of the same maths (the reference the tests compare against).
    Initialisation: ``W_enc`` random rows of norm ``init_scale``, ``W_dec = W_enc`` normalised,
    biases 0 (the trainer starts ``b_dec`` at the data mean).
    """

    #: Set while the SAE trains data-parallel (:func:`wsae_core.distributed.train_ddp`): each rank's
    #: batch is a slice of one global batch over the default process group, and the AuxK constant
    #: (:func:`_auxk_factor`), the only batch statistic in the loss, is all-reduced to that batch's.
    sync_batch_stats: bool = False

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

    def _pre(self, x_p: Tensor) -> Tensor:
        return F.linear(x_p - self.b_dec, self.W_enc, self.b_enc)

    def encode(self, x_p: Tensor) -> Tensor:
        """Dense latents ``(batch, n_m)`` (for metrics; Top-k values scattered into zeros)."""
        x_p, _ = _check_input(self, x_p)
        pre = self._pre(x_p)
        if self.cfg.kind == "relu":
            return pre.relu()
        vals, idx = pre.topk(self.cfg.k, dim=1, sorted=False)
        return torch.zeros_like(pre).scatter_(1, idx, vals.relu())

    def decode(self, latents: Tensor) -> Tensor:
        return latents @ self.W_dec + self.b_dec

    def feature_directions(self) -> Tensor:
        """``(n_m, n_p)`` directions compared with W_p's columns: the decoder rows."""
        return self.W_dec.detach()

    def forward(self, x_p: Tensor, gamma: Tensor | None = None, dead_mask: Tensor | None = None,
                k_aux: int | None = None) -> ForwardOutput:
        """``x_p`` ``(batch, n_p)``; ``gamma`` ``(n_p,)`` the WSAE weights (None = plain SAE).

        Top-k only: ``dead_mask`` ``(n_m,)`` bool marks dead latents; when any is dead,
        ``auxk_loss`` is the AuxK loss with ``k_aux`` of them per sample (default ``n_p // 2``, at
        most the number dead; see :func:`_auxk_factor`). The trainer adds it with its coefficient.
        """
        x_p, gamma = _check_input(self, x_p, gamma)
        cfg = self.cfg
        dtype = compute_dtype(x_p)
        w2 = torch.ones_like(self.b_dec) if gamma is None else gamma.pow(2).to(self.b_dec.dtype)
        zero = self.b_dec.new_zeros(())
        if cfg.kind == "relu":
            if self.fused:
                lat, rec, recon, sparse = _FusedReluSAE.apply(
                    x_p, self.W_enc, self.b_enc, self.W_dec, self.b_dec, w2, float(cfg.l1_coeff), dtype)
            else:
                lat = torch.relu(self._pre(x_p))
                rec = F.linear(lat, self.W_dec.T, self.b_dec)
                recon = _weighted_sq_error(x_p, rec, gamma)
                sparse = lat.sum() * (cfg.l1_coeff / x_p.shape[0]) if cfg.l1_coeff else zero
            return ForwardOutput(lat, None, rec, recon + sparse, recon, sparse, _fvu(x_p, rec))
        dead = None
        scale = 0.0
        if dead_mask is not None:
            dead = dead_mask.to(x_p.device).nonzero().squeeze(1)
            k_aux = cfg.n_p // 2 if k_aux is None else int(k_aux)
            if dead.numel() == 0 or k_aux < 1:
                dead = None
            else:
                scale = min(dead.numel() / k_aux, 1.0)
                k_aux = min(k_aux, dead.numel())
        if self.fused:
            vals, idx, rec, recon, aux = _FusedTopKSAE.apply(
                x_p, self.W_enc, self.b_enc, self.W_dec, self.b_dec, w2, cfg.k, dead, k_aux, scale, dtype,
                self.sync_batch_stats)
        else:
            pre = self._pre(x_p)
            vals, idx = pre.topk(cfg.k, dim=1, sorted=False)
            vals = vals.relu()
            rec = F.linear(torch.zeros_like(pre).scatter(1, idx, vals), self.W_dec.T, self.b_dec)
            recon = _weighted_sq_error(x_p, rec, gamma)
            aux = zero
            if dead is not None:
                a_vals, a_local = pre[:, dead].topk(k_aux, dim=1, sorted=False)
                e_hat = F.linear(torch.zeros_like(pre).scatter(1, dead[a_local], a_vals.relu()), self.W_dec.T)
                e = (x_p - rec).detach()
                c = _auxk_factor(x_p.detach(), e, w2, scale, self.sync_batch_stats)
                aux = c * _weighted_sq_error(e, e_hat, gamma)
        return ForwardOutput(vals, idx, rec, recon, recon, zero, _fvu(x_p, rec), aux)

    @torch.no_grad()
    def before_step(self) -> None:
        """Remove the gradient component parallel to each decoder row (keeps steps on the sphere)."""
        g = self.W_dec.grad
        if g is not None:
            # In blocks of rows that stay in cache, so that the row dots' temporary and the update
            # cost about one pass over memory: 8 ms instead of 19 ms for g -= (g * W).sum(1) * W at
            # 24,576 x 768 (AMD EPYC, 2 threads).
            for g_b, W_b in zip(g.split(_ROW_BLOCK), self.W_dec.split(_ROW_BLOCK)):
                g_b.addcmul_(torch.linalg.vecdot(g_b, W_b).unsqueeze(1), W_b, value=-1.0)

    @torch.no_grad()
    def after_step(self) -> None:
        """Restore unit-norm decoder rows after the optimiser step."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


def build_sae(cfg: SAEConfig) -> TheorySAE | PracticalSAE:
    """The model a config describes: :class:`TheorySAE` for ``"theory"``, else :class:`PracticalSAE`."""
    if not isinstance(cfg, SAEConfig):
        raise TypeError(f"cfg must be an SAEConfig, got {type(cfg).__name__}")
    return TheorySAE(cfg) if cfg.kind == "theory" else PracticalSAE(cfg)
