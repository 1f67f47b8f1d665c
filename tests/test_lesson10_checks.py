"""Lesson 10's visible checks and hidden tests: they accept the reference solution, reject the
typical wrong answers (the visible check naming the mistake) and the shortcuts, and cannot be
fooled by a patched kernel."""

from __future__ import annotations

import numpy
import pytest
import torch
import torch.nn.functional as F

import helpers.ssm
from helpers import ssm as reference
from helpers.checks import CheckFailed
from helpers.checks import lesson10 as checks
from helpers.hidden import lesson

from conftest import expect_hidden_failure

LESSON = "10"
EXERCISES = ["discretize", "ssm_recurrent", "ssm_convolution", "selective_scan_sequential",
             "parallel_scan", "ssd"]


@pytest.mark.parametrize("name", EXERCISES)
def test_solution_passes_visible_and_hidden(solution, hidden, name, capsys):
    getattr(checks, name)(solution[name])
    assert "all checks passed" in capsys.readouterr().out
    for _ in range(3):  # fresh seeds, shapes and dtypes each time
        getattr(hidden, name)(solution[name])


# --- wrong answers: each is a mistake a student makes; each must fail both kinds of check, the
# --- visible one with the message that names it

def discretize_exp_A(A, B, delta):
    return torch.exp(A) * torch.ones_like(delta * A), torch.expm1(delta * A) / A * B


def discretize_B_without_delta(A, B, delta):
    return torch.exp(delta * A), torch.expm1(delta * A) / (delta * A) * B


def discretize_simplified(A, B, delta):
    return torch.exp(delta * A), delta * B * torch.ones_like(A)


def discretize_no_division(A, B, delta):
    return torch.exp(delta * A), torch.expm1(delta * A) * B


def discretize_exp_minus_one(A, B, delta):
    return torch.exp(delta * A), (torch.exp(delta * A) - 1) / A * B


def _kernel(A_bar, B_bar, C, L, first_power=0):
    powers = A_bar[..., None] ** torch.arange(first_power, first_power + L, device=A_bar.device)
    return ((C * B_bar)[..., None] * powers).sum(dim=1)  # (D, L)


def recurrent_one_step_late(u, A_bar, B_bar, C):
    x = u.new_zeros(u.shape[0], *A_bar.shape)
    ys = []
    for t in range(u.shape[-1]):
        ys.append((C * x).sum(-1))
        x = A_bar * x + B_bar * u[:, :, t, None]
    return torch.stack(ys, dim=-1)


def recurrent_time_second(u, A_bar, B_bar, C):
    x = u.new_zeros(u.shape[0], *A_bar.shape)
    ys = []
    for t in range(u.shape[-1]):
        x = A_bar * x + B_bar * u[:, :, t, None]
        ys.append((C * x).sum(-1))
    return torch.stack(ys, dim=1)  # (batch, L, D)


def recurrent_without_B(u, A_bar, B_bar, C):
    x = u.new_zeros(u.shape[0], *A_bar.shape)
    ys = []
    for t in range(u.shape[-1]):
        x = A_bar * x + u[:, :, t, None]
        ys.append((C * x).sum(-1))
    return torch.stack(ys, dim=-1)


def convolution_circular(u, A_bar, B_bar, C):
    L = u.shape[-1]
    K = _kernel(A_bar, B_bar, C, L)
    return torch.fft.irfft(torch.fft.rfft(u) * torch.fft.rfft(K), n=L)


def convolution_from_power_one(u, A_bar, B_bar, C):
    L = u.shape[-1]
    K = _kernel(A_bar, B_bar, C, L, first_power=1)
    return torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L), n=2 * L)[..., :L]


def convolution_not_flipped(u, A_bar, B_bar, C):
    L = u.shape[-1]
    K = _kernel(A_bar, B_bar, C, L)
    return F.conv1d(F.pad(u, (L - 1, 0)), K[:, None], groups=u.shape[1])


def convolution_centred(u, A_bar, B_bar, C):
    L = u.shape[-1]
    K = _kernel(A_bar, B_bar, C, L)
    return F.conv1d(F.pad(u, (L // 2, L - 1 - L // 2)), K.flip(-1)[:, None], groups=u.shape[1])


def convolution_by_recurrence(u, A_bar, B_bar, C):
    x = u.new_zeros(u.shape[0], *A_bar.shape)
    ys = []
    for t in range(u.shape[-1]):
        x = A_bar * x + B_bar * u[:, :, t, None]
        ys.append((C * x).sum(-1))
    return torch.stack(ys, dim=-1)


def _selective(mistake):
    """The selective scan with one mistake."""
    def scan(u, delta, A, B, C, D):
        h = u.new_zeros(u.shape[0], *A.shape)
        ys = []
        for t in range(u.shape[-1]):
            step = delta[:, :, t, None]
            k = 0 if mistake == "time_invariant" else t
            Bt, Ct = B[:, None, :, k], C[:, None, :, k]
            decay = torch.exp(A) if mistake == "exp_A" else torch.exp(step * A)
            into = {"no_delta": Bt, "zoh": torch.expm1(step * A) / A * Bt}.get(mistake, step * Bt)
            previous = h
            h = decay * h + into * u[:, :, t, None]
            y = ((previous if mistake == "late" else h) * Ct).sum(-1)
            ys.append(y if mistake == "no_skip" else y + D * u[:, :, t])
        return torch.stack(ys, dim=-1)
    scan.__name__ = f"selective_scan_{mistake}"
    return scan


def _doubling(mistake):
    """The doubling scan with one mistake."""
    def scan(a, b):
        L, k = a.shape[-1], 1
        while k < L:
            if mistake == "shift_left":
                a_other = F.pad(a, (0, k), value=1.0)[..., k:]
                b_other = F.pad(b, (0, k))[..., k:]
            else:
                a_other = F.pad(a, (k, 0), value=1.0)[..., :L]
                b_other = F.pad(b, (k, 0))[..., :L]
            if mistake == "order":
                b = a_other * b + b_other
                a = a * a_other
            elif mistake == "a_first":
                a = a * a_other
                b = b + a * b_other
            else:
                b = b + a * b_other
                a = a * a_other
            k *= 2
        return b
    scan.__name__ = f"parallel_scan_{mistake}"
    return scan


def scan_by_loop(a, b):
    h, states = torch.zeros_like(b[..., 0]), []
    for t in range(a.shape[-1]):
        h = a[..., t] * h + b[..., t]
        states.append(h)
    return torch.stack(states, dim=-1)


def _ssd(mistake):
    """The SSD matrix form with one mistake."""
    def ssd(x, dt, A, B, C):
        L = x.shape[-2]
        total = torch.cumsum(dt * A[:, None], dim=-1)
        exponent = total[..., :, None] - total[..., None, :]
        if mistake == "include_s":
            exponent = exponent + (dt * A[:, None])[..., None, :]
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        if mistake == "mask_after_exp":
            M = torch.exp(exponent) * causal
        elif mistake == "no_mask":
            M = torch.exp(exponent.clamp(max=0))
        else:
            M = torch.exp(exponent.masked_fill(~causal, float("-inf")))
        scores = C @ B.transpose(-1, -2)
        if mistake == "transposed":
            scores = scores.transpose(-1, -2)
        return (M * scores) @ (x if mistake == "no_dt" else x * dt[..., None])
    ssd.__name__ = f"ssd_{mistake}"
    return ssd


WRONG = {
    "discretize": [(discretize_exp_A, "exp\\(A\\)"), (discretize_B_without_delta, "B̄ without Δ"),
                   (discretize_simplified, "first-order shortcut"),
                   (discretize_no_division, "division by A"),
                   (discretize_exp_minus_one, "expm1")],
    "ssm_recurrent": [(recurrent_one_step_late, "one step late"),
                      (recurrent_time_second, r"\(batch, D, L\)"),
                      (recurrent_without_B, "x_t = Ā x_\\{t-1\\} \\+ B̄ u_t")],
    "ssm_convolution": [(convolution_circular, "wraps around"),
                        (convolution_from_power_one, "starts at C Ā B̄"),
                        (convolution_not_flipped, "cross-correlation"),
                        (convolution_centred, "not causal"),
                        (convolution_by_recurrence, "loop over time")],
    "selective_scan_sequential": [(_selective("no_skip"), "D skip forgotten"),
                                  (_selective("no_delta"), "B̄ without Δ"),
                                  (_selective("exp_A"), "exp\\(A\\)"),
                                  (_selective("zoh"), "exact zero-order hold"),
                                  (_selective("time_invariant"), "do not change with time"),
                                  (_selective("late"), "one step late")],
    "parallel_scan": [(_doubling("order"), "wrong order"), (_doubling("a_first"), "old a_t"),
                      (_doubling("shift_left"), "wrong way"), (scan_by_loop, "loop over time")],
    "ssd": [(_ssd("include_s"), "M\\[t, t\\] = 1"), (_ssd("no_dt"), "Δ x, not x"),
            (_ssd("transposed"), "transposed"), (_ssd("mask_after_exp"), "NaN or inf"),
            (_ssd("no_mask"), "changed earlier outputs")],
}
CASES = [(name, wrong, hint) for name, wrongs in WRONG.items() for wrong, hint in wrongs]


@pytest.mark.parametrize("name, wrong, hint", CASES,
                         ids=[wrong.__name__ for _, wrong, _ in CASES])
def test_wrong_answers_fail_both_and_the_visible_check_names_the_mistake(hidden, name, wrong,
                                                                          hint):
    with pytest.raises(CheckFailed, match=hint):
        getattr(checks, name)(wrong)
    expect_hidden_failure(lambda: getattr(hidden, name)(wrong))


# --- shortcuts: right numbers, but they call what the exercise asks to write -----------------

def _cumulative_scan(a, b):
    P = torch.cumprod(a, dim=-1)
    return P * torch.cumsum(b / P, dim=-1)


SHORTCUTS = [
    ("discretize", reference.discretize_zoh),
    ("ssm_recurrent", lambda u, A_bar, B_bar, C: reference.ssm_recurrent(u, A_bar, B_bar, C)),
    ("ssm_recurrent", lambda u, A_bar, B_bar, C: reference.ssm_convolution(
        u, _kernel(A_bar, B_bar, C, u.shape[-1]))),
    ("ssm_convolution", lambda u, A_bar, B_bar, C: reference.ssm_convolution(
        u, reference.ssm_kernel(A_bar, B_bar, C, u.shape[-1]))),
    ("selective_scan_sequential",
     lambda u, delta, A, B, C, D: reference.selective_scan(u, delta, A, B, C, D)),
    ("parallel_scan", reference.parallel_scan),
    ("parallel_scan", _cumulative_scan),
    ("ssd", reference.ssd),
]


@pytest.mark.parametrize("name, shortcut", SHORTCUTS)
def test_shortcuts_pass_visible_but_fail_hidden(hidden, name, shortcut):
    getattr(checks, name)(shortcut)  # the numbers are right...
    # ...but the grader sees the reference being called
    expect_hidden_failure(lambda: getattr(hidden, name)(shortcut), "ShortcutUsed")


def test_not_started_exercises_say_so_in_one_line():
    def stub(*args):
        raise NotImplementedError()

    for name in EXERCISES:
        with pytest.raises(CheckFailed, match="is not done yet"):
            getattr(checks, name)(stub)


def test_hidden_verdicts_survive_a_patched_kernel(monkeypatch, solution):
    wrong = _selective("no_skip")
    monkeypatch.setattr(torch, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(numpy, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.testing, "assert_close", lambda *args, **kwargs: None)
    monkeypatch.setattr(helpers.ssm, "selective_scan", wrong)
    monkeypatch.setattr(helpers.ssm, "sequential_scan", _doubling("order"))
    hidden = lesson(LESSON)  # loaded after the patches, as the hidden test cell does
    expect_hidden_failure(lambda: hidden.selective_scan_sequential(wrong))
    hidden.selective_scan_sequential(solution["selective_scan_sequential"])
    expect_hidden_failure(lambda: hidden.parallel_scan(_doubling("order")))
    hidden.parallel_scan(solution["parallel_scan"])
    assert helpers.ssm.selective_scan is wrong  # still patched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_solution_runs_on_cuda(solution):
    a, b = torch.rand(3, 100, device="cuda"), torch.randn(3, 100, device="cuda")
    assert solution["parallel_scan"](a, b).device.type == "cuda"
    u, delta = torch.randn(2, 4, 9, device="cuda"), torch.rand(2, 4, 9, device="cuda")
    A, B, C = -torch.rand(4, 3, device="cuda"), *torch.randn(2, 2, 3, 9, device="cuda")
    y = solution["selective_scan_sequential"](u, delta, A, B, C, torch.ones(4, device="cuda"))
    torch.testing.assert_close(y, reference.selective_scan(u, delta, A, B, C,
                                                           torch.ones(4, device="cuda")))
