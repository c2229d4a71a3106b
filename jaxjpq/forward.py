"""Forward adapters: how the training loop calls a model,
``forward(params, model_state, inputs, rng, train) -> (output, new_model_state)``, for a Flax
apply function (:class:`FlaxForward`) and for the compressed forward over the pair
``(model params, CompressionState)`` (:class:`CompressedForward`); the default loss and the
logits of a model that returns a tuple or a dict (:func:`output_logits`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from jaxjpq import cost
from jaxjpq.compress import compress_apply
from jaxjpq.sharding import host_value

PyTree = Any
Forward = Callable[[PyTree, PyTree, jax.Array, jax.Array, bool], tuple[jax.Array, PyTree]]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of logits [B, K] against int labels [B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def call_options(apply_fn: Callable[..., Any]) -> tuple[bool, bool]:
    """``(takes_train, takes_rngs)``: whether ``apply_fn`` (a linen ``module.apply`` or any
    function) accepts a ``train=`` keyword and an ``rngs=`` keyword."""
    owner = getattr(apply_fn, "__self__", None)
    try:
        import flax.linen as nn

        if isinstance(owner, nn.Module):  # linen apply: rngs/mutable are apply's own
            sig = inspect.signature(type(owner).__call__)
            params = sig.parameters.values()
            var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
            return ("train" in sig.parameters or var_kw), True
        sig = inspect.signature(apply_fn)
    except (TypeError, ValueError):
        return True, True
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return ("train" in sig.parameters or var_kw), ("rngs" in sig.parameters or var_kw)


class FlaxForward:
    """``Forward`` for a Flax-style ``apply(variables, x, train=..., mutable=..., rngs=...)``.

    ``model_state`` holds the non-param collections (e.g. ``{"batch_stats": ...}``); in training
    they are passed as mutable and their updated values returned; ``rng`` feeds ``dropout``. A
    model whose ``__call__`` takes no ``train`` (or an apply without ``rngs``) is called without
    it; ``call_kwargs`` are passed on every call (static keyword arguments of the model). Two
    wrappers of equal modules' ``apply`` compare equal, so ``train_step`` compiles once per model
    configuration rather than once per ``TrainState``.
    """

    def __init__(self, apply_fn: Callable[..., Any], *, options: tuple[bool, bool] | None = None,
                 **call_kwargs: Any):
        self.apply_fn = apply_fn
        self.options = call_options(apply_fn) if options is None else options
        self.call_kwargs = call_kwargs

    def _key(self) -> Any:
        owner = getattr(self.apply_fn, "__self__", None)
        func = getattr(self.apply_fn, "__func__", None)
        fn_key: Any = self.apply_fn
        if owner is not None and func is not None:
            try:
                hash(owner)
                fn_key = (owner, func)
            except TypeError:
                pass
        return (fn_key, self.options, tuple(sorted(self.call_kwargs.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlaxForward) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(self, params, model_state, inputs, rng, train):
        variables = {"params": params, **model_state}
        takes_train, takes_rngs = self.options
        kwargs = dict(self.call_kwargs)
        if takes_train:
            kwargs["train"] = train
        if takes_rngs:
            kwargs["rngs"] = {"dropout": rng}
        if train and model_state:
            logits, new_state = self.apply_fn(variables, inputs, mutable=list(model_state),
                                              **kwargs)
            return logits, dict(new_state)
        return self.apply_fn(variables, inputs, **kwargs), model_state


class CompressedForward:
    """``Forward`` whose params are the pair ``(model_params, CompressionState)``.

    Runs the masked, fake-quantized forward of ``apply_fn`` (a Flax-style apply) for the graph
    of the pair's state; non-param collections and the dropout rng are handled as in
    :class:`FlaxForward`; VIB gates (DJPQ) are sampled in training only, from a key independent
    of dropout's. Equal when built from equal ``apply_fn``, so jitted steps are reused.
    ``TrainState.params`` is then the pair, so orbax checkpoints carry the model params, the
    optimizer state and the compression state together, and a resumed run continues exactly.
    """

    def __init__(self, apply_fn: Callable[..., Any], **call_kwargs: Any):

        self.apply_fn = apply_fn
        self.fn = compress_apply(apply_fn)
        self.options = call_options(apply_fn)
        self.call_kwargs = call_kwargs

    def _key(self) -> Any:
        return FlaxForward(self.apply_fn, **self.call_kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompressedForward) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(self, params, model_state, inputs, rng, train):
        model_params, cstate = params
        gate_key = jax.random.fold_in(rng, 0x6A7E) if (train and cstate.gates) else None

        def apply(variables, x, **kwargs):
            return self.fn(variables, cstate, x, gate_key=gate_key, **kwargs)

        fwd = FlaxForward(apply, options=self.options, **self.call_kwargs)
        return fwd(model_params, model_state, inputs, rng, train)

    def budget_shortfall(self, params: PyTree) -> str | None:
        """:func:`jaxjpq.cost.budget_shortfall` of the pair's compression state."""
        return cost.budget_shortfall(host_value(params[1]))


def flax_forward(apply_fn: Callable[..., Any]) -> Forward:
    """Wraps a Flax ``module.apply`` as a ``Forward`` (see ``FlaxForward``)."""
    return FlaxForward(apply_fn)


def output_logits(output: Any) -> jax.Array:
    """The class logits in a model's output: the output itself when it is an array, its
    ``"logits"`` entry when it is a mapping, its first entry when it is a tuple or list;
    ``ValueError`` otherwise (give ``create_train_state(..., logits_fn=...)``)."""
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, tuple | list) and output:
        return output_logits(output[0])
    if hasattr(output, "shape") and not isinstance(output, Mapping):
        return output
    raise ValueError(
        f"cannot find class logits in a model output of type {type(output).__name__} "
        f"({jax.tree.structure(output)}); pass create_train_state(..., logits_fn=lambda out: "
        "...) returning the [B, K] logits.")
