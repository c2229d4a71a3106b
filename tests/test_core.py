"""Tests for the method core: bits, QAT, budget enforcement, allocation, the pair skeleton."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import geta_setup, run_steps

import jaxjpq
from jaxjpq import cost
from jaxjpq.methods import core
from jaxjpq.quant import params_bits
from jaxjpq.state import CompressedParams, CompressionSpec
from jaxjpq.units import unit_index


def test_set_bits_is_exact_per_site_and_per_channel():
    model, v, g, x, spec, c = geta_setup()
    c2 = core.set_bits(c, "Conv_1", 3.0)
    np.testing.assert_allclose(params_bits(c2.weight["Conv_1"]), 3.0, rtol=1e-6)
    assert cost.bits(c2)["Conv_1"][0] == 3.0
    c3 = core.set_bits(c, "Conv_1", 5.0, kind="act")
    assert cost.bits(c3)["Conv_1"][1] == 5.0
    with pytest.raises(ValueError, match="per_channel"):
        core.set_bits(c, "Conv_1", np.full(8, 4.0))
    _, v, g, _ = geta_setup()[:4]
    pc = jaxjpq.init_state(g, CompressionSpec(per_channel=True), v)
    bits = np.asarray([0, 2, 4, 8, 2, 2, 4, 0], np.float32)
    pc = core.set_bits(pc, "Conv_1", bits)
    np.testing.assert_array_equal(cost.channel_bits(pc, "Conv_1"), bits)
    for bad in (1.0, 40.0, -1.0, np.asarray([0, 2, 4, 8, 2, 2, 4, 33], np.float32)):
        with pytest.raises(ValueError, match=r"outside \[2, 32\].*0 prunes"):
            core.set_bits(pc, "Conv_1", bad)
    # jit gives the same state
    pj = jax.jit(lambda s: core.set_bits(s, "Conv_1", bits))(
        jaxjpq.init_state(g, CompressionSpec(per_channel=True), v))
    chex.assert_trees_all_close(pj.weight_masks, pc.weight_masks)


@pytest.mark.parametrize("kind", ["bops", "size"])
def test_enforce_budget_meets_exact_budget_lowering_bits_first(kind):
    model, v, g, x, spec, c = geta_setup(bits=(2.0, 8.0))
    for n in [n for n in c.weight if n not in c.frozen]:
        c = core.set_bits(c, n, 8.0)
        c = core.set_bits(c, n, 8.0, kind="act")
    fig = cost.relative_bops if kind == "bops" else cost.relative_size
    start = fig(c)
    target = start * 0.6  # reachable by bits alone
    out = core.enforce_budget(c, **{kind: target}, params=v["params"])
    assert fig(out) <= target
    assert all(float(np.min(m)) == 1.0 for m in out.masks.values())  # no unit pruned
    floor = fig(core.enforce_budget(c, **{kind: 1e-9}, params=v["params"]))
    target = floor * 1.2  # below what bits alone reach: units must go
    out = jax.jit(lambda s, p: core.enforce_budget(s, **{kind: target}, params=p))(
        c, v["params"])
    assert fig(out) <= target
    assert core.within_budget(out, **{kind: target})
    for bad in (0.0, -1.0, 1.5):
        with pytest.raises(ValueError, match=rf"budget {kind}={bad} must be a fraction"):
            core.enforce_budget(c, **{kind: bad}, params=v["params"])
    assert any(float(np.min(m)) == 0.0 for m in out.masks.values())
    index = unit_index(g, v)
    m = np.asarray(index.flat_masks(out.masks))
    seg = index.group_of_unit
    assert all(m[seg == j].sum() >= 1 for j in range(index.num_groups))


def test_enforce_budget_prunes_in_unit_multiples():
    model, v, g, x, spec, c = geta_setup(bits=(2.0, 2.0))
    out = core.enforce_budget(c, bops=1e-9, params=v["params"], unit_multiple=2)
    for m in out.masks.values():
        assert int(np.sum(np.asarray(m) > 0.5)) % 2 == 0


def test_select_units_unit_multiple_keeps_multiples():
    _, v, g, _ = geta_setup()[:4]
    index = unit_index(g, v)
    imp = jnp.asarray(np.random.default_rng(0).random(index.num_units), jnp.float32)
    pruned = jnp.zeros(index.num_units, bool)
    sel = np.asarray(core.select_units(index, imp, pruned, jnp.asarray(7), unit_multiple=4))
    for j in range(index.num_groups):
        lo, hi = index.offsets[j], index.offsets[j + 1]
        assert (hi - lo - sel[lo:hi].sum()) % 4 == 0


def test_qat_holds_bits_masks_and_zeros():
    model, v, g, x, spec, c = geta_setup()
    for n in [n for n in c.weight if n not in c.frozen]:
        c = core.set_bits(c, n, 3.0)
        c = core.set_bits(c, n, 3.0, kind="act")
    masks = dict(c.masks)
    gid = sorted(masks)[0]
    masks[gid] = masks[gid].at[:2].set(0.0)
    c = c.replace(masks=masks)
    params, cs, _, _ = run_steps(model, v, g, x, spec, c, 6, jaxjpq.qat(optax.adam(1e-2)))
    for n in [n for n in cs.weight if n not in cs.frozen]:
        np.testing.assert_allclose(params_bits(cs.weight[n]), 3.0, atol=1e-4)
    chex.assert_trees_all_equal(cs.masks, c.masks)
    index = unit_index(g, v)
    zero = core.hold(index, jax.tree.map(jnp.ones_like, params), params,
                     index.flat_masks(cs.masks) < 0.5, cs)
    # pruned units are held at exactly zero: the held update of a zero entry is -0
    flat = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.where(a == -b, 0.0, 1.0), zero, params))
    assert any(float(jnp.min(f)) == 0.0 for f in flat)
    assert cost.relative_bops(cs) == cost.relative_bops(c)


def test_transform_chained_after_a_pair_method_is_refused():
    from jaxjpq import data, train
    from jaxjpq.train import CompressedForward

    model, v, g, x, spec, c = geta_setup()
    fwd = jaxjpq.compress_apply(model.apply)

    grad = jax.jit(jax.grad(lambda p: fwd({"params": p[0]}, p[1], x).sum()))

    def steps(tx, n):
        params = (v["params"], c)
        opt = tx.init(params)
        update = jax.jit(tx.update)
        for _ in range(n):
            upd, opt = update(grad(params), opt, params)
            params = optax.apply_updates(params, upd)
        return params, opt

    bad_tx = optax.chain(jaxjpq.geta(optax.sgd(0.01), steps=20), optax.scale(0.5))
    params, opt = steps(bad_tx, 3)
    assert bool(opt[0].tampered)  # flagged, and the updates turned NaN (loud, not corrupt)
    assert not np.isfinite(np.asarray(jax.tree.leaves(params[0])[0])).all()
    # before it, on the gradients, is fine
    params, opt = steps(optax.chain(optax.clip_by_global_norm(1.0),
                                    jaxjpq.geta(optax.sgd(0.01), steps=20)), 3)
    assert not bool(opt[1].tampered)
    assert np.isfinite(np.asarray(jax.tree.leaves(params[0])[0])).all()
    # the train loop names the cause
    rng = np.random.default_rng(0)
    src = data.ArraySource({"inputs": rng.random((16, *x.shape[1:])).astype(np.float32),
                            "labels": rng.integers(0, 10, 16).astype(np.int32)})
    st = train.create_train_state(CompressedForward(model.apply), {"params": (v["params"], c)},
                                  bad_tx)
    with pytest.raises(core.ChainedTransformError, match="chained after it"):
        train.train(st, data.batch_stream(src, 8), 5, progress=False)


def test_a_leaf_shrinking_by_orders_of_magnitude_is_not_a_chained_transform():
    # c + (c_new - c) rounds at the old value's scale: a step that collapses to its floor
    # in one update must not read as tampering.
    _, v, g, _, _, c = geta_setup()
    name = next(n for n in c.act if n not in c.frozen)

    def update(g_p, g_c, p, cs, st):
        q = cs.act[name]
        return (jax.tree.map(jnp.zeros_like, g_p),
                cs.replace(act={**cs.act, name: q.replace(d=q.d * 1e-7)}), st)

    tx = core.pair_transform("shrink", lambda p, cs: (), update)
    params = (v["params"], c)
    opt = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(3):
        upd, opt = jax.jit(tx.update)(zeros, opt, params)
        params = optax.apply_updates(params, upd)
        assert not bool(opt.tampered)


def test_init_returns_the_pair_and_apply_updates_keeps_it():
    model, v, g, x, spec, _ = geta_setup()
    pair = jaxjpq.init(g, v, spec=spec)
    assert isinstance(pair, CompressedParams) and pair.compression.spec == spec
    tx = jaxjpq.geta(optax.sgd(0.01), steps=20)
    fwd = jaxjpq.compress_apply(model.apply)
    grads = jax.grad(lambda p: fwd({"params": p.model}, p.compression, x).sum())(pair)
    upd, _ = tx.update(grads, tx.init(pair), pair)
    new = optax.apply_updates(pair, upd)
    assert isinstance(new, CompressedParams)
    with pytest.raises(ValueError, match="'params' collection"):
        jaxjpq.init(g, v["params"], spec=spec)
