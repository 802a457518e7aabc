"""Feature extractors for memory-bank inference.

A feature extractor is anything with `__call__(images (B, H, W, 3) float in [0, 1]) -> list of
NHWC feature maps` and `describe() -> dict` (a JSON-able identity: saved with a detector and
compared on load, so a memory bank is never scored against features of another network). It is
called on batches sharded along B, under `jax.transfer_guard("disallow")`: its weights must
already be on the devices.
- `EncoderFeatureExtractor`: the trained NexViTAD encoder, F_1..F_4 (eq. 3), the paper's bank.
- `BackboneFeatureExtractor`: converted or randomly initialized Hiera stage maps, optionally with
  a DINOv2 patch grid resized to each stage and concatenated on channels (`nexvitad score`).
Weights enter the jitted functions as arguments, never as closed-over constants (which would be
baked into the compiled program: gigabytes for Hiera-Huge), and are replicated once on every
device of the extractor's mesh (default: every device of every host), where the sharded batches of
`nexvitad_jax.inference.batching` meet them without a copy per batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.identity import weights_fingerprint
from nexvitad_jax.inference.batching import replicate
from nexvitad_jax.sharding import make_mesh

# A Hiera small enough for CPU demos and CI (stage dims 16, 32, 64, 128 at 224 -> 56, 28, 14, 7).
TINY_HIERA = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))


class FeatureExtractor(Protocol):
    def __call__(self, images: jax.Array) -> list[jax.Array]: ...

    def describe(self) -> dict[str, Any]: ...


def _check_layers(layers: Sequence[int], count: int, what: str) -> tuple[int, ...]:
    layers = tuple(int(layer) for layer in layers)
    if not layers or any(not 0 <= layer < count for layer in layers) or len(set(layers)) != len(layers):
        raise UserInputError(f"{what} = {list(layers)}: expected distinct layer indices in 0..{count - 1}")
    return layers


class EncoderFeatureExtractor:
    """The trained NexViTAD encoder: the selected layers of F_1..F_4 of one feature kind."""

    def __init__(self, model, *, kind: str = "interleaved", layers: Sequence[int] = (0, 1, 2, 3),
                 identity: dict | None = None, mesh: Mesh | None = None):
        self.layers = _check_layers(layers, len(model.encoder.stage_dims), "bank.layers")
        self.kind = kind
        self._graph, state = nnx.split(model.encoder)
        self._identity = {"kind": "nexvitad-encoder", "features": kind, "layers": list(self.layers),
                          "weights": weights_fingerprint(state), **(identity or {})}
        self.mesh = make_mesh() if mesh is None else mesh
        self._state = replicate(state, self.mesh)
        self._pipeline = jax.jit(self._features)

    @classmethod
    def from_config(cls, model, bank_config, identity: dict | None = None,
                    mesh: Mesh | None = None) -> EncoderFeatureExtractor:
        """The extractor a config's `bank` section names (features, layers)."""
        return cls(model, kind=str(bank_config.features), layers=tuple(bank_config.layers), identity=identity,
                   mesh=mesh)

    def _features(self, state, images):
        from nexvitad_jax.models import normalize_images

        features = nnx.merge(self._graph, state)(normalize_images(images.astype(jnp.float32)), kind=self.kind)
        return [features[layer].astype(jnp.float32) for layer in self.layers]

    def __call__(self, images: jax.Array) -> list[jax.Array]:
        return self._pipeline(self._state, jnp.asarray(images))

    def describe(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._identity))


class BackboneFeatureExtractor:
    """Hiera stage maps (selected `layers`), optionally with a DINOv2 grid per stage. Images are
    resized (bilinear, half-pixel) to `image_size` and normalized with the ImageNet statistics."""

    def __init__(self, hiera: nnx.Module, hiera_identity: dict, *, dino: nnx.Module | None = None,
                 dino_identity: dict | None = None, layers: Sequence[int] = (0, 1, 2, 3),
                 image_size: int = 224, mesh: Mesh | None = None):
        self.layers = _check_layers(layers, len(hiera.stage_dims), "layers")
        self.image_size = int(image_size)
        self.mesh = make_mesh() if mesh is None else mesh
        self._hiera_graph, hiera_state = nnx.split(hiera)
        self._dino_graph, dino_state = nnx.split(dino) if dino is not None else (None, None)
        self._hiera_state, self._dino_state = replicate((hiera_state, dino_state), self.mesh)
        self._identity = {"kind": "backbone", "hiera": hiera_identity, "dinov2": dino_identity,
                          "layers": list(self.layers), "image_size": self.image_size}
        self._pipeline = jax.jit(self._features)

    @classmethod
    def from_dirs(cls, hiera_dir: str | Path, dino_dir: str | Path | None = None, **options) -> BackboneFeatureExtractor:
        """Converted checkpoints (`python -m converters`); the DINOv2 one is optional."""
        hiera, hiera_identity = _load_converted(hiera_dir, "hiera")
        dino, dino_identity = _load_converted(dino_dir, "dinov2") if dino_dir is not None else (None, None)
        return cls(hiera, hiera_identity, dino=dino, dino_identity=dino_identity, **options)

    @classmethod
    def random(cls, *, seed: int = 0, hiera_config: dict | None = None, dino_config: dict | None = None,
               **options) -> BackboneFeatureExtractor:
        """Randomly initialized backbones (the tiny Hiera by default): demos and tests, no download."""
        from nexvitad_jax.models.hiera import VARIANTS, HieraConfig

        config = HieraConfig.from_dict({**VARIANTS["tiny"].to_dict(), **dict(hiera_config or TINY_HIERA)})
        hiera, hiera_identity = _random_backbone("hiera", config, seed)
        dino = dino_identity = None
        if dino_config is not None:
            from nexvitad_jax.models.dinov2 import Dinov2Config

            dino, dino_identity = _random_backbone("dinov2", Dinov2Config.from_dict(dino_config), seed + 1)
        return cls(hiera, hiera_identity, dino=dino, dino_identity=dino_identity, **options)

    def describe(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._identity))  # a JSON-normalized copy (tuples -> lists)

    def _features(self, states, images: jax.Array) -> list[jax.Array]:
        from nexvitad_jax.models import normalize_images

        size = (images.shape[0], self.image_size, self.image_size, 3)
        pixels = normalize_images(jax.image.resize(images.astype(jnp.float32), size, method="linear"))
        hiera_state, dino_state = states
        stage_maps = nnx.merge(self._hiera_graph, hiera_state)(pixels)
        features = [stage_maps[layer] for layer in self.layers]
        if dino_state is not None:
            grid, _ = nnx.merge(self._dino_graph, dino_state)(pixels)
            features = [jnp.concatenate([f, jax.image.resize(grid, (*f.shape[:3], grid.shape[-1]), method="linear")
                                         .astype(f.dtype)], axis=-1) for f in features]
        return [f.astype(jnp.float32) for f in features]

    def __call__(self, images: jax.Array) -> list[jax.Array]:
        return self._pipeline((self._hiera_state, self._dino_state), jnp.asarray(images))


def _load_converted(directory, family: str) -> tuple[nnx.Module, dict]:
    """A converted backbone of `family` and its identity (weights fingerprint, location)."""
    from nexvitad_jax.models import load_backbone, read_backbone_metadata

    metadata = read_backbone_metadata(directory)
    if metadata["family"] != family:
        raise UserInputError(f"{directory}: a converted {metadata['family']} backbone, expected {family}")
    module, params = load_backbone(directory)
    identity = {"family": family, "variant": metadata.get("variant"), "config": metadata["config"],
                "dtype": metadata.get("dtype", "float32"), "weights": weights_fingerprint(params),
                "directory": str(Path(directory).resolve())}
    return module, identity


def _random_backbone(family: str, config, seed: int) -> tuple[nnx.Module, dict]:
    from nexvitad_jax.models import build_backbone

    module = build_backbone(family, config, rngs=nnx.Rngs(seed))
    identity = {"family": family, "random_init_seed": seed, "config": config.to_dict(),
                "weights": weights_fingerprint(nnx.state(module, nnx.Param))}
    return module, identity


def extractor_from_description(description: dict, mesh: Mesh | None = None) -> BackboneFeatureExtractor:
    """Rebuild the extractor a detector was saved with (backbone dirs or random-init seeds) on
    `mesh` (default: every device)."""
    if description.get("kind") != "backbone":
        raise UserInputError(f"cannot rebuild a feature extractor of kind {description.get('kind')!r}; "
                             "pass the extractor to AnomalyDetector.load(directory, extractor)")
    hiera, dino = description["hiera"], description.get("dinov2")
    options = dict(layers=description["layers"], image_size=description["image_size"], mesh=mesh)
    if "directory" in hiera:
        return BackboneFeatureExtractor.from_dirs(hiera["directory"], dino["directory"] if dino else None, **options)
    return BackboneFeatureExtractor.random(seed=hiera["random_init_seed"], hiera_config=hiera["config"],
                                           dino_config=dino["config"] if dino else None, **options)
