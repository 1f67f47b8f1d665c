"""How fast a class is graded, and what a large one would take.

A class of N students who each hand in lessons 01-05 (each notebook made distinct, so none
is graded once for several students; all eleven lessons would take hours here) is graded:

- on the local process pool at ``--jobs 1`` and ``--jobs 2`` (notebooks per minute, and the
  peak memory of the grader with all its children and kernels),
- again into the same folder with nothing changed (the incremental re-run),
- on a local Dask cluster with as many worker processes as the pool has jobs (the engine's
  overhead, as a ratio of times against the pool),

and the measured rate is projected to 300 students x 11 lessons on one 16-core machine and
on four of them. Run ``python benchmarks/bench_grading.py --students N`` (default 20, or
``ATTENTION_COURSE_BENCH_STUDENTS``); it writes ``benchmarks/out/grading.md``. On a 2-core
machine N = 20 takes most of an hour.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbformat

from helpers.course.autograde import autograde
from helpers.course.grading import cores_here
from helpers.course.lessons import find_lessons
from helpers.course.release import answered_notebook
from timing import publish

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).parent / "out" / "grading.md"
JOBS = (1, 2)
PROJECTED_STUDENTS, PROJECTED_LESSONS = 300, 11

TITLE = "Grading a class: throughput, re-runs, Dask, and 300 x 11"


def make_class(folder: Path, students: int, lessons) -> int:
    """Every student answers every lesson; a comment makes each notebook their own."""
    for lesson in lessons:
        notebook = answered_notebook(lesson)
        first = next(c for c in notebook.cells if c.metadata.get("nbgrader", {}).get("solution"))
        answer = first.source
        for student in range(students):
            first.source = f"# handed in by student {student:03d}\n{answer}"
            target = folder / f"student{student:03d}" / lesson.name
            target.mkdir(parents=True, exist_ok=True)
            nbformat.write(notebook, target / f"{lesson.name}.ipynb")
    return students * len(lessons)


class PeakMemory:
    """The largest resident memory of this process and all its descendants together
    (grading children, kernels, Dask workers), sampled every 0.2 s."""

    def __init__(self) -> None:
        import psutil

        self.me, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while self.running:
            total = 0
            for process in [self.me] + self.me.children(recursive=True):
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self) -> PeakMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()


def timed(grade) -> tuple[float, float, float]:
    """(seconds, peak MiB, total score) of one grading run."""
    with PeakMemory() as memory:
        started = time.perf_counter()
        rows = grade()
        seconds = time.perf_counter() - started
    return seconds, memory.peak / 2**20, sum(row.score for row in rows)


def run(students: int | None = None) -> str:
    """Grade the class every way, print and write the markdown, and return it."""
    students = students or int(os.environ.get("ATTENTION_COURSE_BENCH_STUDENTS", "20"))
    lessons = find_lessons(ROOT)[:5]
    quiet = lambda line: None  # noqa: E731
    results: dict[str, tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-grading-") as scratch:
        scratch = Path(scratch)
        count = make_class(scratch / "class", students, lessons)
        for jobs in JOBS:
            out = scratch / f"jobs{jobs}"
            results[f"--jobs {jobs}"] = timed(lambda: autograde(scratch / "class", out, lessons, jobs=jobs,
                                                                progress=quiet)[0])
            print(f"  --jobs {jobs}: {results[f'--jobs {jobs}'][0]:.0f} s", flush=True)
        results["re-run, nothing changed"] = timed(lambda: autograde(
            scratch / "class", scratch / f"jobs{JOBS[-1]}", lessons, jobs=JOBS[-1], progress=quiet)[0])
        from distributed import LocalCluster

        started = time.perf_counter()
        with LocalCluster(n_workers=JOBS[-1], threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=":0", silence_logs=logging.ERROR) as cluster:
            startup = time.perf_counter() - started
            results[f"Dask, {JOBS[-1]} local workers"] = timed(lambda: autograde(
                scratch / "class", scratch / "dask", lessons, scheduler=cluster.scheduler_address,
                progress=quiet)[0])

    load = os.getloadavg()[0]
    pool = results[f"--jobs {JOBS[-1]}"][0]
    lines = [f"{students} students x {len(lessons)} lessons = {count} distinct notebooks, every answer right; "
             f"{cores_here()} CPU cores, load average {load:.1f} at the end (other processes slow every run "
             f"alike). Peak memory: the grader, its children, kernels and Dask workers together.", "",
             "| run | seconds | notebooks / min | peak memory (MiB) | score | time / local pool |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, (seconds, peak, score) in results.items():
        graded = 0 if name.startswith("re-run") else count
        rate = f"{60 * graded / seconds:.1f}" if graded else "-"
        lines.append(f"| {name} | {seconds:.1f} | {rate} | {peak:.0f} | {score:g} | {seconds / pool:.2f} |")
    one, two = (count / results[f"--jobs {j}"][0] for j in JOBS)
    dask_ratio = results[f"Dask, {JOBS[-1]} local workers"][0] / pool
    total = PROJECTED_STUDENTS * PROJECTED_LESSONS
    per_job = two / JOBS[-1] * 3600  # notebooks per hour per job, with every core busy
    on_one = total / (per_job * 16)
    on_four = total / (per_job * 64) * dask_ratio
    lines += ["", f"Dask cluster start-up (not in its time): {startup:.1f} s. Throughput at `--jobs {JOBS[-1]}` over "
              f"`--jobs 1`: {two / one:.2f}x (above {JOBS[-1]}x only when the machine's load changed between runs); "
              f"the engine's overhead is the Dask time over the pool's, {dask_ratio:.2f}.", "",
              f"**Projection, {PROJECTED_STUDENTS} students x {PROJECTED_LESSONS} lessons = {total} notebooks**, "
              f"from the measured {per_job:.0f} notebooks per hour per job with every core of this machine busy, "
              f"one job per core (lessons 06-11 assumed to cost what 01-05 do on average): one 16-core machine "
              f"with `--jobs 16`: **{on_one:.1f} h**; four 16-core machines on Dask with a PostgreSQL gradebook: "
              f"**{on_four:.1f} h** (the measured Dask overhead included)."]
    table = "\n".join(lines) + "\n"
    return publish(table, OUT)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", type=int, help="class size (default 20)")
    sys.exit(run(parser.parse_args().students) and 0)
