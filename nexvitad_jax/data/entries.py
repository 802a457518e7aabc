"""From parsed file names to entries: the rule every folder layout shares (only test/ holds defect
types; a defect image needs its masks), so each layout only says where its images and masks are."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Callable

from nexvitad_jax.data.decode import HALF_SCALE, Entry, make_entry
from nexvitad_jax.errors import UserInputError

ImageKey = tuple[str, str, str, str]  # (class, split, defect type, file name)
MaskKey = tuple[str, str, str, str]  # (class, split, defect type, image stem)


def index_images(
    images: dict[ImageKey, str],
    masks: dict[MaskKey, tuple[str, ...]],
    display: Callable[[str], str],
    expected_mask: Callable[[str, str, str], str],
    *,
    threshold: int = HALF_SCALE,
    good: str = "good",
) -> dict[str, dict[str, list[Entry]]]:
    """{class: {split: [Entry, ...]}} sorted by (defect type, file name).

    `images` maps (class, split, defect type, file name) to the image's key, `masks` maps
    (class, split, defect type, image stem) to its mask keys; `expected_mask(class, type, stem)`
    says where a missing mask should be; `good` is the layout's name of normal images (BTAD: ok).
    """
    index: dict[str, dict[str, list[Entry]]] = {}
    for (category, split, defect_type, filename), key in sorted(images.items()):
        stem = PurePosixPath(filename).stem
        mask_keys: tuple[str, ...] = ()
        if defect_type != "good":
            if split != "test":
                raise UserInputError(f"{display(key)}: {split}/ must hold only {split}/{good} (found defect "
                                     f"type {defect_type!r})")
            mask_keys = masks.get((category, split, defect_type, stem), ())
            if not mask_keys:
                raise UserInputError(f"{display(key)}: defect image without its mask; expected "
                                     f"{expected_mask(category, defect_type, stem)}")
        index.setdefault(category, {}).setdefault(split, []).append(
            make_entry(split, defect_type, key, mask_keys, display, mask_threshold=threshold))
    return index
