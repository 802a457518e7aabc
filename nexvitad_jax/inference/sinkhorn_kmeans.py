"""Sinkhorn K-means (the paper's section 3.2): balanced soft clustering of a feature bank.

Each iteration (`_iteration`) does the paper's three steps and a stopping test:
1. transport: entropic optimal transport between the N points (uniform mass 1/N) and the K
   prototypes (uniform mass 1/K) on the squared Euclidean cost (`transport.py`);
2. soft assignment: every point's weights are its normalized transport row;
3. weighted means: each prototype moves to the weighted mean of the points;
4. stop when no prototype moved by more than `tol` (relative to the bank's scale).
Uniform target marginals keep the clusters near N/K points each, where Lloyd's k-means lets a few
dense modes take most of the bank. Initialization: k-means++ (`kmeans_init.py`).

Epsilon is relative: the absolute entropic regularization is `epsilon * s2` with `s2` the bank's
total variance, mean_i ||x_i - mean(x)||^2 (the mean cost of sending every point to the
centroid). That keeps the sharpness of the soft assignment independent of the features' scale
(raw backbone features have norms in the tens to hundreds). The default 0.05 trades Sinkhorn
iterations (many more as epsilon shrinks) against the sharpness of the assignment, which barely
changes the k-means objective or the balance (measured: `benchmarks/results/kmeans.json`,
`notes`). The prototype shift is measured the same way: max_j ||p_j^new - p_j|| / sqrt(s2).

The warm start: each solve starts from the run's last potentials, g shifted by the prototypes'
moves: moving p_j to the weighted mean of its points lowers their weighted mean cost by exactly
||p_j^new - p_j||^2, so g_j starts that much lower.

`sweep_k` fits many K on one bank as one compiled program, and in one pass over the bank per
iteration for all of them (`SweepLayout`): the prototypes of every run are concatenated (sum K
rows) for one distance matmul and one weighted-mean matmul; the transport solves run one run after
another inside the program, each on its own (N, K) slice of the costs, so each stops on its own
and none pays for the largest K's width. Runs whose K differ by at most
`SolverOptions.group_pad_ratio` share one compiled solve (`SolveGroup`), so a sweep over many K
compiles a few solves. A run whose prototypes stopped moving is frozen while the others go on.
k-means++ draws its t-th center from keys folded with t, so the first K centers of a max(K)
initialization are exactly the K-center initialization: a sweep run equals the run of that K alone.

Over devices: a bank that is a jax.Array on several devices (split along its rows over the data
mesh, `nexvitad_jax.sharding.row_sharding`, or replicated) stays there (`_place_bank`): the fit runs
under `jax.shard_map` with each device holding about N / n rows (the bank padded at its end to a
multiple of the device count with rows of no mass), and per iteration the devices exchange only
reductions: the weighted-mean sums (sum K x D), K-vectors and Newton's K x K Hessian, never rows
(`transport.Shard`). Prototypes, potentials and Newton's system are replicated. The result is the
one-device result up to the order of the sums: the same k-means++ draws, the same Newton subsample.

Every solver knob is a field of `SolverOptions`, a static argument of the compiled fits.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.inference.kmeans_init import kmeans_plus_plus
from nexvitad_jax.inference.kmeans_options import DEFAULT_DENSE_COST_BYTES, SolverOptions
from nexvitad_jax.inference.transport import (HIGHEST, BankBlocks, BlockCosts, GroupSolve, Shard, TransportRun,
                                               TransportSolution, group_solves, squared_distances_from_norms,
                                               transport_rows)
from nexvitad_jax.sharding import DATA_AXIS, make_mesh, replicated, row_sharding

__all__ = ["DEFAULT_EPSILON", "KMeansResult", "SolverOptions", "SweepResult", "sinkhorn_kmeans", "squared_distances",
           "sweep_k", "total_variance", "transport_assignments"]

DEFAULT_EPSILON = 0.05


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
    """The bank on the device(s), checked. The bank enters (a host array) and the check's verdict
    leaves through explicit transfers, so a fit runs under `jax.transfer_guard("disallow")`."""
    x = x if isinstance(x, jax.Array) else jax.device_put(np.asarray(x))
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
    if not bool(jax.device_get(jnp.isfinite(x).all())):
        bad = int(jax.device_get(jnp.sum(~jnp.isfinite(x).all(axis=1))))
        raise UserInputError(f"{name}: {bad} of {n} points contain NaN or infinite values")
    return x


def _check_k(k) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UserInputError(f"K = {k!r}: expected a positive integer number of clusters")
    return int(k)


def _traced_arguments(x, epsilon, tol, max_iters, options) -> tuple:
    """epsilon, tol, max_iters as traced arguments (runs that differ only in them share one
    compiled program), after checking max_iters and the options."""
    if not isinstance(options, SolverOptions):
        raise UserInputError(f"options: expected a SolverOptions, got {type(options).__name__}")
    if isinstance(max_iters, (bool, np.bool_)) or not isinstance(max_iters, (int, np.integer)) or max_iters < 1:
        raise UserInputError(f"max_iters = {max_iters!r}: expected an integer >= 1")
    return np.asarray(epsilon, x.dtype), np.asarray(tol, x.dtype), np.asarray(max_iters, np.int32)


# ---------------------------------------------------------------------------------------------
# the cost and its scale


def squared_distances(x: jax.Array, prototypes: jax.Array) -> jax.Array:
    """(N, D), (K, D) -> (N, K) squared Euclidean distances as one matmul, clamped at 0."""
    return squared_distances_from_norms(x, jnp.sum(x * x, axis=-1), prototypes,
                                        jnp.sum(prototypes * prototypes, axis=-1))


def total_variance(x: jax.Array, shard: Shard | None = None) -> jax.Array:
    """mean_i ||x_i - mean(x)||^2: the cost scale epsilon and the shift are relative to. `x`: the
    rows of the bank `shard` says (default: the whole bank)."""
    shard = Shard.whole(x.shape[0]) if shard is None else shard
    centered = x - shard.mean(x)
    return jnp.maximum(shard.mean(jnp.sum(centered * centered, axis=1)), jnp.finfo(x.dtype).tiny)


@jax.jit
def transport_assignments(x, prototypes, result: KMeansResult) -> jax.Array:
    """(N, K) soft assignments w_ij = softmax_j((g_j - C_ij) / eps) of `x` under a run's last
    transport potentials (the normalized transport rows; rows of a masked prototype are 0)."""
    logits = (result.potentials - squared_distances(x, prototypes)) / result.epsilon
    return jax.nn.softmax(logits, axis=1)


# ---------------------------------------------------------------------------------------------
# the layout of a sweep's runs


class SolveGroup(NamedTuple):
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


class SweepLayout:
    """The static layout of S runs with cluster counts `ks`. Prototypes are concatenated
    ("compact", sum K rows, run after run) for the matmuls; per-run state is padded to (S, max K)
    with a mask. The transport solves go by groups of runs whose K differ by at most
    `group_pad_ratio` (a padded solve costs at most that factor of a run's own; each group
    compiles one solve)."""

    def __init__(self, ks: tuple[int, ...], group_pad_ratio: float):
        self.ks, self.k_max = ks, max(ks)
        self.offsets = np.cumsum([0, *ks[:-1]])
        self.mask = np.arange(self.k_max)[None, :] < np.asarray(ks)[:, None]  # (S, K)
        # padded <- compact
        self.gather = np.where(self.mask, self.offsets[:, None] + np.arange(self.k_max)[None, :], 0)
        self.run = np.repeat(np.arange(len(ks)), ks)  # run of each compact row
        self.first_centers = np.concatenate([np.arange(k) for k in ks])  # compact rows of a max-K init
        self.groups: list[SolveGroup] = []
        for members in _groups_by_k(ks, group_pad_ratio):
            k = max(ks[i] for i in members)
            self.groups.append(SolveGroup(members, k, self.mask[members, :k], self.gather[members, :k]))
        # The joint weighted-mean matmul takes its columns group after group: back to compact order.
        self.from_group_order = np.argsort(np.concatenate([g.columns[g.mask] for g in self.groups]))
        self.runs_from_group_order = np.argsort(np.concatenate([g.runs for g in self.groups]))

    def pad(self, compact_columns: jax.Array) -> jax.Array:
        """(..., sum K) -> (..., S, K); masked entries are copies (mask them)."""
        return jnp.take(compact_columns, self.gather, axis=-1)

    def block_rows(self, n: int, options: SolverOptions) -> int:
        """Rows per block of a pass: options.chunk_size, or about block_elements // (2 sum K) (a
        block's compact costs and the groups' padded copies of them), as equal as N allows."""
        chunk_size = options.chunk_size
        if chunk_size is None:
            chunk_size = max(256, options.block_elements // (2 * sum(self.ks)))
        return -(-n // -(-n // min(chunk_size, n)))

    def stores_costs(self, n: int, d: int, itemsize: int, options: SolverOptions) -> bool:
        """Store the (N, sum K) costs (and the groups' copies) when no larger than the bank or within
        DEFAULT_DENSE_COST_BYTES; an explicit dense_cost_bytes (0: always online) overrides that."""
        budget = options.dense_cost_bytes
        if budget is None:
            budget = max(n * d * itemsize, DEFAULT_DENSE_COST_BYTES)
        return n * 2 * sum(self.ks) * itemsize <= budget


def _groups_by_k(ks: tuple[int, ...], ratio: float) -> list[np.ndarray]:
    """Run indices by increasing K, cut into groups whose largest K is <= ratio x their smallest."""
    order, groups = sorted(range(len(ks)), key=lambda i: (ks[i], i)), []
    while order:
        size = sum(ks[i] <= ratio * ks[order[0]] for i in order)
        groups.append(np.asarray(order[:size]))
        order = order[size:]
    return groups


def _map_runs_in_turn(fn, xs):
    """jax.lax.map (one run after another); a single run is called directly, with no loop around it."""
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        return jax.tree.map(lambda a: a[None], fn(jax.tree.map(lambda a: a[0], xs)))
    return jax.lax.map(fn, xs)


# ---------------------------------------------------------------------------------------------
# the iterations


class _Fit(NamedTuple):
    """What every iteration of a fit reads."""

    layout: SweepLayout
    bank: BankBlocks
    scale: jax.Array  # the bank's total variance
    eps: jax.Array  # the absolute entropic regularization
    stores_costs: bool  # the (N, sum K) costs stored, else recomputed in every pass
    solves: list[GroupSolve]  # one per group of the layout
    tol: jax.Array
    max_iters: jax.Array


class _RunState(NamedTuple):
    """Per-run state (leading axis S), frozen once the run has finished."""

    f: jax.Array  # (S, N) row potentials of the last solve
    g: jax.Array  # (S, max K) its column potentials, shifted by the prototypes' moves: the warm start
    shift: jax.Array
    sinkhorn_converged: jax.Array
    sinkhorn_iterations: jax.Array
    newton_steps: jax.Array
    soft_objective: jax.Array
    cluster_sizes: jax.Array  # (S, max K)
    potentials: jax.Array  # (S, max K) the last solve's g, -inf on masked prototypes


class _State(NamedTuple):
    prototypes: jax.Array  # compact (sum K, D)
    active: jax.Array  # (S,) still iterating
    iterations: jax.Array  # (S,)
    runs: _RunState


def _iteration(fit: _Fit, state: _State) -> _State:
    """One Sinkhorn K-means iteration of every active run (module docstring, steps 1-4)."""
    mask = fit.layout.mask
    costs = _compact_costs(fit, state.prototypes)
    solved = _solve_transport(fit, state, costs.stored)
    potentials = jnp.where(mask, solved.g, -jnp.inf)
    sums, counts, soft_cost = _soft_assignment_sums(fit, costs, potentials)
    moved = _weighted_means(sums, counts, state.prototypes)
    moved_sq, shift = _moves(fit, moved, state.prototypes)
    runs = _RunState(f=solved.f, g=jnp.where(mask, solved.g - moved_sq, 0.0), shift=shift,
                     sinkhorn_converged=solved.converged, sinkhorn_iterations=solved.sinkhorn_iterations,
                     newton_steps=solved.newton_passes,
                     soft_objective=soft_cost / fit.bank.shard.total,
                     cluster_sizes=jnp.where(mask, fit.layout.pad(counts), 0.0), potentials=potentials)
    return _advance(fit, state, moved, runs)


def _compact_costs(fit: _Fit, prototypes) -> BlockCosts:
    """The costs to every run's prototypes (sum K columns): stored as one matmul, or per block."""
    p_sq = jnp.sum(prototypes * prototypes, axis=1)
    stored = None
    if fit.stores_costs:
        stored = squared_distances_from_norms(fit.bank.x, fit.bank.x_sq, prototypes, p_sq)  # (N, sum K)
    return BlockCosts(fit.bank, stored, prototypes, p_sq)


def _solve_transport(fit: _Fit, state: _State, compact_cost) -> TransportSolution:
    """Step 1: every run's transport solve, group after group, and one run after another within a
    group (their own stopping, small arrays); the solutions stacked over the runs (g padded to max K)."""
    f, g = state.runs.f, state.runs.g
    g_new = jnp.zeros_like(g)
    reports = [jnp.zeros((len(fit.layout.ks),), dtype) for dtype in (bool, jnp.int32, jnp.int32)]
    for group, solve in zip(fit.layout.groups, fit.solves):
        stored, prototypes = None, None
        if fit.stores_costs:
            stored = group.cost(compact_cost)
        else:
            prototypes = jnp.take(state.prototypes, group.columns, axis=0)
        run = TransportRun(stored, prototypes, f[group.runs], g[group.runs, :group.k], jnp.asarray(group.mask),
                           state.active[group.runs])
        solution = _map_runs_in_turn(solve, run)
        f = f.at[group.runs].set(solution.f)
        g_new = g_new.at[group.runs, :group.k].set(solution.g)
        report = (solution.converged, solution.sinkhorn_iterations, solution.newton_passes)
        reports = [total.at[group.runs].set(part) for total, part in zip(reports, report)]
    return TransportSolution(f, g_new, *reports)


def _soft_assignment_sums(fit: _Fit, costs: BlockCosts, g):
    """Step 2: with w_ij the normalized transport rows under potentials g (S, max K), the compact
    sum_i w_ij x_i (sum K, D) and sum_i w_ij (sum K), and each run's sum_ij w_ij C_ij (S,), block by
    block: one (sum K, chunk) x (chunk, D) matmul per block for all runs."""
    layout, dtype = fit.layout, fit.bank.x.dtype
    zeros = (jnp.zeros((len(layout.run), fit.bank.x.shape[1]), dtype), jnp.zeros((len(layout.run),), dtype),
             jnp.zeros((len(layout.ks),), dtype))
    sums, counts, soft_cost = fit.bank.shard.sum(
        fit.bank.blocks(functools.partial(_soft_assignment_block, fit, costs, g), zeros))
    return sums[layout.from_group_order], counts[layout.from_group_order], soft_cost[layout.runs_from_group_order]


def _soft_assignment_block(fit: _Fit, costs: BlockCosts, g, c, acc):
    sums, counts, soft_cost = acc
    rows, compact_cost, fresh = costs(c)
    weights, soft = [], []
    for group in fit.layout.groups:
        cost = group.cost(compact_cost)
        w = transport_rows(group.mask, g[group.runs, :group.k], cost, fit.eps)[0] * fresh[None, :, None]
        weights.append(group.live_columns(w))
        soft.append(jnp.sum(w * cost, axis=(1, 2)))
    w = jnp.concatenate(weights, axis=1) if len(weights) > 1 else weights[0]  # (chunk, sum K), group order
    return (sums + jnp.dot(w.T, rows, precision=HIGHEST), counts + w.sum(0), soft_cost + jnp.concatenate(soft))


def _weighted_means(sums, counts, prototypes):
    """Step 3: each prototype to the weighted mean of its points (one that holds no mass stays)."""
    alive = counts > 0
    return jnp.where(alive[:, None], sums / jnp.where(alive, counts, 1.0)[:, None], prototypes)


def _moves(fit: _Fit, moved, prototypes):
    """Step 4: the squared moves ||p_j^new - p_j||^2 (S, max K) and each run's shift, the largest
    move relative to sqrt(total variance) (S,)."""
    moved_sq = fit.layout.pad(jnp.sum((moved - prototypes) ** 2, axis=1))
    return moved_sq, jnp.sqrt(jnp.max(jnp.where(fit.layout.mask, moved_sq, 0.0), axis=1) / fit.scale)


def _advance(fit: _Fit, state: _State, moved, runs: _RunState) -> _State:
    """The next state: a finished run keeps its prototypes and its last solve's report; a run
    goes on while its shift is above tol and it has iterations left."""
    active = state.active
    runs = jax.tree.map(lambda new, old: jnp.where(active.reshape(-1, *[1] * (new.ndim - 1)), new, old),
                        runs, state.runs)
    iterations = state.iterations + active.astype(jnp.int32)
    return _State(prototypes=jnp.where(active[fit.layout.run][:, None], moved, state.prototypes),
                  active=(iterations < fit.max_iters) & (runs.shift > fit.tol), iterations=iterations, runs=runs)


def _initial_state(init, layout: SweepLayout, n: int) -> _State:
    s, dtype = len(layout.ks), init.dtype
    zeros = lambda *shape, dtype=dtype: jnp.zeros(shape, dtype)
    runs = _RunState(f=zeros(s, n), g=zeros(s, layout.k_max), shift=jnp.full((s,), jnp.inf, dtype),
                     sinkhorn_converged=zeros(s, dtype=bool), sinkhorn_iterations=zeros(s, dtype=jnp.int32),
                     newton_steps=zeros(s, dtype=jnp.int32), soft_objective=zeros(s),
                     cluster_sizes=zeros(s, layout.k_max), potentials=zeros(s, layout.k_max))
    return _State(prototypes=init, active=jnp.ones((s,), bool), iterations=zeros(s, dtype=jnp.int32), runs=runs)


def _mean_nearest_cost(fit: _Fit, prototypes):
    """(S,) mean_i min_j ||x_i - p_j||^2 over each run's prototypes."""
    costs = BlockCosts(fit.bank, None, prototypes, jnp.sum(prototypes * prototypes, axis=1))
    total = fit.bank.blocks(functools.partial(_nearest_cost_block, fit.layout, costs),
                            jnp.zeros((len(fit.layout.ks),), fit.bank.x.dtype))
    return fit.bank.shard.sum(total) / fit.bank.shard.total


def _nearest_cost_block(layout: SweepLayout, costs: BlockCosts, c, total):
    _, cost, fresh = costs(c)
    nearest = jnp.stack([jnp.min(cost[:, start:start + k], axis=1) for start, k in zip(layout.offsets, layout.ks)])
    return total + jnp.sum(jnp.where(fresh, nearest, 0.0), axis=1)


def _fit(shard: Shard, x, init, epsilon, tol, max_iters, *, ks: tuple[int, ...], options: SolverOptions):
    """Sinkhorn K-means runs for every K in `ks` from compact initial prototypes `init` (sum K, D);
    `x` holds the rows of the bank `shard` says."""
    layout = SweepLayout(ks, options.group_pad_ratio)
    n, d = x.shape  # this device's rows: its memory decides the blocking and whether costs are stored
    bank = BankBlocks.of(x, jnp.sum(x * x, axis=1), layout.block_rows(n, options), shard)
    scale = total_variance(x, shard)
    eps = epsilon * scale
    fit = _Fit(layout, bank, scale, eps, layout.stores_costs(n, d, x.dtype.itemsize, options),
               group_solves(bank, eps, [group.k for group in layout.groups], options), tol, max_iters)
    state = jax.lax.while_loop(lambda state: jnp.any(state.active), functools.partial(_iteration, fit),
                               _initial_state(init, layout, n))
    runs = state.runs
    result = KMeansResult(iterations=state.iterations, shift=runs.shift, converged=runs.shift <= tol,
                          sinkhorn_converged=runs.sinkhorn_converged, sinkhorn_iterations=runs.sinkhorn_iterations,
                          newton_steps=runs.newton_steps, objective=_mean_nearest_cost(fit, state.prototypes),
                          soft_objective=runs.soft_objective, epsilon=jnp.broadcast_to(eps, (len(ks),)),
                          cluster_sizes=runs.cluster_sizes, potentials=runs.potentials)
    return state.prototypes, result


def _seeded(shard: Shard, x, rng, epsilon, tol, max_iters, *, ks: tuple[int, ...], options: SolverOptions):
    """k-means++ for max K, then every run from its first K centers."""
    centers = kmeans_plus_plus(x, max(ks), rng, options=options, shard=shard)
    first_centers = SweepLayout(ks, options.group_pad_ratio).first_centers
    return _fit(shard, x, centers[first_centers], epsilon, tol, max_iters, ks=ks, options=options)


def _over_rows(fit, x, *replicated_args, mesh: Mesh | None, rows: int | None):
    """fit(shard, x, *replicated_args) on the bank `x`: on one device (mesh None), or with x's rows
    split over the mesh's data axis (`jax.shard_map`): each device runs the fit on its rows, and
    only the reductions of its passes cross devices. `rows`: the bank's real rows (x may be padded
    at its end to a multiple of the device count; default: all of x)."""
    rows = x.shape[0] if rows is None else rows
    if mesh is None:
        return fit(Shard.whole(rows), x, *replicated_args)
    local = lambda x, *args: fit(Shard.split(DATA_AXIS, x.shape[0], rows), x, *args)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXIS),) + (P(),) * len(replicated_args), out_specs=P(),
                         check_vma=False)(x, *replicated_args)


@functools.partial(jax.jit, static_argnames=("ks", "options", "mesh", "rows"))
def _fit_jit(x, init, epsilon, tol, max_iters, *, ks: tuple[int, ...], options: SolverOptions,
             mesh: Mesh | None = None, rows: int | None = None):
    """`_fit` as one program, from given initial prototypes."""
    return _over_rows(functools.partial(_fit, ks=ks, options=options), x, init, epsilon, tol, max_iters, mesh=mesh,
                      rows=rows)


@functools.partial(jax.jit, static_argnames=("ks", "options", "mesh", "rows"))
def _seeded_fit(x, rng, epsilon, tol, max_iters, *, ks: tuple[int, ...], options: SolverOptions,
                mesh: Mesh | None = None, rows: int | None = None):
    """k-means++ for max K, then every run from its first K centers: one program."""
    return _over_rows(functools.partial(_seeded, ks=ks, options=options), x, rng, epsilon, tol, max_iters, mesh=mesh,
                      rows=rows)


# ---------------------------------------------------------------------------------------------
# where the bank lies


def _bank_mesh(x) -> Mesh | None:
    """The 1-D data mesh over the devices holding `x`, or None when one device holds all of it
    (a numpy bank goes to the default device, as a single-device array stays where it is)."""
    if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
        return None
    sharding = x.sharding
    if isinstance(sharding, NamedSharding) and sharding.mesh.axis_names == (DATA_AXIS,):
        return sharding.mesh
    if isinstance(sharding, NamedSharding):
        return make_mesh(sharding.mesh.devices.reshape(-1))
    return make_mesh(sorted(sharding.device_set, key=lambda device: device.id))


@functools.partial(jax.jit, static_argnames=("pad", "sharding"))
def _rows_padded(x, *, pad: int, sharding: NamedSharding):
    return jax.lax.with_sharding_constraint(jnp.pad(x, ((0, pad), (0, 0))), sharding)


def _place_bank(x: jax.Array) -> tuple[jax.Array, Mesh | None]:
    """(the bank as the fit reads it, the mesh it is spread over or None). A bank on several
    devices is laid out along its rows over them, padded at its end to a multiple of the device
    count: a bank split along its rows stays as it is and a replicated one is sliced where it lies
    (neither moves between devices); any other layout is resharded once."""
    mesh = _bank_mesh(x)
    if mesh is None:
        return x, None
    pad, sharding = -x.shape[0] % mesh.size, row_sharding(mesh)
    if pad or not x.sharding.is_equivalent_to(sharding, x.ndim):
        x = _rows_padded(x, pad=pad, sharding=sharding)
    return x, mesh


def _replicated_on(mesh: Mesh | None, x: jax.Array, *args):
    """Small arguments (key, scalars, initial prototypes) on every device of the bank's mesh, from
    their host values (on several hosts each holds the same ones), or beside the bank `x` on its one
    device; explicit placements, so that the fit runs under `jax.transfer_guard("disallow")`."""
    target = x.sharding if mesh is None else replicated(mesh)

    def place(arg):
        if mesh is None and isinstance(arg, jax.Array):
            return arg
        if jax.dtypes.issubdtype(arg.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(place(jax.random.key_data(arg)), impl=jax.random.key_impl(arg))
        return jax.device_put(jax.device_get(arg), target)

    return tuple(place(arg) for arg in args)


# ---------------------------------------------------------------------------------------------
# the public functions


def sinkhorn_kmeans(x, k: int, *, rng: jax.Array, epsilon: float = DEFAULT_EPSILON, max_iters: int = 100,
                    tol: float = 1e-4, init=None,
                    options: SolverOptions = SolverOptions()) -> tuple[jax.Array, KMeansResult]:
    """Cluster the rows of `x` (N, D) into `k` balanced prototypes.

    x: a numpy array or a jax.Array; one on several devices (split along its rows over the data
    mesh, `nexvitad_jax.sharding.row_sharding`, or replicated) stays there: each device keeps its
    rows and only reductions cross devices (module docstring). The result is the one-device result.
    epsilon: entropic regularization relative to the bank's total variance (module docstring).
    tol: stop when the largest prototype move, relative to sqrt(total variance), is <= tol.
    init: optional (k, D) starting prototypes instead of k-means++ from `rng`.
    options: the solver's knobs (`SolverOptions`); other options compile another program.
    Returns (prototypes (k, D), KMeansResult); replicated over the bank's devices.
    """
    k = _check_k(k)
    x = _check_bank(x, k)
    epsilon, tol, max_iters = _traced_arguments(x, epsilon, tol, max_iters, options)
    fit, start = _seeded_fit, rng  # k-means++ from rng, or the given prototypes
    if init is not None:
        fit, start = _fit_jit, np.asarray(init, x.dtype)
        if start.shape != (k, x.shape[1]):
            raise UserInputError(f"init: expected ({k}, {x.shape[1]}) prototypes (K, D of x), "
                                 f"got shape {tuple(start.shape)}")
    rows, (x, mesh) = x.shape[0], _place_bank(x)
    start, epsilon, tol, max_iters = _replicated_on(mesh, x, start, epsilon, tol, max_iters)
    prototypes, result = fit(x, start, epsilon, tol, max_iters, ks=(k,), options=options, mesh=mesh, rows=rows)
    return prototypes, jax.tree.map(lambda field: field[0], result)


class SweepResult(NamedTuple):
    """Per-K results of `sweep_k`, in the order of `ks`."""

    ks: tuple[int, ...]
    prototypes: list[jax.Array]  # prototypes[i]: (ks[i], D)
    objective: jax.Array  # (len(ks),) mean min squared distance at the final prototypes
    result: KMeansResult  # every field stacked over the sweep (cluster_sizes, potentials padded to max K)


def sweep_k(x, ks: Sequence[int], *, rng: jax.Array, epsilon: float = DEFAULT_EPSILON, max_iters: int = 100,
            tol: float = 1e-4, options: SolverOptions = SolverOptions()) -> SweepResult:
    """Sinkhorn K-means for every K in `ks` on one bank, as one compiled program that passes over
    the bank once per iteration for all K (module docstring); run i equals
    `sinkhorn_kmeans(x, ks[i], rng=rng, ...)`. Arguments as in `sinkhorn_kmeans`."""
    ks = tuple(_check_k(k) for k in ks)
    if not ks:
        raise UserInputError("ks: expected at least one cluster count")
    x = _check_bank(x, max(ks))
    epsilon, tol, max_iters = _traced_arguments(x, epsilon, tol, max_iters, options)
    rows, (x, mesh) = x.shape[0], _place_bank(x)
    rng, epsilon, tol, max_iters = _replicated_on(mesh, x, rng, epsilon, tol, max_iters)
    prototypes, result = _seeded_fit(x, rng, epsilon, tol, max_iters, ks=ks, options=options, mesh=mesh, rows=rows)
    offsets = [int(offset) for offset in np.cumsum([0, *ks])]  # static slices: no transfer
    return SweepResult(ks=ks, prototypes=[jax.lax.slice_in_dim(prototypes, offsets[i], offsets[i + 1])
                                             for i in range(len(ks))],
                       objective=result.objective, result=result)
