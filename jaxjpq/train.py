"""Baseline training: a pytree ``TrainState``, a jitted pure ``train_step``, evaluation,
orbax checkpoints with exact resume, and a loop with a progress bar and JSON results.

The model enters through a ``Forward`` function, so any apply function (plain Flax, or a
compressed forward that takes ``(params, compression_state)`` as its params) trains the same way:

    forward(params, model_state, inputs, rng, train) -> (logits, new_model_state)

``flax_forward(module.apply)`` builds one for a Flax module, handling mutable collections such as
``batch_stats`` and the ``dropout`` rng. The loss is a parameter too:
``loss_fn(logits, labels) -> scalar`` (mean over the batch).
"""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from jax.sharding import Mesh

from jaxjpq.checkpoints import (  # noqa: F401 (the loop's checkpoint API, re-exported)
    CheckpointWriteError,
    CorruptCheckpointError,
    check_writable,
    checkpoint_manager,
    first_line,
    restore_checkpoint,
    save_checkpoint,
    tree_checksums,
    write_error,
)
from jaxjpq.forward import (  # noqa: F401 (re-exported)
    CompressedForward,
    FlaxForward,
    Forward,
    call_options,
    cross_entropy,
    flax_forward,
    output_logits,
)
from jaxjpq.sharding import (  # noqa: F401 (re-exported)
    data_mesh,
    host_value,
    local_devices,
    replicate,
    shard_batch,
)

PyTree = Any
Batch = Mapping[str, Any]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or parameters; checkpoints of the states that produced
    it were removed, so the latest kept one had a finite loss."""


class TrainingInterrupted(SystemExit):
    """SIGTERM / SIGINT during :func:`train`: the current step was checkpointed (when a manager
    was given) and training stopped. Exit status 128 + the signal number."""


class _Signals:
    """Turns SIGTERM / SIGINT into a flag the train loop reads between steps (main thread only;
    elsewhere signals keep their handlers)."""

    def __init__(self):
        self.caught: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.caught = signum

    def __exit__(self, *exc):
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _check_inputs(batch: Batch, step: int, what: str = "the batch of step") -> None:
    """Raise ``ValueError`` naming the step when a floating-point input holds NaN/inf."""
    x = batch.get("inputs") if isinstance(batch, Mapping) else None
    if x is None:
        return
    x = np.asarray(x)
    # jnp.issubdtype knows the ml_dtypes floats (bfloat16, float8), np.issubdtype does not
    if jnp.issubdtype(x.dtype, jnp.floating) and not np.isfinite(x).all():
        bad = int(np.sum(~np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)))
        raise ValueError(
            f"{what} {step} has NaN/inf inputs ({bad} of {x.shape[0]} examples); "
            "check the data pipeline (a non-finite input would be quantized to a finite code "
            "and train silently)."
        )


@struct.dataclass
class TrainState:
    """Everything that changes during training (pytree) plus the static functions.

    Attributes:
      step: int32 scalar, number of updates applied.
      params: trainable pytree.
      opt_state: optax state of ``tx``.
      model_state: non-trainable collections (e.g. ``{"batch_stats": ...}``), maybe ``{}``.
      rng: uint32 [2] PRNG key; per-step keys are ``fold_in(rng, step)``.
      forward, tx, loss_fn, penalty_fn, logits_fn: static (not traced, not checkpointed).
        ``penalty_fn(params) -> scalar`` (optional) is added to the loss, e.g. a sparsity or
        BOPs term of a compression method. ``loss_fn`` takes the model's output as it is;
        ``logits_fn(output) -> logits [B, K]`` picks the class logits that accuracy,
        :func:`evaluate` and the default ``cross_entropy`` read (default
        :func:`output_logits`).
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    model_state: PyTree
    rng: jax.Array
    forward: Forward = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    loss_fn: LossFn = struct.field(pytree_node=False, default=cross_entropy)
    penalty_fn: Callable[[PyTree], jax.Array] | None = struct.field(
        pytree_node=False, default=None
    )
    logits_fn: Callable[[Any], jax.Array] | None = struct.field(pytree_node=False, default=None)


def _logits(state: TrainState, output: Any) -> jax.Array:
    return (state.logits_fn or output_logits)(output)


def create_train_state(
    forward: Forward,
    variables: Mapping[str, PyTree],
    tx: optax.GradientTransformation,
    *,
    rng: jax.Array | int = 0,
    loss_fn: LossFn = cross_entropy,
    penalty_fn: Callable[[PyTree], jax.Array] | None = None,
    logits_fn: Callable[[Any], jax.Array] | None = None,
) -> TrainState:
    """A fresh ``TrainState`` from initialised ``variables`` (must contain ``"params"``).

    A model whose output is not the logits array (a dict, a tuple) trains with a ``loss_fn``
    that reads that output; ``logits_fn`` picks the logits for accuracy and evaluation (default
    :func:`output_logits`: ``out["logits"]`` or ``out[0]``)."""
    if "params" not in variables:
        raise ValueError(
            f"variables must contain 'params', got keys {sorted(variables)}; pass the dict "
            "returned by model.init(...)."
        )
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        model_state=model_state,
        rng=key,
        forward=forward,
        tx=tx,
        loss_fn=loss_fn,
        penalty_fn=penalty_fn,
        logits_fn=logits_fn,
    )


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def _label_range(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """int32 ``[3]``: (min label, max label, classes) for integer class labels ``[B]`` against
    logits ``[B, K]``; ``(0, 0, 1)`` where the labels are not class indices of the logits."""
    labels = jnp.asarray(labels)
    if not (jnp.issubdtype(labels.dtype, jnp.integer) and jnp.ndim(logits) == labels.ndim + 1
            and labels.size):
        return jnp.asarray([0, 0, 1], jnp.int32)
    return jnp.stack([jnp.min(labels), jnp.max(labels),
                      jnp.asarray(jnp.shape(logits)[-1])]).astype(jnp.int32)


def _check_labels(label_range: Any, what: str) -> None:
    """Raise ``ValueError`` when a :func:`_label_range` (host values) leaves ``[0, classes)``."""
    lo, hi, k = (int(v) for v in np.asarray(label_range))
    if lo < 0 or hi >= k:
        raise ValueError(
            f"{what} has labels in [{lo}, {hi}], but the model outputs {k} classes: labels must "
            f"be integers in [0, {k}). Check the data's label encoding (or the model's number "
            "of classes).")


def _all_finite(tree: PyTree) -> jax.Array:
    """bool scalar: every floating leaf of ``tree`` is free of NaN/inf."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


@jax.jit
def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser update on ``batch`` (``inputs`` [B, ...], ``labels`` int [B]).

    Returns the new state and ``{"loss", "accuracy"}`` (plus ``"penalty"`` when the state has a
    ``penalty_fn``; ``loss`` includes it) measured on the pre-update params.
    """
    rng = jax.random.fold_in(state.rng, state.step)

    def loss(params):
        output, new_model_state = state.forward(
            params, state.model_state, batch["inputs"], rng, True
        )
        # the default loss reads the logits of any output; a loss of the user's, the output
        value = state.loss_fn(_logits(state, output) if state.loss_fn is cross_entropy
                              else output, batch["labels"])
        penalty = state.penalty_fn(params) if state.penalty_fn is not None else 0.0
        return value + penalty, (output, new_model_state, penalty)

    (value, (output, new_model_state, penalty)), grads = jax.value_and_grad(
        loss, has_aux=True
    )(state.params)
    logits = _logits(state, output)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        model_state=new_model_state,
    )
    metrics = {
        "loss": value,
        "accuracy": _accuracy(logits, batch["labels"]),
        "params_finite": _all_finite((new.params, new.model_state)),
        "label_range": _label_range(logits, batch["labels"]),
    }
    if state.penalty_fn is not None:
        metrics["penalty"] = penalty
    return new, metrics


_donated_step = jax.jit(train_step.__wrapped__, donate_argnums=0)


@jax.jit
def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Summed cross-entropy and correct count on ``batch``.

    ``batch["mask"]`` [B] is optional (1 = real example, 0 = padding).
    """
    output, _ = state.forward(
        state.params, state.model_state, batch["inputs"], state.rng, False
    )
    logits = _logits(state, output)
    labels = batch["labels"]
    mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32))
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
        "loss_sum": jnp.sum(per_example * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "count": jnp.sum(mask),
        # padding rows hold label 0, which is always in range
        "label_range": _label_range(logits, labels),
    }


def evaluate(state: TrainState, batches: Iterable[Batch], batch_size: int,
             mesh: Mesh | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy over all examples of ``batches``.

    Short batches are padded to ``batch_size`` (rounded up to a multiple of ``mesh``'s data
    axis, over which they are split) and masked, so ``eval_step`` compiles once.
    """
    if mesh is not None:  # per process: its share of batch_size, a multiple of its devices
        n_dev = local_devices(mesh)
        batch_size = -(-batch_size // (jax.process_count() * n_dev)) * n_dev
        state = replicate(state, mesh)
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for i, batch in enumerate(batches):
        _check_inputs(batch, i, "evaluation batch")
        n = len(batch["labels"])
        if n > batch_size:
            raise ValueError(f"evaluate got a batch of {n} > batch_size {batch_size}.")
        pad = batch_size - n
        padded = {
            k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) if pad else v
            for k, v in batch.items()
        }
        padded["mask"] = (np.arange(batch_size) < n).astype(np.float32)
        if mesh is not None:
            padded = shard_batch(padded, mesh)
        out = host_value(eval_step(state, padded))
        _check_labels(out["label_range"], f"evaluation batch {i}")
        for k in totals:
            totals[k] += float(out[k])
    if totals["count"] == 0:
        raise ValueError("evaluate got no examples.")
    return {
        "loss": totals["loss_sum"] / totals["count"],
        "accuracy": totals["correct"] / totals["count"],
        "count": int(totals["count"]),
    }


# --------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------


def _device_feed(batches: Iterator[Batch], start: int, num_steps: int, mesh: Mesh | None,
                 depth: int) -> Iterator[Batch]:
    """The batches of steps ``start .. num_steps - 1``, checked and put on the devices (split
    over ``mesh``'s data axis) ``depth`` steps ahead of their use; an iterator that runs out or
    a non-finite input raises at the step it concerns, not when it is read."""
    queue: collections.deque = collections.deque()
    nxt = start

    def pull() -> Any:
        nonlocal nxt
        step, nxt = nxt, nxt + 1
        try:
            batch = next(batches)
        except StopIteration:
            return ValueError(f"batches ran out at step {step} before num_steps={num_steps}; "
                              "use an endless iterator such as data.batch_stream.")
        try:
            _check_inputs(batch, step)
        except ValueError as e:
            return e
        return shard_batch(batch, mesh) if mesh is not None else jax.device_put(dict(batch))

    for _ in range(start, num_steps):
        while nxt < num_steps and len(queue) <= depth and not (
                queue and isinstance(queue[-1], Exception)):
            queue.append(pull())
        item = queue.popleft()
        if isinstance(item, Exception):
            raise item
        yield item


def train(
    state: TrainState,
    batches: Iterator[Batch],
    num_steps: int,
    *,
    manager: ocp.CheckpointManager | None = None,
    checkpoint_every: int = 0,
    extra: PyTree = None,
    log_every: int = 50,
    progress: bool = True,
    metrics_fn: Callable[[TrainState], Mapping[str, Any]] | None = None,
    mesh: Mesh | None = None,
    sync_every: int | None = None,
    prefetch: int = 2,
) -> tuple[TrainState, dict[str, Any]]:
    """Runs ``train_step`` until ``state.step == num_steps``, consuming one batch per step.

    With ``mesh`` (e.g. :func:`data_mesh`), data parallel: the state is replicated on its
    devices and each batch split over its ``"data"`` axis; XLA all-reduces the gradients inside
    the one jitted step, whose state buffers are donated.

    ``batches`` must start at ``state.step`` (see ``data.batch_stream(start_step=...)``); they
    are checked for NaN/inf and put on the devices ``prefetch`` steps ahead. The host waits for
    the devices only every ``sync_every`` steps (default ``log_every``), before each checkpoint
    and at the end: it then reads the window's losses, so a non-finite loss still raises
    ``NonFiniteLossError`` naming its exact step, and no checkpoint of a state past it is kept
    (the last good one stays the latest). ``metrics_fn(state)`` adds figures (e.g. sparsity,
    mean bits, relative BOPs of a compression method) to the progress bar and the summary at
    each log. Returns ``(state, {"loss", "accuracy", ...})`` of the last ``log_every`` steps.
    """
    from tqdm.auto import tqdm

    start = int(state.step)
    if start > num_steps:
        raise ValueError(f"state is at step {start}, beyond num_steps={num_steps}.")
    if prefetch < 0:
        raise ValueError(f"prefetch={prefetch}: give 0 or more steps.")
    sync_every = max(1, int(sync_every or log_every or 1))
    log_every = max(1, int(log_every or 1))
    if manager is not None:
        check_writable(manager.directory)  # before any step: a read-only directory loses no work
    step_fn = train_step
    if mesh is not None:
        state = replicate(state, mesh)
        step_fn = _donated_step
    bar = tqdm(total=num_steps, initial=start, disable=not progress, desc="train", unit="step")
    pending: list[dict[str, jax.Array]] = []  # device metrics of the steps since the last sync
    window: list[dict[str, float]] = []
    summary: dict[str, Any] = {}

    def sync(state: TrainState, done: int) -> None:
        """Read the pending steps' metrics; raise at the first non-finite one."""
        if not pending:
            return
        first = done - len(pending)
        for i, m in enumerate(host_value(pending)):
            _check_labels(m.pop("label_range"), f"the batch of step {first + i}")
            loss, finite = float(m.pop("loss")), bool(m.pop("params_finite"))
            if not (math.isfinite(loss) and finite):
                _chained_check(state)
                _non_finite(manager, first + i, loss)
            window.append({**{k: float(v) for k, v in m.items()}, "loss": loss})
        pending.clear()

    with _Signals() as signals:
        try:
            feed = _device_feed(batches, start, num_steps, mesh, prefetch)
            for step in range(start, num_steps):
                if signals.caught is not None:
                    sync(state, step)
                    _interrupt(manager, state, extra, signals.caught)
                state, metrics = step_fn(state, next(feed))
                pending.append(metrics)
                done = step + 1
                save = manager is not None and checkpoint_every and done % checkpoint_every == 0
                log = done % log_every == 0 or done == num_steps
                if save or log or done % sync_every == 0:
                    sync(state, done)
                if log and window:
                    summary = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
                    if metrics_fn is not None:
                        summary.update({k: float(v) for k, v in metrics_fn(state).items()})
                    bar.set_postfix({k: f"{v:.4g}" for k, v in summary.items()})
                    window.clear()
                bar.update(1)
                if save:
                    save_checkpoint(manager, state, extra, wait=False)
            sync(state, num_steps)
            if signals.caught is not None:
                _interrupt(manager, state, extra, signals.caught)
            if manager is not None and manager.latest_step() != int(host_value(state.step)):
                save_checkpoint(manager, state, extra, wait=False)
            _warn_budget(state, num_steps)
        finally:
            bar.close()
            if manager is not None:
                try:
                    manager.wait_until_finished()
                except Exception as e:  # noqa: BLE001 - a failed background save
                    raise write_error(manager, "in flight", e) from e
    return state, summary


def _warn_budget(state: TrainState, num_steps: int) -> None:
    """Warn when a compressed run ends outside the budget its spec states."""
    import warnings

    shortfall = getattr(state.forward, "budget_shortfall", None)
    missed = shortfall(state.params) if shortfall is not None else None
    if missed:
        warnings.warn(
            f"after {num_steps} steps the compression state misses its budget: {missed}. The "
            "method's schedule did not run to its end (trained for fewer steps than its "
            "`steps`, or wrapped in optax.MultiSteps, which calls it once per k steps), or "
            "the method does not enforce this budget.", stacklevel=3)


def _interrupt(manager, state: TrainState, extra: PyTree, signum: int) -> None:
    import signal

    name = signal.Signals(signum).name
    step = int(host_value(state.step))
    where = "no checkpoint manager was given"
    if manager is not None:
        if manager.latest_step() != step:
            save_checkpoint(manager, state, extra, wait=True)
        where = f"checkpointed step {step} under {manager.directory}"
    raise TrainingInterrupted(f"{name} at step {step}: {where}; rerun the same "
                              f"command to resume.") from None


def _chained_check(state: TrainState) -> None:
    """Raise the error an optimizer state reports through the fault protocol: a node with a
    ``fault() -> Exception | None`` method (the pair methods' state reports a transform chained
    after it, :class:`jaxjpq.methods.core.ChainedTransformError`)."""
    for node in jax.tree.leaves(state.opt_state, is_leaf=_reports_fault):
        if _reports_fault(node):
            err = node.fault()
            if err is not None:
                raise err


def _reports_fault(x: Any) -> bool:
    return callable(getattr(type(x), "fault", None))


def _non_finite(manager, step: int, loss: float) -> None:
    """Remove the checkpoints of states that produce the non-finite value, then raise."""
    kept = "no checkpoint had been written"
    if manager is not None:
        manager.wait_until_finished()
        # the loss of step s is the loss of the state after s updates: that state is bad, and
        # so is the one the update of step s produced
        for s in sorted(manager.all_steps()):
            if s >= step:
                manager.delete(s)
        last = manager.latest_step()
        kept = (f"the latest kept checkpoint, step {last}, had a finite loss" if last is not None
                else "no earlier checkpoint was kept")
    if not math.isfinite(loss):
        what = (f"The loss became {loss} at step {step}: the parameters after {step} updates "
                "give a non-finite loss on this (finite) batch")
        advice = "Lower the learning rate or add gradient clipping (optax.clip_by_global_norm)."
    else:
        what = (f"The update of step {step} made the parameters (or model state) NaN/inf while "
                f"the loss was {loss}")
        advice = "Lower the learning rate, clip gradients, or check quantizer learning rates."
    raise NonFiniteLossError(f"{what}; training stopped and {kept}. {advice}")


def write_results(path: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Writes ``results`` as indented JSON (atomically); numpy/jax scalars become numbers."""

    def default(o):
        if isinstance(o, np.generic | jax.Array | np.ndarray):
            return np.asarray(o).tolist()
        if isinstance(o, Path):
            return os.fspath(o)
        raise TypeError(f"write_results cannot serialise {type(o).__name__}: {o!r}")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(dict(results), indent=2, sort_keys=True, default=default) + "\n")
    os.replace(tmp, path)
    return path

