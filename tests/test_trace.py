"""Tracer tests: group structure, zero-ness of pruned units, errors, Graph helpers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from archs import ARCHS, build, build_nnx

import jaxjpq
from jaxjpq import export
from jaxjpq.slim import apply_masks
from jaxjpq.state import CompressionSpec, init_state
from jaxjpq.trace import trace


@pytest.fixture(scope="module")
def graphs():
    out = {}
    for name in ARCHS:
        m, v, x = build(name)
        out[name] = (m, v, x, trace(m.apply, v, x))
    return out


def _leaf(v, key):
    for k in key:
        v = v[k]
    return v


def test_resbn_residual_ties_producers(graphs):
    g = graphs["resbn"][3]
    gm = g.group_map
    stem = gm["Conv_0/kernel:out"]
    keys = {sl.path for sl in stem.params}
    # the identity block's second conv and its BN are tied to the stem by the residual add
    assert ("b0_c2", "kernel") in keys and ("b0_bn2", "scale") in keys
    deps = {(sl.collection, sl.path) for sl in stem.dependents}
    assert ("batch_stats", ("BatchNorm_0", "mean")) in deps
    assert ("params", ("b1_proj", "kernel")) in deps  # projection consumes the stem's channels
    assert not gm["Dense_0/kernel:out"].prunable
    assert "output" in gm["Dense_0/kernel:out"].reason
    assert sum(gr.prunable for gr in g.groups) == 4


def test_flatten_dense_rows(graphs):
    g = graphs["flatten"][3]
    conv = g.group_map["Conv_0/kernel:out"]
    (dep,) = [sl for sl in conv.dependents if sl.path == ("Dense_0", "kernel")]
    assert dep.index.shape == (6, 16)  # 4x4 spatial positions per channel after the pool
    np.testing.assert_array_equal(dep.index[1], np.arange(16) * 6 + 1)


def test_depthwise_ties_input_and_output(graphs):
    g = graphs["depthwise"][3]
    expand = g.group_map["Conv_1/kernel:out"]
    paths = {sl.path for sl in expand.params}
    assert ("Conv_2", "kernel") in paths  # the depthwise kernel's out axis is a params slice
    dw = g.site_map["Conv_2"]
    assert dw.in_group == dw.out_group == expand.id


def test_attention_heads_are_units(graphs):
    g = graphs["attn"][3]
    heads = g.group_map["MultiHeadDotProductAttention_0/query/kernel:out1"]
    assert heads.size == 2 and heads.prunable
    paths = {sl.path[-2] for sl in heads.params}
    assert {"query", "key", "value"} <= paths
    assert any(sl.path[-2] == "out" for sl in heads.dependents)
    fused = graphs["fused_heads"][3].groups[0]
    assert fused.size == 2 and fused.params[0].index.shape == (2, 3)  # head owns head_dim rows


def test_grouped_conv_ties_group_members(graphs):
    g = graphs["grouped"][3]
    gm = g.group_map
    assert gm["Conv_0/kernel:out"].size == 2  # 8 channels feeding 4 groups of 2
    assert gm["Conv_1/kernel:out"].size == 3  # 12 outputs in 4 groups of 3
    assert gm["Conv_0/kernel:out"].params[0].index.shape == (2, 4)


def test_scan_stack_ties_layers(graphs):
    g = graphs["scan"][3]
    hidden = g.group_map["layers/Dense_1/kernel:out"]
    assert hidden.size == 12 and hidden.prunable
    for k in range(3):  # one site per layer, its slice of the stacked leaf
        site = g.site_map[f"layers/Dense_1[{k}]"]
        assert site.weight_shape == (6, 12) and site.out_axes == (1,)
        assert site.leaf_shape == (3, 6, 12) and site.layer_axes == (0,) and site.layer == (k,)
        assert site.macs_per_example == 6 * 12


@pytest.mark.parametrize("name", ["resbn", "flatten", "inception", "depthwise", "grouped", "attn"])
def test_zeroing_params_zeroes_unit_output(graphs, name):
    m, v, x, g = graphs[name]
    for grp in g.prunable_groups:
        sites = [s for s in g.sites if s.out_group == grp.id]
        unit = grp.size - 1
        mask = np.ones(grp.size, bool)
        mask[unit] = False
        vm = apply_masks(g, v, {grp.id: mask})
        _, st = m.apply(vm, x, capture_intermediates=True, mutable=["intermediates"])
        inter = st["intermediates"]
        for s in sites:
            y = _leaf(inter, s.name.split("/"))["__call__"][0]
            (sl,) = [p for p in grp.params if p.key == s.weight]
            n_w = len(s.weight_shape)
            axis = y.ndim - (n_w - sl.axis)
            picked = jnp.take(y, jnp.asarray(sl.index[unit]), axis=axis)
            assert float(jnp.max(jnp.abs(picked))) == 0.0, (grp.id, s.name)


def test_unknown_primitive_is_named_or_marks_group():
    class SortChannels(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4)(x)
            x = jnp.sort(x, axis=-1)
            return nn.Dense(2)(x)

    m = SortChannels()
    x = jnp.ones((2, 3))
    v = m.init(jax.random.PRNGKey(0), x)
    g = trace(m.apply, v, x)
    grp = g.group_map["Dense_0/kernel:out"]
    assert not grp.prunable and "sort" in grp.reason and "Dense" not in grp.reason.split(":")[0]
    with pytest.raises(ValueError, match="sort"):
        trace(m.apply, v, x, strict=True)


class _InRes(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(x + nn.Dense(3)(x))


class _Sig(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.sigmoid(nn.Dense(3)(x)))  # sigmoid(0) = 0.5 != 0


@pytest.mark.parametrize("cls, why", [(_InRes, "input"), (_Sig, "not exactly zero")])
def test_unsafe_groups_are_not_prunable(cls, why):
    """A residual with the network input, a consumer whose pruned inputs are not zero."""
    m = cls()
    x = jnp.ones((2, 3))
    v = m.init(jax.random.PRNGKey(0), x)
    grp = trace(m.apply, v, x).group_map["Dense_1/kernel:out"]
    assert not grp.prunable and why in grp.reason


def test_nnx_model():
    apply_fn, v, x = build_nnx()
    g = trace(apply_fn, v, x)
    assert [grp.size for grp in g.prunable_groups] == [6, 5]
    assert g.prunable_groups[0].params[0].collection == "params"


def test_summary_dot_and_sites(graphs):
    g = graphs["resbn"][3]
    text = g.summary()
    for grp in g.groups:
        assert grp.id in text
    dot = g.to_dot()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    assert dot.count("->") >= len(g.sites)
    s = g.site_map["b0_c2"]
    assert s.kind == "conv" and s.out_axes == (3,) and s.in_axes == (2,)
    assert not s.signed_input and g.site_map["Conv_0"].signed_input
    assert s.macs == 2 * 8 * 8 * 8 * 3 * 3 * 8


class _GRUNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.RNN(nn.GRUCell(8))(x)[:, -1])


class _FusedLSTMNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.RNN(nn.OptimizedLSTMCell(8))(x)[:, -1])


def test_recurrent_cell_contractions_are_sites_and_coverage_is_reported():
    """A GRU's hidden-to-hidden matmuls read a carry that starts from zeros: they are sites."""
    m = _GRUNet()
    x = jnp.ones((2, 5, 4))
    v = m.init(jax.random.PRNGKey(0), x)
    g = trace(m.apply, v, x)
    assert {"GRUCell_0/hr", "GRUCell_0/hz", "GRUCell_0/hn"} <= set(g.site_map)
    assert g.coverage == 1.0
    assert "sites cover 100.0% of the weight MACs" in g.summary()
    assert "WARNING" not in g.summary()


class _WeightNormNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 64))
        h = x @ (k / jnp.linalg.norm(k, axis=0))  # a computed weight: not a site
        return nn.Dense(3)(nn.relu(h))


def test_summary_warns_and_names_contractions_it_could_not_see():
    m = _WeightNormNet()
    x = jnp.ones((2, 16))
    v = m.init(jax.random.PRNGKey(0), x)
    g = trace(m.apply, v, x)
    assert g.coverage < 0.95
    text = g.summary()
    assert "WARNING: below 95 %" in text and "computed, not a variable leaf" in text


def test_fused_lstm_kernel_gives_a_site_per_gate():
    """nn.OptimizedLSTMCell concatenates four gate kernels into one: each gate stays a site
    with its share of the MACs and its own quantizers; export equals the compressed forward."""
    m = _FusedLSTMNet()
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 5, 4))
    v = m.init(jax.random.PRNGKey(0), x)
    g = trace(m.apply, v, x)
    assert g.coverage == 1.0 and "WARNING" not in g.summary()
    gates = [f"OptimizedLSTMCell_0/{k}{c}" for k in "ih" for c in "ifgo"]
    assert set(gates) <= set(g.site_map)
    assert g.site_map["OptimizedLSTMCell_0/hg"].macs == 4 * 5 * 8 * 8  # batch, steps, in, out
    assert all(g.site_map[n].signed_input for n in gates)  # h = o * tanh(c) is signed
    st = init_state(g, CompressionSpec(skip=(), bits=(4, 4), init_bits=4), v)
    fn = jaxjpq.compress_apply(m.apply)
    st = jaxjpq.calibrate(fn, v, st, [x])
    y = jax.jit(fn)(v, st, x)
    # the gates that read h share one input quantizer (the first's), and it is used
    sm = g.site_map
    assert all(sm[f"OptimizedLSTMCell_0/{k}{c}"].act_from == f"OptimizedLSTMCell_0/{k}i"
               for k in "ih" for c in "fgo")
    assert "OptimizedLSTMCell_0/hg" not in st.act
    a = st.act["OptimizedLSTMCell_0/hi"]
    coarse = st.replace(act={**st.act, "OptimizedLSTMCell_0/hi": a.replace(d=a.d * 8)})
    assert float(jnp.max(jnp.abs(fn(v, coarse, x) - y))) > 0
    served = export.inference_fn(export.pack(v, st), m.apply, g)
    np.testing.assert_array_equal(np.asarray(served(x)), np.asarray(y))
