"""What the channel-flow pass knows of each value: unit ids per axis (a union-find over
them), exact-zero and sign facts, and the walk's context (leaf axes, sites, links)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

Key = tuple[str, ...]


# f(0) == 0: pruned (zero) positions stay zero.


class Units:
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
class Val:
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
class Ctx:
    uf: Units
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


def where(eqn: Any) -> str:
    name = str(eqn.source_info.name_stack)
    return f"'{eqn.primitive.name}' at {name or '<top level>'}"


def unsupported(ctx: Ctx, eqn: Any, ins: Sequence[Val], why: str) -> None:
    msg = f"{why}: {where(eqn)}"
    if ctx.strict:
        raise ValueError(
            f"jaxjpq.trace cannot follow channels through {msg}. Register a rule for it "
            "(jaxjpq.trace.register_rule) or call trace(..., strict=False) to mark the affected "
            "groups non-prunable."
        )
    for v in ins:
        for u in v.units:
            ctx.uf.poison(u, msg)


def fresh_val(ctx: Ctx, aval: Any, param: bool = False) -> Val:
    shape = tuple(getattr(aval, "shape", ()))
    return Val(ctx.fresh(shape), (False,) * len(shape), param=param)


def literal_val(ctx: Ctx, v: Any) -> Val:
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
    return Val(ctx.fresh(shape), (allzero,) * len(shape), True, None, nonneg, allzero)
