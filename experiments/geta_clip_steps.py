"""Largest relative clip step ``quant_lr · g_qm / q_m`` of GETA's learned quantizers over a run of
the MNIST CNN GETA config (GETA's guard limits a step to halving ``q_m``, i.e. acts above 0.5).

    python -m experiments.geta_clip_steps [--steps 2000]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from experiments import run
from experiments.configs import geta_mnist_cnn
from jaxjpq import data as data_lib
from jaxjpq import train as train_lib


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    a = ap.parse_args(argv)
    c = geta_mnist_cnn.get_config()
    c.num_steps = a.steps
    model = run.build_model(c)
    splits, _, _ = run.build_data(c)
    ex = np.asarray(splits["train"].get(np.arange(1), np.random.default_rng(0))["inputs"])
    variables = jax.jit(model.init)(jax.random.PRNGKey(c.seed), ex)
    method = run.build_method(c, model, variables, ex, a.steps)
    st = train_lib.create_train_state(method["forward"], method["variables"], method["tx"], rng=1)
    lr = c.method.quant_lr

    @jax.jit
    def step(st, batch):
        def loss(params):
            logits, _ = st.forward(params, st.model_state, batch["inputs"],
                                   jax.random.PRNGKey(0), True)
            return train_lib.cross_entropy(logits, batch["labels"])

        grads = jax.grad(loss)(st.params)
        cs, gc = st.params[1], grads[1]
        ratios = [jnp.max(lr * table_g[n].q_m / table[n].q_m)
                  for table, table_g in ((cs.weight, gc.weight), (cs.act, gc.act))
                  for n in table if n not in cs.frozen]
        upd, opt = st.tx.update(grads, st.opt_state, st.params)
        new = st.replace(params=optax.apply_updates(st.params, upd), opt_state=opt,
                         step=st.step + 1)
        return new, jnp.max(jnp.stack(ratios))

    stream = data_lib.batch_stream(splits["train"], c.batch_size, seed=c.seed)
    worst = 0.0
    for _ in tqdm(range(a.steps), desc="geta"):
        st, r = step(st, next(stream))
        worst = max(worst, float(r))
    print(f"largest quant_lr * g_qm / q_m over {a.steps} steps: {worst:.4g} "
          "(the guard acts above 0.5)")
    return worst


if __name__ == "__main__":
    main()
