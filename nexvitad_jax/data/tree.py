"""Folder layouts of one class per folder, told apart by the folders a class holds:

- MVTec LOCO: `CLASS/{train,validation,test}/TYPE/NNN.png`, several masks per defect image in
  `CLASS/ground_truth/TYPE/NNN/000.png, 001.png, ...` (united; any non-zero pixel is defect);
  defect types logical_anomalies and structural_anomalies.
- MVTec 3D-AD: `CLASS/{train,validation,test}/TYPE/{rgb,gt,xyz}/NNN.png|tiff`: the RGB image and
  its `gt` mask; the depth maps (xyz) are ignored, and the reader says so once.
- BTAD: `NN/train/ok`, `NN/test/{ok,ko}`, masks `NN/ground_truth/ko/STEM.*` matched by file stem
  (the products mix .bmp and .png; a .bmp image may have a .png mask). `ok` is normal ("good"),
  `ko` the one defect type.
- MVTec AD and MPDD: `CLASS/{train,test}/TYPE/NNN.png`, `CLASS/ground_truth/TYPE/NNN_mask.png`
  (read by `mvtec.MVTecDataset`, which also reads the archive).

validation/ (LOCO, 3D-AD) stays a split of its own, `load(class, "validation")`: runs neither train
nor evaluate on it (the protocol's normal images are train/good, as for MVTec AD).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path, PurePosixPath
from typing import Callable

from nexvitad_jax.data.cached import SPLIT_ORDER, CachedDataset, fingerprint, list_files
from nexvitad_jax.data.decode import IMAGE_SUFFIXES, Entry
from nexvitad_jax.data.entries import index_images
from nexvitad_jax.data.mvtec import index_members
from nexvitad_jax.errors import UserInputError

Index = dict[str, dict[str, list[Entry]]]


@dataclasses.dataclass(frozen=True)
class TreeLayout:
    """One folder layout: how to recognize a class folder, and how to index its files."""

    name: str  # as `nexvitad data info` says it
    slug: str  # the cache folder
    signature: tuple[str, ...]  # folders (relative to a class folder) any of which marks the layout
    expected: str  # a class folder's files, for messages
    image_pattern: str  # where a split's images are: "{split}/{type}/rgb/*.png"
    good: str  # the normal images' folder name
    index: Callable[[list[str], Callable[[str], str]], Index]  # names relative to the root -> index
    notes: Callable[[list[str], Index], tuple[list[str], list[str]]] = lambda names, index: ([], [])


def _parts(name: str) -> tuple[str, ...]:
    return PurePosixPath(name).parts


def _validation_note(index: Index) -> list[str]:
    held = sum(len(splits.get("validation", [])) for splits in index.values())
    if not held:
        return []
    return [f"validation/good ({held} images) is kept as split 'validation' and not used: runs take their "
            "normal images from train/good and evaluate on test/"]


def _index_loco(names: list[str], display) -> Index:
    images, masks = {}, {}
    for name in names:
        parts = _parts(name)
        if len(parts) >= 5 and parts[-4] == "ground_truth":
            category, _, defect_type, stem, _ = parts[-5:]
            masks.setdefault((category, "test", defect_type, stem), []).append(name)
        elif len(parts) >= 4 and parts[-3] in SPLIT_ORDER:
            category, split, defect_type, filename = parts[-4:]
            images[(category, split, defect_type, filename)] = name
    return index_images(images, {key: tuple(sorted(keys)) for key, keys in masks.items()}, display,
                        lambda c, t, s: f"{c}/ground_truth/{t}/{s}/000.png", threshold=0)


def _notes_loco(names: list[str], index: Index):
    return ["defect types logical_anomalies and structural_anomalies; an image's masks "
            "(ground_truth/TYPE/NNN/*.png) are united, any non-zero pixel is defect",
            *_validation_note(index)], []


def _index_mvtec3d(names: list[str], display) -> Index:
    images, masks = {}, {}
    for name in names:
        parts = _parts(name)
        if len(parts) < 5 or parts[-4] not in SPLIT_ORDER:
            continue
        category, split, defect_type, kind, filename = parts[-5:]
        if kind == "rgb":
            images[(category, split, defect_type, filename)] = name
        elif kind == "gt":
            masks[(category, split, defect_type, PurePosixPath(filename).stem)] = (name,)
    return index_images(images, masks, display, lambda c, t, s: f"{c}/test/{t}/gt/{s}.png")


def _notes_mvtec3d(names: list[str], index: Index):
    depth = sum(1 for name in names if len(_parts(name)) >= 5 and _parts(name)[-2] == "xyz")
    return _validation_note(index), [f"depth ignored: {depth} xyz/*.tiff files are not read (RGB images and "
                                     "gt masks only)"]


def _index_btad(names: list[str], display) -> Index:
    images, masks = {}, {}
    for name in names:
        parts = _parts(name)
        if len(parts) < 4:
            continue
        category, split, label, filename = parts[-4:]
        if split in ("train", "test") and label in ("ok", "ko"):
            images[(category, split, "good" if label == "ok" else label, filename)] = name
        elif split == "ground_truth":
            key = (category, "test", label, PurePosixPath(filename).stem)
            if key in masks:
                raise UserInputError(f"{display(name)} and {display(masks[key][0])}: two masks for the image "
                                     f"stem {key[3]!r}; expected one mask per image")
            masks[key] = (name,)
    return index_images(images, masks, display, lambda c, t, s: f"{c}/ground_truth/{t}/{s}.png", good="ok")


def _notes_btad(names: list[str], index: Index):
    return ["ok is normal ('good'), ko is the defect type 'ko'; masks matched to images by file stem"], []


# Detection order: the more specific layouts first (LOCO and 3D-AD also hold train/good).
TREE_LAYOUTS: tuple[TreeLayout, ...] = (
    TreeLayout("MVTec LOCO", "mvtec_loco", ("test/logical_anomalies", "test/structural_anomalies"),
               "CLASS/{train,validation,test}/TYPE/NNN.png, CLASS/ground_truth/TYPE/NNN/000.png",
               "{split}/{type}/*.png", "good", _index_loco, _notes_loco),
    TreeLayout("MVTec 3D-AD", "mvtec_3d", ("train/good/rgb", "validation/good/rgb", "test/good/rgb"),
               "CLASS/{train,validation,test}/TYPE/{rgb,gt,xyz}/NNN.png|tiff",
               "{split}/{type}/rgb/*.png", "good", _index_mvtec3d, _notes_mvtec3d),
    TreeLayout("BTAD", "btad", ("train/ok", "test/ok", "test/ko"),
               "NN/train/ok/*.bmp|png, NN/test/{ok,ko}/*, NN/ground_truth/ko/*.png|bmp",
               "{split}/{type}/*.bmp|png", "ok", _index_btad, _notes_btad),
    TreeLayout("MVTec AD", "mvtec", ("train/good", "test/good"),
               "CLASS/{train,test}/TYPE/NNN.png, CLASS/ground_truth/TYPE/NNN_mask.png",
               "{split}/{type}/*.png", "good", index_members),
)


def _holds_splits(folder: Path) -> bool:
    return any((folder / split).is_dir() for split in ("train", "test"))


def classify(folder: Path) -> TreeLayout | None:
    """The layout a class folder matches (its signature folders), or None."""
    return next((layout for layout in TREE_LAYOUTS if any((folder / s).is_dir() for s in layout.signature)), None)


def _expected_layouts() -> str:
    return "; ".join(f"{layout.name}: {layout.expected}" for layout in TREE_LAYOUTS)


def detect_tree_layout(root: Path) -> tuple[TreeLayout, list[str], str | None]:
    """(layout, class folder names, the class name when `root` is one class folder).

    Every class folder (a folder holding train/ or test/) must match the same layout; a folder that
    matches none, or two layouts in one root, is an error naming them and what was expected."""
    single = root.name if _holds_splits(root) else None
    folders = [root] if single else sorted(d for d in root.iterdir() if d.is_dir() and _holds_splits(d))
    found = {folder.name: classify(folder) for folder in folders}
    unknown = sorted(name for name, layout in found.items() if layout is None)
    if unknown:
        where = root if single else ", ".join(str(root / name) for name in unknown)
        raise UserInputError(f"{where}: holds train/ or test/ but matches no known layout; expected one of "
                             f"{_expected_layouts()}")
    if not found:
        raise UserInputError(f"{root}: no dataset layout recognized (no class folder holding train/ or test/); "
                             f"expected a folder spec (.yaml/.json), VisA (split_csv/1cls.csv) or one of "
                             f"{_expected_layouts()}")
    by_layout: dict[str, list[str]] = {}
    for name, layout in found.items():
        by_layout.setdefault(layout.name, []).append(name)
    if len(by_layout) > 1:
        mixed = "; ".join(f"{layout} in {', '.join(names)}" for layout, names in by_layout.items())
        raise UserInputError(f"{root}: mixed dataset layouts ({mixed}); a dataset folder holds one layout: "
                             "point --data at one of them (and --target-data at another)")
    return next(iter(found.values())), list(found), single


class TreeDataset(CachedDataset):
    """A MVTec LOCO, MVTec 3D-AD or BTAD folder (one folder per class), or one class folder."""

    def __init__(self, root: Path, layout: TreeLayout, categories: list[str], single: str | None, *,
                 image_size: int = 224, cache_dir=None):
        root = Path(root).resolve()
        if single:
            root = root.parent
        self.tree_layout, self.layout, self.slug = layout, layout.name, layout.slug
        names = list_files(root, categories, IMAGE_SUFFIXES)
        self.index = layout.index(names, lambda key: str(root / key))
        for category in categories:  # class folders with no images at all
            self.index.setdefault(category, {})
        used = sorted(k for splits in self.index.values() for es in splits.values() for e in es
                      for k in (e.image_key, *e.mask_keys))
        self._init_cache(root, single or root.name, image_size, cache_dir,
                         f"{layout.slug}|{root}|{single}|{fingerprint(root, used)}")
        infos, warnings = layout.notes(names, self.index)
        self.notes = []
        self._say(infos)
        self._say(warnings, logging.WARNING)

    def _expected(self, category: str, split: str) -> str:
        kind = "TYPE" if split == "test" else self.tree_layout.good
        return f"{category}/" + self.tree_layout.image_pattern.format(split=split, type=kind)
