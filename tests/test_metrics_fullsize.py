"""Full MVTec-test-set size (1725 x 224 x 224 = 86.6M pixels): exactness at scale (slow)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from nexvitad_jax import metrics
from tests.test_metrics import official_trapezoid

N_MAPS, SIZE = 1725, 224


def full_size_maps(levels: int | None):
    rng = np.random.default_rng(0)
    masks = np.zeros((N_MAPS, SIZE, SIZE), dtype=bool)
    for image in np.flatnonzero(rng.random(N_MAPS) < 0.5):
        cy, cx = rng.integers(0, SIZE, 2)
        ry, rx = rng.integers(4, 30, 2)
        masks[image, max(cy - ry, 0):cy + ry, max(cx - rx, 0):cx + rx] = True
    coarse = rng.standard_normal((N_MAPS, SIZE // 8, SIZE // 8)).astype(np.float32)
    scores = scipy.ndimage.zoom(coarse, (1, 8, 8), order=1) + 1.5 * masks
    scores += 0.3 * rng.standard_normal(scores.shape, dtype=np.float32)
    if levels is not None:
        scores = np.round((scores - scores.min()) / np.ptp(scores) * (levels - 1)).astype(np.float32)
    return scores, masks


def per_threshold_aupro(scores, masks, fpr_limit=0.3):
    """MVTec's definition, one pass over all pixels per distinct threshold (regions by bincount)."""
    structure = np.zeros((3, 3, 3), dtype=int)
    structure[1] = 1  # 8-connected inside each image only
    regions, n_regions = scipy.ndimage.label(masks, structure=structure)
    sizes = np.bincount(regions.ravel(), minlength=n_regions + 1)[1:]
    normal = ~masks
    n_normal = np.count_nonzero(normal)
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(scores)[::-1]:
        predicted = scores >= threshold
        fprs.append(np.count_nonzero(predicted & normal) / n_normal)
        pros.append(np.mean(np.bincount(regions[predicted], minlength=n_regions + 1)[1:] / sizes))
    return official_trapezoid(fprs + [1.0], pros + [1.0], fpr_limit) / fpr_limit


@pytest.mark.slow
def test_full_size_aupro_equals_per_threshold_definition():
    scores, masks = full_size_maps(levels=24)
    assert abs(metrics.aupro(scores, masks) - per_threshold_aupro(scores, masks)) < 1e-6


@pytest.mark.slow
def test_full_size_auroc_ap_equal_sklearn():
    scores, masks = full_size_maps(levels=None)
    labels, flat = masks.ravel(), scores.ravel()
    results = metrics.evaluate(scores, masks, ["pixel_auroc", "pixel_ap"])
    assert abs(results["pixel_auroc"] - roc_auc_score(labels, flat)) < 1e-6
    assert abs(results["pixel_ap"] - average_precision_score(labels, flat)) < 1e-6
