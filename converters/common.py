"""The converter pipeline shared by the backbone families: read a source, convert, save, verify.

A family module (`converters/hiera.py`, `converters/dinov2.py`) provides FAMILY, HUB_IDS,
config_from_hf, config_from_official, hf_state_dict (any layout -> the installed transformers'
names), convert, build_torch, torch_outputs and flax_outputs; this
module resolves the source (hub id, local HF directory, official `.pth`), checks keys, writes the
orbax checkpoint + config.json and runs the flax-vs-torch check.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from nexvitad_jax.errors import UserInputError

# family -> converter module, imported on first use (a missing family does not break the others)
CONVERTERS: dict[str, str] = {"hiera": "converters.hiera", "dinov2": "converters.dinov2"}
VERIFY_TOLERANCE = {"float32": 1e-5, "bfloat16": 5e-2}
VERIFY_IMAGE_SIZE = 224
_UNWRAP_KEYS = ("model_state", "model", "state_dict")


def converter_for(family: str):
    """The converter module of a family."""
    if family not in CONVERTERS:
        raise UserInputError(f"unknown backbone family {family!r}; expected one of {sorted(CONVERTERS)}")
    try:
        return importlib.import_module(CONVERTERS[family])
    except ImportError as error:
        raise UserInputError(f"the {family} converter is not available ({CONVERTERS[family]}: {error})") from error


def float32_reader(state: dict[str, Any]):
    """`get(name)`: the state dict's entry as a float32 numpy array (what the Flax trees hold)."""
    def get(name: str) -> np.ndarray:
        return np.asarray(state[name], dtype=np.float32)

    return get


def check_keys(expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise UserInputError listing every missing, unknown and mis-shaped key by name."""
    missing = sorted(set(expected) - set(got))
    unknown = sorted(set(got) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k]))
    if not (missing or unknown or misshaped):
        return
    lines = [f"{source}: the weights do not match the expected model"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
    if unknown:
        lines.append(f"  unknown keys ({len(unknown)}): " + ", ".join(unknown))
    if misshaped:
        lines.append(f"  mis-shaped keys ({len(misshaped)}): " + ", ".join(
            f"{k} (expected {tuple(expected[k])}, got {tuple(got[k])})" for k in misshaped))
    raise UserInputError("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Reading checkpoints.

def _sniff(path: Path) -> str:
    """'zip' (torch >= 1.6), 'pickle' (legacy torch), 'safetensors', or a description of what it is."""
    with path.open("rb") as handle:
        head = handle.read(16)
    if len(head) < 8:
        return f"an empty or truncated file ({path.stat().st_size} bytes)"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    header_length = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and 0 < header_length < path.stat().st_size:
        return "safetensors"
    known = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
             b"%PDF": "a PDF document", b"\x1f\x8b": "a gzip archive", b"\x89HDF": "an HDF5 file"}
    for magic, what in known.items():
        if head.startswith(magic):
            return what
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "an unrecognized binary file"


def _to_numpy(state: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    import torch

    arrays = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UserInputError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a "
                                 "state dict of tensors (optionally under 'model_state', 'model' or 'state_dict')")
        arrays[key] = value.detach().to(torch.float32).numpy() if value.is_floating_point() else value.numpy()
    return arrays


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, ValueError, OSError) as error:
        try:  # bf16 tensors cannot become numpy directly; read them through torch
            from safetensors.torch import load_file as load_torch_file

            return _to_numpy(load_torch_file(str(path)), path)
        except Exception:
            raise UserInputError(f"{path}: corrupt or truncated safetensors file ({error})") from error


def _read_torch_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """torch.load (weights only) of a `.pth`/`.bin`, unwrapped from a training checkpoint's dict."""
    import pickle
    import zipfile

    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(f"{path}: could not be read as a PyTorch checkpoint; the file is corrupt, truncated "
                             f"or holds more than weights ({first_line})") from error
    for key in _UNWRAP_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not loaded:
        raise UserInputError(f"{path}: holds a {type(loaded).__name__}, not a state dict of tensors")
    return _to_numpy({k.removeprefix("module."): v for k, v in loaded.items()}, path)


def read_torch_file(path: str | Path) -> dict[str, np.ndarray]:
    """A `.pth`/`.bin` (torch.load, weights only) or `.safetensors` file -> {key: numpy array}."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such file")
    kind = _sniff(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind not in ("zip", "pickle"):
        raise UserInputError(f"{path} is {kind}, not a PyTorch checkpoint (expected a .pth/.bin saved by "
                             "torch.save, or a .safetensors file)")
    return _read_torch_checkpoint(path)


def read_hf_directory(directory: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json dict, weights) of a local transformers model directory."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserInputError(f"{directory}: no config.json; expected a transformers model directory "
                             "(config.json + model.safetensors or pytorch_model.bin)")
    try:
        hf_config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"{config_path}: not valid JSON ({error})") from error
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = directory / index_name
        if index_path.is_file():  # sharded checkpoint
            try:
                shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as error:
                raise UserInputError(f"{index_path}: not a valid shard index ({error})") from error
            weights: dict[str, np.ndarray] = {}
            for shard in shards:
                weights.update(read_torch_file(directory / shard))
            return hf_config, weights
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return hf_config, read_torch_file(directory / name)
    raise UserInputError(f"{directory}: has config.json but no model.safetensors or pytorch_model.bin")


def download_hub(hub_id: str) -> Path:
    """Download a hub model (config + weights) through huggingface_hub, the transformers downloader."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, allow_patterns=["config.json", "*.safetensors", "*.bin", "*.json"]))
    except Exception as error:  # offline, unknown repo, no access: all mean "pass a local copy"
        raise UserInputError(
            f"could not download {hub_id!r} from the Hugging Face hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). If this machine is offline, download it "
            f"elsewhere (`huggingface-cli download {hub_id} --local-dir DIR`, or "
            f"`transformers.AutoModel.from_pretrained('{hub_id}').save_pretrained('DIR')`), copy DIR here "
            "and pass --source DIR") from error


@dataclasses.dataclass
class Source:
    """A resolved checkpoint: its weights, their layout, and the HF config when it has one."""

    description: str
    layout: str  # "hf" or "official"
    state_dict: dict[str, np.ndarray]
    hf_config: dict[str, Any] | None = None


def _looks_like_hf_layout(state_dict: dict[str, Any]) -> bool:
    return any(k.startswith(("embeddings.", "encoder.")) or ".embeddings." in k for k in state_dict)


def resolve_source(family: str, source: str) -> Source:
    """A hub id, a variant name (its hub id), a local HF directory, or a checkpoint file."""
    converter = converter_for(family)
    path = Path(source).expanduser()
    if path.is_dir():
        hf_config, weights = read_hf_directory(path)
        return Source(str(path), "hf", weights, hf_config)
    if path.is_file():
        weights = read_torch_file(path)
        if path.suffix == ".safetensors" and (path.parent / "config.json").is_file():
            return Source(str(path), "hf", weights, json.loads((path.parent / "config.json").read_text()))
        layout = "hf" if _looks_like_hf_layout(weights) else "official"
        if layout == "hf":
            raise UserInputError(f"{path}: holds transformers-named weights but no config.json beside it; pass "
                                 "the model directory (config.json + weights) as --source")
        return Source(str(path), "official", weights)
    hub_id = converter.HUB_IDS.get(source, source)
    if source.count("/") != 1 and source not in converter.HUB_IDS or source.startswith((".", "/", "~")):
        raise UserInputError(f"--source {source!r}: no such file or directory, and not a hub id (ORG/NAME) or a "
                             f"{family} variant ({', '.join(sorted(converter.HUB_IDS))})")
    directory = download_hub(hub_id)
    hf_config, weights = read_hf_directory(directory)
    return Source(hub_id, "hf", weights, hf_config)


# ----------------------------------------------------------------------------------------------
# The pipeline.

def variant_name(family: str, config: Any) -> str:
    """The VARIANTS name whose config equals `config`, else 'custom'."""
    from nexvitad_jax.models import family_module

    for name, candidate in family_module(family).VARIANTS.items():
        if candidate == config:
            return name
    return "custom"


def check_variant(family: str, config: Any, variant: str, source: str) -> None:
    """UserInputError when --variant disagrees with the checkpoint's architecture."""
    from nexvitad_jax.models.backbones import variant_config

    expected, found = variant_config(family, variant).to_dict(), config.to_dict()
    differing = [f"{key}: checkpoint {found[key]!r}, {variant} {expected[key]!r}"
                 for key in expected if key in found and found[key] != expected[key] and key != "image_size"]
    if differing:
        raise UserInputError(f"--variant {variant} does not match {source} (" + "; ".join(differing) + ")")


def load_source_config(family: str, src: Source, variant: str | None):
    converter = converter_for(family)
    if src.layout == "hf":
        config = converter.config_from_hf(src.hf_config)
        if variant is not None:
            check_variant(family, config, variant, src.description)
        return config
    return converter.config_from_official(src.state_dict, variant)


def _torch_model_with(family: str, config: Any, hf_state: dict[str, np.ndarray]):
    """The transformers model of `config` holding the checkpoint's weights (HF names)."""
    import torch

    torch_model = converter_for(family).build_torch(config)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf_state.items()}
    missing, unexpected = torch_model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if "mask_token" not in k]
    if missing or unexpected:
        raise UserInputError(f"--verify: the transformers model did not take the weights (missing {missing}, "
                             f"unexpected {unexpected})")
    return torch_model


def verify(family: str, config: Any, params: dict, hf_state: dict[str, np.ndarray], *, dtype: str = "float32",
           image_size: int = VERIFY_IMAGE_SIZE, batch: int = 2, seed: int = 0) -> list[float]:
    """Run the Flax module (converted params) and the transformers model (the checkpoint's weights)
    on one random batch; return max|flax - torch| / max|torch| per output, raise above tolerance."""
    from nexvitad_jax.models import instantiate_backbone
    from nexvitad_jax.models.layers import dtype_named

    converter = converter_for(family)
    torch_model = _torch_model_with(family, config, hf_state)
    param_dtype = dtype_named(dtype)
    module = instantiate_backbone(family, config, params, dtype=param_dtype, param_dtype=param_dtype)
    images = np.random.default_rng(seed).standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    errors = []
    for flax_out, torch_out in zip(converter.flax_outputs(module, images), converter.torch_outputs(torch_model, images)):
        errors.append(float(np.max(np.abs(flax_out - torch_out)) / max(np.max(np.abs(torch_out)), 1e-30)))
    if max(errors) > VERIFY_TOLERANCE[dtype]:
        raise UserInputError(f"--verify failed: max|flax - torch| / max|torch| = {max(errors):.3g} per output "
                             f"{[f'{e:.3g}' for e in errors]} exceeds {VERIFY_TOLERANCE[dtype]:g} ({dtype})")
    return errors


def convert_checkpoint(family: str, source: str, out: str | Path, *, variant: str | None = None,
                       dtype: str = "float32", run_verify: bool = False, log=print) -> dict[str, Any]:
    """The whole `python -m converters` job; returns the written config.json plus verify errors."""
    from nexvitad_jax.models import save_backbone

    if dtype not in VERIFY_TOLERANCE:
        raise UserInputError(f"--dtype {dtype!r}; expected one of {sorted(VERIFY_TOLERANCE)}")
    converter = converter_for(family)
    src = resolve_source(family, source)
    log(f"read {len(src.state_dict)} tensors from {src.description} ({src.layout} layout)")
    config = load_source_config(family, src, variant)
    params = converter.convert(src.state_dict, config, src.layout, source=src.description)
    name = variant or variant_name(family, config)
    directory = save_backbone(out, family, config, params, variant=name, source=src.description, dtype=dtype)
    log(f"wrote {family} ({name}) to {directory}")
    result = json.loads((directory / "config.json").read_text())
    if run_verify:
        from nexvitad_jax.models import load_backbone

        _, saved = load_backbone(directory)
        # The checkpoint's weights under the names of the installed transformers version.
        hf_state = converter.hf_state_dict(src.state_dict, config, src.layout, source=src.description)
        errors = verify(family, config, saved.to_pure_dict(), hf_state, dtype=dtype)
        log(f"verify: max|flax - torch| / max|torch| per output = {', '.join(f'{e:.2e}' for e in errors)} "
            f"(tolerance {VERIFY_TOLERANCE[dtype]:g})")
        result["verify_errors"] = errors
    return result


def set_offline_defaults() -> None:
    """Keep hub clients from hanging on a machine without network: fail fast instead."""
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
