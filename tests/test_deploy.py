"""The deployed model (jaxjpq.deploy): slim integer weights that equal the compressed forward,
resident bytes the cost model predicts, a saved artifact that serves without jaxjpq and refuses
corruption."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from archs import ARCHS, build, build_zoo
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxjpq
from jaxjpq import cost, deployment
from jaxjpq.export import CorruptExportError
from jaxjpq.hooks import Contraction
from jaxjpq.methods.core import set_bits
from jaxjpq.models import MnistCNN
from jaxjpq.quant import QuantParams, step_from_bits


def _random_state(apply_fn, v, x, rng, *, acts=False, elementwise=False, per_channel=False,
                  **kwargs):
    """A state of random keep-masks (about half of each group), random weight bits in [2, 8]
    per site (one site at 12 bits when there are several) and, with ``elementwise``, a random
    elementwise mask on every other site."""
    pair = jaxjpq.init(apply_fn, v, x, bits=(2, 8), init_bits=8, per_channel=per_channel,
                       quantize_activations=acts, skip=(), model_kwargs=kwargs or None)
    s = pair.compression
    masks = {}
    for g in s.graph.prunable_groups:
        m = rng.random(g.size) > 0.5
        m[rng.integers(g.size)] = True
        masks[g.id] = jnp.asarray(m, jnp.float32)
    s = s.replace(masks={**s.masks, **masks})
    names = sorted(s.weight)
    for i, n in enumerate(names):
        b = 12 if (i == 1 and len(names) > 2) else int(rng.integers(2, 9))
        s = set_bits(s, n, float(b))
    if elementwise:
        sm = s.graph.site_map
        wm = {n: jnp.asarray(rng.random(sm[n].weight_shape) > 0.3, jnp.float32)
              for n in names[::2]}
        s = s.replace(weight_masks=wm)
    return s


def _scale(ref):
    # random weights and BN statistics grow deep outputs: compare relative to their magnitude
    return max(1.0, float(jnp.max(jnp.abs(ref))))


# Weights only (activations float): the deployed model sums the same nonzero products in a slim
# order, so outputs agree to float32 rounding of reductions over at most a few hundred terms.
ATOL = 1e-5


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_deployed_equals_compressed_forward(name):
    m, v, x = build(name)
    rng = np.random.default_rng(sum(map(ord, name)))
    s = _random_state(m.apply, v, x, rng, elementwise=name in ("resbn", "attn", "scan"),
                      per_channel=name in ("flatten", "depthwise", "mixer", "gru"))
    dm = jaxjpq.deploy(v, s, warn_budget=False)
    fwd = jaxjpq.compress_apply(m.apply)
    for xb in (x, jnp.concatenate([x] * 2, axis=0)[:3]):
        ref = fwd(v, s, xb)
        sc = _scale(ref)
        chex.assert_trees_all_close(dm(xb) / sc, ref / sc, atol=ATOL)
    assert dm.resident_bytes() == cost.resident_bytes(s)


def test_deployed_nnx_equals_compressed_forward():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.head = nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))

    model = jaxjpq.nnx.split(Net(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    s = _random_state(model.apply, model.variables, x, np.random.default_rng(3), per_channel=True)
    dm = jaxjpq.deploy(model.variables, s, warn_budget=False)
    ref = jaxjpq.compress_apply(model.apply)(model.variables, s, x)
    chex.assert_trees_all_close(dm(x), ref, atol=ATOL)
    assert dm.resident_bytes() == cost.resident_bytes(s)


@pytest.mark.parametrize("name", ["resnet20", "vit_tiny_mnist", "bert_tiny"])
def test_deployed_zoo_equals_compressed_forward(name):
    m, v, x = build_zoo(name)
    kw = {"train": False} if name == "resnet20" else {}
    s = _random_state(m.apply, v, x, np.random.default_rng(5), per_channel=True, **kw)
    dm = jaxjpq.deploy(v, s, warn_budget=False)
    ref = jaxjpq.compress_apply(m.apply)(v, s, x, **kw)
    sc = _scale(ref)
    chex.assert_trees_all_close(dm(x) / sc, ref / sc, atol=ATOL)
    assert dm.resident_bytes() == cost.resident_bytes(s)


def _dyadic_state(model, v, x, rng, per_channel):
    """Steps of 1/16 for weights and inputs: every product and every sum of a conv / dense is
    exact in float32 (integer sums below 2^24), so the slim summation order changes nothing."""
    pair = jaxjpq.init(model.apply, v, x, bits=(2, 8), per_channel=per_channel, skip=())
    s = pair.compression
    d = 1.0 / 16

    def wq(p, bits):
        one = jnp.ones_like(p.d)
        return QuantParams(d=one * d, q_m=one * d * (2 ** (bits - 1) - 1), t=one)

    weight = {n: wq(p, int(rng.integers(2, 9))) for n, p in s.weight.items()}
    act = {n: QuantParams(d=jnp.asarray(d), q_m=jnp.asarray(d * 127), t=jnp.asarray(1.0))
           for n in s.act}  # input codes within int8: the integer path applies
    masks = {g: jnp.asarray(rng.random(m.shape) > 0.5, jnp.float32).at[0].set(1.0)
             for g, m in s.masks.items()}
    wm = {n: jnp.asarray(rng.random(s.graph.site_map[n].weight_shape) > 0.3, jnp.float32)
          for n in sorted(s.weight)[::2]}
    return s.replace(weight=weight, act=act, masks=masks, weight_masks=wm)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), per_channel=st.booleans(), batch=st.sampled_from([1, 5]),
       path=st.sampled_from(["weight_only", "integer"]), data=st.data())
def test_deployed_with_quantized_inputs_is_bitwise_the_compressed_forward(seed, per_channel,
                                                                         batch, path, data):
    model = MnistCNN(features=(4, 8), hidden=16)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(0, 17, (batch, 28, 28, 1)) / 16.0, jnp.float32)
    v = model.init(jax.random.key(seed), x[:1])
    s = _dyadic_state(model, v, x[:1], rng, per_channel)
    dm = jaxjpq.deploy(v, s, path=path, warn_budget=False)
    if path == "integer":  # every conv and dense contracts int8 codes
        assert dm.meta["integer_sites"] == list(s.graph.site_map) and not dm.meta["float_sites"]
    y = np.asarray(dm(x))
    np.testing.assert_array_equal(y, np.asarray(jaxjpq.compress_apply(model.apply)(v, s, x)))
    # convs computed at more output channels (float path): exact sums, so the same bits
    chans = dm.meta["conv_channels"]
    assert sorted(chans) == ["Conv_0", "Conv_1"]
    widths = {n: data.draw(st.integers(lo, hi), label=n) for n, (lo, hi) in chans.items()}
    wide = dm.with_conv_widths(widths)
    assert wide.meta["conv_widths"] == {n: w for n, w in widths.items() if w > chans[n][0]}
    assert wide.resident_bytes() == dm.resident_bytes()
    np.testing.assert_array_equal(np.asarray(wide(x)), y)
    # and as shifted taps: other sums of the same exact products
    taps = data.draw(st.lists(st.sampled_from(sorted(chans)), min_size=1, unique=True))
    tapped = wide.with_conv_taps(taps)
    assert tapped.meta["conv_taps"] == sorted(taps)
    assert not set(tapped.meta["conv_widths"]) & set(taps)
    np.testing.assert_array_equal(np.asarray(tapped(x)), y)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), nsp=st.integers(1, 3), data=st.data())
def test_conv_as_shifted_taps_equals_the_conv(seed, nsp, data):
    # small integers: every product and sum is exact in float32, so the outputs are equal
    rng = np.random.default_rng(seed)
    k = [data.draw(st.integers(1, 3)) for _ in range(nsp)]
    dil = [data.draw(st.integers(1, 2)) for _ in range(nsp)]
    stride = [data.draw(st.integers(1, 3)) for _ in range(nsp)]
    pad = [(data.draw(st.integers(-1, 2)), data.draw(st.integers(-1, 2))) for _ in range(nsp)]
    size = [(kk - 1) * d + 3 + data.draw(st.integers(0, 4)) for kk, d in zip(k, dil, strict=True)]
    sp = "DHW"[3 - nsp:]
    lhs = data.draw(st.sampled_from([f"N{sp}C", f"NC{sp}"]))
    rhs = data.draw(st.sampled_from([f"{sp}IO", f"OI{sp}"]))
    out = data.draw(st.sampled_from([f"N{sp}C", f"NC{sp}"]))
    cin, cout = int(rng.integers(1, 4)), int(rng.integers(1, 5))
    x = rng.integers(-3, 4, [2, *size, cin]).astype(np.float32)
    w = rng.integers(-3, 4, [*k, cin, cout]).astype(np.float32)
    x = np.moveaxis(x, -1, 1) if lhs.startswith("NC") else x
    w = np.moveaxis(w, [-1, -2], [0, 1]) if rhs.startswith("OI") else w

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, stride, pad, rhs_dilation=dil,
                                            dimension_numbers=(lhs, rhs, out))

    eqn = jax.make_jaxpr(conv)(x, w).jaxpr.eqns[0]
    f = Contraction("conv_general_dilated", eqn.params, 1, eqn)
    # the reference pads explicitly: XLA:CPU's conv reads past the input under a negative
    # low padding (a row that should see only padding comes out nonzero)
    sp_axes = [lhs.index(c) for c in sp]
    cfg = [(0, 0, 0)] * x.ndim
    for a, (lo, hi) in zip(sp_axes, pad, strict=True):
        cfg[a] = (lo, hi, 0)
    xp = jax.lax.pad(jnp.asarray(x), 0.0, cfg)
    ref = jax.lax.conv_general_dilated(xp, w, stride, "VALID", rhs_dilation=dil,
                                       dimension_numbers=(lhs, rhs, out))
    np.testing.assert_array_equal(np.asarray(deployment._taps(f, x, w)), np.asarray(ref))


def test_tuned_convs_keep_outputs_and_saved_widths(tmp_path):
    # float site inputs: a wider kernel may sum in another order, which stays within float
    # rounding here (with quantized inputs it could move an input across a code boundary)
    model = MnistCNN(features=(8, 16), hidden=32)
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    v = model.init(jax.random.key(0), x[:1])
    dm = jaxjpq.deploy(v, _random_state(model.apply, v, x, np.random.default_rng(0)),
                       warn_budget=False)
    t = dm.tuned(x, rounds=3)
    chans = dm.meta["conv_channels"]
    assert all(chans[n][0] < w <= chans[n][1] for n, w in t.meta["conv_widths"].items())
    y = np.asarray(t(x))
    sc = _scale(y)
    chex.assert_trees_all_close(y / sc, np.asarray(dm(x)) / sc, atol=ATOL)
    assert all(n not in t.meta["conv_widths"] for n in t.meta["conv_taps"])
    # forced wide and tapped, saved and loaded: the widths and taps travel with the artifact
    wide = dm.with_conv_widths({n: hi for n, (lo, hi) in chans.items()}).with_conv_taps(
        ["Conv_0"])
    assert wide.meta["conv_widths"] == {"Conv_1": chans["Conv_1"][1]}
    assert "computed wider: Conv_1" in wide.report()
    assert "shifted taps: Conv_0" in wide.report()
    wide.save(tmp_path / "m", x, batch_sizes=(4,))
    back = deployment.load(tmp_path / "m")
    assert back.meta["conv_widths"] == wide.meta["conv_widths"]
    assert back.meta["conv_taps"] == ["Conv_0"]
    np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(wide(x)))
    with pytest.raises(ValueError, match="already exported"):
        back.with_conv_widths({})
    with pytest.raises(ValueError, match="already exported"):
        back.with_conv_taps([])


def test_conv_widths_and_taps_refuse_other_sites_widths_out_of_range_and_grouped_convs():
    _, v, x, s, dm = _mnist_deployed()
    (lo, hi) = dm.meta["conv_channels"]["Conv_0"]
    with pytest.raises(ValueError, match="not a conv site.*Conv_0"):
        dm.with_conv_widths({"Dense_0": 64})
    with pytest.raises(ValueError, match=f"outside \\[{lo}, {hi}\\]"):
        dm.with_conv_widths({"Conv_0": hi + 1})
    m, v2, x2 = build("depthwise")
    d2 = jaxjpq.deploy(v2, _random_state(m.apply, v2, x2, np.random.default_rng(3)),
                       warn_budget=False)
    lo2, hi2 = d2.meta["conv_channels"]["Conv_2"]  # the depthwise 3x3
    t2 = d2.tuned(x2, rounds=1)
    assert lo2 < hi2 and "Conv_2" not in t2.meta["conv_widths"]
    with pytest.raises(ValueError, match="grouped convolution"):
        d2.with_conv_widths({"Conv_2": hi2})(x2)
    assert "Conv_2" not in t2.meta["conv_taps"]
    with pytest.raises(ValueError, match="cannot run as shifted taps"):
        d2.with_conv_taps(["Conv_2"])(x2)
    with pytest.raises(ValueError, match="not a conv site.*Conv_0"):
        dm.with_conv_taps(["Dense_0"])


def test_integer_path_says_which_sites_stay_float():
    _, v, x, s, dm = _mnist_deployed()
    i = jaxjpq.deploy(v, s, path="integer", warn_budget=False)
    why = deployment.integer_sites(s)
    assert i.meta["integer_sites"] == [n for n, w in why.items() if not w]
    wide = [n for n, w in why.items() if "above 8" in w]
    assert wide and all(n in i.meta["float_sites"] for n in wide)
    assert "integer contractions" in i.report()
    with pytest.raises(ValueError, match="path must be one of"):
        jaxjpq.deploy(v, s, path="int8")


@functools.cache
def _mnist_deployed():
    """One small deployed CNN for the tests that only read it (built once per process)."""
    model = MnistCNN(features=(8, 16), hidden=32)
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    v = model.init(jax.random.key(0), x[:1])
    s = _random_state(model.apply, v, x, np.random.default_rng(0), acts=True)
    s = jaxjpq.calibrate(jaxjpq.compress_apply(model.apply), v, s, [x])
    return model, v, x, s, jaxjpq.deploy(v, s, warn_budget=False)


def _primitives(fn, *args) -> set[str]:
    """Names of the primitives in the jaxpr of ``fn(*args)``, sub-jaxprs included."""
    out: set[str] = set()

    def walk(jaxpr):
        for e in jaxpr.eqns:
            out.add(e.primitive.name)
            for sub in jax.core.jaxprs_in_params(e.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return out


def test_activation_quantizers_with_a_unit_exponent_run_without_log_and_exp():
    model, v, x, s, dm = _mnist_deployed()
    assert s.learn_t and all(np.all(np.asarray(p.t) == 1.0) for p in s.act.values())
    assert dm.meta["options"]["exponent_free"] == sorted(s.act)
    assert not {"log", "exp"} & _primitives(dm._fn, dm.arrays, x)
    fwd = jaxjpq.compress_apply(model.apply)
    np.testing.assert_allclose(np.asarray(dm(x)), np.asarray(fwd(v, s, x)), rtol=0, atol=1e-5)
    # a learned exponent: at 8 bits the log / exp of the compressed forward, at that site only;
    # at 4 bits comparisons against the code thresholds
    key = sorted(s.act)[1]
    p = s.act[key].replace(t=s.act[key].t * 1.25)
    signed = deployment._signed_inputs(s)[key]
    for bits, form in ((8, "log_exp"), (4, "thresholds")):
        p = p.replace(d=step_from_bits(bits, p.q_m, p.t, signed))
        s2 = s.replace(act={**s.act, key: p})
        dm2 = jaxjpq.deploy(v, s2, warn_budget=False)
        assert dm2.meta["activation_forms"] == {k: form if k == key else "exponent_free"
                                                for k in s.act}
        assert ({"log", "exp"} <= _primitives(dm2._fn, dm2.arrays, x)) == (form == "log_exp")
        assert f"{form.replace('_', ' ')}: {key}" in dm2.report()
        np.testing.assert_allclose(np.asarray(dm2(x)), np.asarray(fwd(v, s2, x)), rtol=0,
                                   atol=1e-5)


@pytest.mark.parametrize("bits,form", [(None, "log_exp"), ((3, 4), "thresholds")])
def test_a_stack_with_one_learned_exponent_gives_all_its_layers_one_form(bits, form):
    m, v, x = build("scan")
    s = _random_state(m.apply, v, x, np.random.default_rng(7), acts=True)
    s = jaxjpq.calibrate(jaxjpq.compress_apply(m.apply), v, s, [x])
    stacked = [st for st in s.graph.sites if st.layer_axes and st.act_key in s.act]
    assert len({st.act_key for st in stacked}) > 1
    key = stacked[-1].act_key  # not the first layer's: that one names the stack in the scan
    s = s.replace(act={**s.act, key: s.act[key].replace(t=s.act[key].t * 1.25)})
    same_stack = sorted({st.act_key for st in stacked if st.weight == stacked[-1].weight})
    if bits is not None:  # the stack's layers at different widths: thresholds of two lengths
        signed = deployment._signed_inputs(s)
        act = dict(s.act)
        for i, k in enumerate(same_stack):
            p = act[k]
            act[k] = p.replace(d=step_from_bits(bits[i % 2], p.q_m, p.t, signed[k]))
        s = s.replace(act=act)
    forms = deployment.activation_forms(s)
    assert {k for k, f in forms.items() if f == "exponent_free"} == set(s.act) - set(same_stack)
    assert {forms[k] for k in same_stack} == {form}  # 8 bits: too many codes to compare
    dm = jaxjpq.deploy(v, s, warn_budget=False)
    ref = jaxjpq.compress_apply(m.apply)(v, s, x)
    sc = _scale(ref)
    chex.assert_trees_all_close(dm(x) / sc, ref / sc, atol=ATOL)


def test_storage_follows_the_bits_and_a_wide_site_stays_float():
    _, v, x, s, dm = _mnist_deployed()
    by_name = {lf.name: lf for lf in dm.leaves}
    for n in s.weight:
        lf = by_name["/".join(s.graph.site_map[n].weight)]
        b = float(np.max(cost.channel_bits(s, n)))
        want = "int4x2" if b <= 4 else "int8" if b <= 8 else "float32"
        assert lf.kind == want, (n, b, lf)
        if want == "float32":
            assert "above 8" in lf.why
        else:
            codes = dm.arrays[lf.name + ":codes"]
            assert codes.dtype == (jnp.uint8 if want == "int4x2" else jnp.int8)
    assert any(lf.kind == "float32" and "above 8" in lf.why for lf in dm.leaves)
    assert "resident bytes" in dm.report()


def test_resident_bytes_within_a_tenth_of_the_stored_codes_and_floats():
    _, v, x, s, dm = _mnist_deployed()
    r = dm.resident_bytes()
    stored = r["codes"] + r["float"]
    assert r["total"] <= 1.10 * stored
    dense = sum(int(np.asarray(a).nbytes) for a in jax.tree.leaves(v))
    assert r["total"] < dense / 2


def test_save_load_is_bit_exact_and_serves_without_jaxjpq(tmp_path):
    _, v, x, s, dm = _mnist_deployed()
    y = np.asarray(dm(x))
    d = tmp_path / "model"
    dm.save(d, x, batch_sizes=(1, 4))
    back = deployment.load(d, graph_of=s)
    for k, a in dm.arrays.items():
        np.testing.assert_array_equal(np.asarray(back.arrays[k]), np.asarray(a))
    np.testing.assert_array_equal(np.asarray(back(x)), y)
    np.testing.assert_array_equal(np.asarray(back(x[:1])), np.asarray(dm(x[:1])))
    with pytest.raises(ValueError, match="batch sizes \\[1, 4\\]"):
        back(x[:3])
    np.save(tmp_path / "x.npy", np.asarray(x))
    np.save(tmp_path / "y.npy", y)
    code = "\n".join([
        "import sys",
        "sys.modules['jaxjpq'] = None  # jaxjpq cannot be imported",
        "import numpy as np",
        f"x = np.load({str(tmp_path / 'x.npy')!r})",
        deployment.SERVE_SNIPPET.format(directory=d, n=4),
        f"assert np.array_equal(np.asarray(y), np.load({str(tmp_path / 'y.npy')!r}))",
        "print('served')",
    ])
    env = {k: val for k, val in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0 and "served" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("fault", ["array", "forward", "missing", "json"])
def test_corrupt_deployed_model_is_an_error_naming_what(tmp_path, fault):
    _, v, x, s, dm = _mnist_deployed()
    d = tmp_path / "model"
    dm.save(d, x, batch_sizes=(4,))
    if fault == "array":
        z = dict(np.load(d / "arrays.npz"))
        name = next(k for k in sorted(z) if k.endswith(":codes"))
        z[name] = z[name].copy()
        z[name].reshape(-1)[0] ^= 1
        np.savez(d / "arrays.npz", **z)
        match = f"array {name}"
    elif fault == "forward":
        p = d / "forward_b4.jaxexport"
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))
        match = "forward_b4.jaxexport does not match"
    elif fault == "missing":
        (d / "forward_b4.jaxexport").unlink()
        match = "forward_b4.jaxexport is missing"
    else:
        (d / "deployed.json").write_text("{")
        match = "deployed.json"
    with pytest.raises(CorruptExportError, match=match):
        deployment.load(d)


def test_deployed_model_refuses_another_graph_and_an_existing_directory(tmp_path):
    _, v, x, s, dm = _mnist_deployed()
    d = tmp_path / "model"
    dm.save(d, x)
    other = MnistCNN(features=(4, 8), hidden=16)
    ov = other.init(jax.random.key(0), x[:1])
    with pytest.raises(ValueError, match="another graph"):
        deployment.load(d, graph_of=jaxjpq.init(other.apply, ov, x[:1]))
    with pytest.raises(FileExistsError):
        dm.save(d, x)


def test_deploying_a_state_that_misses_its_budget_warns_with_the_figure():
    model = MnistCNN(features=(4, 8), hidden=16)
    x = jnp.ones((1, 28, 28, 1))
    v = model.init(jax.random.key(0), x)
    pair = jaxjpq.init(model.apply, v, x, bits=(4, 8), budget={"sparsity": 0.5})
    with pytest.warns(UserWarning, match="sparsity 0 against a budget of 0.5"):
        jaxjpq.deploy(pair)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxjpq.deploy(pair, warn_budget=False)
