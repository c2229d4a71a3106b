"""Reductions, arg-reductions, cumulative ops and pooling windows."""

from __future__ import annotations

from typing import Any

from jaxjpq.trace.registry import Rule, register_rule
from jaxjpq.trace.values import Ctx, Val, where


def _reduce(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    x = ins[0]
    name = eqn.primitive.name
    axes = {a % max(len(x.units), 1) for a in eqn.params["axes"]}
    for a in axes:
        if name == "reduce_sum" and x.zero[a]:
            continue
        why = "not exactly zero at pruned positions" if name == "reduce_sum" else "order statistic"
        ctx.uf.poison(x.units[a], f"reduced over ({why}) by {where(eqn)}")
    keep = [a for a in range(len(x.units)) if a not in axes]
    nonneg = x.nonneg and name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod")
    return [
        Val(
            tuple(x.units[a] for a in keep),
            tuple(x.zero[a] for a in keep),
            x.param,
            None,
            nonneg,
            x.allzero and name == "reduce_sum",
        )
        for _ in eqn.outvars
    ]


def _argreduce(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    x = ins[0]
    axes = {a % len(x.units) for a in eqn.params["axes"]}
    for a in axes:
        ctx.uf.poison(x.units[a], f"reduced over by {where(eqn)}")
    keep = [a for a in range(len(x.units)) if a not in axes]
    return [Val(tuple(x.units[a] for a in keep), (False,) * len(keep), x.param)]


def _cumulative(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    x = ins[0]
    a = eqn.params["axis"] % len(x.units)
    ctx.uf.poison(x.units[a], f"scanned over by {where(eqn)}")
    zero = tuple(z if b != a else False for b, z in enumerate(x.zero))
    return [Val(x.units, zero, x.param)]


def _reduce_window(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    x = ins[0]
    p = eqn.params
    out_shape = tuple(eqn.outvars[0].aval.shape)
    units, zero = [], []
    for a, n in enumerate(out_shape):
        trivial = (
            p["window_dimensions"][a] == 1
            and p["window_strides"][a] == 1
            and tuple(p["padding"][a]) == (0, 0)
            and p.get("base_dilation", (1,) * len(out_shape))[a] == 1
        )
        if trivial and x.units[a].size == n:
            units.append(x.units[a])
            zero.append(x.zero[a])
        else:
            ctx.uf.poison(x.units[a], f"pooled over by {where(eqn)}")
            units.append(ctx.uf.new(n))
            zero.append(False)
    return [Val(tuple(units), tuple(zero), x.param, None, x.nonneg)]


register_rule(("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
               "reduce_or"), Rule(flow=_reduce))
register_rule(("argmax", "argmin"), Rule(flow=_argreduce))
register_rule(("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"), Rule(flow=_cumulative))
register_rule(("reduce_window_sum", "reduce_window_max", "reduce_window_min"),
              Rule(flow=_reduce_window))
