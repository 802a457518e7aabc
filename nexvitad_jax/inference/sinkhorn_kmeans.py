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
error in ~350 passes over the 5 runs of the benchmark's sweep (2-24 per solve), each one pass over
the (N, K) cost plus a K x K Cholesky solve; its Hessian comes from a strided subsample of the rows
(the gradient and the stopping test use every row). Two things shorten the solves: a warm-up on
a strided subsample of the bank (~4096 rows) takes the large early steps at a fraction of the cost
(5-12% faster at N = 300,000), and the warm start is shifted by the prototypes' moves: moving p_j
to the weighted mean of its points lowers their weighted mean cost by exactly ||p_j^new - p_j||^2,
so g_j starts that much lower. OTT-JAX's Sinkhorn then starts from the Newton potentials: it
checks the marginal error against its threshold (after one iteration) and keeps iterating where
Newton stopped short, so the solution and the convergence flag are Sinkhorn's. Newton runs for
K <= NEWTON_MAX_K (its Hessian costs rows x K^2 per pass, HESSIAN_* below); above, Sinkhorn alone.
In a sweep each group of runs decides for itself.

k-means++ costs one pass over the bank per center, done naively; `kmeans_plus_plus` draws exactly
from D^2 with a pass every few centers (rejection sampling in between; its docstring): 40 centers
of the benchmark bank in 0.09 s instead of 0.35 s.

Memory: the (N, K) cost is materialized when it is no larger than the bank itself or fits
`dense_cost_bytes`; otherwise every pass recomputes it block by block (OTT's
`PointCloud(batch_size=chunk)` for the Sinkhorn part), so the footprint is O(N*D + K*D + chunk*K)
and N can exceed 10^6.

`sweep_k` fits many K on one bank as one compiled program, and in one pass over the bank per
iteration for all of them: the prototypes of every run are concatenated (sum K rows) for one
distance matmul and one weighted-mean matmul; the transport solves run one run after another
inside the program, each on its own (N, K) slice of the costs, so each stops on its own and none
pays for the largest K's width. Runs whose K differ by at most GROUP_PAD_RATIO share one compiled
solve (`lax.map`, padded to the group's largest K with masked prototypes of zero target mass), so
a sweep over many K compiles a few solves. A run whose prototypes stopped moving is frozen while
the others go on. k-means++ draws its t-th center from keys folded with t, so the first K centers
of a max(K) initialization are exactly the K-center initialization: a sweep run equals the run of
that K alone.
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
# Newton up to K = 4096 (measured at N = 31,360, D = 1024, first iteration from random prototypes:
# Newton 47 s, Sinkhorn alone 310 s); above, Sinkhorn alone.
NEWTON_MAX_K = 4096
NEWTON_MAX_MOVE = 32.0  # the trust radius of a Newton step: most it moves a potential, in units of eps
NEWTON_START_MOVE = 16.0  # the radius a solve starts with (both measured on the benchmark bank)
# Newton's Hessian from a strided subsample of ~8 rows per prototype (the gradient and the stopping
# test use every row): at K = 256, N = 31,360 ~1.8x faster per iteration for ~10% more passes.
HESSIAN_ROWS_PER_PROTOTYPE = 8
HESSIAN_MIN_ROWS = 4096  # and at least this many (K <= 512): ~1.5x fewer passes at K = 40 for ~nothing
# ... but rows x K at most this (from K = 1024 on: the Hessian costs rows x K^2; at K = 4096 with 4096
# rows a pass takes 1.4 s and a solve ~30 passes, with 8192 rows 2.2 s and ~60 passes).
HESSIAN_ROW_BUDGET = 1 << 23
NEWTON_TOL_FACTOR = 0.1  # Newton solves to 0.1x the Sinkhorn threshold: Sinkhorn confirms in one iteration
# Newton's warm-up subsample: max(4096, 32 K) rows, used when the bank has >= 4x as many.
NEWTON_SUBSAMPLE_MIN_ROWS = 4096
NEWTON_SUBSAMPLE_ROWS_PER_PROTOTYPE = 32
GROUP_PAD_RATIO = 1.25  # runs share a compiled transport solve when their K differ by at most this factor
KMEANS_PP_BLOCK = 16  # most centers drawn between two passes of k-means++ over the bank
KMEANS_PP_ATTEMPTS = 32  # rejections before a k-means++ draw brings its distances up to date
_BLOCK_ELEMENTS = 1 << 26  # (rows x padded prototypes) per block of a pass: one block up to N ~ 10^5
_HIGHEST = jax.lax.Precision.HIGHEST


class KMeansResult(NamedTuple):
    """Convergence information of one Sinkhorn K-means run (scalars; arrays of shape (S,) in a sweep)."""

    iterations: jax.Array  # outer (assignment/update) iterations run
    shift: jax.Array  # last max prototype move, relative to sqrt(total variance)
    converged: jax.Array  # shift <= tol before max_iters
    sinkhorn_converged: jax.Array  # the last transport solve met the Sinkhorn threshold
    sinkhorn_iterations: jax.Array  # Sinkhorn iterations of the last solve (after its Newton steps)
    newton_steps: jax.Array  # Newton passes of the last solve, its subsample warm-up included (0: Newton off)
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
    """k-means++ seeding: center t is drawn with probability ~ D^2, the squared distance to the
    nearest earlier center, from keys folded with t, so the first k centers do not depend on how
    many more are drawn.

    Exact D^2 sampling with a pass over the bank every few centers instead of every center (the
    passes are what k-means++ costs: one matrix-vector product over the bank per center). The
    nearest-center distances U are brought up to date when 2, 4, 8, 16, 32, 48, 64, ... centers are
    drawn (KMEANS_PP_BLOCK at most in between), each update one (N, D) x (D, KMEANS_PP_BLOCK) matmul. In
    between, center t is drawn by rejection: propose point i with probability ~ U_i (a binary search
    in the cumulative sum of U), accept it with probability D^2_i / U_i, D^2_i also counting the
    centers since the last update; an accepted proposal is distributed exactly ~ D^2. After
    KMEANS_PP_ATTEMPTS rejections U is brought up to date and the center drawn from it directly.
    """
    n, d = x.shape
    block = KMEANS_PP_BLOCK
    x_sq = jnp.sum(x * x, axis=1)
    first = jax.random.randint(jax.random.fold_in(rng, 0), (), 0, n)
    centers = jnp.zeros((k + block, d), x.dtype).at[0].set(x[first])  # room for a full pending block

    def pending_mask(t, synced):
        return jnp.arange(block) < t - synced

    def update(t, state):
        """U and its cumulative sum from every center before t (the pending ones since `synced`)."""
        centers, min_sq, _, synced = state
        pending = jax.lax.dynamic_slice_in_dim(centers, synced, block)
        distances = _distances_from_norms(x, x_sq, pending, jnp.sum(pending * pending, axis=1))
        min_sq = jnp.minimum(min_sq, jnp.min(jnp.where(pending_mask(t, synced), distances, jnp.inf), axis=1))
        return centers, min_sq, jnp.cumsum(min_sq), t

    def propose(key, cdf):
        """A point with probability ~ U (uniform when every U is 0: all points on centers)."""
        total = cdf[-1]
        index = jnp.searchsorted(cdf, jax.random.uniform(key, (), cdf.dtype) * total, side="right")
        return jnp.where(total > 0, jnp.minimum(index, n - 1), jax.random.randint(key, (), 0, n))

    def draw(t, state):
        state = jax.lax.cond(t - state[3] >= jnp.minimum(block, state[3]), functools.partial(update, t),
                             lambda state: state, state)
        centers, min_sq, cdf, synced = state
        pending = jax.lax.dynamic_slice_in_dim(centers, synced, block)
        key = jax.random.fold_in(rng, t)

        def attempt(carry):
            a, _, _ = carry
            proposal_key, accept_key = jax.random.split(jax.random.fold_in(key, a))
            index = propose(proposal_key, cdf)
            to_pending = jnp.where(pending_mask(t, synced), jnp.sum((pending - x[index]) ** 2, axis=1), jnp.inf)
            nearest = jnp.minimum(min_sq[index], jnp.min(to_pending))
            ratio = jnp.where(min_sq[index] > 0, nearest / min_sq[index], 1.0)  # U = 0 everywhere: uniform
            return a + 1, index, jax.random.uniform(accept_key, (), x.dtype) < ratio

        # Without pending centers U is D^2 and the first proposal is accepted.
        _, index, accepted = jax.lax.while_loop(
            lambda carry: ~carry[2] & (carry[0] < KMEANS_PP_ATTEMPTS), attempt,
            (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((), bool)))

        def exact(state):
            state = update(t, state)
            return state, propose(jax.random.fold_in(key, KMEANS_PP_ATTEMPTS), state[2])

        state, index = jax.lax.cond(accepted, lambda state: (state, index), exact, state)
        centers, *rest = state
        return centers.at[t].set(x[index]), *rest

    min_sq = _distances_from_norms(x, x_sq, centers[:1], jnp.sum(centers[:1] ** 2, axis=1))[:, 0]
    state = (centers, min_sq, jnp.cumsum(min_sq), jnp.ones((), jnp.int32))
    return jax.lax.fori_loop(1, k, draw, state)[0][:k]


@jax.jit
def transport_assignments(x, prototypes, result: KMeansResult) -> jax.Array:
    """(N, K) soft assignments w_ij = softmax_j((g_j - C_ij) / eps) of `x` under a run's last
    transport potentials (the normalized transport rows; rows of a masked prototype are 0)."""
    logits = (result.potentials - squared_distances(x, prototypes)) / result.epsilon
    return jax.nn.softmax(logits, axis=1)


class _Group(NamedTuple):
    """Runs whose transport solves share one compiled solve (`lax.map`), padded to the group's
    largest K with masked prototypes of zero target mass."""

    runs: np.ndarray  # (G,) run indices
    k: int  # the group's largest K: the width of its solves
    mask: np.ndarray  # (G, k) live prototypes
    columns: np.ndarray  # (G, k) compact column of each entry (0 where masked)

    @property
    def plain(self) -> bool:
        """One run, no padding: its costs are a slice of the compact costs."""
        return len(self.runs) == 1 and bool(self.mask.all())

    def cost(self, compact_cost: jax.Array) -> jax.Array:
        """(r, sum K) compact costs -> (G, r, k) this group's, 0 where masked."""
        if self.plain:
            start = int(self.columns[0, 0])
            return compact_cost[None, :, start:start + self.k]
        cost = jnp.moveaxis(jnp.take(compact_cost, self.columns, axis=-1), -2, 0)
        return jnp.where(self.mask[:, None, :], cost, 0.0)

    def live_columns(self, padded: jax.Array) -> jax.Array:
        """(G, r, k) -> (r, live entries), run after run."""
        if self.plain:
            return padded[0]
        flat = jnp.moveaxis(padded, 0, 1).reshape(padded.shape[1], -1)
        return jnp.take(flat, np.flatnonzero(self.mask.reshape(-1)), axis=1)


class _Runs:
    """The static layout of S runs with cluster counts `ks`. Prototypes are concatenated
    ("compact", sum K rows, run after run) for the matmuls; per-run state is padded to (S, max K)
    with a mask. The transport solves go by groups of runs whose K differ by at most
    GROUP_PAD_RATIO (padding wastes <= 25% of a group's passes; each group compiles one solve)."""

    def __init__(self, ks: tuple[int, ...]):
        self.ks, self.k_max = ks, max(ks)
        self.offsets = np.cumsum([0, *ks[:-1]])
        self.mask = np.arange(self.k_max)[None, :] < np.asarray(ks)[:, None]  # (S, K)
        self.gather = np.where(self.mask, self.offsets[:, None] + np.arange(self.k_max)[None, :], 0)  # padded <- compact
        self.run = np.repeat(np.arange(len(ks)), ks)  # run of each compact row
        self.first_centers = np.concatenate([np.arange(k) for k in ks])  # compact rows of a max-K init
        self.groups: list[_Group] = []
        order = sorted(range(len(ks)), key=lambda i: (ks[i], i))
        while order:
            size = sum(ks[i] <= GROUP_PAD_RATIO * ks[order[0]] for i in order)
            members = np.asarray(order[:size])
            k = max(ks[i] for i in members)
            self.groups.append(_Group(members, k, self.mask[members, :k], self.gather[members, :k]))
            order = order[size:]
        # The joint weighted-mean matmul takes its columns group after group: back to compact order.
        self.from_group_order = np.argsort(np.concatenate([g.columns[g.mask] for g in self.groups]))
        self.runs_from_group_order = np.argsort(np.concatenate([g.runs for g in self.groups]))

    def pad(self, compact_columns: jax.Array) -> jax.Array:
        """(..., sum K) -> (..., S, K); masked entries are copies (mask them)."""
        return jnp.take(compact_columns, self.gather, axis=-1)


def _map(fn, xs):
    """jax.lax.map, called directly for a single element (no loop around it)."""
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        return jax.tree.map(lambda a: a[None], fn(jax.tree.map(lambda a: a[0], xs)))
    return jax.lax.map(fn, xs)


class _Bank(NamedTuple):
    """The points, their squared norms and the blocking of every pass over them."""

    x: jax.Array
    x_sq: jax.Array
    chunk: int
    num_chunks: int

    def rows(self, c):
        """Block c: (rows (chunk, D), squared norms, fresh (chunk,) bool, start). The last block is
        moved back to end at N, and the rows an earlier block already covered are marked stale."""
        if self.num_chunks == 1:  # the bank itself, not a sliced copy of it
            return self.x, self.x_sq, self.fresh(c), 0
        return self.slice(c, self.x), self.slice(c, self.x_sq), self.fresh(c), self.start(c)

    def start(self, c):
        return jnp.minimum(c * self.chunk, self.x.shape[0] - self.chunk)

    def fresh(self, c) -> jax.Array:
        """(chunk,) bool: the rows of block c no earlier block covered."""
        if self.num_chunks == 1:
            return jnp.ones((self.x.shape[0],), bool)
        return (self.start(c) + jnp.arange(self.chunk)) >= c * self.chunk

    def slice(self, c, stored: jax.Array, axis: int = 0) -> jax.Array:
        """Block c of an array stored for the whole bank (rows on `axis`)."""
        if self.num_chunks == 1:
            return stored
        return jax.lax.dynamic_slice_in_dim(stored, self.start(c), self.chunk, axis=axis)

    def blocks(self, body, init):
        """fori_loop(0, num_chunks, body, init); a single block runs unlooped (a loop of sliced
        matmuls is ~2x slower on CPU than the one matmul)."""
        if self.num_chunks == 1:
            return body(0, init)
        return jax.lax.fori_loop(0, self.num_chunks, body, init)


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
    Hessian term sum_i a_i w_i w_i^T (from a strided subsample of the rows) and the row
    log-normalizers lse_i = logsumexp_j((g_j - C_ij)/eps), whose change against the current g's gives
    F(cand) - F(g) row by row (not as a difference of two large sums). delta is the Newton step
    shortened to a trust radius (at most NEWTON_MAX_MOVE eps per potential); a candidate is accepted
    on sufficient increase (Armijo). The solve stops when the marginal error sum_j |mu_j - b_j| is
    below `threshold` (OTT's norm_error=1 criterion) or the step stalls; `skip` skips it. Returns
    (g, f, passes) with f_i = eps log a_i - eps lse_i the row potentials that go with g (meaningless
    when skipped).
    """
    n = bank.x.shape[0]
    live = mask.astype(g.dtype)
    b = live / jnp.sum(live)
    k = g.shape[0]
    stride = max(1, n // max(HESSIAN_MIN_ROWS, min(HESSIAN_ROWS_PER_PROTOTYPE * k, HESSIAN_ROW_BUDGET // k)))

    def evaluate(candidate):
        def body(c, acc):
            mu, mu_sampled, hessian, lse_all = acc
            cost, fresh = cost_of_block(c)
            w, lse = _transport_rows(mask, candidate, cost, eps)
            # The subsample's rows are recomputed from its costs: w itself stays in the fused reduction.
            sampled = _transport_rows(mask, candidate, cost[::stride], eps)[0] * fresh[::stride, None]
            return (mu + jnp.sum(w * fresh[:, None], axis=0), mu_sampled + sampled.sum(0),
                    hessian + jnp.dot(sampled.T, sampled, precision=_HIGHEST),
                    jax.lax.dynamic_update_slice_in_dim(lse_all, lse, bank.start(c), axis=0))

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


def _weighted_sums(runs, bank, compact_cost_of_block, g, eps):
    """Sum_i w_ij x_i (compact, sum K x D), sum_i w_ij (compact, sum K) and sum_ij w_ij C_ij (S,),
    block by block: one (sum K, chunk) x (chunk, D) matmul per block for all runs; g: (S, max K)."""

    def body(c, acc):
        sums, counts, soft_cost = acc
        rows, compact_cost, fresh = compact_cost_of_block(c)
        weights, soft = [], []
        for group in runs.groups:
            cost = group.cost(compact_cost)
            w = _transport_rows(group.mask, g[group.runs, :group.k], cost, eps)[0] * fresh[None, :, None]
            weights.append(group.live_columns(w))
            soft.append(jnp.sum(w * cost, axis=(1, 2)))
        w = jnp.concatenate(weights, axis=1) if len(weights) > 1 else weights[0]  # (chunk, sum K), group order
        return (sums + jnp.dot(w.T, rows, precision=_HIGHEST), counts + w.sum(0),
                soft_cost + jnp.concatenate(soft))

    sum_k, d = len(runs.run), bank.x.shape[1]
    zeros = (jnp.zeros((sum_k, d), bank.x.dtype), jnp.zeros((sum_k,), bank.x.dtype),
             jnp.zeros((len(runs.ks),), bank.x.dtype))
    sums, counts, soft_cost = bank.blocks(body, zeros)
    return sums[runs.from_group_order], counts[runs.from_group_order], soft_cost[runs.runs_from_group_order]


def _min_sq_distance_mean(runs, bank, prototypes):
    """(S,) mean_i min_j ||x_i - p_j||^2 over each run's prototypes."""
    p_sq = jnp.sum(prototypes * prototypes, axis=1)

    def body(c, total):
        rows, rows_sq, fresh, _ = bank.rows(c)
        cost = _distances_from_norms(rows, rows_sq, prototypes, p_sq)
        nearest = jnp.stack([jnp.min(cost[:, start:start + k], axis=1) for start, k in zip(runs.offsets, runs.ks)])
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

    @functools.cache
    def subsample(stride: int) -> _Bank:
        """Every stride-th row of the bank (sliced once, outside the iterations' loop)."""
        rows = x[::stride]
        return _Bank(rows, bank.x_sq[::stride], rows.shape[0], 1)

    def make_solve(k: int):
        """The transport solve of a group whose widest run has K = k (all static)."""
        use_newton = newton_steps > 0 and k <= NEWTON_MAX_K
        # Newton's warm-up subsample: every sub_stride-th row, when that leaves >= 4x fewer rows.
        sub_rows = max(NEWTON_SUBSAMPLE_MIN_ROWS, NEWTON_SUBSAMPLE_ROWS_PER_PROTOTYPE * k)
        warm_up = None
        if use_newton and n >= 4 * sub_rows:
            warm_up = (subsample(n // sub_rows), n // sub_rows)
        # After Newton, Sinkhorn checks its error after every iteration (normally one); alone, every 10.
        solver = sinkhorn.Sinkhorn(threshold=sinkhorn_threshold, max_iterations=sinkhorn_max_iters,
                                   inner_iterations=1 if use_newton else 10)
        return functools.partial(solve, use_newton, warm_up, solver)

    def solve(use_newton, warm_up, solver, run):
        """One run's transport solve, warm-started from its last potentials (the prototypes move
        little between iterations): Newton, then OTT's Sinkhorn from Newton's potentials."""
        cost_or_prototypes, f, g, mask_run, active = run
        b = mask_run / jnp.sum(mask_run).astype(x.dtype)  # uniform 1/K, 0 on the padding
        if dense:
            geom = geometry.Geometry(cost_matrix=cost_or_prototypes, epsilon=eps)
            cost_of_block = lambda c: (bank.slice(c, cost_or_prototypes), bank.fresh(c))
        else:
            geom = pointcloud.PointCloud(x, cost_or_prototypes, epsilon=eps, batch_size=chunk)
            p_sq = jnp.sum(cost_or_prototypes * cost_or_prototypes, axis=1)

            def cost_of_block(c):
                rows, rows_sq, fresh, _ = bank.rows(c)
                return jnp.where(mask_run, _distances_from_norms(rows, rows_sq, cost_or_prototypes, p_sq), 0.0), fresh
        passes = jnp.zeros((), jnp.int32)
        if warm_up is not None:
            # Most of a solve's steps on the subsample, then full passes from there.
            sub_bank, sub_stride = warm_up
            if dense:
                sub_cost = lambda c: (cost_or_prototypes[::sub_stride], sub_bank.fresh(c))
            else:
                sub_cost = lambda c: (jnp.where(mask_run, _distances_from_norms(
                    sub_bank.x, sub_bank.x_sq, cost_or_prototypes, p_sq), 0.0), sub_bank.fresh(c))
            g, _, passes = _newton(sub_bank, sub_cost, g, mask_run, eps, NEWTON_TOL_FACTOR * sinkhorn_threshold,
                                   ~active, newton_steps)
        if use_newton:
            g, f_newton, full_passes = _newton(bank, cost_of_block, g, mask_run, eps,
                                               NEWTON_TOL_FACTOR * sinkhorn_threshold, ~active, newton_steps)
            passes = passes + full_passes
            f = jnp.where(active, f_newton, f)  # a finished run restarts from its own solution
        out = solver(linear_problem.LinearProblem(geom, a=a, b=b), init=(f, g))
        return out.f, out.g, out.converged, out.n_iters, passes

    solves = [make_solve(group.k) for group in runs.groups]

    def step(state):
        prototypes, active = state["prototypes"], state["active"]
        p_sq = jnp.sum(prototypes * prototypes, axis=1)
        compact_cost = _distances_from_norms(x, bank.x_sq, prototypes, p_sq) if dense else None  # (N, sum K)
        # Group after group, and one run after another within a group (their own stopping, small
        # arrays); the matmuls stay joint.
        f, g = state["f"], state["g"]
        g_new = jnp.zeros_like(g)
        reports = [jnp.zeros((s,), dtype) for dtype in (bool, jnp.int32, jnp.int32)]
        for group, solve_group in zip(runs.groups, solves):
            operand = group.cost(compact_cost) if dense else jnp.take(prototypes, group.columns, axis=0)
            f_group, g_group, *report = _map(solve_group, (operand, f[group.runs], g[group.runs, :group.k],
                                                           jnp.asarray(group.mask), active[group.runs]))
            f = f.at[group.runs].set(f_group)
            g_new = g_new.at[group.runs, :group.k].set(g_group)
            reports = [total.at[group.runs].set(part) for total, part in zip(reports, report)]
        sinkhorn_converged, sinkhorn_iterations, newton_passes = reports
        g_out = jnp.where(mask, g_new, -jnp.inf)

        def compact_cost_of_block(c):
            rows, rows_sq, _, _ = bank.rows(c)
            cost = bank.slice(c, compact_cost) if dense else _distances_from_norms(rows, rows_sq, prototypes, p_sq)
            return rows, cost, bank.fresh(c)

        sums, counts_compact, soft_cost = _weighted_sums(runs, bank, compact_cost_of_block, g_out, eps)
        alive = counts_compact > 0
        moved = jnp.where(alive[:, None], sums / jnp.where(alive, counts_compact, 1.0)[:, None], prototypes)
        moved_sq = runs.pad(jnp.sum((moved - prototypes) ** 2, axis=1))
        shift = jnp.sqrt(jnp.max(jnp.where(mask, moved_sq, 0.0), axis=1) / scale)
        # A finished run keeps its prototypes and its last solve's report.
        keep = lambda new, old: jnp.where(active.reshape(-1, *[1] * (new.ndim - 1)), new, old)
        iterations = state["iterations"] + active.astype(jnp.int32)
        shift = keep(shift, state["shift"])
        return {"prototypes": jnp.where(active[runs.run][:, None], moved, prototypes),
                "f": keep(f, state["f"]), "g": keep(jnp.where(mask, g_new - moved_sq, 0.0), state["g"]),
                "active": (iterations < max_iters) & (shift > tol), "iterations": iterations, "shift": shift,
                "sinkhorn_converged": keep(sinkhorn_converged, state["sinkhorn_converged"]),
                "sinkhorn_iterations": keep(sinkhorn_iterations, state["sinkhorn_iterations"]),
                "newton_steps": keep(newton_passes, state["newton_steps"]),
                "soft_objective": keep(soft_cost / n, state["soft_objective"]),
                "cluster_sizes": keep(jnp.where(mask, runs.pad(counts_compact), 0.0), state["cluster_sizes"]),
                "potentials": keep(g_out, state["potentials"])}

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
    # The (rows, sum K) compact costs of a block and the groups' (padded) copies of them.
    columns = 2 * sum(ks)
    if chunk_size is None:  # blocks of ~4M (row, prototype) pairs, as equal as N allows
        chunk_size = max(256, _BLOCK_ELEMENTS // columns)
    chunk_size = _check_count(chunk_size, "chunk_size", 1)
    chunk = -(-n // -(-n // min(chunk_size, n)))
    # Store the (N, K) costs when no larger than the bank or within the budget; an explicit budget
    # (0 forces the online PointCloud) overrides the bank-size rule.
    cost_bytes = n * columns * itemsize
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
