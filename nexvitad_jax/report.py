"""Reports of runs: Markdown tables like the paper's Table 1 and heatmap grids like its Fig. 4."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

# Column order and headers of the tables (the paper's three, then the standard ones).
COLUMNS = (("pixel_auroc", "pixel AUROC"), ("pixel_ap", "AP"), ("pro_iou", "PRO-IoU"), ("aupro", "AUPRO@0.3"),
           ("image_auroc", "image AUROC"))
METHOD_NAMES = {"memory_bank": "memory bank", "decoder": "decoder"}


def percent(value) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}"


def metrics_table(rows: Sequence[tuple[Sequence[str], Mapping[str, Any]]], headers: Sequence[str]) -> str:
    """A Markdown table: leading text columns, then one column per metric (in %)."""
    lines = ["| " + " | ".join([*headers, *(title for _, title in COLUMNS)]) + " |",
             "|" + "---|" * (len(headers) + len(COLUMNS))]
    for labels, metrics in rows:
        lines.append("| " + " | ".join([*labels, *(percent(metrics.get(name)) for name, _ in COLUMNS)]) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(results: Mapping[str, Any]) -> str:
    """results.md of one `nexvitad run`: the Table 1 row (mean over target classes) per inference
    path, then every target class."""
    target = ", ".join(results["target"])
    out = [f"# NexViTAD run: split {results['split']}, target {target}, seed {results['seed']}\n",
           f"Data: `{results['data']}`; {results['train_steps']} training steps"
           + (" with RANDOMLY INITIALIZED backbones (pipeline check, not the paper's accuracy)"
              if results.get("random_backbones") else "") + ".\n",
           "## Table 1 row (mean over target classes, %)\n",
           metrics_table([((results["split"], METHOD_NAMES.get(m, m)), results["mean"][m])
                          for m in results["methods"]], ("split", "inference")),
           "\n## Per target class (%)\n",
           metrics_table([((c, METHOD_NAMES.get(m, m)), results["per_class"][c][m])
                          for c in results["target"] for m in results["methods"]], ("class", "inference"))]
    timings = results.get("timings", {})
    if timings:
        out.append("\nWall time: " + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in timings.items()) + ".\n")
    return "\n".join(out)


def pick_examples(labels: np.ndarray, count: int = 6, normal: int = 1) -> np.ndarray:
    """Indices of the images to show: anomalous ones first, then `normal` normal ones."""
    anomalous = np.flatnonzero(labels == 1)[:count - min(normal, count)]
    normal_ones = np.flatnonzero(labels == 0)[:count - len(anomalous)]
    return np.concatenate([anomalous, normal_ones]).astype(int)


def heatmap_grid(path: str | Path, category: str, test, maps: Mapping[str, np.ndarray], *, count: int = 6) -> Path:
    """PNG grid, one row per test image: original | ground truth | one heatmap per inference path
    (each path's maps scaled by its own min/max over the class, so rows are comparable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pick_examples(np.asarray(test.labels), count)
    columns = ["original", "ground truth", *(METHOD_NAMES.get(m, m) for m in maps)]
    figure, axes = plt.subplots(len(rows), len(columns), figsize=(2.0 * len(columns), 2.0 * len(rows)),
                                squeeze=False)
    ranges = {m: (float(v.min()), float(v.max())) for m, v in maps.items()}
    for r, index in enumerate(rows):
        panels = [(test.images[index], {}), (test.masks[index], dict(cmap="gray", vmin=0, vmax=1))]
        panels += [(maps[m][index], dict(cmap="jet", vmin=ranges[m][0], vmax=ranges[m][1])) for m in maps]
        for c, (image, style) in enumerate(panels):
            axis = axes[r, c]
            axis.imshow(image, **style)
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(columns[c], fontsize=9)
        axes[r, 0].set_ylabel(test.defect_types[index], fontsize=8)
    figure.suptitle(category)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
