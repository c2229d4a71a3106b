"""Tests for the staged prune-then-quantize / prune-only / quantize-only baselines."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import geta_setup, run_steps, small_cnn
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxjpq.methods.baselines import magnitude_masks, prune_then_quantize
from jaxjpq.methods.core import per_group_counts
from jaxjpq.quant import params_bits
from jaxjpq.units import unit_index, unit_sum


class _Index:
    """The fields per_group_counts reads, for given group sizes."""

    def __init__(self, sizes):
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.num_units = int(sum(sizes))
        self.num_groups = len(sizes)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(2, 40), min_size=1, max_size=6), st.floats(0.0, 0.5))
def test_per_group_counts_exact_total_and_even_fractions(sizes, sparsity):
    counts = per_group_counts(_Index(sizes), sparsity)
    total = round(sparsity * sum(sizes))
    assert counts.sum() == total
    sizes = np.asarray(sizes)
    assert np.all(counts <= sizes - 1)
    # largest remainders: each group gets the floor or the ceiling of its share of the total
    ideal = sizes * total / sizes.sum()
    assert np.all((counts >= np.floor(ideal) - 1e-9) | (counts == sizes - 1))
    assert np.all(counts <= np.ceil(ideal) + 1e-9)


def test_per_group_counts_ties_go_to_the_larger_group():
    # shares 1/3 and 7/3 of 3 units: the extra unit goes to the group of 28, not by float noise
    counts = per_group_counts(_Index([2, 2, 4, 28]), 0.0703)
    np.testing.assert_array_equal(counts, [0, 0, 0, 3])
    counts = per_group_counts(_Index([28, 4, 2, 2]), 0.0703)
    np.testing.assert_array_equal(counts, [3, 0, 0, 0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 70), min_size=1, max_size=6), st.floats(0.0, 0.9),
       st.sampled_from([2, 4, 8, 16]))
def test_per_group_counts_unit_multiple(sizes, sparsity, n):
    if round(sparsity * sum(sizes)) > sum(sizes) - len(sizes):
        return
    counts = per_group_counts(_Index(sizes), sparsity, unit_multiple=n)
    kept = np.asarray(sizes) - counts
    assert np.all((kept % n == 0) | (kept == np.asarray(sizes)))
    assert np.all(kept >= np.minimum(n, sizes))


def test_magnitude_masks_remove_the_smallest_units_of_each_group():
    _, v, g, _ = small_cnn()
    index = unit_index(g, v)
    counts = per_group_counts(index, 0.5)
    masks = np.asarray(magnitude_masks(index, v["params"], counts))
    norms = np.asarray(unit_sum(index, lambda x: x * x, v["params"]))
    for j in range(index.num_groups):
        lo, hi = index.offsets[j], index.offsets[j + 1]
        m, n = masks[lo:hi], norms[lo:hi]
        assert (m == 0).sum() == counts[j]
        if counts[j]:
            assert n[m == 0].max() <= n[m == 1].min()


def test_prune_then_quantize_end_to_end():
    model, v, g, x, spec, cstate = geta_setup()
    tx = prune_then_quantize(optax.adam(1e-3), steps=12, sparsity=0.5, bits=3.0,
                             prune_step=4, quantize_step=8)
    params, cs, _, hist = run_steps(model, v, g, x, spec, cstate, 12, tx)
    index = unit_index(g, v)
    # Masks untouched before the prune step, exact sparsity after it.
    assert float(index.flat_masks(hist[3][1].masks).min()) == 1.0
    masks = np.asarray(index.flat_masks(cs.masks))
    assert (masks == 0).sum() == round(0.5 * index.num_units)
    # Quantizers keep their initial 16 bits until the quantize step, then sit at exactly 3 bits.
    before = hist[6][1].weight["Conv_1"]
    np.testing.assert_allclose(params_bits(before, True), 16.0, rtol=1e-5)
    for name, p in cs.weight.items():
        want = 8.0 if name in cs.frozen else 3.0
        np.testing.assert_allclose(params_bits(p, True), want, rtol=1e-5)
    zero_rows = unit_sum(index, jnp.abs, params)
    assert float(jnp.max(jnp.where(jnp.asarray(masks) == 0, zero_rows, 0.0))) == 0.0


def test_prune_then_quantize_rejects_bad_stages():
    _, _, g, _ = small_cnn()
    with pytest.raises(ValueError, match="prune_step"):
        prune_then_quantize(optax.sgd(0.1), steps=10, sparsity=0.5, bits=4, prune_step=6,
                            quantize_step=3)
    with pytest.raises(ValueError, match="sparsity"):
        prune_then_quantize(optax.sgd(0.1), steps=10, sparsity=1.0, bits=4, prune_step=1,
                            quantize_step=3)


def test_prune_then_quantize_clip_step_stays_on_its_scale():
    # Regression: the ViT-tiny baseline (seed 1, QAT from 30 %) stopped with a NaN loss when an
    # SGD step took a per-tensor clip q_m to the old absolute 1e-8 floor.
    _, v, g, _, _, cstate = geta_setup()
    tx = prune_then_quantize(optax.sgd(0.0), steps=4, sparsity=0.0, bits=3.0, prune_step=0,
                             quantize_step=0)
    params = (v["params"], cstate)
    state = tx.init(params)
    update = jax.jit(tx.update)
    zero = jax.tree.map(jnp.zeros_like, params)
    upd, state = update(zero, state, params)  # step 0: clips restart at max|W|
    params = optax.apply_updates(params, upd)
    big = (zero[0], zero[1].replace(weight=jax.tree.map(lambda q: q + 1e6, zero[1].weight)))
    upd, state = update(big, state, params)
    new = optax.apply_updates(params, upd)
    for name, p in params[1].weight.items():
        if name in cstate.frozen:
            continue
        np.testing.assert_allclose(new[1].weight[name].q_m, 0.5 * p.q_m, rtol=1e-6)
        np.testing.assert_allclose(params_bits(new[1].weight[name]), 3.0, rtol=1e-5)
