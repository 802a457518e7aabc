"""Plain folders described by a YAML or JSON file (`--data mydata.yaml`):

    classes:
      bracket:                          # class name (letters, digits, _ . -)
        normal: images/good             # a folder or a list of folders
        abnormal:                       # defect type -> a folder, or {images: folder, masks: folder}
          scratch: {images: images/scratch, masks: masks/scratch}
          dent: images/dent             # no masks: image metrics only for these
        test_normal: 0.2                # share of the normal images kept for test, or folder(s)
        seed: 0                         # draws that share (default 0)
        mask_suffix: _mask              # optional: a mask's stem is the image's stem + this
        mask_threshold: 0               # optional: a mask pixel is defect where its value > this

Paths are relative to the file. `abnormal` may also be a list of folders (each a defect type named
after its folder). Images are the folder's .png/.jpg/.jpeg/.bmp/.tif/.tiff files (not recursive),
of any mode and size. A mask is matched to its image by file stem: STEM + mask_suffix with any image
extension; without mask_suffix, STEM or STEM_mask. A defect type without masks keeps its images
with `mask_known` False: image metrics use them, pixel metrics and training do not.
Defaults: test_normal 0.2, seed 0, mask_suffix (STEM or STEM_mask), mask_threshold 0 (any non-zero
pixel; a JPEG mask always uses 127).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from nexvitad_jax.data.cached import CachedDataset, fingerprint
from nexvitad_jax.data.decode import IMAGE_SUFFIXES, Entry, make_entry
from nexvitad_jax.errors import UserInputError

SPEC_SUFFIXES = (".yaml", ".yml", ".json")
CLASS_KEYS = {"normal", "abnormal", "test_normal", "seed", "mask_suffix", "mask_threshold"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _parse(path: Path, text: str):
    """JSON by `json`, YAML by PyYAML's safe loader."""
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except ValueError as err:
            raise UserInputError(f"{path}: not valid JSON ({err})") from None
    try:
        import yaml
    except ImportError:
        raise UserInputError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write the spec as "
                             "JSON") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserInputError(f"{path}: not valid YAML ({err})") from None


def read_spec(path: Path) -> dict:
    """The file as a mapping with a non-empty 'classes' mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserInputError(f"{path}: not a readable folder spec ({err})") from None
    spec = _parse(path, text)
    if not isinstance(spec, dict) or not isinstance(spec.get("classes"), dict) or not spec["classes"]:
        raise UserInputError(f"{path}: expected a mapping with 'classes: {{NAME: {{normal: FOLDER, abnormal: "
                             "{TYPE: FOLDER}}}}'")
    unknown = sorted(set(spec) - {"classes"})
    if unknown:
        raise UserInputError(f"{path}: unknown keys {unknown}; expected only 'classes'")
    return spec


class _ClassSpec:
    """One class of the file: its images found, split and matched to their masks."""

    def __init__(self, path: Path, name: str, spec):
        self.file, self.name, self.where = path, name, f"{path}: classes.{name}"
        if not NAME.fullmatch(str(name)):
            raise UserInputError(f"{self.where}: class names are letters, digits, _ . - (they name files)")
        if not isinstance(spec, dict) or "normal" not in spec:
            raise UserInputError(f"{self.where}: expected a mapping with at least 'normal: FOLDER'")
        unknown = sorted(set(spec) - CLASS_KEYS)
        if unknown:
            raise UserInputError(f"{self.where}: unknown keys {unknown}; expected some of {sorted(CLASS_KEYS)}")
        self.spec = spec
        self.seed = self._int("seed", 0, 0)
        self.threshold = self._int("mask_threshold", 0, 0, 254)
        self.suffix = spec.get("mask_suffix")
        if self.suffix is not None and not isinstance(self.suffix, str):
            raise UserInputError(f"{self.where}.mask_suffix: expected a string such as _mask, got {self.suffix!r}")

    def _int(self, key: str, default: int, low: int, high: int | None = None) -> int:
        value = self.spec.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise UserInputError(f"{self.where}.{key}: expected an integer >= {low}"
                                 f"{f' and <= {high}' if high is not None else ''}, got {value!r}")
        return value

    def folder(self, value, key: str) -> Path:
        if not isinstance(value, str) or not value:
            raise UserInputError(f"{self.where}.{key}: expected a folder path, got {value!r}")
        folder = (self.file.parent / value).resolve()
        if not folder.is_dir():
            raise UserInputError(f"{self.where}.{key}: {folder} is not a folder (paths are relative to "
                                 f"{self.file.parent})")
        return folder

    def images(self, value, key: str) -> list[Path]:
        """The images of a folder or a list of folders, sorted; at least one."""
        folders = value if isinstance(value, list) else [value]
        found = sorted(p for i, v in enumerate(folders)
                       for p in self.folder(v, key if len(folders) == 1 else f"{key}[{i}]").iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise UserInputError(f"{self.where}.{key}: no images in {value!r} (expected {', '.join(IMAGE_SUFFIXES)})")
        return found

    def normal_split(self) -> tuple[list[Path], list[Path]]:
        """(train, test) normal images: test_normal is a share drawn by seed, or folder(s)."""
        normal = self.images(self.spec["normal"], "normal")
        share = self.spec.get("test_normal", 0.2)
        if isinstance(share, (str, list)):
            test = self.images(share, "test_normal")
            overlap = sorted(set(normal) & set(test))
            if overlap:
                raise UserInputError(f"{self.where}: {overlap[0]} is both a normal (train) and a test_normal image")
            return normal, test
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
            raise UserInputError(f"{self.where}.test_normal: expected a share in (0, 1) or folder(s), got {share!r}")
        if len(normal) < 2:
            raise UserInputError(f"{self.where}.normal: {len(normal)} image; a share for test needs at least 2")
        n_test = min(max(1, round(share * len(normal))), len(normal) - 1)
        held = set(np.random.default_rng(self.seed).permutation(len(normal))[:n_test].tolist())
        return [p for i, p in enumerate(normal) if i not in held], [p for i, p in enumerate(normal) if i in held]

    def defect_folders(self) -> dict[str, tuple[object, object]]:
        """{defect type: (images value, masks value or None)}."""
        abnormal = self.spec.get("abnormal") or {}
        if isinstance(abnormal, (str, list)):
            folders = abnormal if isinstance(abnormal, list) else [abnormal]
            abnormal = {Path(str(f)).name: f for f in folders}
            if len(abnormal) < len(folders):
                raise UserInputError(f"{self.where}.abnormal: two folders share a name; give the defect types "
                                     "as a mapping TYPE: FOLDER")
        if not isinstance(abnormal, dict):
            raise UserInputError(f"{self.where}.abnormal: expected TYPE: FOLDER (or {{images, masks}}) entries")
        defects = {}
        for defect_type, value in abnormal.items():
            key = f"abnormal.{defect_type}"
            if not NAME.fullmatch(str(defect_type)) or defect_type == "good":
                raise UserInputError(f"{self.where}.{key}: a defect type is letters, digits, _ . - and not 'good'")
            if isinstance(value, dict):
                extra = sorted(set(value) - {"images", "masks"})
                if extra or "images" not in value:
                    raise UserInputError(f"{self.where}.{key}: expected {{images: FOLDER, masks: FOLDER}}, got "
                                         f"keys {sorted(value)}")
                value = (value["images"], value.get("masks"))
            else:
                value = (value, None)
            defects[str(defect_type)] = value
        return defects

    def mask_of(self, image: Path, masks: dict[str, list[Path]], folder: Path) -> Path:
        """The mask of an image by stem (+ suffix); an error names what was looked for."""
        suffixes = [self.suffix] if self.suffix is not None else ["", "_mask"]
        found = [m for s in suffixes for m in masks.get(image.stem + s, [])]
        if len(found) != 1:
            looked = " or ".join(f"{image.stem}{s}.*" for s in suffixes)
            problem = "no mask" if not found else f"{len(found)} masks ({', '.join(p.name for p in found)})"
            raise UserInputError(f"{self.where}: {image}: {problem} in {folder}; expected one {looked} "
                                 f"(an image extension: {', '.join(IMAGE_SUFFIXES)})")
        return found[0]

    def entries(self) -> tuple[dict[str, list[Entry]], list[str]]:
        """({split: entries}, defect types without masks)."""
        train, test = self.normal_split()

        def entry(split: str, kind: str, image: Path, masks=(), known: bool = True) -> Entry:
            return make_entry(split, kind, str(image), [str(m) for m in masks], str,
                              mask_threshold=self.threshold, mask_known=known)

        splits = {"train": [entry("train", "good", p) for p in train], "test": [entry("test", "good", p) for p in test]}
        unmasked = []
        for defect_type, (images, masks) in self.defect_folders().items():
            key = f"abnormal.{defect_type}"
            files = self.images(images, f"{key}.images" if masks else key)
            if masks is None:
                unmasked.append(defect_type)
                splits["test"] += [entry("test", defect_type, p, known=False) for p in files]
                continue
            folder = self.folder(masks, f"{key}.masks")
            by_stem: dict[str, list[Path]] = {}
            for m in sorted(folder.iterdir()):
                if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES:
                    by_stem.setdefault(m.stem, []).append(m)
            splits["test"] += [entry("test", defect_type, p, [self.mask_of(p, by_stem, folder)]) for p in files]
        splits["test"].sort(key=lambda e: (e.defect_type, e.image_key))
        return splits, unmasked


class FolderSpecDataset(CachedDataset):
    """Classes of plain image folders described by a YAML/JSON file (see the module docstring)."""

    layout, slug = "folder spec", "folder_spec"

    def __init__(self, path, *, image_size: int = 224, cache_dir=None):
        path = Path(path).expanduser().resolve()
        spec = read_spec(path)
        self.index, notes = {}, []
        for name, class_spec in spec["classes"].items():
            parsed = _ClassSpec(path, str(name), class_spec)
            self.index[str(name)], unmasked = parsed.entries()
            if unmasked:
                notes.append(f"{name}: no masks for {', '.join(unmasked)}: those images count in image metrics "
                             "only (pixel metrics and training leave them out)")
        used = sorted(k for splits in self.index.values() for es in splits.values() for e in es
                      for k in (e.image_key, *e.mask_keys))
        self._init_cache(path.parent, path.stem, image_size, cache_dir,
                         f"{path}|{fingerprint(Path('/'), used, path.read_bytes())}")
        self.spec_path = path
        self._say(notes)

    def _expected(self, category: str, split: str) -> str:
        return f"classes.{category}.{'normal' if split == 'train' else 'abnormal / test_normal'} in {self.spec_path}"
