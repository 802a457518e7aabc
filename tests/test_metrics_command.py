"""`nexvitad evaluate` on saved maps: results equal sklearn; each bad file gets a clear error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.metrics import command


def _save(tmp_path, **arrays):
    path = tmp_path / "maps.npz"
    np.savez(path, **arrays)
    return path


def _maps():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[0, 3:7, 3:9] = True
    masks[2, 10:14, 1:3] = True
    scores = (rng.normal(size=masks.shape) + masks).astype(np.float32)
    return scores, masks


def test_evaluate_command_writes_json(tmp_path, capsys):
    scores, masks = _maps()
    out = tmp_path / "out" / "metrics.json"
    status = command.main([str(_save(tmp_path, scores=scores, masks=masks)),
                           "--names", "pixel_auroc,aupro", "--out", str(out)])
    assert status == 0
    written = json.loads(out.read_text())["metrics"]
    assert set(written) == {"pixel_auroc", "aupro"}
    assert written["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), scores.ravel()), abs=1e-6)
    assert "aupro" in capsys.readouterr().out


def test_evaluate_command_uses_given_image_scores(tmp_path):
    scores, masks = _maps()
    image_scores = np.array([0.9, 0.1, 0.2, 0.3])
    out = tmp_path / "m.json"
    command.main([str(_save(tmp_path, scores=scores, masks=masks, image_scores=image_scores)),
                  "--names", "image_auroc", "--out", str(out)])
    labels = masks.any(axis=(1, 2))
    assert json.loads(out.read_text())["metrics"]["image_auroc"] == pytest.approx(
        roc_auc_score(labels, image_scores))


def test_evaluate_command_bad_files(tmp_path):
    with pytest.raises(UserInputError, match="no such file"):
        command.main([str(tmp_path / "absent.npz")])
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip")
    with pytest.raises(UserInputError, match="corrupt.npz: not a readable .npz"):
        command.main([str(corrupt)])
    scores, _ = _maps()
    np.save(tmp_path / "single.npy", scores)
    with pytest.raises(UserInputError, match="single.npy: a single array"):
        command.main([str(tmp_path / "single.npy")])
    with pytest.raises(UserInputError, match=r"missing array\(s\) \['masks'\]"):
        command.main([str(_save(tmp_path, scores=scores))])
    scores, masks = _maps()
    with pytest.raises(UserInputError, match="unknown evaluator"):
        command.main([str(_save(tmp_path, scores=scores, masks=masks)), "--names", "auroc"])
