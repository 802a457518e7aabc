"""NexViTAD training: losses, pseudo-labels, on-device augmentation, the sharded train step, the
resumable loop (`train`)."""

from nexvitad_jax.train.loop import TrainingDiverged, TrainResult, build_model, train

__all__ = ["TrainResult", "TrainingDiverged", "build_model", "train"]
