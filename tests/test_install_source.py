"""The Colab install source is one setting, pyproject.toml's [project.urls] Repository, that
`attention-course release` writes into every notebook's setup cell."""

from __future__ import annotations

import shutil
import sys

import nbformat
import pytest

from helpers.course.lessons import find_lessons
from helpers.course.release import check, install_source, release

from conftest import LESSONS, ROOT

FORK = "https://github.com/someone/attention-fork"


def _setup_cells(notebook: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in notebook.cells if "%pip install" in cell.source]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib, the oracle, is Python 3.11+")
def test_install_source_is_the_repository_of_pyproject():
    import tomllib

    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert install_source(ROOT) == f"attention-course @ git+{urls['Repository']}"


def test_every_committed_notebook_installs_from_that_repository():
    requirement = install_source(ROOT)
    for lesson in LESSONS:
        for path in (lesson.solution, lesson.student):
            cells = _setup_cells(nbformat.read(path, as_version=4))
            assert len(cells) == 1 and f'"{requirement}"' in cells[0], path


def _course(tmp_path, pyproject: str):
    """A course of one lesson (02) whose pyproject.toml is ``pyproject``."""
    lesson = next(lesson for lesson in LESSONS if lesson.name.startswith("02_"))
    (tmp_path / "solutions" / lesson.name).mkdir(parents=True)
    shutil.copy(lesson.script, tmp_path / "solutions" / lesson.name)
    (tmp_path / "pyproject.toml").write_text(pyproject)
    return find_lessons(tmp_path)


def test_a_fork_changes_one_line_and_the_release_follows(tmp_path):
    text = (ROOT / "pyproject.toml").read_text()
    ours = install_source(ROOT).removeprefix("attention-course @ git+")
    assert text.count(ours) >= 1
    forked = text.replace(f'Repository = "{ours}"', f'Repository = "{FORK}"')
    assert forked != text
    lessons = _course(tmp_path, forked)
    release(lessons)
    for path in (lessons[0].solution, lessons[0].student):
        (cell,) = _setup_cells(nbformat.read(path, as_version=4))
        assert f'%pip install -q "attention-course @ git+{FORK}"' in cell
        assert ours not in cell
    assert check(lessons, execute=False) == []
    (tmp_path / "pyproject.toml").write_text(text)  # the setting moves back: check notices
    assert any("run `attention-course release" in problem
               for problem in check(lessons, execute=False))


def test_a_missing_setting_is_named(tmp_path):
    lessons = _course(tmp_path, '[project]\nname = "attention-course"\n[project.urls]\n'
                                'Homepage = "https://example.org"\n')
    with pytest.raises(ValueError, match=r"pyproject.toml.*Repository"):
        release(lessons)
