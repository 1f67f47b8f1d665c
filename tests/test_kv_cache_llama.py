"""The course's caches inside the Llama family, against Hugging Face's greedy generation:
Mistral decodes past its window with a rolling buffer that holds the window and no more, and
Llama generates with every cache of helpers.kv_cache (H2O through the attention weights)."""

from __future__ import annotations

import pytest
import torch

import helpers.transformer
from helpers.kv_cache import HeavyHitterCache, KVCache, QuantizedKVCache, SinkCache
from helpers.transformer import Llama

from test_llama import LLAMAS, WINDOW, hf_greedy, make_llama, make_mistral, tokens


def per_token_bytes(model: Llama) -> int:
    """Keys and values of one token in every layer, float32."""
    attn = model.blocks[0].attn
    return 2 * len(model.blocks) * attn.n_kv_heads * attn.head_dim * 4


@pytest.mark.parametrize("prompt", [3, 3 * WINDOW])
def test_mistral_generates_past_its_window_with_a_bounded_rolling_buffer(monkeypatch, prompt):
    hf = make_mistral()
    ours = Llama.from_hf(hf)
    made = []

    class Recorded(SinkCache):  # the default cache, kept to look at afterwards
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(helpers.transformer, "SinkCache", Recorded)
    idx = tokens(2, prompt, seed=11)
    new = 5 * WINDOW
    theirs = hf_greedy(hf, idx, new)
    assert torch.equal(ours.generate(idx, new), theirs)
    (cache,) = made
    assert (cache.window, cache.n_sinks) == (WINDOW, 0)
    assert cache.seq_len == prompt + new - 1  # the last token is never fed back
    assert cache.held(0) == WINDOW
    assert cache.nbytes == WINDOW * 2 * per_token_bytes(ours)  # batch of 2, the window only
    assert cache.positions(1).flatten().tolist() == list(range(prompt + new - 1 - WINDOW,
                                                               prompt + new - 1))


def test_a_window_of_keys_is_all_mistral_ever_reads():
    """A full cache and the rolling buffer give the same tokens: the window hides the rest."""
    ours = Llama.from_hf(make_mistral())
    idx = tokens(3, 4, seed=12)
    full = KVCache(len(ours.blocks))
    assert torch.equal(ours.generate(idx, 6 * WINDOW, cache=full), ours.generate(idx, 6 * WINDOW))
    assert full.held(0) == 4 + 6 * WINDOW - 1


@pytest.mark.parametrize("make", [
    lambda n: SinkCache(n, window=64),
    lambda n: HeavyHitterCache(n, budget=64, n_recent=4),
    lambda n: QuantizedKVCache(n, bits=8, residual=64),
], ids=["sink", "heavy-hitter", "quantized"])
def test_llama_with_room_for_everything_generates_like_hf(make):
    hf = make_llama(LLAMAS["gqa"])
    ours = Llama.from_hf(hf)
    idx = tokens(2, 5, seed=13)
    cache = make(len(ours.blocks))
    assert torch.equal(ours.generate(idx, 16, cache=cache), hf_greedy(hf, idx, 16))


def test_llama_with_heavy_hitters_keeps_its_budget_per_kv_head():
    ours = Llama.from_hf(make_llama(LLAMAS["gqa"]))  # 4 query heads share 2 K/V heads
    cache = HeavyHitterCache(len(ours.blocks), budget=6, n_recent=2)
    out = ours.generate(tokens(2, 5, seed=14), 12, cache=cache)
    assert out.shape == (2, 17) and cache.held(0) == 6
    positions = cache.positions(0)
    assert positions.shape == (2, 2, 6)  # each K/V head its own choice
    newest = cache.seq_len - 1
    assert bool((positions[..., -2:] == torch.tensor([newest - 1, newest])).all())
    assert cache.stored(0)["scores"].shape == (2, 2, 6)


def test_llama_with_a_quantized_cache_stays_close_to_the_full_one():
    ours = Llama.from_hf(make_llama(LLAMAS["gqa"]))
    idx = tokens(2, 24, seed=15)
    full, quantized = KVCache(len(ours.blocks)), QuantizedKVCache(len(ours.blocks), residual=4)
    with torch.no_grad():
        ours(idx[:, :8], cache=full), ours(idx[:, :8], cache=quantized)
        for t in range(8, 24):
            a = ours(idx[:, t:t + 1], cache=full)
            b = ours(idx[:, t:t + 1], cache=quantized)
    assert float((a - b).norm() / a.norm()) < 0.02
    assert quantized.nbytes < full.nbytes  # small heads: the scales weigh a lot
