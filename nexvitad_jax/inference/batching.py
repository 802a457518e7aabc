"""Inference in fixed-size batches: the last batch is padded by repeating its last row, so a
jitted function compiles once for any number of inputs."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np


def padded_batches(inputs: Any, batch_size: int) -> Iterator[tuple[int, Any]]:
    """(number of real rows, batch) over the leading axis of every array of the pytree `inputs`;
    every batch has `batch_size` rows."""
    count = jax.tree.leaves(inputs)[0].shape[0]
    for start in range(0, count, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), count - 1)
        yield min(batch_size, count - start), jax.tree.map(lambda array: array[rows], inputs)


def map_batches(fn: Callable[[Any], Any], inputs: Any, batch_size: int, *, progress=None,
                to_host: bool = True) -> Any:
    """fn over padded batches of `inputs`, outputs trimmed to the real rows and concatenated:
    numpy arrays (`to_host`) or device arrays. `progress` (a tqdm bar) advances per real row."""
    parts = []
    for count, batch in padded_batches(inputs, batch_size):
        trim = (lambda array: np.asarray(array[:count])) if to_host else (lambda array: array[:count])
        parts.append(jax.tree.map(trim, fn(batch)))
        if progress is not None:
            progress.update(count)
    concatenate = np.concatenate if to_host else jnp.concatenate
    return jax.tree.map(lambda *arrays: concatenate(arrays), *parts)
