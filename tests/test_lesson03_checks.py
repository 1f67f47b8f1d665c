"""Lesson 03's checks: they accept the lesson's solutions, reject typical mistakes and
shortcuts, and the hidden verdicts survive a student who patches comparisons or helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import attention as ref
from helpers.checks import CheckFailed
from helpers.checks import lesson03 as checks
from helpers.hidden import lesson

from conftest import expect_hidden_failure


LESSON = "03"


EXERCISES = [("split_heads", "split_heads"), ("merge_heads", "merge_heads"),
             ("mha_forward", "MultiHeadAttention"), ("param_count", "mha_param_count"),
             ("load_torch_mha", "load_torch_mha"), ("attention_from_to", "attention_from_to")]


@pytest.mark.parametrize("check, name", EXERCISES)
def test_solution_passes_visible_and_hidden(solution, hidden, check, name):
    getattr(checks, check)(solution[name])
    getattr(hidden, check)(solution[name])


# Typical wrong answers -----------------------------------------------------------------

def split_interleaved(x, n_heads):
    B, L, E = x.shape
    return x.view(B, L, E // n_heads, n_heads).permute(0, 3, 1, 2)


def split_no_transpose(x, n_heads):
    B, L, E = x.shape
    return x.reshape(B, n_heads, L, E // n_heads)


def split_truncating(x, n_heads):
    B, L, E = x.shape
    return x[..., : E // n_heads * n_heads].view(B, L, n_heads, E // n_heads).transpose(1, 2)


def split_unchecked(x, n_heads):
    """No divisibility check: torch's reshape raises first, with its own message."""
    B, L, E = x.shape
    return x.view(B, L, n_heads, E // n_heads).transpose(1, 2)


def split_vague_error(x, n_heads):
    B, L, E = x.shape
    if E % n_heads:
        raise ValueError("bad shape")
    return x.view(B, L, n_heads, E // n_heads).transpose(1, 2)


def merge_no_transpose(x):
    B, H, L, D = x.shape
    return x.reshape(B, L, H * D)


def merge_with_view(x):
    """Right on a tensor that happens to be contiguous after the transpose, an error on the
    output of attention."""
    B, H, L, D = x.shape
    return x.transpose(1, 2).view(B, L, H * D)


class NoOutputProjection(ref.MultiHeadAttention):
    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        q = ref.split_heads(self.q_proj(x), self.n_heads)
        k = ref.split_heads(self.k_proj(context), self.n_heads)
        v = ref.split_heads(self.v_proj(context), self.n_heads)
        return ref.merge_heads(ref.scaled_dot_product_attention(q, k, v, mask=mask)[0])


class KeysFromQueries(ref.MultiHeadAttention):
    def forward(self, x, context=None, mask=None):
        q = ref.split_heads(self.q_proj(x), self.n_heads)
        k = ref.split_heads(self.k_proj(x), self.n_heads)
        v = ref.split_heads(self.v_proj(x), self.n_heads)
        return self.out_proj(ref.merge_heads(ref.scaled_dot_product_attention(q, k, v)[0]))


class IgnoresMask(ref.MultiHeadAttention):
    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        q = ref.split_heads(self.q_proj(x), self.n_heads)
        k = ref.split_heads(self.k_proj(context), self.n_heads)
        v = ref.split_heads(self.v_proj(context), self.n_heads)
        return self.out_proj(ref.merge_heads(ref.scaled_dot_product_attention(q, k, v)[0]))


def count_three_projections(d_model, n_heads, bias=True, kdim=None, vdim=None):
    return 3 * d_model * d_model + (3 * d_model if bias else 0)


def count_without_biases(d_model, n_heads, bias=True, kdim=None, vdim=None):
    return 4 * d_model * d_model


def count_ignoring_widths(d_model, n_heads, bias=True, kdim=None, vdim=None):
    return 4 * d_model * d_model + (4 * d_model if bias else 0)


def load_swapped_kv(ours, theirs):
    w_q, w_k, w_v = theirs.in_proj_weight.chunk(3)
    with torch.no_grad():
        for proj, w in zip((ours.q_proj, ours.k_proj, ours.v_proj), (w_q, w_v, w_k)):
            proj.weight.copy_(w)
        ours.out_proj.weight.copy_(theirs.out_proj.weight)


def load_biases_always(ours, theirs):
    """Copies the biases even when there are none: 'NoneType' has no attribute 'chunk'."""
    with torch.no_grad():
        projections = (ours.q_proj, ours.k_proj, ours.v_proj)
        for proj, w, b in zip(projections, theirs.in_proj_weight.chunk(3),
                              theirs.in_proj_bias.chunk(3)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.out_proj.weight.copy_(theirs.out_proj.weight)
        ours.out_proj.bias.copy_(theirs.out_proj.bias)


def from_to_every_pair(weights, queries, keys):
    return weights[:, :, queries, keys].mean(dim=(0, 2))


def from_to_swapped(weights, queries, keys):
    return weights[torch.arange(len(queries)), :, keys, queries].mean(dim=0)


def from_to_per_sentence(weights, queries, keys):
    return weights[torch.arange(len(queries)), :, queries, keys]


def from_to_summed(weights, queries, keys):
    return weights[torch.arange(len(queries)), :, queries, keys].sum(dim=0)


def load_weights_only(ours, theirs):
    with torch.no_grad():
        for proj, w in zip((ours.q_proj, ours.k_proj, ours.v_proj), theirs.in_proj_weight.chunk(3)):
            proj.weight.copy_(w)
        ours.out_proj.weight.copy_(theirs.out_proj.weight)


WRONG = [
    ("split_heads", split_interleaved, "interleaved"),
    ("split_heads", split_no_transpose, "straight to"),
    ("split_heads", split_truncating, "ValueError"),
    ("split_heads", split_unchecked, "(?s)RuntimeError.*raise a ValueError that names both"),
    ("split_heads", split_vague_error, "name both sizes"),
    ("merge_heads", merge_no_transpose, "transpose"),
    ("merge_heads", merge_with_view, "(?s)view.*not contiguous.*use .reshape"),
    ("mha_forward", NoOutputProjection, "out_proj"),
    ("mha_forward", KeysFromQueries, "context"),
    ("mha_forward", IgnoresMask, "mask"),
    ("param_count", count_three_projections, "output projection"),
    ("param_count", count_without_biases, "biases"),
    ("param_count", count_ignoring_widths, "kdim"),
    ("load_torch_mha", load_swapped_kv, "swapped"),
    ("load_torch_mha", load_weights_only, "bias"),
    ("load_torch_mha", load_biases_always, "(?s)NoneType.*in_proj_bias is None"),
    ("attention_from_to", from_to_every_pair, "every pair"),
    ("attention_from_to", from_to_swapped, "swapped"),
    ("attention_from_to", from_to_per_sentence, r"\(B, H\)"),
    ("attention_from_to", from_to_summed, "summed"),
]


@pytest.mark.parametrize("check, answer, hint", WRONG)
def test_visible_check_names_the_mistake(check, answer, hint):
    with pytest.raises(CheckFailed, match=hint):
        getattr(checks, check)(answer)


@pytest.mark.parametrize("check, answer, hint", WRONG)
def test_hidden_test_rejects_the_mistake(hidden, check, answer, hint):
    failure = expect_hidden_failure(lambda: getattr(hidden, check)(answer))  # one draw, as graded
    assert type(failure).__name__ != "ShortcutUsed", failure
    assert "seed" in str(failure), failure  # the draw can be replayed


# Shortcuts -----------------------------------------------------------------------------

class CallsReference(ref.MultiHeadAttention):
    def forward(self, x, context=None, mask=None):
        return super().forward(x, context=context, mask=mask)


class CallsTorch(nn.Module):
    def __init__(self, d_model, n_heads, bias=True):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(d_model, d_model, bias=bias) for _ in range(4))

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        b = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        out, _ = nn.functional.multi_head_attention_forward(
            x.transpose(0, 1), context.transpose(0, 1), context.transpose(0, 1),
            x.shape[-1], self.n_heads, w, b, None, None, False, 0.0, self.out_proj.weight,
            self.out_proj.bias, need_weights=False, attn_mask=None if mask is None else ~mask)
        return out.transpose(0, 1)


def count_by_building(d_model, n_heads, bias=True, kdim=None, vdim=None):
    module = nn.MultiheadAttention(d_model, n_heads, bias=bias, kdim=kdim, vdim=vdim)
    return sum(p.numel() for p in module.parameters())


def load_through_reference(ours, theirs):
    ours.load_state_dict(type(ours).from_torch(theirs).state_dict())


SHORTCUTS = [("split_heads", ref.split_heads), ("merge_heads", ref.merge_heads),
             ("mha_forward", CallsReference), ("mha_forward", CallsTorch),
             ("param_count", count_by_building), ("load_torch_mha", load_through_reference)]


@pytest.mark.parametrize("check, answer", SHORTCUTS)
def test_shortcuts_fail_the_visible_check_and_the_hidden_test(hidden, check, answer):
    with pytest.raises(CheckFailed, match="calls"):  # the student hears it before grading ...
        getattr(checks, check)(answer)
    with pytest.raises(hidden._core.ShortcutUsed):  # ... and the grader does not pay for it
        getattr(hidden, check)(answer)


def test_hidden_verdicts_ignore_patched_comparisons_and_helpers(monkeypatch, solution):
    monkeypatch.setattr(torch, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.testing, "assert_close", lambda *args, **kwargs: None)
    monkeypatch.setattr(ref, "split_heads", split_interleaved)
    monkeypatch.setattr(ref, "merge_heads", merge_no_transpose)
    monkeypatch.setattr(ref.MultiHeadAttention, "forward", lambda self, x, **kw: x)
    hidden = lesson("03")
    with pytest.raises(hidden._core.HiddenTestFailed):
        hidden.split_heads(split_interleaved)
    with pytest.raises(hidden._core.HiddenTestFailed):
        hidden.load_torch_mha(load_swapped_kv)
    with pytest.raises(hidden._core.HiddenTestFailed):
        hidden.merge_heads(merge_no_transpose)
    hidden.load_torch_mha(solution["load_torch_mha"])
