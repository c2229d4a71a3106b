"""Slim latency: ResNet-20 with 50 % of every prunable group removed vs the dense model
(jit, same batch, measured in one run; goal ratio <= 0.4).

Also times the same architecture built natively at the kept widths (``widths`` halved), the
best any slimming can do on this backend: it separates the cost of XLA's convolutions at small
channel counts from any overhead of the slim function. The three run interleaved, medians.

Run: python -m experiments.bench_slim [--batch 64] [--reps 20]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxjpq.models.registry import get_model
from jaxjpq.slim import slim
from jaxjpq.trace import trace


def _time_interleaved(calls: dict, reps: int) -> dict[str, float]:
    """Median seconds per call of each ``name: (fn, args)``, the calls taken in turn."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(reps):
        for k, (fn, args) in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--keep", type=float, default=0.5)
    a = ap.parse_args()
    m = get_model(a.model)
    x = jax.random.normal(jax.random.PRNGKey(1), (a.batch, 32, 32, 3))
    v = jax.jit(m.init)(jax.random.PRNGKey(0), x[:1])
    g = trace(m.apply, v, x[:1])
    masks = {}
    for grp in g.prunable_groups:
        k = np.zeros(grp.size, bool)
        k[: max(1, int(round(grp.size * a.keep)))] = True
        masks[grp.id] = k
    fn, sv = slim(v, masks, graph=g)
    calls = {"dense": (jax.jit(m.apply), (v, x)), "slim": (jax.jit(fn), (sv, x))}
    widths = getattr(m, "widths", None)
    if widths is not None:
        native = get_model(a.model, widths=tuple(max(1, round(w * a.keep)) for w in widths))
        nv = jax.jit(native.init)(jax.random.PRNGKey(0), x[:1])
        calls["native"] = (jax.jit(native.apply), (nv, x))
    t = _time_interleaved(calls, a.reps)
    n_dense, n_slim = g.param_count(), g.param_count(masks)
    line = (
        f"{a.model} batch {a.batch}: dense {t['dense'] * 1e3:.2f} ms, slim {t['slim'] * 1e3:.2f} "
        f"ms, ratio {t['slim'] / t['dense']:.3f}"
    )
    if "native" in t:
        line += f"; natively built at kept widths {t['native'] / t['dense']:.3f}"
    print(line + f"; params {n_dense} -> {n_slim} ({n_slim / n_dense:.3f})")


if __name__ == "__main__":
    main()
