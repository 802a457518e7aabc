"""`AnomalyDetector`: memory-bank anomaly detection over any feature extractor
(`nexvitad_jax.inference.extractors`): fit on normal images, predict maps and image scores,
save and load (the extractor's identity is saved and checked, so a memory bank is never scored
against features of another network).

Both fit and predict spread their images over every device of the detector's mesh (default: every
device of every host; `nexvitad_jax.inference.batching`): the normal images' features stay on the
devices, sharded along the images, for the memory bank; the prototypes are replicated and the
test images' maps are gathered once, onto every process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.identity import describe_differences
from nexvitad_jax.inference.anomaly_maps import anomaly_maps, check_layers
from nexvitad_jax.inference.batching import map_batches, replicate
from nexvitad_jax.inference.extractors import FeatureExtractor, extractor_from_description
from nexvitad_jax.inference.memory_bank import MemoryBank, build_memory_bank
from nexvitad_jax.sharding import make_mesh

DETECTOR_FORMAT_VERSION = 1


class AnomalyDetector:
    """fit(normal images) builds the memory bank; predict(images) -> (maps (B, H, W), scores (B,)).

    `batch_size` is the global batch (rounded up to a multiple of the device count); `mesh`
    (default: every device) should be the extractor's, where its weights are replicated."""

    def __init__(self, extractor: FeatureExtractor, *, k: int = 30, sigma: float = 2.0, seed: int = 0,
                 batch_size: int = 8, kmeans_options: dict | None = None, mesh: Mesh | None = None):
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise UserInputError(f"k = {k!r}: expected a positive number of prototypes")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UserInputError(f"batch_size = {batch_size!r}: expected a positive integer")
        self.extractor, self.k, self.sigma, self.seed = extractor, int(k), float(sigma), int(seed)
        self.batch_size = int(batch_size)
        self.mesh = make_mesh() if mesh is None else mesh
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
        """Per-layer features (M, h, w, D) of `images`, computed in sharded batches (the last one
        padded, so one compilation; the padding trimmed) and left on the devices, sharded along M
        (replicated when M does not divide by the device count)."""
        images = self._check_images(images, "images")
        return map_batches(self.extractor, images, self.batch_size, self.mesh, progress=progress, to_host=False)

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
        prototypes = replicate(self.memory_bank.prototypes, self.mesh)

        def maps_of(batch):
            features = self.extractor(batch)
            check_layers(features, prototypes)
            return anomaly_maps(features, prototypes, image_size=tuple(images.shape[1:3]), sigma=self.sigma)

        return map_batches(maps_of, images, self.batch_size, self.mesh, progress=progress)

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
    def load(cls, directory: str | Path, extractor: FeatureExtractor | None = None,
             mesh: Mesh | None = None) -> AnomalyDetector:
        """Read a saved detector; `extractor` defaults to the one described in detector.json (built on
        `mesh`), and a given one must describe itself identically (the error lists what differs)."""
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
            extractor = extractor_from_description(config["extractor"], mesh)
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
                       batch_size=config["batch_size"], kmeans_options=config["kmeans_options"], mesh=mesh)
        detector.memory_bank = MemoryBank(prototypes, [])
        return detector
