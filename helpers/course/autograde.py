"""Autograde a folder of submissions with nbgrader, on one machine or on a Dask cluster.

1. Each lesson is released into a template gradebook (cached by the lesson's version) and
   recorded in the real gradebook (SQLite in DIR, or ``--db`` such as PostgreSQL).
2. Every file under SUBMISSIONS is read (:mod:`helpers.course.submissions`): a notebook
   chosen for a (student, lesson), or a line of ``DIR/manifest.csv`` saying why not.
3. A submission whose notebook, lesson and settings are unchanged since it was last graded
   into this gradebook is not graded again (``force`` re-grades); identical notebooks are
   graded once.
4. Each (student, lesson) is a task (:mod:`helpers.course.grading`) run by a local pool of
   ``jobs`` child processes, or by the workers of a Dask cluster (``scheduler``).
5. As results arrive, this process alone writes DIR and the gradebook; ``grades.csv`` and
   ``students.csv`` are then written from the gradebook, so partial runs merge.
6. ``DIR/course/nbgrader_config.py`` tells nbgrader's formgrader where the course and its
   gradebook are (:mod:`helpers.course.formgrader`).
"""

from __future__ import annotations

import csv
import hashlib
import html
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from tqdm import tqdm

from helpers.course.formgrader import DB_VARIABLE, without_password, write_course_config
from helpers.course.gradebook import CSV_COLUMNS, Gradebook, Row, database_url, shown, sqlite_url
from helpers.course.grading import GradingResult, GradingTask, course_digest, cores_here, grade_task
from helpers.course.lessons import CourseError, Lesson, find_lessons, nbgrader_api, nbgrader_failure
from helpers.course.source import build_notebook, write_notebook
from helpers.course.submissions import (Catalog, Collection, Entry, LessonPrint, Roster, Submission,
                                        collect, prepare)

__all__ = ["CSV_COLUMNS", "Row", "autograde", "sqlite_url", "summary_table"]


@dataclass
class Prepared:
    """A lesson ready to grade: its released notebook and a gradebook template holding it."""

    name: str
    version: str
    released: nbformat.NotebookNode
    template: bytes
    max_score: float
    print: LessonPrint


def lesson_version(lesson: Lesson) -> str:
    """Changes when the lesson's notebook or anything in the installed course changes."""
    source = nbformat.writes(build_notebook(lesson.script))
    return hashlib.sha256((source + course_digest()).encode()).hexdigest()[:32]


def template_cache() -> Path:
    """Where released lessons are kept between runs: ``$ATTENTION_COURSE_CACHE``, else the
    user's cache folder. A template depends only on the lesson's version."""
    base = os.environ.get("ATTENTION_COURSE_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attention-course" / "templates"


def _template(lesson: Lesson, version: str, cache: Path) -> Path:
    """A scratch nbgrader course with the lesson released into its own SQLite gradebook."""
    folder = cache / f"{lesson.name}-{version[:16]}"
    if (folder / "gradebook.db").is_file():
        return folder
    partial = cache / f".{folder.name}-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(partial, ignore_errors=True)
    write_notebook(build_notebook(lesson.script), partial / "source" / lesson.name / f"{lesson.name}.ipynb")
    result = nbgrader_api(partial, sqlite_url(partial / "gradebook.db")).generate_assignment(lesson.name)
    if not result["success"]:
        shutil.rmtree(partial, ignore_errors=True)
        raise CourseError(nbgrader_failure(f"set up {lesson.name}", result))
    try:
        partial.rename(folder)
    except OSError:  # another grader made it first
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def prepare_lessons(course: Path, gradebook: Gradebook, lessons: list[Lesson], asked: set[str]) -> dict[str, Prepared]:
    """Release each lesson (cached by version) and make sure the gradebook holds it."""
    from nbgrader.api import Gradebook as NbgraderGradebook

    prepared = {}
    for lesson in lessons:
        version = lesson_version(lesson)
        folder = _template(lesson, version, template_cache())
        with NbgraderGradebook(sqlite_url(folder / "gradebook.db"), "attention-course") as template:
            max_score = float(template.find_assignment(lesson.name).max_score)
        released = nbformat.read(folder / "release" / lesson.name / f"{lesson.name}.ipynb", as_version=4)
        if gradebook.lesson_version(lesson.name) != version:
            with gradebook.lock():
                write_notebook(build_notebook(lesson.script), course / "source" / lesson.name / f"{lesson.name}.ipynb")
                result = nbgrader_api(course, gradebook.url).generate_assignment(lesson.name)
            if not result["success"]:
                raise CourseError(nbgrader_failure(f"record {lesson.name} in the gradebook {shown(gradebook.url)}",
                                                   result))
        gradebook.set_lesson(lesson.name, version, max_score, lesson.name in asked)
        prepared[lesson.name] = Prepared(lesson.name, version, released, (folder / "gradebook.db").read_bytes(),
                                         max_score, LessonPrint.of(lesson.name, released))
    return prepared


def catalog_for(lessons: list[Lesson]) -> Catalog:
    """Every released lesson of the course, not only those graded now, so that a notebook of
    another lesson is named as such rather than lost."""
    everything = find_lessons(lessons[0].root) if lessons else []
    return Catalog([LessonPrint.of(lesson.name, nbformat.read(lesson.student, as_version=4))
                    for lesson in everything if lesson.student.is_file()])


# --- where tasks run ---------------------------------------------------------------------

def run_local(tasks: dict[str, GradingTask], templates: dict[str, bytes],
              jobs: int) -> Iterator[tuple[str, GradingResult]]:
    """Grade on this machine, ``jobs`` child processes at a time; (name, result) as they finish."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(grade_task, task, templates[task.lesson]): name for name, task in tasks.items()}
        for future in as_completed(futures):
            yield futures[future], future.result()


def run_dask(tasks: dict[str, GradingTask], templates: dict[str, bytes],
             address: str) -> Iterator[tuple[str, GradingResult]]:
    """Grade on the workers of the Dask cluster at ``address``; (name, result) as they finish.

    A worker that dies mid-task has its tasks run again elsewhere by the scheduler; each
    task's result arrives here once.
    """
    try:
        from distributed import Client
        from distributed import as_completed as finished
    except ImportError as error:
        raise CourseError("--scheduler needs Dask: pip install 'attention-course[cluster]'") from error
    try:
        client = Client(address, timeout="30s")
    except (OSError, TimeoutError) as error:
        raise CourseError(f"cannot reach the Dask scheduler at {address}: {error}") from error
    with client:
        slots: dict[str, int] = {}
        for worker in client.scheduler_info()["workers"].values():
            slots[worker["host"]] = slots.get(worker["host"], 0) + worker["nthreads"]
        shared = {lesson: client.scatter(template, broadcast=True) for lesson, template in templates.items()}
        futures = {client.submit(grade_task, task, shared[task.lesson], slots, key=task.key, pure=False): name
                   for name, task in tasks.items()}
        for future in finished(futures):
            try:
                result = future.result()
            except Exception as error:  # noqa: BLE001 - e.g. KilledWorker: recorded, the rest goes on
                result = GradingResult(False, error=f"the cluster could not grade it: {type(error).__name__}: {error}")
            yield futures[future], result


# --- writing results ---------------------------------------------------------------------

def _feedback_page(page: str, notes: list[str]) -> str:
    """The feedback with what the grader noticed at the top (its notes, not its paths)."""
    if not notes:
        return page
    items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    banner = (f'<div class="attention-course-notes" style="border:1px solid #c90;padding:0.5em 1em;margin:1em">'
              f"<b>Notes from the grader</b><ul>{items}</ul></div>")
    head, body, rest = page.partition("<body")
    if not body:
        return banner + page
    tag_end = rest.find(">") + 1
    return head + body + rest[:tag_end] + banner + rest[tag_end:]


def _row(submission: Submission, folder: str, result: GradingResult, out: Path, max_score: float,
         cell_timeout: int, identity: list[str]) -> tuple[Row, bool]:
    """Turn a grading result into the student's row and files; True when graded. The
    feedback carries the notes about the notebook; ``identity`` notes go to the row only."""
    lesson = submission.lesson
    feedback = out / "feedback" / folder / f"{lesson}.html"
    if result.success:
        for name in result.crashed:
            submission.flag("crashed", f"cell {name} stopped the kernel: it earns no points, every other "
                                       "cell was graded")
        for name in result.timed_out:
            submission.flag("timeout", f"cell {name} ran past {cell_timeout} s and was interrupted")
        graded = out / "course" / "autograded" / folder / lesson / f"{lesson}.ipynb"
        graded.parent.mkdir(parents=True, exist_ok=True)
        graded.write_text(result.graded, encoding="utf-8")
        if result.feedback:
            feedback.parent.mkdir(parents=True, exist_ok=True)
            shown_notes = [note for note in submission.notes if not note.startswith("from ")]
            feedback.write_text(_feedback_page(result.feedback, shown_notes), encoding="utf-8")
        else:
            submission.notes.append(result.error)
        score = result.score
    else:
        feedback.unlink(missing_ok=True)
        log = out / "logs" / f"{folder}-{lesson}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(result.log + "\n" + result.error, encoding="utf-8")
        if result.killed:
            submission.flag("timeout", result.error)
        elif result.crashed:
            submission.flag("crashed", f"the kernel kept dying (cells {', '.join(result.crashed)}); "
                                       f"see logs/{log.name}")
        else:
            submission.flag("failed", f"nbgrader could not grade it: see logs/{log.name}")
        score = 0.0
    status = "+".join(submission.status) or "graded"
    notes = "; ".join(submission.notes + identity)
    return Row(submission.student_id, lesson, score, max_score, status, notes, folder), result.success


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class Plan:
    """What a run grades: one task per distinct notebook, and who handed each one in."""

    tasks: dict[str, GradingTask] = field(default_factory=dict)  # fingerprint -> task
    owners: dict[str, list[tuple[Submission, str]]] = field(default_factory=dict)  # -> (submission, folder)
    unchanged: int = 0


def _plan(found: Collection, folders: dict[str, str], prepared: dict[str, Prepared], gradebook: Gradebook,
          out: Path, entries: list[Entry], cell_timeout: int, notebook_timeout: int, force: bool,
          threads: int | None) -> Plan:
    """Record what needs no run (invalid notebooks), keep each notebook as nbgrader grades it
    in ``course/submitted/``, skip what is unchanged since it was graded, and make one task
    per distinct notebook for the rest."""
    plan = Plan()
    for submission in found.submissions:
        folder, lesson = folders[submission.student_id], prepared[submission.lesson]
        identity = found.students[submission.student_id].notes
        if any(note.startswith("ambiguous") for note in identity):
            submission.flag("ambiguous", "")
        if submission.content is None:
            digest = hashlib.sha256(submission.notebook.read_bytes()).hexdigest()
            gradebook.record(Row(submission.student_id, lesson.name, 0.0, lesson.max_score,
                                 "+".join(submission.status), "; ".join(submission.notes + identity), folder), digest)
            entries.append(Entry(submission.shown, "graded", "not a valid notebook: scores 0",
                                 submission.student_id, lesson.name))
            continue
        text = nbformat.writes(prepare(submission, lesson.released, lesson.print))
        handed_in = out / "course" / "submitted" / folder / lesson.name / f"{lesson.name}.ipynb"
        handed_in.parent.mkdir(parents=True, exist_ok=True)  # formgrader counts a lesson's submissions here
        handed_in.write_text(text, encoding="utf-8")
        fingerprint = hashlib.sha256(f"{text}\0{lesson.version}\0{cell_timeout}".encode()).hexdigest()
        before = gradebook.stored(folder, lesson.name)
        if not force and before is not None and before.fingerprint == fingerprint \
                and "failed" not in before.status.split("+") \
                and (out / "feedback" / folder / f"{lesson.name}.html").is_file():
            plan.unchanged += 1
            entries.append(Entry(submission.shown, "unchanged", "graded before, unchanged since: not graded again "
                                 "(--force re-grades)", submission.student_id, lesson.name))
            continue
        plan.owners.setdefault(fingerprint, []).append((submission, folder))
        plan.tasks.setdefault(fingerprint, GradingTask(lesson.name, folder, text, cell_timeout, notebook_timeout,
                                                       course_digest(), threads))
    return plan


def _write_manifest(out: Path, entries: list[Entry]) -> None:
    _write_csv(out / "manifest.csv", ["file", "outcome", "student_id", "assignment", "reason"],
               [entry.as_dict() for entry in sorted(entries, key=lambda e: e.file)])


def autograde(submissions: Path, out: Path, lessons: list[Lesson], db_url: str | None = None,
              jobs: int = 1, cell_timeout: int = 120, notebook_timeout: int = 1800,
              progress: Callable[[str], None] = print, *, roster: Path | None = None, force: bool = False,
              scheduler: str | None = None, asked: list[str] | None = None,
              bar: bool = False) -> tuple[list[Row], list[str]]:
    """Grade every student's notebooks in ``submissions`` into ``out``.

    Writes ``out/grades.csv`` (the gradebook's view: every lesson graded into it),
    ``out/students.csv`` (each id and its folder), ``out/manifest.csv`` (every file under
    ``submissions`` and what became of it) and ``out/feedback/<folder>/<lesson>.html``.
    ``asked``: lessons named on the command line, reported for every student even when
    nobody handed them in. Returns the rows of ``grades.csv`` and the files not graded.
    """
    started = time.monotonic()
    if not submissions.is_dir():
        raise FileNotFoundError(f"submissions folder not found: {submissions}")
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / "unpacked"
    shutil.rmtree(scratch, ignore_errors=True)
    found = collect(submissions, catalog_for(lessons), [lesson.name for lesson in lessons], scratch,
                    Roster(roster) if roster else None)
    shutil.rmtree(scratch, ignore_errors=True)
    entries = list(found.entries)
    if not found.students:
        _write_manifest(out, entries)
        return [], [f"{entry.file}: {entry.reason}" for entry in entries if entry.outcome == "skipped"]
    url = database_url(db_url, out)
    if url.startswith("sqlite:"):
        Path(url.split("///", 1)[1].split("?", 1)[0]).parent.mkdir(parents=True, exist_ok=True)
    course = out / "course"
    with Gradebook(url) as gradebook:
        prepared = prepare_lessons(course, gradebook, lessons, set(asked or []))
        config = write_course_config(course, url, cell_timeout)
        if without_password(url)[1]:
            progress(f"the gradebook's password is not written to {config}: when you open it, set {DB_VARIABLE} "
                     "to the full URL")
        folders = gradebook.folders(sorted(found.students), {s: found.students[s].sources for s in found.students})

        plan = _plan(found, folders, prepared, gradebook, out, entries, cell_timeout, notebook_timeout, force,
                     None if scheduler else max(1, cores_here() // max(1, jobs)))
        if plan.unchanged:
            progress(f"{plan.unchanged} notebooks unchanged since they were graded: not graded again "
                     "(--force re-grades)")
        templates = {name: p.template for name, p in prepared.items()}
        runner = run_dask(plan.tasks, templates, scheduler) if scheduler else run_local(plan.tasks, templates, jobs)
        with tqdm(total=len(plan.tasks), unit="notebook", disable=not bar, dynamic_ncols=True) as meter:
            say = meter.write if bar else progress
            for fingerprint, result in runner:
                for submission, folder in plan.owners[fingerprint]:
                    lesson = prepared[submission.lesson]
                    row, graded = _row(submission, folder, result, out, lesson.max_score, cell_timeout,
                                       found.students[submission.student_id].notes)
                    gradebook.record(row, fingerprint if graded or result.killed else "",
                                     result.grades if graded else None, result.comments if graded else None)
                    entries.append(Entry(submission.shown, "graded", row.status, row.student_id, row.assignment))
                    say(f"  {row.student_id:<20} {row.assignment:<28} {row.score:g}/{row.max_score:g}  {row.status}")
                meter.update(1)

        rows = gradebook.rows()
        _write_csv(out / "grades.csv", CSV_COLUMNS, [row.as_dict() for row in rows])
        _write_csv(out / "students.csv", ["student_id", "student_folder", "sources"], gradebook.students_known())
    _write_manifest(out, entries)
    graded_now = sum(len(owners) for owners in plan.owners.values())
    progress(f"graded {graded_now} notebooks ({len(plan.tasks)} distinct) of {len(found.students)} students "
             f"in {time.monotonic() - started:.0f} s")
    warnings = [f"{entry.file}: {entry.reason}" for entry in entries if entry.outcome == "skipped"]
    return rows, warnings


def summary_table(rows: list[Row]) -> str:
    """A plain-text table: one line per student, a column per lesson, and the total."""
    lessons = sorted({row.assignment for row in rows})
    students = sorted({(row.student_id, row.student_folder) for row in rows})
    cell = {(row.student_id, row.student_folder, row.assignment): row for row in rows}
    header = ["student"] + [name.split("_")[0] for name in lessons] + ["total", "status"]
    lines = [header]
    for student, folder in students:
        mine = [cell[(student, folder, lesson)] for lesson in lessons if (student, folder, lesson) in cell]
        problems = sorted({part for row in mine for part in row.status.split("+") if part != "graded"})
        lines.append([student] + [f"{cell[(student, folder, lesson)].score:g}/{cell[(student, folder, lesson)].max_score:g}"
                                  if (student, folder, lesson) in cell else "-" for lesson in lessons]
                     + [f"{sum(r.score for r in mine):g}/{sum(r.max_score for r in mine):g}",
                        ",".join(problems) or "ok"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
                     for line in lines)
