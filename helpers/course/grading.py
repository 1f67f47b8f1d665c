"""Grade one student's notebook for one lesson: the unit of work of ``autograde``, the same
in the local process pool and on a Dask worker.

The task carries all it needs: the notebook, and a template gradebook that holds the lesson
(made once by the client). It is graded in a scratch nbgrader course, in a child process
that is killed whole if it outlives the notebook timeout, and the graded notebook, the
per-cell scores and the feedback come back; the real gradebook and the output folder are
written by the client alone. A cell that kills the kernel loses its own points only: the
notebook is graded again with that cell replaced by one that raises, and the cell is named.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

MAX_CRASHES = 5
KERNEL_DIED = '''class KernelDied(Exception):
    def _render_traceback_(self):
        return [f"KernelDied: {{self}}"]

raise KernelDied("the Python kernel died while this cell ran (os._exit, a crash in compiled code, or out of "
                 "memory), so this cell earns no points; the other cells were graded without it ({name})")
'''


@dataclass
class GradingTask:
    """What a worker needs to grade one notebook; the template gradebook travels beside it."""

    lesson: str
    student: str          # the student's folder name: nbgrader's student id
    notebook: str         # the notebook to grade, as JSON
    cell_timeout: int
    notebook_timeout: int
    course_version: str   # course_digest() where the task was made
    threads: int | None = None  # threads per kernel; None: this machine's cores over its tasks at once

    @property
    def key(self) -> str:
        digest = hashlib.sha256(self.notebook.encode()).hexdigest()[:12]
        return f"grade-{self.lesson}-{self.student}-{digest}"


@dataclass
class GradingResult:
    """What comes back: scores per grade cell, the graded notebook and the feedback page."""

    success: bool
    score: float = 0.0
    max_score: float = 0.0
    grades: dict[str, float | None] = field(default_factory=dict)
    comments: dict[str, str | None] = field(default_factory=dict)
    graded: str = ""
    feedback: str = ""
    crashed: list[str] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    error: str = ""
    log: str = ""
    killed: bool = False
    threads: int = 0
    host: str = ""


@lru_cache(maxsize=1)
def course_digest() -> str:
    """A fingerprint of the installed course: every file of ``helpers`` (checks and hidden
    tests included) and nbgrader's version. A worker with another course refuses a task."""
    import nbgrader

    import helpers

    root = Path(helpers.__file__).parent
    digest = hashlib.sha256(nbgrader.__version__.encode())
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cores_here() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_here(slots: dict[str, int] | None = None) -> int:
    """This machine's share of cores for one kernel: on a Dask worker, the cores over the
    tasks that run at once on this host (``slots``: host -> threads of all its workers)."""
    tasks = 1
    try:
        from urllib.parse import urlsplit

        from distributed import get_worker

        worker = get_worker()
        tasks = (slots or {}).get(urlsplit(worker.address).hostname or "", 0) or worker.state.nthreads
    except (ImportError, ValueError, AttributeError):
        pass
    return max(1, cores_here() // max(1, tasks))


def grade_task(task: GradingTask, template: bytes, slots: dict[str, int] | None = None) -> GradingResult:
    """Grade ``task`` in a child process; never raises for a bad notebook."""
    threads = task.threads or threads_here(slots)
    host = os.uname().nodename if hasattr(os, "uname") else ""
    with tempfile.TemporaryDirectory(prefix="attention-course-grade-") as scratch:
        work = Path(scratch)
        (work / "task.pickle").write_bytes(pickle.dumps(task))
        (work / "template.db").write_bytes(template)
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads))
        command = [sys.executable, "-m", "helpers.course.grading", str(work), str(os.getpid())]
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=env, start_new_session=True)
        try:
            output, _ = child.communicate(timeout=task.notebook_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            output, _ = child.communicate()
            return GradingResult(False, killed=True, threads=threads, host=host, log=output or "",
                                 error=f"grading took longer than {task.notebook_timeout} s and was stopped")
        answer = work / "result.pickle"
        if not answer.is_file():
            return GradingResult(False, error=(output or "")[-4000:] or f"the grader exited with {child.returncode}",
                                 log=output or "", threads=threads, host=host)
        result = pickle.loads(answer.read_bytes())
        result.threads, result.host = threads, host
        return result


class _CrashGuard:
    """Knows which cell is running, and swaps the cells that killed the kernel for one that
    raises (``on_cell_execute`` runs right before a cell's code goes to the kernel)."""

    def __init__(self) -> None:
        self.running: tuple[int, str] | None = None
        self.dead: dict[int, str] = {}
        self.originals: dict[int, str] = {}

    def on_cell_execute(self, cell, cell_index: int, **_) -> None:
        name = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") or f"#{cell_index + 1}"
        self.running = (cell_index, name)
        if cell_index in self.dead:
            self.originals[cell_index] = cell.source
            cell.source = KERNEL_DIED.format(name=f"cell {name}")

    def bury_running(self) -> bool:
        """Mark the running cell as one that kills the kernel; False if that cannot help."""
        if self.running is None or self.running[0] in self.dead or len(self.dead) >= MAX_CRASHES:
            return False
        self.dead[self.running[0]] = self.running[1]
        return True


def _kernel_died(text: str) -> bool:
    return "DeadKernelError" in text or "kernel died" in text.lower()


def scrub_paths(html: str, roots: list[str]) -> str:
    """Feedback without the grader's file system: known folders cut off, and any path into
    an installed package reduced to the package's own path."""
    html = re.sub(r"(?:/[\w.+@-]+)*/ipykernel_\d+/\d+\.py", "your notebook cell", html)
    for root in sorted({r.rstrip("/") for r in roots if r and len(r) > 1}, key=len, reverse=True):
        html = html.replace(root + "/", "")
    return re.sub(r"(?:/[\w.+@-]+)+/(?:site|dist)-packages/", "", html)


def grade_here(task: GradingTask, work: Path) -> GradingResult:
    """Grade in this process, in a scratch course under ``work``."""
    import nbformat
    from nbgrader.api import Gradebook
    from traitlets.config import Config

    import helpers
    from helpers.course.gradebook import COURSE_ID, sqlite_url
    from helpers.course.lessons import nbgrader_api

    if task.course_version != course_digest():
        return GradingResult(False, error="this worker has another version of the course installed than the "
                                          "grading client: install the same version everywhere")
    course = work / "course"
    (course / "source" / task.lesson).mkdir(parents=True)
    submitted = course / "submitted" / task.student / task.lesson
    submitted.mkdir(parents=True)
    (submitted / f"{task.lesson}.ipynb").write_text(task.notebook, encoding="utf-8")
    (course / "gradebook.db").write_bytes((work / "template.db").read_bytes())
    url = sqlite_url(course / "gradebook.db")
    guard = _CrashGuard()
    config = Config()
    # A plain function: traitlets deep-copies configured values, and a copied bound method
    # would report to a copy of the guard.
    config.Execute.on_cell_execute = lambda **kwargs: guard.on_cell_execute(**kwargs)
    api = nbgrader_api(course, url, task.cell_timeout, config)
    log = ""
    while True:
        guard.running = None
        outcome = api.autograde(task.lesson, task.student, force=True)
        text = (outcome.get("log") or "") + "\n" + (outcome.get("error") or "")
        log += text
        if outcome["success"]:
            break
        if not _kernel_died(text) or not guard.bury_running():
            crashed = [guard.running[1]] if _kernel_died(text) and guard.running else []
            return GradingResult(False, error=text.strip()[-4000:], log=log,
                                 crashed=list(guard.dead.values()) + crashed)

    graded_path = course / "autograded" / task.student / task.lesson / f"{task.lesson}.ipynb"
    graded = nbformat.read(graded_path, as_version=4)
    for index, source in guard.originals.items():
        graded.cells[index].source = source
    nbformat.write(graded, graded_path)
    timed_out = [cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") or f"#{i + 1}"
                 for i, cell in enumerate(graded.cells) if cell.cell_type == "code"
                 and any(out.get("ename") == "CellTimeoutError" for out in cell.get("outputs", []))]
    with Gradebook(url, COURSE_ID) as gradebook:
        notebook = gradebook.find_submission_notebook(task.lesson, task.lesson, task.student)
        grades = {grade.name: grade.auto_score for grade in notebook.grades}
        comments = {comment.name: comment.auto_comment for comment in notebook.comments}
        score, max_score = float(notebook.score), float(notebook.max_score)
    feedback = api.generate_feedback(task.lesson, task.student)
    page = course / "feedback" / task.student / task.lesson / f"{task.lesson}.html"
    html = page.read_text(encoding="utf-8") if feedback["success"] and page.is_file() else ""
    roots = [str(work), str(Path(helpers.__file__).resolve().parents[1]), sys.prefix, sys.base_prefix,
             str(Path.home()), tempfile.gettempdir()]
    return GradingResult(True, score, max_score, grades, comments, nbformat.writes(graded), scrub_paths(html, roots),
                         list(guard.dead.values()), timed_out, log=log,
                         error="" if html else "no feedback could be written: " + (feedback.get("error") or "")[-300:])


def _exit_with_parent(parent: int) -> None:
    """End this process when the one that started it dies (a Dask worker killed mid-task):
    its kernel then ends too, as kernels watch their own parent."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main(work: Path, parent: int) -> None:
    _exit_with_parent(parent)
    task = pickle.loads((work / "task.pickle").read_bytes())
    result = grade_here(task, work)
    (work / "result.pickle").write_bytes(pickle.dumps(result))


if __name__ == "__main__":
    # Run the imported module's main, so results pickle as helpers.course.grading classes.
    from helpers.course.grading import main as grading_main

    grading_main(Path(sys.argv[1]), int(sys.argv[2]))
