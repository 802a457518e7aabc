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

    monkeypatch.setattr(tfds_mvtec, "decode_example", lambda *a, **k: pytest.fail("decoded twice"))
    again = tfds_mvtec.prepare(archive.parent, "beta", tmp_path / "tfds", image_size=40)
    assert len(again.as_data_source(split="train")) == 3


def test_manual_dir_without_the_category(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.txt").write_text("no images here")
    with pytest.raises(UserInputError, match="no such MVTec folder"):
        tfds_mvtec.prepare(tmp_path / "missing", "hazelnut", tmp_path / "tfds")
    with pytest.raises(UserInputError, match="no MVTec category 'hazelnut' found"):
        tfds_mvtec.prepare(tmp_path / "src", "hazelnut", tmp_path / "tfds", image_size=32)
