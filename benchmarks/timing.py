"""Shared timing for the benchmarks: medians of interleaved runs, on any device."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int = 7,
              warmup: int = 1) -> dict[str, float]:
    """Median wall time of each ``fn()`` in milliseconds, after ``warmup`` untimed calls.

    The functions take turns within each repeat, so a burst of load from other processes
    slows them all alike instead of one of them.
    """
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
