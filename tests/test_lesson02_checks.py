"""Lesson 02's visible checks and hidden tests: they accept the reference solution, reject the
typical wrong answers and the shortcuts, and cannot be fooled by a patched kernel."""

from __future__ import annotations

import math

import numpy
import pytest
import torch
import torch.nn.functional as F

import helpers.attention
from helpers import attention as reference
from helpers.checks import CheckFailed
from helpers.checks import lesson02 as checks
from helpers.hidden import lesson

from conftest import expect_hidden_failure

LESSON = "02"


EXERCISES = ["dot_scores", "stable_softmax", "attention", "attention_entropy"]


@pytest.mark.parametrize("name", EXERCISES)
def test_solution_passes_visible_and_hidden(solution, hidden, name, capsys):
    getattr(checks, name)(solution[name])
    assert "all checks passed" in capsys.readouterr().out
    for _ in range(3):  # fresh seeds, shapes and dims each time
        getattr(hidden, name)(solution[name])


# --- wrong answers: each is a mistake a student makes, each must fail both kinds of check ---

def scores_scaled(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


def scores_float32(q, k):
    return (q @ k.transpose(-2, -1)).float()


def softmax_wrong_axis(x, dim=-1):
    exp = (x - x.amax(dim=0, keepdim=True)).exp()
    return exp / exp.sum(dim=0, keepdim=True)


def softmax_unstable(x, dim=-1):
    return x.exp() / x.exp().sum(dim=dim, keepdim=True)


def softmax_nan_on_masked_rows(x, dim=-1):
    exp = (x - x.amax(dim=dim, keepdim=True)).exp()
    return exp / exp.sum(dim=dim, keepdim=True)


def entropy_bits(weights):
    return -(weights * torch.where(weights > 0, weights, 1.0).log2()).sum(-1)


def entropy_nan_at_zero(weights):
    return -(weights * weights.log()).sum(-1)


def entropy_flipped_sign(weights):
    return (weights * torch.where(weights > 0, weights, 1.0).log()).sum(-1)


def _wrong_attentions(solution):
    attention = solution["attention"]

    def missing_scale(q, k, v, mask=None, scale=None):
        return attention(q, k, v, mask, 1.0 if scale is None else scale)

    def inverted_mask(q, k, v, mask=None, scale=None):
        return attention(q, k, v, None if mask is None else ~mask, scale)

    def ignores_scale(q, k, v, mask=None, scale=None):
        return attention(q, k, v, mask)

    def wrong_axis(q, k, v, mask=None, scale=None):
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        scores = q @ k.transpose(-2, -1) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = reference.softmax(scores, dim=-2)
        return weights @ v, weights

    def nan_on_blind_queries(q, k, v, mask=None, scale=None):
        out, weights = attention(q, k, v, mask, scale)
        if mask is None:
            return out, weights
        return out.masked_fill(~mask.any(dim=-1, keepdim=True), float("nan")), weights

    return [missing_scale, inverted_mask, ignores_scale, wrong_axis, nan_on_blind_queries]


def _wrong_answers(solution):
    return {
        "dot_scores": [scores_scaled, scores_float32, lambda q, k: k @ q.transpose(-2, -1)],
        "stable_softmax": [softmax_wrong_axis, softmax_unstable, softmax_nan_on_masked_rows],
        "attention": _wrong_attentions(solution),
        "attention_entropy": [entropy_bits, entropy_nan_at_zero, entropy_flipped_sign],
    }


@pytest.mark.parametrize("name", EXERCISES)
def test_wrong_answers_fail(solution, hidden, name):
    for wrong in _wrong_answers(solution)[name]:
        with pytest.raises(CheckFailed):
            getattr(checks, name)(wrong)
        expect_hidden_failure(lambda: getattr(hidden, name)(wrong))


@pytest.mark.parametrize("wrong, hint", [
    (softmax_wrong_axis, "wrong axis"),
    (softmax_unstable, "subtract the row max before exp"),
    (softmax_nan_on_masked_rows, "all -inf"),
])
def test_softmax_check_names_the_mistake(wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        checks.stable_softmax(wrong)


def test_attention_check_names_the_mistake(solution):
    missing_scale, inverted_mask, _, wrong_axis, _ = _wrong_attentions(solution)
    for wrong, hint in [(missing_scale, "did you divide by √d_k"), (inverted_mask, "True means"),
                        (wrong_axis, "wrong axis")]:
        with pytest.raises(CheckFailed, match=hint):
            checks.attention(wrong)


def test_dot_scores_check_names_scaling():
    with pytest.raises(CheckFailed, match="divided by √d_k"):
        checks.dot_scores(scores_scaled)


def scores_unchecked(q, k):
    """No check of the last dims: torch's matmul error, not the promised ValueError."""
    return q @ k.transpose(-2, -1)


def scores_vague_error(q, k):
    if q.shape[-1] != k.shape[-1]:
        raise ValueError("shapes do not match")
    return q @ k.transpose(-2, -1)


@pytest.mark.parametrize("wrong, hint", [(scores_unchecked, "not ValueError"),
                                         (scores_vague_error, "should name both shapes")])
def test_dot_scores_error_promise_is_checked_and_graded(hidden, wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        checks.dot_scores(wrong)
    failure = expect_hidden_failure(lambda: hidden.dot_scores(wrong))
    assert "seed" in str(failure)


# --- shortcuts: right numbers, but they call what the exercise asks to write ---

def _torch_softmax(x, dim=-1):
    return torch.softmax(x, dim=dim).nan_to_num(0.0)


def _method_softmax(x, dim=-1):
    return x.softmax(dim).nan_to_num(0.0)


def _torch_attention(q, k, v, mask=None, scale=None):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).nan_to_num(0.0)
    weights = reference.softmax(q @ k.transpose(-2, -1) * (scale or 1 / math.sqrt(q.shape[-1]))
                                + (0 if mask is None else torch.zeros_like(mask, dtype=q.dtype)
                                   .masked_fill(~mask, float("-inf"))))
    return out, weights


@pytest.mark.parametrize("name, shortcut", [
    ("stable_softmax", _torch_softmax),
    ("stable_softmax", _method_softmax),
    ("stable_softmax", reference.softmax),
    ("attention", _torch_attention),
    ("attention", reference.scaled_dot_product_attention),
    ("attention_entropy", lambda weights: torch.special.entr(weights).sum(-1)),
    ("attention_entropy", lambda weights: -torch.xlogy(weights, weights).sum(-1)),
])
def test_shortcuts_fail_visible_and_hidden(hidden, name, shortcut):
    # the numbers are right, but the check tells the student before the grader sees it
    with pytest.raises(CheckFailed, match="calls"):
        getattr(checks, name)(shortcut)
    expect_hidden_failure(lambda: getattr(hidden, name)(shortcut), "ShortcutUsed")


# --- a student cell that patched the kernel cannot change a hidden verdict ---

@pytest.fixture
def patched_kernel(monkeypatch, solution):
    """Everything a student might override to make any answer look right."""
    missing_scale = _wrong_attentions(solution)[0]
    monkeypatch.setattr(torch, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(numpy, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.testing, "assert_close", lambda *args, **kwargs: None)
    monkeypatch.setattr(helpers.attention, "scaled_dot_product_attention", missing_scale)
    return missing_scale


def test_hidden_verdicts_survive_a_patched_kernel(patched_kernel, solution):
    hidden = lesson("02")  # loaded after the patches, as the hidden test cell does
    expect_hidden_failure(lambda: hidden.attention(patched_kernel))
    hidden.attention(solution["attention"])
    expect_hidden_failure(lambda: hidden.stable_softmax(softmax_unstable))
    hidden.stable_softmax(solution["stable_softmax"])
    assert helpers.attention.scaled_dot_product_attention is patched_kernel  # still patched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_solution_runs_on_cuda(solution):
    q, k, v = (torch.randn(2, 3, 4, 8, device="cuda") for _ in range(3))
    out, weights = solution["attention"](q, k, v, mask=reference.causal_mask(4, device="cuda"))
    assert out.device.type == "cuda" and weights.device.type == "cuda"
    assert float((solution["stable_softmax"](q) - torch.softmax(q, -1)).abs().max()) < 1e-6
