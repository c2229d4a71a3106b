"""The QADG tracer: follow channel axes through a jaxpr and build a :class:`~jaxjpq.graph.Graph`.

``trace(apply_fn, variables, *args, **kwargs)`` traces ``apply_fn(variables, *args, **kwargs)`` to a
jaxpr and walks it once. Every position of every axis of every value carries a *unit id*; a
union-find over unit ids records which positions must be pruned together:

* each axis of each variable leaf, each input axis and each fresh axis (conv spatial outputs,
  broadcast axes, iota, random bits) gets new unit ids;
* elementwise ops, batch dims of ``dot_general`` and residual adds unify positions;
* a conv / ``dot_general`` with a parameter operand is a *producer*: its output feature axis carries
  the kernel's out-axis units; its contracted input axis *links* the activation's units to the
  kernel's in-axis units (the kernel rows become dependents of the activation's group);
* reshapes carry one axis through a flatten (one channel -> many rows) or an unflatten
  (a dense output split into heads: the head units own ``head_dim`` entries each).

After the walk a group is a set of unit classes that share a producer's out axis; its ``params``
are the ``params``-collection leaf axes in the classes and its ``dependents`` the other collections
(running statistics) plus the linked consumer rows. A class that reaches the network input or
output, is reduced over while its pruned positions are not exactly zero, or meets an op the rules
cannot follow is marked non-prunable with the reason (never a wrong group). Rules are one small
function per primitive family, registered in ``_RULES``.

Pruned positions are tracked as *exactly zero* per axis (``zero``): pruning is only accepted where
the masked forward (params slices zeroed) equals the physically slimmed network, which
``jaxjpq.slim`` re-evaluates from the same walk.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.extend.core as jcore
import numpy as np

from jaxjpq.graph import AxisUnits, Graph, Group, MacTerm, Site, Slice
from jaxjpq.jaxprs import CALL_PRIMITIVES, aval, is_dynamic, key_of, sub_jaxpr
from jaxjpq.macs import eqn_macs, jaxpr_macs

Key = tuple[str, ...]


# f(0) == 0: pruned (zero) positions stay zero.
_ZERO_UNARY = frozenset(
    {
        "neg", "tanh", "sin", "tan", "sqrt", "cbrt", "abs", "sign", "erf", "integer_pow", "square",
        "convert_element_type", "copy", "copy_p", "reduce_precision", "expm1", "log1p", "asin",
        "atan", "sinh", "asinh", "atanh", "real", "imag", "round", "floor", "ceil", "stop_gradient",
        "erf_inv", "sharding_constraint", "optimization_barrier",
    }
)  # fmt: skip
_OTHER_UNARY = frozenset(
    {
        "exp", "exp2", "log", "logistic", "rsqrt", "cos", "cosh", "acos", "acosh", "not",
        "is_finite", "bitcast_convert_type", "population_count", "clz", "lgamma", "digamma",
        "erfc",
    }
)  # fmt: skip
_BINARY_ADD = frozenset({"add", "sub", "max", "min", "add_any", "or", "xor"})
_BINARY_MUL = frozenset({"mul", "and"})
_BINARY_OTHER = frozenset(
    {
        "div", "rem", "pow", "atan2", "nextafter", "eq", "ne", "lt", "le", "gt", "ge",
        "shift_left", "shift_right_logical", "shift_right_arithmetic", "complex", "mulhi",
        "clamp", "select_n", "igamma", "igammac",
    }
)  # fmt: skip
_NONNEG_UNARY = frozenset({"exp", "exp2", "sqrt", "abs", "logistic", "square", "population_count"})
_RNG = frozenset(
    {
        "random_bits", "random_seed", "random_wrap", "random_unwrap", "random_split",
        "random_fold_in", "threefry2x32", "rng_bit_generator", "rng_uniform", "iota",
    }
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Union-find over unit ids
# ---------------------------------------------------------------------------------------------


class _Units:
    """Union-find over integer unit ids with a list of reasons per class."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.reasons: dict[int, list[str]] = {}

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, u: int) -> int:
        p = self.parent
        while p[u] != u:
            p[u] = p[p[u]]
            u = p[u]
        return u

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        moved = self.reasons.pop(rb, None)
        if moved:
            self.reasons.setdefault(ra, []).extend(moved)

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        if a is b or np.array_equal(a, b):
            return
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            self.union(x, y)

    def poison(self, units: np.ndarray, reason: str) -> None:
        for r in {self.find(int(u)) for u in np.unique(units).tolist()}:
            lst = self.reasons.setdefault(r, [])
            if len(lst) < 8 and reason not in lst:
                lst.append(reason)

    def roots(self) -> np.ndarray:
        par = np.asarray(self.parent, dtype=np.int64)
        while True:
            nxt = par[par]
            if np.array_equal(nxt, par):
                return par
            par = nxt


@dataclasses.dataclass(frozen=True)
class _Val:
    """What the tracer knows about one array value.

    units: unit-id array per axis; zero: per axis, are pruned positions exactly zero here;
    param: computed from variables/constants only; leaf: variable key if this value *is* a leaf
    (through casts); nonneg: provably >= 0; allzero: provably all zeros; layers: axes of
    ``leaf`` sliced off by enclosing ``scan``s (stacked layers), outermost first; parts:
    ``(axis, offset, value)`` of each leaf when this value is a concatenation of leaves (a fused
    kernel such as ``nn.OptimizedLSTMCell``'s four gates).
    """

    units: tuple[np.ndarray, ...]
    zero: tuple[bool, ...]
    param: bool = False
    leaf: Key | None = None
    nonneg: bool = False
    allzero: bool = False
    layers: tuple[int, ...] = ()
    parts: tuple = ()


@dataclasses.dataclass
class _Ctx:
    uf: _Units
    strict: bool
    leaf_units: dict[Key, tuple[np.ndarray, ...]]
    leaf_shapes: dict[Key, tuple[int, ...]]
    unit_leaf: list[tuple[int, Key, int]]  # (first unit id, leaf key, axis), sorted by id
    links: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    # site name -> dict(weight, kind, axes, macs, act units, out units)
    sites: dict[str, dict] = dataclasses.field(default_factory=dict)
    weight_site: dict[Key, str] = dataclasses.field(default_factory=dict)
    producers: list[tuple[str, Key, int, np.ndarray]] = dataclasses.field(default_factory=list)
    records: dict[tuple, tuple] = dataclasses.field(default_factory=dict)
    # parameter contractions that are not sites: (where, MACs, why)
    missed: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    mult: int = 1
    n_leaf_units: int = 0

    def fresh(self, shape: Sequence[int]) -> tuple[np.ndarray, ...]:
        return tuple(self.uf.new(int(n)) for n in shape)

    def leaf_axis(self, units: np.ndarray) -> tuple[Key, int] | None:
        """The variable leaf axis whose own units ``units`` are (raw ids), or None."""
        if units.size == 0:
            return None
        u = int(units[0])
        lo, hi = 0, len(self.unit_leaf)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.unit_leaf[mid][0] <= u:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return None
        _, key, axis = self.unit_leaf[lo - 1]
        own = self.leaf_units[key][axis]
        if units.shape == own.shape and np.array_equal(units, own):
            return key, axis
        return None


def _where(eqn: Any) -> str:
    name = str(eqn.source_info.name_stack)
    return f"'{eqn.primitive.name}' at {name or '<top level>'}"


def _unsupported(ctx: _Ctx, eqn: Any, ins: Sequence[_Val], why: str) -> None:
    msg = f"{why}: {_where(eqn)}"
    if ctx.strict:
        raise ValueError(
            f"jaxjpq.trace cannot follow channels through {msg}. Add a rule in jaxjpq/trace.py "
            "or call trace(..., strict=False) to mark the affected groups non-prunable."
        )
    for v in ins:
        for u in v.units:
            ctx.uf.poison(u, msg)


def _fresh_val(ctx: _Ctx, aval: Any, param: bool = False) -> _Val:
    shape = tuple(getattr(aval, "shape", ()))
    return _Val(ctx.fresh(shape), (False,) * len(shape), param=param)


# ---------------------------------------------------------------------------------------------
# Rules: one small function per primitive family. rule(ctx, eqn, ins, path) -> list[_Val]
# ---------------------------------------------------------------------------------------------


def _is_zero_literal(v: _Val) -> bool:
    return v.allzero


def _elementwise(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    name = eqn.primitive.name
    out_aval = eqn.outvars[0].aval
    shape = tuple(out_aval.shape)
    nd = len(shape)
    units, zero = [], []
    ops = list(range(len(ins)))
    if name == "select_n":
        ops = ops[1:]
    elif name == "clamp":
        ops = [1]
    for a in range(nd):
        full = [
            i
            for i in range(len(ins))
            if len(ins[i].units) == nd and ins[i].units[a].size == shape[a]
        ]
        if full:
            base = ins[full[0]].units[a]
            for i in full[1:]:
                ctx.uf.union_arrays(base, ins[i].units[a])
            units.append(base)
        else:
            units.append(ctx.uf.new(shape[a]))

        def z(i: int, a: int = a) -> bool:
            v = ins[i]
            if v.allzero:
                return True
            return len(v.units) == nd and v.units[a].size == shape[a] and v.zero[a]

        if name in _ZERO_UNARY:
            zero.append(z(0))
        elif name in _BINARY_MUL:
            zero.append(any(z(i) for i in ops))
        elif name in ("max", "min"):
            zero.append(all(z(i) or _clips_to_zero(eqn, i, name) for i in ops))
        elif name in _BINARY_ADD or name == "select_n":
            zero.append(all(z(i) for i in ops))
        elif name in ("div", "rem"):
            zero.append(z(0))
        elif name == "integer_pow":
            zero.append(z(0) and eqn.params.get("y", 1) > 0)
        else:
            zero.append(False)
    param = all(v.param for v in ins)
    leaf = (
        ins[0].leaf
        if name in ("convert_element_type", "copy", "copy_p", "reduce_precision")
        else None
    )
    nonneg = _nonneg(eqn, ins)
    allzero = (name in _ZERO_UNARY and ins[0].allzero) or (
        name in _BINARY_MUL and any(v.allzero for v in ins)
    )
    cast = name in ("convert_element_type", "copy", "copy_p", "reduce_precision")
    layers = ins[0].layers if leaf is not None else ()
    parts = ins[0].parts if cast else ()
    return [_Val(tuple(units), tuple(zero), param, leaf, nonneg, allzero, layers, parts)
            for _ in eqn.outvars]


def _clips_to_zero(eqn: Any, i: int, name: str) -> bool:
    """max(0, c) == 0 for c <= 0 and min(0, c) == 0 for c >= 0 (relu6's clip at 6)."""
    c = _literal_value(eqn, i)
    return c is not None and (c <= 0 if name == "max" else c >= 0)


def _literal_value(eqn: Any, i: int) -> float | None:
    v = eqn.invars[i]
    if isinstance(v, jcore.Literal) and np.ndim(v.val) == 0:
        try:
            return float(v.val)
        except (TypeError, ValueError):
            return None
    return None


def _nonneg(eqn: Any, ins: list[_Val]) -> bool:
    name = eqn.primitive.name
    lits = [_literal_value(eqn, i) for i in range(len(ins))]
    nn = [v.nonneg or (lit is not None and lit >= 0) for v, lit in zip(ins, lits, strict=True)]
    if name == "max":
        return any(nn)
    if name in ("min", "mul", "div", "add"):
        return all(nn)
    if name in _NONNEG_UNARY:
        return True
    if name == "integer_pow":
        return eqn.params.get("y", 1) % 2 == 0 or nn[0]
    if name in _ZERO_UNARY and name not in ("neg", "sign", "tanh", "sin", "erf"):
        return nn[0]
    return False


def _broadcast_in_dim(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    (x,) = ins[:1]
    shape = tuple(eqn.params["shape"])
    dims = eqn.params["broadcast_dimensions"]
    units = list(ctx.fresh(shape))
    zero = [x.allzero] * len(shape)
    for i, d in enumerate(dims):
        if x.units[i].size == shape[d]:
            units[d] = x.units[i]
            zero[d] = x.zero[i] or x.allzero
    return [_Val(tuple(units), tuple(zero), x.param, None, x.nonneg, x.allzero)]


def _pick_axes(x: _Val, axes: Sequence[int]) -> _Val:
    """``x`` with its axes reordered / dropped to ``axes`` (everything else carried over)."""
    return _Val(
        tuple(x.units[a] for a in axes),
        tuple(x.zero[a] for a in axes),
        x.param,
        x.leaf,
        x.nonneg,
        x.allzero,
        x.layers,
    )


def _transpose(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    return [_pick_axes(ins[0], eqn.params["permutation"])]


def _squeeze(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    (x,) = ins
    dims = {d % len(x.units) for d in eqn.params["dimensions"]}
    return [_pick_axes(x, [a for a in range(len(x.units)) if a not in dims])]


def _reshape(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    x = ins[0]
    in_shape = tuple(u.size for u in x.units)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    out_units: list[np.ndarray | None] = [None] * len(out_shape)
    out_zero = [False] * len(out_shape)
    ii = [a for a, n in enumerate(in_shape) if n != 1]
    oo = [a for a, n in enumerate(out_shape) if n != 1]
    i = j = 0
    while i < len(ii) or j < len(oo):
        bi, bj = [ii[i]], [oo[j]]
        pi, pj = in_shape[ii[i]], out_shape[oo[j]]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                bi.append(ii[i])
                pi *= in_shape[ii[i]]
                i += 1
            else:
                bj.append(oo[j])
                pj *= out_shape[oo[j]]
                j += 1
        carried, z = _merge_axes(ctx, eqn, [x.units[a] for a in bi], [x.zero[a] for a in bi])
        pieces, carrier = _split_axis(ctx, carried, [out_shape[b] for b in bj])
        for k, (b, u) in enumerate(zip(bj, pieces, strict=True)):
            out_units[b] = u
            out_zero[b] = z and k == carrier
    for b, n in enumerate(out_shape):
        if out_units[b] is None:
            out_units[b] = ctx.uf.new(n)
    leaf = x.leaf if len(ii) == len(oo) else None
    return [
        _Val(tuple(out_units), tuple(out_zero), x.param, leaf, x.nonneg,  # type: ignore[arg-type]
             x.allzero, x.layers if leaf is not None else ())
    ]


def _merge_axes(
    ctx: _Ctx, eqn: Any, units: list[np.ndarray], zeros: list[bool]
) -> tuple[np.ndarray, bool]:
    """Flatten several axes into one; only one axis's units can be carried (row-major)."""
    if len(units) == 1:
        return units[0], zeros[0]
    meaningful = [k for k, u in enumerate(units) if _is_meaningful(ctx, u)]
    pick = meaningful[-1] if len(meaningful) == 1 else None
    sizes = [u.size for u in units]
    for k, u in enumerate(units):
        if k != pick:
            ctx.uf.poison(u, f"axis merged with another channel axis by {_where(eqn)}")
    if pick is None:
        return ctx.uf.new(math.prod(sizes)), False
    shape = [1] * len(units)
    shape[pick] = sizes[pick]
    carried = np.broadcast_to(units[pick].reshape(shape), sizes).reshape(-1).copy()
    return carried, zeros[pick]


def _is_meaningful(ctx: _Ctx, u: np.ndarray) -> bool:
    """True if the class of ``u`` contains a variable-leaf unit (a channel, not a fresh axis)."""
    return bool(u.size) and ctx.uf.find(int(u[0])) < ctx.n_leaf_units


def _split_axis(ctx: _Ctx, units: np.ndarray, sizes: list[int]) -> tuple[list[np.ndarray], int]:
    """Unflatten one axis: the axis whose coordinate alone determines the unit carries it; if none,
    units are coarsened (unified) along the inner axes so the outermost axis carries them."""
    if len(sizes) == 1:
        return [units], 0
    grid = units.reshape(sizes)
    roots = np.vectorize(ctx.uf.find, otypes=[np.int64])(grid) if grid.size else grid
    for k in range(len(sizes)):
        moved = np.moveaxis(roots, k, 0).reshape(sizes[k], -1)
        if (moved == moved[:, :1]).all():
            out = [ctx.uf.new(n) for n in sizes]
            out[k] = np.moveaxis(grid, k, 0).reshape(sizes[k], -1)[:, 0].copy()
            return out, k
    rows = grid.reshape(sizes[0], -1)
    for r in rows:
        for u in r[1:].tolist():
            ctx.uf.union(int(r[0]), u)
    out = [ctx.uf.new(n) for n in sizes]
    out[0] = rows[:, 0].copy()
    return out, 0


def _reduce(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    x = ins[0]
    name = eqn.primitive.name
    axes = {a % max(len(x.units), 1) for a in eqn.params["axes"]}
    for a in axes:
        if name == "reduce_sum" and x.zero[a]:
            continue
        why = "not exactly zero at pruned positions" if name == "reduce_sum" else "order statistic"
        ctx.uf.poison(x.units[a], f"reduced over ({why}) by {_where(eqn)}")
    keep = [a for a in range(len(x.units)) if a not in axes]
    nonneg = x.nonneg and name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod")
    return [
        _Val(
            tuple(x.units[a] for a in keep),
            tuple(x.zero[a] for a in keep),
            x.param,
            None,
            nonneg,
            x.allzero and name == "reduce_sum",
        )
        for _ in eqn.outvars
    ]


def _argreduce(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    x = ins[0]
    axes = {a % len(x.units) for a in eqn.params["axes"]}
    for a in axes:
        ctx.uf.poison(x.units[a], f"reduced over by {_where(eqn)}")
    keep = [a for a in range(len(x.units)) if a not in axes]
    return [_Val(tuple(x.units[a] for a in keep), (False,) * len(keep), x.param)]


def _cumulative(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    x = ins[0]
    a = eqn.params["axis"] % len(x.units)
    ctx.uf.poison(x.units[a], f"scanned over by {_where(eqn)}")
    zero = tuple(z if b != a else False for b, z in enumerate(x.zero))
    return [_Val(x.units, zero, x.param)]


def _site_name(ctx: _Ctx, key: Key) -> str:
    if key in ctx.weight_site:
        return ctx.weight_site[key]
    base = "/".join(key[1:-1]) or "/".join(key)
    name = base
    taken = set(ctx.sites)
    if name in taken:
        name = "/".join(key[1:])
    k = 2
    while name in taken:
        name = f"{base}#{k}"
        k += 1
    ctx.weight_site[key] = name
    return name


def _record_site(
    ctx: _Ctx,
    eqn: Any,
    kind: str,
    act: _Val,
    w: _Val,
    w_out: list[int],
    w_in: list[int],
    act_in: list[int],
    out_units: Sequence[np.ndarray],
    share: tuple[int, int] = (1, 1),
) -> None:
    if w.leaf is None and w.parts:
        _record_parts(ctx, eqn, kind, act, w, w_out, w_in, act_in, out_units)
        return
    if w.leaf is None:
        ctx.missed.append((_where(eqn), int(eqn_macs(eqn)) * ctx.mult,
                           "the weight operand is computed, not a variable leaf"))
        return
    leaf_axes_out, leaf_axes_in = [], []
    for a in (*w_out, *w_in):
        la = ctx.leaf_axis(w.units[a])
        if la is None:
            ctx.missed.append((_where(eqn), int(eqn_macs(eqn)) * ctx.mult,
                               f"axes of {'/'.join(w.leaf)} are reshaped before the contraction"))
            return
        (leaf_axes_out if a in w_out else leaf_axes_in).append(la[1])
    name = _site_name(ctx, w.leaf)
    macs = int(eqn_macs(eqn)) * ctx.mult * share[0] // share[1]
    # kept MACs scale with the kept sizes of the output axes and of the kernel's input axes
    term = (macs, [*out_units, *(w.units[a] for a in w_in)])
    info = ctx.sites.get(name)
    if info is not None:
        info["macs"] += macs
        info["terms"].append(term)
        return
    ctx.sites[name] = dict(
        terms=[term],
        weight=w.leaf,
        kind=kind,
        out_axes=tuple(leaf_axes_out),
        in_axes=tuple(leaf_axes_in),
        macs=macs,
        act_units=[act.units[a] for a in act_in],
        out_units=[w.units[a] for a in w_out],
        signed=not act.nonneg,
        layer_axes=tuple(w.layers),
    )
    for a, la in zip(w_out, leaf_axes_out, strict=True):
        ctx.producers.append((name, w.leaf, la, w.units[a]))


def _record_parts(ctx: _Ctx, eqn: Any, kind: str, act: _Val, w: _Val, w_out: list[int],
                  w_in: list[int], act_in: list[int], out_units: Sequence[np.ndarray]) -> None:
    """A contraction with a kernel concatenated from leaves: one site per leaf, its share of
    the MACs; the concatenated axis is an output axis (the parts' outputs are concatenated) or a
    contracted one (the activation is split to match and the parts' outputs summed)."""
    axis = w.parts[0][0]
    total = w.units[axis].size
    for _, off, pv in w.parts:
        n = pv.units[axis].size
        sl = slice(off, off + n)
        outs = [u[sl] if u is w.units[axis] else u for u in out_units]
        a = act
        if axis in w_in:
            k = act_in[w_in.index(axis)]
            a = dataclasses.replace(act, units=tuple(u[sl] if i == k else u
                                                     for i, u in enumerate(act.units)))
        _record_site(ctx, eqn, kind, a, pv, w_out, w_in, act_in, outs, (n, total))


def _consume(ctx: _Ctx, eqn: Any, act: _Val, a: int, w_units: np.ndarray) -> None:
    ctx.links.append((act.units[a], w_units))
    if not act.zero[a]:
        ctx.uf.poison(
            act.units[a],
            f"consumed by {_where(eqn)} while pruned channels are not exactly zero",
        )


def _dot_general(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    lhs, rhs = ins
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    units, zero = [], []
    for a, b in zip(lb, rb, strict=True):
        ctx.uf.union_arrays(lhs.units[a], rhs.units[b])
        units.append(lhs.units[a])
        zero.append(lhs.zero[a] or rhs.zero[b])
    weight_side = None
    if rhs.param and not lhs.param:
        weight_side = 1
    elif lhs.param and not rhs.param:
        weight_side = 0
    for a, b in zip(lc, rc, strict=True):
        if weight_side == 1:
            _consume(ctx, eqn, lhs, a, rhs.units[b])
        elif weight_side == 0:
            _consume(ctx, eqn, rhs, b, lhs.units[a])
        else:
            ctx.uf.union_arrays(lhs.units[a], rhs.units[b])
            if not (lhs.zero[a] or rhs.zero[b]):
                ctx.uf.poison(lhs.units[a], f"contracted while not zero by {_where(eqn)}")
    if lhs.param and rhs.param:
        ctx.missed.append((_where(eqn), int(eqn_macs(eqn)) * ctx.mult,
                           "both operands are parameters"))
    lfree = [a for a in range(len(lhs.units)) if a not in lc and a not in lb]
    rfree = [b for b in range(len(rhs.units)) if b not in rc and b not in rb]
    units += [lhs.units[a] for a in lfree] + [rhs.units[b] for b in rfree]
    zero += [lhs.zero[a] for a in lfree] + [rhs.zero[b] for b in rfree]
    if weight_side == 1:
        _record_site(ctx, eqn, "dot", lhs, rhs, rfree, list(rc), list(lc), units)
    elif weight_side == 0:
        _record_site(ctx, eqn, "dot", rhs, lhs, lfree, list(lc), list(rc), units)
    nonneg = lhs.nonneg and rhs.nonneg
    return [_Val(tuple(units), tuple(zero), lhs.param and rhs.param, None, nonneg)]


def _conv(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    lhs, rhs = ins
    dn = eqn.params["dimension_numbers"]
    ls, rs, os_ = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    out_shape = tuple(eqn.outvars[0].aval.shape)
    groups = eqn.params["feature_group_count"]
    units = list(ctx.fresh(out_shape))
    zero = [False] * len(out_shape)
    if eqn.params["batch_group_count"] != 1 or lhs.param or not rhs.param:
        _unsupported(ctx, eqn, ins, "conv with batch groups or without a parameter kernel")
        return [_Val(tuple(units), tuple(zero))]
    units[os_[0]] = lhs.units[ls[0]]
    zero[os_[0]] = lhs.zero[ls[0]]
    for d in ls[2:]:
        ctx.uf.poison(lhs.units[d], f"convolved spatially by {_where(eqn)}")
    c_in = lhs.units[ls[1]]
    w_in, w_out = rhs.units[rs[1]], rhs.units[rs[0]]
    n_in, n_out = c_in.size, w_out.size
    if groups == 1:
        _consume(ctx, eqn, lhs, ls[1], w_in)
        zero[os_[1]] = rhs.zero[rs[0]]
    elif w_in.size == 1:  # depthwise: output channel g*m + j is computed from input channel g
        m = n_out // groups
        for g in range(groups):
            for j in range(m):
                ctx.uf.union(int(c_in[g]), int(w_out[g * m + j]))
        zero[os_[1]] = rhs.zero[rs[0]] or lhs.zero[ls[1]]
    else:  # grouped: channel i of every group is one unit on each side
        k, m = n_in // groups, n_out // groups
        for g in range(1, groups):
            for i in range(k):
                ctx.uf.union(int(c_in[i]), int(c_in[g * k + i]))
            for j in range(m):
                ctx.uf.union(int(w_out[j]), int(w_out[g * m + j]))
        ctx.links.append((c_in[:k], w_in))
        if not lhs.zero[ls[1]]:
            ctx.uf.poison(c_in, f"consumed by {_where(eqn)} while pruned channels are not zero")
        zero[os_[1]] = rhs.zero[rs[0]]
    units[os_[1]] = w_out
    _record_site(ctx, eqn, "conv", lhs, rhs, [rs[0]], [rs[1]], [ls[1]], units)
    return [_Val(tuple(units), tuple(zero), False, None, lhs.nonneg and rhs.nonneg)]


def _reduce_window(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    x = ins[0]
    p = eqn.params
    out_shape = tuple(eqn.outvars[0].aval.shape)
    units, zero = [], []
    for a, n in enumerate(out_shape):
        trivial = (
            p["window_dimensions"][a] == 1
            and p["window_strides"][a] == 1
            and tuple(p["padding"][a]) == (0, 0)
            and p.get("base_dilation", (1,) * len(out_shape))[a] == 1
        )
        if trivial and x.units[a].size == n:
            units.append(x.units[a])
            zero.append(x.zero[a])
        else:
            ctx.uf.poison(x.units[a], f"pooled over by {_where(eqn)}")
            units.append(ctx.uf.new(n))
            zero.append(False)
    return [_Val(tuple(units), tuple(zero), x.param, None, x.nonneg)]


def _concatenate(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    d = eqn.params["dimension"]
    nd = len(ins[0].units)
    units, zero = [], []
    for a in range(nd):
        if a == d:
            units.append(np.concatenate([v.units[a] for v in ins]))
        else:
            for v in ins[1:]:
                ctx.uf.union_arrays(ins[0].units[a], v.units[a])
            units.append(ins[0].units[a])
        zero.append(all(v.zero[a] or v.allzero for v in ins))
    parts: tuple = ()
    if all(v.leaf is not None for v in ins):  # a kernel fused from leaves: each stays a site
        offsets = np.cumsum([0] + [v.units[d].size for v in ins[:-1]]).tolist()
        parts = tuple((d, int(o), v) for o, v in zip(offsets, ins, strict=True))
    return [
        _Val(
            tuple(units),
            tuple(zero),
            all(v.param for v in ins),
            None,
            all(v.nonneg for v in ins),
            all(v.allzero for v in ins),
            parts=parts,
        )
    ]


def _slice(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    x = ins[0]
    p = eqn.params
    strides = p["strides"] or (1,) * len(x.units)
    units = []
    for a, u in enumerate(x.units):
        s, e, st = p["start_indices"][a], p["limit_indices"][a], strides[a]
        if st != 1 and (s, e) != (0, u.size):
            ctx.uf.poison(u, f"strided slice by {_where(eqn)}")
        units.append(u[s:e:st])
    return [_Val(tuple(units), x.zero, x.param, None, x.nonneg, x.allzero)]


def _split(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    x = ins[0]
    a = eqn.params["axis"] % len(x.units)
    outs, start = [], 0
    for n in eqn.params["sizes"]:
        units = list(x.units)
        units[a] = x.units[a][start : start + n]
        start += n
        outs.append(_Val(tuple(units), x.zero, x.param, None, x.nonneg, x.allzero))
    return outs


def _pad(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    x = ins[0]
    zero_pad = ins[1].allzero
    units, zero = [], []
    for a, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
        u = x.units[a]
        if interior or lo < 0 or hi < 0:
            ctx.uf.poison(u, f"padded with interior/negative padding by {_where(eqn)}")
            units.append(ctx.uf.new(u.size + lo + hi + max(u.size - 1, 0) * interior))
            zero.append(False)
        else:
            units.append(np.concatenate([ctx.uf.new(lo), u, ctx.uf.new(hi)]))
            zero.append(x.zero[a])
    if not zero_pad:
        zero = [False] * len(zero)
    return [_Val(tuple(units), tuple(zero), x.param, None, x.nonneg and ins[1].nonneg)]


def _rev(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    x = ins[0]
    dims = set(eqn.params["dimensions"])
    units = tuple(u[::-1] if a in dims else u for a, u in enumerate(x.units))
    return [_Val(units, x.zero, x.param, None, x.nonneg, x.allzero)]


def _dynamic_slice(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    x = ins[0]
    sizes = eqn.params["slice_sizes"]
    units = []
    for a, u in enumerate(x.units):
        if sizes[a] == u.size:
            units.append(u)
        else:
            ctx.uf.poison(u, f"dynamically sliced by {_where(eqn)}")
            units.append(ctx.uf.new(sizes[a]))
    return [_Val(tuple(units), x.zero, x.param, None, x.nonneg)]


def _dynamic_update_slice(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    x, upd = ins[0], ins[1]
    for a, (u, w) in enumerate(zip(x.units, upd.units, strict=True)):
        if u.size == w.size:
            ctx.uf.union_arrays(u, w)
        else:
            ctx.uf.poison(u, f"dynamically updated by {_where(eqn)}")
            ctx.uf.poison(w, f"dynamically updated by {_where(eqn)} (axis {a})")
    zero = tuple(a and b for a, b in zip(x.zero, upd.zero, strict=True))
    return [_Val(x.units, zero, x.param and upd.param)]


def _rng(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    # sources: slim evaluates them at the original shape and slices the result.
    return [_fresh_val(ctx, v.aval) for v in eqn.outvars]


def _call(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    sub, consts = sub_jaxpr(eqn.params)
    if sub is None:
        _unsupported(ctx, eqn, ins, "call without a sub-jaxpr")
        return [_fresh_val(ctx, v.aval) for v in eqn.outvars]
    n = len(sub.invars)
    return _walk(ctx, sub, consts, ins[len(ins) - n :], path)


def _carry_fix(ctx: _Ctx, eqn: Any, init: list[_Val], out: list[_Val]) -> list[_Val]:
    res = []
    for a, b in zip(init, out, strict=True):
        for u, w in zip(a.units, b.units, strict=True):
            ctx.uf.union_arrays(u, w)
        for u, za, zb in zip(a.units, a.zero, b.zero, strict=True):
            if za and not zb:
                ctx.uf.poison(u, f"zero-ness not kept through the loop carry of {_where(eqn)}")
        res.append(_Val(a.units, a.zero, a.param and b.param, None, a.nonneg and b.nonneg))
    return res


def _loop_carry(init: list[_Val], ins: list[_Val]) -> list[_Val]:
    """A loop's carries enter the body as data when any loop input is data: a carry that starts
    from constants (an RNN's zero state) becomes data-dependent after one iteration."""
    if all(v.param for v in ins):
        return init
    # the body is walked once, so what holds of the initial carry only (non-negative, all
    # zeros) need not hold after an iteration
    return [dataclasses.replace(v, param=False, leaf=None, nonneg=False, allzero=False)
            for v in init]


def _sliced_layers(ctx: _Ctx, x: _Val) -> tuple[int, ...]:
    """``x.layers`` plus the leaf axis a scan slices off ``x`` (its leading axis)."""
    if x.leaf is None or not x.units:
        return ()
    la = ctx.leaf_axis(x.units[0])
    return (*x.layers, la[1]) if la is not None and la[0] == x.leaf else ()


def _scan(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    p = eqn.params
    nc, nk, length = p["num_consts"], p["num_carry"], p["length"]
    consts, init, xs = ins[:nc], ins[nc : nc + nk], ins[nc + nk :]
    init = _loop_carry(init, ins)
    xs_body = [_Val(x.units[1:], x.zero[1:], x.param, x.leaf, x.nonneg, x.allzero,
                    _sliced_layers(ctx, x)) for x in xs]
    body = p["jaxpr"]
    saved = ctx.mult
    ctx.mult *= length
    outs = _walk(ctx, body.jaxpr, list(body.consts), consts + init + xs_body, path + ("body",))
    ctx.mult = saved
    carry = _carry_fix(ctx, eqn, init, outs[:nk])
    ys = []
    for y, v in zip(outs[nk:], eqn.outvars[nk:], strict=True):
        ys.append(_Val((ctx.uf.new(v.aval.shape[0]), *y.units), (False, *y.zero), y.param))
    return carry + ys


def _while(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = ins[:cn], ins[cn : cn + bn], ins[cn + bn :]
    init = _loop_carry(init, ins)
    body, cond = p["body_jaxpr"], p["cond_jaxpr"]
    outs = _walk(ctx, body.jaxpr, list(body.consts), bconsts + init, path + ("body",))
    carry = _carry_fix(ctx, eqn, init, outs)
    _walk(ctx, cond.jaxpr, list(cond.consts), cconsts + carry, path + ("cond",))
    return carry


def _cond(ctx: _Ctx, eqn: Any, ins: list[_Val], path: tuple) -> list[_Val]:
    ops = ins[1:]
    results = []
    for b, br in enumerate(eqn.params["branches"]):
        results.append(_walk(ctx, br.jaxpr, list(br.consts), ops, path + ("branch", b)))
    outs = []
    for k in range(len(eqn.outvars)):
        first = results[0][k]
        for other in results[1:]:
            for u, w in zip(first.units, other[k].units, strict=True):
                ctx.uf.union_arrays(u, w)
        zero = tuple(all(r[k].zero[a] for r in results) for a in range(len(first.units)))
        outs.append(_Val(first.units, zero, all(r[k].param for r in results)))
    return outs


_RULES: dict[str, Callable[[_Ctx, Any, list[_Val], tuple], list[_Val]]] = {
    **{n: _elementwise for n in _ZERO_UNARY | _OTHER_UNARY | _BINARY_ADD | _BINARY_MUL},
    **{n: _elementwise for n in _BINARY_OTHER},
    **{n: _rng for n in _RNG},
    **{n: _call for n in CALL_PRIMITIVES},
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "reduce_sum": _reduce,
    "reduce_max": _reduce,
    "reduce_min": _reduce,
    "reduce_prod": _reduce,
    "reduce_and": _reduce,
    "reduce_or": _reduce,
    "argmax": _argreduce,
    "argmin": _argreduce,
    "cumsum": _cumulative,
    "cumprod": _cumulative,
    "cummax": _cumulative,
    "cummin": _cumulative,
    "cumlogsumexp": _cumulative,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "reduce_window_sum": _reduce_window,
    "reduce_window_max": _reduce_window,
    "reduce_window_min": _reduce_window,
    "concatenate": _concatenate,
    "slice": _slice,
    "split": _split,
    "pad": _pad,
    "rev": _rev,
    "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_update_slice,
    "scan": _scan,
    "while": _while,
    "cond": _cond,
}


def _literal_val(ctx: _Ctx, v: Any) -> _Val:
    val = v.val
    shape = tuple(np.shape(val))
    try:
        allzero = bool(np.all(np.asarray(val) == 0))
    except (TypeError, ValueError):
        allzero = False
    try:
        nonneg = bool(np.all(np.asarray(val) >= 0))
    except (TypeError, ValueError):
        nonneg = False
    return _Val(ctx.fresh(shape), (allzero,) * len(shape), True, None, nonneg, allzero)


def _walk(ctx: _Ctx, jaxpr: Any, consts: list, ins: Sequence[_Val], path: tuple) -> list[_Val]:
    """Walk ``jaxpr`` with input knowledge ``ins``; record out units of every eqn under ``path``."""
    env: dict = {}
    cvals = []
    for v, c in zip(jaxpr.constvars, consts, strict=True):
        shape = tuple(np.shape(c))
        env[v] = _Val(ctx.fresh(shape), (False,) * len(shape), True)
        cvals.append(env[v].units)
    ctx.records[path + ("consts",)] = tuple(cvals)
    for v, x in zip(jaxpr.invars, ins, strict=True):
        env[v] = x

    def read(v: Any) -> _Val:
        if isinstance(v, jcore.Literal):
            return _literal_val(ctx, v)
        return env[v]

    for i, eqn in enumerate(jaxpr.eqns):
        ins_i = [read(v) for v in eqn.invars]
        rule = _RULES.get(eqn.primitive.name)
        if rule is None:
            _unsupported(ctx, eqn, ins_i, "unsupported primitive")
            outs = [_fresh_val(ctx, v.aval) for v in eqn.outvars]
        else:
            outs = rule(ctx, eqn, ins_i, path + (i,))
        ctx.records[path + (i,)] = tuple(o.units for o in outs)
        for v, o in zip(eqn.outvars, outs, strict=True):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


# ---------------------------------------------------------------------------------------------
# Driver: flatten (variables, args, kwargs), make the jaxpr, walk, build groups and sites
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Traced:
    """One jaxpr of ``apply_fn`` at one call signature, with the walk's knowledge of it."""

    closed: Any
    out_tree: Any
    dyn_pos: list[int]
    static: tuple
    var_keys: list[Key]  # key of each dynamic variable leaf, in jaxpr invar order
    n_var: int
    ctx: _Ctx
    roots: np.ndarray
    in_units: list[tuple[np.ndarray, ...]]
    out_units: list[tuple[np.ndarray, ...]]


def trace_jaxpr(
    apply_fn: Callable,
    variables: Any,
    args: tuple,
    kwargs: dict,
    strict: bool = False,
) -> Traced:
    """Make the jaxpr of ``apply_fn(variables, *args, **kwargs)`` and walk it (array leaves of
    ``variables``/``args`` may be ``jax.ShapeDtypeStruct``s)."""
    vflat, _ = jax.tree_util.tree_flatten_with_path(variables)
    n_var_leaves = len(vflat)
    flat, treedef = jax.tree_util.tree_flatten_with_path((variables, args, kwargs))
    leaves = [x for _, x in flat]
    dyn_pos = [i for i, x in enumerate(leaves) if is_dynamic(x)]
    dyn_set = set(dyn_pos)
    static = tuple((i, leaves[i]) for i in range(len(leaves)) if i not in dyn_set)

    def rebuilt(*dyn_vals: Any) -> Any:
        full = list(leaves)
        for i, v in zip(dyn_pos, dyn_vals, strict=True):
            full[i] = v
        v, a, kw = jax.tree_util.tree_unflatten(treedef, full)
        return apply_fn(v, *a, **kw)

    avals = [aval(leaves[i]) for i in dyn_pos]
    closed, out_shape = jax.make_jaxpr(rebuilt, return_shape=True)(*avals)
    out_flat, out_tree = jax.tree_util.tree_flatten_with_path(out_shape)

    ctx = _Ctx(_Units(), strict, {}, {}, [])
    ins: list[_Val] = []
    var_keys: list[Key] = []
    for i in dyn_pos:
        if i < n_var_leaves:
            key = key_of(flat[i][0])[1:]
            shape = tuple(np.shape(leaves[i]))
            units = ctx.fresh(shape)
            ctx.leaf_units[key] = units
            ctx.leaf_shapes[key] = shape
            for a, u in enumerate(units):
                if u.size:
                    ctx.unit_leaf.append((int(u[0]), key, a))
            var_keys.append(key)
            zero = tuple(key[0] == "params" for _ in shape)
            ins.append(_Val(units, zero, True, key))
    ctx.n_leaf_units = len(ctx.uf.parent)
    in_units = []
    for i in dyn_pos:
        if i >= n_var_leaves:
            shape = tuple(np.shape(leaves[i]))
            units = ctx.fresh(shape)
            for u in units:
                ctx.uf.poison(u, "reaches the network input")
            in_units.append(units)
            ins.append(_Val(units, (False,) * len(shape)))
    outs = _walk(ctx, closed.jaxpr, list(closed.consts), ins, ())
    out_units = []
    for (opath, _), o in zip(out_flat, outs, strict=True):
        okey = key_of(opath)
        state_key = _match_state(okey, ctx.leaf_shapes, tuple(u.size for u in o.units))
        if state_key is not None:  # an updated variable (e.g. batch_stats): same units as input
            for u, w in zip(o.units, ctx.leaf_units[state_key], strict=True):
                ctx.uf.union_arrays(u, w)
        else:
            for u in o.units:
                ctx.uf.poison(u, "reaches the network output")
        out_units.append(o.units)
    return Traced(
        closed,
        out_tree,
        dyn_pos,
        static,
        var_keys,
        n_var_leaves,
        ctx,
        ctx.uf.roots(),
        in_units,
        out_units,
    )


def _match_state(okey: Key, leaf_shapes: Mapping[Key, tuple], shape: tuple) -> Key | None:
    for n in range(len(okey)):
        k = okey[n:]
        if k in leaf_shapes and leaf_shapes[k] == shape and k[0] != "params":
            return k
    return None


def _group_of_roots(traced: Traced) -> tuple[list[dict], dict[int, int]]:
    """Components of unit classes connected through a shared leaf axis that hold a producer."""
    ctx, roots = traced.ctx, traced.roots
    comp = _Units()
    comp.new(len(roots))
    for units in ctx.leaf_units.values():
        for u in units:
            r = roots[u]
            for x in np.unique(r[1:]).tolist():
                comp.union(int(r[0]), x)
    for _, _, _, u in ctx.producers:
        r = roots[u]
        for x in np.unique(r[1:]).tolist():
            comp.union(int(r[0]), x)
    groups: list[dict] = []
    by_comp: dict[int, dict] = {}
    for name, key, axis, u in ctx.producers:
        c = comp.find(int(roots[u[0]]))
        if c in by_comp:
            continue
        order = list(dict.fromkeys(roots[u].tolist()))
        g = dict(comp=c, name=name, key=key, axis=axis, units=order)
        by_comp[c] = g
        groups.append(g)
    root_group: dict[int, int] = {}
    for gi, g in enumerate(groups):
        for r in g["units"]:
            root_group[r] = gi
    # roots of the component that the first producer does not cover
    for g in groups:
        g["extra"] = False
    comp_roots = np.asarray([comp.find(int(r)) for r in range(len(roots))]) if groups else None
    if comp_roots is not None:
        all_class_roots = np.unique(roots)
        for r in all_class_roots.tolist():
            c = int(comp_roots[r])
            if c in by_comp and r not in root_group:
                by_comp[c]["extra"] = True
    return groups, root_group


def _slices_for(
    key: Key, axis: int, unit_of_pos: np.ndarray, units: list[int]
) -> np.ndarray | None:
    """index [size, k] of positions owned by each unit, or None if ownership is uneven."""
    idx = [np.nonzero(unit_of_pos == r)[0] for r in units]
    k = {len(i) for i in idx}
    if len(k) != 1 or 0 in k:
        return None
    return np.stack(idx).astype(np.int64)


def _unit_owner_map(
    groups: list[dict], root_group: Mapping[int, int], link: Mapping[int, int]
) -> dict[int, tuple[int, int]]:
    """``{class root: (group index, unit index)}`` for group classes and for consumer-row classes
    linked to one (slimming removes a linked row with its channel)."""
    out: dict[int, tuple[int, int]] = {}
    for gi, g in enumerate(groups):
        for j, r in enumerate(g["units"]):
            out[int(r)] = (gi, j)
    for w, a in link.items():
        if a in root_group and w not in out:
            out[int(w)] = out[int(a)]
    return out


def _axis_units(
    units: np.ndarray, roots: np.ndarray, unit_of: Mapping[int, tuple[int, int]], gid_of: list
) -> AxisUnits:
    """The :class:`AxisUnits` of one axis whose raw unit ids are ``units``."""
    owners: dict[int, np.ndarray] = {}
    for p, r in enumerate(roots[units].tolist()):
        hit = unit_of.get(r)
        if hit is None:
            continue
        gi, j = hit
        owners.setdefault(gi, np.full((units.size,), -1, np.int64))[p] = j
    return AxisUnits(int(units.size), tuple((gid_of[gi], o) for gi, o in sorted(owners.items())))


def _site_order(ctx: _Ctx) -> list[tuple[str, dict, tuple[int, ...]]]:
    """``(name, record, layer)`` per site in execution order. The sites of one scanned layer
    stack (consecutive records with the same stack sizes) run layer by layer, so they come out
    layer-major, named ``base[k]`` with ``k`` the flat layer index."""
    entries = list(ctx.sites.items())

    def sizes(rec: dict) -> tuple[int, ...]:
        return tuple(ctx.leaf_shapes[rec["weight"]][a] for a in rec["layer_axes"])

    out: list[tuple[str, dict, tuple[int, ...]]] = []
    i = 0
    while i < len(entries):
        name, rec = entries[i]
        if not rec["layer_axes"]:
            out.append((name, rec, ()))
            i += 1
            continue
        j = i
        while j < len(entries) and entries[j][1]["layer_axes"] and (
                sizes(entries[j][1]) == sizes(rec)):
            j += 1
        for k, idx in enumerate(np.ndindex(*sizes(rec))):
            out.extend((f"{n}[{k}]", r, tuple(int(x) for x in idx)) for n, r in entries[i:j])
        i = j
    return out


def build_graph(traced: Traced, batch_size: int, apply_fn: Callable, var_avals: Any) -> Graph:
    """Turn a walked jaxpr into a :class:`Graph` (groups in first-producer order, sites in
    execution order)."""
    ctx, roots = traced.ctx, traced.roots
    groups, root_group = _group_of_roots(traced)
    reasons = {ctx.uf.find(r): v for r, v in ctx.uf.reasons.items()}
    # consumer links: weight-row root -> group unit root
    link: dict[int, int] = {}
    link_bad: dict[int, str] = {}
    for act_u, w_u in ctx.links:
        for a, w in zip(roots[act_u].tolist(), roots[w_u].tolist(), strict=True):
            if a not in root_group:
                continue
            if w in link and link[w] != a:
                link_bad[a] = "a consumer row is shared by two channels"
                link_bad[link[w]] = link_bad[a]
            link[w] = a
            if w in root_group:
                link_bad[a] = "a channel's consumer rows are themselves a pruned channel"
    params: list[list[Slice]] = [[] for _ in groups]
    deps: list[list[Slice]] = [[] for _ in groups]
    bad: list[list[str]] = [[] for _ in groups]
    for gi, g in enumerate(groups):
        if g["extra"]:
            bad[gi].append("channels of this group are not all produced by one layer")
    for key, units in ctx.leaf_units.items():
        for axis, u in enumerate(units):
            if u.size == 0:
                continue
            r = roots[u]
            gids = {root_group.get(x) for x in np.unique(r).tolist()}
            for gi in gids - {None}:
                uniq = groups[gi]["units"]
                idx = _slices_for(key, axis, r, uniq)
                if idx is None:
                    bad[gi].append(f"{'/'.join(key)} axis {axis} does not hold every channel")
                    continue
                sl = Slice(key[0], key[1:], axis, idx)
                (params if key[0] == "params" else deps)[gi].append(sl)
            lr = np.asarray([link.get(x, -1) for x in r.tolist()])
            lg = {root_group.get(x) for x in np.unique(lr).tolist() if x >= 0}
            for gi in lg - {None}:
                idx = _slices_for(key, axis, lr, groups[gi]["units"])
                if idx is None:
                    bad[gi].append(f"consumer {'/'.join(key)} axis {axis} rows are uneven")
                    continue
                deps[gi].append(Slice(key[0], key[1:], axis, idx))
    out_groups: list[Group] = []
    used: set[str] = set()
    for gi, g in enumerate(groups):
        shape = ctx.leaf_shapes[g["key"]]
        site = ctx.sites.get(g["name"], {})
        n_out = len(site.get("out_axes", (g["axis"],)))
        gid = "/".join(g["key"][1:]) + (":out" if n_out <= 1 else f":out{g['axis']}")
        base, k = gid, 2
        while gid in used:
            gid = f"{base}#{k}"
            k += 1
        used.add(gid)
        g["id"] = gid
        why = list(bad[gi])
        for r in g["units"]:
            why += reasons.get(int(r), [])
            if r in link_bad:
                why.append(link_bad[r])
        why = list(dict.fromkeys(why))
        del shape
        out_groups.append(
            Group(
                id=gid,
                size=len(g["units"]),
                params=tuple(params[gi]),
                dependents=tuple(deps[gi]),
                prunable=not why,
                reason="; ".join(why[:3]) + (f" (+{len(why) - 3} more)" if len(why) > 3 else ""),
            )
        )
    unit_of = _unit_owner_map(groups, root_group, link)
    gid_of = [g.id for g in out_groups]
    sites = []
    for name, s, layer in _site_order(ctx):
        out_gid = in_gid = None
        if s["out_units"]:
            gi = root_group.get(int(roots[s["out_units"][0][0]]))
            out_gid = groups[gi]["id"] if gi is not None else None
        if s["act_units"] and s["act_units"][0].size:
            gi = root_group.get(int(roots[s["act_units"][0][0]]))
            in_gid = groups[gi]["id"] if gi is not None else None
        shape, la = ctx.leaf_shapes[s["weight"]], s["layer_axes"]
        n_layers = math.prod(shape[a] for a in la)

        def in_slice(a: int, la: tuple = la) -> int:
            return a - sum(1 for b in la if b < a)

        sites.append(
            Site(
                name=name,
                weight=s["weight"],
                kind=s["kind"],
                weight_shape=tuple(n for a, n in enumerate(shape) if a not in la),
                out_axes=tuple(in_slice(a) for a in s["out_axes"]),
                in_axes=tuple(in_slice(a) for a in s["in_axes"]),
                macs=int(s["macs"]) // n_layers,
                macs_per_example=s["macs"] / n_layers / max(batch_size, 1),
                out_group=out_gid,
                in_group=in_gid,
                signed_input=s["signed"],
                weight_axes=tuple(
                    _axis_units(u, roots, unit_of, gid_of)
                    for a, u in enumerate(ctx.leaf_units[s["weight"]]) if a not in la
                ),
                mac_terms=tuple(
                    MacTerm(int(m) // n_layers,
                            tuple(_axis_units(u, roots, unit_of, gid_of) for u in axes))
                    for m, axes in s["terms"]
                ),
                layer_axes=la,
                layer=layer,
                stack_sizes=tuple(shape[a] for a in la),
            )
        )
    in_data = [i >= traced.n_var for i in traced.dyn_pos]
    weight_macs = jaxpr_macs(traced.closed.jaxpr, in_data, "once")
    info = dict(
        weight_macs=int(weight_macs.param),
        missed=tuple(sorted(ctx.missed, key=lambda m: -m[1])),
        apply_fn=apply_fn,
        var_avals=var_avals,
        leaf_shapes=dict(ctx.leaf_shapes),
        reps={
            grp.id: np.asarray([int(ctx.leaf_units[g["key"]][g["axis"]][0]) for _ in g["units"]])
            for grp, g in zip(out_groups, groups, strict=True)
        },
        traced=traced,
    )
    # representative raw leaf unit of each group unit (stable across re-traces of the same model)
    for grp, g in zip(out_groups, groups, strict=True):
        u = ctx.leaf_units[g["key"]][g["axis"]]
        r = roots[u]
        info["reps"][grp.id] = np.asarray([int(u[np.nonzero(r == x)[0][0]]) for x in g["units"]])
    return Graph(
        groups=tuple(out_groups), sites=tuple(sites), batch_size=batch_size, trace_info=info
    )


def trace(
    apply_fn: Callable, variables: Any, *example_args: Any, strict: bool = False, **kwargs: Any
) -> Graph:
    """Trace ``apply_fn(variables, *example_args, **kwargs)`` and return its channel graph.

    Args:
      apply_fn: e.g. ``model.apply`` (linen) or ``lambda s, x: nnx.merge(gd, s)(x)`` (nnx).
      variables: pytree of arrays; for linen ``{"params": ..., "batch_stats": ...}``. Leaf keys
        are the tree paths as strings, ``(collection, *path)``.
      *example_args, **kwargs: example inputs (arrays or ``jax.ShapeDtypeStruct``) and static
        options (e.g. ``train=False``); the leading size of the first array is the batch size.
      strict: raise ``ValueError`` at the first primitive / axis the rules cannot follow instead of
        marking the affected groups non-prunable.
    Returns:
      a :class:`Graph` whose groups' ``reason`` says why a group is not prunable.
    """
    traced = trace_jaxpr(apply_fn, variables, example_args, kwargs, strict)
    arrays = [x for x in jax.tree.leaves((example_args, kwargs)) if is_dynamic(x) and np.ndim(x)]
    batch = int(np.shape(arrays[0])[0]) if arrays else 1
    var_avals = jax.tree.map(lambda x: aval(x) if is_dynamic(x) else x, variables)
    return build_graph(traced, batch, apply_fn, var_avals)
