# %% [markdown]
# # Lesson 08 — Ring attention and linear attention
#
# Lesson 06 computed exact attention in tiles, so that the $L \times L$ matrix of scores is
# never stored; lesson 07 shrank the keys and values that each token leaves behind. Both
# still keep the whole sequence on **one** device. At a million tokens even the keys and
# values of one layer no longer fit, and the $O(L^2)$ compute takes too long for one chip.
# This lesson follows the two roads out:
#
# * **Split the sequence over devices, keep attention exact.** Ring attention (Liu, Zaharia
#   and Abbeel, 2023, *Ring Attention with Blockwise Transformers for Near-Infinite
#   Context*) gives each of $P$ devices one block of the sequence and passes the key/value
#   blocks around a ring, merging each visitor with the online softmax of lesson 06. Each
#   device holds $L/P$ tokens; causal masks make the work uneven, and *striping* the
#   sequence (Brandon et al., 2023, *Striped Attention: Faster Ring Attention for Causal
#   Transformers*) evens it out.
# * **Change attention so that it costs $O(L)$.** Linear attention (Katharopoulos et al.,
#   2020, *Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention*)
#   replaces the softmax by a kernel feature map. It computes in three equal forms, one of
#   which is an RNN again, with lesson 01's fixed-size state, and with its weakness: it
#   forgets what attention remembers (Arora et al., 2023, *Zoology: Measuring and Improving
#   Recall in Efficient Language Models*).
#
# You will build:
#
# 1. `ring_attention_simulated`: the ring over $P$ virtual devices, equal to full attention,
#    causal or not;
# 2. `ring_bytes_per_device`: what each device sends around the ring;
# 3. `ring_work`: how much each device computes at each step of a causal ring;
# 4. `striped_positions`: the striped layout that balances it;
# 5. `linear_attention_parallel`, `linear_attention_recurrent` and
#    `linear_attention_chunked`: linear attention's three forms.
#
# Then you run ring attention on real processes that talk through `torch.distributed`,
# measure linear attention's $O(n)$ against softmax attention's $O(n^2)$, and train both
# on a recall task where softmax attention wins.

# %%
try:
    import helpers
except ImportError:  # Colab or a bare kernel: install the course package
    %pip install -q "attention-course @ git+COURSE_REPOSITORY"

# %% id=imports
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from helpers import flash, ring
from helpers import linear_attention as reference
from helpers.attention import MultiHeadAttention, causal_mask
from helpers.device import get_device, is_autograding, one_cpu_thread, seed_everything
from helpers.plotting import attention_heatmap, curves
from helpers.tasks import train_associative_recall

device = get_device()
seed_everything(0)
SHORT = is_autograding()  # the autograder runs smaller experiments
print(f"running on {device}")

# %% [markdown]
# ## 1. Attention, one block of keys at a time
#
# Lesson 06 split the keys into blocks and kept, for each query, a partial result per
# block: the block's attention output $o_b$ (normalised over that block's keys only) and
# the logsumexp of its scores, $\ell_b = \log \sum_{j \in b} e^{s_j}$. Two partial results
# merge exactly,
#
# $$ \ell = \log\left(e^{\ell_a} + e^{\ell_b}\right), \qquad
#    o = e^{\ell_a - \ell}\, o_a + e^{\ell_b - \ell}\, o_b , $$
#
# because $e^{\ell_a - \ell}$ is the share of the softmax's total mass that falls on block
# $a$. The merge is commutative and associative: the blocks may arrive **in any order**.
# The course keeps these two pieces in `helpers.flash`: `block_attention(q, k, v, scale,
# mask)` returns `(out, lse)` for one block of keys, and `merge_attention(out_a, lse_a,
# out_b, lse_b)` merges. A quick check that three blocks, merged backwards, give full
# attention:

# %%
q, k, v = (torch.randn(2, 3, 12, 8, device=device, dtype=torch.float64) for _ in range(3))
scale = 1 / math.sqrt(q.shape[-1])
out, lse = flash.block_attention(q, k[..., 8:, :], v[..., 8:, :], scale)
for keys in (slice(4, 8), slice(0, 4)):
    out, lse = flash.merge_attention(out, lse, *flash.block_attention(q, k[..., keys, :],
                                                                      v[..., keys, :], scale))
full = F.scaled_dot_product_attention(q, k, v)
print(f"three blocks merged in reverse order vs full attention: max |difference| "
      f"{(out - full).abs().max().item():.1e}")

# %% [markdown]
# ## 2. Ring attention
#
# Cut the sequence of $L$ tokens into $P$ contiguous blocks of $n = L/P$ and give block $r$
# to device $r$: its queries $Q_r$, keys $K_r$ and values $V_r$. Device $r$ needs every
# $K_j, V_j$ to compute its output, but holding them all would defeat the point. Liu et al.
# (2023) arrange the devices in a ring: at each step every device computes attention of its
# queries against the K/V block it holds, merges it into its running $(o, \ell)$, **sends**
# that block to device $r+1$ and **receives** the next one from device $r-1$. After $P$
# steps every block has visited every device:
#
# $$ \text{at step } s, \text{ device } r \text{ holds } K_j, V_j \text{ with }
#    j = (r - s) \bmod P . $$
#
# Each device holds at most two K/V blocks (the one it computes on, the one arriving), so
# memory per device is $O(L/P)$, and the sequence can grow with the number of devices. The
# transfer of the next block runs *while* the device computes on this one; section 3
# measures when the compute hides it.
#
# **Causal attention.** Query $i$ may see key $j \le i$. For blocks, with $n$ tokens each,
# that leaves three cases for device $r$ holding block $j$: $j < r$, every key is in the
# past, no mask; $j = r$, the diagonal block, `causal_mask(n)`; $j > r$, every key is in the
# future: **skip** the block, there is nothing to compute (but still pass it on).
#
# **Exercise 1 (4 points).** Write `ring_attention_simulated(q, k, v, world_size,
# causal=False)` for `q`, `k`, `v` of shape `(B, H, L, D)` (`v` may have another last
# dimension `Dv`), simulating the $P$ = `world_size` devices in one process: keep, for each
# device, which block it holds (start: its own), and at each of the $P$ steps let every
# device merge `flash.block_attention(...)` of the block it holds into its result with
# `flash.merge_attention`, then pass the blocks one device along the ring. Use the scale
# $1/\sqrt{D}$, and skip (do not compute) the causal blocks in the future. Return the
# outputs of the devices concatenated in order, `(B, H, L, Dv)`. Raise a `ValueError` naming
# `L` and $P$ when $L$ is not a multiple of $P$. The check counts your calls to
# `flash.block_attention`.

# %% solution id=ring-simulated
def ring_attention_simulated(q: Tensor, k: Tensor, v: Tensor, world_size: int,
                             causal: bool = False) -> Tensor:
    """Attention as P devices in a ring compute it (Liu et al., 2023), in one process.

    q, k: (B, H, L, D), v: (B, H, L, Dv) -> (B, H, L, Dv). Device r holds the r-th block of
    L / P tokens; at step s it holds the K/V block of device (r - s) mod P.
    """
    ### BEGIN SOLUTION
    L, P = q.shape[-2], world_size
    if L % P:
        raise ValueError(f"L = {L} tokens do not split into P = {P} equal blocks")
    n, scale = L // P, 1 / math.sqrt(q.shape[-1])
    q_blocks, k_blocks, v_blocks = (t.split(n, dim=-2) for t in (q, k, v))
    held = list(range(P))  # held[r]: whose K/V block device r holds now
    results = [None] * P  # (out, lse) of each device so far
    for step in range(P):
        for r, j in enumerate(held):
            if causal and j > r:
                continue  # every key of block j is in the future of every query of block r
            mask = causal_mask(n, device=q.device) if causal and j == r else None
            partial = flash.block_attention(q_blocks[r], k_blocks[j], v_blocks[j], scale, mask)
            results[r] = partial if results[r] is None else flash.merge_attention(*results[r],
                                                                                  *partial)
        held = [held[(r - 1) % P] for r in range(P)]  # device r receives from device r - 1
    return torch.cat([out for out, _ in results], dim=-2)  # (B, H, L, Dv)
    ### END SOLUTION


# %% tests id=ring-simulated-tests points=4
from helpers.checks import lesson08 as checks
checks.ring_attention_simulated(ring_attention_simulated)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("08").ring_attention_simulated(ring_attention_simulated)
### END HIDDEN TESTS

# %% [markdown]
# ## 3. What travels around the ring
#
# Each device sends its K/V block on $P - 1$ times in the forward pass (after $P - 1$
# passes every device has seen every block; the last pass would only bring a block home).
# A block of $K$ is $B \cdot H \cdot (L/P) \cdot D$ numbers, and $V$ as many again.
#
# **Exercise 2 (2 points).** Write `ring_bytes_per_device(batch, heads, seq_len, head_dim,
# world_size, bytes_per_element=2)`: the bytes each device sends during one forward pass of
# ring attention (K and V have `heads` heads of `head_dim`; 2 bytes per number is bf16).
# Return an `int`.

# %% solution id=ring-bytes
def ring_bytes_per_device(batch: int, heads: int, seq_len: int, head_dim: int,
                          world_size: int, bytes_per_element: int = 2) -> int:
    """Bytes one device sends in a forward pass of ring attention: its K and V blocks,
    (batch, heads, seq_len / world_size, head_dim) each, passed on world_size - 1 times."""
    ### BEGIN SOLUTION
    block = batch * heads * (seq_len // world_size) * head_dim * bytes_per_element
    return 2 * (world_size - 1) * block
    ### END SOLUTION


# %% tests id=ring-bytes-tests points=2
from helpers.checks import lesson08 as checks
checks.ring_bytes_per_device(ring_bytes_per_device)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("08").ring_bytes_per_device(ring_bytes_per_device)
### END HIDDEN TESTS

# %% [markdown]
# **When does the compute hide the transfer?** At each step a device multiplies its block
# of $c = L/P$ queries with a block of $c$ keys and then with $c$ values: about
# $4c^2 d$ floating-point operations per head, against $2cd$ numbers to receive. With $F$
# operations per second and a link of $W$ bytes per second, the transfer hides behind the
# compute when
#
# $$ \frac{4 c^2 d}{F} \ge \frac{2 c d \cdot \text{bytes}}{W}
#    \quad\Longleftrightarrow\quad c \ge \frac{F \cdot \text{bytes}}{2W} , $$
#
# which is $c \ge F/W$ in bf16: the condition of Liu et al. (2023), independent of $d$ and
# of the number of heads. The next cell evaluates it for an NVIDIA A100 (312 TFLOP/s in
# bf16) with NVLink (300 GB/s each way) and with a 100 Gb/s InfiniBand link (12.5 GB/s),
# and then your `ring_bytes_per_device` for one layer of a Llama-3-8B-like model (8 K/V
# heads of 128, lesson 07's GQA) at a million tokens over 8 devices.

# %%
A100_FLOPS = 312e12
for link, bandwidth in (("NVLink", 300e9), ("InfiniBand, 100 Gb/s", 12.5e9)):
    print(f"A100 with {link:>20}: the ring hides its transfers from blocks of "
          f"{A100_FLOPS * 2 / (2 * bandwidth):,.0f} tokens per device")
TOKENS, KV_HEADS, HEAD_DIM, DEVICES = 2**20, 8, 128, 8
sent = ring_bytes_per_device(1, KV_HEADS, TOKENS, HEAD_DIM, DEVICES)
held = 2 * KV_HEADS * (TOKENS // DEVICES) * HEAD_DIM * 2  # its own K and V block, bf16
print(f"{TOKENS:,} tokens over {DEVICES} devices: each device holds {held / 2**20:.0f} MiB "
      f"of K/V per layer and sends {sent / 2**30:.2f} GiB per layer per forward pass")

# %% [markdown]
# ## 4. The causal ring is unbalanced
#
# With a causal mask, device $r$ of the contiguous layout computes its diagonal block and
# the $r$ blocks before it; device 0 computes one half block, device $P-1$ almost $P$
# blocks. The ring moves in lockstep (a device cannot compute on a block before its
# neighbour has passed it on), so each step lasts as long as its busiest device, and the
# causal ring takes nearly as long as the full one although it skips half the work.
#
# Brandon et al. (2023) **stripe** the sequence instead: device $r$ holds tokens
# $r, r + P, r + 2P, \dots$ Then every block pair straddles the diagonal: device $r$ sees
# about half of every block, so every device does about the same work at every step. (A
# variant used for Llama 3's context parallelism, *zig-zag*, cuts the sequence into $2P$
# chunks and gives device $r$ chunks $r$ and $2P - 1 - r$, one early and one late.) The mask
# between two blocks now depends on the positions they hold, $k_{\text{pos}} \le
# q_{\text{pos}}$; `helpers.ring.layout_positions(L, P, layout)` returns them, and
# `helpers.ring.ring_attention_simulated(..., layout=...)` runs the ring on any layout.
#
# **Exercise 3 (3 points).** Write `ring_work(positions)`: `positions` is a `(P, n)` integer
# tensor, row $r$ the sequence positions of the tokens device $r$ holds (queries and keys
# alike). Return the `(P, P)` tensor whose entry `[s, r]` counts the (query, key) pairs
# device $r$ computes at step $s$ of a causal ring: the pairs of its queries with the keys
# it holds then whose key position is not after the query position.
#
# **Exercise 4 (1 point).** Write `striped_positions(seq_len, world_size)`: the `(P, L/P)`
# positions of the striped layout, row $r$ being `r, r + P, r + 2P, ...`; raise a
# `ValueError` when `seq_len` is not a multiple of `world_size`.

# %% solution id=ring-work
def ring_work(positions: Tensor) -> Tensor:
    """(P steps, P devices): the causal (query, key) pairs device r computes at step s, when
    device r holds the tokens at positions[r] (P, n) and receives from device r - 1."""
    ### BEGIN SOLUTION
    P = positions.shape[0]
    devices = torch.arange(P, device=positions.device)
    work = []
    for step in range(P):
        sources = (devices - step) % P  # whose keys each device holds at this step
        visible = positions[sources][:, None, :] <= positions[:, :, None]  # (P, n_q, n_k)
        work.append(visible.sum(dim=(1, 2)))
    return torch.stack(work)  # (P, P)
    ### END SOLUTION


# %% tests id=ring-work-tests points=3
from helpers.checks import lesson08 as checks
checks.ring_work(ring_work)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("08").ring_work(ring_work)
### END HIDDEN TESTS

# %% solution id=striped-positions
def striped_positions(seq_len: int, world_size: int) -> Tensor:
    """(P, L / P): device r holds positions r, r + P, r + 2P, ... (Brandon et al., 2023)."""
    ### BEGIN SOLUTION
    if seq_len % world_size:
        raise ValueError(f"seq_len = {seq_len} is not a multiple of world_size = {world_size}")
    return torch.arange(seq_len).view(-1, world_size).T  # (P, L / P)
    ### END SOLUTION


# %% tests id=striped-positions-tests points=1
from helpers.checks import lesson08 as checks
checks.striped_positions(striped_positions)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("08").striped_positions(striped_positions)
### END HIDDEN TESTS

# %% [markdown]
# With your `ring_work`, the three layouts of a 4-device causal ring over 64 tokens side by
# side. The lockstep time of a ring is the sum over its steps of the busiest device's work;
# the printout compares it with the work of a ring without the mask. The course's
# simulated ring confirms that the striped and zig-zag layouts compute the same attention.

# %%
RING_P, RING_L = 4, 64
layouts = {"contiguous": ring.layout_positions(RING_L, RING_P),
           "striped (yours)": striped_positions(RING_L, RING_P),
           "zig-zag": ring.layout_positions(RING_L, RING_P, "zigzag")}
unmasked = RING_P * (RING_L // RING_P) ** 2  # lockstep time of the full (non-causal) ring
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
for ax, (name, positions) in zip(axes, layouts.items()):
    work = ring_work(positions)  # (P steps, P devices)
    lockstep = int(work.amax(dim=1).sum())
    print(f"{name:>16}: work per device {work.sum(dim=0).tolist()}, lockstep time "
          f"{lockstep} pairs = {lockstep / unmasked:.2f} of the unmasked ring")
    attention_heatmap(work.float(), ax=ax, value_label="(query, key) pairs computed",
                      vmax=(RING_L // RING_P) ** 2,
                      title=f"{name}: lockstep {lockstep / unmasked:.2f} of unmasked")
    ax.set_xlabel("device")
    ax.set_ylabel("step")
fig.suptitle("causal ring: contiguous blocks leave device 0 idle; striping evens the load")
fig.tight_layout()
plt.show()

q, k, v = (torch.randn(1, 2, RING_L, 8, device=device, dtype=torch.float64) for _ in range(3))
full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
for layout in ring.LAYOUTS:
    out = ring.ring_attention_simulated(q, k, v, RING_P, causal=True, layout=layout)
    print(f"simulated {layout:>10} ring vs causal attention: max |difference| "
          f"{(out - full).abs().max().item():.1e}")

# %% [markdown]
# ## 5. The real ring: processes that talk
#
# `helpers.ring.ring_attention(q, k, v, group=None, causal=False)` is the ring on real
# processes. Each process (a *rank* of a `torch.distributed` process group) calls it with
# its own blocks and gets its own output block. At every step it starts
# `torch.distributed.isend` of the block it holds to rank $r+1$ and `irecv` of the next
# from rank $r-1$, computes on the block it holds while they travel, then waits for them.
# It is differentiable: a `torch.autograd.Function` whose backward sends K/V around the
# ring again, together with the gradients $dK, dV$ found for each block so far, so that
# after $P$ passes every block comes home with the sum of its gradients from every rank.
#
# Here the processes compute on this machine's CPU and talk over the loopback network
# interface with the *gloo* backend (on GPUs one would use NCCL, one GPU per rank).
# `helpers.ring.run_on_processes(fn, world_size, ...)` starts them (the function has to be
# importable, so it lives in `helpers.ring`). The worker `ring.ring_scaling` runs one
# forward and backward pass over a fixed sequence for $P = 1, 2, 3, 4$ processes, each
# holding $L/P$ tokens, and reports its wall time, the CPU time of the thread that computes
# (each process runs torch on one thread), the growth of its peak memory, and its largest
# difference from PyTorch's attention (output and gradients).

# %%
SCALING_L = 480 if SHORT else 1440  # tokens in the whole sequence
SCALING_P = (1, 2) if SHORT else (1, 2, 3, 4)
results = ring.run_on_processes(ring.ring_scaling, max(SCALING_P), 1, 2, SCALING_L, 32,
                                SCALING_P)


def slowest(key: str) -> list[float]:
    """The largest value of ``key`` over the processes of each P (a ring is as slow as its
    slowest process)."""
    return [max(rank[P][key] for rank in results if P in rank) for P in SCALING_P]


wall, cpu, memory = slowest("seconds"), slowest("cpu_seconds"), slowest("peak_bytes")
memory = [m / 2**20 for m in memory]  # MiB
error = max(measured["max_error"] for rank in results for measured in rank.values())
for P, w, c, m in zip(SCALING_P, wall, cpu, memory):
    print(f"P = {P}: {SCALING_L // P:>4} tokens per process, wall {w * 1e3:5.0f} ms, "
          f"CPU {c * 1e3:5.0f} ms, peak memory +{m:5.1f} MiB per process")
print(f"largest difference from PyTorch's attention and autograd: {error:.1e}")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
curves(SCALING_P, {"wall time": wall, "CPU time": cpu,
                   "CPU time at P = 1, divided by P": [cpu[0] / P for P in SCALING_P]},
       "processes P", "seconds per process", "compute per process falls like 1/P",
       ax=axes[0])
curves(SCALING_P, {"measured": memory,
                   "memory at P = 1, divided by P²": [memory[0] / P**2 for P in SCALING_P]},
       "processes P", "peak memory growth per process (MiB)",
       "memory per process falls like 1/P²", ax=axes[1])
for ax in axes:
    ax.set_xticks(SCALING_P)
    ax.set_ylim(bottom=0)
fig.suptitle(f"ring attention over {SCALING_L} tokens on local gloo processes, forward + backward")
fig.tight_layout()
plt.show()

# %% [markdown]
# Each process computes $P$ blocks of $(L/P)^2$ scores, so the total work stays $L^2$ and
# each process's share, its CPU time, falls like $1/P$. Its wall time can only follow while
# every process has a core of its own: on a laptop with two cores, $P = 3$ and $4$ share
# them, and other programs take their turn too (compare the printed wall and CPU times). The
# memory falls faster than $1/P$: each step here materialises a block of $(L/P)^2$ scores,
# so the peak falls like $1/P^2$. With lesson 06's tiles inside each block the scores never
# exist in full and memory per device is $O(L/P)$, which is what lets ring attention train
# on sequences $P$ times longer than one device could hold.
#
# ## 6. Linear attention
#
# Softmax attention weighs key $j$ for query $i$ by $\exp(q_i \cdot k_j / \sqrt{d})$.
# Katharopoulos et al. (2020) replace that similarity by a dot product of *features*,
# $\phi(q_i) \cdot \phi(k_j)$, with a feature map $\phi$ whose outputs are positive, so
# that the similarities are still weights:
#
# $$ \text{out}_i = \frac{\sum_j \phi(q_i)^\top \phi(k_j)\, v_j}{\sum_j \phi(q_i)^\top
#    \phi(k_j)} = \frac{\phi(q_i)^\top \left(\sum_j \phi(k_j) v_j^\top\right)}{\phi(q_i)^\top
#    \sum_j \phi(k_j)} , \qquad \phi(x) = \mathrm{elu}(x) + 1 . $$
#
# Moving the brackets is the whole trick. In matrix form, $(\phi(Q)\phi(K)^\top) V$ costs
# $O(L S d)$ and builds an $L \times S$ matrix, but $\phi(Q) (\phi(K)^\top V)$ first sums
# the keys into a $d \times d_v$ matrix and costs $O((L + S) d\, d_v)$: **linear** in the
# length. The denominator, the *normaliser*, is $\phi(Q)\, z$ with $z = \sum_j \phi(k_j)$.
# $\mathrm{elu}(x) + 1$ is $e^x$ below zero and $x + 1$ above: positive everywhere. There is
# no $1/\sqrt{d}$; the feature map replaces the exponential.
#
# With a causal mask, query $i$ sums over $j \le i$ only. The *parallel* form then keeps the
# $L \times S$ matrix, masked: $\left(\phi(Q)\phi(K)^\top \odot M\right) V$, normalised by
# its row sums. That is $O(L^2)$ again, but all positions at once, which is how such models
# train on short sequences. Sections 7 and 8 give the causal case back its $O(L)$.
#
# **Exercise 5 (3 points).** Write `linear_attention_parallel(q, k, v, causal=False)` for
# `q` `(B, H, L, D)`, `k` `(B, H, S, D)`, `v` `(B, H, S, Dv)` with $\phi = \mathrm{elu} + 1$
# (`F.elu`). Not causal: compute $\phi(K)^\top V$ first and never form the $L \times S$
# matrix. Causal: the masked parallel form, aligned bottom right as `causal_mask(L, S)`
# (query $i$ sees keys $0 \dots S - L + i$; here $L \le S$).

# %% solution id=linear-parallel
def linear_attention_parallel(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """Linear attention (Katharopoulos et al., 2020) with φ = elu + 1, all positions at once.

    q: (B, H, L, D), k: (B, H, S, D), v: (B, H, S, Dv) -> (B, H, L, Dv).
    """
    ### BEGIN SOLUTION
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1  # positive features
    if not causal:
        kv = phi_k.transpose(-2, -1) @ v  # (B, H, D, Dv): Σ_j φ(k_j) v_jᵀ
        z = phi_k.sum(dim=-2)  # (B, H, D): Σ_j φ(k_j)
        return (phi_q @ kv) / (phi_q @ z[..., None])  # (B, H, L, Dv) / (B, H, L, 1)
    L, S = q.shape[-2], k.shape[-2]
    weights = phi_q @ phi_k.transpose(-2, -1)  # (B, H, L, S): φ(q_i)·φ(k_j)
    weights = weights * causal_mask(L, S, device=q.device)
    return (weights @ v) / weights.sum(dim=-1, keepdim=True)
    ### END SOLUTION


# %% tests id=linear-parallel-tests points=3
from helpers.checks import lesson08 as checks
checks.linear_attention_parallel(linear_attention_parallel)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("08").linear_attention_parallel(linear_attention_parallel)
### END HIDDEN TESTS

# %% [markdown]
# ## 7. An RNN again
#
# Causal linear attention reads, at position $t$, the sums over keys $j \le t$. Keep them
# as a state and update it with one token at a time:
#
# $$ S_t = S_{t-1} + \phi(k_t)\, v_t^\top, \qquad z_t = z_{t-1} + \phi(k_t), \qquad
#    \text{out}_t = \frac{\phi(q_t)^\top S_t}{\phi(q_t)^\top z_t} . $$
#
# This is lesson 01's recurrence, $h_t = f(h_{t-1}, x_t)$, with a state
# $(S_t, z_t)$ of fixed size $d \times d_v + d$: the title of Katharopoulos et al.'s paper,
# *Transformers are RNNs*. Generating a token costs $O(d\, d_v)$ whatever the length
# (lesson 09's KV cache grows with every token instead). Unlike lesson 01's RNN the
# update is additive, with no $\tanh$ and no matrix $W_h$ in the way, so gradients do not
# vanish along the state. But the fixed-size context vector is back: everything the model
# knows about the past must fit in $S_t$, and section 10 shows what that costs.
#
# **Exercise 6 (3 points).** Write `linear_attention_recurrent(q, k, v, state=None)` for
# `q`, `k` `(B, H, L, D)` and `v` `(B, H, L, Dv)`, causal, as a loop over the $L$ steps
# (vectorised over batch and heads). `state` is `(S, z)` with `S` `(B, H, D, Dv)` and `z`
# `(B, H, D)` (zeros when `None`, on the device and in the dtype of `q`); return
# `(out, (S, z))`, the outputs `(B, H, L, Dv)` and the state after the last step, so that a
# sequence can be fed in pieces. Do not change the tensors of the `state` you are given. Use
# `reference.elu_feature_map` for $\phi$.

# %% solution id=linear-recurrent
def linear_attention_recurrent(q: Tensor, k: Tensor, v: Tensor,
                               state: tuple[Tensor, Tensor] | None = None
                               ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Causal linear attention as an RNN: S_t = S_{t-1} + φ(k_t) v_tᵀ, z_t = z_{t-1} + φ(k_t).

    q, k: (B, H, L, D), v: (B, H, L, Dv); state (S (B, H, D, Dv), z (B, H, D)) or None.
    Returns out (B, H, L, Dv) and the final state (S, z).
    """
    ### BEGIN SOLUTION
    phi_q, phi_k = reference.elu_feature_map(q), reference.elu_feature_map(k)
    if state is None:
        S = q.new_zeros(*q.shape[:-2], q.shape[-1], v.shape[-1])  # (B, H, D, Dv)
        z = q.new_zeros(*q.shape[:-2], q.shape[-1])  # (B, H, D)
    else:
        S, z = state
    outputs = []
    for t in range(q.shape[-2]):
        S = S + phi_k[..., t, :, None] * v[..., t, None, :]  # add φ(k_t) v_tᵀ: (B, H, D, Dv)
        z = z + phi_k[..., t, :]  # (B, H, D)
        numerator = (phi_q[..., t, None, :] @ S)[..., 0, :]  # (B, H, Dv): φ(q_t)ᵀ S_t
        normaliser = (phi_q[..., t, :] * z).sum(dim=-1, keepdim=True)  # (B, H, 1)
        outputs.append(numerator / normaliser)
    return torch.stack(outputs, dim=-2), (S, z)  # (B, H, L, Dv)
    ### END SOLUTION


# %% tests id=linear-recurrent-tests points=3
from helpers.checks import lesson08 as checks
checks.linear_attention_recurrent(linear_attention_recurrent)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("08").linear_attention_recurrent(linear_attention_recurrent)
### END HIDDEN TESTS

# %% [markdown]
# ## 8. Chunks: parallel inside, recurrent across
#
# The recurrent form is $O(L)$ but runs one token at a time; the parallel form runs all
# tokens at once but is $O(L^2)$. The *chunked* form takes the best of both (it is how
# modern linear-attention and state-space layers train, e.g. Yang et al., 2024, *Gated
# Linear Attention Transformers with Hardware-Efficient Training*): cut the sequence into
# chunks of $C$ tokens. A query of chunk $c$ reads
#
# * the keys of earlier chunks through the state $S_c = \sum_{\text{chunks } < c}
#   \phi(K)^\top V$ and $z_c$, one matrix product for the whole chunk, and
# * the keys of its own chunk up to itself, with the masked parallel form on a $C \times C$
#   block;
#
# then the chunk's keys join the state, $S_{c+1} = S_c + \phi(K_c)^\top V_c$. The cost is
# $O(L\, C\, d)$: linear in $L$, with large matrix products that keep a CPU or GPU busy.
#
# **Exercise 7 (3 points).** Write `linear_attention_chunked(q, k, v, chunk_size)`: causal
# linear attention for `q`, `k` `(B, H, L, D)`, `v` `(B, H, L, Dv)`, with $\phi$ =
# `reference.elu_feature_map`, looping over the chunks; the last chunk may be shorter.
# Never form an $L \times L$ matrix.

# %% solution id=linear-chunked
def linear_attention_chunked(q: Tensor, k: Tensor, v: Tensor, chunk_size: int) -> Tensor:
    """Causal linear attention by chunks: the masked parallel form inside each chunk, the
    state S = Σ φ(K)ᵀV of the earlier chunks across them. (B, H, L, D) -> (B, H, L, Dv)."""
    ### BEGIN SOLUTION
    phi_q, phi_k = reference.elu_feature_map(q), reference.elu_feature_map(k)
    S = q.new_zeros(*q.shape[:-2], q.shape[-1], v.shape[-1])  # (B, H, D, Dv)
    z = q.new_zeros(*q.shape[:-2], q.shape[-1])  # (B, H, D)
    outputs = []
    for start in range(0, q.shape[-2], chunk_size):
        chunk = slice(start, start + chunk_size)
        q_c, k_c, v_c = phi_q[..., chunk, :], phi_k[..., chunk, :], v[..., chunk, :]
        within = q_c @ k_c.transpose(-2, -1)  # (B, H, C, C)
        within = within * causal_mask(q_c.shape[-2], device=q.device)
        numerator = within @ v_c + q_c @ S  # (B, H, C, Dv)
        normaliser = within.sum(dim=-1) + (q_c * z[..., None, :]).sum(dim=-1)  # (B, H, C)
        outputs.append(numerator / normaliser[..., None])
        S = S + k_c.transpose(-2, -1) @ v_c  # the chunk's keys join the state
        z = z + k_c.sum(dim=-2)
    return torch.cat(outputs, dim=-2)  # (B, H, L, Dv)
    ### END SOLUTION


# %% tests id=linear-chunked-tests points=3
from helpers.checks import lesson08 as checks
checks.linear_attention_chunked(linear_attention_chunked)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("08").linear_attention_chunked(linear_attention_chunked)
### END HIDDEN TESTS

# %% [markdown]
# Your three forms side by side, on one causal input: they agree to rounding, and the
# recurrent one, fed the sequence in two halves, carries its state across the cut.

# %%
q, k, v = (torch.randn(2, 4, 96, 16, device=device, dtype=torch.float64) for _ in range(3))
forms = {"parallel": linear_attention_parallel(q, k, v, causal=True),
         "recurrent": linear_attention_recurrent(q, k, v)[0],
         "chunked, C = 32": linear_attention_chunked(q, k, v, 32)}
first, state = linear_attention_recurrent(q[..., :40, :], k[..., :40, :], v[..., :40, :])
second, _ = linear_attention_recurrent(q[..., 40:, :], k[..., 40:, :], v[..., 40:, :], state)
forms["recurrent, in two pieces"] = torch.cat([first, second], dim=-2)
for name, out in forms.items():
    print(f"{name:>24} vs parallel: max |difference| "
          f"{(out - forms['parallel']).abs().max().item():.1e}")

# %% [markdown]
# ## 9. $O(n)$, measured
#
# Time causal softmax attention (PyTorch's fused `scaled_dot_product_attention`) and causal
# linear attention (the course's chunked form, `reference.linear_attention(...,
# method="chunked")`, which runs the recurrence across chunks as one prefix sum) from 1k to
# 16k tokens, and fit $\text{time} \propto n^{a}$ by least squares on the log-log plot:
# softmax attention should give $a \approx 2$, linear attention $a \approx 1$. At short
# lengths fixed overheads dominate, which pulls both exponents down a little. On a CPU the
# cell runs torch on one thread and counts that thread's CPU time, which other programs
# sharing the cores do not inflate; on a GPU it counts wall time.

# %%
LENGTHS = [1024, 2048, 4096] if SHORT else [1024, 2048, 4096, 8192, 16384]
SWEEP_HEADS, SWEEP_DIM = 2, 32


def best_time(fn, repeats: int = 3) -> float:
    """The fastest of ``repeats`` runs of fn(), in seconds: CPU time of this thread on a CPU,
    wall time (synchronised) on a GPU."""
    clock = time.thread_time if device.type == "cpu" else time.perf_counter
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    return min(times)


timings = {"softmax attention (SDPA)": [], "linear attention (chunked)": []}
with torch.inference_mode(), one_cpu_thread():  # one thread: steadier on a shared CPU
    for n in LENGTHS:
        q, k, v = (torch.randn(1, SWEEP_HEADS, n, SWEEP_DIM, device=device) for _ in range(3))
        timings["softmax attention (SDPA)"].append(best_time(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
        timings["linear attention (chunked)"].append(best_time(
            lambda: reference.linear_attention(q, k, v, causal=True, method="chunked")))
exponents = {name: np.polyfit(np.log(LENGTHS), np.log(ts), 1)[0] for name, ts in timings.items()}
for name, ts in timings.items():
    print(f"{name:>27}: " + ", ".join(f"{n}: {t * 1e3:.1f} ms" for n, t in zip(LENGTHS, ts))
          + f"; fitted exponent {exponents[name]:.2f}")
ratio = timings["softmax attention (SDPA)"][-1] / timings["linear attention (chunked)"][-1]
print(f"at n = {LENGTHS[-1]}, linear attention is {ratio:.0f}x faster")
fig, ax = plt.subplots(figsize=(6.5, 4))
curves(LENGTHS, {f"{name}, time ∝ n^{exponents[name]:.2f}": ts for name, ts in timings.items()},
       "sequence length n", "seconds (best of 3 runs)",
       "softmax attention grows like n², linear attention like n", ax=ax, log_x=True,
       log_y=True)
plt.show()

# %% [markdown]
# ## 10. Where linear attention loses: recall
#
# Attention keeps every key and value; linear attention squeezes them into a $d \times d_v$
# state, lesson 01's bottleneck in a new form. Arora et al. (2023) made that measurable with
# *multi-query associative recall* (MQAR): a sequence lists key-value pairs,
# `k1 v1 k2 v2 ...`, then asks for several of the keys again; at each query the model must
# output that key's value (`helpers.tasks.associative_recall_task`). Attention solves it in
# one layer by looking back at the key. A fixed-size state can only hold so many pairs: as
# their number grows past what the state can separate, recall collapses.
#
# The model is the smallest that can do it: an embedding of each token and of the token
# before it (a *token shift*, the short convolution that the models of the Zoology paper
# put before their mixers: it lets the position of a value know its key), one attention
# layer, softmax or linear with $\phi = \mathrm{elu} + 1$, both with one head of the same
# size, and a linear read-out. Both are trained for a few seconds at each number of pairs
# and tested on fresh sequences.

# %%
MQAR_VOCAB, MQAR_EMBED = 256, 16
MQAR_PAIRS = [4, 16] if SHORT else [4, 8, 16, 32]
MQAR_STEPS = 30 if SHORT else 120


class RecallModel(nn.Module):
    """Token and previous-token embeddings, one causal attention layer (softmax or linear),
    a linear read-out: (B, L) token ids -> (B, L, vocab) logits."""

    def __init__(self, vocab_size: int, d_embed: int, linear: bool):
        super().__init__()
        d_model = 2 * d_embed  # [embedding of the token, embedding of the token before]
        self.embed = nn.Embedding(vocab_size, d_embed)
        self.linear = linear
        self.mixer = (reference.LinearAttention(d_model, n_heads=1, method="parallel")
                      if linear else MultiHeadAttention(d_model, n_heads=1))
        self.readout = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        e = self.embed(tokens)  # (B, L, d_embed)
        x = torch.cat([e, F.pad(e, (0, 0, 1, 0))[:, :-1]], dim=-1)  # (B, L, d_model)
        if self.linear:
            return self.readout(self.mixer(x))
        return self.readout(self.mixer(x, mask=causal_mask(x.shape[1], device=x.device)))


def recall_accuracy(linear: bool, n_pairs: int, generator: torch.Generator) -> float:
    """Train a RecallModel on MQAR with n_pairs pairs (every key asked; Adam, batches of 32,
    `helpers.tasks.train_associative_recall`), then return its accuracy on 256 fresh
    sequences."""
    model = RecallModel(MQAR_VOCAB, MQAR_EMBED, linear).to(device)
    return train_associative_recall(model, n_pairs, MQAR_VOCAB, MQAR_STEPS, batch=32, lr=1e-2,
                                    generator=generator)[-1]


accuracy = {"softmax attention": [], "linear attention": []}
with one_cpu_thread():  # 32-wide layers: one thread is faster than several
    for n_pairs in MQAR_PAIRS:
        for name in accuracy:
            seed_everything(n_pairs)
            generator = torch.Generator().manual_seed(n_pairs)
            accuracy[name].append(recall_accuracy(name.startswith("linear"), n_pairs, generator))
for name, values in accuracy.items():
    print(f"{name:>17}: " + ", ".join(f"{n} pairs {a:.0%}" for n, a in zip(MQAR_PAIRS, values)))
d_state = 2 * MQAR_EMBED  # the head size of both models
print(f"linear attention's state: {d_state} x {d_state} numbers (+ {d_state} for z), whatever the "
      f"length; softmax attention keeps all {3 * MQAR_PAIRS[-1]} keys of the longest sequence")
fig, ax = plt.subplots(figsize=(7, 4))
curves(MQAR_PAIRS, accuracy, "key-value pairs to recall", "recall accuracy",
       "softmax attention recalls every pair; linear attention's state fills up", ax=ax,
       log_x=True)
ax.axhline(1 / (MQAR_VOCAB // 2), linestyle=":", color="gray", label="chance")
ax.set_ylim(0, 1.05)
ax.legend()
plt.show()

# %% [markdown]
# Same size, same training: softmax attention recalls (nearly) every pair at every length,
# linear attention's accuracy falls as the pairs grow (compare the printed accuracies). The
# state of linear attention has a fixed number of slots, while attention's KV cache grows
# with the sequence, and recall needs that memory. Zoology found the same gap in real
# language models, and that most of the quality difference between attention and its
# efficient replacements comes from recall. There are ways to narrow it: larger feature maps
# (Arora et al., 2024, *Simple linear attention language models balance the recall-throughput
# tradeoff*) and states that forget on purpose, which lesson 10 builds.
#
# ## What's next
#
# Two ways to long context, two trade-offs: ring attention stays exact and pays in devices
# and communication; linear attention runs in $O(n)$ with a constant-size state, and pays in
# recall. Lesson 09 looks at the memory that softmax attention keeps while it generates, the
# **KV cache**: it grows by one key and value per token, and you will build it, measure it
# and compress it. Lesson 10 then takes linear attention's recurrence further: state space
# models and Mamba give the state a decay that depends on the input, so that it can choose
# what to keep.
