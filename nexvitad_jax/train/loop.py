"""NexViTAD training: `train(config, dataset, source, target, workdir)`.

Phase 1 (epochs < config.train.phase1_epochs): source segmentation heads and pseudo-label heads on
source ground truth. Phase 2: joint training with the target heads on pseudo-labels (refreshed at
each epoch start) and the augmentation-consistency term (eq. 8). The batches, their data order
and the opt-in feature cache are nexvitad_jax.train.batches'; the step is nexvitad_jax.train.step's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nexvitad_jax.data import few_shot_images
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.models.build import build_model
from nexvitad_jax.models.nexvitad import NexViTAD
from nexvitad_jax.train.batches import TrainBatches, steps_per_epoch
from nexvitad_jax.train.checkpoints import Checkpoints
from nexvitad_jax.sharding import make_mesh
from nexvitad_jax.train.step import TrainStep


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops, the last good checkpoint stays."""


@dataclasses.dataclass
class TrainResult:
    model: NexViTAD  # the trained model (nnx), backbones included
    state: dict[str, Any]  # the train state pytree
    source: list[str]
    target: list[str]
    steps: int
    last_metrics: dict[str, float]


def check_training_config(config, source: list[str], target: list[str], devices: int) -> None:
    """The errors a run would otherwise meet only after loading data and building the model."""
    if not source or not target:
        raise UserInputError(f"training needs source and target classes, got source={source} target={target}")
    train = config.train
    if not 0 <= int(train.phase1_epochs) <= int(train.epochs):
        raise UserInputError(f"config.train.phase1_epochs = {train.phase1_epochs} must be in "
                             f"[0, config.train.epochs = {train.epochs}]")
    for name in ("source_per_class", "target_per_class"):
        if int(train[name]) % devices:
            raise UserInputError(f"config.train.{name} = {train[name]} must be divisible by the {devices} devices")


def load_training_data(dataset, source: list[str], target: list[str], few_shot: int, seed: int):
    """Source: every image of each source class with its mask (train/good + test). Target: the
    few-shot normal images of each target class (`few_shot_images`, as the memory bank takes them)."""
    source_data = []
    for category in source:
        parts = [dataset.load(category, split) for split in ("train", "test")]
        source_data.append((np.concatenate([p.images for p in parts]), np.concatenate([p.masks for p in parts])))
    return source_data, np.stack([few_shot_images(dataset, category, few_shot, seed) for category in target])


def train(config, dataset, source: list[str], target: list[str], workdir: str | Path, *,
          resume: bool = True, progress: bool = True) -> TrainResult:
    """Train NexViTAD on `source` (labelled) and `target` (few-shot, unlabelled) classes of
    `dataset`; checkpoints and metrics.jsonl go to `workdir`."""
    mesh = make_mesh()
    check_training_config(config, source, target, mesh.size)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    seed = int(config.seed)
    source_data, target_images = load_training_data(dataset, source, target, int(config.data.few_shot), seed)
    total_steps = steps_per_epoch(config, source_data) * int(config.train.epochs)
    trainer = TrainStep.from_config(config, build_model(config, len(source), len(target)), mesh, total_steps)
    state = trainer.init_state(seed)
    batches = TrainBatches(config, source_data, target_images, trainer, state, progress=progress)
    labels = batches.unlabelled()
    checkpoints = Checkpoints(workdir / "checkpoints", every_steps=int(config.train.checkpoint_every))
    start = (checkpoints.latest_step() if resume else None) or 0
    if start:
        state, labels, _ = checkpoints.restore(start, state, labels)
    metadata = {"seed": seed, "source": list(source), "target": list(target),
                "steps_per_epoch": batches.steps_per_epoch,
                "data_order": "numpy default_rng([seed, epoch, class]) permutation, wrapping"}
    log = _StepLog(workdir / "metrics.jsonl", total_steps, start, progress)
    last_metrics: dict[str, float] = {}
    try:
        for step in range(start, total_steps):
            epoch, within = divmod(step, batches.steps_per_epoch)
            phase = 1 if epoch < int(config.train.phase1_epochs) else 2
            if phase == 2 and within == 0:  # pseudo-labels refreshed at each phase-2 epoch start
                labels = trainer.pseudo_labels(state, batches.target_set)
            batch = batches.batch(step, phase, labels)
            began = time.perf_counter()
            state, metrics = trainer(state, batch, phase)
            last_metrics = {k: float(v) for k, v in metrics.items()}
            seconds = time.perf_counter() - began
            if not np.isfinite(last_metrics["loss"]):
                raise _diverged(last_metrics["loss"], step, epoch, phase, checkpoints)
            log.write({"step": step + 1, "epoch": epoch, "phase": phase,
                       "images_per_s": batches.images_in(phase) / seconds, **last_metrics})
            checkpoints.save(step + 1, state, labels, metadata | {"epoch": epoch, "step": step + 1},
                             force=step + 1 == total_steps)
        checkpoints.wait()
    finally:
        log.close()
        checkpoints.close()
    return TrainResult(trainer.model(state), state, list(source), list(target), total_steps, last_metrics)


def _diverged(loss: float, step: int, epoch: int, phase: int, checkpoints: Checkpoints) -> TrainingDiverged:
    checkpoints.wait()
    kept = checkpoints.latest_step()
    where = f"loss is {loss} at step {step + 1} (epoch {epoch}, phase {phase}); training stopped"
    if kept is None:
        return TrainingDiverged(f"{where} before any checkpoint was written")
    return TrainingDiverged(f"{where}. The last good checkpoint is step {kept} in {checkpoints.directory}")


class _StepLog:
    """Each step's record, on process 0: a line of metrics.jsonl and the progress bar."""

    def __init__(self, path: Path, total_steps: int, start: int, progress: bool):
        first = jax.process_index() == 0
        self.file = open(path, "a") if first else None
        self.bar = None
        if progress and first:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start, desc="train", unit="step")

    def write(self, record: dict[str, Any]) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.bar:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.file:
            self.file.close()
