"""Exact, fast anomaly-detection metrics (DESIGN.md "Evaluation").

`evaluate(maps, masks, names)` runs evaluators by name (see `EVALUATORS`) and shares one sort of
all pixels between them; the single-metric functions are thin wrappers over the same code.
"""

from nexvitad_jax.metrics.evaluators import (
    DEFAULT_FPR_LIMIT,
    EVALUATORS,
    Evaluation,
    aupro,
    evaluate,
    f1max,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pixel_f1max,
    pro_iou,
)
from nexvitad_jax.metrics.summary import IMAGE_METRICS, PIXEL_METRICS, evaluate_maps, mean_metrics

__all__ = [
    "IMAGE_METRICS",
    "PIXEL_METRICS",
    "evaluate_maps",
    "mean_metrics",
    "DEFAULT_FPR_LIMIT",
    "EVALUATORS",
    "Evaluation",
    "aupro",
    "evaluate",
    "f1max",
    "image_ap",
    "image_auroc",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1max",
    "pro_iou",
]
