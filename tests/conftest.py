"""Shared fixtures: the course root and its lessons."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.course.lessons import find_lessons

ROOT = Path(__file__).resolve().parents[1]
LESSONS = find_lessons(ROOT)

# Notebook kernels and grading children inherit this: warnings on stderr would zero a test cell.
os.environ.setdefault("PYTHONWARNINGS", "ignore")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT
