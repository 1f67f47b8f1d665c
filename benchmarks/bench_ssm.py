"""Time the course's selective scan and Mamba against their peers, in one run.

1. ``helpers.ssm.selective_scan`` at L = 4096, batch 1, N = 16 and a few channel counts D:
   the parallel scan against the sequential loop (the bar: >= 5x faster within 1e-4, at
   D = 64, the d_inner of a d_model = 32 Mamba like the lesson's), and against
   ``transformers``' pure-PyTorch ``mamba_selective_scan``; forward, and forward + backward.
2. ``helpers.ssm.Mamba`` against Hugging Face's ``MambaForCausalLM`` (its pure-PyTorch path:
   no CUDA kernels) holding the same weights: a forward pass, and greedy generation (same
   tokens), as time ratios.
3. Decoding time per token at growing context lengths: Mamba's recurrent state against a
   GPT with ``helpers.kv_cache.KVCache``, with the bytes each keeps.

On a CPU everything runs on one torch thread: the machine is shared, and intra-op threads on
a busy CPU make timings erratic (the sequential loop's tiny operations would not use them
anyway). Prints markdown and writes ``benchmarks/out/ssm.md``. Run
``python benchmarks/bench_ssm.py``; the combined report calls :func:`run`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from helpers.device import get_device, one_cpu_thread, seed_everything
from helpers.kv_cache import KVCache
from helpers.ssm import Mamba, selective_scan
from helpers.transformer import GPT
from timing import median_ms, publish

TITLE = "State space models: the parallel scan, Mamba against Hugging Face, decoding"
OUT = Path(__file__).parent / "out" / "ssm.md"

SCAN_L, SCAN_N, SCAN_CHANNELS, BAR_CHANNELS = 4096, 16, (16, 64, 256, 1024), 64
MODEL = dict(vocab_size=1024, hidden_size=128, num_hidden_layers=4, state_size=16)
FORWARD_L, PROMPT, NEW_TOKENS = 1024, 32, 64
DECODE_CONTEXTS, DECODE_STEPS, DECODE_WIDTH, DECODE_LAYERS = (256, 1024, 4096), 32, 256, 4


def threads(device: torch.device):
    return one_cpu_thread() if device.type == "cpu" else contextlib.nullcontext()


def hf_scan():
    """transformers' pure-PyTorch selective scan, or None when this version has none."""
    try:
        from transformers.models.mamba import modeling_mamba
    except ImportError:
        return None
    scan = getattr(modeling_mamba, "mamba_selective_scan", None)
    return None if scan is None else inspect.unwrap(scan)


def scan_inputs(channels: int, device: torch.device, requires_grad: bool = False):
    g = torch.Generator().manual_seed(channels)
    u = torch.randn(1, channels, SCAN_L, generator=g)
    delta = F.softplus(torch.randn(1, channels, SCAN_L, generator=g) - 2)  # Mamba's Δ range
    A = -torch.arange(1, SCAN_N + 1.0).repeat(channels, 1)  # S4D-Real, Mamba's initial A
    B, C = (torch.randn(1, SCAN_N, SCAN_L, generator=g) for _ in range(2))
    D = torch.ones(channels)
    return [t.to(device).requires_grad_(requires_grad) for t in (u, delta, A, B, C, D)]


def scan_table(device: torch.device) -> str:
    reference = hf_scan()
    lines = ["| D channels | sequential | parallel | parallel speed-up | max rel. diff | "
             "HF `mamba_selective_scan` | speed-up vs HF |", "|---:" * 7 + "|"]
    for channels in SCAN_CHANNELS:
        u, delta, A, B, C, D = inputs = scan_inputs(channels, device)
        fns = {"sequential": lambda: selective_scan(*inputs, method="sequential"),
               "parallel": lambda: selective_scan(*inputs, method="parallel")}
        if reference is not None:
            fns["hf"] = lambda: reference(u, delta, A, B, C, D=D)
        with torch.no_grad():
            slow, fast = fns["sequential"](), fns["parallel"]()
            diff = float((fast - slow).abs().max() / slow.abs().max())
            t = median_ms(fns, device, repeats=3 if channels > BAR_CHANNELS else 5)
        hf = (f"{t['hf']:.0f} ms | {t['hf'] / t['parallel']:.1f}×" if reference is not None
              else "n/a | n/a")
        mark = " (bar)" if channels == BAR_CHANNELS else ""
        lines.append(f"| {channels}{mark} | {t['sequential']:.0f} ms | {t['parallel']:.0f} ms | "
                     f"**{t['sequential'] / t['parallel']:.1f}×** | {diff:.1e} | {hf} |")

    inputs = scan_inputs(BAR_CHANNELS, device, requires_grad=True)

    def backward(method: str):
        return lambda: torch.autograd.grad(selective_scan(*inputs, method=method).sum(), inputs)

    slow_grads, fast_grads = backward("sequential")(), backward("parallel")()
    grad_diff = max(float((f - s).abs().max() / s.abs().max().clamp_min(1e-30))
                    for f, s in zip(fast_grads, slow_grads))
    t = median_ms({"sequential": backward("sequential"), "parallel": backward("parallel")},
                  device, repeats=3)
    return ("### Selective scan, L = 4096, batch 1, N = 16 (median ms)\n\n"
            + "\n".join(lines)
            + f"\n\nForward + backward at D = {BAR_CHANNELS}: sequential "
              f"{t['sequential']:.0f} ms, parallel {t['parallel']:.0f} ms, "
              f"**{t['sequential'] / t['parallel']:.1f}×**; gradients agree to {grad_diff:.1e} "
              "(relative).\n")


def hf_mamba(device: torch.device):
    import transformers

    transformers.logging.set_verbosity_error()  # "falling back to the PyTorch path" is expected
    config = transformers.MambaConfig(**MODEL, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=None)
    torch.manual_seed(0)
    return transformers.MambaForCausalLM(config).to(device).eval()


def model_table(device: torch.device) -> str:
    try:
        theirs = hf_mamba(device)
    except ImportError:
        return "### Mamba against Hugging Face\n\ntransformers is not installed: skipped.\n"
    ours = Mamba.from_hf(theirs)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, MODEL["vocab_size"], (1, FORWARD_L), generator=g).to(device)
    prompt = idx[:, :PROMPT]
    with torch.no_grad():
        logits_diff = float((ours(idx) - theirs(idx, use_cache=False).logits).abs().max())
        forward = median_ms({"ours": lambda: ours(idx),
                             "hf": lambda: theirs(idx, use_cache=False)}, device, repeats=3)
    mine = ours.generate(prompt, NEW_TOKENS)
    same = torch.equal(mine, theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                                             max_new_tokens=NEW_TOKENS, do_sample=False))
    generate = median_ms({
        "ours": lambda: ours.generate(prompt, NEW_TOKENS),
        "hf": lambda: theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                                      max_new_tokens=NEW_TOKENS, do_sample=False)},
        device, repeats=3)
    rows = [("forward, L = " + str(FORWARD_L), forward, f"max |logit diff| {logits_diff:.1e}"),
            (f"greedy generation, {PROMPT} + {NEW_TOKENS} tokens", generate,
             "same tokens" if same else "**different tokens**")]
    lines = ["| task | ours | HF MambaForCausalLM | ratio ours / HF | check |",
             "|---|---:|---:|---:|---|"]
    for name, t, check in rows:
        lines.append(f"| {name} | {t['ours']:.0f} ms | {t['hf']:.0f} ms | "
                     f"**{t['ours'] / t['hf']:.2f}** | {check} |")
    size = ", ".join(f"{k} {v}" for k, v in MODEL.items())
    return (f"### Mamba against Hugging Face's pure-PyTorch Mamba, same weights ({size}, "
            "batch 1, float32; median ms)\n\n" + "\n".join(lines) + "\n")


def decode_ms(model: torch.nn.Module, context: torch.Tensor, device: torch.device
              ) -> tuple[float, int]:
    """Milliseconds per decoded token after ``context``, and the bytes the model then keeps."""
    with torch.no_grad():
        if isinstance(model, Mamba):
            memory = model.empty_states(1)
            model(context, memory)
            step = lambda token: model(token, memory)  # noqa: E731
            nbytes = lambda: sum(state.nbytes for state in memory)  # noqa: E731
        else:
            memory = KVCache(len(model.blocks), capacity=context.shape[1] + 4 * DECODE_STEPS)
            model(context, cache=memory)
            step = lambda token: model(token, cache=memory)  # noqa: E731
            nbytes = lambda: memory.nbytes  # noqa: E731
        held = nbytes()  # after the context, before the timed steps add to it
        token = context[:, -1:]

        def steps():
            for _ in range(DECODE_STEPS):
                step(token)

        ms = median_ms({"steps": steps}, device, repeats=3)["steps"]  # 4 x 32 tokens in all
        return ms / DECODE_STEPS, held


def decode_table(device: torch.device) -> str:
    torch.manual_seed(0)
    mamba = Mamba(1024, DECODE_WIDTH, DECODE_LAYERS).to(device).eval()
    longest = max(DECODE_CONTEXTS) + 4 * DECODE_STEPS
    gpt = GPT(1024, DECODE_WIDTH, DECODE_LAYERS, n_heads=4, max_len=longest).to(device).eval()
    rows = {}
    for L in DECODE_CONTEXTS:
        context = torch.randint(0, 1024, (1, L), generator=torch.Generator().manual_seed(L))
        context = context.to(device)
        rows[L] = (decode_ms(mamba, context, device), decode_ms(gpt, context, device))
    lines = ["| context | Mamba ms/token | Mamba state | GPT + KV cache ms/token | KV cache |",
             "|---:|---:|---:|---:|---:|"]
    for L, ((m_ms, m_bytes), (g_ms, g_bytes)) in rows.items():
        lines.append(f"| {L} | {m_ms:.2f} | {m_bytes / 1024:.0f} KiB | {g_ms:.2f} | "
                     f"{g_bytes / 1024:.0f} KiB |")
    first, last = rows[min(rows)], rows[max(rows)]
    return (f"### Decoding one token after a context (d_model {DECODE_WIDTH}, {DECODE_LAYERS} "
            f"layers each, GPT with 4 heads; float32; mean of {DECODE_STEPS} steps)\n\n"
            + "\n".join(lines)
            + f"\n\nFrom {min(rows)} to {max(rows)} tokens of context, Mamba's time per token "
              f"changes {last[0][0] / first[0][0]:.2f}× and its state not at all; the GPT's "
              f"time per token changes {last[1][0] / first[1][0]:.2f}× and its KV cache "
              f"{last[1][1] / first[1][1]:.0f}×.\n")


def run() -> str:
    device = get_device()
    seed_everything(0)
    with threads(device):
        sections = [scan_table(device), model_table(device), decode_table(device)]
    load = os.getloadavg()[0]
    header = (f"device `{device}`, torch {torch.__version__}, "
              f"{1 if device.type == 'cpu' else torch.get_num_threads()} torch thread on "
              f"{os.cpu_count()} CPUs (load average {load:.1f} at the end: other processes make "
              "CPU timings noisy)\n\n")
    report = header + "\n".join(sections)
    return publish(report, OUT)


if __name__ == "__main__":
    run()
