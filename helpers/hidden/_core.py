"""The machinery of hidden tests: fresh references, comparisons a student cannot patch,
and a tripwire that notices when an answer only calls the reference.

Hidden tests run in the student's kernel, after the student's code. A student cell may have
replaced ``torch.allclose``, ``numpy.allclose``, ``torch.testing.assert_close`` or anything in
``helpers``. So the hidden tests never use those: they load their own copy of ``helpers``
(see :func:`fresh_import`) and compare with plain tensor arithmetic (:func:`max_abs_diff`).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
from torch.overrides import TorchFunctionMode

from helpers.device import get_device


class HiddenTestFailed(AssertionError):
    """A hidden test found the answer wrong.

    In a notebook (and so in nbgrader's feedback) only the message is shown: IPython calls
    ``_render_traceback_`` instead of printing the grader's source lines.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class ShortcutUsed(HiddenTestFailed):
    """The answer calls the implementation it was asked to write."""


def fresh_import(name: str) -> ModuleType:
    """Import ``name`` (a ``helpers`` module) anew from its files, ignoring patched copies.

    The modules in ``sys.modules`` are set aside while the fresh copy loads, then put back,
    so the student's kernel keeps its own (possibly patched) ``helpers`` and the hidden test
    gets a private one.
    """
    ours = [key for key in sys.modules if key == "helpers" or key.startswith("helpers.")]
    saved = {key: sys.modules.pop(key) for key in ours}
    try:
        return importlib.import_module(name)
    finally:
        for key in [key for key in sys.modules if key == "helpers" or key.startswith("helpers.")]:
            del sys.modules[key]
        sys.modules.update(saved)


def random_seed() -> int:
    """A seed the student cannot know in advance."""
    return int.from_bytes(os.urandom(4), "little")


@contextmanager
def reporting_seed(seed: int) -> Iterator[None]:
    """Name ``seed`` in any failure inside the block, so that a draw can be replayed; an
    error raised by the answer itself becomes a :class:`HiddenTestFailed` that names it."""
    try:
        yield
    except HiddenTestFailed as failure:
        raise type(failure)(f"{failure} (seed {seed})") from None
    except Exception as error:  # noqa: BLE001 - any error of the answer fails the test
        raise HiddenTestFailed(f"the answer raised {type(error).__name__}: {error} "
                               f"(seed {seed})") from error


def max_abs_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, computed in float64; NaN where either side has NaN."""
    a = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    e = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        raise HiddenTestFailed(f"shape {tuple(a.shape)}, expected {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0
    diff = (a - e).abs()
    if bool(torch.isnan(diff).any()):
        return float("nan")
    return float(diff.max())


def sizes(generator: torch.Generator, **ranges: tuple[int, int]) -> dict[str, int]:
    """One random size per name, each drawn from its inclusive range."""
    return {name: int(torch.randint(low, high + 1, (), generator=generator))
            for name, (low, high) in ranges.items()}


def randn(generator: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Normal values times ``scale`` from ``generator``, on the course device."""
    return (torch.randn(*shape, generator=generator, dtype=dtype) * scale).to(get_device())


def expect(condition: bool, message: str) -> None:
    """Fail the hidden test with ``message`` unless ``condition``."""
    if not condition:
        raise HiddenTestFailed(message)


def expect_tensor(value: object, dtype: torch.dtype | None, what: str) -> torch.Tensor:
    """``value`` if it is a tensor (of ``dtype``, unless None); else a failure naming ``what``."""
    if not isinstance(value, torch.Tensor):
        raise HiddenTestFailed(f"{what}: expected a tensor, got {type(value).__name__}")
    if dtype is not None and value.dtype != dtype:
        raise HiddenTestFailed(f"{what}: dtype {value.dtype}, expected {dtype}")
    return value


def as_double(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Float64 copies, detached: the inputs of a reference computed in plain arithmetic."""
    return [tensor.detach().double() for tensor in tensors]


def expect_close(actual: torch.Tensor, expected: torch.Tensor, what: str,
                 atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Raise unless ``|actual - expected| <= atol + rtol * |expected|`` everywhere."""
    if not isinstance(actual, torch.Tensor):
        raise HiddenTestFailed(f"{what}: expected a tensor, got {type(actual).__name__}")
    e = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    worst = max_abs_diff(actual, e)
    bound = atol + rtol * (float(e.abs().max()) if e.numel() else 0.0)
    if not worst <= bound:
        raise HiddenTestFailed(f"{what}: max |difference| {worst:.3g} exceeds {bound:.3g}")


class _TorchCalls(TorchFunctionMode):
    """Records the names of the torch functions called while it is active."""

    def __init__(self, names: set[str]):
        super().__init__()
        self.names, self.seen = names, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.names:
            self.seen.add(name)
        return func(*args, **(kwargs or {}))


def _warm_up_torch() -> None:
    """Let torch finish the lazy imports that a function mode triggers (``broadcast_shapes``
    pulls in sympy) before the profiler is on: under ``sys.setprofile`` they take seconds."""
    with _TorchCalls(set()):
        torch.broadcast_shapes((1,), (1,))


def _code_key(code) -> tuple[str, int, str]:
    return (os.path.realpath(code.co_filename), code.co_firstlineno, code.co_name)


def _helpers_code(qualnames: Iterable[str]) -> dict[tuple[str, int, str], str]:
    keys = {}
    for qualname in qualnames:
        module_name, _, attr = qualname.rpartition(".")
        target = getattr(fresh_import(module_name), attr)
        functions = [target] if callable(target) and hasattr(target, "__code__") else [
            getattr(value, "__func__", value) for value in vars(target).values()
            if hasattr(getattr(value, "__func__", value), "__code__")]  # and classmethods
        for function in functions:
            keys[_code_key(function.__code__)] = qualname
    return keys


@contextmanager
def forbid(torch_functions: Iterable[str] = (), helpers: Iterable[str] = ()) -> Iterator[None]:
    """Fail with :class:`ShortcutUsed` if the code inside calls any of the named references.

    ``torch_functions`` are torch function names (``"softmax"`` catches ``torch.softmax``,
    ``F.softmax`` and ``Tensor.softmax``, however they were imported); ``helpers`` are
    qualified names such as ``"helpers.attention.softmax"`` (a class name covers its methods).
    """
    code_keys = _helpers_code(helpers)
    called: set[str] = set()
    _warm_up_torch()

    def profile(frame, event, arg):
        if event == "call":
            hit = code_keys.get(_code_key(frame.f_code))
            if hit:
                called.add(hit)

    previous = sys.getprofile()
    mode = _TorchCalls(set(torch_functions))
    sys.setprofile(profile if code_keys else previous)
    try:
        with mode:
            yield
    finally:
        sys.setprofile(previous)
    used = sorted(mode.seen | called)
    if used:
        raise ShortcutUsed("the answer calls " + ", ".join(used)
                           + ": this exercise asks you to write it yourself")


@contextmanager
def record_calls(qualnames: Iterable[str]) -> Iterator[list[tuple[str, dict]]]:
    """Record, in order, every call made inside the block to the named ``helpers`` functions:
    a list of (qualified name, the arguments of the call by name).

    It chains to a profiler already set (so it works inside :func:`forbid`), and matches
    functions by their code, so it sees calls to the student's own copy of ``helpers``.
    """
    code_keys = _helpers_code(qualnames)
    calls: list[tuple[str, dict]] = []
    previous = sys.getprofile()

    def profile(frame, event, arg):
        if event == "call":
            hit = code_keys.get(_code_key(frame.f_code))
            if hit:
                calls.append((hit, dict(frame.f_locals)))
        if previous is not None:
            previous(frame, event, arg)

    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(previous)


class _TensorShapes(TorchFunctionMode):
    """Records the shape of every tensor that a torch function returns while it is active."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(value, torch.Tensor):
                self.shapes.append(tuple(value.shape))
        return result


@contextmanager
def record_shapes() -> Iterator[list[tuple[int, ...]]]:
    """The shapes of the tensors that torch functions, methods and operators return inside
    the block: to see whether an answer builds a matrix it was asked to avoid."""
    _warm_up_torch()
    mode = _TensorShapes()
    with mode:
        yield mode.shapes
