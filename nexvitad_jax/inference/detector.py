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
from nexvitad_jax.inference.calibration import Calibration
from nexvitad_jax.inference.extractors import FeatureExtractor
from nexvitad_jax.inference.memory_bank import MemoryBank, build_memory_bank
from nexvitad_jax.sharding import make_mesh

DETECTOR_FORMAT_VERSION = 2  # 2: manifest, calibration, weights inside the folder


def check_float_images(images, name: str) -> np.ndarray:
    """`images` as a float32 (B, H, W, 3) batch in [0, 1], or a UserInputError naming `name`."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise UserInputError(f"{name}: expected a non-empty (B, H, W, 3) batch of RGB images in [0, 1], "
                             f"got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise UserInputError(f"{name}: expected float images in [0, 1], got dtype {images.dtype}")
    return images.astype(np.float32)


class AnomalyDetector:
    """fit(normal images) builds the memory bank; predict(images) -> (maps (B, H, W), scores (B,)).

    `batch_size` is the global batch (rounded up to a multiple of the device count); `mesh`
    (default: every device) should be the extractor's, where its weights are replicated."""

    def __init__(self, extractor: FeatureExtractor, *, k: int = 30, sigma: float = 2.0, seed: int = 0,
                 batch_size: int = 8, kmeans_options: dict | None = None, mesh: Mesh | None = None,
                 image_size: int | None = None):
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise UserInputError(f"k = {k!r}: expected a positive number of prototypes")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UserInputError(f"batch_size = {batch_size!r}: expected a positive integer")
        self.extractor, self.k, self.sigma, self.seed = extractor, int(k), float(sigma), int(seed)
        self.batch_size = int(batch_size)
        self.mesh = make_mesh() if mesh is None else mesh
        self.kmeans_options = dict(kmeans_options or {})
        self.memory_bank: MemoryBank | None = None
        # The input size the detector was fitted at (None: any); exports and `score` use it.
        self.image_size = None if image_size is None else int(image_size)
        self.calibration: Calibration | None = None  # thresholds and normalization (calibration.py)

    def _check_images(self, images, name: str) -> np.ndarray:
        return check_float_images(images, name)

    def extract(self, images, progress=None) -> list[jax.Array]:
        """Per-layer features (M, h, w, D) of `images`, computed in sharded batches (the last one
        padded, so one compilation; the padding trimmed) and left on the devices, sharded along M
        (replicated when M does not divide by the device count)."""
        images = self._check_images(images, "images")
        return map_batches(self.extractor, images, self.batch_size, self.mesh, progress=progress, to_host=False)

    def fit(self, normal_images, progress=None) -> AnomalyDetector:
        """Memory bank from the M normal images: K Sinkhorn K-means prototypes per layer."""
        features = self.extract(self._check_images(normal_images, "normal_images"), progress)
        shown = None if progress is None else not getattr(progress, "disable", not progress)  # a bar, or a bool
        self.memory_bank = build_memory_bank(features, self.k, rng=jax.random.key(self.seed), progress=shown,
                                             **self.kmeans_options)
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
                "image_size": self.image_size, "extractor": self.extractor.describe(),
                "layers": [int(p.shape[-1]) for p in self.memory_bank.prototypes] if self.memory_bank else None}

    def save(self, directory: str | Path) -> Path:
        """The detector folder (`nexvitad_jax.inference.fitted` describes it): manifest.json,
        detector.json (config + extractor identity), prototypes/ (orbax), calibration.json (when
        calibrated) and the extractor's weights (converted checkpoints copied in, the trained encoder
        saved), so the folder runs wherever it is copied."""
        import orbax.checkpoint as ocp

        from nexvitad_jax.inference.fitted import save_extractor, write_manifest

        if self.memory_bank is None:
            raise UserInputError("nothing to save: the detector has no memory bank yet (call fit first)")
        directory = Path(directory).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        tree = {f"layer_{i}": np.asarray(p) for i, p in enumerate(self.memory_bank.prototypes)}
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(directory / "prototypes", tree, force=True)
        checkpointer.wait_until_finished()
        config = {**self.config(), "extractor": save_extractor(directory, self.extractor)}
        (directory / "detector.json").write_text(json.dumps(config, indent=2) + "\n")
        calibration_path = directory / "calibration.json"
        if self.calibration is not None:
            calibration_path.write_text(json.dumps(self.calibration.to_dict(), indent=2) + "\n")
        elif calibration_path.exists():
            calibration_path.unlink()
        write_manifest(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path, extractor: FeatureExtractor | None = None,
             mesh: Mesh | None = None) -> AnomalyDetector:
        """Read a saved detector; `extractor` defaults to the one the folder holds (built on `mesh`),
        and a given one must describe itself identically (the error lists what differs)."""
        import orbax.checkpoint as ocp

        from nexvitad_jax.inference.fitted import load_extractor, read_calibration, read_detector_config

        directory = Path(directory).resolve()
        config = read_detector_config(directory)
        if extractor is None:
            extractor = load_extractor(directory, config["extractor"], mesh)
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
                       batch_size=config["batch_size"], kmeans_options=config["kmeans_options"], mesh=mesh,
                       image_size=config.get("image_size"))
        detector.memory_bank = MemoryBank(prototypes, [])
        detector.calibration = read_calibration(directory)
        return detector
