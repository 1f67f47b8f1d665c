"""A PostgreSQL gradebook, tested live: the suite starts a real server (Debian's
``postgresql`` package: ``initdb`` and ``pg_ctl`` in a temporary folder, on a loopback port).
Two graders writing to it at once, a re-run and a ``--lesson`` partial run leave exactly one
grade per student and lesson, in nbgrader's tables and in the course's.
"""

from __future__ import annotations

import csv
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

from helpers.course.release import answered_notebook

from conftest import ROOT, free_port, lesson_named

pytestmark = pytest.mark.xdist_group("grading-postgres")  # one server for the module

RNN, QKV = lesson_named("01"), lesson_named("02")


def postgres_binaries() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: Debian keeps them out of PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


@pytest.fixture(scope="module")
def postgres():
    """The URL of a PostgreSQL server that lives as long as this module's tests."""
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does it)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver is missing: pip install 'attention-course[cluster]'")
    home = Path(tempfile.mkdtemp(prefix="attention-course-postgres-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no postgres user to run the server as")
        shutil.chown(home, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = home / "data"
    subprocess.run(as_user + [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                              "-E", "UTF8", "--locale=C"], check=True, capture_output=True)
    subprocess.run(as_user + [str(binaries / "pg_ctl"), "-D", str(data), "-l", str(home / "server.log"), "-w",
                              "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(as_user + [str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def database(postgres, request):
    """A fresh database on the server for one test."""
    import psycopg

    name = "grades_" + request.node.name.lower()[:40].replace("-", "_")
    with psycopg.connect(postgres + "/postgres", autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{postgres}/{name}"


def counts(url: str) -> tuple[dict, dict]:
    """How many course rows and nbgrader submissions each (student, lesson) has."""
    import sqlalchemy

    from helpers.course.gradebook import database_url

    engine = sqlalchemy.create_engine(database_url(url, Path(".")))
    with engine.connect() as db:
        ours = dict(((r[0], r[1]), r[2]) for r in db.execute(sqlalchemy.text(
            "SELECT folder, assignment, count(*) FROM attention_course_grades GROUP BY folder, assignment")))
        theirs = dict(((r[0], r[1]), r[2]) for r in db.execute(sqlalchemy.text(
            "SELECT student.id, assignment.name, count(*) FROM submitted_assignment "
            "JOIN student ON student.id = submitted_assignment.student_id "
            "JOIN assignment ON assignment.id = submitted_assignment.assignment_id "
            "GROUP BY student.id, assignment.name")))
    engine.dispose()
    return ours, theirs


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "helpers.course.cli", "autograde", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, ATTENTION_COURSE_ROOT=str(ROOT)))


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output
    return output


def grades(path: Path) -> dict:
    with open(path, newline="", encoding="utf-8") as handle:
        return {(r["student_id"], r["assignment"]): (float(r["score"]), r["status"]) for r in csv.DictReader(handle)}


def test_parallel_graders_a_rerun_and_a_partial_run_leave_one_grade_each(database, tmp_path):
    submissions = tmp_path / "in"
    for student in ("ann", "ben"):  # one notebook, handed in twice: each grader runs it once
        (submissions / student).mkdir(parents=True)
        nbformat.write(answered_notebook(QKV), submissions / student / f"{QKV.name}.ipynb")
    (submissions / "ann" / f"{RNN.name}.ipynb").write_text("{ lost in the upload")
    lessons = ["--lesson", RNN.name, "--lesson", QKV.name]
    expected = {("ann", RNN.name): (0.0, "invalid"), ("ann", QKV.name): (10.0, "graded"),
                ("ben", RNN.name): (0.0, "missing"), ("ben", QKV.name): (10.0, "graded")}
    one_each = {("ann", RNN.name): 1, ("ann", QKV.name): 1, ("ben", QKV.name): 1}

    graders = [cli("in", "--out", name, "--db", database, "--jobs", "1", *lessons, cwd=tmp_path)
               for name in ("first", "second")]
    for grader in graders:
        finished(grader)
    ours, theirs = counts(database)
    assert ours == one_each
    assert theirs == {("ann", QKV.name): 1, ("ben", QKV.name): 1}, "no nbgrader grade for an invalid notebook"
    assert grades(tmp_path / "first" / "grades.csv") == grades(tmp_path / "second" / "grades.csv") == expected

    again = finished(cli("in", "--out", "first", "--db", database, *lessons, cwd=tmp_path))
    assert "unchanged since they were graded" in again
    assert counts(database)[0] == one_each
    assert grades(tmp_path / "first" / "grades.csv") == expected

    finished(cli("in", "--out", "first", "--db", database, "--lesson", QKV.name, "--force", cwd=tmp_path))
    ours, theirs = counts(database)
    assert ours == one_each and theirs == {("ann", QKV.name): 1, ("ben", QKV.name): 1}
    assert grades(tmp_path / "first" / "grades.csv") == expected
