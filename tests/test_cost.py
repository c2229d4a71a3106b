"""Tests for jaxjpq.cost: BOPs / size against hand computation, soft vs exact, report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import mnist_cnn_graph
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxjpq import cost
from jaxjpq.quant import QuantParams, step_from_bits
from jaxjpq.state import CompressionSpec, init_state

F1, F2, H, C = 4, 8, 16, 10
G = mnist_cnn_graph(F1, F2, H, C)


def _state(bits_w, bits_a, masks, per_channel=False, power_of_two=False):
    """State with integer bits per site and the given {group: bool array} masks."""
    spec = CompressionSpec(skip=(), per_channel=per_channel, power_of_two=power_of_two)
    s = init_state(G, spec)
    sm = G.site_map
    w = {k: p.replace(d=step_from_bits(float(bits_w[k]), p.q_m, p.t)) for k, p in s.weight.items()}
    a = {k: p.replace(d=step_from_bits(float(bits_a[k]), p.q_m, p.t, sm[k].signed_input))
         for k, p in s.act.items()}
    m = {k: jnp.asarray(v, jnp.float32) for k, v in masks.items()}
    return s.replace(weight=w, act=a, masks=m)


def test_dense_fp32_bops_are_1024_macs():
    s = init_state(G, CompressionSpec(quantize_weights=False, quantize_activations=False), None)
    total_macs = sum(cost.macs(G).values())
    assert cost.bops(s) == 32 * 32 * total_macs == cost.fp32_bops(G)
    assert cost.relative_bops(s) == 1.0
    assert cost.relative_size(s) == 1.0
    assert all(b == (32.0, 32.0) for b in cost.bits(s).values())


sites = ("Conv_0", "Conv_1", "Dense_0", "Dense_1")


@settings(max_examples=25, deadline=None)
@given(
    bw=st.lists(st.integers(2, 8), min_size=4, max_size=4),
    ba=st.lists(st.integers(2, 8), min_size=4, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_bops_and_size_match_hand_computation(bw, ba, seed):
    rng = np.random.default_rng(seed)
    m0, m1, m2 = (rng.random(n) < 0.5 for n in (F1, F2, H))
    s = _state(dict(zip(sites, bw, strict=True)), dict(zip(sites, ba, strict=True)),
               {"Conv_0/kernel:out": m0, "Conv_1/kernel:out": m1, "Dense_0/kernel:out": m2})
    k0, k1, k2 = int(m0.sum()), int(m1.sum()), int(m2.sum())
    macs = [28 * 28 * 9 * 1 * k0, 14 * 14 * 9 * k0 * k1, 7 * 7 * k1 * k2, k2 * C]
    params = [9 * 1 * k0, 9 * k0 * k1, 49 * k1 * k2, k2 * C]
    want_bops = sum(m * w * a for m, w, a in zip(macs, bw, ba, strict=True))
    want_size = sum(p * w for p, w in zip(params, bw, strict=True))
    assert cost.bops(s) == want_bops
    assert cost.size_bits(s) == want_size
    assert cost.bits(s) == {k: (float(w), float(a)) for k, w, a in zip(sites, bw, ba,
                                                                          strict=True)}
    np.testing.assert_allclose(cost.bops(s, soft=True), want_bops, rtol=1e-5)
    assert sum(cost.site_bops(s).values()) == want_bops


def test_bops_under_jit_is_float32_close():
    s = _state(dict.fromkeys(sites, 3), dict.fromkeys(sites, 5),
               {"Conv_0/kernel:out": np.ones(F1), "Conv_1/kernel:out": np.ones(F2),
                "Dense_0/kernel:out": np.ones(H)})
    np.testing.assert_allclose(jax.jit(lambda s: cost.bops(s))(s), cost.bops(s), rtol=1e-6)


def test_soft_bops_gradient_in_masks_and_bits():
    s = _state(dict.fromkeys(sites, 4), dict.fromkeys(sites, 8),
               {"Conv_0/kernel:out": np.ones(F1), "Conv_1/kernel:out": np.ones(F2),
                "Dense_0/kernel:out": np.ones(H)})
    g = jax.grad(lambda s: cost.bops(s, soft=True))(s)
    # d BOPs / d mask of one Dense_0 unit: its row in Dense_0 (49·F2 MACs) and Dense_1 (C MACs)
    np.testing.assert_allclose(g.masks["Dense_0/kernel:out"], (49 * F2 + C) * 4 * 8, rtol=1e-5)
    # d BOPs / d mask of one Conv_1 channel: Conv_1 out (14²·9·F1) + its 49 rows of Dense_0
    np.testing.assert_allclose(g.masks["Conv_1/kernel:out"],
                               (14 * 14 * 9 * F1 + 49 * H) * 4 * 8, rtol=1e-5)
    # bits fall when d grows
    assert all(float(g.weight[k].d) < 0 for k in sites)
    assert all(float(g.act[k].d) < 0 for k in sites)


def test_per_channel_bits_count_per_channel():
    s = init_state(G, CompressionSpec(skip=(), per_channel=True), None)
    p = s.weight["Dense_0"]
    bits = np.full(H, 3.0)
    bits[0], bits[1] = 8.0, 6.0
    s.weight["Dense_0"] = p.replace(d=step_from_bits(jnp.asarray(bits), p.q_m, p.t))
    mask = np.ones(H)
    mask[0] = 0.0
    s = s.replace(masks={**s.masks, "Dense_0/kernel:out": jnp.asarray(mask)})
    # the pruned channel holds 0 bits; the mean is over the kept weights
    want = np.concatenate([[0.0, 6.0], np.full(H - 2, 3.0)])
    np.testing.assert_array_equal(cost.channel_bits(s, "Dense_0"), want)
    np.testing.assert_allclose(cost.bits(s)["Dense_0"][0], (6.0 + 3.0 * (H - 2)) / (H - 1))
    soft = cost.bits(s, soft=True)["Dense_0"][0]
    np.testing.assert_allclose(soft, (6.0 + 3.0 * (H - 2)) / (H - 1), rtol=1e-5)
    rows = 49 * F2
    d0 = cost.size_bits(s) - cost.size_bits(s.replace(weight={**s.weight, "Dense_0": p}))
    # Dense_0 at 16 bits in the reference state: the difference is per channel
    assert d0 == rows * (6.0 + 3.0 * (H - 2)) - rows * (H - 1) * 16.0


def test_power_of_two_bits_are_rounded():
    s = _state(dict(zip(sites, (5, 7, 3, 2), strict=True)), dict.fromkeys(sites, 5),
               {"Conv_0/kernel:out": np.ones(F1), "Conv_1/kernel:out": np.ones(F2),
                "Dense_0/kernel:out": np.ones(H)}, power_of_two=True)
    assert [cost.bits(s)[k][0] for k in sites] == [4.0, 8.0, 4.0, 2.0]
    assert [float(cost.bits(s, soft=True)[k][0]) for k in sites] == [4.0, 8.0, 4.0, 2.0]


def test_non_integer_bits_round_up_in_exact_mode():
    s = init_state(G, CompressionSpec(skip=()), None)
    p = s.weight["Conv_1"]
    s.weight["Conv_1"] = QuantParams(d=step_from_bits(4.3, p.q_m), q_m=p.q_m, t=p.t)
    assert cost.bits(s)["Conv_1"][0] == 5.0


def test_report_lists_layers_and_kept_channels():
    m1 = np.ones(F2)
    m1[:3] = 0
    s = _state(dict.fromkeys(sites, 4), dict.fromkeys(sites, 4),
               {"Conv_0/kernel:out": np.ones(F1), "Conv_1/kernel:out": m1,
                "Dense_0/kernel:out": np.ones(H)})
    text = cost.report(s)
    for name in sites:
        assert name in text
    assert f"{F2 - 3}/{F2}" in text
    assert f"{cost.relative_bops(s):.4%}" in text


@pytest.mark.parametrize("name", ["lenet5", "vit_tiny_mnist"])
def test_dense_fp32_bops_of_traced_zoo_models(name):
    from jaxjpq.models.registry import get_model, input_spec
    from jaxjpq.trace import trace

    model = get_model(name)
    x = jnp.zeros(input_spec(name, 2).shape, input_spec(name, 2).dtype)
    v = model.init(jax.random.key(0), x)
    g = trace(model.apply, v, x)
    s = init_state(g, CompressionSpec(quantize_weights=False, quantize_activations=False))
    assert cost.bops(s) == 32 * 32 * sum(site.macs_per_example for site in g.sites) > 0
    assert cost.relative_bops(s) == 1.0


@settings(max_examples=10, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_active_bytes_are_the_slim_weights_at_their_bits(bits, seed):
    from helpers import small_cnn

    import jaxjpq

    model, v, _, x = small_cnn()
    pair = jaxjpq.init(model.apply, v, x, bits=(2, 8), skip=())
    s = pair.compression
    for n in s.weight:
        s = jaxjpq.set_bits(s, n, float(bits))
    rng = np.random.default_rng(seed)
    s = s.replace(masks={g: jnp.asarray(rng.random(m.shape) > 0.5, jnp.float32).at[0].set(1.0)
                         for g, m in s.masks.items()})
    _, slim_vars = jaxjpq.slim(v, s)
    kernels = sum(int(np.size(p["kernel"])) for p in slim_vars["params"].values())
    assert float(cost.active_bytes(s)) == kernels * bits / 8
