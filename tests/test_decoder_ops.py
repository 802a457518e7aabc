"""The decoder's fast formulations equal the operations they replace: the 2x2 stride-2 transposed
convolution as a matmul + depth-to-space (vs lax.conv_transpose, nnx.ConvTranspose and torch's
ConvTranspose2d, forward and gradients), and the stacked heads run one after another (vs each head
called on its own), unrolled and vmapped."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from nexvitad_jax.models.decoder import (HEAD_BATCHING, PseudoLabelHead, SegmentationHead, StackedHeads, UpConv2x2,
                                         depth_to_space_2x2)


def lax_conv_transpose(x, kernel):
    return jax.lax.conv_transpose(x, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shape, out", [((2, 3, 5, 7), 4), ((1, 7, 7, 16), 8)])
def test_depth_to_space_equals_lax_conv_transpose_and_its_gradients(shape, out):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(2, 2, shape[-1], out)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(shape[0], 2 * shape[1], 2 * shape[2], out)), jnp.float32)
    expected = lax_conv_transpose(x, kernel)
    np.testing.assert_allclose(depth_to_space_2x2(x, kernel), expected, rtol=1e-5, atol=1e-5)
    grads = jax.vjp(depth_to_space_2x2, x, kernel)[1](cotangent)
    expected_grads = jax.vjp(lax_conv_transpose, x, kernel)[1](cotangent)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_upconv_matches_nnx_conv_transpose_and_torch():
    rng = np.random.default_rng(1)
    up = UpConv2x2(6, 5, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(3))
    reference = nnx.ConvTranspose(6, 5, (2, 2), strides=(2, 2), padding="VALID", rngs=nnx.Rngs(3))
    # The same variables, initialization and names (checkpoint paths) as nnx.ConvTranspose.
    assert jax.tree.map(np.shape, nnx.state(up)) == jax.tree.map(np.shape, nnx.state(reference))
    np.testing.assert_array_equal(up.kernel[...], reference.kernel[...])
    up.bias[...] = jnp.asarray(rng.normal(size=5), jnp.float32)
    reference.bias[...] = up.bias[...]
    x = rng.normal(size=(2, 4, 3, 6)).astype(np.float32)
    np.testing.assert_allclose(up(jnp.asarray(x)), reference(jnp.asarray(x)), rtol=1e-5, atol=1e-5)
    # torch's ConvTranspose2d weight (in, out, kh, kw) is the flax kernel flipped in space.
    weight = torch.from_numpy(np.array(up.kernel[...])[::-1, ::-1].transpose(2, 3, 0, 1).copy())
    with torch.no_grad():
        expected = torch.nn.functional.conv_transpose2d(torch.from_numpy(x).permute(0, 3, 1, 2), weight,
                                                        torch.from_numpy(np.array(up.bias[...])), stride=2)
    np.testing.assert_allclose(up(jnp.asarray(x)), expected.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


def _randomized(heads: StackedHeads, seed: int) -> StackedHeads:
    rng = np.random.default_rng(seed)
    nnx.update(heads, jax.tree.map(lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), jnp.float32),
                                   nnx.state(heads, nnx.Param)))
    return heads


@pytest.mark.parametrize("batching", HEAD_BATCHING)
def test_stacked_heads_equal_each_head_alone_with_gradients(batching):
    """Training mode (BatchNorm batch statistics, a padding mask): outputs, updated statistics and
    parameter gradients of the stacked call equal those of each head called on its own slice."""
    dims, count = (4, 8), 2  # one up-convolution level (compile time: the test runs in CI)
    heads = _randomized(StackedHeads(count, lambda r: SegmentationHead(dims, (4,), rngs=r), batching=batching,
                                     rngs=nnx.Rngs(0)), 0)
    rng = np.random.default_rng(1)
    features = tuple(jnp.asarray(rng.normal(size=(count, 3, 4 // 2 ** i, 4 // 2 ** i, d)), jnp.float32)
                     for i, d in enumerate(dims))
    mask = jnp.asarray([[True, True, False], [True, True, True]])
    graphdef, params, rest = nnx.split(heads, nnx.Param, ...)

    def stacked(params, rest):
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))
        logits = model(features, (6, 6), True, mask=mask)
        return jnp.sum(jnp.sin(logits)), (logits, nnx.state(model, nnx.BatchStat))

    def one_by_one(params, rest):
        head_graphdef, _ = nnx.split(heads.heads)
        logits, stats = [], []
        for index in range(count):
            pick = lambda tree: jax.tree.map(lambda x: x[index], tree)
            head = nnx.merge(head_graphdef, pick(nnx.state(nnx.merge(graphdef, params, rest).heads)))
            logits.append(head(tuple(f[index] for f in features), (6, 6), True, mask=mask[index]))
            stats.append(nnx.state(head, nnx.BatchStat))
        logits = jnp.stack(logits)
        return jnp.sum(jnp.sin(logits)), (logits, jax.tree.map(lambda *s: jnp.stack(s), *stats))

    (_, (logits, stats)), grads = jax.jit(jax.value_and_grad(stacked, has_aux=True))(params, rest)
    (_, (want_logits, want_stats)), want_grads = jax.jit(jax.value_and_grad(one_by_one, has_aux=True))(params, rest)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(want_stats)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):  # sums of many terms
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("batching", HEAD_BATCHING)
def test_stacked_heads_with_shared_inputs(batching):
    heads = _randomized(StackedHeads(2, lambda r: PseudoLabelHead(6, (4,), rngs=r), batching=batching,
                                     rngs=nnx.Rngs(0)), 2)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 3, 6)), jnp.float32)
    logits = heads(x, (5, 5), per_head_inputs=False)
    head_graphdef, state = nnx.split(heads.heads)
    for index in range(2):
        head = nnx.merge(head_graphdef, jax.tree.map(lambda v: v[index], state))
        np.testing.assert_allclose(logits[index], head(x, (5, 5)), rtol=1e-5, atol=1e-6)
