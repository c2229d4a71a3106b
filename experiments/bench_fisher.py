"""Cost of FITCompress's per-sample Fisher pass: ``fit.fisher_sums`` over one batch (per-sample
gradients of every weight and every site input, in chunks) ÷ one batched backward pass
(``jax.grad`` of the mean loss) of the same batch, same model, one run.

    python -m experiments.bench_fisher [--model mnist_cnn] [--batch 128] [--chunk 128]
        [--method batched per_sample] [--rounds 5]

``batched``: one backward pass whose site contractions form the per-sample weight gradients;
``per_sample``: ``vmap(grad)`` of the whole model (see :func:`jaxjpq.fit.fisher`).

Both are timed after a warm-up call (compilation excluded), interleaved in rounds; medians.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import jax
import optax

from experiments.bench_setup import traced_model
from jaxjpq.methods import fit


def bench(name: str, batch: int, chunk: int, rounds: int, method: str) -> dict:
    model, x, y, v, g = traced_model(name, batch)

    @jax.jit
    def batched(params):
        def loss(p):
            logits = model.apply({**v, "params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return jax.grad(loss)(params)

    sums = fit.fisher_sums(model.apply, g, v, method=method)

    def per_sample():
        out = None
        for i in range(0, batch, chunk):
            out = sums(v["params"], x[i : i + chunk], y[i : i + chunk])
        return jax.block_until_ready(out)

    jax.block_until_ready(batched(v["params"]))
    per_sample()
    t_b, t_f = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(batched(v["params"]))
        t_b.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        per_sample()
        t_f.append(time.perf_counter() - t0)
    b, f = statistics.median(t_b), statistics.median(t_f)
    return dict(model=name, batch=batch, chunk=chunk, method=method, batched_s=b, fisher_s=f,
                ratio=f / b)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mnist_cnn")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--chunk", type=int, nargs="+", default=[128])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--method", nargs="+", default=["batched", "per_sample"],
                   choices=["batched", "per_sample"])
    a = p.parse_args(argv)
    for m, c in itertools.product(a.method, a.chunk):
        r = bench(a.model, a.batch, c, a.rounds, m)
        print(f"{r['model']:<12} {m:<10} batch {r['batch']:>4} chunk {r['chunk']:>4}: backward "
              f"{r['batched_s'] * 1e3:8.1f} ms, per-sample Fisher {r['fisher_s'] * 1e3:8.1f} ms,"
              f" ratio {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()
