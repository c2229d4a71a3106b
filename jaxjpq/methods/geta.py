"""GETA's QASSO optimizer as an optax transform over ``(params, CompressionState)``.

Four stages over a fixed step budget, chosen inside one jitted ``update`` from the step count:

1. warm-up: inner optimizer on the weights, SGD (``quant_lr``) on the quantizers' ``d, q_m, t``
   (a step may at most halve ``q_m``, see :func:`_quant_update`);
2. projection (``projection_periods`` × ``projection_steps``): the upper bit limit is
   ``spec.init_bits`` in the first period and drops by ``bit_reduction`` at the start of each
   later one, never below ``b_u``; after every quantizer step ``d`` alone is projected onto
   ``[d(b_upper), d(b_l)]`` (partial projection);
3. joint (``joint_periods`` × ``period_steps``): at each period start the lowest-saliency units not
   yet pruned are chosen (the period's share of the target); during the period they take the
   ordinary step plus ``-γ · Q(x)`` and at its end they are set to exactly zero and their masks
   to 0. With ``joint_rule="reference"`` (default) the forget rate ``γ`` and the step ``d`` of
   the weight quantizers of a group that holds redundant units follow the reference's rule
   (:func:`joint_gamma_d`): ``γ = 1 / (P - k)`` when ``cos(x_R, ∇f) ≥ 0``, a small safe rate
   otherwise, and ``d = d(b_l)`` (the fewest bits) when the quantization residual and the gradient
   agree; ``joint_rule="plain"``: ``γ = 1 / (P - k)`` always and ``d`` the projected SGD step;
4. cool-down: every quantizer's bits are rounded to an integer in ``[b_l, b_u]`` and kept there,
   masks stay frozen, the remaining weights keep training.

Use it as the last transform of a chain over the pair, e.g.
``optax.chain(optax.clip_by_global_norm(1.0), jaxjpq.geta(optax.sgd(0.1), steps=...))``;
``params`` must be given to ``update``. The model params are the ``params`` collection of the
variables the state's graph was traced with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxjpq.compress import quantize_weights
from jaxjpq.graph import Graph, kept, leaf, put_layers, set_leaf
from jaxjpq.methods import core
from jaxjpq.quant import (
    QuantParams,
    bits_from_step,
    broadcast_params,
    clip_sgd_step,
    clipped_residual,
    step_from_bits,
)
from jaxjpq.state import CompressionState, site_quantizer
from jaxjpq.units import UnitIndex, unit_broadcast, unit_index, unit_sum

SCORES = ("magnitude", "cosine", "taylor1", "taylor2", "quant_error")
# The reference implementation's five scores (``saliency_rule="reference"``).
REFERENCE_SCORES = ("magnitude", "avg_magnitude", "cosine_plus_one", "taylor1", "taylor2")
SALIENCY_RULES = ("jaxjpq", "reference")
JOINT_RULES = ("reference", "plain")
# Constants of the reference's descent-safe forget rate and step size (eta, zeta, shrink factor).
_ETA, _ZETA, _BACKOFF = 0.999, 0.9, 0.8
_EPS = 1e-12
# Fractions of the steps for warm-up, projection and joint stage (cool-down: the rest). The joint
# stage ends at 40 % so that the pruned model recovers while a decaying learning rate is still
# large.
DEFAULT_FRACTIONS = (0.1, 0.1, 0.2)


@dataclasses.dataclass(frozen=True)
class GetaSchedule:
    """Stage lengths in steps. ``cooldown = steps - (end of joint stage)``, at least 0."""

    steps: int
    warmup: int
    projection_periods: int
    projection_steps: int
    joint_periods: int
    period_steps: int

    @property
    def projection_end(self) -> int:
        return self.warmup + self.projection_periods * self.projection_steps

    @property
    def joint_end(self) -> int:
        return self.projection_end + self.joint_periods * self.period_steps

    def stage(self, step: int) -> str:
        """Name of the stage that ``update`` number ``step`` (0-based) runs in."""
        if step < self.warmup:
            return "warmup"
        if step < self.projection_end:
            return "projection"
        return "joint" if step < self.joint_end else "cooldown"


def make_schedule(
    steps: int,
    *,
    warmup: int | None = None,
    projection_periods: int = 4,
    projection_steps: int | None = None,
    joint_periods: int = 5,
    period_steps: int | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> GetaSchedule:
    """Split of ``steps`` into warm-up, projection and joint stage by ``fractions`` of the steps
    (default 10 %, 10 %, 20 %), the rest cool-down; ``warmup``, ``projection_steps`` (per
    period) and ``period_steps`` given in steps override them."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    f_warm, f_proj, f_joint = (float(f) for f in fractions)
    if min(f_warm, f_proj, f_joint) < 0 or f_warm + f_proj + f_joint > 1:
        raise ValueError(f"fractions must be >= 0 and sum to at most 1, got {tuple(fractions)}.")
    warmup = int(round(f_warm * steps)) if warmup is None else int(warmup)
    if projection_steps is None:
        projection_steps = max(1, int(f_proj * steps) // max(projection_periods, 1))
    if period_steps is None:
        period_steps = max(1, int(f_joint * steps) // max(joint_periods, 1))
    sched = GetaSchedule(
        int(steps), warmup, int(projection_periods), int(projection_steps), int(joint_periods),
        int(period_steps),
    )
    if min(sched.warmup, sched.projection_periods, sched.joint_periods) < 0 or min(
        sched.projection_steps, sched.period_steps
    ) < 1:
        raise ValueError(f"stage lengths must be non-negative with periods >= 1 step: {sched}.")
    if sched.joint_end > steps:
        raise ValueError(
            f"the stages need {sched.joint_end} steps (warm-up {sched.warmup}, projection "
            f"{sched.projection_periods}x{sched.projection_steps}, joint "
            f"{sched.joint_periods}x{sched.period_steps}) but steps={steps}; raise steps or "
            "shorten the stages."
        )
    return sched


class GetaState(NamedTuple):
    """State of :func:`geta`.

    Attributes:
      step: int32 scalar, number of updates applied so far.
      inner_state: the inner optimizer's state over the model params.
      redundant: bool ``[U]``, units being shrunk in the current joint period (``R``).
      saliency: float32 ``[U]``, the scores of the last selection (for inspection).
    """

    step: jax.Array
    inner_state: optax.OptState
    redundant: jax.Array
    saliency: jax.Array


def _group_mean(index: UnitIndex, v: jax.Array, live: jax.Array) -> jax.Array:
    seg = jnp.asarray(index.group_of_unit)
    tot = jax.ops.segment_sum(jnp.where(live, v, 0.0), seg, index.num_groups)
    cnt = jax.ops.segment_sum(live.astype(jnp.float32), seg, index.num_groups)
    return (tot / jnp.maximum(cnt, 1.0))[seg]


def saliency(
    index: UnitIndex,
    params: Mapping,
    grads: Mapping,
    qparams: Mapping,
    live: jax.Array,
    weights: Sequence[float] = (0.2,) * 5,
) -> jax.Array:
    """Importance ``[U]`` of each unit (higher = keep), from the five GETA scores.

    Each score is divided by its mean over the live units of the unit's group, then combined with
    ``weights`` (order: :data:`SCORES`): magnitude ``‖x‖``, ``(1 − cos(∇f, x)) / 2`` (a step along
    −∇f that shrinks x marks the unit redundant), Taylor first order ``|⟨∇f, x⟩|``, second order
    ``½ Σ (∇f ⊙ x)²`` (diagonal Fisher), minus the relative quantization error
    ``‖x − Q(x)‖ / ‖x‖`` (*choice*: badly representable units lose importance).
    """
    x2 = unit_sum(index, lambda x: x * x, params)
    g2 = unit_sum(index, lambda g: g * g, grads)
    gx = unit_sum(index, lambda g, x: g * x, grads, params)
    gx2 = unit_sum(index, lambda g, x: (g * x) ** 2, grads, params)
    e2 = unit_sum(index, lambda x, q: (x - q) ** 2, params, qparams)
    mag = jnp.sqrt(x2)
    scores = (
        mag,
        0.5 * (1.0 - gx / (jnp.sqrt(x2 * g2) + _EPS)),
        jnp.abs(gx),
        0.5 * gx2,
        -jnp.sqrt(e2) / (mag + _EPS),
    )
    total = jnp.zeros_like(mag)
    for w, s in zip(weights, scores, strict=True):
        scale = jnp.abs(_group_mean(index, s, live))
        total = total + w * s / (scale + _EPS)
    return total


def reference_saliency(
    index: UnitIndex,
    params: Mapping,
    grads: Mapping,
    live: jax.Array,
    weights: Sequence[float] = (0.2,) * 5,
) -> jax.Array:
    """Importance ``[U]`` by the reference implementation's rule (order:
    :data:`REFERENCE_SCORES`): ``‖x‖``, ``‖x‖ / n`` (``n`` the unit's parameter entries),
    ``cos(x, ∇f) + 1``, ``|⟨∇f, x⟩|`` and ``½ ⟨∇f, x⟩²``, each divided by its L2 norm over the
    live units, then combined with ``weights``."""
    g2 = unit_sum(index, lambda g: g * g, grads)
    gx = unit_sum(index, lambda g, x: g * x, grads, params)
    n = unit_sum(index, jnp.ones_like, params)
    mag = core.magnitude(index, params)
    scores = (
        mag,
        mag / jnp.maximum(n, 1.0),
        gx / ((mag + 1e-8) * (jnp.sqrt(g2) + 1e-8)) + 1.0,
        jnp.abs(gx),
        0.5 * gx * gx,
    )
    total = jnp.zeros_like(mag)
    for w, sc in zip(weights, scores, strict=True):
        norm = jnp.sqrt(jnp.sum(jnp.where(live, sc * sc, 0.0)))
        total = total + w * sc / (norm + _EPS)
    return total


def clipped_and_residual(params: Mapping, state: CompressionState) -> tuple[dict, dict]:
    """``(x_c, r)`` trees shaped like ``params``: on a quantized site's weight ``x_c = sign(x) ·
    min(|x|, q_m)^t`` and the rounding residual ``r = sign(x) · (round(x_c / d) - x_c / d)`` (in
    steps); on every other leaf ``x_c = x`` and ``r = 0``."""
    variables = {"params": params}
    clip_tree = {"params": jax.tree.map(lambda a: a, dict(params))}
    res_tree = {"params": jax.tree.map(jnp.zeros_like, dict(params))}
    pieces: dict = {}
    for site in state.graph.sites:
        if site.name not in state.weight:
            continue
        w = site.take(leaf(variables, site.weight))
        q = broadcast_params(site_quantizer(state, "weight", site.name), w.ndim, site.out_axes)
        pieces.setdefault(site.weight, []).append((site, *clipped_residual(w, q.d, q.q_m, q.t)))
    for key, ps in pieces.items():
        set_leaf(clip_tree, key, put_layers(leaf(variables, key), [(s, a) for s, a, _ in ps], jnp))
        set_leaf(res_tree, key, put_layers(leaf(res_tree, key), [(s, r) for s, _, r in ps], jnp))
    return clip_tree["params"], res_tree["params"]


def joint_gamma_d(
    index: UnitIndex,
    clipped: Mapping,
    residual: Mapping,
    updates: Mapping,
    redundant: jax.Array,
    k: jax.Array,
    period_steps: int,
    d_range: tuple[jax.Array, jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """The reference's forget rate and weight step of every group in the joint stage.

    Over a group's redundant units, with ``u`` the inner optimizer's update (``-lr · ∇f`` for
    SGD) and ``cos_x = cos(x_c, -u)``, ``cos_r = cos(r, -u)``:

    - ``γ = 0`` when ``x_c`` is already zero, ``1 / (P - k)`` when ``cos_x ≥ 0``, else
      ``-(1 - η) ‖u‖ / (cos_x ‖x_c‖)``, at most ``1 / (P - k)``;
    - ``d = d(b_l)`` when ``cos_r ≥ 0`` or ``γ = 0``, else ``-ζ η ‖u‖ / (γ cos_r ‖r‖)``; where
      that is below ``d(b_u)``, ``γ`` and ``d`` are scaled by 0.8 and 1/0.8 until it is not; then
      ``d ≤ d(b_l)``.

    Args:
      clipped, residual: :func:`clipped_and_residual` trees; updates: like params.
      redundant: bool ``[U]``; k: step in the period (int32 scalar); period_steps: ``P``.
      d_range: ``(d(b_u), d(b_l)) [G]`` of each group (its largest ``q_m^t``).

    Returns:
      ``(γ [G], d [G])``; a group without redundant units gets ``γ = 0, d = d(b_l)``.
    """
    seg = jnp.asarray(index.group_of_unit)
    red = redundant.astype(jnp.float32)

    def gsum(fn, *trees):
        return jax.ops.segment_sum(unit_sum(index, fn, *trees) * red, seg, index.num_groups)

    xu = gsum(lambda a, u: a * u, clipped, updates)
    ru = gsum(lambda a, u: a * u, residual, updates)
    n_x = jnp.sqrt(gsum(lambda a: a * a, clipped))
    n_r = jnp.sqrt(gsum(lambda a: a * a, residual))
    n_u = jnp.sqrt(gsum(lambda a: a * a, updates))
    eps = 1e-8
    cos_x = -xu / (jnp.maximum(n_x, eps) * n_u)
    cos_r = -ru / (jnp.maximum(n_r, eps) * n_u)
    plain = 1.0 / (period_steps - k).astype(jnp.float32)
    safe = -(1.0 - _ETA) * n_u / (jnp.where(cos_x < 0, cos_x, -1.0) * jnp.maximum(n_x, eps))
    # capped at the plain rate (*choice*): the reference's safe rate grows without bound as
    # cos_x -> 0-, and a rate above 1 flips the weights' sign instead of shrinking them
    gamma = jnp.where(cos_x >= 0, plain, jnp.minimum(safe, plain))
    gamma = jnp.where((n_x < eps) | ~jnp.isfinite(cos_x), 0.0, gamma)
    d_lo, d_hi = d_range
    lower_d = (cos_r >= 0) | (gamma == 0) | ~jnp.isfinite(cos_r)
    denom = jnp.where(lower_d, -1.0, gamma * cos_r * jnp.maximum(n_r, eps))
    d = -_ZETA * _ETA * n_u / denom
    # the reference's loop "γ *= 0.8; d /= 0.8 while d < d(b_u)" in closed form
    n = jnp.ceil(jnp.log(jnp.maximum(d_lo / jnp.maximum(d, 1e-30), 1.0)) / jnp.log(1 / _BACKOFF))
    scale = _BACKOFF**n
    gamma = jnp.where(lower_d, gamma, gamma * scale)
    d = jnp.where(lower_d, d_hi, jnp.minimum(d_hi, d / scale))
    return gamma, d


def unit_costs(graph: Graph, index: UnitIndex) -> np.ndarray:
    """float ``[U]``: MACs per example one unit accounts for, relative to the mean over units.

    A unit of group ``g`` owns ``1/size`` of the MACs of every site whose output (or, for a
    different group, input) is ``g``.
    """
    per_group = np.zeros(index.num_groups)
    pos = {gid: j for j, gid in enumerate(index.group_ids)}
    sizes = np.diff(index.offsets).astype(np.float64)
    for s in graph.sites:
        for gid in {s.out_group, s.in_group} - {None}:
            if gid in pos:
                per_group[pos[gid]] += s.macs_per_example / sizes[pos[gid]]
    cost = per_group[index.group_of_unit]
    if cost.size == 0:
        return cost
    # Floor: a unit of no MACs (e.g. a group with no site) must keep a finite saliency.
    return np.maximum(cost / max(float(cost.mean()), 1e-30), 1e-6)


def _sgd_projected(table, grads, signed, frozen, lr, b_lo, b_upper):
    """GETA's quantizer step: SGD on ``d``, ``q_m`` (at most halved, see
    :func:`jaxjpq.quant.clip_sgd_step`) and ``t``, then ``d`` projected onto the bit range."""

    def step(name: str, p: QuantParams) -> QuantParams:
        g = grads[name]
        q_m = clip_sgd_step(p.q_m, g.q_m, lr)
        t = jnp.clip(p.t - lr * g.t, 0.25, 4.0)
        return core.projected(QuantParams(d=p.d - lr * g.d, q_m=q_m, t=t), signed[name], b_lo,
                              b_upper)

    return core.map_learned(table, frozen, step)


def _zeros_as_dicts(tree):
    """Zeros shaped like ``tree`` with every mapping a plain dict (as ``quantize_weights``
    returns it)."""
    if isinstance(tree, Mapping):
        return {k: _zeros_as_dicts(v) for k, v in tree.items()}
    return jnp.zeros_like(tree)


def _reference_joint(index, c, weight, p, u_p, redundant, k, period_steps, b_lo, b_hi, in_joint):
    """``(weight table, γ [G])``: :func:`joint_gamma_d` applied to the stepped weight
    quantizers ``weight``; each group holding redundant units sets its sites' ``d`` to the bits
    of its step (every site at its own ``q_m``, ``t``)."""
    pos = {gid: j for j, gid in enumerate(index.group_ids)}
    sites = [s for s in c.graph.sites
             if s.name in weight and s.name not in c.frozen and s.out_group in pos]
    qt = jnp.zeros((index.num_groups,), jnp.float32)
    for site in sites:
        q = weight[site.name]
        qt = qt.at[pos[site.out_group]].max(jnp.max(jnp.power(q.q_m, q.t)))
    # the residual at the step the weights were quantized with, the clip and exponent stepped
    table = {n: q.replace(d=c.weight[n].d) for n, q in weight.items()}
    clipped, residual = clipped_and_residual(p, c.replace(weight=table))
    d_range = (step_from_bits(b_hi, qt), step_from_bits(b_lo, qt))
    gamma, d = joint_gamma_d(index, clipped, residual, u_p, redundant, k, period_steps, d_range)
    seg = jnp.asarray(index.group_of_unit)
    active = in_joint & (jax.ops.segment_sum(redundant.astype(jnp.int32), seg,
                                             index.num_groups) > 0)
    bits = bits_from_step(d, jnp.maximum(qt, 1e-30))
    out = dict(weight)
    for site in sites:
        j, q = pos[site.out_group], weight[site.name]
        out[site.name] = q.replace(d=jnp.where(active[j], step_from_bits(bits[j], q.q_m, q.t),
                                               q.d))
    return out, gamma


def geta(
    inner: optax.GradientTransformation,
    *,
    steps: int,
    sparsity: float | None = None,
    quant_lr: float = 1e-3,
    bit_reduction: float = 2.0,
    saliency_weights: Sequence[float] = (0.2,) * 5,
    schedule: GetaSchedule | None = None,
    cost_power: float = 0.0,
    allocation: str = "global",
    cooldown_clips: bool = False,
    unit_multiple: int = 1,
    saliency_rule: str = "jaxjpq",
    joint_rule: str = "reference",
    project_activations: bool = True,
) -> optax.GradientTransformation:
    """GETA (QASSO) over ``(params, compression_state)``.

    The bit range ``(b_l, b_u)`` and ``init_bits`` (start of the projection) come from the
    state's spec, the target sparsity from its ``budget["sparsity"]`` unless ``sparsity`` is given.

    Args:
      inner: optimizer of the model params (e.g. ``optax.sgd(0.1, momentum=0.9)``).
      steps: total number of updates; stages from ``schedule`` or :func:`make_schedule`.
      sparsity: fraction of the prunable units to remove, in [0, 1).
      quant_lr: SGD learning rate of the quantizer params (injectable with
        ``optax.inject_hyperparams``).
      bit_reduction: bits the upper limit drops per projection period. Where
        ``init_bits - bit_reduction · projection_periods > b_u`` (the defaults, 16 - 2·4 = 8, with
        ``b_u < 8``) the limit is still above ``b_u`` when the projection ends and drops to ``b_u``
        at once when the joint stage starts; ``bit_reduction = (init_bits - b_u) /
        projection_periods`` lowers it gradually all the way.
      saliency_weights: weights of :data:`SCORES`.
      schedule: stage lengths; default ``make_schedule(steps)`` (10 % warm-up, 10 % projection,
        20 % joint, 60 % cool-down).
      cost_power: ``p`` in ``saliency / relative_unit_MACs^p`` (:func:`unit_costs`); 0 (default,
        the paper's rule) selects by saliency alone, > 0 prefers pruning units that cost more
        MACs, so a sparsity target removes more BOPs.
      allocation: ``"global"`` (the paper's rule: the lowest-saliency units anywhere) or
        ``"per_group"`` (every group loses the same fraction, chosen by saliency within it, so the
        kept widths, and the BOPs at equal bits, match the staged baseline's).
      cooldown_clips: keep training the clips ``q_m`` (and ``t``) in cool-down, with ``d``
        following so that the rounded bits stay fixed (the shared QAT step); default False: the
        whole quantizer is frozen.
      unit_multiple: keep every group's kept width a multiple of this (e.g. 8 or 16 for
        accelerator kernels); the sparsity is then met to within the rounding.
      saliency_rule: ``"jaxjpq"`` (:func:`saliency`) or ``"reference"``
        (:func:`reference_saliency`, the reference implementation's scores; ``saliency_weights``
        then weigh :data:`REFERENCE_SCORES`).
      joint_rule: ``"reference"`` (default; :func:`joint_gamma_d`: descent-safe forget rate,
        and the weight step of a group with redundant units set toward ``d(b_l)``, the mechanism
        by which the reference lowers bits in the joint stage) or ``"plain"`` (forget rate
        ``1 / (P - k)``, ``d`` by projected SGD; bits then tend to end at ``b_u``).
      project_activations: project the activation quantizers' ``d`` onto the bit range too
        (default); False (the reference) keeps them within ``[b_l, 32]`` bits only until the
        cool-down, which rounds them into ``[b_l, b_u]``.

    Returns:
      A transform whose ``update(updates, state, params)`` takes gradient and parameter pairs
      ``(params_tree, CompressionState)`` and returns update pairs for ``optax.apply_updates``.
    """
    if sparsity is not None and not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"geta needs a target sparsity in [0, 1), got {sparsity}.")
    if allocation not in ("global", "per_group"):
        raise ValueError(f"allocation must be 'global' or 'per_group', got {allocation!r}.")
    if len(tuple(saliency_weights)) != len(SCORES):
        raise ValueError(f"saliency_weights needs {len(SCORES)} entries, one per {SCORES}.")
    if int(unit_multiple) < 1:
        raise ValueError(f"unit_multiple must be >= 1, got {unit_multiple}.")
    if saliency_rule not in SALIENCY_RULES:
        raise ValueError(f"saliency_rule must be one of {SALIENCY_RULES}, got {saliency_rule!r}.")
    if joint_rule not in JOINT_RULES:
        raise ValueError(f"joint_rule must be one of {JOINT_RULES}, got {joint_rule!r}.")
    sched = schedule or make_schedule(steps)
    if sched.steps != steps:
        raise ValueError(f"schedule.steps={sched.steps} differs from steps={steps}.")

    def config(c: CompressionState) -> tuple[float, float, float, float]:
        """(sparsity, b_l, b_u, start bits) from the state's spec (static)."""
        spec = c.spec
        if spec is None:
            raise ValueError("geta needs a state made by jaxjpq.init (it carries the spec).")
        target = spec.budget_for("sparsity") if sparsity is None else float(sparsity)
        if target is None or not 0.0 <= target < 1.0:
            raise ValueError(
                "geta needs a target sparsity in [0, 1): pass sparsity=... or "
                "CompressionSpec(budget={'sparsity': ...})."
            )
        b_lo, b_hi = spec.bits
        return target, b_lo, b_hi, max(float(spec.init_bits), b_hi)

    def units(c: CompressionState, model_params) -> UnitIndex:
        # Static metadata from leaf shapes: rebuilt at trace time, never at run time.
        return unit_index(c.graph, {"params": model_params})

    def init(model_params, cstate):
        target, *_ = config(cstate)
        if target > 0:
            core.require_prunable(cstate.graph, "geta")
        index = units(cstate, model_params)
        core.period_counts(index, target, sched.joint_periods)  # validates the target early
        u = index.num_units
        return GetaState(
            step=jnp.zeros((), jnp.int32),
            inner_state=inner.init(model_params),
            redundant=jnp.zeros((u,), bool),
            saliency=jnp.zeros((u,), jnp.float32),
        )

    def update(g_p, g_c, p, c, state):
        target, b_lo, b_hi, start_bits = config(c)
        # Upper bit limit of projection period p (0-based): init_bits - bit_reduction·p, floored.
        proj_upper = jnp.maximum(
            b_hi, start_bits - bit_reduction * jnp.arange(max(sched.projection_periods, 1))
        )
        index = units(c, p)
        counts = jnp.asarray(core.period_counts(index, target, sched.joint_periods), jnp.int32)
        g_counts = jnp.asarray(core.group_period_counts(index, target, sched.joint_periods,
                                                        unit_multiple), jnp.int32)
        s = state.step
        in_proj = (s >= sched.warmup) & (s < sched.projection_end)
        in_joint = (s >= sched.projection_end) & (s < sched.joint_end)
        cooldown = s >= sched.joint_end
        period = jnp.clip((s - sched.projection_end) // sched.period_steps, 0,
                          sched.joint_periods - 1)
        k = (s - sched.projection_end) % sched.period_steps

        u_p, inner_state = inner.update(g_p, state.inner_state, p)

        mask_units = index.flat_masks(c.masks)
        pruned = ~kept(mask_units)
        # Q(x) at the current steps: the plain rule's shrink and the quantization-error score;
        # the reference rule shrinks by Q(x) at the steps it sets, so it quantizes here only
        # inside the selection branch
        q_now = (quantize_weights({"params": p}, c)["params"] if joint_rule == "plain"
                 else None)

        def choose(_):
            if saliency_rule == "reference":
                imp = reference_saliency(index, p, g_p, ~pruned, saliency_weights)
            else:
                qp = q_now if q_now is not None else quantize_weights({"params": p}, c)["params"]
                imp = saliency(index, p, g_p, qp, ~pruned, saliency_weights)
            # x**0 == 1 exactly, so the default keeps the paper's rule; traced under
            # inject_hyperparams, hence no Python branch.
            imp = imp / jnp.asarray(unit_costs(c.graph, index), jnp.float32) ** cost_power
            if allocation == "per_group":
                return core.select_per_group(index, imp, pruned, g_counts[period]), imp
            return core.select_units(index, imp, pruned, counts[period], unit_multiple), imp

        redundant, imp = jax.lax.cond(
            in_joint & (k == 0), choose, lambda _: (state.redundant, state.saliency), None
        )
        b_upper = jnp.where(
            s < sched.warmup,
            start_bits,
            jnp.where(in_proj, proj_upper[jnp.clip((s - sched.warmup) // sched.projection_steps,
                                                   0, proj_upper.shape[0] - 1)], b_hi),
        )
        lr = jnp.asarray(quant_lr, jnp.float32)
        w_signed, a_signed = core.signedness(c)

        def quant(table, grads, signed, project=True):
            hi = b_upper if project else jnp.float32(32.0)
            train = _sgd_projected(table, grads, signed, c.frozen, lr, b_lo, hi)
            cool = core.fixed_bits_step(table, grads, signed, c.frozen, lr=lr, b_lo=b_lo,
                                        b_hi=b_hi, train_clips=cooldown_clips, train_t=True)
            return jax.tree.map(lambda a, b: jnp.where(cooldown, a, b), cool, train)

        weight = quant(c.weight, g_c.weight, w_signed)
        group_gamma = jnp.full((index.num_groups,), 1.0, jnp.float32) / (
            sched.period_steps - k).astype(jnp.float32)
        if joint_rule == "reference":
            def joint_step(_):
                w, gam = weight, group_gamma
                if index.num_groups:
                    w, gam = _reference_joint(index, c, weight, p, u_p, redundant, k,
                                              sched.period_steps, b_lo, b_hi, in_joint)
                return w, gam, quantize_weights({"params": p}, c.replace(weight=w))["params"]

            # outside the joint stage nothing is shrunk: skip the rule's reductions there
            weight, group_gamma, q_now = jax.lax.cond(
                in_joint, joint_step,
                lambda _: (weight, group_gamma, _zeros_as_dicts(p)), None)
        gamma_units = jnp.where(in_joint, group_gamma[jnp.asarray(index.group_of_unit)], 0.0)
        shrink = unit_broadcast(index, redundant.astype(jnp.float32) * gamma_units, p)
        u_p = jax.tree.map(lambda u, q, r: u - r * q, u_p, q_now, shrink)
        period_end = in_joint & (k == sched.period_steps - 1)
        pruned_new = pruned | (redundant & period_end)
        u_p = core.hold(index, u_p, p, pruned_new, c)
        new_masks = index.split(jnp.where(pruned_new, 0.0, mask_units))

        c_new = c.replace(
            weight=weight,
            act=quant(c.act, g_c.act, a_signed, project_activations),
            masks=new_masks,
        )
        new_state = GetaState(
            step=s + 1,
            inner_state=inner_state,
            redundant=redundant & ~period_end,
            saliency=imp,
        )
        return u_p, c_new, new_state

    return core.pair_transform("geta", init, update)
