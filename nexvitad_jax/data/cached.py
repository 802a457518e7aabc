"""What every file-based reader shares: an index of entries per (class, split), decoded once per
(class, split) into an .npz cache keyed by the layout, the source, its files and the image size.

A reader (one per layout) builds `self.index` = {class: {split: [Entry, ...] sorted}}; this base
class loads, caches, counts and checks names against it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from nexvitad_jax.data.decode import CategoryArrays, Entry, count_entries, decode_entries
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.io import WriteFailed

CACHE_VERSION = 1
SPLIT_ORDER = ("train", "validation", "test")
log = logging.getLogger("nexvitad_jax.data")


def default_cache_dir() -> Path:
    """$NEXVITAD_CACHE, else $XDG_CACHE_HOME/nexvitad_jax, else ~/.cache/nexvitad_jax."""
    if os.environ.get("NEXVITAD_CACHE"):
        return Path(os.environ["NEXVITAD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nexvitad_jax"


def check_image_size(image_size) -> None:
    if not isinstance(image_size, int) or image_size < 8:
        raise UserInputError(f"image_size must be an integer >= 8, got {image_size!r}")


def fingerprint(root: Path, names: Iterable[str], extra: bytes = b"") -> str:
    """sha1 of the files' names, sizes and mtimes (relative to root, or absolute) and `extra`."""
    digest = hashlib.sha1(extra)
    for name in names:
        try:
            st = (root / name).stat()
        except OSError:
            raise UserInputError(f"{root / name}: listed by the dataset but not readable") from None
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def list_files(root: Path, folders: Iterable[str], suffixes: tuple[str, ...]) -> list[str]:
    """Files under root/folder for each folder, with one of `suffixes`, as sorted names relative to
    root (posix)."""
    return sorted(
        p.relative_to(root).as_posix()
        for folder in folders
        for p in (root / folder).rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes
    )


def save_to_cache(arrays: CategoryArrays, path: Path) -> None:
    """`arrays.save_npz(path)`; a failed or interrupted write leaves no temporary file, and an
    OSError (read-only, full, not permitted) becomes one WriteFailed naming `path` and the way out."""
    try:
        arrays.save_npz(path)
    except BaseException as error:
        for leftover in path.parent.glob(f"{path.name}.tmp{os.getpid()}*"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        if not isinstance(error, OSError) or error.errno is None:
            raise
        raise WriteFailed(error.errno, f"{error.strerror} (the decoded-data cache: set NEXVITAD_CACHE to a "
                                       "writable folder with space)", str(path)) from None


def describe_splits(splits: Iterable[str]) -> str:
    return " or ".join(repr(s) for s in splits)


class CachedDataset:
    """A dataset of files: `load(class, split)` decodes once, then reads the .npz cache.

    Subclasses set `layout` (its name, as `nexvitad data info` says it), `slug` (the cache folder)
    and `self.index`, and call `_init_cache(identity)` with what names their files (the source
    path and a fingerprint of its files).
    """

    layout = "files"
    slug = "files"
    notes: list[str]

    def _init_cache(self, root: Path, name: str, image_size: int, cache_dir, identity: str) -> None:
        check_image_size(image_size)
        self.root, self.image_size = root, image_size
        self._memory: dict[tuple[str, str], CategoryArrays] = {}
        key = hashlib.sha1(f"{identity}|{image_size}|v{CACHE_VERSION}".encode()).hexdigest()[:16]
        self.cache_dir = Path(cache_dir or default_cache_dir()) / self.slug / f"{name}-{image_size}-{key}"

    def _say(self, notes: list[str], level: int = logging.INFO) -> None:
        """Keep what the reader decided (shown by `nexvitad data info`) and log it once."""
        self.notes = [*getattr(self, "notes", []), *notes]
        for note in notes:
            log.log(level, "%s (%s): %s", self.layout, self.root, note)

    # -- names
    @property
    def classes(self) -> list[str]:
        return sorted(self.index)

    @property
    def splits(self) -> tuple[str, ...]:
        held = {split for splits in self.index.values() for split, entries in splits.items() if entries}
        return tuple(s for s in SPLIT_ORDER if s in held | {"train", "test"})

    def counts(self, category: str) -> dict[str, Counter]:
        """{split: Counter(defect type -> images)} without decoding anything."""
        self._check_category(category)
        return count_entries(self.index[category])

    def _check_category(self, category: str) -> None:
        if category not in self.index:
            raise UserInputError(
                f"unknown category {category!r} in {self.root}; it holds {sorted(self.index) or 'none'}"
            )

    def _expected(self, category: str, split: str) -> str:
        """Where a split's images would be, for errors (`CLASS/train/good/*.png`)."""
        return f"{category}/{split}/TYPE/*.png"

    def entries(self, category: str, split: str) -> list[Entry]:
        """The sorted entries of one category split (what `decode_example` consumes)."""
        if split not in self.splits:
            raise UserInputError(f"split must be {describe_splits(self.splits)}, got {split!r}")
        self._check_category(category)
        if not self.index[category].get(split):
            raise UserInputError(f"category {category!r} in {self.root} holds no {split} images "
                                 f"(expected {self._expected(category, split)})")
        return self.index[category][split]

    # -- loading
    def cache_path(self, category: str, split: str) -> Path:
        return self.cache_dir / f"{category}_{split}.npz"

    def reader(self, category: str) -> Callable[[str], bytes]:
        """key -> bytes; keys are paths relative to the root (or absolute)."""
        return lambda key: (self.root / key).read_bytes()

    def _splits_to_decode(self, category: str, split: str) -> tuple[str, ...]:
        return (split,)

    def load(self, category: str, split: str) -> CategoryArrays:
        """(category, split) -> arrays; decoded once, then read from the cache."""
        if (category, split) in self._memory:
            return self._memory[(category, split)]
        self.entries(category, split)  # the errors for unknown names, before any reading
        path = self.cache_path(category, split)
        if not path.exists():
            read = self.reader(category)
            for todo in self._splits_to_decode(category, split):
                if self.index[category].get(todo):
                    save_to_cache(decode_entries(self.index[category][todo], read, self.image_size,
                                                 description=f"{category}/{todo}"), self.cache_path(category, todo))
        arrays = CategoryArrays.load_npz(path)
        self._memory[(category, split)] = arrays
        return arrays
