# %% [markdown]
# # Lesson 03: Multi-head attention
#
# In lesson 02 each query produced **one** softmax over the keys, so each output is **one**
# weighted average of the values. That is a limit: a word often needs several things at
# once (its previous word, its subject, the start of the sentence), and one set of weights
# cannot point at all of them sharply without blurring them together.
#
# Vaswani et al. (2017), *Attention Is All You Need*, run several attentions side by side,
# each in its own small subspace, and concatenate the results. In this lesson you build:
#
# 1. `split_heads` and `merge_heads`: the reshapes that turn one wide attention into `h`
#    narrow ones (and back);
# 2. a `MultiHeadAttention` module with its output projection;
# 3. its parameter count, checked against PyTorch's `nn.MultiheadAttention`;
# 4. a loader that copies the weights of a `torch.nn.MultiheadAttention` into the course's
#    module, so both compute the same function;
# 5. `attention_from_to`: how much each head attends from one word to another, the
#    measurement that finds the head doing a grammatical job;
#
# and then watch heads of tiny models specialise: on positions (the previous token, the
# first token), and on grammar (a verb that agrees with its subject, a pronoun with its
# antecedent), and remove them one at a time to see which ones the model needs.

# %%
try:
    import helpers
except ImportError:  # Colab or a bare kernel: install the course package
    %pip install -q "attention-course @ git+COURSE_REPOSITORY"

# %% id=imports
import copy
import time
from collections.abc import Callable

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from helpers import attention as ref
from helpers.device import get_device, is_autograding, seed_everything
from helpers.plotting import attention_heatmap, head_patterns
from helpers.pretrained import local_pretrained
from helpers.tasks import (AGREEMENT_LENGTH, IGNORE_INDEX, AgreementGrammar, agreement_task,
                           previous_and_first_token_task)

generator = seed_everything(0)
device = get_device()
torch.set_num_threads(1)  # small tensors: one CPU thread is fastest, on a busy CPU by far
print(f"running on {device}")

# %% [markdown]
# ## The idea
#
# With model width $d_{\text{model}}$ and $h$ heads of width $d_k = d_{\text{model}} / h$,
# head $i$ has its own projections $W_i^Q, W_i^K, W_i^V \in \mathbb{R}^{d_{\text{model}}
# \times d_k}$ and attends on its own. (As in the paper, the rows of $X$ are positions and
# the weights multiply on the right, so a weight matrix is (input width) $\times$ (output
# width); `nn.Linear` stores the transpose, see below.)
#
# $$\text{head}_i = \text{Attention}(X W_i^Q,\; C W_i^K,\; C W_i^V)
#   = \text{softmax}\!\left(\frac{(X W_i^Q)(C W_i^K)^\top}{\sqrt{d_k}}\right) C W_i^V,$$
#
# where $X$ holds the $L$ queries' inputs and $C$ the $S$ inputs that keys and values come
# from ($C = X$ in self-attention). The heads are concatenated and mixed by an output
# projection $W^O \in \mathbb{R}^{d_{\text{model}} \times d_{\text{model}}}$:
#
# $$\text{MultiHead}(X, C) = \text{Concat}(\text{head}_1, \dots, \text{head}_h)\, W^O.$$
#
# In code nobody keeps $h$ separate matrices. Stacking the $W_i^Q$ side by side gives one
# $d_{\text{model}} \times d_{\text{model}}$ matrix $W^Q$, so *one* `nn.Linear` computes all
# heads' queries at once, and head $i$ is the slice of features $i d_k \dots (i+1) d_k$.
# `nn.Linear(d_in, d_out)` computes $x W^\top + b$ with a `weight` of shape
# $(d_{\text{out}}, d_{\text{in}})$: its `weight` is $(W^Q)^\top$, the same numbers laid out
# (out, in).
# Cutting the features into heads is a reshape, and moving the head axis next to the batch
# axis lets one batched matrix product run every head in parallel:
#
# $$(B, L, h \cdot d_k) \xrightarrow{\text{view}} (B, L, h, d_k)
#   \xrightarrow{\text{transpose}(1,2)} (B, h, L, d_k).$$
#
# The order matters: a `view` straight to $(B, h, L, d_k)$ has the right shape and the wrong
# content, since it cuts the flat memory of positions and features in the wrong places.
#
# **Exercise 1 (2 points).** Write `split_heads`. When the last dimension does not divide
# into `n_heads` heads, raise a `ValueError` that names both sizes (before any reshape:
# torch's own error would not say what went wrong). Do not call `ref.split_heads`; the
# grader checks.

# %% solution id=split-heads
def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, L, H*D) -> (B, H, L, D): head h gets features h*D .. (h+1)*D (Vaswani et al., 2017).

    Raise a ValueError that names the sizes when the last dim is not divisible by n_heads.
    """
    ### BEGIN SOLUTION
    B, L, E = x.shape
    if E % n_heads:
        raise ValueError(f"last dim {E} of x (B, L, H*D) is not divisible by n_heads={n_heads}")
    return x.view(B, L, n_heads, E // n_heads).transpose(1, 2)  # (B, H, L, D)
    ### END SOLUTION


# %% tests id=split-heads-tests points=2
from helpers.checks import lesson03 as checks
checks.split_heads(split_heads)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("03").split_heads(split_heads)
### END HIDDEN TESTS

# %% [markdown]
# Merging is the inverse: move the head axis back behind the positions, then flatten the
# last two axes. After `transpose` the tensor is no longer contiguous in memory, so use
# `reshape` (which copies when it must), not `view`.
#
# **Exercise 2 (1 point).** Write `merge_heads` for a tensor `(B, H, L, D)`, such as the
# output of attention, without calling `ref.merge_heads`.

# %% solution id=merge-heads
def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H*D): concatenate the heads, the inverse of ``split_heads``."""
    ### BEGIN SOLUTION
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B, L, H * D)  # (B, L, H*D)
    ### END SOLUTION


# %% tests id=merge-heads-tests points=1
from helpers.checks import lesson03 as checks
checks.merge_heads(merge_heads)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("03").merge_heads(merge_heads)
### END HIDDEN TESTS

# %% [markdown]
# ## The module
#
# Now assemble the module: project, split, attend in every head at once, merge, project
# out. **Exercise 3 (3 points).** The constructor is written for you; fill in `forward`. So
# that this exercise does not depend on the two before, use the course's references
# `ref.split_heads`, `ref.merge_heads` and `ref.scaled_dot_product_attention` (lesson 02's
# attention, which returns `(out, weights)`), but not a ready-made multi-head attention
# (`ref.MultiHeadAttention`, `nn.MultiheadAttention`). `mask` is boolean, `True` where
# attention is allowed, and broadcasts against `(B, H, L, S)`. The module must work in
# float64 too, after `.double()`.

# %% solution id=mha-forward
class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al., 2017): h attentions in parallel, then W^O."""

    def __init__(self, d_model: int, n_heads: int, bias: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_heads = d_model, n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)  # W^Q, all heads side by side
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)  # W^K
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)  # W^V
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)  # W^O

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, d_model) attends to context (B, S, d_model), x itself by default.

        Returns (B, L, d_model).
        """
        ### BEGIN SOLUTION
        context = x if context is None else context
        q = ref.split_heads(self.q_proj(x), self.n_heads)  # (B, H, L, D)
        k = ref.split_heads(self.k_proj(context), self.n_heads)  # (B, H, S, D)
        v = ref.split_heads(self.v_proj(context), self.n_heads)  # (B, H, S, D)
        out, _ = ref.scaled_dot_product_attention(q, k, v, mask=mask)  # (B, H, L, D)
        return self.out_proj(ref.merge_heads(out))  # (B, L, d_model)
        ### END SOLUTION


# %% tests id=mha-forward-tests points=3
from helpers.checks import lesson03 as checks
checks.mha_forward(MultiHeadAttention)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("03").mha_forward(MultiHeadAttention)
### END HIDDEN TESTS

# %% [markdown]
# ## Counting parameters
#
# Four $d_{\text{model}} \times d_{\text{model}}$ matrices ($W^Q, W^K, W^V, W^O$) and, with
# biases, four bias vectors of length $d_{\text{model}}$:
#
# $$N = 4 d_{\text{model}}^2 + 4 d_{\text{model}}.$$
#
# The number of heads does not appear: more heads means narrower heads, not more weights.
# In cross-attention the keys and values may come from a memory of another width;
# `nn.MultiheadAttention` calls those widths `kdim` and `vdim`, and then $W^K$ is
# $k_{\text{dim}} \times d_{\text{model}}$ and $W^V$ is $v_{\text{dim}} \times d_{\text{model}}$
# (PyTorch stores them transposed, as `k_proj_weight` of shape $(d_{\text{model}},
# k_{\text{dim}})$ and `v_proj_weight`; their outputs still have width $d_{\text{model}}$, so
# the biases do not change).
#
# **Exercise 4 (1 point).** Write the count from the formula (do not build a module and
# count its tensors; the grader checks).

# %% solution id=param-count
def mha_param_count(d_model: int, n_heads: int, bias: bool = True, kdim: int | None = None,
                    vdim: int | None = None) -> int:
    """Number of parameters (a Python int) of multi-head attention; keys and values are
    projected from inputs of width kdim and vdim (d_model when None)."""
    ### BEGIN SOLUTION
    kdim = d_model if kdim is None else kdim
    vdim = d_model if vdim is None else vdim
    weights = d_model * d_model + d_model * kdim + d_model * vdim + d_model * d_model
    biases = 4 * d_model if bias else 0
    return weights + biases
    ### END SOLUTION


# %% tests id=param-count-tests points=1
from helpers.checks import lesson03 as checks
checks.param_count(mha_param_count)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("03").param_count(mha_param_count)
### END HIDDEN TESTS

# %% [markdown]
# The formula against PyTorch's module, for the width of the original Transformer
# (Vaswani et al., 2017) and of BERT-base / GPT-2 small, and for a few head counts:

# %%
for d_model in (512, 768):
    for n_heads in (1, 8, 12 if d_model == 768 else 16):
        torch_count = sum(p.numel() for p in nn.MultiheadAttention(d_model, n_heads).parameters())
        print(f"d_model={d_model:4d} heads={n_heads:2d}: formula {4 * d_model**2 + 4 * d_model:,}"
              f"  nn.MultiheadAttention {torch_count:,}")

# %% [markdown]
# ## Loading PyTorch's weights
#
# `nn.MultiheadAttention` stores the three input projections stacked in one tensor,
# `in_proj_weight` of shape $(3 d_{\text{model}}, d_{\text{model}})$, rows in the order
# $W^Q, W^K, W^V$, and their biases stacked the same way in `in_proj_bias` (which is `None`
# when `bias=False`); the output projection is `out_proj`, an `nn.Linear`. (With `kdim` or
# `vdim` different from $d_{\text{model}}$ it keeps separate `q_proj_weight`,
# `k_proj_weight`, `v_proj_weight` instead; we do not need that case.) Both modules store
# every weight as `nn.Linear` does, $(\text{out}, \text{in})$: each block of
# `in_proj_weight` is the transpose of the $W^Q$, $W^K$, $W^V$ of the formulas above, exactly
# like our `q_proj.weight`, so no transposes are needed.
#
# **Exercise 5 (2 points).** Copy the weights of `theirs` into `ours`, a course
# `ref.MultiHeadAttention` (its projections are called `q_proj`, `k_proj`, `v_proj`,
# `out_proj`, like yours), in place, under `torch.no_grad()`; copy the biases only when
# `theirs` has them (`bias=False` leaves `in_proj_bias` as `None`). Copy the tensors
# yourself: `ref.MultiHeadAttention.from_torch` would do it for you (the grader checks).

# %% solution id=load-torch-mha
def load_torch_mha(ours: nn.Module, theirs: nn.MultiheadAttention) -> None:
    """Copy ``theirs``' stacked q/k/v projections and output projection into ``ours``."""
    ### BEGIN SOLUTION
    with torch.no_grad():
        projections = (ours.q_proj, ours.k_proj, ours.v_proj)
        for proj, weight in zip(projections, theirs.in_proj_weight.chunk(3)):  # 3 x (E, E)
            proj.weight.copy_(weight)
        ours.out_proj.weight.copy_(theirs.out_proj.weight)
        if theirs.in_proj_bias is not None:
            for proj, bias in zip(projections, theirs.in_proj_bias.chunk(3)):  # 3 x (E,)
                proj.bias.copy_(bias)
            ours.out_proj.bias.copy_(theirs.out_proj.bias)
    ### END SOLUTION


# %% tests id=load-torch-mha-tests points=2
from helpers.checks import lesson03 as checks
checks.load_torch_mha(load_torch_mha)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("03").load_torch_mha(load_torch_mha)
### END HIDDEN TESTS

# %% [markdown]
# With the weights loaded, the course's module and PyTorch's compute the same function,
# here on a causal mask (PyTorch's `attn_mask` is `True` where attention is *forbidden*,
# the opposite of ours, hence the `~`). The course's reference is used, so this runs even
# before your loader is done:

# %%
theirs = nn.MultiheadAttention(64, 8, batch_first=True).to(device)
ours = ref.MultiHeadAttention.from_torch(theirs)
x = torch.randn(4, 10, 64, device=device)
mask = ref.causal_mask(10, device=device)
with torch.no_grad():
    difference = (ours(x, mask=mask) - theirs(x, x, x, attn_mask=~mask)[0]).abs().max()
print(f"largest difference from nn.MultiheadAttention: {difference:.2e}")

# %% [markdown]
# ## Experiment: heads specialise
#
# Do heads really learn different things? Studies of trained translation and language
# models found heads with clear roles: attending to the previous token, to rare words, to
# syntactic relations (Voita et al., 2019, *Analyzing Multi-Head Self-Attention: Specialized
# Heads Do the Heavy Lifting, the Rest Can Be Pruned*; Clark et al., 2019, *What Does BERT
# Look At? An Analysis of BERT's Attention*), and also that many heads can be removed at
# little cost (Michel et al., 2019, *Are Sixteen Heads Really Better than One?*).
#
# A task where specialisation pays: at each position, name both the **previous token** and
# the **first token** of the sequence. One softmax that splits its weight between the two
# positions returns a blend of two value vectors, and with equal weights the blend
# $\tfrac12(v_a + v_b)$ is the same whether $a$ came first and $b$ previous or the other way
# round: a single head must weigh the two positions unequally and untangle both tokens from
# one mixed vector. Two heads, each looking at one position, keep the lookups apart.
#
# The model is the smallest that can: token and position embeddings, one causal multi-head
# attention layer (the course's reference) added to them (a residual connection), and a
# linear readout that predicts the two tokens. We train it with `N_HEADS` heads and, for
# comparison, with a single head of the same width, which has exactly as many parameters
# (the count above does not depend on $h$), on the same number of batches. The models
# multiply matrices of a few dozen rows: splitting such work over CPU threads costs more
# than it saves, and on a busy machine far more, which is why the lesson runs torch on one
# thread (the imports cell).

# %%
VOCAB, LENGTH, D_MODEL, N_HEADS = 16, 12, 32, 4
generator = seed_everything(0)  # the hidden tests above drew random seeds: start afresh


class OneLayerModel(nn.Module):
    """Embeddings, one causal multi-head attention layer with a residual connection, and a
    readout of ``n_outputs`` tokens per position."""

    def __init__(self, vocab: int, length: int, d_model: int, n_heads: int,
                 n_outputs: int = 1):
        super().__init__()
        self.vocab, self.n_outputs = vocab, n_outputs
        self.token = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(length, d_model)
        self.attention = ref.MultiHeadAttention(d_model, n_heads)
        self.readout = nn.Linear(d_model, n_outputs * vocab)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, L) -> logits (B, L, n_outputs, vocab) and attention weights (B, H, L, L)."""
        B, L = tokens.shape
        x = self.token(tokens) + self.position.weight[:L]  # (B, L, d_model)
        mask = ref.causal_mask(L, device=tokens.device)  # (L, L)
        out, weights = self.attention(x, mask=mask, need_weights=True)
        logits = self.readout(x + out)  # (B, L, n_outputs * vocab)
        return logits.view(B, L, self.n_outputs, self.vocab), weights


def train(model: nn.Module, batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
          steps: int) -> nn.Module:
    """`steps` Adam steps on fresh batches ``(tokens, targets)``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for step in range(steps):
        tokens, targets = batch()
        logits, _ = model(tokens)  # (B, L, n_outputs, vocab)
        loss = F.cross_entropy(logits.flatten(0, 2), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def lookup_accuracy(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor
                    ) -> tuple[float, float]:
    """Accuracy on (previous token, first token), ignoring unscored positions."""
    with torch.no_grad():
        predictions = model(tokens)[0].argmax(-1)  # (B, L, 2)
    scored = targets != IGNORE_INDEX
    correct = (predictions == targets) & scored
    accuracy = correct.sum(dim=(0, 1)) / scored.sum(dim=(0, 1))  # (2,)
    return float(accuracy[0]), float(accuracy[1])


def lookup_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """32 fresh sequences with their (previous token, first token) targets."""
    return previous_and_first_token_task(32, LENGTH, VOCAB, generator, device)


steps = 30 if is_autograding() else 120
started = time.perf_counter()
model = train(OneLayerModel(VOCAB, LENGTH, D_MODEL, N_HEADS, n_outputs=2).to(device),
              lookup_batch, steps)
test_tokens, test_targets = previous_and_first_token_task(512, LENGTH, VOCAB, generator, device)
one_head = train(OneLayerModel(VOCAB, LENGTH, D_MODEL, 1, n_outputs=2).to(device),
                 lookup_batch, steps)
print(f"trained both models in {time.perf_counter() - started:.1f} s")
print(f"after {steps} steps, accuracy on {len(test_tokens)} test sequences "
      f"(chance level {1 / VOCAB:.1%}):")
for name, trained in ((f"{N_HEADS} heads", model), ("1 head", one_head)):
    n_params = sum(p.numel() for p in trained.parameters())
    previous_acc, first_acc = lookup_accuracy(trained, test_tokens, test_targets)
    print(f"  {name:8s} ({n_params:,} parameters): previous token {previous_acc:6.1%}, "
          f"first token {first_acc:6.1%}")

# %% [markdown]
# With as many parameters and the same training, the single head is left behind: splitting
# one softmax between two lookups is hard, giving each lookup its own head is easy.
#
# Where does each of the `N_HEADS` heads look? Their attention, averaged over the test
# batch: a "previous token" head lights up the diagonal just below the main one, a "first
# token" head the first column. (Query 0 can only see itself, so every head's first row is
# the same.)

# %%
with torch.no_grad():
    _, weights = model(test_tokens)  # (B, H, L, L)
average = weights.mean(dim=0)  # (H, L, L)
previous_weight = average.diagonal(offset=-1, dim1=1, dim2=2)[:, 1:].mean(dim=-1)  # (H,)
first_weight = average[:, 2:, 0].mean(dim=-1)  # (H,)
titles = [f"head {h}: prev {float(p):.2f}, first {float(f):.2f}"
          for h, (p, f) in enumerate(zip(previous_weight, first_weight))]
head_patterns(average, head_titles=titles, xlabel="key position", ylabel="query position",
              title="each head learned one lookup: one step back (sub-diagonal) "
                    "or the first token (first column)")
plt.show()
for h in range(N_HEADS):
    print(f"head {h}: mean weight on the previous token {previous_weight[h]:.2f}, "
          f"on the first token {first_weight[h]:.2f} (positions 2 and later)")

# %% [markdown]
# Which heads matter? Following Michel et al. (2019), remove one head at a time and measure
# the accuracy again. A head is removed by zeroing its $d_k$ columns of $W^O$: after
# `merge_heads`, head $h$ occupies features $h d_k \dots (h+1) d_k$, and those are exactly
# the columns of `out_proj.weight` that read it. Removing a single head costs anything from
# nothing to a large part of its lookup, depending on how much of that lookup it carries;
# removing every head of a role drops that lookup toward chance level (one guess in
# `VOCAB`) and leaves the other lookup untouched.

# %%
def without_heads(model: nn.Module, heads: list[int]) -> nn.Module:
    """A copy of a one-layer model whose heads ``heads`` are removed: their columns of W^O
    are zero (Michel et al., 2019)."""
    ablated = copy.deepcopy(model)
    head_dim = ablated.attention.d_model // ablated.attention.n_heads
    with torch.no_grad():
        for h in heads:
            ablated.attention.out_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
    return ablated


roles = ["previous" if p > f else "first" for p, f in zip(previous_weight, first_weight)]
by_role = [[h for h in range(N_HEADS) if roles[h] == role] for role in ("previous", "first")]
print(f"chance level {1 / VOCAB:.1%}; accuracy on (previous token, first token):")
previous_acc, first_acc = lookup_accuracy(model, test_tokens, test_targets)
print(f"  {'all heads kept':36s} {previous_acc:6.1%}  {first_acc:6.1%}")
for removed in [[h] for h in range(N_HEADS)] + [heads for heads in by_role if len(heads) > 1]:
    previous_acc, first_acc = lookup_accuracy(without_heads(model, removed), test_tokens,
                                              test_targets)
    name = (f"without head {removed[0]} ({roles[removed[0]]})" if len(removed) == 1
            else f"without heads {removed} (all {roles[removed[0]]})")
    print(f"  {name:36s} {previous_acc:6.1%}  {first_acc:6.1%}")

# %% [markdown]
# ## Experiment: heads with grammatical roles
#
# Positions are the easy part. The heads that made the analyses famous track grammar:
# Clark et al. (2019) found BERT heads that attend from verbs to their objects, from nouns
# to their determiners, and from pronouns to the nouns they refer to (coreference); Voita et
# al. (2019) found heads that follow syntactic relations in translation models. Linzen,
# Dupoux and Goldberg (2016), *Assessing the Ability of LSTMs to Learn Syntax-Sensitive
# Dependencies*, made **subject-verb agreement** the standard test of syntax in neural
# networks: in "the keys to the cabinet *are*", the verb agrees with "keys", several words
# back, not with the nearer "cabinet", an *attractor* of the other number.
#
# `helpers.tasks.agreement_task` writes sentences of a toy English with two agreements. A
# subject, possibly after adjectives, is followed by up to two prepositional phrases whose
# nouns have any number and gender; then a verb slot `<verb>` to fill with `is` or `are`
# (agreeing with the subject in number), and after a full stop a pronoun slot `<pron>` to
# fill with `he`, `she`, `it` or `they` (agreeing with the subject, its antecedent, in
# gender and number). The model reads the sentence left to right (causal attention) and
# fills both slots. A few sentences, with the right words for their slots:

# %%
GRAMMAR = AgreementGrammar()
N_AGREEMENT_HEADS, D_AGREEMENT = 4, 16
generator = seed_everything(0)
examples = agreement_task(4, generator, device)
for inputs, targets in zip(examples.inputs, examples.targets):
    answers = [GRAMMAR.words[int(t)] for t in targets[targets != IGNORE_INDEX]]
    print(f"{GRAMMAR.decode(inputs):62s} -> {', '.join(answers)}")


def agreement_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """64 fresh sentences and the words of their two slots."""
    batch = agreement_task(64, generator, device)
    return batch.inputs, batch.targets[..., None]  # targets (B, L, 1): one output per position


started = time.perf_counter()
grammar_model = train(OneLayerModel(len(GRAMMAR), AGREEMENT_LENGTH, D_AGREEMENT,
                                    N_AGREEMENT_HEADS).to(device),
                      agreement_batch, steps=100 if is_autograding() else 300)
print(f"trained in {time.perf_counter() - started:.1f} s")
test = agreement_task(1000, generator, device)
rows = torch.arange(len(test.inputs), device=device)
verb_at = (test.inputs == GRAMMAR.verb_id).int().argmax(dim=1)  # (B,): one verb slot each
pronoun_at = (test.inputs == GRAMMAR.pronoun_id).int().argmax(dim=1)  # (B,)
subject_at = test.antecedent[rows, verb_at]  # (B,): the word both slots agree with


def agreement_accuracy(model: nn.Module) -> dict[str, float]:
    """Accuracy of the verb slot (all sentences, and those with an attractor) and of the
    pronoun slot."""
    with torch.no_grad():
        predicted = model(test.inputs)[0][..., 0, :].argmax(-1)  # (B, L)
    right = predicted == test.targets  # (B, L)
    verb_right, pronoun_right = right[rows, verb_at].float(), right[rows, pronoun_at].float()
    return {"verb": float(verb_right.mean()),
            "verb, attractor": float(verb_right[test.attracted].mean()),
            "pronoun": float(pronoun_right.mean())}


print(f"{int(test.attracted.sum())} of {len(test.inputs)} test sentences have an attractor; "
      f"chance: {1 / len(GRAMMAR.VERBS):.0%} for the verb, {1 / len(GRAMMAR.PRONOUNS):.0%} for "
      "the pronoun")
print("accuracy: " + ", ".join(f"{name} {value:.1%}"
                               for name, value in agreement_accuracy(grammar_model).items()))

# %% [markdown]
# Which head does the agreeing? Its attention should go from the verb slot to the subject,
# and from the pronoun slot to the antecedent.
#
# **Exercise 6 (2 points).** Write `attention_from_to(weights, queries, keys)`: `weights`
# `(B, H, L, S)` are the attention weights of a batch of sentences, `queries` and `keys`
# `(B,)` hold one query position and one key position per sentence (say, where its verb and
# its subject are). Return `(H,)`: for each head, the mean over the batch of
# `weights[b, h, queries[b], keys[b]]`, in the dtype of the weights, without a Python loop
# over the batch. Mind the trap of advanced indexing: `weights[:, :, queries, keys]` pairs
# *every* sentence with *every* sentence's positions.

# %% solution id=attention-from-to
def attention_from_to(weights: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor
                      ) -> torch.Tensor:
    """Mean over the batch of weights[b, :, queries[b], keys[b]]: weights (B, H, L, S),
    queries (B,), keys (B,) -> (H,)."""
    ### BEGIN SOLUTION
    batch = torch.arange(weights.shape[0], device=weights.device)  # (B,)
    return weights[batch, :, queries, keys].mean(dim=0)  # (B, H) -> (H,)
    ### END SOLUTION


# %% tests id=attention-from-to-tests points=2
from helpers.checks import lesson03 as checks
checks.attention_from_to(attention_from_to)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("03").attention_from_to(attention_from_to)
### END HIDDEN TESTS

# %% [markdown]
# Each head's attention on one test sentence with an attractor (rows: the word that
# attends; columns: the word it reads), titled with its mean weight over the whole test
# set from the verb slot to the subject and from the pronoun slot to the antecedent,
# measured with your `attention_from_to`:

# %%
with torch.no_grad():
    _, grammar_weights = grammar_model(test.inputs)  # (B, H, L, L)
to_subject = attention_from_to(grammar_weights, verb_at, subject_at)  # (H,)
to_antecedent = attention_from_to(grammar_weights, pronoun_at, subject_at)  # (H,)
verb_head, pronoun_head = int(to_subject.argmax()), int(to_antecedent.argmax())
example = int(torch.nonzero(test.attracted)[0])
length = int((test.inputs[example] != GRAMMAR.pad_id).sum())
words = GRAMMAR.decode(test.inputs[example]).split()
titles = [f"head {h}: verb→subject {float(s):.2f},\npronoun→antecedent {float(a):.2f}"
          for h, (s, a) in enumerate(zip(to_subject, to_antecedent))]
readers = (f"head {verb_head} reads the subject from the verb slot and from the pronoun slot"
           if verb_head == pronoun_head else f"head {verb_head} reads the subject from the verb "
           f"slot, head {pronoun_head} from the pronoun slot")
head_patterns(grammar_weights[example, :, :length, :length], head_titles=titles, labels=words,
              xlabel="key (word read)", ylabel="query (word attending)",
              title=f"{readers}, past the attractor")
plt.show()
print(f"verb→subject: head {verb_head} ({to_subject[verb_head]:.2f}); "
      f"pronoun→antecedent: head {pronoun_head} ({to_antecedent[pronoun_head]:.2f})")

# %% [markdown]
# A weight says where a head looks, not whether the model needs what it finds there
# (Jain and Wallace, 2019, *Attention is not Explanation*): other heads may carry the same
# information, and a large weight on a small value vector moves nothing. The test is to
# remove the head and measure again, as above. If the weights found the right head,
# removing it costs the most on its agreement, down toward chance (printed above), while
# removing a head that does neither costs little. Compare with the printout, and with
# the same model trained from another seed: which head takes the job changes, and some
# seeds spread it over two heads, each of which can then be removed at little cost.

# %%
print("accuracy: verb | verb, attractor | pronoun")
for name, removed in [("all heads kept", [])] + [(f"without head {h}", [h])
                                                 for h in range(N_AGREEMENT_HEADS)]:
    accuracy = agreement_accuracy(without_heads(grammar_model, removed))
    role = [role for role, head in (("verb→subject", verb_head),
                                    ("pronoun→antecedent", pronoun_head)) if removed == [head]]
    print(f"  {name:15s} {accuracy['verb']:6.1%} | {accuracy['verb, attractor']:6.1%} | "
          f"{accuracy['pronoun']:6.1%}  {' and '.join(role)}")

# %% [markdown]
# ### Optional: the same view on a pretrained BERT
#
# Clark et al. (2019) made these measurements on BERT-base (12 layers of 12 heads). The
# cell below repeats ours on the sentence of Linzen et al. when the `transformers` package
# and a downloaded copy of `bert-base-uncased` are on this machine (it never downloads
# anything itself; to get it, run `transformers.AutoTokenizer.from_pretrained(name)` and
# `transformers.BertModel.from_pretrained(name)` with `name = "bert-base-uncased"` once while
# online), and says why it skipped otherwise. It prints the three heads that
# attend most from "are" to its subject "keys".

# %% id=bert-heads
def bert_agreement_heads(name: str = "bert-base-uncased",
                         sentence: str = "the keys to the cabinet are on the table",
                         verb: str = "are", subject: str = "keys") -> None:
    """The heads of a local pretrained BERT that attend most from ``verb`` to ``subject``."""
    loaded = local_pretrained("BertModel", name, attn_implementation="eager")
    if loaded is None:
        return
    tokenizer, bert = loaded
    tokens = tokenizer(sentence, return_tensors="pt")
    words = tokenizer.convert_ids_to_tokens(tokens.input_ids[0])
    with torch.no_grad():
        attentions = bert(**tokens, output_attentions=True).attentions  # layers x (1, H, L, L)
    weights = torch.stack(attentions)[:, 0]  # (layers, H, L, L)
    n_layers, n_heads = weights.shape[:2]
    from_verb = weights[:, :, words.index(verb), words.index(subject)]  # (layers, H)
    top = from_verb.flatten().topk(3)
    for value, index in zip(top.values, top.indices):
        layer, head = divmod(int(index), n_heads)
        print(f"layer {layer}, head {head}: weight {float(value):.2f} from {verb!r} to "
              f"{subject!r} (uniform over the {len(words)} tokens: {1 / len(words):.2f})")
    layer, head = divmod(int(top.indices[0]), n_heads)
    attention_heatmap(weights[layer, head], x_labels=words, y_labels=words,
                      title=f"{name}, layer {layer} head {head}: '{verb}' reads '{subject}'")
    plt.show()


bert_agreement_heads()

# %% [markdown]
# ## What's next
#
# Every attention so far let each query see every key, or every earlier key. Lesson 04
# decides *who may see whom* on purpose: causal masks for models that generate left to
# right, padding masks for batches of sentences of different lengths, and cross-attention,
# where a decoder's queries read an encoder's keys and values, trained on a toy translation
# whose alignment you can see.
