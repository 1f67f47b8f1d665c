# %% [markdown]
# # Lesson 02 — Queries, keys and values
#
# In lesson 01 a recurrent network had to squeeze a whole sentence into one fixed-size
# state, and the gradient from the last state back to the early words faded with distance.
# Attention removes that bottleneck: every output position *looks back* at every input
# position, scores how relevant each one is, and takes a weighted average. No state has to
# carry the past; the past stays available, one dot product away.
#
# In this lesson you build the core of every transformer,
# $\mathrm{softmax}(QK^\top/\sqrt{d_k})\,V$, piece by piece:
#
# 1. `dot_scores`: the similarity of every query with every key, batched over heads;
# 2. `stable_softmax`: a softmax that neither overflows on large scores nor returns NaN for
#    a query that may attend to nothing;
# 3. `attention`: scaled dot-product attention with an optional mask and scale, returning
#    the output and the attention weights;
# 4. `attention_entropy`: how spread out each query's attention is, the measure that shows
#    why the $1/\sqrt{d_k}$ matters.
#
# On the way you measure *why* the scores are divided by $\sqrt{d_k}$, and draw an
# attention heatmap of a small retrieval task.

# %%
try:
    import helpers
except ImportError:  # Colab or a bare kernel: install the course package
    %pip install -q "attention-course @ git+COURSE_REPOSITORY"

# %% id=imports
import math

import matplotlib.pyplot as plt
import torch
from torch import Tensor

from helpers import attention as reference
from helpers.device import get_device, seed_everything
from helpers.plotting import attention_heatmap, curves

device = get_device()
seed_everything(0)
torch.set_num_threads(1)  # small tensors: one CPU thread is fastest, on a busy CPU by far
print(f"running on {device}")

# %% [markdown]
# ## 1. Attention is a soft dictionary lookup
#
# A Python `dict` maps a query to the value whose key *equals* it. Attention relaxes
# "equals" to "is similar to". Given a query $q$, keys $k_1, \dots, k_S$ and values
# $v_1, \dots, v_S$, it scores each key, turns the scores into weights that are positive and
# sum to one, and returns the weighted average of the values:
#
# $$
# s_j = \mathrm{score}(q, k_j), \qquad
# \alpha_j = \frac{e^{s_j}}{\sum_{i=1}^{S} e^{s_i}}, \qquad
# \mathrm{out} = \sum_{j=1}^{S} \alpha_j v_j .
# $$
#
# If one key matches far better than the others, $\alpha$ is nearly one-hot and attention
# behaves like the dictionary. If the query sits between two keys, it returns a blend of
# their values. Because every step is differentiable, the network can *learn* what to ask
# for (the queries) and how to be found (the keys).
#
# **Which score?** Bahdanau, Cho and Bengio (2015), *Neural Machine Translation by Jointly
# Learning to Align and Translate*, introduced attention for translation with an *additive*
# score, a small MLP: $s_j = w^\top \tanh(W_q q + W_k k_j)$. Luong, Pham and Manning (2015),
# *Effective Approaches to Attention-based Neural Machine Translation*, compared it with
# *multiplicative* scores, the dot product $q^\top k_j$ and the bilinear $q^\top W k_j$.
# Vaswani et al. (2017), *Attention Is All You Need*, kept the dot product: for many queries
# at once it is a single matrix product, which GPUs do faster than anything else. They
# observed that additive attention did better for large key dimensions $d_k$ unless the dot
# products are scaled down, which is the $1/\sqrt{d_k}$ of section 4.
#
# A three-entry dictionary with orthogonal keys: the first query matches key 1, the second
# sits halfway between keys 0 and 1.

# %%
keys = 4.0 * torch.eye(3, device=device)  # (S=3, D=3): three orthogonal keys
values = torch.tensor([[10.0], [20.0], [30.0]], device=device)  # (S=3, Dv=1)
queries = torch.stack([keys[1], (keys[0] + keys[1]) / 2])  # (L=2, D=3)
weights = reference.softmax(queries @ keys.T)  # (L=2, S=3)
for name, row, out in zip(["matches key 1", "between keys 0 and 1"], weights, weights @ values):
    print(f"query {name:>20}: weights {[round(w, 3) for w in row.tolist()]}"
          f" -> output {out.item():.2f}")

# %% [markdown]
# ## 2. All scores at once: $QK^\top$
#
# A sequence has many queries. Stack the $L$ queries as the rows of
# $Q \in \mathbb{R}^{L \times d_k}$ and the $S$ keys as the rows of
# $K \in \mathbb{R}^{S \times d_k}$: then every score is one entry of a matrix product,
#
# $$ (QK^\top)_{ij} = q_i \cdot k_j, \qquad QK^\top \in \mathbb{R}^{L \times S}. $$
#
# Transformers run many of these products side by side: a batch of $B$ sequences and $H$
# attention heads (lesson 03). The course's layout, the same as
# `torch.nn.functional.scaled_dot_product_attention`, is `(B, H, L, D)`; `@` (`torch.matmul`)
# treats all leading dimensions as batch dimensions, so the only thing to get right is
# which axes of $K$ to transpose.
#
# **Exercise 1 (2 points).** Write `dot_scores(q, k)` for `q` of shape `(B, H, L, D)` and `k`
# of shape `(B, H, S, D)`, returning the raw (unscaled) scores of shape `(B, H, L, S)` in
# the dtype of the inputs. Raise a `ValueError` that names both shapes when the last
# dimensions differ.

# %% solution id=dot-scores
def dot_scores(q: Tensor, k: Tensor) -> Tensor:
    """Dot-product scores of every query with every key (Luong et al., 2015).

    q: (B, H, L, D), k: (B, H, S, D) -> (B, H, L, S), with scores[..., i, j] = q_i · k_j.
    """
    ### BEGIN SOLUTION
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q (B, H, L, D) and k (B, H, S, D) must share D: got shapes "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    return q @ k.transpose(-2, -1)  # (B, H, L, S)
    ### END SOLUTION


# %% tests id=dot-scores-tests points=2
from helpers.checks import lesson02 as checks
checks.dot_scores(dot_scores)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("02").dot_scores(dot_scores)
### END HIDDEN TESTS

# %% [markdown]
# ## 3. A softmax that survives large scores
#
# The softmax turns scores into weights:
# $\mathrm{softmax}(x)_j = e^{x_j} / \sum_i e^{x_i}$. Written like that it breaks on a
# computer. A `float32` holds numbers up to about $3.4 \times 10^{38}$, so $e^{x}$ is `inf`
# as soon as $x$ passes $\ln(3.4 \times 10^{38})$, and `inf / inf` is NaN. In the other
# direction, $e^{x}$ rounds to $0$ for very negative $x$, and a row of zeros divided by its
# zero sum is NaN too. The next cell computes where `float32` and `float64` overflow.
#
# The fix rests on one line of algebra: multiplying numerator and denominator by
# $e^{-c}$ changes nothing,
#
# $$ \mathrm{softmax}(x - c)_j = \frac{e^{x_j - c}}{\sum_i e^{x_i - c}}
#    = \frac{e^{-c}\, e^{x_j}}{e^{-c} \sum_i e^{x_i}} = \mathrm{softmax}(x)_j . $$
#
# Choose $c = \max_i x_i$: every exponent is then $\le 0$, so every $e^{x_j - c}$ lies in
# $(0, 1]$ and cannot overflow, and the largest one is exactly $1$, so the sum is at least
# $1$ and never underflows to $0$.
#
# **Masks.** Lesson 04 forbids some keys by setting their scores to $-\infty$, so that
# $e^{-\infty} = 0$. A query that may attend to *no* key has a row of only $-\infty$; its
# max is $-\infty$ and $x - c = -\infty - (-\infty)$ is NaN. `torch.softmax` returns NaN
# there, and so does `nn.MultiheadAttention` when every key of a query is masked. This
# course's convention is that such a row gets all-zero weights (the query reads nothing), so
# that no NaN reaches the output or the gradients. PyTorch's fused attention,
# `F.scaled_dot_product_attention`, adopted the same convention in version 2.5 (on the CPU:
# zeros and zero gradients); versions 2.2 to 2.4 return NaN, and some of its GPU kernels
# have returned NaN for such rows since. The cell ends by measuring what the PyTorch of
# this machine does.

# %%
def naive_softmax(x: Tensor) -> Tensor:
    """The textbook formula exp(x) / sum(exp(x)), without the shift: it overflows."""
    return x.exp() / x.exp().sum(dim=-1, keepdim=True)


for dtype in (torch.float32, torch.float64):
    largest = torch.finfo(dtype).max
    print(f"{str(dtype):>13}: largest number {largest:.3g}, exp overflows above "
          f"ln(max) = {math.log(largest):.2f}")
edge = torch.tensor([88.0, 89.0])  # float32
print(f"in float32, exp({edge.tolist()}) = {edge.exp().tolist()}")
for logits in (torch.tensor([1000.0, 1001.0, 1002.0]), torch.tensor([-1000.0, -1001.0, -1002.0])):
    print(f"naive  softmax({logits.tolist()}) = {naive_softmax(logits).tolist()}")
    print(f"stable softmax({logits.tolist()}) = {reference.softmax(logits).tolist()}")

masked_row = torch.full((3,), float("-inf"))
print(f"torch.softmax of an all -inf row: {torch.softmax(masked_row, dim=-1).tolist()};"
      f" the course's softmax: {reference.softmax(masked_row).tolist()}")
numbers = torch.Generator().manual_seed(0)  # its own stream: the global one stays untouched
q = torch.randn(1, 1, 2, 4, generator=numbers).to(device).requires_grad_()  # (B, H, L=2, D)
k, v = torch.randn(2, 1, 1, 3, 4, generator=numbers).to(device)  # (B, H, S=3, D) each
sees = torch.tensor([[True, True, False], [False, False, False]], device=device)  # query 1: none
out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sees)
out.sum().backward()
print(f"torch {torch.__version__} on {device.type}, F.scaled_dot_product_attention, the query "
      f"that sees no key: output {out[0, 0, 1].tolist()}, gradient {q.grad[0, 0, 1].tolist()}")
module = torch.nn.MultiheadAttention(4, 1, batch_first=True).to(device)
x = torch.randn(1, 3, 4, generator=numbers).to(device)
every_key_masked = torch.ones(1, 3, dtype=torch.bool, device=device)  # True = ignore this key
print(f"nn.MultiheadAttention with every key masked: "
      f"{module(x, x, x, key_padding_mask=every_key_masked)[0][0, 0].tolist()}")

# %% [markdown]
# **Exercise 2 (3 points).** Write `stable_softmax(x, dim=-1)` for `x` of any shape,
# returning weights of the same shape that sum to 1 along `dim`: subtract the maximum along
# `dim` (with `keepdim=True`, so that it broadcasts), exponentiate, normalise. A slice that
# is all $-\infty$ must give zeros, not NaN (hint: where the maximum is $-\infty$, subtract
# $0$ instead, and never divide by a zero sum). Do not call `torch.softmax` or the course's
# reference; the check and the grader notice.

# %% solution id=stable-softmax
def stable_softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Softmax along ``dim`` computed as exp(x - max) / sum(exp(x - max)), so it never overflows.

    A slice that is all -inf (a query that may attend to nothing) yields zeros, not NaN.
    """
    ### BEGIN SOLUTION
    row_max = x.amax(dim=dim, keepdim=True)
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    exp = (x - row_max).exp()  # every entry in [0, 1]
    total = exp.sum(dim=dim, keepdim=True)
    return exp / torch.where(total == 0, torch.ones_like(total), total)
    ### END SOLUTION


# %% tests id=stable-softmax-tests points=3
from helpers.checks import lesson02 as checks
checks.stable_softmax(stable_softmax)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("02").stable_softmax(stable_softmax)
### END HIDDEN TESTS

# %% [markdown]
# ## 4. Why divide by $\sqrt{d_k}$?
#
# Vaswani et al. (2017) scale the scores by $1/\sqrt{d_k}$ and explain it in a footnote:
# suppose the entries of $q$ and $k$ are independent with mean $0$ and variance $1$. Each
# product $q_i k_i$ then has mean $0$ and variance $\mathbb{E}[q_i^2]\,\mathbb{E}[k_i^2] = 1$,
# and the $d_k$ products are independent, so their variances add:
#
# $$ \mathbb{E}[q \cdot k] = 0, \qquad \mathrm{Var}(q \cdot k) = \sum_{i=1}^{d_k}
#    \mathrm{Var}(q_i k_i) = d_k, \qquad
#    \mathrm{Var}\!\left(\frac{q \cdot k}{\sqrt{d_k}}\right) = 1 . $$
#
# Unscaled scores spread out like $\sqrt{d_k}$. Feed a softmax scores whose gaps are large
# and it *saturates*: one weight goes to $1$ and the others to $0$. A saturated softmax also
# stops learning, because its Jacobian
#
# $$ \frac{\partial \alpha_i}{\partial s_j} = \alpha_i (\delta_{ij} - \alpha_j) $$
#
# vanishes when $\alpha$ is one-hot: whatever the loss, almost no gradient flows back into
# the queries and keys. The experiment below measures both effects for random $q$ and $k$
# with unit-variance entries, with and without the scaling: the variance of $q \cdot k$,
# the largest attention weight of a query over its keys, and the size of the gradient that
# reaches the scores, $\lVert J^\top u \rVert$, when a random unit-length gradient $u$
# arrives from above (computed by autograd).

# %%
D_KS = [1, 4, 16, 64, 256, 1024]  # head dimensions d_k to sweep
N_PAIRS = 2048  # (q, k) pairs per d_k for the variance
N_QUERIES, N_KEYS = 256, 16  # queries per d_k, each attending over N_KEYS keys
VARIANTS = {"unscaled: q·k": lambda d_k: 1.0,  # name -> the scale applied to the scores
            "scaled: q·k/√d_k": lambda d_k: 1 / math.sqrt(d_k)}


def random_dot_products(d_k: int) -> Tensor:
    """q·k for N_PAIRS pairs of vectors with i.i.d. N(0, 1) entries -> (N_PAIRS,)."""
    q, k = torch.randn(2, N_PAIRS, d_k, device=device)  # (N_PAIRS, d_k) each
    return (q * k).sum(dim=-1)


def random_attention_scores(d_k: int) -> Tensor:
    """Unscaled scores (N_QUERIES, N_KEYS) of random unit-variance queries, each against
    its own random keys."""
    q = torch.randn(N_QUERIES, 1, d_k, device=device)  # (N, 1, d_k)
    k = torch.randn(N_QUERIES, N_KEYS, d_k, device=device)  # (N, S, d_k)
    return (q @ k.transpose(-2, -1)).squeeze(-2)  # (N, S)


def score_gradient_norm(scores: Tensor) -> Tensor:
    """‖Jᵀu‖ per row of scores (N, S) -> (N,): the gradient that reaches the scores through
    the softmax when a random unit-length gradient u (N, S) arrives from above."""
    scores = scores.detach().requires_grad_()
    upstream = torch.randn_like(scores)
    upstream = upstream / upstream.norm(dim=-1, keepdim=True)  # (N, S), unit rows
    (gradient,) = torch.autograd.grad(reference.softmax(scores), scores, grad_outputs=upstream)
    return gradient.norm(dim=-1)


variance, max_weight, gradient_norm = ({name: [] for name in VARIANTS} for _ in range(3))
sweep_weights = {name: {} for name in VARIANTS}  # the weights, reused in section 7
for d_k in D_KS:
    # one draw per d_k, shared by both variants so that only the scale differs
    dots, raw_scores = random_dot_products(d_k), random_attention_scores(d_k)
    for name, scale_of in VARIANTS.items():
        variance[name].append((dots * scale_of(d_k)).var().item())
        scores = raw_scores * scale_of(d_k)  # (N, S)
        sweep_weights[name][d_k] = reference.softmax(scores)  # (N, S)
        max_weight[name].append(sweep_weights[name][d_k].amax(dim=-1).mean().item())
        gradient_norm[name].append(score_gradient_norm(scores).mean().item())

print(f"{'d_k':>5} | {'Var(q·k)':>9} {'scaled':>7} | {'max weight':>10} {'scaled':>7} |"
      f" {'‖gradient‖':>10} {'scaled':>7}")
unscaled, scaled = VARIANTS
for i, d_k in enumerate(D_KS):
    print(f"{d_k:>5} | {variance[unscaled][i]:>9.1f} {variance[scaled][i]:>7.2f} |"
          f" {max_weight[unscaled][i]:>10.3f} {max_weight[scaled][i]:>7.3f} |"
          f" {gradient_norm[unscaled][i]:>10.4f} {gradient_norm[scaled][i]:>7.4f}")
print(f"uniform weights over {N_KEYS} keys would give a max weight of {1 / N_KEYS:.4f}")
print(f"at d_k = {D_KS[-1]} the gradient reaching unscaled scores is "
      f"{gradient_norm[scaled][-1] / gradient_norm[unscaled][-1]:.1f}x smaller than with scaling")

fig, axes = plt.subplots(1, 3, figsize=(10, 4), layout="constrained")
curves(D_KS, variance, "head dimension d_k", "Var(q·k) over random pairs",
       "unscaled variance grows\nlike d_k; scaled stays 1", ax=axes[0], log_x=True, log_y=True)
curves(D_KS, max_weight, "head dimension d_k", f"mean largest weight over {N_KEYS} keys",
       "unscaled softmax saturates\ntoward one-hot", ax=axes[1], log_x=True)
axes[1].axhline(1 / N_KEYS, color="gray", linestyle="--", label=f"uniform: 1/{N_KEYS}")
axes[1].set_ylim(0, 1.05)
curves(D_KS, gradient_norm, "head dimension d_k", "mean ‖Jᵀu‖, gradient at the scores",
       "unscaled: less gradient\nreaches the scores", ax=axes[2], log_x=True)
axes[2].set_ylim(bottom=0)
for ax in axes:  # one legend for the three panels, below them
    ax.get_legend().remove()
fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncols=3)
fig.suptitle("dividing the scores by √d_k keeps the softmax responsive at every head size")
plt.show()

# %% [markdown]
# The left panel confirms $\mathrm{Var}(q\cdot k) = d_k$: the unscaled curve has slope one
# on the log-log axes, the scaled one is flat at $1$. In the middle, unscaled attention puts
# almost all its weight on a single key once $d_k$ reaches the hundreds (see the table),
# although the keys are random and none deserves it; with scaling, the largest weight barely
# moves with $d_k$ (the table's second `scaled` column). On the right, past the first few
# sizes the gradient through the
# unscaled softmax shrinks steadily as $d_k$ grows (the last line of the table says by how
# much at the largest $d_k$): those heads would barely learn. Scaling by $1/\sqrt{d_k}$
# keeps the softmax in its responsive range at every head size, which is why transformers
# keep it.
#
# ## 5. Scaled dot-product attention
#
# Put together, for queries $Q$ $(L \times d_k)$, keys $K$ $(S \times d_k)$ and values $V$
# $(S \times d_v)$ (Vaswani et al., 2017):
#
# $$ \mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d_k}}
#    + M\right) V, \qquad M_{ij} = \begin{cases} 0 & \text{query } i \text{ may see key } j \\
#    -\infty & \text{otherwise.} \end{cases} $$
#
# The course follows `torch.nn.functional.scaled_dot_product_attention`: a boolean `mask` is
# `True` where attention is *allowed* and broadcasts against the scores `(B, H, L, S)`; a
# given `scale` replaces $1/\sqrt{d_k}$. A query whose mask allows no key gets zero weights and
# a zero output, not NaN (section 3: PyTorch's fused attention agrees since version 2.5,
# `nn.MultiheadAttention` and `torch.softmax` do not).
#
# **Exercise 3 (3 points).** Write `attention(q, k, v, mask=None, scale=None)` for `q`
# `(B, H, L, D)`, `k` `(B, H, S, D)`, `v` `(B, H, S, Dv)`, returning `(out, weights)` with
# `out` `(B, H, L, Dv)` and `weights` `(B, H, L, S)`, in the dtype of `q`. Use
# `reference.softmax` for the softmax (so this exercise does not depend on your answer to
# exercise 2), but do not call a ready-made attention function
# (`F.scaled_dot_product_attention`, `reference.scaled_dot_product_attention`,
# `nn.MultiheadAttention`): the check and the grader notice.

# %% solution id=sdpa
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
              scale: float | None = None) -> tuple[Tensor, Tensor]:
    """softmax(q kᵀ · scale, masked) v, scale = 1/√d_k by default (Vaswani et al., 2017).

    q: (B, H, L, D), k: (B, H, S, D), v: (B, H, S, Dv); mask: bool, True = attend,
    broadcasting to (B, H, L, S). Returns out (B, H, L, Dv) and weights (B, H, L, S).
    """
    ### BEGIN SOLUTION
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale  # (B, H, L, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = reference.softmax(scores, dim=-1)  # (B, H, L, S), fully masked rows -> 0
    return weights @ v, weights  # (B, H, L, Dv), (B, H, L, S)
    ### END SOLUTION


# %% tests id=sdpa-tests points=3
from helpers.checks import lesson02 as checks
checks.attention(attention)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("02").attention(attention)
### END HIDDEN TESTS

# %% [markdown]
# ## 6. Looking inside: an attention heatmap
#
# A toy retrieval task makes the weights readable. Six fruits are stored in a dictionary:
# each has a random key vector (its "name") and a value (its price). Each query is the key
# of one fruit plus noise, asked in shuffled order; the last query is the average of two
# keys. The heatmap shows one row per query and one column per key: a clean retrieval is a
# single bright cell per row, and the ambiguous query splits its weight between its two
# fruits and returns a price between theirs. The weights come from the course's reference,
# `helpers.attention.scaled_dot_product_attention`, which your `attention` now matches.

# %%
FRUITS = ["apple", "banana", "cherry", "date", "fig", "grape"]
D_RETRIEVAL, NOISE = 32, 0.5
fruit_keys = torch.randn(len(FRUITS), D_RETRIEVAL, device=device)  # (S, D)
prices = torch.arange(1.0, len(FRUITS) + 1, device=device)[:, None]  # (S, 1): 1, 2, ... 6
order = torch.randperm(len(FRUITS), device=device)  # which fruit each query asks for
noisy = fruit_keys[order] + NOISE * torch.randn(len(FRUITS), D_RETRIEVAL, device=device)
blend = (fruit_keys[0] + fruit_keys[1]) / 2  # halfway between apple and banana
fruit_queries = torch.cat([noisy, blend[None]])  # (L, D)
query_labels = [f"≈ {FRUITS[i]}" for i in order.tolist()] + ["apple + banana"]

retrieved, fruit_weights = reference.scaled_dot_product_attention(
    fruit_queries[None, None], fruit_keys[None, None], prices[None, None])  # (1, 1, L, ...)
retrieved, fruit_weights = retrieved[0, 0, :, 0], fruit_weights[0, 0]  # (L,), (L, S)
for label, price, row in zip(query_labels, retrieved.tolist(), fruit_weights):
    print(f"{label:>15}: top key {FRUITS[row.argmax().item()]:>6} "
          f"(weight {row.max().item():.3f}), retrieved price {price:.2f}")
correct = (fruit_weights[:-1].argmax(dim=-1) == order).float().mean().item()
print(f"noisy queries that retrieve their own fruit: {correct:.0%}")

key_labels = [f"{fruit} ({price:g})" for fruit, price in zip(FRUITS, prices[:, 0].tolist())]
ax = attention_heatmap(fruit_weights, x_labels=key_labels, y_labels=query_labels,
                       title="each noisy query reads its own fruit; the blend splits its weight")
ax.set_xlabel("key: fruit (its value, the price)")
ax.set_ylabel("query: the fruit it asks for")
plt.show()

# %% [markdown]
# ## 7. How spread out is attention? Entropy
#
# The largest weight tells part of the story; the *entropy* of a query's weights tells all
# of it (Shannon, 1948, *A Mathematical Theory of Communication*):
#
# $$ H(\alpha) = -\sum_{j=1}^{S} \alpha_j \ln \alpha_j , \qquad
#    0 \le H(\alpha) \le \ln S , $$
#
# with the convention $0 \ln 0 = 0$ (a key with zero weight, for instance a masked one,
# contributes nothing). $H = 0$ means the query reads one key only; $H = \ln S$ means it
# averages all $S$ keys uniformly. Entropy is a common diagnostic of trained attention heads:
# Zhai et al. (2023), *Stabilizing Transformer Training by Preventing Attention Entropy
# Collapse*, trace unstable training to heads whose entropy falls toward $0$.
#
# **Exercise 4 (2 points).** Write `attention_entropy(weights)` that maps weights
# `(..., L, S)` to one entropy in nats per query, `(..., L)`. It must return `0`, not NaN,
# for a one-hot row and for an all-zero row (a query that attends to nothing). Write the sum
# yourself: `torch.special.entr` and `torch.xlogy` would do the exercise for you (the check
# and the grader notice).

# %% solution id=attention-entropy
def attention_entropy(weights: Tensor) -> Tensor:
    """Shannon entropy in nats of each query's attention weights: (..., L, S) -> (..., L).

    Uses 0 · ln 0 = 0, so one-hot and all-zero (fully masked) rows give 0.
    """
    ### BEGIN SOLUTION
    safe = torch.where(weights > 0, weights, torch.ones_like(weights))  # ln 1 = 0 where w = 0
    return -(weights * safe.log()).sum(dim=-1)
    ### END SOLUTION


# %% tests id=attention-entropy-tests points=2
from helpers.checks import lesson02 as checks
checks.attention_entropy(attention_entropy)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("02").attention_entropy(attention_entropy)
### END HIDDEN TESTS

# %% [markdown]
# With your `attention_entropy`, back to the random queries of section 4: the mean entropy
# per query, against the ceiling $\ln S$ of uniform attention. Then the entropies of the
# retrieval heatmap's rows: the clean retrievals are low, and the two-fruit blend, which
# splits its weight, is the highest of all rows. An even split between exactly two keys
# would give $\ln 2$; the blend also leaks some weight to the other fruits, which adds to
# its entropy (compare the printed values).

# %%
entropy = {name: [attention_entropy(sweep_weights[name][d_k]).mean().item() for d_k in D_KS]
           for name in VARIANTS}
print(f"ceiling ln {N_KEYS} = {math.log(N_KEYS):.3f} nats")
for name in VARIANTS:
    print(f"{name:>18}: " + ", ".join(f"d_k={d_k}: {h:.3f}" for d_k, h in zip(D_KS, entropy[name])))
retrieval_entropy = attention_entropy(fruit_weights)  # (L,)
print("retrieval rows: " + ", ".join(
    f"{label} {h:.3f}" for label, h in zip(query_labels, retrieval_entropy.tolist())))
print(f"highest entropy of a clean retrieval: {retrieval_entropy[:-1].max():.3f}; "
      f"the blend: {retrieval_entropy[-1]:.3f}; an even split of two keys: ln 2 = "
      f"{math.log(2):.3f}")

ax = curves(D_KS, entropy, "head dimension d_k", "mean entropy per query (nats)",
            "unscaled attention collapses (entropy → 0); scaled does not", log_x=True)
ax.axhline(math.log(N_KEYS), color="gray", linestyle="--",
           label=f"ln {N_KEYS}: uniform over {N_KEYS} keys")
ax.set_ylim(bottom=0)
ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the axes, clear of both curves
plt.show()

# %% [markdown]
# ## What's next
#
# One attention computes one kind of similarity: a query can only ask one question of the
# keys. Lesson 03 runs several attentions side by side, *multi-head attention*: the model
# projects its input into $h$ smaller sets of queries, keys and values, attends in each, and
# mixes the results with an output projection. You will split and merge heads, count the
# parameters, and load the weights of `torch.nn.MultiheadAttention` into your own module to
# prove the two agree.
