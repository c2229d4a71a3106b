"""Does FIT rank damage like the real loss does? Spearman correlation between FIT and the
measured validation-loss increase (no fine-tune) over random configurations of the trained
MNIST CNN: per-layer weight bits uniform in [b_l, b_u], a global sparsity level uniform over the
first ``--max-level`` levels of FIT's schedule (importance ``F ⊙ θ²``).

    python -m experiments.fit_rank [--configs 40] [--seed 0] \\
        [--pretrain-dir runs/pretrain_mnist_cnn_s0]

The pre-trained model is the one the FIT runs of that seed share (trained here if absent).
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import optax

import jaxjpq
from experiments import run
from experiments.configs import fit_mnist_cnn
from jaxjpq import data as data_lib
from jaxjpq.methods import fit


def spearman(a, b) -> float:
    """Spearman rank correlation (no ties expected)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-dir", default="")
    p.add_argument("--fisher-samples", type=int, default=1024)
    p.add_argument("--eval-samples", type=int, default=5000)
    p.add_argument("--max-level", type=int, default=34)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    c = fit_mnist_cnn.get_config()
    c.seed = a.seed
    c.progress = False
    c.method.pretrain_dir = a.pretrain_dir or f"runs/pretrain_mnist_cnn_s{a.seed}"
    model = run.build_model(c)
    splits, _, _ = run.build_data(c)
    train_src, val = splits["train"], splits["val"]
    ex = np.asarray(train_src.get(np.arange(1), np.random.default_rng(0))["inputs"])
    variables = jax.jit(model.init)(jax.random.PRNGKey(c.seed), ex)
    v = run._pretrain(c, model, variables, train_src, None)
    g = jaxjpq.trace.trace(model.apply, v, ex)
    st = jaxjpq.init_state(g, jaxjpq.CompressionSpec(bits=tuple(c.method.bits)), v)
    rng = np.random.default_rng(a.seed)
    calib = [np.asarray(train_src.get(rng.integers(0, len(train_src), 128), rng)["inputs"])
             for _ in range(4)]
    fwd = jaxjpq.compress_apply(model.apply)
    st = jaxjpq.calibrate(fwd, v, st, calib)
    for n in st.act:
        if n not in st.frozen:
            st = jaxjpq.set_bits(st, n, float(c.method.bits[1]), kind="act")
    info = fit.fisher(model.apply, g, v, data_lib.batches(train_src, 128, seed=a.seed + 2000),
                      chunk=32, max_samples=a.fisher_samples, progress=False)
    xv = val.arrays["inputs"][: a.eval_samples]
    yv = val.arrays["labels"][: a.eval_samples]

    @jax.jit
    def loss(state, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(fwd(v, state, x), y).mean()

    def val_loss(state):
        return float(np.mean([loss(state, xv[i:i + 1000], yv[i:i + 1000])
                              for i in range(0, len(xv), 1000)]))

    base = val_loss(st.replace(weight=dict(st.weight)))
    lv = fit.sparsity_levels(int(c.method.levels))
    tables, counts = fit._tables(info, st, v, lv)
    fits, damage, rows = [], [], []
    for _ in range(a.configs):
        node = (*[int(rng.integers(0, len(t.bits))) for t in tables],
                int(rng.integers(0, a.max_level + 1)))
        cand = fit._to_state(st, tables, counts, node)
        f = fit.fit_score(info, cand, v)
        d = val_loss(cand) - base
        fits.append(f)
        damage.append(d)
        rows.append(dict(bits=[t.bits[b] for t, b in zip(tables, node[:-1], strict=True)],
                         sparsity=float(lv[node[-1]]), fit=f, loss_increase=d))
    rho = spearman(fits, damage)
    out = dict(spearman=rho, configs=a.configs, seed=a.seed, base_val_loss=base, rows=rows)
    print(f"Spearman(FIT, val-loss increase) over {a.configs} configurations: {rho:.3f}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
