"""PatchEAD+'s visual prompt enhancement (the PatchEAD paper's sections 3.3, 4.2 and appendix D):
the foreground mask from the class-token attention, and the alignment of a prompt image to a query.

- Mask: the last layer's class-token attention to each patch, mean over heads, min-max normalized
  per image; a patch above 0.05 weighs 1, any other 0.5 (down-weighted, not removed).
- Alignment: the paper finds the rotation and translation between a prompt and the query by
  "feature matching from traditional image processing" (keypoints + robust fit). Here the
  features are the backbone's own patch tokens: mutual nearest neighbours between the two grids
  are the matches, a RANSAC over pairs of matches (fixed hypotheses, all evaluated at once) picks
  the rigid motion with most inliers, a least-squares fit (2-D Procrustes) on those inliers
  refines it, and the prompt image is resampled (bilinear, edge pixels repeated) into the query's
  frame. The aligned prompt and its 180-degree rotation join the prompt list.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nexvitad_jax.peers.scoring import HIGHEST, unit_tokens


def foreground_weights(attention: jax.Array, threshold: float = 0.05, background: float = 0.5) -> jax.Array:
    """(B, h, w) class-token attention -> (B, h, w) patch weights: 1 where the min-max normalized
    attention exceeds `threshold`, `background` elsewhere."""
    low = jnp.min(attention, axis=(1, 2), keepdims=True)
    high = jnp.max(attention, axis=(1, 2), keepdims=True)
    normalized = (attention - low) / jnp.maximum(high - low, 1e-12)
    return jnp.where(normalized > threshold, 1.0, background).astype(jnp.float32)


def patch_centres(grid: tuple[int, int]) -> jax.Array:
    """(h w, 2) (x, y) centres of a patch grid, in patch units (the image spans [0, w] x [0, h])."""
    ys, xs = jnp.meshgrid(jnp.arange(grid[0]) + 0.5, jnp.arange(grid[1]) + 0.5, indexing="ij")
    return jnp.stack([xs.ravel(), ys.ravel()], axis=-1).astype(jnp.float32)


def _rotation(theta: jax.Array) -> jax.Array:
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    return jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)


def procrustes_2d(source: jax.Array, target: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The rotation angle and translation (target ~ R source + t) minimizing the weighted squared
    error over (P, 2) point pairs."""
    total = jnp.maximum(jnp.sum(weights), 1e-12)
    source_mean = jnp.sum(weights[:, None] * source, 0) / total
    target_mean = jnp.sum(weights[:, None] * target, 0) / total
    s, d = source - source_mean, target - target_mean
    cross = jnp.sum(weights * (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]))
    dot = jnp.sum(weights * (s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1]))
    theta = jnp.arctan2(cross, dot)
    return theta, target_mean - _rotation(theta) @ source_mean


def estimate_rigid_motion(query: jax.Array, prompt: jax.Array, key: jax.Array, *, hypotheses: int = 128,
                          inlier_patches: float = 1.5) -> tuple[jax.Array, jax.Array]:
    """Query and prompt tokens (h, w, D) -> (theta, t (2,)) in patch units, mapping prompt
    positions onto query positions; identity when fewer than two mutual matches exist."""
    grid = query.shape[:2]
    q, p = unit_tokens(query.reshape(-1, query.shape[-1])), unit_tokens(prompt.reshape(-1, prompt.shape[-1]))
    similarity = jnp.einsum("id,jd->ij", q, p, precision=HIGHEST)
    to_prompt, to_query = jnp.argmax(similarity, 1), jnp.argmax(similarity, 0)
    mutual = (to_query[to_prompt] == jnp.arange(q.shape[0])).astype(jnp.float32)
    centres = patch_centres(grid)
    source, target = centres[to_prompt], centres  # a match: prompt patch to_prompt[i] <-> query patch i
    pairs = jax.random.choice(key, q.shape[0], (hypotheses, 2), p=(mutual + 1e-9) / jnp.sum(mutual + 1e-9))

    def hypothesis(pair):
        (a, b) = pair
        ds, dt = source[b] - source[a], target[b] - target[a]
        theta = jnp.arctan2(dt[1], dt[0]) - jnp.arctan2(ds[1], ds[0])
        shift = target[a] - _rotation(theta) @ source[a]
        residual = jnp.linalg.norm(source @ _rotation(theta).T + shift - target, axis=-1)
        inliers = mutual * (residual < inlier_patches) * (jnp.linalg.norm(ds) > 0)
        return jnp.sum(inliers), inliers

    counts, inliers = jax.vmap(hypothesis)(pairs)
    best = inliers[jnp.argmax(counts)]
    theta, shift = procrustes_2d(source, target, best)
    enough = jnp.sum(best) >= 2
    return jnp.where(enough, theta, 0.0), jnp.where(enough, shift, jnp.zeros(2))


def warp_rigid(image: jax.Array, theta: jax.Array, shift: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """(H, W, C) prompt image resampled into the query's frame: output pixel x takes the prompt at
    R^T (x - t) (motion in patch units of a `grid`-patch image); bilinear, edges repeated."""
    height, width = image.shape[:2]
    scale = jnp.asarray([width / grid[1], height / grid[0]], jnp.float32)  # pixels per patch (x, y)
    ys, xs = jnp.meshgrid(jnp.arange(height) + 0.5, jnp.arange(width) + 0.5, indexing="ij")
    out = jnp.stack([xs.ravel(), ys.ravel()], -1) / scale
    source = (out - shift) @ _rotation(theta)  # rows: R^T (x - t)
    pixel = source * scale - 0.5
    coordinates = [pixel[:, 1].reshape(height, width), pixel[:, 0].reshape(height, width)]
    channels = [jax.scipy.ndimage.map_coordinates(image[..., c].astype(jnp.float32), coordinates, order=1,
                                                  mode="nearest") for c in range(image.shape[-1])]
    return jnp.stack(channels, -1)


def aligned_prompts(query_tokens: jax.Array, prompt_tokens: jax.Array, prompt_images: jax.Array, key: jax.Array, *,
                    hypotheses: int, inlier_patches: float) -> jax.Array:
    """For queries (B, h, w, D) and prompts (N, h, w, D) with their images (N, H, W, 3): the
    prompts aligned to each query and their 180-degree rotations, (B, 2N, H, W, 3)."""
    grid = query_tokens.shape[1:3]
    keys = jax.random.split(key, prompt_tokens.shape[0])

    def per_query(query):
        def per_prompt(tokens, image, prompt_key):
            theta, shift = estimate_rigid_motion(query, tokens, prompt_key, hypotheses=hypotheses,
                                                 inlier_patches=inlier_patches)
            return warp_rigid(image, theta, shift, grid)

        aligned = jax.vmap(per_prompt)(prompt_tokens, prompt_images, keys)
        return jnp.concatenate([aligned, aligned[:, ::-1, ::-1]], axis=0)

    return jax.vmap(per_query)(query_tokens)
