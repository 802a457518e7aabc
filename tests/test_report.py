"""Reports: the heatmap overlay and grid (pixels checked against matplotlib's colour mapping and a
direct NumPy blend, thresholds against sklearn), the training log and its TensorBoard event files
(read back by a TFRecord parser written here, CRCs checked), and report.html rendered in headless
Chromium (Debian's `chromium`, which .ci/run installs)."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nexvitad_jax import cli
from nexvitad_jax.config import config_dict, load_config
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.report import (COLUMNS, heatmap_grid, oracle_threshold, overlay, percent, read_training_log,
                                 write_tensorboard)

# ----------------------------------------------------------------------------- references


def reference_colours(values, vmin, vmax):
    """matplotlib's own value -> colour path (a ScalarMappable with a clipping Normalize)."""
    import matplotlib
    from matplotlib.cm import ScalarMappable

    mappable = ScalarMappable(matplotlib.colors.Normalize(vmin, vmax, clip=True), "jet")
    return mappable.to_rgba(np.asarray(values, np.float64), bytes=True)[..., :3]


def reference_overlay(image, values, vmin, vmax, alpha=0.5):
    blend = (1 - alpha) * image.astype(np.float64) + alpha * reference_colours(values, vmin, vmax).astype(np.float64)
    return np.round(blend).astype(np.uint8)


def reference_f1_threshold(scores, labels):
    """The threshold of sklearn's precision-recall curve with the highest F1."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
    return thresholds[int(np.argmax(f1[:-1]))]


def test_overlay_is_the_blend_of_the_image_and_matplotlibs_colours():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    heatmap = rng.normal(size=(20, 30))
    heatmap[0, :3] = [-10.0, 10.0, 0.0]  # outside the scale: clipped to its ends
    for alpha in (0.5, 0.3):
        assert np.array_equal(overlay(image, heatmap, vmin=-1.0, vmax=2.0, alpha=alpha),
                              reference_overlay(image, heatmap, -1.0, 2.0, alpha))
    # jet's ends: dark blue at vmin, dark red at vmax.
    assert overlay(image, heatmap, vmin=-1.0, vmax=2.0, alpha=1.0)[0, 0].tolist() == [0, 0, 127]
    assert overlay(image, heatmap, vmin=-1.0, vmax=2.0, alpha=1.0)[0, 1].tolist() == [127, 0, 0]
    with pytest.raises(UserInputError, match=r"heatmap \(20, 29\)"):
        overlay(image, heatmap[:, :29], vmin=0.0, vmax=1.0)


def synthetic_test_set(image_size=64):
    from nexvitad_jax.data import open_dataset

    return open_dataset("synthetic", image_size=image_size).load("transistor", "test")


def fake_maps(test, seed=0):
    """Maps that follow the masks (plus noise), for two inference paths on different scales."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    base = np.stack([gaussian_filter(m.astype(np.float64), 2) for m in test.masks])
    return {"memory_bank": 3.0 * base + rng.random(base.shape), "decoder": base + 0.2 * rng.random(base.shape)}


def test_heatmap_grid_shows_every_defect_type_at_input_resolution(tmp_path):
    test = synthetic_test_set()
    maps = fake_maps(test)
    scores = {m: v.reshape(len(v), -1).max(axis=1) for m, v in maps.items()}
    grid = heatmap_grid(tmp_path / "grid.png", "transistor", test, maps, scores, per_type=2)
    shown = [test.defect_types[i] for i in grid.rows]
    for kind in set(test.defect_types):  # every defect type (and good), up to 2 rows each
        assert shown.count(kind) == min(2, test.defect_types.count(kind)), kind
    assert shown[-1] == "good"
    canvas = np.asarray(Image.open(grid.path).convert("RGB"))
    for r, index in enumerate(grid.rows):
        def panel(column):
            left, top, right, bottom = grid.panel_box(r, column)
            return canvas[top:bottom, left:right]

        assert np.array_equal(panel("image"), test.images[index])  # input resolution, unresampled
        assert np.array_equal(panel("ground truth")[..., 0] > 127, test.masks[index])
        for method, values in maps.items():
            vmin, vmax = values.min(), values.max()  # one scale per method over the class
            assert np.array_equal(panel(f"{method} map"), reference_colours(values[index], vmin, vmax))
            assert np.array_equal(panel(f"{method} overlay"), reference_overlay(test.images[index], values[index],
                                                                               vmin, vmax))
    for method in maps:
        assert grid.scales[method].threshold == pytest.approx(reference_f1_threshold(scores[method], test.labels))
    assert oracle_threshold(np.arange(4.0), np.zeros(4, int)) is None  # one class: no threshold


# ----------------------------------------------------------------------------- training log, TensorBoard

TRAINING_RECORDS = [
    {"step": 1, "epoch": 0, "phase": 1, "source_ce": 0.9, "loss": 0.9, "images_per_s": 3.0},
    {"step": 2, "epoch": 0, "phase": 1, "source_ce": 0.8, "loss": 0.8, "images_per_s": 3.5},
    {"step": 2, "epoch": 0, "phase": 1, "source_ce": 0.75, "loss": 0.75, "images_per_s": 3.4},  # resumed
    {"step": 3, "epoch": 1, "phase": 2, "source_ce": 0.7, "target_ce": 0.6, "target_mse": 0.1, "loss": 1.4,
     "labelled_fraction": 0.4, "images_per_s": 2.0},
]


def write_training_log(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in TRAINING_RECORDS) + '{"step": 4, "lo')  # killed mid-line


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: TFRecord's checksum."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecords(path: Path) -> list[bytes]:
    """The records of a TFRecord file: length (u64), its masked CRC, data, the data's masked CRC."""
    blob, records, at = path.read_bytes(), [], 0
    while at < len(blob):
        (length,), (length_crc,) = struct.unpack_from("<Q", blob, at), struct.unpack_from("<I", blob, at + 8)
        assert length_crc == masked_crc(blob[at:at + 8])
        data = blob[at + 12:at + 12 + length]
        assert struct.unpack_from("<I", blob, at + 12 + length)[0] == masked_crc(data)
        records.append(data)
        at += 16 + length
    return records


def test_training_log_and_its_tensorboard_events(tmp_path):
    tensorboardX = pytest.importorskip("tensorboardX", reason="the tensorboard extra (pip install tensorboardX)")
    from tensorboardX.proto.event_pb2 import Event

    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    log = tmp_path / "train" / "metrics.jsonl"
    write_training_log(log)
    records = read_training_log(log)
    assert [r["step"] for r in records] == [1, 2, 3] and records[1]["loss"] == 0.75  # last record of a step
    write_tensorboard(log)
    logdir = write_tensorboard(log)  # twice: rewritten, not appended
    (events,) = logdir.glob("events.out.tfevents.*")
    assert logdir == tmp_path / "train" / "tensorboard" and tensorboardX.__version__
    found = {}
    for data in read_tfrecords(events):
        event = Event.FromString(data)
        for value in event.summary.value:
            found[(value.tag, event.step)] = value.simple_value
    expected = {(f"train/{k}", r["step"]): v for r in records for k, v in r.items()
                if k not in ("step", "epoch", "phase")}
    assert found.keys() == expected.keys()
    assert all(found[key] == pytest.approx(value, rel=1e-6) for key, value in expected.items())
    (log.parent / "bad.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserInputError, match="bad.jsonl:2"):
        read_training_log(log.parent / "bad.jsonl")


# ----------------------------------------------------------------------------- report.html in Chromium


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is needed to render report.html: install Debian's package "
                "(apt-get install chromium; .ci/run installs it when missing)")


def run_chromium(tmp_path: Path, *args: str) -> str:
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class DomReader(HTMLParser):
    """The tables (rows of cell texts), images and external references of a DOM."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.external, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs)
        if tag in ("script", "link", "iframe") or any(str(v).startswith(("http:", "https:", "//"))
                                                      for k, v in attrs.items() if k in ("src", "href")):
            self.external.append((tag, attrs))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None


def fake_workdir(root: Path) -> tuple[Path, dict]:
    """A finished run's workdir, inside an experiment's output folder (OUT/runs/NAME/work)."""
    workdir = root / "out" / "runs" / "11-1_seed0" / "work"
    test = synthetic_test_set()
    grid = heatmap_grid(workdir / "heatmaps" / "transistor.png", "transistor", test, fake_maps(test))
    metrics = {"memory_bank": {"pixel_auroc": 0.9123, "pixel_ap": 0.4567, "pro_iou": 0.3, "aupro": 0.81,
                               "image_auroc": 0.95},
               "decoder": {"pixel_auroc": 0.8011, "pixel_ap": 0.2, "pro_iou": 0.1, "aupro": 0.6, "image_auroc": None}}
    results = {"data": "synthetic", "seed": 0, "source": ["bottle"], "target": ["transistor"], "split": "1/1",
               "methods": ["memory_bank", "decoder"], "random_backbones": True, "train_steps": 3,
               "per_class": {"transistor": metrics}, "mean": metrics, "timings": {"train_s": 3.0, "total_s": 5.0},
               "config": config_dict(load_config("tiny"))}
    (workdir / "metrics.json").write_text(json.dumps(results))
    (workdir / "classes").mkdir()
    (workdir / "classes" / "transistor.json").write_text(json.dumps({"metrics": metrics, "n_test": 16,
                                                                      "n_anomalous": 12}))
    write_training_log(workdir / "train" / "metrics.jsonl")
    Image.new("RGB", (60, 40), (10, 200, 30)).save(root / "out" / "table1.png")  # an experiment's plot
    return workdir, {"results": results, "grid": grid}


def test_report_html_renders_in_chromium_with_tables_and_images(tmp_path):
    workdir, made = fake_workdir(tmp_path)
    assert cli.main(["report", str(workdir)]) == 0
    page = (workdir / "report.html").as_uri()
    dom = DomReader()
    dom.feed(run_chromium(tmp_path, "--dump-dom", page))
    assert dom.external == []  # self-contained
    table1, per_class, config = dom.tables
    metrics = made["results"]["mean"]
    assert table1[0][:2] == ["split", "inference"] and table1[0][2:] == [title for _, title in COLUMNS]
    assert table1[1] == ["1/1", "memory bank", *(percent(metrics["memory_bank"][n]) for n, _ in COLUMNS)]
    assert table1[2][-1] == "n/a"  # a metric that could not be computed
    assert per_class[1][:4] == ["transistor", "memory bank", "16", "12"]
    assert ["train.epochs", str(load_config("tiny").train.epochs)] in config
    alts = [image["alt"] for image in dom.images]
    assert alts == ["heatmaps of transistor", "training curves", "table1"]
    embedded = [image["src"].split(",", 1) for image in dom.images]
    assert all(head == "data:image/png;base64" for head, _ in embedded)
    assert base64.b64decode(embedded[0][1]) == made["grid"].path.read_bytes()
    shot = tmp_path / "shot.png"
    run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=900,1400", page)
    with Image.open(shot) as picture:
        pixels = np.asarray(picture.convert("RGB"))
    assert pixels.shape == (1400, 900, 3) and pixels.std() > 20  # something rendered, not a blank page


def test_report_command_errors_and_unfinished_runs(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "missing: no such directory" in capsys.readouterr().err
    workdir = tmp_path / "running"
    workdir.mkdir()
    assert cli.main(["report", str(workdir)]) == 2
    assert "holds no run.json or metrics.json" in capsys.readouterr().err
    (workdir / "run.json").write_text(json.dumps({"key": "k", "identity": {"data": "synthetic", "seed": 1,
                                                                            "source": ["a"], "target": ["b"]}}))
    assert cli.main(["report", str(workdir), "--tensorboard"]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
    assert cli.main(["report", str(workdir)]) == 0
    assert "has not finished" in (workdir / "report.html").read_text()
