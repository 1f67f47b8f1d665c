"""Find each student's notebook for each lesson, however the submissions arrived.

Accepted layouts, mixed freely in one folder:

- nbgrader's ``<student>/<lesson>/<lesson>.ipynb`` (also under a ``submitted/`` folder);
- a zip per student, ``<student>.zip``, holding lesson folders or loose notebooks;
- loose files as learning platforms export them, ``<student>_<lesson>.ipynb``
  (any text before the lesson's name is the student id).

A notebook with another name in the right place is graded and marked ``renamed``.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

IGNORED_PARTS = {"__MACOSX", ".ipynb_checkpoints"}


@dataclass
class Submission:
    """What one student handed in for one lesson, and what was noticed about it."""

    student_id: str
    lesson: str
    notebook: Path | None
    status: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def flag(self, status: str, note: str) -> None:
        if status not in self.status:
            self.status.append(status)
        self.notes.append(note)


def clean_student_id(raw: str) -> str:
    """A student id nbgrader can use as a folder name."""
    cleaned = re.sub(r"[^A-Za-z0-9_.@-]+", "_", raw).strip("_.-")
    return cleaned or "unknown"


def _notebooks_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.ipynb")
                  if p.is_file() and not IGNORED_PARTS.intersection(p.relative_to(folder).parts))


def _lesson_of(path: Path, base: Path, lessons: list[str]) -> str | None:
    """The lesson a notebook belongs to: by the folder it sits in, else by its file name."""
    for part in path.relative_to(base).parts[:-1]:
        if part in lessons:
            return part
    for lesson in lessons:
        if lesson in path.stem:
            return lesson
    return None


def _unzip(archive: Path, scratch: Path) -> Path | None:
    target = scratch / archive.stem
    try:
        with zipfile.ZipFile(archive) as handle:
            for member in handle.namelist():
                resolved = (target / member).resolve()
                if not str(resolved).startswith(str(target.resolve())):
                    raise zipfile.BadZipFile(f"unsafe path {member!r}")
            handle.extractall(target)
    except (zipfile.BadZipFile, OSError):
        shutil.rmtree(target, ignore_errors=True)
        return None
    return target


def collect(folder: Path, lessons: list[str], scratch: Path) -> tuple[list[Submission], list[str]]:
    """One :class:`Submission` per student and lesson, plus warnings about files not understood.

    ``lessons`` are the lesson names to grade; ``scratch`` receives unpacked zips.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"submissions folder not found: {folder}")
    if (folder / "submitted").is_dir():
        folder = folder / "submitted"
    found: dict[str, dict[str, list[Path]]] = {}
    warnings: list[str] = []
    loose: set[Path] = set()

    def add(student: str, lesson: str, path: Path) -> None:
        found.setdefault(clean_student_id(student), {}).setdefault(lesson, []).append(path)

    for entry in sorted(folder.iterdir()):
        if entry.name in IGNORED_PARTS or entry.name.startswith("."):
            continue
        if entry.is_dir() or entry.suffix == ".zip":
            base = entry if entry.is_dir() else _unzip(entry, scratch)
            if base is None:
                warnings.append(f"{entry}: not a readable zip file, skipped")
                continue
            student = entry.name if entry.is_dir() else entry.stem
            notebooks = _notebooks_in(base)
            if entry.is_dir():
                for archive in sorted(base.rglob("*.zip")):
                    unpacked = _unzip(archive, scratch / clean_student_id(student))
                    notebooks += _notebooks_in(unpacked) if unpacked else []
                    if unpacked is None:
                        warnings.append(f"{archive}: not a readable zip file, skipped")
            found.setdefault(clean_student_id(student), {})
            for notebook in notebooks:
                root = base if notebook.is_relative_to(base) else notebook.parent
                lesson = _lesson_of(notebook, root, lessons)
                if lesson is None:
                    warnings.append(f"{notebook}: belongs to no lesson being graded, skipped")
                else:
                    add(student, lesson, notebook)
        elif entry.suffix == ".ipynb":
            lesson = next((name for name in lessons if name in entry.stem), None)
            student = entry.stem[:entry.stem.find(lesson)] if lesson else ""
            if lesson is None or not student.strip("_- "):
                warnings.append(f"{entry}: cannot tell the student and lesson from its name "
                                "(expected <student>_<lesson>.ipynb), skipped")
            else:
                add(student.strip("_- "), lesson, entry)
                loose.add(entry)
        else:
            warnings.append(f"{entry}: not a notebook, folder or zip, skipped")

    submissions = []
    for student in sorted(found):
        for lesson in lessons:
            candidates = found[student].get(lesson, [])
            submissions.append(_choose(student, lesson, candidates, loose))
    return submissions, warnings


def _choose(student: str, lesson: str, candidates: list[Path], loose: set[Path]) -> Submission:
    """The notebook to grade: the one with the lesson's name (or a loose file named after the
    student and lesson), else the newest; any other name is graded and flagged ``renamed``."""
    if not candidates:
        submission = Submission(student, lesson, None)
        submission.flag("missing", f"no notebook for {lesson}")
        return submission
    exact = [path for path in candidates if path.name == f"{lesson}.ipynb" or path in loose]
    chosen = max(exact or candidates, key=lambda path: path.stat().st_mtime)
    submission = Submission(student, lesson, chosen)
    if not exact:
        submission.flag("renamed", f"graded {chosen.name} as {lesson}.ipynb")
    if len(candidates) > 1:
        submission.notes.append(f"{len(candidates)} notebooks for {lesson}; graded {chosen.name}")
    return submission


def inspect(submission: Submission, released: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
    """Read the notebook and compare its test cells with the released ones.

    Returns the notebook, or None (and flags ``invalid``) when it cannot be read. Deleted or
    edited test cells are flagged ``tampered``: nbgrader grades them from the instructor's copy.
    """
    assert submission.notebook is not None
    try:
        notebook = nbformat.read(submission.notebook, as_version=4)
        nbformat.validate(notebook)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported, never raised
        submission.flag("invalid", f"{submission.notebook.name} is not a valid notebook: "
                        f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
        return None
    theirs = {cell.get("metadata", {}).get("nbgrader", {}).get("grade_id"): cell for cell in notebook.cells}
    for cell in released.cells:
        meta = cell.metadata.get("nbgrader", {})
        if not meta.get("grade") or meta.get("solution"):
            continue
        grade_id = meta["grade_id"]
        if grade_id not in theirs:
            submission.flag("tampered", f"test cell {grade_id} was deleted; graded with the original")
        elif theirs[grade_id].source.strip() != cell.source.strip():
            submission.flag("tampered", f"test cell {grade_id} was edited; graded with the original")
    return notebook
