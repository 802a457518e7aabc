"""MVTec AD from its official folder layout or its official `.tar.xz` archive.

One decode path serves the folder reader, the archive reader and the TFDS builder
(`tfds_mvtec.py`): `index_members` turns member names into per-category entries and
`decode_entries` turns entries into a `CategoryArrays`.

Image handling (documented, tested):
- 8-bit grey (L) and palette (P) images become RGB; RGBA / LA drop the alpha channel;
  16-bit grey (I;16, I) is scaled to 8 bit (value >> 8).
- Images are resized bilinearly to `image_size` x `image_size`; masks with nearest neighbour
  and binarized at > 0.5 of their full scale (DESIGN.md, Evaluation).
- A mask must have its image's size; a defect image needs its `NNN_mask.png`; a corrupt file,
  a missing mask or an empty/unknown category raises `UserInputError` naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from nexvitad_jax.errors import UserInputError

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
CACHE_VERSION = 1
# The 15 MVTec AD categories (the TFDS builder has one config each).
MVTEC_CLASSES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip


@dataclasses.dataclass
class CategoryArrays:
    """One category split as arrays; row i of every field describes the same image."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    masks: np.ndarray  # bool (N, H, W)
    labels: np.ndarray  # int32 (N,), 0 good, 1 defect
    defect_types: list[str]  # "good" for normal images
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def save_npz(self, path: Path) -> None:
        """Write atomically (a reader never sees a half-written cache file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
        np.savez(
            tmp,
            images=self.images,
            masks=self.masks,
            labels=self.labels,
            defect_types=np.asarray(self.defect_types, dtype=str),
            paths=np.asarray(self.paths, dtype=str),
        )
        os.replace(tmp, path)

    @classmethod
    def load_npz(cls, path: Path) -> "CategoryArrays":
        with np.load(path) as z:
            return cls(
                images=z["images"],
                masks=z["masks"],
                labels=z["labels"],
                defect_types=[str(s) for s in z["defect_types"]],
                paths=[str(s) for s in z["paths"]],
            )


@dataclasses.dataclass(frozen=True)
class Entry:
    """One image of a category split: where to read it and its mask (None for good images)."""

    split: str
    defect_type: str
    image_key: str
    mask_key: str | None
    display_path: str
    mask_display_path: str | None = None


# ---------------------------------------------------------------------------------------------
# Decoding (the one code path shared by the folder, archive and TFDS readers)


def _open(data: bytes, name: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserInputError(f"{name}: not a readable image ({err})") from None
    return image


def _to_uint8_channels(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W, C) with C in {1, 3}: 16-bit scaled, alpha dropped."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image).astype(np.int64)
        # 16-bit grey: keep the top 8 bits (full scale 65535 -> 255).
        return np.clip(values >> 8, 0, 255).astype(np.uint8)[..., None]
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max(initial=0.0) > 1.0 else 1.0
        return np.clip(values / scale * 255.0, 0, 255).astype(np.uint8)[..., None]
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"))[..., None]
    if mode in ("LA", "La"):
        return np.asarray(image.convert("LA"))[..., :1]
    return np.asarray(image.convert("RGB"))  # RGB, RGBA, P, PA, CMYK, YCbCr...


def decode_image(data: bytes, name: str, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """PNG/JPEG bytes -> (uint8 (S, S, 3) RGB resized bilinearly, original (H, W))."""
    pixels = _to_uint8_channels(_open(data, name))
    original_hw = pixels.shape[:2]
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)  # the grey classes become 3 channels
    resized = Image.fromarray(pixels, "RGB").resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(resized, dtype=np.uint8), original_hw


def decode_mask(
    data: bytes, name: str, image_size: int, expected_hw: tuple[int, int], image_name: str
) -> np.ndarray:
    """Mask bytes -> bool (S, S): nearest resize, then > 0.5 of full scale."""
    pixels = _to_uint8_channels(_open(data, name))
    if pixels.shape[:2] != tuple(expected_hw):
        raise UserInputError(
            f"{name}: mask is {pixels.shape[1]}x{pixels.shape[0]} but its image {image_name} is "
            f"{expected_hw[1]}x{expected_hw[0]}; a mask must have its image's size"
        )
    grey = pixels.max(axis=-1)  # an RGB mask counts where any channel is set
    return resize_nearest(grey, image_size) > 127  # > 0.5 of 255


def resize_nearest(array: np.ndarray, size: int) -> np.ndarray:
    """Nearest resize with half-pixel centres: out[i] = in[floor((i + 0.5) * in / out)].

    The same rule as torch `interpolate(mode="nearest-exact")`; written out because Pillow's
    NEAREST rounds a few boundary pixels differently.
    """
    rows = np.minimum(((np.arange(size) + 0.5) * array.shape[0] / size).astype(np.int64),
                      array.shape[0] - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * array.shape[1] / size).astype(np.int64),
                      array.shape[1] - 1)
    return array[rows[:, None], cols[None, :]]


def decode_example(
    entry: Entry, read: Callable[[str], bytes], image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One entry -> (image uint8 (S, S, 3), mask bool (S, S))."""
    image, original_hw = decode_image(read(entry.image_key), entry.display_path, image_size)
    if entry.mask_key is None:
        return image, np.zeros((image_size, image_size), dtype=bool)
    mask = decode_mask(
        read(entry.mask_key), entry.mask_display_path, image_size, original_hw, entry.display_path
    )
    return image, mask


def decode_entries(
    entries: list[Entry],
    read: Callable[[str], bytes],
    image_size: int,
    *,
    description: str = "",
    workers: int | None = None,
) -> CategoryArrays:
    """Decode every entry (threads: Pillow releases the GIL while decoding and resizing)."""
    from tqdm.auto import tqdm

    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(
            tqdm(
                pool.map(lambda e: decode_example(e, read, image_size), entries),
                total=len(entries),
                desc=f"decoding {description}",
                leave=False,
                disable=len(entries) < 64,
            )
        )
    n = len(entries)
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    masks = np.zeros((n, image_size, image_size), bool)
    for i, (image, mask) in enumerate(results):
        images[i], masks[i] = image, mask
    return CategoryArrays(
        images=images,
        masks=masks,
        labels=np.asarray([e.defect_type != "good" for e in entries], np.int32),
        defect_types=[e.defect_type for e in entries],
        paths=[e.display_path for e in entries],
    )


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
    masks: dict[tuple[str, str, str], str] = {}
    categories: set[str] = set()
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) < 4 or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
            continue
        category, split, defect_type, filename = parts[-4:]
        if split in SPLITS:
            categories.add(category)
            images[(category, split, defect_type, filename)] = name
        elif split == "ground_truth":
            stem = PurePosixPath(filename).stem
            if stem.endswith("_mask"):
                masks[(category, defect_type, stem[: -len("_mask")])] = name
    index: dict[str, dict[str, list[Entry]]] = {c: {s: [] for s in SPLITS} for c in categories}
    for (category, split, defect_type, filename), key in sorted(images.items()):
        mask_key = None
        display_path = display(key)
        if defect_type != "good":
            if split == "train":
                raise UserInputError(
                    f"{display_path}: train/ must hold only train/good (found defect type "
                    f"{defect_type!r})"
                )
            stem = PurePosixPath(filename).stem
            mask_key = masks.get((category, defect_type, stem))
            if mask_key is None:
                raise UserInputError(
                    f"{display_path}: defect image without its mask; expected "
                    f"{category}/ground_truth/{defect_type}/{stem}_mask.png"
                )
        index[category][split].append(Entry(
            split, defect_type, key, mask_key, display_path, mask_key and display(mask_key)
        ))
    return index


def _category_of(name: str) -> str | None:
    """The category of an archive member (`[PREFIX/]CATEGORY/SPLIT/TYPE/FILE`), else None."""
    parts = PurePosixPath(name).parts
    if len(parts) >= 4 and parts[-3] in (*SPLITS, "ground_truth"):
        return parts[-4]
    return None


def _check_category(index, category: str, split: str, source: str) -> None:
    if category not in index:
        raise UserInputError(
            f"unknown category {category!r} in {source}; it holds {sorted(index) or 'none'}"
        )
    if not index[category][split]:
        where = "train/good/*.png" if split == "train" else "test/TYPE/*.png"
        raise UserInputError(
            f"category {category!r} in {source} holds no {split} images (expected "
            f"{category}/{where})"
        )


# ---------------------------------------------------------------------------------------------
# Sources and the cached Dataset


def _looks_like_tar(path: Path) -> bool:
    """By magic bytes (xz, gzip, bzip2, plain ustar): no decompression needed."""
    with open(path, "rb") as f:
        head = f.read(512)
    return head.startswith((b"\xfd7zXZ\x00", b"\x1f\x8b", b"BZh")) or head[257:262] == b"ustar"


def default_cache_dir() -> Path:
    """$NEXVITAD_CACHE, else $XDG_CACHE_HOME/nexvitad_jax, else ~/.cache/nexvitad_jax."""
    if os.environ.get("NEXVITAD_CACHE"):
        return Path(os.environ["NEXVITAD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nexvitad_jax"


class MVTecDataset:
    """An MVTec-layout folder or `.tar.xz` archive; `load` decodes once and caches as .npz.

    The cache key is the resolved source path, its fingerprint (archive size + mtime, or the
    folder's file names, sizes and mtimes), the image size and the decoder version.
    An archive is read sequentially, never extracted: the first access lists it and decodes
    every category in that same pass (one decompression of the whole archive).
    """

    def __init__(
        self, source: str | os.PathLike, *, image_size: int = 224, cache_dir=None,
        decode_on_scan: bool = True,
    ):
        self.source = Path(source).expanduser().resolve()
        if not self.source.exists():
            raise UserInputError(f"{source}: no such MVTec folder or archive")
        if not isinstance(image_size, int) or image_size < 8:
            raise UserInputError(f"image_size must be an integer >= 8, got {image_size!r}")
        self.image_size = image_size
        self.is_archive = self.source.is_file()
        if self.is_archive and not _looks_like_tar(self.source):
            raise UserInputError(f"{source}: not a tar archive (expected the official .tar.xz)")
        self._memory: dict[tuple[str, str], CategoryArrays] = {}
        self._decode_on_scan = decode_on_scan
        # A single category folder (`.../hazelnut` holding train/ and test/) is accepted too.
        self._single_category = None
        if not self.is_archive and any((self.source / s).is_dir() for s in SPLITS):
            self._single_category = self.source.name
            self.source = self.source.parent
        if self.is_archive:
            stat = self.source.stat()
            fingerprint = f"{stat.st_size}-{stat.st_mtime_ns}"
            self._names = None  # listed lazily: listing a .tar.xz decompresses it
        else:
            self._names = sorted(
                p.relative_to(self.source).as_posix()
                for p in (self.source / (self._single_category or "")).rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            digest = hashlib.sha1()
            for name in self._names:
                st = (self.source / name).stat()
                digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            fingerprint = digest.hexdigest()
        key = hashlib.sha1(
            f"{self.source}|{self._single_category}|{fingerprint}|{image_size}|v{CACHE_VERSION}".encode()
        ).hexdigest()[:16]
        self.cache_dir = Path(cache_dir or default_cache_dir()) / "mvtec" / (
            f"{self.source.name}-{image_size}-{key}"
        )
        self._index = None

    # -- listing
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

        def flush(category: str, final: bool) -> None:
            done.add(category)
            try:
                index = index_members(blobs[category], display).get(category)
            except UserInputError:
                if final:
                    raise
                reopened.add(category)  # e.g. masks stored later: decode it on demand
                del blobs[category]
                return
            for split in SPLITS:
                if index and index[split]:
                    decode_entries(index[split], blobs[category].__getitem__, self.image_size,
                                   description=f"{category}/{split}",
                                   ).save_npz(self.cache_path(category, split))
            del blobs[category]

        try:
            with tarfile.open(self.source, "r:*") as tar:
                for member in tar:
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
                        flush(finished, final=False)
                    blobs.setdefault(category, {})[member.name] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UserInputError(f"{self.source}: unreadable archive ({err})") from None
        for category in list(blobs):
            flush(category, final=True)
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
                folders = (
                    [self.source / self._single_category]
                    if self._single_category
                    else self.source.iterdir()
                )
                for folder in folders:  # categories with no images at all
                    if any((folder / s).is_dir() for s in SPLITS):
                        self._index.setdefault(folder.name, {s: [] for s in SPLITS})
            if not self._index:
                raise UserInputError(
                    f"{self.source}: no MVTec category found (expected "
                    "CATEGORY/train/good/*.png, CATEGORY/test/TYPE/*.png)"
                )
        return self._index

    @property
    def classes(self) -> list[str]:
        return sorted(self.index)

    def cache_path(self, category: str, split: str) -> Path:
        return self.cache_dir / f"{category}_{split}.npz"

    # -- loading
    def load(self, category: str, split: str) -> CategoryArrays:
        """(category, "train" | "test") -> arrays; decoded once, then read from the cache."""
        if split not in SPLITS:
            raise UserInputError(f"split must be 'train' or 'test', got {split!r}")
        if (category, split) in self._memory:
            return self._memory[(category, split)]
        _check_category(self.index, category, split, str(self.source))
        path = self.cache_path(category, split)
        if not path.exists():
            read = self.reader(category)
            # An archive pass is costly: decode and cache both splits from it at once.
            for todo in SPLITS if self.is_archive else (split,):
                if self.index[category][todo]:
                    decode_entries(
                        self.index[category][todo], read, self.image_size,
                        description=f"{category}/{todo}",
                    ).save_npz(self.cache_path(category, todo))
        arrays = CategoryArrays.load_npz(path)
        self._memory[(category, split)] = arrays
        return arrays

    def entries(self, category: str, split: str) -> list[Entry]:
        """The sorted entries of one category split (what `decode_example` consumes)."""
        if split not in SPLITS:
            raise UserInputError(f"split must be 'train' or 'test', got {split!r}")
        _check_category(self.index, category, split, str(self.source))
        return self.index[category][split]

    def reader(self, category: str) -> Callable[[str], bytes]:
        """key -> bytes for this category's entries. For an archive, one sequential pass reads
        the category's members into memory (no extraction to disk)."""
        if not self.is_archive:
            return lambda key: (self.source / key).read_bytes()
        wanted = {
            key
            for entries in self.index[category].values()
            for e in entries
            for key in (e.image_key, e.mask_key)
            if key is not None
        }
        blobs: dict[str, bytes] = {}
        try:
            with tarfile.open(self.source, "r:*") as tar:
                for member in tar:
                    if member.name in wanted:
                        blobs[member.name] = tar.extractfile(member).read()
                        if len(blobs) == len(wanted):
                            break
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UserInputError(f"{self.source}: unreadable archive ({err})") from None
        return blobs.__getitem__
