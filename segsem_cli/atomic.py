"""Atomic file writes: write to a temporary file in the same folder, then rename.

An interrupted run never leaves a half-written output under the final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The writer (gdstk, tifffile, cv2, ...) writes to the yielded path. On an
    exception the temporary file is removed and ``path`` is left untouched.
    The temporary name keeps the suffix so writers that look at it still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write a binary file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj, *, compact: bool = False) -> Path:
    """Atomically write ``obj`` as JSON: indented, or ``compact`` (one line, the fast C encoder)."""
    if compact:
        return write_text(path, json.dumps(obj, separators=(",", ":"), default=json_default) + "\n")
    return write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def json_default(o):
    """``json.dumps`` default for numpy scalars and arrays and paths."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
