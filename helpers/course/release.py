"""Release: lesson script -> solution notebook -> student notebook (nbgrader), and the check
that what is committed is exactly what the release makes, leaks nothing, and runs.

Each notebook's setup cell installs the course on Colab from one place, the ``Repository``
URL in ``pyproject.toml``'s ``[project.urls]``: the release writes it into every notebook,
so a fork changes that line and runs ``attention-course release``.
"""

from __future__ import annotations

import re
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nbformat

from helpers.course.lessons import Lesson, nbgrader_api, nbgrader_failure
from helpers.course.source import build_notebook, write_notebook

SECRET_REGIONS = (("### BEGIN SOLUTION", "### END SOLUTION"),
                  ("### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"))
# The package requirement in a setup cell's `%pip install`: attention-course @ git+URL
INSTALL_REQUIREMENT = re.compile(r'(%pip install [^\n"]*")attention-course @ [^"]*(")')
_URLS_TABLE = re.compile(r"^\[project\.urls\][ \t]*$(?P<body>.*?)(?=^\[|\Z)", re.M | re.S)
_REPOSITORY = re.compile(r'^[ \t]*Repository[ \t]*=[ \t]*"(?P<url>[^"]+)"', re.M)


def install_source(root: Path) -> str:
    """The requirement each notebook's setup cell installs on Colab,
    ``attention-course @ git+URL``, with URL the ``Repository`` of ``[project.urls]`` in
    ``root/pyproject.toml``."""
    pyproject = root / "pyproject.toml"
    table = _URLS_TABLE.search(pyproject.read_text(encoding="utf-8"))
    url = _REPOSITORY.search(table["body"]) if table else None
    if url is None:
        raise ValueError(f'{pyproject}: [project.urls] has no Repository = "https://..." line, '
                         "the repository that the notebooks install the course from on Colab")
    return f"attention-course @ git+{url['url']}"


def solution_notebook(lesson: Lesson) -> nbformat.NotebookNode:
    """The lesson's script as a notebook, its setup cell installing :func:`install_source`."""
    notebook = build_notebook(lesson.script)
    requirement = install_source(lesson.root)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.source = INSTALL_REQUIREMENT.sub(
                lambda match: f"{match[1]}{requirement}{match[2]}", cell.source)
    return notebook


def student_notebooks(lessons: list[Lesson]) -> dict[str, nbformat.NotebookNode]:
    """Run ``nbgrader generate_assignment`` on the lessons' scripts in a scratch course."""
    with tempfile.TemporaryDirectory(prefix="attention-course-release-") as scratch:
        course = Path(scratch)
        for lesson in lessons:
            write_notebook(solution_notebook(lesson), course / "source" / lesson.name / f"{lesson.name}.ipynb")
        api = nbgrader_api(course, f"sqlite:///{course / 'gradebook.db'}")
        made = {}
        for lesson in lessons:
            result = api.generate_assignment(lesson.name)
            if not result["success"]:
                raise RuntimeError(nbgrader_failure(f"release {lesson.name}", result))
            released = course / "release" / lesson.name / f"{lesson.name}.ipynb"
            made[lesson.name] = nbformat.read(released, as_version=4)
        return made


def release(lessons: list[Lesson]) -> list[Path]:
    """Rebuild ``solutions/NAME/NAME.ipynb`` and ``notebooks/NAME/NAME.ipynb`` for each lesson."""
    for lesson in lessons:
        write_notebook(solution_notebook(lesson), lesson.solution)
    written = []
    for name, notebook in student_notebooks(lessons).items():
        lesson = next(lesson for lesson in lessons if lesson.name == name)
        write_notebook(notebook, lesson.student)
        written += [lesson.solution, lesson.student]
    return written


def _secret_and_visible_lines(notebook: nbformat.NotebookNode) -> tuple[set[str], set[str]]:
    """Lines inside solution / hidden-test regions, and lines outside them."""
    secret, visible = set(), set()
    for cell in notebook.cells:
        inside = False
        for line in cell.source.splitlines():
            stripped = line.strip()
            if any(stripped == begin for begin, _ in SECRET_REGIONS):
                inside = True
            elif any(stripped == end for _, end in SECRET_REGIONS):
                inside = False
            elif stripped:
                (secret if inside else visible).add(stripped)
    return secret, visible


def leaks(solution: nbformat.NotebookNode, student: nbformat.NotebookNode) -> list[str]:
    """Solution or hidden-test lines that appear in a student notebook."""
    secret, visible = _secret_and_visible_lines(solution)
    found = []
    for cell in student.cells:
        for line in cell.source.splitlines():
            stripped = line.strip()
            if any(stripped in pair for pair in SECRET_REGIONS):
                found.append(f"cell {cell.get('id')}: region marker {stripped!r}")
            elif stripped in secret and stripped not in visible:
                found.append(f"cell {cell.get('id')}: {stripped!r}")
    return found


def _normalised(notebook: nbformat.NotebookNode) -> str:
    return nbformat.writes(notebook)


def first_exercise_index(notebook: nbformat.NotebookNode) -> int:
    """Index of the first answer cell (nbgrader ``solution``), or the number of cells."""
    for index, cell in enumerate(notebook.cells):
        if cell.metadata.get("nbgrader", {}).get("solution"):
            return index
    return len(notebook.cells)


def run_until_first_exercise(path: Path, timeout: int = 120) -> str | None:
    """Execute a student notebook up to its first exercise; return an error, or None."""
    import nbclient

    notebook = nbformat.read(path, as_version=4)
    notebook.cells = notebook.cells[:first_exercise_index(notebook)]
    client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except Exception as error:  # noqa: BLE001 - any failure is reported with the notebook's name
        return f"{path}: does not run up to its first exercise: {type(error).__name__}: {str(error)[-800:]}"
    return None


def check(lessons: list[Lesson], execute: bool = True, jobs: int = 2) -> list[str]:
    """Everything that is wrong with the committed notebooks, as messages (empty when fine)."""
    problems = []
    for lesson in lessons:
        if not lesson.solution.is_file():
            problems.append(f"{lesson.solution} is missing: run `attention-course release {lesson.name}`")
        elif _normalised(nbformat.read(lesson.solution, as_version=4)) != _normalised(solution_notebook(lesson)):
            problems.append(f"{lesson.solution} differs from {lesson.script.name}: run `attention-course release {lesson.name}`")
    for name, made in student_notebooks(lessons).items():
        lesson = next(lesson for lesson in lessons if lesson.name == name)
        if not lesson.student.is_file():
            problems.append(f"{lesson.student} is missing: run `attention-course release {lesson.name}`")
            continue
        committed = nbformat.read(lesson.student, as_version=4)
        if _normalised(committed) != _normalised(made):
            problems.append(f"{lesson.student} is not what the release makes of {lesson.script}: run `attention-course release {lesson.name}`")
        problems += [f"{lesson.student}: leaks {leak}" for leak in leaks(solution_notebook(lesson), committed)]
    if execute:
        runnable = [lesson.student for lesson in lessons if lesson.student.is_file()]
        with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
            problems += [error for error in pool.map(run_until_first_exercise, runnable) if error]
    return problems



def answered_notebook(lesson: Lesson, replace: dict[str, str] | None = None) -> nbformat.NotebookNode:
    """The student notebook with every answer cell filled in from the solution, as a student
    who solved everything would hand it in; ``replace`` swaps in other answers by cell id."""
    student = nbformat.read(lesson.student, as_version=4)
    solution = {cell.id: cell.source for cell in solution_notebook(lesson).cells}
    for cell in student.cells:
        if cell.metadata.get("nbgrader", {}).get("solution"):
            cell.source = (replace or {}).get(cell.id, solution[cell.id])
    return student
