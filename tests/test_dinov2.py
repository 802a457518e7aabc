"""DINOv2 Flax port vs transformers Dinov2Model / Dinov2WithRegistersModel (same random weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from converters import dinov2 as dinov2_converter
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.models import (IMAGENET_MEAN, IMAGENET_STD, build_backbone, instantiate_backbone, normalize_images,
                                 resolve_config)
from nexvitad_jax.models.dinov2 import VARIANTS, Dinov2Config, from_hf_config, to_hf_config
from nexvitad_jax.models.layers import ACTIVATIONS, attention_implementation, resize_position_embeddings

TOLERANCE = 1e-5

TINY_CONFIGS = {
    # hidden 128 / 2 heads keeps DINOv2's head width of 64 (the official converter assumes it).
    "plain": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=518),
    "registers-swiglu": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=518,
                             use_swiglu_ffn=True, num_register_tokens=3),
    "no-qkv-bias-224-grid": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=224,
                                 qkv_bias=False, mlp_ratio=2, hidden_act="gelu_pytorch_tanh"),
}


def random_torch_model(kwargs: dict, seed: int = 0):
    """A transformers DINOv2 with every parameter perturbed, so layer scale, biases and the position
    embeddings all matter (the HF init sets many of them to constants)."""
    torch.manual_seed(seed)
    kwargs = dict(kwargs)
    if "num_register_tokens" in kwargs:
        model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(patch_size=14, **kwargs))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 1.0 if "position_embeddings" in name else 0.05
            param.add_(scale * torch.randn_like(param))
    return model.eval()


def relative_error(flax_out: np.ndarray, torch_out: np.ndarray) -> float:
    return float(np.max(np.abs(flax_out - torch_out)) / np.max(np.abs(torch_out)))


def converted_pair(kwargs: dict):
    """(config, a random transformers Dinov2Model, our port of it through the converter)."""
    torch_model = random_torch_model(kwargs)
    config = from_hf_config(torch_model.config.to_dict())
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    flax_model = instantiate_backbone("dinov2", config, dinov2_converter.convert(state, config, "hf"))
    return config, torch_model, flax_model


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny_pair(request):
    return converted_pair(TINY_CONFIGS[request.param])


@pytest.mark.parametrize("size", [(224, 224), (518, 518), (224, 308), (230, 200)])
def test_parity_with_transformers(tiny_pair, size):
    config, torch_model, flax_model = tiny_pair
    images = np.random.default_rng(1).standard_normal((2, *size, 3)).astype(np.float32)
    flax_out = dinov2_converter.flax_outputs(flax_model, images)
    torch_out = dinov2_converter.torch_outputs(torch_model, images)
    assert flax_out[0].shape == (2, size[0] // 14, size[1] // 14, config.hidden_size)
    assert flax_out[1].shape == (2, config.hidden_size)
    for name, f, t in zip(("patch grid", "cls"), flax_out, torch_out):
        assert relative_error(f, t) <= TOLERANCE, (name, relative_error(f, t))


def test_224_gives_16x16_grid():
    model = nnx.eval_shape(lambda: build_backbone("dinov2", "small", rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    patches, cls = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                                  jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    assert patches.shape == (2, 16, 16, 384) and cls.shape == (2, 384)
    assert model.hidden_size == 384


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("grid_in,grid_out", [((37, 37), (16, 16)), ((37, 37), (16, 22)), ((16, 16), (37, 37)),
                                              ((5, 5), (7, 3)), ((16, 16), (16, 16)), ((4, 4), (13, 9))])
def test_position_resize_matches_torch_interpolate(grid_in, grid_out, antialias):
    grid = np.random.default_rng(2).standard_normal((*grid_in, 8)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=grid_out, mode="bicubic", align_corners=False,
        antialias=antialias)[0].permute(1, 2, 0).numpy()
    got = np.asarray(resize_position_embeddings(jnp.asarray(grid), grid_out, antialias=antialias))
    # PyTorch rounds its float32 cubic weights slightly differently (~1e-6); the bar is the parity one.
    assert relative_error(got, expected) <= TOLERANCE


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_match_transformers(name):
    """The activation table both ports share equals transformers' ACT2FN for every name it accepts."""
    from transformers.activations import ACT2FN

    x = np.linspace(-6.0, 6.0, 2001, dtype=np.float32)
    expected = ACT2FN[name](torch.from_numpy(x)).numpy()
    got = np.asarray(ACTIVATIONS[name](jnp.asarray(x)))
    # The exact GELU's erf is a float32 rational polynomial (see layers.erf_f32), within 1e-6.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_bf16_compute_close_to_fp32(tiny_pair):
    config, torch_model, flax_model = tiny_pair
    state = nnx.state(flax_model, nnx.Param).to_pure_dict()
    bf16_model = instantiate_backbone("dinov2", config, state, dtype=jnp.bfloat16)
    images = np.random.default_rng(3).standard_normal((2, 224, 224, 3)).astype(np.float32)
    fp32_out = dinov2_converter.flax_outputs(flax_model, images)
    bf16_out = dinov2_converter.flax_outputs(bf16_model, images)
    for f32, b16 in zip(fp32_out, bf16_out):
        assert relative_error(b16, f32) < 5e-2


def test_attention_asks_for_cudnn_only_where_it_applies():
    """Both ports' attention (layers.dot_product_attention) names cuDNN's fused kernel for bf16 / fp16
    on an NVIDIA GPU with a head width cuDNN takes (a multiple of 8, at most 128), XLA otherwise."""
    for dtype, head_dim in ((jnp.bfloat16, 64), (jnp.bfloat16, 96), (jnp.float16, 128)):
        assert attention_implementation(dtype, head_dim, "cuda") == "cudnn"
    for dtype, head_dim, platform in ((jnp.float32, 64, "cuda"), (jnp.bfloat16, 60, "cuda"),
                                      (jnp.bfloat16, 256, "cuda"), (jnp.bfloat16, 64, "cpu"),
                                      (jnp.bfloat16, 64, "rocm"), (jnp.bfloat16, 64, "tpu")):
        assert attention_implementation(dtype, head_dim, platform) is None


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_shapes_match_transformers_modules(name):
    """Every variant's expected weight shapes equal those of one transformers layer + embeddings."""
    config = VARIANTS[name]
    kwargs = to_hf_config(config)
    if config.num_register_tokens:
        from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as hf

        hf_config = transformers.Dinov2WithRegistersConfig(**kwargs)
        embeddings, layer = hf.Dinov2WithRegistersEmbeddings(hf_config), hf.Dinov2WithRegistersLayer(hf_config)
    else:
        from transformers.models.dinov2 import modeling_dinov2 as hf

        hf_config = transformers.Dinov2Config(**kwargs)
        embeddings, layer = hf.Dinov2Embeddings(hf_config), hf.Dinov2Layer(hf_config)
    got = {f"embeddings.{k}": tuple(v.shape) for k, v in embeddings.state_dict().items() if "mask_token" not in k}
    got.update({f"encoder.layer.0.{k}": tuple(v.shape) for k, v in layer.state_dict().items()})
    expected = {k: v for k, v in dinov2_converter.expected_hf_shapes(config).items()
                if k.startswith(("embeddings.", "encoder.layer.0."))}
    assert got == expected
    assert from_hf_config({**hf_config.to_dict(), "patch_size": 14}) == config


def test_normalize_images():
    images = np.random.default_rng(4).random((2, 5, 6, 3)).astype(np.float32)
    expected = (images - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(np.asarray(normalize_images(jnp.asarray(images))), expected, rtol=1e-6)


def test_bad_inputs_raise_user_errors():
    config = Dinov2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56)
    model = build_backbone("dinov2", config, rngs=nnx.Rngs(0))
    with pytest.raises(UserInputError, match="3\\)"):
        model(jnp.zeros((1, 56, 56, 4)))
    with pytest.raises(UserInputError, match="smaller than one 14x14 patch"):
        model(jnp.zeros((1, 10, 56, 3)))
    with pytest.raises(UserInputError, match="not divisible"):
        Dinov2Config(hidden_size=65, num_attention_heads=2)
    with pytest.raises(UserInputError, match="unknown dinov2 variant 'tiny'"):
        build_backbone("dinov2", "tiny", rngs=nnx.Rngs(0))
    with pytest.raises(UserInputError, match="unknown backbone family"):
        build_backbone("vit", "small", rngs=nnx.Rngs(0))
    with pytest.raises(UserInputError, match="model_type"):
        from_hf_config({"model_type": "vit"})
    with pytest.raises(UserInputError, match="unknown fields"):
        Dinov2Config.from_dict({**config.to_dict(), "depth": 3})


def test_resolve_config_forms():
    import ml_collections

    small = VARIANTS["small"]
    assert resolve_config("dinov2", "small") is small
    assert resolve_config("dinov2", small) is small
    assert resolve_config("dinov2", {"variant": "small"}) == small
    assert resolve_config("dinov2", ml_collections.ConfigDict({"variant": "small-reg"})) == VARIANTS["small-reg"]
    expected = Dinov2Config(**{**small.to_dict(), "image_size": 224, "hidden_act": "gelu_pytorch_tanh"})
    assert resolve_config("dinov2", {"variant": "small", "image_size": 224, "hidden_act": "gelu_pytorch_tanh"}) \
        == expected
    spec = ml_collections.ConfigDict({"variant": "small"})
    spec.image_size = 224
    assert resolve_config("dinov2", spec) == Dinov2Config(**{**small.to_dict(), "image_size": 224})
    # Without "variant": the dataclass defaults with the fields replaced.
    fields = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 56}
    assert resolve_config("dinov2", fields) == Dinov2Config.from_dict(fields)
    assert resolve_config("dinov2", ml_collections.ConfigDict(fields)) == Dinov2Config(**fields)


def test_resolve_config_errors():
    with pytest.raises(UserInputError, match=r"unknown dinov2 variant 'tiny'; expected one of \[.*'small-reg'"):
        resolve_config("dinov2", {"variant": "tiny", "image_size": 224})
    with pytest.raises(UserInputError, match=r"Dinov2Config: unknown fields \['depth'\]; expected a subset of"):
        resolve_config("dinov2", {"variant": "small", "depth": 3})
    with pytest.raises(UserInputError, match="expected a variant name, a config dict or a Dinov2Config"):
        resolve_config("dinov2", ["small"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["small", "base", "large", "giant", "small-reg"])
def test_full_size_parity_at_224(name):
    """Full-size variants, random init, fp32 at 224 (position embeddings resized from 37x37)."""
    config = VARIANTS[name]
    torch_model = dinov2_converter.build_torch(config)
    with torch.no_grad():
        for param_name, param in torch_model.named_parameters():
            param.add_((1.0 if "position_embeddings" in param_name else 0.02) * torch.randn_like(param))
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    flax_model = instantiate_backbone("dinov2", config, dinov2_converter.convert(state, config, "hf"))
    images = np.random.default_rng(5).standard_normal((1, 224, 224, 3)).astype(np.float32)
    errors = [relative_error(f, t) for f, t in zip(dinov2_converter.flax_outputs(flax_model, images),
                                                     dinov2_converter.torch_outputs(torch_model, images))]
    print(f"dinov2 {name}: relative errors (patch grid, cls) = {errors}")
    assert max(errors) <= TOLERANCE, errors
