"""The course's Llama checked without Hugging Face, by properties a slip would break: cached
generation equals rerunning the sequence (past the sliding window too), a forward split through
the cache equals one forward, RoPE makes the logits independent of where the sequence starts,
the receptive field of a windowed stack is exactly n_layers · (W - 1) + 1 positions (by
gradients), grouped K/V heads equal their blocked copies, every cache with room for everything
(H2O through the attention weights) generates as no cache does; and the whole model against Llama
written out by hand on PyTorch's SDPA, with a head_dim that is not d_model / n_heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.kv_cache import HeavyHitterCache, KVCache, QuantizedKVCache, SinkCache
from helpers.transformer import Llama

VOCAB = 50


def small_llama(window: int | None = None, n_kv_heads: int = 2, n_layers: int = 2,
                seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(VOCAB, 32, n_layers, 4, n_kv_heads, d_ff=48, window=window)
    with torch.no_grad():  # larger weights than the init: sharper, more varied predictions
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    return model.double().eval()


def tokens(length: int, seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("window", [None, 4])
def test_cached_generation_equals_rerunning_the_sequence(window):
    model = small_llama(window)
    idx = tokens(3)
    cached = model.generate(idx, 24)
    assert len(set(cached[:, 3:].flatten().tolist())) > 4, "degenerate test: few tokens"
    assert torch.equal(cached, model.generate(idx, 24, use_cache=False))


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("make", [
    lambda n: SinkCache(n, window=64),
    lambda n: HeavyHitterCache(n, budget=64, n_recent=2),  # through the attention weights
    lambda n: QuantizedKVCache(n, bits=8, residual=64),
], ids=["sink", "heavy-hitter", "quantized"])
def test_every_cache_with_room_for_everything_generates_like_no_cache(make, window):
    """A cache that evicts or quantizes nothing changes nothing, with a sliding window too."""
    model = small_llama(window)
    idx = tokens(3)
    expected = model.generate(idx, 24, use_cache=False)
    assert torch.equal(model.generate(idx, 24, cache=make(len(model.blocks))), expected)


@pytest.mark.parametrize("window", [None, 3])
def test_a_forward_split_through_the_cache_equals_one_forward(window):
    model = small_llama(window)
    idx = tokens(11)
    cache = KVCache(len(model.blocks))
    with torch.no_grad():
        parts = [model(idx[:, :4], cache=cache), model(idx[:, 4:5], cache=cache),
                 model(idx[:, 5:], cache=cache)]
        torch.testing.assert_close(torch.cat(parts, dim=1), model(idx), atol=1e-10, rtol=1e-10)


class OffsetCache:
    """A cache that holds nothing but says ``offset`` tokens came before: positions start at
    ``offset``, and the attention sees only the new tokens."""

    def __init__(self, offset: int):
        self.seq_len = offset

    def update(self, layer, k, v):
        return k, v

    def held(self, layer=0):
        return 0


@pytest.mark.parametrize("offset", [1, 37, 1000])
def test_logits_do_not_depend_on_where_the_sequence_starts(offset):
    """RoPE encodes only i - j: the same tokens at positions offset .. offset + L - 1 give the
    same logits as at 0 .. L - 1 (a model that forgets to rotate the keys, or rotates the
    queries at other positions than the keys, fails)."""
    model = small_llama()
    idx = tokens(9)
    with torch.no_grad():
        shifted, logits = model(idx, cache=OffsetCache(offset)), model(idx)
    # the angles are float32 (as in Hugging Face), so far positions differ by float32 rounding
    assert (shifted - logits).abs().max() < 1e-4 * logits.abs().max()


@pytest.mark.parametrize("window, n_layers", [(3, 1), (3, 2), (4, 3)])
def test_receptive_field_grows_by_window_minus_one_per_layer(window, n_layers):
    """The last position's logits depend (by gradients) on exactly the inputs
    L - 1 - n_layers (W - 1) .. L - 1: not further back, and never the future."""
    model = small_llama(window, n_layers=n_layers)
    L = 16
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["x"] = output

    handle = model.token_embedding.register_forward_hook(keep)
    try:
        model(tokens(L, batch=1))[0, L - 2].sum().backward()
    finally:
        handle.remove()
    reaches = captured["x"].grad[0].abs().sum(-1) > 0  # (L,)
    first = L - 2 - n_layers * (window - 1)
    expected = torch.zeros(L, dtype=torch.bool)
    expected[max(first, 0):L - 1] = True
    assert torch.equal(reaches, expected)


def test_grouped_heads_equal_their_blocked_copies():
    """A GQA model equals the multi-head model whose K/V heads are copies of its own, head h
    taking K/V head h // G (the blocked mapping of the checkpoints)."""
    gqa = small_llama(n_kv_heads=2)
    mha = Llama(VOCAB, 32, 2, 4, 4, d_ff=48).double().eval()
    state = gqa.state_dict()
    for name, w in list(state.items()):
        if ".k_proj." in name or ".v_proj." in name:  # (2 * 8, 32) -> (4 * 8, 32), blocked
            state[name] = w.reshape(2, 1, 8, 32).expand(2, 2, 8, 32).reshape(32, 32)
    mha.load_state_dict(state)
    idx = tokens(7)
    with torch.no_grad():
        torch.testing.assert_close(mha(idx), gqa(idx), atol=1e-10, rtol=1e-10)


def llama_by_hand(model: Llama, idx: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Llama (Touvron et al., 2023) from its description, on PyTorch's primitives: pre-RMSNorm
    layers, RoPE on the two halves of each head (Su et al., 2021, in Hugging Face's layout),
    causal grouped-query SDPA, a SwiGLU feed-forward, a final RMSNorm and the LM head."""
    def rms(x, norm):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    def heads(x, n):  # (B, L, n · hd) -> (B, n, L, hd)
        return x.unflatten(-1, (n, -1)).transpose(1, 2)

    def rotate(x):  # channel i pairs with channel i + hd/2, turned by m · base^(-2i/hd)
        half = x.shape[-1] // 2
        theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
        angle = torch.arange(x.shape[-2], dtype=torch.float64)[:, None] * theta  # (L, hd/2)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * angle.cos() - x2 * angle.sin(),
                          x2 * angle.cos() + x1 * angle.sin()], dim=-1)

    x = model.token_embedding.weight[idx]
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        h = rms(x, block.norm1)
        q = rotate(heads(h @ attn.q_proj.weight.T, attn.n_heads))
        k = rotate(heads(h @ attn.k_proj.weight.T, attn.n_kv_heads))
        v = heads(h @ attn.v_proj.weight.T, attn.n_kv_heads)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + out.transpose(1, 2).flatten(2) @ attn.out_proj.weight.T
        h = rms(x, block.norm2)
        x = x + (F.silu(h @ mlp.gate.weight.T) * (h @ mlp.up.weight.T)) @ mlp.down.weight.T
    return rms(x, model.norm) @ model.lm_head.weight.T


def test_llama_equals_llama_written_out_by_hand():
    """d_model 32 with 4 query heads of head_dim 12 (not 32 / 4) and 2 K/V heads."""
    torch.manual_seed(2)
    model = Llama(VOCAB, 32, 2, 4, 2, d_ff=40, head_dim=12).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    assert model.blocks[0].attn.q_proj.weight.shape == (4 * 12, 32)
    idx = tokens(9)
    with torch.no_grad():  # the angles are float32 in the model (as in Hugging Face)
        torch.testing.assert_close(model(idx), llama_by_hand(model, idx), atol=1e-5, rtol=1e-5)


def test_model_errors_name_the_problem():
    with pytest.raises(ValueError, match="window must be at least 1"):
        Llama(VOCAB, 32, 1, 4, window=0)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        small_llama()(torch.zeros(3, dtype=torch.long))
