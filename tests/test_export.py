"""Tests for jaxjpq.export: bit packing, pack/restore, integer inference, jax.export."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import mnist_cnn_graph, small_cnn
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxjpq import cost, export
from jaxjpq.compress import calibrate, compress_apply
from jaxjpq.models import MnistCNN
from jaxjpq.quant import step_from_bits
from jaxjpq.state import CompressionSpec, init_state


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 32), n=st.integers(0, 67), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, n, seed):
    rng = np.random.default_rng(seed)
    c = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), n)
    p = export.pack_codes(c, bits)
    assert p.nbytes == -(-n * bits // 8)  # ceil(n·bits/8): no padding beyond the last byte
    assert p.dtype == {8: np.int8, 16: np.int16, 32: np.int32}.get(bits, np.uint8)
    np.testing.assert_array_equal(export.unpack_codes(p, bits, n, np), c)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 13, 16, 31, 32])
def test_jnp_unpack_matches_numpy(bits):
    rng = np.random.default_rng(bits)
    c = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), 37)
    c[:2] = [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1]  # extremes
    unpack = jax.jit(export.unpack_codes, static_argnums=(1, 2))
    np.testing.assert_array_equal(unpack(jnp.asarray(export.pack_codes(c, bits)), bits, 37), c)


def test_int4_is_two_per_byte_low_nibble_first():
    p = export.pack_codes(np.array([1, -2, 7]), 4)
    np.testing.assert_array_equal(p, [0x1 | (0xE << 4), 0x7])


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        export.pack_codes(np.array([0, 4]), 3)
    with pytest.raises(ValueError, match="1..32"):
        export.pack_codes(np.array([0]), 33)


def _mixed_state(g, v, x, fn, bits, per_channel=False, power_of_two=False, seed=0):
    st = init_state(g, CompressionSpec(per_channel=per_channel, power_of_two=power_of_two), v)
    st = calibrate(fn, v, st, [x])
    rng = np.random.default_rng(seed)
    weight = {k: p.replace(d=step_from_bits(float(bits[k]), p.q_m, p.t))
              for k, p in st.weight.items()}
    masks = {k: jnp.asarray(rng.permutation(np.arange(m.size) < m.size // 2), jnp.float32)
             for k, m in st.masks.items()}  # 50 % of every prunable group's units pruned
    return st.replace(weight=weight, masks=masks)


def test_mnist_cnn_mixed_bits_half_pruned_disk_size_and_outputs(tmp_path):
    model, g = MnistCNN(), mnist_cnn_graph()
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    v = model.init(jax.random.key(0), x)
    fn = compress_apply(model.apply)
    bits = {"Conv_0": 8, "Conv_1": 3, "Dense_0": 2, "Dense_1": 5}
    st = _mixed_state(g, v, x, fn, bits)
    packed = export.pack(v, st)
    theory = export.theoretical_bytes(packed)
    # the packed codes are exactly the cost model's size (same kept params, same bits)
    assert theory["codes"] == cost.size_bits(st) / 8
    export.save(tmp_path / "m", packed)
    on_disk = export.disk_bytes(tmp_path / "m")
    # uncompressed payload plus orbax's files and the JSON metadata (a few KB, fixed)
    assert theory["total"] <= on_disk <= theory["total"] + 6000, (on_disk, theory)
    restored = export.restore(tmp_path / "m")
    assert restored.meta == packed.meta
    y_fake = jax.jit(fn)(v, st, x)
    y_int = jax.jit(export.inference_fn(restored, model.apply, g))(x)
    np.testing.assert_allclose(y_int, y_fake, rtol=1e-6, atol=1e-6)
    # the pure form reads its weights from its argument, so jit takes them as inputs
    apply, weights = export.inference_apply(restored, model.apply, g)
    served = jax.jit(apply)
    np.testing.assert_allclose(served(weights, x), y_int, rtol=1e-6, atol=1e-6)
    zeroed = jax.tree.map(jnp.zeros_like, weights["variables"])
    np.testing.assert_array_equal(served({**weights, "variables": zeroed}, x),
                                  jnp.zeros_like(y_int))


@pytest.mark.parametrize("per_channel, power_of_two", [(True, False), (False, True)])
def test_restored_model_matches_fake_quant_forward(tmp_path, per_channel, power_of_two):
    model, v, g, x = small_cnn()
    fn = compress_apply(model.apply)
    bits = {"Conv_0": 8, "Conv_1": 5, "Dense_0": 3, "Dense_1": 7}
    st = _mixed_state(g, v, x, fn, bits, per_channel, power_of_two, seed=1)
    packed = export.pack(v, st)
    export.save(tmp_path / "m", packed)
    restored = export.restore(tmp_path / "m")
    for e in restored.meta["leaves"]:
        if e["kind"] == "codes":  # each kept channel at its exact width
            site = e["path"][1]
            widths = [w for w, n in e["widths"] for _ in range(n)]
            want = np.asarray(cost.channel_bits(st, site))
            if want.ndim:
                want = want[np.asarray(st.masks.get(f"{site}/kernel:out", 1.0 + want)) > 0.5]
            else:
                want = np.full(len(widths), want)
            np.testing.assert_array_equal(widths, want)
    y_fake = jax.jit(fn)(v, st, x)
    y_int = jax.jit(export.inference_fn(restored, model.apply, g))(x)
    np.testing.assert_allclose(y_int, y_fake, rtol=1e-6, atol=1e-6)
    dense = export.unpack_variables(restored, np)
    assert np.all(dense["params"]["Conv_1"]["kernel"][..., np.asarray(st.masks[
        "Conv_1/kernel:out"]) == 0] == 0)


def test_jax_export_matches_fake_quant_forward():
    model, v, g, x = small_cnn()
    fn = compress_apply(model.apply)
    bits = {"Conv_0": 8, "Conv_1": 4, "Dense_0": 2, "Dense_1": 6}
    st = _mixed_state(g, v, x, fn, bits, seed=2)
    packed = export.pack(v, st)
    exp = export.export_model(packed, model.apply, g, x)
    np.testing.assert_allclose(exp.call(x), jax.jit(fn)(v, st, x), rtol=1e-6, atol=1e-6)
    if importlib.util.find_spec("flatbuffers") is not None:  # jax.export serialization needs it
        blob = export.export_serialized(packed, model.apply, g, x)
        np.testing.assert_allclose(export.deserialize(blob).call(x), exp.call(x))


def test_packed_model_from_other_graph_is_refused():
    model, v, g, x = small_cnn()
    packed = export.pack(v, init_state(g, CompressionSpec(), v))
    with pytest.raises(ValueError, match="another graph"):
        export.inference_fn(packed, model.apply, mnist_cnn_graph(4, 8, 32))
    with pytest.raises(ValueError, match="traced with"):
        export.pack(v, init_state(mnist_cnn_graph(4, 8, 32), CompressionSpec()))


def test_save_restore_keeps_every_array_exactly(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"s": np.float32(0.25) * np.ones((), np.float32), "i8": rng.integers(-5, 5, 7,
              dtype=np.int8), "u": rng.integers(0, 255, (3, 4), dtype=np.uint8),
              "f": rng.random((2, 3)).astype(np.float32), "e": np.zeros((0,), np.float32)}
    packed = export.PackedModel(arrays=arrays, meta={"format": export.FORMAT, "leaves": []})
    export.save(tmp_path / "m", packed)
    back = export.restore(tmp_path / "m")
    assert set(back.arrays) == set(arrays)
    for k, a in arrays.items():
        assert back.arrays[k].shape == a.shape and back.arrays[k].dtype == a.dtype
        np.testing.assert_array_equal(back.arrays[k], a)


@pytest.mark.parametrize("fault", ["array", "meta", "truncated", "no_meta", "bad_json"])
def test_corrupt_export_is_an_error_naming_what(tmp_path, fault):
    import json
    from pathlib import Path

    model, v, g, x = small_cnn()
    packed = export.pack(v, init_state(g, CompressionSpec(), v))
    export.save(tmp_path / "m", packed)
    if fault == "array":
        files = [p for p in Path(tmp_path / "m" / "arrays").rglob("*") if p.is_file()]
        f = max(files, key=lambda p: p.stat().st_size)
        blob = bytearray(f.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        f.write_bytes(bytes(blob))
        match = r"array \w+ does not match its checksum"
    elif fault == "truncated":
        files = [p for p in Path(tmp_path / "m" / "arrays").rglob("*") if p.is_file()]
        f = max(files, key=lambda p: p.stat().st_size)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        match = "m: the export does not read back|array \\w+ (is truncated|does not match)"
    elif fault == "no_meta":
        import shutil

        shutil.rmtree(tmp_path / "m" / "meta")
        match = "m: the export('s metadata| does not read back)"
    elif fault == "bad_json":
        (tmp_path / "m" / "meta" / "metadata").write_text("{not json")
        match = "m: the export does not read back"
    else:
        f = tmp_path / "m" / "meta" / "metadata"
        meta = json.loads(f.read_text())
        leaf = next(e for e in meta["leaves"] if e["kind"] == "codes")
        leaf["widths"] = [[w + 1, n] for w, n in leaf["widths"]]
        f.write_text(json.dumps(meta))
        match = "metadata .* does not match its checksum"
    with pytest.raises(export.CorruptExportError, match=match):
        export.restore(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no exported model"):
        export.restore(tmp_path / "absent")


def test_export_serves_a_batchnorm_model_with_the_options_it_was_traced_with():
    import flax.linen as nn

    import jaxjpq

    class TrainsByDefault(nn.Module):  # a user's model whose `train` defaults to True
        @nn.compact
        def __call__(self, x, train: bool = True):
            x = nn.relu(nn.BatchNorm(not train)(nn.Conv(8, (3, 3))(x)))
            return nn.Dense(10)(x.mean(axis=(1, 2)))

    m = TrainsByDefault()
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    v = m.init(jax.random.key(0), x, train=False)
    g = jaxjpq.trace.trace(m.apply, v, x, train=False)
    packed = export.pack(v, init_state(g, CompressionSpec(), v))
    want = export.inference_fn(packed, m.apply, g)(x, train=False)
    np.testing.assert_allclose(export.inference_fn(packed, m.apply, g)(x), want)
    exp = export.export_model(packed, m.apply, g, x)  # no train=False needed
    np.testing.assert_allclose(exp.call(x), want, rtol=1e-5, atol=1e-6)
