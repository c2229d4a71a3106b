"""From a walked jaxpr to a :class:`~jaxjpq.graph.Graph`: groups from unit classes,
slices per leaf axis, sites (one per layer of a scanned stack) with their axes' owners."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxjpq.graph import AxisUnits, Graph, Group, MacTerm, Site, Slice
from jaxjpq.jaxprs import aval, is_dynamic
from jaxjpq.trace.macs import jaxpr_macs
from jaxjpq.trace.tracer import Traced, trace_jaxpr
from jaxjpq.trace.values import Ctx, Key, Units


def _group_of_roots(traced: Traced) -> tuple[list[dict], dict[int, int]]:
    """Components of unit classes connected through a shared leaf axis that hold a producer."""
    ctx, roots = traced.ctx, traced.roots
    comp = Units()
    comp.new(len(roots))
    for units in ctx.leaf_units.values():
        for u in units:
            r = roots[u]
            for x in np.unique(r[1:]).tolist():
                comp.union(int(r[0]), x)
    for _, _, _, u in ctx.producers:
        r = roots[u]
        for x in np.unique(r[1:]).tolist():
            comp.union(int(r[0]), x)
    groups: list[dict] = []
    by_comp: dict[int, dict] = {}
    for name, key, axis, u in ctx.producers:
        c = comp.find(int(roots[u[0]]))
        if c in by_comp:
            continue
        order = list(dict.fromkeys(roots[u].tolist()))
        g = dict(comp=c, name=name, key=key, axis=axis, units=order)
        by_comp[c] = g
        groups.append(g)
    root_group: dict[int, int] = {}
    for gi, g in enumerate(groups):
        for r in g["units"]:
            root_group[r] = gi
    # roots of the component that the first producer does not cover
    for g in groups:
        g["extra"] = False
    comp_roots = np.asarray([comp.find(int(r)) for r in range(len(roots))]) if groups else None
    if comp_roots is not None:
        all_class_roots = np.unique(roots)
        for r in all_class_roots.tolist():
            c = int(comp_roots[r])
            if c in by_comp and r not in root_group:
                by_comp[c]["extra"] = True
    return groups, root_group


def _slices_for(
    key: Key, axis: int, unit_of_pos: np.ndarray, units: list[int]
) -> np.ndarray | None:
    """index [size, k] of positions owned by each unit, or None if ownership is uneven."""
    idx = [np.nonzero(unit_of_pos == r)[0] for r in units]
    k = {len(i) for i in idx}
    if len(k) != 1 or 0 in k:
        return None
    return np.stack(idx).astype(np.int64)


def _unit_owner_map(
    groups: list[dict], root_group: Mapping[int, int], link: Mapping[int, int]
) -> dict[int, tuple[int, int]]:
    """``{class root: (group index, unit index)}`` for group classes and for consumer-row classes
    linked to one (slimming removes a linked row with its channel)."""
    out: dict[int, tuple[int, int]] = {}
    for gi, g in enumerate(groups):
        for j, r in enumerate(g["units"]):
            out[int(r)] = (gi, j)
    for w, a in link.items():
        if a in root_group and w not in out:
            out[int(w)] = out[int(a)]
    return out


def _axis_units(
    units: np.ndarray, roots: np.ndarray, unit_of: Mapping[int, tuple[int, int]], gid_of: list
) -> AxisUnits:
    """The :class:`AxisUnits` of one axis whose raw unit ids are ``units``."""
    owners: dict[int, np.ndarray] = {}
    for p, r in enumerate(roots[units].tolist()):
        hit = unit_of.get(r)
        if hit is None:
            continue
        gi, j = hit
        owners.setdefault(gi, np.full((units.size,), -1, np.int64))[p] = j
    return AxisUnits(int(units.size), tuple((gid_of[gi], o) for gi, o in sorted(owners.items())))


def _site_order(ctx: Ctx) -> list[tuple[str, dict, tuple[int, ...]]]:
    """``(name, record, layer)`` per site in execution order. The sites of one scanned layer
    stack (consecutive records with the same stack sizes) run layer by layer, so they come out
    layer-major, named ``base[k]`` with ``k`` the flat layer index."""
    entries = list(ctx.sites.items())

    def sizes(rec: dict) -> tuple[int, ...]:
        return tuple(ctx.leaf_shapes[rec["weight"]][a] for a in rec["layer_axes"])

    out: list[tuple[str, dict, tuple[int, ...]]] = []
    i = 0
    while i < len(entries):
        name, rec = entries[i]
        if not rec["layer_axes"]:
            out.append((name, rec, ()))
            i += 1
            continue
        j = i
        while j < len(entries) and entries[j][1]["layer_axes"] and (
                sizes(entries[j][1]) == sizes(rec)):
            j += 1
        for k, idx in enumerate(np.ndindex(*sizes(rec))):
            out.extend((f"{n}[{k}]", r, tuple(int(x) for x in idx)) for n, r in entries[i:j])
        i = j
    return out


def build_graph(traced: Traced, batch_size: int, apply_fn: Callable, var_avals: Any) -> Graph:
    """Turn a walked jaxpr into a :class:`Graph` (groups in first-producer order, sites in
    execution order)."""
    ctx, roots = traced.ctx, traced.roots
    groups, root_group = _group_of_roots(traced)
    reasons = {ctx.uf.find(r): v for r, v in ctx.uf.reasons.items()}
    # consumer links: weight-row root -> group unit root
    link: dict[int, int] = {}
    link_bad: dict[int, str] = {}
    for act_u, w_u in ctx.links:
        for a, w in zip(roots[act_u].tolist(), roots[w_u].tolist(), strict=True):
            if a not in root_group:
                continue
            if w in link and link[w] != a:
                link_bad[a] = "a consumer row is shared by two channels"
                link_bad[link[w]] = link_bad[a]
            link[w] = a
            if w in root_group:
                link_bad[a] = "a channel's consumer rows are themselves a pruned channel"
    params: list[list[Slice]] = [[] for _ in groups]
    deps: list[list[Slice]] = [[] for _ in groups]
    bad: list[list[str]] = [[] for _ in groups]
    for gi, g in enumerate(groups):
        if g["extra"]:
            bad[gi].append("channels of this group are not all produced by one layer")
    for key, units in ctx.leaf_units.items():
        for axis, u in enumerate(units):
            if u.size == 0:
                continue
            r = roots[u]
            gids = {root_group.get(x) for x in np.unique(r).tolist()}
            for gi in gids - {None}:
                uniq = groups[gi]["units"]
                idx = _slices_for(key, axis, r, uniq)
                if idx is None:
                    bad[gi].append(f"{'/'.join(key)} axis {axis} does not hold every channel")
                    continue
                sl = Slice(key[0], key[1:], axis, idx)
                (params if key[0] == "params" else deps)[gi].append(sl)
            lr = np.asarray([link.get(x, -1) for x in r.tolist()])
            lg = {root_group.get(x) for x in np.unique(lr).tolist() if x >= 0}
            for gi in lg - {None}:
                idx = _slices_for(key, axis, lr, groups[gi]["units"])
                if idx is None:
                    bad[gi].append(f"consumer {'/'.join(key)} axis {axis} rows are uneven")
                    continue
                deps[gi].append(Slice(key[0], key[1:], axis, idx))
    out_groups: list[Group] = []
    used: set[str] = set()
    for gi, g in enumerate(groups):
        shape = ctx.leaf_shapes[g["key"]]
        site = ctx.sites.get(g["name"], {})
        n_out = len(site.get("out_axes", (g["axis"],)))
        gid = "/".join(g["key"][1:]) + (":out" if n_out <= 1 else f":out{g['axis']}")
        base, k = gid, 2
        while gid in used:
            gid = f"{base}#{k}"
            k += 1
        used.add(gid)
        g["id"] = gid
        why = list(bad[gi])
        for r in g["units"]:
            why += reasons.get(int(r), [])
            if r in link_bad:
                why.append(link_bad[r])
        why = list(dict.fromkeys(why))
        del shape
        out_groups.append(
            Group(
                id=gid,
                size=len(g["units"]),
                params=tuple(params[gi]),
                dependents=tuple(deps[gi]),
                prunable=not why,
                reason="; ".join(why[:3]) + (f" (+{len(why) - 3} more)" if len(why) > 3 else ""),
            )
        )
    unit_of = _unit_owner_map(groups, root_group, link)
    gid_of = [g.id for g in out_groups]
    sites = []
    read: list[tuple[Any, bool, str]] = []  # (operand, signed, first site reading it)
    for name, s, layer in _site_order(ctx):
        # a site that reads the very value an earlier one reads shares its input quantizer;
        # stacked sites and weights used by several contractions keep their own
        act_from = None
        if not s["layer_axes"] and s["uses"] == 1:
            act_from = next((o for a, sg, o in read if a is s["act"] and sg == s["signed"]),
                            None)
            if act_from is None:
                read.append((s["act"], s["signed"], name))
        out_gid = in_gid = None
        if s["out_units"]:
            gi = root_group.get(int(roots[s["out_units"][0][0]]))
            out_gid = groups[gi]["id"] if gi is not None else None
        if s["act_units"] and s["act_units"][0].size:
            gi = root_group.get(int(roots[s["act_units"][0][0]]))
            in_gid = groups[gi]["id"] if gi is not None else None
        shape, la = ctx.leaf_shapes[s["weight"]], s["layer_axes"]
        n_layers = math.prod(shape[a] for a in la)

        def in_slice(a: int, la: tuple = la) -> int:
            return a - sum(1 for b in la if b < a)

        sites.append(
            Site(
                name=name,
                weight=s["weight"],
                kind=s["kind"],
                weight_shape=tuple(n for a, n in enumerate(shape) if a not in la),
                out_axes=tuple(in_slice(a) for a in s["out_axes"]),
                in_axes=tuple(in_slice(a) for a in s["in_axes"]),
                macs=int(s["macs"]) // n_layers,
                macs_per_example=s["macs"] / n_layers / max(batch_size, 1),
                out_group=out_gid,
                in_group=in_gid,
                signed_input=s["signed"],
                weight_axes=tuple(
                    _axis_units(u, roots, unit_of, gid_of)
                    for a, u in enumerate(ctx.leaf_units[s["weight"]]) if a not in la
                ),
                mac_terms=tuple(
                    MacTerm(int(m) // n_layers,
                            tuple(_axis_units(u, roots, unit_of, gid_of) for u in axes))
                    for m, axes in s["terms"]
                ),
                layer_axes=la,
                layer=layer,
                stack_sizes=tuple(shape[a] for a in la),
                act_from=act_from,
            )
        )

    in_data = [i >= traced.n_var for i in traced.dyn_pos]
    weight_macs = jaxpr_macs(traced.closed.jaxpr, in_data, "once")
    info = dict(
        weight_macs=int(weight_macs.param),
        missed=tuple(sorted(ctx.missed, key=lambda m: -m[1])),
        apply_fn=apply_fn,
        var_avals=var_avals,
        # dtypes of the traced data arguments, in order (what the compressed forward checks)
        input_dtypes=tuple(str(a.dtype) for a, i in zip(traced.closed.in_avals, traced.dyn_pos,
                                                        strict=True) if i >= traced.n_var),
        leaf_shapes=dict(ctx.leaf_shapes),
        reps={
            grp.id: np.asarray([int(ctx.leaf_units[g["key"]][g["axis"]][0]) for _ in g["units"]])
            for grp, g in zip(out_groups, groups, strict=True)
        },
        traced=traced,
    )
    # representative raw leaf unit of each group unit (stable across re-traces of the same model)
    for grp, g in zip(out_groups, groups, strict=True):
        u = ctx.leaf_units[g["key"]][g["axis"]]
        r = roots[u]
        info["reps"][grp.id] = np.asarray([int(u[np.nonzero(r == x)[0][0]]) for x in g["units"]])
    return Graph(
        groups=tuple(out_groups), sites=tuple(sites), batch_size=batch_size, trace_info=info
    )


def trace(
    apply_fn: Callable, variables: Any, *example_args: Any, strict: bool = False, **kwargs: Any
) -> Graph:
    """Trace ``apply_fn(variables, *example_args, **kwargs)`` and return its channel graph.

    Args:
      apply_fn: e.g. ``model.apply`` (linen) or ``lambda s, x: nnx.merge(gd, s)(x)`` (nnx).
      variables: pytree of arrays; for linen ``{"params": ..., "batch_stats": ...}``. Leaf keys
        are the tree paths as strings, ``(collection, *path)``.
      *example_args, **kwargs: example inputs (arrays or ``jax.ShapeDtypeStruct``) and static
        options (e.g. ``train=False``); the leading size of the first array is the batch size.
      strict: raise ``ValueError`` at the first primitive / axis the rules cannot follow instead of
        marking the affected groups non-prunable.
    Returns:
      a :class:`Graph` whose groups' ``reason`` says why a group is not prunable; sites that
      read one tensor share its activation quantizer (``Site.act_from``).
    """
    traced = trace_jaxpr(apply_fn, variables, example_args, kwargs, strict)
    arrays = [x for x in jax.tree.leaves((example_args, kwargs)) if is_dynamic(x) and np.ndim(x)]
    batch = int(np.shape(arrays[0])[0]) if arrays else 1
    var_avals = jax.tree.map(lambda x: aval(x) if is_dynamic(x) else x, variables)
    graph = build_graph(traced, batch, apply_fn, var_avals)
    # the static options of the trace (e.g. train=False): what export serves the model with
    graph.trace_info["static_kwargs"] = {
        k: v for k, v in kwargs.items() if not any(is_dynamic(x) for x in jax.tree.leaves(v))}
    return graph
