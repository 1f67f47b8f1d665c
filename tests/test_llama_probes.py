"""The course's Llama checked without Hugging Face, by properties a slip would break: cached
generation equals rerunning the sequence (past the sliding window too), a forward split through
the cache equals one forward, RoPE makes the logits independent of where the sequence starts,
the receptive field of a windowed stack is exactly n_layers · (W - 1) + 1 positions (by
gradients), and grouped K/V heads equal their blocked copies."""

from __future__ import annotations

import pytest
import torch

from helpers.kv_cache import KVCache
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


def test_model_errors_name_the_problem():
    with pytest.raises(ValueError, match="window must be at least 1"):
        Llama(VOCAB, 32, 1, 4, window=0)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        small_llama()(torch.zeros(3, dtype=torch.long))
