"""NexViTAD training: `train(config, dataset, source, target, workdir)`.

Phase 1 (epochs < config.phase1_epochs): source segmentation heads and pseudo-label heads on source
ground truth. Phase 2: joint training with the target heads on pseudo-labels (refreshed at each
epoch start) and the augmentation-consistency term (eq. 8). Data order is a pure function of
(seed, epoch, class), so a checkpoint's step fixes it; multi-host runs feed each process's slice
of the per-class batch axis.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nexvitad_jax.compilation import fast_compile_options, initialize
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.models.nexvitad import NexViTAD
from nexvitad_jax.train.checkpoints import Checkpoints
from nexvitad_jax.train.losses import IGNORE
from nexvitad_jax.train.step import LossWeights, TrainStep, batch_sharding, make_mesh, make_optimizer, replicated

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_BACKBONES = ("hiera", "dinov2")


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


def build_model(config, num_source: int, num_target: int) -> NexViTAD:
    """The NexViTAD model of a config: backbones from converted checkpoints or random (tiny) ones;
    the random parameters are drawn by one compiled program (`initialize`)."""
    from nexvitad_jax.models import build_backbone, load_backbone

    dtype = _DTYPES[config.get("dtype", "float32")]
    loaded = {family: load_backbone(config.get(f"{family}_checkpoint"), dtype=dtype)[0]
              for family in _BACKBONES if config.get(f"{family}_checkpoint", None)}

    def create() -> NexViTAD:
        rngs = nnx.Rngs(int(config.seed))
        backbones = {}
        for family in _BACKBONES:
            if family in loaded:
                # A stand-in of the same shape, replaced by the loaded backbone below; it draws from
                # its own Rngs, so the heads get the keys they would get without it.
                backbones[family] = build_backbone(family, loaded[family].config, rngs=nnx.Rngs(0), dtype=dtype)
            else:
                spec = config[family]
                spec = spec.to_dict() if hasattr(spec, "to_dict") else spec
                backbones[family] = build_backbone(family, spec, rngs=rngs, dtype=dtype)
        return NexViTAD(backbones["hiera"], backbones["dinov2"], num_source, num_target,
                        shared_source_head=bool(config.shared_source_head),
                        decoder_channels=tuple(config.decoder_channels),
                        pseudo_label_hidden=tuple(config.pseudo_label_hidden), dtype=dtype, rngs=rngs)

    stand_ins = nnx.Any(*(nnx.PathContains(family) for family in loaded)) if loaded else nnx.Nothing
    model = initialize(create, placeholders=stand_ins)
    for family, module in loaded.items():
        setattr(model.encoder, family, module)
    return model


def load_training_data(dataset, source: list[str], target: list[str], few_shot: int, seed: int):
    """Source: every image of each source class with its mask (train/good + test). Target: the
    few-shot normal images of each target class (`sorted(files)[seed*M:(seed+1)*M]`)."""
    from nexvitad_jax.data import few_shot_indices

    source_data = []
    for category in source:
        parts = [dataset.load(category, split) for split in ("train", "test")]
        source_data.append((np.concatenate([p.images for p in parts]), np.concatenate([p.masks for p in parts])))
    target_images = []
    for category in target:
        train = dataset.load(category, "train")
        target_images.append(train.images[few_shot_indices(train.paths, few_shot, seed)])
    return source_data, np.stack(target_images)


def _epoch_order(seed: int, epoch: int, stream: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, stream]).permutation(size)


def _take(order: np.ndarray, start: int, count: int) -> np.ndarray:
    return order[(start + np.arange(count)) % len(order)]


def train(config, dataset, source: list[str], target: list[str], workdir: str | Path, *,
          resume: bool = True, progress: bool = True) -> TrainResult:
    """Train NexViTAD on `source` (labelled) and `target` (few-shot, unlabelled) classes of
    `dataset`; checkpoints and metrics.jsonl go to `workdir`."""
    if not source or not target:
        raise UserInputError(f"training needs source and target classes, got source={source} target={target}")
    if not 0 <= int(config.phase1_epochs) <= int(config.epochs):
        raise UserInputError(f"config.phase1_epochs = {config.phase1_epochs} must be in [0, epochs = {config.epochs}]")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    seed = int(config.seed)
    source_data, target_images = load_training_data(dataset, source, target, int(config.few_shot), seed)
    image_size = target_images.shape[2]

    mesh = make_mesh()
    processes, process = jax.process_count(), jax.process_index()
    per_source, per_target = int(config.source_per_class), int(config.target_per_class)
    for name, value in (("source_per_class", per_source), ("target_per_class", per_target)):
        if value % mesh.size:
            raise UserInputError(f"config.{name} = {value} must be divisible by the {mesh.size} devices")
    steps_per_epoch = int(config.get("steps_per_epoch", 0)) or math.ceil(
        max(len(images) for images, _ in source_data) / per_source)
    total_steps = steps_per_epoch * int(config.epochs)
    model = build_model(config, len(source), len(target))
    trainer = TrainStep(model, make_optimizer(float(config.learning_rate), int(config.warmup_steps), total_steps),
                        mesh, weights=LossWeights(float(config.lambda1), float(config.lambda2)),
                        augmentation=dict(config.get("augmentation", {})),
                        compiler_options=fast_compile_options() if config.get("fast_compile", False) else None)
    state = trainer.init_state(seed)
    # Global (every process holds the same values) replicated arrays, so multi-host jit and orbax accept them.
    everywhere = replicated(mesh)
    target_images_global = jax.make_array_from_process_local_data(everywhere, target_images)
    labels = jax.make_array_from_process_local_data(everywhere, np.full(target_images.shape[:4], IGNORE, np.int32))
    checkpoints = Checkpoints(workdir / "checkpoints", every_steps=int(config.checkpoint_every))
    start = 0
    if resume and checkpoints.latest_step() is not None:
        start = checkpoints.latest_step()
        state, labels, _ = checkpoints.restore(start, state, labels)

    sharding = batch_sharding(mesh)

    def global_array(local: np.ndarray, per_class: int) -> jax.Array:
        # Each process feeds its slice of the per-class axis (process_count == 1: everything).
        share = per_class // processes
        shape = (local.shape[0], per_class, *local.shape[2:])
        return jax.make_array_from_process_local_data(sharding, local[:, process * share:(process + 1) * share], shape)

    def make_batch(step: int, phase: int) -> dict[str, jax.Array]:
        epoch, within = divmod(step, steps_per_epoch)
        picks = [_take(_epoch_order(seed, epoch, c, len(images)), within * per_source, per_source)
                 for c, (images, _) in enumerate(source_data)]
        batch = {"source_images": global_array(np.stack([images[i] for (images, _), i in zip(source_data, picks)]),
                                               per_source),
                 "source_masks": global_array(np.stack([masks[i] for (_, masks), i in zip(source_data, picks)]),
                                              per_source)}
        if phase == 2:
            target_picks = np.stack([_take(_epoch_order(seed, epoch, 1000 + c, target_images.shape[1]),
                                           within * per_target, per_target) for c in range(len(target))])
            batch["target_images"] = global_array(np.take_along_axis(
                target_images, target_picks[:, :, None, None, None], axis=1), per_target)
            batch["target_labels"] = global_array(np.take_along_axis(
                np.asarray(labels.addressable_data(0)), target_picks[:, :, None, None], axis=1), per_target)
        return batch

    metadata = {"seed": seed, "source": list(source), "target": list(target), "steps_per_epoch": steps_per_epoch,
                "data_order": "numpy default_rng([seed, epoch, class]) permutation, wrapping"}
    log = open(workdir / "metrics.jsonl", "a") if process == 0 else None
    bar = None
    if progress and process == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=start, desc="train", unit="step")
    last_metrics: dict[str, float] = {}
    images_per_step = len(source) * per_source
    try:
        for step in range(start, total_steps):
            epoch, within = divmod(step, steps_per_epoch)
            phase = 1 if epoch < int(config.phase1_epochs) else 2
            if phase == 2 and within == 0:  # pseudo-labels refreshed at each phase-2 epoch start
                labels = trainer.pseudo_labels(state, target_images_global)
            batch = make_batch(step, phase)
            began = time.perf_counter()
            state, metrics = trainer(state, batch, phase)
            last_metrics = {k: float(v) for k, v in metrics.items()}
            seconds = time.perf_counter() - began
            if not np.isfinite(last_metrics["loss"]):
                checkpoints.wait()
                kept = checkpoints.latest_step()
                raise TrainingDiverged(
                    f"loss is {last_metrics['loss']} at step {step + 1} (epoch {epoch}, phase {phase}); training "
                    f"stopped. The last good checkpoint is step {kept} in {checkpoints.directory}"
                    if kept is not None else
                    f"loss is {last_metrics['loss']} at step {step + 1} (epoch {epoch}, phase {phase}); training "
                    f"stopped before any checkpoint was written")
            n_images = images_per_step + (2 * len(target) * per_target if phase == 2 else 0)
            record = {"step": step + 1, "epoch": epoch, "phase": phase, "images_per_s": n_images / seconds,
                      **last_metrics}
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if bar:
                bar.set_postfix(loss=f"{last_metrics['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
                bar.update(1)
            checkpoints.save(step + 1, state, labels, metadata | {"epoch": epoch, "step": step + 1},
                             force=step + 1 == total_steps)
        checkpoints.wait()
    finally:
        if bar:
            bar.close()
        if log:
            log.close()
        checkpoints.close()
    return TrainResult(trainer.model(state), state, list(source), list(target), total_steps, last_metrics)
