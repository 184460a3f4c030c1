"""On-disk activation cache: residual-stream activations of a language model, sharded, resumable,
reused across runs and read back in a seeded shuffled order (chapter *SAEs and WSAEs on a language
model*).

Layout of one cache (a folder named by a hash of its key: model, layers, corpus digest, context
length, token count, dtype)::

    meta.json              the key, shapes, label names; ``complete`` and timings once finished
    shard_00000/           one shard = ``shard_contexts`` consecutive contexts, written to
        tokens.npy         ``shard_00000.tmp/`` and renamed when complete (atomic), so a crash
        doc_ids.npy        mid-way leaves only whole shards and a rebuild resumes after them
        labels.npy
        layer_3.npy        (n_contexts_in_shard * context_len, d_model) float32, float16 or bfloat16
        ...
        manifest.json      every file's size and SHA-256: a shard that fails them is rebuilt, not read

Shards are plain ``.npy`` files opened as memory maps, so reading a random batch touches only its
rows: the shuffle is a seeded permutation over all tokens of all shards, applied at read time.
``dtype="bfloat16"`` halves the disk and the bytes read per batch (numpy has no bfloat16: the
``.npy`` holds the bf16 bit patterns as uint16, and reads reinterpret them in torch); training reads
any storage dtype as fp32 or bf16 (:class:`CacheSource`).
The root folder is ``$WSAE_CACHE_DIR`` or ``~/.cache/wsae_core`` (never inside the repository).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from numbers import Integral
from typing import Any

import numpy as np
import torch

from .checks import (CorruptFileError, NonFiniteError, check_finite, nonfinite_location, read_json, verify_files,
                     write_bytes, write_json)
from .corpus import Contexts
from .lm import LM, capture_residuals

__all__ = ["CACHE_ENV", "cache_root", "cache_key", "build_activation_cache", "ActivationCache", "CacheSource", "norm_scale"]

CACHE_ENV = "WSAE_CACHE_DIR"
FORMAT_VERSION = 2  # 2: per-shard manifests with sizes and SHA-256
# Storage dtype -> numpy dtype of the .npy (bfloat16 as its uint16 bit patterns) and torch dtype of a row.
_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """``x`` as the numpy array stored for ``dtype`` (bf16 rounds to nearest, kept as uint16 bits)."""
    x = x.detach().cpu().to(_TORCH_DTYPES[dtype])
    return x.view(torch.uint16).numpy() if dtype == "bfloat16" else x.numpy()


def _as_float(a: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows as float values (bf16 bit patterns widened exactly to fp32)."""
    return np.left_shift(a, 16, dtype=np.uint32).view(np.float32) if dtype == "bfloat16" else a


def cache_root(root: str | Path | None = None) -> Path:
    """``root``, else ``$WSAE_CACHE_DIR``, else ``~/.cache/wsae_core``."""
    if root is not None:
        return Path(root)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "wsae_core"


def cache_key(model: str, layers: Sequence[int], contexts: Contexts, dtype: str = "float32",
              forward: str = "fp32") -> dict[str, Any]:
    """Everything that determines the cached numbers (the folder name is a hash of it).

    ``forward`` is the LM's compute precision (``"fp32"`` or ``"bf16"`` autocast); it enters the key
    only when not fp32, so existing fp32 caches keep their folders.
    """
    extra = {} if forward == "fp32" else {"forward": forward}
    return {
        "version": FORMAT_VERSION,
        "model": str(model),
        "layers": sorted(int(l) for l in layers),
        "corpus": contexts.spec,
        "corpus_digest": contexts.digest(),
        "context_len": int(contexts.tokens.shape[1]),
        "n_tokens": contexts.n_tokens,
        "dtype": dtype,
        **extra,
    }


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _shard_ok(folder: Path, digest: str, s: int, lo: int, hi: int) -> bool:
    """Whether ``folder`` is a complete, unaltered shard ``s`` (contexts ``lo:hi``) of cache ``digest``."""
    try:
        man = read_json(folder / "manifest.json", "activation-cache shard manifest")
        if man.get("key_digest") != digest or man.get("shard") != s or man.get("contexts") != [lo, hi]:
            return False
        verify_files(folder, man.get("files"), f"activation-cache shard {s}")
        return True
    except (OSError, CorruptFileError, AttributeError):
        return False


def _check_build_args(lm: LM, contexts: Contexts, layers: Any, shard_contexts: Any, batch_size: Any, dtype: Any) -> list[int]:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    for name, v in (("shard_contexts", shard_contexts), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(contexts, Contexts) or contexts.tokens.ndim != 2 or contexts.tokens.size == 0:
        raise ValueError("contexts must be non-empty Contexts from wsae_core.corpus.tokenize_contexts")
    try:
        out = sorted({int(l) for l in layers})
    except (TypeError, ValueError) as err:
        raise ValueError(f"layers must be a sequence of block indices, got {layers!r}") from err
    bad = [l for l in out if not 0 <= l < lm.n_layers]
    if not out or bad:
        raise ValueError(f"layers must be a non-empty list of blocks in [0, {lm.n_layers - 1}] of {lm.name}, got {list(layers)!r}")
    return out


def build_activation_cache(
    lm: LM,
    contexts: Contexts,
    layers: Sequence[int],
    *,
    root: str | Path | None = None,
    shard_contexts: int = 64,
    batch_size: int = 16,
    dtype: str = "float32",
    verbose: bool = False,
) -> "ActivationCache":
    """Run ``lm`` over ``contexts`` once and store the residual stream after every block in ``layers``.

    Returns the existing cache when one with the same key is complete (reuse); resumes after the
    complete shards when a previous build stopped mid-way, even by SIGKILL (resume, with the shard
    size of that build). Every existing shard is checked against its manifest (sizes and SHA-256):
    a truncated or altered shard is rebuilt, never read. One forward pass per batch fills every
    layer (:func:`wsae_core.lm.capture_residuals`), stopping after the last requested block.

    A NaN/Inf from the model stops the build with :class:`~wsae_core.checks.NonFiniteError` naming
    the layer, context, position and dimension; a full disk raises ``OSError`` (``ENOSPC``) naming
    the shard. In both cases the shards already written stay and a rerun resumes after them.
    """
    layers = _check_build_args(lm, contexts, layers, shard_contexts, batch_size, dtype)
    key = cache_key(lm.name, layers, contexts, dtype, "bf16" if lm.compute_dtype == torch.bfloat16 else "fp32")
    digest = _digest(key)
    folder = cache_root(root) / "activations" / digest
    meta_path = folder / "meta.json"
    old = None
    if meta_path.is_file():
        try:
            old = read_json(meta_path, "activation-cache metadata")
        except CorruptFileError:
            old = None  # rewritten below; the shards are checked against their own manifests
        if isinstance(old, dict) and old.get("key") not in (None, key):
            raise RuntimeError(f"cache folder {folder} holds a different key; delete it")
        if isinstance(old, dict) and isinstance(old.get("shard_contexts"), int) and old["shard_contexts"] > 0:
            shard_contexts = old["shard_contexts"]  # resume with the shard size already on disk
    folder.mkdir(parents=True, exist_ok=True)
    n_ctx, T = contexts.tokens.shape
    n_shards = -(-n_ctx // shard_contexts)
    meta = {
        "key": key,
        "layers": layers,
        "d_model": lm.d_model,
        "context_len": T,
        "n_contexts": n_ctx,
        "shard_contexts": shard_contexts,
        "n_shards": n_shards,
        "label_names": contexts.label_names,
        "titles": contexts.titles,
        "complete": False,
    }
    for tmp in folder.glob("shard_*.tmp"):
        shutil.rmtree(tmp)  # an incomplete shard from a crash: redo it
    plan = [(s, s * shard_contexts, min(n_ctx, (s + 1) * shard_contexts)) for s in range(n_shards)]
    todo = [(s, lo, hi) for s, lo, hi in plan if not _shard_ok(folder / f"shard_{s:05d}", digest, s, lo, hi)]
    if not todo and isinstance(old, dict) and old.get("complete"):
        return ActivationCache(folder, _verified=True)
    write_json(meta_path, meta)
    t0 = time.perf_counter()
    computed = 0
    for s, lo, hi in todo:
        final = folder / f"shard_{s:05d}"
        if final.exists():
            if verbose:
                print(f"shard {s + 1}/{n_shards} does not match its manifest: rebuilding it", flush=True)
            shutil.rmtree(final)
        acts = {l: [] for l in layers}
        for b in range(lo, hi, batch_size):
            ids = torch.from_numpy(contexts.tokens[b : min(hi, b + batch_size)])
            out = capture_residuals(lm, ids, layers)
            for l in layers:
                loc = nonfinite_location(out[l])
                if loc is not None:
                    (i, pos, dim), v = loc
                    raise NonFiniteError(
                        f"{lm.name} produced {v} in the residual stream after block {l} at context {b + i}, "
                        f"position {pos}, dimension {dim} (shard {s}); nothing of this shard was written, "
                        f"the {s} shard(s) before it are kept")
                acts[l].append(_to_storage(out[l].reshape(-1, out[l].shape[-1]), dtype))
        tmp = folder / f"shard_{s:05d}.tmp"
        tmp.mkdir()
        arrays = {"tokens.npy": contexts.tokens[lo:hi].astype(np.int32),
                  "doc_ids.npy": contexts.doc_ids[lo:hi].astype(np.int32),
                  "labels.npy": contexts.labels[lo:hi].astype(np.int16),
                  **{f"layer_{l}.npy": np.concatenate(acts[l]) for l in layers}}
        try:
            files = {name: write_bytes(tmp / name, _npy_bytes(a)) for name, a in arrays.items()}
            write_json(tmp / "manifest.json", {"key_digest": digest, "shard": s, "contexts": [lo, hi], "files": files})
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if err.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"no space left on the device while writing shard {s + 1}/{n_shards} "
                              f"of the activation cache {folder}; the complete shards are kept and a rerun "
                              f"resumes after them: free space and run again") from err
            raise
        os.replace(tmp, final)
        computed += hi - lo
        if verbose:
            print(f"shard {s + 1}/{n_shards} written ({(hi - lo) * T:,} tokens)", flush=True)
    seconds = time.perf_counter() - t0
    meta.update(
        complete=True,
        build_seconds=round(seconds, 2),
        tokens_computed=computed * T,
        tokens_per_second=round(computed * T / seconds, 1) if computed else None,
        bytes=sum(f.stat().st_size for f in folder.rglob("*.npy")),
    )
    write_json(meta_path, meta)
    return ActivationCache(folder, _verified=True)


class ActivationCache:
    """Read side of a complete cache: memory-mapped shards, per-token metadata, shuffled batches.

    Opening checks every shard's files against its manifest by size, and the token files by
    SHA-256; each layer file is checked by SHA-256 and for NaN/Inf the first time it is read
    (:class:`~wsae_core.checks.CorruptFileError` / :class:`~wsae_core.checks.NonFiniteError`, naming
    the shard, file and row). ``build_activation_cache`` rebuilds what fails these checks.
    """

    def __init__(self, folder: str | Path, *, _verified: bool = False):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no activation cache at {self.folder} (meta.json missing)")
        self.meta = read_json(meta_path, "activation-cache metadata")
        if not isinstance(self.meta, dict) or not self.meta.get("complete"):
            raise RuntimeError(f"activation cache {self.folder} is incomplete; rerun build_activation_cache to resume")
        if self.meta.get("key", {}).get("version") != FORMAT_VERSION:
            raise CorruptFileError(f"activation cache {self.folder} has format {self.meta.get('key', {}).get('version')}, "
                                   f"this version reads {FORMAT_VERSION}: rerun build_activation_cache")
        self.layers: list[int] = self.meta["layers"]
        self.d_model: int = self.meta["d_model"]
        self.context_len: int = self.meta["context_len"]
        self.label_names: list[str] = self.meta["label_names"]
        self.titles: list[str] = self.meta["titles"]
        shards = [self.folder / f"shard_{s:05d}" for s in range(self.meta["n_shards"])]
        self._shards = shards
        self._files: list[dict] = []
        for s, shard in enumerate(shards):
            what = f"activation-cache shard {s}"
            if not (shard / "manifest.json").is_file():
                raise CorruptFileError(f"{what} at {shard} is missing or has no manifest.json: rerun build_activation_cache")
            man = read_json(shard / "manifest.json", what)
            files = man.get("files") if isinstance(man, dict) else None  # verify_files refuses None
            verify_files(shard, files, what, checksum=False)
            verify_files(shard, files, what, names=["tokens.npy", "doc_ids.npy", "labels.npy"], checksum=not _verified)
            self._files.append(files)
        self._verified: set[tuple[int, int]] = {(s, l) for s in range(len(shards)) for l in self.layers} if _verified else set()
        self.tokens = np.concatenate([np.load(s / "tokens.npy") for s in shards]).astype(np.int64)
        self.doc_ids = np.concatenate([np.load(s / "doc_ids.npy") for s in shards]).astype(np.int64)
        self.labels = np.concatenate([np.load(s / "labels.npy") for s in shards]).astype(np.int64)
        rows = [self.meta["shard_contexts"] * self.context_len] * len(shards)
        rows[-1] = self.tokens.size - sum(rows[:-1])
        self._offsets = np.concatenate([[0], np.cumsum(rows)])
        self._maps: dict[int, list[np.ndarray]] = {}

    def __repr__(self) -> str:
        return (f"ActivationCache({self.meta['key']['model']}, layers={self.layers}, "
                f"tokens={self.n_tokens:,}, {self.nbytes / 2**20:.0f} MiB at {self.folder})")

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)

    @property
    def nbytes(self) -> int:
        return int(self.meta.get("bytes", 0))

    def _layer_maps(self, layer: int) -> list[np.ndarray]:
        if layer not in self.layers:
            raise ValueError(f"layer must be one of the cached layers {self.layers}, got {layer}")
        if layer not in self._maps:
            maps = []
            for s, shard in enumerate(self._shards):
                name = f"layer_{layer}.npy"
                if (s, layer) not in self._verified:
                    verify_files(shard, self._files[s], f"activation-cache shard {s}", names=[name])
                m = np.load(shard / name, mmap_mode="r")
                if m.shape != (int(self._offsets[s + 1] - self._offsets[s]), self.d_model):
                    raise CorruptFileError(f"{shard / name} has shape {m.shape}, expected "
                                           f"({int(self._offsets[s + 1] - self._offsets[s])}, {self.d_model})")
                if (s, layer) not in self._verified:
                    # a bf16 shard holds uint16 bit patterns: checked as the fp32 values they stand for
                    loc = nonfinite_location(_as_float(m, self.dtype))
                    if loc is not None:
                        row = int(self._offsets[s]) + loc[0][0]
                        raise NonFiniteError(
                            f"{shard / name} holds {loc[1]} at row {loc[0][0]} (context {row // self.context_len}, "
                            f"position {row % self.context_len}, dimension {loc[0][1]}); rebuild the cache")
                    self._verified.add((s, layer))
                maps.append(m)
            self._maps[layer] = maps
        return self._maps[layer]

    def token_indices(self, skip_first: int = 0, contexts: range | None = None) -> np.ndarray:
        """Flat indices (context * context_len + position) of the tokens at positions >= ``skip_first``,
        in the contexts ``contexts`` (a ``range``; all by default, e.g. ``range(0, 256)`` for a train split)."""
        n_ctx = self.tokens.shape[0]
        ctx = np.arange(n_ctx) if contexts is None else np.asarray(contexts, dtype=np.int64)
        if ctx.size == 0 or ctx.min() < 0 or ctx.max() >= n_ctx:
            raise ValueError(f"contexts must be a non-empty range within [0, {n_ctx}), got {contexts!r}")
        if isinstance(skip_first, bool) or not isinstance(skip_first, Integral) or not 0 <= skip_first < self.context_len:
            raise ValueError(f"skip_first must be an integer in [0, {self.context_len - 1}], got {skip_first!r}")
        pos = np.arange(skip_first, self.context_len)
        return (ctx[:, None] * self.context_len + pos[None, :]).ravel()

    @property
    def dtype(self) -> str:
        """Storage dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``."""
        return self.meta["key"]["dtype"]

    def gather(self, layer: int, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (flat token indices, any order) of ``layer``'s activations: ``(len(index), d_model)`` float32."""
        return self.gather_tensor(layer, index).numpy()

    def gather_tensor(self, layer: int, index: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ``index`` of ``layer`` as a ``(len(index), d_model)`` tensor of ``dtype`` (fp32 or bf16):
        only the stored bytes are read (half of fp32's for a bf16 cache)."""
        raw = self._gather_stored(layer, index)
        if self.dtype == "bfloat16":
            if dtype == torch.bfloat16:
                return torch.from_numpy(raw).view(torch.bfloat16)
            # bf16 -> fp32 is exact: the 16 bits become the high half. One numpy pass: torch's
            # threaded conversion costs ~10x more on 2 busy cores (measured).
            return torch.from_numpy(np.left_shift(raw, 16, dtype=np.uint32).view(np.float32)).to(dtype)
        if dtype == torch.float32:
            return torch.from_numpy(raw.astype(np.float32, copy=False))
        return torch.from_numpy(raw).to(dtype)

    def _gather_stored(self, layer: int, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, dtype=np.int64)
        if index.ndim != 1 or (index.size and (index.min() < 0 or index.max() >= self.n_tokens)):
            raise ValueError(f"index must be 1-D flat token indices in [0, {self.n_tokens}), got shape {index.shape}"
                             + (f", range [{index.min()}, {index.max()}]" if index.size else ""))
        maps = self._layer_maps(layer)
        out = np.empty((index.size, self.d_model), dtype=maps[0].dtype)
        shard = np.searchsorted(self._offsets, index, side="right") - 1
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            local = index[sel] - self._offsets[s]
            order = np.argsort(local)  # sorted reads are kinder to the page cache
            out[sel[order]] = maps[s][local[order]]
        return out

    def activations(self, layer: int, skip_first: int = 0, contexts: range | None = None) -> torch.Tensor:
        """Activations of ``layer`` at positions >= ``skip_first`` of ``contexts``, in corpus order: ``(n, d_model)``."""
        return torch.from_numpy(self.gather(layer, self.token_indices(skip_first, contexts)))

    def batches(
        self, layer: int, batch_size: int, *, seed: int = 0, skip_first: int = 0, epochs: int = 1,
        contexts: range | None = None,
    ) -> Iterator[torch.Tensor]:
        """Shuffled batches ``(batch_size, d_model)``: a fresh seeded permutation across all shards each epoch."""
        for name, v in (("batch_size", batch_size), ("epochs", epochs)):
            if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        index = self.token_indices(skip_first, contexts)
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            perm = index[rng.permutation(index.size)]
            for b in range(0, perm.size, batch_size):
                yield torch.from_numpy(self.gather(layer, perm[b : b + batch_size]))

    def read_speed(self, layer: int, batch_size: int = 4096, n_batches: int = 20, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> float:
        """Measured shuffled-read throughput of ``layer`` in tokens per second, delivered as ``dtype``."""
        index = self.token_indices()
        perm = index[np.random.default_rng(seed).permutation(index.size)]
        t0 = time.perf_counter()
        n = 0
        for b in range(0, min(perm.size, n_batches * batch_size), batch_size):
            n += self.gather_tensor(layer, perm[b : b + batch_size], dtype).shape[0]
        return n / (time.perf_counter() - t0)


class CacheSource:
    """A trainer data source over one cached layer (``sample(batch, generator) -> (batch, d_model)``).

    Walks seeded permutations of the cached tokens (positions >= ``skip_first``): every token is
    seen once per pass, passes are reshuffled from ``generator``, and rows are read from the memory
    maps, so the cache need not fit in memory. ``scale`` divides the activations (one scalar per
    layer, see :func:`norm_scale`). ``dtype``: what ``sample`` returns, ``torch.float32`` or
    ``torch.bfloat16`` (whatever the storage dtype).
    """

    def __init__(self, cache: ActivationCache, layer: int, *, skip_first: int = 0, scale: float = 1.0,
                 contexts: range | None = None, dtype: torch.dtype = torch.float32):
        cache._layer_maps(layer)  # validates the layer, checks its files
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        self.cache, self.layer, self.scale, self.dtype = cache, layer, float(scale), dtype
        self.index = cache.token_indices(skip_first, contexts)
        self.n_p = cache.d_model
        self._perm: np.ndarray | None = None
        self._pos = 0

    def __len__(self) -> int:
        return int(self.index.size)

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        if isinstance(batch, bool) or not isinstance(batch, Integral) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        parts, need = [], int(batch)
        while need > 0:
            if self._perm is None or self._pos >= self._perm.size:
                self._perm = self.index[torch.randperm(self.index.size, generator=generator).numpy()]
                self._pos = 0
            take = self._perm[self._pos : self._pos + need]
            self._pos += take.size
            need -= take.size
            parts.append(self.cache.gather_tensor(self.layer, take, self.dtype))
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        return x / self.scale if self.scale != 1.0 else x


def norm_scale(x: torch.Tensor) -> float:
    """The scalar ``c`` with ``E||x / c||² = d_model`` for a sample ``x`` ``(n, d_model)``.

    Dividing a layer's activations by ``c`` puts every layer and model on one scale, so one learning
    rate fits all (SAELens's ``expected_average_only_in`` normalisation). FVU and the variance
    weights (normalised to ``mean(γ²) = 1``) do not change under it.
    """
    x = torch.as_tensor(x).double()
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty (n, d_model) sample, got shape {tuple(x.shape)}")
    check_finite(x, "x")
    if not bool(x.abs().max() > 0):
        raise ValueError("x is all zeros: there is no scale to normalise by")
    return float((x.pow(2).sum(1).mean() / x.shape[1]).sqrt())
