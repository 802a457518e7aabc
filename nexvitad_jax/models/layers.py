"""Layers and tables both backbone ports and the NexViTAD model use.

- dtypes by config name (`DTYPES`, `dtype_named`);
- image normalization with the ImageNet statistics both backbones were trained with;
- the exact (erf) GELU as a float32 rational polynomial, and the activation table of HF names;
- the position-embedding resize with PyTorch's bicubic numerics (HF `interpolate_pos_encoding`);
- softmax attention through `jax.nn.dot_product_attention` (cuDNN's fused kernel where it applies).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nexvitad_jax.errors import UserInputError

# Compute / parameter dtypes by their config name.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dtype_named(name: str, where: str = "dtype"):
    """The jnp dtype of a config name ('float32', 'bfloat16'); a clear error for anything else."""
    if name not in DTYPES:
        raise UserInputError(f"{where} {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def normalize_images(images: jax.Array) -> jax.Array:
    """Images in [0, 1], NHWC RGB -> normalized with the ImageNet mean/std both backbones expect."""
    mean = jnp.asarray(IMAGENET_MEAN, dtype=images.dtype)
    std = jnp.asarray(IMAGENET_STD, dtype=images.dtype)
    return (images - mean) / std


# ----------------------------------------------------------------------------------------------
# Activations.

# Eigen's float32 erf (the rational approximation XLA uses on GPU), odd numerator / even
# denominator in x^2 on [-4, 4]; erf is +-1 in float32 outside. Within ~4e-7 of the exact erf.
_ERF_NUMERATOR = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
                  -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_DENOMINATOR = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
                    -1.42647390514189e-02)


def _horner(coefficients: tuple[float, ...], x2: jax.Array) -> jax.Array:
    """The polynomial with these coefficients (highest power first) at x2, in float32."""
    return functools.reduce(lambda acc, c: acc * x2 + c, coefficients[1:], jnp.float32(coefficients[0]))


def erf_f32(x: jax.Array) -> jax.Array:
    """erf in float32 as a rational polynomial: XLA:CPU's `lax.erf` is slower than these few fused
    multiply-adds, and GELU's erf is a visible share of a ViT's CPU time."""
    x = jnp.clip(x.astype(jnp.float32), -4.0, 4.0)
    x2 = x * x
    return x * _horner(_ERF_NUMERATOR, x2) / _horner(_ERF_DENOMINATOR, x2)


def gelu_exact(x: jax.Array) -> jax.Array:
    """x * Phi(x) with the erf form (torch's default nn.GELU), computed in float32."""
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + erf_f32(x32 * 0.7071067811865476))).astype(x.dtype)


# transformers' ACT2FN names the ports accept (a config's `hidden_act`): "gelu" is the exact erf
# GELU, "gelu_new" / "gelu_pytorch_tanh" the tanh approximation.
ACTIVATIONS = {
    "gelu": gelu_exact,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# ----------------------------------------------------------------------------------------------
# Attention.

# cuDNN's fused (flash) attention takes bf16 / fp16 inputs and head widths that are multiples of 8
# up to 128 (256 from Hopper on; jax checks it at trace time, the bound here is the one every GPU has).
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128


def attention_implementation(dtype, head_dim: int, platform: str) -> str | None:
    """`jax.nn.dot_product_attention`'s implementation for inputs of this dtype and head width on a
    platform ('cpu', 'cuda', 'rocm', 'tpu', ...): "cudnn" where cuDNN's fused kernel applies, None
    (XLA) elsewhere. jax 0.10's `implementation=None` is always XLA, so cuDNN is asked for by name."""
    fits = jnp.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM
    return "cudnn" if platform == "cuda" and fits else None


def _platform() -> str:
    """'cuda' on an NVIDIA GPU (whose platform_version names CUDA), else the backend's name."""
    backend = jax.default_backend()
    if backend == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower():
        return "cuda"
    return backend


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v for (B, T, N, H) queries and (B, S, N, H) keys and values
    -> (B, T, N, H). XLA's version (on CPU, and for float32 anywhere) takes the logits and the
    softmax in float32 for bf16 inputs too, the probabilities cast back to bf16 for the product with
    v; cuDNN's (bf16 on an NVIDIA GPU) accumulates and normalizes in float32."""
    implementation = attention_implementation(query.dtype, query.shape[-1], _platform())
    return jax.nn.dot_product_attention(query, key, value, implementation=implementation)


# ----------------------------------------------------------------------------------------------
# Position-embedding resize with PyTorch's bicubic numerics (align_corners=False), as 1-D matrices.

def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel W(x) (PyTorch: a = -0.75 plain, a = -0.5 antialiased), in the
    dtype of x (float32, as PyTorch computes the weights for float32 tensors)."""
    x = np.abs(x)
    a = x.dtype.type(a)
    one, two, three, four, five, eight = (x.dtype.type(v) for v in (1, 2, 3, 4, 5, 8))
    near = ((a + two) * x - (a + three)) * x * x + one
    far = ((a * x - five * a) * x + eight * a) * x - four * a
    return np.where(x < one, near, np.where(x < two, far, x.dtype.type(0)))


def _bicubic_matrix_plain(size_in: int, size_out: int) -> np.ndarray:
    """upsample_bicubic2d: source index (i + 0.5) * scale - 0.5, not clamped for cubic; the taps
    t+1, t, 1-t, 2-t read clamped indices (upsample_get_value_bounded)."""
    f32 = np.float32
    scale = f32(size_in) / f32(size_out)
    src = scale * (np.arange(size_out, dtype=f32) + f32(0.5)) - f32(0.5)
    base = np.floor(src)
    t = src - base
    one = f32(1)
    taps = (_cubic(t + one, -0.75), _cubic(t, -0.75), _cubic(one - t, -0.75), _cubic(one - t + one, -0.75))
    matrix = np.zeros((size_out, size_in), f32)
    for offset, weight in zip(range(-1, 3), taps):
        columns = np.clip(base.astype(np.int64) + offset, 0, size_in - 1)
        np.add.at(matrix, (np.arange(size_out), columns), weight)
    return matrix


def _bicubic_matrix_antialiased(size_in: int, size_out: int) -> np.ndarray:
    """_upsample_bicubic2d_aa (PIL-style): a = -0.5, support widened by the scale when shrinking,
    taps cut at the borders and the weights renormalized."""
    f32 = np.float32
    scale = f32(size_in) / f32(size_out)
    support = f32(2) * scale if scale >= 1 else f32(2)
    inv_scale = f32(1) / scale if scale >= 1 else f32(1)
    center = scale * (np.arange(size_out, dtype=f32) + f32(0.5))
    first = np.maximum(np.trunc(center - support + f32(0.5)).astype(np.int64), 0)
    last = np.minimum(np.trunc(center + support + f32(0.5)).astype(np.int64), size_in)
    columns = np.arange(size_in)
    inside = (columns[None, :] >= first[:, None]) & (columns[None, :] < last[:, None])
    offsets = (columns[None, :].astype(f32) - center[:, None] + f32(0.5)) * inv_scale
    weights = np.where(inside, _cubic(offsets.astype(f32), -0.5), f32(0))
    total = weights.sum(axis=1, keepdims=True, dtype=f32)
    return np.where(total != 0, weights / np.where(total != 0, total, f32(1)), f32(0)).astype(f32)


@functools.lru_cache(maxsize=64)
def torch_bicubic_matrix(size_in: int, size_out: int, antialias: bool = False) -> np.ndarray:
    """(size_out, size_in) matrix M with M @ v == F.interpolate(v, size_out, mode='bicubic',
    align_corners=False, antialias=antialias) along one axis (float32 tensors)."""
    if antialias:
        return _bicubic_matrix_antialiased(size_in, size_out)
    return _bicubic_matrix_plain(size_in, size_out)


def resize_position_embeddings(grid_embeddings: jax.Array, size_out: tuple[int, int], *,
                               antialias: bool = False) -> jax.Array:
    """(h, w, C) position-embedding grid -> (size_out[0], size_out[1], C), bicubic as PyTorch, in fp32.

    Hiera resizes with antialias off; DINOv2 with it off (plain model) or on (register model)."""
    rows = jnp.asarray(torch_bicubic_matrix(grid_embeddings.shape[0], size_out[0], antialias))
    cols = jnp.asarray(torch_bicubic_matrix(grid_embeddings.shape[1], size_out[1], antialias))
    resized = jnp.einsum("oh,hwc,pw->opc", rows, grid_embeddings.astype(jnp.float32), cols,
                         precision=jax.lax.Precision.HIGHEST)
    return resized.astype(grid_embeddings.dtype)


def config_from_dict(cls, values: dict[str, Any], what: str):
    """A config dataclass from a field dict; unknown fields are refused with the allowed names."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserInputError(f"{what}: unknown fields {unknown}; expected a subset of {sorted(known)}")
    return cls(**values)
