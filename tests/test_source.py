"""The lesson script format: what it turns into, and how it reports mistakes."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from helpers.course.source import SourceError, build_notebook

from conftest import LESSONS

SCRIPT = '''# %% [markdown]
# # Title
#
# Text with $x^2$.

# %%
import math

# %% solution id=double
def double(x):
    ### BEGIN SOLUTION
    return 2 * x
    ### END SOLUTION

# %% tests id=double-tests points=3
assert double(2) == 4
'''


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "07_demo.py"
    path.write_text(text)
    return path


def test_cells_kinds_and_nbgrader_metadata(tmp_path):
    notebook = build_notebook(write(tmp_path, SCRIPT))
    nbformat.validate(notebook)
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds == ["markdown", "code", "code", "code"]
    assert notebook.cells[0].source == "# Title\n\nText with $x^2$."
    answer, tests = notebook.cells[2].metadata.nbgrader, notebook.cells[3].metadata.nbgrader
    assert (answer.solution, answer.grade, answer.locked, answer.grade_id) == (True, False, False, "double")
    assert (tests.solution, tests.grade, tests.locked, tests.points) == (False, True, True, 3)
    assert "nbgrader" not in notebook.cells[1].metadata
    assert all(cell.get("outputs", []) == [] for cell in notebook.cells)


def test_build_is_deterministic_with_stable_ids(tmp_path):
    path = write(tmp_path, SCRIPT)
    first, second = nbformat.writes(build_notebook(path)), nbformat.writes(build_notebook(path))
    assert first == second
    ids = [cell.id for cell in build_notebook(path).cells]
    assert ids == ["07-000", "07-001", "double", "double-tests"]


@pytest.mark.parametrize("text, message", [
    ("# %% tests id=x\npass\n", "needs points=N"),
    ("# %% solution\npass\n", "needs id=NAME"),
    ("# %% sideways\npass\n", "unknown cell header word 'sideways'"),
    ("# %% [markdown]\nnot a comment\n", "markdown lines must start with '# '"),
    ("x = 1\n# %%\n", "text before the first"),
    ("# %% solution id=a\n# %% tests id=a points=1\n", "cell id 'a' is used twice"),
])
def test_mistakes_name_the_file_and_line(tmp_path, text, message):
    with pytest.raises(SourceError, match=message) as error:
        build_notebook(write(tmp_path, text))
    assert "07_demo.py:" in str(error.value)


def test_missing_script_names_the_path(tmp_path):
    with pytest.raises(SourceError, match="lesson source not found: .*nowhere.py"):
        build_notebook(tmp_path / "nowhere.py")


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda lesson: lesson.name)
def test_every_lesson_has_four_graded_exercises(lesson):
    notebook = build_notebook(lesson.script)
    tests = [cell.metadata.nbgrader for cell in notebook.cells
             if cell.metadata.get("nbgrader", {}).get("grade")]
    answers = [cell for cell in notebook.cells if cell.metadata.get("nbgrader", {}).get("solution")]
    assert len(tests) >= 4 and len(answers) >= 4
    assert all(meta.points > 0 for meta in tests)
    for cell in answers:
        assert "### BEGIN SOLUTION" in cell.source, f"answer cell {cell.id} has no solution region"
