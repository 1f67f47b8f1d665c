"""The gradebook: nbgrader's database, plus three small tables of the course's own.

nbgrader's tables hold the per-cell scores (what its formgrader shows and lets an instructor
override). The course adds who each student is (their id as given and the folder name
nbgrader uses), one row per student and lesson (score, status, notes, and the fingerprint
that lets a re-run skip what has not changed) and each lesson's version. ``grades.csv`` is
a view of these tables, so partial runs merge and a re-run replaces, never duplicates.

Only the grading client writes here, under a lock that other graders of the same gradebook
respect: PostgreSQL's advisory lock, or a lock file beside a SQLite database (SQLite takes
one writer at a time; graders wait for each other instead of failing).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import unicodedata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from helpers.course.lessons import CourseError, scripts_on_path

COURSE_ID = "attention-course"
LOCK_KEY = 0x61747463  # PostgreSQL advisory lock id of this course's graders
SAFE_FOLDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
RESERVED = re.compile(r"^(?:con|prn|aux|nul|com\d|lpt\d)(?:\..*)?$", re.IGNORECASE)  # Windows devices


@dataclass
class Row:
    """One line of ``grades.csv``."""

    student_id: str
    assignment: str
    score: float
    max_score: float
    status: str
    notes: str
    student_folder: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"student_id": self.student_id, "assignment": self.assignment,
                "score": round(self.score, 4), "max_score": self.max_score,
                "status": self.status, "notes": self.notes, "student_folder": self.student_folder}


CSV_COLUMNS = list(Row("", "", 0, 0, "", "").as_dict())


def sqlite_url(path: Path) -> str:
    """A SQLite URL whose writers wait up to two minutes for the lock."""
    return f"sqlite:///{path.resolve()}?timeout=120"


def database_url(db: str | None, out: Path) -> str:
    """The gradebook URL for ``--db``: SQLite in ``out`` by default; a SQLite URL or a bare
    path relative to the working directory made absolute (grading children run elsewhere);
    any other SQLAlchemy URL (``postgresql://user@host/db``) as it is."""
    if not db:
        return sqlite_url(out / "gradebook.db")
    if "://" not in db:
        return sqlite_url(Path(db))
    if db.startswith("sqlite:"):
        location, _, query = db.split("://", 1)[1].partition("?")
        path = location[1:] if location.startswith("/") else location
        if path in ("", ":memory:"):
            raise CourseError(f"--db {db}: the gradebook must be a file that outlives the run")
        query = query if "timeout=" in query else "&".join(filter(None, [query, "timeout=120"]))
        return f"sqlite:///{Path(path).resolve()}?{query}"
    scheme, _, rest = db.partition("://")
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+{_postgres_driver()}://{rest}"
    return db


def _postgres_driver() -> str:
    """The installed PostgreSQL driver (SQLAlchemy's default one differs between versions)."""
    import importlib.util

    return next((name for name in ("psycopg", "psycopg2") if importlib.util.find_spec(name)), "psycopg")


def shown(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is shown as given
        return url


def safe_folder(student_id: str, taken: set[str]) -> str:
    """A folder name for a student: the id itself when it is plain ASCII and free (compared
    without case, for file systems that ignore it), else an ASCII spelling of it and a
    hash of the full id. ``taken`` holds the casefolded names already in use."""
    if SAFE_FOLDER.match(student_id) and not RESERVED.match(student_id) and student_id.casefold() not in taken:
        return student_id
    spelled = unicodedata.normalize("NFKD", student_id).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9]+", "_", spelled).strip("_")[:40] or "student"
    digest = hashlib.sha256(student_id.encode()).hexdigest()
    for length in range(6, len(digest) + 1):
        candidate = f"{slug}-{digest[:length]}"
        if candidate.casefold() not in taken:
            return candidate
    raise CourseError(f"no free folder name for student {student_id!r}")


def _tables():
    from sqlalchemy import Boolean, Column, Float, MetaData, String, Table, Text

    metadata = MetaData()
    students = Table("attention_course_students", metadata,
                     Column("student_id", String(255), primary_key=True),
                     Column("folder", String(255), nullable=False, unique=True),
                     Column("sources", Text, nullable=False, default=""))
    grades = Table("attention_course_grades", metadata,
                   Column("folder", String(255), primary_key=True),
                   Column("assignment", String(128), primary_key=True),
                   Column("student_id", String(255), nullable=False),
                   Column("score", Float, nullable=False),
                   Column("max_score", Float, nullable=False),
                   Column("status", String(255), nullable=False),
                   Column("notes", Text, nullable=False),
                   Column("fingerprint", String(64), nullable=False),
                   Column("graded_at", String(32), nullable=False))
    lessons = Table("attention_course_lessons", metadata,
                    Column("name", String(128), primary_key=True),
                    Column("version", String(64), nullable=False),
                    Column("max_score", Float, nullable=False),
                    Column("reported", Boolean, nullable=False, default=False))
    return metadata, students, grades, lessons


class Gradebook:
    """nbgrader's gradebook and the course's tables in one database, written by one client."""

    def __init__(self, url: str):
        from sqlalchemy import create_engine
        from sqlalchemy.exc import ArgumentError, OperationalError

        self.url = url
        try:
            self.engine = create_engine(url, future=True, pool_pre_ping=True)
        except ModuleNotFoundError as error:
            raise CourseError(f"the gradebook {shown(url)} needs the database driver {error.name}: "
                              "pip install 'attention-course[cluster]' (it brings psycopg for PostgreSQL)") from error
        except ArgumentError as error:
            raise CourseError(f"--db {shown(url)} is not a database URL: {error}") from error
        self.metadata, self.students, self.grades, self.lessons = _tables()
        scripts_on_path()
        try:
            with self.lock():
                from nbgrader.api import Gradebook as NbgraderGradebook

                # nbgrader first: it stamps its schema version only in a database without tables.
                self.nbgrader = NbgraderGradebook(url, COURSE_ID)
                self.metadata.create_all(self.engine)
        except OperationalError as error:
            raise CourseError(f"cannot open the gradebook {shown(url)}: {str(error.orig).strip()}") from error

    def close(self) -> None:
        self.nbgrader.close()
        self.engine.dispose()

    def __enter__(self) -> Gradebook:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the writers' lock: several graders may share this gradebook."""
        from sqlalchemy import text

        if self.engine.dialect.name == "postgresql":
            with self.engine.connect() as connection:
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
                try:
                    yield
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
                    connection.commit()
        elif self.engine.dialect.name == "sqlite" and self.engine.url.database and os.name == "posix":
            import fcntl

            with open(f"{self.engine.url.database}.lock", "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        else:
            yield

    # --- students -------------------------------------------------------------------------

    def folders(self, student_ids: list[str], sources: dict[str, list[str]]) -> dict[str, str]:
        """The folder of each student, made (and kept) the first time they are seen."""
        from sqlalchemy import select

        with self.lock(), self.engine.begin() as db:
            known = {r.student_id: r for r in db.execute(select(self.students))}
            taken = {r.folder.casefold() for r in known.values()}
            for student_id in student_ids:
                mine = sources.get(student_id, [])
                if student_id in known:
                    merged = _merge(known[student_id].sources, mine)
                    if merged != known[student_id].sources:
                        db.execute(self.students.update().where(self.students.c.student_id == student_id)
                                   .values(sources=merged))
                    continue
                folder = safe_folder(student_id, taken)
                taken.add(folder.casefold())
                db.execute(self.students.insert().values(student_id=student_id, folder=folder,
                                                         sources=_merge("", mine)))
            rows = db.execute(select(self.students.c.student_id, self.students.c.folder))
            return {r.student_id: r.folder for r in rows if r.student_id in set(student_ids)}

    def students_known(self) -> list[dict[str, str]]:
        """``students.csv``: each student's id as given, their folder, and how they were found."""
        from sqlalchemy import select

        with self.engine.connect() as db:
            return [{"student_id": r.student_id, "student_folder": r.folder, "sources": r.sources}
                    for r in db.execute(select(self.students).order_by(self.students.c.student_id))]

    # --- lessons --------------------------------------------------------------------------

    def lesson_version(self, name: str) -> str | None:
        from sqlalchemy import select

        with self.engine.connect() as db:
            return db.execute(select(self.lessons.c.version).where(self.lessons.c.name == name)).scalar()

    def set_lesson(self, name: str, version: str, max_score: float, reported: bool) -> None:
        from sqlalchemy import select

        with self.engine.begin() as db:
            old = db.execute(select(self.lessons).where(self.lessons.c.name == name)).first()
            values = {"version": version, "max_score": max_score, "reported": reported or bool(old and old.reported)}
            if old:
                db.execute(self.lessons.update().where(self.lessons.c.name == name).values(**values))
            else:
                db.execute(self.lessons.insert().values(name=name, **values))

    # --- grades ---------------------------------------------------------------------------

    def stored(self, folder: str, lesson: str):
        """The row graded before for this student and lesson, or None."""
        from sqlalchemy import select

        with self.engine.connect() as db:
            return db.execute(select(self.grades).where(
                (self.grades.c.folder == folder) & (self.grades.c.assignment == lesson))).first()

    def record(self, row: Row, fingerprint: str, grades: dict | None = None,
               comments: dict | None = None) -> None:
        """Write one student's lesson: nbgrader's per-cell scores when it was graded
        (``grades``), else no nbgrader submission at all (no partial grade left behind), and
        the course's row. Retried when another grader's write gets in the way."""
        for attempt in range(5):
            try:
                with self.lock():
                    self._write_nbgrader(row, grades, comments)
                    self._write_row(row, fingerprint)
                return
            except Exception:  # noqa: BLE001 - a racing writer; give it a moment and retry
                self.nbgrader.db.rollback()
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _write_nbgrader(self, row: Row, grades: dict | None, comments: dict | None) -> None:
        from nbgrader.api import MissingEntry

        gb, lesson, folder = self.nbgrader, row.assignment, row.student_folder
        if grades is None:
            try:
                gb.remove_submission(lesson, folder)
            except MissingEntry:
                pass
            return
        gb.update_or_create_student(folder, last_name=row.student_id, first_name="")  # formgrader's "name" column
        with warnings.catch_warnings():  # nbgrader's submission code trips SQLAlchemy 2's autoflush warnings
            warnings.simplefilter("ignore")
            gb.update_or_create_submission(lesson, folder)
        for name, score in grades.items():
            grade = gb.find_grade(name, lesson, lesson, folder)
            grade.auto_score = score
            grade.needs_manual_grade = grade.manual_score is not None or score is None
        for name, comment in (comments or {}).items():
            gb.find_comment(name, lesson, lesson, folder).auto_comment = comment
        gb.db.commit()

    def _write_row(self, row: Row, fingerprint: str) -> None:
        values = {"student_id": row.student_id, "score": row.score, "max_score": row.max_score,
                  "status": row.status, "notes": row.notes, "fingerprint": fingerprint,
                  "graded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        key = (self.grades.c.folder == row.student_folder) & (self.grades.c.assignment == row.assignment)
        with self.engine.begin() as db:
            if db.execute(self.grades.update().where(key).values(**values)).rowcount == 0:
                db.execute(self.grades.insert().values(folder=row.student_folder, assignment=row.assignment,
                                                       **values))

    def rows(self) -> list[Row]:
        """``grades.csv``: every student known to the gradebook, for every lesson that
        someone handed in or that a run asked for by name (``missing`` where they did not)."""
        from sqlalchemy import select

        with self.engine.connect() as db:
            students = {r.folder: r.student_id for r in db.execute(select(self.students))}
            lessons = {r.name: r for r in db.execute(select(self.lessons))}
            stored = {(r.folder, r.assignment): r for r in db.execute(select(self.grades))}
        reported = sorted({name for name, lesson in lessons.items() if lesson.reported}
                          | {lesson for _, lesson in stored})
        rows = []
        for folder, student_id in sorted(students.items(), key=lambda item: (item[1], item[0])):
            for lesson in reported:
                r = stored.get((folder, lesson))
                if r is not None:
                    rows.append(Row(r.student_id, lesson, r.score, r.max_score, r.status, r.notes, folder))
                else:
                    max_score = lessons[lesson].max_score if lesson in lessons else 0.0
                    rows.append(Row(student_id, lesson, 0.0, max_score, "missing",
                                    f"no notebook for {lesson}", folder))
        return rows


def _merge(old: str, new: list[str]) -> str:
    parts = [part for part in old.split("; ") if part]
    return "; ".join(parts + [part for part in new if part not in parts])
