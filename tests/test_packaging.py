"""The install: pyproject, environment.yml, CI and the README agree with each other."""

from __future__ import annotations

import re
import tomllib

from conftest import ROOT

CONDA_NAMES = {"torch": "pytorch"}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_name(requirement: str) -> tuple[str, str]:
    match = re.match(r"^([A-Za-z0-9_.-]+)\s*(.*)$", requirement.strip())
    assert match, requirement
    return match[1].lower(), match[2].replace(" ", "")


def environment_dependencies() -> dict[str, str]:
    """The conda dependencies of environment.yml (a flat list, so no YAML parser is needed)."""
    deps, inside = {}, False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line.startswith("dependencies:"):
            inside = True
        elif inside and re.match(r"^  - [A-Za-z]", line):
            name, spec = requirement_name(line[4:])
            deps[name] = spec
    return deps


def test_environment_yml_mirrors_pyproject():
    declared = dict(requirement_name(r) for r in pyproject()["project"]["dependencies"])
    conda = environment_dependencies()
    conda.pop("pip")
    assert conda.pop("python") == ">=" + pyproject()["project"]["requires-python"].lstrip(">=")
    assert {CONDA_NAMES.get(name, name): spec for name, spec in declared.items()} == conda


def test_torch_range_is_wide_and_ci_installs_the_cpu_build_first():
    declared = dict(requirement_name(r) for r in pyproject()["project"]["dependencies"])
    assert declared["torch"].startswith(">=") and "==" not in declared["torch"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("torch==") < ci.index("bootstrap.py test")


def test_console_script_and_extras():
    project = pyproject()["project"]
    assert project["scripts"]["attention-course"] == "helpers.course.cli:main"
    assert any(r.startswith("transformers") for r in project["optional-dependencies"]["oracles"])
    assert any(r.startswith("pytest") for r in project["optional-dependencies"]["test"])


def test_readme_quick_start_and_lesson_map():
    readme = (ROOT / "README.md").read_text()
    assert "python3 bootstrap.py lab" in readme and "python3 bootstrap.py test" in readme
    for number in range(1, 12):
        assert re.search(rf"^\| {number:02d} ", readme, re.MULTILINE), f"lesson {number:02d} missing from the map"
    assert "environment.yml" in readme and "Colab" in readme and "GPU" in readme
