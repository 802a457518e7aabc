"""Metrics vs sklearn and vs MVTec's official AUPRO algorithm written out per threshold."""

from __future__ import annotations

from bisect import bisect

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from nexvitad_jax import metrics
from nexvitad_jax.errors import UserInputError

TOL = 1e-6


# ----------------------------------------------------------------------------- references


def official_trapezoid(x, y, x_max=None):
    """MVTec AD evaluation's generic_util.trapezoid (the integration it uses for AUPRO)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            ins = bisect(x, x_max)
            assert 0 < ins < len(x)
            y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        keep = x <= x_max
        x, y = x[keep], y[keep]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def reference_aupro(scores, masks, fpr_limit=0.3):
    """MVTec's AUPRO by definition, one threshold at a time.

    Regions: 8-connected components of each ground-truth map (3x3 ones). At every distinct score t
    (descending; ties merged) a pixel is anomalous when score >= t; FPR = fraction of normal pixels
    anomalous, PRO = mean over all regions of the fraction of the region anomalous. The curve
    starts at (0, 0) and ends at (1, 1); integrate to the limit, interpolating linearly there, and
    divide by the limit.
    """
    regions = []
    for image, mask in enumerate(masks):
        labelled, n = scipy.ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        regions += [(image, labelled == k) for k in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(scores)[::-1]:
        predicted = scores >= threshold
        fprs.append(np.count_nonzero(predicted & normal) / np.count_nonzero(normal))
        pros.append(np.mean([predicted[image][region].mean() for image, region in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    return official_trapezoid(fprs, pros, fpr_limit) / fpr_limit


def reference_f1max(scores, labels):
    precision, recall, thresholds = precision_recall_curve(labels.ravel(), scores.ravel())
    f1 = np.divide(2 * precision * recall, precision + recall,
                   out=np.zeros_like(precision), where=precision + recall > 0)
    best = np.argmax(f1[:-1])
    return f1[best], thresholds[best]


# ----------------------------------------------------------------------------- data


def blob_masks(rng, n, h, w, anomalous_fraction=0.5, max_blobs=3):
    """Masks with several rectangular and disk regions (touching ones merge, as in MVTec)."""
    masks = np.zeros((n, h, w), dtype=bool)
    yy, xx = np.mgrid[:h, :w]
    for image in range(n):
        if rng.random() >= anomalous_fraction:
            continue
        for _ in range(rng.integers(1, max_blobs + 1)):
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            r = rng.integers(1, max(2, h // 5))
            if rng.random() < 0.5:
                masks[image] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                masks[image, cy:cy + r, cx:cx + 2 * r] = True
    masks[0, 1:4, 1:4] = True  # at least one region, and diagonal-only contact below
    masks[0, 4, 4] = True  # touches (3, 3) only diagonally: 8-connectivity makes it one region
    masks[-1] = False  # at least one normal image
    return masks


def tied_scores(rng, masks, levels):
    """Scores correlated with the masks and rounded to a few levels (many ties)."""
    raw = rng.normal(size=masks.shape) + 1.2 * masks
    return np.round(raw * levels / 4.0) / levels


# ----------------------------------------------------------------------------- sklearn parity


@pytest.mark.parametrize("levels", [3, 10, 1000])
@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_ap_equal_sklearn_with_ties(levels, seed):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 12, 32, 40)
    scores = tied_scores(rng, masks, levels).astype(np.float32)
    labels, flat = masks.ravel(), scores.ravel()
    assert abs(metrics.pixel_auroc(scores, masks) - roc_auc_score(labels, flat)) < TOL
    assert abs(metrics.pixel_ap(scores, masks) - average_precision_score(labels, flat)) < TOL
    f1, threshold = metrics.pixel_f1max(scores, masks)
    ref_f1, _ = reference_f1max(scores, masks)
    assert abs(f1 - ref_f1) < TOL
    # The returned threshold reproduces the F1 it reports.
    predicted = scores >= threshold
    tp = np.count_nonzero(predicted & masks)
    assert abs(2 * tp / (np.count_nonzero(predicted) + np.count_nonzero(masks)) - f1) < TOL


def test_image_metrics_equal_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.random(300) < 0.4
    image_scores = np.round(rng.normal(size=300) + labels, 1)
    assert abs(metrics.image_auroc(image_scores, labels) - roc_auc_score(labels, image_scores)) < TOL
    assert abs(metrics.image_ap(image_scores, labels) - average_precision_score(labels, image_scores)) < TOL
    assert abs(metrics.f1max(image_scores, labels)[0] - reference_f1max(image_scores, labels)[0]) < TOL


def test_float64_and_integer_scores():
    rng = np.random.default_rng(4)
    masks = blob_masks(rng, 6, 20, 20)
    scores = rng.integers(0, 7, size=masks.shape)
    assert abs(metrics.pixel_auroc(scores, masks) - roc_auc_score(masks.ravel(), scores.ravel())) < TOL
    scores64 = rng.normal(size=masks.shape) + masks
    assert abs(metrics.pixel_ap(scores64, masks.astype(np.uint8))
               - average_precision_score(masks.ravel(), scores64.ravel())) < TOL


def test_jax_arrays_and_bfloat16_maps():
    import jax.numpy as jnp

    rng = np.random.default_rng(10)
    masks = blob_masks(rng, 6, 20, 20)
    scores = jnp.asarray(rng.normal(size=masks.shape) + masks, dtype=jnp.bfloat16)
    as_float = np.asarray(scores.astype(jnp.float32))
    assert abs(metrics.pixel_auroc(scores, jnp.asarray(masks))
               - roc_auc_score(masks.ravel(), as_float.ravel())) < TOL
    assert abs(metrics.aupro(scores, masks) - reference_aupro(as_float, masks)) < TOL


def test_infinite_scores_are_ordinary_extremes():
    rng = np.random.default_rng(11)
    masks = blob_masks(rng, 6, 16, 16)
    scores = tied_scores(rng, masks, 8)
    scores[masks & (rng.random(masks.shape) < 0.3)] = np.inf
    scores[~masks & (rng.random(masks.shape) < 0.05)] = -np.inf
    scores[~masks & (rng.random(masks.shape) < 0.01)] = np.inf
    ranks = scipy.stats.rankdata(scores.ravel(), method="dense")  # finite, same order
    assert abs(metrics.pixel_auroc(scores, masks) - roc_auc_score(masks.ravel(), ranks)) < TOL
    assert abs(metrics.pixel_ap(scores, masks) - average_precision_score(masks.ravel(), ranks)) < TOL
    assert abs(metrics.aupro(scores, masks) - reference_aupro(scores, masks)) < TOL


def test_complex_or_string_scores_rejected():
    masks = np.zeros((1, 2, 2), dtype=bool)
    with pytest.raises(UserInputError, match="real numbers"):
        metrics.pixel_auroc(np.full((1, 2, 2), "a"), masks)


# ----------------------------------------------------------------------------- AUPRO


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("levels", [4, 40])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_equals_official_algorithm_with_ties(seed, levels, fpr_limit):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 8, 24, 28)
    scores = tied_scores(rng, masks, levels)
    expected = reference_aupro(scores, masks, fpr_limit)
    assert abs(metrics.aupro(scores, masks, fpr_limit) - expected) < TOL


def test_aupro_equals_official_algorithm_distinct_scores():
    rng = np.random.default_rng(7)
    masks = blob_masks(rng, 5, 20, 24)
    scores = rng.random(masks.shape) + 0.5 * masks
    assert abs(metrics.aupro(scores, masks) - reference_aupro(scores, masks)) < TOL


def test_aupro_limit_on_a_curve_point():
    # 10 normal pixels: FPR steps of 0.1, so the limit 0.3 is a curve point (no interpolation).
    scores = np.arange(12, dtype=np.float64).reshape(1, 3, 4)
    masks = np.zeros((1, 3, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 2, 3] = True
    assert abs(metrics.aupro(scores, masks) - reference_aupro(scores, masks)) < TOL


def test_aupro_anomalib_case():
    # anomalib's test: scores arange(2800)/2800 on a 400x7 map, the middle column anomalous.
    scores = (np.arange(2800) / 2800.0).reshape(1, 400, 7)
    masks = np.zeros((1, 400, 7), dtype=bool)
    masks[..., 3] = True
    value = metrics.aupro(scores, masks, fpr_limit=1 / 3)
    assert abs(value - 1 / 6) < 1e-3  # anomalib's tolerance
    # Exactly, the curve is a staircase around the diagonal: PRO k/400 over FPR
    # [(6k-3)/2400, (6k+3)/2400]; the limit 800/2400 ends 5/2400 into step k = 133.
    exact = (sum(k / 400 * 6 / 2400 for k in range(1, 133)) + 133 / 400 * 5 / 2400) * 3
    assert abs(value - exact) < 1e-12
    assert abs(value - reference_aupro(scores, masks, 1 / 3)) < TOL


def test_aupro_perfect_and_random_maps():
    rng = np.random.default_rng(5)
    masks = blob_masks(rng, 20, 48, 48)
    assert metrics.aupro(masks.astype(np.float32), masks) == pytest.approx(1.0, abs=1e-12)
    assert metrics.aupro(rng.random(masks.shape), masks) == pytest.approx(0.15, abs=0.02)
    # Random scores: PRO(t) = FPR(t) in expectation, so the area to 0.3 is 0.3^2/2 / 0.3.


def test_aupro_counts_8_connected_regions_over_all_images():
    # Two images: one big region (100 px) fully found, one single-pixel region missed, one
    # diagonal pair that must count as ONE region. PRO averages regions, not pixels.
    masks = np.zeros((2, 12, 12), dtype=bool)
    masks[0, :10, :10] = True
    masks[1, 0, 0] = True
    masks[1, 5, 5] = masks[1, 6, 6] = True
    scores = np.zeros(masks.shape)
    scores[0, :10, :10] = 1.0
    scores[1, 5, 5] = scores[1, 6, 6] = 1.0
    # At t = 1: (FPR 0, PRO (1 + 0 + 1) / 3); at t = 0: (1, 1). A line from (0, 2/3) to (1, 1),
    # whose mean height over [0, 0.3] is 2/3 + 0.15 / 3.
    assert metrics.aupro(scores, masks) == pytest.approx(2 / 3 + 0.15 / 3, abs=1e-12)
    assert metrics.aupro(scores, masks) == pytest.approx(reference_aupro(scores, masks), abs=TOL)


# ----------------------------------------------------------------------------- PRO-IoU (eq. 17)


def test_pro_iou_is_mean_iou_over_anomalous_images():
    rng = np.random.default_rng(6)
    masks = blob_masks(rng, 10, 32, 32)
    scores = tied_scores(rng, masks, 20)
    _, threshold = reference_f1max(scores, masks)
    anomalous = [i for i in range(len(masks)) if masks[i].any()]
    ious = []
    for i in anomalous:
        predicted = scores[i] >= threshold
        ious.append((predicted & masks[i]).sum() / (predicted | masks[i]).sum())
    assert metrics.pro_iou(scores, masks) == pytest.approx(np.mean(ious), abs=1e-12)
    assert metrics.pro_iou(masks.astype(float), masks) == pytest.approx(1.0)
    assert metrics.pro_iou(scores, masks, threshold=np.inf) == 0.0


# ----------------------------------------------------------------------------- registry


def test_evaluate_registry_matches_single_functions():
    rng = np.random.default_rng(8)
    masks = blob_masks(rng, 10, 24, 24)
    scores = tied_scores(rng, masks, 30).astype(np.float32)
    results = metrics.evaluate(scores, masks)
    assert set(results) == set(metrics.EVALUATORS)
    assert results["pixel_auroc"] == metrics.pixel_auroc(scores, masks)
    assert results["aupro"] == metrics.aupro(scores, masks)
    assert results["pro_iou"] == metrics.pro_iou(scores, masks)
    image_scores = scores.max(axis=(1, 2))
    labels = masks.any(axis=(1, 2))
    assert abs(results["image_auroc"] - roc_auc_score(labels, image_scores)) < TOL
    assert metrics.evaluate(scores, masks, ["aupro"], fpr_limit=0.1) == {
        "aupro": metrics.aupro(scores, masks, 0.1)
    }
    given_scores = rng.random(len(masks))
    assert metrics.evaluate(scores, masks, "image_auroc", image_scores=given_scores)[
        "image_auroc"] == pytest.approx(roc_auc_score(labels, given_scores), abs=TOL)


def test_jax_backend_equals_numpy_backend():
    rng = np.random.default_rng(9)
    masks = blob_masks(rng, 6, 24, 24)
    scores = tied_scores(rng, masks, 25).astype(np.float32)
    names = ["pixel_auroc", "pixel_ap", "aupro", "pixel_f1max", "pro_iou"]
    on_numpy = metrics.evaluate(scores, masks, names, backend="numpy")
    on_jax = metrics.evaluate(scores, masks, names, backend="jax")
    for name in names:
        assert on_jax[name] == pytest.approx(on_numpy[name], abs=1e-12), name


# ----------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    levels=st.integers(2, 30),
    transform=st.sampled_from(["exp", "cube", "affine", "logistic"]),
)
def test_strictly_increasing_transforms_change_no_metric(seed, levels, transform):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 4, 12, 12)
    scores = tied_scores(rng, masks, levels)
    f = {
        "exp": np.exp,
        "cube": lambda x: x**3,
        "affine": lambda x: 3.0 * x - 7.0,
        "logistic": lambda x: 1.0 / (1.0 + np.exp(-x)),
    }[transform]
    names = [n for n in metrics.EVALUATORS if n != "pixel_f1max_threshold"]
    before = metrics.evaluate(scores, masks, names)
    after = metrics.evaluate(f(scores), masks, names)
    for name in names:
        assert after[name] == pytest.approx(before[name], abs=1e-9), name


# ----------------------------------------------------------------------------- bad input


def _maps():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 2:4, 2:4] = True
    return np.random.default_rng(0).random((2, 8, 8)), masks


@pytest.mark.parametrize("fn", [metrics.pixel_auroc, metrics.pixel_ap, metrics.aupro, metrics.pro_iou])
def test_shape_mismatch(fn):
    scores, masks = _maps()
    with pytest.raises(UserInputError, match=r"shapes differ.*\(2, 8, 8\).*\(2, 8, 7\)"):
        fn(scores, masks[:, :, :7])


def test_wrong_rank_and_empty():
    scores, masks = _maps()
    with pytest.raises(UserInputError, match="expected 3 dimensions"):
        metrics.aupro(scores[0], masks[0])
    with pytest.raises(UserInputError, match="empty"):
        metrics.pixel_auroc(scores[:0], masks[:0])


@pytest.mark.parametrize("fn", [metrics.pixel_auroc, metrics.pixel_ap, metrics.aupro, metrics.evaluate])
def test_nan_scores(fn):
    scores, masks = _maps()
    scores[1, 3, 3] = np.nan
    with pytest.raises(UserInputError, match="1 NaN"):
        fn(scores, masks)


def test_nan_image_scores():
    with pytest.raises(UserInputError, match="NaN"):
        metrics.image_auroc(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1]))


@pytest.mark.parametrize("fn", [metrics.pixel_auroc, metrics.pixel_ap, metrics.aupro, metrics.pro_iou])
def test_no_anomalous_pixel(fn):
    scores, masks = _maps()
    with pytest.raises(UserInputError, match="no anomalous"):
        fn(scores, np.zeros_like(masks))


@pytest.mark.parametrize("fn", [metrics.pixel_auroc, metrics.pixel_ap, metrics.aupro])
def test_no_normal_pixel(fn):
    scores, masks = _maps()
    with pytest.raises(UserInputError, match="no normal"):
        fn(scores, np.ones_like(masks))


def test_image_level_one_class():
    with pytest.raises(UserInputError, match="no normal"):
        metrics.image_auroc([0.1, 0.2], [1, 1])
    scores, masks = _maps()
    masks[1, 0, 0] = True  # every image anomalous: image AUROC undefined, pixel metrics fine
    assert 0 <= metrics.evaluate(scores, masks, ["pixel_auroc"])["pixel_auroc"] <= 1
    with pytest.raises(UserInputError, match="image labels contain no normal"):
        metrics.evaluate(scores, masks, ["image_auroc"])


def test_bad_masks_limit_names_backend():
    scores, masks = _maps()
    with pytest.raises(UserInputError, match="0/1.*binarize"):
        metrics.pixel_auroc(scores, masks * 255)
    for limit in (0.0, -0.1, 1.5):
        with pytest.raises(UserInputError, match="fpr_limit must be in"):
            metrics.aupro(scores, masks, limit)
    with pytest.raises(UserInputError, match="unknown evaluator.*'pixel_aucroc'"):
        metrics.evaluate(scores, masks, ["pixel_aucroc"])
    with pytest.raises(UserInputError, match="unknown metrics backend"):
        metrics.pixel_auroc(scores, masks, backend="torch")
    with pytest.raises(UserInputError, match="2 entries for 2 maps|image scores"):
        metrics.evaluate(scores, masks, ["image_auroc"], image_scores=[0.1, 0.2, 0.3])


def test_evaluate_maps_leaves_out_images_without_masks():
    """A defect image without a mask (a folder-spec class) counts in the image metrics only; with no
    masked defect image at all the pixel metrics are undefined, with the reason."""
    from sklearn.metrics import roc_auc_score

    from nexvitad_jax.metrics import evaluate_maps, mean_metrics

    rng = np.random.default_rng(7)
    maps = rng.uniform(size=(4, 8, 8)).astype(np.float32)
    masks = np.zeros((4, 8, 8), bool)
    masks[1, 2:5, 2:5] = True
    labels = np.array([0, 1, 1, 0])
    scores = maps.max(axis=(1, 2))
    known = np.array([True, True, False, True])
    result = evaluate_maps(maps, masks, scores, labels, mask_known=known, reason="no masks for dent")
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks[known].ravel(), maps[known].ravel()))
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert "no masks for dent" in result["notes"]["pixel_auroc"]
    none = evaluate_maps(maps, masks & False, scores, labels, mask_known=np.array([True, False, False, True]),
                         reason="no masks for dent")
    assert none["pixel_auroc"] is None and none["undefined"]["pixel_auroc"] == "no masks for dent"
    assert none["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert mean_metrics([result, result])["pixel_auroc"] == pytest.approx(result["pixel_auroc"])
    assert "notes" not in mean_metrics([result, result])
