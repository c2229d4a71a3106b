"""Hand-written test architectures for the tracer and slim (small widths, fast on CPU)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class ResBN(nn.Module):
    """Conv-BN-ReLU stem, two residual blocks (identity and 1x1 projection), global pool, dense."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(nn.BatchNorm(not train)(nn.Conv(8, (3, 3), use_bias=False)(x)))
        for i, (f, s) in enumerate([(8, 1), (12, 2)]):
            y = nn.Conv(f, (3, 3), strides=s, use_bias=False, name=f"b{i}_c1")(x)
            y = nn.relu(nn.BatchNorm(not train, name=f"b{i}_bn1")(y))
            y = nn.Conv(f, (3, 3), use_bias=False, name=f"b{i}_c2")(y)
            y = nn.BatchNorm(not train, name=f"b{i}_bn2")(y)
            if s != 1 or x.shape[-1] != f:
                x = nn.Conv(f, (1, 1), strides=s, name=f"b{i}_proj")(x)
            x = nn.relu(x + y)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(5)(x)


class FlattenDense(nn.Module):
    """Conv -> max pool -> flatten -> dense -> dense (one channel owns H*W rows)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(6, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(10)(x))
        return nn.Dense(3)(x)


class Inception(nn.Module):
    """Three branches concatenated on channels, then a slice/split, avg pool, dense."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        a = nn.relu(nn.Conv(4, (1, 1))(x))
        b = nn.relu(nn.Conv(6, (3, 3))(x))
        c = nn.relu(nn.Conv(5, (5, 5))(nn.avg_pool(x, (3, 3), padding="SAME")))
        y = jnp.concatenate([a, b, c], axis=-1)
        y = nn.relu(nn.Conv(8, (3, 3))(y))
        y1, y2 = jnp.split(y, [3], axis=-1)
        y = nn.Conv(4, (1, 1))(y1) + nn.Conv(4, (1, 1))(y2)
        y = nn.avg_pool(y, (2, 2), (2, 2))
        return nn.Dense(3)(y.reshape((y.shape[0], -1)))


class DepthwiseSeparable(nn.Module):
    """MobileNet-style: expand 1x1, depthwise 3x3 (multiplier 1), project 1x1, residual."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(8, (3, 3))(x)
        y = nn.relu6(nn.BatchNorm(not train)(nn.Conv(16, (1, 1))(x)))
        y = nn.Conv(16, (3, 3), feature_group_count=16)(y)
        y = nn.relu6(nn.BatchNorm(not train)(y))
        y = nn.Conv(8, (1, 1))(y)
        x = x + y
        return nn.Dense(4)(jnp.mean(x, axis=(1, 2)))


class Grouped(nn.Module):
    """Grouped conv (4 groups) between two dense convs."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(8, (1, 1))(x))
        x = nn.relu(nn.Conv(12, (3, 3), feature_group_count=4)(x))
        x = nn.Conv(6, (1, 1))(x)
        return nn.Dense(3)(jnp.max(x, axis=(1, 2)))


class AttnLN(nn.Module):
    """Pre-LN transformer block: MHA (2 heads) + MLP with GELU, dropout; tokens in, logits out."""

    dim: int = 8

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Dense(self.dim)(x)
        y = nn.LayerNorm()(x)
        y = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, deterministic=not train)(y)
        x = x + y
        y = nn.Dense(16)(nn.LayerNorm()(x))
        y = nn.Dropout(0.1, deterministic=not train)(nn.gelu(y))
        x = x + nn.Dense(self.dim)(y)
        return nn.Dense(3)(x.mean(axis=1))


class FusedHeads(nn.Module):
    """Attention written by hand: one dense to (heads*head_dim), reshape to heads, merge back."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        h, d = 2, 3
        q = nn.Dense(h * d)(x).reshape(b, t, h, d)
        k = nn.Dense(h * d)(x).reshape(b, t, h, d)
        v = nn.Dense(h * d)(x).reshape(b, t, h, d)
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, h * d)
        return nn.Dense(4)(nn.Dense(5)(o).mean(axis=1))


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
        return x + nn.Dense(x.shape[-1])(nn.relu(nn.Dense(12)(x))), None


class ScanStack(nn.Module):
    """Three residual MLP layers with stacked params via nn.scan, plus remat and a cond."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(6)(x)
        stack = nn.scan(
            nn.remat(_Layer),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=3,
        )
        x, _ = stack(name="layers")(x, None)
        h = nn.relu(nn.Dense(7)(x))
        h = jax.lax.cond(jnp.sum(x) > 0, lambda z: z * 2.0, lambda z: z, h)
        return nn.Dense(2)(h)


class ConcatDecoder(nn.Module):
    """U-Net step: encoder conv, strided conv down, ConvTranspose up, a conv reading
    ``concatenate([skip, up])``, GroupNorm, then a head."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        skip = nn.relu(nn.Conv(6, (3, 3))(x))
        down = nn.relu(nn.Conv(8, (3, 3), strides=2)(skip))
        up = nn.relu(nn.ConvTranspose(5, (2, 2), strides=(2, 2))(down))
        y = nn.Conv(7, (3, 3))(jnp.concatenate([skip, up], axis=-1))
        y = nn.relu(nn.GroupNorm(num_groups=1)(y))
        return nn.Dense(3)(jnp.mean(y, axis=(1, 2)))


class GroupNormNet(nn.Module):
    """Conv -> GroupNorm (4 groups of 2 channels) -> conv -> dense."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.GroupNorm(num_groups=4)(nn.Conv(8, (3, 3))(x)))
        x = nn.relu(nn.Conv(6, (3, 3))(x))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


class Mixer(nn.Module):
    """MLP-Mixer block: token mixing by an einsum with a parameter over the token axis (the
    channel axis is free there), then channel mixing."""

    tokens: int = 5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(6)(x)
        w = self.param("token_mix", nn.initializers.lecun_normal(), (self.tokens, 7))
        y = jnp.einsum("btc,ts->bsc", nn.LayerNorm()(x), w)
        y = nn.gelu(y)
        w2 = self.param("token_out", nn.initializers.lecun_normal(), (7, self.tokens))
        x = x + jnp.einsum("bsc,st->btc", y, w2)
        x = x + nn.Dense(6)(nn.gelu(nn.Dense(10)(nn.LayerNorm()(x))))
        return nn.Dense(3)(x.mean(axis=1))


class MHAHeads(nn.Module):
    """Flax MultiHeadDotProductAttention (4 heads of 3) on a dense embedding, no residual, so
    its heads and head dims are prunable."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(8)(x))
        y = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=12, out_features=6)(x)
        return nn.Dense(3)(nn.relu(y).mean(axis=1))

class LSTMClassifier(nn.Module):
    """``nn.RNN`` over a fused ``nn.OptimizedLSTMCell`` (gate kernels concatenated), then a
    head on the last step. ``[B, T, F] -> [B, 3]``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(3)(nn.RNN(nn.OptimizedLSTMCell(6))(x)[:, -1])


class GRUClassifier(nn.Module):
    """A ``nn.GRUCell`` RNN over an embedding, then a head on the mean. ``[B, T, F] -> [B, 3]``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.RNN(nn.GRUCell(6))(nn.relu(nn.Dense(5)(x)))
        return nn.Dense(3)(h.mean(axis=1))


ARCHS = {
    "resbn": (ResBN, (2, 8, 8, 3)),
    "flatten": (FlattenDense, (2, 8, 8, 2)),
    "inception": (Inception, (2, 8, 8, 3)),
    "depthwise": (DepthwiseSeparable, (2, 8, 8, 3)),
    "grouped": (Grouped, (2, 6, 6, 3)),
    "attn": (AttnLN, (2, 5, 4)),
    "fused_heads": (FusedHeads, (2, 5, 4)),
    "scan": (ScanStack, (2, 4)),
    "concat_decoder": (ConcatDecoder, (2, 8, 8, 3)),
    "groupnorm": (GroupNormNet, (2, 6, 6, 3)),
    "mixer": (Mixer, (2, 5, 4)),
    "mha_heads": (MHAHeads, (2, 5, 4)),
    "lstm": (LSTMClassifier, (2, 4, 3)),
    "gru": (GRUClassifier, (2, 4, 3)),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, dict, jax.Array]:
    """(module, variables, example input) for ``ARCHS[name]``."""
    cls, shape = ARCHS[name]
    m = cls()
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), shape)
    shapes = jax.eval_shape(m.init, jax.random.PRNGKey(seed), x)
    return m, random_variables(shapes, seed), x


# resnet56 and mobilenet_v2 (resnet20's and mobilenet_v2_small's blocks, deeper or wider) pass
# the zoo checks too, left out for suite time
ZOO = ["resnet20", "mobilenet_v2_small", "vit_tiny_mnist", "lenet5", "mnist_cnn", "vgg7",
       "bert_tiny", "resnet18", "resnet50", "vit_tiny"]


def build_zoo(name: str) -> tuple[nn.Module, dict, jax.Array]:
    """(module, random variables, example input of batch 2) for a registry model; ImageNet-size
    models get 32x32 images (same graph, cheaper), token models ids in [1, 100)."""
    from jaxjpq.models.registry import get_model, input_spec

    m = get_model(name)
    spec = input_spec(name, 2)
    if spec.shape[1:] == (224, 224, 3):
        spec = jax.ShapeDtypeStruct((2, 32, 32, 3), spec.dtype)
    if jnp.issubdtype(spec.dtype, jnp.integer):
        x = jax.random.randint(jax.random.PRNGKey(1), spec.shape, 1, 100, spec.dtype)
    else:
        x = jax.random.normal(jax.random.PRNGKey(1), spec.shape, spec.dtype)
    return m, random_variables(jax.eval_shape(m.init, jax.random.PRNGKey(0), x)), x


def random_variables(shapes: dict, seed: int = 0) -> dict:
    """Random variables with the structure of ``shapes`` (no compile: tests stay fast).

    Running variances are positive; everything else is N(0, 0.5^2).
    """
    rng = np.random.default_rng(seed)

    def one(path, s):
        x = rng.normal(0.0, 0.5, s.shape).astype(np.float32)
        if any(getattr(k, "key", None) == "var" for k in path):
            x = np.abs(x) + 0.5
        return jnp.asarray(x)

    return jax.tree_util.tree_map_with_path(one, shapes)


def build_nnx() -> tuple:
    """(apply_fn, variables, x) for a small nnx MLP through its functional split/merge.

    Variables are ``{"params": nnx state}`` so leaf keys start with the ``params`` collection.
    """
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.a = nnx.Linear(4, 6, rngs=rngs)
            self.b = nnx.Linear(6, 5, rngs=rngs)
            self.c = nnx.Linear(5, 3, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.c(nnx.relu(self.b(nnx.relu(self.a(x)))))

    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))

    def apply_fn(variables: dict, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, variables["params"])(x)

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4))
    return apply_fn, {"params": state}, x


def small_cnn(n: int, calib: int | None = None) -> tuple:
    """``(model, variables, graph, x [n, 28, 28, 1], labels [n], calibrated state)`` of a small
    ``MnistCNN`` on random images (state: bits (2, 8), activations calibrated on ``x[:calib]``)."""
    import jaxjpq
    from jaxjpq.models import MnistCNN

    model = MnistCNN(features=(4, 8), hidden=16)
    rng = np.random.default_rng(0)
    x = rng.random((n, 28, 28, 1), np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    v = model.init(jax.random.PRNGKey(0), x[:1])
    g = jaxjpq.trace.trace(model.apply, v, x[:2])
    st = jaxjpq.init_state(g, jaxjpq.CompressionSpec(bits=(2, 8)), v)
    st = jaxjpq.calibrate(jaxjpq.compress_apply(model.apply), v, st, [x[:calib]])
    return model, v, g, x, y, st
