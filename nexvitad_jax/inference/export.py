"""`nexvitad export`: a fitted detector as one program that runs without this package.

    nexvitad export DETECTOR --format stablehlo --out detector.nxd   # run with nexvitad_jax.deploy.load
    nexvitad export DETECTOR --format onnx --out detector.onnx       # run with onnxruntime

Both write the function uint8 images (B, H, W, 3) at the detector's input size -> (maps float32
(B, H, W), image scores float32 (B,)): the images / 255, the feature extractor, the distance to the
memory bank's prototypes, upsampling, averaging, the Gaussian blur and the maximum, exactly as
`AnomalyDetector.predict`.

- stablehlo (the portable path): `jax.export` with a symbolic batch dimension, lowered for the
  --platforms (default cpu and cuda); the weights travel beside the program in the same file as
  arguments, not as constants baked into it. `nexvitad_jax.deploy.load(FILE)` runs it with jax alone.
- onnx: through the `jax2onnx` package (the `export` extra), input `images`, outputs `maps` and
  `scores`, the weights as initializers. jax2onnx 0.17 converts `jax.image.resize` only with
  static shapes and has no batching rule for it, so the ONNX model has a fixed batch (--batch-size,
  default 1); and it does not convert `jax.image.resize` with antialias=True, which the backbone
  extractor's input resize and DINOv2 grid resize use: detectors over those fail to convert with an
  error that names the operation (the trained-encoder extractor converts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nexvitad_jax.argparsing import command_parser
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference.anomaly_maps import anomaly_maps

FORMATS = ("stablehlo", "onnx")


def _extractor_parts(extractor) -> tuple[Any, Callable]:
    """(weights pytree, features(weights, images in [0, 1]) -> per-layer maps) of an extractor.
    Both extractors of `nexvitad_jax.inference.extractors` keep their jitted pipeline as
    `_features(weights, images)` over the weights they replicated."""
    from nexvitad_jax.inference.extractors import BackboneFeatureExtractor, EncoderFeatureExtractor

    if isinstance(extractor, BackboneFeatureExtractor):
        return (extractor._hiera_state, extractor._dino_state), extractor._features
    if isinstance(extractor, EncoderFeatureExtractor):
        return extractor._state, extractor._features
    raise UserInputError(f"cannot export a detector over a {type(extractor).__name__}: export knows the "
                         "backbone and trained-encoder extractors")


def detector_function(detector, *, per_image: bool) -> tuple[Callable, list[np.ndarray], int]:
    """(fn(params, images uint8) -> (maps, scores), params: the weights' and prototypes' arrays in
    order, the input size) of a fitted detector. `per_image`: the model is mapped (vmap) over the
    images, so its code sees a batch of one and a symbolic batch never meets code that picks its
    computation by the batch size (DINOv2's CPU attention groups); else it runs on the batch."""
    if detector.memory_bank is None or detector.image_size is None:
        raise UserInputError("export needs a fitted detector with its input size (`nexvitad fit`)")
    weights, features = _extractor_parts(detector.extractor)
    leaves, treedef = jax.tree.flatten(weights)
    prototypes = list(detector.memory_bank.prototypes)
    size, sigma, count = detector.image_size, detector.sigma, len(leaves)

    def on_batch(params, images):
        layer_features = features(jax.tree.unflatten(treedef, params[:count]), images.astype(jnp.float32) / 255.0)
        return anomaly_maps(layer_features, params[count:], image_size=(size, size), sigma=sigma)

    def on_each_image(params, images):
        one = lambda image: jax.tree.map(lambda x: x[0], on_batch(params, image[None]))  # noqa: E731
        return jax.vmap(one)(images)

    return (on_each_image if per_image else on_batch), [np.asarray(jax.device_get(leaf))
                                                         for leaf in [*leaves, *prototypes]], size


def export_stablehlo(detector, out: Path, platforms: tuple[str, ...] = ("cpu", "cuda")) -> Path:
    """The detector as a `jax.export` program (batch symbolic) + weights: `nexvitad_jax.deploy`."""
    from nexvitad_jax import deploy

    fn, params, size = detector_function(detector, per_image=True)
    batch, = jax.export.symbolic_shape("batch")
    arguments = ([jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params],
                 jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8))
    try:
        exported = jax.export.export(jax.jit(fn), platforms=platforms)(*arguments)
    except ValueError as error:
        raise UserInputError(f"--platforms {','.join(platforms)}: could not lower the detector ({error})") from error
    metadata = {"image_size": size, "platforms": list(platforms), "sigma": detector.sigma,
                "calibration": detector.calibration.to_dict() if detector.calibration else None,
                "extractor": detector.extractor.describe()}
    return deploy.save(out, exported.serialize(), params, metadata)


def export_onnx(detector, out: Path, batch_size: int = 1) -> Path:
    """The detector as an ONNX model through jax2onnx (fixed batch; the module docstring says why)."""
    try:
        import onnx
        from jax2onnx import to_onnx
    except ImportError as error:
        raise UserInputError(f"--format onnx needs the jax2onnx package ({error}): pip install "
                             "'nexvitad-jax[export]'") from error
    if batch_size < 1:
        raise UserInputError(f"--batch-size {batch_size}: expected a positive number of images")
    fn, params, size = detector_function(detector, per_image=False)
    constants = [jnp.asarray(p) for p in params]
    # jax2onnx swaps jax.image.resize for its own primitive while it traces: jitted functions traced
    # before (or during) the conversion would keep the other version in jax's trace caches.
    jax.clear_caches()
    try:
        model = to_onnx(lambda images: fn(constants, images),
                        [jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8)],
                        model_name="nexvitad_detector", input_names=["images"], output_names=["maps", "scores"])
    except NotImplementedError as error:
        raise UserInputError(f"jax2onnx cannot convert this detector: {error}. Export it with --format stablehlo "
                             "(the portable path; `nexvitad export --help` says what ONNX converts)") from error
    finally:
        jax.clear_caches()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Protobuf caps a file at 2 GiB: larger weights go to a data file beside the model.
    external = model.ByteSize() > 1_800_000_000
    onnx.save_model(model, str(out), save_as_external_data=external, location=f"{out.name}.data" if external else None)
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = command_parser("nexvitad export", __doc__)
    parser.add_argument("detector", help="a detector folder (`nexvitad fit --out`)")
    parser.add_argument("--format", choices=FORMATS, default="stablehlo", help="default stablehlo")
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--platforms", default="cpu,cuda", help="stablehlo: lowered for these (default cpu,cuda)")
    parser.add_argument("--batch-size", type=int, default=1, help="onnx: the model's fixed batch (default 1)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    from nexvitad_jax.inference.detector import AnomalyDetector

    args = parse_args(argv)
    detector = AnomalyDetector.load(args.detector)
    out = Path(args.out)
    if args.format == "stablehlo":
        platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
        export_stablehlo(detector, out, platforms)
    else:
        export_onnx(detector, out, args.batch_size)
    print(f"nexvitad export: {out} ({args.format}; uint8 images (B, {detector.image_size}, {detector.image_size}, 3) "
          "-> maps, scores)", file=sys.stderr)
    return 0
