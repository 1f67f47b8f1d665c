"""Measure the course's bars and write them to benchmarks/REPORT.md.

    python benchmarks/report.py              lessons, autograde, and every benchmark
    python benchmarks/report.py --quick      lessons and autograde only
    python benchmarks/report.py --only mha   lessons, autograde and benchmarks/bench_mha.py

Each ``benchmarks/bench_NAME.py`` is one section of the report: it defines ``TITLE`` and
``run() -> str`` (its markdown), and runs alone as a script.

Bars (COURSE.md): each solution notebook <= 90 s and all of them <= 10 min on a 2-core CPU;
autograding one student's full submission (every lesson) <= 2 min.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import nbclient
import nbformat
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from helpers.course.autograde import autograde  # noqa: E402
from helpers.course.lessons import find_lessons  # noqa: E402
from helpers.course.release import answered_notebook  # noqa: E402
from helpers.course.source import build_notebook  # noqa: E402


def execute_solution(script: Path) -> float:
    """Seconds to execute one solution notebook top to bottom, kernel start included."""
    notebook = build_notebook(script)
    started = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(script.parent)}}).execute()
    return time.perf_counter() - started


def time_solutions(lessons) -> list[tuple[str, float, float]]:
    """Seconds to execute each solution notebook: alone, and beside a second notebook (two
    copies started together, the slower one counted), as when a student runs two notebooks
    or the test suite runs two at once on the same CPU. Returns (name, alone, beside)."""
    times = []
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        for lesson in lessons:
            alone = pool.submit(execute_solution, lesson.script).result()
            pair = [pool.submit(execute_solution, lesson.script) for _ in range(2)]
            beside = max(future.result() for future in pair)
            times.append((lesson.name, alone, beside))
            print(f"  {lesson.name}: {alone:.1f} s alone, {beside:.1f} s beside a second", flush=True)
    return times


def time_autograde(lessons, jobs: int) -> tuple[float, float, float]:
    """Seconds to autograde one student who answered every lesson; returns (time, score, max)."""
    with tempfile.TemporaryDirectory() as scratch:
        submissions = Path(scratch) / "submissions"
        for lesson in lessons:
            target = submissions / "student" / lesson.name
            target.mkdir(parents=True)
            nbformat.write(answered_notebook(lesson), target / f"{lesson.name}.ipynb")
        started = time.perf_counter()
        rows, _ = autograde(submissions, Path(scratch) / "out", lessons, jobs=jobs, progress=lambda line: None)
        elapsed = time.perf_counter() - started
    return elapsed, sum(row.score for row in rows), sum(row.max_score for row in rows)


def benchmark_names(only: list[str] | None) -> list[str]:
    """The benchmarks to run: every ``benchmarks/bench_NAME.py``, or those named."""
    available = sorted(p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py"))
    for name in only or []:
        if name not in available:
            raise SystemExit(f"no benchmarks/bench_{name}.py (there are: {', '.join(available)})")
    return only or available


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the benchmarks")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only benchmarks/bench_NAME.py (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="autograde --jobs")
    args = parser.parse_args()
    lessons = find_lessons(ROOT)
    print("executing the solution notebooks")
    solutions = time_solutions(lessons)
    print("autograding one full submission")
    graded, score, max_score = time_autograde(lessons, args.jobs)

    total = sum(alone for _, alone, _ in solutions)
    lines = [
        "# Benchmark report",
        "",
        f"{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"device {'cuda' if torch.cuda.is_available() else 'cpu'}. Made by `python benchmarks/report.py`.",
        "",
        "## Solution notebooks, executed top to bottom (bar: <= 90 s each, <= 10 min in all)",
        "",
        "Seconds, kernel start included: alone, and beside a second notebook (two copies started "
        "together, the slower counted).",
        "",
        "| lesson | alone | beside a second | within 90 s |",
        "|---|---:|---:|---|",
        *[f"| {name} | {alone:.1f} | {beside:.1f} | {'yes' if max(alone, beside) <= 90 else 'NO'} |"
          for name, alone, beside in solutions],
        f"| **all {len(solutions)}** | **{total:.1f}** | | {'yes' if total <= 600 else 'NO'} (10 min) |",
        "",
        "## Autograding one student's full submission (bar: <= 2 min)",
        "",
        f"{len(lessons)} notebooks, `--jobs {args.jobs}`: **{graded:.1f} s**, score {score:g}/{max_score:g}, "
        f"{'within' if graded <= 120 else 'OVER'} the bar.",
    ]
    if not args.quick:
        for name in benchmark_names(args.only):
            module = importlib.import_module(f"bench_{name}")
            print(f"benchmark: {module.TITLE}", flush=True)
            lines += ["", f"## {module.TITLE}", "", module.run()]
    report = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "REPORT.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
