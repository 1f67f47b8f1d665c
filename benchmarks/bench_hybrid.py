"""Time and memory of the hybrid (lesson 11) against its two peers, the pure-attention and the
pure-Mamba stack, in one run.

1. Decoding: one token after a context of n tokens, n from 1K to 32K, for stacks of 8 layers
   of the same width: attention (GQA), Mamba, linear attention, and Jamba's ``"MMMMAMMM"``
   with the same attention layer, through ``helpers.hybrid.compare_mechanisms`` (the models
   take turns, medians, a random cache of n tokens: a step costs what the cache holds, not
   what it says). Time per token and bytes kept, as ratios hybrid / attention and
   hybrid / Mamba.
2. Prefill: a prompt of n tokens, the same stacks, time per token and peak tensor memory.
3. Greedy generation of a batch, prompt then new tokens, each model on its own cache; the
   hybrid's tokens are checked against a rerun of the whole text.
4. The generic stack against the course's dedicated models with the same weights: an
   all-attention ``Hybrid`` against ``helpers.transformer.Llama``, an all-Mamba one against
   ``helpers.ssm.Mamba`` (forward and generation; same logits and tokens): the price of
   one model for every layout.

On a CPU everything runs on one torch thread. Prints markdown and writes
``benchmarks/out/hybrid.md``. Run ``python benchmarks/bench_hybrid.py``; the combined report
calls :func:`run`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from helpers.device import get_device, one_cpu_thread, seed_everything
from helpers.hybrid import Hybrid, HybridConfig, compare_mechanisms, jamba_layout
from helpers.ssm import Mamba
from helpers.transformer import Llama
from timing import median_ms, publish

TITLE = "Hybrids: Jamba's layout against pure attention and pure Mamba"
OUT = Path(__file__).parent / "out" / "hybrid.md"

BASE = dict(vocab_size=1024, d_model=128, n_heads=4, d_ff=0)
STACKS = {"attention": dict(layout="A" * 8, n_kv_heads=2),
          "Mamba": dict(layout="M" * 8),
          "linear attention": dict(layout="L" * 8),
          "hybrid": dict(layout=jamba_layout(8), n_kv_heads=2)}
DECODE_CONTEXTS = (1024, 4096, 16384, 32768)
PREFILL_CONTEXTS = (512, 2048, 4096)
BATCH, PROMPT, NEW_TOKENS = 4, 512, 64
SAME = dict(vocab_size=1024, d_model=128, n_layers=4, prompt=32, new=64, forward_l=1024)


def threads(device: torch.device):
    return one_cpu_thread() if device.type == "cpu" else contextlib.nullcontext()


def stacks(device: torch.device) -> dict[str, Hybrid]:
    seed_everything(0)
    return {name: Hybrid(HybridConfig(**BASE, **options)).to(device).eval()
            for name, options in STACKS.items()}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}"


def comparison_tables(models: dict[str, Hybrid]) -> str:
    rows = compare_mechanisms(models, DECODE_CONTEXTS, prefill_contexts=PREFILL_CONTEXTS,
                              repeats=5, generator=torch.Generator().manual_seed(0))
    at = {(row.mechanism, row.context): row for row in rows}
    names = list(models)
    decode = ["| context | " + " | ".join(f"{n} ms/token" for n in names)
              + " | hybrid / attention | hybrid / Mamba | " + " | ".join(f"{n} MiB"
                                                                          for n in names)
              + " | hybrid / attention (memory) |",
              "|---:" * (2 * len(names) + 4) + "|"]
    for n in DECODE_CONTEXTS:
        r = {name: at[name, n] for name in names}
        decode.append(f"| {n} | " + " | ".join(f"{1e3 * r[m].decode_s:.2f}" for m in names)
                      + f" | **{ratio(r['hybrid'].decode_s, r['attention'].decode_s)}** | "
                        f"**{ratio(r['hybrid'].decode_s, r['Mamba'].decode_s)}** | "
                      + " | ".join(f"{r[m].cache_bytes / 2**20:.3f}" for m in names)
                      + f" | {ratio(r['hybrid'].cache_bytes, r['attention'].cache_bytes)} |")
    prefill = ["| prompt | " + " | ".join(f"{n} µs/token" for n in names)
               + " | hybrid / attention | hybrid / Mamba | "
               + " | ".join(f"{n} peak MiB" for n in names) + " |",
               "|---:" * (2 * len(names) + 3) + "|"]
    for n in PREFILL_CONTEXTS:
        r = {name: at[name, n] for name in names}
        prefill.append(f"| {n} | " + " | ".join(f"{1e6 * r[m].prefill_s:.0f}" for m in names)
                       + f" | **{ratio(r['hybrid'].prefill_s, r['attention'].prefill_s)}** | "
                         f"**{ratio(r['hybrid'].prefill_s, r['Mamba'].prefill_s)}** | "
                       + " | ".join(f"{r[m].prefill_bytes / 2**20:.1f}" for m in names) + " |")
    first, last = DECODE_CONTEXTS[0], DECODE_CONTEXTS[-1]
    growth = ", ".join(f"{name} {at[name, last].decode_s / at[name, first].decode_s:.2f}×"
                       for name in names)
    shape = ", ".join(f"{k} {v}" for k, v in BASE.items())
    return (f"### Decoding one token after n tokens (8 layers, {shape}, attention with 2 K/V "
            f"heads; batch 1, float32, median of 5)\n\n" + "\n".join(decode)
            + f"\n\nTime per token from n = {first} to {last}: {growth}.\n\n"
            f"### Prefill of n tokens (same stacks)\n\n" + "\n".join(prefill) + "\n")


def generation_table(models: dict[str, Hybrid], device: torch.device) -> str:
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, BASE["vocab_size"], (BATCH, PROMPT), generator=g).to(device)
    short = prompt[:, :16]
    hybrid = models["hybrid"]
    same = torch.equal(hybrid.generate(short, 16), hybrid.generate(short, 16, use_cache=False))
    t = median_ms({name: (lambda model=model: model.generate(prompt, NEW_TOKENS))
                   for name, model in models.items()}, device, repeats=3)
    lines = ["| model | ms | tokens/s | hybrid / this |", "|---|---:|---:|---:|"]
    for name in models:
        lines.append(f"| {name} | {t[name]:.0f} | {BATCH * NEW_TOKENS / t[name] * 1e3:.0f} | "
                     f"**{ratio(t['hybrid'], t[name])}** |")
    return (f"### Greedy generation: batch {BATCH}, prompt {PROMPT}, {NEW_TOKENS} new tokens "
            f"(median of 3; the hybrid's cached tokens equal a rerun of the whole text: "
            f"{'yes' if same else '**no**'})\n\n" + "\n".join(lines) + "\n")


def dedicated_table(device: torch.device) -> str:
    """The generic Hybrid against Llama and Mamba holding the same weights."""
    s = SAME
    seed_everything(1)
    llama = Llama(s["vocab_size"], s["d_model"], s["n_layers"], n_heads=4, n_kv_heads=2,
                  d_ff=4 * s["d_model"]).to(device).eval()
    as_hybrid = Hybrid(HybridConfig(s["vocab_size"], s["d_model"], "A" * s["n_layers"],
                                    n_heads=4, n_kv_heads=2, d_ff=4 * s["d_model"],
                                    tie_embeddings=False)).to(device).eval()
    as_hybrid.load_state_dict({name.replace("token_embedding.", "embedding.token.")
                               .replace("blocks.", "layers.").replace(".attn.", ".mixer.attn."): w
                               for name, w in llama.state_dict().items()})
    mamba = Mamba(s["vocab_size"], s["d_model"], s["n_layers"]).to(device).eval()
    mamba_hybrid = Hybrid(HybridConfig(s["vocab_size"], s["d_model"], "M" * s["n_layers"],
                                       d_ff=0, norm_eps=1e-5)).to(device).eval()
    mamba_hybrid.load_state_dict({name.replace("embedding.", "embedding.token.")
                                  .replace("blocks.", "layers.").replace(".norm.", ".norm1."): w
                                  for name, w in mamba.state_dict().items()})
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, s["vocab_size"], (1, s["forward_l"]), generator=g).to(device)
    prompt = idx[:, :s["prompt"]]
    lines = ["| peer | task | Hybrid | peer | ratio Hybrid / peer | check |",
             "|---|---|---:|---:|---:|---|"]
    for name, ours, peer in (("Llama (GQA, SwiGLU)", as_hybrid, llama),
                             ("Mamba", mamba_hybrid, mamba)):
        with torch.no_grad():
            diff = float((ours(idx) - peer(idx)).abs().max())
            forward = median_ms({"ours": lambda: ours(idx), "peer": lambda: peer(idx)}, device,
                                repeats=3)
        same = torch.equal(ours.generate(prompt, s["new"]), peer.generate(prompt, s["new"]))
        generate = median_ms({"ours": lambda: ours.generate(prompt, s["new"]),
                              "peer": lambda: peer.generate(prompt, s["new"])}, device,
                             repeats=3)
        lines.append(f"| {name} | forward, L = {s['forward_l']} | {forward['ours']:.0f} ms | "
                     f"{forward['peer']:.0f} ms | **{ratio(forward['ours'], forward['peer'])}** "
                     f"| max abs logit diff {diff:.1e} |")
        lines.append(f"| {name} | generation, {s['prompt']} + {s['new']} tokens | "
                     f"{generate['ours']:.0f} ms | {generate['peer']:.0f} ms | "
                     f"**{ratio(generate['ours'], generate['peer'])}** | "
                     f"{'same tokens' if same else '**different tokens**'} |")
    return (f"### One model for every layout against the dedicated ones, same weights "
            f"(d_model {s['d_model']}, {s['n_layers']} layers, batch 1, median ms)\n\n"
            + "\n".join(lines) + "\n")


def run() -> str:
    device = get_device()
    with threads(device):
        models = stacks(device)
        sections = [comparison_tables(models), generation_table(models, device),
                    dedicated_table(device)]
    load = os.getloadavg()[0]
    header = (f"device `{device}`, torch {torch.__version__}, "
              f"{1 if device.type == 'cpu' else torch.get_num_threads()} torch thread on "
              f"{os.cpu_count()} CPUs (load average {load:.1f} at the end: other processes make "
              "CPU timings noisy)\n\n")
    return publish(header + "\n".join(sections), OUT)


if __name__ == "__main__":
    run()
