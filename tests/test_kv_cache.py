"""The KV caches: each returns exactly what the new queries attend to, keeps exactly what its
paper says (checked from first principles: positions, quantization bounds, bytes), and makes
the model generate what a model without that cache would."""

from __future__ import annotations

import pytest
import torch

from helpers.attention import causal_mask, sliding_window_mask
from helpers.kv_cache import (HeavyHitterCache, KVCache, QuantizedKVCache, SinkCache,
                              dequantize, heavy_hitter_keep, kv_cache_bytes, pack_int4, quantize,
                              sink_window_keep, unpack_int4)
from helpers.transformer import GPT

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_kv_cache_bytes_of_a_published_config():
    # Llama 2 7B: 32 layers, 32 K/V heads of 128 channels; 4096 tokens in float16 = 2 GiB
    assert kv_cache_bytes(32, 32, 128, 4096) == 2 * 2**30
    assert kv_cache_bytes(32, 8, 128, 4096, batch=3, bytes_per_elem=1) == 3 * 2**30 // 4


def test_update_returns_everything_in_order_across_growth():
    cache = KVCache(n_layers=2, capacity=2)
    g = torch.Generator().manual_seed(0)
    ks, vs = [], []
    for T in (3, 1, 1, 5, 1, 1):
        k, v = torch.randn(2, 3, T, 4, generator=g), torch.randn(2, 3, T, 5, generator=g)
        ks.append(k), vs.append(v)
        k_all, v_all = cache.update(1, k, v)
        assert torch.equal(k_all, torch.cat(ks, dim=2)) and torch.equal(v_all, torch.cat(vs, dim=2))
    assert cache.held(1) == 12 and cache.held(0) == 0
    assert cache.nbytes == 12 * 2 * 3 * (4 + 5) * 4
    assert cache.allocated_nbytes == 16 * 2 * 3 * (4 + 5) * 4  # 2 -> 4 -> 8 -> 16


def test_appending_one_token_does_not_copy_the_past():
    cache = KVCache(n_layers=1, capacity=8)
    k_all, _ = cache.update(0, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    storage = k_all.untyped_storage().data_ptr()
    for _ in range(5):
        k_all, _ = cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
        assert k_all.untyped_storage().data_ptr() == storage
    assert k_all.shape == (1, 1, 8, 2)


def test_mistakes_name_the_shapes():
    cache = KVCache(n_layers=2)
    with pytest.raises(ValueError, match=r"\(B, H_kv, T, D\)"):
        cache.update(0, torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    cache.update(0, torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4))
    with pytest.raises(ValueError, match="holds keys"):
        cache.update(0, torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4))
    with pytest.raises(IndexError, match="layer 2"):
        cache.update(2, torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4))
    with pytest.raises(ValueError, match=r"positions should have shape \(B, T\)"):
        cache.update(1, torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4),
                     positions=torch.zeros(3, 1))
    for make in (lambda: QuantizedKVCache(1, bits=3), lambda: SinkCache(1, window=0),
                 lambda: HeavyHitterCache(1, budget=4, n_recent=5)):
        with pytest.raises(ValueError):
            make()


# --- quantization ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dim", [-1, -2])
def test_quantization_error_is_at_most_half_a_step(bits, dim):
    x = torch.randn(3, 4, 9, 6, generator=torch.Generator().manual_seed(bits)) * 3
    x[0, 0, :, 0] = 1.5  # a constant channel, x[0, 0, 0, :] a constant token when dim=-1
    x[0, 0, 0, :] = 1.5
    codes, scale, zero = quantize(x, dim=dim, bits=bits)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    expected = list(x.shape)
    expected[dim] = 1
    assert list(scale.shape) == expected == list(zero.shape)
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    torch.testing.assert_close(scale, (high - low) / (2**bits - 1))  # first principles
    torch.testing.assert_close(zero, low)
    error = (dequantize(codes, scale, zero) - x).abs()
    assert bool((error <= scale / 2 + 1e-6).all())
    assert bool((error[0, 0, 0, :] == 0).all()) if dim == -1 else bool((error[0, 0, :, 0] == 0).all())


def test_int4_packing_puts_two_codes_in_a_byte():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.tolist() == [[1 + 2 * 16, 15]]  # even index in the low nibble
    assert torch.equal(unpack_int4(packed), codes)
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


def _feed(cache, layer: int, chunks: list[int], B: int = 2, H: int = 3, D: int = 8,
          seed: int = 0, dtype: torch.dtype = torch.float32):
    """Feed random keys and values in chunks of the given sizes; return all of them and the
    last update's result."""
    g = torch.Generator().manual_seed(seed)
    keys, values, result = [], [], None
    for T in chunks:
        k = torch.randn(B, H, T, D, generator=g).to(dtype)
        k[..., 1] *= 20  # an outlier channel, as in real keys
        v = torch.randn(B, H, T, D, generator=g).to(dtype)
        keys.append(k), values.append(v)
        result = cache.update(layer, k, v)
    return torch.cat(keys, dim=2), torch.cat(values, dim=2), result


@pytest.mark.parametrize("bits", [8, 4])
def test_kivi_stores_what_the_paper_says(bits):
    R, B, H, D = 4, 2, 3, 8
    cache = QuantizedKVCache(n_layers=1, bits=bits, residual=R)
    keys, values, (k_all, v_all) = _feed(cache, 0, [6, 1, 1, 1, 1, 1], B, H, D)
    T = keys.shape[2]  # 11 tokens: keys of 2 complete groups quantized, 3 recent;
    n_keys, n_values = T // R * R, T - R  # values: all but the last R quantized
    stored = cache.stored(0)
    assert stored["key_codes"].dtype == torch.uint8 == stored["value_codes"].dtype
    packed_d = D // 2 if bits == 4 else D
    assert stored["key_codes"].shape == (B, H, n_keys, packed_d)
    assert stored["value_codes"].shape == (B, H, n_values, packed_d)
    groups = keys[:, :, :n_keys].reshape(B, H, n_keys // R, R, D)  # per channel, per group
    key_scales = (groups.amax(3) - groups.amin(3)) / (2**bits - 1)  # (B, H, G, D)
    torch.testing.assert_close(stored["key_scales"], key_scales)
    torch.testing.assert_close(stored["key_zeros"], groups.amin(3))
    old = values[:, :, :n_values]  # per token
    value_scales = (old.amax(-1, keepdim=True) - old.amin(-1, keepdim=True)) / (2**bits - 1)
    torch.testing.assert_close(stored["value_scales"], value_scales)
    assert torch.equal(stored["recent_keys"], keys[:, :, n_keys:])
    assert torch.equal(stored["recent_values"], values[:, :, n_values:])
    # what the last update returned: the dequantized past within half a step, the rest exact
    k_bound = key_scales.repeat_interleave(R, dim=2) / 2 + 1e-6  # (B, H, n_keys, D)
    assert bool(((k_all[:, :, :n_keys] - keys[:, :, :n_keys]).abs() <= k_bound).all())
    v_bound = value_scales / 2 + 1e-6
    returned_old_v = v_all[:, :, :n_values - 1]  # quantized before the last step
    assert bool(((returned_old_v - values[:, :, :n_values - 1]).abs() <= v_bound[:, :, :-1]).all())
    assert torch.equal(k_all[:, :, -1], keys[:, :, -1]) and torch.equal(v_all[:, :, -1],
                                                                          values[:, :, -1])
    assert k_all.shape == keys.shape and cache.held(0) == T == cache.seq_len
    code_bytes = B * H * (n_keys + n_values) * D * bits // 8
    param_bytes = 4 * B * H * (2 * (n_keys // R) * D + 2 * n_values)
    recent_bytes = 4 * B * H * D * ((T - n_keys) + (T - n_values))
    assert cache.nbytes == code_bytes + param_bytes + recent_bytes


def test_kivi_in_half_precision_keeps_half_precision_scales():
    cache = QuantizedKVCache(n_layers=1, bits=4, residual=2)
    keys, _, _ = _feed(cache, 0, [5], dtype=torch.float16)
    stored = cache.stored(0)
    assert stored["key_scales"].dtype == torch.float16 == stored["recent_keys"].dtype
    dequantized, _ = cache.dequantized(0)
    assert float((dequantized - keys[:, :, :4]).abs().max()) < 20 * 3 * 2 / 15  # a few steps at most


# --- eviction -------------------------------------------------------------------------------

def _positional_kv(start: int, T: int, B: int = 2, H: int = 2, D: int = 3):
    """Keys and values whose entries are their position, so what is kept can be read off."""
    positions = torch.arange(start, start + T, dtype=torch.float32)
    k = positions[None, None, :, None].expand(B, H, T, D).clone()
    return k, -k


@pytest.mark.parametrize("n_sinks", [4, 0])
def test_sink_cache_keeps_exactly_the_sinks_and_the_window(n_sinks):
    window = 5
    cache = SinkCache(n_layers=2, window=window, n_sinks=n_sinks)
    k, v = _positional_kv(0, 12)  # a prompt longer than the budget
    k_all, v_all = cache.update(1, k, v)
    assert torch.equal(k_all, k) and torch.equal(v_all, v)  # the prompt attends to all of it
    seen = 12
    for _ in range(20):
        expected = list(range(n_sinks)) + list(range(seen - window, seen))
        assert cache.held(1) == n_sinks + window
        assert cache.positions(1).flatten().tolist() == expected
        assert cache.stored(1)["keys"][0, 0, :, 0].tolist() == expected
        k, v = _positional_kv(seen, 1)
        k_all, v_all = cache.update(1, k, v)
        assert k_all[0, 0, :, 0].tolist() == expected + [seen]  # held, then the new token
        assert torch.equal(v_all, -k_all)
        seen += 1
    assert cache.seq_len == 0 and cache.held(0) == 0  # layer 0 was never fed
    per_token = 2 * 2 * 2 * 3 * 4  # keys and values, B=2, H=2, D=3, float32
    assert cache.nbytes == (n_sinks + window) * per_token


def test_sink_cache_keeps_each_sequence_its_own_sinks_in_a_padded_batch():
    cache = SinkCache(n_layers=1, window=2, n_sinks=2)
    k, v = _positional_kv(0, 7, B=2)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [-1, -1, -1, 0, 1, 2, 3]])
    cache.update(0, k, v, positions=positions)
    slots = cache.stored(0)["keys"][:, 0, :, 0]  # (B, 4): which slots each sequence kept
    assert slots.tolist() == [[0, 1, 5, 6], [3, 4, 5, 6]]
    assert cache.positions(0)[:, 0].tolist() == [[0, 1, 5, 6], [0, 1, 2, 3]]


def test_padding_is_evicted_first_whatever_its_position_or_score():
    """Worked by hand: two pads (position -1), then tokens at positions 0..4 (slots 2..6).
    StreamingLLM with 1 sink and a window of 2 keeps position 0, 3, 4 (slots 2, 5, 6), though
    -1 is below n_sinks. H2O with a budget of 3, 1 recent, keeps position 4 (slot 6) and the
    two heaviest real tokens, positions 1 and 3 (slots 3, 5), though the pads score higher."""
    positions = torch.tensor([[-1, -1, 0, 1, 2, 3, 4]])
    assert sink_window_keep(positions, window=2, n_sinks=1).tolist() == [[2, 5, 6]]
    scores = torch.tensor([[9.0, 8.0, 1.0, 5.0, 2.0, 3.0, 0.5]])
    assert heavy_hitter_keep(scores, positions, budget=3, n_recent=1).tolist() == [[3, 5, 6]]
    # a recent window reaching before the first token must not make the pads recent
    short = torch.tensor([[-1, -1, -1, 0, 1]])
    kept = heavy_hitter_keep(torch.ones(1, 5), short, budget=2, n_recent=3)
    assert kept.tolist() == [[3, 4]]


def test_heavy_hitter_cache_keeps_the_recent_and_the_most_attended():
    budget, n_recent, H_kv, group = 4, 1, 2, 3
    cache = HeavyHitterCache(n_layers=1, budget=budget, n_recent=n_recent)
    g = torch.Generator().manual_seed(0)
    totals = {h: {} for h in range(H_kv)}  # position -> accumulated attention, by K/V head
    kept = {h: [] for h in range(H_kv)}
    seen = 0
    for T in (3, 1, 1, 1, 1, 1):
        k, v = _positional_kv(seen, T, B=1, H=H_kv)
        k_all, _ = cache.update(0, k, v)
        S = k_all.shape[2]
        assert [p for p in k_all[0, 0, :, 0].tolist()] == kept[0] + list(range(seen, seen + T))
        weights = torch.rand(1, H_kv * group, T, S, generator=g)  # any non-negative numbers
        cache.record_attention(0, weights)
        for h in range(H_kv):  # H2O by hand, in plain Python
            present = kept[h] + list(range(seen, seen + T))
            for j, position in enumerate(present):
                received = float(weights[0, h * group:(h + 1) * group, :, j].sum())
                totals[h][position] = totals[h].get(position, 0.0) + received
            recent = present[-n_recent:]
            older = sorted(present[:-n_recent], key=lambda p: -totals[h][p])
            kept[h] = sorted(recent + older[:budget - n_recent]) if len(present) > budget \
                else present
            stored = cache.stored(0)
            assert stored["keys"][0, h, :, 0].tolist() == kept[h]
            torch.testing.assert_close(stored["scores"][0, h].tolist(),
                                       [totals[h][p] for p in kept[h]])
        seen += T
    assert cache.nbytes == H_kv * budget * (2 * 3 * 4 + 4)  # keys, values, one float32 score


def test_heavy_hitter_cache_needs_the_weights():
    cache = HeavyHitterCache(n_layers=1, budget=2, n_recent=1)
    cache.update(0, *_positional_kv(0, 3))
    with pytest.raises(RuntimeError, match="record_attention"):
        cache.update(0, *_positional_kv(3, 1))
    with pytest.raises(ValueError, match=r"\(B, H, L, S\)"):
        cache.record_attention(0, torch.ones(2, 2, 3, 4))


# --- the caches inside a model ---------------------------------------------------------------

V = 61


@pytest.fixture(scope="module")
def model() -> GPT:
    """A small GPT with large random weights, so that its tokens depend on every detail."""
    torch.manual_seed(0)
    gpt = GPT(V, 32, n_layers=2, n_heads=4, max_len=64).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return gpt


def masked_greedy(model: GPT, idx: torch.Tensor, steps: int, allowed) -> torch.Tensor:
    """Greedy decoding with no cache and an explicit attention mask ``allowed(L)`` (L, L):
    what a cache that keeps only those keys should give, computed another way."""
    with torch.no_grad():
        for _ in range(steps):
            L = idx.shape[1]
            x = model.token_embedding(idx) + model.position_embedding(torch.arange(L))
            for block in model.blocks:
                x = block(x, mask=allowed(L))
            logits = model.lm_head(model.norm(x))[:, -1]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("n_sinks", [0, 3])
def test_generation_with_a_sink_cache_equals_masked_attention(model, n_sinks):
    window = 6  # a query sees the sinks, the `window` tokens before it, and itself
    idx = torch.randint(0, V, (3, n_sinks + window + 1), generator=torch.Generator().manual_seed(1))

    def sinks_and_window(L: int) -> torch.Tensor:
        visible = sliding_window_mask(L, window + 1)
        visible[:, :n_sinks] = True
        return visible & causal_mask(L)

    ours = model.generate(idx, 30, cache=SinkCache(2, window=window, n_sinks=n_sinks))
    expected = masked_greedy(model, idx, 30, sinks_and_window)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, model.generate(idx, 30))  # eviction did change the tokens


@pytest.mark.parametrize("make", [
    lambda: SinkCache(2, window=40),
    lambda: HeavyHitterCache(2, budget=50, n_recent=2),
    lambda: QuantizedKVCache(2, bits=4, residual=64),  # nothing old enough to quantize
], ids=["sink", "heavy-hitter", "quantized"])
def test_caches_with_room_for_everything_generate_like_the_full_cache(model, make):
    idx = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(model.generate(idx, 30, cache=make()), model.generate(idx, 30))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_holds_fewer_bytes_and_changes_little(model, bits):
    idx = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(3))
    full, quantized = KVCache(2), QuantizedKVCache(2, bits=bits, residual=8)
    with torch.no_grad():
        reference = model(idx, cache=full)
        model(idx, cache=quantized)
        steps = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(4))
        for t in range(16):
            a = model(steps[:, t:t + 1], cache=full)
            b = model(steps[:, t:t + 1], cache=quantized)
    relative = float((a - b).norm() / a.norm())
    assert relative < (0.02 if bits == 8 else 0.2)
    assert reference.shape == (4, 8, V)
    assert quantized.nbytes < full.nbytes * (0.6 if bits == 8 else 0.5)


CACHES = {
    "full": lambda: KVCache(2),
    "sink": lambda: SinkCache(2, window=4, n_sinks=2),
    "window": lambda: SinkCache(2, window=5, n_sinks=0),
    "heavy-hitter": lambda: HeavyHitterCache(2, budget=6, n_recent=3),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CACHES))
def test_batched_prompts_of_different_lengths_equal_one_by_one(model, name, device):
    gpt = model.to(device)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (n,), generator=g).to(device) for n in (9, 2, 5, 9)]
    longest = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), longest, dtype=torch.bool, device=device)
    for i, prompt in enumerate(prompts):  # left padding
        idx[i, longest - len(prompt):], mask[i, longest - len(prompt):] = prompt, True
    batched = gpt.generate(idx, 25, cache=CACHES[name](), attention_mask=mask)
    for i, prompt in enumerate(prompts):
        alone = gpt.generate(prompt[None], 25, cache=CACHES[name]())
        assert torch.equal(batched[i, longest - len(prompt):], alone[0]), f"prompt {i}"
    if name == "full":
        assert torch.equal(batched, gpt.generate(idx, 25, attention_mask=mask, use_cache=False))
    gpt.to("cpu")


def test_generate_continues_a_cache_that_holds_the_start(model):
    idx = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(6))
    cache = KVCache(2)
    with torch.no_grad():
        model(idx[:, :4], cache=cache)
    assert torch.equal(model.generate(idx, 10, cache=cache), model.generate(idx, 10))
    with pytest.raises(ValueError, match="already holds"):
        model.generate(idx[:, :3], 5, cache=cache)
