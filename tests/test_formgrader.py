"""Manual grading after autograde: `attention-course lab --instructor --dir DIR` opens
nbgrader's formgrader on the class that `attention-course autograde --out DIR` graded.

The class is the one of ``test_grading_class`` (graded once per test run), copied elsewhere
first: the folder works where it is moved, and formgrader's writes stay in the copy. The lab
runs on a loopback port, and the tests ask formgrader's own HTTP API (nbgrader's
``server_extensions/formgrader/apihandlers.py``) what an instructor's browser would show:
every lesson, every student's submission with the score that ``test_grading_class`` expects,
a submission's notebook rendered for grading, a manual grade that changes the score.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.course import cli, lab
from helpers.course.gradebook import sqlite_url
from helpers.course.formgrader import DB_VARIABLE, course_gradebook, write_course_config

from conftest import ROOT, free_port, lesson_named, shared_once, wait_for
from test_grading_class import EXPECTED, GRADED, grade_the_class, read_csv

pytestmark = pytest.mark.xdist_group("grading-class")  # beside the class it grades by hand

TOKEN = "formgrader-test-token"
LESSONS = {"01": lesson_named("01").name, "02": lesson_named("02").name}


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> Path:
    """The graded class, moved: a copy of autograde's --out folder somewhere else."""
    home = shared_once(tmp_path_factory, "graded-class", grade_the_class)
    moved = tmp_path_factory.mktemp("moved") / "graded"
    shutil.copytree(home / "out", moved)
    return moved


@dataclass
class Lab:
    url: str
    process: subprocess.Popen
    runtime: Path

    def get(self, path: str):
        return self.request("GET", path)

    def request(self, method: str, path: str, body: dict | None = None):
        """Formgrader's answer to ``path``: JSON from its API (which sends it as text/html),
        else the page's text as a browser shows it (code is split into highlighted spans)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                         headers={"Authorization": f"token {TOKEN}"})
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
        if path.startswith("/formgrader/api/"):
            return json.loads(text)
        return html.unescape(re.sub(r"<[^>]+>", "", text))


@pytest.fixture(scope="module")
def instructor_lab(graded, tmp_path_factory):
    """`attention-course lab --instructor --dir DIR` on a loopback port, started elsewhere."""
    tmp = tmp_path_factory.mktemp("instructor-lab")
    runtime = tmp / "runtime"
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime), JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"))
    env.pop(DB_VARIABLE, None)
    command = [sys.executable, "-m", "helpers.course.cli", "lab", "--instructor", "--dir", str(graded),
               "--no-browser", "--ip", "127.0.0.1", "--port", str(free_port()), f"--IdentityProvider.token={TOKEN}"]
    process = subprocess.Popen(command, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        info_file = wait_for(lambda: next(runtime.glob("jpserver-*.json"), None), 180,
                             "the instructor lab's jpserver-*.json", process)
        info = wait_for(lambda: info_file.stat().st_size and json.loads(info_file.read_text()), 30,
                        "the instructor lab's server info")
        yield Lab(info["url"].rstrip("/"), process, runtime)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def handed_in(graded: Path) -> dict[str, dict[str, tuple[float, str]]]:
    """lesson -> {student folder: (expected score, student id)} for every notebook graded,
    the scores from ``test_grading_class``'s hand-written table."""
    folders = {row["student_id"]: row["student_folder"] for row in read_csv(graded / "students.csv")}
    table: dict[str, dict[str, tuple[float, str]]] = {name: {} for name in LESSONS.values()}
    for (student, number), (score, status) in EXPECTED.items():
        if status != "invalid":  # not a notebook: nothing to grade by hand
            table[LESSONS[number]][folders[student]] = (float(score), student)
    return table


def test_formgrader_lists_every_graded_lesson_with_its_submissions(instructor_lab, graded):
    assignments = {a["name"]: a for a in instructor_lab.get("/formgrader/api/assignments")}
    expected = handed_in(graded)
    assert set(assignments) == {lesson.name for lesson in GRADED}  # 03 too: graded, though nobody handed it in
    assert (assignments[LESSONS["01"]]["max_score"], assignments[LESSONS["02"]]["max_score"]) == (9, 10)
    # Manage Assignments links a lesson's submissions only when it counts some (in course/submitted/)
    assert {name: a["num_submissions"] for name, a in assignments.items()} == \
        {name: len(expected.get(name, {})) for name in assignments}


def test_every_submission_is_listed_autograded_with_its_score(instructor_lab, graded):
    """Formgrader finds each student's autograded notebook on disk from the student id in
    the gradebook: a folder name that differs from the id (Unicode, Canvas ids) still matches,
    and the id as given shows as the student's name."""
    for lesson, expected in handed_in(graded).items():
        listed = instructor_lab.get(f"/formgrader/api/submissions/{lesson}")
        seen = {s["student"]: (s["score"], s["last_name"]) for s in listed}
        assert seen == expected, lesson
        assert all(s["autograded"] and s["submitted"] for s in listed), listed


def test_a_submission_opens_for_manual_grading_and_a_manual_grade_counts(instructor_lab, graded):
    lesson = LESSONS["02"]
    folder = next(f for f, (_, student) in handed_in(graded)[lesson].items() if student == "José Núñez")
    notebooks = instructor_lab.get(f"/formgrader/api/submitted_notebooks/{lesson}/{lesson}")
    mine = next(n for n in notebooks if n["student"] == folder)
    page = instructor_lab.get(f"/formgrader/submissions/{mine['id']}/")
    assert "def dot_scores(q: Tensor, k: Tensor) -> Tensor:" in page  # the student's answer, rendered
    assert folder in page
    grades = instructor_lab.get(f"/formgrader/api/grades?submission_id={mine['id']}")
    first = next(g for g in grades if g["max_score"] > 0)
    assert first["auto_score"] == first["max_score"]
    changed = instructor_lab.request("PUT", f"/formgrader/api/grade/{first['id']}",
                                     {"manual_score": first["max_score"] - 1})
    assert changed["manual_score"] == first["max_score"] - 1
    listed = {s["student"]: s["score"] for s in instructor_lab.get(f"/formgrader/api/submissions/{lesson}")}
    assert listed[folder] == mine["score"] - 1


def test_ctrl_c_stops_the_instructor_lab_cleanly(instructor_lab):
    instructor_lab.process.send_signal(signal.SIGINT)
    output, _ = instructor_lab.process.communicate(timeout=60)
    assert instructor_lab.process.returncode == 0, output
    assert "Traceback" not in output, output
    assert "Formgrader" in output and "gradebook sqlite:///" in output, output
    assert not list(instructor_lab.runtime.glob("jpserver-*")), "the lab left its server files behind"


# --- without a server --------------------------------------------------------------------

@pytest.fixture
def fake_lab(monkeypatch) -> list[dict]:
    """Replace JupyterLab by a recorder of how it would have been started."""
    launched = []
    monkeypatch.setattr(lab, "run_lab", lambda args, instructor=False, formgrader=None:
                        launched.append({"args": args, "instructor": instructor, "formgrader": formgrader}) or 0)
    monkeypatch.chdir(ROOT)  # lab changes into the folder it opens; the test's cwd comes back
    monkeypatch.delenv(DB_VARIABLE, raising=False)
    return launched


def test_a_folder_that_is_not_an_autograde_output_says_what_to_pass(tmp_path, fake_lab, capsys):
    assert cli.main(["lab", "--instructor", "--dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"--dir {tmp_path} is not an autograde output" in error and "autograde SUBMISSIONS --out DIR" in error
    (tmp_path / "course" / "autograded").mkdir(parents=True)  # graded before course/nbgrader_config.py existed
    assert cli.main(["lab", "--instructor", "--dir", str(tmp_path)]) == 2
    assert f"attention-course autograde SUBMISSIONS --out {tmp_path}" in capsys.readouterr().err
    assert cli.main(["lab", "--instructor", "--dir", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not fake_lab


def test_the_instructor_lab_on_a_graded_class_serves_it_from_its_course_folder(graded, fake_lab, tmp_path,
                                                                               capsys):
    assert cli.main(["lab", "--instructor", "--dir", str(graded)]) == 0
    assert fake_lab[0]["formgrader"] and f"--ServerApp.root_dir={graded}" in fake_lab[0]["args"]
    assert Path.cwd() == graded / "course"  # where formgrader reads nbgrader_config.py
    os.chdir(ROOT)
    assert cli.main(["lab", "--instructor", "--dir", str(graded), "--db", str(tmp_path / "elsewhere.db")]) == 2
    assert "elsewhere.db?timeout=120 does not exist" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere.db").exists()
    shutil.copy(graded / "gradebook.db", tmp_path / "elsewhere.db")  # --db: the gradebook nbgrader reads
    assert cli.main(["lab", "--instructor", "--dir", str(graded), "--db", str(tmp_path / "elsewhere.db")]) == 0
    assert course_gradebook(graded / "course") == sqlite_url(tmp_path / "elsewhere.db")


def test_the_instructor_lab_on_the_course_repository_has_no_formgrader(fake_lab, capsys, tmp_path):
    """Without a graded class formgrader would make a gradebook of its own in the repository:
    the lab says how to open one instead, and keeps Create Assignment."""
    assert cli.main(["lab", "--instructor"]) == 0
    assert fake_lab[0]["instructor"] and not fake_lab[0]["formgrader"]
    assert f"--ServerApp.root_dir={ROOT}" in fake_lab[0]["args"]
    assert "attention-course lab --instructor --dir DIR" in capsys.readouterr().out
    lab.write_config(tmp_path, instructor=True, formgrader=False)
    disabled = json.loads((tmp_path / "labconfig" / "page_config.json").read_text())["disabledExtensions"]
    extensions = json.loads((tmp_path / "jupyter_server_config.json").read_text())["ServerApp"]["jpserver_extensions"]
    assert disabled.get("@jupyter/nbgrader:formgrader") and not disabled.get("@jupyter/nbgrader:create-assignment")
    assert extensions["nbgrader.server_extensions.formgrader"] is False
    assert cli.main(["lab", "--db", "grades.db"]) == 2  # --db belongs to a graded class


def test_a_gradebook_password_is_never_written(tmp_path, monkeypatch):
    """The configuration names the gradebook without its password, which comes from
    ATTENTION_COURSE_DB when nbgrader reads the file."""
    course = tmp_path / "graded" / "course"
    url = "postgresql+psycopg://grader:s3cret-pw@db.example.org:5432/course"
    monkeypatch.delenv(DB_VARIABLE, raising=False)
    config = write_course_config(course, url, 120)
    assert "s3cret-pw" not in config.read_text()
    assert course_gradebook(course) == "postgresql+psycopg://grader@db.example.org:5432/course"
    monkeypatch.setenv(DB_VARIABLE, url)
    assert course_gradebook(course) == url
