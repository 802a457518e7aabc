"""The paper's "original decoder" inference, the baseline to the memory bank: target class c's own
segmentation head on its test images, the anomaly probability per pixel (BatchNorm in eval mode,
no smoothing), image score = the map's maximum. The test images are spread over every device of
the mesh (`nexvitad_jax.inference.batching`), the model replicated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from nexvitad_jax.inference.batching import map_batches, replicate
from nexvitad_jax.sharding import make_mesh


def decoder_maps(model, images: jax.Array, head: int) -> tuple[jax.Array, jax.Array]:
    """Images (B, H, W, 3) in [0, 1] -> (anomaly probability maps (B, H, W) of target head `head`,
    image scores (B,))."""
    features = model.encode(images)
    # Every target head sees the same images; keep the class's own (the heads run stacked).
    stacked = tuple(jnp.broadcast_to(f[None], (model.num_target, *f.shape)) for f in features)
    logits = model.target_logits(stacked, images.shape[1:3], train=False)[head]
    maps = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]
    return maps, jnp.max(maps, axis=(1, 2))


class DecoderBaseline:
    """`predict(images, head)` -> (maps (B, H, W), scores (B,)) of a trained NexViTAD model, on
    `mesh` (default: every device), `batch_size` images at a time (rounded up to the device count)."""

    def __init__(self, model, *, batch_size: int = 8, mesh: Mesh | None = None):
        self.batch_size = int(batch_size)
        self.mesh = make_mesh() if mesh is None else mesh
        self._graph, state = nnx.split(model)
        self._state = replicate(state, self.mesh)
        self._maps = jax.jit(lambda state, images, head: decoder_maps(nnx.merge(self._graph, state), images, head),
                             static_argnums=2)

    def predict(self, images: np.ndarray, head: int, progress=None) -> tuple[np.ndarray, np.ndarray]:
        return map_batches(lambda batch: self._maps(self._state, batch, int(head)), images, self.batch_size,
                           self.mesh, progress=progress)
