# %% [markdown]
# # Lesson 06 — FlashAttention: exact attention without the $n \times n$ matrix
#
# Lesson 05 stacked attention into BERT, GPT and T5 and trained them on sequences of a few
# dozen tokens. Real models read thousands to millions of tokens, and there the attention of
# lessons 02 to 05 breaks down: it builds the matrix of scores $QK^\top$, one number per
# (query, key) pair, in every head of every layer. Its memory grows like $n^2$, and on a GPU
# the time goes less into the arithmetic than into *moving* that matrix in and out of memory.
#
# FlashAttention (Dao, Fu, Ermon, Rudra & Ré, 2022, *FlashAttention: Fast and
# Memory-Efficient Exact Attention with IO-Awareness*) computes exactly the same output
# without ever storing the matrix: it cuts $Q$, $K$ and $V$ into blocks that fit in the
# GPU's small on-chip memory, and combines the blocks' partial softmaxes with an exact
# rescaling trick, the *online softmax*. You will build it piece by piece:
#
# 1. `hbm_accesses`: the IO cost model that explains why it is faster;
# 2. `merge_softmax_states`: the online softmax, merging two partial results exactly;
# 3. `tiled_attention`: the tiled forward, returning the output and the logsumexp;
# 4. `causal_tiled_attention`: the causal version, which skips the blocks above the
#    diagonal and counts them;
# 5. `tiled_attention_backward`: the gradients by *recomputing* the weights, block by block;
# 6. `FlashAttention`: a `torch.autograd.Function` that ties them together, so that
#    `loss.backward()` works.
#
# Then you measure time and memory against the materialised attention of lesson 02 and
# PyTorch's own fused kernel, and (if Triton is installed) write the forward as a real GPU
# kernel that Triton's interpreter runs on your CPU.

# %%
try:
    import helpers
except ImportError:  # Colab or a bare kernel: install the course package
    %pip install -q "attention-course @ git+COURSE_REPOSITORY"


# %% id=imports
import importlib.util
import math
import os
import statistics
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor

from helpers import flash
from helpers.attention import causal_mask, scaled_dot_product_attention
from helpers.device import (get_device, is_autograding, one_cpu_thread, peak_memory,
                            seed_everything)
from helpers.plotting import attention_heatmap, curves

device = get_device()
seed_everything(0)
SHORT = is_autograding()  # the autograder measures at smaller sizes
HAVE_TRITON = importlib.util.find_spec("triton") is not None  # the optional extra, section 9
if HAVE_TRITON and device.type != "cuda":
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined: Triton reads it then
print(f"running on {device}; Triton {'found' if HAVE_TRITON else 'not installed'}")


def median_seconds(fn, repeats: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# %% [markdown]
# ## 1. Attention's memory grows like $n^2$
#
# Standard attention, as lesson 02 wrote it, computes for each head
#
# $$ Z = QK^\top \cdot \tfrac{1}{\sqrt{d}} \in \mathbb{R}^{L \times S}, \qquad
#    P = \mathrm{softmax}(Z), \qquad O = PV \in \mathbb{R}^{L \times d_v}, $$
#
# for $L$ queries and $S$ keys, and keeps the scores $Z$ and the weights $P$ in memory:
# autograd needs $P$ for the backward pass. $Q$, $K$, $V$ and $O$ grow like $n$ (the
# sequence length); $Z$ and $P$ like $n^2$. The next cell prints
# how much memory the $n \times n$ matrix of one layer takes, in float32 with 8 heads, next
# to the $Q$, $K$, $V$ it is computed from.

# %%
HEADS, HEAD_DIM, FLOAT32 = 8, 64, 4  # a typical layer; bytes per float32
for n in (1_024, 8_192, 32_768, 131_072):
    matrix = HEADS * n * n * FLOAT32
    qkv = 3 * HEADS * n * HEAD_DIM * FLOAT32
    print(f"n = {n:>7,}: Q, K, V {qkv / 2**20:>8,.1f} MiB; one n x n matrix of weights "
          f"{matrix / 2**30:>8,.2f} GiB ({matrix / qkv:,.0f}x as much)")


# %% [markdown]
# At 8k tokens the weights of a single layer outweigh $Q$, $K$ and $V$ by the factor printed
# above; at 128k tokens (a long-context model today) they are more than any single GPU
# holds. And
# nothing in the *output* needs them: each output row is a weighted average of the values,
# and the weights of one row only need that row's scores. FlashAttention computes the rows'
# averages without keeping any full row of weights at all.
#
# ## 2. Where the time goes: HBM, SRAM and the IO model
#
# A GPU has two kinds of memory that matter here. Dao et al. (2022, Figure 1) give the
# numbers for an NVIDIA A100: 40–80 GB of **HBM** (high-bandwidth memory, off the chip) read
# at about 1.5–2.0 TB/s, and about 20 MB of **SRAM** (192 KB next to each of its 108
# streaming multiprocessors) read at about 19 TB/s. Arithmetic happens only on data in SRAM
# and registers: a kernel loads its inputs from HBM, computes, and writes its result back.
#
# The A100 multiplies half-precision matrices at 312 TFLOP/s but does other arithmetic
# (exponentials, maxima, sums) at only 19.5 TFLOP/s (Dao, 2023), and it moves about
# $1.5 \cdot 10^{12}$ bytes per second. The cell below turns these into the numbers that
# matter: how many operations a kernel must do per byte it loads to keep the arithmetic
# busy, and how many elements fit in one multiprocessor's SRAM.

# %%
A100_MATMUL_FLOPS, A100_OTHER_FLOPS, A100_HBM_BYTES_PER_S = 312e12, 19.5e12, 1.5e12
A100_SRAM_PER_SM, FLOAT16 = 192 * 1024, 2  # bytes
print(f"operations per byte loaded to keep the A100 busy: "
      f"{A100_MATMUL_FLOPS / A100_HBM_BYTES_PER_S:.0f}")
print(f"a non-matmul FLOP costs {A100_MATMUL_FLOPS / A100_OTHER_FLOPS:.0f}x a matmul FLOP")
print(f"one multiprocessor's SRAM holds M = {A100_SRAM_PER_SM // FLOAT16:,} float16 elements; "
      f"a block of 128 queries x 64 dims takes {128 * 64 * FLOAT16 // 1024} KB of it")


# %% [markdown]
# A matrix product of large matrices does far more operations per byte than the first line
# asks (each loaded number is used $d$ times or more); the softmax, the masking and the
# dropout of attention do a handful per element. They are **memory-bound**: their time is
# the time to read and write their operands. Dao et al. therefore count **HBM accesses**
# rather than FLOPs.
#
# **Standard attention** (their Algorithm 0) runs as three kernels: read $Q$ and $K$, write
# $Z$; read $Z$, write $P$; read $P$ and $V$, write $O$. Counting elements,
#
# $$ \text{standard} = \underbrace{Ld + Sd}_{\text{read } Q, K} + \underbrace{LS}_{\text{write } Z}
#    + \underbrace{2LS}_{\text{read } Z, \text{ write } P} + \underbrace{LS + Sd_v}_{\text{read } P, V}
#    + \underbrace{Ld_v}_{\text{write } O} = Ld + Sd + 4LS + Sd_v + Ld_v . $$
#
# **Tiled attention** in FlashAttention-2's loop order (Dao, 2023, *FlashAttention-2: Faster
# Attention with Better Parallelism and Work Partitioning*) loads a block of $B_q$ queries
# into SRAM once, streams *every* block of keys and values past it, and writes the block's
# output and its logsumexp (section 4) once. Nothing of size $L \times S$ ever reaches HBM;
# the price is that $K$ and $V$ are read again for each of the $\lceil L / B_q \rceil$
# query blocks:
#
# $$ \text{tiled} = Ld + \left\lceil \tfrac{L}{B_q} \right\rceil S\,(d + d_v) + Ld_v + L . $$
#
# The larger the query block that fits in SRAM, the fewer passes over $K$ and $V$. With
# SRAM of $M$ elements (the $M$ printed above), blocks of about $M/d$ rows fit, and the
# traffic becomes $\Theta(n^2 d^2 / M)$ against standard attention's $\Theta(nd + n^2)$:
# for the usual $d = 64$ to $128$, many times less (Dao et al., 2022, Theorem 2, which also
# proves that no exact attention algorithm can do asymptotically better for all $M$).
#
# **Exercise 1 (2 points).** Write `hbm_accesses(L, S, D, Dv, block_q)` that returns the
# pair `(standard, tiled)` of element counts above, as Python integers. The last query block
# may be ragged: $\lceil L / B_q \rceil$ blocks in all.

# %% solution id=hbm-accesses
def hbm_accesses(L: int, S: int, D: int, Dv: int, block_q: int) -> tuple[int, int]:
    """Elements read from and written to HBM by one attention forward (Dao et al., 2022):
    (standard attention, tiled attention with query blocks of ``block_q`` rows)."""
    ### BEGIN SOLUTION
    standard = L * D + S * D + 4 * L * S + S * Dv + L * Dv
    tiled = L * D + math.ceil(L / block_q) * S * (D + Dv) + L * Dv + L
    return standard, tiled
    ### END SOLUTION


# %% tests id=hbm-accesses-tests points=2
from helpers.checks import lesson06 as checks
checks.hbm_accesses(hbm_accesses)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("06").hbm_accesses(hbm_accesses)
### END HIDDEN TESTS

# %% [markdown]
# The model against the block size, for one head at $n = 4096$ and $d = 64$ (the course's
# reference, `helpers.flash.hbm_accesses`, so this plot does not depend on your answer).
# The second axis converts elements into time at the A100's HBM bandwidth in float16: the
# floor that memory traffic alone puts under each variant.

# %%
N_MODEL, D_MODEL_HEAD = 4096, 64
BLOCKS = [16, 32, 64, 128, 256, 512, 1024]
model = [flash.hbm_accesses(N_MODEL, N_MODEL, D_MODEL_HEAD, D_MODEL_HEAD, b) for b in BLOCKS]
standard_elements = model[0].standard
for block, counts in zip(BLOCKS, model):
    print(f"block_q = {block:>4}: tiled {counts.flash / 1e6:>6.1f} M elements, "
          f"{counts.standard / counts.flash:>5.1f}x fewer than standard "
          f"({counts.standard / 1e6:.1f} M)")
microseconds = 1e6 * FLOAT16 / A100_HBM_BYTES_PER_S  # per element
ax = curves(BLOCKS, {"tiled (FlashAttention-2 order)": [c.flash / 1e6 for c in model],
                     "standard (writes Z and P)": [standard_elements / 1e6] * len(BLOCKS)},
            "query block size B_q (rows kept in SRAM)", "HBM reads + writes (M elements)",
            f"bigger query blocks, fewer passes over K and V (n = {N_MODEL}, d = {D_MODEL_HEAD})",
            log_x=True, log_y=True)
seconds_axis = ax.secondary_yaxis("right", functions=(lambda m: m * 1e6 * microseconds,
                                                     lambda us: us / (1e6 * microseconds)))
seconds_axis.set_ylabel("μs at 1.5 TB/s (float16)")
plt.show()

# %% [markdown]
# Standard attention's $4n^2$ term dwarfs everything else; the tiled count falls like
# $1/B_q$ until the one-time reads of $Q$ and writes of $O$ dominate. A block of 128
# queries takes a small part of a multiprocessor's SRAM (printed in the cell before the
# exercise), leaving room for a block of $K$ and $V$ and one tile of scores.
#
# ## 3. The online softmax
#
# Tiling the product $QK^\top$ is easy. The softmax is the problem: each weight is divided
# by a sum over the *whole* row, $p_{ij} = e^{s_{ij}} / \sum_{j'} e^{s_{ij'}}$, and a
# block of keys only sees part of that sum. Milakov and Gimelshein (2018, *Online normalizer
# calculation for softmax*) showed that the sum can be accumulated block by block,
# correcting it as it goes.
#
# For one query and a set $A$ of keys, keep three numbers (the third is a vector):
#
# $$ m_A = \max_{j \in A} s_j, \qquad \ell_A = \sum_{j \in A} e^{s_j - m_A}, \qquad
#    \mathrm{acc}_A = \sum_{j \in A} e^{s_j - m_A}\, v_j . $$
#
# The subtracted maximum keeps every exponential in $(0, 1]$, as in lesson 02's stable
# softmax, and attention over $A$ is $\mathrm{acc}_A / \ell_A$. Two disjoint sets merge into
# the state of $A \cup B$: with $m = \max(m_A, m_B)$,
#
# $$ \ell = e^{m_A - m}\,\ell_A + e^{m_B - m}\,\ell_B, \qquad
#    \mathrm{acc} = e^{m_A - m}\,\mathrm{acc}_A + e^{m_B - m}\,\mathrm{acc}_B . $$
#
# **Why this is exact.** Every term of $\ell_A$ is $e^{s_j - m_A}$, and
# $e^{s_j - m_A} \cdot e^{m_A - m} = e^{s_j - m}$: multiplying by $e^{m_A - m}$ turns each
# term into the one it would have been had $m$ been the maximum from the start. It is an
# identity, not an approximation; the only error is floating-point rounding. The same factor
# must multiply the accumulator, whose terms carry the same $e^{s_j - m_A}$: rescale one
# without the other and the output is wrong by exactly that factor.
#
# An **empty** state (no keys yet, or a query that may see none of them) is $m = -\infty$,
# $\ell = 0$, $\mathrm{acc} = 0$: it merges as a neutral element, since $e^{-\infty} = 0$.
# Merging two empty states must not compute $-\infty - (-\infty)$, which is NaN.
#
# **Exercise 2 (3 points).** Write `merge_softmax_states(m_a, l_a, acc_a, m_b, l_b, acc_b)`
# returning the merged `(m, l, acc)`: `m`, `l` of shape `(..., L)`, `acc` of shape
# `(..., L, Dv)`, one state per query. Empty states ($m = -\infty$) must merge without NaN.

# %% solution id=merge-states
def merge_softmax_states(m_a: Tensor, l_a: Tensor, acc_a: Tensor, m_b: Tensor, l_b: Tensor,
                         acc_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The online-softmax state of keys A ∪ B from those of A and B (Milakov & Gimelshein,
    2018). m, l: (..., L); acc: (..., L, Dv). Exact: each side is rescaled by e^{m_side - m}."""
    ### BEGIN SOLUTION
    m = torch.maximum(m_a, m_b)  # (..., L)
    shift = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # both empty: no NaN
    scale_a, scale_b = (m_a - shift).exp(), (m_b - shift).exp()  # (..., L), 0 if empty
    l = scale_a * l_a + scale_b * l_b
    acc = scale_a[..., None] * acc_a + scale_b[..., None] * acc_b  # (..., L, Dv)
    return m, l, acc
    ### END SOLUTION


# %% tests id=merge-states-tests points=3
from helpers.checks import lesson06 as checks
checks.merge_softmax_states(merge_softmax_states)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("06").merge_softmax_states(merge_softmax_states)
### END HIDDEN TESTS

# %% [markdown]
# Merge is associative and commutative, so the blocks can arrive in any order: ring
# attention (lesson 08) sends them around a ring of GPUs in a different order on each. The
# next cell cuts 1,000 keys into uneven blocks, merges their states in a shuffled order with
# your function, and compares with attention over all keys at once in float64.

# %%
scores_demo = torch.randn(3, 1000, dtype=torch.float64, device=device) * 4  # (L=3, S)
values_demo = torch.randn(1000, 5, dtype=torch.float64, device=device)  # (S, Dv)
cuts = [0, 7, 300, 301, 650, 1000]
m_run = torch.full((3,), -math.inf, dtype=torch.float64, device=device)  # the empty state
l_run, acc_run = torch.zeros_like(m_run), torch.zeros(3, 5, dtype=torch.float64, device=device)
for block in torch.randperm(len(cuts) - 1).tolist():
    s = scores_demo[:, cuts[block]:cuts[block + 1]]  # (3, block size)
    m_block = s.amax(dim=-1)
    p = (s - m_block[:, None]).exp()
    m_run, l_run, acc_run = merge_softmax_states(
        m_run, l_run, acc_run, m_block, p.sum(-1), p @ values_demo[cuts[block]:cuts[block + 1]])
exact = torch.softmax(scores_demo, dim=-1) @ values_demo
print(f"merged in a shuffled order vs all at once: max |difference| "
      f"{(acc_run / l_run[:, None] - exact).abs().max().item():.1e} (float64)")


# %% [markdown]
# ## 4. The tiled forward, and the logsumexp
#
# Now the algorithm (FlashAttention-2, Dao 2023, Algorithm 1). Cut $Q$ into blocks of
# $B_q$ rows and $K$, $V$ into blocks of $B_k$ rows. For each query block $Q_i$:
#
# 1. start from the empty state: $m = -\infty$, $\ell = 0$, $\mathrm{acc} = 0$ (one per row);
# 2. for each key block $K_j, V_j$: compute the tile of scores
#    $Z_{ij} = Q_i K_j^\top \cdot \text{scale}$ ($B_q \times B_k$), and merge its state into
#    the running one: $m_{\text{new}} = \max(m, \mathrm{rowmax}\, Z_{ij})$,
#    $P = e^{Z_{ij} - m_{\text{new}}}$,
#    $\ell \leftarrow e^{m - m_{\text{new}}}\ell + \mathrm{rowsum}\,P$,
#    $\mathrm{acc} \leftarrow e^{m - m_{\text{new}}}\mathrm{acc} + PV_j$;
# 3. write $O_i = \mathrm{acc}/\ell$ and $\mathrm{lse}_i = m + \log \ell$.
#
# Only one $B_q \times B_k$ tile of scores exists at a time. The last value,
# $\mathrm{lse}_i = \log \sum_j e^{s_{ij}}$, the **logsumexp** of each row, is all the
# softmax normaliser there is: any weight can be recomputed later as
# $p_{ij} = e^{s_{ij} - \mathrm{lse}_i}$ from $q_i$ and $k_j$ alone. The backward pass
# (section 6) relies on it; it costs one number per query.
#
# **Loop order.** The first FlashAttention put the key blocks in the *outer* loop and the
# query blocks inside, so each query block's $O$, $\ell$ and $m$ went back to HBM after
# every key block. FlashAttention-2 swaps the loops: a query block's state stays in SRAM
# and registers for the whole inner loop and is written once; the query blocks are
# independent, so different GPU thread blocks process them in parallel (over the sequence,
# not only over batch and heads); and the division by $\ell$ happens once at the end, not
# after every block, saving non-matrix-multiply FLOPs, each of which costs many matmul FLOPs
# (section 2 printed how many on an A100). The algorithm above is already in that order.
#
# **Exercise 3 (4 points).** Write `tiled_attention(q, k, v, block_q=64, block_k=64,
# scale=None)` for `q` `(..., L, D)`, `k` `(..., S, D)`, `v` `(..., S, Dv)`, returning
# `(out, lse)` with `out` `(..., L, Dv)` and `lse` `(..., L)`, both in the dtype of `q`;
# `scale` defaults to $1/\sqrt{D}$. Any $L$ and $S$ (not necessarily equal), any block
# sizes (the last block of each may be ragged; a block may be larger than the whole
# sequence). Never hold more than one tile of scores: the check watches the size of every
# tensor your code creates, and building the $L \times S$ matrix fails. Do not call
# `F.scaled_dot_product_attention` or anything from `helpers.flash` (the grader checks).

# %% solution id=tiled-attention
def tiled_attention(q: Tensor, k: Tensor, v: Tensor, block_q: int = 64, block_k: int = 64,
                    scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Attention by (block_q, block_k) tiles with the online softmax (Dao, 2023, Alg. 1).

    q (..., L, D), k (..., S, D), v (..., S, Dv) -> out (..., L, Dv), lse (..., L).
    """
    ### BEGIN SOLUTION
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    L, S = q.shape[-2], k.shape[-2]
    out = q.new_empty(*q.shape[:-1], v.shape[-1])  # (..., L, Dv)
    lse = q.new_empty(q.shape[:-1])  # (..., L)
    for q_start in range(0, L, block_q):
        rows = slice(q_start, q_start + block_q)
        q_i = q[..., rows, :]  # (..., bq, D)
        m = q_i.new_full(q_i.shape[:-1], -math.inf)  # (..., bq): running max
        l = q_i.new_zeros(q_i.shape[:-1])  # (..., bq): running sum of exp(s - m)
        acc = q_i.new_zeros(*q_i.shape[:-1], v.shape[-1])  # (..., bq, Dv)
        for k_start in range(0, S, block_k):
            cols = slice(k_start, k_start + block_k)
            s = q_i @ k[..., cols, :].transpose(-2, -1) * scale  # (..., bq, bk): one tile
            m_new = torch.maximum(m, s.amax(dim=-1))
            p = (s - m_new[..., None]).exp()  # (..., bq, bk)
            alpha = (m - m_new).exp()  # rescales the old state; 0 on the first block
            l = alpha * l + p.sum(dim=-1)
            acc = alpha[..., None] * acc + p @ v[..., cols, :]
            m = m_new
        out[..., rows, :] = acc / l[..., None]
        lse[..., rows] = m + l.log()
    return out, lse
    ### END SOLUTION


# %% tests id=tiled-attention-tests points=4
from helpers.checks import lesson06 as checks
checks.tiled_attention(tiled_attention)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("06").tiled_attention(tiled_attention)
### END HIDDEN TESTS

# %% [markdown]
# ## 5. Causal attention: skip what the mask hides
#
# A causal mask hides every key after the query (lesson 04). The course's mask is aligned
# at the bottom right: with $L$ queries that are the *last* $L$ of $S$ positions, query $i$
# sees keys $0 \ldots S - L + i$. Tiles then come in three kinds:
#
# - **wholly above the diagonal**: no query of the block sees any key of it. The tile would
#   be all $-\infty$; FlashAttention **skips** it, never computing it. Since query block
#   $[q_0, q_1)$ sees keys up to $S - L + q_1 - 1$, it visits the key blocks that start at
#   or before that, and no others;
# - **on the diagonal**: some pairs are hidden, so the tile is masked, with a mask built
#   from the tile's own positions (row $i$ sees column $j$ iff $j \le S - L + i$ in
#   *global* positions);
# - **wholly below**: every pair is visible, no mask needed.
#
# For $L = S$ about half the tiles are skipped, so causal attention costs about half the
# work. With $L > S$ the first $L - S$ queries see no key at all: their output is zero and
# their logsumexp $-\infty$ (the empty state), and if a whole query block is in that case,
# all of its tiles are skipped. The picture shows one schedule.

# %%
L_DEMO, S_DEMO, BQ_DEMO, BK_DEMO = 40, 56, 8, 8
tile_kind = torch.zeros(math.ceil(L_DEMO / BQ_DEMO), math.ceil(S_DEMO / BK_DEMO))
full_mask = causal_mask(L_DEMO, S_DEMO)  # (L, S), only to draw the picture
for i in range(tile_kind.shape[0]):
    for j in range(tile_kind.shape[1]):
        tile = full_mask[i * BQ_DEMO:(i + 1) * BQ_DEMO, j * BK_DEMO:(j + 1) * BK_DEMO]
        tile_kind[i, j] = 1.0 if tile.all() else 0.5 if tile.any() else 0.0
counts = flash.causal_block_counts(L_DEMO, S_DEMO, BQ_DEMO, BK_DEMO)
print(f"L = {L_DEMO}, S = {S_DEMO}, blocks {BQ_DEMO} x {BK_DEMO}: {counts.computed} tiles "
      f"computed ({int((tile_kind == 0.5).sum())} of them masked), {counts.skipped} skipped")
ax = attention_heatmap(tile_kind, value_label="0 skipped · 0.5 masked · 1 full",
                       title="causal tiles: the ones above the diagonal are never computed")
ax.set_xlabel(f"key block ({BK_DEMO} keys each)")
ax.set_ylabel(f"query block ({BQ_DEMO} queries each)")
plt.show()

# %% [markdown]
# **Exercise 4 (3 points).** Write `causal_tiled_attention(q, k, v, block_q=64, block_k=64,
# scale=None)` returning `(out, lse, n_skipped)`: causal attention with the bottom-right
# mask, where `n_skipped` is the number of (query block, key block) tiles you skipped. Skip
# every tile wholly above the diagonal (the check counts the multiply-adds you do), build
# each diagonal tile's mask from its global positions (never the whole $L \times S$ mask),
# and give queries that see no key a zero output and $\mathrm{lse} = -\infty$, not NaN.
# Shapes, dtypes and the rules of exercise 3 still hold.

# %% solution id=causal-tiled
def causal_tiled_attention(q: Tensor, k: Tensor, v: Tensor, block_q: int = 64,
                           block_k: int = 64, scale: float | None = None
                           ) -> tuple[Tensor, Tensor, int]:
    """Causal (bottom-right) tiled attention that skips the tiles above the diagonal.

    q (..., L, D), k (..., S, D), v (..., S, Dv) -> out (..., L, Dv), lse (..., L) and the
    number of tiles skipped.
    """
    ### BEGIN SOLUTION
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    L, S = q.shape[-2], k.shape[-2]
    out = q.new_zeros(*q.shape[:-1], v.shape[-1])  # (..., L, Dv): blind queries stay 0
    lse = q.new_full(q.shape[:-1], -math.inf)  # (..., L)
    n_skipped = 0
    for q_start in range(0, L, block_q):
        q_end = min(q_start + block_q, L)
        last_key = S - L + q_end - 1  # the last key the block's last query sees
        q_i = q[..., q_start:q_end, :]  # (..., bq, D)
        m = q_i.new_full(q_i.shape[:-1], -math.inf)
        l = q_i.new_zeros(q_i.shape[:-1])
        acc = q_i.new_zeros(*q_i.shape[:-1], v.shape[-1])
        for k_start in range(0, S, block_k):
            if k_start > last_key:  # wholly above the diagonal
                n_skipped += 1
                continue
            k_end = min(k_start + block_k, S)
            s = q_i @ k[..., k_start:k_end, :].transpose(-2, -1) * scale  # (..., bq, bk)
            rows = torch.arange(q_start, q_end, device=q.device)[:, None]
            cols = torch.arange(k_start, k_end, device=q.device)[None, :]
            s = s.masked_fill(cols > S - L + rows, -math.inf)  # this tile of the mask
            m_new = torch.maximum(m, s.amax(dim=-1))
            shift = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            p = (s - shift[..., None]).exp()
            alpha = (m - shift).exp()
            l = alpha * l + p.sum(dim=-1)
            acc = alpha[..., None] * acc + p @ v[..., k_start:k_end, :]
            m = m_new
        seen = l > 0
        out[..., q_start:q_end, :] = acc / torch.where(seen, l, torch.ones_like(l))[..., None]
        lse[..., q_start:q_end] = torch.where(seen, m + l.log(), m)  # -inf if nothing seen
    return out, lse, n_skipped
    ### END SOLUTION


# %% tests id=causal-tiled-tests points=3
from helpers.checks import lesson06 as checks
checks.causal_tiled_attention(causal_tiled_attention)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("06").causal_tiled_attention(causal_tiled_attention)
### END HIDDEN TESTS

# %% [markdown]
# How much work does skipping save at a real length? The schedule is arithmetic
# (`helpers.flash.causal_block_counts` computes it); the second line times the course's fast
# tiled forward with and without the mask.

# %%
N_CAUSAL, BLOCK_CAUSAL = 8192, 128
counts = flash.causal_block_counts(N_CAUSAL, N_CAUSAL, BLOCK_CAUSAL, BLOCK_CAUSAL)
total_tiles = counts.computed + counts.skipped
print(f"n = {N_CAUSAL}, {BLOCK_CAUSAL} x {BLOCK_CAUSAL} tiles: {counts.skipped} of "
      f"{total_tiles} skipped ({counts.skipped / total_tiles:.1%})")
n_time = 512 if SHORT else 2048
q_t, k_t, v_t = (torch.randn(1, 4, n_time, 64, device=device) for _ in range(3))
with one_cpu_thread():  # one core for both: a fair count of the work, less noise
    seconds = {causal: median_seconds(lambda: flash.flash_attention_forward(
        q_t, k_t, v_t, causal=causal, block_q=128, block_k=128)) for causal in (False, True)}
print(f"n = {n_time}: causal forward {seconds[True] * 1e3:.0f} ms, full "
      f"{seconds[False] * 1e3:.0f} ms ({seconds[False] / seconds[True]:.1f}x faster causal)")


# %% [markdown]
# ## 6. The backward pass, by recomputation
#
# Autograd through standard attention stores $P$, the $L \times S$ weights, for the
# backward pass. FlashAttention stores only $Q$, $K$, $V$, $O$ and the logsumexp, all
# $O(n)$, and *recomputes* each tile of $P$ when it needs it, from $q_i$, $k_j$ and
# $\mathrm{lse}_i$. This costs another $QK^\top$ worth of FLOPs, and still makes the backward
# *faster* on a GPU, because reading $P$ back from HBM would take longer (Dao et al., 2022,
# section 3.1).
#
# The gradients, for $O = PV$, $P = \mathrm{softmax}(Z)$, $Z = QK^\top \cdot$ scale and an
# incoming gradient $dO$:
#
# $$ dV = P^\top dO, \qquad dP = dO\,V^\top, \qquad
#    dZ_{ij} = P_{ij}\,(dP_{ij} - \delta_i), \qquad
#    dQ = dZ\,K \cdot \text{scale}, \qquad dK = dZ^\top Q \cdot \text{scale}, $$
#
# where $\delta_i = \sum_j P_{ij}\, dP_{ij}$ is the softmax's correction (lesson 02's
# Jacobian $\partial p_i / \partial s_j = p_i(\delta_{ij} - p_j)$ applied to $dP$). A row sum
# over all keys sounds like it needs the whole row of $P$, but
# $\sum_j P_{ij}\,(dO_i \cdot v_j) = dO_i \cdot \sum_j P_{ij} v_j = dO_i \cdot O_i$:
# $\delta = \mathrm{rowsum}(dO \odot O)$, computed once from the saved output. Every other
# formula is local to a tile: $P_{ij} = e^{Z_{ij} - \mathrm{lse}_i}$ recomputed, then its
# share of $dV_j$, $dK_j$ and $dQ_i$.
#
# FlashAttention-2's backward loops over key blocks outside, so that $dK_j$ and $dV_j$ are
# finished in one pass and written once, and over query blocks inside, adding each tile's
# share into $dQ_i$.
#
# **Exercise 5 (4 points).** Write `tiled_attention_backward(q, k, v, out, lse, dout,
# block_q=64, block_k=64, scale=None)` that returns `(dq, dk, dv)`, the gradients of
# (non-causal) attention, shaped like `q`, `k`, `v`, from the saved `out` `(..., L, Dv)` and
# `lse` `(..., L)` and the incoming gradient `dout` `(..., L, Dv)`. As in exercise 3: any
# shapes and blocks, never more than one tile of weights at a time, no calls to
# `torch.autograd`, SDPA or `helpers.flash`.

# %% solution id=tiled-backward
def tiled_attention_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             dout: Tensor, block_q: int = 64, block_k: int = 64,
                             scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of attention, recomputing each tile of weights as exp(s - lse)
    (Dao et al., 2022; key blocks outer as in Dao, 2023)."""
    ### BEGIN SOLUTION
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    L, S = q.shape[-2], k.shape[-2]
    delta = (dout * out).sum(dim=-1)  # (..., L): rowsum(dP ⊙ P) = rowsum(dO ⊙ O)
    dq = torch.zeros_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for k_start in range(0, S, block_k):
        cols = slice(k_start, k_start + block_k)
        k_j, v_j = k[..., cols, :], v[..., cols, :]  # (..., bk, D), (..., bk, Dv)
        dk_j, dv_j = torch.zeros_like(k_j), torch.zeros_like(v_j)
        for q_start in range(0, L, block_q):
            rows = slice(q_start, q_start + block_q)
            s = q[..., rows, :] @ k_j.transpose(-2, -1) * scale  # (..., bq, bk)
            p = (s - lse[..., rows, None]).exp()  # the true weights, recomputed
            dv_j = dv_j + p.transpose(-2, -1) @ dout[..., rows, :]
            dp = dout[..., rows, :] @ v_j.transpose(-2, -1)  # (..., bq, bk)
            ds = p * (dp - delta[..., rows, None])
            dq[..., rows, :] += ds @ k_j * scale
            dk_j = dk_j + ds.transpose(-2, -1) @ q[..., rows, :] * scale
        dk[..., cols, :], dv[..., cols, :] = dk_j, dv_j
    return dq, dk, dv
    ### END SOLUTION


# %% tests id=tiled-backward-tests points=4
from helpers.checks import lesson06 as checks
checks.tiled_attention_backward(tiled_attention_backward)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("06").tiled_attention_backward(tiled_attention_backward)
### END HIDDEN TESTS

# %% [markdown]
# ## 7. Tying it together: a `torch.autograd.Function`
#
# Autograd would happily differentiate the tiled loop itself, but it would save every tile
# of $P$ it computed: the $L \times S$ matrix again, in pieces. A
# `torch.autograd.Function` replaces autograd's bookkeeping with ours: its `forward(ctx,
# ...)` runs without recording a graph and saves what the backward needs with
# `ctx.save_for_backward(...)` (other values can be set as attributes of `ctx`); its
# `backward(ctx, grad_output)` returns one gradient per input of `forward`, `None` for
# inputs that are not tensors. `FlashAttention.apply(q, k, v, causal)` then behaves like
# any differentiable PyTorch function.
#
# **Exercise 6 (2 points).** Write the class `FlashAttention` with `forward(ctx, q, k, v,
# causal=False)` returning `out` and a `backward` that returns the gradients of `q`, `k`
# and `v`. Use the course's `flash.flash_attention_reference(q, k, v, causal)` (returns
# `(out, lse)`, the loop of exercises 3 and 4) and `flash.flash_attention_backward(q, k, v,
# out, lse, dout, causal)`, so that this exercise does not depend on your earlier ones.
# Save only what the backward needs, never an $L \times S$ tensor (the check looks), and do
# not call `flash.flash_attention`, `flash.flash_attention_forward` or `flash.FlashAttention`,
# the course's own version of this class.

# %% solution id=flash-function
class FlashAttention(torch.autograd.Function):
    """Tiled attention whose backward recomputes the weights: saves q, k, v, out and lse."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
        ### BEGIN SOLUTION
        out, lse = flash.flash_attention_reference(q, k, v, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        return out
        ### END SOLUTION

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:
        ### BEGIN SOLUTION
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash.flash_attention_backward(q, k, v, out, lse, dout, ctx.causal)
        return dq, dk, dv, None  # no gradient for `causal`
        ### END SOLUTION


# %% tests id=flash-function-tests points=2
from helpers.checks import lesson06 as checks
checks.flash_function(FlashAttention)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("06").flash_function(FlashAttention)
### END HIDDEN TESTS

# %% [markdown]
# The course's `flash.flash_attention(q, k, v, causal)` is this class with the fast tiled
# forward of `helpers.flash` inside. One training step's memory, forward and backward,
# against autograd through lesson 02's materialised attention:

# %%
n_grad = 256 if SHORT else 512
q_g, k_g, v_g = (torch.randn(1, 4, n_grad, 64, device=device, requires_grad=True)
                 for _ in range(3))


def training_step(attend) -> None:
    """One forward and backward through ``attend(q, k, v) -> out``."""
    attend(q_g, k_g, v_g).square().sum().backward()
    for t in (q_g, k_g, v_g):
        t.grad = None


step_bytes = {
    "materialised (autograd)": peak_memory(
        lambda: training_step(lambda q, k, v: scaled_dot_product_attention(q, k, v)[0]), device),
    "FlashAttention (recompute)": peak_memory(
        lambda: training_step(lambda q, k, v: flash.flash_attention(q, k, v, block_q=128,
                                                                    block_k=128)), device),
}
for name, nbytes in step_bytes.items():
    print(f"n = {n_grad}, 4 heads: forward + backward, {name:>26}: {nbytes / 2**20:6.1f} MiB")


# %% [markdown]
# ## 8. Measured: time and memory against $n$
#
# Three ways to compute the same attention, on growing $n$ (batch 1, 4 heads, $d = 64$,
# float32): lesson 02's materialised attention
# (`helpers.attention.scaled_dot_product_attention`), the course's tiled forward
# (`helpers.flash.flash_attention_forward`, blocks of 256), and PyTorch's fused
# `F.scaled_dot_product_attention`, which on a CPU runs a FlashAttention-style kernel in
# C++. Peak memory is the tensor memory each call holds at its worst
# (`helpers.device.peak_memory`: on a GPU the allocator's peak, on the CPU the storages
# every operator creates, until they are freed, which misses the scratch space inside a
# fused kernel such as SDPA's); time is the median of a few runs, on one CPU thread for all
# three, so that they compete on equal terms and other programs on the machine disturb them
# less.

# %%
SIZES = [128, 256, 512] if SHORT else [256, 512, 1024, 2048]
BLOCK = 256
VARIANTS = {
    "materialised (lesson 02)": lambda q, k, v: scaled_dot_product_attention(q, k, v)[0],
    f"tiled (helpers.flash, blocks {BLOCK})":
        lambda q, k, v: flash.flash_attention_forward(q, k, v, block_q=BLOCK, block_k=BLOCK)[0],
    "PyTorch SDPA (fused)": F.scaled_dot_product_attention,
}


mebibytes = {name: [] for name in VARIANTS}
milliseconds = {name: [] for name in VARIANTS}
short_names = [name.split(" (")[0] for name in VARIANTS]
print(f"{'n':>5} | " + " | ".join(f"{name:>12} MiB, ms" for name in short_names)
      + " | tiled vs SDPA max |difference|")
with torch.inference_mode(), one_cpu_thread():
    for n in SIZES:
        q_n, k_n, v_n = (torch.randn(1, 4, n, 64, device=device) for _ in range(3))
        for name, attend in VARIANTS.items():
            mebibytes[name].append(peak_memory(lambda: attend(q_n, k_n, v_n), device) / 2**20)
            milliseconds[name].append(1e3 * median_seconds(lambda: attend(q_n, k_n, v_n)))
        worst = (VARIANTS[f"tiled (helpers.flash, blocks {BLOCK})"](q_n, k_n, v_n)
                 - F.scaled_dot_product_attention(q_n, k_n, v_n)).abs().max().item()
        print(f"{n:>5} | " + " | ".join(f"{mebibytes[name][-1]:>8.1f}, {milliseconds[name][-1]:>8.1f}"
                                        for name in VARIANTS) + f" | {worst:.1e}")
materialised, tiled = mebibytes["materialised (lesson 02)"], mebibytes[list(VARIANTS)[1]]
print(f"at n = {SIZES[-1]} the tiled forward holds {materialised[-1] / tiled[-1]:.0f}x less "
      f"memory than the materialised one")

fig, axes = plt.subplots(1, 2, figsize=(13, 4))
curves(SIZES, mebibytes, "sequence length n", "peak memory of one forward (MiB)",
       "materialised memory grows like n², tiled like n", ax=axes[0], log_x=True, log_y=True)
curves(SIZES, milliseconds, "sequence length n", "time of one forward (ms)",
       "time grows like n² for all three: tiling saves memory, not FLOPs",
       ax=axes[1], log_x=True, log_y=True)
fig.tight_layout()
plt.show()

# %% [markdown]
# On the log-log axes a slope of 2 is $n^2$ growth. The materialised memory has it; the
# tiled and fused memory grow like $n$ (their inputs and outputs) plus one tile. All three
# times grow like $n^2$: FlashAttention does the same FLOPs as standard attention (a little
# more in the backward). On a CPU, whose caches play the part of SRAM, compare the printed
# times: the fused C++ kernel does the tiled work without Python's cost per tile, and the
# materialised version pays for writing and reading its $n \times n$ matrices. On a GPU,
# where standard attention is memory-bound, the fused tiled kernel is also several times
# faster (Dao et al., 2022, report up to 7.6x on GPT-2's attention). The course's benchmark
# (`benchmarks/bench_flash.py`) measures the same at $n = 8192$.
#
# ## 9. A real kernel: FlashAttention in Triton (not graded)
#
# Triton (Tillet, Kung & Cox, 2019, *Triton: An Intermediate Language and Compiler for
# Tiled Neural Network Computations*) is how FlashAttention is written outside CUDA C++:
# a Python function decorated with `@triton.jit` is compiled for the GPU, and it is written
# per *block*: one program instance owns a tile of `BLOCK_M` queries of one head, loads it
# with `tl.load`, multiplies tiles with `tl.dot`, and keeps $m$, $\ell$ and the accumulator
# in registers, exactly the state of section 4. With `TRITON_INTERPRET=1` Triton's
# interpreter runs the same kernel on CPU tensors with NumPy: slowly, but exactly, so you
# can write and test a GPU kernel on a laptop. Triton is an optional extra
# (`pip install 'attention-course[triton]'`); without it this section is skipped.

# %%
print("Triton found: the kernels below run " + ("compiled on the GPU" if device.type == "cuda"
                                                else "in Triton's interpreter on the CPU")
      if HAVE_TRITON else "Triton is not installed (pip install 'attention-course[triton]'): "
                          "section 9 is skipped")


# %% [markdown]
# The kernel's arguments are pointers to the tensors (`Q`, `K`, `V` of shape
# `(heads, seq, dim)` and the outputs `O`, `LSE`), their strides, the sizes, and
# compile-time constants (`tl.constexpr`): the block sizes, padded to powers of two, and
# whether the mask is causal. Rows past the end of the sequence and head dimensions past
# `D` are masked on load and store. Fill in the loop over key blocks: load a block of $K$,
# compute the scores with `tl.dot(q, tl.trans(k))`, mask what is outside the sequence (and
# above the diagonal when `CAUSAL`), update $m$, $\ell$ and `acc` as in section 4, then
# normalise. `helpers.flash_triton.launch` runs any kernel with this signature, and the cell
# after compares yours with the course's tiled forward. The course's own kernel is in
# `helpers/flash_triton.py`, should you want to peek.

# %% solution id=triton-kernel
if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def my_flash_kernel(Q, K, V, O, LSE, stride_qh, stride_ql, stride_kh, stride_ks,
                        stride_vh, stride_vs, stride_oh, stride_ol, L, S, D, DV, scale,
                        CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        block, head = tl.program_id(0), tl.program_id(1)  # grid: (query blocks, heads)
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # this program's query positions
        dims, dims_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
        q = tl.load(Q + head * stride_qh + rows[:, None] * stride_ql + dims[None, :],
                    mask=(rows[:, None] < L) & (dims[None, :] < D), other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        ### BEGIN SOLUTION
        n_keys = S
        if CAUSAL:
            n_keys = tl.minimum(S, tl.maximum(0, S - L + (block + 1) * BLOCK_M))
        for start in range(0, n_keys, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k = tl.load(K + head * stride_kh + cols[:, None] * stride_ks + dims[None, :],
                        mask=(cols[:, None] < S) & (dims[None, :] < D), other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            allowed = cols[None, :] < S
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= S - L + rows[:, None])
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - shift)
            p = tl.exp(s - shift[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            v = tl.load(V + head * stride_vh + cols[:, None] * stride_vs + dims_v[None, :],
                        mask=(cols[:, None] < S) & (dims_v[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m = m_new
        seen = l > 0
        out = acc / tl.where(seen, l, 1.0)[:, None]
        lse = tl.where(seen, m + tl.log(tl.where(seen, l, 1.0)), float("-inf"))
        ### END SOLUTION
        tl.store(O + head * stride_oh + rows[:, None] * stride_ol + dims_v[None, :], out,
                 mask=(rows[:, None] < L) & (dims_v[None, :] < DV))
        tl.store(LSE + head * L + rows, lse, mask=rows < L)


# %%
if HAVE_TRITON:
    from helpers import flash_triton

    q_k, k_k, v_k = (torch.randn(2, 2, n, 32, device=device) for n in (40, 56, 56))
    for causal in (False, True):
        expected, expected_lse = flash.flash_attention_forward(q_k, k_k, v_k, causal=causal)
        try:
            got, got_lse = flash_triton.launch(my_flash_kernel, q_k, k_k, v_k, causal=causal,
                                               block_q=16, block_k=16)
        except NotImplementedError:
            print("my_flash_kernel is not written yet: fill in its loop above and run it again")
            break
        print(f"causal={causal}: your kernel vs helpers.flash max |difference| out "
              f"{(got - expected).abs().max().item():.1e}, lse "
              f"{(got_lse - expected_lse).abs().max().item():.1e}")


# %% [markdown]
# ## What's next
#
# FlashAttention makes attention's *memory* linear in $n$ but not its time, and the keys and
# values of every past token must still be kept. Lesson 07 shrinks them: multi-query and
# grouped-query attention share one set of keys and values among several heads, and
# sliding-window attention lets each query see only the last $W$ keys. Lesson 08 takes this
# lesson's merge one step further: ring attention spreads a sequence too long for one GPU
# over several, passes the key/value blocks around a ring, and merges them with exactly the
# online softmax you wrote here.
