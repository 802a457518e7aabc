"""Inference in fixed-size batches spread over every device of every host (the one home of
batching: the detector, the decoder baseline, the main job and the experiments all go through it).

A global batch has `batch_size` rows rounded up to a multiple of the device count, sharded along
its rows over the 1-D data mesh (`nexvitad_jax.sharding`); the last batch is padded by repeating
the last row, so a jitted function compiles once for any number of inputs, and the padding rows
are trimmed from the outputs. Every process holds all of the (host) inputs and feeds only the rows
of its own devices (`jax.make_array_from_process_local_data`); weights and prototypes are
replicated once, before the loop (`replicate`).

The loop runs under `jax.transfer_guard("disallow")`: data enters only through the explicit
placement of each batch and results leave only through one explicit `jax.device_get` of the
gathered outputs, so a weight or a constant copied to the devices on every batch is an error,
not a slowdown.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.sharding import replicated, row_sharding


def global_batch_size(batch_size: int, mesh: Mesh) -> int:
    """`batch_size` rounded up to a multiple of the mesh's device count (every device gets rows)."""
    if int(batch_size) < 1:
        raise UserInputError(f"batch_size = {batch_size!r}: expected a positive integer")
    return -(-int(batch_size) // mesh.size) * mesh.size


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of `tree` replicated on every device of `mesh` (weights, prototypes): an
    explicit transfer, done once; an array already there stays where it is."""
    return jax.device_put(tree, replicated(mesh))


def _process_rows(mesh: Mesh, rows: int) -> slice:
    """The rows of a (rows, ...) array sharded along the mesh that this process's devices hold."""
    spans = sorted((index[0].start or 0, rows if index[0].stop is None else index[0].stop)
                   for index in row_sharding(mesh).addressable_devices_indices_map((rows,)).values())
    begin, end = spans[0][0], spans[-1][1]
    if sum(stop - start for start, stop in set(spans)) != end - begin:
        raise ValueError(f"this process's devices do not hold one contiguous block of rows: {spans}")
    return slice(begin, end)


def place_rows(inputs: Any, rows: np.ndarray, mesh: Mesh) -> Any:
    """Rows `rows` of every (host) array of the pytree `inputs` as global arrays sharded along
    their rows; this process feeds only its devices' rows. `len(rows)` must divide by the mesh."""
    local = _process_rows(mesh, len(rows))
    sharding = row_sharding(mesh)
    # This is where data enters: allowed under the loop's guard (on several processes jax places the
    # local rows through a path the guard would count as implicit).
    with jax.transfer_guard_host_to_device("allow"):
        return jax.tree.map(lambda array: jax.make_array_from_process_local_data(
            sharding, np.asarray(array[rows[local]]), (len(rows), *array.shape[1:])), inputs)


def padded_batches(inputs: Any, batch_size: int, mesh: Mesh) -> Iterator[tuple[int, Any]]:
    """(number of real rows, global batch) over the leading axis of every host array of the pytree
    `inputs`; every batch has `global_batch_size(batch_size, mesh)` rows, sharded along them."""
    inputs = jax.tree.map(np.asarray, inputs)
    count, size = jax.tree.leaves(inputs)[0].shape[0], global_batch_size(batch_size, mesh)
    if count == 0:
        raise UserInputError("nothing to process: the inputs have no rows")
    for start in range(0, count, size):
        rows = np.minimum(np.arange(start, start + size), count - 1)
        yield min(size, count - start), place_rows(inputs, rows, mesh)


@functools.lru_cache(maxsize=64)
def _gatherer(count: int, sharding: NamedSharding) -> Callable[[list[Any]], Any]:
    """One program per (row count, layout): the batches' outputs concatenated along their rows,
    trimmed to the `count` real rows, laid out as `sharding`."""
    return jax.jit(lambda parts: jax.tree.map(lambda *arrays: jnp.concatenate(arrays)[:count], *parts),
                   out_shardings=sharding)


def map_batches(fn: Callable[[Any], Any], inputs: Any, batch_size: int, mesh: Mesh, *, progress=None,
                to_host: bool = True) -> Any:
    """fn over the padded global batches of the host pytree `inputs`, outputs (a pytree of
    (rows, ...) arrays) trimmed to the real rows and concatenated. `to_host`: numpy arrays, gathered
    onto every process with one `jax.device_get`; else jax.Arrays left on the devices, sharded along
    their rows when the row count divides by the device count (replicated otherwise). `progress` (a
    tqdm bar) advances per real row once a batch is computed."""
    parts, counts = [], []
    with jax.transfer_guard("disallow"):
        for count, batch in padded_batches(inputs, batch_size, mesh):
            parts.append(fn(batch))
            counts.append(count)
            if len(parts) > 1:  # two batches in flight: the host prepares one while the devices compute
                _advance(progress, parts[-2], counts[-2])
        _advance(progress, parts[-1], counts[-1])
        total = sum(counts)
        if to_host:
            return jax.device_get(_gatherer(total, replicated(mesh))(parts))
        return _gatherer(total, row_sharding(mesh) if total % mesh.size == 0 else replicated(mesh))(parts)


def _advance(progress, outputs: Any, count: int) -> None:
    jax.block_until_ready(outputs)
    if progress is not None:
        progress.update(count)
