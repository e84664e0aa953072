"""Timing alternatives side by side, for the benchmarks in this folder (run as `python bench/<name>.py`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_medians(fns: dict[str, Callable], repeats: int, warmup: int = 1) -> dict[str, float]:
    """The median seconds of each function over `repeats` calls, the functions taking turns so that the noise
    of a shared machine hits them alike; `warmup` untimed rounds first (allocator, thread pool, first-call
    dispatch)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
