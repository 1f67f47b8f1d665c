"""Visible checks for lesson 09 (the KV cache): each failure names the likely mistake.

Oracles: PyTorch's own attention on the whole sequence (``F.scaled_dot_product_attention``
with ``is_causal``), ``torch.cat`` of everything appended, generation without a cache, and
min-max arithmetic written out here. References from ``helpers`` are private copies
(:func:`helpers.hidden._core.fresh_import`), so a notebook cell that patched them cannot
change a verdict.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from helpers.checks import (CheckFailed, call, exercise, expect, expect_close, expect_shape,
                            expect_tensor, is_close, passed, randn, run_without)
from helpers.device import get_device, one_cpu_thread
from helpers.hidden._core import ShortcutUsed, fresh_import


def on_one_thread(check: Callable) -> Callable:
    """Run ``check`` on one CPU thread: its many small operations would otherwise wait on
    each other's threads whenever the machine is busy (several notebooks graded at once)."""
    @functools.wraps(check)
    def run(*args: object, **kwargs: object) -> object:
        with one_cpu_thread():
            return check(*args, **kwargs)
    return run


# --- exercise 1: a decode step ---------------------------------------------------------------


def decode_step_case(attention_module: type, B: int, S: int, d_model: int, n_heads: int,
                     seed: int, dtype: torch.dtype = torch.float64
                     ) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor,
                                dict[str, torch.Tensor]]:
    """A random attention layer, a sequence of S + 1 tokens, the past keys and values of the
    first S, and what a decode step of the last token must give, from PyTorch's attention
    over the whole sequence (and from the usual mistakes)."""
    torch.manual_seed(seed)
    attn = attention_module(d_model, n_heads).to(get_device(), dtype)
    x = randn(B, S + 1, d_model, seed=seed + 1, dtype=dtype)
    with torch.no_grad():
        q = attn.q_proj(x).reshape(B, S + 1, n_heads, -1).transpose(1, 2)  # (B, H, S+1, D)
        k = attn.k_proj(x).reshape(B, S + 1, n_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(B, S + 1, n_heads, -1).transpose(1, 2)

        def output(heads: torch.Tensor) -> torch.Tensor:  # (B, H, 1, D) -> (B, 1, d)
            return attn.out_proj(heads.transpose(1, 2).reshape(B, 1, d_model))

        q_new = q[:, :, -1:]
        expected = {
            "out": output(F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, -1:]),
            "k": k, "v": v,
            "key 0 only": output(v[:, :, :1]),
            "unscaled": output(F.scaled_dot_product_attention(q_new, k, v, scale=1.0)),
            "no out_proj": (F.scaled_dot_product_attention(q_new, k, v)
                            .transpose(1, 2).reshape(B, 1, d_model)),
        }
        if S:
            expected["past only"] = output(F.scaled_dot_product_attention(
                q_new, k[:, :, :-1], v[:, :, :-1]))
    return attn, x[:, -1:], k[:, :, :-1].clone(), v[:, :, :-1].clone(), expected


@exercise
@on_one_thread
def decode_attention(fn: Callable) -> None:
    """``decode_attention(attn, x, past_k, past_v) -> (out, k, v)``: the last row of causal
    attention over the whole sequence, from the new token's projections only."""
    attention = fresh_import("helpers.attention")
    B, S, d_model, H = 2, 5, 16, 4
    attn, x, past_k, past_v, expected = decode_step_case(attention.MultiHeadAttention, B, S,
                                                         d_model, H, seed=0)
    hint = (f"x is (B, 1, d) = {(B, 1, d_model)}, past_k and past_v are (B, H, S, D) = "
            f"{(B, H, S, d_model // H)}: project x, split its heads, torch.cat along dim 2")
    with torch.no_grad():
        result = run_without("decode_attention", lambda: call(
            fn, attn, x, past_k, past_v, name="decode_attention(attn, x, past_k, past_v)",
            hint=hint), helpers=["helpers.transformer.attention"])
    expect(isinstance(result, tuple) and len(result) == 3,
           "decode_attention should return a tuple (out, k, v)")
    out, k, v = (expect_tensor(value, name) for value, name in zip(result, ("out", "k", "v")))
    expect_shape(out, (B, 1, d_model), "out", "the output of the layer for the new token, "
                 "after attn.out_proj")
    expect(tuple(k.shape) != (B, H, 1, d_model // H), "k holds only the new token's key: "
           "return the past and the new keys together, (B, H, S + 1, D)")
    expect_shape(k, (B, H, S + 1, d_model // H), "k", "the past keys, then the new one")
    expect_shape(v, (B, H, S + 1, d_model // H), "v", "the past values, then the new one")
    if is_close(k[:, :, 0], expected["k"][:, :, -1]):
        raise CheckFailed("the new key comes first: append it after the past, "
                          "torch.cat([past_k, k_new], dim=2)")
    expect_close(k, expected["k"], "k", "past_k followed by split_heads(attn.k_proj(x))")
    expect_close(v, expected["v"], "v", "past_v followed by split_heads(attn.v_proj(x))")
    mistakes = {
        "past only": "the new token does not attend to itself: append its key and value "
                     "first, then attend over all S + 1",
        "key 0 only": "the query sees only the first key: is_causal=True aligns the causal "
                      "mask top left, so one query may see key 0 only; use no mask",
        "unscaled": "the scores are not divided by √D (the head dimension)",
        "no out_proj": "the heads are merged but attn.out_proj is not applied",
    }
    for name, message in mistakes.items():
        if name in expected:
            expect(not is_close(out, expected[name]), message)
    expect_close(out, expected["out"], "out", "softmax(q kᵀ / √D) v over all S + 1 tokens, "
                 "heads merged, then attn.out_proj")
    attn, x, past_k, past_v, expected = decode_step_case(attention.MultiHeadAttention, 1, 0,
                                                         8, 2, seed=1)
    with torch.no_grad():
        out, k, _ = call(fn, attn, x, past_k, past_v, name="decode_attention with S = 0",
                         hint="an empty cache (B, H, 0, D): torch.cat handles it")
    expect_close(out, expected["out"], "out for the first token (S = 0)",
                 "with an empty past the token attends to itself alone")
    passed("decode_attention")


# --- exercise 2: a growing cache -------------------------------------------------------------


def storages_used(cache_class: type, chunks: list[int], capacity: int, seed: int,
                  dtype: torch.dtype = torch.float64
                  ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor],
                             list[torch.Tensor], list[int], object]:
    """Append random chunks of the given token counts; return what each append returned,
    the keys and values appended, the storage address of each returned key tensor, and
    the cache."""
    cache = cache_class(capacity=capacity)
    generator = torch.Generator().manual_seed(seed)
    results, keys, values, addresses = [], [], [], []
    for T in chunks:
        k = torch.randn(2, 3, T, 4, generator=generator, dtype=dtype).to(get_device())
        v = torch.randn(2, 3, T, 5, generator=generator, dtype=dtype).to(get_device())
        keys.append(k), values.append(v)
        result = cache.append(k, v)
        results.append(result)
        if isinstance(result, tuple) and isinstance(result[0], torch.Tensor):
            addresses.append(result[0].untyped_storage().data_ptr())
    return results, keys, values, addresses, cache


def doublings(capacity: int, chunks: list[int]) -> int:
    """Storages a cache that starts at ``capacity`` and doubles when full allocates."""
    count, size, held = 0, capacity, 0
    for T in chunks:
        held += T
        if count == 0 or held > size:
            while size < held:
                size *= 2
            count += 1
    return count


@exercise
@on_one_thread
def growing_kv(cache_class: type) -> None:
    """``GrowingKV(capacity).append(k, v)``: everything appended, in order, as views of
    storage that doubles when full."""
    chunks = [3, 1, 1, 5] + [1] * 120 + [40, 1, 1]
    results, keys, values, addresses, cache = storages_used(cache_class, chunks, 4, seed=0)
    for i, result in enumerate(results):
        expect(isinstance(result, tuple) and len(result) == 2,
               "append should return a tuple (k_all, v_all)")
        k_all, v_all = (expect_tensor(value, name) for value, name in zip(result, ("k", "v")))
        held = sum(chunks[:i + 1])
        expect_shape(k_all, (2, 3, held, 4), f"keys after {i + 1} appends",
                     "all the tokens appended so far, (B, H, length, D): slice the storage "
                     "[:, :, :length]")
        expect_shape(v_all, (2, 3, held, 5), f"values after {i + 1} appends",
                     "values have their own storage, (B, H, length, Dv)")
        expect(k_all.dtype == keys[0].dtype, f"keys come back as {k_all.dtype}, appended as "
               f"{keys[0].dtype}: allocate with k.new_empty(...) so dtype and device follow")
        expect_close(k_all, torch.cat(keys[:i + 1], dim=2), f"keys after {i + 1} appends",
                     "write each new chunk right after what is held, and copy the old "
                     "contents when the storage grows")
        expect_close(v_all, torch.cat(values[:i + 1], dim=2), f"values after {i + 1} appends")
    expect(getattr(cache, "length", None) == sum(chunks),
           f"cache.length should be {sum(chunks)}, the number of tokens held, got "
           f"{getattr(cache, 'length', None)}")
    storages, allowed = len(set(addresses)), doublings(4, chunks)
    expect(storages < len(chunks) // 2, f"{storages} different storages for {len(chunks)} "
           "appends: every append makes a new tensor (torch.cat, or a copy) and copies the "
           "whole past; write into preallocated storage and return slices of it")
    expect(storages <= allowed, f"{storages} storage allocations for {sum(chunks)} tokens "
           f"from capacity 4; doubling needs {allowed}: grow geometrically (double the "
           "capacity until the tokens fit), not by a fixed number of slots")
    passed("GrowingKV")


# --- exercise 3: cached generation -----------------------------------------------------------


def spy_model(transformer: object, vocab: int, d_model: int, n_layers: int, n_heads: int,
              max_len: int, seed: int) -> torch.nn.Module:
    """A reference GPT with random weights whose forward records (tokens fed, cache given)
    and whose ``generate`` refuses to run."""
    class SpyGPT(transformer.GPT):
        def forward(self, idx, attention_mask=None, cache=None, position_ids=None):
            self.calls.append((idx.shape[1], cache is not None))
            return super().forward(idx, attention_mask, cache, position_ids)

        def generate(self, *args, **kwargs):
            raise ShortcutUsed("generate_greedy called model.generate: write the loop "
                               "yourself")

    torch.manual_seed(seed)
    model = SpyGPT(vocab, d_model, n_layers, n_heads, max_len).to(get_device()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # large weights: tokens depend on every detail
    model.calls = []
    return model


def uncached_greedy(model: torch.nn.Module, idx: torch.Tensor, steps: int) -> torch.Tensor:
    """The plainest greedy loop: rerun the whole sequence every step."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(idx)[:, -1]
            idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return idx


@exercise
@on_one_thread
def generate_greedy(fn: Callable) -> None:
    """``generate_greedy(model, idx, n)``: the tokens of uncached greedy generation, from one
    prefill and then one token per step through a KV cache."""
    transformer = fresh_import("helpers.transformer")
    model = spy_model(transformer, vocab=37, d_model=32, n_layers=2, n_heads=4, max_len=40,
                      seed=0)
    idx = torch.randint(0, 37, (3, 5), generator=torch.Generator().manual_seed(1))
    idx, steps = idx.to(get_device()), 12
    expected = uncached_greedy(model, idx, steps)
    model.calls = []
    try:
        out = call(fn, model, idx, steps, name="generate_greedy(model, idx, 12)",
                   hint="model(idx, cache=cache) returns logits (B, L, V); take [:, -1]")
    except ShortcutUsed as error:
        raise CheckFailed(str(error)) from None
    out = expect_tensor(out, "generate_greedy(...)")
    expect_shape(out, (3, 5 + steps), "generate_greedy(model, idx, 12)",
                 "the prompt followed by the new tokens")
    calls = model.calls
    expect(bool(calls), "the model was never called")
    expect(all(cached for _, cached in calls), "a call to the model had no cache: pass "
           "cache=cache on every call (the prefill included)")
    expect(calls[0][0] == 5, f"the first call fed {calls[0][0]} tokens: feed the whole prompt "
           "once (the prefill)")
    expect(all(length == 1 for length, _ in calls[1:]), "after the prefill every call must feed "
           f"one token, the newest: the calls fed {[length for length, _ in calls]}")
    expect(len(calls) <= steps + 1, f"{len(calls)} model calls for {steps} new tokens: one "
           "prefill and one call per new token at most")
    expect(bool((out[:, :5] == idx).all()), "the output must start with the prompt")
    expect(bool((out == expected).all()), "the tokens differ from generation without a cache: "
           "feed each new token (the argmax of the last position's logits) after the prefill")
    passed("generate_greedy")


# --- exercise 4: quantization ----------------------------------------------------------------


def quantization_oracle(x: torch.Tensor, dim: int, bits: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """scale and zero of min-max quantization along ``dim``, in plain arithmetic (float64)."""
    x64 = x.double()
    low, high = x64.amin(dim=dim, keepdim=True), x64.amax(dim=dim, keepdim=True)
    return (high - low) / (2**bits - 1), low


def quantization_case(seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(3, 5, 8) numbers with outliers, a constant slice along every dim, and exact ties."""
    x = randn(3, 5, 8, seed=seed, dtype=dtype) * 2
    x[0, 1, 3] = 9.0  # an outlier
    x[1, 2, :] = -0.75  # constant along dim -1
    x[:, 0, 0] = 0.5  # constant along dim 0
    x[2, :, 5] = 1.25  # constant along dim 1
    return x


@exercise
def quantize(quantize_fn: Callable, dequantize_fn: Callable) -> None:
    """``quantize(x, dim, bits)`` and ``dequantize(codes, scale, zero)``: min-max codes with
    an error of at most half a step, one scale and zero point per slice along ``dim``."""
    for dim, bits in ((-1, 8), (1, 4), (0, 8), (-2, 4)):
        x = quantization_case(seed=dim + 3 * bits)
        what = f"quantize(x, dim={dim}, bits={bits}) on x of shape {tuple(x.shape)}"
        result = run_without("quantize", lambda: call(
            quantize_fn, x, dim, bits, name=what, hint="take amin and amax along dim with "
            "keepdim=True, so that they broadcast against x"),
            helpers=["helpers.kv_cache.quantize"])
        expect(isinstance(result, tuple) and len(result) == 3,
               "quantize should return a tuple (codes, scale, zero)")
        codes, scale, zero = (expect_tensor(t, n) for t, n in zip(result, ("codes", "scale",
                                                                           "zero")))
        sliced = list(x.shape)
        sliced[dim] = 1
        expect_shape(codes, x.shape, f"codes of {what}", "one code per number")
        expect(codes.dtype == torch.uint8, f"codes should be torch.uint8, got {codes.dtype}: "
               "round, clamp to 0 .. 2^bits - 1, then .to(torch.uint8)")
        expect(tuple(scale.shape) != (1,) * x.dim() and scale.numel() != 1,
               f"{what}: one scale for the whole tensor; there should be one per slice "
               "along dim (amin/amax along dim, keepdim=True)")
        expect_shape(scale, sliced, f"scale of {what}", "one per slice along dim: reduce "
                     "along dim with keepdim=True")
        expect_shape(zero, sliced, f"zero of {what}", "one per slice along dim")
        expect(scale.dtype == x.dtype and zero.dtype == x.dtype,
               f"scale and zero should have x's dtype {x.dtype}, got {scale.dtype} and "
               f"{zero.dtype}")
        expect(int(codes.max()) <= 2**bits - 1, f"{what}: a code is {int(codes.max())}, above "
               f"2^{bits} - 1 = {2**bits - 1}: use the argument bits")
        expected_scale, expected_zero = quantization_oracle(x, dim, bits)
        expect(not is_close(scale, expected_scale * (2**bits - 1) / 2**bits),
               "the scale divides the range by 2^bits: there are 2^bits - 1 steps between "
               "the codes 0 and 2^bits - 1")
        expect(not is_close(zero, -(x.abs().amax(dim=dim, keepdim=True))),
               "zero is -max|x| (symmetric quantization): KIVI's is asymmetric, zero = min")
        expect_close(scale, expected_scale, f"scale of {what}", "(max - min) / (2^bits - 1)")
        expect_close(zero, expected_zero, f"zero of {what}", "the minimum of each slice")
        x_hat = expect_tensor(dequantize_fn(codes, scale, zero), "dequantize(codes, scale, zero)")
        expect_shape(x_hat, x.shape, "dequantize(codes, scale, zero)")
        expect(bool(torch.isfinite(x_hat).all()), "NaN or inf after a round trip: a constant "
               "slice has scale 0; divide by 1 there, so its codes are 0")
        expect(x_hat.dtype == scale.dtype, f"dequantize should return the dtype of scale, "
               f"{scale.dtype}, got {x_hat.dtype}")
        expect_close(x_hat, codes.double() * scale.double() + zero.double(),
                     "dequantize(codes, scale, zero)", "codes * scale + zero")
        error = (x_hat.double() - x.double()).abs()
        bound = scale.double() / 2 + 1e-9
        if not bool((error <= bound).all()):
            expect(bool((error <= 2 * bound).all()), f"{what}: the round trip is off by "
                   "more than a step: codes = round((x - zero) / scale)")
            raise CheckFailed(f"{what}: the round trip is off by more than half a step: round "
                              "to the nearest code (torch.round), do not truncate")
    passed("quantize and dequantize")


# --- exercise 5: sinks and a window ----------------------------------------------------------


SINK_CASES = ((20, 5, 4), (20, 5, 0), (9, 5, 4), (6, 5, 4), (10, 1, 0), (7, 2, 3))


def positional(B: int, H: int, positions: list[int], D: int) -> torch.Tensor:
    """(B, H, len(positions), D) whose entries are the tokens' positions: what is kept can be
    read off."""
    values = torch.tensor(positions, dtype=torch.float64, device=get_device())
    return values[:, None].expand(B, H, len(positions), D).clone()


@exercise
def sink_window(fn: Callable) -> None:
    """``sink_window(k, v, window, n_sinks)``: the first n_sinks and the last window tokens,
    in order, each once."""
    for S, window, n_sinks in SINK_CASES:
        k = positional(2, 3, list(range(S)), 4)
        v = -positional(2, 3, list(range(S)), 6)
        what = f"sink_window with S={S}, window={window}, n_sinks={n_sinks}"
        result = call(fn, k, v, window, n_sinks, name=what,
                      hint="k and v are (B, H, S, D): select along dim 2")
        expect(isinstance(result, tuple) and len(result) == 2,
               "sink_window should return a tuple (k, v)")
        kept_k, kept_v = (expect_tensor(t, n) for t, n in zip(result, ("k", "v")))
        expected = list(range(S)) if S <= n_sinks + window else \
            list(range(n_sinks)) + list(range(S - window, S))
        kept = kept_k[0, 0, :, 0].long().tolist() if kept_k.dim() == 4 else None
        expect(kept is not None and kept_k.shape[:2] == k.shape[:2] and kept_k.shape[3] == 4,
               f"{what}: keys should stay (B, H, K, D), got {tuple(kept_k.shape)}")
        if kept is not None and len(kept) != len(set(kept)):
            raise CheckFailed(f"{what}: a token is kept twice ({kept}): when S <= n_sinks + "
                              "window keep everything once")
        if kept is not None and sorted(kept) == expected and kept != expected:
            raise CheckFailed(f"{what}: the right tokens in the wrong order ({kept}): sinks "
                              "first, then the window, in order")
        expect(kept == expected, f"{what}: kept positions {kept}, expected {expected}")
        expect(isinstance(kept_v, torch.Tensor) and kept_v.shape == (2, 3, len(expected), 6)
               and torch.equal(kept_v, -positional(2, 3, expected, 6)),
               f"{what}: the values must keep the same tokens as the keys")
    passed("sink_window")


# --- exercise 6: heavy hitters ---------------------------------------------------------------


HEAVY_CASES = ((12, 5, 2), (12, 5, 0), (12, 5, 5), (4, 5, 2), (5, 5, 1), (30, 9, 3))


def heavy_hitter_oracle(scores: torch.Tensor, budget: int, n_recent: int) -> torch.Tensor:
    """H2O's kept indices, (B, H, K), by sorting in plain Python."""
    B, H, S = scores.shape
    rows = []
    for row in scores.reshape(B * H, S).tolist():
        if S <= budget:
            rows.append(list(range(S)))
            continue
        older = sorted(range(S - n_recent), key=lambda j: -row[j])[:budget - n_recent]
        rows.append(sorted(older + list(range(S - n_recent, S))))
    return torch.tensor(rows).reshape(B, H, -1)


@exercise
def heavy_hitters(fn: Callable) -> None:
    """``heavy_hitters(scores, budget, n_recent)``: the recent tokens and the largest
    accumulated scores, as ascending indices."""
    for seed, (S, budget, n_recent) in enumerate(HEAVY_CASES):
        scores = torch.rand(2, 3, S, generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64).to(get_device())
        what = f"heavy_hitters with S={S}, budget={budget}, n_recent={n_recent}"
        kept = expect_tensor(call(fn, scores, budget, n_recent, name=what,
                                  hint="scores is (B, H, S): topk along the last dim"), what)
        expected = heavy_hitter_oracle(scores.cpu(), budget, n_recent)
        expect(not kept.is_floating_point(), f"{what}: returned {kept.dtype} numbers: return "
               "the indices (topk(...).indices), not the scores")
        expect_shape(kept, expected.shape, what, f"K = min(S, budget) = {expected.shape[-1]} "
                     "indices per (batch, head)")
        kept = kept.cpu()
        if torch.equal(kept.sort(dim=-1).values, expected) and not torch.equal(kept, expected):
            raise CheckFailed(f"{what}: the right tokens in the wrong order: sort the indices "
                              "(ascending), so the cache keeps its tokens in order")
        rows = kept.reshape(-1, kept.shape[-1]).tolist()
        recent = set(range(S - n_recent, S)) if S > budget else set()
        expect(all(recent <= set(row) for row in rows), f"{what}: the last {n_recent} "
               "positions must always be kept, whatever their scores")
        expect(all(len(set(row)) == len(row) for row in rows), f"{what}: an index appears "
               "twice: choose the heavy hitters among the older tokens only, "
               "scores[..., :S - n_recent]")
        expect(torch.equal(kept, expected), f"{what}: kept {kept[0, 0].tolist()} in the first "
               f"row, expected {expected[0, 0].tolist()}: the budget - n_recent largest "
               "scores among the older tokens, plus the recent ones")
    passed("heavy_hitters")
