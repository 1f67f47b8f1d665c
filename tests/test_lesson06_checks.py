"""Lesson 06's checks: they accept the lesson's solutions, reject the typical mistakes of
FlashAttention (each visible failure naming it), reject the shortcuts through
``helpers.flash`` and PyTorch's attention, and keep their verdict in a patched kernel."""

from __future__ import annotations

import math

import numpy
import pytest
import torch

import helpers.flash
from helpers import flash
from helpers.attention import scaled_dot_product_attention
from helpers.checks import CheckFailed
from helpers.checks import lesson06 as checks
from helpers.hidden import lesson

from conftest import expect_hidden_failure

LESSON = "06"

EXERCISES = [("hbm_accesses", "hbm_accesses"), ("merge_softmax_states", "merge_softmax_states"),
             ("tiled_attention", "tiled_attention"),
             ("causal_tiled_attention", "causal_tiled_attention"),
             ("tiled_attention_backward", "tiled_attention_backward"),
             ("flash_function", "FlashAttention")]


@pytest.mark.parametrize("check, name", EXERCISES)
def test_solution_passes_visible_and_hidden(solution, hidden, check, name, capsys):
    getattr(checks, check)(solution[name])
    assert "all checks passed" in capsys.readouterr().out
    for _ in range(2):  # fresh seeds, shapes and blocks each time
        getattr(hidden, check)(solution[name])


# --- typical wrong answers, each with the words the visible check should say -----------------

def hbm_swapped(L, S, D, Dv, block_q):
    return tuple(reversed(flash.hbm_accesses(L, S, D, Dv, block_q)))


def hbm_twice(L, S, D, Dv, block_q):
    return L * D + S * D + 2 * L * S + S * Dv + L * Dv, flash.hbm_accesses(L, S, D, Dv, block_q)[1]


def hbm_floor(L, S, D, Dv, block_q):
    return flash.hbm_accesses(L, S, D, Dv)[0], L * D + L // block_q * S * (D + Dv) + L * Dv + L


def hbm_kv_once(L, S, D, Dv, block_q):
    return flash.hbm_accesses(L, S, D, Dv)[0], L * D + S * (D + Dv) + L * Dv + L


def hbm_no_lse(L, S, D, Dv, block_q):
    standard, tiled = flash.hbm_accesses(L, S, D, Dv, block_q)
    return standard, tiled - L


def _merge(rescale_l=True, rescale_acc=True, guard=True, inverted=False):
    def merge(m_a, l_a, acc_a, m_b, l_b, acc_b):
        m = torch.maximum(m_a, m_b)
        shift = torch.where(torch.isneginf(m), torch.zeros_like(m), m) if guard else m
        a, b = ((shift - m_a).exp(), (shift - m_b).exp()) if inverted else \
            ((m_a - shift).exp(), (m_b - shift).exp())
        l = a * l_a + b * l_b if rescale_l else l_a + l_b
        acc = a[..., None] * acc_a + b[..., None] * acc_b if rescale_acc else acc_a + acc_b
        return m, l, acc
    return merge


def _tiled(rescale_acc=True, ragged_q=True, ragged_k=True, use_scale=True, log_l=True,
           honour_scale=True, materialise=False):
    """The solution's loop with one mistake switched on."""
    def tiled(q, k, v, block_q=64, block_k=64, scale=None):
        if scale is None or not honour_scale:
            scale = 1 / math.sqrt(q.shape[-1]) if use_scale else 1.0
        if materialise:
            out, _ = scaled_dot_product_attention(q, k, v, scale=scale)
            return out, torch.logsumexp(q @ k.transpose(-2, -1) * scale, dim=-1)
        L, S = q.shape[-2], k.shape[-2]
        L_run = L if ragged_q else L // block_q * block_q
        S_run = S if ragged_k else S // block_k * block_k
        out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.zeros(q.shape[:-1], dtype=q.dtype, device=q.device)
        for i in range(0, L_run, block_q):
            q_i = q[..., i:i + block_q, :]
            m = torch.full(q_i.shape[:-1], -math.inf, dtype=q.dtype, device=q.device)
            l = torch.zeros_like(m)
            acc = torch.zeros(*q_i.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
            for j in range(0, S_run, block_k):
                s = q_i @ k[..., j:j + block_k, :].transpose(-2, -1) * scale
                m_new = torch.maximum(m, s.amax(-1))
                p = (s - m_new[..., None]).exp()
                alpha = (m - m_new).exp()
                l = alpha * l + p.sum(-1)
                acc = (alpha[..., None] * acc if rescale_acc else acc) + p @ v[..., j:j + block_k, :]
                m = m_new
            out[..., i:i + block_q, :] = acc / l[..., None]
            lse[..., i:i + block_q] = m + l.log() if log_l else m
        return out, lse
    return tiled


def _causal(top_left=False, skip=True, count_diagonal=False, guard=True, whole_mask=False):
    """Causal tiled attention with one mistake switched on."""
    def causal(q, k, v, block_q=64, block_k=64, scale=None):
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        L, S = q.shape[-2], k.shape[-2]
        offset = 0 if top_left else S - L
        full = torch.ones(L, S, dtype=torch.bool).tril(offset) if whole_mask else None
        out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
        lse = torch.full(q.shape[:-1], -math.inf, dtype=q.dtype)
        skipped = 0
        for i in range(0, L, block_q):
            i_end = min(i + block_q, L)
            q_i = q[..., i:i_end, :]
            m = torch.full(q_i.shape[:-1], -math.inf, dtype=q.dtype)
            l = torch.zeros_like(m)
            acc = torch.zeros(*q_i.shape[:-1], v.shape[-1], dtype=q.dtype)
            for j in range(0, S, block_k):
                j_end = min(j + block_k, S)
                hidden = j > offset + i_end - 1
                partly = j_end - 1 > offset + i
                if hidden or (count_diagonal and partly):
                    skipped += 1
                if hidden and skip:
                    continue
                s = q_i @ k[..., j:j_end, :].transpose(-2, -1) * scale
                if full is not None:
                    visible = full[i:i_end, j:j_end]
                else:
                    rows, cols = torch.arange(i, i_end)[:, None], torch.arange(j, j_end)[None, :]
                    visible = cols <= offset + rows
                s = s.masked_fill(~visible, -math.inf)
                m_new = torch.maximum(m, s.amax(-1))
                shift = torch.where(torch.isneginf(m_new), 0.0, m_new) if guard else m_new
                p = (s - shift[..., None]).exp()
                alpha = (m - shift).exp()
                l = alpha * l + p.sum(-1)
                acc = alpha[..., None] * acc + p @ v[..., j:j_end, :]
                m = m_new
            safe = torch.where(l > 0, l, 1.0) if guard else l
            out[..., i:i_end, :] = acc / safe[..., None]
            lse[..., i:i_end] = m + l.log()
        return out, lse, skipped
    return causal


def _backward(use_delta=True, scale_grads=True, tile_softmax=False, autograd=False):
    """The recomputation backward with one mistake switched on."""
    def backward(q, k, v, out, lse, dout, block_q=64, block_k=64, scale=None):
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        if autograd:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            return torch.autograd.grad(scaled_dot_product_attention(*leaves, scale=scale)[0],
                                       leaves, dout)
        L, S = q.shape[-2], k.shape[-2]
        delta = (dout * out).sum(-1) if use_delta else torch.zeros_like(lse)
        factor = scale if scale_grads else 1.0
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for j in range(0, S, block_k):
            k_j, v_j = k[..., j:j + block_k, :], v[..., j:j + block_k, :]
            for i in range(0, L, block_q):
                s = q[..., i:i + block_q, :] @ k_j.transpose(-2, -1) * scale
                p = (s - (torch.logsumexp(s, -1) if tile_softmax else lse[..., i:i + block_q])
                     [..., None]).exp()
                dv[..., j:j + block_k, :] += p.transpose(-2, -1) @ dout[..., i:i + block_q, :]
                ds = p * (dout[..., i:i + block_q, :] @ v_j.transpose(-2, -1)
                          - delta[..., i:i + block_q, None])
                dq[..., i:i + block_q, :] += ds @ k_j * factor
                dk[..., j:j + block_k, :] += ds.transpose(-2, -1) @ q[..., i:i + block_q, :] * factor
        return dq, dk, dv
    return backward


def _function(save_weights=False, causal_in_backward=True):
    class WrongFlash(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, causal=False):
            out, lse = flash.flash_attention_reference(q, k, v, causal)
            ctx.save_for_backward(q, k, v, out, lse)
            if save_weights:
                ctx.weights = (q @ k.transpose(-2, -1)).softmax(-1)
            ctx.causal = causal if causal_in_backward else False
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            return (*flash.flash_attention_backward(q, k, v, out, lse, dout, ctx.causal), None)
    return WrongFlash


WRONG = {
    "hbm_accesses": [(hbm_swapped, "swapped"), (hbm_twice, "four times"),
                     (hbm_floor, "math.ceil"), (hbm_kv_once, "once per query block"),
                     (hbm_no_lse, "logsumexp")],
    "merge_softmax_states": [
        (_merge(rescale_acc=False), "rescaled the sum but not the accumulator"),
        (_merge(rescale_l=False, rescale_acc=False), "plain sum l_a \\+ l_b"),
        (_merge(inverted=True), "rescale by"),
        (_merge(guard=False), "two empty states gave NaN")],
    "tiled_attention": [
        (_tiled(rescale_acc=False), "rescaled the sum but not the output"),
        (_tiled(ragged_q=False), "last query block is ragged"),
        (_tiled(ragged_k=False), "last key block is ragged"),
        (_tiled(use_scale=False), "unscaled attention"),
        (_tiled(log_l=False), "m \\+ log\\(l\\)"),
        (_tiled(honour_scale=False), "scale=0.3"),
        (_tiled(materialise=True), "as large as the \\(L, S\\)")],
    "causal_tiled_attention": [
        (_causal(top_left=True), "aligned top-left"),
        (_causal(skip=False), "test the tile before computing"),
        (_causal(count_diagonal=True), "counts the diagonal tiles"),
        (_causal(guard=False), "sees no key"),
        (_causal(whole_mask=True), "build each tile's own")],
    "tiled_attention_backward": [
        (_backward(use_delta=False), "delta"),
        (_backward(scale_grads=False), "off by the factor scale"),
        (_backward(tile_softmax=True), "not a softmax within the tile"),
        (_backward(autograd=True), "as large as the \\(L, S\\)")],
    "flash_function": [
        (_function(save_weights=True), "as large as the \\(L, S\\)"),
        (_function(causal_in_backward=False), "keep causal on ctx")],
}


@pytest.mark.parametrize("check, wrong, hint", [(check, wrong, hint) for check, cases in
                                                WRONG.items() for wrong, hint in cases])
def test_wrong_answers_fail_and_are_named(hidden, check, wrong, hint):
    with pytest.raises(CheckFailed, match=hint):
        getattr(checks, check)(wrong)
    expect_hidden_failure(lambda: getattr(hidden, check)(wrong))


def test_a_stub_says_not_done():
    def stub(*args, **kwargs):
        raise NotImplementedError()
    with pytest.raises(CheckFailed, match="not done yet"):
        checks.tiled_attention(stub)


# --- shortcuts: right numbers, but through the course's or PyTorch's attention ---------------

def _merge_through_helpers(m_a, l_a, acc_a, m_b, l_b, acc_b):
    def as_pair(m, l, acc):
        seen = l > 0
        return (acc / torch.where(seen, l, 1.0)[..., None],
                torch.where(seen, m + torch.where(seen, l, 1.0).log(), -math.inf))
    out, lse = flash.merge_attention(*as_pair(m_a, l_a, acc_a), *as_pair(m_b, l_b, acc_b))
    m = torch.maximum(m_a, m_b)
    shift = torch.where(torch.isneginf(m), 0.0, m)
    l = torch.where(torch.isneginf(lse), 0.0, (lse - shift).exp())
    return m, l, out * l[..., None]


def _causal_through_helpers(q, k, v, block_q=64, block_k=64, scale=None):
    out, lse = flash.flash_attention_forward(q, k, v, True, scale, block_q, block_k)
    return out, lse, flash.causal_block_counts(q.shape[-2], k.shape[-2], block_q, block_k).skipped


class _FunctionThroughHelpers(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal=False):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = flash.flash_attention(*leaves, causal=causal)
        ctx.save_for_backward(*leaves, out)
        return out.detach()

    @staticmethod
    def backward(ctx, dout):
        *leaves, out = ctx.saved_tensors
        return (*torch.autograd.grad(out, leaves, dout), None)


@pytest.mark.parametrize("check, shortcut", [
    ("hbm_accesses", flash.hbm_accesses),
    ("merge_softmax_states", _merge_through_helpers),
    ("tiled_attention", lambda q, k, v, block_q=64, block_k=64, scale=None:
        flash.flash_attention_forward(q, k, v, False, scale, block_q, block_k)),
    ("tiled_attention", lambda q, k, v, block_q=64, block_k=64, scale=None:
        flash.flash_attention_reference(q, k, v, False, scale, block_q, block_k)),
    ("causal_tiled_attention", _causal_through_helpers),
    ("tiled_attention_backward", lambda q, k, v, out, lse, dout, block_q=64, block_k=64,
        scale=None: flash.flash_attention_backward(q, k, v, out, lse, dout, False, scale,
                                                   block_q, block_k)),
    ("flash_function", _FunctionThroughHelpers),
])
def test_shortcuts_pass_visible_but_fail_hidden(hidden, check, shortcut):
    getattr(checks, check)(shortcut)  # the numbers are right...
    expect_hidden_failure(lambda: getattr(hidden, check)(shortcut), "ShortcutUsed")


class _OnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal=False):
        out, lse = flash.flash_attention_reference(q, k, v, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        return (*flash.flash_attention_backward(q, k, v, out, lse, dout, ctx.causal), None)


def test_a_once_differentiable_answer_is_not_a_shortcut(hidden):
    """helpers.flash.FlashAttention's backward is once_differentiable too: the tripwire must
    not take a student's once_differentiable backward for the course's class."""
    checks.flash_function(_OnceDifferentiable)
    hidden.flash_function(_OnceDifferentiable)


# --- a student cell that patched the kernel cannot change a hidden verdict --------------------

def test_hidden_verdicts_survive_a_patched_kernel(monkeypatch, solution):
    wrong = _tiled(rescale_acc=False)
    monkeypatch.setattr(torch, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(numpy, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.testing, "assert_close", lambda *args, **kwargs: None)
    monkeypatch.setattr(helpers.flash, "flash_attention_reference", wrong)
    monkeypatch.setattr(helpers.flash, "causal_block_counts", lambda *args: (0, 0))
    hidden = lesson("06")  # loaded after the patches, as the hidden test cell does
    expect_hidden_failure(lambda: hidden.tiled_attention(wrong))
    hidden.tiled_attention(solution["tiled_attention"])
    expect_hidden_failure(lambda: hidden.causal_tiled_attention(_causal(count_diagonal=True)))
    hidden.causal_tiled_attention(solution["causal_tiled_attention"])
    assert helpers.flash.flash_attention_reference is wrong  # still patched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_solution_runs_on_cuda(solution):
    q, k, v = (torch.randn(2, 3, n, 8, device="cuda") for n in (21, 37, 37))
    out, lse, skipped = solution["causal_tiled_attention"](q, k, v, block_q=8, block_k=8)
    assert out.device.type == "cuda" and lse.device.type == "cuda"
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(21, 37, dtype=torch.bool, device="cuda").tril(16))
    assert float((out - expected).abs().max()) < 1e-4
    assert skipped == flash.causal_block_counts(21, 37, 8, 8).skipped
