"""Visible checks: what the test cells under each exercise call.

They teach rather than grade: each failure names the likely mistake. One module per
lesson (``helpers.checks.lesson02`` ...); the shared vocabulary lives here.

Every check that a test cell calls is wrapped in :func:`exercise`: an answer that still
raises ``NotImplementedError`` gets one line saying that the exercise is not done yet, and
a failed check shows its message (and, when the student's code raised, the lines of the
student's code), never the checker's own source.
"""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch

from helpers.device import get_device
from helpers.hidden._core import ShortcutUsed, forbid

_HELPERS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RED, _RESET = "\x1b[31m", "\x1b[0m"


def _student_frames(error: BaseException) -> list[str]:
    """The traceback lines of ``error`` that point into the student's code, not ``helpers``
    or the libraries: where in their own cell the answer raised."""
    frames = traceback.extract_tb(error.__traceback__)
    mine = [frame for frame in frames if not os.path.abspath(frame.filename).startswith(_HELPERS_DIR)
            and "site-packages" not in frame.filename and "/lib/python" not in frame.filename]
    return traceback.format_list(mine)


class CheckFailed(AssertionError):
    """A visible check failed; the message says what to look at.

    In a notebook only the message is shown (IPython calls ``_render_traceback_``), plus the
    student's own lines when their code raised the error behind it.
    """

    def _render_traceback_(self) -> list[str]:
        lines = [f"{_RED}{type(self).__name__}{_RESET}: {self}"]
        cause = self.__cause__
        if cause is not None:
            frames = _student_frames(cause)
            if frames:
                lines += ["", f"{type(cause).__name__} was raised here, in your code:"]
                lines += [line.rstrip("\n") for frame in frames for line in frame.splitlines()]
        return lines


class NotDone(CheckFailed):
    """The exercise still raises ``NotImplementedError``: it has not been written yet."""


F = TypeVar("F", bound=Callable[..., None])


def _answer_name(answer: object) -> str:
    return getattr(answer, "__name__", None) or type(answer).__name__


def exercise(check: F) -> F:
    """Mark a check that a test cell calls with the student's answer (its first argument).

    A ``NotImplementedError`` from the answer (nbgrader's stub) becomes :class:`NotDone`,
    one line that names the exercise, instead of a traceback through the checker.
    """
    @functools.wraps(check)
    def run(answer: object, *args: object, **kwargs: object) -> None:
        try:
            return check(answer, *args, **kwargs)
        except NotImplementedError:
            name = _answer_name(answer)
            raise NotDone(f"{name} is not done yet: write it in its cell above (in place of "
                          f"`raise NotImplementedError()`), run that cell, then this one"
                          ) from None
    return run  # type: ignore[return-value]


def call(fn: Callable, *args: object, name: str, hint: str = "", **kwargs: object) -> object:
    """``fn(*args, **kwargs)``, turning an error inside the student's code into a check
    failure that names the call and the likely mistake (``hint``).

    ``NotImplementedError`` passes through untouched, for :func:`exercise` to report.
    """
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except (RuntimeError, IndexError, TypeError, AttributeError) as error:
        message = f"{name} raised {type(error).__name__}: {error}"
        raise CheckFailed(message + (f"\n{hint}" if hint else "")) from error


@contextmanager
def without_shortcuts(what: str, torch_functions: Iterable[str] = (),
                      helpers: Iterable[str] = (), hint: str = "") -> Iterator[None]:
    """Fail the check if the code inside calls one of the references an exercise forbids,
    as its hidden test does (:func:`helpers.hidden._core.forbid`): a shortcut is caught
    here, where the student can still fix it, not only when it is graded."""
    try:
        with forbid(torch_functions=torch_functions, helpers=helpers):
            yield
    except ShortcutUsed as error:
        raise CheckFailed(f"{what}: {error}" + (f"\n{hint}" if hint else "")) from None


def run_without(what: str, run: Callable[[], object], torch_functions: Iterable[str] = (),
                helpers: Iterable[str] = ()) -> object:
    """``run()`` inside :func:`without_shortcuts`: the value of one call of the student's
    code, or a failed check naming the forbidden reference it used."""
    with without_shortcuts(what, torch_functions=torch_functions, helpers=helpers):
        return run()


def guarded(fn: Callable, what: str, torch_functions: Iterable[str] = (),
            helpers: Iterable[str] = ()) -> Callable:
    """``fn`` wrapped so that each call runs :func:`without_shortcuts`: for checks that call
    the student's function in many places, between calls to the references they compare
    with."""
    torch_functions, helpers = tuple(torch_functions), tuple(helpers)

    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> object:
        with without_shortcuts(what, torch_functions=torch_functions, helpers=helpers):
            return fn(*args, **kwargs)
    return run


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64, scale: float = 1.0) -> torch.Tensor:
    """A reproducible normal tensor (times ``scale``) on the course device: a check's input."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=dtype) * scale).to(get_device())


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
