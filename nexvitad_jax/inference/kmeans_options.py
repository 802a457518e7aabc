"""The knobs of the Sinkhorn K-means solver, as one frozen options object.

`SolverOptions` is hashable and travels to the jitted fits as a static argument: a run with other
options compiles its own program, and nothing is read from module globals at trace time. The
figures behind the defaults are in `benchmarks/results/kmeans.json` (`notes`).
"""

from __future__ import annotations

import dataclasses
import math
from numbers import Real

import numpy as np

from nexvitad_jax.errors import UserInputError

# Stored (N, sum K) costs are always allowed up to this size, and beyond it when the bank is larger.
DEFAULT_DENSE_COST_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """Every knob of `sinkhorn_kmeans` and `sweep_k` but epsilon, tol and max_iters (which are
    traced, so runs that differ only in them share one program)."""

    # The transport solve.
    sinkhorn_threshold: float = 1e-3  # tolerance on the L1 error of the cluster masses
    sinkhorn_max_iters: int = 2000
    newton_steps: int = 100  # most Newton passes per solve before Sinkhorn goes on alone (0: Sinkhorn only)
    # Newton's Hessian costs rows x K^2 per pass: above this K, Sinkhorn alone is faster.
    newton_max_k: int = 4096
    newton_max_move: float = 32.0  # the trust radius of a Newton step: most it moves a potential, in eps
    newton_start_move: float = 16.0  # the radius a solve starts with
    newton_tol_factor: float = 0.1  # Newton solves to this x the Sinkhorn threshold: Sinkhorn confirms in one iteration
    # Newton's Hessian from a strided subsample of the rows (the gradient and the stopping test use
    # every row): this many rows per prototype, at least hessian_min_rows (a small K's Hessian from
    # few rows costs more passes than it saves), at most hessian_row_budget // K rows (large K).
    hessian_rows_per_prototype: int = 8
    hessian_min_rows: int = 4096
    hessian_row_budget: int = 1 << 23
    # Newton's warm-up on a strided subsample of max(min_rows, rows_per_prototype * K) rows, used when
    # the bank has >= 4x as many: the large early steps at a fraction of a full pass.
    newton_subsample_min_rows: int = 4096
    newton_subsample_rows_per_prototype: int = 32
    # A sweep's runs share a compiled transport solve when their K differ by at most this factor.
    group_pad_ratio: float = 1.25
    # k-means++: most centers drawn between two passes over the bank, and rejections before a draw
    # brings its distances up to date.
    kmeans_pp_block: int = 16
    kmeans_pp_attempts: int = 32
    # Memory: rows per block of a pass over the bank (None: about block_elements // (2 sum K), so one
    # block up to N ~ 10^5), and the budget for storing the (N, sum K) costs (None: max(bank size,
    # DEFAULT_DENSE_COST_BYTES); 0: recompute them online in every pass).
    block_elements: int = 1 << 26
    chunk_size: int | None = None
    dense_cost_bytes: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (value is None and field.default is None):
                object.__setattr__(self, field.name, _checked(field.name, value, *_RULES[field.name],
                                                              optional=field.default is None))


# field: (int or float, comparison, bound): the values allowed.
_RULES = {
    "sinkhorn_threshold": (float, ">", 0), "sinkhorn_max_iters": (int, ">=", 1), "newton_steps": (int, ">=", 0),
    "newton_max_k": (int, ">=", 0), "newton_max_move": (float, ">", 0), "newton_start_move": (float, ">", 0),
    "newton_tol_factor": (float, ">", 0), "hessian_rows_per_prototype": (int, ">=", 1),
    "hessian_min_rows": (int, ">=", 1), "hessian_row_budget": (int, ">=", 1),
    "newton_subsample_min_rows": (int, ">=", 1), "newton_subsample_rows_per_prototype": (int, ">=", 1),
    "group_pad_ratio": (float, ">=", 1), "kmeans_pp_block": (int, ">=", 1), "kmeans_pp_attempts": (int, ">=", 0),
    "block_elements": (int, ">=", 1), "chunk_size": (int, ">=", 1), "dense_cost_bytes": (int, ">=", 0),
}


def _checked(name: str, value, kind: type, comparison: str, bound, *, optional: bool):
    """`value` as a plain int or float, or UserInputError naming the field and what it expects."""
    if kind is int:
        valid = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        expected = "an integer"
    else:
        valid = isinstance(value, Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
        expected = "a finite number"
    if not valid or not (value > bound if comparison == ">" else value >= bound):
        raise UserInputError(f"SolverOptions.{name} = {value!r}: expected {expected} {comparison} {bound}"
                             + (" or None" if optional else ""))
    return kind(value)
