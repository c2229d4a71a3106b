"""The model you ship: dense float32 vs the float slim model vs the deployed model (slim, integer
weights dequantized in the forward), same batch, interleaved rounds in one process.

    python -m experiments.bench_deploy [--models mnist_cnn,resnet20,vit_tiny_mnist,bert_tiny]
                                       [--batches 1,128] [--rounds 15] [--act-t 1.0]

Per model, a fraction of every prunable group is masked (the units of least L2 norm; MNIST CNN
and ResNet-20 50 %, the ViT's heads and MLP units and BERT-tiny's 30 %) and every site's weight
and input get 4 bits (the first and last 8, the spec's default), calibrated on the batch
(exponent ``t`` = 1, the deployed quantizer without log / exp; ``--act-t`` sets another, as a
state that learned its exponents).
The deployed model runs the default path (``"auto"``: on CPU integer dots, float convs); the
weight-only and the all-integer paths run as two more entries, and ``tuned``: the deployed model
with its conv widths measured for the batch (:meth:`jaxjpq.deployment.DeployedModel.tuned`).
Reported per batch size: the median over rounds of each model's time ÷ the dense model's
(``slim``, ``deployed``, ``tuned``), the deployed and tuned ÷ the slim and the integer ÷ the
weight-only path, with quartiles; and the resident
bytes: dense float32, the deployed model's (and the cost model's
prediction, :func:`jaxjpq.cost.resident_bytes`) and the export's theoretical bytes.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

import jaxjpq
from experiments import timing
from experiments.bench_setup import random_inputs
from jaxjpq import cost
from jaxjpq.methods.core import magnitude
from jaxjpq.models.registry import get_model
from jaxjpq.quant import params_bits, step_from_bits
from jaxjpq.units import unit_index

PRUNE = {"mnist_cnn": 0.5, "resnet20": 0.5, "vit_tiny_mnist": 0.3, "bert_tiny": 0.3}


def magnitude_masks(state, variables, fraction: float) -> dict[str, np.ndarray]:
    """Keep-masks pruning ``fraction`` of every prunable group (rounded down, at least one unit
    kept): the units of least L2 norm."""
    index = unit_index(state.graph, variables)
    norms = np.asarray(magnitude(index, variables["params"]))
    masks = {}
    for gid, vals in zip(index.group_ids, np.split(norms, index.offsets[1:-1]), strict=True):
        k = np.ones(vals.size, bool)
        n = min(int(vals.size * fraction), vals.size - 1)
        k[np.argsort(vals, kind="stable")[:n]] = False
        masks[gid] = k.astype(np.float32)
    return masks


def setup(name: str, calib_batch: int = 8, act_t: float = 1.0):
    """``(model, variables, state)``: the model, its variables and the compressed state;
    ``act_t`` ≠ 1 gives every activation quantizer that exponent at its calibrated bits (as a
    state whose exponents were learned)."""
    model = get_model(name)
    x = random_inputs(name, model, calib_batch)
    variables = jax.jit(model.init)(jax.random.key(1), x[:1])
    pair = jaxjpq.init(model.apply, variables, x[:1], bits=(4, 4), init_bits=4)
    st = pair.compression
    st = st.replace(masks={k: jnp.asarray(m) for k, m in
                           magnitude_masks(st, variables, PRUNE.get(name, 0.5)).items()})
    st = jaxjpq.calibrate(jaxjpq.compress_apply(model.apply), variables, st, [x])
    if act_t != 1.0:
        sm = st.graph.site_map
        signed = {s.act_key: s.signed_input for s in sm.values()}
        st = st.replace(act={k: p.replace(t=jnp.full_like(p.t, act_t), d=step_from_bits(
            params_bits(p, signed[k]), p.q_m, act_t, signed[k])) for k, p in st.act.items()})
    return model, variables, st


def bench(name: str, batches: list[int], n_rounds: int, reps: int, act_t: float = 1.0) -> dict:
    model, variables, st = setup(name, act_t=act_t)
    deployed = jaxjpq.deploy(variables, st, warn_budget=False)  # path "auto"
    weight_only = jaxjpq.deploy(variables, st, path="weight_only", warn_budget=False)
    integer = jaxjpq.deploy(variables, st, path="integer", warn_budget=False)
    slim_fn, slim_vars = jaxjpq.slim(variables, st)
    dense = jax.jit(model.apply)
    slim_j = jax.jit(slim_fn)
    kw = jaxjpq.export.traced_kwargs(st.graph)
    dense_bytes = sum(int(np.asarray(a).nbytes) for a in jax.tree.leaves(variables))
    row = dict(model=name, prune=PRUNE.get(name, 0.5), act_t=act_t, dense_bytes=dense_bytes,
               resident=deployed.resident_bytes(), predicted=cost.resident_bytes(st),
               theoretical_bytes=cost.model_bits(st) / 8,
               integer_sites=len(deployed.meta["integer_sites"]), sites=len(st.graph.sites),
               batches={})
    for b in batches:
        x = random_inputs(name, model, b)
        ref = jaxjpq.compress_apply(model.apply)(variables, st, x, **kw)
        y = deployed(x)
        err = float(jnp.max(jnp.abs(y - ref)))
        err_int = float(jnp.max(jnp.abs(integer(x) - weight_only(x))))
        tuned = deployed.tuned(x)
        err_tuned = float(jnp.max(jnp.abs(tuned(x) - y)))
        t = timing.rounds({"dense": lambda x=x: dense(variables, x, **kw),
                           "slim": lambda x=x: slim_j(slim_vars, x, **kw),
                           "deployed": lambda x=x: deployed(x),
                           "tuned": lambda x=x, f=tuned: f(x),
                           "weight_only": lambda x=x: weight_only(x),
                           "integer": lambda x=x: integer(x)}, n_rounds, reps)
        row["batches"][b] = dict(ms=timing.median_ms(t), max_abs_diff=err,
                                 integer_vs_weight_only_diff=err_int,
                                 tuned_vs_deployed_diff=err_tuned,
                                 conv_widths=tuned.meta["conv_widths"],
                                 conv_taps=tuned.meta["conv_taps"],
                                 slim=timing.ratio(t, "slim", "dense"),
                                 deployed=timing.ratio(t, "deployed", "dense"),
                                 deployed_vs_slim=timing.ratio(t, "deployed", "slim"),
                                 tuned=timing.ratio(t, "tuned", "dense"),
                                 tuned_vs_slim=timing.ratio(t, "tuned", "slim"),
                                 integer_vs_weight_only=timing.ratio(t, "integer",
                                                                     "weight_only"))
    return row


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mnist_cnn,resnet20,vit_tiny_mnist,bert_tiny")
    ap.add_argument("--batches", default="1,128")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--act-t", type=float, default=1.0,
                    help="exponent t of every activation quantizer (1: none, no log / exp)")
    a = ap.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    rows = []
    for name in a.models.split(","):
        r = bench(name, batches, a.rounds, a.reps, a.act_t)
        rows.append(r)
        res = r["resident"]["total"]
        print(f"{name}: dense {r['dense_bytes']:,} B, deployed resident {res:,} B "
              f"({res / r['dense_bytes']:.2%}; cost model {r['predicted']['total']:,}), "
              f"export payload {r['theoretical_bytes']:,.0f} B")
        for b, m in r["batches"].items():
            print(f"  batch {b:>4}: dense {m['ms']['dense']:.3f} ms | "
                  + " | ".join(f"{k.replace('_', ' ')} {m[k]['median']:.3f} [{m[k]['q1']:.3f}, "
                               f"{m[k]['q3']:.3f}]"
                               for k in ("slim", "deployed", "deployed_vs_slim",
                                         "integer_vs_weight_only", "tuned", "tuned_vs_slim"))
                  + f" | max |deployed - compressed| {m['max_abs_diff']:.2e}, |integer - "
                  f"weight-only| {m['integer_vs_weight_only_diff']:.2e}, |tuned - deployed| "
                  f"{m['tuned_vs_deployed_diff']:.2e} | conv widths {m['conv_widths'] or '-'}, "
                  f"taps {', '.join(m['conv_taps']) or '-'}")
    print(json.dumps(rows, default=float))
    return rows


if __name__ == "__main__":
    main()
