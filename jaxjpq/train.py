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
import inspect
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
Batch = Mapping[str, Any]
Forward = Callable[[PyTree, PyTree, jax.Array, jax.Array, bool], tuple[jax.Array, PyTree]]
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


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of logits [B, K] against int labels [B]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def call_options(apply_fn: Callable[..., Any]) -> tuple[bool, bool]:
    """``(takes_train, takes_rngs)``: whether ``apply_fn`` (a linen ``module.apply`` or any
    function) accepts a ``train=`` keyword and an ``rngs=`` keyword."""
    owner = getattr(apply_fn, "__self__", None)
    try:
        import flax.linen as nn

        if isinstance(owner, nn.Module):  # linen apply: rngs/mutable are apply's own
            sig = inspect.signature(type(owner).__call__)
            params = sig.parameters.values()
            var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
            return ("train" in sig.parameters or var_kw), True
        sig = inspect.signature(apply_fn)
    except (TypeError, ValueError):
        return True, True
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    return ("train" in sig.parameters or var_kw), ("rngs" in sig.parameters or var_kw)


class FlaxForward:
    """``Forward`` for a Flax-style ``apply(variables, x, train=..., mutable=..., rngs=...)``.

    ``model_state`` holds the non-param collections (e.g. ``{"batch_stats": ...}``); in training
    they are passed as mutable and their updated values returned; ``rng`` feeds ``dropout``. A
    model whose ``__call__`` takes no ``train`` (or an apply without ``rngs``) is called without
    it; ``call_kwargs`` are passed on every call (static keyword arguments of the model). Two
    wrappers of equal modules' ``apply`` compare equal, so ``train_step`` compiles once per model
    configuration rather than once per ``TrainState``.
    """

    def __init__(self, apply_fn: Callable[..., Any], *, options: tuple[bool, bool] | None = None,
                 **call_kwargs: Any):
        self.apply_fn = apply_fn
        self.options = call_options(apply_fn) if options is None else options
        self.call_kwargs = call_kwargs

    def _key(self) -> Any:
        owner = getattr(self.apply_fn, "__self__", None)
        func = getattr(self.apply_fn, "__func__", None)
        fn_key: Any = self.apply_fn
        if owner is not None and func is not None:
            try:
                hash(owner)
                fn_key = (owner, func)
            except TypeError:
                pass
        return (fn_key, self.options, tuple(sorted(self.call_kwargs.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlaxForward) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(self, params, model_state, inputs, rng, train):
        variables = {"params": params, **model_state}
        takes_train, takes_rngs = self.options
        kwargs = dict(self.call_kwargs)
        if takes_train:
            kwargs["train"] = train
        if takes_rngs:
            kwargs["rngs"] = {"dropout": rng}
        if train and model_state:
            logits, new_state = self.apply_fn(variables, inputs, mutable=list(model_state),
                                              **kwargs)
            return logits, dict(new_state)
        return self.apply_fn(variables, inputs, **kwargs), model_state


class CompressedForward:
    """``Forward`` whose params are the pair ``(model_params, CompressionState)``.

    Runs the masked, fake-quantized forward of ``apply_fn`` (a Flax-style apply) for the graph
    of the pair's state; non-param collections and the dropout rng are handled as in
    :class:`FlaxForward`; VIB gates (DJPQ) are sampled in training only, from a key independent
    of dropout's. Equal when built from equal ``apply_fn``, so jitted steps are reused.
    ``TrainState.params`` is then the pair, so orbax checkpoints carry the model params, the
    optimizer state and the compression state together, and a resumed run continues exactly.
    """

    def __init__(self, apply_fn: Callable[..., Any], **call_kwargs: Any):
        from jaxjpq.compress import compress_apply

        self.apply_fn = apply_fn
        self.fn = compress_apply(apply_fn)
        self.options = call_options(apply_fn)
        self.call_kwargs = call_kwargs

    def _key(self) -> Any:
        return FlaxForward(self.apply_fn, **self.call_kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompressedForward) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(self, params, model_state, inputs, rng, train):
        model_params, cstate = params
        gate_key = jax.random.fold_in(rng, 0x6A7E) if (train and cstate.gates) else None

        def apply(variables, x, **kwargs):
            return self.fn(variables, cstate, x, gate_key=gate_key, **kwargs)

        fwd = FlaxForward(apply, options=self.options, **self.call_kwargs)
        return fwd(model_params, model_state, inputs, rng, train)

    def budget_shortfall(self, params: PyTree) -> str | None:
        """What of the budget in the compression state's spec the pair ``params`` misses, or
        None: sparsity below its target by more than the per-group rounding of units, relative
        BOPs or size above theirs (exact figures, :mod:`jaxjpq.cost`)."""
        from jaxjpq import cost

        c = host_value(params[1])
        spec = getattr(c, "spec", None)
        if spec is None or not spec.budget:
            return None
        groups = c.graph.prunable_groups
        figures = {
            "sparsity": lambda: float(cost.sparsity(c)),
            "bops": lambda: float(cost.relative_bops(c)),
            "size": lambda: float(cost.relative_size(c)),
        }
        misses = []
        for kind, target in spec.budget:
            got = figures[kind]()
            if kind == "sparsity":
                slack = (len(groups) + 0.5) / max(sum(g.size for g in groups), 1)
                missed = got < target - slack
            else:
                missed = got > target * (1 + 1e-6)
            if missed:
                misses.append(f"{kind} {got:.4g} against a budget of {target:.4g}")
        return "; ".join(misses) or None


def flax_forward(apply_fn: Callable[..., Any]) -> Forward:
    """Wraps a Flax ``module.apply`` as a ``Forward`` (see ``FlaxForward``)."""
    return FlaxForward(apply_fn)


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


def output_logits(output: Any) -> jax.Array:
    """The class logits in a model's output: the output itself when it is an array, its
    ``"logits"`` entry when it is a mapping, its first entry when it is a tuple or list;
    ``ValueError`` otherwise (give ``create_train_state(..., logits_fn=...)``)."""
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, tuple | list) and output:
        return output_logits(output[0])
    if hasattr(output, "shape") and not isinstance(output, Mapping):
        return output
    raise ValueError(
        f"cannot find class logits in a model output of type {type(output).__name__} "
        f"({jax.tree.structure(output)}); pass create_train_state(..., logits_fn=lambda out: "
        "...) returning the [B, K] logits.")


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


def data_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh ``("data",)`` over ``devices`` (default: every device of this process)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """A copy of ``tree`` on every device of ``mesh`` (replicated; never aliases ``tree``'s
    buffers, so donating the copy leaves ``tree`` valid). On several hosts each passes the same
    ``tree``."""
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() > 1:
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.array(x)), tree)
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=sharding)
    return copy(tree)


def host_value(tree: PyTree) -> PyTree:
    """``tree`` as numpy on this host; a replicated array spanning several hosts is read from
    this host's copy."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return x

    return jax.device_get(jax.tree.map(one, tree))


def _local_devices(mesh: Mesh) -> int:
    """How many of ``mesh``'s devices belong to this process."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
    """One global batch split along its leading axis over the ``"data"`` axis of ``mesh``,
    from this process's part ``batch`` (all of it on one host; on several, each host passes its
    own rows, e.g. from ``data.batches(shard=(jax.process_index(), jax.process_count()))``).
    The rows must divide evenly over this process's devices of the mesh."""
    local = _local_devices(mesh)
    sizes = {len(v) for v in batch.values()}
    if any(b % local for b in sizes):
        raise ValueError(f"a batch of {sorted(sizes)} examples does not split over the {local} "
                         "devices of the data axis; choose a batch size divisible by it.")
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def evaluate(state: TrainState, batches: Iterable[Batch], batch_size: int,
             mesh: Mesh | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy over all examples of ``batches``.

    Short batches are padded to ``batch_size`` (rounded up to a multiple of ``mesh``'s data
    axis, over which they are split) and masked, so ``eval_step`` compiles once.
    """
    if mesh is not None:  # per process: its share of batch_size, a multiple of its devices
        n_dev = _local_devices(mesh)
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
# Checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_manager(
    directory: str | os.PathLike, *, max_to_keep: int | None = 3
) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` rooted at ``directory`` (absolute path created as needed)."""
    path = Path(directory).expanduser().absolute()
    try:
        return ocp.CheckpointManager(
            path, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        )
    except OSError as e:
        raise CheckpointWriteError(
            f"cannot create the checkpoint directory {path}: {e.strerror or e}; make it "
            "writable or choose another directory.") from None


def _saved_tree(state: TrainState, extra: PyTree) -> dict[str, PyTree]:
    return {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "model_state": state.model_state,
        "rng": state.rng,
        "extra": extra if extra is not None else {},
    }


def tree_checksums(tree: PyTree) -> dict[str, str]:
    """``{leaf path: sha256 of its bytes}`` of a pytree of arrays (host copies)."""
    import hashlib

    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(host_value(tree)):
        a = np.asarray(x)
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


class CheckpointWriteError(OSError):
    """A checkpoint cannot be written (read-only or full disk); the older ones are intact."""


# Room asked for beyond a checkpoint's array bytes: orbax's metadata files and the checksums.
_CHECKPOINT_OVERHEAD = 1 << 20


def check_writable(directory: str | os.PathLike, need_bytes: int = 0) -> None:
    """Raise :class:`CheckpointWriteError` unless a file can be created in ``directory`` and
    its disk has ``need_bytes`` free."""
    import shutil
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.close(fd)
        os.remove(probe)
        free = shutil.disk_usage(directory).free
    except OSError as e:
        raise CheckpointWriteError(
            f"cannot write checkpoints to {directory}: {e.strerror or e}; make it writable or "
            "choose another directory.") from None
    if free < need_bytes:
        raise CheckpointWriteError(
            f"cannot write a checkpoint to {directory}: {free / 2**20:.1f} MiB free, a checkpoint "
            f"needs about {need_bytes / 2**20:.1f} MiB; free some space or choose another "
            "directory (earlier checkpoints are kept).")


def save_checkpoint(
    manager: ocp.CheckpointManager, state: TrainState, extra: PyTree = None, *, wait: bool = True
) -> int:
    """Saves params, optimizer state, model state, rng and ``extra`` at ``state.step``, with a
    sha256 per leaf that :func:`restore_checkpoint` verifies. Raises
    :class:`CheckpointWriteError` (one line: the step, the directory, the cause) when the
    directory cannot take it, checked before writing."""
    step = int(host_value(state.step))
    tree = _saved_tree(state, extra)
    nbytes = sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
    check_writable(manager.directory, nbytes + _CHECKPOINT_OVERHEAD)
    sums = tree_checksums(tree)
    try:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                   checksums=ocp.args.JsonSave(sums)), force=True)
        if wait:
            manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore write errors, reported in one line
        raise _write_error(manager, step, e) from e
    return step


def _write_error(manager: ocp.CheckpointManager, step: int | str, e: BaseException
                 ) -> CheckpointWriteError:
    if isinstance(e, CheckpointWriteError):
        return e
    first = _first_line(e, 300) or type(e).__name__
    return CheckpointWriteError(
        f"writing checkpoint step {step} to {manager.directory} failed: {first}; free some space "
        "or make the directory writable (earlier checkpoints are kept).")


class CorruptCheckpointError(ValueError):
    """No checkpoint step restores with matching checksums."""


def _first_line(e: BaseException, n: int) -> str:
    """The first line of ``e``'s message, at most ``n`` characters ("" for none)."""
    text = str(e).strip()
    return text.splitlines()[0][:n] if text else ""


def _set_aside(manager: ocp.CheckpointManager, step: int) -> Path | None:
    """Move step ``step``'s directory to ``<directory>.corrupt/<step>[-n]`` and reload the
    manager; None when it has no directory of its own."""
    root = Path(manager.directory)
    src = root / str(step)
    if not src.is_dir():
        return None
    dst_root = root.with_name(root.name + ".corrupt")
    dst_root.mkdir(parents=True, exist_ok=True)
    dst, n = dst_root / str(step), 0
    while dst.exists():
        n += 1
        dst = dst_root / f"{step}-{n}"
    src.rename(dst)
    manager.reload()
    return dst


def restore_checkpoint(
    manager: ocp.CheckpointManager,
    state: TrainState,
    extra: PyTree = None,
    *,
    step: int | None = None,
) -> tuple[TrainState, PyTree]:
    """Restores ``step`` (default: the newest step that verifies) into the structure of
    ``state`` / ``extra``.

    Every leaf is checked against the sha256 stored with it; without ``step``, a step that does
    not restore or verify is moved aside to ``<directory>.corrupt/<step>`` (with a warning naming
    it and why, nothing deleted) and the next older one is tried, so training resumes and can
    write that step again. Returns ``(state, extra)``; raises ``FileNotFoundError`` when there is
    no checkpoint and :class:`CorruptCheckpointError` when none verifies.
    """
    import warnings

    manager.wait_until_finished()
    steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {manager.directory}.")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saved_tree(state, extra))
    skipped = []
    for s in steps:
        try:
            got = manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), checksums=ocp.args.JsonRestore()))
            tree, sums = got["state"], dict(got["checksums"] or {})
            now = tree_checksums(tree)
            bad = sorted(k for k in now if sums.get(k) != now[k])
            if bad:
                raise CorruptCheckpointError(f"checksum mismatch in {', '.join(bad[:3])}")
        except Exception as e:  # noqa: BLE001 - any failure to read one step: try the next
            where = _set_aside(manager, s) if step is None else None
            skipped.append(f"step {s}: {type(e).__name__}: {_first_line(e, 200)}"
                           + (f" (moved to {where})" if where else ""))
            continue
        if skipped:
            warnings.warn(f"restored checkpoint step {s} of {manager.directory}; skipped "
                          + "; ".join(skipped), stacklevel=2)
        new = state.replace(
            step=tree["step"],
            params=tree["params"],
            opt_state=tree["opt_state"],
            model_state=tree["model_state"],
            rng=tree["rng"],
        )
        return new, (tree["extra"] if extra is not None else None)
    raise CorruptCheckpointError(
        f"no checkpoint in {manager.directory} restores and verifies: " + "; ".join(skipped)
    )


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
                    raise _write_error(manager, "in flight", e) from e
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

