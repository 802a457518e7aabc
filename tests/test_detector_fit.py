"""`nexvitad fit`: the detector folder (contents, self-contained weights, load checks), its
calibration against an independent scoring of the held-out / validation images, and the errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference.command import list_images, read_image
from nexvitad_jax.inference.detector import AnomalyDetector
from nexvitad_jax.inference.fitted import main as fit
from tests.test_inference_command import write_pngs

SIZE = 64
FAST = ["--k", "3", "--shots", "3", "--layers", "2,3", "--image-size", str(SIZE), "--batch-size", "2"]
SMALL_HIERA = dict(embed_dim=8, num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1), image_size=[SIZE, SIZE])
SMALL_DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)


def write_validation(root, count=2):
    """An MVTec-like test folder (good/, bad/) and its ground_truth (bad/NNN_mask.png)."""
    write_pngs(root / "test" / "good", count, 5)
    write_pngs(root / "test" / "bad", count, 6, defect=True)
    (root / "ground_truth" / "bad").mkdir(parents=True)
    mask = np.zeros((80, 72), np.uint8)
    mask[20:40, 30:50] = 255
    for index in range(count):
        Image.fromarray(mask).save(root / "ground_truth" / "bad" / f"{index:03d}_mask.png")


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """A tiny random-backbone detector fitted on 6 generated normal images (3 in the bank, 3 held out)."""
    root = tmp_path_factory.mktemp("fit")
    write_pngs(root / "normal", 6, 0)
    assert fit(["--normal", str(root / "normal"), "--out", str(root / "detector"), "--holdout", "3", *FAST]) == 0
    return root


def test_detector_folder_holds_everything_and_its_quantile_calibration(fitted):
    directory = fitted / "detector"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format"] == "nexvitad-detector" and manifest["format_version"] == 2
    assert manifest["files"] == ["calibration.json", "detector.json", "prototypes"]
    detector = AnomalyDetector.load(directory)
    assert detector.image_size == SIZE and [p.shape[0] for p in detector.memory_bank.prototypes] == [3, 3]
    # The thresholds are the 0.99 quantile of the held-out images (the 3 after the bank's 3 in sorted
    # order), scored here again by the loaded detector.
    held_out = list_images(fitted / "normal", "--normal")[3:]
    maps, scores = detector.predict(np.stack([read_image(path, SIZE) for path in held_out]))
    calibration = detector.calibration
    assert (calibration.method, calibration.images, calibration.quantile) == ("quantile", 3, 0.99)
    assert calibration.image_threshold == pytest.approx(np.quantile(scores, 0.99), rel=1e-5)
    assert calibration.pixel_threshold == pytest.approx(np.quantile(maps, 0.99), rel=1e-5)
    assert calibration.image_range == pytest.approx((scores.min(), scores.max()), rel=1e-5)


def test_fit_with_labelled_validation_sets_f1_thresholds(fitted, tmp_path):
    write_validation(tmp_path)
    out = tmp_path / "detector"
    assert fit(["--normal", str(fitted / "normal"), "--out", str(out), "--val", str(tmp_path / "test"),
                "--val-masks", str(tmp_path / "ground_truth"), *FAST]) == 0
    detector = AnomalyDetector.load(out)
    files = list_images(tmp_path / "test", "--val")
    labels = np.array([path.parent.name == "bad" for path in files])
    maps, scores = detector.predict(np.stack([read_image(path, SIZE) for path in files]))
    calibration = detector.calibration
    assert calibration.method == "f1" and calibration.details["pixel_threshold_method"] == "f1"
    best = max(f1_score(labels, scores >= t) for t in scores)
    assert f1_score(labels, scores >= calibration.image_threshold) == pytest.approx(best)
    assert calibration.details["image_f1"] == pytest.approx(best)


def test_load_checks_the_folder(fitted, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fitted / "detector", copy)
    with pytest.raises(UserInputError, match="no such folder; it is not a saved AnomalyDetector"):
        AnomalyDetector.load(tmp_path / "missing")
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(UserInputError, match="version 99; this version of nexvitad reads"):
        AnomalyDetector.load(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(copy / "prototypes")
    with pytest.raises(UserInputError, match=r"incomplete detector folder, missing \['prototypes'\]"):
        AnomalyDetector.load(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(UserInputError, match="manifest.json: not valid JSON"):
        AnomalyDetector.load(copy)


def test_fit_errors(fitted, tmp_path):
    normal = str(fitted / "normal")
    with pytest.raises(UserInputError, match="either --normal DIR"):
        fit(["--out", str(tmp_path / "d")])
    with pytest.raises(UserInputError, match="--run needs --class"):
        fit(["--run", str(tmp_path), "--out", str(tmp_path / "d")])
    with pytest.raises(UserInputError, match="none left to calibrate"):
        fit(["--normal", normal, "--out", str(tmp_path / "d"), *FAST, "--shots", "6"])
    with pytest.raises(UserInputError, match="expected a good/ folder"):
        fit(["--normal", normal, "--out", str(tmp_path / "d"), *FAST, "--val", normal])
    with pytest.raises(UserInputError, match="--val-masks needs --val"):
        fit(["--normal", normal, "--out", str(tmp_path / "d"), "--val-masks", normal])
    with pytest.raises(UserInputError, match="run.json: missing"):
        fit(["--run", str(tmp_path), "--class", "a", "--out", str(tmp_path / "d")])


# ----------------------------------------------------------------------------- converted backbones


@pytest.fixture(scope="session")
def converted_backbones(tmp_path_factory):
    """A small Hiera (64 px) and DINOv2 (2 layers) of the real architectures, random weights,
    converted from transformers checkpoints with `python -m converters`: (hiera dir, dino dir)."""
    import torch
    import transformers

    from converters.__main__ import main as convert

    root = tmp_path_factory.mktemp("converted")
    torch.manual_seed(0)
    models = {"hiera": transformers.HieraModel(transformers.HieraConfig(**SMALL_HIERA)),
              "dinov2": transformers.Dinov2Model(transformers.Dinov2Config(**SMALL_DINO))}
    for family, model in models.items():
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        model.save_pretrained(root / f"{family}-hf")
        assert convert([family, "--source", str(root / f"{family}-hf"), "--out", str(root / family)]) == 0
    return root / "hiera", root / "dinov2"


@pytest.fixture(scope="session")
def converted_detector(fitted, converted_backbones, tmp_path_factory):
    """A detector over the converted small Hiera + DINOv2, fitted on the generated normal images."""
    hiera, dino = converted_backbones
    out = tmp_path_factory.mktemp("converted-detector") / "detector"
    assert fit(["--normal", str(fitted / "normal"), "--out", str(out), "--backbone", str(hiera),
                "--dino", str(dino), *FAST]) == 0
    return out


@pytest.mark.slow  # a torch conversion and a fit over the converted backbones: ~50 s on 2 cores
def test_converted_backbones_are_copied_into_the_detector(converted_detector, converted_backbones, tmp_path):
    description = json.loads((converted_detector / "detector.json").read_text())["extractor"]
    assert (description["hiera"]["directory"], description["dinov2"]["directory"]) == ("weights/hiera",
                                                                                        "weights/dinov2")
    moved = tmp_path / "elsewhere" / "detector"
    shutil.copytree(converted_detector, moved)
    # Self-contained: it loads from anywhere with the original checkpoints gone.
    originals = converted_backbones[0].parent
    hidden = originals.with_name(originals.name + "-hidden")
    originals.rename(hidden)
    try:
        detector = AnomalyDetector.load(moved)
    finally:
        hidden.rename(originals)
    assert detector.extractor.describe()["hiera"]["weights"] == description["hiera"]["weights"]
    config = json.loads((moved / "detector.json").read_text())
    config["extractor"]["dinov2"]["weights"] = "0" * 16  # as if the copied weights were other ones
    (moved / "detector.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="does not match the one the memory bank was built with"):
        AnomalyDetector.load(moved)


# ----------------------------------------------------------------------------- from a main-job workdir


@pytest.mark.slow  # a whole tiny main job first: ~3 min on 2 cores
def test_fit_from_a_run_rebuilds_the_class_bank(tmp_path):
    """`fit --run`: the trained encoder and the target class's bank as the run built them: the saved
    detector's maps of the class's test images equal the run's own (maps/CLASS.memory_bank.npz)."""
    from nexvitad_jax.config import load_config
    from nexvitad_jax.data import open_dataset
    from nexvitad_jax.run import RunSpec, run

    workdir = tmp_path / "run"
    results = run(RunSpec(load_config("tiny"), split="2/1", methods=("memory_bank",)), workdir, progress=False,
                  log=lambda _: None)
    (category,) = results["target"]
    out = tmp_path / "detector"
    assert fit(["--run", str(workdir), "--class", category, "--out", str(out), "--holdout", "4"]) == 0
    assert (out / "weights" / "encoder" / "adapters.npz").is_file()
    detector = AnomalyDetector.load(out)
    assert detector.calibration.method == "quantile" and detector.calibration.images == 4
    test = open_dataset("synthetic", image_size=64).load(category, "test")
    maps, scores = detector.predict(test.images.astype(np.float32) / 255.0)
    with np.load(workdir / "maps" / f"{category}.memory_bank.npz") as saved:
        np.testing.assert_allclose(maps, saved["scores"], rtol=1e-5, atol=1e-6 * np.abs(saved["scores"]).max())
        np.testing.assert_allclose(scores, saved["image_scores"], rtol=1e-5)
    with pytest.raises(UserInputError, match="not a target class"):
        fit(["--run", str(workdir), "--class", results["source"][0], "--out", str(tmp_path / "other")])
