# %% [markdown]
# # Lesson 07 — MQA, GQA and sliding windows
#
# Lesson 06 made attention fast without changing what it computes: FlashAttention tiles the
# $L \times L$ scores so they never sit in memory at once, but it still computes all of them,
# and it does nothing about the other memory that attention needs at inference time. A
# decoder that generates text keeps, in every layer, the key and value of every token it has
# seen (the **KV cache**; lesson 09 builds one), so that each new token costs one row of
# attention instead of a rerun of the whole prefix. For the large models of today that cache,
# not the weights, decides how many users and how long a context one GPU can serve.
#
# This lesson changes *what* attention computes, a little, to shrink both costs. These are the
# choices inside the open models of today, Llama 2 and Mistral 7B:
#
# - **multi-query and grouped-query attention** (MQA, GQA): several query heads share one key
#   and value head, which divides the KV cache;
# - **rotary position embeddings** (RoPE): positions as rotations of queries and keys, so the
#   scores see only relative distances;
# - **sliding-window attention**: each token sees only the last $W$ tokens, so the cost grows
#   as $n \cdot W$ instead of $n^2$, while the layers stacked on each other still carry
#   information much further back.
#
# You will build:
#
# 1. `kv_cache_bytes`: the KV cache of a real published model, in bytes;
# 2. `repeat_kv`: one key/value head for each group of query heads;
# 3. `grouped_query_attention`: GQA without copying a single key;
# 4. `mean_pool_kv`: turn a multi-head checkpoint into a grouped-query one;
# 5. `apply_rope`: rotary position embeddings, as Hugging Face's Llama computes them;
# 6. `local_global_mask`: the sliding-window mask, with global tokens;
# 7. `banded_attention`: sliding-window attention in $O(n \cdot W)$, equal to the masked one.
#
# The course's `helpers.transformer.Llama` puts them together: it loads the weights of
# Hugging Face's `LlamaForCausalLM` and `MistralForCausalLM` and reproduces their logits and
# their greedy generations (the course's tests prove it).

# %%
try:
    import helpers
except ImportError:  # Colab or a bare kernel: install the course package
    %pip install -q "attention-course @ git+COURSE_REPOSITORY"

# %% id=imports
import math
import time
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor

from helpers import attention as ref
from helpers import rope as rope_ref
from helpers.device import get_device, is_autograding, one_cpu_thread, seed_everything
from helpers.kv_cache import KVCache
from helpers.plotting import attention_heatmap, curves
from helpers.sliding_window import sliding_window_attention
from helpers.tasks import IGNORE_INDEX, previous_and_first_token_task
from helpers.transformer import Llama

device = get_device()
generator = seed_everything(0)
SHORT = is_autograding()  # the autograder trains and times for a moment only
print(f"running on {device}; short experiments: {SHORT}")

# %% [markdown]
# ## 1. The KV cache decides how long a context fits
#
# At every layer, every token leaves a key and a value of `head_dim` numbers in each of the
# `n_kv_heads` key/value heads. Keys *and* values, every layer, every token, every sequence
# of the batch:
#
# $$ \text{bytes} = 2 \cdot n_\text{layers} \cdot n_\text{kv heads} \cdot d_\text{head}
#    \cdot \text{tokens} \cdot \text{batch} \cdot \text{bytes per number}, $$
#
# with 2 bytes per number in float16 or bfloat16, the precision these models run in. Pope et
# al. (2022), *Efficiently Scaling Transformer Inference*, show that at long contexts reading
# this cache, not the weights, is what each generated token waits for.
#
# The configurations below are the published ones: GPT-3 (Brown et al., 2020, *Language
# Models are Few-Shot Learners*, Table 2.1), Llama 2 (Touvron et al., 2023, *Llama 2: Open
# Foundation and Fine-Tuned Chat Models*) and Mistral 7B (Jiang et al., 2023, *Mistral 7B*,
# Table 1). GPT-3 and Llama 2 7B give every query head its own key/value head; Llama 2 70B
# and Mistral share each key/value head among 8 query heads; Mistral's sliding window of 4096
# tokens means it never needs to keep more than the last 4096 tokens (its "rolling" cache).

# %%
@dataclass(frozen=True)
class Config:
    """The attention shape of a published model (window None: full causal attention)."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    window: int | None = None


CONFIGS = [
    Config("GPT-3 175B", n_layers=96, d_model=12288, n_heads=96, n_kv_heads=96, head_dim=128),
    Config("Llama 2 7B", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, head_dim=128),
    Config("Llama 2 70B", n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, head_dim=128),
    Config("Mistral 7B", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, head_dim=128,
           window=4096),
]

# %% [markdown]
# **Exercise 1 (2 points).** Write `kv_cache_bytes(config, seq_len, batch=1,
# bytes_per_elem=2)`: the bytes of the KV cache of `config` after `seq_len` tokens of each
# of `batch` sequences. A config with a `window` holds at most `window` tokens per layer
# (older ones can never be seen again); `window=None` holds them all. Return an `int`.

# %% solution id=kv-cache-bytes
def kv_cache_bytes(config: Config, seq_len: int, batch: int = 1, bytes_per_elem: int = 2) -> int:
    """Bytes of keys and values held for ``seq_len`` tokens of ``batch`` sequences."""
    ### BEGIN SOLUTION
    held = seq_len if config.window is None else min(seq_len, config.window)
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * held * batch * bytes_per_elem
    ### END SOLUTION


# %% tests id=kv-cache-bytes-tests points=2
from helpers.checks import lesson07 as checks
checks.kv_cache_bytes(kv_cache_bytes)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("07").kv_cache_bytes(kv_cache_bytes)
### END HIDDEN TESTS

# %% [markdown]
# The cache of each model against the context length, for one sequence in bfloat16, with
# the memory of common GPUs drawn across (the 24 GB of a consumer card, the 80 GB of an
# A100 or H100, the 141 GB of an H200). The weights need room too, 2 bytes per parameter
# (the last printed line).

# %%
GPUS = {"24 GB (RTX 4090)": 24e9, "80 GB (A100, H100)": 80e9, "141 GB (H200)": 141e9}
CONTEXTS = [2**p for p in range(10, 18)]  # 1k .. 128k tokens

print(f"{'model':>12} | {'KiB per token':>13} | {'GB at 4k':>8} | {'GB at 32k':>9} | "
      f"{'GB at 128k':>10}")
for config in CONFIGS:
    per_token = kv_cache_bytes(Config(**{**vars(config), "window": None}), 1)
    print(f"{config.name:>12} | {per_token / 2**10:>13.0f} | "
          + " | ".join(f"{kv_cache_bytes(config, n) / 1e9:>{w}.1f}"
                       for n, w in ((4096, 8), (32768, 9), (131072, 10))))


def tokens_that_fit(config: Config, memory: float) -> int:
    """How many tokens of one sequence a full-attention config can cache in ``memory`` bytes."""
    return int(memory // kv_cache_bytes(config, 1))


gpt3, llama70 = CONFIGS[0], CONFIGS[2]
print(f"on an 80 GB GPU: GPT-3's cache fits {tokens_that_fit(gpt3, 80e9):,} tokens, "
      f"Llama 2 70B's {tokens_that_fit(llama70, 80e9):,}: its 8 K/V heads instead of 64 "
      f"divide the cache by {llama70.n_heads // llama70.n_kv_heads}")
print(f"and the weights, in bfloat16: GPT-3 {2 * 175e9 / 1e9:.0f} GB, Llama 2 70B "
      f"{2 * 70e9 / 1e9:.0f} GB")

gigabytes = {c.name: [kv_cache_bytes(c, n) / 1e9 for n in CONTEXTS] for c in CONFIGS}
ax = curves(CONTEXTS, gigabytes, "context length (tokens)", "KV cache, one sequence (GB)",
            f"GQA and windows shrink the cache: at {CONTEXTS[-1] // 1024}k tokens, from "
            f"{gigabytes[gpt3.name][-1]:.0f} GB (GPT-3) to "
            f"{gigabytes['Mistral 7B'][-1]:.1f} GB (Mistral)", log_x=True, log_y=True)
for (label, memory), style in zip(GPUS.items(), (":", "--", "-.")):
    ax.axhline(memory / 1e9, color="gray", linestyle=style, label=label)
ax.set_xticks(CONTEXTS, [f"{n // 1024}k" for n in CONTEXTS])
ax.figure.set_size_inches(9, 4.5)
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
ax.figure.tight_layout()
plt.show()

# %% [markdown]
# GPT-3's cache alone fills an 80 GB GPU at the context printed above, for one sequence,
# with no room left for its weights. Llama 2 70B has ten times the parameters of Llama 2 7B
# and more layers, yet its cache per token is *smaller* (the table's first column): grouped-
# query attention. Mistral's line goes flat at its window of 4096 tokens. The next sections
# explain both tricks.
#
# ## 2. Multi-query and grouped-query attention
#
# In multi-head attention (lesson 03) each of the $H$ heads has its own queries, keys and
# values. Shazeer (2019), *Fast Transformer Decoding: One Write-Head is All You Need*,
# observed that during decoding the time goes into *loading* the cached keys and values, and
# proposed **multi-query attention** (MQA): $H$ query heads, but **one** key head and one
# value head shared by all of them. The cache shrinks $H$-fold; quality drops somewhat.
# Ainslie et al. (2023), *GQA: Training Generalized Multi-Query Transformer Models from
# Multi-Head Checkpoints*, interpolate: **grouped-query attention** (GQA) has $H_{kv}$ key/value
# heads, each shared by a group of $G = H / H_{kv}$ consecutive query heads:
#
# $$ \text{head}_h = \mathrm{softmax}\!\left(\frac{Q_h K_{\lfloor h/G \rfloor}^\top}{\sqrt{d}}
#    \right) V_{\lfloor h/G \rfloor}, \qquad h = 0, \dots, H - 1 . $$
#
# One knob, $H_{kv}$, covers all three: $H_{kv} = H$ is multi-head attention, $H_{kv} = 1$ is
# multi-query attention, anything between is GQA. The mapping is *blocked*: query heads
# $0 \dots G-1$ read key/value head 0, heads $G \dots 2G-1$ read head 1, and so on, which is
# what PyTorch's `scaled_dot_product_attention(..., enable_gqa=True)` and every Llama
# checkpoint assume. The simplest implementation copies each key/value head $G$ times and
# then runs ordinary multi-head attention.
#
# **Exercise 2 (1 point).** Write `repeat_kv(x, n_rep)` that turns `x` of shape
# `(B, H_kv, S, D)` into `(B, H_kv * n_rep, S, D)`, where output head `h` is input head
# `h // n_rep`. Do it as Hugging Face's Llama does: add an axis (`x[:, :, None]`), `expand`
# it (a view, no copy), then `reshape`; `repeat_interleave` would do the exercise for you.
# With `n_rep == 1` return `x` itself.

# %% solution id=repeat-kv
def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, H_kv, S, D) -> (B, H_kv * n_rep, S, D): head h is head h // n_rep of x (blocked)."""
    ### BEGIN SOLUTION
    if n_rep == 1:
        return x
    B, H_kv, S, D = x.shape
    return x[:, :, None].expand(B, H_kv, n_rep, S, D).reshape(B, H_kv * n_rep, S, D)
    ### END SOLUTION


# %% tests id=repeat-kv-tests points=1
from helpers.checks import lesson07 as checks
checks.repeat_kv(repeat_kv)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("07").repeat_kv(repeat_kv)
### END HIDDEN TESTS

# %% [markdown]
# Copying defeats part of the purpose: the whole point of GQA is to read fewer keys from
# memory, and `repeat_kv` writes them out $G$ times again. There is a better way. The $G$
# query heads of a group all score against the *same* keys, so stack their queries as
# $G \cdot L$ rows of one matrix: with $q$ of shape $(B, H, L, D)$ and $H = H_{kv} G$,
#
# $$ (B, H, L, D) \xrightarrow{\text{reshape}} (B, H_{kv}, G \cdot L, D), $$
#
# because head $h = g G + j$ sits at index $(g, j)$ of $(H_{kv}, G)$: group $g$, member $j$.
# Then one matrix product per group, $(G \cdot L \times D)(D \times S)$, scores all its query
# heads against its keys, and the weights times the values give all its outputs, with no
# key or value ever copied. Hugging Face uses this reshaping for its decoding steps.
#
# **Exercise 3 (3 points).** Write `grouped_query_attention(q, k, v, mask=None)` for `q`
# `(B, H, L, D)`, `k` `(B, H_kv, S, D)`, `v` `(B, H_kv, S, Dv)`, returning `(B, H, L, Dv)`:
# scaled dot-product attention in which query head `h` uses key/value head `h // (H // H_kv)`.
# `mask` is boolean (`True` = attend), of shape `(L, S)` or `(B, 1, L, S)`, the same for every
# head. Fold the query heads of each group into the rows as above; do not copy `k` or `v`
# (no `repeat_kv`, `repeat_interleave`, `repeat` or `expand`). Use `ref.softmax` for the
# softmax (a query that may see no key then gets zeros).

# %% solution id=gqa
def grouped_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None
                            ) -> Tensor:
    """GQA (Ainslie et al., 2023): q (B, H, L, D), k (B, H_kv, S, D), v (B, H_kv, S, Dv) ->
    (B, H, L, Dv); the G = H / H_kv query heads of a group share one K/V head."""
    ### BEGIN SOLUTION
    B, H, L, D = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    G = H // H_kv
    rows = q.reshape(B, H_kv, G * L, D)  # group g, member j, query i at row j*L + i
    scores = rows @ k.transpose(-2, -1) / math.sqrt(D)  # (B, H_kv, G*L, S)
    if mask is not None:
        scores = scores.view(B, H_kv, G, L, S).masked_fill(~mask.unsqueeze(-3), float("-inf"))
    weights = ref.softmax(scores.reshape(B, H_kv, G * L, S), dim=-1)  # (B, H_kv, G*L, S)
    return (weights @ v).reshape(B, H, L, v.shape[-1])  # (B, H, L, Dv)
    ### END SOLUTION


# %% tests id=gqa-tests points=3
from helpers.checks import lesson07 as checks
checks.grouped_query_attention(grouped_query_attention)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("07").grouped_query_attention(grouped_query_attention)
### END HIDDEN TESTS

# %% [markdown]
# One knob, three designs. For the shape of Llama 2 70B the table below turns $H_{kv}$ from
# 64 (multi-head) down to 1 (multi-query): the KV cache per token, and the parameters of one
# layer's attention ($W^Q$ and $W^O$ stay $d \times d$; $W^K$ and $W^V$ shrink with $H_{kv}$).

# %%
print(f"{'n_kv_heads':>10} | {'design':>6} | {'KV cache KiB/token':>18} | "
      f"{'attention params/layer':>22}")
for n_kv in (64, 32, 16, 8, 4, 2, 1):
    shape = Config("Llama 2 70B shape", llama70.n_layers, llama70.d_model, llama70.n_heads, n_kv,
                   llama70.head_dim)
    design = "MHA" if n_kv == shape.n_heads else "MQA" if n_kv == 1 else "GQA"
    d, kv_width = shape.d_model, n_kv * shape.head_dim
    params = 2 * d * d + 2 * d * kv_width
    print(f"{n_kv:>10} | {design:>6} | {kv_cache_bytes(shape, 1) / 2**10:>18,.0f} | "
          f"{params / 1e6:>20.1f} M")

# %% [markdown]
# ## 3. From a multi-head checkpoint to GQA
#
# Training a large model from scratch for every $H_{kv}$ is expensive. Ainslie et al. (2023)
# start from an existing multi-head checkpoint instead: each group's key and value
# projections become the **mean** of the group's heads,
#
# $$ W^K_g = \frac{1}{G} \sum_{j=0}^{G-1} W^K_{gG + j}, \qquad
#    W^V_g = \frac{1}{G} \sum_{j=0}^{G-1} W^V_{gG + j}, $$
#
# and the converted model is trained a little more, about 5% of the original compute
# ("uptraining"). They found mean-pooling a better start than keeping the first head of each
# group or starting the key/value heads afresh. A projection's weight has shape
# `(H * head_dim, d_model)`: head $h$ owns rows $h \cdot d \dots (h+1) \cdot d - 1$, and so
# does its bias, of shape `(H * head_dim,)`.
#
# **Exercise 4 (2 points).** Write `mean_pool_kv(weight, n_heads, n_kv_heads)` that maps a
# key or value projection's weight `(n_heads * head_dim, ...)` (any trailing dims, none for a
# bias) to `(n_kv_heads * head_dim, ...)`, group `g` being the mean of heads
# `g*G .. g*G + G - 1`.

# %% solution id=mean-pool-kv
def mean_pool_kv(weight: Tensor, n_heads: int, n_kv_heads: int) -> Tensor:
    """(H*D, ...) -> (H_kv*D, ...): each group of G = H / H_kv consecutive heads averaged."""
    ### BEGIN SOLUTION
    head_dim = weight.shape[0] // n_heads
    grouped = weight.reshape(n_kv_heads, n_heads // n_kv_heads, head_dim, *weight.shape[1:])
    return grouped.mean(dim=1).reshape(n_kv_heads * head_dim, *weight.shape[1:])
    ### END SOLUTION


# %% tests id=mean-pool-kv-tests points=2
from helpers.checks import lesson07 as checks
checks.mean_pool_kv(mean_pool_kv)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("07").mean_pool_kv(mean_pool_kv)
### END HIDDEN TESTS

# %% [markdown]
# **The experiment.** Lesson 03's two-lookup task: at every position, name the *previous*
# token and the *first* token of the sequence. A multi-head model learns to give the two
# lookups to different heads, one attending one step back, one attending to position 0.
# We train a one-layer Llama with 4 heads on it (its LM head's first `V` logits name the
# previous token, the last `V` the first token), then convert it to GQA with 2 and with 1
# key/value head, by mean-pooling and by keeping the first head of each group, measure how
# far its outputs move and how much it still gets right, and uptrain each for a few steps.
# The conversion uses the course's reference `helpers.attention.mean_pool_heads`, which
# your `mean_pool_kv` now matches.

# %%
VOCAB, SEQ, HEADS, WIDTH = 16, 16, 4, 32
TRAIN_STEPS, UPTRAIN_STEPS = (40, 10) if SHORT else (250, 40)


def lookup_batch(batch: int) -> tuple[Tensor, Tensor]:
    """Tokens (B, L) and targets (B, L, 2): previous token, first token."""
    return previous_and_first_token_task(batch, SEQ, VOCAB, generator=generator, device=device)


def loss_and_accuracy(model: Llama, tokens: Tensor, targets: Tensor) -> tuple[Tensor, list[float]]:
    """Cross-entropy of both lookups, and the accuracy of each."""
    logits = model(tokens)  # (B, L, 2V)
    loss, accuracy = 0.0, []
    for lookup, part in enumerate((logits[..., :VOCAB], logits[..., VOCAB:])):
        target = targets[..., lookup]  # (B, L)
        loss = loss + F.cross_entropy(part.reshape(-1, VOCAB), target.reshape(-1),
                                      ignore_index=IGNORE_INDEX)
        scored = target != IGNORE_INDEX
        accuracy.append((part.argmax(-1) == target)[scored].float().mean().item())
    return loss, accuracy


def train(model: Llama, steps: int, lr: float) -> Llama:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss, _ = loss_and_accuracy(model, *lookup_batch(64))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def first_head_of_group(weight: Tensor, n_heads: int, n_kv_heads: int) -> Tensor:
    """The alternative Ainslie et al. compare with: keep head g*G of each group."""
    head_dim = weight.shape[0] // n_heads
    grouped = weight.reshape(n_kv_heads, n_heads // n_kv_heads, head_dim, *weight.shape[1:])
    return grouped[:, 0].reshape(n_kv_heads * head_dim, *weight.shape[1:])


def convert(model: Llama, n_kv_heads: int, pool) -> Llama:
    """A copy of ``model`` with ``n_kv_heads`` K/V heads, its K and V projections pooled."""
    gqa = Llama(2 * VOCAB, WIDTH, 1, HEADS, n_kv_heads, d_ff=2 * WIDTH).to(device)
    weights = {name: pool(w, HEADS, n_kv_heads) if ".k_proj." in name or ".v_proj." in name
               else w for name, w in model.state_dict().items()}
    gqa.load_state_dict(weights)
    return gqa.eval()


started = time.perf_counter()
with one_cpu_thread():
    mha = train(Llama(2 * VOCAB, WIDTH, 1, HEADS, d_ff=2 * WIDTH).to(device), TRAIN_STEPS,
                lr=1e-2)
    test_tokens, test_targets = lookup_batch(512)
    with torch.no_grad():
        reference_logits = mha(test_tokens)
        _, mha_accuracy = loss_and_accuracy(mha, test_tokens, test_targets)
    print(f"multi-head model after {TRAIN_STEPS} steps: previous token "
          f"{mha_accuracy[0]:.1%}, first token {mha_accuracy[1]:.1%}")
    results = {}  # (pooling, n_kv_heads) -> (output change, accuracy, accuracy after uptraining)
    for pool_name, pool in (("mean-pooled", ref.mean_pool_heads),
                            ("first head of group", first_head_of_group)):
        for n_kv in (2, 1):
            gqa = convert(mha, n_kv, pool)
            with torch.no_grad():
                moved = ((gqa(test_tokens) - reference_logits).norm()
                         / reference_logits.norm()).item()
                accuracy = min(loss_and_accuracy(gqa, test_tokens, test_targets)[1])
            train(gqa, UPTRAIN_STEPS, lr=3e-3)
            with torch.no_grad():
                uptrained = min(loss_and_accuracy(gqa, test_tokens, test_targets)[1])
            results[pool_name, n_kv] = (moved, accuracy, uptrained)
print(f"trained and converted in {time.perf_counter() - started:.1f} s")
print(f"{'conversion':>20} | {'K/V heads':>9} | {'logits moved':>12} | {'accuracy':>8} | "
      f"{f'after {UPTRAIN_STEPS} steps':>16}")
for (pool_name, n_kv), (moved, accuracy, uptrained) in results.items():
    print(f"{pool_name:>20} | {n_kv:>9} | {moved:>12.0%} | {accuracy:>8.1%} | {uptrained:>16.1%}")

# %% [markdown]
# "logits moved" is the size of the change of the logits relative to their size, and the
# accuracies are the worse of the two lookups. The table is this run's: a converted model
# gets much of the task wrong at first (the two lookups' keys are now one), whichever way
# it was converted, and the uptraining steps bring it back; compare how far each way gets
# in the same few steps. This is what Ainslie et al. measured at scale: the conversion
# alone loses quality, and a few percent of the original training recovers most of it.
#
# ## 4. Rotary position embeddings
#
# Every Llama-family model encodes positions the same way, and it suits a sliding window:
# with relative positions a query sees its window alike wherever it stands, and a cached key
# never changes. Su et al. (2021), *RoFormer: Enhanced
# Transformer with Rotary Position Embedding*, rotate each query and key by an angle
# proportional to its position. Cut a head's $D$ channels into $D/2$ pairs; pair $i$ of the
# query at position $m$ is rotated by the angle $m\,\theta_i$, with $\theta_i =
# \text{base}^{-2i/D}$:
#
# $$ \begin{pmatrix} x'_a \\ x'_b \end{pmatrix} =
#    \begin{pmatrix} \cos m\theta_i & -\sin m\theta_i \\ \sin m\theta_i & \cos m\theta_i
#    \end{pmatrix} \begin{pmatrix} x_a \\ x_b \end{pmatrix} . $$
#
# **Why only relative positions survive.** Write a pair as a complex number $z$; rotation by
# $m\theta$ is multiplication by $e^{i m\theta}$. The score of query $q$ at $m$ and key $k$ at
# $n$ adds up, pair by pair, $\mathrm{Re}\big[(q e^{i m\theta}) \overline{(k e^{i n\theta})}
# \big] = \mathrm{Re}\big[q \bar k \, e^{i (m - n)\theta}\big]$: the absolute positions cancel and
# only $m - n$ is left. Nothing is added to the token embeddings, and a key cached at
# position $n$ never needs to change.
#
# **Which channels pair up** is a convention, and it matters for loading weights. The paper
# pairs neighbours $(x_0, x_1), (x_2, x_3), \dots$. Hugging Face's Llama and Mistral pair the
# two halves of the head, $(x_i, x_{i + D/2})$, and write the rotation as
#
# $$ x' = x \odot \cos + \mathrm{rotate\_half}(x) \odot \sin, \qquad
#    \mathrm{rotate\_half}(x_1, x_2) = (-x_2, x_1), $$
#
# with $\cos$ and $\sin$ of the angles $(m\theta_0, \dots, m\theta_{D/2-1}, m\theta_0,
# \dots, m\theta_{D/2-1})$ (each angle twice, once per half). The base is `rope_theta` in
# their configs: 10000 in Llama 2 and Mistral, 500000 in Llama 3.
#
# **Exercise 5 (3 points).** Write `apply_rope(x, positions, base=10000.0)` for `x` of shape
# `(B, H, L, D)` and integer `positions` of shape `(L,)` (not always `0 .. L-1`: after a KV
# cache they continue from where it stopped), in Hugging Face's rotate-half convention.
# Compute the angles in float32 and return the dtype of `x`.

# %% solution id=rope
def apply_rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """RoPE (Su et al., 2021), rotate-half pairs (x_i, x_{i+D/2}): (B, H, L, D) -> same."""
    ### BEGIN SOLUTION
    D = x.shape[-1]
    theta = base ** (-torch.arange(0, D, 2, device=x.device).float() / D)  # (D/2,)
    angles = positions.float()[:, None] * theta[None, :]  # (L, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, D)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)  # rotate_half(x)
    return x * angles.cos().to(x.dtype) + rotated * angles.sin().to(x.dtype)
    ### END SOLUTION


# %% tests id=rope-tests points=3
from helpers.checks import lesson07 as checks
checks.apply_rope(apply_rope)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("07").apply_rope(apply_rope)
### END HIDDEN TESTS

# %% [markdown]
# The promise, checked with your `apply_rope`: put the *same* query vector at every
# position $i$ and the same key at every position $j$, rotate, and score all pairs. If
# only $i - j$ matters, every diagonal of the score matrix is constant (a Toeplitz matrix).
# The right panel averages $q_m \cdot k_n$ over random queries whose key is the query itself
# (a token looking for its own copy): the score is largest at distance 0 and fades as the
# distance grows (Su et al. call it long-term decay), more slowly for a larger base, one
# reason why long-context models raise `rope_theta`.

# %%
head_dim, n_positions = 64, 48
q_vec, k_vec = torch.randn(2, 1, 1, 1, head_dim, device=device)
positions = torch.arange(n_positions, device=device)
q_rot = apply_rope(q_vec.expand(1, 1, n_positions, head_dim), positions)  # (1, 1, L, D)
k_rot = apply_rope(k_vec.expand(1, 1, n_positions, head_dim), positions)
scores = (q_rot @ k_rot.transpose(-2, -1))[0, 0]  # (L, L): scores[i, j] = q_i · k_j
spreads = [(d.max() - d.min()).item() for d in (scores.diagonal(offset)
           for offset in range(-n_positions + 1, n_positions))]
print(f"largest spread (max - min) along any diagonal: {max(spreads):.1e}; the scores "
      f"themselves range over {(scores.max() - scores.min()).item():.1f}")

distances = torch.arange(0, 4096, 32, device=device)
same = torch.randn(1024, 1, 1, head_dim, device=device)  # queries equal to their keys
decay = {}
for base in (10000.0, 500000.0):
    rotated = apply_rope(same.expand(1024, 1, len(distances), head_dim), distances, base)
    decay[f"base {base:g}"] = (rotated[:, 0] * same[:, 0]).sum(-1).mean(0).tolist()

fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
attention_heatmap(scores, ax=axes[0], value_label="score q_i · k_j", vmax=None,
                  title="RoPE scores are constant along diagonals: only i - j matters")
axes[0].images[0].set_cmap("coolwarm")
axes[0].images[0].set_clim(-scores.abs().max().item(), scores.abs().max().item())
curves(distances.tolist(), decay, "distance m - n (tokens)", "mean q_m · k_n, with k = q",
       "a token's score with its own copy fades with distance", ax=axes[1])
for line in axes[1].lines:
    line.set_marker("")
axes[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Sliding windows, and tokens every query may see
#
# Mistral 7B (Jiang et al., 2023) lets the query at position $i$ see only the keys of the
# last $W$ positions, itself included:
#
# $$ \text{key } j \text{ is visible from query } i \iff i - W < j \le i . $$
#
# Its attention then costs $O(n W)$ instead of $O(n^2)$, and its cache never holds more than
# $W$ tokens per layer (section 1). Information still travels further: the output of layer
# 1 at position $i$ already mixes positions $i - W + 1 \dots i$, so layer 2 at position $i$
# reads, through them, positions back to $i - 2(W - 1)$. After $\ell$ layers the receptive
# field spans $\ell (W - 1) + 1$ positions: Mistral's 32 layers and $W = 4096$ reach far beyond
# the window (the cell after the exercise computes how far). The same idea drives
# Longformer (Beltagy et al., 2020, *Longformer: The Long-Document Transformer*), which adds
# a few **global tokens** that every position may attend to, however far: a
# classification token, or the question in a reading task. In causal decoders the first
# tokens play that role: Xiao et al. (2024), *Efficient Streaming Language Models with
# Attention Sinks*, found that models park surplus attention on the first few tokens, and
# that keeping these "attention sinks" visible is what lets a windowed model run on.
#
# **Exercise 6 (2 points).** Write `local_global_mask(L, window, n_global=0, device=None)`,
# the `(L, L)` boolean mask (`True` = attend) in which query `i` sees key `j` when
# `i - window < j <= i`, or when `j < n_global` and `j <= i` (a global token is still never
# seen before it exists). Raise a `ValueError` for a window below 1.

# %% solution id=local-global-mask
def local_global_mask(L: int, window: int, n_global: int = 0,
                      device: torch.device | str | None = None) -> Tensor:
    """(L, L) causal sliding-window mask (Mistral) where the first n_global keys are global
    (Longformer) or attention sinks: every later query sees them."""
    ### BEGIN SOLUTION
    if window < 1:
        raise ValueError(f"window must be at least 1 (the query itself), got {window}")
    i = torch.arange(L, device=device)[:, None]  # (L, 1)
    j = torch.arange(L, device=device)[None, :]  # (1, L)
    return (j <= i) & ((j > i - window) | (j < n_global))
    ### END SOLUTION


# %% tests id=local-global-mask-tests points=2
from helpers.checks import lesson07 as checks
checks.local_global_mask(local_global_mask)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("07").local_global_mask(local_global_mask)
### END HIDDEN TESTS

# %% [markdown]
# **The receptive field, layer by layer.** Which inputs can reach which output after $\ell$
# layers? Stacking layers composes the masks: output $i$ depends on input $j$ through $\ell$
# layers when a chain $i \to i_1 \to \dots \to j$ of allowed steps exists, which is the
# boolean matrix power $M^\ell$. Below, $W = 4$ on 32 positions, without and with one
# global token (position 0).

# %%
L_FIELD, W_FIELD, LAYERS = 32, 4, (1, 2, 3, 6)


def reachable(mask: Tensor, layers: int) -> Tensor:
    """(L, L) boolean: output i can depend on input j through ``layers`` masked layers."""
    reach = torch.eye(mask.shape[0], dtype=torch.bool, device=mask.device)
    for _ in range(layers):
        reach = (mask.float() @ reach.float()) > 0
    return reach


fig, axes = plt.subplots(2, len(LAYERS), figsize=(3.2 * len(LAYERS), 6.4), layout="constrained")
for row, n_global in enumerate((0, 1)):
    mask = local_global_mask(L_FIELD, W_FIELD, n_global, device=device)
    for ax, layers in zip(axes[row], LAYERS):
        reach = reachable(mask, layers)
        attention_heatmap(reach.float(), ax=ax, colorbar=False, vmax=1.0,
                          title=f"{layers} layer{'s' * (layers > 1)}"
                                + (", 1 global token" if n_global else ""))
        ax.set_xlabel("input position")
        ax.set_ylabel("output position" if ax is axes[row, 0] else "")
    field = int(reachable(mask, LAYERS[-1])[-1].sum())
    print(f"n_global={n_global}: after {LAYERS[-1]} layers the last position reaches {field} "
          f"inputs (formula without globals: {LAYERS[-1]} (W - 1) + 1 = "
          f"{LAYERS[-1] * (W_FIELD - 1) + 1})")
fig.suptitle(f"window W = {W_FIELD}: each layer widens the receptive field by W - 1 = "
             f"{W_FIELD - 1} positions")
plt.show()
mistral = CONFIGS[3]
print(f"Mistral 7B: {mistral.n_layers} layers x (W - 1) + 1 = "
      f"{mistral.n_layers * (mistral.window - 1) + 1:,} positions of theoretical reach")

# %% [markdown]
# The band is $W$ wide in the first layer and widens by $W - 1$ per layer; the global token
# adds a column that every position reads from the first layer on. In a causal model a
# global token at position 0 sees only itself, so that column carries what token 0 is, not
# the whole past; Longformer's bidirectional global tokens also read everything, and then
# every position reaches every other in two layers.
#
# ## 6. Banded attention: paying only for the band
#
# A mask gives the right answer at the full price: `scaled_dot_product_attention` with a
# sliding-window mask still computes all $n^2$ scores and throws most of them away. To pay
# for the band only, cut the queries into blocks of $T$ consecutive positions. The queries
# $bT \dots bT + T - 1$ of block $b$ see no key before $bT - W + 1$ and none after
# $bT + T - 1$: a slice of $T + W - 1$ keys. With $T = W$:
#
# 1. pad the keys and values in front with $W - 1$ rows (so that every block's slice exists)
#    and the queries at the end up to a multiple of $W$;
# 2. cut the padded keys into overlapping slices of $2W - 1$ rows, one per block, starting
#    every $W$ rows (`Tensor.unfold(dim, size, step)` does this without a copy);
# 3. score each block's $W$ queries against its own slice: $(W \times D)(D \times (2W-1))$;
# 4. mask inside each block: query $r$ of a block sees slice keys $r \dots r + W - 1$ (its
#    band, in slice coordinates), and no padding key (in block 0);
# 5. softmax, multiply by the value slices, drop the padded queries.
#
# The work is $n/W$ blocks of $W \times (2W - 1)$ scores, about $2nW$ instead of $n^2$, and
# no $(n, n)$ tensor is ever built.
#
# **Exercise 7 (3 points).** Write `banded_attention(q, k, v, window)` for `q`, `k`, `v` of
# shape `(B, H, L, D)` (self-attention: the same L for all), returning `(B, H, L, D)` equal
# to scaled dot-product attention with the mask `i - window < j <= i`, for any `L` (not
# only multiples of the window). Never build an `(L, L)` tensor; use `ref.softmax`, not a
# ready-made attention function.

# %% solution id=banded
def banded_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Causal sliding-window attention in O(L·W): blocks of W queries, each against its own
    2W - 1 keys. q, k, v (B, H, L, D) -> (B, H, L, D)."""
    ### BEGIN SOLUTION
    B, H, L, D = q.shape
    W = window
    n_blocks = -(-L // W)  # ceil(L / W)
    back = n_blocks * W - L
    k_pad = F.pad(k, (0, 0, W - 1, back))  # (B, H, W - 1 + n_blocks*W, D)
    v_pad = F.pad(v, (0, 0, W - 1, back))
    k_slices = k_pad.unfold(2, 2 * W - 1, W).transpose(-2, -1)  # (B, H, nb, 2W - 1, D)
    v_slices = v_pad.unfold(2, 2 * W - 1, W).transpose(-2, -1)  # (B, H, nb, 2W - 1, D)
    q_blocks = F.pad(q, (0, 0, 0, back)).reshape(B, H, n_blocks, W, D)  # (B, H, nb, W, D)
    scores = q_blocks @ k_slices.transpose(-2, -1) / math.sqrt(D)  # (B, H, nb, W, 2W - 1)
    r = torch.arange(W, device=q.device)[:, None]  # query within its block
    c = torch.arange(2 * W - 1, device=q.device)[None, :]  # key within its slice
    band = (c >= r) & (c <= r + W - 1)  # (W, 2W - 1)
    starts = torch.arange(n_blocks, device=q.device)[:, None, None] * W  # (nb, 1, 1)
    real = starts + c >= W - 1  # (nb, 1, 2W - 1): not a front padding key
    scores = scores.masked_fill(~(band & real), float("-inf"))
    out = ref.softmax(scores, dim=-1) @ v_slices  # (B, H, nb, W, D)
    return out.reshape(B, H, n_blocks * W, D)[:, :, :L]
    ### END SOLUTION


# %% tests id=banded-tests points=3
from helpers.checks import lesson07 as checks
checks.banded_attention(banded_attention)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("07").banded_attention(banded_attention)
### END HIDDEN TESTS

# %% [markdown]
# **Banded against masked, as the sequence grows.** The course's reference
# `helpers.sliding_window.sliding_window_attention` is the same algorithm, with PyTorch's
# fused kernel inside each block. Against it, PyTorch's fused
# `scaled_dot_product_attention` given the $(n, n)$ sliding-window mask: same output, but
# its time grows as $n^2$ while the banded one grows as $n$ (the dotted lines are those two
# slopes, through the first measurement).

# %%
WINDOW_TIMED = 128
LENGTHS = [512, 1024, 2048] if SHORT else [512, 1024, 2048, 4096]


def best_time(fn, repeats: int = 3) -> float:
    """The fastest of a few runs, in milliseconds (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return min(times)


timings = {"banded (O(n·W))": [], "masked SDPA (O(n²))": []}
for n in LENGTHS:
    q_t, k_t, v_t = torch.randn(3, 1, 4, n, 64, device=device)
    mask_t = ref.sliding_window_mask(n, WINDOW_TIMED, device=device)
    timings["banded (O(n·W))"].append(best_time(
        lambda: sliding_window_attention(q_t, k_t, v_t, WINDOW_TIMED)))
    timings["masked SDPA (O(n²))"].append(best_time(
        lambda: F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask_t)))
difference = (sliding_window_attention(q_t, k_t, v_t, WINDOW_TIMED)
              - F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask_t)).abs().max()
print(f"n = {LENGTHS[-1]}: banded {timings['banded (O(n·W))'][-1]:.0f} ms, masked "
      f"{timings['masked SDPA (O(n²))'][-1]:.0f} ms; outputs differ by {difference:.1e}")

ax = curves(LENGTHS, timings, "sequence length n", "time (ms, best of 3)",
            f"masked attention grows like n², banded like n (W = {WINDOW_TIMED})",
            log_x=True, log_y=True)
for name, slope in (("banded (O(n·W))", 1), ("masked SDPA (O(n²))", 2)):
    first = timings[name][0]
    ax.plot(LENGTHS, [first * (n / LENGTHS[0]) ** slope for n in LENGTHS], ":", color="gray")
plt.show()

# %% [markdown]
# ## 7. All together: Mistral in the course's `Llama`
#
# `helpers.transformer.Llama` is the decoder of Llama 2 and Mistral: RMSNorm, RoPE, a SwiGLU
# feed-forward (Shazeer, 2020, *GLU Variants Improve Transformer*), grouped-query attention
# and an optional sliding window. `Llama.from_hf` loads the weights of Hugging Face's
# `LlamaForCausalLM` and `MistralForCausalLM`, and the course's tests check that its logits
# and greedy tokens are theirs. Here a tiny random Mistral-shaped model with a window of 8
# generates far past its window with a KV cache: the cached generation feeds one token per
# step and still gives exactly the tokens of rerunning the whole sequence each step, because
# keys are cached already rotated and the window is applied to whatever the cache returns.
# The cache here keeps every token; a cache that drops what falls out of the window (lesson
# 09) would hold only the last 8 per layer.

# %%
torch.manual_seed(0)
mistral_like = Llama(vocab_size=100, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2,
                     window=8).to(device).eval()
prompt = torch.randint(0, 100, (1, 5), device=device)
cache = KVCache(len(mistral_like.blocks))
cached = mistral_like.generate(prompt, 40, cache=cache)
uncached = mistral_like.generate(prompt, 40, use_cache=False)
print(f"window {mistral_like.window}, {cached.shape[1]} tokens: cached and uncached identical: "
      f"{torch.equal(cached, uncached)}; the cache saw {cache.seq_len} tokens and holds "
      f"{cache.nbytes:,} bytes")

# %% [markdown]
# ## What's next
#
# GQA and windows make each attention layer cheaper on one device. Lesson 08 goes further in
# two directions: **ring attention** splits one long sequence over several devices, each
# keeping a block of keys and values and passing it around the ring, so the context can grow
# with the number of devices; and **linear attention** replaces the softmax with a kernel
# feature map, so that attention becomes a running sum whose cost grows as $n$ even without
# a window.
