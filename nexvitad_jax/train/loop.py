"""NexViTAD training: `train(config, dataset, source, target, workdir)`.

Phase 1 (epochs < config.phase1_epochs): source segmentation heads and pseudo-label heads on source
ground truth. Phase 2: joint training with the target heads on pseudo-labels (refreshed at each
epoch start) and the augmentation-consistency term (eq. 8). Data order is a pure function of
(seed, epoch, class), so a checkpoint's step fixes it; multi-host runs feed each process's slice
of the per-class batch axis.

`config.feature_cache` (opt-in): the frozen backbones' outputs for the source images and the
clean few-shot target images are computed once before the first step, held in host memory and fed
to the steps and the pseudo-label passes instead of the images. Augmentation is unchanged: it only
ever applies to the consistency branch's target view, which is drawn afresh each step and still
goes through the backbones. The training is the same as without the cache (equal up to float
rounding); what it costs is host memory (the backbone outputs of every source image: ~6.4 MB per
image for Hiera-Huge + DINOv2-S at 224 in float32) and one backbone pass over them per run.
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


def _pick(per_class, picks) -> np.ndarray:
    """Rows `picks[c]` of each class's array -> (classes, len(picks[c]), ...)."""
    return np.stack([np.asarray(rows)[index] for rows, index in zip(per_class, picks)])


def _cache_features(trainer: TrainStep, state, source_images: list[np.ndarray], target_images: np.ndarray,
                    chunk: int, global_array, *, progress: bool):
    """The feature cache: backbone outputs (host numpy pytrees) of each source class's images,
    (N_c, ...) per class, and of the target images, (C_t, M, ...). Computed `chunk` images at a
    time, sharded like a batch (`global_array`, so every process feeds its slice)."""
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(map(len, source_images)) + target_images.shape[0] * target_images.shape[1],
                   desc="feature cache", unit="img")

    def features_of(images: np.ndarray):
        parts = []
        for begin in range(0, len(images), chunk):
            index = (begin + np.arange(chunk)) % len(images)  # the last chunk wraps: one static shape
            features = trainer.backbone_features(state, global_array(images[index][None], chunk))
            parts.append(jax.tree.map(lambda f: np.asarray(f.addressable_data(0))[0], features))
            if bar:
                bar.update(min(chunk, len(images) - begin))
        return jax.tree.map(lambda *rows: np.concatenate(rows)[:len(images)], *parts)

    try:
        source_cache = [features_of(images) for images in source_images]
        target_cache = jax.tree.map(lambda *per_class: np.stack(per_class), *map(features_of, target_images))
    finally:
        if bar:
            bar.close()
    return source_cache, target_cache


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

    source_cache = target_cache = target_features_global = None
    if config.get("feature_cache", False):
        source_cache, target_cache = _cache_features(trainer, state, [images for images, _ in source_data],
                                                     target_images, per_source, global_array,
                                                     progress=progress and process == 0)
        target_features_global = jax.tree.map(lambda f: jax.make_array_from_process_local_data(everywhere, f),
                                              target_cache)

    def make_batch(step: int, phase: int) -> dict[str, jax.Array]:
        epoch, within = divmod(step, steps_per_epoch)
        picks = [_take(_epoch_order(seed, epoch, c, len(images)), within * per_source, per_source)
                 for c, (images, _) in enumerate(source_data)]
        batch = {"source_masks": global_array(_pick([masks for _, masks in source_data], picks), per_source)}
        if source_cache is None:
            batch["source_images"] = global_array(_pick([images for images, _ in source_data], picks), per_source)
        else:
            batch["source_features"] = jax.tree.map(lambda *leaves: global_array(_pick(leaves, picks), per_source),
                                                    *source_cache)
        if phase == 2:
            target_picks = [_take(_epoch_order(seed, epoch, 1000 + c, target_images.shape[1]),
                                  within * per_target, per_target) for c in range(len(target))]
            batch["target_images"] = global_array(_pick(target_images, target_picks), per_target)
            batch["target_labels"] = global_array(_pick(np.asarray(labels.addressable_data(0)), target_picks),
                                                  per_target)
            if target_cache is not None:
                batch["target_features"] = jax.tree.map(
                    lambda leaf: global_array(_pick(leaf, target_picks), per_target), target_cache)
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
                labels = trainer.pseudo_labels(state, target_images_global, target_features_global)
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
