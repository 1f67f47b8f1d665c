"""Cached generation against uncached and against Hugging Face, and compressed caches' quality.

At GPT-2-small shape (12 layers, d_model 768, 12 heads, vocabulary 50257, random weights),
a 16-token prompt and 512 new greedy tokens, on the device ``helpers.device.get_device()``
picks, one run measures:

- ``GPT.generate`` with its ``KVCache`` against ``use_cache=False`` (rerunning the sequence
  each step): the same tokens, and the ratio of times (bar: >= 10x);
- ``GPT.generate`` against ``transformers.GPT2LMHeadModel.generate`` with the same weights
  (``GPT.from_hf``), both cached and greedy: the same tokens, and the ratio (aim: <= 1.0);
  and one forward over 512 tokens against theirs, as a ratio;
- the time of one decode step against the sequence length, with the cache (flat);
- quality against cache memory for every compressed cache of ``helpers.kv_cache``, on the
  model and task of lesson 09 (``helpers.tasks.rule_stream``).

Prints markdown and writes it to ``benchmarks/out/kv_cache.md``. Run
``python benchmarks/bench_kv_cache.py``; a combined report calls :func:`run`. The uncached
run alone takes minutes on a CPU: it is what the cache saves.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from helpers import tasks
from helpers.device import get_device, one_cpu_thread, seed_everything
from helpers.kv_cache import (HeavyHitterCache, KVCache, QuantizedKVCache, SinkCache,
                              cache_accuracy)
from helpers.transformer import GPT, train_next_token
from timing import median_ms, publish

TITLE = "KV cache: cached generation and compressed caches"
PROMPT, NEW_TOKENS, REPEATS = 16, 512, 3
FORWARD_TOKENS = 512
OUT = Path(__file__).parent / "out" / "kv_cache.md"


def progress(message: str) -> None:
    """A line on stderr as each phase ends: the whole benchmark takes minutes."""
    print(f"[bench_kv_cache {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def gpt2_small(device: torch.device) -> tuple[torch.nn.Module, GPT]:
    """A randomly initialised ``GPT2LMHeadModel`` of GPT-2 small's shape, and ours with its
    weights."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024,
                                     vocab_size=50257, bos_token_id=None, eos_token_id=None,
                                     pad_token_id=None)
    seed_everything(0)
    theirs = transformers.GPT2LMHeadModel(config).to(device).eval()
    return theirs, GPT.from_hf(theirs)


def decode_step_ms(model: GPT, prompt: torch.Tensor, steps: int) -> list[float]:
    """Milliseconds of each cached decode step after the prefill."""
    cache = KVCache(len(model.blocks), capacity=prompt.shape[1] + steps)
    times = []
    with torch.no_grad():
        logits = model(prompt, cache=cache)[:, -1]
        for _ in range(steps):
            token = logits.argmax(dim=-1, keepdim=True)
            start = time.perf_counter()
            logits = model(token, cache=cache)[:, -1]
            float(logits[0, 0])  # waits for a GPU
            times.append(1e3 * (time.perf_counter() - start))
    return times


def forward_lines(theirs: torch.nn.Module, ours: GPT, device: torch.device) -> list[str]:
    """One forward over a whole text, ours against Hugging Face's (same weights, same run)."""
    text = torch.randint(0, 50257, (1, FORWARD_TOKENS), generator=torch.Generator().manual_seed(2))
    text = text.to(device)
    with torch.no_grad():
        difference = float((ours(text) - theirs(text).logits).abs().max())
        times = median_ms({"ours": lambda: ours(text), "Hugging Face": lambda: theirs(text)},
                          device, repeats=5)
    progress(f"forward: ours {times['ours']:.0f} ms, Hugging Face {times['Hugging Face']:.0f} ms")
    return [f"\n### One forward over {FORWARD_TOKENS} tokens, same weights (median of 5)\n",
            "| model | ms | time / Hugging Face |", "|---|---:|---:|",
            f"| ours (`GPT.from_hf`) | {times['ours']:.0f} | "
            f"**{times['ours'] / times['Hugging Face']:.2f}** (bar: <= 1.0) |",
            f"| Hugging Face `GPT2LMHeadModel` | {times['Hugging Face']:.0f} | 1.00 |",
            f"\nlargest |logit difference|: {difference:.1e}\n"]


def generation_section(device: torch.device) -> str:
    theirs, ours = gpt2_small(device)
    prompt = torch.randint(0, 50257, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    ones = torch.ones_like(prompt)
    runs = {
        "ours, KV cache": lambda: ours.generate(prompt, NEW_TOKENS),
        "Hugging Face, cache": lambda: theirs.generate(prompt, attention_mask=ones,
                                                       max_new_tokens=NEW_TOKENS,
                                                       do_sample=False),
    }
    tokens = {name: run() for name, run in runs.items()}  # also the warm-up
    times = median_ms(runs, device, repeats=REPEATS, warmup=0)
    progress(", ".join(f"{name}: {ms / 1e3:.1f} s" for name, ms in times.items()))
    start = time.perf_counter()
    tokens["ours, no cache"] = ours.generate(prompt, NEW_TOKENS, use_cache=False)
    times["ours, no cache"] = 1e3 * (time.perf_counter() - start)
    progress(f"ours, no cache: {times['ours, no cache'] / 1e3:.1f} s")
    reference = tokens["ours, KV cache"]
    lines = [f"### Greedy generation, GPT-2-small shape, {PROMPT}-token prompt, {NEW_TOKENS} "
             f"new tokens\n",
             f"median of {REPEATS} runs (the uncached one: 1 run), float32\n",
             "| generation | seconds | ms per token | tokens identical to ours, cached | "
             "time / ours, cached |", "|---|---:|---:|---|---:|"]
    for name in ("ours, KV cache", "Hugging Face, cache", "ours, no cache"):
        same = torch.equal(tokens[name], reference)
        lines.append(f"| {name} | {times[name] / 1e3:.2f} | {times[name] / NEW_TOKENS:.1f} | "
                     f"{'yes' if same else 'NO'} | {times[name] / times['ours, KV cache']:.2f}× |")
    cached_vs_uncached = times["ours, no cache"] / times["ours, KV cache"]
    ours_vs_hf = times["ours, KV cache"] / times["Hugging Face, cache"]
    lines.append(f"\ncached vs uncached: **{cached_vs_uncached:.1f}× faster** (bar: >= 10×); "
                 f"ours vs Hugging Face: **{ours_vs_hf:.2f}** (time ratio; bar: <= 1.0)\n")
    lines += forward_lines(theirs, ours, device)
    steps = decode_step_ms(ours, prompt, NEW_TOKENS)
    progress("decode steps timed")
    buckets = 4
    size = NEW_TOKENS // buckets
    lines += ["\n### One cached decode step against the sequence length\n",
              "| sequence length | ms per step (mean) |", "|---:|---:|"]
    means = []
    for b in range(buckets):
        chunk = steps[b * size:(b + 1) * size]
        means.append(sum(chunk) / len(chunk))
        lines.append(f"| {PROMPT + b * size + 1} - {PROMPT + (b + 1) * size} | {means[-1]:.1f} |")
    lines.append(f"\nlast quarter / first quarter: **{means[-1] / means[0]:.2f}** (flat: ~1; "
                 f"without a cache each step grows with the length)\n")
    return "\n".join(lines) + "\n"


def quality_section(device: torch.device) -> str:
    """Lesson 09's experiment: a rule at the start of the sequence, answers to the end."""
    n_pairs, n_symbols, n_rules = 24, 16, 4
    seed_everything(0)
    generator = torch.Generator().manual_seed(0)
    model = GPT(n_symbols + n_rules + 1, 64, n_layers=2, n_heads=4, max_len=2 * n_pairs + 1,
                d_ff=128).to(device)
    with one_cpu_thread():
        train_next_token(model, lambda: tasks.rule_stream(64, n_pairs, n_symbols, n_rules,
                                                          generator=generator, device=device),
                         steps=120, lr=3e-3)
        inputs, targets = tasks.rule_stream(256, n_pairs, n_symbols, n_rules,
                                            generator=generator, device=device)
        length = inputs.shape[1]

        def quality(cache) -> tuple[float, int]:
            accuracy = cache_accuracy(model, inputs, targets, cache, prefill=2,
                                      scored_from=length // 2)
            return accuracy, cache.nbytes

        full_accuracy, full_bytes = quality(KVCache(2))
        rows = [("full KV cache", "all", full_accuracy, 1.0)]
        for budget in (8, 16, 24, 32):
            for name, cache in (("sliding window", SinkCache(2, budget, n_sinks=0)),
                                ("4 sinks + window", SinkCache(2, budget - 4, n_sinks=4)),
                                ("heavy hitters (H2O)", HeavyHitterCache(2, budget, budget // 2))):
                accuracy, nbytes = quality(cache)
                rows.append((name, f"{budget} tokens", accuracy, nbytes / full_bytes))
        for bits in (8, 4):
            accuracy, nbytes = quality(QuantizedKVCache(2, bits=bits, residual=8))
            rows.append((f"KIVI {bits}-bit", "all, quantized", accuracy, nbytes / full_bytes))
    lines = [f"### Quality against cache memory (lesson 09's task, {length} tokens, a rule at "
             "position 1)\n",
             f"answers right in the second half of 256 sequences; chance without the rule: "
             f"{1 / n_rules:.2f}\n",
             "| cache | keeps | answers right | memory / full cache |", "|---|---|---:|---:|"]
    lines += [f"| {name} | {keeps} | {accuracy:.3f} | {memory:.2f} |"
              for name, keeps, accuracy, memory in rows]
    return "\n".join(lines) + "\n"


def run() -> str:
    """Measure, print and write the markdown, and return it."""
    device = get_device()
    header = (f"device `{device}`, torch {torch.__version__}, {torch.get_num_threads()} torch "
              f"threads on {os.cpu_count()} CPUs")
    body = generation_section(device) + "\n" + quality_section(device)
    text = (f"{header} (load average {os.getloadavg()[0]:.1f} at the end: other processes make "
            f"CPU timings noisy)\n\n{body}")
    return publish(text, OUT)


if __name__ == "__main__":
    run()
