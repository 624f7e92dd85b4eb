"""The 1-D device mesh (axis 'data') and moving host batches onto it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process) named 'data'."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split across the mesh."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Same value on every device."""
    return NamedSharding(mesh, P())


def check_global_batch(global_batch: int, mesh: Mesh, *, half_split: bool = True) -> None:
    """Raises a clear error if `global_batch` cannot be split evenly (and into halves) per device."""
    n = mesh.devices.size
    unit = 2 * n if half_split else n
    if global_batch <= 0 or global_batch % unit:
        what = "2 x the device count" if half_split else "the device count"
        raise ValueError(
            f"train.batch_size={global_batch} must be a positive multiple of {what} ({unit} with {n} "
            f"devices) so every device gets an equal, half-normal/half-synthetic share"
        )


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch (this process's rows) -> global arrays split over 'data'."""
    sharding = data_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
    """Puts a pytree on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
