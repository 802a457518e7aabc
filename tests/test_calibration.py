"""Calibration: F1-optimal thresholds against scikit-learn, quantile thresholds against NumPy,
anomalib's normalization written out directly, the validation fallbacks, and the saved form."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_recall_curve

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference.calibration import (Calibration, f1_calibration, f1_optimal_threshold,
                                                false_positive_rate, normalize, quantile_calibration)


def sklearn_best_f1(scores, labels):
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0)[:-1]
    return thresholds, f1


@pytest.mark.parametrize("seed", range(4))
def test_f1_optimal_threshold_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(size=300) + 1.2 * labels, 1)  # rounded: many ties
    threshold, best = f1_optimal_threshold(scores, labels)
    thresholds, f1 = sklearn_best_f1(scores, labels)
    assert best == pytest.approx(f1.max(), abs=1e-12)
    assert threshold in thresholds[np.isclose(f1, f1.max(), atol=1e-12)]
    assert f1_score(labels, scores >= threshold) == pytest.approx(best, abs=1e-12)


def test_f1_optimal_threshold_prefers_the_highest_of_equal_f1():
    # Scores 3 and 2 both flag the one positive only when >= 3; >= 2 adds a false positive.
    threshold, best = f1_optimal_threshold([3.0, 2.0, 1.0], [True, False, False])
    assert (threshold, best) == (3.0, 1.0)
    with pytest.raises(UserInputError, match="no anomalous example"):
        f1_optimal_threshold([1.0, 2.0], [False, False])


def test_quantile_calibration_and_normalization():
    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, size=(7, 8, 9))
    scores = maps.max(axis=(1, 2))
    calibration = quantile_calibration(maps, scores, 0.9)
    assert calibration.image_threshold == pytest.approx(np.quantile(scores, 0.9))
    assert calibration.pixel_threshold == pytest.approx(np.quantile(maps, 0.9))
    assert calibration.image_range == (scores.min(), scores.max()) and calibration.images == 7
    # anomalib: clip((x - t) / (max - min) + 0.5, 0, 1), written out here element by element.
    raw = np.array([-5.0, calibration.image_threshold, scores.min(), scores.max(), 100.0])
    expected = [min(max((x - calibration.image_threshold) / (scores.max() - scores.min()) + 0.5, 0.0), 1.0)
                for x in raw]
    np.testing.assert_allclose(calibration.normalize_image_scores(raw), expected, rtol=1e-6)
    assert calibration.normalize_image_scores([calibration.image_threshold])[0] == pytest.approx(0.5)
    assert calibration.decisions(raw).tolist() == [False, True, False, True, True]
    np.testing.assert_array_equal(calibration.masks(maps), maps >= calibration.pixel_threshold)
    assert false_positive_rate(scores, calibration.image_threshold) == np.mean(scores >= np.quantile(scores, 0.9))
    assert normalize([1.0], 1.0, (2.0, 2.0))[0] == 0.5  # a zero range does not divide by zero


def test_f1_calibration_with_and_without_masks():
    rng = np.random.default_rng(1)
    labels = np.array([False] * 6 + [True] * 6)
    masks = np.zeros((12, 10, 10), bool)
    masks[6:, 2:5, 3:7] = True
    maps = rng.random((12, 10, 10)) + 1.5 * masks
    scores = maps.max(axis=(1, 2))
    with_masks = f1_calibration(maps, scores, labels, masks)
    assert with_masks.method == "f1" and with_masks.details["pixel_threshold_method"] == "f1"
    thresholds, f1 = sklearn_best_f1(maps.ravel(), masks.ravel())
    assert with_masks.details["pixel_f1"] == pytest.approx(f1.max())
    assert f1_score(masks.ravel(), maps.ravel() >= with_masks.pixel_threshold) == pytest.approx(f1.max())
    thresholds, f1 = sklearn_best_f1(scores, labels)
    assert f1_score(labels, scores >= with_masks.image_threshold) == pytest.approx(f1.max())
    without = f1_calibration(maps, scores, labels, None, quantile=0.95)
    assert without.image_threshold == with_masks.image_threshold
    assert without.pixel_threshold == pytest.approx(np.quantile(maps[~labels], 0.95))
    # Validation without anomalous images: quantiles, never the smallest score (anomalib #2433).
    only_good = f1_calibration(maps[:6], scores[:6], labels[:6], None, quantile=0.99)
    assert only_good.method == "quantile" and only_good.image_threshold == pytest.approx(np.quantile(scores[:6], 0.99))


def test_calibration_round_trip_and_errors():
    calibration = quantile_calibration(np.ones((2, 3, 3)), np.array([1.0, 2.0]))
    assert Calibration.from_dict(calibration.to_dict()) == calibration
    with pytest.raises(UserInputError, match="calibration.json: expected the fields"):
        Calibration.from_dict({"image_threshold": 1.0}, "calibration.json")
    with pytest.raises(UserInputError, match="quantile 1.5"):
        quantile_calibration(np.ones((2, 3, 3)), np.ones(2), 1.5)
    with pytest.raises(UserInputError, match=r"expected maps \(N, H, W\)"):
        quantile_calibration(np.ones((3, 3)), np.ones(2))
    with pytest.raises(UserInputError, match="masks of shape"):
        f1_calibration(np.ones((2, 3, 3)), np.ones(2), [False, True], np.ones((2, 4, 4), bool))
