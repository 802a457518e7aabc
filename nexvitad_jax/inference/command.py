"""`nexvitad score`: memory-bank anomaly maps for a folder of images.

    nexvitad score --normal DIR --images DIR --out DIR [--backbone DIR] [--dino DIR] [--k 30]

Builds the memory bank from M normal images of --normal (sorted, the seed's slice), scores every
image under --images (searched recursively), and writes OUT/scores.csv (path, image score) and
OUT/heatmaps/<relative path>.png (original | heatmap overlay). Without --backbone it uses a tiny
randomly initialized Hiera (a demo of the pipeline, not a trained detector) and says so.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

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


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB in [0, 1] with the 'jet' colormap (blue, cyan, yellow, red)."""
    return np.clip(1.5 - np.abs(4.0 * values[..., None] - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def overlay_panel(image: np.ndarray, anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """original | image blended with the heatmap (maps scaled by one range for the whole run)."""
    heat = heat_colors(np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0))
    blended = 0.5 * image + 0.5 * heat
    gap = np.ones((image.shape[0], 4, 3), image.dtype)
    return (np.concatenate([image, gap, blended], axis=1) * 255.0 + 0.5).astype(np.uint8)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nexvitad score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--normal", required=True, help="folder of normal (defect-free) images")
    parser.add_argument("--images", required=True, help="folder of images to score (recursive)")
    parser.add_argument("--out", required=True, help="output folder (scores.csv, heatmaps/)")
    parser.add_argument("--backbone", help="converted Hiera checkpoint (python -m converters hiera ...)")
    parser.add_argument("--dino", help="converted DINOv2 checkpoint, concatenated to each Hiera stage")
    parser.add_argument("--k", type=int, default=30, help="prototypes per layer (default 30)")
    parser.add_argument("--shots", type=int, default=10, help="normal images in the memory bank (M, default 10)")
    parser.add_argument("--seed", type=int, default=0, help="which M normal images and the K-means seed")
    parser.add_argument("--layers", default="0,1,2,3", help="Hiera stages to use (default 0,1,2,3)")
    parser.add_argument("--image-size", type=int, default=224, help="model input size (default 224)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=2.0, help="Gaussian smoothing of the maps")
    parser.add_argument("--save-detector", help="also save the fitted detector to this folder")
    return parser.parse_args(argv)


# Images read and scored per call of the detector, in global batches: enough for the devices to
# work on one batch while the host places the next.
BATCHES_PER_CHUNK = 8


def fitted_detector(args: argparse.Namespace):
    """The detector the arguments describe, its memory bank built from the --normal images."""
    from tqdm import tqdm

    from nexvitad_jax.data import few_shot_indices
    from nexvitad_jax.inference import AnomalyDetector, BackboneFeatureExtractor

    try:
        layers = tuple(int(layer) for layer in args.layers.split(","))
    except ValueError:
        raise UserInputError(f"--layers {args.layers!r}: expected comma-separated stage indices, e.g. 0,1,2,3")
    if args.k < 1:
        raise UserInputError(f"--k {args.k}: expected a positive number of prototypes")
    if args.shots < 1:
        raise UserInputError(f"--shots {args.shots}: expected at least one normal image")
    candidates = list_images(args.normal, "--normal")
    normal_files = [candidates[i] for i in few_shot_indices([str(path) for path in candidates], args.shots, args.seed)]
    normal = np.stack([read_image(path, args.image_size) for path in normal_files])
    options = dict(layers=layers, image_size=args.image_size)
    if args.backbone:
        extractor = BackboneFeatureExtractor.from_dirs(args.backbone, args.dino, **options)
    else:
        if args.dino:
            raise UserInputError("--dino needs --backbone (a converted Hiera checkpoint)")
        print("nexvitad score: no --backbone given; using a tiny randomly initialized Hiera "
              "(a demo of the pipeline, not a trained detector)", file=sys.stderr)
        extractor = BackboneFeatureExtractor.random(seed=args.seed, **options)
    detector = AnomalyDetector(extractor, k=args.k, sigma=args.sigma, seed=args.seed, batch_size=args.batch_size)
    with tqdm(total=len(normal), desc="memory bank", unit="img", file=sys.stderr) as progress:
        detector.fit(normal, progress)
    for layer, result in enumerate(detector.memory_bank.results):
        if not bool(result.converged):
            print(f"nexvitad score: K-means of layer {layer} stopped after {int(result.iterations)} iterations "
                  f"(prototype shift {float(result.shift):.2e})", file=sys.stderr)
    return detector


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


def write_outputs(out: Path, images_root: Path, scored) -> None:
    """OUT/heatmaps/<relative path>.png (maps scaled by one range for the whole run), OUT/scores.csv."""
    from PIL import Image

    low = min(float(anomaly_map.min()) for _, _, anomaly_map, _ in scored)
    high = max(float(anomaly_map.max()) for _, _, anomaly_map, _ in scored)
    for path, image, anomaly_map, _ in scored:
        target = (out / "heatmaps" / path.relative_to(images_root)).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(overlay_panel(image / 255.0, anomaly_map, low, high)).save(target)
    with open(out / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "score"])
        writer.writerows((path.relative_to(images_root).as_posix(), f"{score:.6g}") for path, _, _, score in scored)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    image_files = list_images(args.images, "--images")
    check_readable(image_files)
    detector = fitted_detector(args)
    if args.save_detector:
        detector.save(args.save_detector)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scored = score_files(detector, image_files, args.image_size)
    write_outputs(out, Path(args.images), scored)
    print(f"nexvitad score: {len(scored)} images scored; {out / 'scores.csv'} and {out / 'heatmaps'}/")
    return 0
