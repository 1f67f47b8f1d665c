"""`attention-course release` and `check` through the command line, as an instructor runs
them: release writes both notebooks from the script, check exits 0 on a clean course and 1,
naming the file, on drift, leaks and a notebook that does not run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from helpers.course.lessons import find_lessons
from helpers.course.release import solution_notebook
from helpers.course.source import build_notebook

from conftest import lesson_named

LESSON = lesson_named("02")


@pytest.fixture
def course(tmp_path) -> Path:
    """A course folder holding one lesson, as a fork would."""
    for folder in ("solutions", "notebooks"):
        shutil.copytree(LESSON.root / folder / LESSON.name, tmp_path / folder / LESSON.name)
    shutil.copy2(LESSON.root / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def cli(course: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ATTENTION_COURSE_ROOT=str(course))
    return subprocess.run([sys.executable, "-m", "helpers.course.cli", *args], cwd=course,
                          env=env, capture_output=True, text=True)


def test_release_writes_both_notebooks_from_the_script(course):
    lesson = find_lessons(course)[0]
    lesson.script.write_text(lesson.script.read_text().replace(
        "# # Lesson 02 — Queries, keys and values", "# # Lesson 02 — Queries, keys, values", 1))
    lesson.solution.unlink()
    result = cli(course, "release", "02")
    assert result.returncode == 0, result.stderr
    assert f"wrote {lesson.solution}" in result.stdout and f"wrote {lesson.student}" in result.stdout
    assert nbformat.writes(nbformat.read(lesson.solution, as_version=4)) == \
        nbformat.writes(solution_notebook(lesson))  # the script, with the Colab install source
    student = nbformat.read(lesson.student, as_version=4)
    assert student.cells[0].source.startswith("# Lesson 02 — Queries, keys, values")
    assert not any("### BEGIN SOLUTION" in cell.source for cell in student.cells)
    assert cli(course, "check", "--no-execute").returncode == 0


def test_check_exit_codes_name_the_problem(course):
    clean = cli(course, "check")  # with execution: the student notebook runs to its first exercise
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "every student notebook runs up to its first exercise" in clean.stdout

    lesson = find_lessons(course)[0]
    student = nbformat.read(lesson.student, as_version=4)
    answer = next(c for c in build_notebook(lesson.script).cells
                  if c.metadata.get("nbgrader", {}).get("solution"))
    secret = answer.source.split("### BEGIN SOLUTION")[1].splitlines()[1]
    student.cells[-1].source += "\n" + secret
    nbformat.write(student, lesson.student)
    leaked = cli(course, "check", "--no-execute")
    assert leaked.returncode == 1
    assert f"{lesson.student}: leaks" in leaked.stdout and secret.strip() in leaked.stdout


def test_check_fails_when_a_student_notebook_does_not_run(course):
    lesson = find_lessons(course)[0]
    student = nbformat.read(lesson.student, as_version=4)
    imports = next(c for c in student.cells if c.id == "imports")
    imports.source += "\nraise RuntimeError('a broken import cell')"
    nbformat.write(student, lesson.student)
    broken = cli(course, "check")
    assert broken.returncode == 1
    assert "does not run up to its first exercise" in broken.stdout
    assert "a broken import cell" in broken.stdout
