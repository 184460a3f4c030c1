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
import re
import secrets
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

from safetensors.torch import load_file, save  # noqa: E402

from .checks import (  # noqa: E402
    CorruptFileError, NonFiniteError, check_finite, nonfinite_location, read_json, verify_files, write_bytes, write_json)

from .models import SAEConfig, build_sae, choose_precision  # noqa: E402
from .weights import validate_gamma  # noqa: E402

__all__ = ["TrainConfig", "Trainer", "save_sae", "load_sae", "lr_at", "width_scaled_lr", "AUXK_COEFF"]

log = logging.getLogger(__name__)

#: A loss this many times its scale at the first step of ``fit`` means the run diverged.
_DIVERGED = 1e4

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
    """Folder for checkpoints (each one replaces the previous atomically; see :meth:`Trainer.save_checkpoint`)."""

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
        if self.seed >= 2**63:
            raise ValueError(f"seed must be < 2**63, got {self.seed}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps must be <= steps = {self.steps} (the warm-up is part of the run), "
                             f"got {self.warmup_steps}")
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
        if isinstance(self.final_lr_ratio, bool) or not (isinstance(self.final_lr_ratio, Real) and 0 <= self.final_lr_ratio <= 1):
            raise ValueError(f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, Real) and 0 <= v < 1):
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, os.PathLike)) or not str(self.checkpoint_dir):
                raise ValueError(f"checkpoint_dir must be a folder path or None, got {self.checkpoint_dir!r}")
            self.checkpoint_dir = str(self.checkpoint_dir)
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
#
# Nothing written here runs code when read: tensors go to safetensors, everything else to JSON.
# Every folder's cfg.json lists its files with size and SHA-256 ("files"), checked before reading.

#: cfg.json keys that save_sae writes itself (``extra`` may not use them).
_RESERVED = ("sae", "wsae", "files", "format", "train")
_SAVE_FORMAT = 2
_STEP_DIR = re.compile(r"step_\d{8}_[0-9a-f]{8}")


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def _read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for a bad header
        raise CorruptFileError(f"{path} ({what}) is not a valid safetensors file: {err}") from err


def _write_folder(folder: Path, model: torch.nn.Module, meta: dict, gamma: torch.Tensor | None,
                  state: tuple[dict, dict] | None = None) -> None:
    """``model.safetensors`` (weights + ``gamma``), optionally ``state.safetensors`` + ``state.json``,
    then ``cfg.json`` = ``meta`` + the files' manifest, written last: a folder with a cfg.json is complete."""
    tensors = dict(model.state_dict())
    if gamma is not None:
        tensors["gamma"] = gamma
    files = {"model.safetensors": write_bytes(folder / "model.safetensors", _tensor_bytes(tensors))}
    if state is not None:
        files["state.safetensors"] = write_bytes(folder / "state.safetensors", _tensor_bytes(state[0]))
        files["state.json"] = write_json(folder / "state.json", state[1])
    write_json(folder / "cfg.json", {**meta, "format": _SAVE_FORMAT, "files": files})


def save_sae(model: torch.nn.Module, path: str | os.PathLike, extra: dict | None = None, *,
             gamma: Any = None, gamma_rule: str | None = None, alpha: float | None = None) -> Path:
    """Write ``model.safetensors`` and ``cfg.json`` into folder ``path``.

    ``cfg.json`` holds the :class:`~wsae_core.models.SAEConfig` (``sae``), the WSAE weights' rule
    (``wsae``: ``{"rule", "alpha"}``, null for a plain SAE), the files' sizes and SHA-256 (``files``)
    and the JSON-able ``extra``. Γ itself, ``gamma`` ``(n_p,)``, is stored beside the weights, so
    :func:`load_sae` gives it back (``gamma_rule``: e.g. ``"variance"`` with its ``alpha``; default
    ``"custom"``). Replacing an earlier save first removes its ``cfg.json``: a run killed while saving
    leaves a folder that :func:`load_sae` reports as incomplete, never a mix of two saves.
    """
    if not hasattr(model, "cfg") or not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an SAE built by build_sae, got {type(model).__name__}")
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra must not use the keys {list(_RESERVED)} (written by save_sae), got {clash}")
    if gamma is None and (gamma_rule is not None or alpha is not None):
        raise ValueError(f"gamma_rule = {gamma_rule!r} and alpha = {alpha!r} describe a WSAE: pass its gamma too")
    g = None if gamma is None else validate_gamma(gamma, model.cfg.n_p)
    wsae = None if g is None else {"rule": "custom" if gamma_rule is None else str(gamma_rule),
                                   "alpha": None if alpha is None else float(alpha)}
    try:
        meta = json.loads(json.dumps({"sae": model.cfg.to_dict(), "wsae": wsae, **extra}, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"extra must be JSON-serialisable with finite numbers: {err}") from err
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; save_sae writes a folder")
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").unlink(missing_ok=True)
    _write_folder(path, model, meta, g)
    return path


def _resolve_checkpoint(path: Path) -> Path | None:
    """The step folder named by ``path/checkpoint.json`` (None if there is none)."""
    pointer = path / "checkpoint.json"
    if not pointer.is_file():
        return None
    ptr = read_json(pointer, "trainer checkpoint pointer")
    name = ptr.get("folder") if isinstance(ptr, dict) else None
    if not isinstance(name, str) or not _STEP_DIR.fullmatch(name):
        raise CorruptFileError(f"{pointer} must name a step folder like 'step_00000040_0123abcd', got {name!r}")
    step = int(name[len("step_"):len("step_") + 8])
    if ptr.get("format") != _SAVE_FORMAT or ptr.get("step") != step:
        raise CorruptFileError(f"{pointer} must hold format {_SAVE_FORMAT} and the step of the folder it names "
                               f"({step}), got format {ptr.get('format')!r} and step {ptr.get('step')!r}")
    return path / name


def _read_saved(path: str | os.PathLike, what: str) -> tuple[Path, dict]:
    """``(folder, cfg)`` of a save_sae folder or a trainer checkpoint, cfg.json parsed and checked."""
    path = Path(path)
    if not path.is_dir():
        writer = "Trainer.save_checkpoint" if what == "trainer checkpoint" else "save_sae"
        raise FileNotFoundError(f"{path} does not exist or is not a folder: expected a folder with cfg.json "
                                f"and model.safetensors written by {writer}")
    if (path / "state.pt").is_file():
        raise CorruptFileError(f"{path / 'state.pt'} is a pickle (an old checkpoint format); pickles can run "
                               "code when loaded and are never read here: train again, or re-save it from a "
                               "trusted copy")
    folder = _resolve_checkpoint(path) or path
    cfg_path = folder / "cfg.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {folder} is not a complete {what} (never written, "
                                "or its writing was interrupted); save it again")
    cfg = read_json(cfg_path, what)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("sae"), dict):
        raise CorruptFileError(f"{cfg_path} must be a JSON object with an 'sae' object (the SAEConfig), "
                               f"got {str(cfg)[:200]}")
    if cfg.get("format") != _SAVE_FORMAT and ("files" in cfg or "format" in cfg):  # no files: before manifests
        raise CorruptFileError(f"{cfg_path} has format {cfg.get('format')!r}; this version of wsae_core reads "
                               f"format {_SAVE_FORMAT}: save the {what} again with it")
    return folder, cfg


def _sae_config(cfg: dict, where: Path) -> SAEConfig:
    known = {f.name for f in fields(SAEConfig)}
    unknown = sorted(set(cfg["sae"]) - known)
    if unknown:
        raise ValueError(f"{where}: unknown SAEConfig field(s) {unknown}; expected fields among {sorted(known)}")
    try:
        return SAEConfig(**cfg["sae"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: invalid SAEConfig {cfg['sae']}: {err}") from err


def load_sae(path: str | os.PathLike, device: str = "cpu") -> torch.nn.Module:
    """Rebuild an SAE saved by :func:`save_sae` (or a trainer checkpoint) from folder ``path``.

    The weights are checked against the manifest (size, SHA-256), the config (known fields, valid
    values), the model's parameter names and shapes, and for NaN/Inf; each failure names the file
    and what was expected. The returned model carries ``gamma`` (Γ ``(n_p,)`` on the CPU, None for a
    plain SAE) and ``gamma_rule`` (``{"rule", "alpha"}`` or None), so a WSAE is told from an SAE.
    Folders from before manifests existed (no ``files``) are read with safetensors' own checks.
    """
    folder, cfg = _read_saved(path, "saved SAE")
    if "files" in cfg:
        verify_files(folder, cfg["files"], "saved SAE", names=["model.safetensors"])
    elif not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder / 'model.safetensors'} not found: expected a folder written by save_sae")
    sae_cfg = _sae_config(cfg, folder / "cfg.json")
    model = build_sae(sae_cfg)
    tensors = _read_tensors(folder / "model.safetensors", "SAE weights")
    gamma = tensors.pop("gamma", None)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if set(got) != set(expected):
        raise ValueError(f"{folder / 'model.safetensors'} holds tensors {sorted(got)}, but a {sae_cfg.kind!r} SAE "
                         f"has {sorted(expected)} (missing {sorted(set(expected) - set(got))}, unexpected "
                         f"{sorted(set(got) - set(expected))})")
    for k, shape in expected.items():
        if got[k] != shape:
            raise ValueError(f"{folder / 'model.safetensors'}: {k} has shape {got[k]}, but the config "
                             f"(n_p = {sae_cfg.n_p}, n_m = {sae_cfg.n_m}) needs {shape}")
        check_finite(tensors[k], k, f" in {folder / 'model.safetensors'}")
    model.load_state_dict(tensors)
    wsae = cfg.get("wsae")
    if gamma is not None:
        gamma = validate_gamma(gamma, sae_cfg.n_p)
    if (gamma is None) != (wsae is None) and "files" in cfg:
        raise CorruptFileError(f"{folder}: cfg.json's 'wsae' ({wsae!r}) and the stored gamma "
                               f"({'present' if gamma is not None else 'absent'}) disagree")
    model.gamma, model.gamma_rule = gamma, wsae
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
        how the tests simulate an interruption). Returns ``history``.

        A NaN/Inf loss or gradient, or a loss that has grown to ``1e4`` times its scale at the first
        step of this call (the larger of the loss then and the loss of predicting 0: a diverging run),
        stops training at once with :class:`~wsae_core.checks.NonFiniteError` naming the step, the
        quantity and, if the batch was the cause, the row and column that was not finite; the
        optimiser step is not taken.
        """
        cfg = self.cfg
        if until is not None and (isinstance(until, bool) or not isinstance(until, Integral) or until < 0):
            raise ValueError(f"until must be None or an integer >= 0, got {until!r}")
        stop = cfg.steps if until is None else min(int(until), cfg.steps)
        show = cfg.progress if cfg.progress is not None else (sys.stderr.isatty() and not os.environ.get("CI"))
        from tqdm.auto import tqdm

        threads = torch.get_num_threads()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not show, desc="train", leave=False)
        model, opt = self.model, self.optimizer
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        first, start = 0.0, self.step
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
                if self._stop_everywhere(nonfinite_location(x_p) is not None):
                    raise self._nonfinite(None, x_p)
                if self.step == 0 and cfg.b_dec_init == "mean":
                    with torch.no_grad():
                        model.b_dec.copy_(x_p.float().mean(0))
                aux = {"dead_mask": self.dead_mask(), "k_aux": cfg.k_aux} if cfg.auxk_coeff else {}
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                    enabled=self.autocast_dtype is not None):
                    out = model(x_p, self.gamma, **aux)
                total = out.loss + cfg.auxk_coeff * out.auxk_loss if aux else out.loss
                loss = float(total.detach())
                reason = None
                if not math.isfinite(loss):
                    reason = f"the loss is {loss}"
                elif not first:  # the yardstick: the larger of the first loss and that of predicting 0
                    w2 = 1.0 if self.gamma is None else self.gamma.pow(2)
                    first = max(loss, float((x_p.detach().float().pow(2) * w2).sum(1).mean()))
                elif loss > _DIVERGED * first:
                    reason = (f"the loss is {loss:.4g}, {loss / first:.3g} times its scale {first:.4g} at "
                              f"step {start}")
                if self._stop_everywhere(reason is not None):
                    raise self._nonfinite(reason, x_p)
                total.backward()
                for name, p in named:  # a NaN/Inf anywhere in a gradient makes its sum non-finite
                    if p.grad is not None and not math.isfinite(float(p.grad.sum())):
                        loc = nonfinite_location(p.grad)
                        value = f"{loc[1]} at {list(loc[0])}" if loc else f"entries summing to {float(p.grad.sum())}"
                        raise self._nonfinite(f"the gradient of {name} has {value}", x_p)
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

    def _nonfinite(self, what: str | None, x_p: torch.Tensor) -> NonFiniteError:
        """The error for a NaN/Inf at this step: the batch (``what`` None) or which quantity.
        Raised before the optimiser step, so the weights and the last checkpoint stay finite."""
        loc = nonfinite_location(x_p)
        if loc is not None:
            what = (f"the batch from the data source ({type(self.data).__name__}) has {loc[1]} at row {loc[0][0]}, "
                    f"column {loc[0][1]}")
        elif what is None:
            what = "another process of the group stopped (its batch or loss was not finite, or diverged)"
        else:
            what += f" (the batch is finite: the run diverged or overflowed; lower lr, now {self.cfg.lr:g})"
        last = getattr(self, "_checkpoint_step", None)
        kept = (f"; the last checkpoint (step {last}, in {self.cfg.checkpoint_dir}) is intact" if last is not None
                else "; no checkpoint was written")
        return NonFiniteError(f"step {self.step}: {what}; training stopped with the weights of step {self.step}{kept}")

    def _stop_everywhere(self, stop: bool) -> bool:
        """Whether training stops at this step: ``stop`` here. A data-parallel trainer makes it true on
        every process when it is true on one, so that no process is left waiting in a collective."""
        return stop

    def dead_mask(self) -> torch.Tensor:
        """``(n_m,)`` bool: latents that have not fired for ``dead_steps`` steps (AuxK's dead latents)."""
        return self.steps_since_fired >= self.cfg.dead_steps

    def dead_fraction(self) -> float:
        """Fraction of latents that have not fired for ``dead_steps`` steps (or since the start)."""
        horizon = min(self.cfg.dead_steps, max(self.step, 1))
        return float((self.steps_since_fired >= horizon).float().mean())

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Everything needed for an exact resume, in folder ``path``: safetensors + JSON, no pickle.

        ``path/checkpoint.json`` names the current step folder ``step_<step>_<id>/`` holding
        ``cfg.json`` (configs + the files' sizes and SHA-256), ``model.safetensors`` (weights, Γ),
        ``state.safetensors`` (Adam's moment tensors, RNG states, dead-latent counters) and
        ``state.json`` (step, history, optimiser hyper-parameters). A new checkpoint goes into a new
        step folder; replacing ``checkpoint.json`` (atomic) commits it, and only then are older step
        folders deleted. A run killed at any moment, or a full disk, leaves the last committed
        checkpoint intact.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} is a file; a trainer checkpoint is a folder")
        path.mkdir(parents=True, exist_ok=True)
        name = f"step_{self.step:08d}_{secrets.token_hex(4)}"
        folder = path / name
        folder.mkdir()
        tensors, state = self._state()
        wsae = None if self.gamma is None else {"rule": "custom", "alpha": None}
        meta = {"sae": self.model.cfg.to_dict(), "wsae": wsae, "train": asdict(self.cfg)}
        try:
            _write_folder(folder, self.model, meta, self.gamma, state=(tensors, state))
            write_json(path / "checkpoint.json", {"format": _SAVE_FORMAT, "step": self.step, "folder": name})
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        for old in path.iterdir():  # superseded steps, and leftovers of runs killed mid-write
            if old.name != name and (_STEP_DIR.fullmatch(old.name) or old.name.startswith(".checkpoint.json.tmp")):
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        self._checkpoint_step = self.step
        return path

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, data: Any, **overrides: Any) -> "Trainer":
        """Resume from a folder written by :meth:`save_checkpoint`. ``overrides`` replace
        TrainConfig fields that do not change the maths (``progress``, ``checkpoint_dir``, ...).

        Every file is checked against the manifest (size, SHA-256) before it is read, tensors are
        read with safetensors and the rest is JSON: a truncated, altered or crafted file (a pickle
        included) is refused with :class:`~wsae_core.checks.CorruptFileError`, never executed.
        """
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"overrides must be TrainConfig fields, got unknown {unknown}")
        folder, meta = _read_saved(path, "trainer checkpoint")
        verify_files(folder, meta.get("files"), "trainer checkpoint",
                     names=["model.safetensors", "state.safetensors", "state.json"])
        stored = meta.get("train")
        if not isinstance(stored, dict):
            raise CorruptFileError(f"{folder / 'cfg.json'} has no 'train' object (the TrainConfig)")
        cfg = TrainConfig(**{**{k: v for k, v in stored.items() if k in known}, **overrides})
        tensors = _read_tensors(folder / "state.safetensors", "trainer state")
        state = read_json(folder / "state.json", "trainer state")
        model = load_sae(folder)
        trainer = cls(model, data, cfg, gamma=model.gamma)
        try:
            trainer._restore(tensors, state)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CorruptFileError(f"trainer checkpoint at {folder}: state does not fit this model and "
                                   f"optimiser: {err!r}") from err
        return trainer

    def _state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, json)`` of everything besides the weights that a bitwise resume needs."""
        opt = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {
            "rng.generator": self.generator.get_state(),
            "rng.torch": torch.get_rng_state(),
            "steps_since_fired": self.steps_since_fired,
        }
        if torch.cuda.is_available():
            for j, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{j}"] = s
        scalars: dict[str, dict[str, Any]] = {}
        for i, entry in opt["state"].items():
            for k, v in entry.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optimizer.state.{i}.{k}"] = v
                else:
                    scalars.setdefault(str(i), {})[k] = v
        state = {"step": self.step, "history": self.history,
                 "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars}}
        return tensors, state

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        opt_state: dict[int, dict[str, Any]] = {}
        for key, v in tensors.items():
            if not key.startswith("optimizer.state."):
                continue
            i, name = key[len("optimizer.state."):].split(".", 1)
            i = int(i)
            if not 0 <= i < len(params) or (v.ndim and v.shape != params[i].shape):
                raise ValueError(f"{key} has shape {tuple(v.shape)}, no parameter of that shape at index {i}")
            opt_state.setdefault(i, {})[name] = v
        for i, entry in state["optimizer"]["scalars"].items():
            opt_state.setdefault(int(i), {}).update(entry)
        groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in state["optimizer"]["param_groups"]]
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        if torch.cuda.is_available():
            cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        fired = tensors["steps_since_fired"]
        if fired.shape != self.steps_since_fired.shape:
            raise ValueError(f"steps_since_fired has shape {tuple(fired.shape)}, expected {tuple(self.steps_since_fired.shape)}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.cfg.steps:
            raise ValueError(f"step must be an integer in [0, {self.cfg.steps}], got {step!r}")
        if not isinstance(state["history"], list):
            raise ValueError(f"history must be a list, got {type(state['history']).__name__}")
        self.step, self._checkpoint_step = step, step
        self.steps_since_fired = fired.long()
        self.history = list(state["history"])

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
