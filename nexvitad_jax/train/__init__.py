"""NexViTAD training: losses, pseudo-labels, on-device augmentation, the batches and feature cache,
the sharded train step, the resumable loop (`train`).

`build_model` is re-exported from nexvitad_jax.models.build for earlier callers."""

from nexvitad_jax.models.build import build_model
from nexvitad_jax.train.loop import TrainingDiverged, TrainResult, train

__all__ = ["TrainResult", "TrainingDiverged", "build_model", "train"]
