"""VisA from its official folder: the one-class split `split_csv/1cls.csv`.

    ROOT/split_csv/1cls.csv                 object,split,label,image,mask (paths relative to ROOT)
    ROOT/OBJECT/Data/Images/{Normal,Anomaly}/NNN.JPG
    ROOT/OBJECT/Data/Masks/Anomaly/NNN.png  0/255 or 0/1: any non-zero pixel is defect
    ROOT/OBJECT/image_anno.csv              image,label,mask: the defect description per image

Rows labelled `normal` are good images, `anomaly` defect images (they need their mask); train rows
must be normal. The defect type of an anomalous image is its `image_anno.csv` label made file-safe
("chunk of wax missing" -> chunk_of_wax_missing), or "anomaly" where the object has no such file.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from nexvitad_jax.data.cached import CachedDataset, fingerprint
from nexvitad_jax.data.decode import Entry, make_entry
from nexvitad_jax.errors import UserInputError

SPLIT_FILE = "split_csv/1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": "good", "anomaly": "anomaly"}


def _rows(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file with at least `columns` (a UTF-8 BOM is accepted)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserInputError(f"{path}: not a readable CSV file ({err})") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise UserInputError(f"{path}: columns {missing} missing; expected the header {','.join(columns)} "
                             f"(found {reader.fieldnames})")
    return [(i + 2, {k: (v or "").strip() for k, v in row.items() if k}) for i, row in enumerate(reader)]


def defect_slug(label: str) -> str:
    """A defect description as a file-safe defect type ("bent,melt" -> bent_melt)."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "anomaly"


def _annotations(root: Path, objects: set[str]) -> dict[str, str]:
    """{image path: defect type} from every OBJECT/image_anno.csv present."""
    types = {}
    for name in sorted(objects):
        path = root / name / "image_anno.csv"
        if path.is_file():
            for _, row in _rows(path, ("image", "label")):
                if row["label"] and row["label"] != "normal":
                    types[row["image"]] = defect_slug(row["label"])
    return types


def _entry(root: Path, split_file: Path, line: int, row: dict[str, str], types: dict[str, str]) -> Entry:
    where = f"{split_file} line {line}"
    if row["split"] not in ("train", "test"):
        raise UserInputError(f"{where}: split {row['split']!r}; expected 'train' or 'test'")
    if row["label"] not in LABELS:
        raise UserInputError(f"{where}: label {row['label']!r}; expected 'normal' or 'anomaly'")
    anomalous = row["label"] == "anomaly"
    if anomalous and row["split"] == "train":
        raise UserInputError(f"{where}: an anomaly in the train split; the one-class split trains on normal "
                             "images only")
    if anomalous and not row["mask"]:
        raise UserInputError(f"{where}: anomalous image {row['image']} without its mask; expected a mask path "
                             "such as OBJECT/Data/Masks/Anomaly/NNN.png")
    keys = [row["image"]] + ([row["mask"]] if anomalous else [])
    for key in keys:
        if not (root / key).is_file():
            raise UserInputError(f"{where}: {root / key} not found (paths are relative to {root})")
    defect_type = types.get(row["image"], "anomaly") if anomalous else "good"
    return make_entry(row["split"], defect_type, row["image"], keys[1:], lambda key: str(root / key),
                      mask_threshold=0)


class VisADataset(CachedDataset):
    """The VisA folder (its `split_csv/1cls.csv` names every image, split and mask)."""

    layout, slug = "VisA", "visa"

    def __init__(self, root, *, image_size: int = 224, cache_dir=None):
        root = Path(root).expanduser().resolve()
        split_file = root / SPLIT_FILE
        if not split_file.is_file():
            raise UserInputError(f"{root}: no {SPLIT_FILE}; expected the official VisA folder (split_csv/1cls.csv, "
                                 "OBJECT/Data/Images, OBJECT/Data/Masks)")
        rows = _rows(split_file, COLUMNS)
        if not rows:
            raise UserInputError(f"{split_file}: no rows; expected one row per image ({','.join(COLUMNS)})")
        types = _annotations(root, {row["object"] for _, row in rows})
        self.index: dict[str, dict[str, list[Entry]]] = {}
        for line, row in rows:
            entry = _entry(root, split_file, line, row, types)
            self.index.setdefault(row["object"], {}).setdefault(entry.split, []).append(entry)
        for splits in self.index.values():
            for entries in splits.values():
                entries.sort(key=lambda e: (e.defect_type, e.image_key))
        used = sorted(k for _, row in rows for k in (row["image"], row["mask"]) if k)
        self._init_cache(root, root.name, image_size, cache_dir,
                         f"{root}|{fingerprint(root, used, split_file.read_bytes())}")
        annotated = "defect types from OBJECT/image_anno.csv" if types else \
            "no OBJECT/image_anno.csv: every anomalous image has the defect type 'anomaly'"
        self._say([f"the one-class split {SPLIT_FILE}; {annotated}; masks: any non-zero pixel is defect"])

    def _expected(self, category: str, split: str) -> str:
        return f"rows '{category},{split},...' in {SPLIT_FILE}"
