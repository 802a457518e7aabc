"""DINOv2 checkpoints (transformers `Dinov2Model` / `Dinov2WithRegistersModel`, or the official
facebookresearch/dinov2 `.pth`) -> Flax params of `nexvitad_jax.models.dinov2.Dinov2`.

Key mapping (N = block index, D = hidden size, H = MLP width; Linear weights (O, I) become
kernels (I, O), LayerNorm `weight` becomes `scale`):

| official `.pth`                  | HF (current names; legacy names)                                  | Flax                          |
|----------------------------------|-------------------------------------------------------------------|-------------------------------|
| cls_token (1,1,D)                | embeddings.cls_token                                              | cls_token                     |
| pos_embed (1,1+g*g,D)            | embeddings.position_embeddings                                    | position_embeddings           |
| register_tokens (1,R,D)          | embeddings.register_tokens                                        | register_tokens               |
| mask_token (1,D)                 | embeddings.mask_token                                             | ignored (pre-training only)   |
| patch_embed.proj.weight (D,3,p,p)| embeddings.patch_embeddings.projection.weight                    | patch_kernel (p,p,3,D)        |
| patch_embed.proj.bias            | embeddings.patch_embeddings.projection.bias                      | patch_bias                    |
| blocks.N.norm1.*                 | encoder.layer.N.norm1.*                                           | layers.norm1.{scale,bias}[N]  |
| blocks.N.attn.qkv.* (3D,D) fused | encoder.layer.N.attention.{q,k,v}_proj.*; legacy attention.attention.{query,key,value}.* | layers.attention.qkv[N] (D,3D), q|k|v |
| blocks.N.attn.proj.*             | encoder.layer.N.attention.o_proj.*; legacy attention.output.dense.* | layers.attention.proj[N]    |
| blocks.N.ls1.gamma / ls2.gamma   | encoder.layer.N.layer_scale1.lambda1 / layer_scale2.lambda1       | layers.layer_scale1/2[N]      |
| blocks.N.norm2.*                 | encoder.layer.N.norm2.*                                           | layers.norm2[N]               |
| blocks.N.mlp.fc1.* / fc2.*       | encoder.layer.N.mlp.fc1.* / fc2.*                                 | layers.mlp.fc1/fc2[N]         |
| blocks.N.mlp.w12.* (2H,D) (SwiGLU, gate rows first) | encoder.layer.N.mlp.gate_proj.* + up_proj.*; legacy mlp.weights_in.* (2H,D) | layers.mlp.gate_up[N] (D,2H), gate|up |
| blocks.N.mlp.w3.*                | encoder.layer.N.mlp.down_proj.*; legacy mlp.weights_out.*         | layers.mlp.down[N]            |
| norm.*                           | layernorm.*                                                       | layernorm                     |

`[N]`: the layers are stacked on a leading axis (run as one scan). HF keys may carry a `dinov2.` or
`dinov2_with_registers.` prefix (classification checkpoints); `classifier.*` and the official
`head.*` are ignored. Official checkpoints carry no config: the width, depth, patch size, SwiGLU and
registers are read off the weights, the head count assumes DINOv2's head width of 64 (all released
models) unless --variant names one.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from converters.common import check_keys, float32_reader
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.models.backbones import variant_config
from nexvitad_jax.models.dinov2 import Dinov2, Dinov2Config, from_hf_config, to_hf_config

FAMILY = "dinov2"
HUB_IDS: dict[str, str] = {
    **{name: f"facebook/dinov2-{name}" for name in ("small", "base", "large", "giant")},
    **{f"{name}-reg": f"facebook/dinov2-with-registers-{name}" for name in ("small", "base", "large", "giant")},
}

_HF_PREFIXES = ("dinov2.", "dinov2_with_registers.")
_IGNORED_HF = ("classifier.", "embeddings.mask_token", "mask_token")
_IGNORED_OFFICIAL = ("head.", "mask_token")
# Legacy transformers names -> the current ones (transformers' own conversion_mapping does the same).
_LEGACY_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
    ("mlp.weights_out.", "mlp.down_proj."),
)
_OFFICIAL_BLOCK_RENAMES = {
    "norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "ls1.gamma": "layer_scale1.lambda1",
    "ls2.gamma": "layer_scale2.lambda1", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mlp.w3": "mlp.down_proj",
}
HEAD_DIM = 64


def config_from_hf(hf_config: dict[str, Any]) -> Dinov2Config:
    """Dinov2Config from a transformers config.json dict."""
    return from_hf_config(hf_config)


def _shape(state_dict: dict[str, Any], key: str) -> tuple[int, ...]:
    return tuple(np.shape(state_dict[key]))


def _config_read_off(state_dict: dict[str, Any]) -> Dinov2Config:
    """Dinov2Config of an official facebookresearch/dinov2 state dict, as far as the weights tell
    (the head count assumes DINOv2's head width of 64)."""
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token"):
        if key not in state_dict:
            raise UserInputError(f"official DINOv2 checkpoint: no {key!r}; is this a facebookresearch/dinov2 "
                                 f".pth? (first keys: {sorted(state_dict)[:8]})")
    patch_shape = _shape(state_dict, "patch_embed.proj.weight")
    if len(patch_shape) != 4 or patch_shape[2] != patch_shape[3]:
        raise UserInputError(f"official DINOv2 checkpoint: patch_embed.proj.weight has shape {patch_shape}; "
                             "expected (hidden, channels, patch, patch)")
    hidden, channels, patch, _ = patch_shape
    blocks = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise UserInputError("official DINOv2 checkpoint: expected blocks.0 ... blocks.N-1 (chunked "
                             f"'blocks.C.N' checkpoints are not supported); found block indices {blocks[:8]}")
    positions = _shape(state_dict, "pos_embed")[1] - 1
    grid = int(round(positions ** 0.5))
    if grid * grid != positions:
        raise UserInputError(f"official DINOv2 checkpoint: pos_embed holds {positions} patch positions, not a square grid")
    swiglu = "blocks.0.mlp.w12.weight" in state_dict
    mlp_hidden = _shape(state_dict, "blocks.0.mlp.w12.weight")[0] // 2 if swiglu else \
        _shape(state_dict, "blocks.0.mlp.fc1.weight")[0] if "blocks.0.mlp.fc1.weight" in state_dict else 4 * hidden
    registers = _shape(state_dict, "register_tokens")[1] if "register_tokens" in state_dict else 0
    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=len(blocks), num_attention_heads=max(hidden // HEAD_DIM, 1),
        mlp_ratio=4.0 if swiglu else mlp_hidden / hidden, image_size=grid * patch, patch_size=patch,
        num_channels=channels, qkv_bias="blocks.0.attn.qkv.bias" in state_dict, use_swiglu_ffn=swiglu,
        num_register_tokens=registers, interpolate_antialias=registers > 0)


def config_from_official(state_dict: dict[str, Any], variant: str | None) -> Dinov2Config:
    """Dinov2Config read off an official facebookresearch/dinov2 state dict (checked against `variant`)."""
    found = _config_read_off(state_dict)
    if variant is None:
        return found
    expected = variant_config(FAMILY, variant)
    mismatched = {name: (getattr(found, name), getattr(expected, name))
                  for name in ("hidden_size", "num_hidden_layers", "use_swiglu_ffn", "num_register_tokens",
                               "patch_size")
                  if getattr(found, name) != getattr(expected, name)}
    if mismatched:
        details = ", ".join(f"{name}: checkpoint {got}, {variant} {want}" for name, (got, want) in mismatched.items())
        raise UserInputError(f"--variant {variant} does not match the checkpoint ({details})")
    # The head count is not in the weights: take it from the named variant.
    return Dinov2Config(**{**found.to_dict(), "num_attention_heads": expected.num_attention_heads})


def expected_hf_shapes(config: Dinov2Config) -> dict[str, tuple[int, ...]]:
    """HF (current names) key -> shape of a Dinov2(WithRegisters)Model of this config (mask token aside)."""
    d, h, p = config.hidden_size, config.mlp_hidden_size, config.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.position_embeddings": (1, config.position_grid ** 2 + 1, d),
        "embeddings.patch_embeddings.projection.weight": (d, config.num_channels, p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,), "layernorm.bias": (d,),
    }
    if config.num_register_tokens:
        shapes["embeddings.register_tokens"] = (1, config.num_register_tokens, d)
    for n in range(config.num_hidden_layers):
        layer = f"encoder.layer.{n}."
        for name in ("norm1", "norm2"):
            shapes[layer + name + ".weight"] = shapes[layer + name + ".bias"] = (d,)
        for name in ("q_proj", "k_proj", "v_proj"):
            shapes[layer + f"attention.{name}.weight"] = (d, d)
            if config.qkv_bias:
                shapes[layer + f"attention.{name}.bias"] = (d,)
        shapes[layer + "attention.o_proj.weight"] = (d, d)
        shapes[layer + "attention.o_proj.bias"] = (d,)
        shapes[layer + "layer_scale1.lambda1"] = shapes[layer + "layer_scale2.lambda1"] = (d,)
        if config.use_swiglu_ffn:
            for name in ("gate_proj", "up_proj"):
                shapes[layer + f"mlp.{name}.weight"] = (h, d)
                shapes[layer + f"mlp.{name}.bias"] = (h,)
            shapes[layer + "mlp.down_proj.weight"] = (d, h)
            shapes[layer + "mlp.down_proj.bias"] = (d,)
        else:
            shapes[layer + "mlp.fc1.weight"] = (h, d)
            shapes[layer + "mlp.fc1.bias"] = (h,)
            shapes[layer + "mlp.fc2.weight"] = (d, h)
            shapes[layer + "mlp.fc2.bias"] = (d,)
    return shapes


def _split_rows(state: dict[str, Any], key: str, targets: tuple[str, ...]) -> None:
    """Replace a fused (k*O, ...) weight or bias by k equal row blocks (transformers' Chunk(dim=0))."""
    value = np.asarray(state.pop(key))
    if value.shape[0] % len(targets):
        raise UserInputError(f"{key}: first dimension {value.shape[0]} does not split into {len(targets)} "
                             f"equal parts ({', '.join(targets)})")
    for target, part in zip(targets, np.split(value, len(targets), axis=0)):
        state[target] = part


def _hf_from_legacy(state_dict: dict[str, Any]) -> dict[str, Any]:
    """HF state dict with any prefix stripped and legacy names renamed to the current ones."""
    state: dict[str, Any] = {}
    for key, value in state_dict.items():
        for prefix in _HF_PREFIXES:
            key = key.removeprefix(prefix)
        if key.startswith(_IGNORED_HF):
            continue
        for old, new in _LEGACY_RENAMES:
            key = key.replace(old, new)
        state[key] = value
    for key in [k for k in state if k.endswith(("mlp.weights_in.weight", "mlp.weights_in.bias"))]:
        stem, leaf = key.rsplit(".mlp.weights_in.", 1)
        _split_rows(state, key, (f"{stem}.mlp.gate_proj.{leaf}", f"{stem}.mlp.up_proj.{leaf}"))
    return state


def _hf_from_official(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Official facebookresearch/dinov2 names -> HF (current) names (as convert_dinov2_to_hf.py)."""
    state: dict[str, Any] = {}
    top = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "register_tokens": "embeddings.register_tokens",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    for key, value in state_dict.items():
        if key.startswith(_IGNORED_OFFICIAL):
            continue
        if key in top:
            state[top[key]] = value
            continue
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)", key)
        if match is None:
            state[key] = value  # reported as unknown by check_keys
            continue
        n, part, leaf = match.groups()
        layer = f"encoder.layer.{n}."
        if part == "attn.qkv":
            state[key] = value
            _split_rows(state, key, tuple(layer + f"attention.{name}.{leaf}" for name in ("q_proj", "k_proj", "v_proj")))
        elif part == "mlp.w12":
            state[key] = value
            _split_rows(state, key, tuple(layer + f"mlp.{name}.{leaf}" for name in ("gate_proj", "up_proj")))
        elif part in ("ls1", "ls2"):
            state[layer + _OFFICIAL_BLOCK_RENAMES[f"{part}.gamma"]] = value
        elif part in _OFFICIAL_BLOCK_RENAMES:
            state[layer + f"{_OFFICIAL_BLOCK_RENAMES[part]}.{leaf}"] = value
        else:
            state[key] = value
    return state


def hf_state_dict(state_dict: dict[str, Any], config: Dinov2Config, layout: str, *,
                  source: str = "the DINOv2 checkpoint") -> dict[str, Any]:
    """Any supported layout -> the current transformers names, checked against the config."""
    if layout == "official":
        state = _hf_from_official(state_dict)
    elif layout == "hf":
        state = _hf_from_legacy(state_dict)
    else:
        raise UserInputError(f"unknown DINOv2 checkpoint layout {layout!r}; expected 'hf' or 'official'")
    check_keys(expected_hf_shapes(config), {k: tuple(np.shape(v)) for k, v in state.items()}, source)
    return state


def convert(state_dict: dict[str, Any], config: Dinov2Config, layout: str = "hf", *,
            source: str = "the DINOv2 checkpoint") -> dict:
    """State dict (numpy arrays) -> nested pure dict equal in structure to `nnx.state(Dinov2, nnx.Param)`."""
    state = hf_state_dict(state_dict, config, layout, source=source)
    get = float32_reader(state)

    def stacked(fn) -> np.ndarray:
        return np.stack([fn(f"encoder.layer.{n}.") for n in range(config.num_hidden_layers)])

    def linear(name: str) -> dict[str, np.ndarray]:
        return {"kernel": stacked(lambda p: get(p + name + ".weight").T),
                "bias": stacked(lambda p: get(p + name + ".bias"))}

    def fused(names: tuple[str, ...], with_bias: bool = True) -> dict[str, np.ndarray]:
        params = {"kernel": stacked(lambda p: np.concatenate([get(p + n + ".weight").T for n in names], axis=1))}
        if with_bias:
            params["bias"] = stacked(lambda p: np.concatenate([get(p + n + ".bias") for n in names]))
        return params

    def norm(name: str, layered: bool = True) -> dict[str, np.ndarray]:
        if not layered:
            return {"scale": get(name + ".weight"), "bias": get(name + ".bias")}
        return {"scale": stacked(lambda p: get(p + name + ".weight")), "bias": stacked(lambda p: get(p + name + ".bias"))}

    if config.use_swiglu_ffn:
        mlp = {"gate_up": fused(("mlp.gate_proj", "mlp.up_proj")), "down": linear("mlp.down_proj")}
    else:
        mlp = {"fc1": linear("mlp.fc1"), "fc2": linear("mlp.fc2")}
    params: dict[str, Any] = {
        "patch_kernel": get("embeddings.patch_embeddings.projection.weight").transpose(2, 3, 1, 0),
        "patch_bias": get("embeddings.patch_embeddings.projection.bias"),
        "cls_token": get("embeddings.cls_token"),
        "position_embeddings": get("embeddings.position_embeddings"),
        "layers": {
            "norm1": norm("norm1"),
            "attention": {"qkv": fused(("attention.q_proj", "attention.k_proj", "attention.v_proj"),
                                       config.qkv_bias),
                          "proj": linear("attention.o_proj")},
            "layer_scale1": stacked(lambda p: get(p + "layer_scale1.lambda1")),
            "norm2": norm("norm2"),
            "mlp": mlp,
            "layer_scale2": stacked(lambda p: get(p + "layer_scale2.lambda1")),
        },
        "layernorm": norm("layernorm", layered=False),
    }
    if config.num_register_tokens:
        params["register_tokens"] = get("embeddings.register_tokens")
    return params


def build_torch(config: Dinov2Config):
    """transformers Dinov2Model / Dinov2WithRegistersModel (eval mode, random init) of this config."""
    import transformers

    kwargs = to_hf_config(config)
    if config.num_register_tokens:
        return transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**kwargs)).eval()
    return transformers.Dinov2Model(transformers.Dinov2Config(**kwargs)).eval()


def torch_outputs(torch_model, images_nhwc_normalized: np.ndarray) -> list[np.ndarray]:
    """[patch grid NHWC (final layernorm), cls] from the transformers model."""
    import torch

    pixels = torch.from_numpy(np.ascontiguousarray(np.asarray(images_nhwc_normalized, np.float32).transpose(0, 3, 1, 2)))
    config = torch_model.config
    registers = getattr(config, "num_register_tokens", 0) if config.model_type == "dinov2_with_registers" else 0
    with torch.no_grad():
        sequence = torch_model(pixels).last_hidden_state.float().numpy()
    grid = (pixels.shape[2] // config.patch_size, pixels.shape[3] // config.patch_size)
    patches = sequence[:, 1 + registers:].reshape(sequence.shape[0], *grid, sequence.shape[-1])
    return [patches, sequence[:, 0]]


def flax_outputs(module: Dinov2, images: np.ndarray) -> list[np.ndarray]:
    """[patch grid NHWC, cls], in the order of `torch_outputs`, from one jitted forward."""
    import jax.numpy as jnp
    from flax import nnx

    patches, cls = nnx.jit(lambda model, pixels: model(pixels))(module, jnp.asarray(images))
    return [np.asarray(patches, np.float32), np.asarray(cls, np.float32)]
