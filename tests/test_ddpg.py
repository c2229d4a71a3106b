"""The DDPG agent: Bellman targets from soft-updated target networks."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxjpq.methods import ddpg


def _toy(hp):
    L, F, A = 3, 2, 1

    def rollout(actor, key, sigma, random, population):
        s = jnp.broadcast_to(jnp.arange(L, dtype=jnp.float32)[None, :, None], (population, L, F))
        a = jax.vmap(lambda k, st: ddpg.explore(actor, st, k, sigma, random))(
            jax.random.split(key, population), s)
        return s, a

    def evaluate(actions):  # reward: the mean action of the walk
        return {"reward": jnp.mean(actions, axis=(1, 2))}

    agent = ddpg.init_agent(jax.random.key(0), F, A, L, ("reward",), hp)
    return agent, jax.jit(ddpg.make_episode(rollout, evaluate, hp))


def test_target_networks_track_the_online_ones_by_soft_updates():
    hp = ddpg.Hyper(population=4, hidden=8, updates=1, batch=4, buffer=32, warmup=0, tau=0.25)
    agent, episode = _toy(hp)
    new, _ = episode(agent, jax.random.key(1))
    # one update: target = tau · online + (1 − tau) · old target
    for t_new, online, t_old in zip(jax.tree.leaves(new.target_critic),
                                    jax.tree.leaves(new.critic),
                                    jax.tree.leaves(agent.target_critic), strict=True):
        np.testing.assert_allclose(t_new, 0.25 * online + 0.75 * t_old, rtol=1e-5, atol=1e-7)
    # the last step of every walk is terminal, the others point at the next state
    n = 4 * 3
    np.testing.assert_array_equal(np.asarray(new.buf_done[:n]).reshape(4, 3)[:, -1], 1.0)
    np.testing.assert_array_equal(np.asarray(new.buf_s2[:n]).reshape(4, 3, 2)[:, 0], 1.0)


def test_without_bellman_the_targets_stay_and_the_critic_fits_the_advantage():
    hp = ddpg.Hyper(population=4, hidden=8, updates=2, batch=4, buffer=32, warmup=0,
                    bellman=False)
    agent, episode = _toy(hp)
    new, _ = episode(agent, jax.random.key(1))
    for a, b in zip(jax.tree.leaves(new.target_critic), jax.tree.leaves(agent.target_critic),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(new.critic), jax.tree.leaves(agent.critic), strict=True))
