"""Configs: load one (a packaged name or a Python file with `get_config()`), apply overrides.

    load_config()                                  # the packaged demo config (nexvitad run's default)
    load_config("paper", ["train.epochs=10"])      # a packaged config by name, one field changed
    load_config("my_config.py", ["bank.k=20"])     # a file
    with_changes(config, {"train.lambda1": 0.0})   # a changed copy (experiment variants)

Override values are Python literals (`train.epochs=4`, `model.decoder_channels=(32,16,8)`,
`model.hiera_checkpoint="dir"`); a bare word is a string (`bank.features=hiera-adapted`). A field
keeps its type: a value of another type is refused with the field's name.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_collections

from nexvitad_jax import configs
from nexvitad_jax.errors import UserInputError


def _module_of_file(path: Path):
    if not path.is_file():
        raise UserInputError(f"config {str(path)!r}: no such file; expected a packaged config name "
                             f"({', '.join(configs.NAMES)}) or a Python file with get_config()")
    spec = importlib.util.spec_from_file_location(f"_nexvitad_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # any error of the user's file: report it, not a traceback into it
        raise UserInputError(f"config {path}: could not be executed ({type(error).__name__}: {error})") from error
    if not hasattr(module, "get_config"):
        raise UserInputError(f"config {path}: defines no get_config()")
    return module


def load_config(name_or_path: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`get_config()` of a packaged config (`paper`, `tiny`, `demo`; default `demo`) or of a Python
    file, then `section.field=value` overrides."""
    name = configs.DEFAULT if name_or_path is None else str(name_or_path)
    if name in configs.NAMES:
        module = importlib.import_module(f"nexvitad_jax.configs.{name}")
    else:
        module = _module_of_file(Path(name))
    return apply_overrides(module.get_config(), overrides)


def parse_override(item: str) -> tuple[str, Any]:
    """"train.epochs=4" -> ("train.epochs", 4); the value is a Python literal or a bare string."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserInputError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. train.epochs=4")
    try:
        return key.strip(), ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return key.strip(), text  # a bare word is a string


def set_field(config: ml_collections.ConfigDict, key: str, value: Any, *, source: str) -> None:
    """config[a][b]... = value for the dotted `key`; `source` names the change in errors."""
    *parents, last = key.split(".")
    target = config
    for depth, part in enumerate(parents):
        if not isinstance(target, ml_collections.ConfigDict) or part not in target:
            where = ".".join(parents[:depth]) or "the config"
            raise UserInputError(f"{source}: {where} has no section {part!r}; sections: {_fields(target)}")
        target = target[part]
    if not isinstance(target, ml_collections.ConfigDict) or last not in target:
        where = ".".join(parents) or "the config"
        raise UserInputError(f"{source}: {where} has no field {last!r}; fields: {_fields(target)}")
    try:
        target[last] = value
    except TypeError as error:  # a ConfigDict field keeps its type
        raise UserInputError(f"{source}: {error}") from None


def _fields(node) -> list[str]:
    return sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """`--set` overrides applied in order (in place; returns the config)."""
    for item in overrides:
        key, value = parse_override(item)
        set_field(config, key, value, source=f"--set {item!r}")
    return config


def with_changes(config: ml_collections.ConfigDict, changes: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted fields changed (the original is left alone)."""
    copy = config.copy_and_resolve_references()
    for key, value in changes.items():
        set_field(copy, key, value, source=f"config change {key}={value!r}")
    return copy


def config_dict(config) -> dict[str, Any]:
    """The config as JSON-able data (tuples become lists)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(data, default=str))


def uses_random_backbones(config) -> bool:
    """True unless both backbones come from converted checkpoints (config dicts of older records
    are read the same way)."""
    model = config["model"]
    return not (model["hiera_checkpoint"] and model["dinov2_checkpoint"])
