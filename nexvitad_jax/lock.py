"""One process at a time per workdir: an flock on DIR/.nexvitad.lock, held for the run's life, and a
JSON note of the holder (pid, host, start time, command) in that file, for the message a second run
gets. The kernel releases an flock when its process dies however it dies (kill -9 included), so a
lock whose holder is gone is never stale: the next run takes it, and says so when the holder's note
is still there (the holder died without releasing it). A clean release removes the file.

    with workdir_lock(workdir):       # raises WorkdirBusy (a UserInputError: exit status 2)
        ...

On several hosts only process 0 takes the lock (the other processes of a run write nothing).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

from nexvitad_jax.errors import UserInputError

LOCK_NAME = ".nexvitad.lock"


class WorkdirBusy(UserInputError):
    """Another process holds the workdir's lock; the message names it."""


def _holder_note() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}


def _read_note(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace").strip()
    if not text:
        return None
    try:
        note = json.loads(text)
    except json.JSONDecodeError:
        return {"unreadable note": text[:200]}
    return note if isinstance(note, dict) else {"unreadable note": text[:200]}


def describe_holder(note: dict | None) -> str:
    if not note:
        return "another process (it has not written its note yet)"
    if "pid" not in note:
        return f"another process ({note})"
    return (f"process {note['pid']} on host {note.get('host', '?')} (started {note.get('started', '?')}"
            + (f": {note['command']}" if note.get("command") else "") + ")")


class WorkdirLock:
    """An exclusive lock on `directory` (see the module's docstring); `acquire` raises WorkdirBusy."""

    def __init__(self, directory: str | Path, what: str = "workdir"):
        self.directory, self.what = Path(directory), what
        self.path = self.directory / LOCK_NAME
        self.fd: int | None = None
        self.created = False

    def acquire(self, notice: Callable[[str], None] | None = None) -> "WorkdirLock":
        """Take the lock; `notice(message)` hears of a holder that died without releasing it. The
        directory is created if need be (and removed on release if it is still empty then)."""
        self.created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                note = _read_note(fd)
                os.close(fd)
                raise WorkdirBusy(f"{self.what} {self.directory} is in use by {describe_holder(note)}; wait for it "
                                  f"to finish or stop it, or use another {self.what}") from None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us may have removed the file after we opened it: lock the file in place.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            self._write_note(fd, notice)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def _write_note(self, fd: int, notice) -> None:
        previous = _read_note(fd)
        if previous and notice is not None:
            notice(f"{self.what} {self.directory}: taking over the lock of {describe_holder(previous)}, "
                   "which ended without releasing it")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_holder_note()) + "\n").encode())

    def release(self) -> None:
        """Remove the lock file, then let the lock go (a waiting process re-checks the file)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        finally:
            os.close(fd)
        if self.created:  # a run refused before it wrote anything leaves no empty workdir
            with contextlib.suppress(OSError):
                self.directory.rmdir()

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> "WorkdirLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: dict[Path, WorkdirLock] = {}


def hold_workdir(directory: str | Path, notice: Callable[[str], None] | None = None,
                 what: str = "workdir") -> WorkdirLock:
    """This process's lock on `directory`, taken if it does not hold it yet (and kept until
    `release_workdir` or the process's end)."""
    key = Path(directory).resolve()
    lock = _HELD.get(key)
    if lock is None or not lock.held:
        lock = _HELD[key] = WorkdirLock(directory, what).acquire(notice)
    return lock


def release_workdir(directory: str | Path) -> None:
    lock = _HELD.pop(Path(directory).resolve(), None)
    if lock is not None:
        lock.release()


def release_all() -> None:
    """Every lock this process holds (an interrupted process releases them before it exits)."""
    for key in list(_HELD):
        release_workdir(key)


atexit.register(release_all)  # a process that ends normally leaves no note behind


@contextlib.contextmanager
def workdir_lock(directory: str | Path, notice: Callable[[str], None] | None = None,
                 what: str = "workdir") -> Iterator[WorkdirLock | None]:
    """Hold `directory`'s lock for the block (a lock this process holds already stays held after it).
    On several hosts only process 0 locks (the block gets None elsewhere)."""
    from nexvitad_jax.io import writes_outputs

    if not writes_outputs():
        yield None
        return
    key = Path(directory).resolve()
    mine = key not in _HELD or not _HELD[key].held
    lock = hold_workdir(directory, notice, what)
    try:
        yield lock
    finally:
        if mine:
            release_workdir(directory)
