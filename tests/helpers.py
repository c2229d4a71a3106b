"""Builders the test modules share: the hand-built QADG of ``MnistCNN``, a small CNN with its
variables and example batch, GETA's standard setup, a jitted training loop that may trace once,
random MNIST-shaped data, and the interrupted-vs-full resume check."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxjpq import data, train
from jaxjpq.compress import compress_apply
from jaxjpq.graph import Graph, Group, Site, Slice
from jaxjpq.models import MnistCNN
from jaxjpq.state import CompressionSpec, init_state

P = "params"


def _units(n):
    return np.arange(n).reshape(n, 1)



def mnist_cnn_graph(f1=32, f2=64, hidden=128, classes=10, side=28) -> Graph:
    """Hand-built QADG of ``MnistCNN(features=(f1, f2), hidden=hidden)`` on ``side²`` images."""
    s2, s4 = side // 2, side // 4
    flat = s4 * s4

    def group(name, n, axis, dependents, prunable=True, reason=""):
        params = (
            Slice(P, (name, "kernel"), axis, _units(n)),
            Slice(P, (name, "bias"), 0, _units(n)),
        )
        return Group(f"{name}/kernel:out", n, params, dependents, prunable, reason)

    groups = (
        group("Conv_0", f1, 3, (Slice(P, ("Conv_1", "kernel"), 2, _units(f1)),)),
        # flatten of [s4, s4, f2] (row-major): channel c owns rows c + f2·p, p < s4·s4
        group("Conv_1", f2, 3,
              (Slice(P, ("Dense_0", "kernel"), 0, np.arange(flat * f2).reshape(flat, f2).T),)),
        group("Dense_0", hidden, 1, (Slice(P, ("Dense_1", "kernel"), 0, _units(hidden)),)),
        group("Dense_1", classes, 1, (), False, "network output"),
    )
    m0 = side * side * 9 * f1
    m1 = s2 * s2 * 9 * f1 * f2
    m2 = flat * f2 * hidden
    m3 = hidden * classes
    sites = (
        Site("Conv_0", (P, "Conv_0", "kernel"), "conv", (3, 3, 1, f1), (3,), (2,), m0, m0,
             "Conv_0/kernel:out", None, True),
        Site("Conv_1", (P, "Conv_1", "kernel"), "conv", (3, 3, f1, f2), (3,), (2,), m1, m1,
             "Conv_1/kernel:out", "Conv_0/kernel:out", False),
        Site("Dense_0", (P, "Dense_0", "kernel"), "dot", (flat * f2, hidden), (1,), (0,), m2, m2,
             "Dense_0/kernel:out", "Conv_1/kernel:out", False),
        Site("Dense_1", (P, "Dense_1", "kernel"), "dot", (hidden, classes), (1,), (0,), m3, m3,
             "Dense_1/kernel:out", "Dense_0/kernel:out", False),
    )
    return Graph(groups, sites, batch_size=1)



def small_cnn(f1=4, f2=8, hidden=16, seed=0):
    """(model, variables, graph, example batch [2, 28, 28, 1]) for a small MnistCNN."""
    model = MnistCNN(features=(f1, f2), hidden=hidden)
    x = jax.random.uniform(jax.random.key(seed + 1), (2, 28, 28, 1))
    variables = model.init(jax.random.key(seed), x)
    return model, variables, mnist_cnn_graph(f1, f2, hidden), x



def geta_setup(bits=(2.0, 4.0), sparsity=0.5):
    """``(model, variables, graph, x, spec, state)``: :func:`small_cnn` at ``bits`` and a sparsity
    budget."""
    model, v, g, x = small_cnn()
    spec = CompressionSpec(bits=bits, budget={"sparsity": sparsity})
    cstate = init_state(g, spec, v)
    return model, v, g, x, spec, cstate



def run_steps(model, v, g, x, spec, cstate, steps, tx):
    """``steps`` jitted steps of ``tx`` on one batch (the step may trace once). Returns
    ``(params, state, opt_state, history)``, ``history`` the host copy after each step."""
    fn = compress_apply(model.apply)
    y = jnp.arange(x.shape[0]) % 10
    rest = {k: val for k, val in v.items() if k != "params"}

    def loss(params, cs):
        logits = fn({"params": params, **rest}, cs, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, cs, opt_state):
        grads = jax.grad(loss, argnums=(0, 1))(params, cs)
        updates, opt_state = tx.update(grads, opt_state, (params, cs))
        params, cs = optax.apply_updates((params, cs), updates)
        return params, cs, opt_state

    params = v["params"]
    opt_state = tx.init((params, cstate))
    history = []
    for _ in range(steps):
        params, cstate, opt_state = step(params, cstate, opt_state)
        history.append(jax.tree.map(np.asarray, (params, cstate)))
    return params, cstate, opt_state, history



def random_source(n: int, seed: int = 0):
    """``n`` random 28x28x1 images with random labels, as a ``data.ArraySource``."""
    rng = np.random.default_rng(seed)
    return data.ArraySource(
        {"inputs": rng.uniform(size=(n, 28, 28, 1)).astype(np.float32),
         "labels": rng.integers(0, 10, n).astype(np.int32)}
    )



def interrupted_and_full(make_state, src, batch, steps, stop, ckpt_dir, **full_kwargs):
    """Train ``steps`` uninterrupted, and ``stop`` steps into an orbax checkpoint that a fresh
    state restores and trains on to ``steps``; checks that both end with the same masks, weight
    quantizers and model params. Returns ``(full, full_summary, resumed)``."""
    full, summary = train.train(make_state(), data.batch_stream(src, batch, seed=0), steps,
                                progress=False, **full_kwargs)
    mgr = train.checkpoint_manager(ckpt_dir)
    train.train(make_state(), data.batch_stream(src, batch, seed=0), stop, manager=mgr,
                checkpoint_every=stop, progress=False)
    restored, _ = train.restore_checkpoint(mgr, make_state())
    assert int(restored.step) == stop
    resumed, _ = train.train(restored, data.batch_stream(src, batch, seed=0, start_step=stop),
                             steps, progress=False)
    chex.assert_trees_all_equal(resumed.params[1].masks, full.params[1].masks)
    chex.assert_trees_all_close(resumed.params[1].weight, full.params[1].weight, rtol=1e-6)
    chex.assert_trees_all_close(resumed.params[0], full.params[0], atol=1e-6)
    return full, summary, resumed
