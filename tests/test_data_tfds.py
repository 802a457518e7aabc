"""TFDS builder `mvtec_ad`: array_record, read with tfds.data_source, no TensorFlow."""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")  # the `data` extra; CI's `test` extra has it

from nexvitad_jax.data import open_dataset  # noqa: E402
from nexvitad_jax.data import tfds_mvtec  # noqa: E402
from nexvitad_jax.errors import UserInputError  # noqa: E402


def _assert_same(a, b):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.defect_types == b.defect_types and a.paths == b.paths


def test_builder_on_real_sample_matches_open_dataset_without_tensorflow(mvtec_reduced, tmp_path):
    assert importlib.util.find_spec("tensorflow") is None  # really absent from the environment
    tfds_mvtec.prepare(mvtec_reduced, "transistor", tmp_path / "tfds", image_size=48)
    reference = open_dataset(mvtec_reduced, image_size=48, cache_dir=tmp_path / "npz")
    for split in ("train", "test"):
        source = tfds.data_source("mvtec_ad/transistor_48", split=split, data_dir=str(tmp_path / "tfds"))
        assert type(source).__name__ == "ArrayRecordDataSource"
        _assert_same(tfds_mvtec.to_category_arrays(source), reference.load("transistor", split))
    assert "tensorflow" not in sys.modules


def test_builder_from_archive_and_second_prepare_does_not_decode(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    from tests.test_data_mvtec import _fake_files

    files = _fake_files(rng)
    archive = tmp_path / "src" / "mvtec_anomaly_detection.tar.xz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    builder = tfds_mvtec.prepare(archive.parent, "beta", tmp_path / "tfds", image_size=40)
    arrays = tfds_mvtec.to_category_arrays(builder.as_data_source(split="test"))
    _assert_same(arrays, open_dataset(archive, image_size=40, cache_dir=tmp_path / "npz").load("beta", "test"))
    assert arrays.defect_types == ["crack", "crack", "good", "hole", "hole"]

    direct = tfds_mvtec.prepare(archive, "alpha", tmp_path / "tfds", image_size=40)  # the archive file itself
    _assert_same(tfds_mvtec.to_category_arrays(direct.as_data_source(split="test")),
                 open_dataset(archive, image_size=40, cache_dir=tmp_path / "npz").load("alpha", "test"))

    monkeypatch.setattr(tfds_mvtec, "decode_example", lambda *a, **k: pytest.fail("decoded twice"))
    again = tfds_mvtec.prepare(archive.parent, "beta", tmp_path / "tfds", image_size=40)
    assert len(again.as_data_source(split="train")) == 3


def test_manual_dir_without_the_category(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.txt").write_text("no images here")
    with pytest.raises(UserInputError, match="no such dataset folder, archive or folder spec"):
        tfds_mvtec.prepare(tmp_path / "missing", "hazelnut", tmp_path / "tfds")
    with pytest.raises(UserInputError, match="no category .hazelnut. found"):
        tfds_mvtec.prepare(tmp_path / "src", "hazelnut", tmp_path / "tfds", image_size=32)


# ----------------------------------------------------------------------------- every other layout


def _same_as_open_dataset(builder, root, category, size, tmp_path):
    reference = open_dataset(root, image_size=size, cache_dir=tmp_path / "npz")
    for split in reference.counts(category):
        arrays = tfds_mvtec.to_category_arrays(builder.as_data_source(split=split))
        _assert_same(arrays, reference.load(category, split))
        np.testing.assert_array_equal(arrays.mask_known, reference.load(category, split).mask_known)
    return reference


@pytest.mark.parametrize("name, category, builder_name", [
    ("mvtec3d", "cookie", "industrial_ad/mvtec_3d_cookie_16"), ("loco", "pushpins", "industrial_ad/mvtec_loco_pushpins_16"),
    ("btad", "01", "industrial_ad/btad_01_16"), ("visa", "candle", "industrial_ad/visa_candle_16"),
    ("mpdd", "metal_plate", "mvtec_ad/metal_plate_16"),
])
def test_builder_serves_every_layout(tmp_path, name, category, builder_name):
    from tests.test_data_layouts import BUILDERS, S

    tree = BUILDERS[name](tmp_path / name)
    builder = tfds_mvtec.prepare(tree.root, category, tmp_path / "tfds", image_size=S)
    assert f"{builder.name}/{builder.builder_config.name}" == builder_name
    reference = _same_as_open_dataset(builder, tree.root, category, S, tmp_path)
    assert set(builder.info.splits) == set(reference.counts(category))  # LOCO and 3D-AD: validation too


def test_builder_on_a_folder_spec_keeps_mask_known(tmp_path, monkeypatch):
    from tests.test_data_folder_spec import S, build_folder_spec

    spec, _ = build_folder_spec(tmp_path / "spec")
    builder = tfds_mvtec.prepare(spec, "bracket", tmp_path / "tfds", image_size=S)
    _same_as_open_dataset(builder, spec, "bracket", S, tmp_path)
    test = tfds_mvtec.to_category_arrays(builder.as_data_source(split="test"))
    assert not test.mask_known.all() and test.unmasked_reason() == "no masks for defect types dent (2 of 4 anomalous images)"
    monkeypatch.setattr(tfds_mvtec, "decode_example", lambda *a, **k: pytest.fail("decoded twice"))
    tfds_mvtec.prepare(spec, "bracket", tmp_path / "tfds", image_size=S)
    with pytest.raises(UserInputError, match=r"data\.yaml: no category 'gear'; it holds \['bracket', 'plate'\]"):
        tfds_mvtec.prepare(spec, "gear", tmp_path / "tfds", image_size=S)


def test_builder_serves_an_archive_of_another_layout(tmp_path, monkeypatch):
    """A LOCO .tar.gz (extracted once into DATA_DIR's cache), whether given itself or as the one
    archive of the manual dir; the examples equal open_dataset's of the same archive."""
    from tests.test_data_layouts import S, build_loco, pack

    tree = build_loco(tmp_path / "loco")
    (tmp_path / "src").mkdir()
    archive = pack(tree.root, tmp_path / "src" / "loco.tar.gz", "mvtec_loco_anomaly_detection/")
    builder = tfds_mvtec.prepare(archive, "pushpins", tmp_path / "tfds", image_size=S)
    assert f"{builder.name}/{builder.builder_config.name}" == "industrial_ad/mvtec_loco_pushpins_16"
    reference = _same_as_open_dataset(builder, archive, "pushpins", S, tmp_path)
    assert set(builder.info.splits) == {"train", "validation", "test"} and reference.layout == "MVTec LOCO"
    monkeypatch.setattr(tfds_mvtec, "decode_example", lambda *a, **k: pytest.fail("decoded twice"))
    again = tfds_mvtec.prepare(archive.parent, "pushpins", tmp_path / "tfds", image_size=S)
    assert len(again.as_data_source(split="test")) == 3
