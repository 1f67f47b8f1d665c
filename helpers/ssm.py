"""State space models and Mamba (lesson 10): a linear recurrence that trains in parallel and
decodes with a state of constant size.

In the order of the lesson:

1. :func:`discretize_zoh`: the continuous system ``x'(t) = A x(t) + B u(t)``, ``y = C x + D u``
   turned into a recurrence by a zero-order hold on the input over a step ``Δ``.
2. The linear time-invariant (LTI) SSM, in its two equal forms (S4: Gu, Goel & Ré, 2022,
   "Efficiently Modeling Long Sequences with Structured State Spaces"; diagonal A as in S4D:
   Gu, Gupta, Goel & Ré, 2022, "On the Parameterization and Initialization of Diagonal State
   Space Models"): :func:`ssm_recurrent` and :func:`ssm_kernel` + :func:`ssm_convolution`.
3. The selective SSM of Mamba (Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with
   Selective State Spaces"), where ``Δ``, ``B`` and ``C`` depend on the input:
   :func:`selective_scan`, sequential or through the parallel scan :func:`parallel_scan`
   (Blelloch, 1990, "Prefix Sums and Their Applications"), and :func:`selective_scan_step`,
   one decoding step.
4. State space duality (Dao & Gu, 2024, "Transformers are SSMs: Generalized Models and
   Efficient Algorithms Through Structured State Space Duality"): with one scalar ``A`` per
   head the SSM is masked linear attention, :func:`ssd`.
5. The Mamba language model: :class:`MambaMixer` (the sequence mixer), :class:`MambaBlock`
   (a residual layer around it), :class:`Mamba` with ``from_hf`` for Hugging Face's
   ``MambaForCausalLM``, and generation on a per-layer :class:`MambaState` (the last inputs of
   the causal convolution and the SSM state: constant size, whatever the length). A block
   called with a state continues from it and updates it in place, as a layer of
   :class:`helpers.kv_cache.KVCache` is updated: a hybrid stack (lesson 11) keeps a
   ``MambaState`` for each Mamba layer next to a KV cache for its attention layers.

Shapes follow the Mamba paper and its reference code: ``u, delta: (batch, D, L)``,
``A: (D, N)``, ``B, C: (batch, N, L)``, ``D: (D,)``, where ``D`` counts channels, ``N`` the
state size of each channel and ``L`` the time steps. Everything runs on the device and in the
dtype of its inputs (half precision is computed in float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from helpers.transformer import RMSNorm, copy_weights, next_token

# --- 1. discretization ---------------------------------------------------------------------


def _expm1_over_x(x: torch.Tensor) -> torch.Tensor:
    """(exp(x) - 1) / x, and its Taylor series 1 + x/2 + x²/6 near 0 (where the quotient is
    0/0), so that the value and the gradient are right everywhere."""
    small = x.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1 + x / 2 + x * x / 6, torch.expm1(safe) / safe)


def discretize_zoh(A: torch.Tensor, B: torch.Tensor, delta: torch.Tensor | float,
                   simplified: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold: the input held constant over each step of length ``delta``.

    For a diagonal ``A`` (given as its diagonal, so every product is elementwise) the exact
    solution of ``x' = Ax + Bu`` over one step is ``x_t = Ā x_{t-1} + B̄ u_t`` with

        Ā = exp(ΔA),    B̄ = (ΔA)⁻¹ (exp(ΔA) − I) · ΔB = (exp(ΔA) − 1) / A · B.

    ``simplified=True`` gives Mamba's ``B̄ = ΔB`` (Gu & Dao, 2023), the first-order term of the
    same series. A, B (..., N) and delta broadcast together; returns ``(A_bar, B_bar)`` of the
    broadcast shape.
    """
    dA = delta * A
    B_bar = delta * B if simplified else _expm1_over_x(dA) * delta * B
    A_bar, B_bar = torch.broadcast_tensors(torch.exp(dA), B_bar)
    return A_bar, B_bar


# --- 2. the linear time-invariant SSM: recurrent and convolutional -------------------------


def _expect_lti(u: torch.Tensor, A_bar: torch.Tensor, B_bar: torch.Tensor,
                C: torch.Tensor) -> None:
    if u.dim() != 3:
        raise ValueError(f"u should have shape (batch, D, L), got {tuple(u.shape)}")
    D = u.shape[1]
    for name, value in (("A_bar", A_bar), ("B_bar", B_bar), ("C", C)):
        if value.dim() != 2 or value.shape[0] != D or value.shape != A_bar.shape:
            raise ValueError(f"A_bar, B_bar and C should all have shape (D, N) with D = {D} "
                             f"channels of u; {name} has shape {tuple(value.shape)}")


def ssm_recurrent(u: torch.Tensor, A_bar: torch.Tensor, B_bar: torch.Tensor,
                  C: torch.Tensor) -> torch.Tensor:
    """The LTI SSM as a recurrence: ``x_t = Ā x_{t-1} + B̄ u_t``, ``y_t = C x_t``, from x = 0.

    Each of the D channels is its own single-input SSM with N states and a diagonal Ā: the RNN
    of lesson 01 without its tanh. u (batch, D, L); A_bar, B_bar, C (D, N). Returns
    y (batch, D, L).
    """
    _expect_lti(u, A_bar, B_bar, C)
    x = u.new_zeros(u.shape[0], *A_bar.shape)  # (batch, D, N)
    ys = []
    for t in range(u.shape[-1]):
        x = A_bar * x + B_bar * u[:, :, t, None]  # (batch, D, N)
        ys.append((C * x).sum(dim=-1))  # (batch, D)
    return torch.stack(ys, dim=-1)  # (batch, D, L)


def ssm_kernel(A_bar: torch.Tensor, B_bar: torch.Tensor, C: torch.Tensor,
               L: int) -> torch.Tensor:
    """The LTI SSM's convolution kernel ``K = (CB̄, CĀB̄, ..., CĀ^{L-1}B̄)`` (Gu et al., 2022).

    Unrolling the recurrence gives ``y_t = Σ_k C Ā^k B̄ u_{t-k}``: the output is the input
    convolved with K, the system's response to a unit impulse. A_bar, B_bar, C (D, N) ->
    K (D, L).
    """
    powers = A_bar[..., None] ** torch.arange(L, device=A_bar.device)  # (D, N, L): Ā^k
    return torch.einsum("dn,dnl->dl", C * B_bar, powers)


def ssm_convolution(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Causal convolution ``y_t = Σ_{k=0}^{t} K_k u_{t-k}`` per channel, by FFT in O(L log L).

    Both sequences are zero-padded to 2L so that the FFT's circular convolution does not wrap
    the end of the sequence around to its start. u (batch, D, L), K (D, L) -> y (batch, D, L).
    """
    if u.dim() != 3 or K.dim() != 2 or K.shape != u.shape[1:]:
        raise ValueError(f"u should have shape (batch, D, L) and K (D, L): got {tuple(u.shape)} "
                         f"and {tuple(K.shape)}")
    L = u.shape[-1]
    spectrum = torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L)  # (batch, D, L + 1)
    return torch.fft.irfft(spectrum, n=2 * L)[..., :L]  # (batch, D, L)


# --- 3. the selective scan ------------------------------------------------------------------


def sequential_scan(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The linear recurrence ``h_t = a_t h_{t-1} + b_t`` (h before the first step is 0), one
    step at a time along ``dim``. a, b (..., L, ...) -> h, the same shape."""
    h = torch.zeros_like(b.select(dim, 0))
    states = []
    for a_t, b_t in zip(a.unbind(dim), b.unbind(dim)):
        h = a_t * h + b_t
        states.append(h)
    return torch.stack(states, dim=dim)


def parallel_scan(a: torch.Tensor, b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """:func:`sequential_scan` in log₂ L vectorised levels: an associative scan (Blelloch, 1990).

    A step is the pair (a_t, b_t), the map h -> a_t h + b_t. Doing (a₁, b₁) then (a₂, b₂) is
    again such a map, ``(a₁, b₁) • (a₂, b₂) = (a₁a₂, a₂b₁ + b₂)``, and this operator is
    associative, so prefixes can be combined in any grouping. Here: combine neighbours
    (0, 1), (2, 3), ... into half as many steps, scan those recursively (their results are the
    states at the odd positions), then each even position is one step after the odd one before
    it. O(L) work, O(log L) depth (Martin & Cundy, 2018, "Parallelizing Linear Recurrent Neural
    Nets Over Sequence Length"). a, b (..., L, ...) -> h, the same shape; differentiable.
    """
    if dim % b.dim() != 1:  # work on (batch, L, ...): one leading dim before time
        a, b = a.movedim(dim, 0)[None], b.movedim(dim, 0)[None]
        return _odd_even_scan(a, b)[0].movedim(0, dim)
    return _odd_even_scan(a, b)


def _odd_even_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`parallel_scan` along dim 1 of a, b (batch, L, ...).

    Split, unbind and stack rather than strided slices: their gradients are a concatenation,
    where a slice's gradient is a tensor of zeros the size of its input.
    """
    L = b.shape[1]
    if L == 1:
        return b
    pairs = L // 2
    if L % 2:  # the last step has no partner: it is applied after the others
        (a, a_last), (b, b_last) = a.split([L - 1, 1], dim=1), b.split([L - 1, 1], dim=1)
    a_even, a_odd = a.unflatten(1, (pairs, 2)).unbind(2)  # steps 0, 2, 4 ... and 1, 3, 5 ...
    b_even, b_odd = b.unflatten(1, (pairs, 2)).unbind(2)
    # (a_2i, b_2i) • (a_2i+1, b_2i+1), scanned: the states at the odd positions 1, 3, 5 ...
    h_odd = _odd_even_scan(a_even * a_odd, torch.addcmul(b_odd, a_odd, b_even))
    # the even positions 2, 4 ... are one step after the odd position before them
    b_first, b_later = b_even.split([1, pairs - 1], dim=1)
    a_later = a_even.split([1, pairs - 1], dim=1)[1]
    h_before, h_last = h_odd.split([pairs - 1, 1], dim=1)
    h_even = torch.cat([b_first, torch.addcmul(b_later, a_later, h_before)], dim=1)
    h = torch.stack([h_even, h_odd], dim=2).flatten(1, 2)  # interleaved: 0, 1, 2, 3 ...
    if L % 2:
        h = torch.cat([h, torch.addcmul(b_last, a_last, h_last)], dim=1)
    return h


def _expect_selective(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      C: torch.Tensor, D: torch.Tensor | None) -> None:
    if u.dim() != 3:
        raise ValueError(f"u should have shape (batch, D, L), got {tuple(u.shape)}")
    batch, channels, L = u.shape
    expected = {"delta": (delta, (batch, channels, L), "(batch, D, L)"),
                "A": (A, (channels, A.shape[-1]), "(D, N)"),
                "B": (B, (batch, A.shape[-1], L), "(batch, N, L)"),
                "C": (C, (batch, A.shape[-1], L), "(batch, N, L)")}
    if D is not None:
        expected["D"] = (D, (channels,), "(D,)")
    for name, (value, shape, meaning) in expected.items():
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} should have shape {meaning} = {shape} for u of shape "
                             f"(batch, D, L) = {tuple(u.shape)}, got {tuple(value.shape)}")


def _discretize(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ā = exp(ΔA) and B̄u = ΔBu (Mamba's B̄ ≈ ΔB), time-major.

    u, delta (batch, T, D), A (D, N), B (batch, T, N) -> Ā, B̄u (batch, T, D, N) each.
    """
    A_bar = (delta[..., None] * A).exp_()  # (batch, T, D, N)
    Bu = (delta * u)[..., None] * B[:, :, None, :]  # (batch, T, D, N)
    return A_bar, Bu


def _chunk_size(u: torch.Tensor, N: int) -> int:
    """Time steps per chunk of the parallel scan: the whole sequence on an accelerator; on a
    CPU, chunks of about 2¹⁹ numbers per tensor, which stay in its cache (as Mamba's kernel
    keeps chunks in GPU SRAM)."""
    batch, channels, L = u.shape
    if u.device.type != "cpu":
        return L
    per_step = batch * channels * N
    return max(16, min(L, 2 ** max(0, round(math.log2(2 ** 19 / per_step)))))


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   C: torch.Tensor, D: torch.Tensor | None = None, method: str = "parallel",
                   initial_state: torch.Tensor | None = None, return_state: bool = False,
                   chunk_size: int | None = None
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba's selective SSM (Gu & Dao, 2023, algorithm 2): an LTI SSM whose Δ, B and C change
    at every step.

        h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,    y_t = C_t h_t + D u_t

    per channel, with the state h_t (batch, D, N) starting at ``initial_state`` (zeros).
    u, delta (batch, D, L) with delta > 0; A (D, N), negative for a stable system; B, C
    (batch, N, L); D (D,) or None. ``method="sequential"`` loops over time;
    ``method="parallel"`` runs :func:`parallel_scan` over chunks of ``chunk_size`` steps
    (default: :func:`_chunk_size`), carrying the state from chunk to chunk. Both are
    differentiable and agree to rounding. Returns y (batch, D, L), and the last state
    (batch, D, N) too when ``return_state``.
    """
    _expect_selective(u, delta, A, B, C, D)
    if method not in ("sequential", "parallel"):
        raise ValueError(f"method should be 'sequential' or 'parallel', got {method!r}")
    dtype = u.dtype
    work = torch.promote_types(dtype, torch.float32)  # half precision scans in float32
    batch, channels, L = u.shape
    A = A.to(work)
    # time-major and contiguous, so that a time step or a chunk is one block of memory
    u_t, delta_t, B_t, C_t = (t.to(work).transpose(1, 2).contiguous() for t in (u, delta, B, C))
    h = initial_state.to(work) if initial_state is not None else None  # (batch, D, N)
    if method == "sequential":
        A_bar, Bu = _discretize(u_t, delta_t, A, B_t)  # (batch, L, D, N) each
        h = u_t.new_zeros(batch, channels, A.shape[-1]) if h is None else h
        ys = []  # unbind, not indexing: its backward writes each step's gradient once
        for A_bar_t, Bu_t, C_t_t in zip(A_bar.unbind(1), Bu.unbind(1), C_t.unbind(1)):
            h = A_bar_t * h + Bu_t  # (batch, D, N)
            ys.append(torch.einsum("bdn,bn->bd", h, C_t_t))
        y = torch.stack(ys, dim=1)  # (batch, L, D)
    else:
        T = chunk_size or _chunk_size(u, A.shape[-1])
        ys = []
        for start in range(0, L, T):
            piece = slice(start, start + T)
            A_bar, Bu = _discretize(u_t[:, piece], delta_t[:, piece], A, B_t[:, piece])
            if h is not None:  # the state carried in enters with the chunk's first step
                Bu[:, 0] += A_bar[:, 0] * h
            states = parallel_scan(A_bar, Bu, dim=1)  # (batch, T, D, N)
            h = states[:, -1]
            ys.append(torch.einsum("btdn,btn->btd", states, C_t[:, piece]))
        y = torch.cat(ys, dim=1)  # (batch, L, D)
    if D is not None:
        y = y + D.to(work) * u_t
    y = y.transpose(1, 2).to(dtype)  # (batch, D, L)
    return (y, h.to(dtype)) if return_state else y


def selective_scan_step(state: torch.Tensor, u: torch.Tensor, delta: torch.Tensor,
                        A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        D: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of :func:`selective_scan`, for decoding: O(D·N) whatever came before.

    state (batch, D, N); u, delta (batch, D); A (D, N); B, C (batch, N); D (D,) or None.
    Returns y (batch, D) and the new state (batch, D, N).
    """
    dtype = u.dtype
    work = torch.promote_types(dtype, torch.float32)
    u, delta, A, B, C, state = (t.to(work) for t in (u, delta, A, B, C, state))
    state = torch.exp(delta[..., None] * A) * state + (delta * u)[..., None] * B[:, None, :]
    y = torch.einsum("bdn,bn->bd", state, C)  # (batch, D)
    if D is not None:
        y = y + D.to(work) * u
    return y.to(dtype), state.to(dtype)


# --- 4. state space duality: the SSM as masked attention ------------------------------------


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """``S[..., t, s] = x_{s+1} + ... + x_t`` for t >= s (0 on the diagonal), -inf above it.

    x (..., L) -> (..., L, L). Summed by a masked cumulative sum rather than as a difference of
    two prefix sums, which would cancel catastrophically on long sequences (Dao & Gu, 2024).
    """
    L = x.shape[-1]
    below = torch.ones(L, L, dtype=torch.bool, device=x.device).tril(-1)  # s < t
    terms = x[..., :, None].expand(*x.shape, L).masked_fill(~below, 0)  # [.., r, s] = x_r if r > s
    sums = terms.cumsum(dim=-2)  # (..., L, L): sum over s < r <= t
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    return sums.masked_fill(~causal, float("-inf"))


def ssd_mask(dt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """The decay of state space duality: ``M[t, s] = exp(A (Δ_{s+1} + ... + Δ_t))`` for t >= s,
    0 above the diagonal. dt (batch, H, L), A (H,) -> (batch, H, L, L)."""
    return torch.exp(segment_sum(dt * A[:, None]))


def ssd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
        C: torch.Tensor) -> torch.Tensor:
    """The selective SSM with one scalar A per head, as a matrix (Dao & Gu, 2024, Mamba-2):

        y = (M ∘ C Bᵀ) (Δ x),    M[t, s] = exp(A · (Δ_{s+1} + ... + Δ_t)) for t >= s, else 0

    This is causal linear attention (lesson 08) with queries C, keys B, values Δx and a decay
    mask M: state space duality. x (batch, H, L, P), dt (batch, H, L), A (H,), B and C
    broadcasting to (batch, H, L, N) (Mamba-2 shares them across heads). Returns
    (batch, H, L, P), equal to :func:`selective_scan` on the H·P channels with A repeated.
    """
    scores = C @ B.transpose(-1, -2)  # (batch, H, L, L): C_t · B_s
    return (ssd_mask(dt, A) * scores) @ (x * dt[..., None])  # (batch, H, L, P)


def selective_ssm_matrix(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         C: torch.Tensor) -> torch.Tensor:
    """Any selective SSM as a matrix per channel: ``y_t = Σ_s W[t, s] u_s (+ D u_t)`` with

        W[t, s] = Σ_n C_t,n exp(A_n (Δ_{s+1} + ... + Δ_t)) Δ_s B_s,n    for t >= s, else 0,

    the "attention matrix" hidden in the scan (Dao & Gu, 2024; with a scalar A per head it is
    :func:`ssd`'s). delta (batch, D, L), A (D, N), B, C (batch, N, L) -> (batch, D, L, L).
    Quadratic in L: for looking inside a model, not for running it.
    """
    decay = torch.exp(segment_sum(delta[:, :, None, :] * A[None, :, :, None]))  # (b, D, N, L, L)
    return torch.einsum("bnt,bdnts,bds,bns->bdts", C, decay, delta, B)


# --- 5. Mamba -------------------------------------------------------------------------------


@dataclass
class MambaState:
    """What one Mamba layer keeps between decoding steps, the same size at any length.

    ``conv`` (batch, d_inner, d_conv - 1): the last inputs of the causal convolution;
    ``ssm`` (batch, d_inner, d_state): the state h of the selective SSM. A layer called with a
    state continues from it and updates it in place (the counterpart of a KV cache's layer).
    """

    conv: torch.Tensor
    ssm: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.ssm))


def mamba_state_bytes(n_layers: int, d_inner: int, d_state: int, d_conv: int, batch: int = 1,
                      bytes_per_elem: int = 2) -> int:
    """Bytes of a Mamba model's decoding state, :class:`MambaState` for every layer: the
    counterpart of :func:`helpers.kv_cache.kv_cache_bytes`, except that no factor grows with
    the sequence length."""
    return n_layers * batch * d_inner * (d_state + d_conv - 1) * bytes_per_elem


class MambaMixer(nn.Module):
    """Mamba's sequence mixer (Gu & Dao, 2023, figure 3), the counterpart of attention.

    x (B, L, d_model) is projected to two branches of width ``d_inner = expand · d_model``.
    One goes through a short causal depthwise convolution (``d_conv`` taps), SiLU, then the
    selective SSM, whose Δ (through a rank-``dt_rank`` bottleneck and softplus), B and C are
    computed from it; the other gates the result through SiLU; a projection returns to
    d_model. Parameter names are Hugging Face's (``MambaMixer``). ``selective=False`` makes
    Δ, B and C learned constants (an LTI SSM, the ablation of the lesson); ``scan_method``
    chooses :func:`selective_scan`'s method.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, conv_bias: bool = True, bias: bool = False,
                 selective: bool = True, scan_method: str = "parallel"):
        super().__init__()
        d_inner = expand * d_model
        dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, d_state, d_conv, dt_rank
        self.selective, self.scan_method = selective, scan_method
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=conv_bias)
        if selective:
            self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
            self.dt_proj = nn.Linear(dt_rank, d_inner)
        else:
            self.B = nn.Parameter(torch.randn(d_state) / math.sqrt(d_state))
            self.C = nn.Parameter(torch.randn(d_state) / math.sqrt(d_state))
            self.dt_bias = nn.Parameter(torch.empty(d_inner))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1.0)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self._init_dt()

    @torch.no_grad()
    def _init_dt(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba's initialisation of Δ: softplus(bias) log-uniform in [dt_min, dt_max], A_n = -n
        (S4D-Real)."""
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min))
        inverse_softplus = dt + torch.log(-torch.expm1(-dt))
        (self.dt_proj.bias if self.selective else self.dt_bias).copy_(inverse_softplus)

    def empty_state(self, batch: int, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> MambaState:
        """A zero :class:`MambaState` for ``batch`` sequences (before their first token)."""
        like = self.out_proj.weight
        device, dtype = device or like.device, dtype or like.dtype
        return MambaState(conv=torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device,
                                           dtype=dtype),
                          ssm=torch.zeros(batch, self.d_inner, self.d_state, device=device,
                                          dtype=dtype))

    def _convolve(self, xs: torch.Tensor, state: MambaState | None) -> torch.Tensor:
        """The causal depthwise convolution, then SiLU: xs (B, d_inner, L) -> (B, d_inner, L).

        It sees the last d_conv - 1 inputs before xs (``state.conv``, zeros for a new
        sequence) and leaves the last d_conv - 1 inputs in the state.
        """
        batch = xs.shape[0]
        past = state.conv if state is not None else xs.new_zeros(batch, self.d_inner,
                                                                  self.d_conv - 1)
        padded = torch.cat([past, xs], dim=-1)  # (B, d_inner, d_conv - 1 + L)
        if state is not None:
            state.conv = padded[..., padded.shape[-1] - (self.d_conv - 1):]
        return F.silu(F.conv1d(padded, self.conv1d.weight, self.conv1d.bias,
                               groups=self.d_inner))

    def _ssm_parameters(self, u: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Δ (B, d_inner, L), B and C (B, d_state, L): from u (B, d_inner, L) when selective."""
        batch, _, L = u.shape
        if not self.selective:
            delta = F.softplus(self.dt_bias)[None, :, None].expand(batch, -1, L)
            return (delta, self.B[None, :, None].expand(batch, -1, L),
                    self.C[None, :, None].expand(batch, -1, L))
        dt, B, C = self.x_proj(u.transpose(1, 2)).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)  # (B, L, ·) each
        delta = F.softplus(self.dt_proj(dt)).transpose(1, 2)  # (B, d_inner, L)
        return delta, B.transpose(1, 2), C.transpose(1, 2)

    @property
    def A(self) -> torch.Tensor:
        """The state matrix's diagonal (d_inner, d_state), negative: ``-exp(A_log)``."""
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    def selection(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the SSM sees for a new sequence x (B, L, d_model): its input u and the Δ, B, C
        computed from it (shapes as :func:`selective_scan`), to look inside a model."""
        u = self._convolve(self.in_proj(x).transpose(1, 2).chunk(2, dim=1)[0], None)
        return (u, *self._ssm_parameters(u))

    def forward(self, x: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        """x (B, L, d_model) -> (B, L, d_model).

        With a ``state`` (from :meth:`empty_state`, or left by earlier calls) x continues the
        sequence it summarises, and the state is updated to include x; one token costs the
        same at any position.
        """
        if x.dim() != 3:
            raise ValueError(f"x should have shape (B, L, d_model), got {tuple(x.shape)}")
        xs, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, L) each
        u = self._convolve(xs, state)
        delta, B, C = self._ssm_parameters(u)
        if state is None:
            y = selective_scan(u, delta, self.A, B, C, self.D, method=self.scan_method)
        elif x.shape[1] == 1:
            y, state.ssm = selective_scan_step(state.ssm, u[..., 0], delta[..., 0], self.A,
                                               B[..., 0], C[..., 0], self.D)
            y = y[..., None]  # (B, d_inner, 1)
        else:
            y, state.ssm = selective_scan(u, delta, self.A, B, C, self.D,
                                          method=self.scan_method, initial_state=state.ssm,
                                          return_state=True)
        return self.out_proj((y * F.silu(z)).transpose(1, 2))  # (B, L, d_model)


class MambaBlock(nn.Module):
    """A residual layer: ``x + mixer(norm(x))`` with RMSNorm (Zhang & Sennrich, 2019), the
    building block of :class:`Mamba` and, next to attention layers, of hybrids (lesson 11).

    Options as :class:`MambaMixer`; ``forward(x, state=None)`` as :meth:`MambaMixer.forward`.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | None = None, conv_bias: bool = True, bias: bool = False,
                 norm_eps: float = 1e-5, selective: bool = True, scan_method: str = "parallel"):
        super().__init__()
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.mixer = MambaMixer(d_model, d_state, d_conv, expand, dt_rank, conv_bias, bias,
                                selective, scan_method)

    def empty_state(self, batch: int, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> MambaState:
        return self.mixer.empty_state(batch, device, dtype)

    def forward(self, x: torch.Tensor, state: MambaState | None = None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), state)


class Mamba(nn.Module):
    """A Mamba language model (Gu & Dao, 2023): token embedding, ``n_layers``
    :class:`MambaBlock`, a final RMSNorm and an LM head (tied to the embedding unless
    ``tie_embeddings=False``). No positions: the recurrence knows the order.

    :meth:`generate` decodes on a :class:`MambaState` per layer: after the prompt, each token
    costs O(1) in the length and the state never grows.
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, d_state: int = 16,
                 d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 conv_bias: bool = True, bias: bool = False, norm_eps: float = 1e-5,
                 tie_embeddings: bool = True, selective: bool = True,
                 scan_method: str = "parallel"):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(
            MambaBlock(d_model, d_state, d_conv, expand, dt_rank, conv_bias, bias, norm_eps,
                       selective, scan_method) for _ in range(n_layers))
        self.norm = RMSNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.embedding.weight, std=0.02)
        if tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def empty_states(self, batch: int, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> list[MambaState]:
        """A zero :class:`MambaState` per layer, for ``batch`` new sequences."""
        return [block.empty_state(batch, device, dtype) for block in self.blocks]

    def forward(self, idx: torch.Tensor, states: list[MambaState] | None = None) -> torch.Tensor:
        """idx (B, L) token ids -> logits (B, L, vocab_size).

        With ``states`` (one per layer, :meth:`empty_states`) idx continues the sequences they
        summarise, and they are updated in place.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx should have shape (B, L), got {tuple(idx.shape)}")
        if states is not None and len(states) != len(self.blocks):
            raise ValueError(f"states should hold one MambaState per layer: {len(self.blocks)}, "
                             f"got {len(states)}")
        x = self.embedding(idx)  # (B, L, d)
        for i, block in enumerate(self.blocks):
            x = block(x, None if states is None else states[i])
        return self.lm_head(self.norm(x))  # (B, L, V)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int,
                 states: list[MambaState] | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue idx (B, L) by ``max_new_tokens`` tokens: (B, L + max_new_tokens).

        The prompt runs once through the parallel scan and leaves each layer's state; every
        new token is then one recurrent step (greedy by default, sampling as
        :func:`helpers.transformer.next_token`). ``states`` (fresh ones by default) are
        updated in place; when given, idx holds the tokens they have not seen yet (the last
        generated token is not fed back, so a later call can start from it).
        """
        states = self.empty_states(idx.shape[0], idx.device) if states is None else states
        fresh = idx
        for _ in range(max_new_tokens):
            logits = self(fresh, states)[:, -1]  # (B, V)
            fresh = next_token(logits, do_sample, temperature, top_k, generator)  # (B, 1)
            idx = torch.cat([idx, fresh], dim=1)
        return idx

    @classmethod
    def from_hf(cls, hf_model: nn.Module) -> Mamba:
        """A Mamba with the weights of a ``transformers.MambaForCausalLM``.

        Every option of ``MambaConfig`` that changes the computation is read: state size,
        convolution width, ``time_step_rank``, biases, ``expand``, norm epsilon and tied or
        untied embeddings; ``hidden_act`` must be SiLU.
        """
        c = hf_model.config
        if c.hidden_act != "silu":
            raise ValueError(f"from_hf supports hidden_act='silu' (Mamba's), got {c.hidden_act!r}")
        if c.intermediate_size != c.expand * c.hidden_size:
            raise ValueError(f"intermediate_size {c.intermediate_size} should be expand * "
                             f"hidden_size = {c.expand * c.hidden_size}")
        p = next(hf_model.parameters())
        ours = cls(c.vocab_size, c.hidden_size, c.num_hidden_layers, d_state=c.state_size,
                   d_conv=c.conv_kernel, expand=c.expand, dt_rank=int(c.time_step_rank),
                   conv_bias=c.use_conv_bias, bias=c.use_bias, norm_eps=c.layer_norm_epsilon,
                   tie_embeddings=c.tie_word_embeddings)
        ours = ours.to(device=p.device, dtype=p.dtype).eval()
        hf = hf_model.state_dict()
        weights = {"embedding.weight": hf["backbone.embeddings.weight"],
                   "norm.weight": hf["backbone.norm_f.weight"],
                   "lm_head.weight": hf["lm_head.weight"]}
        for name, value in hf.items():
            if name.startswith("backbone.layers."):  # the same names below the layer index
                weights["blocks." + name.removeprefix("backbone.layers.")] = value
        copy_weights(ours, weights)
        return ours
