"""DJPQ: VIB channel gates + DQ quantizers (``t = 1``) trained with a differentiable BOPs budget.

The objective is ``CE + γ₁ · Σ_c KL_c + γ₂ · BOPs_soft / BOPs_fp32`` (:func:`loss`), with soft
BOPs from the gates' keep probabilities and the quantizers' continuous bits
(:func:`jaxjpq.cost.relative_bops` with ``soft=True``). :func:`djpq` is an optax transform over
``(params, CompressionState)`` that adds the gradient of the penalty (:func:`penalty`) itself, so
the training loss stays plain cross-entropy, and adapts ``γ₂`` to meet a relative-BOPs target:

1. warm-up (``warmup`` steps): weights, quantizers and gates train on the task loss only;
2. search (until ``search_end``): the penalty acts while the last exact relative BOPs exceed
   ``τ'`` (below it only the task loss trains, so the permanent pruning does not overshoot);
   after every step ``log γ₂`` moves by
   ``gamma2_rate · clip((r − τ') / τ', −1, 1)`` where ``r`` is the exact relative BOPs of the
   current state (ceil bits, thresholded gates) and ``τ' = (1 − margin) · target``; units whose
   gate crosses the VIB rule ``log σ² − log μ² > θ`` get mask 0 (every group keeps one unit);
3. at ``search_end``: bits rounded (to {2, 4, 8} for power-of-two states) and frozen, masks frozen,
   the gates' ``μ`` folded into the weights (gates become exactly 1; at the layer output over a
   per-tensor quantizer the fold is ``Q(μ W)``, see :func:`jaxjpq.gates.fold_state`), pruned
   weights set to zero;
   if the exact relative BOPs still exceed ``target``, the quantizer whose one-step reduction saves
   the most BOPs is lowered (down to ``b_l``) until it fits, then, if needed, the live units with
   the highest gate log-ratio are pruned (every group keeps one unit);
4. cool-down: the weights and the clips ``q_m`` (at the frozen bits) train on the task loss.

Quantizer (``log d``, ``log q_m``) and gate (``μ``, ``log σ²``) parameters take Adam steps in those
coordinates (``quant_lr``), so a step changes bits by a bounded amount at any scale; ``d`` is then
projected onto ``[d(b_u), d(b_l)]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxjpq import cost
from jaxjpq import gates as gates_lib
from jaxjpq.forward import cross_entropy
from jaxjpq.graph import Graph, kept
from jaxjpq.methods import core
from jaxjpq.quant import QuantParams
from jaxjpq.slim import apply_masks
from jaxjpq.state import CompressedParams, CompressionSpec, CompressionState
from jaxjpq.state import init as init_pair
from jaxjpq.state import init_state as init_compression
from jaxjpq.units import unit_index

_LOG_SIGMA2_RANGE = (-20.0, 10.0)
_LOG_GAMMA2_RANGE = (-12.0, 14.0)


class DjpqState(NamedTuple):
    """State of :func:`djpq`.

    Attributes:
      step: int32 scalar, updates applied so far.
      inner_state: the inner optimizer's state over the model params.
      comp_state: Adam state over the free coordinates of quantizers and gates.
      gamma2: float32 scalar, the current BOPs weight ``γ₂``.
      rel_bops: float32 scalar, exact relative BOPs after the last update.
    """

    step: jax.Array
    inner_state: optax.OptState
    comp_state: optax.OptState
    gamma2: jax.Array
    rel_bops: jax.Array


def init_state(
    graph: Graph,
    spec: CompressionSpec,
    variables: Mapping | None = None,
    *,
    key: jax.Array | None = None,
    threshold: float = 0.0,
    mu: float = 1.0,
    log_sigma2: float = -4.0,
    gate_at: str = "weights",
) -> CompressionState:
    """A :class:`CompressionState` for DJPQ: quantizers with ``t = 1`` (``learn_t`` is forced
    off) at ``spec.init_bits`` and a VIB gate per prunable unit (see :func:`jaxjpq.gates.init`;
    ``key`` jitters the gates, default ``PRNGKey(0)``). ``gate_at``: ``"weights"`` (the gate
    scales the weights before quantization; 0.2-0.65 points above ``"output"`` on Fashion-MNIST,
    experiments/RESULTS.md) or ``"output"`` (the paper: it scales the layer's output channel)."""
    if gate_at not in ("output", "weights"):
        raise ValueError(f"gate_at must be 'output' or 'weights', got {gate_at!r}.")
    spec = dataclasses.replace(spec, learn_t=False)
    c = init_compression(graph, spec, variables)
    return c.replace(
        gates=gates_lib.init(graph, key, mu=mu, log_sigma2=log_sigma2),
        gate_threshold=float(threshold),
        gate_at=gate_at,
    )


def init(
    model: Any,
    variables: Mapping,
    *example_args: Any,
    key: jax.Array | None = None,
    threshold: float = 0.0,
    mu: float = 1.0,
    log_sigma2: float = -4.0,
    gate_at: str = "weights",
    **init_kwargs: Any,
) -> CompressedParams:
    """:func:`jaxjpq.init` (same arguments: ``model.apply`` or a graph, the variables, example
    inputs, ``spec=`` or spec fields) with the state of :func:`init_state`: ``t = 1`` and a VIB
    gate per prunable unit."""
    base = init_pair(model, variables, *example_args, **init_kwargs)
    c = base.compression
    return base._replace(compression=init_state(
        c.graph, c.spec, variables, key=key, threshold=threshold, mu=mu, log_sigma2=log_sigma2,
        gate_at=gate_at))


def penalty(cstate: CompressionState, gamma1: Any, gamma2: Any) -> jax.Array:
    """``γ₁ · Σ_c KL_c + γ₂ · BOPs_soft / BOPs_fp32`` (scalar, differentiable in ``cstate``)."""
    return gamma1 * gates_lib.total_kl(cstate.gates) + gamma2 * cost.relative_bops(
        cstate, soft=True
    )


def loss(
    logits: jax.Array, labels: jax.Array, cstate: CompressionState, gamma1: Any, gamma2: Any,
) -> jax.Array:
    """The full DJPQ objective for a batch: mean cross-entropy + :func:`penalty`.

    For a hand-written loop at fixed ``γ``; :func:`djpq` adds the penalty's gradient itself.
    """
    return cross_entropy(logits, labels) + penalty(cstate, gamma1, gamma2)


# ---------------------------------------------------------------------------------------------
# Free coordinates: (log d, log q_m) per quantizer, (μ, log σ²) per gate
# ---------------------------------------------------------------------------------------------


def _free(c: CompressionState) -> dict:
    def q(table):
        return {n: (jnp.log(p.d), jnp.log(p.q_m)) for n, p in table.items() if n not in c.frozen}

    return {
        "weight": q(c.weight),
        "act": q(c.act),
        "gates": {g: (p.mu, p.log_sigma2) for g, p in c.gates.items()},
    }


def _free_grads(c: CompressionState, g: CompressionState) -> dict:
    def q(table, grads):
        return {
            n: (grads[n].d * p.d, grads[n].q_m * p.q_m)
            for n, p in table.items()
            if n not in c.frozen
        }

    return {
        "weight": q(c.weight, g.weight),
        "act": q(c.act, g.act),
        "gates": {k: (g.gates[k].mu, g.gates[k].log_sigma2) for k in c.gates},
    }


def _quant_table(table, steps, signed, frozen, b_lo, b_hi, search, finalize, pow2):
    """New quantizers: search = Adam step + projection of ``d``; finalize = bits rounded;
    cool-down = the shared fixed-bits step with the Adam-stepped clips."""
    clips = {n: p.q_m * jnp.exp(steps[n][1]) for n, p in table.items() if n not in frozen}
    cool = core.fixed_bits_step(table, {}, signed, frozen, lr=0.0, b_lo=b_lo, b_hi=b_hi,
                                clips=clips)

    def step(name: str, p: QuantParams) -> QuantParams:
        s, q_m = signed[name], clips[name]
        d = core.projected(QuantParams(p.d * jnp.exp(steps[name][0]), q_m, p.t), s, b_lo,
                           b_hi).d
        d_final = core.with_bits(p, core.rounded_bits(p, s, b_lo, b_hi, pow2), s).d
        new_d = jnp.where(search, d, jnp.where(finalize, d_final, cool[name].d))
        return QuantParams(d=new_d, q_m=jnp.where(finalize, p.q_m, q_m), t=p.t)

    return core.map_learned(table, frozen, step)


def _prune_masks(c: CompressionState) -> dict[str, jax.Array]:
    """Masks after the VIB rule (pruned units stay pruned; each group keeps its best unit)."""
    out = {}
    for gid, gate in c.gates.items():
        alive = kept(c.masks[gid])
        ratio = gates_lib.log_ratio(gate)
        keep = alive & (ratio <= c.gate_threshold)
        best = jnp.argmin(jnp.where(alive, ratio, jnp.inf))
        keep = keep.at[best].set(True)
        out[gid] = keep.astype(jnp.float32)
    return out


def djpq(
    inner: optax.GradientTransformation,
    *,
    steps: int,
    target_bops: float | None = None,
    gamma1: float = 1e-3,
    gamma2: float = 1.0,
    gamma2_rate: float = 0.01,
    margin: float = 0.1,
    quant_lr: float = 1e-2,
    warmup: int | None = None,
    search_end: int | None = None,
) -> optax.GradientTransformation:
    """DJPQ over ``(params, compression_state)`` (state from :func:`init` / :func:`init_state`).

    The bit range ``(b_l, b_u)`` and ``power_of_two`` come from the state's spec, the target from
    its ``budget["bops"]`` unless ``target_bops`` is given (relative to fp32, in (0, 1]).

    Args:
      inner: optimizer of the model params.
      steps: total updates. ``warmup`` (default 10 %) and ``search_end`` (default 70 %) split them.
      target_bops: relative BOPs target.
      gamma1: weight of ``Σ KL`` (nats per unit, summed).
      gamma2: initial weight of the relative soft BOPs; adapted by ``gamma2_rate`` per step (in
        log space) toward ``(1 − margin) · target``.
      quant_lr: Adam learning rate of the quantizer and gate coordinates.

    Returns:
      ``GradientTransformation`` whose ``update(grads, state, params)`` takes and returns pairs.
    """
    if target_bops is not None and not 0.0 < float(target_bops) <= 1.0:
        raise ValueError(f"djpq needs a relative BOPs target in (0, 1], got {target_bops}.")
    warmup = int(round(0.1 * steps)) if warmup is None else int(warmup)
    search_end = int(round(0.7 * steps)) if search_end is None else int(search_end)
    if not 0 <= warmup <= search_end < steps:
        raise ValueError(
            f"need 0 <= warmup ({warmup}) <= search_end ({search_end}) < steps ({steps})."
        )
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must lie in [0, 1), got {margin}.")
    adam = optax.adam(quant_lr)

    def config(c: CompressionState) -> tuple[float, float, float, bool]:
        """(target, b_l, b_u, power_of_two) from the state's spec; validates the state."""
        spec = c.spec
        if spec is None:
            raise ValueError("djpq needs a state made by jaxjpq.methods.djpq.init (it carries "
                             "the spec).")
        if not c.gates:
            raise ValueError("djpq needs VIB gates in the state: build it with "
                             "jaxjpq.methods.djpq.init(model.apply, variables, x, ...).")
        if c.learn_t:
            raise ValueError("djpq uses the t = 1 quantizer: build the state with "
                             "jaxjpq.methods.djpq.init (or CompressionSpec(learn_t=False)).")
        target = spec.budget_for("bops") if target_bops is None else float(target_bops)
        if target is None or not 0.0 < target <= 1.0:
            raise ValueError(
                "djpq needs a relative BOPs target in (0, 1]: pass target_bops=... or "
                "CompressionSpec(budget={'bops': ...})."
            )
        b_lo, b_hi = spec.bits
        pow2 = bool(c.power_of_two)
        if pow2 and not (b_lo <= 2.0 and b_hi >= 8.0):
            raise ValueError(f"power-of-two bits {{2, 4, 8}} need spec.bits to cover [2, 8], "
                             f"got {spec.bits}.")
        return target, b_lo, b_hi, pow2

    def init(model_params, c):
        target, *_ = config(c)
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((model_params, c))):
            floor = core.smallest_state(c, saliency=jnp.zeros(
                (sum(g.size for g in c.graph.prunable_groups),)), params=model_params)
            reachable = float(cost.relative_bops(floor))
            if target < reachable:
                raise ValueError(
                    f"djpq: target_bops={target:.4%} is below the smallest reachable relative "
                    f"BOPs {reachable:.4%} (every learned quantizer at b_l={c.spec.bits[0]:g} "
                    "bits, every group down to one unit, skipped sites fixed); raise the target "
                    "or lower spec.bits / skip fewer sites."
                )
        return DjpqState(
            step=jnp.zeros((), jnp.int32),
            inner_state=inner.init(model_params),
            comp_state=adam.init(_free(c)),
            gamma2=jnp.asarray(gamma2, jnp.float32),
            rel_bops=jnp.asarray(cost.relative_bops(c), jnp.float32),
        )

    def update(g_p, g_c, p, c, state):
        target, b_lo, b_hi, pow2 = config(c)
        aim = (1.0 - margin) * target
        s = state.step
        search = s < search_end
        in_search = (s >= warmup) & search
        finalize = s == search_end

        u_p, inner_state = inner.update(g_p, state.inner_state, p)
        # The penalty acts only while the last exact cost exceeds the aim: pruning is permanent,
        # so pressure that outlives the budget would overshoot it (Adam steps do not shrink with
        # γ₂).
        penalised = in_search & (state.rel_bops > aim)
        g_tot = jax.lax.cond(
            penalised,
            lambda: jax.tree.map(
                jnp.add, g_c, jax.grad(lambda cc: penalty(cc, gamma1, state.gamma2))(c)
            ),
            lambda: g_c,
        )
        free_u, comp_state = adam.update(_free_grads(c, g_tot), state.comp_state)
        w_signed, a_signed = core.signedness(c)
        new_w = _quant_table(c.weight, free_u["weight"], w_signed, c.frozen, b_lo, b_hi, search,
                             finalize, pow2)
        new_a = _quant_table(c.act, free_u["act"], a_signed, c.frozen, b_lo, b_hi, search,
                             finalize, pow2)
        new_g = {
            k: gates_lib.Gate(
                mu=jnp.where(search, gt.mu + free_u["gates"][k][0], gt.mu),
                log_sigma2=jnp.where(
                    search,
                    jnp.clip(gt.log_sigma2 + free_u["gates"][k][1], *_LOG_SIGMA2_RANGE),
                    gt.log_sigma2,
                ),
            )
            for k, gt in c.gates.items()
        }
        c_new = c.replace(weight=new_w, act=new_a, gates=new_g)
        c_new = c_new.replace(masks=jax.tree.map(
            lambda a, b: jnp.where(search, a, b), _prune_masks(c_new), c.masks))

        graph = c.graph
        index = unit_index(graph, {"params": p})

        def fold(args):
            p, c_new = args
            ratio = index.flat_masks({g: gates_lib.log_ratio(gt) for g, gt in c_new.gates.items()})
            c_fin = core.enforce_budget(c_new, bops=target, saliency=-ratio, params=p)
            folded, c_fin = gates_lib.fold_state(c_fin, {"params": p}, strict=False)
            p_new = apply_masks(graph, folded, c_fin.masks)["params"]
            return jax.tree.map(lambda a, b: a - b, p_new, p), c_fin

        u_p, c_new = jax.lax.cond(finalize, fold, lambda a: (u_p, a[1]), (p, c_new))
        # Pruned units stay exactly zero (their momentum would otherwise move them).
        u_p = core.hold(index, u_p, p, ~kept(index.flat_masks(c_new.masks)), c_new)
        rel = jnp.asarray(cost.relative_bops(c_new)).astype(jnp.float32)
        step_g = gamma2_rate * jnp.clip((rel - aim) / aim, -1.0, 1.0)
        log_g2 = jnp.clip(jnp.log(state.gamma2) + jnp.where(in_search, step_g, 0.0),
                          *_LOG_GAMMA2_RANGE)
        new_state = DjpqState(
            step=s + 1,
            inner_state=inner_state,
            comp_state=comp_state,
            gamma2=jnp.exp(log_g2),
            rel_bops=rel,
        )
        return u_p, c_new, new_state

    return core.pair_transform("djpq", init, update)


transform = djpq  # ``jaxjpq.djpq.transform(...)``, the name the design uses
