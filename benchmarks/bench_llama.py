"""The course's Llama against Hugging Face's ``LlamaForCausalLM`` and ``MistralForCausalLM``
with the same weights: one forward pass, and cached greedy generation.

Two small models built offline from random configs (float32, batch 1, Hugging Face's default
attention, SDPA): a Llama with grouped-query attention, and a Mistral whose sliding window is
shorter than the sequences. Our copy is ``helpers.transformer.Llama.from_hf``. For each:

- forward: logits of a ``FORWARD_LEN``-token sequence;
- generate: a ``PROMPT``-token prompt continued by ``NEW_TOKENS`` greedy tokens with a KV
  cache (``Llama.generate`` against ``model.generate(do_sample=False)``), checked to give
  the same tokens.

Times are medians of interleaved runs in one process (ms); the ratio is ours ÷ Hugging
Face's, so below 1 means ours is faster. Prints a markdown table and writes it to
``benchmarks/out/llama.md``: ``python benchmarks/bench_llama.py``, or :func:`run`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from helpers.device import get_device
from helpers.transformer import Llama
from timing import median_ms, publish

SHAPE = dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
WINDOW = 64
FORWARD_LEN, PROMPT, NEW_TOKENS = 512, 64, 64
REPEATS = 5
OUT = Path(__file__).parent / "out" / "llama.md"


def hf_models(device: torch.device) -> dict[str, torch.nn.Module]:
    """A GQA Llama and a sliding-window Mistral, random weights, Hugging Face's defaults."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE))
    mistral = transformers.MistralForCausalLM(
        transformers.MistralConfig(**SHAPE, sliding_window=WINDOW))
    return {"Llama (GQA 8/2)": llama.to(device).eval(),
            f"Mistral (GQA 8/2, window {WINDOW})": mistral.to(device).eval()}


def compare(hf: torch.nn.Module, device: torch.device) -> dict[str, float | bool]:
    """Median times of both models' forward and generation, and whether the tokens agree."""
    ours = Llama.from_hf(hf)
    g = torch.Generator().manual_seed(1)
    long = torch.randint(0, SHAPE["vocab_size"], (1, FORWARD_LEN), generator=g).to(device)
    prompt = long[:, :PROMPT]
    mask = torch.ones_like(prompt)

    def hf_generate() -> torch.Tensor:
        return hf.generate(prompt, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, do_sample=False)

    with torch.inference_mode():
        same = torch.equal(ours.generate(prompt, NEW_TOKENS), hf_generate())
        times = median_ms({
            "ours forward": lambda: ours(long),
            "HF forward": lambda: hf(long).logits,
            "ours generate": lambda: ours.generate(prompt, NEW_TOKENS),
            "HF generate": hf_generate,
        }, device, repeats=REPEATS)
    return {**times, "same tokens": same}


TITLE = "Llama and Mistral against Hugging Face, same weights"


def run() -> str:
    """Measure both models, print and write the markdown table, and return it."""
    device = get_device()
    rows = {name: compare(hf, device) for name, hf in hf_models(device).items()}
    lines = [f"### Our Llama vs Hugging Face with the same weights, median of {REPEATS} runs "
             "(ms; ratio ours ÷ HF, below 1 = ours faster)\n",
             f"device `{device}`, torch {torch.__version__}, {torch.get_num_threads()} torch "
             f"threads on {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), "
             f"d_model {SHAPE['hidden_size']}, {SHAPE['num_hidden_layers']} layers, vocabulary "
             f"{SHAPE['vocab_size']}, float32, batch 1; forward over {FORWARD_LEN} tokens; "
             f"generation of {NEW_TOKENS} greedy tokens after a {PROMPT}-token prompt, "
             "cached\n",
             "| model | forward ours | forward HF | ratio | generate ours | generate HF | ratio "
             "| same tokens |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ours forward']:.1f} | {r['HF forward']:.1f} | "
                     f"{r['ours forward'] / r['HF forward']:.2f} | {r['ours generate']:.0f} | "
                     f"{r['HF generate']:.0f} | {r['ours generate'] / r['HF generate']:.2f} | "
                     f"{'yes' if r['same tokens'] else 'NO'} |")
    table = "\n".join(lines) + "\n"
    return publish(table, OUT)


if __name__ == "__main__":
    run()
