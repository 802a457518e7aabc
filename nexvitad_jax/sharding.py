"""The device mesh every stage runs on: one axis, "data", over every device of every host.

Training shards its batches along it, inference its test images and memory banks; parameters,
prototypes and other small state are replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(classes, per_class, ...) arrays split along per_class."""
    return NamedSharding(mesh, P(None, DATA_AXIS))


def row_sharding(mesh: Mesh) -> NamedSharding:
    """(rows, ...) arrays split along their rows (test images, memory-bank patches)."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
