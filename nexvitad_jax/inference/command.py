"""`nexvitad score`: anomaly maps, scores and decisions of a fitted detector for a folder of images.

    nexvitad score --detector DETECTOR --images DIR --out DIR      # a folder from `nexvitad fit`
    nexvitad score --normal DIR --images DIR --out DIR [fit options: --backbone DIR --k 30 ...]

With --normal the detector is fitted and calibrated on the fly, as `nexvitad fit --normal` does
(--save-detector keeps it). Every image under --images (searched recursively) is resized to the
detector's input size and scored. Outputs in --out:
  predictions.csv, predictions.json  image, raw score, normalized score (0.5 at the image threshold,
                                     `nexvitad_jax.inference.calibration`), decision; the JSON also
                                     holds the calibration
  masks/<relative path>.png          the binary defect mask (pixels >= the pixel threshold), 0/255
  overlays/<relative path>.png       the image with its normalized heatmap over it, a colour bar,
                                     the decision and the score in the title
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from nexvitad_jax.argparsing import command_parser
from nexvitad_jax.errors import UserInputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def list_images(directory: str | Path, name: str) -> list[Path]:
    """Every image file under `directory` (recursive, sorted); errors for a missing or empty folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserInputError(f"{name} {directory}: no such directory")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserInputError(f"{name} {directory}: no images found (expected files ending in "
                             f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def read_image(path: Path, size: int) -> np.ndarray:
    """An RGB image resized (bilinear) to size x size, float32 in [0, 1]; clear error if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(image, np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UserInputError(f"{path}: not a readable image ({error})") from error


def check_readable(paths: list[Path]) -> None:
    """Open every image's header up front, so a bad file fails before minutes of scoring."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise UserInputError(f"{path}: not a readable image ({error})") from error


def parse_args(argv: list[str]) -> argparse.Namespace:
    from nexvitad_jax.inference.fitted import add_fit_arguments

    parser = command_parser("nexvitad score", __doc__, epilog_paragraphs=slice(1, 3))
    parser.add_argument("--detector", help="a detector folder (`nexvitad fit --out`)")
    parser.add_argument("--normal", help="fit on the fly on this folder of normal images instead")
    parser.add_argument("--images", required=True, help="folder of images to score (recursive)")
    parser.add_argument("--out", required=True, help="output folder (predictions, masks/, overlays/)")
    parser.add_argument("--save-detector", help="with --normal: also save the fitted detector to this folder")
    add_fit_arguments(parser)
    args = parser.parse_args(argv)
    if (args.detector is None) == (args.normal is None):
        raise UserInputError("give either --detector DETECTOR (from `nexvitad fit`) or --normal DIR (fit on the fly)")
    return args


# Images read and scored per call of the detector, in global batches: enough for the devices to
# work on one batch while the host places the next.
BATCHES_PER_CHUNK = 8


def score_files(detector, image_files: list[Path], image_size: int) -> list[tuple[Path, np.ndarray, np.ndarray, float]]:
    """(path, image uint8, anomaly map, image score) of every file, read and scored a chunk at a time."""
    from tqdm import tqdm

    from nexvitad_jax.inference.batching import global_batch_size

    chunk = BATCHES_PER_CHUNK * global_batch_size(detector.batch_size, detector.mesh)
    scored = []
    with tqdm(total=len(image_files), desc="scoring", unit="img", file=sys.stderr) as progress:
        for start in range(0, len(image_files), chunk):
            paths = image_files[start:start + chunk]
            images = np.stack([read_image(path, image_size) for path in paths])
            maps, scores = detector.predict(images, progress)
            scored += [(path, (image * 255.0 + 0.5).astype(np.uint8), anomaly_map, float(score))
                       for path, image, anomaly_map, score in zip(paths, images, maps, scores)]
    return scored


def predictions(scored, images_root: Path, calibration) -> list[dict]:
    """One record per image: relative path, raw and normalized image score, decision."""
    raw = np.array([score for _, _, _, score in scored])
    normalized, decisions = calibration.normalize_image_scores(raw), calibration.decisions(raw)
    return [{"image": path.relative_to(images_root).as_posix(), "score": float(score),
             "normalized_score": float(norm), "decision": "anomalous" if decision else "normal"}
            for (path, _, _, score), norm, decision in zip(scored, normalized, decisions)]


def overlay_figure(image: np.ndarray, normalized_map: np.ndarray, mask: np.ndarray, title: str) -> np.ndarray:
    """The image with its normalized map (0.5 = the pixel threshold, jet, alpha 0.5) over it, the
    mask's outline, a colour bar and `title`, rendered with matplotlib's Agg -> RGB uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.6, 4.0), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(image)
    heat = axes.imshow(normalized_map, cmap="jet", vmin=0.0, vmax=1.0, alpha=0.5)
    if mask.any() and not mask.all():
        axes.contour(mask.astype(np.float32), levels=[0.5], colors="white", linewidths=0.8)
    axes.set_axis_off()
    axes.set_title(title, fontsize=9)
    figure.colorbar(heat, ax=axes, fraction=0.046, pad=0.04, label="normalized anomaly score (0.5 = threshold)")
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def write_outputs(out: Path, images_root: Path, scored, calibration) -> list[dict]:
    """predictions.csv/json, masks/ and overlays/ (module docstring)."""
    from PIL import Image
    from tqdm import tqdm

    records = predictions(scored, images_root, calibration)
    for (path, image, anomaly_map, _), record in tqdm(list(zip(scored, records)), desc="figures", unit="img",
                                                      file=sys.stderr):
        relative = path.relative_to(images_root).with_suffix(".png")
        mask = calibration.masks(anomaly_map)
        for folder in ("masks", "overlays"):
            (out / folder / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((mask * 255).astype(np.uint8)).save(out / "masks" / relative)
        title = (f"{relative.as_posix()}: {record['decision'].upper()}\n"
                 f"score {record['score']:.4g} (normalized {record['normalized_score']:.2f})")
        overlay = overlay_figure(image, calibration.normalize_maps(anomaly_map), mask, title)
        Image.fromarray(overlay).save(out / "overlays" / relative)
    with open(out / "predictions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "score", "normalized_score", "decision"])
        writer.writeheader()
        writer.writerows({**r, "score": f"{r['score']:.6g}", "normalized_score": f"{r['normalized_score']:.6g}"}
                         for r in records)
    summary = {"calibration": calibration.to_dict(), "predictions": records}
    (out / "predictions.json").write_text(json.dumps(summary, indent=1) + "\n")
    return records


def load_detector(args: argparse.Namespace):
    """The detector of --detector, or fitted on the fly from --normal."""
    from nexvitad_jax.inference.detector import AnomalyDetector
    from nexvitad_jax.inference.fitted import fit_from_folder

    if args.normal is not None:
        detector = fit_from_folder(args, "score")
        if args.save_detector:
            detector.save(args.save_detector)
        return detector
    detector = AnomalyDetector.load(args.detector)
    if detector.calibration is None or detector.image_size is None:
        raise UserInputError(f"--detector {args.detector}: not calibrated (no calibration.json or input size); "
                             "fit it with `nexvitad fit`")
    return detector


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    image_files = list_images(args.images, "--images")
    check_readable(image_files)
    detector = load_detector(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scored = score_files(detector, image_files, detector.image_size)
    records = write_outputs(out, Path(args.images), scored, detector.calibration)
    flagged = sum(record["decision"] == "anomalous" for record in records)
    print(f"nexvitad score: {len(records)} images scored, {flagged} anomalous; {out / 'predictions.csv'}, "
          f"predictions.json, masks/ and overlays/")
    return 0
