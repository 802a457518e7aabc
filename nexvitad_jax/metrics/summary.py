"""Metrics of one class's maps (every pixel and image metric, undefined ones recorded as such) and
their means over classes: what the main job and the experiments report."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.metrics.evaluators import evaluate

PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pro_iou", "aupro", "pixel_f1max")
IMAGE_METRICS = ("image_auroc",)


def evaluate_maps(maps: np.ndarray, masks: np.ndarray, image_scores: np.ndarray, labels: np.ndarray, *,
                  mask_known: np.ndarray | None = None, reason: str | None = None) -> dict:
    """Pixel and image metrics of one class; a metric that is undefined there (e.g. a test set with
    no normal image has no image AUROC) is recorded as None, with the reason under "undefined".

    `mask_known` (N,) bool: False for an anomalous image without a mask (`reason` says which): the
    pixel metrics leave those images out (noted under "notes"), and are undefined when no anomalous
    image has a mask; the image metrics use every image."""
    results: dict[str, Any] = {}
    known = np.ones(len(maps), bool) if mask_known is None else np.asarray(mask_known, bool)
    pixel = (PIXEL_METRICS, dict(scores=maps[known], masks=masks[known]), {})
    image = (IMAGE_METRICS, dict(scores=maps, masks=masks), dict(image_scores=image_scores, image_labels=labels))
    if not known.all():
        results["notes"] = {name: f"pixel metrics without these images: {reason}" for name in PIXEL_METRICS}
    for names, arrays, kwargs in (pixel, image):
        try:
            if names is PIXEL_METRICS and not known[np.asarray(labels) == 1].any() and not known.all():
                raise UserInputError(reason or "no anomalous image has a mask")
            results.update(evaluate(arrays["scores"], arrays["masks"], list(names), **kwargs))
        except UserInputError as error:
            results.update({name: None for name in names})
            results.setdefault("undefined", {}).update({name: str(error) for name in names})
    return results


def mean_metrics(rows: Sequence[dict]) -> dict[str, float | None]:
    """Mean of each metric over classes (None where any class has it undefined)."""
    names = [name for name in rows[0] if name not in ("undefined", "notes")]
    return {name: (None if any(r.get(name) is None for r in rows) else float(np.mean([r[name] for r in rows])))
            for name in names}
