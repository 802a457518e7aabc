"""PatchEAD's cross-patch anomaly scoring (the PatchEAD paper's section 3.2, eqs. 1-4), as jitted
array functions over patch tokens; `nexvitad_jax.peers.patchead` wraps them in a detector.

- eq. 1: cosine distance D_{j,i,k} = 1 - <e_Q^j, e_P^{i,k}> / (|e_Q^j| |e_P^{i,k}|);
- eq. 2: u_{j,i} = min_k D_{j,i,k}: each query patch's NEAREST patch of prompt image i. The paper
  writes max; nearest-patch matching is the reading under which the method works (a normal patch
  has a close match in a normal image; the farthest patch of any image is far for every query),
  and the one of the methods it builds on (PatchCore, AnomalyDINO, MuSc);
- eq. 3: m_j = mean of u_{j,i} over the K_P prompt images matching patch j best (the smallest u;
  K_P = 1 in few-shot, so m_j is the distance to the nearest prompt patch of all prompts, and
  max(1, 0.3 N) in batch zero-shot, where the smallest 30% make the score robust to the anomalous
  images among the references, as MuSc's);
- eq. 4: S = mean of the K_I largest m_j, K_I = max(1, rho L).

The distances of a whole batch are one matmul (queries x every prompt patch), sharded along the
query images when the caller shards them; `query_chunk` bounds memory by running groups of
query images through `lax.map` (a compiled loop, never a Python one).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def unit_tokens(tokens: jax.Array) -> jax.Array:
    """(..., D) tokens scaled to unit L2 norm (float32), the cosine of eq. 1 as a dot product."""
    tokens = tokens.astype(jnp.float32)
    return tokens / jnp.maximum(jnp.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)


def nearest_patch_distances(queries: jax.Array, prompts: jax.Array) -> jax.Array:
    """Eqs. 1-2: queries (B, L, D), prompts (N, L', D) -> u (B, L, N), the cosine distance of each
    query patch to its nearest patch of each prompt image."""
    n, patches, dim = prompts.shape
    similarity = jnp.einsum("bld,pd->blp", unit_tokens(queries), unit_tokens(prompts).reshape(n * patches, dim),
                            precision=HIGHEST)
    return 1.0 - jnp.max(similarity.reshape(*similarity.shape[:2], n, patches), axis=-1)


def nearest_patch_distances_per_query(queries: jax.Array, prompts: jax.Array) -> jax.Array:
    """Eqs. 1-2 with each query's own prompts (PatchEAD+'s aligned prompts): queries (B, L, D),
    prompts (B, N, L', D) -> u (B, L, N)."""
    return jax.vmap(lambda q, p: nearest_patch_distances(q[None], p)[0])(queries, prompts)


def aggregate_prompts(u: jax.Array, k_prompts: jax.Array | int, allowed: jax.Array | None = None) -> jax.Array:
    """Eq. 3: u (B, L, N) -> m (B, L), the mean of each patch's `k_prompts` smallest u over the
    prompt images `allowed` (B, N) bool (all when None); `k_prompts` may be traced (a batch's
    valid count decides it in batch zero-shot)."""
    if allowed is not None:
        u = jnp.where(allowed[:, None, :], u, jnp.inf)
    ordered = jnp.sort(u, axis=-1)
    take = jnp.arange(u.shape[-1]) < k_prompts
    return jnp.sum(jnp.where(take, ordered, 0.0), axis=-1) / k_prompts


def top_patch_mean(m: jax.Array, rho: float) -> jax.Array:
    """Eq. 4: m (B, L) -> S (B,), the mean of the K_I = max(1, int(rho L)) largest patch scores."""
    k = max(1, int(rho * m.shape[-1]))
    return jnp.mean(jax.lax.top_k(m, k)[0], axis=-1)


def zero_shot_k_prompts(references: jax.Array | int, fraction: float = 0.3) -> jax.Array:
    """K_P = max(1, floor(fraction N)) for N references (batch zero-shot: N = B - 1)."""
    return jnp.maximum(1, jnp.floor(fraction * jnp.asarray(references, jnp.float32)).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("query_chunk",))
def few_shot_patch_scores(queries: jax.Array, prompts: jax.Array, query_chunk: int | None = None) -> jax.Array:
    """Few-shot m (B, L) of queries (B, L, D) against prompts (N, L', D) with K_P = 1."""
    def one_group(group):
        return aggregate_prompts(nearest_patch_distances(group, prompts), 1)

    if query_chunk is None or query_chunk >= queries.shape[0]:
        return one_group(queries)
    return jax.lax.map(lambda q: one_group(q[None])[0], queries, batch_size=query_chunk)


@functools.partial(jax.jit, static_argnames=("fraction", "query_chunk"))
def batch_zero_shot_patch_scores(tokens: jax.Array, valid: jax.Array, fraction: float = 0.3,
                                 query_chunk: int | None = None) -> jax.Array:
    """Batch zero-shot m (B, L): every image of the batch (B, L, D) against the other valid ones
    (leave-one-out), K_P = max(1, floor(fraction (valid count - 1))). `valid` (B,) bool marks the
    real images of a padded batch: padding never serves as a reference."""
    count = tokens.shape[0]
    k_prompts = zero_shot_k_prompts(jnp.sum(valid) - 1, fraction)

    def one_group(group, index):
        allowed = valid[None, :] & (jnp.arange(count)[None, :] != index[:, None])
        return aggregate_prompts(nearest_patch_distances(group, tokens), k_prompts, allowed)

    if query_chunk is None or query_chunk >= count:
        return one_group(tokens, jnp.arange(count))
    return jax.lax.map(lambda args: one_group(args[0][None], args[1][None])[0], (tokens, jnp.arange(count)),
                       batch_size=query_chunk)
