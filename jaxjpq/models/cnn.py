"""Small convolutional networks for MNIST-scale inputs."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def max_pool(x: jax.Array, size: int = 2) -> jax.Array:
    """``nn.max_pool(x, (size, size), strides=(size, size))`` ("VALID") over ``[batch, H, W, C]``:
    output ``[batch, H // size, W // size, C]``, the same values and the same derivatives (each
    window's first maximum in row-major order carries it, as ``reduce_window``'s
    ``select_and_scatter``), written as a reshape, a max and a one-hot: XLA:CPU runs the
    ``reduce_window`` gradient many times slower (``python -m experiments.bench_pool``)."""
    return _windows(x, size).max(axis=-1)


def _windows(x: jax.Array, size: int) -> jax.Array:
    """``[batch, H // size, W // size, C, size * size]``: each window's entries, row-major."""
    b, h, w, c = x.shape
    h, w = h // size, w // size
    x = x[:, : h * size, : w * size].reshape(b, h, size, w, size, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h, w, c, size * size)


@max_pool.defjvp
def _max_pool_jvp(size, primals, tangents):
    (x,), (t,) = primals, tangents
    win = _windows(x, size)
    first = jax.nn.one_hot(jnp.argmax(win, axis=-1), size * size, dtype=x.dtype)
    return win.max(axis=-1), jnp.sum(first * _windows(t, size), axis=-1)


class MnistCNN(nn.Module):
    """Small CNN for 28x28x1 images: two conv+pool blocks, one hidden dense layer.

    Input ``[batch, 28, 28, 1]`` float in [0, 1]; output logits ``[batch, num_classes]``.
    """

    num_classes: int = 10
    features: tuple[int, int] = (32, 64)
    hidden: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for f in self.features:
            x = nn.Conv(f, (3, 3), padding="SAME")(x)
            x = nn.relu(x)
            x = max_pool(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class LeNet5(nn.Module):
    """LeNet-5 for 28x28 (or 32x32) grey images: 6C5-MP-16C5-MP-120FC-84FC-classes.

    The first conv is "SAME" padded so 28x28 input gives the classic 5x5x16 feature map before the
    dense layers (as 32x32 unpadded input does in the original). Input ``[batch, 28, 28, 1]``;
    output logits ``[batch, num_classes]``.
    """

    num_classes: int = 10
    features: tuple[int, int] = (6, 16)
    hidden: tuple[int, int] = (120, 84)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(nn.Conv(self.features[0], (5, 5), padding="SAME")(x))
        x = max_pool(x)
        x = nn.relu(nn.Conv(self.features[1], (5, 5), padding="VALID")(x))
        x = max_pool(x)
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)


class VGG7(nn.Module):
    """VGG-7 ("VGG-Small") for CIFAR: 2x128C3-MP-2x256C3-MP-2x512C3-MP-1024FC-classes.

    The network of the ternary / LQ-Nets quantization literature: every 3x3 conv is followed by
    BatchNorm (if ``use_bn``) and ReLU; about 0.61 G MACs at 32x32. Input ``[batch, 32, 32, 3]``;
    output logits ``[batch, num_classes]``. ``train`` selects batch statistics and updates the
    ``batch_stats`` collection (pass ``mutable=["batch_stats"]``).
    """

    num_classes: int = 10
    widths: tuple[int, int, int] = (128, 256, 512)
    hidden: int = 1024
    use_bn: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for w in self.widths:
            for _ in range(2):
                x = nn.Conv(w, (3, 3), padding="SAME", use_bias=not self.use_bn)(x)
                if self.use_bn:
                    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
                x = nn.relu(x)
            x = max_pool(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.hidden, use_bias=not self.use_bn)(x)
        if self.use_bn:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        return nn.Dense(self.num_classes)(x)
