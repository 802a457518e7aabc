"""INP-Former++'s residual learning (the INP-Former++ paper's section 3.5): pseudo anomalies
synthesized on normal images, the feature residual of eq. 7, a segmentation head trained on it
with the Dice loss of eq. 8, and eq. 9's anomaly map (the reconstruction error with its L2 term,
averaged with the head's mask).

- Pseudo anomalies (DRAEM-style, as the paper): a Perlin noise mask (one octave, lattice of 2, 4
  or 8 cells per side, thresholded at 0.5; where no pixel exceeds 0.5 the threshold drops to 0.8 x
  the noise's maximum, so every pseudo image has an anomaly) blends a foreign texture into the
  image, I_a = (1 - M) I + M ((1 - beta) T + beta I), beta ~ U[0, 0.8). The paper's textures come
  from DTD, which the project does not ship: T is another image of the batch (the next one),
  rotated by 90 degrees with its colour channels reversed.
- Eq. 7 per patch, over the decoder groups: mean_g (1 - cos(f_Q, f_D)) * |f_Q - f_D|.
- The head: two stride-2 transposed convolutions (ReLU) and a 3x3 convolution to one channel,
  sigmoid, then bilinear upsampling to the image (the paper names the layers, not their widths:
  the hidden width here is max(8, C / 2)).
- Eq. 8: per image 1 - 2 sum(P M) / (sum(P^2) + sum(M^2)) (a 1e-6 guard in the denominator), the
  mean over the batch.
- Eq. 9: A_rec = mean_g 0.5 (1 - cos + ||f_Q - f_D||_2), A = (up(A_rec) + M_pred) / 2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nexvitad_jax.inference.anomaly_maps import upsample_bilinear
from nexvitad_jax.peers.inp_former import cosine

PERLIN_CELLS = (2, 4, 8)
THRESHOLD = 0.5
MAX_OPACITY = 0.8


def _fade(t: jax.Array) -> jax.Array:
    return t * t * t * (t * (6.0 * t - 15.0) + 10.0)


def perlin_noise(key: jax.Array, size: int, cells) -> jax.Array:
    """(size, size) gradient (Perlin) noise on a lattice of `cells` x `cells` cells (an int, or a
    traced one up to max(PERLIN_CELLS)): random unit gradients at the lattice points (the top-left
    (cells + 1)^2 of a fixed (max + 1)^2 draw), quintic fade between them; values in about [-0.71, 0.71]."""
    most = max(PERLIN_CELLS) + 1
    angles = jax.random.uniform(key, (most, most), maxval=2.0 * math.pi)
    gradients = jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)  # (x, y) components
    t = (jnp.arange(size, dtype=jnp.float32) + 0.5) * cells / size
    cell = jnp.floor(t).astype(jnp.int32)
    frac = t - cell
    cy, cx = cell[:, None], cell[None, :]
    fy, fx = jnp.broadcast_to(frac[:, None], (size, size)), jnp.broadcast_to(frac[None, :], (size, size))

    def corner(dy, dx):
        g = gradients[cy + dy, cx + dx]
        return g[..., 0] * (fx - dx) + g[..., 1] * (fy - dy)

    u, v = _fade(fx), _fade(fy)
    top = corner(0, 0) + u * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + u * (corner(1, 1) - corner(1, 0))
    return top + v * (bottom - top)


def anomaly_mask(key: jax.Array, size: int) -> jax.Array:
    """One (size, size) {0, 1} mask: Perlin noise of a random lattice (PERLIN_CELLS) above the threshold."""
    choice, noise_key = jax.random.split(key)
    cells = jnp.asarray(PERLIN_CELLS)[jax.random.randint(choice, (), 0, len(PERLIN_CELLS))]
    noise = perlin_noise(noise_key, size, cells)
    threshold = jnp.minimum(THRESHOLD, 0.8 * jnp.max(noise))
    return (noise > threshold).astype(jnp.float32)


def pseudo_anomalies(key: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Square images (B, S, S, 3) in [0, 1] -> (anomalous images (B, S, S, 3), masks (B, S, S))."""
    mask_key, opacity_key = jax.random.split(key)
    batch, size = images.shape[0], images.shape[1]
    masks = jax.vmap(lambda k: anomaly_mask(k, size))(jax.random.split(mask_key, batch))
    texture = jnp.rot90(jnp.roll(images, 1, axis=0), k=1, axes=(1, 2))[..., ::-1]
    beta = jax.random.uniform(opacity_key, (batch, 1, 1, 1), maxval=MAX_OPACITY)
    m = masks[..., None]
    return images * (1.0 - m) + m * ((1.0 - beta) * texture + beta * images), masks


def feature_residual(targets: jax.Array, outputs: jax.Array) -> jax.Array:
    """Eq. 7: (G, B, N, C) encoder and decoder groups -> (B, N, C), mean_g (1 - cos) |f_Q - f_D|."""
    targets, outputs = targets.astype(jnp.float32), outputs.astype(jnp.float32)
    return jnp.mean((1.0 - cosine(targets, outputs))[..., None] * jnp.abs(targets - outputs), axis=0)


def reconstruction_map_l2(targets: jax.Array, outputs: jax.Array) -> jax.Array:
    """Eq. 9's A_rec: (G, B, N, C) -> (B, N), mean_g 0.5 ((1 - cos) + ||f_Q - f_D||_2)."""
    targets, outputs = targets.astype(jnp.float32), outputs.astype(jnp.float32)
    return jnp.mean(0.5 * ((1.0 - cosine(targets, outputs)) + jnp.linalg.norm(targets - outputs, axis=-1)), axis=0)


def dice_loss(predicted: jax.Array, masks: jax.Array) -> jax.Array:
    """Eq. 8: predicted probabilities and {0, 1} masks (B, H, W) -> the mean over images of
    1 - 2 sum(P M) / (sum(P^2) + sum(M^2))."""
    overlap = jnp.sum(predicted * masks, axis=(1, 2))
    total = jnp.sum(predicted**2, axis=(1, 2)) + jnp.sum(masks**2, axis=(1, 2))
    return jnp.mean(1.0 - 2.0 * overlap / (total + 1e-6))


class ResidualHead(nnx.Module):
    """The segmentation head: feature residuals (B, h, w, C) -> mask logits (B, 4h, 4w)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        hidden = max(8, dim // 2)
        self.up1 = nnx.ConvTranspose(dim, hidden, (2, 2), strides=(2, 2), rngs=rngs)
        self.up2 = nnx.ConvTranspose(hidden, hidden, (2, 2), strides=(2, 2), rngs=rngs)
        self.out = nnx.Conv(hidden, 1, (3, 3), padding="SAME", rngs=rngs)

    def __call__(self, residual: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.up1(residual))
        return self.out(jax.nn.relu(self.up2(x)))[..., 0]


def predicted_mask(head: ResidualHead, residual: jax.Array, grid: int, size: tuple[int, int]) -> jax.Array:
    """M_pred: the head on the residual (B, N, C) of a grid x grid patch layout, sigmoid, upsampled
    bilinearly to `size` -> (B, H, W) in [0, 1]."""
    logits = head(residual.reshape(residual.shape[0], grid, grid, residual.shape[-1]))
    return upsample_bilinear(jax.nn.sigmoid(logits), size)
