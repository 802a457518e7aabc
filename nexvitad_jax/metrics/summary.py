"""Metrics of one class's maps (every pixel and image metric, undefined ones recorded as such) and
their means over classes: what the main job and the experiments report."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.metrics.evaluators import evaluate

PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pro_iou", "aupro", "pixel_f1max")
IMAGE_METRICS = ("image_auroc",)


def evaluate_maps(maps: np.ndarray, masks: np.ndarray, image_scores: np.ndarray, labels: np.ndarray) -> dict:
    """Pixel and image metrics of one class; a metric that is undefined there (e.g. a test set with
    no normal image has no image AUROC) is recorded as None, with the reason under "undefined"."""
    results: dict[str, Any] = {}
    for names, kwargs in ((PIXEL_METRICS, {}), (IMAGE_METRICS, dict(image_scores=image_scores, image_labels=labels))):
        try:
            results.update(evaluate(maps, masks, list(names), **kwargs))
        except UserInputError as error:
            results.update({name: None for name in names})
            results.setdefault("undefined", {}).update({name: str(error) for name in names})
    return results


def mean_metrics(rows: Sequence[dict]) -> dict[str, float | None]:
    """Mean of each metric over classes (None where any class has it undefined)."""
    names = [name for name in rows[0] if name != "undefined"]
    return {name: (None if any(r.get(name) is None for r in rows) else float(np.mean([r[name] for r in rows])))
            for name in names}
