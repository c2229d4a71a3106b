"""A split as a random-access source of example dicts."""


from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

Batch = dict[str, np.ndarray]
Augment = Callable[[Batch, np.random.Generator], Batch]

class Source(Protocol):
    """A random-access split: ``len(source)`` examples, ``get`` returns a batch dict."""

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray, rng: np.random.Generator) -> Batch: ...


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """An in-memory split. ``arrays`` maps names to arrays sharing the leading axis ``N``."""

    arrays: Mapping[str, np.ndarray]

    def __post_init__(self):
        lengths = {k: len(v) for k, v in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"ArraySource arrays must share their leading axis, got {lengths}.")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def get(self, indices: np.ndarray, rng: np.random.Generator | None = None) -> Batch:
        """Gathers rows ``indices`` (int[B]) of every array; ``rng`` is unused."""
        return {k: v[indices] for k, v in self.arrays.items()}

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]
