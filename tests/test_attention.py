"""helpers.attention against oracles nobody here wrote: PyTorch's fused
``scaled_dot_product_attention``, ``torch.softmax`` and ``nn.MultiheadAttention``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.attention import (
    MultiHeadAttention,
    causal_mask,
    merge_heads,
    padding_mask,
    scaled_dot_product_attention,
    sliding_window_mask,
    softmax,
    split_heads,
)

# (B, H, L, S, D, Dv): square, rectangular (decode-like and encoder-like), odd sizes.
SHAPES = [(2, 3, 5, 5, 8, 8), (1, 4, 1, 9, 16, 4), (3, 2, 7, 4, 5, 6), (2, 1, 12, 12, 3, 3)]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2,
             torch.float16: 5e-3}


def qkv(shape, dtype=torch.float32, seed=0, device="cpu"):
    B, H, L, S, D, Dv = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, S, Dv, generator=g, dtype=torch.float64)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def explicit_causal(L: int, S: int) -> torch.Tensor:
    """Bottom-right causal mask written out by hand: query i sees keys 0 .. S - L + i."""
    return torch.tensor([[j <= S - L + i for j in range(S)] for i in range(L)])


def assert_close(actual, expected, tol):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol)


# softmax ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [-1, 0, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_softmax_matches_torch(dim, seed):
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(seed)) * 10
    assert_close(softmax(x, dim=dim), torch.softmax(x, dim=dim), 1e-6)


def test_softmax_large_logits_and_minus_inf_rows():
    x = torch.tensor([[1e4, -1e4, 3e4], [float("-inf")] * 3, [float("-inf"), 0.0, 2.0]])
    out = softmax(x)
    assert torch.isfinite(out).all()
    assert_close(out[[0, 2]], torch.softmax(x[[0, 2]], dim=-1), 1e-7)
    assert (out[1] == 0).all()


# scaled_dot_product_attention -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_sdpa_matches_torch(shape, dtype, seed):
    q, k, v = qkv(shape, dtype, seed)
    out, weights = scaled_dot_product_attention(q, k, v)
    assert out.dtype == dtype and weights.dtype == dtype
    assert out.shape == shape[:3] + (shape[5],) and weights.shape == shape[:4]
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert_close(out, expected, TOLERANCE[dtype])
    assert_close(weights.sum(-1), torch.ones(shape[:3]), TOLERANCE[dtype])


def test_sdpa_any_leading_dims():
    q, k, v = torch.randn(2, 3, 4, 5, 8), torch.randn(2, 3, 4, 6, 8), torch.randn(2, 3, 4, 6, 2)
    out, _ = scaled_dot_product_attention(q, k, v)
    assert_close(out, F.scaled_dot_product_attention(q, k, v), 1e-5)
    out2d, _ = scaled_dot_product_attention(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0])
    assert_close(out2d, out[0, 0, 0], 1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sdpa_random_boolean_mask(shape, seed):
    q, k, v = qkv(shape, torch.float64, seed)
    B, H, L, S = shape[:4]
    mask = torch.rand(B, 1, L, S, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[..., 0] = True  # every row sees something, so PyTorch gives no NaN to compare
    out, weights = scaled_dot_product_attention(q, k, v, mask=mask)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), 1e-10)
    assert (weights.masked_select(~mask.expand_as(weights)) == 0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_sdpa_float_mask_is_added(shape):
    q, k, v = qkv(shape, torch.float64, 3)
    bias = torch.randn(shape[2], shape[3], dtype=torch.float64)
    out, _ = scaled_dot_product_attention(q, k, v, mask=bias)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), 1e-10)


@pytest.mark.parametrize("L,S", [(6, 6), (1, 7), (3, 8), (5, 5)])
def test_causal_mask_bottom_right(L, S):
    mask = causal_mask(L, S)
    assert mask.dtype == torch.bool and torch.equal(mask, explicit_causal(L, S))
    q, k, v = qkv((2, 2, L, S, 4, 4), torch.float64)
    out, _ = scaled_dot_product_attention(q, k, v, mask=mask)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=explicit_causal(L, S)),
                 1e-10)
    if L == S:
        assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), 1e-10)


def test_causal_mask_default_square():
    assert torch.equal(causal_mask(4), explicit_causal(4, 4))


def test_padding_mask_against_explicit_loop():
    lengths, S = torch.tensor([3, 5, 1]), 5
    mask = padding_mask(lengths, S)
    expected = torch.tensor([[j < n for j in range(S)] for n in lengths.tolist()])
    assert mask.shape == (3, 1, 1, S) and torch.equal(mask[:, 0, 0], expected)
    q, k, v = qkv((3, 2, 4, S, 8, 8), torch.float64)
    out, _ = scaled_dot_product_attention(q, k, v, mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=expected[:, None, None, :])
    assert_close(out, ref, 1e-10)


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = qkv((2, 2, 4, 6, 8, 8), torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1] = False
    out, weights = scaled_dot_product_attention(q, k, v, mask=mask)
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    assert (out[..., 1, :] == 0).all() and (weights[..., 1, :] == 0).all()
    keep = [0, 2, 3]
    ref = F.scaled_dot_product_attention(q[..., keep, :], k, v)
    assert_close(out[..., keep, :], ref, 1e-10)


@pytest.mark.parametrize("scale", [0.01, 1.0, 3.0])
def test_custom_scale(scale):
    q, k, v = qkv((2, 3, 5, 7, 8, 8), torch.float64, 4)
    out, _ = scaled_dot_product_attention(q, k, v, scale=scale)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=scale), 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_logits_do_not_overflow(dtype):
    """Scores near 1e8 overflow float16: low precision must be computed in float32."""
    q, k, v = qkv((2, 2, 5, 5, 8, 8), torch.float64, 5)
    q, k = q * 1e3, k * 1e2  # logits near 1e5: exp overflows unless the max is subtracted
    out, weights = scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    ref = F.scaled_dot_product_attention(q.to(dtype).double(), k.to(dtype).double(),
                                         v.to(dtype).double())
    assert_close(out, ref, TOLERANCE[dtype])


@pytest.mark.parametrize("with_mask", [False, True])
def test_gradcheck(with_mask):
    q, k, v = (t.requires_grad_() for t in qkv((1, 2, 3, 4, 3, 2), torch.float64, 6))
    mask = None
    if with_mask:
        mask = causal_mask(3, 4)
        mask[0] = False  # a fully masked row must not poison the gradients either
    assert torch.autograd.gradcheck(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, mask=mask)[0], (q, k, v))


def test_shape_errors_name_the_expected_shape():
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., S, D\)"):
        scaled_dot_product_attention(q, torch.randn(1, 1, 5, 3), v)
    with pytest.raises(ValueError, match=r"share S"):
        scaled_dot_product_attention(q, k, torch.randn(1, 1, 4, 2))
    with pytest.raises(ValueError, match=r"\(\.\.\., L, S\)"):
        scaled_dot_product_attention(q, k, v, mask=torch.ones(3, 4, dtype=torch.bool))


# masks and heads -------------------------------------------------------------------------

@pytest.mark.parametrize("L,window", [(6, 1), (7, 3), (5, 5), (4, 9)])
def test_sliding_window_mask_against_loop(L, window):
    expected = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(max(0, i - window + 1), i + 1):
            expected[i, j] = True
    assert torch.equal(sliding_window_mask(L, window), expected)


def test_sliding_window_rejects_empty_window():
    with pytest.raises(ValueError, match="window"):
        sliding_window_mask(4, 0)


def test_split_and_merge_heads():
    x = torch.randn(2, 5, 12)
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 4)
    assert torch.equal(heads[:, 1], x[..., 4:8])
    assert torch.equal(merge_heads(heads), x)
    assert torch.equal(split_heads(x.transpose(0, 1).contiguous().transpose(0, 1), 3), heads)
    with pytest.raises(ValueError, match=r"\(B, L, H\*D\) with H\*D divisible by n_heads=5"):
        split_heads(x, 5)
    with pytest.raises(ValueError, match=r"\(B, H, L, D\)"):
        merge_heads(x)


# MultiHeadAttention ----------------------------------------------------------------------

def torch_mha(d_model=16, n_heads=4, bias=True, batch_first=True, seed=0):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(d_model, n_heads, bias=bias, batch_first=batch_first).double()
    for p in mha.parameters():  # PyTorch zeroes its biases at init; make them matter
        nn.init.normal_(p, std=0.3)
    return mha.eval()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_from_torch_matches_nn_multihead_attention(bias, batch_first):
    theirs = torch_mha(bias=bias, batch_first=batch_first)
    ours = MultiHeadAttention.from_torch(theirs)
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    x_theirs = x if batch_first else x.transpose(0, 1)
    ref, ref_w = theirs(x_theirs, x_theirs, x_theirs, average_attn_weights=False)
    ref = ref if batch_first else ref.transpose(0, 1)
    out, weights = ours(x, need_weights=True)
    assert_close(out, ref, 1e-10)
    assert_close(weights, ref_w, 1e-10)
    assert_close(ours(x), ref, 1e-10)


def test_from_torch_with_padding_and_causal_masks():
    theirs = torch_mha(seed=1)
    ours = MultiHeadAttention.from_torch(theirs)
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    lengths = torch.tensor([6, 4, 2])
    # nn.MultiheadAttention masks mean "ignore" where ours mean "attend".
    ref, _ = theirs(x, x, x, key_padding_mask=~padding_mask(lengths, 6)[:, 0, 0],
                    attn_mask=~causal_mask(6))
    mask = padding_mask(lengths, 6) & causal_mask(6)
    assert_close(ours(x, mask=mask), ref, 1e-10)
    assert_close(ours(x, mask=mask, need_weights=True)[0], ref, 1e-10)


def test_cross_attention_matches_nn_multihead_attention():
    theirs = torch_mha(seed=2)
    ours = MultiHeadAttention.from_torch(theirs)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    context = torch.randn(2, 7, 16, dtype=torch.float64)
    ref, ref_w = theirs(x, context, context, average_attn_weights=False)
    out, weights = ours(x, context=context, need_weights=True)
    assert weights.shape == (2, 4, 3, 7)
    assert_close(out, ref, 1e-10)
    assert_close(weights, ref_w, 1e-10)


def test_from_torch_rejects_unsupported_options():
    with pytest.raises(ValueError, match="kdim"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1), (6, 3)])
def test_gqa_matches_sdpa_enable_gqa(n_heads, n_kv_heads):
    torch.manual_seed(n_heads + n_kv_heads)
    d_model = 24
    mha = MultiHeadAttention(d_model, n_heads, n_kv_heads).double()
    head_dim = d_model // n_heads
    assert mha.k_proj.out_features == n_kv_heads * head_dim
    x = torch.randn(2, 5, d_model, dtype=torch.float64)
    mask = causal_mask(5)

    def heads(t, n):  # (B, L, n*D) -> (B, n, L, D), written independently of split_heads
        return t.reshape(2, 5, n, head_dim).permute(0, 2, 1, 3)

    ref = F.scaled_dot_product_attention(
        heads(mha.q_proj(x), n_heads), heads(mha.k_proj(x), n_kv_heads),
        heads(mha.v_proj(x), n_kv_heads), attn_mask=mask, enable_gqa=True)
    ref = mha.out_proj(ref.permute(0, 2, 1, 3).reshape(2, 5, d_model))
    assert_close(mha(x, mask=mask), ref, 1e-10)
    assert_close(mha(x, mask=mask, need_weights=True)[0], ref, 1e-10)


def test_fast_and_readable_paths_agree_with_fully_masked_rows():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, 2).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 5) > 0.5
    mask[0, 0, 2] = False  # a query that may see nothing
    grads = []
    for need_weights in (False, True):
        mha.zero_grad()
        out = mha(x, mask=mask, need_weights=need_weights)
        out = out[0] if need_weights else out
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in mha.parameters()]))
    (fast, fast_grads), (readable, readable_grads) = grads
    assert torch.isfinite(fast).all()
    assert_close(fast, readable, 1e-10)
    for a, b in zip(fast_grads, readable_grads):
        assert torch.isfinite(a).all()
        assert_close(a, b, 1e-10)


def test_fast_path_with_float_mask():
    torch.manual_seed(1)
    mha = MultiHeadAttention(8, 2).double()
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    bias = torch.randn(4, 4, dtype=torch.float64)
    bias[3] = float("-inf")
    fast = mha(x, mask=bias)
    assert torch.isfinite(fast).all()
    assert_close(fast, mha(x, mask=bias, need_weights=True)[0], 1e-10)


def test_mha_errors_name_the_expected_shape():
    mha = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"\(B, L, d_model=8\)"):
        mha(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"\(B, H, L, S\) = \(2, 2, 3, 3\)"):
        mha(torch.randn(2, 3, 8), mask=torch.ones(2, 1, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        MultiHeadAttention(8, 2, 3)


# CUDA ------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    shape = (2, 4, 33, 65, 16, 16)
    q, k, v = qkv(shape, torch.float32, 7)
    mask = causal_mask(33, 65) & (torch.rand(2, 1, 33, 65) > 0.3)
    ref, ref_w = scaled_dot_product_attention(q, k, v, mask=mask)
    out, weights = scaled_dot_product_attention(q.cuda().to(dtype), k.cuda().to(dtype),
                                                v.cuda().to(dtype), mask=mask.cuda())
    assert out.device.type == "cuda" and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert_close(out.cpu(), ref, tol)
    assert_close(weights.cpu(), ref_w, tol)

    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4, 2)
    x = torch.randn(2, 9, 32)
    pad = padding_mask(torch.tensor([9, 5]), 9)
    expected = mha(x, mask=pad, need_weights=True)[0]
    mha_cuda = mha.cuda().to(dtype)
    for need_weights in (False, True):
        got = mha_cuda(x.cuda().to(dtype), mask=pad.cuda(), need_weights=need_weights)
        got = got[0] if need_weights else got
        assert_close(got.float().cpu(), expected, tol)
