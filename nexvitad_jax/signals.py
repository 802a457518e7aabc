"""Interrupts, in one place: SIGINT and SIGTERM become exceptions (`Interrupted`, a KeyboardInterrupt)
that unwind the run like Ctrl-C, and the command line ends with 128 + the signal (130, 143).

A block that must not be cut in half (a checkpoint being written) runs under `deferred()`: a signal
that arrives meanwhile is held and raised when the block ends, so the write finishes first (each
write is also atomic on its own: one killed outright leaves the previous file or checkpoint).

An interrupted command leaves through `exit_now` (os._exit after flushing and releasing the
workdir locks) rather than the interpreter's teardown. That teardown is what crashed (exit 139):
after a Ctrl-C during compilation or the first steps, "interrupted" was printed, main() returned,
and the process died in finalization (faulthandler: "Segmentation fault", the main thread with no
Python frame left) while XLA's compiler/runtime threads and orbax's asynchronous writers were
still alive. A signal that a parent set to be ignored (a shell's background job: SIGINT) stays
ignored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `signum` says which (the exit status is 128 + signum)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _raise(signum: int, frame) -> None:
    raise Interrupted(signum)


def install() -> dict:
    """SIGINT and SIGTERM raise Interrupted in the main thread (no-op elsewhere); returns the
    handlers they had, for `restore`."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    # A signal the parent set to be ignored stays ignored (a shell's background job ignores SIGINT).
    return {signum: signal.signal(signum, _raise) for signum in HANDLED if signal.getsignal(signum) != signal.SIG_IGN}


def restore(handlers: dict) -> None:
    """Put back the handlers `install` returned."""
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def ignore_further() -> None:
    """Ignore SIGINT/SIGTERM from now on (an interrupted process on its way out)."""
    if threading.current_thread() is threading.main_thread():
        for signum in HANDLED:
            signal.signal(signum, signal.SIG_IGN)


def exit_status(error: BaseException) -> int:
    """128 + the signal for an interrupt (130 for a plain KeyboardInterrupt)."""
    return 128 + getattr(error, "signum", signal.SIGINT)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM during the block; the first that arrived is raised when it ends (only in
    the main thread, where Python runs signal handlers; elsewhere the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: held.append(signum)) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            handler = previous[held[0]]
            if callable(handler):
                handler(held[0], None)
            elif handler != signal.SIG_IGN:
                raise Interrupted(held[0])


def exit_now(status: int) -> None:
    """End the process with `status` at once: stdout/stderr flushed, this process's workdir locks
    released, no interpreter teardown (see the module's docstring)."""
    from nexvitad_jax.lock import release_all

    with contextlib.suppress(Exception):
        release_all()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
