"""PatchEAD(+) against direct NumPy implementations of the paper's eqs. 1-4, the DINOv2 class-token
attention against transformers, the alignment on motions it must recover, and the detector's
few-shot and batch zero-shot outputs against the NumPy scoring of the same tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.peers import DinoPatchEncoder, PatchEAD, PatchEADOptions, alignment, scoring

TINY_DINO = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 56}


# ------------------------------------------------------------------------------ NumPy references


def numpy_u(query: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """Eqs. 1-2 literally: D[j, i, k] = 1 - <q_j, p_ik> / (|q_j| |p_ik|); u[j, i] = min_k D[j, i, k].
    query (L, D), prompts (N, L', D) -> (L, N)."""
    q = query.astype(np.float64)
    u = np.zeros((len(q), len(prompts)))
    for i, prompt in enumerate(prompts.astype(np.float64)):
        d = 1 - (q @ prompt.T) / (np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(prompt, axis=1)[None, :])
        u[:, i] = d.min(axis=1)
    return u


def numpy_m(u: np.ndarray, k_prompts: int) -> np.ndarray:
    """Eq. 3: per patch, the mean of its k_prompts smallest u."""
    return np.sort(u, axis=1)[:, :k_prompts].mean(axis=1)


def numpy_s(m: np.ndarray, rho: float) -> float:
    """Eq. 4: the mean of the max(1, int(rho L)) largest patch scores."""
    k = max(1, int(rho * len(m)))
    return float(np.sort(m)[::-1][:k].mean())


def numpy_zero_shot(tokens: np.ndarray, fraction: float = 0.3) -> np.ndarray:
    """Batch zero-shot m (B, L): each image against the others, K_P = max(1, int(fraction (B - 1)))."""
    count = len(tokens)
    k_prompts = max(1, int(fraction * (count - 1)))
    return np.stack([numpy_m(numpy_u(tokens[b], np.delete(tokens, b, axis=0)), k_prompts) for b in range(count)])


def random_tokens(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------ eqs. 1-4


def test_few_shot_scores_equal_numpy_eqs_1_to_4():
    queries, prompts = random_tokens((5, 12, 8), 0), random_tokens((3, 10, 8), 1)
    m = np.asarray(scoring.few_shot_patch_scores(jnp.asarray(queries), jnp.asarray(prompts)))
    expected = np.stack([numpy_m(numpy_u(q, prompts), 1) for q in queries])
    np.testing.assert_allclose(m, expected, atol=1e-5)
    chunked = scoring.few_shot_patch_scores(jnp.asarray(queries), jnp.asarray(prompts), query_chunk=2)
    np.testing.assert_allclose(np.asarray(chunked), expected, atol=1e-5)
    for rho in (0.0, 0.25, 0.5):
        s = np.asarray(scoring.top_patch_mean(jnp.asarray(m), rho))
        np.testing.assert_allclose(s, [numpy_s(row, rho) for row in expected], atol=1e-6)


def test_eq_3_takes_the_nearest_images_not_the_farthest():
    # Two prompts: one identical to the query, one unrelated. Nearest matching gives 0 distance.
    query = random_tokens((6, 8), 2)
    prompts = np.stack([query[::-1], random_tokens((6, 8), 3)])
    m = np.asarray(scoring.few_shot_patch_scores(jnp.asarray(query[None]), jnp.asarray(prompts)))
    np.testing.assert_allclose(m, 0.0, atol=1e-6)


@pytest.mark.parametrize("count", [2, 7, 11])
def test_batch_zero_shot_equals_numpy_leave_one_out(count):
    tokens = random_tokens((count, 9, 8), count)
    valid = np.ones(count, bool)
    m = np.asarray(scoring.batch_zero_shot_patch_scores(jnp.asarray(tokens), jnp.asarray(valid)))
    np.testing.assert_allclose(m, numpy_zero_shot(tokens), atol=1e-5)
    chunked = scoring.batch_zero_shot_patch_scores(jnp.asarray(tokens), jnp.asarray(valid), query_chunk=3)
    np.testing.assert_allclose(np.asarray(chunked), m, atol=1e-6)


def test_batch_zero_shot_padding_is_never_a_reference():
    tokens = random_tokens((7, 9, 8), 5)
    padded = np.concatenate([tokens, random_tokens((3, 9, 8), 6)])
    valid = np.arange(10) < 7
    m = np.asarray(scoring.batch_zero_shot_patch_scores(jnp.asarray(padded), jnp.asarray(valid)))
    np.testing.assert_allclose(m[:7], numpy_zero_shot(tokens), atol=1e-5)


# ------------------------------------------------------------------------------ DINOv2 attention


def test_cls_attention_matches_transformers():
    torch = pytest.importorskip("torch")
    from tests.test_dinov2 import TINY_CONFIGS, converted_pair

    for name in ("plain", "registers-swiglu"):
        config, torch_model, flax_model = converted_pair(TINY_CONFIGS[name])
        for module in torch_model.modules():  # only the eager attention returns its weights
            if hasattr(module, "config"):
                module.config._attn_implementation = "eager"
        images = np.random.default_rng(0).standard_normal((2, 112, 140, 3)).astype(np.float32)
        with torch.no_grad():
            outputs = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2), output_attentions=True)
        expected = outputs.attentions[-1][:, :, 0, 1 + config.num_register_tokens:].numpy().reshape(2, -1, 8, 10)
        grid, cls, attention = flax_model(jnp.asarray(images), cls_attention=True)
        np.testing.assert_allclose(np.asarray(attention), expected, rtol=1e-4, atol=1e-7)
        default_grid, default_cls = flax_model(jnp.asarray(images))
        np.testing.assert_array_equal(np.asarray(grid), np.asarray(default_grid))
        np.testing.assert_array_equal(np.asarray(cls), np.asarray(default_cls))


# ------------------------------------------------------------------------------ PatchEAD+


def test_foreground_weights_match_numpy():
    attention = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32) ** 8
    low, high = attention.min(axis=(1, 2), keepdims=True), attention.max(axis=(1, 2), keepdims=True)
    expected = np.where((attention - low) / (high - low) > 0.05, 1.0, 0.5)
    np.testing.assert_array_equal(np.asarray(alignment.foreground_weights(jnp.asarray(attention))), expected)


@pytest.mark.parametrize("rotate", [False, True])
def test_alignment_recovers_a_rigid_motion(rotate):
    # Unique random tokens on a 10 x 10 grid; the prompt is the query shifted by (2, 1) patches
    # (x, y), or rotated by 180 degrees: the estimate must undo it.
    query = random_tokens((10, 10, 16), 8)
    if rotate:
        prompt, expected_theta, expected_shift = query[::-1, ::-1], np.pi, np.array([10.0, 10.0])
    else:
        prompt = np.roll(query, (1, 2), axis=(0, 1))  # prompt[y + 1, x + 2] = query[y, x]
        expected_theta, expected_shift = 0.0, np.array([-2.0, -1.0])
    estimate = jax.jit(alignment.estimate_rigid_motion)
    theta, shift = estimate(jnp.asarray(query), jnp.asarray(prompt), jax.random.key(0))
    assert abs(np.angle(np.exp(1j * (float(theta) - expected_theta)))) < 1e-4
    np.testing.assert_allclose(np.asarray(shift), expected_shift, atol=1e-3)


def test_warp_by_180_degrees_is_the_rotated_image():
    image = np.random.default_rng(1).random((28, 28, 3)).astype(np.float32)
    warp = jax.jit(alignment.warp_rigid, static_argnames="grid")
    warped = warp(jnp.asarray(image), jnp.asarray(np.pi), jnp.asarray([2.0, 2.0]), grid=(2, 2))
    np.testing.assert_allclose(np.asarray(warped), image[::-1, ::-1], atol=1e-4)


# ------------------------------------------------------------------------------ the detector


@pytest.fixture(scope="module")
def encoder():
    return DinoPatchEncoder.random(TINY_DINO, resolution=56)


def _images(count, seed):
    return np.random.default_rng(seed).random((count, 32, 32, 3)).astype(np.float32)


def test_few_shot_detector_equals_numpy_on_its_tokens(encoder):
    prompts, queries = _images(2, 0), _images(5, 1)
    detector = PatchEAD(encoder, PatchEADOptions(batch_size=2, rho=0.1)).fit(prompts)
    maps, scores = detector.predict(queries)
    assert maps.shape == (5, 32, 32) and scores.shape == (5,)
    query_tokens = np.asarray(encoder(queries)[0]).reshape(5, -1, 16)
    prompt_tokens = np.asarray(encoder(prompts)[0]).reshape(2, -1, 16)
    expected = [numpy_s(numpy_m(numpy_u(q, prompt_tokens), 1), 0.1) for q in query_tokens]
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
    # A prompt scored against itself matches patch for patch: distance 0 everywhere.
    self_maps, self_scores = detector.predict(prompts)
    np.testing.assert_allclose(self_scores, 0.0, atol=1e-5)


def test_batch_zero_shot_detector_equals_numpy_per_batch(encoder):
    images = _images(7, 2)
    detector = PatchEAD(encoder, PatchEADOptions(zero_shot_batch=6, rho=0.1))
    maps, scores = detector.predict_batch_zero_shot(images, seed=3)
    tokens = np.asarray(encoder(images)[0]).reshape(7, -1, 16)
    order = np.random.default_rng(3).permutation(7)
    expected = np.zeros(7)
    # At most 6 per batch: 4 + 3 (never 6 + a lone image, which would have no reference).
    for batch in (order[:4], order[4:]):
        m = numpy_zero_shot(tokens[batch])
        expected[batch] = [numpy_s(row, 0.1) for row in m]
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
    assert maps.shape == (7, 32, 32) and np.all(np.isfinite(maps))


def test_patchead_plus_mask_equals_numpy_and_alignment_only_adds_prompts(encoder):
    prompts, queries = _images(1, 4), _images(3, 5)
    masked = PatchEAD(encoder, PatchEADOptions(rho=1.0, mask=True)).fit(prompts).predict(queries)[1]
    query_tokens, attention = (np.asarray(a) for a in encoder(queries))
    prompt_tokens = np.asarray(encoder(prompts)[0]).reshape(1, -1, 16)
    low, high = attention.min(axis=(1, 2), keepdims=True), attention.max(axis=(1, 2), keepdims=True)
    weights = np.where((attention - low) / (high - low) > 0.05, 1.0, 0.5).reshape(3, -1)
    expected = [np.mean(numpy_m(numpy_u(q, prompt_tokens), 1) * w) for q, w in zip(query_tokens.reshape(3, -1, 16),
                                                                                 weights)]
    np.testing.assert_allclose(masked, expected, rtol=1e-4, atol=1e-6)
    maps, scores = PatchEAD(encoder, PatchEADOptions.plus(rho=1.0)).fit(prompts).predict(queries)
    assert maps.shape == (3, 32, 32) and np.all(np.isfinite(maps))
    # Alignment only adds prompts: the nearest match can only get nearer.
    assert np.all(scores <= masked + 1e-5)
    # (PatchEAD+ batch zero-shot: test_patchead_plus_sharded_over_3_devices_equals_one_device, slow.)


def test_bad_inputs_are_user_errors(encoder):
    with pytest.raises(UserInputError, match="fit"):
        PatchEAD(encoder).predict(_images(1, 0))
    with pytest.raises(UserInputError, match="float images"):
        PatchEAD(encoder).fit(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(UserInputError, match="at least 2"):
        PatchEAD(encoder).predict_batch_zero_shot(_images(1, 0))
    with pytest.raises(UserInputError, match="multiple of the DINOv2 patch"):
        DinoPatchEncoder.random(TINY_DINO, resolution=50)


SHARDED_WORKER = """
import sys, numpy as np, jax
from nexvitad_jax.sharding import make_mesh
from nexvitad_jax.peers import DinoPatchEncoder, PatchEAD, PatchEADOptions
rng = np.random.default_rng(0)
prompts, queries = rng.random((2, 32, 32, 3)).astype(np.float32), rng.random((7, 32, 32, 3)).astype(np.float32)
options = PatchEADOptions.plus if sys.argv[1] == "plus" else PatchEADOptions
results = []
for n in (1, 3):
    encoder = DinoPatchEncoder.random(%r, resolution=56, mesh=make_mesh(jax.devices()[:n]))
    detector = PatchEAD(encoder, options(batch_size=4, zero_shot_batch=5)).fit(prompts)
    results.append([*detector.predict(queries), *detector.predict_batch_zero_shot(queries, seed=1)])
for one, three in zip(*results):
    assert np.all(np.isfinite(one)) and np.allclose(one, three, atol=1e-5), np.abs(one - three).max()
print("same")
""" % TINY_DINO


def _run_sharded(variant: str):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=3")
    done = subprocess.run([sys.executable, "-c", SHARDED_WORKER, variant], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "same" in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
def test_sharded_over_3_devices_equals_one_device():
    _run_sharded("plain")


@pytest.mark.slow
def test_patchead_plus_sharded_over_3_devices_equals_one_device():
    _run_sharded("plus")
