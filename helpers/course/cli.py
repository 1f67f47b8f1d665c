"""``attention-course``: the one command line for students and instructors.

    attention-course lab                               open JupyterLab on your copy of notebooks/
    attention-course lab --instructor --dir DIR        grade by hand in Formgrader what autograde put in DIR
    attention-course release [LESSON ...]              regenerate notebooks/ from solutions/
    attention-course check                             notebooks/ is in sync and leaks nothing
    attention-course autograde SUBMISSIONS --out DIR   grade a folder of submissions
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from helpers.course.lessons import CourseError, find_lessons, find_root


def _lab(args: argparse.Namespace) -> int:
    from helpers.course.lab import copy_notebook, run_lab

    root = find_root()
    course = None
    if args.db and not (args.instructor and args.dir):
        raise CourseError("--db is the gradebook of an autograded class: attention-course lab --instructor "
                          "--dir DIR --db URL")
    if args.instructor and args.dir:
        from helpers.course.formgrader import find_course, open_gradebook, use_gradebook

        work = Path(args.dir).resolve()
        course = find_course(work)
        use_gradebook(args.db)
        gradebook, lessons, students = open_gradebook(course)
    elif args.instructor:
        work = root
    else:
        work = Path(args.dir).resolve() if args.dir else root / "my-work"
        for lesson in find_lessons(root):
            target = work / lesson.name
            if not target.exists() and lesson.student.is_file():
                target.mkdir(parents=True)
                copy_notebook(lesson.student, target / lesson.student.name)
                print(f"copied {lesson.name} into {target}")
    if not work.is_dir():
        raise FileNotFoundError(f"--dir {work} is not a folder")
    jupyter_args = [f"--ServerApp.root_dir={work}"]
    if args.port is not None:
        jupyter_args.append(f"--ServerApp.port={args.port}")
    if args.ip is not None:
        jupyter_args.append(f"--ServerApp.ip={args.ip}")
    if args.no_browser:
        jupyter_args.append("--ServerApp.open_browser=False")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        print("running as root (a container or a cloud shell?): starting Jupyter with --allow-root")
        jupyter_args.append("--ServerApp.allow_root=True")
    if course is not None:
        print(f"opening JupyterLab on {work} with nbgrader's Formgrader (Nbgrader menu) on the graded class "
              f"(lessons: {lessons}, students: {students}, gradebook {gradebook}); Ctrl-C stops it")
    elif args.instructor:
        print(f"opening JupyterLab on {work} with nbgrader's Create Assignment; Formgrader opens a graded class: "
              "attention-course autograde SUBMISSIONS --out DIR, then attention-course lab --instructor --dir DIR")
    else:
        print(f"opening JupyterLab on {work} (your copy; notebooks/ stays as released); Ctrl-C stops it")
    os.chdir(course or work)  # formgrader reads the nbgrader_config.py of the working directory
    return run_lab(jupyter_args + args.jupyter_args, instructor=args.instructor, formgrader=course is not None)


def _release(args: argparse.Namespace) -> int:
    from helpers.course.release import release

    for path in release(find_lessons(find_root(), args.lessons)):
        print(f"wrote {path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from helpers.course.release import check

    lessons = find_lessons(find_root(), args.lessons)
    problems = check(lessons, execute=not args.no_execute, jobs=args.jobs)
    for problem in problems:
        print(f"✗ {problem}")
    if problems:
        return 1
    print(f"✓ {len(lessons)} lessons: notebooks/ is what the release makes of solutions/, nothing leaks"
          + ("" if args.no_execute else ", every student notebook runs up to its first exercise"))
    return 0


def _autograde(args: argparse.Namespace) -> int:
    from helpers.course.autograde import autograde, summary_table

    submissions = Path(args.submissions)
    if not submissions.is_dir():
        print(f"error: submissions folder not found: {submissions.resolve()}", file=sys.stderr)
        return 2
    if args.roster and not Path(args.roster).is_file():
        print(f"error: roster not found: {Path(args.roster).resolve()}", file=sys.stderr)
        return 2
    out = Path(args.out)
    lessons = find_lessons(find_root(), args.lessons)
    interactive = sys.stdout.isatty()
    rows, skipped = autograde(submissions, out, lessons, db_url=args.db, jobs=args.jobs,
                              cell_timeout=args.timeout, notebook_timeout=args.notebook_timeout,
                              roster=Path(args.roster) if args.roster else None, force=args.force,
                              scheduler=args.scheduler, asked=[lesson.name for lesson in lessons]
                              if args.lessons else None, bar=interactive)
    for line in skipped[:20]:
        print(f"not graded: {line}")
    if len(skipped) > 20:
        print(f"... and {len(skipped) - 20} more")
    if not rows:
        print(f"error: no student submissions found in {submissions.resolve()} "
              f"(see {out / 'manifest.csv'})", file=sys.stderr)
        return 2
    print()
    print(summary_table(rows))
    print(f"\ngrades: {out / 'grades.csv'}   feedback: {out / 'feedback'}   "
          f"every file and what became of it: {out / 'manifest.csv'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attention-course", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    lab = commands.add_parser(
        "lab", help="open JupyterLab on your own copy of the student notebooks",
        description="Open JupyterLab on your own copy of the student notebooks (my-work/), with a "
                    "student's tools only. Ctrl-C stops it. As root (Docker, cloud shells) it starts "
                    "Jupyter with --allow-root. Options it does not know go to Jupyter, e.g. "
                    "--IdentityProvider.token=SECRET.")
    lab.add_argument("--dir", help="where your copy lives (default: my-work/ in the course folder); with "
                                   "--instructor, the --out folder of autograde, opened with Formgrader on "
                                   "its graded class (default: the course folder, without Formgrader)")
    lab.add_argument("--db", help="with --instructor --dir: the gradebook, if not the one autograde graded into "
                                  "(default: $ATTENTION_COURSE_DB, else autograde's; a password is never stored)")
    lab.add_argument("--port", type=int, help="port to serve on (default: Jupyter's 8888, or the next free one)")
    lab.add_argument("--ip", help="address to listen on (default: localhost only; "
                                  "0.0.0.0 inside Docker, with docker run -p 8888:8888)")
    lab.add_argument("--no-browser", action="store_true",
                     help="do not open a browser; open the printed URL yourself")
    lab.add_argument("--instructor", action="store_true",
                     help="show nbgrader's instructor tools (Formgrader, Create Assignment, course list): "
                          "attention-course lab --instructor --dir DIR grades by hand what autograde put in DIR")
    lab.set_defaults(run=_lab)

    release = commands.add_parser("release", help="rebuild solution and student notebooks from the lesson scripts")
    release.add_argument("lessons", nargs="*", help="lesson names or numbers (default: all)")
    release.set_defaults(run=_release)

    check = commands.add_parser("check", help="fail if notebooks/ drifted from solutions/, leaks, or does not run")
    check.add_argument("lessons", nargs="*", help="lesson names or numbers (default: all)")
    check.add_argument("--no-execute", action="store_true", help="skip running the student notebooks")
    check.add_argument("--jobs", type=int, default=2, help="notebooks run at once (default 2)")
    check.set_defaults(run=_check)

    grade = commands.add_parser("autograde", help="grade a folder of submissions with nbgrader")
    grade.add_argument("submissions", help="folder of student folders, zips (a class's too) or platform exports")
    grade.add_argument("--out", required=True, help="where grades.csv, feedback/ and the gradebook go")
    grade.add_argument("--lesson", dest="lessons", action="append",
                       help="grade only this lesson (repeatable); it is reported for every student")
    grade.add_argument("--db", default=os.environ.get("ATTENTION_COURSE_DB") or None,
                       help="gradebook: a SQLAlchemy URL such as postgresql://user@host/grades, or a SQLite file "
                            "(default: $ATTENTION_COURSE_DB, else DIR/gradebook.db); relative paths are from here")
    grade.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                       help="notebooks graded at once on this machine (default: one per core)")
    grade.add_argument("--scheduler", metavar="ADDRESS",
                       help="grade on a Dask cluster (tcp://host:8786) instead of this machine")
    grade.add_argument("--roster", help="CSV with a student_id column; its other columns hold the ids, "
                                        "names and logins that platforms use for each student")
    grade.add_argument("--force", action="store_true",
                       help="grade again what is unchanged since it was last graded")
    grade.add_argument("--timeout", type=int, default=120, help="seconds a cell may run before it is interrupted")
    grade.add_argument("--notebook-timeout", type=int, default=1800,
                       help="seconds one notebook may take in all before its grading is stopped")
    grade.set_defaults(run=_autograde)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "lab":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.jupyter_args = extra
    try:
        return args.run(args)
    except (FileNotFoundError, RuntimeError) as error:  # CourseError is a RuntimeError
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
