"""The shared machinery of the visible checks: a not-started exercise says so in one line,
errors in the student's code reach the hint written for them, and a failed check shows its
message and the student's own lines, never the checker's source."""

from __future__ import annotations

import linecache

import pytest

from helpers.checks import CheckFailed, NotDone, call, exercise
from helpers.checks import lesson02


def not_started(*args, **kwargs):
    raise NotImplementedError()


def student_code(source: str, name: str):
    """A function defined in a notebook cell: ipykernel names the cell's file like this and
    puts its source in ``linecache``."""
    filename = "/tmp/ipykernel_4242/2718281828.py"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]


def test_a_not_started_exercise_is_one_line_that_names_it():
    with pytest.raises(NotDone) as failure:
        lesson02.dot_scores(student_code("def dot_scores(q, k):\n    raise NotImplementedError()\n",
                                         "dot_scores"))
    message = str(failure.value)
    assert "dot_scores is not done yet" in message and "\n" not in message
    assert failure.value.__cause__ is None and failure.value.__suppress_context__
    assert failure.value._render_traceback_()[-1].endswith(message)
    assert len(failure.value._render_traceback_()) == 1


def test_exercise_passes_other_failures_through():
    @exercise
    def check(answer):
        answer()

    with pytest.raises(ZeroDivisionError):
        check(lambda: 1 / 0)


def test_call_turns_a_runtime_error_into_the_hint_and_keeps_the_students_lines():
    wrong = student_code("import torch\n\ndef scores(q, k):\n    return q @ k\n", "scores")
    import torch

    with pytest.raises(CheckFailed) as failure:
        call(wrong, torch.zeros(2, 3), torch.zeros(2, 3), name="scores(q, k)",
             hint="transpose k")
    assert "scores(q, k) raised RuntimeError" in str(failure.value)
    assert str(failure.value).endswith("transpose k")
    rendered = "\n".join(failure.value._render_traceback_())
    assert "ipykernel_4242" in rendered and "return q @ k" in rendered
    assert "helpers/checks" not in rendered and "site-packages" not in rendered


def test_call_lets_not_implemented_through_for_the_exercise_wrapper():
    with pytest.raises(NotImplementedError):
        call(not_started, name="f()", hint="never shown")


def test_a_failed_check_shows_its_message_not_the_checkers_source():
    def forgot_the_scale(q, k, v, mask=None, scale=None):
        weights = (q @ k.transpose(-2, -1)).softmax(-1)
        return weights @ v, weights

    with pytest.raises(CheckFailed) as failure:
        lesson02.attention(forgot_the_scale)
    rendered = failure.value._render_traceback_()
    assert rendered == [f"\x1b[31mCheckFailed\x1b[0m: {failure.value}"]
    assert "√d_k" in str(failure.value)


def test_hidden_failures_render_their_message_only():
    from helpers.hidden import _core

    error = _core.HiddenTestFailed("attention, seed 7: max |difference| 0.3 exceeds 1e-05")
    assert error._render_traceback_() == [f"HiddenTestFailed: {error}"]
