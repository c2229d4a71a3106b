"""Tests for the VIB gates and the DJPQ transform."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import interrupted_and_full, random_source, small_cnn

from jaxjpq import cost, export, gates, slim
from jaxjpq.compress import compress_apply
from jaxjpq.methods import djpq
from jaxjpq.quant import params_bits
from jaxjpq.state import CompressionSpec, boolean_masks, init_state
from jaxjpq.trace import trace


def _setup(target=0.05, bits=(2.0, 8.0), pow2=False, gate_at="weights", per_channel=False):
    model, v, _, x = small_cnn()
    g = trace(model.apply, v, x)
    spec = CompressionSpec(bits=bits, budget={"bops": target}, power_of_two=pow2, init_bits=8.0,
                           per_channel=per_channel)
    cstate = djpq.init_state(g, spec, v, key=jax.random.key(0), log_sigma2=-3.0,
                             gate_at=gate_at)
    return model, v, g, x, spec, cstate


def _random_mu(c, seed=5):
    k = jax.random.key(seed)
    return c.replace(gates={
        gid: gates.Gate(mu=jax.random.uniform(jax.random.fold_in(k, i), gt.mu.shape, minval=0.2,
                                              maxval=1.5), log_sigma2=gt.log_sigma2)
        for i, (gid, gt) in enumerate(c.gates.items())
    })


def test_the_gate_multiplies_the_layer_output_after_quantization():
    import flax.linen as nn

    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(6)(x)
            return nn.Dense(3)(nn.relu(h))

    model = One()
    x = jax.random.normal(jax.random.key(0), (4, 5))
    v = model.init(jax.random.key(1), x)
    g = trace(model.apply, v, x)
    spec = CompressionSpec(bits=(2.0, 4.0), init_bits=3.0, skip=(), quantize_activations=False)
    c = djpq.init_state(g, spec, v, key=jax.random.key(0), gate_at="output")
    (gid,) = c.gates
    mu = jnp.linspace(0.3, 1.7, 6)
    c = c.replace(gates={gid: gates.Gate(mu=mu, log_sigma2=c.gates[gid].log_sigma2)})
    # The first layer's output, quantized weights then gate: z ⊙ (x Q(W) + b).
    from jaxjpq.compress import quantize_weights
    qv = quantize_weights(v, c)["params"]
    hidden = mu * (x @ qv["Dense_0"]["kernel"] + qv["Dense_0"]["bias"])
    want = nn.relu(hidden) @ qv["Dense_1"]["kernel"] + qv["Dense_1"]["bias"]
    got = compress_apply(model.apply)(v, c, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # "weights" gates before quantization: a different function of μ.
    before = compress_apply(model.apply)(v, c.replace(gate_at="weights"), x)
    assert not np.allclose(before, want, atol=1e-4)


@pytest.mark.parametrize("gate_at,per_channel", [("output", True), ("weights", False)])
def test_folding_the_gates_keeps_the_forward(gate_at, per_channel):
    model, v, g, x, spec, c = _setup(gate_at=gate_at, per_channel=per_channel)
    c = _random_mu(c)
    fn = compress_apply(model.apply)
    y = fn(v, c, x)
    fv, fc = gates.fold_state(c, v)
    np.testing.assert_allclose(fn(fv, fc, x), y, rtol=1e-5, atol=1e-5)
    infer = export.inference_fn(export.pack(v, c), model.apply, g)
    np.testing.assert_allclose(infer(x), y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["mha_heads", "fused_heads"])
def test_output_gates_on_attention_heads_fold_exactly(arch):
    import archs

    model, v, x = archs.build(arch)
    g = trace(model.apply, v, x)
    spec = CompressionSpec(bits=(2.0, 8.0), init_bits=6.0, per_channel=True)
    c = _random_mu(djpq.init_state(g, spec, v, key=jax.random.key(0), gate_at="output"))
    fn = compress_apply(model.apply)
    fv, fc = gates.fold_state(c, v)
    np.testing.assert_allclose(fn(fv, fc, x), fn(v, c, x), rtol=1e-5, atol=1e-5)
    # per tensor inside a jitted step (djpq's fold): runs, and the gates end at 1
    pt = djpq.init_state(g, CompressionSpec(bits=(2.0, 8.0), init_bits=6.0), v,
                         key=jax.random.key(0), gate_at="output")
    _, folded = jax.jit(lambda st: gates.fold_state(st, v, strict=False))(_random_mu(pt))
    for gt in folded.gates.values():
        np.testing.assert_array_equal(gt.mu, 1.0)


def test_output_gates_over_a_per_tensor_quantizer_have_no_exact_fold():
    model, v, g, x, spec, c = _setup(gate_at="output", per_channel=False)
    with pytest.raises(ValueError, match="no exact folded form"):
        gates.fold_state(_random_mu(c), v)
    # Equal gates fold exactly (the quantizer's step takes the common factor).
    c_eq = c.replace(gates={gid: gates.Gate(mu=jnp.full_like(gt.mu, 0.7),
                                            log_sigma2=gt.log_sigma2)
                            for gid, gt in c.gates.items()})
    fn = compress_apply(model.apply)
    fv, fc = gates.fold_state(c_eq, v)
    np.testing.assert_allclose(fn(fv, fc, x), fn(v, c_eq, x), rtol=1e-5, atol=1e-5)


def test_gate_formulas():
    gate = gates.Gate(mu=jnp.array([1.0, 0.1, -0.5]), log_sigma2=jnp.array([-6.0, 0.0, 3.0]))
    sigma2 = jnp.exp(gate.log_sigma2)
    np.testing.assert_allclose(gates.kl(gate), 0.5 * jnp.log1p(gate.mu**2 / sigma2), rtol=1e-5)
    ratio = gate.log_sigma2 - jnp.log(gate.mu**2)
    np.testing.assert_allclose(gates.log_ratio(gate), ratio, rtol=1e-5)
    np.testing.assert_array_equal(gates.keep(gate), ratio <= 0.0)
    np.testing.assert_allclose(gates.keep_prob(gate), jax.nn.sigmoid(-ratio), rtol=1e-5)
    # A folded gate is exactly 1 even when sampled, with a finite KL.
    f = gates.folded({"g": gate})
    z = gates.values(f, jax.random.key(0))["g"]
    chex.assert_trees_all_equal(z, jnp.ones(3))
    assert np.isfinite(np.asarray(gates.kl(f["g"]))).all()


def test_deterministic_gates_equal_folded_weights():
    """The gated forward with z = μ equals the ungated forward of the folded weights, and the
    packed export (which folds the gates) reproduces it."""
    model, v, g, x, spec, c = _setup(gate_at="weights")
    k = jax.random.key(5)
    c = c.replace(gates={
        gid: gates.Gate(mu=jax.random.uniform(jax.random.fold_in(k, i), gt.mu.shape, minval=0.2,
                                              maxval=1.5), log_sigma2=gt.log_sigma2)
        for i, (gid, gt) in enumerate(c.gates.items())
    })
    fn = compress_apply(model.apply)
    y = fn(v, c, x)
    folded = gates.fold(g, v, c.gates)
    y_fold = fn(folded, c.replace(gates={}), x)
    np.testing.assert_allclose(y, y_fold, rtol=1e-5, atol=1e-5)
    # Sampling the gates changes the output; the same key gives the same sample.
    y1 = fn(v, c, x, gate_key=jax.random.key(1))
    assert not np.allclose(y1, y)
    chex.assert_trees_all_equal(y1, fn(v, c, x, gate_key=jax.random.key(1)))
    infer = export.inference_fn(export.pack(v, c), model.apply, g)
    np.testing.assert_allclose(infer(x), y, rtol=1e-4, atol=1e-4)


def test_soft_bops_use_gate_keep_probabilities():
    _, v, g, _, spec, c = _setup()
    exact = cost.relative_bops(c)
    soft = cost.relative_bops(c, soft=True)
    assert float(soft) < exact  # keep probabilities < 1 lower the soft cost
    grads = jax.grad(lambda cc: cost.relative_bops(cc, soft=True))(c)
    for gid in c.gates:
        assert float(jnp.min(grads.gates[gid].log_sigma2)) < 0.0  # more noise -> fewer BOPs
    # Exact costs ignore gates and depend on masks only.
    c_closed = c.replace(gates=gates.folded(c.gates))
    assert cost.relative_bops(c_closed) == exact


def _train(model, v, g, x, cstate, tx, steps):
    chex.clear_trace_counter()  # one step function per call; parametrized callers share a stack
    params = (v["params"], cstate)
    opt = tx.init(params)
    labels = jnp.arange(x.shape[0]) % 10
    fwd = compress_apply(model.apply)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, opt, key):
        def loss(pr):
            logits = fwd({"params": pr[0]}, pr[1], x, gate_key=key)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = jax.grad(loss)(params)
        upd, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, upd), opt

    for i in range(steps):
        params, opt = step(params, opt, jax.random.key(i))
    return params, opt


@pytest.mark.parametrize("pow2", [False, True])
def test_djpq_meets_bops_target_with_integer_bits(pow2):
    model, v, g, x, spec, c = _setup(target=0.015, pow2=pow2)
    steps = 20
    tx = djpq.djpq(optax.adam(1e-3), steps=steps, warmup=2, search_end=12)
    (p, cs), opt = _train(model, v, g, x, c, tx, steps)
    rel = cost.relative_bops(cs)
    assert rel <= 0.015 + 1e-9  # below the 2-bit floor (2.2 %): units must go
    np.testing.assert_allclose(float(opt.method.rel_bops), rel, rtol=1e-5)
    sm = g.site_map
    for kind, table in (("weight", cs.weight), ("act", cs.act)):
        for name, q in table.items():
            if name in cs.frozen:
                continue
            signed = True if kind == "weight" else sm[name].signed_input
            b = float(params_bits(q, signed))
            if pow2:
                assert min(abs(b - t) for t in (2, 4, 8)) < 1e-3, (name, b)
            else:
                assert 2 - 1e-4 <= b <= 8 + 1e-4 and abs(b - round(b)) < 1e-3, (name, b)
    # Gates folded to exactly 1 (the forward no longer depends on them), pruned units are zero,
    # and the exported model (pruned units removed) reproduces the compressed forward.
    for gt in cs.gates.values():
        chex.assert_trees_all_equal(gt.mu, jnp.ones_like(gt.mu))
    masks = boolean_masks(cs)
    assert sum(int((~m).sum()) for m in masks.values()) > 0
    fwd = compress_apply(model.apply)
    y = fwd({"params": p}, cs, x)
    chex.assert_trees_all_equal(y, fwd({"params": p}, cs.replace(gates={}), x))
    packed = export.pack({"params": p}, cs)
    assert g.param_count(masks) < g.param_count()
    slim_fn, slim_vars = slim({"params": p}, masks, graph=g)
    np.testing.assert_allclose(slim_fn(slim_vars, x), model.apply({"params": p}, x), rtol=1e-4,
                               atol=1e-5)  # pruned producers are exactly zero in p
    np.testing.assert_allclose(export.inference_fn(packed, model.apply, g)(x), y, rtol=1e-4,
                               atol=1e-4)


def test_djpq_rejects_bad_input():
    model, v, g, x, spec, c = _setup()
    with pytest.raises(ValueError, match="BOPs target"):
        djpq.djpq(optax.sgd(0.1), steps=10).init(
            (v["params"], c.replace(spec=CompressionSpec(learn_t=False))))
    with pytest.raises(ValueError, match="BOPs target"):
        djpq.djpq(optax.sgd(0.1), steps=10, target_bops=2.0)
    tx = djpq.djpq(optax.sgd(0.1), steps=10)
    with pytest.raises(ValueError, match="VIB gates"):
        tx.init((v["params"], init_state(g, CompressionSpec(learn_t=False), v)))
    with pytest.raises(ValueError, match="t = 1"):
        tx.init((v["params"], c.replace(learn_t=True)))
    with pytest.raises(ValueError, match="search_end"):
        djpq.djpq(optax.sgd(0.1), steps=10, search_end=10)
    first, second = list(c.gates)[:2]  # sizes 4 and 8
    wrong = dict(c.gates, **{first: c.gates[second]})
    with pytest.raises(ValueError, match="gate for group"):
        tx.init((v["params"], c.replace(gates=wrong)))


def test_djpq_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    """Gates, Adam state and γ₂ go through orbax: a run interrupted before the fold step and
    resumed ends with the same masks, bits and weights as an uninterrupted one."""
    from jaxjpq import train
    from jaxjpq.train import CompressedForward

    steps = 12

    def fresh():
        model, v, g, _, spec, c = _setup(target=0.015)
        tx = djpq.djpq(optax.adam(1e-3), steps=steps, warmup=1, search_end=8)
        return train.create_train_state(CompressedForward(model.apply),
                                        {"params": (v["params"], c)}, tx)

    full, _, resumed = interrupted_and_full(fresh, random_source(32), 8, steps, 5,
                                            tmp_path / "ckpt")
    want = float(full.opt_state.method.gamma2)
    assert float(resumed.opt_state.method.gamma2) == pytest.approx(want)


def test_unreachable_bops_target_is_an_error_before_training():
    model, v, g, x, spec, c = _setup(target=1e-6)
    tx = djpq.djpq(optax.sgd(0.1), steps=10)
    with pytest.raises(ValueError, match=r"smallest reachable relative BOPs \d"):
        tx.init((v["params"], c))
