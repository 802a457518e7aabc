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


def test_masked_padding_changes_nothing_in_the_heads(model):
    """Each class's examples plus padding rows masked out (how a batch is spread over any device
    count, nexvitad_jax/train/step.py) give what the examples alone give: logits, BatchNorm
    statistics and parameter gradients."""
    rng = np.random.default_rng(6)
    features = tuple(jnp.asarray(rng.normal(size=(2, 3, 16 // 2 ** i, 16 // 2 ** i, d)), jnp.float32)
                     for i, d in enumerate((16, 32, 64, 128)))
    padded = tuple(jnp.concatenate([f, jnp.asarray(rng.normal(size=(2, 2, *f.shape[2:])), f.dtype)], axis=1)
                   for f in features)
    weights = jnp.asarray(rng.normal(size=(2, 3, 64, 64, 2)), jnp.float32)
    graphdef, params, stats = nnx.split(model.source_heads, nnx.Param, nnx.BatchStat)

    def loss(params, stats, inputs, mask):
        heads = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, stats))  # fresh variables at this trace
        logits = heads(inputs, (64, 64), True, mask=mask)[:, :3]
        return jnp.sum(logits * weights), (logits, nnx.state(heads, nnx.BatchStat))

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, (want_logits, want_stats)), want_grads = step(params, stats, features, None)
    (_, (logits, new_stats)), grads = step(params, stats, padded, jnp.arange(5)[None, :].repeat(2, 0) < 3)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves((new_stats, grads)), jax.tree.leaves((want_stats, want_grads)), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


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


# ---------------------------------------------------------------------------------------------
# model.upconv: the transposed convolution to the block's width ("width", a standard U-Net) or
# keeping the coarse channels ("keep").

def random_head(upconv: str, seed: int = 0) -> SegmentationHead:
    """A head with every variable drawn at random (BatchNorm's running variance > 0), none at its
    init's constants (the shapes from eval_shape: eager initialization is slow on CPU)."""
    head = nnx.eval_shape(lambda: SegmentationHead((16, 32, 64, 128), (16, 8, 8), upconv=upconv, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    nnx.update(head, jax.tree.map(lambda x: jnp.asarray(0.2 * rng.normal(size=x.shape), jnp.float32),
                                  nnx.state(head)))
    for norm in [block.norm for block in head.blocks] + [head.final_block.norm]:
        norm.var.value = jnp.asarray(0.5 + rng.uniform(size=norm.var.shape), jnp.float32)
    return head


def torch_unet_decoder(head: SegmentationHead, features, image_hw) -> np.ndarray:
    """The same decoder in torch (eval mode): ConvTranspose2d(2, stride 2), concat skip, conv 3x3,
    BatchNorm, ReLU per level; bilinear upsample, final block, 1x1 conv. Flax's transposed-conv
    kernel (kh, kw, in, out) is torch's (in, out, kh, kw) flipped in space."""
    functional = torch.nn.functional
    tensor = lambda a: torch.from_numpy(np.array(a))  # a writable, contiguous copy

    def block(module, x):
        x = functional.conv2d(x, tensor(np.asarray(module.conv.kernel).transpose(3, 2, 0, 1)), padding=1)
        norm = module.norm
        x = functional.batch_norm(x, tensor(norm.mean), tensor(norm.var), tensor(norm.scale), tensor(norm.bias),
                                  training=False, eps=1e-5)
        return functional.relu(x)

    with torch.no_grad():
        x = tensor(features[-1]).permute(0, 3, 1, 2)
        for up, conv_block, skip in zip(head.ups, head.blocks, reversed(features[:-1])):
            weight = tensor(np.asarray(up.kernel)[::-1, ::-1].transpose(2, 3, 0, 1))
            x = functional.conv_transpose2d(x, weight, tensor(up.bias), stride=2)
            x = block(conv_block, torch.cat([x, tensor(skip).permute(0, 3, 1, 2)], dim=1))
        x = functional.interpolate(x, size=image_hw, mode="bilinear", align_corners=False)
        x = block(head.final_block, x)
        weight = tensor(np.asarray(head.classifier.kernel).transpose(3, 2, 0, 1))
        return functional.conv2d(x, weight, tensor(head.classifier.bias)).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("upconv, up_widths", [("width", (16, 8, 8)), ("keep", (128, 16, 8))])
def test_segmentation_head_upconv_matches_torch_unet(upconv, up_widths):
    head = random_head(upconv)
    # "width": each transposed conv maps the coarse map to its block's width (the standard U-Net);
    # "keep": it keeps the coarse channels, so the first one is (2, 2, 128, 128).
    assert [up.kernel.shape for up in head.ups] == [(2, 2, c, w) for c, w in zip((128, 16, 8), up_widths)]
    assert [b.conv.kernel.shape for b in head.blocks] == [
        (3, 3, w + s, o) for w, s, o in zip(up_widths, (64, 32, 16), (16, 8, 8))]
    rng = np.random.default_rng(1)
    features = tuple(rng.normal(size=(2, 16 // 2 ** i, 16 // 2 ** i, d)).astype(np.float32)
                     for i, d in enumerate((16, 32, 64, 128)))
    logits = nnx.jit(lambda m, f: m(f, (40, 40), False))(head, tuple(map(jnp.asarray, features)))
    expected = torch_unet_decoder(head, features, (40, 40))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("upconv", ["width", "keep"])
def test_config_upconv_reaches_every_segmentation_head(upconv):
    from nexvitad_jax.configs import paper

    assert paper.get_config().model.upconv == "width"  # the default (docs/paper_map.md)
    config = tiny.get_config()
    config.model.upconv = upconv
    model = nnx.eval_shape(lambda: build_model(config, 2, 1))  # shapes only
    coarse, width = 128, config.model.decoder_channels[0]  # 2 d_4 of the tiny Hiera, the first block's width
    up_width = width if upconv == "width" else coarse
    for heads, count in ((model.source_heads, 2), (model.target_heads, 1)):
        assert heads.heads.ups[0].kernel.shape == (count, 2, 2, coarse, up_width)
        assert heads.heads.blocks[0].conv.kernel.shape == (count, 3, 3, up_width + 64, width)


def test_unknown_upconv_is_a_user_error():
    from nexvitad_jax.errors import UserInputError

    config = tiny.get_config()
    config.model.upconv = "double"
    with pytest.raises(UserInputError, match=r"model.upconv 'double': expected one of \['keep', 'width'\]"):
        build_model(config, 1, 1)
    with pytest.raises(UserInputError, match="expected one of"):
        SegmentationHead((8, 16, 32, 64), (8, 8, 8), upconv="", rngs=nnx.Rngs(0))


def test_config_head_batching_reaches_every_stack_and_is_checked():
    from nexvitad_jax.config import config_problems
    from nexvitad_jax.configs import paper
    from nexvitad_jax.errors import UserInputError

    assert paper.get_config().model.head_batching == "unrolled"  # the default (docs/paper_map.md)
    config = tiny.get_config()
    config.model.head_batching = "vmapped"
    model = nnx.eval_shape(lambda: build_model(config, 2, 1))
    assert {heads.batching for heads in (model.source_heads, model.target_heads, model.pseudo_label_heads)} == {
        "vmapped"}
    config.model.head_batching = "scan"
    assert any(problem.startswith("model.head_batching = 'scan': expected")
               for problem in config_problems(config))
    with pytest.raises(UserInputError, match=r"model.head_batching 'scan': expected one of \['unrolled', 'vmapped'\]"):
        build_model(config, 1, 1)
