"""INP-Former few-shot: train on a class's N normal images (jitted steps over the data mesh, AdamW,
resumable through `nexvitad_jax.train.checkpoints`), then score test images in sharded batches.

Each step draws `batch_size` of the N images (with replacement, by step), augments them on device
(flip, 90-degree rotation, scaling, noise: `nexvitad_jax.train.augment`, in the spirit of the
RegAD-style augmentation the paper uses for few-shot) and takes one AdamW step on
L = L_sm + lambda L_c (eqs. 2/3, 5, 6). With `residual_head` (INP-Former++), the same step
synthesizes pseudo anomalies on the augmented batch and takes one AdamW step of the segmentation
head alone on the Dice loss of their stop-gradiented feature residuals (eqs. 7-8; the paper's
decoupled training: a separate optimizer, so neither clipping nor gradients mix the two). The
frozen DINOv2's weights are an argument of the step, never part of the trained state.
"""

from __future__ import annotations

import functools

import numpy as np
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference.anomaly_maps import gaussian_blur, upsample_bilinear
from nexvitad_jax.inference.batching import global_batch_size, map_batches, place_rows, replicate
from nexvitad_jax.peers import inp_former as inp
from nexvitad_jax.peers import residual as res
from nexvitad_jax.peers.encoder import DinoPatchEncoder


@functools.lru_cache(maxsize=None)
def adamw(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW; one object per setting, so optimizers of equal settings have
    equal graphs and share the compiled train step."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, weight_decay=weight_decay))


class INPFormerDetector:
    """fit(normal images, workdir) trains (resuming from workdir's checkpoints); predict(images) ->
    (maps (B, H, W), image scores (B,): the mean of the top 1% of each map)."""

    def __init__(self, encoder: DinoPatchEncoder, options: inp.INPFormerOptions = inp.INPFormerOptions(), *,
                 seed: int = 0):
        if options.coherence not in ("hard", "soft"):
            raise UserInputError(f"INP-Former coherence {options.coherence!r}: expected 'hard' (eq. 2) or 'soft' (eq. 3)")
        config = encoder.dino_config
        self.groups = inp.encoder_layer_groups(config.num_hidden_layers)
        if options.decoder_layers % len(self.groups):
            raise UserInputError(f"INP-Former: {options.decoder_layers} decoder layers do not split into "
                                 f"{len(self.groups)} groups")
        self.layers = tuple(layer for group in self.groups for layer in group)
        self.encoder, self.options, self.mesh, self.seed = encoder, options, encoder.mesh, int(seed)
        heads = options.heads or config.num_attention_heads
        self.model = inp.INPFormer(config.hidden_size, heads, options, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
        self.optimizer = nnx.Optimizer(self.model, adamw(options.learning_rate, options.weight_decay), wrt=nnx.Param)
        self.head = self.head_optimizer = None
        if options.residual_head:
            self.head = res.ResidualHead(config.hidden_size, rngs=nnx.Rngs(params=seed + 2))
            self.head_optimizer = nnx.Optimizer(self.head, adamw(options.learning_rate, options.weight_decay),
                                                wrt=nnx.Param)
        self.losses: list[float] = []  # L_sm + lambda L_c per step
        self.segmentation_losses: list[float] = []  # eq. 8's Dice loss per step (residual_head)

    def _statics(self) -> tuple:
        """The static arguments of the jitted functions: only what changes the program (not the
        step count), so detectors of one encoder and loss share their compilations."""
        options = self.options
        return self.encoder, (options.coherence, options.gamma, options.coherence_weight, options.sigma,
                              options.map_l2), self.groups

    def _trained(self) -> tuple:
        """What the train step updates: (model, optimizer) and, with the residual head, (head, its optimizer)."""
        if self.head is None:
            return self.model, self.optimizer
        return self.model, self.optimizer, self.head, self.head_optimizer

    def _scorers(self) -> tuple:
        return (self.model,) if self.head is None else (self.model, self.head)

    def fit(self, normal_images, workdir=None, progress: bool = False) -> INPFormerDetector:
        """Train `options.steps` steps on the normal images (N, H, W, 3) in [0, 1]; with `workdir`,
        resume from and save resumable checkpoints there."""
        from tqdm.auto import tqdm

        images = np.asarray(normal_images, np.float32)
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2] or not len(images):
            raise UserInputError(f"INP-Former: expected square normal images (N, S, S, 3) in [0, 1], got {images.shape}")
        state, start, checkpoints = self.encoder.state, 0, None
        for part in self._trained():
            nnx.update(part, replicate(nnx.state(part), self.mesh))
        if workdir is not None:
            from nexvitad_jax.train.checkpoints import Checkpoints

            checkpoints = Checkpoints(workdir, every_steps=self.options.checkpoint_every)
            start = self._restore(checkpoints)
        width = global_batch_size(self.options.batch_size, self.mesh)
        self.model.train()
        for step in tqdm(range(start, self.options.steps), desc="INP-Former", disable=not progress, leave=False):
            rows = np.random.default_rng([self.seed, step]).integers(0, len(images), width)
            batch = place_rows(images, rows, self.mesh)
            key = jax.random.fold_in(jax.random.key(self.seed), step)
            graph, trained = nnx.split(self._trained())
            losses, trained = train_step(graph, trained, state, batch, key, *self._statics())
            nnx.update(self._trained(), trained)
            self._record(np.asarray(losses))
            if checkpoints is not None and (checkpoints.due(step + 1) or step + 1 == self.options.steps):
                metadata = {"losses": self.losses, "segmentation_losses": self.segmentation_losses}
                checkpoints.save(step + 1, self._train_state(), np.zeros(1, np.float32), metadata,
                                 force=step + 1 == self.options.steps)
        if checkpoints is not None:
            checkpoints.close()
        self.model.eval()
        return self

    def _record(self, losses: np.ndarray) -> None:
        self.losses.append(float(losses[0]))
        if self.head is not None:
            self.segmentation_losses.append(float(losses[1]))

    def _train_state(self):
        """What a checkpoint holds: the weights, the dropout streams' counters (their keys are fixed
        by the seed) and the optimizer state (and the residual head's weights and optimizer)."""
        saved = {"model": nnx.state(self.model, nnx.Any(nnx.Param, nnx.RngCount)), "optimizer": nnx.state(self.optimizer)}
        if self.head is not None:
            saved.update(head=nnx.state(self.head, nnx.Param), head_optimizer=nnx.state(self.head_optimizer))
        return saved

    def _restore(self, checkpoints) -> int:
        latest = checkpoints.latest_step()
        if latest is None:
            return 0
        state, _, metadata = checkpoints.restore(latest, self._train_state(), np.zeros(1, np.float32))
        nnx.update(self.model, state["model"])
        nnx.update(self.optimizer, state["optimizer"])
        if self.head is not None:
            nnx.update(self.head, state["head"])
            nnx.update(self.head_optimizer, state["head_optimizer"])
        self.losses = list(metadata.get("losses", []))
        self.segmentation_losses = list(metadata.get("segmentation_losses", []))
        return int(latest)

    def predict(self, images, progress=None) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] != 3 or not len(images):
            raise UserInputError(f"INP-Former: expected images (B, H, W, 3) in [0, 1], got shape {images.shape}")
        self.model.eval()
        state, size = self.encoder.state, tuple(images.shape[1:3])
        graph, weights = nnx.split(self._scorers())
        return map_batches(lambda batch: score_batch(graph, weights, state, batch, *self._statics(), size), images,
                           self.options.batch_size, self.mesh, progress=progress)


# The jitted functions take the encoder (hashed by identity), the options and the layer groups as
# static arguments, so detectors that share them share one compiled program.


def _layers(encoder, state, images, groups):
    return encoder.encode_layers(state, images, tuple(layer for group in groups for layer in group))


def _loss(model, state, images, *, encoder, options, groups):
    layers = _layers(encoder, state, images, groups)
    prototypes, outputs = model(layers)
    targets, decoded = inp.group_means(layers, len(groups)), inp.group_means(outputs, len(groups))
    coherence_kind, gamma, coherence_weight = options[:3]
    coherence = inp.coherence_loss(jnp.sum(layers, axis=0), prototypes, coherence_kind)
    return inp.soft_mining_loss(targets, decoded, gamma) + coherence_weight * coherence


def _segmentation_loss(head, model, state, images, key, *, encoder, groups):
    """Eq. 8 on pseudo anomalies of `images`: the model (in eval mode: no dropout, as at test time)
    gives their stop-gradiented feature residuals (eq. 7), the head its mask."""
    anomalous, masks = res.pseudo_anomalies(key, images)
    model.eval()
    layers = _layers(encoder, state, anomalous, groups)
    _, outputs = model(layers)
    model.train()
    residual = res.feature_residual(inp.group_means(layers, len(groups)), inp.group_means(outputs, len(groups)))
    predicted = res.predicted_mask(head, jax.lax.stop_gradient(residual), encoder.grid, tuple(images.shape[1:3]))
    return res.dice_loss(predicted, masks)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7), donate_argnums=(1,))
def train_step(graph, trained, state, images, key, encoder, options, groups):
    """One AdamW step on L = L_sm + lambda L_c (eq. 6) over an augmented batch and, with the
    residual head, one of the head on eq. 8 over pseudo anomalies of that batch: (the losses (1 or
    2,), the new state). Pure in the split state, so detectors of one structure share it."""
    from nexvitad_jax.train.augment import augment, sample_transforms

    parts = nnx.merge(graph, trained)
    model, optimizer = parts[:2]
    images = augment(images, sample_transforms(key, images.shape[0]))
    anomaly_key = jax.random.fold_in(key, 1)
    losses = []
    if len(parts) == 4:  # the residual head: trained on the model before this step's update
        head, head_optimizer = parts[2:]
        segmentation_of = functools.partial(_segmentation_loss, encoder=encoder, groups=groups)
        segmentation, head_grads = nnx.value_and_grad(segmentation_of)(head, model, state, images, anomaly_key)
        head_optimizer.update(head, head_grads)
        losses.append(segmentation)
    loss_of = functools.partial(_loss, encoder=encoder, options=options, groups=groups)
    loss, grads = nnx.value_and_grad(loss_of)(model, state, images)
    optimizer.update(model, grads)
    return jnp.stack([loss, *losses]), nnx.state(parts)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def score_batch(graph, weights, state, images, encoder, options, groups, size):
    """(maps (B, H, W), image scores (B,)): the reconstruction error map (eq. 9's with its L2 term
    when options say so), upsampled, averaged with the residual head's mask where there is one
    (eq. 9), smoothed, and the mean of its top 1%."""
    parts = nnx.merge(graph, weights)
    layers = _layers(encoder, state, images, groups)
    _, outputs = parts[0](layers)
    targets, decoded = inp.group_means(layers, len(groups)), inp.group_means(outputs, len(groups))
    error = res.reconstruction_map_l2 if options[4] else inp.reconstruction_map
    maps = upsample_bilinear(error(targets, decoded).reshape(-1, encoder.grid, encoder.grid), size)
    if len(parts) == 2:
        maps = 0.5 * (maps + res.predicted_mask(parts[1], res.feature_residual(targets, decoded), encoder.grid, size))
    maps = gaussian_blur(maps, options[3])
    flat = maps.reshape(maps.shape[0], -1)
    return maps, jnp.mean(jax.lax.top_k(flat, max(1, int(0.01 * flat.shape[-1])))[0], axis=-1)
