"""Visible checks for lesson 01 (the RNN bottleneck).

Each check runs the student's function on small fixed inputs, compares it with PyTorch's own
recurrent layers (``torch.nn.RNNCell``, ``torch.nn.RNN``) or with autograd's Jacobian, and,
when it fails, names the likely mistake.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from helpers.checks import (call, exercise, expect, expect_close, expect_shape, expect_tensor,
                            guarded, is_close, passed, randn)
from helpers.hidden.lesson01 import RNN_FUNCTIONS, RNN_HELPERS

B, L, D, H = 3, 6, 4, 5  # D != H, so a transposed W_x fails loudly


def _weights(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_x (H, D), W_h (H, H), b (H,), scaled so that tanh is neither linear nor saturated."""
    return (randn(H, D, seed=seed, scale=0.6), randn(H, H, seed=seed + 1, scale=0.5),
            randn(H, seed=seed + 2, scale=0.3))


def _torch_rnn(W_x: torch.Tensor, W_h: torch.Tensor, b: torch.Tensor) -> torch.nn.RNN:
    """A ``torch.nn.RNN`` (tanh, batch first) that holds the given weights."""
    rnn = torch.nn.RNN(W_x.shape[1], W_h.shape[0], batch_first=True).to(W_x.device, W_x.dtype)
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(W_x)
        rnn.weight_hh_l0.copy_(W_h)
        rnn.bias_ih_l0.copy_(b)
        rnn.bias_hh_l0.zero_()
    return rnn


def _expect_dtype(value: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    expect(value.dtype == dtype, f"{name} has dtype {value.dtype}, expected {dtype} (the dtype "
           "of the inputs): did you create a tensor without dtype= or call .float()?")


@exercise
def rnn_cell(fn: Callable) -> None:
    """Check ``rnn_cell(x_t, h_prev, W_x, W_h, b)`` -> (B, H) against ``torch.nn.RNNCell``."""
    fn = guarded(fn, "rnn_cell", torch_functions=RNN_FUNCTIONS, helpers=RNN_HELPERS)
    x_t, h_prev = randn(B, D, seed=0), randn(B, H, seed=1, scale=0.8)
    W_x, W_h, b = _weights(seed=2)
    shapes = (f"shapes: x_t (B, D) = {(B, D)}, h_prev (B, H) = {(B, H)}, W_x (H, D) = {(H, D)}, "
              f"W_h (H, H) = {(H, H)}, b (H,) = {(H,)}; with row vectors, W_x x_t is "
              "x_t @ W_x.T and W_h h_{t-1} is h_prev @ W_h.T")
    h_t = expect_tensor(call(fn, x_t, h_prev, W_x, W_h, b, name="rnn_cell(...)", hint=shapes),
                        "rnn_cell(...)")
    expect_shape(h_t, (B, H), "rnn_cell(...)", "one new state per batch row, (B, H)")
    pre = x_t @ W_x.T + h_prev @ W_h.T + b  # (B, H)
    expect(not is_close(h_t, pre), "h_t equals the pre-activation W_x x_t + W_h h_{t-1} + b: "
           "tanh missing")
    expect(bool((h_t.abs() <= 1).all()), "values outside [-1, 1]: tanh missing?")
    expect(not is_close(h_t, torch.tanh(x_t @ W_x.T + b)),
           "h_t does not depend on h_{t-1}: forgot W_h h_{t-1}?")
    expect(not is_close(h_t, torch.tanh(x_t @ W_x.T + h_prev @ W_h + b)),
           "W_h is applied transposed: with row vectors, W_h h_{t-1} is h_prev @ W_h.T")
    expect(not is_close(h_t, torch.tanh(x_t @ W_x.T + h_prev @ W_h.T)), "the bias b is missing")
    cell = torch.nn.RNNCell(D, H).to(x_t.device, x_t.dtype)
    with torch.no_grad():
        cell.weight_ih.copy_(W_x)
        cell.weight_hh.copy_(W_h)
        cell.bias_ih.copy_(b)
        cell.bias_hh.zero_()
    expect_close(h_t, cell(x_t, h_prev), "rnn_cell(...)",
                 "h_t = tanh(x_t @ W_x.T + h_prev @ W_h.T + b)")
    _expect_dtype(h_t, x_t.dtype, "rnn_cell(...)")
    passed("rnn_cell")


@exercise
def rnn_unroll(fn: Callable) -> None:
    """Check ``rnn_unroll(x, W_x, W_h, b, h0=None)`` -> (B, L, H) against ``torch.nn.RNN``."""
    fn = guarded(fn, "rnn_unroll", torch_functions=RNN_FUNCTIONS,
                 helpers=[name for name in RNN_HELPERS if name != "helpers.rnn.rnn_cell"])
    x, h0 = randn(B, L, D, seed=10), randn(B, H, seed=11, scale=0.8)
    W_x, W_h, b = _weights(seed=12)
    rnn = _torch_rnn(W_x, W_h, b)
    hint = (f"x is (B, L, D) = {(B, L, D)} and h0 is (B, H) = {(B, H)}: step t reads x[:, t], "
            "of shape (B, D), and the previous state (B, H)")
    states = expect_tensor(call(fn, x, W_x, W_h, b, h0, name="rnn_unroll(x, W_x, W_h, b, h0)",
                                hint=hint), "rnn_unroll(x, W_x, W_h, b, h0)")
    expect(tuple(states.shape) != (B, H), "returned only the last state (B, H): return every "
           "state h_1 .. h_L, stacked into (B, L, H)")
    expect(tuple(states.shape) != (L, B, H), "states stacked along the wrong axis: got (L, B, H), "
           "stack along dim=1 to get (B, L, H)")
    expect(tuple(states.shape) != (B, L + 1, H), f"got {L + 1} states for {L} inputs: return "
           "h_1 .. h_L, without the initial state h0")
    expect_shape(states, (B, L, H), "rnn_unroll(...)", "one state per input step, (B, L, H)")
    expected, _ = rnn(x, h0[None])  # (B, L, H)
    expect(not is_close(states, rnn(x)[0]), "the initial state h0 is ignored: start from h0")
    carried = torch.stack([torch.tanh(x[:, t] @ W_x.T + h0 @ W_h.T + b) for t in range(L)], 1)
    expect(not is_close(states, carried), "every step starts from h0: feed each new state h_t "
           "into the next step")
    expect_close(states[:, 0], expected[:, 0], "the first state h_1",
                 "h_1 = tanh(x_1 @ W_x.T + h0 @ W_h.T + b)")
    expect_close(states, expected, "rnn_unroll(...)", "the states from the second on are wrong: "
                 "is the state of step t passed to step t + 1?")
    zeros = expect_tensor(call(fn, x, W_x, W_h, b, name="rnn_unroll(x, W_x, W_h, b)",
                               hint="with h0=None, start from zeros of shape (B, H) on x's device "
                                    "and in x's dtype (the inputs here are float64): "
                                    "x.new_zeros(B, H)"), "rnn_unroll(x, W_x, W_h, b)")
    expect_close(zeros, rnn(x)[0], "rnn_unroll(x, W_x, W_h, b) with h0=None",
                 "when h0 is None start from zeros (B, H), on x's device and in x's dtype")
    _expect_dtype(states, x.dtype, "rnn_unroll(...)")
    passed("rnn_unroll")


def _autograd_norms(x: torch.Tensor, W_x: torch.Tensor, W_h: torch.Tensor,
                    b: torch.Tensor) -> torch.Tensor:
    """||∂h_L/∂x_t||_F for every (batch, t), by autograd through ``torch.nn.RNN``: (B, L)."""
    rnn = _torch_rnn(W_x, W_h, b)
    jacobian = torch.autograd.functional.jacobian(lambda inputs: rnn(inputs)[0][:, -1], x)
    rows = torch.arange(x.shape[0], device=x.device)
    per_example = jacobian[rows, :, rows]  # (B, H, L, D): batch rows do not interact
    return per_example.pow(2).sum(dim=(1, 3)).sqrt()  # (B, L)


@exercise
def gradient_norms(fn: Callable) -> None:
    """Check ``gradient_norms(states, W_x, W_h)`` -> (B, L) against autograd's Jacobian."""
    fn = guarded(fn, "gradient_norms", torch_functions=RNN_FUNCTIONS, helpers=RNN_HELPERS)
    x = randn(B, L, D, seed=20)
    W_x, W_h, b = _weights(seed=21)
    states = _torch_rnn(W_x, W_h, b)(x)[0].detach()  # (B, L, H)
    expected = _autograd_norms(x, W_x, W_h, b)  # (B, L)
    hint = (f"shapes: states (B, L, H) = {(B, L, H)}, W_x (H, D) = {(H, D)}, W_h (H, H) = "
            f"{(H, H)}; G is (B, H, H), G D_t is G * d[:, None, :] with d = 1 - states[:, t]**2 "
            "of shape (B, H), and G D_t W_x is (B, H, D)")
    norms = expect_tensor(call(fn, states, W_x, W_h, name="gradient_norms(states, W_x, W_h)",
                               hint=hint), "gradient_norms(states, W_x, W_h)")
    expect(tuple(norms.shape) != (L,), "got one norm per step (L,): keep the batch, one norm "
           "per sequence and step, (B, L)")
    expect_shape(norms, (B, L), "gradient_norms(...)", "one norm per sequence and input step")
    expect(not is_close(norms, expected.flip(1)), "the norms are in reverse order: entry t "
           "belongs to input x_t, so the last input x_L is entry L - 1")
    last = torch.linalg.matrix_norm((1 - states[:, -1, :, None] ** 2) * W_x)  # (B,)
    expect(not is_close(norms[:, -1], torch.linalg.matrix_norm(W_x).expand(B)),
           "the last entry is ||W_x||: forgot the tanh derivative diag(1 - h_t^2)")
    expect_close(norms[:, -1], last, "the last entry ||∂h_L/∂x_L||",
                 "∂h_L/∂x_L = diag(1 - h_L^2) W_x, and its Frobenius norm")
    expect_close(norms, expected, "gradient_norms(...)",
                 "going back one step multiplies by diag(1 - h_k^2) W_h: use the derivative of "
                 "the state you are passing through, and W_h (not W_h.T)")
    _expect_dtype(norms, states.dtype, "gradient_norms(...)")
    passed("gradient_norms")


@exercise
def context_vector(fn: Callable) -> None:
    """Check ``context_vector(states, lengths)`` -> (B, H): each sequence's last real state."""
    fn = guarded(fn, "context_vector", torch_functions=RNN_FUNCTIONS, helpers=RNN_HELPERS)
    states = randn(B, L, H, seed=30)
    lengths = torch.tensor([L, 2, 1], device=states.device)
    expected = torch.stack([states[i, int(n) - 1] for i, n in enumerate(lengths)])  # (B, H)
    hint = (f"states is (B, L, H) = {(B, L, H)} and lengths = {lengths.tolist()}: a length of "
            f"L = {L} is a valid length, but L is not a valid index; the last real token of "
            "sequence i is at index lengths[i] - 1")
    context = expect_tensor(call(fn, states, lengths, name="context_vector(states, lengths)",
                                 hint=hint), "context_vector(states, lengths)")
    expect_shape(context, (B, H), "context_vector(...)", "one vector per sequence, (B, H)")
    expect(not is_close(context, states[:, -1]), "you took states[:, -1], the state after the "
           "padding: the last real token of sequence i is at index lengths[i] - 1")
    shifted = torch.stack([states[i, min(int(n), L - 1)] for i, n in enumerate(lengths)])
    expect(not is_close(context, shifted), "off by one: the last real token of sequence i is at "
           "index lengths[i] - 1, not lengths[i]")
    expect_close(context, expected, "context_vector(...)",
                 "row i should be states[i, lengths[i] - 1]")
    _expect_dtype(context, states.dtype, "context_vector(...)")
    passed("context_vector")
