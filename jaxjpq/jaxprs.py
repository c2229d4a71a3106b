"""The shared vocabulary of the jaxpr walkers (tracer, slim, compressed forward, MAC counter):
which primitives are plain calls into a sub-jaxpr, how to open one, how tree paths become leaf
keys, and which leaves are traced values."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

# Primitives that call one sub-jaxpr with their operands (no control flow).
CALL_PRIMITIVES = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "remat",
        "remat2",
        "checkpoint",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
        "custom_lin",
    }
)
SUBJAXPR_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def sub_jaxpr(params: Mapping) -> tuple[Any, list]:
    """``(jaxpr, consts)`` called by an eqn with these ``params``, or ``(None, [])``."""
    for k in SUBJAXPR_KEYS:
        j = params.get(k)
        if isinstance(j, jcore.ClosedJaxpr):
            return j.jaxpr, list(j.consts)
        if isinstance(j, jcore.Jaxpr):
            return j, []
    return None, []


def key_of(path: Sequence[Any]) -> tuple[str, ...]:
    """Tree path -> tuple of strings (dict keys, attribute names, sequence indices)."""
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey | jax.tree_util.FlattenedIndexKey):
            out.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(str(k.name))
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(str(k.idx))
        else:
            out.append(str(k))
    return tuple(out)


def is_dynamic(x: Any) -> bool:
    """True for array-like leaves (traced when a function is made into a jaxpr)."""
    return isinstance(x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct) or (
        hasattr(x, "shape") and hasattr(x, "dtype")
    )


def aval(x: Any) -> jax.ShapeDtypeStruct:
    """Abstract value (shape, dtype, weak type) of an array-like leaf."""
    return jax.ShapeDtypeStruct(
        np.shape(x), jnp.result_type(x.dtype), weak_type=getattr(x, "weak_type", False)
    )


def cached(cache: dict, key: Any, make: Callable[[], Any]) -> Any:
    """``cache[key]``, computed by ``make()`` on a miss; an unhashable key (a static argument
    that cannot be hashed) is computed every time and never stored."""
    try:
        hash(key)
    except TypeError:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]
