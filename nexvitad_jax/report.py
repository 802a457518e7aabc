"""Reports of runs: Markdown tables like the paper's Table 1, heatmap grids like its Fig. 4 (with
overlays, colour bars and decisions), the training curves (a plot, TensorBoard event files).

`overlay(image, heatmap, vmin=, vmax=)` is the one heatmap-over-image style of the project: the main
job's grids and `nexvitad score`'s pictures both use it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.io import atomic_file

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




# ----------------------------------------------------------------------------- heatmaps

COLORMAP = "jet"
OVERLAY_ALPHA = 0.5
ORACLE_THRESHOLD = "F1-optimal threshold on this test set (oracle)"


def colorize(values, *, vmin: float, vmax: float, cmap: str = COLORMAP) -> np.ndarray:
    """A float map (H, W) as RGB uint8 (H, W, 3): matplotlib's `cmap` over [vmin, vmax], values
    outside clipped to its ends (a constant scale, vmax <= vmin, maps everything to its low end)."""
    import matplotlib

    values = np.asarray(values, np.float64)
    span = float(vmax) - float(vmin)
    unit = np.clip((values - vmin) / span, 0.0, 1.0) if span > 0 else np.zeros_like(values)
    return matplotlib.colormaps[cmap](unit, bytes=True)[..., :3]


def overlay(image, heatmap, *, vmin: float, vmax: float, alpha: float = OVERLAY_ALPHA,
            cmap: str = COLORMAP) -> np.ndarray:
    """The heatmap over the image, RGB uint8 (H, W, 3): (1 - alpha) image + alpha colorize(heatmap).
    `image`: uint8 (H, W, 3) or (H, W); `heatmap`: float (H, W) at the image's size."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    heatmap = np.asarray(heatmap)
    if image.ndim != 3 or image.shape[-1] != 3 or heatmap.shape != image.shape[:2]:
        raise UserInputError(f"overlay: image {image.shape} and heatmap {heatmap.shape}; expected an image "
                             "(H, W, 3) or (H, W) and a heatmap (H, W) of the same size")
    if not 0.0 <= alpha <= 1.0:
        raise UserInputError(f"overlay: alpha {alpha}; expected a value in [0, 1]")
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colorize(heatmap, vmin=vmin, vmax=vmax, cmap=cmap)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def pick_rows(defect_types: Sequence[str], per_type: int = 2) -> list[int]:
    """The test images a grid shows: the first `per_type` of every defect type (sorted), then of the
    good ones, so every defect type appears."""
    by_type: dict[str, list[int]] = {}
    for index, kind in enumerate(defect_types):
        by_type.setdefault(kind, []).append(index)
    order = sorted(kind for kind in by_type if kind != "good") + (["good"] if "good" in by_type else [])
    return [index for kind in order for index in by_type[kind][:per_type]]


def oracle_threshold(image_scores, labels) -> float | None:
    """The image threshold maximizing image F1 on these very scores (anomalous: score >= it), None
    when the labels hold one class. An oracle: it has seen the test labels."""
    from nexvitad_jax.metrics import f1max

    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return None
    return f1max(np.asarray(image_scores, np.float64), labels)[1]


@dataclasses.dataclass(frozen=True)
class MethodScale:
    """One inference path's colour scale over a class (min..max of its maps) and its threshold."""

    vmin: float
    vmax: float
    threshold: float | None

    def decision(self, score: float) -> str | None:
        return None if self.threshold is None else ("anomalous" if score >= self.threshold else "normal")


@dataclasses.dataclass
class HeatmapGrid:
    """Where a written grid put things: `rows` (test indices, top down), `columns` (panel names), the
    top-left pixel of the first panel and the step between panels; panels are at input resolution."""

    path: Path
    rows: list[int]
    columns: list[str]
    origin: tuple[int, int]
    pitch: tuple[int, int]
    panel_size: tuple[int, int]  # (height, width)
    scales: dict[str, MethodScale]

    def panel_box(self, row: int, column: str) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the panel of `column` in the row-th row (PIL's crop box)."""
        left = self.origin[0] + self.columns.index(column) * self.pitch[0]
        top = self.origin[1] + row * self.pitch[1]
        return left, top, left + self.panel_size[1], top + self.panel_size[0]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


GAP, PAD, FONT_SIZE = 4, 8, 12
BAR_HEIGHT = 3 * FONT_SIZE + 24  # a colour bar with its title and tick labels
NORMAL_COLOUR, ANOMALOUS_COLOUR, TEXT_COLOUR = (0, 120, 0), (200, 0, 0), (0, 0, 0)


def _headers(maps: Mapping[str, np.ndarray]) -> list[tuple[str, str]]:
    """Each column's header as two lines."""
    headers = [("", "image"), ("ground", "truth")]
    for method in maps:
        headers += [(METHOD_NAMES.get(method, method), "map"), ("", "overlay")]
    return headers


def _row_lines(test, index: int, scales: Mapping[str, MethodScale], image_scores) -> list[tuple[str, tuple]]:
    """The text beside a row: defect type, file, then each path's image score and decision."""
    lines = [(test.defect_types[index], TEXT_COLOUR), (Path(test.paths[index]).name[:28], (90, 90, 90))]
    for method, scale in scales.items():
        score = float(image_scores[method][index])
        decision = scale.decision(score)
        if decision is None:
            lines.append((f"{METHOD_NAMES.get(method, method)} {score:.4g}", TEXT_COLOUR))
            continue
        wrong = (decision == "anomalous") != bool(test.labels[index])
        lines.append((f"{METHOD_NAMES.get(method, method)} {score:.4g} {decision}" + (" (wrong)" if wrong else ""),
                      ANOMALOUS_COLOUR if decision == "anomalous" else NORMAL_COLOUR))
    return lines


def _row_panels(test, index: int, maps: Mapping[str, np.ndarray], scales: Mapping[str, MethodScale]) -> list:
    """The row's panels (uint8 RGB at input resolution): image, ground truth, then map and overlay
    per path."""
    image = np.asarray(test.images[index])
    if test.labels[index] and not test.mask_known[index]:
        truth = np.full(image.shape, 160, np.uint8)  # an anomalous image without its mask: grey
    else:
        truth = np.repeat((np.asarray(test.masks[index]) > 0.5).astype(np.uint8)[..., None] * 255, 3, axis=-1)
    panels = [image, truth]
    for method, scale in scales.items():
        panels += [colorize(maps[method][index], vmin=scale.vmin, vmax=scale.vmax),
                   overlay(image, maps[method][index], vmin=scale.vmin, vmax=scale.vmax)]
    return panels


def _colour_bar(draw, canvas, left: int, top: int, width: int, scale: MethodScale, title: str, font) -> None:
    """A horizontal colour bar of `scale` with its title above and tick values below."""
    from PIL import Image

    draw.text((left, top), title, fill=TEXT_COLOUR, font=font)
    top += FONT_SIZE + 4
    ramp = np.linspace(scale.vmin, scale.vmax, width)[None, :].repeat(12, axis=0)
    canvas.paste(Image.fromarray(colorize(ramp, vmin=scale.vmin, vmax=scale.vmax)), (left, top))
    ticks = 5 if width >= 240 else 3
    for fraction in np.linspace(0.0, 1.0, ticks):
        x = left + int(round(fraction * (width - 1)))
        draw.line([(x, top + 12), (x, top + 16)], fill=TEXT_COLOUR)
        label = _tick_label(scale.vmin + fraction * (scale.vmax - scale.vmin), scale.vmax - scale.vmin)
        anchor = "la" if fraction == 0 else ("ra" if fraction == 1 else "ma")
        draw.text((x, top + 18), label, fill=TEXT_COLOUR, font=font, anchor=anchor)
    if scale.threshold is not None and scale.vmax > scale.vmin:
        x = left + int(round(np.clip((scale.threshold - scale.vmin) / (scale.vmax - scale.vmin), 0, 1) * (width - 1)))
        draw.line([(x, top - 3), (x, top + 15)], fill=(255, 255, 255), width=3)
        draw.line([(x, top - 3), (x, top + 15)], fill=TEXT_COLOUR, width=1)


def _tick_label(value: float, span: float) -> str:
    """`value` with the decimals that tell ticks `span` apart (3 significant digits of the span)."""
    decimals = int(np.clip(2 - np.floor(np.log10(span)), 0, 12)) if span > 0 else 3
    return f"{value:.{decimals}f}"


def _caption(scales: Mapping[str, MethodScale], per_type: int) -> str:
    thresholds = ", ".join(f"{METHOD_NAMES.get(m, m)} {s.threshold:.4g}" if s.threshold is not None
                           else f"{METHOD_NAMES.get(m, m)} none (the test set holds one class)"
                           for m, s in scales.items())
    images = "image" if per_type == 1 else "images"
    return (f"Rows: every defect type, up to {per_type} {images} each, then good ones; panels at the input "
            f"resolution. Decision: image score (max of the map) >= the {ORACLE_THRESHOLD}: {thresholds} "
            "(the run has no calibration; black line on the colour bars). Colours: one scale per inference "
            "path, its min..max over this class's test maps; overlays blend the map's colours over the image "
            f"(alpha {OVERLAY_ALPHA}). Ground truth: white = defect, grey = no mask available.")


def _wrap(text: str, font, width: int) -> list[str]:
    average = max(font.getlength("abcdefghijklmnopqrstuvwxyz") / 26.0, 1.0)
    return textwrap.wrap(text, max(int(width / average), 20))


def grid_scales(maps: Mapping[str, np.ndarray], image_scores: Mapping[str, np.ndarray],
                labels) -> dict[str, MethodScale]:
    """Each path's colour scale (min..max of its maps over the class) and oracle threshold."""
    return {m: MethodScale(float(np.min(v)), float(np.max(v)), oracle_threshold(image_scores[m], labels))
            for m, v in maps.items()}


def heatmap_grid(path: str | Path, category: str, test, maps: Mapping[str, np.ndarray],
                 image_scores: Mapping[str, np.ndarray] | None = None, *, per_type: int = 2) -> HeatmapGrid:
    """PNG grid of a class's test set, one row per shown image (every defect type, up to `per_type`
    each, then good ones): its defect type, image score and decision per path | image | ground truth
    | map and overlay per path, at input resolution; one colour bar per path; a caption saying how
    the decision is made. `maps`: {method: (N, H, W)}; `image_scores`: {method: (N,)} (default: the
    max of each map)."""
    from PIL import Image, ImageDraw

    if image_scores is None:
        image_scores = {m: np.asarray(v).reshape(len(v), -1).max(axis=1) for m, v in maps.items()}
    rows, scales = pick_rows(test.defect_types, per_type), grid_scales(maps, image_scores, test.labels)
    columns = ["image", "ground truth"] + [f"{m} {kind}" for m in maps for kind in ("map", "overlay")]
    height, width = np.asarray(test.images[0]).shape[:2]
    font, title_font = _font(FONT_SIZE), _font(FONT_SIZE + 4)
    lines = {index: _row_lines(test, index, scales, image_scores) for index in rows}
    label_width = int(max(font.getlength(text) for row in lines.values() for text, _ in row)) + 2 * PAD
    pitch = (width + GAP, max(height, (FONT_SIZE + 3) * max(len(row) for row in lines.values())) + GAP)
    origin = (PAD + label_width, PAD + 3 * (FONT_SIZE + 6) + 8)
    canvas_width = max(origin[0] + len(columns) * pitch[0] + PAD, 480)
    caption = _wrap(_caption(scales, per_type), font, canvas_width - 2 * PAD)
    bars_top = origin[1] + len(rows) * pitch[1] + 6
    caption_top = bars_top + len(maps) * BAR_HEIGHT + 6
    canvas_height = caption_top + len(caption) * (FONT_SIZE + 4) + PAD
    canvas = Image.new("RGB", (canvas_width, canvas_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), f"{category}: {len(rows)} of {len(test)} test images", fill=TEXT_COLOUR, font=title_font)
    for c, (above, below) in enumerate(_headers(maps)):  # two lines: narrow panels take short words
        draw.text((origin[0] + c * pitch[0], origin[1] - 2 * FONT_SIZE - 8), above, fill=TEXT_COLOUR, font=font)
        draw.text((origin[0] + c * pitch[0], origin[1] - FONT_SIZE - 5), below, fill=TEXT_COLOUR, font=font)
    for r, index in enumerate(rows):
        top = origin[1] + r * pitch[1]
        for n, (text, colour) in enumerate(lines[index]):
            draw.text((PAD, top + n * (FONT_SIZE + 3)), text, fill=colour, font=font)
        for c, panel in enumerate(_row_panels(test, index, maps, scales)):
            canvas.paste(Image.fromarray(panel), (origin[0] + c * pitch[0], top))
    for m, method in enumerate(maps):  # one bar per path, under its columns, stacked (no overlap)
        _colour_bar(draw, canvas, origin[0] + (2 + 2 * m) * pitch[0], bars_top + m * BAR_HEIGHT,
                    2 * pitch[0] - GAP, scales[method], f"{METHOD_NAMES.get(method, method)} score", font)
    for n, text in enumerate(caption):
        draw.text((PAD, caption_top + n * (FONT_SIZE + 4)), text, fill=TEXT_COLOUR, font=font)
    path = Path(path)
    with atomic_file(path, ".png") as tmp:  # a failed save leaves no partial PNG under its name
        canvas.save(tmp, format="PNG")
    return HeatmapGrid(path, rows, columns, origin, pitch, (height, width), scales)


# ----------------------------------------------------------------------------- training curves

STEP_FIELDS = ("step", "epoch", "phase")  # a record's position, not a curve
TENSORBOARD_DIR = "tensorboard"  # beside metrics.jsonl: WORKDIR/train/tensorboard
EVENT_FILE_PREFIX = "events.out.tfevents."


def read_training_log(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records (train/loop.py: one JSON object per step with step, epoch, phase, the
    losses and images_per_s), one per step in step order. A resumed run appends (a step redone after
    a restart repeats): the last record of a step wins. A cut-off last line (a killed run) is dropped."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such file (the training log, train/metrics.jsonl of a workdir)")
    lines = path.read_text().splitlines()
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if number == len(lines):
                continue
            raise UserInputError(f"{path}:{number}: not a training record (a JSON object with a 'step')") from None
        by_step[step] = record
    return [by_step[step] for step in sorted(by_step)]


def curve_names(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The numeric fields of the records that are curves, in first-seen order."""
    names: dict[str, None] = {}
    for record in records:
        for name, value in record.items():
            if name not in STEP_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
                names.setdefault(name)
    return list(names)


def _is_loss(name: str) -> bool:
    return name == "loss" or name.endswith(("_ce", "_mse", "_loss"))


def training_curves_png(records: Sequence[Mapping[str, Any]]) -> bytes:
    """A PNG of the training curves: the losses in one panel, every other field in its own; a dashed
    line where phase 2 (target pseudo-labels) begins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = curve_names(records)
    panels = [[n for n in names if _is_loss(n)]] + [[n] for n in names if not _is_loss(n)]
    panels = [p for p in panels if p]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    phase2 = next((r["step"] for r in records if r.get("phase") == 2), None)
    for axis, panel in zip(axes[0], panels):
        for name in panel:
            points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
            axis.plot(*zip(*points), label=name, marker="." if len(points) < 30 else None)
        if phase2 is not None:
            axis.axvline(phase2, color="gray", linestyle="--", linewidth=1, label="phase 2")
        axis.set_xlabel("step")
        axis.set_title("losses" if _is_loss(panel[0]) else panel[0], fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboardX") is not None


def write_tensorboard(metrics_path: str | Path, logdir: str | Path | None = None) -> Path:
    """TensorBoard event files of a training log (tensorboardX, the `tensorboard` extra): every curve
    as the scalar `train/NAME` at its step. `logdir` (default: `tensorboard/` beside the log) is
    rewritten: its earlier event files are removed, so converting twice shows each curve once.
    `tensorboard --logdir WORKDIR` then shows the run."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise UserInputError("TensorBoard event files need the tensorboardX package: "
                             "pip install 'nexvitad-jax[tensorboard]' (or pip install tensorboardX)") from None
    metrics_path = Path(metrics_path)
    records = read_training_log(metrics_path)
    logdir = Path(logdir) if logdir is not None else metrics_path.parent / TENSORBOARD_DIR
    logdir.mkdir(parents=True, exist_ok=True)
    for old in logdir.glob(EVENT_FILE_PREFIX + "*"):
        old.unlink()
    names = curve_names(records)
    with SummaryWriter(str(logdir)) as writer:
        for record in records:
            for name in names:
                if isinstance(record.get(name), (int, float)):
                    writer.add_scalar(f"train/{name}", float(record[name]), int(record["step"]))
    return logdir
