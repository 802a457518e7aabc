"""Converted backbone checkpoints on disk: what `python -m converters` writes and `load_backbone` reads.

Layout (format_version 1), in a directory DIR:
- DIR/config.json: {"family", "variant", "config" (the config's `to_dict()`), "source", "dtype",
  "format_version"};
- DIR/params: an orbax StandardCheckpointer checkpoint of the parameters' pure dict
  (`nnx.state(module, nnx.Param).to_pure_dict()`) with every dict key a string (orbax stores
  string keys; nnx.List entries have int keys, put back on loading), stored in "dtype".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.models.backbones import build_backbone, config_class, resolve_config
from nexvitad_jax.models.layers import dtype_named

CHECKPOINT_FORMAT_VERSION = 1
_REQUIRED_FIELDS = ("family", "config", "format_version")


def _map_leaves(tree: Any, fn) -> Any:
    if isinstance(tree, dict):
        return {key: _map_leaves(value, fn) for key, value in tree.items()}
    return fn(tree)


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


def _abstract_backbone(family: str, config: Any, dtype, param_dtype) -> nnx.Module:
    """The family's module with shapes and dtypes only (no initializer runs)."""
    return nnx.eval_shape(lambda: build_backbone(family, config, rngs=nnx.Rngs(0), dtype=dtype,
                                                 param_dtype=param_dtype))


def _put_params(module: nnx.Module, params: dict, family: str) -> nnx.Module:
    """Set the module's parameters from a pure dict (as `nnx.state(module, nnx.Param).to_pure_dict()`)."""
    state = nnx.state(module, nnx.Param)
    try:
        nnx.replace_by_pure_dict(state, params)
    except (KeyError, ValueError) as error:
        raise UserInputError(f"{family} parameters do not fit the {family} config: {error}") from error
    nnx.update(module, state)
    return module


def instantiate_backbone(family: str, config: Any, params: dict | None = None, *, dtype=jnp.float32,
                         param_dtype=jnp.float32, seed: int = 0) -> nnx.Module:
    """The family's nnx.Module: random init from `seed`, or `params` (a pure dict as
    `nnx.state(module, nnx.Param).to_pure_dict()`) put in place without running the initializers."""
    if params is None:
        return build_backbone(family, config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)
    module = _abstract_backbone(family, config, dtype, param_dtype)
    return _put_params(module, _map_leaves(params, lambda a: jnp.asarray(a, dtype=param_dtype)), family)


def _read_metadata_file(directory: Path) -> dict[str, Any]:
    config_path = directory / "config.json"
    if not directory.is_dir():
        raise UserInputError(f"{directory}: no such directory (expected a converted backbone from "
                             "`python -m converters`)")
    if not config_path.is_file():
        raise UserInputError(f"{config_path}: missing; {directory} is not a converted backbone "
                             "(run `python -m converters {hiera,dinov2} --source ... --out DIR`)")
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"{config_path}: not valid JSON ({error})") from error


def read_backbone_metadata(directory: str | Path) -> dict[str, Any]:
    """DIR/config.json of a converted backbone, validated."""
    directory = Path(directory)
    config_path = directory / "config.json"
    metadata = _read_metadata_file(directory)
    missing = [key for key in _REQUIRED_FIELDS if key not in metadata]
    if missing:
        raise UserInputError(f"{config_path}: missing fields {missing}")
    if metadata["format_version"] != CHECKPOINT_FORMAT_VERSION:
        family, source = metadata.get("family", "{hiera,dinov2}"), metadata.get("source", "SOURCE")
        raise UserInputError(
            f"{config_path}: format_version {metadata['format_version']!r}, this version reads "
            f"{CHECKPOINT_FORMAT_VERSION}; re-create it with `python -m converters {family} --source {source} "
            f"--out {directory}`")
    if not (directory / "params").is_dir():
        raise UserInputError(f"{directory / 'params'}: missing (the orbax checkpoint of the weights)")
    return metadata


def _restore_params(path: Path, reference: dict, family: str) -> dict:
    """The orbax checkpoint at `path`, shaped and typed as the pure dict `reference`."""
    import orbax.checkpoint as ocp

    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), reference)
    try:
        restored = ocp.StandardCheckpointer().restore(path, _string_keys(target))
    except Exception as error:  # orbax raises many types for unreadable or mismatched checkpoints
        raise UserInputError(f"{path}: could not restore the {family} weights ({error})") from error
    return _restore_keys(restored, reference)


def load_backbone(directory: str | Path, *, dtype=None) -> tuple[nnx.Module, nnx.State]:
    """(module, params) from a converted checkpoint; `dtype` is the compute dtype (default: the
    stored parameter dtype)."""
    directory = Path(directory).resolve()
    metadata = read_backbone_metadata(directory)
    family = metadata["family"]
    config = config_class(family).from_dict(metadata["config"])
    param_dtype = dtype_named(metadata.get("dtype", "float32"), f"{directory / 'config.json'}: dtype")
    module = _abstract_backbone(family, config, dtype or param_dtype, param_dtype)
    params = _restore_params(directory / "params", nnx.state(module, nnx.Param).to_pure_dict(), family)
    _put_params(module, params, family)
    return module, nnx.state(module, nnx.Param)


def save_backbone(directory: str | Path, family: str, config: Any, params: dict, *, variant: str,
                  source: str, dtype: str = "float32") -> Path:
    """Write DIR/params (orbax) and DIR/config.json; the inverse of `load_backbone`."""
    import orbax.checkpoint as ocp

    param_dtype = dtype_named(dtype)
    config_dict = resolve_config(family, config).to_dict()
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    tree = _string_keys(_map_leaves(params, lambda a: np.asarray(jnp.asarray(a, param_dtype))))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", tree, force=True)
    checkpointer.wait_until_finished()
    metadata = {"family": family, "variant": variant, "config": config_dict, "source": source,
                "dtype": dtype, "format_version": CHECKPOINT_FORMAT_VERSION}
    (directory / "config.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return directory
