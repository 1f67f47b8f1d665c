"""Shared fixtures: the course root and its lessons."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers.course.lessons import find_lessons

ROOT = Path(__file__).resolve().parents[1]
LESSONS = find_lessons(ROOT)

# Notebook kernels and grading children inherit these. Warnings on stderr would zero a test
# cell. Tests run in parallel processes (pytest -n 2), each starting kernels: one thread each
# keeps PyTorch's spinning worker threads from fighting over the cores.
os.environ.setdefault("PYTHONWARNINGS", "ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def lesson_named(number: str):
    """The lesson whose name starts with ``number`` (``"02"`` -> ``02_qkv_attention``)."""
    return next(lesson for lesson in LESSONS if lesson.name.startswith(number + "_"))


def solution_namespace(number: str) -> dict:
    """A lesson's ``imports`` cell and every answer cell, run: the reference solutions that
    the checks' tests hold the visible and hidden checks against."""
    from helpers.course.source import build_notebook

    lesson = lesson_named(number)
    namespace: dict = {}
    for cell in build_notebook(lesson.script).cells:
        if cell.id == "imports" or cell.metadata.get("nbgrader", {}).get("solution"):
            exec(compile(cell.source, f"{lesson.script.name}:{cell.id}", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def solution(request) -> dict:
    """The reference answers of the lesson named by the test module's ``LESSON``."""
    return solution_namespace(request.module.LESSON)


@pytest.fixture(scope="module")
def hidden(request):
    """A private copy of the hidden tests of the test module's ``LESSON``."""
    from helpers.hidden import lesson

    return lesson(request.module.LESSON)


def expect_hidden_failure(run, kind: str = "HiddenTestFailed") -> AssertionError:
    """Run a hidden test and require it to fail with ``kind`` (or a subclass).

    A hidden module is a private copy of ``helpers``, so its exception classes are not the
    ones a test could import: they are matched by name along the class hierarchy.
    """
    with pytest.raises(AssertionError) as failure:
        run()
    assert kind in [cls.__name__ for cls in type(failure.value).__mro__], failure.value
    return failure.value


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None):
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds
    (or as soon as ``process`` has exited), naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"the lab exited ({process.returncode}) while waiting for {what}:\n{output}")
        time.sleep(0.2)
    pytest.fail(f"gave up waiting {timeout:.0f} s for {what}")


def shared_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that ``build(folder)`` fills once per test run, even when pytest-xdist spreads
    the tests that need it over several workers: the others wait and reuse it. (xdist's
    ``loadgroup`` does not keep a group on one worker under pytest 9.)"""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    folder = base / name
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".done").touch()
    return folder
