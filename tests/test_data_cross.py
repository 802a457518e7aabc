"""Cross-dataset runs, data side: one dataset of a source and a target, clashing names prefixed, and
the run's (source, target) classes drawn from each side."""

from __future__ import annotations

import numpy as np
import pytest

from nexvitad_jax.data import CrossDataset, open_dataset, protocol_classes, resolve_split, split_classes
from nexvitad_jax.errors import UserInputError
from tests.test_data_layouts import S, build_btad, build_mvtec


@pytest.fixture()
def two(tmp_path):
    """Source: MVTec layout alpha, beta; target: MVTec layout beta, gamma (beta clashes)."""
    build_mvtec(tmp_path / "src", classes=("alpha", "beta"))
    build_mvtec(tmp_path / "tgt", classes=("beta", "gamma"))
    return open_dataset(tmp_path / "src", image_size=S, cache_dir=tmp_path / "c",
                        target_spec=tmp_path / "tgt")


def test_classes_kept_or_prefixed_and_loaded_from_their_side(two, tmp_path):
    assert isinstance(two, CrossDataset)
    assert two.classes == ["alpha", "gamma", "source.beta", "target.beta"]
    assert two.role_classes == {"source": ["alpha", "source.beta"], "target": ["gamma", "target.beta"]}
    assert [two.role_of(c) for c in two.classes] == ["source", "target", "source", "target"]
    target = open_dataset(tmp_path / "tgt", image_size=S, cache_dir=tmp_path / "c")
    source = open_dataset(tmp_path / "src", image_size=S, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(two.load("target.beta", "test").images, target.load("beta", "test").images)
    np.testing.assert_array_equal(two.load("source.beta", "test").images, source.load("beta", "test").images)
    assert (two.load("source.beta", "test").images != two.load("target.beta", "test").images).any()
    assert two.counts("gamma") == target.counts("gamma")
    with pytest.raises(UserInputError, match=r"unknown category 'beta' in the cross-dataset"):
        two.load("beta", "test")


def test_no_clash_keeps_every_name(tmp_path):
    build_mvtec(tmp_path / "src", classes=("alpha", "beta"))
    cross = open_dataset(tmp_path / "src", image_size=S, cache_dir=tmp_path / "c",
                         target_spec=build_btad(tmp_path / "btad").root)
    assert cross.classes == ["01", "02", "03", "alpha", "beta"]
    assert "source: MVTec AD (2 classes); target: BTAD (3 classes)" in cross.notes[0]


def test_cross_split_takes_source_and_target_from_their_side(two):
    # --target by the target's own name or the prefixed one; every source class without --split.
    assert split_classes(two, None, "beta", seed=0) == (["alpha", "source.beta"], ["target.beta"])
    assert split_classes(two, None, "target.beta,gamma", seed=0) == (["alpha", "source.beta"], ["gamma", "target.beta"])
    # --split a/b draws a source classes and b target classes by seed.
    drawn = {tuple(map(tuple, split_classes(two, "1/1", None, seed=s))) for s in range(12)}
    assert all(len(src) == 1 and src[0] in two.role_classes["source"] and len(tgt) == 1 and
               tgt[0] in two.role_classes["target"] for src, tgt in drawn)
    assert len({src for src, _ in drawn}) == 2 and len({tgt for _, tgt in drawn}) == 2
    assert split_classes(two, "1/1", None, seed=4) == split_classes(two, "1/1", None, seed=4)
    assert split_classes(two, "2/2", None, seed=0) == (["alpha", "source.beta"], ["gamma", "target.beta"])
    assert split_classes(two, None, None, seed=0)[1] in (["gamma"], ["target.beta"])


def test_cross_split_errors(two, tmp_path):
    with pytest.raises(UserInputError, match=r"--target \['alpha'\]: not classes of the target data \(it holds \['beta', 'gamma'\]\)"):
        split_classes(two, None, "alpha", seed=0)
    with pytest.raises(UserInputError, match=r"split 3/1: the source data holds 2 classes"):
        split_classes(two, "3/1", None, seed=0)
    with pytest.raises(UserInputError, match=r"--split 1/2 does not fit --target gamma"):
        split_classes(two, "1/2", "gamma", seed=0)
    big = open_dataset(tmp_path / "tgt", image_size=2 * S, cache_dir=tmp_path / "c")
    with pytest.raises(UserInputError, match=r"image sizes differ \(16 vs 32\)"):
        CrossDataset(two.source, big)


def test_split_classes_of_one_dataset_is_the_protocol_split(tmp_path):
    dataset = open_dataset(build_btad(tmp_path / "btad").root, image_size=S, cache_dir=tmp_path / "c")
    for seed in range(3):
        assert split_classes(dataset, None, None, seed) == resolve_split(protocol_classes(dataset.classes), None, None, seed)
    assert split_classes(dataset, None, "02", 0) == (["01", "03"], ["02"])
