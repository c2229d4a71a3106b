"""FITCompress: per-layer weight bits and a global unstructured mask chosen by Fisher-information
path planning, to a size (or BOPs) budget; then the shared ``qat`` fine-tune.

1. :func:`fisher`: the empirical Fisher of a trained model from per-sample gradients (formed
   inside one batched backward pass per chunk, checked against ``vmap(grad)``; never the squared
   batch-mean gradient): the diagonal ``F = E[g²]`` of every site weight and the trace
   ``Tr(F_a) = E[Σ (∂L/∂x)²]`` of every site input.
2. :func:`fit_score`: FIT of a configuration,
   ``Σ_l Σ_i F_i · E[Δ_i²] + Σ_l Tr(F_a,l) · d_a,l² / 12`` with ``E[Δ²] = d_l² / 12`` for a kept
   weight quantized with step ``d_l`` and ``θ_i²`` for a pruned one (without masks: the paper's
   ``Σ Tr(F_w) d_w²/12 + Σ Tr(F_a) d_a²/12``).
3. :func:`search`: a best-first path through nodes (one bit option per quantized site, a global
   sparsity level of ``1 − logspace(0, −3, levels)``), from (``b_u`` everywhere, dense). A node's
   neighbours lower one site's bits one step or raise the sparsity one level (the weights of
   lowest importance ``F ⊙ θ²`` over all sites go). Each step moves to the neighbour with the
   smallest edge cost ``√(Σ F (θ' − θ'')²)`` (between the two nodes' weights) plus heuristic
   ``√((c − α)² · Σ F θ'²)`` (``c`` the node's relative size: the exported model's bits over the
   fp32 model's, or its relative BOPs; ``α`` the budget), until ``c ≤ α``; every move lowers
   ``c``, so the path ends within ``Σ bit options + levels`` steps. Every figure comes from
   per-site prefix sums in importance order, so a node costs O(sites). The final node becomes a
   ``CompressionState`` (bits via ``set_bits``, elementwise masks), checked against the exact
   cost model.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxjpq import cost
from jaxjpq.forward import cross_entropy
from jaxjpq.graph import Graph, kept
from jaxjpq.methods.core import one_budget, set_bits, with_bits
from jaxjpq.methods.fisher import fisher_apply, probed_apply
from jaxjpq.quant import (
    broadcast_params,
    effective_params,
    params_bits,
    quantize_with,
    step_from_bits,
)
from jaxjpq.sharding import replicate, shard_batch
from jaxjpq.state import (
    CompressedParams,
    CompressionState,
    check_state,
    effective_weight_quantizer,
    leaf,
    site_quantizer,
)

LEVELS = 40  # sparsity levels 1 - logspace(0, -3, LEVELS): 0 ... 0.999


class FisherInfo(NamedTuple):
    """Empirical Fisher of a model at its trained weights.

    Attributes:
      weight: ``{site: float32[weight_shape]}`` diagonal ``E[g²]`` of the site's weight (mean over
        samples of the squared per-sample gradient of the loss).
      act: ``{site: float}`` trace ``E[Σ (∂L/∂x)²]`` over the site's input ``x`` (one sample).
      samples: number of samples averaged.
    """

    weight: dict[str, np.ndarray]
    act: dict[str, float]
    samples: int

    def weight_trace(self) -> dict[str, float]:
        """``{site: Tr(F_w)}``."""
        return {s: float(np.sum(f)) for s, f in self.weight.items()}

    def layer_mean(self) -> FisherInfo:
        """Each site's diagonal replaced by its mean ``Tr(F_w) / numel``: FIT's per-layer form
        ``Tr(F) · E[Δ²]``, under which pruning importance is ``θ²`` within a layer and the
        layer's mean Fisher across layers."""
        return self._replace(weight={s: np.full_like(f, np.mean(f, dtype=np.float64))
                                     for s, f in self.weight.items()})


def fisher(
    apply_fn: Callable,
    graph: Graph,
    variables: Mapping,
    batches: Iterable[Mapping[str, Any]],
    *,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
    method: str = "auto",
    chunk: int = 64,
    max_samples: int | None = None,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    **call_kwargs: Any,
) -> FisherInfo:
    """Empirical Fisher of ``apply_fn`` at ``variables`` from per-sample gradients.

    Args:
      apply_fn, graph, variables: the traced model and its (trained) variables.
      batches: ``{"inputs": [B, ...], "labels": [B]}`` (as :func:`jaxjpq.data.batches` yields).
      loss_fn: ``(logits [1, ...], labels [1]) -> scalar`` for one sample (default: cross
        entropy).
      method: ``"per_sample"``: ``vmap(grad)`` of the whole model per sample; ``"batched"``: one
        batched backward pass whose site contractions form their own per-sample weight gradients
        (:func:`jaxjpq.methods.fisher.fisher_apply`; samples must be independent, batch on axis 0);
        ``"auto"``: ``"batched"`` once it matches ``"per_sample"`` on the first 4 samples
        (relative error 1e-3 per site), else ``"per_sample"`` with a warning.
      chunk: samples per call (bounds memory: ``chunk`` copies of the params' gradients, or of
        one site's weight gradient for ``"batched"``).
      max_samples: stop after this many samples (default: all batches).
      progress: a tqdm bar over the samples.
      mesh: split each chunk over this mesh's ``"data"`` axis (:func:`jaxjpq.train.data_mesh`;
        a chunk that does not divide evenly runs on one device).
      **call_kwargs: static keyword arguments of ``apply_fn`` (e.g. ``train=False``).
    Returns:
      :class:`FisherInfo` (host arrays).
    """
    from tqdm.auto import tqdm

    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}.")
    if method not in ("auto", "batched", "per_sample"):
        raise ValueError(f"method must be 'auto', 'batched' or 'per_sample', got {method!r}.")
    params = variables["params"]
    if mesh is not None:
        params = replicate(params, mesh)

    def make(m: str) -> Callable:
        return fisher_sums(apply_fn, graph, variables, loss_fn=loss_fn, method=m, **call_kwargs)

    fn = None if method == "auto" else make(method)
    split = sharded = None
    if mesh is not None:
        # Each device sums its share under shard_map and the sums are added across devices: left
        # to the SPMD partitioner, the batched per-sample conv weight gradients (a conv with
        # batch_group_count) come out wrong on a batch-sharded chunk (XLA CPU, jax 0.10).
        P = jax.sharding.PartitionSpec

        def split(f):
            return jax.jit(jax.shard_map(
                lambda p, xs, ys: jax.tree.map(lambda t: jax.lax.psum(t, "data"), f(p, xs, ys)),
                mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P(),
                check_vma=False))
    acc_w = {s.name: np.zeros(s.weight_shape, np.float64) for s in graph.sites}
    acc_a = {s.name: 0.0 for s in graph.sites}
    n = 0
    bar = tqdm(total=max_samples, desc="fisher", unit="sample", disable=not progress)
    for batch in batches:
        x, y = np.asarray(batch["inputs"]), np.asarray(batch["labels"])
        if max_samples is not None:
            x, y = x[: max_samples - n], y[: max_samples - n]
        if fn is None and len(x):
            fn = _choose(make, params, x[:4], y[:4])
        if sharded is None and split is not None and fn is not None:
            sharded = split(fn)  # once: a new shard_map per batch would compile again
        for i in range(0, len(x), chunk):
            xs, ys = x[i : i + chunk], y[i : i + chunk]
            if sharded is not None and len(xs) % mesh.shape["data"] == 0:
                xs, ys = shard_batch({"x": xs, "y": ys}, mesh).values()
                w, a = sharded(params, xs, ys)
            else:
                w, a = fn(params, xs, ys)
            for k in acc_w:
                acc_w[k] += np.asarray(w[k], np.float64)
                acc_a[k] += float(a[k])
            m = len(x[i : i + chunk])
            n += m
            bar.update(m)
        if max_samples is not None and n >= max_samples:
            break
    bar.close()
    if n == 0:
        raise ValueError("fisher got no samples; pass at least one batch.")
    bad = sorted(k for k in acc_w if not np.all(np.isfinite(acc_w[k])) or not
                 np.isfinite(acc_a[k]))
    if bad:
        raise ValueError(f"fisher: non-finite per-sample gradients at site(s) {bad}; check the "
                         "inputs and the model's weights.")
    return FisherInfo(weight={k: (v / n).astype(np.float32) for k, v in acc_w.items()},
                      act={k: v / n for k, v in acc_a.items()}, samples=n)


def fisher_sums(apply_fn: Callable, graph: Graph, variables: Mapping, *,
                loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
                method: str = "batched", **call_kwargs: Any) -> Callable:
    """The jitted pass of :func:`fisher` over one chunk: ``(params, xs [n, ...], ys [n]) ->
    ({site: Σ_n g_n² [weight_shape]}, {site: Σ_n ‖∂L_n/∂x_n‖²})``, ``method`` ``"batched"`` or
    ``"per_sample"`` (no check of one against the other); the non-params collections of
    ``variables`` are closed over."""
    rest = {k: v for k, v in variables.items() if k != "params"}
    if method == "batched":
        return _batched_sums(apply_fn, graph, rest, loss_fn, call_kwargs)
    if method == "per_sample":
        return _per_sample_sums(apply_fn, graph, rest, loss_fn, call_kwargs)
    raise ValueError(f"method must be 'batched' or 'per_sample', got {method!r}.")


def _per_sample_sums(apply_fn, graph, rest, loss_fn, call_kwargs) -> Callable:
    probed = probed_apply(apply_fn, graph)
    sites = list(graph.sites)
    probes0 = {s.name: jnp.zeros((), jnp.float32) for s in sites}

    def sample_loss(params, probes, x, y):
        logits = probed({"params": params, **rest}, probes, x[None], **call_kwargs)
        return loss_fn(logits, y[None])

    per_sample = jax.vmap(jax.grad(sample_loss, argnums=(0, 1)), in_axes=(None, None, 0, 0))

    @jax.jit
    def sums(params, xs, ys):
        gp, ga = per_sample(params, probes0, xs, ys)
        full = {"params": gp}
        w = {s.name: jnp.sum(jnp.square(jax.vmap(s.take)(leaf(full, s.weight))), axis=0)
             for s in sites}
        return w, {n: jnp.sum(v) for n, v in ga.items()}

    return sums


def _batched_sums(apply_fn, graph, rest, loss_fn, call_kwargs) -> Callable:
    """The same sums from one batched backward pass (:func:`jaxjpq.methods.fisher.fisher_apply`)."""
    tapped = fisher_apply(apply_fn, graph)
    probes0 = {s.name: (jnp.zeros((), jnp.float32), jnp.zeros(s.weight_shape, jnp.float32))
               for s in graph.sites}

    def total_loss(probes, params, xs, ys):
        logits = tapped({"params": params, **rest}, probes, xs, **call_kwargs)
        per = jax.vmap(lambda lg, t: loss_fn(lg[None], t[None]))(logits, ys)
        return jnp.sum(per)

    @jax.jit
    def sums(params, xs, ys):
        g = jax.grad(total_loss)(probes0, params, xs, ys)
        return {n: v[1] for n, v in g.items()}, {n: v[0] for n, v in g.items()}

    return sums


def _choose(make: Callable, params: Any, x: np.ndarray, y: np.ndarray) -> Callable:
    """The batched sums if they match the per-sample ones on ``(x, y)``, else the per-sample."""
    import warnings

    exact = make("per_sample")
    try:
        fast = make("batched")
        (wf, af), (we, ae) = fast(params, x, y), exact(params, x, y)
    except NotImplementedError as e:
        warnings.warn(f"fisher: per-sample vmap(grad) pass (the batched one does not apply: {e})",
                      stacklevel=3)
        return exact

    def close(a, b) -> bool:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b), initial=0.0)) <= 1e-3 * float(
            np.max(np.abs(b), initial=0.0)) + 1e-30

    off = sorted(k for k in we if not (close(wf[k], we[k]) and close(af[k], ae[k])))
    if off:
        warnings.warn(f"fisher: per-sample vmap(grad) pass (the batched one differs at site(s) "
                      f"{off}: shared weights, or samples that interact)", stacklevel=3)
        return exact
    return fast


def _weights(graph: Graph, variables: Mapping) -> dict[str, np.ndarray]:
    return {s.name: np.asarray(s.take(leaf(variables, s.weight)), np.float64)
            for s in graph.sites}


def fit_score(info: FisherInfo, state: CompressionState,
              variables: Mapping) -> float:
    """FIT of ``state`` (bits, elementwise masks) at ``variables``: the expected loss increase
    ``Σ_l [Σ_kept F_i d_l²/12 + Σ_pruned F_i θ_i²] + Σ_l Tr(F_a,l) d_a,l²/12`` (``d`` the
    quantizers' effective steps; a float site or input adds nothing)."""
    graph = check_state(state)
    w = _weights(graph, variables)
    total = 0.0
    for s in graph.sites:
        f = np.asarray(info.weight[s.name], np.float64)
        keep = (kept(np.asarray(state.weight_masks[s.name])) if s.name in state.weight_masks
                else np.ones(s.weight_shape, bool))
        total += float(np.sum(f[~keep] * w[s.name][~keep] ** 2))
        if s.name in state.weight:
            p = effective_weight_quantizer(state, s.name)
            d = np.broadcast_to(np.asarray(broadcast_params(p, len(s.weight_shape),
                                                            s.out_axes).d), s.weight_shape)
            total += float(np.sum(f[keep] * d[keep] ** 2) / 12.0)
        if s.name in state.act:
            p = effective_params(site_quantizer(state, "act", s.name), s.signed_input,
                                 state.power_of_two)
            total += info.act[s.name] * float(np.asarray(p.d)) ** 2 / 12.0
    return total


def importance(info: FisherInfo, graph: Graph, variables: Mapping) -> dict[str, np.ndarray]:
    """Elementwise pruning importance ``F ⊙ θ²`` per site (``weight_shape``)."""
    return _importance(info, _weights(graph, variables))


def _importance(info: FisherInfo, w: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: np.asarray(info.weight[n], np.float64) * x ** 2 for n, x in w.items()}


def sparsity_levels(levels: int = LEVELS) -> np.ndarray:
    """The global sparsity schedule ``1 − logspace(0, −3, levels)``: 0, ..., 0.999."""
    return 1.0 - np.logspace(0.0, -3.0, levels)


@dataclasses.dataclass
class _SiteTable:
    """Prefix sums of one site in ascending importance order (index k: the k least important
    weights pruned)."""

    name: str
    numel: int
    bits: list[float]  # bit options, highest first
    order: np.ndarray  # flat positions, ascending importance
    pruned: np.ndarray  # [numel + 1] Σ F θ² over the k pruned
    kept_q: np.ndarray  # [B, numel + 1] Σ F q_b² over the k pruned (kept = total - prefix)
    kept_err: np.ndarray  # [B, numel + 1] Σ F (θ - q_b)² over the k pruned
    step: np.ndarray  # [B - 1, numel + 1] Σ F (q_b - q_b+1)² over the k pruned
    macs: float  # kept MACs per example of the dense site (for BOPs)
    a_bits: list[float]  # input bit options, highest first ([32] for float inputs)
    a_step: list[float]  # FIT increase Tr(F_a)·(d_{i+1}² - d_i²)/12 of each lower option
    a_src: int  # table whose input index sets these input bits (itself, or a shared input's)

    def suffix(self, arr: np.ndarray, k: int) -> float:
        return float(arr[-1] - arr[k])


class SearchResult(NamedTuple):
    """What :func:`search` found.

    Attributes:
      pair: ``CompressedParams(variables["params"], chosen state)``, ready for ``qat``; the
        state (``.state``) has the bits (via ``set_bits``) and the elementwise masks.
      bits: ``{site: weight bits}``; act_bits: ``{activation quantizer (``Site.act_key``): input
        bits}`` (searched under a BOPs budget); sparsity: the global sparsity level reached.
      relative_size: exported model bits / fp32 model bits
        (:func:`jaxjpq.cost.relative_model_size`);
      relative_bops: :func:`jaxjpq.cost.relative_bops`.
      relative_active_size: :func:`jaxjpq.cost.relative_active_size`.
      fit: FIT of the chosen configuration (:func:`fit_score`).
      nodes_expanded: steps of the path; path: ``[(move, relative figure), ...]``.
    """

    pair: CompressedParams
    bits: dict[str, float]
    act_bits: dict[str, float]
    sparsity: float
    relative_size: float
    relative_bops: float
    relative_active_size: float
    fit: float
    nodes_expanded: int
    path: list

    @property
    def state(self) -> CompressionState:
        """The chosen state, ``pair.compression``."""
        return self.pair.compression


def _widths(hi: float, lo: float) -> list[float]:
    """The integer bit widths from ``hi`` down to ``lo``."""
    return [float(b) for b in range(int(math.floor(hi)), int(math.ceil(lo)) - 1, -1)]


def _bit_options(state: CompressionState, name: str) -> list[float]:
    if name in state.frozen or state.spec is None:
        b = params_bits(state.weight[name], True)
        return [float(np.round(np.max(np.asarray(b))))]
    lo, hi = state.spec.bits
    return _widths(hi, lo)


def _act_options(info: FisherInfo, state: CompressionState, site, search: bool
                 ) -> tuple[list[float], list[float]]:
    """A site's input bit options (highest first) and the FIT increase of each step down:
    the state's bits alone unless ``search`` and the site has a learned input quantizer."""
    key = site.act_key
    a = state.act.get(key)
    if a is None:
        return [32.0], []
    now = float(np.round(np.max(np.asarray(params_bits(a, site.signed_input)))))
    if not search or key in state.frozen or state.spec is None:
        return [now], []
    lo, hi = state.spec.bits
    options = _widths(min(hi, now), lo)
    d2 = [float(np.max(np.asarray(step_from_bits(b, a.q_m, a.t, site.signed_input)))) ** 2
          for b in options]
    tr = float(info.act.get(key, 0.0))
    return options, [tr * (d2[i + 1] - d2[i]) / 12.0 for i in range(len(options) - 1)]


def _tables(info: FisherInfo, state: CompressionState, variables: Mapping,
            levels: np.ndarray, act_search: bool = False
            ) -> tuple[list[_SiteTable], np.ndarray]:
    """Per-site prefix sums and ``k[l, s]``: weights of site ``l`` pruned at level ``s``; with
    ``act_search``, each learned input quantizer's bit options too."""
    graph = state.graph
    w = _weights(graph, variables)
    imp = _importance(info, w)
    sites = list(graph.sites)
    flat_imp = np.concatenate([imp[s.name].reshape(-1) for s in sites])
    owner = np.concatenate([np.full(imp[s.name].size, i) for i, s in enumerate(sites)])
    order = np.argsort(flat_imp, kind="stable")
    n_total = flat_imp.size
    counts = np.zeros((len(sites), len(levels)), np.int64)
    for j, lv in enumerate(levels):
        n_pruned = int(round(lv * n_total))
        counts[:, j] = np.bincount(owner[order[:n_pruned]], minlength=len(sites))
    per_example = cost.macs(graph)
    tables = []
    offsets = np.cumsum([0] + [imp[s.name].size for s in sites])
    pos = {s.name: i for i, s in enumerate(sites)}
    for i, s in enumerate(sites):
        theta = w[s.name].reshape(-1)
        f = np.asarray(info.weight[s.name], np.float64).reshape(-1)
        mine = order[(order >= offsets[i]) & (order < offsets[i + 1])] - offsets[i]
        th, fo = theta[mine], f[mine]
        quantized = s.name in state.weight
        options = _bit_options(state, s.name) if quantized else [32.0]
        qs = []
        for b in options:
            if not quantized:
                qs.append(theta)
                continue
            ws = jnp.asarray(w[s.name], jnp.float32)
            p = broadcast_params(with_bits(state.weight[s.name], b, True), ws.ndim, s.out_axes)
            qs.append(np.asarray(quantize_with(ws, p, True, state.power_of_two, state.learn_t),
                                 np.float64).reshape(-1))
        qo = [q[mine] for q in qs]

        def pre(x):
            return np.concatenate([[0.0], np.cumsum(x)])

        a_bits, a_step = _act_options(info, state, s, act_search)
        tables.append(_SiteTable(
            name=s.name, numel=theta.size, bits=options,
            order=mine,
            pruned=pre(fo * th ** 2),
            kept_q=np.stack([pre(fo * q ** 2) for q in qo]),
            kept_err=np.stack([pre(fo * (th - q) ** 2) for q in qo]),
            step=np.stack([pre(fo * (q1 - q2) ** 2) for q1, q2 in itertools.pairwise(qo)])
            if len(qo) > 1 else np.zeros((0, theta.size + 1)),
            macs=float(per_example[s.name]), a_bits=a_bits, a_step=a_step,
            a_src=pos[s.act_key],
        ))
    return tables, counts


def _parts(tables: list[_SiteTable], node: tuple) -> tuple[tuple, tuple, int]:
    """A search node ``(weight-bit index per site, [input-bit index per site,] level)`` as
    ``(weight indices, input indices, level)``; without input indices, each site's first."""
    n = len(tables)
    if len(node) == n + 1:
        return tuple(node[:n]), (0,) * n, int(node[n])
    return tuple(node[:n]), tuple(node[n:2 * n]), int(node[2 * n])


def _figures(tables: list[_SiteTable], counts: np.ndarray, node: tuple, fp32_bits: float,
             fp32_bops: float, extra_bits: float = 0.0, indices: bool = True
             ) -> tuple[float, float]:
    """(relative size, relative BOPs) of ``node`` (:func:`_parts`); ``extra_bits`` (scales,
    float leaves) count in the size, and the sparse indices when ``indices``."""
    bi, ai, s = _parts(tables, node)
    size, bops = extra_bits, 0.0
    for t, b, k in zip(tables, bi, counts[:, s], strict=True):
        kept = t.numel - int(k)
        bits = t.bits[b]
        index = (0.0 if k == 0 or kept == 0 or not indices
                 else float(cost.sparse_index_bits(kept, t.numel, t.numel)))
        size += kept * bits + index
        bops += t.macs * kept / t.numel * bits * t.a_bits[ai[t.a_src]]
    return size / fp32_bits, bops / fp32_bops


def size_floor(state: CompressionState, levels: int = LEVELS, size_metric: str = "export"
               ) -> float:
    """A lower bound of the relative size (:func:`jaxjpq.cost.relative_size_of`) any
    :func:`search` node reaches, from shapes alone (no Fisher needed): the weights left at the
    last sparsity level, each at the lowest bits any site allows, without indices (plus the
    scales and float leaves for the ``"export"`` metric)."""
    graph = state.graph
    lowest = min((_bit_options(state, n)[-1] for n in state.weight), default=32.0)
    if any(s.name not in state.weight for s in graph.sites):
        lowest = min(lowest, 32.0)
    n = sum(math.prod(s.weight_shape) for s in graph.sites)
    kept = n - int(round(sparsity_levels(levels)[-1] * n))
    if _active(size_metric):
        return kept * lowest / cost.fp32_size_bits(graph)
    return (cost.fixed_bits(state) + kept * lowest) / cost.fp32_model_bits(graph)


def _active(size_metric: str) -> bool:
    if size_metric not in cost.SIZE_METRICS:
        raise ValueError(f"size_metric must be one of {cost.SIZE_METRICS}, got {size_metric!r}.")
    return size_metric == "active"


def check_size_budget(state: CompressionState, size: float,
                      levels: int = LEVELS, size_metric: str = "export") -> None:
    """Raise ``ValueError`` before any work when ``size`` is below :func:`size_floor`."""
    floor = size_floor(state, levels, size_metric)
    if size < floor:
        raise ValueError(
            f"size budget {size:.4%} is below the smallest reachable configuration (at least "
            f"{floor:.4%} of fp32: the scales and float leaves alone, e.g. embeddings, with "
            f"every site at its lowest bits and sparsity {sparsity_levels(levels)[-1]:.3f}); "
            "raise the budget or give a BOPs budget."
        )


def search(
    info: FisherInfo,
    state: CompressionState,
    variables: Mapping,
    *,
    size: float | None = None,
    bops: float | None = None,
    levels: int = LEVELS,
    reserve_bits: float = 0.0,
    criterion: str = "fit",
    progress: bool = True,
    size_metric: str = "export",
    refisher: Callable[[CompressionState], FisherInfo] | None = None,
    refisher_every: int = 0,
) -> SearchResult:
    """The best-first FIT path (module docstring) to ``size`` (the exported model's bits
    relative to the fp32 model's, :func:`jaxjpq.cost.relative_model_size`: codes, indices,
    scales and float leaves) or ``bops`` (:func:`jaxjpq.cost.relative_bops`). ``reserve_bits``
    count in the size on top (e.g. the container's own bytes on disk, so that the saved
    directory meets ``size``).
    ``criterion``: ``"fit"`` (each step takes the neighbour of least edge cost + heuristic),
    ``"rate"`` (the neighbour of least edge cost per unit of the budget figure it removes) or
    ``"least_fit"`` (no path: the node within the budget of least FIT damage
    ``Σ_l [Σ_pruned F θ² + Σ_kept F (θ − q_b)²]``, per sparsity level by Lagrangian relaxation
    over the sites' bit options, then the best level; inputs keep their bits).

    ``state`` fixes which sites are quantized, their bit range (``state.spec.bits``: each learned
    site's options are the integers from ``b_u`` down to ``b_l``; frozen sites keep theirs), the
    activation quantizers and per-tensor or per-channel steps. Under a BOPs budget a move may
    also lower one learned input quantizer's bits (within the same range, from its current
    bits), at edge cost ``√(Tr(F_a)·(d'² - d²)/12)``, the FIT term of the input; under a size
    budget inputs keep their bits. Raises ``ValueError`` naming the smallest reachable figure
    when the budget is below it.

    ``size_metric``: ``"export"`` (the default, above) or ``"active"`` (the paper's: the kept
    weights at their bits over the site weights in float32,
    :func:`jaxjpq.cost.relative_active_size`; ``reserve_bits`` then ignored).

    ``refisher``, ``refisher_every`` (path criteria): every ``refisher_every`` moves the Fisher
    is estimated again at the path's current node, ``refisher(state of the node)`` (e.g.
    :func:`fisher` at :func:`jaxjpq.compress.transform_variables`), and the tables rebuilt: the
    importance order (which weights each sparsity level prunes) and the edge costs follow the
    compressed model, as the reference re-estimates at each expanded node.
    """
    kind, alpha = one_budget(size, bops)
    active = _active(size_metric)
    if criterion not in ("fit", "rate", "least_fit"):
        raise ValueError(f"criterion must be 'fit', 'rate' or 'least_fit', got {criterion!r}.")
    graph = check_state(state)
    if refisher_every < 0 or (refisher_every > 0) != (refisher is not None):
        raise ValueError("re-estimating the Fisher needs both refisher= (a callable) and "
                         f"refisher_every >= 1 (got {refisher_every}).")
    lv = sparsity_levels(levels)
    tables, counts = _tables(info, state, variables, lv, act_search=kind == "bops")
    figure = _figure_fn(state, tables, counts, kind, reserve_bits, active)

    def rebuild(node):
        new = refisher(_to_state(state, tables, counts, node))
        t, k = _tables(new, state, variables, lv, act_search=kind == "bops")
        return new, t, k, _figure_fn(state, t, k, kind, reserve_bits, active)

    floor_node = (*[len(t.bits) - 1 for t in tables], *[len(t.a_bits) - 1 for t in tables],
                  len(lv) - 1)
    floor = figure(floor_node)
    if alpha < floor:
        raise ValueError(
            f"{kind} budget {alpha:.4%} is below the smallest reachable configuration "
            f"({floor:.4%} of fp32: every site at its lowest bits, sparsity {lv[-1]:.3f})."
        )

    if criterion == "least_fit":
        node, expanded = _least_fit_node(tables, counts, figure, alpha, len(lv), progress)
        c = figure(node)
        path = [("least_fit", c)]
    else:
        node, c, path, refreshed = _path(tables, counts, figure, alpha, lv, criterion, kind,
                                         progress, rebuild if refisher else None,
                                         refisher_every)
        expanded = len(path)
        if refreshed is not None:
            info, tables, counts, figure = refreshed
    out = _to_state(state, tables, counts, node)
    if kind == "bops":
        exact = float(cost.relative_bops(out))
    elif active:
        exact = float(cost.relative_active_size(out))
    else:
        exact = cost.relative_model_size(out) + reserve_bits / cost.fp32_model_bits(graph)
    if exact > alpha + 1e-12:
        raise AssertionError(f"fit search: the exact {kind} {exact} of the chosen state exceeds "
                             f"the budget {alpha} (table {c}); please report this.")
    return _result(tables, lv, node, variables["params"], out, fit_score(info, out, variables),
                   expanded, path)


def _path(tables: list[_SiteTable], counts: np.ndarray, figure: Callable[[tuple], float],
          alpha: float, lv: np.ndarray, criterion: str, kind: str, progress: bool,
          rebuild: Callable | None = None, every: int = 0) -> tuple[tuple, float, list, Any]:
    """The best-first walk of :func:`search` (``criterion`` "fit" or "rate") from the all-first
    node until ``figure <= alpha``: ``(node, its figure, [(move, figure), ...], the last
    (info, tables, counts, figure) of ``rebuild(node)``, called every ``every`` moves, or
    None)``."""
    from tqdm.auto import tqdm

    def heuristic(node, c):
        bi, _, s = _parts(tables, node)
        norm = sum(t.suffix(t.kept_q[b], int(counts[i, s]))
                   for i, (t, b) in enumerate(zip(tables, bi, strict=True)))
        return math.sqrt(max(c - alpha, 0.0) ** 2 * norm)

    node = (0,) * (2 * len(tables) + 1)
    c = figure(node)
    path: list = []
    bar = tqdm(desc=f"fit search ({kind} budget {alpha:.2%})", unit="step", disable=not progress)
    refreshed = None
    while c > alpha:
        if rebuild is not None and path and len(path) % every == 0:
            refreshed = rebuild(node)
            _, tables, counts, figure = refreshed
            c = figure(node)  # the level's pruned weights follow the new order
            if c <= alpha:
                break
        bi, ai, s = _parts(tables, node)
        moves = []
        for i, t in enumerate(tables):  # one site one bit option lower
            if bi[i] + 1 < len(t.bits):
                nxt = (*bi[:i], bi[i] + 1, *bi[i + 1 :], *ai, s)
                edge = math.sqrt(max(t.suffix(t.step[bi[i]], int(counts[i, s])), 0.0))
                moves.append((f"{t.name}->{t.bits[bi[i] + 1]:g}b", nxt, edge))
            if t.a_src == i and ai[i] + 1 < len(t.a_bits):  # its input one option lower (BOPs)
                nxt = (*bi, *ai[:i], ai[i] + 1, *ai[i + 1 :], s)
                edge = math.sqrt(max(t.a_step[ai[i]], 0.0))
                moves.append((f"{t.name} input->{t.a_bits[ai[i] + 1]:g}b", nxt, edge))
        if s + 1 < len(lv):  # one sparsity level up
            edge = math.sqrt(max(sum(
                float(t.kept_q[b][counts[i, s + 1]] - t.kept_q[b][counts[i, s]])
                for i, (t, b) in enumerate(zip(tables, bi, strict=True))), 0.0))
            moves.append((f"sparsity->{lv[s + 1]:.4f}", (*bi, *ai, s + 1), edge))
        best = None
        for label, nxt, edge in moves:
            cn = figure(nxt)
            if criterion == "fit":
                f = edge + heuristic(nxt, cn)
            else:
                f = edge / max(c - cn, 1e-300)
            if best is None or f < best[0]:
                best = (f, label, nxt, cn)
        _, label, node, c = best  # a move always exists above the floor
        path.append((label, c))
        bar.update(1)
        bar.set_postfix({kind: f"{c:.4f}"})
    bar.close()
    return node, c, path, refreshed


def _figure_fn(state: CompressionState, tables: list[_SiteTable], counts: np.ndarray,
               kind: str, reserve_bits: float, active: bool = False
               ) -> Callable[[tuple], float]:
    """``node -> relative size (kind "size": the export's with reserve_bits, or with
    ``active`` the kept weights' bits over their float32 bits) or relative BOPs``."""
    graph = state.graph
    fp32_bops = cost.fp32_bops(graph)
    if active:
        fp32_bits, extra = cost.fp32_size_bits(graph), 0.0
    else:
        fp32_bits = cost.fp32_model_bits(graph)
        extra = cost.fixed_bits(state) + float(reserve_bits)
    pick = 0 if kind == "size" else 1
    return lambda node: _figures(tables, counts, node, fp32_bits, fp32_bops, extra,
                                 indices=not active)[pick]


def _least_fit_node(tables: list[_SiteTable], counts: np.ndarray,
                    figure: Callable[[tuple], float], alpha: float, levels: int,
                    progress: bool) -> tuple[tuple, int]:
    """The node within ``figure <= alpha`` of least FIT damage, weight bits and sparsity level
    searched, each input at its first option. Per level, the damage ``D_l(b)`` and budget share
    ``S_l(b)`` of each site's options are separable, so ``min Σ D s.t. Σ S <= alpha`` is solved
    by Lagrangian relaxation (per site ``argmin D + λ S``, ``λ`` by bisection; then the freed
    budget raises the bits of the site that gains the most damage per unit of figure). Returns
    ``(node, nodes scored)``."""
    from tqdm.auto import tqdm

    n = len(tables)
    best, scored = None, 0
    for s in tqdm(range(levels), desc="least-FIT levels", disable=not progress):
        ks = [int(counts[i, s]) for i in range(n)]
        dmg = [np.array([t.pruned[k] + t.suffix(t.kept_err[b], k) for b in range(len(t.bits))])
               for t, k in zip(tables, ks, strict=True)]

        def node_of(bi, s=s):
            return (*bi, *(0,) * n, s)

        base = figure(node_of([0] * n))
        # a site's share of the figure at each option: the figure's change from all-first options
        share = [np.array([figure(node_of([0] * i + [b] + [0] * (n - i - 1))) - base
                           for b in range(len(t.bits))]) for i, t in enumerate(tables)]
        scored += sum(len(t.bits) for t in tables)

        def pick(lam, dmg=dmg, share=share):
            return [int(np.argmin(d + lam * c)) for d, c in zip(dmg, share, strict=True)]

        lo_bits = [len(t.bits) - 1 for t in tables]
        if figure(node_of(lo_bits)) > alpha:
            continue  # this level cannot meet the budget
        lo, hi = 0.0, 1.0
        while figure(node_of(pick(hi))) > alpha and hi < 1e300:
            hi *= 4.0
        for _ in range(100):  # bisection on λ: the least λ whose choice meets the budget
            mid = 0.5 * (lo + hi)
            if figure(node_of(pick(mid))) > alpha:
                lo = mid
            else:
                hi = mid
        bi = pick(hi)
        if figure(node_of(bi)) > alpha:
            bi = lo_bits
        while True:  # spend what is left: one option up where it buys the most damage
            c = figure(node_of(bi))
            ups = []
            for i in range(n):
                if bi[i] > 0:
                    up = bi[:i] + [bi[i] - 1] + bi[i + 1:]
                    cu = figure(node_of(up))
                    if cu <= alpha:
                        gain = dmg[i][bi[i]] - dmg[i][bi[i] - 1]
                        ups.append((gain / max(cu - c, 1e-300), up))
            if not ups:
                break
            bi = max(ups, key=lambda u: u[0])[1]
        total = float(sum(d[b] for d, b in zip(dmg, bi, strict=True)))
        scored += 1
        if best is None or total < best[0]:
            best = (total, node_of(bi))
    if best is None:
        raise ValueError(f"budget {alpha:.4%} is out of reach with every input at its bits "
                         "(criterion 'least_fit' searches weight bits and sparsity only); use "
                         "criterion 'fit' to lower input bits too.")
    return best[1], scored


def _result(tables: list[_SiteTable], lv: np.ndarray, node: tuple, params: Any,
            out: CompressionState, fit: float, steps: int, path: list) -> SearchResult:
    bi, ai, s = _parts(tables, node)
    return SearchResult(
        pair=CompressedParams(params, out),
        bits={t.name: t.bits[b] for t, b in zip(tables, bi, strict=True)},
        act_bits={t.name: t.a_bits[a] for i, (t, a) in enumerate(zip(tables, ai, strict=True))
                  if t.a_bits != [32.0] and t.a_src == i},
        sparsity=float(lv[s]), relative_size=cost.relative_model_size(out),
        relative_bops=float(cost.relative_bops(out)),
        relative_active_size=float(cost.relative_active_size(out)), fit=fit, nodes_expanded=steps,
        path=list(path),
    )


def _to_state(state: CompressionState, tables: list[_SiteTable],
              counts: np.ndarray, node: tuple) -> CompressionState:
    graph = state.graph
    bi, ai, s = _parts(tables, node)
    sm = graph.site_map
    masks = dict(state.weight_masks)
    out = state
    for i, (t, b, a) in enumerate(zip(tables, bi, ai, strict=True)):
        k = int(counts[i, s])
        if k:
            m = np.ones(t.numel, np.float32)
            m[t.order[:k]] = 0.0
            masks[t.name] = jnp.asarray(m.reshape(sm[t.name].weight_shape))
        if t.name in state.weight and t.name not in state.frozen:
            out = set_bits(out, t.name, t.bits[b])
        if len(t.a_bits) > 1 and t.a_src == i:
            out = set_bits(out, t.name, t.a_bits[a], kind="act")
    return out.replace(weight_masks=masks)


def uniform_magnitude(
    state: CompressionState,
    variables: Mapping,
    *,
    bits: float,
    size: float | None = None,
    bops: float | None = None,
    levels: int = LEVELS,
    reserve_bits: float = 0.0,
    size_metric: str = "export",
) -> SearchResult:
    """The baseline at the same budget (``size_metric`` as in :func:`search`): every learned
    site at ``bits`` (under a BOPs budget its learned input quantizer too), then the lowest
    global magnitude-pruning level (``|θ|`` over all sites, the same schedule as :func:`search`)
    whose size / BOPs (plus ``reserve_bits``, as in :func:`search`) is within the budget."""
    kind, alpha = one_budget(size, bops)
    graph = check_state(state)
    ones = FisherInfo(weight={s.name: np.ones(s.weight_shape, np.float32) for s in graph.sites},
                      act={s.name: 0.0 for s in graph.sites}, samples=1)
    lv = sparsity_levels(levels)
    tables, counts = _tables(ones, state, variables, lv, act_search=kind == "bops")
    bi = []
    for t in tables:
        if float(bits) in t.bits:
            bi.append(t.bits.index(float(bits)))
        elif len(t.bits) == 1 or t.name not in state.weight:  # frozen or float: as they are
            bi.append(0)
        else:
            raise ValueError(f"bits={bits} is outside site {t.name}'s options {t.bits}.")
    # inputs at the same bits where that is an option (BOPs budgets), else as they are
    ai = [t.a_bits.index(float(bits)) if float(bits) in t.a_bits else 0 for t in tables]
    figure = _figure_fn(state, tables, counts, kind, reserve_bits, _active(size_metric))
    for s in range(len(lv)):
        node = (*bi, *ai, s)
        if figure(node) <= alpha:
            out = _to_state(state, tables, counts, node)
            return _result(tables, lv, node, variables["params"], out, float("nan"), 0, [])
    raise ValueError(f"uniform {bits:g} bits cannot reach the budget {alpha:.4%} even at "
                     f"sparsity {lv[-1]:.3f}; lower the bits.")
