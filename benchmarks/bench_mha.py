"""Time one forward pass of the course's MultiHeadAttention against PyTorch's.

Compares, at a few sequence lengths (d_model 256, 8 heads, batch 1), on the device
``helpers.device.get_device()`` picks:

- ``helpers.attention.MultiHeadAttention`` on its fast path (no weights asked for),
- the same module with ``need_weights=True`` (the readable path that materialises L x S),
- ``torch.nn.MultiheadAttention`` with the same weights (copied with ``from_torch``),
- ``torch.nn.functional.scaled_dot_product_attention`` alone, on the same projected q, k, v.

Prints a markdown table (median milliseconds, and each time divided by
``nn.MultiheadAttention``'s) and writes it to ``benchmarks/out/mha.md``. Run
``python benchmarks/bench_mha.py``; a combined report calls :func:`run`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from helpers.attention import MultiHeadAttention, split_heads
from helpers.device import get_device, seed_everything
from timing import median_ms, publish

SEQ_LENS = (128, 512, 1024, 2048)
D_MODEL, N_HEADS, BATCH = 256, 8, 1
REPEATS = 7
OUT = Path(__file__).parent / "out" / "mha.md"


def time_one_length(L: int, device: torch.device) -> dict[str, float]:
    """Median forward times (ms) of the four variants at sequence length ``L``."""
    theirs = nn.MultiheadAttention(D_MODEL, N_HEADS, batch_first=True).to(device).eval()
    ours = MultiHeadAttention.from_torch(theirs).eval()
    x = torch.randn(BATCH, L, D_MODEL, device=device)
    with torch.inference_mode():
        q = split_heads(ours.q_proj(x), N_HEADS)  # (B, H, L, D)
        k = split_heads(ours.k_proj(x), N_HEADS)  # (B, H, L, D)
        v = split_heads(ours.v_proj(x), N_HEADS)  # (B, H, L, D)
        return median_ms({
            "ours": lambda: ours(x),
            "ours, need_weights": lambda: ours(x, need_weights=True),
            "nn.MultiheadAttention": lambda: theirs(x, x, x, need_weights=False),
            "F.sdpa kernel only": lambda: F.scaled_dot_product_attention(q, k, v),
        }, device, repeats=REPEATS)


TITLE = "Multi-head attention, one forward"


def run() -> str:
    """Time every length, print and write the markdown table, and return it."""
    device = get_device()
    seed_everything(0)
    rows = {L: time_one_length(L, device) for L in SEQ_LENS}
    names = list(next(iter(rows.values())))
    header = (f"### MultiHeadAttention forward, median of {REPEATS} runs (ms; ratio to "
              f"nn.MultiheadAttention)\n\n"
              f"device `{device}`, torch {torch.__version__}, {torch.get_num_threads()} torch "
              f"threads on {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at the "
              f"end: other processes make CPU timings noisy), d_model {D_MODEL}, {N_HEADS} "
              f"heads, batch {BATCH}, float32\n\n")
    lines = ["| L | " + " | ".join(names) + " |", "|---:" * (len(names) + 1) + "|"]
    for L, times in rows.items():
        base = times["nn.MultiheadAttention"]
        cells = [f"{t:.2f} ({t / base:.2f}×)" for t in times.values()]
        lines.append(f"| {L} | " + " | ".join(cells) + " |")
    table = header + "\n".join(lines) + "\n"
    return publish(table, OUT)


if __name__ == "__main__":
    run()
