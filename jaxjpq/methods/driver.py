"""What every method's training shares: the compressed forward as a ``train.Forward`` over
``(model_params, CompressionState)``, and the compression metrics shown while training.

A method trains with :func:`jaxjpq.train.train` unchanged: its ``TrainState.params`` is the pair,
so orbax checkpoints carry the model params, the optimizer state (e.g. ``GetaState``) and the
compression state together, and a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxjpq import cost
from jaxjpq.compress import compress_apply
from jaxjpq.graph import Graph
from jaxjpq.state import CompressionState
from jaxjpq.train import FlaxForward


class CompressedForward:
    """``train.Forward`` whose params are ``(model_params, CompressionState)``.

    Runs the masked, fake-quantized forward of ``apply_fn`` (a Flax-style apply) for ``graph``;
    non-param collections and the dropout rng are handled as in :class:`jaxjpq.train.FlaxForward`.
    Equal when built from equal ``apply_fn`` and the same graph, so jitted steps are reused.
    """

    def __init__(self, apply_fn: Callable[..., Any], graph: Graph):
        self.apply_fn = apply_fn
        self.graph = graph
        self.fn = compress_apply(apply_fn, graph)

    def _key(self) -> Any:
        return (FlaxForward(self.apply_fn), id(self.graph))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompressedForward) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(self, params, model_state, inputs, rng, train):
        model_params, cstate = params
        # VIB gates (DJPQ) are sampled in training only, from a key independent of dropout's.
        gate_key = jax.random.fold_in(rng, 0x6A7E) if (train and cstate.gates) else None

        def apply(variables, x, **kwargs):
            return self.fn(variables, cstate, x, gate_key=gate_key, **kwargs)

        return FlaxForward(apply)(model_params, model_state, inputs, rng, train)


def signedness(graph: Graph, state: CompressionState) -> tuple[dict[str, bool], dict[str, bool]]:
    """``({site: True}, {site: signed_input})`` for the weight and activation quantizers of
    ``state``: which quantizer tables use the signed bit formula."""
    sm = graph.site_map
    return {n: True for n in state.weight}, {n: bool(sm[n].signed_input) for n in state.act}


def compression_metrics(graph: Graph, state: CompressionState) -> dict[str, jax.Array]:
    """Exact figures of ``state``: ``sparsity`` (fraction of prunable units pruned),
    ``mean_bits`` (mean weight bits over the learned, non-frozen sites), ``rel_bops`` and
    ``rel_size`` (fractions of the fp32 model). jit-compatible."""
    sizes = [g.size for g in graph.prunable_groups]
    pruned = sum(jnp.sum(state.masks[g.id] < 0.5) for g in graph.prunable_groups)
    sparsity = pruned / max(sum(sizes), 1)
    learned = [n for n in state.weight if n not in state.frozen]
    bits = cost.bits(graph, state)
    mean_bits = (
        jnp.mean(jnp.stack([jnp.mean(jnp.asarray(bits[n][0], jnp.float32)) for n in learned]))
        if learned
        else jnp.asarray(32.0)
    )
    return {
        "sparsity": jnp.asarray(sparsity, jnp.float32),
        "mean_bits": mean_bits,
        "rel_bops": jnp.asarray(cost.relative_bops(graph, state), jnp.float32),
        "rel_size": jnp.asarray(cost.relative_size(graph, state), jnp.float32),
    }
