"""MAC counting: per-equation rules against hand-computed formulas, and the jaxpr walk."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax import lax

from jaxjpq.trace.macs import MacCount, count_macs, count_macs_split, eqn_macs


def _sds(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _only_eqn(fn, *args):
    """The single contraction equation of ``fn`` traced on ``args``."""
    eqns = [
        e
        for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns
        if e.primitive.name in ("conv_general_dilated", "dot_general")
    ]
    assert len(eqns) == 1, eqns
    return eqns[0]


def _out_len(n: int, k: int, stride: int, dil: int, lo: int, hi: int) -> int:
    """Output length of a 1-d convolution (no input dilation), by the textbook formula."""
    return (n + lo + hi - dil * (k - 1) - 1) // stride + 1


# ---- conv_general_dilated -------------------------------------------------------------------


def test_conv_hand_examples() -> None:
    dn = ("NHWC", "HWIO", "NHWC")

    def conv(x, w, stride=(1, 1), pad="SAME", dil=(1, 1), groups=1):
        return lax.conv_general_dilated(
            x, w, stride, pad, rhs_dilation=dil, dimension_numbers=dn, feature_group_count=groups
        )

    # 3x3, 4 -> 6 channels, stride 2, SAME on 8x8: out 4x4; 9 * 4 * 6 * 16 MACs per sample.
    e = _only_eqn(lambda x, w: conv(x, w, (2, 2)), _sds(1, 8, 8, 4), _sds(3, 3, 4, 6))
    assert eqn_macs(e) == 9 * 4 * 6 * 16
    # Grouped: 8 -> 12 channels in 4 groups: each output sees 8 / 4 = 2 input channels.
    e = _only_eqn(lambda x, w: conv(x, w, groups=4), _sds(2, 5, 5, 8), _sds(3, 3, 2, 12))
    assert eqn_macs(e) == 2 * 25 * 12 * 9 * 2
    # Depthwise: groups = channels = 16, multiplier 1.
    e = _only_eqn(lambda x, w: conv(x, w, (2, 2), groups=16), _sds(1, 6, 6, 16), _sds(3, 3, 1, 16))
    assert eqn_macs(e) == 3 * 3 * 16 * 9
    # Dilated 3x3 (dilation 2) VALID on 9x9: effective 5x5 window, out 5x5; taps still 9.
    e = _only_eqn(
        lambda x, w: conv(x, w, pad="VALID", dil=(2, 2)), _sds(1, 9, 9, 3), _sds(3, 3, 3, 5)
    )
    assert eqn_macs(e) == 25 * 9 * 3 * 5
    # 1x1 conv == dense per pixel.
    e = _only_eqn(lambda x, w: conv(x, w), _sds(3, 4, 4, 7), _sds(1, 1, 7, 11))
    assert eqn_macs(e) == 3 * 16 * 7 * 11


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    size=st.integers(5, 12),
    groups=st.integers(1, 3),
    c_in_per=st.integers(1, 3),
    c_out_per=st.integers(1, 3),
    k=st.integers(1, 4),
    stride=st.integers(1, 3),
    dil=st.integers(1, 2),
    pad=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    layout=st.sampled_from(["NHWC", "NCHW"]),
)
def test_conv2d_macs_formula(batch, size, groups, c_in_per, c_out_per, k, stride, dil, pad, layout):
    c_in, c_out = groups * c_in_per, groups * c_out_per
    h_out = _out_len(size, k, stride, dil, *pad)
    w_out = _out_len(size + 1, k, stride, dil, *pad)
    assume(h_out >= 1 and w_out >= 1)
    x_shape = (batch, size, size + 1, c_in) if layout == "NHWC" else (batch, c_in, size, size + 1)
    kernel = (k, k, c_in_per, c_out) if layout == "NHWC" else (c_out, c_in_per, k, k)
    dn = (layout, "HWIO" if layout == "NHWC" else "OIHW", layout)

    def conv(x, w):
        return lax.conv_general_dilated(
            x,
            w,
            (stride, stride),
            (pad, pad),
            rhs_dilation=(dil, dil),
            dimension_numbers=dn,
            feature_group_count=groups,
        )

    e = _only_eqn(conv, _sds(*x_shape), _sds(*kernel))
    assert eqn_macs(e) == k * k * (c_in // groups) * c_out * h_out * w_out * batch


@settings(max_examples=15, deadline=None)
@given(
    rank=st.sampled_from([1, 3]),
    size=st.integers(3, 6),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    c_in=st.integers(1, 3),
    c_out=st.integers(1, 3),
)
def test_conv_nd_macs_formula(rank, size, k, stride, c_in, c_out):
    spatial = "DHW"[-rank:]
    dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (stride,) * rank, "VALID", dimension_numbers=dn)

    e = _only_eqn(conv, _sds(2, *(size,) * rank, c_in), _sds(*(k,) * rank, c_in, c_out))
    out = _out_len(size, k, stride, 1, 0, 0)
    assert eqn_macs(e) == 2 * out**rank * k**rank * c_in * c_out


def test_transposed_conv_counts_dense_taps() -> None:
    # Input dilation 2 on length 4 -> 7 positions, VALID 3-tap kernel -> 5 outputs.
    def tconv(x, w):
        return lax.conv_general_dilated(
            x, w, (1,), ((0, 0),), lhs_dilation=(2,), dimension_numbers=("NWC", "WIO", "NWC")
        )

    e = _only_eqn(tconv, _sds(1, 4, 2), _sds(3, 2, 5))
    assert eqn_macs(e) == 5 * 3 * 2 * 5


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_gradients_cost_the_forward_macs(groups: int) -> None:
    """Input and kernel gradients of a conv are convs (the grouped kernel gradient uses
    ``batch_group_count``); each costs exactly the forward's MACs."""
    dn = ("NHWC", "HWIO", "NHWC")
    x, w = jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, 4 // groups, 6))

    def f(w, x):
        return lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=groups
        )

    forward = count_macs(f, w, x)
    grads = jax.make_jaxpr(jax.grad(lambda w, x: f(w, x).sum(), argnums=(0, 1)))(w, x)
    convs = [e for e in grads.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 3
    assert all(eqn_macs(e) == forward for e in convs)
    if groups > 1:
        assert any(e.params["batch_group_count"] == groups for e in convs)


# ---- dot_general ----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(dims=st.lists(st.integers(1, 5), min_size=5, max_size=5))
def test_batched_einsum_macs(dims) -> None:
    b, h, i, j, k = dims
    e = _only_eqn(
        lambda x, y: jnp.einsum("bhij,bhjk->bhik", x, y), _sds(b, h, i, j), _sds(b, h, j, k)
    )
    assert eqn_macs(e) == b * h * i * j * k


@settings(max_examples=20, deadline=None)
@given(dims=st.lists(st.integers(1, 4), min_size=5, max_size=5))
def test_multi_contraction_dot_macs(dims) -> None:
    # An attention output projection: contract (heads, head_dim) at once.
    b, n, h, d, o = dims
    e = _only_eqn(lambda x, w: jnp.einsum("blhd,hdo->blo", x, w), _sds(b, n, h, d), _sds(h, d, o))
    assert eqn_macs(e) == b * n * h * d * o


def test_other_primitives_count_zero() -> None:
    jaxpr = jax.make_jaxpr(lambda x: jnp.tanh(x) * 2 + x.sum())(jnp.ones((3, 4)))
    assert all(eqn_macs(e) == 0 for e in jaxpr.jaxpr.eqns)


# ---- count_macs: parameter vs activation, sub-jaxprs ----------------------------------------


def _attention(params, x):
    q, k, v = (x @ params[n] for n in ("q", "k", "v"))
    a = jax.nn.softmax(q @ k.T)
    return (a @ v) @ params["o"]


def test_param_vs_activation_split() -> None:
    L, D = 5, 8
    params = {n: _sds(D, D) for n in "qkvo"}
    split = count_macs_split(_attention, params, _sds(L, D))
    assert split == MacCount(param=4 * L * D * D, activation=2 * L * L * D)
    assert count_macs(_attention, params, _sds(L, D)) == split.total
    assert count_macs(_attention, params, _sds(L, D), only_params=True) == split.param
    # With nothing marked as a parameter every product is activation x activation.
    assert count_macs_split(_attention, params, _sds(L, D), param_argnums=()).param == 0
    # A cast or transposed kernel still counts as a parameter operand.
    cast = lambda p, x: x @ p.astype(jnp.bfloat16).T.astype(jnp.float32)  # noqa: E731
    assert count_macs_split(cast, _sds(3, 4), _sds(2, 4)) == MacCount(2 * 4 * 3, 0)


def test_kwargs_are_static_and_argnums_validated() -> None:
    def f(w, x, double: bool = False):
        y = x @ w
        return y @ w if double else y

    w, x = _sds(4, 4), _sds(2, 4)
    assert count_macs(f, w, x, double=True) == 2 * count_macs(f, w, x)
    with pytest.raises(ValueError, match="param_argnums"):
        count_macs(f, w, x, param_argnums=(2,))
    with pytest.raises(ValueError, match="while_policy"):
        count_macs(f, w, x, while_policy="twice")


def test_recurses_into_call_primitives() -> None:
    @jax.custom_jvp
    def cj(w, x):
        return x @ w

    cj.defjvp(lambda p, t: (cj(*p), t[1] @ p[0]))

    @jax.custom_vjp
    def cv(w, x):
        return x @ w

    cv.defvjp(lambda w, x: (x @ w, (w, x)), lambda r, g: (r[1].T @ g, g @ r[0].T))

    def f(w, x):
        y = jax.jit(lambda w, x: x @ w)(w, x)
        y = jax.checkpoint(lambda w, y: y @ w)(w, y)
        return cv(w, cj(w, y))

    base = 3 * 4 * 4
    assert count_macs_split(f, _sds(4, 4), _sds(3, 4)) == MacCount(4 * base, 0)


def test_cond_counts_most_expensive_branch() -> None:
    def f(w, x):
        return lax.cond(x.sum() > 0, lambda: (x @ w) @ w, lambda: x @ w)

    assert count_macs(f, _sds(4, 4), _sds(2, 4)) == 2 * 2 * 4 * 4


@settings(max_examples=5, deadline=None)
@given(length=st.integers(1, 6))
def test_scan_and_fori_multiply_by_length(length: int) -> None:
    def f(w, x):
        return lax.scan(lambda c, _: (c @ w, None), x, None, length=length)[0]

    def g(w, x):
        return lax.fori_loop(0, length, lambda i, c: c @ w, x)

    one = 2 * 4 * 4
    assert count_macs_split(f, _sds(4, 4), _sds(2, 4)) == MacCount(length * one, 0)
    assert count_macs(g, _sds(4, 4), _sds(2, 4)) == length * one


def test_scan_carry_becomes_data_dependent() -> None:
    # The carry starts as the (parameter) matrix itself but mixes in data on the first step, so
    # carry @ carry is an activation product on every iteration.
    def f(w, x):
        def body(c, xi):
            return c + xi[:, None], (c @ c).sum()

        return lax.scan(body, w, x)[1]

    assert count_macs_split(f, _sds(3, 3), _sds(2, 3)) == MacCount(0, 2 * 27)


def test_while_policy() -> None:
    def f(w, x):
        return lax.while_loop(lambda c: c.sum() < 10.0, lambda c: c @ w, x)

    with pytest.raises(ValueError, match="while_loop"):
        count_macs(f, _sds(4, 4), _sds(2, 4))
    assert count_macs(f, _sds(4, 4), _sds(2, 4), while_policy="once") == 2 * 4 * 4
    # A while loop without contractions is fine under the default policy.
    h = lambda w, x: lax.while_loop(lambda c: c.sum() < 10.0, lambda c: c + 1, x) @ w  # noqa: E731
    assert count_macs(h, _sds(4, 4), _sds(2, 4)) == 2 * 4 * 4


def test_pytree_args_and_flax_dense() -> None:
    import flax.linen as nn

    model = nn.Sequential([nn.Dense(7), nn.relu, nn.Dense(3)])
    x = _sds(5, 4)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert count_macs_split(model.apply, variables, x) == MacCount(5 * (4 * 7 + 7 * 3), 0)
