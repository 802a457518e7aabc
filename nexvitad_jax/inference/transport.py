"""The transport solve of Sinkhorn K-means: entropic OT between the N points (mass 1/N each) and
K prototypes (1/K each) on the squared Euclidean cost, warm-started from the last iteration.

With N >> K, the transport rows only depend on the K target potentials g:
w_ij = softmax_j((g_j - C_ij) / eps), and g maximizes the concave semi-dual
F(g) = sum_j b_j g_j - eps sum_i a_i logsumexp_j((g_j - C_ij) / eps), whose gradient is the column
marginal error b - sum_i a_i w_i and whose Hessian is the K x K matrix
-(diag(sum_i a_i w_i) - sum_i a_i w_i w_i^T) / eps. Sinkhorn's alternating updates converge
linearly, and slowly on banks of well-separated modes; damped Newton on F converges in a few passes
because F is only K-dimensional: each pass is one sweep over the (N, K) cost plus a K x K Cholesky
solve, its Hessian from the bank's every stride-th row (the gradient and the stopping test use
every row; the subsample's costs are computed once per solve, and being rows of the whole bank it
does not depend on the blocking or on how the rows are spread over devices). A warm-up on a
strided subsample of the bank takes the large early steps at a fraction of a full pass's cost.
OTT-JAX's Sinkhorn then starts from Newton's potentials: it checks the marginal error against its
threshold (after one iteration) and keeps iterating where Newton stopped short, so the solution and
the convergence flag are Sinkhorn's. Newton runs up to
`SolverOptions.newton_max_k` (its Hessian costs rows x K^2 per pass); above, Sinkhorn alone.

Memory: passes go over the bank block by block (`BankBlocks`). The (N, K) cost is either stored
(OTT's dense `Geometry`) or recomputed in every pass, the Sinkhorn part's too
(`_PointCloudInBlocks`), so the footprint stays O(N*D + K*D + chunk*K).

Over devices: the bank's rows may be spread over a mesh axis (`Shard`, inside `jax.shard_map`);
every pass then runs on each device's rows and its reductions (the column marginal, the Hessian,
the gain) are summed across devices, and OTT's Sinkhorn runs on a geometry whose sums over the rows
span the devices (`_DenseAcrossDevices`, `_PointCloudInBlocks`). The potentials g and the K x K
system are replicated; the row potentials and the costs stay with their rows.

The measurements behind these choices are in `benchmarks/results/kmeans.json` (`notes`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from nexvitad_jax.inference._ott_compat import geometry, linear_problem, pointcloud, sinkhorn
from nexvitad_jax.inference.kmeans_options import SolverOptions

HIGHEST = jax.lax.Precision.HIGHEST


def squared_distances_from_norms(x, x_sq, prototypes, p_sq) -> jax.Array:
    """(N, D) points, (N,) their squared norms, (K, D) prototypes, (K,) theirs -> the (N, K)
    squared Euclidean distances as one matmul, clamped at 0 (norms given: a bank's are computed
    once per fit)."""
    return jnp.maximum(x_sq[:, None] + p_sq[None, :] - 2.0 * jnp.dot(x, prototypes.T, precision=HIGHEST), 0.0)


class Shard(NamedTuple):
    """Which rows of the whole bank this device holds. On one device (`axis` None) it holds them all.
    Spread over a mesh axis (inside `jax.shard_map`), each device holds `local` consecutive rows
    from global row `offset`; the bank is padded at its end to a multiple of the device count, so
    the real rows of a device are a prefix of its rows (`real` of them) and a pass over the bank is
    every device's pass over its rows followed by one `sum` of the reductions across devices."""

    axis: str | None
    offset: jax.Array | int  # the global index of this device's first row
    real: jax.Array | None  # how many of this device's rows are real (None: all of them)
    total: int  # real rows of the whole bank: N

    @classmethod
    def whole(cls, n: int) -> Shard:
        return cls(None, 0, None, n)

    @classmethod
    def split(cls, axis: str, local: int, total: int) -> Shard:
        """This device's share inside shard_map over `axis`: rows [i local, (i + 1) local)."""
        offset = jax.lax.axis_index(axis) * local
        return cls(axis, offset, jnp.clip(total - offset, 0, local), total)

    def sum(self, tree):
        """Sums of this device's rows -> sums of the whole bank's (every device gets them)."""
        return tree if self.axis is None else jax.lax.psum(tree, self.axis)

    def mask(self, local: int) -> jax.Array | None:
        """(local,) bool: the real rows among this device's (None: all are real)."""
        return None if self.real is None else jnp.arange(local) < self.real

    def mean(self, values: jax.Array) -> jax.Array:
        """The mean over the whole bank's real rows of per-row `values` (local rows on axis 0)."""
        if self.axis is None:
            return jnp.mean(values, axis=0)
        return self.sum(jnp.sum(self.where_real(values, 0.0), axis=0)) / self.total

    def where_real(self, values: jax.Array, fill) -> jax.Array:
        """Per-row `values` (rows on axis 0) with the padding rows set to `fill`."""
        real = self.mask(values.shape[0])
        return values if real is None else jnp.where(real.reshape(-1, *[1] * (values.ndim - 1)), values, fill)

    def strided(self, stride: int, local: int):
        """The whole bank's every stride-th row (global rows 0, stride, 2 stride, ...): (selector of
        this device's rows among them, their Shard: a bank of its own of ceil(N / stride) rows)."""
        if self.axis is None:
            return slice(None, None, stride), Shard.whole(-(-self.total // stride))
        first = (-self.offset) % stride  # this device's first global multiple of stride
        rows = first + stride * jnp.arange(-(-local // stride))
        real = jnp.sum(rows < self.real)
        return jnp.minimum(rows, local - 1), Shard(self.axis, (self.offset + first) // stride, real,
                                                   -(-self.total // stride))

    def take(self, index, *arrays):
        """Global row `index` (the same on every device) of each of `arrays` (this device's rows on
        axis 0), on every device: the device holding it sends it, the others send zeros."""
        if self.axis is None:
            return tuple(array[index] for array in arrays)
        local = index - self.offset
        mine = (local >= 0) & (local < arrays[0].shape[0])
        local = jnp.clip(local, 0, arrays[0].shape[0] - 1)
        return self.sum(tuple(jnp.where(mine, array[local], jnp.zeros_like(array[0])) for array in arrays))


class BankBlocks(NamedTuple):
    """The points (this device's rows of the bank), their squared norms and the blocking of every
    pass over them: `num_chunks` blocks of `chunk` rows, the last one moved back to end at the
    last row; `shard` says which rows of the whole bank they are."""

    x: jax.Array
    x_sq: jax.Array
    chunk: int
    num_chunks: int
    shard: Shard

    @classmethod
    def of(cls, x: jax.Array, x_sq: jax.Array, chunk: int, shard: Shard | None = None) -> BankBlocks:
        return cls(x, x_sq, chunk, -(-x.shape[0] // chunk), Shard.whole(x.shape[0]) if shard is None else shard)

    def every(self, stride: int) -> BankBlocks:
        """The whole bank's every stride-th row (this device's share of them), as one block."""
        selector, shard = self.shard.strided(stride, self.x.shape[0])
        rows = self.x[selector]
        return BankBlocks(rows, self.x_sq[selector], rows.shape[0], 1, shard)

    def rows(self, c):
        """Block c: (rows (chunk, D), squared norms, fresh (chunk,) bool, start); the rows an
        earlier block already covered, and padding rows, are not fresh."""
        if self.num_chunks == 1:  # the bank itself, not a sliced copy of it
            return self.x, self.x_sq, self.fresh(c), 0
        return self.slice(c, self.x), self.slice(c, self.x_sq), self.fresh(c), self.start(c)

    def start(self, c):
        return jnp.minimum(c * self.chunk, self.x.shape[0] - self.chunk)

    def fresh(self, c) -> jax.Array:
        """(chunk,) bool: the real rows of block c no earlier block covered."""
        if self.num_chunks == 1:
            real = self.shard.mask(self.chunk)
            return jnp.ones((self.chunk,), bool) if real is None else real
        index = self.start(c) + jnp.arange(self.chunk)
        fresh = index >= c * self.chunk
        return fresh if self.shard.real is None else fresh & (index < self.shard.real)

    def slice(self, c, stored: jax.Array, axis: int = 0) -> jax.Array:
        """Block c of an array stored for the whole bank (rows on `axis`)."""
        if self.num_chunks == 1:
            return stored
        return jax.lax.dynamic_slice_in_dim(stored, self.start(c), self.chunk, axis=axis)

    def blocks(self, body, init):
        """fori_loop(0, num_chunks, body, init) over this device's rows; a single block runs
        unlooped (on CPU a loop of sliced matmuls is slower than the one matmul)."""
        if self.num_chunks == 1:
            return body(0, init)
        return jax.lax.fori_loop(0, self.num_chunks, body, init)


class BlockCosts(NamedTuple):
    """Costs between the bank's rows and K prototypes, block by block: slices of the (N, K) costs
    stored for the whole bank, or (stored None) recomputed from the prototypes in every pass."""

    bank: BankBlocks
    stored: jax.Array | None  # (N, K)
    prototypes: jax.Array | None  # (K, D), when not stored
    prototypes_sq: jax.Array | None  # (K,) their squared norms
    mask: jax.Array | None = None  # (K,) live prototypes: recomputed costs are 0 on the others

    def __call__(self, c):
        """Block c: (rows, costs (chunk, K), fresh (chunk,) bool)."""
        rows, rows_sq, fresh, _ = self.bank.rows(c)
        if self.stored is not None:
            return rows, self.bank.slice(c, self.stored), fresh
        return rows, self._computed(rows, rows_sq), fresh

    def _computed(self, rows, rows_sq):
        cost = squared_distances_from_norms(rows, rows_sq, self.prototypes, self.prototypes_sq)
        return cost if self.mask is None else jnp.where(self.mask, cost, 0.0)

    def every(self, stride: int, rows: BankBlocks) -> BlockCosts:
        """The same costs on `rows`, the bank's every stride-th row (`BankBlocks.every`)."""
        stored = None if self.stored is None else self.stored[self.bank.shard.strided(stride, self.bank.x.shape[0])[0]]
        return self._replace(bank=rows, stored=stored)

    def stored_costs(self) -> jax.Array:
        """The (rows, K) costs of a bank of one block, computed once when they are not stored."""
        return self.stored if self.stored is not None else self._computed(self.bank.x, self.bank.x_sq)

    def geometry(self, eps) -> geometry.Geometry:
        """OTT's geometry of these costs: dense when stored, else computed block by block
        (`_PointCloudInBlocks`); over a mesh, its sums over the rows span every device."""
        axis = self.bank.shard.axis
        if self.stored is None:
            return _PointCloudInBlocks(self.bank.x, self.prototypes, epsilon=eps, batch_size=self.bank.chunk,
                                       axis_name=axis)
        if axis is None:
            return geometry.Geometry(cost_matrix=self.stored, epsilon=eps)
        return _DenseAcrossDevices(cost_matrix=self.stored, epsilon=eps, axis_name=axis)


def _lse_across_devices(out, eps, axis_name: str):
    """Per-column out_j = eps log sum_i exp((f_i + g_j - C_ij) / eps) - g_j over each device's rows
    -> the same over every device's rows (a log-sum-exp of the devices' values)."""
    top = jax.lax.pmax(out, axis_name)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    return top + eps * jnp.log(jax.lax.psum(jnp.exp((out - top) / eps), axis_name))


class _WithAxisName:
    """An OTT geometry holding this device's rows of the costs, its mesh axis a pytree aux field."""

    def __init__(self, *args, axis_name: str | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.axis_name = axis_name

    def tree_flatten(self):
        children, aux = super().tree_flatten()
        return children, {**aux, "axis_name": self.axis_name}


@jax.tree_util.register_pytree_node_class
class _DenseAcrossDevices(_WithAxisName, geometry.Geometry):
    """Stored costs of this device's rows: OTT's log-sum-exp over the rows (axis 0: Sinkhorn's
    column update and the column marginal its error is measured on) combines every device's, so
    OTT's own Sinkhorn runs unchanged on a bank spread over a mesh axis."""

    def apply_lse_kernel(self, f, g, eps, vec=None, axis=0):
        out, sign = super().apply_lse_kernel(f, g, eps, vec, axis)
        if axis == 1:
            return out, sign
        assert vec is None, "only Sinkhorn's unweighted log-sum-exp spans devices"
        return _lse_across_devices(out, eps, self.axis_name), sign


@jax.tree_util.register_pytree_node_class
class _PointCloudInBlocks(_WithAxisName, pointcloud.PointCloud):
    """Squared Euclidean costs recomputed in every pass, as the rest of the solver computes them
    (`squared_distances_from_norms`, HIGHEST precision), block by block of `batch_size` rows for both
    of Sinkhorn's log-sum-exps: memory O(batch_size K). (OTT's own online PointCloud sums over the
    rows one column batch at a time against all N rows, an (N, min(K, batch_size)) array, and at the
    default matmul precision, TF32 on recent GPUs.) With `axis_name`, the sums over the rows span
    every device of that mesh axis."""

    def apply_lse_kernel(self, f, g, eps, vec=None, axis=0):
        assert vec is None, "only Sinkhorn's unweighted log-sum-exp is computed in blocks"
        rows = BankBlocks.of(self.x, jnp.sum(self.x * self.x, axis=1), self._batch_size)
        y_sq = jnp.sum(self.y * self.y, axis=1)

        def exponents(c, fresh_only: bool):  # (f_i + g_j - C_ij) / eps on block c
            x, x_sq, fresh, _ = rows.rows(c)
            z = (rows.slice(c, f)[:, None] + g[None, :] - squared_distances_from_norms(x, x_sq, self.y, y_sq)) / eps
            return jnp.where(fresh[:, None], z, -jnp.inf) if fresh_only else z

        if axis == 1:  # per row, over the K columns (rows of the overlapping last block written twice)
            out = rows.blocks(lambda c, out: jax.lax.dynamic_update_slice_in_dim(
                out, eps * jax.nn.logsumexp(exponents(c, False), axis=1), rows.start(c), axis=0), jnp.zeros_like(f))
            return out - jnp.where(jnp.isfinite(f), f, 0.0), jnp.array([1.0])
        top, total = rows.blocks(functools.partial(_running_lse, functools.partial(exponents, fresh_only=True)),
                                 (jnp.full_like(g, -jnp.inf), jnp.zeros_like(g)))
        out = eps * (jnp.where(jnp.isfinite(top), top, 0.0) + jnp.log(total)) - jnp.where(jnp.isfinite(g), g, 0.0)
        return (out if self.axis_name is None else _lse_across_devices(out, eps, self.axis_name)), jnp.array([1.0])


def _running_lse(exponents, c, acc):
    """A column-wise log-sum-exp over row blocks, as a running (max, sum of exp(z - max))."""
    top, total = acc
    z = exponents(c)
    new_top = jnp.maximum(top, jnp.max(z, axis=0))
    shift = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
    return new_top, total * jnp.exp(top - shift) + jnp.sum(jnp.exp(z - shift), axis=0)


def transport_rows(mask, g, cost, eps):
    """(..., K) mask and potentials, (..., r, K) cost -> the (..., r, K) normalized transport rows
    w_ij = softmax_j((g_j - C_ij) / eps) and the (..., r) row log-normalizers logsumexp_j(...)."""
    logits = jnp.where(mask[..., None, :], (g[..., None, :] - cost) / eps, -jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    unnormalized = jnp.exp(logits - top)  # one exp for both outputs (exp dominates the pass on CPU)
    total = jnp.sum(unnormalized, axis=-1, keepdims=True)
    return unnormalized / total, (top + jnp.log(total))[..., 0]


# ---------------------------------------------------------------------------------------------
# Newton on the semi-dual


class _NewtonState(NamedTuple):
    g: jax.Array  # (K,) the current potentials
    lse: jax.Array  # (N,) row log-normalizers at g (this device's rows)
    newton: jax.Array  # (K,) the full Newton step from g
    gradient: jax.Array  # (K,) dF/dg at g (times eps)
    radius: jax.Array  # the trust radius, in units of eps
    done: jax.Array
    passes: jax.Array


class _SemiDual(NamedTuple):
    """The semi-dual F(g) of one run's transport problem and Newton's ascent on it."""

    costs: BlockCosts
    sample: jax.Array  # (rows, K) the costs of the Hessian's rows, the bank's every stride-th row
    sample_real: jax.Array | None  # (rows,) which of them are real (None: all)
    mask: jax.Array  # (K,) live prototypes
    live: jax.Array  # the mask as 0/1 floats
    b: jax.Array  # (K,) target marginal: uniform on the live prototypes
    eps: jax.Array
    threshold: float  # on the marginal error sum_j |mu_j - b_j|
    options: SolverOptions

    def evaluate(self, candidate):
        """One pass at `candidate`: the column marginal mu, the curvature (subsampled marginal and
        sum_i a_i w_i w_i^T) and the (N,) row log-normalizers."""
        bank = self.costs.bank
        zeros = (jnp.zeros_like(candidate), jnp.zeros((bank.x.shape[0],), candidate.dtype))
        mu, lse = bank.blocks(functools.partial(self._accumulate, candidate), zeros)
        sampled = transport_rows(self.mask, candidate, self.sample, self.eps)[0]
        if self.sample_real is not None:
            sampled = sampled * self.sample_real[:, None]
        mu, mu_sampled, hessian = bank.shard.sum((mu, sampled.sum(0), jnp.dot(sampled.T, sampled, precision=HIGHEST)))
        sampled_rows = jnp.sum(mu_sampled)  # each real row's weights sum to 1
        return mu / bank.shard.total, (mu_sampled / sampled_rows, hessian / sampled_rows), lse

    def _accumulate(self, candidate, c, acc):
        mu, lse_all = acc
        _, cost, fresh = self.costs(c)
        w, lse = transport_rows(self.mask, candidate, cost, self.eps)
        return (mu + jnp.sum(w * fresh[:, None], axis=0),
                jax.lax.dynamic_update_slice_in_dim(lse_all, lse, self.costs.bank.start(c), axis=0))

    def direction(self, mu, curvature):
        """The Newton step (eps H^-1 gradient) and the gradient at the evaluated point."""
        # diag(mu) - H is a graph Laplacian (rows sum to 0): the rank-one term fixes the free shift
        # of g, the small ridge keeps prototypes that hold no mass solvable, identity on masked ones.
        gradient = jnp.where(self.mask, self.b - mu, 0.0)
        mu_sampled, hessian = curvature
        matrix = jnp.diag(mu_sampled + 1e-3 * self.b + 1.0 - self.live) - hessian + jnp.outer(self.b, self.live)
        factor = jnp.linalg.cholesky(matrix)  # symmetric positive definite
        return self.eps * jax.scipy.linalg.cho_solve((factor, True), gradient) * self.live, gradient

    def keep_going(self, state: _NewtonState):
        return ~state.done & (state.passes < self.options.newton_steps)

    def step(self, state: _NewtonState) -> _NewtonState:
        """Try g + the Newton step shortened to the trust radius; accept on sufficient increase
        (Armijo), the gain measured row by row as the change of the row log-normalizers (not as a
        difference of two large sums)."""
        length = jnp.max(jnp.abs(state.newton)) / self.eps
        delta = state.newton * jnp.minimum(1.0, state.radius / jnp.maximum(length, 1e-30))
        candidate = state.g + delta
        mu, curvature, lse = self.evaluate(candidate)
        gain = jnp.sum(self.b * delta) - self.eps * self.costs.bank.shard.mean(lse - state.lse)
        error = jnp.sum(jnp.abs(mu - self.b))
        first = state.passes == 0  # the plain evaluation at g (no step yet) that starts a solve
        accept = first | (gain >= 1e-4 * jnp.sum(state.gradient * delta)) | (error <= self.threshold)
        newton, gradient = self.direction(mu, curvature)
        pick = lambda new, old: jnp.where(accept, new, old)
        # Trust radius: doubled after an accepted step, halved (below the step tried) after a rejected one.
        radius = jnp.where(accept, jnp.where(first, state.radius, jnp.minimum(2.0 * state.radius,
                                                                              self.options.newton_max_move)),
                           0.5 * jnp.minimum(state.radius, length))
        return _NewtonState(g=pick(candidate, state.g), lse=pick(lse, state.lse), newton=pick(newton, state.newton),
                            gradient=pick(gradient, state.gradient), radius=radius,
                            done=(accept & (error <= self.threshold)) | (radius < 1e-6) | ~jnp.isfinite(gain),
                            passes=state.passes + 1)


def newton_semi_dual(costs: BlockCosts, g, mask, eps, threshold: float, skip, options: SolverOptions):
    """Damped Newton ascent on the semi-dual F(g) of one run from potentials g (K,), mask (K,).

    Each step is one pass over `costs` (`_SemiDual.step`); the solve stops when the marginal error
    sum_j |mu_j - b_j| is below `threshold` (OTT's norm_error=1 criterion) or the step stalls;
    `skip` skips it. Returns (g, f, passes) with f_i = eps log a_i - eps lse_i the row potentials
    that go with g (meaningless when skipped).
    """
    n, k = costs.bank.shard.total, g.shape[0]
    live = mask.astype(g.dtype)
    rows = max(options.hessian_min_rows, min(options.hessian_rows_per_prototype * k, options.hessian_row_budget // k))
    # The Hessian's rows: the bank's every stride-th row, their costs computed once for the solve.
    stride = max(1, n // rows)
    sample = costs.every(stride, costs.bank.every(stride))
    problem = _SemiDual(costs, sample.stored_costs(), sample.bank.shard.mask(sample.bank.x.shape[0]), mask, live,
                        live / jnp.sum(live), eps, threshold, options)
    state = _NewtonState(g=g, lse=jnp.zeros((costs.bank.x.shape[0],), g.dtype), newton=jnp.zeros_like(g),
                         gradient=jnp.zeros_like(g), radius=jnp.asarray(options.newton_start_move, g.dtype),
                         done=skip, passes=jnp.zeros((), jnp.int32))
    state = jax.lax.while_loop(problem.keep_going, problem.step, state)
    return state.g, -eps * (state.lse + jnp.log(jnp.asarray(n, g.dtype))), state.passes


# ---------------------------------------------------------------------------------------------
# one run's solve: Newton, then OTT's Sinkhorn


class TransportRun(NamedTuple):
    """One run's transport problem (stacked over a group's runs for `lax.map`)."""

    stored: jax.Array | None  # (N, K) costs, 0 on masked prototypes; None: recomputed from `prototypes`
    prototypes: jax.Array | None  # (K, D)
    f: jax.Array  # (N,) last row potentials
    g: jax.Array  # (K,) last column potentials, shifted by the prototypes' moves
    mask: jax.Array  # (K,) live prototypes
    active: jax.Array  # () False: the run has finished, solve nothing


class TransportSolution(NamedTuple):
    """One run's solution (with leading run axes once stacked over a group or a sweep)."""

    f: jax.Array
    g: jax.Array
    converged: jax.Array  # met the Sinkhorn threshold
    sinkhorn_iterations: jax.Array
    newton_passes: jax.Array  # the warm-up's included


class GroupSolve(NamedTuple):
    """The transport solve of the runs of a group whose widest run has K = width: the bank, the
    regularization and what is decided once per group (Newton or not, its warm-up subsample)."""

    bank: BankBlocks
    warm_up: BankBlocks | None  # Newton's warm-up rows, every warm_up_stride-th row of the bank
    warm_up_stride: int
    eps: jax.Array
    use_newton: bool
    options: SolverOptions

    def __call__(self, run: TransportRun) -> TransportSolution:
        """One run's solve, warm-started from its last potentials (the prototypes move little
        between iterations): Newton, then OTT's Sinkhorn from Newton's potentials."""
        shard, dtype = self.bank.shard, self.bank.x.dtype
        prototypes_sq = None if run.prototypes is None else jnp.sum(run.prototypes * run.prototypes, axis=1)
        costs = BlockCosts(self.bank, run.stored, run.prototypes, prototypes_sq, run.mask)
        threshold = self.options.newton_tol_factor * self.options.sinkhorn_threshold
        f, g, passes = run.f, run.g, jnp.zeros((), jnp.int32)
        if self.warm_up is not None:  # most of a solve's steps on the subsample, then full passes from there
            g, _, passes = newton_semi_dual(costs.every(self.warm_up_stride, self.warm_up), g, run.mask, self.eps,
                                            threshold, ~run.active, self.options)
        if self.use_newton:
            g, f_newton, full_passes = newton_semi_dual(costs, g, run.mask, self.eps, threshold, ~run.active,
                                                        self.options)
            passes = passes + full_passes
            f = jnp.where(run.active, f_newton, f)  # a finished run restarts from its own solution
        # After Newton, Sinkhorn checks its error after every iteration (normally one); alone, every 10.
        solver = sinkhorn.Sinkhorn(threshold=self.options.sinkhorn_threshold,
                                   max_iterations=self.options.sinkhorn_max_iters,
                                   inner_iterations=1 if self.use_newton else 10)
        # Uniform 1/N on the real rows; padding rows carry no mass (and f = -inf: none in the updates).
        a = shard.where_real(jnp.full((self.bank.x.shape[0],), 1.0 / shard.total, dtype), 0.0)
        b = run.mask / jnp.sum(run.mask).astype(dtype)  # uniform 1/K, 0 on the padding
        out = solver(linear_problem.LinearProblem(costs.geometry(self.eps), a=a, b=b),
                     init=(shard.where_real(f, -jnp.inf), g))
        return TransportSolution(out.f, out.g, out.converged, out.n_iters, passes)


def group_solves(bank: BankBlocks, eps, widths, options: SolverOptions) -> list[GroupSolve]:
    """The solves of groups whose widest runs have K = widths[i]: Newton up to newton_max_k, with a
    warm-up on every stride-th row when that leaves >= 4x fewer rows (sliced here, once per stride,
    outside the iterations' loop)."""
    n = bank.shard.total
    subsamples: dict[int, BankBlocks] = {}
    solves = []
    for k in widths:
        use_newton = options.newton_steps > 0 and k <= options.newton_max_k
        sub_rows = max(options.newton_subsample_min_rows, options.newton_subsample_rows_per_prototype * k)
        stride = n // sub_rows if use_newton and n >= 4 * sub_rows else 0
        if stride and stride not in subsamples:
            subsamples[stride] = bank.every(stride)
        solves.append(GroupSolve(bank, subsamples.get(stride), stride, eps, use_newton, options))
    return solves
