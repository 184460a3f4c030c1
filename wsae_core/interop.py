"""SAEs that other tools open, and theirs opened here: SAELens and EleutherAI sparsify on disk.

An SAE trained here (:mod:`wsae_core.train`, ``model.safetensors`` + ``cfg.json``) is exported to

* **SAELens** (``sae_lens.SAE.load_from_disk``): one folder with ``cfg.json`` +
  ``sae_weights.safetensors``, architecture ``"standard"`` (ReLU) or ``"topk"``, with the model and
  hook names in its ``metadata``;
* **sparsify** (``sparsify.Sae.load_from_disk``, ``Sae.load_many``): one folder per hook point under
  a run folder, each with ``cfg.json`` + ``sae.safetensors``;

and SAEs saved by either are imported (:func:`load`) so that the book's metrics, splicing
(:func:`wsae_core.lm.splice_layers`) and scorers (:mod:`wsae_core.interp`) run on them.

The same map written three ways (x: the model's raw activations, ``c``: the scalar a language-model
SAE divides them by, :func:`wsae_core.activations.norm_scale`; 1 for synthetic data):

==========  ==================================================  ==========================================
library     encoder / decoder                                    weights
==========  ==================================================  ==========================================
wsae_core   ``a = act(W_enc (x/c - b_dec) + b_enc)``,            ``W_enc``, ``W_dec`` ``(n_m, n_p)``
            ``x̂ = c (W_decᵀ a + b_dec)``; Top-k: k largest
            pre-activations, then ReLU on them
SAELens     ``a = act((x - b_dec) W_enc + b_enc)``,              ``W_enc`` ``(d_in, d_sae)``,
            ``x̂ = a W_dec + b_dec`` (``apply_b_dec_to_input``)   ``W_dec`` ``(d_sae, d_in)``
sparsify    ``a = topk(relu(W (x - b_dec) + b))``,               ``encoder.weight``, ``W_dec`` ``(M, D)``
            ``x̂ = W_decᵀ a + b_dec`` (ReLU *before* top-k)
==========  ==================================================  ==========================================

Choices (exact, not approximations):

* **The scale is folded into the biases**: ReLU and top-k are positively homogeneous, so
  ``c · act(W_enc (x/c - b_dec) + b_enc) = act(W_enc (x - c b_dec) + c b_enc)``. The exported SAE reads
  raw activations and writes raw reconstructions, keeps ``W_enc`` and the unit-norm decoder rows as
  they are (so sparsify's ``normalize_decoder`` stays true), and its latents are ``c`` times ours.
  (SAELens's own ``fold_activation_norm_scaling_factor`` folds into the weights instead, which
  changes the decoder norms.) ``c`` travels in the metadata and import divides it out again.
* **Top-k with ReLU before or after the selection** gives the same latents: only when fewer than k
  pre-activations are positive do the two pick different *zero-valued* entries.
* **A ReLU SAE in sparsify's format** is a Top-k SAE with ``k = num_latents``: keeping every latent of
  ``relu(pre)`` is the ReLU SAE itself. Import maps ``k >= num_latents`` back to a ReLU SAE.
* **The tied theory SAE** (``x_m = relu(W_m x_p)``, ``x̂ = W_mᵀ x_m``) is exported untied
  (``W_enc = W_dec = W_m``, zero biases; SAELens ``"standard"``, sparsify ``k = n_m``) and comes back
  as a :class:`~wsae_core.models.TheorySAE` when the metadata says so and the weights are still tied
  with zero biases (otherwise as the untied ReLU SAE it has become).
* **Γ of a WSAE** (and α, the layer, the method, the full :class:`~wsae_core.models.SAEConfig`) travel
  in a ``"wsae"`` block: SAELens's free-form ``metadata``, an extra key of sparsify's ``cfg.json``
  (its loader drops unknown keys). Γ is stored as the float32 values' exact decimal form.
* **Hook names** for the residual stream after block L (:mod:`wsae_core.lm`'s hook point):
  SAELens/TransformerLens ``blocks.L.hook_resid_post``; sparsify ``layers.L`` (module path under the
  Hugging Face model's ``base_model``, as sparsify names hook points).

Not representable here (clear errors on import): SAELens architectures other than standard/topk
(JumpReLU, gated, ...) and run-time normalisations (``layer_norm``, ``constant_norm_rescale``);
sparsify ``groupmax``, skip connections and transcoders.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import __version__
from .models import PracticalSAE, SAEConfig, TheorySAE, build_sae
from .train import _RESERVED as _SAVE_RESERVED, load_sae, save_sae
from .weights import validate_gamma

__all__ = [
    "Format",
    "FORMATS",
    "PortableSAE",
    "saelens_hook_name",
    "sparsify_hookpoint",
    "detect_format",
    "load",
    "to_saelens",
    "to_sparsify",
    "to_wsae",
]

Format = Literal["wsae", "saelens", "sparsify"]
FORMATS: tuple[str, ...] = ("wsae", "saelens", "sparsify")

_WEIGHTS = {"wsae": "model.safetensors", "saelens": "sae_weights.safetensors", "sparsify": "sae.safetensors"}
# cfg.json layout of SAELens >= 6 (a "metadata" block, an "architecture" key); older versions are
# converted by SAELens's loader, so the field must say which layout this is.
_SAELENS_LAYOUT = "6.0.0"
_WSAE_BLOCK = "wsae"


def saelens_hook_name(layer: int) -> str:
    """TransformerLens name of the residual stream after block ``layer`` (SAELens's ``hook_name``)."""
    return f"blocks.{int(layer)}.hook_resid_post"


def sparsify_hookpoint(layer: int) -> str:
    """sparsify's name of the output of block ``layer`` (a module path under ``base_model``)."""
    return f"layers.{int(layer)}"


@dataclass
class PortableSAE:
    """An SAE with what is needed to apply it to a model's raw activations, in any format.

    ``model`` reads ``x / scale`` (``x``: ``(batch, n_p)`` raw activations) and :meth:`reconstruct`
    returns raw reconstructions. ``gamma``: the WSAE weights Γ ``(n_p,)`` it was trained with (None
    for a plain SAE or unknown). ``meta``: provenance (``model_name``, ``layer``, ``method``,
    ``alpha``, ``hook_name``, ``hookpoint``, ``source_format``, ...).
    """

    model: TheorySAE | PracticalSAE
    scale: float = 1.0
    gamma: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.model, (TheorySAE, PracticalSAE)):
            raise TypeError(f"model must be a TheorySAE or PracticalSAE, got {type(self.model).__name__}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale!r}")
        self.scale = float(self.scale)
        if self.gamma is not None:
            self.gamma = validate_gamma(self.gamma, self.model.cfg.n_p)

    @property
    def layer(self) -> int | None:
        return self.meta.get("layer")

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Dense latents ``(batch, n_m)`` of raw activations ``x`` ``(batch, n_p)`` (in this library's units)."""
        return self.model.encode(x / self.scale)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Raw reconstruction ``(batch, n_p)`` of raw activations ``x`` ``(batch, n_p)``."""
        return self.model(x / self.scale).reconstruction * self.scale

    def wsae_block(self) -> dict[str, Any]:
        """The provenance block written into the other formats' metadata."""
        meta = {k: v for k, v in self.meta.items() if k not in ("source_format", "source_path")}
        return {
            "library": f"wsae_core {__version__}",
            "sae": self.model.cfg.to_dict(),
            "scale": self.scale,
            "gamma": None if self.gamma is None else [float(g) for g in self.gamma],
            **meta,
        }


# ----------------------------------------------------------------------------- weights in raw units


def _raw_weights(sae: PortableSAE) -> dict[str, Tensor]:
    """``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` of the raw-activation SAE (scale folded into the
    biases; the theory SAE untied with zero biases). ``W_*``: ``(n_m, n_p)``."""
    m = sae.model
    if isinstance(m, TheorySAE):
        W = m.W_m.detach().float().cpu()
        return {"W_enc": W.clone(), "b_enc": torch.zeros(W.shape[0]), "W_dec": W.clone(), "b_dec": torch.zeros(W.shape[1])}
    c = sae.scale
    return {
        "W_enc": m.W_enc.detach().float().cpu().clone(),
        "b_enc": (m.b_enc.detach().double().cpu() * c).float(),
        "W_dec": m.W_dec.detach().float().cpu().clone(),
        "b_dec": (m.b_dec.detach().double().cpu() * c).float(),
    }


def _from_raw(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, *, k: int | None, scale: float,
              block: dict[str, Any] | None, where: Path) -> TheorySAE | PracticalSAE:
    """Rebuild our model (reading ``x / scale``) from raw-unit weights ``(n_m, n_p)``; the kind, seed
    and the other config fields come from the ``wsae`` block when there is one."""
    n_m, n_p = W_enc.shape
    for name, t, shape in (("W_dec", W_dec, (n_m, n_p)), ("b_enc", b_enc, (n_m,)), ("b_dec", b_dec, (n_p,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: {name} must have shape {shape} to match W_enc {(n_m, n_p)}, got {tuple(t.shape)}")
    cfg = dict((block or {}).get("sae") or {})
    if cfg and (cfg.get("n_m"), cfg.get("n_p")) != (n_m, n_p):
        raise ValueError(f"{where}: the wsae metadata describes n_m, n_p = {cfg.get('n_m')}, {cfg.get('n_p')} "
                         f"but the weights are {n_m} x {n_p}")
    tied = torch.equal(W_enc, W_dec) and not b_enc.any() and not b_dec.any()
    kind = "relu" if k is None or k >= n_m else "topk"
    if cfg.get("kind") == "theory" and tied and kind == "relu":
        model = TheorySAE(SAEConfig(n_p=n_p, n_m=n_m, kind="theory", init_scale=cfg.get("init_scale", 1.0),
                                    seed=cfg.get("seed", 0)))
        model.load_state_dict({"W_m": W_dec.float()})
        return model
    keep = {f: cfg[f] for f in ("init_scale", "seed") if f in cfg}
    if kind == "relu" and cfg.get("kind") == "relu":
        keep["l1_coeff"] = cfg.get("l1_coeff", 0.0)
    model = PracticalSAE(SAEConfig(n_p=n_p, n_m=n_m, kind=kind, k=k if kind == "topk" else None, **keep))
    model.load_state_dict({
        "W_enc": W_enc.float(),
        "b_enc": (b_enc.double() / scale).float(),
        "W_dec": W_dec.float(),
        "b_dec": (b_dec.double() / scale).float(),
    })
    return model


def _portable(model, block: dict[str, Any] | None, scale: float | None, meta: dict[str, Any]) -> PortableSAE:
    block = block or {}
    gamma = block.get("gamma")
    keep = {k: v for k, v in block.items() if k not in ("library", "sae", "scale", "gamma")}
    return PortableSAE(model, scale, None if gamma is None else torch.tensor(gamma, dtype=torch.float32), {**keep, **meta})


def _scale_of(block: dict[str, Any] | None, scale: float | None) -> float:
    if scale is not None:
        return float(scale)
    return float((block or {}).get("scale") or 1.0)


# ----------------------------------------------------------------------------- SAELens


def to_saelens(sae: PortableSAE, path: str | Path, *, model_name: str | None = None, hook_name: str | None = None,
               metadata: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` as a SAELens SAE into folder ``path`` (``cfg.json`` + ``sae_weights.safetensors``).

    Architecture ``"topk"`` (``k``, ``rescale_acts_by_decoder_norm=False``) for a Top-k SAE, else
    ``"standard"``; ``apply_b_dec_to_input=True``, ``normalize_activations="none"`` (the scale is
    folded in). ``model_name`` and ``hook_name`` default to the SAE's ``meta`` (``model_name``, and
    :func:`saelens_hook_name` of its ``layer``). ``metadata`` adds SAELens metadata fields
    (``context_size``, ``prepend_bos``, ``dataset_path``, ...).
    """
    path = Path(path)
    w = _raw_weights(sae)
    cfg = sae.model.cfg
    meta_in = sae.meta
    model_name = model_name or meta_in.get("model_name")
    if hook_name is None and meta_in.get("layer") is not None:
        hook_name = saelens_hook_name(meta_in["layer"])
    out: dict[str, Any] = {
        "architecture": "topk" if cfg.kind == "topk" else "standard",
        "d_in": cfg.n_p,
        "d_sae": cfg.n_m,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if cfg.kind == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    out["metadata"] = {
        "sae_lens_version": _SAELENS_LAYOUT,
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        **(metadata or {}),
        _WSAE_BLOCK: sae.wsae_block(),
    }
    path.mkdir(parents=True, exist_ok=True)
    # SAELens's parameters: W_enc (d_in, d_sae), W_dec (d_sae, d_in).
    save_file({"W_enc": w["W_enc"].T.contiguous(), "b_enc": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]},
              str(path / _WEIGHTS["saelens"]))
    (path / "cfg.json").write_text(json.dumps(out, indent=2) + "\n")
    return path


def _load_saelens(path: Path, scale: float | None) -> PortableSAE:
    cfg = json.loads((path / "cfg.json").read_text())
    meta = cfg.get("metadata") or {}
    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "topk"):
        raise ValueError(f"{path}: SAELens architecture must be 'standard' or 'topk' to import, got {arch!r}")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "expected_average_only_in"):
        raise ValueError(f"{path}: normalize_activations must be 'none' or 'expected_average_only_in' "
                         f"(a fixed scale), got {norm!r}: a per-token run-time normalisation has no equivalent here")
    if norm == "expected_average_only_in" and scale is None:
        raise ValueError(f"{path}: this SAE expects activations scaled by a factor that its folder does not hold "
                         "(normalize_activations='expected_average_only_in'); pass scale=1/factor")
    if cfg.get("reshape_activations", "none") != "none":
        raise ValueError(f"{path}: reshape_activations must be 'none', got {cfg['reshape_activations']!r}")
    st = load_file(str(path / _WEIGHTS["saelens"]))
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in st]
    if missing:
        raise ValueError(f"{path}: {_WEIGHTS['saelens']} lacks {missing}; expected W_enc, b_enc, W_dec, b_dec")
    W_enc = st["W_enc"].double().T  # (d_sae, d_in)
    b_enc, W_dec, b_dec = st["b_enc"].double(), st["W_dec"].double(), st["b_dec"].double()
    if not cfg.get("apply_b_dec_to_input", True):
        # pre = x W_enc + b_enc = W_enc (x - b_dec) + (b_enc + W_enc b_dec)
        b_enc = b_enc + W_enc @ b_dec
    k = None
    if arch == "topk":
        k = int(cfg["k"])
        if cfg.get("rescale_acts_by_decoder_norm"):
            # Selection on pre * |W_dec row|, decoding with rows / |row|: fold the norms in.
            n = W_dec.norm(dim=1)
            W_enc, b_enc, W_dec = W_enc * n[:, None], b_enc * n, W_dec / n[:, None]
    block = meta.get(_WSAE_BLOCK)
    c = _scale_of(block, scale)
    model = _from_raw(W_enc.float(), b_enc.float(), W_dec.float(), b_dec.float(), k=k, scale=c, block=block, where=path)
    info = {"model_name": meta.get("model_name"), "hook_name": meta.get("hook_name")}
    return _portable(model, block, c, {**{k_: v for k_, v in info.items() if v is not None},
                                       "source_format": "saelens", "source_path": str(path)})


# ----------------------------------------------------------------------------- sparsify


def to_sparsify(sae: PortableSAE, root: str | Path, *, hookpoint: str | None = None,
                model_name: str | None = None) -> Path:
    """Write ``sae`` as a sparsify SAE into ``root/<hookpoint>/`` (``cfg.json`` + ``sae.safetensors``).

    ``hookpoint`` defaults to :func:`sparsify_hookpoint` of the SAE's ``layer``. A Top-k SAE keeps its
    ``k``; a ReLU or theory SAE is written with ``k = num_latents`` (the same map, see the module
    docstring). ``normalize_decoder`` is true for our practical SAEs (unit-norm decoder rows), false
    for the theory SAE. Returns the hook point's folder.
    """
    if hookpoint is None:
        if sae.meta.get("layer") is None:
            raise ValueError("hookpoint must be given for an SAE without a layer in its meta")
        hookpoint = sparsify_hookpoint(sae.meta["layer"])
    if not hookpoint or "/" in hookpoint or hookpoint.startswith("."):
        raise ValueError(f"hookpoint must be a module path such as 'layers.3', got {hookpoint!r}")
    w = _raw_weights(sae)
    cfg = sae.model.cfg
    block = sae.wsae_block()
    if model_name or sae.meta.get("model_name"):
        block["model_name"] = model_name or sae.meta.get("model_name")
    out = {
        "activation": "topk",
        "expansion_factor": max(1, cfg.n_m // cfg.n_p),
        "normalize_decoder": cfg.kind != "theory",
        "num_latents": cfg.n_m,
        "k": cfg.k if cfg.kind == "topk" else cfg.n_m,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": cfg.n_p,
        _WSAE_BLOCK: block,
    }
    folder = Path(root) / hookpoint
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": w["W_enc"], "encoder.bias": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]},
              str(folder / _WEIGHTS["sparsify"]))
    (folder / "cfg.json").write_text(json.dumps(out, indent=2) + "\n")
    return folder


def _load_sparsify(path: Path, scale: float | None) -> PortableSAE:
    cfg = json.loads((path / "cfg.json").read_text())
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{path}: sparsify activation must be 'topk' to import, got {cfg['activation']!r}")
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag):
            raise ValueError(f"{path}: {flag} must be false to import as an SAE, got true")
    st = load_file(str(path / _WEIGHTS["sparsify"]))
    missing = [k for k in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if k not in st]
    if missing:
        raise ValueError(f"{path}: {_WEIGHTS['sparsify']} lacks {missing}; expected encoder.weight, encoder.bias, W_dec, b_dec")
    W_enc = st["encoder.weight"].float()
    d_in = int(cfg.get("d_in", W_enc.shape[1]))
    n_m = int(cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32)))
    if tuple(W_enc.shape) != (n_m, d_in):
        raise ValueError(f"{path}: encoder.weight must have shape ({n_m}, {d_in}) from cfg.json, got {tuple(W_enc.shape)}")
    block = cfg.get(_WSAE_BLOCK)
    c = _scale_of(block, scale)
    model = _from_raw(W_enc, st["encoder.bias"].float(), st["W_dec"].float(), st["b_dec"].float(),
                      k=int(cfg.get("k", 32)), scale=c, block=block, where=path)
    return _portable(model, block, c, {"hookpoint": path.name, "source_format": "sparsify", "source_path": str(path)})


# ----------------------------------------------------------------------------- our own format


def to_wsae(sae: PortableSAE, path: str | Path) -> Path:
    """Save as this library's folder (:func:`wsae_core.train.save_sae`), with ``scale``, ``gamma`` and
    the provenance in ``cfg.json``, so that :func:`load` and the language-model pipeline read it."""
    block = sae.wsae_block()
    rule = block.get("wsae") if isinstance(block.get("wsae"), dict) else {}
    extra = {k: v for k, v in block.items() if k not in ("library", "gamma") + _SAVE_RESERVED}
    if sae.gamma is None:
        return save_sae(sae.model, path, extra=extra)
    alpha = rule.get("alpha", block.get("alpha"))
    return save_sae(sae.model, path, extra=extra, gamma=sae.gamma, gamma_rule=rule.get("rule"),
                    alpha=None if alpha is None else float(alpha))


def _load_wsae(path: Path, scale: float | None) -> PortableSAE:
    model = load_sae(path)
    cfg = json.loads((path / "cfg.json").read_text())
    meta = {k: v for k, v in cfg.items() if k not in ("train_key", "scale", "gamma") + _SAVE_RESERVED}
    if model.gamma_rule is not None:
        meta["wsae"] = dict(model.gamma_rule)
    if "model" in meta and "model_name" not in meta:
        meta["model_name"] = meta.pop("model")
    alpha = (cfg.get("train_key") or {}).get("alpha", meta.get("alpha"))
    if alpha is not None:
        meta["alpha"] = alpha
    gamma = model.gamma if model.gamma is not None else cfg.get("gamma")
    c = float(scale if scale is not None else cfg.get("scale") or 1.0)
    return PortableSAE(model, c, None if gamma is None else torch.as_tensor(gamma, dtype=torch.float32),
                       {**meta, "source_format": "wsae", "source_path": str(path)})


# ----------------------------------------------------------------------------- any format


def detect_format(path: str | Path) -> str:
    """``"wsae"``, ``"saelens"`` or ``"sparsify"``: which weights file folder ``path`` holds beside its ``cfg.json``."""
    path = Path(path)
    if not (path / "cfg.json").is_file():
        raise FileNotFoundError(f"{path / 'cfg.json'} not found: expected an SAE folder "
                                f"(cfg.json + one of {sorted(_WEIGHTS.values())})")
    found = [f for f, name in _WEIGHTS.items() if (path / name).is_file()]
    if len(found) != 1:
        raise ValueError(f"{path} must hold exactly one of {sorted(_WEIGHTS.values())}, found {found or 'none'}")
    return found[0]


def load(path: str | Path, *, scale: float | None = None, device: str = "cpu") -> PortableSAE:
    """Import the SAE in folder ``path``, saved here, by SAELens or by sparsify (found by its files).

    ``scale`` overrides the scale the SAE divides raw activations by (default: the one in its
    metadata, else 1). Weights are read as float32.
    """
    path = Path(path)
    fmt = detect_format(path)
    sae = {"wsae": _load_wsae, "saelens": _load_saelens, "sparsify": _load_sparsify}[fmt](path, scale)
    sae.model.to(device).eval()
    return sae
