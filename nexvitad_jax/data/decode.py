"""The one decode path of every reader (each layout, the archive, the TFDS builder): an `Entry`
names an image and its masks; `decode_entries` turns entries into a `CategoryArrays`.

Image handling (documented, tested):
- 8-bit grey (L) and palette (P) images become RGB; RGBA / LA drop the alpha channel;
  16-bit grey (I;16, I) is scaled to 8 bit (value >> 8).
- Images are resized bilinearly to `image_size` x `image_size`; masks with nearest neighbour.
- A mask pixel is anomalous where its 8-bit value is > the entry's `mask_threshold`: 127 (half
  of full scale, DESIGN.md) for MVTec AD, MPDD, 3D-AD and BTAD; 0 for VisA (0/1 or 0/255 masks),
  MVTec LOCO (one grey level per defect) and, by default, a folder spec; a JPEG mask always
  uses 127 (its compression noise is not a defect). Several masks of one image (LOCO) are united.
- A mask must have its image's size; a corrupt file raises `UserInputError` naming it.
- An anomalous image without any mask (a folder spec may have them) has `mask_known` False and
  an all-False mask: its pixels must not count in pixel metrics nor train a segmentation.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from nexvitad_jax.errors import UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
HALF_SCALE = 127  # > 0.5 of 255


@dataclasses.dataclass
class CategoryArrays:
    """One category split as arrays; row i of every field describes the same image."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    masks: np.ndarray  # bool (N, H, W); all False where mask_known is False
    labels: np.ndarray  # int32 (N,), 0 good, 1 defect
    defect_types: list[str]  # "good" for normal images
    paths: list[str]
    mask_known: np.ndarray | None = None  # bool (N,): False for a defect image without a mask

    def __post_init__(self):
        if self.mask_known is None:
            self.mask_known = np.ones(len(self.paths), bool)
        self.mask_known = np.asarray(self.mask_known, bool)

    def __len__(self) -> int:
        return len(self.paths)

    def unmasked_reason(self) -> str | None:
        """None when every anomalous image has its mask, else why pixel metrics leave some out
        ("no masks for defect types dent (2 of 5 anomalous images)")."""
        missing = Counter(t for t, known in zip(self.defect_types, self.mask_known) if not known)
        if not missing:
            return None
        types = ", ".join(f"{t}" for t in sorted(missing))
        return (f"no masks for defect types {types} ({sum(missing.values())} of "
                f"{int(self.labels.sum())} anomalous images)")

    def save_npz(self, path: Path) -> None:
        """Write atomically (a reader never sees a half-written cache file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
        np.savez(
            tmp, images=self.images, masks=self.masks, labels=self.labels,
            defect_types=np.asarray(self.defect_types, dtype=str),
            paths=np.asarray(self.paths, dtype=str), mask_known=self.mask_known,
        )
        os.replace(tmp, path)

    @classmethod
    def load_npz(cls, path: Path) -> "CategoryArrays":
        with np.load(path) as z:
            return cls(
                images=z["images"], masks=z["masks"], labels=z["labels"],
                defect_types=[str(s) for s in z["defect_types"]], paths=[str(s) for s in z["paths"]],
                mask_known=z["mask_known"] if "mask_known" in z.files else None,
            )


@dataclasses.dataclass(frozen=True)
class Entry:
    """One image of a category split: where to read it and its masks (none for good images)."""

    split: str
    defect_type: str
    image_key: str
    mask_keys: tuple[str, ...]
    display_path: str
    mask_display_paths: tuple[str, ...] = ()
    mask_threshold: int = HALF_SCALE
    mask_known: bool = True


def make_entry(split: str, defect_type: str, key: str, mask_keys, display: Callable[[str], str], *,
               mask_threshold: int = HALF_SCALE, mask_known: bool = True) -> Entry:
    """An Entry whose display paths come from `display(key)`."""
    mask_keys = tuple(mask_keys)
    return Entry(split, defect_type, key, mask_keys, display(key), tuple(display(k) for k in mask_keys),
                 mask_threshold, mask_known)


def count_entries(index: dict[str, list[Entry]]) -> dict[str, Counter]:
    """{split: Counter(defect type -> images)} of one category's entries."""
    return {split: Counter(e.defect_type for e in entries) for split, entries in index.items() if entries}


# ---------------------------------------------------------------------------------------------
# Decoding


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
    """PNG/JPEG/BMP/TIFF bytes -> (uint8 (S, S, 3) RGB resized bilinearly, original (H, W))."""
    pixels = _to_uint8_channels(_open(data, name))
    original_hw = pixels.shape[:2]
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)  # the grey classes become 3 channels
    resized = Image.fromarray(pixels, "RGB").resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(resized, dtype=np.uint8), original_hw


def decode_mask(data: bytes, name: str, image_size: int, expected_hw: tuple[int, int], image_name: str,
                threshold: int = HALF_SCALE) -> np.ndarray:
    """Mask bytes -> bool (S, S): nearest resize, then value > threshold (8-bit scale)."""
    if name.lower().endswith((".jpg", ".jpeg")) and threshold < HALF_SCALE:
        threshold = HALF_SCALE  # JPEG noise around 0 would read as defect
    pixels = _to_uint8_channels(_open(data, name))
    if pixels.shape[:2] != tuple(expected_hw):
        raise UserInputError(
            f"{name}: mask is {pixels.shape[1]}x{pixels.shape[0]} but its image {image_name} is "
            f"{expected_hw[1]}x{expected_hw[0]}; a mask must have its image's size"
        )
    grey = pixels.max(axis=-1)  # an RGB mask counts where any channel is set
    return resize_nearest(grey, image_size) > threshold


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


def decode_example(entry: Entry, read: Callable[[str], bytes], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One entry -> (image uint8 (S, S, 3), mask bool (S, S)): the union of its masks."""
    image, original_hw = decode_image(read(entry.image_key), entry.display_path, image_size)
    mask = np.zeros((image_size, image_size), dtype=bool)
    for key, name in zip(entry.mask_keys, entry.mask_display_paths):
        mask |= decode_mask(read(key), name, image_size, original_hw, entry.display_path, entry.mask_threshold)
    return image, mask


def decode_entries(entries: list[Entry], read: Callable[[str], bytes], image_size: int, *,
                   description: str = "", workers: int | None = None) -> CategoryArrays:
    """Decode every entry (threads: Pillow releases the GIL while decoding and resizing)."""
    from tqdm.auto import tqdm

    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(lambda e: decode_example(e, read, image_size), entries),
                            total=len(entries), desc=f"decoding {description}", leave=False,
                            disable=len(entries) < 64))
    n = len(entries)
    images = np.zeros((n, image_size, image_size, 3), np.uint8)
    masks = np.zeros((n, image_size, image_size), bool)
    for i, (image, mask) in enumerate(results):
        images[i], masks[i] = image, mask
    return CategoryArrays(
        images=images, masks=masks,
        labels=np.asarray([e.defect_type != "good" for e in entries], np.int32),
        defect_types=[e.defect_type for e in entries], paths=[e.display_path for e in entries],
        mask_known=np.asarray([e.mask_known for e in entries], bool),
    )
