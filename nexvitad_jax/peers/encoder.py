"""The frozen DINOv2 the peer methods read: patch tokens and the last layer's class-token
attention, for [0, 1] images resized to a multiple of the patch size.

Weights are replicated once on every device of the mesh and enter the jitted function as an
argument (not a closed-over constant), as `nexvitad_jax.inference.extractors` does; images come in
batches sharded along their rows (`nexvitad_jax.inference.batching`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.identity import weights_fingerprint
from nexvitad_jax.inference.batching import replicate
from nexvitad_jax.sharding import make_mesh


class DinoPatchEncoder:
    """images (B, H, W, 3) in [0, 1] -> (patch tokens (B, h, w, D) float32, class-token attention
    (B, h, w): the last layer's, mean over heads). Images are resized bilinearly to `resolution`
    (a multiple of the patch size) and normalized with the ImageNet statistics."""

    def __init__(self, dino: nnx.Module, identity: dict, *, resolution: int, mesh: Mesh | None = None):
        patch = dino.config.patch_size
        if int(resolution) < patch or int(resolution) % patch:
            raise UserInputError(f"resolution {resolution}: expected a positive multiple of the DINOv2 patch "
                                 f"size {patch}")
        self.resolution, self.patch_size = int(resolution), patch
        self.grid = self.resolution // patch
        self.dino_config = dino.config
        self.mesh = make_mesh() if mesh is None else mesh
        self._graph, state = nnx.split(dino)
        self._state = replicate(state, self.mesh)
        self._identity = {"kind": "dinov2-patches", "dinov2": identity, "resolution": self.resolution}
        self._pipeline = jax.jit(self._encode)

    @classmethod
    def random(cls, config_fields: dict, *, seed: int = 0, **options) -> DinoPatchEncoder:
        """A randomly initialized DINOv2 of a config spec (`resolve_config`): tests and demos."""
        from nexvitad_jax.compilation import initialize
        from nexvitad_jax.models import build_backbone, resolve_config

        config = resolve_config("dinov2", dict(config_fields))
        module = initialize(lambda: build_backbone("dinov2", config, rngs=nnx.Rngs(seed)))  # one compiled program
        identity = {"family": "dinov2", "random_init_seed": seed, "config": config.to_dict(),
                    "weights": weights_fingerprint(nnx.state(module, nnx.Param))}
        return cls(module, identity, **options)

    @classmethod
    def from_dir(cls, directory: str | Path, **options) -> DinoPatchEncoder:
        """A converted DINOv2 (`python -m converters dinov2 ...`)."""
        from nexvitad_jax.models import load_backbone, read_backbone_metadata

        metadata = read_backbone_metadata(directory)
        if metadata["family"] != "dinov2":
            raise UserInputError(f"{directory}: a converted {metadata['family']} backbone; the peer methods "
                                 "need a DINOv2 (python -m converters dinov2 ...)")
        module, params = load_backbone(directory)
        identity = {"family": "dinov2", "variant": metadata.get("variant"), "config": metadata["config"],
                    "weights": weights_fingerprint(params), "directory": str(Path(directory).resolve())}
        return cls(module, identity, **options)

    def describe(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._identity))

    def _encode(self, state, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        from nexvitad_jax.models import normalize_images

        size = (images.shape[0], self.resolution, self.resolution, 3)
        pixels = normalize_images(jax.image.resize(images.astype(jnp.float32), size, method="linear"))
        tokens, _, attention = nnx.merge(self._graph, state)(pixels, cls_attention=True)
        return tokens.astype(jnp.float32), jnp.mean(attention, axis=1)

    def encode_layers(self, state, images: jax.Array, layers: tuple[int, ...]) -> jax.Array:
        """The traceable per-layer patch tokens (before the final norm) of `layers`: (len(layers), B,
        h w, D) float32 (INP-Former's encoder groups)."""
        from nexvitad_jax.models import normalize_images

        size = (images.shape[0], self.resolution, self.resolution, 3)
        pixels = normalize_images(jax.image.resize(images.astype(jnp.float32), size, method="linear"))
        hidden = nnx.merge(self._graph, state)(pixels, hidden_states=True)[-1]
        chosen = hidden[jnp.asarray(layers)]
        return chosen.reshape(len(layers), images.shape[0], -1, chosen.shape[-1]).astype(jnp.float32)

    def encode(self, state, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The traceable encoder (inside another jitted function, with `self.state`)."""
        return self._encode(state, images)

    @property
    def state(self):
        return self._state

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self._pipeline(self._state, jnp.asarray(images))
