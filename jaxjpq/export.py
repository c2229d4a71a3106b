"""Integer export: packed weight codes at each site's learned bit width, orbax save/restore,
an integer-weight inference function and ``jax.export`` serialization.

``pack(variables, state)`` drops every pruned unit (from all ``params`` and ``dependents``
slices of groups whose mask is 0), stores each quantized site weight as integer codes
``sign(W)·round(min(|W|, q_m)^t / d)`` in two's complement, each output channel at its own width
``ceil(bits)`` (int8 for 8, two codes per byte for 4, general little-endian bit packing otherwise;
a channel with no kept weight stores nothing), a site with elementwise masks as its kept
positions (a bitmap, or a list of ``ceil(log2 numel)``-bit positions when that is smaller) plus
the codes of the kept nonzeros, with its step ``d`` (per kept channel when
per-channel), and keeps the other leaves (biases, norms, float sites) as float32 with the pruned
entries removed. Restoring scatters the kept entries back into zeros of the original
shapes, so the original ``apply_fn`` runs unchanged ("dequantize on load"); the result equals
:func:`jaxjpq.compress.compress_apply`'s output, since a pruned unit's output is exactly zero there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxjpq import cost
from jaxjpq import gates as gates_lib
from jaxjpq.compress import act_quantized_apply, apply_masks
from jaxjpq.graph import (
    Graph,
    check_variables,
    kept,
    kept_positions,
    select_kept,
    set_leaf,
    stack_layers,
)
from jaxjpq.quant import QuantParams, broadcast_params, codes
from jaxjpq.state import (
    CompressedParams,
    CompressionState,
    check_state,
    effective_weight_quantizer,
    graph_fingerprint,
    leaf,
    site_quantizer,
)

FORMAT = "jaxjpq-packed-v2"
_WORDS = {8: np.int8, 16: np.int16, 32: np.int32}


@dataclasses.dataclass
class PackedModel:
    """A packed compressed model.

    Attributes:
      arrays: ``{name: np.ndarray}``: ``L<i>_b<w>`` = leaf ``i``'s codes of its ``w``-bit
        channels (channel-major, bit-packed), ``M<i>`` = its bitmap of kept nonzero positions
        or ``P<i>`` their list (sparse sites), ``L<i>`` = kept float32 values of a float
        leaf, ``S<i>`` = the steps ``d`` (per kept channel when per channel), ``A`` =
        ``float32[n_act_sites, 3]`` activation ``(d, q_m, t)`` rows.
      meta: JSON-able: format, per leaf (path, shape, dtype, kind, per-channel widths, code
        counts per width, kept positions per axis as hex bitmasks), activation site names,
        ``power_of_two``, graph fingerprint.
    """

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays (the payload, without metadata)."""
        return int(sum(a.nbytes for a in self.arrays.values()))


# ---------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------


def pack_codes(c: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed integer codes (any shape, flattened) into ``bits``-bit two's complement.

    8 / 16 / 32 bits → ``int8`` / ``int16`` / ``int32[n]``; otherwise ``uint8[ceil(n·bits/8)]``,
    little-endian (code ``i`` occupies bits ``i·bits … i·bits+bits-1`` of the stream; for 4 bits:
    two codes per byte, low nibble first).
    """
    bits = int(bits)
    if not 1 <= bits <= 32:
        raise ValueError(f"can pack 1..32-bit codes, got bits={bits}.")
    c = np.asarray(c, np.int64).reshape(-1)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if c.size and (c.min() < lo or c.max() > hi):
        raise ValueError(f"codes in [{c.min()}, {c.max()}] do not fit in {bits} signed bits.")
    if bits in _WORDS:
        return c.astype(_WORDS[bits])
    u = (c & (2**bits - 1)).astype(np.uint32)
    if bits == 4:
        if u.size % 2:
            u = np.concatenate([u, np.zeros(1, np.uint8)])
        return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)
    stream = ((u[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


def unpack_codes(packed: Any, bits: int, n: int, xp=jnp) -> Any:
    """Inverse of :func:`pack_codes`: ``int32[n]``; ``xp`` = ``jnp`` (jit-able) or ``numpy``."""
    bits = int(bits)
    if bits in _WORDS:
        return xp.asarray(packed).astype(xp.int32)[:n]
    p = xp.asarray(packed).astype(xp.int32)
    if bits == 4:
        u = xp.stack([p & 15, p >> 4], axis=1).reshape(-1)[:n]
    else:
        stream = ((p[:, None] >> xp.arange(8)) & 1).reshape(-1)[: n * bits]
        u = xp.sum(stream.reshape(n, bits) << xp.arange(bits), axis=1)
    half = 2 ** (bits - 1)  # sign-extend in two steps so 2^bits never overflows int32
    return xp.where(u >= half, (u - half) - half, u).astype(xp.int32)


# ---------------------------------------------------------------------------------------------
# Pack / unpack
# ---------------------------------------------------------------------------------------------


def _flat_leaves(variables: Mapping) -> list[tuple[tuple[str, ...], Any]]:
    out = []

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k in sorted(node):
                walk(node[k], (*prefix, str(k)))
        else:
            out.append((prefix, node))

    walk(variables, ())
    return out


def _hex(b: np.ndarray) -> str:
    return np.packbits(b.astype(np.uint8)).tobytes().hex()


def _unhex(s: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(s), np.uint8))[:n].astype(bool)


def _channel_major(x: np.ndarray, out_axes: list[int]) -> np.ndarray:
    """``x`` with its output axes moved to the front and flattened: ``[C, R]``."""
    moved = np.moveaxis(x, out_axes, list(range(len(out_axes))))
    c = int(np.prod(moved.shape[: len(out_axes)], dtype=np.int64))
    return moved.reshape(c, -1)


def _from_channel_major(x2: Any, shape: tuple[int, ...], out_axes: list[int], xp) -> Any:
    moved_shape = [shape[a] for a in out_axes] + [n for a, n in enumerate(shape)
                                                  if a not in out_axes]
    moved = xp.reshape(x2, moved_shape)
    return xp.moveaxis(moved, list(range(len(out_axes))), out_axes)


def _encode_codes(i: int, c: np.ndarray, out_axes: list[int], widths: np.ndarray,
                  mask: np.ndarray | None, numel: int) -> tuple[dict, dict]:
    """Channel-major integer codes, one bit-packed stream per width (0 bits: nothing stored);
    with ``mask``, the kept nonzero positions and only their codes. The positions are a bitmap
    (1 bit per position) or, when smaller (:func:`jaxjpq.cost.position_list_is_smaller`), a
    list of flat indices of ``cost.index_width(numel)`` bits (``numel``: the unslimmed
    weight's size)."""
    c2 = _channel_major(c, out_axes)
    m2 = None if mask is None else _channel_major(mask, out_axes)
    arrays, counts = {}, {}
    for w in sorted({int(w) for w in widths.tolist()} - {0}):
        rows = widths == w
        vals = c2[rows] if m2 is None else c2[rows][m2[rows]]
        arrays[f"L{i}_b{w}"] = pack_codes(vals, w)
        counts[str(w)] = int(vals.size)
    meta: dict[str, Any] = dict(widths=_runs(widths), counts=counts, sparse=m2 is not None)
    if m2 is not None:
        flat = m2.reshape(-1)
        nnz = int(flat.sum())
        if cost.position_list_is_smaller(nnz, flat.size, numel):
            pos_width = cost.index_width(numel)
            pos = np.nonzero(flat)[0].astype(np.int64) - 2 ** (pos_width - 1)
            arrays[f"P{i}"] = pack_codes(pos, pos_width)
            meta.update(index="positions", index_width=pos_width, nnz=nnz)
        else:
            arrays[f"M{i}"] = np.packbits(flat)
    return arrays, meta


def _runs(x: np.ndarray) -> list[list[int]]:
    """Run-length code ``[[value, count], ...]`` of an int vector."""
    out: list[list[int]] = []
    for v in np.asarray(x, np.int64).tolist():
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def _unruns(runs: list) -> np.ndarray:
    return np.asarray([v for v, n in runs for _ in range(n)], np.int64)


def _decode_codes(i: int, arrays: Mapping, e: Mapping, shape: tuple[int, ...], xp) -> Any:
    """Inverse of :func:`_encode_codes`: int32 codes of the kept (slim) tensor."""
    out_axes = [a % len(shape) for a in e["out_axes"]]
    widths = _unruns(e["widths"])
    n_c = widths.size
    r = int(np.prod(shape, dtype=np.int64)) // max(n_c, 1)
    if e["sparse"] and e.get("index") == "positions":
        w = int(e["index_width"])
        pos = np.asarray(unpack_codes(arrays[f"P{i}"], w, int(e["nnz"]), np)) + 2 ** (w - 1)
        m2 = np.zeros(n_c * r, bool)
        m2[pos] = True
        m2 = m2.reshape(n_c, r)
    elif e["sparse"]:
        m2 = np.unpackbits(np.asarray(arrays[f"M{i}"]))[: n_c * r].astype(bool).reshape(n_c, r)
    else:
        m2 = np.ones((n_c, r), bool)
    c2 = xp.zeros((n_c, r), xp.int32)
    for w_str, n in e["counts"].items():
        w = int(w_str)
        rows = np.nonzero(widths == w)[0]
        vals = unpack_codes(arrays[f"L{i}_b{w}"], w, n, xp)
        pos = np.nonzero(m2[rows])
        idx = (rows[pos[0]], pos[1])
        c2 = c2.at[idx].set(vals) if xp is jnp else _np_set(c2, idx, vals)
    return _from_channel_major(c2, shape, out_axes, xp)


def _decode_float(i: int, arrays: Mapping, e: Mapping, shape: tuple[int, ...], xp) -> Any:
    return xp.asarray(arrays[f"L{i}"])


def _dequantize(i: int, arrays: Mapping, e: Mapping, shape: tuple[int, ...], xp) -> Any:
    """Kept values ``codes · d`` of a ``codes`` leaf."""
    c = _decode_codes(i, arrays, e, shape, xp)
    d = xp.asarray(arrays[f"S{i}"])
    if d.ndim:
        bshape = [1] * len(shape)
        for a, n in zip(e["out_axes"], d.shape, strict=True):
            bshape[a] = n
        d = d.reshape(bshape)
    return c * d


# Codec registry: leaf kind -> decode(i, arrays, entry, kept_shape, xp) -> kept values.
CODECS: dict[str, Callable[..., Any]] = {"codes": _dequantize, "float": _decode_float}


def pack(variables: Mapping, state: CompressionState | None = None) -> PackedModel:
    """Pack ``mask ⊙ M ⊙ Q(W)`` of every quantized site as integer codes; see module docstring.

    ``variables`` and ``state``, or a :class:`~jaxjpq.state.CompressedParams` pair alone.

    Every output channel is stored at its own exact width (:func:`jaxjpq.cost.channel_bits`; a
    channel with no kept weight takes no bits). A site with elementwise masks stores its kept
    positions (bitmap or list) and the codes of the kept nonzero weights only. VIB gates
    (``state.gates``) are folded into the weights first (their test-time ``μ``), as the
    deterministic compressed forward applies them (:func:`jaxjpq.gates.fold_state`)."""
    if state is None and isinstance(variables, CompressedParams):
        variables, state = variables.variables, variables.compression
    graph = check_state(state)
    check_variables(graph, variables)
    if state.gates:
        variables, state = gates_lib.fold_state(state, variables)
    masked = apply_masks(graph, variables, state.masks)
    sites_of: dict = {}
    for s in graph.sites:
        sites_of.setdefault(s.weight, []).append(s)
    all_codes = jax.jit(lambda v, st: {
        s.name: codes(s.take(leaf(v, s.weight)),
                      broadcast_params(effective_weight_quantizer(st, s.name), len(s.weight_shape),
                                       s.out_axes))
        for s in graph.sites if s.name in st.weight
    })(masked, state)
    arrays: dict[str, np.ndarray] = {}
    leaves_meta: list[dict] = []

    def add(key, x, keep, site, extra):
        i = len(leaves_meta)
        entry: dict[str, Any] = dict(
            path=list(key), shape=list(x.shape), dtype=str(x.dtype),
            keep={str(a): _hex(k) for a, k in keep.items()}, **extra,
        )
        wm = None if site is None else state.weight_masks.get(site.name)
        if site is not None and site.name in state.weight:
            p = effective_weight_quantizer(state, site.name)
            c = select_kept(np.asarray(all_codes[site.name]), keep)
            out_axes = sorted(a % x.ndim for a in site.out_axes)
            bits = np.asarray(cost.channel_bits(state, site.name))
            ch_keep = [keep.get(a, np.ones(x.shape[a], bool)) for a in out_axes]
            if bits.ndim:
                bits = bits[np.ix_(*ch_keep)]
            n_ch = int(np.prod([k.sum() for k in ch_keep], dtype=np.int64))
            widths = np.broadcast_to(bits, (n_ch,) if not bits.ndim else bits.shape)
            mask = None if wm is None else select_kept(kept(np.asarray(wm)), keep)
            if mask is not None:  # a channel with no kept weight: 0 bits
                m2 = _channel_major(mask, out_axes)
                widths = np.where(m2.any(axis=1), widths.reshape(-1), 0)
                if np.all(m2.all(axis=1) | ~m2.any(axis=1)):
                    mask = None  # whole channels kept or dropped: the widths say it all
            enc, meta = _encode_codes(i, c, out_axes, np.asarray(widths).reshape(-1), mask,
                                      math.prod(site.weight_shape))
            arrays.update(enc)
            d = np.asarray(p.d, np.float32)
            if d.ndim:
                d = d[np.ix_(*ch_keep)]
            arrays[f"S{i}"] = d
            entry.update(kind="codes", kept_shape=list(c.shape), out_axes=out_axes, **meta)
        else:
            if wm is not None:  # float site with an elementwise mask: the masked values
                x = x * kept(np.asarray(wm))
            arrays[f"L{i}"] = select_kept(x, keep)
            entry.update(kind="float")
        leaves_meta.append(entry)

    for key, value in _flat_leaves(masked):
        x = np.asarray(value)
        keep = kept_positions(state.graph, state.masks, key, x.shape)
        sites = sites_of.get(key, [])
        if sites and sites[0].layer_axes:  # a stacked leaf: one entry per layer
            la = sites[0].layer_axes
            if any(a in keep for a in la):
                raise ValueError(f"{'/'.join(key)}: a group removes positions of a layer axis.")
            layer_keep = {a - sum(b < a for b in la): k for a, k in keep.items()}
            for s in sorted(sites, key=lambda s: np.ravel_multi_index(s.layer, s.stack_sizes)):
                add(key, np.asarray(s.take(x)), layer_keep, s,
                    dict(layer=list(s.layer), layer_axes=list(la), stack=list(s.stack_sizes)))
        else:
            add(key, x, keep, sites[0] if sites else None, {})
    act_sites = [s.name for s in graph.sites if s.name in state.act]
    if act_sites:
        arrays["A"] = np.stack([
            np.array([site_quantizer(state, "act", s).d, site_quantizer(state, "act", s).q_m,
                      site_quantizer(state, "act", s).t], np.float32)
            for s in act_sites
        ])
    meta = dict(format=FORMAT, leaves=leaves_meta, act_sites=act_sites, learn_t=state.learn_t,
                power_of_two=bool(state.power_of_two), fingerprint=graph_fingerprint(graph))
    return PackedModel(arrays=arrays, meta=meta)


def unpack_variables(packed: PackedModel, xp=jnp) -> dict:
    """Dense variables ``mask ⊙ M ⊙ Q(W)`` (codes · d, pruned entries 0) from a packed model.

    With ``xp=jnp`` this is traceable (static shapes from the metadata) so it can live inside a
    jitted or exported function.
    """
    _check_meta(packed.meta)
    out: dict = {}
    layers: dict = {}
    for i, e in enumerate(packed.meta["leaves"]):
        shape = tuple(e["shape"])
        keep = {int(a): _unhex(h, shape[int(a)]) for a, h in e["keep"].items()}
        if e["kind"] not in CODECS:
            raise ValueError(f"leaf {'/'.join(e['path'])} has unknown kind {e['kind']!r}.")
        kshape = tuple(e.get("kept_shape", ()))
        values = CODECS[e["kind"]](i, packed.arrays, e, kshape, xp).astype(e["dtype"])
        if keep:
            idx = np.ix_(*[np.nonzero(keep[a])[0] if a in keep else np.arange(n)
                           for a, n in enumerate(shape)])
            full = xp.zeros(shape, e["dtype"])
            full = full.at[idx].set(values) if xp is jnp else _np_set(full, idx, values)
        else:
            full = values
        if e.get("layer") is not None:  # one layer of a stacked leaf
            layers.setdefault(tuple(e["path"]), (e, []))[1].append(full)
            continue
        set_leaf(out, e["path"], full)
    for path, (e, slices) in layers.items():
        set_leaf(out, path, stack_layers(slices, e["layer_axes"], e["stack"], xp))
    return out


def _np_set(full, idx, kept):
    full[idx] = kept
    return full


def act_params(packed: PackedModel) -> dict:
    """``{site: QuantParams}`` of the activation quantizers stored in ``packed``."""
    a = packed.arrays.get("A")
    return {s: QuantParams(d=jnp.asarray(a[j, 0]), q_m=jnp.asarray(a[j, 1]),
                           t=jnp.asarray(a[j, 2]))
            for j, s in enumerate(packed.meta["act_sites"])}


def _check_meta(meta: Mapping) -> None:
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} packed model (format={meta.get('format')!r}).")


def inference_apply(packed: PackedModel, apply_fn: Callable, graph: Graph
                    ) -> tuple[Callable, dict]:
    """``(apply, weights)``: the restored model as a pure function of its weights.

    ``weights`` holds the float variables (``codes · d``, dequantized on the host once, here)
    and the stored activation quantizers; ``apply(weights, *args, **kwargs)`` runs the model
    with site inputs fake-quantized and equals the compressed forward of the state that was
    packed. Jit ``apply`` and pass ``weights`` as an argument: closed over, they would be
    compiled into the executable as constants.
    """
    if packed.meta["fingerprint"] != graph_fingerprint(graph):
        raise ValueError("this packed model was exported from another graph; pass that graph.")
    weights = {"variables": jax.tree.map(jnp.asarray, unpack_variables(packed, np)),
               "act": act_params(packed)}
    run = act_quantized_apply(apply_fn, graph)
    p2, lt = packed.meta["power_of_two"], packed.meta["learn_t"]
    traced = traced_kwargs(graph)

    def apply(w, *args, **kwargs):
        return run(w["variables"], w["act"], *args, power_of_two=p2, learn_t=lt,
                   **{**traced, **kwargs})

    return apply, weights


def inference_fn(packed: PackedModel, apply_fn: Callable, graph: Graph) -> Callable:
    """``fn(*args, **kwargs)``: :func:`inference_apply`'s ``apply`` bound to its weights."""
    apply, weights = inference_apply(packed, apply_fn, graph)
    return functools.partial(apply, weights)


def traced_kwargs(graph: Graph) -> dict:
    """The static keyword options the graph was traced with (e.g. ``train=False``)."""
    info = graph.trace_info
    return dict(info.get("static_kwargs", {})) if info is not None else {}


# ---------------------------------------------------------------------------------------------
# Orbax and jax.export
# ---------------------------------------------------------------------------------------------


def _checkpointer() -> ocp.Checkpointer:
    # Uncompressed: the bytes on disk are the format's (codes, bitmaps, scales), as
    # :func:`jaxjpq.cost.size_bits` counts them, plus orbax's metadata.
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        arrays=ocp.PyTreeCheckpointHandler(use_compression=False),
        meta=ocp.JsonCheckpointHandler(),
    ))


def save(directory: str | os.PathLike, packed: PackedModel) -> None:
    """Save with orbax: the arrays as one uncompressed byte blob (their layout in the JSON
    metadata), ``meta`` as JSON. ``directory`` must not exist."""
    layout, parts, offset = {}, [], 0
    for name in sorted(packed.arrays):
        a = np.array(packed.arrays[name], order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        layout[name] = [offset, int(a.nbytes), a.dtype.str, list(a.shape)]
        parts.append(a.reshape(-1).view(np.uint8))
        offset += a.nbytes
    blob = np.concatenate(parts) if parts else np.zeros((0,), np.uint8)
    sums = {name: array_digest(np.asarray(packed.arrays[name])) for name in layout}
    meta = {**_compact(packed.meta), "layout": layout, "checksums": sums}
    meta["meta_digest"] = _meta_digest(meta)
    _checkpointer().save(
        os.path.abspath(directory),
        args=ocp.args.Composite(
            arrays=ocp.args.PyTreeSave({"blob": blob}), meta=ocp.args.JsonSave(meta)
        ),
    )


def _hash(data: bytes) -> str:
    """64-bit BLAKE2b digest (enough to detect corruption; 16 hex characters)."""
    import hashlib

    return hashlib.blake2b(data, digest_size=8).hexdigest()


def array_digest(a: np.ndarray) -> str:
    return _hash(np.array(a, order="C").tobytes())


def _meta_digest(meta: Mapping) -> str:
    import json

    body = {k: v for k, v in meta.items() if k != "meta_digest"}
    return _hash(json.dumps(body, sort_keys=True).encode())


# Leaf fields left out of the saved metadata when they hold their default.
_LEAF_DEFAULTS = {"keep": {}, "dtype": "float32", "sparse": False}


def _compact(meta: Mapping) -> dict:
    leaves = []
    for e in meta["leaves"]:
        c = {k: v for k, v in e.items() if _LEAF_DEFAULTS.get(k, object()) != v}
        if c.get("kept_shape") == e["shape"]:
            del c["kept_shape"]
        leaves.append(c)
    return {**meta, "leaves": leaves}


def _expand(meta: Mapping) -> dict:
    leaves = []
    for e in meta["leaves"]:
        full = {**_LEAF_DEFAULTS, **e}
        if full["kind"] == "codes":
            full.setdefault("kept_shape", list(full["shape"]))
        else:
            full.pop("sparse", None)
        leaves.append(full)
    return {**meta, "leaves": leaves}


class CorruptExportError(ValueError):
    """A saved packed model whose arrays or metadata do not match their checksums."""


def restore(directory: str | os.PathLike) -> PackedModel:
    """Load a model written by :func:`save` (arrays as numpy).

    Raises ``FileNotFoundError`` when ``directory`` does not exist and :class:`CorruptExportError`
    (naming the array or file) when anything in it fails to read or verify."""
    path = os.path.abspath(directory)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no exported model at {directory}.")
    try:
        r = _checkpointer().restore(
            path,
            args=ocp.args.Composite(arrays=ocp.args.PyTreeRestore(), meta=ocp.args.JsonRestore()),
        )
        meta = dict(r["meta"] or {})
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore/json errors of a damaged export
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CorruptExportError(
            f"{directory}: the export does not read back ({type(e).__name__}: {first}); a file "
            "is missing, truncated or edited. Export the model again.") from e
    if "format" not in meta:
        raise CorruptExportError(f"{directory}: the export's metadata (meta/) is missing or "
                                 "empty. Export the model again.")
    _check_meta(meta)
    if meta.get("meta_digest") != _meta_digest(meta):
        raise CorruptExportError(
            f"{directory}: the metadata (bit widths, kept positions, layout) does not match its "
            "checksum: it was edited or corrupted. Export the model again.")
    blob = np.asarray(r["arrays"]["blob"], np.uint8)
    sums = meta.pop("checksums")
    meta.pop("meta_digest")
    arrays = {}
    for name, (offset, nbytes, dtype, shape) in meta.pop("layout").items():
        a = blob[offset:offset + nbytes]
        if a.size != nbytes:
            raise CorruptExportError(f"{directory}: array {name} is truncated.")
        arrays[name] = a.view(np.dtype(dtype)).reshape(shape).copy()
        if array_digest(arrays[name]) != sums.get(name):
            raise CorruptExportError(
                f"{directory}: array {name} does not match its checksum (corrupted on disk); "
                "export the model again.")
    return PackedModel(arrays=arrays, meta=_expand(meta))


def disk_bytes(directory: str | os.PathLike) -> int:
    """Total size of all files under ``directory``."""
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, fs in os.walk(directory) for f in fs
    )


def theoretical_bytes(packed: PackedModel) -> dict[str, float]:
    """``codes`` = Σ kept codes · their widths / 8, ``index`` = sparse indices (a bitmap, 1 bit
    per kept position, or a list of positions, whichever is smaller), ``scales`` = weight steps
    + activation (d, q_m, t), ``float`` = kept float leaves (biases, float sites), ``total`` =
    their sum."""
    out = dict(codes=0.0, index=0.0, scales=0.0, float=0.0)
    for i, e in enumerate(packed.meta["leaves"]):
        if e["kind"] == "codes":
            out["codes"] += sum(int(w) * n for w, n in e["counts"].items()) / 8
            if e["sparse"] and e.get("index") == "positions":
                out["index"] += int(e["nnz"]) * int(e["index_width"]) / 8
            elif e["sparse"]:
                out["index"] += int(np.prod(e["kept_shape"], dtype=np.int64)) / 8
            out["scales"] += packed.arrays[f"S{i}"].nbytes
        else:
            out["float"] += packed.arrays[f"L{i}"].nbytes
    if "A" in packed.arrays:
        out["scales"] += packed.arrays["A"].nbytes
    out["total"] = out["codes"] + out["index"] + out["scales"] + out["float"]
    return out


def export_model(
    packed: PackedModel, apply_fn: Callable, graph: Graph, *example_args: Any, **kwargs: Any
) -> jax.export.Exported:
    """``jax.export`` the integer-weight model for ``example_args``' shapes: the packed codes are
    embedded as constants and unpacked / dequantized inside the exported computation; ``kwargs``
    are static keyword arguments of the model, by default those the graph was traced with (e.g.
    ``train=False``). Call the result with ``.call(*args)``."""
    kwargs = {**traced_kwargs(graph), **kwargs}
    variables_np = {k: np.asarray(v) for k, v in packed.arrays.items()}
    pk = PackedModel(arrays=variables_np, meta=packed.meta)
    act = act_params(pk)
    run = act_quantized_apply(apply_fn, graph)
    p2, lt = packed.meta["power_of_two"], packed.meta["learn_t"]

    def fn(*args):
        return run(unpack_variables(pk), act, *args, power_of_two=p2, learn_t=lt, **kwargs)

    avals = [jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) for a in example_args]
    return jax.export.export(jax.jit(fn))(*avals)


def export_serialized(
    packed: PackedModel, apply_fn: Callable, graph: Graph, *example_args: Any, **kwargs: Any
) -> bytearray:
    """Serialized :func:`export_model` (needs the ``flatbuffers`` package); load with
    :func:`deserialize`."""
    return export_model(packed, apply_fn, graph, *example_args, **kwargs).serialize()


def deserialize(blob: bytes | bytearray) -> jax.export.Exported:
    """Inverse of :func:`export_serialized`; call the result with ``.call(*args)``."""
    return jax.export.deserialize(bytearray(blob))


def pack_summary(packed: PackedModel) -> str:
    """One line per packed leaf: path, kind, widths, kept/total entries."""
    lines = []
    for e in packed.meta["leaves"]:
        n = int(np.prod(e["shape"]))
        if e["kind"] == "codes":
            k = sum(e["counts"].values())
            widths = sorted({int(w) for w, _ in e["widths"]})
            bits = "/".join(str(w) for w in widths) if widths else "0"
        else:
            k, bits = n, "32"
            for a, h in e["keep"].items():
                k = k // e["shape"][int(a)] * int(_unhex(h, e["shape"][int(a)]).sum())
        lines.append(f"{'/'.join(e['path']):<32} {e['kind']:<6} {bits:>8} bits {k:>8}/{n}")
    return "\n".join(lines)
