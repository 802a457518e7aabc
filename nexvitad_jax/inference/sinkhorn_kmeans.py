"""Sinkhorn K-means (the paper's section 3.2): balanced soft clustering of a feature bank.

Each iteration solves entropic optimal transport between the N points (uniform mass 1/N) and the
K prototypes (uniform mass 1/K) on the squared Euclidean cost with OTT-JAX's Sinkhorn, assigns
every point softly by its normalized transport row, and moves each prototype to the weighted mean
of the points. Uniform target marginals keep the clusters near N/K points each, where Lloyd's
k-means lets a few dense modes take most of the bank.

Epsilon is relative: the absolute entropic regularization is `epsilon * s2` with `s2` the bank's
total variance, mean_i ||x_i - mean(x)||^2 (the mean cost of sending every point to the
centroid). That keeps the sharpness of the soft assignment and the Sinkhorn iteration count
independent of the features' scale (raw backbone features have norms in the tens to hundreds).
The default 0.05 is a measured trade-off: on a 64-mode synthetic bank (N = 4096, D = 256, K = 40,
5 iterations) 0.01 needs ~1900 Sinkhorn iterations per solve, 0.03 ~270, 0.1 ~70, with the same
k-means objective within 2% and cluster sizes within 1% of N/K at every setting.
The prototype shift is measured the same way: max_j ||p_j^new - p_j|| / sqrt(s2).

Memory: the cost matrix is materialized (an OTT `Geometry`) only when it is no larger than the
bank itself (K <= D) or fits `dense_cost_bytes`; otherwise Sinkhorn runs on an online
`PointCloud(batch_size=chunk_size)` and the weighted means are accumulated chunk by chunk, so the
footprint is O(N*D + K*D + chunk*K) and N can exceed 10^6.

`sweep_k` fits many K on one bank as one compiled program: every run is padded to max(K) with
masked prototypes (zero target mass, so Sinkhorn gives them -inf potentials and no points) and
the runs are vmapped. k-means++ draws its t-th center from a key folded with t, so the first K
centers of a max(K) initialization are exactly the K-center initialization: a sweep run equals
the run of that K alone.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference._ott_compat import geometry, linear_problem, pointcloud, sinkhorn

DEFAULT_EPSILON = 0.05
DEFAULT_DENSE_COST_BYTES = 2 << 30


class KMeansResult(NamedTuple):
    """Convergence information of one Sinkhorn K-means run (scalars; arrays of shape (S,) in a sweep)."""

    iterations: jax.Array  # outer (assignment/update) iterations run
    shift: jax.Array  # last max prototype move, relative to sqrt(total variance)
    converged: jax.Array  # shift <= tol before max_iters
    sinkhorn_converged: jax.Array  # the last Sinkhorn solve met its threshold
    sinkhorn_iterations: jax.Array  # Sinkhorn iterations of the last solve
    objective: jax.Array  # mean_i min_j ||x_i - p_j||^2 at the returned prototypes
    soft_objective: jax.Array  # mean_i sum_j w_ij ||x_i - p_j||^2 of the last assignment
    epsilon: jax.Array  # the absolute entropic regularization used
    cluster_sizes: jax.Array  # (K,) soft point counts sum_i w_ij of the last assignment
    potentials: jax.Array  # (K,) the last Sinkhorn dual potentials g (-inf on masked prototypes)


# ---------------------------------------------------------------------------------------------
# validation (host side, before anything is compiled)


def _check_bank(x, k_max: int, name: str = "x") -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise UserInputError(f"{name}: expected a (N, D) array of points, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    n = x.shape[0]
    if n == 0 or x.shape[1] == 0:
        raise UserInputError(f"{name}: empty bank of shape {tuple(x.shape)}")
    if k_max > n:
        raise UserInputError(f"{name}: K = {k_max} clusters but only N = {n} points; expected K <= N "
                             "(use fewer clusters or more normal images)")
    if not bool(jnp.isfinite(x).all()):
        bad = int(jnp.sum(~jnp.isfinite(x).all(axis=1)))
        raise UserInputError(f"{name}: {bad} of {n} points contain NaN or infinite values")
    return x


def _check_k(k) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UserInputError(f"K = {k!r}: expected a positive integer number of clusters")
    return int(k)


# ---------------------------------------------------------------------------------------------
# device functions


def squared_distances(x: jax.Array, prototypes: jax.Array) -> jax.Array:
    """(N, D), (K, D) -> (N, K) squared Euclidean distances as one matmul, clamped at 0."""
    x_sq = jnp.sum(x * x, axis=-1, keepdims=True)
    p_sq = jnp.sum(prototypes * prototypes, axis=-1)
    cross = jnp.dot(x, prototypes.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(x_sq + p_sq - 2.0 * cross, 0.0)


def total_variance(x: jax.Array) -> jax.Array:
    """mean_i ||x_i - mean(x)||^2: the cost scale epsilon and the shift are relative to."""
    centered = x - jnp.mean(x, axis=0)
    return jnp.maximum(jnp.mean(jnp.sum(centered * centered, axis=1)), jnp.finfo(x.dtype).tiny)


def kmeans_plus_plus(x: jax.Array, k: int, rng: jax.Array) -> jax.Array:
    """k-means++ seeding: center t is drawn with probability ~ D^2 using key fold_in(rng, t), so the
    first k centers do not depend on how many more are drawn."""
    n = x.shape[0]
    x_sq = jnp.sum(x * x, axis=1)
    first = jax.random.randint(jax.random.fold_in(rng, 0), (), 0, n)
    centers = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])

    def point_distances(center):
        cross = jnp.dot(x, center, precision=jax.lax.Precision.HIGHEST)
        return jnp.maximum(x_sq - 2.0 * cross + jnp.dot(center, center), 0.0)

    def draw(t, carry):
        centers, min_sq = carry
        logits = jnp.where(min_sq > 0, jnp.log(jnp.where(min_sq > 0, min_sq, 1.0)), -jnp.inf)
        # All points on existing centers (duplicates): fall back to a uniform draw.
        logits = jnp.where(jnp.any(min_sq > 0), logits, jnp.zeros_like(logits))
        index = jax.random.categorical(jax.random.fold_in(rng, t), logits)
        center = x[index]
        return centers.at[t].set(center), jnp.minimum(min_sq, point_distances(center))

    centers, _ = jax.lax.fori_loop(1, k, draw, (centers, point_distances(centers[0])))
    return centers


@jax.jit
def transport_assignments(x, prototypes, result: KMeansResult) -> jax.Array:
    """(N, K) soft assignments w_ij = softmax_j((g_j - C_ij) / eps) of `x` under a run's last
    transport potentials (the normalized transport rows; rows of a masked prototype are 0)."""
    logits = (result.potentials - squared_distances(x, prototypes)) / result.epsilon
    return jax.nn.softmax(logits, axis=1)


def _weighted_sums_online(x, prototypes, g, eps, mask, chunk: int):
    """Sum_i w_ij x_i, sum_i w_ij and sum_i sum_j w_ij C_ij, one (chunk, K) block at a time.

    w_ij = softmax_j((g_j - C_ij) / eps): the transport row P_ij = exp((f_i + g_j - C_ij)/eps)
    normalized over j, where f_i cancels. The last chunk is clamped to end at N and its rows that
    an earlier chunk already covered are masked out, so x is never padded or copied.
    """
    n = x.shape[0]
    num_chunks = -(-n // chunk)

    def body(c, carry):
        sums, counts, soft_cost = carry
        start = jnp.minimum(c * chunk, n - chunk)
        rows = jax.lax.dynamic_slice_in_dim(x, start, chunk)
        fresh = (start + jnp.arange(chunk)) >= c * chunk
        cost = squared_distances(rows, prototypes)
        weights = jax.nn.softmax(jnp.where(mask, (g - cost) / eps, -jnp.inf), axis=1)
        weights = jnp.where(fresh[:, None], weights, 0.0)
        sums = sums + jnp.dot(weights.T, rows, precision=jax.lax.Precision.HIGHEST)
        return sums, counts + weights.sum(0), soft_cost + jnp.sum(weights * cost)

    init = (jnp.zeros_like(prototypes), jnp.zeros(prototypes.shape[0], x.dtype), jnp.zeros((), x.dtype))
    return jax.lax.fori_loop(0, num_chunks, body, init)


def _weighted_sums_dense(x, cost, g, eps, mask):
    weights = jax.nn.softmax(jnp.where(mask, (g - cost) / eps, -jnp.inf), axis=1)
    sums = jnp.dot(weights.T, x, precision=jax.lax.Precision.HIGHEST)
    return sums, weights.sum(0), jnp.sum(weights * cost)


def _min_sq_distance_mean(x, prototypes, mask, chunk: int):
    """mean_i min_j ||x_i - p_j||^2 over the unmasked prototypes, chunked like the update."""
    n = x.shape[0]
    num_chunks = -(-n // chunk)

    def body(c, total):
        start = jnp.minimum(c * chunk, n - chunk)
        rows = jax.lax.dynamic_slice_in_dim(x, start, chunk)
        fresh = (start + jnp.arange(chunk)) >= c * chunk
        nearest = jnp.min(jnp.where(mask, squared_distances(rows, prototypes), jnp.inf), axis=1)
        return total + jnp.sum(jnp.where(fresh, nearest, 0.0))

    return jax.lax.fori_loop(0, num_chunks, body, jnp.zeros((), x.dtype)) / n


def _fit(x, init_prototypes, mask, epsilon, tol, *, max_iters: int, chunk: int, dense: bool,
         sinkhorn_threshold: float, sinkhorn_max_iters: int):
    """One Sinkhorn K-means run from `init_prototypes` (K, D); `mask` (K,) marks the live ones."""
    n, k = x.shape[0], init_prototypes.shape[0]
    scale = total_variance(x)
    eps = epsilon * scale
    a = jnp.full((n,), 1.0 / n, x.dtype)
    b = jnp.where(mask, 1.0, 0.0).astype(x.dtype)
    b = b / b.sum()  # uniform 1/K over the live prototypes, 0 on the padding
    solver = sinkhorn.Sinkhorn(threshold=sinkhorn_threshold, max_iterations=sinkhorn_max_iters)

    def step(state):
        iteration, prototypes, f, g = state[:4]
        if dense:
            cost = squared_distances(x, prototypes)
            geom = geometry.Geometry(cost_matrix=cost, epsilon=eps)
        else:
            geom = pointcloud.PointCloud(x, prototypes, epsilon=eps, batch_size=chunk)
        # Warm start from the last potentials: the prototypes move little between iterations.
        out = solver(linear_problem.LinearProblem(geom, a=a, b=b), init=(f, g))
        g_new = jnp.where(mask, out.g, -jnp.inf)
        if dense:
            sums, counts, soft_cost = _weighted_sums_dense(x, cost, g_new, eps, mask)
        else:
            sums, counts, soft_cost = _weighted_sums_online(x, prototypes, g_new, eps, mask, chunk)
        alive = mask & (counts > 0)
        moved = jnp.where(alive[:, None], sums / jnp.where(alive, counts, 1.0)[:, None], prototypes)
        shift = jnp.sqrt(jnp.max(jnp.sum((moved - prototypes) ** 2, axis=1)) / scale)
        return (iteration + 1, moved, out.f, jnp.where(mask, out.g, 0.0), shift, out.converged,
                out.n_iters, soft_cost / n, counts, g_new)

    def keep_going(state):
        iteration, shift = state[0], state[4]
        return (iteration < max_iters) & (shift > tol)

    state = (jnp.zeros((), jnp.int32), init_prototypes, jnp.zeros((n,), x.dtype), jnp.zeros((k,), x.dtype),
             jnp.asarray(jnp.inf, x.dtype), jnp.asarray(False), jnp.zeros((), jnp.int32),
             jnp.zeros((), x.dtype), jnp.zeros((k,), x.dtype), jnp.zeros((k,), x.dtype))
    iterations, prototypes, _, _, shift, sk_converged, sk_iters, soft_objective, counts, g = jax.lax.while_loop(
        keep_going, step, state)
    result = KMeansResult(iterations=iterations, shift=shift, converged=shift <= tol,
                          sinkhorn_converged=sk_converged, sinkhorn_iterations=sk_iters,
                          objective=_min_sq_distance_mean(x, prototypes, mask, chunk),
                          soft_objective=soft_objective, epsilon=eps, cluster_sizes=counts,
                          potentials=g)
    return prototypes, result


_STATIC = ("max_iters", "chunk", "dense", "sinkhorn_threshold", "sinkhorn_max_iters")
_fit_jit = jax.jit(_fit, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC + ("k_max", "parallel"))
def _sweep_program(x, rng, ks, epsilon, tol, *, k_max: int, parallel: bool, **static):
    init = kmeans_plus_plus(x, k_max, rng)
    masks = jnp.arange(k_max)[None, :] < ks[:, None]
    fit = functools.partial(_fit, **static)
    if parallel:  # one batched program: the distance matmuls of all runs fuse into one
        return jax.vmap(fit, in_axes=(None, None, 0, None, None))(x, init, masks, epsilon, tol)
    # Runs one after another inside the program: the memory of a single run.
    return jax.lax.map(lambda mask: fit(x, init, mask, epsilon, tol), masks)


_kmeans_plus_plus_jit = jax.jit(kmeans_plus_plus, static_argnames=("k",))


def _static_options(n: int, d: int, k_runs: int, k_max: int, itemsize: int, chunk_size, dense_cost_bytes,
                    max_iters, sinkhorn_threshold, sinkhorn_max_iters) -> dict:
    if chunk_size is None:
        chunk_size = 4096
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise UserInputError(f"chunk_size = {chunk_size!r}: expected a positive integer")
    if not isinstance(max_iters, (int, np.integer)) or max_iters < 1:
        raise UserInputError(f"max_iters = {max_iters!r}: expected a positive integer")
    # Store the (N, K) cost when it is no larger than the bank (K <= D) or fits the budget; an
    # explicit budget (0 forces the online PointCloud) overrides the K <= D rule.
    cost_bytes = n * k_max * itemsize * k_runs
    dense = cost_bytes <= (max(n * d * itemsize, DEFAULT_DENSE_COST_BYTES) if dense_cost_bytes is None
                           else dense_cost_bytes)
    return dict(max_iters=int(max_iters), chunk=int(min(chunk_size, n)), dense=bool(dense),
                sinkhorn_threshold=float(sinkhorn_threshold), sinkhorn_max_iters=int(sinkhorn_max_iters))


def sinkhorn_kmeans(x, k: int, *, rng: jax.Array, epsilon: float = DEFAULT_EPSILON, max_iters: int = 100,
                    tol: float = 1e-4, chunk_size: int | None = None, init=None,
                    sinkhorn_threshold: float = 1e-3, sinkhorn_max_iters: int = 2000,
                    dense_cost_bytes: int | None = None) -> tuple[jax.Array, KMeansResult]:
    """Cluster the rows of `x` (N, D) into `k` balanced prototypes.

    epsilon: entropic regularization relative to the bank's total variance (module docstring).
    tol: stop when the largest prototype move, relative to sqrt(total variance), is <= tol.
    chunk_size: rows per block of the online cost (only used when the (N, K) cost is not stored).
    dense_cost_bytes: budget for storing the (N, K) cost; None: max(bank size, 2 GiB); 0: online.
    init: optional (k, D) starting prototypes instead of k-means++ from `rng`.
    Returns (prototypes (k, D), KMeansResult).
    """
    k = _check_k(k)
    x = _check_bank(x, k)
    n, d = x.shape
    if init is None:
        init = _kmeans_plus_plus_jit(x, k=k, rng=rng)
    else:
        init = jnp.asarray(init, x.dtype)
        if init.shape != (k, d):
            raise UserInputError(f"init: expected ({k}, {d}) prototypes (K, D of x), got shape {tuple(init.shape)}")
    static = _static_options(n, d, 1, k, x.dtype.itemsize, chunk_size, dense_cost_bytes, max_iters,
                             sinkhorn_threshold, sinkhorn_max_iters)
    return _fit_jit(x, init, jnp.ones((k,), bool), jnp.asarray(epsilon, x.dtype), jnp.asarray(tol, x.dtype),
                    **static)


class SweepResult(NamedTuple):
    """Per-K results of `sweep_k`, in the order of `ks`."""

    ks: tuple[int, ...]
    prototypes: list[jax.Array]  # prototypes[i]: (ks[i], D)
    objective: jax.Array  # (len(ks),) mean min squared distance at the final prototypes
    result: KMeansResult  # every field stacked over the sweep (cluster_sizes padded to max K)


def sweep_k(x, ks: Sequence[int], *, rng: jax.Array, epsilon: float = DEFAULT_EPSILON, max_iters: int = 100,
            tol: float = 1e-4, chunk_size: int | None = None, sinkhorn_threshold: float = 1e-3,
            sinkhorn_max_iters: int = 2000, dense_cost_bytes: int | None = None,
            parallel: bool = False) -> SweepResult:
    """Sinkhorn K-means for every K in `ks` on one bank, as one compiled program (runs padded to
    max(ks); sequential in-program by default, with the memory of one run; `parallel` vmaps the runs,
    which on CPU is slower: a batched while-loop runs every K until the slowest Sinkhorn solve
    ends); run i equals `sinkhorn_kmeans(x, ks[i], rng=rng, ...)`."""
    ks = tuple(_check_k(k) for k in ks)
    if not ks:
        raise UserInputError("ks: expected at least one cluster count")
    k_max = max(ks)
    x = _check_bank(x, k_max)
    n, d = x.shape
    static = _static_options(n, d, len(ks) if parallel else 1, k_max, x.dtype.itemsize, chunk_size, dense_cost_bytes, max_iters,
                             sinkhorn_threshold, sinkhorn_max_iters)
    prototypes, result = _sweep_program(x, rng, jnp.asarray(ks, jnp.int32), jnp.asarray(epsilon, x.dtype),
                                        jnp.asarray(tol, x.dtype), k_max=k_max, parallel=bool(parallel),
                                        **static)
    return SweepResult(ks=ks, prototypes=[prototypes[i, :k] for i, k in enumerate(ks)],
                       objective=result.objective, result=result)
