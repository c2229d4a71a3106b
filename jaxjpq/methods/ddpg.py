"""A small DDPG-style agent for episodic searches with one terminal reward per episode.

An episode rolls out ``population`` walks of ``L`` steps (the caller's ``rollout``), scores each
walk's actions at once (the caller's ``evaluate``), keeps the best, stores every step's
transition ``(s, a, R − b, s', done)`` (``R − b`` the episode's advantage, ``b`` a moving average
of the rewards, shared by the episode's steps as in HAQ / AMC) in a replay buffer, and takes
gradient steps of a deterministic actor and a critic (two hidden layers each). With
``Hyper.bellman`` (default) the critic regresses the Bellman target
``y = (R − b) + γ (1 − done) Q'(s', μ'(s'))`` of slowly tracking target networks ``Q'``, ``μ'``
(soft updates, rate ``tau``); without, it regresses the advantage directly. Exploration is
truncated-normal noise whose scale decays per episode, after ``warmup`` episodes of uniform
random actions. Everything is a pytree; an episode is one pure
function to ``jit`` once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class Hyper(NamedTuple):
    """Agent settings.

    Attributes:
      population: walks rolled out and scored per episode.
      hidden: width of the actor's and critic's two hidden layers.
      actor_lr, critic_lr: Adam step sizes.
      sigma, sigma_decay, sigma_min: exploration scale at episode 0, its factor per episode, its
        floor.
      warmup: episodes of uniform random actions before the actor acts.
      updates: gradient steps per episode; batch: transitions per step.
      buffer: replay capacity in transitions; baseline_decay: moving average of the rewards.
      bellman: Bellman targets from target networks (DDPG); False: the critic regresses the
        advantage. discount: ``γ``; tau: soft-update rate of the target networks.
    """

    population: int = 8
    hidden: int = 300
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    sigma: float = 0.5
    sigma_decay: float = 0.95
    sigma_min: float = 0.05
    warmup: int = 2
    updates: int = 32
    batch: int = 64
    buffer: int = 4096
    baseline_decay: float = 0.9
    bellman: bool = True
    discount: float = 1.0
    tau: float = 0.01


class AgentState(NamedTuple):
    """Everything the agent carries between episodes (a pytree)."""

    actor: Any
    critic: Any
    actor_opt: Any
    critic_opt: Any
    buf_s: jax.Array  # [capacity, F]
    buf_a: jax.Array  # [capacity, A]
    buf_r: jax.Array  # [capacity]
    buf_s2: jax.Array  # [capacity, F] next state
    buf_done: jax.Array  # [capacity] 1 at a walk's last step
    target_actor: Any
    target_critic: Any
    count: jax.Array  # transitions stored (saturates at capacity in the sampling)
    baseline: jax.Array
    episode: jax.Array
    best_reward: jax.Array
    best_actions: jax.Array  # [L, A]
    best_metrics: Any  # {name: scalar} of the best walk


def _mlp_init(key: jax.Array, sizes: list[int]) -> list:
    layers = []
    for k, a, b in zip(jax.random.split(key, len(sizes) - 1), sizes[:-1], sizes[1:],
                       strict=True):
        w = jax.random.normal(k, (a, b), jnp.float32) * math.sqrt(1.0 / a)
        layers.append((w, jnp.zeros((b,), jnp.float32)))
    return layers


def _mlp(layers: list, x: jax.Array) -> jax.Array:
    for w, b in layers[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = layers[-1]
    return x @ w + b


def actor_apply(actor: list, s: jax.Array) -> jax.Array:
    """Deterministic policy ``[..., F] -> [..., A]`` in (0, 1)."""
    return jax.nn.sigmoid(_mlp(actor, s))


def critic_apply(critic: list, s: jax.Array, a: jax.Array) -> jax.Array:
    """``Q(s, a)``: ``[..., F], [..., A] -> [...]``."""
    return _mlp(critic, jnp.concatenate([s, a], -1))[..., 0]


def explore(actor: list, s: jax.Array, key: jax.Array, sigma: jax.Array,
            random: jax.Array) -> jax.Array:
    """Actions ``[P, A]`` in [0, 1] at states ``s [P, F]``: the actor's plus truncated-normal
    noise of scale ``sigma``, or uniform where ``random``."""
    mu = actor_apply(actor, s)
    k1, k2 = jax.random.split(key)
    noise = jax.random.truncated_normal(k1, -2.0, 2.0, mu.shape) * sigma
    return jnp.where(random, jax.random.uniform(k2, mu.shape), jnp.clip(mu + noise, 0.0, 1.0))


def init_agent(key: jax.Array, state_dim: int, action_dim: int, steps: int,
               metrics: Sequence[str], hp: Hyper | None = None) -> AgentState:
    """A fresh agent for walks of ``steps`` steps over ``[state_dim]`` states and
    ``[action_dim]`` actions; ``metrics`` names what ``evaluate`` returns besides ``reward``
    (``hp`` default: ``Hyper()``)."""
    hp = Hyper() if hp is None else hp
    ka, kc = jax.random.split(key)
    actor = _mlp_init(ka, [state_dim, hp.hidden, hp.hidden, action_dim])
    critic = _mlp_init(kc, [state_dim + action_dim, hp.hidden, hp.hidden, 1])
    names = ("reward", *(m for m in metrics if m != "reward"))
    return AgentState(
        actor=actor, critic=critic, actor_opt=optax.adam(hp.actor_lr).init(actor),
        critic_opt=optax.adam(hp.critic_lr).init(critic),
        buf_s=jnp.zeros((hp.buffer, state_dim)), buf_a=jnp.zeros((hp.buffer, action_dim)),
        buf_r=jnp.zeros((hp.buffer,)), buf_s2=jnp.zeros((hp.buffer, state_dim)),
        buf_done=jnp.zeros((hp.buffer,)), target_actor=actor, target_critic=critic,
        count=jnp.zeros((), jnp.int32),
        baseline=jnp.zeros((), jnp.float32), episode=jnp.zeros((), jnp.int32),
        best_reward=jnp.full((), -jnp.inf, jnp.float32),
        best_actions=jnp.zeros((steps, action_dim), jnp.float32),
        best_metrics={k: jnp.full((), -jnp.inf if k == "reward" else 0.0, jnp.float32)
                      for k in names},
    )


def make_episode(rollout: Callable, evaluate: Callable, hp: Hyper | None = None, *,
                 random_search: bool = False) -> Callable:
    """``episode(agent, key) -> (agent, metrics)``.

    ``rollout(actor, key, sigma, random, population) -> (states [P, L, F], actions [P, L, A])``
    walks the environment (:func:`explore` picks each step's actions); ``evaluate(actions) ->
    {"reward": [P], ...}`` scores the walks. ``random_search``: uniform actions every episode and
    no learning, with the same evaluations. Pure; jit it once (``hp`` default: ``Hyper()``)."""
    hp = Hyper() if hp is None else hp
    ta, tc = optax.adam(hp.actor_lr), optax.adam(hp.critic_lr)
    P = hp.population

    def episode(ag: AgentState, key: jax.Array):
        kr, ku = jax.random.split(key)
        sigma = jnp.maximum(hp.sigma * hp.sigma_decay ** ag.episode.astype(jnp.float32),
                            hp.sigma_min)
        rand = jnp.asarray(True) if random_search else ag.episode < hp.warmup
        ss, aa = rollout(ag.actor, kr, sigma, rand, P)
        m = evaluate(aa)
        r = m["reward"]
        b = jnp.where(ag.count == 0, jnp.mean(r), ag.baseline)
        i = jnp.argmax(r)
        better = r[i] > ag.best_reward
        best_actions = jnp.where(better, aa[i], ag.best_actions)
        best_metrics = {k: jnp.where(better, m[k][i], old) for k, old in ag.best_metrics.items()}
        ag = ag._replace(best_reward=jnp.maximum(r[i], ag.best_reward),
                         best_actions=best_actions, best_metrics=best_metrics,
                         episode=ag.episode + 1,
                         baseline=hp.baseline_decay * b + (1 - hp.baseline_decay) * jnp.mean(r))
        if random_search:
            return ag, m
        L = ss.shape[1]
        n = P * L
        pos = (ag.count + jnp.arange(n)) % hp.buffer
        adv = jnp.repeat(r - b, L)
        s2 = jnp.concatenate([ss[:, 1:], jnp.zeros_like(ss[:, :1])], axis=1)
        done = jnp.tile(jnp.arange(L) == L - 1, P).astype(jnp.float32)
        ag = ag._replace(buf_s=ag.buf_s.at[pos].set(ss.reshape(n, -1)),
                         buf_a=ag.buf_a.at[pos].set(aa.reshape(n, -1)),
                         buf_r=ag.buf_r.at[pos].set(adv),
                         buf_s2=ag.buf_s2.at[pos].set(s2.reshape(n, -1)),
                         buf_done=ag.buf_done.at[pos].set(done), count=ag.count + n)
        filled = jnp.minimum(ag.count, hp.buffer)

        def update(c, k):
            actor, critic, oa, oc, t_actor, t_critic = c
            idx = jax.random.randint(k, (hp.batch,), 0, filled)
            s, a, y = ag.buf_s[idx], ag.buf_a[idx], ag.buf_r[idx]
            if hp.bellman:
                s2 = ag.buf_s2[idx]
                q2 = critic_apply(t_critic, s2, actor_apply(t_actor, s2))
                y = y + hp.discount * (1.0 - ag.buf_done[idx]) * jax.lax.stop_gradient(q2)

            def c_loss(cp):
                return jnp.mean(jnp.square(critic_apply(cp, s, a) - y))

            def a_loss(ap):
                return -jnp.mean(critic_apply(critic, s, actor_apply(ap, s)))

            gc = jax.grad(c_loss)(critic)
            uc, oc = tc.update(gc, oc)
            critic = optax.apply_updates(critic, uc)
            ga = jax.grad(a_loss)(actor)
            ua, oa = ta.update(ga, oa)
            actor = optax.apply_updates(actor, ua)
            if hp.bellman:
                t_actor, t_critic = optax.incremental_update(
                    (actor, critic), (t_actor, t_critic), hp.tau)
            return (actor, critic, oa, oc, t_actor, t_critic), None

        (actor, critic, oa, oc, t_actor, t_critic), _ = jax.lax.scan(
            update, (ag.actor, ag.critic, ag.actor_opt, ag.critic_opt, ag.target_actor,
                     ag.target_critic),
            jax.random.split(ku, hp.updates))
        return ag._replace(actor=actor, critic=critic, actor_opt=oa, critic_opt=oc,
                           target_actor=t_actor, target_critic=t_critic), m

    return episode
