"""``flax.nnx`` modules as the functional ``apply(variables, x, ...)`` every part of jaxjpq takes.

``split(module) -> NnxModel(apply, variables)``: ``variables`` is ``{"params": ...,
"batch_stats": ...}`` of plain arrays (``nnx.Param`` leaves and ``nnx.BatchStat`` leaves), and
``apply`` behaves like a linen ``module.apply``: ``apply(variables, *args, train=False,
mutable=False, **kwargs)`` runs the module in train or eval mode and, with ``mutable``, also
returns the updated statistics ``{"batch_stats": ...}``. So ``jaxjpq.trace``, ``jaxjpq.init``,
the train loop (which updates the statistics as statistics, never as weights), ``slim`` and
``export`` take an nnx module unchanged; ``merge(model, variables)`` gives the module back with
trained values.
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
    if jax.tree.leaves(nnx.state(module, nnx.RngState)):
        raise ValueError(
            "this nnx module holds RNG state (e.g. nnx.Dropout with rngs): its functional apply "
            "would reuse the same random numbers every step. Build it without stateful RNG "
            "(e.g. Dropout rate 0 or deterministic=True) for jaxjpq.nnx.split."
        )
    return graphdef, params, stats, rest


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
        return nnx.merge(graphdef, p, s, rest)

    def apply(variables: Mapping, *args: Any, train: bool = False, mutable: Any = False,
              rngs: Any = None, **kwargs: Any) -> Any:
        del rngs  # the module holds no RNG state (checked in split)
        model = build(variables)
        if train:
            model.train()
        else:
            model.eval()
        out = model(*args, **kwargs)
        if mutable:
            new = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
            return out, ({"batch_stats": _str_keys(new)} if has_stats else {})
        return out

    apply.build = build
    return NnxModel(apply, variables)


def merge(model: NnxModel, variables: Mapping) -> Any:
    """The nnx module of ``model`` holding ``variables`` (e.g. trained or slim-compatible)."""
    return model.apply.build(variables)
