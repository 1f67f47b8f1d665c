"""Autograde a folder of submissions with nbgrader: one gradebook, students in parallel,
one row per student and lesson in ``grades.csv``, HTML feedback for each.

Each (student, lesson) is graded in a child process of its own, so a submission that loops,
crashes the kernel or breaks nbgrader never touches another student's grade. The gradebook
is SQLite in the output folder unless a SQLAlchemy URL is given; SQLite takes one writer at
a time, so the children wait for its lock (a long busy timeout) instead of failing.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nbformat

from helpers.course.lessons import Lesson, nbgrader_api, nbgrader_failure
from helpers.course.source import build_notebook, write_notebook
from helpers.course.submissions import Submission, collect, inspect

CSV_COLUMNS = ["student_id", "assignment", "score", "max_score", "status", "notes"]


@dataclass
class Row:
    """One line of ``grades.csv``."""

    student_id: str
    assignment: str
    score: float
    max_score: float
    status: str
    notes: str

    def as_dict(self) -> dict[str, object]:
        return {"student_id": self.student_id, "assignment": self.assignment,
                "score": round(self.score, 4), "max_score": self.max_score,
                "status": self.status, "notes": self.notes}


def sqlite_url(path: Path) -> str:
    """A SQLite URL whose writers wait up to two minutes for the lock."""
    return f"sqlite:///{path.resolve()}?timeout=120"


def prepare_course(course: Path, db_url: str, lessons: list[Lesson]) -> dict[str, nbformat.NotebookNode]:
    """Put the lessons in nbgrader's ``source/`` and record them in the gradebook.

    Returns the released (student) notebook of each lesson, to compare submissions with.
    """
    api = nbgrader_api(course, db_url, cell_timeout=60)
    released = {}
    for lesson in lessons:
        write_notebook(build_notebook(lesson.script), course / "source" / lesson.name / f"{lesson.name}.ipynb")
        result = api.generate_assignment(lesson.name)
        if not result["success"]:
            raise RuntimeError(nbgrader_failure(f"set up {lesson.name}", result))
        released[lesson.name] = nbformat.read(course / "release" / lesson.name / f"{lesson.name}.ipynb", as_version=4)
    return released


def grade_one(course: Path, db_url: str, lesson: str, student: str, cell_timeout: int) -> dict:
    """Autograde one student's lesson and write its feedback (runs in a child process)."""
    api = nbgrader_api(course, db_url, cell_timeout)
    result = api.autograde(lesson, student)
    if not result["success"]:
        return {"success": False, "error": result.get("error") or "", "log": result.get("log") or ""}
    feedback = api.generate_feedback(lesson, student)
    return {"success": True, "feedback": bool(feedback["success"]),
            "error": "" if feedback["success"] else (feedback.get("error") or "")}


def _run_child(course: Path, db_url: str, submission: Submission, cell_timeout: int,
               notebook_timeout: int, threads: int) -> dict:
    """Grade in a child process group, killed whole if it outlives ``notebook_timeout``.

    Each child's kernel gets ``threads`` CPU threads, so parallel graders share the cores
    instead of oversubscribing them (PyTorch's idle threads spin and slow everyone down).
    """
    command = [sys.executable, "-m", "helpers.course.autograde", str(course), db_url,
               submission.lesson, submission.student_id, str(cell_timeout)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, start_new_session=True)
    try:
        out, err = child.communicate(timeout=notebook_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return {"success": False, "killed": True, "error": f"grading took longer than {notebook_timeout} s"}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        return {"success": False, "error": (err or out)[-4000:], "log": err}
    return json.loads(lines[-1])


def _scores(db_url: str, lesson: str, student: str) -> tuple[float, float] | None:
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(db_url, "attention-course") as gradebook:
        try:
            submission = gradebook.find_submission(lesson, student)
        except MissingEntry:
            return None
        return float(submission.score), float(submission.max_score)


def _max_score(db_url: str, lesson: str) -> float:
    from nbgrader.api import Gradebook

    with Gradebook(db_url, "attention-course") as gradebook:
        return float(gradebook.find_assignment(lesson).max_score)


def _add_students(db_url: str, students: set[str]) -> None:
    """Create every student up front: two children grading one student's lessons at once
    would otherwise both try to add the student, and one would fail."""
    from nbgrader.api import Gradebook

    with Gradebook(db_url, "attention-course") as gradebook:
        for student in sorted(students):
            gradebook.update_or_create_student(student)


def _forget(db_url: str, lesson: str, student: str) -> None:
    """Remove a submission whose grading failed, so no partial grade is left behind."""
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(db_url, "attention-course") as gradebook:
        try:
            gradebook.remove_submission(lesson, student)
        except MissingEntry:
            pass


def _timeouts(course: Path, lesson: str, student: str) -> list[str]:
    graded = course / "autograded" / student / lesson / f"{lesson}.ipynb"
    if not graded.is_file():
        return []
    notebook = nbformat.read(graded, as_version=4)
    return [cell.get("id", "?") for cell in notebook.cells if cell.cell_type == "code"
            and any(out.get("ename") == "CellTimeoutError" for out in cell.get("outputs", []))]


def _grade(course: Path, db_url: str, submission: Submission, released: nbformat.NotebookNode,
           cell_timeout: int, notebook_timeout: int, threads: int, feedback_dir: Path) -> Row:
    """Grade one submission end to end and turn what happened into a row."""
    max_score = _max_score(db_url, submission.lesson)
    notebook = inspect(submission, released) if submission.notebook else None
    if notebook is None:
        return Row(submission.student_id, submission.lesson, 0.0, max_score,
                   "+".join(submission.status), "; ".join(submission.notes))
    target = course / "submitted" / submission.student_id / submission.lesson
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    nbformat.write(notebook, target / f"{submission.lesson}.ipynb")
    outcome = _run_child(course, db_url, submission, cell_timeout, notebook_timeout, threads)
    score = 0.0
    if outcome["success"]:
        score = (_scores(db_url, submission.lesson, submission.student_id) or (0.0, max_score))[0]
        for cell_id in _timeouts(course, submission.lesson, submission.student_id):
            submission.flag("timeout", f"cell {cell_id} ran past {cell_timeout} s and was interrupted")
        html = course / "feedback" / submission.student_id / submission.lesson / f"{submission.lesson}.html"
        if html.is_file():
            (feedback_dir / submission.student_id).mkdir(parents=True, exist_ok=True)
            shutil.copy2(html, feedback_dir / submission.student_id / f"{submission.lesson}.html")
        else:
            submission.notes.append("no feedback could be written: " + outcome.get("error", "")[-300:])
    else:
        _forget(db_url, submission.lesson, submission.student_id)
        log = feedback_dir.parent / "logs" / f"{submission.student_id}-{submission.lesson}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(outcome.get("log", "") + "\n" + outcome.get("error", ""), encoding="utf-8")
        error = outcome.get("log", "") + outcome.get("error", "")
        if outcome.get("killed"):
            submission.flag("timeout", error)
        elif "DeadKernelError" in error or "Kernel died" in error or "kernel died" in error.lower():
            submission.flag("crashed", "the kernel died while running the notebook")
        else:
            submission.flag("failed", f"nbgrader could not grade it (see {log})")
    status = "+".join(submission.status) or "graded"
    return Row(submission.student_id, submission.lesson, score, max_score, status, "; ".join(submission.notes))


def autograde(submissions: Path, out: Path, lessons: list[Lesson], db_url: str | None = None,
              jobs: int = 1, cell_timeout: int = 120, notebook_timeout: int = 1800,
              progress=print) -> tuple[list[Row], list[str]]:
    """Grade every student's notebooks in ``submissions``; write ``out/grades.csv`` and
    ``out/feedback/<student>/<lesson>.html``. Returns the rows and warnings about files."""
    out.mkdir(parents=True, exist_ok=True)
    course = out / "course"
    db_url = db_url or sqlite_url(out / "gradebook.db")
    released = prepare_course(course, db_url, lessons)
    scratch = out / "unpacked"
    shutil.rmtree(scratch, ignore_errors=True)
    found, warnings = collect(submissions, [lesson.name for lesson in lessons], scratch)
    _add_students(db_url, {submission.student_id for submission in found})
    feedback_dir = out / "feedback"
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    started = time.monotonic()

    def grade(submission: Submission) -> Row:
        row = _grade(course, db_url, submission, released[submission.lesson], cell_timeout,
                     notebook_timeout, threads, feedback_dir)
        progress(f"  {row.student_id:<20} {row.assignment:<28} {row.score:g}/{row.max_score:g}  {row.status}")
        return row

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        rows = list(pool.map(grade, found))
    with open(out / "grades.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(row.as_dict() for row in rows)
    progress(f"graded {len(rows)} notebooks of {len({r.student_id for r in rows})} students "
             f"in {time.monotonic() - started:.0f} s")
    return rows, warnings


def summary_table(rows: list[Row]) -> str:
    """A plain-text table: one line per student, a column per lesson, and the total."""
    lessons = sorted({row.assignment for row in rows})
    students = sorted({row.student_id for row in rows})
    cell = {(row.student_id, row.assignment): row for row in rows}
    header = ["student"] + [name.split("_")[0] for name in lessons] + ["total", "status"]
    lines = [header]
    for student in students:
        mine = [cell[(student, lesson)] for lesson in lessons if (student, lesson) in cell]
        problems = sorted({part for row in mine for part in row.status.split("+") if part != "graded"})
        lines.append([student] + [f"{cell[(student, lesson)].score:g}/{cell[(student, lesson)].max_score:g}"
                                  if (student, lesson) in cell else "-" for lesson in lessons]
                     + [f"{sum(r.score for r in mine):g}/{sum(r.max_score for r in mine):g}",
                        ",".join(problems) or "ok"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
                     for line in lines)


if __name__ == "__main__":
    course_arg, db_arg, lesson_arg, student_arg, timeout_arg = sys.argv[1:6]
    print(json.dumps(grade_one(Path(course_arg), db_arg, lesson_arg, student_arg, int(timeout_arg))))
