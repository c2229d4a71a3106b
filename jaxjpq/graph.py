"""The quantization-aware dependency graph (QADG): channel groups and quantization sites.

These types are the contract between the tracer (`jaxjpq.trace`), the compression state
(`jaxjpq.init`), the compressed forward, the cost model and `jaxjpq.slim`. A `Graph` is static
Python data (numpy index arrays, strings): close over it, never pass it through `jit` as an
argument.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Slice:
    """Where the units of a group live inside one variable.

    Attributes:
      collection: variable collection, e.g. ``"params"`` or ``"batch_stats"``.
      path: path of the leaf inside the collection, e.g. ``("Conv_0", "kernel")``.
      axis: axis of the leaf that the units index.
      index: int array ``[size, k]``: unit ``i`` owns entries ``index[i]`` along ``axis``
        (``k > 1`` for flatten rows and attention heads).
    """

    collection: str
    path: Path
    axis: int
    index: np.ndarray

    @property
    def key(self) -> tuple[str, ...]:
        """``(collection, *path)``: the leaf's path in the full variables dict."""
        return (self.collection, *self.path)

    def owner(self, length: int) -> np.ndarray:
        """int ``[length]``: the unit owning each position along ``axis`` (-1 = none)."""
        idx = np.asarray(self.index).reshape(np.shape(self.index)[0], -1)
        owner = np.full((length,), -1, np.int64)
        owner[idx] = np.arange(idx.shape[0])[:, None]
        return owner


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
    """Channels (or heads) that must be pruned together.

    Attributes:
      id: stable readable id, e.g. ``"Conv_0/kernel:out"``.
      size: number of prunable units.
      params: slices whose zeroing makes a unit's output exactly zero (producer out-axis, bias,
        norm scale and offset).
      dependents: slices removed only when slimming (consumer in-axes, running statistics).
      prunable: False for network outputs/inputs or anything the tracer cannot follow safely.
      reason: why ``prunable`` is False (empty when prunable).
    """

    id: str
    size: int
    params: tuple[Slice, ...]
    dependents: tuple[Slice, ...] = ()
    prunable: bool = True
    reason: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class AxisUnits:
    """Which units of which groups own the positions of one axis.

    Attributes:
      size: positions along the axis (dense model).
      owners: ``(group id, owner)`` pairs; ``owner`` is int ``[size]``, the unit of that group
        owning each position (-1 = none). A concat axis has one pair per input group (at its
        offsets), a flattened axis owns ``k`` positions per unit, a head-dim axis likewise.
        Positions of no group are never removed.
    """

    size: int
    owners: tuple[tuple[str, np.ndarray], ...] = ()

    @property
    def group_ids(self) -> tuple[str, ...]:
        return tuple(g for g, _ in self.owners)


@dataclasses.dataclass(frozen=True, eq=False)
class MacTerm:
    """MACs of one contraction of a site, and the axes whose kept sizes scale them.

    Attributes:
      macs: dense MACs of the contraction at the traced input shape (whole batch, loop trip
        counts included).
      axes: the contraction's output axes and its contracted (kernel input) axes; the slim
        model's MACs are ``macs · Π kept(axis) / axis.size`` because slimming removes positions
        of each axis independently.
    """

    macs: int
    axes: tuple[AxisUnits, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    """A conv / dot_general with a parameter operand: one weight and one activation quantizer.

    Attributes:
      name: layer path, e.g. ``"Conv_0"`` or ``"encoder/layer_0/attn/query"``; unique in a graph.
      weight: ``(collection, *path)`` of the weight leaf, e.g. ``("params", "Conv_0", "kernel")``.
      kind: ``"conv"`` or ``"dot"``.
      weight_shape: shape of the weight leaf.
      out_axes: axes of the weight leaf that index output features.
      in_axes: axes of the weight leaf that index contracted input features.
      macs: multiply-accumulates of one forward pass at the traced input shape (whole batch).
      macs_per_example: ``macs`` divided by the traced batch size.
      out_group: id of the group of the output channels (None if not grouped).
      in_group: id of the group of the input channels (None if not grouped, e.g. network input).
      signed_input: False when the activation operand is provably non-negative (after ReLU).
      weight_axes: one :class:`AxisUnits` per weight axis: every group that removes positions
        of that axis (producer out-axis, consumer rows at concat offsets, flatten rows). Empty
        for hand-built sites: the cost model then derives them from the groups' slices.
      mac_terms: the site's contractions (one per use of the weight) with the axes that scale
        them. Empty for hand-built sites: ``macs`` scaled by the kept weight fraction.
      layer_axes: axes of the weight leaf that index stacked layers (``nn.scan`` /
        ``nn.remat_scan`` parameters), outermost loop first; empty for an ordinary site. A stacked
        leaf gives one site per layer, each with its own quantizers; ``weight_shape``,
        ``out_axes``, ``in_axes`` and ``weight_axes`` then describe the layer's slice.
      layer: this site's index along ``layer_axes``.
      stack_sizes: number of layers along each of ``layer_axes``.
      act_from: name of the earlier site that reads the same input tensor (e.g. attention's
        key and value read the query's input): this site uses that site's activation quantizer,
        so the tensor is quantized once; None when the site's input is its own.
    """

    name: str
    weight: tuple[str, ...]
    kind: str
    weight_shape: tuple[int, ...]
    out_axes: tuple[int, ...]
    in_axes: tuple[int, ...]
    macs: int
    macs_per_example: float
    out_group: str | None = None
    in_group: str | None = None
    signed_input: bool = True
    weight_axes: tuple[AxisUnits, ...] = ()
    mac_terms: tuple[MacTerm, ...] = ()
    layer_axes: tuple[int, ...] = ()
    layer: tuple[int, ...] = ()
    stack_sizes: tuple[int, ...] = ()
    act_from: str | None = None

    @property
    def act_key(self) -> str:
        """Key of this site's activation quantizer in ``CompressionState.act``."""
        return self.act_from or self.name

    @property
    def leaf_shape(self) -> tuple[int, ...]:
        """Shape of the weight leaf (``weight_shape`` with the stacked layer axes put back)."""
        if not self.layer_axes:
            return tuple(self.weight_shape)
        rest = iter(self.weight_shape)
        sizes = dict(zip(self.layer_axes, self.stack_sizes, strict=True))
        return tuple(sizes[a] if a in sizes else next(rest)
                     for a in range(len(self.weight_shape) + len(self.layer_axes)))

    def take(self, w: Any) -> Any:
        """This site's weight (``weight_shape``) out of the leaf value ``w`` (``leaf_shape``)."""
        if not self.layer_axes:
            return w
        idx: list[Any] = [slice(None)] * np.ndim(w)
        for a, i in zip(self.layer_axes, self.layer, strict=True):
            idx[a] = i
        return w[tuple(idx)]

    @property
    def group_ids(self) -> tuple[str, ...]:
        """Every group that reaches this site's weight or contraction axes, in order."""
        ids = [g for a in self.weight_axes for g in a.group_ids]
        ids += [g for t in self.mac_terms for a in t.axes for g in a.group_ids]
        ids += [g for g in (self.in_group, self.out_group) if g]
        return tuple(dict.fromkeys(ids))


# A float keep-mask entry above this keeps its unit or weight (1 = keep, 0 = pruned).
KEEP_ABOVE = 0.5


def kept(mask: Any) -> Any:
    """bool array: which entries of a keep-mask (float or bool, numpy or jax) are kept."""
    return mask > KEEP_ABOVE


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
    """Groups and quantization sites of one model traced at one input signature.

    Attributes:
      groups: all channel groups, prunable or not, in a stable order.
      sites: all quantization sites, in execution order.
      batch_size: leading size of the example input the graph was traced with.
      trace_info: what ``jaxjpq.trace`` knows beyond the groups (the apply function, abstract
        variables, leaf shapes, the walked jaxpr); used by ``jaxjpq.slim``. None when hand-built.
    """

    groups: tuple[Group, ...]
    sites: tuple[Site, ...]
    batch_size: int = 1
    trace_info: Any = dataclasses.field(default=None, repr=False)

    @property
    def group_map(self) -> Mapping[str, Group]:
        return {g.id: g for g in self.groups}

    @property
    def site_map(self) -> Mapping[str, Site]:
        return {s.name: s for s in self.sites}

    @property
    def prunable_groups(self) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if g.prunable)

    def removed_positions(self, masks: Mapping[str, Any]) -> dict[tuple[str, ...], dict[int, set]]:
        """``{leaf key: {axis: positions removed}}`` for keep-masks ``{group.id: bool[size]}``.

        Both ``params`` and ``dependents`` slices are removed; entries above ``KEEP_ABOVE``
        are kept.
        """
        gm = self.group_map
        out: dict[tuple[str, ...], dict[int, set]] = {}
        for gid, m in masks.items():
            if gid not in gm:
                raise ValueError(f"masks name group {gid!r} that is not in the graph.")
            g = gm[gid]
            keep = kept(np.asarray(m).astype(np.float64).reshape(-1))
            if keep.shape != (g.size,):
                raise ValueError(f"mask for {gid} has shape {keep.shape}, expected ({g.size},).")
            if keep.all():
                continue
            if not g.prunable:
                raise ValueError(
                    f"group {gid} is not prunable ({g.reason}); keep all of its units "
                    "(mask of ones) or leave it out of the masks."
                )
            for sl in (*g.params, *g.dependents):
                idx = np.asarray(sl.index).reshape(g.size, -1)[~keep].reshape(-1)
                out.setdefault(sl.key, {}).setdefault(sl.axis, set()).update(idx.tolist())
        return out

    def abstract_variables(self) -> dict:
        """The variables' shapes as a nested dict of float32 ``jax.ShapeDtypeStruct`` (needs a
        traced graph)."""
        if self.trace_info is None:
            raise ValueError("a hand-built graph has no leaf shapes; pass the variables.")
        return traverse_util.unflatten_dict(
            {k: jax.ShapeDtypeStruct(s, jnp.float32)
             for k, s in self.trace_info["leaf_shapes"].items()})

    def param_count(
        self, masks: Mapping[str, Any] | None = None, collections: tuple[str, ...] = ("params",)
    ) -> int:
        """Number of entries of the ``collections`` leaves after slimming with ``masks``
        (``None``: the dense model). Needs a traced graph (leaf shapes in ``trace_info``)."""
        if self.trace_info is None:
            raise ValueError("param_count needs a graph made by jaxjpq.trace (it has leaf shapes).")
        removed = self.removed_positions(masks or {})
        total = 0
        for key, shape in self.trace_info["leaf_shapes"].items():
            if collections and key[0] not in collections:
                continue
            dims = [n - len(removed.get(key, {}).get(a, ())) for a, n in enumerate(shape)]
            total += int(np.prod(dims, dtype=np.int64))
        return total

    @property
    def coverage(self) -> float | None:
        """Share of the model's weight MACs (contractions with a parameter operand) that the
        sites cover, in [0, 1]; None for a hand-built graph."""
        if self.trace_info is None or "weight_macs" not in self.trace_info:
            return None
        total = self.trace_info["weight_macs"]
        return 1.0 if total == 0 else sum(s.macs for s in self.sites) / total

    def summary(self) -> str:
        """A readable table of groups (id, size, prunable / reason, slices) and sites, with the
        share of the weight MACs the sites cover (a warning below 95 %, naming what was missed).
        """
        lines = [f"Graph: {len(self.groups)} groups ({len(self.prunable_groups)} prunable), "
                 f"{len(self.sites)} sites, traced at batch {self.batch_size}"]
        cov = self.coverage
        if cov is not None:
            lines.append(f"sites cover {cov:.1%} of the weight MACs")
            if cov < 0.95:
                lines.append("WARNING: below 95 %; contractions with a parameter that are not "
                             "sites (not quantized, not in the cost model):")
                for where, macs, why in self.trace_info.get("missed", ())[:8]:
                    lines.append(f"  {where}: {macs} MACs, {why}")
        w = max([len(g.id) for g in self.groups] + [5])
        lines.append(f"{'group':<{w}}  {'size':>5}  {'params':>6}  {'deps':>4}  prunable")
        for g in self.groups:
            flag = "yes" if g.prunable else f"no: {g.reason}"
            lines.append(
                f"{g.id:<{w}}  {g.size:>5}  {len(g.params):>6}  {len(g.dependents):>4}  {flag}"
            )
        ws = max([len(s.name) for s in self.sites] + [4])
        lines.append("")
        lines.append(f"{'site':<{ws}}  kind  {'weight shape':<16} {'MACs/ex':>12}  in -> out")
        for s in self.sites:
            lines.append(
                f"{s.name:<{ws}}  {s.kind:<4}  {str(s.weight_shape):<16} "
                f"{s.macs_per_example:>12.0f}  {s.in_group or '-'} -> {s.out_group or '-'}"
                + ("" if s.signed_input else "  (unsigned input)")
                + (f"  (input of {s.act_from})" if s.act_from else "")
            )
        return "\n".join(lines)

    def to_dot(self) -> str:
        """Graphviz DOT text: sites as boxes, groups as ellipses (grey when not prunable), edges
        ``in_group -> site -> out_group``. Render with ``dot -Tsvg``; no graphviz dependency."""

        def q(s: str) -> str:
            return '"' + s.replace('"', '\\"') + '"'

        lines = ["digraph qadg {", "  rankdir=LR;", "  node [fontsize=10];"]
        for g in self.groups:
            style = "" if g.prunable else ', style=filled, fillcolor="#dddddd"'
            lines.append(f"  {q('g:' + g.id)} [label={q(f'{g.id} ({g.size})')}{style}];")
        for s in self.sites:
            lines.append(f"  {q('s:' + s.name)} [shape=box, label={q(s.name)}];")
            if s.in_group:
                lines.append(f"  {q('g:' + s.in_group)} -> {q('s:' + s.name)};")
            if s.out_group and s.out_group != s.in_group:
                lines.append(f"  {q('s:' + s.name)} -> {q('g:' + s.out_group)};")
        lines.append("}")
        return "\n".join(lines)


def stack_layers(slices: Sequence[Any], layer_axes: Sequence[int], sizes: Sequence[int],
                 xp: Any) -> Any:
    """The stacked leaf from its layers' values (flat layer order, C order over ``sizes``),
    the layer axes put at ``layer_axes``."""
    stacked = xp.reshape(xp.stack(list(slices)), (*sizes, *np.shape(slices[0])))
    nd = np.ndim(slices[0]) + len(layer_axes)
    src = list(layer_axes) + [a for a in range(nd) if a not in layer_axes]
    return xp.transpose(stacked, tuple(int(i) for i in np.argsort(src)))


def put_layers(w: Any, pieces: Sequence[tuple[Site, Any]], xp: Any) -> Any:
    """The leaf value ``w`` with each ``(site, value)`` of ``pieces`` written at the site's place.

    An ordinary site's value replaces the leaf; stacked sites' values (their ``weight_shape``)
    replace their layers, the other layers are kept from ``w``. ``xp``: numpy or jax.numpy."""
    if not pieces:
        return w
    first = pieces[0][0]
    if not first.layer_axes:
        return pieces[-1][1]
    by_layer = {tuple(s.layer): v for s, v in pieces}
    slices = [by_layer[idx] if idx in by_layer
              else dataclasses.replace(first, layer=idx).take(w)
              for idx in np.ndindex(*first.stack_sizes)]
    return stack_layers(slices, first.layer_axes, first.stack_sizes, xp)


def check_variables(graph: Graph, variables: Mapping) -> None:
    """Raise ``ValueError`` naming the first leaf whose shape differs from the traced one (a
    clear message instead of an index error deep in the forward). Needs a traced graph;
    leaves the graph does not know are ignored."""
    if not isinstance(variables, Mapping):
        return
    info = graph.trace_info
    shapes = dict(info["leaf_shapes"]) if info is not None else {}
    for site in graph.sites:
        shapes.setdefault(site.weight, site.leaf_shape)
    for key, shape in shapes.items():
        node: Any = variables
        for k in key:
            if not isinstance(node, Mapping) or k not in node:
                node = None
                break
            node = node[k]
        if node is None or not hasattr(node, "shape"):
            continue
        if tuple(node.shape) != tuple(shape):
            raise ValueError(
                f"variables: {'/'.join(key)} has shape {tuple(node.shape)}, but the graph was "
                f"traced with {tuple(shape)}; pass the variables of the traced model (or "
                "re-trace the graph for these variables)."
            )


def set_leaf(tree: dict, key: Sequence[str], value: Any) -> None:
    """Put ``value`` at ``key`` (``(collection, *path)``) of the nested dict ``tree``, making the
    missing levels."""
    node = tree
    for k in key[:-1]:
        node = node.setdefault(k, {})
    node[key[-1]] = value


def leaf(variables: Mapping, key: Sequence[str]) -> Any:
    """The leaf at ``key`` (``(collection, *path)``); a clear ``ValueError`` if absent."""
    node = variables
    for k in key:
        if not isinstance(node, Mapping) or k not in node:
            raise ValueError(
                f"variables have no leaf {'/'.join(key)}; pass the variables the graph was "
                "traced with."
            )
        node = node[k]
    return node


def check_inputs(graph: Graph, args: Sequence[Any]) -> None:
    """Raise ``ValueError`` when a data argument is an integer array where the graph was traced
    on floats (e.g. uint8 pixels in 0-255 for a model traced on floats in [0, 1)): the
    quantizers' clips and the trained weights assume the traced range. Static (dtypes only), so
    free under jit; graphs without trace info are not checked."""
    info = graph.trace_info
    traced = info.get("input_dtypes", ()) if info is not None else ()
    for i, (arg, want) in enumerate(zip(args, traced, strict=False)):
        dtype = getattr(arg, "dtype", None)
        if dtype is None:
            continue
        if jnp.issubdtype(want, jnp.floating) and not jnp.issubdtype(dtype, jnp.inexact):
            raise ValueError(
                f"input {i} is {jnp.dtype(dtype).name} but the graph was traced on {want} inputs; "
                "convert it to the traced dtype and range (e.g. x / 255.0 for 0-255 pixels).")


def graph_fingerprint(graph: Graph) -> str:
    """Short hash of group ids/sizes/prunability and site names/weights/shapes/axes."""
    h = hashlib.sha1()
    for g in graph.groups:
        h.update(f"G|{g.id}|{g.size}|{g.prunable};".encode())
    for s in graph.sites:
        h.update(f"S|{s.name}|{s.weight}|{s.weight_shape}|{s.out_axes}|{s.in_axes}"
                 f"|{s.act_from or ''};".encode())
    return h.hexdigest()[:16]


def kept_positions(graph: Graph, masks: Mapping[str, Any], key: tuple[str, ...],
                   shape: Sequence[int]) -> dict[int, np.ndarray]:
    """``{axis: bool[n]}``: the positions of variable leaf ``key`` (shape ``shape``) that the
    keep-masks ``{group id: [size]}`` keep, for the axes that lose any (a group's own slices and
    its dependents' rows)."""
    keep: dict[int, np.ndarray] = {}
    for g in graph.prunable_groups:
        if g.id not in masks:
            continue
        m = kept(np.asarray(masks[g.id]))
        if m.all():
            continue
        for sl in (*g.params, *g.dependents):
            if sl.key != tuple(key):
                continue
            axis = sl.axis % len(shape)
            owner = sl.owner(shape[axis])
            dropped = (owner >= 0) & ~m[np.maximum(owner, 0)]
            keep[axis] = keep.get(axis, np.ones(shape[axis], bool)) & ~dropped
    return keep


def select_kept(x: Any, keep: Mapping[int, np.ndarray]) -> Any:
    """``x`` with only the kept positions of each axis in ``keep`` (:func:`kept_positions`)."""
    for axis, k in keep.items():
        x = np.compress(k, np.asarray(x), axis=axis)
    return x

