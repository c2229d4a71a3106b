"""Flat numbering of a graph's prunable units, for vectorised per-unit scores and masks.

Unit ``i`` of prunable group ``g`` is global unit ``offsets[g] + i``. Per-unit reductions over a
parameter tree are segment sums over each leaf's unit axis, and per-unit values broadcast back onto
leaves with a gather: no Python loop over units, and one static map per (leaf, axis).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxjpq.graph import Graph, kept

Key = tuple[str, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class UnitMap:
    """Position ``j`` along ``axis`` of leaf ``key`` belongs to global unit ``owner[j]``.

    ``owner`` is int ``[leaf.shape[axis]]``; positions of no unit hold ``num_units`` (a sink).
    """

    key: Key
    axis: int
    owner: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class UnitIndex:
    """Global numbering of the prunable units of a graph.

    Attributes:
      group_ids: prunable group ids, in graph order.
      offsets: int ``[G + 1]``; group ``j``'s units are ``offsets[j]:offsets[j + 1]``.
      group_of_unit: int ``[U]``, index into ``group_ids``.
      maps: the ``params`` slices of every prunable group (collection ``"params"`` only).
    """

    group_ids: tuple[str, ...]
    offsets: np.ndarray
    group_of_unit: np.ndarray
    maps: tuple[UnitMap, ...]

    @property
    def num_units(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_groups(self) -> int:
        return len(self.group_ids)

    def flat_masks(self, masks: Mapping[str, jax.Array]) -> jax.Array:
        """``{group id: [size]}`` → ``[U]`` in global unit order."""
        if not self.group_ids:
            return jnp.zeros((0,), jnp.float32)
        return jnp.concatenate([jnp.asarray(masks[g], jnp.float32) for g in self.group_ids])

    def split(self, values: jax.Array) -> dict[str, jax.Array]:
        """``[U]`` → ``{group id: [size]}``."""
        return {
            g: values[self.offsets[j] : self.offsets[j + 1]] for j, g in enumerate(self.group_ids)
        }


def unit_index(graph: Graph, variables: Mapping) -> UnitIndex:
    """Build the :class:`UnitIndex` of ``graph``; ``variables`` give the leaf shapes."""
    groups = graph.prunable_groups
    sizes = np.array([g.size for g in groups], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    num_units = int(offsets[-1])
    flat = traverse_util.flatten_dict(dict(variables))
    owners: dict[tuple[Key, int], np.ndarray] = {}
    for j, g in enumerate(groups):
        for sl in g.params:
            if sl.collection != "params":
                continue
            if sl.key not in flat:
                raise ValueError(f"group {g.id} names leaf {'/'.join(sl.key)}, not in variables.")
            length = flat[sl.key].shape[sl.axis]
            local = sl.owner(length)
            cur = owners.setdefault((sl.key, sl.axis), np.full((length,), num_units, np.int64))
            hit = local >= 0
            cur[hit] = offsets[j] + local[hit]
    maps = tuple(UnitMap(k, a, o) for (k, a), o in owners.items())
    group_of_unit = np.repeat(np.arange(len(groups)), sizes)
    return UnitIndex(tuple(g.id for g in groups), offsets, group_of_unit, maps)


def _along(values: jax.Array, axis: int, ndim: int) -> jax.Array:
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    return values.reshape(shape)


def unit_sum(
    index: UnitIndex, fn: Callable[..., jax.Array], *trees: Mapping
) -> jax.Array:
    """``[U]``: per unit, the sum over its parameter entries of ``fn(*leaves)`` (elementwise).

    ``trees`` are ``params``-collection trees of one structure (e.g. params and gradients).
    """
    flats = [traverse_util.flatten_dict(dict(t)) for t in trees]
    total = jnp.zeros((index.num_units + 1,), jnp.float32)
    for m in index.maps:
        path = m.key[1:]
        vals = fn(*(f[path] for f in flats)).astype(jnp.float32)
        axes = tuple(a for a in range(vals.ndim) if a != m.axis)
        per_pos = jnp.sum(vals, axis=axes)
        total = total + jax.ops.segment_sum(per_pos, m.owner, index.num_units + 1)
    return total[: index.num_units]


def unit_broadcast(
    index: UnitIndex, values: jax.Array, params: Mapping, fill: float = 0.0
) -> dict:
    """Spread ``values [U]`` onto a ``params`` tree: each entry gets its unit's value.

    Entries of no unit get ``fill``; an entry in units along several axes gets the maximum.
    Returns a tree of ``params``' structure with leaves broadcastable to the params' leaves.
    """
    ext = jnp.concatenate([values, jnp.asarray([fill], values.dtype)])
    flat = traverse_util.flatten_dict(dict(params))
    spread: dict[Key, jax.Array] = {}
    for m in index.maps:
        path = m.key[1:]
        v = _along(ext[m.owner], m.axis, flat[path].ndim)
        spread[path] = jnp.maximum(spread[path], v) if path in spread else v
    out = {
        k: spread.get(k, jnp.full((1,) * leaf.ndim, fill, values.dtype)) for k, leaf in flat.items()
    }
    return traverse_util.unflatten_dict(out)


def rank_in_group(index: UnitIndex, values: jax.Array) -> jax.Array:
    """int ``[U]``: each unit's rank by ``values`` (ascending, stable) within its group."""
    seg = jnp.asarray(index.group_of_unit)
    order = jnp.lexsort((values, seg))
    rank = jnp.empty_like(seg).at[order].set(jnp.arange(index.num_units))
    return rank - jnp.asarray(index.offsets[:-1])[seg]


def hold_zero(index: UnitIndex, updates: Mapping, params: Mapping, pruned: jax.Array) -> dict:
    """``updates`` with every entry of a ``pruned`` unit (bool ``[U]``) replaced by ``-params``,
    so that after ``optax.apply_updates`` the pruned units are exactly zero."""
    zero = unit_broadcast(index, pruned.astype(jnp.float32), params)
    return jax.tree.map(lambda u, x, z: jnp.where(kept(z), -x, u), updates, params, zero)
