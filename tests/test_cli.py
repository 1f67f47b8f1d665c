"""`attention-course lab`: a student's own copy of the notebooks, opened in JupyterLab."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import nbformat
import pytest

from helpers.course import cli

from conftest import LESSONS, ROOT, free_port, wait_for


def fake_lab(monkeypatch) -> list[tuple[list[str], bool]]:
    """Replace JupyterLab by a recorder of what it would have been started with."""
    from helpers.course import lab

    launched = []
    monkeypatch.setattr(lab, "run_lab", lambda args, instructor=False, formgrader=None:
                        launched.append((args, instructor)) or 0)
    monkeypatch.chdir(ROOT)  # lab changes into the folder it opens; the test's cwd comes back
    return launched


def test_lab_copies_the_student_notebooks_once_and_opens_them(tmp_path, monkeypatch):
    launched = fake_lab(monkeypatch)
    assert cli.main(["lab", "--dir", str(tmp_path), "--no-browser", "--port", "8899",
                     "--IdentityProvider.token=secret"]) == 0
    for lesson in LESSONS:
        copy = nbformat.read(tmp_path / lesson.name / lesson.student.name, as_version=4)
        assert copy.cells == nbformat.read(lesson.student, as_version=4).cells
        # JupyterLab writes the kernel's language_info into a notebook when the kernel starts:
        # the copy has it already, so that a lesson does not open marked unsaved
        assert copy.metadata.language_info.version == platform.python_version()
    args, instructor = launched[0]
    assert f"--ServerApp.root_dir={tmp_path}" in args and "--ServerApp.open_browser=False" in args
    assert "--ServerApp.port=8899" in args and "--IdentityProvider.token=secret" in args
    assert not instructor

    mine = tmp_path / LESSONS[0].name / LESSONS[0].student.name
    mine.write_text("my work")
    assert cli.main(["lab", "--dir", str(tmp_path)]) == 0
    assert mine.read_text() == "my work", "lab overwrote the student's own notebook"


def test_lab_as_root_allows_root_and_says_so(tmp_path, monkeypatch, capsys):
    launched = fake_lab(monkeypatch)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert cli.main(["lab", "--dir", str(tmp_path)]) == 0
    assert "--ServerApp.allow_root=True" in launched[0][0]
    assert "running as root" in capsys.readouterr().out
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["lab", "--dir", str(tmp_path)]) == 0
    assert "--ServerApp.allow_root=True" not in launched[1][0]


def test_lab_instructor_mode_opens_the_course_without_copying(monkeypatch):
    launched = fake_lab(monkeypatch)
    before = sorted(ROOT.iterdir())
    assert cli.main(["lab", "--instructor"]) == 0
    args, instructor = launched[0]
    assert instructor and f"--ServerApp.root_dir={ROOT}" in args
    assert sorted(ROOT.iterdir()) == before, "instructor mode copied student notebooks"


def test_lab_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["lab", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--dir", "--port", "--ip", "--no-browser", "--instructor", "--allow-root"):
        assert option in help_text


def test_student_lab_hides_the_instructor_tools_and_the_news(tmp_path):
    """nbgrader's documented switches: its instructor lab and server extensions off for a
    student, on for an instructor; Validate stays; JupyterLab's news pop-up off for both."""
    import json

    from helpers.course.lab import write_config

    for instructor in (False, True):
        folder = tmp_path / str(instructor)
        write_config(folder, instructor)
        disabled = json.loads((folder / "labconfig" / "page_config.json").read_text())["disabledExtensions"]
        server = json.loads((folder / "jupyter_server_config.json").read_text())
        extensions = server["ServerApp"]["jpserver_extensions"]
        assert disabled.get("@jupyterlab/apputils-extension:announcements")
        assert not disabled.get("@jupyter/nbgrader:validate-assignment")
        assert "nbgrader.server_extensions.validate_assignment" not in extensions
        for plugin in ("formgrader", "create-assignment", "course-list", "assignment-list"):
            assert bool(disabled.get(f"@jupyter/nbgrader:{plugin}")) is not instructor
        assert extensions["nbgrader.server_extensions.formgrader"] is instructor


def test_ctrl_c_stops_the_lab_with_jupyters_own_shutdown(tmp_path):
    """SIGINT (Ctrl-C) ends `attention-course lab` with exit 0, no traceback, its kernels shut
    down and no jpserver-*.json left behind: Jupyter's own shutdown ran."""
    import json
    import signal
    import urllib.request

    from jupyter_client import BlockingKernelClient

    runtime = tmp_path / "runtime"
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime), JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    lab = subprocess.Popen([sys.executable, "-m", "helpers.course.cli", "lab", "--dir", str(tmp_path / "work"),
                            "--no-browser", "--ip", "127.0.0.1", "--port", str(free_port()),
                            "--IdentityProvider.token=secret"],
                           env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        info_file = wait_for(lambda: next(runtime.glob("jpserver-*.json"), None), 180,
                             "the server's jpserver-*.json", lab)
        info = wait_for(lambda: info_file.stat().st_size and json.loads(info_file.read_text()), 30,
                        "the server's info")
        request = urllib.request.Request(f"{info['url']}api/kernels", data=b"{}", method="POST",
                                         headers={"Authorization": f"token {info['token']}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 201
        (connection_file,) = wait_for(lambda: list(runtime.glob("kernel-*.json")), 60,
                                      "the kernel's connection file", lab)
        client = BlockingKernelClient(connection_file=str(connection_file))
        client.load_connection_file()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=120)  # a kernel interrupted while it starts prints a traceback
        finally:
            client.stop_channels()
        lab.send_signal(signal.SIGINT)
        output, _ = lab.communicate(timeout=60)
    finally:
        if lab.poll() is None:
            lab.kill()
            lab.communicate()
    assert lab.returncode == 0, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "Use Control-C to stop this server" in output and "twice" not in output, output
    left = sorted(path.name for path in runtime.iterdir() if path.name.startswith(("jpserver-", "kernel-")))
    assert not left, f"the lab left {left} behind"


def test_other_commands_refuse_unknown_options(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["check", "--no-browser"])
    assert exit.value.code == 2
    assert "unrecognized arguments: --no-browser" in capsys.readouterr().err


def test_check_works_without_an_activated_environment():
    """nbgrader runs `alembic` when it makes a gradebook: the tools must find it even when
    only `.venv/bin/attention-course` is called and `.venv/bin` is not on PATH."""
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(["/usr/bin", "/bin"])
    result = subprocess.run([sys.executable, "-m", "helpers.course.cli", "check", "--no-execute", "01"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
