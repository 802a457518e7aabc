"""Cross-dataset runs: `nexvitad run --data synthetic --target-data TARGET`, with the real MVTec
sample as the target (given as `../shared/data/mvtec_reduced`, relative to the repository root, as
a user would type it), and a folder-spec target without masks (image metrics computed, pixel metrics
undefined with the reason); the experiments take --target-data the same way.

Metrics are checked against scikit-learn on the maps the run saved, labels against the files."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from nexvitad_jax import cli
from nexvitad_jax.data import SYNTHETIC_CLASSES
from nexvitad_jax.metrics import PIXEL_METRICS
from nexvitad_jax.metrics.command import evaluate_arrays, load_maps
from tests.conftest import MVTEC_REDUCED, REPO_ROOT

# The tiny config without training steps, the memory bank on the finest layer (one compiled program
# each): what is checked is where the classes come from and what is evaluated, not how well (the
# training and its resume are tests/test_run.py's). Both runs have the same shapes (2 source classes,
# 1 target), so the second reuses most of the first's compiled programs.
FAST = ["--config", "tiny", "--no-progress", "--methods", "memory_bank", "--split", "2/1",
        "--set", "bank.layers=(0,)", "--set", "train.epochs=0", "--set", "train.phase1_epochs=0"]
TARGET = "../shared/data/mvtec_reduced"


def _run(workdir: Path, cache: Path, *args: str) -> dict:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO_ROOT)
        patch.setenv("NEXVITAD_CACHE", str(cache))
        assert cli.main(["run", *FAST, "--data", "synthetic", "--workdir", str(workdir), *args]) == 0
    return json.loads((workdir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def real_target(tmp_path_factory):
    """Source: 2 synthetic classes; target: the real sample's hazelnut."""
    assert (REPO_ROOT / TARGET).resolve() == MVTEC_REDUCED.resolve()
    workdir, cache = tmp_path_factory.mktemp("cross"), tmp_path_factory.mktemp("cache")
    return workdir, _run(workdir, cache, "--target-data", TARGET, "--target", "hazelnut")


def test_target_classes_come_from_the_target_data(real_target):
    _, results = real_target
    # The synthetic set also has a class "hazelnut": the target's is told apart by its prefix.
    assert results["target"] == ["target.hazelnut"] and results["target_data"] == TARGET
    assert len(results["source"]) == 2
    assert set(results["source"]) <= {*SYNTHETIC_CLASSES, "source.hazelnut", "source.transistor"} - {"hazelnut"}


def test_real_target_metrics_equal_sklearn_on_the_saved_maps(real_target):
    workdir, results = real_target
    files = sorted((MVTEC_REDUCED / "hazelnut" / "test").glob("*/*.png"))
    for method in ("memory_bank",):
        metrics = results["per_class"]["target.hazelnut"][method]
        assert "undefined" not in metrics and "notes" not in metrics
        saved = load_maps(workdir / "maps" / f"target.hazelnut.{method}.npz")
        np.testing.assert_array_equal(saved["labels"], [int(f.parent.name != "good") for f in files])
        assert saved["mask_known"].all() and saved["masks"][saved["labels"] == 1].any(axis=(1, 2)).all()
        assert metrics["pixel_auroc"] == pytest.approx(
            roc_auc_score(saved["masks"].ravel(), saved["scores"].ravel()), abs=1e-9)
        assert metrics["image_auroc"] == pytest.approx(roc_auc_score(saved["labels"], saved["image_scores"]), abs=1e-9)
        assert all(isinstance(metrics[name], float) for name in PIXEL_METRICS)


def test_folder_spec_target_without_masks_gives_image_metrics_only(tmp_path):
    sample = Path(os.path.relpath(MVTEC_REDUCED / "hazelnut", tmp_path)).as_posix()  # relative to the spec file
    spec = tmp_path / "nuts.yaml"
    spec.write_text(f"classes:\n  nut:\n    normal: {sample}/train/good\n    test_normal: {sample}/test/good\n"
                    f"    abnormal: {{crack: {sample}/test/crack, cut: {sample}/test/cut}}\n")
    workdir = tmp_path / "run"
    results = _run(workdir, tmp_path / "cache", "--target-data", str(spec))
    assert results["target"] == ["nut"]
    metrics = results["per_class"]["nut"]["memory_bank"]
    reason = "no masks for defect types crack, cut (4 of 4 anomalous images)"
    assert all(metrics[name] is None for name in PIXEL_METRICS)
    assert all(reason in metrics["undefined"][name] for name in PIXEL_METRICS)
    assert results["mean"]["memory_bank"]["pixel_auroc"] is None
    saved = load_maps(workdir / "maps" / "nut.memory_bank.npz")
    np.testing.assert_array_equal(saved["labels"], [1, 1, 1, 1, 0, 0])  # crack, crack, cut, cut, good, good
    np.testing.assert_array_equal(saved["mask_known"], [False] * 4 + [True] * 2)
    expected = roc_auc_score(saved["labels"], saved["image_scores"])
    assert metrics["image_auroc"] == pytest.approx(expected, abs=1e-9)
    # `nexvitad evaluate` reads mask_known from the saved maps: the image metric is the same.
    assert evaluate_arrays(saved, ["image_auroc"])["image_auroc"] == pytest.approx(expected, abs=1e-9)
    assert "n/a" in (workdir / "results.md").read_text()


PROTOCOL = ["--seeds", "1", "--splits", "2/1"]


@pytest.mark.parametrize("module, extra", [("table1", PROTOCOL), ("ablation_mtl", PROTOCOL),
                                           ("cluster_sweep", [*PROTOCOL, "--ks", "4"]),
                                           ("inference_time", ["--batches", "1", "--category", "hazelnut"])])
def test_experiments_take_target_data(module, extra):
    """Each experiment's runs carry --target-data into their params and to the run itself (a run of
    one dataset keeps its params as before, so its saved results still resume)."""
    import importlib

    from experiments import runner

    experiment = importlib.import_module(f"experiments.{module}")
    parser = argparse.ArgumentParser()
    runner.experiment_arguments(parser)
    getattr(experiment, "arguments", lambda p: None)(parser)
    for target_data in (None, TARGET):
        args = parser.parse_args(["--config", "tiny", "--out", "unused", *extra,
                                  *(["--target-data", target_data] if target_data else [])])
        runs = experiment.build(args).runs
        assert runs and all(run.params.get("target_data") == target_data for run in runs)
        assert all(run.execute.keywords.get("target_data") == target_data for run in runs)
        assert ("target_data" in runs[0].params) == (target_data is not None)
