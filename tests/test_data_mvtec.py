"""MVTec AD reader: the real sample, a generated fake tree, a generated .tar.xz, bad input."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nexvitad_jax.data import CategoryArrays, open_dataset
from nexvitad_jax.data import decode, mvtec
from nexvitad_jax.errors import UserInputError


def _reference_image(path: Path, size: int) -> np.ndarray:
    """Independent reference: Pillow RGB + bilinear resize."""
    image = Image.open(path).convert("RGB")
    return np.asarray(image.resize((size, size), Image.BILINEAR))


def _reference_mask(path: Path, size: int) -> np.ndarray:
    """Independent reference: torch nearest-exact (half-pixel centres), then > 0.5."""
    import torch

    mask = torch.from_numpy(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0)
    resized = torch.nn.functional.interpolate(mask[None, None], size=(size, size), mode="nearest-exact")
    return resized[0, 0].numpy() > 0.5


# ------------------------------------------------------------------------------- real sample


@pytest.mark.parametrize("category", ["hazelnut", "transistor"])
def test_real_sample_at_native_size_equals_the_files(mvtec_reduced, tmp_path, category):
    dataset = open_dataset(mvtec_reduced, image_size=256, cache_dir=tmp_path)
    assert dataset.classes == ["hazelnut", "transistor"]
    for split in ("train", "test"):
        arrays = dataset.load(category, split)
        files = sorted((mvtec_reduced / category / split).glob("*/*.png"))
        assert [str(Path(p).resolve()) for p in arrays.paths] == [str(f.resolve()) for f in files]
        assert arrays.images.dtype == np.uint8 and arrays.images.shape == (len(files), 256, 256, 3)
        assert arrays.masks.dtype == bool and arrays.labels.dtype == np.int32
        for i, f in enumerate(files):
            defect = f.parent.name
            assert arrays.defect_types[i] == defect
            assert arrays.labels[i] == int(defect != "good")
            np.testing.assert_array_equal(arrays.images[i], np.asarray(Image.open(f).convert("RGB")))
            if defect == "good":
                assert not arrays.masks[i].any()
            else:
                mask_file = mvtec_reduced / category / "ground_truth" / defect / f"{f.stem}_mask.png"
                np.testing.assert_array_equal(arrays.masks[i], np.asarray(Image.open(mask_file).convert("L")) > 127)
                assert arrays.masks[i].any()


def test_real_sample_resized_matches_pillow_reference(mvtec_reduced, tmp_path):
    dataset = open_dataset(mvtec_reduced, cache_dir=tmp_path)  # default 224
    arrays = dataset.load("hazelnut", "test")
    assert arrays.images.shape[1:] == (224, 224, 3)
    for i, path in enumerate(arrays.paths):
        path = Path(path)
        np.testing.assert_array_equal(arrays.images[i], _reference_image(path, 224))
        if arrays.labels[i]:
            mask_file = path.parents[2] / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
            np.testing.assert_array_equal(arrays.masks[i], _reference_mask(mask_file, 224))


def test_second_load_does_not_decode(mvtec_reduced, tmp_path, monkeypatch):
    first = open_dataset(mvtec_reduced, image_size=64, cache_dir=tmp_path).load("transistor", "test")
    calls = []
    real_decode = decode.decode_image
    monkeypatch.setattr(decode, "decode_image", lambda *a, **k: calls.append(a) or real_decode(*a, **k))
    again = open_dataset(mvtec_reduced, image_size=64, cache_dir=tmp_path)
    second = again.load("transistor", "test")
    assert again.load("transistor", "test") is second  # in memory too
    assert calls == []
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.masks, second.masks)
    assert first.paths == second.paths and first.defect_types == second.defect_types
    # A different size is a different cache entry and does decode.
    open_dataset(mvtec_reduced, image_size=32, cache_dir=tmp_path).load("transistor", "test")
    assert len(calls) == 10


# ------------------------------------------------------------------------------- fake tree


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG") if mode else Image.fromarray(array).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


def _fake_files(rng, size=40) -> dict[str, bytes]:
    """A fake two-category MVTec tree: {relative path: PNG bytes}, with odd image modes."""
    files: dict[str, bytes] = {}
    for category in ("alpha", "beta"):
        for i in range(3):
            files[f"{category}/train/good/{i:03d}.png"] = _png(rng.integers(0, 256, (size, size, 3), np.uint8))
        files[f"{category}/test/good/000.png"] = _png(rng.integers(0, 256, (size, size, 3), np.uint8))
        for defect in ("crack", "hole"):
            for i in range(2):
                files[f"{category}/test/{defect}/{i:03d}.png"] = _png(
                    rng.integers(0, 256, (size, size, 3), np.uint8)
                )
                mask = np.zeros((size, size), np.uint8)
                mask[rng.integers(0, size // 2): size // 2 + 5, 3:17] = 255
                files[f"{category}/ground_truth/{defect}/{i:03d}_mask.png"] = _png(mask)
        files[f"{category}/license.txt"] = b"not an image"
    return files


def _write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _write_tar(path: Path, files: dict[str, bytes], prefix: str = "") -> Path:
    with tarfile.open(path, "w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_fake_tree_labels_masks_and_order(tmp_path):
    files = _fake_files(np.random.default_rng(0))
    dataset = open_dataset(_write_tree(tmp_path / "mv", files), image_size=40, cache_dir=tmp_path / "c")
    assert dataset.classes == ["alpha", "beta"]
    test = dataset.load("beta", "test")
    assert test.defect_types == ["crack", "crack", "good", "hole", "hole"]
    np.testing.assert_array_equal(test.labels, [1, 1, 0, 1, 1])
    for i, path in enumerate(test.paths):
        rel = Path(path).relative_to(tmp_path / "mv").as_posix()
        np.testing.assert_array_equal(test.images[i], np.asarray(Image.open(io.BytesIO(files[rel]))))
        if test.labels[i]:
            mask_rel = rel.replace("/test/", "/ground_truth/").replace(".png", "_mask.png")
            np.testing.assert_array_equal(test.masks[i], np.asarray(Image.open(io.BytesIO(files[mask_rel]))) > 0)


@pytest.mark.parametrize("prefix, interleaved", [("", False), ("mvtec_anomaly_detection/", False), ("", True)])
def test_tar_xz_equals_folder_and_is_cached(tmp_path, monkeypatch, prefix, interleaved):
    files = _fake_files(np.random.default_rng(1))
    folder = open_dataset(_write_tree(tmp_path / "mv", files), image_size=24, cache_dir=tmp_path / "c1")
    order = sorted(files, key=lambda name: (name.split("/")[2:], name)) if interleaved else list(files)
    archive_path = _write_tar(tmp_path / "mvtec.tar.xz", {name: files[name] for name in order}, prefix)
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    archive = open_dataset(archive_path, image_size=24, cache_dir=tmp_path / "c2")
    assert archive.classes == ["alpha", "beta"]
    if not interleaved:  # one pass lists the archive and decodes every category
        assert len(opened) == 1
        assert all(archive.cache_path(c, s).exists() for c in ("alpha", "beta") for s in ("train", "test"))
    assert archive.classes == folder.classes
    for category in folder.classes:
        for split in ("train", "test"):
            a, b = folder.load(category, split), archive.load(category, split)
            np.testing.assert_array_equal(a.images, b.images)
            np.testing.assert_array_equal(a.masks, b.masks)
            np.testing.assert_array_equal(a.labels, b.labels)
            assert a.defect_types == b.defect_types
            assert b.paths[0].startswith(f"{archive_path.resolve()}::{prefix}{category}/{split}/")
    monkeypatch.setattr(decode, "decode_image", lambda *a, **k: pytest.fail("decoded twice"))
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("archive reopened"))
    cached = mvtec.MVTecDataset(archive_path, image_size=24, cache_dir=tmp_path / "c2")
    assert len(cached.load("alpha", "test")) == 5


def test_single_category_folder(mvtec_reduced, tmp_path):
    whole = open_dataset(mvtec_reduced, image_size=32, cache_dir=tmp_path).load("hazelnut", "test")
    single = open_dataset(mvtec_reduced / "hazelnut", image_size=32, cache_dir=tmp_path)
    assert single.classes == ["hazelnut"]
    arrays = single.load("hazelnut", "test")
    np.testing.assert_array_equal(arrays.images, whole.images)
    assert arrays.paths == whole.paths


def test_image_modes_grey_16bit_rgba_palette(tmp_path):
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 256, (16, 16), np.uint8)
    grey16 = rng.integers(0, 65536, (16, 16)).astype(np.uint16)
    rgba = rng.integers(0, 256, (16, 16, 4), np.uint8)
    palette_image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).quantize(16)
    buffer = io.BytesIO()
    palette_image.save(buffer, "PNG")
    buffer16 = io.BytesIO()
    Image.fromarray(grey16).save(buffer16, "PNG")
    files = {
        "c/train/good/0_grey.png": _png(grey),
        "c/train/good/1_grey16.png": buffer16.getvalue(),
        "c/train/good/2_rgba.png": _png(rgba),
        "c/train/good/3_palette.png": buffer.getvalue(),
    }
    assert Image.open(io.BytesIO(buffer16.getvalue())).mode.startswith("I")
    arrays = open_dataset(_write_tree(tmp_path / "m", files), image_size=16, cache_dir=tmp_path).load("c", "train")
    np.testing.assert_array_equal(arrays.images[0], np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(arrays.images[1], np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, -1))
    np.testing.assert_array_equal(arrays.images[2], rgba[..., :3])
    np.testing.assert_array_equal(arrays.images[3], np.asarray(palette_image.convert("RGB")))


# ------------------------------------------------------------------------------- bad input


def _load_expecting(tmp_path, files, match, category="alpha", split="test"):
    dataset = open_dataset(_write_tree(tmp_path / "bad", files), image_size=16, cache_dir=tmp_path / "c")
    with pytest.raises(UserInputError, match=match):
        dataset.load(category, split)


def test_corrupt_png_names_the_file(tmp_path):
    files = _fake_files(np.random.default_rng(3))
    files["alpha/test/hole/001.png"] = files["alpha/test/hole/001.png"][:60]
    _load_expecting(tmp_path, files, r"alpha/test/hole/001\.png: not a readable image")


def test_defect_without_mask_names_image_and_expected_mask(tmp_path):
    files = _fake_files(np.random.default_rng(4))
    del files["alpha/ground_truth/crack/001_mask.png"]
    _load_expecting(
        tmp_path, files, r"alpha/test/crack/001\.png: defect image without its mask; expected "
        r"alpha/ground_truth/crack/001_mask\.png"
    )


def test_mask_size_mismatch_names_the_mask(tmp_path):
    files = _fake_files(np.random.default_rng(5))
    files["alpha/ground_truth/hole/000_mask.png"] = _png(np.zeros((20, 30), np.uint8))
    _load_expecting(tmp_path, files, r"ground_truth/hole/000_mask\.png: mask is 30x20 but its image .* is 40x40")


def test_unknown_and_empty_categories(tmp_path):
    files = _fake_files(np.random.default_rng(6))
    root = _write_tree(tmp_path / "m", files)
    (root / "gamma" / "train" / "good").mkdir(parents=True)
    dataset = open_dataset(root, image_size=16, cache_dir=tmp_path / "c")
    with pytest.raises(UserInputError, match=r"unknown category 'zeta' .*'alpha', 'beta', 'gamma'"):
        dataset.load("zeta", "train")
    with pytest.raises(UserInputError, match=r"category 'gamma' .* holds no train images"):
        dataset.load("gamma", "train")
    with pytest.raises(UserInputError, match="split must be 'train' or 'test'"):
        dataset.load("alpha", "val")


def test_bad_sources(tmp_path):
    with pytest.raises(UserInputError, match="no such path"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserInputError, match=r"notes\.txt: not a dataset archive \(expected \.tar, \.tar\.gz"):
        open_dataset(tmp_path / "notes.txt", cache_dir=tmp_path / "c")
    with pytest.raises(UserInputError, match="not a tar archive"):
        mvtec.MVTecDataset(tmp_path / "notes.txt", cache_dir=tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="empty: no dataset layout recognized"):
        _ = open_dataset(tmp_path / "empty", cache_dir=tmp_path / "c").classes
    with pytest.raises(UserInputError, match="image_size"):
        open_dataset("synthetic", image_size=0)
    (tmp_path / "broken.tar.xz").write_bytes(b"\xfd7zXZ\x00" + b"garbage" * 100)
    with pytest.raises(UserInputError, match=r"broken\.tar\.xz: unreadable archive"):
        _ = open_dataset(tmp_path / "broken.tar.xz", cache_dir=tmp_path / "c").classes


def test_category_arrays_npz_round_trip(tmp_path):
    arrays = CategoryArrays(
        images=np.zeros((2, 4, 4, 3), np.uint8), masks=np.eye(4, dtype=bool)[None].repeat(2, 0),
        labels=np.array([0, 1], np.int32), defect_types=["good", "crack"], paths=["a", "b"],
    )
    arrays.save_npz(tmp_path / "x.npz")
    back = CategoryArrays.load_npz(tmp_path / "x.npz")
    np.testing.assert_array_equal(back.masks, arrays.masks)
    assert back.defect_types == ["good", "crack"] and back.paths == ["a", "b"]


def test_defect_folder_under_train_is_rejected(tmp_path):
    files = _fake_files(np.random.default_rng(7))
    files["alpha/train/crack/000.png"] = files["alpha/test/crack/000.png"]
    dataset = open_dataset(_write_tree(tmp_path / "m", files), image_size=16, cache_dir=tmp_path / "c")
    with pytest.raises(UserInputError, match=r"alpha/train/crack/000\.png: train/ must hold only train/good"):
        dataset.load("alpha", "train")


def test_archive_pass_shows_its_progress(tmp_path, monkeypatch):
    """The pass over an archive has a progress bar of the bytes read (big archives only; forced here)."""
    import tqdm.auto

    bars = []

    class Recorded(tqdm.auto.tqdm):
        def close(self):
            bars.append((getattr(self, "desc", None), self.n, self.total, self.disable))
            super().close()

    archive = _write_tar(tmp_path / "mvtec.tar.xz", _fake_files(np.random.default_rng(2)))
    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    monkeypatch.setattr(mvtec, "PROGRESS_MIN_BYTES", 0)
    assert open_dataset(archive, image_size=24, cache_dir=tmp_path / "c").classes == ["alpha", "beta"]
    size = archive.stat().st_size
    assert ("reading mvtec.tar.xz", size, size, False) in bars
