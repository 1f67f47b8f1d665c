"""The hidden-test machinery: private copies, tamper-proof comparisons, the shortcut tripwire."""

from __future__ import annotations

import pytest
import torch

import helpers.attention
from helpers.hidden import _core, lesson

from conftest import solution_namespace


def test_fresh_import_ignores_patched_helpers(monkeypatch):
    monkeypatch.setattr(helpers.attention, "softmax", lambda x, dim=-1: x)
    fresh = _core.fresh_import("helpers.attention")
    x = torch.randn(3, 4)
    assert torch.allclose(fresh.softmax(x).sum(-1), torch.ones(3))
    assert helpers.attention.softmax(x) is x, "the student's module was changed"


def test_expect_close_does_not_use_patchable_comparisons(monkeypatch):
    monkeypatch.setattr(torch, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.testing, "assert_close", lambda *args, **kwargs: None)
    with pytest.raises(_core.HiddenTestFailed, match="exceeds"):
        _core.expect_close(torch.zeros(3), torch.ones(3), "x")
    with pytest.raises(_core.HiddenTestFailed, match="shape"):
        _core.expect_close(torch.zeros(3), torch.zeros(4), "x")
    _core.expect_close(torch.ones(3) + 1e-7, torch.ones(3), "x")


def test_forbid_catches_aliased_torch_and_helpers_calls():
    from torch.nn.functional import softmax as aliased  # bound before the tripwire is set

    x = torch.randn(2, 5)
    with pytest.raises(_core.ShortcutUsed, match="softmax"):
        with _core.forbid(torch_functions=["softmax"]):
            aliased(x, dim=-1)
    with pytest.raises(_core.ShortcutUsed, match="helpers.attention.softmax"):
        with _core.forbid(helpers=["helpers.attention.softmax"]):
            helpers.attention.softmax(x)
    with _core.forbid(torch_functions=["softmax"], helpers=["helpers.attention.softmax"]):
        (x - x.amax(-1, keepdim=True)).exp()  # the building blocks stay allowed


def test_hidden_tests_leave_the_global_random_state_alone():
    answer = solution_namespace("03")["load_torch_mha"]  # its hidden test reseeds torch
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    lesson("03").load_torch_mha(answer)
    assert torch.equal(torch.rand(3), expected)
