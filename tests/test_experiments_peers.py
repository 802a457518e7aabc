"""`python -m experiments.peers` end to end: the synthetic set and the shared MVTec sample, the
table, the plot, resume, and its errors. The scoring itself is checked against NumPy in
tests/test_peers_patchead.py; here the per-class metrics are checked against the evaluators run
on the method's own maps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import peers
from experiments.runner import main

TINY = ["--config", "tiny", "--no-progress", "--seeds", "1", "--shots", "1"]


def test_synthetic_table_plot_and_resume(tmp_path, capsys):
    out = tmp_path / "peers"
    argv = [*TINY, "--out", str(out), "--classes", "bottle", "--methods", "patchead,patchead_zero"]
    assert main(peers.build, argv, peers.__doc__, peers.arguments) == 0
    summary = json.loads((out / "peers.json").read_text())
    assert summary["finished"] == ["patchead_1shot_seed0", "patchead_zero_0shot_seed0"] and not summary["missing"]
    groups = {(g["method"], g["shots"]): g for g in summary["summary"]["groups"]}
    assert set(groups) == {("patchead", 1), ("patchead_zero", 0)}
    for group in groups.values():
        for metric in ("image_auroc", "image_ap", "pixel_auroc", "aupro"):
            assert 0.0 <= group["metrics"][metric]["mean"] <= 1.0
        assert group["metrics"]["images_per_s"]["mean"] > 0
    markdown = (out / "peers.md").read_text()
    assert "| PatchEAD | 1 | 1 |" in markdown and "batch 0-shot" in markdown and "RANDOMLY INITIALIZED" in markdown
    assert (out / "peers.png").stat().st_size > 0
    record = json.loads((out / "runs" / "patchead_1shot_seed0" / "result.json").read_text())
    # Resume: a second invocation finds every run finished and recomputes nothing.
    capsys.readouterr()
    assert main(peers.build, argv, peers.__doc__, peers.arguments) == 0
    assert capsys.readouterr().err.count("finished earlier (skipped)") == 2
    assert json.loads((out / "runs" / "patchead_1shot_seed0" / "result.json").read_text()) == record


def test_shared_sample_metrics_equal_the_evaluators(tmp_path, mvtec_reduced):
    from nexvitad_jax.config import load_config
    from nexvitad_jax.data import few_shot_images, open_dataset
    from nexvitad_jax.metrics import evaluate_maps, image_ap
    from nexvitad_jax.peers.methods import method_named

    out = tmp_path / "peers"
    argv = [*TINY, "--out", str(out), "--data", str(mvtec_reduced), "--classes", "hazelnut",
            "--methods", "patchead"]
    assert main(peers.build, argv, peers.__doc__, peers.arguments) == 0
    config = load_config("tiny", ["seed=0"])
    dataset = open_dataset(str(mvtec_reduced), image_size=int(config.data.image_size))
    test = dataset.load("hazelnut", "test")
    prompts = few_shot_images(dataset, "hazelnut", 1, 0).astype(np.float32) / 255.0
    maps, scores, _ = method_named("patchead").build(config)(prompts, test.images.astype(np.float32) / 255.0, 0)
    expected = evaluate_maps(maps, test.masks, scores, test.labels)
    saved = json.loads((out / "runs" / "patchead_1shot_seed0" / "result.json").read_text())["result"]
    metrics = saved["per_class"]["hazelnut"]["metrics"]
    for name in ("image_auroc", "pixel_auroc", "aupro", "pixel_ap"):
        assert metrics[name] == pytest.approx(expected[name], abs=1e-6)
    assert metrics["image_ap"] == pytest.approx(image_ap(scores, test.labels), abs=1e-6)
    assert saved["per_class"]["hazelnut"]["images"] == len(test)


@pytest.mark.slow
def test_nexvitad_bank_and_every_method_on_the_shared_sample(tmp_path, mvtec_reduced):
    from nexvitad_jax.peers.methods import METHODS

    out = tmp_path / "peers"
    argv = [*TINY, "--out", str(out), "--data", str(mvtec_reduced), "--methods", ",".join(METHODS),
            "--shots", "1,2", "--seeds", "2", "--inp-steps", "3"]
    assert main(peers.build, argv, peers.__doc__, peers.arguments) == 0
    summary = json.loads((out / "peers.json").read_text())
    assert not summary["missing"]
    assert {g["method"] for g in summary["summary"]["groups"]} == set(METHODS)


def test_unknown_method_is_a_clear_error(tmp_path, capsys):
    argv = [*TINY, "--out", str(tmp_path / "x"), "--methods", "patchead,inp_forme"]
    assert main(peers.build, argv, peers.__doc__, peers.arguments) == 2
    error = capsys.readouterr().err
    assert "unknown peer method 'inp_forme'" in error and "patchead_plus" in error
