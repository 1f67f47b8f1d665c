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


def test_record_calls_sees_aliased_helpers_inside_forbid():
    from helpers.flash import block_attention as aliased  # bound before the recorder is set

    q = torch.randn(2, 3, 4)
    with pytest.raises(_core.ShortcutUsed, match="helpers.attention.softmax"):
        with _core.forbid(helpers=["helpers.attention.softmax"]):
            with _core.record_calls(["helpers.flash.block_attention"]) as calls:
                aliased(q, q[..., :2, :], q[..., :2, :], 0.5)
                helpers.attention.softmax(q)  # the outer tripwire still sees this
    assert [(name, tuple(args["k"].shape)) for name, args in calls] == [
        ("helpers.flash.block_attention", (2, 2, 4))]


def test_record_shapes_sees_operators_and_methods():
    with _core.record_shapes() as shapes:
        product = torch.randn(3, 5) @ torch.randn(5, 7)
        product.sum(-1)
    assert (3, 7) in shapes and (3,) in shapes
