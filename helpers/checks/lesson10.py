"""Visible checks for lesson 10 (state space models and Mamba).

Each check runs the student's function on small fixed inputs, compares it with an oracle
(the matrix exponential, PyTorch's convolution, a triangular solve, the course's
``helpers.ssm``) and, when it fails, names the likely mistake by recomputing it: B̄ without
Δ, exp(A) for exp(ΔA), the scan combined in the wrong order, the D skip forgotten, ...
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from helpers import ssm as reference
from helpers.checks import (CheckFailed, call, exercise, expect, expect_close, expect_shape,
                            expect_tensor, is_close, passed, randn)
from helpers.device import get_device


def _rand(*shape: int, seed: int, low: float, high: float,
          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A reproducible uniform tensor in [low, high) on the course device."""
    generator = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(*shape, generator=generator, dtype=dtype)
            ).to(get_device())


def _expect_dtype(value: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    expect(value.dtype == dtype, f"{name} has dtype {value.dtype}, expected {dtype} (the dtype "
           "of the inputs): did you create a tensor without dtype= or call .float()?")


class _CountCalls(TorchFunctionMode):
    """Counts the torch functions and tensor methods called while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def torch_calls(fn: Callable, *args: object) -> tuple[object, int]:
    """``fn(*args)`` and the number of torch operations it called: a loop over time steps
    shows up as a count that grows with the length."""
    with _CountCalls() as counter:
        result = fn(*args)
    return result, counter.count


# --- exercise 1: discretize -------------------------------------------------------------------

@exercise
def discretize(fn: Callable) -> None:
    """Check ``discretize(A, B, delta)`` -> (A_bar, B_bar) against the matrix exponential."""
    D, N = 3, 4
    A = -torch.exp(randn(D, N, seed=0))  # (D, N) < 0
    B = randn(D, N, seed=1)
    delta = torch.tensor([[0.05], [0.3], [1.2]], dtype=torch.float64, device=A.device)  # (D, 1)
    hint = (f"A and B are (D, N) = {(D, N)} and delta is (D, 1) = {(D, 1)}: every product is "
            "elementwise (*), the broadcasting does the rest")
    result = call(fn, A, B, delta, name="discretize(A, B, delta)", hint=hint)
    expect(isinstance(result, tuple) and len(result) == 2,
           f"discretize should return a tuple (A_bar, B_bar), got {type(result).__name__}")
    A_bar, B_bar = expect_tensor(result[0], "A_bar"), expect_tensor(result[1], "B_bar")
    expect_shape(A_bar, (D, N), "A_bar", "the broadcast shape of A, B and delta")
    expect_shape(B_bar, (D, N), "B_bar", "the broadcast shape of A, B and delta")
    dA = delta * A
    expect(not is_close(A_bar, torch.exp(A)),
           "A_bar equals exp(A): the step is missing, Ā = exp(ΔA)")
    expect(not is_close(A_bar, torch.exp(-dA)), "A_bar > 1: the sign is flipped, Ā = exp(ΔA)")
    # the exact ZOH by one matrix exponential per state (Van Loan, 1978):
    # exp(Δ [[A, B], [0, 0]]) = [[Ā, B̄], [0, 1]]
    blocks = torch.zeros(D, N, 2, 2, dtype=A.dtype, device=A.device)
    blocks[..., 0, 0], blocks[..., 0, 1] = A, B
    exact = torch.linalg.matrix_exp(delta[..., None, None] * blocks)  # (D, N, 2, 2)
    expect_close(A_bar, exact[..., 0, 0], "A_bar", "Ā = exp(ΔA), elementwise")
    expect(not is_close(B_bar, delta * B),
           "B_bar equals ΔB: that is Mamba's first-order shortcut; this exercise asks for the "
           "exact zero-order hold, B̄ = (exp(ΔA) - 1) / A · B")
    expect(not is_close(B_bar, torch.expm1(dA) / dA * B),
           "B_bar is missing a factor Δ: B̄ = (ΔA)⁻¹ (exp(ΔA) - 1) ΔB = (exp(ΔA) - 1) / A · B "
           "(B̄ without Δ)")
    expect(not is_close(B_bar, torch.expm1(dA) * B),
           "B_bar is missing the division by A: B̄ = (exp(ΔA) - 1) / A · B")
    expect(not is_close(B_bar, torch.expm1(A) / A * B),
           "B_bar uses exp(A) instead of exp(ΔA): B̄ = (exp(ΔA) - 1) / A · B")
    expect_close(B_bar, exact[..., 0, 1], "B_bar", "B̄ = (exp(ΔA) - 1) / A · B, elementwise")
    _expect_dtype(A_bar, A.dtype, "A_bar")
    _expect_dtype(B_bar, A.dtype, "B_bar")

    A_bar, B_bar = fn(A, B, 0.3)  # a float step
    exact = torch.linalg.matrix_exp(0.3 * blocks)
    expect_close(A_bar, exact[..., 0, 0], "A_bar with delta = 0.3 (a float)",
                 "delta may be a plain float")
    expect_close(B_bar, exact[..., 0, 1], "B_bar with delta = 0.3 (a float)",
                 "delta may be a plain float")

    tiny_A = torch.full((2, 3), -1e-3, dtype=torch.float32, device=A.device)
    ones = torch.ones(2, 3, dtype=torch.float32, device=A.device)
    _, tiny = fn(tiny_A, ones, 1e-4)  # ΔA = -1e-7: exp(ΔA) - 1 keeps one digit in float32
    expect_close(tiny, torch.full((2, 3), 1e-4, dtype=torch.float64), "B_bar for ΔA = -1e-7 "
                 "in float32", "torch.exp(x) - 1 loses its digits for tiny x: use "
                 "torch.expm1(x)", atol=1e-9, rtol=1e-4)
    passed("discretize")


# --- exercises 2 and 3: the LTI SSM, recurrent and convolutional -------------------------------

def _lti(seed: int, D: int = 3, N: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A_bar in (0.3, 0.95), B_bar and C normal: a stable LTI SSM, (D, N) each."""
    return (_rand(D, N, seed=seed, low=0.3, high=0.95), randn(D, N, seed=seed + 1),
            randn(D, N, seed=seed + 2))


def _kernel(A_bar: torch.Tensor, B_bar: torch.Tensor, C: torch.Tensor, L: int,
            first_power: int = 0) -> torch.Tensor:
    """K_k = C Ā^(k + first_power) B̄, (D, L), by repeated multiplication."""
    powers = [A_bar ** (k + first_power) for k in range(L)]
    return torch.stack([(C * power * B_bar).sum(-1) for power in powers], dim=-1)


def _causal_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """PyTorch's own conv1d, made a causal convolution: left padding and a flipped kernel."""
    return F.conv1d(F.pad(u, (K.shape[-1] - 1, 0)), K.flip(-1)[:, None], groups=K.shape[0])


def _lti_hint(u: torch.Tensor, A_bar: torch.Tensor) -> str:
    return (f"u is (batch, D, L) = {tuple(u.shape)} and A_bar, B_bar, C are (D, N) = "
            f"{tuple(A_bar.shape)}: the state is (batch, D, N), step t reads u[:, :, t]")


def _check_lti_output(fn: Callable, name: str, u: torch.Tensor, A_bar: torch.Tensor,
                      B_bar: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Shape, dtype, the off-by-one and the value of an LTI SSM's output."""
    batch, D, L = u.shape
    y = expect_tensor(call(fn, u, A_bar, B_bar, C, name=name, hint=_lti_hint(u, A_bar)), name)
    expect_shape(y, (batch, D, L), name, "one output per batch row, channel and step, "
                 "(batch, D, L): sum the states, C · x_t, and stack along the last dim")
    K = _kernel(A_bar, B_bar, C, L)
    expected = _causal_conv(u, K)
    late = _causal_conv(u, _kernel(A_bar, B_bar, C, L, first_power=1))  # y_t = C x_{t-1}
    early = torch.cat([torch.zeros_like(u[..., :1]), expected[..., :-1]], dim=-1)
    expect(not is_close(y, late) and not is_close(y, early),
           f"{name} is one step late: y_t reads the state before it took in u_t; update "
           "x_t = Ā x_{t-1} + B̄ u_t first, then y_t = C x_t")
    expect_close(y, expected, name, "x_t = Ā x_{t-1} + B̄ u_t from x_0 = 0, y_t = C · x_t "
                 "summed over the N states")
    _expect_dtype(y, u.dtype, name)
    return y


@exercise
def ssm_recurrent(fn: Callable) -> None:
    """Check ``ssm_recurrent(u, A_bar, B_bar, C)`` against PyTorch's convolution."""
    A_bar, B_bar, C = _lti(seed=10)
    u = randn(2, 7, 3, seed=13).transpose(1, 2)  # (batch, D, L), not contiguous
    _check_lti_output(fn, "ssm_recurrent(u, A_bar, B_bar, C)", u, A_bar, B_bar, C)
    single = fn(u[:1, :, :1], A_bar, B_bar, C)
    expect_close(single, (C * B_bar).sum(-1)[None, :, None] * u[:1, :, :1],
                 "ssm_recurrent on one step", "from x_0 = 0 the first output is C B̄ u_1")
    passed("ssm_recurrent")


@exercise
def ssm_convolution(fn: Callable) -> None:
    """Check ``ssm_convolution(u, A_bar, B_bar, C)``: equal to the recurrence, causal, no wrap,
    no loop over time."""
    A_bar, B_bar, C = _lti(seed=20)
    name = "ssm_convolution(u, A_bar, B_bar, C)"
    u = randn(2, 3, 9, seed=23)
    y = expect_tensor(call(fn, u, A_bar, B_bar, C, name=name, hint=_lti_hint(u, A_bar)), name)
    expect_shape(y, u.shape, name, "(batch, D, L), like the recurrence")
    L = u.shape[-1]
    K = _kernel(A_bar, B_bar, C, L)  # (D, L)
    circular = torch.fft.irfft(torch.fft.rfft(u) * torch.fft.rfft(K), n=L)
    expect(not is_close(y, circular), "the end of the sequence wraps around onto its start: "
           "the FFT's convolution is circular; zero-pad both to 2L (rfft(x, n=2 * L)) and keep "
           "the first L outputs")
    expect(not is_close(y, _causal_conv(u, _kernel(A_bar, B_bar, C, L, first_power=1))),
           "the kernel starts at C Ā B̄: its first entry is K_0 = C Ā⁰ B̄ = C B̄ (powers "
           "k = 0 .. L-1)")
    expect(not is_close(y, F.conv1d(F.pad(u, (L - 1, 0)), K[:, None], groups=u.shape[1])),
           "conv1d computes a cross-correlation: flip the kernel (K.flip(-1)) to convolve")
    later = u.clone()
    later[..., -1] += 1.0
    expect(is_close(fn(later, A_bar, B_bar, C)[..., :-1], y[..., :-1]),
           "changing the last input changed earlier outputs: the convolution is not causal "
           "(y_t may depend on u_1 .. u_t only)")
    expect_close(y, _causal_conv(u, K), name, "y_t = Σ_k K_k u_(t-k) with K_k = C Ā^k B̄")
    _expect_dtype(y, u.dtype, name)
    _, short = torch_calls(fn, u[..., :8], A_bar, B_bar, C)
    _, long = torch_calls(fn, randn(2, 3, 64, seed=24), A_bar, B_bar, C)
    expect(long - short <= 12, f"your function calls {short} torch operations at L = 8 and "
           f"{long} at L = 64: a Python loop over time? Build K with one power "
           "(A_bar[..., None] ** torch.arange(L)) and convolve in one FFT or conv1d")
    passed("ssm_convolution")


# --- exercise 4: the selective scan ------------------------------------------------------------

def _selective(seed: int, batch: int = 2, D: int = 3, N: int = 4, L: int = 6,
               dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """u, delta (batch, D, L), A (D, N), B, C (batch, N, L), D (D,) in Mamba's ranges."""
    return [randn(batch, D, L, seed=seed, dtype=dtype),
            F.softplus(randn(batch, D, L, seed=seed + 1, dtype=dtype)),
            -torch.exp(randn(D, N, seed=seed + 2, dtype=dtype)),
            randn(batch, N, L, seed=seed + 3, dtype=dtype),
            randn(batch, N, L, seed=seed + 4, dtype=dtype),
            randn(D, seed=seed + 5, dtype=dtype)]


def _scan_variant(u, delta, A, B, C, D, *, B_bar: str = "delta", decay: str = "delta",
                  time_invariant: bool = False, late: bool = False) -> torch.Tensor:
    """The selective scan with one mistake switched on, to recognise it."""
    h = u.new_zeros(u.shape[0], *A.shape)
    ys = []
    for t in range(u.shape[-1]):
        step = delta[:, :, t, None]  # (batch, D, 1)
        k = 0 if time_invariant else t
        Bt, Ct = B[:, None, :, k], C[:, None, :, k]  # (batch, 1, N)
        A_bar = torch.exp(step * A) if decay == "delta" else torch.exp(A).expand_as(step * A)
        into = {"delta": step * Bt, "none": Bt * torch.ones_like(step),
                "zoh": torch.expm1(step * A) / A * Bt}[B_bar]
        previous = h
        h = A_bar * h + into * u[:, :, t, None]
        ys.append(((previous if late else h) * Ct).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, dim=-1)


@exercise
def selective_scan_sequential(fn: Callable) -> None:
    """Check ``selective_scan_sequential(u, delta, A, B, C, D)`` against helpers.ssm."""
    u, delta, A, B, C, D = inputs = _selective(seed=30)
    name = "selective_scan_sequential(u, delta, A, B, C, D)"
    hint = (f"u and delta are (batch, D, L) = {tuple(u.shape)}, A is (D, N) = {tuple(A.shape)}, "
            f"B and C are (batch, N, L) = {tuple(B.shape)}: the state is (batch, D, N); at step "
            "t, delta[:, :, t, None] * A is (batch, D, N) and B[:, None, :, t] is (batch, 1, N)")
    y = expect_tensor(call(fn, *inputs, name=name, hint=hint), name)
    expect_shape(y, u.shape, name, "one output per batch row, channel and step, (batch, D, L)")
    expected = reference.selective_scan(*inputs, method="sequential")
    expect(not is_close(y, expected - D[:, None] * u),
           "the skip term is missing: y_t = C_t · h_t + D u_t (D skip forgotten)")
    mistakes = {
        "B̄ without Δ: the input enters as B_t u_t; Mamba's B̄_t = Δ_t B_t, so h_t = "
        "exp(Δ_t A) h_(t-1) + Δ_t B_t u_t": dict(B_bar="none"),
        "the decay is exp(A): it must be exp(Δ_t A), the step times A": dict(decay="A"),
        "B̄ is the exact zero-order hold of exercise 1: Mamba (and this exercise) uses the "
        "shortcut B̄_t = Δ_t B_t": dict(B_bar="zoh"),
        "B and C do not change with time: read B[..., t] and C[..., t] at step t, they are "
        "what makes the SSM selective": dict(time_invariant=True),
        "the output is one step late: update h_t first, then y_t = C_t · h_t": dict(late=True),
    }
    for message, mistake in mistakes.items():
        expect(not is_close(y, _scan_variant(*inputs, **mistake)), message)
    expect_close(y, expected, name, "h_t = exp(Δ_t A) h_(t-1) + Δ_t B_t u_t from h_0 = 0, "
                 "y_t = C_t · h_t + D u_t")
    _expect_dtype(y, u.dtype, name)
    passed("selective_scan_sequential")


# --- exercise 5: the parallel scan -------------------------------------------------------------

def _scan_round_variant(a: torch.Tensor, b: torch.Tensor, mistake: str) -> torch.Tensor:
    """A doubling scan with one mistake, to recognise it."""
    L, k = a.shape[-1], 1
    while k < L:
        a_left = F.pad(a, (k, 0), value=1.0)[..., :L]
        b_left = F.pad(b, (k, 0))[..., :L]
        if mistake == "order":  # a_left multiplies the right's b
            b = a_left * b + b_left
        elif mistake == "a_first":
            a = a * a_left
            b = b + a * b_left
            k *= 2
            continue
        else:
            b = b + a * b_left
        a = a * a_left
        k *= 2
    return b


@exercise
def parallel_scan(fn: Callable) -> None:
    """Check ``parallel_scan(a, b)``: equal to the loop, causal, log-depth, with gradients."""
    shape = (3, 2, 13)
    a = _rand(*shape, seed=40, low=0.4, high=1.2).transpose(0, 1)  # (2, 3, 13), not contiguous
    b = randn(*shape, seed=41).transpose(0, 1)
    name = "parallel_scan(a, b)"
    hint = (f"a and b are (..., L) = {tuple(a.shape)}, time last: shift along the last dim with "
            "F.pad(x, (k, 0))[..., :L]")
    h = expect_tensor(call(fn, a, b, name=name, hint=hint), name)
    expect_shape(h, a.shape, name, "every state h_1 .. h_L, the shape of a and b")
    expected = reference.sequential_scan(a, b)
    later = b.clone()
    later[..., -1] += 1.0
    expect(is_close(fn(a, later)[..., :-1], h[..., :-1]),
           "changing the last b changed earlier states: the shift goes the wrong way (each "
           "position combines with the one k steps to its LEFT, F.pad(x, (k, 0))[..., :L])")
    expect(not is_close(h, _scan_round_variant(a, b, "order")),
           "the pairs are combined in the wrong order: (a₁, b₁) • (a₂, b₂) = (a₁a₂, a₂b₁ + b₂), "
           "so the left part's b is multiplied by the right part's a: b_t + a_t b_(t-k)")
    expect(not is_close(h, _scan_round_variant(a, b, "a_first")),
           "a is updated before b in a round: b_t <- b_t + a_t b_(t-k) must use the old a_t, "
           "then update a_t <- a_t a_(t-k)")
    expect_close(h, expected, name, "after ceil(log2 L) doubling rounds, b_t = h_t")
    _expect_dtype(h, b.dtype, name)
    expect_close(fn(a[..., :1], b[..., :1]), b[..., :1], "parallel_scan with L = 1",
                 "one step from h_0 = 0: h_1 = b_1")

    a_grad, b_grad = a.detach().requires_grad_(), b.detach().requires_grad_()
    weights = randn(*a.shape, seed=42)
    ours = call(fn, a_grad, b_grad, name="parallel_scan with gradients",
                hint="autograd needs out-of-place operations: b = b + ..., not b += ... or "
                     "b[..., k:] = ...")
    try:
        grads = torch.autograd.grad((ours * weights).sum(), (a_grad, b_grad))
    except RuntimeError as error:
        raise CheckFailed(f"backward through parallel_scan failed ({error}): use out-of-place "
                          "operations only (b = b + ..., not b += ...)") from error
    loop = reference.sequential_scan(a_grad, b_grad)
    for got, want, what in zip(grads, torch.autograd.grad((loop * weights).sum(),
                                                          (a_grad, b_grad)), ("a", "b")):
        expect_close(got, want, f"the gradient with respect to {what}",
                     "it differs from the loop's: an in-place operation?")

    g = torch.Generator().manual_seed(43)
    long_a = (0.5 + 0.5 * torch.rand(512, generator=g, dtype=torch.float64)).to(a.device)
    long_b = torch.randn(512, generator=g, dtype=torch.float64).to(a.device)
    long_h, long_calls = torch_calls(fn, long_a, long_b)
    _, short_calls = torch_calls(fn, long_a[:16], long_b[:16])
    rounds = math.log2(512) - math.log2(16)
    expect(long_calls - short_calls <= 40 * rounds + 20,
           f"your scan calls {short_calls} torch operations at L = 16 and {long_calls} at "
           "L = 512: a Python loop over time? Use doubling rounds, k = 1, 2, 4, ... < L, a few "
           "whole-tensor operations each")
    expect_close(long_h, reference.sequential_scan(long_a, long_b), f"{name} at L = 512",
                 "the rounds stop too early? Continue while k < L")
    passed("parallel_scan")


# --- exercise 6: state space duality -----------------------------------------------------------

def _ssd_inputs(seed: int, batch: int = 2, H: int = 3, L: int = 10, P: int = 4, N: int = 5,
                shared: bool = True, dtype: torch.dtype = torch.float64,
                A_scale: float = 1.0) -> list[torch.Tensor]:
    """x (batch, H, L, P), dt (batch, H, L), A (H,), B and C (batch, 1 or H, L, N)."""
    heads = 1 if shared else H
    return [randn(batch, H, L, P, seed=seed, dtype=dtype),
            F.softplus(randn(batch, H, L, seed=seed + 1, dtype=dtype)),
            -A_scale * torch.exp(randn(H, seed=seed + 2, dtype=dtype)),
            randn(batch, heads, L, N, seed=seed + 3, dtype=dtype),
            randn(batch, heads, L, N, seed=seed + 4, dtype=dtype)]


def _ssd_scan(x, dt, A, B, C) -> torch.Tensor:
    """SSD by the selective scan, one head at a time: an oracle independent of the matrix."""
    batch, H, L, P = x.shape
    B, C = B.expand(batch, H, L, B.shape[-1]), C.expand(batch, H, L, C.shape[-1])
    heads = []
    for h in range(H):
        u = x[:, h].transpose(1, 2)  # (batch, P, L): the head's P channels
        delta = dt[:, h, None, :].expand(batch, P, L)
        A_h = A[h].expand(P, B.shape[-1])  # (P, N): one scalar for the head
        y = reference.selective_scan(u, delta, A_h, B[:, h].transpose(1, 2),
                                     C[:, h].transpose(1, 2), method="sequential")
        heads.append(y.transpose(1, 2))  # (batch, L, P)
    return torch.stack(heads, dim=1)


def _ssd_variant(x, dt, A, B, C, mistake: str) -> torch.Tensor:
    """The matrix form with one mistake, to recognise it."""
    L = x.shape[-2]
    total = torch.cumsum(dt * A[:, None], dim=-1)
    exponent = total[..., :, None] - total[..., None, :]
    if mistake == "include_s":  # the decay also covers step s
        exponent = exponent + (dt * A[:, None])[..., None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    M = torch.exp(exponent.masked_fill(~causal, float("-inf")))
    scores = C @ B.transpose(-1, -2)
    if mistake == "transposed":
        scores = scores.transpose(-1, -2)
    values = x if mistake == "no_dt" else x * dt[..., None]
    return (M * scores) @ values


@exercise
def ssd(fn: Callable) -> None:
    """Check ``ssd(x, dt, A, B, C)`` against the selective scan, head by head."""
    x, dt, A, B, C = inputs = _ssd_inputs(seed=50)
    name = "ssd(x, dt, A, B, C)"
    hint = (f"x is (batch, H, L, P) = {tuple(x.shape)}, dt (batch, H, L) = {tuple(dt.shape)}, "
            f"A (H,) = {tuple(A.shape)}, B and C (batch, 1, L, N) = {tuple(B.shape)}: the mask "
            "and the scores are (batch, H, L, L); dt * A[:, None] is (batch, H, L)")
    y = expect_tensor(call(fn, *inputs, name=name, hint=hint), name)
    expect_shape(y, x.shape, name, "(batch, H, L, P), like x")
    later = x.clone()
    later[..., -1, :] += 1.0
    expect(is_close(fn(later, dt, A, B, C)[..., :-1, :], y[..., :-1, :]),
           "changing the last x changed earlier outputs: M must be 0 above the diagonal "
           "(t < s); fill those exponents with -inf before exp")
    for mistake, message in {
        "include_s": "the decay from s to t covers the steps s+1 .. t, so M[t, t] = 1: the "
                     "exponent is the prefix sum at t minus the prefix sum at s",
        "no_dt": "the values are Δ x, not x: B̄_s = Δ_s B_s brings the step in",
        "transposed": "the scores are transposed: scores[t, s] = C_t · B_s, C @ B.transpose(-1, -2)",
    }.items():
        expect(not is_close(y, _ssd_variant(*inputs, mistake)), message)
    expect_close(y, _ssd_scan(*inputs), name, "y = (M ∘ C Bᵀ)(Δ x), "
                 "M[t, s] = exp(A (Δ_(s+1) + ... + Δ_t)) for t >= s")
    _expect_dtype(y, x.dtype, name)

    per_head = _ssd_inputs(seed=51, shared=False)
    expect_close(fn(*per_head), _ssd_scan(*per_head), "ssd with B, C per head (batch, H, L, N)",
                 "B and C may have one row per head: let the matmul broadcast them")

    steep = _ssd_inputs(seed=52, L=48, dtype=torch.float32, A_scale=20.0)
    result = fn(*steep)
    expect(bool(torch.isfinite(result).all()),
           "NaN or inf for a steep decay in float32: above the diagonal the exponent is "
           "positive and exp overflows to inf, and inf * 0 is NaN; fill it with -inf before "
           "exp (masked_fill), do not multiply by a mask afterwards")
    expect_close(result, _ssd_scan(*[t.double() for t in steep]), "ssd with a steep decay",
                 "y = (M ∘ C Bᵀ)(Δ x)", atol=1e-4, rtol=1e-3)
    passed("ssd")
