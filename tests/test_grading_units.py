"""The decisions of ``autograde`` that need no notebook run: which status a grading result
earns (``failed``, ``timeout``, ``crashed``) and what is written for it, what a re-run grades
again, the summary table, the zip guard against paths that leave the scratch folder, and the
warnings an instructor is shown. The nbgrader round trips are in test_autograde.py and
test_grading_class.py; the one child process here stops before nbgrader runs."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

from helpers.course import autograde as grading_run
from helpers.course import cli
from helpers.course.autograde import Prepared, _plan, _row, autograde, summary_table
from helpers.course.gradebook import Row
from helpers.course.grading import GradingResult, GradingTask, grade_task
from helpers.course.release import answered_notebook
from helpers.course.submissions import (Catalog, Collection, LessonPrint, Student, Submission,
                                        collect)

from conftest import lesson_named

QKV = lesson_named("02")
LESSON = QKV.name


def submission(student: str = "eva", status: list[str] | None = None) -> Submission:
    notebook = answered_notebook(QKV)
    return Submission(student, LESSON, Path(f"{student}.ipynb"), f"{student}/{LESSON}.ipynb",
                      notebook, "grade ids", list(status or []), [f"from {student}/{LESSON}.ipynb"])


def row_for(result: GradingResult, out: Path, status: list[str] | None = None) -> tuple[Row, bool]:
    return _row(submission(status=status), "eva", result, out, 10.0, cell_timeout=7,
                identity=["eva: not in the roster"])


# --- the status a grading result earns --------------------------------------------------------

def test_a_notebook_nbgrader_could_not_grade_is_failed_with_its_log_kept(tmp_path):
    stale = tmp_path / "feedback" / "eva" / f"{LESSON}.html"
    stale.parent.mkdir(parents=True)
    stale.write_text("last week's feedback")
    row, graded = row_for(GradingResult(False, error="nbconvert exploded", log="the grader's log"),
                          tmp_path)
    assert not graded
    assert (row.status, row.score, row.max_score) == ("failed", 0.0, 10.0)
    assert f"nbgrader could not grade it: see logs/eva-{LESSON}.log" in row.notes
    assert "eva: not in the roster" in row.notes, "identity notes go to the row"
    log = (tmp_path / "logs" / f"eva-{LESSON}.log").read_text()
    assert "the grader's log" in log and "nbconvert exploded" in log
    assert not stale.exists(), "feedback of an earlier grading would contradict the row"


def test_earlier_flags_stay_beside_failed(tmp_path):
    row, _ = row_for(GradingResult(False, error="x"), tmp_path, status=["renamed"])
    assert row.status == "renamed+failed"


def test_a_notebook_stopped_whole_is_timeout_and_one_whose_kernel_kept_dying_is_crashed(tmp_path):
    killed, _ = row_for(GradingResult(False, killed=True, error="grading took longer than 9 s"),
                        tmp_path)
    assert (killed.status, killed.score) == ("timeout", 0.0)
    assert "grading took longer than 9 s" in killed.notes
    dying, _ = row_for(GradingResult(False, crashed=["a", "b"], error="dead"), tmp_path)
    assert (dying.status, dying.score) == ("crashed", 0.0)
    assert "the kernel kept dying (cells a, b)" in dying.notes


def test_a_graded_notebook_keeps_its_score_and_names_its_lost_cells(tmp_path):
    graded_notebook = nbformat.writes(answered_notebook(QKV))
    result = GradingResult(True, score=6.0, max_score=10.0, graded=graded_notebook,
                           feedback="<html><body><p>Score: 6</p></body></html>",
                           crashed=["sdpa"], timed_out=["attention-entropy"])
    row, graded = row_for(result, tmp_path)
    assert graded and (row.status, row.score) == ("crashed+timeout", 6.0)
    assert "cell sdpa stopped the kernel" in row.notes
    assert "cell attention-entropy ran past 7 s and was interrupted" in row.notes
    page = (tmp_path / "feedback" / "eva" / f"{LESSON}.html").read_text()
    assert "Notes from the grader" in page and "cell sdpa stopped the kernel" in page
    assert "from eva/" not in page, "the path it came from is for the instructor"
    assert "roster" not in page, "so are notes about identities"
    assert (tmp_path / "course" / "autograded" / "eva" / LESSON / f"{LESSON}.ipynb").is_file()


def test_a_worker_with_another_course_refuses_the_task_and_it_is_failed(tmp_path):
    """The real grading child process, asked to grade for another version of the course,
    answers without running nbgrader; the row says failed, not graded or zero-as-graded."""
    task = GradingTask(LESSON, "eva", nbformat.writes(answered_notebook(QKV)), cell_timeout=30,
                       notebook_timeout=120, course_version="another version", threads=1)
    result = grade_task(task, b"")
    assert not result.success and not result.killed
    assert "another version of the course" in result.error
    row, _ = row_for(result, tmp_path)
    assert row.status == "failed"


# --- what a re-run grades again ---------------------------------------------------------------

class StoredRows:
    """A gradebook that remembers one earlier row per (folder, lesson): all _plan reads."""

    def __init__(self, rows: dict[tuple[str, str], SimpleNamespace]):
        self.rows = rows

    def stored(self, folder: str, lesson: str):
        return self.rows.get((folder, lesson))


def plan_for(out: Path, before: dict, force: bool = False):
    released = nbformat.read(QKV.student, as_version=4)
    lesson = Prepared(LESSON, "v1", released, b"", 10.0, LessonPrint.of(LESSON, released))
    students = {name: Student(name) for name in ("ann", "bob", "cid", "dan")}
    found = Collection(students, [submission(name) for name in students], [])
    entries: list = []
    plan = _plan(found, {name: name for name in students}, {LESSON: lesson}, StoredRows(before),
                 out, entries, cell_timeout=30, notebook_timeout=120, force=force, threads=1)
    return plan, entries


def test_a_rerun_grades_again_what_failed_or_lost_its_feedback_and_nothing_else(tmp_path):
    plan, _ = plan_for(tmp_path, {})
    (fingerprint,) = plan.tasks  # four identical notebooks: graded once
    assert sorted(s.student_id for s, _ in plan.owners[fingerprint]) == ["ann", "bob", "cid", "dan"]
    for name in ("ann", "bob", "cid"):  # feedback on disk for three of them
        page = tmp_path / "feedback" / name / f"{LESSON}.html"
        page.parent.mkdir(parents=True)
        page.write_text("graded")
    before = {("ann", LESSON): SimpleNamespace(fingerprint=fingerprint, status="graded"),
              ("bob", LESSON): SimpleNamespace(fingerprint=fingerprint, status="renamed+failed"),
              ("cid", LESSON): SimpleNamespace(fingerprint="another notebook", status="graded"),
              ("dan", LESSON): SimpleNamespace(fingerprint=fingerprint, status="graded")}
    plan, entries = plan_for(tmp_path, before)
    assert plan.unchanged == 1
    assert [(e.student_id, e.outcome) for e in entries] == [("ann", "unchanged")]
    assert sorted(s.student_id for s, _ in plan.owners[fingerprint]) == ["bob", "cid", "dan"]
    forced, _ = plan_for(tmp_path, before, force=True)
    assert forced.unchanged == 0 and len(forced.owners[fingerprint]) == 4


# --- the summary table ------------------------------------------------------------------------

def test_summary_table_has_a_line_per_student_a_column_per_lesson_and_the_total():
    rows = [Row("zoe", "02_qkv_attention", 7.0, 10.0, "graded", "", "zoe"),
            Row("zoe", "01_rnn_bottleneck", 9.0, 9.0, "graded", "", "zoe"),
            Row("amy", "01_rnn_bottleneck", 4.5, 9.0, "renamed+timeout", "", "amy"),
            Row("amy", "02_qkv_attention", 0.0, 10.0, "missing", "", "amy"),
            Row("max", "02_qkv_attention", 10.0, 10.0, "crashed", "", "max"),
            Row("max", "02_qkv_attention", 2.0, 10.0, "graded", "", "max-1a2b3c")]
    lines = summary_table(rows).splitlines()
    assert [line.split() for line in lines] == [
        ["student", "01", "02", "total", "status"],
        ["amy", "4.5/9", "0/10", "4.5/19", "missing,renamed,timeout"],
        ["max", "-", "10/10", "10/10", "crashed"],
        ["max", "-", "2/10", "2/10", "ok"],  # another student with the same id: own line
        ["zoe", "9/9", "7/10", "16/19", "ok"]]
    for column in ("01", "02", "total", "status"):  # aligned: each column starts in one place
        start = lines[0].index(column)
        assert all(line[start - 2:start] == "  " and line[start] != " " for line in lines), column


# --- zips: nothing leaves the scratch folder --------------------------------------------------

def zip_bytes(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def catalog() -> Catalog:
    return Catalog([LessonPrint.of(LESSON, nbformat.read(QKV.student, as_version=4))])


@pytest.mark.parametrize("member", ["../escape/02_qkv_attention.ipynb",
                                    "eve/../../escape/02_qkv_attention.ipynb",
                                    "/tmp/escape/02_qkv_attention.ipynb"])
def test_a_zip_with_a_path_out_of_its_folder_is_skipped_whole(tmp_path, member):
    notebook = nbformat.writes(answered_notebook(QKV))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "eve.zip").write_bytes(zip_bytes({f"eve/{LESSON}.ipynb": notebook,
                                                         member: notebook}))
    (tmp_path / "in" / "ivy").mkdir()
    (tmp_path / "in" / "ivy" / f"{LESSON}.ipynb").write_text(notebook)
    scratch = tmp_path / "work" / "scratch"
    found = collect(tmp_path / "in", catalog(), [LESSON], scratch)
    assert [(s.student_id, s.lesson) for s in found.submissions] == [("ivy", LESSON)]
    (entry,) = [e for e in found.entries if e.file == "eve.zip"]
    assert (entry.outcome, entry.reason) == ("skipped", f"it holds an unsafe path {member!r}")
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.ipynb"))
    assert written == [f"in/ivy/{LESSON}.ipynb"], "a zip member was written somewhere"


def test_a_zip_that_would_unpack_too_large_is_skipped(tmp_path, monkeypatch):
    from helpers.course import submissions

    monkeypatch.setattr(submissions, "MAX_UNZIPPED_BYTES", 1 << 10)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.zip").write_bytes(zip_bytes({f"big/{LESSON}.ipynb": "x" * 4096}))
    found = collect(tmp_path / "in", catalog(), [LESSON], tmp_path / "scratch")
    assert found.submissions == []
    assert [(e.file, e.outcome) for e in found.entries] == [("big.zip", "skipped")]
    assert found.entries[0].reason.startswith("it would unpack to more than")


# --- what the instructor is told --------------------------------------------------------------

def nothing_to_grade(folder: Path, n_files: int) -> list[str]:
    """A folder with no student in it: loose files nobody can be named for, a zip that
    breaks out, junk. Returns what the instructor should be warned about, sorted."""
    folder.mkdir()
    warned = []
    for i in range(n_files):
        (folder / f"notes-{i:02d}.pdf").write_bytes(b"%PDF-1.4")
        warned.append(f"notes-{i:02d}.pdf: not a notebook")
    (folder / "evil.zip").write_bytes(zip_bytes({"../evil.ipynb": "{}"}))
    warned.append("evil.zip: it holds an unsafe path '../evil.ipynb'")
    (folder / "link.ipynb").symlink_to(folder / "notes-00.pdf")
    warned.append("link.ipynb: a symbolic link, not followed")
    (folder / ".DS_Store").write_bytes(b"\0")  # junk: listed in the manifest, not a warning
    return sorted(warned)


def test_autograde_warns_of_every_file_it_skipped_and_of_nothing_else(tmp_path):
    warned = nothing_to_grade(tmp_path / "in", 2)
    rows, warnings = autograde(tmp_path / "in", tmp_path / "out", [QKV], progress=lambda line: None)
    assert rows == [] and sorted(warnings) == warned
    manifest = (tmp_path / "out" / "manifest.csv").read_text()
    assert ".DS_Store,ignored" in manifest and "evil.zip,skipped" in manifest


def test_the_cli_shows_twenty_warnings_counts_the_rest_and_fails_when_nobody_was_graded(
        tmp_path, capsys):
    warned = nothing_to_grade(tmp_path / "in", 23)  # 25 warnings
    code = cli.main(["autograde", str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                     "--lesson", "02"])
    printed = capsys.readouterr()
    shown = [line.removeprefix("not graded: ") for line in printed.out.splitlines()
             if line.startswith("not graded: ")]
    assert code == 2 and "no student submissions found" in printed.err
    assert len(shown) == 20 and set(shown) <= set(warned)
    assert "... and 5 more" in printed.out


def test_the_cli_prints_the_summary_table_and_where_the_results_are(tmp_path, capsys, monkeypatch):
    rows = [Row("eva", LESSON, 7.0, 10.0, "graded", "", "eva")]
    monkeypatch.setattr(grading_run, "autograde",
                        lambda *args, **kwargs: (rows, ["x.pdf: not a notebook"]))
    (tmp_path / "in").mkdir()
    assert cli.main(["autograde", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "not graded: x.pdf: not a notebook" in printed
    assert summary_table(rows) in printed
    assert str(tmp_path / "out" / "grades.csv") in printed
    assert str(tmp_path / "out" / "manifest.csv") in printed
