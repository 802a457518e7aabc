"""The training batches of a run: `TrainBatches(config, source_data, target_images, trainer, state)`.

Data order is a pure function of (seed, epoch, class): each class's images are drawn in the order
`np.random.default_rng([seed, epoch, stream]).permutation(size)` (stream = c for source class c,
1000 + c for target class c), `per_class` at a time, wrapping around. A checkpoint's step
therefore fixes the data of every later step, whatever the device count. A step's batch is laid
out as nexvitad_jax.train.step says (`StepLayout`: flat rows, padded to a multiple of the device
count). Multi-host: every process builds the whole batch and feeds its share of the rows
(`jax.make_array_from_process_local_data`).

The feature cache (`config.train.feature_cache`, opt-in): the frozen backbones' outputs for the
never-augmented images (every source image, the clean few-shot target images) are computed once,
held in host memory and fed to the steps and the pseudo-label passes instead of those images.
Augmentation is unchanged: it only ever applies to the consistency branch's target view, which
is drawn afresh each step and still goes through the backbones. The training is the same as
without the cache (equal up to float rounding); what it costs is host memory (the backbone
outputs of every source image; benchmarks/results/train_step.json has the paper backbones'
figure per image) and one backbone pass over them per run.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from nexvitad_jax.sharding import replicated, row_sharding
from nexvitad_jax.train.losses import IGNORE
from nexvitad_jax.train.step import StepLayout, TrainStep, batch_shardings, round_up

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


def place(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array laid out by `sharding` (replicated, or split along its rows) from the whole
    array, which every process holds: each process feeds its share. This is where data enters the
    training loop (which otherwise disallows transfers): with several processes, JAX places the
    shards by transfers it does not mark explicit, so they are allowed here."""
    with jax.transfer_guard_host_to_device("allow"):
        if sharding.is_fully_replicated:
            return jax.make_array_from_process_local_data(sharding, array)
        share = array.shape[0] // jax.process_count()
        begin = jax.process_index() * share
        return jax.make_array_from_process_local_data(sharding, array[begin:begin + share], array.shape)


def place_batch(batch: dict[str, Any], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """`place` for every array of a batch (`shardings`: per entry, e.g. `step.batch_shardings`)."""
    return jax.tree.map(lambda sharding, entry: jax.tree.map(functools.partial(place, sharding=sharding), entry),
                        shardings, batch)


def host_batch(layout: StepLayout, phase: int, inputs: str, source_masks: np.ndarray, source_inputs: Any,
               target: tuple[np.ndarray, Any, np.ndarray] | None = None) -> dict[str, Any]:
    """A step's batch on the host from per-class arrays: the source masks (C_s, m_s, H, W) and
    `inputs` ("images" (C_s, m_s, H, W, 3) uint8, or "features": a pytree of their backbone
    outputs); phase 2 adds `target` = (pseudo-labels (C_t, m_t, H, W), inputs as the source's,
    images (C_t, m_t, H, W, 3))."""
    labels, target_inputs, images = target if phase == 2 else (None, None, None)
    if phase == 2:
        flat_inputs = jax.tree.map(lambda s, t: layout.flat(phase, s, t, 0), source_inputs, target_inputs)
    else:
        flat_inputs = jax.tree.map(lambda s: layout.flat(phase, s, None, 0), source_inputs)
    batch = {inputs: flat_inputs, "labels": layout.flat(phase, np.asarray(source_masks, np.int32),
                                                        None if labels is None else np.asarray(labels, np.int32),
                                                        IGNORE)}
    return batch | ({"target_images": images.reshape(-1, *images.shape[2:])} if phase == 2 else {})


class TrainBatches:
    """`batch(step, phase, pseudo_labels)`: the global batch of a step (laid out as
    nexvitad_jax.train.step says); `target_set`: the input of the pseudo-label pass."""

    def __init__(self, config, source_data: list[tuple[np.ndarray, np.ndarray]], target_images: np.ndarray,
                 trainer: TrainStep, state, *, progress: bool = False):
        """`source_data`: (images, masks) per source class; `target_images`: (C_t, M, H, W, 3).
        The feature cache is on when `trainer` takes cached features (`trainer.feature_cache`); it
        is computed with `state`'s (frozen) backbones."""
        self.seed = int(config.seed)
        self.layout = trainer.layout
        self.steps_per_epoch = steps_per_epoch(config, source_data)
        self.mesh: Mesh = trainer.mesh
        self.inputs = trainer.inputs
        self.target_shape = target_images.shape
        # What a batch takes rows of: per class (a list over classes) an array or a pytree of
        # arrays. "inputs" become backbone outputs with the feature cache.
        self.source = {"masks": [masks for _, masks in source_data], "inputs": [images for images, _ in source_data]}
        self.target = {"images": list(target_images), "inputs": list(target_images)}
        self.target_set = {"target_images": self.replicate(target_images)}
        if trainer.feature_cache:
            self._cache_features(trainer, state, progress)

    def _cache_features(self, trainer: TrainStep, state, progress: bool) -> None:
        """The source and target images' inputs replaced by their backbone outputs."""
        images = self.source["inputs"] + self.target["inputs"]
        cache = _cache(images, lambda chunk: trainer.backbone_features(state, place(chunk, row_sharding(self.mesh))),
                       round_up(self.layout.per_source, self.mesh.size), progress)
        classes = len(self.source["masks"])
        self.source["inputs"], self.target["inputs"] = cache[:classes], cache[classes:]
        stacked = jax.tree.map(lambda *per_class: np.stack(per_class), *self.target["inputs"])
        self.target_set["target_features"] = jax.tree.map(self.replicate, stacked)

    def replicate(self, local: np.ndarray) -> jax.Array:
        """A global array replicated on every device, from the whole array every process holds (so
        multi-host jit and orbax accept it)."""
        return place(local, replicated(self.mesh))

    def unlabelled(self) -> jax.Array:
        """Pseudo-labels before the first refresh: every target pixel IGNORE (replicated)."""
        return self.replicate(np.full(self.target_shape[:4], IGNORE, np.int32))

    def images_in(self, phase: int) -> int:
        """Images a step of `phase` trains on (phase 2: each target image clean and augmented)."""
        return self.layout.n_source + (2 * self.layout.n_target if phase == 2 else 0)

    def batch(self, step: int, phase: int, pseudo_labels: np.ndarray) -> dict[str, jax.Array]:
        """The global batch of `step`: source masks and images (or their features); in phase 2 also
        the target images (and their features) with their current pseudo-labels (`pseudo_labels`:
        the host copy, (C_t, M, H, W))."""
        epoch, within = divmod(step, self.steps_per_epoch)
        per_source, per_target = self.layout.per_source, self.layout.per_target
        source_rows = [wrapping_slice(epoch_order(self.seed, epoch, c, len(masks)), within * per_source, per_source)
                       for c, masks in enumerate(self.source["masks"])]
        source = _rows(self.source, source_rows)
        target = None
        if phase == 2:
            classes, size = self.target_shape[:2]
            target_rows = [wrapping_slice(epoch_order(self.seed, epoch, TARGET_STREAM + c, size),
                                          within * per_target, per_target) for c in range(classes)]
            picked = _rows({**self.target, "labels": list(pseudo_labels)}, target_rows)
            target = (picked["labels"], picked["inputs"], picked["images"])
        batch = host_batch(self.layout, phase, self.inputs, source["masks"], source["inputs"], target)
        return place_batch(batch, batch_shardings(self.mesh, phase, self.inputs))


def _rows(arrays: dict[str, list[Any]], rows: list[np.ndarray]) -> dict[str, Any]:
    """Rows `rows[c]` of class c of each per-class list of arrays (or pytrees) -> (classes, n, ...)."""
    return {name: jax.tree.map(lambda *leaves: rows_per_class(leaves, rows), *per_class)
            for name, per_class in arrays.items()}


def _cache(per_class: list[np.ndarray], features_of: Callable[[np.ndarray], Any], chunk: int,
           progress: bool) -> list[Any]:
    """The feature cache: for each class's images (N_c, H, W, 3), their backbone outputs (a host numpy
    pytree, (N_c, ...)), computed `chunk` images at a time (`features_of`: (chunk, H, W, 3) -> the
    outputs, replicated; fetched explicitly)."""
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
                parts.append(jax.device_get(features_of(images[index])))
                if bar:
                    bar.update(min(chunk, len(images) - begin))
            cache.append(jax.tree.map(lambda *rows: np.concatenate(rows)[:len(images)], *parts))
        return cache
    finally:
        if bar:
            bar.close()
