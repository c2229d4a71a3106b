"""Single experiment entry point.

    python -m experiments.run --config experiments/configs/mnist_cnn.py \\
        [--config.num_epochs=3 ...] --workdir runs/mnist_cnn
    jaxjpq-run --config experiments/configs/mnist_cnn.py --workdir runs/mnist_cnn

Writes orbax checkpoints to ``<workdir>/checkpoints`` (a rerun with the same workdir resumes
exactly) and ``<workdir>/results.json`` (val/test accuracy, steps, wall time, config).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from jaxjpq import data as data_lib
from jaxjpq import train as train_lib

_DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "mnist_cnn.py")


def build_model(config: ml_collections.ConfigDict) -> Any:
    """The zoo model ``config.model.name``; the other ``config.model`` keys are overrides."""
    from jaxjpq.models.registry import get_model

    overrides = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in config.model.to_dict().items()
        if k != "name"
    }
    return get_model(config.model.name, **overrides)


def build_data(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], dict[str, str], Any]:
    """``(splits, {role: split name}, train augment)`` for ``config.data.name``.

    Roles are ``"val"`` / ``"test"``: the splits evaluated after training.
    """
    name = config.data.name
    d = config.data
    augment = None
    if name == "mnist":
        splits = data_lib.load_mnist(d.cache_dir or None)
        roles = {"val": "val", "test": "test"}
    elif name == "fashion_mnist":  # IDX files in cache_dir (default: Debian's package), or TFDS
        splits = data_lib.load_fashion_mnist(d.cache_dir or None, data_dir=d.data_dir or None)
        roles = {"val": "val", "test": "test"}
    elif name == "cifar10":
        splits = data_lib.load_cifar10(d.data_dir or None)
        roles = {"test": "test"}
        augment = data_lib.random_crop_flip if d.get("augment", False) else None
    elif name == "imagenet2012":
        splits = data_lib.load_imagenet(d.data_dir or None, size=d.get("image_size", 224))
        roles = {"test": "validation"}
    elif name == "sst2":
        splits = data_lib.load_sst2(d.data_dir or None, max_len=d.get("max_len", 128))
        roles = {"test": "validation"}
    else:
        raise ValueError(
            f"Unknown dataset '{name}'; known: ['mnist', 'fashion_mnist', 'cifar10', "
            "'imagenet2012', 'sst2']."
        )
    splits = dict(splits)
    limits = {"train": d.get("train_limit", 0), **{s: d.get("eval_limit", 0)
                                                   for s in roles.values()}}
    for split, limit in limits.items():
        if not limit:
            continue
        if not isinstance(splits[split], data_lib.ArraySource):
            raise ValueError(f"train_limit/eval_limit need an in-memory dataset, not '{name}'.")
        splits[split] = data_lib.ArraySource(
            {k: v[:limit] for k, v in splits[split].arrays.items()}
        )
    return splits, roles, augment


def build_optimizer(config: ml_collections.ConfigDict, num_steps: int):
    """optax optimiser: linear warm-up then cosine decay to 0 over ``num_steps``."""
    o = config.optim
    warmup = min(o.warmup_steps, max(num_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, o.learning_rate, warmup_steps=warmup, decay_steps=max(num_steps, warmup + 1)
    )
    if o.name == "adamw":
        tx = optax.adamw(schedule, weight_decay=o.weight_decay)
    elif o.name == "adam":
        tx = optax.adam(schedule)
    elif o.name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(o.weight_decay),
            optax.sgd(schedule, momentum=o.momentum, nesterov=True),
        )
    else:
        raise ValueError(f"Unknown optimizer '{o.name}'; use 'adamw', 'adam' or 'sgd'.")
    if o.grad_clip:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
    return tx


def _pretrain_config(config) -> ml_collections.ConfigDict:
    """A copy of ``config`` (a ConfigDict or the dict of one) whose ``optim`` is updated by
    ``method.pretrain_optim``: the fp32 pre-training's config."""
    c = ml_collections.ConfigDict(config if isinstance(config, dict) else config.to_dict())
    c.optim.update(c.method.get("pretrain_optim", {}))
    return c


def pretrain_recipe(config, steps: int | str) -> dict[str, Any]:
    """What a shared fp32 pre-training of ``config`` is trained with (``pretrain.json``): seed,
    model, data, batch size, ``steps`` and ``config.optim`` updated by
    ``config.method.pretrain_optim``; ``config`` a ConfigDict or the dict of one."""
    return _recipe(_pretrain_config(config), steps)


def _recipe(c: ml_collections.ConfigDict, steps: int | str) -> dict[str, Any]:
    """:func:`pretrain_recipe` of a config already made by :func:`_pretrain_config`."""
    return json.loads(json.dumps({"seed": c.seed, "model": c.model.to_dict(),
                                  "optim": c.optim.to_dict(), "data": c.data.to_dict(),
                                  "batch_size": c.batch_size, "steps": steps}))


def _pretrain(config, model, variables, train_src, workdir: Path | None) -> dict:
    """fp32 training for ``config.method.pretrain_steps`` with ``method.pretrain_optim`` (the
    fields that differ from ``config.optim``), checkpointed under ``method.pretrain_dir`` (default
    ``<workdir>/pretrain``) so that a rerun resumes it and the runs of one seed can share it
    (``pretrain.json`` there records what it was trained with; another recipe is refused)."""
    method = config.method
    steps = int(method.pretrain_steps) or int(method.get("pretrain_epochs", 0)) * \
        data_lib.steps_per_epoch(len(train_src), config.batch_size)
    if steps <= 0:
        raise ValueError("config.method: set pretrain_steps (or pretrain_epochs) > 0.")
    pc = _pretrain_config(config)
    recipe = _recipe(pc, steps)
    directory = Path(method.get("pretrain_dir") or (workdir / "pretrain" if workdir else ""))
    manager = None
    if str(directory):
        directory = directory.expanduser().absolute()
        directory.mkdir(parents=True, exist_ok=True)
        record = directory / "pretrain.json"
        if record.exists():
            old = json.loads(record.read_text())
            if old != recipe:
                diff = sorted(k for k in recipe if json.dumps(recipe[k]) != json.dumps(old.get(k)))
                raise ValueError(f"{directory} holds a model pre-trained with other {diff}; "
                                 "point method.pretrain_dir elsewhere.")
        else:
            record.write_text(json.dumps(recipe, indent=1))
        manager = train_lib.checkpoint_manager(directory)
    key = jax.random.PRNGKey(config.seed)
    st = train_lib.create_train_state(train_lib.flax_forward(model.apply), variables,
                                      build_optimizer(pc, steps), rng=jax.random.fold_in(key, 7))
    if manager is not None and manager.latest_step() is not None:
        st, _ = train_lib.restore_checkpoint(manager, st)
    stream = data_lib.batch_stream(train_src, config.batch_size, seed=config.seed + 1000,
                                   start_step=int(st.step))
    if int(st.step) < steps:
        st, _ = train_lib.train(st, stream, steps, manager=manager,
                                checkpoint_every=config.checkpoint_every,
                                log_every=config.log_every, progress=config.progress)
    if manager is not None:
        manager.close()
    return {"params": st.params, **st.model_state}


def _container_bytes(graph, variables, state) -> int:
    """Bytes an export directory holds beyond the format's payload (orbax's files, the JSON
    metadata), measured by saving ``state`` once."""
    import tempfile

    from jaxjpq import export

    packed = export.pack(variables, state)
    with tempfile.TemporaryDirectory() as tmp:
        export.save(Path(tmp) / "m", packed)
        return int(export.disk_bytes(Path(tmp) / "m") - export.theoretical_bytes(packed)["total"])


def _searched_start(config, model, variables, example, train_src, workdir, floor_check
                    ) -> tuple[Any, dict, Any, dict]:
    """What the search methods share: trace, the early budget check ``floor_check(state)``,
    pre-training, a calibrated state with activations at ``b_u``, and the budget (``size``
    with the export container's bytes reserved, or ``bops``).
    Returns ``(graph, pretrained variables, state, budget kwargs)``."""
    import jaxjpq

    method = config.method
    graph = jaxjpq.trace.trace(model.apply, variables, example)  # shapes only: holds after training
    spec = jaxjpq.CompressionSpec(bits=tuple(method.bits),
                                  per_channel=bool(method.get("per_channel", False)))
    budget = {k: method.get(k) for k in ("size", "bops") if method.get(k)}
    if len(budget) != 1:
        raise ValueError("config.method: give exactly one of size= or bops= (a fraction of fp32).")
    floor_check(jaxjpq.init_state(graph, spec))  # before any training
    pretrained = _pretrain(config, model, variables, train_src, workdir)
    state = jaxjpq.init_state(graph, spec, pretrained)
    rng = np.random.default_rng(config.seed)
    calib = [np.asarray(train_src.get(rng.integers(0, len(train_src), config.batch_size), rng)
                        ["inputs"]) for _ in range(4)]
    state = jaxjpq.calibrate(jaxjpq.compress_apply(model.apply), pretrained, state, calib)
    act_bits = float(method.get("act_bits", 0.0) or method.bits[1])
    for name in state.act:  # activations at act_bits (default b_u); a search picks the weights
        if name not in state.frozen:
            state = jaxjpq.set_bits(state, name, act_bits, kind="act")
    if "size" in budget and method.get("size_metric", "export") == "export":
        # the saved directory meets the budget: reserve the container's bytes
        budget["reserve_bits"] = 8.0 * (_container_bytes(graph, pretrained, state) + 1024)
    return graph, pretrained, state, budget


def _budget_info(budget: dict) -> dict:
    return {"budget": {k: v for k, v in budget.items() if k != "reserve_bits"},
            "reserved_bytes": budget.get("reserve_bits", 0.0) / 8}


def _searched_method(config, model, variables, example, train_src, workdir, held_src=None
                     ) -> tuple[Any, Any, dict]:
    """A search method (FIT, uniform + magnitude, AJPQ, random search): pretrain, search
    (:mod:`jaxjpq.methods.registry`). AJPQ's reward set is ``method.reward_samples`` samples of
    a fixed draw from ``held_src`` (the validation split where the dataset has one), else from
    the training split. Returns ``(graph, pair, info)``."""
    import jaxjpq
    from jaxjpq.methods import registry

    method = config.method
    entry = registry.get(method.name)
    cfg = method.to_dict()
    graph, pretrained, state, budget = _searched_start(
        config, model, variables, example, train_src, workdir,
        lambda st: entry.check(st, cfg))
    held = None
    if method.get("reward_samples"):
        src = train_src if held_src is None else held_src
        n = int(method.reward_samples)
        if n > len(src):
            raise ValueError(f"config.method.reward_samples={n} exceeds the {len(src)} samples "
                             "of the reward split.")
        rng = np.random.default_rng(config.seed + 3000)
        got = src.get(np.sort(rng.choice(len(src), n, replace=False)), rng)
        held = (np.asarray(got["inputs"]), np.asarray(got["labels"]))
    inputs = registry.SearchInputs(
        variables=pretrained, held=held, budget=budget, seed=config.seed,
        progress=config.progress,
        batches=lambda: data_lib.batches(train_src, config.batch_size, seed=config.seed + 2000))
    t0 = time.perf_counter()
    state, info = entry.search(model.apply, state, cfg, inputs)
    info = {"search_seconds": time.perf_counter() - t0, **info, **_budget_info(budget)}
    if held is not None:
        info["reward_split"] = "train" if held_src is None else "val"
    return graph, jaxjpq.CompressedParams(pretrained["params"], state), info


def build_method(config, model, variables, example, num_steps: int, train_src=None,
                 workdir: Path | None = None, held_src=None) -> dict[str, Any]:
    """What ``config.method.name`` trains: forward, variables, optimizer, metrics, graph.

    ``"fp32"`` (default) trains the plain model; ``"geta"`` traces the QADG and trains
    ``(params, CompressionState)`` with :func:`jaxjpq.methods.geta.geta` around the configured
    optimizer; ``"prune_then_quantize"`` runs the staged baseline
    (:func:`jaxjpq.methods.baselines.prune_then_quantize`; ``sparsity=0`` is quantize-only,
    ``quantize_at=1`` prune-only) on the same graph and cost model; ``"fit"``,
    ``"uniform_magnitude"``, ``"ajpq"`` and ``"ajpq_random"`` pre-train, search and fine-tune
    the found state with ``qat`` (AJPQ's reward on ``held_src`` where given).
    """
    method = config.get("method", ml_collections.ConfigDict({"name": "fp32"}))
    tx = build_optimizer(config, num_steps)
    if method.name == "fp32":
        return dict(forward=train_lib.flax_forward(model.apply), variables=variables, tx=tx,
                    metrics_fn=None, graph=None)
    import jaxjpq
    from jaxjpq.methods import registry

    entry = registry.get(method.name)
    info: dict[str, Any] = {}
    if entry.family == "search":
        if train_src is None:
            raise ValueError(f"method '{method.name}' needs the training split (train_src=).")
        graph, pair, info = _searched_method(config, model, variables, example, train_src,
                                             workdir, held_src)
        variables = {"params": pair.model, **{k: v for k, v in variables.items()
                                              if k != "params"}}
    else:
        if int(method.get("pretrain_steps", 0) or 0) > 0:  # from a shared fp32 pre-training
            variables = _pretrain(config, model, variables, train_src, workdir)
        pair = entry.init(model.apply, variables, example, method.to_dict(),
                          jax.random.PRNGKey(config.seed))
        graph = pair.compression.graph
    tx = entry.transform(tx, num_steps, method.to_dict())
    rest = {k: v for k, v in variables.items() if k != "params"}

    def metrics_fn(st):
        out = jaxjpq.cost.metrics(st.params[1])
        gamma2 = optax.tree_utils.tree_get(st.opt_state, "gamma2", None)
        if gamma2 is not None:
            out["gamma2"] = gamma2
        return out

    return dict(
        forward=jaxjpq.CompressedForward(model.apply),
        variables={"params": pair, **rest},
        tx=tx,
        metrics_fn=metrics_fn,
        graph=graph,
        info=info,
    )


def export_and_check(graph, model, state, test_src, batch_size: int, directory: Path) -> dict:
    """Pack the trained compressed model (pruned units removed, integer codes), save it with
    orbax, restore it and evaluate the restored integer-weight model on ``test_src``."""
    import shutil

    from jaxjpq import export

    model_params, cstate = state.params
    variables = {"params": model_params, **state.model_state}
    if directory.exists() and jax.process_index() == 0:
        shutil.rmtree(directory)
    if jax.process_count() > 1:  # every host takes part in orbax's save; host 0 writes
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"export {directory}")
    export.save(directory, export.pack(variables, cstate))
    restored = export.restore(directory)
    infer, weights = export.inference_apply(restored, model.apply, graph)
    eval_state = train_lib.create_train_state(
        lambda params, ms, x, rng, train: (infer(params, x), ms), {"params": weights},
        optax.identity())
    acc = train_lib.evaluate(
        eval_state,
        data_lib.batches(test_src, batch_size, shuffle=False, drop_remainder=False),
        batch_size,
    )["accuracy"]
    sizes = export.theoretical_bytes(restored)
    fp32_bytes = 4.0 * graph.param_count()
    disk = export.disk_bytes(directory)
    return {
        "disk_bytes": disk,
        "theoretical_bytes": sizes["total"],
        "fp32_bytes": fp32_bytes,
        "relative_theoretical": sizes["total"] / fp32_bytes,
        "relative_disk": disk / fp32_bytes,
        "restored_test_accuracy": acc,
    }


def deploy_and_time(graph, model, state, inputs: np.ndarray, rounds: int) -> dict:
    """The deployed model (:func:`jaxjpq.deploy`) of the trained pair: its resident bytes (and
    the cost model's figure), its largest difference from the compressed forward on ``inputs``
    and, with ``rounds > 0``, its latency against the dense model on ``inputs`` (interleaved
    rounds, median of the per-round ratios)."""
    import jaxjpq
    from experiments import timing
    from jaxjpq import cost, export

    model_params, cstate = jax.device_get(state.params)
    variables = {"params": model_params, **jax.device_get(state.model_state)}
    deployed = jaxjpq.deploy(variables, cstate, warn_budget=False)
    kw = export.traced_kwargs(graph)
    x = jax.numpy.asarray(inputs)
    ref = jax.jit(functools.partial(jaxjpq.compress_apply(model.apply), **kw))(
        variables, cstate, x)
    out = {"resident_bytes": deployed.resident_bytes(),
           "active_bytes": float(cost.active_bytes(cstate)),
           "predicted_resident_bytes": cost.resident_bytes(cstate)["total"],
           "max_abs_diff": float(jax.numpy.max(jax.numpy.abs(deployed(x) - ref))),
           "batch": int(x.shape[0]), "report": deployed.report()}
    if rounds > 0:
        dense = jax.jit(functools.partial(model.apply, **kw))
        t = timing.rounds({"dense": lambda: dense(variables, x), "deployed": lambda: deployed(x)},
                          rounds)
        out["latency_ms"] = timing.median_ms(t)
        out["deployed_over_dense"] = timing.ratio(t, "deployed", "dense")
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains ``config``'s model, evaluates every non-train split, writes ``results.json``.

    Resumes from the latest checkpoint in ``<workdir>/checkpoints`` if present.
    """
    workdir = Path(workdir).expanduser().absolute()
    start_distributed(config)
    with workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train_and_evaluate(config, workdir)


class WorkdirError(ValueError):
    """The workdir cannot be used: a file, or in use by another run."""


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """Hold an exclusive lock on ``<workdir>/.lock`` (``fcntl.flock``, released when the process
    ends, however it ends) for the duration; :class:`WorkdirError` when another process holds it
    or ``workdir`` is not a directory."""
    import fcntl

    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file; give a directory (new or a run's).")
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            raise WorkdirError(
                f"{workdir} is in use by another run (pid {owner}); wait for it to finish or use "
                "another --workdir.") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    check_fingerprint(workdir, config)
    t0 = time.perf_counter()
    model = build_model(config)
    build_optimizer(config, 1)  # fail on a bad optimizer name before loading any data
    splits, roles, augment = build_data(config)
    train_src = splits["train"]
    per_epoch = data_lib.steps_per_epoch(len(train_src), config.batch_size)
    num_steps = config.num_steps or per_epoch * config.num_epochs
    if num_steps <= 0:
        raise ValueError("Nothing to train: set config.num_steps or config.num_epochs > 0.")

    key = jax.random.PRNGKey(config.seed)
    example = np.asarray(train_src.get(np.arange(1), np.random.default_rng(0))["inputs"])
    variables = jax.jit(model.init)(key, example)
    method = build_method(config, model, variables, example, num_steps, train_src, workdir,
                          splits.get(roles.get("val", "")))
    state = train_lib.create_train_state(
        method["forward"], method["variables"], method["tx"], rng=jax.random.fold_in(key, 1)
    )
    check_fingerprint(workdir, config, write=True)  # the run is buildable: record it
    manager = train_lib.checkpoint_manager(workdir / "checkpoints")
    resumed_from = manager.latest_step()
    start = {}
    if method["graph"] is not None and "test" in roles and jax.process_count() == 1:
        # the compressed model training starts from (a search's pick, or the pre-trained one)
        start = train_lib.evaluate(
            state, data_lib.batches(splits[roles["test"]], config.eval_batch_size,
                                    shuffle=False, drop_remainder=False),
            config.eval_batch_size)
    if resumed_from is not None:
        state, _ = train_lib.restore_checkpoint(manager, state)
    parallel = config.get("data_parallel", False) or config.get("distributed", False)
    mesh = train_lib.data_mesh() if parallel else None
    shard = (jax.process_index(), jax.process_count())  # this host's rows of each batch
    stream = data_lib.batch_stream(
        train_src, config.batch_size, seed=config.seed, start_step=int(state.step),
        augment=augment, shard=shard,
    )
    t_train = time.perf_counter()
    state, last = train_lib.train(
        state,
        stream,
        num_steps,
        manager=manager,
        checkpoint_every=config.checkpoint_every,
        log_every=config.log_every,
        progress=config.progress,
        metrics_fn=method["metrics_fn"],
        mesh=mesh,
    )
    state = train_lib.host_value(state) if mesh is not None else state
    train_seconds = time.perf_counter() - t_train
    manager.close()

    metrics = {}
    for role, split in roles.items():
        metrics[role] = train_lib.evaluate(
            state,
            data_lib.batches(splits[split], config.eval_batch_size, shuffle=False,
                             drop_remainder=False, shard=shard),
            config.eval_batch_size,
            mesh=mesh,
        )
    compression = {}
    if method["graph"] is not None:
        from jaxjpq import cost
        from jaxjpq.state import boolean_masks

        graph, cstate = method["graph"], state.params[1]
        compression = {
            **{k: float(v) for k, v in cost.metrics(cstate).items()},
            "kept_units": {g: int((m > 0.5).sum()) for g, m in cstate.masks.items()},
            # Parameters left after slimming (pruned units removed everywhere) vs dense.
            "slim_params": graph.param_count(boolean_masks(cstate)),
            "dense_params": graph.param_count(),
            "bits": {n: [float(np.max(b)) for b in wa] for n, wa in cost.bits(
                                                                             cstate).items()},
            "report": cost.report(cstate),
        }
        compression.update(method.get("info") or {})
        if start:
            compression["start_test_accuracy"] = start["accuracy"]
        target = config.method.get("target_bops")
        if target is not None:  # the exact check after rounding bits and thresholding gates
            compression["target_bops"] = float(target)
            compression["budget_met"] = bool(compression["rel_bops"] <= target)
            if not compression["budget_met"]:
                print(f"WARNING: relative BOPs {compression['rel_bops']:.4%} exceed the target "
                      f"{target:.4%} (see report.txt)")
        if jax.process_index() == 0:
            (workdir / "report.txt").write_text(compression["report"] + "\n")
        compression["export"] = export_and_check(
            graph, model, state, splits[roles["test"]], config.eval_batch_size, workdir / "export"
        )
        if jax.process_count() == 1:  # the deployed model lives on one host's devices
            test_src = splits[roles["test"]]
            n = min(config.eval_batch_size, len(test_src))
            x = test_src.get(np.arange(n), np.random.default_rng(0))["inputs"]
            dep = deploy_and_time(graph, model, state, x, int(config.get("deploy_rounds", 10)))
            compression["deployed"] = dep
            if jax.process_index() == 0:
                (workdir / "report.txt").write_text(
                    compression["report"] + "\n\n" + dep.pop("report") + "\n")
            else:
                dep.pop("report")
    results = {
        "model": config.model.name,
        "method": config.get("method", {"name": "fp32"})["name"],
        "compression": compression,
        "dataset": config.data.name,
        "steps": int(state.step),
        "epochs": int(state.step) / per_epoch,
        "train_examples": len(train_src),
        "resumed_from_step": resumed_from,
        "final_train_window": last,
        **{f"{role}_accuracy": m["accuracy"] for role, m in metrics.items()},
        **{f"{role}_loss": m["loss"] for role, m in metrics.items()},
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - t0,
        "device": jax.devices()[0].platform,
        "num_devices": jax.device_count(),
        "config": recorded_config(config),
    }
    if jax.process_index() == 0:
        train_lib.write_results(workdir / "results.json", results)
    return results


def start_distributed(config: ml_collections.ConfigDict) -> None:
    """With ``config.distributed``, join the multi-host job (``jax.distributed.initialize``):
    detected on TPU pods, SLURM, Open MPI and Kubernetes; elsewhere from the environment,
    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. Call before any JAX computation."""
    if not config.get("distributed", False) or jax.distributed.is_initialized():
        return
    env = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                               ("process_id", "JAX_PROCESS_ID"))
           if v in os.environ}
    jax.distributed.initialize(**env)


# Fields that do not change a run's numbers: a resume may change them.
FREE_FIELDS = ("progress", "log_every", "checkpoint_every", "eval_batch_size", "deploy_rounds")


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a run's numbers depend on: the config (less the fields that do not change them)
    and the versions of the numerical packages."""
    import importlib.metadata as md

    cfg = {k: v for k, v in recorded_config(config).items() if k not in FREE_FIELDS}
    versions = {p: md.version(p) for p in ("jax", "jaxlib", "flax", "optax", "jaxjpq")}
    return {"config": cfg, "versions": versions}


def flat_config(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b.c": leaf}``."""
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat_config(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_fingerprint(workdir: Path, config: ml_collections.ConfigDict, write: bool = False
                      ) -> None:
    """Raise ``ValueError`` listing every field that differs from the run that started the
    workdir (``<workdir>/fingerprint.json``); with ``write``, record it for a new workdir."""
    path = workdir / "fingerprint.json"
    new = json.loads(json.dumps(fingerprint(config)))  # tuples as lists, as stored
    if path.is_file():
        old = json.loads(path.read_text())
        a, b = flat_config(old), flat_config(new)
        diff = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
                for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if diff:
            raise ValueError(
                f"{workdir} holds a run with another configuration or package versions; "
                "resuming it would mix two runs. Differences: " + "; ".join(diff)
                + ". Use another --workdir (or delete this one)."
            )
        return
    if write:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")


def default_workdir(config_path: str, config: ml_collections.ConfigDict) -> Path:
    """``runs/<config file stem>-<8 hex of the fingerprint>``: one workdir per configuration."""
    import hashlib

    blob = json.dumps(fingerprint(config)["config"], sort_keys=True, default=str).encode()
    stem = Path(config_path.split(":", 1)[0]).stem
    return Path("runs") / f"{stem}-{hashlib.sha256(blob).hexdigest()[:8]}"


# The GETA stage fractions of a recorded result whose config has no ``schedule`` field.
LEGACY_FRACTIONS = (0.1, 0.1, 0.5)


def recorded_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config`` as a dict for ``results.json``, with the GETA stage fractions that ran filled in
    where the config leaves them to the default (readers take a missing field as the legacy
    split, :data:`LEGACY_FRACTIONS`)."""
    record = config.to_dict()
    method = record.get("method", {})
    if method.get("name") == "geta" and "schedule" not in method:
        from jaxjpq.methods.geta import DEFAULT_FRACTIONS

        method["schedule"] = DEFAULT_FRACTIONS
    return record


def _app_main(argv: Sequence[str], config_file: str) -> None:
    from absl import flags, logging

    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    cfg = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or default_workdir(config_file, cfg)
    if not flags.FLAGS.workdir:
        print(f"workdir: {workdir}")
    try:
        res = train_and_evaluate(cfg, workdir)
    except (WorkdirError, train_lib.CheckpointWriteError) as e:
        raise SystemExit(f"jaxjpq-run: {e}") from None
    except ValueError as e:
        if "holds a run with another configuration" not in str(e):
            raise
        raise SystemExit(f"jaxjpq-run: {e}") from None
    accs = ", ".join(f"{k} {v:.4f}" for k, v in res.items() if k.endswith("_accuracy"))
    print(f"{res['steps']} steps in {res['wall_seconds']:.1f} s: {accs} "
          f"-> {Path(workdir) / 'results.json'}")
    comp = res.get("compression") or {}
    if "deployed" in comp:
        ex, dep = comp["export"], comp["deployed"]
        line = (f"model bytes: dense float32 {ex['fp32_bytes']:,.0f}, active (kept weights x "
                f"bits) {dep['active_bytes']:,.0f}, export payload "
                f"{ex['theoretical_bytes']:,.0f}, on disk {ex['disk_bytes']:,}, deployed in "
                f"memory {dep['resident_bytes']['total']:,}")
        if "deployed_over_dense" in dep:
            r = dep["deployed_over_dense"]
            line += (f"; deployed / dense latency at batch {dep['batch']}: {r['median']:.2f} "
                     f"[{r['q1']:.2f}, {r['q3']:.2f}]")
        print(line)


_FIELD_DOC = re.compile(r"^\s*c\.([\w.]+)\s*=.*?#\s*(.+)$")


def field_docs(config_file: str | os.PathLike | None = None) -> dict[str, str]:
    """``{dotted field: its meaning}`` from the comments on the assignments in the config files
    (``c.method.size = 0.1  # budget: ...``): ``config_file`` first, then the config modules it
    imports (depth first), then the others; the first that comments a field gives its text."""
    folder = Path(_DEFAULT_CONFIG).parent
    order: list[Path] = []

    def visit(f: Path) -> None:
        if f in order or not f.is_file():
            return
        order.append(f)
        for name in re.findall(r"from experiments\.configs(?:\.(\w+))? import (\w+)",
                               f.read_text()):
            visit(folder / f"{name[0] or name[1]}.py")

    if config_file is not None:
        visit(Path(config_file))
    for f in sorted(folder.glob("*.py")):
        visit(f)
    docs: dict[str, str] = {}
    for f in order:
        for line in f.read_text().splitlines():
            m = _FIELD_DOC.match(line)
            if m and m.group(1) not in docs:
                docs[m.group(1)] = m.group(2).strip()
    return docs


def describe_config(cfg: ml_collections.ConfigDict, config_file: str | None = None) -> str:
    """Every field of ``cfg`` with its value and meaning, one per line (``--help``)."""
    docs = field_docs(config_file)
    lines = []

    def walk(node, prefix):
        for k in sorted(node.keys()):
            v, name = node[k], f"{prefix}{k}"
            if isinstance(v, ml_collections.ConfigDict):
                if name in docs:
                    lines.append(f"  --config.{name}.*: {docs[name]}")
                walk(v, name + ".")
            else:
                doc = docs.get(name, docs.get(name.rsplit(".", 1)[0], ""))
                lines.append(f"  --config.{name}={v!r}" + (f"  # {doc}" if doc else ""))

    walk(cfg, "")
    return "\n".join(["config fields (--config.<field>=<value>):", *lines])


def check_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
    """``(config, its path)`` from ``argv`` (the config file executed once, overrides not yet
    applied); ``SystemExit`` with one line for a missing config file or an unknown config field
    (naming the valid fields at that level), before absl's flag parsing would print a
    traceback."""
    import importlib.util

    path, overrides = _DEFAULT_CONFIG, []
    args = list(argv)
    for i, a in enumerate(args):
        if a == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a.startswith("--config."):
            key, _, value = a[len("--config."):].partition("=")
            overrides.append((key, value))
    file = path.split(":", 1)[0]
    if not Path(file).is_file():
        raise SystemExit(f"jaxjpq-run: config file {file!r} does not exist "
                         f"(working directory {os.getcwd()}).")
    spec = importlib.util.spec_from_file_location("_jaxjpq_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(*path.split(":", 1)[1:])
    if "--help" in args or "-h" in args or "--helpfull" in args:
        print(describe_config(cfg, file) + "\n")
    for key, value in overrides:
        node, done = cfg, []
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                where = ".".join(done) or "the config"
                raise SystemExit(f"jaxjpq-run: unknown config field --config.{key}: {where} has "
                                 f"no field {part!r}; valid fields: {', '.join(valid)}.")
            node = node[part]
            done.append(part)
        if isinstance(node, tuple) and value and "," not in value:
            # ml_collections would read "24" as the tuple ("2", "4")
            raise SystemExit(f"jaxjpq-run: --config.{key}={value}: this field is a tuple "
                             f"(now {node!r}); give every entry, e.g. --config.{key}=\"(2,4)\".")
    return cfg, path


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``jaxjpq-run``); flags: ``--config``, ``--config.*``, ``--workdir``."""
    from absl import app, flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    cfg, path = check_args(argv[1:])
    # the config file ran once above; the flag holds its result and parses the overrides
    rest, skip = [argv[0]], False
    for a in argv[1:]:
        if skip or a == "--config" or a.startswith("--config="):
            skip = a == "--config"
            continue
        rest.append(a)
    if "config" in flags.FLAGS:
        delattr(flags.FLAGS, "config")
    config_flags.DEFINE_config_dict("config", cfg, f"The config of {path}.", sys_argv=rest)
    if "workdir" not in flags.FLAGS:
        flags.DEFINE_string("workdir", None, "Directory for checkpoints and results "
                            "(default: runs/<config>-<hash of the configuration>).")
    app.run(functools.partial(_app_main, config_file=path), argv=rest)


if __name__ == "__main__":
    main()
