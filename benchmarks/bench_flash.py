"""FlashAttention on the CPU: the course's tiled attention against PyTorch's fused SDPA and
against materialised attention, at the bar's size.

Forward, n = 8192, batch 1, 8 heads, head_dim 64, float32, on the CPU (the bar: peak memory
>= 10x below materialised attention, time <= 2.5x ``F.scaled_dot_product_attention`` in the
same run, output within 1e-5):

- ``helpers.flash.flash_attention_forward`` with blocks of BLOCK_Q x BLOCK_K,
- ``F.scaled_dot_product_attention`` (PyTorch's fused CPU kernel, itself FlashAttention-style),
- materialised attention, ``softmax(q kᵀ · scale) v`` in plain PyTorch (PyTorch's math path).

Times are medians of interleaved runs in this process; peak memory is the resident memory each
call adds, each measured in a fresh process (``timing.peak_rss_bytes``). Then the backward at
n = 4096 (materialised autograd at 8192 would need about 8 GiB): the recomputation backward of
``helpers.flash.flash_attention`` against autograd through materialised attention and through
SDPA. Prints a markdown report and writes it to ``benchmarks/out/flash.md``. Run
``python benchmarks/bench_flash.py``; the combined report calls :func:`run`.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from helpers.flash import flash_attention, flash_attention_forward
from timing import median_ms, peak_rss_bytes, publish

N, N_BACKWARD, BATCH, HEADS, HEAD_DIM = 8192, 4096, 1, 8, 64
BLOCK_Q, BLOCK_K = 256, 512
SCALE = 1 / math.sqrt(HEAD_DIM)
REPEATS = 5
OUT = Path(__file__).parent / "out" / "flash.md"
MIB = 2**20


def make_inputs(n: int = N, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    """q, k, v (BATCH, HEADS, n, HEAD_DIM) float32 on the CPU, the same every time."""
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=generator)
                 .requires_grad_(requires_grad) for _ in range(3))


def training_inputs() -> tuple[torch.Tensor, ...]:
    """q, k, v that require grad at N_BACKWARD, and an incoming gradient for the output."""
    q, k, v = make_inputs(N_BACKWARD, requires_grad=True)
    return q, k, v, torch.randn(BATCH, HEADS, N_BACKWARD, HEAD_DIM,
                                generator=torch.Generator().manual_seed(1))


def materialised(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Standard attention: the (n, n) scores and weights of every head, in memory."""
    return torch.softmax(q @ k.transpose(-2, -1) * SCALE, dim=-1) @ v


def tiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return flash_attention_forward(q, k, v, block_q=BLOCK_Q, block_k=BLOCK_K)[0]


def tiled_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return flash_attention_forward(q, k, v, causal=True, block_q=BLOCK_Q, block_k=BLOCK_K)[0]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # L = S: same as ours


def flash_training(q, k, v, dout) -> None:
    flash_attention(q, k, v, block_q=BLOCK_Q, block_k=BLOCK_K).backward(dout)


def materialised_training(q, k, v, dout) -> None:
    materialised(q, k, v).backward(dout)


def sdpa_training(q, k, v, dout) -> None:
    sdpa(q, k, v).backward(dout)


def backward_ms(forward, inputs: tuple[torch.Tensor, ...], repeats: int) -> float:
    """Median time (ms) of ``out.backward(dout)`` alone, each after an untimed forward."""
    q, k, v, dout = inputs
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        out = forward(q, k, v)
        start = time.perf_counter()
        out.backward(dout)
        times.append(time.perf_counter() - start)
        for t in (q, k, v):
            t.grad = None
    return 1e3 * statistics.median(times[1:])


def _yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def run() -> str:
    """Measure the forward and the backward, print and write the markdown report."""
    device = torch.device("cpu")
    q, k, v = make_inputs()
    with torch.inference_mode():
        times = median_ms({"SDPA": lambda: sdpa(q, k, v), "tiled": lambda: tiled(q, k, v),
                           "SDPA, causal": lambda: sdpa_causal(q, k, v),
                           "tiled, causal": lambda: tiled_causal(q, k, v)}, device,
                          repeats=REPEATS)
        times["materialised"] = median_ms({"materialised": lambda: materialised(q, k, v)},
                                          device, repeats=2)["materialised"]
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        error = (tiled(q, k, v) - sdpa(q, k, v)).abs().max().item()
        error_exact = (tiled(q, k, v).double() - exact).abs().max().item()
        error_causal = (tiled_causal(q, k, v) - sdpa_causal(q, k, v)).abs().max().item()
    del exact
    memory = {name: peak_rss_bytes(make_inputs, fn) / MIB
              for name, fn in (("materialised", materialised), ("tiled", tiled), ("SDPA", sdpa))}
    load = os.getloadavg()[0]

    training = training_inputs()
    backward = {name: backward_ms(forward, training, repeats=3) for name, forward in
                (("flash (recompute)", lambda q, k, v: flash_attention(
                    q, k, v, block_q=BLOCK_Q, block_k=BLOCK_K)),
                 ("materialised autograd", materialised), ("SDPA autograd", sdpa))}
    training_memory = {name: peak_rss_bytes(training_inputs, fn) / MIB for name, fn in
                       (("flash (recompute)", flash_training),
                        ("materialised autograd", materialised_training),
                        ("SDPA autograd", sdpa_training))}

    ratio_time = times["tiled"] / times["SDPA"]
    ratio_memory = memory["materialised"] / memory["tiled"]
    lines = [
        f"### Forward, n = {N}, batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, float32, CPU",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads on {os.cpu_count()} "
        f"CPUs, load average {load:.1f} (other processes make CPU timings noisy). Tiled = "
        f"`helpers.flash.flash_attention_forward`, blocks {BLOCK_Q} x {BLOCK_K}. Time: median "
        f"of {REPEATS} interleaved runs (materialised: 2). Peak memory: resident memory the "
        "call adds, each in a fresh process.",
        "",
        "| variant | time (ms) | time / SDPA | peak memory (MiB) | materialised / this |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("tiled", "SDPA", "materialised"):
        lines.append(f"| {name} | {times[name]:.0f} | {times[name] / times['SDPA']:.2f} | "
                     f"{memory[name]:.1f} | {memory['materialised'] / memory[name]:.1f} |")
    lines += [
        f"| tiled, causal | {times['tiled, causal']:.0f} | "
        f"{times['tiled, causal'] / times['SDPA, causal']:.2f} (vs SDPA causal) | | |",
        f"| SDPA, causal | {times['SDPA, causal']:.0f} | 1.00 | | |",
        "",
        f"Max |tiled - SDPA|: {error:.1e} (causal {error_causal:.1e}); max |tiled - float64 "
        f"SDPA|: {error_exact:.1e}.",
        "",
        f"Bar: peak memory >= 10x below materialised: {ratio_memory:.0f}x, "
        f"{_yes(ratio_memory >= 10)}; time <= 2.5x SDPA: {ratio_time:.2f}x, "
        f"{_yes(ratio_time <= 2.5)}; output within 1e-5: {_yes(error <= 1e-5)}.",
        "",
        f"### Backward, n = {N_BACKWARD} (same shape otherwise)",
        "",
        "Time of `out.backward(dout)` alone (median of 3, after an untimed forward); peak "
        "memory of forward and backward together, each in a fresh process.",
        "",
        "| variant | backward (ms) | / materialised autograd | / SDPA autograd | "
        "forward + backward peak (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, ms in backward.items():
        lines.append(f"| {name} | {ms:.0f} | {ms / backward['materialised autograd']:.2f} | "
                     f"{ms / backward['SDPA autograd']:.2f} | {training_memory[name]:.1f} |")
    table = "\n".join(lines) + "\n"
    return publish(table, OUT)


TITLE = "FlashAttention on the CPU: tiled attention vs SDPA and materialised attention"


if __name__ == "__main__":
    run()
