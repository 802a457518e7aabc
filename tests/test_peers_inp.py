"""INP-Former: the DINOv2 hidden states against transformers, the INP-guided decoder layer and the
losses (eqs. 2, 3, 5) against NumPy, the soft mining gradient against the plain gradient scaled
by its weights, and few-shot training (loss goes down, resuming equals training straight through)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.peers import DinoPatchEncoder
from nexvitad_jax.peers import inp_former as inp
from nexvitad_jax.peers import residual as res
from nexvitad_jax.peers.inp_training import INPFormerDetector

SMALL_DINO = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56}


def numpy_cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_hidden_states_match_transformers():
    torch = pytest.importorskip("torch")
    from tests.test_dinov2 import TINY_CONFIGS, converted_pair

    config, torch_model, flax_model = converted_pair(TINY_CONFIGS["registers-swiglu"])
    images = np.random.default_rng(0).standard_normal((2, 112, 98, 3)).astype(np.float32)
    with torch.no_grad():
        outputs = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True)
    expected = np.stack([h[:, 1 + config.num_register_tokens:].numpy() for h in outputs.hidden_states[1:]])
    grid, cls, hidden = flax_model(jnp.asarray(images), hidden_states=True)
    np.testing.assert_allclose(np.asarray(hidden).reshape(expected.shape), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())
    default_grid, _ = flax_model(jnp.asarray(images))
    np.testing.assert_array_equal(np.asarray(grid), np.asarray(default_grid))


def test_encoder_layer_groups():
    assert inp.encoder_layer_groups(12) == ((2, 3, 4, 5), (6, 7, 8, 9))  # ViT-B: layers 3-10 (one-based)
    assert inp.encoder_layer_groups(24) == ((14, 15, 16, 17), (18, 19, 20, 21))
    assert inp.encoder_layer_groups(4) == ((0,), (1,))
    assert inp.encoder_layer_groups(1) == ((0,),)


def test_decoder_layer_equals_numpy():
    layer = inp.DecoderLayer(8, 2, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    prototypes = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    got = np.asarray(nnx.jit(lambda m, a, b: m(a, b))(layer, jnp.asarray(x), jnp.asarray(prototypes)))

    def linear(module, t):
        return t @ np.asarray(module.kernel.value, np.float64) + np.asarray(module.bias.value, np.float64)

    def norm(module, t):
        mean, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
        return (t - mean) / np.sqrt(var + 1e-6) * np.asarray(module.scale.value) + np.asarray(module.bias.value)

    attention = layer.attention
    q = linear(attention.q, norm(layer.norm, x)).reshape(2, 5, 2, 4)
    k, v = (linear(m, prototypes).reshape(2, 3, 2, 4) for m in (attention.k, attention.v))
    weights = np.maximum(np.einsum("bthd,bshd->bhts", q, k) / 2.0, 0.0)  # ReLU(Q K^T / sqrt(4)), no softmax
    attended = linear(attention.proj, np.einsum("bhts,bshd->bthd", weights, v).reshape(2, 5, 8))  # no residual
    hidden = linear(layer.ffn.fc1, norm(layer.norm_ffn, attended))
    from scipy.special import erf
    hidden = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))
    expected = attended + linear(layer.ffn.fc2, hidden)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_coherence_losses_equal_numpy():
    rng = np.random.default_rng(2)
    features, prototypes = rng.standard_normal((2, 7, 6)), rng.standard_normal((2, 3, 6))
    similarity = numpy_cos(features[:, :, None], prototypes[:, None])
    hard = np.mean(np.min(1 - similarity, axis=-1))  # eq. 2
    weights = np.exp(similarity) / np.exp(similarity).sum(-1, keepdims=True)
    rebuilt = np.einsum("bnm,bmc->bnc", weights, prototypes)
    soft = np.mean(1 - numpy_cos(features.reshape(2, -1), rebuilt.reshape(2, -1)))  # eq. 3
    f, p = jnp.asarray(features, jnp.float32), jnp.asarray(prototypes, jnp.float32)
    assert float(inp.coherence_loss(f, p, "hard")) == pytest.approx(hard, rel=1e-5)
    assert float(inp.coherence_loss(f, p, "soft")) == pytest.approx(soft, rel=1e-5)


def test_soft_mining_loss_value_and_scaled_gradient():
    rng = np.random.default_rng(3)
    targets, outputs = rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((2, 2, 5, 4))
    gamma = 3.0
    loss_cos = np.mean(1 - numpy_cos(targets.reshape(2, 2, -1), outputs.reshape(2, 2, -1)))
    loss_mse = np.mean(((targets - outputs) ** 2).sum(-1))
    t, o = jnp.asarray(targets, jnp.float32), jnp.asarray(outputs, jnp.float32)
    assert float(jax.jit(inp.soft_mining_loss, static_argnums=2)(t, o, gamma)) == pytest.approx(loss_cos + loss_mse, rel=1e-5)
    # The gradient: each term's plain gradient, scaled per patch by (M / mean M)^gamma (eq. 5).
    regional_cos, regional_mse = 1 - numpy_cos(targets, outputs), ((targets - outputs) ** 2).sum(-1)
    w_cos = (regional_cos / regional_cos.mean(axis=(1, 2), keepdims=True)) ** gamma
    w_mse = (regional_mse / regional_mse.mean(axis=(1, 2), keepdims=True)) ** gamma
    plain_cos = jax.jit(jax.grad(lambda x: jnp.mean(1 - inp.cosine(t.reshape(2, 2, -1), x.reshape(2, 2, -1)))))(o)
    plain_mse = jax.jit(jax.grad(lambda x: jnp.mean(jnp.sum((t - x) ** 2, axis=-1))))(o)
    expected = np.asarray(plain_cos) * w_cos[..., None] + np.asarray(plain_mse) * w_mse[..., None]
    got = jax.jit(jax.grad(lambda x: inp.soft_mining_loss(t, x, gamma)))(o)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def encoder():
    return DinoPatchEncoder.random(SMALL_DINO, resolution=28)


def _images(count, seed):
    return np.random.default_rng(seed).random((count, 28, 28, 3)).astype(np.float32)


OPTIONS = inp.INPFormerOptions(prototypes=2, decoder_layers=2, batch_size=2, checkpoint_every=2, steps=4,
                               learning_rate=1e-3)


def test_training_resumes_exactly_and_scores(encoder, tmp_path):
    normal = _images(2, 0)
    straight = INPFormerDetector(encoder, OPTIONS).fit(normal)
    INPFormerDetector(encoder, dataclasses.replace(OPTIONS, steps=2)).fit(normal, tmp_path)
    resumed = INPFormerDetector(encoder, OPTIONS).fit(normal, tmp_path)  # restores step 2, trains 2 more
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(straight.model, nnx.Param)),
                    jax.tree.leaves(nnx.state(resumed.model, nnx.Param))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    maps, scores = resumed.predict(_images(3, 1))
    assert maps.shape == (3, 28, 28) and scores.shape == (3,) and np.all(np.isfinite(maps))
    top = np.sort(maps.reshape(3, -1), axis=1)[:, -max(1, int(0.01 * 28 * 28)):]
    np.testing.assert_allclose(scores, top.mean(axis=1), rtol=1e-5)  # the mean of the map's top 1%


def test_bad_options_are_user_errors(encoder):
    with pytest.raises(UserInputError, match="coherence"):
        INPFormerDetector(encoder, inp.INPFormerOptions(coherence="medium"))
    with pytest.raises(UserInputError, match="do not split"):
        INPFormerDetector(encoder, inp.INPFormerOptions(decoder_layers=3))


# INP-Former++ (nexvitad_jax.peers.residual): eqs. 7-9 and the pseudo anomalies against NumPy, and
# the method's training (both losses go down, resuming equals training straight through).


def test_residual_and_l2_map_equal_numpy():
    rng = np.random.default_rng(4)
    targets, outputs = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 3, 5, 4))
    distance = 1 - numpy_cos(targets, outputs)  # (G, B, N)
    expected_residual = np.mean(distance[..., None] * np.abs(targets - outputs), axis=0)  # eq. 7
    expected_map = np.mean(0.5 * (distance + np.sqrt(((targets - outputs) ** 2).sum(-1))), axis=0)  # eq. 9's A_rec
    t, o = jnp.asarray(targets, jnp.float32), jnp.asarray(outputs, jnp.float32)
    np.testing.assert_allclose(np.asarray(res.feature_residual(t, o)), expected_residual, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(res.reconstruction_map_l2(t, o)), expected_map, rtol=1e-5, atol=1e-6)


def test_dice_loss_equals_numpy():
    rng = np.random.default_rng(5)
    predicted, masks = rng.random((3, 6, 7)), (rng.random((3, 6, 7)) > 0.7).astype(np.float64)
    expected = np.mean([1 - 2 * (p * m).sum() / ((p**2).sum() + (m**2).sum()) for p, m in zip(predicted, masks)])
    got = res.dice_loss(jnp.asarray(predicted, jnp.float32), jnp.asarray(masks, jnp.float32))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(res.dice_loss(jnp.asarray(masks, jnp.float32), jnp.asarray(masks, jnp.float32))) == pytest.approx(0, abs=1e-6)


def test_perlin_noise_equals_numpy():
    key, size, cells = jax.random.key(6), 12, 4
    most = max(res.PERLIN_CELLS) + 1  # the lattice's gradients: the top-left corner of one fixed draw
    angles = np.asarray(jax.random.uniform(key, (most, most), maxval=2 * np.pi), np.float64)[:cells + 1, :cells + 1]
    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3  # noqa: E731
    expected = np.zeros((size, size))
    for i in range(size):  # Perlin's sum over the 4 lattice corners, pixel by pixel
        for j in range(size):
            x, y = (j + 0.5) * cells / size, (i + 0.5) * cells / size
            for cy in (int(y), int(y) + 1):
                for cx in (int(x), int(x) + 1):
                    weight = (1 - abs(fade(x - int(x)) - (cx - int(x)))) * (1 - abs(fade(y - int(y)) - (cy - int(y))))
                    dot = np.cos(angles[cy, cx]) * (x - cx) + np.sin(angles[cy, cx]) * (y - cy)
                    expected[i, j] += weight * dot
    got = jax.jit(res.perlin_noise, static_argnums=1)(key, size, cells)  # the lattice traced, as in training
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


def test_pseudo_anomalies_blend_a_foreign_texture():
    images = np.random.default_rng(7).random((3, 16, 16, 3)).astype(np.float32)
    synthesized = jax.jit(res.pseudo_anomalies)(jax.random.key(8), jnp.asarray(images))
    anomalous, masks = (np.asarray(a, np.float64) for a in synthesized)
    assert set(np.unique(masks)) <= {0.0, 1.0} and np.all(masks.sum(axis=(1, 2)) > 0)  # every image has an anomaly
    texture = np.rot90(np.roll(images, 1, axis=0), k=1, axes=(1, 2))[..., ::-1].astype(np.float64)
    inside = masks[..., None] > 0
    np.testing.assert_allclose(np.where(inside, 0, anomalous), np.where(inside, 0, images), atol=1e-6)
    for b in range(3):  # inside: (1 - beta) T + beta I with one beta per image in [0, 0.8)
        pick = masks[b] > 0
        beta = np.sum((anomalous[b][pick] - texture[b][pick]) * (images[b][pick] - texture[b][pick])) / np.sum(
            (images[b][pick] - texture[b][pick]) ** 2)
        assert 0 <= beta < 0.8 + 1e-6
        np.testing.assert_allclose(anomalous[b][pick], (1 - beta) * texture[b][pick] + beta * images[b][pick], atol=1e-5)


PLUS = dataclasses.replace(OPTIONS, coherence="soft", residual_head=True, map_l2=True, steps=6, checkpoint_every=3,
                           learning_rate=1e-2)


def test_plus_trains_resumes_exactly_and_scores(encoder, tmp_path):
    from nexvitad_jax.data.synthetic import SyntheticDataset

    normal = SyntheticDataset(image_size=28, n_train=2, n_test=2, n_good_test=1).load("bottle", "train").images
    normal = normal.astype(np.float32) / 255.0
    straight = INPFormerDetector(encoder, PLUS).fit(normal)
    # Both losses go down: the reconstruction's, and the head's Dice loss (on fresh pseudo anomalies each step).
    assert straight.losses[-1] < 0.5 * straight.losses[0]
    assert np.mean(straight.segmentation_losses[3:]) < straight.segmentation_losses[0]
    INPFormerDetector(encoder, dataclasses.replace(PLUS, steps=3)).fit(normal, tmp_path)
    resumed = INPFormerDetector(encoder, PLUS).fit(normal, tmp_path)  # restores step 3, trains 3 more
    assert len(resumed.segmentation_losses) == PLUS.steps
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    assert resumed.segmentation_losses == pytest.approx(straight.segmentation_losses, rel=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state((straight.model, straight.head), nnx.Param)),
                    jax.tree.leaves(nnx.state((resumed.model, resumed.head), nnx.Param))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    maps, scores = resumed.predict(_images(3, 1))
    assert maps.shape == (3, 28, 28) and np.all(np.isfinite(maps))
    top = np.sort(maps.reshape(3, -1), axis=1)[:, -max(1, int(0.01 * 28 * 28)):]
    np.testing.assert_allclose(scores, top.mean(axis=1), rtol=1e-5)
