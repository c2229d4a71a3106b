"""AJPQ: the environment, exact budgets on every policy, the compile-once episode, the agent."""

import functools

import archs
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxjpq
from jaxjpq import cost
from jaxjpq.methods import ajpq


@functools.cache
def _cnn():
    return archs.small_cnn(120, calib=32)


def test_env_walks_every_site_and_each_group_is_decided_once():
    _, _, g, _, _, st = _cnn()
    env = ajpq.make_env(st, size=0.3)
    assert env.sites == tuple(s.name for s in g.sites)
    assert list(env.learned) == [False, True, True, False]  # first / last layer frozen at 8
    assert not env.act_learned.any()  # a size budget does not search activation bits
    decided = env.group[env.group >= 0]
    assert len(decided) == len(set(decided)) == len(g.prunable_groups)
    assert env.features.min() >= 0 and env.features.max() <= 1
    assert ajpq.make_env(st, bops=0.05).act_learned.tolist() == [False, True, True, False]


def test_budget_below_the_smallest_reachable_is_an_error_naming_it():
    _, _, g, _, _, st = _cnn()
    with pytest.raises(ValueError, match=r"below the smallest reachable configuration \(\d"):
        ajpq.make_env(st, bops=1e-6)
    with pytest.raises(ValueError, match="exactly one budget"):
        ajpq.make_env(st)
    with pytest.raises(ValueError, match=r"fraction of the fp32 model \(\(0, 1\]\)"):
        ajpq.make_env(st, size=1.5)


def test_actions_map_to_bits_and_pruned_fractions():
    _, v, g, _, _, st = _cnn()
    env = ajpq.make_env(st, size=0.5)
    assert ajpq.action_bits(jnp.asarray([0.0, 0.5, 1.0]), (2, 8)).tolist() == [2.0, 5.0, 8.0]
    index = jaxjpq.units.unit_index(g, v)
    sal = jaxjpq.methods.core.magnitude(index, v["params"])
    a = np.zeros((4, 3), np.float32)
    a[:, 0] = 0.0  # lowest bits
    a[:, 2] = 1.0  # the most pruning an action can ask for
    out = ajpq.policy_state(st, env, jnp.asarray(a), sal, max_prune=0.5)
    assert cost.bits(out)["Conv_1"][0] == 2.0 and cost.bits(out)["Conv_0"][0] == 8.0
    for grp in g.prunable_groups:
        kept = np.asarray(out.masks[grp.id]) > 0.5
        assert kept.sum() == grp.size - grp.size // 2
        # the least salient units went
        s = np.asarray(index.split(sal)[grp.id])
        assert s[kept].min() >= s[~kept].max()


def test_the_channel_level_spreads_bits_by_importance_and_pruned_kernels_get_0_bits():
    model, v, g, x, y, _ = _cnn()
    st = jaxjpq.init_state(g, jaxjpq.CompressionSpec(bits=(2, 8), per_channel=True), v)
    st = jaxjpq.calibrate(jaxjpq.compress_apply(model.apply), v, st, [x[:32]])
    with pytest.raises(ValueError, match="per_channel=True"):
        ajpq.make_env(_cnn()[-1], size=0.5, hierarchy=True)
    env = ajpq.make_env(st, size=0.5, hierarchy=True)
    assert env.action_dim == 4 and ajpq.init_agent(env, jax.random.PRNGKey(0)).best_actions.shape \
        == (4, 4)
    index = jaxjpq.units.unit_index(g, v)
    sal = jaxjpq.methods.core.magnitude(index, v["params"])
    ranks = ajpq.kernel_ranks(st, v["params"])
    a = np.zeros((4, 4), np.float32)
    a[:, 0], a[:, 2], a[:, 3] = 0.5, 1.0, 1.0  # 5 bits, the most pruning, the widest spread
    out = ajpq.policy_state(st, env, jnp.asarray(a), sal, max_prune=0.5, ranks=ranks)
    w = np.asarray(v["params"]["Conv_1"]["kernel"])
    norm = np.sqrt((w ** 2).sum((0, 1, 2)))
    b = np.asarray(cost.channel_bits(out, "Conv_1"))
    grp = g.site_map["Conv_1"].out_group
    pruned = np.asarray(out.masks[grp]) < 0.5
    assert pruned.sum() == len(b) // 2 and (b[pruned] == 0).all()  # pruned kernels: 0 bits
    assert (b[~pruned] >= 2).all() and (b[~pruned] <= 8).all()
    # kept kernels: bits never fall as the kernel's norm grows, from 2 (the least) to 8 bits
    by_norm = b[np.argsort(norm)]
    assert (np.diff(by_norm[by_norm > 0]) >= 0).all()
    assert b[np.argmax(norm)] == 8.0
    np.testing.assert_array_equal(  # a₃ = 0: every kernel at the layer's bits
        np.asarray(cost.channel_bits(ajpq.policy_state(
            st, env, jnp.asarray(a * np.array([1, 1, 1, 0], np.float32)), sal, max_prune=0.5,
            ranks=ranks), "Conv_1"))[~pruned], 5.0)
    r = ajpq.search(model.apply, st, v, x, y, size=0.3, episodes=2, hierarchy=True,
                    hp=ajpq.Hyper(population=2, hidden=16, updates=2, batch=8, buffer=64,
                                  warmup=1), eval_batch=60, progress=False)
    assert r.actions.shape == (4, 4) and cost.relative_model_size(r.state) <= 0.3


@pytest.mark.parametrize("budget", [{"size": 0.25}, {"bops": 0.02}])
def test_every_policy_meets_the_budget_exactly(budget):
    model, v, g, x, y, st = _cnn()
    reserve = 8.0 * 2000 if "size" in budget else 0.0
    env = ajpq.make_env(st, reserve_bits=reserve, **budget)
    index = jaxjpq.units.unit_index(g, v)
    sal = jaxjpq.methods.core.magnitude(index, v["params"])
    rng = np.random.default_rng(1)
    acts = jnp.asarray(rng.random((6, 4, 3)), jnp.float32)
    acts = acts.at[0].set(1.0).at[0, :, 2].set(0.0)  # 8 bits, dense: over budget
    states, raw = jax.jit(jax.vmap(lambda a: ajpq.candidate(st, env, a, sal, v["params"])))(
        acts)
    assert float(raw[0]) > env.target  # enforcement had work to do
    for i in range(len(acts)):
        s = jax.tree.map(lambda leaf, i=i: leaf[i], states)
        if "size" in budget:
            assert cost.relative_model_size(s) + reserve / cost.fp32_model_bits(g) <= 0.25
        else:
            assert float(cost.relative_bops(s)) <= 0.02


def test_population_evaluation_equals_one_at_a_time_and_map_equals_vmap():
    model, v, g, x, y, st = _cnn()
    env = ajpq.make_env(st, size=0.3)
    acts = jnp.asarray(np.random.default_rng(2).random((3, 4, 3)), jnp.float32)
    raw = {m: ajpq.make_evaluator(model.apply, st, v, env, x, y, eval_batch=40, population=m)
           for m in ("map", "vmap")}
    assert 0.0 <= raw["map"].reference <= 1.0
    ev = {m: jax.jit(f) for m, f in raw.items()}
    batched = ev["map"](acts)
    for k, val in ev["vmap"](acts).items():
        np.testing.assert_allclose(val, batched[k], rtol=1e-6, atol=1e-6)
    for i in range(3):
        one = ev["map"](acts[i : i + 1])
        for k in one:
            np.testing.assert_allclose(one[k][0], batched[k][i], rtol=1e-6, atol=1e-6)


def test_the_episode_compiles_once():
    model, v, g, x, y, st = _cnn()
    env = ajpq.make_env(st, size=0.3)
    evaluate = ajpq.make_evaluator(model.apply, st, v, env, x, y, eval_batch=60)
    hp = ajpq.Hyper(population=3, hidden=16, updates=4, batch=8, buffer=64, warmup=1)
    step = jax.jit(chex.assert_max_traces(ajpq.make_episode(env, evaluate, (2, 8), hp), n=1))
    ag = ajpq.init_agent(env, jax.random.PRNGKey(0), hp)
    for e in range(4):  # random warm-up, then the actor; the buffer wraps around
        ag, m = step(ag, jax.random.PRNGKey(e))
    assert int(ag.count) == 4 * 3 * 4 and np.isfinite(float(ag.best_reward))
    r = ajpq.search(model.apply, st, v, x, y, size=0.3, episodes=3, hp=hp, eval_batch=60,
                    progress=False)
    assert r.compiles == 1 and r.evaluations == 9
    assert cost.relative_model_size(r.state) <= 0.3
    assert r.pair.model is v["params"] and r.pair.compression is r.state
    assert r.reward == pytest.approx(max(h["best_reward"] for h in r.history))


_TARGET = jnp.asarray([0.8, 0.3, 0.6])


def _toy_reward(actions):
    r = -jnp.mean(jnp.square(actions - _TARGET), axis=(1, 2))
    z = jnp.zeros_like(r)
    return {"reward": r, "accuracy": z, "figure": z, "policy_figure": z}


@functools.cache
def _toy_steps():
    """The jitted episodes (agent, random search) on a reward peaked at a known action."""
    state = _cnn()[-1]
    env = ajpq.make_env(state, size=0.3)
    hp = ajpq.Hyper(population=4, hidden=32, batch=32, warmup=2, sigma=0.3, sigma_decay=0.9)
    # the two episodes share one code object: chex counts their traces together, one each
    return env, hp, {rs: jax.jit(chex.assert_max_traces(
        ajpq.make_episode(env, _toy_reward, (2, 8), hp, random_search=rs), n=2))
        for rs in (False, True)}


@settings(max_examples=3)
@given(seed=st.integers(0, 2**16))
def test_the_best_policy_is_the_best_evaluated_and_random_search_does_not_learn(seed):
    """For any seed: the agent's best reward is the maximum over every policy it evaluated and
    its best actions score exactly that; random search leaves the actor and critic untouched."""
    env, hp, steps = _toy_steps()
    for rs, step in steps.items():
        ag = ajpq.init_agent(env, jax.random.PRNGKey(seed), hp)
        seen = -np.inf
        for e in range(6):
            before = (ag.actor, ag.critic)
            ag, m = step(ag, jax.random.PRNGKey(seed + 1 + e))
            seen = max(seen, float(np.max(m["reward"])))
            assert float(ag.best_reward) == seen
            if rs:
                chex.assert_trees_all_equal((ag.actor, ag.critic), before)
        again = _toy_reward(ag.best_actions[None])["reward"][0]
        np.testing.assert_allclose(float(again), float(ag.best_reward), rtol=1e-6)


def test_readme_example_runs():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    m = re.search(r"```python\n(from jaxjpq import ajpq.*?)```", text, re.S)
    assert m, "README has no AJPQ example"
    model, v, g, x, y, _ = _cnn()
    ns = {"jaxjpq": jaxjpq, "model": model, "graph": g, "trained": v, "x_calib": x[:32],
          "x_val": x[:100], "y_val": y[:100]}
    exec(compile(m.group(1), "README AJPQ example", "exec"), ns)
    assert cost.relative_model_size(ns["pair"].compression) <= 0.1
    assert ns["res"].evaluations == 320 and ns["res"].compiles == 1


_SHARDED = """
import sys
sys.path.insert(0, {tests!r})
import jax, jax.numpy as jnp, numpy as np
import archs
from jaxjpq.methods import ajpq
model, v, g, x, y, st = archs.small_cnn(80, calib=32)
env = ajpq.make_env(st, size=0.3)
acts = jnp.asarray(np.random.default_rng(2).random((4, 4, 3)), jnp.float32)
out = {{m: jax.jit(ajpq.make_evaluator(model.apply, st, v, env, x, y, eval_batch=40,
                                      population=m))(acts) for m in ("auto", "map")}}
assert len(jax.devices()) == 4
assert len(out["auto"]["reward"].sharding.device_set) == 4
for k in out["map"]:
    np.testing.assert_allclose(out["auto"][k], out["map"][k], rtol=1e-6, atol=1e-6)
print("OK")
"""


def test_the_population_is_split_over_the_devices():
    from devices import TESTS, run_on_devices

    assert "OK" in run_on_devices(_SHARDED.format(tests=TESTS), 4).stdout
