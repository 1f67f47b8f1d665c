"""Lesson 07's visible checks and hidden tests: they accept the reference solution, reject the
typical wrong answers (the visible check naming the mistake) and the shortcuts, and cannot
be fooled by a patched kernel."""

from __future__ import annotations

import math

import numpy
import pytest
import torch
import torch.nn.functional as F

import helpers.attention
from helpers import attention as ref
from helpers import rope as rope_ref
from helpers.checks import CheckFailed
from helpers.checks import lesson07 as checks
from helpers.hidden import lesson
from helpers.sliding_window import sliding_window_attention

from conftest import expect_hidden_failure

LESSON = "07"
EXERCISES = ["kv_cache_bytes", "repeat_kv", "grouped_query_attention", "mean_pool_kv",
             "apply_rope", "local_global_mask", "banded_attention"]


@pytest.mark.parametrize("name", EXERCISES)
def test_solution_passes_visible_and_hidden(solution, hidden, name, capsys):
    getattr(checks, name)(solution[name])
    assert "all checks passed" in capsys.readouterr().out
    for _ in range(3):  # fresh seeds, shapes and dtypes each time
        getattr(hidden, name)(solution[name])


# --- wrong answers: each is a mistake a student makes; (answer, words of the visible message) ---

def _cache(config, seq_len, batch=1, bytes_per_elem=2, *, factor=2, heads=None, window=True):
    held = seq_len if config.window is None or not window else min(seq_len, config.window)
    n_kv = config.n_kv_heads if heads is None else heads(config)
    return factor * config.n_layers * n_kv * config.head_dim * held * batch * bytes_per_elem


WRONG_CACHES = [
    (lambda c, n, batch=1, bytes_per_elem=2: _cache(c, n, batch, bytes_per_elem, factor=1),
     "keys \\*and\\* values"),
    (lambda c, n, batch=1, bytes_per_elem=2: _cache(c, n, batch, bytes_per_elem,
                                                    heads=lambda c: c.n_heads), "query heads"),
    (lambda c, n, batch=1, bytes_per_elem=2: _cache(c, n, batch, bytes_per_elem, window=False),
     "window is ignored"),
    (lambda c, n, batch=1, bytes_per_elem=2: _cache(c, n, 1, bytes_per_elem), "batch"),
    (lambda c, n, batch=1, bytes_per_elem=2: _cache(c, n, batch, bytes_per_elem) / 1,
     "should return an int"),
]


def repeat_interleaved(x, n_rep):
    return x.repeat(1, n_rep, 1, 1)


def repeat_with_view(x, n_rep):
    B, H_kv, S, D = x.shape
    return x[:, :, None].expand(B, H_kv, n_rep, S, D).view(B, H_kv * n_rep, S, D)


WRONG_REPEATS = [(repeat_interleaved, "interleaved"), (repeat_with_view, "not view")]


def gqa(q, k, v, mask=None, *, interleaved=False, scale=True, invert=False, use_mask=True):
    """GQA by arithmetic, with the usual mistakes as options."""
    B, H, L, D = q.shape
    H_kv = k.shape[1]
    G = H // H_kv
    index = torch.arange(H, device=q.device)
    index = index % H_kv if interleaved else index // G
    scores = q @ k[:, index].transpose(-2, -1) / (math.sqrt(D) if scale else 1.0)
    if mask is not None and use_mask:
        scores = scores.masked_fill(mask if invert else ~mask, float("-inf"))
    return ref.softmax(scores) @ v[:, index]


WRONG_GQAS = [
    (lambda q, k, v, mask=None: gqa(q, k, v, mask, interleaved=True), "interleaved"),
    (lambda q, k, v, mask=None: gqa(q, k, v, mask, scale=False), "√D"),
    (lambda q, k, v, mask=None: gqa(q, k, v, mask, invert=True), "inverted"),
    (lambda q, k, v, mask=None: gqa(q, k, v, mask, use_mask=False), "mask"),
]


def pool_interleaved(weight, n_heads, n_kv_heads):
    D = weight.shape[0] // n_heads
    G = n_heads // n_kv_heads
    return weight.reshape(G, n_kv_heads, D, *weight.shape[1:]).mean(0).reshape(
        n_kv_heads * D, *weight.shape[1:])


def pool_sum(weight, n_heads, n_kv_heads):
    D = weight.shape[0] // n_heads
    return weight.reshape(n_kv_heads, n_heads // n_kv_heads, D, *weight.shape[1:]).sum(1).reshape(
        n_kv_heads * D, *weight.shape[1:])


def pool_first_head(weight, n_heads, n_kv_heads):
    D = weight.shape[0] // n_heads
    return weight.reshape(n_kv_heads, n_heads // n_kv_heads, D, *weight.shape[1:])[:, 0].reshape(
        n_kv_heads * D, *weight.shape[1:])


WRONG_POOLS = [(pool_interleaved, "interleaved"), (pool_sum, "summed"),
               (pool_first_head, "group g = mean")]


def rope_with(x, positions, base=10000.0, *, pairs="halves", sign=1.0, step=2, shift=True,
              use_base=True):
    D = x.shape[-1]
    base = base if use_base else 10000.0
    positions = positions if shift else torch.arange(len(positions), device=x.device)
    theta = base ** (-torch.arange(0, D // 2, device=x.device).float() * step / D)
    angles = positions.float()[:, None] * theta[None, :]  # (L, D/2)
    cos, sin = angles.cos().to(x.dtype), sign * angles.sin().to(x.dtype)
    if pairs == "neighbours":
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


WRONG_ROPES = [
    (lambda x, p, base=10000.0: rope_with(x, p, base, pairs="neighbours"), "pairs split"),
    (lambda x, p, base=10000.0: rope_with(x, p, base, sign=-1.0), "wrong way"),
    (lambda x, p, base=10000.0: rope_with(x, p, base, step=1), "frequencies"),
    (lambda x, p, base=10000.0: rope_with(x, p, base, shift=False), "positions are ignored"),
    (lambda x, p, base=10000.0: rope_with(x, p, base, use_base=False), "base argument"),
]


def mask_with(L, window, n_global=0, device=None, *, low=1, causal=True, causal_global=True,
              use_global=True):
    if window < 1:
        raise ValueError("window")
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    glob = (j < n_global) if use_global else torch.zeros_like(j, dtype=torch.bool)
    band = (j > i - window - 1 + low) & (j <= i if causal else j < i + window)
    return (band | (glob & (j <= i))) if causal_global else ((band & (j <= i)) | glob)


WRONG_MASKS = [
    (lambda L, w, n=0, device=None: mask_with(L, w, n, device, low=0), "window \\+ 1 keys"),
    (lambda L, w, n=0, device=None: mask_with(L, w, n, device, low=2), "window - 1 keys"),
    (lambda L, w, n=0, device=None: mask_with(L, w, n, device, causal=False), "not causal"),
    (lambda L, w, n=0, device=None: mask_with(L, w, n, device, causal_global=False),
     "global token is visible to queries before it"),
    (lambda L, w, n=0, device=None: mask_with(L, w, n, device, use_global=False),
     "n_global is ignored"),
]


def banded_with(q, k, v, window, *, width=None, front_mask=True, scale=True):
    """The lesson's banded attention with a mistake switched on."""
    B, H, L, D = q.shape
    W = window
    seen = W if width is None else width  # how many keys each query sees
    nb = -(-L // W)
    back = nb * W - L
    span = W + seen - 1
    k_pad = F.pad(k, (0, 0, seen - 1, back)).unfold(2, span, W).transpose(-2, -1)
    v_pad = F.pad(v, (0, 0, seen - 1, back)).unfold(2, span, W).transpose(-2, -1)
    q_blocks = F.pad(q, (0, 0, 0, back)).reshape(B, H, nb, W, D)
    scores = q_blocks @ k_pad.transpose(-2, -1) / (math.sqrt(D) if scale else 1.0)
    r = torch.arange(W)[:, None]
    c = torch.arange(span)[None, :]
    allowed = (c >= r) & (c <= r + seen - 1)
    if front_mask:
        allowed = allowed & (torch.arange(nb)[:, None, None] * W + c >= seen - 1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (ref.softmax(scores) @ v_pad).reshape(B, H, nb * W, D)[:, :, :L]


def banded_full_scores(q, k, v, window):
    """Right numbers, wrong cost: the whole (L, L) matrix, masked."""
    L = q.shape[-2]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return ref.softmax(scores.masked_fill(~((j <= i) & (j > i - window)), float("-inf"))) @ v


def banded_multiples_only(q, k, v, window):
    """Pads nothing at the end: wrong (or crashes) when L is not a multiple of the window."""
    L = q.shape[-2]
    whole = L - L % window
    out = banded_with(q[:, :, :whole], k[:, :, :whole], v[:, :, :whole], window)
    return torch.cat([out, v[:, :, whole:]], dim=2)


WRONG_BANDS = [
    (lambda q, k, v, w: banded_with(q, k, v, w, width=w + 1), "window \\+ 1 keys"),
    (lambda q, k, v, w: banded_with(q, k, v, w, front_mask=False), "padding"),
    (lambda q, k, v, w: banded_with(q, k, v, w, scale=False), "√D"),
    (banded_full_scores, "\\(L, L\\)"),
    (banded_multiples_only, "last block"),
]

WRONG = {"kv_cache_bytes": WRONG_CACHES, "repeat_kv": WRONG_REPEATS,
         "grouped_query_attention": WRONG_GQAS, "mean_pool_kv": WRONG_POOLS,
         "apply_rope": WRONG_ROPES, "local_global_mask": WRONG_MASKS,
         "banded_attention": WRONG_BANDS}
CASES = [(name, i) for name, answers in WRONG.items() for i in range(len(answers))]


@pytest.mark.parametrize("name, i", CASES, ids=[f"{name}-{i}" for name, i in CASES])
def test_wrong_answers_fail_visible_with_the_mistake_named_and_hidden(hidden, name, i):
    wrong, words = WRONG[name][i]
    with pytest.raises(CheckFailed, match=words):
        getattr(checks, name)(wrong)
    if name == "repeat_kv" and wrong is repeat_with_view:
        return  # view on an expanded tensor raises in the hidden test too, as an error
    for _ in range(3):
        expect_hidden_failure(lambda: getattr(hidden, name)(wrong))


def test_repeat_with_view_fails_hidden(hidden):
    with pytest.raises(RuntimeError, match="view"):
        hidden.repeat_kv(repeat_with_view)


# --- shortcuts: right numbers, but they call what the exercise asks to write ---

def _cache_shortcut(config, seq_len, batch=1, bytes_per_elem=2):
    from helpers.kv_cache import kv_cache_bytes
    held = seq_len if config.window is None else min(seq_len, config.window)
    return kv_cache_bytes(config.n_layers, config.n_kv_heads, config.head_dim, held, batch,
                          bytes_per_elem)


def _gqa_by_copies(q, k, v, mask=None):
    group = q.shape[1] // k.shape[1]
    return gqa(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), mask)


def _gqa_by_sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).nan_to_num(0.0)


SHORTCUTS = [
    ("kv_cache_bytes", _cache_shortcut),
    ("repeat_kv", lambda x, n_rep: x.repeat_interleave(n_rep, dim=1)),
    ("repeat_kv", ref.repeat_kv),
    ("grouped_query_attention", _gqa_by_copies),
    ("grouped_query_attention", _gqa_by_sdpa),
    ("grouped_query_attention",
     lambda q, k, v, mask=None: gqa(q, ref.repeat_kv(k, q.shape[1] // k.shape[1]), ref.repeat_kv(
         v, q.shape[1] // k.shape[1]), mask)),
    ("mean_pool_kv", ref.mean_pool_heads),
    ("apply_rope", lambda x, p, base=10000.0: rope_ref.rope(x, p, base)),
    ("local_global_mask", lambda L, w, n=0, device=None: ref.sliding_window_mask(
        L, w, device, n_global=n)),
    ("banded_attention", lambda q, k, v, w: sliding_window_attention(q, k, v, w)),
]


@pytest.mark.parametrize("name, shortcut", SHORTCUTS)
def test_shortcuts_fail_visible_and_hidden(hidden, name, shortcut):
    with pytest.raises(CheckFailed, match="calls"):
        getattr(checks, name)(shortcut)
    expect_hidden_failure(lambda: getattr(hidden, name)(shortcut), "ShortcutUsed")


# --- a student cell that patched the kernel cannot change a hidden verdict ---

def test_hidden_verdicts_survive_a_patched_kernel(monkeypatch, solution):
    wrong_mask = WRONG_MASKS[0][0]
    monkeypatch.setattr(torch, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(numpy, "allclose", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.testing, "assert_close", lambda *args, **kwargs: None)
    monkeypatch.setattr(helpers.attention, "sliding_window_mask", wrong_mask)
    monkeypatch.setattr(helpers.attention, "scaled_dot_product_attention",
                        lambda q, k, v, mask=None, scale=None: (v, v))
    hidden = lesson("07")  # loaded after the patches, as the hidden test cell does
    expect_hidden_failure(lambda: hidden.local_global_mask(wrong_mask))
    expect_hidden_failure(lambda: hidden.banded_attention(WRONG_BANDS[0][0]))
    hidden.local_global_mask(solution["local_global_mask"])
    hidden.banded_attention(solution["banded_attention"])
    hidden.grouped_query_attention(solution["grouped_query_attention"])


def test_untouched_exercises_report_not_done():
    def stub(*args, **kwargs):
        raise NotImplementedError()

    for name in EXERCISES:
        with pytest.raises(CheckFailed, match="not done yet"):
            getattr(checks, name)(stub)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_solution_runs_on_cuda(solution):
    q, k, v = (torch.randn(1, 4, 40, 8, device="cuda") for _ in range(3))
    out = solution["banded_attention"](q, k, v, 5)
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=ref.sliding_window_mask(40, 5, device="cuda"))
    assert out.device.type == "cuda"
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    gqa_out = solution["grouped_query_attention"](q, k[:, :2], v[:, :2])
    torch.testing.assert_close(gqa_out, F.scaled_dot_product_attention(
        q, k[:, :2], v[:, :2], enable_gqa=True), atol=1e-5, rtol=1e-5)
