"""Validation before work: a whole config and the data a run reads are checked before `nexvitad run`
writes anything, and every problem found is listed in one error."""

import numpy as np
import pytest
from PIL import Image

from nexvitad_jax import cli
from nexvitad_jax.config import MAX_LISTED, check_config, config_problems, load_config, problems_error
from nexvitad_jax.data import open_dataset, run_data_problems
from nexvitad_jax.errors import UserInputError


@pytest.mark.parametrize("name", ["tiny", "demo"])
def test_packaged_configs_have_no_problems(name):
    assert config_problems(load_config(name)) == []


# A bad value of each kind of field -> what the error must say (the field, the value, what is expected).
BAD_VALUES = {
    "model.dtype=float99": "model.dtype = 'float99': expected one of ['bfloat16', 'float32']",
    "model.upconv=wide": "model.upconv = 'wide': expected one of ['keep', 'width']",
    "bank.features=pixels": "bank.features = 'pixels': expected one of ['dino-projected', 'hiera-adapted', "
                            "'interleaved']",
    "train.learning_rate=-1.0": "train.learning_rate = -1.0: expected a number > 0",
    "train.augmentation.probability=1.5": "train.augmentation.probability = 1.5: expected a number >= 0 and <= 1",
    "train.augmentation.scale_range=(1.2,0.8)": "train.augmentation.scale_range = (1.2, 0.8): expected a (low, "
                                                "high) pair of positive numbers with low <= high",
    "train.checkpoint_every=0": "train.checkpoint_every = 0: expected an integer >= 1",
    "bank.layers=(1,1)": "bank.layers = (1, 1): expected a tuple of one or more distinct integers >= 0",
    "bank.kmeans.epsilon=0.0": "bank.kmeans.epsilon = 0.0: expected a number > 0",
    "eval.batch_size=0": "eval.batch_size = 0: expected an integer >= 1",
    "data.few_shot=0": "data.few_shot = 0: expected an integer >= 1",
}


def test_each_bad_field_says_what_it_expects():
    config = load_config("tiny", list(BAD_VALUES))
    assert sorted(config_problems(config)) == sorted(BAD_VALUES.values())


@pytest.mark.parametrize("overrides, expected", [
    (["train.phase1_epochs=3"], "train.phase1_epochs = 3: expected <= train.epochs = 2"),
    (["data.image_size=80"], "data.image_size = 80: expected a multiple of 32"),
    (["bank.layers=(0, 4)"], "bank.layers = (0, 4): expected layer indices in 0..3"),
    (["model.decoder_channels=(8, 8)"], "model.decoder_channels = (8, 8): expected 3 widths"),
    # tiny at 64 px: layer 3 is a 2x2 grid, so its M = 4 images hold 16 patches.
    (["bank.k=17"], "bank.k = 17: layer 3 has 4 images (data.few_shot) x 2x2 patches = 16 patches"),
    (['model.dinov2_checkpoint="no/such/dir"'], "model.dinov2_checkpoint: no/such/dir: no such directory"),
])
def test_combinations_and_backbones(overrides, expected):
    problems = config_problems(load_config("tiny", overrides))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_backbone_fields_of_a_config_file_keep_their_types():
    config = load_config("tiny")
    config.model.dinov2 = {"hidden_size": 16.5, "num_hidden_layers": 1, "num_attention_heads": 2}
    assert config_problems(config) == ["model.dinov2: field hidden_size = 16.5: expected an integer >= 0"]
    config.model.dinov2 = {"variant": "smallish"}
    assert config_problems(config)[0].startswith("model.dinov2: unknown dinov2 variant 'smallish'; expected one of")


def test_unknown_and_missing_fields_of_a_config_file():
    config = load_config("tiny")
    config.train.epochz = 3
    del config.eval
    problems = config_problems(config)
    assert problems[0].startswith("train.epochz: unknown field; expected one of train's fields ['augmentation', ")
    assert problems[1] == "eval.batch_size: missing"
    assert config_problems(load_config("tiny", ["model.hiera.depth=3"]))[0].startswith(
        "model.hiera: Hiera config: unknown fields ['depth']")


def test_the_error_lists_every_problem_up_to_a_limit():
    with pytest.raises(UserInputError) as caught:
        check_config(load_config("tiny", ["model.dtype=float99", "eval.batch_size=0"]))
    assert str(caught.value).splitlines() == [
        "config: 2 problems:", "  - model.dtype = 'float99': expected one of ['bfloat16', 'float32']",
        "  - eval.batch_size = 0: expected an integer >= 1"]
    lines = str(problems_error([f"p{i}" for i in range(MAX_LISTED + 5)], "data")).splitlines()
    assert lines[0] == f"data: {MAX_LISTED + 5} problems:" and lines[-1] == "  and 5 more"
    assert lines[1:-1] == [f"  - p{i}" for i in range(MAX_LISTED)]


def test_set_of_a_field_without_its_section_names_the_section():
    with pytest.raises(UserInputError, match=r"the config has no field 'dtype'; .*; did you mean model.dtype\?$"):
        load_config("tiny", ["dtype=float99"])


def test_set_of_the_wrong_type_says_what_the_field_takes():
    with pytest.raises(UserInputError, match=r"train.epochs takes an integer \(now 2\), got 1.5 \(float\)"):
        load_config("tiny", ["train.epochs=1.5"])
    with pytest.raises(UserInputError, match=r"model.decoder_channels takes a tuple \(now \(16, 8, 8\)\)"):
        load_config("tiny", ["model.decoder_channels=8"])


def test_run_refuses_a_bad_config_before_writing_anything(tmp_path, capsys):
    workdir = tmp_path / "work"
    status = cli.main(["run", "--set", "model.dtype=float99", "--set", "bank.sigma=-1.0", "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "model.dtype = 'float99': expected one of ['bfloat16', 'float32']" in err
    assert "bank.sigma = -1.0: expected a number >= 0" in err
    assert not workdir.exists()  # no run.json: the corrected rerun is not refused


# ----------------------------------------------------------------------------- the data


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def build_mvtec(root, classes=("alpha", "beta"), size=40):
    """A tiny MVTec AD folder: per class 3 train/good, 2 test/good, 2 test/dent with masks."""
    rng = np.random.default_rng(0)
    for category in classes:
        for split, kind, count in (("train", "good", 3), ("test", "good", 2), ("test", "dent", 2)):
            for i in range(count):
                write_png(root / category / split / kind / f"{i:03d}.png",
                          rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
                if kind != "good":
                    mask = np.zeros((size, size), np.uint8)
                    mask[5:15, 5:15] = 255
                    write_png(root / category / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    return root


def test_data_problems_are_all_listed(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXVITAD_CACHE", str(tmp_path / "cache"))
    root = build_mvtec(tmp_path / "mvtec")
    (root / "beta" / "test" / "dent" / "001.png").write_bytes(b"not a png")  # a target test image
    write_png(root / "alpha" / "ground_truth" / "dent" / "000_mask.png", np.zeros((20, 20), np.uint8))
    (root / "alpha" / "train" / "good" / "002.png").write_bytes(b"")  # a source train image
    dataset = open_dataset(root, image_size=32)
    problems = run_data_problems(dataset, ["alpha"], ["beta"])
    assert len(problems) == 3, problems
    assert problems[0].startswith(f"{root / 'alpha/train/good/002.png'}: not a readable image")
    assert problems[1].startswith(f"{root / 'alpha/ground_truth/dent/000_mask.png'}: mask is 20x20 but its image")
    assert problems[2].startswith(f"{root / 'beta/test/dent/001.png'}: not a readable image")
    assert run_data_problems(open_dataset(build_mvtec(tmp_path / "good"), image_size=32), ["alpha"], ["beta"]) == []


def test_run_refuses_bad_data_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEXVITAD_CACHE", str(tmp_path / "cache"))
    root = build_mvtec(tmp_path / "mvtec")
    (root / "beta" / "test" / "dent" / "000.png").write_bytes(b"\x89PNG broken")
    workdir = tmp_path / "work"
    status = cli.main(["run", "--config", "tiny", "--data", str(root), "--target", "beta", "--workdir", str(workdir),
                       "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert f"--data {root}: 1 problem:\n  - {root / 'beta/test/dent/000.png'}: not a readable image" in err
    assert not (workdir / "run.json").exists() and not (workdir / "train").exists()
