"""Tests for jaxjpq.quant: custom gradients vs finite differences, bit algebra, codes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxjpq import quant

N = 64
SETTINGS = settings(max_examples=12, deadline=None)


def _sample(seed, signed=True):
    """Random x, per-tensor d, q_m, t away from the clip edge and 0 (for finite differences)."""
    rng = np.random.default_rng(seed)
    q_m = rng.uniform(0.5, 2.0)
    t = rng.uniform(0.6, 1.6)
    bits = rng.uniform(3.0, 6.0)
    d = q_m**t / (2 ** (bits - 1) - 1)
    x = rng.uniform(-1.5, 1.5, N) * q_m
    x = np.where(np.abs(np.abs(x) - q_m) < 0.05, x * 0.9, x)  # not on the clip edge
    x = np.where(np.abs(x) < 0.05, 0.1, x)  # not at 0 (|x|^(t-1) singular for t < 1)
    if not signed:
        x = np.abs(x)
    g = rng.normal(size=N)
    return x, d, q_m, t, g


def _surrogate(x, d, q_m, t, signed, r, y0, d0):
    """Rounding-free surrogate: round(y/d) frozen at r = round(y0/d0), y0/d0 from the base point."""
    s = np.sign(x) if signed else (x > 0).astype(float)
    ax = np.abs(x) if signed else np.maximum(x, 0)
    y = np.minimum(ax, q_m) ** t
    return s * d * (r + (y / d - y0 / d0))


def _fd(f, v, eps):
    return (f(v + eps) - f(v - eps)) / (2 * eps)


@pytest.mark.parametrize("signed", [True, False])
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1))
def test_custom_grads_match_fd_of_surrogate(signed, seed):
    x, d, q_m, t, g = _sample(seed, signed)
    ax = np.abs(x) if signed else np.maximum(x, 0)
    y0 = np.minimum(ax, q_m) ** t
    r = np.round(y0 / d)

    def loss(x_, d_, q_, t_):
        return jnp.sum(jnp.asarray(g, jnp.float32) * quant.quantize(x_, d_, q_, t_, signed))

    gx, gd, gq, gt = jax.grad(loss, argnums=(0, 1, 2, 3))(
        jnp.asarray(x, jnp.float32), jnp.float32(d), jnp.float32(q_m), jnp.float32(t)
    )
    sur = lambda **kw: np.sum(g * _surrogate(**{**dict(x=x, d=d, q_m=q_m, t=t), **kw},
                                             signed=signed, r=r, y0=y0, d0=d))
    fd_d = _fd(lambda v: sur(d=v), d, 1e-6 * d)
    fd_q = _fd(lambda v: sur(q_m=v), q_m, 1e-6)
    fd_t = _fd(lambda v: sur(t=v), t, 1e-6)
    np.testing.assert_allclose(gd, fd_d, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(gq, fd_q, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(gt, fd_t, rtol=2e-3, atol=2e-3)
    fd_x = np.array([
        _fd(lambda v, i=i: sur(x=np.where(np.arange(N) == i, v, x)), x[i], 1e-6)
        for i in range(N)
    ])
    np.testing.assert_allclose(gx, fd_x, rtol=2e-3, atol=2e-3)


def test_grads_reduce_to_per_channel_shapes():
    x = jax.random.normal(jax.random.key(0), (3, 3, 4, 5))
    p = quant.init_from_tensor(x, 4.0, channel_axes=(3,))
    chex.assert_shape([p.d, p.q_m, p.t], (5,))
    pb = quant.broadcast_params(p, 4, (3,))
    grads = jax.grad(lambda p: jnp.sum(quant.quantize(x, p.d, p.q_m, p.t) ** 2))(pb)
    chex.assert_shape([grads.d, grads.q_m, grads.t], (1, 1, 1, 5))
    assert np.all(np.isfinite(np.asarray(grads.d)))


@SETTINGS
@given(
    b=st.floats(2.0, 24.0),
    q_m=st.floats(1e-2, 1e2),
    t=st.floats(0.5, 2.0),
    signed=st.booleans(),
)
def test_bits_of_step_of_bits_is_identity(b, q_m, t, signed):
    d = quant.step_from_bits(b, q_m, t, signed)
    np.testing.assert_allclose(quant.bits_from_step(d, q_m, t, signed), b, rtol=1e-5)
    if float(b).is_integer():
        assert quant.storage_bits(quant.bits_from_step(d, q_m, t, signed)) == b


@pytest.mark.parametrize("b", [2, 3, 4, 5, 8])
def test_storage_bits_of_integer_widths(b):
    for q_m in (0.013, 0.7, 3.3, 91.0):
        d = quant.step_from_bits(float(b), jnp.float32(q_m))
        assert int(quant.storage_bits(quant.bits_from_step(d, jnp.float32(q_m)))) == b


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), signed=st.booleans(), per_channel=st.booleans())
def test_quantize_is_idempotent_for_t1(seed, signed, per_channel):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(6, 4)) * rng.uniform(0.1, 5), jnp.float32)
    p = quant.init_from_tensor(x, float(rng.integers(2, 9)), (1,) if per_channel else None, signed)
    p = quant.broadcast_params(p, 2, (1,))
    p = p.replace(q_m=p.q_m * rng.uniform(0.3, 1.0))  # some clipping
    q1 = quant.quantize_with(x, p, signed)
    q2 = quant.quantize_with(q1, p, signed)
    np.testing.assert_allclose(q2, q1, rtol=1e-6, atol=1e-7)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), signed=st.booleans(), b=st.floats(1.5, 12.0))
def test_codes_fit_in_storage_bits(seed, signed, b):
    if signed and b < 2:
        b = 2.0
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=200) * 3, jnp.float32)
    q_m = jnp.float32(rng.uniform(0.1, 4))
    t = jnp.float32(rng.uniform(0.5, 2))
    p = quant.QuantParams(d=quant.step_from_bits(b, q_m, t, signed), q_m=q_m, t=t)
    c = np.asarray(quant.codes(x, p, signed))
    nb = int(quant.storage_bits(quant.params_bits(p, signed)))
    if signed:
        assert np.abs(c).max() <= 2 ** (nb - 1) - 1
    else:
        assert c.min() >= 0 and c.max() <= 2**nb - 1
    np.testing.assert_allclose(p.d * c, quant.quantize_with(x, p, signed), rtol=1e-6, atol=1e-7)


def test_power_of_two_rounding_forward_and_straight_through():
    b = jnp.array([1.2, 2.9, 3.0, 4.4, 5.99, 6.0, 7.3, 15.0])
    np.testing.assert_array_equal(quant.round_bits_pow2(b), [2, 2, 4, 4, 4, 8, 8, 8])
    np.testing.assert_array_equal(jax.grad(lambda b: quant.round_bits_pow2(b).sum())(b), 1.0)
    q_m = jnp.float32(1.3)
    p = quant.QuantParams(d=quant.step_from_bits(4.7, q_m), q_m=q_m, t=jnp.float32(1.0))
    pe = quant.effective_params(p, power_of_two=True)
    np.testing.assert_allclose(quant.params_bits(pe), 4.0, rtol=1e-6)
    gd = jax.grad(lambda d: quant.effective_params(p.replace(d=d), power_of_two=True).d)(p.d)
    assert np.isfinite(gd) and gd > 0


def test_init_from_tensor_and_batches():
    w = jnp.array([[1.0, -3.0], [-2.0, 0.5]])
    p = quant.init_from_tensor(w)
    assert float(p.q_m) == 3.0 and float(p.t) == 1.0
    np.testing.assert_allclose(quant.params_bits(p), 16.0, rtol=1e-6)
    pc = quant.init_from_tensor(w, 8.0, channel_axes=(1,))
    np.testing.assert_allclose(pc.q_m, [2.0, 3.0])
    np.testing.assert_allclose(quant.params_bits(pc), [8.0, 8.0], rtol=1e-6)
    pa = quant.init_from_batches([jnp.array([-5.0, 1.0]), jnp.array([3.0, 0.0])], 8.0)
    np.testing.assert_allclose(pa.q_m, 2.0)
    np.testing.assert_allclose(quant.params_bits(pa, signed=False), 8.0, rtol=1e-6)


@pytest.mark.parametrize("bad", [0.5, 33.0, float("nan"), -4.0])
def test_bits_outside_range_are_rejected(bad):
    with pytest.raises(ValueError, match=r"\[1, 32\]"):
        quant.init_from_tensor(jnp.ones(3), bad)
    with pytest.raises(ValueError, match=r"\[1, 32\]"):
        quant.check_bits([4.0, bad])


def test_quantize_jits_once():
    f = jax.jit(chex.assert_max_traces(quant.quantize, n=1), static_argnums=4)
    x = jnp.linspace(-2, 2, 9)
    for d in (0.1, 0.2):
        f(x, jnp.float32(d), jnp.float32(1.5), jnp.float32(1.0), True)


def _edge_inputs(seed, per_channel):
    """``rng, x [6, 5], q_m, g, shape``: x in [-2, 2] past the clip, two exact zeros; q_m per
    tensor or per column; g a cotangent like x."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2.0, 2.0, (6, 5)).astype(np.float32)
    x[0, :2] = 0.0
    shape = (1, 5) if per_channel else ()
    q_m = jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)
    g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    return rng, jnp.asarray(x), q_m, g, shape


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), signed=st.booleans(), per_channel=st.booleans())
def test_t1_quantizer_equals_exponent_quantizer_at_t1(seed, signed, per_channel):
    """The exponent-free quantizer (``t=None``): forward and gradients of the general one at
    ``t = 1``, clipped values, zeros and (unsigned) negatives included."""
    rng, x, q_m, g, _ = _edge_inputs(seed, per_channel)
    d = q_m / (2 ** (rng.uniform(3, 6) - 1) - 1)

    def loss(t):
        return lambda x_, d_, q_: jnp.sum(g * quant.quantize(x_, d_, q_, t, signed))

    args = (x, d, q_m)
    np.testing.assert_allclose(quant.quantize(*args, None, signed),
                               quant.quantize(*args, 1.0, signed), rtol=1e-6, atol=1e-6)
    got = jax.grad(loss(None), argnums=(0, 1, 2))(*args)
    want = jax.grad(loss(jnp.float32(1.0)), argnums=(0, 1, 2))(*args)
    for a, b in zip(got, want, strict=True):
        chex.assert_shape(a, b.shape)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_stacked_gradient_sums_equal_separate_ones():
    """The CPU form of the per-tensor parameter gradients equals one reduction per term."""
    rng = np.random.default_rng(0)
    g, a, b = (jnp.asarray(rng.normal(size=(7, 3, 4)), jnp.float32) for _ in range(3))
    np.testing.assert_allclose(quant._grad_sums_stacked(g, a, b), quant._grad_sums(g, a, b),
                               rtol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), signed=st.booleans(), per_channel=st.booleans())
def test_remat_quantizer_equals_stored_one(seed, signed, per_channel):
    """``remat=True`` (m^t and log m recomputed in the backward): the same forward and gradients,
    clipped values, zeros and (unsigned) negatives included, jitted as in a train step."""
    rng, x, q_m, g, shape = _edge_inputs(seed, per_channel)
    t = jnp.asarray(rng.uniform(0.6, 1.6, shape), jnp.float32)
    d = q_m**t / (2 ** (rng.uniform(3, 6) - 1) - 1)

    def loss(remat):
        return jax.jit(jax.value_and_grad(
            lambda *a: jnp.sum(g * quant.quantize(*a, signed, remat)), argnums=(0, 1, 2, 3)))

    args = (x, d, q_m, t)
    (v0, g0), (v1, g1) = loss(False)(*args), loss(True)(*args)
    assert v0 == v1
    for a, b in zip(g1, g0, strict=True):
        chex.assert_shape(a, b.shape)
        np.testing.assert_array_equal(a, b)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), signed=st.booleans(), per_channel=st.booleans(),
       bits=st.sampled_from([2.0, 3.0, 4.0]))
def test_code_thresholds_quantize_as_the_log_exp_quantizer(seed, signed, per_channel, bits):
    rng = np.random.default_rng(seed)
    c = 3 if per_channel else 1
    q_m = rng.uniform(0.5, 2.0, c)
    t = rng.uniform(0.6, 1.6, c)
    d = np.asarray(quant.step_from_bits(bits, q_m, t, signed))
    p = quant.QuantParams(d=jnp.asarray(d, jnp.float32), q_m=jnp.asarray(q_m, jnp.float32),
                          t=jnp.asarray(t, jnp.float32))
    x = rng.uniform(-1.5, 1.5, (256, c)) * q_m * 1.2
    ct = quant.code_thresholds(p, signed)
    assert ct.thr.shape == (c, quant.top_code(p, signed))
    got = np.asarray(quant.quantize_by_thresholds(jnp.asarray(x, jnp.float32), ct, signed))
    want = np.asarray(quant.quantize(jnp.asarray(x, jnp.float32), p.d, p.q_m, p.t, signed))
    # float32 m^t / d within a few ulp of a half-integer may round either way: those aside
    m = np.minimum(np.abs(x) if signed else np.maximum(x, 0), q_m)
    v = m**t / d
    edge = np.abs(v - np.floor(v) - 0.5) < 1e-5 * np.maximum(v, 1.0)
    assert edge.mean() < 0.01
    np.testing.assert_array_equal(got[~edge], want[~edge])
    assert np.isnan(quant.quantize_by_thresholds(jnp.asarray([jnp.nan]), ct, signed)).all()
    half = quant.quantize_by_thresholds(jnp.asarray(x, jnp.bfloat16), ct, signed)
    assert half.dtype == jnp.bfloat16 and half.shape == x.shape


def test_code_thresholds_serve_only_a_few_codes():
    one = jnp.ones(())
    p = quant.QuantParams(d=quant.step_from_bits(8.0, one, one), q_m=one, t=one * 1.2)
    assert quant.top_code(p) == 127 and quant.code_thresholds(p) is None
    p4 = p.replace(d=quant.step_from_bits(4.0, one, one * 1.2))
    padded = quant.code_thresholds(p4, levels=9)
    assert padded.thr.shape == (9,) and np.isinf(np.asarray(padded.thr[7:])).all()
    assert quant.code_thresholds(p4, levels=5) is None  # shorter than its 7 codes
