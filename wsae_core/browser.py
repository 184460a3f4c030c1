"""The latent browser's data: what a reader sees of sampled latents of an SAE and its WSAEs at one
layer (chapter *Latent browser*).

For every sampled latent of every SAE: its top-activating and activation-quantile contexts (the
windows :func:`wsae_core.interp.select_examples` gives the explainer, with the per-token
activations), the histogram of its non-zero activations, how often and in how many documents it
fires, the explanation and scores of an auto-interpretability run when there is one, and its
nearest latents in each other SAE by decoder cosine. :func:`build_latent_browser` computes it from
SAE folders in any format (:func:`wsae_core.interop.load`) and an activation cache
(:class:`wsae_core.activations.ActivationCache`); :func:`write_latent_browser` writes it as a
script the book's static viewer reads (``window.WSAE_LATENT_BROWSER = {...}``: a ``<script>`` tag
loads it from a page opened over ``file://`` too, where ``fetch`` of a JSON file is refused).

Sampling (seeded): latents that fire in at least ``n_activating_needed`` documents are *eligible*;
per SAE, ``n_latents`` of them: a random sample of the latents that have an explanation first, then
of the others (an explanation is attached only when the run that wrote it saw the latent fire in as
many documents as these weights do: an SAE retrained elsewhere can diverge, and its latent ``j`` is
then another feature; such explanations are counted in ``explanations_not_matching``); with
``paired`` the nearest eligible latent of each sampled one in every other SAE is added, so a reader
can follow a latent across the SAE and the WSAEs.

Compact by construction: a table of the token strings used, contexts as indices into it, and
activations as integers in 0..100 (percent of the latent's maximum).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .activations import ActivationCache
from .interop import PortableSAE, load
from .interp import NotEnoughExamples, SelectionConfig, select_examples

__all__ = ["BROWSER_SELECTION", "latent_codes", "nearest_latents", "explanations_by_latent",
           "build_latent_browser", "write_latent_browser", "read_latent_browser"]

#: Contexts shown per latent (when no explanation run says otherwise): 6 top, 4 quantile windows of
#: 12 tokens before and 4 after the strongest token; one held-out context each so the selection
#: runs (the browser does not show them).
BROWSER_SELECTION = SelectionConfig(n_explain_top=6, n_explain_quantile=4, n_score_activating=1,
                                    n_score_non_activating=1)
_VARIABLE = "WSAE_LATENT_BROWSER"
_SCORE_KEYS = ("score", "detection", "fuzzing", "detection_auc", "fuzzing_auc")


@torch.no_grad()
def latent_codes(sae: PortableSAE, x: torch.Tensor, doc_ids: np.ndarray, *, batch: int = 4096,
                 device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Firing statistics of every latent on raw activations ``x`` ``(n, n_p)`` from documents
    ``doc_ids`` ``(n,)``: ``(n_fired (n_m,), n_docs (n_m,))`` (tokens and distinct documents)."""
    n_m = sae.model.cfg.n_m
    n_fired = np.zeros(n_m, dtype=np.int64)
    pairs = []
    model = sae.model.to(device)
    for b in range(0, x.shape[0], batch):
        a = model.encode(x[b : b + batch].to(device) / sae.scale).cpu()
        on = a > 0
        n_fired += on.sum(0).numpy()
        rows, cols = on.nonzero(as_tuple=True)
        pairs.append(np.unique(cols.numpy() * (int(doc_ids.max()) + 1) + doc_ids[b + rows.numpy()]))
    n_docs = np.bincount(np.unique(np.concatenate(pairs)) // (int(doc_ids.max()) + 1), minlength=n_m)
    return n_fired, n_docs


@torch.no_grad()
def _columns(sae: PortableSAE, x: torch.Tensor, latents: Sequence[int], *, batch: int = 4096,
             device: str = "cpu") -> np.ndarray:
    """Activations ``(n, len(latents))`` of the chosen latents on raw activations ``x`` ``(n, n_p)``."""
    idx = torch.as_tensor(list(latents), dtype=torch.long)
    out = [sae.model.encode(x[b : b + batch].to(device) / sae.scale)[:, idx.to(device)].cpu()
           for b in range(0, x.shape[0], batch)]
    return torch.cat(out).numpy()


def nearest_latents(a: PortableSAE, b: PortableSAE, latents: Sequence[int], k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` latents of ``b`` whose decoder directions are closest (cosine) to each of
    ``latents`` of ``a``: ``(indices (len, k), cosines (len, k))``, best first."""
    da = torch.nn.functional.normalize(a.model.feature_directions().float().cpu()[list(latents)], dim=1)
    db = torch.nn.functional.normalize(b.model.feature_directions().float().cpu(), dim=1)
    if da.shape[1] != db.shape[1]:
        raise ValueError(f"the SAEs must read the same activations, got n_p = {da.shape[1]} and {db.shape[1]}")
    cos, idx = (da @ db.T).topk(min(k, db.shape[0]), dim=1)
    return idx.numpy(), cos.numpy()


def explanations_by_latent(results: Mapping[str, Any] | None, layer: int,
                           seed: int | None = None) -> dict[tuple[str, int], dict[str, Any]]:
    """``{(method, latent): {"explanation", scores..., "n_activating"}}`` for ``layer`` (and the SAE
    ``seed``, when given) from an auto-interpretability run's results, in either format:

    - an interp sweep's (``{"records": [{"layer", "method", "latent", "explanation", "score",
      "detection", "fuzzing", ..., "n_activating"}]}``, :func:`wsae_core.experiments.interp.run_sweep`):
      the scores are kept under their names;
    - a scoring run's (``{"spec": {"explainers"}, "records": [{"label", "layer", "seed", "latent",
      "explanation_<explainer>", "<scorer>_<explainer>", "n_activating"}]}``, every score an AUROC):
      ``"explanation"`` is the first explainer's text, ``"explainer"`` its name, ``"scores"``
      ``[{"scorer", "explainer", "auroc"}]`` and ``"explanations"`` the other explainers' texts
      (only when there are others).

    A record with a ``seed`` other than ``seed`` explained another SAE and is left out (a record
    without one is kept). ``n_activating`` (documents the latent fired in, as the run saw it) lets
    the browser check that the explanation was made for the same weights."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    order = list(((results or {}).get("spec") or {}).get("explainers") or [])
    for r in (results or {}).get("records", []):
        if r.get("layer") != layer or r.get("kind", "sae") != "sae":
            continue
        if seed is not None and r.get("seed") is not None and int(r["seed"]) != int(seed):
            continue
        explainers = sorted((k[len("explanation_"):] for k in r if k.startswith("explanation_") and r[k] is not None),
                            key=lambda e: (order.index(e) if e in order else len(order), e))
        if r.get("explanation") is not None:
            e = {"explanation": str(r["explanation"]),
                 **{k: r[k] for k in _SCORE_KEYS if _finite(r.get(k))}}
        elif explainers:
            e = {"explanation": str(r[f"explanation_{explainers[0]}"]), "explainer": explainers[0],
                 "scores": [{"scorer": k[: -len(x) - 1], "explainer": x, "auroc": _round(v)}
                            for x in explainers for k, v in r.items()
                            if k.endswith(f"_{x}") and not k.startswith(("explanation_", "seconds_")) and _finite(v)]}
            if len(explainers) > 1:
                e["explanations"] = {x: str(r[f"explanation_{x}"]) for x in explainers[1:]}
        else:
            continue
        if isinstance(r.get("n_activating"), int):
            e["n_activating"] = r["n_activating"]
        out[(str(r.get("method", r.get("label"))), int(r["latent"]))] = e
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _round(v: float, digits: int = 4) -> float:
    return float(f"{float(v):.{digits}g}")


def build_latent_browser(
    saes: Mapping[str, PortableSAE | str | Path],
    cache: ActivationCache,
    layer: int,
    vocab: Sequence[str],
    *,
    explanations: Mapping[str, Any] | None = None,
    sae_seed: int | None = None,
    n_latents: int = 12,
    paired: bool | Sequence[str] = True,
    contexts: range | None = None,
    skip_first: int = 1,
    n_neighbours: int = 5,
    n_bins: int = 24,
    selection: SelectionConfig | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool | None = None,
    description: str = "",
) -> dict[str, Any]:
    """The browser's data for the SAEs ``saes`` (``{name: SAE or folder}``, e.g. the SAE and its
    WSAEs) at ``layer`` of ``cache``.

    ``vocab[i]``: the text of token ``i`` (:func:`wsae_core.interp.token_strings`). ``explanations``:
    an auto-interpretability run's results (:func:`explanations_by_latent`), of the SAEs trained with
    seed ``sae_seed`` (other seeds' records are left out; an SAE whose metadata names another seed is
    an error); its ``selection`` settings are used for the contexts, so a reader sees the windows
    the explainer saw. Per SAE, ``n_latents`` eligible latents are sampled, explained ones first;
    ``paired``: add the nearest eligible latent of each in every other SAE (True: from every SAE; a
    list of names: from those SAEs' samples only, which keeps the data small when there are many
    SAEs). Activations are those of the tokens at positions ``>= skip_first`` of ``contexts`` (all
    by default).
    Returns a JSON-ready dict: ``{"layer", "sae_seed", "model", "description", "saes": [...], "tokens": [...],
    "latents": [...]}`` (see the module docstring).
    """
    from tqdm.auto import tqdm

    if not saes:
        raise ValueError("saes must name at least one SAE")
    names = list(saes)
    loaded = {n: s if isinstance(s, PortableSAE) else load(s, device=device) for n, s in saes.items()}
    n_p = {n: s.model.cfg.n_p for n, s in loaded.items()}
    if set(n_p.values()) != {cache.d_model}:
        raise ValueError(f"every SAE must read d_model = {cache.d_model} activations of the cache, got {n_p}")
    if sae_seed is not None:
        other = {n: s.meta.get("seed") for n, s in loaded.items() if s.meta.get("seed") not in (None, sae_seed)}
        if other:
            raise ValueError(f"sae_seed is {sae_seed} but these SAEs were trained with other seeds: {other}")
    pairing = names if paired is True else list(paired or [])
    if set(pairing) - set(names):
        raise ValueError(f"paired names SAEs that are not given: {sorted(set(pairing) - set(names))}; SAEs: {names}")
    if selection is None:
        # An interp sweep keeps its selection at the top level, a scoring run in its spec.
        given = (explanations or {}).get("selection") or ((explanations or {}).get("spec") or {}).get("selection")
        selection = SelectionConfig(**given) if given else BROWSER_SELECTION
    expl = explanations_by_latent(explanations, layer, sae_seed)
    n_ctx_all = cache.tokens.shape[0]
    ctx = range(n_ctx_all) if contexts is None else contexts
    tokens, docs = cache.tokens[ctx.start : ctx.stop], cache.doc_ids[ctx.start : ctx.stop]
    T = cache.context_len
    x = cache.activations(layer, skip_first, ctx)
    row_doc = docs[:, skip_first:].reshape(-1)
    rng = np.random.default_rng([seed, layer])
    bar = tqdm(total=2 * len(names), desc="latent browser", unit="pass", disable=None if progress is None else not progress)

    stats, chosen = {}, {}
    for name in names:
        stats[name] = latent_codes(loaded[name], x, row_doc, device=device)
        eligible = np.flatnonzero(stats[name][1] >= selection.n_activating_needed)
        explained = np.array(sorted(j for (m, j) in expl if m == name), dtype=np.int64)
        first = rng.permutation(np.intersect1d(explained, eligible))[:n_latents]
        rest = rng.permutation(np.setdiff1d(eligible, explained))[: n_latents - len(first)]
        chosen[name] = [*map(int, first), *map(int, rest)]
        bar.update(1)
    if pairing:  # the nearest eligible latent of each sampled one, in every other SAE
        sampled = {n: list(c) for n, c in chosen.items()}
        for a in pairing:
            for b in (b for b in names if b != a and sampled[a]):
                idx, _ = nearest_latents(loaded[a], loaded[b], sampled[a], n_neighbours)
                ok = stats[b][1] >= selection.n_activating_needed
                for row in idx:
                    best = next((int(t) for t in row if ok[int(t)]), None)
                    if best is not None and best not in chosen[b]:
                        chosen[b].append(best)
    neighbours = {(a, b): dict(zip(chosen[a], zip(*nearest_latents(loaded[a], loaded[b], chosen[a], n_neighbours))))
                  for a in names for b in names if b != a and chosen[a]}

    table: dict[int, int] = {}

    def tok(t: int) -> int:
        return table.setdefault(int(t), len(table))

    out_latents = []
    mismatched = dict.fromkeys(names, 0)
    for name in names:
        sae = loaded[name]
        n_fired, n_docs = stats[name]
        cols = _columns(sae, x, chosen[name], device=device)
        for c, j in enumerate(chosen[name]):
            acts = np.zeros((len(tokens), T), dtype=np.float32)
            acts[:, skip_first:] = cols[:, c].reshape(len(tokens), T - skip_first)
            try:
                ex = select_examples(tokens, acts, doc_ids=docs, config=selection, latent=j)
            except NotEnoughExamples:
                continue
            top = max(float(ex.max_activation), 1e-30)

            def window(e):
                return {"t": [tok(t) for t in e.token_ids],
                        "a": [int(round(100 * v / top)) for v in np.clip(e.activations, 0, None)],
                        "doc": int(docs[e.context, e.start])}

            vals = cols[:, c][cols[:, c] > 0]
            counts, _ = np.histogram(vals, bins=n_bins, range=(0.0, top))
            rec: dict[str, Any] = {
                "sae": names.index(name), "id": int(j),
                "frequency": _round(n_fired[j] / x.shape[0]), "n_docs": int(n_docs[j]),
                "max": _round(top * sae.scale),  # in the model's raw units
                "hist": counts.astype(int).tolist(),
                "top": [window(e) for e in ex.explain[: selection.n_explain_top]],
                "quantiles": [window(e) for e in ex.explain[selection.n_explain_top :]],
                "neighbours": {str(names.index(b)): [[int(i), _round(cs, 3)] for i, cs in zip(*neighbours[(name, b)][j])]
                               for b in names if b != name},
            }
            if (name, j) in expl:
                e = dict(expl[(name, j)])
                # A run on other weights (a retrained, chaotically diverged SAE) explained another
                # latent under this index: its explanation must not be shown as this one's.
                if e.pop("n_activating", ex.n_activating) == ex.n_activating:
                    rec.update(e)
                else:
                    rec["explanation_withheld"] = True
                    mismatched[name] += 1
            out_latents.append(rec)
        bar.update(1)
    bar.close()
    inv = sorted(table, key=table.get)
    return {
        "version": 1,
        "layer": int(layer),
        "sae_seed": sae_seed,
        "model": cache.meta["key"]["model"],
        "description": description,
        "n_tokens": int(x.shape[0]),
        "selection": {"top": selection.n_explain_top, "quantiles": selection.n_explain_quantile,
                      "window_before": selection.window_before, "window_after": selection.window_after},
        "saes": [{"name": n, "n_latents": loaded[n].model.cfg.n_m, "kind": loaded[n].model.cfg.kind,
                  "k": loaded[n].model.cfg.k,
                  # a WSAE saved by this library keeps α in its rule's block
                  "alpha": loaded[n].meta.get("alpha", (loaded[n].meta.get("wsae") or {}).get("alpha")),
                  "eligible": int((stats[n][1] >= selection.n_activating_needed).sum()),
                  "dead_fraction": _round(float((stats[n][0] == 0).mean())),
                  "explanations_not_matching": mismatched[n]} for n in names],
        "tokens": [vocab[t] for t in inv],
        "latents": out_latents,
    }


def write_latent_browser(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``data`` as ``window.WSAE_LATENT_BROWSER = {...};`` (a script the viewer page loads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "</" inside a string would end an inline script; harmless in a file, escaped all the same.
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    path.write_text(f"window.{_VARIABLE} = {text};\n", encoding="utf-8")
    return path


def read_latent_browser(path: str | Path) -> dict[str, Any]:
    """The data of a file written by :func:`write_latent_browser`."""
    text = Path(path).read_text(encoding="utf-8").strip()
    head = f"window.{_VARIABLE} = "
    if not (text.startswith(head) and text.endswith(";")):
        raise ValueError(f"{path} is not a latent browser data file (expected it to start with {head!r})")
    return json.loads(text[len(head) : -1])
