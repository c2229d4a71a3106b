"""Integer export: packed weight codes at each site's learned bit width, orbax save/restore,
an integer-weight inference function and ``jax.export`` serialization.

``pack(graph, variables, state)`` drops every pruned unit (from all ``params`` and ``dependents``
slices of groups whose mask is 0), stores each quantized site weight as integer codes
``sign(W)·round(min(|W|, q_m)^t / d)`` in two's complement at ``b = ceil(bits)`` bits (int8 for 8,
two codes per byte for 4, general little-endian bit packing otherwise) plus its step ``d`` (per kept
channel when per-channel), and keeps the other leaves (biases, norms, float sites) as float32 with
the pruned entries removed. Restoring scatters the kept entries back into zeros of the original
shapes, so the original ``apply_fn`` runs unchanged ("dequantize on load"); the result equals
:func:`jaxjpq.compress.compress_apply`'s output, since a pruned unit's output is exactly zero there.
"""

from __future__ import annotations

import dataclasses
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
from jaxjpq.graph import Graph
from jaxjpq.quant import QuantParams, broadcast_params, codes, effective_params
from jaxjpq.state import CompressionState, check_state, graph_fingerprint, leaf, site_quantizer

FORMAT = "jaxjpq-packed-v1"
_WORDS = {8: np.int8, 16: np.int16, 32: np.int32}


@dataclasses.dataclass
class PackedModel:
    """A packed compressed model.

    Attributes:
      arrays: ``{name: np.ndarray}``: ``L<i>`` = leaf ``i``'s packed codes (uint8 / int8) or kept
        float32 values, ``S<i>`` = its steps ``d``, ``A`` = ``float32[n_act_sites, 3]`` activation
        ``(d, q_m, t)`` rows.
      meta: JSON-able: format, per leaf (path, shape, dtype, kind, bits, count, kept positions per
        axis as hex bitmasks), activation site names, ``power_of_two``, graph fingerprint.
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


def _keep_per_axis(graph: Graph, state: CompressionState, key, shape) -> dict[int, np.ndarray]:
    """``{axis: bool[n]}`` of kept positions of leaf ``key`` (only axes that lose something)."""
    keep: dict[int, np.ndarray] = {}
    for g in graph.prunable_groups:
        m = np.asarray(state.masks[g.id]) > 0.5
        if m.all():
            continue
        for sl in (*g.params, *g.dependents):
            if sl.key != key:
                continue
            axis = sl.axis % len(shape)
            owner = sl.owner(shape[axis])
            dropped = (owner >= 0) & ~m[np.maximum(owner, 0)]
            keep[axis] = keep.get(axis, np.ones(shape[axis], bool)) & ~dropped
    return keep


def _select(x: np.ndarray, keep: Mapping[int, np.ndarray]) -> np.ndarray:
    for axis, k in keep.items():
        x = np.compress(k, x, axis=axis)
    return x


def _hex(b: np.ndarray) -> str:
    return np.packbits(b.astype(np.uint8)).tobytes().hex()


def _unhex(s: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(s), np.uint8))[:n].astype(bool)


def pack(graph: Graph, variables: Mapping, state: CompressionState) -> PackedModel:
    """Pack ``mask ⊙ Q(W)`` of every quantized site as integer codes; see module docstring.

    VIB gates (``state.gates``) are folded into the weights first (their test-time ``μ``), as the
    deterministic compressed forward applies them."""
    check_state(graph, state)
    if state.gates:
        variables = gates_lib.fold(graph, variables, state.gates)
    masked = apply_masks(graph, variables, state.masks)
    site_of = {s.weight: s for s in graph.sites}
    all_codes = jax.jit(lambda v, st: {
        s.name: codes(leaf(v, s.weight),
                      broadcast_params(effective_params(site_quantizer(st, "weight", s.name), True,
                                                        st.power_of_two),
                                       len(s.weight_shape), s.out_axes))
        for s in graph.sites if s.name in st.weight
    })(masked, state)
    site_bits = cost.bits(graph, state)
    arrays: dict[str, np.ndarray] = {}
    leaves_meta = []
    for i, (key, value) in enumerate(_flat_leaves(masked)):
        x = np.asarray(value)
        keep = _keep_per_axis(graph, state, key, x.shape)
        entry: dict[str, Any] = dict(
            path=list(key), shape=list(x.shape), dtype=str(x.dtype),
            keep={str(a): _hex(k) for a, k in keep.items()},
        )
        site = site_of.get(key)
        if site is not None and site.name in state.weight:
            p = effective_params(site_quantizer(state, "weight", site.name), True,
                                 state.power_of_two)
            c = _select(np.asarray(all_codes[site.name]), keep)
            nb = int(site_bits[site.name][0])
            arrays[f"L{i}"] = pack_codes(c, nb)
            d = np.asarray(p.d, np.float32)
            if d.ndim:
                (out_axis,) = site.out_axes  # per-channel scales need one output axis
                d = d[keep[out_axis % x.ndim]] if out_axis % x.ndim in keep else d
            arrays[f"S{i}"] = d
            entry.update(kind="codes", bits=nb, count=int(c.size), kept_shape=list(c.shape),
                         out_axes=list(site.out_axes))
        else:
            arrays[f"L{i}"] = _select(x, keep)
            entry.update(kind="float")
        leaves_meta.append(entry)
    act_sites = [s.name for s in graph.sites if s.name in state.act]
    if act_sites:
        arrays["A"] = np.stack([
            np.array([site_quantizer(state, "act", s).d, site_quantizer(state, "act", s).q_m,
                      site_quantizer(state, "act", s).t], np.float32)
            for s in act_sites
        ])
    meta = dict(format=FORMAT, leaves=leaves_meta, act_sites=act_sites, learn_t=state.learn_t,
                power_of_two=bool(state.power_of_two), fingerprint=state.fingerprint)
    return PackedModel(arrays=arrays, meta=meta)


def unpack_variables(packed: PackedModel, xp=jnp) -> dict:
    """Dense variables ``mask ⊙ Q(W)`` (codes · d, pruned entries 0) from a packed model.

    With ``xp=jnp`` this is traceable (static shapes from the metadata) so it can live inside a
    jitted or exported function.
    """
    _check_meta(packed.meta)
    out: dict = {}
    for i, e in enumerate(packed.meta["leaves"]):
        shape = tuple(e["shape"])
        keep = {int(a): _unhex(h, shape[int(a)]) for a, h in e["keep"].items()}
        if e["kind"] == "codes":
            c = unpack_codes(packed.arrays[f"L{i}"], e["bits"], e["count"], xp)
            c = c.reshape(e["kept_shape"])
            d = xp.asarray(packed.arrays[f"S{i}"])
            if d.ndim:
                (ax,) = e["out_axes"]
                bshape = [1] * len(shape)
                bshape[ax % len(shape)] = d.shape[0]
                d = d.reshape(bshape)
            kept = (c * d).astype(e["dtype"])
        else:
            kept = xp.asarray(packed.arrays[f"L{i}"]).astype(e["dtype"])
        if keep:
            idx = np.ix_(*[np.nonzero(keep[a])[0] if a in keep else np.arange(n)
                           for a, n in enumerate(shape)])
            full = xp.zeros(shape, e["dtype"])
            full = full.at[idx].set(kept) if xp is jnp else _np_set(full, idx, kept)
        else:
            full = kept
        node = out
        for k in e["path"][:-1]:
            node = node.setdefault(k, {})
        node[e["path"][-1]] = full
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


def inference_fn(packed: PackedModel, apply_fn: Callable, graph: Graph) -> Callable:
    """``fn(*args, **kwargs)``: the model with weights dequantized (``codes · d``, on the host)
    once here, on load, and site inputs fake-quantized with the stored activation quantizers;
    equals the compressed forward of the state that was packed. Wrap it in ``jax.jit``."""
    if packed.meta["fingerprint"] != graph_fingerprint(graph):
        raise ValueError("this packed model was exported from another graph; pass that graph.")
    variables = jax.tree.map(jnp.asarray, unpack_variables(packed, np))
    act = act_params(packed)
    run = act_quantized_apply(apply_fn, graph)
    p2, lt = packed.meta["power_of_two"], packed.meta["learn_t"]

    def fn(*args, **kwargs):
        return run(variables, act, *args, power_of_two=p2, learn_t=lt, **kwargs)

    return fn


# ---------------------------------------------------------------------------------------------
# Orbax and jax.export
# ---------------------------------------------------------------------------------------------


def save(directory: str | os.PathLike, packed: PackedModel) -> None:
    """Save with orbax (``arrays`` via the standard handler, ``meta`` as JSON). ``directory``
    must not exist."""
    ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    ckpt.save(
        os.path.abspath(directory),
        args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(packed.arrays), meta=ocp.args.JsonSave(packed.meta)
        ),
    )


def restore(directory: str | os.PathLike) -> PackedModel:
    """Load a model written by :func:`save` (arrays as numpy)."""
    ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    r = ckpt.restore(
        os.path.abspath(directory),
        args=ocp.args.Composite(arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
    )
    meta = dict(r["meta"])
    _check_meta(meta)
    return PackedModel(arrays={k: np.asarray(v) for k, v in r["arrays"].items()}, meta=meta)


def disk_bytes(directory: str | os.PathLike) -> int:
    """Total size of all files under ``directory``."""
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, fs in os.walk(directory) for f in fs
    )


def theoretical_bytes(packed: PackedModel) -> dict[str, float]:
    """``codes`` = Σ kept_params · bits / 8, ``scales`` = weight steps + activation (d, q_m, t),
    ``float`` = kept float leaves (biases, float sites), ``total`` = their sum."""
    out = dict(codes=0.0, scales=0.0, float=0.0)
    for i, e in enumerate(packed.meta["leaves"]):
        if e["kind"] == "codes":
            out["codes"] += e["count"] * e["bits"] / 8
            out["scales"] += packed.arrays[f"S{i}"].nbytes
        else:
            out["float"] += packed.arrays[f"L{i}"].nbytes
    if "A" in packed.arrays:
        out["scales"] += packed.arrays["A"].nbytes
    out["total"] = out["codes"] + out["scales"] + out["float"]
    return out


def export_model(
    packed: PackedModel, apply_fn: Callable, graph: Graph, *example_args: Any
) -> jax.export.Exported:
    """``jax.export`` the integer-weight model for ``example_args``' shapes: the packed codes are
    embedded as constants and unpacked / dequantized inside the exported computation. Call the
    result with ``.call(*args)``."""
    variables_np = {k: np.asarray(v) for k, v in packed.arrays.items()}
    pk = PackedModel(arrays=variables_np, meta=packed.meta)
    act = act_params(pk)
    run = act_quantized_apply(apply_fn, graph)
    p2, lt = packed.meta["power_of_two"], packed.meta["learn_t"]

    def fn(*args):
        return run(unpack_variables(pk), act, *args, power_of_two=p2, learn_t=lt)

    avals = [jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) for a in example_args]
    return jax.export.export(jax.jit(fn))(*avals)


def export_serialized(
    packed: PackedModel, apply_fn: Callable, graph: Graph, *example_args: Any
) -> bytearray:
    """Serialized :func:`export_model` (needs the ``flatbuffers`` package); load with
    :func:`deserialize`."""
    return export_model(packed, apply_fn, graph, *example_args).serialize()


def deserialize(blob: bytes | bytearray) -> jax.export.Exported:
    """Inverse of :func:`export_serialized`; call the result with ``.call(*args)``."""
    return jax.export.deserialize(bytearray(blob))


def pack_summary(packed: PackedModel) -> str:
    """One line per packed leaf: path, kind, bits, kept/total entries."""
    lines = []
    for e in packed.meta["leaves"]:
        n = int(np.prod(e["shape"]))
        k = e.get("count")
        if k is None:
            k = n
            for a, h in e["keep"].items():
                k = k // e["shape"][int(a)] * int(_unhex(h, e["shape"][int(a)]).sum())
        lines.append(f"{'/'.join(e['path']):<32} {e['kind']:<6} {e.get('bits', 32):>3} bits "
                     f"{k:>8}/{n}")
    return "\n".join(lines)
