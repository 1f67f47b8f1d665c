"""Lesson 04's checks: they accept the lesson's solutions, reject typical mistakes and
shortcuts, and the hidden verdicts survive a student who patches comparisons or helpers."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.bias import causal_lower_right

from helpers import attention as ref
from helpers.checks import CheckFailed
from helpers.checks import lesson04 as checks
from helpers.hidden import lesson

from conftest import expect_hidden_failure


LESSON = "04"


EXERCISES = [("causal_mask", "causal_mask"), ("padding_mask", "padding_mask"),
             ("cross_attention", "cross_attention"),
             ("gradient_dependence", "gradient_dependence")]


@pytest.mark.parametrize("check, name", EXERCISES)
def test_solution_passes_visible_and_hidden(solution, hidden, check, name):
    getattr(checks, check)(solution[name])
    getattr(hidden, check)(solution[name])


# Typical wrong answers -----------------------------------------------------------------

def causal_top_left(L, S=None, device=None):
    S = L if S is None else S
    return torch.ones(L, S, dtype=torch.bool, device=device).tril()


def causal_inverted(L, S=None, device=None):
    S = L if S is None else S
    return torch.ones(L, S, dtype=torch.bool, device=device).triu(S - L + 1)


def causal_without_diagonal(L, S=None, device=None):
    S = L if S is None else S
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(S - L - 1)


def padding_inverted(lengths, S):
    return (torch.arange(S) >= lengths[:, None])[:, None, None, :]


def padding_off_by_one(lengths, S):
    return (torch.arange(S) <= lengths[:, None])[:, None, None, :]


def padding_wrong_axis(lengths, S):
    return (torch.arange(S) < lengths[:, None])[:, None, :, None]


def cross_from_x(attn, x, context, context_lengths=None):
    q = ref.split_heads(attn.q_proj(x), attn.n_heads)
    k = ref.split_heads(attn.k_proj(x), attn.n_heads)
    v = ref.split_heads(attn.v_proj(x), attn.n_heads)
    return attn.out_proj(ref.merge_heads(ref.scaled_dot_product_attention(q, k, v)[0]))


def cross_unmasked(attn, x, context, context_lengths=None):
    q = ref.split_heads(attn.q_proj(x), attn.n_heads)
    k = ref.split_heads(attn.k_proj(context), attn.n_heads)
    v = ref.split_heads(attn.v_proj(context), attn.n_heads)
    return attn.out_proj(ref.merge_heads(ref.scaled_dot_product_attention(q, k, v)[0]))


def dependence_transposed(model, x):
    x = x.detach().requires_grad_(True)
    out = model(x)
    rows = [torch.autograd.grad(out[:, i].sum(), x, retain_graph=True)[0].norm(dim=(0, 2))
            for i in range(out.shape[1])]
    return torch.stack(rows).T


def dependence_accumulated(model, x):
    """One .backward() per row into the same x.grad: row i adds up the gradients of 0 .. i."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    rows = []
    for i in range(out.shape[1]):
        out[:, i].sum().backward(retain_graph=True)
        rows.append(x.grad.norm(dim=(0, 2)))
    return torch.stack(rows)


def dependence_without_retain_graph(model, x):
    """The second backward through the same graph raises inside the student's code."""
    x = x.detach().requires_grad_(True)
    out = model(x)
    rows = [torch.autograd.grad(out[:, i].sum(), x)[0].norm(dim=(0, 2))
            for i in range(out.shape[1])]
    return torch.stack(rows)


def cross_by_calling_module(attn, x, context, context_lengths=None):
    """The shortcut the exercise forbids: the module's own forward."""
    mask = None if context_lengths is None else ref.padding_mask(context_lengths, context.shape[1])
    return attn(x, context=context, mask=mask)


def dependence_of_total(model, x):
    """One backward pass of the whole output: every row is the same, the future leaks in."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    return grad.norm(dim=(0, 2)).expand(x.shape[1], x.shape[1])


WRONG = [
    ("causal_mask", causal_top_left, "top-left aligned"),
    ("causal_mask", causal_inverted, "inverted"),
    ("causal_mask", causal_without_diagonal, "diagonal"),
    ("padding_mask", padding_inverted, "inverted"),
    ("padding_mask", padding_off_by_one, "off by one"),
    ("padding_mask", padding_wrong_axis, r"\(B, 1, 1, S\)"),
    ("cross_attention", cross_from_x, "context"),
    ("cross_attention", cross_unmasked, "padded"),
    ("gradient_dependence", dependence_transposed, "transposed"),
    ("gradient_dependence", dependence_of_total, "reference"),
    ("gradient_dependence", dependence_accumulated, "adds to x.grad"),
    ("gradient_dependence", dependence_without_retain_graph, "(?s)second time.*retain_graph=True"),
    ("cross_attention", cross_by_calling_module, "(?s)calls helpers.attention.MultiHeadAttention"
                                                 ".*calling attn"),
]


@pytest.mark.parametrize("check, answer, hint", WRONG)
def test_visible_check_names_the_mistake(check, answer, hint):
    with pytest.raises(CheckFailed, match=hint):
        getattr(checks, check)(answer)


@pytest.mark.parametrize("check, answer, hint", WRONG)
def test_hidden_test_rejects_the_mistake(hidden, check, answer, hint):
    failure = expect_hidden_failure(lambda: getattr(hidden, check)(answer))  # one draw, as graded
    assert "seed" in str(failure), failure  # the draw can be replayed


# Shortcuts -----------------------------------------------------------------------------

def causal_from_torch(L, S=None, device=None):
    S = L if S is None else S
    return causal_lower_right(L, S)._materialize(device)


SHORTCUTS = [("causal_mask", ref.causal_mask), ("causal_mask", causal_from_torch),
             ("padding_mask", ref.padding_mask), ("cross_attention", cross_by_calling_module)]


@pytest.mark.parametrize("check, answer", SHORTCUTS)
def test_shortcuts_fail_the_visible_check_and_the_hidden_test(hidden, check, answer):
    with pytest.raises(CheckFailed, match="calls"):  # the student hears it before grading ...
        getattr(checks, check)(answer)
    with pytest.raises(hidden._core.ShortcutUsed):  # ... and the grader does not pay for it
        getattr(hidden, check)(answer)


def test_hidden_verdicts_ignore_patched_comparisons_and_helpers(monkeypatch, solution):
    monkeypatch.setattr(torch, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.testing, "assert_close", lambda *args, **kwargs: None)
    monkeypatch.setattr(ref, "causal_mask", causal_top_left)
    monkeypatch.setattr(ref.MultiHeadAttention, "from_torch", classmethod(
        lambda cls, theirs: cls(theirs.embed_dim, theirs.num_heads)))
    hidden = lesson("04")
    with pytest.raises(hidden._core.HiddenTestFailed):
        hidden.causal_mask(causal_inverted)
    with pytest.raises(hidden._core.HiddenTestFailed):
        hidden.padding_mask(padding_off_by_one)
    with pytest.raises(hidden._core.HiddenTestFailed):
        hidden.cross_attention(cross_from_x)
    hidden.cross_attention(solution["cross_attention"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gradient_dependence_runs_on_cuda(solution):
    model = checks.CausalSelfAttention(8, 2).cuda()
    x = torch.randn(2, 5, 8, device="cuda")
    dependence = solution["gradient_dependence"](model, x)
    assert dependence.device.type == "cuda"
    assert bool((dependence.triu(diagonal=1) == 0).all())
    assert torch.allclose(dependence.cpu(), checks.dependence_oracle(model.cpu(), x.cpu()),
                          atol=1e-5)
