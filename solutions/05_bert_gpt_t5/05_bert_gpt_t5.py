# %% [markdown]
# # 05 · BERT, GPT and T5: three ways to stack attention
#
# Lesson 04 built the three kinds of attention: bidirectional self-attention, causal
# self-attention and cross-attention. On their own they are one layer. Most large language
# models of recent years are *stacks* of **transformer blocks** (Vaswani et al., 2017,
# "Attention Is All You Need"); not all of them: state space models such as Mamba, RWKV's
# recurrent blocks and hybrids such as Jamba replace some or all of the attention (lessons
# 10 and 11). The three famous families of transformers differ mainly in which attention
# their blocks use and what they are trained to predict:
#
# - **BERT** (Devlin et al., 2019): an encoder, bidirectional self-attention, trained to fill
#   in masked tokens;
# - **GPT** (Radford et al., 2018, 2019): a decoder, causal self-attention, trained to
#   predict the next token;
# - **T5** (Raffel et al., 2020): an encoder-decoder, where the decoder adds
#   cross-attention to the encoder, trained to turn an input text into an output text.
#
# You will write the block, BERT's masking rule, GPT's loss and T5's decoder inputs, train a
# tiny model of each family on a synthetic task (each training cell prints how long it
# took), fine-tune the BERT for a tagging task, and count the parameters of the real models
# with the same formulas.

# %%
try:
    import helpers
except ImportError:  # Colab or a bare kernel: install the course package
    %pip install -q "attention-course @ git+COURSE_REPOSITORY"

# %% id=imports
import copy
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from helpers import plotting, tasks
from helpers.attention import MultiHeadAttention, causal_mask, padding_mask
from helpers.device import get_device, is_autograding, seed_everything
from helpers.pretrained import local_pretrained
from helpers.tasks import IGNORE_INDEX, ToyVocab
from helpers.transformer import GPT, T5, BertEncoder, TransformerBlock as ReferenceBlock

device = get_device()
generator = seed_everything(0)
SHORT = is_autograding()  # the autograder trains for a few steps only
torch.set_num_threads(1)  # small tensors: one CPU thread is fastest, on a busy CPU by far
print(f"device: {device}; short training: {SHORT}")

# %% [markdown]
# ## 1. The transformer block
#
# A block has two sublayers, each wrapped in a **residual connection** (He et al., 2016,
# "Deep Residual Learning for Image Recognition") and a **layer normalisation** (Ba et al.,
# 2016, "Layer Normalization"): multi-head self-attention, which mixes information *between*
# positions, and a position-wise feed-forward network (MLP), which transforms each position
# on its own:
#
# $$\mathrm{MLP}(x) = W_2\,\mathrm{GELU}(W_1 x + b_1) + b_2, \qquad W_1 \in \mathbb{R}^{d_{ff}\times d},\; W_2 \in \mathbb{R}^{d\times d_{ff}}$$
#
# with $d_{ff} = 4d$ by default and GELU (Hendrycks & Gimpel, 2016, "Gaussian Error Linear
# Units"). The 2017 transformer, BERT and GPT-1 (Radford et al., 2018) put the
# normalisation *after* the residual sum (**post-LN**):
# $x \leftarrow \mathrm{LN}(x + \mathrm{Sublayer}(x))$. GPT-2 (2019) moved it *before* the
# sublayer (**pre-LN**), as most models since do:
#
# $$h = x + \mathrm{MHA}(\mathrm{LN}_1(x)), \qquad y = h + \mathrm{MLP}(\mathrm{LN}_2(h)).$$
#
# In pre-LN the residual stream $x \to h \to y$ is never normalised: each block *adds* to
# it, and the identity path carries the gradient from the loss to every layer unchanged.
# Xiong et al. (2020, "On Layer Normalization in the Transformer Architecture") showed why
# this matters: at initialisation, the gradient of the last block's feed-forward weights is
# of order $d\sqrt{\ln d}$ with post-LN, *whatever the depth* $N$, but of order
# $d\sqrt{\ln d / N}$ with pre-LN. A deep post-LN model therefore takes large steps in its
# last layers at the start of training, which is why it needs a learning-rate warm-up;
# Xiong et al. showed that pre-LN models can be trained without the warm-up (and with a
# larger learning rate), though many are still trained with a short one.
#
# The experiment below measures this on stacks of $N$ blocks at initialisation (Xavier
# weights, as in the paper), with the course's reference block
# `helpers.transformer.TransformerBlock`, whose `norm_first` switches between the two.

# %%
def last_layer_gradient(norm_first: bool, n_layers: int, d_model: int = 32) -> float:
    """Norm of d loss / d W2 of the last block at initialisation, for a random regression."""
    torch.manual_seed(0)
    blocks = nn.Sequential(*[ReferenceBlock(d_model, 4, norm_first=norm_first)
                             for _ in range(n_layers)]).to(device)
    for module in blocks.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
    final_norm = nn.LayerNorm(d_model).to(device)
    x = torch.randn(4, 16, d_model, device=device)  # (B, L, d)
    target = torch.randn(4, 16, d_model, device=device)  # (B, L, d)
    (final_norm(blocks(x)) - target).pow(2).mean().backward()
    return float(blocks[-1].mlp[2].weight.grad.norm())


depths = [1, 2, 4, 8, 16]
gradients = {name: [last_layer_gradient(norm_first, n) for n in depths]
             for name, norm_first in (("pre-LN (GPT-2)", True),
                                      ("post-LN (2017, BERT, GPT-1)", False))}
pre_ln = gradients["pre-LN (GPT-2)"]
ax = plotting.curves(depths, gradients, xlabel="number of blocks N",
                     ylabel="‖∂loss/∂W2‖ of the last block",
                     title="Pre-LN: last-layer gradient shrinks roughly like 1/√N;\n"
                           "post-LN: it does not",
                     log_x=True, log_y=True)
ax.plot(depths, [pre_ln[0] / math.sqrt(n) for n in depths], linestyle="--", color="grey",
        label="∝ 1/√N (Xiong et al., 2020)")
ax.set_xticks(depths, [str(n) for n in depths])
ax.yaxis.set_major_locator(plt.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
ax.yaxis.set_major_formatter(plt.FormatStrFormatter("%.2f"))
ax.yaxis.set_minor_formatter(plt.NullFormatter())
ax.legend()
plt.show()
for name, values in gradients.items():
    print(f"{name}: gradient with {depths[-1]} blocks / with 1 block = "
          f"{values[-1] / values[0]:.2f}")
print(f"1/sqrt({depths[-1]}) = {1 / math.sqrt(depths[-1]):.2f}")

# %% [markdown]
# ### Exercise 1: a pre-LN transformer block (3 points)
#
# Write `TransformerBlock`, the pre-LN block above: `block(x, mask)` maps `x` (B, L,
# `d_model`) to a tensor of the same shape; `mask`, when given, is boolean and broadcasts
# to the scores' shape (B, H, L, L), e.g. a padding mask (B, 1, 1, L). Keep the names of
# its parts, so that its weights can be loaded into other implementations: `norm1` and `norm2`
# (`nn.LayerNorm(d_model)`), `attn` (the course's `MultiHeadAttention(d_model, n_heads)`
# from lesson 03, called as `self.attn(h, mask=mask)`), and
# `mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))` with
# `d_ff = 4 * d_model` when not given. With `causal=True`, position $t$ may only attend to
# positions $\le t$: combine `causal_mask(L, device=x.device)` with the `mask` argument
# (booleans, `True` = attend; `mask` may be `None`); `causal` is `False` when not given. The
# check and the grader build the block with and without `d_ff` and `causal`. Do not use
# `helpers.transformer.TransformerBlock` or PyTorch's `nn.TransformerEncoderLayer` (they
# notice).

# %% solution id=transformer-block
class TransformerBlock(nn.Module):
    """Pre-LN transformer block (Vaswani et al., 2017; Xiong et al., 2020): (B, L, d) -> same."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int | None = None,
                 causal: bool = False):
        super().__init__()
        ### BEGIN SOLUTION
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.causal = causal
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        ### END SOLUTION

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, d); mask broadcasts to (B, H, L, L), True = attend."""
        ### BEGIN SOLUTION
        if self.causal:
            allowed = causal_mask(x.shape[1], device=x.device)  # (L, L)
            mask = allowed if mask is None else mask & allowed
        h = x + self.attn(self.norm1(x), mask=mask)  # (B, L, d)
        return h + self.mlp(self.norm2(h))  # (B, L, d)
        ### END SOLUTION

# %% tests id=transformer-block-tests points=3
from helpers.checks import lesson05 as checks
checks.transformer_block(TransformerBlock)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("05").transformer_block(TransformerBlock)
### END HIDDEN TESTS

# %% [markdown]
# ## 2. BERT: an encoder trained to fill in blanks
#
# An encoder uses **bidirectional** self-attention: every position attends to every other
# (only padding is masked out), so each output vector sees the whole sentence. That is
# ideal for understanding a text, but a model that sees everything cannot be trained to
# predict the next word: it would simply read it. Devlin et al. (2019, "BERT: Pre-training
# of Deep Bidirectional Transformers for Language Understanding") train it as a cloze test
# instead, the **masked language model** (MLM): choose 15% of the tokens at random,
# corrupt them, and ask the model for the originals,
#
# $$\mathcal{L}_{\text{MLM}} = -\frac{1}{|\mathcal{M}|}\sum_{i \in \mathcal{M}} \log p_\theta(x_i \mid \tilde{x}),$$
#
# where $\mathcal{M}$ is the set of chosen positions and $\tilde{x}$ the corrupted input.
# The corruption is the **80/10/10 rule**: a chosen token becomes `<mask>` 80% of the time,
# a random token 10% of the time, and stays unchanged 10% of the time. `<mask>` never
# appears when the model is used later, so if only `<mask>` positions were scored the model
# could ignore all others; the random and unchanged 10% force it to keep a good
# representation of *every* token. Special tokens (`<cls>`, `<sep>`, padding) are never
# chosen. Positions that are not chosen get the label `-100`, which
# `F.cross_entropy(..., ignore_index=-100)` skips.
#
# ### Exercise 2: MLM masking (3 points)
#
# Write `mask_tokens(tokens, mask_id, vocab_size, p, generator, special_ids)`, returning
# `(inputs, labels)`: `tokens` is an integer tensor of any shape, `inputs` has its shape
# and dtype, `labels` its shape (int64). Choose each token whose id is not in `special_ids`
# with probability `p`; apply the 80/10/10 rule (random tokens uniform in
# `0 .. vocab_size - 1`); labels are the original token where chosen and `-100` elsewhere. Draw every random number with
# `generator=generator` (pass `device=generator.device` when it is given, then move to
# `tokens.device`), so that one seed gives one corruption, and do not modify `tokens` in
# place. Do not call `helpers.tasks.mask_tokens`.

# %% solution id=mlm-masking
def mask_tokens(tokens: torch.Tensor, mask_id: int, vocab_size: int, p: float = 0.15,
                generator: torch.Generator | None = None, special_ids: tuple[int, ...] = ()
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's MLM corruption (Devlin et al., 2019): tokens (...) -> inputs (...), labels (...)."""
    ### BEGIN SOLUTION
    draw_on = generator.device if generator is not None else tokens.device

    def uniform() -> torch.Tensor:
        return torch.rand(tokens.shape, generator=generator, device=draw_on).to(tokens.device)

    specials = torch.tensor(special_ids, dtype=tokens.dtype, device=tokens.device)
    chosen = (uniform() < p) & ~torch.isin(tokens, specials)  # (...)
    action = uniform()  # (...): < 0.8 mask, 0.8 .. 0.9 random, >= 0.9 keep
    random_ids = torch.randint(vocab_size, tokens.shape, generator=generator, device=draw_on)
    inputs = torch.where(chosen & (action < 0.8), mask_id, tokens)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9),
                         random_ids.to(tokens.device, tokens.dtype), inputs)
    labels = torch.where(chosen, tokens.long(), IGNORE_INDEX)
    return inputs, labels
    ### END SOLUTION

# %% tests id=mlm-masking-tests points=3
from helpers.checks import lesson05 as checks
checks.mlm_masking(mask_tokens)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("05").mlm_masking(mask_tokens)
### END HIDDEN TESTS

# %% [markdown]
# ### Training a tiny BERT on palindromes
#
# Our synthetic corpus is made of palindromes, `<cls> w reversed(w) <sep>`: every symbol
# appears twice, at mirrored positions, so a masked symbol can be read off its partner,
# which lies to its *right* for the first half and to its *left* for the second. The
# course's reference `BertEncoder` (post-LN, as the original) with its MLM head is trained
# below with `helpers.tasks.mask_tokens`, the reference of your exercise. Its loss cannot
# reach zero: a symbol's mirror partner is chosen too with probability $p = 0.15$, and is
# then hidden or replaced 90% of the time, so the symbol can only be guessed
# ($\ln 8$ nats). That puts a rough floor of $p \times 0.9 \times \ln 8$ under the loss. Here is
# one training example before and after masking:

# %%
bert_vocab = ToyVocab(n_symbols=8)
HALF = 6  # symbols in each half of a palindrome
example = tasks.palindromes(bert_vocab, 1, HALF, generator=generator, device=device)
corrupted, labels = tasks.mask_tokens(example, bert_vocab.mask_id, len(bert_vocab), p=0.3,
                                      generator=generator, special_ids=bert_vocab.special_ids)
print("original :", bert_vocab.decode(example[0]))
print("corrupted:", bert_vocab.decode(corrupted[0]), "  (p = 0.3 here, to show more)")
print("labels   :", bert_vocab.decode(labels[0]))

# %% [markdown]
# One training loop serves the three models: it draws a fresh batch each step, so the
# model never sees an example twice, and records the loss.

# %%
def train(model: nn.Module, batch_loss, steps: int, lr: float) -> list[float]:
    """AdamW on ``batch_loss(model) -> scalar`` for ``steps`` steps; the loss at each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, start = [], time.time()
    model.train()
    for _ in range(steps):
        loss = batch_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    print(f"{type(model).__name__}: {steps} steps in {time.time() - start:.1f} s, "
          f"final loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return losses


def plot_learning_curve(losses: list[float], title: str, baselines: dict[str, float],
                        legend_at: tuple[str, tuple[float, float]] = ("upper right", (1, 0.88))
                        ) -> None:
    """The loss averaged over windows of 10 steps, with dashed reference levels."""
    window = 10
    means = [sum(losses[i:i + window]) / len(losses[i:i + window])
             for i in range(0, len(losses), window)]
    ax = plotting.curves(range(0, len(losses), window), {"training loss": means},
                         xlabel="training step", ylabel="cross-entropy (nats)", title=title)
    for (label, level), color in zip(baselines.items(), ("grey", "green")):
        ax.axhline(level, linestyle="--", color=color, label=label)
    ax.legend(loc=legend_at[0], bbox_to_anchor=legend_at[1], fontsize="small")
    plt.show()

# %%
seed_everything(0)
bert = BertEncoder(len(bert_vocab), d_model=64, n_layers=2, n_heads=4, max_len=2 * HALF + 2,
                   d_ff=128).to(device)


def bert_loss(model: BertEncoder) -> torch.Tensor:
    """MLM loss on a fresh batch of masked palindromes (only chosen positions count)."""
    tokens = tasks.palindromes(bert_vocab, 128, HALF, generator=generator, device=device)
    inputs, labels = tasks.mask_tokens(tokens, bert_vocab.mask_id, len(bert_vocab),
                                       generator=generator, special_ids=bert_vocab.special_ids)
    logits = model.mlm_logits(model(inputs))  # (B, L, V)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


P_MLM = 0.15  # the default p of mask_tokens
bert_floor = P_MLM * 0.9 * math.log(bert_vocab.n_symbols)
print(f"rough floor: p x 0.9 x ln({bert_vocab.n_symbols}) = {P_MLM} x 0.9 x "
      f"{math.log(bert_vocab.n_symbols):.3f} = {bert_floor:.3f} nats")
bert_losses = train(bert, bert_loss, steps=60 if SHORT else 600, lr=3e-3)
plot_learning_curve(bert_losses, "BERT: a slow decline, then a sudden drop\n"
                    "when attention finds the mirror position",
                    {"guessing: ln(8)": math.log(bert_vocab.n_symbols),
                     "rough floor": bert_floor}, legend_at=("center right", (1, 0.5)))

# %% [markdown]
# Does the encoder use context on *both* sides? Mask one symbol per palindrome with
# `<mask>` and measure how often it is recovered, separately for the first half (the
# partner is to the right) and the second half (the partner is to the left). A causal
# model, which reads only to the left, could at best recover the second half. Then look
# inside: the last block's attention weights (averaged over its heads) on one palindrome
# show where each position reads from.

# %%
@torch.no_grad()
def fill_in_accuracy(model: BertEncoder, n: int = 512) -> dict[str, float]:
    """Accuracy on one <mask> per palindrome, by the side on which its partner lies."""
    tokens = tasks.palindromes(bert_vocab, n, HALF, generator=generator, device=device)
    position = torch.randint(1, 2 * HALF + 1, (n,), generator=generator).to(device)  # (n,)
    rows = torch.arange(n, device=device)
    inputs = tokens.clone()
    inputs[rows, position] = bert_vocab.mask_id
    predicted = model.mlm_logits(model(inputs))[rows, position].argmax(-1)  # (n,)
    correct = (predicted == tokens[rows, position]).float()
    first = position <= HALF
    return {"partner on the right": float(correct[first].mean()),
            "partner on the left": float(correct[~first].mean())}


for side, accuracy in fill_in_accuracy(bert).items():
    print(f"BERT fills in a masked symbol whose {side}: {accuracy:.0%} (chance: "
          f"{1 / bert_vocab.n_symbols:.0%})")


@torch.no_grad()
def last_block_attention(model: BertEncoder, tokens: torch.Tensor) -> torch.Tensor:
    """Attention weights (B, H, L, L) of the last block, captured with a forward hook."""
    block, captured = model.blocks[-1], {}
    hook = block.attn.register_forward_pre_hook(lambda module, args: captured.update(h=args[0]))
    model(tokens)
    hook.remove()
    return block.attn(captured["h"], need_weights=True)[1]


sample = tasks.palindromes(bert_vocab, 1, HALF, generator=generator, device=device)
sample[0, 3] = bert_vocab.mask_id  # hide one symbol: its partner is at position L - 1 - 3
weights = last_block_attention(bert, sample)[0].mean(0)  # (L, L), averaged over the heads
L_bert = sample.shape[1]
words = bert_vocab.decode(sample[0]).split()
plotting.attention_heatmap(weights, x_labels=[f"{w} ({i})" for i, w in enumerate(words)],
                           y_labels=[f"{w} ({i})" for i, w in enumerate(words)],
                           title="BERT's last block: position i reads position L-1-i,\n"
                                 "its mirror partner, on either side")
plt.show()
symbols = torch.arange(1, L_bert - 1, device=device)  # (2N,): the symbol positions
print(f"attention weight on the mirror partner, mean over symbol positions: "
      f"{float(weights[symbols, L_bert - 1 - symbols].mean()):.2f} "
      f"(uniform attention: {1 / L_bert:.2f})")

# %% [markdown]
# ### Using an encoder: fine-tuning for tagging
#
# Masked language modelling is how BERT is *pre-trained*. It is *used* by fine-tuning
# (Devlin et al., 2019, section 4): put a small task head on the encoder's hidden states, a
# linear layer for each position (tagging, such as named entities) or on `<cls>`
# (classifying a sentence), and train everything for a few steps on labelled examples of
# the task. The pre-trained encoder brings what it learned from unlabelled text; the head
# only has to read it out.
#
# Our labelled task, `helpers.tasks.broken_palindromes`: in half the palindromes one symbol
# has been replaced; tag each symbol 1 when it differs from its mirror partner, 0 when it
# matches. The MLM encoder already knows where each symbol's partner is (the heatmap above).
# The same head, the same steps and the same data, on the pre-trained encoder and on a
# fresh one of the same shape:

# %%
class Tagger(nn.Module):
    """A BERT encoder with a linear head on each position's hidden state (Devlin et al., 2019)."""

    def __init__(self, encoder: BertEncoder, n_tags: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.token_embedding.embedding_dim, n_tags)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, L) -> tag logits (B, L, n_tags)."""
        return self.head(self.encoder(idx))


def tagging_loss(model: Tagger) -> torch.Tensor:
    """Cross-entropy of the tags of a fresh batch of (possibly broken) palindromes."""
    tokens, tags = tasks.broken_palindromes(bert_vocab, 64, HALF, generator=generator,
                                            device=device)
    return F.cross_entropy(model(tokens).flatten(0, 1), tags.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def tagging_accuracy(model: Tagger, n: int = 1000) -> tuple[float, float]:
    """The fraction of symbols tagged right, and of sequences with every tag right."""
    tokens, tags = tasks.broken_palindromes(bert_vocab, n, HALF, generator=generator,
                                            device=device)
    scored = tags != IGNORE_INDEX
    right = model(tokens).argmax(-1) == tags  # (n, L)
    return float(right[scored].float().mean()), float((right | ~scored).all(dim=1).float().mean())


seed_everything(1)
fresh = BertEncoder(len(bert_vocab), d_model=64, n_layers=2, n_heads=4, max_len=2 * HALF + 2,
                    d_ff=128).to(device)
tagging_steps = 30 if SHORT else 150
for name, encoder in (("pre-trained by MLM", copy.deepcopy(bert)), ("fresh encoder", fresh)):
    print(f"{name}:", end=" ")
    tagger = Tagger(encoder, n_tags=2).to(device)
    train(tagger, tagging_loss, steps=tagging_steps, lr=1e-3)
    symbol_accuracy, sequence_accuracy = tagging_accuracy(tagger)
    print(f"  symbols tagged right {symbol_accuracy:.1%}, sequences all right "
          f"{sequence_accuracy:.1%}")
tokens, tags = tasks.broken_palindromes(bert_vocab, 1000, HALF, generator=generator)
matching = float((tags == 0).sum() / (tags != IGNORE_INDEX).sum())
print(f"tagging every symbol 'matches' gets {matching:.1%} of the symbols and every intact "
      f"sequence, {float((tags != 1).all(dim=1).float().mean()):.1%} of the sequences")

# %% [markdown]
# Compare the two encoders with the last line, the score of a tagger that learned nothing
# but "matches". In the same few steps the pre-trained encoder learns the task, while the
# fresh one has hardly left that score: to tag a symbol, a position must compare itself with
# its mirror partner, and finding the partner is what masked language modelling taught the
# pre-trained attention (the heatmap above). That is the bargain of BERT: pre-train once on
# plentiful unlabelled text, then fine-tune cheaply for each task with few labels.

# %% [markdown]
# ## 3. GPT: a decoder trained to predict the next token
#
# A decoder-only model uses **causal** self-attention: position $t$ attends to positions
# $\le t$ only (lesson 04's causal mask). It cannot read the future, so it can be trained
# on *every* position of a text at once to predict the token that comes next (Radford et
# al., 2018, "Improving Language Understanding by Generative Pre-Training"; 2019,
# "Language Models are Unsupervised Multitask Learners"):
#
# $$\mathcal{L}_{\text{LM}} = -\frac{1}{B(L-1)} \sum_{b=1}^{B}\sum_{t=1}^{L-1} \log p_\theta\big(x_{b,t+1} \mid x_{b,1}, \dots, x_{b,t}\big).$$
#
# The logits at position $t$ are a prediction of token $t+1$: the targets are the input
# shifted left by one, and the last position has nothing to predict. After training, the
# model generates text by feeding its own predictions back in, one token at a time.
#
# ### Exercise 3: the next-token loss (2 points)
#
# Write `next_token_loss(logits, tokens)`: `logits` (B, L, V) are the model's outputs for
# `tokens` (B, L); return the mean over all $B(L-1)$ predictions of
# $-\log \mathrm{softmax}(\text{logits}_{b,t})[x_{b,t+1}]$, a scalar (shape `()`). Write
# the cross-entropy yourself with `log_softmax` and `gather` (no `F.cross_entropy` or
# `F.nll_loss`).

# %% solution id=gpt-loss
def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (Radford et al., 2018): logits (B, L, V), tokens (B, L)."""
    ### BEGIN SOLUTION
    log_probs = logits[:, :-1].log_softmax(dim=-1)  # (B, L-1, V): predictions of tokens 1..L-1
    targets = tokens[:, 1:, None]  # (B, L-1, 1)
    return -log_probs.gather(-1, targets).mean()
    ### END SOLUTION

# %% tests id=gpt-loss-tests points=2
from helpers.checks import lesson05 as checks
checks.next_token_loss(next_token_loss)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("05").next_token_loss(next_token_loss)
### END HIDDEN TESTS

# %% [markdown]
# ### Training a tiny GPT to copy
#
# The corpus is `w <sep> w` with `w` random: the first half cannot be predicted (no model
# does better than $\ln(\text{number of symbols})$ there), the second half can be copied
# exactly: to predict the token after position $t$, the model reads position $t - |w|$.
# `helpers.tasks.copy_sequences` returns the
# sequences already split into inputs and targets shifted by one, so the loss is a plain
# cross-entropy. The best achievable loss averages the unpredictable and the predictable
# targets:

# %%
gpt_vocab = ToyVocab(n_symbols=16)
N_COPY = 8
inputs, targets = tasks.copy_sequences(gpt_vocab, 1, N_COPY, generator=generator)
print("inputs :", gpt_vocab.decode(inputs[0]))
print("targets:", gpt_vocab.decode(targets[0]))
unpredictable = N_COPY - 1  # w[1:] follows w[0] at random; <sep> and the copy are predictable
gpt_floor = unpredictable / (2 * N_COPY) * math.log(gpt_vocab.n_symbols)
print(f"best achievable loss: {unpredictable}/{2 * N_COPY} x ln({gpt_vocab.n_symbols}) = "
      f"{gpt_floor:.3f} nats")

# %%
seed_everything(0)
gpt = GPT(len(gpt_vocab), d_model=64, n_layers=2, n_heads=4, max_len=2 * N_COPY + 1,
          d_ff=128).to(device)


def gpt_loss(model: GPT) -> torch.Tensor:
    """Next-token loss on a fresh batch of copy sequences."""
    inputs, targets = tasks.copy_sequences(gpt_vocab, 64, N_COPY, generator=generator,
                                           device=device)
    return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())


gpt_losses = train(gpt, gpt_loss, steps=30 if SHORT else 150, lr=5e-3)
plot_learning_curve(gpt_losses, "GPT: the loss falls to the floor set by the random first half",
                    {"guessing a symbol: ln(16)": math.log(gpt_vocab.n_symbols),
                     "best achievable": gpt_floor})

# %% [markdown]
# Now let the model write: give it `w <sep>` and generate greedily (`GPT.generate`, with
# a K/V cache that lesson 09 explains), then count how many copies are exact.

# %%
prompts, _ = tasks.copy_sequences(gpt_vocab, 256, N_COPY, generator=generator, device=device)
prompts = prompts[:, :N_COPY + 1]  # (B, N + 1): w <sep>
generated = gpt.generate(prompts, max_new_tokens=N_COPY)[:, N_COPY + 1:]  # (B, N)
exact = (generated == prompts[:, :N_COPY]).all(dim=1).float().mean()
print("prompt   :", gpt_vocab.decode(prompts[0]))
print("generated:", gpt_vocab.decode(generated[0]))
print(f"exact copies: {float(exact):.0%} of {len(prompts)}")

# %% [markdown]
# ## 4. T5: an encoder-decoder for text-to-text
#
# Raffel et al. (2020, "Exploring the Limits of Transfer Learning with a Unified
# Text-to-Text Transformer") cast every task as turning one text into another: the task is
# named in the input (`translate English to German: ...`, `summarize: ...`), and one model
# with one loss learns all of them. T5 goes back to the original encoder-decoder of
# Vaswani et al. (2017): the **encoder** reads the input with bidirectional
# self-attention; the **decoder** writes the output with causal self-attention, and in
# every block a **cross-attention** sublayer lets each output position query the encoder's
# states (lesson 04):
#
# $$\mathrm{CrossAttn}(h, e) = \mathrm{softmax}\!\left(\frac{(hW_Q)(eW_K)^\top}{\sqrt{d_k}}\right) eW_V, \qquad h: \text{decoder states},\; e: \text{encoder states}.$$
#
# BART (Lewis et al., 2020, "BART: Denoising Sequence-to-Sequence Pre-training for Natural
# Language Generation, Translation, and Comprehension") is the other well-known
# encoder-decoder: the same two stacks (post-LN, as in 2017), pre-trained to restore text
# that was corrupted (spans masked, sentences shuffled), and fine-tuned for summarisation
# and translation. Both are used for tasks whose output is a new text read off a whole
# input: translation, where the output follows the input closely, and summarisation, where
# it is shorter and its length is for the model to decide.
#
# The decoder is trained like GPT, with **teacher forcing**: its input at step $t$ is the
# correct output token $t-1$, so all output positions train at once. Its input is the
# label sequence **shifted right**: a start token (T5 uses `<pad>`), then the labels
# without the last one. The loss compares the logits at step $t$ with label $t$.
#
# ### Exercise 4: decoder inputs (2 points)
#
# Write `shift_right(labels, start_id, pad_id)`: labels (B, T) -> decoder inputs (B, T),
# `start_id` followed by `labels[:, :-1]`; labels equal to `-100` (ignored padding) are not
# token ids, so they become `pad_id`. Do not modify `labels`; do not call
# `helpers.tasks.shift_right`.

# %% solution id=t5-inputs
def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Teacher-forcing decoder inputs (Raffel et al., 2020): labels (B, T) -> (B, T)."""
    ### BEGIN SOLUTION
    start = torch.full_like(labels[:, :1], start_id)  # (B, 1)
    shifted = torch.cat([start, labels[:, :-1]], dim=1)  # (B, T)
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_id)
    ### END SOLUTION

# %% tests id=t5-inputs-tests points=2
from helpers.checks import lesson05 as checks
checks.shift_right(shift_right)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("05").shift_right(shift_right)
### END HIDDEN TESTS

# %% [markdown]
# ### Training a tiny T5 on three tasks at once
#
# Three tasks share one model, on sequences of 2 to 6 symbols: `reverse:` and `sort:`, whose
# answers are as long as their inputs, like a word-for-word translation; and `summarize:`,
# whose answer keeps each symbol once, in the order of its first appearance: a toy summary,
# shorter than its input whenever a symbol repeats, so the decoder must decide where to
# stop. Inputs of different lengths are padded, and the padding is masked out of the
# encoder's self-attention and of the decoder's cross-attention (`attention_mask`). The loop
# uses `helpers.tasks.shift_right`, the reference of your exercise.

# %%
t5_vocab = ToyVocab(n_symbols=10, tasks=("reverse", "sort", "summarize"))
MAX_LEN = 6
input_ids, labels = tasks.text_to_text(t5_vocab, 3, 2, MAX_LEN, generator=generator)
for source, target in zip(input_ids, labels):
    decoder_inputs = tasks.shift_right(target[None], t5_vocab.pad_id, t5_vocab.pad_id)[0]
    print(f"input: {t5_vocab.decode(source)}\n  labels:         {t5_vocab.decode(target)}"
          f"\n  decoder inputs: {t5_vocab.decode(decoder_inputs)}")

# %%
seed_everything(0)
t5 = T5(len(t5_vocab), d_model=64, n_layers=2, n_heads=4, d_ff=128).to(device)


def t5_loss(model: T5) -> torch.Tensor:
    """Teacher-forced loss on a fresh batch of text-to-text pairs (padding ignored)."""
    input_ids, labels = tasks.text_to_text(t5_vocab, 64, 2, MAX_LEN, generator=generator,
                                           device=device)
    decoder_inputs = tasks.shift_right(labels, t5_vocab.pad_id, t5_vocab.pad_id)
    logits = model(input_ids, decoder_inputs, attention_mask=input_ids != t5_vocab.pad_id)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


t5_losses = train(t5, t5_loss, steps=60 if SHORT else 400, lr=2e-3)
plot_learning_curve(t5_losses, "T5: one model and one loss learn the three tasks,\n"
                    "far below guessing",
                    {"guessing a symbol: ln(10)": math.log(t5_vocab.n_symbols)})

# %% [markdown]
# Generation runs the encoder once and the decoder step by step from `<pad>`. An answer
# counts as right when every token up to and including `</s>` is right. The table gives
# the exact answers of each task, in all and by the number $n$ of symbols in the input,
# then for all tasks together the fraction $p_n$ of single answer tokens that are right, and
# $p_n^{\,n+1}$:

# %%
input_ids, labels = tasks.text_to_text(t5_vocab, 1024, 2, MAX_LEN, generator=generator,
                                       device=device)
answers = t5.generate(input_ids, labels.shape[1], attention_mask=input_ids != t5_vocab.pad_id,
                      decoder_start_token_id=t5_vocab.pad_id)[:, 1:]  # (B, T)
scored = labels != IGNORE_INDEX  # (B, T): the answer's tokens, </s> included
right_tokens = (answers == labels) & scored
right = (right_tokens | ~scored).all(dim=1)  # (B,)
n_symbols = (input_ids != t5_vocab.pad_id).sum(dim=1) - 2  # (B,): without task: and </s>
lengths = range(2, MAX_LEN + 1)
print(f"{'exact answers':16s} {'all':>5s} " + " ".join(f"{f'n = {n}':>6s}" for n in lengths))
for task in t5_vocab.tasks:
    is_task = input_ids[:, 0] == t5_vocab.task_id(task)
    by_length = [float(right[is_task & (n_symbols == n)].float().mean()) for n in lengths]
    print(f"{task + ':':16s} {float(right[is_task].float().mean()):5.0%} "
          + " ".join(f"{value:6.0%}" for value in by_length))
token_accuracy = [float(right_tokens[n_symbols == n].sum() / scored[n_symbols == n].sum())
                  for n in lengths]
print(f"{'tokens right p_n':16s} {float(right_tokens.sum() / scored.sum()):5.0%} "
      + " ".join(f"{p:6.0%}" for p in token_accuracy))
print(f"{'p_n^(n+1)':16s} {'':5s} " + " ".join(f"{p ** (n + 1):6.0%}"
                                             for n, p in zip(lengths, token_accuracy)))
for verdict, index in (("right", int(right.nonzero()[0])), ("wrong", int((~right).nonzero()[0]))):
    end = int(scored[index].sum())
    print(f"a {verdict} answer: {t5_vocab.decode(input_ids[index])}  ->  "
          f"{t5_vocab.decode(answers[index, :end])}   (expected "
          f"{t5_vocab.decode(labels[index, :end])})")

# %% [markdown]
# Why are some answers wrong, and most right? The mistakes are not spread evenly: short
# inputs come out (almost) always right, and the exact answers fall with the number $n$ of
# symbols in the input, for two reasons the table separates. Each token is harder to get
# right in a longer input: $p_n$ falls with $n$ (more symbols to keep apart and, for
# `reverse:`, a position counted from an end that moves with the length). And an answer is
# exact only if all its $n + 1$ tokens are right: if the mistakes fell independently, only
# $p_n^{\,n+1}$ of the answers would be exact (the last row). More are, because mistakes
# cluster: the decoder reads its own output, so one wrong token often puts the rest of
# its answer off track, while the other answers stay clean. The lengths are drawn
# uniformly, so the many short, easy inputs carry the overall score; the tiny model trains
# for a few hundred steps, and training longer lifts $p_n$.

# %% [markdown]
# ## 5. The three families side by side
#
# | | BERT | GPT | T5 (and BART) |
# |---|---|---|---|
# | architecture | encoder only | decoder only | encoder + decoder |
# | self-attention | bidirectional (padding masked) | causal | encoder: bidirectional; decoder: causal |
# | cross-attention | none | none | decoder queries, encoder keys and values |
# | objective | fill in 15% masked tokens (80/10/10) | next token, every position | output text given input text (teacher forcing); BART: restore corrupted text |
# | why that attention | understanding: each token sees the whole input | generation: a token may not see what it has to predict | read the whole input, write the output left to right |
# | LayerNorm | post-LN | pre-LN from GPT-2 on (GPT-1: post-LN) | T5: pre-LN (RMS norm); BART: post-LN |
# | typical use | fine-tuned for classification, retrieval, tagging | open-ended generation, chat | translation, summarisation, any input → output |
#
# The masks make the table concrete. Each panel shows which keys (columns) a query (row)
# may attend to, for the T5 input `reverse: c b a </s>` padded with one `<pad>`, and the
# decoder inputs `<pad> a b c` that teacher forcing feeds in for the labels `a b c </s>`:

# %%
from matplotlib.colors import ListedColormap

encoder_words = ["reverse:", "c", "b", "a", "</s>", "<pad>"]
decoder_words = ["<pad>", "a", "b", "c"]
L_in, L_out = len(encoder_words), len(decoder_words)
input_lengths = torch.tensor([encoder_words.index("<pad>")])  # real tokens before the padding
panels = {  # name -> (mask (queries, keys), query words, key words)
    "BERT / T5 encoder:\nbidirectional self-attention":
        (padding_mask(input_lengths, L_in)[0, 0].expand(L_in, L_in), encoder_words,
         encoder_words),
    "GPT / T5 decoder:\ncausal self-attention":
        (causal_mask(L_out), decoder_words, decoder_words),
    "T5 decoder:\ncross-attention (output → input)":
        (padding_mask(input_lengths, L_in)[0, 0].expand(L_out, L_in), decoder_words,
         encoder_words),
}
two_colours = ListedColormap(["#e6e6e6", "tab:green"])
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
for ax, (name, (mask, queries, keys)) in zip(axes, panels.items()):
    ax.imshow(mask.float(), cmap=two_colours, vmin=0, vmax=1)
    ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right")
    ax.set_yticks(range(len(queries)), queries)
    ax.set_xticks([i - 0.5 for i in range(1, len(keys))], minor=True)
    ax.set_yticks([i - 0.5 for i in range(1, len(queries))], minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    ax.set_title(name)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
fig.suptitle("Which keys each query may attend to (green = allowed, grey = masked out)")
plt.tight_layout()
plt.show()
for name, model in (("BERT", bert), ("GPT", gpt), ("T5", t5)):
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters")

# %% [markdown]
# ## 6. From toy to real: layers, heads and parameters
#
# Our models have 2 blocks of 4 heads. The real ones are built from the same blocks, more
# of them and wider, and the formulas of lessons 03 and 05 count their parameters. Per
# block: attention $4d^2 + 4d$ (lesson 03; without biases in Llama, whose grouped K/V heads,
# lesson 07, also shrink $W^K$ and $W^V$ to $d \times d_{kv}$); the feed-forward network,
# $2\,d\,d_{ff} + d_{ff} + d$ (three matrices and no biases for Llama's gated SwiGLU,
# Shazeer, 2020, "GLU Variants Improve Transformer"); two norms of $2d$ (RMS norm: $d$).
# Around the blocks: token embeddings $V d$ (shared with the output layer, except in
# Llama), learned positions $P d$ for BERT and GPT, a final norm, and BERT's MLM head.
# First the formula against the course's own BERT and GPT built at the size of BERT-base and
# GPT-2 small (on PyTorch's `meta` device: shapes only, no memory), then the published
# configurations (Devlin et al., 2019; Brown et al., 2020, "Language Models are Few-Shot
# Learners"; Touvron et al., 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models"),
# with the sizes their papers report.

# %%
def block_parameters(d: int, d_ff: int, kv_width: int | None = None, bias: bool = True,
                     gated: bool = False, rms_norm: bool = False) -> int:
    """Parameters of one transformer block: attention (W^Q, W^O of d x d; W^K, W^V of
    d x kv_width), feed-forward (two matrices, three when gated) and two norms."""
    kv = d if kv_width is None else kv_width
    attention = 2 * d * d + 2 * d * kv + (2 * d + 2 * kv if bias else 0)
    feed_forward = (3 if gated else 2) * d * d_ff + (d_ff + d if bias else 0)
    norms = 2 * (d if rms_norm else 2 * d)
    return attention + feed_forward + norms


def bert_parameters(V: int, d: int, layers: int, d_ff: int, P: int) -> int:
    """Embeddings (tokens, positions, two segments, LayerNorm), blocks, MLM head."""
    embeddings = V * d + P * d + 2 * d + 2 * d
    mlm_head = d * d + d + 2 * d + V  # dense, LayerNorm, output bias (tied weights)
    return embeddings + layers * block_parameters(d, d_ff) + mlm_head


def gpt_parameters(V: int, d: int, layers: int, d_ff: int, P: int) -> int:
    """Token and position embeddings, blocks, final LayerNorm; the head is tied."""
    return V * d + P * d + layers * block_parameters(d, d_ff) + 2 * d


def llama_parameters(V: int, d: int, layers: int, heads: int, kv_heads: int, d_ff: int) -> int:
    """Embeddings and output layer (not tied), blocks without biases, final RMS norm."""
    kv_width = kv_heads * (d // heads)
    block = block_parameters(d, d_ff, kv_width, bias=False, gated=True, rms_norm=True)
    return 2 * V * d + layers * block + d


with torch.device("meta"):  # shapes only: nothing is allocated
    course_models = {"BertEncoder at BERT-base size": (
                         BertEncoder(30522, 768, 12, 12, 512, d_ff=3072),
                         bert_parameters(30522, 768, 12, 3072, 512)),
                     "GPT at GPT-2 small size": (
                         GPT(50257, 768, 12, 12, 1024), gpt_parameters(50257, 768, 12, 3072, 1024))}
for name, (model, formula) in course_models.items():
    counted = sum(p.numel() for p in model.parameters())
    print(f"{name}: formula {formula:,}, counted in the module {counted:,}")

real = [  # name, blocks, heads, d_model, parameters, of which embeddings, size in its paper
    ("BERT-base", 12, 12, 768, bert_parameters(30522, 768, 12, 3072, 512),
     (30522 + 512 + 2) * 768, "110M"),
    ("BERT-large", 24, 16, 1024, bert_parameters(30522, 1024, 24, 4096, 512),
     (30522 + 512 + 2) * 1024, "340M"),
    ("GPT-3", 96, 96, 12288, gpt_parameters(50257, 12288, 96, 4 * 12288, 2048),
     (50257 + 2048) * 12288, "175B"),
    ("Llama 2 7B", 32, 32, 4096, llama_parameters(32000, 4096, 32, 32, 32, 11008),
     2 * 32000 * 4096, "7B"),
    ("Llama 2 70B", 80, 64, 8192, llama_parameters(32000, 8192, 80, 64, 8, 28672),
     2 * 32000 * 8192, "70B"),
]
print(f"\n{'model':12s} {'blocks':>6s} {'heads':>6s} {'heads in all':>12s} {'d_model':>7s} "
      f"{'head dim':>8s} {'parameters':>16s} {'embeddings':>10s} {'paper':>6s}")
for name, blocks, heads, d, parameters, embeddings, paper in real:
    print(f"{name:12s} {blocks:6d} {heads:6d} {blocks * heads:12,d} {d:7d} {d // heads:8d} "
          f"{parameters:16,d} {embeddings / parameters:10.1%} {paper:>6s}")
ours = sum(p.numel() for p in bert.parameters())
print(f"\nthis lesson's BERT: {ours:,} parameters; GPT-3 has {real[2][4] / ours:,.0f} times as "
      "many")

# %% [markdown]
# Each head is small in all of them (a head dimension of 64 to 128), and the heads multiply
# with depth: thousands of heads in the largest models, each one of the attentions of
# lesson 03. How the parameters are spread changes with size: the embeddings, a large share
# of BERT-base, are a small one of GPT-3 (the `embeddings` column), whose width makes the
# blocks' $12 d^2$ per layer dominate.
#
# ## 7. Attention beyond text
#
# Nothing in a transformer block is specific to words: it maps a sequence of vectors to a
# sequence of vectors. Cut an image into patches, or a sound into frames, embed each piece
# as a vector, and the same attention runs over them. ViT (Dosovitskiy et al., 2021, "An
# Image is Worth 16x16 Words: Transformers for Image Recognition at Scale") cuts an image
# into patches of 16 x 16 pixels and runs a BERT-base-sized encoder over them, with a
# `<cls>` token for the class. Whisper (Radford et al., 2023, "Robust Speech Recognition
# via Large-Scale Weak Supervision") is an encoder-decoder like T5: the encoder reads 30
# seconds of audio as a log-mel spectrogram (a frame every 10 ms, then a convolution of
# stride 2), the decoder writes the transcript with cross-attention to the audio. DALL-E
# (Ramesh et al., 2021, "Zero-Shot Text-to-Image Generation") is a GPT-like decoder over the
# text tokens of a caption followed by the tokens of a 256 x 256 image, each standing for
# an 8 x 8 patch (a discrete autoencoder's codes): it generates an image token by token.
# The sequence lengths these give:

# %%
vit_patches = (224 // 16) ** 2  # a 224 x 224 image in 16 x 16 patches
whisper_frames = 30 * 1000 // 10  # 30 s of audio, a spectrogram frame every 10 ms
dalle_image_tokens = (256 // 8) ** 2  # a 256 x 256 image, one token per 8 x 8 patch
print(f"ViT-B/16: {vit_patches} patches + <cls> = {vit_patches + 1} positions")
print(f"Whisper: {whisper_frames} frames, {whisper_frames // 2} encoder positions after the "
      "stride-2 convolution")
print(f"DALL-E: up to 256 text tokens + {dalle_image_tokens} image tokens = "
      f"{256 + dalle_image_tokens} positions")
print(f"this lesson's longest sequence: {2 * N_COPY} positions (GPT)")

# %% [markdown]
# ## 8. Optional: the real GPT-2
#
# The reference `GPT` has the same architecture as OpenAI's GPT-2 (124M parameters), so
# `GPT.from_hf` can load its weights. The cell below does so only if the `transformers`
# package and a downloaded copy of the `gpt2` checkpoint are on this machine (it never
# downloads anything itself; to get it, run `transformers.AutoTokenizer.from_pretrained("gpt2")`
# and `transformers.GPT2LMHeadModel.from_pretrained("gpt2")` once while online). Otherwise it
# says why it skipped.

# %%
def gpt2_demo(prompt: str = "The attention mechanism", new_tokens: int = 20) -> None:
    """Generate with the pretrained GPT-2 through GPT.from_hf, if it is available offline."""
    loaded = local_pretrained("GPT2LMHeadModel", "gpt2")
    if loaded is None:
        return
    tokenizer, hf_model = loaded
    model = GPT.from_hf(hf_model).to(device)
    idx = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    out = model.generate(idx, max_new_tokens=new_tokens)
    print(tokenizer.decode(out[0]))


gpt2_demo()

# %% [markdown]
# ## What's next
#
# Every model here computes attention as a full $L \times L$ matrix of scores: fine for our
# short sequences, but the memory grows as $L^2$, and at tens of thousands of tokens it no longer
# fits on a GPU. Lesson 06 (FlashAttention) computes exactly the same attention in tiles,
# with an online softmax, without ever storing that matrix.
