"""Seeded numpy batch iterators (a pure function of ``(seed, epoch)``, so a resumed run sees
exactly the batches it would have seen) and per-batch augmentation."""


from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from jaxjpq.data.sources import Augment, Batch, Source


def steps_per_epoch(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Number of batches in one epoch of ``n`` examples."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batches(
    source: Source,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    augment: Augment | None = None,
    start: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[Batch]:
    """One epoch of batches; the order is a pure function of ``(seed, epoch)``.

    Each example appears once per epoch (the last partial batch is dropped when
    ``drop_remainder``). ``augment(batch, rng)`` runs per batch with an rng derived from
    ``(seed, epoch, batch index)``. ``start`` skips the first ``start`` batches.
    ``shard=(i, n)`` (e.g. ``(jax.process_index(), jax.process_count())``) yields host ``i``'s
    contiguous part of each global batch of ``batch_size`` (``n`` must divide it when
    ``drop_remainder``): the ``n`` hosts together read each global batch once.
    """
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard={shard}: give (index, count) with 0 <= index < count.")
    if drop_remainder and batch_size % count:
        raise ValueError(f"batch_size {batch_size} does not split over {count} hosts.")
    n = len(source)
    nb = steps_per_epoch(n, batch_size, drop_remainder)
    if nb == 0 and n == 0:
        raise ValueError("the source has no examples; check the split and its limits.")
    if nb == 0:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {n} examples with drop_remainder=True; "
            "lower batch_size or pass drop_remainder=False."
        )
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    for b in range(start, nb):
        idx = order[b * batch_size : (b + 1) * batch_size]
        if count > 1:
            idx = np.array_split(idx, count)[index]
        rng = np.random.default_rng([seed, epoch, b, 1, *((index,) if count > 1 else ())])
        batch = source.get(idx, rng)
        yield augment(batch, rng) if augment is not None else batch


def batch_stream(
    source: Source,
    batch_size: int,
    *,
    seed: int = 0,
    start_step: int = 0,
    augment: Augment | None = None,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[Batch]:
    """Endless shuffled training batches (``drop_remainder``) starting at global ``start_step``.

    Step ``s`` is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``, so a resumed
    run continues with exactly the batches an uninterrupted run would use. ``shard``: this
    host's part of each global batch, as in :func:`batches`.
    """
    nb = steps_per_epoch(len(source), batch_size, True)
    epoch, offset = divmod(start_step, max(nb, 1))
    while True:
        yield from batches(source, batch_size, seed=seed, epoch=epoch, augment=augment,
                           start=offset, shard=shard)
        epoch, offset = epoch + 1, 0




def random_crop_flip(batch: Batch, rng: np.random.Generator, pad: int = 4) -> Batch:
    """CIFAR augmentation: zero-pad ``pad`` pixels, random crop back, random horizontal flip.

    ``batch["inputs"]`` is [B, H, W, C]; the padding value 0 is the mean after normalisation.
    """
    x = batch["inputs"]
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, size=b)
    dx = rng.integers(0, 2 * pad + 1, size=b)
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    out = xp[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
    flip = rng.random(b) < 0.5
    out[flip] = out[flip, :, ::-1]
    return {**batch, "inputs": out}
