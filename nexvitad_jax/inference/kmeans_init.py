"""k-means++ seeding of Sinkhorn K-means: exact D^2 sampling, with a pass over the bank every few
centers instead of every center (`kmeans_plus_plus`)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nexvitad_jax.inference.kmeans_options import SolverOptions
from nexvitad_jax.inference.transport import Shard, squared_distances_from_norms


def kmeans_plus_plus(x: jax.Array, k: int, rng: jax.Array, *, options: SolverOptions = SolverOptions(),
                     shard: Shard | None = None) -> jax.Array:
    """k-means++ seeding: center t is drawn with probability ~ D^2, the squared distance to the
    nearest earlier center, from keys folded with t, so the first k centers do not depend on how
    many more are drawn.

    Exact D^2 sampling with a pass over the bank every few centers instead of every center (the
    passes are what k-means++ costs: one matrix-vector product over the bank per center). The
    nearest-center distances U are brought up to date when 2, 4, 8, 16, 32, 48, 64, ... centers are
    drawn (options.kmeans_pp_block at most in between), each update one (N, D) x (D, block) matmul.
    In between, center t is drawn by rejection: propose point i with probability ~ U_i (a binary
    search in the cumulative sum of U), accept it with probability D^2_i / U_i, D^2_i also counting
    the centers since the last update; an accepted proposal is distributed exactly ~ D^2. After
    options.kmeans_pp_attempts rejections U is brought up to date and the center drawn from it
    directly.

    `x` is this device's rows of the bank as `shard` says (default: the whole bank). The
    cumulative sum of U is computed in double-float (`_prefix_sums`): within ~2^-40 of the exact
    sums, so it rounds to the same float32 values whatever the order of the additions, and the
    draws do not depend on how the rows are spread over devices (given the same U).
    """
    shard = Shard.whole(x.shape[0]) if shard is None else shard
    sampler = _PlusPlus(x, jnp.sum(x * x, axis=1), rng, options.kmeans_pp_block, options.kmeans_pp_attempts, shard)
    first = jax.random.randint(jax.random.fold_in(rng, 0), (), 0, shard.total)
    centers = jnp.zeros((k + sampler.block, x.shape[1]), x.dtype).at[0].set(shard.take(first, x)[0])
    min_sq = squared_distances_from_norms(x, sampler.x_sq, centers[:1], jnp.sum(centers[:1] ** 2, axis=1))[:, 0]
    state = sampler.cumulate(centers, min_sq, jnp.ones((), jnp.int32))
    return jax.lax.fori_loop(1, k, sampler.draw, state).centers[:k]


def _add(x, y):
    """Double-float addition of (high, low) float pairs (Knuth's two-sum, then renormalized): the
    sum's rounding error is kept in `low`, so the result is (nearly) independent of the order."""
    high = x[0] + y[0]
    back = high - x[0]
    low = (x[0] - (high - back)) + (y[0] - back) + (x[1] + y[1])
    total = high + low
    return total, low - (total - high)


def _prefix_sums(values: jax.Array, shard: Shard):
    """(inclusive prefix sums of the whole bank's `values` at this device's rows, their total), both
    rounded from double-float. Over devices: each device's local sums, shifted by the sum of the
    devices before it (an all-gather of one pair per device)."""
    local = jax.lax.associative_scan(_add, (values, jnp.zeros_like(values)))
    if shard.axis is None:
        return local[0], local[0][-1]
    ends = jax.lax.all_gather(jnp.stack([local[0][-1], local[1][-1]]), shard.axis)  # (devices, 2)
    before = jax.lax.associative_scan(_add, (ends[:, 0], ends[:, 1]))
    device = jax.lax.axis_index(shard.axis)
    shift = [jnp.where(device > 0, part[jnp.maximum(device - 1, 0)], 0.0) for part in before]
    return _add(shift, local)[0], before[0][-1]


class _Draws(NamedTuple):
    centers: jax.Array  # (k + block, D) the centers drawn so far
    min_sq: jax.Array  # (N,) U: squared distance to the nearest of the centers before `synced` (0 on padding)
    cdf: jax.Array  # (N,) cumulative sum of U over the whole bank, at this device's rows
    total: jax.Array  # () the sum of U
    synced: jax.Array  # () the centers U is up to date with


class _PlusPlus(NamedTuple):
    """k-means++ on one bank: the points, their squared norms, the key, the block sizes and which
    rows of the bank the points are."""

    x: jax.Array
    x_sq: jax.Array
    rng: jax.Array
    block: int
    attempts: int
    shard: Shard

    def pending_mask(self, t, synced):
        return jnp.arange(self.block) < t - synced

    def cumulate(self, centers, min_sq, synced) -> _Draws:
        min_sq = self.shard.where_real(min_sq, 0.0)
        return _Draws(centers, min_sq, *_prefix_sums(min_sq, self.shard), synced)

    def update(self, t, state: _Draws) -> _Draws:
        """U and its cumulative sum from every center before t (the pending ones since `synced`)."""
        pending = jax.lax.dynamic_slice_in_dim(state.centers, state.synced, self.block)
        distances = squared_distances_from_norms(self.x, self.x_sq, pending, jnp.sum(pending * pending, axis=1))
        min_sq = jnp.minimum(state.min_sq,
                             jnp.min(jnp.where(self.pending_mask(t, state.synced), distances, jnp.inf), axis=1))
        return self.cumulate(state.centers, min_sq, t)

    def propose(self, key, state: _Draws):
        """A point with probability ~ U (uniform when every U is 0: all points on centers): the
        number of rows whose cumulative U is <= a uniform fraction of the total."""
        n, total = self.shard.total, state.total
        below = jnp.searchsorted(state.cdf, jax.random.uniform(key, (), state.cdf.dtype) * total, side="right")
        if self.shard.axis is not None:  # this device's real rows below it, summed over the devices
            below = self.shard.sum(jnp.minimum(below, self.shard.real))
        return jnp.where(total > 0, jnp.minimum(below, n - 1), jax.random.randint(key, (), 0, n))

    def attempt(self, t, state: _Draws, pending, key, carry):
        """Rejection attempt a for center t: a proposal ~ U, accepted with probability D^2 / U."""
        a, _, _ = carry
        proposal_key, accept_key = jax.random.split(jax.random.fold_in(key, a))
        index = self.propose(proposal_key, state)
        row, bound = self.shard.take(index, self.x, state.min_sq)
        to_pending = jnp.where(self.pending_mask(t, state.synced), jnp.sum((pending - row) ** 2, axis=1), jnp.inf)
        nearest = jnp.minimum(bound, jnp.min(to_pending))
        ratio = jnp.where(bound > 0, nearest / bound, 1.0)  # U = 0 everywhere: uniform
        return a + 1, index, jax.random.uniform(accept_key, (), self.x.dtype) < ratio

    def rejecting(self, carry):
        """No proposal accepted yet, and attempts left."""
        attempts, _, accepted = carry
        return ~accepted & (attempts < self.attempts)

    def exact(self, t, key, state: _Draws):
        """After the attempts ran out: U brought up to date, then one draw from it."""
        state = self.update(t, state)
        return state, self.propose(jax.random.fold_in(key, self.attempts), state)

    def draw(self, t, state: _Draws) -> _Draws:
        """Center t: U brought up to date at 2, 4, 8, ... centers, else rejection sampling."""
        state = jax.lax.cond(t - state.synced >= jnp.minimum(self.block, state.synced),
                             functools.partial(self.update, t), lambda state: state, state)
        pending = jax.lax.dynamic_slice_in_dim(state.centers, state.synced, self.block)
        key = jax.random.fold_in(self.rng, t)
        # Without pending centers U is D^2 and the first proposal is accepted.
        _, index, accepted = jax.lax.while_loop(
            self.rejecting, functools.partial(self.attempt, t, state, pending, key),
            (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((), bool)))
        state, index = jax.lax.cond(accepted, lambda state: (state, index), functools.partial(self.exact, t, key),
                                    state)
        return state._replace(centers=state.centers.at[t].set(self.shard.take(index, self.x)[0]))
