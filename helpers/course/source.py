"""Lesson sources: a plain-text percent script is the one source of truth of each lesson.

`solutions/NN_name/NN_name.py` is written in the percent format that Jupyter tools know
(``# %%`` starts a cell), with a short header that marks nbgrader cells::

    # %% [markdown]              a markdown cell; its lines start with "# "
    # %%                         an ordinary code cell
    # %% solution id=softmax     an autograded answer cell (### BEGIN/END SOLUTION inside)
    # %% tests id=softmax-tests points=2
                                 an autograder test cell (### BEGIN/END HIDDEN TESTS inside)

`build_notebook` turns it into the solution `.ipynb`, with stable cell ids and no outputs,
so that the notebook is a pure function of the script and diffs stay small.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import nbformat

CELL_MARKER = re.compile(r"^# %%(?P<header>.*)$")
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


class SourceError(ValueError):
    """A lesson script that cannot be turned into a notebook; the message names file and line."""


def _parse_header(header: str, path: Path, lineno: int) -> tuple[str, dict[str, str]]:
    """Split ``[markdown] solution id=x points=2`` into a cell kind and its options."""
    words = shlex.split(header.strip())
    kind, options = "code", {}
    for word in words:
        if word == "[markdown]":
            kind = "markdown"
        elif word in ("solution", "tests"):
            kind = word
        elif "=" in word:
            key, value = word.split("=", 1)
            options[key] = value
        else:
            raise SourceError(f"{path}:{lineno}: unknown cell header word {word!r}")
    if kind in ("solution", "tests") and "id" not in options:
        raise SourceError(f"{path}:{lineno}: a {kind} cell needs id=NAME")
    if kind == "tests" and "points" not in options:
        raise SourceError(f"{path}:{lineno}: a tests cell needs points=N")
    return kind, options


def _markdown_text(lines: list[str], path: Path, start: int) -> str:
    out = []
    for offset, line in enumerate(lines):
        if line == "#":
            out.append("")
        elif line.startswith("# "):
            out.append(line[2:])
        elif line.strip() == "":
            out.append("")
        else:
            raise SourceError(f"{path}:{start + offset}: markdown lines must start with '# '")
    return "\n".join(out).strip("\n")


def _nbgrader_metadata(kind: str, options: dict[str, str]) -> dict:
    meta = {"grade_id": options["id"], "locked": kind == "tests", "schema_version": 3,
            "task": False, "solution": kind == "solution", "grade": kind == "tests"}
    if kind == "tests":
        meta["points"] = int(options["points"])
    return meta


def build_notebook(path: Path) -> nbformat.NotebookNode:
    """Read a lesson script and return its solution notebook (nbformat 4.5, no outputs)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"lesson source not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    stem = path.stem.split("_", 1)[0]
    chunks: list[tuple[str, int, list[str]]] = []
    for lineno, line in enumerate(lines, start=1):
        match = CELL_MARKER.match(line)
        if match:
            chunks.append((match["header"], lineno, []))
        elif chunks:
            chunks[-1][2].append(line)
        elif line.strip():
            raise SourceError(f"{path}:{lineno}: text before the first '# %%' cell marker")
    cells, seen = [], set()
    for index, (header, lineno, body) in enumerate(chunks):
        kind, options = _parse_header(header, path, lineno)
        while body and not body[-1].strip():
            body.pop()
        cell_id = options.get("id", f"{stem}-{index:03d}")
        if cell_id in seen:
            raise SourceError(f"{path}:{lineno}: cell id {cell_id!r} is used twice")
        seen.add(cell_id)
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(_markdown_text(body, path, lineno + 1), id=cell_id)
        else:
            cell = nbformat.v4.new_code_cell("\n".join(body).strip("\n"), id=cell_id)
            if kind in ("solution", "tests"):
                cell.metadata["nbgrader"] = _nbgrader_metadata(kind, options)
        cells.append(cell)
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    notebook.nbformat, notebook.nbformat_minor = 4, 5
    return notebook


def write_notebook(notebook: nbformat.NotebookNode, path: Path) -> None:
    """Write a notebook the way the course commits it: one JSON layout, newline at the end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(nbformat.writes(notebook) + "\n", encoding="utf-8")


if __name__ == "__main__":
    import sys

    for argument in sys.argv[1:]:
        source = Path(argument)
        write_notebook(build_notebook(source), source.with_suffix(".ipynb"))
        print(f"built {source.with_suffix('.ipynb')}")
