"""Backbones (Hiera, DINOv2) and the NexViTAD model; loading converted checkpoints.

`load_backbone(DIR)` reads what `python -m converters` wrote (DIR/config.json + the orbax
checkpoint DIR/params); `build_backbone(family, variant_or_config, rngs=...)` makes a randomly
initialized one. Family modules are imported lazily, so one missing family never breaks another.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nexvitad_jax.errors import UserInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CHECKPOINT_FORMAT_VERSION = 1

# family -> (module path, nnx.Module class name, config class name)
BACKBONE_FAMILIES: dict[str, tuple[str, str, str]] = {
    "hiera": ("nexvitad_jax.models.hiera", "Hiera", "HieraConfig"),
    "dinov2": ("nexvitad_jax.models.dinov2", "Dinov2", "Dinov2Config"),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def normalize_images(images: jax.Array) -> jax.Array:
    """Images in [0, 1], NHWC RGB -> normalized with the ImageNet mean/std both backbones expect."""
    mean = jnp.asarray(IMAGENET_MEAN, dtype=images.dtype)
    std = jnp.asarray(IMAGENET_STD, dtype=images.dtype)
    return (images - mean) / std


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


def resolve_config(family: str, variant_or_config: Any):
    """A variant name (e.g. 'small', 'huge'), a config dict or a config object -> the config object."""
    module = family_module(family)
    cls = config_class(family)
    if isinstance(variant_or_config, cls):
        return variant_or_config
    if isinstance(variant_or_config, dict):
        return cls.from_dict(variant_or_config)
    if isinstance(variant_or_config, str):
        variants = module.VARIANTS
        if variant_or_config not in variants:
            raise UserInputError(f"unknown {family} variant {variant_or_config!r}; expected one of {sorted(variants)}")
        return variants[variant_or_config]
    raise UserInputError(f"{family} backbone: expected a variant name, a config dict or a {cls.__name__}, "
                         f"got {type(variant_or_config).__name__}")


def _map_leaves(tree: Any, fn) -> Any:
    if isinstance(tree, dict):
        return {key: _map_leaves(value, fn) for key, value in tree.items()}
    return fn(tree)


def instantiate_backbone(family: str, config: Any, params: dict | None = None, *, dtype=jnp.float32,
                         param_dtype=jnp.float32, seed: int = 0) -> nnx.Module:
    """The family's nnx.Module: random init from `seed`, or `params` (a pure dict as
    `nnx.state(module, nnx.Param).to_pure_dict()`) put in place without running the initializers."""
    cls = getattr(family_module(family), BACKBONE_FAMILIES[family][1])

    def make() -> nnx.Module:
        return cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))

    if params is None:
        return make()
    module = nnx.eval_shape(make)
    state = nnx.state(module, nnx.Param)
    try:
        nnx.replace_by_pure_dict(state, _map_leaves(params, lambda a: jnp.asarray(a, dtype=param_dtype)))
    except (KeyError, ValueError) as error:
        raise UserInputError(f"{family} parameters do not fit the {family} config: {error}") from error
    nnx.update(module, state)
    return module


def build_backbone(family: str, variant_or_config: Any, *, rngs: nnx.Rngs, dtype=jnp.float32,
                   param_dtype=jnp.float32) -> nnx.Module:
    """A randomly initialized backbone ('hiera' or 'dinov2'), e.g. the tiny ones CI and the demo use."""
    config = resolve_config(family, variant_or_config)
    cls = getattr(family_module(family), BACKBONE_FAMILIES[family][1])
    return cls(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def read_backbone_metadata(directory: str | Path) -> dict[str, Any]:
    """DIR/config.json of a converted backbone, validated."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not directory.is_dir():
        raise UserInputError(f"{directory}: no such directory (expected a converted backbone from "
                             "`python -m converters`)")
    if not config_path.is_file():
        raise UserInputError(f"{config_path}: missing; {directory} is not a converted backbone "
                             "(run `python -m converters {hiera,dinov2} --source ... --out DIR`)")
    try:
        metadata = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"{config_path}: not valid JSON ({error})") from error
    missing = [key for key in ("family", "config", "format_version") if key not in metadata]
    if missing:
        raise UserInputError(f"{config_path}: missing fields {missing}")
    if metadata["format_version"] != CHECKPOINT_FORMAT_VERSION:
        raise UserInputError(f"{config_path}: format_version {metadata['format_version']!r}, this version "
                             f"reads {CHECKPOINT_FORMAT_VERSION}; convert the checkpoint again")
    if not (directory / "params").is_dir():
        raise UserInputError(f"{directory / 'params'}: missing (the orbax checkpoint of the weights)")
    return metadata


def load_backbone(directory: str | Path, *, dtype=None) -> tuple[nnx.Module, nnx.State]:
    """(module, params) from a converted checkpoint; `dtype` is the compute dtype (default: the
    stored parameter dtype)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).resolve()
    metadata = read_backbone_metadata(directory)
    family = metadata["family"]
    config = config_class(family).from_dict(metadata["config"])
    param_dtype = _DTYPES.get(metadata.get("dtype", "float32"))
    if param_dtype is None:
        raise UserInputError(f"{directory / 'config.json'}: dtype {metadata['dtype']!r}; expected one of {sorted(_DTYPES)}")
    module = nnx.eval_shape(lambda: instantiate_backbone(family, config, dtype=dtype or param_dtype,
                                                         param_dtype=param_dtype))
    abstract = nnx.state(module, nnx.Param).to_pure_dict()
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract)
    try:
        restored = ocp.StandardCheckpointer().restore(directory / "params", _string_keys(target))
    except Exception as error:  # orbax raises many types for unreadable or mismatched checkpoints
        raise UserInputError(f"{directory / 'params'}: could not restore the {family} weights ({error})") from error
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, _restore_keys(restored, abstract))
    nnx.update(module, state)
    return module, nnx.state(module, nnx.Param)


def _string_keys(tree: Any) -> Any:
    """Orbax stores dict keys as strings; nnx lists/stacks use int keys."""
    if isinstance(tree, dict):
        return {str(key): _string_keys(value) for key, value in tree.items()}
    return tree


def _restore_keys(restored: Any, reference: Any) -> Any:
    """Put back the key types of `reference` (ints for nnx.List entries) on an orbax-restored tree."""
    if isinstance(reference, dict):
        return {key: _restore_keys(restored[str(key)], value) for key, value in reference.items()}
    return np.asarray(restored) if not isinstance(restored, jax.Array) else restored


def save_backbone(directory: str | Path, family: str, config: Any, params: dict, *, variant: str,
                  source: str, dtype: str = "float32") -> Path:
    """Write DIR/params (orbax) and DIR/config.json; the inverse of `load_backbone`."""
    import orbax.checkpoint as ocp

    if dtype not in _DTYPES:
        raise UserInputError(f"dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    tree = _string_keys(_map_leaves(params, lambda a: np.asarray(jnp.asarray(a, _DTYPES[dtype]))))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", tree, force=True)
    checkpointer.wait_until_finished()
    metadata = {"family": family, "variant": variant, "config": dataclasses.asdict(config)
                if dataclasses.is_dataclass(config) else config.to_dict(), "source": source,
                "dtype": dtype, "format_version": CHECKPOINT_FORMAT_VERSION}
    if hasattr(config, "to_dict"):
        metadata["config"] = config.to_dict()
    (directory / "config.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return directory
