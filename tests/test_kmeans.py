"""Sinkhorn K-means: blobs (sklearn ARI), balance vs Lloyd, a NumPy log-domain reference, sweeps,
errors, and the ott-jax shim."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference import sinkhorn_kmeans, sweep_k, transport_assignments
from nexvitad_jax.inference.sinkhorn_kmeans import kmeans_plus_plus


def nearest(x: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    return np.argmin(((x[:, None, :] - prototypes[None]) ** 2).sum(-1), axis=1)


def test_ott_shim_restores_is_vmappable_and_batched_pointcloud_runs():
    import jax.interpreters.batching as public_batching
    from jax._src.interpreters import batching as private_batching

    from nexvitad_jax.inference import _ott_compat

    assert public_batching.is_vmappable is private_batching.is_vmappable
    # PointCloud(batch_size=...) goes through ott.utils.batched_vmap, which needs the alias; its
    # online cost must equal the dense one.
    x = jax.random.normal(jax.random.key(0), (50, 3))
    y = jax.random.normal(jax.random.key(1), (7, 3))
    online = _ott_compat.pointcloud.PointCloud(x, y, epsilon=0.5, batch_size=16)
    dense = _ott_compat.pointcloud.PointCloud(x, y, epsilon=0.5)
    prob = lambda geom: _ott_compat.linear_problem.LinearProblem(geom)
    out_online = _ott_compat.sinkhorn.Sinkhorn()(prob(online))
    out_dense = _ott_compat.sinkhorn.Sinkhorn()(prob(dense))
    np.testing.assert_allclose(out_online.g, out_dense.g, atol=1e-4)


@pytest.mark.parametrize("dense_cost_bytes", [None, 0], ids=["dense-cost", "online-pointcloud"])
def test_recovers_well_separated_blobs(dense_cost_bytes):
    x, labels = make_blobs(n_samples=1500, centers=5, n_features=12, cluster_std=0.6, random_state=3)
    x = x.astype(np.float32)
    prototypes, result = sinkhorn_kmeans(x, 5, rng=jax.random.key(0), dense_cost_bytes=dense_cost_bytes,
                                         chunk_size=256)
    assert adjusted_rand_score(labels, nearest(x, np.asarray(prototypes))) >= 0.99
    assert bool(result.converged) and bool(result.sinkhorn_converged)
    assert int(result.iterations) < 100


def test_clusters_stay_balanced_where_lloyd_is_not():
    # One dense mode holding 90% of the points and three small far-away groups: Lloyd spends three
    # centers on the small groups; balanced transport splits the dense mode instead.
    rng = np.random.default_rng(0)
    dense_mode = rng.normal(0.0, 1.0, (1800, 8))
    far = np.concatenate([rng.normal(0.0, 0.3, (67, 8)) + 25.0 * np.eye(8)[i] for i in range(3)])
    x = np.concatenate([dense_mode, far]).astype(np.float32)
    n, k = len(x), 4
    lloyd = KMeans(k, n_init=1, random_state=0).fit(x)
    lloyd_sizes = np.bincount(lloyd.labels_, minlength=k)
    assert lloyd_sizes.max() / n > 0.85  # strongly unbalanced

    prototypes, result = sinkhorn_kmeans(x, k, rng=jax.random.key(0))
    np.testing.assert_allclose(np.asarray(result.cluster_sizes), n / k, rtol=0.02)
    # Each point to its largest transport weight: the balanced assignment.
    weights = np.asarray(transport_assignments(x, prototypes, result))
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-5)
    hard_sizes = np.bincount(weights.argmax(1), minlength=k)
    assert np.all(np.abs(hard_sizes - n / k) < 0.1 * n / k), hard_sizes


def numpy_sinkhorn_kmeans(x: np.ndarray, init: np.ndarray, epsilon_relative: float, iterations: int):
    """The same iterations in float64 NumPy, log domain: Sinkhorn to convergence, rows normalized."""
    n, k = len(x), len(init)
    scale = np.mean(((x - x.mean(0)) ** 2).sum(1))
    eps = epsilon_relative * scale
    log_a, log_b = np.full(n, -np.log(n)), np.full(k, -np.log(k))
    prototypes = init.copy()
    for _ in range(iterations):
        cost = ((x[:, None, :] - prototypes[None]) ** 2).sum(-1)
        f, g = np.zeros(n), np.zeros(k)
        for _ in range(20000):
            g = eps * log_b - eps * logsumexp((f[:, None] - cost) / eps, axis=0)
            f = eps * log_a - eps * logsumexp((g[None, :] - cost) / eps, axis=1)
            plan = np.exp((f[:, None] + g[None, :] - cost) / eps)
            if np.abs(plan.sum(0) - 1.0 / k).sum() < 1e-12:
                break
        weights = plan / plan.sum(1, keepdims=True)  # normalized transport rows
        prototypes = weights.T @ x / weights.sum(0)[:, None]
    return prototypes


def test_matches_numpy_log_domain_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(240, 5)) + rng.integers(0, 3, size=(240, 1)) * 2.0
    init = np.asarray(kmeans_plus_plus(jnp.asarray(x, jnp.float32), 4, jax.random.key(2)), np.float64)
    expected = numpy_sinkhorn_kmeans(x, init, 0.05, iterations=4)
    prototypes, result = sinkhorn_kmeans(x.astype(np.float32), 4, rng=jax.random.key(2), init=init,
                                         epsilon=0.05, max_iters=4, tol=0.0, sinkhorn_threshold=1e-6,
                                         sinkhorn_max_iters=20000)
    assert int(result.iterations) == 4
    np.testing.assert_allclose(np.asarray(prototypes), expected, atol=1e-4)


@pytest.mark.parametrize("parallel", [True, False], ids=["vmapped", "sequential"])
def test_sweep_equals_each_k_alone(parallel):
    x, _ = make_blobs(n_samples=400, centers=6, n_features=10, cluster_std=1.0, random_state=5)
    x = x.astype(np.float32)
    ks = [2, 6, 9]
    options = dict(max_iters=8, tol=0.0, sinkhorn_threshold=1e-5, sinkhorn_max_iters=5000)
    sweep = sweep_k(x, ks, rng=jax.random.key(4), parallel=parallel, **options)
    for index, k in enumerate(ks):
        prototypes, result = sinkhorn_kmeans(x, k, rng=jax.random.key(4), **options)
        assert sweep.prototypes[index].shape == (k, 10)
        np.testing.assert_allclose(np.asarray(sweep.prototypes[index]), np.asarray(prototypes), atol=2e-3)
        np.testing.assert_allclose(float(sweep.objective[index]), float(result.objective), rtol=1e-4)


def test_kmeans_plus_plus_prefix_property():
    x = jax.random.normal(jax.random.key(0), (300, 4))
    long = kmeans_plus_plus(x, 12, jax.random.key(9))
    short = kmeans_plus_plus(x, 5, jax.random.key(9))
    np.testing.assert_array_equal(np.asarray(long[:5]), np.asarray(short))
    rows = {tuple(row) for row in np.asarray(x)}
    assert all(tuple(center) in rows for center in np.asarray(long))


def test_errors():
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    with pytest.raises(UserInputError, match=r"K = 11 clusters but only N = 10 points"):
        sinkhorn_kmeans(x, 11, rng=jax.random.key(0))
    with pytest.raises(UserInputError, match=r"K = 20 clusters but only N = 10"):
        sweep_k(x, [2, 20], rng=jax.random.key(0))
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(UserInputError, match="1 of 10 points contain NaN"):
        sinkhorn_kmeans(bad, 2, rng=jax.random.key(0))
    with pytest.raises(UserInputError, match=r"init: expected \(2, 3\) prototypes"):
        sinkhorn_kmeans(x, 2, rng=jax.random.key(0), init=np.zeros((2, 4)))
    with pytest.raises(UserInputError, match=r"expected a \(N, D\) array"):
        sinkhorn_kmeans(x[0], 2, rng=jax.random.key(0))
    with pytest.raises(UserInputError, match="positive integer number of clusters"):
        sinkhorn_kmeans(x, 0, rng=jax.random.key(0))
    with pytest.raises(UserInputError, match="at least one cluster count"):
        sweep_k(x, [], rng=jax.random.key(0))
