"""Hidden tests for lesson 10: fresh shapes, dtypes and seeds, references from a private copy
of ``helpers.ssm``, no shortcut through it, and no Python loop where the exercise asks for a
parallel form (counted in torch operations).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from helpers import ssm as reference
from helpers.checks.lesson10 import torch_calls
from helpers.device import get_device
from helpers.hidden._core import (HiddenTestFailed, as_double, expect_close, expect_tensor, forbid,
                                  randn, random_seed, sizes)

DTYPES = (torch.float32, torch.float64)
TOLERANCES = {torch.float32: {"atol": 1e-5, "rtol": 1e-4},
              torch.float64: {"atol": 1e-10, "rtol": 1e-9}}
CONVOLUTIONS = ["conv1d", "conv_transpose1d", "fft_rfft", "fft_irfft", "fft_fft", "fft_ifft"]
CUMULATIVE = ["cumprod", "cumsum", "logcumsumexp"]
LTI_HELPERS = ["helpers.ssm.ssm_recurrent", "helpers.ssm.ssm_kernel",
               "helpers.ssm.ssm_convolution", "helpers.ssm.selective_scan",
               "helpers.ssm.sequential_scan", "helpers.ssm.parallel_scan"]
SCAN_HELPERS = ["helpers.ssm.selective_scan", "helpers.ssm.selective_scan_step",
                "helpers.ssm.sequential_scan", "helpers.ssm.parallel_scan",
                "helpers.ssm.selective_ssm_matrix", "helpers.ssm.ssd"]
SSD_HELPERS = ["helpers.ssm.ssd", "helpers.ssm.ssd_mask", "helpers.ssm.segment_sum",
               "helpers.ssm.selective_ssm_matrix", "helpers.ssm.selective_scan",
               "helpers.ssm.parallel_scan"]


def _uniform(generator: torch.Generator, *shape: int, low: float, high: float,
             dtype: torch.dtype) -> torch.Tensor:
    return (low + (high - low) * torch.rand(*shape, generator=generator, dtype=dtype)
            ).to(get_device())


def discretize(student: Callable) -> None:
    """Exact ZOH on random shapes, with a float, a per-channel and a full step; a tiny ΔA in
    float32 (torch.expm1)."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for dtype in DTYPES:
        n = sizes(generator, D=(1, 4), N=(2, 8))
        # |A| in [0.37, 4.5], the two ends always present: a missing 1/A shows on every draw
        A = -torch.exp(_uniform(generator, n["D"], n["N"], low=-1.0, high=1.5, dtype=dtype))
        A[:, 0], A[:, -1] = -0.4, -3.0
        B = randn(generator, n["D"], n["N"], dtype=dtype)
        # Δ in [0.05, 0.7]: away from 1 (B̄ without Δ) and from 0 (where ΔB is exact)
        steps = {"a float": 0.05 + 0.65 * float(torch.rand((), generator=generator)),
                 "(D, 1)": _uniform(generator, n["D"], 1, low=0.05, high=0.7, dtype=dtype),
                 "(D, N)": _uniform(generator, n["D"], n["N"], low=0.05, high=0.7, dtype=dtype)}
        cases += [(f"{n}, delta {kind}, {dtype}", A, B, delta) for kind, delta in steps.items()]
    tiny_A = torch.full((2, 3), -1e-3, dtype=torch.float32, device=get_device())
    cases.append(("ΔA = -1e-7 in float32 (use torch.expm1)", tiny_A, torch.ones_like(tiny_A),
                  1e-4))
    with forbid(torch_functions=["matrix_exp", "linalg_matrix_exp"],
                helpers=["helpers.ssm.discretize_zoh"]):
        results = [student(A, B, delta) for _, A, B, delta in cases]
    for (case, A, B, delta), result in zip(cases, results):
        what = f"discretize, {case}, seed {seed}"
        if not (isinstance(result, tuple) and len(result) == 2):
            raise HiddenTestFailed(f"{what}: expected a tuple (A_bar, B_bar)")
        expected = reference.discretize_zoh(
            *as_double(A, B), delta if isinstance(delta, float) else delta.double())
        for name, value, target in zip(("A_bar", "B_bar"), result, expected):
            expect_tensor(value, A.dtype, f"{what}: {name}")
            expect_close(value, target, f"{what}: {name}", **TOLERANCES[A.dtype])


def _lti(generator: torch.Generator, n: dict[str, int], dtype: torch.dtype
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A_bar in (0.2, 0.95) with one slow state per channel; B_bar, C normal."""
    A_bar = _uniform(generator, n["D"], n["N"], low=0.2, high=0.95, dtype=dtype)
    B_bar, C = (randn(generator, n["D"], n["N"], dtype=dtype) for _ in range(2))
    # a long memory of weight 1 in every channel: a wrapped-around FFT convolution (the end of
    # the sequence leaking onto its start) shows on every draw
    A_bar[:, 0], B_bar[:, 0], C[:, 0] = 0.95, 1.0, 1.0
    return A_bar, B_bar, C


def ssm_recurrent(student: Callable) -> None:
    """Random LTI systems, a non-contiguous u; no convolution, no helpers.ssm."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for dtype in DTYPES:
        n = sizes(generator, batch=(1, 3), D=(1, 4), N=(2, 6), L=(3, 12))
        u = randn(generator, n["batch"], n["L"], n["D"], dtype=dtype).transpose(1, 2)
        cases.append((f"{n}, {dtype}", u, *_lti(generator, n, dtype)))
    with forbid(torch_functions=CONVOLUTIONS, helpers=LTI_HELPERS):
        results = [student(*case[1:]) for case in cases]
    for (case, *inputs), y in zip(cases, results):
        what = f"ssm_recurrent, {case}, seed {seed}"
        expect_close(expect_tensor(y, inputs[0].dtype, what),
                     reference.ssm_recurrent(*as_double(*inputs)), what,
                     **TOLERANCES[inputs[0].dtype])


def ssm_convolution(student: Callable) -> None:
    """Random LTI systems and lengths; equal to the recurrence; the number of torch
    operations does not grow with L (no loop over time); no helpers.ssm."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for dtype in DTYPES:
        n = sizes(generator, batch=(1, 3), D=(1, 4), N=(2, 6), L=(6, 40))
        u = randn(generator, n["batch"], n["D"], n["L"], dtype=dtype)
        cases.append((f"{n}, {dtype}", u, *_lti(generator, n, dtype)))
    long = randn(generator, 1, cases[0][1].shape[1], 36, dtype=cases[0][1].dtype)
    with forbid(helpers=LTI_HELPERS):
        results = [student(*case[1:]) for case in cases]
        _, short_calls = torch_calls(student, long[..., :4], *cases[0][2:])
        _, long_calls = torch_calls(student, long, *cases[0][2:])
    for (case, *inputs), y in zip(cases, results):
        what = f"ssm_convolution, {case}, seed {seed}"
        expect_close(expect_tensor(y, inputs[0].dtype, what),
                     reference.ssm_recurrent(*as_double(*inputs)), what,
                     **TOLERANCES[inputs[0].dtype])
    if long_calls - short_calls > 12:
        raise HiddenTestFailed(f"ssm_convolution, seed {seed}: {short_calls} torch operations at "
                               f"L = 4 and {long_calls} at L = 36: a loop over time")


def selective_scan_sequential(student: Callable) -> None:
    """Random shapes in Mamba's ranges, float32 and float64; no helpers.ssm scan."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for dtype in DTYPES:
        n = sizes(generator, batch=(1, 3), D=(1, 4), N=(2, 6), L=(3, 10))
        cases.append((f"{n}, {dtype}", [
            randn(generator, n["batch"], n["D"], n["L"], dtype=dtype),  # u
            F.softplus(randn(generator, n["batch"], n["D"], n["L"], dtype=dtype)),  # delta
            -torch.exp(randn(generator, n["D"], n["N"], dtype=dtype)),  # A
            randn(generator, n["batch"], n["N"], n["L"], dtype=dtype),  # B
            randn(generator, n["batch"], n["N"], n["L"], dtype=dtype),  # C
            randn(generator, n["D"], dtype=dtype)]))  # D
    with forbid(helpers=SCAN_HELPERS):
        results = [student(*inputs) for _, inputs in cases]
    for (case, inputs), y in zip(cases, results):
        what = f"selective_scan_sequential, {case}, seed {seed}"
        expected = reference.selective_scan(*as_double(*inputs), method="sequential")
        expect_close(expect_tensor(y, inputs[0].dtype, what), expected, what,
                     **TOLERANCES[inputs[0].dtype])


def parallel_scan(student: Callable) -> None:
    """Random leading shapes and lengths (odd ones too); gradients equal to the loop's;
    log-depth (torch operations counted at two lengths); no cumulative products or sums."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for dtype in DTYPES:
        n = sizes(generator, rank=(0, 2), L=(2, 300))
        lead = list(sizes(generator, **{f"d{i}": (1, 4) for i in range(n["rank"])}).values())
        a = _uniform(generator, *lead, n["L"], low=0.3, high=1.0, dtype=dtype)
        cases.append((a.requires_grad_(),
                      randn(generator, *lead, n["L"], dtype=dtype).requires_grad_()))
    long = _uniform(generator, 1024, low=0.5, high=1.0, dtype=torch.float64)
    values = randn(generator, 1024, dtype=torch.float64)
    with forbid(torch_functions=CUMULATIVE, helpers=["helpers.ssm.parallel_scan",
                                                     "helpers.ssm.sequential_scan",
                                                     "helpers.ssm.selective_scan"]):
        results = [student(a, b) for a, b in cases]
        long_h, long_calls = torch_calls(student, long, values)
        _, short_calls = torch_calls(student, long[:16], values[:16])
    for (a, b), h in zip(cases, results):
        what = f"parallel_scan, shape {tuple(b.shape)}, {b.dtype}, seed {seed}"
        expect_tensor(h, b.dtype, what)
        expect_close(h, reference.sequential_scan(*as_double(a, b)), what, **TOLERANCES[b.dtype])
        weights = randn(generator, *b.shape, dtype=b.dtype)
        try:
            grads = torch.autograd.grad((h * weights).sum(), (a, b))
        except RuntimeError as error:
            raise HiddenTestFailed(f"{what}: backward failed ({error})") from None
        a64, b64 = (t.requires_grad_() for t in as_double(a, b))
        targets = torch.autograd.grad((reference.sequential_scan(a64, b64) * weights).sum(),
                                      (a64, b64))
        for name, got, target in zip(("a", "b"), grads, targets):
            expect_close(got, target, f"{what}: gradient with respect to {name}",
                         **TOLERANCES[b.dtype])
    rounds = math.log2(1024) - math.log2(16)
    if long_calls - short_calls > 40 * rounds + 20:
        raise HiddenTestFailed(f"parallel_scan, seed {seed}: {short_calls} torch operations at "
                               f"L = 16 and {long_calls} at L = 1024: not log-depth")
    expect_close(long_h, reference.sequential_scan(long, values),
                 f"parallel_scan, L = 1024, seed {seed}", **TOLERANCES[torch.float64])


def ssd(student: Callable) -> None:
    """Random heads and lengths, B and C shared or per head; a steep decay in float32, where
    exp above the diagonal overflows unless it is masked first."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for dtype, steep in ((torch.float32, False), (torch.float64, False), (torch.float32, True)):
        n = sizes(generator, batch=(1, 2), H=(1, 4), L=(40, 60) if steep else (2, 24),
                   P=(1, 5), N=(1, 6), shared=(0, 1))
        heads = 1 if n["shared"] else n["H"]
        cases.append((f"{n}, {'steep decay, ' if steep else ''}{dtype}", steep, [
            randn(generator, n["batch"], n["H"], n["L"], n["P"], dtype=dtype),  # x
            F.softplus(randn(generator, n["batch"], n["H"], n["L"], dtype=dtype)),  # dt
            (-_uniform(generator, n["H"], low=20.0, high=40.0, dtype=dtype) if steep
             else -torch.exp(randn(generator, n["H"], dtype=dtype))),  # A
            randn(generator, n["batch"], heads, n["L"], n["N"], dtype=dtype),  # B
            randn(generator, n["batch"], heads, n["L"], n["N"], dtype=dtype)]))  # C
    with forbid(helpers=SSD_HELPERS):
        results = [student(*inputs) for _, _, inputs in cases]
    for (case, steep, inputs), y in zip(cases, results):
        what = f"ssd, {case}, seed {seed}"
        # a steep decay sums to exponents in the thousands: float32 keeps ~1e-4 of them
        tolerance = {"atol": 1e-4, "rtol": 1e-3} if steep else TOLERANCES[inputs[0].dtype]
        expect_close(expect_tensor(y, inputs[0].dtype, what),
                     reference.ssd(*as_double(*inputs)), what, **tolerance)
