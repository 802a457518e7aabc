"""NexViTAD shared-subspace encoder (paper section 3.1.1): frozen Hiera + adapters (eq. 1), frozen
DINOv2 resized and projected to each Hiera stage (eq. 2), channel-wise interleave (eq. 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.models.layers import gelu_exact

FEATURE_KINDS = ("interleaved", "hiera-adapted", "dino-projected")


class Adapter(nnx.Module):
    """Eq. 1: GELU(X W_down + b_down) W_up + b_up + X, bottleneck r = d / 4, exact GELU."""

    def __init__(self, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        bottleneck = max(dim // 4, 1)
        self.down = nnx.Linear(dim, bottleneck, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.up = nnx.Linear(bottleneck, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.up(gelu_exact(self.down(x))) + x


def resize_bilinear(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """NHWC bilinear resize with half-pixel centers and no antialiasing (torch's
    F.interpolate(mode='bilinear', align_corners=False)), as eq. 2's "bilinear interpolation"."""
    if tuple(x.shape[1:3]) == tuple(hw):
        return x
    return jax.image.resize(x, (x.shape[0], *hw, x.shape[-1]), method="bilinear", antialias=False)


def interleave_features(hiera: jax.Array, dino: jax.Array) -> jax.Array:
    """Eq. 3: channels alternate h_0, d_0, h_1, d_1, ... -> (..., 2 d)."""
    return jnp.stack([hiera, dino], axis=-1).reshape(*hiera.shape[:-1], 2 * hiera.shape[-1])


class Encoder(nnx.Module):
    """Frozen backbones (attributes `hiera`, `dinov2`) plus the trainable adapters and projections."""

    def __init__(self, hiera: nnx.Module, dinov2: nnx.Module, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.hiera = hiera
        self.dinov2 = dinov2
        self.stage_dims = tuple(int(d) for d in hiera.stage_dims)
        dino_dim = int(dinov2.config.hidden_size)
        self.adapters = nnx.List([Adapter(d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                  for d in self.stage_dims])
        self.projections = nnx.List([nnx.Linear(dino_dim, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                     for d in self.stage_dims])

    def backbone_features(self, images: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """Frozen backbone outputs for normalized images: (Hiera stage maps, DINOv2 patch grid).
        stop_gradient: the backbones are frozen, no gradient flows into them."""
        stages = self.hiera(images)
        dino_grid, _ = self.dinov2(images)
        return tuple(jax.lax.stop_gradient(s) for s in stages), jax.lax.stop_gradient(dino_grid)

    def from_backbone_features(self, stages, dino_grid, kind: str = "interleaved") -> tuple[jax.Array, ...]:
        """Adapters, projections and interleave on (cached or fresh) backbone features."""
        if kind not in FEATURE_KINDS:
            raise UserInputError(f"feature kind {kind!r}; expected one of {FEATURE_KINDS}")
        features = []
        for stage_map, adapter, projection in zip(stages, self.adapters, self.projections):
            adapted = adapter(stage_map)
            projected = projection(resize_bilinear(dino_grid, stage_map.shape[1:3]).astype(stage_map.dtype))
            features.append({"interleaved": lambda: interleave_features(adapted, projected),
                             "hiera-adapted": lambda: adapted, "dino-projected": lambda: projected}[kind]())
        return tuple(features)

    def __call__(self, images: jax.Array, kind: str = "interleaved") -> tuple[jax.Array, ...]:
        """Normalized images (B, H, W, 3) -> F_1..F_4, each (B, h_n, w_n, 2 d_n) for 'interleaved'."""
        return self.from_backbone_features(*self.backbone_features(images), kind=kind)
