"""On-device augmentation of target images with the exact inverse for predictions (eq. 7's
"after restore"): flip, 90-degree rotation, scaling, Gaussian noise, each with probability p.

The geometric part is one affine map of pixel coordinates per image; the augmented image samples
the input at A(q) (bilinear), a prediction on it is restored by sampling at A^{-1}(q). Flips and
rotations land on integer coordinates, so they and their inverses are exact permutations; scaling
is exact for maps linear in the coordinates, and pixels whose restored position falls outside the
augmented view are reported invalid (left out of P)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_transforms(rng: jax.Array, batch: int, *, probability: float = 0.5, scale_range=(0.8, 1.25),
                      noise_std: float = 0.05) -> dict[str, jax.Array]:
    """Per-image random transform parameters (flip, rotation k in 1..3, scale, noise std)."""
    keys = jax.random.split(rng, 8)
    apply = jax.random.uniform(keys[0], (4, batch)) < probability
    log_scale = jax.random.uniform(keys[1], (batch,), minval=jnp.log(scale_range[0]), maxval=jnp.log(scale_range[1]))
    return {
        "flip": apply[0],
        "rotations": jnp.where(apply[1], jax.random.randint(keys[2], (batch,), 1, 4), 0),
        "scale": jnp.where(apply[2], jnp.exp(log_scale), 1.0),
        "noise_std": jnp.where(apply[3], noise_std, 0.0),
        "noise_key": jax.random.split(keys[3], batch),
    }


def _matrix(flip, rotations, scale, size: int) -> jax.Array:
    """3x3 affine map from output pixel (row, col, 1) to the input pixel it samples (square images)."""
    c = (size - 1) / 2.0
    center = jnp.array([[1.0, 0, -c], [0, 1.0, -c], [0, 0, 1.0]])
    uncenter = jnp.array([[1.0, 0, c], [0, 1.0, c], [0, 0, 1.0]])
    flip_m = jnp.where(flip, jnp.diag(jnp.array([1.0, -1.0, 1.0])), jnp.eye(3))
    # Rotation by k quarter turns about the centre: (r, c) -> (c, -r) per turn; exact integers.
    rot_cos = jnp.array([1.0, 0.0, -1.0, 0.0])[rotations]
    rot_sin = jnp.array([0.0, 1.0, 0.0, -1.0])[rotations]
    rot_m = jnp.array([[rot_cos, -rot_sin, 0.0], [rot_sin, rot_cos, 0.0], [0.0, 0.0, 1.0]])
    scale_m = jnp.diag(jnp.array([1.0 / scale, 1.0 / scale, 1.0]))
    return uncenter @ scale_m @ rot_m @ flip_m @ center


def _warp(image: jax.Array, matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sample image (H, W, C) at matrix @ (row, col, 1) for every output pixel, bilinear; returns the
    warped image and whether the sample position lies inside the image."""
    size = image.shape[0]
    rows, cols = jnp.meshgrid(jnp.arange(size, dtype=jnp.float32), jnp.arange(size, dtype=jnp.float32), indexing="ij")
    source = jnp.einsum("ij,jhw->ihw", matrix, jnp.stack([rows, cols, jnp.ones_like(rows)]))
    # Round away float error so flips and rotations hit pixel centres exactly.
    source = jnp.where(jnp.abs(source - jnp.round(source)) < 1e-4, jnp.round(source), source)
    inside = (source[0] >= 0) & (source[0] <= size - 1) & (source[1] >= 0) & (source[1] <= size - 1)
    warped = jax.vmap(lambda channel: jax.scipy.ndimage.map_coordinates(channel, [source[0], source[1]], order=1,
                                                                        mode="nearest"), in_axes=-1, out_axes=-1)(image)
    return warped, inside


def augment(images: jax.Array, transforms: dict[str, jax.Array]) -> jax.Array:
    """Images (B, S, S, C) in [0, 1] -> augmented images (noise after the geometric transform)."""
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"90-degree rotation needs square images, got {images.shape[1:3]}")
    size = images.shape[1]
    matrices = jax.vmap(lambda f, r, s: _matrix(f, r, s, size))(transforms["flip"], transforms["rotations"],
                                                                transforms["scale"])
    warped, _ = jax.vmap(_warp)(images.astype(jnp.float32), matrices)
    noise = jax.vmap(lambda key: jax.random.normal(key, images.shape[1:]))(transforms["noise_key"])
    return jnp.clip(warped + transforms["noise_std"][:, None, None, None] * noise, 0.0, 1.0)


def restore(maps: jax.Array, transforms: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Predictions on augmented images (B, S, S, C) -> mapped back to the original frame, and a
    (B, S, S) mask of the pixels where that inverse exists: the restored position lies in the
    augmented view and every augmented pixel it interpolates came from inside the original image."""
    size = maps.shape[1]
    forward = jax.vmap(lambda f, r, s: _matrix(f, r, s, size))(transforms["flip"], transforms["rotations"],
                                                               transforms["scale"])
    inverse = jax.vmap(jnp.linalg.inv)(forward)
    # Which augmented pixels sampled inside the original image (the rest were edge-clamped).
    _, from_inside = jax.vmap(_warp)(jnp.zeros((maps.shape[0], size, size, 1)), forward)
    restored, inside = jax.vmap(_warp)(jnp.concatenate([maps.astype(jnp.float32),
                                                        from_inside[..., None].astype(jnp.float32)], -1), inverse)
    return restored[..., :-1], inside & (restored[..., -1] > 1.0 - 1e-5)
