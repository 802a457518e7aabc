"""The NexViTAD model of a config: `build_model(config, num_source, num_target)`.

Reads `config.seed` and `config.model`: each backbone from its converted checkpoint
(`model.hiera_checkpoint`, `model.dinov2_checkpoint`) or, where that is "", randomly initialized
from its spec (`model.hiera`, `model.dinov2`: a variant and/or config fields).
"""

from __future__ import annotations

from flax import nnx

from nexvitad_jax.compilation import initialize
from nexvitad_jax.models.layers import dtype_named
from nexvitad_jax.models.nexvitad import NexViTAD

BACKBONES = ("hiera", "dinov2")


def build_model(config, num_source: int, num_target: int) -> NexViTAD:
    """The NexViTAD model of a config; its random parameters are drawn by one compiled program
    (`initialize`), with the loaded backbones as placeholders that XLA never computes."""
    from nexvitad_jax.models import load_backbone

    spec = config.model
    dtype = dtype_named(spec.dtype, "config.model.dtype")
    loaded = {family: load_backbone(spec[f"{family}_checkpoint"], dtype=dtype)[0]
              for family in BACKBONES if spec[f"{family}_checkpoint"]}

    def create() -> NexViTAD:
        rngs = nnx.Rngs(int(config.seed))
        backbones = {family: _backbone(family, spec, loaded, rngs, dtype) for family in BACKBONES}
        return NexViTAD(backbones["hiera"], backbones["dinov2"], num_source, num_target,
                        shared_source_head=bool(spec.shared_source_head),
                        decoder_channels=tuple(spec.decoder_channels), upconv=str(spec.upconv),
                        pseudo_label_hidden=tuple(spec.pseudo_label_hidden),
                        # absent from the configs of runs saved before the field (same function)
                        head_batching=str(spec.get("head_batching", "unrolled")), dtype=dtype, rngs=rngs)

    stand_ins = nnx.Any(*(nnx.PathContains(family) for family in loaded)) if loaded else nnx.Nothing
    model = initialize(create, placeholders=stand_ins)
    for family, module in loaded.items():
        setattr(model.encoder, family, module)
    return model


def _backbone(family: str, spec, loaded: dict[str, nnx.Module], rngs: nnx.Rngs, dtype) -> nnx.Module:
    """A random backbone from the config's spec, or a stand-in of a loaded one's shape. The stand-in
    draws from its own Rngs, so the heads get the keys they would get without it."""
    from nexvitad_jax.models import build_backbone

    if family in loaded:
        return build_backbone(family, loaded[family].config, rngs=nnx.Rngs(0), dtype=dtype)
    return build_backbone(family, spec[family].to_dict(), rngs=rngs, dtype=dtype)
