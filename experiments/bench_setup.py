"""The model, random batch, variables and graph the benchmarks start from."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxjpq.models.registry import get_model, input_spec
from jaxjpq.trace import trace


def random_inputs(name: str, model: Any, batch: int, seed: int = 0, first_id: int = 1
                  ) -> jax.Array:
    """A batch of zoo model ``name``'s input: uniform in [0, 1), or token ids in
    ``[first_id, vocab_size)`` (id 0 is padding)."""
    spec = input_spec(name, batch)
    key = jax.random.key(seed)
    if np.issubdtype(spec.dtype, np.integer):
        return jax.random.randint(key, spec.shape, first_id, model.vocab_size, spec.dtype)
    return jax.random.uniform(key, spec.shape, spec.dtype)


def traced_model(name: str, batch: int, seed: int = 0, classes: int = 10) -> tuple[Any, ...]:
    """``(model, inputs [batch, ...], labels [batch], variables, graph)`` for zoo model
    ``name``: inputs uniform in [0, 1) (token ids in [0, 100) for integer inputs), labels in
    ``[0, classes)``, variables from ``model.init``."""
    model = get_model(name)
    spec = input_spec(name, batch)
    rng = np.random.default_rng(seed)
    if np.issubdtype(spec.dtype, np.integer):
        x = rng.integers(0, 100, spec.shape).astype(spec.dtype)
    else:
        x = rng.random(spec.shape).astype(spec.dtype)
    y = rng.integers(0, classes, batch).astype(np.int32)
    v = model.init(jax.random.key(seed), x[:1])
    return model, x, y, v, trace(model.apply, v, x[:2])
