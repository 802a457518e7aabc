"""Run an exported detector (`nexvitad export DETECTOR --format stablehlo --out FILE`) with jax alone.

    from nexvitad_jax import deploy
    detector = deploy.load("detector.nxd")
    maps, scores = detector(images)   # uint8 (B, H, W, 3) at detector.image_size
    anomalous = detector.decisions(scores)

This module imports only jax, numpy and nexvitad_jax.errors (no flax, ott, orbax or the training code;
jax.export reads the program with the `flatbuffers` package, a dependency of this one): the file holds
the serialized StableHLO program (`jax.export`, batch dimension symbolic, lowered for the platforms
named at export), its weights and the detector's calibration. The program maps uint8 images
(B, H, W, 3) to anomaly maps float32 (B, H, W) and image scores float32 (B,), exactly as the
detector's `predict` on the images / 255.

File format (a NumPy .npz archive): `stablehlo` (the serialized `jax.export.Exported`, bytes as
uint8), `metadata` (UTF-8 JSON: format, format_version, image_size, weight count, calibration,
platforms), `weight_00000`, `weight_00001`, ...: the program's first argument, in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nexvitad_jax.errors import UserInputError

FORMAT = "nexvitad-exported-detector"
FORMAT_VERSION = 1


class ExportedDetector:
    """A loaded exported detector: `__call__(images uint8 (B, H, W, 3)) -> (maps, scores)`."""

    def __init__(self, exported, weights: Sequence[np.ndarray], metadata: dict[str, Any]):
        import jax

        self.exported = exported
        self.metadata = metadata
        self.image_size = int(metadata["image_size"])
        self.calibration = metadata.get("calibration")
        self._weights = [jax.device_put(weight) for weight in weights]  # placed once

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.uint8 or len(images) == 0:
            raise UserInputError(f"expected uint8 images of shape (B, {', '.join(map(str, expected))}), got "
                             f"{images.dtype} {images.shape}")
        maps, scores = self.exported.call(self._weights, images)
        return np.asarray(maps), np.asarray(scores)

    def decisions(self, scores) -> np.ndarray:
        """True where an image score is >= the calibrated image threshold."""
        if not self.calibration:
            raise UserInputError("this exported detector holds no calibration")
        return np.asarray(scores) >= self.calibration["image_threshold"]


def save(path: str | Path, serialized: bytes, weights: Sequence[np.ndarray], metadata: dict[str, Any]) -> Path:
    """Write an exported detector (the module docstring's format); `nexvitad export` calls it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, **metadata, "weights": len(weights)}
    arrays = {f"weight_{index:05d}": np.asarray(weight) for index, weight in enumerate(weights)}
    with open(path, "wb") as handle:  # a handle, so numpy does not append ".npz"
        np.savez(handle, stablehlo=np.frombuffer(serialized, np.uint8),
                 metadata=np.frombuffer(json.dumps(metadata).encode(), np.uint8), **arrays)
    return path


def load(path: str | Path) -> ExportedDetector:
    """Read an exported detector; clear errors for a missing, foreign or newer file."""
    import jax

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such exported detector (make one with `nexvitad export`)")
    try:
        with np.load(path) as archive:
            metadata = json.loads(archive["metadata"].tobytes().decode())
            serialized = bytearray(archive["stablehlo"].tobytes())
            weights = [archive[f"weight_{index:05d}"] for index in range(int(metadata["weights"]))]
    except (OSError, ValueError, KeyError) as error:
        raise UserInputError(f"{path}: not an exported nexvitad detector ({error})") from error
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise UserInputError(f"{path}: format {metadata.get('format')!r} version {metadata.get('format_version')!r}; "
                         f"this version reads {FORMAT!r} version {FORMAT_VERSION} (export the detector again)")
    return ExportedDetector(jax.export.deserialize(serialized), weights, metadata)
