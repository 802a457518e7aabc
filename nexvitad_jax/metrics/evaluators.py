"""Pixel and image metrics from exact rank statistics, and the evaluator registry.

Conventions: higher score = more anomalous; a pixel is predicted anomalous at threshold t when
`score >= t`; curves have points only at distinct score values (ties merged). Scores (N, H, W)
real, masks (N, H, W) bool (or 0/1). A metric whose curve is undefined (no anomalous or no normal
pixel) raises UserInputError, as do NaN scores and shape mismatches.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import scipy.ndimage

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.metrics.ranking import Ranking, check_scores_labels, rank, require_both_classes

DEFAULT_FPR_LIMIT = 0.3

# 8-connected regions inside each image and none across images: a 3x3 block in the middle plane.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


# ----------------------------------------------------------------------------- curves from ranks


def auroc_from_ranking(r: Ranking) -> float:
    """Area under the ROC curve (equals sklearn's roc_auc_score, ties merged).

    Trapezoid over the merged ROC curve = the Mann-Whitney statistic with ties counted half:
    AUROC = sum_pos (#neg below + #neg equal / 2) / (P * N). Integer sums, so it is exact.
    """
    wins = int(r.neg_below.sum()) + 0.5 * int(r.neg_equal.sum())
    return float(wins / (float(r.n_pos) * float(r.n_neg)))


def ap_from_ranking(r: Ranking) -> float:
    """Step-wise average precision, the paper's eq. 16: AP = sum_n (R_n - R_{n-1}) P_n.

    Recall rises only at distinct positive scores, by (#positives at that score) / P, and every
    positive of a tie group sees the same precision, so AP is the mean over positives of the
    precision at their own score (equals sklearn's average_precision_score).
    """
    tp = r.pos_at_or_above.astype(np.float64)
    precision = tp / (tp + r.neg_at_or_above)
    return float(precision.mean())


def f1max_from_ranking(r: Ranking) -> tuple[float, float]:
    """(max F1 over thresholds, the threshold reaching it); anomalous means score >= threshold.

    F1 = 2 TP / (TP + FP + P). For a fixed TP the smallest FP is at the highest threshold that
    keeps those positives, i.e. at a positive's own score, so those thresholds are the only
    candidates.
    """
    tp = r.pos_at_or_above.astype(np.float64)
    f1 = 2.0 * tp / (tp + r.neg_at_or_above + r.n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(r.pos_scores[best])


def aupro_from_ranking(r: Ranking, region_weight: np.ndarray, fpr_limit: float) -> float:
    """Area under the PRO curve up to fpr_limit, divided by fpr_limit, as MVTec's evaluation.

    MVTec's compute_pro sorts all pixels, accumulates FPR and PRO, keeps one point per distinct
    score, prepends (0, 0) and integrates with the trapezoid rule, interpolating linearly at the
    limit. On that curve a positive pixel with score s enters the PRO (with its weight
    1 / (|region| * n_regions)) as a linear ramp over the FPR interval [a, b] of its tie group,
    a = #neg > s / N, b = #neg >= s / N (a step when a == b). So the integral is a weighted sum of
    each positive's ramp integrated over [0, fpr_limit] -- no loop over thresholds.
    """
    n_neg = float(r.n_neg)
    a = (r.n_neg - r.neg_below - r.neg_equal) / n_neg
    b = (r.n_neg - r.neg_below) / n_neg
    width = b - a
    limit = float(fpr_limit)
    full = (limit - b) + 0.5 * width  # the ramp lies wholly below the limit
    # The limit cuts the ramp: integral of (x - a) / width from a to the limit.
    partial = np.divide(
        np.square(np.maximum(limit - a, 0.0)), 2.0 * width, out=np.zeros_like(a), where=width > 0
    )
    inside = np.where(limit >= b, full, np.where(limit > a, partial, 0.0))
    return float(np.dot(region_weight, inside) / limit)


def region_weights(masks: np.ndarray) -> np.ndarray:
    """Per anomalous pixel (C order of masks[masks]): 1 / (|its region| * total regions).

    Regions are 8-connected components of each image's mask (MVTec: scipy label, 3x3 ones).
    Only images holding an anomaly are labelled, which keeps the int32 label map small.
    """
    anomalous_images = masks.any(axis=(1, 2))
    regions, n_regions = scipy.ndimage.label(masks[anomalous_images], structure=_REGION_STRUCTURE)
    region_of_pixel = regions[regions > 0]
    sizes = np.bincount(region_of_pixel, minlength=n_regions + 1)
    return 1.0 / (sizes[region_of_pixel].astype(np.float64) * n_regions)


# ----------------------------------------------------------------------------- shared evaluation


class Evaluation:
    """One set of anomaly maps and masks; intermediate results are computed once and shared.

    Args:
      scores: (N, H, W) anomaly maps.
      masks: (N, H, W) ground truth, bool or 0/1.
      image_scores: (N,) image scores; default the max of each map (DESIGN.md).
      image_labels: (N,) image labels; default "the mask has an anomalous pixel".
      fpr_limit: AUPRO integration limit (0 < limit <= 1).
      backend: "auto" (NumPy on CPU, JAX on an accelerator), "numpy" or "jax".
    """

    def __init__(self, scores, masks, *, image_scores=None, image_labels=None,
                 fpr_limit: float = DEFAULT_FPR_LIMIT, backend: str = "auto"):
        self.scores, self.masks = check_scores_labels(
            scores, masks, what="anomaly maps and masks", ndim=3
        )
        self._image_scores, self._image_labels = image_scores, image_labels
        self.fpr_limit = _check_fpr_limit(fpr_limit)
        self.backend = backend

    @functools.cached_property
    def pixel_ranking(self) -> Ranking:
        require_both_classes(self.masks, what="masks", metric="a pixel-level curve")
        return rank(self.scores, self.masks, self.backend)

    @functools.cached_property
    def image_ranking(self) -> Ranking:
        image_scores = self.scores.max(axis=(1, 2)) if self._image_scores is None else self._image_scores
        labels = self.masks.any(axis=(1, 2)) if self._image_labels is None else self._image_labels
        image_scores, labels = check_scores_labels(image_scores, labels, what="image scores and labels", ndim=1)
        if image_scores.shape[0] != self.scores.shape[0]:
            raise UserInputError(
                f"image scores and labels: {image_scores.shape[0]} entries for {self.scores.shape[0]} maps"
            )
        require_both_classes(labels, what="image labels", metric="an image-level curve")
        return rank(image_scores, labels, "numpy")

    @functools.cached_property
    def pixel_f1max(self) -> tuple[float, float]:
        return f1max_from_ranking(self.pixel_ranking)

    def aupro(self) -> float:
        r = self.pixel_ranking
        weights = region_weights(self.masks)[r.pos_order]
        return aupro_from_ranking(r, weights, self.fpr_limit)

    def pro_iou(self, threshold: float | None = None) -> float:
        """The paper's eq. 17 ("PRO-IoU"): mean IoU over anomalous images of the binarized map.

        The map is thresholded (score >= t) at the pixel F1-max threshold unless one is given.
        Not MVTec's AUPRO: the paper's "PRO" is this IoU, so it is reported under its own name.
        """
        anomalous = self.masks.any(axis=(1, 2))
        if not anomalous.any():
            raise UserInputError(
                "PRO-IoU is undefined: the masks contain no anomalous image; expected at least one"
            )
        t = self.pixel_f1max[1] if threshold is None else float(threshold)
        predicted = self.scores[anomalous] >= t
        truth = self.masks[anomalous]
        intersection = np.count_nonzero(predicted & truth, axis=(1, 2))
        union = np.count_nonzero(predicted | truth, axis=(1, 2))
        return float(np.mean(intersection / union))


def _check_fpr_limit(fpr_limit) -> float:
    limit = float(fpr_limit)
    if not 0.0 < limit <= 1.0:
        raise UserInputError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")
    return limit


# ----------------------------------------------------------------------------- registry

EVALUATORS: dict[str, Callable[[Evaluation], float]] = {
    "pixel_auroc": lambda e: auroc_from_ranking(e.pixel_ranking),
    "pixel_ap": lambda e: ap_from_ranking(e.pixel_ranking),
    "aupro": Evaluation.aupro,
    "pixel_f1max": lambda e: e.pixel_f1max[0],
    "pixel_f1max_threshold": lambda e: e.pixel_f1max[1],
    "pro_iou": Evaluation.pro_iou,
    "image_auroc": lambda e: auroc_from_ranking(e.image_ranking),
    "image_ap": lambda e: ap_from_ranking(e.image_ranking),
    "image_f1max": lambda e: f1max_from_ranking(e.image_ranking)[0],
}
"""Evaluators by name, for configs and experiment scripts: name -> f(Evaluation) -> float."""


def evaluate(scores, masks, names=None, *, image_scores=None, image_labels=None,
             fpr_limit: float = DEFAULT_FPR_LIMIT, backend: str = "auto") -> dict[str, float]:
    """Every named evaluator on one set of maps, sharing one sort of the pixels.

    names: evaluator names (see EVALUATORS); None means all of them.
    """
    names = list(EVALUATORS) if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise UserInputError(f"unknown evaluator(s) {unknown}; expected names from {sorted(EVALUATORS)}")
    evaluation = Evaluation(scores, masks, image_scores=image_scores, image_labels=image_labels,
                            fpr_limit=fpr_limit, backend=backend)
    return {name: EVALUATORS[name](evaluation) for name in names}


# ----------------------------------------------------------------------------- public functions


def pixel_auroc(scores, masks, *, backend: str = "auto") -> float:
    """Pixel AUROC over all pixels of all maps (equals sklearn's roc_auc_score)."""
    return auroc_from_ranking(Evaluation(scores, masks, backend=backend).pixel_ranking)


def pixel_ap(scores, masks, *, backend: str = "auto") -> float:
    """Pixel average precision, eq. 16 (equals sklearn's average_precision_score)."""
    return ap_from_ranking(Evaluation(scores, masks, backend=backend).pixel_ranking)


def pixel_f1max(scores, masks, *, backend: str = "auto") -> tuple[float, float]:
    """(max pixel F1 over thresholds, its threshold); anomalous means score >= threshold."""
    return Evaluation(scores, masks, backend=backend).pixel_f1max


def aupro(scores, masks, fpr_limit: float = DEFAULT_FPR_LIMIT, *, backend: str = "auto") -> float:
    """MVTec AUPRO: area under the per-region-overlap curve up to fpr_limit, divided by it.

    Equals MVTec AD's official evaluation (8-connected regions over all images, ties merged,
    linear interpolation at the limit). Needs at least one anomalous and one normal pixel.
    """
    return Evaluation(scores, masks, fpr_limit=fpr_limit, backend=backend).aupro()


def pro_iou(scores, masks, threshold: float | None = None, *, backend: str = "auto") -> float:
    """The paper's eq. 17 ("PRO-IoU"), at the pixel F1-max threshold unless one is given."""
    return Evaluation(scores, masks, backend=backend).pro_iou(threshold)


def image_auroc(image_scores, labels) -> float:
    """Image AUROC from (N,) image scores and (N,) labels (equals sklearn's roc_auc_score)."""
    return auroc_from_ranking(_image_ranking(image_scores, labels))


def image_ap(image_scores, labels) -> float:
    """Image average precision (equals sklearn's average_precision_score)."""
    return ap_from_ranking(_image_ranking(image_scores, labels))


def f1max(scores, labels) -> tuple[float, float]:
    """(max F1, threshold) for scores and labels of any one shape (images or pixels)."""
    scores, labels = check_scores_labels(scores, labels, what="scores and labels")
    require_both_classes(labels, what="labels", metric="F1-max")
    return f1max_from_ranking(rank(scores, labels, "numpy"))


def _image_ranking(image_scores, labels) -> Ranking:
    image_scores, labels = check_scores_labels(image_scores, labels, what="image scores and labels", ndim=1)
    require_both_classes(labels, what="image labels", metric="an image-level curve")
    return rank(image_scores, labels, "numpy")
