"""Property tests: the cost model's exact kept MACs and weight sizes equal the slim model's, on
every zoo model and test architecture, for random masks; exact figures agree on host and jit."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from archs import ARCHS, ZOO, build, build_zoo
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxjpq import cost
from jaxjpq.slim import slim
from jaxjpq.state import CompressionSpec, init_state, leaf
from jaxjpq.trace import trace
from jaxjpq.trace.macs import count_macs


@functools.cache
def _model(name: str):
    m, v, x = build(name) if name in ARCHS else build_zoo(name)
    g = trace(m.apply, v, x)
    return m, v, x, g


def _random_masks(g, seed: int, keep: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for grp in g.prunable_groups:
        if rng.random() < 0.25:  # some groups untouched
            continue
        m = rng.random(grp.size) < keep
        m[rng.integers(grp.size)] = True
        out[grp.id] = m
    return out


def _check(name: str, seed: int, keep: float) -> None:
    m, v, x, g = _model(name)
    masks = _random_masks(g, seed, keep)
    st0 = init_state(g, CompressionSpec(quantize_weights=False, quantize_activations=False))
    state = st0.replace(masks={k: jnp.asarray(masks.get(k, np.ones_like(v0)), jnp.float32)
                               for k, v0 in st0.masks.items()})
    fn, sv = slim(v, masks, graph=g)
    want = count_macs(fn, sv, x, only_params=True)
    got = sum(cost.kept_macs(state).values()) * g.batch_size
    assert got == want, (name, got, want)
    numel = sum(math.prod(np.shape(leaf(sv, k))) for k in {s.weight for s in g.sites})
    assert cost.size_bits(state) == 32.0 * numel
    assert cost.bops(state) == 32.0 * 32.0 * want / g.batch_size


@pytest.mark.parametrize("name", sorted(ARCHS))
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), keep=st.floats(0.1, 0.95))
def test_kept_macs_equal_slim_model_archs(name, seed, keep):
    _check(name, seed, keep)


@pytest.mark.parametrize("name", ZOO)
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), keep=st.floats(0.1, 0.95))
def test_kept_macs_equal_slim_model_zoo(name, seed, keep):
    _check(name, seed, keep)


def test_every_site_axis_group_is_counted_on_concat_and_heads():
    """The decoder conv reads two groups at offsets; MHA's q/k/v see head-dim groups."""
    *_, g = _model("concat_decoder")
    (site,) = [s for s in g.sites if s.name == "Conv_2"]
    in_axis = site.weight_axes[2]
    assert in_axis.size == 11 and len(in_axis.owners) == 2
    offs = sorted(int(np.nonzero(o >= 0)[0].min()) for _, o in in_axis.owners)
    assert offs == [0, 6]
    *_, g = _model("mha_heads")
    q = g.site_map["MultiHeadDotProductAttention_0/query"]
    assert q.weight_shape == (8, 4, 3) and all(a.owners for a in q.weight_axes)


@pytest.mark.parametrize("soft", [False, True])
def test_exact_figures_equal_under_jit(soft):
    *_, g = _model("vit_tiny_mnist")
    from jaxjpq.quant import step_from_bits

    st0 = init_state(g, CompressionSpec(skip=()))
    rng = np.random.default_rng(3)
    state = st0.replace(
        masks={k: jnp.asarray(rng.random(m.shape) < 0.7, jnp.float32) for k, m in
               st0.masks.items()},
        weight={k: p.replace(d=step_from_bits(float(rng.integers(2, 9)), p.q_m, p.t))
                for k, p in st0.weight.items()},
    )
    host = cost.bops(state, soft=soft)
    jit = float(jax.jit(lambda s: cost.bops(s, soft=soft))(state))
    if soft:
        np.testing.assert_allclose(jit, host, rtol=1e-6)
    else:  # float64 on both sides: the same integer
        assert jit == host and host == round(host)
        assert float(jax.jit(lambda s: cost.size_bits(s))(state)) == cost.size_bits(state)
