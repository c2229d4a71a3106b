"""The compressed forward: masked, fake-quantized weights and fake-quantized site inputs.

``compress_apply(apply_fn, graph)`` returns ``fn(variables, state, *args, **kwargs)``:

1. weights become ``mask ⊙ M ⊙ Q(W)`` as a parameter tree (site weight leaves quantized with the
   state's weight quantizers and multiplied by their elementwise masks ``M``, then every prunable
   group's ``params`` slices multiplied by its mask with :func:`jaxjpq.slim.apply_masks`,
   re-exported here);
2. ``apply_fn`` is traced to a jaxpr (once per input signature, cached) and re-evaluated by a small
   interpreter that quantizes the *non-weight* operand of every ``conv_general_dilated`` /
   ``dot_general`` whose other operand derives from a site's weight leaf (followed through
   dtype casts, reshapes, transposes and broadcasts; ``jit``/``closed_call``/``remat`` bodies are
   recursed into and ``custom_jvp``/``custom_vjp`` calls inlined when a weight flows into them).

A site whose weight flows into ``scan``/``while``/``cond`` raises ``NotImplementedError`` naming it.
Gradients flow to the variables and to every non-frozen quantizer parameter. Static shapes only;
jit-compatible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp

from jaxjpq import gates as gates_lib
from jaxjpq.graph import Graph
from jaxjpq.jaxprs import CALL_PRIMITIVES, aval, cached, is_dynamic, key_of, sub_jaxpr
from jaxjpq.quant import (
    QuantParams,
    bits_from_step,
    broadcast_params,
    quantize_with,
    step_from_bits,
)
from jaxjpq.slim import apply_masks
from jaxjpq.state import CompressionState, check_state, check_variables, leaf, site_quantizer

# Primitives through which a weight leaf is still "the weight" of a site.
_PASS_THROUGH = frozenset(
    {
        "convert_element_type",
        "reshape",
        "transpose",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "copy",
        "copy_p",
        "reduce_precision",
        "sharding_constraint",
        "device_put",
        "optimization_barrier",
    }
)
_SITE_PRIMS = frozenset({"conv_general_dilated", "dot_general"})
_CONTROL = frozenset({"scan", "while", "cond", "switch", "fori_loop"})


# ---------------------------------------------------------------------------------------------
# Parameter-tree transforms
# ---------------------------------------------------------------------------------------------


def _copy_tree(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _copy_tree(v) for k, v in tree.items()}
    return tree


def _set(tree: dict, key: tuple[str, ...], value: Any) -> None:
    node = tree
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value


def quantize_weights(graph: Graph, variables: Mapping, state: CompressionState) -> dict:
    """Replace each site's weight leaf by ``M ⊙ Q(W)``: ``Q`` its weight quantizer (per-channel
    params broadcast along the site's ``out_axes``; none: identity), ``M`` its elementwise mask
    (``state.weight_masks``; none: ones). Returns a new nested dict."""
    out = _copy_tree(variables)
    for site in graph.sites:
        quantized, masked = site.name in state.weight, site.name in state.weight_masks
        if not (quantized or masked):
            continue
        w = leaf(out, site.weight)
        if quantized:
            p = broadcast_params(site_quantizer(state, "weight", site.name), w.ndim, site.out_axes)
            w = quantize_with(w, p, True, state.power_of_two, state.learn_t)
        if masked:
            w = w * jnp.asarray(state.weight_masks[site.name] > 0.5, w.dtype)
        _set(out, site.weight, w)
    return out


def transform_variables(
    graph: Graph, variables: Mapping, state: CompressionState, gate_key: jax.Array | None = None
) -> dict:
    """``mask ⊙ M ⊙ Q(z ⊙ W)`` for the whole variable tree (what the compressed forward runs
    with; ``M`` the elementwise masks).

    ``z`` are the VIB gates of ``state.gates`` (none: 1): sampled with ``gate_key``, else ``μ``.
    """
    check_state(graph, state)
    check_variables(graph, variables)
    if state.gates:
        variables = apply_masks(graph, variables, gates_lib.values(state.gates, gate_key))
    return apply_masks(graph, quantize_weights(graph, variables, state), state.masks)


# ---------------------------------------------------------------------------------------------
# Jaxpr interpreter that quantizes site inputs
# ---------------------------------------------------------------------------------------------


def _eval(jaxpr, consts, args, tags, hook, seen):
    """Evaluate ``jaxpr``; ``tags[i]`` names the site whose weight ``args[i]`` is (or None).

    Returns ``(outs, out_tags)``.
    """
    env: dict = {}
    tag: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def tag_of(v):
        return None if isinstance(v, jcore.Literal) else tag.get(v)

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a, t in zip(jaxpr.invars, args, tags, strict=True):
        env[v] = a
        if t is not None:
            tag[v] = t

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        intags = [tag_of(v) for v in eqn.invars]
        name = eqn.primitive.name
        out_tags = [None] * len(eqn.outvars)
        tagged = [t for t in intags if t is not None]
        if tagged:
            if name in _SITE_PRIMS and len(invals) >= 2:
                lhs_t, rhs_t = intags[0], intags[1]
                if (lhs_t is None) != (rhs_t is None):
                    site = lhs_t or rhs_t
                    act = 1 if lhs_t is not None else 0
                    invals[act] = hook(site, invals[act])
                    seen.add(site)
            elif name in _PASS_THROUGH:
                out_tags = [tagged[0]] * len(eqn.outvars)
            elif name in CALL_PRIMITIVES:
                sub, sub_consts = sub_jaxpr(eqn.params)
                if sub is not None:
                    outs, sub_tags = _eval(sub, sub_consts, invals, intags, hook, seen)
                    for v, o, t in zip(eqn.outvars, outs, sub_tags, strict=True):
                        env[v] = o
                        if t is not None:
                            tag[v] = t
                    continue
            elif name in _CONTROL or any(k in eqn.params for k in ("branches", "body_jaxpr")):
                raise NotImplementedError(
                    f"the weight of site(s) {sorted(set(tagged))} flows into '{name}'; the "
                    "compressed forward does not quantize sites inside scan/while/cond yet. "
                    "Unroll the loop (e.g. nn.scan -> a Python loop) or skip these sites in "
                    "CompressionSpec(skip=...)."
                )
        bind_params = eqn.primitive.get_bind_params(eqn.params)
        with eqn.ctx.manager:
            ans = eqn.primitive.bind(*invals, **bind_params)
        outs = ans if eqn.primitive.multiple_results else [ans]
        for v, o, t in zip(eqn.outvars, outs, out_tags, strict=True):
            env[v] = o
            if t is not None:
                tag[v] = t
    return [read(v) for v in jaxpr.outvars], [tag_of(v) for v in jaxpr.outvars]


def _site_input_runner(apply_fn: Callable, graph: Graph) -> Callable:
    """``run(variables, act_hook, *args, **kwargs)``: evaluate ``apply_fn`` calling
    ``act_hook(site_name, x) -> x`` on the input operand of every site conv/dot_general."""
    weight_to_site = {s.weight: s.name for s in graph.sites}
    cache: dict = {}

    def run(variables, act_hook, sites, *args, **kwargs):
        flat, treedef = jax.tree_util.tree_flatten_with_path((variables, args, kwargs))
        leaves = [x for _, x in flat]
        dyn_pos = [i for i, x in enumerate(leaves) if is_dynamic(x)]
        static = tuple((i, leaves[i]) for i in range(len(leaves)) if i not in set(dyn_pos))
        dyn = [leaves[i] for i in dyn_pos]

        def rebuilt(*dyn_vals):
            full = list(leaves)
            for i, v in zip(dyn_pos, dyn_vals, strict=True):
                full[i] = v
            v, a, kw = jax.tree_util.tree_unflatten(treedef, full)
            return apply_fn(v, *a, **kw)

        avals = tuple(aval(x) for x in dyn)

        def make():
            closed, out_shape = jax.make_jaxpr(rebuilt, return_shape=True)(*avals)
            return closed, jax.tree.structure(out_shape)

        closed, out_tree = cached(cache, (treedef, avals, static), make)
        tags = []
        for i in dyn_pos:
            path, _ = flat[i]
            key = key_of(path)
            site = weight_to_site.get(key[1:]) if key and key[0] == "0" else None
            tags.append(site if site in sites else None)
        seen: set = set()
        outs, _ = _eval(closed.jaxpr, closed.consts, dyn, tags, act_hook, seen)
        missing = sorted(set(sites) - seen)
        if missing:
            raise ValueError(
                f"could not find the conv/dot_general of site(s) {missing} in the traced model; "
                "the weight must reach it through casts/reshapes/transposes only. Re-trace the "
                "graph with jaxjpq.trace for this apply_fn, or skip these sites."
            )
        return jax.tree.unflatten(out_tree, outs)

    return run


def act_quantized_apply(apply_fn: Callable, graph: Graph, *, check_finite: bool = False
                        ) -> Callable:
    """``fn(variables, act, *args, power_of_two=False, learn_t=True, **kwargs)``: run ``apply_fn``
    with the input of each site in ``act`` (``{site: QuantParams}``, used as given) fake-quantized;
    weights are used as given (already quantized, e.g. dequantized from an export).
    ``check_finite`` adds a ``checkify`` check of every site input (see :func:`checked_apply`)."""
    run = _site_input_runner(apply_fn, graph)
    sm = graph.site_map

    def fn(variables, act, *args, power_of_two: bool = False, learn_t: bool = True, **kwargs):
        def hook(site, x):
            if check_finite:
                from jax.experimental import checkify

                checkify.check(jnp.all(jnp.isfinite(x)),
                               f"non-finite input (NaN/inf) at site {site}")
            if site not in act:
                return x
            return quantize_with(x, act[site], sm[site].signed_input, power_of_two, learn_t)

        sites = frozenset(sm) if check_finite else frozenset(act)
        return run(variables, hook, sites, *args, **kwargs)

    return fn


def checked_apply(apply_fn: Callable, graph: Graph) -> Callable:
    """:func:`compress_apply` that checks every site input for NaN/inf (opt-in: the check costs
    a reduction per site). ``fn(variables, state, *args, **kwargs)`` raises
    ``jax.experimental.checkify.JaxRuntimeError`` naming the first site that saw a non-finite
    value (a NaN would otherwise be quantized to a finite code); jit-compatible."""
    from jax.experimental import checkify

    inner = compress_apply(apply_fn, graph, check_finite=True)
    checked = checkify.checkify(inner, errors=checkify.user_checks)

    def fn(*args, **kwargs):
        err, out = checked(*args, **kwargs)
        err.throw()
        return out

    return fn


def compress_apply(apply_fn: Callable, graph: Graph, *, check_finite: bool = False) -> Callable:
    """The compressed forward ``fn(variables, state, *args, **kwargs) -> apply_fn's output``.

    Weights are ``mask ⊙ Q(z ⊙ W)`` (see :func:`transform_variables`; pass ``gate_key=`` to
    sample the gates ``z`` in training), site inputs are fake-quantized with ``state.act``.
    ``fn.site_inputs(variables, state, *args, **kwargs)`` returns ``(output, {site: un-quantized
    input})`` for calibration. Close over ``graph``; jit ``fn``.
    """
    inner = act_quantized_apply(apply_fn, graph, check_finite=check_finite)
    run = _site_input_runner(apply_fn, graph)

    def fn(variables, state: CompressionState, *args, gate_key=None, **kwargs):
        v = transform_variables(graph, variables, state, gate_key)
        act = {s: site_quantizer(state, "act", s) for s in state.act}
        return inner(
            v, act, *args, power_of_two=state.power_of_two, learn_t=state.learn_t, **kwargs
        )

    def site_inputs(variables, state: CompressionState, *args, gate_key=None, **kwargs):
        v = transform_variables(graph, variables, state, gate_key)
        seen: dict = {}
        sm = graph.site_map

        def hook(site, x):
            seen.setdefault(site, x)
            if site in state.act:
                p = site_quantizer(state, "act", site)
                return quantize_with(x, p, sm[site].signed_input, state.power_of_two, state.learn_t)
            return x

        out = run(v, hook, frozenset(s.name for s in graph.sites), *args, **kwargs)
        return out, seen

    fn.site_inputs = site_inputs
    fn.graph = graph
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
    if not hasattr(fn, "site_inputs"):
        raise ValueError(
            "calibrate expects the function returned by compress_apply(apply_fn, graph)."
        )
    graph: Graph = fn.graph
    check_state(graph, state)
    sm = graph.site_map

    @jax.jit
    def stats(variables, state, args):
        _, xs = fn.site_inputs(variables, state, *args)
        out = {}
        for s, x in xs.items():
            mag = jnp.abs(x) if sm[s].signed_input else jnp.maximum(x, 0.0)
            out[s] = jnp.max(mag) if percentile >= 100 else jnp.percentile(mag, percentile)
        return out

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
