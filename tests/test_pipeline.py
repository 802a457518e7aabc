"""The main job: config loading, split resolution, and one end-to-end `nexvitad run` (tiny config,
synthetic set, 11/1 split) with its outputs, its quality bound and its resume path."""

import json

import numpy as np
import pytest
from PIL import Image

from nexvitad_jax import cli, pipeline
from nexvitad_jax.data import PAPER_CLASSES
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.metrics import pixel_auroc


def test_load_config_overrides_and_errors(tmp_path):
    config = pipeline.load_config(None, ["epochs=3", "decoder_channels=(4, 4, 4)", "augmentation.noise_std=0.1",
                                         'hiera_checkpoint="ckpt/hiera"', "bank_features=hiera-adapted"])
    assert config.epochs == 3 and tuple(config.decoder_channels) == (4, 4, 4)
    assert config.augmentation.noise_std == 0.1 and config.hiera_checkpoint == "ckpt/hiera"
    assert config.bank_features == "hiera-adapted"
    with pytest.raises(UserInputError, match="no field 'epochz'"):
        pipeline.load_config(None, ["epochz=3"])
    with pytest.raises(UserInputError, match="--set 'epochs=\"many\"'"):
        pipeline.load_config(None, ['epochs="many"'])  # the field is an int
    with pytest.raises(UserInputError, match="KEY=VALUE"):
        pipeline.load_config(None, ["epochs"])
    with pytest.raises(UserInputError, match="no such file"):
        pipeline.load_config(tmp_path / "missing.py")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(UserInputError, match="broken.py: could not be executed"):
        pipeline.load_config(broken)


def test_resolve_split_draws_fixes_and_checks():
    classes = list(PAPER_CLASSES)
    source, target = pipeline.resolve_split(classes, "10/2", None, seed=3)
    assert len(source) == 10 and len(target) == 2 and sorted(source + target) == sorted(classes)
    assert pipeline.resolve_split(classes, "10/2", None, seed=3) == (source, target)  # deterministic
    assert pipeline.resolve_split(classes, None, None, seed=0)[1] == pipeline.resolve_split(classes, "11/1", None, 0)[1]
    source, target = pipeline.resolve_split(classes, "1/1", None, seed=0)  # fewer classes than held
    assert len(source) == 1 and len(target) == 1 and source != target
    assert pipeline.resolve_split(["hazelnut", "transistor"], None, "hazelnut", 0) == (["transistor"], ["hazelnut"])
    with pytest.raises(UserInputError, match="needs 14 classes"):
        pipeline.resolve_split(classes, "12/2", None, seed=0)
    with pytest.raises(UserInputError, match="not in the dataset"):
        pipeline.resolve_split(classes, None, "zipper", seed=0)


def test_run_command_reports_bad_config_without_traceback(capsys, tmp_path):
    assert cli.main(["run", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "nope.py" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`nexvitad run` with no arguments, in a temporary workdir: the default (demo) config with tiny
    random backbones, the synthetic set, the 11/1 split."""
    workdir = tmp_path_factory.mktemp("run")
    messages = []
    assert cli.main(["run", "--workdir", str(workdir), "--no-progress"]) == 0
    first = json.loads((workdir / "metrics.json").read_text())
    results = pipeline.run(pipeline.RunSpec(pipeline.load_config()), workdir, progress=False, log=messages.append)
    return workdir, first, results, messages


def test_default_run_writes_parseable_outputs(default_run):
    workdir, results, _, _ = default_run
    assert results["split"] == "11/1" and len(results["source"]) == 11 and results["random_backbones"]
    (category,) = results["target"]
    for method in ("memory_bank", "decoder"):
        metrics = results["per_class"][category][method]
        assert set(pipeline.PIXEL_METRICS) <= set(metrics) and "image_auroc" in metrics
        assert results["mean"][method]["pixel_auroc"] == metrics["pixel_auroc"]  # one target class
        # The saved maps re-evaluate to the recorded figure (an independent metric call).
        with np.load(workdir / "maps" / f"{category}.{method}.npz") as saved:
            assert saved["scores"].shape == saved["masks"].shape == (16, 128, 128)
            assert pixel_auroc(saved["scores"], saved["masks"]) == pytest.approx(metrics["pixel_auroc"], abs=1e-12)
    markdown = (workdir / "results.md").read_text()
    assert "| 11/1 | memory bank |" in markdown and category in markdown
    with Image.open(workdir / "heatmaps" / f"{category}.png") as grid:
        assert grid.size[0] > 300 and grid.size[1] > 300


def test_default_run_beats_chance(default_run):
    # The default pipeline has random tiny backbones and trains 4 steps, so only the local statistics
    # of the two finest layers carry signal. On the default target (transistor, seed 0) its memory
    # bank reaches 0.873 pixel AUROC (0.76 averaged over all 12 synthetic classes, 0.50-0.92 per
    # class); a broken pipeline (maps unrelated to the images, misaligned masks, inverted scores)
    # lands near or below 0.5. 0.75 leaves a margin for numerical differences between machines.
    _, results, _, _ = default_run
    (category,) = results["target"]
    assert results["per_class"][category]["memory_bank"]["pixel_auroc"] > 0.75


def test_default_run_resumes_and_refuses_another_config(default_run):
    workdir, first, results, messages = default_run
    # The second run found the trained checkpoints and the scored class: nothing was recomputed.
    assert any("already scored (resumed)" in m for m in messages)
    assert results["train_steps"] == first["train_steps"]
    assert results["timings"]["train_s"] < first["timings"]["train_s"] / 2  # restored, not retrained
    assert first["per_class"] == results["per_class"]
    with pytest.raises(UserInputError, match="holds another run"):
        pipeline.run(pipeline.RunSpec(pipeline.load_config(None, ["epochs=3"])), workdir, progress=False,
                     log=lambda _: None)
