"""Fisher probes: the compressed forward's site hooks used to read, from one backward pass, each
site input's squared gradient norm and each site weight's per-sample squared gradients (the
empirical Fisher that :mod:`jaxjpq.methods.fit` prices damage with)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxjpq.graph import Graph
from jaxjpq.hooks import Hook, once_per_tensor, site_input_runner
from jaxjpq.trace.registry import eqn_macs


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
    run = site_input_runner(apply_fn, graph)

    def fn(variables, probes, *args, **kwargs):
        @functools.partial(once_per_tensor, graph)
        def apply(site, p, x):
            return (x, None) if p is None else (_probe(x, p), None)

        return run(variables, Hook(probes.get, apply), frozenset(probes), *args, **kwargs)[0]

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
    run = site_input_runner(apply_fn, graph)

    def fn(variables, probes, *args, **kwargs):
        @functools.partial(once_per_tensor, graph)
        def apply(site, p, x):
            return _probe(x, p[0]), None

        def contract(site, p, f, x, w):
            return _tap(f, x, w, p[1])

        hook = Hook(probes.get, apply, contract)
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
