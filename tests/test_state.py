"""Tests for jaxjpq.state (spec validation, init, graph fingerprint, orbax round trip)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import mnist_cnn_graph, small_cnn

from jaxjpq.quant import params_bits
from jaxjpq.state import (
    CompressionSpec,
    CompressionState,
    check_state,
    graph_fingerprint,
    init_state,
)

P = "params"


def test_init_shapes_and_values():
    _, v, g, _ = small_cnn()
    st = init_state(g, CompressionSpec(per_channel=True), v)
    assert set(st.masks) == {"Conv_0/kernel:out", "Conv_1/kernel:out", "Dense_0/kernel:out"}
    for grp in g.prunable_groups:
        chex.assert_trees_all_equal(st.masks[grp.id], jnp.ones(grp.size))
    assert st.frozen == ("Conv_0", "Dense_1")
    for s in g.sites:
        w = v["params"][s.name]["kernel"]
        p = st.weight[s.name]
        chex.assert_shape(p.d, (s.weight_shape[-1],))
        np.testing.assert_allclose(p.q_m, jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1))))
        want = 8.0 if s.name in st.frozen else 16.0
        np.testing.assert_allclose(params_bits(p), want, rtol=1e-5)
        np.testing.assert_allclose(params_bits(st.act[s.name], s.signed_input), want, rtol=1e-5)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(st))


def test_spec_options_change_state():
    _, v, g, _ = small_cnn()
    st = init_state(g, CompressionSpec(skip=(), quantize_activations=False), v)
    assert st.act == {} and st.frozen == () and set(st.weight) == {s.name for s in g.sites}
    assert st.weight["Conv_1"].d.shape == ()
    st = init_state(g, CompressionSpec(skip_bits=None), v)
    assert set(st.weight) == {"Conv_1", "Dense_0"} and st.frozen == ()
    st = init_state(g, CompressionSpec(skip=("Dense_0",)))  # no variables: q_m = 1
    assert st.frozen == ("Dense_0",) and float(st.weight["Conv_1"].q_m) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=(8, 4)), "b_l > b_u"),
        (dict(bits=(0, 4)), r"\[1, 32\]"),
        (dict(bits=(2, 40)), r"\[1, 32\]"),
        (dict(bits=(2,)), "pair"),
        (dict(bits="24"), "pair"),
        (dict(budget={"bops": 0.0}), "fraction"),
        (dict(init_bits=64), r"\[1, 32\]"),
        (dict(budget={"flops": 0.5}), "unknown budget"),
        (dict(budget={"bops": 1.5}), "fraction"),
        (dict(skip="first"), "first_last"),
        (dict(act_clip=0.0), "act_clip"),
    ],
)
def test_bad_spec_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionSpec(**kwargs)


def test_spec_naming_missing_layer_is_rejected():
    g = mnist_cnn_graph(4, 8, 16)
    with pytest.raises(ValueError, match="Conv_9"):
        init_state(g, CompressionSpec(skip=("Conv_9",)))


def test_budget_is_normalised():
    spec = CompressionSpec(budget={"bops": 0.1, "sparsity": 0.5})
    assert spec.budget_for("bops") == 0.1 and spec.budget_for("size") is None
    hash(spec)


def test_the_state_carries_its_graph_and_a_state_without_one_is_refused():
    g1, g2 = mnist_cnn_graph(4, 8, 16), mnist_cnn_graph(4, 8, 32)
    assert graph_fingerprint(g1) != graph_fingerprint(g2)
    st = init_state(g1, CompressionSpec())
    assert check_state(st) is g1 and st.graph is g1
    with pytest.raises(ValueError, match="carries no graph"):
        check_state(st.replace(graph=None))
    with pytest.raises(ValueError, match="expected a CompressionState"):
        check_state({"masks": {}})


def test_wrong_variables_are_rejected():
    _, v, _, _ = small_cnn()
    with pytest.raises(ValueError, match="re-trace"):
        init_state(mnist_cnn_graph(4, 8, 32), CompressionSpec(), v)


def test_state_is_a_jittable_pytree():
    _, v, g, _ = small_cnn()
    st = init_state(g, CompressionSpec(), v)
    out = jax.jit(lambda s: jax.tree.map(lambda a: a * 2, s))(st)
    assert isinstance(out, CompressionState) and out.graph is st.graph


def test_orbax_round_trip(tmp_path):
    _, v, g, _ = small_cnn()
    st = init_state(g, CompressionSpec(per_channel=True), v)
    st = st.replace(masks={k: m.at[0].set(0.0) for k, m in st.masks.items()})
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", st)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "state", st)
    assert isinstance(restored, CompressionState)
    assert restored.graph is st.graph and restored.frozen == st.frozen
    chex.assert_trees_all_equal(restored, st)


def test_hand_built_graph_matches_traced_graph():
    from jaxjpq.trace import trace

    model, v, g, x = small_cnn()
    t = trace(model.apply, v, x)
    assert graph_fingerprint(t) == graph_fingerprint(g)

    def slices(sls):
        return sorted((s.key, s.axis, s.index.tolist()) for s in sls)

    for a, b in zip(g.groups, t.groups, strict=True):
        assert (a.id, a.size, a.prunable) == (b.id, b.size, b.prunable)
        assert slices(a.params) == slices(b.params)
        assert slices(a.dependents) == slices(b.dependents)
    fields = ("name", "weight", "kind", "weight_shape", "out_axes", "in_axes", "out_group",
              "in_group", "signed_input")
    for a, b in zip(g.sites, t.sites, strict=True):
        assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
        assert a.macs_per_example == b.macs_per_example


def test_signed_quantizers_need_two_bits():
    with pytest.raises(ValueError, match="b_l must be >= 2"):
        CompressionSpec(bits=(1, 4))
    CompressionSpec(bits=(1, 4), quantize_weights=False, quantize_activations=False)
