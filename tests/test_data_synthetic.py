"""The embedded synthetic set: coverage, determinism, pixel-exact masks, non-triviality."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from nexvitad_jax.data import PAPER_CLASSES, SYNTHETIC_CLASSES, open_dataset
from nexvitad_jax.data.synthetic import (
    DEFECT_TYPES,
    OBJECT_CLASSES,
    TEXTURE_CLASSES,
    generate_category,
    save_contact_sheet,
    synthetic_image,
)
from nexvitad_jax.errors import UserInputError


@pytest.fixture(scope="module")
def full_set():
    """The default set: 12 classes x (20 train good + 16 test) at 224."""
    dataset = open_dataset("synthetic", image_size=224, seed=0)
    return {c: (dataset.load(c, "train"), dataset.load(c, "test")) for c in dataset.classes}


def test_classes_and_defect_types():
    assert len(SYNTHETIC_CLASSES) >= 12 and set(SYNTHETIC_CLASSES) == set(PAPER_CLASSES)
    assert len(TEXTURE_CLASSES) >= 4 and len(OBJECT_CLASSES) >= 6
    assert all(len(DEFECT_TYPES[c]) >= 3 for c in SYNTHETIC_CLASSES)
    every = {t for types in DEFECT_TYPES.values() for t in types}
    assert every == {"scratch", "crack", "hole", "stain", "missing_part", "contamination", "colour_shift"}


def test_full_set_shapes_labels_and_masks(full_set):
    for category, (train, test) in full_set.items():
        assert train.images.shape == (20, 224, 224, 3) and train.images.dtype == np.uint8
        assert test.images.shape == (16, 224, 224, 3) and test.masks.dtype == bool
        assert not train.masks.any() and not train.labels.any()
        assert set(train.defect_types) == {"good"}
        assert test.labels.tolist() == [0] * 4 + [1] * 12
        assert set(test.defect_types[4:]) == set(DEFECT_TYPES[category])
        areas = test.masks.reshape(16, -1).sum(1)
        assert (areas[:4] == 0).all() and (areas[4:] >= 12).all(), (category, areas)
        assert len(set(test.paths)) == 16
        # Normal variation: train images are not copies of each other.
        spread = train.images.astype(np.float32).std(axis=0).mean()
        assert spread > 3.0, (category, spread)


def test_per_pixel_detector_is_clearly_below_perfect(full_set):
    """Distance to the mean normal image, per pixel: the set must not be trivially separable."""
    per_class, pooled_scores, pooled_masks = {}, [], []
    for category, (train, test) in full_set.items():
        mean_normal = train.images.astype(np.float32).mean(axis=0)
        scores = np.linalg.norm(test.images.astype(np.float32) - mean_normal, axis=-1)
        per_class[category] = roc_auc_score(test.masks.ravel(), scores.ravel())
        pooled_scores.append(scores.ravel())
        pooled_masks.append(test.masks.ravel())
    pooled = roc_auc_score(np.concatenate(pooled_masks), np.concatenate(pooled_scores))
    print(f"\nmean-normal detector pixel AUROC: pooled {pooled:.4f}, per class "
          + ", ".join(f"{c} {v:.3f}" for c, v in per_class.items()))
    assert pooled < 0.95 and max(per_class.values()) < 0.97
    assert pooled > 0.6  # yet the defects are visible, not noise


def test_masks_are_pixel_exact():
    """A defect image differs from its own normal image exactly on its mask."""
    for category in SYNTHETIC_CLASSES:
        for index in range(4, 4 + len(DEFECT_TYPES[category])):
            image, mask, defect = synthetic_image(category, "test", index, image_size=96, seed=5)
            normal, normal_mask, good = synthetic_image(
                category, "test", index, image_size=96, seed=5, n_good_test=1000
            )
            assert good == "good" and not normal_mask.any() and defect != "good"
            np.testing.assert_array_equal((image != normal).any(axis=-1), mask, err_msg=f"{category} {defect}")


def test_deterministic_by_key_independent_of_order():
    forward = generate_category("pill", "test", 7, image_size=64, seed=3)
    alone = synthetic_image("pill", "test", 6, image_size=64, seed=3)
    np.testing.assert_array_equal(forward.images[6], alone[0])
    np.testing.assert_array_equal(forward.masks[6], alone[1])
    shorter = generate_category("pill", "test", 3, image_size=64, seed=3, workers=1)
    np.testing.assert_array_equal(forward.images[:3], shorter.images)
    other_seed = generate_category("pill", "test", 3, image_size=64, seed=4)
    assert not np.array_equal(other_seed.images, shorter.images)
    train_same_index = synthetic_image("pill", "train", 0, image_size=64, seed=3)[0]
    assert not np.array_equal(train_same_index, forward.images[0])


def test_dataset_caches_and_rejects_bad_names(tmp_path):
    dataset = open_dataset("synthetic", image_size=32)
    assert dataset.classes == list(SYNTHETIC_CLASSES)
    assert dataset.load("wood", "train") is dataset.load("wood", "train")
    with pytest.raises(UserInputError, match="unknown synthetic category 'grid'"):
        dataset.load("grid", "train")
    with pytest.raises(UserInputError, match="split must be"):
        dataset.load("wood", "validation")
    save_contact_sheet(dataset, tmp_path / "sheet.png", classes=["wood", "pill"], per_class=3)
    assert Image.open(tmp_path / "sheet.png").size == (6 * 32, 2 * 32)


@pytest.mark.slow
def test_full_set_generates_in_under_30_seconds():
    """The issue's budget: 12 classes x (20 train + 16 test) at 224 in < 30 s on 2 cores."""
    import time

    start = time.perf_counter()
    dataset = open_dataset("synthetic", image_size=224, seed=11)
    for category in dataset.classes:
        for split in ("train", "test"):
            dataset.load(category, split)
    seconds = time.perf_counter() - start
    print(f"\nsynthetic set, 432 images at 224: {seconds:.1f} s")
    assert seconds < 30.0
