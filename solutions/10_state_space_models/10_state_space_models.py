# %% [markdown]
# # Lesson 10 — State space models and Mamba
#
# Lessons 02 to 09 built attention and then fought its costs: FlashAttention (06) avoided
# the $L \times L$ matrix in memory, grouped-query attention and windows (07) shrank the
# cache, linear attention (08) made the cost linear in the length, and the KV cache (09)
# stopped recomputing the past. One cost remains in every transformer that attends to its
# whole past: to produce the next token it keeps every earlier key and value, so the memory
# of decoding grows with the length of the text.
#
# The RNN of lesson 01 had the opposite trade: a fixed-size state, the same memory at any
# length, but it trained one step at a time and forgot. *State space models* (SSMs) keep
# the fixed-size state and lose the two defects. Their recurrence is *linear* (an RNN
# without the $\tanh$), which lets it train in parallel, as a convolution or as a parallel
# scan; and its memory is set by a learned time scale rather than by saturating
# nonlinearities. Mamba (Gu & Dao, 2023) then makes the recurrence depend on the input, so
# that the model chooses what to remember, the ingredient that brought SSMs level with
# transformers on language.
#
# You will build:
#
# 1. `discretize`: the zero-order hold, from a continuous system to a recurrence;
# 2. `ssm_recurrent`: the linear time-invariant SSM, one step at a time;
# 3. `ssm_convolution`: the same SSM as one long convolution, equal to the recurrence;
# 4. `selective_scan_sequential`: Mamba's selective SSM, whose steps depend on the input;
# 5. `parallel_scan`: the linear recurrence in $\log_2 L$ vectorised rounds, with gradients;
# 6. `ssd`: the selective SSM as masked attention (state space duality, Mamba-2).
#
# On the way you measure how far an SSM remembers, train an SSM that cannot select and one
# that can on a task that needs selection, time the sequential scan against the parallel
# one, compare the decoding memory of Mamba with a transformer's KV cache, and look at the
# attention matrix hidden inside a trained Mamba.

# %%
try:
    import helpers
except ImportError:  # Colab or a bare kernel: install the course package
    %pip install -q "attention-course @ git+COURSE_REPOSITORY"

# %% id=imports
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor

from helpers import ssm as reference
from helpers import tasks
from helpers.device import get_device, is_autograding, one_cpu_thread, seed_everything
from helpers.kv_cache import kv_cache_bytes
from helpers.plotting import attention_heatmap, curves, gradient_norm_by_distance

device = get_device()
seed_everything(0)
SHORT = is_autograding()  # the autograder shrinks the experiments
print(f"running on {device}; short experiments: {SHORT}")

# %% [markdown]
# ## 1. A continuous system, sampled
#
# A state space model comes from control theory (Kalman, 1960, *A New Approach to Linear
# Filtering and Prediction Problems*). An input signal $u(t)$ drives a hidden state
# $x(t) \in \mathbb{R}^N$ through a linear differential equation, and the output reads the
# state:
#
# $$ x'(t) = A\,x(t) + B\,u(t), \qquad y(t) = C\,x(t) + D\,u(t). $$
#
# Gu, Goel and Ré (2022), *Efficiently Modeling Long Sequences with Structured State
# Spaces* (S4), made this a layer of a deep network: each of the $D$ channels of a sequence
# is one input signal with its own small system, $N$ states each. Their follow-up S4D (Gu,
# Gupta, Goel and Ré, 2022, *On the Parameterization and Initialization of Diagonal State
# Space Models*) showed that a *diagonal* $A$ works as well, and Mamba uses one: each state
# then obeys its own scalar equation $x_n' = A_n x_n + B_n u$, and with $A_n < 0$ it decays
# towards zero when the input stops, a stable system. (The letter $D$ serves twice, as in
# the Mamba paper: the number of channels, and the skip term $D\,u$.)
#
# A sequence model sees samples $u_1, u_2, \dots$, not a signal. The *zero-order hold*
# (ZOH) assumes that each sample is held constant for a step of length $\Delta$. Over one
# step the equation can then be solved exactly,
# $x(t + \Delta) = e^{\Delta A} x(t) + \int_0^{\Delta} e^{s A}\, ds\; B\, u$, which is a
# recurrence:
#
# $$ x_t = \bar A\, x_{t-1} + \bar B\, u_t, \qquad
#    \bar A = e^{\Delta A}, \qquad
#    \bar B = (\Delta A)^{-1} \left(e^{\Delta A} - I\right) \Delta B . $$
#
# For a diagonal $A$ every product is elementwise:
# $\bar A_n = e^{\Delta A_n}$ and $\bar B_n = \frac{e^{\Delta A_n} - 1}{A_n} B_n$. Mamba's
# code simplifies the second to $\bar B \approx \Delta B$, the first term of the same
# series in $\Delta$ (Gu & Dao, 2023, *Mamba: Linear-Time Sequence Modeling with Selective
# State Spaces*; so does Hugging Face's implementation).
#
# The step $\Delta$ is a knob. A small step keeps the state ($\bar A \approx 1$) and lets
# little of the input in ($\bar B \approx 0$); a large step forgets the state
# ($\bar A \approx 0$) and replaces it by the input ($\bar B \to -B/A$). Keep that in mind:
# Mamba will choose $\Delta$ token by token.
#
# **Exercise 1 (2 points).** Write `discretize(A, B, delta)`, the exact zero-order hold for a
# diagonal $A$ given as its diagonal: `A` and `B` of the same shape `(..., N)`, and `delta`
# a float or a tensor that broadcasts against them (one step per channel, say, `(D, 1)`);
# return `(A_bar, B_bar)`, both of the broadcast shape. $A$ is strictly negative here.
# Compute $e^{x} - 1$ with `torch.expm1(x)`, which stays accurate when $x$ is tiny (where
# `torch.exp(x) - 1` loses the digits that matter).

# %% solution id=discretize
def discretize(A: Tensor, B: Tensor, delta: Tensor | float) -> tuple[Tensor, Tensor]:
    """Zero-order hold for a diagonal A (its diagonal, < 0): Ā = exp(ΔA), B̄ = (exp(ΔA) - 1)/A · B.

    A, B: (..., N); delta broadcasts with them. Returns (A_bar, B_bar), the broadcast shape.
    """
    ### BEGIN SOLUTION
    dA = delta * A
    return torch.exp(dA), torch.expm1(dA) / A * B  # B̄ = (ΔA)⁻¹ (exp(ΔA) - 1) ΔB
    ### END SOLUTION


# %% tests id=discretize-tests points=2
from helpers.checks import lesson10 as checks
checks.discretize(discretize)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("10").discretize(discretize)
### END HIDDEN TESTS

# %% [markdown]
# How good is Mamba's shortcut $\bar B \approx \Delta B$? For one state with $A = -1$ and
# $B = 1$, the exact $\bar B$ against $\Delta B$ over a range of steps:

# %%
one = torch.tensor([-1.0], dtype=torch.float64)
print(f"{'Δ':>6} | {'Ā = e^(ΔA)':>11} | {'B̄ exact':>9} | {'ΔB':>7} | ΔB off by")
for step in (0.01, 0.1, 1.0, 10.0):
    A_bar, B_bar = reference.discretize_zoh(one, torch.ones_like(one), step)
    _, B_simple = reference.discretize_zoh(one, torch.ones_like(one), step, simplified=True)
    print(f"{step:>6} | {A_bar.item():>11.4f} | {B_bar.item():>9.4f} | {B_simple.item():>7.2f} |"
          f" {abs(B_simple.item() / B_bar.item() - 1):.1%}")

# %% [markdown]
# For the small steps that keep a memory the two agree to about $\Delta/2$ (relative); for
# large steps $\Delta B$ overshoots by a factor that grows with $\Delta$ (the last rows),
# but there $\bar A \approx 0$: the state is just the latest input times a scale, and the
# layers around it can learn the scale.
#
# ## 2. An RNN without the tanh
#
# Lesson 01's RNN computed $h_t = \tanh(W_x x_t + W_h h_{t-1} + b)$. Remove the $\tanh$ and
# take $W_h$ diagonal: what is left is the discretized SSM,
#
# $$ x_t = \bar A\, x_{t-1} + \bar B\, u_t, \qquad y_t = C\, x_t , $$
#
# run from $x_0 = 0$, for each channel separately (we leave out the skip $D u_t$ until
# section 4). Everything is elementwise over the $N$ states: $\bar A$, $\bar B$ and $C$ of a
# channel are vectors of length $N$, and $y_t = \sum_n C_n x_{t,n}$. Because $\bar A$,
# $\bar B$ and $C$ are the same at every step, the system is *linear time-invariant*
# (LTI).
#
# The course follows the layout of the Mamba paper: a batch of sequences `u` of shape
# `(batch, D, L)`, channels before time; `A_bar`, `B_bar` and `C` of shape `(D, N)`.
#
# **Exercise 2 (2 points).** Write `ssm_recurrent(u, A_bar, B_bar, C)`: start from a zero
# state `(batch, D, N)` on the device and in the dtype of `u`, loop over the $L$ steps,
# and return every output stacked into `(batch, D, L)`. The output at step $t$ reads the
# state *after* it took in $u_t$.

# %% solution id=ssm-recurrent
def ssm_recurrent(u: Tensor, A_bar: Tensor, B_bar: Tensor, C: Tensor) -> Tensor:
    """The LTI SSM x_t = Ā x_{t-1} + B̄ u_t, y_t = C x_t from x_0 = 0, one step at a time.

    u: (batch, D, L); A_bar, B_bar, C: (D, N). Returns y: (batch, D, L).
    """
    ### BEGIN SOLUTION
    x = u.new_zeros(u.shape[0], *A_bar.shape)  # (batch, D, N)
    ys = []
    for t in range(u.shape[-1]):
        x = A_bar * x + B_bar * u[:, :, t, None]  # (batch, D, N)
        ys.append((C * x).sum(dim=-1))  # (batch, D)
    return torch.stack(ys, dim=-1)  # (batch, D, L)
    ### END SOLUTION


# %% tests id=ssm-recurrent-tests points=2
from helpers.checks import lesson10 as checks
checks.ssm_recurrent(ssm_recurrent)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("10").ssm_recurrent(ssm_recurrent)
### END HIDDEN TESTS

# %% [markdown]
# ## 3. The same SSM as a convolution
#
# Unroll the recurrence from $x_0 = 0$: $x_1 = \bar B u_1$,
# $x_2 = \bar A \bar B u_1 + \bar B u_2$, and in general
# $x_t = \sum_{k=0}^{t-1} \bar A^k \bar B\, u_{t-k}$. So
#
# $$ y_t = \sum_{k=0}^{t-1} \underbrace{C \bar A^k \bar B}_{K_k}\, u_{t-k}, \qquad
#    K = \left(C\bar B,\; C\bar A\bar B,\; C\bar A^2\bar B,\; \dots,\; C\bar A^{L-1}\bar B\right):
# $$
#
# the output is the input convolved with the kernel $K$, the system's response to a single
# impulse (S4, Gu et al., 2022). This changes how the SSM can be computed. The kernel does
# not depend on the input, so it is computed once; the convolution then handles all $L$
# positions at the same time, and with the fast Fourier transform it costs
# $O(L \log L)$. Training uses the convolution (parallel over time); generation uses the
# recurrence (one cheap step per token). It works because the system is LTI: the same
# $\bar A, \bar B, C$ at every step, so every $u_{t-k}$ is weighted by the same $K_k$.
#
# A causal convolution with the FFT needs care: the FFT computes a *circular*
# convolution, in which the end of the sequence wraps around onto its start. Padding both
# sequences with zeros to length $2L$ leaves room for the whole linear convolution, whose
# first $L$ values are the answer.
#
# **Exercise 3 (3 points).** Write `ssm_convolution(u, A_bar, B_bar, C)` with the same
# inputs and output as `ssm_recurrent`, without a loop over time: build the kernel
# `K` `(D, L)` from the powers $\bar A^k$, $k = 0, \dots, L-1$
# (`A_bar[..., None] ** torch.arange(L)` is `(D, N, L)`), then convolve causally, either
# with `torch.fft.rfft` / `irfft` of length $2L$, or with `torch.nn.functional.conv1d`
# (`groups=D`, the input padded with $L - 1$ zeros on the left, and the kernel flipped:
# `conv1d` computes a cross-correlation).

# %% solution id=ssm-convolution
def ssm_convolution(u: Tensor, A_bar: Tensor, B_bar: Tensor, C: Tensor) -> Tensor:
    """The LTI SSM as a causal convolution with K_k = C Ā^k B̄ (S4, Gu et al., 2022), by FFT.

    u: (batch, D, L); A_bar, B_bar, C: (D, N). Returns y: (batch, D, L).
    """
    ### BEGIN SOLUTION
    L = u.shape[-1]
    powers = A_bar[..., None] ** torch.arange(L, device=u.device)  # (D, N, L)
    K = ((C * B_bar)[..., None] * powers).sum(dim=1)  # (D, L)
    spectrum = torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L)  # zero-padded: no wrap
    return torch.fft.irfft(spectrum, n=2 * L)[..., :L]  # (batch, D, L)
    ### END SOLUTION


# %% tests id=ssm-convolution-tests points=3
from helpers.checks import lesson10 as checks
checks.ssm_convolution(ssm_convolution)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("10").ssm_convolution(ssm_convolution)
### END HIDDEN TESTS

# %% [markdown]
# ### How far does an SSM remember?
#
# $K_k = \partial y_t / \partial u_{t-k}$: the kernel *is* the influence of an input $k$
# steps back, the quantity whose collapse lesson 01 plotted for the RNN. Here nothing
# saturates; the influence decays as $\bar A^k = e^{k \Delta A}$, so the slowest state
# ($A_n = -1$) loses a factor $e$ every $1/\Delta$ steps. Below, $N = 16$ states with
# Mamba's initial $A_n = -n$ (the "S4D-Real" initialisation), $B = C = 1$, for three steps
# $\Delta$ from Mamba's initial range $[0.001, 0.1]$. Then the two forms of exercises 2 and
# 3 (the course's references, `helpers.ssm`) on a batch of long random sequences.

# %%
N_STATES, MEMORY_L = 16, 3000
A_s4d = -torch.arange(1, N_STATES + 1, dtype=torch.float64)  # (N,): Mamba's initial A
ones = torch.ones(N_STATES, dtype=torch.float64)
kernels = {}
for step in (0.001, 0.01, 0.1):
    A_bar, B_bar = reference.discretize_zoh(A_s4d, ones, step)  # (N,) each
    K = reference.ssm_kernel(A_bar[None], B_bar[None], ones[None], MEMORY_L)[0]  # (L,)
    kernels[f"Δ = {step}"] = K.abs() / K.abs()[0]
    below = (K.abs() < 0.01 * K.abs()[0]).nonzero()
    print(f"Δ = {step}: K_0 = {K[0]:.4f}; the influence falls below 1% of K_0 after "
          f"{int(below[0]) if len(below) else f'more than {MEMORY_L}'} steps")
ax = gradient_norm_by_distance(kernels, title="an SSM's memory grows like 1/Δ: "
                               "the step Δ sets how far it reaches")
ax.set_ylabel(r"influence relative to the present, $|K_k| / |K_0|$")
ax.set_ylim(1e-6, 2)
plt.show()

A_bar, B_bar = reference.discretize_zoh(-torch.exp(torch.randn(64, N_STATES, device=device)),
                                        torch.randn(64, N_STATES, device=device), 0.05)
C_lti = torch.randn(64, N_STATES, device=device)  # D = 64 channels
u_lti = torch.randn(4, 64, 512 if SHORT else 2048, device=device)  # (batch, D, L)
with one_cpu_thread():
    y_loop = reference.ssm_recurrent(u_lti, A_bar, B_bar, C_lti)
    y_conv = reference.ssm_convolution(u_lti, reference.ssm_kernel(A_bar, B_bar, C_lti,
                                                                   u_lti.shape[-1]))
print(f"recurrent and convolutional forms, L = {u_lti.shape[-1]}: max |difference| "
      f"{(y_loop - y_conv).abs().max():.1e} (outputs of size up to {y_loop.abs().max():.1f})")

# %% [markdown]
# After a quick initial drop (the fast states, large $n$, fade first), each curve is a
# straight line on the log scale, the decay of its slowest state, and a step ten times
# smaller reaches about ten times further (the printed step counts): an LTI SSM's memory is
# a design choice, not an accident of saturation. S4 builds on this with structured $A$ matrices that hold long
# memories (HiPPO, Gu et al., 2020, *HiPPO: Recurrent Memory with Optimal Polynomial
# Projections*). And the two forms agree to rounding on long sequences: the convolution,
# which has no loop over time, can replace the recurrence for training.
#
# ## 4. What time-invariance cannot do: selection
#
# The LTI kernel weighs an input by its *distance* alone. Every token enters the state with
# the same pattern of weights, whether it matters or not: an LTI SSM cannot decide, from
# what a token *is*, to keep it and ignore its neighbours. Gu and Dao (2023) make the point
# with the *selective copying* task: a few data tokens are scattered at random positions
# among blanks, and at the end the model must name them in order. A fixed kernel could
# copy tokens from fixed positions; it has no way to find tokens whose positions change
# from one sequence to the next.

# %%
COPY_LENGTH, N_DATA, COPY_VOCAB = 48, 3, 8  # 48 positions, 3 data tokens, 6 data symbols
example, example_targets = tasks.selective_copying_task(1, COPY_LENGTH, N_DATA, COPY_VOCAB,
                                                        torch.Generator().manual_seed(1))
symbols = ".>" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:COPY_VOCAB - 2]  # blank, marker, data
print("input :", "".join(symbols[i] for i in example[0].tolist()))
print("target:", "".join(symbols[i] if i >= 0 else " " for i in example_targets[0].tolist()))
print(f"chance accuracy at the markers: 1/{COPY_VOCAB - 2} = {1 / (COPY_VOCAB - 2):.3f}")

# %% [markdown]
# **Selectivity.** Mamba's answer is to compute $\Delta$, $B$ and $C$ *from the input*, at
# every step: for the input $u_t$ of the SSM (a vector of $D$ channels),
#
# $$ \Delta_t = \operatorname{softplus}(W_\Delta u_t + b_\Delta) \in \mathbb{R}^{D}_{>0},
#    \qquad B_t = W_B u_t \in \mathbb{R}^N, \qquad C_t = W_C u_t \in \mathbb{R}^N . $$
#
# A token worth storing can get a large $\Delta_t$: the state is overwritten with it. A
# token to ignore can get $\Delta_t \approx 0$: $\bar A_t \approx 1$, $\bar B_t \approx 0$,
# and the state passes through untouched ($B_t$ and $C_t$ select too: what is written, and
# what is read). This is the gate of the LSTM and the GRU, which lesson 01 mentioned, in
# another form: with one state, $A = -1$, $B = 1$ and the exact ZOH of exercise 1, the
# recurrence is exactly $h_t = (1 - g_t)\, h_{t-1} + g_t\, u_t$ with the gate
# $g_t = \sigma(W_\Delta u_t + b_\Delta)$ (Gu & Dao, 2023, theorem 1). The cell below checks
# that identity numerically.

# %%
z = torch.linspace(-6, 6, 101, dtype=torch.float64)  # gate pre-activations
A_bar, B_bar = reference.discretize_zoh(torch.tensor(-1.0, dtype=torch.float64),
                                        torch.tensor(1.0, dtype=torch.float64), F.softplus(z))
gate = torch.sigmoid(z)
print(f"max |Ā - (1 - σ(z))| = {(A_bar - (1 - gate)).abs().max():.1e}, "
      f"max |B̄ - σ(z)| = {(B_bar - gate).abs().max():.1e}")

# %% [markdown]
# The price: $\bar A_t$, $\bar B_t$ and $C_t$ now change at every step, so there is no
# single kernel and no convolution. Mamba's selective SSM (Gu & Dao, 2023, algorithm 2) is
# a recurrence again, with Mamba's $\bar B_t = \Delta_t B_t$ and the skip term back:
#
# $$ h_t = e^{\Delta_t A}\, h_{t-1} + \Delta_t B_t\, u_t, \qquad
#    y_t = C_t^\top h_t + D\, u_t , $$
#
# for every channel $d$ separately: $h_t$ holds $N$ numbers per channel, $A$ is one row of
# $N$ numbers per channel, $\Delta_t$ one number per channel, while $B_t$ and $C_t$ are
# shared by all channels. Shapes, as in the Mamba paper and its code: `u` and `delta`
# `(batch, D, L)`, `A` `(D, N)`, `B` and `C` `(batch, N, L)`, `D` `(D,)`.
#
# **Exercise 4 (3 points).** Write `selective_scan_sequential(u, delta, A, B, C, D)`: start
# from a zero state `(batch, D, N)`, loop over time, and return `y` `(batch, D, L)`. Use
# $\bar A_t = e^{\Delta_t A}$ and Mamba's $\bar B_t = \Delta_t B_t$ (not the exact ZOH of
# exercise 1), and do not forget the skip term $D u_t$.

# %% solution id=selective-scan
def selective_scan_sequential(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                              D: Tensor) -> Tensor:
    """Mamba's selective SSM, one step at a time (Gu & Dao, 2023, algorithm 2):
    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = C_t · h_t + D u_t, per channel.

    u, delta: (batch, D, L); A: (D, N); B, C: (batch, N, L); D: (D,). Returns y: (batch, D, L).
    """
    ### BEGIN SOLUTION
    h = u.new_zeros(u.shape[0], *A.shape)  # (batch, D, N)
    ys = []
    for t in range(u.shape[-1]):
        step = delta[:, :, t, None]  # (batch, D, 1)
        h = torch.exp(step * A) * h + step * B[:, None, :, t] * u[:, :, t, None]  # (batch, D, N)
        ys.append((h * C[:, None, :, t]).sum(dim=-1) + D * u[:, :, t])  # (batch, D)
    return torch.stack(ys, dim=-1)  # (batch, D, L)
    ### END SOLUTION


# %% tests id=selective-scan-tests points=3
from helpers.checks import lesson10 as checks
checks.selective_scan_sequential(selective_scan_sequential)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("10").selective_scan_sequential(selective_scan_sequential)
### END HIDDEN TESTS

# %% [markdown]
# ### Experiment: selective copying, with and without selection
#
# Two small Mamba language models (`helpers.ssm.Mamba`: token embedding, two residual Mamba
# blocks with RMSNorm, an output layer) that differ in one thing: in the second,
# `selective=False` replaces $\Delta_t$, $B_t$ and $C_t$ by learned constants, which makes
# its SSM time-invariant. Everything else, the gating branch and the short convolution of
# a Mamba block included, is the same. Both train for the same number of steps on fresh
# selective-copying batches; accuracy is measured at the markers only. (The experiment uses
# the course's Mamba, so it runs whether or not exercise 4 is done.)

# %%
def train_selective_copying(selective: bool, steps: int, batch: int = 32,
                            lr: float = 5e-3) -> tuple[reference.Mamba, list[float]]:
    """A two-layer Mamba trained with Adam on fresh selective-copying batches; the accuracy
    at the markers after each step."""
    seed_everything(0)
    model = reference.Mamba(COPY_VOCAB, d_model=32, n_layers=2, d_state=8,
                            selective=selective).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator, accuracies = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        tokens, targets = tasks.selective_copying_task(batch, COPY_LENGTH, N_DATA, COPY_VOCAB,
                                                       generator, device)
        logits = model(tokens)  # (B, L, V)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scored = targets != tasks.IGNORE_INDEX
        accuracies.append(float((logits.argmax(-1) == targets)[scored].float().mean()))
    return model.eval(), accuracies


@torch.no_grad()
def copying_accuracy(model: reference.Mamba, batch: int = 512) -> float:
    """Accuracy at the markers on fresh sequences the model has never seen."""
    tokens, targets = tasks.selective_copying_task(batch, COPY_LENGTH, N_DATA, COPY_VOCAB,
                                                   torch.Generator().manual_seed(123), device)
    scored = targets != tasks.IGNORE_INDEX
    return float((model(tokens).argmax(-1) == targets)[scored].float().mean())


COPY_STEPS = 30 if SHORT else 300
trained, curves_by_model = {}, {}
with one_cpu_thread():  # small matrices: one thread is faster than two fighting
    for name, selective in (("selective SSM (Mamba)", True), ("time-invariant SSM", False)):
        start = time.perf_counter()
        trained[name], accuracies = train_selective_copying(selective, COPY_STEPS)
        window = 10  # a running mean over 10 steps, for a readable curve
        curves_by_model[name] = [sum(accuracies[max(0, i - window + 1):i + 1])
                                 / len(accuracies[max(0, i - window + 1):i + 1])
                                 for i in range(COPY_STEPS)]
        print(f"{name}: {COPY_STEPS} steps in {time.perf_counter() - start:.1f} s, accuracy "
              f"on fresh sequences {copying_accuracy(trained[name]):.2f}")

ax = curves(range(1, COPY_STEPS + 1), curves_by_model, "training step",
            "accuracy at the markers", "only the selective SSM learns to copy the data "
            "tokens it chose to keep")
for line in ax.get_lines():
    line.set_marker("")
ax.axhline(1 / (COPY_VOCAB - 2), color="gray", linestyle=":", label="chance")
ax.set_ylim(0, 1.02)
ax.legend()
plt.show()

# %% [markdown]
# The selective model climbs towards perfect copies, while the time-invariant one, with the
# same size and training, stays far below (compare the printed accuracies with chance).
# Gu and Dao (2023, table 1) find the same gap on longer sequences and with much longer
# training: a time-invariant S4 layer copies 18.3% of the tokens, Mamba 99.8%.
#
# ## 5. The parallel scan
#
# The selective SSM lost the convolution; must it train one step at a time, like lesson
# 01's RNN? No: a *linear* recurrence still has a parallel algorithm. Per channel and state,
# the recurrence is $h_t = a_t h_{t-1} + b_t$, with $a_t = e^{\Delta_t A}$ and
# $b_t = \Delta_t B_t u_t$. Each step is the affine map $h \mapsto a_t h + b_t$, written as
# the pair $(a_t, b_t)$. Two steps in a row, first $(a_1, b_1)$ then $(a_2, b_2)$, make one
# map of the same kind:
#
# $$ h \mapsto a_2 (a_1 h + b_1) + b_2 = (a_1 a_2)\, h + (a_2 b_1 + b_2), \qquad
#    (a_1, b_1) \bullet (a_2, b_2) = (a_1 a_2,\; a_2 b_1 + b_2). $$
#
# The operator $\bullet$ is associative (check it on three pairs), so
# $h_t = \big((a_1, b_1) \bullet \dots \bullet (a_t, b_t)\big)$ applied to $h_0 = 0$, the
# $b$ part of a *prefix* of pairs, can be computed in any grouping: a *scan* (Blelloch,
# 1990, *Prefix Sums and Their Applications*; Martin & Cundy, 2018, *Parallelizing Linear
# Recurrent Neural Nets Over Sequence Length*). The order of the two arguments matters:
# $\bullet$ is not commutative.
#
# The simplest parallel scan doubles its reach each round (Hillis & Steele, 1986, *Data
# Parallel Algorithms*). Before round $j$ each position holds the composition of the
# $2^j$ steps ending at it (or fewer, near the start); round $j$ composes it with the
# position $k = 2^j$ to its left, so that it covers $2^{j+1}$ steps:
#
# $$ b_t \leftarrow a_t\, b_{t-k} + b_t, \qquad a_t \leftarrow a_t\, a_{t-k}
#    \qquad \text{for every } t \ge k \text{ at once,} $$
#
# with the old values on the right (positions $t < k$ have nothing to their left and stay).
# After $\lceil \log_2 L \rceil$ rounds, $b_t = h_t$. Each round is a few whole-tensor
# operations: $O(\log L)$ sequential rounds instead of $L$ steps, at the price of
# $O(L \log L)$ work. Blelloch's work-efficient scan needs only $O(L)$ work in about
# $2\log_2 L$ rounds; `helpers.ssm.parallel_scan` uses it, and Mamba's GPU kernel fuses it
# with the discretization in fast on-chip memory (Gu & Dao, 2023, section 3.3).
#
# **Exercise 5 (3 points).** Write `parallel_scan(a, b)` for `a` and `b` of shape
# `(..., L)` (time last), returning every $h_t$ of $h_t = a_t h_{t-1} + b_t$, $h_0 = 0$,
# with shape `(..., L)`. Use the doubling rounds: no Python loop over the $L$ time steps
# (the check counts your tensor operations), no `cumprod` or `cumsum` tricks. Shift a tensor
# $k$ steps to the right with `F.pad(x, (k, 0))[..., :L]` (padding with the identity step,
# $a = 1$ and $b = 0$), and use out-of-place operations only, so that autograd can
# differentiate your scan (the check compares your gradients with those of the loop).

# %% solution id=parallel-scan
def parallel_scan(a: Tensor, b: Tensor) -> Tensor:
    """h_t = a_t h_{t-1} + b_t (h_0 = 0) along the last dim in ceil(log2 L) doubling rounds
    (Hillis & Steele, 1986). a, b: (..., L). Returns h: (..., L)."""
    ### BEGIN SOLUTION
    L = a.shape[-1]
    k = 1
    while k < L:
        b = b + a * F.pad(b, (k, 0))[..., :L]  # (a_{t-k}, b_{t-k}) • (a_t, b_t)
        a = a * F.pad(a, (k, 0), value=1.0)[..., :L]
        k *= 2
    return b
    ### END SOLUTION


# %% tests id=parallel-scan-tests points=3
from helpers.checks import lesson10 as checks
checks.parallel_scan(parallel_scan)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("10").parallel_scan(parallel_scan)
### END HIDDEN TESTS

# %% [markdown]
# ### Experiment: scan time against length
#
# `helpers.ssm.selective_scan(..., method=...)` runs the whole selective SSM either way:
# `"sequential"` loops over time as in exercise 4; `"parallel"` discretizes and scans the
# sequence in chunks that fit in the CPU's cache (Blelloch's scan inside a chunk, the state
# carried from chunk to chunk: Mamba's kernel does the same with GPU memory). One sequence,
# $D = 64$ channels (a Mamba block of width 32), $N = 16$, one CPU thread for both.

# %%
def median_seconds(fn, repeats: int = 3) -> float:
    """Median wall time of fn() over a few runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def scan_inputs(L: int, D: int = 64, N: int = 16) -> list[Tensor]:
    """u, delta, A, B, C, D for one sequence of length L, in Mamba's ranges."""
    g = torch.Generator().manual_seed(L)
    u, delta = torch.randn(1, D, L, generator=g), F.softplus(torch.randn(1, D, L, generator=g) - 2)
    A = -torch.arange(1, N + 1.0).repeat(D, 1)  # (D, N): Mamba's initial A
    B, C = torch.randn(1, N, L, generator=g), torch.randn(1, N, L, generator=g)
    return [t.to(device) for t in (u, delta, A, B, C, torch.ones(D))]


lengths = [256, 512, 1024] if SHORT else [256, 512, 1024, 2048, 4096]
scan_ms = {"sequential": [], "parallel": []}
with torch.no_grad(), one_cpu_thread():
    for L in lengths:
        inputs = scan_inputs(L)
        for method in scan_ms:
            scan_ms[method].append(1e3 * median_seconds(
                lambda: reference.selective_scan(*inputs, method=method)))
    y_seq = reference.selective_scan(*inputs, method="sequential")
    y_par = reference.selective_scan(*inputs, method="parallel")
for L, seq, par in zip(lengths, scan_ms["sequential"], scan_ms["parallel"]):
    print(f"L = {L:>4}: sequential {seq:7.1f} ms, parallel {par:6.1f} ms, {seq / par:4.1f}x")
print(f"at L = {lengths[-1]}, the two outputs differ by at most "
      f"{float((y_seq - y_par).abs().max() / y_seq.abs().max()):.1e} (relative)")
curves(lengths, scan_ms, "sequence length L", "milliseconds", "the parallel scan removes the "
       "per-step cost of the loop", log_x=True, log_y=True)
plt.show()

# %% [markdown]
# Both grow linearly with $L$ (slope one on these axes), but the loop pays for $L$ rounds
# of small tensor operations, each with its own overhead, while the parallel scan does a
# few large operations per chunk and level (the printed ratios). On a GPU, where every
# small operation also costs a kernel launch, the gap is far larger. Gradients flow through
# both (Mamba trains with the parallel one).
#
# ## 6. Decoding with a state of constant size
#
# To generate, a Mamba layer keeps two things per sequence: the last $d_{conv} - 1$ inputs
# of its short convolution, and the SSM state $h$, $N$ numbers per channel. A new token is
# one step of the recurrence; nothing grows. A transformer's KV cache (lesson 09) keeps
# $2 \times \text{layers} \times \text{KV heads} \times \text{head dim}$ numbers for *every*
# token it has seen. Below, in float16 for one sequence: two Mamba models against
# transformers of about the same size (published configurations: Mamba 130M and 2.8B,
# GPT-2 small, Pythia 2.8B).

# %%
mamba_configs = {  # layers, d_inner = 2 · d_model, N, d_conv
    "Mamba 130M": dict(n_layers=24, d_inner=1536, d_state=16, d_conv=4),
    "Mamba 2.8B": dict(n_layers=64, d_inner=5120, d_state=16, d_conv=4),
}
transformer_configs = {  # layers, K/V heads, head dim
    "GPT-2 124M": dict(n_layers=12, n_kv_heads=12, head_dim=64),
    "Pythia 2.8B": dict(n_layers=32, n_kv_heads=32, head_dim=80),
}
context = [2 ** p for p in range(6, 18)]  # 64 ... 131072 tokens
memory_mib = {}
for name, config in mamba_configs.items():
    memory_mib[name] = [reference.mamba_state_bytes(**config) / 2**20] * len(context)
for name, config in transformer_configs.items():
    memory_mib[name + " KV cache"] = [kv_cache_bytes(**config, seq_len=L) / 2**20
                                      for L in context]
for (mamba, m_config), (other, t_config) in zip(mamba_configs.items(),
                                                transformer_configs.items()):
    state = reference.mamba_state_bytes(**m_config)
    per_token = kv_cache_bytes(**t_config, seq_len=1)
    print(f"{mamba}: {state / 2**20:.2f} MiB at any length; {other}: {per_token / 2**10:.0f} KiB "
          f"per token, more than Mamba's whole state after {math.ceil(state / per_token)} tokens,"
          f" {kv_cache_bytes(**t_config, seq_len=context[-1]) / state:.0f}x more at "
          f"{context[-1]} tokens")
ax = curves(context, memory_mib, "tokens of context", "decoding memory (MiB, float16)",
            "the KV cache grows with every token; Mamba's state does not", log_x=True,
            log_y=True)
ax.set_xticks(context[::2], [f"{L:g}" for L in context[::2]])
plt.show()

# %% [markdown]
# The course's `Mamba.generate` decodes this way: the prompt goes through the parallel scan
# once and leaves a `MambaState` per layer (`helpers.ssm.MambaState`: the convolution's
# last inputs and $h$); each new token is then one `selective_scan_step`. A small random
# model shows that the state stays the same size while the text grows, and that decoding on
# the state gives the tokens a full forward pass over the whole text would choose.

# %%
tiny = reference.Mamba(50, d_model=32, n_layers=2).to(device).eval()
states = tiny.empty_states(1)
prompt = torch.tensor([[1, 2, 3]], device=device)
with torch.no_grad():
    out = tiny.generate(prompt, 20, states=states)
    after_20 = sum(state.nbytes for state in states)
    longer = tiny.generate(out[:, -1:], 200, states=states)
    after_220 = sum(state.nbytes for state in states)
    full = prompt
    for _ in range(20):  # no state: rerun the whole text for every token
        full = torch.cat([full, tiny(full)[:, -1:].argmax(-1)], dim=1)
print(f"decoding state after 20 generated tokens: {after_20} bytes; after 200 more: "
      f"{after_220} bytes (mamba_state_bytes, float32: "
      f"{reference.mamba_state_bytes(2, 64, 16, 4, bytes_per_elem=4)})")
print(f"decoding on the state gives the same 20 tokens as full forward passes: "
      f"{torch.equal(out, full)}")

# %% [markdown]
# ## 7. State space duality: the SSM is masked attention
#
# Unroll the selective recurrence from $h_0 = 0$, as section 3 unrolled the LTI one:
#
# $$ y_t = \sum_{s \le t} C_t^\top \Big(\prod_{r=s+1}^{t} \bar A_r\Big) \bar B_s\, u_s . $$
#
# Mamba-2 (Dao & Gu, 2024, *Transformers are SSMs: Generalized Models and Efficient
# Algorithms Through Structured State Space Duality*) restricts $A$ to one scalar per head
# (shared by the head's $P$ channels and its $N$ states). The product of the $\bar A_r$ is
# then a scalar, $M_{ts} = \exp\!\big(A \sum_{r=s+1}^{t} \Delta_r\big)$ for $t \ge s$ and 0
# above the diagonal, and for a head with inputs $x$ `(L, P)`:
#
# $$ Y = \big(M \circ C B^\top\big)\, (\Delta \circ x) . $$
#
# Read it with lesson 08's eyes: queries $C$, keys $B$, values $\Delta x$, scores
# $C B^\top$ without a softmax: causal *linear attention* (Katharopoulos et al., 2020,
# *Transformers are RNNs*), whose all-ones causal mask is replaced by the decay mask $M$.
# With $A = 0$ the mask is exactly the causal mask. One function, two algorithms: the scan,
# linear in $L$ with a constant state, and the matrix, quadratic but made of matrix
# products, which accelerators run fastest; Mamba-2 uses the matrix inside chunks and the
# scan between them.
#
# **Exercise 6 (3 points).** Write `ssd(x, dt, A, B, C)` in the matrix form, with heads in
# the attention layout: `x` `(batch, H, L, P)`, `dt` `(batch, H, L)`, `A` `(H,)` (negative),
# and `B`, `C` broadcasting to `(batch, H, L, N)` (Mamba-2 shares them across heads: shape
# `(batch, 1, L, N)`). Return `(batch, H, L, P)`. Build the exponent
# $A \sum_{r=s+1}^{t} \Delta_r$ from a cumulative sum (`torch.cumsum`), as the difference
# of two prefix sums; fill the entries above the diagonal with $-\infty$ *before* `exp`
# (they are positive there and overflow: `inf` times a 0 mask is NaN).

# %% solution id=ssd
def ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """Mamba-2's SSM with a scalar A per head as masked linear attention (Dao & Gu, 2024):
    y = (M ∘ C Bᵀ)(dt · x), M[t, s] = exp(A (dt_{s+1} + ... + dt_t)) for t >= s, else 0.

    x: (batch, H, L, P), dt: (batch, H, L), A: (H,), B, C: broadcasting to (batch, H, L, N).
    Returns (batch, H, L, P).
    """
    ### BEGIN SOLUTION
    L = x.shape[-2]
    total = torch.cumsum(dt * A[:, None], dim=-1)  # (batch, H, L): A (dt_1 + ... + dt_t)
    exponent = total[..., :, None] - total[..., None, :]  # (batch, H, L, L): sum over (s, t]
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    M = torch.exp(exponent.masked_fill(~causal, float("-inf")))  # (batch, H, L, L)
    scores = C @ B.transpose(-1, -2)  # (batch, H, L, L): C_t · B_s
    return (M * scores) @ (x * dt[..., None])  # (batch, H, L, P)
    ### END SOLUTION


# %% tests id=ssd-tests points=3
from helpers.checks import lesson10 as checks
checks.ssd(ssd)
### BEGIN HIDDEN TESTS
import importlib, helpers.hidden
importlib.reload(helpers.hidden).lesson("10").ssd(ssd)
### END HIDDEN TESTS

# %% [markdown]
# ### Looking inside: the attention matrix of a trained Mamba
#
# Mamba-1's $A$ is not scalar (each state has its own), but the same unrolling still gives
# every channel a matrix, $W_{ts} = \sum_n C_{t,n}\, e^{A_n (\Delta_{s+1} + \dots +
# \Delta_t)}\, \Delta_s B_{s,n}$ for $t \ge s$ (`helpers.ssm.selective_ssm_matrix`), with
# $y = W u + D u$. Here is $|W|$ of the second layer of each model trained in section 4,
# averaged over the channels, on one selective-copying sequence: which input positions
# (columns) reach which outputs (rows). The last three rows are the markers, where the
# model must name the data tokens.

# %%
sequence, _ = tasks.selective_copying_task(1, COPY_LENGTH, N_DATA, COPY_VOCAB,
                                           torch.Generator().manual_seed(7), device)
labels = [symbols[i] for i in sequence[0].tolist()]
data_at = [i for i, label in enumerate(labels) if label not in ".>"]
after_data = sorted({i + k for i in data_at for k in range(4)})  # a data token, next 3 steps
fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
with torch.no_grad():
    for ax, (name, model) in zip(axes, trained.items()):
        first, second = model.blocks
        x = first(model.embedding(sequence))  # the input of the second layer
        u, delta, B_sel, C_sel = second.mixer.selection(second.norm(x))
        W = reference.selective_ssm_matrix(delta, second.mixer.A, B_sel, C_sel)  # (1, D, L, L)
        weights = W[0].abs().mean(dim=0)  # (L, L)
        diagonals = [torch.diagonal(weights, -k) for k in range(1, COPY_LENGTH)]
        spread = sum(float(d.std() / d.mean()) for d in diagonals) / len(diagonals)
        markers = weights[COPY_LENGTH:, :COPY_LENGTH]  # the marker rows, over the input
        share = markers[:, after_data].sum() / markers.sum()
        print(f"{name}: variation along the diagonals {spread:.2g}; the markers put {share:.0%}"
              f" of their weight on the {len(after_data)} positions from each data token on "
              f"({len(after_data) / COPY_LENGTH:.0%} of the input)")
        attention_heatmap(weights / weights.max(), x_labels=labels, y_labels=labels, ax=ax,
                          title=name, value_label="|W| (scaled to max 1)")
        ax.tick_params(labelsize=6)
        ax.set_xlabel("input position s (the data tokens are letters)")
        ax.set_ylabel("output position t")
fig.suptitle("inside the SSM: the selective one reads where its data tokens are, "
             "the time-invariant one reads by distance")
fig.tight_layout()
plt.show()

q, k, v = (torch.randn(1, 2, 12, size, device=device) for size in (3, 3, 4))  # 2 heads
no_decay = reference.ssd(v, torch.ones(1, 2, 12, device=device), torch.zeros(2, device=device),
                         B=k, C=q)  # A = 0, Δ = 1: queries C, keys B, values x
linear_attention = (q @ k.transpose(-1, -2)).tril() @ v  # lesson 08: causal, no softmax
print(f"with A = 0 and Δ = 1, SSD is causal linear attention: max |difference| "
      f"{(no_decay - linear_attention).abs().max():.1e}")

# %% [markdown]
# The time-invariant model's matrix is a convolution: the same along every diagonal (a
# function of $t - s$ only, whatever the tokens; the printed variation is rounding). The
# selective model's matrix follows the tokens: bright columns where the data tokens are
# (one to three steps after each, where the short convolution before the SSM has carried
# them), and marker rows that read those columns (the printed shares). That is selection,
# seen as attention.
#
# ## What's next
#
# Attention recalls any earlier token exactly but pays for it in memory; an SSM keeps a
# state of constant size but must decide what to keep. Lesson 11 puts them together: a
# *hybrid* that interleaves Mamba layers with a few attention layers (Jamba, Lieber et
# al., 2024), the tasks where each one wins (associative recall, Arora et al., 2023), and a
# closing table of every mechanism in the course, measured for time and memory against
# the context length.
