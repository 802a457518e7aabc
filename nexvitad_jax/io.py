"""Writing results so that a reader, or a resumed run, never sees a file half-written; on several
hosts only process 0 writes (every process holds the same results: the maps computed over every
device are gathered onto every process before the metrics)."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np


def writes_outputs() -> bool:
    """True on the process that writes results (process 0)."""
    return jax.process_index() == 0


def _temporary(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.stem if suffix else path.name}.tmp{os.getpid()}{suffix}")


def atomic_write(path: str | Path, text: str) -> None:
    """Write a text file atomically (a temporary file renamed into place)."""
    if not writes_outputs():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_savez(path: str | Path, **arrays) -> None:
    """np.savez atomically (numpy appends .npz to a name without it: the temporary file has it)."""
    if not writes_outputs():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, ".npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
