"""A class as instructors receive it: platform exports, copies, zips, Unicode names, broken
and stripped notebooks, a crash. Every notebook reaches the right student and lesson, nothing
is dropped or merged, every file is accounted for, and the bookkeeping survives re-runs.

The identity tests read folders only (no notebook runs); one session fixture grades the
class with nbgrader, and the tests read what it wrote. Identical notebooks are graded once,
so the class costs a handful of notebook runs.
"""

from __future__ import annotations

import csv
import html
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from helpers.course.autograde import autograde, sqlite_url
from helpers.course.gradebook import SAFE_FOLDER, database_url, safe_folder
from helpers.course.grading import cores_here, scrub_paths
from helpers.course.release import answered_notebook
from helpers.course.submissions import Catalog, LessonPrint, Roster, collect, strip_copy_marks

from conftest import LESSONS, ROOT, lesson_named, shared_once

pytestmark = pytest.mark.xdist_group("grading-class")  # one worker grades the class, once

RNN, QKV = lesson_named("01"), lesson_named("02")
GRADED = [RNN, QKV, lesson_named("03")]  # nobody hands in 03: it must not be reported
NO_SCALE = '''def attention(q, k, v, mask=None, scale=None):
    weights = torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # forgot the scale
    return weights @ v, weights
'''
THREADS = 'import os, torch\nprint("threads", torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"))'


def blank(lesson) -> nbformat.NotebookNode:
    return nbformat.read(lesson.student, as_version=4)


def full(lesson) -> nbformat.NotebookNode:
    return answered_notebook(lesson)


def crashing() -> nbformat.NotebookNode:
    """Lesson 02 answered, except that the last answer kills the kernel."""
    return answered_notebook(QKV, {"attention-entropy": "import os\nos._exit(1)"})


def partial() -> nbformat.NotebookNode:
    """Lesson 02 with the scale forgotten (3 of 10 points lost), and a cell that prints the
    threads its kernel got."""
    notebook = answered_notebook(QKV, {"sdpa": NO_SCALE})
    notebook.cells.append(new_code_cell(THREADS))
    return notebook


def stripped(lesson) -> nbformat.NotebookNode:
    """The answered notebook's code pasted into a fresh notebook: no nbgrader metadata."""
    return new_notebook(cells=[new_code_cell(cell.source) for cell in full(lesson).cells
                               if cell.cell_type == "code"])


def write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, nbformat.NotebookNode):
        nbformat.write(content, path)
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def zip_of(files: dict[str, object]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            if isinstance(content, nbformat.NotebookNode):
                content = nbformat.writes(content)
            archive.writestr(name, content)
    return buffer.getvalue()


def catalog() -> Catalog:
    return Catalog([LessonPrint.of(lesson.name, blank(lesson)) for lesson in LESSONS])


def collected(folder: Path, roster: Path | None = None, graded=GRADED):
    with tempfile.TemporaryDirectory() as scratch:
        found = collect(folder, catalog(), [lesson.name for lesson in graded], Path(scratch),
                        Roster(roster) if roster else None)
    return {(s.student_id, s.lesson): s for s in found.submissions}, found


# --- identity, without grading -----------------------------------------------------------

def test_copy_marks_are_not_part_of_names():
    assert strip_copy_marks("Copy of 02_qkv_attention (1)") == ("02_qkv_attention", 1)
    assert strip_copy_marks("Copy of Copy of eva") == ("eva", 0)
    assert strip_copy_marks("eva - Copy (3)") == ("eva", 3)
    assert strip_copy_marks("eva copy 2") == ("eva", 2)
    assert strip_copy_marks("student-1") == ("student-1", 0)


def test_folder_names_are_safe_unique_and_keep_plain_ids():
    assert safe_folder("eva", set()) == "eva"
    taken = {"eva"}
    assert safe_folder("Eva", taken) != "Eva", "folders differing only in case collide on macOS and Windows"
    ids = ["李雷", "王芳", "José Núñez", "Jose_Nunez", "../etc", "CON", "a" * 300]
    folders = []
    for student in ids:
        folder = safe_folder(student, taken)
        taken.add(folder.casefold())
        folders.append(folder)
    assert len({f.casefold() for f in folders}) == len(ids)
    assert all(SAFE_FOLDER.match(f) and "/" not in f and len(f) < 100 for f in folders), folders
    assert folders[2].startswith("Jose_Nunez-") and folders[3] == "Jose_Nunez"
    assert folders[5] != "CON", "a name Windows reserves for a device"


def test_db_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert database_url("sqlite:///grades.db", Path("out")) == f"sqlite:///{tmp_path}/grades.db?timeout=120"
    assert database_url("book.db", Path("out")) == f"sqlite:///{tmp_path}/book.db?timeout=120"
    assert database_url(f"sqlite:///{tmp_path}/a.db?timeout=5", Path("out")) == f"sqlite:///{tmp_path}/a.db?timeout=5"
    assert database_url(None, Path("out")) == f"sqlite:///{tmp_path}/out/gradebook.db?timeout=120"
    assert database_url("postgresql://u:pw@h:5432/db", Path("out")) == "postgresql+psycopg://u:pw@h:5432/db"
    assert database_url("postgresql+psycopg2://u@h/db", Path("out")) == "postgresql+psycopg2://u@h/db"


def test_non_ascii_ids_stay_apart_and_keep_their_spelling(tmp_path):
    write(tmp_path / "李雷_02_qkv_attention.ipynb", full(QKV))
    write(tmp_path / "王芳_02_qkv_attention.ipynb", blank(QKV))
    nfd = unicodedata.normalize("NFD", "José Núñez")
    write(tmp_path / "José Núñez" / "02_qkv_attention" / "02_qkv_attention.ipynb", full(QKV))
    write(tmp_path / f"{nfd}.zip", zip_of({"01_rnn_bottleneck.ipynb": full(RNN)}))
    by, found = collected(tmp_path)
    assert set(by) == {("李雷", QKV.name), ("王芳", QKV.name), ("José Núñez", QKV.name), ("José Núñez", RNN.name)}
    assert by[("李雷", QKV.name)].notebook.name.startswith("李雷")
    assert set(found.students) == {"李雷", "王芳", "José Núñez"}


def test_canvas_download_gives_one_student_per_user_and_splits_shared_logins(tmp_path):
    write(tmp_path / "garcia_12345_67811_01_rnn_bottleneck.ipynb", full(RNN))
    write(tmp_path / "garcia_12345_67890_02_qkv_attention.ipynb", full(QKV))
    write(tmp_path / "smith_20001_70010_02_qkv_attention.ipynb", full(QKV))
    write(tmp_path / "smith_20002_70011_02_qkv_attention.ipynb", blank(QKV))
    write(tmp_path / "lee_30003_70000_02_qkv_attention.ipynb", blank(QKV))
    write(tmp_path / "lee_LATE_30003_70001_02_qkv_attention-1.ipynb", full(QKV))
    by, found = collected(tmp_path)
    assert set(by) == {("garcia", RNN.name), ("garcia", QKV.name), ("smith (Canvas 20001)", QKV.name),
                       ("smith (Canvas 20002)", QKV.name), ("lee", QKV.name)}
    assert "ambiguous" in found.students["smith (Canvas 20001)"].notes[0]
    assert by[("lee", QKV.name)].notebook.name.startswith("lee_LATE"), "the answered resubmission is graded"
    assert [e.outcome for e in found.entries if e.file.startswith("lee_30003")] == ["superseded"]


def test_moodle_folders_merge_across_assignments_and_online_text_is_no_student(tmp_path):
    week2 = {"Dmitri Ivanov_402117_assignsubmission_file_/attention.ipynb": full(QKV),
             "Dmitri Ivanov_402117_assignsubmission_onlinetext_/onlinetext.html": "<p>done</p>",
             "Ann Lee_402118_assignsubmission_file_/02_qkv_attention.ipynb": blank(QKV)}
    write(tmp_path / "COURSE-Lesson 02-123.zip", zip_of(week2))
    write(tmp_path / "COURSE-Lesson 01-122.zip", zip_of(
        {"Dmitri Ivanov_501234_assignsubmission_file_/01_rnn_bottleneck.ipynb": full(RNN)}))
    by, found = collected(tmp_path)
    assert set(found.students) == {"Dmitri Ivanov", "Ann Lee"}
    assert set(by) == {("Dmitri Ivanov", QKV.name), ("Dmitri Ivanov", RNN.name), ("Ann Lee", QKV.name)}
    assert by[("Dmitri Ivanov", QKV.name)].status == ["renamed"]
    online = [e for e in found.entries if e.file.endswith("onlinetext.html")]
    assert [(e.outcome, e.reason) for e in online] == [("skipped", "Moodle online text, not a file submission")]


def test_two_moodle_participants_with_one_name_are_graded_apart(tmp_path):
    write(tmp_path / "moodle.zip", zip_of({
        "Sam Roe_1001_assignsubmission_file_/02_qkv_attention.ipynb": full(QKV),
        "Sam Roe_1002_assignsubmission_file_/02_qkv_attention.ipynb": blank(QKV)}))
    by, found = collected(tmp_path)
    assert set(by) == {("Sam Roe (Moodle 1001)", QKV.name), ("Sam Roe (Moodle 1002)", QKV.name)}
    assert all("ambiguous" in s.notes[0] for s in found.students.values())


def test_blackboard_names_and_receipts(tmp_path):
    write(tmp_path / "Lesson02_jdoe_attempt_2024-03-01-10-22-33_02_qkv_attention.ipynb", full(QKV))
    write(tmp_path / "Lesson02_jdoe_attempt_2024-03-01-10-22-33.txt", "Name: J Doe")
    by, found = collected(tmp_path)
    assert set(by) == {("jdoe", QKV.name)}
    assert [e.reason for e in found.entries if e.file.endswith(".txt")] == ["not a notebook"]


def test_whole_class_zips_nested_zips_and_junk(tmp_path):
    henry = zip_of({"02_qkv_attention/02_qkv_attention.ipynb": full(QKV)})
    write(tmp_path / "section.zip", zip_of({
        "section/henry.zip": henry,
        "section/ivy/02_qkv_attention.ipynb": blank(QKV),
        "section/ivy/.ipynb_checkpoints/02_qkv_attention-checkpoint.ipynb": blank(QKV),
        "__MACOSX/section/._henry.zip": b"\0\5\26\7",
        "section/.DS_Store": b"\0"}))
    by, found = collected(tmp_path)
    assert set(by) == {("henry", QKV.name), ("ivy", QKV.name)}
    outcomes = {e.file: e.outcome for e in found.entries}
    assert outcomes["section.zip"] == outcomes["section.zip/section/henry.zip"] == "unpacked"
    assert outcomes["section.zip/__MACOSX/section/._henry.zip"] == "ignored"
    assert outcomes["section.zip/section/ivy/.ipynb_checkpoints/02_qkv_attention-checkpoint.ipynb"] == "ignored"


def test_a_submitted_folder_does_not_hide_the_rest(tmp_path):
    write(tmp_path / "submitted" / "jack" / "02_qkv_attention" / "02_qkv_attention.ipynb", full(QKV))
    write(tmp_path / "kim" / "02_qkv_attention.ipynb", full(QKV))
    write(tmp_path / "lou_02_qkv_attention.ipynb", full(QKV))
    by, _ = collected(tmp_path)
    assert set(by) == {("jack", QKV.name), ("kim", QKV.name), ("lou", QKV.name)}


def test_lesson_comes_from_content_then_functions_then_name(tmp_path):
    write(tmp_path / "frank" / "attention_hw_frank.ipynb", full(QKV))
    write(tmp_path / "gail" / "01_rnn_bottleneck.ipynb", full(QKV))
    write(tmp_path / "grace" / "homework.ipynb", stripped(QKV))
    write(tmp_path / "hugo" / "scratch.ipynb", new_notebook(cells=[new_code_cell("print(1)")]))
    write(tmp_path / "ines" / "02_qkv_attention.ipynb", "{not json")
    by, found = collected(tmp_path)
    assert by[("frank", QKV.name)].status == ["renamed"]
    assert by[("gail", QKV.name)].status == ["renamed"] and ("gail", RNN.name) not in by
    assert by[("grace", QKV.name)].how == "names"
    assert by[("ines", QKV.name)].status == ["invalid"]
    assert "hugo" in found.students
    assert [e.outcome for e in found.entries if e.file == "hugo/scratch.ipynb"] == ["skipped"]


def test_a_lesson_not_graded_now_is_named_in_the_manifest(tmp_path):
    write(tmp_path / "eva" / "04_self_cross_attention.ipynb", full(lesson_named("04")))
    _, found = collected(tmp_path)
    assert [(e.outcome, e.reason) for e in found.entries] == \
        [("skipped", "a notebook of 04_self_cross_attention, which this run does not grade")]


def test_a_roster_maps_platform_ids_and_adds_students_who_sent_nothing(tmp_path):
    write(tmp_path / "in" / "garcia_12345_67811_02_qkv_attention.ipynb", full(QKV))
    write(tmp_path / "in" / "moodle.zip", zip_of({"Dmitri Ivanov_1_assignsubmission_file_/x.ipynb": full(QKV)}))
    write(tmp_path / "in" / "Pat Doe" / "02_qkv_attention.ipynb", full(QKV))
    write(tmp_path / "in" / "twin_55555_1234_02_qkv_attention.ipynb", full(QKV))
    roster = tmp_path / "roster.csv"
    roster.write_text("student_id,name,canvas_id\ns100,Maria Garcia,12345\ns200,Dmitri Ivanov,\n"
                      "s300,Nadia Noshow,\ns401,Twin A,55555\ns402,Twin B,55555\n", encoding="utf-8")
    by, found = collected(tmp_path / "in", roster)
    assert {key for key in by} == {("s100", QKV.name), ("s200", QKV.name), ("Pat Doe", QKV.name),
                                   ("twin", QKV.name)}
    assert set(found.students) >= {"s100", "s200", "s300", "Pat Doe", "twin"}
    assert any("not in the roster" in note for note in found.students["Pat Doe"].notes)
    assert any("several roster entries" in note for note in found.students["twin"].notes)


def test_feedback_loses_the_graders_paths():
    page = ('File "/tmp/ipykernel_4242/123456.py", line 2, in f<br>'
            f'{ROOT}/helpers/checks/lesson02.py and /opt/venv/lib/python3.11/site-packages/torch/nn.py')
    clean = scrub_paths(page, [str(ROOT)])
    assert clean == 'File "your notebook cell", line 2, in f<br>helpers/checks/lesson02.py and torch/nn.py'


# --- a graded class ----------------------------------------------------------------------

ROSTER = "student_id,name,canvas_id\ns100,Maria Garcia,12345\ns200,Dmitri Ivanov,\ns300,Nadia Noshow,\n"

# (student_id, assignment) -> (score, status) for the whole class; max is 9 for 01, 10 for 02.
EXPECTED = {
    ("李雷", "02"): (10, "graded"), ("王芳", "02"): (0, "graded"),
    ("José Núñez", "01"): (9, "graded"), ("José Núñez", "02"): (10, "graded"),
    ("s100", "01"): (9, "graded"), ("s100", "02"): (8, "crashed"),
    ("smith (Canvas 20001)", "02"): (10, "ambiguous"), ("smith (Canvas 20002)", "02"): (0, "ambiguous"),
    ("lee", "02"): (10, "graded"),
    ("s200", "01"): (9, "graded"), ("s200", "02"): (10, "renamed"),
    ("eva", "02"): (7, "graded"), ("bob", "02"): (10, "graded"),
    ("frank", "02"): (10, "renamed"), ("grace", "02"): (10, "restored"),
    ("henry", "02"): (10, "graded"), ("ivy", "02"): (0, "graded"), ("jack", "02"): (10, "graded"),
    ("leo", "02"): (0, "invalid"),
}
STUDENTS = {student for student, _ in EXPECTED} | {"kate", "s300"}


def make_class(folder: Path) -> set[str]:
    """Write the class; returns every file the manifest must list (zip members included)."""
    nfd = unicodedata.normalize("NFD", "José Núñez")
    files = {
        "李雷_02_qkv_attention.ipynb": full(QKV),
        "王芳_02_qkv_attention.ipynb": blank(QKV),
        "José Núñez/02_qkv_attention/02_qkv_attention.ipynb": full(QKV),
        f"{nfd}.zip": {"01_rnn_bottleneck.ipynb": full(RNN)},
        "canvas.zip": {
            "garcia_12345_67811_01_rnn_bottleneck.ipynb": full(RNN),
            "garcia_12345_67890_02_qkv_attention.ipynb": crashing(),
            "smith_20001_70010_02_qkv_attention.ipynb": full(QKV),
            "smith_20002_70011_02_qkv_attention.ipynb": blank(QKV),
            "lee_30003_70000_02_qkv_attention.ipynb": blank(QKV),
            "lee_LATE_30003_70001_02_qkv_attention-1.ipynb": full(QKV)},
        "COURSE-Lesson 02-123.zip": {
            "Dmitri Ivanov_402117_assignsubmission_file_/attention.ipynb": full(QKV),
            "Dmitri Ivanov_402117_assignsubmission_onlinetext_/onlinetext.html": "<p>see the notebook</p>"},
        "COURSE-Lesson 01-122.zip": {
            "Dmitri Ivanov_501234_assignsubmission_file_/01_rnn_bottleneck.ipynb": full(RNN)},
        "eva/Copy of 02_qkv_attention.ipynb": partial(),
        "eva/02_qkv_attention.ipynb": blank(QKV),
        "eva/notes.pdf": b"%PDF-1.4",
        "bob (1).zip": {"02_qkv_attention (1).ipynb": full(QKV)},
        "frank/attention_hw_frank.ipynb": full(QKV),
        "grace/02_qkv_attention.ipynb": stripped(QKV),
        "section.zip": {
            "section/henry.zip": {"02_qkv_attention/02_qkv_attention.ipynb": full(QKV)},
            "section/ivy/02_qkv_attention.ipynb": blank(QKV),
            "section/ivy/.ipynb_checkpoints/02_qkv_attention-checkpoint.ipynb": blank(QKV),
            "__MACOSX/section/._henry.zip": b"\0\5\26\7"},
        "submitted/jack/02_qkv_attention/02_qkv_attention.ipynb": full(QKV),
        "kate/report.pdf": b"%PDF-1.4",
        "leo/02_qkv_attention.ipynb": '{"cells": [',
        "02_qkv_attention.ipynb": full(QKV),
        "broken.zip": b"PK\3\4 not really a zip",
        ".DS_Store": b"\0",
    }
    listed = set()

    def members(name, content, prefix=""):
        """Zip the nested dictionaries, and list every file as the manifest shows it."""
        listed.add(prefix + name)
        if isinstance(content, dict) and not isinstance(content, nbformat.NotebookNode):
            return zip_of({member: members(member, value, prefix + name + "/") for member, value in content.items()})
        return content

    for name, content in files.items():
        write(folder / name, members(name, content))
    return listed


def page_text(path: Path) -> str:
    """What a browser shows of an HTML page: tags dropped (code is split into highlighted
    spans), entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8")))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def grade_the_class(home: Path) -> None:
    make_class(home / "class")
    (home / "roster.csv").write_text(ROSTER, encoding="utf-8")
    autograde(home / "class", home / "out", GRADED, jobs=2, cell_timeout=300, roster=home / "roster.csv",
              progress=lambda line: None)


@pytest.fixture(scope="session")
def graded_class(tmp_path_factory):
    """The class, graded once per test run; tests that grade again work on copies."""
    home = shared_once(tmp_path_factory, "graded-class", grade_the_class)
    with tempfile.TemporaryDirectory() as scratch:
        listed = make_class(Path(scratch))
    out = home / "out"
    return {"folder": home / "class", "out": out, "roster": home / "roster.csv", "listed": listed,
            "grades": read_csv(out / "grades.csv"), "manifest": read_csv(out / "manifest.csv"),
            "students": read_csv(out / "students.csv")}


def test_the_whole_gradebook(graded_class):
    """Right student, right lesson, right score and status; nothing dropped, nothing merged;
    lesson 03, which nobody handed in, is not reported."""
    table = {(r["student_id"], r["assignment"][:2]): r for r in graded_class["grades"]}
    assert len(table) == len(graded_class["grades"]), "one row per student and lesson"
    assert {student for student, _ in table} == STUDENTS
    assert {lesson for _, lesson in table} == {"01", "02"}
    for student in STUDENTS:
        for lesson in ("01", "02"):
            row = table[(student, lesson)]
            score, status = EXPECTED.get((student, lesson), (0, "missing"))
            assert (float(row["score"]), row["status"]) == (score, status), row
            assert float(row["max_score"]) == {"01": 9, "02": 10}[lesson], row


def test_every_file_is_accounted_for(graded_class):
    manifest = {row["file"]: row for row in graded_class["manifest"]}
    assert set(manifest) == graded_class["listed"]
    graded = {(r["student_id"], r["assignment"][:2]): r["file"] for r in graded_class["manifest"]
              if r["outcome"] == "graded"}
    assert set(graded) == set(EXPECTED)
    assert graded[("s100", "02")] == "canvas.zip/garcia_12345_67890_02_qkv_attention.ipynb"
    assert graded[("eva", "02")] == "eva/Copy of 02_qkv_attention.ipynb"
    expected_outcomes = {
        "eva/02_qkv_attention.ipynb": "superseded",
        "canvas.zip/lee_30003_70000_02_qkv_attention.ipynb": "superseded",
        "eva/notes.pdf": "skipped", "kate/report.pdf": "skipped", "02_qkv_attention.ipynb": "skipped",
        "broken.zip": "skipped", ".DS_Store": "ignored", "section.zip/__MACOSX/section/._henry.zip": "ignored",
        "COURSE-Lesson 02-123.zip/Dmitri Ivanov_402117_assignsubmission_onlinetext_/onlinetext.html": "skipped",
        "section.zip/section/henry.zip": "unpacked"}
    for file, outcome in expected_outcomes.items():
        assert manifest[file]["outcome"] == outcome, manifest[file]
        assert manifest[file]["reason"], manifest[file]


def test_each_student_has_one_safe_folder_and_the_mapping_is_kept(graded_class):
    students = {row["student_id"]: row for row in graded_class["students"]}
    assert set(students) == STUDENTS
    folders = [row["student_folder"] for row in students.values()]
    assert len({folder.casefold() for folder in folders}) == len(folders)
    assert all(SAFE_FOLDER.match(folder) for folder in folders)
    assert students["eva"]["student_folder"] == "eva"
    assert "Canvas user 12345" in students["s100"]["sources"]
    for row in graded_class["grades"]:
        assert row["student_folder"] == students[row["student_id"]]["student_folder"]
    out = graded_class["out"]
    assert (out / "feedback" / students["李雷"]["student_folder"] / f"{QKV.name}.html").is_file()


def test_a_crash_costs_only_the_crashing_cell(graded_class):
    from nbgrader.api import Gradebook

    row = next(r for r in graded_class["grades"] if r["student_id"] == "s100" and r["assignment"] == QKV.name)
    assert "cell attention-entropy stopped the kernel" in row["notes"]
    out = graded_class["out"]
    with Gradebook(sqlite_url(out / "gradebook.db"), "attention-course") as gradebook:
        notebook = gradebook.find_submission_notebook(QKV.name, QKV.name, "s100")
        scores = {grade.name: grade.score for grade in notebook.grades}
    assert scores == {"dot-scores-tests": 2, "stable-softmax-tests": 3, "sdpa-tests": 3, "attention-entropy-tests": 0}
    shown = page_text(out / "feedback" / "s100" / f"{QKV.name}.html")
    assert "KernelDied: the Python kernel died while this cell ran" in shown and "os._exit(1)" in shown


def test_feedback_shows_the_students_code_the_failure_and_points_not_paths(graded_class):
    out = graded_class["out"]
    page = out / "feedback" / "eva" / f"{QKV.name}.html"
    shown = page_text(page)
    assert "weights = torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # forgot the scale" in shown
    assert "output equals unscaled attention: did you divide by √d_k?" in shown
    assert "Score: 0.0 / 3.0" in shown and "Score: 7.0 / 10.0" in shown
    assert "Notes from the grader" in shown and "2 notebooks for 02_qkv_attention" in shown
    assert "roster" not in shown, "notes about identities are for the instructor"
    raw = page.read_text(encoding="utf-8")
    for path in (str(out), str(ROOT), sys.prefix, tempfile.gettempdir() + "/", "site-packages", "ipykernel_"):
        assert path not in raw, path


def test_each_kernel_gets_its_share_of_the_cores(graded_class):
    graded = nbformat.read(graded_class["out"] / "course" / "autograded" / "eva" / QKV.name / f"{QKV.name}.ipynb",
                           as_version=4)
    printed = "".join(o.get("text", "") for c in graded.cells for o in c.get("outputs", []))
    share = max(1, cores_here() // 2)
    assert f"threads {share} {share}" in printed


def test_a_rerun_changes_nothing_and_runs_nothing(graded_class, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(graded_class["out"], out)
    before = {p: p.stat().st_mtime_ns for p in (out / "course" / "autograded").rglob("*.ipynb")}
    autograde(graded_class["folder"], out, GRADED, jobs=2, cell_timeout=300, roster=graded_class["roster"],
              progress=lambda line: None)
    assert read_csv(out / "grades.csv") == graded_class["grades"]
    outcomes = {row["file"]: row["outcome"] for row in read_csv(out / "manifest.csv")}
    for row in graded_class["manifest"]:
        if row["outcome"] == "graded":
            expected = "graded" if row["file"] == "leo/02_qkv_attention.ipynb" else "unchanged"
            assert outcomes[row["file"]] == expected, row
    assert {p: p.stat().st_mtime_ns for p in (out / "course" / "autograded").rglob("*.ipynb")} == before


def test_a_partial_run_merges_into_the_gradebook(graded_class, tmp_path):
    """``--lesson 01`` with a late lesson-01 notebook: lesson 02 stays, nobody's earlier
    grade is dropped, the new row replaces none but its own."""
    out = tmp_path / "out"
    shutil.copytree(graded_class["out"], out)
    late = tmp_path / "late"
    write(late / "李雷_01_rnn_bottleneck.ipynb", "{ not a notebook")
    write(late / "王芳_02_qkv_attention.ipynb", full(QKV))
    rows, skipped = autograde(late, out, [RNN], jobs=1, roster=graded_class["roster"], asked=[RNN.name],
                              progress=lambda line: None)
    table = {(r["student_id"], r["assignment"][:2]): r for r in read_csv(out / "grades.csv")}
    old = {(r["student_id"], r["assignment"][:2]): r for r in graded_class["grades"]}
    assert set(table) == set(old)
    assert table[("李雷", "01")]["status"] == "invalid"
    for key in set(old) - {("李雷", "01")}:
        assert table[key] == old[key], key
    assert skipped == [f"王芳_02_qkv_attention.ipynb: a notebook of {QKV.name}, which this run does not grade"]


def test_the_cli_resolves_a_relative_db_against_its_working_directory(tmp_path):
    write(tmp_path / "in" / "leo" / "02_qkv_attention.ipynb", '{"cells": [')
    run = subprocess.run([sys.executable, "-m", "helpers.course.cli", "autograde", "in", "--out", "out",
                          "--lesson", "02", "--db", "sqlite:///book.db"], cwd=tmp_path,
                         capture_output=True, text=True, env=dict(os.environ, ATTENTION_COURSE_ROOT=str(ROOT)))
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "book.db").is_file() and not (tmp_path / "out" / "gradebook.db").exists()
    assert [(r["student_id"], r["status"]) for r in read_csv(tmp_path / "out" / "grades.csv")] == [("leo", "invalid")]
    assert "Traceback" not in run.stderr
    bad = subprocess.run([sys.executable, "-m", "helpers.course.cli", "autograde", "in", "--out", "out",
                          "--db", "postgresql://nobody@127.0.0.1:9/none"], cwd=tmp_path,
                         capture_output=True, text=True, env=dict(os.environ, ATTENTION_COURSE_ROOT=str(ROOT)))
    assert bad.returncode == 2 and "cannot open the gradebook" in bad.stderr and "Traceback" not in bad.stderr


# --- the same class on a Dask cluster ----------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """A real Dask cluster on this machine: a scheduler and two worker processes (loopback)."""
    distributed = pytest.importorskip("distributed", reason="Dask is not installed (pip install 'attention-course[cluster]')")
    import logging

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0", silence_logs=logging.ERROR) as local:
        yield local


def test_a_dask_cluster_grades_the_class_like_the_local_pool(graded_class, cluster, tmp_path):
    out = tmp_path / "out"
    autograde(graded_class["folder"], out, GRADED, cell_timeout=300, roster=graded_class["roster"],
              scheduler=cluster.scheduler_address, progress=lambda line: None)
    assert read_csv(out / "grades.csv") == graded_class["grades"]
    assert read_csv(out / "students.csv") == graded_class["students"]
    graded = nbformat.read(out / "course" / "autograded" / "eva" / QKV.name / f"{QKV.name}.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in graded.cells for o in c.get("outputs", []))
    share = max(1, cores_here() // 2)
    assert f"threads {share} {share}" in printed, "two tasks at once on this host share its cores"


SLEEPER = '''import os, pathlib, time
runs = pathlib.Path({marker!r})
with open(runs, "a") as log:
    log.write(f"{{os.getpid()}}\\n")
if len(runs.read_text().split()) == 1:
    time.sleep(600)
'''


def test_a_worker_killed_mid_task_loses_nothing_and_counts_nothing_twice(cluster, tmp_path):
    """The first attempt's kernel sleeps; its worker is killed; the scheduler runs the task
    on a worker again, where it finishes. One row, full marks, no process left behind."""
    import signal
    import threading
    import time

    import psutil
    from distributed import Client
    from nbgrader.api import Gradebook

    marker = tmp_path / "runs.txt"
    sleeper = answered_notebook(QKV)
    sleeper.cells.insert(0, new_code_cell(SLEEPER.format(marker=str(marker))))
    write(tmp_path / "in" / "sleepy" / "02_qkv_attention.ipynb", sleeper)
    write(tmp_path / "in" / "wide-awake" / "02_qkv_attention.ipynb", blank(QKV))
    out = tmp_path / "out"
    done: list = []
    grader = threading.Thread(target=lambda: done.append(autograde(
        tmp_path / "in", out, [QKV], cell_timeout=700, notebook_timeout=900,
        scheduler=cluster.scheduler_address, progress=lambda line: None)))
    grader.start()
    deadline = time.monotonic() + 300
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marker.exists(), "the sleeping notebook never started"
    kernel = int(marker.read_text().split()[0])
    with Client(cluster.scheduler_address) as client:
        workers = set(client.run(os.getpid).values())
    victim = next(p.pid for p in psutil.Process(kernel).parents() if p.pid in workers)
    os.kill(victim, signal.SIGKILL)
    grader.join(timeout=600)
    assert done, "grading did not finish after the worker was killed"

    assert len(marker.read_text().split()) == 2, "the task ran again after its worker died"
    rows = {(r["student_id"], r["assignment"]): r for r in read_csv(out / "grades.csv")}
    assert {k: (float(r["score"]), r["status"]) for k, r in rows.items()} == {
        ("sleepy", QKV.name): (10.0, "graded"), ("wide-awake", QKV.name): (0.0, "graded")}
    with Gradebook(sqlite_url(out / "gradebook.db"), "attention-course") as gradebook:
        assert len(gradebook.find_assignment(QKV.name).submissions) == 2
    time.sleep(3)
    assert not psutil.pid_exists(kernel) or psutil.Process(kernel).status() == psutil.STATUS_ZOMBIE, \
        "the killed worker's kernel outlived it"
