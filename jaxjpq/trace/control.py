"""Calls and control flow: ``pjit`` / ``remat`` / custom-derivative calls are walked
inline; ``scan`` / ``while`` bodies are walked once with their carries tied to their outputs
(a scanned leaf's sliced axis recorded as a layer axis); every ``cond`` branch is walked."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxjpq.jaxprs import CALL_PRIMITIVES, sub_jaxpr
from jaxjpq.trace.registry import Rule, register_rule
from jaxjpq.trace.tracer import walk
from jaxjpq.trace.values import Ctx, Val, fresh_val, unsupported, where


def _call(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    sub, consts = sub_jaxpr(eqn.params)
    if sub is None:
        unsupported(ctx, eqn, ins, "call without a sub-jaxpr")
        return [fresh_val(ctx, v.aval) for v in eqn.outvars]
    n = len(sub.invars)
    return walk(ctx, sub, consts, ins[len(ins) - n :], path)


def _carry_fix(ctx: Ctx, eqn: Any, init: list[Val], out: list[Val]) -> list[Val]:
    res = []
    for a, b in zip(init, out, strict=True):
        for u, w in zip(a.units, b.units, strict=True):
            ctx.uf.union_arrays(u, w)
        for u, za, zb in zip(a.units, a.zero, b.zero, strict=True):
            if za and not zb:
                ctx.uf.poison(u, f"zero-ness not kept through the loop carry of {where(eqn)}")
        res.append(Val(a.units, a.zero, a.param and b.param, None, a.nonneg and b.nonneg))
    return res


def _loop_carry(init: list[Val], ins: list[Val]) -> list[Val]:
    """A loop's carries enter the body as data when any loop input is data: a carry that starts
    from constants (an RNN's zero state) becomes data-dependent after one iteration."""
    if all(v.param for v in ins):
        return init
    # the body is walked once, so what holds of the initial carry only (non-negative, all
    # zeros) need not hold after an iteration
    return [dataclasses.replace(v, param=False, leaf=None, nonneg=False, allzero=False)
            for v in init]


def _sliced_layers(ctx: Ctx, x: Val) -> tuple[int, ...]:
    """``x.layers`` plus the leaf axis a scan slices off ``x`` (its leading axis)."""
    if x.leaf is None or not x.units:
        return ()
    la = ctx.leaf_axis(x.units[0])
    return (*x.layers, la[1]) if la is not None and la[0] == x.leaf else ()


def _scan(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    p = eqn.params
    nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
    consts, init, xs = ins[:nc], ins[nc : nc + nk], ins[nc + nk :]
    init = _loop_carry(init, ins)
    xs_body = [Val(x.units[1:], x.zero[1:], x.param, x.leaf, x.nonneg, x.allzero,
                    _sliced_layers(ctx, x)) for x in xs]
    body = p["jaxpr"]
    saved = ctx.mult
    ctx.mult *= length
    outs = walk(ctx, body.jaxpr, list(body.consts), consts + init + xs_body, path + ("body",))
    ctx.mult = saved
    carry = _carry_fix(ctx, eqn, init, outs[:nk])
    ys = []
    for y, v in zip(outs[nk:], eqn.outvars[nk:], strict=True):
        ys.append(Val((ctx.uf.new(v.aval.shape[0]), *y.units), (False, *y.zero), y.param))
    return carry + ys


def _while(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = ins[:cn], ins[cn : cn + bn], ins[cn + bn :]
    init = _loop_carry(init, ins)
    body, cond = p["body_jaxpr"], p["cond_jaxpr"]
    outs = walk(ctx, body.jaxpr, list(body.consts), bconsts + init, path + ("body",))
    carry = _carry_fix(ctx, eqn, init, outs)
    walk(ctx, cond.jaxpr, list(cond.consts), cconsts + carry, path + ("cond",))
    return carry


def _cond(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    ops = ins[1:]
    results = []
    for b, br in enumerate(eqn.params["branches"]):
        results.append(walk(ctx, br.jaxpr, list(br.consts), ops, path + ("branch", b)))
    outs = []
    for k in range(len(eqn.outvars)):
        first = results[0][k]
        for other in results[1:]:
            for u, w in zip(first.units, other[k].units, strict=True):
                ctx.uf.union_arrays(u, w)
        zero = tuple(all(r[k].zero[a] for r in results) for a in range(len(first.units)))
        outs.append(Val(first.units, zero, all(r[k].param for r in results)))
    return outs


register_rule(sorted(CALL_PRIMITIVES), Rule(flow=_call, control="call"))
register_rule("scan", Rule(flow=_scan, control="scan"))
register_rule("while", Rule(flow=_while, control="while"))
register_rule("cond", Rule(flow=_cond, control="cond"))
