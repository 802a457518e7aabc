"""Anomaly maps (eqs. 13-14) vs scipy/torch references, the memory bank, and AnomalyDetector."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import torch
from scipy.spatial.distance import cdist

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference import AnomalyDetector
from nexvitad_jax.inference.anomaly_maps import (anomaly_maps, gaussian_blur, nearest_prototype_distance,
                                                 upsample_bilinear)
from nexvitad_jax.inference import BackboneFeatureExtractor, sinkhorn_kmeans
from nexvitad_jax.inference.batching import global_batch_size, map_batches, padded_batches
from nexvitad_jax.inference.memory_bank import build_memory_bank, fit_memory_banks
from nexvitad_jax.sharding import make_mesh


def scipy_blur(maps: np.ndarray) -> np.ndarray:
    return np.stack([scipy.ndimage.gaussian_filter(m.astype(np.float64), sigma=2, truncate=4, mode="reflect")
                     for m in maps])


def torch_upsample(maps: np.ndarray, size) -> np.ndarray:
    tensor = torch.from_numpy(maps.astype(np.float64))[:, None]
    return torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


@pytest.mark.parametrize("shape", [(2, 64, 48), (1, 224, 224), (3, 5, 7)])
def test_gaussian_blur_equals_scipy(shape):
    maps = np.random.default_rng(0).gamma(2.0, size=shape).astype(np.float32)
    blurred = np.asarray(jax.jit(gaussian_blur)(jnp.asarray(maps)))
    np.testing.assert_allclose(blurred, scipy_blur(maps), atol=1e-5)


def test_upsample_equals_torch_half_pixel_bilinear():
    maps = np.random.default_rng(1).normal(size=(2, 7, 5)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(upsample_bilinear(jnp.asarray(maps), (56, 40))),
                               torch_upsample(maps, (56, 40)), atol=1e-5)


def test_nearest_prototype_distance_equals_cdist():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(2, 3, 4, 16)).astype(np.float32) * 10
    prototypes = rng.normal(size=(5, 16)).astype(np.float32) * 10
    expected = cdist(features.reshape(-1, 16), prototypes).min(1).reshape(2, 3, 4)
    np.testing.assert_allclose(np.asarray(nearest_prototype_distance(jnp.asarray(features), jnp.asarray(prototypes))),
                               expected, rtol=1e-4)


def test_anomaly_maps_equal_reference_pipeline():
    rng = np.random.default_rng(3)
    features = [rng.normal(size=(2, 8, 8, 6)).astype(np.float32), rng.normal(size=(2, 4, 4, 10)).astype(np.float32)]
    prototypes = [rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=(4, 10)).astype(np.float32)]
    maps, scores = anomaly_maps([jnp.asarray(f) for f in features], [jnp.asarray(p) for p in prototypes],
                                image_size=(32, 32))
    layer_maps = [torch_upsample(cdist(f.reshape(-1, f.shape[-1]), p).min(1).reshape(f.shape[:3]), (32, 32))
                  for f, p in zip(features, prototypes)]
    expected = scipy_blur(np.mean(layer_maps, axis=0))
    np.testing.assert_allclose(np.asarray(maps), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(scores), expected.max(axis=(1, 2)), atol=1e-5)


def test_padded_batches_and_map_batches_cover_every_row_once():
    """On this process's one device (tests/test_scoring_sharded.py spreads them over several)."""
    mesh = make_mesh(jax.devices()[:1])
    rows = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    batches = list(padded_batches({"a": rows, "b": rows[:, 0]}, 3, mesh))
    assert [count for count, _ in batches] == [3, 3, 1]
    assert all(batch["a"].shape == (3, 3) for _, batch in batches)  # one static shape
    np.testing.assert_array_equal(batches[-1][1]["a"], rows[[6, 6, 6]])  # padded with the last row
    double = jax.jit(lambda batch: (2 * batch["a"], batch["b"] + 1))
    doubled, total = map_batches(double, {"a": rows, "b": rows[:, 0]}, 3, mesh)
    assert isinstance(doubled, np.ndarray)
    np.testing.assert_array_equal(doubled, 2 * rows)
    np.testing.assert_array_equal(total, rows[:, 0] + 1)
    on_devices = map_batches(double, {"a": rows, "b": rows[:, 0]}, 3, mesh, to_host=False)
    assert isinstance(on_devices[0], jax.Array)
    np.testing.assert_array_equal(np.asarray(on_devices[0]), 2 * rows)


def test_global_batches_round_up_to_the_device_count():
    class Mesh:  # the only property the rounding reads
        def __init__(self, size):
            self.size = size

    assert [global_batch_size(8, Mesh(n)) for n in (1, 3, 8, 16)] == [8, 9, 8, 16]
    with pytest.raises(UserInputError, match="batch_size = 0"):
        global_batch_size(0, Mesh(1))


def test_batches_run_under_the_transfer_guard():
    """A host array copied to the devices on every batch (here a numpy constant handed to a jitted
    function) is an error inside the batch loop, not a silent copy per batch."""
    mesh = make_mesh(jax.devices()[:1])
    scale = np.full((3,), 2.0, np.float32)
    add = jax.jit(lambda batch, scale: batch * scale)
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
        map_batches(lambda batch: add(batch, scale), np.ones((4, 3), np.float32), 2, mesh)
    placed = jax.device_put(scale)
    np.testing.assert_array_equal(map_batches(lambda batch: add(batch, placed), np.ones((4, 3), np.float32), 2, mesh),
                                  np.full((4, 3), 2.0))


def test_memory_banks_of_several_k_equal_each_k_alone():
    """fit_memory_banks: one sweep per layer; the bank of each K equals sinkhorn_kmeans of that K on
    the layer's patches with fold_in(rng, layer), and K above a layer's patch count is capped there."""
    rng = np.random.default_rng(4)
    features = [jnp.asarray(rng.normal(size=(2, 6, 6, 5)), jnp.float32),
                jnp.asarray(rng.normal(size=(2, 2, 2, 7)), jnp.float32)]
    key = jax.random.key(3)
    banks = fit_memory_banks(features, [3, 9], rng=key, cap_to_bank=True, max_iters=20)
    for k in (3, 9):
        for layer, layer_features in enumerate(features):
            patches = layer_features.reshape(-1, layer_features.shape[-1])
            alone, _ = sinkhorn_kmeans(patches, min(k, patches.shape[0]), rng=jax.random.fold_in(key, layer),
                                       max_iters=20)
            np.testing.assert_allclose(np.asarray(banks[k].prototypes[layer]), np.asarray(alone), rtol=1e-5,
                                       atol=1e-5)
    assert banks[9].prototypes[1].shape == (8, 7)  # capped: 2 images x 2x2 patches
    single = build_memory_bank(features[:1], 3, rng=key, max_iters=20)
    np.testing.assert_array_equal(np.asarray(single.prototypes[0]), np.asarray(banks[3].prototypes[0]))


def test_memory_bank_needs_k_patches():
    features = [jnp.zeros((2, 2, 2, 4))]
    with pytest.raises(UserInputError, match=r"2 normal images x 2x2 patches = 8 patches, fewer than K = 9"):
        build_memory_bank(features, 9, rng=jax.random.key(0))


class PatchColorExtractor:
    """A transparent feature extractor for detector tests: mean color of 8x8 and 16x16 patches."""

    def __call__(self, images):
        b, h, w, _ = images.shape
        fine = images.reshape(b, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4))
        coarse = images.reshape(b, h // 16, 16, w // 16, 16, 3).mean(axis=(2, 4))
        return [fine, coarse]

    def describe(self):
        return {"kind": "patch-color", "patches": [8, 16]}


def textured_images(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array([0.3, 0.5, 0.4], np.float32)
    return np.clip(base + 0.03 * rng.normal(size=(count, 64, 64, 3)), 0, 1).astype(np.float32)


def test_detector_finds_a_pasted_defect_and_round_trips(tmp_path):
    detector = AnomalyDetector(PatchColorExtractor(), k=4, batch_size=3).fit(textured_images(5, 0))
    test = textured_images(4, 1)
    test[2, 16:32, 32:48] = [0.9, 0.1, 0.1]  # a red square
    maps, scores = detector.predict(test)
    assert maps.shape == (4, 64, 64) and scores.shape == (4,)
    assert np.argmax(scores) == 2 and scores[2] > 3 * np.delete(scores, 2).max()
    peak = np.unravel_index(np.argmax(maps[2]), maps[2].shape)
    assert 16 <= peak[0] < 32 and 32 <= peak[1] < 48

    detector.save(tmp_path / "detector")
    loaded = AnomalyDetector.load(tmp_path / "detector", PatchColorExtractor())
    with jax.transfer_guard("disallow"):  # scoring copies nothing but the images in and the maps out
        loaded_maps, loaded_scores = loaded.predict(test)
    np.testing.assert_allclose(loaded_maps, maps, rtol=1e-6)

    class OtherExtractor(PatchColorExtractor):
        def describe(self):
            return {"kind": "patch-color", "patches": [8, 32]}

    with pytest.raises(UserInputError, match=r"does not match[\s\S]*patches: saved \[8, 16\], now \[8, 32\]"):
        AnomalyDetector.load(tmp_path / "detector", OtherExtractor())
    with pytest.raises(UserInputError, match="cannot rebuild a feature extractor of kind 'patch-color'"):
        AnomalyDetector.load(tmp_path / "detector")
    with pytest.raises(UserInputError, match="is not a saved AnomalyDetector"):
        AnomalyDetector.load(tmp_path / "nothing", PatchColorExtractor())


def test_detector_input_errors():
    detector = AnomalyDetector(PatchColorExtractor(), k=4)
    with pytest.raises(UserInputError, match="no memory bank"):
        detector.predict(textured_images(1, 0))
    with pytest.raises(UserInputError, match=r"expected a non-empty \(B, H, W, 3\)"):
        detector.fit(np.zeros((2, 64, 64), np.float32))
    with pytest.raises(UserInputError, match="expected float images"):
        detector.fit(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(UserInputError, match="fewer than K = 200"):
        AnomalyDetector(PatchColorExtractor(), k=200).fit(textured_images(2, 0))


def test_random_backbone_extractor_describes_and_detects_mismatch(tmp_path):
    extractor = BackboneFeatureExtractor.random(seed=0, layers=(2, 3), image_size=64)
    features = extractor(jnp.asarray(textured_images(2, 0)))
    assert [f.shape for f in features] == [(2, 4, 4, 64), (2, 2, 2, 128)]
    detector = AnomalyDetector(extractor, k=3, batch_size=2, kmeans_options={"max_iters": 10}).fit(textured_images(2, 0))
    detector.save(tmp_path / "det")
    rebuilt = AnomalyDetector.load(tmp_path / "det")  # the extractor rebuilt from detector.json
    with jax.transfer_guard("disallow"):  # the weights were replicated once, not copied per batch
        rebuilt_maps = rebuilt.predict(textured_images(1, 5))[0]
    np.testing.assert_allclose(rebuilt_maps, detector.predict(textured_images(1, 5))[0], rtol=1e-5)
    other = BackboneFeatureExtractor.random(seed=1, layers=(2, 3), image_size=64)
    with pytest.raises(UserInputError, match=r"hiera.weights: saved '[0-9a-f]+', now '[0-9a-f]+'"):
        AnomalyDetector.load(tmp_path / "det", other)


def test_describe_differences_lists_nested_fields_and_ignores_locations():
    from nexvitad_jax.identity import describe_differences

    saved = {"hiera": {"weights": "aa", "directory": "/old"}, "layers": [0, 1]}
    assert describe_differences(saved, {"hiera": {"weights": "aa", "directory": "/new"}, "layers": [0, 1]}) == []
    assert describe_differences(saved, {"hiera": {"weights": "bb"}, "layers": [0, 1], "extra": 1}) == [
        "extra: not in the saved detector, now 1", "hiera.weights: saved 'aa', now 'bb'"]


def test_extractor_from_converted_backbone_dir_equals_in_memory_weights(tmp_path):
    from flax import nnx

    from nexvitad_jax.models import save_backbone

    random_extractor = BackboneFeatureExtractor.random(seed=3, layers=(1, 3), image_size=64)
    module_config = random_extractor.describe()["hiera"]["config"]
    from nexvitad_jax.models import build_backbone
    from nexvitad_jax.models.hiera import HieraConfig

    hiera = build_backbone("hiera", HieraConfig.from_dict(module_config), rngs=nnx.Rngs(3))
    save_backbone(tmp_path / "hiera", "hiera", hiera.config, nnx.state(hiera, nnx.Param).to_pure_dict(),
                  variant="test", source="random")
    loaded = BackboneFeatureExtractor.from_dirs(tmp_path / "hiera", layers=(1, 3), image_size=64)
    assert loaded.describe()["hiera"]["weights"] == random_extractor.describe()["hiera"]["weights"]
    images = jnp.asarray(textured_images(1, 0))
    for got, expected in zip(loaded(images), random_extractor(images)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
    with pytest.raises(UserInputError, match="a converted hiera backbone, expected dinov2"):
        BackboneFeatureExtractor.from_dirs(tmp_path / "hiera", tmp_path / "hiera")
