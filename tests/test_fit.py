"""FITCompress: exact per-sample Fisher, FIT, the path search to a budget, the baseline."""

import functools

import archs
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import jaxjpq
from jaxjpq import cost, export
from jaxjpq.methods import fit


@functools.cache
def _cnn():
    model, v, g, x, y, st = archs.small_cnn(24)
    for n in st.act:
        if n not in st.frozen:
            st = jaxjpq.set_bits(st, n, 8.0, kind="act")
    info = fit.fisher(model.apply, g, v, [{"inputs": x, "labels": y}], chunk=5, progress=False)
    return model, v, g, x, y, st, info


def _loss(model, v, x, y):
    logits = model.apply(v, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_fisher_is_the_mean_of_squared_per_sample_gradients():
    model, v, g, x, y, _, info = _cnn()
    assert info.samples == len(x)
    grads = [jax.grad(lambda p, i=i: _loss(model, {"params": p}, x[i:i + 1], y[i:i + 1]))(
        v["params"]) for i in range(len(x))]
    for s in g.sites:
        want = np.mean([np.asarray(gr[s.name]["kernel"]) ** 2 for gr in grads], axis=0)
        np.testing.assert_allclose(info.weight[s.name], want, rtol=2e-4, atol=1e-10)
    # not the squared batch-mean gradient
    mean_g = jax.grad(lambda p: _loss(model, {"params": p}, x, y))(v["params"])
    sq = np.asarray(mean_g["Dense_0"]["kernel"]) ** 2
    assert not np.allclose(info.weight["Dense_0"], sq, rtol=0.1)
    # the first site's input is the image: its trace is E[Σ (∂L/∂x)²]
    gx = [jax.grad(lambda xi, i=i: _loss(model, v, xi, y[i:i + 1]))(x[i:i + 1])
          for i in range(len(x))]
    want = np.mean([np.sum(np.asarray(a) ** 2) for a in gx])
    np.testing.assert_allclose(info.act["Conv_0"], want, rtol=2e-4)


@pytest.mark.parametrize("arch", ["attn", "scan", "mixer", "inception"])
def test_batched_fisher_equals_the_per_sample_pass(arch):
    model, v, x = archs.build(arch)
    x = np.concatenate([np.asarray(x)] * 3)
    y = np.arange(len(x)) % 3
    g = jaxjpq.trace.trace(model.apply, v, x[:2])
    fast, exact = (fit.fisher_sums(model.apply, g, v, method=m)(v["params"], x, y)
                   for m in ("batched", "per_sample"))
    for k in exact[0]:
        np.testing.assert_allclose(fast[0][k], exact[0][k], rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(fast[1][k], exact[1][k], rtol=1e-4)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_auto_fisher_falls_back_where_the_batched_pass_is_wrong(arch):
    # a recurrent weight is used once per step: per-step squares do not add up to the square of
    # the per-sample sum; a fused LSTM kernel has no per-site contraction
    model, v, x = archs.build(arch)
    y = np.arange(len(x)) % 3
    g = jaxjpq.trace.trace(model.apply, v, x[:2])
    batch = [{"inputs": np.asarray(x), "labels": y}]
    with pytest.warns(UserWarning, match="per-sample vmap"):
        info = fit.fisher(model.apply, g, v, batch, progress=False)
    exact = fit.fisher(model.apply, g, v, batch, method="per_sample", progress=False)
    for k in exact.weight:
        np.testing.assert_allclose(info.weight[k], exact.weight[k], rtol=1e-5, atol=1e-12)


def test_fit_without_masks_is_the_papers_formula():
    model, v, g, x, y, st, info = _cnn()
    tr = info.weight_trace()
    want = 0.0
    for s in g.sites:
        d = float(jaxjpq.quant.effective_params(st.weight[s.name]).d)
        want += tr[s.name] * d ** 2 / 12
        d_a = float(jaxjpq.quant.effective_params(st.act[s.name], s.signed_input).d)
        want += info.act[s.name] * d_a ** 2 / 12
    assert fit.fit_score(info, st, v) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("budget", [dict(size=0.2), dict(size=0.06), dict(bops=0.05)])
def test_search_meets_the_budget_exactly_and_the_export_agrees(budget, tmp_path):
    model, v, g, x, y, st, info = _cnn()
    r = fit.search(info, st, v, progress=False, **budget)
    assert r.pair.model is v["params"] and r.pair.compression is r.state
    (kind, alpha), = budget.items()
    if kind == "size":
        assert r.relative_size <= alpha
        packed = export.pack(v, r.state)
        theo = export.theoretical_bytes(packed)["total"]
        assert theo <= alpha * 4 * g.param_count() + 8 * len(packed.arrays)
    else:
        assert r.relative_bops <= alpha and float(cost.relative_bops(r.state)) <= alpha
    # every learned weight site at an integer width in the spec's range, the rest untouched
    for n, b in r.bits.items():
        if n in st.frozen:
            assert b == 8.0
        else:
            assert 2.0 <= b <= 8.0 and b == int(b)
    assert r.nodes_expanded >= 1 and np.isfinite(r.fit)
    fwd = jaxjpq.compress_apply(model.apply)
    export.save(tmp_path / "m", export.pack(v, r.state))
    got = export.inference_fn(export.restore(tmp_path / "m"), model.apply, g)(x)
    np.testing.assert_allclose(got, fwd(v, r.state, x), rtol=1e-5, atol=1e-5)


def test_a_bops_budget_searches_the_input_bits_and_a_size_budget_keeps_them():
    model, v, g, x, y, st, info = _cnn()
    learned = [n for n in st.act if n not in st.frozen]
    tight = fit.search(info, st, v, bops=0.01, progress=False)
    assert any(tight.act_bits[n] < 8.0 for n in learned)
    assert any("input->" in move for move, _ in tight.path)
    for n in learned:  # the state holds what the result says, at integer widths in the range
        b = float(np.round(cost.bits(tight.state)[n][1]))
        assert b == tight.act_bits[n] and 2.0 <= b <= 8.0
    for n in st.frozen:
        assert tight.act_bits.get(n, 8.0) == 8.0
    assert float(cost.relative_bops(tight.state)) <= 0.01
    # an input with no Fisher trace is free to lower: the search takes it before the weights'
    free = fit.FisherInfo(weight=info.weight, act={**info.act, learned[0]: 0.0},
                          samples=info.samples)
    r = fit.search(free, st, v, bops=0.05, progress=False)
    assert r.path[0][0] == f"{learned[0]} input->7b"
    sized = fit.search(info, st, v, size=0.06, progress=False)
    assert all(sized.act_bits[n] == 8.0 for n in learned)
    assert not any("input->" in move for move, _ in sized.path)
    um = fit.uniform_magnitude(st, v, bits=4.0, bops=0.02)
    assert {um.act_bits[n] for n in learned} == {4.0}


def test_a_tighter_budget_prunes_or_lowers_more():
    model, v, g, x, y, st, info = _cnn()
    loose = fit.search(info, st, v, size=0.2, progress=False)
    tight = fit.search(info, st, v, size=0.06, progress=False)
    assert tight.relative_size < loose.relative_size
    assert tight.fit > loose.fit


def test_budget_below_the_smallest_reachable_is_an_error_naming_it():
    model, v, g, x, y, st, info = _cnn()
    with pytest.raises(ValueError, match=r"below the smallest reachable configuration \(\d"):
        fit.search(info, st, v, size=1e-4, progress=False)
    with pytest.raises(ValueError, match="exactly one budget"):
        fit.search(info, st, v, progress=False)
    # before any work: from shapes alone, a lower bound of every node's size
    floor = fit.size_floor(st)
    tables, counts = fit._tables(info, st, v, fit.sparsity_levels())
    node = (*[len(t.bits) - 1 for t in tables], len(fit.sparsity_levels()) - 1)
    assert floor <= cost.relative_model_size(fit._to_state(st, tables, counts, node))
    with pytest.raises(ValueError, match="below the smallest reachable configuration"):
        fit.check_size_budget(st, floor * 0.99)
    fit.check_size_budget(st, floor)


def test_uniform_magnitude_baseline_meets_the_budget_at_uniform_bits():
    model, v, g, x, y, st, info = _cnn()
    r = fit.uniform_magnitude(st, v, bits=4.0, size=0.1)
    assert r.relative_size <= 0.1
    assert {b for n, b in r.bits.items() if n not in st.frozen} == {4.0}
    # magnitude pruning: every pruned weight is no larger than every kept one, over all sites
    w = {s.name: np.abs(np.asarray(v["params"][s.name]["kernel"])) for s in g.sites}
    kept = np.concatenate([w[n][np.asarray(m) > 0.5] for n, m in r.state.weight_masks.items()])
    cut = np.concatenate([w[n][np.asarray(m) < 0.5] for n, m in r.state.weight_masks.items()])
    assert cut.max() <= kept.min()


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4)(nn.relu(nn.Dense(32)(nn.relu(nn.Dense(32)(x)))))


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_fit_ranks_damage_like_the_measured_loss():
    """Spearman(FIT, loss increase) over 30 random (bits, sparsity) configurations of a trained
    MLP."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = (x[:, :4].argmax(1)).astype(np.int32)
    m = _MLP()
    v = m.init(jax.random.PRNGKey(0), x[:1])
    tx = optax.adam(1e-2)
    opt = tx.init(v)

    @jax.jit
    def step(v, opt):
        gr = jax.grad(lambda v: _loss(m, v, x, y))(v)
        u, opt = tx.update(gr, opt)
        return optax.apply_updates(v, u), opt

    for _ in range(300):
        v, opt = step(v, opt)
    g = jaxjpq.trace.trace(m.apply, v, x[:2])
    st = jaxjpq.init_state(g, jaxjpq.CompressionSpec(bits=(2, 8), skip=(),
                                                     quantize_activations=False), v)
    info = fit.fisher(m.apply, g, v, [{"inputs": x, "labels": y}], chunk=64, progress=False)
    fwd = jax.jit(jaxjpq.compress_apply(m.apply))
    base = float(_loss(m, v, x, y))
    lv = fit.sparsity_levels()
    tables, counts = fit._tables(info, st, v, lv)
    fits, damage = [], []
    for _ in range(30):
        node = (*[int(rng.integers(0, len(t.bits))) for t in tables], int(rng.integers(0, 30)))
        cand = fit._to_state(st, tables, counts, node)
        fits.append(fit.fit_score(info, cand, v))
        logits = fwd(v, cand, x)
        damage.append(float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
                      - base)
    assert _spearman(fits, damage) > 0.7


def test_rate_criterion_meets_the_budget_and_unknown_criteria_are_refused():
    model, v, g, x, y, st, info = _cnn()
    r = fit.search(info, st, v, size=0.06, criterion="rate", progress=False)
    assert r.relative_size <= 0.06 and r.nodes_expanded >= 1
    with pytest.raises(ValueError, match="criterion"):
        fit.search(info, st, v, size=0.06, criterion="greedy", progress=False)


def _damage(tables, counts, node):
    """FIT damage of a node from the tables: pruned F θ² plus kept F (θ − q_b)²."""
    bi, _, s = fit._parts(tables, node)
    return sum(t.pruned[int(counts[i, s])] + t.suffix(t.kept_err[b], int(counts[i, s]))
               for i, (t, b) in enumerate(zip(tables, bi, strict=True)))


@pytest.mark.parametrize("size", [0.03, 0.06, 0.12])
def test_least_fit_is_the_exhaustive_optimum_within_the_budget(size):
    import itertools

    model, v, g, x, y, st, info = _cnn()
    r = fit.search(info, st, v, size=size, criterion="least_fit", progress=False)
    assert r.relative_size <= size
    lv = fit.sparsity_levels()
    tables, counts = fit._tables(info, st, v, lv)
    figure = fit._figure_fn(st, tables, counts, "size", 0.0)
    n = len(tables)
    best = min(_damage(tables, counts, (*bi, *(0,) * n, s))
               for bi in itertools.product(*[range(len(t.bits)) for t in tables])
               for s in range(len(lv)) if figure((*bi, *(0,) * n, s)) <= size)
    bi = [tables[i].bits.index(r.bits[t.name]) for i, t in enumerate(tables)]
    s = int(np.argmin(np.abs(lv - r.sparsity)))
    np.testing.assert_allclose(_damage(tables, counts, (*bi, *(0,) * n, s)), best, rtol=1e-9)


def test_least_fit_under_a_bops_budget_keeps_the_inputs_at_their_bits():
    model, v, g, x, y, st, info = _cnn()
    for bops in (0.05, 0.005):
        r = fit.search(info, st, v, bops=bops, criterion="least_fit", progress=False)
        assert r.relative_bops <= bops
        assert all(b == 8.0 for b in r.act_bits.values())


def test_the_active_size_is_the_kept_weights_at_their_bits():
    model, v, g, x, y, st, info = _cnn()
    r = fit.search(info, st, v, size=0.05, size_metric="active", progress=False)
    out = r.state
    # Σ nnz · bits / 8 by hand: each site's kept weights at its bits (float sites at 32)
    want = 0.0
    for s in g.sites:
        m = out.weight_masks.get(s.name)
        nnz = int(np.sum(np.asarray(m) > 0.5)) if m is not None else int(np.prod(s.weight_shape))
        want += nnz * r.bits[s.name] / 8.0  # the searched bits (32 for a float site)
    np.testing.assert_allclose(float(cost.active_bytes(out)), want, rtol=1e-6)
    fp32 = sum(int(np.prod(s.weight_shape)) for s in g.sites) * 4.0
    assert r.relative_active_size == pytest.approx(want / fp32, rel=1e-6)
    assert r.relative_active_size <= 0.05
    # the export metric at the same figure holds indices, scales and float leaves on top
    assert r.relative_size > r.relative_active_size
    base = fit.uniform_magnitude(st, v, bits=4.0, size=0.05, size_metric="active")
    assert base.relative_active_size <= 0.05
    with pytest.raises(ValueError, match="size_metric"):
        fit.search(info, st, v, size=0.05, size_metric="disk", progress=False)
    floor = fit.size_floor(st, size_metric="active")
    with pytest.raises(ValueError, match="below the smallest reachable"):
        fit.check_size_budget(st, floor * 0.99, size_metric="active")


def test_the_fisher_is_estimated_again_along_the_path_at_the_compressed_model():
    model, v, g, x, y, st, info = _cnn()
    seen = []

    def refisher(state):  # the Fisher of the node's compressed weights
        seen.append(state)
        w = jaxjpq.compress.transform_variables(v, state)
        return fit.fisher(model.apply, g, w, [{"inputs": x, "labels": y}], chunk=6,
                          progress=False)

    r = fit.search(info, st, v, size=0.06, refisher=refisher, refisher_every=3, progress=False)
    # every 3 moves, before the next (or once more where a refresh alone meets the budget)
    assert len(seen) in ((r.nodes_expanded - 1) // 3, r.nodes_expanded // 3) and seen
    assert r.relative_size <= 0.06
    # the search ends at the Fisher of its last refresh: FIT scored with it, not the first
    last = refisher(seen[-1])
    seen.pop()
    assert r.fit == pytest.approx(fit.fit_score(last, r.state, v), rel=1e-6)
    # a Fisher that never changes leaves the path as it was
    same = fit.search(info, st, v, size=0.06, refisher=lambda s: info, refisher_every=2,
                      progress=False)
    plain = fit.search(info, st, v, size=0.06, progress=False)
    assert same.path == plain.path and same.bits == plain.bits
    with pytest.raises(ValueError, match="refisher_every"):
        fit.search(info, st, v, size=0.06, refisher=refisher, progress=False)
