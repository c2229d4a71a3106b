"""Per-step cost of the chained-transform check of the pair methods: a jitted GETA training step
(the forward, the gradient and the update) with the check, ÷ the same step with the check's two
functions (``_digest_leaves``, ``_tampered``) replaced by constants, same model and batch,
interleaved rounds in one process.

    python -m experiments.bench_pair_check [--models mnist_cnn] [--batch 128]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax

import jaxjpq
from experiments import timing
from experiments.bench_setup import random_inputs
from jaxjpq.methods import core
from jaxjpq.models.registry import get_model


def _step(model, pair, x, y, checked: bool):
    """A jitted GETA step and its first state; ``checked=False`` builds the transform with the
    check's functions replaced by constants."""
    saved = core._digest_leaves, core._tampered
    if not checked:
        core._digest_leaves = lambda c: (jnp.zeros((0,)), jnp.zeros((0,)))
        core._tampered = lambda values, expected: jnp.zeros((), bool)
    try:
        tx = jaxjpq.geta(optax.sgd(0.01, momentum=0.9), steps=100_000)
        fn = jaxjpq.compress_apply(model.apply)

        def loss(p):
            logits = fn(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        @jax.jit
        def step(p, o):
            g = jax.grad(loss)(p)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o

        opt_state = tx.init(pair)
        jax.block_until_ready(step(pair, opt_state))  # traced while the patch holds
    finally:
        core._digest_leaves, core._tampered = saved
    return step, opt_state


def bench(name: str, batch: int, n_rounds: int, reps: int) -> dict:
    model = get_model(name)
    x = random_inputs(name, model, batch)
    key = jax.random.key(0)
    variables = model.init(jax.random.key(1), x)
    classes = jax.eval_shape(model.apply, variables, x).shape[-1]
    y = jax.random.randint(key, (batch,), 0, classes)
    pair = jaxjpq.init(model.apply, variables, x[:1], bits=(2, 8), init_bits=4,
                       budget={"sparsity": 0.5})
    checked, o1 = _step(model, pair, x, y, True)
    plain, o0 = _step(model, pair, x, y, False)
    # the check changes no number: both steps give the same params and state, bit for bit
    same = all(bool(jnp.array_equal(a, b)) for a, b in zip(
        jax.tree.leaves(checked(pair, o1)[0]), jax.tree.leaves(plain(pair, o0)[0]), strict=True))
    t = timing.rounds({"checked": lambda: checked(pair, o1), "unchecked": lambda: plain(pair, o0)},
                      n_rounds, reps)
    return dict(model=name, batch=batch, leaves=len(jax.tree.leaves(pair.compression)),
                same_updates=same,
                **{f"{k}_ms": v for k, v in timing.median_ms(t).items()},
                ratio=timing.ratio(t, "checked", "unchecked"))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mnist_cnn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    rows = [bench(m, a.batch, a.rounds, a.reps) for m in a.models.split(",")]
    for r in rows:
        q = r["ratio"]
        print(f"{r['model']:>10} batch {r['batch']}: checked {r['checked_ms']:.2f} ms, "
              f"unchecked {r['unchecked_ms']:.2f} ms, ratio {q['median']:.3f} "
              f"[{q['q1']:.3f}, {q['q3']:.3f}]")
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
