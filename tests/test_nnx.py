"""nnx modules end to end through the functional adapter: trace, init, GETA training through
train.train (BatchNorm statistics updated as statistics), slim, export; the README snippet."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxjpq
from jaxjpq import data, export, train


class Block(nnx.Module):
    def __init__(self, c: int, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
        self.b1 = nnx.BatchNorm(c, rngs=rngs)
        self.c2 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
        self.b2 = nnx.BatchNorm(c, rngs=rngs)

    def __call__(self, x):
        y = nnx.relu(self.b1(self.c1(x)))
        return nnx.relu(x + self.b2(self.c2(y)))


class ResNet(nnx.Module):
    """Stem conv-BN, two residual blocks, global pool, dense head."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.blocks = nnx.List([Block(8, rngs) for _ in range(2)]) if hasattr(nnx, "List") \
            else [Block(8, rngs) for _ in range(2)]
        self.mid = nnx.Conv(8, 12, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(12, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.stem(x)))
        for b in self.blocks:
            x = b(x)
        x = nnx.relu(self.mid(x))
        return self.head(x.mean(axis=(1, 2)))


def _source(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return data.ArraySource({"inputs": rng.random((n, 8, 8, 1)).astype(np.float32),
                             "labels": rng.integers(0, 10, n).astype(np.int32)})


def test_nnx_resnet_trains_slims_and_exports():
    model = jaxjpq.nnx.split(ResNet(nnx.Rngs(0)))
    v = model.variables
    assert set(v) == {"params", "batch_stats"}
    src = _source()
    x = src.arrays["inputs"][:4]
    g = jaxjpq.trace.trace(model.apply, v, x)
    assert g.prunable_groups and g.coverage == 1.0
    pair = jaxjpq.init(g, v, spec=jaxjpq.CompressionSpec(bits=(4, 4), budget={"sparsity": 0.25}))
    tx = jaxjpq.geta(optax.adam(1e-3), steps=12)
    st = train.create_train_state(jaxjpq.CompressedForward(model.apply),
                                  {"params": pair, "batch_stats": v["batch_stats"]}, tx)
    st, _ = train.train(st, data.batch_stream(src, 8, seed=0), 12, progress=False)
    # statistics moved as statistics; the params (and the optimizer) never see them
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), st.model_state["batch_stats"],
                         v["batch_stats"])
    assert max(jax.tree.leaves(moved)) > 0
    assert "batch_stats" not in st.params.model and "mean" not in str(
        jax.tree_util.tree_structure(st.params.model))
    assert float(jaxjpq.cost.sparsity(st.params.compression)) == pytest.approx(0.25, abs=0.03)
    trained = {"params": st.params.model, **st.model_state}
    fwd = jaxjpq.compress_apply(model.apply)
    want = fwd(trained, st.params.compression, x)
    masks = jaxjpq.state.boolean_masks(st.params.compression)
    slim_fn, slim_vars = jaxjpq.slim(trained, masks, graph=g)
    np.testing.assert_allclose(slim_fn(slim_vars, x),
                               model.apply(jaxjpq.apply_masks(g, trained, masks), x),
                               rtol=1e-4, atol=1e-5)
    packed = export.pack(trained, st.params.compression)
    np.testing.assert_allclose(export.inference_fn(packed, model.apply, g)(x), want,
                               rtol=1e-5, atol=1e-5)
    back = jaxjpq.nnx.merge(model, trained)
    back.eval()
    np.testing.assert_allclose(back(x), model.apply(trained, x), rtol=1e-6)


def test_nnx_dropout_draws_from_the_step_key_in_training_and_is_off_in_eval():
    class Drop(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(8 * 8, 32, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.out = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            return self.out(self.drop(nnx.relu(self.lin(x.reshape(x.shape[0], -1)))))

    model = jaxjpq.nnx.split(Drop(nnx.Rngs(0)))
    v, x = model.variables, _source().arrays["inputs"][:4]
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a = model.apply(v, x, train=True, rngs={"dropout": k1})
    np.testing.assert_array_equal(a, model.apply(v, x, train=True, rngs={"dropout": k1}))
    assert not np.allclose(a, model.apply(v, x, train=True, rngs={"dropout": k2}))
    np.testing.assert_array_equal(model.apply(v, x), model.apply(v, x))  # eval: no dropout
    with pytest.raises(ValueError, match="draws random numbers in training.*rngs="):
        model.apply(v, x, train=True)
    g = jaxjpq.trace.trace(model.apply, v, x)
    pair = jaxjpq.init(g, v, spec=jaxjpq.CompressionSpec(bits=(4, 4), budget={"sparsity": 0.25}))
    st = train.create_train_state(jaxjpq.CompressedForward(model.apply), {"params": pair},
                                  jaxjpq.geta(optax.adam(1e-3), steps=12))
    st, summary = train.train(st, data.batch_stream(_source(), 8, seed=0), 12, progress=False)
    assert np.isfinite(summary["loss"])
    assert float(jaxjpq.cost.sparsity(st.params.compression)) == pytest.approx(0.25, abs=0.03)


def test_readme_nnx_snippet_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"<!-- nnx-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README has no nnx example"
    exec(compile(m.group(1), "README nnx example", "exec"), {})
