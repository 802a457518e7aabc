"""`python -m converters hiera` end to end: HF directories and official `.pth` files -> orbax -> load_backbone,
with --verify, compared against transformers."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from converters import hiera as hiera_converter
from converters.__main__ import main
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.models import load_backbone
from nexvitad_jax.models.hiera import VARIANTS, HieraConfig
from tests.test_hiera import TOLERANCE, images, official_state_from_hf, randomized_torch_model, relative_errors

# Small, but at the 224 input `--verify` uses.
SMALL_224 = HieraConfig(embed_dim=8, num_heads=(1, 1, 2, 2), depths=(1, 2, 2, 1))


def loaded_errors(out_dir, torch_model, config) -> list[float]:
    module, params = load_backbone(out_dir)
    assert module.stage_dims == config.stage_dims
    x = images(config, batch=1, seed=7)
    return relative_errors(hiera_converter.torch_outputs(torch_model, x), hiera_converter.flax_outputs(module, x))


def test_hf_directory_to_orbax_with_verify(tmp_path, capsys):
    torch_model = randomized_torch_model(SMALL_224, seed=10)
    torch_model.save_pretrained(tmp_path / "hf")
    assert main(["hiera", "--source", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--verify"]) == 0
    assert "verify: max|flax - torch|" in capsys.readouterr().out
    metadata = json.loads((tmp_path / "out" / "config.json").read_text())
    assert metadata["family"] == "hiera" and metadata["variant"] == "custom"
    assert HieraConfig.from_dict(metadata["config"]) == SMALL_224
    assert max(loaded_errors(tmp_path / "out", torch_model, SMALL_224)) <= TOLERANCE


def test_classification_checkpoint_directory(tmp_path):
    """HieraForImageClassification weights: `hiera.`-prefixed encoder, classifier ignored."""
    torch.manual_seed(11)
    classifier = transformers.HieraForImageClassification(
        transformers.HieraConfig(**SMALL_224.to_dict(), num_labels=5)).eval()
    with torch.no_grad():
        for param in classifier.parameters():
            param.add_(0.05 * torch.randn_like(param))
    classifier.save_pretrained(tmp_path / "hf")
    assert main(["hiera", "--source", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--verify"]) == 0
    assert max(loaded_errors(tmp_path / "out", classifier.hiera, SMALL_224)) <= TOLERANCE


def test_mae_pretraining_checkpoint_directory(tmp_path):
    """HieraForPreTraining weights: encoder under `hiera.`, decoder ignored, no pooler (initial norm)."""
    torch.manual_seed(16)
    mae = transformers.HieraForPreTraining(transformers.HieraConfig(
        **SMALL_224.to_dict(), decoder_hidden_size=16, decoder_depth=1, decoder_num_heads=1)).eval()
    with torch.no_grad():
        for param in mae.parameters():
            param.add_(0.05 * torch.randn_like(param))
    mae.save_pretrained(tmp_path / "hf")
    assert main(["hiera", "--source", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--verify"]) == 0
    encoder = hiera_converter.build_torch(SMALL_224)
    missing, unexpected = encoder.load_state_dict(
        {k.removeprefix("hiera."): v for k, v in mae.state_dict().items() if k.startswith("hiera.")}, strict=False)
    assert missing == ["pooler.layernorm.weight", "pooler.layernorm.bias"] and not unexpected
    with torch.no_grad():
        encoder.pooler.layernorm.weight.fill_(1.0)
        encoder.pooler.layernorm.bias.fill_(0.02)
    assert max(loaded_errors(tmp_path / "out", encoder, SMALL_224)) <= TOLERANCE


def test_bfloat16_checkpoint(tmp_path):
    torch_model = randomized_torch_model(SMALL_224, seed=12)
    torch_model.save_pretrained(tmp_path / "hf")
    assert main(["hiera", "--source", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--verify",
                 "--dtype", "bfloat16"]) == 0
    _, params = load_backbone(tmp_path / "out")
    assert params["patch_embed"]["kernel"][...].dtype == jnp.bfloat16


def test_official_layout_errors_through_the_cli(tmp_path, capsys):
    torch_model = randomized_torch_model(SMALL_224, seed=13)
    official = official_state_from_hf({k: v.numpy() for k, v in torch_model.state_dict().items()}, SMALL_224)
    path = tmp_path / "hiera_small_test.pth"
    torch.save({"model_state": {k: torch.from_numpy(v) for k, v in official.items()}}, path)
    # Heads are not in the weights: a checkpoint of no known variant is refused by name.
    assert main(["hiera", "--source", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "matches no known variant" in capsys.readouterr().err
    del official["blocks.2.attn.qkv.bias"]
    official["blocks.0.attn.qkv.weight"] = official["blocks.0.attn.qkv.weight"][:, :4]
    with pytest.raises(UserInputError) as error:
        hiera_converter.convert(official, SMALL_224, "official", source=str(path))
    message = str(error.value)
    assert str(path) in message and "missing keys (1): blocks.2.attn.qkv.bias" in message
    assert "blocks.0.attn.qkv.weight (expected (24, 8), got (24, 4))" in message


def official_hub_config(embed_dim: int, num_heads: int, stages: list[int], **overrides) -> dict:
    """config.json as facebookresearch/hiera's hub mixin writes it (the `Hiera(**config)` arguments)."""
    config = {"input_size": [224, 224], "in_chans": 3, "embed_dim": embed_dim, "num_heads": num_heads,
              "num_classes": 10, "stages": stages, "q_pool": 3, "q_stride": [2, 2], "mask_unit_size": [8, 8],
              "mask_unit_attn": [True, True, False, False], "dim_mul": 2.0, "head_mul": 2.0,
              "patch_kernel": [7, 7], "patch_stride": [4, 4], "patch_padding": [3, 3], "mlp_ratio": 4.0,
              "drop_path_rate": 0.0, "norm_layer": "LayerNorm", "head_dropout": 0.0, "head_init_scale": 0.001,
              "sep_pos_embed": False}
    return {**config, **overrides}


def test_official_hub_format_directory(tmp_path):
    """A directory in the official hub format: Hiera's arguments as config.json, official keys."""
    from safetensors.torch import save_file

    config = HieraConfig(embed_dim=8, num_heads=(1, 2, 4, 8), depths=(1, 2, 2, 1))
    torch_model = randomized_torch_model(config, seed=15)
    official = official_state_from_hf({k: v.numpy() for k, v in torch_model.state_dict().items()}, config)
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text(json.dumps(official_hub_config(8, 1, [1, 2, 2, 1])))
    save_file({k: torch.from_numpy(v) for k, v in official.items()}, str(tmp_path / "hub" / "model.safetensors"))
    assert main(["hiera", "--source", str(tmp_path / "hub"), "--out", str(tmp_path / "out"), "--verify"]) == 0
    assert max(loaded_errors(tmp_path / "out", torch_model, config)) <= TOLERANCE


def test_official_hub_configs_of_the_variants():
    published = {"tiny": (96, 1, [1, 2, 7, 2]), "small": (96, 1, [1, 2, 11, 2]), "base": (96, 1, [2, 3, 16, 3]),
                 "base-plus": (112, 2, [2, 3, 16, 3]), "large": (144, 2, [2, 6, 36, 4]),
                 "huge": (256, 4, [2, 6, 36, 4])}
    for name, (embed_dim, num_heads, stages) in published.items():
        assert hiera_converter.config_from_hf(official_hub_config(embed_dim, num_heads, stages)) == VARIANTS[name]
    with pytest.raises(UserInputError, match="sep_pos_embed"):
        hiera_converter.config_from_hf(official_hub_config(96, 1, [1, 2, 7, 2], sep_pos_embed=True))
    with pytest.raises(UserInputError, match="separate spatial and temporal"):
        hiera_converter.config_from_hf({**VARIANTS["tiny"].to_dict(), "use_separate_position_embedding": True})


@pytest.mark.slow
@pytest.mark.parametrize("mae", [False, True])
def test_official_pth_of_hiera_tiny(tmp_path, mae, capsys):
    """A full-size official checkpoint (hiera-tiny, random weights): variant detection, --verify."""
    config = VARIANTS["tiny"]
    torch_model = randomized_torch_model(config, seed=14)
    official = official_state_from_hf({k: v.numpy() for k, v in torch_model.state_dict().items()}, config)
    if mae:  # the MAE pre-training layout: no norm/head, a decoder
        for key in ("norm.weight", "norm.bias", "head.projection.weight", "head.projection.bias"):
            del official[key]
        official["encoder_norm.weight"] = np.ones(768, np.float32)
        official["encoder_norm.bias"] = np.zeros(768, np.float32)
        official["decoder_pred.weight"] = np.zeros((16, 512), np.float32)
        with torch.no_grad():
            torch_model.pooler.layernorm.weight.fill_(1.0)
            torch_model.pooler.layernorm.bias.fill_(0.02)
    path = tmp_path / "hiera_tiny_224.pth"
    torch.save({"model_state": {k: torch.from_numpy(v) for k, v in official.items()}}, path)
    assert main(["hiera", "--source", str(path), "--out", str(tmp_path / "out"), "--verify"]) == 0
    metadata = json.loads((tmp_path / "out" / "config.json").read_text())
    assert metadata["variant"] == "tiny"
    errors = loaded_errors(tmp_path / "out", torch_model, config)
    print(f"official hiera-tiny (mae={mae}) relative errors:", errors, capsys.readouterr().out)
    assert max(errors) <= TOLERANCE
