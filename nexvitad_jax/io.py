"""Writing results so that a reader, or a resumed run, never sees a file half-written; on several
hosts only process 0 writes (every process holds the same results: the maps computed over every
device are gathered onto every process before the metrics).

A write that fails (no space, read-only, permission denied) or is interrupted leaves the previous
file as it was and no temporary file behind, and raises an OSError that names the file the caller
asked for (not its temporary name): the command line prints it as one line.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


class WriteFailed(OSError):
    """Writing a file or directory failed; `filename` is what was to be written (not a temporary)."""


def writes_outputs() -> bool:
    """True on the process that writes results (process 0)."""
    import jax  # here: the command line imports this module before it needs JAX

    return jax.process_index() == 0


def _temporary(path: Path, suffix: str = "") -> Path:
    return path.with_name(f".{path.stem if suffix else path.name}.tmp{os.getpid()}{suffix}")


def naming(error: OSError, path: str | Path) -> OSError:
    """A WriteFailed of `error`'s errno and cause naming `path` (not a temporary file)."""
    if error.errno is None:
        return error
    return WriteFailed(error.errno, error.strerror or os.strerror(error.errno), str(path))


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """The temporary path to write `path`'s contents to; renamed into place when the block ends
    normally, removed when it does not. `suffix`: an extension the writer insists on (np.savez
    appends .npz to a name without it)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise naming(error, path.parent) from None
    tmp = _temporary(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        _remove(tmp)
        raise naming(error, path) from None
    except BaseException:  # interrupted (KeyboardInterrupt) or a writer's own error: no partial file stays
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def atomic_write(path: str | Path, text: str) -> None:
    """Write a text file atomically (a temporary file renamed into place)."""
    if not writes_outputs():
        return
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_savez(path: str | Path, **arrays) -> None:
    """np.savez atomically (numpy appends .npz to a name without it: the temporary file has it)."""
    import numpy as np

    if not writes_outputs():
        return
    with atomic_file(path, ".npz") as tmp:
        np.savez(tmp, **arrays)
