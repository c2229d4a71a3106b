"""Tests for jaxjpq.compress: masked fake-quantized forward, site discovery, grads, calibration."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_cnn

from jaxjpq.compress import (
    apply_masks,
    calibrate,
    compress_apply,
    transform_variables,
)
from jaxjpq.graph import Graph, Group, Site, Slice
from jaxjpq.quant import QuantParams, quantize_with, step_from_bits
from jaxjpq.state import CompressionSpec, init_state


def _manual_forward(variables, x, act_q):
    """MnistCNN written out by hand; ``act_q(site, x)`` is applied to each layer's input."""
    p = variables["params"]
    dn = ("NHWC", "HWIO", "NHWC")
    for name in ("Conv_0", "Conv_1"):
        x = act_q(name, x)
        x = jax.lax.conv_general_dilated(x, p[name]["kernel"], (1, 1), "SAME",
                                         dimension_numbers=dn) + p[name]["bias"]
        x = nn.max_pool(jax.nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(act_q("Dense_0", x) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return act_q("Dense_1", x) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def _random_state(g, v, seed, **spec_kw):
    """A state at random low bits with some units pruned."""
    rng = np.random.default_rng(seed)
    st = init_state(g, CompressionSpec(**spec_kw), v)
    weight = {k: p.replace(d=step_from_bits(float(rng.integers(2, 9)), p.q_m, p.t))
              for k, p in st.weight.items()}
    sm = g.site_map
    act = {k: QuantParams(d=step_from_bits(float(rng.integers(2, 9)), jnp.float32(2.0), 1.0,
                                           sm[k].signed_input),
                          q_m=jnp.float32(2.0), t=jnp.float32(1.0)) for k in st.act}
    masks = {k: jnp.asarray(rng.random(m.shape) < 0.6, jnp.float32).at[:2].set(jnp.array([0, 1.0]))
             for k, m in st.masks.items()}  # unit 0 pruned, unit 1 kept
    return st.replace(weight=weight, act=act, masks=masks)


@pytest.mark.parametrize("per_channel", [False, True])
def test_forward_matches_hand_written_quantized_model(per_channel):
    model, v, g, x = small_cnn()
    st = _random_state(g, v, seed=int(per_channel), per_channel=per_channel)
    fn = jax.jit(compress_apply(model.apply))
    y = fn(v, st, x)
    vq = transform_variables(v, st)
    sm = g.site_map
    y_ref = _manual_forward(vq, x, lambda s, a: quantize_with(a, st.act[s], sm[s].signed_input))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    # the weights really are mask ⊙ Q(W): a pruned output channel has an all-zero kernel column
    mask = np.asarray(st.masks["Conv_1/kernel:out"])
    kern = np.asarray(vq["params"]["Conv_1"]["kernel"])
    assert np.all(kern[..., mask == 0] == 0)
    assert np.all(vq["params"]["Conv_1"]["bias"][mask == 0] == 0)
    # and each kept column takes at most 2^(b-1)-1 distinct magnitudes per step
    d = np.asarray(st.weight["Conv_1"].d)
    codes = kern / (d if d.ndim == 0 else d[None, None, None, :])
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)


def test_high_bits_and_full_masks_match_plain_model():
    model, v, g, x = small_cnn()
    st = init_state(g, CompressionSpec(skip=(), init_bits=24), v)
    fn = compress_apply(model.apply)
    st = calibrate(fn, v, st, [x])
    np.testing.assert_allclose(jax.jit(fn)(v, st, x), model.apply(v, x), rtol=1e-4, atol=1e-5)


def test_pruned_units_do_not_affect_output():
    model, v, g, x = small_cnn()
    st = _random_state(g, v, seed=3)
    fn = jax.jit(compress_apply(model.apply))
    mask = np.asarray(st.masks["Conv_0/kernel:out"]).astype(bool)
    assert (~mask).any()
    v2 = jax.tree.map(lambda a: a, v)
    k = v2["params"]["Conv_0"]["kernel"]
    v2["params"]["Conv_0"]["kernel"] = k.at[..., ~mask].set(123.0)
    np.testing.assert_allclose(fn(v2, st, x), fn(v, st, x), rtol=0, atol=0)


def test_gradients_reach_params_and_unfrozen_quantizers():
    model, v, g, x = small_cnn()
    st = init_state(g, CompressionSpec(init_bits=4), v)
    fn = compress_apply(model.apply)
    st = calibrate(fn, v, st, [x])
    loss = lambda v, s: jnp.sum(fn(v, s, x) ** 2)
    gv, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(v, st)
    for name in ("Conv_0", "Conv_1", "Dense_0", "Dense_1"):
        assert jnp.abs(gv["params"][name]["kernel"]).sum() > 0
    for name in ("Conv_1", "Dense_0"):  # learned
        assert jnp.abs(gs.weight[name].d) > 0 and jnp.abs(gs.act[name].d) > 0
    for name in st.frozen:  # fixed at skip_bits
        chex.assert_trees_all_equal(gs.weight[name], jax.tree.map(jnp.zeros_like, st.weight[name]))
    for m in gs.masks.values():
        assert jnp.abs(m).sum() > 0


def test_jit_traces_once_across_states():
    model, v, g, x = small_cnn()
    fn = jax.jit(chex.assert_max_traces(compress_apply(model.apply), n=1))
    for seed in range(3):
        fn(v, _random_state(g, v, seed), x).block_until_ready()


def test_a_state_for_another_graph_refuses_these_variables():
    model, v, g, x = small_cnn()
    _, v2, g2, _ = small_cnn(hidden=8)
    with pytest.raises(ValueError, match="traced with"):
        compress_apply(model.apply)(v, init_state(g2, CompressionSpec(), v2), x)


def _one_site_graph(shape=(3, 3)):
    site = Site("w", ("params", "w"), "dot", shape, (1,), (0,), 9, 9.0)
    grp = Group("w:out", shape[1], (Slice("params", ("w",), 1, np.arange(shape[1])[:, None]),))
    return Graph((grp,), (site,))


def test_site_found_through_jit_custom_vjp_and_transpose():
    g = _one_site_graph()

    @jax.custom_vjp
    def mm(a, w):
        return a @ w

    mm.defvjp(lambda a, w: (a @ w, (a, w)), lambda r, c: (c @ r[1].T, r[0].T @ c))

    def apply_fn(v, x):
        w = jax.jit(lambda w: w.T.T.astype(jnp.float32))(v["params"]["w"])
        return mm(jax.nn.relu(x), w)

    v = {"params": {"w": jnp.eye(3)}}
    st = init_state(g, CompressionSpec(skip=(), init_bits=3), v)
    a = QuantParams(d=jnp.float32(1.0), q_m=jnp.float32(10.0), t=jnp.float32(1.0))
    st = st.replace(act={"w": a})
    x = jnp.array([[0.2, 1.4, -2.6]])
    y = jax.jit(compress_apply(apply_fn))(v, st, x)
    np.testing.assert_allclose(y, [[0.0, 1.0, 0.0]])  # relu then round to integer steps


def test_site_inside_scan_is_quantized_at_every_step():
    """A weight entering a scan as a constant (a recurrent cell) keeps its one quantizer; its
    input is quantized at every iteration, and while/cond bodies likewise."""
    g = _one_site_graph()
    v = {"params": {"w": jnp.eye(3)}}
    st = init_state(g, CompressionSpec(skip=(), init_bits=3), v)
    a = QuantParams(d=jnp.float32(1.0), q_m=jnp.float32(10.0), t=jnp.float32(1.0))
    st = st.replace(act={"w": a})
    x = jnp.array([[0.3, 1.6, -2.6]])

    def scanned(v, x):
        return jax.lax.scan(lambda c, _: (0.5 * (c @ v["params"]["w"]), None), x, None,
                            length=2)[0]

    def looped(v, x):
        return jax.lax.fori_loop(0, 2, lambda i, c: 0.5 * (c @ v["params"]["w"]), x)

    def branched(v, x):
        return jax.lax.cond(x.sum() < 0, lambda z: z @ v["params"]["w"], lambda z: z, x)

    # round(0.3)=0, round(1.6)=2, round(-2.6)=-3; halve; round again
    want = np.asarray([[0.0, 0.5, -1.0]])
    for f in (scanned, looped):
        np.testing.assert_allclose(jax.jit(compress_apply(f))(v, st, x), want)
    np.testing.assert_allclose(compress_apply(branched)(v, st, x), [[0.0, 2.0, -3.0]])


def test_site_without_matmul_raises():
    g = _one_site_graph()
    v = {"params": {"w": jnp.eye(3)}}
    st = init_state(g, CompressionSpec(skip=()), v)
    with pytest.raises(ValueError, match="could not find"):
        compress_apply(lambda v, x: x * v["params"]["w"].sum())(v, st, jnp.ones((1, 3)))


def test_calibrate_sets_activation_ranges():
    model, v, g, x = small_cnn()
    st = init_state(g, CompressionSpec(skip=()), v)
    fn = compress_apply(model.apply)
    st2 = calibrate(fn, v, st, [x, x * 0.5])
    np.testing.assert_allclose(st2.act["Conv_0"].q_m, 0.75 * jnp.max(jnp.abs(x)), rtol=1e-6)
    seen = {}
    _manual_forward(transform_variables(v, st), x, lambda s, a: seen.setdefault(s, a))
    st1 = calibrate(fn, v, st, [x])
    np.testing.assert_allclose(st1.act["Dense_1"].q_m, jnp.max(seen["Dense_1"]), rtol=1e-3)
    np.testing.assert_allclose(st2.act["Conv_1"].d / st.act["Conv_1"].d,
                               st2.act["Conv_1"].q_m / st.act["Conv_1"].q_m, rtol=1e-5)


def test_apply_masks_rejects_bad_masks():
    _, v, g, _ = small_cnn()
    with pytest.raises(ValueError, match="not in the graph"):
        apply_masks(g, v, {"nope": jnp.ones(3)})
    with pytest.raises(ValueError, match="shape"):
        apply_masks(g, v, {"Conv_0/kernel:out": jnp.ones(3)})



def test_traced_graph_gives_the_same_forward():
    from jaxjpq.trace import trace

    model, v, g, x = small_cnn()
    t = trace(model.apply, v, x)
    st = _random_state(g, v, seed=7)
    chex.assert_trees_all_equal(jax.jit(compress_apply(model.apply))(v, st.replace(graph=t), x),
                                jax.jit(compress_apply(model.apply))(v, st, x))


def test_calibrate_refuses_non_finite_statistics():
    model, v, g, x = small_cnn()
    fn = compress_apply(model.apply)
    st = init_state(g, CompressionSpec(), v)
    bad = x.at[1, 2, 3, 0].set(jnp.inf)
    with pytest.raises(ValueError, match="calibration batch 1 gives non-finite"):
        calibrate(fn, v, st, [x, bad])


def test_variables_of_another_shape_are_a_clear_error():
    model, v, g, x = small_cnn()
    fn = compress_apply(model.apply)
    st = init_state(g, CompressionSpec(), v)
    p = dict(v["params"])
    p["Dense_0"] = {**p["Dense_0"], "kernel": jnp.zeros((3, 3))}
    with pytest.raises(ValueError, match=r"Dense_0/kernel has shape \(3, 3\), but the graph"):
        fn({**v, "params": p}, st, x)


def test_checked_forward_names_the_site_that_saw_a_nan():
    from jax.experimental import checkify

    from jaxjpq.compress import checked_apply

    model, v, g, x = small_cnn()
    st = init_state(g, CompressionSpec(), v)
    fn = checked_apply(model.apply)
    np.testing.assert_allclose(fn(v, st, x), compress_apply(model.apply)(v, st, x))
    with pytest.raises(checkify.JaxRuntimeError, match="non-finite input .* at site Conv_0"):
        fn(v, st, x.at[0, 0, 0, 0].set(jnp.nan))


def test_integer_inputs_to_a_model_traced_on_floats_are_refused():
    import jaxjpq
    from jaxjpq.compress import compress_apply

    model, v, _, x = small_cnn()
    g = jaxjpq.trace.trace(model.apply, v, x)
    st = init_state(g, CompressionSpec(), v)
    fn = compress_apply(model.apply)
    pixels = (np.asarray(x) * 255).astype(np.uint8)
    with pytest.raises(ValueError, match=r"input 0 is uint8 but the graph was traced on float32 "
                                         r"inputs.*x / 255\.0"):
        jax.jit(fn)(v, st, pixels)
    fn(v, st, jnp.asarray(x, jnp.bfloat16))  # another float dtype is fine

