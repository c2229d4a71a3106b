"""Cost model: MACs, BOPs and model size of a compressed graph, soft (differentiable) and exact.

Every site knows, for each axis of its weight and of each of its contractions, which units of
which groups own its positions (:class:`jaxjpq.graph.AxisUnits`: concat offsets, flatten rows,
head dims). Slimming removes positions of each axis independently, so per site ``l``:

    kept MACs_l = Σ_terms MACs_t · Π_axes kept(axis) / size(axis)
    nnz_l,c     = kept weight entries of output channel c (elementwise mask applied)
    BOPs_l      = kept MACs_l / kept numel_l · Σ_c nnz_l,c · b_w,l,c · b_a,l
    size_l      = Σ_c nnz_l,c · b_w,l,c  (+ the sparse index when the site is sparse: a bitmap
                  of 1 bit per kept position or a list of nnz_l positions of
                  ceil(log2 numel_l) bits, whichever is smaller)

so a channel with no kept weight holds 0 bits and costs nothing. Unquantized operands count 32
bits. All figures are per example (the traced batch divided out).

* **soft**: continuous bits ``b(d, q_m, t)`` (power-of-two states: rounded with a straight-through
  gradient), masks clipped to [0, 1] and used as keep probabilities (times the VIB gates' keep
  probabilities when ``state.gates`` is set), elementwise masks likewise. float32, differentiable.
* **exact**: storage bits ``ceil(b)`` (what :mod:`jaxjpq.export` stores; power-of-two states: the
  rounded {2, 4, 8}), masks thresholded at 0.5. Computed in float64, on the host with numpy for a
  concrete state and under ``jit`` with ``jax.enable_x64``, so both give the same integers
  (exact below 2^53) and a budget check cannot flip between them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxjpq import gates as gates_lib
from jaxjpq.graph import AxisUnits, Graph, MacTerm, Site, kept, kept_positions
from jaxjpq.jaxprs import key_of
from jaxjpq.quant import pow2_bits_hard, round_bits_pow2
from jaxjpq.state import CompressionState, check_state, site_quantizer

FP_BITS = 32.0
# Bits per kept weight position of the export's sparse bitmap (its other index: a position list).
SPARSE_INDEX_BITS = 1.0


def index_width(numel: int) -> int:
    """Bits of one entry of the sparse position list for a weight of ``numel`` entries."""
    return max(1, math.ceil(math.log2(max(int(numel), 2))))


def position_list_is_smaller(nnz: Any, positions: Any, numel: int) -> Any:
    """Whether the export indexes ``nnz`` kept weights among ``positions`` (the slim weight's
    entries; a weight of ``numel`` entries before slimming) by a position list rather than a
    bitmap: the rule :func:`sparse_index_bits` and the export share."""
    return nnz * float(index_width(numel)) < positions * SPARSE_INDEX_BITS


def sparse_index_bits(nnz: Any, positions: Any, numel: int, xp: Any = np) -> Any:
    """Bits of the export's sparse index (see :func:`position_list_is_smaller`): the smaller of
    a bitmap (``SPARSE_INDEX_BITS`` per position) and a list of ``nnz`` positions of
    :func:`index_width` bits."""
    return xp.minimum(positions * SPARSE_INDEX_BITS, nnz * float(index_width(numel)))


# ---------------------------------------------------------------------------------------------
# Axes of a site
# ---------------------------------------------------------------------------------------------


def weight_axes(graph: Graph, site: Site) -> tuple[AxisUnits, ...]:
    """One :class:`AxisUnits` per axis of ``site``'s weight (from the groups' slices when the
    site is hand-built)."""
    if site.weight_axes:
        return site.weight_axes
    owners: list[dict[str, np.ndarray]] = [{} for _ in site.weight_shape]
    for g in graph.groups:
        for sl in (*g.params, *g.dependents):
            if sl.key != site.weight:
                continue
            a = sl.axis % len(site.weight_shape)
            own = sl.owner(site.weight_shape[a])
            cur = owners[a].get(g.id)
            owners[a][g.id] = own if cur is None else np.where(own >= 0, own, cur)
    return tuple(
        AxisUnits(int(n), tuple(o.items())) for n, o in zip(site.weight_shape, owners, strict=True)
    )


def mac_terms(graph: Graph, site: Site) -> tuple[MacTerm, ...]:
    """The site's contractions; a hand-built site is one term scaled by its weight's axes."""
    return site.mac_terms or (MacTerm(int(site.macs), weight_axes(graph, site)),)


# ---------------------------------------------------------------------------------------------
# Numerics: one code path, numpy float64 (host), jnp float64 (jit) or jnp float32 (soft)
# ---------------------------------------------------------------------------------------------


def _is_concrete(state: CompressionState) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(state))


class _Num:
    """Array namespace and dtype of one evaluation."""

    def __init__(self, state: CompressionState, soft: bool):
        self.soft = soft
        self.xp = np if (not soft and _is_concrete(state)) else jnp
        self.dtype = jnp.float32 if soft else (np.float64 if self.xp is np else jnp.float64)

    def arr(self, x: Any) -> Any:
        return self.xp.asarray(x).astype(self.dtype)


def _unit_masks(state: CompressionState, num: _Num) -> dict[str, Any]:
    """Keep values per group: soft = probabilities, exact = 0/1."""
    out = {}
    for gid, m in state.masks.items():
        m = num.arr(m)
        if num.soft:  # clip, keeping gradient 1 at the bounds (jnp.clip halves it at a tie)
            m = jnp.where((m >= 0.0) & (m <= 1.0), m, jnp.clip(m, 0.0, 1.0))
            gate = state.gates.get(gid)
            if gate is not None:
                m = m * gates_lib.keep_prob(gate, state.gate_threshold)
        else:
            m = kept(m).astype(num.dtype)
        out[gid] = m
    return out


def _keep_vector(axis: AxisUnits, masks: Mapping[str, Any], num: _Num) -> Any:
    """``[size]`` keep value of each position of ``axis``, or None when nothing can be removed."""
    xp, v = num.xp, None
    for gid, owner in axis.owners:
        m = masks.get(gid)
        if m is None:
            continue
        vals = xp.where(owner >= 0, m[np.maximum(owner, 0)], 1.0)
        v = vals if v is None else v * vals
    return v


def _kept(axis: AxisUnits, masks: Mapping[str, Any], num: _Num) -> Any:
    v = _keep_vector(axis, masks, num)
    return float(axis.size) if v is None else num.xp.sum(v)


def _round(b: Any, state: CompressionState, num: _Num) -> Any:
    if state.power_of_two:
        return round_bits_pow2(b) if num.soft else pow2_bits_hard(b, num.xp)
    return b if num.soft else num.xp.ceil(b - 1e-4)


def _bits(p: Any, signed: bool, state: CompressionState, num: _Num) -> Any:
    xp = num.xp
    q = xp.power(num.arr(p.q_m), num.arr(p.t))
    b = xp.log2(q / num.arr(p.d) + 1.0) + (1.0 if signed else 0.0)
    return _round(b, state, num)


def _channel_counts(site: Site, vecs: list, wm: Any, num: _Num) -> tuple[Any, Any]:
    """``(structured, kept)``: weight entries per output channel (``channel_shape`` of the out
    axes) left by slimming, and of those the ones the elementwise mask ``wm`` keeps."""
    xp, nd = num.xp, len(site.weight_shape)
    keep = xp.ones(site.weight_shape, num.dtype)
    for a, v in enumerate(vecs):
        if v is not None:
            shape = [1] * nd
            shape[a] = -1
            keep = keep * v.reshape(shape)
    out_axes = sorted(a % nd for a in site.out_axes)
    red = tuple(a for a in range(nd) if a not in out_axes)
    struct_c = xp.sum(keep, axis=red)
    if wm is None:
        return struct_c, struct_c
    w = num.arr(wm)
    keep = keep * (xp.clip(w, 0.0, 1.0) if num.soft else kept(w).astype(num.dtype))
    return struct_c, xp.sum(keep, axis=red)


def _site_row(state: CompressionState, site: Site, masks, num: _Num) -> dict:
    graph = state.graph
    """Exact or soft cost figures of one site (per example)."""
    xp = num.xp
    axes = weight_axes(graph, site)
    vecs = [_keep_vector(a, masks, num) for a in axes]
    kept_axes = [float(a.size) if v is None else xp.sum(v) for a, v in zip(axes, vecs,
                                                                            strict=True)]
    kept_numel = math.prod(kept_axes) if kept_axes else 1.0
    kept_channels = math.prod(kept_axes[a % len(axes)] for a in site.out_axes)
    batch = float(max(graph.batch_size, 1))
    kept_macs = 0.0
    for t in mac_terms(graph, site):
        # integer numerator and denominator, one division: exact when the result is an integer
        num_t, den_t = float(t.macs), batch
        for a in t.axes:
            if any(g in masks for g in a.group_ids):
                num_t = num_t * _kept(a, masks, num)
                den_t = den_t * float(a.size)
        kept_macs = kept_macs + num_t / den_t

    p = state.weight.get(site.name)
    b_w = FP_BITS if p is None else _bits(site_quantizer(state, "weight", site.name), True,
                                          state, num)
    wm = state.weight_masks.get(site.name)
    per_channel = np.ndim(b_w) > 0
    if wm is None and not per_channel:
        nnz, wbits = kept_numel, kept_numel * b_w
        exact_ratio = True
    else:
        struct_c, per_c = _channel_counts(site, vecs, wm, num)
        nnz = xp.sum(per_c)
        wbits = xp.sum(per_c * b_w)
        exact_ratio = False
        # A mask that keeps or drops whole channels needs no index: 0-bit channels store nothing.
        channelwise = xp.all((per_c == 0) | (per_c == struct_c))

    a = state.act.get(site.act_key)
    b_a = FP_BITS if a is None else _bits(site_quantizer(state, "act", site.act_key),
                                          site.signed_input, state, num)
    if exact_ratio:
        bops = kept_macs * b_w * b_a
    else:
        safe = xp.maximum(kept_numel, 1.0)
        bops = xp.where(kept_numel > 0, kept_macs / safe * wbits * b_a, 0.0)
    index_bits = 0.0
    if wm is not None:  # the export's sparse index: a bitmap or a position list, the smaller
        index_bits = xp.where(channelwise, 0.0, sparse_index_bits(
            nnz, kept_numel, math.prod(site.weight_shape), xp))
    mean_bits = wbits / xp.maximum(nnz, 1e-12) if not exact_ratio else b_w
    return dict(site=site, kept_macs=kept_macs, kept_numel=kept_numel,
                kept_channels=kept_channels, nnz=nnz, weight_bits=wbits, index_bits=index_bits,
                b_w=mean_bits, b_a=b_a, bops=bops)


def _rows(state: CompressionState, soft: bool) -> tuple[list[dict], _Num]:
    graph = check_state(state)
    num = _Num(state, soft)
    masks = _unit_masks(state, num)
    return [_site_row(state, s, masks, num) for s in graph.sites], num


def _exact(fn):
    """Run an exact-cost computation with float64 enabled (a no-op for numpy and soft)."""

    def wrapped(state, *args, soft=False, **kwargs):
        if soft:
            return fn(state, *args, soft=soft, **kwargs)
        with jax.enable_x64(True):
            return fn(state, *args, soft=soft, **kwargs)

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    wrapped.__wrapped__ = fn
    return wrapped


def _out(x: Any, num: _Num) -> Any:
    return float(x) if num.xp is np else x


# ---------------------------------------------------------------------------------------------
# Public figures
# ---------------------------------------------------------------------------------------------


def macs(graph: Graph) -> dict[str, float]:
    """Dense MACs per example of each site."""
    return {s.name: float(s.macs_per_example) for s in graph.sites}


@_exact
def kept_macs(state: CompressionState, *, soft: bool = False) -> dict[str, Any]:
    """``{site: MACs per example of the slim model}`` (structured pruning; dense kernels)."""
    rows, num = _rows(state, soft)
    return {r["site"].name: _out(r["kept_macs"], num) for r in rows}


@_exact
def bits(state: CompressionState, *, soft: bool = False) -> dict[str, tuple]:
    """``{site: (b_w, b_a)}``: weight bits (mean over kept nonzero weights for per-channel or
    sparse sites) and input-activation bits; 32 = float."""
    rows, num = _rows(state, soft)
    return {r["site"].name: (_out(r["b_w"], num), _out(r["b_a"], num)) for r in rows}


@_exact
def channel_bits(state: CompressionState, site: str, *, soft: bool = False) -> Any:
    """Bits of each output channel of ``site``'s weight (``channel_shape`` of its out axes, or a
    scalar per tensor); exact: storage bits, 0 for a channel with no kept weight."""
    check_state(state)
    num = _Num(state, soft)
    if site not in state.weight:
        return FP_BITS
    b = _bits(site_quantizer(state, "weight", site), True, state, num)
    if np.ndim(b) == 0 or soft:
        return _out(b, num) if np.ndim(b) == 0 else b
    return b * (live_channels(state, site) > 0)


def live_channels(state: CompressionState, site: str) -> Any:
    """Kept nonzero weights per output channel of ``site`` (exact; channel shape)."""
    num = _Num(state, False)
    graph = check_state(state)
    s = graph.site_map[site]
    masks = _unit_masks(state, num)
    vecs = [_keep_vector(a, masks, num) for a in weight_axes(graph, s)]
    return _channel_counts(s, vecs, state.weight_masks.get(site), num)[1]


@_exact
def site_table(state: CompressionState, *, soft: bool = False) -> dict[str, dict]:
    """``{site: {"kept_macs", "bops", "size", "b_w", "b_a"}}`` per example; ``size`` = weight
    bits plus sparse index bits (no scales)."""
    rows, num = _rows(state, soft)
    return {r["site"].name: dict(
        kept_macs=_out(r["kept_macs"], num), bops=_out(r["bops"], num),
        size=_out(r["weight_bits"] + r["index_bits"], num), b_w=_out(r["b_w"], num),
        b_a=_out(r["b_a"], num)) for r in rows}


@_exact
def site_bops(state: CompressionState, *, soft: bool = False) -> dict[str, Any]:
    """``{site: BOPs per example}`` (see module doc)."""
    rows, num = _rows(state, soft)
    return {r["site"].name: _out(r["bops"], num) for r in rows}


@_exact
def bops(state: CompressionState, *, soft: bool = False) -> Any:
    """Total BOPs per example: soft = differentiable float32, exact = float64 (see module doc)."""
    rows, num = _rows(state, soft)
    return _out(sum(r["bops"] for r in rows), num)


def fp32_bops(graph: Graph) -> float:
    """BOPs of the dense fp32 model: ``Σ MACs · 32 · 32``."""
    return float(sum(s.macs_per_example for s in graph.sites) * FP_BITS * FP_BITS)


@_exact
def relative_bops(state: CompressionState, *, soft: bool = False) -> Any:
    """``bops / fp32_bops`` in (0, 1]."""
    return bops.__wrapped__(state, soft=soft) / fp32_bops(state.graph)


def other_bits(state: CompressionState) -> float:
    """Bits of every variable leaf that is not a site weight (biases, norms, statistics) as
    float32, pruned entries removed (exact; needs a traced graph)."""
    graph = check_state(state)
    if graph.trace_info is None:
        raise ValueError("other_bits needs a graph made by jaxjpq.trace (it has leaf shapes).")
    removed = graph.removed_positions({k: np.asarray(m) for k, m in state.masks.items()})
    weights = {s.weight for s in graph.sites}
    total = 0
    for key, shape in graph.trace_info["leaf_shapes"].items():
        if key in weights:
            continue
        dims = [n - len(removed.get(key, {}).get(a, ())) for a, n in enumerate(shape)]
        total += math.prod(dims)
    return float(total) * FP_BITS


@_exact
def size_bits(
    state: CompressionState, *, soft: bool = False, include_scales: bool = False,
    include_other: bool = False,
) -> Any:
    """Bits of the site weights: ``Σ nnz · b_w`` plus the sparse sites' indices.

    ``include_scales`` adds the float32 quantizer numbers the export stores: one step ``d``
    per weight quantizer (per kept channel when per channel) and ``(d, q_m, t)`` per activation
    quantizer. ``include_other`` adds :func:`other_bits` (concrete state only): with both, the
    figure is the export's payload.
    """
    rows, num = _rows(state, soft)
    total = other_bits(state) if include_other else 0.0
    for r in rows:
        total = total + r["weight_bits"] + r["index_bits"]
        if include_scales:
            name = r["site"].name
            p = state.weight.get(name)
            if p is not None:  # one step per channel left after slimming, or one per tensor
                total = total + FP_BITS * (r["kept_channels"] if np.ndim(p.d) else 1.0)
            if name in state.act:
                total = total + 3 * FP_BITS
    return _out(total, num)


@_exact
def active_bytes(state: CompressionState, *, soft: bool = False) -> Any:
    """``Σ nnz · b_w / 8`` over the sites: the kept weights at their bits, the size the papers
    report (no sparse index, scales or float leaves; :func:`model_bits` is the export's payload,
    :func:`resident_bytes` the deployed model's memory)."""
    rows, num = _rows(state, soft)
    return _out(sum(r["weight_bits"] for r in rows) / 8.0, num)


def fp32_size_bits(graph: Graph) -> float:
    """Bits of the site weights in float32: ``Σ numel · 32``."""
    return float(sum(math.prod(s.weight_shape) for s in graph.sites) * FP_BITS)


@_exact
def relative_size(state: CompressionState, *, soft: bool = False) -> Any:
    """``size_bits / fp32_size_bits`` (site weights and sparse indices, no scales)."""
    return size_bits.__wrapped__(state, soft=soft) / fp32_size_bits(state.graph)


@_exact
def relative_active_size(state: CompressionState, *, soft: bool = False) -> Any:
    """:func:`active_bytes` over the site weights' float32 bytes (the papers' relative size)."""
    return active_bytes.__wrapped__(state, soft=soft) * 8.0 / fp32_size_bits(state.graph)


SIZE_METRICS = ("export", "active")


def relative_size_of(state: CompressionState, metric: str) -> float:
    """The relative size a size budget of ``metric`` measures: ``"export"``
    (:func:`relative_model_size`, the saved model's payload) or ``"active"``
    (:func:`relative_active_size`)."""
    if metric not in SIZE_METRICS:
        raise ValueError(f"size metric must be one of {SIZE_METRICS}, got {metric!r}.")
    if metric == "active":
        return float(relative_active_size(state))
    return relative_model_size(state)


def model_bits(state: CompressionState) -> float:
    """Bits of the exported model: site codes, sparse indices, scales and the float leaves
    (:func:`size_bits` with ``include_scales`` and ``include_other``)."""
    return float(size_bits(state, include_scales=True, include_other=True))


def fp32_model_bits(graph: Graph) -> float:
    """Bits of the dense float32 model's ``params``."""
    return FP_BITS * graph.param_count()


def relative_model_size(state: CompressionState) -> float:
    """:func:`model_bits` / :func:`fp32_model_bits`: the size budget the searches meet."""
    return model_bits(state) / fp32_model_bits(check_state(state))


def fixed_bits(state: CompressionState) -> float:
    """The model bits that neither bits nor masks of the sites change: scales and float
    leaves (:func:`model_bits` less the site weights and their indices)."""
    return model_bits(state) - float(size_bits(state))


def sparsity(state: CompressionState) -> Any:
    """Fraction of the prunable units whose mask is 0 (exact)."""
    graph = check_state(state)
    sizes = sum(g.size for g in graph.prunable_groups)
    pruned = sum(jnp.sum(~kept(jnp.asarray(state.masks[g.id]))) for g in graph.prunable_groups)
    return pruned / max(sizes, 1)


def metrics(state: CompressionState) -> dict[str, jax.Array]:
    """Exact figures of ``state`` as float32 arrays (jit-compatible): ``sparsity`` (fraction of
    prunable units pruned), ``mean_bits`` (mean weight bits over the learned, non-frozen sites),
    ``rel_bops`` and ``rel_size`` (fractions of the fp32 model)."""
    learned = [n for n in state.weight if n not in state.frozen]
    b = bits(state)
    f32 = lambda x: jnp.asarray(x).astype(jnp.float32)  # noqa: E731
    mean_bits = (jnp.mean(jnp.stack([f32(b[n][0]) for n in learned])) if learned
                 else jnp.asarray(32.0))
    return {
        "sparsity": f32(sparsity(state)),
        "mean_bits": mean_bits,
        "rel_bops": f32(relative_bops(state)),
        "rel_size": f32(relative_size(state)),
    }


def report(state: CompressionState) -> str:
    """Per-layer table of the exact costs: kept channels, bits w/a, kept MACs, BOPs share."""
    if not _is_concrete(state):
        raise ValueError("report needs a concrete state (call it outside jit).")
    rows, _ = _rows(state, soft=False)
    graph = state.graph
    total = float(sum(r["bops"] for r in rows)) or 1.0
    size = float(sum(r["weight_bits"] + r["index_bits"] for r in rows))

    def kept_of(gid):
        if gid is None:
            return "-"
        g = graph.group_map[gid]
        m = state.masks.get(gid)
        k = g.size if m is None else int(np.sum(kept(np.asarray(m))))
        return f"{k}/{g.size}"

    head = f"{'layer':<28} {'in kept':>9} {'out kept':>9} {'w bits':>6} {'a bits':>6} " \
           f"{'MACs':>12} {'nnz %':>6} {'BOPs %':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        s = r["site"]
        dens = 100.0 * float(r["nnz"]) / max(float(r["kept_numel"]), 1.0)
        lines.append(
            f"{s.name:<28} {kept_of(s.in_group):>9} {kept_of(s.out_group):>9} "
            f"{float(r['b_w']):>6.2f} {float(r['b_a']):>6.0f} {float(r['kept_macs']):>12.0f} "
            f"{dens:>6.1f} {100 * float(r['bops']) / total:>7.2f}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"relative BOPs {total / fp32_bops(graph):.4%}   "
        f"relative size {size / fp32_size_bits(graph):.4%}"
    )
    return "\n".join(lines)


def budget_shortfall(state: CompressionState) -> str | None:
    """What of the budget in ``state.spec`` the state misses, or None: sparsity below its target
    by more than the per-group rounding of units, relative BOPs or size above theirs (exact
    figures). ``state`` must be concrete."""
    spec = getattr(state, "spec", None)
    if spec is None or not spec.budget:
        return None
    groups = state.graph.prunable_groups
    figures = {
        "sparsity": lambda: float(sparsity(state)),
        "bops": lambda: float(relative_bops(state)),
        "size": lambda: float(relative_size(state)),
    }
    misses = []
    for kind, target in spec.budget:
        got = figures[kind]()
        if kind == "sparsity":
            slack = (len(groups) + 0.5) / max(sum(g.size for g in groups), 1)
            missed = got < target - slack
        else:
            missed = got > target * (1 + 1e-6)
        if missed:
            misses.append(f"{kind} {got:.4g} against a budget of {target:.4g}")
    return "; ".join(misses) or None


# Integer storage of a deployed site weight by its widest channel's bits: two signed 4-bit codes
# per byte, or one signed byte; wider sites stay float32.
STORAGE_BITS = {"int4x2": 4, "int8": 8}


def storage(state: CompressionState, key: tuple[str, ...]) -> tuple[str, str]:
    """``(kind, why)`` of variable leaf ``key`` in the deployed model: ``"int4x2"`` or
    ``"int8"`` (every site of the leaf quantized, widest channel ≤ 4 or ≤ 8 bits), else
    ``"float32"`` with the reason."""
    graph = check_state(state)
    sites = [s for s in graph.sites if s.weight == tuple(key)]
    if not sites:
        return "float32", "not a site weight"
    n_layers = math.prod(sites[0].stack_sizes) if sites[0].layer_axes else 1
    if len(sites) != n_layers:
        return "float32", "a weight shared by several sites"
    if any(s.name not in state.weight for s in sites):
        return "float32", "not quantized"
    widest = max(float(np.max(channel_bits(state, s.name))) for s in sites)
    for kind, b in STORAGE_BITS.items():
        if widest <= b:
            return kind, f"{widest:g} bits"
    return "float32", f"{widest:g} bits: above 8, kept float"


def resident_bytes(state: CompressionState) -> dict[str, int]:
    """Bytes the deployed model (:func:`jaxjpq.deploy.deploy`) holds in memory, per part:
    ``codes`` (integer site weights at their storage, :func:`storage`), ``scales`` (float32,
    one per kept output channel or per tensor, per layer of a stacked weight) and ``float``
    (every other variable leaf at its dtype, slim). ``total`` is their sum."""
    graph = check_state(state)
    info = graph.trace_info
    if info is None:
        raise ValueError("resident_bytes needs a graph made by jaxjpq.trace (its leaf shapes).")
    out = {"codes": 0, "scales": 0, "float": 0}
    for path, a in jax.tree_util.tree_flatten_with_path(info["var_avals"])[0]:
        key = key_of(path)
        keep = kept_positions(graph, state.masks, key, a.shape)
        shape = [int(keep[ax].sum()) if ax in keep else n for ax, n in enumerate(a.shape)]
        n = math.prod(shape)
        kind, _ = storage(state, key)
        if kind == "float32":
            out["float"] += n * np.dtype(a.dtype).itemsize
            continue
        out["codes"] += -(-n * STORAGE_BITS[kind] // 8)
        out["scales"] += 4 * math.prod(scale_shape(graph, key, shape, state))
    out["total"] = sum(out.values())
    return out


def scale_shape(graph: Graph, key: tuple[str, ...], shape: Sequence[int],
                state: CompressionState) -> tuple[int, ...]:
    """Shape of a deployed leaf's scales: ``shape`` (the slim leaf's) on the out axes of a
    per-channel quantizer and on the layer axes of a stacked weight, 1 elsewhere."""
    sites = [s for s in graph.sites if s.weight == tuple(key)]
    s0 = sites[0]
    per_channel = np.ndim(state.weight[s0.name].d) > 0
    la = list(s0.layer_axes)
    rest = [ax for ax in range(len(shape)) if ax not in la]
    outs = {rest[a % len(rest)] for a in s0.out_axes} if per_channel else set()
    return tuple(n if (ax in la or ax in outs) else 1 for ax, n in enumerate(shape))

