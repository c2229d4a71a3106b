"""slim tests: slim forward == masked forward for random keep-masks, param counts, batch sizes."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from archs import ARCHS, ZOO, build, build_nnx, build_zoo, random_variables

from jaxjpq.slim import apply_masks, slim
from jaxjpq.trace import trace


def _random_masks(g, rng, p=0.5):
    masks = {}
    for grp in g.prunable_groups:
        m = rng.random(grp.size) > p
        m[rng.integers(grp.size)] = True  # keep at least one unit
        masks[grp.id] = m
    return masks


def _n_params(tree):
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def _check(apply_fn, v, x, g, masks, batches=(None,), **kw):
    fn, sv = slim(v, masks, graph=g)
    vm = apply_masks(g, v, masks)
    for b in batches:
        xb = x if b is None else jnp.concatenate([x] * 3, axis=0)[:b]
        chex.assert_trees_all_close(fn(sv, xb, **kw), apply_fn(vm, xb, **kw), atol=1e-5)
    assert _n_params(sv["params"]) == g.param_count(masks)
    return fn, sv


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_slim_equals_masked_forward(name):
    m, v, x = build(name)
    g = trace(m.apply, v, x)
    assert g.prunable_groups
    rng = np.random.default_rng(sum(map(ord, name)))
    _check(m.apply, v, x, g, _random_masks(g, rng), batches=(None, 3))


def test_slim_nnx():
    apply_fn, v, x = build_nnx()
    g = trace(apply_fn, v, x)
    masks = _random_masks(g, np.random.default_rng(0))
    _check(apply_fn, v, x, g, masks, batches=(None, 5))


@pytest.mark.parametrize("name", ZOO)
def test_slim_zoo(name):
    m, v, x = build_zoo(name)
    g = trace(m.apply, v, x)
    masks = _random_masks(g, np.random.default_rng(1))
    fn, sv = slim(v, masks, graph=g)
    out = jax.jit(fn)(sv, x)
    ref = jax.jit(m.apply)(apply_masks(g, v, masks), x)
    # Random BN statistics blow deep nets' outputs up to ~1e10: compare relative to the scale.
    scale = max(1.0, float(jnp.max(jnp.abs(ref))))
    chex.assert_trees_all_close(out / scale, ref / scale, atol=1e-5)
    assert _n_params(sv["params"]) == g.param_count(masks) < g.param_count()


def test_resnet20_group_counts():
    from jaxjpq.models.registry import get_model

    m = get_model("resnet20")
    x = jnp.zeros((2, 32, 32, 3))
    v = random_variables(jax.eval_shape(m.init, jax.random.PRNGKey(0), x))
    g = trace(m.apply, v, x)
    sizes = sorted(grp.size for grp in g.prunable_groups)
    # 3 residual stages tie stem/block outputs into groups of 16/32/64; 9 inner convs 3x(16,32,64)
    assert sizes == sorted([16, 32, 64] + [16] * 3 + [32] * 3 + [64] * 3)
    stage = [grp for grp in g.prunable_groups if len(grp.params) > 3]
    assert sorted(grp.size for grp in stage) == [16, 32, 64]


def test_train_mode_batch_stats_are_sliced():
    m, v, x = build("resbn")
    g = trace(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"]), v, x)
    masks = _random_masks(g, np.random.default_rng(3))
    fn, sv = slim(v, masks, graph=g)
    out, upd = fn(sv, x)
    ref, ref_upd = m.apply(apply_masks(g, v, masks), x, train=True, mutable=["batch_stats"])
    chex.assert_trees_all_close(out, ref, atol=1e-5)
    chex.assert_trees_all_equal_shapes(upd["batch_stats"], sv["batch_stats"])
    kept = int(masks["Conv_0/kernel:out"].sum())
    assert sv["batch_stats"]["BatchNorm_0"]["mean"].shape == (kept,)


def test_state_object_and_float_masks():
    m, v, x = build("flatten")
    g = trace(m.apply, v, x)
    bool_masks = _random_masks(g, np.random.default_rng(2))
    masks = {k: jnp.where(mm, 0.9, 0.1) for k, mm in bool_masks.items()}

    class State:
        pass

    st = State()
    st.masks = masks
    st.graph = g
    fn, sv = slim(v, st)
    ref = m.apply(apply_masks(g, v, bool_masks), x)  # > 0.5 keeps the unit
    chex.assert_trees_all_close(fn(sv, x), ref, atol=1e-5)


def test_errors():
    m, v, x = build("flatten")
    g = trace(m.apply, v, x)
    out = g.group_map["Dense_1/kernel:out"]
    with pytest.raises(ValueError, match="not prunable"):
        slim(v, {out.id: np.zeros(out.size, bool)}, graph=g)
    with pytest.raises(ValueError, match="not in the graph"):
        slim(v, {"nope": np.ones(3, bool)}, graph=g)
    with pytest.raises(ValueError, match="shape"):
        slim(v, {"Conv_0/kernel:out": np.ones(2, bool)}, graph=g)
    fn, sv = slim(v, _random_masks(g, np.random.default_rng(0), p=0.9), graph=g)
    with pytest.raises(ValueError, match="slim_variables"):
        fn(v, x)


def test_variables_of_another_shape_are_refused_naming_the_leaf():
    from jaxjpq import export
    from jaxjpq.state import CompressionSpec, init_state

    m, v, x = build("flatten")
    g = trace(m.apply, v, x)
    other = jax.tree.map(lambda a: jnp.concatenate([a, a], axis=-1), v)  # every leaf 2x wider
    masks = _random_masks(g, np.random.default_rng(0))
    match = r"variables: params/\w+/\w+ has shape .* traced with"
    with pytest.raises(ValueError, match=match):
        slim(other, masks, graph=g)
    with pytest.raises(ValueError, match=match):
        apply_masks(g, other, masks)
    with pytest.raises(ValueError, match=match):
        export.pack(other, init_state(g, CompressionSpec(), v))


def test_apply_masks_jit_and_identity():
    m, v, x = build("resbn")
    g = trace(m.apply, v, x)
    ones = {grp.id: jnp.ones(grp.size) for grp in g.prunable_groups}
    chex.assert_trees_all_close(jax.jit(lambda v, mk: apply_masks(g, v, mk))(v, ones), v)
