"""Visible checks: what the test cells under each exercise call.

They teach rather than grade: each failure names the likely mistake. One module per
lesson (``helpers.checks.lesson02`` ...); the shared vocabulary lives here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class CheckFailed(AssertionError):
    """A visible check failed; the message says what to look at."""


def expect_tensor(value: object, name: str) -> torch.Tensor:
    """Fail unless ``value`` is a tensor (a common slip: returning a tuple or a list)."""
    if not isinstance(value, torch.Tensor):
        raise CheckFailed(f"{name} should be a torch.Tensor, got {type(value).__name__}")
    return value


def expect_shape(value: torch.Tensor, shape: Sequence[int], name: str, hint: str = "") -> None:
    """Fail with the expected and actual shapes when they differ."""
    expect_tensor(value, name)
    if tuple(value.shape) != tuple(shape):
        message = f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        raise CheckFailed(message + (f": {hint}" if hint else ""))


def is_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5,
             rtol: float = 1e-4) -> bool:
    """True when the tensors have one shape and agree within ``atol + rtol * |expected|``."""
    if tuple(actual.shape) != tuple(expected.shape):
        return False
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return bool(((a - e).abs() <= atol + rtol * e.abs()).all())


def expect_close(actual: torch.Tensor, expected: torch.Tensor, name: str,
                 hint: str = "", atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Fail with the largest difference, and the hint about the likely mistake."""
    expect_shape(actual, expected.shape, name)
    if not is_close(actual, expected, atol, rtol):
        worst = (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max()
        message = f"{name} differs from the reference by up to {float(worst):.3g}"
        raise CheckFailed(message + (f": {hint}" if hint else ""))


def expect(condition: bool, message: str) -> None:
    """Fail with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CheckFailed(message)


def passed(what: str) -> None:
    """Tell the student a group of checks passed."""
    print(f"✓ {what}: all checks passed")
