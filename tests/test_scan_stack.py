"""Scanned layer stacks (``nn.scan``, ``nn.remat_scan``) as per-layer quantization sites."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxjpq
from jaxjpq import cost, data, export, train
from jaxjpq.compress import calibrate, compress_apply
from jaxjpq.methods.core import set_bits
from jaxjpq.models.transformer import EncoderBlock
from jaxjpq.quant import params_bits
from jaxjpq.train import CompressedForward


class _Block(nn.Module):
    """A pre-LN encoder layer as a scan body ``x -> x`` (``nn.remat_scan``) or
    ``(x, None) -> (x, None)`` (``nn.scan``)."""

    carry_only: bool = False

    @nn.compact
    def __call__(self, x, _=None):
        x = EncoderBlock(num_heads=2, mlp_dim=24, pre_ln=True, name="block")(x)
        return x if self.carry_only else (x, None)


class ScannedTransformer(nn.Module):
    """Patch embedding -> scanned pre-LN layers (4, or 2 with ``short``) -> mean pool -> head.
    ``[B, 8, 6] -> [B, 3]``."""

    how: str = "scan"
    short: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, name="embed")(x)
        if self.how == "scan":
            stack = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=2 if self.short else 4)
            h, _ = stack(name="layers")(h, None)
        else:
            stack = nn.remat_scan(_Block, lengths=(1, 2) if self.short else (2, 2))
            h = stack(carry_only=True, name="layers")(h)
        h = nn.LayerNorm(name="ln")(h)
        return nn.Dense(3, name="head")(h.mean(axis=1))


def _setup(how, short=False):
    m = ScannedTransformer(how, short)
    x = jax.random.normal(jax.random.key(1), (16, 8, 6))
    v = m.init(jax.random.key(0), x)
    return m, v, x, jaxjpq.trace.trace(m.apply, v, x)


@pytest.fixture(scope="module", params=["scan", "remat_scan"])
def stack(request):
    return _setup(request.param)


def test_every_layer_is_its_own_site(stack):
    m, v, x, g = stack
    assert g.coverage == 1.0
    layered = [s for s in g.sites if s.layer_axes]
    # q, k, v, out, fc1, fc2 per layer, 4 layers
    assert len(layered) == 6 * 4
    q0 = g.site_map["layers/block/attention/query[0]"]
    assert q0.stack_sizes == ((4,) if m.how == "scan" else (2, 2))
    assert q0.weight_shape == (16, 2, 8) and q0.leaf_shape == (*q0.stack_sizes, 16, 2, 8)
    # execution order: layer by layer
    names = [s.name for s in g.sites]
    assert names.index("layers/block/mlp/fc2[0]") < names.index("layers/block/attention/query[1]")
    # MACs per layer: the layer's share of the scan's
    assert q0.macs == x.shape[0] * 8 * 16 * 16
    assert sum(s.macs for s in g.sites) == g.trace_info["weight_macs"]


def test_per_layer_bits_reach_forward_cost_and_export(stack, tmp_path):
    m, v, x, g = stack
    spec = jaxjpq.CompressionSpec(bits=(2, 8), skip=())
    st = jaxjpq.init_state(g, spec, v)
    fn = compress_apply(m.apply)
    st = calibrate(fn, v, st, [x])
    # layer 0 of fc1 at 2 bits, every other site at 8
    for name in st.weight:
        st = set_bits(st, name, 8.0)
    st = set_bits(st, "layers/block/mlp/fc1[0]", 2.0)
    b = cost.bits(st)
    assert b["layers/block/mlp/fc1[0]"][0] == 2 and b["layers/block/mlp/fc1[1]"][0] == 8
    y_all8 = fn(v, set_bits(st, "layers/block/mlp/fc1[0]", 8.0), x)
    y = jax.jit(fn)(v, st, x)
    assert float(jnp.max(jnp.abs(y - y_all8))) > 0  # layer 0's own quantizer is used
    # only that layer's weights change when its bits change
    tv = jaxjpq.compress.transform_variables(v, st)
    k = tv["params"]["layers"]["block"]["mlp"]["fc1"]["kernel"]
    raw = v["params"]["layers"]["block"]["mlp"]["fc1"]["kernel"]
    flat_k, flat_raw = k.reshape(4, *k.shape[-2:]), raw.reshape(4, *raw.shape[-2:])
    assert len(np.unique(np.asarray(flat_k[0]))) <= 2 ** 2
    assert len(np.unique(np.asarray(flat_k[1]))) > 2 ** 2
    assert float(jnp.max(jnp.abs(flat_k[1] - flat_raw[1]))) < 0.05
    export.save(tmp_path / "m", export.pack(v, st))
    served = jax.jit(export.inference_fn(export.restore(tmp_path / "m"), m.apply, g))
    np.testing.assert_array_equal(np.asarray(served(x)), np.asarray(y))


@pytest.mark.parametrize("how", ["scan", "remat_scan"])
def test_geta_compresses_a_scanned_transformer(how, tmp_path):
    m, v, x, g = _setup(how, short=True)
    spec = jaxjpq.CompressionSpec(budget={"sparsity": 0.3})  # the default spec otherwise
    pair = jaxjpq.init(g, v, spec=spec)
    fwd = CompressedForward(m.apply)
    pair = pair._replace(compression=calibrate(fwd.fn, v, pair.compression, [x]))
    src = data.ArraySource({"inputs": np.asarray(x), "labels": np.arange(16, dtype=np.int32) % 3})
    steps = 30
    tx = jaxjpq.geta(optax.adam(1e-3), steps=steps)
    st = train.create_train_state(fwd, {"params": pair}, tx)
    st, _ = train.train(st, data.batch_stream(src, 8, seed=0), steps, progress=False)
    params, cs = st.params.model, st.params.compression
    layered = [s.name for s in g.sites if s.layer_axes]
    assert len(layered) == 12 and not set(layered) & set(cs.frozen)
    assert set(layered) <= set(cs.weight) and set(layered) <= set(cs.act)
    lo, hi = spec.bits
    for n in layered:  # every layer site learned, at integer bits within [b_l, b_u]
        b = np.asarray(params_bits(cs.weight[n], True))
        assert lo - 1e-4 <= b.min() and b.max() <= hi + 1e-4
        np.testing.assert_allclose(b, np.round(b), atol=1e-4)
    assert float(cost.sparsity(cs)) == pytest.approx(0.3, abs=0.03)
    variables = {"params": params}
    y = jax.jit(fwd.fn)(variables, cs, x)
    export.save(tmp_path / "m", export.pack(variables, cs))
    served = jax.jit(export.inference_fn(export.restore(tmp_path / "m"), m.apply, g))
    np.testing.assert_array_equal(np.asarray(served(x)), np.asarray(y))


def test_djpq_meets_a_bops_target_on_a_scanned_transformer(tmp_path):
    m, v, x, g = _setup("remat_scan", short=True)
    spec = jaxjpq.CompressionSpec(bits=(2, 8), budget={"bops": 0.02}, init_bits=8)
    pair = jaxjpq.methods.djpq.init(g, v, spec=spec, key=jax.random.key(0))
    fwd = CompressedForward(m.apply)
    src = data.ArraySource({"inputs": np.asarray(x), "labels": np.arange(16, dtype=np.int32) % 3})
    steps = 20
    tx = jaxjpq.djpq(optax.adam(1e-3), steps=steps, warmup=2, search_end=12)
    st = train.create_train_state(fwd, {"params": pair}, tx)
    st, _ = train.train(st, data.batch_stream(src, 8, seed=0), steps, progress=False)
    params, cs = st.params.model, st.params.compression
    assert float(cost.relative_bops(cs)) <= 0.02 + 1e-9
    layered = [s.name for s in g.sites if s.layer_axes]
    bits = {n: float(params_bits(cs.weight[n], True)) for n in layered}
    assert all(2 - 1e-4 <= b <= 8 + 1e-4 and abs(b - round(b)) < 1e-3 for b in bits.values())
    variables = {"params": params}
    y = jax.jit(fwd.fn)(variables, cs, x)
    export.save(tmp_path / "m", export.pack(variables, cs))
    served = jax.jit(export.inference_fn(export.restore(tmp_path / "m"), m.apply, g))
    np.testing.assert_allclose(np.asarray(served(x)), np.asarray(y), rtol=1e-5, atol=1e-5)
