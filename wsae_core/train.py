"""Training SAEs and WSAEs: one :class:`Trainer` with one :meth:`Trainer.fit`.

Chapters *Training meets theory* and *WSAE on synthetic data*; the language-model chapters use the
same trainer on stored activations (:class:`wsae_core.data.TensorSource`).

* The objective is the model's ``ForwardOutput.loss``: ``E||Γ(x_p - x̂_p)||²`` (+ the L1 term), plus
  for Top-k SAEs the AuxK loss on dead latents (Gao et al. 2024, as in sparsify).
* Adam, linear warm-up then cosine/linear decay, computed from the step alone (no scheduler state).
* Practical SAEs are trained the way sparsify trains them (each a :class:`TrainConfig` default):
  ``b_dec`` starts at the mean of the first batch, decoder rows stay unit-norm (the model's
  ``before_step``/``after_step``), the learning rate of a Top-k SAE scales as
  ``1 / sqrt(n_m / 2^14)`` unless given, AuxK revives dead latents, and the dead fraction is
  logged. The theory SAE is trained as the paper defines it: no bias, no AuxK.
* CPU or CUDA from one code path (``device``); ``precision="auto"`` picks bf16 autocast (fp32 master
  weights and Adam state) on CUDA and on CPUs with native bf16 matmuls, fp32 otherwise
  (:func:`wsae_core.models.choose_precision`; the choice and its reason are logged).
* Seeded: the model's initialisation comes from its :class:`~wsae_core.models.SAEConfig` seed, the
  data stream from :attr:`TrainConfig.seed`. On the CPU a run is bitwise reproducible (for a fixed
  thread count), and a run interrupted and resumed from a checkpoint ends bitwise equal to an
  uninterrupted one: the checkpoint holds weights, Adam state, the data generator's state, the step
  and the dead-latent counters.
* Weights are saved as ``model.safetensors`` + ``cfg.json`` (:func:`save_sae`, :func:`load_sae`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, fields, replace
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Literal

import torch

# Denormal floats slow SAE training 1.7-2.2x on these CPUs; the flag reaches only threads created
# afterwards, so it is set here, before the first parallel operation of a training run.
torch.set_flush_denormal(True)

from safetensors.torch import load_file, save_file  # noqa: E402

from .models import SAEConfig, build_sae, choose_precision  # noqa: E402
from .weights import validate_gamma  # noqa: E402

__all__ = ["TrainConfig", "Trainer", "save_sae", "load_sae", "lr_at", "width_scaled_lr", "AUXK_COEFF"]

log = logging.getLogger(__name__)

Decay = Literal["cosine", "linear", "constant"]
Precision = Literal["auto", "fp32", "bf16"]
BDecInit = Literal["mean", "keep"]

#: AuxK coefficient of Gao et al. (2024) and sparsify's Top-k trainer.
AUXK_COEFF = 1 / 32


@dataclass
class TrainConfig:
    """How to train (saved in every checkpoint's ``cfg.json``)."""

    steps: int = 2000
    """Number of optimiser steps."""

    batch_size: int = 1024
    """Samples per step."""

    lr: float | None = None
    """Peak learning rate of Adam. None = by model: sparsify's width rule ``2e-4 / sqrt(n_m / 2^14)``
    for Top-k SAEs (wider SAEs take smaller steps), 1e-2 for the theory and ReLU SAEs."""

    warmup_steps: int = 100
    """Steps of linear warm-up from ``lr / warmup_steps`` to ``lr``."""

    decay: Decay = "cosine"
    """Learning-rate decay after warm-up: ``"cosine"``, ``"linear"`` or ``"constant"``."""

    final_lr_ratio: float = 0.1
    """Learning rate at the last step, as a fraction of ``lr`` (ignored for ``"constant"``)."""

    beta1: float = 0.9
    """Adam's first-moment decay."""

    beta2: float = 0.999
    """Adam's second-moment decay."""

    seed: int = 0
    """Seed of the data stream (the model's initialisation has its own seed in SAEConfig)."""

    device: str = "cpu"
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"``: the same code path for both."""

    precision: Precision = "auto"
    """``"auto"`` = bf16 autocast where bf16 matmuls are native and faster (CUDA; CPUs with AMX, or
    AVX-512-BF16 when a quick measurement agrees), else fp32; or force ``"fp32"`` / ``"bf16"``.
    Weights and Adam state stay fp32 either way."""

    dead_steps: int = 500
    """A latent that has not fired for this many consecutive steps counts as dead (reported as
    ``dead_fraction``; the latents AuxK works on)."""

    auxk_coeff: float | None = None
    """Weight of the AuxK loss (Top-k SAEs only): the ``k_aux`` largest pre-activations among dead
    latents reconstruct the residual ``x_p - x̂_p``. None = 1/32 (Gao et al. 2024) for Top-k SAEs,
    0 for the others; 0 turns it off."""

    k_aux: int | None = None
    """Dead latents per sample in the AuxK loss; None = ``n_p // 2`` (sparsify's heuristic)."""

    b_dec_init: BDecInit | None = None
    """Start of the decoder bias: ``"mean"`` = the mean of the first training batch (sparsify),
    ``"keep"`` = leave the model's. None = ``"mean"`` for practical SAEs, ``"keep"`` for the theory SAE (no bias)."""

    log_every: int = 100
    """Record losses, FVU, L0 and the dead fraction in ``history`` every this many steps."""

    checkpoint_every: int = 0
    """Write a checkpoint every this many steps (0 = never); needs ``checkpoint_dir``."""

    checkpoint_dir: str | None = None
    """Folder for checkpoints (overwritten in place, atomically)."""

    progress: bool | None = None
    """Show a tqdm bar; None = only on an interactive terminal and not when ``CI`` is set."""

    threads: int | None = None
    """``torch.set_num_threads`` during ``fit`` (None = leave as is; 1 is fastest for tiny SAEs)."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "dead_steps"):
            _check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "checkpoint_every"):
            _check_int(name, getattr(self, name), 0)
        _check_int("seed", self.seed, 0)
        if self.threads is not None:
            _check_int("threads", self.threads, 1)
        if self.lr is not None and not (isinstance(self.lr, Real) and not isinstance(self.lr, bool)
                                        and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0 or None, got {self.lr!r}")
        if self.auxk_coeff is not None and not (isinstance(self.auxk_coeff, Real) and not isinstance(self.auxk_coeff, bool)
                                                and math.isfinite(self.auxk_coeff) and self.auxk_coeff >= 0):
            raise ValueError(f"auxk_coeff must be a finite number >= 0 or None, got {self.auxk_coeff!r}")
        if self.k_aux is not None:
            _check_int("k_aux", self.k_aux, 1)
        if self.b_dec_init not in (None, "mean", "keep"):
            raise ValueError(f"b_dec_init must be 'mean', 'keep' or None, got {self.b_dec_init!r}")
        if self.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"decay must be 'cosine', 'linear' or 'constant', got {self.decay!r}")
        if not (isinstance(self.final_lr_ratio, Real) and 0 <= self.final_lr_ratio <= 1):
            raise ValueError(f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not (isinstance(v, Real) and 0 <= v < 1):
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError(f"checkpoint_every = {self.checkpoint_every} needs a checkpoint_dir, got None")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ValueError(f"progress must be True, False or None, got {self.progress!r}")


def _check_int(name: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, Integral) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")


def width_scaled_lr(n_m: int) -> float:
    """sparsify's default learning rate for a Top-k SAE with ``n_m`` latents: ``2e-4 / sqrt(n_m / 2^14)``."""
    return 2e-4 / math.sqrt(n_m / 2**14)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warm-up, then decay to
    ``final_lr_ratio * lr`` at the last step. ``cfg.lr`` must be set (the :class:`Trainer`
    fills a None from the model)."""
    if cfg.lr is None:
        raise ValueError("cfg.lr is None: the learning rate depends on the model; use Trainer(...).cfg")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    span = max(cfg.steps - 1 - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.decay == "cosine" else 1 - t
    return cfg.lr * (cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * shape)


# ----------------------------------------------------------------------------- save / load


def save_sae(model: torch.nn.Module, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``cfg.json`` (the SAEConfig, plus ``extra``) into folder ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors"))
    cfg = {"sae": model.cfg.to_dict(), **(extra or {})}
    (path / "cfg.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


def load_sae(path: str | os.PathLike, device: str = "cpu") -> torch.nn.Module:
    """Rebuild an SAE saved by :func:`save_sae` (or a trainer checkpoint) from folder ``path``."""
    path = Path(path)
    for name in ("cfg.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: expected a folder written by save_sae")
    cfg = json.loads((path / "cfg.json").read_text())
    model = build_sae(SAEConfig(**cfg["sae"]))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.to(device)


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """Train one SAE on one data source.

    ``model``: a :class:`~wsae_core.models.TheorySAE` or :class:`~wsae_core.models.PracticalSAE`.
    ``data``: anything with ``sample(batch, generator) -> (batch, n_p)`` tensor
    (:class:`~wsae_core.data.SparseSource`, :class:`~wsae_core.data.TensorSource`).
    ``gamma``: the WSAE weights ``(n_p,)`` (None = plain SAE); validated by
    :func:`wsae_core.weights.validate_gamma`.

    ``history`` holds one dict per ``log_every`` steps (step, lr, loss, recon_loss, fvu, l0,
    dead_fraction, and auxk_loss for Top-k); ``steps_since_fired`` ``(n_m,)`` counts steps since
    each latent last fired. ``cfg`` is the given config with its model-dependent defaults filled in
    (learning rate, AuxK, b_dec start); ``precision`` says which precision runs and why.
    """

    def __init__(self, model: torch.nn.Module, data: Any, cfg: TrainConfig | None = None, gamma: Any = None):
        cfg = cfg or TrainConfig()
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        self.cfg = cfg = _with_model_defaults(cfg, model.cfg)
        if not hasattr(data, "sample"):
            raise TypeError(f"data must have a sample(batch, generator) method, got {type(data).__name__}")
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r} requested but CUDA is not available")
        n_p = model.cfg.n_p
        if getattr(data, "n_p", n_p) != n_p:
            raise ValueError(f"data has n_p = {data.n_p} but the model expects n_p = {n_p}")
        self.model = model.to(self.device)
        self.data = data
        self.gamma = None if gamma is None else validate_gamma(gamma, n_p).to(self.device)
        # fused: one pass over parameters, gradients and moments per step instead of about ten.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                          fused=self.device.type in ("cpu", "cuda"))
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.steps_since_fired = torch.zeros(model.cfg.n_m, dtype=torch.long)
        self.history: list[dict] = []
        self.precision = choose_precision(cfg.precision, self.device)
        self.autocast_dtype = torch.bfloat16 if self.precision.dtype == torch.bfloat16 else None
        log.info("precision %s on %s: %s", "bf16 autocast" if self.autocast_dtype else "fp32", self.device,
                 self.precision.reason)

    # -- public API -------------------------------------------------------------------------

    def fit(self, until: int | None = None) -> list[dict]:
        """Train from the current step to ``cfg.steps`` (or stop after step ``until``, which is
        how the tests simulate an interruption). Returns ``history``."""
        cfg = self.cfg
        stop = cfg.steps if until is None else min(int(until), cfg.steps)
        show = cfg.progress if cfg.progress is not None else (sys.stderr.isatty() and not os.environ.get("CI"))
        from tqdm.auto import tqdm

        threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not show, desc="train", leave=False)
        model, opt = self.model, self.optimizer
        before = getattr(model, "before_step", None)
        after = getattr(model, "after_step", None)
        try:
            while self.step < stop:
                lr = lr_at(self.step, cfg)
                for group in opt.param_groups:
                    group["lr"] = lr
                x_p = self.data.sample(cfg.batch_size, self.generator).to(self.device, non_blocking=True)
                if self.autocast_dtype is None:
                    x_p = x_p.float()  # a bf16 data source under fp32 training
                if self.step == 0 and cfg.b_dec_init == "mean":
                    with torch.no_grad():
                        model.b_dec.copy_(x_p.float().mean(0))
                aux = {"dead_mask": self.dead_mask(), "k_aux": cfg.k_aux} if cfg.auxk_coeff else {}
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                    enabled=self.autocast_dtype is not None):
                    out = model(x_p, self.gamma, **aux)
                loss = out.loss + cfg.auxk_coeff * out.auxk_loss if aux else out.loss
                loss.backward()
                if before is not None:
                    before()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if after is not None:
                    after()
                self._track_dead(out)
                self.step += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.history.append(self._log(out, lr))
                    bar.set_postfix(loss=f"{self.history[-1]['loss']:.4g}", refresh=False)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(cfg.checkpoint_dir)
        finally:
            bar.close()
            torch.set_num_threads(threads)
        return self.history

    def dead_mask(self) -> torch.Tensor:
        """``(n_m,)`` bool: latents that have not fired for ``dead_steps`` steps (AuxK's dead latents)."""
        return self.steps_since_fired >= self.cfg.dead_steps

    def dead_fraction(self) -> float:
        """Fraction of latents that have not fired for ``dead_steps`` steps (or since the start)."""
        horizon = min(self.cfg.dead_steps, max(self.step, 1))
        return float((self.steps_since_fired >= horizon).float().mean())

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Everything needed for an exact resume, written atomically into folder ``path``."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_sae(self.model, tmp, extra={"train": asdict(self.cfg)})
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "steps_since_fired": self.steps_since_fired,
            "history": self.history,
            "gamma": None if self.gamma is None else self.gamma.cpu(),
        }
        torch.save(state, tmp / "state.pt")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, data: Any, **overrides: Any) -> "Trainer":
        """Resume from a folder written by :meth:`save_checkpoint`. ``overrides`` replace
        TrainConfig fields that do not change the maths (``progress``, ``checkpoint_dir``, ...)."""
        path = Path(path)
        if not (path / "state.pt").is_file():
            raise FileNotFoundError(f"{path / 'state.pt'} not found: not a trainer checkpoint")
        meta = json.loads((path / "cfg.json").read_text())
        train = {f.name: meta["train"][f.name] for f in fields(TrainConfig) if f.name in meta["train"]}
        train.update(overrides)
        cfg = TrainConfig(**train)
        state = torch.load(path / "state.pt", weights_only=False)
        model = load_sae(path)
        trainer = cls(model, data, cfg, gamma=state["gamma"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        trainer.step = int(state["step"])
        trainer.steps_since_fired = state["steps_since_fired"]
        trainer.history = list(state["history"])
        return trainer

    # -- internals --------------------------------------------------------------------------

    @torch.no_grad()
    def _track_dead(self, out) -> None:
        self.steps_since_fired += 1
        if out.latent_indices is None:
            fired = (out.latents > 0).any(0)
            self.steps_since_fired[fired.cpu()] = 0
        else:
            idx = out.latent_indices[out.latents > 0]
            self.steps_since_fired[idx.cpu()] = 0

    @torch.no_grad()
    def _log(self, out, lr: float) -> dict:
        l0 = (out.latents > 0).sum(1).float().mean()
        rec = {
            "step": self.step,
            "lr": lr,
            "loss": float(out.loss),
            "recon_loss": float(out.recon_loss),
            "fvu": float(out.fvu),
            "l0": float(l0),
            "dead_fraction": self.dead_fraction(),
        }
        if out.auxk_loss is not None:
            rec["auxk_loss"] = float(out.auxk_loss)
        return rec


def _with_model_defaults(cfg: TrainConfig, sae: SAEConfig) -> TrainConfig:
    """``cfg`` with the None fields that depend on the model filled in (see the TrainConfig docstrings)."""
    topk = sae.kind == "topk"
    if cfg.auxk_coeff and not topk:
        raise ValueError(f"auxk_coeff is only used by Top-k SAEs, got {cfg.auxk_coeff} for kind {sae.kind!r}")
    if cfg.b_dec_init == "mean" and sae.kind == "theory":
        raise ValueError("b_dec_init 'mean' needs a practical SAE (the theory SAE has no bias), got kind 'theory'")
    return replace(
        cfg,
        lr=cfg.lr if cfg.lr is not None else (width_scaled_lr(sae.n_m) if topk else 1e-2),
        auxk_coeff=cfg.auxk_coeff if cfg.auxk_coeff is not None else (AUXK_COEFF if topk else 0.0),
        k_aux=cfg.k_aux if cfg.k_aux is not None or not topk else max(1, sae.n_p // 2),
        b_dec_init=cfg.b_dec_init or ("keep" if sae.kind == "theory" else "mean"),
    )
