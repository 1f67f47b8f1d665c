"""The nbgrader course folder that nbgrader's formgrader opens after ``autograde``.

``autograde --out DIR`` grades into an nbgrader course folder, ``DIR/course`` (``source/``,
``release/``, ``autograded/<student folder>/<lesson>/``), and a gradebook whose nbgrader
student ids are those folder names. Formgrader finds a course through ``nbgrader_config.py``
in its server's working directory, so ``autograde`` writes one into ``DIR/course`` (the
course's nbgrader settings, the course root and the gradebook) and the instructor's lab
starts there, serving DIR.

A gradebook password is never written to disk: the URL is stored without it, and the
password comes from ``ATTENTION_COURSE_DB`` (the whole URL, read by the configuration file
itself) or, for PostgreSQL, from ``PGPASSWORD`` or ``~/.pgpass``.
"""

from __future__ import annotations

import os
from pathlib import Path

from helpers.course.gradebook import COURSE_ID, database_url, shown
from helpers.course.lessons import CourseError, nbgrader_config

CONFIG = "nbgrader_config.py"
DB_VARIABLE = "ATTENTION_COURSE_DB"
COURSE_FOLDER = "course"  # where autograde puts the nbgrader course folder inside DIR
KEPT_BY_THE_FILE = {("CourseDirectory", "root"), ("CourseDirectory", "db_url")}  # written as expressions

HEADER = '''"""nbgrader's settings for this course folder, written by `attention-course autograde` (every
run rewrites it). Open it with `attention-course lab --instructor --dir DIR`, DIR being the
folder above this one (autograde's --out).

The gradebook: ${variable} when it is set (the whole URL), else the one graded into.{password}
"""
import os
from pathlib import Path

c = get_config()  # noqa: F821 - nbgrader defines it
here = Path(__file__).resolve().parent
c.CourseDirectory.root = str(here)'''


def without_password(url: str) -> tuple[str, bool]:
    """The URL with its password removed, and whether it had one."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.password is None:
        return url, False
    return parsed._replace(password=None).render_as_string(hide_password=False), True  # set() ignores None


def config_text(course: Path, url: str, cell_timeout: int) -> str:
    """``nbgrader_config.py`` for ``course`` and the gradebook at ``url``: the course's
    nbgrader settings; a SQLite gradebook inside the autograde folder is named relative to
    the file, so the folder can be moved or copied."""
    stored, had_password = without_password(url)
    sqlite = stored.split("?", 1)[0].removeprefix("sqlite:///") if stored.startswith("sqlite:///") else None
    location = repr(stored)
    if sqlite and Path(sqlite).parent == course.resolve().parent:
        query = stored.partition("?")[2]
        location = f'f"sqlite:///{{here.parent / {Path(sqlite).name!r}}}' + (f'?{query}"' if query else '"')
    note = ("\nIts password is not stored here: set it in that variable (or, for PostgreSQL, in PGPASSWORD or "
            "~/.pgpass)." if had_password else "")
    lines = [HEADER.format(variable=DB_VARIABLE, password=note),
             f"c.CourseDirectory.db_url = os.environ.get({DB_VARIABLE!r}) or {location}"]
    for section, values in nbgrader_config(course, url, cell_timeout).items():
        lines += [f"c.{section}.{key} = {value!r}" for key, value in values.items()
                  if (section, key) not in KEPT_BY_THE_FILE]
    return "\n".join(lines) + "\n"


def write_course_config(course: Path, url: str, cell_timeout: int) -> Path:
    """Write ``course/nbgrader_config.py`` (no password in it); returns its path."""
    path = course / CONFIG
    course.mkdir(parents=True, exist_ok=True)
    path.write_text(config_text(course, url, cell_timeout), encoding="utf-8")
    return path


def find_course(folder: Path) -> Path:
    """The nbgrader course folder of an autograde output ``folder`` (``folder/course``), or
    ``folder`` itself when it is one; a message saying what to pass otherwise."""
    folder = folder.resolve()
    if not folder.is_dir():
        raise CourseError(f"--dir {folder} is not a folder: pass the folder that "
                          "`attention-course autograde SUBMISSIONS --out DIR` graded into")
    for course in (folder / COURSE_FOLDER, folder):
        if (course / CONFIG).is_file():
            return course
    if (folder / COURSE_FOLDER / "autograded").is_dir():
        raise CourseError(f"{folder} was graded by an older attention-course that wrote no "
                          f"{COURSE_FOLDER}/{CONFIG}: run `attention-course autograde SUBMISSIONS --out {folder}` "
                          "again (nothing unchanged is graded again) and it is written")
    raise CourseError(f"--dir {folder} is not an autograde output (no {COURSE_FOLDER}/{CONFIG} in it): pass "
                      "the folder that `attention-course autograde SUBMISSIONS --out DIR` graded into")


def course_gradebook(course: Path) -> str:
    """The gradebook URL that nbgrader reads from ``course/nbgrader_config.py`` (with
    ``ATTENTION_COURSE_DB`` applied, as in nbgrader)."""
    from traitlets.config.loader import ConfigFileNotFound, PyFileConfigLoader

    try:
        config = PyFileConfigLoader(CONFIG, path=str(course)).load_config()
    except ConfigFileNotFound as error:
        raise CourseError(f"{course / CONFIG} cannot be read: {error}") from error
    except Exception as error:  # noqa: BLE001 - a broken file: say which and why
        raise CourseError(f"{course / CONFIG} does not run: {type(error).__name__}: {error}") from error
    if "db_url" not in config.CourseDirectory:
        raise CourseError(f"{course / CONFIG} names no gradebook (c.CourseDirectory.db_url)")
    return config.CourseDirectory.db_url


def use_gradebook(db: str | None) -> None:
    """Point this process's nbgrader at the gradebook ``db`` (a ``--db`` value; relative paths
    from the working directory), else at ``ATTENTION_COURSE_DB`` when it is set, through
    that variable as the configuration file reads it (made a full SQLAlchemy URL)."""
    db = db or os.environ.get(DB_VARIABLE)
    if db:
        os.environ[DB_VARIABLE] = database_url(db, Path.cwd())


def open_gradebook(course: Path) -> tuple[str, int, int]:
    """Check that formgrader will find the course's gradebook and the lessons graded into it:
    (URL shown without password, lessons, students). The message says what to set if not."""
    from sqlalchemy.exc import SQLAlchemyError

    from nbgrader.api import Gradebook, InvalidEntry

    url = course_gradebook(course)
    name = shown(url)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///").split("?", 1)[0]).is_file():
        raise CourseError(f"the gradebook {name} does not exist: pass --db (or set {DB_VARIABLE}) with the "
                          "gradebook that autograde graded into")
    hint = (f"; if it needs a password, set {DB_VARIABLE} to its full URL (or pass --db"
            + (", or set PGPASSWORD" if url.startswith("postgres") else "") + ")")
    try:
        with Gradebook(url, COURSE_ID) as gradebook:
            lessons, students = len(gradebook.assignments), len(gradebook.students)
    except (SQLAlchemyError, InvalidEntry, OSError) as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise CourseError(f"cannot open the gradebook {name}: {reason}{hint}") from error
    if not lessons:
        raise CourseError(f"the gradebook {name} holds no lesson: pass --db with the gradebook that "
                          "autograde graded into")
    return name, lessons, students
