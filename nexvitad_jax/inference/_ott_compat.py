"""The one ott-jax compatibility shim: import ott through this module.

ott-jax 0.6.0 calls `jax.interpreters.batching.is_vmappable` (in `ott.utils.batched_vmap`, the
path `PointCloud(batch_size=...)` takes); jax >= 0.9 no longer re-exports it. The function still
lives in `jax._src.interpreters.batching`, so restore the public alias before ott is imported.
"""

from __future__ import annotations

import jax.interpreters.batching as _public_batching


def _restore_is_vmappable() -> None:
    """Put `is_vmappable` back on the public module if it is missing."""
    if not hasattr(_public_batching, "is_vmappable"):
        from jax._src.interpreters import batching as _private_batching

        _public_batching.is_vmappable = _private_batching.is_vmappable


_restore_is_vmappable()

from ott.geometry import geometry, pointcloud  # noqa: E402  (must follow the shim)
from ott.problems.linear import linear_problem  # noqa: E402
from ott.solvers.linear import sinkhorn  # noqa: E402
from ott.tools import k_means as ott_k_means  # noqa: E402

__all__ = ["geometry", "pointcloud", "linear_problem", "sinkhorn", "ott_k_means"]
