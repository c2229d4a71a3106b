"""Overhead of the compressed forward: jitted train step with ``compress_apply`` (weights and
activations fake-quantized, masks on) ÷ the plain jitted train step, same model and batch.

    python -m experiments.bench_overhead [--steps 10] [--rounds 16] [--learn-t both]
    python -m experiments.bench_overhead --method geta --learn-t yes   # GETA step vs plain SGD
    python -m experiments.bench_overhead --method djpq --learn-t no    # DJPQ step vs plain SGD

Plain and compressed steps are interleaved in rounds (to cancel machine noise); each round times
``--steps`` steps of each with ``block_until_ready``, plain first in even rounds and last in odd
ones. Reported: the median over rounds of the round's compressed / plain time, with its
quartiles over rounds; the fastest compressed round / the fastest plain round (the least disturbed
by other work on a shared machine); the median per-step times. The graph comes from
``jaxjpq.trace``. Models: MNIST CNN, ViT-tiny (MNIST) and BERT-tiny (random token ids, sequence
128) by default, any registry name with ``--models``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.bench_setup import random_inputs
from jaxjpq.compress import calibrate, compress_apply
from jaxjpq.models.registry import get_model
from jaxjpq.state import CompressionSpec, init_state
from jaxjpq.trace import trace

PARTS = {  # what the compressed step quantizes (masks are always on)
    "all": dict(quantize_weights=True, quantize_activations=True),
    "weights": dict(quantize_weights=True, quantize_activations=False),
    "acts": dict(quantize_weights=False, quantize_activations=True),
    "masks": dict(quantize_weights=False, quantize_activations=False),
}


def bench(
    name: str, batch: int, steps: int, rounds: int, learn_t: bool, part: str = "all",
    method: str = "sgd",
) -> dict:
    model = get_model(name)
    x = random_inputs(name, model, batch, first_id=0)
    key = jax.random.key(0)
    variables = model.init(jax.random.key(1), x)
    classes = jax.eval_shape(model.apply, variables, x).shape[-1]
    y = jax.random.randint(key, (batch,), 0, classes)
    graph = trace(model.apply, variables, x)
    cfn = compress_apply(model.apply)
    cspec = CompressionSpec(bits=(2, 8), init_bits=4, learn_t=learn_t, **PARTS[part])
    state = init_state(graph, cspec, variables)
    state = calibrate(cfn, variables, state, [x])
    rng = np.random.default_rng(0)  # prune ~25 % of every group
    state = state.replace(masks={k: jnp.asarray(rng.random(m.shape) > 0.25, jnp.float32)
                                 for k, m in state.masks.items()})
    opt = optax.sgd(0.01, momentum=0.9)
    # GETA wraps the same SGD; its stage is chosen by lax ops, so every step costs the same
    # (the saliency scores run only at a joint period's first step).
    comp_opt = opt
    gate_key = None
    if method == "geta":
        from jaxjpq.methods.geta import geta

        comp_opt = geta(opt, steps=100_000, sparsity=0.5)
    if method == "djpq":
        # The search stage, the costliest: gates sampled (fixed key: same work), penalty gradient
        # every step (warm-up 0; the state stays above the target).
        from jaxjpq.methods import djpq

        dspec = dataclasses.replace(cspec, learn_t=False)
        state = djpq.init_state(graph, dspec, variables, key=key).replace(masks=state.masks,
                                                                          act=state.act)
        comp_opt = djpq.djpq(opt, steps=100_000, target_bops=0.01, warmup=0)
        gate_key = jax.random.key(7)

    def ce(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def plain_step(params, opt_state):
        loss, g = jax.value_and_grad(lambda p: ce(model.apply({"params": p}, x)))(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    @jax.jit
    def comp_step(pq, opt_state):
        def loss_fn(pq):
            p, s = pq
            return ce(cfn({"params": p}, s, x, gate_key=gate_key))

        loss, g = jax.value_and_grad(loss_fn)(pq)
        upd, opt_state = comp_opt.update(g, opt_state, pq)
        return optax.apply_updates(pq, upd), opt_state, loss

    p_plain = variables["params"]
    o_plain = opt.init(p_plain)
    pq = (variables["params"], state)
    o_comp = comp_opt.init(pq)
    for _ in range(3):  # compile + warm up
        p_plain, o_plain, lp = plain_step(p_plain, o_plain)
        pq, o_comp, lc = comp_step(pq, o_comp)
    jax.block_until_ready((lp, lc))

    def timed(step, a, o):
        t0 = time.perf_counter()
        for _ in range(steps):
            a, o, loss = step(a, o)
        jax.block_until_ready(loss)
        return a, o, (time.perf_counter() - t0) / steps

    t_plain, t_comp = [], []
    for i in range(rounds):
        # the order alternates so that a steady drift of the machine's speed cancels
        if i % 2:
            pq, o_comp, tc = timed(comp_step, pq, o_comp)
            p_plain, o_plain, tp = timed(plain_step, p_plain, o_plain)
        else:
            p_plain, o_plain, tp = timed(plain_step, p_plain, o_plain)
            pq, o_comp, tc = timed(comp_step, pq, o_comp)
        t_plain.append(tp)
        t_comp.append(tc)
    ratios = [c / p for c, p in zip(t_comp, t_plain, strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if rounds > 1 else ratios * 3
    return dict(model=name, batch=batch, sites=len(graph.sites), learn_t=learn_t, part=part,
                method=method, plain_ms=1e3 * statistics.median(t_plain),
                compressed_ms=1e3 * statistics.median(t_comp),
                ratio=statistics.median(ratios), ratio_q1=q1, ratio_q3=q3,
                ratio_min=min(t_comp) / min(t_plain))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mnist_cnn,vit_tiny_mnist,bert_tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--learn-t", choices=("yes", "no", "both"), default="both")
    ap.add_argument("--parts", default="all", help="comma list of " + "/".join(PARTS))
    ap.add_argument("--method", choices=("sgd", "geta", "djpq"), default="sgd",
                    help="optimizer of the compressed step: the same SGD, or GETA around it")
    a = ap.parse_args(argv)
    out = []
    print(f"backend: {jax.default_backend()}  devices: {jax.devices()}")
    flags = {"yes": (True,), "no": (False,), "both": (True, False)}[a.learn_t]
    runs = [(n, f, p) for n in a.models.split(",") for f in flags for p in a.parts.split(",")]
    for name, lt, part in runs:
        r = bench(name, a.batch, a.steps, a.rounds, lt, part, a.method)
        out.append(r)
        print(f"{r['model']:<16} {part:<7} {a.method:<4} learn_t={lt!s:<5} "
              f"batch={r['batch']} "
              f"sites={r['sites']:<3} "
              f"plain {r['plain_ms']:.2f} ms  compressed {r['compressed_ms']:.2f} ms  "
              f"ratio {r['ratio']:.3f}x (quartiles {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}, "
              f"fastest rounds {r['ratio_min']:.3f}x)",
              flush=True)
    return out


if __name__ == "__main__":
    main()
