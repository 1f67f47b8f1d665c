"""The mutation check's list stays valid as the code changes, and its harness works: one
mutant, injected in a scratch copy, is noticed by the tests it names; tests that cannot run
notice nothing."""

from __future__ import annotations

from mutants import MUTANTS, Mutant, check_snippets, run_mutant, unmutated


def test_every_mutant_snippet_occurs_exactly_once():
    assert check_snippets() == []


def test_the_harness_notices_a_mutant_and_passes_the_original():
    mutant = next(m for m in MUTANTS if m.name == "attention-scale-forgotten")
    assert run_mutant(mutant)[1]
    assert unmutated([mutant]) is None, "the unmutated course should pass the named tests"


def test_tests_that_cannot_run_notice_nothing():
    """A test that is not there (pytest exits 4) must not pass for one that failed."""
    unchanged = Mutant("identity", "helpers/attention.py", "import math", "import math",
                       ("tests/test_kv_cache.py::test_that_does_not_exist",))
    _, noticed, _, said = run_mutant(unchanged)
    assert not noticed and said.startswith("pytest exited 4"), said
    assert unmutated([unchanged]).startswith("pytest exited 4")
