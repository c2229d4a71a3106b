"""Elementwise primitives (unary, binary, select, clamp) and fresh-value sources (iota,
random bits): they unify the positions of equal-shaped axes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.extend.core as jcore
import numpy as np

from jaxjpq.trace.registry import Rule, register_rule
from jaxjpq.trace.values import Ctx, Val, fresh_val

_ZERO_UNARY = frozenset(
    {
        "neg", "tanh", "sin", "tan", "sqrt", "cbrt", "abs", "sign", "erf", "integer_pow", "square",
        "convert_element_type", "copy", "copy_p", "reduce_precision", "expm1", "log1p", "asin",
        "atan", "sinh", "asinh", "atanh", "real", "imag", "round", "floor", "ceil", "stop_gradient",
        "erf_inv", "sharding_constraint", "optimization_barrier",
    }
)  # fmt: skip


_OTHER_UNARY = frozenset(
    {
        "exp", "exp2", "log", "logistic", "rsqrt", "cos", "cosh", "acos", "acosh", "not",
        "is_finite", "bitcast_convert_type", "population_count", "clz", "lgamma", "digamma",
        "erfc",
    }
)  # fmt: skip


_BINARY_ADD = frozenset({"add", "sub", "max", "min", "add_any", "or", "xor"})


_BINARY_MUL = frozenset({"mul", "and"})


_BINARY_OTHER = frozenset(
    {
        "div", "rem", "pow", "atan2", "nextafter", "eq", "ne", "lt", "le", "gt", "ge",
        "shift_left", "shift_right_logical", "shift_right_arithmetic", "complex", "mulhi",
        "clamp", "select_n", "igamma", "igammac",
    }
)  # fmt: skip


_NONNEG_UNARY = frozenset({"exp", "exp2", "sqrt", "abs", "logistic", "square", "population_count"})


_RNG = frozenset(
    {
        "random_bits", "random_seed", "random_wrap", "random_unwrap", "random_split",
        "random_fold_in", "threefry2x32", "rng_bit_generator", "rng_uniform", "iota",
    }
)  # fmt: skip


def _is_zero_literal(v: Val) -> bool:
    return v.allzero


def _elementwise(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    name = eqn.primitive.name
    out_aval = eqn.outvars[0].aval
    shape = tuple(out_aval.shape)
    nd = len(shape)
    units, zero = [], []
    ops = list(range(len(ins)))
    if name == "select_n":
        ops = ops[1:]
    elif name == "clamp":
        ops = [1]
    for a in range(nd):
        full = [
            i
            for i in range(len(ins))
            if len(ins[i].units) == nd and ins[i].units[a].size == shape[a]
        ]
        if full:
            base = ins[full[0]].units[a]
            for i in full[1:]:
                ctx.uf.union_arrays(base, ins[i].units[a])
            units.append(base)
        else:
            units.append(ctx.uf.new(shape[a]))

        def z(i: int, a: int = a) -> bool:
            v = ins[i]
            if v.allzero:
                return True
            return len(v.units) == nd and v.units[a].size == shape[a] and v.zero[a]

        if name in _ZERO_UNARY:
            zero.append(z(0))
        elif name in _BINARY_MUL:
            zero.append(any(z(i) for i in ops))
        elif name in ("max", "min"):
            zero.append(all(z(i) or _clips_to_zero(eqn, i, name) for i in ops))
        elif name in _BINARY_ADD or name == "select_n":
            zero.append(all(z(i) for i in ops))
        elif name in ("div", "rem"):
            zero.append(z(0))
        elif name == "integer_pow":
            zero.append(z(0) and eqn.params.get("y", 1) > 0)
        else:
            zero.append(False)
    param = all(v.param for v in ins)
    leaf = (
        ins[0].leaf
        if name in ("convert_element_type", "copy", "copy_p", "reduce_precision")
        else None
    )
    nonneg = _nonneg(eqn, ins)
    allzero = (name in _ZERO_UNARY and ins[0].allzero) or (
        name in _BINARY_MUL and any(v.allzero for v in ins)
    )
    cast = name in ("convert_element_type", "copy", "copy_p", "reduce_precision")
    layers = ins[0].layers if leaf is not None else ()
    parts = ins[0].parts if cast else ()
    return [Val(tuple(units), tuple(zero), param, leaf, nonneg, allzero, layers, parts)
            for _ in eqn.outvars]


def _clips_to_zero(eqn: Any, i: int, name: str) -> bool:
    """max(0, c) == 0 for c <= 0 and min(0, c) == 0 for c >= 0 (relu6's clip at 6)."""
    c = _literal_value(eqn, i)
    return c is not None and (c <= 0 if name == "max" else c >= 0)


def _literal_value(eqn: Any, i: int) -> float | None:
    v = eqn.invars[i]
    if isinstance(v, jcore.Literal) and np.ndim(v.val) == 0:
        try:
            return float(v.val)
        except (TypeError, ValueError):
            return None
    return None


def _nonneg(eqn: Any, ins: list[Val]) -> bool:
    name = eqn.primitive.name
    lits = [_literal_value(eqn, i) for i in range(len(ins))]
    nn = [v.nonneg or (lit is not None and lit >= 0) for v, lit in zip(ins, lits, strict=True)]
    if name == "max":
        return any(nn)
    if name in ("min", "mul", "div", "add"):
        return all(nn)
    if name in _NONNEG_UNARY:
        return True
    if name == "integer_pow":
        return eqn.params.get("y", 1) % 2 == 0 or nn[0]
    if name in _ZERO_UNARY and name not in ("neg", "sign", "tanh", "sin", "erf"):
        return nn[0]
    return False


def _rng(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
    # sources: slim evaluates them at the original shape and slices the result.
    return [fresh_val(ctx, v.aval) for v in eqn.outvars]


_CASTS = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                    "sharding_constraint", "optimization_barrier"})


def _iota_slim(eqn: Any, in_pos: list, out_shapes: list, invals: list) -> dict:
    return {**eqn.params, "shape": out_shapes[0]}


for _n in sorted(_ZERO_UNARY | _OTHER_UNARY | _BINARY_ADD | _BINARY_MUL | _BINARY_OTHER):
    register_rule(_n, Rule(flow=_elementwise, forward="cast" if _n in _CASTS else "opaque"))
for _n in sorted(_RNG):
    register_rule(_n, Rule(flow=_rng, slim=_iota_slim if _n == "iota" else None))
register_rule("device_put", Rule(forward="cast"))


def unary_flow(*, zero_preserving: bool, nonneg: bool = False) -> Callable:
    """A ``Rule.flow`` for a unary, shape-preserving primitive: each output position comes from
    the same input position. ``zero_preserving``: f(0) == 0, so pruned (zero) positions stay
    zero and the channels through it stay prunable; ``nonneg``: its output is >= 0 (the next
    site's input quantizer is then unsigned)."""

    def flow(ctx: Ctx, eqn: Any, ins: list[Val], path: tuple) -> list[Val]:
        x = ins[0]
        zero = x.zero if zero_preserving else (False,) * len(x.units)
        return [Val(x.units, zero, x.param, None, nonneg, x.allzero and zero_preserving)]

    return flow
