"""Data parallelism over a 1-D device mesh: the mesh, replicated state, batches split over the
``"data"`` axis (one host or several), and reading replicated values back on the host."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
Batch = Mapping[str, Any]


def data_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh ``("data",)`` over ``devices`` (default: every device of this process)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """A copy of ``tree`` on every device of ``mesh`` (replicated; never aliases ``tree``'s
    buffers, so donating the copy leaves ``tree`` valid). On several hosts each passes the same
    ``tree``."""
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() > 1:
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.array(x)), tree)
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=sharding)
    return copy(tree)


def host_value(tree: PyTree) -> PyTree:
    """``tree`` as numpy on this host; a replicated array spanning several hosts is read from
    this host's copy."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return x

    return jax.device_get(jax.tree.map(one, tree))


def local_devices(mesh: Mesh) -> int:
    """How many of ``mesh``'s devices belong to this process."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
    """One global batch split along its leading axis over the ``"data"`` axis of ``mesh``,
    from this process's part ``batch`` (all of it on one host; on several, each host passes its
    own rows, e.g. from ``data.batches(shard=(jax.process_index(), jax.process_count()))``).
    The rows must divide evenly over this process's devices of the mesh."""
    local = local_devices(mesh)
    sizes = {len(v) for v in batch.values()}
    if any(b % local for b in sizes):
        raise ValueError(f"a batch of {sorted(sizes)} examples does not split over the {local} "
                         "devices of the data axis; choose a batch size divisible by it.")
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
