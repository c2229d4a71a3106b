"""Tests for the GETA (QASSO) optax transform and the unit index it rests on."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import geta_setup, interrupted_and_full, random_source, run_steps, small_cnn

from jaxjpq.methods.core import fixed_bits_step, select_units
from jaxjpq.methods.core import period_counts as prune_counts
from jaxjpq.methods.geta import _sgd_projected, geta, make_schedule
from jaxjpq.quant import QuantParams, params_bits, step_from_bits
from jaxjpq.state import CompressionSpec, init_state
from jaxjpq.units import unit_broadcast, unit_index, unit_sum


def test_unit_sum_and_broadcast_round_trip():
    _, v, g, _ = small_cnn()
    index = unit_index(g, v)
    assert index.num_units == sum(grp.size for grp in g.prunable_groups)
    # Summing ones counts each unit's parameter entries: kernel column + bias entry.
    counts = unit_sum(index, jnp.ones_like, v["params"])
    k0 = v["params"]["Conv_0"]["kernel"]
    np.testing.assert_array_equal(counts[:4], np.prod(k0.shape[:-1]) + 1)
    vals = jnp.arange(index.num_units, dtype=jnp.float32) + 1.0
    spread = unit_broadcast(index, vals, v["params"])
    back = unit_sum(index, lambda s, x: s * jnp.ones_like(x), spread, v["params"])
    np.testing.assert_allclose(back, vals * counts)
    # Leaves of no unit get the fill value.
    assert float(spread["Dense_1"]["kernel"].max()) == 0.0


def test_schedule_stages_and_errors():
    sched = make_schedule(100)
    stages = [sched.stage(s) for s in range(100)]
    assert stages[0] == "warmup" and stages[-1] == "cooldown"
    assert stages.index("projection") == sched.warmup
    assert stages.index("joint") == sched.projection_end
    assert stages.index("cooldown") == sched.joint_end
    with pytest.raises(ValueError, match="steps"):
        make_schedule(10, warmup=8, joint_periods=5, period_steps=2)
    short = make_schedule(2000, fractions=(0.1, 0.1, 0.2))
    assert (short.warmup, short.projection_end, short.joint_end) == (200, 400, 800)
    with pytest.raises(ValueError, match="fractions"):
        make_schedule(100, fractions=(0.5, 0.3, 0.3))


def test_prune_counts_spread_evenly_and_capped():
    _, v, g, _ = small_cnn()
    index = unit_index(g, v)
    c = prune_counts(index, 0.5, 4)
    assert c.sum() == round(0.5 * index.num_units) and c.max() - c.min() <= 1
    with pytest.raises(ValueError, match="keeps one unit"):
        prune_counts(index, 0.99, 4)


def test_select_units_respects_pruned_and_keeps_one_per_group():
    _, v, g, _ = small_cnn()
    index = unit_index(g, v)
    u = index.num_units
    imp = jax.random.uniform(jax.random.key(3), (u,))
    pruned = jnp.zeros((u,), bool).at[:3].set(True)  # 3 of Conv_0's 4 units
    sel = select_units(index, imp, pruned, jnp.asarray(u))
    assert not bool(jnp.any(sel & pruned))
    for j in range(index.num_groups):
        lo, hi = index.offsets[j], index.offsets[j + 1]
        assert not bool(jnp.all(sel[lo:hi] | pruned[lo:hi])), "a group lost every unit"
    sel5 = select_units(index, imp, pruned, jnp.asarray(5))
    assert int(sel5.sum()) == 5
    live = np.asarray(~pruned)
    chosen = np.asarray(imp)[np.asarray(sel5)]
    assert chosen.max() <= np.sort(np.asarray(imp)[live])[6]


def test_geta_meets_sparsity_exactly_and_bits_in_range():
    model, v, g, x, spec, cstate = geta_setup()
    steps = 40
    tx = geta(optax.sgd(0.05, momentum=0.9), steps=steps)
    params, cs, opt_state, _ = run_steps(model, v, g, x, spec, cstate, steps, tx)
    index = unit_index(g, v)
    masks = index.flat_masks(cs.masks)
    assert int((masks < 0.5).sum()) == round(0.5 * index.num_units)
    # Pruned units are exactly zero in the params.
    zero = unit_broadcast(index, (masks < 0.5).astype(jnp.float32), params)
    for leaf, z in zip(jax.tree.leaves(params), jax.tree.leaves(zero), strict=True):
        assert float(jnp.max(jnp.abs(jnp.where(z > 0.5, leaf, 0.0)))) == 0.0
    # After cool-down every learned quantizer sits at an integer bit width in [b_l, b_u].
    sm = g.site_map
    for name, p in cs.weight.items():
        b = np.asarray(params_bits(p, True))
        if name in cs.frozen:
            np.testing.assert_allclose(b, 8.0, rtol=1e-5)
            continue
        assert np.all(b >= 2.0 - 1e-4) and np.all(b <= 4.0 + 1e-4), (name, b)
        np.testing.assert_allclose(b, np.round(b), atol=1e-4)
    for name, p in cs.act.items():
        if name not in cs.frozen:
            b = np.asarray(params_bits(p, sm[name].signed_input))
            assert np.all(b >= 2.0 - 1e-4) and np.all(b <= 4.0 + 1e-4), (name, b)
    assert int(opt_state.method.step) == steps


def test_forget_rate_drives_redundant_units_to_zero_within_a_period():
    model, v, g, x, spec, cstate = geta_setup(sparsity=0.25)
    sched = make_schedule(12, warmup=0, projection_periods=1, projection_steps=1,
                          joint_periods=1, period_steps=8)
    # No gradient step: only the forget-rate shrink moves the redundant units.
    tx = geta(optax.sgd(0.0), steps=12, schedule=sched, quant_lr=0.0, joint_rule="plain")
    _, _, _, hist = run_steps(model, v, g, x, spec, cstate, 12, tx)
    index = unit_index(g, v)
    # Redundant set chosen at the joint start; its unit norms shrink every step to exactly 0.
    norms = []
    for params, _ in hist[sched.projection_end:sched.joint_end]:
        norms.append(np.sqrt(np.asarray(unit_sum(index, lambda a: a * a, params))))
    final_masks = np.asarray(index.flat_masks(hist[-1][1].masks))
    red = final_masks < 0.5
    assert red.sum() == round(0.25 * index.num_units)
    seq = np.stack([n[red] for n in norms])
    assert np.all(np.diff(seq, axis=0) <= 1e-6)
    assert np.all(seq[-1] == 0.0) and np.all(seq[0] > 0.0)


def test_geta_composes_with_chain_and_inject_hyperparams():
    model, v, g, x, spec, cstate = geta_setup()
    steps = 20
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(geta, static_args=("steps", "unit_multiple"))(
            optax.sgd(0.05), steps=steps, quant_lr=1e-3
        ),
    )
    params, cs, opt_state, _ = run_steps(model, v, g, x, spec, cstate, steps, tx)
    assert np.isfinite(np.asarray(jax.tree.leaves(params)[0])).all()
    assert float(opt_state[1].hyperparams["quant_lr"]) == pytest.approx(1e-3)


def test_overshooting_clip_step_keeps_q_m_on_its_scale():
    # Regression: a q_m step with quant_lr * g >= q_m (the per-tensor gradient of a large layer
    # sums over all its weights) used to hit an absolute 1e-8 floor; the collapsed clip then made
    # the quantizer params diverge (NaN on the paper-scale VGG-7 / ResNet-50 configs).
    p = QuantParams(d=step_from_bits(4.0, 0.05), q_m=jnp.float32(0.05), t=jnp.float32(1.0))
    lr = 1e-3
    grads = {"big": QuantParams(d=0.0, q_m=10.0 * 0.05 / lr, t=0.0),  # SGD would give -9 q_m
             "small": QuantParams(d=0.0, q_m=0.1 * 0.05 / lr, t=0.0)}
    out = _sgd_projected({"big": p, "small": p}, grads, {"big": True, "small": True}, (),
                         jnp.float32(lr), 2.0, jnp.float32(8.0))
    new = out["big"]
    upd = {"small": jax.tree.map(lambda a, b: a - b, out["small"], p)}
    np.testing.assert_allclose(new.q_m, 0.025, rtol=1e-6)  # stops at half its value, stays > 0
    b = float(params_bits(new))
    assert 2.0 - 1e-4 <= b <= 8.0 + 1e-4 and float(new.d) > 0
    # An ordinary step is plain SGD.
    np.testing.assert_allclose(p.q_m + upd["small"].q_m, 0.045, rtol=1e-6)


@pytest.mark.parametrize("cooldown_clips", [False, True])
def test_cooldown_keeps_rounded_bits_and_trains_clips_only_when_asked(cooldown_clips):
    p = QuantParams(d=step_from_bits(3.2, 0.5), q_m=jnp.float32(0.5), t=jnp.float32(1.0))
    grads = {"w": QuantParams(d=jnp.float32(1.0), q_m=jnp.float32(20.0), t=jnp.float32(0.0))}
    new = fixed_bits_step({"w": p}, grads, {"w": True}, (), lr=jnp.float32(1e-3), b_lo=2.0,
                          b_hi=4.0, train_clips=cooldown_clips, train_t=True)["w"]
    np.testing.assert_allclose(params_bits(new), 3.0, atol=1e-5)  # round(3.2), then fixed
    np.testing.assert_allclose(new.q_m, 0.48 if cooldown_clips else 0.5, rtol=1e-6)


def test_geta_rejects_bad_input():
    _, v, g, _, spec, cstate = geta_setup()
    with pytest.raises(ValueError, match="sparsity"):
        geta(optax.sgd(0.1), steps=10).init((v["params"], init_state(g, CompressionSpec(), v)))
    tx = geta(optax.sgd(0.1), steps=40)
    state = tx.init((v["params"], cstate))
    with pytest.raises(ValueError, match="params"):
        tx.update((v["params"], cstate), state)


def test_geta_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    from jaxjpq import train
    from jaxjpq.cost import metrics as compression_metrics
    from jaxjpq.train import CompressedForward

    steps = 24

    def make_state():
        model, v, g, _, spec, cstate = geta_setup()
        tx = geta(optax.adam(1e-3), steps=steps)
        return train.create_train_state(CompressedForward(model.apply),
                                        {"params": (v["params"], cstate)}, tx)

    # Interrupted at step 10 (checkpoint at 10), then resumed from the checkpoint in a new state.
    _, summary, _ = interrupted_and_full(
        make_state, random_source(64), 16, steps, 10, tmp_path / "ckpt",
        metrics_fn=lambda s: compression_metrics(s.params[1]), log_every=8,
    )
    assert summary["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert 0.0 < summary["rel_bops"] < 1.0


def test_unit_costs_rank_groups_by_their_macs():
    from jaxjpq.methods.geta import unit_costs

    _, v, g, _ = small_cnn()
    index = unit_index(g, v)
    cost = unit_costs(g, index)
    assert cost.shape == (index.num_units,) and cost.mean() == pytest.approx(1.0)
    per_group = [cost[index.offsets[j]] for j in range(index.num_groups)]
    macs = {s.name: s.macs_per_example for s in g.sites}
    # Conv_0's unit owns 1/4 of Conv_0 and of Conv_1's MACs; Dense_0's 1/16 of Dense_0 and Dense_1.
    want = [(macs["Conv_0"] + macs["Conv_1"]) / 4, (macs["Conv_1"] + macs["Dense_0"]) / 8,
            (macs["Dense_0"] + macs["Dense_1"]) / 16]
    np.testing.assert_allclose(np.array(per_group) / per_group[0], np.array(want) / want[0])
    # Equal saliency: dividing by cost picks the costliest units first.
    imp = jnp.ones(index.num_units) / jnp.asarray(cost)
    sel = np.asarray(select_units(index, imp, jnp.zeros(index.num_units, bool), jnp.asarray(3)))
    assert sel[: index.offsets[1]].sum() == 3  # all from Conv_0, the costliest group


def test_per_group_allocation_prunes_every_group_by_the_same_fraction():
    from jaxjpq.methods.core import group_period_counts, per_group_counts, select_per_group

    model, v, g, x, spec, cstate = geta_setup()
    index = unit_index(g, v)
    gc = group_period_counts(index, 0.5, 5)
    np.testing.assert_array_equal(gc.sum(axis=0), per_group_counts(index, 0.5))
    imp = jax.random.uniform(jax.random.key(1), (index.num_units,))
    pruned = jnp.zeros(index.num_units, bool).at[0].set(True)
    sel = np.asarray(select_per_group(index, imp, pruned, jnp.asarray([1, 2, 3])))
    assert not sel[0]
    for j, n in enumerate([1, 2, 3]):
        lo, hi = index.offsets[j], index.offsets[j + 1]
        assert sel[lo:hi].sum() == n
        live = ~np.asarray(pruned[lo:hi])
        chosen = np.asarray(imp[lo:hi])[sel[lo:hi]]
        assert chosen.max() <= np.sort(np.asarray(imp[lo:hi])[live])[n - 1]
    steps = 40
    tx = geta(optax.sgd(0.05, momentum=0.9), steps=steps, allocation="per_group")
    _, cs, _, _ = run_steps(model, v, g, x, spec, cstate, steps, tx)
    kept = {k: int((m > 0.5).sum()) for k, m in cs.masks.items()}
    assert list(kept.values()) == [2, 4, 8]  # half of 4, 8, 16


def test_a_geta_run_cut_short_by_multisteps_warns_with_the_sparsity_it_reached():
    import warnings

    from jaxjpq import cost, data, train
    from jaxjpq.train import CompressedForward

    model, v, g, _, spec, cstate = geta_setup(sparsity=0.5)
    src, steps = random_source(64), 12

    def run(tx):
        st = train.create_train_state(CompressedForward(model.apply),
                                      {"params": (v["params"], cstate)}, tx)
        return train.train(st, data.batch_stream(src, 16, seed=0), steps, progress=False)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the whole schedule meets the target: no warning
        whole = run(geta(optax.adam(1e-3), steps=steps))
    units = sum(grp.size for grp in g.prunable_groups)
    assert abs(float(cost.sparsity(whole.params[1])) - 0.5) <= 0.5 / units
    with pytest.warns(UserWarning, match=r"after 12 steps the compression state misses its "
                                         r"budget: sparsity 0\.\d+ against a budget of 0\.5\..*"
                                         r"MultiSteps"):
        run(optax.MultiSteps(geta(optax.adam(1e-3), steps=steps), every_k_schedule=2))


# --- the reference implementation's rules, each by itself ---------------------------------------


def _tree_like(params, fn):
    return jax.tree.map(fn, params)


def test_joint_gamma_d_lowers_d_to_the_fewest_bits_when_the_residual_agrees_with_the_gradient():
    from jaxjpq.methods.geta import joint_gamma_d

    _, v, g, _ = small_cnn()
    index = unit_index(g, v)
    p = v["params"]
    red = jnp.zeros(index.num_units, bool).at[jnp.array([0, 5])].set(True)  # groups 0 and 1
    res = _tree_like(p, lambda x: 0.3 * jnp.sign(x))
    d_lo, d_hi = jnp.full((3,), 0.01), jnp.full((3,), 0.2)
    k, period = jnp.asarray(2, jnp.int32), 8
    # u = -lr·∇f, ∇f = x_c + r with r ∝ sign(x_c): both cosines are positive.
    grad = jax.tree.map(lambda x, r: x + r, p, res)
    upd = _tree_like(grad, lambda a: -0.01 * a)
    gamma, d = joint_gamma_d(index, p, res, upd, red, k, period, (d_lo, d_hi))
    np.testing.assert_allclose(d[:2], 0.2)  # d(b_l)
    np.testing.assert_allclose(gamma[:2], 1.0 / (period - 2), rtol=1e-6)
    # No redundant unit in group 2: nothing to forget.
    assert float(gamma[2]) == 0.0 and float(d[2]) == np.float32(0.2)


def test_joint_gamma_d_is_descent_safe_when_the_gradient_opposes_the_weights():
    from jaxjpq.methods.geta import joint_gamma_d

    _, v, g, _ = small_cnn()
    index = unit_index(g, v)
    p = v["params"]
    red = jnp.zeros(index.num_units, bool).at[0].set(True)  # one unit of group 0
    res = _tree_like(p, lambda x: 0.3 * jnp.sign(x))
    lr = 0.01
    # ∇f = -x_c (cos_x = -1) and the residual r = 0.3 sign(x_c) (cos_r < 0).
    upd = _tree_like(p, lambda x: lr * x)
    d_lo, d_hi = jnp.full((3,), 1e-6), jnp.full((3,), 1e4)
    gamma, d = joint_gamma_d(index, p, res, upd, red, jnp.asarray(0, jnp.int32), 4,
                             (d_lo, d_hi))
    sq = lambda t: float(unit_sum(index, lambda a: a * a, t)[0])  # noqa: E731
    n_x, n_r, n_u = np.sqrt(sq(p)), np.sqrt(sq(res)), np.sqrt(sq(upd))
    cos_r = -float(unit_sum(index, lambda a, b: a * b, res, upd)[0]) / (n_r * n_u)
    assert cos_r < 0
    want_gamma = (1 - 0.999) * n_u / n_x  # -(1-η)‖u‖ / (cos_x ‖x‖), cos_x = -1
    np.testing.assert_allclose(gamma[0], want_gamma, rtol=1e-5)
    np.testing.assert_allclose(d[0], -0.9 * 0.999 * n_u / (want_gamma * cos_r * n_r), rtol=1e-5)
    # A d below d(b_u) scales γ and d by 0.8 and 1/0.8 until it is not.
    gamma2, d2 = joint_gamma_d(index, p, res, upd, red, jnp.asarray(0, jnp.int32), 4,
                               (jnp.full((3,), float(d[0]) * 2.0), d_hi))
    np.testing.assert_allclose(d2[0], float(d[0]) / 0.8**4, rtol=1e-5)  # 1.25^4 > 2 > 1.25^3
    np.testing.assert_allclose(gamma2[0], want_gamma * 0.8**4, rtol=1e-5)


def test_reference_saliency_is_cos_plus_one_normalised_by_its_l2_norm():
    from jaxjpq.methods.geta import reference_saliency

    _, v, g, _ = small_cnn()
    index = unit_index(g, v)
    p = v["params"]
    grads = _tree_like(p, lambda x: jnp.cos(7.0 * x))
    live = jnp.ones(index.num_units, bool).at[3].set(False)
    got = reference_saliency(index, p, grads, live, (0.0, 0.0, 1.0, 0.0, 0.0))
    x2 = np.asarray(unit_sum(index, lambda a: a * a, p))
    g2 = np.asarray(unit_sum(index, lambda a: a * a, grads))
    gx = np.asarray(unit_sum(index, lambda a, b: a * b, grads, p))
    cos1 = gx / (np.sqrt(x2) + 1e-8) / (np.sqrt(g2) + 1e-8) + 1.0
    norm = np.sqrt(np.sum(np.where(np.asarray(live), cos1**2, 0.0)))
    np.testing.assert_allclose(got, cos1 / norm, rtol=1e-5)


def test_projection_keeps_the_start_bits_in_its_first_period():
    model, v, g, x, spec, cstate = geta_setup()
    sched = make_schedule(12, warmup=0, projection_periods=2, projection_steps=2,
                          joint_periods=1, period_steps=2)
    tx = geta(optax.sgd(0.0), steps=12, schedule=sched, quant_lr=0.0, bit_reduction=3.0)
    _, _, _, hist = run_steps(model, v, g, x, spec, cstate, 4, tx)
    start = float(cstate.spec.init_bits)
    for step, upper in [(1, start), (3, start - 3.0)]:
        cs = hist[step][1]
        b = max(float(np.max(params_bits(p, True))) for n, p in cs.weight.items()
                if n not in cs.frozen)
        np.testing.assert_allclose(b, upper, rtol=1e-5)


@pytest.mark.parametrize("joint_rule,saliency_rule", [("reference", "reference"),
                                                      ("plain", "reference")])
def test_reference_rules_meet_sparsity_with_bits_in_range(joint_rule, saliency_rule):
    chex.clear_trace_counter()  # run_steps' step function is one per call
    model, v, g, x, spec, cstate = geta_setup()
    steps = 40
    tx = geta(optax.sgd(0.05, momentum=0.9), steps=steps, joint_rule=joint_rule,
              saliency_rule=saliency_rule, project_activations=False, cooldown_clips=True)
    params, cs, _, _ = run_steps(model, v, g, x, spec, cstate, steps, tx)
    index = unit_index(g, v)
    assert int((index.flat_masks(cs.masks) < 0.5).sum()) == round(0.5 * index.num_units)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves((params, cs)))
    sm = g.site_map
    for table, signed in ((cs.weight, lambda n: True), (cs.act, lambda n: sm[n].signed_input)):
        for name, p in table.items():
            if name not in cs.frozen:
                b = np.asarray(params_bits(p, signed(name)))
                assert np.all(b >= 2.0 - 1e-4) and np.all(b <= 4.0 + 1e-4), (name, b)
                np.testing.assert_allclose(b, np.round(b), atol=1e-4)


def test_geta_rejects_unknown_rules():
    with pytest.raises(ValueError, match="joint_rule"):
        geta(optax.sgd(0.1), steps=10, joint_rule="paper")
    with pytest.raises(ValueError, match="saliency_rule"):
        geta(optax.sgd(0.1), steps=10, saliency_rule="cos")


def test_the_reference_joint_step_sets_a_redundant_groups_step_to_the_fewest_bits():
    chex.clear_trace_counter()
    model, v, g, x, spec, cstate = geta_setup(sparsity=0.25)
    sched = make_schedule(6, warmup=0, projection_periods=1, projection_steps=1,
                          joint_periods=1, period_steps=4)
    # no weight step: cos(r, ∇) is undefined, γ = 0, so d = d(b_l) (the reference's safeguard)
    tx = geta(optax.sgd(0.0), steps=6, schedule=sched, joint_rule="reference")
    _, _, opt, hist = run_steps(model, v, g, x, spec, cstate, 2, tx)
    index = unit_index(g, v)
    red = np.asarray(opt.method.redundant)
    cs = hist[1][1]  # after the first joint step
    touched = 0
    for s in g.sites:
        if s.name in cs.frozen or s.name not in cs.weight:
            continue
        j = index.group_ids.index(s.out_group)
        b = float(np.max(params_bits(cs.weight[s.name], True)))
        if red[index.offsets[j]:index.offsets[j + 1]].any():
            np.testing.assert_allclose(b, 2.0, atol=1e-4)
            touched += 1
        else:
            assert b > 2.0 + 1e-3
    assert touched >= 1


def test_the_safe_forget_rate_never_exceeds_the_plain_one():
    from jaxjpq.methods.geta import joint_gamma_d

    _, v, g, _ = small_cnn()
    index = unit_index(g, v)
    p = v["params"]
    red = jnp.zeros(index.num_units, bool).at[0].set(True)
    # ∇f nearly orthogonal to x_c on the unit, slightly against it: the reference's rate blows up
    noise = jax.tree.map(lambda x: jnp.cos(11.0 * x + 1.0), p)
    dot = lambda a, b: float(unit_sum(index, lambda u, w: u * w, a, b)[0])  # noqa: E731
    c = dot(noise, p) / dot(p, p)
    upd = jax.tree.map(lambda x, n: (n - c * x) + 1e-6 * x, p, noise)  # u · x_c > 0
    assert dot(upd, p) > 0
    gamma, _ = joint_gamma_d(index, p, jax.tree.map(jnp.zeros_like, p), upd, red,
                             jnp.asarray(0, jnp.int32), 4, (jnp.zeros(3), jnp.ones(3)))
    assert 0.0 < float(gamma[0]) <= 0.25 + 1e-7
