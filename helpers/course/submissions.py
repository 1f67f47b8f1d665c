"""Find each student's notebook for each lesson, however the submissions arrived.

Every file under SUBMISSIONS (zips unpacked, nested zips too) ends up in one place: the
notebook graded for a (student, lesson), or a manifest entry that says why not.

Whose is it? Read from the path, top down: SUBMISSIONS itself, a ``submitted/`` or
``submissions/`` folder, a lesson folder, and any folder or zip that holds several students
(platform-named files, or two children with a notebook of the same lesson) are *containers*;
the first folder or zip below them names the student. A notebook lying in a container is
named by its file: a Canvas bulk download (``login_userid_attachmentid_file``), a Moodle
download (``Full Name_123_assignsubmission_file_``, as a folder or a prefix), a Blackboard
download (``Assignment_user_attempt_2024-01-31-12-00-00_file``), or ``<student>_<lesson>``.
Copy names (``Copy of ``, `` (1)``, `` - Copy``) are not part of anyone's id. Ids are kept as
written (Unicode, spaces), NFC-normalised; a roster maps platform ids to the instructor's.
Two different platform ids never merge: when they share a name, both are graded under
qualified ids and the notes say so.

Which lesson? The nbgrader grade ids in the notebook; for a notebook that lost its nbgrader
metadata, the functions and classes its cells define; only then its file or folder name.
"""

from __future__ import annotations

import ast
import copy
import csv
import datetime
import os
import re
import shutil
import unicodedata
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from helpers.course.lessons import CourseError

JUNK_FOLDERS = {"__MACOSX", ".ipynb_checkpoints", "__pycache__", ".git", ".Trash"}
JUNK_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}
CLASS_FOLDERS = {"submitted", "submissions", "submission"}
MAX_ZIP_DEPTH = 4
MAX_UNZIPPED_BYTES = 4 << 30

COPY_PREFIX = re.compile(r"^(?:copy of |kopie von |copie de |copia de )+", re.IGNORECASE)
COPY_SUFFIX = re.compile(r"(?:\s*\((\d+)\)|\s+-\s+copy(?:\s*\((\d+)\))?|\s+copy(?:\s+(\d+))?)$", re.IGNORECASE)
CANVAS = re.compile(r"^(?P<login>[^_]+)_(?:late_)?(?P<user>\d{3,})_(?P<attachment>\d{3,})_(?P<file>.+)$",
                    re.IGNORECASE)
CANVAS_RESUBMISSION = re.compile(r"-(\d+)$")
MOODLE = re.compile(r"^(?P<name>.+?)_(?P<participant>\d+)_assignsubmission_(?P<plugin>[a-z]+)_(?P<file>.*)$")
BLACKBOARD = re.compile(r"^(?P<assignment>.*?)_(?P<user>[^_]+)_attempt_(?P<when>\d{4}(?:-\d\d){5})(?:_(?P<file>.+))?$")
TOP_LEVEL_NAME = re.compile(r"^(?:async\s+def|def|class)\s+([A-Za-z_]\w*)", re.MULTILINE)


# --- names -------------------------------------------------------------------------------

def normalise(text: str) -> str:
    """An id as written, in Unicode's composed form (NFC), without surrounding blanks."""
    return unicodedata.normalize("NFC", text).strip()


def strip_copy_marks(stem: str) -> tuple[str, int]:
    """``"Copy of x (2)"`` -> ``("x", 2)``: the name without the marks that copying a file
    adds (Colab, Jupyter, browsers, file managers), and the copy number (0 for none)."""
    stem = COPY_PREFIX.sub("", normalise(stem))
    number = 0
    while match := COPY_SUFFIX.search(stem):
        digits = next((group for group in match.groups() if group), None)
        number = max(number, int(digits) if digits else 1)
        stem = stem[:match.start()]
    return stem.strip(), number


def _clean_id(text: str) -> str:
    return normalise(strip_copy_marks(text)[0]).strip("_-. ")


def _stem(name: str) -> str:
    return name[:-len(".ipynb")] if name.lower().endswith(".ipynb") else Path(name).stem


def _without_lesson(stem: str, lesson: str | None) -> str:
    """What is left of a file name once its lesson's name is taken out: the student."""
    if lesson:
        for mention in (lesson, lesson.split("_", 1)[-1]):
            index = stem.lower().find(mention.lower())
            if index >= 0:
                return (stem[:index] + stem[index + len(mention):]).strip("_-. ")
    return stem.strip("_-. ")


def lesson_in_name(text: str, lessons: list[str]) -> str | None:
    """The lesson whose full name appears in ``text`` (a file or folder name)."""
    lowered = text.lower()
    named = [lesson for lesson in lessons if lesson.lower() in lowered]
    return max(named, key=len) if named else None


# --- the files ---------------------------------------------------------------------------

@dataclass
class Found:
    """One file under SUBMISSIONS; ``shown`` is its path there (``class.zip/eva/x.ipynb``)."""

    shown: str
    path: Path
    parts: tuple[str, ...]
    mtime: float


@dataclass
class Entry:
    """One line of the manifest: what became of a file."""

    file: str
    outcome: str
    reason: str = ""
    student_id: str = ""
    assignment: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "outcome": self.outcome, "student_id": self.student_id,
                "assignment": self.assignment, "reason": self.reason}


def _unzip(archive: Path, target: Path) -> str | None:
    """Unpack ``archive`` into ``target`` keeping its files' dates; an error message or None."""
    try:
        with zipfile.ZipFile(archive) as handle:
            members = handle.infolist()
            if sum(member.file_size for member in members) > MAX_UNZIPPED_BYTES:
                return f"it would unpack to more than {MAX_UNZIPPED_BYTES >> 30} GiB"
            root = target.resolve()
            for member in members:
                if not (target / member.filename).resolve().is_relative_to(root):
                    return f"it holds an unsafe path {member.filename!r}"
            for member in members:
                written = Path(handle.extract(member, target))
                if not member.is_dir():
                    stamp = _zip_time(member)
                    if stamp:
                        os.utime(written, (stamp, stamp))
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as error:
        shutil.rmtree(target, ignore_errors=True)
        return f"not a readable zip file ({error})"
    return None


def _zip_time(member: zipfile.ZipInfo) -> float | None:
    try:
        return datetime.datetime(*member.date_time).timestamp()
    except ValueError:
        return None


def walk(folder: Path, scratch: Path) -> tuple[list[Found], list[tuple[str, ...]], list[Entry]]:
    """Every file under ``folder``, zips unpacked into ``scratch``; also every folder (as its
    parts) and the manifest entries of what is not a candidate (junk, zips, links)."""
    found: list[Found] = []
    folders: list[tuple[str, ...]] = []
    entries: list[Entry] = []
    counter = [0]

    def ignore_all(directory: Path, shown: str, reason: str) -> None:
        files = sorted(p for p in directory.rglob("*") if p.is_file() or p.is_symlink())
        entries.extend(Entry(shown + "/" + p.relative_to(directory).as_posix(), "ignored", reason)
                       for p in files)

    def visit(directory: Path, shown: str, parts: tuple[str, ...], depth: int) -> None:
        for entry in sorted(directory.iterdir(), key=lambda p: p.name):
            show = f"{shown}{entry.name}"
            if entry.is_symlink():
                entries.append(Entry(show, "skipped", "a symbolic link, not followed"))
            elif entry.is_dir():
                if entry.name in JUNK_FOLDERS or entry.name.startswith("."):
                    ignore_all(entry, show, f"inside {entry.name}/, which holds no submissions "
                                            "(system or editor files)")
                    continue
                folders.append(parts + (entry.name,))
                visit(entry, show + "/", parts + (entry.name,), depth)
            elif entry.name in JUNK_FILES or entry.name.startswith("._") or entry.name.startswith("~$"):
                entries.append(Entry(show, "ignored", "a system file, not a submission"))
            elif entry.suffix.lower() == ".zip":
                if depth >= MAX_ZIP_DEPTH:
                    entries.append(Entry(show, "skipped", f"a zip nested more than {MAX_ZIP_DEPTH} deep"))
                    continue
                counter[0] += 1
                target = scratch / f"{counter[0]:05d}"
                problem = _unzip(entry, target)
                if problem:
                    entries.append(Entry(show, "skipped", problem))
                    continue
                inside = sum(1 for p in target.rglob("*") if p.is_file())
                entries.append(Entry(show, "unpacked", f"a zip of {inside} files, each listed below it"))
                folders.append(parts + (entry.name[:-4],))
                visit(target, show + "/", parts + (entry.name[:-4],), depth + 1)
            else:
                found.append(Found(show, entry, parts + (entry.name,), entry.stat().st_mtime))

    visit(folder, "", (), 0)
    return found, folders, entries


# --- lessons, from what a notebook holds -------------------------------------------------

def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def defined_names(source: str) -> list[str]:
    """Functions and classes a cell defines at its top level, in order."""
    return TOP_LEVEL_NAME.findall(source)


def _squash(source: str) -> str:
    return re.sub(r"\s+", " ", source).strip()


@dataclass
class LessonPrint:
    """What identifies a lesson's notebook: its grade ids, and what each answer defines."""

    name: str
    grade_ids: frozenset[str]
    answers: dict[str, str]  # answer grade id -> the first name its stub defines
    stubs: dict[str, str]    # answer grade id -> the stub's source, squashed
    tests: frozenset[str]    # test cells' sources, squashed

    @classmethod
    def of(cls, name: str, released: nbformat.NotebookNode) -> LessonPrint:
        answers, stubs, tests, ids = {}, {}, set(), set()
        for cell in released.cells:
            meta = _nbgrader(cell)
            if not meta.get("grade_id"):
                continue
            ids.add(meta["grade_id"])
            if meta.get("solution") and cell.cell_type == "code":
                names = defined_names(cell.source)
                if names:
                    answers[meta["grade_id"]] = names[0]
                stubs[meta["grade_id"]] = _squash(cell.source)
            elif meta.get("grade") and cell.cell_type == "code":
                tests.add(_squash(cell.source))
        return cls(name, frozenset(ids), answers, stubs, frozenset(tests))


@dataclass
class Detection:
    lesson: str | None
    how: str          # "grade ids", "names" or "file name"
    note: str = ""


class Catalog:
    """Tells a notebook's lesson from its content: every lesson of the course, not only
    those graded in this run, so a notebook of another lesson is named, not lost."""

    def __init__(self, prints: list[LessonPrint]):
        self.prints = {p.name: p for p in prints}

    @property
    def names(self) -> list[str]:
        return list(self.prints)

    def detect(self, notebook: nbformat.NotebookNode | None, hint: str | None) -> Detection:
        """``hint``: the lesson the file or folder name gives, if any."""
        if notebook is not None:
            ids = {_nbgrader(cell).get("grade_id") for cell in notebook.cells} - {None}
            overlap = {name: len(ids & p.grade_ids) for name, p in self.prints.items()}
            best = max(overlap.values(), default=0)
            if best > 0:
                tied = [name for name, count in overlap.items() if count == best]
                lesson = hint if hint in tied else tied[0]
                note = f"its cells belong to {' and '.join(tied)}; graded as {lesson}" if len(tied) > 1 else ""
                return Detection(lesson, "grade ids", note)
            by_names = self._by_names(notebook)
            if by_names:
                return Detection(by_names, "names")
        return Detection(hint, "file name") if hint else Detection(None, "")

    def _by_names(self, notebook: nbformat.NotebookNode) -> str | None:
        names, tests = set(), set()
        for cell in notebook.cells:
            if cell.get("cell_type") == "code":
                names.update(defined_names(cell.source))
                tests.add(_squash(cell.source))
        score = {}
        for name, p in self.prints.items():
            found = sum(answer in names for answer in p.answers.values()) + len(p.tests & tests)
            total = len(p.answers) + len(p.tests)
            if total and found / total >= 0.5:
                score[name] = found / total
        return max(score, key=score.get) if score else None

    def answered(self, lesson: str, notebook: nbformat.NotebookNode) -> int:
        """How many of the lesson's answer cells differ from the released stub."""
        p = self.prints[lesson]
        mine = {_nbgrader(c).get("grade_id"): _squash(c.source) for c in notebook.cells if _nbgrader(c)}
        if any(grade_id in mine for grade_id in p.stubs):
            return sum(grade_id in mine and mine[grade_id] != stub for grade_id, stub in p.stubs.items())
        restored, _, _ = restore(notebook, p)
        return sum(_squash(source) != p.stubs.get(grade_id) for grade_id, source in restored.items())


# --- who handed it in ---------------------------------------------------------------------

@dataclass
class Identity:
    """Who a notebook belongs to. ``key`` decides who is the same person: a Canvas user id,
    a Moodle name (or name and participant id, when two people share the name), a roster
    id, or a plain name; ``origin`` is the path that named them."""

    key: tuple[str, ...]
    student_id: str
    source: str
    aliases: tuple[str, ...]
    origin: str = ""
    participant: str = ""  # Moodle's id, new for each assignment


def _folder_identity(name: str, origin: str) -> Identity | None:
    moodle = MOODLE.match(normalise(name))
    if moodle:
        person = normalise(moodle["name"])
        return Identity(("name", person), person, f"Moodle folder {name}/", (person,), origin,
                        moodle["participant"])
    person = _clean_id(name)
    if not person:
        return None
    return Identity(("name", person), person, f"folder {name}/", (person,), origin)


def _file_identity(name: str, lesson: str | None, origin: str) -> Identity | None:
    stem = _stem(normalise(name))
    canvas = CANVAS.match(stem)
    if canvas:
        login = normalise(canvas["login"])
        return Identity(("canvas", canvas["user"]), login, f"Canvas user {canvas['user']} ({login})",
                        (login, canvas["user"]), origin)
    moodle = MOODLE.match(stem)
    if moodle:
        person = normalise(moodle["name"])
        return Identity(("name", person), person, f"Moodle file {name}", (person,), origin,
                        moodle["participant"])
    blackboard = BLACKBOARD.match(stem)
    if blackboard:
        user = normalise(blackboard["user"])
        return Identity(("blackboard", user), user, f"Blackboard user {user}", (user,), origin)
    person = _without_lesson(strip_copy_marks(stem)[0], lesson)
    if not person:
        return None
    return Identity(("name", person), person, f"file name {name}", (person,), origin)


def platform_file_name(stem: str) -> str | None:
    """The file name a student gave, inside a platform's download name (or None)."""
    for pattern in (CANVAS, MOODLE, BLACKBOARD):
        match = pattern.match(stem)
        if match and match.group("file"):
            file = match.group("file")
            if pattern is CANVAS:
                file = CANVAS_RESUBMISSION.sub("", _stem(file))
            return file
    return None


def _is_platform_named(name: str) -> bool:
    stem = _stem(normalise(name))
    return bool(CANVAS.match(stem) or MOODLE.match(stem) or BLACKBOARD.match(stem))


class Roster:
    """The instructor's class list: a CSV with a ``student_id`` column; every other column
    (name, email, Canvas user id, Moodle name, login...) holds ids the platforms may use."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise FileNotFoundError(f"roster not found: {path}")
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "student_id" not in rows[0]:
            raise CourseError(f"{path}: a roster needs a header row with a student_id column")
        self.ids: list[str] = []
        self.aliases: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            student = normalise(row.get("student_id") or "")
            if not student:
                continue
            self.ids.append(student)
            for value in row.values():
                if value and normalise(value):
                    self.aliases[self._fold(value)].add(student)

    @staticmethod
    def _fold(text: str) -> str:
        return normalise(text).casefold()

    def lookup(self, aliases: tuple[str, ...]) -> tuple[str | None, str]:
        """The roster id these platform ids belong to, or None and why not."""
        matches = set().union(*(self.aliases.get(self._fold(a), set()) for a in aliases))
        if len(matches) == 1:
            return matches.pop(), ""
        if matches:
            return None, f"matches several roster entries ({', '.join(sorted(matches))}): kept apart"
        return None, "not in the roster"


# --- putting it together -----------------------------------------------------------------

@dataclass
class Student:
    student_id: str
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Submission:
    """What one student handed in for one lesson, and what was noticed about it."""

    student_id: str
    lesson: str
    notebook: Path | None
    shown: str = ""
    content: nbformat.NotebookNode | None = None
    how: str = ""
    status: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def flag(self, status: str, note: str) -> None:
        if status not in self.status:
            self.status.append(status)
        if note:
            self.notes.append(note)


@dataclass
class _Candidate:
    found: Found
    lesson: str | None
    detection: Detection
    content: nbformat.NotebookNode | None
    error: str
    identity: Identity | None = None
    copy_number: int = 0


@dataclass
class Collection:
    students: dict[str, Student]
    submissions: list[Submission]
    entries: list[Entry]


def _read(path: Path) -> tuple[nbformat.NotebookNode | None, str]:
    try:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        return notebook, ""
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported, never raised
        text = str(error).splitlines()[0][:200] if str(error) else ""
        return None, f"{type(error).__name__}: {text}"


def _containers(candidates: list[_Candidate], folders: list[tuple[str, ...]], lessons: list[str]) -> set:
    """Path prefixes that hold several students rather than naming one: SUBMISSIONS, a
    ``submitted/`` or lesson folder, or a folder or zip that holds several students."""
    children: dict[tuple, list[tuple]] = defaultdict(list)
    for parts in folders:
        children[parts[:-1]].append(parts)
    loose: dict[tuple, list[_Candidate]] = defaultdict(list)
    for c in candidates:
        loose[c.found.parts[:-1]].append(c)
    several_memo: dict[tuple, bool] = {}

    def several(prefix: tuple[str, ...]) -> bool:
        """Platform-named entries, or two children with a notebook of the same lesson; a
        folder or zip that only wraps one folder (a zipped folder) holds what that one does."""
        if prefix in several_memo:
            return several_memo[prefix]
        mine = loose[prefix]
        if any(_is_platform_named(c.found.parts[-1]) for c in mine) or \
                any(MOODLE.match(normalise(f[-1])) for f in children[prefix]):
            answer = True
        elif len(children[prefix]) == 1 and not mine:
            answer = several(children[prefix][0])
        else:
            providers: dict[str, set[str]] = defaultdict(set)
            for c in candidates:
                parts = c.found.parts
                if c.lesson is None or parts[:len(prefix)] != prefix or len(parts) <= len(prefix):
                    continue
                if len(parts) > len(prefix) + 1:
                    child = _clean_id(parts[len(prefix)])
                    if child in lessons:
                        continue
                else:
                    child = _without_lesson(strip_copy_marks(_stem(parts[-1]))[0], c.lesson)
                if child:
                    providers[c.lesson].add(child)
            answer = any(len(names) > 1 for names in providers.values())
        several_memo[prefix] = answer
        return answer

    containers: set[tuple[str, ...]] = {()}
    for prefix in sorted(set(folders), key=len):
        if prefix[:-1] not in containers or MOODLE.match(normalise(prefix[-1])):
            continue
        name = _clean_id(prefix[-1])
        if name.casefold() in CLASS_FOLDERS or name in lessons or several(prefix):
            containers.add(prefix)
    return containers


def _owner(parts: tuple[str, ...], containers: set, lesson: str | None) -> Identity | None:
    for i in range(len(parts) - 1):
        if parts[:i + 1] not in containers:
            return _folder_identity(parts[i], "/".join(parts[:i + 1]))
    return _file_identity(parts[-1], lesson, "/".join(parts))


def collect(folder: Path, catalog: Catalog, graded: list[str], scratch: Path,
            roster: Roster | None = None) -> Collection:
    """Who handed in which notebook for which of the ``graded`` lessons.

    ``catalog`` knows every lesson of the course; ``scratch`` receives unpacked zips.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"submissions folder not found: {folder}")
    found, folders, entries = walk(folder, scratch)
    candidates: list[_Candidate] = []
    for item in found:
        if item.path.suffix.lower() != ".ipynb":
            reason = "Moodle online text, not a file submission" if "_assignsubmission_onlinetext_" in item.shown \
                else "not a notebook"
            entries.append(Entry(item.shown, "skipped", reason))
            continue
        content, error = _read(item.path)
        stem = _stem(item.parts[-1])
        hint = lesson_in_name(platform_file_name(stem) or stem, catalog.names) or \
            next((lesson_in_name(part, catalog.names) for part in reversed(item.parts[:-1])
                  if lesson_in_name(part, catalog.names)), None)
        detection = catalog.detect(content, hint)
        candidates.append(_Candidate(item, detection.lesson, detection, content, error,
                                     copy_number=strip_copy_marks(platform_file_name(stem) or stem)[1]
                                     or _canvas_resubmission(stem)))

    containers = _containers(candidates, folders, catalog.names)
    owned: list[_Candidate] = []
    for candidate in candidates:
        candidate.identity = _owner(candidate.found.parts, containers, candidate.lesson)
        if candidate.identity is None:
            entries.append(Entry(candidate.found.shown, "skipped",
                                 "no folder, zip or file name says whose notebook it is: put it in a folder "
                                 "named after the student"))
        else:
            owned.append(candidate)
    named_folders = []  # a student's folder names them even when it holds no notebook
    for parts in folders:
        moodle = MOODLE.match(normalise(parts[-1]))
        if parts[:-1] in containers and parts not in containers and not (moodle and moodle["plugin"] != "file"):
            identity = _folder_identity(parts[-1], "/".join(parts))
            if identity is not None:
                named_folders.append(identity)
    students, by_student = _people(owned, named_folders, roster)

    submissions: list[Submission] = []
    for (student_id, lesson), group in sorted(by_student.items()):
        if lesson not in graded:
            for c in group:
                if lesson:
                    reason = f"a notebook of {lesson}, which this run does not grade"
                elif c.content is None:
                    reason = f"not a valid notebook ({c.error}), and its name names no lesson"
                else:
                    reason = "not a notebook of any lesson: no nbgrader cell, function or name of one"
                entries.append(Entry(c.found.shown, "skipped", reason, student_id, lesson or ""))
            continue
        submissions.append(_choose(student_id, lesson, group, catalog, entries))
    return Collection(students, submissions, entries)


def _canvas_resubmission(stem: str) -> int:
    canvas = CANVAS.match(stem)
    match = CANVAS_RESUBMISSION.search(_stem(canvas["file"])) if canvas else None
    return int(match.group(1)) if match else 0


def _people(owned: list[_Candidate], folders: list[Identity], roster: Roster | None):
    """Resolve identities to student ids: roster first, then split people who share a name."""
    identities = [c.identity for c in owned] + folders
    notes: dict[tuple, list[str]] = defaultdict(list)
    if roster:
        for identity in identities:
            student, why = roster.lookup(identity.aliases)
            if student:
                identity.key, identity.student_id = ("roster", student), student
            elif why not in notes[identity.key]:
                notes[identity.key].append(f"{identity.student_id}: {why}")

    # Moodle gives each student a new participant id per assignment, so a name is the
    # person; two participant ids with one name in one lesson are two people.
    participants: dict[tuple, set[str]] = defaultdict(set)
    for c in owned:
        if c.identity.key[0] == "name" and c.identity.participant:
            participants[(c.identity.key, c.lesson)].add(c.identity.participant)
    split = {key for (key, _), ids in participants.items() if len(ids) > 1}
    for identity in identities:
        if identity.key in split and identity.participant:
            name = identity.student_id
            identity.key = ("moodle", name, identity.participant)
            identity.student_id = f"{name} (Moodle {identity.participant})"
            notes[identity.key].append(f"ambiguous: several Moodle participants are called {name} in one lesson; "
                                       "each is graded under their participant id - a --roster names them")

    # One name, several people (a Canvas login and a folder, two Canvas users...): qualify.
    keys_by_id: dict[str, set[tuple]] = defaultdict(set)
    for identity in identities:
        keys_by_id[identity.student_id].add(identity.key)
    rename: dict[tuple, str] = {}
    for student_id, keys in keys_by_id.items():
        if len(keys) < 2:
            continue
        described = []
        for key in sorted(keys):
            if key[0] == "canvas":
                rename[key] = f"{student_id} (Canvas {key[1]})"
            elif key[0] == "blackboard":
                rename[key] = f"{student_id} (Blackboard)"
            described.append(rename.get(key, student_id))
        for key in keys:
            notes[key].append(f"ambiguous: {len(keys)} different students are called {student_id} "
                              f"({', '.join(described)}); each is graded on their own - a --roster names them")
    for identity in identities:
        identity.student_id = rename.get(identity.key, identity.student_id)

    students: dict[str, Student] = {}
    for identity in identities:
        student = students.setdefault(identity.student_id, Student(identity.student_id))
        if identity.source not in student.sources:
            student.sources.append(identity.source)
        for note in notes.get(identity.key, []):
            if note not in student.notes:
                student.notes.append(note)
    if roster:
        for student_id in roster.ids:
            students.setdefault(student_id, Student(student_id, ["roster"]))
    by_student: dict[tuple[str, str | None], list[_Candidate]] = defaultdict(list)
    for c in owned:
        by_student[(c.identity.student_id, c.lesson)].append(c)
    return students, by_student


def _choose(student_id: str, lesson: str, group: list[_Candidate], catalog: Catalog,
            entries: list[Entry]) -> Submission:
    """The notebook to grade when a student handed in several for one lesson: the one with
    the most answers filled in, then the newest, then the highest copy number."""
    readable = [c for c in group if c.content is not None]
    if readable:
        chosen = max(readable, key=lambda c: (catalog.answered(lesson, c.content), c.found.mtime,
                                              c.copy_number, c.found.shown))
    else:
        chosen = max(group, key=lambda c: (c.found.mtime, c.copy_number, c.found.shown))
    submission = Submission(student_id, lesson, chosen.found.path, chosen.found.shown, chosen.content,
                            chosen.detection.how)
    submission.notes.append(f"from {chosen.found.shown}")
    if chosen.content is None:
        submission.flag("invalid", f"{chosen.found.parts[-1]} is not a valid notebook: {chosen.error}")
    if chosen.detection.note:
        submission.notes.append(chosen.detection.note)
    stem = _stem(chosen.found.parts[-1])
    named = lesson_in_name(platform_file_name(stem) or stem, [lesson])
    if chosen.content is not None and not named:
        told = {"grade ids": "nbgrader cells", "names": "functions"}.get(chosen.detection.how, "folder")
        submission.flag("renamed", f"its file name does not say {lesson}; its {told} do")
    elif chosen.content is not None and chosen.detection.how == "grade ids" and \
            (other := lesson_in_name(stem, [n for n in catalog.names if n != lesson])):
        submission.flag("renamed", f"named {other} but its cells are {lesson}'s")
    others = [c for c in group if c is not chosen]
    if others:
        submission.notes.append(f"{len(group)} notebooks for {lesson}; graded {chosen.found.shown} "
                                "(most answers, then newest)")
    for c in others:
        entries.append(Entry(c.found.shown, "superseded", f"{student_id} handed in another notebook for {lesson}: "
                             f"{chosen.found.shown} was graded", student_id, lesson))
    return submission


# --- what gets graded --------------------------------------------------------------------

def restore(notebook: nbformat.NotebookNode, lesson: LessonPrint) -> tuple[dict[str, str], int, int]:
    """Put a notebook that lost its nbgrader metadata back into the lesson's cells.

    Each answer cell is taken from the student's last cell that defines the same function
    or class; cells before it that only import or define things come along (helpers the
    answer may use). Returns the answer sources by grade id, how many were matched, and
    how many answer cells the lesson has.
    """
    by_name = {name: grade_id for grade_id, name in lesson.answers.items()}
    answers: dict[str, str] = {}
    pending: list[str] = []
    for cell in notebook.cells:
        if cell.get("cell_type") != "code" or not cell.source.strip():
            continue
        matched = [by_name[name] for name in defined_names(cell.source) if name in by_name]
        if matched:
            answers[matched[0]] = "\n\n".join(pending + [cell.source])
            pending = []
            continue
        try:
            body = ast.parse(cell.source).body
        except SyntaxError:
            continue
        if body and all(isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef,
                                          ast.ClassDef)) for node in body):
            pending.append(cell.source)
    return answers, len(answers), len(lesson.answers)


def prepare(submission: Submission, released: nbformat.NotebookNode, lesson: LessonPrint) -> nbformat.NotebookNode:
    """The notebook nbgrader will grade for this submission, and what was noticed about it.

    A notebook whose answer cells lost their nbgrader metadata is rebuilt from the released
    notebook with the student's answers put in (status ``restored``). Deleted or edited test
    cells are flagged ``tampered``: nbgrader grades them from the instructor's copy.
    """
    notebook = submission.content
    assert notebook is not None
    ids = {_nbgrader(cell).get("grade_id"): cell for cell in notebook.cells}
    if not any(grade_id in ids for grade_id in lesson.stubs):
        answers, matched, total = restore(notebook, lesson)
        rebuilt = copy.deepcopy(released)
        for cell in rebuilt.cells:
            grade_id = _nbgrader(cell).get("grade_id")
            if grade_id in answers:
                cell.source = answers[grade_id]
        submission.flag("restored", f"its cells had lost their nbgrader metadata: {matched} of {total} answers "
                        "were matched by the functions they define and graded with the original test cells")
        return rebuilt
    for cell in released.cells:
        meta = _nbgrader(cell)
        if not meta.get("grade") or meta.get("solution"):
            continue
        grade_id = meta["grade_id"]
        if grade_id not in ids:
            submission.flag("tampered", f"test cell {grade_id} was deleted; graded with the original")
        elif ids[grade_id].source.strip() != cell.source.strip():
            submission.flag("tampered", f"test cell {grade_id} was edited; graded with the original")
    return notebook
