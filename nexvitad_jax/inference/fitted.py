"""`nexvitad fit`: a fitted, calibrated detector saved as a folder that runs wherever it is copied.

    nexvitad fit --normal DIR --out DETECTOR [--backbone DIR] [--dino DIR] [--k 30] [--shots 10]
                 [--holdout 10] [--quantile 0.99] [--val DIR [--val-masks DIR]]
    nexvitad fit --run WORKDIR --class NAME --out DETECTOR

From a folder of normal images: the memory bank is built from M = --shots of them (sorted, the
seed's slice) with the converted backbones given (without --backbone: tiny randomly initialized
ones, a demo); from a main-job workdir: the trained encoder of its last checkpoint and the class's
bank exactly as the run built it (its config's K, layers, features, few-shot images).

Calibration (`nexvitad_jax.inference.calibration`): with --val (a folder holding good/ and one
subfolder per defect type, e.g. an MVTec test folder; masks optional through --val-masks, an MVTec
ground_truth folder), the F1-optimal thresholds; otherwise --holdout normal images that are not in
the bank (the first ones after it in sorted order; from a workdir, the class's other train images)
are scored and the thresholds are the --quantile of their scores.

The folder:
  manifest.json      format "nexvitad-detector", format_version, the package version, the files
  detector.json      K, sigma, seed, batch size, K-means options, input size and the feature
                     extractor's identity (weights fingerprints, checked on load)
  prototypes/        the memory bank (orbax): layer_n, (K, D_n)
  calibration.json   thresholds and normalization ranges
  weights/           hiera/, dinov2/: the converted checkpoints, copied in; or encoder/: the trained
                     encoder (both backbones as converted checkpoints, adapters and projections)
Randomly initialized backbones are saved as their seed and config (their init is deterministic and
the weights fingerprint checks it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

import nexvitad_jax
from nexvitad_jax.argparsing import command_parser
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference.calibration import (DEFAULT_QUANTILE, Calibration, f1_calibration, false_positive_rate,
                                                 quantile_calibration)
from nexvitad_jax.inference.command import list_images, read_image
from nexvitad_jax.inference.extractors import EncoderFeatureExtractor

FORMAT = "nexvitad-detector"
MASK_SUFFIXES = ("_mask", "")  # MVTec's ground_truth/<defect>/<name>_mask.png, or the image's own name


# ----------------------------------------------------------------------------- the folder


def write_manifest(directory: Path) -> None:
    from nexvitad_jax.inference.detector import DETECTOR_FORMAT_VERSION

    files = sorted(path.relative_to(directory).as_posix() for path in directory.iterdir()
                   if path.name != "manifest.json")
    manifest = {"format": FORMAT, "format_version": DETECTOR_FORMAT_VERSION,
                "nexvitad_jax": nexvitad_jax.__version__, "files": files}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserInputError(f"{path}: missing; {path.parent} is not a {what}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"{path}: not valid JSON ({error})") from error


def read_detector_config(directory: Path) -> dict[str, Any]:
    """detector.json of a detector folder, after checking its manifest (format, version, files)."""
    from nexvitad_jax.inference.detector import DETECTOR_FORMAT_VERSION

    if not directory.is_dir():
        raise UserInputError(f"{directory}: no such folder; it is not a saved AnomalyDetector (a detector folder: "
                             "make one with `nexvitad fit`)")
    manifest = _read_json(directory / "manifest.json", "saved AnomalyDetector (a detector folder: make one with "
                                                       "`nexvitad fit`)")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != DETECTOR_FORMAT_VERSION:
        raise UserInputError(f"{directory / 'manifest.json'}: format {manifest.get('format')!r} version "
                             f"{manifest.get('format_version')!r}; this version of nexvitad reads {FORMAT!r} "
                             f"version {DETECTOR_FORMAT_VERSION} (fit the detector again)")
    missing = [name for name in manifest.get("files", []) if not (directory / name).exists()]
    if missing:
        raise UserInputError(f"{directory}: incomplete detector folder, missing {missing}")
    config = _read_json(directory / "detector.json", "detector folder")
    required = {"k", "sigma", "seed", "batch_size", "kmeans_options", "extractor", "layers"}
    if not isinstance(config, dict) or not required <= set(config):
        raise UserInputError(f"{directory / 'detector.json'}: expected the fields {sorted(required)}")
    return config


def read_calibration(directory: Path) -> Calibration | None:
    path = directory / "calibration.json"
    return Calibration.from_dict(_read_json(path, "detector folder"), str(path)) if path.is_file() else None


def save_extractor(directory: Path, extractor) -> dict[str, Any]:
    """Put the extractor's weights into the folder; returns its description as saved (locations
    relative to the folder)."""
    description = extractor.describe()
    if description.get("kind") == "nexvitad-encoder":
        if not isinstance(extractor, PortableEncoderExtractor):
            raise UserInputError("saving a detector over the trained encoder needs a PortableEncoderExtractor "
                                 "(nexvitad_jax.inference.fitted), which keeps the encoder module")
        save_encoder(directory / "weights" / "encoder", extractor.encoder)
        return {**description, "directory": "weights/encoder"}
    for family in ("hiera", "dinov2"):
        entry = description.get(family)
        if entry and "directory" in entry:
            target = directory / "weights" / family
            source = Path(entry["directory"])
            if not source.is_absolute():
                source = directory / source
            if source.resolve() != target.resolve():
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(source, target)
            entry["directory"] = f"weights/{family}"
    return description


def load_extractor(directory: Path, description: dict[str, Any], mesh=None):
    """The feature extractor a detector folder holds."""
    from nexvitad_jax.inference.extractors import extractor_from_description

    if description.get("kind") == "nexvitad-encoder":
        return load_encoder_extractor(directory / description["directory"], description, mesh)
    located = json.loads(json.dumps(description))
    for family in ("hiera", "dinov2"):
        if located.get(family) and "directory" in located[family]:
            located[family]["directory"] = str(directory / located[family]["directory"])
    return extractor_from_description(located, mesh)


# ----------------------------------------------------------------------------- the trained encoder


class PortableEncoderExtractor(EncoderFeatureExtractor):
    """The trained encoder's extractor, keeping the encoder module so a detector can save it."""

    def __init__(self, model, **options):
        super().__init__(model, **options)
        self.encoder = model.encoder


def save_encoder(directory: Path, encoder) -> None:
    """weights/encoder: hiera/ and dinov2/ as converted checkpoints, adapters.npz (adapters and
    projections by parameter path) and encoder.json (compute dtype)."""
    import jax
    from flax import nnx

    from nexvitad_jax.models import save_backbone

    directory.mkdir(parents=True, exist_ok=True)
    for family in ("hiera", "dinov2"):
        module = getattr(encoder, family)
        params = nnx.state(module, nnx.Param).to_pure_dict()
        dtype = str(np.asarray(jax.tree.leaves(params)[0]).dtype)  # the stored parameter dtype
        save_backbone(directory / family, family, module.config, params, variant="trained-encoder",
                      source="nexvitad fit --run", dtype=dtype)
    np.savez(directory / "adapters.npz", **_by_path(nnx.state(nnx.Dict(adapters=encoder.adapters,
                                                                       projections=encoder.projections))))
    (directory / "encoder.json").write_text(json.dumps({"dtype": str(np.dtype(encoder.adapters[0].down.dtype))}) + "\n")


def _by_path(state) -> dict[str, np.ndarray]:
    return {"/".join(str(name) for name in path): np.asarray(leaf.get_value())
            for path, leaf in state.flat_state()}


def load_encoder_extractor(directory: Path, description: dict[str, Any], mesh=None) -> PortableEncoderExtractor:
    """The extractor over a saved trained encoder; its description must match (weights fingerprint)."""
    from types import SimpleNamespace

    from flax import nnx

    from nexvitad_jax.models import load_backbone
    from nexvitad_jax.models.encoder import Encoder
    from nexvitad_jax.models.layers import dtype_named

    settings = _read_json(directory / "encoder.json", "saved encoder")
    dtype = dtype_named(settings["dtype"], f"{directory / 'encoder.json'}: dtype")
    hiera, _ = load_backbone(directory / "hiera", dtype=dtype)
    dinov2, _ = load_backbone(directory / "dinov2", dtype=dtype)
    encoder = Encoder(hiera, dinov2, dtype=dtype, rngs=nnx.Rngs(0))
    heads = nnx.Dict(adapters=encoder.adapters, projections=encoder.projections)
    state = nnx.state(heads)
    with np.load(directory / "adapters.npz") as saved:
        expected = _by_path(state)
        if sorted(saved.files) != sorted(expected) or any(saved[k].shape != expected[k].shape for k in expected):
            raise UserInputError(f"{directory / 'adapters.npz'}: does not fit the encoder "
                                 f"(saved {sorted(saved.files)})")
        for path, leaf in state.flat_state():
            leaf.set_value(saved["/".join(str(name) for name in path)])
    nnx.update(heads, state)
    identity = {key: value for key, value in description.items()
                if key not in ("kind", "features", "layers", "weights", "directory")}
    return PortableEncoderExtractor(SimpleNamespace(encoder=encoder), kind=description["features"],
                                    layers=description["layers"], identity=identity, mesh=mesh)


# ----------------------------------------------------------------------------- fitting


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """The fitting and calibration options `nexvitad fit` and `nexvitad score --normal` share."""
    parser.add_argument("--backbone", help="converted Hiera checkpoint (python -m converters hiera ...)")
    parser.add_argument("--dino", help="converted DINOv2 checkpoint, concatenated to each Hiera stage")
    parser.add_argument("--k", type=int, default=30, help="prototypes per layer (default 30)")
    parser.add_argument("--shots", type=int, default=10, help="normal images in the memory bank (M, default 10)")
    parser.add_argument("--seed", type=int, default=0, help="which M normal images and the K-means seed")
    parser.add_argument("--layers", default="0,1,2,3", help="Hiera stages to use (default 0,1,2,3)")
    parser.add_argument("--image-size", type=int, default=224, help="model input size (default 224)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per device batch (default 8)")
    parser.add_argument("--sigma", type=float, default=2.0, help="Gaussian smoothing of the maps")
    parser.add_argument("--holdout", type=int, default=10,
                        help="normal images outside the bank scored to set the thresholds (default 10)")
    parser.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE,
                        help=f"thresholds at this quantile of the held-out scores (default {DEFAULT_QUANTILE})")
    parser.add_argument("--val", help="labelled validation folder: good/ and one folder per defect type "
                                      "(F1-optimal thresholds instead of the held-out quantile)")
    parser.add_argument("--val-masks", help="masks of --val: <defect>/<name>_mask.png (an MVTec ground_truth folder)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = command_parser("nexvitad fit", __doc__, epilog_paragraphs=slice(1, 3))
    parser.add_argument("--normal", help="folder of normal (defect-free) images")
    parser.add_argument("--run", help="a main-job workdir (`nexvitad run --workdir`): its trained encoder")
    parser.add_argument("--class", dest="category", help="with --run: the target class whose bank to take")
    parser.add_argument("--out", required=True, help="the detector folder to write")
    add_fit_arguments(parser)
    args = parser.parse_args(argv)
    if (args.normal is None) == (args.run is None):
        raise UserInputError("give either --normal DIR (a folder of normal images) or --run WORKDIR --class NAME")
    if args.run is not None and not args.category:
        raise UserInputError("--run needs --class NAME (one of the run's target classes)")
    if args.val_masks and not args.val:
        raise UserInputError("--val-masks needs --val (the validation images)")
    return args


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(layer) for layer in text.split(","))
    except ValueError:
        raise UserInputError(f"--layers {text!r}: expected comma-separated stage indices, e.g. 0,1,2,3") from None


def _backbone_extractor(args: argparse.Namespace, command: str):
    from nexvitad_jax.inference import BackboneFeatureExtractor

    options = dict(layers=_layers(args.layers), image_size=args.image_size)
    if args.backbone:
        return BackboneFeatureExtractor.from_dirs(args.backbone, args.dino, **options)
    if args.dino:
        raise UserInputError("--dino needs --backbone (a converted Hiera checkpoint)")
    print(f"nexvitad {command}: no --backbone given; using a tiny randomly initialized Hiera "
          "(a demo of the pipeline, not a trained detector)", file=sys.stderr)
    return BackboneFeatureExtractor.random(seed=args.seed, **options)


def split_normal_files(files: list[Path], shots: int, seed: int, holdout: int) -> tuple[list[Path], list[Path]]:
    """(the bank's M files: the seed's slice of the sorted files, the held-out files: the first
    `holdout` of the others in sorted order)."""
    from nexvitad_jax.data import few_shot_indices

    chosen = few_shot_indices([str(path) for path in files], shots, seed)
    taken = set(int(i) for i in chosen)
    rest = [path for index, path in enumerate(files) if index not in taken]
    return [files[i] for i in chosen], rest[:max(holdout, 0)]


def fit_from_folder(args: argparse.Namespace, command: str = "fit"):
    """The detector of --normal (and --backbone/--dino), fitted and calibrated."""
    from nexvitad_jax.inference.detector import AnomalyDetector

    for name in ("k", "shots"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} {getattr(args, name)}: expected a positive number")
    candidates = list_images(args.normal, "--normal")
    bank_files, held_out = split_normal_files(candidates, args.shots, args.seed, args.holdout)
    if not args.val and not held_out:
        raise UserInputError(
            f"--normal {args.normal}: {len(candidates)} images, all in the memory bank (--shots {args.shots}), "
            "none left to calibrate the thresholds on: add normal images, lower --shots, or give --val")
    validation = read_validation(args.val, args.val_masks, args.image_size) if args.val else None
    extractor = _backbone_extractor(args, command)
    detector = AnomalyDetector(extractor, k=args.k, sigma=args.sigma, seed=args.seed, batch_size=args.batch_size,
                               image_size=args.image_size)
    _fit(detector, np.stack([read_image(path, args.image_size) for path in bank_files]), command)
    if validation is None:
        normal = np.stack([read_image(path, args.image_size) for path in held_out])
        validation = (normal, np.zeros(len(normal), bool), None)
    calibrate(detector, validation, args.quantile, command)
    return detector


def _fit(detector, normal: np.ndarray, command: str) -> None:
    from tqdm import tqdm

    with tqdm(total=len(normal), desc="memory bank", unit="img", file=sys.stderr) as progress:
        detector.fit(normal, progress)
    for layer, result in enumerate(detector.memory_bank.results):
        if not bool(result.converged):
            print(f"nexvitad {command}: K-means of layer {layer} stopped after {int(result.iterations)} iterations "
                  f"(prototype shift {float(result.shift):.2e})", file=sys.stderr)


def calibrate(detector, validation, quantile: float, command: str) -> Calibration:
    """Score the calibration images (images, labels, masks or None) and set detector.calibration:
    F1-optimal with anomalous images among them, else the quantile of the normal ones."""
    from tqdm import tqdm

    images, labels, masks = validation
    with tqdm(total=len(images), desc="calibration", unit="img", file=sys.stderr) as progress:
        maps, scores = detector.predict(images, progress)
    if labels.any():
        calibration = f1_calibration(maps, scores, labels, masks, quantile)
    else:
        calibration = quantile_calibration(maps, scores, quantile)
    normal_scores = scores[~labels]
    calibration.details["normal_false_positive_rate"] = false_positive_rate(normal_scores, calibration.image_threshold)
    detector.calibration = calibration
    print(f"nexvitad {command}: calibrated on {len(images)} images ({calibration.method}): image threshold "
          f"{calibration.image_threshold:.6g}, pixel threshold {calibration.pixel_threshold:.6g}, "
          f"{calibration.details['normal_false_positive_rate']:.1%} of the normal ones flagged", file=sys.stderr)
    return calibration


def read_validation(directory: str, masks_directory: str | None, size: int):
    """(images (N, size, size, 3) in [0, 1], labels (N,) anomalous = True, masks (N, size, size) or
    None) of a folder holding good/ and one folder per defect type."""
    from PIL import Image

    root = Path(directory)
    files = list_images(root, "--val")
    if not (root / "good").is_dir():
        raise UserInputError(f"--val {root}: expected a good/ folder (normal images) beside one folder per "
                             "defect type, as an MVTec test folder")
    labels = np.array([path.relative_to(root).parts[0] != "good" for path in files])
    images = np.stack([read_image(path, size) for path in files])
    if masks_directory is None:
        return images, labels, None
    masks = np.zeros((len(files), size, size), bool)
    for index in np.flatnonzero(labels):
        relative = files[index].relative_to(root)
        found = [Path(masks_directory) / relative.parent / f"{relative.stem}{suffix}.png" for suffix in MASK_SUFFIXES]
        path = next((candidate for candidate in found if candidate.is_file()), None)
        if path is None:
            raise UserInputError(f"--val-masks {masks_directory}: no mask for {relative} (expected {found[0]})")
        with Image.open(path) as mask:
            masks[index] = np.asarray(mask.convert("L").resize((size, size), Image.NEAREST), np.float32) / 255.0 > 0.5
    return images, labels, masks


def read_run(workdir: Path) -> tuple[str, dict[str, Any]]:
    """(key, identity) of a main-job workdir (its run.json)."""
    saved = _read_json(workdir / "run.json", "main-job workdir (`nexvitad run --workdir`)")
    if not isinstance(saved, dict) or "identity" not in saved or "key" not in saved:
        raise UserInputError(f"{workdir / 'run.json'}: expected the fields key and identity")
    return saved["key"], saved["identity"]


def trained_model(config, identity: dict[str, Any], checkpoints_dir: Path):
    """The NexViTAD model with the parameters and statistics of the workdir's latest checkpoint."""
    import jax

    from nexvitad_jax.models.build import build_model
    from nexvitad_jax.sharding import make_mesh
    from nexvitad_jax.train.checkpoints import Checkpoints
    from nexvitad_jax.train.step import TrainStep

    if not checkpoints_dir.is_dir():
        raise UserInputError(f"{checkpoints_dir}: no training checkpoints (has `nexvitad run` trained there?)")
    model = build_model(config, len(identity["source"]), len(identity["target"]))
    # The optimizer schedule's length changes no shape of the state, so any step count restores it.
    trainer = TrainStep.from_config(config, model, make_mesh(), total_steps=1)
    checkpoints = Checkpoints(checkpoints_dir, every_steps=1)
    try:
        step = checkpoints.latest_step()
        if step is None:
            raise UserInputError(f"{checkpoints_dir}: no complete checkpoint")
        labels = checkpoints.manager.item_metadata(step)["pseudo_labels"]["labels"]
        state, _, _ = checkpoints.restore(step, trainer.init_state(int(identity["seed"])),
                                          jax.ShapeDtypeStruct(tuple(labels.shape), labels.dtype))
    finally:
        checkpoints.close()
    return trainer.model(state), step


def fit_from_run(args: argparse.Namespace):
    """The detector of a main-job workdir's trained encoder and class: the bank as the run built it,
    calibrated on the class's other normal training images (or --val)."""
    import ml_collections

    from nexvitad_jax.data import few_shot_indices, open_dataset
    from nexvitad_jax.inference.detector import AnomalyDetector

    workdir = Path(args.run)
    key, identity = read_run(workdir)
    if args.category not in identity["target"]:
        raise UserInputError(f"--class {args.category!r}: not a target class of {workdir} (its targets: "
                             f"{identity['target']}); the memory bank is built for target classes")
    config = ml_collections.ConfigDict(identity["config"])
    size, few_shot, seed = int(config.data.image_size), int(config.data.few_shot), int(identity["seed"])
    model, step = trained_model(config, identity, workdir / "train" / "checkpoints")
    print(f"nexvitad fit: the trained encoder of {workdir} (step {step})", file=sys.stderr)
    extractor = PortableEncoderExtractor(model, kind=str(config.bank.features), layers=tuple(config.bank.layers),
                                         identity={"run": key})
    dataset = open_dataset(identity["data"], image_size=size, target_spec=identity.get("target_data"))
    train = dataset.load(args.category, "train")
    chosen = few_shot_indices(train.paths, few_shot, seed)
    rest = np.setdiff1d(np.arange(len(train.paths)), chosen)[:max(args.holdout, 0)]
    if not args.val and not len(rest):
        raise UserInputError(f"{args.category}: all {len(train.paths)} training images are in the memory bank; "
                             "give --val to calibrate")
    detector = AnomalyDetector(extractor, k=int(config.bank.k), sigma=float(config.bank.sigma), seed=seed,
                               batch_size=int(config.eval.batch_size), kmeans_options=config.bank.kmeans.to_dict(),
                               image_size=size)
    _fit(detector, train.images[chosen].astype(np.float32) / 255.0, "fit")
    if args.val:
        validation = read_validation(args.val, args.val_masks, size)
    else:
        validation = (train.images[rest].astype(np.float32) / 255.0, np.zeros(len(rest), bool), None)
    calibrate(detector, validation, args.quantile, "fit")
    return detector


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    detector = fit_from_run(args) if args.run else fit_from_folder(args)
    out = detector.save(args.out)
    print(f"nexvitad fit: detector saved to {out} (score with `nexvitad score --detector {out} --images DIR "
          "--out DIR`)", file=sys.stderr)
    return 0
