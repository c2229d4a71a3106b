"""Contractions (``dot_general``, ``conv_general_dilated``): the quantization sites. A
contraction with a parameter operand is a producer of its output channels and a consumer of its
input channels; its MACs; the slim rewrite of a depthwise conv's group count; in the compressed
forward its input operand is quantized."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxjpq.trace.registry import Rule, eqn_macs, register_rule
from jaxjpq.trace.values import Ctx, Key, Val, unsupported, where


def _site_name(ctx: Ctx, key: Key) -> str:
    if key in ctx.weight_site:
        return ctx.weight_site[key]
    base = "/".join(key[1:-1]) or "/".join(key)
    name = base
    taken = set(ctx.sites)
    if name in taken:
        name = "/".join(key[1:])
    k = 2
    while name in taken:
        name = f"{base}#{k}"
        k += 1
    ctx.weight_site[key] = name
    return name


def record_site(
    ctx: Ctx,
    eqn: Any,
    kind: str,
    act: Val,
    w: Val,
    w_out: list[int],
    w_in: list[int],
    act_in: list[int],
    out_units: Sequence[np.ndarray],
    share: tuple[int, int] = (1, 1),
) -> None:
    if w.leaf is None and w.parts:
        _record_parts(ctx, eqn, kind, act, w, w_out, w_in, act_in, out_units)
        return
    if w.leaf is None:
        ctx.missed.append((where(eqn), int(eqn_macs(eqn)) * ctx.mult,
                           "the weight operand is computed, not a variable leaf"))
        return
    leaf_axes_out, leaf_axes_in = [], []
    for a in (*w_out, *w_in):
        la = ctx.leaf_axis(w.units[a])
        if la is None:
            ctx.missed.append((where(eqn), int(eqn_macs(eqn)) * ctx.mult,
                               f"axes of {'/'.join(w.leaf)} are reshaped before the contraction"))
            return
        (leaf_axes_out if a in w_out else leaf_axes_in).append(la[1])
    name = _site_name(ctx, w.leaf)
    macs = int(eqn_macs(eqn)) * ctx.mult * share[0] // share[1]
    # kept MACs scale with the kept sizes of the output axes and of the kernel's input axes
    term = (macs, [*out_units, *(w.units[a] for a in w_in)])
    info = ctx.sites.get(name)
    if info is not None:
        info["macs"] += macs
        info["terms"].append(term)
        info["uses"] += 1
        return
    ctx.sites[name] = dict(
        terms=[term],
        weight=w.leaf,
        kind=kind,
        out_axes=tuple(leaf_axes_out),
        in_axes=tuple(leaf_axes_in),
        macs=macs,
        act_units=[act.units[a] for a in act_in],
        out_units=[w.units[a] for a in w_out],
        signed=not act.nonneg,
        layer_axes=tuple(w.layers),
        act=act,  # the operand's value: the walk binds one object per jaxpr value
        uses=1,
    )
    for a, la in zip(w_out, leaf_axes_out, strict=True):
        ctx.producers.append((name, w.leaf, la, w.units[a]))


def _record_parts(ctx: Ctx, eqn: Any, kind: str, act: Val, w: Val, w_out: list[int],
                  w_in: list[int], act_in: list[int], out_units: Sequence[np.ndarray]) -> None:
    """A contraction with a kernel concatenated from leaves: one site per leaf, its share of
    the MACs; the concatenated axis is an output axis (the parts' outputs are concatenated) or a
    contracted one (the activation is split to match and the parts' outputs summed)."""
    axis = w.parts[0][0]
    total = w.units[axis].size
    for _, off, pv in w.parts:
        n = pv.units[axis].size
        sl = slice(off, off + n)
        outs = [u[sl] if u is w.units[axis] else u for u in out_units]
        a = act
        if axis in w_in:
            k = act_in[w_in.index(axis)]
            a = dataclasses.replace(act, units=tuple(u[sl] if i == k else u
                                                     for i, u in enumerate(act.units)))
        record_site(ctx, eqn, kind, a, pv, w_out, w_in, act_in, outs, (n, total))


def consume(ctx: Ctx, eqn: Any, act: Val, a: int, w_units: np.ndarray) -> None:
    ctx.links.append((act.units[a], w_units))
    if not act.zero[a]:
        ctx.uf.poison(
            act.units[a],
            f"consumed by {where(eqn)} while pruned channels are not exactly zero",
        )


def _dot_general(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    lhs, rhs = ins
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    units, zero = [], []
    for a, b in zip(lb, rb, strict=True):
        ctx.uf.union_arrays(lhs.units[a], rhs.units[b])
        units.append(lhs.units[a])
        zero.append(lhs.zero[a] or rhs.zero[b])
    weight_side = None
    if rhs.param and not lhs.param:
        weight_side = 1
    elif lhs.param and not rhs.param:
        weight_side = 0
    for a, b in zip(lc, rc, strict=True):
        if weight_side == 1:
            consume(ctx, eqn, lhs, a, rhs.units[b])
        elif weight_side == 0:
            consume(ctx, eqn, rhs, b, lhs.units[a])
        else:
            ctx.uf.union_arrays(lhs.units[a], rhs.units[b])
            if not (lhs.zero[a] or rhs.zero[b]):
                ctx.uf.poison(lhs.units[a], f"contracted while not zero by {where(eqn)}")
    if lhs.param and rhs.param:
        ctx.missed.append((where(eqn), int(eqn_macs(eqn)) * ctx.mult,
                           "both operands are parameters"))
    lfree = [a for a in range(len(lhs.units)) if a not in lc and a not in lb]
    rfree = [b for b in range(len(rhs.units)) if b not in rc and b not in rb]
    units += [lhs.units[a] for a in lfree] + [rhs.units[b] for b in rfree]
    zero += [lhs.zero[a] for a in lfree] + [rhs.zero[b] for b in rfree]
    if weight_side == 1:
        record_site(ctx, eqn, "dot", lhs, rhs, rfree, list(rc), list(lc), units)
    elif weight_side == 0:
        record_site(ctx, eqn, "dot", rhs, lhs, lfree, list(lc), list(rc), units)
    nonneg = lhs.nonneg and rhs.nonneg
    return [Val(tuple(units), tuple(zero), lhs.param and rhs.param, None, nonneg)]


def _conv(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    lhs, rhs = ins
    dn = eqn.params["dimension_numbers"]
    ls, rs, os_ = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    out_shape = tuple(eqn.outvars[0].aval.shape)
    groups = eqn.params["feature_group_count"]
    units = list(ctx.fresh(out_shape))
    zero = [False] * len(out_shape)
    if eqn.params["batch_group_count"] != 1 or lhs.param or not rhs.param:
        unsupported(ctx, eqn, ins, "conv with batch groups or without a parameter kernel")
        return [Val(tuple(units), tuple(zero))]
    units[os_[0]] = lhs.units[ls[0]]
    zero[os_[0]] = lhs.zero[ls[0]]
    for d in ls[2:]:
        ctx.uf.poison(lhs.units[d], f"convolved spatially by {where(eqn)}")
    c_in = lhs.units[ls[1]]
    w_in, w_out = rhs.units[rs[1]], rhs.units[rs[0]]
    n_in, n_out = c_in.size, w_out.size
    if groups == 1:
        consume(ctx, eqn, lhs, ls[1], w_in)
        zero[os_[1]] = rhs.zero[rs[0]]
    elif w_in.size == 1:  # depthwise: output channel g*m + j is computed from input channel g
        m = n_out // groups
        for g in range(groups):
            for j in range(m):
                ctx.uf.union(int(c_in[g]), int(w_out[g * m + j]))
        zero[os_[1]] = rhs.zero[rs[0]] or lhs.zero[ls[1]]
    else:  # grouped: channel i of every group is one unit on each side
        k, m = n_in // groups, n_out // groups
        for g in range(1, groups):
            for i in range(k):
                ctx.uf.union(int(c_in[i]), int(c_in[g * k + i]))
            for j in range(m):
                ctx.uf.union(int(w_out[j]), int(w_out[g * m + j]))
        ctx.links.append((c_in[:k], w_in))
        if not lhs.zero[ls[1]]:
            ctx.uf.poison(c_in, f"consumed by {where(eqn)} while pruned channels are not zero")
        zero[os_[1]] = rhs.zero[rs[0]]
    units[os_[1]] = w_out
    record_site(ctx, eqn, "conv", lhs, rhs, [rs[0]], [rs[1]], [ls[1]], units)
    return [Val(tuple(units), tuple(zero), False, None, lhs.nonneg and rhs.nonneg)]


def conv_macs(eqn: Any) -> int:
    """``prod(out.shape) · k_1 ⋯ k_n · (c_in / feature_groups)``, any dimension numbers and
    spatial rank. Input dilation (transposed conv) is counted densely: taps on inserted zeros
    still count, as on hardware that does not skip them."""
    rhs = eqn.invars[1].aval
    (out,) = (v.aval for v in eqn.outvars)
    rs = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
    # with batch_group_count > 1 the output batch already shrinks, so the product stays exact
    return int(math.prod(out.shape) * rhs.shape[rs[1]] * math.prod(rhs.shape[d] for d in rs[2:]))


def dot_macs(eqn: Any) -> int:
    """Product of the batch, contracted and both free dimensions."""
    lhs = eqn.invars[0].aval
    (out,) = (v.aval for v in eqn.outvars)
    (lc, _), _ = eqn.params["dimension_numbers"]
    return int(math.prod(out.shape) * math.prod(lhs.shape[d] for d in lc))


def _conv_slim(eqn: Any, in_pos: list, out_shapes: list, invals: list) -> dict:
    """A depthwise conv's group count follows its (cut) input channels."""
    p = dict(eqn.params)
    dn = p["dimension_numbers"]
    if p["feature_group_count"] > 1 and eqn.invars[1].aval.shape[dn.rhs_spec[1]] == 1:
        p["feature_group_count"] = int(np.shape(invals[0])[dn.lhs_spec[1]])
    return p


register_rule("dot_general", Rule(flow=_dot_general, macs=dot_macs, forward="site"))
register_rule("conv_general_dilated", Rule(flow=_conv, slim=_conv_slim, macs=conv_macs,
                                           forward="site"))
