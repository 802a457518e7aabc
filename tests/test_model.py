"""NexViTAD model: eq. 1-3 against direct references (torch's bilinear resize, numpy adapter and
interleave), stacked heads against running each head alone, with the real tiny Hiera/DINOv2 ports."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch
from flax import nnx
from scipy.special import erf

from nexvitad_jax.configs import tiny
from nexvitad_jax.models import normalize_images
from nexvitad_jax.models.build import build_model
from nexvitad_jax.models.decoder import SegmentationHead
from nexvitad_jax.models.encoder import Adapter, interleave_features, resize_bilinear
from nexvitad_jax.models.nexvitad import FROZEN, TRAINABLE, NexViTAD


def tiny_model(num_source=2, num_target=2, shared=False) -> NexViTAD:
    config = tiny.get_config()
    config.model.shared_source_head = shared
    return build_model(config, num_source, num_target)  # the tiny Hiera/DINOv2, one compiled init


@pytest.fixture(scope="module")
def model() -> NexViTAD:
    return tiny_model()


@pytest.mark.parametrize("size", [56, 28, 14, 7, 16])
def test_resize_matches_torch_bilinear(size):
    grid = np.random.default_rng(0).normal(size=(2, 16, 16, 5)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(0, 3, 1, 2), size=(size, size),
                                               mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(resize_bilinear(jnp.asarray(grid), (size, size))), expected,
                               rtol=1e-5, atol=1e-5)


def test_interleave_alternates_channels():
    rng = np.random.default_rng(1)
    h, d = rng.normal(size=(2, 3, 3, 4)), rng.normal(size=(2, 3, 3, 4))
    out = np.asarray(interleave_features(jnp.asarray(h), jnp.asarray(d)))
    expected = np.empty((2, 3, 3, 8))
    expected[..., 0::2], expected[..., 1::2] = h, d  # eq. 3: h_0, d_0, h_1, d_1, ...
    np.testing.assert_array_equal(out, expected.astype(np.float32))


def numpy_adapter(adapter: Adapter, x: np.ndarray) -> np.ndarray:
    """Eq. 1 in numpy: GELU(x W_down + b_down) W_up + b_up + x, exact GELU."""
    hidden = x @ np.asarray(adapter.down.kernel) + np.asarray(adapter.down.bias)
    gelu = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))
    return gelu @ np.asarray(adapter.up.kernel) + np.asarray(adapter.up.bias) + x


def test_adapter_is_eq1_with_exact_gelu():
    adapter = Adapter(8, rngs=nnx.Rngs(3))
    assert adapter.down.kernel.shape == (8, 2)  # r = d / 4
    x = np.random.default_rng(2).normal(size=(2, 4, 4, 8)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(adapter(jnp.asarray(x))), numpy_adapter(adapter, x), rtol=1e-5, atol=1e-5)


def test_encoder_composes_real_backbones(model):
    images = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 64, 64, 3)), jnp.float32)

    @nnx.jit  # one compilation for everything the test reads
    def run(model, images):
        normalized = normalize_images(images)
        return (model.encode(images), model.encoder.hiera(normalized), model.encoder.dinov2(normalized)[0],
                model.encode(images, kind="dino-projected"))

    features, stages, dino, dino_only = run(model, images)
    assert [f.shape for f in features] == [(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64), (2, 2, 2, 128)]
    for n, (feature, stage) in enumerate(zip(features, stages)):
        adapter, projection = model.encoder.adapters[n], model.encoder.projections[n]
        resized = torch.nn.functional.interpolate(torch.from_numpy(np.array(dino)).permute(0, 3, 1, 2),
                                                  size=stage.shape[1:3], mode="bilinear",
                                                  align_corners=False).permute(0, 2, 3, 1).numpy()
        projected = resized @ np.asarray(projection.kernel) + np.asarray(projection.bias)  # eq. 2
        adapted = numpy_adapter(adapter, np.asarray(stage))  # eq. 1
        np.testing.assert_allclose(np.asarray(feature)[..., 0::2], adapted, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(feature)[..., 1::2], projected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dino_only[1]), np.asarray(features[1])[..., 1::2], rtol=1e-6)


def test_stacked_heads_equal_each_head_alone(model):
    """The vmapped stack gives what each head computes on its own inputs, BatchNorm statistics included."""
    rng = np.random.default_rng(4)
    dims = (16, 32, 64, 128)
    features = tuple(jnp.asarray(rng.normal(size=(2, 3, 16 // 2 ** i, 16 // 2 ** i, d)), jnp.float32)
                     for i, d in enumerate(dims))
    graphdef, state = nnx.split(model.source_heads.heads)
    state = jax.tree.map(jnp.array, state)  # a copy: the call below updates the model's variables
    # Jitted (nnx.jit writes the BatchNorm updates back to the modules): one compilation each.
    logits = nnx.jit(lambda m, f: m.source_logits(f, (64, 64), train=True))(model, features)
    new_stats = nnx.state(model.source_heads.heads, nnx.BatchStat)
    run_head = nnx.jit(lambda head, f: head(f, (64, 64), True))
    for head_index in range(2):
        head = nnx.merge(graphdef, jax.tree.map(lambda x: x[head_index], state))
        alone = run_head(head, tuple(f[head_index] for f in features))
        np.testing.assert_allclose(np.asarray(logits[head_index]), np.asarray(alone), rtol=1e-5, atol=1e-5)
        for got, want in zip(jax.tree.leaves(jax.tree.map(lambda x: x[head_index], new_stats)),
                             jax.tree.leaves(nnx.state(head, nnx.BatchStat))):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    nnx.update(model.source_heads.heads, state)  # leave the shared fixture as it was


def test_heads_shapes_partition_and_decoder_inference(model):
    from nexvitad_jax.inference.decoder_baseline import decoder_maps

    images = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 64, 64, 3)), jnp.float32)
    maps, scores = nnx.jit(lambda m, x: decoder_maps(m, x, head=1))(model, images)
    assert maps.shape == (2, 64, 64) and bool(jnp.all((maps >= 0) & (maps <= 1)))
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(maps).max(axis=(1, 2)))
    trainable = nnx.state(model, TRAINABLE)
    frozen = nnx.state(model, FROZEN)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert not any("hiera" in p.split("/") or "dinov2" in p.split("/") for p in paths)
    assert any(p.startswith("encoder/adapters") for p in paths) and any(p.startswith("pseudo_label_heads") for p in paths)
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    n_backbones = sum(x.size for x in jax.tree.leaves(nnx.state(model.encoder.hiera, nnx.Param))) + \
        sum(x.size for x in jax.tree.leaves(nnx.state(model.encoder.dinov2, nnx.Param)))
    assert n_frozen == n_backbones
    # The pseudo-label head reads F_3 (2 d_3 channels) and the U-Net ends in 2 logits.
    assert model.pseudo_label_heads.heads.convs[0].kernel.shape == (2, 1, 1, 64, 8)  # 2 * d_3


def test_shared_source_head_variant():
    shared = nnx.eval_shape(lambda: tiny_model(num_source=3, num_target=1, shared=True))  # shapes only
    assert shared.source_heads.count == 1
    features = tuple(jnp.ones((3, 2, 16 // 2 ** i, 16 // 2 ** i, d)) for i, d in enumerate((16, 32, 64, 128)))
    logits = nnx.eval_shape(lambda m, f: m.source_logits(f, (64, 64), train=False), shared, features)
    assert logits.shape == (3, 2, 64, 64, 2)


def test_segmentation_head_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="decoder widths"):
        SegmentationHead((8, 16, 32, 64), (8, 8), rngs=nnx.Rngs(0))
