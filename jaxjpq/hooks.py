"""Site hooks: re-evaluate a model's jaxpr and call a hook on the input (and the contraction) of
every quantization site's conv / ``dot_general``.

``site_input_runner(apply_fn, graph)`` returns ``run(variables, hook, sites, *args, **kwargs)
-> (output, {site: emitted})``. The interpreter follows a site's weight leaf through dtype
casts, reshapes, transposes and broadcasts to its contraction; ``jit`` / ``closed_call`` /
``remat`` bodies are recursed into and ``custom_jvp`` / ``custom_vjp`` calls inlined when a
weight flows into them. ``scan`` / ``while`` / ``cond`` are re-issued with the interpreter in
their bodies: a weight entering a loop as a constant (a recurrent cell) is hooked at every step;
a stacked leaf scanned over (``nn.scan`` layers) is hooked per layer, the layers' hook values
scanned along with it. The compressed forward (:mod:`jaxjpq.compress`) and FIT's Fisher probes
(:mod:`jaxjpq.methods.fisher`) are hooks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxjpq.graph import Graph
from jaxjpq.jaxprs import aval, cached, is_dynamic, key_of, sub_jaxpr
from jaxjpq.trace.registry import rule_for, walk_jaxpr


@dataclasses.dataclass(frozen=True)
class Hook:
    """What the interpreter does at each site's contraction.

    data: ``site -> pytree | None``, the site's per-site values (e.g. its activation quantizer);
      for a stacked site the values of its layers are stacked and sliced by the scans.
    apply: ``(site, data, x) -> (x', emitted | None)`` on the site's input operand ``x``;
      ``emitted`` (a scalar statistic) is returned per site, reduced with ``max`` over repeated
      uses and loop iterations (per layer for stacked sites).
    """

    data: Callable[[str], Any]
    apply: Callable[[str, Any, jax.Array], tuple[jax.Array, Any]]
    contract: Callable[[str, Any, Any, jax.Array, jax.Array], jax.Array] | None = None
    """Optional ``(site, data, f, x, w) -> y``: evaluates the site's contraction, ``f`` the
    original one (a :class:`Contraction`, ``f(x, w)`` on hooked input and weight operand); kernels
    fused from several sites refuse it."""


@dataclasses.dataclass
class _Run:
    hook: Hook
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


@dataclasses.dataclass(frozen=True)
class Contraction:
    """A site's conv / ``dot_general``, callable as ``f(x, w)`` on (input, weight operand).

    Attributes:
      primitive: ``"dot_general"`` or ``"conv_general_dilated"``; params: its parameters.
      weight_operand: which operand (0 or 1) is the weight.
    """

    primitive: str
    params: Mapping
    weight_operand: int
    eqn: Any

    def __call__(self, x: jax.Array, w: jax.Array,
                 preferred_element_type: Any = None) -> jax.Array:
        """The contraction on ``x`` and ``w``; ``preferred_element_type`` (e.g. ``int32`` for
        int8 operands) replaces the accumulation type."""
        ops = [None, None]
        ops[1 - self.weight_operand], ops[self.weight_operand] = x, w
        if preferred_element_type is None:
            return _bind(self.eqn, ops)
        params = {**self.eqn.params, "preferred_element_type": preferred_element_type}
        with self.eqn.ctx.manager:
            return self.eqn.primitive.bind(*ops, **self.eqn.primitive.get_bind_params(params))


def _contract(eqn, invals: list, act: int, key: tuple, run: _Run, bound: Mapping) -> jax.Array:
    """The site contraction of ``eqn`` through ``run.hook.contract``."""
    if len(invals) != 2:
        raise NotImplementedError(f"'{eqn.primitive.name}' with {len(invals)} operands at a site.")
    name, data = _site_data(run, key, bound)
    f = Contraction(eqn.primitive.name, eqn.params, 1 - act, eqn)
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

    res = walk_jaxpr(jaxpr, [(c, None) for c in consts], list(zip(args, tags, strict=True)), step,
                     lambda v: (v.val, None))
    return [x for x, _ in res], [t for _, t in res], emits


def site_input_runner(apply_fn: Callable, graph: Graph) -> Callable:
    """``run(variables, hook, sites, *args, **kwargs) -> (output, {site: emitted})``: evaluate
    ``apply_fn`` calling the :class:`Hook` on the input operand of every site conv/dot_general
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


def once_per_tensor(graph: Graph, apply: Callable) -> Callable:
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
