"""The NexViTAD model: encoder (frozen Hiera + DINOv2, adapters, projections, interleave) and the
multi-task decoder: C_s source segmentation heads (or one shared head, the MTL ablation), and per
target class a segmentation head and a pseudo-label head (paper section 3.1)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nexvitad_jax.models.decoder import PseudoLabelHead, SegmentationHead, StackedHeads
from nexvitad_jax.models.encoder import Encoder

# Variables under these attribute names belong to the frozen backbones.
FROZEN = nnx.Any(nnx.PathContains("hiera"), nnx.PathContains("dinov2"))
# What the optimizer updates: adapters, projections and heads.
TRAINABLE = nnx.All(nnx.Param, nnx.Not(FROZEN))


def normalize(images: jax.Array) -> jax.Array:
    from nexvitad_jax.models import normalize_images  # the package __init__ imports this module's peers

    return normalize_images(images.astype(jnp.float32))


class NexViTAD(nnx.Module):
    """Call signatures take images in [0, 1], NHWC; ImageNet normalization happens inside."""

    def __init__(self, hiera: nnx.Module, dinov2: nnx.Module, num_source: int, num_target: int, *,
                 shared_source_head: bool = False, decoder_channels: tuple[int, ...] = (256, 128, 64),
                 upconv: str = "width", pseudo_label_hidden: tuple[int, ...] = (64, 32),
                 head_batching: str = "unrolled", dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_source = num_source
        self.num_target = num_target
        self.shared_source_head = shared_source_head
        self.dtype = dtype
        self.encoder = Encoder(hiera, dinov2, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        feature_dims = tuple(2 * d for d in self.encoder.stage_dims)
        make_segmentation = functools.partial(SegmentationHead, feature_dims, tuple(decoder_channels), upconv=upconv,
                                              dtype=dtype, param_dtype=param_dtype)
        make_pseudo_label = functools.partial(PseudoLabelHead, feature_dims[2], tuple(pseudo_label_hidden),
                                              dtype=dtype, param_dtype=param_dtype)
        stack = functools.partial(StackedHeads, batching=head_batching, rngs=rngs)
        self.source_heads = stack(1 if shared_source_head else num_source, lambda r: make_segmentation(rngs=r))
        self.target_heads = stack(num_target, lambda r: make_segmentation(rngs=r))
        self.pseudo_label_heads = stack(num_target, lambda r: make_pseudo_label(rngs=r))

    # -- encoder ---------------------------------------------------------------------------------
    def encode(self, images: jax.Array, kind: str = "interleaved") -> tuple[jax.Array, ...]:
        """Images (B, H, W, 3) in [0, 1] -> features per layer F_1..F_4 (the memory bank's input)."""
        return self.encoder(normalize(images).astype(self.dtype), kind=kind)

    # -- decoder ---------------------------------------------------------------------------------
    def source_logits(self, features, image_hw, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """features: per layer (C_s, b, h, w, c) -> logits (C_s, b, H, W, 2), head s on class s.
        `mask` (C_s, b): the examples BatchNorm's statistics span (None: all; the rest is padding)."""
        if self.shared_source_head:
            classes, batch = features[0].shape[:2]
            merged = tuple(f.reshape(1, classes * batch, *f.shape[2:]) for f in features)
            logits = self.source_heads(merged, image_hw, train, mask=None if mask is None else mask.reshape(1, -1))
            return logits.reshape(classes, batch, *logits.shape[2:])
        return self.source_heads(features, image_hw, train, mask=mask)

    def target_logits(self, features, image_hw, train: bool, mask: jax.Array | None = None) -> jax.Array:
        """features: per layer (C_t, b, h, w, c) -> segmentation logits (C_t, b, H, W, 2); `mask`
        (C_t, b) as for `source_logits`."""
        return self.target_heads(features, image_hw, train, mask=mask)

    def pseudo_label_logits(self, features, image_hw, per_class_inputs: bool = True) -> jax.Array:
        """F_3 of (C_t, b, ...) (per_class_inputs) or of (b, ...) given to every head -> (C_t, b, H, W, 2)."""
        return self.pseudo_label_heads(features[2], image_hw, per_head_inputs=per_class_inputs)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, ...]:
        return self.encode(images)
