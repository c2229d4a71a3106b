"""The compressed forward: masked, fake-quantized weights and fake-quantized site inputs.

``compress_apply(apply_fn)`` returns ``fn(variables, state, *args, **kwargs)`` (the graph is the
state's, ``state.graph``):

1. weights become ``mask ⊙ M ⊙ Q(W)`` as a parameter tree (site weight leaves quantized with the
   state's weight quantizers and multiplied by their elementwise masks ``M``, then every prunable
   group's ``params`` slices multiplied by its mask with :func:`jaxjpq.slim.apply_masks`,
   re-exported here);
2. ``apply_fn`` is traced to a jaxpr (once per input signature, cached) and re-evaluated by a small
   interpreter that quantizes the *non-weight* operand of every ``conv_general_dilated`` /
   ``dot_general`` whose other operand derives from a site's weight leaf (followed through
   dtype casts, reshapes, transposes and broadcasts; ``jit``/``closed_call``/``remat`` bodies are
   recursed into and ``custom_jvp``/``custom_vjp`` calls inlined when a weight flows into them).

Loops are re-run with the same interpreter in their bodies: a weight that enters ``scan`` /
``while`` / ``cond`` as a constant (a recurrent cell) is quantized at every step with its one
quantizer; a stacked leaf scanned over (``nn.scan`` layers) is quantized per layer, the layers'
activation quantizers scanned along with it.
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
import numpy as np
from jax.experimental import checkify

from jaxjpq import gates as gates_lib
from jaxjpq.graph import Graph, check_inputs, kept, put_layers
from jaxjpq.jaxprs import aval, cached, is_dynamic, key_of, sub_jaxpr
from jaxjpq.quant import (
    QuantParams,
    bits_from_step,
    broadcast_params,
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
from jaxjpq.trace.registry import eqn_macs, rule_for, walk_jaxpr

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
        _set(out, key, put_layers(leaf(variables, key), ps, jnp))
    return out


def transform_variables(
    variables: Mapping, state: CompressionState, gate_key: jax.Array | None = None
) -> dict:
    """``mask ⊙ M ⊙ Q(z ⊙ W)`` for the whole variable tree (what the compressed forward runs
    with; ``M`` the elementwise masks).

    ``z`` are the VIB gates of ``state.gates`` (none: 1): sampled with ``gate_key``, else ``μ``.
    """
    graph = check_state(state)
    check_variables(graph, variables)
    if state.gates:
        variables = apply_masks(graph, variables, gates_lib.values(state.gates, gate_key))
    return apply_masks(graph, quantize_weights(variables, state), state.masks)


# ---------------------------------------------------------------------------------------------
# Jaxpr interpreter that quantizes site inputs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Hook:
    """What the interpreter does at each site's contraction.

    data: ``site -> pytree | None``, the site's per-site values (e.g. its activation quantizer);
      for a stacked site the values of its layers are stacked and sliced by the scans.
    apply: ``(site, data, x) -> (x', emitted | None)`` on the site's input operand ``x``;
      ``emitted`` (a scalar statistic) is returned per site, reduced with ``max`` over repeated
      uses and loop iterations (per layer for stacked sites).
    """

    data: Callable[[str], Any]
    apply: Callable[[str, Any, jax.Array], tuple[jax.Array, Any]]
    contract: Callable[[str, Any, Callable, jax.Array, jax.Array], jax.Array] | None = None
    """Optional ``(site, data, f, x, w) -> y``: evaluates the site's contraction, ``f(x, w)`` the
    original one on (hooked input, weight operand); kernels fused from several sites refuse it."""


@dataclasses.dataclass
class _Run:
    hook: _Hook
    site_of: dict  # leaf key -> site name (ordinary sites)
    stacks: dict  # leaf key -> site names of a stacked leaf, flat layer order
    site_sizes: dict  # leaf key -> stack sizes of a stacked leaf
    seen: set

    def stack_data(self, key: tuple) -> dict:
        names = self.stacks[key]
        sizes = self.site_sizes[key]
        vals = [self.hook.data(n) for n in names]
        on = jnp.asarray([v is not None for v in vals]).reshape(sizes)
        filler = next((v for v in vals if v is not None), None)
        if filler is None:
            return {"p": None, "on": on}
        vals = [filler if v is None else v for v in vals]
        p = jax.tree.map(lambda *xs: jnp.stack(xs).reshape(*sizes, *jnp.shape(xs[0])), *vals)
        return {"p": p, "on": on}


@dataclasses.dataclass(frozen=True)
class _Parts:
    """Tag of a kernel concatenated from site weights along ``axis`` (``keys``, ``sizes``)."""

    axis: int
    keys: tuple
    sizes: tuple


def _bind(eqn, invals):
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        return eqn.primitive.bind(*invals, **bind_params)


def _parts_call(eqn, invals, w_i: int, parts: _Parts, run: _Run, bound: Mapping, emits: dict):
    """The contraction of ``eqn`` with its kernel (operand ``w_i``) fused from several sites'
    weights, as one contraction per site, each with its own input quantizer: outputs
    concatenated (fused output axis) or summed (fused contracted axis)."""
    x_i = 1 - w_i
    x, w = invals[x_i], invals[w_i]
    cuts = np.cumsum(parts.sizes)[:-1].tolist()
    ws = jnp.split(w, cuts, axis=parts.axis)
    name = eqn.primitive.name
    if name == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        w_c, x_c = (rc, lc) if w_i == 1 else (lc, rc)
        w_b = rb if w_i == 1 else lb
        contracted = parts.axis in w_c
        if contracted:
            x_axis = x_c[list(w_c).index(parts.axis)]
        else:
            free = [a for a in range(w.ndim) if a not in w_c and a not in w_b]
            n_x_free = x.ndim - len(x_c) - len(w_b)
            out_axis = len(w_b) + (n_x_free if w_i == 1 else 0) + free.index(parts.axis)
    elif name == "conv_general_dilated" and w_i == 1:
        dn = eqn.params["dimension_numbers"]
        contracted = False
        if parts.axis != dn.rhs_spec[0] or eqn.params["feature_group_count"] != 1:
            raise NotImplementedError("a conv kernel fused along an axis other than its output "
                                      "features is not supported by the compressed forward.")
        out_axis = dn.out_spec[1]
    else:
        raise NotImplementedError(f"a fused kernel reaches '{name}' as its left operand.")
    xs = jnp.split(x, cuts, axis=x_axis) if contracted else [x] * len(ws)
    outs = []
    for key, wp, xp in zip(parts.keys, ws, xs, strict=True):
        xq, e = _site_call(run, key, xp, bound)
        _merge_emit(emits, key, e)
        ops = list(invals)
        ops[x_i], ops[w_i] = xq, wp
        outs.append(_bind(eqn, ops))
    return sum(outs[1:], outs[0]) if contracted else jnp.concatenate(outs, axis=out_axis)


def _merge_emit(emits: dict, key: Any, e: Any) -> None:
    if e is not None:
        emits[key] = e if key not in emits else jnp.maximum(emits[key], e)


def _site_call(run: _Run, key: tuple, x: jax.Array, bound: Mapping) -> tuple[jax.Array, Any]:
    """Apply the hook at the contraction of leaf ``key``'s site (the current layer's, if
    stacked)."""
    hook = run.hook
    if key in run.stacks:
        if key not in bound:
            raise NotImplementedError(
                f"the stacked weight {'/'.join(key)} is used outside the scan over its layers; "
                "the compressed forward needs each layer's slice to reach its contraction "
                "through that scan."
            )
        names = run.stacks[key]
        run.seen.update(names)
        data = bound[key]
        y, e = hook.apply(names[0], data["p"], x)
        if data["p"] is not None:
            y = jnp.where(data["on"], y, x)
        return y, e
    name = run.site_of[key]
    run.seen.add(name)
    return hook.apply(name, hook.data(name), x)


def _site_data(run: _Run, key: tuple, bound: Mapping) -> tuple[str, Any]:
    """(site name, hook data) of leaf ``key``'s contraction (the current layer's, if stacked)."""
    if key in run.stacks:
        return run.stacks[key][0], bound[key]["p"]
    name = run.site_of[key]
    return name, run.hook.data(name)


def _contract(eqn, invals: list, act: int, key: tuple, run: _Run, bound: Mapping) -> jax.Array:
    """The site contraction of ``eqn`` through ``run.hook.contract``."""
    if len(invals) != 2:
        raise NotImplementedError(f"'{eqn.primitive.name}' with {len(invals)} operands at a site.")
    name, data = _site_data(run, key, bound)

    def f(x, w):
        ops = [None, None]
        ops[act], ops[1 - act] = x, w
        return _bind(eqn, ops)

    return run.hook.contract(name, data, f, invals[act], invals[1 - act])


def _scan(eqn, invals, intags, run: _Run, bound: Mapping):
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    body = p["jaxpr"]
    consts, init, xs = invals[:nc], invals[nc : nc + nk], invals[nc + nk :]
    ctags, xtags = intags[:nc], intags[nc + nk :]
    if any(t is not None for t in intags[nc : nc + nk]):
        raise NotImplementedError(
            f"a site's weight is a loop carry of '{eqn.primitive.name}'; the compressed forward "
            "quantizes weights that enter a loop as constants or as scanned layer stacks."
        )
    scanned = {t for t in xtags if t is not None}
    for key in scanned:
        if key not in run.stacks:
            raise NotImplementedError(
                f"the weight {'/'.join(key)} is sliced by a scan the tracer did not see as a "
                "layer stack; re-trace the graph for this apply_fn."
            )
    xdata = {k: bound[k] if k in bound else run.stack_data(k) for k in scanned}

    def f(carry, x):
        xv, xd = x
        outs, _, em = _eval(body.jaxpr, body.consts, [*consts, *carry, *xv],
                            [*ctags, *([None] * nk), *xtags], run, {**bound, **xd})
        return outs[:nk], (outs[nk:], em)

    carry, (ys, em) = jax.lax.scan(f, list(init), (list(xs), xdata), length=p["length"],
                                   reverse=p["reverse"], unroll=p["unroll"])
    emits = {k: v if k in scanned else jnp.max(v, axis=0) for k, v in em.items()}
    return [*carry, *ys], emits


def _no_emits(em: dict, where: str) -> None:
    if em:
        raise NotImplementedError(
            f"statistics of sites inside '{where}' (calibration) are not collected; calibrate "
            "with the loop unrolled or as a scan."
        )


def _while(eqn, invals, intags, run: _Run, bound: Mapping):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn : cn + bn], invals[cn + bn :]
    if any(t is not None for t in (*intags[:cn], *intags[cn + bn :])):
        raise NotImplementedError(
            "a site's weight is a loop carry or a condition input of 'while'; the compressed "
            "forward quantizes weights that enter a while loop's body as constants."
        )
    btags = list(intags[cn : cn + bn])
    body, cond = p["body_jaxpr"], p["cond_jaxpr"]

    def body_fn(c):
        outs, _, em = _eval(body.jaxpr, body.consts, [*bconsts, *c], btags + [None] * len(c),
                            run, bound)
        _no_emits(em, "while")
        return outs

    def cond_fn(c):
        return _eval(cond.jaxpr, cond.consts, [*cconsts, *c], [None] * (cn + len(c)), run,
                     bound)[0][0]

    return list(jax.lax.while_loop(cond_fn, body_fn, list(init))), {}


def _cond(eqn, invals, intags, run: _Run, bound: Mapping):
    def branch(br):
        def fn(*ops):
            outs, _, em = _eval(br.jaxpr, br.consts, list(ops), list(intags[1:]), run, bound)
            _no_emits(em, "cond")
            return outs

        return fn

    fns = [branch(br) for br in eqn.params["branches"]]
    return list(jax.lax.switch(invals[0], fns, *invals[1:])), {}


_LOOPS = {"scan": _scan, "while": _while, "cond": _cond}


def _eval(jaxpr, consts, args, tags, run: _Run, bound: Mapping):
    """Evaluate ``jaxpr``; ``tags[i]`` is the site-weight leaf key that ``args[i]`` is (or None);
    ``bound`` maps stacked leaf keys to the current layer's hook data. Each primitive's role
    comes from its rule (:mod:`jaxjpq.trace.registry`).

    Returns ``(outs, out_tags, emits)``.
    """
    emits: dict = {}

    def merge(em: Mapping) -> None:
        for k, e in em.items():
            _merge_emit(emits, k, e)

    def step(i, eqn, ins):
        invals = [x for x, _ in ins]
        intags = [t for _, t in ins]
        n_out = len(eqn.outvars)
        tagged = [t for t in intags if t is not None]
        if not tagged:
            ans = _bind(eqn, invals)
            return [(o, None) for o in (ans if eqn.primitive.multiple_results else [ans])]
        rule = rule_for(eqn.primitive.name)
        out_tags = [None] * n_out
        if rule.forward == "site" and len(invals) >= 2:
            lhs_t, rhs_t = intags[0], intags[1]
            if (lhs_t is None) != (rhs_t is None):
                act = 1 if lhs_t is not None else 0
                key = lhs_t or rhs_t
                if isinstance(key, _Parts):
                    if run.hook.contract is not None:
                        raise NotImplementedError("a contraction hook on a kernel fused from "
                                                  "several sites' weights.")
                    return [(_parts_call(eqn, invals, 1 - act, key, run, bound, emits), None)]
                invals[act], e = _site_call(run, key, invals[act], bound)
                _merge_emit(emits, key, e)
                if run.hook.contract is not None:
                    return [(_contract(eqn, invals, act, key, run, bound), None)]
        elif rule.forward == "fuse" and all(t is not None and not isinstance(t, _Parts)
                                            for t in intags):
            d = eqn.params["dimension"]
            out_tags = [_Parts(d, tuple(intags), tuple(int(jnp.shape(x)[d]) for x in invals))]
        elif rule.forward == "cast" or (rule.forward == "pass"
                                        and not isinstance(tagged[0], _Parts)):
            out_tags = [tagged[0]] * n_out
        elif rule.control == "call":
            sub, sub_consts = sub_jaxpr(eqn.params)
            if sub is not None:
                outs, sub_tags, em = _eval(sub, sub_consts, invals, intags, run, bound)
                merge(em)
                return list(zip(outs, sub_tags, strict=True))
        elif rule.control is not None:
            outs, em = _LOOPS[rule.control](eqn, invals, intags, run, bound)
            merge(em)
            return [(o, None) for o in outs]
        ans = _bind(eqn, invals)
        outs = ans if eqn.primitive.multiple_results else [ans]
        return list(zip(outs, out_tags, strict=True))

    res = walk_jaxpr(jaxpr, list(consts), list(zip(args, tags, strict=True)), step,
                     lambda v: (v.val, None))
    return [x for x, _ in res], [t for _, t in res], emits


def _site_input_runner(apply_fn: Callable, graph: Graph) -> Callable:
    """``run(variables, hook, sites, *args, **kwargs) -> (output, {site: emitted})``: evaluate
    ``apply_fn`` calling the :class:`_Hook` on the input operand of every site conv/dot_general
    of the sites in ``sites``."""
    site_of = {s.weight: s.name for s in graph.sites if not s.layer_axes}
    stacks: dict = {}
    sizes: dict = {}
    for s in graph.sites:
        if s.layer_axes:
            stacks.setdefault(s.weight, []).append(s)
            sizes[s.weight] = s.stack_sizes
    for k, lst in stacks.items():
        lst.sort(key=lambda s: np.ravel_multi_index(s.layer, sizes[k]))
        stacks[k] = [s.name for s in lst]
    cache: dict = {}

    def run(variables, hook, sites, *args, **kwargs):
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
            key = key_of(flat[i][0])
            k = key[1:] if key and key[0] == "0" else None
            active = k is not None and (site_of.get(k) in sites
                                        or any(n in sites for n in stacks.get(k, ())))
            tags.append(k if active else None)
        r = _Run(hook, site_of, stacks, sizes, set())
        outs, _, em = _eval(closed.jaxpr, closed.consts, dyn, tags, r, {})
        missing = sorted(set(sites) - r.seen)
        if missing:
            raise ValueError(
                f"could not find the conv/dot_general of site(s) {missing} in the traced model; "
                "the weight must reach it through casts/reshapes/transposes only. Re-trace the "
                "graph with jaxjpq.trace for this apply_fn, or skip these sites."
            )
        by_site: dict = {}
        for k, e in em.items():
            if k in stacks:
                flat_e = jnp.reshape(e, (len(stacks[k]), *jnp.shape(e)[len(sizes[k]):]))
                by_site.update({n: flat_e[j] for j, n in enumerate(stacks[k])})
            else:
                by_site[site_of[k]] = e
        return jax.tree.unflatten(out_tree, outs), by_site

    return run


def _once_per_tensor(graph: Graph, apply: Callable) -> Callable:
    """The hook ``apply(site, p, x)`` evaluated once per (activation quantizer, input tensor):
    a site whose ``act_from`` names an earlier site that read the same ``x`` gets that site's
    result. Make one per forward call (it holds the values of that call)."""
    key_of = {s.name: s.act_key for s in graph.sites}
    memo: dict = {}

    def f(site, p, x):
        k = (key_of[site], id(x))
        hit = memo.get(k)
        if hit is not None and hit[0] is x:
            return hit[1]
        out = apply(site, p, x)
        memo[k] = (x, out)  # x is kept alive, so its id is not reused within the call
        return out

    return f


def act_quantized_apply(apply_fn: Callable, graph: Graph, *, check_finite: bool = False
                        ) -> Callable:
    """``fn(variables, act, *args, power_of_two=False, learn_t=True, **kwargs)``: run ``apply_fn``
    with the input of each site in ``act`` (``{site: QuantParams}``, used as given) fake-quantized;
    weights are used as given (already quantized, e.g. dequantized from an export).
    ``act`` is keyed by ``Site.act_key``: a tensor read by several sites is quantized once.
    ``check_finite`` adds a ``checkify`` check of every site input (see :func:`checked_apply`)."""
    run = _site_input_runner(apply_fn, graph)
    sm = graph.site_map

    def fn(variables, act, *args, power_of_two: bool = False, learn_t: bool = True, **kwargs):
        @functools.partial(_once_per_tensor, graph)
        def apply(site, p, x):
            if check_finite:
                checkify.check(jnp.all(jnp.isfinite(x)),
                               f"non-finite input (NaN/inf) at site {site}")
            if p is None:
                return x, None
            return quantize_with(x, p, sm[site].signed_input, power_of_two, learn_t), None

        sites = frozenset(n for n, x in sm.items() if check_finite or x.act_key in act)
        return run(variables, _Hook(lambda n: act.get(sm[n].act_key), apply), sites, *args,
                   **kwargs)[0]

    return fn


@jax.custom_vjp
def _probe(x: jax.Array, p: jax.Array) -> jax.Array:
    return x


def _probe_fwd(x, p):
    return x, None


def _probe_bwd(_, g):
    return g, jnp.sum(jnp.square(g.astype(jnp.float32)))


_probe.defvjp(_probe_fwd, _probe_bwd)


def probed_apply(apply_fn: Callable, graph: Graph) -> Callable:
    """``fn(variables, probes, *args, **kwargs)``: ``apply_fn`` with each site's input ``x``
    passed through an identity whose cotangent for the float32 scalar ``probes[site]`` is
    ``Σ (∂L/∂x)²``: ``jax.grad`` w.r.t. ``probes`` gives every site's squared input-gradient norm
    (per sample under ``vmap``: the empirical Fisher trace of the site's input). A tensor read by
    several sites (``Site.act_from``) is probed once, by its first site's probe (the others'
    get 0). Weights and inputs are used as given (no quantization)."""
    run = _site_input_runner(apply_fn, graph)

    def fn(variables, probes, *args, **kwargs):
        @functools.partial(_once_per_tensor, graph)
        def apply(site, p, x):
            return (x, None) if p is None else (_probe(x, p), None)

        return run(variables, _Hook(probes.get, apply), frozenset(probes), *args, **kwargs)[0]

    return fn


def fisher_apply(apply_fn: Callable, graph: Graph) -> Callable:
    """``fn(variables, probes, *args, **kwargs)``: ``apply_fn`` on a batch whose samples are
    independent (axis 0 of every site input), with ``probes[site] = (a, w)`` (float32 scalar,
    float32 ``[weight_shape]`` zeros) whose cotangents under ``jax.grad`` of the *summed*
    per-sample loss are ``Σ_n ‖∂L_n/∂x_n‖²`` of the site input (a tensor read by several sites
    probed once, as in :func:`probed_apply`) and ``Σ_n (∂L_n/∂W)²`` of the site
    weight: the empirical Fisher of the batch from one batched backward pass (each site's
    per-sample weight gradient is formed from its input and output cotangent only). Weights get
    no gradient. A weight used by several contractions, or whose operand is not its leaf up to a
    reshape, gives a wrong weight statistic: check against the ``vmap(grad)`` one
    (:func:`jaxjpq.fit.fisher` does)."""
    run = _site_input_runner(apply_fn, graph)

    def fn(variables, probes, *args, **kwargs):
        @functools.partial(_once_per_tensor, graph)
        def apply(site, p, x):
            return _probe(x, p[0]), None

        def contract(site, p, f, x, w):
            return _tap(f, x, w, p[1])

        hook = _Hook(probes.get, apply, contract)
        return run(variables, hook, frozenset(probes), *args, **kwargs)[0]

    return fn


def _tap(f: Callable, x: jax.Array, w: jax.Array, p: jax.Array) -> jax.Array:
    """``f(x, w)``, with the cotangent of ``p`` the sum over samples (``x``'s axis 0) of the
    squared per-sample gradient w.r.t. ``w`` (reshaped to ``p``)."""
    n = x.shape[0]
    full = jax.eval_shape(f, x, w).shape
    one = jax.eval_shape(f, x[:1], w).shape
    axes = [k for k, (a, b) in enumerate(zip(full, one, strict=True)) if a != b]
    if n > 1 and (len(full) != len(one) or len(axes) != 1 or one[axes[0]] != 1):
        raise NotImplementedError("the batch axis of a site's input does not map to one axis "
                                  "of its contraction's output.")
    k = axes[0] if axes else 0
    one_x = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
    uses = sum(eqn_macs(e) for e in jax.make_jaxpr(f)(one_x, w).jaxpr.eqns)
    # each weight entry in one product per sample: the per-sample gradient entry is one product
    # x·δ, so Σ_n g_n² is the batched weight gradient of the squared operands
    single = uses == w.size

    @jax.custom_vjp
    def tapped(x, w, p):
        return f(x, w)

    def fwd(x, w, p):
        return f(x, w), (x, w)

    def bwd(res, ct):
        x, w = res
        _, vx = jax.vjp(lambda x_: f(x_, w), x)

        def grad_one(xn, cn):
            _, vw = jax.vjp(lambda w_: f(xn[None], w_), w)
            return vw(jnp.expand_dims(cn, k))[0]

        if single:
            _, vw = jax.vjp(lambda w_: f(jnp.square(x), w_), w)
            sq = vw(jnp.square(ct))[0].astype(jnp.float32)
            return vx(ct)[0], jnp.zeros_like(w), sq.reshape(p.shape)
        if n == 1:
            _, vw = jax.vjp(lambda w_: f(x, w_), w)
            g = vw(ct)[0][None].astype(jnp.float32)
        else:
            g = jax.vmap(grad_one, in_axes=(0, k))(x, ct).astype(jnp.float32)
        return vx(ct)[0], jnp.zeros_like(w), jnp.sum(jnp.square(g), 0).reshape(p.shape)

    tapped.defvjp(fwd, bwd)
    return tapped(x, w, p)


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

    Weights are ``mask ⊙ Q(z ⊙ W)`` (see :func:`transform_variables`; pass ``gate_key=`` to
    sample the gates ``z`` in training), site inputs are fake-quantized with ``state.act``; the
    graph is ``state.graph``. ``fn.site_stats(variables, state, *args, stat=..., **kwargs)``
    returns ``(output, {site: stat(site, un-quantized input)})`` (a scalar per site; the max over
    repeated uses and loop iterations) for calibration. jit ``fn``.
    """
    made: dict[int, tuple[Graph, _Forward]] = {}  # per graph: the jaxpr caches live in here

    def forward(graph: Graph) -> _Forward:
        hit = made.get(id(graph))
        if hit is None or hit[0] is not graph:
            hit = (graph, _Forward(act_quantized_apply(apply_fn, graph, check_finite=check_finite),
                                   _site_input_runner(apply_fn, graph)))
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

        @functools.partial(_once_per_tensor, graph)
        def apply(site, p, x):
            e = stat(site, x)
            if p is None:
                return x, e
            return quantize_with(x, p, sm[site].signed_input, state.power_of_two,
                                 state.learn_t), e

        return forward(graph).run(v, _Hook(data, apply), frozenset(sm), *args, **kwargs)

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
