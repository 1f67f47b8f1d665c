"""Ring attention on real processes: time and memory per process at P = 1, 2, 4.

Starts 4 local processes (``helpers.ring.run_on_processes``: gloo on the loopback interface,
one torch thread each) and runs ``helpers.ring.ring_scaling``: for each P, the first P ranks
compute one forward and backward pass of ``helpers.ring.ring_attention`` over one sequence
of ``SEQ_LEN`` tokens (batch 1, 4 heads of 64, float32), each holding ``SEQ_LEN / P`` of
them. Reports, per P, the slowest process's median wall time and the CPU time of its
computing thread (what it computed, whatever else shares the cores), its peak memory
growth, the largest difference from PyTorch's SDPA and autograd, and the CPU time against
PyTorch's SDPA forward and backward over the whole sequence on one thread (the peer a user
would pick, measured in this process). With fewer cores than processes, the processes
share cores and the wall time per process cannot fall like 1/P.

Writes ``benchmarks/out/ring.md``. Run ``python benchmarks/bench_ring.py``; the combined
report calls :func:`run`.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from helpers.device import one_cpu_thread, seed_everything
from helpers.ring import full_inputs, ring_scaling, run_on_processes
from timing import publish

SEQ_LEN, HEADS, HEAD_DIM = 4096, 4, 64
WORLD_SIZES = (1, 2, 4)
REPEATS = 3
OUT = Path(__file__).parent / "out" / "ring.md"
TITLE = "Ring attention on local gloo processes"


def sdpa_forward_backward(causal: bool) -> tuple[float, float]:
    """Median wall and CPU seconds of PyTorch's SDPA forward and backward over the whole
    sequence, on one thread."""
    q, k, v = (t.requires_grad_() for t in full_inputs(1, HEADS, SEQ_LEN, HEAD_DIM))
    walls, cpus = [], []
    with one_cpu_thread():
        for _ in range(REPEATS):
            start, cpu_start = time.perf_counter(), time.thread_time()
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
            walls.append(time.perf_counter() - start)
            cpus.append(time.thread_time() - cpu_start)
    return statistics.median(walls), statistics.median(cpus)


def run() -> str:
    """Run the ring for every P, causal and not; print and write the table, and return it."""
    seed_everything(0)
    lines = ["| mask | P | tokens per process | wall ms per process | CPU ms per process | "
             "CPU vs SDPA on 1 process | peak memory growth per process (MiB) | max error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for causal in (False, True):
        mask = "causal" if causal else "none"
        results = run_on_processes(ring_scaling, max(WORLD_SIZES), 1, HEADS, SEQ_LEN, HEAD_DIM,
                                   WORLD_SIZES, causal, REPEATS, timeout_s=1800)
        sdpa_wall, sdpa_cpu = sdpa_forward_backward(causal)
        for P in WORLD_SIZES:
            ranks = [rank[P] for rank in results if P in rank]
            wall = 1e3 * max(r["seconds"] for r in ranks)
            cpu = 1e3 * max(r["cpu_seconds"] for r in ranks)
            memory = max(r["peak_bytes"] for r in ranks) / 2**20
            error = max(r["max_error"] for r in ranks)
            lines.append(f"| {mask} | {P} | {SEQ_LEN // P} | {wall:.0f} | {cpu:.0f} | "
                         f"{cpu / (1e3 * sdpa_cpu):.2f}× | {memory:.1f} | {error:.1e} |")
        lines.append(f"| {mask} | F.sdpa | {SEQ_LEN} | {1e3 * sdpa_wall:.0f} | "
                     f"{1e3 * sdpa_cpu:.0f} | 1.00× | | |")
    header = (f"### Ring attention forward + backward, {SEQ_LEN} tokens in all, median of "
              f"{REPEATS} runs\n\n"
              f"torch {torch.__version__}, gloo on loopback, 1 torch thread per process, "
              f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at the end), "
              f"batch 1, {HEADS} heads of {HEAD_DIM}, float32, contiguous layout. Each step "
              f"materialises a (L/P)² block of scores, so memory falls like 1/P²; with fewer "
              f"cores than processes the wall time per process cannot fall like 1/P.\n\n")
    table = header + "\n".join(lines) + "\n"
    return publish(table, OUT)


if __name__ == "__main__":
    run()
