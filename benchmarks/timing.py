"""Shared timing for the benchmarks: medians of interleaved runs, on any device; the peak
memory of one call, measured in a fresh process; and where each benchmark's markdown goes."""

from __future__ import annotations

import gc
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

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


def _status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rss_added_by(setup: Callable[[], tuple], fn: Callable[..., object]) -> int:
    """In the child: build the inputs, reset the peak-RSS mark, run ``fn``, return the bytes
    of resident memory that its peak added to what the inputs already held."""
    inputs = setup()
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # Linux: reset VmHWM, the peak resident set, to the current one
    fn(*inputs)
    return 1024 * (_status_kib("VmHWM") - before)


def peak_rss_bytes(setup: Callable[[], tuple], fn: Callable[..., object]) -> int:
    """Peak resident memory that ``fn(*setup())`` adds on the CPU, in bytes, in a fresh process.

    Everything the call touches counts (every tensor, the scratch space inside fused kernels,
    the allocator's slack), and nothing left over by earlier measurements does: each runs in
    a new ``spawn``-ed Python whose peak mark (``VmHWM``) is reset after ``setup()`` built
    the inputs. ``setup`` and ``fn`` must be picklable (module-level functions). Linux only.
    """
    if not sys.platform.startswith("linux"):
        raise RuntimeError("peak_rss_bytes reads /proc/self/status and needs Linux")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_rss_added_by, (setup, fn))


def publish(markdown: str, out: Path) -> str:
    """Write a benchmark's markdown to ``out`` (under ``benchmarks/out/``), print it, return it
    for the combined report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown)
    print(markdown)
    return markdown
