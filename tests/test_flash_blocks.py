"""The block pieces of FlashAttention and ring attention against PyTorch: any split of the
keys into blocks, merged in any order, gives SDPA's output and logsumexp, and the blockwise
backward gives autograd's gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers.flash import block_attention, block_attention_backward, merge_attention


def inputs(seed: int, L: int = 7, S: int = 11, D: int = 5, Dv: int = 3):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, d, generator=g, dtype=torch.float64)
               for n, d in ((L, D), (S, D), (S, Dv)))
    mask = torch.rand(L, S, generator=g) < 0.6
    mask[0] = False  # a query that sees nothing at all
    return q, k, v, mask


@pytest.mark.parametrize("cuts", [(11,), (4, 7), (1, 5, 5), (3, 3, 3, 2)])
@pytest.mark.parametrize("reverse", [False, True])
def test_blocks_merged_in_any_order_equal_full_attention(cuts, reverse):
    q, k, v, mask = inputs(0)
    scale = 1 / math.sqrt(q.shape[-1])
    bounds = torch.tensor((0,) + cuts).cumsum(0).tolist()
    blocks = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype)
    for block in (blocks[::-1] if reverse else blocks):
        out, lse = merge_attention(out, lse, *block_attention(q, k[..., block, :], v[..., block, :],
                                                              scale, mask[:, block]))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1))
    assert bool((out[..., 0, :] == 0).all()) and bool(torch.isneginf(lse[..., 0]).all())


def test_blockwise_backward_equals_autograd():
    q, k, v, mask = inputs(1)
    mask[0, 0] = True  # autograd through SDPA needs every row to see a key
    scale = 0.3
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    dout = torch.randn_like(out)
    out.backward(dout)
    lse = block_attention(q.detach(), k.detach(), v.detach(), scale, mask)[1]
    delta = (dout * out.detach()).sum(-1)
    dq = torch.zeros_like(q)
    for block in (slice(0, 4), slice(4, 11)):
        dq_b, dk_b, dv_b = block_attention_backward(q.detach(), k.detach()[..., block, :],
                                                    v.detach()[..., block, :], dout, lse, delta,
                                                    scale, mask[:, block])
        dq += dq_b
        torch.testing.assert_close(dk_b, k.grad[..., block, :])
        torch.testing.assert_close(dv_b, v.grad[..., block, :])
    torch.testing.assert_close(dq, q.grad)
