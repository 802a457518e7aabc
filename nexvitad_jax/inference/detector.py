"""`AnomalyDetector`: memory-bank anomaly detection over any feature extractor.

A feature extractor is anything with `__call__(images (B, H, W, 3) float in [0, 1]) -> list of
NHWC feature maps` and `describe() -> dict` (a JSON-able identity: saved with the detector and
compared on load, so a memory bank is never scored against features of another network).
`BackboneFeatureExtractor` serves converted or randomly initialized Hiera stage maps, optionally
with a DINOv2 patch grid resized to each stage and concatenated on channels; the paper's encoder
(adapters, projections, interleave) plugs in the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference.anomaly_maps import anomaly_maps, check_layers
from nexvitad_jax.inference.memory_bank import MemoryBank, build_memory_bank

DETECTOR_FORMAT_VERSION = 1

# A Hiera small enough for CPU demos and CI (stage dims 16, 32, 64, 128 at 224 -> 56, 28, 14, 7).
TINY_HIERA = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))


class FeatureExtractor(Protocol):
    def __call__(self, images: jax.Array) -> list[jax.Array]: ...

    def describe(self) -> dict[str, Any]: ...


def weights_fingerprint(params: Any) -> str:
    """A short digest of every parameter's shape and float64 sum: tells different weights apart."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    digest = hashlib.sha256()
    for path, leaf in leaves:
        array = np.asarray(leaf, np.float64)
        digest.update(f"{jax.tree_util.keystr(path)}{array.shape}{array.sum():.6e}{np.abs(array).sum():.6e}".encode())
    return digest.hexdigest()[:16]


class BackboneFeatureExtractor:
    """Hiera stage maps (selected `layers`), optionally with a DINOv2 grid per stage.

    Images are resized (bilinear, half-pixel) to `image_size`, normalized with the ImageNet
    statistics, and run in fixed-size batches by the caller.
    """

    def __init__(self, hiera: nnx.Module, hiera_identity: dict, *, dino: nnx.Module | None = None,
                 dino_identity: dict | None = None, layers: Sequence[int] = (0, 1, 2, 3),
                 image_size: int = 224):
        num_stages = len(hiera.stage_dims)
        layers = tuple(int(layer) for layer in layers)
        if not layers or any(layer < 0 or layer >= num_stages for layer in layers) or len(set(layers)) != len(layers):
            raise UserInputError(f"layers = {list(layers)}: expected distinct stage indices in 0..{num_stages - 1}")
        self.layers, self.image_size = layers, int(image_size)
        # Weights enter the jitted pipeline as arguments, never as closed-over constants (which
        # would be baked into the compiled program: gigabytes for Hiera-Huge).
        self._hiera_graph, self._hiera_state = nnx.split(hiera)
        self._dino_graph, self._dino_state = nnx.split(dino) if dino is not None else (None, None)
        self._identity = {"kind": "backbone", "hiera": hiera_identity, "dinov2": dino_identity,
                          "layers": list(layers), "image_size": self.image_size}
        self._pipeline = jax.jit(self._features)

    @classmethod
    def from_dirs(cls, hiera_dir: str | Path, dino_dir: str | Path | None = None, **options) -> BackboneFeatureExtractor:
        """Converted checkpoints (`python -m converters`); the DINOv2 one is optional."""
        from nexvitad_jax.models import load_backbone, read_backbone_metadata

        def load(directory, family):
            metadata = read_backbone_metadata(directory)
            if metadata["family"] != family:
                raise UserInputError(f"{directory}: a converted {metadata['family']} backbone, expected {family}")
            module, params = load_backbone(directory)
            identity = {"family": family, "variant": metadata.get("variant"), "config": metadata["config"],
                        "dtype": metadata.get("dtype", "float32"), "weights": weights_fingerprint(params),
                        "directory": str(Path(directory).resolve())}
            return module, identity

        hiera, hiera_identity = load(hiera_dir, "hiera")
        dino, dino_identity = load(dino_dir, "dinov2") if dino_dir is not None else (None, None)
        return cls(hiera, hiera_identity, dino=dino, dino_identity=dino_identity, **options)

    @classmethod
    def random(cls, *, seed: int = 0, hiera_config: dict | None = None, dino_config: dict | None = None,
               **options) -> BackboneFeatureExtractor:
        """Randomly initialized backbones (the tiny Hiera by default): demos and tests, no download."""
        from nexvitad_jax.models import build_backbone
        from nexvitad_jax.models.hiera import VARIANTS, HieraConfig

        hiera_config = dict(hiera_config or TINY_HIERA)
        config = HieraConfig.from_dict({**VARIANTS["tiny"].to_dict(), **hiera_config})
        hiera = build_backbone("hiera", config, rngs=nnx.Rngs(seed))
        hiera_identity = {"family": "hiera", "random_init_seed": seed, "config": config.to_dict(),
                          "weights": weights_fingerprint(nnx.state(hiera, nnx.Param))}
        dino = dino_identity = None
        if dino_config is not None:
            from nexvitad_jax.models.dinov2 import Dinov2Config

            dconfig = Dinov2Config.from_dict(dino_config)
            dino = build_backbone("dinov2", dconfig, rngs=nnx.Rngs(seed + 1))
            dino_identity = {"family": "dinov2", "random_init_seed": seed + 1, "config": dconfig.to_dict(),
                             "weights": weights_fingerprint(nnx.state(dino, nnx.Param))}
        return cls(hiera, hiera_identity, dino=dino, dino_identity=dino_identity, **options)

    def describe(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._identity))  # a JSON-normalized copy (tuples -> lists)

    def _features(self, states, images: jax.Array) -> list[jax.Array]:
        from nexvitad_jax.models import normalize_images

        size = (images.shape[0], self.image_size, self.image_size, 3)
        pixels = normalize_images(jax.image.resize(images.astype(jnp.float32), size, method="linear"))
        hiera_state, dino_state = states
        stage_maps = nnx.merge(self._hiera_graph, hiera_state)(pixels)
        features = [stage_maps[layer] for layer in self.layers]
        if dino_state is not None:
            grid, _ = nnx.merge(self._dino_graph, dino_state)(pixels)
            features = [jnp.concatenate([f, jax.image.resize(grid, (*f.shape[:3], grid.shape[-1]), method="linear")
                                         .astype(f.dtype)], axis=-1) for f in features]
        return [f.astype(jnp.float32) for f in features]

    def __call__(self, images: jax.Array) -> list[jax.Array]:
        return self._pipeline((self._hiera_state, self._dino_state), jnp.asarray(images))


def extractor_from_description(description: dict) -> BackboneFeatureExtractor:
    """Rebuild the extractor a detector was saved with (backbone dirs or random-init seeds)."""
    if description.get("kind") != "backbone":
        raise UserInputError(f"cannot rebuild a feature extractor of kind {description.get('kind')!r}; "
                             "pass the extractor to AnomalyDetector.load(directory, extractor)")
    hiera, dino = description["hiera"], description.get("dinov2")
    options = dict(layers=description["layers"], image_size=description["image_size"])
    if "directory" in hiera:
        return BackboneFeatureExtractor.from_dirs(hiera["directory"], dino["directory"] if dino else None, **options)
    return BackboneFeatureExtractor.random(seed=hiera["random_init_seed"], hiera_config=hiera["config"],
                                           dino_config=dino["config"] if dino else None, **options)


# Where a checkpoint lives says nothing about what it computes (its weights fingerprint does).
_IGNORED_IN_COMPARISON = {"directory"}


def describe_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Human-readable list of the fields where two descriptions differ (locations ignored)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        lines = []
        for key in sorted((set(saved) | set(current)) - _IGNORED_IN_COMPARISON, key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in current:
                lines.append(f"{name}: saved {saved[key]!r}, missing now")
            elif key not in saved:
                lines.append(f"{name}: not in the saved detector, now {current[key]!r}")
            else:
                lines += describe_differences(saved[key], current[key], name)
        return lines
    return [] if saved == current else [f"{prefix}: saved {saved!r}, now {current!r}"]


def padded_batches(images: np.ndarray, batch_size: int):
    """Fixed-size batches, the last one padded by repeating its last image (so one compilation):
    yields (number of real images, padded batch)."""
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        yield len(batch), np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), 0)])


class AnomalyDetector:
    """fit(normal images) builds the memory bank; predict(images) -> (maps (B, H, W), scores (B,))."""

    def __init__(self, extractor: FeatureExtractor, *, k: int = 30, sigma: float = 2.0, seed: int = 0,
                 batch_size: int = 8, kmeans_options: dict | None = None):
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise UserInputError(f"k = {k!r}: expected a positive number of prototypes")
        if batch_size < 1:
            raise UserInputError(f"batch_size = {batch_size!r}: expected a positive integer")
        self.extractor, self.k, self.sigma, self.seed = extractor, int(k), float(sigma), int(seed)
        self.batch_size = int(batch_size)
        self.kmeans_options = dict(kmeans_options or {})
        self.memory_bank: MemoryBank | None = None

    def _check_images(self, images, name: str) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
            raise UserInputError(f"{name}: expected a non-empty (B, H, W, 3) batch of RGB images in [0, 1], "
                                 f"got shape {images.shape}")
        if not np.issubdtype(images.dtype, np.floating):
            raise UserInputError(f"{name}: expected float images in [0, 1], got dtype {images.dtype}")
        return images.astype(np.float32)

    def extract(self, images, progress=None) -> list[jax.Array]:
        """Features of `images` in fixed-size batches (the last one padded, so one compilation)."""
        images = self._check_images(images, "images")
        parts = []
        for count, padded in padded_batches(images, self.batch_size):
            parts.append([f[:count] for f in self.extractor(jnp.asarray(padded))])
            if progress is not None:
                progress.update(count)
        return [jnp.concatenate(layer) for layer in zip(*parts)]

    def fit(self, normal_images, progress=None) -> AnomalyDetector:
        """Memory bank from the M normal images: K Sinkhorn K-means prototypes per layer."""
        features = self.extract(self._check_images(normal_images, "normal_images"), progress)
        self.memory_bank = build_memory_bank(features, self.k, rng=jax.random.key(self.seed), **self.kmeans_options)
        return self

    def predict(self, images, progress=None) -> tuple[np.ndarray, np.ndarray]:
        """(maps (B, H, W) at the input size, image scores (B,)): eqs. 13-14, smoothing, max."""
        if self.memory_bank is None:
            raise UserInputError("the detector has no memory bank: call fit(normal_images) or load(directory)")
        images = self._check_images(images, "images")
        maps, scores = [], []
        for count, padded in padded_batches(images, self.batch_size):
            features = self.extractor(jnp.asarray(padded))
            check_layers(features, self.memory_bank.prototypes)
            batch_maps, batch_scores = anomaly_maps(features, self.memory_bank.prototypes,
                                                    image_size=tuple(images.shape[1:3]), sigma=self.sigma)
            maps.append(np.asarray(batch_maps[:count]))
            scores.append(np.asarray(batch_scores[:count]))
            if progress is not None:
                progress.update(count)
        return np.concatenate(maps), np.concatenate(scores)

    def config(self) -> dict[str, Any]:
        return {"format_version": DETECTOR_FORMAT_VERSION, "k": self.k, "sigma": self.sigma, "seed": self.seed,
                "batch_size": self.batch_size, "kmeans_options": self.kmeans_options,
                "extractor": self.extractor.describe(),
                "layers": [int(p.shape[-1]) for p in self.memory_bank.prototypes] if self.memory_bank else None}

    def save(self, directory: str | Path) -> Path:
        """DIR/detector.json (config + extractor identity) and DIR/prototypes (orbax)."""
        import orbax.checkpoint as ocp

        if self.memory_bank is None:
            raise UserInputError("nothing to save: the detector has no memory bank yet (call fit first)")
        directory = Path(directory).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        tree = {f"layer_{i}": np.asarray(p) for i, p in enumerate(self.memory_bank.prototypes)}
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(directory / "prototypes", tree, force=True)
        checkpointer.wait_until_finished()
        (directory / "detector.json").write_text(json.dumps(self.config(), indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, extractor: FeatureExtractor | None = None) -> AnomalyDetector:
        """Read a saved detector; `extractor` defaults to the one described in detector.json, and a
        given one must describe itself identically (the error lists what differs)."""
        import orbax.checkpoint as ocp

        directory = Path(directory).resolve()
        config_path = directory / "detector.json"
        if not config_path.is_file():
            raise UserInputError(f"{config_path}: missing; {directory} is not a saved AnomalyDetector")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserInputError(f"{config_path}: not valid JSON ({error})") from error
        if config.get("format_version") != DETECTOR_FORMAT_VERSION:
            raise UserInputError(f"{config_path}: format_version {config.get('format_version')!r}, expected "
                                 f"{DETECTOR_FORMAT_VERSION}")
        if extractor is None:
            extractor = extractor_from_description(config["extractor"])
        differences = describe_differences(config["extractor"], extractor.describe())
        if differences:
            raise UserInputError(f"{directory}: the feature extractor does not match the one the memory bank was "
                                 "built with:\n  " + "\n  ".join(differences))
        try:
            restored = ocp.StandardCheckpointer().restore(directory / "prototypes")
        except Exception as error:  # orbax raises many types for unreadable checkpoints
            raise UserInputError(f"{directory / 'prototypes'}: could not read the prototypes ({error})") from error
        prototypes = [jnp.asarray(restored[f"layer_{i}"]) for i in range(len(config["layers"]))]
        detector = cls(extractor, k=config["k"], sigma=config["sigma"], seed=config["seed"],
                       batch_size=config["batch_size"], kmeans_options=config["kmeans_options"])
        detector.memory_bank = MemoryBank(prototypes, [])
        return detector
