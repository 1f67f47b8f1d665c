"""Fully masked query rows: the course gives zeros and zero gradients on every path, and
PyTorch's own attention behaves as ``helpers.attention``'s docstring says it does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.attention import MultiHeadAttention, _fused_attention, _sdpa_zeroes_masked_rows


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 4, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(2, 3, 6, 4, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(2, 3, 6, 4, generator=g, dtype=dtype).requires_grad_()
    mask = torch.rand(2, 1, 5, 6, generator=g) > 0.4
    mask[..., 0] |= True
    mask[0, 0, 2] = False  # query 2 of the first sequence may see nothing
    mask[1, 0, 4] = False  # and query 4 of the second
    return q, k, v, mask


def _explicit(q, k, v, mask):
    """Attention written out with torch.softmax on the rows that see a key, zeros elsewhere."""
    scores = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).masked_fill(~mask, -1e300)
    weights = torch.softmax(scores, dim=-1) * mask.any(dim=-1, keepdim=True)
    return weights @ v


@pytest.mark.parametrize("guard", [True, False])
@pytest.mark.parametrize("float_mask", [False, True])
def test_both_paths_of_the_fused_attention_zero_masked_rows(guard, float_mask):
    q, k, v, mask = _inputs()
    expected = _explicit(q, k, v, mask.expand(2, 3, 5, 6))
    attn_mask = mask
    if float_mask:
        attn_mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    out = _fused_attention(q, k, v, attn_mask, guard=guard)
    torch.testing.assert_close(out, expected)
    assert bool((out[0, :, 2] == 0).all() and (out[1, :, 4] == 0).all())
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected.square().sum().backward()
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)
    assert bool((grads[0][0, :, 2] == 0).all())


def test_guard_is_kept_where_pytorch_may_return_nan():
    assert _sdpa_zeroes_masked_rows("cpu", "2.5.0")
    assert _sdpa_zeroes_masked_rows("cpu", "2.13.0+cpu")
    assert not _sdpa_zeroes_masked_rows("cpu", "2.4.1")
    assert not _sdpa_zeroes_masked_rows("cpu", "2.2.0")
    assert not _sdpa_zeroes_masked_rows("cuda", "2.13.0")


@pytest.mark.skipif(not _sdpa_zeroes_masked_rows("cpu"), reason="torch < 2.5 returns NaN here")
def test_pytorch_sdpa_zeroes_masked_rows_on_this_cpu():
    """What the docstring claims for torch >= 2.5, measured on PyTorch's default and math
    kernels: zeros and zero gradients for a query that may see nothing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend in (None, SDPBackend.MATH):
        q, k, v, mask = _inputs(torch.float32)
        if backend is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.sum().backward()
        assert bool((out[0, :, 2] == 0).all()) and bool((q.grad[0, :, 2] == 0).all())
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_torch_softmax_and_nn_multihead_attention_still_give_nan():
    assert torch.softmax(torch.full((4,), float("-inf")), dim=-1).isnan().all()
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    every_key_ignored = torch.tensor([[False, False, True], [True, True, True]])
    out = theirs(x, x, x, key_padding_mask=every_key_ignored)[0]
    assert out[1].isnan().all() and torch.isfinite(out[0]).all()
    ours = MultiHeadAttention.from_torch(theirs)
    mine = ours(x, mask=~every_key_ignored[:, None, None, :])
    assert bool((mine[1] == ours.out_proj.bias).all())  # zeros through W^O leave the bias
    torch.testing.assert_close(mine[0], out[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_guarded_path_on_cuda_gives_zeros():
    q, k, v, mask = (t.detach().cuda().float() for t in _inputs())
    out = _fused_attention(q, k, v, mask)
    assert torch.isfinite(out).all() and bool((out[0, :, 2] == 0).all())
    reference = _explicit(q.double(), k.double(), v.double(), mask.expand(2, 3, 5, 6))
    torch.testing.assert_close(out.double(), reference, atol=1e-4, rtol=1e-4)
