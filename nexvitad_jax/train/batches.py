"""The training batches of a run: `TrainBatches(config, source_data, target_images, trainer, state)`.

Data order is a pure function of (seed, epoch, class): each class's images are drawn in the order
`np.random.default_rng([seed, epoch, stream]).permutation(size)` (stream = c for source class c,
1000 + c for target class c), `per_class` at a time, wrapping around. A checkpoint's step
therefore fixes the data of every later step. Multi-host: each process feeds its slice of the
per-class axis (`jax.make_array_from_process_local_data`).

The feature cache (`config.train.feature_cache`, opt-in): the frozen backbones' outputs for the
never-augmented images (every source image, the clean few-shot target images) are computed once,
held in host memory and fed to the steps and the pseudo-label passes instead of those images
(the batch layout is nexvitad_jax.train.step's). Augmentation is unchanged: it only ever applies
to the consistency branch's target view, which is drawn afresh each step and still goes through
the backbones. The training is the same as without the cache (equal up to float rounding); what it
costs is host memory (the backbone outputs of every source image; benchmarks/results/train_step.json
has the paper backbones' figure per image) and one backbone pass over them per run.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np

from nexvitad_jax.train.losses import IGNORE
from nexvitad_jax.sharding import batch_sharding, replicated
from nexvitad_jax.train.step import TrainStep

TARGET_STREAM = 1000  # target class c draws its order from stream TARGET_STREAM + c


def epoch_order(seed: int, epoch: int, stream: int, size: int) -> np.ndarray:
    """The order of one class's `size` images in an epoch."""
    return np.random.default_rng([seed, epoch, stream]).permutation(size)


def wrapping_slice(order: np.ndarray, start: int, count: int) -> np.ndarray:
    """`count` entries of `order` from `start` on, wrapping around its end."""
    return order[(start + np.arange(count)) % len(order)]


def rows_per_class(per_class: Any, rows: list[np.ndarray]) -> np.ndarray:
    """Rows `rows[c]` of each class's array -> (classes, len(rows[c]), ...)."""
    return np.stack([np.asarray(array)[index] for array, index in zip(per_class, rows)])


def steps_per_epoch(config, source_data: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """`config.train.steps_per_epoch`, or (0) one pass over the largest source class."""
    return int(config.train.steps_per_epoch) or math.ceil(
        max(len(images) for images, _ in source_data) / int(config.train.source_per_class))


class TrainBatches:
    """`batch(step, phase, pseudo_labels)`: the global batch of a step (laid out as
    nexvitad_jax.train.step says); `target_set`: the input of the pseudo-label pass."""

    def __init__(self, config, source_data: list[tuple[np.ndarray, np.ndarray]], target_images: np.ndarray,
                 trainer: TrainStep, state, *, progress: bool = False):
        """`source_data`: (images, masks) per source class; `target_images`: (C_t, M, H, W, 3).
        The feature cache is on when `trainer` takes cached features (`trainer.feature_cache`); it
        is computed with `state`'s (frozen) backbones."""
        self.seed = int(config.seed)
        self.per_source, self.per_target = int(config.train.source_per_class), int(config.train.target_per_class)
        self.steps_per_epoch = steps_per_epoch(config, source_data)
        self.mesh = trainer.mesh
        self.target_shape = target_images.shape
        # What a batch takes rows of: per class (a list over classes) an array or a pytree of arrays.
        self.source = {"source_masks": [masks for _, masks in source_data],
                       "source_images": [images for images, _ in source_data]}
        self.target = {"target_images": list(target_images)}
        self.target_set = {"target_images": self.replicate(target_images)}
        if trainer.feature_cache:
            self._cache_features(trainer, state, progress)

    def _cache_features(self, trainer: TrainStep, state, progress: bool) -> None:
        """The source images replaced by their backbone outputs; the target images' ones added."""
        images = self.source.pop("source_images")
        cache = _cache(images + self.target["target_images"],
                       lambda chunk: trainer.backbone_features(state, self.shard(chunk, self.per_source)),
                       self.per_source, progress)
        self.source["source_features"], self.target["target_features"] = cache[:len(images)], cache[len(images):]
        stacked = jax.tree.map(lambda *per_class: np.stack(per_class), *self.target["target_features"])
        self.target_set["target_features"] = jax.tree.map(self.replicate, stacked)

    def replicate(self, local: np.ndarray) -> jax.Array:
        """A global array replicated on every device, from the whole array every process holds (so
        multi-host jit and orbax accept it)."""
        return jax.make_array_from_process_local_data(replicated(self.mesh), local)

    def shard(self, local: np.ndarray, per_class: int) -> jax.Array:
        """A global (classes, per_class, ...) batch array sharded along per_class, from this
        process's slice of the per-class axis of `local` (every process holds all of `local`)."""
        share = per_class // jax.process_count()
        begin = jax.process_index() * share
        shape = (local.shape[0], per_class, *local.shape[2:])
        return jax.make_array_from_process_local_data(batch_sharding(self.mesh), local[:, begin:begin + share], shape)

    def unlabelled(self) -> jax.Array:
        """Pseudo-labels before the first refresh: every target pixel IGNORE (replicated)."""
        return self.replicate(np.full(self.target_shape[:4], IGNORE, np.int32))

    def images_in(self, phase: int) -> int:
        """Images a step of `phase` trains on (phase 2: each target image clean and augmented)."""
        source = len(self.source["source_masks"]) * self.per_source
        return source + (2 * self.target_shape[0] * self.per_target if phase == 2 else 0)

    def batch(self, step: int, phase: int, pseudo_labels: jax.Array) -> dict[str, Any]:
        """The global batch of `step`: source masks and images (or their features); in phase 2 also
        the target images (and their features) with their current pseudo-labels."""
        epoch, within = divmod(step, self.steps_per_epoch)
        source_rows = [wrapping_slice(epoch_order(self.seed, epoch, c, len(masks)), within * self.per_source,
                                      self.per_source) for c, masks in enumerate(self.source["source_masks"])]
        batch = self._rows(self.source, source_rows, self.per_source)
        if phase == 2:
            classes, size = self.target_shape[:2]
            target_rows = [wrapping_slice(epoch_order(self.seed, epoch, TARGET_STREAM + c, size),
                                          within * self.per_target, self.per_target) for c in range(classes)]
            labels = list(np.asarray(pseudo_labels.addressable_data(0)))
            batch |= self._rows({**self.target, "target_labels": labels}, target_rows, self.per_target)
        return batch

    def _rows(self, arrays: dict[str, list[Any]], rows: list[np.ndarray], per_class: int) -> dict[str, Any]:
        """Batch entries: rows `rows[c]` of class c of each per-class list of arrays (or pytrees)."""
        def pick(*per_class_leaves):
            return self.shard(rows_per_class(per_class_leaves, rows), per_class)

        return {name: jax.tree.map(pick, *per_class_values) for name, per_class_values in arrays.items()}


def _cache(per_class: list[np.ndarray], features_of: Callable[[np.ndarray], Any], chunk: int,
           progress: bool) -> list[Any]:
    """The feature cache: for each class's images (N_c, H, W, 3), their backbone outputs (a host numpy
    pytree, (N_c, ...)), computed `chunk` images at a time (`features_of`: (1, chunk, H, W, 3) ->
    the outputs, replicated)."""
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(map(len, per_class)), desc="feature cache", unit="img")
    try:
        cache = []
        for images in per_class:
            parts = []
            for begin in range(0, len(images), chunk):
                index = (begin + np.arange(chunk)) % len(images)  # the last chunk wraps: one static shape
                features = features_of(images[index][None])
                parts.append(jax.tree.map(lambda f: np.asarray(f.addressable_data(0))[0], features))
                if bar:
                    bar.update(min(chunk, len(images) - begin))
            cache.append(jax.tree.map(lambda *rows: np.concatenate(rows)[:len(images)], *parts))
        return cache
    finally:
        if bar:
            bar.close()
