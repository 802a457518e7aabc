"""`nexvitad export`: the StableHLO file run by `nexvitad_jax.deploy` (jax alone, checked in a
subprocess) and the ONNX model run by onnxruntime equal the detector's maps and scores (<= 1e-4
relative) on random and real images, for the tiny random backbones, converted small Hiera + DINOv2
and the trained-encoder extractor; what jax2onnx cannot convert fails with an error naming it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nexvitad_jax import deploy
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference.detector import AnomalyDetector
from nexvitad_jax.inference.export import main as export
from tests import test_detector_fit
from tests.conftest import REPO_ROOT
from tests.test_detector_fit import SIZE

# The detector folders test_detector_fit makes (session fixtures: made once when both files run).
fitted = test_detector_fit.fitted
converted_backbones = test_detector_fit.converted_backbones
converted_detector = test_detector_fit.converted_detector

TOLERANCE = 1e-4


def relative_error(values, reference) -> float:
    return float(np.abs(np.asarray(values, np.float64) - reference).max() / np.abs(reference).max())


def sample_images(mvtec_reduced) -> list[np.ndarray]:
    """Random uint8 images, and real ones: hazelnut and transistor test images resized to SIZE."""
    real = []
    for path in [*sorted((mvtec_reduced / "hazelnut" / "test").rglob("*.png"))[:2],
                 sorted((mvtec_reduced / "transistor" / "test").rglob("*.png"))[0]]:
        with Image.open(path) as image:
            real.append(np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)))
    return [np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8), np.stack(real)]


def assert_equal_to_detector(run, detector, image_sets) -> None:
    for images in image_sets:
        maps, scores = run(images)
        reference_maps, reference_scores = detector.predict(images.astype(np.float32) / 255.0)
        assert maps.shape == (len(images), SIZE, SIZE) and scores.shape == (len(images),)
        assert maps.dtype == np.float32 and scores.dtype == np.float32
        assert relative_error(maps, reference_maps) <= TOLERANCE
        assert relative_error(scores, reference_scores) <= TOLERANCE


@pytest.mark.parametrize("which", ["random", pytest.param("converted", marks=pytest.mark.slow)])
def test_stablehlo_export_equals_the_detector(which, request, mvtec_reduced, tmp_path):
    # Only the parameter's detector is made (the converted one costs a torch conversion and a fit).
    folder = request.getfixturevalue("fitted") / "detector" if which == "random" else (
        request.getfixturevalue("converted_detector"))
    out = tmp_path / "detector.nxd"
    assert export([str(folder), "--format", "stablehlo", "--out", str(out)]) == 0
    detector, deployed = AnomalyDetector.load(folder), deploy.load(out)
    images = sample_images(mvtec_reduced)
    assert_equal_to_detector(deployed, detector, [*images, images[0][:1]])  # any batch size
    assert deployed.calibration == detector.calibration.to_dict()
    np.testing.assert_array_equal(deployed.decisions(deployed(images[1])[1]),
                                  detector.calibration.decisions(detector.predict(images[1] / 255.0)[1]))
    with pytest.raises(UserInputError, match=r"expected uint8 images of shape \(B, 64, 64, 3\)"):
        deployed(images[0].astype(np.float32))


def test_deploy_imports_only_jax(fitted, tmp_path):
    out = tmp_path / "detector.nxd"
    assert export([str(fitted / "detector"), "--out", str(out)]) == 0
    code = (f"import sys, numpy as np\nfrom nexvitad_jax import deploy\n"
            f"maps, scores = deploy.load({str(out)!r})(np.zeros((2, {SIZE}, {SIZE}, 3), np.uint8))\n"
            "assert maps.shape == (2, 64, 64) and scores.shape == (2,)\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'optax', 'orbax', 'ott', 'torch', "
            "'transformers', 'ml_collections') or (m.startswith('nexvitad_jax.') and m not in "
            "('nexvitad_jax.deploy', 'nexvitad_jax.errors')))\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_deploy_load_errors(tmp_path):
    with pytest.raises(UserInputError, match="no such exported detector"):
        deploy.load(tmp_path / "missing.nxd")
    (tmp_path / "bad.nxd").write_bytes(b"not an archive")
    with pytest.raises(UserInputError, match="not an exported nexvitad detector"):
        deploy.load(tmp_path / "bad.nxd")


@pytest.mark.slow  # jax2onnx traces the whole model before it meets the resize: ~20 s
def test_onnx_names_what_it_cannot_convert(fitted, tmp_path):
    """The backbone extractor resizes with antialias=True, which jax2onnx 0.17 does not convert."""
    pytest.importorskip("jax2onnx")
    with pytest.raises(UserInputError, match="jax2onnx cannot convert this detector: .*antialias"):
        export([str(fitted / "detector"), "--format", "onnx", "--out", str(tmp_path / "d.onnx")])


@pytest.fixture(scope="module")
def encoder_detector(tmp_path_factory):
    """A detector over the NexViTAD encoder of the tiny config (untrained adapters), saved and loaded
    back: the trained-encoder path of `nexvitad fit --run` without the training."""
    from nexvitad_jax.config import load_config
    from nexvitad_jax.inference.fitted import PortableEncoderExtractor
    from nexvitad_jax.inference.calibration import quantile_calibration
    from nexvitad_jax.models.build import build_model

    config = load_config("tiny")
    extractor = PortableEncoderExtractor(build_model(config, 1, 1), layers=(2, 3), identity={"run": "test"})
    detector = AnomalyDetector(extractor, k=3, batch_size=2, image_size=SIZE)
    normal = np.random.default_rng(1).random((3, SIZE, SIZE, 3), dtype=np.float32)
    detector.fit(normal)
    detector.calibration = quantile_calibration(*detector.predict(normal))
    folder = detector.save(tmp_path_factory.mktemp("encoder") / "detector")
    return folder, detector


@pytest.mark.slow  # the encoder's compilations, two exports and onnxruntime: ~90 s on 2 cores
def test_encoder_detector_round_trip_and_exports(encoder_detector, mvtec_reduced, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    folder, original = encoder_detector
    loaded = AnomalyDetector.load(folder)
    images = sample_images(mvtec_reduced)
    assert loaded.extractor.describe() == original.extractor.describe()
    assert_equal_to_detector(lambda x: loaded.predict(x.astype(np.float32) / 255.0), original, images)
    assert export([str(folder), "--out", str(tmp_path / "d.nxd")]) == 0
    assert_equal_to_detector(deploy.load(tmp_path / "d.nxd"), original, images)
    assert export([str(folder), "--format", "onnx", "--batch-size", "3", "--out", str(tmp_path / "d.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "d.onnx"))
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["maps", "scores"]
    assert_equal_to_detector(lambda x: session.run(None, {"images": x}), original, images)
