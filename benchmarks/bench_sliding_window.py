"""Sliding-window attention: the banded O(n·W) computation against the masked O(n²) one.

At n = 16384 tokens and a window of W = 512 (batch 1, 4 heads of 64, float32), on the device
``helpers.device.get_device()`` picks, for the same q, k, v:

- banded: ``helpers.sliding_window.sliding_window_attention`` (blocks of queries, each
  attending to its own T + W - 1 keys with PyTorch's fused SDPA);
- masked: ``torch.nn.functional.scaled_dot_product_attention`` with the (n, n) boolean
  ``sliding_window_mask``, the fused kernel a user would pick (it still scores every pair);
- at the smaller n of the sweep, also the course's readable masked attention
  (``helpers.attention.scaled_dot_product_attention``, which materialises the scores).

Time is the median of a few runs. Peak memory is the extra memory a call needs on top of its
inputs: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the growth of the process's
peak resident set (``VmHWM``, Linux), each variant in a fresh process of its own. Prints a
markdown table and writes it to ``benchmarks/out/sliding_window.md``; ``python
benchmarks/bench_sliding_window.py``, or :func:`run` from the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from helpers.attention import scaled_dot_product_attention, sliding_window_mask
from helpers.device import get_device
from helpers.sliding_window import sliding_window_attention
from timing import median_ms, publish

N, WINDOW, HEADS, HEAD_DIM = 16384, 512, 4, 64
SWEEP = (2048, 4096, 8192, 16384)
READABLE_UP_TO = 4096  # the readable path materialises H·n² floats, several times over
REPEATS = 3
OUT = Path(__file__).parent / "out" / "sliding_window.md"


def inputs(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    q, k, v = torch.randn(3, 1, HEADS, n, HEAD_DIM, generator=g).to(device)
    return q, k, v


def variants(n: int, device: torch.device) -> dict:
    """name -> a call computing sliding-window attention at length n (mask built inside)."""
    q, k, v = inputs(n, device)
    calls = {
        "banded": lambda: sliding_window_attention(q, k, v, WINDOW),
        "masked SDPA": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=sliding_window_mask(n, WINDOW, device=device)),
    }
    if n <= READABLE_UP_TO:
        calls["masked, readable"] = lambda: scaled_dot_product_attention(
            q, k, v, mask=sliding_window_mask(n, WINDOW, device=device))[0]
    return calls


def peak_rss_kib() -> int:
    """This process's peak resident memory so far (Linux's VmHWM), in KiB."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


def peak_extra_mib(name: str, n: int) -> float:
    """Extra memory (MiB) one call of variant ``name`` needs at length n, beyond its inputs."""
    device = get_device()
    if device.type == "cuda":
        fn = variants(n, device)[name]
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    # VmHWM (peak RSS, KiB) of the fresh process: ru_maxrss would start at the parent's peak,
    # which Linux carries over a fork and exec
    script = ("import json, sys; sys.path.insert(0, sys.argv[3]); "
              "import bench_sliding_window as b; import torch; "
              "fn = b.variants(int(sys.argv[2]), torch.device('cpu'))[sys.argv[1]]; "
              "before = b.peak_rss_kib(); fn(); "
              "print(json.dumps((b.peak_rss_kib() - before) / 1024))")
    result = subprocess.run([sys.executable, "-c", script, name, str(n),
                             str(Path(__file__).parent)], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def agreement(n: int, device: torch.device) -> float:
    calls = variants(n, device)
    return float((calls["banded"]() - calls["masked SDPA"]()).abs().max())


TITLE = "Sliding-window attention, banded vs masked"


def run() -> str:
    """Time the sweep, measure peak memory at N, print and write the markdown, and return it."""
    device = get_device()
    rows = {n: median_ms(variants(n, device), device, repeats=REPEATS) for n in SWEEP}
    names = ["banded", "masked SDPA", "masked, readable"]
    lines = [f"### Banded vs masked sliding-window attention, W = {WINDOW}, median of "
             f"{REPEATS} runs (ms; masked SDPA's time ÷ banded's)\n",
             f"device `{device}`, torch {torch.__version__}, {torch.get_num_threads()} torch "
             f"threads on {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), batch 1, "
             f"{HEADS} heads of {HEAD_DIM}, float32\n",
             "| n | " + " | ".join(names) + " | banded speed-up |",
             "|---:" * (len(names) + 2) + "|"]
    for n, times in rows.items():
        cells = [f"{times[name]:.1f}" if name in times else "—" for name in names]
        lines.append(f"| {n} | " + " | ".join(cells)
                     + f" | {times['masked SDPA'] / times['banded']:.1f}× |")
    peaks = {name: peak_extra_mib(name, N) for name in names[:2]}
    lines += ["", f"Peak memory beyond the inputs at n = {N} (MiB): banded "
              f"{peaks['banded']:.0f}, masked SDPA {peaks['masked SDPA']:.0f} "
              f"({peaks['masked SDPA'] / max(peaks['banded'], 1e-9):.1f}× the banded); "
              f"largest difference between the two outputs {agreement(2048, device):.1e} "
              f"(n = 2048). Memory is "
              + ("`torch.cuda.max_memory_allocated`." if device.type == "cuda" else
                 "the growth of peak RSS in a fresh process (CPU).")]
    table = "\n".join(lines) + "\n"
    return publish(table, OUT)


if __name__ == "__main__":
    run()
