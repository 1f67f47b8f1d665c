"""Every solution notebook runs top to bottom; every student notebook runs up to its first
exercise; notebooks/ is exactly what the release makes of solutions/ and leaks nothing."""

from __future__ import annotations

import nbclient
import nbformat
import pytest

from helpers.course.release import check, leaks, run_until_first_exercise
from helpers.course.source import build_notebook

from conftest import LESSONS


# Run before a lesson: torch on two threads, as on a 2-core laptop (the suite's kernels start
# on one), and a record of the thread count at every optimizer step of the lesson.
THREAD_PROBE = """import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
torch.set_num_threads(2)
_threads_at_steps = []
register_optimizer_step_pre_hook(
    lambda optimizer, args, kwargs: _threads_at_steps.append(torch.get_num_threads()))"""
THREAD_REPORT = "print('threads at optimizer steps:', sorted(set(_threads_at_steps)))"


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda lesson: lesson.name)
def test_solution_runs_top_to_bottom(lesson):
    notebook = build_notebook(lesson.script)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(THREAD_PROBE, id="thread-probe"))
    notebook.cells.append(nbformat.v4.new_code_cell(THREAD_REPORT, id="thread-report"))
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(lesson.script.parent)}})
    client.execute()
    for cell in notebook.cells:
        if cell.metadata.get("nbgrader", {}).get("grade"):
            stderr = [o for o in cell.get("outputs", []) if o.get("name") == "stderr"]
            assert not stderr, f"test cell {cell.id} writes to stderr (nbgrader scores it 0): {stderr}"
    # Training tiny models on several threads is slower, and on a busy machine ten times so:
    # every lesson that trains chooses one thread, for the lesson or around its training.
    report = "".join(output.get("text", "") for output in notebook.cells[-1].outputs)
    assert report.strip() in ("threads at optimizer steps: []",
                              "threads at optimizer steps: [1]"), \
        (f"{lesson.name}: {report.strip()}: call torch.set_num_threads(1) in the imports cell, "
         "or train inside helpers.device.one_cpu_thread()")


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda lesson: lesson.name)
def test_student_notebook_runs_up_to_its_first_exercise(lesson):
    assert run_until_first_exercise(lesson.student) is None


def test_notebooks_are_released_from_solutions_and_leak_nothing():
    assert check(LESSONS, execute=False) == []


def test_committed_notebooks_have_no_outputs():
    for lesson in LESSONS:
        for path in (lesson.solution, lesson.student):
            notebook = nbformat.read(path, as_version=4)
            for cell in notebook.cells:
                assert not cell.get("outputs") and cell.get("execution_count") is None, \
                    f"{path}: cell {cell.id} has a stale output"


def test_leak_check_finds_a_solution_line():
    lesson = LESSONS[0]
    solution = build_notebook(lesson.script)
    student = nbformat.read(lesson.student, as_version=4)
    answer = next(c for c in solution.cells if c.metadata.get("nbgrader", {}).get("solution"))
    secret = answer.source.split("### BEGIN SOLUTION")[1].split("### END SOLUTION")[0].strip().splitlines()[0]
    student.cells[-1].source += "\n" + secret
    assert any(secret.strip() in leak for leak in leaks(solution, student))
    assert leaks(solution, nbformat.read(lesson.student, as_version=4)) == []


def test_check_reports_drift(tmp_path, monkeypatch):
    import shutil

    from helpers.course.lessons import find_lessons

    for folder in ("solutions", "notebooks"):
        shutil.copytree(LESSONS[0].root / folder / LESSONS[0].name, tmp_path / folder / LESSONS[0].name)
    shutil.copy(LESSONS[0].root / "pyproject.toml", tmp_path)  # it holds the install source
    lesson = find_lessons(tmp_path)[0]
    lesson.script.write_text(lesson.script.read_text() + "\n# %%\nprint('a new cell')\n")
    problems = check([lesson], execute=False)
    assert any("differs from" in p for p in problems)
    assert any("is not what the release makes" in p for p in problems)
