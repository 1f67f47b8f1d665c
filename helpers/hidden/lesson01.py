"""Hidden tests for lesson 01: fresh shapes, dtypes and seeds, references from a private copy
of ``helpers`` and from autograd, and no shortcut through PyTorch's RNNs or ``helpers.rnn``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from helpers import rnn as reference
from helpers.hidden._core import (as_double, expect_close, expect_tensor, forbid, randn,
                                  random_seed, sizes)

DTYPES = (torch.float32, torch.float64)
TOLERANCES = {torch.float32: {"atol": 1e-5, "rtol": 1e-4},
              torch.float64: {"atol": 1e-10, "rtol": 1e-9}}
RNN_FUNCTIONS = ["rnn_tanh", "rnn_tanh_cell", "rnn_relu", "rnn_relu_cell", "lstm", "gru"]
RNN_HELPERS = ["helpers.rnn.rnn_cell", "helpers.rnn.rnn_unroll", "helpers.rnn.gradient_norms",
               "helpers.rnn.context_vector", "helpers.rnn.RecurrentTagger"]


def _weights(generator: torch.Generator, n: dict[str, int], dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_x (H, D), W_h (H, H), b (H,) with gains that keep tanh away from both extremes."""
    return (randn(generator, n["H"], n["D"], dtype=dtype, scale=n["D"] ** -0.5),
            randn(generator, n["H"], n["H"], dtype=dtype, scale=0.9 * n["H"] ** -0.5),
            randn(generator, n["H"], dtype=dtype, scale=0.3))


def rnn_cell(student: Callable) -> None:
    """One step on random shapes, in float32 and float64; no torch RNN, no helpers.rnn."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        n = sizes(generator, B=(1, 5), D=(1, 9), H=(2, 9))
        x_t = randn(generator, n["B"], n["D"], dtype=dtype)
        h_prev = randn(generator, n["B"], n["H"], dtype=dtype, scale=0.8)
        W_x, W_h, b = _weights(generator, n, dtype)
        with forbid(torch_functions=RNN_FUNCTIONS, helpers=RNN_HELPERS):
            h_t = student(x_t, h_prev, W_x, W_h, b)
        what = f"rnn_cell, {n}, {dtype}, seed {seed}"
        expect_tensor(h_t, dtype, what)
        expected = reference.rnn_cell(*as_double(x_t, h_prev, W_x, W_h, b))
        expect_close(h_t, expected, what, **TOLERANCES[dtype])


def rnn_unroll(student: Callable) -> None:
    """Random lengths, with a given h0 and with h0=None; the student's (or the course's)
    ``rnn_cell`` may be used, nothing that unrolls for them."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        n = sizes(generator, B=(1, 4), L=(2, 12), D=(1, 7), H=(2, 8))
        x = randn(generator, n["B"], n["L"], n["D"], dtype=dtype)
        h0 = randn(generator, n["B"], n["H"], dtype=dtype, scale=0.8)
        W_x, W_h, b = _weights(generator, n, dtype)
        helpers_forbidden = [name for name in RNN_HELPERS if name != "helpers.rnn.rnn_cell"]
        with forbid(torch_functions=RNN_FUNCTIONS, helpers=helpers_forbidden):
            states = student(x, W_x, W_h, b, h0)
            from_zeros = student(x, W_x, W_h, b)
        what = f"rnn_unroll, {n}, {dtype}, seed {seed}"
        expect_tensor(states, dtype, what)
        expect_close(states, reference.rnn_unroll(*as_double(x, W_x, W_h, b, h0)), what,
                     **TOLERANCES[dtype])
        expect_tensor(from_zeros, dtype, what + ", h0=None")
        expect_close(from_zeros, reference.rnn_unroll(*as_double(x, W_x, W_h, b)),
                     what + ", h0=None", **TOLERANCES[dtype])


def gradient_norms(student: Callable) -> None:
    """Norms of d h_L / d x_t against autograd's Jacobian, on random shapes and gains."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        n = sizes(generator, B=(1, 3), L=(2, 10), D=(1, 5), H=(2, 6))
        x = randn(generator, n["B"], n["L"], n["D"], dtype=torch.float64)
        W_x, W_h, b = _weights(generator, n, torch.float64)
        states = reference.rnn_unroll(x, W_x, W_h, b)  # (B, L, H)

        def last_state(inputs: torch.Tensor) -> torch.Tensor:
            return reference.rnn_unroll(inputs, W_x, W_h, b)[:, -1]  # (B, H)

        jacobian = torch.autograd.functional.jacobian(last_state, x)  # (B, H, B, L, D)
        rows = torch.arange(n["B"], device=x.device)
        expected = jacobian[rows, :, rows].pow(2).sum(dim=(1, 3)).sqrt()  # (B, L)
        with forbid(torch_functions=RNN_FUNCTIONS, helpers=RNN_HELPERS):
            norms = student(states.to(dtype), W_x.to(dtype), W_h.to(dtype))
        what = f"gradient_norms, {n}, {dtype}, seed {seed}"
        expect_tensor(norms, dtype, what)
        expect_close(norms, expected, what, **TOLERANCES[dtype])


def context_vector(student: Callable) -> None:
    """Random padded batches, lengths from 1 to L; the answer is compared element by element."""
    seed = random_seed()
    generator = torch.Generator().manual_seed(seed)
    for dtype in DTYPES:
        n = sizes(generator, B=(2, 6), L=(2, 10), H=(1, 8))
        states = randn(generator, n["B"], n["L"], n["H"], dtype=dtype)
        lengths = torch.randint(1, n["L"] + 1, (n["B"],), generator=generator)
        lengths[0], lengths[1] = 1, n["L"]  # both extremes, every time
        lengths = lengths.to(states.device)
        with forbid(torch_functions=RNN_FUNCTIONS, helpers=RNN_HELPERS):
            context = student(states, lengths)
        what = f"context_vector, {n}, lengths {lengths.tolist()}, {dtype}, seed {seed}"
        expect_tensor(context, dtype, what)
        expected = torch.stack([states[i, int(length) - 1] for i, length in enumerate(lengths)])
        expect_close(context, expected, what, atol=0.0, rtol=0.0)
