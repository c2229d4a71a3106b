"""Every method by name: how a method config (a mapping of its fields) becomes a state and a
transform, so a script names a method instead of branching on it.

Two families:

* ``"train"`` (``geta``, ``djpq``, ``prune_then_quantize``): the compressed pair is trained from
  the start; ``entry.init(apply_fn, variables, example, cfg, key)`` makes the pair and
  ``entry.transform(inner, steps, cfg)`` its optax transform;
* ``"search"`` (``fit``, ``uniform_magnitude``, ``ajpq``, ``ajpq_random``): a state is searched
  from a pre-trained model (``entry.search``, see :class:`SearchInputs`) and fine-tuned with
  :func:`jaxjpq.methods.core.qat` (``entry.transform``).

``cfg`` holds the method's fields as the experiment configs name them (e.g. ``sparsity``,
``bits``, ``target_bops``); :func:`get` raises ``ValueError`` listing the known names.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optax

from jaxjpq.compress import transform_variables
from jaxjpq.methods import ajpq, fit
from jaxjpq.methods.baselines import prune_then_quantize
from jaxjpq.methods.core import qat
from jaxjpq.methods.djpq import djpq
from jaxjpq.methods.djpq import init as djpq_init
from jaxjpq.methods.geta import DEFAULT_FRACTIONS, geta, make_schedule
from jaxjpq.state import CompressedParams, CompressionSpec, CompressionState
from jaxjpq.state import init as init_pair


@dataclasses.dataclass(frozen=True)
class SearchInputs:
    """What a search method reads beyond the state: the pre-trained variables, the training
    batches (FIT's Fisher), a held-out reward set (AJPQ's ``(inputs, labels)``), the budget
    (``{"size": ...}`` or ``{"bops": ...}``, plus ``reserve_bits``), the seed and progress."""

    variables: Mapping
    batches: Callable[[], Any] | None = None
    held: tuple[np.ndarray, np.ndarray] | None = None
    budget: Mapping[str, float] = dataclasses.field(default_factory=dict)
    seed: int = 0
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """One method.

    Attributes:
      name: the name scripts use (``config.method.name``).
      family: ``"train"`` or ``"search"`` (module docstring).
      config_prefix: file-name prefix of its experiment configs (``geta_mnist_cnn.py``).
      budget_fields: ``{budget kind: the cfg field that holds it}`` for budgets a sweep sets.
      transform: ``(inner, steps, cfg) -> GradientTransformation`` over the pair.
      init: train family: ``(apply_fn, variables, example, cfg, key) -> CompressedParams``.
      search: search family: ``(apply_fn, state, cfg, inputs: SearchInputs) -> (state, info)``;
        ``state`` is calibrated at the pre-trained variables.
      check: search family: ``(state, cfg) -> None``, raising before any training when the
        budget is out of reach.
    """

    name: str
    family: str
    config_prefix: str
    transform: Callable[[optax.GradientTransformation, int, Mapping], Any]
    budget_fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    init: Callable[..., CompressedParams] | None = None
    search: Callable[..., tuple[CompressionState, dict]] | None = None
    check: Callable[[CompressionState, Mapping], None] | None = None


METHODS: dict[str, MethodEntry] = {}


def register(entry: MethodEntry) -> MethodEntry:
    """Add ``entry`` under ``entry.name`` (``ValueError`` if the name is taken)."""
    if entry.name in METHODS:
        raise ValueError(f"method {entry.name!r} is already registered.")
    if entry.family not in ("train", "search"):
        raise ValueError(f"family must be 'train' or 'search', got {entry.family!r}.")
    METHODS[entry.name] = entry
    return entry


def get(name: str) -> MethodEntry:
    """The entry of ``name``; ``ValueError`` naming the known methods otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)} (and 'fp32', "
                         "the plain model).")
    return METHODS[name]


# ---------------------------------------------------------------------------------------------
# Train family
# ---------------------------------------------------------------------------------------------


def _geta_init(apply_fn, variables, example, cfg, key):
    return init_pair(apply_fn, variables, example, bits=tuple(cfg["bits"]),
                     budget={"sparsity": cfg["sparsity"]})


def _geta_tx(inner, steps, cfg):
    schedule = make_schedule(steps, fractions=tuple(cfg.get("schedule", DEFAULT_FRACTIONS)))
    return geta(inner, steps=steps, quant_lr=cfg["quant_lr"], bit_reduction=cfg["bit_reduction"],
                cost_power=cfg.get("cost_power", 0.0),
                allocation=cfg.get("allocation", "global"), schedule=schedule,
                cooldown_clips=cfg.get("cooldown_clips", False),
                unit_multiple=cfg.get("unit_multiple", 1),
                saliency_rule=cfg.get("saliency_rule", "jaxjpq"),
                joint_rule=cfg.get("joint_rule", "reference"),
                project_activations=cfg.get("project_activations", True))


def _djpq_init(apply_fn, variables, example, cfg, key):
    spec = CompressionSpec(bits=tuple(cfg["bits"]), budget={"bops": cfg["target_bops"]},
                           power_of_two=cfg["power_of_two"], init_bits=cfg["init_bits"],
                           learn_t=False)
    return djpq_init(apply_fn, variables, example, spec=spec, key=key,
                     log_sigma2=cfg["init_log_sigma2"], gate_at=cfg.get("gate_at", "weights"))


def _djpq_tx(inner, steps, cfg):
    return djpq(inner, steps=steps, gamma1=cfg["gamma1"], gamma2=cfg["gamma2"],
                gamma2_rate=cfg["gamma2_rate"], margin=cfg["margin"], quant_lr=cfg["quant_lr"])


def _ptq_init(apply_fn, variables, example, cfg, key):
    quantize = cfg["quantize_at"] < 1.0
    return init_pair(apply_fn, variables, example, quantize_weights=quantize,
                     quantize_activations=quantize)


def _ptq_tx(inner, steps, cfg):
    return prune_then_quantize(inner, steps=steps, sparsity=cfg["sparsity"], bits=cfg["bits"],
                               prune_step=int(cfg["prune_at"] * steps),
                               quantize_step=int(cfg["quantize_at"] * steps))


# ---------------------------------------------------------------------------------------------
# Search family
# ---------------------------------------------------------------------------------------------


def _qat_tx(inner, steps, cfg):
    return qat(inner, quant_lr=cfg["quant_lr"])


def _fit_check(state, cfg):
    if cfg.get("size", 0.0):  # an unreachable size is an error before any training
        fit.check_size_budget(state, float(cfg["size"]), int(cfg["levels"]),
                              cfg.get("size_metric", "export"))


def _reduced(info: fit.FisherInfo, reduce: str) -> fit.FisherInfo:
    return info.layer_mean() if reduce == "layer_mean" else info


def _fit_search(apply_fn, state, cfg, inputs: SearchInputs):
    info: dict[str, Any] = {}
    if cfg["name"] == "fit":
        t0 = time.perf_counter()
        fisher = fit.fisher(apply_fn, state.graph, inputs.variables, inputs.batches(),
                            chunk=int(cfg["chunk"]), max_samples=int(cfg["fisher_samples"]),
                            progress=inputs.progress)
        reduce = cfg.get("fisher_reduce", "diag")
        if reduce not in ("diag", "layer_mean"):
            raise ValueError(f"method.fisher_reduce must be 'diag' or 'layer_mean', got "
                             f"{reduce!r}.")
        info["fisher_seconds"] = time.perf_counter() - t0
        every = int(cfg.get("refisher_every", 0))
        refreshes = [0]

        def refisher(st):  # the Fisher of the compressed model at a node of the path
            refreshes[0] += 1
            return _reduced(fit.fisher(
                apply_fn, state.graph, transform_variables(inputs.variables, st),
                inputs.batches(), chunk=int(cfg["chunk"]),
                max_samples=int(cfg.get("refisher_samples", 4096)), progress=False), reduce)

        res = fit.search(_reduced(fisher, reduce), state, inputs.variables,
                         levels=int(cfg["levels"]), criterion=cfg.get("criterion", "fit"),
                         progress=inputs.progress, size_metric=cfg.get("size_metric", "export"),
                         refisher=refisher if every else None, refisher_every=every,
                         **inputs.budget)
        info.update(nodes_expanded=res.nodes_expanded, fit=res.fit,
                    fisher_refreshes=refreshes[0])
    else:
        res = fit.uniform_magnitude(state, inputs.variables, bits=float(cfg["uniform_bits"]),
                                    levels=int(cfg["levels"]),
                                    size_metric=cfg.get("size_metric", "export"),
                                    **inputs.budget)
    info.update(searched_bits=res.bits, searched_act_bits=res.act_bits,
                searched_sparsity=res.sparsity, searched_relative_size=res.relative_size,
                searched_relative_active_size=res.relative_active_size,
                searched_relative_bops=res.relative_bops)
    return res.state, info


def _ajpq_check(state, cfg):  # make_env names the smallest reachable figure
    ajpq.make_env(state, **{k: float(cfg[k]) for k in ("size", "bops") if cfg.get(k, 0.0)},
                  hierarchy=bool(cfg.get("hierarchy", False)))


def _ajpq_search(apply_fn, state, cfg, inputs: SearchInputs):
    if inputs.held is None:
        raise ValueError("ajpq needs a held-out reward set (SearchInputs.held).")
    hp = ajpq.Hyper(**cfg["agent"])
    res = ajpq.search(apply_fn, state, inputs.variables, *inputs.held,
                      episodes=int(cfg["episodes"]), hp=hp,
                      random_search=cfg["name"] == "ajpq_random", seed=inputs.seed,
                      eval_batch=int(cfg["eval_batch"]), max_prune=float(cfg["max_prune"]),
                      over_penalty=float(cfg["over_penalty"]),
                      hierarchy=bool(cfg.get("hierarchy", False)), progress=inputs.progress,
                      **inputs.budget)
    return res.state, dict(
        evaluations=res.evaluations, compiles=res.compiles, best_reward=res.reward,
        searched_accuracy=res.accuracy, reference_accuracy=res.reference,
        searched_bits=res.bits, searched_kept=res.kept,
        searched_relative_size=res.relative_size, searched_relative_bops=res.relative_bops,
        history=res.history)


_SEARCH_BUDGETS = {"size": "size", "bops": "bops"}

register(MethodEntry("geta", "train", "geta_", _geta_tx, init=_geta_init))
register(MethodEntry("djpq", "train", "djpq_", _djpq_tx, {"bops": "target_bops"},
                     init=_djpq_init))
register(MethodEntry("prune_then_quantize", "train", "ptq_", _ptq_tx, init=_ptq_init))
register(MethodEntry("fit", "search", "fit_", _qat_tx, _SEARCH_BUDGETS, search=_fit_search,
                     check=_fit_check))
register(MethodEntry("uniform_magnitude", "search", "uniform_", _qat_tx, _SEARCH_BUDGETS,
                     search=_fit_search, check=_fit_check))
register(MethodEntry("ajpq", "search", "ajpq_", _qat_tx, _SEARCH_BUDGETS, search=_ajpq_search,
                     check=_ajpq_check))
register(MethodEntry("ajpq_random", "search", "ajpq_", _qat_tx, _SEARCH_BUDGETS,
                     search=_ajpq_search, check=_ajpq_check))

__all__ = ["METHODS", "MethodEntry", "SearchInputs", "get", "register"]
