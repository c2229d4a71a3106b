"""`CompressionSpec` (what to compress) and `CompressionState` (the learnable compression params).

Key scheme: the state holds plain dicts keyed by site name (``weight``, ``act``) and by group id
(``masks``), e.g. ``state.masks["Conv_0/kernel:out"]``. Orbax's ``StandardCheckpointer`` round-trips
such keys (including ``/`` and ``:``), which ``tests/test_state.py`` checks.

A site that reads the same input tensor as an earlier site (``Site.act_from``) has no ``act``
entry of its own: the tensor is quantized once, with the earlier site's quantizer (and its skip
status). Skipped sites (``spec.skip``, by default the first and the last site) are quantized at a
fixed ``spec.skip_bits`` (default 8): their quantizers live in the state, are listed in
``state.frozen`` and receive no gradient in :func:`jaxjpq.compress.compress_apply`. With
``skip_bits=None`` they stay in float (32 bits in the cost model) and have no quantizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from jaxjpq.graph import (  # noqa: F401 (re-exported)
    Graph,
    Site,
    check_variables,
    graph_fingerprint,
    kept,
    leaf,
)
from jaxjpq.quant import (
    QuantParams,
    channel_shape,
    check_bits,
    effective_params,
    init_from_tensor,
    step_from_bits,
)
from jaxjpq.trace.build import trace

BUDGET_KINDS = ("sparsity", "bops", "size")


def check_budget(kind: str, value: Any) -> float:
    """``value`` as a float if it is a valid ``kind`` budget (``sparsity`` in [0, 1), ``bops`` and
    ``size`` in (0, 1], fractions of the fp32 model); else ``ValueError`` naming the range."""
    if kind not in BUDGET_KINDS:
        raise ValueError(f"unknown budget kind {kind!r}; use one of {BUDGET_KINDS}.")
    v = float(value)
    lo_ok = v >= 0 if kind == "sparsity" else v > 0
    hi_ok = v < 1 if kind == "sparsity" else v <= 1
    if not (lo_ok and hi_ok):
        raise ValueError(
            f"budget {kind}={value} must be a fraction of the fp32 model "
            f"({'[0, 1)' if kind == 'sparsity' else '(0, 1]'})."
        )
    return v


@dataclasses.dataclass(frozen=True)
class CompressionSpec:
    """What to compress and within which limits.

    Attributes:
      bits: ``(b_l, b_u)`` range of learned bit widths, each in [1, 32], ``b_l <= b_u``.
      quantize_weights: learn a weight quantizer per site.
      quantize_activations: learn an input-activation quantizer per site.
      per_channel: weight quantizers per output channel (``[c_out]``) instead of per tensor.
      power_of_two: round bits to {2, 4, 8} in the forward pass (DJPQ variant).
      budget: ``{"sparsity" | "bops" | "size": fraction}`` of the fp32 model; fractions in (0, 1]
        (``sparsity`` in [0, 1)). Stored as sorted ``(kind, value)`` pairs; see :meth:`budget_for`.
      skip: site names kept at ``skip_bits`` and not learned, or ``"first_last"`` (default) for the
        first and the last site in execution order.
      skip_bits: fixed bits of skipped sites, or None to keep them in float.
      init_bits: bit width of the initial step ``d = d(init_bits)`` (default 16).
      learn_t: learn the exponent ``t`` (GETA's form). False (DJPQ, and ~2-3x cheaper on large
        activations) uses the exponent-free quantizer with ``t = 1``.
      act_clip: initial activation clip ``q_m`` before :func:`jaxjpq.compress.calibrate`.
    """

    bits: tuple[float, float] = (2.0, 8.0)
    quantize_weights: bool = True
    quantize_activations: bool = True
    per_channel: bool = False
    power_of_two: bool = False
    budget: Any = ()
    skip: Any = "first_last"
    skip_bits: float | None = 8.0
    init_bits: float = 16.0
    learn_t: bool = True
    act_clip: float = 6.0

    def __post_init__(self):
        if isinstance(self.bits, str | bytes) or len(tuple(self.bits)) != 2:
            raise ValueError(f"bits must be a pair (b_l, b_u), got {self.bits!r}.")
        b_l, b_u = (float(b) for b in self.bits)
        check_bits((b_l, b_u), "bits")
        if b_l > b_u:
            raise ValueError(
                f"bits=({b_l:g}, {b_u:g}) has b_l > b_u; give the lower limit first, e.g. (2, 8)."
            )
        if b_l < 2 and (self.quantize_weights or self.quantize_activations):
            raise ValueError(
                f"bits=({b_l:g}, {b_u:g}): b_l must be >= 2, since a signed quantizer spends one "
                "bit on the sign (1 bit would leave no magnitude levels)."
            )
        object.__setattr__(self, "bits", (b_l, b_u))
        check_bits(self.init_bits, "init_bits")
        if self.init_bits <= 1:
            raise ValueError("init_bits must be > 1: a signed quantizer spends 1 bit on the sign.")
        if self.skip_bits is not None:
            check_bits(self.skip_bits, "skip_bits")
            if self.skip_bits <= 1:
                raise ValueError("skip_bits must be > 1 (or None to keep skipped sites in float).")
        if not self.act_clip > 0:
            raise ValueError(f"act_clip must be > 0, got {self.act_clip!r}.")
        budget = self.budget
        if isinstance(budget, Mapping):
            budget = tuple(budget.items())
        budget = tuple(sorted((str(k), float(v)) for k, v in budget))
        for kind, v in budget:
            check_budget(kind, v)
        object.__setattr__(self, "budget", budget)
        if isinstance(self.skip, str):
            if self.skip != "first_last":
                raise ValueError(
                    f"skip={self.skip!r}: give a tuple of site names, () or 'first_last'."
                )
        else:
            object.__setattr__(self, "skip", tuple(str(s) for s in self.skip))

    def budget_for(self, kind: str) -> float | None:
        """The budget fraction for ``kind`` (``"sparsity"``, ``"bops"``, ``"size"``), or None."""
        return dict(self.budget).get(kind)

    def skipped_sites(self, graph: Graph) -> tuple[str, ...]:
        """Names of the sites this spec skips in ``graph``; unknown names raise ``ValueError``."""
        names = [s.name for s in graph.sites]
        if self.skip == "first_last":
            return tuple(dict.fromkeys([names[0], names[-1]])) if names else ()
        unknown = [s for s in self.skip if s not in names]
        if unknown:
            raise ValueError(f"spec.skip names sites {unknown} not in the graph; sites: {names}.")
        return tuple(self.skip)


@flax.struct.dataclass
class CompressionState:
    """Learnable compression parameters of one graph (a pytree; every leaf is a jnp array).

    Attributes:
      weight: ``{site name: QuantParams}`` weight quantizers; ``d``/``q_m``/``t`` are scalars or,
        per channel, shaped like the weight's output axes (``[c_out]``).
      act: ``{site name: QuantParams}`` scalar input-activation quantizers, one per input
        tensor: a site whose ``act_from`` names an earlier site uses that site's entry.
      masks: ``{group id: float32[size]}`` for every prunable group; 1 = keep, 0 = pruned.
      gates: ``{group id: jaxjpq.gates.Gate}`` VIB gates (DJPQ), or ``{}`` (no gates).
      weight_masks: ``{site name: float32[weight_shape]}`` elementwise (unstructured) keep-masks
        of site weights, 1 = keep; sites without an entry are dense. A channel whose weights are
        all masked holds 0 bits.
      graph: static; the :class:`~jaxjpq.graph.Graph` the state belongs to. Every function that
        reads a state (cost, slim, export, the methods) takes the graph from here.
      spec: static; the :class:`CompressionSpec` the state was made from (None if hand-built).
      power_of_two: static; forward rounds bits to {2, 4, 8}.
      frozen: static; site names whose quantizers are fixed (no gradient).
      learn_t: static; False = exponent ``t`` fixed at 1 (use :func:`site_quantizer` to read).
      gate_threshold: static; VIB pruning threshold θ on ``log σ² − log μ²`` (see ``gates``).
      gate_at: static; where the gates act: ``"weights"`` (``Q(z ⊙ W)``) or ``"output"`` (the
        paper: the layer's output channels, ``z ⊙ Q(W)`` and its bias / norm slices).
    """

    weight: dict[str, QuantParams]
    act: dict[str, QuantParams]
    masks: dict[str, jax.Array]
    gates: dict[str, Any] = flax.struct.field(default_factory=dict)
    weight_masks: dict[str, jax.Array] = flax.struct.field(default_factory=dict)
    graph: Graph | None = flax.struct.field(pytree_node=False, default=None)
    spec: CompressionSpec | None = flax.struct.field(pytree_node=False, default=None)
    power_of_two: bool = flax.struct.field(pytree_node=False, default=False)
    frozen: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
    learn_t: bool = flax.struct.field(pytree_node=False, default=True)
    gate_threshold: float = flax.struct.field(pytree_node=False, default=0.0)
    gate_at: str = flax.struct.field(pytree_node=False, default="weights")


def site_quantizer(state: CompressionState, kind: str, name: str) -> QuantParams:
    """The quantizer of site ``name`` (``kind`` = ``"weight"`` or ``"act"``; an activation
    quantizer by its key, ``Site.act_key``) as the forward uses it: ``t = 1`` when
    ``state.learn_t`` is False, no gradient for frozen sites."""
    p = (state.weight if kind == "weight" else state.act)[name]
    if not state.learn_t:
        p = p.replace(t=jnp.ones_like(p.t))
    return jax.lax.stop_gradient(p) if name in state.frozen else p


def effective_weight_quantizer(state: CompressionState, name: str) -> QuantParams:
    """Site ``name``'s weight quantizer as its integer codes use it: :func:`site_quantizer`
    with the power-of-two rounding of ``state.power_of_two`` applied (``channel_shape`` or
    scalar params)."""
    return effective_params(site_quantizer(state, "weight", name), True, state.power_of_two)


def check_state(state: CompressionState) -> Graph:
    """``state.graph`` after checking ``state`` against it; ``ValueError`` for anything else than
    a :class:`CompressionState` made by :func:`init` (or :func:`init_state`), or for elementwise
    masks / gates of another shape than the graph's."""
    if not isinstance(state, CompressionState):
        raise ValueError(
            f"expected a CompressionState, got {type(state).__name__}; build one with jaxjpq.init."
        )
    graph = state.graph
    if not isinstance(graph, Graph):
        raise ValueError(
            "this CompressionState carries no graph; build it with jaxjpq.init or "
            "jaxjpq.init_state (or state.replace(graph=graph) for a hand-built one)."
        )
    sm = graph.site_map
    for name, m in state.weight_masks.items():
        if name not in sm:
            raise ValueError(f"state.weight_masks names site {name!r}, not in the graph.")
        if tuple(jnp.shape(m)) != tuple(sm[name].weight_shape):
            raise ValueError(
                f"state.weight_masks[{name!r}] has shape {tuple(jnp.shape(m))}, expected the "
                f"weight's {tuple(sm[name].weight_shape)}."
            )
    if state.gates:
        for g in graph.prunable_groups:
            gate = state.gates.get(g.id)
            if gate is None or jnp.shape(gate.mu) != (g.size,):
                raise ValueError(
                    f"state.gates has no [{g.size}] gate for group {g.id}; build the gates with "
                    "jaxjpq.gates.init(graph) (or leave state.gates empty)."
                )
    return graph


def _weight_params(site: Site, spec: CompressionSpec, bits: float, variables) -> QuantParams:
    axes = site.out_axes if spec.per_channel else None
    if variables is not None:
        w = leaf(variables, site.weight)
        if tuple(w.shape) != tuple(site.leaf_shape):
            raise ValueError(
                f"site {site.name}: weight shape {tuple(w.shape)} != traced {site.leaf_shape}; "
                "re-trace the graph for these variables."
            )
        w = site.take(w)
        return init_from_tensor(w, bits, axes, signed=True)
    shape = channel_shape(site.weight_shape, axes) if axes else ()
    q_m = jnp.ones(shape, jnp.float32)
    t = jnp.ones(shape, jnp.float32)
    return QuantParams(d=step_from_bits(bits, q_m, t, True), q_m=q_m, t=t)


class CompressedParams(NamedTuple):
    """The pair every forward, method, checkpoint and export takes.

    Attributes:
      model: the model's trainable ``params`` collection (a pytree).
      compression: the :class:`CompressionState` of the traced graph.
    """

    model: Any
    compression: CompressionState

    @property
    def variables(self) -> dict:
        """``{"params": model}``: the variables a Flax ``apply`` takes."""
        return {"params": self.model}


def init(
    model: Callable | Graph,
    variables: Mapping,
    *example_args: Any,
    spec: CompressionSpec | None = None,
    strict: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
    **spec_fields: Any,
) -> CompressedParams:
    """Trace ``model`` and return ``CompressedParams(variables["params"], state)``.

    Args:
      model: the model's apply function (``model.apply``), traced as
        ``model(variables, *example_args, **model_kwargs)`` (see :func:`jaxjpq.trace.trace`),
        or a :class:`Graph` traced before (then no ``example_args``).
      variables: the model's variables as traced (``{"params": ..., "batch_stats": ...}``); the
        non-param collections stay with the caller (e.g. the train loop's model state).
      *example_args: example inputs, e.g. ``x`` of shape ``[batch, ...]``.
      spec: a :class:`CompressionSpec`; or give its fields as keywords (``bits=(2, 4)``,
        ``budget={"sparsity": 0.5}``, ...), not both.
      strict, model_kwargs: passed to the tracer (``model_kwargs``: static options such as
        ``{"train": False}``).
    Returns:
      the pair; ``pair.compression.graph`` is the traced graph.
    """
    if isinstance(model, Graph):
        if example_args or model_kwargs:
            raise ValueError("init got a Graph and example inputs; give one or the other.")
        graph = model
    elif callable(model):
        if isinstance(variables, CompressionSpec):
            raise ValueError("init(graph_or_apply_fn, variables, *example_args, spec=...): the "
                             "spec goes by keyword (spec=... or bits=..., budget=...).")
        graph = trace(model, variables, *example_args, strict=strict, **(model_kwargs or {}))
    else:
        raise ValueError(
            f"init expects model.apply (or a jaxjpq Graph), got {type(model).__name__}."
        )
    if spec is not None and spec_fields:
        raise ValueError(f"init got spec= and spec fields {sorted(spec_fields)}; give one.")
    spec = spec if spec is not None else CompressionSpec(**spec_fields)
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(
            "init needs the model's variables with a 'params' collection, e.g. "
            "model.init(key, x); got " + type(variables).__name__ + "."
        )
    return CompressedParams(variables["params"], init_state(graph, spec, variables))


def init_state(
    graph: Graph, spec: CompressionSpec, variables: Mapping | None = None
) -> CompressionState:
    """Initial compression state: all masks 1, quantizers at ``spec.init_bits`` (``t = 1``).

    Weight ``q_m = max|W|`` (per channel with ``spec.per_channel``) when ``variables`` are given,
    else 1. Activation ``q_m = spec.act_clip`` (refine with :func:`jaxjpq.compress.calibrate`).
    Skipped sites get ``spec.skip_bits`` and are listed in ``state.frozen``. No elementwise
    masks (add them with :func:`jaxjpq.methods.core.set_weight_masks`).
    """
    if not isinstance(graph, Graph):
        raise ValueError(f"init expects a jaxjpq.Graph, got {type(graph).__name__}.")
    if not isinstance(spec, CompressionSpec):
        raise ValueError(f"init expects a CompressionSpec, got {type(spec).__name__}.")
    skipped = set(spec.skipped_sites(graph))
    if spec.skip_bits is None:
        frozen: tuple[str, ...] = ()
    else:
        frozen = tuple(s.name for s in graph.sites if s.name in skipped)
    weight, act = {}, {}
    for site in graph.sites:
        if site.name in skipped and spec.skip_bits is None:
            continue
        bits = float(spec.skip_bits) if site.name in skipped else float(spec.init_bits)
        if spec.quantize_weights:
            weight[site.name] = _weight_params(site, spec, bits, variables)
        if spec.quantize_activations and site.act_from is None:
            q_m = jnp.asarray(spec.act_clip, jnp.float32)
            t = jnp.ones((), jnp.float32)
            d = step_from_bits(bits, q_m, t, site.signed_input)
            act[site.name] = QuantParams(d=d, q_m=q_m, t=t)
    masks = {g.id: jnp.ones((g.size,), jnp.float32) for g in graph.prunable_groups}
    return CompressionState(
        weight=weight,
        act=act,
        masks=masks,
        spec=spec,
        graph=graph,
        power_of_two=bool(spec.power_of_two),
        frozen=frozen,
        learn_t=bool(spec.learn_t),
    )


def boolean_masks(state: CompressionState) -> dict[str, jax.Array]:
    """``{group id: bool[size]}`` (True = keep, ``graph.kept``), the form ``jaxjpq.slim`` takes."""
    return {k: kept(m) for k, m in state.masks.items()}
