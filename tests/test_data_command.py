"""`nexvitad data` (info, prepare, sheet) on every layout, and its errors."""

from __future__ import annotations

from collections import Counter

import pytest
from PIL import Image

from nexvitad_jax.data import decode
from nexvitad_jax.data.command import main
from nexvitad_jax.errors import UserInputError
from tests.test_data_folder_spec import build_folder_spec
from tests.test_data_layouts import BUILDERS, S, build_mvtec


def test_info_on_the_real_sample(mvtec_reduced, tmp_path, capsys):
    assert main(["info", str(mvtec_reduced), "--image-size", "32", "--cache-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{mvtec_reduced}: MVTec AD, 2 classes: hazelnut, transistor"
    assert lines[1].split() == ["hazelnut", "train", "50", "(good", "50)", "test", "10", "(good", "2,", "crack", "2,",
                                "cut", "2,", "hole", "2,", "print", "2)"]
    assert lines[2].startswith("transistor  train 50 (good 50)  test 10 (good 2, bent_lead 2,")


def _line(category: str, splits: dict[str, Counter]) -> str:
    """The class line `info` should print for what a fixture was built to hold."""
    parts = []
    for split in ("train", "validation", "test"):
        if split in splits:
            types = sorted(splits[split], key=lambda t: (t != "good", t))
            parts.append(f"{split} {sum(splits[split].values())} ({', '.join(f'{t} {splits[split][t]}' for t in types)})")
    return "  ".join(parts)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_info_names_the_layout_and_counts_without_decoding(tmp_path, capsys, monkeypatch, name):
    tree = BUILDERS[name](tmp_path / name)
    monkeypatch.setattr(decode, "decode_image", lambda *a, **k: pytest.fail("info decodes nothing"))
    assert main(["info", str(tree.root), "--cache-dir", str(tmp_path / "c")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{tree.root}: {tree.layout}, {len(tree.expected)} classes: {', '.join(sorted(tree.expected))}"
    rows = [line for line in lines if not line.startswith("note: ")][1:]
    for row, category in zip(rows, sorted(tree.expected), strict=True):
        expected = {split: Counter(r.defect_type for r in records) for split, records in tree.expected[category].items()}
        assert row.split(None, 1) == [category, _line(category, expected)]
    notes = [line for line in lines if line.startswith("note: ")]
    assert bool(notes) == (name in ("mvtec3d", "loco", "btad", "visa"))


def test_info_on_a_folder_spec_and_a_cross_dataset(tmp_path, capsys):
    spec, _ = build_folder_spec(tmp_path / "spec")
    build_mvtec(tmp_path / "m", classes=("alpha", "bracket"))
    assert main(["info", str(tmp_path / "m"), "--target-data", str(spec), "--cache-dir", str(tmp_path / "c")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{tmp_path / 'm'}: cross-dataset, 4 classes: alpha, plate, source.bracket, target.bracket"
    assert lines[1] == ("note: source: MVTec AD (2 classes); target: folder spec (2 classes); classes in both "
                        "prefixed source./target.: ['bracket']")
    assert lines[2] == "note: target: bracket: no masks for dent: those images count in image metrics only (pixel metrics and training leave them out)"
    assert lines[-1] == "target.bracket [target]  train 4 (good 4)  test 6 (good 2, dent 2, scratch 2)"
    assert lines[-2].startswith("source.bracket [source]  train 3 (good 3)  test 3")


@pytest.mark.parametrize("name", ["mvtec3d", "loco", "visa"])
def test_prepare_fills_the_cache(tmp_path, name):
    tree = BUILDERS[name](tmp_path / name)
    assert main(["prepare", str(tree.root), "--image-size", str(S), "--cache-dir", str(tmp_path / "c")]) == 0
    assert len(list((tmp_path / "c").rglob("*.npz"))) == sum(len(splits) for splits in tree.expected.values())


def test_prepare_the_real_sample(mvtec_reduced, tmp_path):
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
