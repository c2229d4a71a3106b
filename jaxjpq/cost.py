"""Cost model: MACs, BOPs and model size of a compressed graph, soft (differentiable) and exact.

Per site ``l`` (per example, so costs do not depend on the batch size):

    BOPs_l = MACs_l · f_in,l · f_out,l · b_w,l · b_a,l
    size_l = numel_l · f_in,l · f_out,l · b_w,l

``f_out`` = kept fraction of the output units (``out_group``'s mask), ``f_in`` = kept fraction of
the weight's input rows (``in_group``'s mask, each unit weighted by how many rows it owns on this
site's weight, e.g. 7·7 rows per channel after a flatten; a depthwise site whose input group is
its output group counts the channel once). Unquantized operands count 32 bits.

* **soft**: continuous bits ``b(d, q_m, t)`` (power-of-two states: rounded with a straight-through
  gradient), masks clipped to [0, 1] and used as keep probabilities (times the VIB gates' keep
  probabilities when ``state.gates`` is set); per-channel weight bits are
  averaged over channels weighted by the output mask. Differentiable in d, q_m, t and the masks.
* **exact**: storage bits ``ceil(b)`` (what :mod:`jaxjpq.export` stores; power-of-two states: the
  rounded {2, 4, 8}), per-channel sites at the largest kept channel's bits, masks thresholded at
  0.5. With a concrete state the exact numbers are computed in float64 on the host, so they equal
  hand-computed integers; under ``jit`` they are float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxjpq import gates as gates_lib
from jaxjpq.graph import Graph, Site
from jaxjpq.quant import bits_from_step, pow2_bits_hard, round_bits_pow2
from jaxjpq.state import CompressionState, check_state, site_quantizer

FP_BITS = 32.0


def _is_concrete(state: CompressionState) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(state))


def _xp(state: CompressionState, soft: bool):
    return np if (not soft and _is_concrete(state)) else jnp


def _mask(state, gid, soft, xp):
    m = state.masks.get(gid) if gid is not None else None
    if m is None:
        return None
    if xp is np:
        m = np.asarray(m, np.float64)
    if soft:  # clip, keeping gradient 1 at the bounds (jnp.clip halves it at a tie)
        m = xp.where((m >= 0.0) & (m <= 1.0), m, xp.clip(m, 0.0, 1.0))
        gate = state.gates.get(gid)
        return m if gate is None else m * gates_lib.keep_prob(gate, state.gate_threshold)
    return (m > 0.5).astype(xp.float32 if xp is jnp else float)


def _unit_rows(graph: Graph, gid: str, site: Site, dependents: bool):
    """(k per unit, total rows along the slice axis) of ``gid``'s slice on ``site``'s weight."""
    g = graph.group_map[gid]
    slices = g.dependents if dependents else g.params
    for sl in slices:
        if sl.key == site.weight:
            idx = np.asarray(sl.index).reshape(sl.index.shape[0], -1)
            return float(idx.shape[1]), float(site.weight_shape[sl.axis])
    return None


def _fraction(graph, state, site, soft, xp, side: str):
    gid = site.in_group if side == "in" else site.out_group
    m = _mask(state, gid, soft, xp)
    if m is None:
        return 1.0
    rows = _unit_rows(graph, gid, site, dependents=(side == "in"))
    if rows is None:
        if side == "in" and site.in_group == site.out_group:
            return 1.0  # depthwise: the channel is counted once, on the output side
        return xp.mean(m)
    k, total = rows
    return (xp.sum(m) * k + (total - k * m.shape[0])) / total


def _weight_bits(state, site, soft, xp):
    if site.name not in state.weight:
        return FP_BITS
    p = site_quantizer(state, "weight", site.name)
    if xp is np:
        b = np.log2(np.asarray(p.q_m, np.float64) ** np.asarray(p.t, np.float64)
                    / np.asarray(p.d, np.float64) + 1.0) + 1.0
    else:
        b = bits_from_step(p.d, p.q_m, p.t, True)
    b = _round(b, state, soft, xp)
    if np.ndim(b) == 0:
        return b
    m = _mask(state, site.out_group, soft, xp) if len(site.out_axes) == 1 else None
    if m is None or m.shape != b.shape:
        m = xp.ones(b.shape)
    if soft:
        return xp.sum(b * m) / xp.maximum(xp.sum(m), 1e-12)
    return xp.max(xp.where(m > 0, b, 0.0))


def _round(b, state, soft, xp):
    if state.power_of_two:
        if soft:
            return round_bits_pow2(b)
        return pow2_bits_hard(b, xp)
    return b if soft else xp.ceil(b - 1e-4)


def _act_bits(graph, state, site, soft, xp):
    if site.name not in state.act:
        return FP_BITS
    p = site_quantizer(state, "act", site.name)
    signed = site.signed_input
    if xp is np:
        q = np.asarray(p.q_m, np.float64) ** np.asarray(p.t, np.float64)
        b = np.log2(q / np.asarray(p.d, np.float64) + 1.0) + (1.0 if signed else 0.0)
    else:
        b = bits_from_step(p.d, p.q_m, p.t, signed)
    return _round(b, state, soft, xp)


def _terms(graph: Graph, state: CompressionState, soft: bool) -> list[dict[str, Any]]:
    check_state(graph, state)
    xp = _xp(state, soft)
    rows = []
    for s in graph.sites:
        f_in = _fraction(graph, state, s, soft, xp, "in")
        f_out = _fraction(graph, state, s, soft, xp, "out")
        rows.append(
            dict(
                site=s,
                f_in=f_in,
                f_out=f_out,
                b_w=_weight_bits(state, s, soft, xp),
                b_a=_act_bits(graph, state, s, soft, xp),
                macs=float(s.macs_per_example),
                numel=float(np.prod(s.weight_shape)),
            )
        )
    return rows


def _out(x, soft):
    return x if soft or isinstance(x, jax.Array) else float(x)


def macs(graph: Graph) -> dict[str, float]:
    """Dense MACs per example of each site."""
    return {s.name: float(s.macs_per_example) for s in graph.sites}


def bits(graph: Graph, state: CompressionState, soft: bool = False) -> dict[str, tuple[Any, Any]]:
    """``{site: (b_w, b_a)}``: each site's weight and input-activation bits (32 = float)."""
    return {r["site"].name: (_out(r["b_w"], soft), _out(r["b_a"], soft))
            for r in _terms(graph, state, soft)}


def site_bops(graph: Graph, state: CompressionState, soft: bool = False) -> dict[str, Any]:
    """``{site: MACs · f_in · f_out · b_w · b_a}`` per example."""
    return {r["site"].name: _out(r["macs"] * r["f_in"] * r["f_out"] * r["b_w"] * r["b_a"], soft)
            for r in _terms(graph, state, soft)}


def bops(graph: Graph, state: CompressionState, soft: bool = False) -> Any:
    """Total BOPs per example: soft = differentiable jnp scalar, exact = float (see module doc)."""
    t = _terms(graph, state, soft)
    return _out(sum(r["macs"] * r["f_in"] * r["f_out"] * r["b_w"] * r["b_a"] for r in t), soft)


def fp32_bops(graph: Graph) -> float:
    """BOPs of the dense fp32 model: ``Σ MACs · 32 · 32``."""
    return float(sum(s.macs_per_example for s in graph.sites) * FP_BITS * FP_BITS)


def relative_bops(graph: Graph, state: CompressionState, soft: bool = False) -> Any:
    """``bops / fp32_bops`` in (0, 1]."""
    return bops(graph, state, soft) / fp32_bops(graph)


def size_bits(
    graph: Graph, state: CompressionState, soft: bool = False, include_scales: bool = False
) -> Any:
    """Bits of the site weights: ``Σ numel · f_in · f_out · b_w``.

    ``include_scales`` adds 3 float32 numbers (d, q_m, t) per kept output channel of per-channel
    quantizers (per tensor: 3 per site) for weight and activation quantizers.
    """
    total = 0.0
    for r in _terms(graph, state, soft):
        total = total + r["numel"] * r["f_in"] * r["f_out"] * r["b_w"]
        if include_scales:
            p = state.weight.get(r["site"].name)
            if p is not None:
                n = float(np.prod(np.shape(p.d))) if np.ndim(p.d) else 1.0
                total = total + 3 * FP_BITS * (n * r["f_out"] if np.ndim(p.d) else 1.0)
            if r["site"].name in state.act:
                total = total + 3 * FP_BITS
    return _out(total, soft)


def fp32_size_bits(graph: Graph) -> float:
    """Bits of the site weights in float32: ``Σ numel · 32``."""
    return float(sum(np.prod(s.weight_shape) for s in graph.sites) * FP_BITS)


def relative_size(graph: Graph, state: CompressionState, soft: bool = False) -> Any:
    """``size_bits / fp32_size_bits`` (site weights only, no scales)."""
    return size_bits(graph, state, soft) / fp32_size_bits(graph)


def report(graph: Graph, state: CompressionState) -> str:
    """Per-layer table of the exact costs: kept channels, bits w/a, MACs, BOPs share."""
    t = _terms(graph, state, soft=False)
    site_b = [r["macs"] * r["f_in"] * r["f_out"] * r["b_w"] * r["b_a"] for r in t]
    total = float(sum(site_b)) or 1.0

    def kept(gid):
        if gid is None:
            return "-"
        g = graph.group_map[gid]
        m = state.masks.get(gid)
        k = g.size if m is None else int(np.sum(np.asarray(m) > 0.5))
        return f"{k}/{g.size}"

    head = f"{'layer':<28} {'in kept':>9} {'out kept':>9} {'w bits':>6} {'a bits':>6} " \
           f"{'MACs':>12} {'BOPs %':>7}"
    lines = [head, "-" * len(head)]
    for r, b in zip(t, site_b, strict=True):
        s = r["site"]
        kmacs = float(r["macs"] * r["f_in"] * r["f_out"])
        lines.append(
            f"{s.name:<28} {kept(s.in_group):>9} {kept(s.out_group):>9} "
            f"{float(r['b_w']):>6.0f} {float(r['b_a']):>6.0f} {kmacs:>12.0f} "
            f"{100 * float(b) / total:>7.2f}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"relative BOPs {float(total) / fp32_bops(graph):.4%}   "
        f"relative size {float(relative_size(graph, state)):.4%}"
    )
    return "\n".join(lines)
