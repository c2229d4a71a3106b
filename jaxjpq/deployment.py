"""The model a user ships: ``jaxjpq.deploy(pair) -> DeployedModel``.

The deployed model is the **slim** network (pruned units removed by :func:`jaxjpq.slim.slim`, so
scan stacks, attention heads, concat, depthwise and nnx models work unchanged) whose quantized
site weights are held in device memory as integers, at the storage :func:`jaxjpq.cost.storage`
picks from the widest channel's bits:

- ``int4x2``: two signed 4-bit codes per byte (≤ 4 bits), unpacked inside the computation;
- ``int8``: one signed byte per code (5-8 bits);
- ``float32``: a site above 8 bits, a weight shared by several sites, unquantized leaves.

Each integer leaf has float32 scales (one per kept output channel, or one per tensor; per layer
of a stacked weight). The codes are dequantized inside the jitted forward (``codes · scale``,
the weight-only path) and the site inputs are fake-quantized with the state's activation
quantizers (in the cheapest of :data:`ACT_FORMS`: ``t`` = 1 without the log / exp per element,
a learned ``t`` with few codes by comparisons against its code thresholds), so the output
equals the compressed forward (masked, fake-quantized) of the state up to float rounding; a site
input within that rounding of a code boundary may take the neighbouring code. On the integer
path (``deploy(..., path="integer")``) a site whose input codes fit int8 contracts int8 codes
with int32 accumulation (``preferred_element_type``) and applies both scales to the accumulator
(by default the kinds :func:`integer_kinds` names). An elementwise-masked site keeps its dense
slim codes, the masked entries as code 0 (as fast as any other site; :func:`jaxjpq.export.pack`
is the compact form on disk).

``save`` writes the arrays (one ``.npz``), the forward serialized by ``jax.export`` per batch size
and a JSON with every file's checksum; :func:`load` reads them back (checked, raising
:class:`~jaxjpq.export.CorruptExportError` naming the file or array), and the saved forward runs
with ``jax`` and ``numpy`` alone (see :data:`SERVE_SNIPPET`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxjpq import cost
from jaxjpq import gates as gates_lib
from jaxjpq.compress import act_quantized_apply, transform_variables
from jaxjpq.export import (
    CorruptExportError,
    array_digest,
    pack_codes,
    traced_kwargs,
    unpack_codes,
)
from jaxjpq.graph import (
    check_variables,
    graph_fingerprint,
    kept,
    kept_positions,
    leaf,
    put_layers,
    set_leaf,
)
from jaxjpq.hooks import Contraction
from jaxjpq.jaxprs import key_of
from jaxjpq.quant import (
    THRESHOLD_LEVELS,
    CodeThresholds,
    broadcast_params,
    code_thresholds,
    codes,
    effective_params,
    top_code,
)
from jaxjpq.slim import apply_masks, slim
from jaxjpq.state import (
    CompressedParams,
    CompressionState,
    check_state,
    effective_weight_quantizer,
)

FORMAT = "jaxjpq-deployed-1"

SERVE_SNIPPET = """\
import numpy as np, jax
arrays = dict(np.load("{directory}/arrays.npz"))
with open("{directory}/forward_b{n}.jaxexport", "rb") as f:
    forward = jax.export.deserialize(bytearray(f.read()))
y = forward.call(arrays, x)  # x: a batch of {n} inputs
"""
"""How a process without jaxjpq serves a saved model (``.format(directory=..., n=...)``)."""


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """One variable leaf of a deployed model.

    Attributes:
      path: the leaf's key (``(collection, *path)``).
      kind: ``"int4x2"``, ``"int8"`` or ``"float32"`` (see module docstring).
      shape: the slim leaf's shape; dense_shape: the dense model's.
      why: why this storage (bits, or why the leaf stays float).
    """

    path: tuple[str, ...]
    kind: str
    shape: tuple[int, ...]
    dense_shape: tuple[int, ...]
    why: str

    @property
    def name(self) -> str:
        return "/".join(self.path)


def _int_codes(kind: str, c: jax.Array, shape: Sequence[int]) -> jax.Array:
    """The int8 codes ``[shape]`` of a leaf stored as ``kind``, inside the computation."""
    if kind == "int8":
        return c
    return unpack_codes(c, 4, math.prod(shape), jnp).reshape(tuple(shape)).astype(jnp.int8)


def _flat(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    return [(key_of(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _out_scale(f: Contraction, scale: jax.Array, x_ndim: int) -> jax.Array | None:
    """The weight's scale (broadcast against the weight operand) laid out against the
    contraction's output, or None where it varies along an axis the output does not keep."""
    s = jnp.asarray(scale)
    if s.size == 1:
        return s.reshape(())
    if f.primitive == "dot_general":
        (lc, rc), (lb, rb) = f.params["dimension_numbers"]
        wi = f.weight_operand
        w_c, w_b, x_c, x_b = (rc, rb, lc, lb) if wi == 1 else (lc, lb, rc, rb)
        if w_b or any(s.shape[a] != 1 for a in w_c):
            return None
        free = jnp.squeeze(s, axis=tuple(w_c)) if w_c else s
        n_x_free = x_ndim - len(x_c) - len(x_b)
        if wi == 1:
            return free.reshape((1,) * n_x_free + free.shape)
        return free.reshape(free.shape + (1,) * n_x_free)
    if f.primitive == "conv_general_dilated" and f.weight_operand == 1:
        dn = f.params["dimension_numbers"]
        o = dn.rhs_spec[0]
        if any(n != 1 for a, n in enumerate(s.shape) if a != o):
            return None
        shape = [1] * x_ndim
        shape[dn.out_spec[1]] = s.shape[o]
        return s.reshape(shape)
    return None


def _integer_contract(graph, codes: Mapping[str, tuple], options: Mapping) -> Callable:
    """The hook contraction of the integer path: int8 input codes times int8 weight codes,
    accumulated in int32, the scales applied to the accumulator; other sites (and any whose
    layout does not allow it) contract as given."""
    sm = graph.site_map

    def contract(site, p, f, x, w):
        c = codes.get(site)
        if c is None or p is None or c[0].shape != w.shape:
            return f(x, w)
        out = _out_scale(f, c[1], x.ndim)
        if out is None:
            return f(x, w)
        d = (p.d if isinstance(p, CodeThresholds)
             else effective_params(p, sm[site].signed_input, options["power_of_two"]).d)
        xc = jnp.round(x / d).astype(jnp.int8)
        y = f(xc, c[0], preferred_element_type=jnp.int32)
        return y.astype(jnp.float32) * (d * out)

    return contract


def _paddable(f: Contraction) -> bool:
    """A convolution whose output channels can be widened: one feature group, one batch
    group."""
    return (f.primitive == "conv_general_dilated" and f.params["feature_group_count"] == 1
            and f.params["batch_group_count"] == 1)


def _padded(f: Contraction, x: jax.Array, w: jax.Array, width: int) -> jax.Array:
    """``f(x, w)`` computed with ``width`` output channels (zero kernels appended) and the extra
    channels sliced off: the same outputs, another kernel size (:meth:`DeployedModel.tuned`)."""
    dn = f.params["dimension_numbers"]
    o = dn.rhs_spec[0]
    n = w.shape[o]
    if width <= n:
        return f(x, w)
    pad = [(0, 0)] * w.ndim
    pad[o] = (0, width - n)
    return jax.lax.slice_in_dim(f(x, jnp.pad(w, pad)), 0, n, axis=dn.out_spec[1])


def _taps(f: Contraction, x: jax.Array, w: jax.Array) -> jax.Array:
    """``f(x, w)`` (a :func:`_paddable` conv without input dilation) as a sum over the kernel's
    spatial offsets of a strided slice of the padded input contracted with that offset's
    ``[in, out]`` kernel: the same outputs up to the order of the sums, another kernel
    (:meth:`DeployedModel.tuned`; XLA:CPU runs a conv with one input channel several times
    faster this way)."""
    pr = f.params
    dn = pr["dimension_numbers"]
    nsp = x.ndim - 2
    xs = x.transpose(dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])  # [N, *spatial, I]
    ws = w.transpose(*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])  # [*spatial, I, O]
    xs = jax.lax.pad(xs, jnp.zeros((), xs.dtype),
                     [(0, 0, 0), *((lo, hi, 0) for lo, hi in pr["padding"]), (0, 0, 0)])
    k, dil, stride = ws.shape[:nsp], pr["rhs_dilation"], pr["window_strides"]
    out = [(xs.shape[1 + i] - (k[i] - 1) * dil[i] - 1) // stride[i] + 1 for i in range(nsp)]
    y = None
    for off in np.ndindex(*k):
        start = [0, *(o * d for o, d in zip(off, dil, strict=True)), 0]
        limit = [xs.shape[0], *(s + (n - 1) * st + 1 for s, n, st in
                                zip(start[1:-1], out, stride, strict=True)), xs.shape[-1]]
        part = jax.lax.dot_general(
            jax.lax.slice(xs, start, limit, [1, *stride, 1]), ws[off],
            (((nsp + 1,), (0,)), ((), ())), precision=pr["precision"],
            preferred_element_type=pr["preferred_element_type"])
        y = part if y is None else y + part
    perm = [0] * x.ndim  # [N, *spatial, O] -> the conv's output layout
    perm[dn.out_spec[0]], perm[dn.out_spec[1]] = 0, nsp + 1
    for i, d in enumerate(dn.out_spec[2:]):
        perm[d] = 1 + i
    return y.transpose(perm)


def _tappable(f: Contraction) -> bool:
    """A conv :func:`_taps` computes: one feature group, one batch group, no input dilation,
    the weight as the kernel operand."""
    return (_paddable(f) and f.weight_operand == 1
            and all(d == 1 for d in f.params["lhs_dilation"]))


def _forward(graph, slim_fn: Callable, leaves: Sequence[LeafInfo], act: Mapping,
             options: Mapping, kwargs: Mapping, integer_sites: Sequence[str],
             conv_widths: Mapping[str, int], conv_taps: Sequence[str] = (),
             record: dict | None = None) -> Callable:
    """``fn(arrays, *args)``: dequantize, then the slim model with quantized site inputs;
    ``integer_sites`` contract on integers (:func:`_integer_contract`), the float conv sites of
    ``conv_widths`` at that many output channels (:func:`_padded`), those of ``conv_taps`` as
    shifted taps (:func:`_taps`). ``record`` (a dict) receives ``{site: (contraction, input
    aval, weight aval)}`` of every widenable float conv site."""
    run = act_quantized_apply(slim_fn, graph)
    sm = graph.site_map
    int_set = frozenset(integer_sites)
    taps = frozenset(conv_taps)

    def float_contract(site, p, f, x, w):
        if site in taps and not _tappable(f):
            raise ValueError(f"{site} is a grouped, input-dilated or transposed convolution; "
                             "it cannot run as shifted taps (drop it from the conv taps).")
        if not _paddable(f):
            if site in conv_widths:
                raise ValueError(f"{site} is a grouped convolution; its output channels cannot "
                                 "be computed wider (drop it from the conv widths).")
            return f(x, w)
        if record is not None:
            record[site] = (f, jax.ShapeDtypeStruct(x.shape, x.dtype),
                            jax.ShapeDtypeStruct(w.shape, w.dtype))
        if site in taps:
            return _taps(f, x, w)
        return _padded(f, x, w, conv_widths[site]) if site in conv_widths else f(x, w)

    def fn(arrays, *args):
        variables: dict = {}
        ints: dict = {}  # leaf path -> (int8 codes, scale)
        for lf in leaves:
            if lf.kind == "float32":
                v = arrays[lf.name]
            else:
                q = _int_codes(lf.kind, arrays[lf.name + ":codes"], lf.shape)
                ints[lf.path] = (q, arrays[lf.name + ":scale"])
                v = q.astype(jnp.float32) * ints[lf.path][1]  # codes · scale
            set_leaf(variables, lf.path, v)
        contract = None
        if int_set or conv_widths or taps or record is not None:
            integer = _integer_contract(graph, {n: ints[sm[n].weight] for n in int_set},
                                        options)

            def contract(site, p, f, x, w):
                if site in int_set:
                    return integer(site, p, f, x, w)
                return float_contract(site, p, f, x, w)

        return run(variables, act, *args, contract=contract, **options, **kwargs)

    return fn


def integer_sites(state: CompressionState) -> dict[str, str]:
    """``{site: why not}`` for every site, ``""`` where the integer path applies: int8 / int4
    weight codes of a weight of its own (not a stacked layer) and an input quantizer whose codes
    fit int8 (at most 127 levels each side)."""
    graph = check_state(state)
    out = {}
    for s in graph.sites:
        kind, why = cost.storage(state, s.weight)
        p = state.act.get(s.act_key)
        if kind == "float32":
            out[s.name] = f"weight stays float ({why})"
        elif s.layer_axes:
            out[s.name] = "a layer of a stacked weight"
        elif p is None:
            out[s.name] = "its input is not quantized"
        else:
            top = top_code(p, s.signed_input, state.power_of_two)
            out[s.name] = "" if top <= 127 else f"input codes up to {top:g} exceed int8"
    return out


ACT_FORMS = ("exponent_free", "thresholds", "log_exp")
"""How the deployed model evaluates an activation quantizer, cheapest first: ``t`` = 1 (no
log / exp), comparisons against :func:`~jaxjpq.quant.code_thresholds` (at most
:data:`~jaxjpq.quant.THRESHOLD_LEVELS` codes per sign), or the compressed forward's log / exp."""


def activation_forms(state: CompressionState) -> dict[str, str]:
    """``{act key: form}`` (one of :data:`ACT_FORMS`) for the state's activation quantizers. The
    layers of a stacked weight share one traced quantizer, so they take the costliest form
    among them."""
    signed = _signed_inputs(state)
    forms = {}
    for k, p in state.act.items():
        if not state.learn_t or np.all(np.asarray(p.t) == 1.0):
            forms[k] = "exponent_free"
        elif top_code(p, signed[k], state.power_of_two) <= THRESHOLD_LEVELS:
            forms[k] = "thresholds"
        else:
            forms[k] = "log_exp"
    for keys in _stacks(state).values():
        worst = max((forms[k] for k in keys), key=ACT_FORMS.index)
        forms.update(dict.fromkeys(keys, worst))
    return forms


def _signed_inputs(state: CompressionState) -> dict[str, bool]:
    """``{act key: whether its input is signed}``."""
    return {s.act_key: s.signed_input for s in state.graph.sites}


def _stacks(state: CompressionState) -> dict[tuple, list[str]]:
    """``{stacked weight leaf: act keys of its layers}``."""
    stacks: dict = {}
    for s in state.graph.sites:
        if s.layer_axes and s.act_key in state.act and s.act_key not in stacks.get(s.weight, []):
            stacks.setdefault(s.weight, []).append(s.act_key)
    return stacks


def _deployed_act(state: CompressionState, forms: Mapping[str, str]) -> dict[str, Any]:
    """The activation quantizers as the deployed forward takes them: ``QuantParams`` or, in the
    thresholds form, :class:`~jaxjpq.quant.CodeThresholds` (a stack's padded to one length)."""
    signed, p2 = _signed_inputs(state), state.power_of_two
    levels: dict = {}  # a stack's common threshold count (others: their own top code)
    for keys in _stacks(state).values():
        if forms[keys[0]] == "thresholds":
            top = max(top_code(state.act[k], signed[k], p2) for k in keys)
            levels.update(dict.fromkeys(keys, top))
    return {k: (code_thresholds(p, signed[k], p2, levels.get(k)) if forms[k] == "thresholds"
                else jax.tree.map(jnp.asarray, p)) for k, p in state.act.items()}


class DeployedModel:
    """A deployed model: ``model(*args)`` runs it (jitted; one compilation per input shape).

    Attributes:
      arrays: ``{name: device array}``: ``"<leaf>"`` (float leaves), ``"<leaf>:codes"``
        (uint8 / int8) and ``"<leaf>:scale"`` (float32) for integer leaves.
      leaves: a :class:`LeafInfo` per variable leaf.
      meta: what :meth:`save` records besides the arrays (format, graph fingerprint, act
        quantizers, options).
    """

    def __init__(self, arrays: Mapping[str, Any], leaves: Sequence[LeafInfo], meta: Mapping,
                 make: Callable[..., Callable] | None = None,
                 exported: Mapping[int, Any] | None = None):
        """``make(conv_widths, conv_taps=(), record=None) -> fn(arrays, *args)`` builds the
        forward (a model from :func:`deploy`); a loaded model has ``exported`` forwards per batch
        size instead."""
        self.arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
        self.leaves = tuple(leaves)
        self.meta = dict(meta)
        self._make = make
        self._fn = (make(self.meta.get("conv_widths", {}), self.meta.get("conv_taps", []))
                    if make is not None else None)
        self._jit = jax.jit(self._fn) if self._fn is not None else None
        self._exported = dict(exported or {})

    def __call__(self, *args: Any) -> Any:
        if self._jit is not None:
            return self._jit(self.arrays, *args)
        n = int(np.shape(args[0])[0])
        if n not in self._exported:
            raise ValueError(f"this model was saved for batch sizes {sorted(self._exported)}; "
                             f"got {n}. Save it again with batch_sizes including {n}.")
        return self._exported[n].call(self.arrays, *args)

    def with_conv_widths(self, widths: Mapping[str, int]) -> DeployedModel:
        """This model with each conv site of ``widths`` computed at that many output channels
        (zero kernels appended inside the forward, the extra outputs sliced off): the same
        outputs and resident bytes, another kernel. Widths lie between the site's slim and dense
        channel counts (``meta["conv_channels"]``); these sites leave the conv taps."""
        out = {}
        for site, w in widths.items():
            lo, hi = self._site_channels(site)
            if not lo <= int(w) <= hi:
                raise ValueError(f"conv width {w} of {site} is outside [{lo}, {hi}] (its slim "
                                 "and dense output channels).")
            if int(w) > lo:
                out[site] = int(w)
        return self._with_convs(out, [n for n in self.meta.get("conv_taps", []) if n not in out])

    def with_conv_taps(self, sites: Sequence[str]) -> DeployedModel:
        """This model with each conv site of ``sites`` computed as a sum over its kernel's
        spatial offsets of a shifted input slice times that offset's kernel (one dot each): the
        same outputs up to float rounding and the same resident bytes, another kernel. These
        sites leave the conv widths."""
        for site in sites:
            self._site_channels(site)  # other names raise
        taps = sorted(set(sites))
        return self._with_convs({n: w for n, w in self.meta.get("conv_widths", {}).items()
                                 if n not in taps}, taps)

    def _site_channels(self, site: str) -> list[int]:
        """``[slim, dense]`` output channels of conv site ``site``; other names raise."""
        chans = self.meta["conv_channels"]
        if site not in chans:
            raise ValueError(f"{site!r} is not a conv site of this model; conv sites: "
                             f"{sorted(chans)}.")
        return chans[site]

    def _with_convs(self, widths: Mapping[str, int], taps: Sequence[str]) -> DeployedModel:
        """This model with these conv widths and taps (see :meth:`with_conv_widths`)."""
        if self._make is None:
            raise ValueError("a loaded model is already exported; deploy it again to change "
                             "how its convs run.")
        return DeployedModel(self.arrays, self.leaves,
                             {**self.meta, "conv_widths": dict(widths), "conv_taps": list(taps)},
                             make=self._make)

    def tuned(self, *example_args: Any, rounds: int = 9, min_gain: float = 0.1,
              step: int = 8, seed: int = 0) -> DeployedModel:
        """This model with how each float conv site runs chosen afresh by measurement on this
        backend: at its slim output channel count, at a wider one (:meth:`with_conv_widths`: its
        multiples of ``step`` up to the dense count, and the dense count) or as shifted taps
        (:meth:`with_conv_taps`), each conv timed alone on random inputs of the site's shape for
        ``example_args`` (interleaved ``rounds``, median); another form is proposed when at
        least ``min_gain`` (a fraction) faster than the plain conv. The proposal is kept only if
        the whole model on ``example_args`` is then at least ``min_gain`` faster too; otherwise
        the model comes back with plain convs. XLA:CPU's convolutions run some channel counts,
        and one input channel, several times slower than the alternatives."""
        if self._make is None:
            raise ValueError("a loaded model is already exported; tune it before saving.")
        record: dict = {}
        jax.eval_shape(self._make({}, (), record), self.arrays, *example_args)
        rng = np.random.default_rng(seed)
        widths, taps = {}, []
        for site, (f, xa, wa) in record.items():
            if site not in self.meta["conv_channels"]:
                continue
            lo, hi = self.meta["conv_channels"][site]
            cands: list = sorted({lo, hi, *range(-(-lo // step) * step, hi + 1, step)})
            cands += ["taps"] if _tappable(f) else []
            if len(cands) == 1:
                continue
            x = jnp.asarray(rng.standard_normal(xa.shape), xa.dtype)
            w = jnp.asarray(rng.standard_normal(wa.shape), wa.dtype)
            fns = {c: jax.jit(lambda x, w, c=c, f=f: _taps(f, x, w) if c == "taps"
                              else _padded(f, x, w, c)) for c in cands}
            med = _median_times({c: functools.partial(fns[c], x, w) for c in cands}, rounds)
            best = min(cands, key=med.__getitem__)
            if best != lo and med[best] <= (1.0 - min_gain) * med[lo]:
                if best == "taps":
                    taps.append(site)
                else:
                    widths[site] = best
        base = self._with_convs({}, [])
        if not widths and not taps:
            return base
        tuned = self._with_convs(widths, sorted(taps))
        t = _median_times({"plain": lambda: base(*example_args),
                           "tuned": lambda: tuned(*example_args)}, rounds)
        return tuned if t["tuned"] <= (1.0 - min_gain) * t["plain"] else base

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of the arrays held in device memory: ``codes``, ``scales``, ``float``,
        ``total``."""
        out = {"codes": 0, "scales": 0, "float": 0}
        for k, a in self.arrays.items():
            part = ("codes" if k.endswith(":codes") else "scales" if k.endswith(":scale")
                    else "float")
            out[part] += int(a.size) * a.dtype.itemsize
        out["total"] = sum(out.values())
        return out

    def report(self) -> str:
        """A line per leaf (storage, slim / dense shape, bytes, why) and the totals."""
        lines = [f"{'leaf':<36} {'storage':<8} {'slim shape':>16} {'dense shape':>16} "
                 f"{'bytes':>9}  why"]
        for lf in self.leaves:
            if lf.kind == "float32":
                b = self.arrays[lf.name].nbytes
            else:
                b = self.arrays[lf.name + ":codes"].nbytes + self.arrays[lf.name + ":scale"].nbytes
            lines.append(f"{lf.name:<36} {lf.kind:<8} {str(lf.shape):>16} "
                         f"{str(lf.dense_shape):>16} {b:>9}  {lf.why}")
        r = self.resident_bytes()
        dense = sum(math.prod(lf.dense_shape) * 4 for lf in self.leaves)
        if self.meta.get("integer_sites") is not None and self.meta.get("path") != "weight_only":
            lines.append(f"integer contractions: {', '.join(self.meta['integer_sites']) or '-'}"
                         + "".join(f"; {n}: {w}" for n, w in self.meta["float_sites"].items()))
        if self.meta.get("conv_widths"):
            lines.append("conv output channels computed wider: " + ", ".join(
                f"{n} {self.meta['conv_channels'][n][0]} -> {w}"
                for n, w in sorted(self.meta["conv_widths"].items())))
        if self.meta.get("conv_taps"):
            lines.append("convs computed as shifted taps: " + ", ".join(self.meta["conv_taps"]))
        forms = self.meta.get("activation_forms") or {}
        if forms:
            lines.append("activation quantizers: " + "; ".join(
                f"{f.replace('_', ' ')}: {', '.join(k for k, g in forms.items() if g == f)}"
                for f in ACT_FORMS if f in forms.values()))
        lines.append(f"resident bytes {r['total']:,} (codes {r['codes']:,}, scales "
                     f"{r['scales']:,}, float {r['float']:,}); dense float32 {dense:,} "
                     f"({r['total'] / max(dense, 1):.2%})")
        return "\n".join(lines)

    def export(self, *example_args: Any) -> jax.export.Exported:
        """``jax.export`` of the forward for ``example_args``' shapes and dtypes; the arrays are
        its first argument (``exported.call(arrays, *args)``)."""
        if self._fn is None:
            raise ValueError("a loaded model is already exported; save it again from deploy().")
        avals = [jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) for a in example_args]
        arrays = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in self.arrays.items()}
        return jax.export.export(jax.jit(self._fn))(arrays, *avals)

    def save(self, directory: str | os.PathLike, example: Any,
             batch_sizes: Sequence[int] = (1,)) -> None:
        """Write ``arrays.npz``, ``forward_b<n>.jaxexport`` for each batch size ``n`` (inputs
        shaped like ``example``'s rows) and ``deployed.json`` (checksums of every array and file).
        ``directory`` must not exist; it appears whole or not at all."""
        path = Path(directory)
        if path.exists():
            raise FileExistsError(f"{directory} exists; deploy to a new directory.")
        if not batch_sizes or any(int(n) < 1 for n in batch_sizes):
            raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes}.")
        ex = np.asarray(example)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent or "."))
        try:
            host = {k: np.asarray(v) for k, v in self.arrays.items()}
            np.savez(tmp / "arrays.npz", **host)
            files = {}
            for n in sorted({int(b) for b in batch_sizes}):
                x = np.zeros((n, *ex.shape[1:]), ex.dtype)
                blob = bytes(self.export(x).serialize())
                name = f"forward_b{n}.jaxexport"
                (tmp / name).write_bytes(blob)
                files[name] = array_digest(np.frombuffer(blob, np.uint8))
            meta = {**self.meta, "format": FORMAT, "batch_sizes": sorted(int(b) for b in
                                                                         batch_sizes),
                    "leaves": [dict(path=list(lf.path), kind=lf.kind, shape=list(lf.shape),
                                    dense_shape=list(lf.dense_shape), why=lf.why)
                               for lf in self.leaves],
                    "checksums": {k: array_digest(v) for k, v in host.items()},
                    "files": files}
            (tmp / "deployed.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


PATHS = ("auto", "weight_only", "integer")


def integer_kinds(path: str, backend: str | None = None) -> tuple[str, ...]:
    """The site kinds (``"dot"``, ``"conv"``) that contract on integers for ``path`` on
    ``backend`` (default: JAX's). ``"auto"``: on CPU the int8 ``dot_general`` measured faster
    than the float one and the int8 convolution slower (experiments/RESULTS.md, "The model you
    ship"), so dots only; on accelerators both."""
    if path == "weight_only":
        return ()
    if path == "integer" or (backend or jax.default_backend()) != "cpu":
        return ("dot", "conv")
    return ("dot",)


def deploy(variables: Any, state: CompressionState | None = None, *, path: str = "auto",
           warn_budget: bool = True) -> DeployedModel:
    """The deployable model of a compressed pair (module docstring).

    Args:
      variables: the model's variables as traced (``{"params": ..., "batch_stats": ...}``), or a
        :class:`~jaxjpq.state.CompressedParams` pair alone (then ``{"params": pair.model}``).
      state: the compression state (its graph, masks, bits and activation quantizers).
      path: ``"weight_only"`` (weights dequantized, float contractions), ``"integer"`` (the sites
        :func:`integer_sites` allows contract int8 codes in int32, the scales applied to the
        accumulator; outputs equal the weight-only path's up to float rounding) or ``"auto"``
        (the integer path for the kinds of :func:`integer_kinds`).
      warn_budget: warn when the state misses the budget of its spec.
    Returns:
      a :class:`DeployedModel`; ``model(*args)`` equals ``compress_apply(apply_fn)(variables,
      state, *args)`` up to float rounding (VIB gates at their test-time ``μ``).
    """
    if state is None and isinstance(variables, CompressedParams):
        variables, state = variables.variables, variables.compression
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}.")
    int_kinds = integer_kinds(path)
    graph = check_state(state)
    if graph.trace_info is None:
        raise ValueError("deploy needs a graph made by jaxjpq.trace (it carries the model).")
    check_variables(graph, variables)
    state = jax.device_get(state)
    if warn_budget:
        miss = cost.budget_shortfall(state)
        if miss:
            warnings.warn(f"deploying a state that misses its budget: {miss}.", stacklevel=2)
    # float leaves as the compressed forward has them (a site above 8 bits: M ⊙ Q(W))
    compressed = transform_variables(variables, state)
    folded, state = gates_lib.fold_state(state, variables)
    masked = apply_masks(graph, folded, state.masks)
    sites_of: dict = {}
    for s in graph.sites:
        sites_of.setdefault(s.weight, []).append(s)
    kinds = {key: cost.storage(state, key) for key in sites_of}
    int_keys = [k for k, (kind, _) in kinds.items() if kind != "float32"]

    @jax.jit
    def all_codes(v):
        out = {}
        for key in int_keys:
            pieces = []
            for s in sites_of[key]:
                c = codes(s.take(leaf(v, key)), broadcast_params(
                    effective_weight_quantizer(state, s.name), len(s.weight_shape), s.out_axes))
                if s.name in state.weight_masks:
                    c = c * kept(state.weight_masks[s.name]).astype(c.dtype)
                pieces.append((s, c))
            out[key] = put_layers(jnp.zeros(leaf(v, key).shape, jnp.int32), pieces, jnp)
        return out

    code_leaves = all_codes(masked)
    tree = jax.tree_util.tree_map_with_path(lambda p, x: code_leaves.get(key_of(p), x),
                                            compressed)
    slim_fn, slim_vars = slim(tree, state)

    arrays: dict[str, np.ndarray] = {}
    infos = []
    for key, x in _flat(slim_vars):
        dense = tuple(np.shape(leaf(variables, key)))
        kind, why = kinds.get(key, ("float32", "not a site weight"))
        lf = LeafInfo(key, kind, tuple(np.shape(x)), dense, why)
        infos.append(lf)
        if kind == "float32":
            arrays[lf.name] = np.asarray(x)
            continue
        c = pack_codes(np.asarray(x), cost.STORAGE_BITS[kind])  # int8 [shape] or uint8 [n/2]
        arrays[lf.name + ":codes"] = c.reshape(lf.shape) if kind == "int8" else c
        arrays[lf.name + ":scale"] = _scales(state, key, sites_of[key], dense, lf.shape)
    forms = activation_forms(state)
    options = dict(power_of_two=bool(state.power_of_two), learn_t=bool(state.learn_t),
                   exponent_free=sorted(k for k, f in forms.items() if f == "exponent_free"))
    kwargs = traced_kwargs(graph)
    act = _deployed_act(state, forms)
    sm = graph.site_map
    why_not = {n: w or ("" if sm[n].kind in int_kinds else f"a {sm[n].kind} on the {path} path")
               for n, w in integer_sites(state).items()} if int_kinds else {}
    ints = [n for n, why in why_not.items() if not why]
    make = functools.partial(_forward, graph, slim_fn, infos, act, options, kwargs, ints)
    meta = dict(fingerprint=graph_fingerprint(graph), options=options, path=path,
                activation_forms=forms, conv_channels=_conv_channels(state), conv_widths={},
                conv_taps=[],
                integer_sites=ints, float_sites={n: w for n, w in why_not.items() if w},
                kwargs={k: v for k, v in kwargs.items() if isinstance(v, bool | int | float | str)})
    return DeployedModel(arrays, infos, meta, make=make)


def _median_times(calls: Mapping[Any, Callable[[], Any]], rounds: int) -> dict[Any, float]:
    """Median seconds of each call over ``rounds`` interleaved rounds, after one warm-up call
    each (compilation)."""
    for f in calls.values():
        jax.block_until_ready(f())
    times: dict[Any, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def _conv_channels(state: CompressionState) -> dict[str, list[int]]:
    """``{site: [slim, dense]}`` output channels of every conv site with one output axis."""
    out = {}
    for s in state.graph.sites:
        if s.kind != "conv" or len(s.out_axes) != 1:
            continue
        dense = int(s.weight_shape[s.out_axes[0]])
        m = state.masks.get(s.out_group) if s.out_group is not None else None
        out[s.name] = [int(np.sum(kept(np.asarray(m)))) if m is not None else dense, dense]
    return out


def _scales(state: CompressionState, key, sites, dense_shape, slim_shape) -> np.ndarray:
    """float32 scales of leaf ``key`` shaped :func:`jaxjpq.cost.scale_shape` of the slim leaf."""
    graph = state.graph
    full = np.ones(cost.scale_shape(graph, key, dense_shape, state), np.float32)
    for s in sites:
        p = effective_weight_quantizer(state, s.name)
        d = np.asarray(broadcast_params(p, len(s.weight_shape), s.out_axes).d, np.float32)
        if s.layer_axes:
            idx: list[Any] = [slice(None)] * len(dense_shape)
            for a, i in zip(s.layer_axes, s.layer, strict=True):
                idx[a] = i
            full[tuple(idx)] = d
        else:
            full[...] = d
    keep = kept_positions(graph, state.masks, key, dense_shape)
    for axis, k in keep.items():
        if full.shape[axis] > 1:
            full = np.compress(k, full, axis=axis)
    want = cost.scale_shape(graph, key, slim_shape, state)
    if full.shape != want:
        raise AssertionError(f"deploy: scales of {'/'.join(key)} are {full.shape}, expected "
                             f"{want}; please report this.")
    return full


def load(directory: str | os.PathLike, *, graph_of: Any = None) -> DeployedModel:
    """A model written by :meth:`DeployedModel.save`, served by its ``jax.export`` forwards (for
    the batch sizes it was saved with). ``graph_of``: a state, pair or graph to check the model
    against (its graph fingerprint). Raises :class:`~jaxjpq.export.CorruptExportError` naming the
    file or array that fails to read or match its checksum."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"no deployed model at {directory}.")
    try:
        meta = json.loads((d / "deployed.json").read_text())
    except (OSError, ValueError) as e:
        raise CorruptExportError(f"{directory}: deployed.json does not read back "
                                 f"({type(e).__name__}); save the model again.") from e
    if meta.get("format") != FORMAT:
        raise CorruptExportError(f"{directory}: not a {FORMAT} model "
                                 f"(format={meta.get('format')!r}).")
    if graph_of is not None:
        g = getattr(getattr(graph_of, "compression", graph_of), "graph", graph_of)
        if graph_fingerprint(g) != meta["fingerprint"]:
            raise ValueError(f"{directory} was deployed from another graph (fingerprint "
                             f"{meta['fingerprint']}, this one {graph_fingerprint(g)}).")
    try:
        with np.load(d / "arrays.npz") as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - a truncated / edited zip
        raise CorruptExportError(f"{directory}: arrays.npz does not read back "
                                 f"({type(e).__name__}); save the model again.") from e
    sums = meta["checksums"]
    for name in sorted(set(sums) | set(arrays)):
        if name not in arrays or name not in sums or array_digest(arrays[name]) != sums[name]:
            raise CorruptExportError(f"{directory}: array {name} does not match its checksum "
                                     "(corrupted on disk); save the model again.")
    exported = {}
    for name, digest in meta["files"].items():
        try:
            blob = (d / name).read_bytes()
        except OSError as e:
            raise CorruptExportError(f"{directory}: {name} is missing; save the model "
                                     "again.") from e
        if array_digest(np.frombuffer(blob, np.uint8)) != digest:
            raise CorruptExportError(f"{directory}: {name} does not match its checksum "
                                     "(corrupted on disk); save the model again.")
        n = int(name[len("forward_b"):-len(".jaxexport")])
        exported[n] = jax.export.deserialize(bytearray(blob))
    leaves = [LeafInfo(tuple(e["path"]), e["kind"], tuple(e["shape"]), tuple(e["dense_shape"]),
                       e["why"]) for e in meta["leaves"]]
    keep = {k: meta.get(k) for k in ("fingerprint", "options", "kwargs", "path",
                                     "integer_sites", "float_sites", "activation_forms",
                                     "conv_channels", "conv_widths", "conv_taps")}
    return DeployedModel(arrays, leaves, keep, exported=exported)
