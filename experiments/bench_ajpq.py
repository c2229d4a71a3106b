"""Speed of AJPQ's candidate evaluator: candidates per second scored one at a time (a jitted
call per policy) vs as a population (one call, ``vmap`` over the stacked policies), same model,
reward set and policies, one run. A candidate is array values only, so each evaluator compiles
once (compilation excluded: a warm-up call first).

    python -m experiments.bench_ajpq [--model mnist_cnn] [--samples 2000] [--population 16]
        [--rounds 3] [--size 0.1] [--mode auto map vmap]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import jaxjpq
from experiments.bench_setup import traced_model
from jaxjpq.methods import ajpq


def bench(name: str, samples: int, population: int, rounds: int, size: float,
          mode: str = "auto") -> dict:
    model, x, y, v, g = traced_model(name, samples)
    rng = np.random.default_rng(0)
    st = jaxjpq.init_state(g, jaxjpq.CompressionSpec(bits=(2, 8)), v)
    st = jaxjpq.calibrate(jaxjpq.compress_apply(model.apply), v, st, [x[:128]])
    env = ajpq.make_env(st, size=size)
    evaluate = jax.jit(ajpq.make_evaluator(model.apply, st, v, env, x, y, population=mode))
    acts = rng.random((population, len(env.sites), env.action_dim)).astype(np.float32)

    def one_at_a_time():
        return [jax.block_until_ready(evaluate(acts[i : i + 1])) for i in range(population)]

    def batched():
        return jax.block_until_ready(evaluate(acts))

    one_at_a_time()
    batched()
    t1, tb = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        one_at_a_time()
        t1.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        batched()
        tb.append(time.perf_counter() - t0)
    a, b = population / statistics.median(t1), population / statistics.median(tb)
    return dict(model=name, samples=samples, population=population, mode=mode, one_per_s=a,
                batched_per_s=b, ratio=b / a)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mnist_cnn")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=float, default=0.1)
    p.add_argument("--mode", nargs="+", default=["auto"], choices=["auto", "map", "vmap"],
                   help="how the population's forwards run (see ajpq.make_evaluator)")
    a = p.parse_args(argv)
    for mode in a.mode:
        report(bench(a.model, a.samples, a.population, a.rounds, a.size, mode))


def report(r: dict) -> None:
    print(f"{r['model']}: {r['samples']} reward samples, population {r['population']} "
          f"({r['mode']}): "
          f"{r['one_per_s']:.2f} candidates/s one at a time, {r['batched_per_s']:.2f} batched, "
          f"ratio {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()
