"""Checks every module shares: where a NaN or Inf sits, files verified against their manifest,
writes that a crash or a full disk cannot leave half-done.

* :func:`check_finite` raises :class:`NonFiniteError` with the index of the first NaN/Inf, so an
  error says *which* row of *which* batch, shard or layer went bad, not just that one did.
* Every folder this library writes (saved SAEs, trainer checkpoints, activation-cache shards) lists
  its files with their size and SHA-256 (:func:`file_entry`); readers call :func:`verify_files`
  before reading, so a truncated or altered file is refused (:class:`CorruptFileError`), never read.
* :func:`write_bytes` and :func:`write_json` write to a temporary name, ``fsync`` and rename, so a
  file is either the old one or the complete new one; a full disk raises an ``OSError`` (errno
  ``ENOSPC``) that names the file, and the temporary file is removed.

Nothing here runs code from a file: tensors are read with safetensors or NumPy (``allow_pickle``
off), everything else is JSON.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["NonFiniteError", "CorruptFileError", "nonfinite_location", "check_finite", "file_entry",
           "verify_files", "write_bytes", "write_json", "read_json"]


class NonFiniteError(ValueError):
    """A NaN or Inf where finite numbers are needed (or a training run diverging towards them);
    the message says where it is."""


class CorruptFileError(ValueError):
    """A stored file does not match its manifest (size or SHA-256) or cannot be parsed."""


def nonfinite_location(x: Any) -> tuple[tuple[int, ...], float] | None:
    """``(index, value)`` of the first NaN/Inf in ``x`` (a torch tensor or an array), or None."""
    # Fast path: one reduction (a NaN/Inf anywhere makes the sum non-finite); only a non-finite sum,
    # or an overflowing one, pays for locating the entry.
    if hasattr(x, "isfinite") and hasattr(x, "nonzero") and not isinstance(x, np.ndarray):  # torch
        import torch  # already loaded: x is a tensor

        if not x.is_floating_point() or x.numel() == 0:
            return None
        # Half-precision sums overflow at 65,504: accumulate those in float32.
        if math.isfinite(float((x.sum() if x.element_size() >= 4 else x.sum(dtype=torch.float32)).detach())):
            return None
        bad = ~x.isfinite()
        if not bool(bad.any()):
            return None
        idx = tuple(int(i) for i in bad.nonzero()[0])
        return idx, float(x[idx])
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.complexfloating):
        return None
    if a.size == 0 or np.isfinite(a.sum(dtype=np.float64)):
        return None
    bad = ~np.isfinite(a)
    if not bad.any():
        return None
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape))
    return idx, float(a[idx])


def check_finite(x: Any, name: str, where: str = "") -> None:
    """Raise :class:`NonFiniteError` if ``x`` holds a NaN or Inf: ``"{name} has nan at [3, 1]{where}"``."""
    loc = nonfinite_location(x)
    if loc is not None:
        idx, v = loc
        at = f" at [{', '.join(map(str, idx))}]" if idx else ""
        raise NonFiniteError(f"{name} must be finite, got {v}{at}{where}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str | os.PathLike, data: bytes | None = None) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file (or of ``data``, the bytes just written to it)."""
    if data is not None:
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path = Path(path)
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def verify_files(folder: str | os.PathLike, entries: Any, what: str, names: Any = None,
                 checksum: bool = True) -> None:
    """Check that every file in ``entries`` (``{name: {"bytes", "sha256"}}``, or only ``names``)
    exists in ``folder`` with that size and, with ``checksum``, that SHA-256.

    Raises :class:`CorruptFileError` naming the file and what differs; ``what`` says what the folder
    is (``"trainer checkpoint"``...). File names must be plain names (no path separators), so a
    crafted manifest cannot point outside ``folder``.
    """
    folder = Path(folder)
    if not isinstance(entries, dict):
        raise CorruptFileError(f"{what} at {folder}: the manifest's 'files' must map names to sizes and "
                               f"checksums, got {type(entries).__name__}")
    for name in entries if names is None else names:
        if name not in entries:
            raise CorruptFileError(f"{what} at {folder}: the manifest does not list {name!r}")
        e = entries[name]
        if (not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..")
                or not isinstance(e, dict) or not isinstance(e.get("bytes"), int)
                or not isinstance(e.get("sha256"), str)):
            raise CorruptFileError(f"{what} at {folder}: bad manifest entry {name!r}: {e!r}")
        path = folder / name
        if not path.is_file():
            raise CorruptFileError(f"{what} at {folder}: {name} is missing (listed in the manifest)")
        size = path.stat().st_size
        if size != e["bytes"]:
            raise CorruptFileError(f"{what} at {folder}: {name} has {size:,} bytes, the manifest says "
                                   f"{e['bytes']:,} (truncated or altered)")
        if checksum and _sha256(path) != e["sha256"]:
            raise CorruptFileError(f"{what} at {folder}: {name} does not match its SHA-256 in the "
                                   f"manifest (altered)")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> dict[str, Any]:
    """Write ``data`` to ``path`` atomically (temporary name, fsync, rename); returns its
    :func:`file_entry`. A full disk raises ``OSError(ENOSPC)`` naming the file; nothing is replaced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {path} "
                          f"({len(data):,} bytes); files written before it are unchanged: free space "
                          f"and run again") from err
        raise
    _fsync_dir(path.parent)
    return file_entry(path, data)


def write_json(path: str | os.PathLike, obj: Any) -> dict[str, Any]:
    """:func:`write_bytes` of ``obj`` as indented JSON (NaN/Inf refused: they are not JSON)."""
    return write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n").encode())


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file; a corrupt one raises :class:`CorruptFileError` naming it and ``what`` it is."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{path} ({what}) is not valid JSON: {err}") from err
