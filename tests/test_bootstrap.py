"""`bootstrap.py`: which PyTorch a first install picks, and a relaunch that installs nothing."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT


def load_bootstrap(path: Path = ROOT / "bootstrap.py"):
    spec = importlib.util.spec_from_file_location("bootstrap_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bootstrap = load_bootstrap()


def test_linux_without_a_gpu_tries_the_cpu_index_first_then_pypi():
    (what, first), (_, fallback) = bootstrap.torch_choices({}, "Linux", nvidia_gpu=False)
    assert "CPU" in what and first[first.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert int(first[first.index("--timeout") + 1]) <= 30 and first[-1] == "torch"
    assert fallback == ["torch"]


@pytest.mark.parametrize("system, gpu", [("Linux", True), ("Darwin", False), ("Windows", False)])
def test_elsewhere_pypis_build(system, gpu):
    assert [arguments for _, arguments in bootstrap.torch_choices({}, system, gpu)] == [["torch"]]


def test_torch_spec_overrides_the_choice():
    for system, gpu in [("Linux", False), ("Linux", True), ("Darwin", False)]:
        choices = bootstrap.torch_choices({"TORCH_SPEC": "torch==2.13.0"}, system, gpu)
        assert [arguments for _, arguments in choices] == [["torch==2.13.0"]]
    spec = "torch --index-url https://download.pytorch.org/whl/cu126"
    assert bootstrap.torch_choices({"TORCH_SPEC": spec}, "Linux", False)[0][1] == spec.split()


@pytest.fixture
def stubbed(monkeypatch):
    """bootstrap on Linux without nvidia-smi, with pip and the index probe replaced: returns
    the pip calls made and a dict to set the stubs' answers."""
    answers = {"unreachable": None, "pip": [0, 0], "torch": "2.13.0+cpu \n"}
    calls = []
    monkeypatch.delenv("TORCH_SPEC", raising=False)
    monkeypatch.setattr(bootstrap.platform, "system", lambda: "Linux")
    monkeypatch.setattr(bootstrap.shutil, "which", lambda name: None)
    monkeypatch.setattr(bootstrap, "unreachable", lambda index: answers["unreachable"])
    monkeypatch.setattr(bootstrap, "run", lambda *command, check=True: calls.append(command[5:])
                        or answers["pip"][len(calls) - 1])
    monkeypatch.setattr(bootstrap.subprocess, "run", lambda *args, **kwargs: subprocess.CompletedProcess(
        args, 0, stdout=answers["torch"]))
    return calls, answers


def test_cpu_index_reachable_installs_the_cpu_build_and_says_so(stubbed, capsys):
    calls, _ = stubbed
    bootstrap.install_torch(Path("python"))
    assert len(calls) == 1 and "https://download.pytorch.org/whl/cpu" in calls[0]
    out = capsys.readouterr().out
    assert "installing the CPU-only build" in out and "installed torch 2.13.0+cpu (CPU build)" in out


def test_cpu_index_unreachable_falls_back_to_pypi_and_says_so(stubbed, capsys):
    calls, answers = stubbed
    answers["unreachable"] = "timed out"
    answers["torch"] = "2.13.0 12.8\n"
    bootstrap.install_torch(Path("python"))
    assert calls == [("torch",)]
    out = capsys.readouterr().out
    assert "cannot be reached (timed out)" in out and "installing PyPI's build" in out
    assert "installed torch 2.13.0 (CUDA 12.8 build)" in out


def test_cpu_index_failing_in_pip_falls_back_to_pypi(stubbed, capsys):
    calls, answers = stubbed
    answers["pip"] = [1, 0]
    bootstrap.install_torch(Path("python"))
    assert len(calls) == 2 and "--index-url" in calls[0] and calls[1] == ("torch",)
    assert "could not be installed; trying the next choice" in capsys.readouterr().out


def test_an_install_with_extras_covers_the_plain_one_until_pyproject_changes():
    record = {"pyproject": "abc", "extras": ["test"]}
    assert bootstrap.installed(record, "abc", "test") and bootstrap.installed(record, "abc", "")
    assert not bootstrap.installed({"pyproject": "abc", "extras": [""]}, "abc", "test")
    assert not bootstrap.installed(record, "changed", "") and not bootstrap.installed({}, "abc", "")


TOY_COURSE = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "toy-course"
version = "0.1"

[project.scripts]
attention-course = "toy_course:main"

[tool.setuptools]
py-modules = ["toy_course"]
"""
TOY_TORCH = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "torch"
version = "0.0.1"

[tool.setuptools]
packages = ["torch"]
"""


def offline(env: dict[str, str]) -> dict[str, str]:
    """``env`` with every way pip finds packages pointed at a closed port."""
    env = {key: value for key, value in env.items() if not key.startswith("PIP_")}
    return dict(env, PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple",
                PIP_RETRIES="0", PIP_TIMEOUT="2")


def test_relaunch_installs_nothing_and_works_offline(tmp_path):
    """After one install, `bootstrap.py lab` starts the course without pip: a relaunch with
    every package index unreachable works; once pyproject.toml changes it installs again
    (and, offline, fails: so the relaunch really did not reach pip)."""
    project = tmp_path / "course"
    (project / "toy_torch" / "torch").mkdir(parents=True)
    shutil.copy2(ROOT / "bootstrap.py", project / "bootstrap.py")
    (project / "pyproject.toml").write_text(TOY_COURSE)
    (project / "toy_course.py").write_text(textwrap.dedent("""\
        import sys
        def main():
            print("LAB", *sys.argv[1:])
        """))
    (project / "toy_torch" / "pyproject.toml").write_text(TOY_TORCH)
    (project / "toy_torch" / "torch" / "__init__.py").write_text("__version__ = '0.0.1'\nfrom . import version\n")
    (project / "toy_torch" / "torch" / "version.py").write_text("cuda = None\n")
    env = dict(os.environ, TORCH_SPEC=str(project / "toy_torch"))

    def launch(environment):
        return subprocess.run([sys.executable, "bootstrap.py", "lab", "--no-browser"], cwd=project,
                              env=environment, capture_output=True, text=True, timeout=600)

    first = launch(env)
    if first.returncode != 0 and "pip install" in first.stdout and "Could not find" in first.stderr:
        pytest.skip(f"the first install needs a package index (for setuptools): {first.stderr[-300:]}")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "installed torch 0.0.1 (CPU build)" in first.stdout and "LAB lab --no-browser" in first.stdout

    again = launch(offline(env))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "pip" not in again.stdout and again.stdout.strip() == "LAB lab --no-browser"

    (project / "pyproject.toml").write_text(TOY_COURSE.replace('version = "0.1"', 'version = "0.2"'))
    changed = launch(offline(env))
    assert changed.returncode != 0 and "pip install" in changed.stdout, changed.stdout + changed.stderr
