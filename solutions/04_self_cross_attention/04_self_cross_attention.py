# %% [markdown]
# # Lesson 04: Self, causal and cross attention
#
# Lesson 03 built multi-head attention, in which every query may read every key. Who may
# read whom is a design decision, made with a **mask**, and with the choice of where the
# keys and values come from:
#
# - **bidirectional self-attention** (an encoder, BERT): every position sees the whole input;
# - **causal self-attention** (a decoder, GPT): position $i$ sees positions $\le i$ only, so
#   a model trained to predict the next token cannot peek at it;
# - **padding masks**: a batch holds sentences of different lengths, padded to one length,
#   and nobody may attend to the padding;
# - **cross-attention** (an encoder-decoder, the original Transformer and T5): the decoder's
#   queries read the encoder's keys and values, which is how a translation model looks at
#   the source sentence (Bahdanau et al., 2015, *Neural Machine Translation by Jointly
#   Learning to Align and Translate*; Vaswani et al., 2017, *Attention Is All You Need*).
#
# You will write the causal mask, the padding mask, cross-attention, and a test that proves
# a model does not leak the future, using gradients. At the end a tiny encoder-decoder
# learns a toy translation and its cross-attention shows the word alignment.

# %%
try:
    import helpers
except ImportError:  # Colab or a bare kernel: install the course package
    %pip install -q "attention-course @ git+COURSE_REPOSITORY"

# %% id=imports
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian

from helpers import attention as ref
from helpers.device import get_device, is_autograding, seed_everything
from helpers.plotting import attention_heatmap
from helpers.tasks import (IGNORE_INDEX, TRANSLATION_BOS, TRANSLATION_PAD,
                           toy_translation_task)

generator = seed_everything(0)
device = get_device()
torch.set_num_threads(1)  # small tensors: one CPU thread is fastest, on a busy CPU by far
print(f"running on {device}")

# %% [markdown]
# ## Causal masks
#
# A mask $M \in \{\text{True}, \text{False}\}^{L \times S}$ enters attention before the
# softmax: scores where attention is not allowed become $-\infty$, so their weights are 0,
#
# $$\text{Attention}(Q, K, V) = \text{softmax}\!\left(\frac{QK^\top}{\sqrt{d_k}} +
#   \Delta\right) V, \qquad \Delta_{ij} = \begin{cases} 0 & \text{if } M_{ij} \\ -\infty &
#   \text{otherwise.} \end{cases}$$
#
# The course's convention is PyTorch's `scaled_dot_product_attention`'s: `True` means
# *attend*. A causal mask allows query $i$ to see key $j$ when $j \le i$: the lower
# triangle. When there are fewer queries than keys ($L < S$) the queries are the **last**
# $L$ positions: a model that generates text one token at a time keeps the $S - 1$
# earlier keys (lesson 09's KV cache) and asks one new query ($L = 1$), which must see all
# $S$ keys. So query $i$ sees keys $0 \dots S - L + i$: the triangle is aligned to the
# bottom right. PyTorch's `is_causal=True` aligns it to the top left instead, which is only
# the same thing when $L = S$.
#
# **Exercise 1 (2 points).** Write `causal_mask(L, S=None, device=None)`, built on `device`,
# without calling `ref.causal_mask`, `ref.sliding_window_mask` or PyTorch's
# `causal_lower_right` (the grader checks).

# %% solution id=causal-mask
def causal_mask(L: int, S: int | None = None, device: torch.device | str | None = None
                ) -> torch.Tensor:
    """(L, S) bool mask, True = attend: query i (one of the last L of S positions) sees
    keys 0 .. S - L + i. S defaults to L. Built on ``device``."""
    ### BEGIN SOLUTION
    S = L if S is None else S
    queries = torch.arange(S - L, S, device=device)[:, None]  # (L, 1): absolute positions
    keys = torch.arange(S, device=device)[None, :]  # (1, S)
    return keys <= queries  # (L, S)
    ### END SOLUTION


# %% tests id=causal-mask-tests points=2
from helpers.checks import lesson04 as checks
checks.causal_mask(causal_mask)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("04").causal_mask(causal_mask)
### END HIDDEN TESTS

# %% [markdown]
# One decode step of 2 new queries over 5 keys, with the course's bottom-right mask and
# with PyTorch's top-left `is_causal` rule (`tril` without an offset):

# %%
print("bottom right (ours), query i sees keys 0 .. S-L+i:\n", ref.causal_mask(2, 5).int())
top_left = torch.ones(2, 5, dtype=torch.bool).tril()
print("top left (PyTorch's is_causal when L != S):\n", top_left.int())

# %% [markdown]
# ## Padding masks
#
# Sentences in a batch have different lengths; they are padded to the longest with a
# padding token, and the padding must not be attended to, or a sentence's meaning would
# depend on how long its neighbours in the batch are. Given the true lengths $n_b$, key $j$
# of sequence $b$ is visible when $j < n_b$. The mask has shape $(B, 1, 1, S)$ so that it
# broadcasts over the heads and the queries of $(B, H, L, S)$ scores.
#
# Mind the convention when you talk to PyTorch: `nn.MultiheadAttention`'s
# `key_padding_mask` and its boolean `attn_mask` are `True` where a key is **ignored**, the
# opposite of ours (and of `F.scaled_dot_product_attention`'s `attn_mask`). Passing one
# where the other is expected does not crash. A sequence with padding then attends *only*
# to its padding, silently; a sequence without padding has *every* key ignored, and
# `nn.MultiheadAttention` returns NaN for all its positions (lesson 02: `torch.softmax` of a
# row of $-\infty$).
#
# **Exercise 2 (2 points).** Write `padding_mask(lengths, S)`, on the device of `lengths`,
# without calling `ref.padding_mask`.

# %% solution id=padding-mask
def padding_mask(lengths: torch.Tensor, S: int) -> torch.Tensor:
    """(B, 1, 1, S) bool mask from the true lengths (B,): True on the real keys j < lengths[b]."""
    ### BEGIN SOLUTION
    keys = torch.arange(S, device=lengths.device)  # (S,)
    return (keys[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)
    ### END SOLUTION


# %% tests id=padding-mask-tests points=2
from helpers.checks import lesson04 as checks
checks.padding_mask(padding_mask)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("04").padding_mask(padding_mask)
### END HIDDEN TESTS

# %% [markdown]
# The course's module with our mask against `nn.MultiheadAttention` with
# `key_padding_mask = ~mask`, and what happens to each sequence when the inversion is
# forgotten (the last sequence has no padding):

# %%
theirs = nn.MultiheadAttention(32, 4, batch_first=True).to(device)
ours = ref.MultiHeadAttention.from_torch(theirs)
S = 7
lengths = torch.tensor([6, 3, S], device=device)
x = torch.randn(3, S, 32, device=device)
keep = ref.padding_mask(lengths, S)  # (B, 1, 1, S), True = attend
with torch.no_grad():
    ours_out = ours(x, mask=keep)
    inverted = theirs(x, x, x, key_padding_mask=~keep[:, 0, 0])[0]
    forgotten = theirs(x, x, x, key_padding_mask=keep[:, 0, 0])[0]
    only_padding = ours(x, mask=~keep)  # what attending to the padding alone gives
print(f"with ~mask: largest difference {(ours_out - inverted).abs().max():.2e}")
print("with mask (wrong!):")
for b, n in enumerate(lengths.tolist()):
    nan_positions = int(forgotten[b].isnan().any(dim=-1).sum())
    if nan_positions:
        print(f"  sequence {b}, {n} of {S} real tokens: {nan_positions} of {S} outputs are NaN")
    else:
        padding = f"{S - n} padding position" + ("s" if S - n > 1 else "")
        print(f"  sequence {b}, {n} of {S} real tokens: differs from the right output by "
              f"{(forgotten[b] - ours_out[b]).abs().max():.2f}, equals attention to its "
              f"{padding} alone (difference {(forgotten[b] - only_padding[b]).abs().max():.1e})")

# %% [markdown]
# ## Cross-attention
#
# In an encoder-decoder, the decoder's states $Y \in \mathbb{R}^{L \times d}$ ask the
# questions and the encoder's output $E \in \mathbb{R}^{S \times d}$ (the source sentence)
# provides keys and values:
#
# $$\text{CrossAttention}(Y, E) = \text{softmax}\!\left(\frac{(Y W^Q)(E W^K)^\top}
#   {\sqrt{d_k}}\right) E W^V \quad \in \mathbb{R}^{L \times d},$$
#
# an $L \times S$ weight matrix: row $i$ says where target word $i$ looks in the source.
# Bahdanau et al. (2015) introduced this as the "alignment" of a translation model (with an
# additive score, a small MLP, instead of the scaled dot product); no causal mask is needed (the whole source is known),
# but the source's padding must be masked.
#
# **Exercise 3 (3 points).** Write it with the projections of a course `MultiHeadAttention`
# (`attn.q_proj`, `attn.k_proj`, `attn.v_proj`, `attn.out_proj`, `attn.n_heads`) and the
# references `ref.split_heads`, `ref.merge_heads`, `ref.scaled_dot_product_attention` and
# `ref.padding_mask`; calling `attn(...)` itself is the shortcut this exercise forbids (the
# check and the grader both notice).

# %% solution id=cross-attention
def cross_attention(attn: nn.Module, x: torch.Tensor, context: torch.Tensor,
                    context_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Queries from x (B, L, d), keys and values from context (B, S, d), whose positions
    j >= context_lengths[b] are padding. Returns (B, L, d)."""
    ### BEGIN SOLUTION
    q = ref.split_heads(attn.q_proj(x), attn.n_heads)  # (B, H, L, D)
    k = ref.split_heads(attn.k_proj(context), attn.n_heads)  # (B, H, S, D)
    v = ref.split_heads(attn.v_proj(context), attn.n_heads)  # (B, H, S, D)
    mask = None
    if context_lengths is not None:
        mask = ref.padding_mask(context_lengths, context.shape[1])  # (B, 1, 1, S)
    out, _ = ref.scaled_dot_product_attention(q, k, v, mask=mask)  # (B, H, L, D)
    return attn.out_proj(ref.merge_heads(out))  # (B, L, d)
    ### END SOLUTION


# %% tests id=cross-attention-tests points=3
from helpers.checks import lesson04 as checks
checks.cross_attention(cross_attention)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("04").cross_attention(cross_attention)
### END HIDDEN TESTS

# %% [markdown]
# ## A leakage test by gradients
#
# A causal mask with an off-by-one, a padding mask broadcast along the wrong axis, a
# normalisation over the sequence: each lets a decoder see the future, and the symptom is
# only a training loss that is too good to be true. A direct test: if output $i$ does not
# depend on input $j$, then $\partial\, y_i / \partial x_j = 0$. Measure, for every pair,
#
# $$G_{ij} = \left\lVert \frac{\partial \sum_{b,c} y_{b,i,c}}{\partial x_{:, j, :}}
#   \right\rVert_2,$$
#
# the gradient of the sum of output position $i$ (over batch and features) with respect to
# input position $j$. A causal model has $G_{ij} = 0$ exactly for every $j > i$; one
# backward pass per output position gives a row of $G$.
#
# **Exercise 4 (3 points).** Write it so that it works on any model mapping
# $(B, L, d) \to (B, L, d')$, and leave the caller's `x` alone: differentiate a detached copy
# that requires gradients. Two traps of autograd: the graph of `model(x)` is freed by the
# first backward pass unless you keep it (`retain_graph=True`), and `.backward()` *adds*
# each gradient to `x.grad` rather than replacing it (`torch.autograd.grad` returns it
# instead).

# %% solution id=leakage-test
def gradient_dependence(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(L, L): entry [i, j] is the norm of d sum(model(x)[:, i]) / d x[:, j]; a causal
    model has zeros above the diagonal."""
    ### BEGIN SOLUTION
    x = x.detach().requires_grad_(True)
    out = model(x)  # (B, L, D')
    rows = []
    for i in range(out.shape[1]):
        (grad,) = torch.autograd.grad(out[:, i].sum(), x, retain_graph=True)  # (B, L, D)
        rows.append(grad.pow(2).sum(dim=(0, 2)).sqrt())  # (L,)
    return torch.stack(rows)  # (L, L)
    ### END SOLUTION


# %% tests id=leakage-test-tests points=3
from helpers.checks import lesson04 as checks
checks.gradient_dependence(gradient_dependence)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("04").gradient_dependence(gradient_dependence)
### END HIDDEN TESTS

# %% [markdown]
# The same measurement by PyTorch's `jacobian` (the oracle the tests use), on one
# self-attention layer with and without the causal mask, and on a layer with a classic
# bug: an off-by-one causal mask, `tril(diagonal=1)`, that lets position $i$ see $i + 1$.

# %%
class SelfAttentionLayer(nn.Module):
    """One self-attention layer over (B, L, d) with a given mask rule."""

    def __init__(self, d_model: int, n_heads: int, mask_rule: str):
        super().__init__()
        self.attention = ref.MultiHeadAttention(d_model, n_heads)
        self.mask_rule = mask_rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        if self.mask_rule == "bidirectional":
            return self.attention(x)
        if self.mask_rule == "causal":
            return self.attention(x, mask=ref.causal_mask(L, device=x.device))
        off_by_one = torch.ones(L, L, dtype=torch.bool, device=x.device).tril(diagonal=1)
        return self.attention(x, mask=off_by_one)


def jacobian_dependence(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(L, L) gradient norms from the full jacobian (L, B, L, d) of the per-position sums."""
    full = jacobian(lambda inputs: model(inputs).sum(dim=(0, 2)), x)  # (L, B, L, d)
    return full.pow(2).sum(dim=(1, 3)).sqrt()  # (L, L)


generator = seed_everything(0)  # the hidden tests above drew random seeds: start afresh
x = torch.randn(2, 8, 16, device=device)
figure, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
for ax, rule in zip(axes, ["bidirectional", "causal", "off-by-one (bug)"]):
    dependence = jacobian_dependence(SelfAttentionLayer(16, 2, rule).to(device), x)
    leak = dependence.triu(diagonal=1).max()
    print(f"{rule:16s}: largest gradient from a future input {leak:.2e}")
    attention_heatmap(dependence, ax=ax, title=f"{rule}: largest future gradient {leak:.1e}",
                      value_label="gradient norm $G_{ij}$")
    ax.set_xlabel("input position j")
    ax.set_ylabel("output position i")
figure.suptitle("gradient norm of output i w.r.t. input j: causal means zero above the diagonal")
plt.show()

# %% [markdown]
# The bidirectional layer depends on everything, the causal one only on the past, and the
# off-by-one bug shows up as one lit diagonal just above the main one: a model trained with
# it would learn to copy the next token instead of predicting it.
#
# ## Experiment: a toy translation and its alignment
#
# A synthetic language pair (`helpers.tasks.toy_translation_task`): every word has a fixed
# translation, and neighbouring words swap places (positions $2k$ and $2k+1$), like an
# adjective that moves after its noun. Sentences have different lengths and are padded. The
# model is the smallest encoder-decoder: embeddings; an encoder with one bidirectional
# self-attention layer (padding-masked); a decoder with one causal self-attention layer,
# one cross-attention layer over the encoder (padding-masked) and a small MLP; teacher
# forcing (the decoder reads the correct previous target words, shifted right behind a
# start token).

# %%
VOCAB, MIN_LENGTH, MAX_LENGTH, D_MODEL, N_HEADS = 20, 4, 10, 64, 4
generator = seed_everything(0)  # a fresh start, whatever the cells above drew


class TinyTranslator(nn.Module):
    """A one-layer encoder-decoder (Vaswani et al., 2017) built from the course's attention."""

    def __init__(self, vocab: int, max_length: int, d_model: int, n_heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(max_length, d_model)
        self.encoder = ref.MultiHeadAttention(d_model, n_heads)
        self.decoder = ref.MultiHeadAttention(d_model, n_heads)
        self.cross = ref.MultiHeadAttention(d_model, n_heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(),
                                 nn.Linear(2 * d_model, d_model))
        self.readout = nn.Linear(d_model, vocab)

    def forward(self, source: torch.Tensor, lengths: torch.Tensor, decoder_input: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """source (B, S), lengths (B,), decoder_input (B, L) -> logits (B, L, vocab) and
        cross-attention weights (B, H, L, S)."""
        S, L = source.shape[1], decoder_input.shape[1]
        keep = ref.padding_mask(lengths, S)  # (B, 1, 1, S)
        memory = self.embed(source) + self.position.weight[:S]  # (B, S, d)
        memory = memory + self.encoder(memory, mask=keep)
        y = self.embed(decoder_input) + self.position.weight[:L]  # (B, L, d)
        y = y + self.decoder(y, mask=ref.causal_mask(L, device=y.device))
        read, weights = self.cross(y, context=memory, mask=keep, need_weights=True)
        y = y + read
        y = y + self.mlp(y)
        return self.readout(y), weights


def shift_right(target: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: (B, L) targets -> (B, L) decoder inputs, start token first."""
    words = target.masked_fill(target == IGNORE_INDEX, TRANSLATION_PAD)  # (B, L)
    start = torch.full_like(words[:, :1], TRANSLATION_BOS)  # (B, 1)
    return torch.cat([start, words[:, :-1]], dim=1)  # (B, L)


model = TinyTranslator(VOCAB, MAX_LENGTH, D_MODEL, N_HEADS).to(device)
optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
steps = 20 if is_autograding() else 60
started = time.perf_counter()
for step in range(steps):
    source, target, lengths, _ = toy_translation_task(32, MIN_LENGTH, MAX_LENGTH, VOCAB,
                                                      generator, device)
    logits, _ = model(source, lengths, shift_right(target))
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(f"{steps} training steps in {time.perf_counter() - started:.1f} s")

source, target, lengths, alignment = toy_translation_task(512, MIN_LENGTH, MAX_LENGTH, VOCAB,
                                                          generator, device)
with torch.no_grad():
    logits, weights = model(source, lengths, shift_right(target))  # weights (B, H, L, S)
scored = target != IGNORE_INDEX
word_accuracy = ((logits.argmax(-1) == target) & scored).sum() / scored.sum()
looked_at = weights.mean(dim=1).argmax(dim=-1)  # (B, L): the source word read most
alignment_accuracy = ((looked_at == alignment) & scored).sum() / scored.sum()
print(f"after {steps} steps: loss {loss.item():.3f}, word accuracy {word_accuracy:.1%}, "
      f"cross-attention points at the aligned source word {alignment_accuracy:.1%} of the time")

# %% [markdown]
# The cross-attention of one sentence of 7 words, averaged over the heads. To read it, the
# word ids get names: source id $w$ is an English noun and its translation a French one
# (the dictionary is read off the data). Each target word should look at the source word it
# translates: the swap of neighbours shows as a staircase of $2 \times 2$ crosses, the odd
# last word has no partner and stays in place, and the padded source positions get no
# weight at all (the mask sets it to exactly 0, printed below).

# %%
ENGLISH = ["<pad>", "<bos>", "cat", "dog", "house", "car", "tree", "river", "book", "city",
           "bird", "door", "sun", "moon", "fish", "bread", "water", "apple", "horse", "road"]
FRENCH = ["<pad>", "<bos>", "chat", "chien", "maison", "voiture", "arbre", "rivière", "livre",
          "ville", "oiseau", "porte", "soleil", "lune", "poisson", "pain", "eau", "pomme",
          "cheval", "route"]
meaning = torch.zeros(VOCAB, dtype=torch.long, device=device)  # target id -> source id
meaning[target[scored]] = source.gather(1, alignment.clamp(min=0))[scored]
example = int(torch.nonzero(lengths == 7)[0])  # the first test sentence of 7 words
n = int(lengths[example])
source_words = [ENGLISH[int(w)] for w in source[example]]
target_words = [FRENCH[int(meaning[w])] for w in target[example, :n]]
ax = attention_heatmap(weights[example].mean(dim=0)[:n], x_labels=source_words,
                       y_labels=target_words,
                       title="cross-attention: each target word reads its swapped source word")
ax.set_xlabel(f"source word ({n} words, then {MAX_LENGTH - n} padding)")
ax.set_ylabel("target word (decoder query)")
plt.show()
on_padding = (weights * ~ref.padding_mask(lengths, MAX_LENGTH)).sum(dim=-1)  # (B, H, L)
print(f"largest total weight a target word puts on source padding: {on_padding.max():.1e}")

# %% [markdown]
# ## What's next
#
# You now have every attention a Transformer uses. Lesson 05 stacks them into the three
# families of modern models: BERT (a bidirectional encoder trained by masked language
# modelling), GPT (a causal decoder trained to predict the next token) and T5 (an
# encoder-decoder with cross-attention, trained text to text).
