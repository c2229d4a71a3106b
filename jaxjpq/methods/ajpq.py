"""AJPQ: pruning as 0-bit channel quantization, one mixed-precision search by a DDPG agent.

The environment walks the quantization sites in execution order. At site ``l`` the agent sees
static features (position, kind, input / output channels, kernel size, MACs, parameters, whether
its bits are learned, whether it owns a prunable output group) plus its previous action and the
share of the budget the earlier sites already use, and acts with ``a ∈ [0, 1]³``:

- weight bits ``round(b_l − ½ + a₀ (b_u − b_l + 1))`` clipped to ``[b_l, b_u]`` (learned sites);
- input-activation bits from ``a₁`` the same way (BOPs budgets only; a size budget keeps them);
- a fraction ``a₂ · max_prune`` of the units of the prunable group that holds the site's output
  channels set to 0 bits (pruned), the least important (L2 norm of the units' weights) first
  (the group's first site in execution order decides it).

``hierarchy=True`` (per-channel weight quantizers) adds the paper's channel level: the layer
action above chooses the layer's bits and sparsity, and a fourth action ``a₃`` spreads the bits
over the layer's kernels by importance, kernel ``c`` (importance rank ``r_c ∈ [0, 1]``, the L2
norm of its weights) at ``round(b + a₃ (b_u − b_l)(r_c − ½))`` clipped to ``[b_l, b_u]``, and
its pruned kernels at 0 bits.

A full policy becomes a :class:`~jaxjpq.state.CompressionState` with :func:`set_bits` and the
group masks, then :func:`enforce_budget` makes the exact size / BOPs budget hold (bits lowered,
largest consumers first, then the least important units pruned). Reward:
``0.1 · (acc − acc_ref)`` in percentage points on a held-out batch (``acc_ref`` the uncompressed
state's), minus ``over_penalty · max(0, c_policy / α − 1)`` where ``c_policy`` is the policy's
figure before enforcement.

A candidate is array values only (the policy's ``[L, A]`` actions), so one compiled evaluator
scores a whole population in one call (states built under ``vmap``; the population split over
the devices when there are several, see :func:`make_evaluator`); an episode rolls out one policy
per population member, scores them, stores every step's transition with the episode's
advantage ``R − b`` (``b`` a moving average) and takes gradient steps of a small actor / critic
pair (DDPG-style: deterministic actor, truncated-normal exploration whose scale decays per
episode, replay buffer; the reward is terminal and shared by the episode's steps, so the critic
regresses it directly; :mod:`jaxjpq.methods.ddpg`). Everything of an episode runs in one ``jit``;
it compiles once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxjpq import cost
from jaxjpq.compress import compress_apply
from jaxjpq.graph import kept, leaf
from jaxjpq.methods import ddpg
from jaxjpq.methods.core import enforce_budget, magnitude, one_budget, set_bits, with_bits
from jaxjpq.methods.ddpg import Hyper
from jaxjpq.state import CompressedParams, CompressionState, check_state
from jaxjpq.units import rank_in_group, unit_index

ACTION_DIM = 3  # a layer's weight bits, activation bits, pruned fraction


class Env(NamedTuple):
    """The static environment of a search (host data; close over it).

    Attributes:
      sites: every site name, execution order (the walk).
      learned: bool ``[L]``: the site's weight bits are learned (searched).
      act_learned: bool ``[L]``: its activation bits are learned and searched (BOPs budgets).
      group: int ``[L]``: index (in :class:`~jaxjpq.units.UnitIndex` order) of the prunable
        group whose units are this site's output channels and that this site decides, or -1.
      features: float32 ``[L, F_static]`` static features scaled to [0, 1].
      share: float64 ``[L]``: the site's share of the dense figure (params for size, MACs for
        BOPs); the "used so far" feature sums ``share · bits / 32 · kept``.
      kind, alpha: ``"size"`` or ``"bops"``; the budget (fraction of fp32).
      target: the ``enforce_budget`` target (a ``cost.relative_size`` fraction for a size budget:
        the budget less the scales, float leaves and ``reserve_bits``).
      hierarchy: the channel level is on (a fourth action spreads bits over kernels).
    """

    sites: tuple[str, ...]
    learned: np.ndarray
    act_learned: np.ndarray
    group: np.ndarray
    features: np.ndarray
    share: np.ndarray
    kind: str
    alpha: float
    target: float
    hierarchy: bool = False

    @property
    def action_dim(self) -> int:
        """Actions per site: 3, or 4 with the channel level."""
        return ACTION_DIM + int(self.hierarchy)


def make_env(state: CompressionState, *, size: float | None = None,
             bops: float | None = None, reserve_bits: float = 0.0,
             hierarchy: bool = False) -> Env:
    """The environment of ``graph`` from ``state`` (which sites are quantized and learned, the
    bit range) and one budget: ``size`` (the exported model's bits, :func:`relative_model_size`,
    plus ``reserve_bits``, over the fp32 model's) or ``bops`` (:func:`jaxjpq.cost.relative_bops`).
    ``hierarchy``: the channel level (module docstring); needs per-channel weight quantizers.
    Raises ``ValueError`` when the budget is not a fraction in (0, 1] or is below the smallest
    reachable figure (every learned site at ``b_l``, every group down to one unit)."""
    kind, alpha = one_budget(size, bops)
    graph = check_state(state)
    if hierarchy and not (state.spec is not None and state.spec.per_channel):
        raise ValueError("hierarchy=True sets bits per kernel: build the state with "
                         "CompressionSpec(per_channel=True).")
    sites = graph.sites
    index = unit_index(graph, graph.abstract_variables())
    pos = {g: j for j, g in enumerate(index.group_ids)}
    group, taken = [], set()
    for s in sites:
        j = pos.get(s.out_group, -1)
        group.append(j if j >= 0 and j not in taken else -1)
        taken.add(j)
    learned = np.array([s.name in state.weight and s.name not in state.frozen for s in sites])
    act_learned = np.array([kind == "bops" and s.name in state.act and s.name not in state.frozen
                            for s in sites])
    n_params = np.array([math.prod(s.weight_shape) for s in sites], np.float64)
    macs = np.array([s.macs_per_example for s in sites], np.float64)
    c_in = np.array([math.prod(s.weight_shape[a] for a in s.in_axes) for s in sites], np.float64)
    c_out = np.array([math.prod(s.weight_shape[a] for a in s.out_axes) for s in sites],
                     np.float64)
    kernel = n_params / np.maximum(c_in * c_out, 1.0)
    L = len(sites)
    raw = np.stack([np.arange(L) / max(L - 1, 1), [s.kind == "conv" for s in sites],
                    np.log1p(c_in), np.log1p(c_out), np.log1p(kernel), np.log1p(macs),
                    np.log1p(n_params), learned, np.asarray(group) >= 0], axis=1).astype(np.float64)
    scale = np.max(np.abs(raw), axis=0)
    features = (raw / np.where(scale > 0, scale, 1.0)).astype(np.float32)
    share = n_params if kind == "size" else macs
    share = share / share.sum()
    if kind == "size":
        fp_sites = cost.fp32_size_bits(graph)
        spare = alpha * cost.fp32_model_bits(graph) - float(reserve_bits) - cost.fixed_bits(state)
        target = spare / fp_sites
    else:
        target = alpha
    env = Env(tuple(s.name for s in sites), learned, act_learned, np.asarray(group, np.int64),
              features, share, kind, alpha, float(target), bool(hierarchy))
    floor = _floor(state, env)
    if target <= 0 or floor > target * (1 + 1e-9):
        smallest = (floor if kind == "bops" else (floor * cost.fp32_size_bits(graph) + alpha
                                                  * cost.fp32_model_bits(graph) - target
                                                  * cost.fp32_size_bits(graph))
                    / cost.fp32_model_bits(graph))
        raise ValueError(
            f"{kind} budget {alpha:.4%} is below the smallest reachable configuration "
            f"({smallest:.4%} of fp32: every learned site at {state.spec.bits[0]:g} bits and "
            "every prunable group down to one unit)."
        )
    return env


def _floor(state: CompressionState, env: Env) -> float:
    """The enforce figure at every learned quantizer's lowest bits and one unit per group."""
    graph = state.graph
    low = state
    b_lo = state.spec.bits[0]
    for n in state.weight:
        if n not in state.frozen:
            low = set_bits(low, n, b_lo)
    if env.kind == "bops":
        for n in state.act:
            if n not in state.frozen:
                low = set_bits(low, n, b_lo, kind="act")
    index = unit_index(graph, graph.abstract_variables())
    first = np.zeros(index.num_units, np.float32)
    first[np.asarray(index.offsets[:-1])] = 1.0
    low = low.replace(masks={**low.masks, **index.split(jnp.asarray(first))})
    return float(_figure(low, env, jnp.float64))


# ---------------------------------------------------------------------------------------------
# Policies -> states
# ---------------------------------------------------------------------------------------------


def action_bits(a: jax.Array, bits: tuple[float, float]) -> jax.Array:
    """Bits of actions ``a ∈ [0, 1]``: ``round(b_l − ½ + a (b_u − b_l + 1))`` in ``[b_l, b_u]``."""
    b_l, b_u = (float(b) for b in bits)
    return jnp.clip(jnp.round(b_l - 0.5 + a * (b_u - b_l + 1.0)), b_l, b_u)


def kernel_ranks(state: CompressionState, params: Mapping) -> dict[str, jax.Array]:
    """``{site: [channel_shape] importance rank in [0, 1]}`` of each per-channel weight
    quantizer's output channels (kernels): 0 the smallest L2 norm, 1 the largest."""
    out = {}
    for s in state.graph.sites:
        p = state.weight.get(s.name)
        if p is None or not jnp.ndim(p.d):
            continue
        w = s.take(leaf({"params": params}, s.weight))
        rest = tuple(a for a in range(w.ndim) if a not in s.out_axes)
        norm = jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=rest)).reshape(-1)
        rank = jnp.argsort(jnp.argsort(norm)).astype(jnp.float32)
        out[s.name] = (rank / max(norm.size - 1, 1)).reshape(jnp.shape(p.d))
    return out


def policy_state(state: CompressionState, env: Env, actions: jax.Array,
                 saliency: jax.Array, *, max_prune: float = 0.9,
                 ranks: Mapping[str, jax.Array] | None = None) -> CompressionState:
    """``state`` with the policy ``actions`` (``[L, env.action_dim]``) applied, before budget
    enforcement: learned weight (and, for BOPs, activation) bits from ``a₀`` (``a₁``) and, per
    decided group, its ``⌊a₂ · max_prune · size⌋`` least salient units (``saliency`` ``[U]``)
    masked; with ``env.hierarchy`` each kernel's bits spread by ``a₃`` around the layer's by
    its rank in ``ranks`` (:func:`kernel_ranks`). jit- and vmap-compatible."""
    graph = state.graph
    bits = state.spec.bits
    sm = graph.site_map
    weight, act = dict(state.weight), dict(state.act)
    for i, name in enumerate(env.sites):  # widths >= b_l >= 2: pruning is by the masks
        if env.learned[i]:
            b = action_bits(actions[i, 0], bits)
            if env.hierarchy and ranks is not None and name in ranks:
                spread = actions[i, 3] * (float(bits[1]) - float(bits[0]))
                b = jnp.clip(jnp.round(b + spread * (ranks[name] - 0.5)), *map(float, bits))
            weight[name] = with_bits(weight[name], b, True)
        if env.act_learned[i]:
            act[name] = with_bits(act[name], action_bits(actions[i, 1], bits),
                                  sm[name].signed_input)
    out = state.replace(weight=weight, act=act)
    index = unit_index(graph, graph.abstract_variables())
    if index.num_units == 0:
        return out
    sizes = np.diff(np.asarray(index.offsets))
    frac = jnp.zeros((index.num_groups,), jnp.float32)
    for i, j in enumerate(env.group):
        if j >= 0:
            frac = frac.at[j].set(actions[i, 2] * max_prune)
    drop = jnp.minimum(jnp.floor(frac * sizes), sizes - 1)
    seg = jnp.asarray(index.group_of_unit)
    rank = rank_in_group(index, saliency)  # ascending: the least salient first
    keep = (rank >= drop[seg]).astype(jnp.float32) * index.flat_masks(out.masks)
    return out.replace(masks=index.split(keep))


def candidate(state: CompressionState, env: Env, actions: jax.Array,
              saliency: jax.Array, params: Mapping, *, max_prune: float = 0.9,
              ranks: Mapping[str, jax.Array] | None = None
              ) -> tuple[CompressionState, jax.Array]:
    """``(enforced state, the policy's figure before enforcement)`` of ``actions``; the
    enforced state meets ``env``'s budget exactly (``enforce_budget``). jit/vmap-compatible."""
    raw = policy_state(state, env, actions, saliency, max_prune=max_prune, ranks=ranks)
    fig = _figure(raw, env)
    kw = {env.kind: env.target}
    return enforce_budget(raw, saliency=saliency, params=params, **kw), fig


def _figure(state: CompressionState, env: Env, dtype: Any = jnp.float32
            ) -> jax.Array:
    """The enforce figure (``cost.relative_size`` / ``relative_bops``) of ``state``, computed in
    float64 and returned as ``dtype``."""
    graph = state.graph
    with jax.enable_x64(True):
        table = cost.site_table(state)
        if env.kind == "bops":
            f = sum(r["bops"] for r in table.values()) / cost.fp32_bops(graph)
        else:
            f = sum(r["size"] for r in table.values()) / cost.fp32_size_bits(graph)
        return jnp.asarray(f, dtype)


# ---------------------------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------------------------


def make_evaluator(apply_fn: Callable, state: CompressionState, variables: Mapping,
                   env: Env, inputs: np.ndarray, labels: np.ndarray, *, eval_batch: int = 500,
                   max_prune: float = 0.9, over_penalty: float = 0.1, population: str = "auto",
                   **call_kwargs: Any) -> Callable:
    """``evaluate(actions [P, L, 3]) -> {"reward", "accuracy", "figure", "policy_figure"} [P]``:
    each candidate's enforced state scored on the held-out ``(inputs, labels)`` (accuracy in
    [0, 1], ``eval_batch`` samples per step of a ``lax.map``); pure. The candidates' states are
    built with ``vmap``; their forwards run under ``vmap`` (``population="vmap"``), one after
    another in the same call (``"map"``), or under ``vmap`` with the population split over all
    devices (``"shard"``, when the population divides evenly). ``"auto"``: ``"shard"`` with
    several devices, else ``"map"`` on CPU (where a ``vmap`` over per-candidate kernels becomes a
    slow grouped convolution) and ``"vmap"`` elsewhere. ``evaluate.reference`` is the accuracy
    of ``state`` itself."""
    graph = state.graph
    fwd = compress_apply(apply_fn)
    params = variables["params"]
    index = unit_index(graph, variables)
    saliency = magnitude(index, params) if index.num_units else jnp.zeros((0,), jnp.float32)
    ranks = kernel_ranks(state, params) if env.hierarchy else None
    n = len(inputs)
    if n == 0 or len(labels) != n:
        raise ValueError(f"the reward set needs samples and one label each, got {n} inputs and "
                         f"{len(labels)} labels.")
    b = min(int(eval_batch), n)
    pad = -n % b  # the last batch is padded; padded samples do not count
    xs = np.concatenate([np.asarray(inputs), np.zeros((pad, *np.shape(inputs)[1:]),
                                                      np.asarray(inputs).dtype)])
    ys = np.concatenate([np.asarray(labels), np.full((pad,), -1, np.asarray(labels).dtype)])
    xs = jnp.asarray(xs).reshape(-1, b, *xs.shape[1:])
    ys = jnp.asarray(ys).reshape(-1, b)

    def accuracy(st):
        def one(xy):
            logits = fwd(variables, st, xy[0], **call_kwargs)
            return jnp.sum(jnp.argmax(logits, -1) == xy[1])

        return jnp.sum(jax.lax.map(one, (xs, ys))) / n

    ref = float(jax.jit(accuracy)(state))
    if population not in ("auto", "vmap", "map", "shard"):
        raise ValueError(f"population must be 'auto', 'vmap', 'map' or 'shard', got "
                         f"{population!r}.")
    devices = jax.devices()
    if population == "auto":
        population = ("shard" if len(devices) > 1 else
                      "map" if jax.default_backend() == "cpu" else "vmap")
    over_models = "vmap" if population == "shard" else population
    mesh = jax.sharding.Mesh(np.asarray(devices), ("population",))

    def evaluate(actions):
        if population == "shard" and actions.shape[0] % len(devices) == 0:
            spec = jax.sharding.PartitionSpec("population")
            actions = jax.lax.with_sharding_constraint(
                actions, jax.sharding.NamedSharding(mesh, spec))
        states, raw = jax.vmap(lambda a: candidate(state, env, a, saliency, params,
                                                   max_prune=max_prune, ranks=ranks))(actions)
        accs = (jax.vmap(accuracy) if over_models == "vmap" else
                lambda s: jax.lax.map(accuracy, s))(states)
        over = jnp.maximum(raw / env.target - 1.0, 0.0)
        return {"reward": 0.1 * 100.0 * (accs - ref) - over_penalty * over, "accuracy": accs,
                "figure": jax.vmap(lambda st: _figure(st, env))(states),
                "policy_figure": raw}

    evaluate.reference = ref
    evaluate.state_of = lambda actions: candidate(state, env, jnp.asarray(actions), saliency,
                                                  params, max_prune=max_prune, ranks=ranks)[0]
    return evaluate


# ---------------------------------------------------------------------------------------------
# The walk the agent takes (the agent itself: jaxjpq.methods.ddpg)
# ---------------------------------------------------------------------------------------------


METRICS = ("reward", "accuracy", "figure", "policy_figure")


def make_rollout(env: Env, bits: tuple[float, float], max_prune: float) -> Callable:
    """``rollout(actor, key, sigma, random, population) -> (states [P, L, F], actions [P, L, A])``:
    one walk over the sites per population member (:func:`ddpg.explore` at each site); the
    dynamic features are the previous action and the budget share the walk has used."""
    feats = jnp.asarray(env.features)
    share = jnp.asarray(env.share, jnp.float32)
    b_u = float(bits[1])
    L = feats.shape[0]

    def rollout(actor, key, sigma, random, population):
        def step(carry, inp):
            prev, used = carry
            i, k = inp
            s = jnp.concatenate([jnp.broadcast_to(feats[i], (population, feats.shape[1])), prev,
                                 used[:, None]], -1)
            a = ddpg.explore(actor, s, k, sigma, random)
            wb = jnp.where(jnp.asarray(env.learned)[i], action_bits(a[:, 0], bits), b_u)
            keep = 1.0 - jnp.where(jnp.asarray(env.group)[i] >= 0, a[:, 2] * max_prune, 0.0)
            used = used + share[i] * wb / 32.0 * keep / env.alpha
            return (a, used), (s, a)

        init = (jnp.zeros((population, env.action_dim)), jnp.zeros((population,)))
        _, (ss, aa) = jax.lax.scan(step, init, (jnp.arange(L), jax.random.split(key, L)))
        return jnp.swapaxes(ss, 0, 1), jnp.swapaxes(aa, 0, 1)

    return rollout


def init_agent(env: Env, key: jax.Array, hp: Hyper | None = None) -> ddpg.AgentState:
    """A fresh agent for ``env`` (``hp`` default: ``Hyper()``)."""
    # the state: static features, the previous action, the budget share used so far
    return ddpg.init_agent(key, env.features.shape[1] + env.action_dim + 1, env.action_dim,
                           len(env.sites), METRICS, hp)


def make_episode(env: Env, evaluate: Callable, bits: tuple[float, float],
                 hp: Hyper | None = None, *, random_search: bool = False,
                 max_prune: float = 0.9) -> Callable:
    """``episode(agent, key) -> (agent, metrics)`` (:func:`ddpg.make_episode`) over ``env``'s
    walk, ``evaluate`` from :func:`make_evaluator`."""
    return ddpg.make_episode(make_rollout(env, bits, max_prune), evaluate, hp,
                             random_search=random_search)


class SearchResult(NamedTuple):
    """What :func:`search` found.

    Attributes:
      pair: ``CompressedParams(variables["params"], the best policy's enforced state)``, ready
        for ``qat``; ``.state`` is its state.
      actions: float32 ``[L, A]`` its actions; bits: ``{site: weight bits}`` (the mean over
        kept weights); kept: ``{group id: kept units}``.
      reward, accuracy: its reward and held-out accuracy (before fine-tuning); reference: the
        uncompressed state's accuracy.
      relative_size, relative_bops: of the enforced state (size: :func:`relative_model_size`).
      history: per episode ``{"best_reward", "mean_reward", "mean_policy_figure"}``.
      evaluations: candidates scored; compiles: compilations of the episode function.
    """

    pair: CompressedParams
    actions: np.ndarray
    bits: dict[str, float]
    kept: dict[str, int]
    reward: float
    accuracy: float
    reference: float
    relative_size: float
    relative_bops: float
    history: list
    evaluations: int
    compiles: int

    @property
    def state(self) -> CompressionState:
        """The best policy's enforced state, ``pair.compression``."""
        return self.pair.compression


def search(apply_fn: Callable, state: CompressionState, variables: Mapping,
           inputs: np.ndarray, labels: np.ndarray, *, size: float | None = None,
           bops: float | None = None, episodes: int = 30, hp: Hyper | None = None,
           random_search: bool = False, seed: int = 0, reserve_bits: float = 0.0,
           eval_batch: int = 500, max_prune: float = 0.9, over_penalty: float = 0.1,
           hierarchy: bool = False, progress: bool = True, **call_kwargs: Any) -> SearchResult:
    """AJPQ's search (module docstring) to ``size`` or ``bops`` (see :func:`make_env`), the reward
    on the held-out ``inputs [N, ...]`` / ``labels [N]``; ``episodes · hp.population``
    candidates are scored. ``random_search``: the same number of uniform random policies.
    ``state`` is the calibrated starting state (its bit range, frozen sites, activation
    quantizers); ``hierarchy``: the channel level (:func:`make_env`); ``**call_kwargs`` static
    keyword arguments of ``apply_fn``."""
    hp = Hyper() if hp is None else hp
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}.")
    env = make_env(state, size=size, bops=bops, reserve_bits=reserve_bits, hierarchy=hierarchy)
    evaluate = make_evaluator(apply_fn, state, variables, env, inputs, labels,
                              eval_batch=eval_batch, max_prune=max_prune,
                              over_penalty=over_penalty, **call_kwargs)
    bits = tuple(state.spec.bits)
    step = jax.jit(make_episode(env, evaluate, bits, hp, random_search=random_search,
                                max_prune=max_prune))
    key = jax.random.PRNGKey(seed)
    key, k0 = jax.random.split(key)
    ag = init_agent(env, k0, hp)
    history = []
    bar = tqdm(range(episodes), desc=f"ajpq ({env.kind} budget {env.alpha:.2%})",
               unit="episode", disable=not progress)
    for _ in bar:
        key, k = jax.random.split(key)
        ag, m = step(ag, k)
        h = {"best_reward": float(ag.best_reward), "mean_reward": float(jnp.mean(m["reward"])),
             "mean_policy_figure": float(jnp.mean(m["policy_figure"]))}
        history.append(h)
        bar.set_postfix(best=f"{h['best_reward']:.3f}",
                        budget_use=f"{h['mean_policy_figure'] / env.target:.2f}")
    bar.close()
    best = np.asarray(ag.best_actions)
    st = jax.jit(evaluate.state_of)(best)
    return _result(env, CompressedParams(variables["params"], st), best, ag, evaluate.reference,
                   history,
                   episodes * hp.population, step._cache_size())


def _result(env: Env, pair: CompressedParams, best: np.ndarray, ag: ddpg.AgentState,
            reference: float, history: list, evaluations: int, compiles: int) -> SearchResult:
    st = pair.compression
    graph = st.graph
    index = unit_index(graph, graph.abstract_variables())
    kept_units = {g: int(np.sum(kept(np.asarray(st.masks[g])))) for g in index.group_ids}
    widths = cost.bits(st)  # the mean over kept weights where a site's kernels differ
    bits = {n: float(widths[n][0]) for n in st.weight if n in graph.site_map}
    return SearchResult(
        pair=pair, actions=best, bits=bits, kept=kept_units, reward=float(ag.best_reward),
        accuracy=float(ag.best_metrics["accuracy"]), reference=reference,
        relative_size=cost.relative_model_size(st),
        relative_bops=float(cost.relative_bops(st)), history=history,
        evaluations=evaluations, compiles=compiles,
    )
