"""Hidden tests, one module per lesson, used only by the autograder.

A hidden test cell reloads this package first, so a student cell that replaced anything
here cannot change what is graded::

    import importlib, helpers.hidden
    importlib.reload(helpers.hidden).lesson("02").softmax(softmax)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from types import ModuleType

import torch

from helpers.hidden._core import fresh_import


def _keeping_random_state(test: Callable) -> Callable:
    """Run a hidden test without touching torch's global random state, so that the lesson's
    experiments after it draw the same numbers with or without the hidden tests."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return test(*args, **kwargs)
    return run


def lesson(number: str) -> ModuleType:
    """A private copy of ``helpers.hidden.lessonNN`` and of everything it imports, whose
    tests leave the global random state as they found it."""
    module = fresh_import(f"helpers.hidden.lesson{number}")
    for name, value in vars(module).items():
        if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_"):
            setattr(module, name, _keeping_random_state(value))
    return module
