"""Elementwise masks and per-channel bits end to end: the compressed forward, the exact cost,
the sparse / per-channel export (restored model == masked forward, bytes on disk vs cost)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from archs import build

from jaxjpq import cost, export
from jaxjpq.compress import calibrate, compress_apply
from jaxjpq.methods import core
from jaxjpq.models import MnistCNN
from jaxjpq.slim import apply_masks, slim
from jaxjpq.state import CompressionSpec, init_state
from jaxjpq.trace import trace


@functools.cache
def _mnist():
    model = MnistCNN()
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, 28, 28, 1))
    v = model.init(jax.random.PRNGKey(0), x)
    return model, v, x, trace(model.apply, v, x)


def _inner(state):
    return [n for n in state.weight if n not in state.frozen]


def _sparse_state(seed=0, keep=0.1):
    """Every inner site: 4 bits, 90 % of its weights zero at random (elementwise masks)."""
    model, v, x, g = _mnist()
    st = init_state(g, CompressionSpec(), v)
    st = calibrate(compress_apply(model.apply), v, st, [x])
    rng = np.random.default_rng(seed)
    sm = g.site_map
    wm = {n: jnp.asarray(rng.random(sm[n].weight_shape) < keep, jnp.float32) for n in _inner(st)}
    st = st.replace(weight_masks=wm)
    for n in _inner(st):
        st = core.set_bits(st, n, 4.0)
    return st


def _per_channel_state(seed=0):
    """Every inner site: each output channel at a random width in {0, 2, 4, 8}."""
    model, v, x, g = _mnist()
    st = init_state(g, CompressionSpec(per_channel=True), v)
    st = calibrate(compress_apply(model.apply), v, st, [x])
    rng = np.random.default_rng(seed)
    for n in _inner(st):
        shape = np.shape(st.weight[n].d)
        st = core.set_bits(st, n, rng.choice([0.0, 2.0, 4.0, 8.0], size=shape))
    return st


@pytest.mark.parametrize("make", [_sparse_state, _per_channel_state,
                                  functools.partial(_sparse_state, keep=0.01)])
def test_export_restores_masked_forward_and_cost_matches_disk(make, tmp_path):
    model, v, x, g = _mnist()
    st = make()
    fwd = compress_apply(model.apply)
    want = fwd(v, st, x)
    packed = export.pack(v, st)
    export.save(tmp_path / "m", packed)
    restored = export.restore(tmp_path / "m")
    got = export.inference_fn(restored, model.apply, g)(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    disk = export.disk_bytes(tmp_path / "m")
    model_bytes = cost.size_bits(st, include_scales=True, include_other=True) / 8
    # orbax's metadata is a few KB whatever the payload: 5 % of a 100 KB model, more of a tiny one
    assert 0 <= disk - model_bytes <= max(0.05 * disk, 5000), (model_bytes, disk)
    # the payload the cost model describes is the packed arrays, to the byte (rounding per stream)
    theo = export.theoretical_bytes(packed)["total"]
    assert abs(theo - model_bytes) <= 8 * len(packed.arrays)


def test_sparse_cost_counts_nonzeros_and_index():
    *_, g = _mnist()
    st = _sparse_state()
    sm = g.site_map
    for n in _inner(st):
        nnz = float(np.sum(np.asarray(st.weight_masks[n]) > 0.5))
        numel = float(np.prod(sm[n].weight_shape))
        row = cost.site_table(st)[n]
        assert row["size"] == nnz * 4.0 + numel  # codes + 1-bit bitmap per position
    # at 99 % zeros a list of positions is the smaller index
    st = _sparse_state(keep=0.01)
    for n in _inner(st):
        nnz = float(np.sum(np.asarray(st.weight_masks[n]) > 0.5))
        numel = float(np.prod(sm[n].weight_shape))
        width = cost.index_width(int(numel))
        row = cost.site_table(st)[n]
        assert row["size"] == nnz * 4.0 + min(numel, nnz * width)
        dense = cost.site_table(st.replace(weight_masks={}))[n]
        assert row["bops"] == pytest.approx(dense["bops"] * nnz / numel, rel=1e-12)


def test_zero_bit_channels_cost_nothing_and_die():
    model, v, x, g = _mnist()
    st = init_state(g, CompressionSpec(per_channel=True), v)
    bits = np.full(np.shape(st.weight["Conv_1"].d), 4.0)
    bits[:10] = 0.0
    st = core.set_bits(st, "Conv_1", bits)
    np.testing.assert_array_equal(cost.channel_bits(st, "Conv_1")[:10], 0.0)
    full = cost.site_table(init_state(g, CompressionSpec(per_channel=True), v))["Conv_1"]
    assert cost.site_table(st)["Conv_1"]["size"] == 9 * 32 * 54 * 4.0
    assert full["size"] == 9 * 32 * 64 * 16.0
    # with the biases of those channels zero too, the units are dead: slim removes them
    params = jax.tree.map(lambda a: a, v["params"])
    params["Conv_1"]["bias"] = params["Conv_1"]["bias"].at[:10].set(0.0)
    v2 = {**v, "params": params}
    st2 = core.prune_dead_units(st, v2)
    kept = np.asarray(st2.masks["Conv_1/kernel:out"])
    np.testing.assert_array_equal(kept[:10], 0.0)
    assert kept[10:].all()
    fn, sv = slim(v2, st2)
    assert sv["params"]["Conv_1"]["kernel"].shape[-1] == 54
    # the packed model drops them too, and the cost model counts what it stores
    packed = export.pack(v2, st2)
    np.testing.assert_allclose(export.inference_fn(packed, model.apply, g)(x),
                               compress_apply(model.apply)(v2, st, x), rtol=1e-5, atol=1e-5)
    assert cost.size_bits(st2, include_scales=True, include_other=True) / 8 == pytest.approx(
        export.theoretical_bytes(packed)["total"], abs=len(packed.arrays))
    assert sum(int(n) for _, n in next(e for e in packed.meta["leaves"] if e["path"][1:] == [
        "Conv_1", "kernel"])["widths"]) == 54
    np.testing.assert_allclose(fn(sv, x), model.apply(apply_masks(g, v2, st2.masks), x),
                               rtol=1e-5, atol=1e-5)
    fwd = compress_apply(model.apply)  # the dead units' outputs were zero already
    np.testing.assert_allclose(fwd(v2, st2, x), fwd(v2, st, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mha_heads", "concat_decoder"])
def test_per_channel_widths_on_multi_axis_and_concat_sites(name, tmp_path):
    """Per-channel widths (0 included) on MHA kernels [in, heads, head_dim] and on a conv fed
    by a concat, with pruned units: restored export == forward, cost == the packed payload."""
    m, v, x = build(name)
    g = trace(m.apply, v, x)
    st = init_state(g, CompressionSpec(per_channel=True), v)
    st = calibrate(compress_apply(m.apply), v, st, [x])
    rng = np.random.default_rng(0)
    for n in _inner(st):
        widths = rng.choice([0.0, 2.0, 3.0, 8.0], size=np.shape(st.weight[n].d))
        st = core.set_bits(st, n, widths)
    st = st.replace(masks={k: jnp.asarray(rng.random(mk.shape) < 0.7, jnp.float32).at[0].set(1.0)
                           for k, mk in st.masks.items()})
    want = compress_apply(m.apply)(v, st, x)
    packed = export.pack(v, st)
    export.save(tmp_path / "m", packed)
    got = export.inference_fn(export.restore(tmp_path / "m"), m.apply, g)(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    model_bytes = cost.size_bits(st, include_scales=True, include_other=True) / 8
    assert model_bytes == pytest.approx(export.theoretical_bytes(packed)["total"],
                                        abs=len(packed.arrays))
