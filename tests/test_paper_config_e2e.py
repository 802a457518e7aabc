"""The paper config end to end on CPU, at full size: Hiera-Huge + DINOv2-S with random weights
(no converted checkpoints: `uses_random_backbones`), 224 px, the paper's decoder and batch (4
images per class), on the synthetic set with two source classes and one target class: two train
steps (one per phase: phase 1 source only, phase 2 with pseudo-labels and the consistency term),
then the memory bank (Sinkhorn K-means, K = 30, the four interleaved layers) and the scoring of the
target class's test images. It shows the full-size path works before an accelerator sees it.

Slow (deselected in CI): `pytest -m slow tests/test_paper_config_e2e.py`. Full-size Hiera-Huge fits
on a 24 GB CPU machine: measured once on 2 shared CPU cores, 10.5 min (train 409 s of which most
is compilation, inference 213 s), 8.8 GB peak resident memory.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from nexvitad_jax.config import load_config, uses_random_backbones, with_changes
from nexvitad_jax.metrics import pixel_auroc
from nexvitad_jax.run import RunSpec, run


@pytest.mark.slow
def test_paper_config_runs_end_to_end_with_full_size_random_backbones(tmp_path):
    paper = load_config("paper")
    config = with_changes(paper, {"model.hiera_checkpoint": "", "model.dinov2_checkpoint": "",
                                  "train.epochs": 2, "train.phase1_epochs": 1, "train.steps_per_epoch": 1})
    assert uses_random_backbones(config)
    assert (config.model.hiera.variant, config.model.dinov2.variant, config.data.image_size) == ("huge", "small", 224)
    assert config.model.upconv == paper.model.upconv and config.train.source_per_class == 4
    results = run(RunSpec(config, data="synthetic", split="2/1", seed=0), tmp_path, progress=False,
                  log=lambda _: None)
    assert results["random_backbones"] and results["train_steps"] == 2
    assert len(results["source"]) == 2 and len(results["target"]) == 1
    last = results["train_last_metrics"]
    assert all(np.isfinite(float(value)) for value in last.values()) and "target_mse" in last  # phase 2 ran
    (category,) = results["target"]
    for method in results["methods"]:
        metrics = results["per_class"][category][method]
        assert 0.0 <= metrics["pixel_auroc"] <= 1.0
        with np.load(tmp_path / "maps" / f"{category}.{method}.npz") as saved:
            assert saved["scores"].shape[1:] == (224, 224) and np.isfinite(saved["scores"]).all()
            assert pixel_auroc(saved["scores"], saved["masks"]) == pytest.approx(metrics["pixel_auroc"], abs=1e-12)
    assert json.loads((tmp_path / "metrics.json").read_text())["train_steps"] == 2
