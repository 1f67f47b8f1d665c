"""Hidden tests for lesson 09 (the KV cache): fresh shapes, dtypes and seeds, references from
a private copy of ``helpers`` and plain arithmetic, no shortcut through the reference caches.

Loaded through ``helpers.hidden.lesson("09")``, so every ``helpers`` module imported here is a
private copy that the student's kernel cannot have patched.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from helpers import attention, kv_cache, transformer
from helpers.checks import lesson09 as visible
from helpers.device import get_device
from helpers.hidden._core import expect, expect_close, forbid, random_seed

DTYPES = (torch.float32, torch.float64)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}


@visible.on_one_thread
def decode_attention(fn: Callable) -> None:
    """out, k, v of one decode step against the last row of causal attention over the whole
    sequence (the reference MultiHeadAttention), for random layers and past lengths."""
    seed = random_seed()
    rng = random.Random(seed)
    for dtype in DTYPES:
        # S >= 2: with no past, attending to the past only, to key 0 only or putting the new
        # key first would go unnoticed; D >= 2: with one channel a missing 1/sqrt(D) would
        for S in (rng.randint(2, 12), rng.choice([0, 1, rng.randint(2, 12)])):
            B, H, D = rng.randint(1, 3), rng.randint(1, 4), rng.randint(2, 8)
            attn, x, past_k, past_v, expected = visible.decode_step_case(
                attention.MultiHeadAttention, B, S, H * D, H, seed=rng.randrange(2**31),
                dtype=dtype)
            what = f"decode_attention, B={B}, H={H}, D={D}, S={S}, {dtype}, seed {seed}"
            with torch.no_grad(), forbid(helpers=["helpers.transformer.attention"]):
                result = fn(attn, x, past_k, past_v)
            expect(isinstance(result, tuple) and len(result) == 3,
                    f"{what}: expected a tuple (out, k, v)")
            for name, value in zip(("out", "k", "v"), result):
                expect_close(value, expected[name], f"{what}: {name}", atol=TOLERANCE[dtype],
                             rtol=TOLERANCE[dtype])


@visible.on_one_thread
def growing_kv(cache_class: type) -> None:
    """Everything appended comes back in order after every append, in storage that is
    reallocated no more often than doubling requires, for random capacities and chunks."""
    seed = random_seed()
    rng = random.Random(seed)
    for dtype in DTYPES:
        capacity = rng.randint(1, 8)
        chunks = [rng.randint(1, 12)] + [1 if rng.random() < 0.9 else rng.randint(2, 30)
                                         for _ in range(rng.randint(100, 200))]
        with forbid(helpers=["helpers.kv_cache.KVCache", "helpers.kv_cache._Growing"]):
            results, keys, values, addresses, cache = visible.storages_used(
                cache_class, chunks, capacity, seed=rng.randrange(2**31), dtype=dtype)
        what = f"GrowingKV(capacity={capacity}), {len(chunks)} appends, {dtype}, seed {seed}"
        for i in sorted({0, 1, len(chunks) // 2, len(chunks) - 1}):
            expect(isinstance(results[i], tuple) and len(results[i]) == 2,
                    f"{what}: append should return (k_all, v_all)")
            expect_close(results[i][0], torch.cat(keys[:i + 1], dim=2),
                         f"{what}: keys after append {i + 1}", atol=0, rtol=0)
            expect_close(results[i][1], torch.cat(values[:i + 1], dim=2),
                         f"{what}: values after append {i + 1}", atol=0, rtol=0)
            expect(results[i][0].dtype == dtype, f"{what}: keys come back as "
                    f"{results[i][0].dtype}, appended as {dtype}")
        expect(getattr(cache, "length", None) == sum(chunks),
                f"{what}: length is {getattr(cache, 'length', None)}, expected {sum(chunks)}")
        allowed = visible.doublings(capacity, chunks)
        expect(len(set(addresses)) <= allowed, f"{what}: {len(set(addresses))} storages, "
                f"doubling needs {allowed}: append must write into preallocated storage and "
                "return views of it, doubling the capacity when it is full")


@visible.on_one_thread
def generate_greedy(fn: Callable) -> None:
    """The tokens of uncached greedy generation, from one prefill and then single tokens
    through a cache, for a random GPT."""
    seed = random_seed()
    rng = random.Random(seed)
    n_heads = rng.randint(1, 4)
    # L >= 2: a one-token prompt fed token by token is the same as fed at once
    B, L, steps = rng.randint(1, 3), rng.randint(2, 8), rng.randint(6, 15)
    vocab = rng.randint(20, 60)
    model = visible.spy_model(transformer, vocab, n_heads * rng.randint(4, 8),
                              rng.randint(1, 3), n_heads, L + steps, seed=rng.randrange(2**31))
    idx = torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(
        rng.randrange(2**31))).to(get_device())
    expected = visible.uncached_greedy(model, idx, steps)
    model.calls = []
    what = f"generate_greedy, B={B}, L={L}, {steps} new tokens, seed {seed}"
    out = fn(model, idx, steps)
    expect(isinstance(out, torch.Tensor) and tuple(out.shape) == (B, L + steps),
            f"{what}: expected a tensor of shape {(B, L + steps)}")
    expect(bool((out == expected).all()), f"{what}: the tokens differ from generation "
            "without a cache")
    calls = model.calls
    expect(bool(calls) and all(cached for _, cached in calls), f"{what}: every call to the "
            "model must pass the cache")
    expect(calls[0][0] == L and all(length == 1 for length, _ in calls[1:]),
            f"{what}: the calls fed {[length for length, _ in calls]} tokens: the prompt once, "
            "then one token per step")


def quantize(quantize_fn: Callable, dequantize_fn: Callable) -> None:
    """Codes, scales and zero points of min-max quantization along a random dim, with an
    error of at most half a step, for random shapes, dtypes and bit widths."""
    seed = random_seed()
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    for dtype, bits in zip(DTYPES, (8, rng.choice((2, 3, 4)))):  # 8 and a narrower width
        shape = [rng.randint(2, 6) for _ in range(rng.randint(2, 4))]
        shape[rng.randrange(len(shape))] = rng.randint(8, 16)  # slices long enough to round
        x = (torch.randn(shape, generator=generator, dtype=torch.float64)
             * rng.uniform(0.1, 10) + rng.uniform(-5, 5)).to(dtype).to(get_device())
        dim = rng.randrange(-len(shape), len(shape))
        constant = [0] * len(shape)
        constant[dim] = slice(None)
        x[tuple(constant)] = 0.375  # one constant slice: scale 0
        what = f"quantize, shape {tuple(shape)}, dim {dim}, bits {bits}, {dtype}, seed {seed}"
        with forbid(helpers=["helpers.kv_cache.quantize", "helpers.kv_cache.dequantize",
                             "helpers.kv_cache.QuantizedKVCache"]):
            result = quantize_fn(x, dim, bits)
            expect(isinstance(result, tuple) and len(result) == 3,
                    f"{what}: expected (codes, scale, zero)")
            codes, scale, zero = result
            x_hat = dequantize_fn(codes, scale, zero)
        expect(isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8
                and tuple(codes.shape) == tuple(shape), f"{what}: codes should be uint8 with "
                "the shape of x")
        expect(int(codes.max()) <= 2**bits - 1, f"{what}: a code is above 2^bits - 1")
        expected_scale, expected_zero = visible.quantization_oracle(x, dim, bits)
        for name, value, target in (("scale", scale, expected_scale), ("zero", zero,
                                                                       expected_zero)):
            expect(isinstance(value, torch.Tensor) and value.dtype == dtype,
                    f"{what}: {name} should be a tensor of dtype {dtype}")
            expect_close(value, target, f"{what}: {name}", atol=TOLERANCE[dtype],
                         rtol=TOLERANCE[dtype])
        expect(isinstance(x_hat, torch.Tensor) and x_hat.dtype == dtype,
                f"{what}: dequantize should return the dtype of scale")
        error = (x_hat.double() - x.double()).abs()
        bound = expected_scale / 2 * (1 + 1e-5) + TOLERANCE[dtype] * (1 + x.double().abs())
        expect(bool((error <= bound).all()), f"{what}: the round trip is off by more than "
                "half a step somewhere (or NaN on the constant slice)")


def sink_window(fn: Callable) -> None:
    """The first n_sinks and last window tokens of random keys and values, in order, for
    random sizes, with and without sinks, longer and shorter than the budget."""
    seed = random_seed()
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    window, n_sinks = rng.randint(2, 6), rng.randint(1, 4)
    cases = [(n_sinks + window + rng.randint(1, 20), window, n_sinks),  # evicts
             (n_sinks + window + rng.randint(1, 20), window, 0),  # a plain window
             # fits, and sinks and window would overlap: everything, each token once
             (rng.randint(n_sinks + 1, n_sinks + window - 1), window, n_sinks)]
    for S, window, n_sinks in cases:
        B, H, D = rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 8)
        dtype = rng.choice(DTYPES)
        k = torch.randn(B, H, S, D, generator=generator, dtype=dtype).to(get_device())
        v = torch.randn(B, H, S, D + 1, generator=generator, dtype=dtype).to(get_device())
        what = f"sink_window, S={S}, window={window}, n_sinks={n_sinks}, seed {seed}"
        with forbid(helpers=["helpers.kv_cache.sink_window_keep", "helpers.kv_cache.SinkCache"]):
            result = fn(k, v, window, n_sinks)
        expect(isinstance(result, tuple) and len(result) == 2, f"{what}: expected (k, v)")
        keep = kv_cache.sink_window_keep(torch.arange(S), window, n_sinks).to(k.device)
        expect_close(result[0], k[:, :, keep], f"{what}: keys", atol=0, rtol=0)
        expect_close(result[1], v[:, :, keep], f"{what}: values", atol=0, rtol=0)


def heavy_hitters(fn: Callable) -> None:
    """Kept indices for random accumulated scores: the recent ones and the largest older
    scores, ascending, for random budgets, with and without recent tokens."""
    seed = random_seed()
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    budget = rng.randint(4, 10)
    cases = [(budget + rng.randint(2, 30), budget, rng.randint(1, budget - 2)),
             (budget + rng.randint(2, 30), budget, 0),
             (rng.randint(1, budget), budget, rng.randint(0, budget))]
    for S, budget, n_recent in cases:
        B, H = rng.randint(1, 3), rng.randint(2, 4)
        scores = torch.rand(B, H, S, generator=generator, dtype=torch.float64) * rng.uniform(1, 50)
        older = S - n_recent
        if S > budget:  # two rows that make every mistake visible: in the first the older
            # scores grow with the position and the recent tokens have the lowest (as
            # accumulated attention usually does); in the second the recent ones the highest
            scores[0, 0, :older] += 100 * torch.arange(1, older + 1, dtype=torch.float64)
            scores[0, 0, older:] /= 100
            scores[0, 1, older:] += 100 * S
        what = f"heavy_hitters, S={S}, budget={budget}, n_recent={n_recent}, seed {seed}"
        with forbid(helpers=["helpers.kv_cache.heavy_hitter_keep",
                             "helpers.kv_cache.HeavyHitterCache"]):
            kept = fn(scores.to(get_device()), budget, n_recent)
        expected = visible.heavy_hitter_oracle(scores, budget, n_recent)
        expect(isinstance(kept, torch.Tensor) and not kept.is_floating_point()
                and kept.shape == expected.shape, f"{what}: expected integer indices of shape "
                f"{tuple(expected.shape)}")
        expect(bool((kept.cpu() == expected).all()), f"{what}: the kept indices differ")
