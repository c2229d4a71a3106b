"""Remove pruned channels physically: ``slim(variables, state) -> (slim_fn, slim_vars)``.

Slimming works at the jaxpr level, so it needs no per-model code. For each call signature,
``apply_fn`` is traced with the *original* (abstract) variable shapes and walked by
:mod:`jaxjpq.trace`; every position of every axis of every value then has a unit class, and a class
is removed when it holds a pruned unit of a group (or the consumer rows linked to one). The jaxpr is
re-evaluated equation by equation with sliced values; shape parameters are rewritten (reshape
``new_sizes``, ``broadcast_in_dim`` shape, slice bounds, split sizes, pad widths, depthwise
``feature_group_count``), and sources (iota, random bits, constants) are evaluated at the original
shape and then sliced, so the slim model equals the masked forward (:func:`apply_masks`).
Control flow (``scan``, ``while``, ``cond``) is re-issued with slim bodies; calls
(``pjit``, ``custom_jvp``/``custom_vjp``, ``remat``) are inlined (forward values only).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxjpq.graph import Graph, Slice, check_variables, kept
from jaxjpq.jaxprs import aval, cached, is_dynamic, key_of, sub_jaxpr
from jaxjpq.trace import Traced, rule_for, trace_jaxpr, walk_jaxpr


def graph_of(state_or_masks: Any, graph: Graph | None, fn: str) -> Graph:
    """The graph of a ``CompressionState`` (its ``graph`` field), else ``graph``; ``ValueError``
    when neither is there."""
    own = getattr(state_or_masks, "graph", None)
    if own is not None:
        if graph is not None and graph is not own:
            raise ValueError(f"{fn}: the state carries its graph; leave graph= out.")
        return own
    if not isinstance(graph, Graph):
        raise ValueError(
            f"{fn}: plain masks need graph= (the traced Graph); a CompressionState carries its "
            "own."
        )
    return graph


def mask_dict(graph: Graph, state_or_masks: Any) -> dict[str, Any]:
    """``{group.id: mask}`` from a masks dict or an object with a ``.masks`` dict."""
    masks = getattr(state_or_masks, "masks", state_or_masks)
    if not isinstance(masks, Mapping):
        raise ValueError(
            "expected keep-masks {group.id: bool[size]} or an object with a .masks dict "
            f"(e.g. a CompressionState), got {type(state_or_masks).__name__}."
        )
    gm = graph.group_map
    unknown = [k for k in masks if k not in gm]
    if unknown:
        raise ValueError(f"masks name groups {unknown} that are not in the graph.")
    return dict(masks)


def apply_masks(graph: Graph, variables: Any, masks: Mapping[str, Any]) -> Any:
    """The masked forward's variables: every ``params`` slice of every group in ``masks`` is
    multiplied by its mask (float or bool ``[size]``; unit ``i`` scales entries ``index[i]``).

    Dependents are untouched. jit-compatible (indices are static; the masks may be traced).
    Returns a pytree with the structure of ``variables``.
    """
    check_variables(graph, variables)
    gm = graph.group_map
    masks = mask_dict(graph, masks)
    by_key: dict[tuple, list[tuple[Slice, Any]]] = {}
    for gid, m in masks.items():
        g = gm[gid]
        if jnp.shape(m) != (g.size,):
            raise ValueError(f"mask for {gid} has shape {jnp.shape(m)}, expected ({g.size},).")
        for sl in g.params:
            by_key.setdefault(sl.key, []).append((sl, m))
    seen: set = set()

    def one(path: Any, x: Any) -> Any:
        key = key_of(path)
        if key not in by_key:
            return x
        seen.add(key)
        for sl, m in by_key[key]:
            owner = sl.owner(x.shape[sl.axis])
            m = jnp.asarray(m)
            full = jnp.where(owner >= 0, m[np.maximum(owner, 0)], 1).astype(x.dtype)
            shape = [1] * x.ndim
            shape[sl.axis] = x.shape[sl.axis]
            x = x * full.reshape(shape)
        return x

    out = jax.tree_util.tree_map_with_path(one, variables)
    missing = set(by_key) - seen
    if missing:
        raise ValueError(
            f"variables have no leaves {sorted(missing)}; pass the variables the graph was "
            "traced with."
        )
    return out


class _Plan:
    """Kept positions of every value of one walked jaxpr."""

    def __init__(self, graph: Graph, traced: Traced, keep: Mapping[str, np.ndarray]):
        roots = traced.roots
        kept_root = np.ones(len(roots), bool)
        reps = graph.trace_info["reps"]
        for gid, k in keep.items():
            kept_root[roots[reps[gid][~k]]] = False
        for act_u, w_u in traced.ctx.links:
            kept_root[roots[w_u]] &= kept_root[roots[act_u]]
        self.kept = kept_root[roots]
        self.records = traced.ctx.records

    def positions(self, units: Sequence[np.ndarray]) -> tuple[np.ndarray | None, ...]:
        out = []
        for u in units:
            k = self.kept[u] if u.size else np.ones((0,), bool)
            out.append(None if k.all() else np.nonzero(k)[0])
        return tuple(out)


def _take(x: Any, pos: Sequence[np.ndarray | None]) -> Any:
    for a, p in enumerate(pos):
        if p is not None:
            x = jnp.take(x, p, axis=a)
    return x


class _Evaluator:
    def __init__(self, plan: _Plan):
        self.plan = plan

    def run(self, jaxpr: Any, consts: list, vals: list, units: list, path: tuple) -> tuple:
        plan = self.plan
        cunits = plan.records[path + ("consts",)]
        cvals = [(_take(jnp.asarray(c), plan.positions(u)), u)
                 for c, u in zip(consts, cunits, strict=True)]

        def step(i: int, eqn: Any, ins: list) -> list:
            out_units = plan.records[path + (i,)]
            outs = self.eqn(eqn, [x for x, _ in ins], [u for _, u in ins], out_units,
                            path + (i,))
            return list(zip(outs, out_units, strict=True))

        res = walk_jaxpr(jaxpr, cvals, list(zip(vals, units, strict=True)), step,
                         lambda v: (v.val, ()))
        return [x for x, _ in res], [u for _, u in res]

    def eqn(self, eqn: Any, invals: list, inunits: list, out_units: tuple, path: tuple) -> list:
        plan = self.plan
        name = eqn.primitive.name
        rule = rule_for(name)
        out_pos = [plan.positions(u) for u in out_units]
        if rule.control == "call":
            sub, consts = sub_jaxpr(eqn.params)
            n = len(sub.invars)
            outs, _ = self.run(sub, consts, invals[-n:], inunits[-n:], path)
            return outs
        if rule.control is not None:
            return getattr(self, rule.control + "_")(eqn, invals, inunits, path)
        sliced = any(
            tuple(np.shape(x)) != tuple(getattr(v.aval, "shape", ()))
            for x, v in zip(invals, eqn.invars, strict=True)
        )
        params = eqn.params
        if sliced:
            in_pos = [plan.positions(u) for u in inunits]
            shapes = [
                tuple(n if q is None else len(q) for n, q in zip(v.aval.shape, pos, strict=True))
                for v, pos in zip(eqn.outvars, out_pos, strict=True)
            ]
            if rule.slim is not None:
                params = rule.slim(eqn, in_pos, shapes, invals)
        with eqn.ctx.manager:
            ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
        outs = list(ans) if eqn.primitive.multiple_results else [ans]
        res = []
        for o, v, pos in zip(outs, eqn.outvars, out_pos, strict=True):
            if tuple(np.shape(o)) == tuple(v.aval.shape):
                o = _take(o, pos)
            want = tuple(n if q is None else len(q) for n, q in zip(v.aval.shape, pos, strict=True))
            if tuple(np.shape(o)) != want:
                raise ValueError(
                    f"slim: '{name}' at {eqn.source_info.name_stack} gave shape {np.shape(o)}, "
                    f"expected {want}. This primitive needs a rule with a slim rewrite "
                    "(jaxjpq.trace.register_rule); until then keep the affected groups unpruned."
                )
            res.append(o)
        return res

    def scan_(self, eqn: Any, invals: list, inunits: list, path: tuple) -> list:
        p = eqn.params
        nc, nk = p["num_consts"], p["num_carry"]
        body = p["jaxpr"]
        cv, iv, xv = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]
        cu, iu, xu = inunits[:nc], inunits[nc : nc + nk], inunits[nc + nk :]
        xu_body = [u[1:] for u in xu]

        def f(carry: Any, x: Any) -> Any:
            outs, _ = self.run(
                body.jaxpr, list(body.consts), cv + list(carry) + list(x),
                cu + iu + xu_body, path + ("body",),
            )  # fmt: skip
            return outs[:nk], outs[nk:]

        carry, ys = jax.lax.scan(
            f, iv, xv, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
        )
        return list(carry) + list(ys)

    def while_(self, eqn: Any, invals: list, inunits: list, path: tuple) -> list:
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cc, bc, init = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
        ccu, bcu, iu = inunits[:cn], inunits[cn : cn + bn], inunits[cn + bn :]
        body, cond = p["body_jaxpr"], p["cond_jaxpr"]

        def cond_fn(carry: Any) -> Any:
            outs, _ = self.run(
                cond.jaxpr, list(cond.consts), cc + list(carry), ccu + iu, path + ("cond",)
            )
            return outs[0]

        def body_fn(carry: Any) -> Any:
            outs, _ = self.run(
                body.jaxpr, list(body.consts), bc + list(carry), bcu + iu, path + ("body",)
            )
            return list(outs)

        return list(jax.lax.while_loop(cond_fn, body_fn, list(init)))

    def cond_(self, eqn: Any, invals: list, inunits: list, path: tuple) -> list:
        ops, units = invals[1:], inunits[1:]

        def branch(b: int, br: Any) -> Callable:
            def fn(*xs: Any) -> Any:
                outs, _ = self.run(br.jaxpr, list(br.consts), list(xs), units, path + ("branch", b))
                return outs

            return fn

        fns = [branch(b, br) for b, br in enumerate(eqn.params["branches"])]
        return list(jax.lax.switch(invals[0], fns, *ops))


def _keep_arrays(graph: Graph, masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
    gm = graph.group_map
    keep = {}
    for gid, m in masks.items():
        if isinstance(m, jax.core.Tracer):
            raise ValueError("slim needs concrete masks (call it outside jit).")
        k = kept(np.asarray(m).astype(np.float64).reshape(-1))
        g = gm[gid]
        if k.shape != (g.size,):
            raise ValueError(f"mask for {gid} has shape {k.shape}, expected ({g.size},).")
        if not k.all() and not g.prunable:
            raise ValueError(
                f"group {gid} is not prunable ({g.reason}); keep all of its units or leave it "
                "out of the masks."
            )
        if not k.all():
            keep[gid] = k
    return keep


def slim(
    variables: Any, state_or_masks: Any = None, *, graph: Graph | None = None
) -> tuple[Callable, Any]:
    """Remove pruned units everywhere they appear (params, running statistics, consumer rows).

    Args:
      variables: the original (dense) variables, same structure as at trace time; or a
        :class:`~jaxjpq.state.CompressedParams` pair alone (``{"params": pair.model}`` and its
        state).
      state_or_masks: a ``CompressionState`` (its graph and masks), or keep-masks
        ``{group.id: bool[size]}`` (True = keep; floats > 0.5 keep) with ``graph=``. Absent
        groups are kept whole.
      graph: the traced graph, for plain masks only.
    Returns:
      ``(slim_fn, slim_variables)``: ``slim_fn(slim_variables, *args, **kwargs)`` equals
      ``apply_fn(apply_masks(graph, variables, masks), *args, **kwargs)`` up to float rounding,
      at any batch size / input signature (re-traced once per signature; jit-compatible).
    """
    if state_or_masks is None and hasattr(variables, "compression"):
        variables, state_or_masks = variables.variables, variables.compression
    graph = graph_of(state_or_masks, graph, "slim")
    info = graph.trace_info
    if info is None:
        raise ValueError("slim needs a graph made by jaxjpq.trace (it carries the apply function).")
    check_variables(graph, variables)
    keep = _keep_arrays(graph, mask_dict(graph, state_or_masks))
    base: Traced = info["traced"]
    base_plan = _Plan(graph, base, keep)
    leaf_pos = {key: base_plan.positions(units) for key, units in base.ctx.leaf_units.items()}

    def cut(path: Any, x: Any) -> Any:
        key = key_of(path)
        if key in leaf_pos and is_dynamic(x):
            return _take(jnp.asarray(x), leaf_pos[key])
        return x

    slim_variables = jax.tree_util.tree_map_with_path(cut, variables)
    apply_fn, var_avals = info["apply_fn"], info["var_avals"]
    cache: dict = {}

    def slim_fn(slim_vars: Any, *args: Any, **kwargs: Any) -> Any:
        flat, _ = jax.tree_util.tree_flatten((args, kwargs))
        sig = tuple(
            (tuple(np.shape(x)), str(jnp.result_type(x.dtype))) if is_dynamic(x) else ("s", x)
            for x in flat
        )

        def make():
            abstract = jax.tree.map(lambda x: aval(x) if is_dynamic(x) else x, (args, kwargs))
            traced = trace_jaxpr(apply_fn, var_avals, abstract[0], abstract[1])
            return traced, _Plan(graph, traced, keep)

        traced, plan = cached(cache, sig, make)
        leaves = jax.tree_util.tree_leaves((slim_vars, args, kwargs))
        if len(leaves) < len(traced.dyn_pos) or max(traced.dyn_pos, default=-1) >= len(leaves):
            raise ValueError("slim_fn: variables/arguments do not match the traced structure.")
        vals = [leaves[i] for i in traced.dyn_pos]
        units = [traced.ctx.leaf_units[k] for k in traced.var_keys] + list(traced.in_units)
        for k, x, u in zip(traced.var_keys, vals, units, strict=False):
            want = tuple(
                n if q is None else len(q)
                for n, q in zip(traced.ctx.leaf_shapes[k], plan.positions(u), strict=True)
            )
            if tuple(np.shape(x)) != want:
                raise ValueError(
                    f"slim_fn: leaf {'/'.join(k)} has shape {np.shape(x)}, expected {want}; pass "
                    "the slim_variables returned by slim()."
                )
        closed = traced.closed
        outs, _ = _Evaluator(plan).run(closed.jaxpr, list(closed.consts), vals, units, ())
        return jax.tree_util.tree_unflatten(traced.out_tree, outs)

    return slim_fn, slim_variables
