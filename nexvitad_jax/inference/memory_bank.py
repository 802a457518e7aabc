"""The memory bank (the paper's section 3.2): per layer, Sinkhorn K-means prototypes of the patch
features of the M few-shot normal images of a target class.

`fit_memory_banks` fits several K at once (one `sweep_k` program per layer, whose run for K equals
`sinkhorn_kmeans` with that K); `build_memory_bank` is its one-K case. Layer n draws from
`fold_in(rng, n)`, so a bank of K from a sweep is the bank of K alone.

Features may arrive on several devices, as the detector extracts them: split along the images (M)
over the data mesh, or replicated (M not a multiple of the device count), on one host or several
(each holding its share of the images). The flattened bank then stays on those devices, split along
its rows (each device's images are its rows), and the K-means exchanges only reductions
(`sinkhorn_kmeans`); the prototypes come back replicated.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference.sinkhorn_kmeans import KMeansResult, sweep_k


class MemoryBank(NamedTuple):
    """Per layer: prototypes (K_n, D_n) and the K-means convergence info."""

    prototypes: list[jax.Array]
    results: list[KMeansResult]

    def unconverged_layers(self) -> list[int]:
        return [layer for layer, result in enumerate(self.results) if not bool(result.converged)]


def layer_patches(layer: int, features: jax.Array) -> jax.Array:
    """(M, h, w, D) features of the normal images -> the (M h w, D) float32 bank of a layer (split
    along its rows where the features are split along M: each device keeps its images' patches)."""
    if features.ndim != 4:
        raise UserInputError(f"layer {layer}: expected (M, h, w, D) features, got {tuple(features.shape)}")
    return features.reshape(-1, features.shape[-1]).astype(jnp.float32)


def _layer_ks(layer: int, features: jax.Array, ks: Sequence[int], cap_to_bank: bool) -> list[int]:
    """The K each requested K becomes on this layer: capped at the bank's patch count when
    `cap_to_bank` (every patch a prototype), else a clear error."""
    m, h, w, _ = features.shape
    patches = m * h * w
    if not cap_to_bank and max(ks) > patches:
        raise UserInputError(f"layer {layer}: {m} normal images x {h}x{w} patches = {patches} patches, fewer "
                             f"than K = {max(ks)} prototypes; use a smaller --k or more images")
    return [min(int(k), patches) for k in ks]


def fit_memory_banks(features: Sequence[jax.Array], ks: Sequence[int], *, rng: jax.Array,
                     cap_to_bank: bool = False, progress: bool | None = None,
                     **kmeans_options) -> dict[int, MemoryBank]:
    """features: per layer (M, h_n, w_n, D_n) of the normal images -> {K: MemoryBank} for every K
    in `ks`, one `sweep_k` per layer over the distinct (capped) Ks. `kmeans_options`: epsilon,
    max_iters, tol, options of `sweep_k`. `progress`: a bar over the layers (None: on a terminal)."""
    from tqdm.auto import tqdm

    banks = {int(k): MemoryBank([], []) for k in ks}
    with tqdm(total=len(features), desc=f"K-means (K={_shown_ks(ks)})", unit="layer", leave=False,
              disable=None if progress is None else not progress) as bar:
        for layer, layer_features in enumerate(features):
            patches = layer_patches(layer, layer_features)
            effective = _layer_ks(layer, layer_features, ks, cap_to_bank)
            distinct = sorted(set(effective))
            layer_rng = jax.random.fold_in(rng, jax.device_put(np.uint32(layer)))  # explicit: no implicit transfer
            sweep = sweep_k(patches, distinct, rng=layer_rng, **kmeans_options)
            for k, k_layer in zip(ks, effective):
                run = distinct.index(k_layer)
                banks[int(k)].prototypes.append(sweep.prototypes[run])
                banks[int(k)].results.append(jax.tree.map(functools.partial(_run_of, run=run), sweep.result))
            if not bar.disable:  # the layer's fit done (waited for only when it is shown)
                iterations = jax.device_get(sweep.result.iterations)
                bar.set_postfix({"layer": layer, "patches": patches.shape[0], "iterations": int(iterations.max())})
            bar.update(1)
    return banks


def _run_of(field: jax.Array, run: int) -> jax.Array:
    """Run `run` of a sweep's stacked field (a static slice: no index enters from the host)."""
    return jax.lax.index_in_dim(field, run, keepdims=False)


def _shown_ks(ks: Sequence[int]) -> str:
    ks = sorted({int(k) for k in ks})
    return ",".join(map(str, ks)) if len(ks) <= 4 else f"{ks[0]}..{ks[-1]}, {len(ks)} values"


def build_memory_bank(features: Sequence[jax.Array], k: int, *, rng: jax.Array, **kmeans_options) -> MemoryBank:
    """K prototypes per layer (`fit_memory_banks` with one K)."""
    return fit_memory_banks(features, [k], rng=rng, **kmeans_options)[int(k)]
