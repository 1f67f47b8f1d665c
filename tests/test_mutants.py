"""The mutation check's list stays valid as the code changes, and its harness works: one
mutant, injected in a scratch copy, is noticed by the tests it names."""

from __future__ import annotations

from mutants import MUTANTS, Mutant, check_snippets, run_mutant


def test_every_mutant_snippet_occurs_exactly_once():
    assert check_snippets() == []


def test_the_harness_notices_a_mutant_and_passes_the_original():
    noticed = run_mutant(next(m for m in MUTANTS if m.name == "attention-scale-forgotten"))[1]
    assert noticed
    unchanged = Mutant("identity", "helpers/attention.py", "import math", "import math",
                       ("tests/test_kv_cache.py",))
    assert not run_mutant(unchanged)[1], "the unmutated course should pass the named tests"
