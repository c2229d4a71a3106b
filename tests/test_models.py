"""Model zoo: every model trains one step on tiny input; MACs at the real input size match the
published figures (abstract tracing only, no compute at 224x224)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxjpq.models import registry
from jaxjpq.trace.macs import count_macs

get_model, input_dtype, input_shape = registry.get_model, registry.input_dtype, registry.input_shape
input_spec, model_macs, model_names = registry.input_spec, registry.model_macs, registry.model_names

# Small inputs for the train-step test (ImageNet-sized nets run at 32x32 to stay fast).
_SMALL_SHAPE = {
    "resnet18": (32, 32, 3),
    "resnet50": (32, 32, 3),
    "mobilenet_v2": (32, 32, 3),
    "vit_tiny": (32, 32, 3),
    "bert_tiny": (16,),
}
# The numeric train step runs a shorter stack of the same blocks (XLA compile time on CPU grows
# with depth, not width or input size); every full-size train step is checked by abstract tracing
# in `test_full_size_train_step_traces`. Each override keeps every block kind of the model
# (strided / projection / identity residuals, expansion, heads) present at least once.
_FAST_OVERRIDES: dict[str, dict] = {
    "vgg7": {"widths": (16, 32, 64), "hidden": 64},
    "resnet20": {"depth": 8},
    "resnet56": {"depth": 8, "shortcut": "A"},
    "resnet18": {"blocks": (1, 1, 1, 1), "widths": (8, 16, 16, 32)},
    "resnet50": {"blocks": (1, 1, 1, 1), "widths": (8, 16, 16, 32)},
    "mobilenet_v2": {"config": ((1, 16, 1, 1), (6, 24, 2, 2))},
    "mobilenet_v2_small": {"config": ((1, 16, 1, 2), (6, 24, 2, 1))},
    "vit_tiny": {"depth": 1},
    "vit_tiny_mnist": {"depth": 1},
    "bert_tiny": {"depth": 1},
}
# Local to these jits (no global XLA flags): skip LLVM's expensive passes; run time is tiny.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _example(name: str, batch: int, key: jax.Array) -> jax.Array:
    shape = (batch, *_SMALL_SHAPE.get(name, input_shape(name)))
    if input_dtype(name) == jnp.int32:
        return jax.random.randint(key, shape, 0, 100, dtype=jnp.int32)
    return jax.random.uniform(key, shape, jnp.float32)


def _abstract_macs(name: str, batch: int = 1, **overrides) -> tuple[int, int]:
    c = model_macs(name, batch, **overrides)
    return c.param, c.activation


def _materialize(abstract: dict, seed: int = 0) -> dict:
    """Concrete variables for an abstract tree, with NumPy (no XLA compile of the initialisers).

    Norm scales and variances are 1, biases and means 0, everything else N(0, 1 / fan_in) with
    ``fan_in`` the product of all but the last axis. (The models' own initialisers run in
    `test_real_init_and_eval_mode`; compiling them for every model would dominate this file.)
    """
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(x.shape, x.dtype)
        if name in ("bias", "mean"):
            return jnp.zeros(x.shape, x.dtype)
        fan_in = max(1, int(np.prod(x.shape[:-1])))
        return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(fan_in), x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _train_step(model, labels: jax.Array):
    """One Adam step of ``model``: ``(params, state, x) -> outputs dict`` (pure, jit-able)."""
    tx = optax.adam(1e-3)

    def step(params, state, x):
        def loss_fn(p):
            out, new_state = model.apply(
                {"params": p, **state},
                x,
                train=True,
                mutable=list(state),
                rngs={"dropout": jax.random.key(0, impl="rbg")},
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()
            return loss, (new_state, out)

        (loss, (new_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        new_params = optax.apply_updates(params, updates)
        return dict(
            logits=logits, loss=loss, grads=grads, new_params=new_params, new_state=new_state
        )

    return step


@pytest.mark.parametrize("name", model_names())
def test_one_train_step(name: str) -> None:
    model = get_model(name, **_FAST_OVERRIDES.get(name, {}))
    x = _example(name, 2, jax.random.key(1))
    labels = jnp.array([0, 1])
    abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    variables = _materialize(abstract)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    step = jax.jit(_train_step(model, labels), compiler_options=_FAST_COMPILE)
    out = step(params, state, x)
    chex.assert_shape(out["logits"], (2, model.num_classes))
    assert np.isfinite(float(out["loss"]))
    chex.assert_tree_all_finite(out["grads"])
    chex.assert_trees_all_equal_structs(out["new_params"], params)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), out["new_params"], params)
    assert all(jax.tree.leaves(changed)), "every parameter should move after one Adam step"
    if "batch_stats" in state:
        moved = jax.tree.map(
            lambda a, b: bool(jnp.any(a != b)),
            out["new_state"]["batch_stats"],
            state["batch_stats"],
        )
        assert all(jax.tree.leaves(moved)), "train=True must update every BatchNorm statistic"


@pytest.mark.parametrize("name", sorted(_FAST_OVERRIDES))
def test_full_size_train_step_traces(name: str) -> None:
    """The full-size model's init and train step trace with consistent shapes (nothing is
    compiled or computed)."""
    model = get_model(name)
    x = jax.ShapeDtypeStruct((2, *_SMALL_SHAPE.get(name, input_shape(name))), input_dtype(name))
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    out = jax.eval_shape(_train_step(model, jnp.array([0, 1])), params, state, x)
    chex.assert_shape(out["logits"], (2, model.num_classes))
    chex.assert_trees_all_equal_shapes_and_dtypes(out["grads"], params)
    chex.assert_trees_all_equal_shapes_and_dtypes(out["new_params"], params)
    chex.assert_trees_all_equal_shapes_and_dtypes(out["new_state"], state)


def test_real_init_and_eval_mode() -> None:
    """Real init; with running averages (train=False) a sample's logits ignore its batch."""
    model = get_model("resnet20", depth=8)
    x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(1, impl="rbg"), x)
    apply = jax.jit(functools.partial(model.apply, train=False))
    chex.assert_trees_all_close(apply(variables, x)[:1], apply(variables, x[:1]), atol=1e-5)


# Published MAC figures at the models' real input sizes (batch 1).
_PUBLISHED = {
    "resnet20": 41e6,  # He et al. 2016 / common CIFAR tables: 40.8 M
    "resnet56": 125e6,  # 125.5 M
    "resnet18": 1.82e9,
    "resnet50": 4.1e9,  # v1.5
    "mobilenet_v2": 300e6,  # Sandler et al. 2018, Table 4
    "vgg7": 0.61e9,
    "vit_tiny": 1.26e9,  # DeiT-Ti: 1.3 GFLOPs (all contractions)
}


@pytest.mark.parametrize("name", sorted(_PUBLISHED))
def test_macs_match_published(name: str) -> None:
    param, act = _abstract_macs(name)
    total = param + act
    assert abs(total - _PUBLISHED[name]) / _PUBLISHED[name] < 0.03, (name, total)
    if name != "vit_tiny":
        assert act == 0, "conv nets have no activation x activation products"


# Published parameter counts: torchvision (ResNet-18/50, MobileNetV2), timm (ViT-Ti/16), the
# ResNet paper's CIFAR table (option-A shortcuts: 0.27 M / 0.85 M), LeNet-5 and BERT-tiny (4.4 M).
_PUBLISHED_PARAMS = {
    ("resnet18", ()): (11_689_512, 0.0),
    ("resnet50", ()): (25_557_032, 0.0),
    ("mobilenet_v2", ()): (3_504_872, 0.0),
    ("vit_tiny", ()): (5_717_416, 0.0),
    ("lenet5", ()): (61_706, 0.0),
    ("resnet20", (("shortcut", "A"),)): (0.27e6, 0.01),
    ("resnet56", (("shortcut", "A"),)): (0.85e6, 0.01),
    ("bert_tiny", ()): (4.4e6, 0.01),
}


@pytest.mark.parametrize("name, overrides", sorted(_PUBLISHED_PARAMS))
def test_param_counts_match_published(name: str, overrides: tuple) -> None:
    model = get_model(name, **dict(overrides))
    init = functools.partial(model.init, train=False)
    params = jax.eval_shape(init, jax.random.key(0), input_spec(name))["params"]
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    expected, rtol = _PUBLISHED_PARAMS[name, overrides]
    assert abs(n - expected) <= rtol * expected, (name, n)


def _conv_macs(h: int, c_in: int, c_out: int, k: int) -> int:
    return h * h * c_in * c_out * k * k


def test_vgg7_macs_exact() -> None:
    expected = 0
    h, c = 32, 3
    for w in (128, 256, 512):
        expected += _conv_macs(h, c, w, 3) + _conv_macs(h, w, w, 3)
        h, c = h // 2, w
    expected += h * h * c * 1024 + 1024 * 10
    assert sum(_abstract_macs("vgg7")) == expected


def test_lenet5_macs_exact() -> None:
    expected = _conv_macs(28, 1, 6, 5) + _conv_macs(10, 6, 16, 5) + 400 * 120 + 120 * 84 + 84 * 10
    assert sum(_abstract_macs("lenet5")) == expected


def test_resnet_shortcut_option_b_adds_projection_macs() -> None:
    a, _ = _abstract_macs("resnet20", shortcut="A")
    b, _ = _abstract_macs("resnet20", shortcut="B")
    assert b - a == 16 * 32 * 16 * 16 + 32 * 64 * 8 * 8


def test_vit_attention_macs_split() -> None:
    # Per block: q.k^T and attn.v each cost tokens^2 * dim; the rest are parameter contractions.
    param, act = _abstract_macs("vit_tiny")
    tokens, dim, depth = 14 * 14 + 1, 192, 12
    assert act == depth * 2 * tokens * tokens * dim
    per_block = 4 * tokens * dim * dim + 2 * tokens * dim * 768
    assert param == depth * per_block + 196 * 16 * 16 * 3 * dim + dim * 1000


@settings(max_examples=4, deadline=None)
@given(batch=st.integers(2, 5), name=st.sampled_from(["resnet20", "bert_tiny", "mobilenet_v2"]))
def test_macs_scale_with_batch(batch: int, name: str) -> None:
    one = _abstract_macs(name, 1)
    many = _abstract_macs(name, batch)
    assert many == (one[0] * batch, one[1] * batch)


def test_mobilenet_depthwise_and_width() -> None:
    model = get_model("mobilenet_v2_small")
    x = jnp.zeros((1, 32, 32, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    dw = params["InvertedResidual_1"]["depthwise"]["kernel"]
    assert dw.shape == (3, 3, 1, 16 * 6)
    half = _abstract_macs("mobilenet_v2", width_mult=0.5)
    full = _abstract_macs("mobilenet_v2")
    assert half[0] < 0.5 * full[0]


def test_transformer_heads_are_explicit() -> None:
    for name, (dim, heads) in {"vit_tiny_mnist": (96, 3), "bert_tiny": (128, 2)}.items():
        model = get_model(name)
        params = jax.eval_shape(model.init, jax.random.key(0), input_spec(name))["params"]
        block = params["block_0" if name.startswith("vit") else "layer_0"]["attention"]
        for proj in ("query", "key", "value"):
            assert block[proj]["kernel"].shape == (dim, heads, dim // heads)
        assert block["out"]["kernel"].shape == (heads, dim // heads, dim)


@functools.cache
def _small_bert() -> tuple:
    """A small-vocabulary BERT-tiny, its variables and its jitted apply (compiled once)."""
    model = get_model("bert_tiny", vocab_size=50, max_length=8)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    variables = _materialize(jax.eval_shape(model.init, jax.random.key(1), ids), seed=1)
    apply = jax.jit(lambda ids, mask: model.apply(variables, ids, attention_mask=mask))
    return model, apply


@settings(max_examples=4, deadline=None)
@given(n_real=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_bert_padding_is_ignored(n_real: int, seed: int) -> None:
    _, apply = _small_bert()
    ids = jax.random.randint(jax.random.key(seed), (1, 8), 0, 50)
    mask = (jnp.arange(8) < n_real)[None]
    other = jnp.where(mask, ids, (ids + 7) % 50)
    a = apply(ids, mask)
    chex.assert_trees_all_close(a, apply(other, mask), atol=1e-5)
    c = apply(other, jnp.ones_like(mask))
    assert not np.allclose(a, c, atol=1e-5), "without a mask, padding tokens must matter"


def test_registry_errors_and_overrides() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        get_model("resnet19")
    with pytest.raises(ValueError, match="no field"):
        get_model("resnet20", width=3)
    assert get_model("resnet20", num_classes=100).num_classes == 100
    assert get_model("resnet56").depth == 56
    assert input_spec("bert_tiny", 3) == jax.ShapeDtypeStruct((3, 128), jnp.int32)
    with pytest.raises(ValueError, match="batch"):
        input_spec("lenet5", 0)


def test_model_argument_errors() -> None:
    x = jnp.zeros((1, 30, 30, 3))
    with pytest.raises(ValueError, match="patch_size"):
        get_model("vit_tiny").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="6n\\+2"):
        jax.eval_shape(get_model("resnet20", depth=21).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="depth"):
        jax.eval_shape(get_model("resnet18", depth=19).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="max_length"):
        jax.eval_shape(
            get_model("bert_tiny", max_length=4).init, jax.random.key(0), jnp.zeros((1, 5), int)
        )
    assert count_macs(lambda: jnp.ones(3), param_argnums=()) == 0


@settings(max_examples=12, deadline=None)
@given(size=st.integers(2, 3), h=st.integers(2, 9), w=st.integers(2, 9), levels=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_zoo_max_pool_equals_flax_in_values_gradients_and_jvps(size, h, w, levels, seed):
    """Values on a coarse grid (many tied maxima, post-ReLU zeros), odd sizes cropped."""
    import flax.linen as nn

    from jaxjpq.models.cnn import max_pool

    h, w = max(h, size), max(w, size)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.nn.relu(jnp.round(jax.random.normal(k1, (2, h, w, 3)) * levels) / levels)

    def ref(x):
        return nn.max_pool(x, (size, size), strides=(size, size))

    gw = jax.random.normal(k2, (2, h // size, w // size, 3))
    t = jax.random.normal(k3, x.shape)

    @functools.partial(jax.jit, static_argnums=0)  # one compilation per pool and example
    def outputs(pool, x):
        return (pool(x), jax.grad(lambda x: jnp.sum(pool(x) * gw))(x),
                jax.jvp(pool, (x,), (t,))[1])

    for got, want in zip(outputs(lambda x: max_pool(x, size), x), outputs(ref, x), strict=True):
        np.testing.assert_array_equal(got, want)
