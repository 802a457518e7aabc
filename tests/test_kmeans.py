"""Sinkhorn K-means: blobs (sklearn ARI), balance vs Lloyd, a NumPy log-domain reference, a plain
OTT-JAX reference of the paper's iteration, sweeps, k-means++, solver options, errors, and the
ott-jax shim. On several devices: tests/test_kmeans_sharded.py."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference import SolverOptions, sinkhorn_kmeans, sweep_k, transport_assignments
from nexvitad_jax.inference._ott_compat import linear_problem, pointcloud, sinkhorn
from nexvitad_jax.inference.kmeans_init import _prefix_sums, kmeans_plus_plus
from nexvitad_jax.inference.transport import Shard

# The module (the package exports the function of the same name).
kmeans_module = importlib.import_module("nexvitad_jax.inference.sinkhorn_kmeans")


def nearest(x: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    return np.argmin(((x[:, None, :] - prototypes[None]) ** 2).sum(-1), axis=1)


def test_ott_shim_restores_is_vmappable_and_batched_pointcloud_runs():
    import jax.interpreters.batching as public_batching
    from jax._src.interpreters import batching as private_batching

    from nexvitad_jax.inference import _ott_compat

    assert public_batching.is_vmappable is private_batching.is_vmappable
    # PointCloud(batch_size=...) goes through ott.utils.batched_vmap, which needs the alias; its
    # online log-kernel must equal the dense one.
    x = jax.random.normal(jax.random.key(0), (50, 3))
    y = jax.random.normal(jax.random.key(1), (7, 3))
    f, g = jax.random.normal(jax.random.key(2), (50,)), jax.random.normal(jax.random.key(3), (7,))
    online = _ott_compat.pointcloud.PointCloud(x, y, epsilon=0.5, batch_size=16)
    dense = _ott_compat.pointcloud.PointCloud(x, y, epsilon=0.5)
    for axis in (0, 1):
        np.testing.assert_allclose(online.apply_lse_kernel(f, g, 0.5, axis=axis)[0],
                                   dense.apply_lse_kernel(f, g, 0.5, axis=axis)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows_per_block", [16, 50], ids=["blocks", "one-block"])
def test_online_costs_in_blocks_equal_ott_pointcloud(rows_per_block):
    # The online geometry of the Sinkhorn part computes both log-sum-exps block by block of rows
    # (the last block overlapping the one before); OTT's plain PointCloud is the reference, with
    # rows of no mass (f = -inf) and a column without mass (g = -inf) as the solver has them.
    from nexvitad_jax.inference.transport import _PointCloudInBlocks

    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(50, 3)).astype(np.float32), rng.normal(size=(7, 3)).astype(np.float32)
    f, g = rng.normal(size=50).astype(np.float32), rng.normal(size=7).astype(np.float32)
    f[[3, 49]], g[6] = -np.inf, -np.inf
    reference = pointcloud.PointCloud(x, y, epsilon=0.5)
    blocked = _PointCloudInBlocks(x, y, epsilon=0.5, batch_size=rows_per_block, axis_name=None)
    for axis in (0, 1):
        np.testing.assert_allclose(jax.jit(lambda f, g: blocked.apply_lse_kernel(f, g, 0.5, axis=axis)[0])(f, g),
                                   reference.apply_lse_kernel(f, g, 0.5, axis=axis)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(blocked.marginal_from_potentials(f, g, axis=0),
                               reference.marginal_from_potentials(f, g, axis=0), rtol=1e-5, atol=1e-7)


def test_recovers_well_separated_blobs():
    x, labels = make_blobs(n_samples=1500, centers=5, n_features=12, cluster_std=0.6, random_state=3)
    x = x.astype(np.float32)
    prototypes, result = sinkhorn_kmeans(x, 5, rng=jax.random.key(0))
    assert adjusted_rand_score(labels, nearest(x, np.asarray(prototypes))) >= 0.99
    assert bool(result.converged) and bool(result.sinkhorn_converged)
    assert int(result.iterations) < 100
    # Newton on the semi-dual does the solve; Sinkhorn only confirms it (one iteration).
    assert int(result.sinkhorn_iterations) == 1 and 1 <= int(result.newton_steps) <= 10


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


@pytest.fixture(scope="module")
def reference_problem():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(240, 5)) + rng.integers(0, 3, size=(240, 1)) * 2.0
    init = np.asarray(kmeans_plus_plus(jnp.asarray(x, jnp.float32), 4, jax.random.key(2)), np.float64)
    return x, init, numpy_sinkhorn_kmeans(x, init, 0.05, iterations=4)


@pytest.mark.parametrize("newton_steps", [30, 0], ids=["newton-then-sinkhorn", "sinkhorn-only"])
def test_matches_numpy_log_domain_reference(reference_problem, newton_steps):
    x, init, expected = reference_problem
    options = SolverOptions(sinkhorn_threshold=1e-6, sinkhorn_max_iters=20000, newton_steps=newton_steps)
    prototypes, result = sinkhorn_kmeans(x.astype(np.float32), 4, rng=jax.random.key(2), init=init,
                                         epsilon=0.05, max_iters=4, tol=0.0, options=options)
    assert int(result.iterations) == 4
    np.testing.assert_allclose(np.asarray(prototypes), expected, atol=1e-4)


def ott_reference_kmeans(x, init, epsilon: float, max_iters: int, tol: float, threshold: float):
    """The paper's iteration, plainly: OTT's Sinkhorn on the squared Euclidean PointCloud with the
    absolute epsilon (epsilon x total variance) and uniform marginals, soft assignment by the
    normalized transport rows, weighted means; stop once the largest move is <= tol x sqrt(total
    variance). Returns (prototypes, iterations run)."""
    n, k = x.shape[0], init.shape[0]
    scale = jnp.mean(jnp.sum((x - x.mean(0)) ** 2, axis=1))
    solver = sinkhorn.Sinkhorn(threshold=threshold, max_iterations=100_000)

    @jax.jit
    def iteration(prototypes):
        geom = pointcloud.PointCloud(x, prototypes, epsilon=epsilon * scale)  # squared Euclidean cost
        out = solver(linear_problem.LinearProblem(geom, a=jnp.full(n, 1.0 / n), b=jnp.full(k, 1.0 / k)))
        weights = out.matrix / out.matrix.sum(1, keepdims=True)
        moved = weights.T @ x / weights.sum(0)[:, None]
        return moved, jnp.sqrt(jnp.max(jnp.sum((moved - prototypes) ** 2, axis=1)) / scale), out.converged

    prototypes = init
    for iterations in range(1, max_iters + 1):
        prototypes, shift, converged = iteration(prototypes)
        assert bool(converged)
        if shift <= tol:
            break
    return prototypes, iterations


@pytest.fixture(scope="module")
def ott_reference_problem():
    """A 300-point, 8-D bank of four shifted modes; per K, k-means++ prototypes and the reference fit."""
    rng = np.random.default_rng(7)
    x = jnp.asarray((rng.normal(size=(300, 8)) + rng.integers(0, 4, size=(300, 1)) * 1.5).astype(np.float32))
    fits = {}
    for k in (5, 12):
        init = kmeans_plus_plus(x, k, jax.random.key(k))
        fits[k] = (init, *ott_reference_kmeans(x, init, 0.05, max_iters=40, tol=1e-3, threshold=1e-6))
    return x, fits


@pytest.mark.parametrize("k", [5, 12])
@pytest.mark.parametrize("costs", [{}, {"dense_cost_bytes": 0, "chunk_size": 64}], ids=["dense", "online-blocks"])
@pytest.mark.parametrize("newton_steps", [100, 0], ids=["newton", "sinkhorn-only"])
def test_matches_ott_reference_iteration(ott_reference_problem, k, costs, newton_steps):
    # Same initial prototypes, epsilon, tol and Sinkhorn threshold; the fast path's Newton warm
    # starts, blocked passes and online costs must land on the reference's prototypes after the same
    # number of iterations. Tolerance: both solve each transport problem to a marginal L1 error
    # <= 1e-6, so the soft assignments agree to ~1e-6 relative, and float32 sums over 300 points
    # round at ~1e-7 relative of the features' scale sqrt(total variance) (5.5 here); the deviation
    # measured over these 8 cases is <= 1.5e-6 sqrt(total variance). 1e-5 x sqrt(total variance)
    # leaves ~7x headroom, while a transport solved only to 1e-2 already lands 3e-4 away and an
    # epsilon off by 2x more than 1e-2 away.
    x, fits = ott_reference_problem
    init, expected, iterations = fits[k]
    options = SolverOptions(sinkhorn_threshold=1e-6, sinkhorn_max_iters=100_000, newton_steps=newton_steps, **costs)
    prototypes, result = sinkhorn_kmeans(x, k, rng=jax.random.key(0), init=init, epsilon=0.05, max_iters=40,
                                         tol=1e-3, options=options)
    assert bool(result.converged) and bool(result.sinkhorn_converged)
    assert int(result.iterations) == iterations
    assert (int(result.newton_steps) > 0) == (newton_steps > 0)
    scale = float(jnp.mean(jnp.sum((x - x.mean(0)) ** 2, axis=1)))
    np.testing.assert_allclose(np.asarray(prototypes), np.asarray(expected), rtol=0, atol=1e-5 * np.sqrt(scale))


@pytest.mark.parametrize("sweep_options", [{}, {"newton_max_k": 4}, {"group_pad_ratio": 1.0}],
                         ids=["newton", "newton-for-k2-only", "no-shared-solves"])
def test_sweep_equals_each_k_alone_online_and_blocked(sweep_options):
    # The sweep (one program, stored costs, one block) against each K alone on the online
    # PointCloud path in blocks of 128 rows: same prototypes, objective and own iteration count
    # (runs stop at their own convergence). K = 8 and 9 share a padded transport solve, 2 has its own
    # (with group_pad_ratio 1, each K its own); with newton_max_k = 4 that group solves with
    # Sinkhorn alone while K = 2 uses Newton.
    x, _ = make_blobs(n_samples=400, centers=6, n_features=10, cluster_std=1.0, random_state=5)
    x = x.astype(np.float32)
    ks = [9, 2, 8]
    solve = {"sinkhorn_threshold": 1e-5, "sinkhorn_max_iters": 5000, "newton_max_k": 4096}
    solve.update({name: value for name, value in sweep_options.items() if name == "newton_max_k"})
    stopping = {"max_iters": 30, "tol": 1e-3}
    sweep = sweep_k(x, ks, rng=jax.random.key(4), options=SolverOptions(**{**solve, **sweep_options}), **stopping)
    alone = SolverOptions(**solve, dense_cost_bytes=0, chunk_size=128)
    for index, k in enumerate(ks):
        prototypes, result = sinkhorn_kmeans(x, k, rng=jax.random.key(4), options=alone, **stopping)
        assert sweep.prototypes[index].shape == (k, 10)
        assert int(sweep.result.iterations[index]) == int(result.iterations)
        np.testing.assert_allclose(np.asarray(sweep.prototypes[index]), np.asarray(prototypes), atol=2e-3)
        np.testing.assert_allclose(float(sweep.objective[index]), float(result.objective), rtol=1e-4)
        assert int(sweep.result.newton_steps[index] > 0) == int(result.newton_steps > 0)
    assert len(set(np.asarray(sweep.result.iterations).tolist())) > 1  # runs stopped at different iterations
    newton = np.asarray(sweep.result.newton_steps) > 0  # ks = 9, 2, 8
    np.testing.assert_array_equal(newton, [False, True, False] if "newton_max_k" in sweep_options else [True] * 3)


def test_kmeans_plus_plus_prefix_property():
    x = jax.random.normal(jax.random.key(0), (300, 4))
    long = kmeans_plus_plus(x, 12, jax.random.key(9))
    short = kmeans_plus_plus(x, 5, jax.random.key(9))
    np.testing.assert_array_equal(np.asarray(long[:5]), np.asarray(short))
    rows = {tuple(row) for row in np.asarray(x)}
    assert all(tuple(center) in rows for center in np.asarray(long))


def d2_sequence_probabilities(points: np.ndarray, k: int) -> dict[tuple[int, ...], float]:
    """Every ordered sequence of k-means++ centers (indices) with its probability: first uniform,
    then each point with probability D^2 / sum D^2 (direct enumeration)."""
    probabilities = {}

    def extend(sequence, probability):
        if len(sequence) == k:
            probabilities[tuple(sequence)] = probability
            return
        d2 = np.min(((points[:, None, :] - points[sequence][None]) ** 2).sum(-1), axis=1)
        for i in np.flatnonzero(d2 > 0):
            extend(sequence + [int(i)], probability * d2[i] / d2.sum())

    for i in range(len(points)):
        extend([i], 1 / len(points))
    return probabilities


@pytest.mark.parametrize("attempts", [32, 1], ids=["rejection", "exhausted-rejection-falls-back"])
def test_kmeans_plus_plus_draws_exactly_d_squared(attempts):
    # Center 3 is drawn by rejection against the distances last brought up to date at center 2
    # (module docstring); with one attempt most draws take the exact fallback. The empirical
    # distribution of whole center sequences over 40,000 seeds against direct enumeration: total
    # variation ~0.02 from sampling noise; proposals accepted without the D^2 / U test give 0.43.
    options = SolverOptions(kmeans_pp_attempts=attempts)
    points = np.array([[0, 0], [1, 0], [0, 2], [3, 1], [1.5, 1.5]], np.float64)
    expected = d2_sequence_probabilities(points, 4)
    draws = jax.jit(jax.vmap(lambda key: kmeans_plus_plus(jnp.asarray(points, jnp.float32), 4, key, options=options)))(
        jax.random.split(jax.random.key(0), 40_000))
    indices = np.argmin(((np.asarray(draws)[:, :, None, :] - points[None, None]) ** 2).sum(-1), axis=2)
    sequences, counts = np.unique(indices, axis=0, return_counts=True)
    observed = {tuple(int(i) for i in row): count / len(indices) for row, count in zip(sequences, counts)}
    total_variation = 0.5 * sum(abs(observed.get(seq, 0.0) - expected.get(seq, 0.0)) for seq in {*observed, *expected})
    assert total_variation < 0.035


def test_kmeans_plus_plus_cumulative_sums_are_correctly_rounded():
    # The cumulative sum of U that proposals search is summed in double-float: every prefix equals
    # the float64 prefix rounded to float32, so its values (and the draws) do not depend on the order
    # of the additions, e.g. on how the rows are spread over devices. A float32 cumsum is off in
    # more than half of them (by up to ~3e-7 relative), each a draw that could land elsewhere.
    rng = np.random.default_rng(0)
    values = (rng.gamma(0.5, size=200_000) * rng.choice([1e-3, 1.0, 1e3], size=200_000)).astype(np.float32)
    prefix, total = jax.jit(lambda v: _prefix_sums(v, Shard.whole(v.shape[0])))(values)
    expected = np.cumsum(values.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(prefix), expected)
    assert float(total) == expected[-1]


def test_kmeans_plus_plus_on_duplicates_draws_uniformly():
    # Every point on the first center: D^2 = 0 everywhere, the draws fall back to uniform (no hang).
    centers = kmeans_plus_plus(jnp.ones((50, 3)), 20, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(centers), np.ones((20, 3)))


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


def test_solver_options_are_validated_hashable_and_static():
    with pytest.raises(UserInputError, match=r"SolverOptions.newton_steps = -1: expected an integer >= 0"):
        SolverOptions(newton_steps=-1)
    with pytest.raises(UserInputError, match=r"SolverOptions.chunk_size = 0: expected an integer >= 1 or None"):
        SolverOptions(chunk_size=0)
    with pytest.raises(UserInputError, match=r"SolverOptions.kmeans_pp_block = True: expected an integer"):
        SolverOptions(kmeans_pp_block=True)
    with pytest.raises(UserInputError, match=r"SolverOptions.sinkhorn_threshold = 0: expected a finite number > 0"):
        SolverOptions(sinkhorn_threshold=0)
    with pytest.raises(UserInputError, match=r"SolverOptions.group_pad_ratio = 0.5: expected a finite number >= 1"):
        SolverOptions(group_pad_ratio=0.5)
    with pytest.raises(UserInputError, match=r"SolverOptions.newton_max_move = nan"):
        SolverOptions(newton_max_move=float("nan"))
    with pytest.raises(UserInputError, match=r"SolverOptions.hessian_min_rows = 2.5: expected an integer"):
        SolverOptions(hessian_min_rows=2.5)
    # Numbers are normalized, so equal options are one static argument (one compiled program).
    assert SolverOptions(group_pad_ratio=2, chunk_size=np.int64(64)) == SolverOptions(group_pad_ratio=2.0,
                                                                                      chunk_size=64)
    assert isinstance(SolverOptions(group_pad_ratio=2).group_pad_ratio, float)
    assert hash(SolverOptions(chunk_size=64)) == hash(SolverOptions(chunk_size=64))
    x = np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32)
    init = x[:3]
    fit = lambda options, **stopping: sinkhorn_kmeans(x, 3, rng=jax.random.key(0), init=init, options=options,
                                                      **stopping)
    fit(SolverOptions(chunk_size=32))
    compiled = kmeans_module._fit_jit._cache_size()
    # epsilon, tol and max_iters are traced: no new program for them, nor for equal options.
    fit(SolverOptions(chunk_size=32), epsilon=0.1, tol=1e-3, max_iters=7)
    assert kmeans_module._fit_jit._cache_size() == compiled
    fit(SolverOptions(chunk_size=16))
    assert kmeans_module._fit_jit._cache_size() == compiled + 1
    with pytest.raises(UserInputError, match="options: expected a SolverOptions, got dict"):
        sinkhorn_kmeans(x, 3, rng=jax.random.key(0), options={"chunk_size": 32})
