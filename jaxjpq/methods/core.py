"""The method core: what every compression method shares, held once.

* bits: :func:`with_bits` (``d = d(b)``, the one place a step is set from a width),
  :func:`rounded_bits`, :func:`projected` (``d`` onto ``[d(b_upper), d(b_lo)]``),
  :func:`set_bits` (a site's or each channel's width on a state; 0 bits = pruned channel);
* the fixed-bits quantizer step of every fine-tune / cool-down (:func:`fixed_bits_step`) and the
  QAT transform built from it (:func:`qat`);
* unit allocation (:func:`per_group_counts`, :func:`period_counts`, :func:`select_units`,
  :func:`select_per_group`), optionally keeping every group's width a multiple of
  ``unit_multiple``, and holding pruned units and masked weights at zero (:func:`hold`);
* :func:`enforce_budget`: lower bits, then prune the least salient units, until the exact BOPs or
  size budget holds;
* :func:`pair_transform`: the skeleton of an optax transform over the pair
  ``(model params, CompressionState)``; a transform chained after it that alters the compression
  state's updates is detected at the next update (NaN updates, ``tampered`` set; the train loop
  raises :class:`ChainedTransformError`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxjpq import cost
from jaxjpq.compress import quantize_weights
from jaxjpq.graph import Graph, kept, put_layers
from jaxjpq.quant import (
    MAX_BITS,
    QuantParams,
    bits_from_step,
    clip_sgd_step,
    pow2_bits_hard,
    step_from_bits,
)
from jaxjpq.state import CompressionState, check_budget, check_state
from jaxjpq.units import UnitIndex, hold_zero, rank_in_group, unit_index, unit_sum

# ---------------------------------------------------------------------------------------------
# Bits
# ---------------------------------------------------------------------------------------------


def with_bits(p: QuantParams, bits: Any, signed: bool) -> QuantParams:
    """``p`` with ``d = d(bits)`` at its own ``q_m`` and ``t`` (``bits`` broadcasts to ``p.d``)."""
    return p.replace(d=step_from_bits(bits, p.q_m, p.t, signed).astype(jnp.float32))


def rounded_bits(p: QuantParams, signed: bool, b_lo: float, b_hi: float,
                 power_of_two: bool = False) -> jax.Array:
    """Integer bits of ``p`` (nearest, clipped to ``[b_lo, b_hi]``; {2, 4, 8} for power of two)."""
    b = bits_from_step(p.d, p.q_m, p.t, signed)
    return pow2_bits_hard(b) if power_of_two else jnp.clip(jnp.round(b), b_lo, b_hi)


def projected(p: QuantParams, signed: bool, b_lo: Any, b_upper: Any) -> QuantParams:
    """``p`` with ``d`` clipped onto ``[d(b_upper), d(b_lo)]`` (partial projection: ``q_m``, ``t``
    unchanged), so its bits lie in ``[b_lo, b_upper]``."""
    lo = step_from_bits(b_upper, p.q_m, p.t, signed)
    hi = step_from_bits(b_lo, p.q_m, p.t, signed)
    return p.replace(d=jnp.clip(p.d, lo, hi))


def signedness(state: CompressionState) -> tuple[dict[str, bool], dict[str, bool]]:
    """``({site: True}, {site: signed_input})`` for the weight and activation quantizers."""
    sm = state.graph.site_map
    return {n: True for n in state.weight}, {n: bool(sm[n].signed_input) for n in state.act}


def set_bits(state: CompressionState, site: str, bits: Any, kind: str = "weight"
             ) -> CompressionState:
    """``state`` with ``site``'s ``kind`` quantizer at exactly ``bits`` (an input read by
    several sites: its one quantizer, so every one of them).

    ``bits`` is a scalar, or for a per-channel weight quantizer one width per output channel
    (``channel_shape``); a channel at 0 bits is pruned: its weights get elementwise mask 0 (and
    its step the smallest valid width, so ``d`` stays finite). jit-compatible.
    """
    graph = check_state(state)
    if kind not in ("weight", "act"):
        raise ValueError(f"kind must be 'weight' or 'act', got {kind!r}.")
    table = state.weight if kind == "weight" else state.act
    if kind == "act" and site in graph.site_map:  # a shared input's quantizer (Site.act_key)
        site = graph.site_map[site].act_key
    if site not in table:
        raise ValueError(f"site {site!r} has no {kind} quantizer in this state "
                         f"(quantized sites: {sorted(table)}).")
    p = table[site]
    s = graph.site_map[site]
    signed = True if kind == "weight" else s.signed_input
    bits = jnp.asarray(bits, jnp.float32)
    if bits.ndim and bits.shape != jnp.shape(p.d):
        raise ValueError(f"{site}: {bits.shape} bits for a quantizer of shape {jnp.shape(p.d)} "
                         "(per-channel widths need CompressionSpec(per_channel=True)).")
    floor = 2.0 if signed else 1.0
    if not isinstance(bits, jax.core.Tracer):
        b = np.asarray(bits, np.float64)
        live = b[b != 0]
        if live.size and not (np.all(np.isfinite(live)) and live.min() >= floor
                              and live.max() <= MAX_BITS):
            raise ValueError(
                f"set_bits({site!r}, {kind}): bits {b.tolist()} outside [{floor:g}, "
                f"{MAX_BITS:g}] ({'signed' if signed else 'unsigned'} quantizer); 0 prunes a "
                "channel.")
    dead = bits <= 0
    new = with_bits(p, jnp.where(dead, floor, bits), signed)
    out = state.replace(**{kind: {**table, site: new}})
    if kind == "weight" and (bits.ndim or isinstance(bits, jax.core.Tracer) or bool(dead)):
        out = _mask_dead_channels(out, s, dead)
    return out


def _mask_dead_channels(state: CompressionState, site: Any, dead: jax.Array) -> CompressionState:
    nd = len(site.weight_shape)
    shape = [1] * nd
    if dead.ndim:
        for a, n in zip(sorted(a % nd for a in site.out_axes), dead.shape, strict=True):
            shape[a] = n
    keep = jnp.broadcast_to((~dead).reshape(shape), site.weight_shape).astype(jnp.float32)
    old = state.weight_masks.get(site.name)
    if old is None:
        if not isinstance(dead, jax.core.Tracer) and not bool(jnp.any(dead)):
            return state
        old = jnp.ones(site.weight_shape, jnp.float32)
    return state.replace(weight_masks={**state.weight_masks, site.name: old * keep})


def map_learned(table: Mapping[str, QuantParams], frozen: Sequence[str],
                fn: Callable[[str, QuantParams], QuantParams]) -> dict[str, QuantParams]:
    """``{site: fn(site, params)}`` over the learned quantizers; frozen ones unchanged."""
    return {n: (p if n in frozen else fn(n, p)) for n, p in table.items()}


def fixed_bits_step(
    table: Mapping[str, QuantParams],
    grads: Mapping[str, QuantParams],
    signed: Mapping[str, bool],
    frozen: Sequence[str],
    *,
    lr: Any,
    b_lo: float,
    b_hi: float,
    train_clips: bool = True,
    train_t: bool = False,
    clips: Mapping[str, jax.Array] | None = None,
) -> dict[str, QuantParams]:
    """Quantizers after one fixed-bits step: bits = their current integer bits (clipped to
    ``[b_lo, b_hi]``); with ``train_clips`` the clip ``q_m`` (and with ``train_t`` the exponent
    ``t``) takes an SGD step (:func:`jaxjpq.quant.clip_sgd_step`; a method with its own clip
    optimizer passes the new clips as ``clips={site: q_m}``) and ``d`` follows so the bits stay
    fixed; without, the quantizer is frozen at those bits. Frozen sites are unchanged."""

    def step(name: str, p: QuantParams) -> QuantParams:
        s = signed[name]
        b = jnp.clip(jnp.round(bits_from_step(p.d, p.q_m, p.t, s)), b_lo, b_hi)
        q_m, t = p.q_m, p.t
        if clips is not None:
            q_m = clips[name]
        elif train_clips:
            g = grads[name]
            q_m = clip_sgd_step(p.q_m, g.q_m, lr)
            if train_t:
                t = jnp.clip(p.t - lr * g.t, 0.25, 4.0)
        return QuantParams(d=step_from_bits(b, q_m, t, s), q_m=q_m, t=t)

    return map_learned(table, frozen, step)


# ---------------------------------------------------------------------------------------------
# Unit allocation and holding at zero
# ---------------------------------------------------------------------------------------------


def _round_keep(keep: np.ndarray, sizes: np.ndarray, multiple: int) -> np.ndarray:
    """Kept widths rounded to the nearest multiple (at least one multiple, at most the size)."""
    if multiple <= 1:
        return keep
    r = np.maximum(np.round(keep / multiple).astype(np.int64) * multiple, multiple)
    return np.minimum(r, sizes)


def require_prunable(graph: Graph, method: str) -> None:
    """Raise a ``ValueError`` naming what the tracer saw when ``graph`` has no prunable group."""
    if graph.prunable_groups:
        return
    seen = "; ".join(f"{g.id} ({g.size}): {g.reason}" for g in graph.groups[:8])
    more = f" (+{len(graph.groups) - 8} more)" if len(graph.groups) > 8 else ""
    raise ValueError(
        f"{method} was asked to prune, but the graph has no prunable group: "
        f"{len(graph.groups)} groups, {len(graph.sites)} sites"
        + (f"; {seen}{more}" if seen else "")
        + ". Use sparsity=0 (quantize only), or see graph.summary() for why each group is kept."
    )


def per_group_counts(index: UnitIndex, sparsity: float, unit_multiple: int = 1) -> np.ndarray:
    """int ``[G]``: units to remove per group, the same fraction everywhere, summing exactly to
    ``round(sparsity · U)`` (largest remainders get the extra units); every group keeps at least
    one unit. With ``unit_multiple = N`` every kept width is rounded to a multiple of N (a group
    smaller than N stays whole), so the total is the nearest such allocation instead."""
    sizes = np.diff(index.offsets)
    total = int(round(sparsity * index.num_units))
    if total > index.num_units - index.num_groups:
        raise ValueError(
            f"sparsity {sparsity} removes {total} of {index.num_units} units, but each of the "
            f"{index.num_groups} groups must keep one; lower it."
        )
    ideal = sizes * total / max(index.num_units, 1)
    counts = np.minimum(np.floor(ideal).astype(np.int64), sizes - 1)
    # Ties in the remainders go to the larger group, then the earlier one: a remainder is a
    # float, so equal fractions of different sizes must not be ordered by rounding noise.
    rem = np.round(ideal - counts, 9)
    order = np.lexsort((np.arange(len(sizes)), -sizes, -rem))
    for j in order:
        if counts.sum() >= total:
            break
        if counts[j] < sizes[j] - 1:
            counts[j] += 1
    while counts.sum() < total:  # remainders exhausted: fill groups with room left
        j = int(np.argmax(sizes - 1 - counts))
        counts[j] += 1
    if unit_multiple > 1:
        counts = sizes - _round_keep(sizes - counts, sizes, int(unit_multiple))
    return counts


def period_counts(index: UnitIndex, sparsity: float, periods: int) -> np.ndarray:
    """int ``[periods]``: units to select at the start of each of ``periods`` pruning periods.

    The total is ``round(sparsity · U)``, capped so that every group keeps at least one unit."""
    total = int(round(sparsity * index.num_units))
    cap = index.num_units - index.num_groups
    if total > cap:
        raise ValueError(
            f"sparsity {sparsity} asks for {total} of {index.num_units} units, but every one of "
            f"the {index.num_groups} prunable groups keeps one unit (at most {cap}); lower it."
        )
    cum = np.round(np.arange(1, periods + 1) * total / max(periods, 1)).astype(np.int64)
    return np.diff(np.concatenate([[0], cum]))


def group_period_counts(index: UnitIndex, sparsity: float, periods: int,
                        unit_multiple: int = 1) -> np.ndarray:
    """int ``[periods, G]``: units each group loses at each period when every group is pruned
    by the same fraction (:func:`per_group_counts`, spread evenly over the periods)."""
    total = per_group_counts(index, sparsity, unit_multiple)
    cum = np.round(np.outer(np.arange(1, periods + 1), total) / max(periods, 1)).astype(np.int64)
    return np.diff(np.vstack([np.zeros_like(total)[None], cum]), axis=0)


def select_units(
    index: UnitIndex, importance: jax.Array, pruned: jax.Array, count: jax.Array,
    unit_multiple: int = 1,
) -> jax.Array:
    """bool ``[U]``: the ``count`` least important live units, never the most important live
    unit of a group (every group keeps at least one). With ``unit_multiple = N`` each group's
    selection shrinks so that its kept width stays a multiple of N (fewer units than ``count``
    may be chosen)."""
    seg = jnp.asarray(index.group_of_unit)
    imp = jnp.where(pruned, jnp.inf, importance)
    best = jax.ops.segment_max(jnp.where(pruned, -jnp.inf, importance), seg, index.num_groups)
    is_best = (~pruned) & (importance >= best[seg])
    first = jax.ops.segment_min(
        jnp.where(is_best, jnp.arange(index.num_units), index.num_units), seg, index.num_groups
    )
    imp = jnp.where(jnp.arange(index.num_units) == first[seg], jnp.inf, imp)
    rank = jnp.empty_like(seg).at[jnp.argsort(imp, stable=True)].set(jnp.arange(index.num_units))
    chosen = (rank < count) & jnp.isfinite(imp)
    if unit_multiple <= 1:
        return chosen
    return _to_multiple(index, importance, pruned, chosen, int(unit_multiple))


def _to_multiple(index: UnitIndex, importance, pruned, chosen, n: int) -> jax.Array:
    """Drop the most important chosen units of each group until its kept width is a multiple
    of ``n`` (a group whose live width is below ``n`` loses nothing)."""
    seg = jnp.asarray(index.group_of_unit)
    live = jax.ops.segment_sum((~pruned).astype(jnp.int32), seg, index.num_groups)
    k = jax.ops.segment_sum(chosen.astype(jnp.int32), seg, index.num_groups)
    keep = live - k
    keep_up = jnp.minimum(((keep + n - 1) // n) * n, live)
    allowed = jnp.where(live < n, 0, live - keep_up)
    local = rank_in_group(index, jnp.where(chosen, importance, jnp.inf))
    return chosen & (local < allowed[seg])


def select_per_group(
    index: UnitIndex, importance: jax.Array, pruned: jax.Array, counts: jax.Array
) -> jax.Array:
    """bool ``[U]``: in each group ``g`` its ``counts[g]`` least important live units."""
    seg = jnp.asarray(index.group_of_unit)
    local = rank_in_group(index, jnp.where(pruned, jnp.inf, importance))
    return (local < counts[seg]) & ~pruned


def magnitude(index: UnitIndex, params: Mapping) -> jax.Array:
    """``[U]``: L2 norm of each unit's ``params`` slices."""
    return jnp.sqrt(unit_sum(index, lambda x: x * x, params))


def hold(index: UnitIndex, updates: Mapping, params: Mapping, pruned: jax.Array,
         state: CompressionState) -> dict:
    """``updates`` with pruned units (bool ``[U]``) and elementwise-masked weights replaced by
    ``-params``, so that after ``optax.apply_updates`` they are exactly zero."""
    u = hold_zero(index, updates, params, pruned)
    if not state.weight_masks:
        return u
    flat_u = traverse_util.flatten_dict(dict(u))
    flat_p = traverse_util.flatten_dict(dict(params))
    sm = state.graph.site_map
    pieces: dict = {}
    for name, m in state.weight_masks.items():
        pieces.setdefault(sm[name].weight[1:], []).append((sm[name], kept(m)))
    for path, ps in pieces.items():
        keep = put_layers(jnp.ones(flat_p[path].shape, bool), ps, jnp)
        flat_u[path] = jnp.where(keep, flat_u[path], -flat_p[path])
    return traverse_util.unflatten_dict(flat_u)


def prune_dead_units(state: CompressionState, variables: Mapping) -> CompressionState:
    """``state`` with mask 0 for every unit whose ``params`` slices are all exactly zero in the
    compressed forward's weights (elementwise masks and 0-bit channels applied, biases and
    norms included): their outputs are zero, so slim and export remove them exactly. Every
    group keeps at least one unit. jit-compatible."""
    index = unit_index(check_state(state), variables)
    if index.num_units == 0:
        return state
    w = quantize_weights(variables, state)["params"]
    dead = unit_sum(index, jnp.abs, w) == 0
    m = index.flat_masks(state.masks)
    live = kept(m) & ~dead
    seg = jnp.asarray(index.group_of_unit)
    n_live = jax.ops.segment_sum(live.astype(jnp.int32), seg, index.num_groups)
    # a group whose units all died keeps its first unit (a group is never emptied)
    first = jax.ops.segment_min(jnp.where(kept(m), jnp.arange(index.num_units),
                                          index.num_units), seg, index.num_groups)
    rescue = (n_live[seg] == 0) & (jnp.arange(index.num_units) == first[seg])
    return state.replace(masks=index.split(jnp.where(live | rescue, m, 0.0)))


# ---------------------------------------------------------------------------------------------
# Budget enforcement
# ---------------------------------------------------------------------------------------------


def _lower(b: Any, b_lo: float, pow2: bool) -> Any:
    low = jnp.where(b > 4.0, 4.0, 2.0) if pow2 else b - 1.0
    return jnp.maximum(low, b_lo)


def enforce_budget(
    state: CompressionState,
    *,
    bops: float | None = None,
    size: float | None = None,
    saliency: jax.Array | None = None,
    params: Mapping | None = None,
    unit_multiple: int = 1,
) -> CompressionState:
    """Lower bits, then prune the least salient units, until the exact relative ``bops`` and/or
    ``size`` (fractions of the fp32 model) hold.

    Bits: the learned quantizer whose one-step reduction saves the most of the exceeded figure is
    lowered by one bit (one power of two for power-of-two states), never below the spec's
    ``b_l``. Units: then the least salient live unit's group loses its least salient units (one,
    or down to the next multiple of ``unit_multiple``); every group keeps one unit (or one
    multiple). ``saliency`` is ``[U]`` in :class:`jaxjpq.units.UnitIndex` order (higher = keep);
    default: the L2 norm of the units' ``params`` slices (``params`` needed then). jit-compatible
    (static loop bounds); exact costs in float64. Returns the state with the new steps and masks;
    check :func:`within_budget` for the result (the minimum reachable state may still exceed it).
    """
    if bops is None and size is None:
        raise ValueError("enforce_budget needs a target: bops=... and/or size=... (fractions).")
    for kind, v in (("bops", bops), ("size", size)):
        if v is not None and not isinstance(v, jax.core.Tracer):
            check_budget(kind, v)
    return _enforce(state, bops, size, saliency, params, unit_multiple)


def smallest_state(state: CompressionState, *, kind: str = "bops",
                   saliency: jax.Array | None = None, params: Mapping | None = None
                   ) -> CompressionState:
    """The state :func:`enforce_budget` reaches for a ``kind`` (``"bops"`` or ``"size"``)
    target of 0: every learned quantizer at ``b_l`` and every group down to one unit, in the
    order :func:`enforce_budget` takes; its figure is the smallest reachable budget."""
    if kind not in ("bops", "size"):
        raise ValueError(f"kind must be 'bops' or 'size', got {kind!r}.")
    return _enforce(state, 0.0 if kind == "bops" else None,
                    0.0 if kind == "size" else None, saliency, params, 1)


def _enforce(state, bops, size, saliency, params, unit_multiple) -> CompressionState:
    graph = check_state(state)
    spec = state.spec
    b_lo = spec.bits[0] if spec is not None else 2.0
    pow2 = bool(state.power_of_two)
    w_signed, a_signed = signedness(state)
    cands = [("weight", n) for n in state.weight if n not in state.frozen]
    cands += [("act", n) for n in state.act if n not in state.frozen and bops is not None]
    fp_b, fp_s = cost.fp32_bops(graph), cost.fp32_size_bits(graph)
    readers: dict[str, list[str]] = {}  # activation quantizer -> the sites reading its tensor
    for s in graph.sites:
        readers.setdefault(s.act_key, []).append(s.name)

    def over(table):
        """Whether the exact figures of ``cost.site_table`` exceed a target (call under x64)."""
        o = jnp.asarray(False)
        if bops is not None:
            o = o | (sum(r["bops"] for r in table.values()) / fp_b > bops)
        if size is not None:
            o = o | (sum(r["size"] for r in table.values()) / fp_s > size)
        return o

    def lower_body(_, c):
        with jax.enable_x64(True):
            table = cost.site_table(c)
            o = over(table)
            savings = []
            for kind, n in cands:
                r = table[n]
                bits = r["b_w"] if kind == "weight" else r["b_a"]
                low = _lower(bits, b_lo, pow2)
                frac = jnp.where(bits > 0, 1.0 - low / jnp.maximum(bits, 1e-9), 0.0)
                rows = [r] if kind == "weight" else [table[m] for m in readers[n]]
                gain = sum(x["bops"] for x in rows) / fp_b if bops is not None else 0.0
                if size is not None and kind == "weight":
                    gain = gain + r["size"] / fp_s
                savings.append(jnp.where(low < bits, gain * frac, -1.0))
            # float32 for the choice: an arg-reduction traced with float64 on does not lower
            savings = jnp.stack(savings).astype(jnp.float32)
        pick = jnp.argmax(savings).astype(jnp.int32)
        go = o & (savings[pick] > 0)
        weight, act = dict(c.weight), dict(c.act)
        for i, (kind, n) in enumerate(cands):
            table = weight if kind == "weight" else act
            p = table[n]
            signed = (w_signed if kind == "weight" else a_signed)[n]
            cur = bits_from_step(p.d, p.q_m, p.t, signed)
            new = with_bits(p, _lower(jnp.ceil(cur - 1e-4), b_lo, pow2), signed)
            table[n] = p.replace(d=jnp.where(go & (pick == i), new.d, p.d))
        return c.replace(weight=weight, act=act)

    if cands:
        top = max(spec.bits[1], spec.init_bits) if spec is not None else 32.0
        span = 2 if pow2 else int(np.ceil(top - b_lo))
        state = jax.lax.fori_loop(0, len(cands) * span, lower_body, state)

    index = unit_index(graph, {"params": params} if params is not None
                       else graph.abstract_variables())
    if index.num_units == 0:
        return state
    if saliency is None:
        if params is None:
            raise ValueError("enforce_budget prunes by saliency: pass saliency=[U] or params=.")
        saliency = magnitude(index, params)
    saliency = jnp.asarray(saliency, jnp.float32)
    seg = jnp.asarray(index.group_of_unit)
    n = max(int(unit_multiple), 1)

    def prune_body(_, c):
        with jax.enable_x64(True):
            o = over(cost.site_table(c))
        m = index.flat_masks(c.masks)
        live = kept(m)
        n_live = jax.ops.segment_sum(live.astype(jnp.int32), seg, index.num_groups)
        step = jnp.where(n_live % n == 0, n, n_live % n) if n > 1 else jnp.ones_like(n_live)
        room = n_live - step >= (n if n > 1 else 1)
        ok = live & room[seg]
        pick = jnp.argmin(jnp.where(ok, saliency, jnp.inf))
        g = seg[pick]
        local = rank_in_group(index, jnp.where(live, saliency, jnp.inf))
        drop = (seg == g) & live & (local < step[g]) & o & ok[pick]
        return c.replace(masks=index.split(jnp.where(drop, 0.0, m)))

    return jax.lax.fori_loop(0, index.num_units - index.num_groups, prune_body, state)


def one_budget(size: float | None, bops: float | None) -> tuple[str, float]:
    """``("size", size)`` or ``("bops", bops)``: exactly one given, a fraction in (0, 1] of the
    fp32 model; else ``ValueError``."""
    if (size is None) == (bops is None):
        raise ValueError("give exactly one budget: size= or bops= (a fraction of fp32).")
    kind, alpha = ("size", float(size)) if size is not None else ("bops", float(bops))
    return kind, check_budget(kind, alpha)


def within_budget(state: CompressionState, *, bops: float | None = None,
                  size: float | None = None) -> Any:
    """True where the exact relative BOPs / size are at most the given fractions."""
    ok = True
    if bops is not None:
        ok = ok & (cost.relative_bops(state) <= bops)
    if size is not None:
        ok = ok & (cost.relative_size(state) <= size)
    return ok


# ---------------------------------------------------------------------------------------------
# The transform skeleton over the pair
# ---------------------------------------------------------------------------------------------


def _pair_like(params: Any, model: Any, compression: Any) -> Any:
    """``(model, compression)`` in the container type of ``params`` (tuple or NamedTuple)."""
    if type(params) is tuple:
        return (model, compression)
    return type(params)(model, compression)


def _digest_leaves(c: CompressionState) -> tuple[jax.Array, jax.Array]:
    """Per-leaf weighted sums of ``c``'s quantizers, masks and gates and their magnitudes
    (float32 ``[L]``), as one segment sum over the leaves concatenated (the weights are
    constants of the trace). Elementwise masks are left out: no method updates them, so a
    chained transform that moves them also moves a quantizer, and they are weight-sized."""
    flat = [jnp.asarray(x, jnp.float32).reshape(-1)
            for x in jax.tree.leaves(c.replace(weight_masks={}))]
    if not flat:
        return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32)
    sizes = [int(f.size) for f in flat]
    w = np.concatenate([1.0 + 0.5 * np.cos(np.arange(n) * 0.7548 + i)
                        for i, n in enumerate(sizes)]).astype(np.float32)
    seg = np.repeat(np.arange(len(sizes)), sizes)
    x = jnp.concatenate(flat)
    sums = jax.ops.segment_sum(jnp.stack([w * x, w * jnp.abs(x)], axis=1), seg,
                               num_segments=len(sizes), indices_are_sorted=True)
    return sums[:, 0], sums[:, 1]


class Digest(NamedTuple):
    """What a pair method expects the next compression state to be (per-leaf sums)."""

    values: jax.Array
    scale: jax.Array


def digest(c: CompressionState) -> Digest:
    v, m = _digest_leaves(c)
    return Digest(v, m)


class ChainedTransformError(ValueError):
    """A transform chained after a pair method changed its compression updates."""


def chained_error(name: str = "a pair method") -> ChainedTransformError:
    return ChainedTransformError(
        f"the compression state given to {name} is not the one its last update produced: a "
        "transform chained after it changed the compression updates (e.g. a learning rate or "
        "clip applied to the whole pair), so its masks and bits were corrupted. Put it last in "
        "optax.chain, or apply such transforms to the model params only (e.g. inside `inner`)."
    )


def tampered(c: CompressionState, expected: Digest) -> jax.Array:
    """bool scalar: ``c`` differs from the state the method's last update produced."""
    return _tampered(_digest_leaves(c)[0], expected)


def _tampered(values: jax.Array, expected: Digest) -> jax.Array:
    return jnp.any(jnp.abs(values - expected.values) > 1e-4 * expected.scale + 1e-30)


class PairState(NamedTuple):
    """State of a :func:`pair_transform`.

    Attributes:
      method: the method's own state (e.g. ``GetaState``).
      expect: digest of the compression state its last update produced.
      tampered: bool scalar, sticky: a transform chained after the method changed its updates
        (the updates are then NaN).
    """

    method: Any
    expect: Digest
    tampered: jax.Array

    def fault(self) -> ChainedTransformError | None:
        """The error to raise for this state (host side), or None: the fault protocol
        :func:`jaxjpq.train.train` reads when a step's values turn non-finite."""
        return chained_error() if bool(jax.device_get(self.tampered)) else None


def pair_transform(
    name: str,
    init: Callable[[Any, CompressionState], Any],
    update: Callable[..., tuple[Any, CompressionState, Any]],
) -> optax.GradientTransformation:
    """An optax transform over ``(model params, CompressionState)`` from a method's two steps.

    ``init(model_params, cstate) -> method_state``; ``update(model_grads, comp_grads,
    model_params, cstate, method_state) -> (model_updates, new_cstate, new_method_state)``.

    The skeleton checks the state (:func:`jaxjpq.state.check_state`), turns ``new_cstate`` into
    the ``new - old`` update that ``optax.apply_updates`` adds and returns updates in the
    container type of the params (tuple or :class:`jaxjpq.state.CompressedParams`).

    Contract: the transform is the last one applied to the compression updates (anything
    chained after it acts on the model params only). The skeleton checks the contract at every
    update at the cost of a weighted sum over the quantizers, masks and gates (not the
    weights): when the compression state it is given is not the one it produced, it makes every
    update NaN and sets :attr:`PairState.tampered`; :func:`jaxjpq.train.train` then raises
    :class:`ChainedTransformError` (:meth:`PairState.fault`).
    """

    def init_fn(params):
        p, c = params
        check_state(c)
        return PairState(init(p, c), digest(c), jnp.zeros((), bool))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(f"{name} needs params: call update(updates, state, params).")
        g_p, g_c = updates
        p, c = params
        check_state(c)
        v_old, m_old = _digest_leaves(c)
        bad = _tampered(v_old, state.expect) | state.tampered
        poison = jnp.where(bad, jnp.nan, 0.0)
        u_p, c_new, m_state = update(g_p, g_c, p, c, state.method)
        u_p = jax.tree.map(lambda a: a + poison.astype(a.dtype), u_p)
        u_c = jax.tree.map(lambda a, b: a - b + poison.astype(a.dtype), c_new, c)
        # c + (c_new - c) rounds at the scale of both states: a leaf that shrinks by orders of
        # magnitude in one update (e.g. a step projected to its floor) is not a tampered one
        v_new, m_new = _digest_leaves(c_new)
        expect = Digest(v_new, m_new + m_old)
        return _pair_like(params, u_p, u_c), PairState(m_state, expect, bad)

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------
# QAT: the fixed-bits fine-tune
# ---------------------------------------------------------------------------------------------


class QatState(NamedTuple):
    """State of :func:`qat`.

    Attributes:
      inner_state: the inner optimizer's state over the model params.
    """

    inner_state: optax.OptState


def qat(
    inner: optax.GradientTransformation,
    *,
    quant_lr: float = 1e-3,
    train_clips: bool = True,
) -> optax.GradientTransformation:
    """Quantization-aware fine-tuning at the state's bits, over ``(params, CompressionState)``.

    The weights take ``inner``'s steps; pruned units and elementwise-masked weights are held at
    exactly zero; every learned quantizer keeps its integer bits (the state's, rounded, within
    the spec's range) while its clip ``q_m`` takes SGD steps (``quant_lr``; off with
    ``train_clips=False``). Masks never change. The fine-tune stage of every method (a search
    returns a state, ``qat`` trains it); put it last in a chain over the pair.
    """

    def init(p, c):
        return QatState(inner.init(p))

    def update(g_p, g_c, p, c, s):
        index = unit_index(c.graph, {"params": p})
        u_p, inner_state = inner.update(g_p, s.inner_state, p)
        u_p = hold(index, u_p, p, ~kept(index.flat_masks(c.masks)), c)
        w_signed, a_signed = signedness(c)
        b_lo, b_hi = c.spec.bits if c.spec is not None else (1.0, 32.0)
        kw = dict(lr=jnp.asarray(quant_lr, jnp.float32), b_lo=b_lo, b_hi=b_hi,
                  train_clips=train_clips)
        new = c.replace(
            weight=fixed_bits_step(c.weight, g_c.weight, w_signed, c.frozen, **kw),
            act=fixed_bits_step(c.act, g_c.act, a_signed, c.frozen, **kw),
        )
        return u_p, new, QatState(inner_state)

    return pair_transform("qat", init, update)
