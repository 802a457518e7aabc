"""Calibration of a fitted detector: the image and pixel thresholds its decisions use, and the
normalization of its raw scores (saved in the detector folder as calibration.json).

Two ways to set the thresholds:
- `quantile_calibration`: no anomalous data. Normal images held out of the memory bank are scored
  and each threshold is a high quantile (default 0.99) of their scores: the image threshold of
  their image scores, the pixel threshold of all their pixels. The false positive rate on normal
  images is then about 1 - q (with few held-out images, coarser: see `false_positive_rate`).
- `f1_calibration`: labelled validation images (good and defective, masks optional). Each
  threshold maximizes F1 on them: the image threshold over the image scores and labels, the pixel
  threshold over the pixels and masks (without masks: the quantile of the good images' pixels).
  Validation without any defective image falls back to the quantile (an F1 threshold would be the
  smallest score, anomalib #2433).

A score is anomalous when it is >= its threshold (sklearn's `precision_recall_curve` convention).
Normalized scores follow anomalib's min-max normalization with the threshold mapped to 0.5:

    normalized = clip((raw - threshold) / (max - min) + 0.5, 0, 1)

where min and max are the smallest and largest scores of the calibration images (image scores for
the image score, pixels for the maps). A normalized score above 0.5 is above the threshold.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from nexvitad_jax.errors import UserInputError

DEFAULT_QUANTILE = 0.99


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Thresholds and normalization ranges (raw score units) and how they were set."""

    image_threshold: float
    pixel_threshold: float
    image_range: tuple[float, float]  # (min, max) of the calibration images' image scores
    pixel_range: tuple[float, float]  # (min, max) of their pixel scores
    method: str  # "quantile" (held-out normal images) or "f1" (labelled validation)
    images: int  # calibration images used
    quantile: float | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. validation F1

    def normalize_image_scores(self, scores) -> np.ndarray:
        return normalize(scores, self.image_threshold, self.image_range)

    def normalize_maps(self, maps) -> np.ndarray:
        return normalize(maps, self.pixel_threshold, self.pixel_range)

    def decisions(self, scores) -> np.ndarray:
        """True where an image is anomalous (image score >= the image threshold)."""
        return np.asarray(scores) >= self.image_threshold

    def masks(self, maps) -> np.ndarray:
        """Binary defect masks: pixels whose score is >= the pixel threshold."""
        return np.asarray(maps) >= self.pixel_threshold

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "image_range": list(self.image_range),
                "pixel_range": list(self.pixel_range)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "calibration") -> Calibration:
        fields = {field.name for field in dataclasses.fields(cls)}
        required = {"image_threshold", "pixel_threshold", "image_range", "pixel_range", "method", "images"}
        if not isinstance(values, dict) or not required <= set(values) or set(values) - fields:
            got = sorted(values) if isinstance(values, dict) else type(values).__name__
            raise UserInputError(f"{source}: expected the fields {sorted(required)} (and optionally "
                                 f"{sorted(fields - required)}), got {got}")
        return cls(**{**values, "image_range": tuple(values["image_range"]),
                      "pixel_range": tuple(values["pixel_range"])})


def normalize(raw, threshold: float, value_range: tuple[float, float]) -> np.ndarray:
    """anomalib's normalization: clip((raw - threshold) / (max - min) + 0.5, 0, 1), float32."""
    low, high = value_range
    spread = max(float(high) - float(low), np.finfo(np.float32).tiny)
    return np.clip((np.asarray(raw, np.float64) - threshold) / spread + 0.5, 0.0, 1.0).astype(np.float32)


def _check_quantile(quantile: float) -> float:
    if not 0.0 < float(quantile) <= 1.0:
        raise UserInputError(f"quantile {quantile!r}: expected a number in (0, 1], e.g. 0.99")
    return float(quantile)


def _check_maps(maps, scores) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = np.asarray(maps, np.float64), np.asarray(scores, np.float64)
    if maps.ndim != 3 or scores.shape != maps.shape[:1] or len(scores) == 0:
        raise UserInputError(f"calibration: expected maps (N, H, W) and image scores (N,) with N >= 1, got "
                             f"{maps.shape} and {scores.shape}")
    return maps, scores


def quantile_calibration(maps, scores, quantile: float = DEFAULT_QUANTILE) -> Calibration:
    """Thresholds at the `quantile` of normal images' image scores and of their pixels."""
    quantile = _check_quantile(quantile)
    maps, scores = _check_maps(maps, scores)
    return Calibration(image_threshold=float(np.quantile(scores, quantile)),
                       pixel_threshold=float(np.quantile(maps, quantile)),
                       image_range=(float(scores.min()), float(scores.max())),
                       pixel_range=(float(maps.min()), float(maps.max())),
                       method="quantile", images=len(scores), quantile=quantile)


def f1_optimal_threshold(scores, labels) -> tuple[float, float]:
    """(threshold, F1) maximizing F1 of `scores >= threshold` against boolean `labels`; the
    candidate thresholds are the distinct scores (as sklearn's precision_recall_curve). Ties in F1
    go to the highest threshold."""
    scores, labels = np.ravel(np.asarray(scores, np.float64)), np.ravel(np.asarray(labels, bool))
    positives = int(labels.sum())
    if positives == 0:
        raise UserInputError("F1-optimal threshold: the labels hold no anomalous example")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # The last index of each run of equal scores: predicting >= that score flags the whole run.
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    true_positives = np.cumsum(sorted_labels)[ends]
    flagged = ends + 1
    f1 = 2.0 * true_positives / (flagged + positives)
    best = int(np.argmax(f1))  # the first maximum: the highest threshold
    return float(sorted_scores[ends[best]]), float(f1[best])


def f1_calibration(maps, scores, labels, masks=None, quantile: float = DEFAULT_QUANTILE) -> Calibration:
    """F1-optimal thresholds on labelled validation images (`labels` (N,) bool, anomalous = True;
    `masks` (N, H, W) bool or None). Without masks the pixel threshold is the `quantile` of the good
    images' pixels; without anomalous images both thresholds are quantiles of the good images."""
    maps, scores = _check_maps(maps, scores)
    labels = np.asarray(labels, bool)
    if labels.shape != scores.shape:
        raise UserInputError(f"calibration: labels of shape {labels.shape}, expected {scores.shape}")
    good = ~labels
    if not labels.any():
        return dataclasses.replace(quantile_calibration(maps, scores, quantile),
                                   details={"note": "validation holds no anomalous image: quantile thresholds"})
    details: dict[str, Any] = {"anomalous": int(labels.sum()), "good": int(good.sum())}
    image_threshold, details["image_f1"] = f1_optimal_threshold(scores, labels)
    if masks is not None:
        masks = np.asarray(masks, bool)
        if masks.shape != maps.shape:
            raise UserInputError(f"calibration: masks of shape {masks.shape}, expected {maps.shape}")
        pixel_threshold, details["pixel_f1"] = f1_optimal_threshold(maps, masks)
        pixel_method = "f1"
    elif good.any():
        pixel_threshold, pixel_method = float(np.quantile(maps[good], _check_quantile(quantile))), "quantile"
    else:
        raise UserInputError("calibration: without masks the pixel threshold needs good validation images")
    details["pixel_threshold_method"] = pixel_method
    return Calibration(image_threshold=image_threshold, pixel_threshold=pixel_threshold,
                       image_range=(float(scores.min()), float(scores.max())),
                       pixel_range=(float(maps.min()), float(maps.max())),
                       method="f1", images=len(scores), quantile=quantile if pixel_method == "quantile" else None,
                       details=details)


def false_positive_rate(scores, threshold: float) -> float:
    """The fraction of (normal) `scores` at or above `threshold`."""
    scores = np.asarray(scores)
    return float((scores >= threshold).mean()) if scores.size else float("nan")
