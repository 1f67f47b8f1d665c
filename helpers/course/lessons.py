"""Where the course lives on disk: its root, its lessons, and the nbgrader settings they share."""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from traitlets.config import Config

LESSON_NAME = re.compile(r"^\d\d_[a-z0-9_]+$")


class CourseError(RuntimeError):
    """Something about the course folder is wrong; the message names the path."""


@dataclass(frozen=True)
class Lesson:
    """One lesson: a percent script in ``solutions/NAME/`` and the notebooks made from it."""

    root: Path
    name: str

    @property
    def script(self) -> Path:
        return self.root / "solutions" / self.name / f"{self.name}.py"

    @property
    def solution(self) -> Path:
        return self.root / "solutions" / self.name / f"{self.name}.ipynb"

    @property
    def student(self) -> Path:
        return self.root / "notebooks" / self.name / f"{self.name}.ipynb"


def find_root(start: Path | None = None) -> Path:
    """The course root: ``$ATTENTION_COURSE_ROOT``, else the first folder at or above ``start``
    (default: the working directory) that holds ``solutions/``, else the source checkout that
    this package was installed from (an editable install)."""
    if os.environ.get("ATTENTION_COURSE_ROOT"):
        root = Path(os.environ["ATTENTION_COURSE_ROOT"]).resolve()
        if not (root / "solutions").is_dir():
            raise CourseError(f"ATTENTION_COURSE_ROOT={root} has no solutions/ folder")
        return root
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "solutions").is_dir() and (folder / "pyproject.toml").is_file():
            return folder
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "solutions").is_dir():
        return checkout
    raise CourseError(f"no course found at or above {start}: expected a folder with "
                      "solutions/ and pyproject.toml (or set ATTENTION_COURSE_ROOT)")


def find_lessons(root: Path, names: list[str] | None = None) -> list[Lesson]:
    """The lessons under ``root/solutions``, in course order; ``names`` picks some of them
    (a full name such as ``02_qkv_attention`` or just its number ``02``)."""
    solutions = root / "solutions"
    if not solutions.is_dir():
        raise CourseError(f"no solutions/ folder in {root}")
    available = sorted(p.name for p in solutions.iterdir()
                       if p.is_dir() and LESSON_NAME.match(p.name) and (p / f"{p.name}.py").is_file())
    if not names:
        return [Lesson(root, name) for name in available]
    chosen = []
    for name in names:
        matches = [lesson for lesson in available if lesson == name or lesson.split("_")[0] == name]
        if not matches:
            raise CourseError(f"no lesson {name!r} in {solutions} (there are: {', '.join(available)})")
        chosen.extend(Lesson(root, match) for match in matches if Lesson(root, match) not in chosen)
    return chosen


def nbgrader_config(course_dir: Path, db_url: str, cell_timeout: int = 120) -> Config:
    """The nbgrader settings of this course, for a course folder and a gradebook."""
    c = Config()
    c.CourseDirectory.root = str(course_dir)
    c.CourseDirectory.db_url = db_url
    c.CourseDirectory.course_id = "attention-course"
    c.NbGraderAPI.log_level = "WARN"
    c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
    c.Execute.timeout = cell_timeout
    c.Execute.interrupt_on_timeout = True
    # nbgrader fails the whole notebook when outputs arrive later than iopub_timeout after a
    # cell's reply (4 s by default): on a busy machine a plain `import torch` can take longer.
    c.Execute.iopub_timeout = 60
    c.Execute.kernel_name = "python3"
    c.OverwriteCells.add_missing_cells = True
    c.GenerateFeedback.force = True
    return c


def scripts_on_path() -> None:
    """Put the folder of this Python's scripts on ``PATH``: nbgrader runs the ``alembic``
    command when it creates a gradebook, and ``.venv/bin/attention-course`` must work
    without an activated environment."""
    scripts = {sysconfig.get_path("scripts"), str(Path(sys.executable).parent)}
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([folder for folder in scripts if folder not in path] + path)


def nbgrader_api(course_dir: Path, db_url: str, cell_timeout: int = 120, config: Config | None = None):
    """An ``NbGraderAPI`` for a course folder and a gradebook (``config`` adds settings)."""
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory

    scripts_on_path()
    settings = nbgrader_config(course_dir, db_url, cell_timeout)
    if config is not None:
        settings.merge(config)
    return NbGraderAPI(coursedir=CourseDirectory(config=settings), config=settings)


def nbgrader_failure(what: str, result: dict) -> str:
    """The message for a failed nbgrader call: its log holds the cause, its error the rest."""
    details = "\n".join(part for part in (result.get("log"), result.get("error")) if part)
    return f"nbgrader could not {what}:\n{details.strip()}"
