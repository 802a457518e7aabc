"""MVTec AD (and MPDD, which shares its layout) from the official folder or `.tar.xz` archive.

`index_members` turns member names (folder files or archive members) into per-category entries;
decoding is the shared path of `decode.py`. Masks are `CLASS/ground_truth/TYPE/NNN_mask.png`,
binarized at > 0.5 of full scale (DESIGN.md, Evaluation); a defect image needs its mask.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

from nexvitad_jax.data.cached import CachedDataset, check_image_size, fingerprint, list_files
from nexvitad_jax.data.decode import IMAGE_SUFFIXES, Entry, decode_entries
from nexvitad_jax.data.entries import index_images
from nexvitad_jax.errors import UserInputError

SPLITS = ("train", "test")
# The 15 MVTec AD categories (the TFDS builder has one config each).
MVTEC_CLASSES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
# MPDD (metal parts) ships in the MVTec AD layout with these classes.
MPDD_CLASSES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")


# ---------------------------------------------------------------------------------------------
# Indexing member names (folder files or archive members) into categories


def index_members(
    names: Iterable[str], display: Callable[[str], str] = str
) -> dict[str, dict[str, list[Entry]]]:
    """Relative member names -> {category: {split: [Entry, ...] sorted}}.

    A name is `[PREFIX/]CATEGORY/{train,test}/TYPE/FILE` or
    `[PREFIX/]CATEGORY/ground_truth/TYPE/STEM_mask.png`; anything else (license.txt...) is ignored.
    `display(name)` is the path shown to users (in errors and `CategoryArrays.paths`).
    """
    images: dict[tuple[str, str, str, str], str] = {}
    masks: dict[tuple[str, str, str, str], tuple[str, ...]] = {}
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) < 4 or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
            continue
        category, split, defect_type, filename = parts[-4:]
        if split in SPLITS:
            images[(category, split, defect_type, filename)] = name
        elif split == "ground_truth":
            stem = PurePosixPath(filename).stem
            if stem.endswith("_mask"):
                masks[(category, "test", defect_type, stem[: -len("_mask")])] = (name,)
    return index_images(images, masks, display, lambda c, t, s: f"{c}/ground_truth/{t}/{s}_mask.png")


def _category_of(name: str) -> str | None:
    """The category of an archive member (`[PREFIX/]CATEGORY/SPLIT/TYPE/FILE`), else None."""
    parts = PurePosixPath(name).parts
    if len(parts) >= 4 and parts[-3] in (*SPLITS, "ground_truth"):
        return parts[-4]
    return None


# ---------------------------------------------------------------------------------------------
# Sources and the cached Dataset


def looks_like_tar(path: Path) -> bool:
    """By magic bytes (xz, gzip, bzip2, plain ustar): no decompression needed."""
    with open(path, "rb") as f:
        head = f.read(512)
    return head.startswith((b"\xfd7zXZ\x00", b"\x1f\x8b", b"BZh")) or head[257:262] == b"ustar"


PROGRESS_MIN_BYTES = 64 * 2**20  # smaller archives are read in a moment: no bar


@contextlib.contextmanager
def tar_members(path: Path, description: str) -> Iterator[tuple[tarfile.TarFile, Iterator[tarfile.TarInfo]]]:
    """(the open tar, its members in order) read sequentially, with a progress bar of the archive's
    (compressed) bytes read: one pass over the official MVTec AD `.tar.xz` takes minutes."""
    from tqdm.auto import tqdm

    size = path.stat().st_size
    with open(path, "rb") as raw, tqdm(total=size, unit="B", unit_scale=True, desc=description, leave=False,
                                       disable=size < PROGRESS_MIN_BYTES) as bar:
        with tarfile.open(fileobj=raw, mode="r:*") as tar:
            def members() -> Iterator[tarfile.TarInfo]:
                for member in tar:
                    bar.update(raw.tell() - bar.n)
                    yield member
                bar.update(size - bar.n)  # the whole archive was read

            yield tar, members()


class MVTecDataset(CachedDataset):
    """An MVTec-layout folder (MVTec AD, MPDD) or the official `.tar.xz` archive.

    The cache key is the resolved source path, its fingerprint (archive size + mtime, or the
    folder's file names, sizes and mtimes), the image size and the decoder version.
    An archive is read sequentially, never extracted: the first access lists it and decodes
    every category in that same pass (one decompression of the whole archive).
    """

    slug = "mvtec"

    def __init__(
        self, source: str | os.PathLike, *, image_size: int = 224, cache_dir=None,
        decode_on_scan: bool = True,
    ):
        path = Path(source).expanduser().resolve()
        if not path.exists():
            raise UserInputError(f"{source}: no such MVTec folder or archive")
        check_image_size(image_size)
        self.is_archive = path.is_file()
        if self.is_archive and not looks_like_tar(path):
            raise UserInputError(f"{source}: not a tar archive (expected the official MVTec AD .tar.xz, a dataset "
                                 "folder or a folder-spec .yaml/.json)")
        self._decode_on_scan = decode_on_scan
        # A single category folder (`.../hazelnut` holding train/ and test/) is accepted too.
        self._single_category = None
        if not self.is_archive and any((path / s).is_dir() for s in SPLITS):
            self._single_category, path = path.name, path.parent
        if self.is_archive:
            stat = path.stat()
            key = f"{stat.st_size}-{stat.st_mtime_ns}"
            self._names = None  # listed lazily: listing a .tar.xz decompresses it
        else:
            self._names = list_files(path, [self._single_category or ""], IMAGE_SUFFIXES)
            key = fingerprint(path, self._names)
        self.source = path
        self._init_cache(path, path.name, image_size, cache_dir, f"{path}|{self._single_category}|{key}")
        self._index = None
        self.notes = []

    @property
    def layout(self) -> str:
        """"MVTec AD", or "MPDD (MVTec AD layout)" when every class is one of MPDD's."""
        return "MPDD (MVTec AD layout)" if set(self.classes) <= set(MPDD_CLASSES) else "MVTec AD"

    def _expected(self, category: str, split: str) -> str:
        return f"{category}/train/good/*.png" if split == "train" else f"{category}/test/TYPE/*.png"

    def _splits_to_decode(self, category: str, split: str) -> tuple[str, ...]:
        # An archive pass is costly: decode and cache both splits from it at once.
        return SPLITS if self.is_archive else (split,)

    # -- listing
    def member_names(self) -> list[str]:
        """The archive's file members (the first call makes the one pass that lists and decodes)."""
        return self._archive_names()

    def _archive_names(self) -> list[str]:
        listing = self.cache_dir / "members.json"
        if not listing.exists():
            self._scan_archive(decode=self._decode_on_scan)
        return json.loads(listing.read_text())

    def _scan_archive(self, decode: bool) -> None:
        """One sequential pass over the archive: list its members and, with `decode`, decode
        and cache each category as soon as its members are complete (the official archives
        store one category after another), holding one category's PNG bytes at a time."""
        display = f"{self.source}::{{}}".format
        names: list[str] = []
        blobs: dict[str, dict[str, bytes]] = {}
        done: set[str] = set()
        reopened: set[str] = set()

        def flush(category: str) -> None:
            done.add(category)
            try:
                index = index_members(blobs[category], display).get(category)
            except UserInputError:
                # e.g. masks stored later: decoded on demand. A real error in an MVTec archive is
                # raised by `index` (over every member); another layout's archive is extracted.
                reopened.add(category)
                del blobs[category]
                return
            for split in SPLITS:
                if index and index.get(split):
                    decode_entries(index[split], blobs[category].__getitem__, self.image_size,
                                   description=f"{category}/{split}",
                                   ).save_npz(self.cache_path(category, split))
            del blobs[category]

        try:
            with tar_members(self.source, f"reading {self.source.name}") as (tar, members):
                for member in members:
                    if not member.isfile():
                        continue
                    names.append(member.name)
                    category = _category_of(member.name) if decode else None
                    if category is None:
                        continue
                    if category in done:  # out-of-order archive: decode it later, on demand
                        reopened.add(category)
                        continue
                    for finished in [c for c in blobs if c != category]:
                        flush(finished)
                    blobs.setdefault(category, {})[member.name] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UserInputError(f"{self.source}: unreadable archive ({err})") from None
        for category in list(blobs):
            flush(category)
        for category in reopened:
            for split in SPLITS:
                self.cache_path(category, split).unlink(missing_ok=True)
        listing = self.cache_dir / "members.json"
        listing.parent.mkdir(parents=True, exist_ok=True)
        tmp = listing.with_name(f"members.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(names))
        os.replace(tmp, listing)

    @property
    def index(self) -> dict[str, dict[str, list[Entry]]]:
        if self._index is None:
            if self.is_archive:  # members shown as "archive.tar.xz::member"
                self._index = index_members(self._archive_names(), f"{self.source}::{{}}".format)
            else:
                self._index = index_members(self._names, lambda key: str(self.source / key))
                folders = [self.source / self._single_category] if self._single_category else self.source.iterdir()
                for folder in folders:  # categories with no images at all
                    if any((folder / s).is_dir() for s in SPLITS):
                        self._index.setdefault(folder.name, {})
            if not self._index:
                raise UserInputError(
                    f"{self.source}: no MVTec category found (expected "
                    "CATEGORY/train/good/*.png, CATEGORY/test/TYPE/*.png)"
                )
        return self._index

    def reader(self, category: str) -> Callable[[str], bytes]:
        """key -> bytes for this category's entries. For an archive, one sequential pass reads
        the category's members into memory (no extraction to disk)."""
        if not self.is_archive:
            return super().reader(category)
        wanted = {
            key
            for entries in self.index[category].values()
            for e in entries
            for key in (e.image_key, *e.mask_keys)
        }
        blobs: dict[str, bytes] = {}
        try:
            with tar_members(self.source, f"reading {category} from {self.source.name}") as (tar, members):
                for member in members:
                    if member.name in wanted:
                        blobs[member.name] = tar.extractfile(member).read()
                        if len(blobs) == len(wanted):
                            break
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UserInputError(f"{self.source}: unreadable archive ({err})") from None
        return blobs.__getitem__
