"""The rule registry: a user's primitive becomes traceable, slimmable and compressible with one
rule; the passes share the rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Primitive
from jax.interpreters import mlir

import jaxjpq
from jaxjpq.slim import apply_masks, slim
from jaxjpq.trace import RULES, Rule, register_rule, rule_for, unary_flow
from jaxjpq.trace.macs import count_macs


def _softsign(x):
    return x / (1.0 + jnp.abs(x))


_softsign_p = Primitive("jaxjpq_test_softsign")
_softsign_p.def_impl(_softsign)
_softsign_p.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(_softsign_p, mlir.lower_fun(_softsign, multiple_results=False))


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = _softsign_p.bind(nn.Dense(6)(x))  # a primitive no built-in rule knows
        return nn.Dense(3)(h)


@pytest.fixture
def net():
    m = _Net()
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 5))
    v = m.init(jax.random.PRNGKey(0), x)
    yield m, v, x
    RULES.pop(_softsign_p.name, None)


def test_unknown_primitive_blocks_pruning_until_a_rule_is_registered(net):
    m, v, x = net
    g = jaxjpq.trace.trace(m.apply, v, x)
    grp = g.group_map["Dense_0/kernel:out"]
    assert not grp.prunable and "unsupported primitive" in grp.reason
    register_rule(_softsign_p.name, Rule(flow=unary_flow(zero_preserving=True)))
    g = jaxjpq.trace.trace(m.apply, v, x)
    grp = g.group_map["Dense_0/kernel:out"]
    assert grp.prunable
    # the same rules drive slim, MACs and the compressed forward
    keep = np.array([1, 0, 1, 1, 0, 1], bool)
    fn, sv = slim(v, {grp.id: keep}, graph=g)
    want = m.apply(apply_masks(g, v, {grp.id: keep}), x)
    np.testing.assert_allclose(fn(sv, x), want, rtol=1e-5, atol=1e-6)
    assert count_macs(fn, sv, x, only_params=True) == 4 * (5 * 4 + 4 * 3)
    st = jaxjpq.init_state(g, jaxjpq.CompressionSpec(skip=()), v)
    y = jax.jit(jaxjpq.compress_apply(m.apply))(v, st, x)
    assert y.shape == (4, 3) and bool(jnp.all(jnp.isfinite(y)))


def test_a_rule_that_says_f0_is_not_zero_keeps_the_group_unprunable(net):
    m, v, x = net
    register_rule(_softsign_p.name, Rule(flow=unary_flow(zero_preserving=False)))
    g = jaxjpq.trace.trace(m.apply, v, x)
    assert not g.group_map["Dense_0/kernel:out"].prunable


def test_register_rule_refuses_to_shadow_and_checks_its_input(net):
    with pytest.raises(ValueError, match="already have a rule"):
        register_rule("dot_general", Rule())
    with pytest.raises(TypeError, match="Rule"):
        register_rule(_softsign_p.name, lambda *a: None)
    with pytest.raises(ValueError, match="forward"):
        Rule(forward="quantize")
    assert rule_for("no_such_primitive") == Rule()


def test_every_pass_reads_the_same_rule_table():
    """Contractions: a flow, MACs and the 'site' role in one rule; loops: one control kind."""
    dot = rule_for("dot_general")
    assert dot.flow is not None and dot.macs is not None and dot.forward == "site"
    conv = rule_for("conv_general_dilated")
    assert conv.slim is not None and conv.forward == "site"
    assert rule_for("reshape").slim is not None and rule_for("reshape").forward == "pass"
    assert {rule_for(n).control for n in ("scan", "while", "cond", "pjit")} == {
        "scan", "while", "cond", "call"}
    assert rule_for("concatenate").forward == "fuse"


def test_readme_rule_example_runs(net):
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    m = re.search(r"<!-- rule-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README has no rule example"
    exec(compile(m.group(1), "README rule example", "exec"), {"my_softsign_p": _softsign_p})
    mod, v, x = net
    assert jaxjpq.trace.trace(mod.apply, v, x).group_map["Dense_0/kernel:out"].prunable
