"""Configs: load one (a packaged name or a Python file with `get_config()`), apply overrides.

    load_config()                                  # the packaged demo config (nexvitad run's default)
    load_config("paper", ["train.epochs=10"])      # a packaged config by name, one field changed
    load_config("my_config.py", ["bank.k=20"])     # a file
    with_changes(config, {"train.lambda1": 0.0})   # a changed copy (experiment variants)

Override values are Python literals (`train.epochs=4`, `model.decoder_channels=(32,16,8)`,
`model.hiera_checkpoint="dir"`); a bare word is a string (`bank.features=hiera-adapted`). A field
keeps its type: a value of another type is refused with the field's name. A backbone spec
(`model.hiera`, `model.dinov2`) also takes fields it does not list yet (`model.hiera.mlp_ratio=2.0`).

    check_config(config)                           # every problem of a whole config, in one error

`config_problems` checks every field of every section (unknown or missing fields, types, allowed
values and ranges, the backbone specs or converted checkpoints) and the combinations a run would trip
on (the image size vs Hiera's mask unit, K vs the memory bank's patches, ...); `nexvitad run` calls
it before writing anything.
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


# Sections that take fields they do not hold yet: a backbone spec names only what it changes.
OPEN_SECTIONS = ("model.hiera", "model.dinov2")


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
    open_section = ".".join(parents) in OPEN_SECTIONS  # any backbone config field (checked by config_problems)
    if not isinstance(target, ml_collections.ConfigDict) or (last not in target and not open_section):
        where = ".".join(parents) or "the config"
        raise UserInputError(f"{source}: {where} has no field {last!r}; fields: {_fields(target)}"
                             + _did_you_mean(config, last))
    try:
        target[last] = value
    except TypeError:  # a ConfigDict field keeps its type
        old = target[last]
        kinds = {bool: "True or False", int: "an integer", float: "a number", str: "a string", tuple: "a tuple",
                 list: "a list", ml_collections.ConfigDict: "a section"}
        kind = kinds.get(type(old), type(old).__name__)
        raise UserInputError(f"{source}: {key} takes {kind} (now {_shown(old)}), got {value!r} "
                             f"({type(value).__name__})") from None


def _shown(value) -> str:
    return "{" + ", ".join(sorted(value.keys())) + "}" if isinstance(value, ml_collections.ConfigDict) else repr(value)


def _did_you_mean(config, name: str) -> str:
    """"; did you mean model.dtype?" where a field of that name is in another section."""
    matches = [key for key in _leaves(config, {}) if key.rpartition(".")[2] == name]
    return f"; did you mean {' or '.join(matches)}?" if matches else ""


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


# ----------------------------------------------------------------------------- validation
# Every field of every section, checked before a run writes anything (`config_problems`), so a bad
# value is reported in one message with what was expected, not as a traceback hours into a run.

MAX_LISTED = 20  # problems listed in one error; the rest are counted


def problems_error(problems: Sequence[str], what: str) -> UserInputError:
    """One UserInputError listing `problems` (the first MAX_LISTED, then "and N more")."""
    listed = [f"  - {problem}" for problem in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        listed.append(f"  and {len(problems) - MAX_LISTED} more")
    count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
    return UserInputError(f"{what}: {count}:\n" + "\n".join(listed))


def _is_int(value) -> bool:
    import numpy as np

    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    import numpy as np

    return (_is_int(value) or isinstance(value, (float, np.floating))) and bool(np.isfinite(value))


def _integer(minimum: int):
    def check(value):
        return None if _is_int(value) and value >= minimum else f"an integer >= {minimum}"
    return check


def _number(minimum: float, maximum: float = float("inf"), *, above: bool = False):
    def check(value):
        ok = _is_number(value) and (value > minimum if above else value >= minimum) and value <= maximum
        bounds = f"> {minimum}" if above else f">= {minimum}"
        return None if ok else f"a number {bounds}" + (f" and <= {maximum}" if maximum != float("inf") else "")
    return check


def _boolean(value):
    return None if isinstance(value, bool) else "True or False"


def _string(value):
    return None if isinstance(value, str) else "a string"


def _one_of(choices):
    def check(value):
        return None if isinstance(value, str) and value in choices else f"one of {sorted(choices)}"
    return check


def _integers(minimum: int, length: int | None = None, *, distinct: bool = False):
    def check(value):
        ok = (isinstance(value, (list, tuple)) and all(_is_int(v) and v >= minimum for v in value)
              and (length is None or len(value) == length) and len(value) > 0
              and (not distinct or len(set(value)) == len(value)))
        count = f"{length} " if length is not None else "one or more "
        return None if ok else f"a tuple of {count}{'distinct ' if distinct else ''}integers >= {minimum}"
    return check


def _range_pair(value):
    ok = (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) and v > 0 for v in value)
          and value[0] <= value[1])
    return None if ok else "a (low, high) pair of positive numbers with low <= high"


def _field_checks() -> dict[str, Any]:
    """Dotted field -> a check returning None or what the field expects. `model.hiera` and
    `model.dinov2` (backbone specs) and the checkpoints are checked by `_backbone_problems`."""
    from nexvitad_jax.models.decoder import HEAD_BATCHING, UPCONV
    from nexvitad_jax.models.encoder import FEATURE_KINDS
    from nexvitad_jax.models.layers import DTYPES

    return {
        "seed": _integer(0),
        "data.image_size": _integer(32), "data.few_shot": _integer(1),
        "model.dtype": _one_of(DTYPES), "model.hiera": None, "model.dinov2": None,
        "model.hiera_checkpoint": _string, "model.dinov2_checkpoint": _string,
        "model.shared_source_head": _boolean, "model.decoder_channels": _integers(1),
        "model.upconv": _one_of(UPCONV), "model.pseudo_label_hidden": _integers(1),
        "model.head_batching": _one_of(HEAD_BATCHING),
        "train.source_per_class": _integer(1), "train.target_per_class": _integer(1),
        "train.epochs": _integer(0), "train.phase1_epochs": _integer(0), "train.steps_per_epoch": _integer(0),
        "train.learning_rate": _number(0, above=True), "train.warmup_steps": _integer(0),
        "train.lambda1": _number(0), "train.lambda2": _number(0), "train.checkpoint_every": _integer(1),
        "train.fast_compile": _boolean, "train.feature_cache": _boolean,
        "train.augmentation.probability": _number(0, 1), "train.augmentation.scale_range": _range_pair,
        "train.augmentation.noise_std": _number(0),
        "bank.k": _integer(1), "bank.sigma": _number(0), "bank.features": _one_of(FEATURE_KINDS),
        "bank.layers": _integers(0, distinct=True),
        "bank.kmeans.epsilon": _number(0, above=True), "bank.kmeans.max_iters": _integer(1),
        "bank.kmeans.tol": _number(0),
        "eval.batch_size": _integer(1),
    }


def _leaves(node, checks: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The config's fields by dotted name; a section is entered unless `checks` names it a field."""
    found = {}
    for name, value in (node.items() if hasattr(node, "items") else ()):
        key = f"{prefix}{name}"
        if hasattr(value, "items") and key not in checks:
            found.update(_leaves(value, checks, key + "."))
        else:
            found[key] = value
    return found


def config_problems(config) -> list[str]:
    """Every problem of a whole config: unknown or missing fields, values of the wrong type or out
    of range, and the combinations the run would trip on (image size vs the backbone, K vs the
    bank's patches...). An empty list: the config is good to run."""
    checks = _field_checks()
    leaves = _leaves(config, checks)
    problems = []
    for key in sorted(set(leaves) - set(checks)):
        section = key.rpartition(".")[0]
        known = sorted({k[len(section) + 1:].split(".")[0] if section else k.split(".")[0]
                        for k in checks if not section or k.startswith(section + ".")})
        problems.append(f"{key}: unknown field; expected one of {section or 'the config'}'s fields {known}")
    bad = {key for key in checks if key not in leaves}
    problems += [f"{key}: missing" for key in sorted(bad)]
    for key, check in checks.items():
        expected = check(leaves[key]) if check is not None and key in leaves else None
        if expected:
            problems.append(f"{key} = {leaves[key]!r}: expected {expected}")
            bad.add(key)
    if bad & {"model.hiera", "model.dinov2", "model.hiera_checkpoint", "model.dinov2_checkpoint"}:
        return problems
    backbones = _backbone_problems(config, problems)
    return problems + _combination_problems(config, backbones, bad)


def _backbone_problems(config, problems: list[str]) -> dict[str, Any]:
    """Appends the problems of `model.hiera`/`model.dinov2` (or their checkpoints) to `problems`;
    returns the backbone configs that resolved ({family: config})."""
    from nexvitad_jax.models import read_backbone_metadata
    from nexvitad_jax.models.backbones import config_class, resolve_config

    resolved = {}
    for family in ("hiera", "dinov2"):
        checkpoint = config.model[f"{family}_checkpoint"]
        try:
            if checkpoint:
                metadata = read_backbone_metadata(checkpoint)
                if metadata.get("family") != family:
                    raise UserInputError(f"holds a {metadata.get('family')} backbone, not {family}")
                resolved[family] = config_class(family).from_dict(metadata["config"])
            else:
                spec = config.model[family]
                _backbone_field_types(family, spec.to_dict() if hasattr(spec, "to_dict") else spec)
                resolved[family] = resolve_config(family, spec)
        except (UserInputError, TypeError, ValueError) as error:
            where = f"model.{family}_checkpoint" if checkpoint else f"model.{family}"  # the error names the path
            problems.append(f"{where}: {error}")
    return resolved


def _backbone_field_types(family: str, spec) -> None:
    """A backbone spec's fields have their config class's types (a variant name aside)."""
    import dataclasses

    from nexvitad_jax.models.backbones import config_class

    if not isinstance(spec, Mapping):
        return  # resolve_config says what it expects
    defaults = {field.name: field.default for field in dataclasses.fields(config_class(family))}
    for name, value in spec.items():
        default = defaults.get(name)
        if name == "variant" or name not in defaults:
            continue  # resolve_config names the variants and the known fields
        if isinstance(default, bool):
            expected = None if isinstance(value, bool) else "True or False"
        elif isinstance(default, int):
            expected = _integer(0)(value)
        elif isinstance(default, float):
            expected = _number(0)(value)
        elif isinstance(default, str):
            expected = _string(value)
        else:  # a tuple: of bools or of integers
            kind = bool if default and isinstance(default[0], bool) else int
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(v, bool) if kind is bool else _is_int(v) for v in value)
            expected = None if ok else f"a list of {'booleans' if kind is bool else 'integers'}"
        if expected:
            raise UserInputError(f"field {name} = {value!r}: expected {expected}")


def _combination_problems(config, backbones: dict[str, Any], bad: set[str]) -> list[str]:
    """What the fields, each good alone, would trip on together (those in `bad` are left out)."""
    problems = []
    train = config.train
    if not bad & {"train.epochs", "train.phase1_epochs"} and train.phase1_epochs > train.epochs:
        problems.append(f"train.phase1_epochs = {train.phase1_epochs}: expected <= train.epochs = {train.epochs}")
    hiera = backbones.get("hiera")
    if hiera is None:
        return problems
    stages = len(hiera.depths)
    if "model.decoder_channels" not in bad and len(config.model.decoder_channels) != stages - 1:
        problems.append(f"model.decoder_channels = {tuple(config.model.decoder_channels)}: expected {stages - 1} "
                        f"widths (one per up-step over the {stages} Hiera stages)")
    if "bank.layers" not in bad and any(layer >= stages for layer in config.bank.layers):
        problems.append(f"bank.layers = {tuple(config.bank.layers)}: expected layer indices in 0..{stages - 1}")
        bad = bad | {"bank.layers"}
    if "data.image_size" in bad:
        return problems
    size, unit = int(config.data.image_size), [m * s for m, s in zip(hiera.masked_unit_size, hiera.patch_stride)]
    if any(size % u for u in unit):
        problems.append(f"data.image_size = {size}: expected a multiple of {max(unit)} (Hiera's mask unit "
                        f"{tuple(hiera.masked_unit_size)} x patch stride {tuple(hiera.patch_stride)})")
    elif not bad & {"bank.layers", "bank.k", "data.few_shot"}:
        problems += _bank_size_problems(config, hiera)
    return problems


def _bank_size_problems(config, hiera) -> list[str]:
    """K prototypes need at least K patches in each layer's bank (M images x its grid)."""
    from nexvitad_jax.models.hiera import stage_grids

    size, m, k = int(config.data.image_size), int(config.data.few_shot), int(config.bank.k)
    grids = [grid for grid, _ in stage_grids(hiera, tuple(size // s for s in hiera.patch_stride))]
    problems = []
    for layer in config.bank.layers:
        if layer < len(grids) and m * grids[layer][0] * grids[layer][1] < k:
            h, w = grids[layer]
            problems.append(f"bank.k = {k}: layer {layer} has {m} images (data.few_shot) x {h}x{w} patches = "
                            f"{m * h * w} patches, fewer than K; expected bank.k <= {m * h * w}")
    return problems


def check_config(config) -> None:
    """UserInputError listing every problem of the config (`config_problems`), if any."""
    problems = config_problems(config)
    if problems:
        raise problems_error(problems, "config")
