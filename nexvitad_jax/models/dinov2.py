"""DINOv2 ViT (patch 14, layer scale, SwiGLU for giant, optional register tokens) in Flax NNX.

A port of transformers' `Dinov2Model` / `Dinov2WithRegistersModel` (eval mode). The encoder
returns the final-layernorm patch tokens as an NHWC grid and the class token. Position embeddings
are resized to any input size with PyTorch's bicubic numerics (HF `interpolate_pos_encoding`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.models.layers import (ACTIVATIONS, config_from_dict, dot_product_attention,
                                       resize_position_embeddings)


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """The fields of a transformers Dinov2(WithRegisters)Config that the encoder uses."""

    hidden_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 518  # the size the position embeddings were trained for (37x37 grid)
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float = 1.0
    use_swiglu_ffn: bool = False
    num_register_tokens: int = 0
    # HF resizes position embeddings with antialias=False in Dinov2Model and antialias=True in
    # Dinov2WithRegistersModel; the two differ near the borders and when shrinking.
    interpolate_antialias: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise UserInputError(f"Dinov2Config: hidden_size {self.hidden_size} is not divisible by "
                                 f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise UserInputError(f"Dinov2Config: hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")

    @property
    def position_grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_hidden_size(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:
            # SwiGLU keeps two thirds of the MLP width, rounded up to a multiple of 8 (HF and official).
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Dinov2Config:
        return config_from_dict(cls, values, "Dinov2Config")


def _single(value: Any, name: str) -> int:
    """HF allows image_size / patch_size as an int or a square pair."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UserInputError(f"DINOv2 config: non-square {name} {value} is not supported")
        value = value[0]
    return int(value)


def from_hf_config(hf_config: dict[str, Any]) -> Dinov2Config:
    """Dinov2Config from a transformers config dict (`Dinov2Config` or `Dinov2WithRegistersConfig`)."""
    model_type = hf_config.get("model_type", "dinov2")
    if model_type not in ("dinov2", "dinov2_with_registers"):
        raise UserInputError(f"DINOv2 config: model_type {model_type!r}; expected 'dinov2' or "
                             "'dinov2_with_registers'")
    registers = model_type == "dinov2_with_registers"
    defaults = Dinov2Config()
    try:
        return Dinov2Config(
            hidden_size=int(hf_config.get("hidden_size", 768)),
            num_hidden_layers=int(hf_config.get("num_hidden_layers", 12)),
            num_attention_heads=int(hf_config.get("num_attention_heads", 12)),
            mlp_ratio=float(hf_config.get("mlp_ratio", 4)),
            hidden_act=str(hf_config.get("hidden_act", "gelu")),
            layer_norm_eps=float(hf_config.get("layer_norm_eps", defaults.layer_norm_eps)),
            image_size=_single(hf_config.get("image_size", 224), "image_size"),
            patch_size=_single(hf_config.get("patch_size", 16 if registers else 14), "patch_size"),
            num_channels=int(hf_config.get("num_channels", 3)),
            qkv_bias=bool(hf_config.get("qkv_bias", True)),
            layerscale_value=float(hf_config.get("layerscale_value", 1.0)),
            use_swiglu_ffn=bool(hf_config.get("use_swiglu_ffn", False)),
            num_register_tokens=int(hf_config.get("num_register_tokens", 4)) if registers else 0,
            interpolate_antialias=registers,
        )
    except (TypeError, ValueError) as error:
        if isinstance(error, UserInputError):
            raise
        raise UserInputError(f"DINOv2 config: a field has the wrong type ({error})") from error


def to_hf_config(config: Dinov2Config) -> dict[str, Any]:
    """The transformers config kwargs (and which class) that build the same model."""
    kwargs = dict(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                  num_attention_heads=config.num_attention_heads,
                  # transformers validates mlp_ratio as an int
                  mlp_ratio=int(config.mlp_ratio) if float(config.mlp_ratio).is_integer() else config.mlp_ratio,
                  hidden_act=config.hidden_act, layer_norm_eps=config.layer_norm_eps,
                  image_size=config.image_size, patch_size=config.patch_size,
                  num_channels=config.num_channels, qkv_bias=config.qkv_bias,
                  layerscale_value=config.layerscale_value, use_swiglu_ffn=config.use_swiglu_ffn)
    if config.num_register_tokens:
        kwargs["num_register_tokens"] = config.num_register_tokens
    return kwargs


def _variant(hidden: int, layers: int, heads: int, *, swiglu: bool = False, registers: bool = False) -> Dinov2Config:
    return Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        use_swiglu_ffn=swiglu, num_register_tokens=4 if registers else 0,
                        interpolate_antialias=registers)


# The facebook/dinov2-* and facebook/dinov2-with-registers-* hub configs (518 px position grid).
VARIANTS: dict[str, Dinov2Config] = {
    "small": _variant(384, 12, 6),
    "base": _variant(768, 12, 12),
    "large": _variant(1024, 24, 16),
    "giant": _variant(1536, 40, 24, swiglu=True),
    "small-reg": _variant(384, 12, 6, registers=True),
    "base-reg": _variant(768, 12, 12, registers=True),
    "large-reg": _variant(1024, 24, 16, registers=True),
    "giant-reg": _variant(1536, 40, 24, swiglu=True, registers=True),
}


# ----------------------------------------------------------------------------------------------
# Modules.

def multi_head_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                         cache_bytes: int = 1 << 20) -> jax.Array:
    """Attention for (B, T, heads, head_dim) queries, keys and values -> (B, T, heads, head_dim).

    On CPU the (B, heads, T, T) scores of a whole batch spill out of cache (12 MB for ViT-S/14 at
    224, batch 8), so groups of images whose scores fit in `cache_bytes` (at least one image) run
    one after another, which XLA:CPU runs faster than the whole batch at once, with the fused op as
    with the hand-written one (benchmarks/results/attention_cpu.json). Accelerators take the whole
    batch at once.
    """
    batch, tokens, heads, head_dim = query.shape
    group = max(1, cache_bytes // (heads * tokens * tokens * 4))
    if jax.default_backend() != "cpu" or group >= batch:
        return dot_product_attention(query, key, value)
    group = max(g for g in range(1, group + 1) if batch % g == 0)
    grouped = tuple(t.reshape(batch // group, group, tokens, heads, head_dim) for t in (query, key, value))
    attended = jax.lax.map(lambda qkv: dot_product_attention(*qkv), grouped)
    return attended.reshape(batch, tokens, heads, head_dim)


class Attention(nnx.Module):
    """Multi-head self-attention with one fused QKV projection (one matmul instead of three)."""

    def __init__(self, config: Dinov2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        dim = config.hidden_size
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=config.qkv_bias, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
        self.proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, dim = x.shape
        # (B, T, 3, heads, head_dim): query, key and value in dot_product_attention's layout, no transposes.
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        attended = multi_head_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return self.proj(attended.reshape(batch, tokens, dim))


class Mlp(nnx.Module):
    def __init__(self, config: Dinov2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.activation = ACTIVATIONS[config.hidden_act]
        dim, hidden = config.hidden_size, config.mlp_hidden_size
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused in one matmul (official `w12`)."""

    def __init__(self, config: Dinov2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        dim, hidden = config.hidden_size, config.mlp_hidden_size
        self.gate_up = nnx.Linear(dim, 2 * hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(self.gate_up(x), 2, axis=-1)
        return self.down(jax.nn.silu(gate) * up)


class Dinov2Layer(nnx.Module):
    """Pre-norm block: x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x))."""

    def __init__(self, config: Dinov2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        dim = config.hidden_size
        # Two-pass variance, as torch's LayerNorm (the fast E[x^2] - E[x]^2 form costs parity).
        norm = dict(epsilon=config.layer_norm_eps, use_fast_variance=False, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)
        self.norm1 = nnx.LayerNorm(dim, **norm)
        self.attention = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_scale1 = nnx.Param(jnp.full((dim,), config.layerscale_value, param_dtype))
        self.norm2 = nnx.LayerNorm(dim, **norm)
        ffn = SwiGLU if config.use_swiglu_ffn else Mlp
        self.mlp = ffn(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_scale2 = nnx.Param(jnp.full((dim,), config.layerscale_value, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.norm1(x)) * self.layer_scale1.value.astype(x.dtype)
        return x + self.mlp(self.norm2(x)) * self.layer_scale2.value.astype(x.dtype)


class Dinov2(nnx.Module):
    """DINOv2 encoder: (B, H, W, 3) normalized images -> (patch grid (B, H//14, W//14, D), cls (B, D))."""

    def __init__(self, config: Dinov2Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.hidden_size = dim = config.hidden_size
        patch = config.patch_size
        init = nnx.initializers.truncated_normal(0.02)
        # The 14x14 stride-14 patch convolution, kept as its (kh, kw, C, D) kernel and run as a matmul.
        self.patch_kernel = nnx.Param(init(rngs.params(), (patch, patch, config.num_channels, dim), param_dtype))
        self.patch_bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, dim), param_dtype))
        self.position_embeddings = nnx.Param(
            init(rngs.params(), (1, config.position_grid ** 2 + 1, dim), param_dtype))
        self.register_tokens = (nnx.Param(jnp.zeros((1, config.num_register_tokens, dim), param_dtype))
                                if config.num_register_tokens else None)

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(layer_rngs: nnx.Rngs) -> Dinov2Layer:
            return Dinov2Layer(config, dtype=dtype, param_dtype=param_dtype, rngs=layer_rngs)

        self.layers = make_layers(rngs)  # stacked on a leading axis; run as one scan
        self.layernorm = nnx.LayerNorm(dim, epsilon=config.layer_norm_eps, use_fast_variance=False,
                                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def position_embeddings_for(self, grid: tuple[int, int]) -> jax.Array:
        """(1, 1 + h*w, D) position embeddings for a token grid (HF `interpolate_pos_encoding`)."""
        pos = self.position_embeddings.value
        trained = self.config.position_grid
        if grid == (trained, trained):
            return pos
        patch_pos = resize_position_embeddings(pos[0, 1:].reshape(trained, trained, -1), grid,
                                               antialias=self.config.interpolate_antialias)
        return jnp.concatenate([pos[:, :1], patch_pos.reshape(1, grid[0] * grid[1], -1)], axis=1)

    def __call__(self, pixel_values: jax.Array, *, cls_attention: bool = False,
                 hidden_states: bool = False) -> tuple[jax.Array, ...]:
        """(patch grid (B, h, w, D), cls (B, D)), then the opt-in outputs in this order (the default
        outputs are the same either way):
        - `cls_attention`: the last layer's attention of the class token to every patch token,
          (B, heads, h, w) float32 softmax probabilities (HF `output_attentions=True`:
          `attentions[-1][:, :, 0, 1 + registers:]`; PatchEAD+'s foreground mask);
        - `hidden_states`: every layer's output patch tokens before the final norm, (layers, B, h,
          w, D) (HF `output_hidden_states=True`: `hidden_states[1:]`; INP-Former's encoder groups)."""
        config = self.config
        x, grid = self._embed(pixel_values)
        batch = x.shape[0]

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def apply_layer(carry: jax.Array, layer: Dinov2Layer) -> jax.Array:
            return layer(carry)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def apply_layer_keep(carry: tuple[jax.Array, jax.Array], layer: Dinov2Layer):
            out = layer(carry[0])  # the last iteration leaves the last layer's input in the carry
            return (out, carry[0]), out[:, 1 + config.num_register_tokens:] if hidden_states else None

        if cls_attention or hidden_states:
            (x, last_input), layer_outputs = apply_layer_keep((x, x), self.layers)
        else:
            x = apply_layer(x, self.layers)
        x = self.layernorm(x)
        patch_tokens = x[:, 1 + config.num_register_tokens:].reshape(batch, grid[0], grid[1], self.hidden_size)
        outputs = (patch_tokens, x[:, 0])
        if cls_attention:
            outputs += (self._last_cls_attention(last_input, grid),)
        if hidden_states:
            outputs += (layer_outputs.reshape(-1, batch, grid[0], grid[1], self.hidden_size),)
        return outputs

    def _embed(self, pixel_values: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        """Images -> the first layer's input tokens (class, registers, patches) and the patch grid."""
        config = self.config
        patch = config.patch_size
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != config.num_channels:
            raise UserInputError(f"DINOv2 expects images (batch, height, width, {config.num_channels}), "
                                 f"got shape {pixel_values.shape}")
        batch, height, width, channels = pixel_values.shape
        grid = (height // patch, width // patch)
        if min(grid) < 1:
            raise UserInputError(f"DINOv2: an input of {height}x{width} is smaller than one {patch}x{patch} patch")
        # Patch embedding; pixels past the last whole patch are dropped, as the strided conv does.
        pixels = pixel_values[:, :grid[0] * patch, :grid[1] * patch].astype(self.dtype)
        pixels = pixels.reshape(batch, grid[0], patch, grid[1], patch, channels).transpose(0, 1, 3, 2, 4, 5)
        kernel = self.patch_kernel.value.astype(self.dtype).reshape(-1, self.hidden_size)
        x = pixels.reshape(batch, grid[0] * grid[1], -1) @ kernel + self.patch_bias.value.astype(self.dtype)

        cls = jnp.broadcast_to(self.cls_token.value.astype(x.dtype), (batch, 1, self.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embeddings_for(grid).astype(x.dtype)
        if self.register_tokens is not None:
            # Registers join after the position embeddings, between the class and the patch tokens.
            registers = jnp.broadcast_to(self.register_tokens.value.astype(x.dtype),
                                         (batch, config.num_register_tokens, self.hidden_size))
            x = jnp.concatenate([x[:, :1], registers, x[:, 1:]], axis=1)
        return x, grid

    def _last_cls_attention(self, last_input: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """The last layer's class-token attention probabilities over the patch tokens, (B, heads, h, w),
        recomputed from that layer's input with its own norm and QKV weights."""
        graphdef, state = nnx.split(self.layers)
        last = nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[-1], state))
        batch, tokens, dim = last_input.shape
        heads = self.config.num_attention_heads
        qkv = last.attention.qkv(last.norm1(last_input)).reshape(batch, tokens, 3, heads, dim // heads)
        query, keys = qkv[:, 0, 0].astype(jnp.float32), qkv[:, :, 1].astype(jnp.float32)
        logits = jnp.einsum("bnh,btnh->bnt", query, keys, precision=jax.lax.Precision.HIGHEST) / math.sqrt(dim // heads)
        probabilities = jax.nn.softmax(logits, axis=-1)[:, :, 1 + self.config.num_register_tokens:]
        return probabilities.reshape(batch, heads, *grid)


def num_tokens(config: Dinov2Config, image_hw: tuple[int, int]) -> int:
    """Sequence length (class + registers + patches) for an input size."""
    return 1 + config.num_register_tokens + math.prod(s // config.patch_size for s in image_hw)
