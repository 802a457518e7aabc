"""The NexViTAD train step, jitted once over a device mesh with the batch sharded.

The model is split into three states: `trainable` (adapters, projections, heads: the only thing
differentiated and updated), `batch_stats` (BatchNorm running statistics) and `frozen` (the
backbones, passed in but never differentiated). Batches are laid out per class,
(classes, per_class, ...), and sharded along the per-class axis, so each head's BatchNorm
statistics span its class's images on every device (GSPMD reduces over the global batch).

A batch (nexvitad_jax.train.batches) holds "source_masks", "target_images" and "target_labels"
(phase 2), and the never-augmented images in one of two forms, fixed when the TrainStep is made:
- `feature_cache=False`: "source_images"; the step runs the backbones on the source images and
  the clean and augmented target images, in one pass;
- `feature_cache=True`: "source_features" and "target_features", the frozen backbones' outputs
  for the source and clean target images, computed once (`backbone_features`), each a
  (Hiera stage maps, DINOv2 grid) pytree laid out per class like the images. Only the
  consistency branch (eq. 7) sees augmented images, freshly drawn at every step, so the backbones
  still run on the augmented target view; the step computes what an uncached one does (equal up
  to float rounding).
The pseudo-label pass takes the target part of such a batch: "target_images" (+ "target_features").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from nexvitad_jax.compilation import fast_compile_options
from nexvitad_jax.models.nexvitad import TRAINABLE, NexViTAD, normalize
from nexvitad_jax.sharding import batch_sharding, replicated
from nexvitad_jax.train import augment as augment_lib
from nexvitad_jax.train.losses import IGNORE, consistency_mse, cross_entropy, pseudo_labels, total_loss


def make_optimizer(learning_rate: float, warmup_steps: int, total_steps: int) -> optax.GradientTransformation:
    """Adam with linear warmup then cosine decay to 0 (DESIGN.md schedule)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1),
                                                  max(total_steps, warmup_steps + 1), end_value=0.0)
    return optax.adam(schedule)


@dataclasses.dataclass(frozen=True)
class LossWeights:
    lambda1: float = 1.0  # eq. 8, target cross-entropy vs pseudo-labels
    lambda2: float = 1.0  # eq. 8, consistency MSE
    pseudo_label_head: float = 1.0  # the pseudo-label heads' cross-entropy on source ground truth


def _per_class(features, classes: int):
    return tuple(f.reshape(classes, -1, *f.shape[1:]) for f in features)


def _flat(x: jax.Array) -> jax.Array:
    """(classes, per_class, ...) -> (classes * per_class, ...)."""
    return x.reshape(-1, *x.shape[2:])


def _images(batch_images: jax.Array) -> jax.Array:
    """uint8 (classes, per_class, H, W, 3) -> flat float images in [0, 1]."""
    return _flat(batch_images).astype(jnp.float32) / 255.0


def run_backbones(model: NexViTAD, images: jax.Array):
    """Flat float images in [0, 1] -> the frozen backbones' outputs (Hiera stage maps, DINOv2 grid)."""
    return model.encoder.backbone_features(normalize(images).astype(model.dtype))


def features_from_images(model: NexViTAD, batch, sets: tuple[str, ...], augmented: jax.Array | None):
    """The flat backbone outputs of the batch's image sets ("source", "target": `{set}_images`), then
    of the `augmented` images, in one backbone pass (the uncached step)."""
    images = [_images(batch[f"{name}_images"]) for name in sets]
    return run_backbones(model, jnp.concatenate(images + ([] if augmented is None else [augmented]), axis=0))


def features_from_cache(model: NexViTAD, batch, sets: tuple[str, ...], augmented: jax.Array | None):
    """The same from the cache: the sets' backbone outputs are in the batch (`{set}_features`); the
    backbones run on the `augmented` images only."""
    parts = [jax.tree.map(_flat, batch[f"{name}_features"]) for name in sets]
    if augmented is not None:
        parts.append(run_backbones(model, augmented))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


class TrainStep:
    """Holds the graph and the frozen state; `init_state()` makes the train state, `__call__` steps."""

    def __init__(self, model: NexViTAD, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                 weights: LossWeights = LossWeights(), augmentation: dict[str, Any] | None = None,
                 feature_cache: bool = False, compiler_options: dict[str, Any] | None = None):
        """`feature_cache`: batches carry the backbone outputs of their never-augmented images (see
        the module docstring). `compiler_options`: XLA options of the step programs (e.g.
        `fast_compile_options()`)."""
        self.graphdef, trainable, batch_stats, frozen = nnx.split(model, TRAINABLE, nnx.BatchStat, ...)
        self.optimizer = optimizer
        self.mesh = mesh
        self.weights = weights
        self.augmentation = dict(augmentation or {})
        self.feature_cache = feature_cache
        self.clean_features = features_from_cache if feature_cache else features_from_images
        self.frozen = jax.device_put(frozen, replicated(mesh))
        self._initial = (trainable, batch_stats)
        state_sharding = replicated(mesh)
        data = batch_sharding(mesh)
        self._step = {
            phase: jax.jit(functools.partial(self._train_step, phase=phase),
                           in_shardings=(state_sharding, state_sharding, data), out_shardings=(state_sharding, state_sharding),
                           donate_argnums=(0,), compiler_options=compiler_options)
            for phase in (1, 2)}
        # The few-shot target set is small and every process holds all of it: replicated.
        self._pseudo_labels = jax.jit(self._pseudo_labels_fn, out_shardings=state_sharding,
                                      compiler_options=compiler_options)
        self._backbone_features = jax.jit(self._backbone_features_fn, in_shardings=(state_sharding, state_sharding, data),
                                          out_shardings=state_sharding, compiler_options=compiler_options)

    @classmethod
    def from_config(cls, config, model: NexViTAD, mesh: Mesh, total_steps: int) -> "TrainStep":
        """The train step of `config.train` (optimizer schedule over `total_steps`, loss weights,
        augmentation, feature cache, fast compilation)."""
        train = config.train
        return cls(model, make_optimizer(float(train.learning_rate), int(train.warmup_steps), total_steps), mesh,
                   weights=LossWeights(float(train.lambda1), float(train.lambda2)),
                   augmentation=train.augmentation.to_dict(), feature_cache=bool(train.feature_cache),
                   compiler_options=fast_compile_options() if train.fast_compile else None)

    def init_state(self, seed: int) -> dict[str, Any]:
        trainable, batch_stats = jax.device_put(self._initial, replicated(self.mesh))
        # One program for the optimizer state (eagerly, each leaf shape compiles its own zeros).
        opt_state = jax.jit(self.optimizer.init, out_shardings=replicated(self.mesh),
                            compiler_options=fast_compile_options())(trainable)
        rest = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(seed))}
        return {"trainable": trainable, "batch_stats": batch_stats, "opt_state": opt_state,
                **jax.device_put(rest, replicated(self.mesh))}

    def model(self, state: dict[str, Any]) -> NexViTAD:
        """The nnx model with the state's parameters and statistics in place."""
        return nnx.merge(self.graphdef, state["trainable"], state["batch_stats"], self.frozen)

    # -- device functions --------------------------------------------------------------------------
    def augmented_view(self, batch, rng) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Phase 2's augmented target images (flat, in [0, 1]) and the transforms that made them."""
        flat_target = _images(batch["target_images"])
        transforms = augment_lib.sample_transforms(rng, flat_target.shape[0], **self.augmentation)
        return augment_lib.augment(flat_target, transforms), transforms

    def step_features(self, model: NexViTAD, batch, rng, phase: int):
        """The backbone outputs of a step's images, flat: source, then (phase 2) clean and augmented
        target; and the augmentation's transforms (phase 2, else None)."""
        if phase == 1:
            return self.clean_features(model, batch, ("source",), None), None
        augmented, transforms = self.augmented_view(batch, rng)
        return self.clean_features(model, batch, ("source", "target"), augmented), transforms

    def _losses(self, trainable, batch_stats, frozen, backbone_features, batch, transforms, phase: int):
        """Eq. 8 (+ the pseudo-label heads' source loss) from the frozen backbones' outputs."""
        # Fresh Variable objects at this trace level (nnx refuses to mutate BatchStats made by the
        # enclosing jit trace from inside value_and_grad).
        batch_stats = jax.tree.map(lambda x: x, batch_stats)
        model = nnx.merge(self.graphdef, trainable, batch_stats, frozen)
        features = model.encoder.from_backbone_features(*backbone_features)
        num_source, per_source, *image_hw = batch["source_masks"].shape
        image_hw = tuple(image_hw)
        n_source = num_source * per_source
        source_features = _per_class(tuple(f[:n_source] for f in features), num_source)
        source_labels = batch["source_masks"].astype(jnp.int32)
        source_ce = cross_entropy(model.source_logits(source_features, image_hw, train=True), source_labels)
        # Pseudo-label heads learn defect segmentation from every source image (class-agnostic).
        pl_logits = model.pseudo_label_logits(tuple(f[:n_source] for f in features), image_hw, per_class_inputs=False)
        pl_ce = cross_entropy(pl_logits, jnp.broadcast_to(source_labels.reshape(-1, *image_hw), pl_logits.shape[:-1]))
        metrics = {"source_ce": source_ce, "pseudo_label_ce": pl_ce}
        loss = source_ce + self.weights.pseudo_label_head * pl_ce
        if phase == 2:
            target_loss, target_metrics = self._target_losses(model, features, n_source, batch, transforms, image_hw)
            loss = total_loss(loss, *target_loss, self.weights.lambda1, self.weights.lambda2)
            metrics |= target_metrics
        return loss, (metrics, nnx.state(model, nnx.BatchStat))

    @staticmethod
    def _target_losses(model: NexViTAD, features, first: int, batch, transforms, image_hw):
        """Eq. 8's target terms from the step's features (rows from `first` on: the clean, then the
        augmented target images): the cross-entropy against the pseudo-labels and the consistency
        MSE (eq. 7)."""
        num_target, per_target = batch["target_labels"].shape[:2]
        n_target = num_target * per_target
        # Clean and augmented target images go through their class's head in one call (one
        # BatchNorm batch): (C_t, 2 m, ...). Sliced from the whole features: slicing a slice
        # instead lets XLA fuse differently, which moves results by float rounding.
        target_features = tuple(
            jnp.concatenate([f[first:first + n_target].reshape(num_target, per_target, *f.shape[1:]),
                             f[first + n_target:].reshape(num_target, per_target, *f.shape[1:])], axis=1)
            for f in features)
        logits = model.target_logits(target_features, image_hw, train=True)
        clean_logits, augmented_logits = logits[:, :per_target], logits[:, per_target:]
        labels = batch["target_labels"]
        restored, inside = augment_lib.restore(augmented_logits.reshape(-1, *augmented_logits.shape[2:]), transforms)
        target_ce = cross_entropy(clean_logits, labels)
        target_mse = consistency_mse(restored, labels.reshape(-1, *image_hw), inside)
        metrics = {"target_ce": target_ce, "target_mse": target_mse, "labelled_fraction": jnp.mean(labels != IGNORE)}
        return (target_ce, target_mse), metrics

    def _train_step(self, state, frozen, batch, *, phase: int):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        # The frozen backbones run outside the differentiated function: no gradient computation
        # reaches them (their outputs are constants to value_and_grad).
        model = nnx.merge(self.graphdef, state["trainable"], state["batch_stats"], frozen)
        backbone_features, transforms = self.step_features(model, batch, rng, phase)
        grad_fn = jax.value_and_grad(self._losses, has_aux=True)
        (loss, (metrics, batch_stats)), grads = grad_fn(state["trainable"], state["batch_stats"], frozen,
                                                        backbone_features, batch, transforms, phase)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["trainable"])
        new_state = {"trainable": optax.apply_updates(state["trainable"], updates), "batch_stats": batch_stats,
                     "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, metrics | {"loss": loss}

    def _pseudo_labels_fn(self, state, frozen, target):
        """Eqs. 5-6 on the target set {"target_images": (C_t, m, H, W, 3) uint8 (+ "target_features",
        their cached backbone outputs)} -> labels (C_t, m, H, W), IGNORE below theta."""
        model = nnx.merge(self.graphdef, state["trainable"], state["batch_stats"], frozen)
        images = target["target_images"]
        features = model.encoder.from_backbone_features(*self.clean_features(model, target, ("target",), None))
        features = _per_class(features, images.shape[0])
        return pseudo_labels(model.pseudo_label_logits(features, images.shape[2:4], per_class_inputs=True))

    def _backbone_features_fn(self, state, frozen, images):
        """The frozen backbones' outputs for images (classes, per_class, H, W, 3) uint8, laid out the
        same way: (Hiera stage maps, DINOv2 grid)."""
        model = nnx.merge(self.graphdef, state["trainable"], state["batch_stats"], frozen)
        features = run_backbones(model, _images(images))
        return jax.tree.map(lambda f: f.reshape(*images.shape[:2], *f.shape[1:]), features)

    # -- host API ----------------------------------------------------------------------------------
    def __call__(self, state, batch: dict[str, Any], phase: int):
        return self._step[phase](state, self.frozen, batch)

    def pseudo_labels(self, state, target: dict[str, Any]) -> jax.Array:
        """Eqs. 5-6 on the target set (replicated; laid out as `_pseudo_labels_fn` says)."""
        return self._pseudo_labels(state, self.frozen, target)

    def backbone_features(self, state, images: jax.Array):
        """For the feature cache: images sharded like a batch (`batch_sharding`) -> their backbone
        outputs, replicated."""
        return self._backbone_features(state, self.frozen, images)
