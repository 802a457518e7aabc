"""`nexvitad data` (info, prepare, sheet) and its errors."""

from __future__ import annotations

import pytest
from PIL import Image

from nexvitad_jax.data.command import main
from nexvitad_jax.errors import UserInputError


def test_info_on_the_real_sample(mvtec_reduced, tmp_path, capsys):
    assert main(["info", str(mvtec_reduced), "--image-size", "32", "--cache-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["hazelnut", "train", "50", "test", "10"]
    assert "crack, cut, hole, print" in lines[0]
    assert lines[1].startswith("transistor")


def test_prepare_fills_the_cache(mvtec_reduced, tmp_path):
    assert main(["prepare", str(mvtec_reduced), "--image-size", "32", "--cache-dir", str(tmp_path)]) == 0
    assert len(list(tmp_path.rglob("*.npz"))) == 4


def test_sheet_and_errors(tmp_path):
    out = tmp_path / "s.png"
    assert main(["sheet", "synthetic", "--image-size", "32", "--classes", "pill", "--per-class", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (4 * 32, 32)
    with pytest.raises(UserInputError, match=r"--classes \['grid'\]"):
        main(["info", "synthetic", "--image-size", "32", "--classes", "grid"])
    with pytest.raises(UserInputError, match="no such path"):
        main(["info", str(tmp_path / "nothing")])
