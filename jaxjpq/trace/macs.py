"""Multiply-accumulate (MAC) counting from a jaxpr, so it works on any JAX function.

A MAC is one multiply plus one add of the inner loop of a contraction. Only the two contraction
primitives count: ``conv_general_dilated`` and ``dot_general``; every other primitive (elementwise
ops, normalisation, pooling, gathers) counts 0. Sub-jaxprs are walked: ``pjit`` / ``closed_call``,
``custom_jvp_call``, ``custom_vjp_call``, ``remat`` (``checkpoint``), ``cond`` (the most expensive
branch), ``scan`` (body times ``length``) and ``while`` (unknown trip count: an error by default,
or the body counted once with ``while_policy="once"``).

MACs are split by operand kind. A contraction is a *parameter* contraction when at least one of
its operands does not depend on the data arguments (it is computed from parameters and constants
only: a kernel, a cast kernel, an embedding table); otherwise it is an *activation* contraction,
e.g. attention's ``q @ k^T`` and ``attn @ v``. Which positional arguments hold parameters is
given by ``param_argnums`` (default ``(0,)``: the Flax ``apply(variables, *inputs)`` convention).

Each primitive's MACs and its control-flow kind come from its rule in
:mod:`jaxjpq.trace.registry` (``eqn_macs`` is re-exported here).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from jax.extend import core

from jaxjpq.jaxprs import SUBJAXPR_KEYS, sub_jaxpr
from jaxjpq.trace.registry import eqn_macs, rule_for, walk_jaxpr

_WHILE_POLICIES = ("error", "once")


class MacCount(NamedTuple):
    """MACs of a function, split by operand kind (plain Python ints, batch included).

    Attributes:
      param: MACs of contractions with at least one parameter-only operand (conv / dense layers).
      activation: MACs of contractions of two data-dependent operands (attention scores, mixing).
    """

    param: int
    activation: int

    @property
    def total(self) -> int:
        """All MACs: ``param + activation``."""
        return self.param + self.activation


def _open(jaxpr_like: Any) -> core.Jaxpr:
    return jaxpr_like.jaxpr if isinstance(jaxpr_like, core.ClosedJaxpr) else jaxpr_like


def _subjaxpr(eqn: core.JaxprEqn) -> core.Jaxpr:
    sub, _ = sub_jaxpr(eqn.params)
    if sub is None:
        raise ValueError(
            f"count_macs: call primitive {eqn.primitive.name!r} has no sub-jaxpr under any of "
            f"{SUBJAXPR_KEYS}; add its parameter name to jaxjpq.jaxprs.SUBJAXPR_KEYS."
        )
    return sub


def _has_subjaxpr(eqn: core.JaxprEqn) -> bool:
    def is_jaxpr(v: Any) -> bool:
        if isinstance(v, core.Jaxpr | core.ClosedJaxpr):
            return True
        return isinstance(v, tuple | list) and any(is_jaxpr(x) for x in v)

    return any(is_jaxpr(v) for v in eqn.params.values())


def _walk(
    jaxpr: core.Jaxpr, in_data: Sequence[bool], while_policy: str
) -> tuple[MacCount, list[bool]]:
    """Count MACs of ``jaxpr``; ``in_data[i]`` says whether invar i depends on data.

    Returns the counts and, per outvar, whether it depends on data.
    """
    if len(in_data) != len(jaxpr.invars):
        raise ValueError(f"internal: {len(in_data)} taints for {len(jaxpr.invars)} invars")
    total = [0, 0]  # param, activation

    def step(i: int, eqn: core.JaxprEqn, ins: list[bool]) -> list[bool]:
        rule = rule_for(eqn.primitive.name)
        sub = MacCount(0, 0)
        outs = [any(ins)] * len(eqn.outvars)
        if rule.macs is not None:
            total[1 if all(ins[:2]) else 0] += eqn_macs(eqn)
        elif rule.control == "call":
            sub, outs = _walk(_subjaxpr(eqn), ins, while_policy)
        elif rule.control == "cond":
            counts = []
            outs = [False] * len(eqn.outvars)
            for branch in eqn.params["branches"]:
                c, o = _walk(_open(branch), ins[1:], while_policy)
                counts.append(c)
                outs = [a or b or ins[0] for a, b in zip(outs, o, strict=True)]
            sub = max(counts, key=lambda c: (c.total, c.param))
        elif rule.control == "scan":
            sub, outs = _walk_loop(eqn, ins, while_policy)
        elif rule.control == "while":
            sub, outs = _walk_while(eqn, ins, while_policy)
        elif _has_subjaxpr(eqn):
            raise ValueError(
                f"count_macs: unsupported higher-order primitive {eqn.primitive.name!r}; its "
                "sub-jaxpr would be skipped. Inline it (e.g. avoid the transform) or register a "
                "rule with control='call' for it (jaxjpq.trace.register_rule)."
            )
        total[0] += sub.param
        total[1] += sub.activation
        return outs

    consts = [False] * len(jaxpr.constvars)
    out_data = walk_jaxpr(jaxpr, consts, list(in_data), step, lambda v: False)
    return MacCount(total[0], total[1]), out_data


def _fixed_point_carry(
    body: core.Jaxpr, ins: list[bool], carry: slice, out_carry: slice, while_policy: str
) -> tuple[MacCount, list[bool]]:
    """Walk a loop body until the data-dependence of the carry stops growing."""
    ins = list(ins)
    while True:
        count, outs = _walk(body, ins, while_policy)
        new = [a or b for a, b in zip(ins[carry], outs[out_carry], strict=True)]
        if new == ins[carry]:
            return count, outs
        ins[carry] = new


def _walk_loop(eqn: core.JaxprEqn, ins: list[bool], while_policy: str) -> tuple[MacCount, list]:
    p = eqn.params
    body = _open(p["jaxpr"])
    n_c, n_carry = p["num_consts"], p["num_carry"]
    count, outs = _fixed_point_carry(
        body, ins, slice(n_c, n_c + n_carry), slice(0, n_carry), while_policy
    )
    length = int(p["length"])
    return MacCount(count.param * length, count.activation * length), outs


def _walk_while(eqn: core.JaxprEqn, ins: list[bool], while_policy: str) -> tuple[MacCount, list]:
    p = eqn.params
    cond, body = _open(p["cond_jaxpr"]), _open(p["body_jaxpr"])
    n_cc, n_bc = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, carry = ins[:n_cc], ins[n_cc : n_cc + n_bc], ins[n_cc + n_bc :]
    body_ins = body_consts + carry
    count, carry_out = _fixed_point_carry(
        body, body_ins, slice(n_bc, None), slice(None), while_policy
    )
    cond_count, _ = _walk(cond, cond_consts + carry_out, while_policy)
    total = MacCount(count.param + cond_count.param, count.activation + cond_count.activation)
    if total.total and while_policy == "error":
        raise ValueError(
            "count_macs: a while_loop contains contractions and its trip count is unknown at "
            "trace time. Use lax.scan / lax.fori_loop with static bounds, or pass "
            "while_policy='once' to count the body a single time."
        )
    return total, [a or b for a, b in zip(carry, carry_out, strict=True)]


def jaxpr_macs(jaxpr: core.Jaxpr, in_data: Sequence[bool], while_policy: str = "once"
               ) -> MacCount:
    """MACs of an already traced ``jaxpr``; ``in_data[i]`` says whether invar ``i`` is data
    (not a parameter). ``while_policy`` as in :func:`count_macs_split`."""
    if while_policy not in _WHILE_POLICIES:
        raise ValueError(f"while_policy must be one of {_WHILE_POLICIES}, got {while_policy!r}")
    return _walk(jaxpr, in_data, while_policy)[0]


def count_macs_split(
    fn: Callable[..., Any],
    *args: Any,
    param_argnums: Sequence[int] = (0,),
    while_policy: str = "error",
    **kwargs: Any,
) -> MacCount:
    """MACs of ``fn(*args, **kwargs)``, split into parameter and activation contractions.

    Nothing is computed: ``fn`` is traced with ``jax.make_jaxpr``, so ``args`` may be
    ``jax.ShapeDtypeStruct`` trees (e.g. from ``jax.eval_shape(model.init, ...)``). ``kwargs``
    are closed over as static Python values (e.g. ``train=False``), not traced; an array passed
    as a keyword becomes a constant and so counts as a parameter operand: pass data positionally.

    Args:
      fn: the function, e.g. a Flax ``model.apply``.
      *args: positional arguments (arrays or ``ShapeDtypeStruct`` pytrees).
      param_argnums: indices of ``args`` that hold parameters; all other args are data.
      while_policy: ``"error"`` (default) raises on a ``while_loop`` that contains contractions;
        ``"once"`` counts its body (and condition) a single time.
      **kwargs: static keyword arguments of ``fn``.
    Returns:
      ``MacCount(param, activation)`` of Python ints, batch included.
    """
    if while_policy not in _WHILE_POLICIES:
        raise ValueError(f"while_policy must be one of {_WHILE_POLICIES}, got {while_policy!r}")
    for i in param_argnums:
        if not -len(args) <= i < len(args):
            raise ValueError(
                f"param_argnums entry {i} is out of range for {len(args)} positional args; "
                "pass the indices of the arguments that hold parameters."
            )
    param_idx = {i % len(args) for i in param_argnums}
    closed = jax.make_jaxpr(functools.partial(fn, **kwargs))(*args)
    in_data = [i not in param_idx for i, a in enumerate(args) for _ in jax.tree_util.tree_leaves(a)]
    count, _ = _walk(closed.jaxpr, in_data, while_policy)
    return count


def count_macs(
    fn: Callable[..., Any],
    *args: Any,
    only_params: bool = False,
    param_argnums: Sequence[int] = (0,),
    while_policy: str = "error",
    **kwargs: Any,
) -> int:
    """Total MACs of ``fn(*args, **kwargs)`` (see `count_macs_split` for the arguments).

    Args:
      only_params: count only contractions with a parameter operand (conv / dense layers),
        leaving out activation x activation products such as attention's ``q k^T`` and ``a v``.
    Returns:
      the MAC count as a Python int, batch included.
    """
    count = count_macs_split(
        fn, *args, param_argnums=param_argnums, while_policy=while_policy, **kwargs
    )
    return count.param if only_params else count.total
