"""The rule registry and the one jaxpr walk every pass uses.

A :class:`Rule` holds everything the passes need of one primitive:

* ``flow`` (tracer): how channel positions flow from its inputs to its outputs;
* ``slim`` (:func:`jaxjpq.slim.slim`): its parameters for inputs whose pruned positions are cut;
* ``macs`` (:mod:`jaxjpq.trace.macs`, the cost model): its multiply-accumulates;
* ``forward`` (:func:`jaxjpq.compress.compress_apply`): what the compressed forward does when
  a site's weight reaches it (``"site"``: quantize the other operand; ``"cast"``: the output is
  still that weight, fused kernels included; ``"pass"``: still the weight, a reshape or a
  transpose of it; ``"fuse"``: a kernel concatenated from several sites' weights; ``"opaque"``:
  the weight is consumed);
* ``control`` (every pass): ``"call"`` for a primitive that calls one sub-jaxpr with its operands,
  ``"scan"`` / ``"while"`` / ``"cond"`` for loops and branches, None otherwise.

Register a rule for a primitive of your own with :func:`register_rule`; the built-in rules live
in one module per primitive family (``elementwise``, ``shape``, ``reduce``, ``contract``,
``control``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.extend.core as jcore

FORWARD_ROLES = ("site", "cast", "pass", "fuse", "opaque")
CONTROL_KINDS = ("call", "scan", "while", "cond")


@dataclasses.dataclass(frozen=True)
class Rule:
    """What every pass needs of one primitive (see the module docstring).

    Attributes:
      flow: ``(ctx, eqn, ins: list[Val], path) -> list[Val]``, the channel flow; None: the
        tracer marks the groups the primitive touches non-prunable ("unsupported primitive").
      slim: ``(eqn, in_pos, out_shapes, invals) -> params`` for sliced operands (``in_pos``: per
        input, per axis, the kept positions or None; ``out_shapes``: the slim output shapes);
        None: the primitive's parameters do not depend on its shapes.
      macs: ``eqn -> int`` multiply-accumulates (batch included); None: 0.
      forward: the compressed forward's role, one of ``FORWARD_ROLES``.
      control: one of ``CONTROL_KINDS`` or None.
    """

    flow: Callable[..., list] | None = None
    slim: Callable[..., dict] | None = None
    macs: Callable[[Any], int] | None = None
    forward: str = "opaque"
    control: str | None = None

    def __post_init__(self):
        if self.forward not in FORWARD_ROLES:
            raise ValueError(f"Rule.forward must be one of {FORWARD_ROLES}, got {self.forward!r}.")
        if self.control is not None and self.control not in CONTROL_KINDS:
            raise ValueError(f"Rule.control must be one of {CONTROL_KINDS} or None, got "
                             f"{self.control!r}.")


RULES: dict[str, Rule] = {}


def register_rule(names: str | Sequence[str], rule: Rule, *, replace: bool = False) -> None:
    """Register ``rule`` for the primitive(s) ``names`` (``eqn.primitive.name``).

    ``replace=False`` refuses a name that already has a rule, so a user rule never silently
    shadows a built-in one."""
    if isinstance(names, str):
        names = (names,)
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule expects a jaxjpq.trace.Rule, got {type(rule).__name__}.")
    taken = [n for n in names if n in RULES]
    if taken and not replace:
        raise ValueError(f"primitive(s) {taken} already have a rule; pass replace=True to "
                         "override it.")
    for n in names:
        RULES[n] = rule


def rule_for(name: str) -> Rule:
    """The rule of primitive ``name`` (an empty :class:`Rule` when none is registered)."""
    return RULES.get(name, _NONE)


_NONE = Rule()


def eqn_macs(eqn: Any) -> int:
    """MACs of one jaxpr equation by its rule (0 for primitives without MACs), not recursing
    into sub-jaxprs: ``conv_general_dilated``: ``prod(out.shape) · k_1 ⋯ k_n · c_in/groups``;
    ``dot_general``: product of the batch, contracted and both free dimensions."""
    m = rule_for(eqn.primitive.name).macs
    return 0 if m is None else int(m(eqn))


def walk_jaxpr(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any],
               step: Callable[[int, Any, list], Sequence[Any]],
               literal: Callable[[Any], Any]) -> list:
    """The walk every pass runs: bind ``jaxpr``'s constvars to ``consts`` and invars to
    ``args`` (each pass's own values: tracer facts, arrays, taints, ...), call
    ``step(i, eqn, in_values) -> out_values`` per equation in order, and return the values of
    the outvars. ``literal(v)`` gives the value of a literal operand."""
    env: dict = {}
    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a

    def read(v: Any) -> Any:
        return literal(v) if isinstance(v, jcore.Literal) else env[v]

    for i, eqn in enumerate(jaxpr.eqns):
        outs = step(i, eqn, [read(v) for v in eqn.invars])
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]
