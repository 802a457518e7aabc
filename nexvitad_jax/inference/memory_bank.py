"""The memory bank (the paper's section 3.2): per layer, Sinkhorn K-means prototypes of the patch
features of the M few-shot normal images of a target class."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference.sinkhorn_kmeans import KMeansResult, sinkhorn_kmeans


def select_normal_images(files: Sequence, shots: int = 10, seed: int = 0) -> list:
    """The M normal images of seed s: sorted(files)[s*M:(s+1)*M], wrapping around the list."""
    files = sorted(files)
    if not files:
        raise UserInputError("no normal images to choose the memory bank from")
    if shots < 1:
        raise UserInputError(f"shots = {shots}: expected at least one normal image")
    return [files[(seed * shots + i) % len(files)] for i in range(shots)]


class MemoryBank(NamedTuple):
    """Per layer: prototypes (K, D_n) and the K-means convergence info."""

    prototypes: list[jax.Array]
    results: list[KMeansResult]


def build_memory_bank(features: Sequence[jax.Array], k: int, *, rng: jax.Array, **kmeans_options) -> MemoryBank:
    """features: per layer (M, h_n, w_n, D_n) of the normal images -> K prototypes per layer.

    Every layer has its own (N, D), hence its own compiled K-means program.
    """
    prototypes, results = [], []
    for layer, layer_features in enumerate(features):
        if layer_features.ndim != 4:
            raise UserInputError(f"layer {layer}: expected (M, h, w, D) features, got {tuple(layer_features.shape)}")
        patches = layer_features.reshape(-1, layer_features.shape[-1])
        if patches.shape[0] < k:
            m, h, w, _ = layer_features.shape
            raise UserInputError(f"layer {layer}: {m} normal images x {h}x{w} patches = {patches.shape[0]} "
                                 f"patches, fewer than K = {k} prototypes; use a smaller --k or more images")
        layer_prototypes, result = sinkhorn_kmeans(patches.astype(jnp.float32), k,
                                                   rng=jax.random.fold_in(rng, layer), **kmeans_options)
        prototypes.append(layer_prototypes)
        results.append(result)
    return MemoryBank(prototypes, results)
