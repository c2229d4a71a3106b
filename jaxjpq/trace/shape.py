"""Shape primitives: broadcasts, transposes, reshapes (flatten / unflatten carry units),
concatenation, slicing, padding, dynamic slices; with the slim rewrite of their shape
parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxjpq.trace.registry import Rule, register_rule
from jaxjpq.trace.values import Ctx, Val, where


def _broadcast_in_dim(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    (x,) = ins[:1]
    shape = tuple(eqn.params["shape"])
    dims = eqn.params["broadcast_dimensions"]
    units = list(ctx.fresh(shape))
    zero = [x.allzero] * len(shape)
    for i, d in enumerate(dims):
        if x.units[i].size == shape[d]:
            units[d] = x.units[i]
            zero[d] = x.zero[i] or x.allzero
    return [Val(tuple(units), tuple(zero), x.param, None, x.nonneg, x.allzero)]


def pick_axes(x: Val, axes: Sequence[int]) -> Val:
    """``x`` with its axes reordered / dropped to ``axes`` (everything else carried over)."""
    return Val(
        tuple(x.units[a] for a in axes),
        tuple(x.zero[a] for a in axes),
        x.param,
        x.leaf,
        x.nonneg,
        x.allzero,
        x.layers,
    )


def _transpose(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    return [pick_axes(ins[0], eqn.params["permutation"])]


def _squeeze(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    (x,) = ins
    dims = {d % len(x.units) for d in eqn.params["dimensions"]}
    return [pick_axes(x, [a for a in range(len(x.units)) if a not in dims])]


def _reshape(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    x = ins[0]
    in_shape = tuple(u.size for u in x.units)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    out_units: list[np.ndarray | None] = [None] * len(out_shape)
    out_zero = [False] * len(out_shape)
    ii = [a for a, n in enumerate(in_shape) if n != 1]
    oo = [a for a, n in enumerate(out_shape) if n != 1]
    i = j = 0
    while i < len(ii) or j < len(oo):
        bi, bj = [ii[i]], [oo[j]]
        pi, pj = in_shape[ii[i]], out_shape[oo[j]]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                bi.append(ii[i])
                pi *= in_shape[ii[i]]
                i += 1
            else:
                bj.append(oo[j])
                pj *= out_shape[oo[j]]
                j += 1
        carried, z = _merge_axes(ctx, eqn, [x.units[a] for a in bi], [x.zero[a] for a in bi])
        pieces, carrier = _split_axis(ctx, carried, [out_shape[b] for b in bj])
        for k, (b, u) in enumerate(zip(bj, pieces, strict=True)):
            out_units[b] = u
            out_zero[b] = z and k == carrier
    for b, n in enumerate(out_shape):
        if out_units[b] is None:
            out_units[b] = ctx.uf.new(n)
    leaf = x.leaf if len(ii) == len(oo) else None
    return [
        Val(tuple(out_units), tuple(out_zero), x.param, leaf, x.nonneg,  # type: ignore[arg-type]
             x.allzero, x.layers if leaf is not None else ())
    ]


def _merge_axes(
    ctx: Ctx, eqn: Any, units: list[np.ndarray], zeros: list[bool]
) -> tuple[np.ndarray, bool]:
    """Flatten several axes into one; only one axis's units can be carried (row-major)."""
    if len(units) == 1:
        return units[0], zeros[0]
    meaningful = [k for k, u in enumerate(units) if _is_meaningful(ctx, u)]
    pick = meaningful[-1] if len(meaningful) == 1 else None
    sizes = [u.size for u in units]
    for k, u in enumerate(units):
        if k != pick:
            ctx.uf.poison(u, f"axis merged with another channel axis by {where(eqn)}")
    if pick is None:
        return ctx.uf.new(math.prod(sizes)), False
    shape = [1] * len(units)
    shape[pick] = sizes[pick]
    carried = np.broadcast_to(units[pick].reshape(shape), sizes).reshape(-1).copy()
    return carried, zeros[pick]


def _is_meaningful(ctx: Ctx, u: np.ndarray) -> bool:
    """True if the class of ``u`` contains a variable-leaf unit (a channel, not a fresh axis)."""
    return bool(u.size) and ctx.uf.find(int(u[0])) < ctx.n_leaf_units


def _split_axis(ctx: Ctx, units: np.ndarray, sizes: list[int]) -> tuple[list[np.ndarray], int]:
    """Unflatten one axis: the axis whose coordinate alone determines the unit carries it; if none,
    units are coarsened (unified) along the inner axes so the outermost axis carries them."""
    if len(sizes) == 1:
        return [units], 0
    grid = units.reshape(sizes)
    roots = np.vectorize(ctx.uf.find, otypes=[np.int64])(grid) if grid.size else grid
    for k in range(len(sizes)):
        moved = np.moveaxis(roots, k, 0).reshape(sizes[k], -1)
        if (moved == moved[:, :1]).all():
            out = [ctx.uf.new(n) for n in sizes]
            out[k] = np.moveaxis(grid, k, 0).reshape(sizes[k], -1)[:, 0].copy()
            return out, k
    rows = grid.reshape(sizes[0], -1)
    for r in rows:
        for u in r[1:].tolist():
            ctx.uf.union(int(r[0]), u)
    out = [ctx.uf.new(n) for n in sizes]
    out[0] = rows[:, 0].copy()
    return out, 0


def _concatenate(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    d = eqn.params["dimension"]
    nd = len(ins[0].units)
    units, zero = [], []
    for a in range(nd):
        if a == d:
            units.append(np.concatenate([v.units[a] for v in ins]))
        else:
            for v in ins[1:]:
                ctx.uf.union_arrays(ins[0].units[a], v.units[a])
            units.append(ins[0].units[a])
        zero.append(all(v.zero[a] or v.allzero for v in ins))
    parts: tuple = ()
    if all(v.leaf is not None for v in ins):  # a kernel fused from leaves: each stays a site
        offsets = np.cumsum([0] + [v.units[d].size for v in ins[:-1]]).tolist()
        parts = tuple((d, int(o), v) for o, v in zip(offsets, ins, strict=True))
    return [
        Val(
            tuple(units),
            tuple(zero),
            all(v.param for v in ins),
            None,
            all(v.nonneg for v in ins),
            all(v.allzero for v in ins),
            parts=parts,
        )
    ]


def _slice(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    x = ins[0]
    p = eqn.params
    strides = p["strides"] or (1,) * len(x.units)
    units = []
    for a, u in enumerate(x.units):
        s, e, st = p["start_indices"][a], p["limit_indices"][a], strides[a]
        if st != 1 and (s, e) != (0, u.size):
            ctx.uf.poison(u, f"strided slice by {where(eqn)}")
        units.append(u[s:e:st])
    return [Val(tuple(units), x.zero, x.param, None, x.nonneg, x.allzero)]


def _split(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    x = ins[0]
    a = eqn.params["axis"] % len(x.units)
    outs, start = [], 0
    for n in eqn.params["sizes"]:
        units = list(x.units)
        units[a] = x.units[a][start : start + n]
        start += n
        outs.append(Val(tuple(units), x.zero, x.param, None, x.nonneg, x.allzero))
    return outs


def _pad(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    x = ins[0]
    zero_pad = ins[1].allzero
    units, zero = [], []
    for a, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
        u = x.units[a]
        if interior or lo < 0 or hi < 0:
            ctx.uf.poison(u, f"padded with interior/negative padding by {where(eqn)}")
            units.append(ctx.uf.new(u.size + lo + hi + max(u.size - 1, 0) * interior))
            zero.append(False)
        else:
            units.append(np.concatenate([ctx.uf.new(lo), u, ctx.uf.new(hi)]))
            zero.append(x.zero[a])
    if not zero_pad:
        zero = [False] * len(zero)
    return [Val(tuple(units), tuple(zero), x.param, None, x.nonneg and ins[1].nonneg)]


def _rev(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    x = ins[0]
    dims = set(eqn.params["dimensions"])
    units = tuple(u[::-1] if a in dims else u for a, u in enumerate(x.units))
    return [Val(units, x.zero, x.param, None, x.nonneg, x.allzero)]


def _dynamic_slice(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    x = ins[0]
    sizes = eqn.params["slice_sizes"]
    units = []
    for a, u in enumerate(x.units):
        if sizes[a] == u.size:
            units.append(u)
        else:
            ctx.uf.poison(u, f"dynamically sliced by {where(eqn)}")
            units.append(ctx.uf.new(sizes[a]))
    return [Val(tuple(units), x.zero, x.param, None, x.nonneg)]


def _dynamic_update_slice(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    x, upd = ins[0], ins[1]
    for a, (u, w) in enumerate(zip(x.units, upd.units, strict=True)):
        if u.size == w.size:
            ctx.uf.union_arrays(u, w)
        else:
            ctx.uf.poison(u, f"dynamically updated by {where(eqn)}")
            ctx.uf.poison(w, f"dynamically updated by {where(eqn)} (axis {a})")
    zero = tuple(a and b for a, b in zip(x.zero, upd.zero, strict=True))
    return [Val(x.units, zero, x.param and upd.param)]


def _count(pos: np.ndarray | None, lo: int, hi: int) -> int:
    """Kept positions in ``[lo, hi)`` (``pos`` None: all kept)."""
    if pos is None:
        return hi - lo
    return int(np.count_nonzero((pos >= lo) & (pos < hi)))


def _reshape_slim(eqn: Any, in_pos: list, out_shapes: list, invals: list) -> dict:
    return {**eqn.params, "new_sizes": out_shapes[0], "dimensions": None}


def _broadcast_slim(eqn: Any, in_pos: list, out_shapes: list, invals: list) -> dict:
    return {**eqn.params, "shape": out_shapes[0]}


def _slice_slim(eqn: Any, in_pos: list, out_shapes: list, invals: list) -> dict:
    p = dict(eqn.params)
    pos = in_pos[0]
    starts = p["start_indices"]
    p["start_indices"] = tuple(_count(q, 0, s) for q, s in zip(pos, starts, strict=True))
    p["limit_indices"] = tuple(
        s + _count(q, s0, e)
        for q, s, s0, e in zip(pos, p["start_indices"], starts, p["limit_indices"], strict=True)
    )
    return p


def _split_slim(eqn: Any, in_pos: list, out_shapes: list, invals: list) -> dict:
    p = dict(eqn.params)
    q = in_pos[0][p["axis"]]
    sizes, start = [], 0
    for n in p["sizes"]:
        sizes.append(_count(q, start, start + n))
        start += n
    p["sizes"] = tuple(sizes)
    return p


def _dynamic_slice_slim(eqn: Any, in_pos: list, out_shapes: list, invals: list) -> dict:
    return {**eqn.params, "slice_sizes": out_shapes[0]}


register_rule("broadcast_in_dim", Rule(flow=_broadcast_in_dim, slim=_broadcast_slim,
                                       forward="pass"))
register_rule("reshape", Rule(flow=_reshape, slim=_reshape_slim, forward="pass"))
register_rule("transpose", Rule(flow=_transpose, forward="pass"))
register_rule("squeeze", Rule(flow=_squeeze, forward="pass"))
register_rule("expand_dims", Rule(forward="pass"))
register_rule("concatenate", Rule(flow=_concatenate, forward="fuse"))
register_rule("slice", Rule(flow=_slice, slim=_slice_slim))
register_rule("split", Rule(flow=_split, slim=_split_slim))
register_rule("pad", Rule(flow=_pad))
register_rule("rev", Rule(flow=_rev))
register_rule("dynamic_slice", Rule(flow=_dynamic_slice, slim=_dynamic_slice_slim))
register_rule("dynamic_update_slice", Rule(flow=_dynamic_update_slice))
