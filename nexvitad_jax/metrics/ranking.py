"""Exact rank statistics shared by every pixel and image metric.

Every metric here is a function of one thing: for each anomalous (positive) pixel, how many normal
(negative) pixels score below it and how many score exactly the same. With that, the ROC, the
precision-recall curve and MVTec's PRO curve are all exact, with ties merged the way sklearn and
MVTec's official evaluation merge them (thresholds only at distinct score values, `score >= t`
counted as anomalous), and no loop over thresholds is needed:

- one sort of the negative scores (values only: no 8-byte argsort index over all pixels),
- one argsort of the positives (a few percent of the pixels),
- two `searchsorted` of the sorted positives into the sorted negatives.

Backends. NumPy's float32 sort is vectorized (x86-simd-sort) and beats XLA's CPU sort, so on CPU the
NumPy path is used. On an accelerator the sort and the searches run in one jitted JAX program and
only the positives' integer ranks come back to the host (`backend="jax"`). Either way the final
sums are float64 on the host, so both backends give the same value.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from nexvitad_jax.errors import UserInputError

BACKENDS = ("auto", "numpy", "jax")


@dataclasses.dataclass(frozen=True)
class Ranking:
    """Rank statistics of the positives, in ascending order of their score.

    Attributes:
      pos_scores: (P,) positive scores sorted ascending.
      pos_order: (P,) int, positions into the positives in their original (C) order: entry i of
        the sorted arrays is positive number `pos_order[i]` of `scores[labels]`.
      neg_below: (P,) int64, number of negatives scoring strictly below each positive.
      neg_equal: (P,) int64, number of negatives scoring exactly the same.
      n_neg: number of negatives.
    """

    pos_scores: np.ndarray
    pos_order: np.ndarray
    neg_below: np.ndarray
    neg_equal: np.ndarray
    n_neg: int

    @property
    def n_pos(self) -> int:
        return int(self.pos_scores.shape[0])

    @functools.cached_property
    def neg_at_or_above(self) -> np.ndarray:
        """(P,) false positives at threshold `t = score`: negatives with score >= t."""
        return self.n_neg - self.neg_below

    @functools.cached_property
    def pos_at_or_above(self) -> np.ndarray:
        """(P,) true positives at threshold `t = score`: positives with score >= t (ties merged)."""
        group_start = np.searchsorted(self.pos_scores, self.pos_scores, side="left")
        return self.n_pos - group_start


def check_scores_labels(scores, labels, *, what: str, ndim: int | None = None):
    """Validate and convert (scores, labels) to a float array and a bool array of one shape.

    `what` names the inputs in error messages ("anomaly maps and masks", "image scores and labels").
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.shape != labels.shape:
        raise UserInputError(
            f"{what}: shapes differ, scores {scores.shape} vs labels {labels.shape}; "
            "expected one score per pixel/image"
        )
    if ndim is not None and scores.ndim != ndim:
        raise UserInputError(
            f"{what}: expected {ndim} dimensions ({'N,H,W' if ndim == 3 else 'N'}), got shape "
            f"{scores.shape}"
        )
    if scores.size == 0:
        raise UserInputError(f"{what}: empty input (shape {scores.shape})")
    if scores.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        scores = scores.astype(np.float32)  # ml_dtypes floats (JAX bf16 maps): exact in float32
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise UserInputError(f"{what}: scores must be real numbers, got dtype {scores.dtype}")
    if np.issubdtype(scores.dtype, np.floating):
        n_nan = int(np.count_nonzero(np.isnan(scores)))
        if n_nan:
            raise UserInputError(
                f"{what}: scores contain {n_nan} NaN value(s); expected real anomaly scores"
            )
    if labels.dtype != np.bool_:
        if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
            raise UserInputError(f"{what}: labels must be bool or 0/1, got dtype {labels.dtype}")
        bad = (labels != 0) & (labels != 1)
        if bad.any():
            raise UserInputError(
                f"{what}: labels must be bool or 0/1, found value(s) such as "
                f"{labels[bad].flat[0]!r}; binarize masks first (> 0.5)"
            )
        labels = labels.astype(bool)
    return scores, labels


def require_both_classes(labels: np.ndarray, *, what: str, metric: str) -> tuple[int, int]:
    """(n_pos, n_neg); a clear error when one class is absent (the curve is undefined)."""
    n_pos = int(np.count_nonzero(labels))
    n_neg = int(labels.size - n_pos)
    if n_pos == 0:
        raise UserInputError(
            f"{metric} is undefined: the {what} contain no anomalous entry (all labels are 0); "
            "expected at least one anomalous and one normal pixel/image"
        )
    if n_neg == 0:
        raise UserInputError(
            f"{metric} is undefined: the {what} contain no normal entry (all labels are 1); "
            "expected at least one anomalous and one normal pixel/image"
        )
    return n_pos, n_neg


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UserInputError(f"unknown metrics backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    return "numpy" if jax.default_backend() == "cpu" else "jax"


def rank(scores: np.ndarray, labels: np.ndarray, backend: str = "auto") -> Ranking:
    """Rank statistics of validated scores / bool labels (any shape; both classes present)."""
    backend = resolve_backend(backend)
    if backend == "jax":
        return _rank_jax(scores, labels)
    return _rank_numpy(scores, labels)


def _rank_numpy(scores: np.ndarray, labels: np.ndarray) -> Ranking:
    flat_scores = scores.reshape(-1)
    flat_labels = labels.reshape(-1)
    negatives = flat_scores[~flat_labels]  # a copy, sorted in place below
    negatives.sort()
    positives = flat_scores[flat_labels]
    # Index dtype: int32 halves the memory of the (small) positive permutation.
    pos_order = np.argsort(positives, kind="stable").astype(np.int32 if positives.size < 2**31 else np.int64)
    pos_scores = positives[pos_order]
    # Sorted queries make searchsorted cache-friendly (20x faster than unsorted on 86M pixels).
    below = np.searchsorted(negatives, pos_scores, side="left").astype(np.int64)
    at_or_below = np.searchsorted(negatives, pos_scores, side="right").astype(np.int64)
    return Ranking(pos_scores, pos_order, below, at_or_below - below, int(negatives.size))


@functools.partial(jax.jit, static_argnames=("n_pos",))
def _rank_device(scores, labels, n_pos: int):
    """Sort and search on device; static n_pos so every array has a static shape.

    Binary search ("scan": log2(N) gathers per positive) rather than method="sort", which would
    re-sort all N pixels for each search.
    """
    flat_scores = scores.reshape(-1)
    flat_labels = labels.reshape(-1)
    n_neg = flat_scores.shape[0] - n_pos
    (neg_idx,) = jnp.nonzero(~flat_labels, size=n_neg)
    (pos_idx,) = jnp.nonzero(flat_labels, size=n_pos)
    negatives = jnp.sort(flat_scores[neg_idx])
    positives = flat_scores[pos_idx]
    pos_order = jnp.argsort(positives, stable=True).astype(jnp.int32)
    pos_scores = positives[pos_order]
    below = jnp.searchsorted(negatives, pos_scores, side="left", method="scan")
    at_or_below = jnp.searchsorted(negatives, pos_scores, side="right", method="scan")
    return pos_scores, pos_order, below, at_or_below


def _rank_jax(scores: np.ndarray, labels: np.ndarray) -> Ranking:
    n_pos = int(np.count_nonzero(labels))
    dtype = scores.dtype if scores.dtype in (np.float32, np.float16) else np.float32
    if scores.dtype not in (np.float32, np.float16) and not np.array_equal(
        scores.astype(np.float32).astype(scores.dtype), scores
    ):
        # float64 scores would round on a device without x64: keep exactness on the host.
        return _rank_numpy(scores, labels)
    out = _rank_device(jnp.asarray(scores, dtype), jnp.asarray(labels), n_pos)
    pos_scores, pos_order, below, at_or_below = (np.asarray(a) for a in out)
    below = below.astype(np.int64)
    return Ranking(pos_scores, pos_order, below, at_or_below.astype(np.int64) - below, int(labels.size - n_pos))
