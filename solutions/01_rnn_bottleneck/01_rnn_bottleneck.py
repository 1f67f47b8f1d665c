# %% [markdown]
# # Lesson 01 — The RNN bottleneck
#
# Language, audio and time series arrive one element at a time, and what an element means
# depends on what came before it. Before attention, the standard answer was the *recurrent
# neural network* (RNN): read the sequence left to right and keep a running summary, a
# vector $h_t$ of fixed size, updated at every step. Attention was invented to fix two
# problems of that design, and this lesson makes both of them visible:
#
# * **the fixed-size context vector**: an encoder RNN must squeeze a whole input sentence
#   into its last state before a decoder may start producing the output;
# * **vanishing (and exploding) gradients**: the signal that would teach the network to use
#   an input from $k$ steps ago shrinks (or grows) exponentially in $k$.
#
# You will build:
#
# 1. `rnn_cell`: one step of a vanilla RNN, for a whole batch;
# 2. `rnn_unroll`: the RNN run over a sequence, returning every state;
# 3. `context_vector`: the encoder's summary of each sequence of a padded batch;
# 4. `gradient_norms`: how strongly the last state depends on each earlier input, from the
#    chain rule written out as a product of Jacobians.
#
# Then you measure the two problems: gradient norm against distance for a few recurrent
# weight matrices, and the accuracy of a trained RNN that must recall the token it saw $k$
# steps ago, against $k$.

# %%
try:
    import helpers
except ImportError:  # Colab or a bare kernel: install the course package
    %pip install -q "attention-course @ git+COURSE_REPOSITORY"

# %% id=imports
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from helpers import rnn as reference
from helpers.device import get_device, is_autograding, seed_everything
from helpers.plotting import accuracy_by_distance, gradient_norm_by_distance

device = get_device()
seed_everything(0)
torch.set_num_threads(1)  # small tensors: one CPU thread is fastest, on a busy CPU by far
print(f"running on {device}")

# %% [markdown]
# ## 1. One step at a time: the vanilla RNN
#
# Elman (1990), *Finding Structure in Time*, gave the recurrence that every later RNN
# refines. At step $t$ the network reads an input $x_t \in \mathbb{R}^D$ and its previous
# state $h_{t-1} \in \mathbb{R}^H$, and computes the new state
#
# $$
# h_t = \tanh\left(W_x x_t + W_h h_{t-1} + b\right),
# \qquad W_x \in \mathbb{R}^{H \times D},\; W_h \in \mathbb{R}^{H \times H},\; b \in \mathbb{R}^H .
# $$
#
# The same weights are used at every step, so the network handles sequences of any length,
# and $h_t$ is all it remembers of $x_1, \dots, x_t$. The $\tanh$ keeps every state in
# $[-1, 1]$. This is exactly `torch.nn.RNN` with its default `nonlinearity="tanh"`: its
# `weight_ih_l0` is our $W_x$, `weight_hh_l0` is $W_h$, and its two biases add up to $b$.
#
# In code, a batch of inputs is a matrix whose *rows* are examples, `x_t` of shape `(B, D)`.
# With row vectors, $W_x x_t$ for every row at once is `x_t @ W_x.T`.
#
# **Exercise 1 (2 points).** Write one step of the RNN for a batch, with tensor operations:
# `torch.nn.RNNCell` and `reference.rnn_cell` would do it for you (the check and the grader
# notice).

# %% solution id=rnn-cell
def rnn_cell(x_t: Tensor, h_prev: Tensor, W_x: Tensor, W_h: Tensor, b: Tensor) -> Tensor:
    """One RNN step, h_t = tanh(W_x x_t + W_h h_{t-1} + b) (Elman, 1990), for a batch.

    x_t: (B, D), h_prev: (B, H), W_x: (H, D), W_h: (H, H), b: (H,). Returns h_t: (B, H).
    """
    ### BEGIN SOLUTION
    return torch.tanh(x_t @ W_x.T + h_prev @ W_h.T + b)  # (B, H)
    ### END SOLUTION

# %% tests id=rnn-cell-tests points=2
from helpers.checks import lesson01 as checks
checks.rnn_cell(rnn_cell)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("01").rnn_cell(rnn_cell)
### END HIDDEN TESTS

# %% [markdown]
# ## 2. Unrolling over time
#
# Running the cell over a sequence $x_1, \dots, x_L$ from an initial state $h_0$ (zeros
# unless given) is called *unrolling*: it turns the loop into a deep network with $L$
# layers that share their weights. Note what the loop forces on us: $h_t$ needs $h_{t-1}$,
# so the $L$ steps run one after the other, however many processors we have. (Attention,
# from lesson 02 on, computes all positions at once.)
#
# **Exercise 2 (2 points).** Unroll the RNN over a batch of sequences `x` of shape
# `(B, L, D)` and return *every* state $h_1, \dots, h_L$ stacked into `(B, L, H)`. Use your
# `rnn_cell` (or `reference.rnn_cell` if you are stuck on exercise 1), but not a ready-made
# unroll (`torch.nn.RNN`, `reference.rnn_unroll`). When `h0` is `None`, start from zeros on
# the device and in the dtype of `x`.

# %% solution id=rnn-unroll
def rnn_unroll(x: Tensor, W_x: Tensor, W_h: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """Run the RNN over x: (B, L, D) from h0: (B, H) (zeros if None); return h_1..h_L: (B, L, H)."""
    ### BEGIN SOLUTION
    B, L, _ = x.shape
    h = x.new_zeros(B, W_h.shape[0]) if h0 is None else h0  # (B, H)
    states = []
    for t in range(L):
        h = rnn_cell(x[:, t], h, W_x, W_h, b)  # (B, H)
        states.append(h)
    return torch.stack(states, dim=1)  # (B, L, H)
    ### END SOLUTION

# %% tests id=rnn-unroll-tests points=2
from helpers.checks import lesson01 as checks
checks.rnn_unroll(rnn_unroll)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("01").rnn_unroll(rnn_unroll)
### END HIDDEN TESTS

# %% [markdown]
# ## 3. The fixed-size context vector
#
# Sutskever, Vinyals and Le (2014), *Sequence to Sequence Learning with Neural Networks*,
# and Cho et al. (2014), *Learning Phrase Representations using RNN Encoder–Decoder for
# Statistical Machine Translation*, translate with two RNNs. The *encoder* reads the source
# sentence; its last state $c = h_L$, the **context vector**, is the only thing the
# *decoder* receives before it writes the translation word by word:
#
# $$
# c = h_L^{\text{enc}}, \qquad s_t = \tanh\left(U_y y_{t-1} + U_s s_{t-1} + C c\right).
# $$
#
# Whether the sentence has 5 words or 50, $c$ has the same $H$ numbers. Cho et al. (2014),
# *On the Properties of Neural Machine Translation: Encoder–Decoder Approaches*, measured
# the consequence: translation quality falls steeply as sentences get longer. Bahdanau, Cho
# and Bengio (2015), *Neural Machine Translation by Jointly Learning to Align and
# Translate*, named this fixed-length vector the bottleneck and removed it by letting the
# decoder look back at *every* encoder state: attention.
#
# In a batch, sentences have different lengths, so the shorter ones are padded at the end.
# The encoder runs over the padding too, but the context vector of sentence $i$ must be
# its state at its *last real token*, index `lengths[i] - 1`, not the state after the
# padding.
#
# **Exercise 3 (2 points).** Given `states` `(B, L, H)` from `rnn_unroll` and `lengths`
# `(B,)` (integers from 1 to L), return the context vectors `(B, H)`, without a Python loop
# over the batch (`torch.gather`, or indexing with `torch.arange(B)`), and without
# `reference.context_vector`.

# %% solution id=context-vector
def context_vector(states: Tensor, lengths: Tensor) -> Tensor:
    """Each sequence's state at its last real token: row i is states[i, lengths[i] - 1].

    states: (B, L, H); lengths: (B,) integers in 1..L. Returns (B, H).
    """
    ### BEGIN SOLUTION
    rows = torch.arange(states.shape[0], device=states.device)  # (B,)
    return states[rows, lengths.to(states.device) - 1]  # (B, H)
    ### END SOLUTION

# %% tests id=context-vector-tests points=2
from helpers.checks import lesson01 as checks
checks.context_vector(context_vector)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("01").context_vector(context_vector)
### END HIDDEN TESTS

# %% [markdown]
# ## 4. Vanishing and exploding gradients
#
# To learn that the output at step $L$ should depend on the input at step $t$, gradient
# descent needs $\partial h_L / \partial x_t$. Write $a_k = W_x x_k + W_h h_{k-1} + b$ for
# the pre-activation, so $h_k = \tanh(a_k)$, and
# $D_k = \operatorname{diag}(1 - h_k^2)$ for the derivative of $\tanh$ at step $k$. The
# chain rule through the unrolled network is a product of one Jacobian per step:
#
# $$
# \frac{\partial h_L}{\partial x_t}
# = \frac{\partial h_L}{\partial h_{L-1}} \cdots \frac{\partial h_{t+1}}{\partial h_t}
#   \frac{\partial h_t}{\partial x_t}
# = \left(\prod_{k=L}^{t+1} D_k W_h\right) D_t W_x ,
# $$
#
# where the product runs from $k = L$ on the left down to $k = t + 1$ on the right.
#
# Every entry of $D_k$ lies in $(0, 1]$, so with $\sigma_{\max}(W_h)$ the largest singular
# value of $W_h$ (Pascanu, Mikolov and Bengio, 2013, *On the difficulty of training
# recurrent neural networks*):
#
# $$
# \left\lVert \frac{\partial h_L}{\partial x_t} \right\rVert_F
# \le \prod_{k=t+1}^{L} \lVert D_k \rVert_2 \lVert W_h \rVert_2 \cdot \lVert D_t W_x \rVert_F
# \le \sigma_{\max}(W_h)^{\,L-t}\, \lVert W_x \rVert_F ,
# $$
#
# using $\lVert AB \rVert_F \le \lVert A \rVert_2 \lVert B \rVert_F$ and
# $\lVert D_k \rVert_2 \le 1$. Here $\lVert \cdot \rVert_2$ is the largest singular value and
# $\lVert \cdot \rVert_F$ the Frobenius norm (the square root of the sum of squared entries).
#
# If $\sigma_{\max}(W_h) < 1$ the gradient from $k = L - t$ steps back vanishes at least as
# fast as $\sigma_{\max}^k$; if the largest eigenvalue of $W_h$ is well above 1 it can
# explode instead. Hochreiter (1991), *Untersuchungen zu dynamischen neuronalen Netzen*, and
# Bengio, Simard and Frasconi (1994), *Learning long-term dependencies with gradient descent
# is difficult*, showed that this makes long-range dependencies very hard to learn:
# whatever happened far back contributes an exponentially small share of the gradient.
#
# **Exercise 4 (3 points).** Compute $\lVert \partial h_L / \partial x_t \rVert_F$ for every
# input $t$ and every sequence of the batch, from the states alone, by the product above.
# Walk backwards from $t = L$: keep $G = \partial h_L / \partial h_t$ (start from the
# identity, batched `(B, H, H)`), then $\partial h_L / \partial x_t = G D_t W_x$ and
# $\partial h_L / \partial h_{t-1} = G D_t W_h$. Multiplying $G$ on the right by the
# diagonal $D_t$ scales its columns: `G * d[:, None, :]`. `torch.linalg.matrix_norm` gives
# the Frobenius norm of each matrix of a batch. Return `(B, L)`: column `t - 1` (0-based)
# holds $\lVert \partial h_L / \partial x_t \rVert_F$, so the last column is the last input
# $x_L$, in the same order as the inputs. (`reference.gradient_norms` is the course's answer:
# not to be called here.)

# %% solution id=gradient-norms
def gradient_norms(states: Tensor, W_x: Tensor, W_h: Tensor) -> Tensor:
    """||d h_L / d x_t||_F for every t, by the Jacobian product (Bengio et al., 1994).

    states: (B, L, H) = h_1..h_L from rnn_unroll; W_x: (H, D); W_h: (H, H). Returns (B, L).
    """
    ### BEGIN SOLUTION
    B, L, H = states.shape
    derivative = 1 - states**2  # (B, L, H): diagonals of D_t
    G = torch.eye(H, dtype=states.dtype, device=states.device).expand(B, H, H)  # dh_L/dh_L
    norms = []
    for t in reversed(range(L)):
        G_D = G * derivative[:, t, None, :]  # (B, H, H): G D_t
        norms.append(torch.linalg.matrix_norm(G_D @ W_x))  # (B,)
        G = G_D @ W_h  # (B, H, H): dh_L/dh_{t-1}
    return torch.stack(norms[::-1], dim=1)  # (B, L)
    ### END SOLUTION

# %% tests id=gradient-norms-tests points=3
from helpers.checks import lesson01 as checks
checks.gradient_norms(gradient_norms)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("01").gradient_norms(gradient_norms)
### END HIDDEN TESTS

# %% [markdown]
# ### Experiment: gradient norm against distance
#
# We unroll an RNN over random inputs with a recurrent matrix $W_h = \rho\, Q$, $Q$ a
# random orthogonal matrix, so that all singular values of $W_h$ equal $\rho$ and the bound
# above is exactly $\rho^k \lVert W_x \rVert_F$. We plot the gradient norm (averaged over
# the batch) against the distance $k$ from the last input, on a log scale where an
# exponential is a straight line; the dashed lines are the bound, drawn where $\rho \le 1$.
# (The experiment uses the course's `reference.gradient_norms`, so it runs even if
# exercise 4 is not done.)

# %%
H, D, L, B = 32, 8, 50, 8
radii = (0.5, 0.9, 1.5, 3.0)
generator = torch.Generator().manual_seed(0)
x = torch.randn(B, L, D, generator=generator).to(device)  # (B, L, D)
W_x = (torch.randn(H, D, generator=generator) * D**-0.5).to(device)  # (H, D)
b = torch.zeros(H, device=device)
distance = torch.arange(L, device=device)  # k = L - t, from 0 (the last input) to L - 1

norms, bounds = {}, {}
for rho in radii:
    W_h = reference.scaled_orthogonal(H, rho, generator, device=device)  # (H, H)
    states = reference.rnn_unroll(x, W_x, W_h, b)  # (B, L, H)
    label = f"ρ = {rho}"
    norms[label] = reference.gradient_norms(states, W_x, W_h).mean(dim=0).flip(0)  # by k
    if rho <= 1:
        bounds[label] = rho**distance * torch.linalg.matrix_norm(W_x)

gradient_norm_by_distance(norms, bounds, title=r"gradients vanish (small $\rho$) or explode "
                          r"(large $\rho$) exponentially in $k$")
plt.show()
far = 40
for label, values in norms.items():
    ratio = values[far] / values[0]
    print(f"{label}: gradient norm at distance 0 = {values[0]:.3g}, at distance {far} = "
          f"{values[far]:.3g}, ratio {ratio:.3g} ({'vanishes' if ratio < 1 else 'explodes'})")

# %% [markdown]
# Small $\rho$ makes the gradient vanish geometrically, as the bound says: what the
# network saw `far` steps ago barely affects the gradient (the printed ratios), and each
# curve stays below its dashed bound. The largest $\rho$ makes it explode: a step far back
# moves the last state more than a recent one, and training takes wild steps. Compare the
# two curves with $\rho > 1$: the $\tanh$ derivatives $D_k < 1$ pull towards vanishing, so a
# $\rho$ only a little above 1 can still vanish (read its verdict in the printout), and only a
# clearly larger one explodes. Between the two lies a narrow band that
# training cannot easily stay in; gradient clipping (Pascanu et al., 2013) tames explosion,
# and gated RNNs (the LSTM of Hochreiter and Schmidhuber, 1997; the GRU of Cho et al.,
# 2014) slow the vanishing down, but neither removes the fixed-size state.
#
# ## 5. What the bottleneck costs: recall at a distance
#
# A concrete test of memory: at every step, output the token seen $k$ steps ago. The
# tokens are random, so the only way to answer is to carry the last $k$ tokens in the
# state. We train one small RNN (embedding, `torch.nn.RNN` with $H = 32$, a linear read-out;
# `reference.RecurrentTagger`) per distance $k$ on this task (`helpers.tasks.recall_task`)
# for a few hundred steps of Adam with gradient clipping, then measure its accuracy on
# fresh sequences. A model that remembers nothing scores chance, one over the vocabulary
# size. (Under the autograder the training is shortened; the curve then sits lower.)

# %%
distances = (1, 2, 4, 6, 8, 12)
vocab_size, hidden_size, length = 8, 32, 24
steps = 40 if is_autograding() else 250
accuracies = []
for k in distances:
    model = reference.train_recall(k, hidden_size, vocab_size, length, steps=steps, device=device)
    accuracies.append(reference.recall_accuracy(model, k, vocab_size, length, device=device))
    print(f"distance {k:2d}: recall accuracy {accuracies[-1]:.2f}")
chance = 1 / vocab_size
print(f"chance level: {chance:.3f}")

accuracy_by_distance(distances, {f"RNN, H = {hidden_size}, {steps} training steps": accuracies},
                     chance=chance, title="near tokens are recalled, far ones fall to chance")
plt.show()

# %% [markdown]
# Near tokens are recalled almost perfectly; beyond some distance the same model, trained
# the same way, falls to the chance line (compare the printed accuracies with the printed
# chance level). Two causes work together:
# the gradient that would teach the network to keep a token for $k$ steps shrinks with $k$
# (section 4), and $H$ numbers must hold $k$ tokens at once, the same squeeze as the
# encoder's context vector (section 3).
#
# ## What's next
#
# Lesson 02 removes the bottleneck. Instead of asking one state to remember everything,
# every output position *looks back* at all the input positions, scores how relevant each
# is with a dot product between a query and a key, and takes a softmax-weighted average of
# their values. Any two positions are then one step apart, whatever their distance, so the
# gradient between them does not pass through a product of $k$ Jacobians.
