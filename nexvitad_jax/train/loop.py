"""NexViTAD training: `train(config, dataset, source, target, workdir)`.

Phase 1 (epochs < config.train.phase1_epochs): source segmentation heads and pseudo-label heads on
source ground truth. Phase 2: joint training with the target heads on pseudo-labels (refreshed at
each epoch start) and the augmentation-consistency term (eq. 8). The batches, their data order
and the opt-in feature cache are nexvitad_jax.train.batches'; the step is nexvitad_jax.train.step's.

Any device count trains the same (the step pads the batch to it, masked). The loop runs under
`jax.transfer_guard("disallow")`: batches enter explicitly, and each step's metrics are fetched
(`jax.device_get`) after the next step is dispatched, so the host never waits on the device
between steps; the non-finite-loss check therefore lags one step, except before a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from nexvitad_jax.data import few_shot_images
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.io import naming
from nexvitad_jax.models.build import build_model
from nexvitad_jax.models.nexvitad import NexViTAD
from nexvitad_jax.train.batches import TrainBatches, steps_per_epoch
from nexvitad_jax.train.checkpoints import Checkpoints
from nexvitad_jax.sharding import make_mesh
from nexvitad_jax.train.step import StepLayout, TrainStep


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


def check_training_config(config, source: list[str], target: list[str]) -> None:
    """The errors a run would otherwise meet only after loading data and building the model."""
    if not source or not target:
        raise UserInputError(f"training needs source and target classes, got source={source} target={target}")
    train = config.train
    if not 0 <= int(train.phase1_epochs) <= int(train.epochs):
        raise UserInputError(f"config.train.phase1_epochs = {train.phase1_epochs} must be in "
                             f"[0, config.train.epochs = {train.epochs}]")
    for name in ("source_per_class", "target_per_class"):
        if int(train[name]) < 1:
            raise UserInputError(f"config.train.{name} = {train[name]} must be a positive number of images")


def load_training_data(dataset, source: list[str], target: list[str], few_shot: int, seed: int):
    """Source: every image of each source class with its mask (train/good + test); an anomalous image
    without a mask (a folder spec may have them) would teach "no defect here", so it is left out.
    Target: the few-shot normal images of each target class (`few_shot_images`, as the memory bank
    takes them)."""
    source_data = []
    for category in source:
        parts = [dataset.load(category, split) for split in ("train", "test")]
        known = np.concatenate([p.mask_known for p in parts])
        if not known.all():
            print(f"nexvitad train: source class {category}: {int((~known).sum())} anomalous images without "
                  "masks left out of training", file=sys.stderr)
        source_data.append((np.concatenate([p.images for p in parts])[known],
                            np.concatenate([p.masks for p in parts])[known]))
    return source_data, np.stack([few_shot_images(dataset, category, few_shot, seed) for category in target])


def train(config, dataset, source: list[str], target: list[str], workdir: str | Path, *,
          resume: bool = True, progress: bool = True, devices=None) -> TrainResult:
    """Train NexViTAD on `source` (labelled) and `target` (few-shot, unlabelled) classes of
    `dataset`, on `devices` (default: every device of every process; any count trains the same);
    checkpoints and metrics.jsonl go to `workdir`."""
    check_training_config(config, source, target)
    mesh = make_mesh(devices)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    seed = int(config.seed)
    source_data, target_images = load_training_data(dataset, source, target, int(config.data.few_shot), seed)
    total_steps = steps_per_epoch(config, source_data) * int(config.train.epochs)
    trainer = TrainStep.from_config(config, build_model(config, len(source), len(target)), mesh, total_steps)
    _note_padding(trainer.layout, int(config.train.phase1_epochs), int(config.train.epochs))
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
    log = _StepLog(workdir / "metrics.jsonl", total_steps, start, progress, batches.images_in)
    if start:
        log.note(f"nexvitad train: resumed from step {start} of {total_steps}" if start < total_steps else
                 f"nexvitad train: trained earlier ({total_steps} steps); restored from the last checkpoint")
    try:
        # Data enters (the batches) and results leave (metrics, pseudo-labels, checkpoints) only
        # where the loop says so: any other transfer is an error.
        with jax.transfer_guard("disallow"):
            state, last_metrics = _run_steps(int(config.train.phase1_epochs), trainer, batches, checkpoints, log,
                                             (state, labels), range(start, total_steps), metadata)
        checkpoints.wait()
    finally:
        log.close()
        checkpoints.close()
    return TrainResult(trainer.model(state), state, list(source), list(target), total_steps, last_metrics)


def _run_steps(phase1_epochs: int, trainer: TrainStep, batches: TrainBatches, checkpoints: Checkpoints,
               log: "_StepLog", state_and_labels, steps: range, metadata: dict[str, Any]):
    """The steps of `steps`. Each step's metrics are fetched after the next step is dispatched, so
    logging never stalls the device; a checkpoint is written only once its step's loss is checked
    finite, so the last one is always good. Returns the final state and the last metrics."""
    state, labels = state_and_labels
    host_labels = jax.device_get(labels)  # the batches' copy, fetched once per refresh
    pending, last_metrics, compiled = None, {}, set()

    def fetch(metrics, record: dict[str, Any]) -> dict[str, float]:
        fetched = {name: float(value) for name, value in jax.device_get(metrics).items()}
        if not np.isfinite(fetched["loss"]):
            raise _diverged(fetched["loss"], record, checkpoints)
        log.write(record | fetched)
        return fetched

    for step in steps:
        epoch, within = divmod(step, batches.steps_per_epoch)
        phase = 1 if epoch < phase1_epochs else 2
        if phase not in compiled:  # each phase's step is its own program, compiled at its first call
            log.note(_compile_message(phase))
            compiled.add(phase)
        if phase == 2 and within == 0:  # pseudo-labels refreshed at each phase-2 epoch start
            labels = trainer.pseudo_labels(state, batches.target_set)
            host_labels = jax.device_get(labels)
        state, metrics = trainer(state, batches.batch(step, phase, host_labels), phase)
        if pending:
            last_metrics = fetch(*pending)
        pending = (metrics, {"step": step + 1, "epoch": epoch, "phase": phase})
        final = step + 1 == steps.stop
        if final or checkpoints.due(step + 1):
            last_metrics, pending = fetch(*pending), None
            with jax.transfer_guard("allow"):  # the state leaves for the checkpoint (orbax copies it)
                checkpoints.save(step + 1, state, labels, metadata | {"epoch": epoch, "step": step + 1}, force=final)
    return state, last_metrics


def _compile_message(phase: int) -> str:
    # The figures: the demo config's step takes 11-29 s to compile on 2 CPU cores (issue 14); with
    # Hiera-tiny + DINOv2-S at 224 px, 135 s on one (benchmarks/results/train_step_representative.json).
    # The step compiles once per process: a resumed run compiles it again.
    hint = "; ~10-30 s on CPU for the demo config, minutes for real backbones" if jax.default_backend() == "cpu" else ""
    return f"nexvitad train: compiling the phase-{phase} train step (first time only{hint})..."


def _note_padding(layout: StepLayout, phase1_epochs: int, epochs: int) -> None:
    """Says once (process 0) what spreading the batch over the devices pads, if anything."""
    phases = [phase for phase, used in ((1, phase1_epochs > 0), (2, epochs > phase1_epochs)) if used]
    notes = [note for note in map(layout.padding, phases) if note]
    if notes and jax.process_index() == 0:
        logging.getLogger(__name__).warning("nexvitad train: the batch is padded to the device count (masked: "
                                            "the same training, more computation): %s", "; ".join(notes))


def _diverged(loss: float, record: dict[str, Any], checkpoints: Checkpoints) -> TrainingDiverged:
    checkpoints.wait()
    kept = checkpoints.latest_step()
    where = (f"loss is {loss} at step {record['step']} (epoch {record['epoch']}, phase {record['phase']}); "
             "training stopped")
    if kept is None:
        return TrainingDiverged(f"{where} before any checkpoint was written")
    return TrainingDiverged(f"{where}. The last good checkpoint is step {kept} in {checkpoints.directory}")


class _StepLog:
    """Each step's record, on process 0: a line of metrics.jsonl and the progress bar."""

    def __init__(self, path: Path, total_steps: int, start: int, progress: bool, images_in: Callable[[int], int]):
        """`images_in(phase)`: the images a step of `phase` trains on (for the throughput)."""
        self.images_in, self.path = images_in, path
        self.last = time.perf_counter()
        first = jax.process_index() == 0
        self.file = open(path, "a") if first else None
        self.bar = None
        if progress and first:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start, desc="train", unit="step")

    def write(self, record: dict[str, Any]) -> None:
        """`record`: a step's metrics; the throughput is taken over the time since the previous
        record (steps run ahead of their records, so that is one step's time)."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        record = record | {"images_per_s": self.images_in(record["phase"]) / seconds}
        if self.file:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as error:  # a full disk, say: one line naming the file
                raise naming(error, self.path) from None
        if self.bar:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
            self.bar.update(1)

    def note(self, message: str) -> None:
        """A line for the user (process 0), above the progress bar when there is one."""
        if self.bar:
            self.bar.write(message, file=sys.stderr)
        elif self.file:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.file:
            self.file.close()
