"""Linear attention against softmax attention from 1k to 16k tokens: how time grows with n.

Times one causal forward pass (batch 1, 4 heads of 64, float32) on the device
``helpers.device.get_device()`` picks, at n = 1024 .. 16384. On a CPU torch runs on one
thread and the time is that thread's CPU time, so that other programs sharing the cores do
not bend the curves; on a GPU it is wall time. The variants:

- ``torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)``, PyTorch's fused
  softmax attention, the peer a user would pick;
- ``helpers.linear_attention.linear_attention(..., causal=True, method="chunked")``;
- the same with ``method="recurrent"`` (one Python step per token) up to 4096 tokens.

Fits ``time ∝ n^a`` by least squares on the logs: softmax attention should give ``a ≈ 2``,
linear attention ``a ≈ 1`` (COURSE.md's bar). Prints a markdown table (median ms, and the
ratio to SDPA at the same n) and writes it to ``benchmarks/out/linear.md``. Run
``python benchmarks/bench_linear.py``; the combined report calls :func:`run`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from helpers.device import get_device, one_cpu_thread, seed_everything
from helpers.linear_attention import linear_attention
from timing import median_ms, publish

LENGTHS = (1024, 2048, 4096, 8192, 16384)
RECURRENT_UP_TO = 4096  # one Python step per token: slow, and its growth is clear by then
HEADS, HEAD_DIM = 4, 64
REPEATS = 5
OUT = Path(__file__).parent / "out" / "linear.md"
TITLE = "Linear vs softmax attention, 1k to 16k tokens"


def median_cpu_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median CPU time of this thread for each ``fn()`` in ms, after one untimed call each,
    the functions taking turns. With torch on one thread that is all the work they do, and
    other programs that share the cores do not inflate it."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.thread_time()
            fn()
            times[name].append(time.thread_time() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def time_one_length(n: int, device: torch.device) -> dict[str, float]:
    """Median forward times (ms) of the variants at sequence length ``n``: CPU time on one
    thread on a CPU, wall time on a GPU."""
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device=device) for _ in range(3))
    fns = {
        "softmax (F.sdpa)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "linear, chunked": lambda: linear_attention(q, k, v, causal=True, method="chunked"),
    }
    if n <= RECURRENT_UP_TO:
        fns["linear, recurrent"] = lambda: linear_attention(q, k, v, causal=True,
                                                            method="recurrent")
    repeats = REPEATS if n <= RECURRENT_UP_TO else 3
    with torch.inference_mode():
        if device.type == "cpu":
            with one_cpu_thread():
                return median_cpu_ms(fns, repeats)
        return median_ms(fns, device, repeats=repeats)


def fitted_exponent(lengths: list[int], times: list[float]) -> float:
    """The slope a of log(time) = a log(n) + b, by least squares."""
    return float(np.polyfit(np.log(lengths), np.log(times), 1)[0])


def run() -> str:
    """Time every length, print and write the markdown table, and return it."""
    device = get_device()
    seed_everything(0)
    rows = {n: time_one_length(n, device) for n in LENGTHS}
    names = list(rows[LENGTHS[0]])
    lines = ["| n | " + " | ".join(names) + " |", "|---:" * (len(names) + 1) + "|"]
    for n, times in rows.items():
        base = times["softmax (F.sdpa)"]
        cells = [f"{times[name]:.1f} ({times[name] / base:.2f}×)" if name in times else "–"
                 for name in names]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    exponents = []
    for name in names:
        lengths = [n for n in LENGTHS if name in rows[n]]
        exponent = fitted_exponent(lengths, [rows[n][name] for n in lengths])
        exponents.append(f"{name}: **{exponent:.2f}** (n = {lengths[0]} .. {lengths[-1]})")
    clock = ("CPU time of one torch thread" if device.type == "cpu" else "wall time")
    header = (f"### Causal attention forward, median of {REPEATS} runs ({clock}, ms; ratio to "
              f"F.sdpa at the same n)\n\n"
              f"device `{device}`, torch {torch.__version__}, {os.cpu_count()} CPUs (load "
              f"average {os.getloadavg()[0]:.1f} at the end), batch 1, {HEADS} heads of "
              f"{HEAD_DIM}, float32\n\n")
    table = (header + "\n".join(lines) + "\n\nFitted exponents a of time ∝ n^a: "
             + "; ".join(exponents) + "\n")
    return publish(table, OUT)


if __name__ == "__main__":
    run()
