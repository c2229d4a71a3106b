"""The learnable symmetric quantizer ``Q(x; d, q_m, t)`` and its bit-width algebra.

    Q(x) = sign(x) · d · round(min(|x|, q_m)^t / d)              (signed, weights)
    Q(x) =           d · round(min(max(x, 0), q_m)^t / d)         (unsigned, post-ReLU activations)
    b(d, q_m, t) = log2(q_m^t / d + 1) + 1   signed,   log2(q_m^t / d + 1)   unsigned
    d(b)         = q_m^t / (2^(b-1) - 1)     signed,   q_m^t / (2^b - 1)     unsigned

Gradients (``jax.custom_vjp``) treat ``round`` as the identity (straight-through):
``dQ/dx = t·|x|^(t-1)`` inside the clip and 0 outside; ``dQ/dd = sign(x)·(round(y/d) - y/d)`` with
``y = min(|x|, q_m)^t``; ``dQ/dq_m = sign(x)·t·q_m^(t-1)`` outside the clip and 0 inside;
``dQ/dt = sign(x)·y·log(min(|x|, q_m))``.

All functions are pure and jit-compatible. Quantizer parameters broadcast against ``x``; use
:func:`channel_shape` / :func:`broadcast_params` for per-channel parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS = 1.0
MAX_BITS = 32.0
POW2_BITS = (2.0, 4.0, 8.0)


@flax.struct.dataclass
class QuantParams:
    """Parameters of one quantizer.

    Attributes:
      d: step size, ``> 0``; scalar (per-tensor) or one entry per channel.
      q_m: clip value, ``> 0``; same shape as ``d``.
      t: exponent, ``> 0``; same shape as ``d`` (1 = plain uniform quantizer).
    """

    d: jax.Array
    q_m: jax.Array
    t: jax.Array


def check_bits(bits: float | Sequence[float], name: str = "bits") -> None:
    """Raise ``ValueError`` unless every bit width lies in ``[1, 32]`` (Python values only)."""
    arr = np.asarray(bits, dtype=np.float64)
    if arr.size and (not np.all(np.isfinite(arr)) or arr.min() < MIN_BITS or arr.max() > MAX_BITS):
        raise ValueError(
            f"{name}={bits!r} is outside [{MIN_BITS:g}, {MAX_BITS:g}]; choose bit widths in that "
            "range (e.g. 2, 4 or 8)."
        )


def _levels(bits: jax.Array, signed: bool) -> jax.Array:
    """Largest code magnitude ``2^(b-1) - 1`` (signed) or ``2^b - 1`` (unsigned)."""
    return 2.0 ** (bits - 1.0) - 1.0 if signed else 2.0**bits - 1.0


def step_from_bits(
    bits: jax.Array | float, q_m: jax.Array, t: jax.Array | float = 1.0, signed: bool = True
) -> jax.Array:
    """Step ``d(b) = q_m^t / (2^(b-1) - 1)`` (signed) or ``q_m^t / (2^b - 1)`` (unsigned).

    Signed quantizers need ``b > 1`` (one bit is the sign); shapes broadcast.
    """
    bits = jnp.asarray(bits, jnp.float32)
    return jnp.power(q_m, t) / _levels(bits, signed)


def bits_from_step(
    d: jax.Array, q_m: jax.Array, t: jax.Array | float = 1.0, signed: bool = True
) -> jax.Array:
    """Continuous bit width ``log2(q_m^t / d + 1) (+ 1 if signed)``; differentiable, broadcasts."""
    b = jnp.log2(jnp.power(q_m, t) / d + 1.0)
    return b + 1.0 if signed else b


def params_bits(p: QuantParams, signed: bool = True) -> jax.Array:
    """Continuous bit width of a quantizer, shaped like ``p.d``."""
    return bits_from_step(p.d, p.q_m, p.t, signed)


def round_bits_pow2(bits: jax.Array) -> jax.Array:
    """Round bit widths to the nearest of {2, 4, 8} forward, identity gradient backward.

    Thresholds are the midpoints 3 and 6; ties go up (within 1e-4, absorbing float error).
    """
    return bits + jax.lax.stop_gradient(pow2_bits_hard(bits, jnp) - bits)


def pow2_bits_hard(bits, xp=jnp):
    """Nearest of {2, 4, 8} (no gradient); ``xp`` is ``jnp`` or ``numpy``."""
    return xp.where(bits < 3.0 - 1e-4, 2.0, xp.where(bits < 6.0 - 1e-4, 4.0, 8.0))


def round_bits(bits: jax.Array) -> jax.Array:
    """Round bit widths to integers forward, identity gradient backward."""
    return bits + jax.lax.stop_gradient(jnp.round(bits) - bits)


def clip_sgd_step(q_m: jax.Array, grad: jax.Array, lr: jax.Array | float,
                  min_factor: float = 0.5) -> jax.Array:
    """SGD step on a clip ``q_m`` that at most scales it by ``min_factor`` (shape of ``q_m``).

    A per-tensor clip's gradient sums over every weight of its layer, so ``lr · g`` can exceed
    ``q_m``; an absolute floor would then collapse the clip far below every weight, after which
    the quantizer params diverge and the forward pass overflows.
    """
    return jnp.maximum(q_m - lr * grad, min_factor * q_m)


def effective_params(
    p: QuantParams, signed: bool = True, power_of_two: bool = False
) -> QuantParams:
    """The parameters the forward pass uses: with ``power_of_two``, ``d = d(round_pow2(b))``.

    Gradients reach ``d`` through the straight-through bit rounding.
    """
    if not power_of_two:
        return p
    b = round_bits_pow2(params_bits(p, signed))
    return p.replace(d=step_from_bits(b, p.q_m, p.t, signed))


def _fwd_parts(x, d, q_m, t, signed):
    """(|x| or max(x, 0), sign, m = clipped magnitude, log m (0 at m = 0), y = m^t, round(y/d)).

    ``t=None`` means ``t = 1`` statically (no log/exp)."""
    ax = jnp.abs(x) if signed else jnp.maximum(x, 0.0)
    s = jnp.sign(x) if signed else (x > 0).astype(x.dtype)
    m = jnp.minimum(ax, q_m)
    if t is None:
        return ax, s, m, None, m, jnp.round(m / d)
    pos = m > 0
    lm = jnp.log(jnp.where(pos, m, 1.0))
    y = jnp.where(pos, jnp.exp(t * lm), 0.0)
    return ax, s, m, lm, y, jnp.round(y / d)


def clipped_residual(x: jax.Array, d: jax.Array, q_m: jax.Array, t: jax.Array,
                     signed: bool = True) -> tuple[jax.Array, jax.Array]:
    """``(x_c, r)`` shaped like ``x``: the clipped, powered value ``x_c = sign(x) · min(|x|,
    q_m)^t`` and the rounding residual in steps ``r = sign(x) · (round(|x_c| / d) − |x_c| / d)``
    (the parameters broadcast against ``x``)."""
    _, s, _, _, y, r = _fwd_parts(x, d, q_m, t, signed)
    return s * y, s * (r - y / d)


def _clip(x, q_m, signed):
    """x clipped to [-q_m, q_m] (signed) or [0, q_m]: sign(x) · min(|x|, q_m) (or its 0 floor)."""
    return jnp.clip(x, -q_m if signed else 0.0, q_m)


def _quantize_impl(x, d, q_m, t, signed):
    if t is None:
        # = sign(x) · d · round(min(|x|, q_m) / d): round is odd, so the clip carries the sign
        return d * jnp.round(_clip(x, q_m, signed) / d)
    _, s, _, _, _, r = _fwd_parts(x, d, q_m, t, signed)
    return s * d * r


def _grad_sums(g: jax.Array, *terms: jax.Array) -> list:
    """``[Σ g · term]``, one reduction per term."""
    return [jnp.sum(g * t) for t in terms]


def _grad_sums_stacked(g: jax.Array, *terms: jax.Array) -> list:
    """:func:`_grad_sums` as one pass: the products materialized as one stack, reduced at once.

    XLA:CPU emits a reduction with fused elementwise producers as a slow kernel, one per term;
    this form costs a fraction of that there (``experiments.bench_overhead``, ViT-tiny).
    """
    prods = jax.lax.optimization_barrier(jnp.stack([g * t for t in terms]))
    return list(jnp.sum(prods.reshape(len(terms), -1), axis=1))


def _param_grads(g: jax.Array, terms: Sequence[jax.Array], shapes: Sequence[tuple]) -> list:
    """``Σ g · term`` reduced to each quantizer parameter's shape (numpy broadcasting rules)."""
    if any(tuple(s) != () for s in shapes):
        return [_sum_to(g * t, s) for t, s in zip(terms, shapes, strict=True)]
    return jax.lax.platform_dependent(g, *terms, cpu=_grad_sums_stacked, default=_grad_sums)


def _make_quantizer(signed: bool, with_t: bool, remat: bool = False):
    """A ``custom_vjp`` quantizer ``f(x, d, q_m[, t])`` with straight-through rounding.

    With ``t``, the backward needs ``m^t`` and ``log m``: ``remat=False`` keeps them from the
    forward, ``remat=True`` recomputes them from ``x`` (one ``log`` and one ``exp`` more per
    element, two arrays fewer held from the forward to the backward).
    """

    def fwd(x, d, q_m, *t):
        if not with_t:
            return _quantize_impl(x, d, q_m, None, signed), (x, d, q_m)
        _, s, _, lm, y, r = _fwd_parts(x, d, q_m, t[0], signed)
        if remat:
            return s * d * r, (x, d, q_m, t[0])
        return s * d * r, (x, d, q_m, t[0], y, lm)

    def bwd(res, g):
        x, d, q_m, *rest = res
        # The barriers keep XLA from merging the backward's elementwise terms with the forward's
        # (common subexpressions): merged, they are written to memory once more to serve both.
        if not with_t:
            x = jax.lax.optimization_barrier(x)
        elif remat:
            tt, x = rest[0], jax.lax.optimization_barrier(x)
            _, _, _, lm, y, _ = _fwd_parts(x, d, q_m, tt, signed)
        else:
            tt, y, lm = rest
            x, y, lm = jax.lax.optimization_barrier((x, y, lm))
        ax = jnp.abs(x) if signed else jnp.maximum(x, 0.0)
        inside = ax < q_m
        if signed:
            s = jnp.sign(x)
        else:
            s = (x > 0).astype(x.dtype)
            inside = inside & (x >= 0)  # no slope below the unsigned range
        if not with_t:
            v = _clip(x, q_m, signed) / d
            terms = [jnp.round(v) - v, jnp.where(inside, 0.0, s)]
            return (jnp.where(inside, g, 0.0),
                    *_param_grads(g, terms, (jnp.shape(d), jnp.shape(q_m))))
        m = jnp.minimum(ax, q_m)
        pos = m > 0
        safe_m = jnp.where(pos, m, 1.0)
        # d(m^t)/dm = t m^(t-1) = t y / m; at m = 0 only t == 1 gives a finite (unit) slope
        slope = jnp.where(pos, tt * y / safe_m, (tt == 1.0).astype(x.dtype))
        v = y / d
        terms = [s * (jnp.round(v) - v),
                 jnp.where(inside, 0.0, s * tt * jnp.power(q_m, tt - 1.0)),
                 jnp.where(pos, s * y * lm, 0.0)]
        return (jnp.where(inside, g * slope, 0.0),
                *_param_grads(g, terms, (jnp.shape(d), jnp.shape(q_m), jnp.shape(tt))))

    if with_t:
        f = jax.custom_vjp(lambda x, d, q_m, t: _quantize_impl(x, d, q_m, t, signed))
    else:
        f = jax.custom_vjp(lambda x, d, q_m: _quantize_impl(x, d, q_m, None, signed))
    f.defvjp(fwd, bwd)
    return f


def _sum_to(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Reduce a broadcast gradient back to ``shape`` (numpy broadcasting rules)."""
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    return jnp.sum(g, axis=axes).reshape(shape)


_QUANTIZERS = {
    (signed, with_t, remat): _make_quantizer(signed, with_t, remat)
    for signed in (True, False)
    for with_t in (True, False)
    for remat in ((False, True) if with_t else (False,))
}


def quantize(
    x: jax.Array,
    d: jax.Array | float,
    q_m: jax.Array | float,
    t: jax.Array | float | None = 1.0,
    signed: bool = True,
    remat: bool = False,
) -> jax.Array:
    """Fake-quantize ``x`` (any shape) with step ``d``, clip ``q_m``, exponent ``t``.

    ``d``, ``q_m``, ``t`` broadcast against ``x`` (numpy rules). Gradients flow to all four
    arguments (straight-through rounding, see module docstring). ``t=None`` is the cheaper
    ``t = 1`` quantizer without exponent (no log/exp). ``remat=True`` recomputes ``|x|^t`` and
    ``log|x|`` in the backward instead of keeping them from the forward (same values; a speed
    choice). Output has ``x``'s shape and dtype.
    """
    x = jnp.asarray(x)
    dt = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    x = x.astype(dt)
    d, q_m = jnp.asarray(d, dt), jnp.asarray(q_m, dt)
    if t is None:
        return _QUANTIZERS[(signed, False, False)](x, d, q_m)
    return _QUANTIZERS[(signed, True, remat)](x, d, q_m, jnp.asarray(t, dt))


def quantize_with(
    x: jax.Array,
    p: QuantParams,
    signed: bool = True,
    power_of_two: bool = False,
    learn_t: bool = True,
    remat: bool = False,
) -> jax.Array:
    """:func:`quantize` with a :class:`QuantParams` already shaped to broadcast against ``x``.

    ``learn_t=False`` uses the exponent-free quantizer (``p.t`` is ignored, i.e. taken as 1).
    """
    if not learn_t:
        p = p.replace(t=jnp.ones_like(p.t))
    p = effective_params(p, signed, power_of_two)
    return quantize(x, p.d, p.q_m, p.t if learn_t else None, signed, remat)


THRESHOLD_LEVELS = 15
"""Most codes per sign that :func:`code_thresholds` serves (one comparison per code and element;
beyond about this many, the log and exp of :func:`quantize` cost less)."""


@flax.struct.dataclass
class CodeThresholds:
    """A fixed quantizer as the magnitudes where its code steps up (see :func:`code_thresholds`).

    Attributes:
      d: step, shaped like the quantizer's ``d`` (with ``power_of_two`` already applied).
      thr: ``d``'s shape + ``[L]``: ``thr[..., k-1] = ((k - 1/2) · d)^(1/t)``, the least
        magnitude of code ``k`` (``+inf`` pads entries beyond a quantizer's own top code).
    """

    d: jax.Array
    thr: jax.Array


def top_code(p: QuantParams, signed: bool = True, power_of_two: bool = False) -> int:
    """The largest code magnitude ``round(q_m^t / d)`` of a quantizer with concrete parameters
    (host values, float64 math; the largest over per-channel entries)."""
    return int(np.max(_tops(effective_params(p, signed, power_of_two))))


def _tops(e: QuantParams) -> np.ndarray:
    """``round(q_m^t / d)`` per entry of effective parameters ``e``, in float64."""
    d, q_m, t = (np.asarray(a, np.float64) for a in (e.d, e.q_m, e.t))
    return np.round(q_m**t / d)


def code_thresholds(p: QuantParams, signed: bool = True, power_of_two: bool = False,
                    levels: int | None = None) -> CodeThresholds | None:
    """The thresholds of a quantizer with concrete parameters (host values, float64 math), or
    None where its top code ``round(q_m^t / d)`` exceeds :data:`THRESHOLD_LEVELS`.

    ``round(min(m, q_m)^t / d) = #{k : m >= thr_k}`` for a magnitude ``m``: the code counts the
    thresholds it reaches, without the log and exp per element. ``levels`` pads ``thr`` to that
    length (layers of a stack share one shape)."""
    e = effective_params(p, signed, power_of_two)
    tops = _tops(e)
    top = int(np.max(tops))
    n = levels if levels is not None else top
    if top > THRESHOLD_LEVELS or n < top:
        return None
    k = np.arange(1, n + 1, dtype=np.float64)
    d, t = (np.asarray(a, np.float64)[..., None] for a in (e.d, e.t))
    thr = np.where(k <= tops[..., None], ((k - 0.5) * d) ** (1.0 / t), np.inf)
    return CodeThresholds(d=jnp.asarray(e.d, jnp.float32), thr=jnp.asarray(thr, jnp.float32))


def quantize_by_thresholds(x: jax.Array, c: CodeThresholds, signed: bool = True) -> jax.Array:
    """``Q(x)`` of the quantizer ``c`` was made from (:func:`code_thresholds`): ``sign(x) · d ·
    code`` (unsigned: ``d · code``, 0 below 0), shaped like ``x``; NaN stays NaN. Forward only
    (no gradient); equal to :func:`quantize` except where ``m^t / d`` lies within float rounding
    of a half-integer. Output dtype: ``x``'s if floating, else float32."""
    x = jnp.asarray(x)
    dt = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    x = x.astype(dt)
    m = jnp.abs(x) if signed else x
    code = jnp.zeros(x.shape, jnp.float32)
    for k in range(c.thr.shape[-1]):  # static: one comparison per code
        code = code + (m >= c.thr[..., k]).astype(jnp.float32)
    y = ((jnp.sign(x) if signed else 1.0) * c.d * code).astype(dt)
    return jnp.where(jnp.isnan(x), x, y)


def channel_shape(shape: Sequence[int], axes: Iterable[int]) -> tuple[int, ...]:
    """Shape of per-channel parameters for a tensor of ``shape`` with channel ``axes``."""
    return tuple(int(shape[a]) for a in sorted(axes))


def broadcast_params(p: QuantParams, ndim: int, axes: Iterable[int]) -> QuantParams:
    """Reshape per-channel params (``channel_shape``) to broadcast over an ``ndim``-d tensor.

    Scalars pass through unchanged.
    """
    axes = sorted(axes)

    def one(a):
        a = jnp.asarray(a)
        if a.ndim == 0:
            return a
        if a.ndim != len(axes):
            raise ValueError(
                f"per-channel quantizer parameters of shape {a.shape} do not match channel axes "
                f"{axes}; re-initialise the state for this graph (jaxjpq.init)."
            )
        new = [1] * ndim
        for ax, n in zip(axes, a.shape, strict=True):
            new[ax] = n
        return a.reshape(new)

    return jax.tree.map(one, p)


def init_from_tensor(
    x: jax.Array,
    bits: float = 16.0,
    channel_axes: Sequence[int] | None = None,
    signed: bool = True,
) -> QuantParams:
    """Initialise ``q_m = max|x|`` (per tensor, or per channel over ``channel_axes``),
    ``d = d(bits)``, ``t = 1``.

    Returns params shaped ``()`` or ``channel_shape(x.shape, channel_axes)``. All-zero channels get
    ``q_m = 1`` so that ``d > 0``.
    """
    check_bits(bits)
    if signed and bits <= 1:
        raise ValueError("a signed quantizer needs more than 1 bit (one bit is the sign).")
    x = jnp.asarray(x, jnp.float32)
    mag = jnp.abs(x) if signed else jnp.maximum(x, 0.0)
    if channel_axes is None or len(channel_axes) == 0:
        q_m = jnp.max(mag)
    else:
        red = tuple(a for a in range(x.ndim) if a not in {a % x.ndim for a in channel_axes})
        q_m = jnp.max(mag, axis=red)
    q_m = jnp.where(q_m > 0, q_m, 1.0)
    t = jnp.ones_like(q_m)
    return QuantParams(d=step_from_bits(bits, q_m, t, signed), q_m=q_m, t=t)


def init_from_batches(
    batches: Iterable[jax.Array],
    bits: float = 16.0,
    signed: bool = False,
    percentile: float = 100.0,
) -> QuantParams:
    """Per-tensor activation quantizer from calibration batches.

    ``q_m`` = the mean over batches of each batch's ``percentile`` of ``|x|`` (signed) or
    ``max(x, 0)`` (unsigned); ``d = d(bits)``, ``t = 1``. Scalars.
    """
    check_bits(bits)
    vals = []
    for x in batches:
        x = jnp.asarray(x, jnp.float32)
        mag = jnp.abs(x) if signed else jnp.maximum(x, 0.0)
        vals.append(jnp.percentile(mag, percentile) if percentile < 100 else jnp.max(mag))
    if not vals:
        raise ValueError("init_from_batches got no batches; pass at least one calibration batch.")
    q_m = jnp.mean(jnp.stack(vals))
    q_m = jnp.where(q_m > 0, q_m, 1.0)
    t = jnp.ones_like(q_m)
    return QuantParams(d=step_from_bits(bits, q_m, t, signed), q_m=q_m, t=t)


def codes(
    x: jax.Array, p: QuantParams, signed: bool = True, power_of_two: bool = False
) -> jax.Array:
    """Integer codes ``sign(x)·round(min(|x|, q_m)^t / d)`` as int32, shaped like ``x``.

    ``p`` must broadcast against ``x``. ``quantize_with(x, p) == p.d * codes(x, p)``.
    """
    p = effective_params(p, signed, power_of_two)
    x = jnp.asarray(x, jnp.float32)
    _, s, _, _, _, r = _fwd_parts(x, p.d, p.q_m, p.t, signed)
    return (s * r).astype(jnp.int32)


def storage_bits(bits: jax.Array) -> jax.Array:
    """Integer storage width ``ceil(b)`` of a continuous bit width (a 1e-4 tolerance absorbs
    float error, so ``storage_bits(bits_from_step(step_from_bits(4, ...))) == 4``)."""
    return jnp.ceil(jnp.asarray(bits) - 1e-4)
