"""The model zoo's ``max_pool`` against ``flax.linen.max_pool`` (``reduce_window``): the pool's
forward + backward alone, and the MNIST CNN's plain train step with either pool, same batch.

    python -m experiments.bench_pool [--batch 128] [--steps 10] [--rounds 8]

Each pair is timed in alternating rounds in one process; reported: the fastest round of each
(ms per call) and their ratio.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxjpq.models import cnn


def _flax_pool(x, size=2):
    return nn.max_pool(x, (size, size), strides=(size, size))


def _fastest(fns: dict, args: dict, steps: int, rounds: int) -> dict:
    best = {k: float("inf") for k in fns}
    for k, f in fns.items():  # compile
        jax.block_until_ready(f(*args[k]))
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            for _ in range(steps):
                out = fns[k](*args[k])
            jax.block_until_ready(out)
            best[k] = min(best[k], (time.perf_counter() - t0) / steps)
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args(argv)
    key = jax.random.key(0)
    x = jax.nn.relu(jax.random.normal(key, (a.batch, 28, 28, 32)))
    gw = jax.random.normal(jax.random.key(1), (a.batch, 14, 14, 32))
    pools = {"flax": _flax_pool, "zoo": cnn.max_pool}
    grads = {k: jax.jit(jax.grad(lambda x, p=p: jnp.sum(p(x) * gw))) for k, p in pools.items()}
    t = _fastest(grads, {k: (x,) for k in grads}, a.steps, a.rounds)
    out = {"pool_flax_ms": 1e3 * t["flax"], "pool_zoo_ms": 1e3 * t["zoo"]}
    print(f"pool [{a.batch}, 28, 28, 32] forward + backward: flax {out['pool_flax_ms']:.2f} ms, "
          f"zoo {out['pool_zoo_ms']:.2f} ms ({t['flax'] / t['zoo']:.1f}x)", flush=True)

    images = jax.random.uniform(key, (a.batch, 28, 28, 1))
    labels = jax.random.randint(key, (a.batch,), 0, 10)
    model = cnn.MnistCNN()
    params = model.init(jax.random.key(1), images)["params"]
    opt = optax.sgd(0.01, momentum=0.9)

    def make_step(pool):
        def loss(p):
            with mock.patch.object(cnn, "max_pool", pool):
                logits = model.apply({"params": p}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        @jax.jit
        def step(p, o):
            g = jax.grad(loss)(p)
            u, o = opt.update(g, o, p)
            return optax.apply_updates(p, u), o
        return step

    steps = {k: make_step(p) for k, p in pools.items()}
    t = _fastest(steps, {k: (params, opt.init(params)) for k in steps}, a.steps, a.rounds)
    out.update(step_flax_ms=1e3 * t["flax"], step_zoo_ms=1e3 * t["zoo"])
    print(f"MNIST CNN train step, batch {a.batch}: flax pool {out['step_flax_ms']:.1f} ms, zoo "
          f"pool {out['step_zoo_ms']:.1f} ms ({t['flax'] / t['zoo']:.2f}x)", flush=True)
    return out


if __name__ == "__main__":
    main()
