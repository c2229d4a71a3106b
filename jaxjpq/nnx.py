"""``flax.nnx`` modules as the functional ``apply(variables, x, ...)`` every part of jaxjpq takes.

``split(module) -> NnxModel(apply, variables)``: ``variables`` is ``{"params": ...,
"batch_stats": ...}`` of plain arrays (``nnx.Param`` leaves and ``nnx.BatchStat`` leaves), and
``apply`` behaves like a linen ``module.apply``: ``apply(variables, *args, train=False,
mutable=False, **kwargs)`` runs the module in train or eval mode and, with ``mutable``, also
returns the updated statistics ``{"batch_stats": ...}``. So ``jaxjpq.trace``, ``jaxjpq.init``,
the train loop (which updates the statistics as statistics, never as weights), ``slim`` and
``export`` take an nnx module unchanged; ``merge(model, variables)`` gives the module back with
trained values. A module with RNG streams (``nnx.Dropout(rate, rngs=...)``) draws in training
from the key of ``rngs={"dropout": key}`` (the train loop's key of the step), and is
deterministic in eval.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax


class NnxModel(NamedTuple):
    """A split nnx module.

    Attributes:
      apply: ``apply(variables, *args, train=False, mutable=False, **kwargs)``, linen-style.
      variables: ``{"params": {...}, "batch_stats": {...}}`` (no ``batch_stats`` key without
        BatchNorm-style statistics).
    """

    apply: Callable[..., Any]
    variables: dict[str, Any]


def _templates(module: Any):
    from flax import nnx

    graphdef, params, stats, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    return graphdef, params, stats, rest


def _streams(module: Any) -> tuple[str, ...]:
    """Names of the RNG streams ``module`` holds (e.g. ``("default",)`` for nnx.Dropout given
    ``nnx.Rngs(0)``)."""
    from flax import nnx

    return tuple(sorted({n.tag for _, n in nnx.iter_graph(module) if isinstance(n, nnx.RngStream)}))


def _str_keys(d: Any) -> Any:
    """Nested dict with string keys (nnx lists give int keys; jaxjpq's leaf keys are strings)."""
    if isinstance(d, Mapping):
        return {str(k): _str_keys(v) for k, v in d.items()}
    return d


def _like(d: Any, template: Any) -> Any:
    """``d`` (string keys) with the key types of ``template``."""
    if isinstance(template, Mapping):
        return {k: _like(d[str(k)], v) for k, v in template.items()}
    return d


def split(module: Any) -> NnxModel:
    """The functional view of ``module`` (see module docstring)."""
    from flax import nnx

    graphdef, params, stats, rest = _templates(module)
    streams = _streams(module)
    pure_p, pure_s = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    variables = {"params": _str_keys(pure_p)}
    has_stats = bool(jax.tree.leaves(stats))
    if has_stats:
        variables["batch_stats"] = _str_keys(pure_s)

    def build(variables: Mapping) -> Any:
        p = jax.tree.map(lambda a: a, params)
        nnx.replace_by_pure_dict(p, _like(variables["params"], pure_p))
        s = jax.tree.map(lambda a: a, stats)
        if has_stats:
            nnx.replace_by_pure_dict(s, _like(variables["batch_stats"], pure_s))
        return nnx.merge(graphdef, p, s, jax.tree.map(lambda a: a, rest))

    def apply(variables: Mapping, *args: Any, train: bool = False, mutable: Any = False,
              rngs: Any = None, **kwargs: Any) -> Any:
        model = build(variables)
        if train:
            model.train()
            if streams:
                key = _train_key(rngs)
                nnx.reseed(model, **{n: jax.random.fold_in(key, i)
                                     for i, n in enumerate(streams)})
        else:
            model.eval()
        out = model(*args, **kwargs)
        if mutable:
            new = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
            return out, ({"batch_stats": _str_keys(new)} if has_stats else {})
        return out

    apply.build = build
    return NnxModel(apply, variables)


def _train_key(rngs: Any) -> jax.Array:
    """The key an nnx module's RNG streams are reseeded from in a training call: ``rngs`` as
    linen takes it (``{"dropout": key}``, the train loop's per-step key) or one key."""
    if isinstance(rngs, Mapping) and rngs:
        return rngs["dropout"] if "dropout" in rngs else next(iter(rngs.values()))
    if rngs is not None:
        return rngs
    raise ValueError(
        "this nnx module draws random numbers in training (e.g. nnx.Dropout with rngs): pass "
        "rngs={'dropout': key} to apply with train=True (jaxjpq.train passes a fresh key each "
        "step), so no two steps reuse one mask.")


def merge(model: NnxModel, variables: Mapping) -> Any:
    """The nnx module of ``model`` holding ``variables`` (e.g. trained or slim-compatible)."""
    return model.apply.build(variables)
