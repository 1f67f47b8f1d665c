# %% [markdown]
# # Lesson 11 — Hybrids and the big picture
#
# Lesson 10 ended on a trade. Attention recalls any earlier token exactly, because it keeps
# every key and value: its KV cache grows with the context. A Mamba layer keeps a state of
# constant size whatever the length, and pays for it: whatever it did not write into that
# state is gone. Which one is right? Since 2024 many of the strongest long-context models
# answer *both*: they stack mostly recurrent layers and a few attention layers. Jamba
# (Lieber et al., 2024) puts one attention layer in every eight.
#
# This last lesson builds such a hybrid and then steps back to measure everything the course
# built, side by side. You will write:
#
# 1. `layer_plan`: read a layout string such as `"MMMMAMMM"` and give each layer its slot in
#    the decoding cache;
# 2. `hybrid_forward`: run the stack with one cache that holds both kinds of memory, a KV
#    cache for the attention layers and a recurrent state for the others;
# 3. `generate`: greedy decoding on that cache, equal to rerunning the whole text;
# 4. `decode_memory_bytes`: what each mechanism of the course keeps at a context length;
# 5. `width_for_budget`: models of the same size, the first rule of a fair comparison;
# 6. `time_per_token`: a fair clock for several mechanisms at once.
#
# Then you train softmax attention, linear attention, Mamba and a hybrid of the same size on
# associative recall, and measure time and memory per token of every mechanism in the course
# against the context length: the closing table.

# %%
try:
    import helpers
except ImportError:  # Colab or a bare kernel: install the course package
    %pip install -q "attention-course @ git+COURSE_REPOSITORY"

# %% id=imports
import math
import statistics
import time
from collections.abc import Callable, Iterable

import matplotlib.pyplot as plt
import torch
from torch import Tensor, nn

from helpers import hybrid as reference
from helpers.device import get_device, is_autograding, seed_everything
from helpers.hybrid import Hybrid, HybridCache, HybridConfig, jamba_layout
from helpers.plotting import curves
from helpers.ssm import mamba_state_bytes
from helpers.tasks import associative_recall_task, train_associative_recall

torch.set_num_threads(1)  # small tensors: one thread is faster, and fair to every mechanism
device = get_device()
seed_everything(0)
SHORT = is_autograding()  # the autograder shrinks the experiments
print(f"running on {device}; short experiments: {SHORT}")

# %% [markdown]
# ## 1. Two ways to remember
#
# To produce token $t$, a causal model must carry what it needs from tokens $1 \dots t-1$.
# The course has met two ways to carry it.
#
# **Keep everything.** Softmax attention (lessons 02 to 09) stores the key and value of
# every earlier token, $2 \cdot n_{kv} \cdot d_{head}$ numbers per token and layer, and at
# each step compares the new query with all of them. Nothing is ever lost, so recalling the
# value of any earlier key is one sharp softmax away. The price: memory and time per token
# grow with the context $n$, and the whole prompt costs $O(n^2)$.
#
# **Keep a summary.** Linear attention (lesson 08) and state space models (lesson 10) fold
# every token into a state of fixed size: $d_k \times d_v$ sums per head, or
# $d_{inner} \times N$ numbers per Mamba layer. A step costs the same at any length, and the
# prompt costs $O(n)$. The price: the state is a bottleneck, lesson 01's in a new form.
#
# How much does the bottleneck cost? Arora et al. (2023), *Zoology: Measuring and Improving
# Recall in Efficient Language Models*, found that most of the quality gap between attention
# and its efficient replacements on real text comes from **recall**: repeating something that
# appeared earlier in the context (a name, a number, a phrase). They distilled it into
# *multi-query associative recall* (MQAR, lesson 08): a list of key-value pairs, then
# queries for several keys. A counting argument shows why a fixed state must lose: to answer
# any of $P$ keys, each with one of $V$ possible values, a model must hold $P \log_2 V$ bits,
# and a state of $s$ numbers in 16 bits holds at most $16 s$. Jelassi et al. (2024),
# *Repeat After Me: Transformers are Better than State Space Models at Copying*, prove the
# same for copying a string: a model with a fixed state cannot copy strings much longer than
# its state, while a two-layer transformer can copy strings of exponential length.
#
# The next cell applies the counting argument to one layer of Mamba 2.8B (lesson 10's
# configuration: $d_{inner} = 5120$, $N = 16$, a convolution of 4) on a vocabulary of
# 50 000 tokens.

# %%
VOCABULARY = 50_000
state_numbers = mamba_state_bytes(1, d_inner=5120, d_state=16, d_conv=4, bytes_per_elem=1)
bits_per_pair = math.log2(VOCABULARY)
print(f"one Mamba 2.8B layer keeps {state_numbers:,} numbers, at most {16 * state_numbers:,} "
      f"bits in float16")
print(f"a value out of {VOCABULARY:,} takes {bits_per_pair:.1f} bits: the state can hold at "
      f"most {16 * state_numbers / bits_per_pair:,.0f} pairs, whatever it learns; attention's "
      f"cache holds every pair it has seen")

# %% [markdown]
# A bound of this size per layer looks generous, but it is a ceiling that no
# trained model reaches (the state also has to carry everything else), and a long document
# exceeds it. Section 6 measures how recall fails in practice when a small model of each
# kind is trained the same way.
#
# ## 2. Hybrids: a few attention layers among many recurrent ones
#
# If recall needs a memory that grows, and everything else does not, give the memory that
# grows to only a few layers. That is the idea of the hybrids:
#
# * **H3** (Fu et al., 2023, *Hungry Hungry Hippos: Towards Language Modeling with State
#   Space Models*) designed an SSM layer for recall and found that adding just two attention
#   layers to an SSM model made it better than a transformer of the same size.
# * **Jamba** (Lieber et al., 2024, *Jamba: A Hybrid Transformer-Mamba Language Model*)
#   stacks blocks of eight layers, seven Mamba and one attention, with a mixture of experts
#   in every other feed-forward layer. Its attention layers have no positional encoding: the
#   Mamba layers already know the order of the tokens. The authors found that pure Mamba
#   failed to pick up formats from in-context examples, and that the attention layers of the
#   hybrid developed the *induction heads* that do it (the look-back-and-copy pattern that
#   MQAR needs).
# * **StripedHyena** (Poli et al., 2023, Together AI) interleaves attention with Hyena
#   layers, long gated convolutions (Poli et al., 2023, *Hyena Hierarchy: Towards Larger
#   Convolutional Language Models*); **Griffin** (De et al., 2024, *Griffin: Mixing Gated
#   Linear Recurrences with Local Attention for Efficient Language Models*) interleaves a
#   gated linear recurrence with *sliding-window* attention, two to one.
# * Waleffe et al. (2024), *An Empirical Study of Mamba-based Language Models*, trained an
#   8B-parameter transformer, Mamba, Mamba-2 and a hybrid on the same data: the hybrid, with
#   about 8% attention layers, beat the transformer on the standard tasks and on long
#   contexts, where pure Mamba lagged on recall.
#
# In this course a hybrid is written as a **layout string**, one character per layer:
# `A` for attention, `M` for Mamba, and `L` for linear attention, so that every mechanism of
# the course is one layout of one model. Jamba's block is `jamba_layout(8)`:

# %%
for n_layers in (8, 32):
    layout = jamba_layout(n_layers)
    print(f"jamba_layout({n_layers}) = {layout!r}: {layout.count('A')} attention layers, "
          f"{layout.count('M')} Mamba layers")

# %% [markdown]
# Each layer keeps its own decoding memory: an attention layer a layer of the KV cache, a
# Mamba layer a `MambaState`, a linear-attention layer a `LinearAttentionState`. One cache
# object holds them all (`helpers.hybrid.HybridCache`): `cache.kv` is a KV cache
# (lesson 09) with one layer per attention layer, `cache.mamba` a list with one state per
# Mamba layer, `cache.linear` the same for linear attention. So each layer needs its
# **slot**: its index among the layers of its own kind. In `"MMAMA"` the first attention
# layer is layer 2 of the stack but layer 0 of the KV cache.
#
# **Exercise 1 (2 points).** Write `layer_plan(layout)`: for each character of the layout,
# in order, the pair `(kind, slot)` with `kind` one of `"A"`, `"L"`, `"M"` and `slot` the
# number of earlier layers of the same kind. Raise a `ValueError` for an empty layout, and
# for any other character (lower case included) one whose message names the character (as
# `repr` writes it, `'x'`) and its position.

# %% solution id=layer-plan
def layer_plan(layout: str) -> list[tuple[str, int]]:
    """For each layer of the layout, its kind (A, L or M) and its slot: its index among the
    layers of that kind. layer_plan("MMAM") == [("M", 0), ("M", 1), ("A", 0), ("M", 2)]."""
    ### BEGIN SOLUTION
    if not layout:
        raise ValueError("the layout is empty: give one character per layer (A, L or M)")
    seen = {"A": 0, "L": 0, "M": 0}
    plan = []
    for position, kind in enumerate(layout):
        if kind not in seen:
            raise ValueError(f"layout {layout!r}: {kind!r} at position {position} is not a "
                             f"layer kind (A attention, L linear attention, M Mamba)")
        plan.append((kind, seen[kind]))
        seen[kind] += 1
    return plan
    ### END SOLUTION


# %% tests id=layer-plan-tests points=2
from helpers.checks import lesson11 as checks
checks.layer_plan(layer_plan)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("11").layer_plan(layer_plan)
### END HIDDEN TESTS

# %% [markdown]
# ## 3. One stack, one cache
#
# `helpers.hybrid.Hybrid` is the model. Its `HybridConfig` gathers every option:
#
# * the `layout`;
# * for attention layers: `n_heads` query heads of `head_dim`, `n_kv_heads` key/value heads
#   (lesson 07's GQA), rotary positions (`rope`, lesson 07; Jamba has none), an optional
#   sliding `window`, and the `kernel`: PyTorch's fused `"sdpa"`, the materialised
#   `"reference"` of lessons 02-03, or lesson 06's tiled `"flash"`;
# * for Mamba layers: `d_state` $N$, `d_conv`, `expand` (lesson 10);
# * a SwiGLU feed-forward of width `d_ff` after each mixer (0 for none), and `token_shift`
#   (below).
#
# Every layer is Jamba's, whatever its mixer: $x \leftarrow x + \mathrm{mixer}(\mathrm{norm}(x))$,
# then $x \leftarrow x + \mathrm{mlp}(\mathrm{norm}(x))$. The model around the layers:
#
# * `model.embedding(idx, cache)`: token embeddings `(B, L, d_model)`. With
#   `token_shift=True` it adds a learned embedding of the *previous* token to each position
#   (zero before the first), a convolution of width 2 over the tokens: it lets a value's
#   position know its key, the job of the short convolutions that Zoology's models put before
#   their mixers (lesson 08's recall model did the same). With a cache, it reads and updates
#   `cache.last_tokens`, so that the first new token knows the last old one.
# * `model.layers`: one `HybridLayer` per character; `layer(x, positions, cache, slot)`
#   returns `(B, L, d_model)`. `positions` `(L,)` are the positions of the L tokens in
#   their sequence (RoPE rotates by them); with a cache, the layer continues from and
#   updates its `slot` of the cache's part for its kind.
# * `model.norm` and `model.lm_head`: the final RMSNorm and the output layer.
#
# `model.empty_cache(batch)` makes a `HybridCache` for new sequences; `cache.seq_len` counts
# the tokens it has seen, the position of the next one. Here is a small Jamba-style model,
# its parameters by kind of layer, and its cache after a prompt:

# %%
seed_everything(0)
demo = Hybrid(HybridConfig(vocab_size=64, d_model=32, layout="MMMAMMMA", n_heads=4,
                           n_kv_heads=2, d_ff=64, token_shift=True)).to(device).eval()
for kind, name in reference.LAYER_KINDS.items():
    layers = [layer for layer in demo.layers if layer.kind == kind]
    if layers:
        print(f"{name:>9} layers: {len(layers)}, "
              f"{reference.count_parameters(layers[0].mixer):,} parameters in each mixer")
print(f"the whole model: {reference.count_parameters(demo):,} parameters")
demo_cache = demo.empty_cache(2)
with torch.no_grad():
    demo(torch.randint(64, (2, 10), device=device), cache=demo_cache)
print(f"after a prompt of 10 tokens: seq_len {demo_cache.seq_len}, the KV cache holds "
      f"{demo_cache.kv.held(0)} tokens in each of its {demo_cache.kv.n_layers} layers, "
      f"{len(demo_cache.mamba)} Mamba states; bytes by kind {demo_cache.nbytes_by_kind()}")

# %% [markdown]
# **Exercise 2 (4 points).** Write `hybrid_forward(model, idx, cache=None)`, the forward
# pass of a `Hybrid`, logits `(B, L, vocab_size)` for tokens `idx` `(B, L)`:
#
# 1. the positions of the L tokens: they start at `cache.seq_len` (0 without a cache);
# 2. embed with `model.embedding(idx, cache)`;
# 3. run every layer with its slot from `layer_plan(model.layout)` (yours, or
#    `reference.layer_plan`), passing the cache;
# 4. with a cache, advance `cache.seq_len` by L;
# 5. return `model.lm_head(model.norm(x))`.
#
# Called on a prompt and then on its continuation with the same cache, it must give the
# logits of one call on the whole text. Do not call `model(...)` or `model.forward`.

# %% solution id=hybrid-forward
def hybrid_forward(model: Hybrid, idx: Tensor, cache: HybridCache | None = None) -> Tensor:
    """Logits (B, L, vocab_size) of a hybrid for tokens idx (B, L); with a cache, idx
    continues the sequences it holds, and the cache is updated."""
    ### BEGIN SOLUTION
    start = 0 if cache is None else cache.seq_len
    positions = torch.arange(start, start + idx.shape[1], device=idx.device)  # (L,)
    x = model.embedding(idx, cache)  # (B, L, d_model)
    for layer, (_, slot) in zip(model.layers, reference.layer_plan(model.layout)):
        x = layer(x, positions, cache, slot)
    if cache is not None:
        cache.seq_len += idx.shape[1]
    return model.lm_head(model.norm(x))  # (B, L, V)
    ### END SOLUTION


# %% tests id=hybrid-forward-tests points=4
from helpers.checks import lesson11 as checks
checks.hybrid_forward(hybrid_forward)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("11").hybrid_forward(hybrid_forward)
### END HIDDEN TESTS

# %% [markdown]
# ## 4. Generation on one cache
#
# Greedy decoding picks the most likely next token and feeds it back. Without a cache every
# step reruns the whole text, $O(n^2)$ work for $n$ tokens. With the hybrid's cache, the
# prompt runs once (filling every layer's slot) and each new token is a single step: the
# attention layers attend over their cached keys, the Mamba layers take one step of their
# recurrence.
#
# **Exercise 3 (2 points).** Write `generate(model, prompt, max_new_tokens)`: the prompt
# `(B, L)` followed by `max_new_tokens` greedy tokens, `(B, L + max_new_tokens)`. Make a
# cache with `model.empty_cache(B)`, run the prompt through `model(prompt, cache=cache)`
# once, then feed each new token alone. The tokens must be those of a loop that reruns the
# whole text at every step, and the last token chosen need not be fed back. (No
# `model.generate`.)

# %% solution id=generate
@torch.no_grad()
def generate(model: Hybrid, prompt: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy continuation of prompt (B, L) by max_new_tokens tokens, on the model's cache:
    (B, L + max_new_tokens)."""
    ### BEGIN SOLUTION
    cache = model.empty_cache(prompt.shape[0])
    tokens, fresh = prompt, prompt
    for _ in range(max_new_tokens):
        logits = model(fresh, cache=cache)[:, -1]  # (B, V)
        fresh = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        tokens = torch.cat([tokens, fresh], dim=1)
    return tokens
    ### END SOLUTION


# %% tests id=generate-tests points=2
from helpers.checks import lesson11 as checks
checks.generate(generate)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("11").generate(generate)
### END HIDDEN TESTS

# %% [markdown]
# The demo model, generating: the KV cache grows by one token per step in its two attention
# layers, while its six Mamba states keep their size. (`Hybrid.generate` continues the text
# on a cache that already holds its beginning, as GPT's and Llama's `generate` do.)

# %%
demo_cache = demo.empty_cache(1)
text = torch.randint(64, (1, 8), device=device)
for new_tokens in (1, 8, 32) if SHORT else (1, 32, 256):
    text = demo.generate(text, new_tokens, cache=demo_cache)
    print(f"after {demo_cache.seq_len:>3} tokens: bytes by kind {demo_cache.nbytes_by_kind()}")

# %% [markdown]
# ## 5. Memory at a context length
#
# The memory a model keeps to decode its next token is the sum over its layers:
#
# | layer | keeps, per sequence | grows with $n$? |
# |---|---|---|
# | attention (MHA, GQA, MQA) | $2 \cdot n_{kv} \cdot d_{head} \cdot n$ (keys and values) | yes |
# | attention with a window $W$ | $2 \cdot n_{kv} \cdot d_{head} \cdot \min(n, W)$ | up to $W$ |
# | linear attention, $\phi = \mathrm{elu} + 1$ | $n_{heads} \cdot (d_{head}^2 + d_{head})$ ($\sum \phi(k) v^\top$ and $\sum \phi(k)$) | no |
# | Mamba | $d_{inner} \cdot (N + d_{conv} - 1)$ (SSM state, last convolution inputs) | no |
#
# each times the batch and the bytes per number. (FlashAttention changes the *prefill*, not
# what decoding keeps: its cache is the KV cache of MHA.)
#
# **Exercise 4 (3 points).** Write `decode_memory_bytes(config, seq_len, batch=1,
# bytes_per_elem=2)` for a `HybridConfig`: a dict from each kind of layer present in
# `config.layout` to the bytes its layers keep after `seq_len` tokens, following the table.
# Use `config.n_kv_heads`, `config.head_dim`, `config.n_heads`, `config.window` (None for
# none), `config.d_inner` ($= $ `expand * d_model`), `config.d_state`, `config.d_conv`. You
# may use `kv_cache_bytes` (lesson 09) and `mamba_state_bytes` (lesson 10).

# %% solution id=decode-memory
def decode_memory_bytes(config: HybridConfig, seq_len: int, batch: int = 1,
                        bytes_per_elem: int = 2) -> dict[str, int]:
    """Bytes each kind of layer of a hybrid keeps to decode the next token after seq_len
    tokens: {"A": ..., "L": ..., "M": ...}, the kinds present in the layout."""
    ### BEGIN SOLUTION
    c = config
    kept = seq_len if c.window is None else min(seq_len, c.window)
    per_layer = {"A": 2 * c.n_kv_heads * c.head_dim * kept,
                 "L": c.n_heads * (c.head_dim ** 2 + c.head_dim),
                 "M": c.d_inner * (c.d_state + c.d_conv - 1)}
    return {kind: c.layout.count(kind) * per_layer[kind] * batch * bytes_per_elem
            for kind in "ALM" if kind in c.layout}
    ### END SOLUTION


# %% tests id=decode-memory-tests points=3
from helpers.checks import lesson11 as checks
checks.decode_memory_bytes(decode_memory_bytes)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("11").decode_memory_bytes(decode_memory_bytes)
### END HIDDEN TESTS

# %% [markdown]
# Now at full scale. Jamba v0.1 (Lieber et al., 2024) has 32 layers of width 4096, four of
# them attention with 32 query heads and 8 K/V heads of 128, and Mamba layers with
# $N = 16$, a convolution of 4 and $d_{inner} = 8192$. Mixtral 8x7B (Jiang et al., 2024,
# *Mixtral of Experts*), a transformer of about the same active size, has 32 attention
# layers with the same heads. At 256K tokens in bfloat16 (the reference's
# `decode_memory_bytes`):

# %%
JAMBA = HybridConfig(vocab_size=65536, d_model=4096, layout=jamba_layout(32), n_heads=32,
                     n_kv_heads=8, d_state=16, d_conv=4, expand=2, rope=False)
MIXTRAL = HybridConfig(vocab_size=32000, d_model=4096, layout="A" * 32, n_heads=32,
                       n_kv_heads=8)
CONTEXT = 256 * 1024
for name, config in (("Jamba", JAMBA), ("Mixtral 8x7B", MIXTRAL)):
    memory = reference.decode_memory_bytes(config, CONTEXT)
    print(f"{name:>12}: " + ", ".join(f"{reference.LAYER_KINDS[kind]} layers "
                                      f"{nbytes / 2**30:.3f} GiB" for kind, nbytes in memory.items())
          + f"; total {sum(memory.values()) / 2**30:.2f} GiB")

# %% [markdown]
# The hybrid's decoding memory is almost all KV cache, one eighth of the transformer's: its
# 28 Mamba layers together keep a few megabytes. The paper reports the same numbers (4 GB
# against 32 GB), which is how Jamba fits a 256K context on a single 80 GB GPU.
#
# ## 6. A fair comparison: recall
#
# Comparing architectures is easy to get wrong. Zoology's rules, which this section
# follows: the same **data** and training (steps, batch, optimizer, learning rate, seeds);
# models of the same **size**; and the same everything else, so that only the mixer differs.
# Here the four models are all `Hybrid`s with two layers, the same embedding with token
# shift, no feed-forward, and the same head size: `"AA"` softmax attention, `"LL"` linear
# attention, `"MM"` Mamba, and the hybrid `"AM"`. Their widths differ so that their
# parameter counts match.
#
# **Exercise 5 (2 points).** Write `width_for_budget(build, budget, widths)`: the largest
# width in `widths` (in any order) whose model `build(width)` has at most `budget`
# trainable parameters. Count each parameter tensor once (a tied output layer shares the
# embedding's weight: `model.parameters()` yields it once, `state_dict()` twice), skip
# frozen ones (`requires_grad=False`) and buffers. Raise a `ValueError` when no width fits.

# %% solution id=width-for-budget
def width_for_budget(build: Callable[[int], nn.Module], budget: int,
                     widths: Iterable[int]) -> int:
    """The largest width whose model build(width) has at most budget trainable parameters."""
    ### BEGIN SOLUTION
    fitting = []
    for width in widths:
        n_params = sum(p.numel() for p in build(width).parameters() if p.requires_grad)
        if n_params <= budget:
            fitting.append(width)
    if not fitting:
        raise ValueError(f"no width gives a model of at most {budget} parameters")
    return max(fitting)
    ### END SOLUTION


# %% tests id=width-for-budget-tests points=2
from helpers.checks import lesson11 as checks
checks.width_for_budget(width_for_budget)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("11").width_for_budget(width_for_budget)
### END HIDDEN TESTS

# %% [markdown]
# The experiment: MQAR with `MQAR_PAIRS` key-value pairs, every key asked once (the
# sequence is three times as long), a vocabulary of 64 (32 keys, 32 values). The budget is
# the hybrid's size at width 32; every model gets the widest width within it (the
# reference's `width_for_budget`), then the same training
# (`helpers.tasks.train_associative_recall`: Adam, batches of 32 fresh sequences), and its
# accuracy at the queries of 128 test sequences is measured along the way.

# %%
MQAR_VOCAB, MQAR_PAIRS = 64, 4 if SHORT else 16
MQAR_STEPS, MQAR_EVERY, MQAR_LR = (30, 10, 3e-3) if SHORT else (250, 25, 3e-3)
RECALL_LAYOUTS = {"softmax attention": "AA", "linear attention": "LL", "Mamba": "MM",
                  "hybrid": "AM"}


def recall_model(layout: str, width: int) -> Hybrid:
    """A two-layer model of the given layout for MQAR: one head, token shift, no MLP."""
    return Hybrid(HybridConfig(MQAR_VOCAB, width, layout, n_heads=1, head_dim=32, d_state=8,
                               d_ff=0, token_shift=True)).to(device)


budget = reference.count_parameters(recall_model("AM", 32))
test_set = associative_recall_task(128, MQAR_PAIRS, MQAR_VOCAB,
                                   generator=torch.Generator().manual_seed(1), device=device)
recall_curves, recall_rows = {}, []
for name, layout in RECALL_LAYOUTS.items():
    width = reference.width_for_budget(lambda w: recall_model(layout, w), budget,
                                       range(8, 129, 8))
    seed_everything(0)
    model = recall_model(layout, width)
    start = time.perf_counter()
    recall_curves[name] = train_associative_recall(
        model, MQAR_PAIRS, MQAR_VOCAB, MQAR_STEPS, batch=32, lr=MQAR_LR,
        generator=torch.Generator().manual_seed(0), test=test_set, test_every=MQAR_EVERY)
    memory = reference.decode_memory_bytes(model.config, 3 * MQAR_PAIRS, bytes_per_elem=4)
    recall_rows.append((name, layout, width, reference.count_parameters(model),
                        recall_curves[name][-1], sum(memory.values()),
                        time.perf_counter() - start))
print(f"MQAR, {MQAR_PAIRS} pairs, {MQAR_STEPS} steps; parameter budget {budget:,}; chance "
      f"{1 / (MQAR_VOCAB // 2):.0%}")
print(f"{'model':>17} | layout | width | parameters | accuracy | memory at the last query "
      f"| train time")
for name, layout, width, n_params, accuracy, memory, seconds in recall_rows:
    print(f"{name:>17} | {layout:>6} | {width:>5} | {n_params:>10,} | {accuracy:>8.0%} | "
          f"{memory:>18,} bytes | {seconds:>8.1f} s")

steps = list(range(MQAR_EVERY, MQAR_STEPS + 1, MQAR_EVERY))
ax = curves(steps, recall_curves, "training step", f"recall accuracy, {MQAR_PAIRS} pairs",
            "same size, same training: the models with an attention layer learn to recall")
ax.axhline(1 / (MQAR_VOCAB // 2), color="gray", linestyle=":", label="chance")
ax.set_ylim(0, 1.05)
ax.legend()
plt.show()

# %% [markdown]
# Read the printed table and curves. The two models with an attention layer, the
# transformer and the hybrid, learn to recall nearly every pair within the budget (an
# induction head forms, and accuracy jumps). Linear attention, the same size and trained the
# same way, learns slowly, and Mamba stays near chance: to recall, a recurrent model has to
# learn to write each key's value into its state and read it back, which it learns far more
# slowly, and ever less well as the pairs outgrow its state (Zoology measured this with
# far longer training: the recurrent models needed widths that grow with the number of
# pairs, attention did not). The hybrid gets attention's recall with one attention layer;
# at scale, that is one layer in eight. What it keeps in memory is the last column: the
# attention layer's cache grows with the text, the Mamba layer's state does not.
#
# ## 7. A fair clock
#
# Timing is the other half of a comparison, and the easier one to get wrong. A function
# called for the first time allocates memory and fills caches; a busy machine slows some
# runs and not others; a GPU returns before it has finished. So:
#
# * run every function a few times untimed first (`warmup` rounds);
# * time in rounds in which every function takes its turn (a burst of load from elsewhere
#   then slows all alike), and take the **median** of the rounds (one slow round does not
#   move it);
# * call `sync()` before each reading of the clock (`torch.cuda.synchronize` on a GPU);
# * report **seconds per token**: a call that handles $n$ tokens divides by $n$.
#
# **Exercise 6 (2 points).** Write `time_per_token(fns, n_tokens, repeats=5, warmup=1,
# sync=None, clock=time.perf_counter)`: `fns` maps names to functions of no argument, each
# call of which handles `n_tokens` tokens. Run `warmup` untimed rounds (every function once
# per round, in the order of `fns`), then `repeats` timed rounds in the same order; time each
# call as `sync(); start = clock(); fn(); sync(); end = clock()` (`sync=None`: no
# synchronisation). Return each name's median time per token. (The check hands you a fake
# clock to see what you measure.)

# %% solution id=time-per-token
def time_per_token(fns: dict[str, Callable[[], object]], n_tokens: int, repeats: int = 5,
                   warmup: int = 1, sync: Callable[[], None] | None = None,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per token of each fn(), timed in interleaved rounds after a warmup."""
    ### BEGIN SOLUTION
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = clock()
            fn()
            sync()
            seconds[name].append(clock() - start)
    return {name: statistics.median(times) / n_tokens for name, times in seconds.items()}
    ### END SOLUTION


# %% tests id=time-per-token-tests points=2
from helpers.checks import lesson11 as checks
checks.time_per_token(time_per_token)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("11").time_per_token(time_per_token)
### END HIDDEN TESTS

# %% [markdown]
# ## 8. The closing table
#
# Every mechanism of the course, as one stack of 8 layers of the same width (64, four
# heads of 16) with no feed-forward, so that the mixers are all that differ:
#
# * **MHA** (lessons 02-03): attention with its weights materialised;
# * **FlashAttention** (lesson 06): the same attention by tiles, the course's Python version;
# * **GQA** (lesson 07): 2 K/V heads for the 4 query heads, on PyTorch's fused kernel;
# * **sliding window** (lesson 07): each query sees its last `TABLE_WINDOW` keys (banded when
#   prefilling, a rolling cache when decoding);
# * **linear attention** (lesson 08), **Mamba** (lesson 10);
# * the **hybrid**: Jamba's `"MMMMAMMM"`, its attention with 2 K/V heads.
#
# `helpers.hybrid.compare_mechanisms` measures them all the same way, with the reference
# `time_per_token`, on one thread: the **prefill** of a prompt of $n$ tokens (time per token,
# and peak tensor memory with `helpers.device.peak_memory`, lesson 06), and one **decode**
# step after $n$ tokens (time, and the bytes the cache holds, measured on the cache). A
# decode step's cost depends on how much the cache holds, not on what, so the decode
# measurements start from a cache filled with random numbers (`Hybrid.random_cache`)
# instead of paying for each prompt.

# %%
TABLE_BASE = dict(vocab_size=256, d_model=64, n_heads=4, d_ff=0)
TABLE_WINDOW = 64
MECHANISMS = {
    "MHA": HybridConfig(layout="A" * 8, kernel="reference", **TABLE_BASE),
    "FlashAttention": HybridConfig(layout="A" * 8, kernel="flash", **TABLE_BASE),
    "GQA": HybridConfig(layout="A" * 8, n_kv_heads=2, **TABLE_BASE),
    "sliding window": HybridConfig(layout="A" * 8, window=TABLE_WINDOW, **TABLE_BASE),
    "linear attention": HybridConfig(layout="L" * 8, **TABLE_BASE),
    "Mamba": HybridConfig(layout="M" * 8, **TABLE_BASE),
    "hybrid": HybridConfig(layout=jamba_layout(8), n_kv_heads=2, **TABLE_BASE),
}
PREFILL = [64, 128] if SHORT else [128, 256, 512, 1024]
DECODE = [128, 512] if SHORT else [256, 1024, 4096, 16384]
seed_everything(0)
mechanisms = {name: Hybrid(config).to(device).eval() for name, config in MECHANISMS.items()}
start = time.perf_counter()
rows = reference.compare_mechanisms(mechanisms, DECODE, prefill_contexts=PREFILL, repeats=5,
                                    generator=torch.Generator().manual_seed(0))
print(f"measured in {time.perf_counter() - start:.1f} s; the window is {TABLE_WINDOW} tokens\n")
measured = {(row.mechanism, row.context): row for row in rows}
print(f"{'':>16} | prefill, n = {PREFILL[-1]:<6}     | decode, n = {DECODE[-1]}")
print(f"{'mechanism':>16} | µs/token | peak MiB | ms/token | cache MiB | from the formula")
for name, model in mechanisms.items():
    prefill, last = measured[name, PREFILL[-1]], measured[name, DECODE[-1]]
    formula = sum(model.decode_memory_bytes(DECODE[-1]).values())
    print(f"{name:>16} | {1e6 * prefill.prefill_s:>8.0f} | {prefill.prefill_bytes / 2**20:>8.2f} |"
          f" {1e3 * last.decode_s:>8.2f} | {last.cache_bytes / 2**20:>9.3f} | "
          f"{formula / 2**20:.3f}")

# %%
panels = [("prefill_s", PREFILL, 1e6, "prefill: µs per token"),
          ("prefill_bytes", PREFILL, 2**-20, "prefill: peak memory (MiB)"),
          ("decode_s", DECODE, 1e3, "decode: ms per token"),
          ("cache_bytes", DECODE, 2**-20, "decode: cache (MiB)")]
fig, axes = plt.subplots(2, 2, figsize=(13, 9))
for ax, (field, contexts, scale, label) in zip(axes.flat, panels):
    series = {name: [scale * getattr(measured[name, n], field) for n in contexts]
              for name in mechanisms}
    curves(contexts, series, "context length n (tokens)", label, label, ax=ax, log_x=True,
           log_y=True)
    ax.get_legend().remove()
fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncols=4)
fig.suptitle("every mechanism of the course: attention's memory grows with the context, "
             "the recurrent layers' does not, the hybrid's grows at one eighth")
fig.tight_layout(rect=(0, 0.06, 1, 0.97))
plt.show()

# %%
def growth(field: str, contexts: list[int], name: str) -> float:
    """How many times the measurement grew from the shortest to the longest context."""
    return getattr(measured[name, contexts[-1]], field) / getattr(measured[name, contexts[0]],
                                                                  field)


print(f"from n = {DECODE[0]} to n = {DECODE[-1]} ({DECODE[-1] // DECODE[0]}x longer):")
for name in mechanisms:
    print(f"{name:>16}: cache x{growth('cache_bytes', DECODE, name):<6.1f} decode time "
          f"x{growth('decode_s', DECODE, name):<5.1f} | prefill n = {PREFILL[0]} to "
          f"{PREFILL[-1]}: peak memory x{growth('prefill_bytes', PREFILL, name):.1f}")

# %% [markdown]
# What the table and the plot show (compare with the printed numbers; the times are those of
# this machine):
#
# * **Decode memory** is exact and machine-independent (and equal to the formula of
#   exercise 4): the KV caches of MHA, FlashAttention and GQA grow in proportion to the
#   context, GQA's at half the size; the window's stops at `TABLE_WINDOW` tokens; linear attention
#   and Mamba keep the same small state at every length; the hybrid's grows at an eighth of
#   GQA's rate, on top of its Mamba states.
# * **Decode time**: a step of attention reads its whole cache, so its time grows with the
#   context once the cache, not the fixed cost of the layers, dominates (at the longest
#   contexts here); the window's, linear attention's and Mamba's do not grow. The course's
#   FlashAttention is a Python loop over tiles of keys, slow for a single query: fused
#   kernels (and FlashDecoding, which splits the keys across the GPU) do this in one call.
# * **Prefill memory**: MHA materialises the $n \times n$ weights of every head, so its peak
#   grows like $n^2$; the tiled and fused kernels, the window and linear attention grow like
#   $n$. Mamba's parallel scan in PyTorch materialises a state per token and channel
#   ($L \times d_{inner} \times N$ numbers), a large constant factor: Mamba's own CUDA
#   kernel keeps those states in on-chip memory, which is the point of its hardware-aware
#   design (Gu & Dao, 2023).
#
# ## 9. The big picture
#
# The measured numbers in one table, at the longest contexts, with the recall each trained
# model reached in section 6 (the attention there is plain MHA):

# %%
RECALL_OF = {"MHA": "softmax attention", "linear attention": "linear attention",
             "Mamba": "Mamba", "hybrid": "hybrid"}
recall = {name: accuracies[-1] for name, accuracies in recall_curves.items()}
print(f"{'mechanism':>16} | prefill µs/token, n = {PREFILL[-1]} | decode ms/token, n = "
      f"{DECODE[-1]} | cache MiB, n = {DECODE[-1]} | MQAR recall, {MQAR_PAIRS} pairs")
for name in mechanisms:
    prefill, last = measured[name, PREFILL[-1]], measured[name, DECODE[-1]]
    accuracy = f"{recall[RECALL_OF[name]]:.0%}" if name in RECALL_OF else "(as MHA)"
    print(f"{name:>16} | {1e6 * prefill.prefill_s:>27.0f} | {1e3 * last.decode_s:>25.2f} | "
          f"{last.cache_bytes / 2**20:>18.3f} | {accuracy:>8}")

# %% [markdown]
# And every mechanism of the course, in the terms of its costs ($n$ tokens of context,
# $d$ the width; constant factors and the feed-forward layers left out):
#
# | lesson | mechanism | training on $n$ tokens | one decode step | memory to decode | good at | bad at |
# |---|---|---|---|---|---|---|
# | 01 | RNN | $O(n d^2)$, sequential in $n$ | $O(d^2)$ | $O(d)$ | constant memory | long-range gradients and recall: everything passes through one vector |
# | 02-05 | softmax attention (MHA) | $O(n^2 d)$ time, $O(n^2)$ memory | $O(n d)$ | $O(n d)$ KV cache | exact recall of any token; parallel training | quadratic prompt; a cache that grows with $n$ |
# | 06 | FlashAttention | $O(n^2 d)$ time, $O(n d)$ memory | as MHA | as MHA | the same attention without the $n \times n$ matrix: long prompts fit | still quadratic time; a kernel per device |
# | 07 | GQA / MQA | as MHA | $O(n d \cdot n_{kv}/n_{heads})$ reads | $n_{kv}/n_{heads}$ of MHA's cache | a smaller, faster cache, little quality lost | the cache still grows with $n$ |
# | 07 | sliding window $W$ | $O(n W d)$ | $O(W d)$ | $O(W d)$ | bounded cost; depth widens the reach | no direct recall beyond $W$ tokens |
# | 08 | ring attention | $O(n^2 d / P)$ per device | as MHA | $O(n d / P)$ per device | contexts longer than one device holds | communication; $P$ devices |
# | 08 | linear attention | $O(n d^2)$ | $O(d^2)$ | $O(d^2)$ per head, constant | linear time, constant state | recall: a sum of outer products blurs keys together |
# | 09 | compressed KV caches | as attention | $O(\text{budget})$ | a budget | long generations in fixed memory | what was evicted or rounded is lost |
# | 10 | Mamba | $O(n d N)$, parallel scan | $O(d N)$ | $O(d N)$, constant | linear time, constant state, selective memory | exact recall once the pairs outgrow the state |
# | 11 | hybrid, 1 attention layer in $k$ | mostly $O(n d N)$, plus $O(n^2 d)$ in $1/k$ of the layers | $O(n d / k)$ | $O(n d / k)$ KV cache + constant states | attention's recall at a fraction of its cache | still grows with $n$; the best mix is still an open question |
#
# No row wins every column. Attention is the only mechanism that recalls anything exactly,
# and everything the course built around it (tiles, grouped heads, windows, rings, caches)
# reduces what that costs without changing what it can do. Recurrent mechanisms change the
# cost itself and pay in recall. The hybrids take the memory that recall needs only where it
# is needed; how few attention layers are enough is still being measured.
#
# ## What's next
#
# This is the end of the course. To go further: Mamba-2 (Dao & Gu, 2024) and gated linear
# attention (Yang et al., 2024) close much of the recall gap inside the recurrent layers;
# Based (Arora et al., 2024, *Simple linear attention language models balance the
# recall-throughput tradeoff*) pairs linear attention with a small sliding window; and the
# KV cache of the attention layers that remain can be compressed as in lesson 09. Every
# mechanism you have built is in `helpers`, with tests against PyTorch and Hugging Face:
# take one of them, change one thing, and measure it with the harness of this lesson.
