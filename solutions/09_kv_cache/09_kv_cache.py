# %% [markdown]
# # Lesson 09 — The KV cache
#
# Lesson 08's linear attention can generate text with a state of fixed size: its recurrent
# form folds every past token into one matrix. Softmax attention cannot: the next token's
# query must be compared with the key of *every* earlier token, and its output mixes all of
# their values. A language model writes one token at a time, so a naive loop reruns the
# whole model on the whole prefix at every step: step $n$ pushes $n$ tokens through every
# layer, and generating $n$ tokens costs work that grows like $n^2$.
#
# The fix is to remember. In a causal model the key and value of token $j$ never change once
# token $j$ has been read, so each layer can keep them, the **KV cache**, and a decode step
# only has to compute the new token's own query, key and value. Each token then costs the
# same whatever its position. The price is memory: the cache grows with every token, for every
# layer, and for a long context or a large batch it outgrows the model itself. The second half
# of this lesson compresses it.
#
# You will write:
#
# 1. `decode_attention`: one decode step of an attention layer with a cache;
# 2. `GrowingKV`: a cache whose append costs amortised $O(1)$, not a copy of the past;
# 3. `generate_greedy`: cached generation that equals generation without a cache;
# 4. `quantize` and `dequantize`: the per-channel and per-token quantization of KIVI;
# 5. `sink_window`: the eviction of StreamingLLM (attention sinks plus a window);
# 6. `heavy_hitters`: the eviction of H2O, from accumulated attention.

# %%
try:
    import helpers
except ImportError:  # Colab or a bare kernel: install the course package
    %pip install -q "attention-course @ git+COURSE_REPOSITORY"

# %% id=imports
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor

from helpers import kv_cache as reference
from helpers import plotting, tasks
from helpers.attention import MultiHeadAttention, causal_mask, merge_heads, split_heads
from helpers.device import get_device, is_autograding, seed_everything
from helpers.kv_cache import (HeavyHitterCache, KVCache, QuantizedKVCache, SinkCache,
                              kv_cache_bytes)
from helpers.transformer import GPT, train_next_token

device = get_device()
seed_everything(0)
torch.set_num_threads(1)  # every tensor here is small: more threads would only wait on each other
SHORT = is_autograding()  # the autograder runs shorter experiments
print(f"device: {device}; short experiments: {SHORT}")

# %% [markdown]
# ## 1. Prefill and decode
#
# Generation has two phases. The **prefill** reads the prompt: all its tokens go through the
# model at once, as in training, and every weight matrix multiplies a whole matrix of
# tokens. Then each **decode** step produces one token: the model reads the token it just
# wrote and predicts the next. Pope et al. (2022, *Efficiently Scaling Transformer
# Inference*) analyse the cost of both phases in detail.
#
# Count the work of a decoder with $N_\ell$ layers of width $d$ (MLP width $4d$): per token
# and layer, the projections $W_Q, W_K, W_V, W_O$ are $4d^2$ multiply-adds and the MLP $8d^2$,
# so $24d^2$ FLOPs (two per multiply-add). Attention of one query over $n$ keys is $q \cdot
# k_j$ and $\sum_j w_j v_j$: $2nd$ multiply-adds, $4nd$ FLOPs. The decode step that reads
# token $n$ (the $n$-th token of the sequence) then costs
#
# $$\text{without a cache:}\quad N_\ell\Big(24d^2\,n + 4d\,\tfrac{n(n+1)}{2}\Big), \qquad
#   \text{with a cache:}\quad N_\ell\,\big(24d^2 + 4d\,n\big),$$
#
# plus the LM head, $2dV$ for the last position. Without a cache every step redoes the
# whole prefix: its cost grows like $n$ (the weights) and $n^2$ (attention). With the cache
# it pays the weights once and attention over $n$ keys. Here are the numbers for GPT-2 small
# (12 layers, $d = 768$, vocabulary 50257):

# %%
def decode_step_flops(n_layers: int, d_model: int, vocab: int, n: int, cached: bool) -> float:
    """FLOPs of the decode step that reads token n (2 per multiply-add; MLP width 4 d)."""
    weights = 24 * d_model**2 * n_layers  # per token: W_Q, W_K, W_V, W_O and the MLP
    attention = 4 * d_model * n_layers  # per (query, key) pair: q·k and w·v
    head = 2 * d_model * vocab  # the logits of the last position
    if cached:
        return weights + attention * n + head
    return weights * n + attention * n * (n + 1) / 2 + head


GPT2_SMALL = dict(n_layers=12, d_model=768, vocab=50257)
print(f"{'token n':>8} | {'GFLOPs, no cache':>17} | {'GFLOPs, cache':>14} | {'ratio':>6}")
for n in (16, 128, 512, 1024):
    without = decode_step_flops(**GPT2_SMALL, n=n, cached=False)
    with_cache = decode_step_flops(**GPT2_SMALL, n=n, cached=True)
    print(f"{n:>8} | {without / 1e9:>17.2f} | {with_cache / 1e9:>14.3f} | {without / with_cache:>5.0f}x")
total = {cached: sum(decode_step_flops(**GPT2_SMALL, n=n, cached=cached) for n in range(17, 529))
         for cached in (False, True)}
print(f"16-token prompt, 512 new tokens: {total[False] / 1e12:.1f} TFLOPs without a cache, "
      f"{total[True] / 1e12:.3f} with one ({total[False] / total[True]:.0f}x less)")

# %% [markdown]
# ## 2. A decode step with a cache
#
# A decode step of one attention layer receives the new token's hidden state $x$
# $(B, 1, d)$ and the cache: the keys and values of the $S$ earlier tokens, $(B, H, S, D)$
# each. It projects *only* $x$ into $q, k, v$, appends $k$ and $v$ to the cache, and lets
# $q$ attend over all $S + 1$ keys. No causal mask is needed: the single query is the newest
# token, and it may see every key, itself included.
#
# A trap waits here. PyTorch's `F.scaled_dot_product_attention(..., is_causal=True)` builds
# its causal mask from the *top left* corner: with one query and $S + 1$ keys, that query
# may see key 0 only (lesson 04). Leave the mask out.
#
# **Exercise 1 (3 points).** Write `decode_attention(attn, x, past_k, past_v)`: `attn` is a
# `MultiHeadAttention` (its `q_proj`, `k_proj`, `v_proj`, `out_proj` and `n_heads`), `x` is
# $(B, 1, d)$, `past_k` and `past_v` are $(B, H, S, D)$ ($S$ may be 0). Return the layer's
# output $(B, 1, d)$ and the keys and values of all $S + 1$ tokens, $(B, H, S + 1, D)$, the
# new ones last. `split_heads` and `merge_heads` (lesson 03) are imported; do not call
# `helpers.transformer.attention`, which does this with a cache object.

# %% solution id=decode-attention
def decode_attention(attn: MultiHeadAttention, x: Tensor, past_k: Tensor, past_v: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """One decode step of causal self-attention with a KV cache (Pope et al., 2022).

    x (B, 1, d), past_k and past_v (B, H, S, D) -> out (B, 1, d), k and v (B, H, S + 1, D).
    """
    ### BEGIN SOLUTION
    q = split_heads(attn.q_proj(x), attn.n_heads)  # (B, H, 1, D)
    k = torch.cat([past_k, split_heads(attn.k_proj(x), attn.n_heads)], dim=2)  # (B, H, S+1, D)
    v = torch.cat([past_v, split_heads(attn.v_proj(x), attn.n_heads)], dim=2)  # (B, H, S+1, D)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return attn.out_proj(merge_heads(weights @ v)), k, v  # (B, 1, d)
    ### END SOLUTION


# %% tests id=decode-attention-tests points=3
from helpers.checks import lesson09 as checks
checks.decode_attention(decode_attention)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("09").decode_attention(decode_attention)
### END HIDDEN TESTS

# %% [markdown]
# ## 3. What the cache costs in memory
#
# Every layer keeps a key and a value per K/V head and token, so one token costs
#
# $$2 \times N_\ell \times H_{kv} \times D \times \text{bytes per number}$$
#
# and a context of $n$ tokens, for a batch of $B$ sequences, $n B$ times that
# (`helpers.kv_cache.kv_cache_bytes`). The table uses the published shapes of real models
# (Radford et al., 2019; Brown et al., 2020, *Language Models are Few-Shot Learners*;
# Touvron et al., 2023, *Llama 2*; Jiang et al., 2023, *Mistral 7B*; Grattafiori et al.,
# 2024, *The Llama 3 Herd of Models*) in 16-bit numbers. Llama 2 70B, Mistral and Llama 3
# share each K/V head between 8 query heads (grouped-query attention, lesson 07), which is
# why their caches are so much smaller per layer than GPT-3's.

# %%
MODELS = {  # name: (layers, K/V heads, head dim, context, parameters)
    "GPT-2 small": (12, 12, 64, 1024, 124e6),
    "GPT-3 175B": (96, 96, 128, 2048, 175e9),
    "Llama 2 7B": (32, 32, 128, 4096, 6.7e9),
    "Llama 2 70B (GQA)": (80, 8, 128, 4096, 69e9),
    "Mistral 7B (GQA)": (32, 8, 128, 8192, 7.2e9),
    "Llama 3.1 405B (GQA)": (126, 8, 128, 131072, 405e9),
}
GiB = 2**30
print(f"{'model':>21} | {'KiB/token':>9} | {'context':>7} | {'GiB/sequence':>12} | "
      f"{'GiB weights':>11} | {'sequences = weights':>19}")
for name, (layers, kv_heads, head_dim, context, params) in MODELS.items():
    per_token = kv_cache_bytes(layers, kv_heads, head_dim, 1)
    per_sequence = kv_cache_bytes(layers, kv_heads, head_dim, context)
    weights = 2 * params
    print(f"{name:>21} | {per_token / 2**10:>9.0f} | {context:>7} | {per_sequence / GiB:>12.2f} | "
          f"{weights / GiB:>11.1f} | {weights / per_sequence:>19.1f}")

# %% [markdown]
# The last column is the number of full-context sequences whose caches weigh as much as the
# model: a server that batches more requests than that spends more memory on caches than on
# weights. GPT-3's cache holds gigabytes per sequence, and the longest contexts of today's
# models (Llama 3.1's 128K tokens) need tens of gigabytes for a single one. That is the
# memory problem this lesson's second half attacks.
#
# ## 4. Decode is memory-bound
#
# A decode step reads every weight once to multiply it by one vector per sequence: two FLOPs
# per 16-bit parameter of two bytes, an **arithmetic intensity** of about $B$ FLOPs per byte
# for a batch of $B$. A GPU does far more arithmetic per byte it can read: an H100 SXM
# (NVIDIA's datasheet: 989 dense BF16 TFLOP/s, 3.35 TB/s of HBM3) needs hundreds of FLOPs
# per byte to keep its arithmetic busy (their ratio, the "ridge point", is printed below).
# Below it, the step waits for memory (Williams et al., 2009, *Roofline: An Insightful
# Visual Performance Model*). Batching helps the weights,
# which all sequences share; but every sequence reads its *own* cache, $2 \cdot 2nd$ bytes
# per layer for $4nd$ FLOPs: attention over the cache stays at about one FLOP per byte
# whatever the batch. The table: Llama 2 7B decoding at a context of 4096 tokens.

# %%
PEAK_FLOPS, BANDWIDTH = 989e12, 3.35e12  # H100 SXM, dense BF16 and HBM3 bytes per second
layers, kv_heads, head_dim, _, params = MODELS["Llama 2 7B"]
context, d_model = 4096, 32 * 128
print(f"{'batch':>5} | {'FLOP/byte':>9} | {'ms if compute-bound':>19} | {'ms if memory-bound':>18}"
      f" | {'cache share of bytes':>20}")
for batch in (1, 8, 64, 256):
    flops = batch * (2 * params + 4 * d_model * layers * context)
    cache = kv_cache_bytes(layers, kv_heads, head_dim, context, batch)
    moved = 2 * params + cache
    print(f"{batch:>5} | {flops / moved:>9.1f} | {1e3 * flops / PEAK_FLOPS:>19.2f} | "
          f"{1e3 * moved / BANDWIDTH:>18.2f} | {cache / moved:>20.0%}")
print(f"ridge point of the H100: {PEAK_FLOPS / BANDWIDTH:.0f} FLOPs per byte")

# %% [markdown]
# At every batch size the step is limited by memory, not arithmetic, and the larger the
# batch the more of the bytes are cache: compressing the cache makes decoding *faster*, not
# only smaller.
#
# ## 5. Preallocation, not concatenation
#
# The obvious cache appends with `torch.cat([cache, new])`. But `torch.cat` allocates a new
# tensor and copies the whole past into it, at every step: appending $n$ tokens one by one
# copies $1 + 2 + \dots + n = n(n+1)/2$ tokens, $O(n^2)$ bytes, and each step costs as much
# as the cache is long. The fix is the dynamic array of every standard library (Cormen et
# al., *Introduction to Algorithms*, "Dynamic tables"): allocate room for more tokens than
# needed, write new ones into the free space, and when it is full allocate **twice** as much
# and copy once. A token is then copied at most once per doubling after it arrived, so $n$
# appends copy fewer than $2n$ tokens in total: amortised $O(1)$ per append. Doubling
# matters: growing by a fixed number of slots $c$ still copies $O(n^2 / c)$.
#
# **Exercise 2 (3 points).** Write `GrowingKV(capacity=4)`, one layer's cache: `append(k, v)`
# takes $(B, H, T, D)$ keys and values of $T$ new tokens and returns all the keys and values
# so far, $(B, H, \text{length}, D)$, as **views** of the storage (slices, no copy). Keep
# the number of tokens held in `self.length`. Allocate the storage at the first append
# (`k.new_empty(B, H, capacity, D)`, so dtype and device follow the input); when an append
# does not fit, double the capacity until it does, allocate, and copy the past once.

# %% solution id=growing-kv
class GrowingKV:
    """One layer's keys and values in preallocated storage that doubles when full."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self.length = 0
        ### BEGIN SOLUTION
        self.k: Tensor | None = None  # (B, H, capacity, D)
        self.v: Tensor | None = None
        ### END SOLUTION

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, H, T, D); return views of everything held, (B, H, length, D)."""
        ### BEGIN SOLUTION
        end = self.length + k.shape[2]
        if self.k is None or end > self.k.shape[2]:
            capacity = self.capacity if self.k is None else self.k.shape[2]
            while capacity < end:
                capacity *= 2
            new_k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            new_v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
            if self.k is not None:
                new_k[:, :, :self.length] = self.k[:, :, :self.length]
                new_v[:, :, :self.length] = self.v[:, :, :self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]
        ### END SOLUTION


# %% tests id=growing-kv-tests points=3
from helpers.checks import lesson09 as checks
checks.growing_kv(GrowingKV)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("09").growing_kv(GrowingKV)
### END HIDDEN TESTS

# %% [markdown]
# How much that matters: append $n$ tokens one at a time to one layer's cache (8 heads of
# 64 channels, float32) with `torch.cat` and with the course's `KVCache`, which grows like
# your `GrowingKV`.

# %%
def append_seconds(n: int, concatenate: bool) -> float:
    """Seconds to append n tokens one at a time to a (1, 8, n, 64) cache."""
    token = torch.randn(1, 8, 1, 64, device=device)
    start = time.perf_counter()
    if concatenate:
        k = v = token[:, :, :0]
        for _ in range(n):
            k, v = torch.cat([k, token], dim=2), torch.cat([v, token], dim=2)
    else:
        cache = KVCache(n_layers=1)
        for _ in range(n):
            k, v = cache.update(0, token, token)
    float(k.sum())  # waits for a GPU to finish
    return time.perf_counter() - start


bytes_per_token = 2 * 8 * 64 * 4  # keys and values, float32
for n in (128, 256) if SHORT else (256, 512, 1024):
    cat_s, grow_s = append_seconds(n, True), append_seconds(n, False)
    print(f"n = {n:>4}: torch.cat {1e3 * cat_s:6.1f} ms, copying "
          f"{n * (n + 1) / 2 * bytes_per_token / 2**20:5.0f} MiB; preallocated "
          f"{1e3 * grow_s:5.1f} ms, copying at most {2 * n * bytes_per_token / 2**20:3.0f} "
          f"MiB: torch.cat is {cat_s / grow_s:4.1f}x slower")

# %% [markdown]
# The bytes `torch.cat` copies grow with $n^2$, those of the preallocated cache with $n$:
# double $n$ and the first quadruple, the second double. Timings of small appends are noisy
# (Python's overhead per call is about the same for both), but the gap opens as the cache
# grows, and in a model it opens in every layer at every step.
#
# ## 6. Cached generation
#
# A model takes the cache along: `GPT.forward(idx, cache=cache)` treats `idx` as the tokens
# that follow those the cache holds, passes each block its layer of the cache, and gives the
# new tokens the positions after the cached ones (`cache.seq_len`). The course's caches all
# share one interface: `update(layer, k, v) -> (k_all, v_all)` appends and returns
# everything the new queries attend to.
#
# **Exercise 3 (2 points).** Write `generate_greedy(model, idx, max_new_tokens)` for a
# `GPT`: create `KVCache(len(model.blocks))`, run the prompt `idx` $(B, L)$ through the
# model once (the prefill), then feed one token per step, the argmax of the last logits.
# Return $(B, L + \text{max\_new\_tokens})$, equal to `model.generate(idx, max_new_tokens,
# use_cache=False)`, which reruns the whole sequence each step. Do not call
# `model.generate`; work under `torch.no_grad()`.

# %% solution id=generate-greedy
def generate_greedy(model: GPT, idx: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy decoding with a KV cache: one prefill, then one token per step. (B, L + N)."""
    ### BEGIN SOLUTION
    cache = KVCache(len(model.blocks))
    tokens = [idx]
    with torch.no_grad():
        logits = model(idx, cache=cache)[:, -1]  # (B, V): the prefill
        for step in range(max_new_tokens):
            token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            tokens.append(token)
            if step + 1 < max_new_tokens:
                logits = model(token, cache=cache)[:, -1]  # (B, V): one decode step
    return torch.cat(tokens, dim=1)
    ### END SOLUTION


# %% tests id=generate-greedy-tests points=2
from helpers.checks import lesson09 as checks
checks.generate_greedy(generate_greedy)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("09").generate_greedy(generate_greedy)
### END HIDDEN TESTS

# %% [markdown]
# Now the payoff, measured: a GPT (4 layers, $d = 128$) generates from a 16-token prompt,
# one step at a time, with the cache and without it (rerunning the whole sequence, as
# `use_cache=False` does), and every step is timed. Both runs must write the same tokens.

# %%
def timed_generation(model: GPT, prompt: Tensor, n_new: int, cached: bool
                     ) -> tuple[Tensor, list[float]]:
    """Greedy tokens (B, L + n_new) and the seconds each step took."""
    cache = KVCache(len(model.blocks)) if cached else None
    idx, seconds = prompt, []
    with torch.no_grad():
        for _ in range(n_new):
            start = time.perf_counter()
            seen = cache.seq_len if cached else 0
            logits = model(idx[:, seen:], cache=cache)[:, -1]  # (B, V)
            idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
            float(idx[0, -1])  # waits for a GPU to finish the step
            seconds.append(time.perf_counter() - start)
    return idx, seconds


N_NEW = 64 if SHORT else 256
seed_everything(0)
timing_model = GPT(256, 128, n_layers=4, n_heads=4, max_len=16 + N_NEW).to(device).eval()
prompt = torch.randint(0, 256, (1, 16), device=device)
timed_generation(timing_model, prompt, 4, cached=True)  # warm-up
runs = {name: timed_generation(timing_model, prompt, N_NEW, cached)
        for name, cached in (("no cache", False), ("KV cache", True))}
assert torch.equal(runs["no cache"][0], runs["KV cache"][0]), "the tokens differ"
WINDOW = 16  # steps averaged per point: single steps are noisy
ends = list(range(WINDOW, N_NEW + 1, WINDOW))  # tokens generated at the end of each window
per_token = {name: [1e3 * sum(seconds[end - WINDOW:end]) / WINDOW for end in ends]
             for name, (_, seconds) in runs.items()}
totals = {name: [sum(seconds[:end]) for end in ends] for name, (_, seconds) in runs.items()}
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
plotting.curves([16 + end for end in ends], per_token, "sequence length",
                f"ms per step (mean of {WINDOW})", "per token: flat with the cache, "
                "growing without", ax=axes[0])
plotting.curves(ends, totals, "tokens generated", "seconds in total",
                "in total: linear with the cache, quadratic without", ax=axes[1])
fig.suptitle("the same tokens with and without the cache: without it each step reruns the "
             "whole prefix, with it one token reads the cached keys")
fig.tight_layout()
plt.show()
for name, ms in per_token.items():
    print(f"{name:>8}: {ms[0]:5.2f} ms per step over the first {WINDOW} steps, {ms[-1]:5.2f} "
          f"over the last {WINDOW} ({ms[-1] / ms[0]:.1f}x); total {totals[name][-1]:.2f} s")
print(f"identical tokens; the cache is {totals['no cache'][-1] / totals['KV cache'][-1]:.1f}x "
      f"faster over {N_NEW} tokens")

# %% [markdown]
# ## 7. Batching requests of different lengths
#
# Decoding is memory-bound (section 4), so a server decodes many requests together: one pass
# over the weights serves the whole batch. Prompts have different lengths, though. The usual
# answer is **left padding**: pad the shorter prompts on the left, so that every sequence's
# newest token sits in the last column and all of them decode in lockstep. Two things must
# then be right for a padded sequence to behave exactly as if it were alone:
#
# - its **positions** start at its first real token, not at the first column (the learned
#   position embedding, or RoPE, would otherwise see shifted positions), and
# - its queries never attend to the **padding keys**, which stay in the cache for the whole
#   generation.
#
# `GPT.generate(idx, n, attention_mask=mask)` does both: each sequence's positions count its
# real tokens, and the cache records each token's position (−1 for padding), so the padding
# keys are masked at every step, wherever a cache keeps them. The alternative, per-sequence
# lengths in one ragged buffer (vLLM's PagedAttention, Kwon et al., 2023, *Efficient Memory
# Management for Large Language Model Serving with PagedAttention*), needs custom kernels.

# %%
prompt_lengths = [3, 11, 6, 16, 9, 4, 13, 7]
prompts = [torch.randint(0, 256, (n,), device=device) for n in prompt_lengths]
longest = max(prompt_lengths)
padded = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
real = torch.zeros(len(prompts), longest, dtype=torch.bool, device=device)
for row, p in enumerate(prompts):  # left padding
    padded[row, longest - len(p):], real[row, longest - len(p):] = p, True
N_BATCH = 16 if SHORT else 48
start = time.perf_counter()
batched = timing_model.generate(padded, N_BATCH, attention_mask=real)
batched_s = time.perf_counter() - start
start = time.perf_counter()
alone = [timing_model.generate(p[None], N_BATCH)[0] for p in prompts]
alone_s = time.perf_counter() - start
same = all(torch.equal(batched[row, longest - len(p):], a)
           for row, (p, a) in enumerate(zip(prompts, alone)))
print(f"{len(prompts)} prompts of {min(prompt_lengths)} to {longest} tokens, {N_BATCH} new "
      f"tokens each: batched equals one by one: {same}")
print(f"one batch {batched_s:.2f} s, one by one {alone_s:.2f} s: {alone_s / batched_s:.1f}x")

# %% [markdown]
# ## 8. Compressing the cache
#
# The cache is the memory problem of long contexts and large batches; there are two ways to
# shrink it. **Quantization** keeps every token with fewer bits. **Eviction** keeps fewer
# tokens. Both must decide what they can lose without changing what the model writes.
#
# ### 8.1 Quantization: KIVI
#
# Asymmetric $b$-bit quantization (Jacob et al., 2018, *Quantization and Training of Neural
# Networks for Efficient Integer-Arithmetic-Only Inference*) stores each number of a slice as
# an integer code in $0 \dots 2^b - 1$, with one scale and one zero point for the slice:
#
# $$s = \frac{\max x - \min x}{2^b - 1}, \qquad z = \min x, \qquad
#   c = \mathrm{round}\!\left(\frac{x - z}{s}\right), \qquad \hat{x} = c\,s + z,$$
#
# so that $|x - \hat{x}| \le s/2$: the error is half a step, and the step is the slice's range
# over $2^b - 1$. Which numbers share a slice decides the error. Liu et al. (2024, *KIVI: A
# Tuning-Free Asymmetric 2bit Quantization for KV Cache*) observed that **keys** have a few
# *channels* with large values in every token, while **values** have no such channels. A
# slice per token would stretch every key token's range over its outlier channels; so KIVI
# quantizes keys **per channel** (a slice is one channel over a group of tokens) and values
# **per token**. Keys of the newest tokens wait in full precision until a group is
# complete, and the most recent values stay in full precision too: `QuantizedKVCache`.
#
# **Exercise 4 (3 points).** Write `quantize(x, dim, bits=8)`, returning `(codes, scale,
# zero)`: the slices run along `dim` (one scale and zero point per slice, shape of `x` with
# `dim` of size 1, the dtype of `x`), `codes` are `torch.uint8` with the shape of `x`.
# Compute in at least float32 (`torch.promote_types(x.dtype, torch.float32)`). A constant
# slice has $s = 0$: divide by 1 there instead, so its codes are 0 and it comes back exactly.
# And write `dequantize(codes, scale, zero)`, $\hat{x} = c\,s + z$ in the dtype of `scale`.
# Do not call `helpers.kv_cache`.

# %% solution id=quantize
def quantize(x: Tensor, dim: int, bits: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min-max quantization along ``dim`` (Jacob et al., 2018; KIVI, 2024)."""
    ### BEGIN SOLUTION
    levels = 2**bits - 1
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    low, high = wide.amin(dim=dim, keepdim=True), wide.amax(dim=dim, keepdim=True)
    scale = (high - low) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((wide - low) / safe).round().clamp(0, levels).to(torch.uint8)
    return codes, scale.to(x.dtype), low.to(x.dtype)
    ### END SOLUTION


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """codes * scale + zero, in the dtype of scale."""
    ### BEGIN SOLUTION
    return codes.to(scale.dtype) * scale + zero
    ### END SOLUTION


# %% tests id=quantize-tests points=3
from helpers.checks import lesson09 as checks
checks.quantize(quantize, dequantize)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("09").quantize(quantize, dequantize)
### END HIDDEN TESTS

# %% [markdown]
# Why keys per channel: random keys with four outlier channels (twenty times larger, the
# pattern KIVI reports), quantized each way to 4 bits. With a slice per token, every token's
# step is set by its outlier channels, and the ordinary channels, most of the key, drown in
# the rounding. Values have no outlier channels, and per token is fine for them.

# %%
g = torch.Generator().manual_seed(0)
keys = torch.randn(1, 4, 128, 64, generator=g)  # (B, H, tokens, channels)
keys[..., :4] *= 20  # outlier channels, the same in every token
values = torch.randn(1, 4, 128, 64, generator=g)
for name, x in (("keys", keys), ("values", values)):
    for slice_name, dim in (("per channel", -2), ("per token", -1)):
        x_hat = reference.dequantize(*reference.quantize(x, dim=dim, bits=4))
        ordinary = (x_hat - x)[..., 4:].norm() / x[..., 4:].norm()
        print(f"{name:>6}, 4 bits, {slice_name:>11}: relative error {float((x_hat - x).norm() / x.norm()):.3f}"
              f" overall, {float(ordinary):.3f} on the ordinary channels")

# %% [markdown]
# At 4 bits, two codes share a byte (`pack_int4`), and every slice adds a scale and a zero
# point, so the bytes per number are $b/8$ plus the parameters shared by the slice.
#
# ### 8.2 Eviction: windows and attention sinks
#
# Keeping only the last $W$ tokens, a **sliding window**, bounds the cache at $W$ tokens per
# layer whatever the length. Models trained with windowed attention, such as Mistral 7B
# (Jiang et al., 2023; after Beltagy et al., 2020, *Longformer*), keep exactly that, in a
# rolling buffer. But a model trained with full attention breaks when its first tokens
# leave the window. Xiao et al. (2023, *Efficient Streaming Language Models with Attention
# Sinks*, StreamingLLM) found why: a softmax must give its weights a sum of one, and when a
# head has nothing relevant to read it still has to put them somewhere; trained models
# learn to park them on the first tokens, which every query can see. These **attention
# sinks** get large weights whatever they contain; evict them and the surplus spreads over
# tokens it should not, and the model's perplexity explodes. Keeping just the first four
# tokens next to the window restores it. `SinkCache(n_layers, window, n_sinks=4)` keeps both;
# with `n_sinks=0` it is the plain window.
#
# **Exercise 5 (2 points).** Write `sink_window(k, v, window, n_sinks)`: from keys and values
# $(B, H, S, D)$ in order, keep the first `n_sinks` tokens and the last `window` ones, in
# order; when $S \le$ `n_sinks + window` keep everything (and never keep a token twice).
# `window` is at least 1, `n_sinks` may be 0.

# %% solution id=sink-window
def sink_window(k: Tensor, v: Tensor, window: int, n_sinks: int) -> tuple[Tensor, Tensor]:
    """StreamingLLM's eviction (Xiao et al., 2023): (B, H, S, D) -> (B, H, K, D) each."""
    ### BEGIN SOLUTION
    S = k.shape[2]
    if S <= n_sinks + window:
        return k, v
    keep = torch.cat([torch.arange(n_sinks), torch.arange(S - window, S)]).to(k.device)
    return k[:, :, keep], v[:, :, keep]
    ### END SOLUTION


# %% tests id=sink-window-tests points=2
from helpers.checks import lesson09 as checks
checks.sink_window(sink_window)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("09").sink_window(sink_window)
### END HIDDEN TESTS

# %% [markdown]
# ### 8.3 Heavy hitters: H2O
#
# A window decides by age alone. Zhang et al. (2023, *H2O: Heavy-Hitter Oracle for Efficient
# Generative Inference of Large Language Models*) decide by use: in trained models a small
# set of tokens receives most of the attention, step after step, and the attention a token
# has received so far predicts that it will be needed again. H2O keeps, per head, the
# `n_recent` newest tokens and the tokens with the largest **accumulated attention**
# $\sum_t w_{t,j}$ (summed over the queries so far), up to a budget. It needs the attention
# weights, which a fused kernel never materialises: `HeavyHitterCache` says so
# (`needs_attention_weights`), and the model then computes them with the reference
# attention and hands them to `record_attention` after each step.
#
# **Exercise 6 (2 points).** Write `heavy_hitters(scores, budget, n_recent)`: `scores`
# $(B, H, S)$ is the accumulated attention of every held token; return the indices
# $(B, H, K)$ of the tokens to keep, ascending, $K = \min(S, \text{budget})$: the last
# `n_recent` positions always, and the `budget - n_recent` largest scores among the other
# ones. ($0 \le$ `n_recent` $\le$ `budget`.)

# %% solution id=heavy-hitters
def heavy_hitters(scores: Tensor, budget: int, n_recent: int) -> Tensor:
    """H2O's selection (Zhang et al., 2023): scores (B, H, S) -> kept indices (B, H, K)."""
    ### BEGIN SOLUTION
    B, H, S = scores.shape
    if S <= budget:
        return torch.arange(S, device=scores.device).expand(B, H, S)
    older = scores[..., :S - n_recent].topk(budget - n_recent, dim=-1).indices  # (B, H, K - r)
    recent = torch.arange(S - n_recent, S, device=scores.device).expand(B, H, n_recent)
    return torch.cat([older, recent], dim=-1).sort(dim=-1).values
    ### END SOLUTION


# %% tests id=heavy-hitters-tests points=2
from helpers.checks import lesson09 as checks
checks.heavy_hitters(heavy_hitters)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("09").heavy_hitters(heavy_hitters)
### END HIDDEN TESTS

# %% [markdown]
# ### 8.4 Quality against cache size
#
# A task where the answer depends on an early token (`helpers.tasks.rule_stream`): each
# sequence starts with `<bos>` and a *rule*, then comes a stream of pairs $x\ y$ where $y$ is
# $x$ shifted by the rule's offset, modulo the number of symbols. To write any $y$, the model
# must remember the rule, the second token of the sequence. A small GPT learns this in
# seconds:

# %%
N_PAIRS, N_SYMBOLS, N_RULES = 24, 16, 4
g = torch.Generator().manual_seed(0)
inputs, targets = tasks.rule_stream(1, 4, N_SYMBOLS, N_RULES, generator=g)
print("inputs :", inputs[0].tolist(), "  (ids: symbols < 16, rules 16-19, <bos> 20)")
print("targets:", targets[0].tolist(), "  (-100: not scored)")

seed_everything(0)
rule_model = GPT(N_SYMBOLS + N_RULES + 1, 64, n_layers=2, n_heads=4, max_len=2 * N_PAIRS + 1,
                 d_ff=128).to(device)
start = time.perf_counter()
losses = train_next_token(
    rule_model, lambda: tasks.rule_stream(64, N_PAIRS, N_SYMBOLS, N_RULES, generator=g,
                                          device=device),
    steps=30 if SHORT else 120, lr=3e-3)
print(f"{len(losses)} steps in {time.perf_counter() - start:.1f} s; loss "
      f"{sum(losses[-10:]) / 10:.3f} (guessing among the {N_RULES} rules' answers: "
      f"ln {N_RULES} = {math.log(N_RULES):.3f}; ignoring x too: ln {N_SYMBOLS} = "
      f"{math.log(N_SYMBOLS):.3f})")

# %% [markdown]
# Now the same model reads fresh sequences through each cache, one token per step as in
# generation (`helpers.kv_cache.cache_accuracy`: teacher forcing, so every answer can be
# scored), and we count the answers of the second half of each sequence it gets right. Each
# method runs at several budgets; the horizontal axis is the memory the cache holds at the
# end, as a fraction of the full cache's.

# %%
eval_inputs, eval_targets = tasks.rule_stream(32 if SHORT else 128, N_PAIRS, N_SYMBOLS,
                                              N_RULES, generator=g, device=device)
length = eval_inputs.shape[1]


def quality(make_cache) -> tuple[float, float]:
    """(cache bytes at the end / full cache bytes, accuracy on the second half's answers)."""
    cache = make_cache()
    accuracy = reference.cache_accuracy(rule_model, eval_inputs, eval_targets, cache,
                                        prefill=2, scored_from=length // 2)
    return cache.nbytes / full_nbytes, accuracy


full = KVCache(2)
ceiling = reference.cache_accuracy(rule_model, eval_inputs, eval_targets, full, prefill=2,
                                   scored_from=length // 2)
full_nbytes = full.nbytes
budgets = (8, 24) if SHORT else (8, 16, 24, 32)
methods = {
    "sliding window": lambda b: SinkCache(2, window=b, n_sinks=0),
    "4 sinks + window (StreamingLLM)": lambda b: SinkCache(2, window=b - 4, n_sinks=4),
    "heavy hitters (H2O)": lambda b: HeavyHitterCache(2, budget=b, n_recent=b // 2),
}
results = {name: [quality(lambda: make(b)) for b in budgets] for name, make in methods.items()}
quantized = {f"KIVI {bits}-bit": quality(lambda: QuantizedKVCache(2, bits=bits, residual=8))
             for bits in (8, 4)}

plotting.quality_by_memory(
    results, quantized, ceiling, chance=(1 / N_RULES, f"rule forgotten: 1/{N_RULES}"),
    ylabel="answers right (second half)",
    title="evicting the first tokens loses the rule; sinks and heavy hitters keep it;\n"
          "quantization costs almost nothing")
plt.show()
print(f"full cache: {ceiling:.3f}")
for name, points in results.items():
    print(f"{name:>31}: " + ", ".join(f"{b} tokens ({size:.2f}) {accuracy:.3f}"
                                      for b, (size, accuracy) in zip(budgets, points)))
for name, (size, accuracy) in quantized.items():
    print(f"{name:>31}: {size:.2f} of the bytes, {accuracy:.3f}")

# %% [markdown]
# The sliding window forgets the rule as soon as it leaves the window, and the model falls
# toward guessing among the rules, until the budget holds the whole sequence. Keeping the
# four first tokens keeps the rule, and the answers come back at every budget: here the sink
# tokens carry the information itself, while in a large model they also carry the surplus
# attention that StreamingLLM describes. H2O finds the rule without being told where it is:
# every answer attends to it, so its accumulated attention makes it a heavy hitter (at the
# smallest budget it still loses some answers: compare the printed rows). KIVI
# keeps every token, slightly blurred, and the answers do not change. (Its bytes are far from
# 8 or 4 bits per number here: every value token of a 16-channel head carries its own scale
# and zero point, and the 8 most recent tokens stay in full precision. With 128-channel
# heads and long contexts, as in real models, both weigh much less.)
#
# ## What's next
#
# The cache grows with every token because softmax attention wants every key and value
# again at every step; compression only slows the growth. Lesson 10 takes the other road,
# the one lesson 08's linear attention pointed to: **state space models** and Mamba carry
# the past in a recurrent state of fixed size, so generation costs the same memory and time
# per token at any length, and we will see what that costs in return.
