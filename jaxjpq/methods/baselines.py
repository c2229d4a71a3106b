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

from jaxjpq.graph import kept
from jaxjpq.methods import core
from jaxjpq.quant import init_from_tensor
from jaxjpq.units import UnitIndex, rank_in_group, unit_index


class StagedState(NamedTuple):
    """State of :func:`prune_then_quantize`.

    Attributes:
      step: int32 scalar, updates applied so far.
      inner_state: the inner optimizer's state over the model params.
    """

    step: jax.Array
    inner_state: optax.OptState


def magnitude_masks(index: UnitIndex, params, counts: np.ndarray) -> jax.Array:
    """float ``[U]``: 0 for the ``counts[g]`` smallest-norm units of each group, else 1."""
    seg = jnp.asarray(index.group_of_unit)
    rank = rank_in_group(index, core.magnitude(index, params))
    return jnp.where(rank < jnp.asarray(counts)[seg], 0.0, 1.0)


def prune_then_quantize(
    inner: optax.GradientTransformation,
    *,
    steps: int,
    sparsity: float,
    bits: float,
    prune_step: int,
    quantize_step: int,
    quant_lr: float = 1e-3,
    unit_multiple: int = 1,
) -> optax.GradientTransformation:
    """Magnitude channel pruning, fine-tuning, then uniform ``bits`` quantization with QAT.

    Args:
      inner: optimizer of the model params.
      steps: total updates; ``0 <= prune_step <= quantize_step <= steps``.
      sparsity: fraction of prunable units removed (0 = quantize-only).
      bits: uniform bit width of every learned (non-frozen) quantizer from ``quantize_step`` on;
        weight clips restart there at ``max|W|`` of the trained weights.
      quant_lr: SGD learning rate of the clips ``q_m`` during QAT.
      unit_multiple: kept widths rounded to a multiple of this (see
        :func:`jaxjpq.methods.core.per_group_counts`).
    """
    if not 0 <= prune_step <= quantize_step <= steps:
        raise ValueError(
            f"need 0 <= prune_step ({prune_step}) <= quantize_step ({quantize_step}) <= steps "
            f"({steps})."
        )
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}.")

    def init(model_params, cstate):
        if sparsity > 0:
            core.require_prunable(cstate.graph, "prune_then_quantize")
        core.per_group_counts(unit_index(cstate.graph, {"params": model_params}), sparsity,
                              unit_multiple)
        return StagedState(jnp.zeros((), jnp.int32), inner.init(model_params))

    def update(g_p, g_c, p, c, state):
        graph = c.graph
        index = unit_index(graph, {"params": p})
        counts = core.per_group_counts(index, sparsity, unit_multiple)
        s = state.step
        u_p, inner_state = inner.update(g_p, state.inner_state, p)
        masks = index.flat_masks(c.masks)
        new_masks = jnp.where(s == prune_step, magnitude_masks(index, p, counts), masks)
        u_p = core.hold(index, u_p, p, ~kept(new_masks), c)
        quantize, start = s >= quantize_step, s == quantize_step
        w_signed, a_signed = core.signedness(c)
        flat = traverse_util.flatten_dict({"params": p})
        sm = graph.site_map
        lr = jnp.asarray(quant_lr, jnp.float32)

        def quant(table, grads, signed, restart):
            qat = core.fixed_bits_step(table, grads, signed, c.frozen, lr=lr, b_lo=bits,
                                       b_hi=bits)

            def step(n, p_old):
                first = core.with_bits(restart[n], bits, signed[n]) if n in restart else qat[n]
                new = jax.tree.map(lambda a, b: jnp.where(start, a, b), first, qat[n])
                return jax.tree.map(lambda a, b: jnp.where(quantize, a, b), new, p_old)

            return core.map_learned(table, c.frozen, step)

        restart = {
            n: init_from_tensor(sm[n].take(flat[sm[n].weight]), bits,
                                sm[n].out_axes if q.d.ndim else None)
            for n, q in c.weight.items()
            if n not in c.frozen
        }
        c_new = c.replace(
            weight=quant(c.weight, g_c.weight, w_signed, restart),
            act=quant(c.act, g_c.act, a_signed, {}),
            masks=index.split(new_masks),
        )
        return u_p, c_new, StagedState(s + 1, inner_state)

    return core.pair_transform("prune_then_quantize", init, update)
