"""Grouped-query attention pieces of helpers.attention: repeat_kv against repeat_interleave,
a head_dim that is not d_model / n_heads against PyTorch's SDPA with ``enable_gqa``, and the
mean-pooling that turns multi-head K/V projections into grouped ones (Ainslie et al., 2023)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.attention import MultiHeadAttention, causal_mask, mean_pool_heads, repeat_kv


@pytest.mark.parametrize("n_rep", [1, 2, 3])
def test_repeat_kv_is_blocked_like_repeat_interleave(n_rep):
    x = torch.randn(2, 4, 5, 3)
    assert torch.equal(repeat_kv(x, n_rep), x.repeat_interleave(n_rep, dim=1))
    with pytest.raises(ValueError, match=r"\(B, H_kv, S, D\)"):
        repeat_kv(x[0], n_rep)


@pytest.mark.parametrize("n_heads, n_kv_heads, head_dim", [(4, 2, 12), (4, 1, 5), (2, 2, 16)])
def test_mha_with_its_own_head_dim_matches_sdpa_enable_gqa(n_heads, n_kv_heads, head_dim):
    torch.manual_seed(head_dim)
    d_model, B, L = 24, 2, 6
    mha = MultiHeadAttention(d_model, n_heads, n_kv_heads, head_dim=head_dim).double()
    assert mha.q_proj.out_features == n_heads * head_dim
    assert mha.out_proj.in_features == n_heads * head_dim
    x = torch.randn(B, L, d_model, dtype=torch.float64)

    def heads(t, n):  # (B, L, n*D) -> (B, n, L, D), written independently of split_heads
        return t.reshape(B, L, n, head_dim).permute(0, 2, 1, 3)

    out = F.scaled_dot_product_attention(
        heads(mha.q_proj(x), n_heads), heads(mha.k_proj(x), n_kv_heads),
        heads(mha.v_proj(x), n_kv_heads), attn_mask=causal_mask(L), enable_gqa=True)
    expected = mha.out_proj(out.permute(0, 2, 1, 3).reshape(B, L, n_heads * head_dim))
    for need_weights in (False, True):
        got = mha(x, mask=causal_mask(L), need_weights=need_weights)
        got = got[0] if need_weights else got
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_head_dim_lifts_the_divisibility_rule():
    assert MultiHeadAttention(10, 4, head_dim=3).head_dim == 3
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=4"):
        MultiHeadAttention(10, 4)


def test_mean_pool_heads_averages_each_block_of_heads():
    n_heads, n_kv_heads, D, d_model = 6, 2, 3, 5
    weight = torch.randn(n_heads * D, d_model)
    pooled = mean_pool_heads(weight, n_heads, n_kv_heads)
    heads = [weight[h * D:(h + 1) * D] for h in range(n_heads)]
    expected = torch.cat([sum(heads[:3]) / 3, sum(heads[3:]) / 3])
    torch.testing.assert_close(pooled, expected)
    bias = torch.randn(n_heads * D)
    assert mean_pool_heads(bias, n_heads, n_kv_heads).shape == (n_kv_heads * D,)
    assert torch.equal(mean_pool_heads(weight, n_heads, n_heads), weight)


def test_mean_pooled_mqa_equals_attention_with_the_mean_key_and_value():
    """Pooling into one K/V head gives every query head the same keys and values: the mean of
    the original heads' ones (a pooled projection is the mean projection)."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).double()
    mqa = MultiHeadAttention(16, 4, n_kv_heads=1).double()
    with torch.no_grad():
        for name in ("q_proj", "out_proj"):
            getattr(mqa, name).load_state_dict(getattr(mha, name).state_dict())
        for name in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                getattr(getattr(mqa, name), kind).copy_(
                    mean_pool_heads(getattr(getattr(mha, name), kind), 4, 1))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    k_mean = mha.k_proj(x).reshape(2, 5, 4, 4).mean(dim=2)  # (B, L, D): mean over heads
    v_mean = mha.v_proj(x).reshape(2, 5, 4, 4).mean(dim=2)
    q = mha.q_proj(x).reshape(2, 5, 4, 4).transpose(1, 2)  # (B, H, L, D)
    out = F.scaled_dot_product_attention(q, k_mean[:, None].expand(2, 4, 5, 4),
                                         v_mean[:, None].expand(2, 4, 5, 4))
    expected = mha.out_proj(out.transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(mqa(x), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("L, S, window", [(6, 6, None), (1, 9, None), (3, 9, None), (6, 6, 3),
                                          (1, 9, 4), (3, 12, 4), (2, 5, 8), (1, 1, 2)])
def test_llama_attention_path_matches_sdpa_with_a_mask_written_out(L, S, window):
    """The fused path Llama runs (decode steps, chunks after a cache, windows that slice the
    keys) against SDPA with ``enable_gqa`` and a bottom-right mask built entry by entry."""
    from helpers.transformer import causal_gqa_attention

    g = torch.Generator().manual_seed(L * S)
    q = torch.randn(2, 6, L, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, S, 8, generator=g, dtype=torch.float64)
    reach = S if window is None else window
    mask = torch.tensor([[S - L + i - reach < j <= S - L + i for j in range(S)] for i in range(L)])
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(causal_gqa_attention(q, k, v, window), expected,
                               atol=1e-10, rtol=1e-10)
