"""Staged baselines on the same core as the joint methods: prune-then-quantize, prune-only and
quantize-only, as one optax transform over ``(params, CompressionState)``.

Stages, chosen from the step count inside one jitted ``update``:

1. ``step < prune_step``: train the weights; quantizers stay at their initial bits (16 by default,
   or none at all for prune-only), masks all 1;
2. at ``prune_step``: magnitude channel pruning — in every prunable group the units with the
   smallest L2 norm of their ``params`` slices are removed, the same fraction in each group
   (largest-remainder rounding so that the total is exactly ``round(sparsity · U)``);
3. ``prune_step <= step < quantize_step``: fine-tune the kept weights (pruned ones held at 0);
4. from ``quantize_step``: uniform quantization at ``bits`` for every learned quantizer, then QAT:
   weights and clips ``q_m`` train, and ``d = d(bits)`` is re-imposed after every step.

``sparsity = 0`` gives quantize-only; ``quantize_step >= steps`` gives prune-only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxjpq.graph import Graph
from jaxjpq.methods.driver import signedness
from jaxjpq.quant import QuantParams, clip_sgd_step, init_from_tensor, step_from_bits
from jaxjpq.state import check_state
from jaxjpq.units import UnitIndex, hold_zero, rank_in_group, unit_index, unit_sum


class StagedState(NamedTuple):
    """State of :func:`prune_then_quantize`.

    Attributes:
      step: int32 scalar, updates applied so far.
      inner_state: the inner optimizer's state over the model params.
    """

    step: jax.Array
    inner_state: optax.OptState


def per_group_counts(index: UnitIndex, sparsity: float) -> np.ndarray:
    """int ``[G]``: units to remove per group, the same fraction everywhere, summing exactly to
    ``round(sparsity · U)``; every group keeps at least one unit."""
    sizes = np.diff(index.offsets)
    total = int(round(sparsity * index.num_units))
    if total > index.num_units - index.num_groups:
        raise ValueError(
            f"sparsity {sparsity} removes {total} of {index.num_units} units, but each of the "
            f"{index.num_groups} groups must keep one; lower it."
        )
    ideal = sizes * total / max(index.num_units, 1)
    counts = np.minimum(np.floor(ideal).astype(np.int64), sizes - 1)
    order = np.argsort(-(ideal - counts), kind="stable")
    for j in order:
        if counts.sum() >= total:
            break
        if counts[j] < sizes[j] - 1:
            counts[j] += 1
    while counts.sum() < total:  # remainders exhausted: fill groups with room left
        j = int(np.argmax(sizes - 1 - counts))
        counts[j] += 1
    return counts


def magnitude_masks(index: UnitIndex, params, counts: np.ndarray) -> jax.Array:
    """float ``[U]``: 0 for the ``counts[g]`` smallest-norm units of each group, else 1."""
    norms = jnp.sqrt(unit_sum(index, lambda x: x * x, params))
    seg = jnp.asarray(index.group_of_unit)
    return jnp.where(rank_in_group(index, norms) < jnp.asarray(counts)[seg], 0.0, 1.0)


def prune_then_quantize(
    inner: optax.GradientTransformation,
    graph: Graph,
    *,
    steps: int,
    sparsity: float,
    bits: float,
    prune_step: int,
    quantize_step: int,
    quant_lr: float = 1e-3,
) -> optax.GradientTransformation:
    """Magnitude channel pruning, fine-tuning, then uniform ``bits`` quantization with QAT.

    Args:
      inner: optimizer of the model params.
      graph: the traced graph; the compression state must come from ``jaxjpq.init(graph, ...)``.
      steps: total updates; ``0 <= prune_step <= quantize_step <= steps``.
      sparsity: fraction of prunable units removed (0 = quantize-only).
      bits: uniform bit width of every learned (non-frozen) quantizer from ``quantize_step`` on;
        weight clips restart there at ``max|W|`` of the trained weights.
      quant_lr: SGD learning rate of the clips ``q_m`` during QAT.
    """
    if not 0 <= prune_step <= quantize_step <= steps:
        raise ValueError(
            f"need 0 <= prune_step ({prune_step}) <= quantize_step ({quantize_step}) <= steps "
            f"({steps})."
        )
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}.")

    def init_fn(params):
        model_params, cstate = params
        check_state(graph, cstate)
        per_group_counts(unit_index(graph, {"params": model_params}), sparsity)
        return StagedState(jnp.zeros((), jnp.int32), inner.init(model_params))

    def quant_updates(table, grads, signed, frozen, start, quantize, restart):
        out = {}
        for name, p in table.items():
            if name in frozen:
                out[name] = jax.tree.map(jnp.zeros_like, p)
                continue
            q_m = clip_sgd_step(p.q_m, grads[name].q_m, quant_lr)
            if name in restart:
                q_m = jnp.where(start, restart[name].q_m, q_m)
            new = QuantParams(d=step_from_bits(bits, q_m, p.t, signed[name]), q_m=q_m, t=p.t)
            out[name] = jax.tree.map(lambda a, b: jnp.where(quantize, a - b, 0.0), new, p)
        return out

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("prune_then_quantize needs params: update(updates, state, params).")
        g_p, g_c = updates
        p, c = params
        index = unit_index(graph, {"params": p})
        counts = per_group_counts(index, sparsity)
        s = state.step
        u_p, inner_state = inner.update(g_p, state.inner_state, p)
        masks = index.flat_masks(c.masks)
        new_masks = jnp.where(s == prune_step, magnitude_masks(index, p, counts), masks)
        u_p = hold_zero(index, u_p, p, new_masks < 0.5)
        quantize, start = s >= quantize_step, s == quantize_step
        w_signed, a_signed = signedness(graph, c)
        flat = traverse_util.flatten_dict({"params": p})
        sm = graph.site_map
        restart = {
            n: init_from_tensor(flat[sm[n].weight], bits, sm[n].out_axes if q.d.ndim else None)
            for n, q in c.weight.items()
            if n not in c.frozen
        }
        u_c = c.replace(
            weight=quant_updates(c.weight, g_c.weight, w_signed, c.frozen, start, quantize,
                                 restart),
            act=quant_updates(c.act, g_c.act, a_signed, c.frozen, start, quantize, {}),
            masks=index.split(new_masks - masks),
        )
        return (u_p, u_c), StagedState(s + 1, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)
