"""The QADG tracer: follow channel axes through a jaxpr and build a :class:`~jaxjpq.graph.Graph`.

``trace(apply_fn, variables, *args, **kwargs)`` traces ``apply_fn(variables, *args, **kwargs)`` to a
jaxpr and walks it once. Every position of every axis of every value carries a *unit id*; a
union-find over unit ids records which positions must be pruned together:

* each axis of each variable leaf, each input axis and each fresh axis (conv spatial outputs,
  broadcast axes, iota, random bits) gets new unit ids;
* elementwise ops, batch dims of ``dot_general`` and residual adds unify positions;
* a conv / ``dot_general`` with a parameter operand is a *producer*: its output feature axis carries
  the kernel's out-axis units; its contracted input axis *links* the activation's units to the
  kernel's in-axis units (the kernel rows become dependents of the activation's group);
* reshapes carry one axis through a flatten (one channel -> many rows) or an unflatten
  (a dense output split into heads: the head units own ``head_dim`` entries each).

After the walk a group is a set of unit classes that share a producer's out axis; its ``params``
are the ``params``-collection leaf axes in the classes and its ``dependents`` the other collections
(running statistics) plus the linked consumer rows. A class that reaches the network input or
output, is reduced over while its pruned positions are not exactly zero, or meets an op the rules
cannot follow is marked non-prunable with the reason (never a wrong group).

Every pass over a jaxpr (this tracer, :mod:`jaxjpq.slim`, :mod:`jaxjpq.trace.macs`, the compressed
forward of :mod:`jaxjpq.compress`) runs the one walk :func:`walk_jaxpr` and asks the
:class:`Rule` of each primitive what to do (:mod:`jaxjpq.trace.registry`); the rules live in one
module per primitive family. :func:`register_rule` adds one for a primitive of your own.

Pruned positions are tracked as *exactly zero* per axis (``zero``): pruning is only accepted where
the masked forward (params slices zeroed) equals the physically slimmed network, which
``jaxjpq.slim`` re-evaluates from the same walk.
"""

from jaxjpq.trace import contract, control, elementwise, reduce, shape  # noqa: F401  (rules)
from jaxjpq.trace.build import build_graph, trace
from jaxjpq.trace.elementwise import unary_flow
from jaxjpq.trace.registry import (
    CONTROL_KINDS,
    FORWARD_ROLES,
    RULES,
    Rule,
    eqn_macs,
    register_rule,
    rule_for,
    walk_jaxpr,
)
from jaxjpq.trace.tracer import Traced, trace_jaxpr
from jaxjpq.trace.values import Ctx, Units, Val

__all__ = [
    "CONTROL_KINDS", "FORWARD_ROLES", "RULES", "Ctx", "Rule", "Traced", "Units", "Val",
    "build_graph", "eqn_macs", "register_rule", "rule_for", "trace", "trace_jaxpr",
    "unary_flow", "walk_jaxpr",
]
