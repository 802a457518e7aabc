"""Sinkhorn K-means (the paper's section 3.2): balanced soft clustering of a feature bank.

Each iteration solves entropic optimal transport between the N points (uniform mass 1/N) and the
K prototypes (uniform mass 1/K) on the squared Euclidean cost, assigns every point softly by its
normalized transport row, and moves each prototype to the weighted mean of the points. Uniform
target marginals keep the clusters near N/K points each, where Lloyd's k-means lets a few dense
modes take most of the bank.

Epsilon is relative: the absolute entropic regularization is `epsilon * s2` with `s2` the bank's
total variance, mean_i ||x_i - mean(x)||^2 (the mean cost of sending every point to the
centroid). That keeps the sharpness of the soft assignment independent of the features' scale
(raw backbone features have norms in the tens to hundreds). The default 0.05 is a measured
trade-off: on a 64-mode synthetic bank (N = 4096, D = 256, K = 40, 5 iterations) 0.01 needs ~1900
Sinkhorn iterations per solve, 0.03 ~270, 0.1 ~70, with the same k-means objective within 2% and
cluster sizes within 1% of N/K at every setting. The prototype shift is measured the same way:
max_j ||p_j^new - p_j|| / sqrt(s2).

The transport solve. With N >> K, the transport rows only depend on the K target potentials g:
w_ij = softmax_j((g_j - C_ij) / eps), and g maximizes the concave semi-dual
F(g) = sum_j b_j g_j - eps sum_i a_i logsumexp_j((g_j - C_ij) / eps), whose gradient is the column
marginal error b - sum_i a_i w_i and whose Hessian is the K x K matrix
-(diag(sum_i a_i w_i) - sum_i a_i w_i w_i^T) / eps. Sinkhorn's alternating updates converge
linearly and slowly on banks of well-separated modes: warm-started from the last iteration's
potentials, ~3,100 Sinkhorn iterations over 10 iterations at K = 40 on the benchmark's 64-mode bank
(N = 31,360, D = 2048). Damped Newton on F, warm-started the same way, reaches the same marginal
error in ~100 passes (3-22 per solve), each one pass over the (N, K) cost plus a K x K Cholesky
solve. OTT-JAX's Sinkhorn then starts from the Newton potentials: it checks the marginal error
against its threshold (after one iteration) and keeps iterating where Newton stopped short, so the
solution and the convergence flag are Sinkhorn's. Newton runs for K <= NEWTON_MAX_K (its Hessian
costs N K^2 per pass); above, Sinkhorn alone (warm-started).

Memory: the (N, K) cost is materialized when it is no larger than the bank itself or fits
`dense_cost_bytes`; otherwise every pass recomputes it block by block (OTT's
`PointCloud(batch_size=chunk)` for the Sinkhorn part), so the footprint is O(N*D + K*D + chunk*K)
and N can exceed 10^6.

`sweep_k` fits many K on one bank as one compiled program, and in one pass over the bank per
iteration for all of them: the prototypes of every run are concatenated (sum K rows) for one
distance matmul and one weighted-mean matmul; the transport solves run one run after another
inside the program (`lax.map` over the runs padded to max K with masked prototypes of zero
target mass: each solve stops on its own, on arrays small enough for the cache, ~2x faster than
batching them), and a run whose prototypes stopped moving is frozen while the others go on.
k-means++ draws its t-th center from a key folded with t, so the first K centers of a max(K)
initialization are exactly the K-center initialization: a sweep run equals the run of that K alone.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference._ott_compat import geometry, linear_problem, pointcloud, sinkhorn

DEFAULT_EPSILON = 0.05
DEFAULT_DENSE_COST_BYTES = 2 << 30
NEWTON_MAX_K = 1024  # measured: at K = 1024 Newton is still ~1.7x faster than Sinkhorn alone
NEWTON_MAX_MOVE = 32.0  # the trust radius of a Newton step: most it moves a potential, in units of eps
NEWTON_START_MOVE = 16.0  # the radius a solve starts with (both measured on the benchmark bank)
# Newton's Hessian from a strided subsample of ~8 rows per prototype (the gradient and the stopping
# test use every row): at K = 256, N = 31,360 ~1.8x faster per iteration for ~10% more passes.
HESSIAN_ROWS_PER_PROTOTYPE = 8
_BLOCK_ELEMENTS = 1 << 26  # (rows x padded prototypes) per block of a pass: one block up to N ~ 10^5
_HIGHEST = jax.lax.Precision.HIGHEST


class KMeansResult(NamedTuple):
    """Convergence information of one Sinkhorn K-means run (scalars; arrays of shape (S,) in a sweep)."""

    iterations: jax.Array  # outer (assignment/update) iterations run
    shift: jax.Array  # last max prototype move, relative to sqrt(total variance)
    converged: jax.Array  # shift <= tol before max_iters
    sinkhorn_converged: jax.Array  # the last transport solve met the Sinkhorn threshold
    sinkhorn_iterations: jax.Array  # Sinkhorn iterations of the last solve (after its Newton steps)
    newton_steps: jax.Array  # Newton passes of the last solve (0 when Newton is off)
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


def _check_count(value, name: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserInputError(f"{name} = {value!r}: expected an integer >= {minimum}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# device functions


def squared_distances(x: jax.Array, prototypes: jax.Array) -> jax.Array:
    """(N, D), (K, D) -> (N, K) squared Euclidean distances as one matmul, clamped at 0."""
    return _distances_from_norms(x, jnp.sum(x * x, axis=-1), prototypes, jnp.sum(prototypes * prototypes, axis=-1))


def _distances_from_norms(x, x_sq, prototypes, p_sq):
    """squared_distances with the squared norms given (the bank's are computed once per fit)."""
    return jnp.maximum(x_sq[:, None] + p_sq[None, :] - 2.0 * jnp.dot(x, prototypes.T, precision=_HIGHEST), 0.0)


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
        cross = jnp.dot(x, center, precision=_HIGHEST)
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


class _Runs:
    """The static layout of S runs with cluster counts `ks`: prototypes concatenated ("compact",
    sum K rows, run after run) for the matmuls, padded to (S, max K) with a mask for the solves."""

    def __init__(self, ks: tuple[int, ...]):
        self.ks, self.k_max = ks, max(ks)
        offsets = np.cumsum([0, *ks[:-1]])
        self.mask = np.arange(self.k_max)[None, :] < np.asarray(ks)[:, None]  # (S, K)
        self.gather = np.where(self.mask, offsets[:, None] + np.arange(self.k_max)[None, :], 0)  # padded <- compact
        self.live = np.flatnonzero(self.mask.reshape(-1))  # compact <- flattened padded
        self.run = np.repeat(np.arange(len(ks)), ks)  # run of each compact row
        self.first_centers = np.concatenate([np.arange(k) for k in ks])  # compact rows of a max-K init

    def pad(self, compact_columns: jax.Array) -> jax.Array:
        """(..., sum K) -> (..., S, K); masked entries are copies (mask them)."""
        return jnp.take(compact_columns, self.gather, axis=-1)

    def compact(self, padded: jax.Array) -> jax.Array:
        """(..., S, K) -> (..., sum K)."""
        return jnp.take(padded.reshape(*padded.shape[:-2], -1), self.live, axis=-1)


class _Bank(NamedTuple):
    """The points, their squared norms and the blocking of every pass over them."""

    x: jax.Array
    x_sq: jax.Array
    chunk: int
    num_chunks: int

    def rows(self, c):
        """Block c: (rows (chunk, D), squared norms, fresh (chunk,) bool). The last block is moved
        back to end at N, and the rows an earlier block already covered are marked stale."""
        n = self.x.shape[0]
        if self.num_chunks == 1:  # the bank itself, not a sliced copy of it
            return self.x, self.x_sq, jnp.ones((n,), bool), 0
        start = jnp.minimum(c * self.chunk, n - self.chunk)
        fresh = (start + jnp.arange(self.chunk)) >= c * self.chunk
        return (jax.lax.dynamic_slice_in_dim(self.x, start, self.chunk),
                jax.lax.dynamic_slice_in_dim(self.x_sq, start, self.chunk), fresh, start)

    def blocks(self, body, init):
        """fori_loop(0, num_chunks, body, init); a single block runs unlooped (a loop of sliced
        matmuls is ~2x slower on CPU than the one matmul)."""
        if self.num_chunks == 1:
            return body(0, init)
        return jax.lax.fori_loop(0, self.num_chunks, body, init)


def _padded_cost(runs: _Runs, rows, rows_sq, prototypes, p_sq) -> jax.Array:
    """(r, D) rows, compact (sum K, D) prototypes -> (S, r, K) squared distances, 0 where masked."""
    cost = _distances_from_norms(rows, rows_sq, prototypes, p_sq)
    return jnp.where(runs.mask[:, None, :], jnp.moveaxis(runs.pad(cost), 1, 0), 0.0)


def _block_cost(bank, dense_cost, cost_of_rows):
    """cost_of_block(c) -> (cost of block c, rows, fresh): a slice (axis -2) of the stored cost, or
    `cost_of_rows(rows, rows_sq)` recomputed from the bank."""

    def cost_of_block(c):
        rows, rows_sq, fresh, start = bank.rows(c)
        if dense_cost is not None and bank.num_chunks == 1:
            return dense_cost, rows, fresh
        if dense_cost is not None:
            return jax.lax.dynamic_slice_in_dim(dense_cost, start, bank.chunk, axis=dense_cost.ndim - 2), rows, fresh
        return cost_of_rows(rows, rows_sq), rows, fresh

    return cost_of_block


def _transport_rows(mask, g, cost, eps):
    """(..., K) mask and potentials, (..., r, K) cost -> the (..., r, K) normalized transport rows
    w_ij = softmax_j((g_j - C_ij) / eps) and the (..., r) row log-normalizers logsumexp_j(...)."""
    logits = jnp.where(mask[..., None, :], (g[..., None, :] - cost) / eps, -jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    unnormalized = jnp.exp(logits - top)  # one exp for both outputs (~1.6x faster than two on CPU)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    return unnormalized / total, (top + jnp.log(total))[..., 0]


def _newton(bank, cost_of_block, g, mask, eps, threshold, skip, max_steps: int):
    """Damped Newton ascent on the semi-dual F(g) (module docstring) of one run: g, mask (K,).

    Each step is one pass: at the candidate g + delta it accumulates the column marginal mu, the
    Hessian term sum_i a_i w_i w_i^T and the row log-normalizers lse_i = logsumexp_j((g_j - C_ij)/eps),
    whose change against the current g's gives F(cand) - F(g) row by row (not as a difference of
    two large sums). delta is the Newton step shortened to a trust radius (at most NEWTON_MAX_MOVE
    eps per potential); a candidate is accepted on sufficient increase (Armijo). The solve stops when
    the marginal error sum_j |mu_j - b_j| is below `threshold` (OTT's norm_error=1 criterion) or the
    step stalls; `skip` skips it. Returns (g, f, passes) with f_i = eps log a_i - eps lse_i the row
    potentials that go with g (meaningless when skipped).
    """
    n = bank.x.shape[0]
    live = mask.astype(g.dtype)
    b = live / jnp.sum(live)

    # The Hessian from every stride-th row: ~HESSIAN_ROWS_PER_PROTOTYPE rows per prototype.
    stride = max(1, n // (HESSIAN_ROWS_PER_PROTOTYPE * g.shape[0]))

    def evaluate(candidate):
        def body(c, acc):
            mu, mu_sampled, hessian, lse_all = acc
            cost, _, fresh = cost_of_block(c)
            w, lse = _transport_rows(mask, candidate, cost, eps)
            w = w * fresh[:, None]
            sampled = w[::stride]
            start = jnp.minimum(c * bank.chunk, n - bank.chunk)
            return (mu + w.sum(0), mu_sampled + sampled.sum(0),
                    hessian + jnp.dot(sampled.T, sampled, precision=_HIGHEST),
                    jax.lax.dynamic_update_slice_in_dim(lse_all, lse, start, axis=0))

        zeros = (jnp.zeros_like(g), jnp.zeros_like(g), jnp.zeros(g.shape * 2, g.dtype), jnp.zeros((n,), g.dtype))
        mu, mu_sampled, hessian, lse = bank.blocks(body, zeros)
        sampled_rows = jnp.sum(mu_sampled)  # each fresh row's weights sum to 1
        return mu / n, (mu_sampled / sampled_rows, hessian / sampled_rows), lse

    def newton_direction(mu, curvature):
        # diag(mu) - H is a graph Laplacian (rows sum to 0): the rank-one term fixes the free shift
        # of g, the small ridge keeps prototypes that hold no mass solvable, identity on masked ones.
        gradient = jnp.where(mask, b - mu, 0.0)
        mu_sampled, hessian = curvature
        matrix = jnp.diag(mu_sampled + 1e-3 * b + 1.0 - live) - hessian + jnp.outer(b, live)
        factor = jnp.linalg.cholesky(matrix)  # symmetric positive definite
        return eps * jax.scipy.linalg.cho_solve((factor, True), gradient) * live, gradient

    def keep_going(state):
        return ~state["done"] & (state["passes"] < max_steps)

    def step(state):
        g, newton, radius = state["g"], state["newton"], state["radius"]
        # The Newton step, shortened to move no potential by more than radius * eps.
        length = jnp.max(jnp.abs(newton)) / eps
        delta = newton * jnp.minimum(1.0, radius / jnp.maximum(length, 1e-30))
        candidate = g + delta
        mu, hessian, lse = evaluate(candidate)
        gain = jnp.sum(b * delta) - eps * jnp.mean(lse - state["lse"])
        error = jnp.sum(jnp.abs(mu - b))
        first = state["passes"] == 0  # the plain evaluation at g (no step yet) that starts a solve
        accept = first | (gain >= 1e-4 * jnp.sum(state["gradient"] * delta)) | (error <= threshold)
        new_newton, gradient = newton_direction(mu, hessian)
        pick = lambda new, old: jnp.where(accept, new, old)
        # Trust radius: doubled after an accepted step, halved (below the step tried) after a rejected one.
        radius = jnp.where(accept, jnp.where(first, radius, jnp.minimum(2.0 * radius, NEWTON_MAX_MOVE)),
                           0.5 * jnp.minimum(radius, length))
        return {"g": pick(candidate, g), "lse": pick(lse, state["lse"]), "newton": pick(new_newton, newton),
                "gradient": pick(gradient, state["gradient"]), "radius": radius,
                "done": (accept & (error <= threshold)) | (radius < 1e-6) | ~jnp.isfinite(gain),
                "passes": state["passes"] + 1}

    state = {"g": g, "lse": jnp.zeros((n,), g.dtype), "newton": jnp.zeros_like(g), "gradient": jnp.zeros_like(g),
             "radius": jnp.asarray(NEWTON_START_MOVE, g.dtype), "done": skip, "passes": jnp.zeros((), jnp.int32)}
    state = jax.lax.while_loop(keep_going, step, state)
    return state["g"], -eps * (state["lse"] + jnp.log(jnp.asarray(n, g.dtype))), state["passes"]


def _weighted_sums(runs, bank, cost_of_block, g, eps):
    """Sum_i w_ij x_i (compact, sum K x D), sum_i w_ij (S, K) and sum_ij w_ij C_ij (S,), block by block:
    one (sum K, chunk) x (chunk, D) matmul per block for all runs."""

    def body(c, acc):
        sums, counts, soft_cost = acc
        cost, rows, fresh = cost_of_block(c)
        w = _transport_rows(jnp.asarray(runs.mask), g, cost, eps)[0] * fresh[None, :, None]
        w_compact = runs.compact(jnp.moveaxis(w, 0, 1))  # (chunk, sum K)
        return (sums + jnp.dot(w_compact.T, rows, precision=_HIGHEST), counts + w.sum(1),
                soft_cost + jnp.sum(w * cost, axis=(1, 2)))

    s, k, d = len(runs.ks), runs.k_max, bank.x.shape[1]
    zeros = (jnp.zeros((len(runs.run), d), bank.x.dtype), jnp.zeros((s, k), bank.x.dtype), jnp.zeros((s,), bank.x.dtype))
    return bank.blocks(body, zeros)


def _min_sq_distance_mean(runs, bank, prototypes):
    """(S,) mean_i min_j ||x_i - p_j||^2 over each run's prototypes."""
    p_sq = jnp.sum(prototypes * prototypes, axis=1)

    def body(c, total):
        rows, rows_sq, fresh, _ = bank.rows(c)
        cost = _padded_cost(runs, rows, rows_sq, prototypes, p_sq)
        nearest = jnp.min(jnp.where(runs.mask[:, None, :], cost, jnp.inf), axis=2)
        return total + jnp.sum(jnp.where(fresh, nearest, 0.0), axis=1)

    total = bank.blocks(body, jnp.zeros((len(runs.ks),), bank.x.dtype))
    return total / bank.x.shape[0]


def _fit(x, init, epsilon, tol, max_iters, *, ks: tuple[int, ...], chunk: int, dense: bool,
         sinkhorn_threshold: float, sinkhorn_max_iters: int, newton_steps: int):
    """Sinkhorn K-means runs for every K in `ks` from compact initial prototypes `init` (sum K, D)."""
    runs = _Runs(ks)
    n, s = x.shape[0], len(ks)
    bank = _Bank(x, jnp.sum(x * x, axis=1), chunk, -(-n // chunk))
    scale = total_variance(x)
    eps = epsilon * scale
    mask = jnp.asarray(runs.mask)
    a = jnp.full((n,), 1.0 / n, x.dtype)
    b = mask / jnp.sum(mask, axis=1, keepdims=True).astype(x.dtype)  # uniform 1/K, 0 on the padding
    use_newton = newton_steps > 0 and runs.k_max <= NEWTON_MAX_K
    # After Newton, Sinkhorn checks its error after every iteration (normally one); alone, every 10.
    solver = sinkhorn.Sinkhorn(threshold=sinkhorn_threshold, max_iterations=sinkhorn_max_iters,
                               inner_iterations=1 if use_newton else 10)

    def solve(run):
        """One run's transport solve, warm-started from its last potentials (the prototypes move
        little between iterations): Newton, then OTT's Sinkhorn from Newton's potentials."""
        cost_or_prototypes, f, g, mask_run, b_run, active = run
        if dense:
            geom = geometry.Geometry(cost_matrix=cost_or_prototypes, epsilon=eps)
            cost_of_block = _block_cost(bank, cost_or_prototypes, None)
        else:
            geom = pointcloud.PointCloud(x, cost_or_prototypes, epsilon=eps, batch_size=chunk)
            p_sq = jnp.sum(cost_or_prototypes * cost_or_prototypes, axis=1)
            cost_of_block = _block_cost(bank, None, lambda rows, rows_sq: jnp.where(
                mask_run, _distances_from_norms(rows, rows_sq, cost_or_prototypes, p_sq), 0.0))
        passes = jnp.zeros((), jnp.int32)
        if use_newton:
            g, f_newton, passes = _newton(bank, cost_of_block, g, mask_run, eps, 0.1 * sinkhorn_threshold, ~active,
                                          newton_steps)
            f = jnp.where(active, f_newton, f)  # a finished run restarts from its own solution
        out = solver(linear_problem.LinearProblem(geom, a=a, b=b_run), init=(f, g))
        return out.f, out.g, out.converged, out.n_iters, passes

    def step(state):
        prototypes, active = state["prototypes"], state["active"]
        p_sq = jnp.sum(prototypes * prototypes, axis=1)
        dense_cost = _padded_cost(runs, x, bank.x_sq, prototypes, p_sq) if dense else None
        # One run after another (their own stopping, small arrays); the matmuls stay joint.
        f, g, sinkhorn_converged, sinkhorn_iterations, newton_passes = jax.lax.map(solve, (
            dense_cost if dense else jnp.take(prototypes, runs.gather, axis=0), state["f"], state["g"], mask, b,
            active))
        g_out = jnp.where(mask, g, -jnp.inf)
        cost_of_block = _block_cost(bank, dense_cost, lambda rows, rows_sq: _padded_cost(runs, rows, rows_sq,
                                                                                           prototypes, p_sq))
        sums, counts, soft_cost = _weighted_sums(runs, bank, cost_of_block, g_out, eps)
        counts_compact = runs.compact(counts)
        alive = counts_compact > 0
        moved = jnp.where(alive[:, None], sums / jnp.where(alive, counts_compact, 1.0)[:, None], prototypes)
        moved_sq = runs.pad(jnp.sum((moved - prototypes) ** 2, axis=1))
        shift = jnp.sqrt(jnp.max(jnp.where(mask, moved_sq, 0.0), axis=1) / scale)
        # A finished run keeps its prototypes and its last solve's report.
        keep = lambda new, old: jnp.where(active.reshape(-1, *[1] * (new.ndim - 1)), new, old)
        iterations = state["iterations"] + active.astype(jnp.int32)
        shift = keep(shift, state["shift"])
        return {"prototypes": jnp.where(active[runs.run][:, None], moved, prototypes),
                "f": keep(f, state["f"]), "g": keep(jnp.where(mask, g, 0.0), state["g"]),
                "active": (iterations < max_iters) & (shift > tol), "iterations": iterations, "shift": shift,
                "sinkhorn_converged": keep(sinkhorn_converged, state["sinkhorn_converged"]),
                "sinkhorn_iterations": keep(sinkhorn_iterations, state["sinkhorn_iterations"]),
                "newton_steps": keep(newton_passes, state["newton_steps"]),
                "soft_objective": keep(soft_cost / n, state["soft_objective"]),
                "cluster_sizes": keep(counts, state["cluster_sizes"]), "potentials": keep(g_out, state["potentials"])}

    zeros = lambda *shape, dtype=x.dtype: jnp.zeros(shape, dtype)
    state = {"prototypes": init, "f": zeros(s, n), "g": zeros(s, runs.k_max), "active": jnp.ones((s,), bool),
             "iterations": zeros(s, dtype=jnp.int32), "shift": jnp.full((s,), jnp.inf, x.dtype),
             "sinkhorn_converged": zeros(s, dtype=bool), "sinkhorn_iterations": zeros(s, dtype=jnp.int32),
             "newton_steps": zeros(s, dtype=jnp.int32), "soft_objective": zeros(s),
             "cluster_sizes": zeros(s, runs.k_max), "potentials": zeros(s, runs.k_max)}
    state = jax.lax.while_loop(lambda state: jnp.any(state["active"]), step, state)
    result = KMeansResult(iterations=state["iterations"], shift=state["shift"], converged=state["shift"] <= tol,
                          sinkhorn_converged=state["sinkhorn_converged"],
                          sinkhorn_iterations=state["sinkhorn_iterations"], newton_steps=state["newton_steps"],
                          objective=_min_sq_distance_mean(runs, bank, state["prototypes"]),
                          soft_objective=state["soft_objective"], epsilon=jnp.broadcast_to(eps, (s,)),
                          cluster_sizes=state["cluster_sizes"], potentials=state["potentials"])
    return state["prototypes"], result


_STATIC = ("ks", "chunk", "dense", "sinkhorn_threshold", "sinkhorn_max_iters", "newton_steps")
_fit_jit = jax.jit(_fit, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _seeded_fit(x, rng, epsilon, tol, max_iters, **static):
    """k-means++ for max K, then every run from its first K centers: one program."""
    centers = kmeans_plus_plus(x, max(static["ks"]), rng)
    return _fit(x, centers[_Runs(static["ks"]).first_centers], epsilon, tol, max_iters, **static)


def _static_options(n: int, d: int, ks: tuple[int, ...], itemsize: int, chunk_size, dense_cost_bytes,
                    sinkhorn_threshold, sinkhorn_max_iters, newton_steps) -> dict:
    padded = len(ks) * max(ks)
    if chunk_size is None:  # blocks of ~4M (row, prototype) pairs, as equal as N allows
        chunk_size = max(256, _BLOCK_ELEMENTS // padded)
    chunk_size = _check_count(chunk_size, "chunk_size", 1)
    chunk = -(-n // -(-n // min(chunk_size, n)))
    # Store the (N, K) costs (and their compact copy) when no larger than the bank or within the
    # budget; an explicit budget (0 forces the online PointCloud) overrides the bank-size rule.
    cost_bytes = n * (padded + sum(ks)) * itemsize
    dense = cost_bytes <= (max(n * d * itemsize, DEFAULT_DENSE_COST_BYTES) if dense_cost_bytes is None
                           else dense_cost_bytes)
    return dict(ks=ks, chunk=int(chunk), dense=bool(dense),
                sinkhorn_threshold=float(sinkhorn_threshold),
                sinkhorn_max_iters=_check_count(sinkhorn_max_iters, "sinkhorn_max_iters", 1),
                newton_steps=_check_count(newton_steps, "newton_steps", 0))


def sinkhorn_kmeans(x, k: int, *, rng: jax.Array, epsilon: float = DEFAULT_EPSILON, max_iters: int = 100,
                    tol: float = 1e-4, chunk_size: int | None = None, init=None,
                    sinkhorn_threshold: float = 1e-3, sinkhorn_max_iters: int = 2000, newton_steps: int = 100,
                    dense_cost_bytes: int | None = None) -> tuple[jax.Array, KMeansResult]:
    """Cluster the rows of `x` (N, D) into `k` balanced prototypes.

    epsilon: entropic regularization relative to the bank's total variance (module docstring).
    tol: stop when the largest prototype move, relative to sqrt(total variance), is <= tol.
    sinkhorn_threshold: the transport solve's tolerance on the L1 error of the cluster masses.
    newton_steps: most Newton passes per solve before Sinkhorn goes on alone (0: Sinkhorn only).
    chunk_size: rows per block of the passes over the bank (None: ~4M row-prototype pairs).
    dense_cost_bytes: budget for storing the (N, K) cost; None: max(bank size, 2 GiB); 0: online.
    init: optional (k, D) starting prototypes instead of k-means++ from `rng`.
    Returns (prototypes (k, D), KMeansResult).
    """
    k = _check_k(k)
    x = _check_bank(x, k)
    n, d = x.shape
    static = _static_options(n, d, (k,), x.dtype.itemsize, chunk_size, dense_cost_bytes, sinkhorn_threshold,
                             sinkhorn_max_iters, newton_steps)
    # Traced, not static: runs that differ only in these share one compiled program.
    dynamic = (jnp.asarray(epsilon, x.dtype), jnp.asarray(tol, x.dtype), _check_count(max_iters, "max_iters", 1))
    if init is None:
        prototypes, result = _seeded_fit(x, rng, *dynamic, **static)
    else:
        init = jnp.asarray(init, x.dtype)
        if init.shape != (k, d):
            raise UserInputError(f"init: expected ({k}, {d}) prototypes (K, D of x), got shape {tuple(init.shape)}")
        prototypes, result = _fit_jit(x, init, *dynamic, **static)
    return prototypes, jax.tree.map(lambda field: field[0], result)


class SweepResult(NamedTuple):
    """Per-K results of `sweep_k`, in the order of `ks`."""

    ks: tuple[int, ...]
    prototypes: list[jax.Array]  # prototypes[i]: (ks[i], D)
    objective: jax.Array  # (len(ks),) mean min squared distance at the final prototypes
    result: KMeansResult  # every field stacked over the sweep (cluster_sizes, potentials padded to max K)


def sweep_k(x, ks: Sequence[int], *, rng: jax.Array, epsilon: float = DEFAULT_EPSILON, max_iters: int = 100,
            tol: float = 1e-4, chunk_size: int | None = None, sinkhorn_threshold: float = 1e-3,
            sinkhorn_max_iters: int = 2000, newton_steps: int = 100,
            dense_cost_bytes: int | None = None) -> SweepResult:
    """Sinkhorn K-means for every K in `ks` on one bank, as one compiled program that passes over
    the bank once per iteration for all K (module docstring); run i equals
    `sinkhorn_kmeans(x, ks[i], rng=rng, ...)`. Options as in `sinkhorn_kmeans`."""
    ks = tuple(_check_k(k) for k in ks)
    if not ks:
        raise UserInputError("ks: expected at least one cluster count")
    x = _check_bank(x, max(ks))
    n, d = x.shape
    static = _static_options(n, d, ks, x.dtype.itemsize, chunk_size, dense_cost_bytes, sinkhorn_threshold,
                             sinkhorn_max_iters, newton_steps)
    prototypes, result = _seeded_fit(x, rng, jnp.asarray(epsilon, x.dtype), jnp.asarray(tol, x.dtype),
                                     _check_count(max_iters, "max_iters", 1), **static)
    offsets = np.cumsum([0, *ks])
    return SweepResult(ks=ks, prototypes=[prototypes[offsets[i]:offsets[i + 1]] for i in range(len(ks))],
                       objective=result.objective, result=result)
