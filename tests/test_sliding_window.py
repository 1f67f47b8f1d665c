"""Sliding windows: the mask with global tokens against a mask written out by hand, and the
banded O(n·W) computation against PyTorch's SDPA given that mask, values and gradients;
the banded one never builds an (L, S) tensor."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers.attention import sliding_window_mask
from helpers.hidden._core import record_shapes
from helpers.sliding_window import sliding_window_attention


def loop_mask(L: int, S: int, window: int, n_global: int) -> torch.Tensor:
    """Query i (position p = S - L + i) sees key j when p - window < j <= p, or j < n_global
    and j <= p: written out one entry at a time."""
    mask = torch.zeros(L, S, dtype=torch.bool)
    for i in range(L):
        p = S - L + i
        for j in range(S):
            mask[i, j] = j <= p and (j > p - window or j < n_global)
    return mask


@pytest.mark.parametrize("L, S, window, n_global", [
    (6, 6, 1, 0), (7, 7, 3, 0), (5, 5, 5, 2), (4, 4, 9, 0), (3, 10, 4, 0), (1, 12, 5, 3),
    (9, 9, 2, 4), (8, 13, 3, 20)])
def test_mask_against_loop(L, S, window, n_global):
    expected = loop_mask(L, S, window, n_global)
    assert torch.equal(sliding_window_mask(L, window, S=S, n_global=n_global), expected)
    if S == L and n_global == 0:  # the lesson-04 call still works
        assert torch.equal(sliding_window_mask(L, window), expected)


def test_mask_errors():
    with pytest.raises(ValueError, match="S=3 keys cannot be fewer than the L=4"):
        sliding_window_mask(4, 2, S=3)
    with pytest.raises(ValueError, match="n_global"):
        sliding_window_mask(4, 2, n_global=-1)


SHAPES = [  # B, H, L, S, D, Dv, window, n_global, block_size
    (2, 3, 10, 10, 4, 4, 3, 0, None), (1, 2, 7, 13, 5, 6, 4, 2, None),
    (2, 1, 1, 9, 4, 3, 3, 1, None), (1, 1, 16, 16, 8, 8, 20, 0, None),
    (1, 2, 17, 17, 3, 3, 4, 3, 5), (1, 1, 5, 30, 2, 2, 1, 0, None),
    (2, 2, 33, 40, 6, 5, 8, 5, 3), (1, 2, 64, 64, 8, 8, 16, 1, 32)]


@pytest.mark.parametrize("B, H, L, S, D, Dv, window, n_global, block", SHAPES)
def test_banded_equals_sdpa_with_the_mask(B, H, L, S, D, Dv, window, n_global, block):
    g = torch.Generator().manual_seed(L * S + window)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, S, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    mask = loop_mask(L, S, window, n_global)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    got = sliding_window_attention(q, k, v, window, n_global=n_global, scale=0.3,
                                   block_size=block)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    upstream = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(got, (q, k, v), upstream)
    expected_grads = torch.autograd.grad(expected, (q, k, v), upstream)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)


def test_banded_never_builds_the_full_score_matrix():
    L, W, H = 2048, 32, 2
    q, k, v = torch.randn(3, 1, H, L, 16)
    with record_shapes() as shapes:
        sliding_window_attention(q, k, v, W, n_global=4)
    largest = max(math.prod(shape) for shape in shapes)
    assert largest < H * L * 2 * W * 16  # O(L·W·D), far below L² = 4M per head
    assert not [shape for shape in shapes if sum(size >= L for size in shape) >= 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_agrees_with_float64(dtype):
    q, k, v = torch.randn(3, 2, 4, 50, 16, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=loop_mask(50, 50, 7, 2))
    got = sliding_window_attention(q.to(dtype), k.to(dtype), v.to(dtype), 7, n_global=2)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)


def test_errors_name_the_shapes():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="window must be at least 1"):
        sliding_window_attention(q, q, q, 0)
    with pytest.raises(ValueError, match=r"L=5 queries need at least as many keys, got S=3"):
        sliding_window_attention(q, q[:, :, :3], q[:, :, :3], 2)
    with pytest.raises(ValueError, match=r"\(B, H, L, D\)"):
        sliding_window_attention(q[0], q, q, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_banded_on_cuda():
    q, k, v = torch.randn(3, 2, 4, 300, 32)
    expected = sliding_window_attention(q, k, v, 64, n_global=4)
    got = sliding_window_attention(q.cuda(), k.cuda(), v.cuda(), 64, n_global=4)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
