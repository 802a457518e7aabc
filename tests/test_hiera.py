"""Hiera port: parity with transformers.HieraModel on the same random weights, converter layouts, errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import hiera as hiera_converter
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.models import instantiate_backbone
from nexvitad_jax.models.hiera import VARIANTS, HieraConfig, from_hf_config, unroll_order

TOLERANCE = 1e-5  # max|flax - torch| / max|torch|, per output

# Tiny configurations covering the code paths: a one-layer stage (no scanned layers), mask-unit
# attention switching on and off between stages (HF keeps the previous stage's choice in a stage's
# first layer), fewer query-pool stages than stage boundaries (a leftover unroll at reroll),
# a non-square image, three stages and a 4x4 mask unit.
TINY_CONFIGS = {
    "default-pattern": HieraConfig(embed_dim=8, num_heads=(1, 1, 2, 2), depths=(1, 2, 2, 1),
                                   image_size=(64, 64)),
    "mua-alternating-qpool2-nonsquare": HieraConfig(
        embed_dim=8, num_heads=(2, 2, 4, 4), depths=(2, 1, 3, 2), image_size=(64, 96), num_query_pool=2,
        masked_unit_attention=(True, False, True, False), mlp_ratio=2.0),
    "three-stages-qpool1-global": HieraConfig(
        embed_dim=12, num_heads=(1, 2, 3), depths=(2, 2, 2), image_size=(32, 32), num_query_pool=1,
        masked_unit_size=(4, 4), masked_unit_attention=(False, False, False), hidden_act="gelu_new"),
}


def randomized_torch_model(config: HieraConfig, seed: int = 0):
    """HF HieraModel with every parameter perturbed, so constant inits (LayerNorm 1/0.02, biases 0.02)
    cannot hide a swapped or mis-transposed tensor."""
    torch.manual_seed(seed)
    model = hiera_converter.build_torch(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def hf_state_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def images(config: HieraConfig, batch: int = 2, size: tuple[int, int] | None = None, seed: int = 0):
    height, width = size or config.image_size
    return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(np.float32)


def relative_errors(reference: list[np.ndarray], ours: list[np.ndarray]) -> list[float]:
    assert [r.shape for r in reference] == [o.shape for o in ours]
    return [float(np.abs(o - r).max() / np.abs(r).max()) for r, o in zip(reference, ours)]


def official_state_from_hf(hf_state: dict[str, np.ndarray], config: HieraConfig) -> dict[str, np.ndarray]:
    """The facebookresearch/hiera layout, renamed independently of the converter's own table."""
    layer_parts = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attn.qkv": "attn.qkv",
                   "attn.proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "proj": "proj"}
    first_block = np.cumsum((0,) + config.depths)
    official = {}
    for key, value in hf_state.items():
        if key.startswith("encoder.stages."):
            _, _, stage, _, layer, rest = key.split(".", 5)
            part, leaf = rest.rsplit(".", 1)
            block = first_block[int(stage)] + int(layer)
            official[f"blocks.{block}.{layer_parts[part]}.{leaf}"] = value
        else:
            official[{
                "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
                "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
                "embeddings.position_embeddings": "pos_embed",
                "pooler.layernorm.weight": "norm.weight",
                "pooler.layernorm.bias": "norm.bias",
            }[key]] = value
    # The classifier head of the official ImageNet checkpoints, which the encoder ignores.
    official["head.projection.weight"] = np.ones((10, config.stage_dims[-1]), np.float32)
    official["head.projection.bias"] = np.zeros((10,), np.float32)
    return official


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny_pair(request):
    config = TINY_CONFIGS[request.param]
    torch_model = randomized_torch_model(config)
    params = hiera_converter.convert(hf_state_numpy(torch_model), config, "hf")
    return config, torch_model, instantiate_backbone("hiera", config, params)


def test_parity_with_transformers(tiny_pair):
    config, torch_model, flax_model = tiny_pair
    x = images(config)
    reference = hiera_converter.torch_outputs(torch_model, x)
    ours = hiera_converter.flax_outputs(flax_model, x)
    errors = relative_errors(reference, ours)
    print("fp32 relative errors (4 stages, pooled):", errors)
    assert max(errors) <= TOLERANCE
    assert [o.shape[-1] for o in ours[:-1]] == list(flax_model.stage_dims)


def test_stage_map_shapes_at_224():
    from flax import nnx

    from nexvitad_jax.models.hiera import Hiera

    config = dataclasses.replace(VARIANTS["tiny"], embed_dim=8, num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1))
    model = nnx.eval_shape(lambda: Hiera(config, rngs=nnx.Rngs(0)))
    maps, pooled = nnx.eval_shape(lambda m, x: m(x, return_pooled=True), model, jnp.zeros((1, 224, 224, 3)))
    assert [m.shape for m in maps] == [(1, 56, 56, 8), (1, 28, 28, 16), (1, 14, 14, 32), (1, 7, 7, 64)]
    assert pooled.shape == (1, 64) and model.stage_dims == (8, 16, 32, 64)


def test_usable_under_jax_and_nnx_transforms():
    """The backbone is called by raw jax transforms over closures and trained through by nnx.grad."""
    from flax import nnx

    from nexvitad_jax.models.hiera import Hiera

    config = TINY_CONFIGS["three-stages-qpool1-global"]  # small, with scanned layers
    model = Hiera(config, rngs=nnx.Rngs(0))
    x = jnp.asarray(images(config, batch=1))

    def loss(module, pixels):
        return sum(jnp.mean(stage_map ** 2) for stage_map in module(pixels))

    grads = nnx.jit(nnx.grad(loss))(model, x)
    scanned = grads.stages[1].layers.mlp.fc1.kernel[...]  # a layer inside the scan
    assert scanned.shape[0] == config.depths[1] - 1 and float(jnp.abs(scanned).max()) > 0
    # A closure over the module inside a raw jax transform (nnx.scan would refuse this).
    assert jax.jit(jax.grad(lambda pixels: loss(model, pixels)))(x).shape == x.shape


def test_parity_interpolated_position_embeddings():
    """Another input size: position embeddings resized as HF's interpolate_pos_encoding (bicubic).

    HF's reroll is fixed to config.image_size, so at another size only its last stage (in spatial
    order once every unroll is consumed) and the pooled output exist. For all four maps, a second HF
    model built at the new size gets the embeddings resized by HF's own interpolate_pos_encoding."""
    config = TINY_CONFIGS["default-pattern"]
    size = (96, 128)
    torch_model = randomized_torch_model(config, seed=1)
    state = hf_state_numpy(torch_model)
    flax_model = instantiate_backbone("hiera", config, hiera_converter.convert(state, config))
    x = images(config, batch=1, size=size)
    ours = hiera_converter.flax_outputs(flax_model, x)
    with torch.no_grad():
        out = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), interpolate_pos_encoding=True)
        grid = (size[0] // 4, size[1] // 4)
        embeddings = torch_model.embeddings
        resized = embeddings.interpolate_pos_encoding(torch.zeros(1, grid[0] * grid[1], config.embed_dim),
                                                      embeddings.position_embeddings, *size)
    last = ours[-2]
    assert last.shape == (1, 3, 4, config.stage_dims[-1])
    errors = relative_errors([out.last_hidden_state.numpy(), out.pooler_output.numpy()],
                             [last.reshape(1, -1, last.shape[-1]), ours[-1]])
    print("interpolated fp32 relative errors (last stage, pooled):", errors)
    assert max(errors) <= TOLERANCE

    resized_config = dataclasses.replace(config, image_size=size)
    at_size = hiera_converter.build_torch(resized_config)
    at_size.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()} |
                            {"embeddings.position_embeddings": resized})
    errors = relative_errors(hiera_converter.torch_outputs(at_size, x), ours)
    print("interpolated fp32 relative errors (4 stages, pooled):", errors)
    assert max(errors) <= TOLERANCE


@pytest.mark.parametrize("grid_in, grid_out", [((8, 8), (12, 12)), ((14, 14), (9, 11)), ((6, 10), (6, 10))])
def test_position_embedding_resize_matches_torch_bicubic(grid_in, grid_out):
    from flax import nnx

    from nexvitad_jax.models.hiera import Hiera

    config = HieraConfig(embed_dim=5, num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1),
                         image_size=tuple(4 * g for g in grid_in))
    model = Hiera(config, rngs=nnx.Rngs(0))
    pos = np.random.default_rng(0).normal(size=(1, grid_in[0] * grid_in[1], 5)).astype(np.float32)
    model.position_embeddings[...] = jnp.asarray(pos)
    grid = torch.from_numpy(pos).reshape(1, *grid_in, 5).permute(0, 3, 1, 2)
    reference = torch.nn.functional.interpolate(grid, size=grid_out, mode="bicubic", align_corners=False)
    reference = reference.permute(0, 2, 3, 1).reshape(1, -1, 5).numpy()
    ours = np.asarray(model.position_embeddings_for(grid_out))
    assert ours.shape == reference.shape
    # float32 rounding only: torch sums the 16 taps in float32 in its own order.
    assert np.abs(ours - reference).max() <= TOLERANCE * np.abs(reference).max()


def test_torch_outputs_refuses_other_sizes():
    config = TINY_CONFIGS["default-pattern"]
    with pytest.raises(UserInputError, match="only at its image size"):
        hiera_converter.torch_outputs(hiera_converter.build_torch(config), images(config, size=(96, 96)))


def test_unroll_order_matches_transformers():
    from transformers.models.hiera.modeling_hiera import unroll

    for grid, schedule in [((16, 24), [(2, 2)] * 3), ((8, 8), [(2, 2)] * 2), ((12, 8), [(2, 2), (2, 2)])]:
        tokens = torch.arange(grid[0] * grid[1], dtype=torch.float32).reshape(1, -1, 1)
        image = (grid[0] * 4, grid[1] * 4)
        reference = unroll(tokens, image_shape=image, patch_stride=(4, 4), schedule=schedule)
        np.testing.assert_array_equal(unroll_order(grid, tuple(schedule)), reference.reshape(-1).numpy())


def test_official_pth_layout(tmp_path):
    config = TINY_CONFIGS["mua-alternating-qpool2-nonsquare"]
    torch_model = randomized_torch_model(config, seed=2)
    official = official_state_from_hf(hf_state_numpy(torch_model), config)
    path = tmp_path / "hiera_tiny_test.pth"
    torch.save({"model_state": {k: torch.from_numpy(v) for k, v in official.items()}}, path)
    loaded = torch.load(path, weights_only=True)["model_state"]
    params = hiera_converter.convert({k: v.numpy() for k, v in loaded.items()}, config, "official")
    flax_model = instantiate_backbone("hiera", config, params)
    x = images(config, seed=3)
    errors = relative_errors(hiera_converter.torch_outputs(torch_model, x), hiera_converter.flax_outputs(flax_model, x))
    print("official-layout fp32 relative errors:", errors)
    assert max(errors) <= TOLERANCE


def test_official_mae_checkpoint_keeps_initial_pooler_norm():
    config = TINY_CONFIGS["default-pattern"]
    torch_model = randomized_torch_model(config, seed=4)
    official = official_state_from_hf(hf_state_numpy(torch_model), config)
    for key in ("norm.weight", "norm.bias", "head.projection.weight", "head.projection.bias"):
        del official[key]
    width = config.stage_dims[-1]
    official.update({"encoder_norm.weight": np.ones(width, np.float32), "encoder_norm.bias": np.zeros(width),
                     "mask_token": np.zeros((1, 1, 16)), "decoder_embed.weight": np.zeros((16, width)),
                     "multi_scale_fusion_heads.0.weight": np.zeros((width, 8, 4, 4))})
    params = hiera_converter.convert(official, config, "official")
    np.testing.assert_array_equal(params["pooler_norm"]["scale"], np.ones(width))
    np.testing.assert_array_equal(params["pooler_norm"]["bias"], np.full(width, 0.02, np.float32))
    np.testing.assert_array_equal(params["position_embeddings"], official["pos_embed"])


def test_bf16_error_against_fp32():
    config = TINY_CONFIGS["default-pattern"]
    params = hiera_converter.convert(hf_state_numpy(randomized_torch_model(config, seed=5)), config)
    x = images(config)
    fp32 = hiera_converter.flax_outputs(instantiate_backbone("hiera", config, params), x)
    for param_dtype in (jnp.float32, jnp.bfloat16):
        bf16_model = instantiate_backbone("hiera", config, params, dtype=jnp.bfloat16, param_dtype=param_dtype)
        outputs = hiera_converter.flax_outputs(bf16_model, x)
        errors = relative_errors(fp32, outputs)
        print(f"bf16 compute, {jnp.dtype(param_dtype).name} params: relative errors vs fp32", errors)
        assert all(np.isfinite(o).all() for o in outputs)
        assert max(errors) < 0.05


def test_config_from_official_recognizes_every_variant():
    for name, variant in VARIANTS.items():
        # Zero-stride arrays: the real shapes without the memory.
        shapes = hiera_converter._expected_hf_shapes(variant)
        names = hiera_converter.official_to_hf_names(variant)
        state = {official: np.broadcast_to(np.float32(0), shapes[hf]) for official, hf in names.items()
                 if hf in shapes}
        assert hiera_converter.config_from_official(state, None) == variant
        assert hiera_converter.config_from_official(state, name) == variant
        other = "huge" if name != "huge" else "tiny"
        with pytest.raises(UserInputError, match=f"does not match Hiera variant '{other}'"):
            hiera_converter.config_from_official(state, other)


def test_config_round_trips_and_reads_transformers_configs():
    import transformers

    for variant in VARIANTS.values():
        assert HieraConfig.from_dict(variant.to_dict()) == variant
        assert from_hf_config(transformers.HieraConfig(**variant.to_dict()).to_dict()) == variant
    assert from_hf_config(transformers.HieraConfig().to_dict()) == VARIANTS["base"]
    assert VARIANTS["huge"].stage_dims == (256, 512, 1024, 2048)  # the paper's d_hiera


# ---------------------------------------------------------------------------------------------
# Errors.

def test_converter_lists_missing_unknown_and_misshaped_keys():
    config = TINY_CONFIGS["default-pattern"]
    state = hf_state_numpy(randomized_torch_model(config))
    del state["encoder.stages.1.layers.0.proj.bias"]
    state["encoder.stages.9.layers.0.mystery.weight"] = np.zeros(3)
    state["embeddings.position_embeddings"] = np.zeros((1, 10, 8))
    with pytest.raises(UserInputError) as error:
        hiera_converter.convert(state, config, "hf", source="test.safetensors")
    message = str(error.value)
    for key in ("encoder.stages.1.layers.0.proj.bias", "encoder.stages.9.layers.0.mystery.weight",
                "embeddings.position_embeddings"):
        assert key in message


def test_official_errors():
    config = TINY_CONFIGS["default-pattern"]
    official = official_state_from_hf(hf_state_numpy(randomized_torch_model(config)), config)
    del official["blocks.3.mlp.fc2.weight"]
    with pytest.raises(UserInputError, match=r"blocks\.3\.mlp\.fc2\.weight"):
        hiera_converter.convert(official, config, "official")
    with pytest.raises(UserInputError, match="no 'patch_embed.proj.weight'"):
        hiera_converter.config_from_official({"weight": np.zeros(3)}, None)
    video = {"patch_embed.proj.weight": np.zeros((8, 3, 3, 7, 7)), "pos_embed_spatial": np.zeros((1, 4, 8)),
             "pos_embed_temporal": np.zeros((1, 2, 8))}
    with pytest.raises(UserInputError, match="video Hiera"):
        hiera_converter.config_from_official(video, None)
    with pytest.raises(UserInputError, match="matches no known variant"):
        hiera_converter.config_from_official(official_state_from_hf(
            hf_state_numpy(randomized_torch_model(config)), config), None)
    with pytest.raises(UserInputError, match="unknown hiera variant 'gigantic'"):
        hiera_converter.config_from_official(official, "gigantic")
    with pytest.raises(UserInputError, match="unknown Hiera checkpoint layout 'timm'"):
        hiera_converter.convert(official, config, "timm")


def test_config_errors():
    with pytest.raises(UserInputError, match="num_query_pool"):
        HieraConfig(num_query_pool=4)
    with pytest.raises(UserInputError, match="one entry per stage"):
        HieraConfig(num_heads=(1, 2, 4))
    with pytest.raises(UserInputError, match="hidden_act"):
        HieraConfig(hidden_act="swiglu")
    with pytest.raises(UserInputError, match="masked_unit_size"):
        HieraConfig(masked_unit_size=(4, 4))
    with pytest.raises(UserInputError, match="not divisible by num_heads"):
        HieraConfig(embed_dim=10, num_heads=(3, 2, 4, 8))
    with pytest.raises(UserInputError, match="unknown fields"):
        HieraConfig.from_dict({"embed_dim": 8, "colour": "red"})
    with pytest.raises(UserInputError, match="model_type 'hiera'"):
        from_hf_config({"model_type": "dinov2"})


def test_resolve_config_forms():
    import ml_collections

    from nexvitad_jax.models import resolve_config

    huge = VARIANTS["huge"]
    assert resolve_config("hiera", "huge") is huge
    assert resolve_config("hiera", huge) is huge
    assert resolve_config("hiera", {"variant": "huge"}) == huge
    assert resolve_config("hiera", ml_collections.ConfigDict({"variant": "huge"})) == huge
    at_448 = dataclasses.replace(huge, image_size=(448, 448))
    assert resolve_config("hiera", {"variant": "huge", "image_size": [448, 448]}) == at_448
    spec = ml_collections.ConfigDict({"variant": "huge"})
    spec.image_size = [448, 448]  # as a derived config file overrides one field
    assert resolve_config("hiera", spec) == at_448
    # Without "variant": the dataclass defaults (hiera-base) with the fields replaced.
    fields = {"embed_dim": 8, "num_heads": [1, 1, 1, 1], "depths": [1, 1, 1, 1]}
    assert resolve_config("hiera", fields) == HieraConfig.from_dict(fields)
    assert resolve_config("hiera", ml_collections.ConfigDict(fields)) == HieraConfig.from_dict(fields)


def test_resolve_config_errors():
    from nexvitad_jax.models import resolve_config

    with pytest.raises(UserInputError, match=r"unknown hiera variant 'gigantic'; expected one of \[.*'huge'"):
        resolve_config("hiera", {"variant": "gigantic"})
    with pytest.raises(UserInputError, match=r"Hiera config: unknown fields \['colour'\]; expected a subset of"):
        resolve_config("hiera", {"variant": "huge", "colour": "red"})
    with pytest.raises(UserInputError, match="Hiera config: unknown fields"):
        resolve_config("hiera", {"colour": "red"})
    with pytest.raises(UserInputError, match="expected a variant name, a config dict or a HieraConfig"):
        resolve_config("hiera", 3)


def test_input_errors(tiny_pair):
    config, _, flax_model = tiny_pair
    with pytest.raises(UserInputError, match="divisible by the mask unit"):
        flax_model(jnp.zeros((1, 72, 72, 3)))
    with pytest.raises(UserInputError, match=r"\(batch, height, width, 3\)"):
        flax_model(jnp.zeros((1, 3, 64, 64)))


# ---------------------------------------------------------------------------------------------
# Every full-size variant (random init, 224, batch 1): run with `pytest -m slow`.

@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_full_size_variants(variant):
    config = VARIANTS[variant]
    torch_model = randomized_torch_model(config)
    params = hiera_converter.convert(hf_state_numpy(torch_model), config, "hf")
    x = images(config, batch=1)
    reference = hiera_converter.torch_outputs(torch_model, x)
    del torch_model
    flax_model = instantiate_backbone("hiera", config, params)
    errors = relative_errors(reference, hiera_converter.flax_outputs(flax_model, x))
    print(f"hiera-{variant}: fp32 relative errors (4 stages, pooled):", errors)
    del flax_model
    bf16_model = instantiate_backbone("hiera", config, params, dtype=jnp.bfloat16)
    bf16_errors = relative_errors(reference, hiera_converter.flax_outputs(bf16_model, x))
    print(f"hiera-{variant}: bf16 compute (fp32 params) relative errors vs torch fp32:", bf16_errors)
    assert max(errors) <= TOLERANCE
    assert max(bf16_errors) < 0.1
