"""Plain folders described by a YAML/JSON folder spec: images of any mode and size, masks matched by
stem, defect types without masks, the normal images' train/test split, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nexvitad_jax.data import open_dataset
from nexvitad_jax.errors import UserInputError

S = 16
SPEC = """\
classes:
  bracket:
    normal: images/good
    abnormal:
      scratch: {images: images/scratch, masks: masks/scratch}
      dent: images/dent            # no masks
    test_normal: 0.34
    seed: 3
  plate:
    normal: [plate/good_a, plate/good_b]
    test_normal: plate/test_good
    abnormal:
      crack: {images: plate/crack, masks: plate/crack_gt}
    mask_suffix: ""
"""


def _write(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def reference_image(path: Path) -> np.ndarray:
    """Independent reference: 16-bit keeps its top 8 bits, then Pillow RGB + bilinear resize."""
    image = Image.open(path)
    if image.mode.startswith("I"):
        grey = (np.asarray(image).astype(np.int64) >> 8).astype(np.uint8)
        image = Image.fromarray(np.repeat(grey[..., None], 3, -1))
    return np.asarray(image.convert("RGB").resize((S, S), Image.BILINEAR))


def reference_mask(region: np.ndarray) -> np.ndarray:
    """Nearest-exact from 32 x 48 (or S x S) to S x S: rows 2i + 1, columns 3i + 1."""
    return region[1::2, 1::3] if region.shape == (32, 48) else region


def build_folder_spec(root: Path, fmt: str = "yaml") -> tuple[Path, dict[str, dict]]:
    """The SPEC's folders: images in modes RGB, L, RGBA, 16-bit, P at 32 x 48 and 16 x 16; masks
    `STEM_mask.png` (0/255) for bracket/scratch, `STEM.png` (0/1) for plate. Returns (spec file,
    {class: {image path: (defect type, mask (S, S) or None when unknown)}})."""
    rng = np.random.default_rng(0)
    expected: dict[str, dict] = {"bracket": {}, "plate": {}}

    def image(category, rel, defect="good", mode="RGB", shape=(32, 48)):
        if mode == "I;16":
            array = rng.integers(0, 65536, shape).astype(np.uint16)
        else:
            array = rng.integers(0, 256, shape + ((3,) if mode == "RGB" else (4,) if mode == "RGBA" else ()), np.uint8)
        image = Image.fromarray(array)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        (image.quantize(8) if mode == "P" else image).save(path)
        expected[category][path.resolve()] = (defect, np.zeros((S, S), bool))
        return path

    def mask(category, path, rel, value, shape=(32, 48)):
        region = np.zeros(shape, bool)
        region[4:20, 6:30] = True
        _write(root / rel, np.where(region, value, 0).astype(np.uint8))
        expected[category][path.resolve()] = (expected[category][path.resolve()][0], reference_mask(region))

    for i, mode in enumerate(["RGB", "L", "RGBA", "I;16", "P", "RGB"]):
        image("bracket", f"images/good/{i:03d}.{'tif' if i == 5 else 'png'}", mode=mode, shape=(32, 48) if i % 2 else (S, S))
    for i in range(2):
        mask("bracket", image("bracket", f"images/scratch/{i:03d}.png", "scratch"), f"masks/scratch/{i:03d}_mask.png", 255)
        path = image("bracket", f"images/dent/{i:03d}.bmp", "dent")
        expected["bracket"][path.resolve()] = ("dent", None)
    for folder in ("good_a", "good_b", "test_good"):
        for i in range(2):
            image("plate", f"plate/{folder}/{folder}{i}.png", mode="L")
    mask("plate", image("plate", "plate/crack/c0.jpg", "crack"), "plate/crack_gt/c0.png", 1)
    spec = root / f"data.{fmt}"
    if fmt == "json":
        import yaml

        spec.write_text(json.dumps(yaml.safe_load(SPEC)))
    else:
        spec.write_text(SPEC)
    return spec, expected


def _check(dataset, expected) -> None:
    for category, images in expected.items():
        for split in ("train", "test"):
            arrays = dataset.load(category, split)
            for i, path in enumerate(arrays.paths):
                defect, mask = images[Path(path)]
                assert arrays.defect_types[i] == defect and arrays.labels[i] == int(defect != "good")
                np.testing.assert_array_equal(arrays.images[i], reference_image(Path(path)))
                assert arrays.mask_known[i] == (mask is not None)
                np.testing.assert_array_equal(arrays.masks[i], np.zeros((S, S), bool) if mask is None else mask)
        loaded = [Path(p) for split in ("train", "test") for p in dataset.load(category, split).paths]
        assert sorted(loaded) == sorted(images)  # every image once


def test_yaml_spec_reads_what_was_built(tmp_path):
    spec, expected = build_folder_spec(tmp_path)
    dataset = open_dataset(spec, image_size=S, cache_dir=tmp_path / "c")
    assert dataset.layout == "folder spec" and dataset.classes == ["bracket", "plate"]
    _check(dataset, expected)
    assert dataset.counts("bracket") == {"train": {"good": 4}, "test": {"good": 2, "dent": 2, "scratch": 2}}
    plate = dataset.load("plate", "test")
    assert [Path(p).parent.name for p in plate.paths] == ["crack", "test_good", "test_good"]
    assert all(Path(p).parent.name in ("good_a", "good_b") for p in dataset.load("plate", "train").paths)


def test_json_reads_as_yaml(tmp_path):
    spec, expected = build_folder_spec(tmp_path, "json")
    dataset = open_dataset(spec, image_size=S, cache_dir=tmp_path / "c")
    _check(dataset, expected)
    yaml_spec = tmp_path / "data.yaml"
    yaml_spec.write_text(SPEC)
    again = open_dataset(yaml_spec, image_size=S, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(again.load("bracket", "test").images, dataset.load("bracket", "test").images)


def test_defect_type_without_masks_is_flagged_for_pixel_metrics(tmp_path):
    spec, _ = build_folder_spec(tmp_path)
    dataset = open_dataset(spec, image_size=S, cache_dir=tmp_path / "c")
    test = dataset.load("bracket", "test")
    np.testing.assert_array_equal(test.mask_known, [t != "dent" for t in test.defect_types])
    assert test.unmasked_reason() == "no masks for defect types dent (2 of 4 anomalous images)"
    assert dataset.load("plate", "test").unmasked_reason() is None
    assert any("bracket: no masks for dent" in note for note in dataset.notes)
    cached = open_dataset(spec, image_size=S, cache_dir=tmp_path / "c").load("bracket", "test")
    np.testing.assert_array_equal(cached.mask_known, test.mask_known)  # kept by the .npz cache


def test_normal_share_split_by_seed(tmp_path):
    spec, _ = build_folder_spec(tmp_path)
    normal = sorted(str(p.resolve()) for p in (tmp_path / "images/good").iterdir())

    def split(seed):
        spec.write_text(SPEC.replace("seed: 3", f"seed: {seed}"))
        dataset = open_dataset(spec, image_size=S, cache_dir=tmp_path / "c")
        train = dataset.load("bracket", "train").paths
        test = [p for p, t in zip(dataset.load("bracket", "test").paths, dataset.load("bracket", "test").defect_types)
                if t == "good"]
        assert sorted(train + test) == normal and len(test) == 2  # round(0.34 * 6)
        return tuple(test)

    assert split(3) == split(3)
    assert len({split(seed) for seed in range(6)}) > 1


def test_abnormal_as_a_list_of_folders(tmp_path):
    build_folder_spec(tmp_path)
    spec = tmp_path / "list.yaml"
    spec.write_text("classes:\n  bracket:\n    normal: images/good\n    abnormal: [images/scratch, images/dent]\n"
                    "    test_normal: 0.5\n")
    dataset = open_dataset(spec, image_size=S, cache_dir=tmp_path / "c")
    assert dataset.counts("bracket")["test"] == {"good": 3, "dent": 2, "scratch": 2}
    assert not dataset.load("bracket", "test").mask_known[dataset.load("bracket", "test").labels == 1].any()


def test_jpeg_mask_uses_half_scale(tmp_path):
    build_folder_spec(tmp_path)
    region = np.zeros((S, S), np.uint8)
    region[2:9, 3:12] = 255
    _write(tmp_path / "jm/0.png", np.full((S, S, 3), 9, np.uint8))
    _write(tmp_path / "jmask/0.jpg", region)
    spec = tmp_path / "j.yaml"
    spec.write_text("classes:\n  c:\n    normal: images/good\n    abnormal: {spot: {images: jm, masks: jmask}}\n")
    test = open_dataset(spec, image_size=S, cache_dir=tmp_path / "c").load("c", "test")
    decoded = np.asarray(Image.open(tmp_path / "jmask/0.jpg"))
    assert (decoded > 0).sum() > (decoded > 127).sum()  # the JPEG noise a threshold of 0 would take
    np.testing.assert_array_equal(test.masks[test.labels == 1][0], decoded > 127)


@pytest.mark.parametrize("text, match", [
    ("classes: {}\n", r"data\.yaml: expected a mapping with 'classes:"),
    ("classes:\n  a: {normal: images/good}\nextra: 1\n", r"unknown keys \['extra'\]; expected only 'classes'"),
    ("classes:\n  a b: {normal: images/good}\n", r"classes\.a b: class names are letters"),
    ("classes:\n  a: {abnormal: images/dent}\n", r"classes\.a: expected a mapping with at least 'normal: FOLDER'"),
    ("classes:\n  a: {normal: images/good, tests: x}\n", r"classes\.a: unknown keys \['tests'\]"),
    ("classes:\n  a: {normal: images/nothing}\n", r"classes\.a\.normal: .*images/nothing is not a folder \(paths are relative to"),
    ("classes:\n  a: {normal: masks}\n", r"classes\.a\.normal: no images in 'masks'"),
    ("classes:\n  a: {normal: images/good, test_normal: 1.5}\n", r"test_normal: expected a share in \(0, 1\) or folder"),
    ("classes:\n  a: {normal: images/good, seed: -1}\n", r"classes\.a\.seed: expected an integer >= 0, got -1"),
    ("classes:\n  a: {normal: images/good, test_normal: images/good}\n", r"is both a normal \(train\) and a test_normal image"),
    ("classes:\n  a: {normal: images/good, abnormal: {good: images/dent}}\n", r"abnormal\.good: a defect type is .* not 'good'"),
    ("classes:\n  a: {normal: images/good, abnormal: {d: {images: images/dent, mask: masks/scratch}}}\n",
     r"abnormal\.d: expected \{images: FOLDER, masks: FOLDER\}, got keys \['images', 'mask'\]"),
    ("classes:\n  a: {normal: images/good, abnormal: [images/dent, plate/../images/dent]}\n", r"two folders share a name"),
    ("classes:\n  a: {normal: images/good, abnormal: {d: {images: images/dent, masks: plate/crack_gt}}}\n",
     r"images/dent/000\.bmp: no mask in .*plate/crack_gt; expected one 000\.\* or 000_mask\.\*"),
    ("classes:\n  a: {normal: images/good, mask_suffix: _gt, abnormal: {d: {images: images/scratch, masks: masks/scratch}}}\n",
     r"images/scratch/000\.png: no mask in .*; expected one 000_gt\.\*"),
    ("classes:\n  a: [normal\n", r"data\.yaml: not valid YAML"),
])
def test_spec_errors_name_the_value_and_what_was_expected(tmp_path, text, match):
    build_folder_spec(tmp_path)
    spec = tmp_path / "data.yaml"
    spec.write_text(text)
    with pytest.raises(UserInputError, match=match):
        open_dataset(spec, image_size=S, cache_dir=tmp_path / "c")


def test_ambiguous_mask_and_bad_json(tmp_path):
    build_folder_spec(tmp_path)
    _write(tmp_path / "masks/scratch/000.png", np.zeros((32, 48), np.uint8))
    spec = tmp_path / "a.yaml"
    spec.write_text("classes:\n  a: {normal: images/good, abnormal: {s: {images: images/scratch, masks: masks/scratch}}}\n")
    with pytest.raises(UserInputError, match=r"000\.png: 2 masks \(000\.png, 000_mask\.png\)"):
        open_dataset(spec, image_size=S, cache_dir=tmp_path / "c")
    (tmp_path / "b.json").write_text("{classes: ")
    with pytest.raises(UserInputError, match=r"b\.json: not valid JSON"):
        open_dataset(tmp_path / "b.json", image_size=S, cache_dir=tmp_path / "c")


def test_cache_keyed_by_spec_and_files(tmp_path, monkeypatch):
    """Decoded once; reopened, nothing is decoded; a changed image or a changed spec is a new entry."""
    from nexvitad_jax.data import decode

    spec, _ = build_folder_spec(tmp_path)
    first = open_dataset(spec, image_size=S, cache_dir=tmp_path / "c")
    assert first.cache_dir.relative_to(tmp_path / "c").parts[0] == "folder_spec"
    before = first.load("plate", "test")
    real = decode.decode_image
    monkeypatch.setattr(decode, "decode_image", lambda *a, **k: pytest.fail("decoded twice"))
    again = open_dataset(spec, image_size=S, cache_dir=tmp_path / "c")
    assert again.cache_dir == first.cache_dir
    np.testing.assert_array_equal(again.load("plate", "test").images, before.images)
    monkeypatch.setattr(decode, "decode_image", real)
    _write(tmp_path / "plate/test_good/test_good0.png", np.full((32, 48), 7, np.uint8))
    changed = open_dataset(spec, image_size=S, cache_dir=tmp_path / "c")
    assert changed.cache_dir != first.cache_dir
    np.testing.assert_array_equal(changed.load("plate", "test").images[1], np.full((S, S, 3), 7, np.uint8))
    spec.write_text(SPEC.replace("seed: 3", "seed: 4"))
    assert open_dataset(spec, image_size=S, cache_dir=tmp_path / "c").cache_dir not in (first.cache_dir, changed.cache_dir)
