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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from jax.extend import core

from jaxjpq.jaxprs import CALL_PRIMITIVES, SUBJAXPR_KEYS

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


def _conv_macs(eqn: core.JaxprEqn) -> int:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    (out,) = (v.aval for v in eqn.outvars)
    dn = eqn.params["dimension_numbers"]
    rhs_spec = dn.rhs_spec  # (out_feature_dim, in_feature_dim, *spatial_dims)
    kernel_in = rhs.shape[rhs_spec[1]]  # already c_in / feature_group_count
    kernel_spatial = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    del lhs
    # Every output element is a sum over kernel_in * kernel_spatial products. With
    # batch_group_count > 1 the output batch already shrinks, so the product stays exact.
    return int(math.prod(out.shape) * kernel_in * kernel_spatial)


def _dot_macs(eqn: core.JaxprEqn) -> int:
    lhs = eqn.invars[0].aval
    (out,) = (v.aval for v in eqn.outvars)
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    contracted = math.prod(lhs.shape[d] for d in lhs_contract)
    # out = batch dims x lhs free dims x rhs free dims; each element sums `contracted` products.
    return int(math.prod(out.shape) * contracted)


def eqn_macs(eqn: core.JaxprEqn) -> int:
    """MACs of one jaxpr equation, not recursing into sub-jaxprs.

    ``conv_general_dilated``: ``prod(out.shape) * k_1 * ... * k_n * (c_in / feature_groups)``,
    i.e. ``k_h*k_w*(c_in/groups)*c_out*H_out*W_out*batch`` in 2-d, for any dimension numbers and
    spatial rank. Input dilation (transposed conv) is counted densely: taps that land on inserted
    zeros still count, as on hardware that does not skip them.
    ``dot_general``: product of the batch, contracted and both free dimensions.
    Every other primitive: 0 (control-flow primitives included: use `count_macs` for those).

    Args:
      eqn: a ``jax.extend.core.JaxprEqn`` (e.g. from ``jax.make_jaxpr(f)(x).eqns``).
    Returns:
      the MAC count as a Python int (batch included).
    """
    name = eqn.primitive.name
    if name == "conv_general_dilated":
        return _conv_macs(eqn)
    if name == "dot_general":
        return _dot_macs(eqn)
    return 0


def _is_data(atom: Any, data: set) -> bool:
    return not isinstance(atom, core.Literal) and atom in data


def _open(jaxpr_like: Any) -> core.Jaxpr:
    return jaxpr_like.jaxpr if isinstance(jaxpr_like, core.ClosedJaxpr) else jaxpr_like


def _subjaxpr(eqn: core.JaxprEqn) -> core.Jaxpr:
    for key in SUBJAXPR_KEYS:
        if key in eqn.params:
            return _open(eqn.params[key])
    raise ValueError(
        f"count_macs: call primitive {eqn.primitive.name!r} has no sub-jaxpr under any of "
        f"{SUBJAXPR_KEYS}; add its parameter name to jaxjpq.macs.SUBJAXPR_KEYS."
    )


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
    data = {v for v, d in zip(jaxpr.invars, in_data, strict=True) if d}
    param = activation = 0
    for eqn in jaxpr.eqns:
        ins = [_is_data(a, data) for a in eqn.invars]
        name = eqn.primitive.name
        sub = MacCount(0, 0)
        outs = [any(ins)] * len(eqn.outvars)
        if name in ("conv_general_dilated", "dot_general"):
            macs = eqn_macs(eqn)
            if all(ins[:2]):
                activation += macs
            else:
                param += macs
        elif name in CALL_PRIMITIVES:
            sub, outs = _walk(_subjaxpr(eqn), ins, while_policy)
        elif name == "cond":
            counts = []
            outs = [False] * len(eqn.outvars)
            for branch in eqn.params["branches"]:
                c, o = _walk(_open(branch), ins[1:], while_policy)
                counts.append(c)
                outs = [a or b or ins[0] for a, b in zip(outs, o, strict=True)]
            sub = max(counts, key=lambda c: (c.total, c.param))
        elif name == "scan":
            sub, outs = _walk_loop(eqn, ins, while_policy)
        elif name == "while":
            sub, outs = _walk_while(eqn, ins, while_policy)
        elif _has_subjaxpr(eqn):
            raise ValueError(
                f"count_macs: unsupported higher-order primitive {name!r}; its sub-jaxpr would "
                "be skipped. Inline it (e.g. avoid the transform) or extend jaxjpq.macs._walk."
            )
        param += sub.param
        activation += sub.activation
        data.update(v for v, d in zip(eqn.outvars, outs, strict=True) if d)
    out_data = [_is_data(a, data) for a in jaxpr.outvars]
    return MacCount(param, activation), out_data


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
