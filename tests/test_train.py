"""Tests for jaxjpq.train: steps, evaluation, checkpoints with exact resume, NaN handling."""

from __future__ import annotations

import functools
import itertools
import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxjpq import data
from jaxjpq import train as T
from jaxjpq.models.cnn import MnistCNN


@pytest.fixture(scope="module")
def small_mnist():
    m = data.load_mnist()
    take = lambda s, n: data.ArraySource({k: v[:n] for k, v in m[s].arrays.items()})
    return take("train", 512), take("val", 300)


@functools.cache
def _init(model: nn.Module, shape: tuple[int, ...]):
    return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros(shape))


@functools.cache
def _adam(lr: float) -> optax.GradientTransformation:
    return optax.adam(lr)  # one object per lr, so equal states share compiled steps


def _cnn_state(lr=1e-3, seed=0):
    model = MnistCNN(features=(8, 16), hidden=32)
    variables = _init(model, (1, 28, 28, 1))
    return T.create_train_state(T.flax_forward(model.apply), variables, _adam(lr), rng=seed)


def test_tiny_end_to_end_mnist(small_mnist):
    train_src, val_src = small_mnist
    state = _cnn_state(lr=3e-3)
    evaluate = lambda s: T.evaluate(
        s, data.batches(val_src, 128, shuffle=False, drop_remainder=False), 128)
    before = evaluate(state)
    assert before["count"] == 300
    cache_before = T.train_step._cache_size()
    state, last = T.train(state, data.batch_stream(train_src, 32, seed=0), 60, progress=False,
                          log_every=20)
    # all 60 steps reuse one compiled step (no silent retrace per step), and a fresh state of
    # an equal model reuses it too
    assert T.train_step._cache_size() - cache_before <= 1
    T.train(_cnn_state(lr=3e-3), data.batch_stream(train_src, 32), 2, progress=False)
    assert T.train_step._cache_size() - cache_before <= 1
    after = evaluate(state)
    assert int(state.step) == 60
    assert after["accuracy"] > 0.6 and after["accuracy"] > before["accuracy"] + 0.3
    assert after["loss"] < before["loss"]
    assert set(last) == {"loss", "accuracy"} and np.isfinite(last["loss"])


@pytest.mark.parametrize("batch_size", [7, 64, 300])
def test_evaluate_matches_full_batch(small_mnist, batch_size):
    _, val_src = small_mnist
    state = _cnn_state()
    got = T.evaluate(state, data.batches(val_src, batch_size, shuffle=False,
                                         drop_remainder=False), batch_size)
    logits = MnistCNN(features=(8, 16), hidden=32).apply({"params": state.params},
                                                         val_src["inputs"])
    labels = val_src["labels"]
    np.testing.assert_allclose(got["accuracy"], np.mean(np.argmax(logits, -1) == labels))
    np.testing.assert_allclose(
        got["loss"],
        optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), rtol=1e-5)


class _BNDropNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16)(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
        return nn.Dense(10)(x)


def _bn_state():
    model = _BNDropNet()
    variables = _init(model, (2, 28, 28, 1))
    return T.create_train_state(T.flax_forward(model.apply), variables, optax.sgd(0.1), rng=1)


def test_model_state_and_dropout_are_handled(small_mnist):
    train_src, _ = small_mnist
    state = _bn_state()
    stats0 = state.model_state["batch_stats"]
    batch = train_src.get(np.arange(32))
    new, metrics = T.train_step(state, batch)
    # running statistics moved, and the step is deterministic given the state
    assert not np.allclose(new.model_state["batch_stats"]["BatchNorm_0"]["mean"],
                           stats0["BatchNorm_0"]["mean"])
    again, _ = T.train_step(state, batch)
    chex.assert_trees_all_equal(new.params, again.params)
    # dropout key changes with the step: two steps on the same batch use different masks
    _, m2 = T.train_step(new.replace(params=state.params, model_state=state.model_state), batch)
    assert float(m2["loss"]) != float(metrics["loss"])


def test_penalty_is_added_to_the_loss_and_its_gradient_used(small_mnist):
    train_src, _ = small_mnist
    batch = train_src.get(np.arange(16))
    base = _bn_state()  # small dense net with BatchNorm and dropout
    sq = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
    lam = 0.3
    pen = base.replace(penalty_fn=lambda p: lam * sq(p))
    _, m0 = T.train_step(base, batch)
    new, m1 = T.train_step(pen, batch)
    np.testing.assert_allclose(m1["penalty"], lam * jax.jit(sq)(base.params), rtol=1e-5)
    np.testing.assert_allclose(m1["loss"], m0["loss"] + m1["penalty"], rtol=1e-5)
    assert "penalty" not in m0
    # The penalised step equals a plain step on the gradient of CE + penalty.
    def total(params):
        logits, _ = base.forward(params, base.model_state, batch["inputs"],
                                 jax.random.fold_in(base.rng, 0), True)
        return T.cross_entropy(logits, batch["labels"]) + lam * sq(params)
    @jax.jit
    def reference(params, opt_state):
        updates, _ = base.tx.update(jax.grad(total)(params), opt_state, params)
        return optax.apply_updates(params, updates)

    chex.assert_trees_all_close(new.params, reference(base.params, base.opt_state),
                                rtol=1e-5, atol=1e-6)


def test_create_train_state_needs_params():
    with pytest.raises(ValueError, match="must contain 'params'"):
        T.create_train_state(lambda *a: None, {"batch_stats": {}}, optax.sgd(0.1))


def test_checkpoint_roundtrip_identical(tmp_path, small_mnist):
    train_src, _ = small_mnist
    state = _bn_state()
    state, _ = T.train(state, data.batch_stream(train_src, 16), 3, progress=False)
    extra = {"masks": jnp.arange(5) > 2, "bits": jnp.full((3,), 4.5)}
    mgr = T.checkpoint_manager(tmp_path / "ckpt")
    assert T.save_checkpoint(mgr, state, extra) == 3
    fresh = _bn_state()
    restored, rextra = T.restore_checkpoint(
        T.checkpoint_manager(tmp_path / "ckpt"), fresh,
        jax.tree.map(jnp.zeros_like, extra))
    for name in ("step", "params", "opt_state", "model_state", "rng"):
        chex.assert_trees_all_equal(getattr(restored, name), getattr(state, name))
    chex.assert_trees_all_equal(rextra, extra)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        T.restore_checkpoint(T.checkpoint_manager(tmp_path / "empty"), fresh)


def test_resumed_training_equals_uninterrupted(tmp_path, small_mnist):
    train_src, _ = small_mnist
    total, cut, bs = 7, 3, 32
    straight, _ = T.train(_bn_state(), data.batch_stream(train_src, bs, seed=5), total,
                          progress=False)

    mgr = T.checkpoint_manager(tmp_path / "ckpt")
    first, _ = T.train(_bn_state(), data.batch_stream(train_src, bs, seed=5), cut,
                       manager=mgr, progress=False)
    assert mgr.latest_step() == cut
    resumed, _ = T.restore_checkpoint(T.checkpoint_manager(tmp_path / "ckpt"), _bn_state())
    assert int(resumed.step) == cut
    stream = data.batch_stream(train_src, bs, seed=5, start_step=int(resumed.step))
    resumed, _ = T.train(resumed, stream, total, progress=False)
    chex.assert_trees_all_equal(resumed.params, straight.params)
    chex.assert_trees_all_equal(resumed.opt_state, straight.opt_state)
    chex.assert_trees_all_equal(resumed.model_state, straight.model_state)
    assert int(resumed.step) == total


def _blow_up_at(k: int) -> optax.GradientTransformation:
    """SGD whose update number ``k`` multiplies the params by 1e30: they stay finite, and the
    next forward gives a non-finite loss."""

    def update(u, count, p=None):
        out = jax.tree.map(lambda g, x: jnp.where(count == k, x * 1e30, -0.01 * g), u, p)
        return out, count + 1

    return optax.GradientTransformation(lambda p: jnp.zeros((), jnp.int32), update)


def test_nan_loss_stops_and_keeps_a_checkpoint_whose_loss_was_finite(tmp_path, small_mnist):
    train_src, _ = small_mnist
    model = MnistCNN(features=(8, 16), hidden=32)

    def fresh():
        return T.create_train_state(T.flax_forward(model.apply), _init(model, (1, 28, 28, 1)),
                                    _blow_up_at(3))

    mgr = T.checkpoint_manager(tmp_path / "ckpt", max_to_keep=None)
    # the update of step 3 gives the state of step 4, whose loss is not finite; the checkpoint
    # of step 4 holds that state and is removed
    with pytest.raises(T.NonFiniteLossError, match=r"at step 4.*latest kept checkpoint, step 2, "
                                                   r"had a finite loss. Lower the learning"):
        T.train(fresh(), data.batch_stream(train_src, 16), 10, manager=mgr, checkpoint_every=2,
                progress=False)
    assert mgr.latest_step() == 2
    good, _ = T.restore_checkpoint(mgr, fresh())
    loss = T.evaluate(good, data.batches(train_src, 16, shuffle=False), 16)["loss"]
    assert np.isfinite(loss)
    with pytest.raises(T.NonFiniteLossError, match="no checkpoint had been written"):
        T.train(fresh(), data.batch_stream(train_src, 16), 10, progress=False)


def test_host_syncs_every_n_steps_and_still_names_the_exact_step(monkeypatch, small_mnist):
    train_src, _ = small_mnist
    model = MnistCNN(features=(8, 16), hidden=32)
    gets = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: gets.append(1) or real(x))

    def state(tx):
        return T.create_train_state(T.flax_forward(model.apply), _init(model, (1, 28, 28, 1)), tx)

    a, _ = T.train(state(optax.adam(1e-3)), data.batch_stream(train_src, 16), 12, log_every=6,
                   progress=False, prefetch=3)
    assert len(gets) == 2  # steps 6 and 12, not one per step
    b, _ = T.train(state(optax.adam(1e-3)), data.batch_stream(train_src, 16), 12, log_every=1,
                   progress=False, prefetch=0)
    chex.assert_trees_all_equal(a.params, b.params)  # prefetch and sync change no number
    with pytest.raises(T.NonFiniteLossError, match=r"at step 4"):
        T.train(state(_blow_up_at(3)), data.batch_stream(train_src, 16), 12, log_every=10,
                progress=False)


def test_non_finite_inputs_are_an_error_naming_the_batch(small_mnist):
    train_src, _ = small_mnist

    def stream():
        for i, b in enumerate(data.batch_stream(train_src, 16)):
            if i == 4:
                x = np.array(b["inputs"])
                x[3, 0, 0, 0] = np.nan
                b = {**b, "inputs": x}
            yield b

    with pytest.raises(ValueError, match=r"batch of step 4 has NaN/inf inputs \(1 of 16"):
        T.train(_cnn_state(), stream(), 10, progress=False)


def test_bfloat16_non_finite_inputs_are_an_error_too(small_mnist):
    _, val_src = small_mnist
    x = np.full((16, 28, 28, 1), np.nan, jnp.bfloat16)
    batch = {"inputs": x, "labels": np.asarray(val_src.arrays["labels"][:16])}
    with pytest.raises(ValueError, match=r"evaluation batch 0 has NaN/inf inputs \(16 of 16"):
        T.evaluate(_cnn_state(), [batch], 16)
    with pytest.raises(ValueError, match=r"batch of step 0 has NaN/inf inputs"):
        T.train(_cnn_state(), iter([batch] * 2), 2, progress=False)


@pytest.mark.parametrize("bad", [-1, 10])
def test_labels_outside_the_classes_are_an_error_naming_the_step(small_mnist, bad):
    train_src, val_src = small_mnist

    def stream():
        for i, b in enumerate(data.batch_stream(train_src, 16)):
            if i == 3:
                y = np.array(b["labels"])
                y[5] = bad
                b = {**b, "labels": y}
            yield b

    lo, hi = min(bad, 0), max(bad, 9)
    match = (rf"step 3 has labels in \[{lo}, {hi}\], but the model outputs 10 classes: labels "
             r"must be integers in \[0, 10\)")
    with pytest.raises(ValueError, match=match):
        T.train(_cnn_state(), stream(), 8, log_every=8, progress=False)
    y = np.array(val_src.arrays["labels"][:16])
    y[0] = bad
    batch = {"inputs": val_src.arrays["inputs"][:16], "labels": y}
    with pytest.raises(ValueError, match=r"evaluation batch 0 has labels"):
        T.evaluate(_cnn_state(), [batch], 16)


def test_sigterm_checkpoints_the_current_step_and_resume_is_exact(tmp_path, small_mnist):
    import os
    import signal

    train_src, _ = small_mnist
    total = 8
    straight, _ = T.train(_cnn_state(), data.batch_stream(train_src, 16, seed=3), total,
                          progress=False)

    def stream():
        for i, b in enumerate(data.batch_stream(train_src, 16, seed=3)):
            if i == 5:  # the signal arrives while step 5's batch is being read
                os.kill(os.getpid(), signal.SIGTERM)
            yield b

    mgr = T.checkpoint_manager(tmp_path / "ckpt")
    # batches are read 2 steps ahead: step 5's at step 3, so the loop stops before step 4
    with pytest.raises(T.TrainingInterrupted, match="SIGTERM at step 4: checkpointed step 4"):
        T.train(_cnn_state(), stream(), total, manager=mgr, checkpoint_every=100,
                progress=False, prefetch=2)
    assert mgr.latest_step() == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed, _ = T.restore_checkpoint(T.checkpoint_manager(tmp_path / "ckpt"), _cnn_state())
    stream2 = data.batch_stream(train_src, 16, seed=3, start_step=4)
    resumed, _ = T.train(resumed, stream2, total, progress=False)
    chex.assert_trees_all_equal(resumed.params, straight.params)
    chex.assert_trees_all_equal(resumed.opt_state, straight.opt_state)


def test_non_finite_params_with_finite_loss_stop_training(small_mnist):
    """An update that writes NaN into the params (the loss of that step was still finite)."""
    train_src, _ = small_mnist
    poison = optax.GradientTransformation(
        lambda p: optax.EmptyState(),
        lambda u, s, p=None: (jax.tree.map(lambda x: x * jnp.nan, u), s),
    )
    model = MnistCNN(features=(8, 16), hidden=32)
    state = T.create_train_state(T.flax_forward(model.apply), _init(model, (1, 28, 28, 1)), poison)
    with pytest.raises(T.NonFiniteLossError, match="update of step 0 made the parameters"):
        T.train(state, data.batch_stream(train_src, 16), 3, progress=False)


def test_train_rejects_short_iterators_and_past_steps(small_mnist):
    train_src, _ = small_mnist
    finite = itertools.islice(data.batch_stream(train_src, 16), 2)
    with pytest.raises(ValueError, match="ran out at step 2"):
        T.train(_cnn_state(), finite, 5, progress=False)
    state = _cnn_state().replace(step=jnp.asarray(9, jnp.int32))
    with pytest.raises(ValueError, match="beyond num_steps"):
        T.train(state, data.batch_stream(train_src, 16), 5, progress=False)


def test_write_results(tmp_path):
    path = T.write_results(tmp_path / "a" / "r.json",
                           {"acc": np.float32(0.5), "steps": jnp.asarray(3), "v": np.arange(2)})
    assert json.loads(path.read_text()) == {"acc": 0.5, "steps": 3, "v": [0, 1]}
    with pytest.raises(TypeError, match="cannot serialise"):
        T.write_results(tmp_path / "b.json", {"x": object()})


def test_models_without_train_or_rngs_and_call_kwargs():
    """A model whose __call__ takes no ``train`` trains through train.train, plain and
    compressed; static keyword arguments are forwarded; export takes them too."""
    import flax.linen as nn
    import optax

    import jaxjpq
    from jaxjpq import data, export, train

    class NoTrain(nn.Module):
        @nn.compact
        def __call__(self, x, scale: float = 1.0):
            x = nn.relu(nn.Dense(8)(x.reshape((x.shape[0], -1)))) * scale
            return nn.Dense(10)(x)

    model = NoTrain()
    rng = np.random.default_rng(0)
    src = data.ArraySource({"inputs": rng.random((16, 4, 4, 1)).astype(np.float32),
                            "labels": rng.integers(0, 10, 16).astype(np.int32)})
    x = src.arrays["inputs"][:2]
    v = model.init(jax.random.key(0), x)
    st = train.create_train_state(train.FlaxForward(model.apply, scale=2.0), v, optax.sgd(0.1))
    st, _ = train.train(st, data.batch_stream(src, 8, seed=0), 3, progress=False)
    assert int(st.step) == 3
    g = jaxjpq.trace.trace(model.apply, v, x, scale=2.0)
    pair = jaxjpq.init(g, v, spec=jaxjpq.CompressionSpec(bits=(4, 4), budget={"sparsity": 0.25}))
    tx = jaxjpq.geta(optax.sgd(0.05), steps=10)
    cst = train.create_train_state(jaxjpq.CompressedForward(model.apply, scale=2.0),
                                   {"params": pair}, tx)
    cst, _ = train.train(cst, data.batch_stream(src, 8, seed=0), 10, progress=False)
    assert float(jaxjpq.cost.sparsity(cst.params.compression)) == 0.25
    packed = export.pack({"params": cst.params.model}, cst.params.compression)
    want = jaxjpq.compress_apply(model.apply)({"params": cst.params.model},
                                                 cst.params.compression, x, scale=2.0)
    got = export.export_model(packed, model.apply, g, x, scale=2.0).call(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_pruning_a_graph_without_prunable_groups_is_a_clear_error():
    import flax.linen as nn
    import optax

    import jaxjpq

    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)

    model = One()
    x = jnp.ones((2, 4))
    v = model.init(jax.random.key(0), x)
    g = jaxjpq.trace.trace(model.apply, v, x)
    pair = jaxjpq.init(g, v, spec=jaxjpq.CompressionSpec(budget={"sparsity": 0.5}))
    with pytest.raises(ValueError, match="no prunable group.*Dense_0/kernel:out.*output"):
        jaxjpq.geta(optax.sgd(0.1), steps=10).init(pair)
    # quantize-only works on it
    q = jaxjpq.init(g, v, spec=jaxjpq.CompressionSpec(budget={"sparsity": 0.0}))
    tx = jaxjpq.geta(optax.sgd(0.1), steps=10)
    grads = jax.tree.map(jnp.zeros_like, q)
    tx.update(grads, tx.init(q), q)


def _largest_file(root):
    from pathlib import Path

    files = [p for p in Path(root).rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _corrupt_step(step_dir, fault):
    """Damage one checkpoint step directory the way a crash or a bad disk would."""
    import shutil
    from pathlib import Path

    step_dir = Path(step_dir)
    if fault == "removed_state":
        shutil.rmtree(step_dir / "state")
        return
    if fault == "empty_metadata":
        f = next(p for p in step_dir.rglob("_METADATA") if p.is_file())
        f.write_bytes(b"")
        return
    f = _largest_file(step_dir)
    blob = bytearray(f.read_bytes())
    if fault == "flip":
        blob[len(blob) // 2] ^= 0x10
    else:
        blob = blob[: len(blob) // 3]
    f.write_bytes(bytes(blob))


@pytest.mark.parametrize("fault", ["flip", "truncate", "removed_state", "empty_metadata"])
def test_corrupt_newest_checkpoint_is_set_aside_and_the_rerun_finishes(tmp_path, small_mnist,
                                                                         fault):
    train_src, _ = small_mnist
    mgr = T.checkpoint_manager(tmp_path / "ckpt", max_to_keep=None)
    T.train(_cnn_state(), data.batch_stream(train_src, 16), 4, manager=mgr, checkpoint_every=2,
            progress=False)
    assert sorted(mgr.all_steps()) == [2, 4]
    _corrupt_step(tmp_path / "ckpt" / "4", fault)
    # an explicit step is not moved, only refused
    with pytest.raises(T.CorruptCheckpointError, match="step 4"):
        T.restore_checkpoint(T.checkpoint_manager(tmp_path / "ckpt"), _cnn_state(), step=4)
    assert (tmp_path / "ckpt" / "4").is_dir()
    mgr = T.checkpoint_manager(tmp_path / "ckpt", max_to_keep=None)
    with pytest.warns(UserWarning, match="restored checkpoint step 2.*skipped step 4.*moved to"):
        state, _ = T.restore_checkpoint(mgr, _cnn_state())
    assert int(state.step) == 2
    assert (tmp_path / "ckpt.corrupt" / "4").is_dir() and not (tmp_path / "ckpt" / "4").exists()
    # the rerun passes step 4 again and writes it anew
    state, _ = T.train(state, data.batch_stream(train_src, 16, start_step=2), 6, manager=mgr,
                       checkpoint_every=2, progress=False)
    assert int(state.step) == 6 and sorted(mgr.all_steps()) == [2, 4, 6]
    again, _ = T.restore_checkpoint(T.checkpoint_manager(tmp_path / "ckpt"), _cnn_state())
    assert int(again.step) == 6


def test_a_full_disk_stops_with_one_line_before_writing_and_keeps_the_checkpoints(
        tmp_path, small_mnist, monkeypatch):
    import shutil

    train_src, _ = small_mnist
    mgr = T.checkpoint_manager(tmp_path / "ckpt")
    state, _ = T.train(_cnn_state(), data.batch_stream(train_src, 16), 2, manager=mgr,
                       checkpoint_every=2, progress=False)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real(p)._replace(free=300_000))  # less than a checkpoint
    with pytest.raises(T.CheckpointWriteError,
                       match=r"cannot write a checkpoint to .*ckpt: 0\.3 MiB free, a checkpoint "
                             r"needs about \d+\.\d MiB"):
        T.train(state, data.batch_stream(train_src, 16, start_step=2), 4, manager=mgr,
                checkpoint_every=2, progress=False)
    assert sorted(mgr.all_steps()) == [2]
    assert not list((tmp_path / "ckpt").glob("*tmp*"))  # nothing half written


def test_an_unwritable_checkpoint_directory_fails_before_the_first_step(tmp_path, small_mnist,
                                                                        monkeypatch):
    import errno
    import tempfile

    train_src, _ = small_mnist
    mgr = T.checkpoint_manager(tmp_path / "ckpt")

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    steps = []
    stream = (steps.append(b) or b for b in data.batch_stream(train_src, 16))
    with pytest.raises(T.CheckpointWriteError, match="cannot write checkpoints to .*ckpt: "
                                                     "Read-only file system"):
        T.train(_cnn_state(), stream, 4, manager=mgr, checkpoint_every=2, progress=False)
    assert not steps  # no batch was read, so no step was trained


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_a_model_returning_a_tuple_or_dict_trains_compressed_and_evaluates(kind):
    import jaxjpq

    class Heads(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            h = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
            logits = nn.Dense(10)(h)
            return (logits, x.mean()) if kind == "tuple" else {"aux": x.mean(), "logits": logits}

    rng = np.random.default_rng(0)
    src = data.ArraySource({"inputs": rng.random((32, 4, 4, 1)).astype(np.float32),
                            "labels": rng.integers(0, 10, 32).astype(np.int32)})
    m, x = Heads(), src.arrays["inputs"][:2]
    v = m.init(jax.random.key(0), x)
    g = jaxjpq.trace.trace(m.apply, v, x)
    pair = jaxjpq.init(g, v, spec=jaxjpq.CompressionSpec(bits=(4, 4), budget={"sparsity": 0.25}))
    # the tuple model trains with the default loss, the dict model with a loss of its own
    loss = {} if kind == "tuple" else {"loss_fn": lambda out, y: T.cross_entropy(
        out["logits"], y) + 0.0 * out["aux"]}
    st = T.create_train_state(jaxjpq.CompressedForward(m.apply), {"params": pair},
                              jaxjpq.geta(optax.adam(1e-3), steps=12), **loss)
    st, summary = T.train(st, data.batch_stream(src, 8), 12, progress=False)
    assert np.isfinite(summary["loss"]) and 0 <= summary["accuracy"] <= 1
    ev = T.evaluate(st, data.batches(src, 8, shuffle=False), 8)
    assert ev["count"] == 32 and np.isfinite(ev["loss"])
    with pytest.raises(ValueError, match="cannot find class logits.*logits_fn="):
        T.output_logits({"scores": jnp.zeros((2, 3))})

