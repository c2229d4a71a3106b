"""Cost of FITCompress's per-sample Fisher pass: ``fit.fisher`` over one batch (per-sample
gradients of every weight and every site input, ``vmap(grad)`` in chunks) ÷ one batched
backward pass (``jax.grad`` of the mean loss) of the same batch, same model, one run.

    python -m experiments.bench_fisher [--model mnist_cnn] [--batch 128] [--chunk 32] [--rounds 5]

Both are timed after a warm-up call (compilation excluded), interleaved in rounds; medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
import optax

from jaxjpq.methods import fit
from jaxjpq.models.registry import get_model, input_spec
from jaxjpq.trace import trace


def bench(name: str, batch: int, chunk: int, rounds: int) -> dict:
    model = get_model(name)
    spec = input_spec(name, batch)
    rng = np.random.default_rng(0)
    x = rng.random(spec.shape).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    v = model.init(jax.random.key(0), x[:1])
    g = trace(model.apply, v, x[:2])

    @jax.jit
    def batched(params):
        def loss(p):
            logits = model.apply({**v, "params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return jax.grad(loss)(params)

    def per_sample():
        return fit.fisher(model.apply, g, v, [{"inputs": x, "labels": y}], chunk=chunk,
                          progress=False)

    jax.block_until_ready(batched(v["params"]))
    per_sample()
    t_b, t_f = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(batched(v["params"]))
        t_b.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        per_sample()  # returns host arrays: synchronous
        t_f.append(time.perf_counter() - t0)
    b, f = statistics.median(t_b), statistics.median(t_f)
    return dict(model=name, batch=batch, chunk=chunk, batched_s=b, fisher_s=f, ratio=f / b)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mnist_cnn")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--chunk", type=int, nargs="+", default=[32])
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    for c in a.chunk:
        r = bench(a.model, a.batch, c, a.rounds)
        print(f"{r['model']:<12} batch {r['batch']:>4} chunk {r['chunk']:>4}: batched backward "
              f"{r['batched_s'] * 1e3:8.1f} ms, per-sample Fisher {r['fisher_s'] * 1e3:8.1f} ms,"
              f" ratio {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()
