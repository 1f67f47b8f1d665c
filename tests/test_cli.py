"""`attention-course lab`: a student's own copy of the notebooks, opened in JupyterLab."""

from __future__ import annotations

import subprocess

import pytest

from helpers.course import cli

from conftest import LESSONS


def test_lab_copies_the_student_notebooks_once_and_opens_them(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(subprocess, "call", lambda command, cwd: launched.append((command, cwd)) or 0)
    assert cli.main(["lab", "--dir", str(tmp_path), "--no-browser"]) == 0
    for lesson in LESSONS:
        copy = tmp_path / lesson.name / lesson.student.name
        assert copy.read_bytes() == lesson.student.read_bytes()
    command, cwd = launched[0]
    assert "jupyterlab" in command and "--no-browser" in command and cwd == tmp_path

    mine = tmp_path / LESSONS[0].name / LESSONS[0].student.name
    mine.write_text("my work")
    assert cli.main(["lab", "--dir", str(tmp_path)]) == 0
    assert mine.read_text() == "my work", "lab overwrote the student's own notebook"


def test_other_commands_refuse_unknown_options(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["check", "--no-browser"])
    assert exit.value.code == 2
    assert "unrecognized arguments: --no-browser" in capsys.readouterr().err


def test_check_works_without_an_activated_environment():
    """nbgrader runs `alembic` when it makes a gradebook: the tools must find it even when
    only `.venv/bin/attention-course` is called and `.venv/bin` is not on PATH."""
    import os
    import sys

    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(["/usr/bin", "/bin"])
    result = subprocess.run([sys.executable, "-m", "helpers.course.cli", "check", "--no-execute", "01"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
