"""Hiera (Ryali et al. 2023) as a pure Flax NNX module, numerically matching `transformers.HieraModel`.

NexViTAD's main encoder (the paper's section 3.1, d_hiera = [256, 512, 1024, 2048] is Hiera-Huge).
The forward pass follows transformers' modeling_hiera.py step by step:

- patch embedding: a 7x7 stride-4 conv, plus learned absolute position embeddings (bicubically
  interpolated with PyTorch's kernel when the input size differs from `config.image_size`);
- unroll: tokens are reordered so the query-stride offsets are the slowest axes; query pooling
  (a 2x2 max pool) is then a max over the leading token block, and a mask unit is a strided set of
  tokens (token t*num_windows + w belongs to window w);
- per stage: the first layer changes width (`proj` on the normed input, max-pooled) and pools the
  queries; the remaining layers are identical in shape: stacked parameters run by one `lax.scan`;
- reroll: the stage outputs are put back into row-major spatial order (the inverse permutation of
  that stage's unroll), giving HF's `reshaped_hidden_states[1:]` in NHWC;
- pooler: mean over tokens, then LayerNorm.

`Hiera(config, dtype=jnp.bfloat16)` computes in bf16 (attention logits, softmax and GELU in float32)
with float32 or bf16 parameters (`param_dtype`); attention runs through `jax.nn.dot_product_attention`
(layers.dot_product_attention: cuDNN's fused kernel in bf16 on an NVIDIA GPU, XLA elsewhere).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.models.layers import (ACTIVATIONS, config_from_dict, dot_product_attention,
                                       resize_position_embeddings)


@dataclasses.dataclass(frozen=True)
class HieraConfig:
    """The HF `HieraConfig` fields that determine the encoder (defaults: hiera-base-224)."""

    embed_dim: int = 96
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (7, 7)
    patch_stride: tuple[int, int] = (4, 4)
    patch_padding: tuple[int, int] = (3, 3)
    mlp_ratio: float = 4.0
    depths: tuple[int, ...] = (2, 3, 16, 3)
    num_heads: tuple[int, ...] = (1, 2, 4, 8)
    embed_dim_multiplier: float = 2.0
    num_query_pool: int = 3
    query_stride: tuple[int, int] = (2, 2)
    masked_unit_size: tuple[int, int] = (8, 8)
    masked_unit_attention: tuple[bool, ...] = (True, True, False, False)
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("image_size", "patch_size", "patch_stride", "patch_padding", "depths",
                     "num_heads", "query_stride", "masked_unit_size", "masked_unit_attention"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise UserInputError(f"Hiera config: {name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        num_stages = len(self.depths)
        for name in ("image_size", "patch_size", "patch_stride", "patch_padding", "query_stride",
                     "masked_unit_size"):
            if len(getattr(self, name)) != 2:
                raise UserInputError(
                    f"Hiera config: {name} must have 2 entries (height, width), got {getattr(self, name)}")
        if len(self.num_heads) != num_stages or len(self.masked_unit_attention) != num_stages:
            raise UserInputError(
                f"Hiera config: depths {self.depths}, num_heads {self.num_heads} and "
                f"masked_unit_attention {self.masked_unit_attention} must have one entry per stage")
        if not 0 <= self.num_query_pool < num_stages:
            raise UserInputError(
                f"Hiera config: num_query_pool must be in [0, {num_stages - 1}], got {self.num_query_pool}")
        if self.hidden_act not in ACTIVATIONS:
            raise UserInputError(
                f"Hiera config: hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        for stage, (dim, heads) in enumerate(zip(self.stage_dims, self.num_heads)):
            if dim % heads:
                raise UserInputError(
                    f"Hiera config: stage {stage} width {dim} is not divisible by num_heads {heads}")
        unroll_factor = [q ** (num_stages - 1) for q in self.query_stride]
        if any(m % u for m, u in zip(self.masked_unit_size, unroll_factor)):
            raise UserInputError(
                f"Hiera config: masked_unit_size {self.masked_unit_size} must be divisible by "
                f"query_stride ** {num_stages - 1} = {unroll_factor}")

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return tuple(int(self.embed_dim * self.embed_dim_multiplier ** i) for i in range(len(self.depths)))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> HieraConfig:
        return config_from_dict(cls, values, "Hiera config")


def from_hf_config(hf_config: dict[str, Any]) -> HieraConfig:
    """The fields of a transformers `HieraConfig.to_dict()` (or config.json) that the encoder uses."""
    if hf_config.get("model_type", "hiera") != "hiera":
        raise UserInputError(f"expected a Hiera config (model_type 'hiera'), got model_type "
                             f"{hf_config.get('model_type')!r}")
    if hf_config.get("use_separate_position_embedding"):
        raise UserInputError("this Hiera config uses separate spatial and temporal position embeddings "
                             "(a video model); only the image models are supported")
    known = {f.name for f in dataclasses.fields(HieraConfig)}
    return HieraConfig(**{k: v for k, v in hf_config.items() if k in known})


# The HF hub checkpoints facebook/hiera-{variant}-224-hf (transformers' convert_hiera_to_hf.py).
VARIANTS: dict[str, HieraConfig] = {
    "tiny": HieraConfig(depths=(1, 2, 7, 2)),
    "small": HieraConfig(depths=(1, 2, 11, 2)),
    "base": HieraConfig(),
    "base-plus": HieraConfig(embed_dim=112, num_heads=(2, 4, 8, 16)),
    "large": HieraConfig(embed_dim=144, num_heads=(2, 4, 8, 16), depths=(2, 6, 36, 4)),
    "huge": HieraConfig(embed_dim=256, num_heads=(4, 8, 16, 32), depths=(2, 6, 36, 4)),
}


# ----------------------------------------------------------------------------------------------
# Token orderings (static, computed in numpy at trace time).

def unroll(x, schedule: tuple[tuple[int, int], ...]):
    """(B, H, W, C) -> (B, H*W, C) in HF's unrolled token order (numpy or jax arrays).

    Each stride (sy, sx) of the schedule moves the offsets inside an sy x sx cell in front of the
    remaining grid, so the order is (s1y, s1x, s2y, s2x, ..., h, w): with y = h * prod(s) + ... +
    s2_offset * s1y + s1_offset, one reshape and one transpose do all the strides at once.
    """
    batch, height, width, channels = x.shape
    k = len(schedule)
    rows = [height // math.prod(s[0] for s in schedule)] + [s[0] for s in reversed(schedule)]
    cols = [width // math.prod(s[1] for s in schedule)] + [s[1] for s in reversed(schedule)]
    x = x.reshape(batch, *rows, *cols, channels)
    # axes: 0 batch, 1 h, 2..k+1 row strides (s_k .. s_1), k+2 w, k+3..2k+2 col strides (s_k .. s_1)
    order = [0]
    for i in range(k):  # s_1 first: the finest offsets are the slowest token axes
        order += [k + 1 - i, 2 * k + 2 - i]
    order += [1, k + 2, 2 * k + 3]
    return x.transpose(order).reshape(batch, height * width, channels)


def reroll(x, grid: tuple[int, int], schedule: tuple[tuple[int, int], ...]):
    """Inverse of `unroll`: (B, H*W, C) tokens in unrolled order -> (B, H, W, C) (HF's reroll)."""
    batch, _, channels = x.shape
    k = len(schedule)
    height, width = grid
    shape = [batch]
    for sy, sx in schedule:
        shape += [sy, sx]
    shape += [height // math.prod(s[0] for s in schedule), width // math.prod(s[1] for s in schedule), channels]
    x = x.reshape(shape)
    # axes: 0 batch, (1 + 2i, 2 + 2i) offsets of stride i, 2k+1 h, 2k+2 w, 2k+3 channels
    order = [0, 2 * k + 1] + [1 + 2 * i for i in reversed(range(k))]
    order += [2 * k + 2] + [2 + 2 * i for i in reversed(range(k))] + [2 * k + 3]
    return x.transpose(order).reshape(batch, height, width, channels)


def unroll_order(grid: tuple[int, int], schedule: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Row-major token indices in unrolled order: `unroll(x)[:, i] = x.reshape(B, -1, C)[:, order[i]]`."""
    return unroll(np.arange(grid[0] * grid[1]).reshape(1, *grid, 1), schedule).reshape(-1)


def stage_grids(config: HieraConfig, grid: tuple[int, int]) -> list[tuple[tuple[int, int], tuple]]:
    """Per stage: the output grid (h, w) and the unroll strides not yet consumed by query pooling."""
    schedule = (config.query_stride,) * (len(config.depths) - 1)
    layouts = []
    for stage in range(len(config.depths)):
        pooled = min(stage, config.num_query_pool)
        stage_grid = tuple(g // q ** pooled for g, q in zip(grid, config.query_stride))
        layouts.append((stage_grid, schedule[pooled:]))
    return layouts


# ----------------------------------------------------------------------------------------------
# Modules.

class MaskUnitAttention(nnx.Module):
    """Multi-head attention within mask units (or global), with optional query max-pooling."""

    def __init__(self, dim_in: int, dim_out: int, num_heads: int, query_stride: int, window_size: int,
                 use_mask_unit_attn: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = dim_out // num_heads
        self.query_stride = query_stride
        self.window_size = window_size
        self.use_mask_unit_attn = use_mask_unit_attn
        self.qkv = nnx.Linear(dim_in, 3 * dim_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = nnx.Linear(dim_out, dim_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, _ = x.shape
        # In unrolled order, token t * num_windows + w lies in mask unit w.
        num_windows = tokens // (self.query_stride * self.window_size) if self.use_mask_unit_attn else 1
        per_window = tokens // num_windows
        qkv = self.qkv(x).reshape(batch, per_window, num_windows, 3, self.num_heads, self.head_dim)
        # (B, tokens, windows * heads, head_dim): the windows fold into the heads axis of
        # dot_product_attention's (B, T, N, H) layout with reshapes only (folding them into the batch
        # needs a transpose each way, measured slower on CPU), and the output is in HF's order.
        query, key, value = (qkv[:, :, :, i].reshape(batch, per_window, -1, self.head_dim) for i in range(3))
        if self.query_stride > 1:
            # The leading block of the window's tokens holds the stride offsets: its max is a max pool.
            query = query.reshape(batch, self.query_stride, -1, *query.shape[2:]).max(axis=1)
        out = dot_product_attention(query, key, value)
        return self.proj(out.reshape(batch, -1, self.num_heads * self.head_dim))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, activation: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.activation = activation
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class HieraLayer(nnx.Module):
    """One Hiera block: pre-norm attention (with query pooling and width change) and MLP."""

    def __init__(self, config: HieraConfig, dim_in: int, dim_out: int, num_heads: int, query_stride: int,
                 window_size: int, use_mask_unit_attn: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.query_stride = query_stride
        # Two-pass variance, as torch's LayerNorm (the fast E[x^2] - E[x]^2 form costs parity).
        norm = dict(epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)
        self.layernorm_before = nnx.LayerNorm(dim_in, **norm)
        self.attn = MaskUnitAttention(dim_in, dim_out, num_heads, query_stride, window_size,
                                      use_mask_unit_attn, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layernorm_after = nnx.LayerNorm(dim_out, **norm)
        self.mlp = Mlp(dim_out, int(dim_out * config.mlp_ratio), config.hidden_act,
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = (nnx.Linear(dim_in, dim_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                     if dim_in != dim_out else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        normed = self.layernorm_before(x)
        if self.proj is not None:
            # The residual changes width on the *normed* input and is max-pooled like the queries.
            x = self.proj(normed)
            x = x.reshape(x.shape[0], self.query_stride, -1, x.shape[-1]).max(axis=1)
        x = x + self.attn(normed)
        return x + self.mlp(self.layernorm_after(x))


class HieraStage(nnx.Module):
    """The stage's first layer (width change, query pooling) then `depth - 1` scanned equal layers."""

    def __init__(self, config: HieraConfig, stage: int, dim_in: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        dim_out = config.stage_dims[stage]
        pools = 1 <= stage <= config.num_query_pool
        query_stride = math.prod(config.query_stride) if pools else 1
        # HF: int(mask-unit area * query-stride area ** -stage), the mask unit shrinking per stage.
        window_size = int(math.prod(config.masked_unit_size) * math.prod(config.query_stride) ** -stage)
        use_mua = config.masked_unit_attention[stage]
        # The first layer keeps the previous stage's mask-unit attention (global attention is applied
        # only after pooling, lagging by one layer).
        first_mua = use_mua or config.masked_unit_attention[max(stage - 1, 0)]
        common = dict(dtype=dtype, param_dtype=param_dtype)
        self.first_layer = HieraLayer(config, dim_in, dim_out, config.num_heads[stage], query_stride,
                                      window_size, first_mua, rngs=rngs, **common)
        self.num_repeated = config.depths[stage] - 1
        if self.num_repeated > 0:
            @nnx.split_rngs(splits=self.num_repeated)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_layers(layer_rngs: nnx.Rngs) -> HieraLayer:
                return HieraLayer(config, dim_out, dim_out, config.num_heads[stage], 1, window_size,
                                  use_mua, rngs=layer_rngs, **common)

            self.layers = make_layers(rngs)
        else:
            self.layers = None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.first_layer(x)
        if self.layers is not None:
            # A plain lax.scan over the stacked layer state (rather than nnx.scan) keeps the module
            # usable when it is closed over by raw jax transforms (jax.jit / jax.grad of a closure).
            graphdef, stacked = nnx.split(self.layers)

            def apply_layer(carry: jax.Array, layer_state) -> tuple[jax.Array, None]:
                return nnx.merge(graphdef, layer_state)(carry), None

            x, _ = jax.lax.scan(apply_layer, x, stacked)
        return x


class Hiera(nnx.Module):
    """Hiera encoder; returns the four stage maps NHWC (HF `reshaped_hidden_states[1:]`)."""

    def __init__(self, config: HieraConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.stage_dims = config.stage_dims
        self.token_grid = tuple(i // s for i, s in zip(config.image_size, config.patch_stride))
        self.patch_embed = nnx.Conv(
            config.num_channels, config.embed_dim, kernel_size=config.patch_size, strides=config.patch_stride,
            padding=tuple((p, p) for p in config.patch_padding), dtype=dtype, param_dtype=param_dtype,
            rngs=rngs)
        self.position_embeddings = nnx.Param(
            0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0,
                                               (1, math.prod(self.token_grid), config.embed_dim), param_dtype))
        stages = []
        dim_in = config.embed_dim
        for stage in range(len(config.depths)):
            stages.append(HieraStage(config, stage, dim_in, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
            dim_in = config.stage_dims[stage]
        self.stages = nnx.List(stages)
        self.pooler_norm = nnx.LayerNorm(dim_in, epsilon=config.layer_norm_eps, use_fast_variance=False,
                                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def position_embeddings_for(self, grid: tuple[int, int]) -> jax.Array:
        """(1, h*w, C) position embeddings for a token grid: resized bicubically as HF's
        interpolate_pos_encoding when the grid differs from the trained one."""
        pos = self.position_embeddings[...]
        if grid == self.token_grid:
            return pos
        trained = pos.reshape(*self.token_grid, pos.shape[-1])
        return resize_position_embeddings(trained, grid).reshape(1, grid[0] * grid[1], pos.shape[-1])

    def __call__(self, pixel_values: jax.Array, *, return_pooled: bool = False):
        """pixel_values: (B, H, W, C) normalized images -> tuple of stage maps (and pooled (B, C4))."""
        config = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != config.num_channels:
            raise UserInputError(f"Hiera expects images (batch, height, width, {config.num_channels}), "
                                 f"got shape {pixel_values.shape}")
        image_hw = pixel_values.shape[1:3]
        grid = tuple(i // s for i, s in zip(image_hw, config.patch_stride))
        # Mask units tile the token grid (and contain the whole unroll cell, see HieraConfig).
        if any(g % m for g, m in zip(grid, config.masked_unit_size)):
            raise UserInputError(
                f"Hiera: an input of {image_hw[0]}x{image_hw[1]} gives a {grid[0]}x{grid[1]} token grid; "
                f"it must be divisible by the mask unit {config.masked_unit_size} (use multiples of "
                f"{tuple(m * s for m, s in zip(config.masked_unit_size, config.patch_stride))} pixels)")
        x = self.patch_embed(pixel_values.astype(self.dtype))
        batch = x.shape[0]
        x = x.reshape(batch, -1, config.embed_dim)
        x = x + self.position_embeddings_for(grid).astype(x.dtype)
        x = unroll(x.reshape(batch, *grid, config.embed_dim), (config.query_stride,) * (len(config.depths) - 1))
        stage_maps = []
        for stage, (stage_grid, schedule) in zip(self.stages, stage_grids(config, grid)):
            x = stage(x)
            stage_maps.append(reroll(x, stage_grid, schedule))
        stage_maps = tuple(stage_maps)
        if not return_pooled:
            return stage_maps
        return stage_maps, self.pooler_norm(x.mean(axis=1))
