"""PatchEAD and PatchEAD+ (the PatchEAD paper): training-free patch matching on a frozen DINOv2.

Few-shot: `PatchEAD(encoder, options).fit(prompt_images).predict(images)`; batch zero-shot:
`PatchEAD(encoder, options).predict_batch_zero_shot(images, seed)` (each image of a batch of 64
against the other 63). Both return (maps (B, H, W) at the input size, image scores (B,)): the
patch scores m_j (eqs. 1-3, `nexvitad_jax.peers.scoring`) upsampled bilinearly and smoothed with
the project's Gaussian (`nexvitad_jax.inference.anomaly_maps`), the image score eq. 4 on the
patch scores. PatchEAD+ (`PatchEADOptions.plus()`) weighs each query patch by its foreground mask
and adds each prompt aligned to the query, and its 180-degree rotation, to the prompt list
(`nexvitad_jax.peers.alignment`); with several versions of one reference (zero-shot), the
reference's u is its best-matching version's.

Images are spread over every device of the encoder's mesh in sharded batches
(`nexvitad_jax.inference.batching`), the prompts' tokens replicated once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference.anomaly_maps import gaussian_blur, upsample_bilinear
from nexvitad_jax.inference.batching import global_batch_size, map_batches, place_rows, replicate
from nexvitad_jax.inference.detector import check_float_images
from nexvitad_jax.peers import alignment, scoring
from nexvitad_jax.peers.encoder import DinoPatchEncoder


@dataclasses.dataclass(frozen=True)
class PatchEADOptions:
    """rho: K_I = max(1, rho L) top patches per image score (eq. 4; the paper leaves rho open, 1%
    as AnomalyDINO); zero_shot_fraction: K_P = max(1, fraction N) in batch zero-shot (eq. 3);
    zero_shot_batch: images per zero-shot batch (64); sigma: Gaussian smoothing of the maps;
    mask / align: PatchEAD+'s foreground mask and prompt alignment; hypotheses, inlier_patches:
    the alignment's RANSAC; batch_size: query images per global batch (few-shot); query_chunk:
    query images per distance matmul (None: the whole batch at once)."""

    rho: float = 0.01
    zero_shot_fraction: float = 0.3
    zero_shot_batch: int = 64
    sigma: float = 2.0
    mask: bool = False
    align: bool = False
    mask_threshold: float = 0.05
    background_weight: float = 0.5
    hypotheses: int = 128
    inlier_patches: float = 1.5
    batch_size: int = 8
    query_chunk: int | None = None

    @classmethod
    def plus(cls, *, align: bool = True, **fields) -> PatchEADOptions:
        """PatchEAD+: mask always, alignment on (the paper turns it off for MPDD and BTAD)."""
        return cls(mask=True, align=align, **fields)


class PatchEAD:
    """Few-shot and batch zero-shot PatchEAD(+) over a `DinoPatchEncoder`."""

    def __init__(self, encoder: DinoPatchEncoder, options: PatchEADOptions = PatchEADOptions()):
        if options.zero_shot_batch < 2 or options.batch_size < 1 or not 0 <= options.rho <= 1:
            raise UserInputError(f"PatchEAD options {options}: expected zero_shot_batch >= 2, batch_size >= 1 "
                                 "and 0 <= rho <= 1")
        self.encoder, self.options, self.mesh = encoder, options, encoder.mesh
        self.prompts: dict | None = None
        self._few_shot = jax.jit(self._few_shot_batch, static_argnames=("size",))
        self._zero_shot = jax.jit(self._zero_shot_batch, static_argnames=("size",))

    def describe(self) -> dict:
        return {"method": "patchead", "options": dataclasses.asdict(self.options), "encoder": self.encoder.describe()}

    def fit(self, prompt_images) -> PatchEAD:
        """The N normal prompt images (N, H, W, 3) in [0, 1]: their tokens (and, for the
        alignment, the images) replicated on every device."""
        images = check_float_images(prompt_images, "prompt_images")
        tokens, _ = map_batches(self.encoder, images, self.options.batch_size, self.mesh)
        self.prompts = replicate({"tokens": tokens, "images": images}, self.mesh)
        return self

    def _maps(self, m: jax.Array, size: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        """Patch scores (B, h, w) -> (maps (B, H, W), eq. 4 image scores (B,))."""
        scores = scoring.top_patch_mean(m.reshape(m.shape[0], -1), self.options.rho)
        return gaussian_blur(upsample_bilinear(m, size), self.options.sigma), scores

    def _weights(self, attention: jax.Array) -> jax.Array:
        if not self.options.mask:
            return jnp.ones_like(attention)
        return alignment.foreground_weights(attention, self.options.mask_threshold, self.options.background_weight)

    def _aligned_tokens(self, state, query_tokens, references, reference_images) -> jax.Array:
        """(B, 2N, L, D): the references aligned to each query and rotated by 180 degrees, encoded."""
        options = self.options
        warped = alignment.aligned_prompts(query_tokens, references, reference_images, jax.random.key(0),
                                           hypotheses=options.hypotheses, inlier_patches=options.inlier_patches)
        batch, count = warped.shape[:2]
        tokens, _ = self.encoder.encode(state, warped.reshape(batch * count, *warped.shape[2:]))
        return tokens.reshape(batch, count, -1, tokens.shape[-1])

    def _few_shot_batch(self, state, prompts, images, *, size):
        tokens, attention = self.encoder.encode(state, images)
        batch, grid = tokens.shape[0], tokens.shape[1:3]
        flat = tokens.reshape(batch, -1, tokens.shape[-1])
        prompt_tokens = prompts["tokens"].reshape(prompts["tokens"].shape[0], -1, tokens.shape[-1])
        if self.options.align:
            extra = self._aligned_tokens(state, tokens, prompts["tokens"], prompts["images"])
            every = jnp.concatenate([jnp.broadcast_to(prompt_tokens, (batch, *prompt_tokens.shape)), extra], axis=1)
            m = scoring.aggregate_prompts(scoring.nearest_patch_distances_per_query(flat, every), 1)
        else:
            m = scoring.few_shot_patch_scores(flat, prompt_tokens, query_chunk=self.options.query_chunk)
        return self._maps(m.reshape(batch, *grid) * self._weights(attention), size)

    def predict(self, images, progress=None) -> tuple[np.ndarray, np.ndarray]:
        """Few-shot (maps (B, H, W), image scores (B,)) against the fitted prompts."""
        if self.prompts is None:
            raise UserInputError("PatchEAD has no prompts: call fit(prompt_images) first")
        images = check_float_images(images, "images")
        state, size = self.encoder.state, tuple(images.shape[1:3])
        return map_batches(lambda batch: self._few_shot(state, self.prompts, batch, size=size), images,
                           self.options.batch_size, self.mesh, progress=progress)

    def _zero_shot_batch(self, state, images, valid, *, size):
        tokens, attention = self.encoder.encode(state, images)
        batch, grid = tokens.shape[0], tokens.shape[1:3]
        flat = tokens.reshape(batch, -1, tokens.shape[-1])
        options = self.options
        if options.align:  # every image aligned to the batch's first one (the paper's zero-shot recipe)
            extra = self._aligned_tokens(state, tokens[:1], tokens, images)[0]  # (2B, L, D)
            references = jnp.concatenate([flat, extra], axis=0)  # versions: original, aligned, rotated
            u = scoring.nearest_patch_distances(flat, references).reshape(batch, flat.shape[1], 3, batch).min(axis=2)
            allowed = valid[None, :] & ~jnp.eye(batch, dtype=bool)
            m = scoring.aggregate_prompts(u, scoring.zero_shot_k_prompts(jnp.sum(valid) - 1, options.zero_shot_fraction),
                                          allowed)
        else:
            m = scoring.batch_zero_shot_patch_scores(flat, valid, options.zero_shot_fraction, options.query_chunk)
        return self._maps(m.reshape(batch, *grid) * self._weights(attention), size)

    def predict_batch_zero_shot(self, images, seed: int = 0, progress=None) -> tuple[np.ndarray, np.ndarray]:
        """Batch zero-shot: the images in a seeded random order, cut into the fewest batches of at
        most `zero_shot_batch` images, of sizes that differ by at most one (so no batch is left with
        a lone image); each image scored against the other images of its batch. Batches are padded
        to one width with rows that are never references and whose outputs are dropped."""
        images = check_float_images(images, "images")
        if len(images) < 2:
            raise UserInputError(f"batch zero-shot needs at least 2 images (each is scored against the others), "
                                 f"got {len(images)}")
        order = np.random.default_rng(seed).permutation(len(images))
        size, state = tuple(images.shape[1:3]), self.encoder.state
        batches = np.array_split(order, -(-len(images) // self.options.zero_shot_batch))  # sizes differ by <= 1
        width = global_batch_size(len(batches[0]), self.mesh)
        maps, scores = np.zeros((len(images), *size), np.float32), np.zeros(len(images), np.float32)
        for chosen in batches:
            rows = np.concatenate([chosen, np.full(width - len(chosen), chosen[-1])])
            valid = np.arange(width) < len(chosen)
            with jax.transfer_guard("disallow"):
                batch = place_rows({"images": images[rows], "valid": valid}, np.arange(width), self.mesh)
                out_maps, out_scores = jax.device_get(self._zero_shot(state, batch["images"], batch["valid"], size=size))
            maps[chosen], scores[chosen] = out_maps[:len(chosen)], out_scores[:len(chosen)]
            if progress is not None:
                progress.update(len(chosen))
        return maps, scores
