"""Checksummed orbax checkpoints of a train state: save (refusing a full disk or a read-only
directory in one line), and restore the newest step that verifies, setting corrupt steps aside
under ``<directory>.corrupt/<step>``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxjpq.sharding import host_value

PyTree = Any
TrainState = Any  # jaxjpq.train.TrainState (fields step, params, opt_state, model_state, rng)


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
        raise write_error(manager, step, e) from e
    return step


def write_error(manager: ocp.CheckpointManager, step: int | str, e: BaseException
                 ) -> CheckpointWriteError:
    if isinstance(e, CheckpointWriteError):
        return e
    first = first_line(e, 300) or type(e).__name__
    return CheckpointWriteError(
        f"writing checkpoint step {step} to {manager.directory} failed: {first}; free some space "
        "or make the directory writable (earlier checkpoints are kept).")


class CorruptCheckpointError(ValueError):
    """No checkpoint step restores with matching checksums."""


def first_line(e: BaseException, n: int) -> str:
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
            skipped.append(f"step {s}: {type(e).__name__}: {first_line(e, 200)}"
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
