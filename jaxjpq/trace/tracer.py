"""The channel-flow pass: make the jaxpr of ``apply_fn`` and walk it with the rules."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxjpq.jaxprs import aval, is_dynamic, key_of
from jaxjpq.trace.registry import RULES, walk_jaxpr
from jaxjpq.trace.values import Ctx, Key, Units, Val, fresh_val, literal_val, unsupported


def walk(ctx: Ctx, jaxpr: Any, consts: list, ins: Sequence[Val], path: tuple) -> list[Val]:
    """Walk ``jaxpr`` with input knowledge ``ins`` by the rules' ``flow``; record the out units
    of every eqn under ``path`` (what :mod:`jaxjpq.slim` cuts by)."""
    cvals = []
    for c in consts:
        shape = tuple(np.shape(c))
        cvals.append(Val(ctx.fresh(shape), (False,) * len(shape), True))
    ctx.records[path + ("consts",)] = tuple(v.units for v in cvals)

    def step(i: int, eqn: Any, ins_i: list) -> list:
        flow = RULES[eqn.primitive.name].flow if eqn.primitive.name in RULES else None
        if flow is None:
            unsupported(ctx, eqn, ins_i, "unsupported primitive")
            outs = [fresh_val(ctx, v.aval) for v in eqn.outvars]
        else:
            outs = flow(ctx, eqn, ins_i, path + (i,))
        ctx.records[path + (i,)] = tuple(o.units for o in outs)
        return outs

    return walk_jaxpr(jaxpr, cvals, list(ins), step, lambda v: literal_val(ctx, v))


@dataclasses.dataclass
class Traced:
    """One jaxpr of ``apply_fn`` at one call signature, with the walk's knowledge of it."""

    closed: Any
    out_tree: Any
    dyn_pos: list[int]
    static: tuple
    var_keys: list[Key]  # key of each dynamic variable leaf, in jaxpr invar order
    n_var: int
    ctx: Ctx
    roots: np.ndarray
    in_units: list[tuple[np.ndarray, ...]]
    out_units: list[tuple[np.ndarray, ...]]


def trace_jaxpr(
    apply_fn: Callable,
    variables: Any,
    args: tuple,
    kwargs: dict,
    strict: bool = False,
) -> Traced:
    """Make the jaxpr of ``apply_fn(variables, *args, **kwargs)`` and walk it (array leaves of
    ``variables``/``args`` may be ``jax.ShapeDtypeStruct``s)."""
    vflat, _ = jax.tree_util.tree_flatten_with_path(variables)
    n_var_leaves = len(vflat)
    flat, treedef = jax.tree_util.tree_flatten_with_path((variables, args, kwargs))
    leaves = [x for _, x in flat]
    dyn_pos = [i for i, x in enumerate(leaves) if is_dynamic(x)]
    dyn_set = set(dyn_pos)
    static = tuple((i, leaves[i]) for i in range(len(leaves)) if i not in dyn_set)

    def rebuilt(*dyn_vals: Any) -> Any:
        full = list(leaves)
        for i, v in zip(dyn_pos, dyn_vals, strict=True):
            full[i] = v
        v, a, kw = jax.tree_util.tree_unflatten(treedef, full)
        return apply_fn(v, *a, **kw)

    avals = [aval(leaves[i]) for i in dyn_pos]
    closed, out_shape = jax.make_jaxpr(rebuilt, return_shape=True)(*avals)
    out_flat, out_tree = jax.tree_util.tree_flatten_with_path(out_shape)

    ctx = Ctx(Units(), strict, {}, {}, [])
    ins: list[Val] = []
    var_keys: list[Key] = []
    for i in dyn_pos:
        if i < n_var_leaves:
            key = key_of(flat[i][0])[1:]
            shape = tuple(np.shape(leaves[i]))
            units = ctx.fresh(shape)
            ctx.leaf_units[key] = units
            ctx.leaf_shapes[key] = shape
            for a, u in enumerate(units):
                if u.size:
                    ctx.unit_leaf.append((int(u[0]), key, a))
            var_keys.append(key)
            zero = tuple(key[0] == "params" for _ in shape)
            ins.append(Val(units, zero, True, key))
    ctx.n_leaf_units = len(ctx.uf.parent)
    in_units = []
    for i in dyn_pos:
        if i >= n_var_leaves:
            shape = tuple(np.shape(leaves[i]))
            units = ctx.fresh(shape)
            for u in units:
                ctx.uf.poison(u, "reaches the network input")
            in_units.append(units)
            ins.append(Val(units, (False,) * len(shape)))
    outs = walk(ctx, closed.jaxpr, list(closed.consts), ins, ())
    out_units = []
    for (opath, _), o in zip(out_flat, outs, strict=True):
        okey = key_of(opath)
        state_key = _match_state(okey, ctx.leaf_shapes, tuple(u.size for u in o.units))
        if state_key is not None:  # an updated variable (e.g. batch_stats): same units as input
            for u, w in zip(o.units, ctx.leaf_units[state_key], strict=True):
                ctx.uf.union_arrays(u, w)
        else:
            for u in o.units:
                ctx.uf.poison(u, "reaches the network output")
        out_units.append(o.units)
    return Traced(
        closed,
        out_tree,
        dyn_pos,
        static,
        var_keys,
        n_var_leaves,
        ctx,
        ctx.uf.roots(),
        in_units,
        out_units,
    )


def _match_state(okey: Key, leaf_shapes: Mapping[Key, tuple], shape: tuple) -> Key | None:
    for n in range(len(okey)):
        k = okey[n:]
        if k in leaf_shapes and leaf_shapes[k] == shape and k[0] != "params":
            return k
    return None
