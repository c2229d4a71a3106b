"""Sites that read one tensor share one activation quantizer (``Site.act_from``): the tensor is
quantized once, the cost model, ``set_bits``, the budget enforcement and FIT follow it."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from archs import build

from jaxjpq import cost
from jaxjpq.compress import compress_apply
from jaxjpq.methods import fit
from jaxjpq.methods.core import enforce_budget, set_bits
from jaxjpq.methods.fisher import probed_apply
from jaxjpq.quant import step_from_bits
from jaxjpq.state import CompressionSpec, check_state, init_state
from jaxjpq.trace import trace

Q, K, V = "FusedHeads_0/Dense_0", "FusedHeads_0/Dense_1", "FusedHeads_0/Dense_2"


class _Wrapped(nn.Module):
    """FusedHeads (query, key, value read one tensor) after a first dense layer."""

    @nn.compact
    def __call__(self, x):
        from archs import FusedHeads

        return FusedHeads()(nn.gelu(nn.Dense(6)(x)))


class _Tied(nn.Module):
    """One weight used by two contractions on different inputs: the site keeps its own input."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.5), (4, 4))
        return nn.Dense(2)(jnp.tanh(x @ w) @ w)


def _setup():
    m = _Wrapped()
    x = jax.random.normal(jax.random.key(1), (3, 5, 4))
    v = m.init(jax.random.key(0), x)
    return m, v, x, trace(m.apply, v, x)


def _unshared(g):
    return dataclasses.replace(g, sites=tuple(dataclasses.replace(s, act_from=None)
                                              for s in g.sites))


def _state(g, v, bits):
    st = init_state(g, CompressionSpec(skip=(), init_bits=8), v)
    sm = g.site_map
    act = {k: p.replace(q_m=jnp.float32(1.5), d=step_from_bits(bits.get(k, 6.0), 1.5, 1.0,
                                                               sm[k].signed_input))
           for k, p in st.act.items()}
    return st.replace(act=act)


def test_query_key_value_share_the_query_input_quantizer():
    _, v, _, g = _setup()
    sm = g.site_map
    assert sm[K].act_from == Q and sm[V].act_from == Q and sm[Q].act_from is None
    assert sm[K].act_key == Q
    st = init_state(g, CompressionSpec(skip=()), v)
    assert Q in st.act and K not in st.act and V not in st.act
    assert len(st.act) == len(g.sites) - 2
    assert f"(input of {Q})" in g.summary()
    # the sharing is part of the graph the state carries
    assert check_state(st) is g and sum(s.act_from is not None for s in g.sites) == 2


def test_a_weight_used_twice_keeps_its_own_input():
    m = _Tied()
    x = jax.random.normal(jax.random.key(1), (3, 4))
    v = m.init(jax.random.key(0), x)
    g = trace(m.apply, v, x)
    assert all(s.act_from is None for s in g.sites)


def test_shared_forward_and_gradient_equal_separate_quantizers_with_equal_params():
    """One quantizer on the tensor == three equal quantizers on it; its gradient == their sum."""
    m, v, x, g = _setup()
    g0 = _unshared(g)
    st = _state(g, v, {Q: 3.0})
    st0 = _state(g0, v, {Q: 3.0, K: 3.0, V: 3.0})
    f = f0 = compress_apply(m.apply)  # each state carries its graph
    np.testing.assert_array_equal(f(v, st, x), f0(v, st0, x))

    def loss(fn, s):
        return jnp.sum(fn(v, s, x) ** 2)

    gs = jax.grad(lambda s: loss(f, s))(st).act
    gs0 = jax.grad(lambda s: loss(f0, s))(st0).act
    for field in ("d", "q_m"):
        want = sum(getattr(gs0[k], field) for k in (Q, K, V))
        np.testing.assert_allclose(getattr(gs[Q], field), want, rtol=1e-5, atol=1e-7)
        assert float(jnp.abs(want)) > 0
    # the tensor is quantized once: one quantizer call fewer per shared reader
    def calls(fn, s):
        return str(jax.make_jaxpr(lambda s: fn(v, s, x))(s)).count("custom_vjp_call[")

    assert calls(f0, st0) - calls(f, st) == 2


def test_cost_set_bits_and_enforce_budget_follow_the_shared_quantizer():
    _, v, _, g = _setup()
    st = _state(g, v, {})
    st = set_bits(st, K, 3.0, kind="act")  # a reader's name sets the tensor's quantizer
    table = cost.site_table(st)
    for n in (Q, K, V):
        assert float(table[n]["b_a"]) == 3.0
    np.testing.assert_allclose(float(cost.relative_bops(st)),
                               float(cost.relative_bops(_state(_unshared(g), v,
                                                               {Q: 3.0, K: 3.0, V: 3.0}))))
    # the stored quantizers: one (d, q_m, t) for the three readers
    full = float(cost.size_bits(st, include_scales=True))
    sep = float(cost.size_bits(_state(_unshared(g), v, {Q: 3.0, K: 3.0, V: 3.0}),
                               include_scales=True))
    assert sep - full == 2 * 3 * 32
    target = 0.5 * float(cost.relative_bops(st))
    out = enforce_budget(st, bops=target, params=v["params"])
    assert float(cost.relative_bops(out)) <= target + 1e-9


def test_fisher_probe_of_a_shared_tensor_sums_its_readers():
    """The input trace of a shared tensor is Σ_n ‖Σ_readers ∂L_n/∂x‖² (one probe), not the sum
    of the readers' separate traces; the other readers' probes get nothing."""
    m, v, x, g = _setup()
    probed = probed_apply(m.apply, g)
    probes = {s.name: jnp.zeros((), jnp.float32) for s in g.sites}

    def loss(p, xi):
        return jnp.sum(probed(v, p, xi[None]) ** 2)

    tr = jax.vmap(jax.grad(loss), in_axes=(None, 0))(probes, x)
    tr = {k: float(jnp.sum(t)) for k, t in tr.items()}
    assert tr[K] == 0.0 and tr[V] == 0.0

    def via_tensor(xi):  # the gradient w.r.t. the shared tensor, by hand
        p = v["params"]["Dense_0"]
        h = nn.gelu(xi[None] @ p["kernel"] + p["bias"])
        inner = {"params": v["params"]["FusedHeads_0"]}
        from archs import FusedHeads

        gh = jax.grad(lambda h: jnp.sum(FusedHeads().apply(inner, h) ** 2))(h)
        return jnp.sum(gh ** 2)

    np.testing.assert_allclose(tr[Q], float(jnp.sum(jax.vmap(via_tensor)(x))), rtol=1e-4)


def test_fit_search_lowers_a_shared_input_once_under_a_bops_budget():
    m, v, x, g = _setup()
    st = init_state(g, CompressionSpec(skip=(), init_bits=8), v)
    info = fit.fisher(m.apply, g, v, [{"inputs": x, "labels": jnp.array([0, 1, 2])}],
                      progress=False)
    assert info.act[K] == 0.0 and info.act[Q] > 0.0
    res = fit.search(info, st, v, bops=0.05, progress=False)
    assert K not in res.act_bits and V not in res.act_bits and Q in res.act_bits
    assert float(cost.relative_bops(res.state)) <= 0.05 + 1e-12
    assert not any(" input->" in label and (K in label or V in label) for label, _ in res.path)


def test_flax_attention_shares_query_key_value_inputs():
    model, v, x = build("attn")
    g = trace(model.apply, v, x)
    shared = {s.name: s.act_from for s in g.sites if s.act_from}
    assert sorted(shared) == [n.replace("query", k) for n in set(shared.values())
                              for k in ("key", "value")]
