"""The NexViTAD train step, jitted once over a device mesh of any size, the batch spread over it.

The model is split into three states: `trainable` (adapters, projections, heads: the only thing
differentiated and updated), `batch_stats` (BatchNorm running statistics) and `frozen` (the
backbones, passed in but never differentiated).

The batch (`StepLayout`, made by nexvitad_jax.train.batches) is flat: one example axis, sharded
over the mesh, holding the source images class by class, then (phase 2) the clean target images
and a slot per augmented view, then padding up to a multiple of the device count. The backbones
and adapters run on that axis. The heads are stacked per class (run one after another, or
vmapped: `model.head_batching`), so their inputs are gathered from it per class, (classes, rows
of the class padded to a multiple of the devices), sharded along the second axis. Padding is masked: it carries IGNORE labels (no
loss term) and the heads' BatchNorm statistics span the real examples only (`mask=`), so a step
computes what it computes on one device, whatever the device count (up to float rounding). The
padding is what spreading costs: up to devices - 1 examples in the backbones, and per class up
to devices - 1 in the heads (`StepLayout.padding`).

Batch entries ("images" or "features", "labels": flat rows; "target_images": phase 2, replicated):
- "labels" (R, H, W) int32: source ground truth, the clean target images' pseudo-labels, IGNORE
  on the augmented slots and the padding;
- "target_images" (C_t m, H, W, 3) uint8: the images the consistency branch (eq. 7) augments;
- `feature_cache=False`: "images" (R, H, W, 3) uint8; the step fills the augmented slots and runs
  the backbones on all rows in one pass;
- `feature_cache=True`: "features", the frozen backbones' outputs of the same rows (a (Hiera
  stage maps, DINOv2 grid) pytree), computed once (`backbone_features`). Only the augmented views
  are drawn afresh at every step, so the backbones still run on them; the step computes what an
  uncached one does (equal up to float rounding).
The pseudo-label pass takes the few-shot target set: "target_images" (C_t, M, H, W, 3) (+
"target_features", their cached backbone outputs), replicated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from nexvitad_jax.compilation import fast_compile_options
from nexvitad_jax.models.nexvitad import TRAINABLE, NexViTAD, normalize
from nexvitad_jax.sharding import batch_sharding, replicated, row_sharding
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


def round_up(count: int, multiple: int) -> int:
    return -(-count // multiple) * multiple


def _per_class_rows(rows: np.ndarray, devices: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (classes, n) -> (classes, n padded to a multiple of `devices`) row indices and whether
    each is an example; padding repeats the class's first row (finite values, masked)."""
    padded = np.concatenate([rows, np.repeat(rows[:, :1], round_up(rows.shape[1], devices) - rows.shape[1], 1)], 1)
    return padded.astype(np.int32), np.arange(padded.shape[1])[None, :].repeat(len(rows), 0) < rows.shape[1]


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """Where a step's examples sit on a mesh of `devices` (the module docstring has the scheme)."""
    source_classes: int
    per_source: int
    target_classes: int
    per_target: int
    devices: int

    @property
    def n_source(self) -> int:
        return self.source_classes * self.per_source

    @property
    def n_target(self) -> int:
        return self.target_classes * self.per_target

    def rows(self, phase: int) -> int:
        """The flat batch's rows: source, (phase 2) clean target, augmented slots, then padding."""
        return round_up(self.n_source + (2 * self.n_target if phase == 2 else 0), self.devices)

    def source_heads(self) -> tuple[np.ndarray, np.ndarray]:
        """The source heads' inputs: per class its rows, padded -> (row indices, is-example mask)."""
        return _per_class_rows(np.arange(self.n_source).reshape(self.source_classes, self.per_source), self.devices)

    def clean_target_rows(self) -> np.ndarray:
        """(C_t, m) rows of the clean target images."""
        return self.n_source + np.arange(self.n_target).reshape(self.target_classes, self.per_target)

    def target_heads(self) -> tuple[np.ndarray, np.ndarray]:
        """The target heads' inputs: per class its clean then augmented rows (one BatchNorm batch)."""
        clean = self.clean_target_rows()
        return _per_class_rows(np.concatenate([clean, clean + self.n_target], axis=1), self.devices)

    def flat(self, phase: int, source: np.ndarray, target: np.ndarray | None, fill) -> np.ndarray:
        """Host arrays per class, source (C_s, m_s, ...) and target (C_t, m_t, ...) -> the flat rows
        of a step; `fill` on the augmented slots and the padding."""
        parts = [source.reshape(-1, *source.shape[2:])]
        if phase == 2:
            clean = target.reshape(-1, *target.shape[2:])
            parts += [clean, np.full_like(clean, fill)]
        used = sum(map(len, parts))
        return np.concatenate(parts + [np.full((self.rows(phase) - used, *parts[0].shape[1:]), fill, parts[0].dtype)])

    def padding(self, phase: int) -> str | None:
        """What spreading a step over the devices pads, in words (None when nothing is padded)."""
        examples = self.n_source + (2 * self.n_target if phase == 2 else 0)
        per_class = [(self.per_source, "source")] + ([(2 * self.per_target, "target")] if phase == 2 else [])
        padded_heads = [f"{name} heads {count} -> {round_up(count, self.devices)} rows per class"
                        for count, name in per_class if count % self.devices]
        if examples == self.rows(phase) and not padded_heads:
            return None
        return (f"phase {phase}: {examples} examples per step over {self.devices} devices: backbones "
                f"{examples} -> {self.rows(phase)} rows" + "".join(f", {text}" for text in padded_heads))


def batch_shardings(mesh: Mesh, phase: int, inputs: str) -> dict[str, Any]:
    """How a step's batch lies on the mesh (`inputs`: "images" or "features")."""
    shardings = {inputs: row_sharding(mesh), "labels": row_sharding(mesh)}
    return shardings | ({"target_images": replicated(mesh)} if phase == 2 else {})


def _flat(x: jax.Array) -> jax.Array:
    """(classes, per_class, ...) -> (classes * per_class, ...)."""
    return x.reshape(-1, *x.shape[2:])


def _images(images: jax.Array) -> jax.Array:
    """uint8 images -> float images in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def run_backbones(model: NexViTAD, images: jax.Array):
    """Flat float images in [0, 1] -> the frozen backbones' outputs (Hiera stage maps, DINOv2 grid)."""
    return model.encoder.backbone_features(normalize(images).astype(model.dtype))


class TrainStep:
    """Holds the graph and the frozen state; `init_state()` makes the train state, `__call__` steps."""

    def __init__(self, model: NexViTAD, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                 source_per_class: int, target_per_class: int, weights: LossWeights = LossWeights(),
                 augmentation: dict[str, Any] | None = None, feature_cache: bool = False,
                 compiler_options: dict[str, Any] | None = None):
        """`source_per_class`, `target_per_class`: each class's images in a step (the global batch,
        any size on any mesh). `feature_cache`: batches carry the backbone outputs of their
        never-augmented images (see the module docstring). `compiler_options`: XLA options of the
        step programs (e.g. `fast_compile_options()`)."""
        self.graphdef, trainable, batch_stats, frozen = nnx.split(model, TRAINABLE, nnx.BatchStat, ...)
        self.optimizer = optimizer
        self.mesh = mesh
        self.layout = StepLayout(model.num_source, int(source_per_class), model.num_target, int(target_per_class),
                                 mesh.size)
        self.weights = weights
        self.augmentation = dict(augmentation or {})
        self.feature_cache = feature_cache
        self.inputs = "features" if feature_cache else "images"  # the batch entry the backbones' rows come in
        self.frozen = jax.device_put(frozen, replicated(mesh))
        self._initial = (trainable, batch_stats)
        state_sharding = replicated(mesh)
        self._step = {
            phase: jax.jit(functools.partial(self._train_step, phase=phase),
                           in_shardings=(state_sharding, state_sharding, batch_shardings(mesh, phase, self.inputs)),
                           out_shardings=(state_sharding, state_sharding), donate_argnums=(0,),
                           compiler_options=compiler_options)
            for phase in (1, 2)}
        # The few-shot target set is small and every process holds all of it: replicated.
        self._pseudo_labels = jax.jit(self._pseudo_labels_fn, out_shardings=state_sharding,
                                      compiler_options=compiler_options)
        self._backbone_features = jax.jit(self._backbone_features_fn,
                                          in_shardings=(state_sharding, state_sharding, row_sharding(mesh)),
                                          out_shardings=state_sharding, compiler_options=compiler_options)

    @classmethod
    def from_config(cls, config, model: NexViTAD, mesh: Mesh, total_steps: int) -> "TrainStep":
        """The train step of `config.train` (batch, optimizer schedule over `total_steps`, loss
        weights, augmentation, feature cache, fast compilation)."""
        train = config.train
        return cls(model, make_optimizer(float(train.learning_rate), int(train.warmup_steps), total_steps), mesh,
                   source_per_class=int(train.source_per_class), target_per_class=int(train.target_per_class),
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
        target = _images(batch["target_images"])
        transforms = augment_lib.sample_transforms(rng, target.shape[0], **self.augmentation)
        return augment_lib.augment(target, transforms), transforms

    def step_features(self, model: NexViTAD, batch, rng, phase: int):
        """The backbone outputs of the step's flat rows (phase 2: the augmented views in their
        slots), and the augmentation's transforms (phase 2, else None)."""
        augmented, transforms = self.augmented_view(batch, rng) if phase == 2 else (None, None)
        slots = self.layout.n_source + self.layout.n_target  # the first augmented slot
        rows = functools.partial(jax.lax.with_sharding_constraint, shardings=row_sharding(self.mesh))
        if not self.feature_cache:
            images = _images(batch["images"])
            if augmented is not None:
                images = jax.lax.dynamic_update_slice_in_dim(images, augmented, slots, axis=0)
            return run_backbones(model, rows(images)), transforms
        features = batch["features"]
        if augmented is not None:  # the backbones run on the augmented views alone, spread like a batch
            count = augmented.shape[0]
            views = run_backbones(model, rows(jnp.pad(augmented, [(0, round_up(count, self.mesh.size) - count)]
                                                      + [(0, 0)] * 3)))
            features = jax.tree.map(lambda f, view: rows(jax.lax.dynamic_update_slice_in_dim(
                f, view[:count].astype(f.dtype), slots, axis=0)), features, views)
        return features, transforms

    def _per_class(self, features: tuple[jax.Array, ...], rows: np.ndarray) -> tuple[jax.Array, ...]:
        """The heads' inputs: flat features -> (classes, padded rows, ...) at `rows`, spread along
        the second axis."""
        # XLA's partitioners do not split the grouped convolutions the vmapped heads become along
        # the batch: they gather the inputs and run the heads whole on every device (the backbones
        # stay spread). Heads scanned instead of vmapped (jax.lax.map) would stay spread.
        return tuple(jax.lax.with_sharding_constraint(f[rows], batch_sharding(self.mesh)) for f in features)

    def _losses(self, trainable, batch_stats, frozen, backbone_features, batch, transforms, phase: int):
        """Eq. 8 (+ the pseudo-label heads' source loss) from the frozen backbones' outputs."""
        # Fresh Variable objects at this trace level (nnx refuses to mutate BatchStats made by the
        # enclosing jit trace from inside value_and_grad).
        batch_stats = jax.tree.map(lambda x: x, batch_stats)
        model = nnx.merge(self.graphdef, trainable, batch_stats, frozen)
        features = model.encoder.from_backbone_features(*backbone_features)
        labels = batch["labels"]
        image_hw = tuple(labels.shape[1:])
        rows, mask = self.layout.source_heads()
        source_logits = model.source_logits(self._per_class(features, rows), image_hw, train=True, mask=mask)
        source_ce = cross_entropy(source_logits, jnp.where(mask[..., None, None], labels[rows], IGNORE))
        # Pseudo-label heads learn defect segmentation from every source image (class-agnostic);
        # they run on every row, labelled on the source rows only.
        pl_logits = model.pseudo_label_logits(features, image_hw, per_class_inputs=False)
        is_source = (np.arange(labels.shape[0]) < self.layout.n_source)[:, None, None]
        pl_ce = cross_entropy(pl_logits, jnp.broadcast_to(jnp.where(is_source, labels, IGNORE), pl_logits.shape[:-1]))
        metrics = {"source_ce": source_ce, "pseudo_label_ce": pl_ce}
        loss = source_ce + self.weights.pseudo_label_head * pl_ce
        if phase == 2:
            target_loss, target_metrics = self._target_losses(model, features, labels, transforms, image_hw)
            loss = total_loss(loss, *target_loss, self.weights.lambda1, self.weights.lambda2)
            metrics |= target_metrics
        return loss, (metrics, nnx.state(model, nnx.BatchStat))

    def _target_losses(self, model: NexViTAD, features, labels: jax.Array, transforms, image_hw):
        """Eq. 8's target terms: the cross-entropy of the clean images against their pseudo-labels
        and the consistency MSE (eq. 7) of the augmented views mapped back. A class's clean and
        augmented images go through its head in one call (one BatchNorm batch)."""
        rows, mask = self.layout.target_heads()
        logits = model.target_logits(self._per_class(features, rows), image_hw, train=True, mask=mask)
        per_target = self.layout.per_target
        clean_logits, augmented_logits = logits[:, :per_target], logits[:, per_target:2 * per_target]
        target_labels = labels[self.layout.clean_target_rows()]
        restored, inside = augment_lib.restore(_flat(augmented_logits), transforms)
        target_ce = cross_entropy(clean_logits, target_labels)
        target_mse = consistency_mse(restored, _flat(target_labels), inside)
        metrics = {"target_ce": target_ce, "target_mse": target_mse,
                   "labelled_fraction": jnp.mean(target_labels != IGNORE)}
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
        if self.feature_cache:
            backbone = jax.tree.map(_flat, target["target_features"])
        else:
            backbone = run_backbones(model, _images(_flat(images)))
        features = tuple(f.reshape(images.shape[0], -1, *f.shape[1:])
                         for f in model.encoder.from_backbone_features(*backbone))
        return pseudo_labels(model.pseudo_label_logits(features, images.shape[2:4], per_class_inputs=True))

    def _backbone_features_fn(self, state, frozen, images):
        """The frozen backbones' outputs for flat uint8 images: (Hiera stage maps, DINOv2 grid)."""
        model = nnx.merge(self.graphdef, state["trainable"], state["batch_stats"], frozen)
        return run_backbones(model, _images(images))

    # -- host API ----------------------------------------------------------------------------------
    def __call__(self, state, batch: dict[str, Any], phase: int):
        return self._step[phase](state, self.frozen, batch)

    def pseudo_labels(self, state, target: dict[str, Any]) -> jax.Array:
        """Eqs. 5-6 on the target set (replicated; laid out as `_pseudo_labels_fn` says)."""
        return self._pseudo_labels(state, self.frozen, target)

    def backbone_features(self, state, images: jax.Array):
        """For the feature cache: flat images spread over the mesh (`row_sharding`, a multiple of
        the device count) -> their backbone outputs, replicated."""
        return self._backbone_features(state, self.frozen, images)
