"""Model registry: build a zoo model by name and look up the input it expects."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxjpq.models.bert import BertClassifier
from jaxjpq.models.cnn import VGG7, LeNet5, MnistCNN
from jaxjpq.models.mobilenet import SMALL_CONFIG, MobileNetV2
from jaxjpq.models.resnet import CifarResNet, ImageNetResNet
from jaxjpq.models.vit import ViT
from jaxjpq.trace.macs import MacCount, count_macs_split


class ModelSpec(NamedTuple):
    """A zoo entry: module class, its constructor defaults, and one example's input.

    Attributes:
      cls: the Flax module class.
      defaults: keyword arguments given to ``cls`` before the user's overrides.
      input_shape: shape of ONE example (no batch axis), e.g. ``(32, 32, 3)``.
      input_dtype: dtype of the input (float32 images, int32 token ids).
    """

    cls: type[nn.Module]
    defaults: dict[str, Any]
    input_shape: tuple[int, ...]
    input_dtype: Any = jnp.float32


_MNIST = (28, 28, 1)
_CIFAR = (32, 32, 3)
_IMAGENET = (224, 224, 3)

_REGISTRY: dict[str, ModelSpec] = {
    "mnist_cnn": ModelSpec(MnistCNN, {}, _MNIST),
    "lenet5": ModelSpec(LeNet5, {}, _MNIST),
    "vgg7": ModelSpec(VGG7, {}, _CIFAR),
    "resnet20": ModelSpec(CifarResNet, {"depth": 20}, _CIFAR),
    "resnet56": ModelSpec(CifarResNet, {"depth": 56}, _CIFAR),
    "resnet18": ModelSpec(ImageNetResNet, {"depth": 18}, _IMAGENET),
    "resnet50": ModelSpec(ImageNetResNet, {"depth": 50}, _IMAGENET),
    "mobilenet_v2": ModelSpec(MobileNetV2, {}, _IMAGENET),
    "mobilenet_v2_small": ModelSpec(
        MobileNetV2,
        {"num_classes": 10, "config": SMALL_CONFIG, "stem_stride": 1, "last_channels": 256},
        _CIFAR,
    ),
    "vit_tiny_mnist": ModelSpec(
        ViT,
        {"num_classes": 10, "patch_size": 7, "dim": 96, "depth": 4, "num_heads": 3, "mlp_dim": 192},
        _MNIST,
    ),
    "vit_tiny": ModelSpec(ViT, {}, _IMAGENET),
    "bert_tiny": ModelSpec(BertClassifier, {}, (128,), jnp.int32),
}


def model_names() -> tuple[str, ...]:
    """All registered model names, sorted."""
    return tuple(sorted(_REGISTRY))


def _spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of {', '.join(model_names())}"
        ) from None


def get_model(name: str, **overrides: Any) -> nn.Module:
    """Build the zoo model ``name`` with its registered defaults updated by ``overrides``.

    Example: ``get_model("resnet20", num_classes=100, shortcut="A")``.
    Raises ``ValueError`` for an unknown name or an override that is not a field of the model.
    """
    spec = _spec(name)
    fields = {f.name for f in dataclasses.fields(spec.cls) if f.init} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"{name!r} ({spec.cls.__name__}) has no field(s) {unknown}; valid "
            f"overrides are {sorted(fields)}"
        )
    return spec.cls(**{**spec.defaults, **overrides})


def input_shape(name: str) -> tuple[int, ...]:
    """Shape of one input example of model ``name``, without the batch axis."""
    return _spec(name).input_shape


def input_dtype(name: str) -> Any:
    """Dtype of model ``name``'s input (``float32`` images or ``int32`` token ids)."""
    return _spec(name).input_dtype


def input_spec(name: str, batch: int = 1) -> jax.ShapeDtypeStruct:
    """Abstract input ``[batch, *input_shape(name)]`` for ``jax.eval_shape`` / ``make_jaxpr``."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    spec = _spec(name)
    return jax.ShapeDtypeStruct((batch, *spec.input_shape), spec.input_dtype)


def model_macs(name: str, batch: int = 1, **overrides: Any) -> MacCount:
    """MACs of model ``name``'s inference forward at its real input size, split into parameter and
    activation contractions (see `jaxjpq.trace.macs`). Traced abstractly: nothing is computed.

    Example: ``model_macs("resnet50").total`` is about 4.1e9.
    """
    model = get_model(name, **overrides)
    x = input_spec(name, batch)
    init = functools.partial(model.init, train=False)
    variables = jax.eval_shape(init, jax.random.key(0), x)
    return count_macs_split(model.apply, variables, x, train=False)
