# %% [markdown]
# # 05 · BERT, GPT and T5: three ways to stack attention
#
# Lesson 04 built the three kinds of attention: bidirectional self-attention, causal
# self-attention and cross-attention. On their own they are one layer. Every large language
# model of recent years is a *stack* of **transformer blocks** (Vaswani et al., 2017,
# "Attention Is All You Need"), and the three famous families differ mainly in which
# attention their blocks use and what they are trained to predict:
#
# - **BERT** (Devlin et al., 2019): an encoder, bidirectional self-attention, trained to fill
#   in masked tokens;
# - **GPT** (Radford et al., 2018, 2019): a decoder, causal self-attention, trained to
#   predict the next token;
# - **T5** (Raffel et al., 2020): an encoder-decoder, where the decoder adds
#   cross-attention to the encoder, trained to turn an input text into an output text.
#
# You will write the block, BERT's masking rule, GPT's loss and T5's decoder inputs, and
# train a tiny model of each family on a synthetic task in seconds.

# %%
try:
    import helpers
except ImportError:  # Colab or a bare kernel: install the course package
    %pip install -q "attention-course @ git+https://github.com/attention-course/attention-course"

# %% id=imports
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from helpers import plotting, tasks
from helpers.attention import MultiHeadAttention, causal_mask, padding_mask
from helpers.device import get_device, is_autograding, seed_everything
from helpers.tasks import IGNORE_INDEX, ToyVocab
from helpers.transformer import GPT, T5, BertEncoder, TransformerBlock as ReferenceBlock

device = get_device()
generator = seed_everything(0)
SHORT = is_autograding()  # the autograder trains for a few steps only
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
# Units"). The 2017 transformer and BERT put the normalisation *after* the residual sum
# (**post-LN**): $x \leftarrow \mathrm{LN}(x + \mathrm{Sublayer}(x))$. GPT-2 moved it *before*
# the sublayer (**pre-LN**):
#
# $$h = x + \mathrm{MHA}(\mathrm{LN}_1(x)), \qquad y = h + \mathrm{MLP}(\mathrm{LN}_2(h)).$$
#
# In pre-LN the residual stream $x \to h \to y$ is never normalised: each block *adds* to
# it, and the identity path carries the gradient from the loss to every layer unchanged.
# Xiong et al. (2020, "On Layer Normalization in the Transformer Architecture") showed why
# this matters: at initialisation, the gradient of the last block's feed-forward weights is
# of order $d\sqrt{\ln d}$ with post-LN, *whatever the depth* $N$, but of order
# $d\sqrt{\ln d / N}$ with pre-LN. A deep post-LN model therefore takes large steps in its
# last layers at the start of training, which is why it needs a learning-rate warm-up,
# and pre-LN models train without one.
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
             for name, norm_first in (("pre-LN (GPT-2)", True), ("post-LN (2017, BERT)", False))}
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
# (booleans, `True` = attend; `mask` may be `None`). Do not use
# `helpers.transformer.TransformerBlock` or `nn.TransformerEncoderLayer`.

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
# ### Training a tiny T5 on two tasks at once
#
# Two tasks share one model: `reverse:` and `sort:` a sequence of 2 to 6 symbols. Inputs of
# different lengths are padded, and the padding is masked out of the encoder's
# self-attention and of the decoder's cross-attention (`attention_mask`). The loop uses
# `helpers.tasks.shift_right`, the reference of your exercise.

# %%
t5_vocab = ToyVocab(n_symbols=10, tasks=("reverse", "sort"))
MAX_LEN = 6
input_ids, labels = tasks.text_to_text(t5_vocab, 2, 2, MAX_LEN, generator=generator)
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
plot_learning_curve(t5_losses, "T5: one model and one loss learn both tasks,\n"
                    "far below guessing",
                    {"guessing a symbol: ln(10)": math.log(t5_vocab.n_symbols)})

# %% [markdown]
# Generation runs the encoder once and the decoder step by step from `<pad>`. An answer
# counts as right when every token up to and including `</s>` is right:

# %%
input_ids, labels = tasks.text_to_text(t5_vocab, 512, 2, MAX_LEN, generator=generator,
                                       device=device)
answers = t5.generate(input_ids, labels.shape[1], attention_mask=input_ids != t5_vocab.pad_id,
                      decoder_start_token_id=t5_vocab.pad_id)[:, 1:]  # (B, T)
right = ((answers == labels) | (labels == IGNORE_INDEX)).all(dim=1)  # (B,)
for task in t5_vocab.tasks:
    is_task = input_ids[:, 0] == t5_vocab.task_id(task)
    print(f"{task + ':':9s} {float(right[is_task].float().mean()):.0%} exact answers")
answer_end = int(labels[0].ne(IGNORE_INDEX).sum())
print(f"e.g. {t5_vocab.decode(input_ids[0])}  ->  {t5_vocab.decode(answers[0, :answer_end])}")

# %% [markdown]
# ## 5. The three families side by side
#
# | | BERT | GPT | T5 |
# |---|---|---|---|
# | architecture | encoder only | decoder only | encoder + decoder |
# | self-attention | bidirectional (padding masked) | causal | encoder: bidirectional; decoder: causal |
# | cross-attention | none | none | decoder queries, encoder keys and values |
# | objective | fill in 15% masked tokens (80/10/10) | next token, every position | output text given input text (teacher forcing) |
# | why that attention | understanding: each token sees the whole input | generation: a token may not see what it has to predict | read the whole input, write the output left to right |
# | LayerNorm | post-LN | pre-LN | pre-LN (RMS norm) |
# | typical use | classification, retrieval, tagging | open-ended generation, chat | translation, summarisation, any input → output |
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
# ## 6. Optional: the real GPT-2
#
# The reference `GPT` has the same architecture as OpenAI's GPT-2 (124M parameters), so
# `GPT.from_hf` can load its weights. The cell below does so only if the `transformers`
# package and a downloaded copy of the `gpt2` checkpoint are on this machine (it never
# downloads anything itself; to get it, run
# `transformers.GPT2LMHeadModel.from_pretrained("gpt2")` once while online). Otherwise it
# says why it skipped.

# %%
def gpt2_demo(prompt: str = "The attention mechanism", new_tokens: int = 20) -> None:
    """Generate with the pretrained GPT-2 through GPT.from_hf, if it is available offline."""
    if SHORT:
        print("skipped: not while autograding")
        return
    try:
        import transformers
    except ImportError:
        print("skipped: the transformers package is not installed")
        return
    transformers.logging.set_verbosity_error()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained("gpt2", local_files_only=True)
        hf_model = transformers.GPT2LMHeadModel.from_pretrained("gpt2", local_files_only=True)
    except (OSError, ValueError) as error:
        print(f"skipped: no local copy of the gpt2 checkpoint ({type(error).__name__})")
        return
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
