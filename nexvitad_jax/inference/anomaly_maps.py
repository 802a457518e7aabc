"""Anomaly maps from a memory bank (the paper's eqs. 13-14), batched and jitted.

Per layer n, every patch feature gets its smallest L2 distance to that layer's prototypes
(eq. 13); the layer maps are upsampled bilinearly to H x W (half-pixel centers, as
`jax.image.resize` and torch `align_corners=False`), averaged over layers (eq. 14), smoothed with a
Gaussian (sigma = 2, truncate 4, reflect borders: scipy.ndimage.gaussian_filter's defaults) and
the image score is the map's maximum.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference.sinkhorn_kmeans import squared_distances


def nearest_prototype_distance(features: jax.Array, prototypes: jax.Array) -> jax.Array:
    """Eq. 13: (B, h, w, D) features, (K, D) prototypes -> (B, h, w) min_k ||f - p_k||_2."""
    batch, height, width, dim = features.shape
    squared = squared_distances(features.reshape(-1, dim), prototypes)
    return jnp.sqrt(jnp.min(squared, axis=1)).reshape(batch, height, width)


def gaussian_kernel_1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's kernel: radius int(truncate * sigma + 0.5), normalized exp(-x^2 / 2 sigma^2)."""
    radius = int(truncate * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_blur(maps: jax.Array, sigma: float = 2.0, truncate: float = 4.0) -> jax.Array:
    """(B, H, W) -> (B, H, W), separable Gaussian with scipy's 'reflect' borders (d c b a | a b c d,
    numpy's 'symmetric' padding)."""
    if sigma <= 0:
        return maps
    kernel = jnp.asarray(gaussian_kernel_1d(sigma, truncate), maps.dtype)
    radius = (kernel.shape[0] - 1) // 2

    def blur_last_axis(values):  # (..., L) -> (..., L)
        padded = jnp.pad(values, [(0, 0)] * (values.ndim - 1) + [(radius, radius)], mode="symmetric")
        length = values.shape[-1]
        # A valid 1-D convolution as a sum of 2r+1 shifted slices (r = 8 at sigma 2).
        windows = jnp.stack([padded[..., i:i + length] for i in range(kernel.shape[0])], axis=-1)
        return jnp.einsum("...lk,k->...l", windows, kernel, precision=jax.lax.Precision.HIGHEST)

    rows = blur_last_axis(maps)
    return jnp.swapaxes(blur_last_axis(jnp.swapaxes(rows, -1, -2)), -1, -2)


def upsample_bilinear(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, h, w) -> (B, H, W) bilinear with half-pixel centers (no antialiasing when enlarging)."""
    return jax.image.resize(maps, (maps.shape[0], *size), method="linear", antialias=False)


@functools.partial(jax.jit, static_argnames=("image_size", "sigma"))
def anomaly_maps(features: Sequence[jax.Array], prototypes: Sequence[jax.Array], *, image_size: tuple[int, int],
                 sigma: float = 2.0) -> tuple[jax.Array, jax.Array]:
    """Per-layer features [(B, h_n, w_n, D_n)] and prototypes [(K, D_n)] -> (maps (B, H, W), scores (B,)).

    Layers differ in shape, so the per-layer distance is traced once per layer inside this one
    program (the loop unrolls at trace time; nothing loops at run time).
    """
    layer_maps = [upsample_bilinear(nearest_prototype_distance(f, p), image_size)
                  for f, p in zip(features, prototypes)]
    maps = gaussian_blur(jnp.mean(jnp.stack(layer_maps), axis=0), sigma)  # eq. 14, then smoothing
    return maps, jnp.max(maps, axis=(1, 2))


def check_layers(features: Sequence, prototypes: Sequence) -> None:
    """Clear errors when the features do not fit the memory bank (layer count, channels)."""
    if len(features) != len(prototypes):
        raise UserInputError(f"the feature extractor gave {len(features)} layers but the memory bank "
                             f"holds {len(prototypes)}")
    for index, (f, p) in enumerate(zip(features, prototypes)):
        if f.ndim != 4 or f.shape[-1] != p.shape[-1]:
            raise UserInputError(f"layer {index}: features of shape {tuple(f.shape)} do not fit prototypes "
                                 f"of dimension D = {p.shape[-1]}; expected (B, h, w, {p.shape[-1]})")
