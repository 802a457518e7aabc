"""`python -m converters`: sources (HF dirs with both DINOv2 namings, official .pth), saving,
load_backbone, --verify, and every user error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from converters import dinov2 as dinov2_converter
from converters.__main__ import main
from converters.common import check_keys, convert_checkpoint
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.models import load_backbone
from tests.conftest import REPO_ROOT

TOLERANCE = 1e-5
SMALLISH = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=224)


def random_dinov2(registers: bool = False, swiglu: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = dict(SMALLISH, use_swiglu_ffn=swiglu)
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(patch_size=14, num_register_tokens=2, **kwargs))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_((1.0 if "position_embeddings" in name else 0.05) * torch.randn_like(param))
    return model.eval()


def legacy_state_dict(model) -> dict[str, torch.Tensor]:
    """Current transformers names -> the names older transformers versions wrote (the inverse of
    transformers' conversion_mapping for Dinov2Model)."""
    renames = (("attention.q_proj.", "attention.attention.query."), ("attention.k_proj.", "attention.attention.key."),
               ("attention.v_proj.", "attention.attention.value."), ("attention.o_proj.", "attention.output.dense."),
               ("mlp.down_proj.", "mlp.weights_out."))
    state = {}
    for key, value in model.state_dict().items():
        for new, old in renames:
            key = key.replace(new, old)
        state[key] = value.clone()
    for key in [k for k in state if ".mlp.gate_proj." in k]:
        up = state.pop(key.replace("gate_proj", "up_proj"))
        state[key.replace("gate_proj", "weights_in")] = torch.cat([state.pop(key), up], dim=0)
    return state


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """transformers names -> facebookresearch/dinov2 names (the inverse of convert_dinov2_to_hf.py)."""
    hf = model.state_dict()
    top = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
           "embeddings.register_tokens": "register_tokens", "embeddings.mask_token": "mask_token",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    state = {official: hf[name].clone() for name, official in top.items() if name in hf}
    for n in range(model.config.num_hidden_layers):
        hf_layer, block = f"encoder.layer.{n}.", f"blocks.{n}."
        for leaf in ("weight", "bias"):
            state[block + f"attn.qkv.{leaf}"] = torch.cat(
                [hf[hf_layer + f"attention.{p}.{leaf}"] for p in ("q_proj", "k_proj", "v_proj")])
            state[block + f"attn.proj.{leaf}"] = hf[hf_layer + f"attention.o_proj.{leaf}"]
            for norm in ("norm1", "norm2"):
                state[block + f"{norm}.{leaf}"] = hf[hf_layer + f"{norm}.{leaf}"]
            if model.config.use_swiglu_ffn:
                state[block + f"mlp.w12.{leaf}"] = torch.cat(
                    [hf[hf_layer + f"mlp.gate_proj.{leaf}"], hf[hf_layer + f"mlp.up_proj.{leaf}"]])
                state[block + f"mlp.w3.{leaf}"] = hf[hf_layer + f"mlp.down_proj.{leaf}"]
            else:
                for fc in ("fc1", "fc2"):
                    state[block + f"mlp.{fc}.{leaf}"] = hf[hf_layer + f"mlp.{fc}.{leaf}"]
        state[block + "ls1.gamma"] = hf[hf_layer + "layer_scale1.lambda1"]
        state[block + "ls2.gamma"] = hf[hf_layer + "layer_scale2.lambda1"]
    return state


def assert_backbone_matches(out_dir: Path, torch_model, size=(224, 224)) -> None:
    module, params = load_backbone(out_dir)
    images = np.random.default_rng(7).standard_normal((2, *size, 3)).astype(np.float32)
    for f, t in zip(dinov2_converter.flax_outputs(module, images), dinov2_converter.torch_outputs(torch_model, images)):
        assert np.max(np.abs(f - t)) / np.max(np.abs(t)) <= TOLERANCE


def write_hf_dir(directory: Path, model, state: dict[str, torch.Tensor] | None = None, *, binary: bool = False) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))
    state = state if state is not None else model.state_dict()
    state = {k: v.contiguous() for k, v in state.items()}
    if binary:
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file(state, directory / "model.safetensors")
    return directory


@pytest.fixture(scope="module")
def plain_model():
    return random_dinov2()


@pytest.fixture(scope="module")
def official_pth(plain_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("official") / "dinov2_vits14_pretrain.pth"
    torch.save(official_state_dict(plain_model), path)
    return path


def test_cli_end_to_end_with_verify(plain_model, tmp_path):
    source = write_hf_dir(tmp_path / "hf", plain_model)
    result = subprocess.run([sys.executable, "-m", "converters", "dinov2", "--source", str(source), "--out",
                             str(tmp_path / "out"), "--verify"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "verify:" in result.stdout
    metadata = json.loads((tmp_path / "out" / "config.json").read_text())
    assert metadata["family"] == "dinov2" and metadata["format_version"] == 1 and metadata["source"] == str(source)
    assert metadata["config"]["hidden_size"] == 128
    assert_backbone_matches(tmp_path / "out", plain_model, size=(224, 308))


@pytest.mark.parametrize("registers,swiglu,binary", [(False, True, False), (True, False, True)])
def test_legacy_hf_names(registers, swiglu, binary, tmp_path):
    model = random_dinov2(registers, swiglu, seed=1)
    source = write_hf_dir(tmp_path / "legacy", model, legacy_state_dict(model), binary=binary)
    # The legacy directory is real: transformers itself loads it into the same model.
    reloaded = type(model).from_pretrained(source).eval()
    images = np.random.default_rng(0).standard_normal((1, 224, 224, 3)).astype(np.float32)
    np.testing.assert_array_equal(dinov2_converter.torch_outputs(reloaded, images)[0],
                                  dinov2_converter.torch_outputs(model, images)[0])
    result = convert_checkpoint("dinov2", str(source), tmp_path / "out", run_verify=True, log=lambda *_: None)
    assert max(result["verify_errors"]) <= TOLERANCE
    assert_backbone_matches(tmp_path / "out", model)


def test_classification_checkpoint_prefix(tmp_path):
    torch.manual_seed(3)
    classifier = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(num_labels=3, **SMALLISH)).eval()
    source = write_hf_dir(tmp_path / "cls", classifier)
    convert_checkpoint("dinov2", str(source), tmp_path / "out", log=lambda *_: None)
    assert_backbone_matches(tmp_path / "out", classifier.dinov2)


def test_official_pth(plain_model, official_pth, tmp_path):
    assert main(["dinov2", "--source", str(official_pth), "--out", str(tmp_path / "out"), "--verify"]) == 0
    assert_backbone_matches(tmp_path / "out", plain_model)


def test_official_pth_registers_swiglu_wrapped(tmp_path):
    model = random_dinov2(registers=True, swiglu=True, seed=2)
    path = tmp_path / "dinov2_vitg14_reg4_pretrain.pth"
    torch.save({"model": official_state_dict(model), "epoch": 3}, path)
    result = convert_checkpoint("dinov2", str(path), tmp_path / "out", run_verify=True, log=lambda *_: None)
    assert result["config"]["num_register_tokens"] == 2 and result["config"]["use_swiglu_ffn"]
    assert_backbone_matches(tmp_path / "out", model, size=(280, 196))


def test_bfloat16_storage(official_pth, tmp_path):
    result = convert_checkpoint("dinov2", str(official_pth), tmp_path / "out", dtype="bfloat16", run_verify=True,
                                log=lambda *_: None)
    assert result["dtype"] == "bfloat16" and max(result["verify_errors"]) < 5e-2
    _, params = load_backbone(tmp_path / "out")
    assert {str(leaf.dtype) for leaf in __import__("jax").tree.leaves(params)} == {"bfloat16"}


def test_check_keys_lists_every_problem():
    expected = {"a.weight": (2, 3), "b.bias": (3,), "c.weight": (4,)}
    got = {"a.weight": (3, 2), "c.weight": (4,), "extra.thing": (1,)}
    with pytest.raises(UserInputError) as error:
        check_keys(expected, got, "model.pth")
    message = str(error.value)
    assert "model.pth" in message and "missing keys (1): b.bias" in message
    assert "unknown keys (1): extra.thing" in message and "a.weight (expected (2, 3), got (3, 2))" in message
    check_keys(expected, dict(expected), "model.pth")  # no error when everything matches


def test_missing_unknown_misshaped_keys_in_official(plain_model, tmp_path):
    state = official_state_dict(plain_model)
    del state["blocks.1.ls2.gamma"]
    state["blocks.0.attn.proj.weight"] = state["blocks.0.attn.proj.weight"][:, :64]
    state["blocks.0.attn.extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(UserInputError) as error:
        convert_checkpoint("dinov2", str(path), tmp_path / "out", log=lambda *_: None)
    message = str(error.value)
    assert "encoder.layer.1.layer_scale2.lambda1" in message
    assert "blocks.0.attn.extra.weight" in message
    assert "encoder.layer.0.attention.o_proj.weight (expected (128, 128), got (128, 64))" in message


@pytest.mark.parametrize("family", ["dinov2", "hiera"])
def test_corrupt_pth(family, official_pth, tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(official_pth.read_bytes()[: official_pth.stat().st_size // 2])
    with pytest.raises(UserInputError, match="corrupt.pth: could not be read as a PyTorch checkpoint"):
        convert_checkpoint(family, str(path), tmp_path / "out", log=lambda *_: None)


@pytest.mark.parametrize("family", ["dinov2", "hiera"])
@pytest.mark.parametrize("content,what", [(b"\x89PNG\r\n\x1a\n" + bytes(64), "a PNG image"),
                                          (b"this is not a checkpoint\n", "a text file")])
def test_wrong_file_type(family, content, what, tmp_path, capsys):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    assert main([family, "--source", str(path), "--out", str(tmp_path / "out")]) == 2
    assert f"weights.pth is {what}, not a PyTorch checkpoint" in capsys.readouterr().err


def test_variant_mismatch_official(official_pth, tmp_path, capsys):
    assert main(["dinov2", "--source", str(official_pth), "--out", str(tmp_path / "out"), "--variant", "base"]) == 2
    assert "--variant base does not match the checkpoint (hidden_size: checkpoint 128, base 768" in capsys.readouterr().err


def test_variant_mismatch_hf_dir(plain_model, tmp_path):
    source = write_hf_dir(tmp_path / "hf", plain_model)
    with pytest.raises(UserInputError, match="--variant small does not match .*hidden_size: checkpoint 128, small 384"):
        convert_checkpoint("dinov2", str(source), tmp_path / "out", variant="small", log=lambda *_: None)


@pytest.fixture(scope="module")
def tiny_hiera_dir(tmp_path_factory):
    import dataclasses

    from converters import hiera as hiera_converter
    from nexvitad_jax.models.hiera import VARIANTS as HIERA_VARIANTS

    config = dataclasses.replace(HIERA_VARIANTS["tiny"], embed_dim=8, num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1))
    torch.manual_seed(4)
    model = hiera_converter.build_torch(config)
    return write_hf_dir(tmp_path_factory.mktemp("hiera") / "hf", model), model


def test_hiera_through_the_framework(tiny_hiera_dir, tmp_path):
    """The shared pipeline (source, save, load_backbone, --verify) serves the Hiera family too."""
    from converters import hiera as hiera_converter

    source, model = tiny_hiera_dir
    result = convert_checkpoint("hiera", str(source), tmp_path / "out", run_verify=True, log=lambda *_: None)
    assert result["family"] == "hiera" and max(result["verify_errors"]) <= TOLERANCE
    module, params = load_backbone(tmp_path / "out")
    assert module.stage_dims == (8, 16, 32, 64)
    images = np.random.default_rng(8).standard_normal((1, 224, 224, 3)).astype(np.float32)
    for f, t in zip(hiera_converter.flax_outputs(module, images), hiera_converter.torch_outputs(model, images)):
        assert np.max(np.abs(f - t)) / np.max(np.abs(t)) <= TOLERANCE


def test_build_backbone_registry():
    from flax import nnx

    from nexvitad_jax.models import build_backbone

    hiera = nnx.eval_shape(lambda: build_backbone(
        "hiera", {"embed_dim": 8, "num_heads": [1, 1, 1, 1], "depths": [1, 1, 1, 1]}, rngs=nnx.Rngs(0)))
    assert hiera.stage_dims == (8, 16, 32, 64)
    dinov2 = nnx.eval_shape(lambda: build_backbone(
        "dinov2", {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1}, rngs=nnx.Rngs(0)))
    assert dinov2.hidden_size == 64 and nnx.state(dinov2, nnx.Param)["layers"]["norm1"]["scale"].shape == (1, 64)


def test_variant_mismatch_hiera(tiny_hiera_dir, tmp_path):
    source, _ = tiny_hiera_dir
    with pytest.raises(UserInputError, match="--variant huge does not match"):
        convert_checkpoint("hiera", str(source), tmp_path / "out", variant="huge", log=lambda *_: None)


def test_offline_hub_id_says_how_to_pass_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(UserInputError, match="could not download 'facebook/dinov2-small'.*--source DIR"):
        convert_checkpoint("dinov2", "small", tmp_path / "out", log=lambda *_: None)


def test_source_errors(tmp_path):
    with pytest.raises(UserInputError, match="no such file or directory"):
        convert_checkpoint("dinov2", str(tmp_path / "nope.pth"), tmp_path / "out", log=lambda *_: None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no config.json"):
        convert_checkpoint("dinov2", str(tmp_path / "empty"), tmp_path / "out", log=lambda *_: None)
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(UserInputError, match="no model.safetensors or pytorch_model.bin"):
        convert_checkpoint("dinov2", str(tmp_path / "empty"), tmp_path / "out", log=lambda *_: None)
    with pytest.raises(UserInputError, match="unknown backbone family"):
        convert_checkpoint("vit", "x", tmp_path / "out", log=lambda *_: None)
    with pytest.raises(UserInputError, match="--dtype 'float16'"):
        convert_checkpoint("dinov2", "x", tmp_path / "out", dtype="float16", log=lambda *_: None)


def test_load_backbone_errors(official_pth, tmp_path):
    with pytest.raises(UserInputError, match="no such directory"):
        load_backbone(tmp_path / "missing")
    (tmp_path / "not-converted").mkdir()
    with pytest.raises(UserInputError, match="config.json: missing"):
        load_backbone(tmp_path / "not-converted")
    convert_checkpoint("dinov2", str(official_pth), tmp_path / "out", log=lambda *_: None)
    config_path = tmp_path / "out" / "config.json"
    metadata = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**metadata, "format_version": 99}))
    with pytest.raises(UserInputError, match=r"format_version 99, .*re-create it with "
                                             r"`python -m converters dinov2 --source .*dinov2_vits14_pretrain.pth --out"):
        load_backbone(tmp_path / "out")
    config_path.write_text("{not json")
    with pytest.raises(UserInputError, match="not valid JSON"):
        load_backbone(tmp_path / "out")


def write_format_1_backbone(directory: Path, family: str, module, dtype: str) -> None:
    """A converted backbone in the on-disk layout of format_version 1, written without save_backbone:
    config.json, and the parameters' pure dict with every key a string as an orbax checkpoint."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx

    def string_keys(tree):
        if isinstance(tree, dict):
            return {str(key): string_keys(value) for key, value in tree.items()}
        return np.asarray(jnp.asarray(tree, getattr(jnp, dtype)))

    directory.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", string_keys(nnx.state(module, nnx.Param).to_pure_dict()))
    checkpointer.wait_until_finished()
    (directory / "config.json").write_text(json.dumps(
        {"family": family, "variant": "custom", "config": module.config.to_dict(), "source": "random",
         "dtype": dtype, "format_version": 1}, indent=2) + "\n")


@pytest.mark.parametrize("family, spec, dtype", [
    ("hiera", {"embed_dim": 8, "num_heads": [1, 1, 2, 2], "depths": [1, 2, 2, 1], "image_size": [64, 64]}, "float32"),
    ("dinov2", {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56}, "bfloat16"),
])
def test_format_version_1_checkpoints_load(family, spec, dtype, tmp_path):
    """Checkpoints written in the format_version 1 layout (int keys of nnx lists stored as strings)
    load into the same parameters and outputs."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nexvitad_jax.models import build_backbone

    module = build_backbone(family, spec, rngs=nnx.Rngs(5), param_dtype=getattr(jnp, dtype),
                            dtype=getattr(jnp, dtype))
    write_format_1_backbone(tmp_path / family, family, module, dtype)
    loaded, params = load_backbone(tmp_path / family)
    assert loaded.config == module.config
    expected = nnx.state(module, nnx.Param).to_pure_dict()
    assert jax.tree.structure(params.to_pure_dict()) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params.to_pure_dict()), jax.tree.leaves(expected)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    images = jnp.asarray(np.random.default_rng(9).standard_normal((1, 64, 64, 3)), jnp.float32)
    for got, want in zip(jax.tree.leaves(loaded(images)), jax.tree.leaves(module(images))):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
