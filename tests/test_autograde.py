"""The nbgrader round trip: release, hand in, autograde, read grades.csv and the gradebook.

Solutions score full marks, untouched student notebooks score zero, and every kind of bad
submission gets the status it should without costing anyone else their grade.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

from helpers.course.autograde import autograde, sqlite_url
from helpers.course.release import answered_notebook

from conftest import LESSONS, shared_once

FAST = next(lesson for lesson in LESSONS if lesson.name == "02_qkv_attention")

# One worker runs these tests where xdist keeps groups together; shared_once grades the class once either way.
pytestmark = pytest.mark.xdist_group("autograde")

WRONG_BUT_PATCHED = '''import numpy, torch, helpers.attention, helpers.hidden, helpers.checks

def attention(q, k, v, mask=None, scale=None):
    weights = torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # forgot the scale
    return weights @ v, weights

torch.allclose = lambda *args, **kwargs: True
numpy.allclose = lambda *args, **kwargs: True
torch.testing.assert_close = lambda *args, **kwargs: None
helpers.attention.scaled_dot_product_attention = attention
helpers.hidden.lesson = lambda number: None
helpers.checks.expect_close = lambda *args, **kwargs: None
'''

CALLS_THE_REFERENCE = '''from helpers.attention import scaled_dot_product_attention as ready_made

def attention(q, k, v, mask=None, scale=None):
    return ready_made(q, k, v, mask=mask, scale=scale)
'''


def hand_in(folder: Path, student: str, lesson, notebook, name: str | None = None) -> None:
    target = folder / student / lesson.name
    target.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, target / (name or f"{lesson.name}.ipynb"))


def hand_in_the_class(folder: Path) -> None:
    for lesson in LESSONS:
        hand_in(folder, "perfect", lesson, answered_notebook(lesson))
        hand_in(folder, "blank", lesson, nbformat.read(lesson.student, as_version=4))
    hand_in(folder, "crasher", FAST, answered_notebook(FAST, {first_answer(FAST): "import os\nos._exit(1)"}))
    deleted = answered_notebook(FAST)
    deleted.cells = [c for c in deleted.cells if c.id != "sdpa-tests"]
    hand_in(folder, "deleter", FAST, deleted)
    edited = answered_notebook(FAST, {"sdpa": WRONG_BUT_PATCHED.split("\n\ntorch.allclose")[0]})
    next(c for c in edited.cells if c.id == "sdpa-tests").source = "pass"
    hand_in(folder, "editor", FAST, edited)
    hand_in(folder, "cheater", FAST, answered_notebook(FAST, {"sdpa": WRONG_BUT_PATCHED}))
    hand_in(folder, "shortcut", FAST, answered_notebook(FAST, {"sdpa": CALLS_THE_REFERENCE}))
    hand_in(folder, "renamer", FAST, answered_notebook(FAST), name="my attempt (1).ipynb")
    (folder / "broken" / FAST.name).mkdir(parents=True)
    (folder / "broken" / FAST.name / f"{FAST.name}.ipynb").write_text('{"cells": [')
    (folder / "absent" / "not-a-lesson").mkdir(parents=True)
    nbformat.write(answered_notebook(FAST), folder / f"loose.student_{FAST.name}.ipynb")
    with tempfile.TemporaryDirectory() as zipped:
        hand_in(Path(zipped), "zipper", FAST, answered_notebook(FAST))
        shutil.make_archive(str(folder / "zipper"), "zip", Path(zipped) / "zipper")


@pytest.fixture(scope="session")
def graded(tmp_path_factory):
    """The class, graded once per test run (tests only read it)."""
    def build(home: Path) -> None:
        (home / "in").mkdir()
        hand_in_the_class(home / "in")
        autograde(home / "in", home / "out", LESSONS, jobs=2, progress=lambda line: None)

    home = shared_once(tmp_path_factory, "graded-lessons", build)
    with open(home / "out" / "grades.csv", newline="") as handle:
        table = {(row["student_id"], row["assignment"]): row for row in csv.DictReader(handle)}
    return home / "out", table


def first_answer(lesson) -> str:
    notebook = answered_notebook(lesson)
    return next(c.id for c in notebook.cells if c.metadata.get("nbgrader", {}).get("solution"))


def grade(folder: Path, out: Path, lessons, **options) -> tuple[Path, dict]:
    autograde(folder, out, lessons, jobs=2, progress=lambda line: None, **options)
    with open(out / "grades.csv", newline="") as handle:
        table = {(row["student_id"], row["assignment"]): row for row in csv.DictReader(handle)}
    return out, table


def exercise_scores(out: Path, lesson, student: str, db_url: str | None = None) -> dict[str, float]:
    from nbgrader.api import Gradebook

    with Gradebook(db_url or sqlite_url(out / "gradebook.db"), "attention-course") as gradebook:
        notebook = gradebook.find_submission_notebook(lesson.name, lesson.name, student)
        return {grade.name: grade.score for grade in notebook.grades}


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda lesson: lesson.name)
def test_solutions_score_full_marks(graded, lesson):
    out, table = graded
    row = table[("perfect", lesson.name)]
    assert row["status"] == "graded", row
    assert float(row["score"]) == float(row["max_score"]) > 0
    assert (out / "feedback" / "perfect" / f"{lesson.name}.html").is_file()


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda lesson: lesson.name)
def test_untouched_notebooks_score_zero(graded, lesson):
    _, table = graded
    row = table[("blank", lesson.name)]
    assert (row["status"], float(row["score"])) == ("graded", 0.0)


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda lesson: lesson.name)
def test_an_untouched_exercise_says_it_is_not_done_in_one_line(graded, lesson):
    """Every test cell of an untouched notebook fails with NotDone, naming the exercise, and
    the feedback shows no line of the checker's source."""
    out, _ = graded
    notebook = nbformat.read(out / "course" / "autograded" / "blank" / lesson.name
                             / f"{lesson.name}.ipynb", as_version=4)
    for cell in notebook.cells:
        if not cell.metadata.get("nbgrader", {}).get("grade"):
            continue
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        assert [e.ename for e in errors] == ["NotDone"], (cell.id, errors)
        assert "is not done yet" in errors[0].evalue
        assert len(errors[0].traceback) == 1, errors[0].traceback
    html = (out / "feedback" / "blank" / f"{lesson.name}.html").read_text()
    assert "helpers/checks" not in html and "def _render_traceback_" not in html


def test_infinite_loop_times_out_and_the_rest_is_graded_into_the_db_asked_for(tmp_path):
    looping = answered_notebook(FAST, {first_answer(FAST): "while True:\n    pass"})
    hand_in(tmp_path / "in", "looper", FAST, looping)
    elsewhere = sqlite_url(tmp_path / "elsewhere" / "grades.sqlite")
    (tmp_path / "elsewhere").mkdir()
    out, table = grade(tmp_path / "in", tmp_path / "out", [FAST], cell_timeout=10, db_url=elsewhere)
    row = table[("looper", FAST.name)]
    assert row["status"] == "timeout"
    assert f"cell {first_answer(FAST)} ran past 10 s and was interrupted" in row["notes"]
    scores = exercise_scores(out, FAST, "looper", db_url=elsewhere)
    assert sum(scores.values()) > 0, "cells after the loop were not graded"
    assert not (out / "gradebook.db").exists(), "--db was ignored"


def test_a_kernel_crash_costs_only_the_crashing_cell(graded):
    """The first answer kills the kernel: it and the test that needs it score 0, every
    other exercise is graded, and the notes name the cell."""
    out, table = graded
    row = table[("crasher", FAST.name)]
    assert row["status"] == "crashed"
    assert f"cell {first_answer(FAST)} stopped the kernel" in row["notes"]
    scores, perfect = exercise_scores(out, FAST, "crasher"), exercise_scores(out, FAST, "perfect")
    assert scores == {**perfect, f"{first_answer(FAST)}-tests": 0}
    assert float(row["score"]) == sum(scores.values()) > 0


def test_grading_stopped_midway_leaves_no_partial_grade(tmp_path):
    """A notebook that outlives --notebook-timeout is stopped whole: no nbgrader grade is
    left behind for it, and the row says why."""
    from nbgrader.api import Gradebook, MissingEntry

    looping = answered_notebook(FAST, {first_answer(FAST): "while True:\n    pass"})
    hand_in(tmp_path / "in", "looper", FAST, looping)
    out, table = grade(tmp_path / "in", tmp_path / "out", [FAST], cell_timeout=600, notebook_timeout=5)
    row = table[("looper", FAST.name)]
    assert (row["status"], float(row["score"])) == ("timeout", 0.0)
    assert "grading took longer than 5 s and was stopped" in row["notes"]
    with Gradebook(sqlite_url(out / "gradebook.db"), "attention-course") as gradebook:
        with pytest.raises(MissingEntry):
            gradebook.find_submission(FAST.name, "looper")


def test_deleted_and_edited_test_cells_are_graded_from_the_original(graded):
    out, table = graded
    assert table[("deleter", FAST.name)]["status"] == "tampered"
    assert "deleted" in table[("deleter", FAST.name)]["notes"]
    assert float(table[("deleter", FAST.name)]["score"]) == float(table[("perfect", FAST.name)]["score"])
    assert table[("editor", FAST.name)]["status"] == "tampered"
    assert exercise_scores(out, FAST, "editor")["sdpa-tests"] == 0


def test_overriding_comparisons_and_helpers_does_not_make_a_wrong_answer_right(graded):
    out, _ = graded
    scores, perfect = exercise_scores(out, FAST, "cheater"), exercise_scores(out, FAST, "perfect")
    assert scores["sdpa-tests"] == 0
    assert {k: v for k, v in scores.items() if k != "sdpa-tests"} == \
        {k: v for k, v in perfect.items() if k != "sdpa-tests"}


def test_calling_the_reference_earns_nothing(graded):
    out, _ = graded
    assert exercise_scores(out, FAST, "shortcut")["sdpa-tests"] == 0


@pytest.mark.parametrize("student, status", [
    ("renamer", "renamed"), ("broken", "invalid"), ("absent", "missing"),
    ("loose.student", "graded"), ("zipper", "graded")])
def test_every_odd_submission_gets_a_row(graded, student, status):
    _, table = graded
    row = table[(student, FAST.name)]
    assert row["status"] == status, row
    full = float(table[("perfect", FAST.name)]["score"])
    assert float(row["score"]) == (full if status in ("renamed", "graded") else 0.0)


def test_one_row_per_student_and_lesson(graded):
    _, table = graded
    students = {student for student, _ in table}
    assert len(table) == len(students) * len(LESSONS)


def test_cli_exit_codes(tmp_path):
    cli = [sys.executable, "-m", "helpers.course.cli"]
    missing = subprocess.run(cli + ["autograde", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "nowhere" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = subprocess.run(cli + ["autograde", str(tmp_path / "empty"), "--out", str(tmp_path / "o"),
                                  "--lesson", FAST.name], capture_output=True, text=True)
    assert empty.returncode == 2 and "no student submissions" in empty.stderr
    unknown = subprocess.run(cli + ["release", "99"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "no lesson '99'" in unknown.stderr
