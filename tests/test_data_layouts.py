"""Every official layout, read from tiny trees built here in that layout (each with its quirks), and
compared with what the tree was built to hold; layout detection and its errors; the decode cache.

The builders are shared with test_data_tfds.py and test_data_command.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nexvitad_jax.data import archive as archives
from nexvitad_jax.data import decode, open_dataset
from nexvitad_jax.errors import UserInputError

S = 16  # fixture images are S x S, read at image_size S: what is read equals what was written


@dataclasses.dataclass
class Expected:
    """One image as the reader should return it."""

    defect_type: str
    path: Path
    pixels: np.ndarray  # uint8 (S, S, 3)
    mask: np.ndarray  # bool (S, S)


class Tree:
    """A dataset tree under construction: writes files and records what a reader should return."""

    def __init__(self, root: Path, layout: str, seed: int = 0):
        self.root, self.layout = root, layout
        self.rng = np.random.default_rng(seed)
        self.expected: dict[str, dict[str, list[Expected]]] = {}

    def write(self, rel: str, array: np.ndarray, mode: str | None = None) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array, mode).save(path)
        return path

    def image(self, rel: str, category: str, split: str, defect_type: str = "good") -> Expected:
        path = self.write(rel, self.rng.integers(0, 256, (S, S, 3), np.uint8))
        pixels = np.asarray(Image.open(path).convert("RGB"))  # a JPEG reads back as decoded
        record = Expected(defect_type, path.resolve(), pixels, np.zeros((S, S), bool))
        self.expected.setdefault(category, {}).setdefault(split, []).append(record)
        return record

    def mask(self, rel: str, record: Expected, value: int = 255) -> Path:
        """A random rectangle of `value` on 0; the reader should see it (united with earlier ones)."""
        top, left = self.rng.integers(0, S // 2, 2)
        region = np.zeros((S, S), bool)
        region[top: top + 5, left: left + 6] = True
        record.mask |= region
        return self.write(rel, np.where(region, value, 0).astype(np.uint8))

    def sort(self) -> "Tree":
        for splits in self.expected.values():
            for records in splits.values():
                records.sort(key=lambda r: (r.defect_type, str(r.path)))
        return self


def build_mvtec(root: Path, classes=("alpha", "beta"), layout="MVTec AD") -> Tree:
    tree = Tree(root, layout)
    for c in classes:
        for i in range(3):
            tree.image(f"{c}/train/good/{i:03d}.png", c, "train")
        tree.image(f"{c}/test/good/000.png", c, "test")
        for defect in ("crack", "hole"):
            tree.mask(f"{c}/ground_truth/{defect}/000_mask.png", tree.image(f"{c}/test/{defect}/000.png", c, "test", defect))
        (root / c / "license.txt").write_text("not an image")
    return tree.sort()


def build_mpdd(root: Path) -> Tree:
    return build_mvtec(root, ("bracket_black", "metal_plate"), "MPDD (MVTec AD layout)")


def build_mvtec3d(root: Path) -> Tree:
    """RGB + gt + xyz (depth, ignored) per image; a validation split; test/good has empty gt too."""
    tree = Tree(root, "MVTec 3D-AD", seed=1)
    depth = np.zeros((S, S), np.float32)
    for c in ("bagel", "cookie"):
        images = [("train", "good", i) for i in range(3)] + [("validation", "good", 0), ("test", "good", 0),
                                                              ("test", "crack", 0), ("test", "hole", 0)]
        for split, defect, i in images:
            record = tree.image(f"{c}/{split}/{defect}/rgb/{i:03d}.png", c, split, defect)
            tree.write(f"{c}/{split}/{defect}/xyz/{i:03d}.tiff", depth, "F")
            if split == "test":
                gt = f"{c}/{split}/{defect}/gt/{i:03d}.png"
                tree.mask(gt, record) if defect != "good" else tree.write(gt, np.zeros((S, S), np.uint8))
        (root / c / "calibration").mkdir()
        (root / c / "calibration" / "camera_parameters.json").write_text("{}")
    return tree.sort()


def build_loco(root: Path) -> Tree:
    """Several masks per defect image (000.png, 001.png: united), grey levels other than 255."""
    tree = Tree(root, "MVTec LOCO", seed=2)
    for c in ("juice_bottle", "pushpins"):
        for i in range(3):
            tree.image(f"{c}/train/good/{i:03d}.png", c, "train")
        tree.image(f"{c}/validation/good/000.png", c, "validation")
        tree.image(f"{c}/test/good/000.png", c, "test")
        logical = tree.image(f"{c}/test/logical_anomalies/000.png", c, "test", "logical_anomalies")
        tree.mask(f"{c}/ground_truth/logical_anomalies/000/000.png", logical, 255)
        tree.mask(f"{c}/ground_truth/logical_anomalies/000/001.png", logical, 100)
        structural = tree.image(f"{c}/test/structural_anomalies/000.png", c, "test", "structural_anomalies")
        tree.mask(f"{c}/ground_truth/structural_anomalies/000/000.png", structural, 1)
        (root / c / "defects_config.json").write_text("[]")
    return tree.sort()


def build_btad(root: Path) -> Tree:
    """Products 01 (.bmp images, .png masks), 02 (.png, .png), 03 (.bmp, .bmp)."""
    tree = Tree(root, "BTAD", seed=3)
    for c, image_ext, mask_ext in (("01", "bmp", "png"), ("02", "png", "png"), ("03", "bmp", "bmp")):
        for i in range(3):
            tree.image(f"{c}/train/ok/{i:04d}.{image_ext}", c, "train")
        tree.image(f"{c}/test/ok/0000.{image_ext}", c, "test")
        for i in range(2):
            record = tree.image(f"{c}/test/ko/{i:04d}.{image_ext}", c, "test", "ko")
            tree.mask(f"{c}/ground_truth/ko/{i:04d}.{mask_ext}", record)
    return tree.sort()


VISA_ANNOTATIONS = {"000": "chunk of wax missing", "001": "bent,melt"}


def build_visa(root: Path) -> Tree:
    """split_csv/1cls.csv (rows out of order), JPEG images, 0/255 and 0/1 masks, an image the CSV
    does not list, image_anno.csv for candle only."""
    tree = Tree(root, "VisA", seed=4)
    rows, annotations = [], ["image,label,mask"]
    for c in ("candle", "pcb1"):
        for i in range(4):
            rel = f"{c}/Data/Images/Normal/{i:04d}.JPG"
            tree.image(rel, c, "train" if i < 3 else "test")
            rows.append(f"{c},{'train' if i < 3 else 'test'},normal,{rel},")
        tree.write(f"{c}/Data/Images/Normal/9999.JPG", np.zeros((S, S, 3), np.uint8))  # not in the CSV
        for i, value in ((0, 255), (1, 1)):
            rel, mask = f"{c}/Data/Images/Anomaly/{i:03d}.JPG", f"{c}/Data/Masks/Anomaly/{i:03d}.png"
            label = VISA_ANNOTATIONS[f"{i:03d}"]
            kind = label.replace(" ", "_").replace(",", "_") if c == "candle" else "anomaly"
            tree.mask(mask, tree.image(rel, c, "test", kind), value)
            rows.append(f"{c},test,anomaly,{rel},{mask}")
            annotations.append(f'{rel},"{label}",{mask}')
    (root / "candle" / "image_anno.csv").write_text("\n".join(annotations[:3]) + "\n")  # header + candle's
    (root / "split_csv").mkdir()
    order = np.random.default_rng(0).permutation(len(rows))
    (root / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\n" + "\n".join(rows[i] for i in order) + "\n")
    return tree.sort()


BUILDERS = {"mvtec": build_mvtec, "mpdd": build_mpdd, "mvtec3d": build_mvtec3d, "loco": build_loco,
            "btad": build_btad, "visa": build_visa}


def assert_reads_as_built(dataset, tree: Tree, path_of=lambda path: path) -> None:
    """`path_of(built path)` is where the dataset should read it (an archive's extracted copy)."""
    assert dataset.layout == tree.layout
    assert dataset.classes == sorted(tree.expected)
    for category, splits in tree.expected.items():
        assert {s: sum(n.values()) for s, n in dataset.counts(category).items()} == {s: len(r) for s, r in splits.items()}
        for split, records in splits.items():
            arrays = dataset.load(category, split)
            assert [Path(p).resolve() for p in arrays.paths] == [path_of(r.path) for r in records]
            assert arrays.defect_types == [r.defect_type for r in records]
            np.testing.assert_array_equal(arrays.labels, [int(r.defect_type != "good") for r in records])
            np.testing.assert_array_equal(arrays.images, np.stack([r.pixels for r in records]))
            np.testing.assert_array_equal(arrays.masks, np.stack([r.mask for r in records]))
            assert arrays.mask_known.all() and arrays.unmasked_reason() is None
            assert all(r.mask.any() for r in records if r.defect_type != "good")  # the check can fail


# ----------------------------------------------------------------------------- each layout


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_each_layout_reads_what_was_built(tmp_path, name):
    tree = BUILDERS[name](tmp_path / name)
    assert_reads_as_built(open_dataset(tree.root, image_size=S, cache_dir=tmp_path / "cache"), tree)


@pytest.mark.parametrize("name", ["mvtec3d", "loco", "btad"])
def test_one_class_folder(tmp_path, name):
    tree = BUILDERS[name](tmp_path / name)
    category = sorted(tree.expected)[0]
    tree.expected = {category: tree.expected[category]}
    assert_reads_as_built(open_dataset(tree.root / category, image_size=S, cache_dir=tmp_path / "c"), tree)


def test_loco_unites_several_masks_and_keeps_validation_apart(tmp_path, caplog):
    tree = build_loco(tmp_path / "loco")
    with caplog.at_level(logging.INFO, logger="nexvitad_jax.data"):
        dataset = open_dataset(tree.root, image_size=S, cache_dir=tmp_path / "c")
    assert dataset.splits == ("train", "validation", "test")
    test = dataset.load("pushpins", "test")
    logical = test.defect_types.index("logical_anomalies")
    first, second = (np.asarray(Image.open(tree.root / f"pushpins/ground_truth/logical_anomalies/000/00{i}.png")) > 0
                     for i in (0, 1))
    np.testing.assert_array_equal(test.masks[logical], first | second)
    assert (test.masks[logical] != first).any() and (test.masks[logical] != second).any()
    assert len(dataset.load("pushpins", "validation")) == 1
    assert any("validation/good (2 images) is kept as split 'validation' and not used" in n for n in dataset.notes)
    assert any("validation/good" in r.getMessage() for r in caplog.records)


def test_mvtec3d_says_once_that_depth_is_ignored(tmp_path, caplog):
    tree = build_mvtec3d(tmp_path / "m3d")
    with caplog.at_level(logging.WARNING, logger="nexvitad_jax.data"):
        dataset = open_dataset(tree.root, image_size=S, cache_dir=tmp_path / "c")
        dataset.load("bagel", "test")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "depth ignored: 14 xyz/*.tiff files are not read" in warnings[0]


def test_btad_mixed_extensions(tmp_path):
    tree = build_btad(tmp_path / "btad")
    dataset = open_dataset(tree.root, image_size=S, cache_dir=tmp_path / "c")
    assert [Path(p).suffix for p in dataset.load("01", "test").paths] == [".bmp"] * 3
    masks = [e.mask_display_paths for e in dataset.entries("01", "test") if e.defect_type == "ko"]
    assert [Path(m[0]).suffix for m in masks] == [".png", ".png"]
    assert [Path(e.mask_display_paths[0]).suffix for e in dataset.entries("03", "test") if e.mask_keys] == [".bmp"] * 2


def test_visa_reads_the_csv_split_not_the_folders(tmp_path):
    tree = build_visa(tmp_path / "visa")
    dataset = open_dataset(tree.root, image_size=S, cache_dir=tmp_path / "c")
    paths = [p for split in ("train", "test") for p in dataset.load("candle", split).paths]
    assert not any(p.endswith("9999.JPG") for p in paths)
    assert dataset.counts("candle")["test"] == {"good": 1, "chunk_of_wax_missing": 1, "bent_melt": 1}
    assert dataset.counts("pcb1")["test"] == {"good": 1, "anomaly": 2}


# ----------------------------------------------------------------------------- wrong layouts


def _error(path, match, **kwargs):
    with pytest.raises(UserInputError, match=match):
        dataset = open_dataset(path, image_size=S, **kwargs)
        for category in dataset.classes:
            for split in dataset.splits:
                dataset.load(category, split)


def test_mixed_layouts_name_each_folder(tmp_path):
    build_mvtec(tmp_path / "mix", classes=("alpha",))
    build_btad(tmp_path / "btad")
    (tmp_path / "btad" / "02").rename(tmp_path / "mix" / "02")
    _error(tmp_path / "mix", r"mix: mixed dataset layouts \(BTAD in 02; MVTec AD in alpha\)", cache_dir=tmp_path / "c")


def test_unknown_class_folder_says_what_was_expected(tmp_path):
    build_mvtec(tmp_path / "m", classes=("alpha",))
    (tmp_path / "m" / "odd" / "train" / "normal").mkdir(parents=True)
    _error(tmp_path / "m", r"m/odd: holds train/ or test/ but matches no known layout; expected one of MVTec LOCO: "
           r".*BTAD: NN/train/ok", cache_dir=tmp_path / "c")


@pytest.mark.parametrize("name, remove, match", [
    ("loco", "pushpins/ground_truth/structural_anomalies/000",
     r"pushpins/test/structural_anomalies/000\.png: defect image without its mask; expected "
     r"pushpins/ground_truth/structural_anomalies/000/000\.png"),
    ("mvtec3d", "cookie/test/hole/gt/000.png",
     r"cookie/test/hole/rgb/000\.png: defect image without its mask; expected cookie/test/hole/gt/000\.png"),
    ("btad", "02/ground_truth/ko/0001.png",
     r"02/test/ko/0001\.png: defect image without its mask; expected 02/ground_truth/ko/0001\.png"),
])
def test_missing_mask_names_image_and_expected_mask(tmp_path, name, remove, match):
    import shutil

    tree = BUILDERS[name](tmp_path / name)
    target = tree.root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    _error(tree.root, match, cache_dir=tmp_path / "c")


def test_layout_quirk_errors(tmp_path):
    tree = build_btad(tmp_path / "btad")
    Image.fromarray(np.zeros((S, S), np.uint8)).save(tree.root / "01/ground_truth/ko/0000.bmp")
    _error(tree.root, r"0000\.(bmp|png) and .*0000\.(png|bmp): two masks for the image stem '0000'",
           cache_dir=tmp_path / "c")
    tree = build_mvtec3d(tmp_path / "m3d")
    (tree.root / "bagel/validation/crack/rgb").mkdir(parents=True)
    Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(tree.root / "bagel/validation/crack/rgb/000.png")
    _error(tree.root, r"validation/ must hold only validation/good \(found defect type 'crack'\)",
           cache_dir=tmp_path / "c")
    tree = build_btad(tmp_path / "btad2")
    tree.write("02/train/ko/0009.png", np.zeros((S, S, 3), np.uint8))
    _error(tree.root, r"02/train/ko/0009\.png: train/ must hold only train/ok", cache_dir=tmp_path / "c")


@pytest.mark.parametrize("csv, match", [
    ("object,split,image,mask\n", r"1cls\.csv: columns \['label'\] missing"),
    ("object,split,label,image,mask\n", r"1cls\.csv: no rows"),
    ("object,split,label,image,mask\ncandle,val,normal,candle/Data/Images/Normal/0000.JPG,\n",
     r"1cls\.csv line 2: split 'val'; expected 'train' or 'test'"),
    ("object,split,label,image,mask\ncandle,test,bad,candle/Data/Images/Normal/0000.JPG,\n",
     r"line 2: label 'bad'; expected 'normal' or 'anomaly'"),
    ("object,split,label,image,mask\ncandle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,\n",
     r"line 2: anomalous image candle/Data/Images/Anomaly/000\.JPG without its mask"),
    ("object,split,label,image,mask\ncandle,train,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n",
     r"line 2: an anomaly in the train split"),
    ("object,split,label,image,mask\ncandle,train,normal,candle/Data/Images/Normal/7777.JPG,\n",
     r"line 2: .*candle/Data/Images/Normal/7777\.JPG not found \(paths are relative to"),
])
def test_visa_csv_errors(tmp_path, csv, match):
    tree = build_visa(tmp_path / "visa")
    (tree.root / "split_csv" / "1cls.csv").write_text(csv)
    _error(tree.root, match, cache_dir=tmp_path / "c")


def test_visa_without_split_file(tmp_path):
    tree = build_visa(tmp_path / "visa")
    (tree.root / "split_csv" / "1cls.csv").unlink()
    _error(tree.root, r"looks like VisA \(OBJECT/Data/Images\) but has no split_csv/1cls\.csv", cache_dir=tmp_path / "c")
    _error(tree.root / "candle", r"candle: looks like VisA", cache_dir=tmp_path / "c")  # one object's folder


def test_unknown_split_and_category(tmp_path):
    tree = build_loco(tmp_path / "loco")
    dataset = open_dataset(tree.root, image_size=S, cache_dir=tmp_path / "c")
    with pytest.raises(UserInputError, match=r"split must be 'train' or 'validation' or 'test', got 'val'"):
        dataset.load("pushpins", "val")
    with pytest.raises(UserInputError, match=r"unknown category 'screw_bag' .*\['juice_bottle', 'pushpins'\]"):
        dataset.load("screw_bag", "test")
    btad = open_dataset(build_btad(tmp_path / "btad").root, image_size=S, cache_dir=tmp_path / "c")
    with pytest.raises(UserInputError, match=r"split must be 'train' or 'test', got 'validation'"):
        btad.load("01", "validation")


# ----------------------------------------------------------------------------- the decode cache


@pytest.mark.parametrize("name, slug", [("mvtec3d", "mvtec_3d"), ("loco", "mvtec_loco"), ("btad", "btad"),
                                        ("visa", "visa"), ("mpdd", "mvtec"), ("mvtec", "mvtec")])
def test_cache_keyed_by_layout_and_files(tmp_path, monkeypatch, name, slug):
    tree = BUILDERS[name](tmp_path / name)
    category = sorted(tree.expected)[0]
    first = open_dataset(tree.root, image_size=S, cache_dir=tmp_path / "c")
    assert first.cache_dir.relative_to(tmp_path / "c").parts[0] == slug
    before = first.load(category, "train")
    real = decode.decode_image
    monkeypatch.setattr(decode, "decode_image", lambda *a, **k: pytest.fail("decoded twice"))
    again = open_dataset(tree.root, image_size=S, cache_dir=tmp_path / "c")
    assert again.cache_dir == first.cache_dir
    np.testing.assert_array_equal(again.load(category, "train").images, before.images)
    monkeypatch.setattr(decode, "decode_image", real)
    changed = tree.expected[category]["train"][0]
    Image.fromarray(255 - changed.pixels).save(changed.path, format=Image.open(changed.path).format)
    after = open_dataset(tree.root, image_size=S, cache_dir=tmp_path / "c")
    assert after.cache_dir != first.cache_dir
    np.testing.assert_array_equal(after.load(category, "train").images[0], np.asarray(Image.open(changed.path).convert("RGB")))


# ----------------------------------------------------------------------------- archives


def pack(root: Path, archive: Path, prefix: str = "") -> Path:
    """Every file under root into `archive` (.zip, .tar, .tar.gz, .tar.bz2, .tar.xz) as PREFIX + its path."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for f in files:
                zf.write(f, prefix + f.relative_to(root).as_posix())
    else:
        with tarfile.open(archive, {".tar": "w", ".gz": "w:gz", ".bz2": "w:bz2", ".xz": "w:xz"}[archive.suffix]) as tar:
            for f in files:
                tar.add(f, prefix + f.relative_to(root).as_posix())
    return archive


@pytest.mark.parametrize("name, archive_name, prefix", [
    ("visa", "VisA_20220922.tar", ""), ("mvtec3d", "m3d.tar.xz", "mvtec_3d_anomaly_detection/"),
    ("loco", "loco.tar.gz", "mvtec_loco_anomaly_detection/"), ("btad", "BTech.zip", "BTech_Dataset_transformed/"),
    ("mpdd", "mpdd.zip", ""), ("btad", "btad.tar.bz2", ""),
])
def test_archive_of_each_layout_reads_as_its_folder(tmp_path, monkeypatch, name, archive_name, prefix):
    tree = BUILDERS[name](tmp_path / name)
    archive = pack(tree.root, tmp_path / archive_name, prefix)
    dataset = open_dataset(archive, image_size=S, cache_dir=tmp_path / "c")
    root = Path(dataset.root)
    assert tmp_path / "c" / "archives" in root.parents  # read from its extracted copy in the cache
    members = f"{archive.resolve()}::{prefix}"  # images are shown as the archive's members
    assert_reads_as_built(dataset, tree, lambda path: Path(members + path.relative_to(tree.root.resolve()).as_posix()))
    assert f"read from {archive.resolve()}" in dataset.notes[0]
    # Opened again: nothing of the archive is read, nothing decoded.
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("archive reopened"))
    for method in ("list_zip", "_members"):
        monkeypatch.setattr(archives.Archive, method, lambda *a, **k: pytest.fail("archive reopened"))
    monkeypatch.setattr(decode, "decode_image", lambda *a, **k: pytest.fail("decoded twice"))
    again = open_dataset(archive, image_size=S, cache_dir=tmp_path / "c")
    assert again.cache_dir == dataset.cache_dir and again.classes == dataset.classes
    category = dataset.classes[-1]
    np.testing.assert_array_equal(again.load(category, "test").masks, dataset.load(category, "test").masks)
    # Another archive at that path (a new size or mtime) is another cache entry.
    before = archives.Archive(archive, tmp_path / "c").files
    assert before in root.parents or before == root
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert archives.Archive(archive, tmp_path / "c").files != before


def test_archive_with_a_wrong_layout_names_its_members(tmp_path):
    build_mvtec(tmp_path / "mix" / "data", classes=("alpha",))
    build_btad(tmp_path / "btad")
    (tmp_path / "btad" / "02").rename(tmp_path / "mix" / "data" / "02")
    mixed = pack(tmp_path / "mix", tmp_path / "mix.tar.gz")  # one pass finds it is not MVTec AD, then extracts
    _error(mixed, rf"^{re.escape(str(mixed.resolve()))}::data: mixed dataset layouts \(BTAD in 02; MVTec AD in alpha\)",
           cache_dir=tmp_path / "c")
    tree = build_loco(tmp_path / "loco")
    (tree.root / "pushpins/ground_truth/structural_anomalies/000/000.png").unlink()
    broken = pack(tree.root, tmp_path / "loco.zip")
    _error(broken, rf"{re.escape(str(broken.resolve()))}::pushpins/test/structural_anomalies/000\.png: defect image "
           r"without its mask; expected pushpins/ground_truth/structural_anomalies/000/000\.png", cache_dir=tmp_path / "c")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    _error(pack(tmp_path / "empty", tmp_path / "empty.zip"), r"empty\.zip: holds no images", cache_dir=tmp_path / "c")
    (tmp_path / "fake.zip").write_bytes(b"PK\x03\x04 not really a zip")
    _error(tmp_path / "fake.zip", r"fake\.zip: not a dataset archive", cache_dir=tmp_path / "c")


def test_archive_members_outside_the_tree_are_not_extracted(tmp_path):
    tree = build_btad(tmp_path / "btad")
    archive = pack(tree.root, tmp_path / "btad.tar")
    with tarfile.open(archive, "a") as tar:
        tar.add(tree.expected["01"]["train"][0].path, "../escaped.bmp")
    dataset = open_dataset(archive, image_size=S, cache_dir=tmp_path / "c")
    assert dataset.classes == ["01", "02", "03"]
    assert not list(tmp_path.rglob("escaped.bmp"))
