"""Variational-information-bottleneck (VIB) channel gates, one per prunable unit of a graph.

Gate ``c`` of group ``g`` is ``z_c = μ_c + σ_c · ε`` (``ε ~ N(0, 1)``) in training and ``μ_c`` at
test time. It scales unit ``c``'s ``params`` slices of its group (the producers' output channels:
kernel, bias, norm scale/bias), so residual-tied channels share one gate. Where
(``CompressionState.gate_at``): ``"output"`` (the paper) multiplies the quantized weights, so the
gate scales the layer's output channel, ``z ⊙ Q(W)``; ``"weights"`` multiplies them before
quantization, ``Q(z ⊙ W)``. :func:`fold_state` folds ``μ`` exactly for both. Pruning rule: unit
``c`` is pruned when ``log σ_c² − log μ_c² > θ``.

Per unit:

    KL_c        = ½ · log(1 + μ_c² / σ_c²) = ½ · softplus(log μ_c² − log σ_c²)
    keep prob   = sigmoid(log μ_c² − log σ_c² − θ)     (½ at the pruning threshold)

With batch-statistics normalisation after a gated conv, the kernel's scale cancels and the norm's
scale/bias carry the gate: for ``z > 0`` the output is ``z`` times the ungated output (up to the
norm's epsilon); a negative sample (only likely for a unit near pruning) also flips the sign of
the normalised term.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp

from jaxjpq.graph import Graph, kept, leaf
from jaxjpq.quant import QuantParams
from jaxjpq.slim import apply_masks

_TINY = 1e-20
# log σ² of a folded gate: σ = exp(-5000) underflows to exactly 0, so z = μ = 1 exactly.
FOLDED_LOG_SIGMA2 = -1e4


@flax.struct.dataclass
class Gate:
    """Gate parameters of one group: ``mu`` and ``log_sigma2``, float32 ``[size]``."""

    mu: jax.Array
    log_sigma2: jax.Array


def init(
    graph: Graph, key: jax.Array | None = None, mu: float = 1.0, log_sigma2: float = -6.0,
    jitter: float = 0.01,
) -> dict[str, Gate]:
    """``{group id: Gate}`` for every prunable group: ``μ ~ N(mu, jitter²)``, ``log σ² =
    log_sigma2 + N(0, jitter²)`` (the jitter breaks ties between units; 0 disables it)."""
    out = {}
    key = jax.random.PRNGKey(0) if key is None else key
    for i, g in enumerate(graph.prunable_groups):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        out[g.id] = Gate(
            mu=mu + jitter * jax.random.normal(k1, (g.size,), jnp.float32),
            log_sigma2=log_sigma2 + jitter * jax.random.normal(k2, (g.size,), jnp.float32),
        )
    return out


def log_ratio(gate: Gate) -> jax.Array:
    """``log σ² − log μ²`` per unit ``[size]`` (the pruning statistic; high = noise dominates)."""
    return gate.log_sigma2 - jnp.log(gate.mu * gate.mu + _TINY)


def kl(gate: Gate) -> jax.Array:
    """KL term per unit ``[size]``: ``½ · log(1 + μ² / σ²)``, stable for tiny σ."""
    return 0.5 * jax.nn.softplus(-log_ratio(gate))


def keep_prob(gate: Gate, threshold: float = 0.0) -> jax.Array:
    """Soft keep probability per unit ``[size]``: ``sigmoid(θ − (log σ² − log μ²))``."""
    return jax.nn.sigmoid(threshold - log_ratio(gate))


def keep(gate: Gate, threshold: float = 0.0) -> jax.Array:
    """bool ``[size]``: the pruning rule ``log σ² − log μ² <= θ`` (True = keep)."""
    return log_ratio(gate) <= threshold


def values(gates: Mapping[str, Gate], key: jax.Array | None = None) -> dict[str, jax.Array]:
    """Gate multipliers ``{group id: [size]}``: sampled ``μ + σ·ε`` with ``key``, else ``μ``."""
    if key is None:
        return {g: p.mu for g, p in gates.items()}
    out = {}
    for i, (g, p) in enumerate(sorted(gates.items())):
        eps = jax.random.normal(jax.random.fold_in(key, i), p.mu.shape, p.mu.dtype)
        out[g] = p.mu + jnp.exp(0.5 * p.log_sigma2) * eps
    return out


def total_kl(gates: Mapping[str, Gate]) -> jax.Array:
    """``Σ_c KL_c`` over every gate (scalar)."""
    return sum((jnp.sum(kl(p)) for p in gates.values()), jnp.zeros((), jnp.float32))


def folded(gates: Mapping[str, Gate]) -> dict[str, Gate]:
    """The gates after :func:`fold`: ``μ = 1``, ``σ = 0`` (the forward then multiplies by 1)."""
    return {
        g: Gate(mu=jnp.ones_like(p.mu), log_sigma2=jnp.full_like(p.log_sigma2, FOLDED_LOG_SIGMA2))
        for g, p in gates.items()
    }


def fold(graph: Graph, variables: Mapping, gates: Mapping[str, Gate]) -> dict:
    """``variables`` with each gate's ``μ`` multiplied into its group's ``params`` slices.

    The deterministic gated forward of ``variables`` equals the ungated forward of the result.
    """
    return apply_masks(graph, variables, values(gates))


def _channel_values(graph: Graph, variables: Mapping, per_unit: Mapping[str, jax.Array]) -> dict:
    """``{site: its group's per-unit value along the site's output axes}`` for every site whose
    ``out_group`` is in ``per_unit``."""
    ones = jax.tree.map(jnp.ones_like, dict(variables))
    scaled = apply_masks(graph, ones, per_unit)
    out = {}
    for s in graph.sites:
        if s.out_group not in per_unit:
            continue
        w = s.take(leaf(scaled, s.weight))
        for a in sorted(set(range(w.ndim)) - {a % w.ndim for a in s.out_axes}, reverse=True):
            w = jnp.take(w, 0, axis=a)
        out[s.name] = w
    return out


def fold_state(state, variables: Mapping, *, strict: bool = True) -> tuple[dict, object]:
    """``(variables, state)`` with the gates' test-time ``μ`` folded in and the gates at 1: the
    deterministic compressed forward is unchanged.

    ``gate_at="weights"``: ``μ`` multiplies the group's ``params`` slices. ``"output"``: the
    same, and each gated site's weight quantizer has ``d`` and ``q_m`` scaled by ``|μ|`` per
    channel (``μ Q(W) = Q_{|μ| d, |μ| q_m}(μ W)`` for ``t = 1``). A per-tensor quantizer whose
    kept channels have unequal ``|μ|`` cannot hold that scale: ``ValueError`` when ``strict``
    (concrete states only), else its channels keep ``Q(μ W)``.
    """
    graph, gates = state.graph, state.gates
    if not gates:
        return dict(variables), state
    mu = values(gates)
    new_vars = apply_masks(graph, variables, mu)
    weight = dict(state.weight)
    if state.gate_at == "output":
        live = _channel_values(graph, variables, {g: state.masks[g] for g in mu})
        for name, m in _channel_values(graph, variables, mu).items():
            if name not in weight:
                continue
            p, a = weight[name], jnp.abs(m)
            a = jnp.where(a > 0, a, 1.0)  # a zero gate zeroes the weights: any step holds them
            if jnp.ndim(p.d) == 0:
                keep = kept(live[name])
                lo = jnp.min(jnp.where(keep, a, jnp.inf))
                hi = jnp.max(jnp.where(keep, a, -jnp.inf))
                if strict and not isinstance(lo, jax.core.Tracer) and float(hi) > float(lo) * (
                        1 + 1e-6):
                    raise ValueError(
                        f"site {name}: VIB gates at the layer output over a per-tensor weight "
                        f"quantizer with unequal gates ({float(lo):.4g}..{float(hi):.4g}) have "
                        "no exact folded form; finish the gate search (djpq folds the gates at "
                        "its end), or use CompressionSpec(per_channel=True).")
                a = jnp.where(jnp.isfinite(lo) & (hi <= lo * (1 + 1e-6)), lo, 1.0)
            else:
                a = a.reshape(jnp.shape(p.d))
            weight[name] = QuantParams(d=p.d * a, q_m=p.q_m * a, t=p.t)
    return new_vars, state.replace(weight=weight, gates=folded(gates))
