"""`nexvitad score` end to end: generated PNGs (fitted on the fly, then from the saved detector), the
real MVTec sample (smoke), and its errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference.command import main

FAST = ["--k", "3", "--shots", "3", "--layers", "2,3", "--image-size", "64", "--batch-size", "2"]


def write_pngs(directory, count, seed, defect=False):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        image = np.clip(120 + 10 * rng.normal(size=(80, 72, 3)), 0, 255).astype(np.uint8)
        if defect:
            image[20:40, 30:50] = (250, 20, 20)
        Image.fromarray(image).save(directory / f"{index:03d}.png")


def read_predictions(out):
    with open(out / "predictions.csv") as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    return rows, json.loads((out / "predictions.json").read_text())


def test_score_command_on_generated_pngs(tmp_path):
    write_pngs(tmp_path / "normal", 5, 0)
    write_pngs(tmp_path / "test" / "good", 2, 1)
    write_pngs(tmp_path / "test" / "bad", 2, 2, defect=True)
    out = tmp_path / "out"
    assert main(["--normal", str(tmp_path / "normal"), "--images", str(tmp_path / "test"), "--out", str(out),
                 "--save-detector", str(tmp_path / "detector"), *FAST]) == 0
    rows, summary = read_predictions(out)
    assert sorted(rows) == ["bad/000.png", "bad/001.png", "good/000.png", "good/001.png"]
    # Normalized scores and decisions, from the raw scores and the calibration by anomalib's formula.
    calibration = summary["calibration"]
    threshold, (low, high) = calibration["image_threshold"], calibration["image_range"]
    assert calibration["method"] == "quantile" and calibration["images"] == 2  # 5 normal, 3 in the bank
    for record in summary["predictions"]:
        row = rows[record["image"]]
        assert float(row["score"]) == pytest.approx(record["score"], rel=1e-5)
        expected = min(max((record["score"] - threshold) / (high - low) + 0.5, 0.0), 1.0)
        assert record["normalized_score"] == pytest.approx(expected, abs=1e-6)
        assert row["decision"] == record["decision"] == ("anomalous" if record["score"] >= threshold else "normal")
    assert {rows[f"bad/00{i}.png"]["decision"] for i in range(2)} == {"anomalous"}  # a red square on grey
    mask = np.asarray(Image.open(out / "masks" / "bad" / "000.png"))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    overlay = Image.open(out / "overlays" / "bad" / "000.png")
    assert overlay.mode == "RGB" and overlay.size[0] > 64
    # The saved detector scores the same images to the same results.
    again = tmp_path / "again"
    assert main(["--detector", str(tmp_path / "detector"), "--images", str(tmp_path / "test"),
                 "--out", str(again)]) == 0
    for record, other in zip(summary["predictions"], read_predictions(again)[1]["predictions"]):
        assert other["image"] == record["image"] and other["decision"] == record["decision"]
        assert other["score"] == pytest.approx(record["score"], rel=1e-5)


def test_score_command_errors(tmp_path):
    write_pngs(tmp_path / "normal", 4, 0)
    (tmp_path / "empty").mkdir()
    base = ["--normal", str(tmp_path / "normal"), "--out", str(tmp_path / "out"), *FAST]
    with pytest.raises(UserInputError, match=r"--images .*empty: no images found"):
        main([*base, "--images", str(tmp_path / "empty")])
    with pytest.raises(UserInputError, match=r"--normal .*missing: no such directory"):
        main(["--normal", str(tmp_path / "missing"), "--images", str(tmp_path / "normal"), "--out", "x"])
    with pytest.raises(UserInputError, match=r"either --detector DETECTOR"):
        main(["--images", str(tmp_path / "normal"), "--out", "x"])
    with pytest.raises(UserInputError, match=r"no such folder; it is not a saved AnomalyDetector"):
        main(["--detector", str(tmp_path / "missing"), "--images", str(tmp_path / "normal"), "--out", "x"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "image.png").write_bytes(b"not a png at all")
    with pytest.raises(UserInputError, match=r"image.png: not a readable image"):
        main([*base, "--images", str(broken)])
    with pytest.raises(UserInputError, match=r"--layers 'a,b'"):
        main([*base, "--images", str(tmp_path / "normal"), "--layers", "a,b"])
    with pytest.raises(UserInputError, match=r"--dino needs --backbone"):
        main([*base, "--images", str(tmp_path / "normal"), "--dino", str(tmp_path)])
    # 3 images x 2x2 patches at the last stage of a 64-pixel input: 12 patches < K = 13.
    with pytest.raises(UserInputError, match=r"12 patches, fewer than K = 13"):
        main([*base, "--images", str(tmp_path / "normal"), "--k", "13", "--layers", "3"])


def test_score_command_smoke_on_real_mvtec_sample(mvtec_reduced, tmp_path):
    hazelnut = mvtec_reduced / "hazelnut"
    out = tmp_path / "out"
    assert main(["--normal", str(hazelnut / "train" / "good"), "--images", str(hazelnut / "test"),
                 "--out", str(out), "--k", "10", "--layers", "1,2", "--image-size", "128", "--batch-size", "5"]) == 0
    rows, summary = read_predictions(out)
    expected = sorted(p.relative_to(hazelnut / "test").as_posix() for p in (hazelnut / "test").rglob("*.png"))
    assert sorted(rows) == expected and all(np.isfinite([r["score"] for r in summary["predictions"]]))
    assert summary["calibration"]["images"] == 10  # --holdout's default
    assert len(list((out / "overlays").rglob("*.png"))) == len(list((out / "masks").rglob("*.png"))) == len(expected)
