"""Backbones (Hiera, DINOv2) and the NexViTAD model; loading converted checkpoints.

- `layers`: what both ports share (exact GELU, activations, position-embedding resize, image
  normalization, dtypes by name);
- `hiera`, `dinov2`: the pure Flax ports; `backbones`: the families by name, `resolve_config`,
  `build_backbone` (random init); `checkpoint`: `save_backbone` / `load_backbone`, what
  `python -m converters` writes (DIR/config.json + the orbax checkpoint DIR/params);
- `encoder`, `decoder`, `nexvitad`: the NexViTAD model.
"""

from nexvitad_jax.models.backbones import (BACKBONE_FAMILIES, build_backbone, config_class, family_module,
                                           resolve_config)
from nexvitad_jax.models.checkpoint import (CHECKPOINT_FORMAT_VERSION, instantiate_backbone, load_backbone,
                                            read_backbone_metadata, save_backbone)
from nexvitad_jax.models.layers import IMAGENET_MEAN, IMAGENET_STD, normalize_images

__all__ = [
    "BACKBONE_FAMILIES", "CHECKPOINT_FORMAT_VERSION", "IMAGENET_MEAN", "IMAGENET_STD", "build_backbone",
    "config_class", "family_module", "instantiate_backbone", "load_backbone", "normalize_images",
    "read_backbone_metadata", "resolve_config", "save_backbone",
]
