"""Timing in one process on a shared machine: calls taken in turn, round by round, so that a
drift of the machine's speed touches all of them alike; figures are per-round ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import jax


def rounds(calls: Mapping[str, Callable[[], object]], n_rounds: int, reps: int = 1,
           warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each ``name: thunk``, one figure per round (``reps`` calls, the
    result blocked on). The order within a round turns over every round; ``warmup`` calls of
    each run first (compilation)."""
    if n_rounds < 1 or reps < 1:
        raise ValueError(f"need n_rounds >= 1 and reps >= 1, got {n_rounds}, {reps}.")
    for f in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(f())
    names = list(calls)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(n_rounds):
        for k in names if r % 2 == 0 else reversed(names):
            f = calls[k]
            t = time.perf_counter()
            for _ in range(reps):
                y = f()
            jax.block_until_ready(y)
            out[k].append((time.perf_counter() - t) / reps)
    return out


def ratio(times: Mapping[str, list[float]], num: str, den: str) -> dict[str, float]:
    """Median and quartiles over rounds of ``times[num] / times[den]``."""
    rs = [a / b for a, b in zip(times[num], times[den], strict=True)]
    q1, _, q3 = statistics.quantiles(rs, n=4) if len(rs) > 1 else (rs[0],) * 3
    return {"median": statistics.median(rs), "q1": q1, "q3": q3}


def median_ms(times: Mapping[str, list[float]]) -> dict[str, float]:
    """Median milliseconds per call of each name."""
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}
