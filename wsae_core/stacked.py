"""Many small SAEs of one shape trained as one model: chapter *WSAE on synthetic data*.

A sweep compares methods (Γ rules) on the same initialisation and the same data stream. Trained one
at a time, a 200-latent SAE spends most of each step in per-step overhead, not arithmetic. Here the
parameters of M such SAEs are stacked on a leading axis (``(M, n_m, n_p)``), every step feeds the same
batch to all of them, and the loss is the sum of the M losses. The models share no parameter, so each
one's gradient is exactly its own; Adam is elementwise and the M models step together, so the
optimiser state of each slice is what a separate :class:`~wsae_core.train.Trainer` run would hold.
A stacked run therefore computes what M separate runs compute, up to the order of floating-point
sums (``tests/test_stacked.py`` compares the two), at about the cost of one.

Everything the trainer does is done here per model: b_dec started at the first batch's mean, AuxK on
the latents that have not fired for ``dead_steps`` steps (the ``k_aux`` largest pre-activations among
them reconstruct the residual, scaled as :func:`wsae_core.models._auxk_factor`), unit-norm decoder rows
with the gradient component along each row removed, the learning-rate schedule
:func:`~wsae_core.train.lr_at`, dead-latent counters and a history per model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .checks import NonFiniteError
from .models import build_sae
from .train import TrainConfig, _with_model_defaults, lr_at
from .weights import validate_gamma

__all__ = ["StackedSAE", "train_stacked"]


class StackedSAE(nn.Module):
    """M SAEs of one architecture (same kind, n_p, n_m and k; any seeds) with stacked parameters.

    Theory SAEs: ``W_m`` ``(M, n_m, n_p)``. Top-k SAEs: ``W_enc``, ``W_dec`` ``(M, n_m, n_p)``,
    ``b_enc`` ``(M, n_m)``, ``b_dec`` ``(M, n_p)``. :meth:`unstack` gives the M ordinary models back.
    """

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("models must hold at least one SAE")
        cfgs = [m.cfg for m in models]
        shape = {(c.kind, c.n_p, c.n_m, c.k) for c in cfgs}
        if len(shape) != 1:
            raise ValueError(f"stacked SAEs must share kind, n_p, n_m and k, got {sorted(shape, key=str)}")
        self.cfgs, self.cfg = cfgs, cfgs[0]
        if self.cfg.kind not in ("theory", "topk"):
            raise ValueError(f"StackedSAE stacks 'theory' or 'topk' SAEs, got kind {self.cfg.kind!r}")
        for name, _ in models[0].named_parameters():
            self.register_parameter(name, nn.Parameter(torch.stack([m.get_parameter(name).detach() for m in models])))

    def forward(self, x_p: Tensor, w2: Tensor, dead: Tensor | None = None, k_aux: int = 1) -> dict[str, Tensor]:
        """``x_p`` ``(batch, n_p)`` fed to every model; ``w2`` ``(M, n_p)`` = γ² per model; ``dead``
        ``(M, n_m)`` bool (Top-k: the AuxK latents). Returns per-model ``(M,)`` tensors ``recon``
        (``E||Γ(x_p - x̂_p)||²``), ``aux`` (AuxK loss, 0 without dead latents) and ``fvu``, and
        ``fired`` ``(M, n_m)`` and ``l0`` ``(M,)``."""
        B = x_p.shape[0]
        if self.cfg.kind == "theory":
            lat = torch.relu(torch.matmul(x_p, self.W_m.transpose(1, 2)))  # (M, B, n_m)
            rec = torch.bmm(lat, self.W_m)
            active = lat > 0
        else:
            pre = torch.baddbmm(self.b_enc[:, None], x_p - self.b_dec[:, None], self.W_enc.transpose(1, 2))
            vals, idx = pre.topk(self.cfg.k, dim=2, sorted=False)
            vals = vals.relu()
            lat = torch.zeros_like(pre).scatter(2, idx, vals)
            rec = torch.baddbmm(self.b_dec[:, None], lat, self.W_dec)
            active = torch.zeros_like(pre, dtype=torch.bool).scatter(2, idx, vals > 0)
        err = rec - x_p
        recon = (err.pow(2).sum(1) * w2).sum(1) / B
        with torch.no_grad():
            xc = x_p - x_p.mean(0)
            fvu = err.pow(2).sum((1, 2)) / xc.pow(2).sum().clamp_min(1e-30)
        aux = torch.zeros_like(recon)
        n_dead = None if dead is None else dead.sum(1)
        if n_dead is not None and int(n_dead.max()) > 0:
            e = err.detach()
            K = min(int(k_aux), int(n_dead.max()))
            # Live latents get -inf, so a model with fewer than K dead latents picks them all and
            # then only zeros (relu(-inf) = 0, with zero gradient).
            a_vals, a_idx = pre.masked_fill(~dead[:, None], -math.inf).topk(K, dim=2, sorted=False)
            e_hat = torch.bmm(torch.zeros_like(pre).scatter(2, a_idx, a_vals.relu()), self.W_dec)
            with torch.no_grad():
                var_x = (xc.pow(2).sum(0) * w2).sum(1)
                var_e = ((e - e.mean(1, keepdim=True)).pow(2).sum(1) * w2).sum(1).clamp_min(1e-30)
                factor = (n_dead.float() / k_aux).clamp_max(1.0) * var_x / var_e
            aux = factor * ((e_hat + e).pow(2).sum(1) * w2).sum(1) / B
        return {"recon": recon, "aux": aux, "fvu": fvu, "fired": active.any(1), "l0": active.sum(2).float().mean(1)}

    @torch.no_grad()
    def before_step(self) -> None:
        """Top-k: remove the gradient component along each decoder row (as the practical SAE)."""
        g = getattr(self, "W_dec", None) if self.cfg.kind == "topk" else None
        if g is not None and g.grad is not None:
            g.grad.addcmul_(torch.linalg.vecdot(g.grad, g, dim=2).unsqueeze(2), g, value=-1.0)

    @torch.no_grad()
    def after_step(self) -> None:
        """Top-k: restore unit-norm decoder rows."""
        if self.cfg.kind == "topk":
            self.W_dec.div_(self.W_dec.norm(dim=2, keepdim=True).clamp_min(1e-12))

    def unstack(self) -> list[nn.Module]:
        """The M trained SAEs as ordinary models (:func:`wsae_core.models.build_sae`)."""
        out = []
        for i, cfg in enumerate(self.cfgs):
            m = build_sae(cfg)
            m.load_state_dict({name: p.detach()[i].clone() for name, p in self.named_parameters()})
            out.append(m)
        return out


def train_stacked(models: Sequence[nn.Module], data: Any, cfg: TrainConfig, gammas: Sequence[Any]
                  ) -> tuple[list[nn.Module], list[list[dict]], Tensor]:
    """Train M SAEs on one data stream as :class:`~wsae_core.train.Trainer` would train each.

    ``models``: SAEs from :func:`~wsae_core.models.build_sae` sharing kind, n_p, n_m and k (their
    weights are the starting points; they are not modified). ``gammas``: one Γ ``(n_p,)`` or None
    (plain SAE) per model. ``cfg``: one :class:`~wsae_core.train.TrainConfig` for all (the CPU only;
    fp32). Returns ``(trained models, one history per model, steps_since_fired (M, n_m))``; history
    entries hold step, lr, loss, recon_loss, fvu, l0, dead_fraction (and auxk_loss for Top-k).
    """
    if len(gammas) != len(models):
        raise ValueError(f"gammas must hold one entry per model ({len(models)}), got {len(gammas)}")
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if cfg.device != "cpu":
        raise ValueError(f"train_stacked runs on the CPU (tiny SAEs), got device {cfg.device!r}")
    stack = StackedSAE(models)
    cfg = _with_model_defaults(cfg, stack.cfg)
    n_p, n_m, M = stack.cfg.n_p, stack.cfg.n_m, len(models)
    w2 = torch.stack([torch.ones(n_p) if g is None else validate_gamma(g, n_p).pow(2) for g in gammas])
    opt = torch.optim.Adam(stack.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    since = torch.zeros(M, n_m, dtype=torch.long)
    histories: list[list[dict]] = [[] for _ in range(M)]
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        for step in range(cfg.steps):
            lr = lr_at(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            x_p = data.sample(cfg.batch_size, gen).float()
            if step == 0 and cfg.b_dec_init == "mean":
                with torch.no_grad():
                    stack.b_dec.copy_(x_p.mean(0).expand(M, n_p))
            dead = since >= cfg.dead_steps if cfg.auxk_coeff else None
            out = stack(x_p, w2, dead, cfg.k_aux or 1)
            total = out["recon"] + cfg.auxk_coeff * out["aux"]
            bad = ~torch.isfinite(total.detach())
            if bad.any():
                i = int(bad.nonzero()[0])
                raise NonFiniteError(f"step {step}: the loss of stacked model {i} is {float(total[i])} "
                                     f"(lower lr, now {cfg.lr:g})")
            total.sum().backward()
            stack.before_step()
            opt.step()
            opt.zero_grad(set_to_none=True)
            stack.after_step()
            since += 1
            since[out["fired"]] = 0
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                out = {key: v.detach() for key, v in out.items()}
                horizon = min(cfg.dead_steps, step + 1)
                dead_frac = (since >= horizon).float().mean(1)
                for i, h in enumerate(histories):
                    rec = {"step": step + 1, "lr": lr, "loss": float(out["recon"][i]), "recon_loss": float(out["recon"][i]),
                           "fvu": float(out["fvu"][i]), "l0": float(out["l0"][i]), "dead_fraction": float(dead_frac[i])}
                    if stack.cfg.kind == "topk":
                        rec["auxk_loss"] = float(out["aux"][i])
                    h.append(rec)
    finally:
        torch.set_num_threads(threads)
    return stack.unstack(), histories, since
