"""The backbone families (Hiera, DINOv2) by name: their modules, configs and random-init builder.

Family modules are imported lazily, so one missing family never breaks another.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from nexvitad_jax.errors import UserInputError

# family -> (module path, nnx.Module class name, config class name)
BACKBONE_FAMILIES: dict[str, tuple[str, str, str]] = {
    "hiera": ("nexvitad_jax.models.hiera", "Hiera", "HieraConfig"),
    "dinov2": ("nexvitad_jax.models.dinov2", "Dinov2", "Dinov2Config"),
}


def family_module(family: str):
    """The model module of a backbone family (imported on first use)."""
    if family not in BACKBONE_FAMILIES:
        raise UserInputError(f"unknown backbone family {family!r}; expected one of {sorted(BACKBONE_FAMILIES)}")
    module_path = BACKBONE_FAMILIES[family][0]
    try:
        return importlib.import_module(module_path)
    except ImportError as error:
        raise UserInputError(f"backbone family {family!r} is not available ({module_path}: {error})") from error


def config_class(family: str):
    return getattr(family_module(family), BACKBONE_FAMILIES[family][2])


def module_class(family: str):
    return getattr(family_module(family), BACKBONE_FAMILIES[family][1])


def variant_config(family: str, variant: str):
    """The config of a named variant of a family (its VARIANTS entry)."""
    variants = family_module(family).VARIANTS
    if not isinstance(variant, str) or variant not in variants:
        raise UserInputError(f"unknown {family} variant {variant!r}; expected one of {sorted(variants)}")
    return variants[variant]


def resolve_config(family: str, spec: Any):
    """A family's config object from any of the forms configs and callers use:

    - a variant name: 'small', 'huge', ...;
    - a config object (returned as is);
    - a dict or ml_collections ConfigDict of config fields, with an optional "variant" key: with it,
      that variant with the other fields replaced (`{"variant": "huge", "image_size": [448, 448]}`);
      without it, the family's defaults with the fields replaced (`Config.from_dict`).
    """
    cls = config_class(family)
    if isinstance(spec, cls):
        return spec
    if isinstance(spec, str):
        return variant_config(family, spec)
    if not isinstance(spec, Mapping) and callable(getattr(spec, "to_dict", None)):
        spec = spec.to_dict()  # an ml_collections ConfigDict
    if not isinstance(spec, Mapping):
        raise UserInputError(f"{family} backbone: expected a variant name, a config dict or a {cls.__name__}, "
                             f"got {type(spec).__name__}")
    fields = dict(spec)
    if "variant" not in fields:
        return cls.from_dict(fields)
    base = variant_config(family, fields.pop("variant"))
    return cls.from_dict({**base.to_dict(), **fields}) if fields else base


def build_backbone(family: str, spec: Any, *, rngs: nnx.Rngs, dtype=jnp.float32,
                   param_dtype=jnp.float32) -> nnx.Module:
    """A randomly initialized backbone ('hiera' or 'dinov2') of any `resolve_config` spec, e.g. the
    tiny ones CI and the demo use."""
    return module_class(family)(resolve_config(family, spec), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
