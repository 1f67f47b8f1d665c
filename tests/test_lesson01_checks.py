"""Lesson 01's visible checks and hidden tests: they accept the reference solution, reject the
typical wrong answers and the shortcuts, and cannot be fooled by a patched kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import helpers.rnn
from helpers.checks import CheckFailed
from helpers.checks import lesson01 as checks

from conftest import expect_hidden_failure

LESSON = "01"


EXERCISES = ["rnn_cell", "rnn_unroll", "context_vector", "gradient_norms"]


def rejected(name: str, answer, hidden, hint: str) -> None:
    """Both the visible check (naming ``hint``) and the hidden test reject ``answer``."""
    with pytest.raises(CheckFailed, match=hint):
        getattr(checks, name)(answer)
    for _ in range(3):
        expect_hidden_failure(lambda: getattr(hidden, name)(answer))


@pytest.mark.parametrize("name", EXERCISES)
def test_solution_passes_visible_and_hidden(solution, hidden, name, capsys):
    getattr(checks, name)(solution[name])
    assert "all checks passed" in capsys.readouterr().out
    for _ in range(3):  # fresh seeds and shapes each time
        getattr(hidden, name)(solution[name])


# --- exercise 1: rnn_cell ---

def cell_without_tanh(x_t, h_prev, W_x, W_h, b):
    return x_t @ W_x.T + h_prev @ W_h.T + b


def cell_without_recurrence(x_t, h_prev, W_x, W_h, b):
    return torch.tanh(x_t @ W_x.T + b)


def cell_with_transposed_W_h(x_t, h_prev, W_x, W_h, b):
    return torch.tanh(x_t @ W_x.T + h_prev @ W_h + b)


def cell_without_bias(x_t, h_prev, W_x, W_h, b):
    return torch.tanh(x_t @ W_x.T + h_prev @ W_h.T)


@pytest.mark.parametrize("answer, hint", [
    (cell_without_tanh, "tanh missing"),
    (cell_without_recurrence, "does not depend on h_{t-1}"),
    (cell_with_transposed_W_h, "transposed"),
    (cell_without_bias, "bias"),
])
def test_wrong_cells_are_rejected(hidden, answer, hint):
    rejected("rnn_cell", answer, hidden, hint)


def cell_by_torch(x_t, h_prev, W_x, W_h, b):
    cell = nn.RNNCell(W_x.shape[1], W_x.shape[0]).to(x_t.device, x_t.dtype)
    with torch.no_grad():
        cell.weight_ih.copy_(W_x)
        cell.weight_hh.copy_(W_h)
        cell.bias_ih.copy_(b)
        cell.bias_hh.zero_()
    return cell(x_t, h_prev)


@pytest.mark.parametrize("answer", [cell_by_torch, helpers.rnn.rnn_cell],
                         ids=["nn.RNNCell", "helpers.rnn"])
def test_shortcut_cells_fail_visible_and_hidden(hidden, answer, capsys):
    with pytest.raises(CheckFailed, match="calls"):
        checks.rnn_cell(answer)
    expect_hidden_failure(lambda: hidden.rnn_cell(answer), "ShortcutUsed")


# --- exercise 2: rnn_unroll ---

def _zeros_if_none(x, W_h, h0):
    return x.new_zeros(x.shape[0], W_h.shape[0]) if h0 is None else h0


def cell_by_hand(x_t, h_prev, W_x, W_h, b):
    return torch.tanh(x_t @ W_x.T + h_prev @ W_h.T + b)


def unroll_by_hand(x, W_x, W_h, b, h0=None):
    h, states = _zeros_if_none(x, W_h, h0), []
    for t in range(x.shape[1]):
        h = cell_by_hand(x[:, t], h, W_x, W_h, b)
        states.append(h)
    return torch.stack(states, dim=1)


def unroll_last_only(x, W_x, W_h, b, h0=None):
    h = _zeros_if_none(x, W_h, h0)
    for t in range(x.shape[1]):
        h = cell_by_hand(x[:, t], h, W_x, W_h, b)
    return h


def unroll_wrong_axis(x, W_x, W_h, b, h0=None):
    h, states = _zeros_if_none(x, W_h, h0), []
    for t in range(x.shape[1]):
        h = cell_by_hand(x[:, t], h, W_x, W_h, b)
        states.append(h)
    return torch.stack(states, dim=0)


def unroll_with_h0(x, W_x, W_h, b, h0=None):
    h = _zeros_if_none(x, W_h, h0)
    states = [h]
    for t in range(x.shape[1]):
        h = cell_by_hand(x[:, t], h, W_x, W_h, b)
        states.append(h)
    return torch.stack(states, dim=1)


def unroll_ignoring_h0(x, W_x, W_h, b, h0=None):
    return unroll_by_hand(x, W_x, W_h, b)


def unroll_not_carried(x, W_x, W_h, b, h0=None):
    h0 = _zeros_if_none(x, W_h, h0)
    return torch.stack([cell_by_hand(x[:, t], h0, W_x, W_h, b) for t in range(x.shape[1])], 1)


@pytest.mark.parametrize("answer, hint", [
    (unroll_last_only, "only the last state"),
    (unroll_wrong_axis, "wrong axis"),
    (unroll_with_h0, "without the initial state"),
    (unroll_ignoring_h0, "h0 is ignored"),
    (unroll_not_carried, "starts from h0"),
])
def test_wrong_unrolls_are_rejected(hidden, answer, hint):
    rejected("rnn_unroll", answer, hidden, hint)


def unroll_by_torch(x, W_x, W_h, b, h0=None):
    module = nn.RNN(W_x.shape[1], W_x.shape[0], batch_first=True).to(x.device, x.dtype)
    with torch.no_grad():
        module.weight_ih_l0.copy_(W_x)
        module.weight_hh_l0.copy_(W_h)
        module.bias_ih_l0.copy_(b)
        module.bias_hh_l0.zero_()
    return module(x, None if h0 is None else h0[None])[0]


@pytest.mark.parametrize("answer", [unroll_by_torch, helpers.rnn.rnn_unroll],
                         ids=["nn.RNN", "helpers.rnn"])
def test_shortcut_unrolls_fail_visible_and_hidden(hidden, answer, capsys):
    with pytest.raises(CheckFailed, match="calls"):
        checks.rnn_unroll(answer)
    expect_hidden_failure(lambda: hidden.rnn_unroll(answer), "ShortcutUsed")


def test_unroll_may_use_the_course_cell(hidden, capsys):
    """A student stuck on exercise 1 may build exercise 2 on helpers.rnn.rnn_cell."""
    def unroll_on_course_cell(x, W_x, W_h, b, h0=None):
        h, states = _zeros_if_none(x, W_h, h0), []
        for t in range(x.shape[1]):
            h = helpers.rnn.rnn_cell(x[:, t], h, W_x, W_h, b)
            states.append(h)
        return torch.stack(states, dim=1)

    checks.rnn_unroll(unroll_on_course_cell)
    hidden.rnn_unroll(unroll_on_course_cell)


# --- exercise 3: context_vector ---

def context_after_padding(states, lengths):
    return states[:, -1]


def context_off_by_one(states, lengths):
    index = lengths.clamp(max=states.shape[1] - 1)
    return states[torch.arange(states.shape[0], device=states.device), index]


@pytest.mark.parametrize("answer, hint", [
    (context_after_padding, "after the padding"),
    (context_off_by_one, "off by one"),
])
def test_wrong_context_vectors_are_rejected(hidden, answer, hint):
    rejected("context_vector", answer, hidden, hint)


def test_shortcut_context_vector_fails_visible_and_hidden(hidden, capsys):
    with pytest.raises(CheckFailed, match="calls"):
        checks.context_vector(helpers.rnn.context_vector)
    expect_hidden_failure(lambda: hidden.context_vector(helpers.rnn.context_vector),
                          "ShortcutUsed")


# --- exercise 4: gradient_norms ---

def _norms(states, W_x, W_h, derivative_of, recurrent):
    B, L, H = states.shape
    G = torch.eye(H, dtype=states.dtype, device=states.device).expand(B, H, H)
    norms = []
    for t in reversed(range(L)):
        G_D = G * derivative_of(states, t)[:, None, :]
        norms.append(torch.linalg.matrix_norm(G_D @ W_x))
        G = G_D @ recurrent(W_h)
    return torch.stack(norms[::-1], dim=1)


def norms_reversed(states, W_x, W_h):
    return _norms(states, W_x, W_h, lambda s, t: 1 - s[:, t] ** 2, lambda W: W).flip(1)


def norms_without_tanh_derivative(states, W_x, W_h):
    return _norms(states, W_x, W_h, lambda s, t: torch.ones_like(s[:, t]), lambda W: W)


def norms_with_transposed_W_h(states, W_x, W_h):
    return _norms(states, W_x, W_h, lambda s, t: 1 - s[:, t] ** 2, lambda W: W.T)


def norms_with_previous_state_derivative(states, W_x, W_h):
    """Uses tanh'(a_{t-1}) instead of tanh'(a_t): the derivative of the wrong state."""
    return _norms(states, W_x, W_h, lambda s, t: 1 - s[:, max(t - 1, 0)] ** 2, lambda W: W)


@pytest.mark.parametrize("answer, hint", [
    (norms_reversed, "reverse order"),
    (norms_without_tanh_derivative, "forgot the tanh derivative"),
    (norms_with_transposed_W_h, "W_h .not W_h.T."),
    (norms_with_previous_state_derivative, "last entry"),
])
def test_wrong_gradient_norms_are_rejected(hidden, answer, hint):
    rejected("gradient_norms", answer, hidden, hint)


def test_shortcut_gradient_norms_fail_visible_and_hidden(hidden, capsys):
    with pytest.raises(CheckFailed, match="calls"):
        checks.gradient_norms(helpers.rnn.gradient_norms)
    expect_hidden_failure(lambda: hidden.gradient_norms(helpers.rnn.gradient_norms),
                          "ShortcutUsed")


# --- a patched kernel does not change a hidden verdict ---

def test_patched_allclose_and_helpers_do_not_change_hidden_verdicts(solution, monkeypatch):
    """A student cell may replace torch.allclose, assert_close or helpers.rnn's functions
    with ones that agree with a wrong answer; the hidden tests must not notice."""
    import importlib

    import helpers.hidden

    monkeypatch.setattr(torch, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.testing, "assert_close", lambda *args, **kwargs: None)
    monkeypatch.setattr(helpers.rnn, "rnn_cell", cell_without_tanh)
    monkeypatch.setattr(helpers.rnn, "rnn_unroll", unroll_not_carried)
    monkeypatch.setattr(helpers.rnn, "gradient_norms", norms_reversed)
    monkeypatch.setattr(helpers.rnn, "context_vector", context_after_padding)
    hidden = importlib.reload(helpers.hidden).lesson("01")  # as a hidden test cell does
    for name, wrong in [("rnn_cell", cell_without_tanh), ("rnn_unroll", unroll_not_carried),
                        ("gradient_norms", norms_reversed),
                        ("context_vector", context_after_padding)]:
        expect_hidden_failure(lambda: getattr(hidden, name)(wrong))
        getattr(hidden, name)(solution[name])
