"""The compressed forward: masked, fake-quantized weights and fake-quantized site inputs.

``compress_apply(apply_fn)`` returns ``fn(variables, state, *args, **kwargs)`` (the graph is the
state's, ``state.graph``):

1. weights become ``mask ⊙ M ⊙ Q(W)`` as a parameter tree (site weight leaves quantized with the
   state's weight quantizers and multiplied by their elementwise masks ``M``, then every prunable
   group's ``params`` slices multiplied by its mask with :func:`jaxjpq.slim.apply_masks`,
   re-exported here);
2. ``apply_fn`` runs through the site hooks of :mod:`jaxjpq.hooks`, which fake-quantize the
   *non-weight* operand of every site's conv / ``dot_general`` (per loop step for a recurrent
   cell, per layer for a scanned stack).

Gradients flow to the variables and to every non-frozen quantizer parameter. Static shapes only;
jit-compatible.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jaxjpq import gates as gates_lib
from jaxjpq.graph import Graph, check_inputs, kept, put_layers, set_leaf
from jaxjpq.hooks import Hook, once_per_tensor, site_input_runner
from jaxjpq.quant import (
    CodeThresholds,
    QuantParams,
    bits_from_step,
    broadcast_params,
    quantize_by_thresholds,
    quantize_with,
    step_from_bits,
)
from jaxjpq.slim import apply_masks
from jaxjpq.state import (
    CompressedParams,
    CompressionState,
    check_state,
    check_variables,
    leaf,
    site_quantizer,
)

# ---------------------------------------------------------------------------------------------
# Parameter-tree transforms
# ---------------------------------------------------------------------------------------------


def _copy_tree(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _copy_tree(v) for k, v in tree.items()}
    return tree


def quantize_weights(variables: Mapping, state: CompressionState) -> dict:
    """Replace each site's weight by ``M ⊙ Q(W)``: ``Q`` its weight quantizer (per-channel
    params broadcast along the site's ``out_axes``; none: identity), ``M`` its elementwise mask
    (``state.weight_masks``; none: ones); a stacked leaf is written layer by layer. Returns a new
    nested dict."""
    out = _copy_tree(variables)
    pieces: dict = {}
    for site in state.graph.sites:
        quantized, masked = site.name in state.weight, site.name in state.weight_masks
        if not (quantized or masked):
            continue
        w = site.take(leaf(variables, site.weight))
        if quantized:
            p = broadcast_params(site_quantizer(state, "weight", site.name), w.ndim, site.out_axes)
            # a weight's m^t and log m are recomputed in the backward rather than held through
            # the whole forward: a weight-sized residual less per site for one elementwise pass
            w = quantize_with(w, p, True, state.power_of_two, state.learn_t, remat=True)
        if masked:
            w = w * kept(state.weight_masks[site.name]).astype(w.dtype)
        pieces.setdefault(site.weight, []).append((site, w))
    for key, ps in pieces.items():
        set_leaf(out, key, put_layers(leaf(variables, key), ps, jnp))
    return out


def transform_variables(
    variables: Mapping, state: CompressionState, gate_key: jax.Array | None = None
) -> dict:
    """``mask ⊙ z ⊙ M ⊙ Q(W)`` (``state.gate_at == "output"``) or ``mask ⊙ M ⊙ Q(z ⊙ W)``
    (``"weights"``) for the whole variable tree (what the compressed forward runs with; ``M``
    the elementwise masks).

    ``z`` are the VIB gates of ``state.gates`` (none: 1): sampled with ``gate_key``, else ``μ``.
    """
    graph = check_state(state)
    check_variables(graph, variables)
    z = gates_lib.values(state.gates, gate_key) if state.gates else None
    if z is not None and state.gate_at == "weights":
        variables = apply_masks(graph, variables, z)
    out = quantize_weights(variables, state)
    if z is not None and state.gate_at == "output":
        out = apply_masks(graph, out, z)
    return apply_masks(graph, out, state.masks)


def act_quantized_apply(apply_fn: Callable, graph: Graph, *, check_finite: bool = False
                        ) -> Callable:
    """``fn(variables, act, *args, power_of_two=False, learn_t=True, **kwargs)``: run ``apply_fn``
    with the input of each site in ``act`` (``{site: QuantParams}``, used as given) fake-quantized;
    weights are used as given (already quantized, e.g. dequantized from an export).
    ``act`` is keyed by ``Site.act_key``: a tensor read by several sites is quantized once; a
    :class:`~jaxjpq.quant.CodeThresholds` value quantizes by comparisons (a deployed model).
    ``contract``: the hook's contraction (:class:`jaxjpq.hooks.Hook`) at every site, e.g. an
    integer one.
    ``exponent_free``: act keys quantized without the exponent (``t`` taken as 1: no log / exp
    per element), for quantizers whose ``t`` is 1 in every entry.
    ``check_finite`` adds a ``checkify`` check of every site input (see :func:`checked_apply`)."""
    run = site_input_runner(apply_fn, graph)
    sm = graph.site_map

    def fn(variables, act, *args, power_of_two: bool = False, learn_t: bool = True,
           contract: Callable | None = None, exponent_free: Iterable[str] = (), **kwargs):
        unit_t = frozenset(exponent_free)

        @functools.partial(once_per_tensor, graph)
        def apply(site, p, x):
            if check_finite:
                checkify.check(jnp.all(jnp.isfinite(x)),
                               f"non-finite input (NaN/inf) at site {site}")
            if p is None:
                return x, None
            if isinstance(p, CodeThresholds):
                return quantize_by_thresholds(x, p, sm[site].signed_input), None
            with_t = learn_t and sm[site].act_key not in unit_t
            return quantize_with(x, p, sm[site].signed_input, power_of_two, with_t), None

        sites = frozenset(n for n, x in sm.items()
                          if check_finite or contract is not None or x.act_key in act)
        hook = Hook(lambda n: act.get(sm[n].act_key), apply, contract)
        return run(variables, hook, sites, *args, **kwargs)[0]

    return fn


def checked_apply(apply_fn: Callable) -> Callable:
    """:func:`compress_apply` that checks every site input for NaN/inf (opt-in: the check costs
    a reduction per site). ``fn(variables, state, *args, **kwargs)`` raises
    ``jax.experimental.checkify.JaxRuntimeError`` naming the first site that saw a non-finite
    value (a NaN would otherwise be quantized to a finite code); jit-compatible."""
    inner = compress_apply(apply_fn, check_finite=True)
    checked = checkify.checkify(inner, errors=checkify.user_checks)

    def fn(*args, **kwargs):
        err, out = checked(*args, **kwargs)
        err.throw()
        return out

    return fn


@dataclasses.dataclass(frozen=True)
class _Forward:
    """What the compressed forward of one graph needs, made once per graph."""

    inner: Callable
    run: Callable


def compress_apply(apply_fn: Callable, *, check_finite: bool = False) -> Callable:
    """The compressed forward ``fn(variables, state, *args, **kwargs) -> apply_fn's output``, or
    ``fn(pair, *args, **kwargs)`` for a :class:`~jaxjpq.state.CompressedParams` (variables
    ``{"params": pair.model}``).

    Weights are ``mask ⊙ z ⊙ Q(W)`` (gates at the layer output, or ``mask ⊙ Q(z ⊙ W)``, see
    :func:`transform_variables`; pass ``gate_key=`` to sample the gates ``z`` in training), site
    inputs are fake-quantized with ``state.act``; the graph is ``state.graph``.
    ``fn.site_stats(variables, state, *args, stat=..., **kwargs)`` returns ``(output, {site:
    stat(site, un-quantized input)})`` (a scalar per site; the max over repeated uses and loop
    iterations) for calibration. jit ``fn``.
    """
    made: dict[int, tuple[Graph, _Forward]] = {}  # per graph: the jaxpr caches live in here

    def forward(graph: Graph) -> _Forward:
        hit = made.get(id(graph))
        if hit is None or hit[0] is not graph:
            hit = (graph, _Forward(act_quantized_apply(apply_fn, graph, check_finite=check_finite),
                                   site_input_runner(apply_fn, graph)))
            made[id(graph)] = hit
        return hit[1]

    def fn(variables, state: CompressionState, *args, gate_key=None, **kwargs):
        if isinstance(variables, CompressedParams):  # fn(pair, *args)
            variables, state, args = variables.variables, variables.compression, (state, *args)
        graph = check_state(state)
        check_inputs(graph, args)
        v = transform_variables(variables, state, gate_key)
        act = {s: site_quantizer(state, "act", s) for s in state.act}
        return forward(graph).inner(
            v, act, *args, power_of_two=state.power_of_two, learn_t=state.learn_t, **kwargs
        )

    def site_stats(variables, state: CompressionState, *args, stat: Callable, gate_key=None,
                   **kwargs):
        graph = check_state(state)
        sm = graph.site_map
        v = transform_variables(variables, state, gate_key)

        def data(site):
            k = sm[site].act_key
            return site_quantizer(state, "act", k) if k in state.act else None

        @functools.partial(once_per_tensor, graph)
        def apply(site, p, x):
            e = stat(site, x)
            if p is None:
                return x, e
            return quantize_with(x, p, sm[site].signed_input, state.power_of_two,
                                 state.learn_t), e

        return forward(graph).run(v, Hook(data, apply), frozenset(sm), *args, **kwargs)

    fn.site_stats = site_stats
    return fn


def calibrate(
    fn: Callable,
    variables: Mapping,
    state: CompressionState,
    batches: Iterable[Any],
    percentile: float = 100.0,
) -> CompressionState:
    """Set each activation quantizer's ``q_m`` from calibration batches, keeping its bit width.

    ``fn`` is the result of :func:`compress_apply`; each batch is one positional argument or a tuple
    of them. ``q_m`` = mean over batches of the ``percentile`` of ``|x|`` (signed sites) or
    ``max(x, 0)`` (unsigned); ``d = d(b)`` with ``b`` the quantizer's current bits; ``t`` unchanged.
    """
    if not hasattr(fn, "site_stats"):
        raise ValueError(
            "calibrate expects the function returned by compress_apply(apply_fn)."
        )
    graph = check_state(state)
    sm = graph.site_map

    def stat(s, x):
        mag = jnp.abs(x) if sm[s].signed_input else jnp.maximum(x, 0.0)
        return jnp.max(mag) if percentile >= 100 else jnp.percentile(mag, percentile)

    @jax.jit
    def stats(variables, state, args):
        return fn.site_stats(variables, state, *args, stat=stat)[1]

    acc, n = None, 0
    for b in batches:
        args = tuple(b) if isinstance(b, tuple) else (b,)
        st = stats(variables, state, args)
        bad = sorted(s for s, v in st.items() if not bool(jnp.isfinite(v)))
        if bad:
            raise ValueError(
                f"calibrate: calibration batch {n} gives non-finite activation statistics at "
                f"site(s) {bad} (NaN/inf in the batch or in the model's values); a clip of inf "
                "would turn every logit into 0. Check that batch."
            )
        acc = st if acc is None else jax.tree.map(jnp.add, acc, st)
        n += 1
    if n == 0:
        raise ValueError("calibrate got no batches; pass at least one calibration batch.")
    act = dict(state.act)
    for s, p in state.act.items():
        signed = sm[s].signed_input
        q_m = acc[s] / n
        q_m = jnp.where(q_m > 0, q_m, p.q_m).astype(jnp.float32)
        b = bits_from_step(p.d, p.q_m, p.t, signed)
        act[s] = QuantParams(d=step_from_bits(b, q_m, p.t, signed), q_m=q_m, t=p.t)
    return state.replace(act=act)
