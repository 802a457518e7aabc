"""Hiera checkpoints (transformers `HieraModel` or facebookresearch/hiera `.pth`) -> Flax params.

Key mapping (S = stage, L = layer within the stage, N = global block index = sum(depths[:S]) + L).
Official `.pth` (`model_state`) -> HF `HieraModel`:

    patch_embed.proj.{weight,bias}   -> embeddings.patch_embeddings.projection.{weight,bias}
    pos_embed (1, tokens, C)         -> embeddings.position_embeddings
    blocks.N.norm1.*                 -> encoder.stages.S.layers.L.layernorm_before.*
    blocks.N.attn.qkv.*              -> encoder.stages.S.layers.L.attn.qkv.*
    blocks.N.attn.proj.*             -> encoder.stages.S.layers.L.attn.proj.*
    blocks.N.norm2.*                 -> encoder.stages.S.layers.L.layernorm_after.*
    blocks.N.mlp.fc1.*, mlp.fc2.*    -> encoder.stages.S.layers.L.mlp.fc1.*, mlp.fc2.*
    blocks.N.proj.* (width change)   -> encoder.stages.S.layers.0.proj.*
    norm.{weight,bias}               -> pooler.layernorm.{weight,bias}
    head.projection.* (classifier)   -> ignored

HF `HieraModel` -> Flax (`nnx.state(Hiera, nnx.Param)`):

    embeddings.patch_embeddings.projection.weight (O, I, kh, kw) -> patch_embed.kernel (kh, kw, I, O)
    embeddings.patch_embeddings.projection.bias                  -> patch_embed.bias
    embeddings.position_embeddings                               -> position_embeddings
    encoder.stages.S.layers.L.<linear>.weight (O, I)             -> stages.S.<layer>.<linear>.kernel (I, O)
    encoder.stages.S.layers.L.<linear>.bias                      -> stages.S.<layer>.<linear>.bias
    encoder.stages.S.layers.L.<norm>.{weight,bias}               -> stages.S.<layer>.<norm>.{scale,bias}
    pooler.layernorm.{weight,bias}                               -> pooler_norm.{scale,bias}

with <linear> in attn.qkv, attn.proj, mlp.fc1, mlp.fc2, proj and <norm> in layernorm_before,
layernorm_after (the same sub-module names as HF).
`<layer>` is `first_layer` for L = 0 and `layers` (stacked on a leading axis at index L - 1, the
layers run as one scan) for L >= 1. Linear weights (O, I) become kernels (I, O); LayerNorm
`weight` becomes `scale`. HF keys may carry a `hiera.` prefix (HieraForImageClassification /
HieraForPreTraining checkpoints); `classifier.*` and the MAE decoder are ignored, and an MAE
encoder (no pooler) gets the initial pooler norm, as below.
Official MAE pre-training checkpoints (`mae_in1k`: `encoder_norm`, `decoder_*`, `mask_token`,
`multi_scale_fusion_heads.*`, no `norm`) convert too: the decoder is ignored and the pooler norm
keeps the official init (weight 1, bias 0.02), exactly what the official `torch.hub` loader leaves
in a `Hiera` model.
The official hub format (a directory with the `Hiera(**config)` arguments as config.json, e.g.
`stages`, `q_pool`, `head_mul`, and the official keys in model.safetensors) converts too.
Video checkpoints (3-D patch embedding, `pos_embed_spatial` / `pos_embed_temporal`, `sep_pos_embed`,
HF `use_separate_position_embedding`) are refused.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from converters.common import check_keys, float32_reader
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.models.backbones import variant_config
from nexvitad_jax.models.hiera import VARIANTS, Hiera, HieraConfig, from_hf_config

FAMILY = "hiera"
HUB_IDS: dict[str, str] = {name: f"facebook/hiera-{name}-224-hf" for name in VARIANTS}

# Official keys that belong to heads this encoder does not have.
_IGNORED_OFFICIAL_PREFIXES = ("head.", "decoder_", "multi_scale_fusion_heads.")
_IGNORED_OFFICIAL_KEYS = ("mask_token", "encoder_norm.weight", "encoder_norm.bias")
_IGNORED_HF_PREFIXES = ("classifier.", "decoder.", "multiscale_fusion.", "encoder_norm.")

_LAYER_PARTS = {
    # HF sub-module -> (official sub-module, Flax sub-module path)
    "layernorm_before": ("norm1", ("layernorm_before",)),
    "attn.qkv": ("attn.qkv", ("attn", "qkv")),
    "attn.proj": ("attn.proj", ("attn", "proj")),
    "layernorm_after": ("norm2", ("layernorm_after",)),
    "mlp.fc1": ("mlp.fc1", ("mlp", "fc1")),
    "mlp.fc2": ("mlp.fc2", ("mlp", "fc2")),
    "proj": ("proj", ("proj",)),
}
_NORMS = ("layernorm_before", "layernorm_after")


def config_from_hf(hf_config: dict[str, Any]) -> HieraConfig:
    """HieraConfig from a config.json: transformers' HieraConfig, or the official hub format
    (facebookresearch/hiera's `Hiera(**config)` arguments: `stages`, `q_pool`, `head_mul`, ...)."""
    if "stages" in hf_config and "depths" not in hf_config:
        return _config_from_official_hub(hf_config)
    return from_hf_config(hf_config)


def _config_from_official_hub(hub_config: dict[str, Any]) -> HieraConfig:
    """The official `Hiera.__init__` arguments -> HieraConfig (the defaults are Hiera's)."""
    if hub_config.get("sep_pos_embed"):
        raise UserInputError("this official Hiera config has sep_pos_embed (a video model); only the image "
                             "models are supported")
    if hub_config.get("norm_layer", "LayerNorm") != "LayerNorm":
        raise UserInputError(f"official Hiera config: norm_layer {hub_config['norm_layer']!r}; expected LayerNorm")
    depths = tuple(hub_config["stages"])
    # Hiera multiplies the width and the heads at every stage start, truncating each time.
    dims, heads = [hub_config.get("embed_dim", 96)], [hub_config.get("num_heads", 1)]
    for _ in depths[1:]:
        dims.append(int(dims[-1] * hub_config.get("dim_mul", 2.0)))
        heads.append(int(heads[-1] * hub_config.get("head_mul", 2.0)))
    config = HieraConfig(
        embed_dim=dims[0], image_size=tuple(hub_config.get("input_size", (224, 224))),
        patch_size=tuple(hub_config.get("patch_kernel", (7, 7))),
        patch_stride=tuple(hub_config.get("patch_stride", (4, 4))),
        patch_padding=tuple(hub_config.get("patch_padding", (3, 3))),
        mlp_ratio=hub_config.get("mlp_ratio", 4.0), depths=depths, num_heads=tuple(heads),
        embed_dim_multiplier=hub_config.get("dim_mul", 2.0), num_query_pool=hub_config.get("q_pool", 3),
        query_stride=tuple(hub_config.get("q_stride", (2, 2))),
        masked_unit_size=tuple(hub_config.get("mask_unit_size", (8, 8))),
        masked_unit_attention=tuple(hub_config.get("mask_unit_attn", (True, True, False, False))),
        num_channels=hub_config.get("in_chans", 3))
    if config.stage_dims != tuple(dims):
        raise UserInputError(f"official Hiera config: stage widths {dims} are not embed_dim * dim_mul ** stage")
    return config


def _official_shape_summary(state_dict: dict[str, Any]) -> tuple[int, tuple[int, ...], int]:
    """(embed_dim, depths, token count) read off the official weights."""
    patch = state_dict.get("patch_embed.proj.weight")
    if patch is None:
        raise UserInputError("official Hiera checkpoint: no 'patch_embed.proj.weight'; is this a Hiera "
                             f".pth? (first keys: {sorted(state_dict)[:8]})")
    if len(np.shape(patch)) != 4 or "pos_embed_temporal" in state_dict:
        raise UserInputError("official Hiera checkpoint: this is a video Hiera (3-D patch embedding / "
                             "pos_embed_temporal); only the 2-D image models are supported")
    if "pos_embed" not in state_dict:
        raise UserInputError("official Hiera checkpoint: no 'pos_embed' (expected (1, tokens, embed_dim))")
    blocks = sorted({int(k.split(".")[1]) for k in state_dict if re.match(r"blocks\.\d+\.", k)})
    if blocks != list(range(len(blocks))) or not blocks:
        raise UserInputError(f"official Hiera checkpoint: block indices {blocks[:5]}... are not 0..N-1")
    # A stage starts at every block that changes width (it has a `proj`).
    starts = [0] + [n for n in blocks if f"blocks.{n}.proj.weight" in state_dict and n > 0]
    depths = tuple(b - a for a, b in zip(starts, starts[1:] + [len(blocks)]))
    return int(np.shape(patch)[0]), depths, int(np.shape(state_dict["pos_embed"])[1])


def config_from_official(state_dict: dict[str, Any], variant: str | None) -> HieraConfig:
    """HieraConfig of an official checkpoint; heads are not in the weights, so they come from the variant
    (given, or the one whose embed_dim and depths match)."""
    embed_dim, depths, tokens = _official_shape_summary(state_dict)
    side = math.isqrt(tokens)
    found = f"embed_dim {embed_dim}, depths {depths}"
    if variant is not None:
        base = variant_config(FAMILY, variant)
        if (base.embed_dim, base.depths) != (embed_dim, depths):
            raise UserInputError(
                f"the checkpoint does not match Hiera variant {variant!r}: it has {found}, the variant has "
                f"embed_dim {base.embed_dim}, depths {base.depths}")
    else:
        matches = [name for name, c in VARIANTS.items() if (c.embed_dim, c.depths) == (embed_dim, depths)]
        if not matches:
            raise UserInputError(
                f"the official Hiera checkpoint ({found}) matches no known variant "
                f"({', '.join(f'{n}: {c.embed_dim}/{c.depths}' for n, c in VARIANTS.items())})")
        base = VARIANTS[matches[0]]
    patch_stride = base.patch_stride
    if side * side != tokens:
        raise UserInputError(f"official Hiera checkpoint: pos_embed has {tokens} tokens, not a square grid")
    image = (side * patch_stride[0], side * patch_stride[1])
    return HieraConfig(**{**base.to_dict(), "image_size": image})


def _hf_layer_key(stage: int, layer: int, part: str, leaf: str) -> str:
    return f"encoder.stages.{stage}.layers.{layer}.{part}.{leaf}"


def _expected_hf_shapes(config: HieraConfig) -> dict[str, tuple[int, ...]]:
    """Every HieraModel parameter name with its PyTorch shape."""
    c0 = config.embed_dim
    k = config.patch_size
    grid = [i // s for i, s in zip(config.image_size, config.patch_stride)]
    shapes = {
        "embeddings.patch_embeddings.projection.weight": (c0, config.num_channels, *k),
        "embeddings.patch_embeddings.projection.bias": (c0,),
        "embeddings.position_embeddings": (1, math.prod(grid), c0),
    }
    dim_in = c0
    for stage, depth in enumerate(config.depths):
        dim_out = config.stage_dims[stage]
        hidden = int(dim_out * config.mlp_ratio)
        for layer in range(depth):
            d_in = dim_in if layer == 0 else dim_out
            linear = {"attn.qkv": (3 * dim_out, d_in), "attn.proj": (dim_out, dim_out),
                      "mlp.fc1": (hidden, dim_out), "mlp.fc2": (dim_out, hidden)}
            if d_in != dim_out:
                linear["proj"] = (dim_out, d_in)
            for part, (o, i) in linear.items():
                shapes[_hf_layer_key(stage, layer, part, "weight")] = (o, i)
                shapes[_hf_layer_key(stage, layer, part, "bias")] = (o,)
            for part, width in (("layernorm_before", d_in), ("layernorm_after", dim_out)):
                shapes[_hf_layer_key(stage, layer, part, "weight")] = (width,)
                shapes[_hf_layer_key(stage, layer, part, "bias")] = (width,)
        dim_in = dim_out
    shapes["pooler.layernorm.weight"] = (dim_in,)
    shapes["pooler.layernorm.bias"] = (dim_in,)
    return shapes


def official_to_hf_names(config: HieraConfig) -> dict[str, str]:
    """Official `.pth` key -> HF HieraModel key, for every encoder parameter (the table above)."""
    names = {
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "pos_embed": "embeddings.position_embeddings",
        "norm.weight": "pooler.layernorm.weight",
        "norm.bias": "pooler.layernorm.bias",
    }
    block = 0
    for stage, depth in enumerate(config.depths):
        for layer in range(depth):
            for hf_part, (official_part, _) in _LAYER_PARTS.items():
                for leaf in ("weight", "bias"):
                    names[f"blocks.{block}.{official_part}.{leaf}"] = _hf_layer_key(stage, layer, hf_part, leaf)
            block += 1
    return names


def _initial_pooler_norm(config: HieraConfig, prefix: str, present: dict[str, Any]) -> dict[str, np.ndarray]:
    """The pooler LayerNorm an MAE checkpoint lacks, at its initial value: weight 1, bias 0.02 (official
    Hiera._init_weights and HF's init alike). The official loader (strict=False) leaves exactly this in
    a `Hiera`, and transformers' convert_hiera_to_hf.py copied it into the base HieraModel checkpoints."""
    width = config.stage_dims[-1]
    initial = {f"{prefix}.weight": np.ones((width,), np.float32),
               f"{prefix}.bias": np.full((width,), 0.02, np.float32)}
    return {k: v for k, v in initial.items() if k not in present}


def _hf_state_from_official(state_dict: dict[str, Any], config: HieraConfig, source: str) -> dict[str, Any]:
    to_hf = official_to_hf_names(config)
    hf_shapes = _expected_hf_shapes(config)
    state = {k: v for k, v in state_dict.items()
             if not (k.startswith(_IGNORED_OFFICIAL_PREFIXES) or k in _IGNORED_OFFICIAL_KEYS)}
    if "encoder_norm.weight" in state_dict:  # an MAE pre-training checkpoint has no final norm
        state.update(_initial_pooler_norm(config, "norm", state))
    expected = {name: hf_shapes[hf] for name, hf in to_hf.items() if hf in hf_shapes}
    check_keys(expected, {k: tuple(np.shape(v)) for k, v in state.items()}, source)
    return {to_hf[k]: v for k, v in state.items()}


def hf_state_dict(state_dict: dict[str, Any], config: HieraConfig, layout: str = "hf", *,
                  source: str = "the Hiera checkpoint") -> dict[str, Any]:
    """The checkpoint's encoder weights under transformers `HieraModel` names, keys checked (every
    missing, unknown or mis-shaped key listed); heads and decoders dropped."""
    # The official hub format (config.json + safetensors of `blocks.N.*`) arrives as a directory.
    if layout == "official" or (layout == "hf" and "patch_embed.proj.weight" in state_dict):
        return _hf_state_from_official(state_dict, config, source)
    if layout != "hf":
        raise UserInputError(f"unknown Hiera checkpoint layout {layout!r}; expected 'hf' or 'official'")
    hf_state = {}
    for key, value in state_dict.items():
        key = key.removeprefix("hiera.")
        if not key.startswith(_IGNORED_HF_PREFIXES):
            hf_state[key] = value
    if "encoder_norm.weight" in state_dict:  # HieraForPreTraining: its encoder has no pooler
        hf_state.update(_initial_pooler_norm(config, "pooler.layernorm", hf_state))
    check_keys(_expected_hf_shapes(config), {k: tuple(np.shape(v)) for k, v in hf_state.items()}, source)
    return hf_state


def convert(state_dict: dict[str, Any], config: HieraConfig, layout: str = "hf", *,
            source: str = "the Hiera checkpoint") -> dict:
    """State dict (numpy arrays) -> nested pure dict equal in structure to `nnx.state(Hiera, nnx.Param)`."""
    hf_state = hf_state_dict(state_dict, config, layout, source=source)
    get = float32_reader(hf_state)

    def linear(prefix: str) -> dict[str, np.ndarray]:
        return {"kernel": get(prefix + ".weight").T, "bias": get(prefix + ".bias")}

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    def layer_params(stage: int, layer: int) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for hf_part, (_, flax_path) in _LAYER_PARTS.items():
            prefix = f"encoder.stages.{stage}.layers.{layer}.{hf_part}"
            if prefix + ".weight" not in hf_state:
                continue  # `proj` exists only where the width changes
            leaf = norm(prefix) if hf_part in _NORMS else linear(prefix)
            node = params
            for part in flax_path[:-1]:
                node = node.setdefault(part, {})
            node[flax_path[-1]] = leaf
        return params

    weight = get("embeddings.patch_embeddings.projection.weight")
    params: dict[str, Any] = {
        "patch_embed": {"kernel": weight.transpose(2, 3, 1, 0),
                        "bias": get("embeddings.patch_embeddings.projection.bias")},
        "position_embeddings": get("embeddings.position_embeddings"),
        "pooler_norm": norm("pooler.layernorm"),
        "stages": {},
    }
    for stage, depth in enumerate(config.depths):
        stage_params: dict[str, Any] = {"first_layer": layer_params(stage, 0)}
        if depth > 1:
            repeated = [layer_params(stage, layer) for layer in range(1, depth)]
            stage_params["layers"] = _stack_trees(repeated)
        params["stages"][stage] = stage_params
    return params


def _stack_trees(trees: list[dict]) -> dict:
    """Stack equally-shaped nested dicts of arrays along a new leading axis (the scanned layers)."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: _stack_trees([t[k] for t in trees]) for k in first}
    return np.stack(trees)


def build_torch(config: HieraConfig):
    """transformers.HieraModel (eval mode, random init) of this config."""
    import transformers

    hf_config = transformers.HieraConfig(**config.to_dict())
    return transformers.HieraModel(hf_config).eval()


def torch_outputs(torch_model, images_nhwc_normalized: np.ndarray) -> list[np.ndarray]:
    """[stage maps NHWC (HF reshaped_hidden_states[1:], already channels-last), pooled]."""
    import torch

    pixels = torch.from_numpy(np.ascontiguousarray(np.asarray(images_nhwc_normalized, np.float32)
                                                   .transpose(0, 3, 1, 2)))
    if tuple(pixels.shape[-2:]) != tuple(torch_model.config.image_size):
        # HF's reroll is fixed to config.image_size: its stage maps exist only at that size.
        raise UserInputError(f"transformers' Hiera gives stage maps only at its image size "
                             f"{tuple(torch_model.config.image_size)}, got images of {tuple(pixels.shape[-2:])}")
    with torch.no_grad():
        out = torch_model(pixels, output_hidden_states=True)
    return [t.numpy() for t in out.reshaped_hidden_states[1:]] + [out.pooler_output.numpy()]


def flax_outputs(module: Hiera, images: np.ndarray) -> list[np.ndarray]:
    """[stage maps NHWC, pooled], in the order of `torch_outputs`, from one jitted forward."""
    import jax.numpy as jnp
    from flax import nnx

    @nnx.jit
    def forward(model, pixels):
        return model(pixels, return_pooled=True)

    maps, pooled = forward(module, jnp.asarray(images))
    return [np.asarray(m, np.float32) for m in maps] + [np.asarray(pooled, np.float32)]
